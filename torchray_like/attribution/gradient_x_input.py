r"""Gradient × input.

Shrikumar, Greenside, Shcherbina, Kundaje, "Not just a black box: learning important features
through propagating activation differences", 2016 (arXiv 1605.01713): the attribution of input
element ``x_j`` is ``x_j · ∂y/∂x_j``, and the map sums it over the channels,
``map[u] = Σ_c x_c[u] · ∂y/∂x_c[u]``, signed.

It is the common name of :func:`~.linear_approx.linear_approx` read at the input (the same map
function, :func:`~.linear_approx.linear_approx_map`); being a described method, it shares
:func:`~torchray_like.attribution.explain.explain`'s forward pass with the other backprop
methods.  With ``saliency_layer`` a layer it is the linear approximation at that layer.
"""

from __future__ import annotations

from .linear_approx import gradient_to_linear_approx_saliency, linear_approx_map
from .method import BackpropMethod, Read

__all__ = ["gradient_x_input", "GRADIENT_X_INPUT"]

#: The description of the method: the plain gradient at the input, weighted by the input.
GRADIENT_X_INPUT = BackpropMethod(
    name="gradient_x_input", reads=(Read(),), module=__name__, saliency_layer="",
    gradient_to_saliency=gradient_to_linear_approx_saliency, layer_map=linear_approx_map,
    layer_hint="the map needs (N, C, *spatial): choose a convolutional layer, or the input "
               "(saliency_layer='')",
    doc="""Gradient × input saliency map: ``Σ_c x_c · ∂y/∂x_c``, signed.

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode, its ``training`` flags restored; parameters untouched).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The class to explain (see :func:`~torchray_like.attribution.common.saliency`).
    saliency_layer : str or torch.nn.Module, optional
        ``""`` or ``None`` (default): the input.  A layer gives the linear approximation at
        that layer (:func:`~torchray_like.attribution.linear_approx.linear_approx`).
    resize, resize_mode, smooth, context_builder, get_backward_gradient, debug
        As in :func:`~torchray_like.attribution.common.saliency` (``smooth`` blurs the map; it
        is not SmoothGrad, which is :func:`~torchray_like.attribution.smooth_grad.smooth_grad`).
    gradient_to_saliency : callable
        Turns the input, given as a tensor whose ``.grad`` holds the gradient, into
        ``(N, 1, *spatial)`` maps; default
        :func:`~torchray_like.attribution.linear_approx.gradient_to_linear_approx_saliency`.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *spatial)`` signed maps (or resized), detached, on the input's device.
    """)

gradient_x_input = GRADIENT_X_INPUT.function()
