"""Sanity checks (Adebayo et al. 2018): similarity metrics against direct scipy / skimage
computations and hand values, the randomisation schedules against manual re-initialisation,
the caller's model left untouched, argument checks, and (when the shipped weights exist) the
expected behaviour of the methods on the embedded models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity

from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import guided_backprop
from torchray_like.benchmark.sanity_checks import (
    METRICS,
    compare_maps,
    layer_seed,
    randomization_layers,
    randomize_layer,
    sanity_checks,
    summarize,
)

from .conftest import ConvNet, inputs, load_benchmark, trained_embedded_model


class Net(nn.Module):
    """Conv layers registered in an order that differs from the call order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 4)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Metrics


def test_compare_maps_against_scipy_and_skimage():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 40, 32, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(1, 40, 32, generator=g, dtype=torch.float64)
    got = compare_maps(a, b)
    an, bn = a[0].numpy(), b[0].numpy()
    assert got["spearman_abs"] == pytest.approx(spearmanr(np.abs(an).ravel(),
                                                          np.abs(bn).ravel()).statistic)
    assert got["spearman"] == pytest.approx(spearmanr(an.ravel(), bn.ravel()).statistic)
    ua, ub = np.abs(an) / np.abs(an).max(), np.abs(bn) / np.abs(bn).max()
    assert got["ssim"] == pytest.approx(structural_similarity(ua, ub, data_range=1.0))
    ha = hog(ua, pixels_per_cell=(8, 8), cells_per_block=(3, 3))
    hb = hog(ub, pixels_per_cell=(8, 8), cells_per_block=(3, 3))
    assert ha.size == (5 - 2) * (4 - 2) * 81
    assert got["hog"] == pytest.approx(spearmanr(ha, hb).statistic)
    assert set(got) == set(METRICS) and all(isinstance(v, float) for v in got.values())


def test_compare_maps_hand_values():
    # Spearman of [1, 2, 3, 4] and [1, 3, 2, 4]: 1 - 6 * 2 / (4 * 15) = 0.8
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    got = compare_maps(a, b)
    assert got["spearman"] == pytest.approx(0.8)
    assert got["spearman_abs"] == pytest.approx(0.8)
    assert np.isnan(got["ssim"]) and np.isnan(got["hog"])    # too small for a 3-px window
    # a monotone transform keeps the ranking; a sign flip reverses the signed one only
    x = torch.randn(24, 24, generator=torch.Generator().manual_seed(1))
    same = compare_maps(x, x ** 3)
    assert same["spearman"] == pytest.approx(1.0)
    flipped = compare_maps(x, -x)
    assert flipped["spearman"] == pytest.approx(-1.0)
    assert flipped["spearman_abs"] == pytest.approx(1.0)
    assert flipped["ssim"] == pytest.approx(1.0) and flipped["hog"] == pytest.approx(1.0)
    # scale does not matter (maps are scaled to [0, 1] for SSIM and HOG)
    scaled = compare_maps(x.abs(), 5 * x.abs())
    assert all(v == pytest.approx(1.0) for v in scaled.values())


def test_compare_maps_constant_maps():
    x = torch.rand(16, 16, generator=torch.Generator().manual_seed(2))
    zero = torch.zeros(16, 16)
    got = compare_maps(x, zero)
    assert got["spearman"] == 0.0 and got["spearman_abs"] == 0.0 and got["hog"] == 0.0
    assert got["ssim"] == pytest.approx(structural_similarity(
        x.numpy().astype(np.float64) / float(x.max()), np.zeros((16, 16)), data_range=1.0,
        win_size=7))
    both = compare_maps(zero, zero)
    assert np.isnan(both["spearman"]) and np.isnan(both["spearman_abs"])
    assert both["ssim"] == pytest.approx(1.0)


