r"""Machinery shared by every attribution method.

Every backpropagation method in :mod:`torchray_like.attribution` is the same driver,
:func:`saliency`, with different parts plugged in:

* a *rule context* (:class:`RuleContext`, :class:`ReLUContext`) that changes the backward rule of
  some operations, for the code inside a ``with`` block and in the current thread only;
* a layer to read: the input, or a :class:`Probe` on a module;
* a seed gradient chosen by the *target* (:func:`get_backward_gradient`,
  :func:`get_pointing_gradient`, or a callable returning one score per sample);
* a way to turn the probed gradient into a map (:func:`gradient_to_saliency`), a resize
  (:func:`resize_saliency`) and an optional Gaussian smoothing.

Rule contexts are :class:`torch.overrides.TorchFunctionMode` objects: they see every way a model
calls an operation (``nn.ReLU`` modules, ``F.relu``, ``torch.relu_``, ``Tensor.relu`` ...), only in
the thread that entered them, and they leave nothing behind when the block ends (also when it
raises).  The modified backward of each replaced call is an :class:`torch.autograd.Function` whose
forward is exactly the plain operation; the rule it applies in backward is a value the node holds
from its forward pass, so a graph built inside the context can be differentiated after the block
has ended, and the rule can be switched between two backward passes of one forward.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "ReLURule",
    "GRADIENT_RULE",
    "RuleContext",
    "ReLUContext",
    "NullContext",
    "NoRuleAppliedWarning",
    "UnhandledActivationWarning",
    "Probe",
    "Patch",
    "attach_debug_probes",
    "get_module",
    "get_backward_gradient",
    "get_pointing_gradient",
    "gradient_to_saliency",
    "resize_saliency",
    "smooth_saliency",
    "saliency",
    "SaliencyDebug",
    "model_state_guard",
    "check_input",
    "check_model",
    "target_scores",
    "class_indices",
    "check_class_range",
    "backward_seed",
    "forward_pass",
    "ForwardPass",
    "finish_map",
    "check_smooth",
    "saliency_gradient",
    "ActivationMap",
]

TargetType = Union[int, Sequence[int], torch.Tensor, Callable[[Any], torch.Tensor]]
SizeType = Union[bool, int, Sequence[int], torch.Size, None]


# ---------------------------------------------------------------------------------------------
# Warnings
# ---------------------------------------------------------------------------------------------


class NoRuleAppliedWarning(UserWarning):
    """A rule context saw a forward pass but replaced no call.

    The gradient computed from such a pass is the plain gradient, not the method's.
    """


class UnhandledActivationWarning(UserWarning):
    """A rule context saw non-linearities its rule does not cover (GELU, SiLU, ...).

    Those keep their plain gradient, so the map mixes the method's rule with the plain gradient.
    """


# ---------------------------------------------------------------------------------------------
# Rectifier rules
# ---------------------------------------------------------------------------------------------


class ReLURule:
    """Backward rule for rectifiers (ReLU and its bounded form ReLU6 / ``hardtanh(x, 0, b)``).

    Subclasses override :meth:`backward`.  ``output`` is the forward output (``relu(x)`` or
    ``clamp(x, 0, upper)``); ``output > 0`` iff the forward input was positive and
    ``output < upper`` iff it was below the upper bound, so the output alone determines every
    rule.  ``upper`` is ``None`` for a plain ReLU.

    The base class is the plain gradient: ``grad * [0 < x (< upper)]``.
    """

    name = "gradient"

    def backward(self, grad: torch.Tensor, output: torch.Tensor,
                 upper: Optional[float]) -> torch.Tensor:
        """Return the signal passed to the rectifier's input."""
        if upper is None:
            return torch.ops.aten.threshold_backward(grad, output, 0)
        return torch.ops.aten.hardtanh_backward(grad, output, 0.0, upper)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: The plain-gradient rule (a rule context using it changes nothing but counts ReLU calls).
GRADIENT_RULE = ReLURule()


class _Rectifier(torch.autograd.Function):
    """``relu(x)`` or ``clamp(x, 0, upper)`` whose backward applies ``cell.rule``.

    The forward computes exactly what PyTorch computes (in place when the caller asked for it, so
    code relying on the side effect keeps working); ``cell`` is read at backward time, which lets
    one forward serve several rules.
    """

    @staticmethod
    def forward(ctx, x, cell, upper, inplace):  # type: ignore[override]
        with torch._C.DisableTorchFunction():
            if upper is None:
                out = torch.relu_(x) if inplace else torch.relu(x)
            else:
                out = (torch._C._nn.hardtanh_(x, 0.0, upper) if inplace
                       else torch._C._nn.hardtanh(x, 0.0, upper))
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        ctx.cell = cell
        ctx.upper = upper
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            return ctx.cell.rule.backward(grad, out, ctx.upper), None, None, None


class _RuleCell:
    """A mutable holder for the rule the nodes created by one context apply."""

    __slots__ = ("rule",)

    def __init__(self, rule: Any) -> None:
        self.rule = rule


# ---------------------------------------------------------------------------------------------
# Rule contexts
# ---------------------------------------------------------------------------------------------


def _first_tensor_arg(args: tuple, kwargs: dict, names: Tuple[str, ...] = ("input", "self")):
    if args:
        return args[0]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise TypeError("rectifier called without an input tensor")


