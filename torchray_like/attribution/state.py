r"""Input and model checks, and the guard that restores a model's state after a call."""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator

import torch
import torch.nn as nn

__all__ = ["check_input", "check_model", "model_state_guard"]


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
