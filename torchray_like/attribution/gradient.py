r"""Gradient saliency.

Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks: visualising image
classification models and saliency maps", 2013 (arXiv 1312.6034): the map is the maximum over
channels of ``|∂y_c/∂x|``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn as nn

from .context import NullContext
from .driver import SaliencyDebug, saliency
from .maps import SizeType, gradient_to_saliency
from .targets import TargetType, get_backward_gradient

__all__ = ["gradient"]


def gradient(model: nn.Module, input: torch.Tensor, target: TargetType,
             saliency_layer: Union[str, nn.Module, None] = "", resize: SizeType = False,
             resize_mode: str = "bilinear", smooth: float = 0,
             context_builder: Optional[Callable[[], Any]] = NullContext,
             gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] = gradient_to_saliency,
             get_backward_gradient: Callable = get_backward_gradient,
             debug: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """Gradient saliency map (Simonyan et al. 2013).

    The arguments are those of :func:`~torchray_like.attribution.common.saliency`, with the
    plain gradient (no rule context) as default; ``saliency_layer`` ``""`` (or ``None``) reads
    the input, a resize tuple is in TorchRay's order ``(W, H)`` (see
    :func:`~torchray_like.attribution.common.resize_saliency`).  Returns ``(N, 1, *spatial)``
    maps, or ``(map, SaliencyDebug)`` with ``debug=True``.
    """
    return saliency(model, input, target, saliency_layer=saliency_layer, resize=resize,
                    resize_mode=resize_mode, smooth=smooth, context_builder=context_builder,
                    gradient_to_saliency=gradient_to_saliency,
                    get_backward_gradient=get_backward_gradient, debug=debug)