# Non-linearities whose gradient a ReLU rule does not change: seeing one is worth a warning.
_OTHER_ACTIVATIONS = {
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
    #: Whether to warn about activations listed in ``_OTHER_ACTIVATIONS``.
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
            name = _OTHER_ACTIVATIONS.get(func)
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


class ReLUContext(RuleContext):
    """Replace the backward of every rectifier the model calls.

    Caught calls: ``nn.ReLU`` (with and without ``inplace=True``), ``F.relu``, ``F.relu_``,
    ``torch.relu``, ``torch.relu_``, ``Tensor.relu``, ``Tensor.relu_``, and the bounded rectifier
    ReLU6: ``nn.ReLU6``, ``F.relu6`` and ``F.hardtanh(x, 0, b)`` (what ``nn.ReLU6`` calls).  The
    forward values are exactly PyTorch's; in-place calls stay in place.

    Parameters
    ----------
    function_class : ReLURule or type of torch.autograd.Function
        The rule.  A :class:`ReLURule` instance (``GUIDED_BACKPROP_RULE``, ``DECONVNET_RULE``, or
        your own subclass) gets the fast path: one or two fused kernels in backward.  For
        TorchRay compatibility an :class:`torch.autograd.Function` subclass whose ``apply(x)``
        computes ``relu(x)`` is accepted too; its backward is yours (for ReLU6 its output is then
        clamped at the upper bound, whose plain gradient masks the saturated side).

    Examples
    --------
    >>> with ReLUContext(GUIDED_BACKPROP_RULE):        # doctest: +SKIP
    ...     y = model(x)
    ...     y[0, c].backward()
    """

    replaces = "ReLU"
    requirement = ("a model that uses ReLU (nn.ReLU, F.relu, torch.relu, Tensor.relu, "
                   "ReLU6 ...)")
    report_other_activations = True

    def __init__(self, function_class: Union[ReLURule, type]) -> None:
        super().__init__()
        if isinstance(function_class, ReLURule):
            self._cell = _RuleCell(function_class)
            self._function = None
        elif isinstance(function_class, type) and issubclass(function_class,
                                                             torch.autograd.Function):
            self._cell = None
            self._function = function_class
        else:
            raise TypeError(
                "ReLUContext: function_class must be a ReLURule instance or a subclass of "
                f"torch.autograd.Function, got {function_class!r}")
        h = self.handlers
        h[F.relu] = self._relu_kw
        h[torch.relu] = h[torch.Tensor.relu] = self._relu
        h[F.relu_] = h[torch.relu_] = h[torch.Tensor.relu_] = self._relu_inplace
        h[F.relu6] = self._relu6_kw
        h[F.hardtanh] = self._hardtanh
        h[F.hardtanh_] = self._hardtanh_inplace

    @property
    def rule(self) -> Union[ReLURule, type]:
        """The rule applied by the nodes this context creates (assignable for ReLURule rules).

        Nodes read the rule at backward time, so assigning a new :class:`ReLURule` between two
        backward passes of one forward pass (``retain_graph=True``) computes several rules'
        gradients from a single forward.
        """
        return self._cell.rule if self._cell is not None else self._function

    @rule.setter
    def rule(self, value: ReLURule) -> None:
        if self._cell is None or not isinstance(value, ReLURule):
            raise TypeError("only a ReLURule can be assigned to a context built with a ReLURule")
        self._cell.rule = value

    # -- handlers ------------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor, upper: Optional[float], inplace: bool, kind: str):
        self.count(kind)
        if self._cell is not None:
            if not (torch.is_grad_enabled() and x.requires_grad):
                # Nothing will be differentiated: the plain op is the same and cheaper.
                with torch._C.DisableTorchFunction():
                    if upper is None:
                        return torch.relu_(x) if inplace else torch.relu(x)
                    return (torch._C._nn.hardtanh_(x, 0.0, upper) if inplace
                            else torch._C._nn.hardtanh(x, 0.0, upper))
            return _Rectifier.apply(x, self._cell, upper, inplace)
        # A user autograd.Function: apply it to a copy so that an in-place call cannot clobber
        # what the function saved for backward.
        src = x.clone() if inplace else x
        out = self._function.apply(src)
        if upper is not None:
            out = out.clamp(max=upper)
        if inplace:
            with torch.no_grad() if not x.requires_grad else contextlib.nullcontext():
                x.copy_(out)
            return x
        return out

    def _relu(self, func, args, kwargs):
        return self._apply(_first_tensor_arg(args, kwargs), None, False, "relu")

    def _relu_inplace(self, func, args, kwargs):
        return self._apply(_first_tensor_arg(args, kwargs), None, True, "relu")

    def _relu_kw(self, func, args, kwargs):
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return self._apply(_first_tensor_arg(args, kwargs), None, bool(inplace), "relu")

    def _relu6_kw(self, func, args, kwargs):
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return self._apply(_first_tensor_arg(args, kwargs), 6.0, bool(inplace), "relu6")

    def _hardtanh_args(self, args, kwargs):
        x = _first_tensor_arg(args, kwargs)
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return x, float(lo), float(hi)

    def _hardtanh(self, func, args, kwargs):
        x, lo, hi = self._hardtanh_args(args, kwargs)
        if lo != 0.0 or hi <= 0.0:
            return func(*args, **kwargs)  # not a rectifier
        inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
        return self._apply(x, hi, bool(inplace), "relu6" if hi == 6.0 else "hardtanh")

    def _hardtanh_inplace(self, func, args, kwargs):
        x, lo, hi = self._hardtanh_args(args, kwargs)
        if lo != 0.0 or hi <= 0.0:
            return func(*args, **kwargs)
        return self._apply(x, hi, True, "relu6" if hi == 6.0 else "hardtanh")


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


# ---------------------------------------------------------------------------------------------
# Modules and probes
# ---------------------------------------------------------------------------------------------


def get_module(model: nn.Module, module: Union[str, nn.Module, None]) -> nn.Module:
    """Return the sub-module of ``model`` called ``module`` (a dotted name such as
    ``"features.11"`` or ``"layer4.1.conv2"``), or ``module`` itself when it is a module of
    ``model``.  ``""`` names ``model`` itself.

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
        if any(m is module for m in model.modules()):
            return module
        raise ValueError(
            f"get_module: the module {type(module).__name__} given is not a sub-module of the "
            f"model {type(model).__name__}")
    if not isinstance(module, str):
        raise TypeError(
            f"get_module: module must be a dotted name or an nn.Module, got {module!r}")
    names = dict(model.named_modules())
    if module in names:
        return names[module]
    close = difflib.get_close_matches(module, [n for n in names if n], n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if n and (module in n or n.startswith(module.split(".")[0]))][:5]
    hint = f"; closest names: {', '.join(repr(c) for c in close)}" if close else (
        f"; top-level names: {', '.join(repr(n) for n in names if n and '.' not in n)}")
    raise ValueError(f"get_module: the model has no module named {module!r}{hint}")


class _ProbeHook:
    """The hook a :class:`Probe` installs.  It holds the probe weakly: no cycle through the
    module's hook table keeps the probe (and the tensors it recorded) alive."""

    __slots__ = ("probe",)

    def __init__(self, probe: "Probe") -> None:
        self.probe = weakref.ref(probe)

    @staticmethod
    def _record(probe: "Probe", value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"Probe: the {probe.target} of {type(probe.module).__name__} is a "
                f"{type(value).__name__}, not a tensor; probe a module whose {probe.target} is "
                "a tensor")
        if not (torch.is_grad_enabled() and value.is_floating_point()):
            probe.data.append(value)
            return None
        rec = value
        if not rec.requires_grad:
            # Frozen model or input: the recorded tensor becomes a leaf, so backward both reaches
            # it and stops there.
            rec = value.detach().requires_grad_(True)
        else:
            rec.retain_grad()
        probe.data.append(rec)
        # The network continues from a copy: an in-place operation downstream (VGG's
        # ReLU(inplace=True)) then cannot change the recorded values or its gradient.
        return rec.clone()

    def __call__(self, module, inputs, output=None):
        probe = self.probe()
        if probe is None or (probe.thread is not None and probe.thread != threading.get_ident()):
            return None
        if probe.target == "output":
            return self._record(probe, output)
        if not inputs:
            raise TypeError(
                f"Probe: {type(module).__name__} was called without a positional input")
        new = self._record(probe, inputs[0])
        return None if new is None else (new,) + tuple(inputs[1:])


class Probe:
    """Record a module's output (or input) and, after backward, its gradient.

    Parameters
    ----------
    module : torch.nn.Module
        The module to watch.
    target : {"output", "input"}
        What to record: the module's output, or its first positional input.
    this_thread_only : bool
        Record only calls made by the thread that created the probe (the library's own
        wrappers use this, so that other threads running the same model do not add readings).

    Attributes
    ----------
    data : list of torch.Tensor
        One tensor per call of the module, in call order (a module called several times in one
        forward, such as torchvision ResNet's shared ``relu``, records every call).  After
        backward each has its ``.grad``.  When the recorded tensor did not require grad (frozen
        model), it is recorded as a new leaf that does, so backward reaches it and stops there.

    Notes
    -----
    The network continues from a copy of the recorded tensor, so an in-place operation that
    follows the module (``ReLU(inplace=True)`` after a convolution) changes neither the recorded
    values nor their gradient.  The probe holds no reference cycle: dropping it removes its
    hook; :meth:`remove` (or leaving its ``with`` block) removes the hook and frees the data.
    """

    def __init__(self, module: nn.Module, target: str = "output",
                 this_thread_only: bool = False) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"Probe: module must be a torch.nn.Module, got {type(module).__name__}")
        if target not in ("output", "input"):
            raise ValueError(f"Probe: target must be 'output' or 'input', got {target!r}")
        self.module = module
        self.target = target
        self.thread = threading.get_ident() if this_thread_only else None
        self.data: List[torch.Tensor] = []
        hook = _ProbeHook(self)
        if target == "output":
            handle = module.register_forward_hook(hook)
        else:
            handle = module.register_forward_pre_hook(hook)
        self._finalizer = weakref.finalize(self, handle.remove)

    @property
    def active(self) -> bool:
        """Whether the hook is still installed."""
        return self._finalizer.alive

    def remove(self) -> None:
        """Remove the hook and free the recorded tensors (idempotent)."""
        self._finalizer()
        self.data = []

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        return (f"Probe({type(self.module).__name__}, target={self.target!r}, "
                f"calls={len(self.data)}, active={self.active})")