def test_compare_maps_other_ranks_and_errors():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(1, 50, generator=g), torch.rand(1, 50, generator=g)
    got = compare_maps(a, b)
    assert np.isnan(got["hog"]) and np.isfinite(got["ssim"])
    assert got["spearman"] == pytest.approx(spearmanr(a[0], b[0]).statistic)
    v = compare_maps(torch.rand(1, 8, 9, 10, generator=g), torch.rand(1, 8, 9, 10, generator=g))
    assert np.isnan(v["hog"]) and np.isfinite(v["ssim"])
    with pytest.raises(ValueError, match="same shape"):
        compare_maps(torch.rand(4, 4), torch.rand(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        compare_maps(torch.full((4, 4), float("nan")), torch.rand(4, 4))
    with pytest.raises(ValueError, match="reference"):
        compare_maps(torch.rand(1), torch.rand(1))


# ---------------------------------------------------------------------------------------------
# Randomisation


def test_randomization_layers_follow_the_call_order():
    model = Net().eval()
    assert randomization_layers(model, inputs(2, n=1, size=6)) == ["fc", "conv2", "conv1"]
    vgg_like = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    assert randomization_layers(vgg_like, torch.rand(1, 3, 6, 6)) == ["3", "0"]


def test_randomize_layer_is_seeded_and_keeps_the_global_rng():
    a, b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    state = torch.get_rng_state()
    randomize_layer(a, 7)
    randomize_layer(b, 7)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    c = nn.Conv2d(3, 4, 3)
    randomize_layer(c, 8)
    assert not torch.equal(a.weight, c.weight)
    # a module without reset_parameters: normal values at the trained scale

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((1000,), 3.0) + torch.randn(1000))

    s = Scale()
    randomize_layer(s, 0)
    w = s.w.detach()
    assert abs(float(w.mean())) < 0.2 and 0.8 < float(w.std()) < 1.2


def _manual_maps(model, x, target, layers, mode, reinit):
    """Maps of `gradient` on hand-randomised copies, step 0 = the original."""
    out = [gradient(model, x, target, resize=True)]
    twin = copy.deepcopy(model)
    for k, name in enumerate(layers):
        if mode == "independent":
            twin = copy.deepcopy(model)
        reinit(twin.get_submodule(name), k)
        out.append(gradient(twin, x, target, resize=True))
    return out


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_schedules_match_manual_randomisation(mode):
    model = Net().eval()
    x = inputs(2, n=2, size=8)
    before = state_of(model)
    layers = ["fc", "conv2", "conv1"]
    order = {}

    def reinit(module, seed):
        # Deterministic and recognisable: weights from a seeded generator per layer name.
        name = next(n for n, m in model.named_modules() if type(m) is type(module)
                    and m.weight.shape == module.weight.shape)
        k = layers.index(name)
        order.setdefault(mode, []).append(name)
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen))

    records, maps = sanity_checks(model, x, [1, 3], "gradient", layers, mode=mode,
                                  reinit=reinit, return_maps=True)
    assert order[mode] == layers

    def manual_reinit(module, k):
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen))

    expected = _manual_maps(model, x, [1, 3], layers, mode, manual_reinit)
    assert maps.shape == (4, 2, 1, 8, 8)
    for k in range(4):
        torch.testing.assert_close(maps[k], expected[k])
    assert len(records) == 4 * 2
    for r in records:
        assert set(r) == {"method", "mode", "step", "layer", "image", "target", *METRICS}
        ref = compare_maps(expected[0][r["image"]], expected[r["step"]][r["image"]])
        for m in METRICS:
            np.testing.assert_allclose(r[m], ref[m])
    assert [r["layer"] for r in records[::2]] == ["original"] + layers
    assert [r["target"] for r in records[:2]] == [1, 3]
    assert all(r[m] == pytest.approx(1.0) for r in records if r["step"] == 0
               for m in ("spearman", "spearman_abs", "ssim"))
    # the caller's model is untouched
    after = state_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_default_reinit_same_weights_in_both_modes():
    model = Net().eval()
    x = inputs(2, n=1, size=8)
    _, casc = sanity_checks(model, x, 0, "gradient", mode="cascading", return_maps=True)
    _, ind = sanity_checks(model, x, 0, "gradient", mode="independent", return_maps=True)
    # Step 1 randomises the top layer only, in both modes.
    torch.testing.assert_close(casc[1], ind[1])
    torch.testing.assert_close(casc[0], ind[0])
    assert not torch.allclose(casc[2], ind[2])
    # reproducible; another seed gives other maps
    _, again = sanity_checks(model, x, 0, "gradient", return_maps=True)
    torch.testing.assert_close(again, casc)
    _, other = sanity_checks(model, x, 0, "gradient", seed=1, return_maps=True)
    assert not torch.allclose(other[1], casc[1])


