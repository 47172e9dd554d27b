r"""The driver every backpropagation method is built on.

:func:`saliency` plugs together a rule context (or none), a layer to read (the input, or a
:class:`~.probe.Probe` on a module), a seed gradient chosen by the target, a way to turn the read
(pseudo-)gradient into a map, a resize and an optional smoothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .arguments import check_function
from .autograd_graph import depends_on
from .context import (
    ATEN_ADVICE,
    NoRuleAppliedError,
    NullContext,
    RuleContext,
    UnhandledActivationWarning,
    calls_aten,
    check_data_parallel,
    suspend_rule_contexts,
)
from .inputs import call_model, check_input, layout_hint
from .maps import FLAT_SCORE_CAUSES, samples_text, warn_degenerate, zero_rows
from .modules import (
    batch_statistics_layers,
    check_model,
    opaque_modules,
    strip_compiled_prefix,
    unwrap_compiled,
)
from .probe import Probe, get_module, layer_label, single_call
from .reporting import warn_caller
from .state import autograd_grad, model_state_guard, uses_reentrant_checkpoint
from .targets import Target, TargetType, get_backward_gradient, parse_target

__all__ = ["SaliencyDebug", "ForwardPass", "forward_pass", "GraphFromLayers"]


@dataclass
class SaliencyDebug:
    """What :func:`saliency` returns beside the map when ``debug=True``.

    Attributes
    ----------
    output : Any
        The model output (detached).
    activation : torch.Tensor
        The tensor read: the input, or the probed layer's output / input (detached).
    gradient : torch.Tensor
        Its (pseudo-)gradient.
    counts : dict
        What the rule context replaced (empty without a context).
    probes : OrderedDict
        TorchRay's debug probes (:func:`~.probe.attach_debug_probes`): module name → output
        :class:`~.probe.Probe` holding that module's activation and its (pseudo-)gradient
        from the call (filled by :func:`saliency`; empty for other methods).  The object
        reads like that dict (``debug["features.3"].data[0]``, ``for name in debug``), so
        TorchRay code unpacking ``saliency_map, probes = ...(debug=True)`` keeps working.
    layer : str, module or None
        The saliency layer read (the automatic choice, when the layer was chosen so; ``None``
        or ``""`` for the input).
    """

    output: Any
    activation: torch.Tensor
    gradient: torch.Tensor
    counts: Dict[str, int] = field(default_factory=dict)
    probes: "OrderedDict[str, Probe]" = field(default_factory=OrderedDict)
    layer: Any = None

    # TorchRay returned the ordered dict of debug probes: read like it.
    def __getitem__(self, name: str) -> Probe:
        return self.probes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.probes)

    def __len__(self) -> int:
        return len(self.probes)

    def __bool__(self) -> bool:  # a debug record is true even without probes
        return True

    def __contains__(self, name: object) -> bool:
        return name in self.probes

    def keys(self):
        return self.probes.keys()

    def values(self):
        return self.probes.values()

    def items(self):
        return self.probes.items()


def detach_all(value: Any) -> Any:
    """``value`` with every tensor detached, in the same container: a dict (its own type when
    it can be rebuilt from pairs), a list, a tuple, a namedtuple, a dataclass (``replace``:
    HuggingFace's ``ModelOutput``-like outputs)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        items = {k: detach_all(v) for k, v in value.items()}
        try:
            return type(value)(items)
        except TypeError:  # a dict subclass not built from pairs (defaultdict, ...)
            return items
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):  # a namedtuple
        return type(value)(*(detach_all(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(detach_all(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: detach_all(getattr(value, f.name)) for f in dataclasses.fields(value)
                  if f.init and hasattr(value, f.name)}
        try:
            return dataclasses.replace(value, **fields)
        except (TypeError, ValueError):  # a __post_init__ that refuses its own fields
            return _with_fields(value, fields)
    return value


def _with_fields(value: Any, fields: Dict[str, Any]) -> Any:
    """A shallow copy of ``value`` with ``fields`` set (also on a frozen dataclass), or
    ``value`` itself when it cannot be copied so (it then keeps its graph, never wrong)."""
    try:
        clone = copy.copy(value)
        for name, field_value in fields.items():
            object.__setattr__(clone, name, field_value)
    except Exception:  # noqa: BLE001 - any object: keeping the original is always right
        return value
    return clone


def is_input(layer: Any) -> bool:
    return layer is None or (isinstance(layer, str) and layer == "")


@dataclass
class ForwardPass:
    """One forward pass made by :func:`forward_pass`, ready to differentiate.

    Attributes
    ----------
    x : torch.Tensor
        The leaf the gradient with respect to the input is taken at (a detached alias of the
        caller's input; it requires grad only when a reading is the input).  The model itself
        ran on a copy (``x.clone()``), so in-place operations in its forward pass change neither
        ``x`` nor the caller's tensor.
    output : Any
        The model output.
    scores : torch.Tensor
        The tensor to differentiate (the output, or the callable target's scores).
    seed : torch.Tensor
        Its seed gradient.
    context : Any
        The context the forward ran in.
    reads : dict
        Label → the tensor read (the input ``x``, or the single recorded call of a layer).
    layers : dict
        Label → the layer as given.
    model_name : str
        For messages.
    batch_statistics : list of str
        The model's layers that normalise with batch statistics (see :meth:`backward`).
    readers : callable
        Label → the methods that read it under the current pass (``"grad_cam,
        linear_approx"``), named by the warnings about its gradient (asked only when one
        warns); ``""`` outside the engine.
    """

    x: torch.Tensor
    output: Any
    scores: torch.Tensor
    seed: torch.Tensor
    context: Any
    reads: Dict[str, torch.Tensor]
    layers: Dict[str, Any]
    model_name: str = "the model"
    batch_statistics: List[str] = field(default_factory=list)
    readers: Callable[[str], str] = field(default=lambda label: "")

    @property
    def samples(self) -> int:
        """The number of samples the seed has (one for a scalar seed)."""
        return self.seed.shape[0] if self.seed.dim() else 1

    def where(self, label: str) -> str:
        layer = self.layers[label]
        return "the input" if is_input(layer) else f"{label} {layer_label(layer)}"

    def grad(self, label: str, retain_graph: bool = False,
             check_rules: bool = True) -> torch.Tensor:
        """``∂(seed · scores) / ∂ reads[label]`` (under the context's rules).

        With ``check_rules`` and a rule context that counts its backward applications
        (:attr:`~.rules.ReLUContext.applied`), a backward pass that went through none of the
        replaced calls — the rectifiers do not lie between the read tensor and the output — is
        a :class:`ValueError`: the result would be the plain gradient under the method's name.
        """
        return self.grads([label], retain_graph, check_rules)[0]

    def grads(self, labels: Sequence[str], retain_graph: bool = False,
              check_rules: bool = True) -> List[torch.Tensor]:
        """:meth:`grad` of several readings, with the same checks for each.

        Without ``check_rules`` one backward pass reaches them all; with it, each reading gets
        a backward pass of its own, so that the rule check is exact for every one of them.
        """
        if check_rules and getattr(self.context, "applied", None) is not None \
                and len(labels) > 1:
            return [self.grads([label], retain_graph or i < len(labels) - 1, True)[0]
                    for i, label in enumerate(labels)]
        before = getattr(self.context, "applied", None) if check_rules else None
        found = self.backward([self.reads[label] for label in labels], retain_graph)
        for label, grad in zip(labels, found):
            self.check_gradient(label, grad)
        if before is not None and self.context.applied == before:
            ctx = self.context
            raise NoRuleAppliedError(
                f"{type(ctx).__name__} replaced {ctx.replaced} {ctx.replaces} call(s) in "
                f"{self.model_name}'s forward pass, but none of them lies between "
                f"{self.where(labels[0])} and the output (they act on constants, frozen "
                "parameters or a branch the target does not use), so the result would be the "
                f"plain gradient; this method needs {ctx.requirement} on that path")
        return [g for g in found if g is not None]  # each checked above

    def backward(self, tensors: List[torch.Tensor], retain_graph: bool
                 ) -> List[Optional[torch.Tensor]]:
        """The gradients of the seeded scores with respect to ``tensors``.

        When the model normalises with batch statistics (:attr:`batch_statistics`), sample
        ``i``'s score depends on every sample of the batch, and one backward pass of the summed
        scores would mix into sample ``j``'s map the other samples' scores.  Each sample then
        gets a backward pass of its own, seeded with its row only, and keeps its row: the map
        explains that sample's own score, in the batch it was computed with (``N`` backward
        passes instead of one).
        """
        n = self.samples
        if not self.batch_statistics or n == 1:
            return list(autograd_grad(self.scores, tensors, self.seed,
                                      retain_graph=retain_graph, allow_unused=True))
        rows = []
        for i in range(n):
            seed = torch.zeros_like(self.seed)
            seed[i] = self.seed[i]
            rows.append(autograd_grad(self.scores, tensors, seed, allow_unused=True,
                                      retain_graph=retain_graph or i < n - 1))
        return [None if any(r[k] is None for r in rows)
                else torch.stack([r[k][i] for i, r in enumerate(rows)])
                for k in range(len(tensors))]

    def check_reached(self, label: str) -> None:
        """For a reading whose gradient is not computed: that the scores depend on it (what a
        backward pass would have checked), or a :class:`ValueError`."""
        if not depends_on(self.scores, self.reads[label]):
            raise ValueError(f"the target scores do not depend on {self.where(label)}")

    def check_gradient(self, label: str, grad: Optional[torch.Tensor]) -> None:
        """A gradient that does not exist or is not finite is a :class:`ValueError`."""
        if grad is None:
            raise ValueError(f"the target scores do not depend on {self.where(label)}")
        if nonzero_finite_rows(grad, self.samples):
            return
        finite = torch.isfinite(grad).reshape(grad.shape[0] if grad.dim() else 1, -1).all(1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"the gradient with respect to {self.where(label)} is not finite (NaN or Inf) "
                f"for sample(s) {rows[:10]} although the scores are: {self.nonfinite_cause()}; "
                "a map from it would be meaningless")
        self.warn_zero(label, grad)

    def warn_zero(self, label: str, grad: torch.Tensor) -> None:
        """A :class:`~.maps.DegenerateMapWarning` naming the samples whose (finite) gradient
        is exactly zero: their map says nothing (rare path: the quick check found a zero)."""
        n = self.samples
        rows = zero_rows(grad) if grad.dim() and grad.shape[0] == n else (
            [] if bool((grad != 0).any()) else list(range(n)))
        if rows:
            ctx = self.context
            rules = "" if isinstance(ctx, NullContext) or ctx is None else (
                f", or {type(ctx).__name__}'s rules let no signal through (guided backprop "
                "when every path lowers the score)")
            layer = "" if is_input(self.layers[label]) else (
                ", or the score reads nothing of this layer's values (a transformer's patch "
                "tokens after its last attention, under a class-token head)")
            names = self.readers(label)
            who = f"{names}: " if names else ""
            warn_degenerate(
                f"{who}the (pseudo-)gradient of the target score with respect to "
                f"{self.where(label)} is "
                f"exactly zero for sample(s) {samples_text(rows)}: the score does not change "
                f"through autograd there ({FLAT_SCORE_CAUSES}, or every rectifier off{rules}"
                f"{layer}) — "
                "the map is all zeros; explain a score that varies smoothly with the input (e.g. "
                "the logit before the step), or use a perturbation method (occlusion, rise)")

    def nonfinite_cause(self) -> str:
        """Why a backward pass from finite scores can end non-finite: the model's own backward,
        or — under a rule context that passed its signal through operations its rules do not
        model — those operations, which rescale a signal that is not a gradient."""
        ctx = self.context
        unmodeled = dict(getattr(ctx, "unmodeled", None) or getattr(ctx, "unhandled", None)
                         or {})
        if unmodeled:
            names = ", ".join(f"{k} ×{v}" for k, v in sorted(unmodeled.items()))
            return (f"{type(ctx).__name__} sent its signal through operations its rules do not "
                    f"model ({names}), whose plain gradients can blow it up; the method is not "
                    "meant for such a model (try a plain-gradient method: gradient, grad_cam, "
                    "integrated_gradients)")
        return ("the model's backward pass meets 0 × inf or a non-differentiable point (sqrt or "
                "log at 0, division by zero)")


@contextlib.contextmanager
def forward_pass(model: nn.Module, input: torch.Tensor, target: Union[TargetType, Target],
                 layers: Dict[str, Union[str, nn.Module, None]], context: Any = None,
                 get_backward_gradient: Callable = get_backward_gradient,
                 rules: Sequence[Any] = ()) -> Iterator[ForwardPass]:
    """Run ``model(input)`` as every backprop method does and yield a :class:`ForwardPass`.

    Checks the model, input and target (parsed once with :func:`~.targets.parse_target`,
    unless already a :class:`~.targets.Target`); inside :func:`model_state_guard` (eval mode,
    restored on exit), with autograd enabled and the rule contexts of the caller suspended
    (:func:`~.context.suspend_rule_contexts`: the method's own rules decide), probes each layer
    of ``layers`` (label → name, module, or ``None``/``""`` for the input), runs the forward
    pass inside ``context`` on a copy of the input and computes the seed.  Probes are removed
    on exit, also when the body raises.

    Refused with a :class:`ValueError` before any work: a probed layer inside a TorchScript or
    compiled sub-module (hooks cannot see it), a rule context with such a sub-module anywhere
    in the model (the rules would silently not apply inside it), a channels-last batch.
    ``torch.compile(model)`` itself is explained through its original module.  After the
    forward pass: a :class:`RuleContext` that replaced nothing, and target scores that are not
    finite (NaN / Inf in the input or an overflow), raise :class:`ValueError` too.

    A rule context that can put its rules on the graph of a plain forward pass
    (:meth:`~.context.RuleContext.plain_forward`; ``rules`` are the rules the caller switches
    to between backward passes) is not entered when ``model``'s graph is known to allow it:
    the model runs plainly and the rules are attached to the graph (see :mod:`.graph_rules`);
    a graph that turns out not to allow it runs again inside the context.

    Backpropagation from ``scores`` reaches only what the readings need: the input requires
    grad only when it is read, a probed layer is a leaf of the graph, and
    ``torch.autograd.grad`` computes no parameter gradient.
    """
    check_model(model)
    compiled = unwrap_compiled(model)
    if compiled is not model:
        model = compiled
        layers = {label: strip_compiled_prefix(layer, model) for label, layer in layers.items()}
    check_input(input)
    check_function(get_backward_gradient, "get_backward_gradient")
    parsed = (target if isinstance(target, Target)
              else parse_target(target, input.shape[0]))
    modules = {label: None if is_input(layer) else get_module(model, layer)
               for label, layer in layers.items()}
    check_readable(model, input, modules, layers, context)
    reads_input = any(m is None for m in modules.values())
    # Reading layers only, with the plain gradient: no graph below the first layer reached
    # (GraphFromLayers), unless that leaves the scores without a graph (a reentrant checkpoint
    # or a custom autograd.Function around the layer): then the forward runs again, whole.
    # Attempts: (below_free, plain).  A rule context that can put its rules on the graph of a
    # plain forward pass (graph_rules) runs the model outside the context first, and inside it
    # when the graph turns out to need the context's view of the calls.
    attempts = ([(True, False), (False, False)] if not reads_input and context is None
                else [(False, True), (False, False)]
                if isinstance(context, RuleContext) and context.plain_forward(model, rules)
                else [(False, False)])
    if context is None:
        context = NullContext()
    if isinstance(context, RuleContext):
        context.warn_if_unused = False
    with suspend_rule_contexts(), model_state_guard(model, freeze=False), \
            torch.enable_grad():
        x = input.detach().requires_grad_(reads_input)
        for below_free, plain in attempts:
            # The model runs on a tensor of its own: an in-place operation in its forward pass
            # (x.sub_(mean).div_(std)) changes neither the caller's input nor the leaf ``x``.
            model_input = x.clone() if reads_input else input.detach().clone()
            graph_from = GraphFromLayers() if below_free else None
            probes: Dict[str, Probe] = {}
            try:
                attach_probes(modules, probes, graph_from)
                output = run_model(model, model_input, input,
                                   NullContext() if plain else context, below_free)
                reads = {label: x if module is None else single_call(probes[label], label,
                                                                      layers[label])
                         for label, module in modules.items()}
                scores, seed = seed_scores(model, input, output, parsed, get_backward_gradient)
                if below_free and not scores.requires_grad:
                    continue
                if plain and not context.attach(scores, model):
                    continue
                check_scores(context, model, scores, seed, input, reads,
                             describe_reads(modules, layers))
                if not plain and isinstance(context, RuleContext):
                    context.learn(scores, model)
                yield ForwardPass(x, output, scores, seed, context, reads, dict(layers),
                                  type(model).__name__, batch_statistics_layers(model))
                return
            finally:
                for probe in probes.values():
                    probe.remove()
                if graph_from is not None:
                    graph_from.remove()


def check_readable(model: nn.Module, input: torch.Tensor,
                   modules: Dict[str, Optional[nn.Module]], layers: Dict[str, Any],
                   context: Any) -> None:
    """What is refused before the forward pass: opaque (scripted / compiled) parts the rules or
    probes need to see, replicas run in worker threads, a channels-last batch."""
    check_visible(model, modules, layers, context)
    if context is not None or any(m is not None for m in modules.values()):
        check_data_parallel(model)  # replicas in worker threads: rules and probes miss them
    hint = layout_hint(model, input, certain_only=True)
    if hint is not None:
        raise ValueError(hint)


def attach_probes(modules: Dict[str, Optional[nn.Module]], probes: Dict[str, Probe],
                  graph_from: Optional["GraphFromLayers"]) -> None:
    """A probe on each module read (into ``probes``, so that the caller removes them whatever
    happens), after the hook that switches autograd on there, if any: the probe records the
    fresh leaf."""
    for label, module in modules.items():
        if module is not None:
            if graph_from is not None:
                graph_from.attach(module)
            # strict=False: a layer returning a tuple or an int tensor is recorded as it is,
            # and single_call refuses it naming the argument (the probe's own TypeError said
            # "Probe", naming no argument).
            probes[label] = Probe(module, "output", this_thread_only=True, accumulate=True,
                                  keep_grad=False, strict=False)


def describe_reads(modules: Dict[str, Optional[nn.Module]], layers: Dict[str, Any]) -> str:
    """``"the input or saliency_layer 'layer4'"``: what a forward pass reads, for messages."""
    return " or ".join("the input" if m is None else f"{label} {layer_label(layers[label])}"
                       for label, m in modules.items())


def check_scores(context: Any, model: nn.Module, scores: torch.Tensor, seed: torch.Tensor,
                 input: torch.Tensor, reads: Dict[str, torch.Tensor], where: str) -> None:
    """The checks after the forward pass: the rules reached the path, the scores have a graph
    to what is read and are finite."""
    if isinstance(context, RuleContext):
        # First what the context could not see (rectifiers made in worker threads), then what
        # it replaced: a model whose ReLUs all run in threads gets the thread error, not
        # "replaced no ReLU".
        context.check_path(scores, list(reads.values()), where)
        check_context_used(context, model, scores)
    if not scores.requires_grad:
        raise ValueError(
            f"the model output does not depend on {where} through autograd (is the layer on "
            "the path to the output? does the model detach its activations or run under "
            "torch.no_grad()?)")
    check_finite_scores(scores, seed, input)


def run_model(model: nn.Module, model_input: torch.Tensor, input: torch.Tensor, context: Any,
              below_free: bool) -> Any:
    """``model(model_input)`` inside ``context`` (under ``no_grad`` when ``below_free``: the
    :class:`GraphFromLayers` hooks switch autograd on), with a failure explained."""
    with context, (torch.no_grad() if below_free else contextlib.nullcontext()):
        return call_model(model, model_input, input)


def seed_scores(model: nn.Module, input: torch.Tensor, output: Any, target: Target,
                get_backward_gradient: Callable) -> Tuple[torch.Tensor, torch.Tensor]:
    """The scores to differentiate and their seed (:meth:`~.targets.Target.seed`), with the
    layout hint when the output's batch size is not the input's."""
    try:
        return target.seed(output, get_backward_gradient)
    except ValueError as exc:
        hint = layout_hint(model, input)
        if hint is None or "batch size" not in str(exc):
            raise
        raise ValueError(f"{exc}; {hint}") from exc


class GraphFromLayers:
    """Forward hooks that make autograd record from the first layer read on, not before.

    A layer method differentiates the score down to a layer's output only: the graph below it
    (and the activations it saves — parameters require grad, so autograd would record every
    operation) is never used.  :func:`forward_pass` therefore runs the model under
    :func:`torch.no_grad` and these hooks, at the first layer read that finishes, switch grad
    mode back on (thread-local: other threads are not affected; the ``no_grad`` block restores
    the caller's mode on exit, also on errors) and give that layer a fresh leaf
    ``output.detach().requires_grad_()``; the probe of the layer, attached after these hooks
    (:func:`attach_probes`), hands the network a copy of it, so that an in-place operation
    after the layer (``F.relu(x, inplace=True)``) is allowed.  Later layers read are left
    alone: their output already carries the graph from the first one.  Tensors computed below
    the layer that reach the output by another way (skip connections into the head) are
    constants with respect to the layer, as they are in the full graph, so the gradient is
    unchanged.
    """

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.handles: List[Any] = []

    def attach(self, module: nn.Module) -> None:
        self.handles.append(module.register_forward_hook(self.hook))

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if threading.get_ident() != self.thread or torch.is_grad_enabled() \
                or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        torch.set_grad_enabled(True)
        return output.detach().requires_grad_()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def check_visible(model: nn.Module, modules: Dict[str, Optional[nn.Module]],
                  layers: Dict[str, Any], context: Any) -> None:
    """Refuse what hooks and rule contexts cannot see: TorchScript and compiled modules.

    A probed layer that is, or lies inside, such a module cannot be recorded; a rule context
    cannot change the backward of the operations inside one, so a method with rules would
    silently mix its rule with the plain gradient there.  The plain gradient needs neither and
    works on scripted models.
    """
    opaque = opaque_modules(model)
    if not opaque:
        return

    def where(name: str) -> str:
        return "(the whole model)" if name == "" else repr(name)

    def advice(kind: str, name: str) -> str:
        if kind == "TorchScript":
            return ("explain the eager (Python) model instead: build it from its class and "
                    "load the weights, e.g. eager.load_state_dict(scripted.state_dict())")
        target = "model" if name == "" else f"model.{name}"
        return (f"explain the uncompiled module instead ({target}._orig_mod for "
                "torch.compile(...); a module compiled in place with .compile() cannot be "
                "unwrapped): torch.compile(model) itself is unwrapped automatically")

    for label, module in modules.items():
        if module is None:
            continue
        for name, om, kind in opaque:
            if module is om or any(module is m for m in om.modules()):
                inside = "" if module is om else "inside "
                raise ValueError(
                    f"{label} {layer_label(layers[label])} is {inside}the {kind} module "
                    f"{where(name)}: forward hooks cannot record its output there; "
                    + advice(kind, name))
    if isinstance(context, RuleContext):
        name, om, kind = opaque[0]
        raise ValueError(
            f"{type(model).__name__} contains the {kind} module {where(name)} "
            f"({type(om).__name__}): {type(context).__name__} cannot see the operations inside "
            f"it, so their backward rules would silently stay plain; " + advice(kind, name)
            + ". Plain-gradient methods at the input (gradient) work with it.")


def all_finite(tensor: torch.Tensor) -> bool:
    """A quick proof that every element is finite: a NaN or an infinity makes the sum
    non-finite, so a finite sum proves it.  ``False`` (a non-finite element, or a sum that
    overflowed) sends the caller to its exact, element-wise check."""
    if not tensor.is_floating_point():
        return False
    return math.isfinite(tensor.sum().item())  # two operations, where isfinite takes five


def nonzero_finite_rows(grad: torch.Tensor, n: int) -> bool:
    """A quick proof that ``grad`` is finite and that no sample's gradient (dim 0, ``n``
    samples) is all zero: every sample's sum is then finite and non-zero (one sum for one
    sample, the cost :func:`all_finite` had).  ``False`` — a non-finite element, a zero sum, a
    sum that overflows — sends the caller to its exact checks.  Each sum is tested on its own:
    their product underflows for a large batch of small gradients (64 sums of 1e-6), which
    would send every such call down the exact path."""
    if not grad.is_floating_point():
        return False
    if n == 1 or grad.dim() == 0 or grad.shape[0] != n:
        total = grad.sum().item()
        return math.isfinite(total) and total != 0.0
    # dims, not a reshape: a channels-last gradient is not copied
    sums = grad.sum(tuple(range(1, grad.dim()))).tolist()
    return all(s != 0.0 and math.isfinite(s) for s in sums)


def check_finite_scores(scores: torch.Tensor, seed: torch.Tensor, input: torch.Tensor) -> None:
    """A :class:`ValueError` naming ``input`` when a score to explain is NaN or infinite."""
    values = scores.detach()
    if all_finite(values):
        return
    finite = torch.isfinite(values)
    if seed.shape == values.shape:
        finite = finite | (seed == 0)
    ok = finite.reshape(values.shape[0], -1).all(dim=1) if values.dim() else finite.reshape(1)
    if bool(ok.all()):
        return
    rows = (~ok).nonzero().flatten().tolist()
    bad = int((~torch.isfinite(input)).sum()) if input.is_floating_point() else 0
    cause = (f"input holds {bad} NaN or infinite value(s): replace them (e.g. "
             "torch.nan_to_num(x)) or drop those samples" if bad else
             "input is finite, so the model overflows or divides by zero (try float32 / "
             "float64, or check its normalisation)")
    raise ValueError(
        f"the model's score for the target is not finite (NaN or Inf) for sample(s) "
        f"{rows[:10]}: {cause}; the gradient of a non-finite score is meaningless")


def check_debuggable(model: nn.Module) -> None:
    """``debug=True`` hooks every module: refuse TorchScript parts, which take no hooks."""
    scripted = [name or "(the whole model)" for name, _, kind in
                opaque_modules(unwrap_compiled(model)) if kind == "TorchScript"]
    if scripted:
        raise ValueError(
            f"debug=True records every module's output with forward hooks, which TorchScript "
            f"modules do not take ({', '.join(repr(n) for n in scripted[:3])}); pass "
            "debug=False, or explain the eager (Python) model")


def check_spatial(read: torch.Tensor, saliency_layer: Any, hint: str = "") -> None:
    """One rule for every method: a map ``(N, 1, *spatial)`` needs a read ``(N, C, *spatial)``;
    ``hint`` (a method's :attr:`~.method.BackpropMethod.layer_hint`) says what to choose."""
    if read.dim() < 3:
        raise ValueError(
            f"saliency_layer {layer_label(saliency_layer)} outputs shape {tuple(read.shape)}, "
            "which has no spatial dimensions: a saliency map is (N, 1, *spatial), so the layer "
            "must output (N, C, *spatial); "
            + (hint or "choose a convolutional layer, or the input (saliency_layer=None)"))


def _reentrant_checkpoint_message(context: RuleContext, model: nn.Module) -> str:
    name = type(context).__name__
    exact = (f"{context.refuses_checkpoints} refuses any activation checkpoint, so run the "
             "model without activation checkpointing for attribution"
             if context.refuses_checkpoints else
             "checkpoint with use_reentrant=False (the recomputed forward pass keeps the "
             f"rules of the original one, so {name} gives an exact map), or run the model "
             "without activation checkpointing for attribution")
    return (f"{name} replaced no {context.replaces} in {type(model).__name__}'s forward pass "
            "because the model runs them inside torch.utils.checkpoint(use_reentrant=True), "
            "whose first pass runs the checkpointed layers under torch.no_grad() (where no "
            f"rule applies) and which torch.autograd.grad cannot differentiate through: {exact}")


def check_context_used(context: RuleContext, model: nn.Module,
                       scores: Optional[torch.Tensor] = None) -> None:
    if context.replaced == 0:
        skipped = sum(getattr(context, "skipped", {}).values())
        if scores is not None and uses_reentrant_checkpoint(scores):
            raise NoRuleAppliedError(_reentrant_checkpoint_message(context, model))
        raise NoRuleAppliedError(
            f"{type(context).__name__} replaced no {context.replaces} in "
            f"{type(model).__name__}'s forward pass, so the result would be the plain gradient; "
            f"this method needs {context.requirement}" + (
                f" — the model uses {', '.join(sorted(context.unhandled))} instead"
                if context.unhandled else "") + (
                f" (the {skipped} call(s) it saw act on tensors autograd does not record: "
                "constants or frozen parameters, off the path from the tensor read to the "
                "output)" if skipped else "") + (
                f"; the model calls ATen operators (torch.ops.aten.*), which rule contexts do "
                f"not replace: {ATEN_ADVICE}" if calls_aten(model) else ""))
    if context.unhandled:
        seen = ", ".join(f"{k} ×{v}" for k, v in sorted(context.unhandled.items()))
        warn_caller(
            f"{type(context).__name__}: {type(model).__name__} also calls non-linearities the "
            f"rule does not cover ({seen}); those keep their plain gradient."
            + context.unhandled_advice(), UnhandledActivationWarning)
