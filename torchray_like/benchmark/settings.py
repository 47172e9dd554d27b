r"""The per-method settings of the benchmark models: one table for every script, the demo and
the docs.

Two tables make the options of a method call:

:data:`MODELS`
    Per model, what depends on the network: the input side it was trained at, the layers of
    the layer methods (Grad-CAM's, excitation backprop's and contrastive excitation backprop's
    contrast layer) and whether its head is multi-label (one sigmoid per class, which RISE then
    scores with ``score="sigmoid"``).  The embedded models, torchvision's VGG16 and ResNet50 as
    the pointing game uses them (Zhang et al. 2016; Fong et al. 2019) and the demo's
    ``colournet``; any other torchvision VGG or ResNet gets its layers by the same rule
    (:func:`torchvision_layers`).
:data:`BENCHMARKS`
    Per benchmark, what depends on the protocol and the time it may take: RISE's masks,
    extremal perturbation's areas and iterations, the pointing game's smoothing.  ``"paper"``
    holds the papers' counts (RISE 4 000 masks of 7 × 7 cells; extremal perturbation 800
    iterations and the four areas of the pointing game).

:func:`method_options` merges them — model, then benchmark, then the caller's ``overrides``
(the scripts' ``--rise-masks``, ``--ep-iters`` …) — and scales extremal perturbation's
``step``, ``sigma`` and ``max_blur`` (the paper's 7, 21 and 20 pixels at 224 pixels) to the
input side.  The values are JSON (lists, not tuples), so that a results store can record them.
Every method is then called as ``METHODS[method](model, x, target, **options)``, which gives
``(N, 1, *spatial)`` maps (:data:`~torchray_like.attribution.registry.METHODS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch.nn as nn

from .embedded_data import IMAGE_SIZE
from .embedded_models import EMBEDDED_LAYERS

__all__ = ["ModelSettings", "MODELS", "BENCHMARKS", "LAYER_OPTIONS", "model_settings",
           "torchvision_layers", "method_options", "options_table", "describe_options"]
__all__ += ["NOT_APPLICABLE", "not_applicable"]


@dataclass(frozen=True)
class ModelSettings:
    """What the methods' options depend on for one model.

    Attributes
    ----------
    input_size : int
        Side (pixels) of the images the model was trained at; extremal perturbation's blur and
        mask cells scale with it.
    grad_cam : str
        Grad-CAM's layer (also that of the other CAM variants and of guided Grad-CAM, and the
        layer linear approximation reads).
    excitation_backprop : str
        Where (contrastive) excitation backprop reads its map.
    contrast : str
        Contrastive excitation backprop's contrast layer (above ``excitation_backprop``).
    multilabel : bool
        One sigmoid per class: RISE scores with ``score="sigmoid"``.
    """

    input_size: int
    grad_cam: str
    excitation_backprop: str
    contrast: str
    multilabel: bool = False

    def layers(self) -> Dict[str, str]:
        """``{"grad_cam": …, "excitation_backprop": …, "contrast": …}``."""
        return {"grad_cam": self.grad_cam, "excitation_backprop": self.excitation_backprop,
                "contrast": self.contrast}


def _embedded(name: str) -> ModelSettings:
    layers = EMBEDDED_LAYERS[name]
    return ModelSettings(IMAGE_SIZE, layers["grad_cam"], layers["excitation_backprop"],
                         layers["contrast"], multilabel=True)


#: Model name → its settings (see the module notes).  VGG16: relu5_3, pool4 and fc7's ReLU;
#: ResNet50: layer4, layer3 and the average pool, as published.
MODELS: Mapping[str, ModelSettings] = {
    "embedded-vgg": _embedded("embedded-vgg"),
    "embedded-resnet": _embedded("embedded-resnet"),
    # The embedded transformer (embedded_vit): the CAM family reads the last block's ln_1
    # tokens; the methods of NOT_APPLICABLE["embedded-vit"] do not apply to it.
    "embedded-vit": _embedded("embedded-vit"),
    "vgg16": ModelSettings(224, "features.29", "features.23", "classifier.4"),
    "resnet50": ModelSettings(224, "layer4", "layer3", "avgpool"),
    # The demo's hand-built network (torchray_like.demo): 32-pixel images, two convolutions.
    "colournet": ModelSettings(32, "features.2", "features.0", "features.2"),
}

#: The CAM family: every variant reads Grad-CAM's layer, so that they differ only by the map.
_CAMS = ("grad_cam", "guided_grad_cam", "grad_cam_plus_plus", "layer_cam", "xgrad_cam",
         "hires_cam", "eigen_cam", "score_cam", "ablation_cam")

#: Which layer of :class:`ModelSettings` each layer method's option reads (methods not listed
#: read the input, or choose their layer themselves).
LAYER_OPTIONS: Mapping[str, Mapping[str, str]] = {
    **{name: {"saliency_layer": "grad_cam"} for name in _CAMS},
    "linear_approx": {"saliency_layer": "grad_cam"},
    "excitation_backprop": {"saliency_layer": "excitation_backprop"},
    "contrastive_excitation_backprop": {"saliency_layer": "excitation_backprop",
                                        "contrast_layer": "contrast"},
}

_RECTIFIER = ("rectifier method: it replaces the backward pass of the ReLUs, and the ViT has "
              "none (GELU in its MLPs): the method refuses the model (ValueError)")
_EXCITATION = ("excitation backprop's winning probabilities need the non-negative activations "
               "of a ReLU network (Zhang et al. 2016); the ViT's LayerNorm, GELU and attention "
               "are outside its rule (the library warns and passes plain gradients there)")
_LRP = ("this composite's rules cover convolutions, linear layers and ReLUs; the ViT's "
        "attention, GELU and LayerNorm keep plain gradients (UnhandledActivationWarning), so the "
        "map is no relevance decomposition: use the transformer rules attn_lrp / cp_lrp")
_LRP_NAMES = ("lrp", "lrp_epsilon_plus", "lrp_epsilon_plus_flat", "lrp_epsilon_alpha2_beta1",
              "lrp_epsilon_gamma_box")

_NO_ATTENTION = ("the network computes no attention (a CNN): the method refuses it "
                 "(NoAttentionError / ValueError)")
_ATTENTION_ONLY = ("attention_rollout", "attention_flow", "grad_rollout", "cp_lrp")

#: Model → method → why the method does not apply to it: the benchmarks report these pairs
#: as ``"n/a"`` (with the reason) instead of running them.  On ``embedded-vit`` apply: the
#: gradient family, RISE, extremal perturbation, occlusion, the CAM family on the last
#: block's ``ln_1`` tokens (Grad-CAM, Grad-CAM++, Layer-CAM, XGrad-CAM, HiResCAM, Eigen-CAM,
#: Score-CAM, Ablation-CAM, linear approximation), attention rollout / flow, gradient-weighted
#: rollout, AttnLRP and CP-LRP; on the CNNs everything but the attention methods.
NOT_APPLICABLE: Mapping[str, Mapping[str, str]] = {
    **{name: {method: _NO_ATTENTION for method in _ATTENTION_ONLY}
       for name in ("embedded-vgg", "embedded-resnet", "vgg16", "resnet50", "colournet")},
    "embedded-vit": {
        "guided_backprop": _RECTIFIER, "deconvnet": _RECTIFIER, "guided_grad_cam": _RECTIFIER,
        "excitation_backprop": _EXCITATION, "contrastive_excitation_backprop": _EXCITATION,
        **{name: _LRP for name in _LRP_NAMES},
    },
}


def not_applicable(model: str, method: str) -> Optional[str]:
    """Why ``method`` does not apply to ``model`` (:data:`NOT_APPLICABLE`), or ``None``."""
    return NOT_APPLICABLE.get(model, {}).get(method)


_PAPER_AREAS = [0.025, 0.05, 0.1, 0.2]
Table = Dict[str, Dict[str, Any]]
_PAPER: Table = {"rise": {"num_masks": 4000, "num_cells": 7, "p": 0.5, "batch_size": 64},
                 "extremal_perturbation": {"areas": _PAPER_AREAS, "max_iter": 800}}
# The pointing game's protocol: the gradient family smoothed by a Gaussian of 0.02 × the
# image side, RISE with sigmoid scores (multi-label data sets), extremal perturbation's masks
# of the four areas summed (METHODS does the sum) and smoothed likewise.
_SMOOTHED = ("gradient", "guided_backprop", "deconvnet", "guided_grad_cam")
_POINTING: Table = {**{m: {"smooth": 0.02} for m in _SMOOTHED},
                    "rise": {"score": "sigmoid"}, "extremal_perturbation": {"smooth": 0.02}}


def _merge(*tables: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for table in tables:
        for method, options in table.items():
            out[method] = {**out.get(method, {}), **options}
    return out


#: Benchmark name → method → options (counts and protocol; see the module notes).  The quick
#: counts keep each script's default run to minutes on a CPU; the scripts print them.
BENCHMARKS: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    "paper": _PAPER,
    "pointing_game": _merge(_POINTING, {
        "rise": {"num_masks": 500, "num_cells": 7, "p": 0.5, "batch_size": 250},
        # 100 iterations (the paper: 800): the default run's 4 images then take 17 s
        # (issue 22); --ep-iters 300 --ep-limit 8 gives the earlier row in 100 s.
        "extremal_perturbation": {"areas": _PAPER_AREAS, "max_iter": 100},
        # The quick run: fewer steps and noisy copies than the methods' defaults (50, 50).
        "integrated_gradients": {"n_steps": 16}, "smooth_grad": {"n_samples": 16}}),
    "pointing_game_paper": _merge(_PAPER, _POINTING),
    "deletion_insertion": {
        "rise": {"num_masks": 1000, "num_cells": 7, "batch_size": 64},
        "extremal_perturbation": {"areas": [0.05, 0.1, 0.2], "max_iter": 200}},
    "sanity_checks": {
        "rise": {"num_masks": 200, "num_cells": 7, "batch_size": 64},
        "extremal_perturbation": {"areas": [0.05, 0.1, 0.2], "max_iter": 100}},
    "compare": {
        "rise": {"num_masks": 1000, "batch_size": 100},
        "extremal_perturbation": {"areas": [0.1], "max_iter": 100}},
    "speed": {
        "rise": {"num_masks": 64, "batch_size": 32},
        "extremal_perturbation": {"areas": [0.1], "max_iter": 5}},
    "demo": {
        "rise": {"num_masks": 500},
        "extremal_perturbation": {"areas": [0.05, 0.1], "max_iter": 200}},
}


def torchvision_layers(model: nn.Module) -> Dict[str, str]:
    """The published layers of a torchvision VGG or ResNet (any depth).

    ResNet: ``layer4`` (Grad-CAM), ``layer3`` (excitation backprop), ``avgpool`` (contrast).
    VGG: the last ReLU of ``features`` (relu5_3), the next-to-last max pool (pool4) and fc7's
    ReLU ``classifier.4``.

    Raises
    ------
    ValueError
        For a model that is neither (its layers must then be given to the methods).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = dict(model.named_modules())
    if {"layer3", "layer4", "avgpool"} <= set(names):
        return {"grad_cam": "layer4", "excitation_backprop": "layer3", "contrast": "avgpool"}
    features = names.get("features")
    if isinstance(features, nn.Sequential) and "classifier.4" in names:
        children = list(features.named_children())
        relus = [n for n, m in children if isinstance(m, nn.ReLU)]
        pools = [n for n, m in children if isinstance(m, nn.MaxPool2d)]
        if relus and len(pools) >= 2:
            return {"grad_cam": f"features.{relus[-1]}",
                    "excitation_backprop": f"features.{pools[-2]}", "contrast": "classifier.4"}
    raise ValueError(
        f"no benchmark settings for a {type(model).__name__}: the table knows "
        f"{', '.join(MODELS)} and the layers of torchvision VGGs and ResNets; give the layer "
        "methods their saliency_layer / contrast_layer yourself")


