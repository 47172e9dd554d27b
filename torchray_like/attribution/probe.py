r"""Reading a layer: find a sub-module by name and record its activation and gradient.

:class:`Probe` follows TorchRay's observable behaviour: it records the module's *input* by
default, ``data`` holds the tensors of the latest forward pass (every call of a shared module
within that pass, in call order), and ``contrast`` / ``non_negative_contrast`` change the
gradient that flows back through the probed tensor (the manual contrastive excitation-backprop
recipe).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import threading
import weakref
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.nn.modules import module as module_hooks
from torch.utils.hooks import RemovableHandle

from .autograd_guards import TransformNotSupportedError, is_functorch_tensor
from .context import THREAD_ADVICE
from .modules import current_scan, iter_modules
from .state import autograd_grad

__all__ = ["get_module", "Probe", "attach_debug_probes"]


def get_module(model: nn.Module, module: Union[str, nn.Module, None]) -> nn.Module:
    """Return the sub-module of ``model`` called ``module`` (a dotted name such as
    ``"features.11"`` or ``"layer4.1.conv2"``), or ``module`` itself when it is a module of
    ``model``.  ``""`` names ``model`` itself.

    Unlike TorchRay, whose ``get_module`` returns ``None`` for an unknown name (which then fails
    later, far from the typo), an unknown name is an error listing the closest names.

    Raises
    ------
    ValueError
        When no sub-module has that name (the closest existing names are listed) or the module
        given is not part of ``model``.
    TypeError
        When ``module`` is neither a string nor a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_module: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(module, nn.Module):
        scan = current_scan(model)  # the call's one walk, when there is one
        if any(m is module for m in (scan.modules if scan is not None else iter_modules(model))):
            return module
        raise ValueError(
            f"get_module: the module {type(module).__name__} given is not a sub-module of the "
            f"model {type(model).__name__}")
    if not isinstance(module, str):
        raise TypeError(
            f"get_module: module must be a dotted name or an nn.Module, got {module!r}")
    found = _lookup(model, module)
    if found is not None:
        return found
    names = dict(model.named_modules())
    if module in names:
        return names[module]
    close = difflib.get_close_matches(module, [n for n in names if n], n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if n and (module in n or n.startswith(module.split(".")[0]))][:5]
    hint = f"; closest names: {', '.join(repr(c) for c in close)}" if close else (
        f"; top-level names: {', '.join(repr(n) for n in names if n and '.' not in n)}")
    raise ValueError(f"get_module: the model has no module named {module!r}{hint}")


