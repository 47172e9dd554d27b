r"""Rule contexts: change the backward rule of some operations inside a ``with`` block.

A :class:`RuleContext` is a :class:`torch.overrides.TorchFunctionMode`: it sees every way a model
calls an operation (``nn.ReLU`` modules, ``F.relu``, ``torch.relu_``, ``Tensor.relu`` ...), only in
the thread that entered it, and it leaves nothing behind when the block ends (also when it
raises).  Concrete rules live in :mod:`.rules` (rectifiers) and in the method modules.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import sys
import threading
import warnings
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Literal,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .autograd_graph import ancestors, depends_on, gradient_node, graph_nodes, nodes_on_path
from .autograd_guards import check_transform_error
from .modules import current_scan

__all__ = ["ContextActiveError", "RuleContext", "NullContext", "Patch", "NoRuleAppliedWarning",
           "NoRuleAppliedError",
           "UnhandledActivationWarning", "TorchRayDifferenceWarning", "nodes_on_path",
           "graph_nodes", "depends_on", "check_data_parallel"]


class ContextActiveError(ValueError, RuntimeError):
    """A rule context object entered while it is already active (nesting needs a new object):
    a :class:`ValueError` about the caller's use, and a :class:`RuntimeError` as before."""


class NoRuleAppliedWarning(UserWarning):
    """A rule context saw a forward pass but replaced no call.

    The gradient computed from such a pass is the plain gradient, not the method's.
    """


class NoRuleAppliedError(ValueError):
    """A method's rules would not change its result: its rule context replaced no call of the
    model, or none of the calls it replaced lies between the tensor read and the output.

    The result would be the plain gradient under the method's name, so the call is refused.
    :func:`~torchray_like.attribution.explain.explain` adds which of its methods need the rules.
    """


class UnhandledActivationWarning(UserWarning):
    """A rule context saw non-linearities its rule does not cover (GELU, SiLU, ...).

    Those keep their plain gradient, so the map mixes the method's rule with the plain gradient.
    """


class TorchRayDifferenceWarning(UserWarning):
    """A call written for TorchRay gives a different number here, by design.

    The message says what differs and which call gives TorchRay's number.  Shown once per call
    site (Python's default warning filter); silence it with
    ``warnings.filterwarnings("ignore", category=TorchRayDifferenceWarning)``.
    """



# Non-linearities whose gradient a ReLU rule does not change: seeing one is worth a warning.
# Every spelling counts — module, functional, tensor method, in-place, ``torch.special`` and
# ``torch.ops.aten`` — and so do the elementwise functions activations are written with by hand
# (an erf-written GELU, ``x * expit(x)``, a sine activation).  Not listed on purpose: operations
# of normalisation and output layers (softmax, log, pow, sqrt, division), pooling, and every
# linear operation; they are no activation a rectifier rule could be expected to cover.
OTHER_ACTIVATION_NAMES: Dict[str, Tuple[str, ...]] = {
    # name in warnings: attribute names looked up on F, torch, torch.Tensor, torch.special and
    # torch.ops.aten (missing ones are skipped: the table works across PyTorch versions).
    "gelu": ("gelu",), "silu": ("silu",), "mish": ("mish",), "elu": ("elu", "elu_"),
    "selu": ("selu", "selu_"), "celu": ("celu", "celu_"),
    "leaky_relu": ("leaky_relu", "leaky_relu_"), "softplus": ("softplus",),
    "hardswish": ("hardswish", "hardswish_"), "hardsigmoid": ("hardsigmoid", "hardsigmoid_"),
    "prelu": ("prelu",), "rrelu": ("rrelu", "rrelu_"),
    "tanh": ("tanh", "tanh_"), "sigmoid": ("sigmoid", "sigmoid_", "expit"),
    "logsigmoid": ("logsigmoid", "log_sigmoid"), "softsign": ("softsign",), "glu": ("glu",),
    "hardshrink": ("hardshrink",), "softshrink": ("softshrink",), "tanhshrink": ("tanhshrink",),
    "abs": ("abs", "abs_", "absolute", "absolute_", "__abs__"),
    "erf": ("erf", "erf_", "erfc", "erfc_", "erfcx", "ndtr", "log_ndtr"),
    "exp": ("exp", "exp_", "exp2", "exp2_", "expm1", "expm1_"),
    "sin": ("sin", "sin_", "sinc", "sinc_"), "cos": ("cos", "cos_"),
    "atan": ("atan", "atan_", "arctan", "arctan_"),
}


