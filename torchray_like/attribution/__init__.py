"""Attribution methods, one module each, as in TorchRay::

    from torchray_like.attribution.grad_cam import grad_cam
    from torchray_like.attribution.guided_backprop import GuidedBackpropContext
    from torchray_like.attribution.common import Probe, gradient_to_saliency

A method's function lives in the module of the same name, and ``torchray_like.attribution.<name>``
is always that *module* (a function and a module never share a dotted name).  For a flat
namespace of functions use the top-level package (``import torchray_like as trl;
trl.grad_cam(model, x, c)``); for a method chosen by name, :data:`METHODS`.

Modules of the core concepts: :mod:`.context` (rule contexts), :mod:`.rules` (rectifier rules),
:mod:`.probe`, :mod:`.targets`, :mod:`.maps`, :mod:`.state`, :mod:`.driver`, and
:mod:`.common` (TorchRay's import path, re-exporting the names users need).  Several
backpropagation methods from one forward pass: :func:`.explain.explain`.
"""

from __future__ import annotations

from . import (  # noqa: F401  (the submodules, as package attributes)  # noqa: F401  (issue 19's methods)  # noqa: F401  (issue 20: LRP)  # noqa: F401  (issue 19: the CAM family)
    ablation_cam,
    attention,
    attention_rollout,
    call_args,
    common,
    context,
    deconvnet,
    driver,
    eigen_cam,
    engine,
    excitation_backprop,
    excitation_contrast,
    excitation_handlers,
    excitation_rules,
    explain,
    extremal_perturbation,
    grad_cam,
    grad_cam_plus_plus,
    gradient,
    gradient_x_input,
    guided_backprop,
    guided_grad_cam,
    hires_cam,
    inputs,
    integrated_gradients,
    layer_cam,
    layer_choice,
    linear_approx,
    lrp,
    lrp_composites,
    lrp_rules,
    maps,
    method,
    modules,
    occlusion,
    probe,
    rise,
    rules,
    score_cam,
    smooth_grad,
    state,
    targets,
    transformer_lrp,
    xgrad_cam,
)
from .registry import METHODS, MethodRegistry

__all__ = ["METHODS", "MethodRegistry"]
