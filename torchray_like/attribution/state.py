r"""The guard that restores a model's state after a call, and the gradient reader.

:func:`model_state_guard` puts a model in eval mode for a call and gives every flag back
afterwards; :func:`autograd_grad` is the one place every method reads its gradients through.
The input and model checks live in :mod:`.inputs` and :mod:`.modules` (re-exported here for the
code written against this module).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from .autograd_graph import graph_nodes
from .inputs import check_input, dtype_hint, layout_hint
from .modules import (
    check_model,
    current_scan,
    is_compiled_wrapper,
    is_observer,
    iter_modules,
    iter_tensors,
    opaque_kind,
    opaque_modules,
    unwrap_compiled,
)

__all__ = ["model_state_guard", "autograd_grad", "REENTRANT_CHECKPOINT_MESSAGE",
           # re-exported from .inputs and .modules
           "check_input", "check_model", "unwrap_compiled", "opaque_modules", "opaque_kind",
           "layout_hint", "dtype_hint", "iter_modules", "iter_tensors", "is_compiled_wrapper"]


class _GuardState:
    """The original state of a model under guard, shared by every thread guarding it.

    Only what a guard changed is given back: the ``training`` flags it switched off, the
    ``requires_grad`` flags it froze and the quantization observers' buffers it swapped for
    copies.  Parameters' ``.grad`` are never touched: the methods read
    gradients with ``torch.autograd.grad``, which leaves them alone, so restoring them could only
    undo what another thread's ``backward()`` accumulated meanwhile.
    """

    __slots__ = ("count", "model", "switched", "frozen", "observers")

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.model = model
        self.switched: List[nn.Module] = []
        self.frozen: List[torch.Tensor] = []
        self.observers: Dict[int, nn.Module] = {}  # id -> the observers this model's guard hid

    def apply(self, freeze: bool) -> None:
        scan = current_scan(self.model)  # the call's one walk, when there is one
        modules = scan.modules if scan is not None else list(iter_modules(self.model))
        for m in modules:
            if m.training:
                m.training = False
                self.switched.append(m)
        for m in (scan.observers if scan is not None else filter(is_observer, modules)):
            self._hide_observer(m)
        if freeze:
            for kind, p in iter_tensors(self.model):
                if kind == "parameter" and p.requires_grad:
                    p.requires_grad_(False)
                    self.frozen.append(p)

    def _hide_observer(self, m: nn.Module) -> None:
        """Quantization observers record statistics in every forward pass, in eval mode too
        (a fake-quantize module of quantization-aware training also changes its scale, hence
        the output, as it records): for the block, a fake-quantize module observes nothing and
        an observer records into copies of its buffers; the originals come back untouched.

        An observer may belong to several models (a sub-module shared by two models, each
        with its own guard): the hiding is counted per observer in :data:`_HIDDEN_OBSERVERS`
        (under ``_GUARD_LOCK``), so the first guard saves the originals, later ones only count,
        and the last to leave puts the originals back — never another guard's copies."""
        if id(m) in self.observers:
            return  # this model's guard hid it already (reached twice in the walk)
        entry = _HIDDEN_OBSERVERS.get(id(m))
        if entry is None:
            saved = dict(m._buffers)
            # Every copy made before any is swapped in: a failing copy changes nothing.
            copies = {name: (torch.zeros_like(t) if name == "observer_enabled"
                             else t.detach().clone())
                      for name, t in saved.items() if t is not None}
            m._buffers.update(copies)
            _HIDDEN_OBSERVERS[id(m)] = [1, m, saved]
        else:
            entry[0] += 1
        self.observers[id(m)] = m

    def restore(self) -> None:
        for p in self.frozen:
            p.requires_grad_(True)
        for m in self.switched:
            m.training = True
        for key in self.observers:
            entry = _HIDDEN_OBSERVERS[key]
            entry[0] -= 1
            if entry[0] == 0:  # the last guard hiding it: the originals come back, once
                del _HIDDEN_OBSERVERS[key]
                entry[1]._buffers.update(entry[2])