def model_settings(name: str, network: Optional[nn.Module] = None,
                   input_size: int = 224) -> ModelSettings:
    """The settings of model ``name``: its entry in :data:`MODELS`, or, for another torchvision
    VGG / ResNet given as ``network``, its layers by :func:`torchvision_layers` at
    ``input_size``.

    Raises
    ------
    ValueError
        For a name not in the table without a VGG / ResNet ``network``.
    """
    if name in MODELS:
        return MODELS[name]
    if network is None:
        raise ValueError(f"no benchmark settings for model {name!r}: known models are "
                         f"{', '.join(MODELS)}; for another torchvision VGG or ResNet pass the "
                         "network (network=model) so that its layers can be found")
    layers = torchvision_layers(network)
    return ModelSettings(input_size, layers["grad_cam"], layers["excitation_backprop"],
                         layers["contrast"])


def _check_name(value: Any, known: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in known:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(known)}")
    return value


def method_options(method: str, model: str, benchmark: str = "paper", *,
                   network: Optional[nn.Module] = None, input_size: Optional[int] = None,
                   overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The keyword arguments of ``METHODS[method]`` for ``model`` in ``benchmark``.

    Parameters
    ----------
    method : str
        A name of :data:`~torchray_like.attribution.registry.METHODS`.
    model : str
        A name of :data:`MODELS`, or any name with ``network`` a torchvision VGG / ResNet.
    benchmark : str
        A name of :data:`BENCHMARKS` (default ``"paper"``).
    network : torch.nn.Module, optional
        The network, for models outside :data:`MODELS`.
    input_size : int, optional
        The side of the inputs (default: the model's); scales extremal perturbation.
    overrides : mapping, optional
        Options that win over the tables; ``None`` values are ignored (unset flags).

    Returns
    -------
    dict
        JSON-able options (lists, strings, numbers).

    Raises
    ------
    ValueError
        For an unknown method, benchmark or model, or a non-positive ``input_size``.
    """
    from ..attribution.registry import METHODS

    _check_name(method, list(METHODS), "method")
    _check_name(benchmark, list(BENCHMARKS), "benchmark")
    entry = model_settings(model, network, 224 if input_size is None else input_size)
    side = entry.input_size if input_size is None else input_size
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise ValueError(f"input_size must be a positive int (pixels), got {input_size!r}")
    layers = entry.layers()
    options: Dict[str, Any] = {key: layers[which]
                               for key, which in LAYER_OPTIONS.get(method, {}).items()}
    if method == "rise" and entry.multilabel:
        options["score"] = "sigmoid"
    if method == "extremal_perturbation":
        scale = side / 224
        options.update(step=max(int(round(7 * scale)), 1), sigma=21 * scale,
                       max_blur=20 * scale)
    options.update(BENCHMARKS[benchmark].get(method, {}))
    options.update({k: v for k, v in (overrides or {}).items() if v is not None})
    # Fresh lists: JSON-able, and a caller's change never reaches the tables.
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()}


def options_table(methods: Sequence[str], model: str, benchmark: str = "paper", *,
                  network: Optional[nn.Module] = None, input_size: Optional[int] = None,
                  overrides: Optional[Mapping[str, Mapping[str, Any]]] = None
                  ) -> Dict[str, Dict[str, Any]]:
    """:func:`method_options` of several methods: ``{method: options}``, ``overrides`` given
    per method (``{"rise": {"num_masks": 100}}``)."""
    if isinstance(methods, str):
        # A str is a sequence of letters: 'grad_cam' would be read as methods 'g', 'r', ...
        raise TypeError(f"methods must be a list of method names, got the str {methods!r}; "
                        f"pass [{methods!r}]")
    return {m: method_options(m, model, benchmark, network=network, input_size=input_size,
                              overrides=(overrides or {}).get(m)) for m in methods}


def describe_options(table: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """One indented line per method: ``name  key=value, …`` (what the scripts print)."""
    def show(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return [f"    {method:32s} " + (", ".join(f"{k}={show(v)}" for k, v in options.items())
                                    or "(defaults)")
            for method, options in table.items()]
