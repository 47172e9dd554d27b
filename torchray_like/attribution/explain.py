r"""Several attribution methods from one forward pass.

:func:`explain` returns one map per method.  The backpropagation methods that differ only in the
backward rule of the ReLUs and in the tensor they read — gradient, guided backprop, DeConvNet,
linear approximation (at the input or at a layer), Grad-CAM and guided Grad-CAM — share **one**
forward pass: it runs inside a rectifier-rule context with a probe on every layer some method
reads, then the graph is differentiated once per rule (the rule is a value the graph's ReLU
nodes read at backward time, so it is switched between the passes with ``retain_graph``):

* the plain rule, down to every tensor a plain-rule method reads (the input and/or layers): the
  gradient and linear-approximation maps, Grad-CAM's weights and guided Grad-CAM's CAM;
* the guided rule, down to what guided backprop and guided Grad-CAM read;
* the DeConvNet rule, down to what DeConvNet reads.

So six methods cost one forward and at most three backward passes, instead of six forwards and
six or seven backwards.  Each map is **exactly** (bit for bit) what the method's own function
returns with the same options: the same forward values, the same backward kernels, the same
map, resize and smoothing code.

Methods with their own forward passes — excitation backprop and its contrastive variant (their
rules replace the linear layers' backward too, and must be active during the forward), RISE and
extremal perturbation (many perturbed forward passes) — cannot share it; they run by their own
function from :data:`~torchray_like.attribution.registry.METHODS`, with the same target.  So
does a shareable method given an option the shared pass cannot honour (``context_builder``,
``get_backward_gradient``, or an argument added to the method later).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .deconvnet import DECONVNET_RULE, DeConvNetContext
from .driver import forward_pass, is_input, saliency
from .grad_cam import grad_cam_map, resolve_layer
from .guided_backprop import GUIDED_BACKPROP_RULE, GuidedBackpropContext
from .guided_grad_cam import guided_grad_cam_map
from .linear_approx import linear_approx_map
from .maps import ActivationMap, check_smooth, finish_map, gradient_to_saliency
from .probe import get_module, layer_label
from .registry import METHODS
from .rules import GRADIENT_RULE, ReLUContext, ReLURule
from .state import autograd_grad
from .targets import TargetType

__all__ = ["explain", "SHARED_METHODS"]

#: Methods that share one forward pass in :func:`explain`.
SHARED_METHODS = ("gradient", "guided_backprop", "deconvnet", "linear_approx", "grad_cam",
                  "guided_grad_cam")

# Options the shared pass honours, per method; any other option the method's function accepts
# makes that method run by its own function.
_COMMON = frozenset({"saliency_layer", "resize", "resize_mode", "smooth"})
_SHARED_OPTIONS = {
    "gradient": _COMMON | {"gradient_to_saliency"},
    "guided_backprop": _COMMON | {"gradient_to_saliency"},
    "deconvnet": _COMMON | {"gradient_to_saliency"},
    "linear_approx": _COMMON,
    "grad_cam": _COMMON,
    "guided_grad_cam": _COMMON | {"gradient_to_saliency"},
}
# Arguments a method's function fixes itself (passing them would be a TypeError).
_FIXED = {"guided_backprop": {"context_builder"}, "deconvnet": {"context_builder"}}
# Arguments explain never accepts: it returns maps only.
_REFUSED = {"debug": "explain returns maps only; call the method's own function with "
                     "debug=True for its debug record"}

_RULE_ORDER = (GRADIENT_RULE, GUIDED_BACKPROP_RULE, DECONVNET_RULE)
_METHOD_RULE = {"gradient": GRADIENT_RULE, "guided_backprop": GUIDED_BACKPROP_RULE,
                "deconvnet": DECONVNET_RULE, "linear_approx": GRADIENT_RULE,
                "grad_cam": GRADIENT_RULE}
_LAYER_HINTS = {
    "linear_approx": "the map needs (N, C, *spatial): choose a convolutional layer, or the "
                     "input (saliency_layer=None)",
    "grad_cam": "Grad-CAM needs (N, C, *spatial): choose a convolutional layer (or omit "
                "saliency_layer to pick one automatically)",
}


def _accepted_options(method: str) -> set:
    """The keyword arguments ``METHODS[method]`` accepts (after model, input, target)."""
    fn = METHODS[method]
    params = list(inspect.signature(fn).parameters.values())[3:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        # gradient / guided_backprop / deconvnet forward their keywords to the driver.
        params = list(inspect.signature(saliency).parameters.values())[3:]
    names = {p.name for p in params
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           inspect.Parameter.KEYWORD_ONLY)}
    return names - _FIXED.get(method, set())


@dataclass
class _Plan:
    label: str
    method: str
    options: Dict[str, Any]
    shared: bool
    # Filled for shared methods:
    layer: Any = None                 # the tensor read: None (the input), a name or a module
    reads: List[Tuple[ReLURule, Any]] = field(default_factory=list)  # (rule, read key)


def _normalise_methods(methods: Union[Sequence[str], Mapping[str, str]]) -> Dict[str, str]:
    if isinstance(methods, str):
        methods = [methods]
    if isinstance(methods, Mapping):
        pairs = list(methods.items())
    else:
        pairs = []
        for name in methods:
            if any(name == label for label, _ in pairs):
                raise ValueError(
                    f"explain: method {name!r} is listed twice; to compute a method twice with "
                    "different options, pass methods as a mapping label -> method name, e.g. "
                    "{'la_input': 'linear_approx', 'la_layer4': 'linear_approx'}, and key "
                    "options by label")
            pairs.append((name, name))
    if not pairs:
        raise ValueError("explain: methods is empty; name at least one of "
                         f"{', '.join(sorted(METHODS))}")
    out: Dict[str, str] = {}
    for label, name in pairs:
        if not isinstance(label, str) or not isinstance(name, str):
            raise TypeError(f"explain: method labels and names must be strings, got "
                            f"{label!r}: {name!r}")
        METHODS[name]  # ValueError listing the known methods
        out[label] = name
    return out


def _plan(methods: Dict[str, str], options: Mapping[str, Mapping[str, Any]]) -> List[_Plan]:
    extra = [label for label in options if label not in methods]
    if extra:
        raise ValueError(
            f"explain: options given for {', '.join(map(repr, extra))}, which "
            f"{'is' if len(extra) == 1 else 'are'} not among the methods "
            f"({', '.join(map(repr, methods))})")
    plans = []
    for label, method in methods.items():
        opts = dict(options.get(label) or {})
        if not all(isinstance(k, str) for k in opts):
            raise TypeError(f"explain: options of {label!r} must be keyword names")
        for key in opts:
            if key in _REFUSED:
                raise ValueError(f"explain: option {key!r} of {label!r}: {_REFUSED[key]}")
        accepted = _accepted_options(method)
        unknown = sorted(set(opts) - accepted)
        if unknown:
            raise ValueError(
                f"explain: {method} has no option {', '.join(map(repr, unknown))}"
                + (f" (for {label!r})" if label != method else "")
                + f"; its options: {', '.join(sorted(accepted - set(_REFUSED)))}")
        shared = method in _SHARED_OPTIONS and set(opts) <= _SHARED_OPTIONS[method]
        if "smooth" in opts:
            check_smooth(opts["smooth"])  # fail before any work, as the methods do
        plans.append(_Plan(label, method, opts, shared))
    return plans


def _layer_key(model: nn.Module, layer: Any) -> Optional[nn.Module]:
    """``None`` for the input, else the module (two spellings of one layer share a probe)."""
    return None if is_input(layer) else get_module(model, layer)


def _layer_map(read: torch.Tensor, grad: torch.Tensor, map_fn: Callable) -> torch.Tensor:
    read.grad = grad
    try:
        return map_fn(read)
    finally:
        read.grad = None


def _shared_maps(model: nn.Module, input: torch.Tensor, target: TargetType,
                 plans: List[_Plan]) -> Dict[str, torch.Tensor]:
    # Which tensors are read: label -> layer (as the user gave it), keyed by module identity.
    layers: Dict[str, Any] = {}
    keys: Dict[Optional[nn.Module], str] = {}

    modules: Dict[Any, Optional[nn.Module]] = {}  # layer as given -> module (looked up once)

    def read_label(plan: _Plan, layer: Any) -> str:
        spelling = layer if isinstance(layer, str) or layer is None else id(layer)
        if spelling not in modules:
            modules[spelling] = _layer_key(model, layer)
        key = modules[spelling]
        if key not in keys:
            label = "input" if key is None else f"{plan.method}'s saliency_layer"
            while label in layers:
                label += "'"
            keys[key] = label
            layers[label] = None if key is None else layer
        return keys[key]

    auto: List[Any] = []  # the automatic layer, found once for Grad-CAM and guided Grad-CAM
    for plan in plans:
        layer = plan.options.get("saliency_layer")
        if plan.method in ("grad_cam", "guided_grad_cam"):
            if layer is None:
                if not auto:
                    auto.append(resolve_layer(model, input, None))
                layer = auto[0]
        plan.layer = layer
        if plan.method == "guided_grad_cam":
            plan.reads = [(GRADIENT_RULE, read_label(plan, layer)),
                          (GUIDED_BACKPROP_RULE, read_label(plan, None))]
        else:
            plan.reads = [(_METHOD_RULE[plan.method], read_label(plan, layer))]

    rules = [r for r in _RULE_ORDER if any(rule is r for p in plans for rule, _ in p.reads)]
    context: Optional[ReLUContext]
    if GUIDED_BACKPROP_RULE in rules:
        context = GuidedBackpropContext()
    elif DECONVNET_RULE in rules:
        context = DeConvNetContext()
    else:
        context = None  # plain rule only: the plain forward, no context

    grads: Dict[Tuple[int, str], torch.Tensor] = {}
    maps: Dict[str, torch.Tensor] = {}
    with forward_pass(model, input, target, layers, context) as fp:
        # One backward pass per rule, down to every tensor read under that rule.
        for i, rule in enumerate(rules):
            wanted = list(dict.fromkeys(lbl for p in plans for r, lbl in p.reads if r is rule))
            if context is not None:
                context.rule = rule
            found = autograd_grad(fp.scores, [fp.reads[lbl] for lbl in wanted], fp.seed,
                                 retain_graph=i < len(rules) - 1, allow_unused=True)
            for lbl, g in zip(wanted, found):
                if g is None:
                    where = ("the input" if layers[lbl] is None
                             else f"{lbl} {layer_label(layers[lbl])}")
                    raise ValueError(f"the target scores do not depend on {where}")
                grads[id(rule), lbl] = g

        for plan in plans:
            (rule, lbl), opts = plan.reads[0], plan.options
            read, grad = fp.reads[lbl], grads[id(rule), lbl]
            if plan.method in ("gradient", "guided_backprop", "deconvnet"):
                smap = _layer_map(read, grad,
                                  opts.get("gradient_to_saliency", gradient_to_saliency))
            elif plan.method in ("linear_approx", "grad_cam"):
                map_fn = linear_approx_map if plan.method == "linear_approx" else grad_cam_map
                smap = _layer_map(read, grad, ActivationMap(
                    map_fn, plan.method, plan.layer, _LAYER_HINTS[plan.method]))
            else:
                smap = _guided_grad_cam(plan, fp.x, read, grad, grads[id(GUIDED_BACKPROP_RULE),
                                                                       plan.reads[1][1]], input)
            maps[plan.label] = finish_map(input, smap, opts.get("resize", False),
                                          opts.get("resize_mode", "bilinear"),
                                          check_smooth(opts.get("smooth", 0)))
    return maps


def _guided_grad_cam(plan: _Plan, x: torch.Tensor, read: torch.Tensor, layer_grad: torch.Tensor,
                     input_grad: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """Guided Grad-CAM from its two gradients, combined by :func:`guided_grad_cam_map`."""
    smap, _ = guided_grad_cam_map(input, x, read, layer_grad, input_grad, plan.layer,
                                  plan.options.get("resize_mode", "bilinear"),
                                  plan.options.get("gradient_to_saliency", gradient_to_saliency))
    return smap


def explain(model: nn.Module, input: torch.Tensor, target: TargetType,
            methods: Union[Sequence[str], Mapping[str, str]] = SHARED_METHODS,
            options: Optional[Mapping[str, Mapping[str, Any]]] = None
            ) -> Dict[str, torch.Tensor]:
    """Maps of several attribution methods, sharing one forward pass where they can.

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode with frozen parameters; its state is restored, no hook is
        left behind, also when a method raises).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch.
    target : int, sequence, torch.Tensor or callable
        What to explain, as for every method (one target for all methods).
    methods : sequence of str, or mapping label -> method name
        Method names of :data:`~torchray_like.attribution.registry.METHODS` (default: the six
        that share a forward pass, :data:`SHARED_METHODS`).  To compute one method twice with
        different options, give a mapping, e.g. ``{"la_input": "linear_approx", "la_layer4":
        "linear_approx"}``; results and ``options`` are then keyed by label.
    options : mapping label -> dict, optional
        Keyword arguments of each method, exactly as its own function takes them
        (``saliency_layer``, ``resize``, ``resize_mode``, ``smooth``, ``gradient_to_saliency``,
        RISE's ``num_masks`` ...).  ``debug`` is refused (explain returns maps only).

    Returns
    -------
    dict
        label -> map, in the order of ``methods``.  Each map equals, bit for bit, what
        ``METHODS[name](model, input, target, **options[label])`` returns (for
        ``extremal_perturbation``, the masks: the first element of its ``(masks, history)``).

    Raises
    ------
    ValueError
        For an unknown method, an option the method does not take (naming its options), options
        keyed by a label not in ``methods``, and whatever the methods themselves reject.

    Notes
    -----
    Shared: ``gradient``, ``guided_backprop``, ``deconvnet``, ``linear_approx``, ``grad_cam``,
    ``guided_grad_cam`` with the options ``saliency_layer``, ``resize``, ``resize_mode``,
    ``smooth`` (and ``gradient_to_saliency`` where the method takes it).  They cost one forward
    pass and one backward pass per distinct rule (plain, guided, DeConvNet), each pass reaching
    every tensor read under that rule.  Everything else runs by its own function.  Several
    layers read in one pass are probed at once; a layer two methods read is probed once.
    """
    labels = _normalise_methods(methods)
    plans = _plan(labels, options or {})
    maps: Dict[str, torch.Tensor] = {}
    shared = [p for p in plans if p.shared]
    if shared:
        maps.update(_shared_maps(model, input, target, shared))
    for plan in plans:
        if not plan.shared:
            result = METHODS[plan.method](model, input, target, **plan.options)
            maps[plan.label] = result[0] if isinstance(result, tuple) else result
    return {p.label: maps[p.label] for p in plans}