def test_linear_model_closed_form():
    """Gradient map of a linear model = max over channels of |W_c|: randomising the layer
    replaces W, and the metrics are those of |W_c| and |W'_c| computed directly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 12 * 12, 3)).eval()
    x = torch.randn(1, 2, 12, 12)
    w_old = model[1].weight.detach()[2].view(2, 12, 12).abs().amax(0)
    records = sanity_checks(model, x, 2, "gradient", seed=5)
    twin = copy.deepcopy(model)
    randomize_layer(twin[1], layer_seed(5, "1"))      # the seed sanity_checks gives layer "1"
    w_new = twin[1].weight.detach()[2].view(2, 12, 12).abs().amax(0)
    assert records[1]["layer"] == "1"
    assert records[1]["spearman_abs"] == pytest.approx(
        spearmanr(w_old.numpy().ravel(), w_new.numpy().ravel()).statistic)
    ua, ub = (w_old / w_old.max()).double().numpy(), (w_new / w_new.max()).double().numpy()
    assert records[1]["ssim"] == pytest.approx(structural_similarity(ua, ub, data_range=1.0),
                                               abs=1e-6)


def test_method_kwargs_modules_are_retargeted():
    model = ConvNet(2, classes=4).eval()
    x = inputs(2, n=1, size=8)
    before = state_of(model)
    by_name = sanity_checks(model, x, 1, "grad_cam",
                            method_kwargs={"saliency_layer": "features.3"}, return_maps=True)
    by_module = sanity_checks(model, x, 1, "grad_cam",
                              method_kwargs={"saliency_layer": model.features[3]},
                              return_maps=True)
    torch.testing.assert_close(by_name[1], by_module[1])
    assert all(torch.equal(before[k], v) for k, v in state_of(model).items())
    # a callable method and layers given as modules
    recs = sanity_checks(model, x, 1, guided_backprop, layers=[model.fc, model.features[3]],
                         mode="independent")
    assert [r["layer"] for r in recs] == ["original", "fc", "features.3"]
    assert recs[0]["method"] == "guided_backprop"


def test_randomised_methods_and_summary():
    model = ConvNet(2, classes=4).eval()
    x = inputs(2, n=2, size=16)
    recs = sanity_checks(model, x, [0, 1], "rise",
                         method_kwargs={"num_masks": 32, "seed": 0, "batch_size": 16})
    layers = randomization_layers(model, x)
    assert len(recs) == 2 * (len(layers) + 1)
    s = summarize(recs)
    assert [row["step"] for row in s] == list(range(len(layers) + 1))
    assert s[0]["n"] == 2 and s[0]["spearman"] == pytest.approx(1.0)
    for row in s:
        vals = [r["ssim"] for r in recs if r["step"] == row["step"]]
        assert row["ssim"] == pytest.approx(float(np.mean(vals)))


def test_model_state_restored_train_mode():
    model = ConvNet(2, classes=4).train()
    before = state_of(model)
    sanity_checks(model, inputs(2, n=1, size=8), 0, "gradient", mode="independent")
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in state_of(model).items())


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"mode": "cascade"}, ValueError, "mode"),
    ({"layers": ["nope"]}, ValueError, "layers"),
    ({"layers": []}, ValueError, "layers"),
    ({"layers": ["fc", "fc"]}, ValueError, "twice"),
    ({"layers": ["features.2"]}, ValueError, "no parameters"),
    ({"layers": [nn.Linear(2, 2)]}, ValueError, "not a sub-module"),
    ({"layers": [3]}, TypeError, "layers"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, ValueError, "seed"),
    ({"method_kwargs": [1]}, TypeError, "method_kwargs"),
    ({"reinit": 3}, TypeError, "reinit"),
])
def test_bad_arguments(kwargs, exc, match):
    model = ConvNet(2, classes=4).eval()
    with pytest.raises(exc, match=match):
        sanity_checks(model, inputs(2, n=1, size=8), 0, "gradient", **kwargs)


def test_bad_method_and_input():
    model = ConvNet(2, classes=4).eval()
    x = inputs(2, n=1, size=8)
    with pytest.raises(ValueError, match="unknown attribution method"):
        sanity_checks(model, x, 0, "gradients")
    with pytest.raises(TypeError, match="method"):
        sanity_checks(model, x, 0, 3)
    with pytest.raises(ValueError, match="input"):
        sanity_checks(model, x[0], 0, "gradient")
    with pytest.raises(TypeError, match="model"):
        sanity_checks(lambda t: t, x, 0, "gradient")


# ---------------------------------------------------------------------------------------------
# The embedded models (needs the shipped weights)


#: Thresholds on the mean Spearman correlation of |map| with the original once the top two
#: layers are randomised (cascading: the logits and the layer below).  Observed on the embedded
#: models (4 images; see docs/benchmarks.rst): guided backprop 0.95 (VGG) / 0.84 (ResNet),
#: excitation backprop 0.99 / 0.80, gradient 0.41 / 0.46, RISE 0.30 / 0.42, Grad-CAM
#: -0.06 / 0.14, contrastive EBP -0.03 / 0.09.  Class-insensitive methods stay above STAY,
#: gradient and RISE fall below CHANGE, Grad-CAM and contrastive EBP below CHANGE_CLASS, and
#: the first group stays above the second by MARGIN.
STAY, CHANGE, CHANGE_CLASS, MARGIN = 0.6, 0.65, 0.45, 0.1


@pytest.mark.parametrize("name", ["embedded-vgg", "embedded-resnet"])
def test_embedded_methods_after_top_layers_randomisation(name):
    """Cascading randomisation of the top two layers: guided backprop and excitation backprop
    stay similar to the original map; gradient, Grad-CAM, contrastive excitation backprop and
    RISE do not (mean Spearman correlation of |map| over 4 test images)."""
    from torchray_like.benchmark.deletion_insertion import top_present_class
    from torchray_like.benchmark.embedded_data import EmbeddedShapes
    from torchray_like.benchmark.settings import method_options

    model = trained_embedded_model(name)
    data = EmbeddedShapes("test", size=4)
    x = torch.stack([data[i][0] for i in range(4)])
    target = top_present_class(model, x, [data[i][1]["class_ids"].tolist() for i in range(4)],
                               "sigmoid")
    layers = randomization_layers(model, x)[:2]
    sim = {}
    for method in ("guided_backprop", "excitation_backprop", "gradient", "grad_cam",
                   "contrastive_excitation_backprop", "rise"):
        kw = method_options(method, name, "deletion_insertion")
        if method == "rise":
            kw.update(num_masks=500, generator=0)
        recs = sanity_checks(model, x, target, method, layers, method_kwargs=kw)
        sim[method] = summarize(recs)[2]["spearman_abs"]
    for method in ("guided_backprop", "excitation_backprop"):
        assert sim[method] > STAY, sim
    for method in ("gradient", "rise"):
        assert sim[method] < CHANGE, sim
    for method in ("grad_cam", "contrastive_excitation_backprop"):
        assert sim[method] < CHANGE_CLASS, sim
    assert min(sim["guided_backprop"], sim["excitation_backprop"]) > MARGIN + max(
        sim[m] for m in ("gradient", "grad_cam", "contrastive_excitation_backprop", "rise")), sim


# ---------------------------------------------------------------------------------------------
# The script


def test_script_runs_and_rebuilds(tmp_path, capsys):
    import json

    script = load_benchmark("sanity_checks")
    base = ["--weights", "random", "--models", "embedded-vgg", "--methods", "gradient",
            "guided_backprop", "--limit", "1", "--modes", "cascading", "--no-progress",
            "--out", str(tmp_path)]
    assert script.main(base) == 0
    out = capsys.readouterr().out
    assert "guided_backprop" in out and "rank|top" in out
    for f in ("sanity_checks.csv", "sanity_checks.json", "sanity_checks_cascading.png"):
        assert (tmp_path / f).exists(), f
    assert not (tmp_path / "sanity_checks_independent.png").exists()
    data = json.loads((tmp_path / "sanity_checks.json").read_text())
    from torchray_like.benchmark.embedded_data import EmbeddedShapes
    from torchray_like.benchmark.embedded_models import load_embedded_model
    x = EmbeddedShapes("test", size=1)[0][0][None]
    layers = randomization_layers(load_embedded_model("embedded-vgg", pretrained=False), x)
    rows = [r for r in data["rows"] if r["method"] == "gradient" and r["mode"] == "cascading"]
    assert [r["layer"] for r in rows] == ["original"] + layers
    assert rows[0]["spearman_abs"] == pytest.approx(1.0)
    assert script.main(base + ["--from-store"]) == 0


def test_script_summary_intervals_and_published_findings():
    """Synthetic records: the summary's intervals are the bootstrap over images (undefined
    values left out), the headline carries them, and guided backprop's robustness to the
    top-layer randomisation is compared with the gradient's image by image."""
    from torchray_like.benchmark.intervals import mean_interval

    script = load_benchmark("sanity_checks")
    rng = np.random.default_rng(1)
    records = []
    for image in range(10):
        for method, level in (("gradient", 0.2), ("guided_backprop", 0.9)):
            curve = [1.0, level + rng.normal(0, 0.05), level / 2, 0.0]
            if image == 3 and method == "gradient":
                curve[1] = None                         # undefined (a constant map)
            records.append({"model": "m", "method": method, "image": image, "seconds": 1.0,
                            "layers": ["original", "fc", "conv2", "conv1"],
                            "cascading": {metric: list(curve) for metric in METRICS}})
    config = {"models": ["m"], "methods": ["gradient", "guided_backprop"],
              "modes": ["cascading"], "seed": 0}
    rows = script.summarize(records, config)
    top = rows[1]
    values = [r["cascading"]["spearman_abs"][1] for r in records if r["method"] == "gradient"]
    expected = mean_interval(np.array([np.nan if v is None else v for v in values]))
    assert (top["spearman_abs"], top["spearman_abs_low"], top["spearman_abs_high"]) == \
        pytest.approx((expected.estimate, expected.low, expected.high))
    head = script.headline(rows, config)
    assert head[0]["rank|top_low"] == pytest.approx(expected.low)
    assert head[0]["rank|all"] == pytest.approx(0.0)
    comparisons = script.compare_published(records, config)
    assert [(c["better"], c["worse"], c["verdict"], c["images"]) for c in comparisons] == [
        ("guided_backprop", "gradient", "reproduced", 9)]         # image 3 left out of both
    assert comparisons[0]["difference"] == pytest.approx(0.7, abs=0.05)


def test_library_summary_has_intervals_over_the_records():
    from torchray_like.benchmark.intervals import mean_interval

    values = [0.1, 0.5, float("nan"), 0.3, 0.9]
    recs = [{"method": "gradient", "mode": "cascading", "step": 1, "layer": "fc",
             **{m: v for m in METRICS}} for v in values]
    s = summarize(recs, seed=3)[0]
    expected = mean_interval(values, seed=3)
    assert s["n"] == 5 and s["spearman"] == pytest.approx(0.45)
    assert (s["spearman_low"], s["spearman_high"]) == pytest.approx((expected.low,
                                                                      expected.high))
    empty = summarize([{**recs[0], "ssim": float("nan")}])[0]
    assert np.isnan(empty["ssim"]) and np.isnan(empty["ssim_low"])
