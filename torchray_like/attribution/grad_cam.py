r"""Grad-CAM.

Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: visual explanations from deep
networks via gradient-based localization", ICCV 2017 (arXiv 1610.02391).  For a layer with
activations ``A`` of shape ``(N, K, *spatial)`` and the class score ``y_c``:

* the weight of channel ``k`` is the gradient averaged over every spatial position,
  ``α_k = mean_{u ∈ spatial} ∂y_c / ∂A_k[u]`` (all of ``L``, ``H × W`` or ``T × H × W``);
* the map is ``ReLU(Σ_k α_k A_k)``, at the layer's resolution ``(N, 1, *spatial)`` unless
  resized.

Backpropagation stops at the layer: a call costs one forward pass and the backward pass from the
score down to the layer's output, nothing below it.

When ``saliency_layer`` is omitted the layer is chosen by :func:`find_saliency_layer`: the last
module, in the order modules finish their forward, whose output has a spatial layout
``(N, C, *spatial)`` with more than one position — on a transformer, the last layer whose patch
tokens the output depends on, read on the patch grid (see there for the exact rule, and
:mod:`~torchray_like.attribution.tokens` for how tokens become a map).
"""

from __future__ import annotations

import torch

from .layer_choice import LayerType, find_saliency_layer, resolve_layer
from .maps import check_layer_map, saliency_gradient
from .method import BackpropMethod, Read

# What to do about a layer without spatial dimensions.
_HINT = "choose a convolutional layer (or omit saliency_layer to pick one automatically)"

__all__ = ["grad_cam", "GRAD_CAM", "grad_cam_map", "gradient_to_grad_cam_saliency",
           "find_saliency_layer", "resolve_layer", "LayerType"]


# ---------------------------------------------------------------------------------------------
# The map
# ---------------------------------------------------------------------------------------------


def grad_cam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM map from a layer's activation and the gradient of the score with respect to it.

    Selvaraju et al. 2017, eq. 1–2: ``α_k = mean_u ∂y/∂A_k[u]`` over every spatial dimension,
    ``map = ReLU(Σ_k α_k A_k)``.

    Parameters
    ----------
    activation : torch.Tensor
        ``(N, K, *spatial)`` with 1 to 3 (or more) spatial dimensions.
    gradient : torch.Tensor
        The gradient of the explained score with respect to ``activation``, same shape.

    Returns
    -------
    torch.Tensor
        ``(N, 1, *spatial)``, non-negative, dtype and device of ``activation``.
    """
    check_layer_map(activation, gradient, "grad_cam_map", "Grad-CAM needs a layer output",
                    _HINT)
    spatial = tuple(range(2, activation.dim()))
    alpha = gradient.mean(dim=spatial)  # (N, K)
    # Σ_k α_k A_k as one batched matrix product: no (N, K, *spatial) temporary.
    n, k = activation.shape[:2]
    flat = activation.reshape(n, k, -1)
    weighted = torch.bmm(alpha.unsqueeze(1).to(flat.dtype), flat)  # (N, 1, positions)
    return weighted.view((n, 1) + tuple(activation.shape[2:])).clamp_(min=0)


def gradient_to_grad_cam_saliency(x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM map of a layer's activation ``x`` whose ``.grad`` holds the gradient.

    TorchRay's name for :func:`grad_cam_map` applied to ``(x, x.grad)``: the channel weights
    are the gradient averaged over space and the map is ``ReLU(Σ_k α_k x_k)``, shape
    ``(N, 1, *spatial)``.  Use it after a manual backward with a :class:`~.probe.Probe`::

        probe = Probe(get_module(model, "features.29"), target="output")
        y = model(x)
        y[0, c].backward()
        saliency = gradient_to_grad_cam_saliency(probe.data[0])
    """
    return grad_cam_map(x.detach(), saliency_gradient(x, "gradient_to_grad_cam_saliency"))


_DOC = """Grad-CAM saliency map (Selvaraju et al. 2017).

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode, its ``training`` flags restored; parameters untouched).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The class to explain: one int for all samples, one per sample, a seed-gradient tensor
        shaped like the output, or a callable ``output -> (N,)`` scores.
    saliency_layer : str or torch.nn.Module, optional
        The layer whose output is weighted (dotted name or module).  ``None`` (default): chosen
        by :func:`find_saliency_layer`.  ``""`` means the input itself (the
        :func:`~torchray_like.attribution.common.saliency` convention).
    resize : bool, int or tuple
        ``False``: the map stays at the layer's resolution; ``True``: the input's spatial size;
        or an explicit size (see :func:`~torchray_like.attribution.common.resize_saliency`).
    resize_mode : str
        Interpolation for ``resize``; the linear family adapts to the rank (bilinear for images,
        trilinear for video, linear for 1-D).
    smooth : float
        If positive, Gaussian smoothing with ``sigma = smooth * max(map size)``.
    context_builder : callable, optional
        A rule context to run the forward pass in (default: none, the plain gradient).
    gradient_to_saliency : callable
        Turns the layer's activation, given as a tensor whose ``.grad`` holds the gradient, into
        ``(N, 1, *spatial)`` maps; default :func:`gradient_to_grad_cam_saliency`.
    get_backward_gradient : callable
        ``(output, target) -> seed`` gradient.
    debug : bool
        Also return a :class:`~torchray_like.attribution.common.SaliencyDebug` (the layer's
        activation and gradient, and TorchRay's debug probes).

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *layer_spatial)`` non-negative maps (or resized), detached, on the input's
        device, in the input's dtype.
    """

#: The description of the method: the plain gradient at ``saliency_layer`` (default: the
#: automatic layer), weighted Grad-CAM's way.
GRAD_CAM = BackpropMethod(
    name="grad_cam", reads=(Read(),), module=__name__, saliency_layer=None, auto_layer=True,
    gradient_to_saliency=gradient_to_grad_cam_saliency, layer_map=grad_cam_map,
    layer_hint=_HINT,
    doc=_DOC)

grad_cam = GRAD_CAM.function()
