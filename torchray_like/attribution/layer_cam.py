r"""Layer-CAM.

Jiang, Zhang, Hou, Cheng, Wei, "LayerCAM: exploring hierarchical class activation maps for
localization", IEEE Transactions on Image Processing 30, 2021.  At a layer with activations
``A`` of shape ``(N, K, *spatial)`` and ``g = ∂y_c / ∂A``, every position keeps its own weight,
the positive part of its gradient:

.. math::

    M = \operatorname{ReLU}\Big(\sum_k \operatorname{ReLU}(g_k(u))\, A_k(u)\Big).

The paper fuses the maps of several layers after scaling shallow ones with ``tanh``; that fusion
is not part of a single layer's map (call the function once per layer).  Equal to
pytorch-grad-cam 1.5.7's ``LayerCAM`` and TorchCAM 0.5's ``LayerCAM`` after the same
normalisation (``tests/test_cam_family.py``).
"""

from __future__ import annotations

import torch

from .grad_cam_plus_plus import check_cam_reading, gradient_cam_method
from .maps import saliency_gradient

__all__ = ["layer_cam", "LAYER_CAM", "layer_cam_map", "gradient_to_layer_cam_saliency"]


def layer_cam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Layer-CAM map ``ReLU(Σ_k ReLU(g_k) A_k)``, ``(N, 1, *spatial)``, from a layer's
    activation and the gradient of the score (same shape ``(N, K, *spatial)``)."""
    check_cam_reading("Layer-CAM", activation, gradient)
    weighted = gradient.clamp(min=0).to(activation.dtype).mul_(activation)
    return weighted.sum(dim=1, keepdim=True).clamp_(min=0)


def gradient_to_layer_cam_saliency(x: torch.Tensor) -> torch.Tensor:
    """Layer-CAM map of a layer's activation ``x`` whose ``.grad`` holds the gradient."""
    return layer_cam_map(x.detach(), saliency_gradient(x, "gradient_to_layer_cam_saliency"))


#: The description: Grad-CAM's reading, weighted position by position.
LAYER_CAM = gradient_cam_method("layer_cam", __name__, "Layer-CAM saliency map (Jiang et al. "
                                "2021).", layer_cam_map, gradient_to_layer_cam_saliency)

layer_cam = LAYER_CAM.function()
