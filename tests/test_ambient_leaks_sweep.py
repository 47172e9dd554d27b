"""A call leaves the world as it found it: every entry of METHODS, ``explain``, the plotting
helpers a user calls directly (``visualize.saliency_plot`` / ``plot_methods`` / ``overlay``,
``benchmark.plot_example``) and ``benchmark.get_example_data`` / ``load_embedded_model``.

After each call these are unchanged: torch's global RNG (deterministic methods never draw from
it; the randomised ones follow ``seeding``'s policy, pinned below), NumPy's and Python's RNGs,
the default dtype and device, the thread counts, grad mode, anomaly detection, deterministic
algorithms, float32 matmul precision, denormal flushing, the torch-function mode stack,
autocast, the saved-tensor hooks, ``warnings.filters`` (the calls here are not wrapped in
``warnings.catch_warnings``, which would hide a leak), the logging configuration,
``os.getcwd()``, ``os.environ``, matplotlib's ``rcParams`` and backend, and NumPy's print
and error settings.

The randomised entries with ``generator=None`` (SmoothGrad, extremal perturbation, integrated
gradients' uniform baseline, RISE with ``seed=None``): the seed is derived from torch's global
RNG without advancing it, so a repeated call gives the same map, ``torch.manual_seed`` makes it
reproducible and another global state gives other draws; RISE's default ``seed=0`` ignores the
global state; a caller's ``torch.Generator`` is advanced, the global RNG is not.

Found and fixed (before): ``get_example_data`` and ``load_embedded_model(pretrained=True)``
advanced torch's global RNG (the random initialisation the shipped weights replace), and
``get_example_data``'s missing-weights fallback called ``torch.manual_seed(0)`` on it; under a
meta default device the embedded model was built there ("Cannot copy out of meta tensor"),
and under a float64 default dtype ``get_example_data`` ran a float64 model on its float32
image (PyTorch's dtype error).

The benchmark functions a user calls (deletion / insertion, the random-map baseline, the sanity
checks, the pointing game) leave the world alone too, and give the same numbers under a meta
default device and a float64 default dtype (before: the curve's x-axis, the random map and the
pointing game's disc and counts followed the default device: PyTorch's device errors).

Not ours: importing ``scipy.sparse`` (attention flow) or ``scipy.stats`` (the sanity checks)
adds ``warnings`` filters of scipy's own; they are imported here first, as any earlier import
would.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Tuple

import matplotlib
import numpy as np
import pytest
import scipy.sparse.csgraph  # noqa: F401  (scipy's import-time warnings filters, see above)
import scipy.stats  # noqa: F401
import torch

import torchray_like.benchmark.example_data as example_data
from tests.conftest import global_hook_counts, hook_counts
from tests.test_ambient_state_sweep import AMBIENT, TARGETS, subject
from torchray_like.attribution import METHODS
from torchray_like.attribution.explain import explain
from torchray_like.attribution.precision import denormals_flushed
from torchray_like.attribution.registry import TRANSFORMER_ONLY_METHODS
from torchray_like.benchmark import get_example_data, plot_example
from torchray_like.benchmark.deletion_insertion import (
    deletion_insertion,
    deletion_insertion_both,
    random_saliency,
)
from torchray_like.benchmark.embedded_models import WeightsError, load_embedded_model
from torchray_like.benchmark.pointing_game import PointingGame
from torchray_like.benchmark.sanity_checks import sanity_checks
from torchray_like.visualize import overlay, plot_methods, saliency_plot

pytestmark = pytest.mark.usefixtures("one_thread")


def loggers() -> Dict[str, Tuple[Any, ...]]:
    out = {}
    for name, lg in [("", logging.getLogger())] + list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            out[name] = (lg.level, tuple(lg.handlers), lg.propagate, lg.disabled,
                         tuple(lg.filters))
    return out


def world() -> Dict[str, Any]:
    """Everything global a call must leave alone (values compared as they are)."""
    return {
        "torch RNG": torch.get_rng_state(), "numpy RNG": np.random.get_state(),
        "python RNG": random.getstate(), "default dtype": torch.get_default_dtype(),
        "default device": torch.get_default_device(), "threads": torch.get_num_threads(),
        "interop threads": torch.get_num_interop_threads(), "grad": torch.is_grad_enabled(),
        "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "matmul precision": torch.get_float32_matmul_precision(),
        "denormals flushed": denormals_flushed(),
        "function modes": torch._C._len_torch_function_stack(),
        "autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "inference mode": torch.is_inference_mode_enabled(),
        "saved tensor hooks": torch._C._autograd._top_saved_tensors_default_hooks(False),
        "warnings.filters": list(warnings.filters), "showwarning": warnings.showwarning,
        "loggers": loggers(), "logging.disable": logging.root.manager.disable,
        "cwd": os.getcwd(), "environ": dict(os.environ),
        "rcParams": {k: str(v) for k, v in matplotlib.rcParams.items()},
        "backend": matplotlib.get_backend(),
        "numpy print": np.get_printoptions(), "numpy errors": np.geterr(),
    }


def assert_same_world(before: Dict[str, Any], after: Dict[str, Any], what: str) -> None:
    for key, value in before.items():
        other = after[key]
        if key == "torch RNG":
            same = torch.equal(value, other)
        elif key == "numpy RNG":
            same = all(np.array_equal(a, b) for a, b in zip(value, other))
        elif key in ("rcParams", "environ", "loggers"):
            # (a logger created by a first import, fontTools' for a PDF, is no change of the
            # configuration: the loggers that were there are compared)
            keys = set(value) if key == "loggers" else set(value) | set(other)
            changed = sorted(k for k in keys if value.get(k) != other.get(k))
            assert not changed, f"{what} changed {key}: {changed[:5]}"
            continue
        else:
            same = value == other
        assert same, f"{what} changed {key}"


def unchanged(what: str, function: Callable[[], Any]) -> Any:
    before = world()
    out = function()
    assert_same_world(before, world(), what)
    return out


@pytest.fixture
def close_figures():
    import matplotlib.pyplot as plt
    yield
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# Every entry, explain
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_every_entry_leaves_the_world_as_found(name):
    model, x, opts = subject(name)  # (conv_net seeds the global RNG: made before the snapshot)
    out = unchanged(name, lambda: METHODS[name](model, x, TARGETS, **opts))
    assert out.shape[:2] == (2, 1)


class Boom(Exception):
    """The user's own exception, raised from inside the model."""