def attach_debug_probes(model: nn.Module, debug: bool = False) -> Dict[str, Probe]:
    """Attach an output :class:`Probe` to every named sub-module of ``model``.

    Returns a dict name → probe (empty when ``debug`` is false, as in TorchRay).  Remove them
    with ``for p in probes.values(): p.remove()``.
    """
    if not debug:
        return {}
    return {name: Probe(m, "output") for name, m in model.named_modules() if name}


# ---------------------------------------------------------------------------------------------
# Input, model and state checks
# ---------------------------------------------------------------------------------------------


def check_input(input: Any, name: str = "input", min_dim: int = 3,
                needs_grad: bool = True) -> torch.Tensor:
    """Validate a batch ``(N, C, *spatial)`` of floating-point data and return it.

    Raises :class:`TypeError` for non-tensors and integer / boolean / complex tensors (with the
    conversion to use), :class:`ValueError` for a wrong rank or an empty batch.  When
    ``needs_grad`` (the method differentiates), also :class:`RuntimeError` inside
    :func:`torch.inference_mode` and :class:`ValueError` for an inference tensor.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        hint = (" (an image stored as uint8: use x.float() / 255 and normalise as the model "
                "expects)" if input.dtype == torch.uint8 else "")
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {input.dtype}{hint}; convert it, "
            "e.g. with x.float()")
    if input.dim() < min_dim:
        raise ValueError(
            f"{name} must have shape (N, C, *spatial) — (N, C, L), (N, C, H, W) or "
            f"(N, C, T, H, W) — got shape {tuple(input.shape)}; add the batch dimension with "
            "x.unsqueeze(0)")
    if input.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(input.shape)})")
    if not needs_grad:
        return input
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "attribution needs autograd, which torch.inference_mode() disables; call it outside "
            "the inference_mode block (torch.no_grad() is fine)")
    if input.is_inference():
        raise ValueError(
            f"{name} is an inference tensor (created under torch.inference_mode()); autograd "
            "cannot use it: pass x.clone() made outside inference mode")
    return input


def check_model(model: Any) -> nn.Module:
    """Validate that ``model`` is a module whose parameters autograd can differentiate through."""
    if not isinstance(model, nn.Module):
        if callable(model):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function "
                "in an nn.Module whose forward calls it")
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, p in model.named_parameters():
        if p.is_inference():
            raise ValueError(
                f"model parameter {name!r} is an inference tensor (the model was built under "
                "torch.inference_mode()); rebuild or clone it outside inference mode")
        break
    return model


class _GuardState:
    """The original state of a model under guard, shared by every thread guarding it."""

    __slots__ = ("count", "modes", "params")

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.modes = [(m, m.training) for m in model.modules()]
        self.params = [(p, p.requires_grad, p.grad) for p in model.parameters()]

    def apply(self, eval_mode: bool, freeze: bool) -> None:
        if eval_mode:
            for m, _ in self.modes:
                if m.training:
                    m.training = False
        if freeze:
            for p, _, _ in self.params:
                if p.requires_grad:
                    p.requires_grad_(False)

    def restore(self) -> None:
        for p, req, grad in self.params:
            if p.requires_grad != req:
                p.requires_grad_(req)
            if p.grad is not grad:
                p.grad = grad
        for m, training in self.modes:
            if m.training != training:
                m.training = training


_GUARD_LOCK = threading.Lock()
_GUARDS: "weakref.WeakKeyDictionary[nn.Module, _GuardState]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def model_state_guard(model: nn.Module, eval_mode: bool = True,
                      freeze: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and freeze its parameters for the block; restore afterwards.

    On exit — also when the block raises — every sub-module's ``training`` flag, every
    parameter's ``requires_grad`` and ``.grad`` are exactly what they were.  Only what differs
    is changed, so a model already in eval mode with frozen weights is not touched at all.

    Freezing the parameters means the forward pass records no graph for weight gradients and
    backward never computes them: the method costs what the gradient it needs costs.

    Several threads may explain the same model at once: the state is saved by the first guard
    to enter and restored by the last to leave (a per-model count under a lock), so one thread
    finishing never un-freezes the model under another, and the original flags always come
    back.  Training the model in another thread *while* it is being explained is not
    supported: module flags are shared by all threads.
    """
    with _GUARD_LOCK:
        state = _GUARDS.get(model)
        if state is None:
            state = _GUARDS[model] = _GuardState(model)
        state.count += 1
        state.apply(eval_mode, freeze)
    try:
        yield model
    finally:
        with _GUARD_LOCK:
            state.count -= 1
            if state.count == 0:
                del _GUARDS[model]
                state.restore()


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def class_indices(target: Any, batch: int, device: Union[str, torch.device] = "cpu"
                  ) -> torch.Tensor:
    """Turn an int, a sequence of ints or a 1-D integer tensor into a ``(batch,)`` long tensor.

    Raises :class:`ValueError` for floats, wrong lengths and wrong ranks, :class:`TypeError` for
    booleans and other types.  The range is not checked (see :func:`check_class_range`).
    """
    if isinstance(target, bool) or (isinstance(target, torch.Tensor)
                                    and target.dtype == torch.bool):
        raise TypeError(f"target must be a class index (int), got the boolean {target!r}")
    if isinstance(target, Integral):
        return torch.full((batch,), int(target), dtype=torch.long, device=device)
    if isinstance(target, float):
        raise ValueError(
            f"target must be an integer class index, got the float {target!r}; pass "
            f"int({target!r}) or a tensor shaped like the output for a custom seed gradient")
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex():
            raise ValueError(
                f"target is a {target.dtype} tensor of shape {tuple(target.shape)}: a floating "
                "target is a seed gradient and must have the output's shape; class indices must "
                "be an integer tensor")
        if target.dim() == 0:
            return torch.full((batch,), int(target), dtype=torch.long, device=device)
        if target.dim() != 1:
            raise ValueError(
                f"target class indices must be an int or a 1-D tensor with one class per "
                f"sample, got shape {tuple(target.shape)}")
        idx = target.to(device=device, dtype=torch.long)
    elif isinstance(target, (list, tuple, range)) or (
            hasattr(target, "__len__") and hasattr(target, "__getitem__")
            and not isinstance(target, (str, bytes, dict))):
        values = list(target)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, Integral):
                kind = "float" if isinstance(v, float) else type(v).__name__
                raise ValueError(
                    f"target sequence must hold integer class indices, found the {kind} {v!r}")
        idx = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
    else:
        raise TypeError(
            "target must be an int, a sequence / 1-D integer tensor of one class per sample, a "
            "tensor shaped like the model output (a seed gradient), or a callable output -> "
            f"(N,) scores; got {type(target).__name__}")
    if idx.numel() != batch:
        raise ValueError(
            f"target has {idx.numel()} class indices but the batch has {batch} samples; give "
            "one class per sample, or a single int for all")
    return idx


