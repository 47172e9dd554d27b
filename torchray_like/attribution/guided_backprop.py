r"""Guided backpropagation.

Springenberg, Dosovitskiy, Brox, Riedmiller, "Striving for simplicity: the all convolutional
net", ICLR workshop 2015 (arXiv 1412.6806).  Through a ReLU, the signal passes back only where
both the forward input and the incoming signal are positive: ``p' = p · [x > 0] · [p > 0]``.
For ReLU6 the saturated side is masked too: ``p' = p⁺ · [0 < x < 6]``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .autograd_guards import first_order
from .method import BackpropMethod, Read
from .rules import ReLUContext, ReLURule, mask_into

__all__ = ["GuidedBackpropRule", "GUIDED_BACKPROP_RULE", "GuidedBackpropReLU",
           "GuidedBackpropContext", "guided_backprop", "GUIDED_BACKPROP"]


class GuidedBackpropRule(ReLURule):
    """``p' = p⁺ · [0 < x (< upper)]``: PyTorch's own ReLU backward on the clamped signal."""

    name = "guided_backprop"

    def backward(self, grad: torch.Tensor, output: torch.Tensor,
                 upper: Optional[float]) -> torch.Tensor:
        positive = grad.clamp(min=0)
        if upper is None:
            return mask_into(torch.ops.aten.threshold_backward, positive, output, 0)
        return mask_into(torch.ops.aten.hardtanh_backward, positive, output, 0.0, upper)

    def backward_relu(self, plain: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``(p · [x > 0])⁺ = p⁺ · [x > 0]``: the plain ReLU gradient, clamped."""
        return plain.clamp(min=0)


#: The guided-backprop rule (a shared, stateless instance).
GUIDED_BACKPROP_RULE = GuidedBackpropRule()


class GuidedBackpropReLU(torch.autograd.Function):
    """``relu(x)`` whose backward is the guided rule (TorchRay's autograd function).

    ``GuidedBackpropReLU.apply(x)`` can be used in a model directly, or given to
    :class:`~torchray_like.attribution.common.ReLUContext` as TorchRay code does
    (``ReLUContext(GuidedBackpropReLU)``, equivalent to :class:`GuidedBackpropContext` but
    through a generic path that copies the input of in-place calls).  Backward:
    ``p' = p⁺ · [x > 0]``, the same kernels as :data:`GUIDED_BACKPROP_RULE`.
    """

    rule = GUIDED_BACKPROP_RULE

    @staticmethod
    def forward(ctx, input):
        output = input.clamp(min=0)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    @first_order("guided backprop")  # create_graph: first order only; vmap refused
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        return GUIDED_BACKPROP_RULE.backward(grad_output, output, None)


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


_DOC = """Guided-backpropagation saliency map (Springenberg et al. 2014).

    The arguments are those of :func:`~torchray_like.attribution.common.saliency`, with
    :class:`GuidedBackpropContext` as the rule context; ``saliency_layer`` ``""`` (or ``None``)
    reads the input, a resize tuple is in TorchRay's order ``(W, H)`` (see
    :func:`~torchray_like.attribution.common.resize_saliency`).  Returns ``(N, 1, *spatial)``
    maps, or ``(map, SaliencyDebug)`` with ``debug=True``.  Raises :class:`ValueError` when
    the model calls no ReLU.
    """

#: The description of the method: the guided rule, read at ``saliency_layer``.
GUIDED_BACKPROP = BackpropMethod(
    name="guided_backprop", module=__name__, context_builder=GuidedBackpropContext,
    fixed=frozenset({"context_builder"}),
    reads=(Read(GUIDED_BACKPROP_RULE, GuidedBackpropContext),), doc=_DOC)

guided_backprop = GUIDED_BACKPROP.function()
