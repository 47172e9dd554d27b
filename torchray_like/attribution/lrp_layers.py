r"""The autograd side of :class:`~.lrp.LRPContext`: what one replaced call keeps for backward
and the backward that applies its rule.

:class:`LRPFunction` is a convolution, transposed convolution or linear layer whose forward is
the plain call and whose backward applies the layer's LRP rule in gradient form (Bach et al.
2015; Montavon et al., "Layer-wise relevance propagation: an overview", 2019): ``g_x`` with
``x ⊙ g_x = R_x`` from ``R_z = z ⊙ g_z``, in closed form where :mod:`.lrp_closed` covers the
rule.  :class:`BatchNormFoldFunction` is a batch norm folded into the layer before it (its
backward passes the gradient unchanged; the layer's rule uses the merged weight and bias).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, cast

import torch
import torch.nn as nn

from .autograd_guards import first_order
from .lrp_closed import closed_gradient, folded_gradient
from .lrp_rules import AffineCall, ModifiedWeightError, Rule, compute_dtype

__all__ = ["LayerNode", "LRPFunction", "BatchNormFoldFunction", "batch_norm_args",
           "affine_args", "records", "bn_scale_shift"]


class LayerNode:
    """What one replaced call keeps for backward: the operation, its rule, the context's
    counters, and a batch norm folded into it."""

    __slots__ = ("call", "rule", "owner", "version", "fold", "fold_grad", "module", "first",
                 "rectified", "__weakref__")

    def __init__(self, call: AffineCall, rule: Rule, owner: Any, version: int,
                 module: Optional[nn.Module] = None, first: bool = False) -> None:
        self.call, self.rule, self.owner, self.version = call, rule, owner, version
        # What chose the rule, so that another composite can choose again (LRPContext.rule).
        self.module, self.first = module, first
        self.fold: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.fold_grad: Optional[torch.Tensor] = None
        # The input is a ReLU's output (x >= 0, no gradient through its zeros): lrp_closed.
        self.rectified = False

    def check_fold(self, g: torch.Tensor) -> None:
        """Check that the gradient ``g`` came through the folded batch norm only."""
        if self.fold_grad is None or g.data_ptr() != self.fold_grad.data_ptr():
            raise ValueError(
                "LRPContext: a layer's output feeds its batch norm and also another operation; "
                "the batch norm cannot be folded into the layer for LRP. Read relevance above "
                "the batch norm, or restructure the model so that only the batch norm reads "
                "the layer's output")

    def folded(self) -> AffineCall:
        """The operation the rule sees: with its batch norm folded (the merged weight and
        bias; :meth:`check_fold` first)."""
        return self.call.folded(*cast(Tuple[torch.Tensor, torch.Tensor], self.fold))

    def output(self, z: torch.Tensor) -> torch.Tensor:
        """The output of :meth:`folded` from the layer's own output ``z``: ``scale ⊙ z +
        shift`` per output channel."""
        scale, shift = cast(Tuple[torch.Tensor, torch.Tensor], self.fold)
        if self.call.kind != "linear":
            shape = [1, -1] + [1] * (z.dim() - 2)
            scale, shift = scale.view(shape), shift.view(shape)
        return torch.addcmul(shift, z, scale)


class LRPFunction(torch.autograd.Function):
    """A linear operation whose forward is the plain call and whose backward applies its LRP
    rule in gradient form: ``g_x`` with ``x ⊙ g_x = R_x``, from ``R_z = z ⊙ g_z``."""

    @staticmethod
    def forward(ctx, x, node):
        ctx.save_for_backward(x)
        ctx.node = node
        call = node.call
        with torch._C.DisableTorchFunction():
            out = call.func(x, call.weight, call.bias, *call.rest, **call.kwargs)
        # Backward needs the output (R = z ⊙ g); a copy, since the next ReLU may work in place.
        ctx.z = out.clone()
        return out

    @staticmethod
    @first_order("LRP")  # create_graph: exact, but a second derivative raises SecondOrderError
    def backward(ctx, g):
        return _lrp_backward(ctx, g)  # (first_order runs it without a graph)


def _lrp_backward(ctx: Any, g: torch.Tensor) -> Tuple[torch.Tensor, None]:
    (x,) = ctx.saved_tensors
    node: LayerNode = ctx.node
    if node.call.weight._version != node.version:
        raise ModifiedWeightError("LRPContext: a layer's weight was modified in place between "
                                  "the forward pass and backward; run the forward pass again")
    node.owner.applied += 1
    with torch._C.DisableTorchFunction():
        return _rule_gradient(x, node, g, ctx.z), None


def _rule_gradient(x: torch.Tensor, node: LayerNode, g: torch.Tensor,
                   z: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16) or g.dtype != x.dtype:
        return _rule_gradient_cast(x, node, g, z)
    # Grad mode is off here (backward without create_graph, or once_differentiable).
    rule = node.rule
    if node.fold is None:
        call, zc = node.call, z
        r = zc * g
    else:
        node.check_fold(g)
        zc = node.output(z)
        r = zc * g
        if node.rectified:
            fast = folded_gradient(rule, x, node.call,
                                   *cast(Tuple[torch.Tensor, torch.Tensor], node.fold), zc, r)
            if fast is not None:
                return fast
        call = node.folded()
    if rule.proportional:
        fast = closed_gradient(rule, x, call, zc, r, node.rectified)
        return rule.gradient(x, call, r) if fast is None else fast
    return _input_free(x, node, rule.relevance(x, call, r))


def _rule_gradient_cast(x: torch.Tensor, node: LayerNode, g: torch.Tensor,
                        z: torch.Tensor) -> torch.Tensor:
    """:func:`_rule_gradient` where the rule computes in another dtype (float32 for 16-bit
    inputs) or the gradient's dtype differs."""
    dtype = compute_dtype(x.dtype)
    xc, gc = x.to(dtype), g.to(dtype)
    if node.fold is not None:
        node.check_fold(g)
    call = (node.call if node.fold is None else node.folded()).cast(dtype)
    # The forward pass's output where it is in the compute dtype, else computed again.
    if z.dtype != dtype:
        zc = call.output(xc)
    else:
        zc = z if node.fold is None else node.output(z)
    r = zc * gc
    if node.rule.proportional:
        fast = closed_gradient(node.rule, xc, call, zc, r, node.rectified)
        if fast is None:
            fast = node.rule.gradient(xc, call, r)
        return fast.to(x.dtype)
    return _input_free(xc, node, node.rule.relevance(xc, call, r)).to(x.dtype)