def check_class_range(idx: torch.Tensor, low: int, high: int, what: str) -> None:
    """Raise :class:`ValueError` (ending with ``what``) if an index is outside [low, high)."""
    if idx.numel() and (int(idx.min()) < low or int(idx.max()) >= high):
        bad = idx[(idx < low) | (idx >= high)].tolist()
        raise ValueError(f"target class {bad[0]} is out of range: {what}")


def _is_binary_head(pred_y: torch.Tensor) -> bool:
    return pred_y.dim() == 1 or (pred_y.dim() == 2 and pred_y.shape[1] == 1)


def get_backward_gradient(pred_y: torch.Tensor, y: TargetType) -> torch.Tensor:
    """Seed gradient for backpropagating from the model output ``pred_y`` for target ``y``.

    Parameters
    ----------
    pred_y : torch.Tensor
        Model output: ``(N, C)`` scores, ``(N, C, *spatial)`` score maps, or a single-logit
        binary head ``(N,)`` / ``(N, 1)``.
    y : int, sequence of int, torch.Tensor
        * an ``int``: that class for every sample;
        * a sequence or 1-D integer tensor: one class per sample (its length must be ``N``);
        * a floating tensor shaped like ``pred_y``: used as the seed gradient as it is.

    Returns
    -------
    torch.Tensor
        Shaped like ``pred_y``: one-hot at the target class (over every spatial position of a
        score map, i.e. explaining the sum of the class's map).

    Notes
    -----
    Binary heads: the logistic of a logit ``z`` equals the two-class softmax with logits
    ``(-z/2, +z/2)``, so class 1 is explained by ``+z`` and class 0 by ``-z`` (seed ``+1`` or
    ``-1``).  Gradient methods are linear in the seed, so explaining class 0 gives the
    negated gradient; rules that rectify the signal (guided backprop, deconvnet) then give a
    genuinely different map.
    """
    if not isinstance(pred_y, torch.Tensor):
        raise TypeError(
            f"the model returned a {type(pred_y).__name__}, not a tensor: pass a callable target "
            "that maps the output to one score per sample, e.g. target=lambda out: "
            "out['logits'][:, 3]")
    if isinstance(y, torch.Tensor) and y.is_floating_point():
        if y.shape != pred_y.shape:
            raise ValueError(
                f"a floating target is a seed gradient and must have the output's shape "
                f"{tuple(pred_y.shape)}, got {tuple(y.shape)}; class indices must be integers")
        return y.to(device=pred_y.device, dtype=pred_y.dtype)
    if pred_y.dim() == 0:
        raise ValueError("the model output is a scalar; it needs a batch dimension")
    batch = pred_y.shape[0]
    idx = class_indices(y, batch, pred_y.device)
    if _is_binary_head(pred_y):
        check_class_range(idx, 0, 2, "a single-logit (binary) head takes target 1 (explain +logit) "
                                "or 0 (explain -logit)")
        return (idx * 2 - 1).to(pred_y.dtype).view(pred_y.shape)
    num_classes = pred_y.shape[1]
    check_class_range(idx, 0, num_classes,
                 f"the model output has {num_classes} classes (valid: 0..{num_classes - 1})")
    seed = torch.zeros_like(pred_y)
    seed[torch.arange(batch, device=pred_y.device), idx] = 1
    return seed


