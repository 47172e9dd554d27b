r"""Gradient saliency.

Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks: visualising image
classification models and saliency maps", 2013 (arXiv 1312.6034): the map is the maximum over
channels of ``|∂y_c/∂x|``.
"""

from __future__ import annotations

from .method import BackpropMethod, Read

__all__ = ["gradient", "GRADIENT"]

_DOC = """Gradient saliency map (Simonyan et al. 2013).

    The arguments are those of :func:`~torchray_like.attribution.common.saliency`, with the
    plain gradient (no rule context) as default; ``saliency_layer`` ``""`` (or ``None``) reads
    the input, a resize tuple is in TorchRay's order ``(W, H)`` (see
    :func:`~torchray_like.attribution.common.resize_saliency`).  Returns ``(N, 1, *spatial)``
    maps, or ``(map, SaliencyDebug)`` with ``debug=True``.
    """

#: The description of the method (the plain gradient, read at ``saliency_layer``).
GRADIENT = BackpropMethod(name="gradient", reads=(Read(),), module=__name__, doc=_DOC)

gradient = GRADIENT.function()