def _lookup(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The module at the dotted path ``name`` by following the children tables (what
    ``named_modules`` would find, without naming every module), or ``None``."""
    module: Optional[nn.Module] = model
    for part in name.split(".") if name else ():
        children = getattr(module, "_modules", None)
        if not isinstance(children, dict):  # TorchScript's table: the slow path decides
            return None
        module = children.get(part)
    return module


# ---------------------------------------------------------------------------------------------
# Forward passes: which module calls belong to the same pass
# ---------------------------------------------------------------------------------------------


class _PassTracker:
    """Numbers forward passes, per thread.

    A *pass* starts when a module is called while no other module call is running in the same
    thread (the outermost call: ``model(x)``) and ends when that call returns or raises.  Two
    global module hooks keep a per-thread call depth; they are installed while at least one
    probe needs them and removed with the last one, so a program without such probes pays
    nothing.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.generation = 0
        self.handles: List[Any] = []
        self.local = threading.local()
        self.counter = itertools.count(1)

    def acquire(self) -> None:
        with self.lock:
            if self.users == 0:
                # A new generation invalidates any depth left over from an earlier install
                # (hooks removed in the middle of a forward pass).
                self.generation += 1
                self.handles = [
                    module_hooks.register_module_forward_pre_hook(self._enter),
                    module_hooks.register_module_forward_hook(self._leave, always_call=True),
                ]
            self.users += 1

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                for handle in self.handles:
                    handle.remove()
                self.handles = []

    def _depth(self) -> int:
        local = self.local
        return local.depth if getattr(local, "generation", None) == self.generation else 0

    def _enter(self, module, args) -> None:
        local = self.local
        depth = self._depth()
        if depth == 0:
            local.epoch = next(self.counter)
        local.depth = depth + 1
        local.generation = self.generation

    def _leave(self, module, args, output) -> None:
        local = self.local
        local.depth = max(self._depth() - 1, 0)
        local.generation = self.generation

    def current(self) -> int:
        """The number of the latest pass started in this thread (0 before any)."""
        return getattr(self.local, "epoch", 0)


_PASSES = _PassTracker()


# ---------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------


class _ContrastHook:
    """Tensor hook of one recorded call: subtracts the probe's contrast from the gradient.

    The contrast is read at backward time, so it may be set after the forward pass.  The probe
    is held weakly.
    """

    __slots__ = ("probe", "index")

    def __init__(self, probe: "Probe", index: int) -> None:
        self.probe = weakref.ref(probe)
        self.index = index

    def __call__(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        probe = self.probe()
        if probe is None or probe.contrast is None:
            return None
        contrast = probe.contrast
        if isinstance(contrast, (list, tuple)):
            # One per recorded call: a longer list (contrasts of another pass) was silently
            # cut to the calls there are.
            if self.index >= len(contrast) or len(contrast) != len(probe.data):
                raise ValueError(
                    f"Probe.contrast holds {len(contrast)} tensor(s) but "
                    f"{type(probe.module).__name__} was called {len(probe.data)} time(s) (call "
                    f"{self.index} is being backpropagated); give one contrast per recorded "
                    "call (or a single tensor for all calls)")
            contrast = contrast[self.index]
        if not isinstance(contrast, torch.Tensor):
            raise TypeError(
                f"Probe.contrast must be a tensor or a list of tensors, got "
                f"{type(contrast).__name__}")
        try:
            shape = torch.broadcast_shapes(contrast.shape, grad.shape)
        except RuntimeError:
            shape = None
        if shape != grad.shape:
            raise ValueError(
                f"Probe.contrast has shape {tuple(contrast.shape)}, which does not match the "
                f"gradient of the probed tensor, shape {tuple(grad.shape)}")
        out = grad - contrast.detach().to(device=grad.device, dtype=grad.dtype)
        if probe.non_negative_contrast:
            out = out.clamp(min=0)
        return out


class _ProbeHook:
    """The hook a :class:`Probe` installs.  It holds the probe weakly: no cycle through the
    module's hook table keeps the probe (and the tensors it recorded) alive."""

    __slots__ = ("probe",)

    def __init__(self, probe: "Probe") -> None:
        self.probe = weakref.ref(probe)

    @staticmethod
    def _record(probe: "Probe", value: Any, alias: bool = False) -> Any:
        if not probe.accumulate:
            epoch = _PASSES.current()
            if epoch != probe._epoch:
                probe._epoch = epoch
                probe.data = []
        if not isinstance(value, torch.Tensor):
            if not probe.strict:
                probe.data.append(value)
                return None
            raise TypeError(
                f"Probe: the {probe.target} of {type(probe.module).__name__} is a "
                f"{type(value).__name__}, not a tensor; probe a module whose {probe.target} is "
                "a tensor")
        if not (torch.is_grad_enabled() and value.is_floating_point()):
            probe.data.append(value)
            # The network continues from a copy, so an in-place operation downstream cannot
            # change the recorded values.
            return value.clone()
        if probe.keep_grad and is_functorch_tensor(value):
            raise TransformNotSupportedError(
                f"Probe on {type(probe.module).__name__}: the model runs under a torch.func "
                "transform (torch.func.grad, vjp, jacrev, vmap), where the probe cannot keep the "
                "recorded tensor's gradient (.grad); run the forward pass without the transform "
                "and read the gradient with torch.autograd.grad(output, probe.data)")
        rec = value
        if not rec.requires_grad:
            # Frozen model or input: the recorded tensor becomes a leaf, so backward both reaches
            # it and stops there.
            rec = value.detach().requires_grad_(True)
        else:
            if alias:
                # The module returned its input (nn.Identity, eval-mode Dropout, an in-place
                # module), a tensor other code may also use (a skip connection): read a copy
                # of its own, so that its gradient is only what flows through this layer.
                rec = value.clone()
            elif value.is_leaf and probe.keep_grad:
                # The caller's own tensor (the model's input x): a leaf's .grad accumulates
                # over passes and its hooks outlive the probe, so read a view of its own
                # (the methods' own probes keep no gradient: they read the tensor itself).
                rec = value.view_as(value)
            if probe.keep_grad:
                rec.retain_grad()
        if probe.keep_grad:
            rec.register_hook(_ContrastHook(probe, len(probe.data)))
        probe.data.append(rec)
        # The network continues from a copy: an in-place operation downstream (VGG's
        # ReLU(inplace=True)) then cannot change the recorded values or its gradient.
        return rec.clone()

    def __call__(self, module, inputs, output=None):
        probe = self.probe()
        if probe is None or module is not probe.module:
            # A copy of the module (copy.deepcopy of the model copies its hook table, and the
            # weak reference to the probe with it): its calls are another model's tensors, and
            # the copy's hook is dead, so it leaves the copy's hook table at its first call.
            # (No cleaner moment exists: the table's deepcopy copies every hook it holds, and
            # a hook's __deepcopy__ cannot drop its entry.)  A dead probe's own module lost
            # the hook when the probe was finalized.
            self._unhook(module)
            return None
        if probe.thread is not None and probe.thread != threading.get_ident():
            probe.other_thread_calls += 1  # said in the error when this thread saw no call
            return None
        if _in_backward() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                  for t in probe.data):
            # torch.utils.checkpoint(use_reentrant=False) recomputing its region during
            # backward: backward reaches the tensors recorded in the forward pass, keep them.
            # (A reentrant checkpoint's first pass ran under no_grad: its recomputation, whose
            # tensors do get the gradient, replaces that reading as a new pass.)
            return None
        if probe.target == "output":
            return self._record(probe, output, any(output is t for t in _tensors(inputs)))
        if not inputs:
            raise TypeError(
                f"Probe: {type(module).__name__} was called without a positional input")
        new = self._record(probe, inputs[0])
        return None if new is None else (new,) + tuple(inputs[1:])

    def _unhook(self, module: nn.Module) -> None:
        """Remove this hook from ``module``'s forward (pre-)hook tables (PyTorch's module
        call copies a table's items before running them, so removing from inside is safe)."""
        for table in (getattr(module, "_forward_hooks", None),
                      getattr(module, "_forward_pre_hooks", None)):
            if isinstance(table, dict):
                for key in [k for k, hook in table.items() if hook is self]:
                    del table[key]


def _in_backward() -> bool:
    """Whether this thread is running a backward pass (PyTorch has no public query; without
    the private one, ``False``: the probe then behaves as before the check was added)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _tensors(values: Any) -> Iterator[Any]:
    """The tensors among a module's positional inputs (also inside tuples and lists)."""
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from _tensors(value)
        else:
            yield value


def _release(handle: Any, tracked: bool) -> None:
    handle.remove()
    if tracked:
        _PASSES.release()


class Probe:
    """Record a module's input (or output) and, after backward, its gradient.

    Parameters
    ----------
    module : torch.nn.Module
        The module to watch.
    target : {"input", "output"}
        What to record: the module's first positional input (the default, as in TorchRay) or
        its output.
    this_thread_only : bool
        Record only calls made by the thread that created the probe (the library's own
        wrappers use this, so that other threads running the same model do not add readings).
    accumulate : bool
        ``False`` (TorchRay's behaviour): ``data`` holds the calls of the latest forward pass
        only.  ``True``: every call is appended, across passes, until :meth:`remove`.
    strict : bool
        ``True``: a non-tensor input/output is a :class:`TypeError`; ``False``: it is recorded
        as it is (the debug probes of :func:`attach_debug_probes` use this).
    keep_grad : bool
        ``True``: after backward each recorded tensor holds its ``.grad``, and :attr:`contrast`
        applies.  ``False``: the tensors are only recorded, for a reader that takes their
        gradient with :func:`torch.autograd.grad` (the methods' own probes: no gradient kept,
        no hook run in backward).

    Attributes
    ----------
    data : list of torch.Tensor
        The tensors recorded in the latest forward pass, one per call of the module, in call
        order (a module called several times in one forward, such as torchvision ResNet's
        shared ``relu``, records every call).  A new forward pass replaces the list.  A pass
        is the outermost module call of the thread (``model(x)``); calling a probed module on
        its own is a pass of its own.  After backward each tensor has its ``.grad``.  When the
        recorded tensor did not require grad (frozen model), it is recorded as a new leaf that
        does, so backward reaches it and stops there.
    contrast : torch.Tensor, list of torch.Tensor or None
        When set, the gradient flowing back through the probed tensor becomes
        ``grad - contrast`` (one tensor per recorded call, or one tensor for all calls; it must
        broadcast to the gradient's shape).  It is read at backward time and acts on what
        continues below the probe (the recorded tensor's ``.grad`` shows the difference too).
        This is how the contrastive variant of excitation backprop is assembled by hand:
        record the dual (contrast) gradient at a layer in a first pass, set it as ``contrast``,
        and backpropagate the target in a second pass.
    non_negative_contrast : bool
        With ``contrast`` set, keep only the positive part: ``max(grad - contrast, 0)``.
    hook : torch.utils.hooks.RemovableHandle or None
        The module hook the probe installed (``None`` once removed).
    inplace : bool
        Whether the module works in place (``nn.ReLU(inplace=True)``).  The probe is safe either
        way: the network continues from a copy of the recorded tensor, so neither the recorded
        values nor their gradient are changed by an in-place operation.
    other_thread_calls : int
        With ``this_thread_only``: how many calls made by other threads were ignored (a model
        running this module in a worker thread records nothing here).

    Notes
    -----
    An output probe records the module's *own* output.  When the module returns its input
    (``nn.Identity``, eval-mode ``nn.Dropout``, in-place modules), the probe records a copy,
    so that the recorded gradient is what flows through the module only, not what reaches the
    same tensor through a skip connection.
    Likewise an input probe whose input is a leaf tensor (the model's input ``x``) records a
    view of it: its ``.grad`` is this pass's gradient through the module (``x.grad`` itself
    accumulates over passes), and no hook is left on ``x``.

    The probe holds no reference cycle: dropping it removes its hook; :meth:`remove` (or leaving
    its ``with`` block) removes the hook and frees the data.
    """

    def __init__(self, module: nn.Module, target: str = "input",
                 this_thread_only: bool = False, accumulate: bool = False,
                 strict: bool = True, keep_grad: bool = True) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"Probe: module must be a torch.nn.Module, got {type(module).__name__}")
        if target not in ("output", "input"):
            raise ValueError(f"Probe: target must be 'output' or 'input', got {target!r}")
        self.module = module
        self.target = target
        self.thread = threading.get_ident() if this_thread_only else None
        self.accumulate = bool(accumulate)
        self.strict = bool(strict)
        self.keep_grad = bool(keep_grad)
        self.data: List[Any] = []
        self.contrast: Union[torch.Tensor, Sequence[torch.Tensor], None] = None
        self.non_negative_contrast = False
        self.inplace = bool(getattr(module, "inplace", False))
        self.other_thread_calls = 0
        self._epoch = -1
        hook = _ProbeHook(self)
        if target == "output":
            handle = module.register_forward_hook(hook)
        else:
            handle = module.register_forward_pre_hook(hook)
        tracked = not self.accumulate
        if tracked:
            _PASSES.acquire()
        self.hook: Optional[RemovableHandle] = handle
        self._finalizer = weakref.finalize(self, _release, handle, tracked)

    @property
    def active(self) -> bool:
        """Whether the hook is still installed."""
        return self._finalizer.alive

    def remove(self, free: bool = True) -> None:
        """Remove the hook (idempotent) and, unless ``free`` is false, the recorded data."""
        self._finalizer()
        self.hook = None
        if free:
            self.data = []
            self.contrast = None

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc: Any) -> Literal[False]:
        self.remove()
        return False

    def __repr__(self) -> str:
        return (f"Probe({type(self.module).__name__}, target={self.target!r}, "
                f"calls={len(self.data)}, active={self.active})")