def get_pointing_gradient(pred_y: torch.Tensor, y: TargetType,
                          normalize: bool = True) -> torch.Tensor:
    """Seed gradient that points at the most likely location of the target class.

    For score maps ``(N, C, *spatial)`` the seed is, in the target channel, the softmax over all
    spatial positions of that channel's scores (computed stably; it sums to one), and zero
    elsewhere.  For ``(N, C)`` outputs it is the one-hot seed of :func:`get_backward_gradient`
    (and the binary rule for single-logit heads).

    ``normalize=False`` uses the spatial softmax without the max subtraction (kept for
    signature compatibility; both give the same values where they do not overflow).
    """
    if (not isinstance(pred_y, torch.Tensor) or pred_y.dim() <= 2
            or (isinstance(y, torch.Tensor) and y.is_floating_point())):
        return get_backward_gradient(pred_y, y)
    batch, num_classes = pred_y.shape[:2]
    idx = class_indices(y, batch, pred_y.device)
    check_class_range(idx, 0, num_classes,
                 f"the model output has {num_classes} classes (valid: 0..{num_classes - 1})")
    rows = torch.arange(batch, device=pred_y.device)
    scores = pred_y.detach()[rows, idx].flatten(1)
    if normalize:
        weights = torch.softmax(scores, dim=1)
    else:
        e = scores.exp()
        weights = e / e.sum(dim=1, keepdim=True)
    seed = torch.zeros_like(pred_y)
    seed[rows, idx] = weights.view((batch,) + pred_y.shape[2:]).to(pred_y.dtype)
    return seed


def target_scores(output: Any, target: Callable, batch: int) -> torch.Tensor:
    """Evaluate a callable target on the model output and check it gives ``(batch,)`` scores."""
    scores = target(output)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"a callable target must return a tensor of {batch} scores, got "
            f"{type(scores).__name__}")
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (batch,):
        raise ValueError(
            f"a callable target must return one score per sample, shape ({batch},), got "
            f"{tuple(scores.shape)}")
    if not scores.requires_grad:
        raise ValueError(
            "the scores returned by the callable target do not depend on the input through "
            "autograd (did it detach them or convert to Python numbers?)")
    return scores


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------


