"""The Quantus adapter (torchray_like.benchmark.quantus.explain) and
benchmarks/quantus_metrics.py.

The conventions are checked against an installed Quantus 0.6 as a black box (skipped without
it): Quantus scoring with ``explain_func=explain`` gives the same numbers as Quantus scoring the
maps we computed beforehand (``a_batch``), on the same seeded perturbations.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from torchray_like.attribution.registry import METHODS, TRANSFORMER_ONLY_METHODS
from torchray_like.benchmark.embedded_cli import load_benchmark_model
from torchray_like.benchmark.embedded_data import EmbeddedShapes
from torchray_like.benchmark.quantus import QUANTUS_HINT, explain
from torchray_like.benchmark.settings import method_options

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def vgg():
    model, _ = load_benchmark_model("embedded-vgg", "random", seed=3)
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    data = EmbeddedShapes("test", size=3)
    x = np.stack([data[i][0].numpy() for i in range(3)]).astype(np.float32)
    y = np.array([int(data[i][1]["class_ids"][0]) for i in range(3)], dtype=np.int64)
    return x, y


def options(method):
    """The settings table's cheapest options (benchmark "speed")."""
    out = method_options(method, "embedded-vgg", "speed")
    if method in ("rise", "extremal_perturbation"):
        out["generator"] = 0
    return out


def state_of(model):
    return (model.training, [p.requires_grad for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


# ---------------------------------------------------------------------------------------------
# The adapter


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_in_quantus_convention(method, vgg, batch):
    """float32 NumPy (N, 1, H, W) at the input's size, equal to the method itself with
    resize=True; the model's state unchanged."""
    if method in TRANSFORMER_ONLY_METHODS:
        pytest.skip("explains transformers only (the model here is a CNN)")
    x, y = batch
    before = state_of(vgg)
    maps = explain(vgg, x, y, method=method, **options(method))
    assert isinstance(maps, np.ndarray) and maps.dtype == np.float32
    assert maps.shape == (3, 1, 64, 64)
    assert np.isfinite(maps).all()
    kwargs = {**options(method), "resize": True} if method != "smooth_grad" else options(method)
    if method in ("rise", "extremal_perturbation"):
        kwargs["progress"] = False
    direct = METHODS[method](vgg, torch.from_numpy(x), y.tolist(), **kwargs).detach().numpy()
    np.testing.assert_allclose(maps, direct, rtol=1e-5, atol=1e-6)
    after = state_of(vgg)
    assert before[0] == after[0] and before[1] == after[1]
    assert all(torch.equal(before[2][k], v) for k, v in after[2].items())


def test_layer_maps_are_resized_to_the_input(vgg, batch):
    x, y = batch
    maps = explain(vgg, x, y, method="grad_cam", saliency_layer="features.14")
    layer = METHODS["grad_cam"](vgg, torch.from_numpy(x), y.tolist(),
                                saliency_layer="features.14")
    assert tuple(layer.shape[2:]) != (64, 64) and maps.shape == (3, 1, 64, 64)
    # resize=False is the caller's choice: the map is then interpolated to the input anyway.
    small = explain(vgg, x, y, method="grad_cam", saliency_layer="features.14", resize=False)
    assert small.shape == (3, 1, 64, 64)


def test_channel_last_round_trip_and_tensor_inputs(vgg, batch):
    x, y = batch
    first = explain(vgg, x, y, method="gradient")
    last = explain(vgg, np.moveaxis(x, 1, -1), y, method="gradient", channel_first=False)
    assert last.shape == (3, 64, 64, 1)
    np.testing.assert_array_equal(np.moveaxis(last, -1, 1), first)
    np.testing.assert_array_equal(explain(vgg, torch.from_numpy(x), torch.from_numpy(y)),
                                  first)


def test_targets_forms(vgg, batch):
    x, y = batch
    one = explain(vgg, x, 2, method="gradient")
    np.testing.assert_array_equal(one, explain(vgg, x, [2, 2, 2], method="gradient"))
    np.testing.assert_array_equal(explain(vgg, x, y.astype(np.float64)),
                                  explain(vgg, x, y))          # integral floats accepted
    np.testing.assert_array_equal(explain(vgg, x, y[:, None]), explain(vgg, x, y))


def test_float64_inputs_follow_the_models_dtype(vgg, batch):
    x, y = batch
    np.testing.assert_allclose(explain(vgg, x.astype(np.float64), y), explain(vgg, x, y),
                               rtol=1e-6)


def test_works_under_no_grad_and_leaves_it(vgg, batch):
    x, y = batch
    with torch.no_grad():
        maps = explain(vgg, x, y, method="gradient")
        assert not torch.is_grad_enabled()
    np.testing.assert_array_equal(maps, explain(vgg, x, y, method="gradient"))


def test_a_model_without_parameters_uses_device():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten())
    for p in model.parameters():
        p.requires_grad_(False)
    bare = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())   # no parameters at all
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    maps = explain(bare, x, [0, 1], device="cpu")
    assert maps.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="device must name a torch device"):
        explain(bare, x, [0, 1], device="nowhere")
    assert explain(model, x, [0, 1], device="cuda:7").shape == (2, 1, 8, 8)  # model's device


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, x, y: explain(m, x, y, method="nope"), ValueError,
     "unknown method 'nope'; choose from gradient"),
    (lambda m, x, y: explain(m, x, y, method=METHODS["gradient"]), TypeError,
     "method must be the name of a method of METHODS"),
    (lambda m, x, y: explain(m, x, y, method="grad_cam", layer="features.14"), TypeError,
     "method 'grad_cam' takes no option\\(s\\) 'layer'; its options are"),
    (lambda m, x, y: explain(m, x, y, method="gradient", target=1), TypeError,
     "target cannot be an option"),
    (lambda m, x, y: explain(m, x.astype(np.int64), y), TypeError,
     "inputs must be a floating-point array"),
    (lambda m, x, y: explain(m, x[0, 0], y), ValueError,
     "inputs must have shape \\(N, C, \\*spatial\\)"),
    (lambda m, x, y: explain(m, x.tolist(), y), TypeError,
     "inputs must be a NumPy array or a tensor"),
    (lambda m, x, y: explain(m, np.where(x > 0, np.nan, x), y), ValueError, "NaN"),
    (lambda m, x, y: explain(m, x, y[:2]), ValueError, "3 inputs, 2 targets"),
    (lambda m, x, y: explain(m, x, y + 0.5), ValueError, "one class index per input"),
    (lambda m, x, y: explain(m, x, np.ones((3, 2), dtype=int)), ValueError,
     "one class index per input"),
    (lambda m, x, y: explain(lambda t: t, x, y), TypeError,
     "model must be a torch.nn.Module"),
])
def test_hostile_arguments(call, exc, match, vgg, batch):
    x, y = batch
    with pytest.raises(exc, match=match):
        call(vgg, x, y)


