"""The bookkeeping of ``benchmarks/speed.py --memory``: the CPU tracer counts what the allocator
hands out during a call (peak of the running sum, not the total), and the batched methods stay
bounded by their batch option whatever their count."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import speed  # noqa: E402

from torchray_like.attribution import METHODS  # noqa: E402

MB = 1 << 20


def test_peak_is_the_running_maximum_not_the_total():
    def two_live_then_one():
        x = torch.ones(1 << 18)        # 1 MB
        y = x * 2                      # 2 MB live
        del x
        z = y + 1                      # 2 MB live again, never 3
        return z.sum()

    peak = speed.peak_bytes(two_live_then_one)
    assert 2 * MB <= peak < 2 * MB + 4096


def test_memory_allocated_before_the_call_does_not_count():
    held = torch.ones(1 << 20)  # 4 MB alive before and after
    assert speed.peak_bytes(lambda: held.sum()) < 4096
    assert held.numel() == 1 << 20


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 3)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("method, option, sizes, batch_option", [
    ("integrated_gradients", "n_steps", (8, 64), "internal_batch_size"),
    ("smooth_grad", "n_samples", (8, 64), "batch_size"),
])
def test_batched_methods_are_bounded_by_their_batch(method, option, sizes, batch_option):
    model, x = net(), torch.randn(1, 3, 32, 32)
    extra = {"generator": 0} if method == "smooth_grad" else {}

    def call(count, batch):
        return speed.case_peaks(
            lambda: METHODS[method](model, x, 1, **{option: count, batch_option: batch},
                                    **extra),
            lambda: None, {})["method_mb"]

    small, large = (call(k, 8) for k in sizes)
    assert large <= small * 1.1 + 0.05  # 8× the count, the same memory
    # The tracer sees the difference when the batch grows with the count.
    assert call(sizes[1], sizes[1]) > 2 * small


def test_case_peaks_reports_the_ratio_to_the_floor():
    model, x = net(), torch.randn(4, 3, 32, 32)
    floor = speed.case_peaks(lambda: None, lambda: None, {})
    assert floor["method_mb"] == floor["floor_mb"] == 0.0
    assert floor["ratio"] != floor["ratio"]  # NaN: no floor to divide by

    def plain():
        xx = x.clone().requires_grad_(True)
        return torch.autograd.grad(model(xx)[:, 1].sum(), xx)

    res = speed.case_peaks(lambda: METHODS["gradient"](model, x, 1), plain,
                           {"other": lambda: torch.ones(1 << 18)})
    assert set(res) == {"method_mb", "floor_mb", "other_mb", "ratio"}
    assert 1.0 <= res["other_mb"] < 1.01
    assert res["floor_mb"] > 0
    assert 0.5 < res["ratio"] < 3.0
    assert res["ratio"] == pytest.approx(res["method_mb"] / res["floor_mb"])