def _activation_table() -> Dict[Any, str]:
    table: Dict[Any, str] = {}
    aten = torch.ops.aten
    for name, attributes in OTHER_ACTIVATION_NAMES.items():
        for attribute in attributes:
            for owner in (F, torch, torch.Tensor, torch.special):
                func = getattr(owner, attribute, None)
                if callable(func):
                    table[func] = name
            packet = getattr(aten, attribute, None) if not attribute.startswith("__") else None
            if packet is not None:
                table[packet] = name
                default = getattr(packet, "default", None)
                if default is not None:
                    table[default] = name
    return table


OTHER_ACTIVATIONS: Dict[Any, str] = _activation_table()


def records_gradient(args: tuple, kwargs: dict) -> bool:
    """Whether autograd records a call on these arguments through a tensor that is not a
    parameter: gradients enabled and an argument requiring grad (a parameter's own
    non-linearity, ``self.scale.exp()``, lies on no path from the input)."""
    if not torch.is_grad_enabled():
        return False
    for value in itertools.chain(args, kwargs.values()):
        if (isinstance(value, torch.Tensor) and value.requires_grad
                and not (value.grad_fn is None and isinstance(value, nn.Parameter))):
            return True
    return False


THREAD_ADVICE = (
    "run the whole forward pass in the calling thread: explain model.module rather than an "
    "nn.DataParallel wrapper (spread devices with DistributedDataParallel, one process per "
    "device), and run model-parallel branches sequentially while explaining")


#: What to do about a model that calls ATen operators (an exported program's module).
ATEN_ADVICE = (
    "explain the original model rather than torch.export(...).module() (or explain a "
    "torch.fx.symbolic_trace of it, which keeps the torch / torch.nn.functional calls)")


