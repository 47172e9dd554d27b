r"""XGrad-CAM.

Fu, Hu, Dong, Guo, Gao, Li, "Axiom-based Grad-CAM: towards accurate visualization and
explanation of CNNs", BMVC 2020 (arXiv 2008.02312).  At a layer with activations ``A`` of shape
``(N, K, *spatial)`` and ``g = ∂y_c / ∂A``, the gradient is averaged over space weighted by the
activation itself (the weights that satisfy the paper's sensitivity and conservation axioms):

.. math::

    w_k = \sum_u \frac{A_k(u)}{\sum_v A_k(v)}\, g_k(u), \qquad
    M = \operatorname{ReLU}\Big(\sum_k w_k A_k\Big).

A channel that is zero everywhere adds nothing to the map, whatever its weight: its weight is
0.  A channel whose activations sum to exactly zero without all being zero (possible only
before a ReLU) has no weight: that is a :class:`ValueError` rather than an infinite map.
pytorch-grad-cam 1.5.7 and TorchCAM 0.5 divide by ``Σ A + ε`` instead; the maps agree after the
same normalisation (``tests/test_cam_family.py``).
"""

from __future__ import annotations

import torch

from .grad_cam_plus_plus import channel_sum, check_cam_reading, gradient_cam_method
from .maps import saliency_gradient

__all__ = ["xgrad_cam", "XGRAD_CAM", "xgrad_cam_map", "gradient_to_xgrad_cam_saliency"]


def xgrad_cam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM map from a layer's activation and the gradient of the score.

    Parameters
    ----------
    activation, gradient : torch.Tensor
        ``(N, K, *spatial)``, the same shape.

    Returns
    -------
    torch.Tensor
        ``(N, 1, *spatial)``, non-negative.

    Raises
    ------
    ValueError
        When a channel's activations sum to zero without all being zero.
    """
    check_cam_reading("XGrad-CAM", activation, gradient)
    n, k = activation.shape[:2]
    flat = activation.reshape(n, k, -1)
    total = flat.sum(dim=2)
    empty = total == 0
    if bool(empty.any()):
        mixed = empty & (flat != 0).any(dim=2)
        if bool(mixed.any()):
            i, c = mixed.nonzero()[0].tolist()
            raise ValueError(
                f"XGrad-CAM: channel {c} of sample {i} has activations that sum to zero without "
                "all being zero, so its weight Σ A·g / Σ A is undefined; XGrad-CAM assumes "
                "rectified activations: read a layer after its ReLU")
    numerator = (flat * gradient.reshape(n, k, -1).to(flat.dtype)).sum(dim=2)
    weights = torch.where(empty, torch.zeros_like(total),
                          numerator / torch.where(empty, torch.ones_like(total), total))
    return channel_sum(weights, activation)


def gradient_to_xgrad_cam_saliency(x: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM map of a layer's activation ``x`` whose ``.grad`` holds the gradient."""
    return xgrad_cam_map(x.detach(), saliency_gradient(x, "gradient_to_xgrad_cam_saliency"))


#: The description: Grad-CAM's reading, with activation-weighted gradient averages.
XGRAD_CAM = gradient_cam_method("xgrad_cam", __name__, "XGrad-CAM saliency map (Fu et al. "
                                "2020).", xgrad_cam_map, gradient_to_xgrad_cam_saliency)

xgrad_cam = XGRAD_CAM.function()
