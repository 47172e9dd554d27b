r"""Input and model checks, and the guard that restores a model's state after a call.

Besides validating the arguments, the checks here find what the rule contexts and probes cannot
see: TorchScript modules (``torch.jit.script`` / ``torch.jit.trace``) and modules compiled with
``torch.compile`` (:func:`opaque_modules`), and they turn a layout mistake (an unbatched image,
channels last) into an error that says what to do (:func:`layout_hint`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["check_input", "check_model", "model_state_guard", "unwrap_compiled",
           "opaque_modules", "opaque_kind", "layout_hint"]


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
    if input.is_meta:
        raise ValueError(
            f"{name} is on the meta device (a tensor without data); pass a tensor with values "
            "on the model's device")
    if not input.is_floating_point():
        if input.dtype == torch.uint8:
            hint = ("an image stored as uint8: convert it with x.float() / 255 and normalise it "
                    "as the model expects")
        else:
            hint = "convert it, e.g. with x.float()"
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {input.dtype}; {hint}")
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


def iter_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` once (``model`` first), like ``model.modules()`` but without
    building the dotted names: the per-call checks walk the tree several times, and on small
    models the names cost more than the checks."""
    seen = {id(model)}
    stack = [model]
    while stack:
        module = stack.pop()
        yield module
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)


def iter_tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """``("parameter" | "buffer", tensor)`` for every parameter and buffer, shared ones once."""
    seen = set()
    for module in iter_modules(model):
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for t in tensors.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield kind, t


def check_model(model: Any) -> nn.Module:
    """Validate that ``model`` is a module whose parameters autograd can differentiate through.

    Every parameter and buffer is looked at (a flag test each): inference tensors (made under
    :func:`torch.inference_mode`) and tensors on the ``meta`` device (no values) are a
    :class:`ValueError` naming the tensor.
    """
    if not isinstance(model, nn.Module):
        if callable(model):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function "
                "in an nn.Module whose forward calls it")
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(t.is_inference() or t.is_meta for _, t in iter_tensors(model)):
        return model
    # Something is wrong: find its name (the slow walk, on the error path only).
    for kind, named in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, p in named:
            if p.is_inference():
                raise ValueError(
                    f"model {kind} {name!r} is an inference tensor (the model was built or "
                    "loaded under torch.inference_mode()); rebuild or clone it outside "
                    "inference mode")
            if p.is_meta:
                raise ValueError(
                    f"model {kind} {name!r} is on the meta device (it has no values); "
                    "materialise the model first, e.g. model.to_empty(device='cpu') then "
                    "load_state_dict(...)")
    return model


def is_compiled_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper :func:`torch.compile` returns for a module."""
    return (type(module).__name__ == "OptimizedModule"
            and isinstance(getattr(module, "_orig_mod", None), nn.Module))


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile(model)`` (``model`` itself otherwise).

    Backward rules and probes need to see the operations and the sub-modules as they run; a
    compiled graph hides both (hooks added after compilation are not guarded, a rule read at
    backward time is baked in at tracing).  The methods therefore explain the original module,
    which shares the compiled model's parameters: the answer is the same, computed eagerly.
    """
    while is_compiled_wrapper(model):
        inner = model._orig_mod
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def opaque_kind(module: nn.Module) -> Optional[str]:
    """``"TorchScript"``, ``"torch.compile"`` or ``None``: whether hooks and rule contexts can
    see what ``module`` runs."""
    if isinstance(module, torch.jit.ScriptModule):
        return "TorchScript"
    if is_compiled_wrapper(module) or module.__dict__.get("_compiled_call_impl") is not None:
        return "torch.compile"
    return None


