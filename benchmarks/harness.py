"""Timing harness shared by the speed benchmarks.

A *case* is a method call together with its *floor*: the plain forward pass plus
``torch.autograd.grad`` down to the tensor the method reads, measured in the same run.  Method
and floor are timed alternately (A B A B ...), so drift of the machine hits both alike, and the
median of each is reported with their ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from torchray_like.attribution.common import get_backward_gradient, get_module


@dataclass
class Case:
    """One line of the speed table."""

    name: str
    run: Callable[[], object]
    floor: Callable[[], object]
    floor_name: str
    target_ratio: float = 1.05
    note: str = ""


def frozen(model: nn.Module):
    """Eval mode and frozen parameters, as the methods run the model."""
    from torchray_like.attribution.common import model_state_guard
    return model_state_guard(model)


def floor_input(model: nn.Module, x: torch.Tensor, target) -> Callable[[], object]:
    """Plain forward + autograd.grad down to the input."""
    def run():
        with frozen(model):
            xx = x.detach().requires_grad_(True)
            y = model(xx)
            return torch.autograd.grad(y, xx, get_backward_gradient(y, target))[0]
    return run


def floor_layer(model: nn.Module, x: torch.Tensor, target, layer) -> Callable[[], object]:
    """Plain forward + autograd.grad down to the output of ``layer`` (and no further)."""
    module = get_module(model, layer)

    def run():
        box: List[torch.Tensor] = []

        def hook(m, i, o):
            leaf = o.detach().requires_grad_(True)
            box.append(leaf)
            return leaf

        handle = module.register_forward_hook(hook)
        try:
            with frozen(model):
                y = model(x)
                return torch.autograd.grad(y, box[0], get_backward_gradient(y, target))[0]
        finally:
            handle.remove()
    return run


def floor_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One plain forward pass without autograd."""
    def run():
        with frozen(model), torch.no_grad():
            return model(x)
    return run


def time_pair(run: Callable, floor: Callable, repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median seconds of ``run`` and ``floor`` timed alternately."""
    for _ in range(warmup):
        floor()
        run()
    t_run, t_floor = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        floor()
        t1 = time.perf_counter()
        run()
        t2 = time.perf_counter()
        t_floor.append(t1 - t0)
        t_run.append(t2 - t1)
    med_run, med_floor = statistics.median(t_run), statistics.median(t_floor)
    return {"method_s": med_run, "floor_s": med_floor, "ratio": med_run / med_floor}


def format_row(model: str, case: Case, res: Dict[str, float]) -> str:
    ok = "ok" if res["ratio"] <= case.target_ratio else "SLOW"
    return (f"{model:10s} {case.name:34s} {res['method_s'] * 1e3:10.1f} "
            f"{res['floor_s'] * 1e3:10.1f} {res['ratio']:7.3f} {case.target_ratio:6.2f} {ok:4s} "
            f"{case.floor_name}{'  ' + case.note if case.note else ''}")


HEADER = (f"{'model':10s} {'method':34s} {'ms':>10s} {'floor ms':>10s} {'ratio':>7s} "
          f"{'target':>6s} {'':4s} floor")
