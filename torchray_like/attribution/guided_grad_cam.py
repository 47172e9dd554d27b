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

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn

from .common import (GRADIENT_RULE, Probe, SaliencyDebug, SizeType, TargetType,
                     _check_context_used, _detach, _single_call, backward_seed, check_input,
                     check_model, get_backward_gradient, get_module, gradient_to_saliency,
                     model_state_guard, resize_saliency, smooth_saliency)
from .grad_cam import LayerType, _label, _resolve_layer, grad_cam_map
from .guided_backprop import GUIDED_BACKPROP_RULE, GuidedBackpropContext

__all__ = ["guided_grad_cam", "GuidedGradCamDebug"]


@dataclass
class GuidedGradCamDebug(SaliencyDebug):
    """What :func:`guided_grad_cam` returns beside the map when ``debug=True``.

    ``activation`` and ``gradient`` are the layer's activation and its *plain* gradient (the
    Grad-CAM part); ``cam`` is the Grad-CAM map at the layer's resolution; ``guided_gradient``
    is the guided-backprop gradient at the input ``(N, C, *spatial)``.
    """

    cam: Optional[torch.Tensor] = None
    guided_gradient: Optional[torch.Tensor] = None


def guided_grad_cam(model: nn.Module, input: torch.Tensor, target: TargetType,
                    saliency_layer: LayerType = None, resize: SizeType = False,
                    resize_mode: str = "bilinear", smooth: float = 0,
                    gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] = (
                        gradient_to_saliency),
                    get_backward_gradient: Callable = get_backward_gradient,
                    debug: bool = False
                    ) -> Union[torch.Tensor, Tuple[torch.Tensor, GuidedGradCamDebug]]:
    """Guided Grad-CAM saliency map (Selvaraju et al. 2017).

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
    check_model(model)
    check_input(input)
    name = _resolve_layer(model, input, saliency_layer)
    layer = None if isinstance(name, str) and name == "" else get_module(model, name)
    if not (isinstance(smooth, (int, float)) and smooth >= 0 and math.isfinite(smooth)):
        raise ValueError(f"smooth must be a non-negative number, got {smooth!r}")
    if target is None:
        backward_seed(None, None, 0)  # raises the explanation before any work
    batch = input.shape[0]

    # MOVE-TO-COMMON: a saliency() driver that reads several tensors from one forward pass, each
    # under its own rule, would make this function a few lines.
    probe = None
    with model_state_guard(model), torch.enable_grad():
        x = input.detach().requires_grad_(True)
        context = GuidedBackpropContext()
        context.warn_if_unused = False
        try:
            if layer is not None:
                probe = Probe(layer, "output")
            with context:
                output = model(x)
            _check_context_used(context, model)
            read = x if layer is None else _single_call(probe, name)
            if read.dim() != x.dim():
                raise ValueError(
                    f"guided_grad_cam: saliency_layer {_label(name)} outputs shape "
                    f"{tuple(read.shape)} but the input has shape {tuple(x.shape)}; the Grad-CAM "
                    "map is upsampled to the input, so the layer needs as many spatial "
                    "dimensions as the input")
            tensor, seed = backward_seed(output, target, batch, get_backward_gradient)
            if not tensor.requires_grad:
                raise ValueError(
                    "the model output does not depend on the input through autograd (does the "
                    "model detach its activations or run under torch.no_grad()?)")
            # Pass 1, plain rule, score -> layer only: the Grad-CAM weights.
            context.rule = GRADIENT_RULE
            (layer_grad,) = torch.autograd.grad(tensor, read, seed, retain_graph=True,
                                                allow_unused=True)
            if layer_grad is None:
                where = "input" if layer is None else f"layer {_label(name)}"
                raise ValueError(f"the target scores do not depend on the {where}")
            # Pass 2, guided rule, score -> input, through the same graph.
            context.rule = GUIDED_BACKPROP_RULE
            (input_grad,) = torch.autograd.grad(tensor, x, seed, allow_unused=True)
            if input_grad is None:
                raise ValueError("the target scores do not depend on the input")
            activation = read.detach()
        finally:
            if probe is not None:
                probe.remove()
        cam = grad_cam_map(activation, layer_grad)
        cam_up = resize_saliency(input, cam, True, resize_mode)
        # Per the paper: the guided image (per channel) times the CAM, then flattened.
        x.grad = input_grad * cam_up
        try:
            smap = gradient_to_saliency(x).detach()
        finally:
            x.grad = None
        smap = resize_saliency(input, smap, resize, resize_mode)
        if smooth:
            smap = smooth_saliency(smap, smooth * max(smap.shape[2:]))
    if debug:
        return smap, GuidedGradCamDebug(_detach(output), activation, layer_grad.detach(),
                                        dict(context.counts), cam=cam,
                                        guided_gradient=input_grad.detach())
    return smap