def _input_free(xc: torch.Tensor, node: LayerNode, relevance: torch.Tensor) -> torch.Tensor:
    """``R / x`` of a first-layer rule, reporting the relevance of inputs equal to zero."""
    zero = xc == 0
    if not bool(zero.any()):  # the usual case (an image has no exact zeros): nothing lost
        return relevance / xc
    lost = relevance.masked_fill(~zero, 0)
    if bool(lost.any()):
        node.owner.report_lost(node.rule, int((lost != 0).sum()),
                               float(lost.abs().sum() / relevance.abs().sum().clamp(min=1e-30)))
    return torch.where(zero, 0.0, relevance / torch.where(zero, 1.0, xc))


class BatchNormFoldFunction(torch.autograd.Function):
    """A batch norm folded into the layer before it: forward is the plain call (what
    ``F.batch_norm`` calls with running statistics), backward passes the gradient unchanged (the
    layer's rule uses the merged weights)."""

    @staticmethod
    def forward(ctx, x, node, weight, bias, mean, var, momentum, eps):
        ctx.node = node
        with torch._C.DisableTorchFunction():
            return torch.batch_norm(x, weight, bias, mean, var, False, momentum, eps,
                                    torch._C._get_cudnn_enabled())

    @staticmethod
    def backward(ctx, g):
        # The identity: differentiable as it is (no once_differentiable needed).
        ctx.node.fold_grad = g
        return (g,) + (None,) * 7


_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")
_BN_DEFAULTS = (None, None, None, None, None, False, 0.1, 1e-5)


def batch_norm_args(args: tuple, kwargs: dict) -> tuple:
    """The arguments of an ``F.batch_norm`` call in its signature's order."""
    if len(args) == 3 and len(kwargs) == 5 and "weight" in kwargs:
        # How F.batch_norm hands itself to the mode (handle_torch_function): no parsing.
        return args + (kwargs["weight"], kwargs["bias"], kwargs["training"],
                       kwargs["momentum"], kwargs["eps"])
    values = dict(zip(_BN_NAMES, _BN_DEFAULTS))
    values.update(zip(_BN_NAMES, args))
    values.update(kwargs)
    return tuple(values[n] for n in _BN_NAMES)


def affine_args(args: tuple, kwargs: dict) -> Tuple[Any, Any, Any, tuple, dict]:
    """``(x, weight, bias, rest, other kwargs)`` of a conv / linear call."""
    names = ("input", "weight", "bias")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    rest_kwargs = {k: v for k, v in kwargs.items() if k not in names}
    return values[0], values[1], values[2], tuple(args[3:]), rest_kwargs


def records(x: Any) -> bool:
    """:func:`~.context.records_gradient` of one argument: a tensor autograd records a call
    on, that is not a parameter."""
    return (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()
            and not (x.grad_fn is None and isinstance(x, nn.Parameter)))


def bn_scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], eps: float, dtype: torch.dtype
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)`` with ``batch_norm(y) = a ⊙ y + c`` per channel (running statistics)."""
    dtype = compute_dtype(dtype)
    if any(t is not None and t.requires_grad for t in (mean, var, weight, bias)):
        with torch.no_grad():  # parameters that are not frozen: no graph recorded
            return bn_scale_shift(mean.detach(), var.detach(),
                                   None if weight is None else weight.detach(),
                                   None if bias is None else bias.detach(), eps, dtype)
    # Few small operations (this runs once per batch norm and call), and a conversion only
    # where the dtype differs.
    var = var if var.dtype == dtype else var.to(dtype)
    mean = mean if mean.dtype == dtype else mean.to(dtype)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale.mul_(weight if weight.dtype == dtype else weight.to(dtype))
    if bias is None:
        shift = mean * -scale
    else:
        shift = torch.addcmul(bias if bias.dtype == dtype else bias.to(dtype), mean, scale,
                              value=-1)
    return scale, shift
