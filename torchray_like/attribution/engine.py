r"""The one engine that runs backpropagation methods described as data.

:func:`run_jobs` computes the maps of one or several :class:`~.method.BackpropMethod` calls
("jobs") from **one** forward pass: it finds the tensors the jobs read (the input and/or layers,
a layer named twice probed once), runs the model inside the rule context their rules need,
differentiates the graph once per rule (the rule is a value the graph's rule nodes read at
backward time — a rectifier rule, or an LRP composite — switched between the passes with
``retain_graph``), checks every gradient the
same way (:meth:`~.driver.ForwardPass.grads`), and lets each description turn its readings into
a map.  The single-method functions are the one-job case (:func:`run_method`), and
:func:`~torchray_like.attribution.explain.explain` the many-job case, so the two can never
disagree.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union, cast

import torch
import torch.nn as nn

from .arguments import check_flag, check_function
from .context import NoRuleAppliedError, suspend_rule_contexts
from .driver import (
    ForwardPass,
    SaliencyDebug,
    check_debuggable,
    check_spatial,
    detach_all,
    forward_pass,
    is_input,
    nonzero_finite_rows,
    strip_compiled_prefix,
)
from .inputs import check_input
from .layer_choice import reachable_saliency_layer, resolve_layer
from .maps import (
    check_resize_mode,
    check_smooth,
    finish_map,
    samples_text,
    warn_degenerate,
    zero_rows,
)
from .method import BackpropMethod, Read, Reading
from .modules import call_scan, check_model, unwrap_compiled
from .probe import debug_probes, fill_probe_gradients, get_module, layer_label
from .rules import GRADIENT_RULE
from .targets import Target, TargetType, get_backward_gradient, parse_target
from .tokens import layer_tokens, tokens_to_map

__all__ = ["Job", "run_jobs", "run_method", "saliency", "SALIENCY", "warn_dead_layer"]

Result = Tuple[torch.Tensor, Optional[SaliencyDebug]]


@dataclass
class Job:
    """One method call inside :func:`run_jobs`: a label, the description and its options."""

    label: str
    method: BackpropMethod
    options: Dict[str, Any]
    layer: Any = None                                   # the saliency layer, resolved
    auto: Optional[str] = None                          # the automatic layer, if chosen
    reads: List[Tuple[Read, str]] = field(default_factory=list)  # (read, reading label)


class _Readings:
    """The tensors the jobs read, keyed by module identity (two spellings of one layer, or
    the same module reached by name and by object, share one probe)."""

    def __init__(self, model: nn.Module, several: bool) -> None:
        self.model, self.several = model, several
        self.layers: Dict[str, Any] = {}               # reading label -> layer as given
        self._labels: Dict[Optional[int], str] = {}    # id(module) or None -> reading label
        self._modules: Dict[Any, Optional[nn.Module]] = {}

    def label(self, job: Job, layer: Any) -> str:
        layer = strip_compiled_prefix(layer, self.model)  # torch.compile(model): its original
        spelling = layer if isinstance(layer, str) or layer is None else id(layer)
        if spelling not in self._modules:
            self._modules[spelling] = None if is_input(layer) else get_module(self.model, layer)
        module = self._modules[spelling]
        key = None if module is None else id(module)
        if key not in self._labels:
            label = ("input" if module is None else f"{job.method.name}'s saliency_layer"
                     if self.several else "saliency_layer")
            while label in self.layers:
                label += "'"
            self._labels[key] = label
            self.layers[label] = None if module is None else layer
        return self._labels[key]


def _plan(model: nn.Module, input: torch.Tensor, jobs: List[Job],
          auto: Optional[str] = None) -> _Readings:
    """Resolve each job's layer (the automatic one found once, unless given) and what it
    reads."""
    readings = _Readings(unwrap_compiled(model), several=len(jobs) > 1)
    for job in jobs:
        method = job.method
        layer = job.options.get("saliency_layer", method.saliency_layer)
        if layer is None and method.auto_layer:
            if auto is None:
                auto = cast(str, resolve_layer(model, input, None))
            layer = job.auto = auto
        job.layer = layer
        job.reads = [(read, readings.label(job, layer if read.at_layer else None))
                     for read in method.reads]
    return readings


def _rule_context(jobs: List[Job]) -> Tuple[Any, bool]:
    """The context the forward pass runs in, and whether its rule is switched per pass.

    A call that passes its own ``context_builder`` (TorchRay's generic driver) runs in that
    context as it is; otherwise the first rule context a read needs, whose rule is then set
    for each backward pass (the plain gradient alone needs no context).
    """
    for job in jobs:
        if not job.method.default_context(job.options):
            builder = job.options["context_builder"]
            return (builder() if builder is not None else None), False
    for job in jobs:
        for read, _ in job.reads:
            if read.context is not None:
                return read.context(), True
    return None, False


def _passes(jobs: List[Job], switched: bool, debug: bool = False
            ) -> List[Tuple[Any, bool, List[str]]]:
    """The backward passes: ``(rule, check_rules, reading labels)``, the plain rule first.

    Without rule switching every reading is one pass under the context as it is, checked as
    :func:`saliency` always did.  Readings whose gradient no map uses (:attr:`Read.gradient`)
    get none, unless ``debug`` records it; a call left with no reading needs no pass."""
    needed = [(read, label) for job in jobs for read, label in job.reads
              if debug or job.method.uses_gradient(read, job.options)]
    if not needed:
        return []
    if not switched:
        return [(None, True, list(dict.fromkeys(label for _, label in needed)))]
    order = list(dict.fromkeys(read.rule for read, _ in needed))
    order.sort(key=lambda rule: rule is not GRADIENT_RULE)
    passes = []
    for rule in order:
        labels = list(dict.fromkeys(label for read, label in needed if read.rule is rule))
        check = rule is not GRADIENT_RULE and any(
            read.check_rules for read, _ in needed if read.rule is rule)
        passes.append((rule, check, labels))
    return passes


def read_pair(convert: Any, tensor: torch.Tensor, grad: Optional[torch.Tensor]
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A read tensor and its gradient (``None`` where no map uses it) as the map sees them
    (:func:`~.tokens.tokens_to_map`)."""
    if grad is None:
        return tokens_to_map(convert, tensor)[0], None
    first, second = tokens_to_map(convert, tensor, grad)
    return first, second


def warn_unread_tokens(grad: torch.Tensor, layer: Any,
                       whole: Optional[torch.Tensor] = None) -> None:
    """A :class:`~.maps.DegenerateMapWarning` when a token layer's patch tokens (as the map
    reads them, ``grad``) get an all-zero gradient for some sample although the layer's whole
    gradient (``whole``, as the layer output it) did not: the prefix tokens took it all — after
    a transformer's last attention, a class-token head reads its own token.  A sample whose
    whole gradient is zero is left to :meth:`~.driver.ForwardPass.check_gradient`, which
    says so with the causes that apply."""
    if not grad.dim() or nonzero_finite_rows(grad, grad.shape[0]):
        return  # every row sums to non-zero (2 us; the exact look, 18-330 us, on doubt only)
    rows = zero_rows(grad)
    if rows and whole is not None and whole.dim() and whole.shape[0] == grad.shape[0]:
        silent = set(zero_rows(whole))
        rows = [r for r in rows if r not in silent]
    if rows:
        warn_degenerate(
            f"saliency_layer {layer_label(layer)}: the target score reads nothing of its patch "
            f"tokens for sample(s) {samples_text(rows)} — only its class or register tokens, as "
            "after a transformer's last attention a class-token head does — so the map is all "
            "zeros there; read an earlier block (the automatic layer, saliency_layer=None, is "
            "the last one whose patch tokens the score reads)")


def warn_dead_layer(smap: torch.Tensor, activation: torch.Tensor, layer: Any,
                    name: str) -> None:
    """A :class:`~.maps.DegenerateMapWarning` for the samples whose map is constant because
    the saliency layer's output is the same at every position there (all zeros, or each
    channel its bias: every rectifier before it off for that image, so the layer sees nothing
    of the image).  Such a map says nothing about where; a CAM that is zero because every
    channel lowers the score is the right map and is not warned about."""
    shape = smap.shape
    n = shape[0] if len(shape) >= 3 else 0
    if not n or smap.numel() == n or activation.dim() < 3 or activation.shape[0] != n:
        return  # no map, one position per map, or no (N, C, *grid) layer
    # One min/max reduction each for the map and the layer: a few microseconds, also when the
    # map is constant for the common reason (a CAM with only negative evidence: all zeros).
    values = activation.detach().reshape(n, activation.shape[1], -1)  # no autograd node
    if n == 1:  # a short call
        low, high = torch.aminmax(smap)
        if not torch.equal(low, high):  # one read (one device sync)
            return
        rows = [0] if torch.equal(values, values[:, :, :1].expand_as(values)) else []
    else:
        low, high = torch.aminmax(smap.reshape(n, -1), dim=1)
        constant = low == high
        if not bool(constant.any()):
            return
        low, high = torch.aminmax(values, dim=2)
        rows = (constant & (low == high).all(1)).nonzero().flatten().tolist()
    if rows:
        warn_degenerate(
            f"{name}: the output of saliency_layer {layer_label(layer)} is the same at every "
            f"position for sample(s) {samples_text(rows)} (all zeros or each channel its bias: "
            "e.g. every ReLU before it off for that image, so it sees nothing of the image), "
            "and the map made from it is constant: it says nothing about where; read an "
            "earlier layer (saliency_layer=...)")


_ANY_RULE = object()  # one pass for every read (a single context): every reader counts


def _readers(jobs: List[Job], rule: Any, label: str) -> str:
    """The labels of the jobs that read ``label`` under ``rule``, joined by commas."""
    return ", ".join(job.label for job in jobs if any(
        read_label == label and (rule is _ANY_RULE or read.rule == rule)
        for read, read_label in job.reads))


def _gradients(fp: ForwardPass, passes: List[Tuple[Any, bool, List[str]]], switched: bool,
               keep_graph: bool, jobs: List[Job]) -> Dict[Tuple[Any, str], torch.Tensor]:
    grads: Dict[Tuple[Any, str], torch.Tensor] = {}
    for i, (rule, check, labels) in enumerate(passes):
        if switched:  # a context a read built: its rule is read at backward time
            fp.context.switch_rule(rule)
        # the methods that read a label under this pass's rule (named by its warnings)
        fp.readers = functools.partial(_readers, jobs, rule if switched else _ANY_RULE)
        retain = keep_graph or i < len(passes) - 1
        for label, grad in zip(labels, fp.grads(labels, retain, check)):
            grads[rule, label] = grad
    return grads


def _check_reads(fp: ForwardPass, jobs: List[Job], model: nn.Module, input: torch.Tensor
                 ) -> Dict[Tuple[str, str], Any]:
    """Each method's check of what it reads, before any backward pass; returns how each
    layer read becomes a map ((job, reading) -> :func:`~.tokens.layer_tokens`'s answer)."""
    tokens: Dict[Tuple[str, str], Any] = {}
    for job in jobs:
        for read, label in job.reads:
            if not read.at_layer:
                continue
            tensor = fp.reads[label]
            if is_input(job.layer) and job.options.get("tokens") not in (None, False):
                raise ValueError(
                    f"{job.method.name}: tokens= says how a layer's token output becomes a map, "
                    "but saliency_layer is the input; name the transformer block to read "
                    "(or drop tokens=)")
            if not is_input(job.layer):  # a transformer block's tokens as (N, C, *grid)
                convert = layer_tokens(unwrap_compiled(model), tensor, input,
                                       job.options.get("tokens"), layer=job.layer)
                tokens[job.label, label] = convert
                tensor = tokens_to_map(convert, tensor)[0]
            if job.method.check_read is not None:
                job.method.check_read(tensor, job.layer, fp.x)
            else:
                check_spatial(tensor, job.layer, job.method.layer_hint)
    return tokens


def _debug_record(job: Job, fp: ForwardPass, reading: Reading, extras: Dict[str, Any],
                  probes: "OrderedDict[str, Any]") -> SaliencyDebug:
    record_type = job.method.debug_type or SaliencyDebug
    if job.auto is not None:
        print(f"{job.method.name}: saliency_layer chosen automatically: {job.auto!r}")
    grad = reading.grads[0]
    assert grad is not None  # debug computes every read's gradient (_passes)
    return record_type(detach_all(fp.output), reading.tensors[0].detach(), grad.detach(),
                       dict(getattr(fp.context, "counts", {})), probes, job.layer, **extras)


def run_jobs(model: nn.Module, input: torch.Tensor, target: TargetType, jobs: List[Job],
             get_backward_gradient: Callable = get_backward_gradient, debug: bool = False
             ) -> Dict[str, Result]:
    """Maps (and, with ``debug``, records) of several method calls from one forward pass.

    Every option is validated before any work; a job with its own ``context_builder`` must
    run alone.  Returns ``label -> (map, debug record or None)`` in the order of ``jobs``.
    """
    debug = check_flag(debug, "debug")
    smooth = {job.label: check_smooth(job.options.get("smooth", 0)) for job in jobs}
    for job in jobs:
        check_resize_mode(job.options.get("resize_mode", "bilinear"))  # also without resize
        for key in _FUNCTION_OPTIONS:
            if job.options.get(key) is not None:
                check_function(job.options[key], key)
    # One walk of the module tree for the whole call: every check below reads it.
    with (call_scan(model) if isinstance(model, nn.Module) else contextlib.nullcontext()):
        return _run_jobs(model, input, target, jobs, smooth, get_backward_gradient, debug)


#: TorchRay's function-valued options (``context_builder`` may also be ``None``: no context;
#: ``get_backward_gradient`` is checked by :func:`~.driver.forward_pass`).
_FUNCTION_OPTIONS = ("context_builder", "gradient_to_saliency")


def _run_jobs(model: nn.Module, input: torch.Tensor, target: TargetType, jobs: List[Job],
              smooth: Dict[str, float], get_backward_gradient: Callable, debug: bool
              ) -> Dict[str, Result]:
    check_model(model)
    check_input(input)
    parsed = parse_target(target, input.shape[0])  # once, before any forward pass
    if debug:
        check_debuggable(model)
    readings = _plan(model, input, jobs)
    try:
        return _run(model, input, parsed, jobs, readings, smooth, get_backward_gradient, debug)
    except NoRuleAppliedError as exc:
        raise _which_jobs(exc, jobs) from exc
    except ValueError as exc:
        auto = next((job.auto for job in jobs if job.auto is not None), None)
        if auto is None or "do not depend on" not in str(exc):
            raise
    # The automatic layer feeds a head the target does not use (a model with several heads):
    # choose among the layers the target reaches.
    readings = _plan(model, input, jobs, reachable_saliency_layer(model, input, parsed))
    return _run(model, input, parsed, jobs, readings, smooth, get_backward_gradient, debug)


def _which_jobs(exc: NoRuleAppliedError, jobs: List[Job]) -> NoRuleAppliedError:
    """``exc`` as it is for one method; for several sharing a pass (``explain``), with which of
    them need the rules and how to ask for the others."""
    needing = [job.label for job in jobs
               if any(read.context is not None for read, _ in job.reads)]
    others = {job.label: job.method.name for job in jobs if job.label not in needing}
    if not needing or not others:
        return exc
    ask = (list(others) if all(label == name for label, name in others.items())
           else others)
    return NoRuleAppliedError(
        f"{exc} (so do {', '.join(needing)} in this call; the other methods need no rule: ask "
        f"for them alone, methods={ask!r})")


def _run(model: nn.Module, input: torch.Tensor, target: Target, jobs: List[Job],
         readings: _Readings, smooth: Dict[str, float], get_backward_gradient: Callable,
         debug: bool) -> Dict[str, Result]:
    """:func:`run_jobs` once the layers are known."""
    context, switched = _rule_context(jobs)
    passes = _passes(jobs, switched, debug)
    single = len(jobs) == 1 and len(jobs[0].reads) == 1
    results: Dict[str, Result] = {}
    rules = [rule for rule, _, _ in passes if rule is not None]
    with debug_probes(model, debug and single) as probes, forward_pass(
            model, input, target, readings.layers, context, get_backward_gradient,
            rules) as fp:
        tokens = _check_reads(fp, jobs, model, input)
        grads = _gradients(fp, passes, switched, keep_graph=bool(probes), jobs=jobs)
        computed = {label for _, _, labels in passes for label in labels}
        for label in dict.fromkeys(label for job in jobs for _, label in job.reads):
            if label not in computed:  # no map uses its gradient: the graph says it matters
                fp.check_reached(label)
        if probes:
            fill_probe_gradients(probes, fp.scores, fp.seed)
        for job in jobs:
            keys = [((read.rule if switched else None), label) for read, label in job.reads]
            pairs = [read_pair(tokens.get((job.label, key[1])), fp.reads[key[1]],
                               grads.get(key)) for key in keys]
            for key, (_, grad) in zip(keys, pairs):
                if tokens.get((job.label, key[1])) is not None and grad is not None:
                    warn_unread_tokens(grad, job.layer, grads.get(key))
            reading = Reading(input, fp.x, tuple(a for a, _ in pairs),
                              tuple(g for _, g in pairs), job.layer, job.options)
            smap, extras = job.method.make_map(job.method, reading)
            if not is_input(job.layer) and reading.tensors:
                warn_dead_layer(smap, reading.tensors[0], job.layer, job.method.name)
            smap = finish_map(input, smap, job.options.get("resize", False),
                              job.options.get("resize_mode", "bilinear"), smooth[job.label])
            record = _debug_record(job, fp, reading, extras, probes) if debug else None
            results[job.label] = (smap, record)
    return results


def run_method(method: BackpropMethod, model: nn.Module, input: torch.Tensor,
               target: TargetType, get_backward_gradient: Callable = get_backward_gradient,
               debug: bool = False, **options: Any
               ) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """One call of a described method: the map, or ``(map, debug record)`` with ``debug``."""
    # The caller's rule contexts change nothing inside the call: the method's own rules decide.
    with suspend_rule_contexts():
        job = Job(method.name, method, options)
        smap, record = run_jobs(model, input, target, [job], get_backward_gradient,
                                debug)[job.label]
    if debug:
        assert record is not None
        return smap, record
    return smap


_SALIENCY_DOC = r"""Backpropagation saliency: the driver every backprop method is built on.

    Runs ``model(input)`` inside ``context_builder()`` (a rule context, or nothing for the plain
    gradient), backpropagates the seed chosen by ``target`` down to the tensor read — the input,
    or the output of ``saliency_layer`` — and turns that tensor's (pseudo-)gradient into a map
    with ``gradient_to_saliency``.

    Parameters
    ----------
    model : torch.nn.Module
        The network.  What a call changes on it while it runs: every sub-module is put in eval
        mode (``training = False``: dropout off, batch norm on its running statistics), and
        the probed layer gets a forward hook (the debug probes: every named module).  Nothing
        else — parameters keep their ``requires_grad`` and ``.grad`` (the gradients are taken
        with ``torch.autograd.grad``, which computes no weight gradient), buffers are not
        updated.  All is restored when the call returns or raises.  The module flags are shared
        by every thread: another thread *training* the same model during the call sees eval
        mode.  ``torch.compile(model)`` is explained through its original module (eagerly).
        Refused with a :class:`ValueError`: TorchScript or compiled sub-modules when a rule
        context is used or a layer inside them is read (rules and hooks cannot see inside).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).  It is not modified:
        the model runs on a copy (so in-place normalisation inside its forward is fine), and its
        ``requires_grad`` and ``.grad`` stay as they were.  Non-finite scores for the target
        (NaN / Inf pixels) or a non-finite gradient are a :class:`ValueError`; a channels-last
        or unbatched image gets an error saying how to fix it.
    target : int, sequence, torch.Tensor or callable
        See :func:`get_backward_gradient`; a callable maps the model output (tensor, tuple or
        dict) to ``(N,)`` scores to explain.
    saliency_layer : str or torch.nn.Module, optional
        Module whose output is read (a dotted name or the module).  ``None`` or ``""`` (TorchRay)
        means the input.  Backpropagation stops at that tensor.  Its output must have spatial
        dimensions, ``(N, C, *spatial)``; a layer such as the classifier (or the model itself)
        is a :class:`ValueError`.
    resize : bool, int or tuple
        See :func:`resize_saliency`.
    resize_mode : str
        Interpolation mode (the linear family adapts to the rank).
    smooth : float
        If positive, Gaussian smoothing with ``sigma = smooth * max(spatial size)`` of the
        (resized) map.  This blurs the *map*; it is not SmoothGrad (which averages gradients
        over noisy copies of the input).
    context_builder : callable, optional
        Returns the context to run the forward in (e.g. ``GuidedBackpropContext``).  If it is a
        :class:`RuleContext` that replaced nothing, or whose replaced calls the backward pass
        never goes through (they do not lie between the read tensor and the output), a
        :class:`ValueError` is raised rather than returning the plain gradient under the
        method's name.  Rule contexts the *caller* entered around the call are suspended for
        its duration (:func:`~.context.suspend_rule_contexts`): the result depends on this
        argument only.
    gradient_to_saliency : callable
        Turns the read tensor (with ``.grad``) into ``(N, 1, *spatial)`` maps.
    get_backward_gradient : callable
        ``(output, target) -> seed`` (e.g. :func:`get_pointing_gradient`).
    debug : bool
        Also return a :class:`SaliencyDebug` with the output, the activation and its gradient,
        and TorchRay's debug probes (every named module's output and its gradient; it reads
        like TorchRay's ordered dict of probes).

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        The map ``(N, 1, *spatial)`` (detached, on the input's device).
    """

#: TorchRay's generic driver as a description: the plain gradient at ``saliency_layer``
#: unless ``context_builder`` says otherwise.
SALIENCY = BackpropMethod(name="saliency", reads=(Read(),), module=__name__, doc=_SALIENCY_DOC)

saliency = SALIENCY.function()