def test_quantus_hint_names_the_command():
    assert "pip install quantus" in QUANTUS_HINT


# ---------------------------------------------------------------------------------------------
# Against Quantus (black box)


def _quantus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("quantus")


def _score(metric, vgg, x, y, kwargs, a_batch=None):
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.random.seed(0)
            return metric(model=vgg, x_batch=x, y_batch=y, a_batch=a_batch,
                          explain_func=explain, explain_func_kwargs=kwargs, device="cpu")
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("name, make", [
    ("Sparseness", lambda q: q.Sparseness(disable_warnings=True)),
    ("FaithfulnessCorrelation", lambda q: q.FaithfulnessCorrelation(
        nr_runs=10, subset_size=64, return_aggregate=False, disable_warnings=True)),
    ("MaxSensitivity", lambda q: q.MaxSensitivity(nr_samples=3, disable_warnings=True)),
])
def test_quantus_scores_our_explain_func_as_our_precomputed_maps(name, make, vgg, batch):
    """Quantus calling explain (model, inputs, targets, device=...) gives exactly the scores of
    Quantus reading the maps we computed: the arguments, layout and shapes are Quantus's."""
    quantus = _quantus()
    x, y = batch
    kwargs = {"method": "grad_cam", "saliency_layer": "features.14"}
    ours = explain(vgg, x, y, **kwargs)
    via_explain = _score(make(quantus), vgg, x, y, kwargs)
    via_maps = _score(make(quantus), vgg, x, y, kwargs, a_batch=ours)
    assert len(via_explain) == (3 if name != "FaithfulnessCorrelation" else 3)
    np.testing.assert_allclose(np.asarray(via_explain, dtype=float),
                               np.asarray(via_maps, dtype=float), rtol=1e-6)
    assert np.isfinite(np.asarray(via_explain, dtype=float)).all()


def test_quantus_mprt_explains_randomised_copies_and_leaves_the_model(vgg, batch):
    quantus = _quantus()
    x, y = batch
    before = state_of(vgg)
    scores = _score(quantus.MPRT(disable_warnings=True), vgg, x, y, {"method": "gradient"})
    assert isinstance(scores, dict) and list(scores)[0] == "original"
    assert all(len(v) == 3 for v in scores.values())
    np.testing.assert_allclose(scores["original"], 1.0, atol=1e-6)   # the map against itself
    after = state_of(vgg)
    assert all(torch.equal(before[2][k], v) for k, v in after[2].items())


# ---------------------------------------------------------------------------------------------
# The script


def test_script_without_quantus_says_how_to_install(monkeypatch, capsys, tmp_path):
    script = load_benchmark("quantus_metrics")
    monkeypatch.setitem(sys.modules, "quantus", None)   # import quantus -> ImportError
    code = script.main(["--weights", "random", "--methods", "gradient", "--limit", "1",
                        "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "Quantus is not installed: pip install quantus" in err and "Traceback" not in err
    assert not (tmp_path / "quantus_metrics.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "nope"], "--metrics: unknown name(s) nope"),
    (["--methods", "nope"], "--methods: unknown name(s) nope"),
    (["--limit", "0"], "positive integer"),
    (["--device", "nowhere"], "--device: not a device: 'nowhere'"),
])
def test_script_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        load_benchmark("quantus_metrics").main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_script_tiny_run(tmp_path, capsys):
    _quantus()
    import json

    script = load_benchmark("quantus_metrics")
    state = np.random.get_state()
    threads = torch.get_num_threads()
    code = script.main(["--weights", "random", "--models", "embedded-vgg", "--methods",
                        "gradient,grad_cam", "--metrics", "sparseness", "mprt", "--limit", "3",
                        "--out", str(tmp_path)])
    assert code == 0
    assert np.array_equal(np.random.get_state()[1], state[1])       # NumPy's generator kept
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert "sparseness (higher better)" in out and "mprt (lower better)" in out
    data = json.loads((tmp_path / "quantus_metrics.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["gradient", "grad_cam"]
    for row in data["rows"]:
        assert row["images"] == 3
        for metric in ("sparseness", "mprt"):
            assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"]
            assert row[f"{metric}_defined"] <= 3
    assert data["settings"]["quantus"].startswith("0.6")
    assert (tmp_path / "quantus_metrics.csv").read_text().startswith("method,model,images,")