def attach_debug_probes(model: nn.Module, debug: bool = False) -> "OrderedDict[str, Probe]":
    """Attach an output :class:`Probe` to every named sub-module of ``model``.

    Returns an ordered dict name → probe, in :meth:`~torch.nn.Module.named_modules` order
    (empty when ``debug`` is false, as in TorchRay).  Modules whose output is not a tensor are
    recorded as they are.  Remove them with ``for p in probes.values(): p.remove()``.
    """
    if not debug:
        return OrderedDict()
    return OrderedDict((name, Probe(m, "output", strict=False))
                       for name, m in model.named_modules() if name)


@contextlib.contextmanager
def debug_probes(model: nn.Module, debug: bool) -> Iterator["OrderedDict[str, Probe]"]:
    """:func:`attach_debug_probes` for one call of a method in this thread: the hooks are
    removed on exit (also on errors) and the probes keep what they recorded."""
    probes: "OrderedDict[str, Probe]" = OrderedDict()
    try:
        if debug:
            for name, m in model.named_modules():
                if name:
                    probes[name] = Probe(m, "output", this_thread_only=True, accumulate=True,
                                         strict=False)
        yield probes
    finally:
        for probe in probes.values():
            probe.remove(free=False)


def fill_probe_gradients(probes: Dict[str, Probe], scores: torch.Tensor,
                         seed: torch.Tensor) -> None:
    """Set ``.grad`` of every tensor the probes recorded to ``∂(seed · scores)/∂tensor``
    (``None`` where the scores do not depend on it).  Frees the graph."""
    tensors = [t for p in probes.values() for t in p.data
               if isinstance(t, torch.Tensor) and t.requires_grad]
    if not tensors:
        return
    grads = autograd_grad(scores, tensors, seed, allow_unused=True)
    for t, g in zip(tensors, grads):
        t.grad = g


