r"""Rectifier rules: how a ReLU (or ReLU6) passes a signal back, and the context applying them.

The modified backward of each replaced call is an :class:`torch.autograd.Function` whose
forward is exactly the plain operation; the rule it applies in backward is a value the node holds
from its forward pass, so a graph built inside the context can be differentiated after the block
has ended, and the rule can be switched between two backward passes of one forward.

A rectifier is recognised whichever way it is written: ``nn.ReLU`` / ``F.relu`` / ``torch.relu``
/ ``Tensor.relu`` (and their in-place forms), ``torch.ops.aten.relu``, ``ReLU6`` and
``hardtanh(x, 0, b)``, ``clamp(x, min=0)`` / ``clip`` / ``clamp_min(x, 0)`` (and
``clamp(x, 0, b)``, a bounded rectifier like ReLU6), ``F.threshold(x, 0, 0)`` /
``nn.Threshold(0, 0)``, ``torch.where(x > 0, x, 0)`` and ``torch.maximum(x, zeros)`` /
``torch.max(x, zeros)``.  Look-alikes that are not rectifiers at zero (``hardtanh(x, -1, 1)``,
``threshold(x, 0.5, 0)``, a ``where`` or ``maximum`` with a zero operand that is not one of the
forms above) and other non-linearities (GELU, SiLU, ``abs``, the shrink functions, GLU ...)
keep their plain gradient and are reported with
:class:`~torchray_like.attribution.context.UnhandledActivationWarning`.
"""

from __future__ import annotations

import contextlib
import weakref
from numbers import Real
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import graph_rules
from .autograd_guards import first_order
from .call_args import arg, first_arg, with_first_arg
from .context import RuleContext

__all__ = ["ReLURule", "GRADIENT_RULE", "ReLUContext", "RectifierFunction", "RuleCell",
           "UNRECORDED_RECTIFIER", "mask_into"]


def mask_into(op: Any, positive: torch.Tensor, *args: Any) -> torch.Tensor:
    """``op(positive, *args)`` for an ATen rectifier backward (``threshold_backward``,
    ``hardtanh_backward``), written into ``positive``, a fresh tensor the rule owns: one
    allocation, two passes (the functional op's fresh output costs 1.5x on a 8x64x56x56
    gradient).  Under a caller's ``TorchDispatchMode``, the functional op: a mode may not
    know out= arguments not named "out" (``allow_mutation_on_saved_tensors``: KeyError 'out').
    """
    if torch._C._len_torch_dispatch_stack():
        return op.default(positive, *args)
    return op.grad_input(positive, *args, grad_input=positive)


