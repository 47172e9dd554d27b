r"""DeConvNet.

Zeiler & Fergus, "Visualizing and understanding convolutional networks", ECCV 2014
(arXiv 1311.2901).  Through a ReLU, pass back the positive part of the incoming signal whatever
the forward input was: ``p' = max(p, 0)``.  ReLU6 is ``min(relu(x), 6)``: its rectifying part
gets the DeConvNet rule and the upper clamp, which is no rectifier, keeps its gradient, so
``p' = p⁺ · [x < 6]``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .driver import saliency
from .rules import ReLUContext, ReLURule

__all__ = ["DeConvNetRule", "DECONVNET_RULE", "DeConvNetContext", "deconvnet"]


class DeConvNetRule(ReLURule):
    """``p' = p⁺`` (ReLU) or ``p⁺ · [x < upper]`` (ReLU6)."""

    name = "deconvnet"

    def backward(self, grad: torch.Tensor, output: torch.Tensor,
                 upper: Optional[float]) -> torch.Tensor:
        positive = grad.clamp(min=0)
        if upper is None:
            return positive
        return torch.ops.aten.hardtanh_backward.grad_input(
            positive, output, float("-inf"), upper, grad_input=positive)


#: The DeConvNet rule (a shared, stateless instance).
DECONVNET_RULE = DeConvNetRule()


class DeConvNetContext(ReLUContext):
    """Inside this context, every ReLU / ReLU6 the model calls backpropagates the DeConvNet rule.

    Thread-local and removed on exit (see :class:`~torchray_like.attribution.common.ReLUContext`).
    """

    def __init__(self) -> None:
        super().__init__(DECONVNET_RULE)


def deconvnet(model: torch.nn.Module, input: torch.Tensor, target: Any, **kwargs: Any) -> Any:
    """DeConvNet saliency map (Zeiler & Fergus 2014).

    Same arguments as :func:`~torchray_like.attribution.common.saliency`, with the DeConvNet
    rule as context.  Returns ``(N, 1, *spatial)`` maps.  Raises :class:`ValueError` when the
    model calls no ReLU.
    """
    return saliency(model, input, target, context_builder=DeConvNetContext, **kwargs)