class FailsAfter(torch.nn.Module):
    """``module`` for the first ``calls`` calls, then raises :class:`Boom`."""

    def __init__(self, module: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.module, self.calls = module, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls < 0:
            raise Boom("the model failed")
        return self.module(x)


@pytest.mark.parametrize("calls", [0, 1])
@pytest.mark.parametrize("name", list(METHODS))
def test_a_model_that_raises_midway_leaves_the_world_as_found(name, calls):
    """The head raises on the first call, or on the second (mid-way through the methods that
    run the model several times): the user's exception comes through as it is, and the world,
    the model's hooks, modes and flags are as before."""
    model, x, opts = subject(name)
    if name in TRANSFORMER_ONLY_METHODS:
        model.heads = FailsAfter(model.heads, calls)
    else:
        model[-1] = FailsAfter(model[-1], calls)
    hooks, global_hooks = hook_counts(model), global_hook_counts()
    training = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = world()
    try:
        METHODS[name](model, x, TARGETS, **opts)
    except Boom:
        pass
    else:
        assert calls > 0, f"{name} did not call the model"
    assert_same_world(before, world(), name)
    assert hook_counts(model) == hooks and global_hook_counts() == global_hooks
    assert training == {n: m.training for n, m in model.named_modules()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_explain_leaves_the_world_as_found():
    model, x, _ = subject("gradient")
    names = [n for n in METHODS if n not in TRANSFORMER_ONLY_METHODS]
    opts = {n: subject(n)[2] for n in names}
    out = unchanged("explain", lambda: explain(model, x, TARGETS, names, opts))
    assert list(out) == names
    out = unchanged("explain (shared methods)", lambda: explain(model, x, TARGETS))
    assert all(v.shape == (2, 1, 12, 12) for v in out.values())


# ---------------------------------------------------------------------------------------------
# The randomised entries with generator=None
# ---------------------------------------------------------------------------------------------

#: Entry -> options drawing from ``generator=None`` (RISE: ``seed=None``, as its default seed
#: is 0), small budgets.
GLOBAL_SEEDED: Dict[str, Dict[str, Any]] = {
    "smooth_grad": {"n_samples": 3},
    "extremal_perturbation": {"max_iter": 3, "areas": [0.3], "step": 2, "sigma": 1.5},
    "integrated_gradients": {"baseline": "uniform", "n_steps": 4},
    "rise": {"num_masks": 16, "num_cells": 3, "seed": None},
}


def draw(name: str, global_seed: int, **extra: Any) -> torch.Tensor:
    model, x, _ = subject(name)
    torch.manual_seed(global_seed)
    return unchanged(name, lambda: METHODS[name](model, x, TARGETS,
                                                 **{**GLOBAL_SEEDED[name], **extra}))


@pytest.mark.parametrize("name", GLOBAL_SEEDED)
def test_generator_none_derives_its_seed_from_the_global_rng_without_advancing_it(name):
    first = draw(name, 11)
    assert torch.equal(first, draw(name, 11))           # the same global state: the same map
    assert not torch.allclose(first, draw(name, 12))    # another global state: other draws
    model, x, _ = subject(name)
    torch.manual_seed(11)
    again = unchanged(name, lambda: METHODS[name](model, x, TARGETS, **GLOBAL_SEEDED[name]))
    assert torch.equal(first, again)                    # a repeated call: the same draws


@pytest.mark.parametrize("name", GLOBAL_SEEDED)
def test_a_callers_generator_is_advanced_and_the_global_rng_is_not(name):
    extra = {"seed": None} if name == "rise" else {}
    g = torch.Generator().manual_seed(4)
    before = g.get_state()
    first = draw(name, 11, **{**extra, "generator": g})
    assert not torch.equal(before, g.get_state())
    g.set_state(before)
    assert torch.equal(first, draw(name, 12, **{**extra, "generator": g}))


def test_rise_default_seed_ignores_the_global_rng():
    opts = {"num_masks": 16, "num_cells": 3}
    model, x, _ = subject("rise")
    maps = []
    for global_seed in (11, 12):
        torch.manual_seed(global_seed)
        maps.append(unchanged("rise", lambda: METHODS["rise"](model, x, TARGETS, **opts)))
    assert torch.equal(maps[0], maps[1])


# ---------------------------------------------------------------------------------------------
# Plotting helpers, example data
# ---------------------------------------------------------------------------------------------

MAP = torch.rand((2, 1, 12, 12), generator=torch.Generator().manual_seed(3))
IMAGE = torch.rand((2, 3, 12, 12), generator=torch.Generator().manual_seed(4))
FLAT = torch.zeros(1, 1, 12, 12)

PLOTS: Dict[str, Callable[[str], Any]] = {
    "saliency_plot": lambda d: saliency_plot(IMAGE, MAP),
    "saliency_plot_save": lambda d: saliency_plot(IMAGE, MAP, save=os.path.join(d, "a.png")),
    "saliency_plot_volume": lambda d: saliency_plot(IMAGE[:, :, None].expand(2, 3, 4, 12, 12),
                                                    MAP[:, :, None].expand(2, 1, 4, 12, 12),
                                                    slice="all"),
    "plot_methods": lambda d: plot_methods(IMAGE, {"a": MAP, "b": -MAP}),
    "plot_methods_save": lambda d: plot_methods(IMAGE, {"a": MAP}, save=os.path.join(d, "b.pdf")),
    "overlay": lambda d: overlay(IMAGE, MAP),
    "plot_example": lambda d: plot_example(IMAGE[:1], MAP[:1], "gradient", 1),
    "plot_example_save": lambda d: plot_example(IMAGE[:1], MAP[:1], "gradient", 1,
                                                save_path=os.path.join(d, "c.png")),
    "plot_example_flat_map": lambda d: plot_example(IMAGE[:1], FLAT, "gradient", 1),
}


def pixels(out: Any) -> np.ndarray:
    """A helper's result as pixels: a figure drawn by its canvas, or the blended array."""
    if isinstance(out, np.ndarray):
        return out
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(out)  # (a saved and closed figure has a bare canvas)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


@pytest.mark.parametrize("state", ["with_device_meta", "default_dtype_float64", "no_grad"])
@pytest.mark.parametrize("helper", PLOTS)
def test_plotting_helpers_under_an_ambient_state(helper, state, close_figures):
    """The same pixels under the caller's default device, default dtype and grad mode."""
    with tempfile.TemporaryDirectory() as folder:
        ref = pixels(PLOTS[helper](folder))
        with AMBIENT[state]():
            out = pixels(PLOTS[helper](folder))
    assert out.shape == ref.shape and np.array_equal(out, ref), (helper, state)


@pytest.mark.parametrize("helper", PLOTS)
def test_plotting_helpers_leave_the_world_as_found(helper, close_figures):
    with tempfile.TemporaryDirectory() as folder:
        out = unchanged(helper, lambda: PLOTS[helper](folder))
        written = os.listdir(folder)
    assert out is not None
    assert len(written) == ("save" in helper)


def test_example_data_and_embedded_models_leave_the_global_rng_alone():
    # Before: each call advanced it (the initialisation the shipped weights replace).
    model, x, first, second = unchanged("get_example_data",
                                        lambda: get_example_data("embedded-vgg16"))
    assert x.shape == (1, 3, 64, 64) and first != second and not model.training
    unchanged("load_embedded_model", lambda: load_embedded_model("embedded-resnet"))


@pytest.mark.parametrize("state", ["with_device_meta", "set_default_device_meta",
                                   "default_dtype_float64"])
def test_example_data_under_the_default_device_and_dtype(state):
    """Before: "Cannot copy out of meta tensor" (the model built on the meta default device)
    and "Input type (float) and bias type (double)" (a float32 image, a float64 model)."""
    ref_model, ref_x, *ref_ids = get_example_data("embedded-vgg16")
    with AMBIENT[state]():
        model, x, *ids = get_example_data("embedded-vgg16")
        resnet = load_embedded_model("embedded-resnet")
    dtype = torch.float64 if state == "default_dtype_float64" else torch.float32
    params = list(model.parameters()) + list(resnet.parameters())
    assert all(p.device.type == "cpu" and p.dtype == dtype for p in params)
    assert x.dtype == dtype and x.device.type == "cpu" and ids == ref_ids
    torch.testing.assert_close(x.float(), ref_x)
    with torch.no_grad():
        torch.testing.assert_close(model(x).float(), ref_model(ref_x), rtol=1e-4, atol=1e-4)


def test_example_data_random_weights_fallback_leaves_the_global_rng_alone(monkeypatch):
    # Before: the fallback called torch.manual_seed(0) on the caller's global RNG.
    calls: List[bool] = []

    def missing(name: str, pretrained: bool = True) -> torch.nn.Module:
        calls.append(pretrained)
        if pretrained:
            raise WeightsError("weights file missing (simulated)")
        return load_embedded_model(name, pretrained=False)

    monkeypatch.setattr(example_data, "load_embedded_model", missing)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model, _, _, _ = unchanged("get_example_data",
                                   lambda: get_example_data("embedded-vgg16"))
    torch.manual_seed(0)  # the fallback's weights are still those of seed 0
    reference = load_embedded_model("embedded-vgg16", pretrained=False)
    assert calls == [True, False]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


# ---------------------------------------------------------------------------------------------
# Benchmark functions
# ---------------------------------------------------------------------------------------------


OBJECT = torch.zeros(12, 12, dtype=torch.bool)
OBJECT[3:6, 3:6] = True


def pointing_game() -> Tuple[List[int], float]:
    game = PointingGame(4, tolerance=2)  # (made under the state, as a user's would be)
    hits = [game.evaluate(OBJECT, point) for point in ((6, 6), (7, 7), (0, 11))]
    for hit in hits:
        game.aggregate(hit, 1)
    return hits, game.accuracy


BENCHMARKS: Dict[str, Callable[[torch.nn.Module, torch.Tensor], Any]] = {
    "deletion": lambda m, x: deletion_insertion(m, x, MAP, TARGETS),
    "insertion_blur": lambda m, x: deletion_insertion(m, x, MAP, TARGETS, mode="insertion"),
    "deletion_insertion_both": lambda m, x: deletion_insertion_both(m, x, MAP, TARGETS),
    "random_saliency": lambda m, x: random_saliency(x, generator=3),
    "random_saliency_global": lambda m, x: random_saliency(x),
    "sanity_checks": lambda m, x: sanity_checks(m, x, TARGETS, "gradient"),
    "pointing_game": lambda m, x: pointing_game(),
}


def numbers(out: Any) -> List[Any]:
    """The tensors and numbers of a benchmark's result, in order."""
    if isinstance(out, (torch.Tensor, int, float, str)):
        return [out]
    if isinstance(out, dict):
        return [v for value in out.values() for v in numbers(value)]
    if isinstance(out, (list, tuple)):
        return [v for value in out for v in numbers(value)]
    return numbers(vars(out)) if hasattr(out, "__dict__") else []


@pytest.mark.parametrize("state", [None, "with_device_meta", "default_dtype_float64"])
@pytest.mark.parametrize("function", BENCHMARKS)
def test_benchmark_functions(function, state):
    model, x, _ = subject("gradient")
    ref = unchanged(function, lambda: BENCHMARKS[function](model, x))
    if state is None:
        return
    with AMBIENT[state]():
        out = BENCHMARKS[function](model, x)
    got, want = numbers(out), numbers(ref)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.device == b.device, (function, state)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
        else:
            assert a == b or (a != a and b != b), (function, state)  # (NaN == NaN)
