r"""Grad-CAM++, and what the gradient-weighted CAMs of this package share.

Chattopadhay, Sarkar, Howlader, Balasubramanian, "Grad-CAM++: generalized gradient-based visual
explanations for deep convolutional networks", WACV 2018 (arXiv 1710.11063).

The paper explains ``Y_c = exp(S_c)``, the exponential of the class score.  With
``g = ∂S_c / ∂A_k(u)`` at a layer with activations ``A`` of shape ``(N, K, *spatial)``, the
derivatives of ``Y_c`` are ``exp(S_c) g``, ``exp(S_c) g²`` and ``exp(S_c) g³`` (the higher
derivatives of a piecewise-linear network taken as powers of ``g``, as in the paper), so the
pixel weights of its closed form are

.. math::

    \alpha_k(u) = \frac{g_k(u)^2}{2 g_k(u)^2 + \big(\sum_v A_k(v)\big)\, g_k(u)^3},

the channel weights ``w_k = Σ_u α_k(u) ReLU(g_k(u))`` and the map ``ReLU(Σ_k w_k A_k)``.  Where
``g > 0`` the product ``α ReLU(g)`` is ``g / (2 + g Σ_v A_k(v))``, which is how it is computed
(no cube of a small gradient underflows); elsewhere it is 0.

Differences from the paper and from the libraries, all measured (``tests/test_cam_family.py``):

* The paper's weights carry the per-sample factor ``exp(S_c)`` (``ReLU(∂Y_c/∂A)``); it scales
  each sample's map without changing it, and overflows float32 for scores above 88 (underflows
  to an all-zero map below -103), so it is left out, as both libraries do.
* pytorch-grad-cam 1.5.7 adds ``1e-6`` to the denominator of ``α``: with small gradients (a
  random-weight ResNet-18: ``|g| ≈ 1e-3``, ``g² ≈ 1e-6``) that changes its maps by up to 2 %
  of their range.  We follow the paper; with gradients large enough for ``1e-6`` not to matter
  the maps agree to 1e-5 after the same normalisation and resize.
* TorchCAM 0.5's ``GradCAMpp`` gives the maps of the weights ``Σ_u g² ReLU(g)`` — without the
  paper's denominator.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .maps import saliency_gradient
from .method import BackpropMethod, Read

__all__ = ["grad_cam_plus_plus", "GRAD_CAM_PLUS_PLUS", "grad_cam_plus_plus_map",
           "gradient_to_grad_cam_plus_plus_saliency", "check_cam_reading", "channel_sum",
           "gradient_cam_method", "gradient_cam_doc"]


# ---------------------------------------------------------------------------------------------
# Shared by the gradient-weighted CAMs (Grad-CAM++, Layer-CAM, XGrad-CAM, HiResCAM, Eigen-CAM)
# ---------------------------------------------------------------------------------------------


def check_cam_reading(name: str, activation: torch.Tensor, gradient: torch.Tensor) -> None:
    """A :class:`ValueError` starting with ``name`` unless ``activation`` is
    ``(N, K, *spatial)`` and ``gradient`` has its shape."""
    if not isinstance(activation, torch.Tensor) or not isinstance(gradient, torch.Tensor):
        raise TypeError(f"{name}: activation and gradient must be tensors, got "
                        f"{type(activation).__name__} and {type(gradient).__name__}")
    if activation.dim() < 3:
        raise ValueError(
            f"{name} needs a layer output with spatial dimensions, shape (N, C, *spatial); got "
            f"shape {tuple(activation.shape)}: choose a convolutional layer (or omit "
            "saliency_layer to pick one automatically)")
    if gradient.shape != activation.shape:
        raise ValueError(
            f"{name}: gradient shape {tuple(gradient.shape)} differs from the activation shape "
            f"{tuple(activation.shape)}")


def channel_sum(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """``ReLU(Σ_k w_k A_k)`` for channel weights ``(N, K)``: ``(N, 1, *spatial)``.

    One batched matrix product, so no ``(N, K, *spatial)`` temporary is made.
    """
    n, k = activation.shape[:2]
    flat = activation.reshape(n, k, -1)
    weighted = torch.bmm(weights.unsqueeze(1).to(flat.dtype), flat)
    return weighted.view((n, 1) + tuple(activation.shape[2:])).clamp_(min=0)


def gradient_cam_doc(title: str, flattener: str) -> str:
    """The docstring of a gradient-weighted CAM's function (Grad-CAM's parameters)."""
    return f"""{title}

    Computed from the activation of ``saliency_layer`` and the gradient of the target's score
    with respect to it (one forward pass, and the backward pass down to the layer only); see
    the module docstring for the formula.

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode, its ``training`` flags restored; parameters untouched).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The class to explain: one int for all samples, one per sample, a seed-gradient tensor
        shaped like the output, or a callable ``output -> (N,)`` scores.  A single-logit head
        takes 1 (the logit) or 0 (its negation).
    saliency_layer : str or torch.nn.Module, optional
        The layer whose output is read (dotted name or module).  ``None`` (default): chosen by
        :func:`~torchray_like.attribution.layer_choice.find_saliency_layer`, as for Grad-CAM.
        ``""`` means the input itself.
    resize : bool, int or tuple
        ``False``: the map stays at the layer's resolution; ``True``: the input's spatial size;
        or an explicit size (see :func:`~torchray_like.attribution.maps.resize_saliency`).
    resize_mode : str
        Interpolation for ``resize``; the linear family adapts to the rank.
    smooth : float
        If positive, Gaussian smoothing with ``sigma = smooth * max(map size)``.
    context_builder : callable, optional
        A rule context to run the forward pass in (default: none, the plain gradient).
    gradient_to_saliency : callable
        Turns the layer's activation, given as a tensor whose ``.grad`` holds the gradient, into
        ``(N, 1, *spatial)`` maps; default :func:`{flattener}`.
    get_backward_gradient : callable
        ``(output, target) -> seed`` gradient.
    debug : bool
        Also return a :class:`~torchray_like.attribution.common.SaliencyDebug` (the layer's
        activation and gradient).

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *layer_spatial)`` non-negative maps (or resized), detached, on the input's
        device, in the input's dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`~torchray_like.attribution.grad_cam.grad_cam` (the same engine and checks),
        and where the method's formula is undefined for the layer read (see the module
        docstring).
    """


def gradient_cam_method(name: str, module: str, title: str,
                        layer_map: Callable[[torch.Tensor, Any], torch.Tensor],
                        flattener: Callable[[torch.Tensor], torch.Tensor],
                        gradient: bool = True) -> BackpropMethod:
    """The description of a CAM computed from a layer's activation and plain gradient: it reads
    what Grad-CAM reads, so :func:`~torchray_like.attribution.explain.explain` computes it
    from Grad-CAM's forward and backward pass.  ``gradient=False``: the map uses the
    activation only (``layer_map`` gets ``None`` for the gradient), and a call of its own runs
    no backward pass."""
    return BackpropMethod(
        name=name, reads=(Read(gradient=gradient),), module=module, saliency_layer=None,
        auto_layer=True,
        gradient_to_saliency=flattener, layer_map=layer_map,
        layer_hint=f"{title.split(' ')[0]} needs (N, C, *spatial): choose a convolutional layer "
                   "(or omit saliency_layer to pick one automatically)",
        doc=gradient_cam_doc(title, flattener.__name__))


# ---------------------------------------------------------------------------------------------
# Grad-CAM++
# ---------------------------------------------------------------------------------------------


def grad_cam_plus_plus_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ map from a layer's activation and the gradient of the score.

    ``w_k = Σ_u α_k(u) ReLU(g_k(u))`` with the paper's closed form
    ``α = g² / (2 g² + (Σ_v A_k(v)) g³)``, map ``ReLU(Σ_k w_k A_k)``.

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
        Where ``α`` is infinite at a positive gradient (``2 + g Σ_v A_k(v) = 0``: a channel
        whose activations sum to a negative number, i.e. a layer before its ReLU).
    """
    check_cam_reading("Grad-CAM++", activation, gradient)
    spatial = tuple(range(2, activation.dim()))
    total = activation.sum(dim=spatial, keepdim=True)
    positive = gradient > 0
    # α ReLU(g) = g³ / (2 g² + S g³) = g / (2 + S g) where g > 0 (and 0 elsewhere).
    denominator = torch.where(positive, 2 + total * gradient, torch.ones_like(gradient))
    if bool((denominator == 0).any()):
        n, k = (denominator == 0).nonzero()[0, :2].tolist()
        raise ValueError(
            f"Grad-CAM++: the weight alpha is infinite for sample {n}, channel {k}: the "
            "denominator 2 g² + (Σ A) g³ is zero because that channel's activations sum to "
            "-2 / g (negative); Grad-CAM++ assumes rectified activations: read a layer after "
            "its ReLU")
    terms = torch.where(positive, gradient / denominator, torch.zeros_like(gradient))
    return channel_sum(terms.sum(dim=spatial), activation)


def gradient_to_grad_cam_plus_plus_saliency(x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ map of a layer's activation ``x`` whose ``.grad`` holds the gradient
    (:func:`grad_cam_plus_plus_map` of ``(x, x.grad)``), for use after a manual backward with a
    :class:`~torchray_like.attribution.probe.Probe`."""
    return grad_cam_plus_plus_map(
        x.detach(), saliency_gradient(x, "gradient_to_grad_cam_plus_plus_saliency"))


#: The description: Grad-CAM's reading, weighted Grad-CAM++'s way.
GRAD_CAM_PLUS_PLUS = gradient_cam_method(
    "grad_cam_plus_plus", __name__,
    "Grad-CAM++ saliency map (Chattopadhay et al. 2018).", grad_cam_plus_plus_map,
    gradient_to_grad_cam_plus_plus_saliency)

grad_cam_plus_plus = GRAD_CAM_PLUS_PLUS.function()
