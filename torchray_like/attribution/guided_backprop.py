r"""Guided backpropagation.

Springenberg, Dosovitskiy, Brox, Riedmiller, "Striving for simplicity: the all convolutional
net", ICLR workshop 2015 (arXiv 1412.6806).  Through a ReLU, the signal passes back only where
both the forward input and the incoming signal are positive: ``p' = p · [x > 0] · [p > 0]``.
For ReLU6 the saturated side is masked too: ``p' = p⁺ · [0 < x < 6]``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .driver import saliency
from .rules import ReLUContext, ReLURule

__all__ = ["GuidedBackpropRule", "GUIDED_BACKPROP_RULE", "GuidedBackpropContext",
           "guided_backprop"]


class GuidedBackpropRule(ReLURule):
    """``p' = p⁺ · [0 < x (< upper)]``: PyTorch's own ReLU backward on the clamped signal."""

    name = "guided_backprop"

    def backward(self, grad: torch.Tensor, output: torch.Tensor,
                 upper: Optional[float]) -> torch.Tensor:
        positive = grad.clamp(min=0)
        # Write the masked result into the fresh clamped tensor: one allocation, two passes.
        if upper is None:
            return torch.ops.aten.threshold_backward.grad_input(
                positive, output, 0, grad_input=positive)
        return torch.ops.aten.hardtanh_backward.grad_input(
            positive, output, 0.0, upper, grad_input=positive)


#: The guided-backprop rule (a shared, stateless instance).
GUIDED_BACKPROP_RULE = GuidedBackpropRule()


class GuidedBackpropContext(ReLUContext):
    """Inside this context, every ReLU / ReLU6 the model calls backpropagates the guided rule.

    Thread-local and removed on exit (see :class:`~torchray_like.attribution.common.ReLUContext`).

    Examples
    --------
    >>> x.requires_grad_(True)                             # doctest: +SKIP
    >>> with GuidedBackpropContext():
    ...     y = model(x)
    ...     y[0, category_id].backward()
    >>> saliency = gradient_to_saliency(x)
    """

    def __init__(self) -> None:
        super().__init__(GUIDED_BACKPROP_RULE)


def guided_backprop(model: torch.nn.Module, input: torch.Tensor, target: Any,
                    **kwargs: Any) -> Any:
    """Guided-backpropagation saliency map (Springenberg et al. 2014).

    Same arguments as :func:`~torchray_like.attribution.common.saliency` (``saliency_layer``,
    ``resize``, ``resize_mode``, ``smooth``, ``gradient_to_saliency``,
    ``get_backward_gradient``, ``debug``), with the guided rule as context.  Returns
    ``(N, 1, *spatial)`` maps.  Raises :class:`ValueError` when the model calls no ReLU.
    """
    return saliency(model, input, target, context_builder=GuidedBackpropContext, **kwargs)
