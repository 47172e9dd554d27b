r"""Guided Grad-CAM.

Selvaraju et al., "Grad-CAM: visual explanations from deep networks via gradient-based
localization", ICCV 2017 (arXiv 1610.02391), section 3.1: the Grad-CAM map, upsampled to the
input resolution by bilinear interpolation, multiplies the guided-backpropagation visualisation
(Springenberg et al. 2014, arXiv 1412.6806) point-wise.

Choices, per the paper:

* **Grad-CAM's weights come from the plain gradient.**  Inside a guided-backprop context the
  ReLUs *above* the layer would rectify the signal and change ``∂y/∂A``; the paper combines two
  independent visualisations, so the Grad-CAM part uses the plain gradient.
* **Multiply, then flatten.**  The paper multiplies the guided-backprop *image* (one gradient per
  colour channel) by the CAM, then displays it; for a ``(N, 1, *spatial)`` map we flatten that
  product over channels with ``gradient_to_saliency`` (default: max over channels of ``|·|``).
  Since the CAM is non-negative and the default flattening is positively homogeneous per
  position, this equals flattening first and multiplying after; the order only matters for a
  custom ``gradient_to_saliency``.

Cost: **one** forward pass, run inside a guided-backprop context with a probe on the layer, then
two backward passes of that one graph — the plain rule from the score to the layer (the rule is a
value held by the graph's ReLU nodes, switched between the passes), then the guided rule from the
score to the input.  Two separate calls (``grad_cam`` + ``guided_backprop``) would cost one more
forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .driver import SaliencyDebug
from .grad_cam import grad_cam_map
from .guided_backprop import GUIDED_BACKPROP_RULE, GuidedBackpropContext
from .maps import gradient_to_saliency, resize_saliency
from .method import NO_CONTEXT_ARGUMENT, BackpropMethod, Read, Reading
from .probe import layer_label
from .rules import GRADIENT_RULE

__all__ = ["guided_grad_cam", "GUIDED_GRAD_CAM", "guided_grad_cam_map", "GuidedGradCamDebug"]


@dataclass
class GuidedGradCamDebug(SaliencyDebug):
    """What :func:`guided_grad_cam` returns beside the map when ``debug=True``.

    ``activation`` and ``gradient`` are the layer's activation and its *plain* gradient (the
    Grad-CAM part); ``cam`` is the Grad-CAM map at the layer's resolution; ``guided_gradient``
    is the guided-backprop gradient at the input ``(N, C, *spatial)``.
    """

    cam: Optional[torch.Tensor] = None
    guided_gradient: Optional[torch.Tensor] = None


def guided_grad_cam_map(input: torch.Tensor, x: torch.Tensor, read: torch.Tensor,
                        layer_grad: torch.Tensor, input_grad: torch.Tensor, layer: object,
                        resize_mode: str = "bilinear",
                        flatten: Callable[[torch.Tensor], torch.Tensor] = gradient_to_saliency
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Guided Grad-CAM from its two gradients (Selvaraju et al. 2017): the guided-backprop
    gradient of the input ``x``, per channel, times the Grad-CAM map of ``read`` upsampled to
    the input, then flattened.  Returns ``(map, cam)``.  The one home of the combination, for
    :func:`guided_grad_cam` and :func:`~torchray_like.attribution.explain.explain`."""
    check_guided_grad_cam_layer(read, layer, x)
    cam = grad_cam_map(read.detach(), layer_grad)
    cam_up = resize_saliency(input, cam, True, resize_mode)
    x.grad = input_grad * cam_up
    try:
        return flatten(x), cam
    finally:
        x.grad = None


def check_guided_grad_cam_layer(read: torch.Tensor, layer: object, x: torch.Tensor) -> None:
    """The Grad-CAM map is upsampled to the input: the layer needs the input's rank."""
    if read.dim() != x.dim():
        raise ValueError(
            f"guided_grad_cam: saliency_layer {layer_label(layer)} outputs shape "
            f"{tuple(read.shape)} but the input has shape {tuple(x.shape)}; the Grad-CAM map is "
            "upsampled to the input, so the layer needs as many spatial dimensions as the input")


def guided_grad_cam_reading(method: BackpropMethod, reading: Reading
                            ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The map from the two readings: the layer's plain gradient and the input's guided one."""
    (read, _), (layer_grad, input_grad) = reading.tensors, reading.grads
    assert layer_grad is not None and input_grad is not None  # both reads use their gradient
    smap, cam = guided_grad_cam_map(
        reading.input, reading.x, read, layer_grad, input_grad, reading.layer,
        reading.options.get("resize_mode", "bilinear"),
        reading.options.get("gradient_to_saliency", gradient_to_saliency))
    return smap, {"cam": cam, "guided_gradient": input_grad.detach()}


_DOC = """Guided Grad-CAM saliency map (Selvaraju et al. 2017).

    ``map = flatten(guided_gradient ⊙ upsample(grad_cam))`` where ``guided_gradient`` is the
    guided-backpropagation gradient at the input (per channel), ``grad_cam`` the Grad-CAM map of
    ``saliency_layer`` (from the plain gradient) upsampled to the input size with
    ``resize_mode``, and ``flatten`` is ``gradient_to_saliency``.

    Parameters
    ----------
    model : torch.nn.Module
        The network; it must use ReLU (or ReLU6) for the guided part, else :class:`ValueError`.
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The class to explain (see :func:`~torchray_like.attribution.common.saliency`).
    saliency_layer : str or torch.nn.Module, optional
        The Grad-CAM layer; ``None`` (default) chooses it with
        :func:`~torchray_like.attribution.grad_cam.find_saliency_layer`; ``""`` is the input.
        Its output must have as many spatial dimensions as the input.
    resize : bool, int or tuple
        The map is at the input's size; a size here resizes it further.
    resize_mode : str
        Interpolation used to upsample the Grad-CAM map to the input (bilinear in the paper;
        adapted to the rank) and for ``resize``.
    smooth : float
        If positive, Gaussian smoothing with ``sigma = smooth * max(map size)``.
    gradient_to_saliency : callable
        Flattens the ``(N, C, *spatial)`` product (given as a tensor's ``.grad``) into
        ``(N, 1, *spatial)``; default: max over channels of the absolute value.
    get_backward_gradient : callable
        ``(output, target) -> seed`` gradient.
    debug : bool
        Also return a :class:`GuidedGradCamDebug`.

    Returns
    -------
    torch.Tensor or (torch.Tensor, GuidedGradCamDebug)
        ``(N, 1, *input_spatial)`` non-negative maps (with the default flattening), detached, on
        the input's device.
    """

#: The description of the method: one forward pass in a guided-backprop context, the plain rule
#: down to the Grad-CAM layer (no rule check: it is the plain gradient by design), the guided
#: rule down to the input.
GUIDED_GRAD_CAM = BackpropMethod(
    name="guided_grad_cam", module=__name__, saliency_layer=None, auto_layer=True,
    reads=(Read(GRADIENT_RULE, GuidedBackpropContext, check_rules=False),
           Read(GUIDED_BACKPROP_RULE, GuidedBackpropContext, at_layer=False)),
    make_map=guided_grad_cam_reading, check_read=check_guided_grad_cam_layer,
    context_builder=NO_CONTEXT_ARGUMENT, debug_type=GuidedGradCamDebug, doc=_DOC)

guided_grad_cam = GUIDED_GRAD_CAM.function()