_GUARD_LOCK = threading.Lock()
#: id(observer) -> [how many guards hide it, the observer, its original buffers] (the entry
#: holds the observer, so the id is not reused while it is hidden); read under _GUARD_LOCK.
_HIDDEN_OBSERVERS: Dict[int, List[Any]] = {}
_GUARDS: "weakref.WeakKeyDictionary[nn.Module, _GuardState]" = weakref.WeakKeyDictionary()


class model_state_guard:  # noqa: N801 - a function-like context manager, named as one
    """Put ``model`` in eval mode (and freeze its parameters) for the block; restore afterwards.

    On exit — also when the block raises, or when entering fails half-way — every sub-module's
    ``training`` flag, every parameter's ``requires_grad`` and every quantization observer's
    buffers (which record into copies in the block) the guard changed are given back.  Only
    what differs is
    changed, so a model already in eval mode with frozen weights is not touched at all, and
    parameters' ``.grad`` are never touched (another thread may be accumulating into them).

    ``freeze`` switches every parameter's ``requires_grad`` off for the block (restored on
    exit).  The gradient methods do not use it: ``torch.autograd.grad`` on the tensors they read
    computes no weight gradient anyway, freezing measured no speed-up, and the flag is visible
    to every thread using the model.  Methods that call ``backward()`` themselves freeze to
    avoid accumulating weight gradients (extremal perturbation optimises its masks so).

    Several threads may explain the same model at once: the state is saved by the first guard
    to enter and restored by the last to leave (a per-model count under a lock), so one thread
    finishing never un-freezes the model under another, and the original flags always come
    back.  Training the model in another thread *while* it is being explained is not
    supported: module flags are shared by all threads.
    """

    __slots__ = ("model", "freeze", "state")

    # A class rather than a generator context manager: entered once per method call, where
    # contextlib's generator machinery cost more than the guard itself.
    def __init__(self, model: nn.Module, freeze: bool = True) -> None:
        self.model, self.freeze = model, freeze

    def __enter__(self) -> nn.Module:
        model = self.model
        with _GUARD_LOCK:
            state = _GUARDS.get(model)
            if state is None:
                state = _GUARDS[model] = _GuardState(model)
            state.count += 1
            self.state = state
            try:
                state.apply(self.freeze)
            except BaseException:  # half applied (a buffer copy failed): give it back
                state.count -= 1
                if state.count == 0:
                    del _GUARDS[model]
                    state.restore()
                raise
        return model

    def __exit__(self, *exc: Any) -> None:
        state = self.state
        with _GUARD_LOCK:
            state.count -= 1
            if state.count == 0:
                del _GUARDS[self.model]
                state.restore()


#: Why a model with a reentrant activation checkpoint cannot be explained as it is.
REENTRANT_CHECKPOINT_MESSAGE = (
    "the model uses torch.utils.checkpoint(use_reentrant=True), which torch.autograd.grad "
    "cannot differentiate through (the attribution methods read gradients with it): "
    "checkpoint with use_reentrant=False — the recomputed forward pass keeps the rules of the "
    "original one, so gradient, guided backprop, DeConvNet, Grad-CAM and linear approximation "
    "give exact maps (excitation backprop and LRP refuse any checkpoint) — or run the model "
    "without activation checkpointing for attribution")


def uses_reentrant_checkpoint(tensor: torch.Tensor, limit: int = 100_000) -> bool:
    """Whether ``tensor``'s autograd graph holds a ``torch.utils.checkpoint(use_reentrant=True)``
    node (its first pass ran the checkpointed layers under ``torch.no_grad()``); looks at
    ``limit`` nodes at most (for error messages, not for the common path)."""
    if tensor.grad_fn is None:
        return False
    nodes = itertools.islice(graph_nodes(tensor.grad_fn), limit)
    return any(type(node).__name__ == "CheckpointFunctionBackward" for node in nodes)


def autograd_grad(*args: Any, **kwargs: Any) -> Tuple[torch.Tensor, ...]:
    """:func:`torch.autograd.grad`, with PyTorch's refusal of reentrant checkpoints turned into
    a :class:`ValueError` that says what to do (every method reads its gradients through it)."""
    try:
        return torch.autograd.grad(*args, **kwargs)
    except RuntimeError as exc:
        if "use_reentrant=True" in str(exc):
            raise ValueError(REENTRANT_CHECKPOINT_MESSAGE) from None
        raise