def opaque_modules(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """The outermost sub-modules of ``model`` (``model`` included, name ``""``) whose inside
    hooks and rule contexts cannot see: ``(name, module, kind)`` with ``kind`` from
    :func:`opaque_kind`.  One walk over the module tree."""
    found: List[Tuple[str, nn.Module, str]] = []
    if all(opaque_kind(m) is None for m in iter_modules(model)):
        return found
    for name, module in model.named_modules():
        if any(name == n or name.startswith(n + ".") or n == "" for n, _, _ in found):
            continue
        kind = opaque_kind(module)
        if kind is not None:
            found.append((name, module, kind))
    return found


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layout_hint(model: nn.Module, input: torch.Tensor,
                certain_only: bool = False) -> Optional[str]:
    """What to do when ``input`` cannot be the batch the model's first convolution expects.

    The first ``Conv1d/2d/3d`` module of ``model`` (in registration order) tells the number of
    channels and of spatial dimensions.  Returns a sentence when ``input`` looks like a
    channels-last batch (``x.permute(0, 3, 1, 2)``), an unbatched sample (one dimension short,
    channels first: ``x.unsqueeze(0)``) or has another number of channels; ``None`` when it
    matches or the model has no such convolution.

    The methods refuse a channels-last batch before running the model (``certain_only``: the
    last dimension holds the channels and the second does not); the other cases can be
    legitimate (a model that reshapes its input first), so they only complete the error of a
    forward pass that failed.
    """
    conv = next((m for m in model.modules() if isinstance(m, _CONV_TYPES)), None)
    if conv is None or not conv.in_channels:
        return None
    spatial = len(conv.kernel_size)
    c = conv.in_channels
    shape = tuple(input.shape)
    expected = "(N, C" + ", " + ", ".join(("L",) if spatial == 1 else
                                          ("H", "W") if spatial == 2 else ("T", "H", "W")) + ")"
    first = (f"the model's first convolution ({type(conv).__name__}, in_channels={c}) takes "
             f"a batch {expected} with C={c}")
    if input.dim() == spatial + 2 and shape[1] != c and shape[-1] == c:
        order = ", ".join(["0", str(spatial + 1)] + [str(i) for i in range(1, spatial + 1)])
        return (f"input has shape {shape}, channels last; {first}: pass x.permute({order}) "
                "(or x.movedim(-1, 1))")
    if certain_only:
        return None
    if input.dim() == spatial + 1 and shape[0] == c:
        return (f"input has shape {shape}: a single sample without the batch dimension; "
                f"{first}: pass x.unsqueeze(0)")
    if input.dim() == spatial + 2 and shape[1] != c:
        return f"input has shape {shape} with {shape[1]} channels; {first}"
    return None


class _GuardState:
    """The original state of a model under guard, shared by every thread guarding it."""

    __slots__ = ("count", "modes", "params")

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.modes = [(m, m.training) for m in iter_modules(model)]
        self.params = [(p, p.requires_grad, p.grad) for kind, p in iter_tensors(model)
                       if kind == "parameter"]

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
    """Put ``model`` in eval mode (and freeze its parameters) for the block; restore afterwards.

    On exit — also when the block raises — every sub-module's ``training`` flag, every
    parameter's ``requires_grad`` and ``.grad`` are exactly what they were.  Only what differs
    is changed, so a model already in eval mode with frozen weights is not touched at all.

    ``freeze`` switches every parameter's ``requires_grad`` off for the block (restored on
    exit).  The gradient methods do not use it: ``torch.autograd.grad`` on the tensors they read
    computes no weight gradient anyway, freezing measured no speed-up, and the flag is visible
    to every thread using the model.  Methods that call ``backward()`` themselves can freeze to
    avoid accumulating weight gradients.

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


#: Why a model with a reentrant activation checkpoint cannot be explained as it is.
REENTRANT_CHECKPOINT_MESSAGE = (
    "the model uses torch.utils.checkpoint(use_reentrant=True), which torch.autograd.grad "
    "cannot differentiate through (the attribution methods read gradients with it): "
    "checkpoint with use_reentrant=False — the recomputed forward pass keeps the rules of the "
    "original one, so gradient, guided backprop, DeConvNet, Grad-CAM and linear approximation "
    "give exact maps (excitation backprop refuses any checkpoint) — or run the model without "
    "activation checkpointing for attribution")


def autograd_grad(*args: Any, **kwargs: Any) -> Tuple[torch.Tensor, ...]:
    """:func:`torch.autograd.grad`, with PyTorch's refusal of reentrant checkpoints turned into
    a :class:`ValueError` that says what to do (every method reads its gradients through it)."""
    try:
        return torch.autograd.grad(*args, **kwargs)
    except RuntimeError as exc:
        if "use_reentrant=True" in str(exc):
            raise ValueError(REENTRANT_CHECKPOINT_MESSAGE) from None
        raise
