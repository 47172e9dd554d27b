r"""TorchRay's ``torchray.attribution.common``: the names research code imports from there.

A façade: each name lives in the module of its concept —

=====================  ===========================================================================
:mod:`.context`        :class:`RuleContext` (thread-local backward-rule swaps),
                       :class:`NullContext`, :class:`Patch`, the warnings
                       (:class:`TorchRayDifferenceWarning` ...)
:mod:`.rules`          rectifier rules (:class:`ReLURule`) and :class:`ReLUContext`
:mod:`.probe`          :func:`get_module`, :class:`Probe`, :func:`attach_debug_probes`
:mod:`.targets`        :func:`get_backward_gradient`, :func:`get_pointing_gradient`, binary heads
:mod:`.maps`           :func:`gradient_to_saliency`, :func:`resize_saliency` (a ``resize`` tuple
                       is ``(W, H)`` as in TorchRay; :class:`Shape` gives torch order),
                       :func:`smooth_saliency`
:mod:`.state`          :func:`model_state_guard`; input and model checks in :mod:`.inputs`,
                       :mod:`.modules`
:mod:`.engine`         :func:`saliency`, the driver of every backpropagation method
=====================  ===========================================================================

Where this library deliberately differs from TorchRay, see ``docs/torchray.rst`` ("Coming from
TorchRay").
"""

from __future__ import annotations

from .context import (
                      NoRuleAppliedWarning,
                      NullContext,
                      Patch,
                      RuleContext,
                      TorchRayDifferenceWarning,
                      UnhandledActivationWarning,
)
from .driver import SaliencyDebug
from .engine import saliency
from .maps import (
    DegenerateMapWarning,
    ResizeOrderWarning,
    Shape,
    gradient_to_saliency,
    resize_saliency,
    smooth_saliency,
)
from .probe import Probe, attach_debug_probes, get_module
from .rules import GRADIENT_RULE, ReLUContext, ReLURule
from .state import model_state_guard
from .targets import get_backward_gradient, get_pointing_gradient

__all__ = [
    # TorchRay's names
    "Probe", "Patch", "NullContext", "ReLUContext", "attach_debug_probes", "get_module",
    "get_backward_gradient", "get_pointing_gradient", "gradient_to_saliency", "resize_saliency",
    "saliency",
    # ours
    "RuleContext", "ReLURule", "GRADIENT_RULE", "NoRuleAppliedWarning",
    "UnhandledActivationWarning", "TorchRayDifferenceWarning", "ResizeOrderWarning",
    "DegenerateMapWarning",
    "SaliencyDebug", "Shape", "smooth_saliency", "model_state_guard",
]
