r"""Rule contexts: change the backward rule of some operations inside a ``with`` block.

A :class:`RuleContext` is a :class:`torch.overrides.TorchFunctionMode`: it sees every way a model
calls an operation (``nn.ReLU`` modules, ``F.relu``, ``torch.relu_``, ``Tensor.relu`` ...), only in
the thread that entered it, and it leaves nothing behind when the block ends (also when it
raises).  Concrete rules live in :mod:`.rules` (rectifiers) and in the method modules.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["RuleContext", "NullContext", "Patch", "NoRuleAppliedWarning",
           "UnhandledActivationWarning"]


class NoRuleAppliedWarning(UserWarning):
    """A rule context saw a forward pass but replaced no call.

    The gradient computed from such a pass is the plain gradient, not the method's.
    """


class UnhandledActivationWarning(UserWarning):
    """A rule context saw non-linearities its rule does not cover (GELU, SiLU, ...).

    Those keep their plain gradient, so the map mixes the method's rule with the plain gradient.
    """



def first_tensor_arg(args: tuple, kwargs: dict, names: Tuple[str, ...] = ("input", "self")):
    if args:
        return args[0]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise TypeError("rectifier called without an input tensor")


# Non-linearities whose gradient a ReLU rule does not change: seeing one is worth a warning.
OTHER_ACTIVATIONS = {
    F.gelu: "gelu", F.silu: "silu", F.elu: "elu", F.selu: "selu", F.celu: "celu",
    F.leaky_relu: "leaky_relu", F.softplus: "softplus", F.mish: "mish",
    F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.prelu: "prelu",
    F.rrelu: "rrelu", torch.tanh: "tanh", torch.Tensor.tanh: "tanh",
    F.tanh: "tanh", torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.logsigmoid: "logsigmoid", F.softsign: "softsign",
}


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
    object twice at once is a :class:`RuntimeError`.

    Attributes
    ----------
    counts : dict
        How many calls of each kind were replaced, e.g. ``{"relu": 13, "relu6": 2}``.
    unhandled : dict
        Non-linearities seen that the rule does not cover (GELU, SiLU, sigmoid ...).
    calls : int
        How many torch calls the context saw in total (a forward pass makes many).
    warn_if_unused : bool
        Warn with :class:`NoRuleAppliedWarning` when the block saw calls but replaced none, and
        with :class:`UnhandledActivationWarning` when it saw unhandled non-linearities.
    """

    #: Names used in warnings: what the context replaces.
    replaces = "rule"
    #: What a model needs for the context to apply (used in the error of the wrappers).
    requirement = "a model whose forward pass calls the operations the rule replaces"
    #: Whether to warn about activations listed in ``OTHER_ACTIVATIONS``.
    report_other_activations = False

    def __init__(self) -> None:
        super().__init__()
        self.handlers: Dict[Any, Callable] = {}
        self.counts: Dict[str, int] = {}
        self.unhandled: Dict[str, int] = {}
        self.calls = 0
        self.warn_if_unused = True
        self._thread: Optional[int] = None

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def replaced(self) -> int:
        """Total number of replaced calls."""
        return sum(self.counts.values())

    def count(self, kind: str, n: int = 1) -> None:
        """Record that ``n`` calls of kind ``kind`` were replaced."""
        self.counts[kind] = self.counts.get(kind, 0) + n

    def reset_counts(self) -> None:
        """Forget what was counted so far."""
        self.counts.clear()
        self.unhandled.clear()
        self.calls = 0

    # -- mode protocol -----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        handler = self.handlers.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        if self.report_other_activations:
            name = OTHER_ACTIVATIONS.get(func)
            if name is not None:
                self.unhandled[name] = self.unhandled.get(name, 0) + 1
        return func(*args, **kwargs)

    def __enter__(self):
        if self._thread is not None:
            raise RuntimeError(
                f"{type(self).__name__} is already active; create a new context object to nest "
                "contexts")
        self._thread = threading.get_ident()
        self.reset_counts()
        return super().__enter__()

    def __exit__(self, exc_type, exc_val, exc_tb):
        try:
            super().__exit__(exc_type, exc_val, exc_tb)
        finally:
            self._thread = None
        if exc_type is None and self.warn_if_unused:
            self._warn()
        return False

    def _warn(self) -> None:
        name = type(self).__name__
        others = ", ".join(f"{k} ×{v}" for k, v in sorted(self.unhandled.items()))
        if self.calls and not self.replaced:
            warnings.warn(
                f"{name} saw {self.calls} torch calls but replaced no {self.replaces}: the model "
                "uses none" + (f" (it calls {others} instead)" if others else "") + ", so "
                "gradients computed from this pass are plain gradients, not the method's.",
                NoRuleAppliedWarning, stacklevel=3)
        elif self.unhandled:
            warnings.warn(
                f"{name} replaced {self.replaced} {self.replaces} calls, but the model also calls "
                f"non-linearities the rule does not cover ({others}); those keep their plain "
                "gradient.", UnhandledActivationWarning, stacklevel=3)


class NullContext(contextlib.AbstractContextManager):
    """A context that changes nothing (the plain gradient); TorchRay's ``NullContext``."""

    def __exit__(self, *exc) -> bool:
        return False


class Patch:
    """Temporarily replace an attribute: ``Patch(module_or_object, "name", new)``.

    Kept for TorchRay compatibility.  Unlike the rule contexts this is *global* (every thread
    sees the patch) — prefer :class:`RuleContext` for changing backward rules.  Usable as a
    context manager; :meth:`remove` restores the original.
    """

    def __init__(self, target: Any, name: str, new: Any) -> None:
        if not hasattr(target, name):
            raise ValueError(f"Patch: {target!r} has no attribute {name!r}")
        self.target, self.name = target, name
        self.original = getattr(target, name)
        setattr(target, name, new)
        self._active = True

    def remove(self) -> None:
        """Restore the original attribute (idempotent)."""
        if self._active:
            setattr(self.target, self.name, self.original)
            self._active = False

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __del__(self) -> None:
        if getattr(self, "_active", False):  # __init__ may have raised before patching
            self.remove()
