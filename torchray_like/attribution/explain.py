r"""Several attribution methods from one forward pass.

:func:`explain` returns one map per method.  Every backpropagation method described as data
(:class:`~torchray_like.attribution.method.BackpropMethod`: the tensors it reads, the rule that
reaches each, how readings become a map) shares **one** forward pass: it runs inside a
rectifier-rule context (when a rule needs one) with a probe on every layer some method reads,
then the graph is differentiated once per rule — the rule is a value the graph's ReLU nodes
read at backward time, so it is switched between the passes with ``retain_graph``:

* the plain rule, down to every tensor a plain-rule method reads (the input and/or layers):
  the gradient, gradient × input and linear-approximation maps, the whole CAM family's
  weights (Grad-CAM, Grad-CAM++, Layer-CAM, XGrad-CAM, HiResCAM, Eigen-CAM read one activation
  and one gradient), guided Grad-CAM's CAM;
* the guided rule, down to what guided backprop and guided Grad-CAM read;
* the DeConvNet rule, down to what DeConvNet reads.

So the twelve described methods cost one forward and at most three backward passes.  The
shared pass is the very engine every method's own function runs
(:func:`~torchray_like.attribution.engine.run_jobs`), so each map is **exactly** (bit for bit)
what the method's own function returns with the same options, and the errors and warnings are
the same.  This module names no method: :data:`SHARED_METHODS` is read off the registry.

The LRP composites (``lrp``, ``lrp_epsilon_plus`` ...) share one forward pass of their own:
every LRP rule changes only the backward pass, so the model runs once inside one
:class:`~torchray_like.attribution.lrp.LRPContext` and its composite is switched between the
backward passes (one per distinct composite), each map again exactly its function's
(:func:`~torchray_like.attribution.lrp.shared_lrp_jobs`).

Methods with their own forward passes — excitation backprop and its contrastive variant (their
rules replace the linear layers' backward too, and must be active during the forward), RISE,
extremal perturbation, integrated gradients, SmoothGrad, occlusion, Score-CAM, Ablation-CAM
— run by their own function from :data:`~torchray_like.attribution.registry.METHODS`, with
the same target.  So does a described method given an option the shared pass cannot honour
(its own ``context_builder``, ``get_backward_gradient``).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .context import suspend_rule_contexts
from .engine import Job, run_jobs
from .lrp import shared_lrp_jobs
from .maps import check_smooth
from .method import BackpropMethod, description
from .modules import call_scan
from .registry import METHODS, SHARED_METHODS
from .targets import TargetType

__all__ = ["explain", "SHARED_METHODS"]

# Arguments explain never accepts: it returns maps only.
_REFUSED = {"debug": "explain returns maps only; call the method's own function with "
                     "debug=True for its debug record"}


def _accepted_options(name: str) -> set:
    """The keyword arguments ``METHODS[name]`` accepts (after model, input, target), less those
    its description says the function fixes itself."""
    params = list(inspect.signature(METHODS[name]).parameters.values())[3:]
    method = description(METHODS[name])
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY)
            } - (method.fixed if method is not None else set())


def _takes_any_option(name: str) -> bool:
    """Whether ``METHODS[name]`` forwards unknown keywords (``smooth_grad``'s options of the
    method it averages): it validates them itself."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD
               for p in inspect.signature(METHODS[name]).parameters.values())


def _shares(method: Optional[BackpropMethod], options: Dict[str, Any]) -> bool:
    """Whether a described method's call can join the shared pass: only options the engine
    honours for many jobs at once (not its own ``context_builder`` or seed function)."""
    if method is None:
        return False
    extra = set(options) - method.shared_options
    return extra <= {"context_builder"} and method.default_context(options)


@dataclass
class _Plan:
    label: str
    name: str
    options: Dict[str, Any]
    method: Optional[BackpropMethod]   # set when the call joins the shared pass


def _check_options(options: Any) -> Mapping[str, Mapping[str, Any]]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"explain: options must be a mapping label -> dict of keyword arguments, e.g. "
            f"{{'grad_cam': {{'saliency_layer': 'layer4'}}}}; got {type(options).__name__}")
    for label, opts in options.items():
        if opts is not None and not isinstance(opts, Mapping):
            raise TypeError(
                f"explain: options[{label!r}] must be a dict of keyword arguments of that "
                f"method, e.g. {{'resize': True}}; got {type(opts).__name__} {opts!r}")
    return options