class ReLURule:
    """Backward rule for rectifiers (ReLU and its bounded form ReLU6 / ``hardtanh(x, 0, b)``).

    Subclasses override :meth:`backward`.  ``output`` is the forward output (``relu(x)`` or
    ``clamp(x, 0, upper)``); ``output > 0`` iff the forward input was positive and
    ``output < upper`` iff it was below the upper bound, so the output alone determines every
    rule.  ``upper`` is ``None`` for a plain ReLU.

    The base class is the plain gradient: ``grad * [0 < x (< upper)]``.
    """

    name = "gradient"

    def backward(self, grad: torch.Tensor, output: torch.Tensor,
                 upper: Optional[float]) -> torch.Tensor:
        """Return the signal passed to the rectifier's input."""
        if upper is None:
            return torch.ops.aten.threshold_backward(grad, output, 0)
        return torch.ops.aten.hardtanh_backward(grad, output, 0.0, upper)

    def backward_relu(self, plain: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The rule through a plain ReLU, from what PyTorch's own backward gives:
        ``plain = grad · [x > 0]`` (``grad`` is the incoming signal).

        The same rule as :meth:`backward` with ``upper=None``, written for the methods' fast
        path (:mod:`.graph_rules`: the rule put on the graph of a plain forward pass).  A
        subclass that overrides :meth:`backward` only is not used there.
        """
        return plain

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: The plain-gradient rule (a rule context using it changes nothing but counts ReLU calls).
GRADIENT_RULE = ReLURule()


class RectifierFunction(torch.autograd.Function):
    """``relu(x)`` or ``clamp(x, 0, upper)`` whose backward applies ``cell.rule``.

    ``RectifierFunction.apply(x, cell, upper, inplace[, compute])``.  The forward computes
    exactly what PyTorch computes — ``compute(x)`` when given (the caller's own expression,
    e.g. ``torch.where(x > 0, x, 0)``), else ``relu`` / ``hardtanh(x, 0, upper)`` — in place when
    the caller asked for it, so code relying on the side effect keeps working.  ``cell`` is read
    at backward time, which lets one forward serve several rules; each backward through a node
    adds one to ``cell.applied``.
    """

    @staticmethod
    def forward(ctx, x, cell, upper, inplace, *rest):
        """The plain rectifier (``compute(x)`` when given); saves the output for backward."""
        compute = rest[0] if rest else None
        with torch._C.DisableTorchFunction():
            if compute is not None:
                out = compute(x)
            elif upper is None:
                out = torch.relu_(x) if inplace else torch.relu(x)
            else:
                out = (torch._C._nn.hardtanh_(x, 0.0, upper) if inplace
                       else torch._C._nn.hardtanh(x, 0.0, upper))
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        ctx.cell = cell
        ctx.upper = upper
        ctx.extra = 3 + len(rest)
        return out

    @staticmethod
    @first_order("the rectifier rule (guided backprop, DeConvNet)")
    def backward(ctx, grad):
        """``cell.rule.backward(grad, output, upper)``, counted in ``cell.applied``.  Under
        ``create_graph=True`` the result is exact but cannot be differentiated again
        (:class:`~.autograd_guards.SecondOrderError`); batched gradients (vmap) are refused."""
        (out,) = ctx.saved_tensors
        cell = ctx.cell
        cell.applied += 1
        with torch._C.DisableTorchFunction():
            return (cell.rule.backward(grad, out, ctx.upper),) + (None,) * ctx.extra


class RuleCell:
    """A mutable holder for the rule the nodes created by one context apply.

    ``applied`` counts the backward passes through those nodes (one per node and backward).
    """

    __slots__ = ("rule", "applied")

    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.applied = 0


def _is_zero(value: Any) -> bool:
    """A Python number equal to zero (not a bool, not a tensor)."""
    return isinstance(value, Real) and not isinstance(value, bool) and value == 0


def _zero_tensor_like(z: Any, x: torch.Tensor) -> Optional[bool]:
    """Whether ``z`` is a zero operand that leaves ``op(x, z)`` shaped and typed like ``x``.

    ``True``: an all-zero tensor (or zero number) that does not require grad, broadcasting to
    ``x``'s shape with ``x``'s dtype.  ``None``: zero, but not such an operand (the call may be
    a rectifier we cannot take over).  ``False``: not zero.
    """
    if _is_zero(z):
        return True
    if not isinstance(z, torch.Tensor) or z.numel() > x.numel() or z.is_complex():
        return False
    if z.numel() and bool(z.any()):
        return False
    try:
        shape = torch.broadcast_shapes(x.shape, z.shape)
    except RuntimeError:
        return None
    if (shape != x.shape or torch.result_type(x, z) != x.dtype or z.requires_grad
            or z.device != x.device):
        return None
    return True


def _records(value: Any) -> bool:
    """Whether autograd records operations on ``value`` (a tensor requiring grad)."""
    return isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled()


#: Attribute a comparison's result carries inside a ReLUContext: ``(weakref to x, sign)`` for
#: ``x > 0`` / ``x >= 0`` (sign +1) and ``x < 0`` / ``x <= 0`` (sign -1).
_MASK_ATTR = "_torchray_like_sign_of"


def _saved(node: Any, name: str) -> Any:
    """A value an autograd node saved from its forward call (``None`` when absent)."""
    return getattr(node, "_saved_" + name, None)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _native_relu(node: Any, context: RuleContext) -> bool:
    return True  # inside a ReLUContext every recorded ReLU becomes a RectifierFunction node


def _native_hardtanh(node: Any, context: RuleContext) -> bool:
    return _is_zero(_saved(node, "min_val")) and _positive(_saved(node, "max_val"))


def _native_threshold(node: Any, context: RuleContext) -> bool:
    # threshold(x, 0, v) with v != 0 is no rectifier and keeps a plain node inside the context
    # too (reported as unhandled); the node does not save v, so those cannot be told apart.
    return _is_zero(_saved(node, "threshold")) and not context.unhandled.get("threshold")


def _native_clamp(node: Any, context: RuleContext) -> bool:
    upper = _saved(node, "max")
    return _is_zero(_saved(node, "min")) and (upper is None or _positive(upper))


#: Plain autograd nodes of rectifiers, which a ReLUContext never leaves in its own thread.
NATIVE_RECTIFIER_NODES: Dict[str, Callable[[Any, RuleContext], bool]] = {
    "ReluBackward0": _native_relu, "HardtanhBackward0": _native_hardtanh,
    "ThresholdBackward0": _native_threshold, "ClampBackward1": _native_clamp,
    "ClampMinBackward0": _native_clamp,
}

#: Autograd nodes of non-linearities a rectifier rule does not cover -> the names the context
#: reports their calls under (see ``OTHER_ACTIVATION_NAMES``).
UNHANDLED_NODES: Dict[str, Tuple[str, ...]] = {
    "GeluBackward0": ("gelu",), "SiluBackward0": ("silu",), "MishBackward0": ("mish",),
    "EluBackward0": ("elu", "selu", "celu"), "EluBackward1": ("elu", "selu", "celu"),
    "CeluBackward0": ("celu",), "CeluBackward1": ("celu",),
    "LeakyReluBackward0": ("leaky_relu",), "LeakyReluBackward1": ("leaky_relu",),
    "RreluWithNoiseBackward0": ("rrelu",), "RreluWithNoiseBackward1": ("rrelu",),
    "PreluKernelBackward0": ("prelu",), "SoftplusBackward0": ("softplus",),
    "HardswishBackward0": ("hardswish",), "HardsigmoidBackward0": ("hardsigmoid",),
    "TanhBackward0": ("tanh", "tanhshrink"), "SigmoidBackward0": ("sigmoid",),
    "LogSigmoidBackward0": ("logsigmoid",), "GluBackward0": ("glu",),
    "HardshrinkBackward0": ("hardshrink",), "SoftshrinkBackward0": ("softshrink",),
    "AbsBackward0": ("abs", "softsign"), "ErfBackward0": ("erf",), "ErfcBackward0": ("erf",),
    "SpecialErfcxBackward0": ("erf",), "ExpBackward0": ("exp",), "Exp2Backward0": ("exp",),
    "Expm1Backward0": ("exp",), "SinBackward0": ("sin",), "SincBackward0": ("sin",),
    "CosBackward0": ("cos",), "AtanBackward0": ("atan",),
}


#: The name under which rectifiers run without autograd on a tensor requiring grad are reported
#: (:attr:`ReLUContext.unhandled`): their backward, if any, is not the rule.
UNRECORDED_RECTIFIER = ("rectifier without autograd (inside a custom autograd.Function, whose "
                        "own backward applies, or torch.no_grad())")


def _only_configures(cls: type) -> bool:
    """Whether ``cls`` is :class:`ReLUContext` or a subclass that defines no method but
    ``__init__`` (``GuidedBackpropContext``): a subclass that changes how calls are handled
    must see them, so the methods' fast path is not for it."""
    for klass in cls.__mro__:
        if klass is ReLUContext:
            return True
        if any(callable(value) or isinstance(value, (property, staticmethod, classmethod))
               for name, value in vars(klass).items() if name != "__init__"):
            return False
    return False


class ReLUContext(RuleContext):
    """Replace the backward of every rectifier the model calls.

    Caught calls: ``nn.ReLU`` (with and without ``inplace=True``), ``F.relu``, ``F.relu_``,
    ``torch.relu``, ``torch.relu_``, ``Tensor.relu``, ``Tensor.relu_``, ``torch.ops.aten.relu``;
    the bounded rectifier ReLU6: ``nn.ReLU6``, ``F.relu6`` and ``F.hardtanh(x, 0, b)`` (what
    ``nn.ReLU6`` calls); and rectifiers written another way: ``clamp`` / ``clip`` with
    ``min=0`` (a ReLU; with ``max=b`` too, a bounded rectifier like ReLU6), ``clamp_min(x, 0)``,
    ``F.threshold(x, 0, 0)`` / ``nn.Threshold(0, 0)``, ``torch.where(x > 0, x, 0)`` (also
    ``x >= 0``, or ``where(x <= 0, 0, x)``), ``torch.maximum(x, zeros)`` / ``torch.max(x,
    zeros)`` / ``fmax`` with an all-zero operand of ``x``'s dtype that broadcasts to ``x``'s
    shape — with their tensor-method and in-place forms.  The forward values are exactly
    PyTorch's; in-place calls stay in place.

    Look-alikes that are no rectifier at zero (``hardtanh(x, -1, 1)``, ``threshold(x, 0.5,
    0)``), ``where`` / ``maximum`` with a zero operand in another form, gates on the sign of a
    tensor (``where(x > 0, x, 0.1 * x)``, ``x * (x > 0)``, ``x.masked_fill(x < 0, 0)``), and
    the other elementwise non-linearities in every spelling — GELU, SiLU, tanh, sigmoid /
    ``torch.special.expit``, ``erf`` (a hand-written GELU), ``exp``, ``sin``, ``abs``, the
    shrink functions, GLU ..., functional, in-place (``x.sigmoid_()``, ``F.leaky_relu_``) or
    ``torch.ops.aten`` — keep their plain gradient and are reported
    (:class:`UnhandledActivationWarning` on exit, and in :attr:`unhandled`) when autograd
    records them.

    Rectifiers run in other threads (worker threads of the forward pass, ``nn.DataParallel``
    over several devices) are out of the context's reach; :meth:`check_path` finds them in the
    graph after the forward pass and raises a :class:`ValueError` saying what to do.

    Only calls autograd records count as replaced (:attr:`counts`); a rectifier under
    ``torch.no_grad()`` or on a tensor that does not require grad (a constant, a frozen
    parameter) runs the plain operation and is listed in :attr:`skipped`.  After backward,
    :attr:`applied` tells how many replaced nodes the backward passes actually went through
    (a ReLU that does not lie between the differentiated tensor and the output is not).

    Parameters
    ----------
    relu_func : ReLURule or type of torch.autograd.Function
        The rule (TorchRay's argument name; ``function_class=`` is an alias).  A
        :class:`ReLURule` instance (``GUIDED_BACKPROP_RULE``, ``DECONVNET_RULE``, or your own
        subclass) gets the fast path: one or two fused kernels in backward.  For TorchRay
        compatibility an :class:`torch.autograd.Function` subclass whose ``apply(x)`` computes
        ``relu(x)`` is accepted too; its backward is yours (for bounded rectifiers its output is
        then clamped at the upper bound, whose plain gradient masks the saturated side).

    Examples
    --------
    >>> with ReLUContext(GUIDED_BACKPROP_RULE):        # doctest: +SKIP
    ...     y = model(x)
    ...     y[0, c].backward()
    """

    replaces = "ReLU"
    requirement = ("a model that uses ReLU (nn.ReLU, F.relu, torch.relu, Tensor.relu, "
                   "ReLU6, clamp(min=0) ...)")
    report_other_activations = True
    escaped_kinds = NATIVE_RECTIFIER_NODES
    unhandled_kinds = UNHANDLED_NODES

    def __init__(self, relu_func: Union[ReLURule, type, None] = None, *,
                 function_class: Union[ReLURule, type, None] = None) -> None:
        # TorchRay names the argument ``relu_func``; ``function_class`` is kept as an alias.
        if (relu_func is None) == (function_class is None):
            raise TypeError(
                "ReLUContext takes one rule: ReLUContext(relu_func) with a ReLURule or an "
                "autograd.Function subclass such as GuidedBackpropReLU")
        function_class = relu_func if relu_func is not None else function_class
        super().__init__()
        self._attached = False
        self._cell: Optional[RuleCell] = None
        self._function: Any = None
        if isinstance(function_class, ReLURule):
            self._cell = RuleCell(function_class)
        elif isinstance(function_class, type) and issubclass(function_class,
                                                             torch.autograd.Function):
            self._function = function_class
        else:
            raise TypeError(
                "ReLUContext: relu_func / function_class must be a ReLURule instance or a "
                f"subclass of torch.autograd.Function, got {function_class!r}")

    def __enter__(self):
        # The table is built when the context is first entered: the methods' fast path
        # (graph_rules) never enters it, and building it is most of a context's creation.
        if not self.handlers:
            self._fill_handlers()
        return super().__enter__()

    def _fill_handlers(self) -> None:
        h = self.handlers
        aten = torch.ops.aten
        h[F.relu] = self._relu_kw
        h[torch.relu] = h[torch.Tensor.relu] = self._relu
        h[aten.relu] = h[aten.relu.default] = self._relu
        h[F.relu_] = h[torch.relu_] = h[torch.Tensor.relu_] = self._relu_inplace
        h[aten.relu_] = h[aten.relu_.default] = self._relu_inplace
        h[F.relu6] = self._relu6_kw
        h[F.hardtanh] = self._hardtanh
        h[aten.hardtanh] = h[aten.hardtanh.default] = self._hardtanh
        h[F.hardtanh_] = self._hardtanh_inplace
        h[aten.hardtanh_] = h[aten.hardtanh_.default] = self._hardtanh_inplace
        optional = [getattr(torch, name, None) for name in ("clamp_", "clip_")]
        self._put([torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip, aten.clamp,
                   aten.clamp.default], self._clamp)
        self._put([torch.Tensor.clamp_, torch.Tensor.clip_, aten.clamp_, aten.clamp_.default]
                  + optional, self._clamp_inplace)
        self._put([torch.clamp_min, torch.Tensor.clamp_min, aten.clamp_min,
                   aten.clamp_min.default], self._clamp_min)
        self._put([torch.Tensor.clamp_min_, aten.clamp_min_, aten.clamp_min_.default,
                   getattr(torch, "clamp_min_", None)], self._clamp_min_inplace)
        h[F.threshold] = self._threshold_kw
        self._put([torch.threshold, aten.threshold, aten.threshold.default], self._threshold)
        self._put([getattr(F, "threshold_", None), getattr(torch, "threshold_", None),
                   aten.threshold_, aten.threshold_.default], self._threshold_inplace)
        h[torch.where] = self._where
        h[torch.Tensor.where] = self._where_method
        self._put([torch.maximum, torch.Tensor.maximum, torch.fmax, torch.Tensor.fmax],
                  self._maximum)
        h[torch.max] = h[torch.Tensor.max] = self._max
        self._put([torch.gt, torch.Tensor.gt, torch.greater, torch.Tensor.greater, torch.ge,
                   torch.Tensor.ge, torch.greater_equal, torch.Tensor.greater_equal],
                  self._positive_mask)
        self._put([torch.lt, torch.Tensor.lt, torch.less, torch.Tensor.less, torch.le,
                   torch.Tensor.le, torch.less_equal, torch.Tensor.less_equal],
                  self._negative_mask)
        # x * (x > 0), x.masked_fill(x < 0, 0): rectifiers written with the sign mask, which
        # keep their plain gradient (reported, not replaced).
        self._put([torch.mul, torch.Tensor.mul, torch.Tensor.mul_, torch.multiply,
                   torch.Tensor.multiply, torch.masked_fill, torch.Tensor.masked_fill,
                   torch.Tensor.masked_fill_], self._masked)

    def _put(self, funcs: Iterable[Any], handler: Callable) -> None:
        for func in funcs:
            if func is not None:
                self.handlers[func] = handler

    # -- the methods' fast path (graph_rules) -------------------------------------------------
    def plain_forward(self, model: torch.nn.Module, rules: Iterable[Any] = ()) -> bool:
        """Whether a method may run ``model``'s forward pass outside this context and
        :meth:`attach` the rule to its graph: the rule (and ``rules``, those the method switches
        to later) can be written with the plain ReLU gradient, and ``model``'s last pass inside
        a ReLU context showed a graph of ReLUs and plain operations only."""
        if (self._cell is None or not _only_configures(type(self))
                or not all(graph_rules.graph_capable(rule) for rule in (self._cell.rule, *rules))):
            return False
        return graph_rules.qualifies(model)

    def attach(self, output: Any, model: torch.nn.Module) -> bool:
        """Put the rule on the ReLU nodes of the graph of ``output``, computed outside the
        context; ``False`` (nothing attached) when the graph holds anything else — then run the
        forward pass inside the context.  Sets :attr:`counts` to the ReLUs attached."""
        nodes = (graph_rules.relu_nodes(output)
                 if self._cell is not None and isinstance(output, torch.Tensor) else None)
        if nodes is None:
            graph_rules.disqualify(model)
            return False
        self.reset_counts()
        self.count("relu", graph_rules.attach_relu_rule(nodes, self._cell))
        self._attached = True
        return True

    def learn(self, output: Any, model: torch.nn.Module) -> None:
        """After a forward pass inside this context: remember whether ``model``'s next passes
        can take the fast path (see :mod:`.graph_rules`)."""
        if self._cell is not None and isinstance(output, torch.Tensor):
            graph_rules.learn(model, output, self.counts, self.unhandled, RectifierFunction)

    def reset_counts(self) -> None:
        super().reset_counts()
        self._attached = False

    def check_path(self, output: torch.Tensor, reads: Any, where: str = "the tensor read") -> None:
        if not self._attached:  # attached to the graph: every ReLU on it has the rule
            super().check_path(output, reads, where)

    @property
    def rule(self) -> Union[ReLURule, type]:
        """The rule applied by the nodes this context creates (assignable for ReLURule rules).

        Nodes read the rule at backward time, so assigning a new :class:`ReLURule` between two
        backward passes of one forward pass (``retain_graph=True``) computes several rules'
        gradients from a single forward.
        """
        return self._cell.rule if self._cell is not None else self._function

    @rule.setter
    def rule(self, value: ReLURule) -> None:
        if self._cell is None or not isinstance(value, ReLURule):
            raise TypeError("only a ReLURule can be assigned to a context built with a ReLURule")
        self._cell.rule = value

    def switch_rule(self, rule: ReLURule) -> None:
        """Assign :attr:`rule` (the engine's way to switch rules between passes)."""
        self.rule = rule

    @property
    def applied(self) -> Optional[int]:
        """How many times backward went through a rectifier this context replaced (ever).

        Read it before and after a backward pass: no increase means no replaced rectifier lies
        between the differentiated tensors and the output, so the gradient is the plain one.
        ``None`` for a context built with a user :class:`torch.autograd.Function`.
        """
        return self._cell.applied if self._cell is not None else None

    # -- handlers ------------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor, upper: Optional[float], inplace: bool, kind: str,
               compute: Optional[Callable[[torch.Tensor], Any]] = None):
        if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
            # Nothing will be differentiated: the plain op is the same and cheaper.
            self.skip(kind)
            if isinstance(x, torch.Tensor) and x.requires_grad and not torch.is_grad_enabled():
                # A custom autograd.Function's forward (its own backward will be used, not the
                # rule), a reentrant checkpoint, or no_grad on a tensor requiring grad: named
                # in the warning on exit, as excitation backprop does.
                self.unhandle(UNRECORDED_RECTIFIER)
            with torch._C.DisableTorchFunction():
                if compute is not None:
                    return compute(x)
                if upper is None:
                    return torch.relu_(x) if inplace else torch.relu(x)
                return (torch._C._nn.hardtanh_(x, 0.0, upper) if inplace
                        else torch._C._nn.hardtanh(x, 0.0, upper))
        self.count(kind)
        if self._cell is not None:
            if compute is not None:
                return RectifierFunction.apply(x, self._cell, upper, inplace, compute)
            return RectifierFunction.apply(x, self._cell, upper, inplace)
        # A user autograd.Function: apply it to a copy so that an in-place call cannot clobber
        # what the function saved for backward.
        src = x.clone() if inplace else x
        out = self._function.apply(src)
        if upper is not None:
            out = out.clamp(max=upper)
        if inplace:
            with torch.no_grad() if not x.requires_grad else contextlib.nullcontext():
                x.copy_(out)
            return x
        return out

    def _relu(self, func, args, kwargs):
        return self._apply(first_arg(args, kwargs), None, False, "relu")

    def _relu_inplace(self, func, args, kwargs):
        return self._apply(first_arg(args, kwargs), None, True, "relu")

    def _relu_kw(self, func, args, kwargs):
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return self._apply(first_arg(args, kwargs), None, bool(inplace), "relu")

    def _relu6_kw(self, func, args, kwargs):
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return self._apply(first_arg(args, kwargs), 6.0, bool(inplace), "relu6")

    def _hardtanh_args(self, args, kwargs):
        x = first_arg(args, kwargs)
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return x, float(lo), float(hi)

    def _hardtanh(self, func, args, kwargs):
        x, lo, hi = self._hardtanh_args(args, kwargs)
        if lo != 0.0 or hi <= 0.0:
            return self._not_rectifier(func, args, kwargs, f"hardtanh({lo:g}, {hi:g})")
        inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
        return self._apply(x, hi, bool(inplace), "relu6" if hi == 6.0 else "hardtanh")

    def _hardtanh_inplace(self, func, args, kwargs):
        x, lo, hi = self._hardtanh_args(args, kwargs)
        if lo != 0.0 or hi <= 0.0:
            return self._not_rectifier(func, args, kwargs, f"hardtanh({lo:g}, {hi:g})")
        return self._apply(x, hi, True, "relu6" if hi == 6.0 else "hardtanh")

    def _not_rectifier(self, func, args, kwargs, kind: str):
        """A look-alike the rule does not cover: plain call, reported as unhandled."""
        x = first_arg(args, kwargs)
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
            self.unhandle(kind)
        return func(*args, **kwargs)

    # clamp / clip / clamp_min ---------------------------------------------------------------
    def _clamp_common(self, func, args, kwargs, inplace: bool):
        x = arg(args, kwargs, 0, ("input", "self"))
        lo = arg(args, kwargs, 1, ("min",))
        hi = arg(args, kwargs, 2, ("max",))
        if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or "out" in kwargs
                or not _is_zero(lo)):
            return func(*args, **kwargs)  # clamp(min=eps), clamp(max=...) ...: no rectifier
        compute = with_first_arg(func, args, kwargs, ("input", "self"))
        if hi is None:
            return self._apply(x, None, inplace, "clamp", compute)
        if isinstance(hi, Real) and not isinstance(hi, bool) and float(hi) > 0:
            return self._apply(x, float(hi), inplace, "clamp", compute)
        return self._not_rectifier(func, args, kwargs, "clamp")

    def _clamp(self, func, args, kwargs):
        return self._clamp_common(func, args, kwargs, False)

    def _clamp_inplace(self, func, args, kwargs):
        return self._clamp_common(func, args, kwargs, True)

    def _clamp_min_common(self, func, args, kwargs, inplace: bool):
        x = arg(args, kwargs, 0, ("input", "self"))
        lo = arg(args, kwargs, 1, ("min",))
        if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or "out" in kwargs
                or not _is_zero(lo)):
            return func(*args, **kwargs)
        return self._apply(x, None, inplace, "clamp",
                           with_first_arg(func, args, kwargs, ("input", "self")))

    def _clamp_min(self, func, args, kwargs):
        return self._clamp_min_common(func, args, kwargs, False)

    def _clamp_min_inplace(self, func, args, kwargs):
        return self._clamp_min_common(func, args, kwargs, True)

    # threshold ------------------------------------------------------------------------------
    def _threshold_common(self, func, args, kwargs, inplace: bool):
        x = arg(args, kwargs, 0, ("input", "self"))
        th = arg(args, kwargs, 1, ("threshold",))
        value = arg(args, kwargs, 2, ("value",))
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or "out" in kwargs:
            return func(*args, **kwargs)
        if not (_is_zero(th) and _is_zero(value)):
            return self._not_rectifier(func, args, kwargs, "threshold")
        return self._apply(x, None, inplace, "threshold",
                           with_first_arg(func, args, kwargs, ("input", "self")))

    def _threshold(self, func, args, kwargs):
        return self._threshold_common(func, args, kwargs, False)

    def _threshold_inplace(self, func, args, kwargs):
        return self._threshold_common(func, args, kwargs, True)

    def _threshold_kw(self, func, args, kwargs):
        inplace = bool(arg(args, kwargs, 3, ("inplace",), False))
        return self._threshold_common(func, args, kwargs, inplace)

    # where / maximum ------------------------------------------------------------------------
    def _mark(self, func, args, kwargs, sign: int):
        out = func(*args, **kwargs)
        x = arg(args, kwargs, 0, ("input", "self"))
        other = arg(args, kwargs, 1, ("other",))
        if (isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor)
                and x.is_floating_point() and _is_zero(other) and "out" not in kwargs):
            setattr(out, _MASK_ATTR, (weakref.ref(x), sign))
        return out

    def _positive_mask(self, func, args, kwargs):
        return self._mark(func, args, kwargs, +1)

    def _negative_mask(self, func, args, kwargs):
        return self._mark(func, args, kwargs, -1)

    def _where_common(self, func, args, kwargs, cond, a, b):
        if not isinstance(cond, torch.Tensor) or "out" in kwargs:
            return func(*args, **kwargs)
        mark = getattr(cond, _MASK_ATTR, None)
        source = mark[0]() if mark is not None else None
        # where(x > 0, x, 0) or where(x <= 0, 0, x): a rectifier of x.
        for kept, zero, sign in ((a, b, +1), (b, a, -1)):
            if (isinstance(kept, torch.Tensor) and kept is source and mark[1] == sign
                    and kept.is_floating_point()
                    and torch.broadcast_shapes(cond.shape, kept.shape) == kept.shape
                    and _zero_tensor_like(zero, kept)):
                def compute(t, _func=func, _args=args, _kwargs=kwargs, _kept=kept):
                    new = tuple(t if v is _kept else v for v in _args)
                    return _func(*new, **{k: (t if v is _kept else v)
                                          for k, v in _kwargs.items()})
                return self._apply(kept, None, False, "where", compute)
        if source is not None and _records(source) and (_records(a) or _records(b)):
            # where(x > 0, x, 0.1 * x) and other gates on the sign of x: not a rectifier form
            self.unhandle("where")
            return func(*args, **kwargs)
        for kept, zero in ((a, b), (b, a)):
            if (isinstance(kept, torch.Tensor) and kept.is_floating_point()
                    and torch.is_grad_enabled() and kept.requires_grad
                    and _zero_tensor_like(zero, kept) is not False):
                self.unhandle("where")  # a zero branch: perhaps a rectifier, not in our forms
                break
        return func(*args, **kwargs)

    def _masked(self, func, args, kwargs):
        a = arg(args, kwargs, 0, ("input", "self"))
        b = arg(args, kwargs, 1, ("other", "mask"))
        for mask, kept in ((b, a), (a, b)):
            mark = getattr(mask, _MASK_ATTR, None) if isinstance(mask, torch.Tensor) else None
            source = mark[0]() if mark is not None else None
            if source is not None and _records(source) and _records(kept):
                name = getattr(func, "__name__", "")
                self.unhandle("masked_fill" if name.startswith("masked_fill") else "mask multiply")
                break
        return func(*args, **kwargs)

    def _where(self, func, args, kwargs):
        if len(args) + len(kwargs) < 3:
            return func(*args, **kwargs)  # torch.where(cond): the indices of non-zeros
        cond = arg(args, kwargs, 0, ("condition",))
        a = arg(args, kwargs, 1, ("input", "self"))
        b = arg(args, kwargs, 2, ("other",))
        return self._where_common(func, args, kwargs, cond, a, b)

    def _where_method(self, func, args, kwargs):
        a = arg(args, kwargs, 0, ("self", "input"))
        cond = arg(args, kwargs, 1, ("condition",))
        b = arg(args, kwargs, 2, ("other",))
        return self._where_common(func, args, kwargs, cond, a, b)

    def _maximum(self, func, args, kwargs):
        a = arg(args, kwargs, 0, ("input", "self"))
        b = arg(args, kwargs, 1, ("other",))
        if "out" in kwargs or not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return func(*args, **kwargs)
        for kept, zero in ((a, b), (b, a)):
            if not kept.is_floating_point():
                continue
            status = _zero_tensor_like(zero, kept)
            if status:
                def compute(t, _func=func, _args=args, _kwargs=kwargs, _kept=kept):
                    new = tuple(t if v is _kept else v for v in _args)
                    return _func(*new, **{k: (t if v is _kept else v)
                                          for k, v in _kwargs.items()})
                return self._apply(kept, None, False, "maximum", compute)
            if status is None and torch.is_grad_enabled() and kept.requires_grad:
                self.unhandle("maximum")
                break
        return func(*args, **kwargs)

    def _max(self, func, args, kwargs):
        other = arg(args, kwargs, 1, ("other",))
        if isinstance(other, torch.Tensor):
            return self._maximum(func, args, kwargs)  # the binary form: max(x, y)
        return func(*args, **kwargs)  # reductions: max(x), max(x, dim)
