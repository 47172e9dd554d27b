r"""Rectifier rules: how a ReLU (or ReLU6) passes a signal back, and the context applying them.

The modified backward of each replaced call is an :class:`torch.autograd.Function` whose
forward is exactly the plain operation; the rule it applies in backward is a value the node holds
from its forward pass, so a graph built inside the context can be differentiated after the block
has ended, and the rule can be switched between two backward passes of one forward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from .context import RuleContext, first_tensor_arg

__all__ = ["ReLURule", "GRADIENT_RULE", "ReLUContext"]


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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: The plain-gradient rule (a rule context using it changes nothing but counts ReLU calls).
GRADIENT_RULE = ReLURule()


class RectifierFunction(torch.autograd.Function):
    """``relu(x)`` or ``clamp(x, 0, upper)`` whose backward applies ``cell.rule``.

    The forward computes exactly what PyTorch computes (in place when the caller asked for it, so
    code relying on the side effect keeps working); ``cell`` is read at backward time, which lets
    one forward serve several rules.
    """

    @staticmethod
    def forward(ctx, x, cell, upper, inplace):  # type: ignore[override]
        with torch._C.DisableTorchFunction():
            if upper is None:
                out = torch.relu_(x) if inplace else torch.relu(x)
            else:
                out = (torch._C._nn.hardtanh_(x, 0.0, upper) if inplace
                       else torch._C._nn.hardtanh(x, 0.0, upper))
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        ctx.cell = cell
        ctx.upper = upper
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            return ctx.cell.rule.backward(grad, out, ctx.upper), None, None, None


class RuleCell:
    """A mutable holder for the rule the nodes created by one context apply."""

    __slots__ = ("rule",)

    def __init__(self, rule: Any) -> None:
        self.rule = rule


class ReLUContext(RuleContext):
    """Replace the backward of every rectifier the model calls.

    Caught calls: ``nn.ReLU`` (with and without ``inplace=True``), ``F.relu``, ``F.relu_``,
    ``torch.relu``, ``torch.relu_``, ``Tensor.relu``, ``Tensor.relu_``, and the bounded rectifier
    ReLU6: ``nn.ReLU6``, ``F.relu6`` and ``F.hardtanh(x, 0, b)`` (what ``nn.ReLU6`` calls).  The
    forward values are exactly PyTorch's; in-place calls stay in place.

    Parameters
    ----------
    function_class : ReLURule or type of torch.autograd.Function
        The rule.  A :class:`ReLURule` instance (``GUIDED_BACKPROP_RULE``, ``DECONVNET_RULE``, or
        your own subclass) gets the fast path: one or two fused kernels in backward.  For
        TorchRay compatibility an :class:`torch.autograd.Function` subclass whose ``apply(x)``
        computes ``relu(x)`` is accepted too; its backward is yours (for ReLU6 its output is then
        clamped at the upper bound, whose plain gradient masks the saturated side).

    Examples
    --------
    >>> with ReLUContext(GUIDED_BACKPROP_RULE):        # doctest: +SKIP
    ...     y = model(x)
    ...     y[0, c].backward()
    """

    replaces = "ReLU"
    requirement = ("a model that uses ReLU (nn.ReLU, F.relu, torch.relu, Tensor.relu, "
                   "ReLU6 ...)")
    report_other_activations = True

    def __init__(self, function_class: Union[ReLURule, type]) -> None:
        super().__init__()
        if isinstance(function_class, ReLURule):
            self._cell = RuleCell(function_class)
            self._function = None
        elif isinstance(function_class, type) and issubclass(function_class,
                                                             torch.autograd.Function):
            self._cell = None
            self._function = function_class
        else:
            raise TypeError(
                "ReLUContext: function_class must be a ReLURule instance or a subclass of "
                f"torch.autograd.Function, got {function_class!r}")
        h = self.handlers
        h[F.relu] = self._relu_kw
        h[torch.relu] = h[torch.Tensor.relu] = self._relu
        h[F.relu_] = h[torch.relu_] = h[torch.Tensor.relu_] = self._relu_inplace
        h[F.relu6] = self._relu6_kw
        h[F.hardtanh] = self._hardtanh
        h[F.hardtanh_] = self._hardtanh_inplace

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

    # -- handlers ------------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor, upper: Optional[float], inplace: bool, kind: str):
        self.count(kind)
        if self._cell is not None:
            if not (torch.is_grad_enabled() and x.requires_grad):
                # Nothing will be differentiated: the plain op is the same and cheaper.
                with torch._C.DisableTorchFunction():
                    if upper is None:
                        return torch.relu_(x) if inplace else torch.relu(x)
                    return (torch._C._nn.hardtanh_(x, 0.0, upper) if inplace
                            else torch._C._nn.hardtanh(x, 0.0, upper))
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
        return self._apply(first_tensor_arg(args, kwargs), None, False, "relu")

    def _relu_inplace(self, func, args, kwargs):
        return self._apply(first_tensor_arg(args, kwargs), None, True, "relu")

    def _relu_kw(self, func, args, kwargs):
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return self._apply(first_tensor_arg(args, kwargs), None, bool(inplace), "relu")

    def _relu6_kw(self, func, args, kwargs):
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return self._apply(first_tensor_arg(args, kwargs), 6.0, bool(inplace), "relu6")

    def _hardtanh_args(self, args, kwargs):
        x = first_tensor_arg(args, kwargs)
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return x, float(lo), float(hi)

    def _hardtanh(self, func, args, kwargs):
        x, lo, hi = self._hardtanh_args(args, kwargs)
        if lo != 0.0 or hi <= 0.0:
            return func(*args, **kwargs)  # not a rectifier
        inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
        return self._apply(x, hi, bool(inplace), "relu6" if hi == 6.0 else "hardtanh")

    def _hardtanh_inplace(self, func, args, kwargs):
        x, lo, hi = self._hardtanh_args(args, kwargs)
        if lo != 0.0 or hi <= 0.0:
            return func(*args, **kwargs)
        return self._apply(x, hi, True, "relu6" if hi == 6.0 else "hardtanh")