def _normalise_methods(methods: Union[Sequence[str], Mapping[str, str]]) -> Dict[str, str]:
    if methods is None or not isinstance(methods, (str, Mapping, Sequence)):
        raise TypeError(
            f"explain: methods must be a method name, a sequence of names or a mapping label -> "
            f"name (known methods: {', '.join(sorted(METHODS))}); got "
            f"{type(methods).__name__}")
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
    for label, name in methods.items():
        opts = dict(options.get(label) or {})
        if not all(isinstance(k, str) for k in opts):
            raise TypeError(f"explain: options of {label!r} must be keyword names")
        for key in opts:
            if key in _REFUSED:
                raise ValueError(f"explain: option {key!r} of {label!r}: {_REFUSED[key]}")
        accepted = _accepted_options(name)
        unknown = sorted(set(opts) - accepted)
        if unknown and not _takes_any_option(name):
            raise ValueError(
                f"explain: {name} has no option {', '.join(map(repr, unknown))}"
                + (f" (for {label!r})" if label != name else "")
                + f"; its options: {', '.join(sorted(accepted - set(_REFUSED)))}")
        if "smooth" in opts:
            check_smooth(opts["smooth"])  # fail before any work, as the methods do
        method = description(METHODS[name])
        plans.append(_Plan(label, name, opts, method if _shares(method, opts) else None))
    return plans


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
        Method names of :data:`~torchray_like.attribution.registry.METHODS` (default: every
        method described as data, which all share one forward pass: :data:`SHARED_METHODS`).
        To compute one method twice with different options, give a mapping, e.g.
        ``{"la_input": "linear_approx", "la_layer4": "linear_approx"}``; results and
        ``options`` are then keyed by label.
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
    Shared: every method described as data (:data:`SHARED_METHODS`: ``gradient``,
    ``guided_backprop``, ``deconvnet``, ``linear_approx``, ``grad_cam``, ``guided_grad_cam``)
    with the options ``saliency_layer``, ``resize``, ``resize_mode``, ``smooth``,
    ``gradient_to_saliency`` (and its own default ``context_builder``).  They cost one forward
    pass and one backward pass per distinct rule (plain, guided, DeConvNet), each pass reaching
    every tensor read under that rule (a reading under a rule that must be checked gets a pass
    of its own when several are read under it, so that every check is exact).  The shared
    pass is the very engine the methods' own functions run (:func:`~.engine.run_jobs`), so
    the maps, errors and warnings are the same — except that a rule method refused because its
    rules would change nothing (:class:`~.context.NoRuleAppliedError`: a model without ReLU,
    say) names the methods of the call that need the rules and the ``methods`` to ask for
    without them.  Several LRP calls (``lrp``, ``lrp_epsilon_plus``
    ... with the options above and ``composite``) share one forward pass of their own, with
    one backward pass per distinct composite.  Everything else runs by its own function.
    Several layers read in one pass are probed at once; a layer two methods read is probed
    once.
    """
    labels = _normalise_methods(methods)
    plans = _plan(labels, _check_options(options))
    # One walk of the module tree for every method of the call (each restores the model).
    with (call_scan(model) if isinstance(model, nn.Module) else contextlib.nullcontext()):
        return _explain(model, input, target, plans)


def _explain(model: nn.Module, input: torch.Tensor, target: TargetType, plans: List[_Plan]
             ) -> Dict[str, torch.Tensor]:
    shared = [Job(p.label, p.method, p.options) for p in plans if p.method is not None]
    maps: Dict[str, torch.Tensor] = {}
    if shared:
        with suspend_rule_contexts():
            maps.update({label: smap for label, (smap, _) in
                         run_jobs(model, input, target, shared).items()})
    # Several LRP composites: one forward pass, one backward pass per composite.
    lrp = shared_lrp_jobs(model, [(p.label, METHODS[p.name], p.options)
                                  for p in plans if p.method is None])
    if len(lrp) > 1:
        with suspend_rule_contexts():
            maps.update({label: smap for label, (smap, _) in
                         run_jobs(model, input, target, list(lrp.values())).items()})
    for plan in plans:
        if plan.method is None and plan.label not in maps:
            result = METHODS[plan.name](model, input, target, **plan.options)
            maps[plan.label] = result[0] if isinstance(result, tuple) else result
    return {p.label: maps[p.label] for p in plans}
