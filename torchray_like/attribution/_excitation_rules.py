r"""Excitation backprop's node rules: what each call replaced by the context does in backward.

:class:`~torchray_like.attribution.excitation_backprop.ExcitationBackpropContext` owns an
:class:`ExcitationHandlers`; its :meth:`~ExcitationHandlers.table` maps each torch function the
context intercepts to a handler.  A handler computes exactly the plain forward value and returns
a tensor whose backward node applies the excitation rule:

* :class:`ExciteFunction` — a non-negative linear operation (convolution / linear layer with
  ``w⁺``, average pooling, interpolation, sums and means over dimensions):
  ``P' = r(x) ⊙ op⁺ᵀ(P / op⁺(r(x)))``;
* :class:`ExciteSumFunction` — a weighted sum ``a + α b`` (``α > 0``): each operand takes its
  share ``r(a) / (r(a) + α r(b))`` of the signal;
* :class:`ExciteScaleFunction` — multiplication / division by a positive constant: the signal
  passes unchanged where the output is excited;
* :class:`PassThroughFunction` — batch normalisation: the signal passes unchanged;
* rectifiers reuse :class:`~torchray_like.attribution.rules.RectifierFunction` with
  :data:`POSITIVE_OUTPUT_RULE`.

``r`` is the context's *input rule*: ``r(x) = x`` (signed, the authors' reference code, the
default) or ``r(x) = max(x, 0)`` (positive parts).  Every rule is computed in float32 at least
(float16 / bfloat16 data are promoted for the normalisation and cast back), and a unit whose
denominator is below :func:`excitation_eps` in magnitude passes nothing on.

Operations the rules do not model (a subtraction of activations, a negation, ``abs``, group /
layer / instance normalisation, products of two activations, matrix products ...) keep their
plain gradient and are recorded in :attr:`ExcitationHandlers.unmodeled`, which the context turns
into a warning.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .rules import RectifierFunction, ReLURule, RuleCell

__all__ = [
    "excitation_eps", "compute_dtype", "ExcitationCell", "ExcitationHandlers", "sum_rule",
    "ExciteFunction", "ExciteSumFunction", "ExciteScaleFunction", "PassThroughFunction",
    "POSITIVE_OUTPUT_RULE", "LINEAR_CHUNK_BYTES", "UNMODELED_HINTS",
]


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rules compute in for data of ``dtype``: float32 for 16-bit floats."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def excitation_eps(dtype: torch.dtype) -> float:
    """The ε guarding excitation-backprop divisions for data of ``dtype``.

    ``sqrt(finfo(d).tiny)`` of the dtype ``d`` the rules compute in (float32 for float16 and
    bfloat16 data, whose own ε — 7.8e-3 for float16 — would swallow real units): ≈ 1.1e-19 for
    float32, 1.5e-154 for float64.  A unit whose denominator is below ε in magnitude passes no
    signal on; ``signal / ε`` stays finite for signals up to about ``1 / ε``.
    """
    return float(torch.finfo(compute_dtype(dtype)).tiny) ** 0.5


def _nonzero_threshold(dtype: torch.dtype) -> float:
    """ε, or the smallest positive value of ``dtype`` where ε underflows in it (float16)."""
    info = torch.finfo(dtype)
    return max(excitation_eps(dtype), float(info.tiny) * float(info.eps))


# ---------------------------------------------------------------------------------------------
# State shared by the nodes of one context
# ---------------------------------------------------------------------------------------------


class ExcitationCell:
    """State shared by every node one context creates, read at backward time.

    ``signed`` selects the input rule (``r(x) = x`` or ``max(x, 0)``); ``debug`` prints one line
    per node in backward.  ``negate`` is the index of the node whose weights are negated in the
    current backward pass (the dual unit of contrastive excitation backprop): one forward pass
    then serves both the target's and the dual's backward pass; ``negated_used`` records that
    the negated node was reached; ``applied`` counts the backward passes through the nodes.
    ``cache`` keeps ``w⁺`` per weight tensor for the lifetime of the graph.  While ``keep`` is
    true, each node also keeps its ``op⁺(r(x))`` and the graph of its transpose in ``replays``
    so that the next backward pass through it only applies the transpose (the target's and the
    dual's passes share everything but the dual node).
    """

    __slots__ = ("signed", "debug", "negate", "negated_used", "cache", "keep", "replays",
                 "applied")

    def __init__(self, signed: bool = True, debug: bool = False) -> None:
        self.signed = signed
        self.debug = debug
        #: Backward passes through the nodes of this cell (one per node and pass).
        self.applied = 0
        self.negate: Optional[int] = None
        self.negated_used = False
        self.cache: Dict[Tuple[int, bool, torch.dtype], Tuple[torch.Tensor, int,
                                                              torch.Tensor]] = {}
        self.keep = False
        self.replays: Dict[Tuple[int, bool], Tuple[torch.Tensor, ...]] = {}

    # -- the rule's pieces --------------------------------------------------------------------
    def rule_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``r(x)`` in ``dtype``: ``x`` itself (signed) or its positive part (a new tensor)."""
        if self.signed:
            return x if x.dtype == dtype else x.to(dtype)
        return x.clamp(min=0) if x.dtype == dtype else x.to(dtype).clamp_(min=0)

    def denominator(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` where it is an excitatory input (``|z| >= ε`` signed, ``z >= ε`` positive),
        ``+inf`` elsewhere: ``P / denominator`` is 0 for the other units."""
        eps = excitation_eps(z.dtype)
        small = z.abs() < eps if self.signed else z < eps
        return torch.where(small, float("inf"), z)

    def excited(self, out: torch.Tensor) -> torch.Tensor:
        """Where a positive scaling ``out = c · x`` passes the signal (``out`` is its own
        denominator)."""
        threshold = _nonzero_threshold(out.dtype)
        return out.abs() >= threshold if self.signed else out >= threshold

    def positive_weight(self, weight: torch.Tensor, negate: bool,
                        dtype: torch.dtype) -> torch.Tensor:
        """``w⁺`` (or ``(-w)⁺`` for the dual) in ``dtype``, cached per weight tensor."""
        key = (id(weight), negate, dtype)
        hit = self.cache.get(key)
        if hit is not None and hit[0] is weight and hit[1] == weight._version:
            return hit[2]
        w = weight.detach().to(dtype)
        # (-w)⁺ = -(min(w, 0)): the positive part of the negated weights without negating twice.
        positive = w.clamp(max=0).neg_() if negate else w.clamp(min=0)
        self.cache[key] = (weight, weight._version, positive)
        return positive

    # -- contrastive passes -------------------------------------------------------------------
    def share_next_pass(self) -> None:
        """The next backward pass keeps each node's ``op⁺(r(x))`` for the one after it."""
        self.negate, self.keep = None, True

    def negate_in_next_pass(self, index: int) -> None:
        """The next backward pass negates the weights of node ``index`` (the dual unit)."""
        self.keep = False
        self.negate, self.negated_used = index, False

    def clear(self) -> None:
        """End shared passes and free the cached weights and replays (nodes stay usable)."""
        self.negate, self.keep = None, False
        self.cache.clear()
        self.replays.clear()

    def report(self, what: str, p: torch.Tensor, grads: Sequence[Optional[torch.Tensor]]
               ) -> None:
        """The ``debug`` line of a node: the signal it received and what it passed on."""
        out = sum(float(g.double().sum()) for g in grads if g is not None)
        print(f"excitation backprop: {what}: received {float(p.double().sum()):.6g}, "
              f"passed on {out:.6g}")


# ---------------------------------------------------------------------------------------------
# Replayable calls
# ---------------------------------------------------------------------------------------------

Slot = Union[int, str, None]


def arg_slot(args: tuple, kwargs: dict, pos: int, names: Tuple[str, ...]) -> Slot:
    """Where argument ``pos`` (keyword ``names``) of a call is: an index, a keyword, or None."""
    if len(args) > pos:
        return pos
    for name in names:
        if name in kwargs:
            return name
    return None


def get_arg(args: Sequence[Any], kwargs: dict, slot: Slot) -> Any:
    if slot is None:
        return None
    return args[slot] if isinstance(slot, int) else kwargs[slot]


def put_arg(args: list, kwargs: dict, slot: Slot, value: Any) -> None:
    if isinstance(slot, int):
        args[slot] = value
    elif slot is not None:
        kwargs[slot] = value


class Call:
    """A replaced call with its input (and weight / bias) slots, replayable on new tensors."""

    __slots__ = ("func", "args", "kwargs", "x_slot", "w_slot", "b_slot", "weight",
                 "weight_version", "index", "cell", "kind")

    def __init__(self, func: Callable, args: tuple, kwargs: dict, x_slot: Slot,
                 w_slot: Slot = None, b_slot: Slot = None,
                 weight: Optional[torch.Tensor] = None, index: int = -1,
                 cell: Optional[ExcitationCell] = None, kind: str = "") -> None:
        self.func = func
        self.args = list(args)
        self.kwargs = dict(kwargs)
        self.x_slot, self.w_slot, self.b_slot = x_slot, w_slot, b_slot
        self.weight = weight
        self.weight_version = None if weight is None else weight._version
        self.index = index
        self.cell = cell
        self.kind = kind
        # The node keeps no reference to the input tensor: autograd saves it (with its version).
        put_arg(self.args, self.kwargs, x_slot, None)

    def __call__(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 drop_bias: bool = False) -> torch.Tensor:
        args, kwargs = list(self.args), dict(self.kwargs)
        put_arg(args, kwargs, self.x_slot, x)
        if weight is not None:
            put_arg(args, kwargs, self.w_slot, weight)
        if drop_bias and self.b_slot is not None:
            put_arg(args, kwargs, self.b_slot, None)
        return self.func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------


class ExciteFunction(torch.autograd.Function):
    """A non-negative linear operation (conv / linear with ``w⁺``, pooling, interpolation, sum
    or mean over dimensions) whose backward is the excitation rule
    ``P' = r(x) ⊙ op⁺ᵀ(P / op⁺(r(x)))`` (nothing through units whose denominator is below ε);
    forward is the plain call."""

    @staticmethod
    def forward(ctx, x, call):
        with torch._C.DisableTorchFunction():
            out = call(x)
        ctx.save_for_backward(x)
        ctx.call = call
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, p):
        (x,) = ctx.saved_tensors
        call: Call = ctx.call
        cell: ExcitationCell = call.cell
        if call.weight is not None and call.weight._version != call.weight_version:
            # What autograd says when a saved tensor changed: the rule would silently use
            # weights the forward pass did not.
            raise RuntimeError(
                "excitation backprop: the weight of a layer was modified in place between the "
                "forward pass and backward; run the forward pass again")
        cell.applied += 1
        with torch._C.DisableTorchFunction():
            negate = False
            if call.weight is not None and cell.negate == call.index:
                negate = cell.negated_used = True
            key = (call.index, negate)
            replay = cell.replays.pop(key, None) if cell.replays else None
            keep = cell.keep
            if call.func is F.linear and call.weight.dtype == x.dtype:
                denominator = None if replay is None else replay[0]
                g, denominator = linear_rule(x, call.weight, p, negate, cell, denominator)
                if keep:
                    cell.replays[key] = (denominator,)
            else:
                g = _operator_rule(x, call, p, negate, cell, key, replay, keep)
            if cell.debug:
                cell.report(f"{call.kind} #{call.index}" + (" (dual)" if negate else ""), p,
                            [g])
        return g, None


def _operator_rule(x: torch.Tensor, call: Call, p: torch.Tensor, negate: bool,
                   cell: ExcitationCell, key: Tuple[int, bool],
                   replay: Optional[Tuple[torch.Tensor, ...]], keep: bool) -> torch.Tensor:
    """``r(x) ⊙ op⁺ᵀ(P / op⁺(r(x)))`` with ``op⁺`` replayed on a leaf (its transpose by
    autograd)."""
    dtype = compute_dtype(x.dtype)
    if replay is None:
        xr = cell.rule_input(x, dtype)
        weight = None if call.weight is None else cell.positive_weight(call.weight, negate,
                                                                       dtype)
        with torch.enable_grad():
            leaf = xr.detach().requires_grad_(True)
            z = call(leaf, weight, drop_bias=True)
        denominator = cell.denominator(z.detach())
    else:
        z, leaf, xr, denominator = replay
    if keep:
        cell.replays[key] = (z, leaf, xr, denominator)
    s = torch.div(p.to(dtype), denominator)
    (g,) = torch.autograd.grad(z, leaf, s, retain_graph=keep)
    # In place when the transposed operation returned a fresh dense tensor (convolutions);
    # a sum's or mean's gradient is an expanded view of ``s``.
    dense = g.is_contiguous() or (g.dim() == 4 and g.is_contiguous(
        memory_format=torch.channels_last))
    return (g.mul_(xr) if dense else g * xr).to(x.dtype)


#: Bytes of ``w⁺`` materialised at once by the linear rule on the CPU (a block that stays
#: cheap to rewrite; larger blocks on accelerators, where each block costs kernel launches).
LINEAR_CHUNK_BYTES = 1 << 25
LINEAR_CHUNK_BYTES_ACCELERATOR = 1 << 28


def linear_rule(x: torch.Tensor, weight: torch.Tensor, p: torch.Tensor, negate: bool,
                cell: ExcitationCell, denominator: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The excitation rule of ``F.linear`` without materialising ``w⁺`` whole.

    ``w⁺`` is built block of rows by block of rows into one small buffer that serves both
    products of the block (``z = r(x) w⁺ᵀ`` and ``s w⁺``): the weight is read once, like the
    plain gradient reads it, instead of being clamped into a fresh copy as large as the layer
    (for VGG's first classifier layer, 400 MB written and read twice per call).  Returns the
    signal for ``x`` and the denominators (to reuse in a second backward pass).
    """
    dtype = compute_dtype(x.dtype)
    in_features = weight.shape[-1]
    out_features = weight.shape[0]
    xr = cell.rule_input(x, dtype).reshape(-1, in_features)
    p2 = p.reshape(-1, out_features).to(dtype)
    w = weight.detach()
    budget = LINEAR_CHUNK_BYTES if w.device.type == "cpu" else LINEAR_CHUNK_BYTES_ACCELERATOR
    rows = max(1, min(out_features, budget // max(1, in_features * w.element_size())))
    buffer = torch.empty((rows, in_features), dtype=dtype, device=w.device)
    grad = torch.zeros_like(xr)
    fresh = denominator is None
    if denominator is None:
        denominator = torch.empty((xr.shape[0], out_features), dtype=dtype, device=xr.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        block = buffer[:stop - start]
        if w.dtype != dtype:
            block.copy_(w[start:stop])
            if negate:
                block.clamp_(max=0).neg_()
            else:
                block.clamp_(min=0)
        elif negate:
            torch.clamp(w[start:stop], max=0, out=block).neg_()
        else:
            torch.clamp(w[start:stop], min=0, out=block)
        if fresh:
            denominator[:, start:stop] = cell.denominator(xr @ block.t())
        grad.addmm_(p2[:, start:stop] / denominator[:, start:stop], block)
    return grad.mul_(xr).reshape(x.shape).to(x.dtype), denominator


def sum_rule(terms: Sequence[torch.Tensor], weights: Sequence[float], p: torch.Tensor,
             cell: ExcitationCell) -> List[torch.Tensor]:
    """The signal of each term of ``Σ_k α_k t_k`` (``α_k > 0``): ``α_k r(t_k) / Σ_l α_l r(t_l)
    · P``, summed back to the term's shape where it was broadcast."""
    dtype = compute_dtype(p.dtype)
    scaled = []
    for t, alpha in zip(terms, weights):
        r = cell.rule_input(t, dtype)
        scaled.append(r if alpha == 1 else r * alpha)
    total = functools.reduce(torch.add, scaled)
    s = torch.div(p.to(dtype), cell.denominator(total))
    return [torch.mul(r, s).sum_to_size(t.shape).to(t.dtype) for r, t in zip(scaled, terms)]


class ExciteSumFunction(torch.autograd.Function):
    """``a + α b`` (or ``a += α b``), ``α > 0``, whose backward splits the signal in proportion
    to the terms: ``P_a = r(a) / (r(a) + α r(b)) · P`` and ``P_b = α r(b) / (r(a) + α r(b)) · P``.
    """

    @staticmethod
    def forward(ctx, a, b, alpha, inplace, cell):
        with torch._C.DisableTorchFunction():
            if inplace:
                # ``a`` is about to be overwritten (and later, often, rectified in place): keep
                # its values.  Only calls that autograd follows get here.
                saved_a = a.clone()
                saved_b = b.clone() if _shares_memory(a, b) else b
                out = a.add_(b, alpha=alpha) if alpha != 1 else a.add_(b)
                ctx.mark_dirty(a)
            else:
                saved_a, saved_b = a, b
                out = torch.add(a, b, alpha=alpha) if alpha != 1 else torch.add(a, b)
        ctx.save_for_backward(saved_a, saved_b)
        ctx.alpha, ctx.cell = alpha, cell
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, p):
        a, b = ctx.saved_tensors
        cell: ExcitationCell = ctx.cell
        cell.applied += 1
        with torch._C.DisableTorchFunction():
            grad_a, grad_b = sum_rule((a, b), (1, ctx.alpha), p, cell)
            if cell.debug:
                cell.report("sum", p, [grad_a, grad_b])
        return (grad_a if ctx.needs_input_grad[0] else None,
                grad_b if ctx.needs_input_grad[1] else None, None, None, None)


class ExciteScaleFunction(torch.autograd.Function):
    """``c · x`` or ``x / c`` with a non-negative constant ``c`` (a number or a tensor that
    autograd does not follow): a one-input linear unit with weight ``c``, so the signal passes
    unchanged where ``r(x) c`` is an excitatory input (``c`` cancels in ``x c / (x c)``)."""

    @staticmethod
    def forward(ctx, x, call, cell, inplace):
        with torch._C.DisableTorchFunction():
            out = call(x)
            ctx.mask = cell.excited(out)
        if inplace:
            ctx.mark_dirty(x)
        ctx.cell = cell
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, p):
        ctx.cell.applied += 1
        with torch._C.DisableTorchFunction():
            g = torch.where(ctx.mask, p, 0.0)
            if ctx.cell.debug:
                ctx.cell.report("scale", p, [g])
        return g, None, None, None


class PassThroughFunction(torch.autograd.Function):
    """An operation (batch normalisation) whose forward is the plain call and whose backward
    passes the signal through unchanged."""

    @staticmethod
    def forward(ctx, x, call, cell):
        ctx.cell = cell
        with torch._C.DisableTorchFunction():
            return call(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, p):
        ctx.cell.applied += 1
        return p, None, None


class _PositiveOutputRule(ReLURule):
    """Bounded rectifiers under excitation backprop: the signal passes wherever the output is
    positive, the saturated side included (the unit is excited, it just does not grow)."""

    name = "excitation"

    def backward(self, grad: torch.Tensor, output: torch.Tensor,
                 upper: Optional[float]) -> torch.Tensor:
        return torch.ops.aten.threshold_backward(grad, output, 0)


POSITIVE_OUTPUT_RULE = _PositiveOutputRule()


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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
        try:
            shape = torch.broadcast_shapes(a.shape, b.shape)
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