def calls_aten(model: nn.Module) -> bool:
    """Whether ``model`` is or holds a ``torch.fx`` graph whose nodes call ATen operators
    (``torch.ops.aten.*``: what ``torch.export(...).module()`` runs), for error messages."""
    graphs = [m.graph for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
    return any(type(node.target).__name__ in ("OpOverload", "OpOverloadPacket")
               for graph in graphs for node in graph.nodes)


def check_data_parallel(model: nn.Module) -> None:
    """Refuse ``nn.DataParallel`` wrappers that would run replicas in worker threads.

    ``nn.DataParallel`` over several devices copies the model and calls each copy in a thread
    of its own: rule contexts (thread-local) do not reach those threads and probes of the
    calling thread do not see the copies' layers, so a method with rules or reading a layer
    would silently use plain rules or fail to find the layer.  On one device (or the CPU)
    ``DataParallel`` calls the module directly, which is fine.  The methods that enter a rule
    context or read a layer call this before the forward pass.

    Raises
    ------
    ValueError
        Naming the wrapper and saying what to explain instead.
    """
    scan = current_scan(model)
    if scan is not None and not scan.data_parallel:
        return  # the call's one walk found no DataParallel over several devices
    for name, module in model.named_modules():
        devices = getattr(module, "device_ids", None) or []
        if isinstance(module, nn.DataParallel) and len(devices) > 1:
            target = "model.module" if name == "" else f"model.{name}.module"
            raise ValueError(
                f"{type(model).__name__} is wrapped in nn.DataParallel over {len(devices)} "
                f"devices ({name or 'the whole model'}): it runs copies of the model in worker "
                "threads, which rule contexts and layer probes do not reach, so the map would "
                f"silently mix rules or miss the layer; explain {target} (one device) instead, "
                "and use DistributedDataParallel (one process per device) to spread work")


class _ActiveContexts(threading.local):
    """The rule contexts entered by the current thread, outermost first."""

    def __init__(self) -> None:
        self.stack: List["RuleContext"] = []


_ACTIVE = _ActiveContexts()


def active_rule_contexts() -> Tuple["RuleContext", ...]:
    """The :class:`RuleContext` objects the current thread is inside, outermost first."""
    return tuple(_ACTIVE.stack)


class suspend_rule_contexts:  # noqa: N801 - a function-like context manager, named as one
    """Inside this block, the rule contexts the current thread entered before change nothing.

    The attribution methods run their forward pass in this block, so that a method's own rules
    decide its result: ``gradient(model, x, c)`` called inside ``with GuidedBackpropContext():``
    is the plain gradient, and ``guided_backprop`` inside ``with DeConvNetContext():`` is guided
    backpropagation.  Contexts entered *inside* the block work normally; the suspended ones see
    (and count) nothing until the block ends, and their refusal of activation checkpoints
    (:attr:`RuleContext.refuses_checkpoints`) is lifted meanwhile.  Other threads are not
    affected.
    """

    __slots__ = ("suspended", "guarded")

    # A class rather than a generator context manager: every method call enters it (twice on
    # the engine's path), and with no rule context entered it does nothing at all.
    def __enter__(self) -> Tuple["RuleContext", ...]:
        self.suspended = suspended = tuple(_ACTIVE.stack)
        if not suspended:
            return suspended
        # Checkpoint guards of the contexts suspended now for the first time (nested
        # suspensions leave them to the outermost), lifted innermost first and restored
        # outermost first.
        self.guarded = guarded = [c for c in suspended if c._suspended == 0
                                  and getattr(c, "_no_checkpoints", None) is not None]
        for context in suspended:
            context._suspended += 1
        for context in reversed(guarded):
            context._no_checkpoints.__exit__(None, None, None)
        return suspended

    def __exit__(self, *exc: Any) -> None:
        for context in self.suspended:
            context._suspended -= 1
        if self.suspended:
            for context in self.guarded:  # a guard is used once (a generator context manager)
                context._no_checkpoints = _refuse_checkpoints(context)


def _refuse_checkpoints(context: "RuleContext") -> Optional[Any]:
    """Refuse saved-tensor hooks (a non-reentrant checkpoint) in this thread for ``context``'s
    block when it sets :attr:`RuleContext.refuses_checkpoints`; the guard to exit, or ``None``.
    Hooks already active around the block (``save_on_cpu``) change no rule and stay."""
    if context.refuses_checkpoints is None:
        return None
    guard = torch.autograd.graph.disable_saved_tensors_hooks(
        f"{context.refuses_checkpoints} does not support torch.utils.checkpoint(use_reentrant="
        f"False) (or other saved-tensor hooks) inside {type(context).__name__}: the checkpoint "
        "recomputes the forward pass during backward, outside the context, where its rules do "
        "not apply. Run the model without activation checkpointing for attribution (it saves "
        "memory only while training).")
    try:
        guard.__enter__()
    except RuntimeError:
        return None
    return guard


class RuleContext(TorchFunctionMode):
    """Base of every context that swaps backward rules (thread-local, restorable, nestable).

    Subclasses fill ``self.handlers``, a mapping from a torch function (``F.relu``,
    ``torch.Tensor.relu_``, ``F.conv2d`` ...) to ``handler(func, args, kwargs) -> result``.  A
    handler computes exactly the plain forward and returns a tensor whose backward follows the
    rule; it reports what it replaced with :meth:`count`.  Every other call passes through
    unchanged.

    Inside the ``with`` block and in the entering thread only, every call of a handled function
    is replaced, whichever way the model makes it (module, functional, tensor method).  Other
    threads, and the code after the block, see plain PyTorch.  Contexts nest (the innermost
    handles a call first) and are removed even when the block raises.  Entering the same context
    object twice at once is a :class:`ContextActiveError` (a :class:`ValueError` and a
    :class:`RuntimeError`).  The attribution methods suspend the
    contexts their caller entered (:func:`suspend_rule_contexts`): a method's result depends on
    its own rules only.

    What a context cannot see: operations run inside TorchScript (``torch.jit.script`` /
    ``torch.jit.trace``) modules and functions, inside graphs compiled by ``torch.compile``, and
    in C++ extensions.  The methods refuse models containing scripted or compiled sub-modules
    when they need rules (see ``docs/troubleshooting.rst``); code entering a context by hand
    should check its model in the same way.

    Attributes
    ----------
    counts : dict
        How many calls of each kind were replaced, e.g. ``{"relu": 13, "relu6": 2}``.  Only
        calls that autograd records (gradients enabled and an input requiring grad) count:
        the others cannot change any gradient and run the plain operation.
    skipped : dict
        Calls of a handled kind that autograd does not record (under ``torch.no_grad()``, or on
        tensors that do not require grad, such as a frozen parameter or a constant).
    unhandled : dict
        Non-linearities seen that the rule does not cover (GELU, SiLU, sigmoid ...).
    calls : int
        How many torch calls the context saw in total (a forward pass makes many).
    inner_replaced : int
        Calls replaced by contexts entered inside this one's block (which this one then does
        not see): with them it does not warn that it replaced nothing.
    warn_if_unused : bool
        Warn with :class:`NoRuleAppliedWarning` when the block saw calls but replaced none (nor
        did a context nested in it), and
        with :class:`UnhandledActivationWarning` when it saw unhandled non-linearities.
    """

    #: Names used in warnings: what the context replaces.
    replaces = "rule"
    #: What a model needs for the context to apply (used in the error of the wrappers).
    requirement = "a model whose forward pass calls the operations the rule replaces"
    #: Whether to warn about activations listed in ``OTHER_ACTIVATIONS``.
    report_other_activations = False
    #: Autograd node kinds that mean "a call the context replaces, made outside it": kind ->
    #: ``test(node, context)`` (true when the node is such a call).  Used by :meth:`check_path`.
    escaped_kinds: Dict[str, Callable[[Any, "RuleContext"], bool]] = {}
    #: Autograd node kinds of non-linearities the rule does not cover: kind -> the names the
    #: context reports them under (the first is used for nodes it did not see).
    unhandled_kinds: Dict[str, Tuple[str, ...]] = {}
    #: Set (to the method's name) by contexts whose rules ``torch.utils.checkpoint(use_reentrant
    #: =False)`` would escape: its recomputation runs the forward pass again during backward,
    #: outside the block, with the plain operations, so their rules' saved tensors no longer
    #: match.  Saved-tensor hooks are then refused inside the block (thread-local), with a
    #: message naming the checkpoint, instead of PyTorch's CheckpointError after the pass.
    refuses_checkpoints: Optional[str] = None

    def __init__(self) -> None:
        super().__init__()
        self.handlers: Dict[Any, Callable] = {}
        self.counts: Dict[str, int] = {}
        self.skipped: Dict[str, int] = {}
        self.unhandled: Dict[str, int] = {}
        self.calls = 0
        self.inner_replaced = 0
        self.warn_if_unused = True
        #: Whether a skipped call ran inside torch.utils.checkpoint(use_reentrant=True)
        #: (looked for in the first _REENTRANT_LOOKS skipped calls made without autograd).
        self.saw_reentrant_checkpoint = False
        self._reentrant_looks = 0
        self._thread: Optional[int] = None
        self._suspended = 0

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def replaced(self) -> int:
        """Total number of replaced calls."""
        return sum(self.counts.values())

    def count(self, kind: str, n: int = 1) -> None:
        """Record that ``n`` calls of kind ``kind`` were replaced."""
        self.counts[kind] = self.counts.get(kind, 0) + n

    def skip(self, kind: str, n: int = 1) -> None:
        """Record that ``n`` calls of kind ``kind`` were seen that autograd does not record."""
        self.skipped[kind] = self.skipped.get(kind, 0) + n
        if (not self.saw_reentrant_checkpoint and self._reentrant_looks < _REENTRANT_LOOKS
                and not torch.is_grad_enabled()):
            # Only for the warning on exit: a reentrant checkpoint's first pass runs without
            # autograd and its backward recomputes the layers outside the context.
            self._reentrant_looks += 1
            self.saw_reentrant_checkpoint = in_reentrant_checkpoint()

    def unhandle(self, kind: str, n: int = 1) -> None:
        """Record ``n`` calls of a non-linearity the rule does not cover (warned about)."""
        self.unhandled[kind] = self.unhandled.get(kind, 0) + n

    def unhandled_advice(self) -> str:
        """What to use instead for the uncovered operations seen (appended to the warning that
        names them; empty when nothing better is known)."""
        return ""

    def reset_counts(self) -> None:
        """Forget what was counted so far."""
        self.counts.clear()
        self.skipped.clear()
        self.unhandled.clear()
        self.calls = 0
        self.inner_replaced = 0
        self.saw_reentrant_checkpoint = False
        self._reentrant_looks = 0

    # -- after the forward pass ----------------------------------------------------------------
    def check_path(self, output: torch.Tensor, reads: Sequence[torch.Tensor],
                   where: str = "the tensor read") -> None:
        """Check the graph between ``output`` and the tensors ``reads`` for what the context
        could not see (call it after the forward pass, before differentiating).

        A context reaches the calls of its own thread only.  Calls it replaces that were made
        elsewhere — in worker threads the forward pass started (model-parallel branches,
        ``nn.DataParallel`` over several devices, a ``concurrent.futures`` pool) — keep their
        plain backward, and the autograd graph shows them as plain nodes.  Any such node on a
        path from ``output`` to a read tensor is a :class:`ValueError` saying what to do;
        non-linearities the rule does not cover found there but not seen by the context are
        added to :attr:`unhandled` (so that the usual warning names them).

        Parameters
        ----------
        output : torch.Tensor
            The tensor differentiated (the target's scores).
        reads : sequence of torch.Tensor
            The tensors the gradient is taken at (the input, a probed layer's output).
        where : str
            How error messages name ``reads`` (e.g. ``"the input"``).
        """
        kinds = self.escaped_kinds.keys() | self.unhandled_kinds.keys()
        if not kinds or not isinstance(output, torch.Tensor):
            return
        escaped: Dict[str, int] = {}
        found: Set[str] = set()  # on a path that stops at the first tensor read
        for node in nodes_on_path(output, reads, kinds):
            kind = type(node).__name__
            test = self.escaped_kinds.get(kind)
            if test is not None and test(node, self):
                escaped[kind] = escaped.get(kind, 0) + 1
            names = self.unhandled_kinds.get(kind, ())
            found.update(names)
            if names and not any(n in self.unhandled for n in names):
                self.unhandle(names[0])
        self._forget_off_path(output, reads, found)
        if escaped:
            seen = ", ".join(f"{k} ×{v}" for k, v in sorted(escaped.items()))
            raise ValueError(
                f"{type(self).__name__}: {sum(escaped.values())} {self.replaces} call(s) on the "
                f"path from the output to {where} were made outside the context ({seen}): the "
                "model runs part of its forward pass in another thread (threading.Thread, a "
                "concurrent.futures pool, nn.DataParallel over several devices), where rule "
                "contexts do not reach, or calls ATen operators directly (torch.ops.aten.*, "
                "as torch.export(...).module() does), which they do not replace, so the result "
                f"would mix the rule with the plain gradient; {THREAD_ADVICE}; {ATEN_ADVICE}")

    def _forget_off_path(self, output: torch.Tensor, reads: Sequence[torch.Tensor],
                         found: Set[str]) -> None:
        """Drop from :attr:`unhandled` the non-linearities whose every node lies off the paths
        from ``output`` to the tensors read (below the layers read, on a branch the target
        does not use): they do not touch the map, and naming them would say it mixes the rule
        with their plain gradient.  A path may pass through another tensor read (contrastive
        excitation backprop reads the contrast layer and, below it, the input).  Only kinds
        seen as nodes of the graph are dropped; a call the graph does not show (no node kind
        known for it, a forward pass under ``no_grad`` below the layer) stays named.  ``found``:
        names already seen on a path (no second walk when every name is)."""
        known = {n for names in self.unhandled_kinds.values() for n in names}
        doubtful = {n for n in self.unhandled if n in known and n not in found}
        stops = {id(gradient_node(t)) for t in reads
                 if isinstance(t, torch.Tensor) and t.requires_grad}
        if not doubtful or output.grad_fn is None or not stops:
            return
        nodes = {id(node): node for node in graph_nodes(output.grad_fn)}
        # The nodes backward goes through: those strictly above a tensor read (the node that
        # made a read tensor counts only when another read lies below it).
        used = ancestors(nodes, stops, through_stops=True)
        seen: Set[str] = set()
        kept: Set[str] = set()
        for key, node in nodes.items():
            names = self.unhandled_kinds.get(type(node).__name__, ())
            seen.update(names)
            if key in used:
                kept.update(names)
        for name in (doubtful & seen) - kept:
            del self.unhandled[name]

    def plain_forward(self, model: nn.Module, rules: Sequence[Any] = ()) -> bool:
        """Whether a method may run ``model``'s forward pass outside the context and
        :meth:`attach` the rules to its graph afterwards (the fast path of
        :class:`~.rules.ReLUContext`); the base class: never."""
        return False

    def attach(self, output: Any, model: nn.Module) -> bool:
        """Apply the rules to the graph of ``output`` computed outside the context; ``False``
        when that cannot be done exactly (the base class: never)."""
        return False

    def learn(self, output: Any, model: nn.Module) -> None:
        """Called after a forward pass inside the context that passed every check, with the
        differentiated tensor: a context may remember whether :meth:`plain_forward` can serve
        ``model`` next time (the base class does not)."""

    def switch_rule(self, rule: Any) -> None:
        """Make the nodes of the last forward pass apply ``rule`` in the next backward passes
        (``retain_graph=True``): one forward serves several rules.  Contexts whose rules are
        values read at backward time override this (:class:`~.rules.ReLUContext`,
        :class:`~.lrp.LRPContext`)."""
        raise TypeError(f"{type(self).__name__} cannot switch its rule after the forward pass")

    # -- mode protocol -----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._suspended:
            return func(*args, **kwargs)
        self.calls += 1
        handler = self.handlers.get(func)
        if handler is not None:
            try:
                return handler(func, args, kwargs)
            except RuntimeError as exc:  # a torch.func transform: say so (ValueError)
                check_transform_error(exc, type(self).__name__)
                raise
        if self.report_other_activations:
            name = OTHER_ACTIVATIONS.get(func)
            if name is not None and records_gradient(args, kwargs):
                self.unhandle(name)
        return func(*args, **kwargs)

    def __enter__(self):
        if self._thread is not None:
            raise ContextActiveError(
                f"{type(self).__name__} is already active; create a new context object to nest "
                "contexts")
        self._thread = threading.get_ident()
        self.reset_counts()
        self._suspended = 0
        out = super().__enter__()
        _ACTIVE.stack.append(self)
        self._no_checkpoints = _refuse_checkpoints(self)
        return out

    def __exit__(self, exc_type, exc_val, exc_tb):
        guard, self._no_checkpoints = getattr(self, "_no_checkpoints", None), None
        try:
            if guard is not None:
                guard.__exit__(None, None, None)
            super().__exit__(exc_type, exc_val, exc_tb)
        finally:
            self._thread = None
            stack = _ACTIVE.stack
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is self:
                    del stack[i]
                    break
            for outer in stack:  # what they did not see, because this one replaced it
                if not outer._suspended:  # (a method's own context, inside a call, is not)
                    outer.inner_replaced += self.replaced + self.inner_replaced
        if exc_type is None and self.warn_if_unused:
            self._warn()
        return False

    def _warn(self) -> None:
        name = type(self).__name__
        others = ", ".join(f"{k} ×{v}" for k, v in sorted(self.unhandled.items()))
        if self.saw_reentrant_checkpoint:
            self._warn_reentrant(name)
        elif self.calls and not self.replaced and not self.inner_replaced:
            skipped = sum(self.skipped.values())
            why = (f"the {skipped} it saw are not recorded by autograd (gradients disabled, or "
                   "inputs that do not require grad such as constants or frozen parameters)"
                   if skipped else "the model uses none")
            warnings.warn(
                f"{name} saw {self.calls} torch calls but replaced no {self.replaces}: {why}"
                + (f" (it calls {others})" if others else "") + ", so "
                "gradients computed from this pass are plain gradients, not the method's.",
                NoRuleAppliedWarning, stacklevel=3)
        elif self.unhandled:
            warnings.warn(
                f"{name} replaced {self.replaced} {self.replaces} calls, but the model also calls "
                f"non-linearities the rule does not cover ({others}); those keep their plain "
                "gradient." + self.unhandled_advice(), UnhandledActivationWarning, stacklevel=3)


    def _warn_reentrant(self, name: str) -> None:
        """The warning for a block that ran layers inside a reentrant checkpoint."""
        fix = ("checkpoint with use_reentrant=False (its recomputation keeps the context's "
               "rules)" if self.refuses_checkpoints is None else
               f"run the model without activation checkpointing ({self.refuses_checkpoints} "
               "supports no checkpoint)")
        done = ("it replaced no other, so gradients computed from this pass are plain "
                "gradients, not the method's" if not (self.replaced or self.inner_replaced)
                else f"only the {self.replaced + self.inner_replaced} calls outside it follow "
                     "the method, the map mixes both")
        warnings.warn(
            f"{name}: operations it replaces ({self.replaces}) ran inside torch.utils.checkpoint("
            "use_reentrant=True), whose first pass runs without autograd and whose backward "
            f"recomputes them outside the context, so they keep their plain gradient; {done}. "
            f"To explain the model, {fix}.", NoRuleAppliedWarning, stacklevel=4)


#: How many skipped calls a context looks at for a reentrant checkpoint (a stack walk each).
_REENTRANT_LOOKS = 64


def in_reentrant_checkpoint(depth: int = 64) -> bool:
    """Whether this thread runs inside ``torch.utils.checkpoint(use_reentrant=True)``'s forward
    pass (its function's frame is on the stack, within ``depth`` frames); ``False`` where
    PyTorch has no such function."""
    function = getattr(torch.utils.checkpoint, "CheckpointFunction", None)
    code = getattr(getattr(function, "forward", None), "__code__", None)
    frame: Optional[Any] = sys._getframe(1)
    while code is not None and frame is not None and depth > 0:
        if frame.f_code is code:
            return True
        frame, depth = frame.f_back, depth - 1
    return False


class NullContext(contextlib.AbstractContextManager):
    """A context that changes nothing (the plain gradient); TorchRay's ``NullContext``."""

    def __exit__(self, *exc) -> Literal[False]:
        return False


_NO_CALLABLE = object()


class Patch:
    """Temporarily replace an attribute.

    ``Patch("torch.relu", new_callable)`` (TorchRay's form: a dotted name, resolved with
    :meth:`resolve`) or ``Patch(module_or_object, "name", new)``.  Unlike the rule contexts
    this is *global* (every thread sees the patch) and sees only calls made through that
    attribute — prefer :class:`RuleContext` for changing backward rules.  Usable as a context
    manager; :meth:`remove` restores the original (also done when the patch is collected).
    """

    @staticmethod
    def resolve(target: str) -> Tuple[Any, str]:
        """Split a dotted name into ``(object, attribute name)``, importing modules as needed.

        ``"torch.nn.functional.relu"`` gives ``(torch.nn.functional, "relu")`` and
        ``"torch.Tensor.relu"`` gives ``(torch.Tensor, "relu")``.  Raises :class:`ValueError`
        when a component can be neither imported nor found as an attribute.
        """
        if not isinstance(target, str) or "." not in target.strip("."):
            raise ValueError(
                f"Patch.resolve: expected a dotted name such as 'torch.relu', got {target!r}")
        path, attribute = target.rsplit(".", 1)
        parts = path.split(".")
        try:
            obj = importlib.import_module(parts[0])
        except ImportError as exc:
            raise ValueError(f"Patch.resolve: cannot import {parts[0]!r} of {target!r}") from exc
        done = parts[0]
        for part in parts[1:]:
            done = f"{done}.{part}"
            if hasattr(obj, part):
                obj = getattr(obj, part)
                continue
            try:
                obj = importlib.import_module(done)
            except ImportError as exc:
                raise ValueError(
                    f"Patch.resolve: {done!r} (in {target!r}) is neither an attribute nor an "
                    "importable module") from exc
        return obj, attribute

    def __init__(self, target: Any, *args: Any, new_callable: Any = _NO_CALLABLE) -> None:
        if new_callable is not _NO_CALLABLE:  # TorchRay's keyword: Patch(target, new_callable=f)
            args = args + (new_callable,)
        if len(args) == 1:
            if not isinstance(target, str):
                raise TypeError(
                    "Patch(target, new_callable): target must be a dotted name such as "
                    f"'torch.relu', got {type(target).__name__}; to patch an attribute of an "
                    "object use Patch(obj, 'name', new)")
            obj, name = self.resolve(target)
            new = args[0]
        elif len(args) == 2:
            obj, (name, new) = target, args
        else:
            raise TypeError(
                "Patch takes (dotted_name, new_callable) or (object, attribute_name, new), got "
                f"{1 + len(args)} arguments")
        if not hasattr(obj, name):
            raise ValueError(f"Patch: {obj!r} has no attribute {name!r}")
        self.target, self.name = obj, name
        self.original = getattr(obj, name)
        setattr(obj, name, new)
        self._active = True

    def remove(self) -> None:
        """Restore the original attribute (idempotent)."""
        if self._active:
            setattr(self.target, self.name, self.original)
            self._active = False

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> Literal[False]:
        self.remove()
        return False

    def __del__(self) -> None:
        if getattr(self, "_active", False):  # __init__ may have raised before patching
            self.remove()