def saliency_gradient(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x.grad`` checked for flattening: it exists and is ``(N, C, *spatial)``.

    ``name`` (the flattening function) starts the error messages.
    """
    grad = x.grad if isinstance(x, torch.Tensor) else None
    if grad is None:
        raise ValueError(
            f"{name}: the tensor has no .grad; run backward first (did the output depend on "
            "it?)")
    if grad.dim() < 2:
        raise ValueError(f"{name}: expected (N, C, *spatial), got shape {tuple(grad.shape)}")
    return grad


class ActivationMap:
    """A ``gradient_to_saliency`` that computes ``map_fn(activation, gradient)`` for a layer.

    Layer methods (Grad-CAM, linear approximation ...) weight the activation by its gradient;
    this adapter hands :func:`saliency` the read tensor's values and ``.grad``, and rejects a
    layer without spatial dimensions with an error naming the method and the layer.
    """

    def __init__(self, map_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 method: str, layer: Any, hint: str) -> None:
        self.map_fn, self.method, self.layer, self.hint = map_fn, method, layer, hint

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(
                f"{self.method}: saliency_layer {_label(self.layer)} outputs shape "
                f"{tuple(x.shape)}, which has no spatial dimensions; {self.hint}")
        return self.map_fn(x.detach(), saliency_gradient(x, self.method))


def gradient_to_saliency(x: torch.Tensor) -> torch.Tensor:
    """Channel-flattened saliency: the maximum over channels of ``|x.grad|``.

    Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks", 2013 (arXiv 1312.6034).
    ``x`` has shape ``(N, C, *spatial)`` (any number of spatial dimensions) and a ``.grad``; the
    map is ``(N, 1, *spatial)``.
    """
    grad = saliency_gradient(x, "gradient_to_saliency")
    return grad.abs().amax(dim=1, keepdim=True)


_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_RANK_MODES = {"linear": 1, "bilinear": 2, "bicubic": 2, "trilinear": 3}
_ANY_RANK_MODES = ("nearest", "nearest-exact", "area")


def _spatial_size(size: Any, spatial: int, like: torch.Tensor) -> Optional[Tuple[int, ...]]:
    if size is None or size is False:
        return None
    if size is True:
        return tuple(like.shape[2:])
    if isinstance(size, bool):
        return None
    if isinstance(size, Integral):
        size = (int(size),) * spatial
    if not isinstance(size, (tuple, list, torch.Size)):
        raise TypeError(
            f"resize must be False, True, an int or a tuple of {spatial} ints (torch order), "
            f"got {size!r}")
    size = tuple(size)
    if len(size) != spatial or not all(isinstance(s, Integral) and not isinstance(s, bool)
                                       and s > 0 for s in size):
        names = {1: "(L,)", 2: "(H, W)", 3: "(T, H, W)"}.get(spatial, f"{spatial} sizes")
        raise ValueError(
            f"resize must give {spatial} positive sizes in torch order {names}, got {size!r}")
    return tuple(int(s) for s in size)


def resize_saliency(tensor: torch.Tensor, saliency: torch.Tensor, size: SizeType,
                    mode: str = "bilinear") -> torch.Tensor:
    """Resize a saliency map ``(N, 1, *spatial)``.

    Parameters
    ----------
    tensor : torch.Tensor
        The input the map explains (gives the size for ``size=True``).
    saliency : torch.Tensor
        The map, ``(N, C, *spatial)`` with 1 to 3 spatial dimensions.
    size : bool, int, tuple
        ``False``/``None``: unchanged; ``True``: the input's spatial size; a tuple: that size in
        torch order ``(L,)``, ``(H, W)`` or ``(T, H, W)``; an int: that size on every side.
    mode : str
        Any :func:`torch.nn.functional.interpolate` mode valid for the rank.  The linear family
        (``"linear"``, ``"bilinear"``, ``"trilinear"``) means multilinear interpolation and is
        adapted to the rank, so the default ``"bilinear"`` works for 1-D and 3-D maps too.
    """
    spatial = saliency.dim() - 2
    if size is True and tensor.dim() != saliency.dim():
        raise ValueError(
            f"resize=True: the map has {spatial} spatial dimensions (shape "
            f"{tuple(saliency.shape)}) but the input has {tensor.dim() - 2} (shape "
            f"{tuple(tensor.shape)}); give the size explicitly")
    out_size = _spatial_size(size, spatial, tensor)
    if out_size is None:
        return saliency
    if spatial < 1 or spatial > 3:
        raise ValueError(f"resize works for 1 to 3 spatial dimensions, got {spatial}")
    if mode in ("linear", "bilinear", "trilinear"):
        mode = _LINEAR_MODES[spatial]
    elif mode in _RANK_MODES:
        if _RANK_MODES[mode] != spatial:
            raise ValueError(
                f"resize_mode {mode!r} needs {_RANK_MODES[mode]} spatial dimensions, the map has "
                f"{spatial}")
    elif mode not in _ANY_RANK_MODES:
        raise ValueError(
            f"resize_mode must be one of linear/bilinear/trilinear, bicubic (2-D), nearest, "
            f"nearest-exact, area; got {mode!r}")
    if tuple(saliency.shape[2:]) == out_size:
        return saliency
    if mode in _ANY_RANK_MODES:
        return F.interpolate(saliency, size=out_size, mode=mode)
    return F.interpolate(saliency, size=out_size, mode=mode, align_corners=False)


def _gaussian_kernel(sigma: float, truncate: float, dtype, device) -> torch.Tensor:
    radius = max(int(truncate * sigma + 0.5), 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def smooth_saliency(saliency: torch.Tensor, sigma: Union[float, Sequence[float]],
                    truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, C, *spatial)`` maps (1 to 3 spatial dims).

    ``sigma`` is in pixels (one value, or one per spatial dimension); the kernel is truncated
    at ``truncate`` standard deviations and borders are extended by replication (scipy's
    ``gaussian_filter(..., mode="nearest")``), so a constant map stays constant.
    """
    spatial = saliency.dim() - 2
    if spatial < 1 or spatial > 3:
        raise ValueError(f"smoothing works for 1 to 3 spatial dimensions, got {spatial}")
    sigmas = ([float(sigma)] * spatial if isinstance(sigma, (int, float))
              else [float(s) for s in sigma])
    if len(sigmas) != spatial or any(s < 0 or not math.isfinite(s) for s in sigmas):
        raise ValueError(f"sigma must be {spatial} non-negative numbers, got {sigma!r}")
    out = saliency
    for d, s in enumerate(sigmas):
        if s == 0:
            continue
        dim = 2 + d
        k = _gaussian_kernel(s, truncate, out.dtype, out.device)
        r = (k.numel() - 1) // 2
        moved = out.movedim(dim, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        flat = F.pad(flat, (r, r), mode="replicate")
        flat = F.conv1d(flat, k.view(1, 1, -1))
        out = flat.view(shape).movedim(-1, dim)
    return out.contiguous()


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


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
    """

    output: Any
    activation: torch.Tensor
    gradient: torch.Tensor
    counts: Dict[str, int] = field(default_factory=dict)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


def backward_seed(output: Any, target: TargetType, batch: int,
                  get_backward_gradient: Callable = get_backward_gradient
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(tensor, seed)`` to differentiate: the scores and their seed gradient.

    A callable ``target`` is evaluated on the output (one score per sample, seed one);
    otherwise ``get_backward_gradient(output, target)`` gives a seed shaped like the output.
    """
    if target is None:
        raise ValueError(
            "target is required: an int class, one class per sample, a seed-gradient tensor, or "
            "a callable output -> (N,) scores")
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target_scores(output, target, batch)
        return scores, torch.ones_like(scores)
    if isinstance(output, torch.Tensor) and (output.dim() == 0 or output.shape[0] != batch):
        raise ValueError(
            f"the model output has shape {tuple(output.shape)}, whose first dimension is not the "
            f"batch size {batch}; pass a callable target for outputs of another layout")
    seed = get_backward_gradient(output, target)
    if not isinstance(seed, torch.Tensor) or seed.shape != output.shape:
        raise ValueError(
            f"get_backward_gradient must return a tensor shaped like the output "
            f"{tuple(output.shape)}, got {getattr(seed, 'shape', type(seed).__name__)}")
    return output, seed


def _is_input(layer: Any) -> bool:
    return layer is None or (isinstance(layer, str) and layer == "")


def _label(name: Any) -> str:
    return repr(name) if isinstance(name, str) else type(name).__name__


def check_smooth(smooth: Any) -> float:
    """Validate the ``smooth`` argument (a non-negative finite number)."""
    if isinstance(smooth, bool) or not (isinstance(smooth, (int, float)) and smooth >= 0
                                        and math.isfinite(smooth)):
        raise ValueError(f"smooth must be a non-negative number, got {smooth!r}")
    return float(smooth)


def finish_map(input: torch.Tensor, smap: torch.Tensor, resize: SizeType = False,
               resize_mode: str = "bilinear", smooth: float = 0) -> torch.Tensor:
    """The last steps every method shares: detach, resize, then smooth with
    ``sigma = smooth * max(spatial size)`` of the resized map."""
    smap = resize_saliency(input, smap.detach(), resize, resize_mode)
    if smooth:
        smap = smooth_saliency(smap, smooth * max(smap.shape[2:]))
    return smap


@dataclass
class ForwardPass:
    """One forward pass made by :func:`forward_pass`, ready to differentiate.

    Attributes
    ----------
    x : torch.Tensor
        The leaf the model ran on (a detached alias of the caller's input; it requires grad
        only when a reading is the input).
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
    """

    x: torch.Tensor
    output: Any
    scores: torch.Tensor
    seed: torch.Tensor
    context: Any
    reads: Dict[str, torch.Tensor]
    layers: Dict[str, Any]

    def grad(self, label: str, retain_graph: bool = False) -> torch.Tensor:
        """``∂(seed · scores) / ∂ reads[label]`` (under the context's rules)."""
        (grad,) = torch.autograd.grad(self.scores, self.reads[label], self.seed,
                                      retain_graph=retain_graph, allow_unused=True)
        if grad is None:
            layer = self.layers[label]
            where = "the input" if _is_input(layer) else f"{label} {_label(layer)}"
            raise ValueError(f"the target scores do not depend on {where}")
        return grad


@contextlib.contextmanager
def forward_pass(model: nn.Module, input: torch.Tensor, target: TargetType,
                 layers: Dict[str, Union[str, nn.Module, None]], context: Any = None,
                 get_backward_gradient: Callable = get_backward_gradient
                 ) -> Iterator[ForwardPass]:
    """Run ``model(input)`` as every backprop method does and yield a :class:`ForwardPass`.

    Checks the model, input and target; inside :func:`model_state_guard` (eval mode, frozen
    parameters, all restored on exit) and with autograd enabled, probes each layer of ``layers``
    (label → name, module, or ``None``/``""`` for the input), runs the forward pass inside
    ``context`` and computes the seed.  A :class:`RuleContext` that replaced nothing raises a
    :class:`ValueError`.  Probes are removed on exit, also when the body raises.

    Backpropagation from ``scores`` reaches only what the readings need: parameters are frozen
    and the input requires grad only when it is read, so a probed layer is a leaf of the graph.
    """
    check_model(model)
    check_input(input)
    modules = {label: None if _is_input(layer) else get_module(model, layer)
               for label, layer in layers.items()}
    if target is None:
        backward_seed(None, None, 0)  # raises the explanation before any work
    batch = input.shape[0]
    probes: Dict[str, Probe] = {}
    with model_state_guard(model), torch.enable_grad():
        x = input.detach().requires_grad_(any(m is None for m in modules.values()))
        try:
            for label, module in modules.items():
                if module is not None:
                    probes[label] = Probe(module, "output", this_thread_only=True)
            if context is None:
                context = NullContext()
            if isinstance(context, RuleContext):
                context.warn_if_unused = False
            with context:
                output = model(x)
            if isinstance(context, RuleContext):
                _check_context_used(context, model)
            reads = {label: x if module is None else _single_call(probes[label], label,
                                                                  layers[label])
                     for label, module in modules.items()}
            scores, seed = backward_seed(output, target, batch, get_backward_gradient)
            if not scores.requires_grad:
                where = " or ".join(
                    "the input" if m is None else f"{label} {_label(layers[label])}"
                    for label, m in modules.items())
                raise ValueError(
                    f"the model output does not depend on {where} through autograd (is the "
                    "layer on the path to the output? does the model detach its activations or "
                    "run under torch.no_grad()?)")
            yield ForwardPass(x, output, scores, seed, context, reads, dict(layers))
        finally:
            for probe in probes.values():
                probe.remove()


def saliency(model: nn.Module, input: torch.Tensor, target: TargetType,
             saliency_layer: Union[str, nn.Module, None] = None,
             resize: SizeType = False, resize_mode: str = "bilinear", smooth: float = 0,
             context_builder: Optional[Callable[[], Any]] = None,
             gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] = gradient_to_saliency,
             get_backward_gradient: Callable = get_backward_gradient,
             debug: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """Backpropagation saliency: the driver every backprop method is built on.

    Runs ``model(input)`` inside ``context_builder()`` (a rule context, or nothing for the plain
    gradient), backpropagates the seed chosen by ``target`` down to the tensor read — the input,
    or the output of ``saliency_layer`` — and turns that tensor's (pseudo-)gradient into a map
    with ``gradient_to_saliency``.

    Parameters
    ----------
    model : torch.nn.Module
        The network.  It runs in eval mode with frozen parameters for the call; every
        sub-module's ``training`` flag and every parameter's ``requires_grad`` and ``.grad`` are
        restored afterwards, also when the model raises.
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).  It is not modified:
        its ``requires_grad`` and ``.grad`` stay as they were.
    target : int, sequence, torch.Tensor or callable
        See :func:`get_backward_gradient`; a callable maps the model output (tensor, tuple or
        dict) to ``(N,)`` scores to explain.
    saliency_layer : str or torch.nn.Module, optional
        Module whose output is read (a dotted name or the module).  ``None`` or ``""`` (TorchRay)
        means the input.  Backpropagation stops at that tensor.
    resize : bool, int or tuple
        See :func:`resize_saliency`.
    resize_mode : str
        Interpolation mode (the linear family adapts to the rank).
    smooth : float
        If positive, Gaussian smoothing with ``sigma = smooth * max(spatial size)`` of the
        (resized) map.
    context_builder : callable, optional
        Returns the context to run the forward in (e.g. ``GuidedBackpropContext``).  If it is a
        :class:`RuleContext` that replaced nothing, a :class:`ValueError` is raised rather than
        returning the plain gradient under the method's name.
    gradient_to_saliency : callable
        Turns the read tensor (with ``.grad``) into ``(N, 1, *spatial)`` maps.
    get_backward_gradient : callable
        ``(output, target) -> seed`` (e.g. :func:`get_pointing_gradient`).
    debug : bool
        Also return a :class:`SaliencyDebug` with the output, the activation and its gradient.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        The map ``(N, 1, *spatial)`` (detached, on the input's device).
    """
    smooth = check_smooth(smooth)
    context = context_builder() if context_builder is not None else None
    with forward_pass(model, input, target, {"saliency_layer": saliency_layer}, context,
                      get_backward_gradient) as fp:
        read = fp.reads["saliency_layer"]
        grad = fp.grad("saliency_layer")
        read.grad = grad
        try:
            smap = gradient_to_saliency(read)
        finally:
            read.grad = None
    smap = finish_map(input, smap, resize, resize_mode, smooth)
    if debug:
        return smap, SaliencyDebug(_detach(fp.output), read.detach(), grad.detach(),
                                   dict(getattr(fp.context, "counts", {})))
    return smap


def _check_context_used(context: RuleContext, model: nn.Module) -> None:
    if context.replaced == 0:
        raise ValueError(
            f"{type(context).__name__} replaced no {context.replaces} in "
            f"{type(model).__name__}'s forward pass, so the result would be the plain gradient; "
            f"this method needs {context.requirement}" + (
                f" — the model uses {', '.join(sorted(context.unhandled))} instead"
                if context.unhandled else ""))
    if context.unhandled:
        seen = ", ".join(f"{k} ×{v}" for k, v in sorted(context.unhandled.items()))
        warnings.warn(
            f"{type(context).__name__}: {type(model).__name__} also calls non-linearities the "
            f"rule does not cover ({seen}); those keep their plain gradient.",
            UnhandledActivationWarning, stacklevel=5)


def _single_call(probe: Probe, label: str = "saliency_layer", name: Any = None) -> torch.Tensor:
    """The one tensor ``probe`` recorded, or a ValueError naming ``label`` (the argument)."""
    what = f"{label} {_label(name if name is not None else probe.module)}"
    if not probe.data:
        raise ValueError(f"{what} was not called in the forward pass")
    if len(probe.data) > 1:
        raise ValueError(
            f"{what} was called {len(probe.data)} times in one forward pass (a shared module "
            "such as torchvision ResNet's 'relu'), so which call to read is ambiguous; choose a "
            "module called once (e.g. the enclosing block)")
    read = probe.data[0]
    if not read.requires_grad:
        raise ValueError(f"{what} produced a tensor autograd cannot follow")
    return read
