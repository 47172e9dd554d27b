r"""Gradient saliency.

Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks: visualising image
classification models and saliency maps", 2013 (arXiv 1312.6034): the map is the maximum over
channels of ``|∂y_c/∂x|``.
"""

from __future__ import annotations

from typing import Any

import torch

from .driver import saliency

__all__ = ["gradient"]


def gradient(model: torch.nn.Module, input: torch.Tensor, target: Any, **kwargs: Any) -> Any:
    """Gradient saliency map (Simonyan et al. 2013).

    Same arguments as :func:`~torchray_like.attribution.common.saliency` (``saliency_layer``,
    ``resize``, ``resize_mode``, ``smooth``, ``context_builder``, ``gradient_to_saliency``,
    ``get_backward_gradient``, ``debug``).  Returns ``(N, 1, *spatial)`` maps.
    """
    return saliency(model, input, target, **kwargs)
