r"""Excitation backprop's dispatch: which torch call gets which node rule.

:class:`ExcitationHandlers` holds, for one
:class:`~torchray_like.attribution.excitation_backprop.ExcitationBackpropContext`, the table
from each torch function the context intercepts (convolutions, linear layers, pooling,
interpolation, sums, scalings, batch norm, rectifiers ...) to a handler that computes the plain
forward value and attaches the rule of :mod:`.excitation_rules`; operations no rule models are
recorded in :attr:`ExcitationHandlers.unmodeled` (:data:`UNMODELED_HINTS` says why each is a
problem).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .call_args import Call, arg_slot, get_arg
from .excitation_rules import (
    POSITIVE_OUTPUT_RULE,
    ExcitationCell,
    ExciteFunction,
    ExciteScaleFunction,
    ExciteSumFunction,
    PassThroughFunction,
)
from .rules import RectifierFunction, RuleCell

__all__ = ["ExcitationHandlers", "UNMODELED_HINTS"]

# ---------------------------------------------------------------------------------------------
# Handlers: which torch function gets which rule
# ---------------------------------------------------------------------------------------------

_CONV = (torch.conv1d, torch.conv2d, torch.conv3d)
_CONV_TRANSPOSE = (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d)
_AVG_POOL = (torch.avg_pool1d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d)
_ADAPTIVE_AVG_POOL = (torch.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                      torch._C._nn.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool3d)
_REDUCE = {torch.mean: "mean", torch.Tensor.mean: "mean", torch.sum: "sum_dims",
           torch.Tensor.sum: "sum_dims"}
_INTERPOLATE = (F.interpolate,)
_LINEAR_INTERPOLATION = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")
_BATCH_NORM = (F.batch_norm, torch.batch_norm)
_ADD = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
_ADD_INPLACE = (torch.Tensor.add_, torch.Tensor.__iadd__)
_SUB = (torch.sub, torch.subtract, torch.Tensor.sub, torch.Tensor.subtract,
        torch.Tensor.__sub__)
_SUB_INPLACE = (torch.Tensor.sub_, torch.Tensor.subtract_, torch.Tensor.__isub__)
_RSUB = (torch.rsub, torch.Tensor.__rsub__)
_MUL = (torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.multiply,
        torch.Tensor.__mul__, torch.Tensor.__rmul__)
_MUL_INPLACE = (torch.Tensor.mul_, torch.Tensor.multiply_, torch.Tensor.__imul__)
_DIV = (torch.div, torch.divide, torch.true_divide, torch.Tensor.div, torch.Tensor.divide,
        torch.Tensor.true_divide, torch.Tensor.__truediv__)
_DIV_INPLACE = (torch.Tensor.div_, torch.Tensor.divide_, torch.Tensor.true_divide_,
                torch.Tensor.__itruediv__)

#: Operations excitation backprop does not model: they keep their plain gradient, which makes
#: excitation negative or larger than the top signal.  Reported when autograd follows them.
_UNMODELED: Dict[Any, str] = {
    torch.neg: "neg", torch.negative: "neg", torch.Tensor.neg: "neg",
    torch.Tensor.negative: "neg", torch.Tensor.__neg__: "neg", torch.Tensor.neg_: "neg",
    torch.abs: "abs", torch.absolute: "abs", torch.Tensor.abs: "abs",
    torch.Tensor.absolute: "abs", torch.Tensor.__abs__: "abs", torch.Tensor.abs_: "abs",
    torch.Tensor.__rtruediv__: "reciprocal", torch.reciprocal: "reciprocal",
    torch.Tensor.reciprocal: "reciprocal",
    F.group_norm: "group_norm", torch.group_norm: "group_norm",
    F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm",
    F.instance_norm: "instance_norm", torch.instance_norm: "instance_norm",
    F.local_response_norm: "local_response_norm", F.normalize: "normalize",
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
    torch.Tensor.__rmatmul__: "matmul", torch.mm: "matmul", torch.Tensor.mm: "matmul",
    torch.bmm: "matmul", torch.Tensor.bmm: "matmul", torch.baddbmm: "matmul",
    torch.einsum: "einsum",
}
if hasattr(F, "rms_norm"):
    _UNMODELED[F.rms_norm] = "rms_norm"

#: Why each unmodeled operation is a problem, for the warning.
UNMODELED_HINTS = {
    "no_grad": "calls made without autograd on inputs that require grad — inside a custom "
               "autograd.Function, such as torch.utils.checkpoint(use_reentrant=True), or under "
               "torch.no_grad(): their backward, if any, is the Function's own, not "
               "excitation backprop",
}


def _is_activation(t: Any) -> bool:
    return (isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)
            and t.is_floating_point() and t.dim() > 0)


class ExcitationHandlers:
    """The handlers of one :class:`ExcitationBackpropContext` and what they recorded.

    Parameters
    ----------
    count, skip : callable
        ``count(kind)`` records a replaced call, ``skip(kind)`` a call of a handled kind that
        autograd does not record (the context's counters).
    on_unmodeled : callable
        ``on_unmodeled(name)`` is called when a backward pass goes through an operation the
        rules do not model (the context warns).
    signed, debug : bool
        The cell's input rule and debug printing.

    Attributes
    ----------
    cell : ExcitationCell
        Shared by every node created.
    affine_calls : list of int
        Forward-order indices of the convolution / linear calls (the dual unit's candidates).
    unmodeled : dict
        Operations autograd records that the rules do not model, by name, with their count
        (forward pass); ``unmodeled_applied`` counts the backward passes through them.
    """

    def __init__(self, count: Callable[[str], None], skip: Callable[[str], None],
                 on_unmodeled: Callable[[str], None], signed: bool = True,
                 debug: bool = False) -> None:
        self.count = count
        self.skip = skip
        self.on_unmodeled = on_unmodeled
        self.cell = ExcitationCell(signed, debug)
        self.relu_cell = RuleCell(POSITIVE_OUTPUT_RULE)
        self.next_index = 0
        self.affine_calls: List[int] = []
        self.unmodeled: Dict[str, int] = {}
        self.unmodeled_applied: Dict[str, int] = {}

    @property
    def applied(self) -> int:
        """Backward passes through replaced nodes (excitation nodes and rectifiers)."""
        return self.cell.applied + self.relu_cell.applied

    def reset(self) -> None:
        """Forget the calls of an earlier forward pass."""
        self.affine_calls = []
        self.unmodeled = {}

    def table(self) -> Dict[Any, Callable]:
        """torch function → handler."""
        part = functools.partial
        groups: List[Tuple[Sequence[Any], Callable]] = [
            (_CONV, part(self.weighted, kind="conv")),
            (_CONV_TRANSPOSE, part(self.weighted, kind="conv_transpose")),
            ((F.linear,), part(self.weighted, kind="linear")),
            (_AVG_POOL, part(self.unweighted, kind="avg_pool")),
            (_ADAPTIVE_AVG_POOL, part(self.unweighted, kind="adaptive_avg_pool")),
            (_INTERPOLATE, self.interpolate),
            (_BATCH_NORM, self.batch_norm),
            (_ADD, self.add),
            (_ADD_INPLACE, part(self.add, inplace=True)),
            (_SUB, self.sub),
            (_SUB_INPLACE, part(self.sub, inplace=True)),
            (_RSUB, self.rsub),
            (_MUL, self.mul),
            (_MUL_INPLACE, part(self.mul, inplace=True)),
            (_DIV, part(self.mul, divide=True)),
            (_DIV_INPLACE, part(self.mul, divide=True, inplace=True)),
            ((F.relu6,), self.relu6),
            ((F.hardtanh,), self.hardtanh),
            ((F.hardtanh_,), part(self.hardtanh, inplace=True)),
        ]
        h: Dict[Any, Callable] = {}
        for funcs, handler in groups:
            for func in funcs:
                h[func] = handler
        for func, kind in _REDUCE.items():
            h[func] = part(self.reduce, kind=kind)
        for func, name in _UNMODELED.items():
            h[func] = part(self.unmodeled_call, name=name)
        return h

    # -- bookkeeping -----------------------------------------------------------------------------
    def note(self, name: str) -> None:
        """Record an operation the rules do not model (forward pass)."""
        self.unmodeled[name] = self.unmodeled.get(name, 0) + 1

    def differentiated(self, x: Any) -> bool:
        """Whether autograd records the activation ``x`` here (a call it does not record runs
        the plain op).  Parameters are constants of the rules, never activations."""
        if not (isinstance(x, torch.Tensor) and x.requires_grad) or isinstance(x, nn.Parameter):
            return False
        if torch.is_grad_enabled():
            return True
        self.note("no_grad")
        return False

    def _index(self) -> int:
        index = self.next_index
        self.next_index += 1
        return index

    def _plain(self, func, args, kwargs, kind: str):
        self.skip(kind)
        return func(*args, **kwargs)

    def _track(self, out: Any, name: str) -> Any:
        """Note an unmodeled operation whose output autograd records; a hook on the output
        reports each backward pass that goes through it (only those change the map)."""
        self.note(name)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(functools.partial(self._applied_unmodeled, name))
        return out

    def _applied_unmodeled(self, name: str, grad: torch.Tensor) -> None:
        self.unmodeled_applied[name] = self.unmodeled_applied.get(name, 0) + 1
        self.on_unmodeled(name)

    # -- non-negative linear operations ----------------------------------------------------------
    def weighted(self, func, args, kwargs, kind: str):
        index = self._index()
        self.affine_calls.append(index)
        x_slot = arg_slot(args, kwargs, 0, ("input",))
        x = get_arg(args, kwargs, x_slot)
        if not self.differentiated(x):
            return self._plain(func, args, kwargs, kind)
        self.count(kind)
        w_slot = arg_slot(args, kwargs, 1, ("weight",))
        weight = get_arg(args, kwargs, w_slot)
        call = Call(func, args, kwargs, x_slot, w_slot, arg_slot(args, kwargs, 2, ("bias",)),
                    weight, index, self.cell, kind)
        return ExciteFunction.apply(x, call)

    def unweighted(self, func, args, kwargs, kind: str, names: Tuple[str, ...] = ("input",)):
        x_slot = arg_slot(args, kwargs, 0, names)
        x = get_arg(args, kwargs, x_slot)
        if not self.differentiated(x):
            return self._plain(func, args, kwargs, kind)
        self.count(kind)
        call = Call(func, args, kwargs, x_slot, index=self._index(), cell=self.cell, kind=kind)
        return ExciteFunction.apply(x, call)

    def reduce(self, func, args, kwargs, kind: str):
        """``sum`` / ``mean`` over explicit dimensions: a sum with positive weights.  A full
        reduction (no ``dim``: usually a score or a loss) keeps its gradient."""
        x = get_arg(args, kwargs, arg_slot(args, kwargs, 0, ("input", "self")))
        dim = get_arg(args, kwargs, arg_slot(args, kwargs, 1, ("dim",)))
        if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or dim is None
                or kwargs.get("dtype") is not None or "out" in kwargs):
            return func(*args, **kwargs)
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if not dims or not all(isinstance(d, int) for d in dims):
            return func(*args, **kwargs)
        return self.unweighted(func, args, kwargs, kind, ("input", "self"))

    def interpolate(self, func, args, kwargs):
        mode = get_arg(args, kwargs, arg_slot(args, kwargs, 3, ("mode",))) or "nearest"
        antialias = get_arg(args, kwargs, arg_slot(args, kwargs, 6, ("antialias",)))
        if mode not in _LINEAR_INTERPOLATION or antialias:
            # Bicubic (and antialiased) kernels have negative weights.
            return self.unmodeled_call(func, args, kwargs, name=f"interpolate({mode})")
        return self.unweighted(func, args, kwargs, "interpolate")

    def batch_norm(self, func, args, kwargs):
        x_slot = arg_slot(args, kwargs, 0, ("input",))
        x = get_arg(args, kwargs, x_slot)
        if not self.differentiated(x):
            return self._plain(func, args, kwargs, "batch_norm")
        self.count("batch_norm")
        return PassThroughFunction.apply(x, Call(func, args, kwargs, x_slot), self.cell)

    # -- sums, differences, scalings --------------------------------------------------------------
    def add(self, func, args, kwargs, inplace: bool = False, alpha_sign: int = 1):
        a = get_arg(args, kwargs, arg_slot(args, kwargs, 0, ("input", "self")))
        b = get_arg(args, kwargs, arg_slot(args, kwargs, 1, ("other",)))
        alpha = kwargs.get("alpha", 1)
        if (len(args) > 2 or "out" in kwargs or not _is_activation(a)
                or not _is_activation(b) or not _is_real(alpha)):
            return func(*args, **kwargs)
        da, db = self.differentiated(a), self.differentiated(b)
        try:  # (torch.broadcast_shapes costs 12 µs even for equal shapes, the usual case)
            shape = a.shape if a.shape == b.shape else torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            return func(*args, **kwargs)  # PyTorch's error
        # An operand of the output's shape is an activation; a smaller one that autograd does
        # not record is a bias (like a layer's bias it takes no share of the signal).
        if not ((a.shape == shape or da) and (b.shape == shape or db)) or (
                a.dtype != b.dtype or a.device != b.device):
            return func(*args, **kwargs)
        alpha = alpha * alpha_sign
        if alpha <= 0:
            out = func(*args, **kwargs)
            if alpha < 0 and db:
                out = self._track(out, "add(alpha<0)")
            return out
        if not (da or db) or (inplace and shape != a.shape):
            return self._plain(func, args, kwargs, "sum")
        self.count("sum")
        return ExciteSumFunction.apply(a, b, alpha, inplace, self.cell)

    def sub(self, func, args, kwargs, inplace: bool = False):
        """``a - α b``: with ``α < 0`` a positive weighted sum; otherwise the subtracted
        operand has a negative weight, which the rules do not model (unless it is a bias)."""
        b = get_arg(args, kwargs, arg_slot(args, kwargs, 1, ("other",)))
        alpha = kwargs.get("alpha", 1)
        if _is_real(alpha) and alpha < 0:
            return self.add(func, args, kwargs, inplace, alpha_sign=-1)
        out = func(*args, **kwargs)
        return self._track(out, "sub") if self.differentiated(b) else out

    def rsub(self, func, args, kwargs):
        """``other - x`` (``torch.rsub``, ``1 - x``): ``x`` enters with a negative weight."""
        x = get_arg(args, kwargs, arg_slot(args, kwargs, 0, ("input", "self")))
        out = func(*args, **kwargs)
        return self._track(out, "rsub") if self.differentiated(x) else out

    def mul(self, func, args, kwargs, inplace: bool = False, divide: bool = False):
        """A scaling by a non-negative constant (a number, or a tensor autograd does not
        record) passes the signal through; a product of two activations (a gate), a negative
        factor or a division by an activation is not modeled."""
        slots = (arg_slot(args, kwargs, 0, ("input", "self")), arg_slot(args, kwargs, 1,
                                                                         ("other",)))
        a, b = (get_arg(args, kwargs, s) for s in slots)
        op = "div" if divide else "mul"
        if "out" in kwargs or kwargs.get("rounding_mode") is not None or len(args) > 2:
            return func(*args, **kwargs)
        da, db = self.differentiated(a), self.differentiated(b)
        if not (da or db):
            return func(*args, **kwargs)
        if da and db:
            return self._track(func(*args, **kwargs), f"{op} of two activations")
        if db and (divide or inplace):
            return self._track(func(*args, **kwargs), "reciprocal" if divide else op)
        x_slot, constant = (slots[0], b) if da else (slots[1], a)
        x = a if da else b
        if not x.is_floating_point():
            return func(*args, **kwargs)
        if not _non_negative(constant, strict=divide):
            return self._track(func(*args, **kwargs), f"{op} by a negative factor")
        self.count("scale")
        return ExciteScaleFunction.apply(x, Call(func, args, kwargs, x_slot), self.cell,
                                         inplace)

    def unmodeled_call(self, func, args, kwargs, name: str):
        out = func(*args, **kwargs)
        if any(self.differentiated(t) for t in _tensor_args(args, kwargs)):
            out = self._track(out, name)
        return out

    # -- bounded rectifiers ---------------------------------------------------------------------
    def _rectify(self, func, args, kwargs, upper: float, inplace: bool):
        x = get_arg(args, kwargs, arg_slot(args, kwargs, 0, ("input",)))
        kind = "relu6" if upper == 6.0 else "hardtanh"
        if not self.differentiated(x):
            return self._plain(func, args, kwargs, kind)
        self.count(kind)
        return RectifierFunction.apply(x, self.relu_cell, upper, inplace)

    def relu6(self, func, args, kwargs):
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return self._rectify(func, args, kwargs, 6.0, bool(inplace))

    def hardtanh(self, func, args, kwargs, inplace: bool = False):
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        if float(lo) != 0.0 or float(hi) <= 0.0:
            return func(*args, **kwargs)  # not a rectifier: keeps its gradient
        if not inplace:
            inplace = bool(kwargs.get("inplace", args[3] if len(args) > 3 else False))
        return self._rectify(func, args, kwargs, float(hi), inplace)


def _non_negative(value: Any, strict: bool) -> bool:
    """Whether a constant factor is ``>= 0`` everywhere (``> 0`` with ``strict``)."""
    if isinstance(value, torch.Tensor):
        with torch._C.DisableTorchFunction():
            return bool((value > 0).all() if strict else (value >= 0).all())
    if _is_real(value):
        return value > 0 if strict else value >= 0
    return False


def _is_real(value: Any) -> bool:
    """A Python int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensor_args(args: tuple, kwargs: dict):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))
