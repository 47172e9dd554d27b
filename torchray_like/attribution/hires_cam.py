r"""HiResCAM.

Draelos, Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional
neural networks", 2020 (arXiv 2011.08891).  At a layer with activations ``A`` of shape
``(N, K, *spatial)`` and ``g = ∂y_c / ∂A``, the gradient is not averaged over space: the map is
the channel sum of the element-wise product,

.. math::

    M = \operatorname{ReLU}\Big(\sum_k g_k(u)\, A_k(u)\Big),

i.e. the layer's gradient × input summed over channels.  For a network whose head is global
average pooling then one linear layer it equals CAM (and Grad-CAM); elsewhere it differs from
Grad-CAM where the gradient varies over space.  The paper's equation is the signed sum; like
Grad-CAM's, the map keeps its positive part (the evidence *for* the class), as pytorch-grad-cam
does — the signed sum is ``(debug.activation * debug.gradient).sum(1)`` from ``debug=True``.
Equal to pytorch-grad-cam 1.5.7's ``HiResCAM`` after the same normalisation
(``tests/test_cam_family.py``; TorchCAM 0.5 has no HiResCAM).
"""

from __future__ import annotations

import torch

from .grad_cam_plus_plus import check_cam_reading, gradient_cam_method
from .maps import saliency_gradient

__all__ = ["hires_cam", "HIRES_CAM", "hires_cam_map", "gradient_to_hires_cam_saliency"]


def hires_cam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """HiResCAM map ``ReLU(Σ_k g_k A_k)``, ``(N, 1, *spatial)``, from a layer's activation and
    the gradient of the score (same shape ``(N, K, *spatial)``)."""
    check_cam_reading("HiResCAM", activation, gradient)
    summed = (activation * gradient.to(activation.dtype)).sum(dim=1, keepdim=True)
    return summed.clamp_(min=0)


def gradient_to_hires_cam_saliency(x: torch.Tensor) -> torch.Tensor:
    """HiResCAM map of a layer's activation ``x`` whose ``.grad`` holds the gradient."""
    return hires_cam_map(x.detach(), saliency_gradient(x, "gradient_to_hires_cam_saliency"))


#: The description: Grad-CAM's reading, multiplied element-wise.
HIRES_CAM = gradient_cam_method("hires_cam", __name__, "HiResCAM saliency map (Draelos & Carin "
                                "2020).", hires_cam_map, gradient_to_hires_cam_saliency)

hires_cam = HIRES_CAM.function()
