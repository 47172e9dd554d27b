r"""Linear approximation.

The first-order Taylor term of the class score ``y`` in a layer's activations ``A``:
``map[u] = Σ_k A_k[u] · ∂y/∂A_k[u]``, signed and not clamped (at the input this is
"gradient × input" summed over the colour channels).  If the network is affine after the layer,
``y = ⟨W, A⟩ + b``, the map sums exactly to ``y − b``: the score minus its value at zero
activation.  Compared with Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391), which averages
the gradient over space before weighting and rectifies the result, the weighting is per position
and the sign is kept.  Backpropagation stops at the layer.
"""

from __future__ import annotations

import torch

from .maps import check_layer_map, saliency_gradient
from .method import BackpropMethod, Read

# What to do about a layer without spatial dimensions.
_HINT = "choose a convolutional layer, or the input (saliency_layer=None)"

__all__ = ["linear_approx", "LINEAR_APPROX", "linear_approx_map",
           "gradient_to_linear_approx_saliency"]


def linear_approx_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``Σ_k A_k · ∂y/∂A_k`` per position: ``(N, K, *spatial)`` → ``(N, 1, *spatial)``, signed."""
    check_layer_map(activation, gradient, "linear_approx_map",
                    "linear approximation needs a tensor", _HINT)
    return (activation * gradient).sum(dim=1, keepdim=True)


def gradient_to_linear_approx_saliency(x: torch.Tensor) -> torch.Tensor:
    """Linear-approximation map of an activation ``x`` whose ``.grad`` holds the gradient.

    TorchRay's name for :func:`linear_approx_map` applied to ``(x, x.grad)``:
    ``Σ_k x_k · ∂y/∂x_k`` per position, signed, shape ``(N, 1, *spatial)``.
    """
    grad = saliency_gradient(x, "gradient_to_linear_approx_saliency")
    return linear_approx_map(x.detach(), grad)


_DOC = """Linear-approximation saliency map: ``Σ_k A_k · ∂y/∂A_k`` at a layer, signed.

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode, its ``training`` flags restored; parameters untouched).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The class to explain (see :func:`~torchray_like.attribution.common.saliency`).
    saliency_layer : str or torch.nn.Module, optional
        The layer whose output ``A`` is used.  ``None`` or ``""`` (default) means the input, as
        for every method built on :func:`~torchray_like.attribution.common.saliency` — the map
        is then gradient × input summed over channels.  For the layer Grad-CAM would choose,
        pass ``find_saliency_layer(model, input)``.
    resize, resize_mode, smooth, context_builder, get_backward_gradient, debug
        As in :func:`~torchray_like.attribution.common.saliency` (a ``resize`` tuple is in
        TorchRay's order, ``(W, H)``; see
        :func:`~torchray_like.attribution.common.resize_saliency`).
    gradient_to_saliency : callable
        Turns the activation, given as a tensor whose ``.grad`` holds the gradient, into
        ``(N, 1, *spatial)`` maps; default :func:`gradient_to_linear_approx_saliency`.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *spatial)`` signed maps (or resized), detached, on the input's device.
    """

#: The description of the method: the plain gradient at ``saliency_layer`` (default: the
#: input), weighted by the activation.
LINEAR_APPROX = BackpropMethod(
    name="linear_approx", reads=(Read(),), module=__name__, saliency_layer=None,
    gradient_to_saliency=gradient_to_linear_approx_saliency, layer_map=linear_approx_map,
    layer_hint=_HINT,
    doc=_DOC)

linear_approx = LINEAR_APPROX.function()