def layer_label(name: Any) -> str:
    """How error messages name a layer given by name or as a module."""
    return repr(name) if isinstance(name, str) else type(name).__name__


def _container_hint(module: Any, name: Any) -> str:
    """Why a module holding sub-modules can be skipped: a traced graph calls its leaves."""
    path, leaf = [], module
    while isinstance(leaf, nn.Module) and leaf._modules:
        last = next(reversed(leaf._modules))
        path.append(last)
        leaf = leaf._modules[last]
    if not path:
        return ""
    prefix = f"{name}." if isinstance(name, str) and name else ""
    return ("; it holds sub-modules, which a torch.fx GraphModule (symbolic_trace, "
            "create_feature_extractor) or a torch.export program calls directly without "
            f"calling it: read one of them (e.g. {prefix + '.'.join(path)!r}), or trace with "
            "a torch.fx.Tracer whose is_leaf_module keeps it whole")


def single_call(probe: Probe, label: str = "saliency_layer", name: Any = None) -> torch.Tensor:
    """The one tensor ``probe`` recorded, or a ValueError naming ``label`` (the argument)."""
    what = f"{label} {layer_label(name if name is not None else probe.module)}"
    if not probe.data:
        if probe.other_thread_calls:
            raise ValueError(
                f"{what} was called {probe.other_thread_calls} time(s) in another thread and "
                "never in the thread running the method: the model runs it in a worker thread "
                "(threading, concurrent.futures, nn.DataParallel over several devices), which "
                f"probes and rule contexts do not reach; {THREAD_ADVICE}")
        raise ValueError(f"{what} was not called in the forward pass"
                         + _container_hint(probe.module, name))
    if len(probe.data) > 1:
        raise ValueError(
            f"{what} was called {len(probe.data)} times in one forward pass (a shared module "
            "such as torchvision ResNet's 'relu'), so which call to read is ambiguous; choose a "
            "module called once (e.g. the enclosing block)")
    read = probe.data[0]
    if not isinstance(read, torch.Tensor) or not read.is_floating_point():
        got = (f"a {read.dtype} tensor" if isinstance(read, torch.Tensor)
               else f"a {type(read).__name__}")
        raise ValueError(
            f"{what} returned {got}, not a floating-point tensor; choose a layer whose output "
            "is one, (N, C, *spatial) (for a module returning a tuple, the sub-module that "
            "computes the part to read)")
    if not read.requires_grad:
        raise ValueError(
            f"{what} produced a tensor autograd cannot follow: the layer runs under "
            "torch.no_grad(), inside torch.utils.checkpoint(use_reentrant=True) or inside a "
            "custom autograd.Function; checkpoint with use_reentrant=False, or read a layer "
            "outside that region")
    return read
