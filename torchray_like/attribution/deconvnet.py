r"""DeConvNet.

Zeiler & Fergus, "Visualizing and understanding convolutional networks", ECCV 2014
(arXiv 1311.2901).  Through a ReLU, pass back the positive part of the incoming signal whatever
the forward input was: ``p' = max(p, 0)``.  ReLU6 is ``min(relu(x), 6)``: its rectifying part
gets the DeConvNet rule and the upper clamp, which is no rectifier, keeps its gradient, so
``p' = p⁺ · [x < 6]``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .autograd_guards import first_order
from .method import BackpropMethod, Read
from .rules import ReLUContext, ReLURule, mask_into

__all__ = ["DeConvNetRule", "DECONVNET_RULE", "DeConvNetReLU", "DeConvNetContext", "deconvnet",
           "DECONVNET"]


class DeConvNetRule(ReLURule):
    """``p' = p⁺`` (ReLU) or ``p⁺ · [x < upper]`` (ReLU6)."""

    name = "deconvnet"

    def backward(self, grad: torch.Tensor, output: torch.Tensor,
                 upper: Optional[float]) -> torch.Tensor:
        positive = grad.clamp(min=0)
        if upper is None:
            return positive
        return mask_into(torch.ops.aten.hardtanh_backward, positive, output, float("-inf"),
                         upper)

    def backward_relu(self, plain: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``p⁺``: the incoming signal, clamped (the forward mask is not used)."""
        return grad.clamp(min=0)


#: The DeConvNet rule (a shared, stateless instance).
DECONVNET_RULE = DeConvNetRule()


class DeConvNetReLU(torch.autograd.Function):
    """``relu(x)`` whose backward is the DeConvNet rule (TorchRay's autograd function).

    ``DeConvNetReLU.apply(x)`` can be used in a model directly, or given to
    :class:`~torchray_like.attribution.common.ReLUContext` as TorchRay code does
    (``ReLUContext(DeConvNetReLU)``, equivalent to :class:`DeConvNetContext`).  Backward:
    ``p' = p⁺`` whatever the forward input.
    """

    rule = DECONVNET_RULE

    @staticmethod
    def forward(ctx, input):
        return input.clamp(min=0)

    @staticmethod
    @first_order("DeConvNet")  # create_graph: first order only; vmap refused
    def backward(ctx, grad_output):
        return grad_output.clamp(min=0)


class DeConvNetContext(ReLUContext):
    """Inside this context, every ReLU / ReLU6 the model calls backpropagates the DeConvNet rule.

    Thread-local and removed on exit (see :class:`~torchray_like.attribution.common.ReLUContext`).
    """

    def __init__(self) -> None:
        super().__init__(DECONVNET_RULE)


_DOC = """DeConvNet saliency map (Zeiler & Fergus 2014).

    The arguments are those of :func:`~torchray_like.attribution.common.saliency`, with
    :class:`DeConvNetContext` as the rule context; ``saliency_layer`` ``""`` (or ``None``)
    reads the input, a resize tuple is in TorchRay's order ``(W, H)`` (see
    :func:`~torchray_like.attribution.common.resize_saliency`).  Returns ``(N, 1, *spatial)``
    maps, or ``(map, SaliencyDebug)`` with ``debug=True``.  Raises :class:`ValueError` when
    the model calls no ReLU.
    """

#: The description of the method: the DeConvNet rule, read at ``saliency_layer``.
DECONVNET = BackpropMethod(
    name="deconvnet", module=__name__, context_builder=DeConvNetContext,
    fixed=frozenset({"context_builder"}),
    reads=(Read(DECONVNET_RULE, DeConvNetContext),), doc=_DOC)

deconvnet = DECONVNET.function()
