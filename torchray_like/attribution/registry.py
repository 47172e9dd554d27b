"""The method registry: a method's name → its function, for scripts and benchmarks.

One entry per method.  Backpropagation methods are described as data
(:class:`~.method.BackpropMethod`, reachable from their function with
:func:`~.method.description`); :func:`~torchray_like.attribution.explain.explain` shares one
forward pass among every described method without naming any.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import torch
import torch.nn as nn

from .ablation_cam import ablation_cam
from .deconvnet import deconvnet
from .eigen_cam import eigen_cam
from .excitation_backprop import contrastive_excitation_backprop, excitation_backprop
from .extremal_perturbation import extremal_perturbation
from .grad_cam import grad_cam
from .grad_cam_plus_plus import grad_cam_plus_plus  # CAM family (issue 19)
from .gradient import gradient
from .gradient_x_input import gradient_x_input
from .guided_backprop import guided_backprop
from .guided_grad_cam import guided_grad_cam
from .hires_cam import hires_cam
from .integrated_gradients import integrated_gradients
from .layer_cam import layer_cam
from .layer_choice import find_contrast_layer
from .linear_approx import linear_approx
from .method import description
from .occlusion import occlusion
from .rise import rise
from .score_cam import score_cam
from .smooth_grad import smooth_grad
from .targets import TargetType
from .xgrad_cam import xgrad_cam

__all__ = ["METHODS", "MethodRegistry", "SHARED_METHODS", "TRANSFORMER_ONLY_METHODS", "rise_map",
           "extremal_perturbation_map", "contrastive_excitation_backprop_map"]


class MethodRegistry(Mapping):
    """A read-only mapping from method name to function; unknown names raise ``ValueError``
    listing the known ones (a ``KeyError`` would not say what to type)."""

    def __init__(self, methods: Dict[str, Callable]) -> None:
        self._methods = dict(methods)

    def __getitem__(self, name: str) -> Callable:
        try:
            return self._methods[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown attribution method {name!r}; known methods: "
                f"{', '.join(sorted(self._methods))}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def get(self, name: Any, default: Any = None) -> Any:
        return self._methods.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def __repr__(self) -> str:
        return f"MethodRegistry({sorted(self._methods)})"


# ---------------------------------------------------------------------------------------------
# The uniform view: every entry returns (N, 1, *spatial) maps for the target
# ---------------------------------------------------------------------------------------------


def _signature_of(function: Callable, **defaults: Any) -> inspect.Signature:
    """``function``'s signature with some defaults changed (what ``explain`` and ``--help``
    texts read)."""
    sig = inspect.signature(function)
    return sig.replace(parameters=[p.replace(default=defaults[p.name]) if p.name in defaults
                                   else p for p in sig.parameters.values()])


def _require_target(name: str, target: Any) -> None:
    if target is None:
        raise ValueError(
            f"METHODS[{name!r}] explains one target: pass a class index (or one per sample, or "
            f"a callable output -> (N,) scores); for every class at once call "
            f"torchray_like.{name} itself")


def rise_map(model: nn.Module, input: torch.Tensor, target: TargetType, *args: Any,
             **options: Any) -> torch.Tensor:
    """:func:`~.rise.rise` for one target: ``(N, 1, *spatial)`` (``METHODS["rise"]``)."""
    _require_target("rise", target)
    return rise(model, input, target, *args, **options)


def extremal_perturbation_map(model: nn.Module, input: torch.Tensor, target: TargetType,
                              *args: Any, **options: Any) -> torch.Tensor:
    """:func:`~.extremal_perturbation.extremal_perturbation` as one map per image: the masks of
    every area summed, ``(N, 1, *spatial)`` (the paper's pointing-game protocol sums the masks
    of its areas; with one area it is that mask).  ``METHODS["extremal_perturbation"]``."""
    masks, _ = extremal_perturbation(model, input, target, *args, **options)
    n = input.shape[0]
    return masks.reshape((n, -1) + tuple(masks.shape[2:])).sum(1, keepdim=True)


def contrastive_excitation_backprop_map(model: nn.Module, input: torch.Tensor,
                                        target: TargetType, saliency_layer: Any = "",
                                        contrast_layer: Any = None, *args: Any,
                                        **options: Any) -> torch.Tensor:
    """:func:`~.excitation_backprop.contrastive_excitation_backprop` with default layers
    (``METHODS["contrastive_excitation_backprop"]``): the map at the input
    (``saliency_layer=""``) and the contrast at the layer Grad-CAM would choose
    (:func:`~.layer_choice.find_saliency_layer`: the last spatial layer), or — when the
    network goes around that layer (a residual sum written in ``forward``) — at the last such
    layer that every path crosses (:func:`~.layer_choice.find_contrast_layer`)."""
    if contrast_layer is None:
        contrast_layer = find_contrast_layer(model, input)
    smap = contrastive_excitation_backprop(model, input, target, saliency_layer, contrast_layer,
                                           *args, **options)
    return smap[0] if isinstance(smap, tuple) else smap  # debug=True: the map


rise_map.__signature__ = inspect.signature(rise)  # type: ignore[attr-defined]
extremal_perturbation_map.__signature__ = (  # type: ignore[attr-defined]
    inspect.signature(extremal_perturbation))
contrastive_excitation_backprop_map.__signature__ = _signature_of(  # type: ignore[attr-defined]
    contrastive_excitation_backprop, saliency_layer="", contrast_layer=None)


#: Method name → function ``f(model, input, target, **options)`` returning ``(N, 1, *spatial)``
#: maps for ``target``: the method's own function where it already does (the backprop methods),
#: else its uniform view (:func:`rise_map`, :func:`extremal_perturbation_map`,
#: :func:`contrastive_excitation_backprop_map`), whose own functions keep TorchRay's return
#: values (RISE every class without a target, extremal perturbation ``(masks, history)``).
METHODS = MethodRegistry({
    "gradient": gradient,
    "guided_backprop": guided_backprop,
    "deconvnet": deconvnet,
    "linear_approx": linear_approx,
    "grad_cam": grad_cam,
    "guided_grad_cam": guided_grad_cam,
    "excitation_backprop": excitation_backprop,
    "contrastive_excitation_backprop": contrastive_excitation_backprop_map,
    "rise": rise_map,
    "extremal_perturbation": extremal_perturbation_map,
    "gradient_x_input": gradient_x_input,
    "integrated_gradients": integrated_gradients,
    "smooth_grad": smooth_grad,
    "occlusion": occlusion,
    "grad_cam_plus_plus": grad_cam_plus_plus,
    "layer_cam": layer_cam,
    "xgrad_cam": xgrad_cam,
    "hires_cam": hires_cam,
    "eigen_cam": eigen_cam,
    "score_cam": score_cam,
    "ablation_cam": ablation_cam,
})

# Issue 20: layer-wise relevance propagation, one entry per standard composite ("lrp" is
# EpsilonPlusFlat); not described methods: each runs its own forward pass in ``explain``.
from .lrp import LRP_METHODS  # noqa: E402

METHODS = MethodRegistry({**METHODS, **LRP_METHODS})

# Issue 21: transformers — attention rollout / flow, gradient-weighted rollout (they need a
# model with attention and refuse others), CP-LRP and AttnLRP (any model).
from .attention_rollout import attention_flow, attention_rollout, grad_rollout  # noqa: E402
from .transformer_lrp import attn_lrp, cp_lrp  # noqa: E402

METHODS = MethodRegistry({**METHODS, "attention_rollout": attention_rollout,
                          "attention_flow": attention_flow, "grad_rollout": grad_rollout,
                          "attn_lrp": attn_lrp, "cp_lrp": cp_lrp})

#: The entries that explain transformers only (a model without attention is a ValueError;
#: CP-LRP on such a model would be gradient × input and says so).
TRANSFORMER_ONLY_METHODS: Tuple[str, ...] = ("attention_rollout", "attention_flow",
                                             "grad_rollout", "cp_lrp")

#: The methods described as data: they share one forward pass in ``explain``.
SHARED_METHODS: Tuple[str, ...] = tuple(name for name, fn in METHODS.items()
                                        if description(fn) is not None)
