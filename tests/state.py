"""Snapshots of everything an attribution call must leave as it found it."""

from __future__ import annotations

import threading
from typing import Any, Dict

import torch
import torch.nn as nn

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def hook_counts(model: nn.Module) -> Dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d:
                out[f"{name}.{attr}"] = len(d)
    return out


def global_hook_counts() -> Dict[str, int]:
    from torch.nn.modules import module as mod
    return {k: len(getattr(mod, k)) for k in dir(mod)
            if k.startswith("_global_") and k.endswith("hooks") and isinstance(
                getattr(mod, k), dict)}


def snapshot(model: nn.Module, *tensors: torch.Tensor) -> Dict[str, Any]:
    """Everything observable that a call must not change."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: (None if p.grad is None else p.grad.clone())
                 for n, p in model.named_parameters()},
        "grad_id": {n: id(p.grad) for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": hook_counts(model),
        "global_hooks": global_hook_counts(),
        "modes": torch._C._len_torch_function_stack(),
        "grad_enabled": torch.is_grad_enabled(),
        "rng": torch.get_rng_state(),
        "tensors": [(t.requires_grad, None if t.grad is None else t.grad.clone(),
                     t.detach().clone()) for t in tensors],
        "threads": threading.active_count(),
    }


def assert_same_state(before: Dict[str, Any], after: Dict[str, Any]) -> None:
    """Assert two snapshots agree exactly (values bit for bit)."""
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys(), key
        for n in before[key]:
            assert torch.equal(before[key][n], after[key][n]), f"{key} {n} changed"
    for key in ("requires_grad", "grad_id", "training", "hooks", "global_hooks", "modes",
                "grad_enabled", "threads"):
        assert before[key] == after[key], f"{key}: {before[key]} != {after[key]}"
    for n, g in before["grad"].items():
        h = after["grad"][n]
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), f"grad {n}"
    assert torch.equal(before["rng"], after["rng"]), "global RNG state changed"
    for (r0, g0, v0), (r1, g1, v1) in zip(before["tensors"], after["tensors"]):
        assert r0 == r1, "input requires_grad changed"
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1)), \
            "input .grad changed"
        assert torch.equal(v0, v1), "input values changed"
