"""No cross-sample leakage, for every entry of METHODS and for ``explain``: the map a batch gives
sample ``i`` is the map a call with sample ``i`` alone (and its own target) gives.

The contract, by family (float32, CPU):

* Deterministic methods (gradient family, guided backprop, DeConvNet, linear approximation,
  the CAM family including Score-CAM / Ablation-CAM / Eigen-CAM, excitation backprop and its
  contrastive variant, LRP and its composites, integrated gradients, occlusion, the attention
  methods): equal up to float rounding (batched kernels sum in another order): relative
  ``1e-5`` of each row's largest value, and absolute ``2e-6`` for occlusion, whose maps are
  differences of scores of order 1.  Per-batch options (``batch_size``,
  ``internal_batch_size``) do not change a row.
* RISE: the masks are drawn once per call from its seed and shared by every image, so a row
  equals the single call with the same ``seed`` / ``generator`` / mask bank, whatever
  ``batch_size``.  With ``num_masks="auto"`` the documented rule stops when *every* map of the
  batch has converged: a row then holds as many masks as the slowest map of its batch needed,
  i.e. it equals the single call with that count (pinned below), not the single ``"auto"`` call.
* Extremal perturbation: image ``n`` draws its jitter from seed ``s + n`` (documented), so a row
  equals the single call with ``generator=s + n`` (or the list entry), exactly here.
* SmoothGrad: with a noise bank, a row equals the single call with that image's slice of the
  bank.  A seed draws the noise row by row over the batch (copy ``k`` of image ``i`` is row
  ``k·N + i``), so the noise an image gets depends on its position and on ``N``: documented
  and pinned below, not comparable by seed.
* Integrated gradients' ``"uniform"`` baseline is drawn for the whole batch from one generator:
  comparable with a tensor baseline (its row), pinned as documented for the seed.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any, Callable, Dict, List

import pytest
import torch
import torch.nn as nn

from tests.transformer_models import ExplicitViT, make_vit
from torchray_like.attribution import METHODS
from torchray_like.attribution.explain import explain
from torchray_like.attribution.integrated_gradients import integrated_gradients
from torchray_like.attribution.registry import TRANSFORMER_ONLY_METHODS, MethodRegistry
from torchray_like.attribution.rise import rise
from torchray_like.attribution.smooth_grad import smooth_grad

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = {1: (nn.Conv1d, nn.AdaptiveAvgPool1d, (16,)),
          2: (nn.Conv2d, nn.AdaptiveAvgPool2d, (12, 12)),
          3: (nn.Conv3d, nn.AdaptiveAvgPool3d, (4, 6, 6))}

#: Small settings of the costly methods (few masks, steps, iterations), with per-batch options
#: that do not divide the batch evenly.
FAST: Dict[str, Dict[str, Any]] = {
    "rise": {"num_masks": 64, "num_cells": 3, "batch_size": 16},
    "extremal_perturbation": {"max_iter": 4, "areas": [0.2, 0.4], "step": 2, "sigma": 1.5},
    "integrated_gradients": {"n_steps": 8, "internal_batch_size": 5},
    "smooth_grad": {"n_samples": 4},
    "occlusion": {"window": 3, "stride": 2, "batch_size": 7},
    "score_cam": {"batch_size": 5},
    "ablation_cam": {"batch_size": 5},
}

#: Entries that explain any classifier (the transformer-only ones run on the ViTs below).
GENERIC = sorted(name for name in METHODS if name not in TRANSFORMER_ONLY_METHODS)
#: Entries whose map does not depend on the target (Eigen-CAM: the first principal component
#: of the activations; rollout and flow: the attention alone).
CLASS_AGNOSTIC = {"eigen_cam", "attention_rollout", "attention_flow"}
#: Entries that refuse a floating (seed-gradient) target: they score rows, not gradients.
SCORE_ONLY = {"rise", "extremal_perturbation"}


def conv_net(dims: int) -> nn.Module:
    torch.manual_seed(0)
    conv, pool, _ = LAYERS[dims]
    return nn.Sequential(conv(3, 6, 3, padding=1), nn.ReLU(), conv(6, 6, 3, padding=1),
                         nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(6, 4)).eval()


class ResidualBN(nn.Module):
    """Convolutions with batch norm (eval mode, non-trivial statistics), in-place ReLUs and an
    identity connection: batch norm in training mode would mix the samples."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)) + h)
        return self.fc(self.pool(h).flatten(1))


def residual_bn() -> nn.Module:
    torch.manual_seed(0)
    model = ResidualBN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return model.eval()


def hostile_batch(spatial: tuple, seed: int = 1) -> torch.Tensor:
    """Three samples: an image twice (explained for two classes), then all zeros."""
    torch.manual_seed(seed)
    a = torch.rand((1, 3) + tuple(spatial))
    return torch.cat([a, a, torch.zeros_like(a)])


TARGETS = [1, 2, 0]


def options(name: str, x: torch.Tensor, i: int | None = None) -> Dict[str, Any]:
    """The options of ``name`` for the batch ``x`` (``i`` None) or for its sample ``i`` alone:
    the same draws for both (EP: seed ``s + i``; SmoothGrad: the bank's slice)."""
    opts = dict(FAST.get(name, {}))
    if name == "extremal_perturbation":
        opts["generator"] = 5 if i is None else 5 + i
    if name == "smooth_grad":
        bank = 0.1 * torch.randn((4,) + tuple(x.shape), generator=torch.Generator().manual_seed(0))
        opts["noise"] = bank if i is None else bank[:, i:i + 1]
    return opts


def call(name: str, model: nn.Module, x: torch.Tensor, target: Any, **opts: Any) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about small inputs / few masks are not the point
        return METHODS[name](model, x, target, **opts)


def singles(name: str, model: nn.Module, x: torch.Tensor,
            target_of: Callable[[int], Any], opts_of: Callable[[int], Dict[str, Any]]
            ) -> torch.Tensor:
    return torch.cat([call(name, model, x[i:i + 1], target_of(i), **opts_of(i))
                      for i in range(x.shape[0])])


def assert_rows_equal(batched: torch.Tensor, single: torch.Tensor, name: str) -> None:
    """Row ``i`` of the batch equals the single call of sample ``i``, up to float rounding
    relative to that row's own scale (a leak into a small row would pass a global scale)."""
    assert batched.shape == single.shape and batched.dtype == single.dtype
    assert bool(torch.isfinite(batched).all())  # the zero image too
    for i in range(single.shape[0]):
        scale = single[i].abs().nan_to_num(0.0, 0.0, 0.0).max().item()
        atol = 2e-6 if name.startswith("occlusion") else 1e-5 * scale + 1e-30
        torch.testing.assert_close(batched[i], single[i], rtol=1e-5, atol=atol,
                                   msg=lambda m, i=i: f"{name}, sample {i}: {m}")


def sweep(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The batch with a list and with a tensor of targets (the same maps), checked row by row
    against the single calls; returns the batch's maps."""
    opts = options(name, x)
    batched = call(name, model, x, TARGETS, **opts)
    assert torch.equal(call(name, model, x, torch.tensor(TARGETS), **opts), batched)
    assert_rows_equal(batched, singles(name, model, x, lambda i: [TARGETS[i]],
                                       lambda i: options(name, x, i)), name)
    return batched


def assert_targets_read_per_row(name: str, batched: torch.Tensor) -> None:
    """Rows 0 and 1 are one image explained for two classes: they differ unless the method
    ignores the target (then they are equal)."""
    if name in CLASS_AGNOSTIC:
        torch.testing.assert_close(batched[0], batched[1], rtol=1e-5, atol=1e-7)
    else:
        assert not torch.allclose(batched[0], batched[1])


# ---------------------------------------------------------------------------------------------
# Every generic entry: 1-D, 2-D, 3-D; a model with batch norm, a residual sum, in-place ReLU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", GENERIC)
def test_batch_rows_equal_single_calls(name, dims):
    spatial = LAYERS[dims][2]
    batched = sweep(name, conv_net(dims), hostile_batch(spatial))
    assert batched.shape == (3, 1) + spatial
    assert_targets_read_per_row(name, batched)


@pytest.mark.parametrize("name", GENERIC)
def test_batch_norm_residual_in_place_model(name):
    model = residual_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batched = sweep(name, model, hostile_batch((12, 12), seed=3))
    assert_targets_read_per_row(name, batched)
    assert not model.training  # batch norm stayed in eval mode: its statistics are untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", GENERIC)
def test_batch_of_different_scales(name):
    """Images of very different ranges (one 50 times wider and shifted, one negated): a map
    normalised or clipped by the batch's extremes would differ from the single call's."""
    torch.manual_seed(11)
    a, b = torch.rand(1, 3, 12, 12), torch.rand(1, 3, 12, 12)
    x = torch.cat([a, 50 * b - 20, -a])
    model = conv_net(2)
    assert_rows_equal(call(name, model, x, TARGETS, **options(name, x)),
                      singles(name, model, x, lambda i: [TARGETS[i]],
                              lambda i: options(name, x, i)), name)


#: Options that act on the finished maps or on the perturbation: each stays per sample.
MAP_OPTIONS = [("gradient", {"smooth": 1.0}), ("grad_cam", {"smooth": 1.0}),
               ("lrp", {"resize": (20, 20)}), ("score_cam", {"resize": (20, 20), "smooth": 1.0}),
               ("excitation_backprop", {"smooth": 1.0}), ("guided_backprop", {"resize": (7, 7)}),
               ("linear_approx", {"saliency_layer": "2"}), ("grad_cam", {"saliency_layer": ""}),
               ("extremal_perturbation", {"perturbation": "fade", "fade_to": "mean"}),
               ("extremal_perturbation", {"variant": "delete", "reward_scale": "auto"}),
               ("occlusion", {"reduce": None, "baseline": 0.3}),
               ("integrated_gradients", {"reduce": None, "baseline": "blur"}),
               ("rise", {"normalize": "torchray"}), ("rise", {"score": "logit", "p": 0.3}),
               ("smooth_grad", {"method": "grad_cam", "kind": "vargrad"})]


@pytest.mark.parametrize("name,extra", MAP_OPTIONS)
def test_map_and_perturbation_options_stay_per_sample(name, extra):
    model, x = conv_net(2), hostile_batch((12, 12), seed=12)
    batched = call(name, model, x, TARGETS, **options(name, x), **extra)
    assert_rows_equal(batched, singles(name, model, x, lambda i: [TARGETS[i]],
                                       lambda i: {**options(name, x, i), **extra}), name)


def mixture(out: torch.Tensor) -> torch.Tensor:
    """A per-row score mixing classes: what a callable target is for."""
    return out.softmax(1)[:, 1] - 0.5 * out[:, 3]


@pytest.mark.parametrize("name", GENERIC)
def test_callable_and_seed_gradient_targets(name):
    model, x = residual_bn(), hostile_batch((12, 12), seed=4)
    batched = call(name, model, x, mixture, **options(name, x))
    assert_rows_equal(batched, singles(name, model, x, lambda i: mixture,
                                       lambda i: options(name, x, i)), name)
    weights = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [0.2, 0.0, 0.0, 0.8]])
    if name in SCORE_ONLY:
        with pytest.raises(ValueError, match="seed gradient, which only the backpropagation"):
            call(name, model, x, weights, **options(name, x))
        return
    batched = call(name, model, x, weights, **options(name, x))
    assert_rows_equal(batched, singles(name, model, x, lambda i: weights[i:i + 1],
                                       lambda i: options(name, x, i)), name)


# ---------------------------------------------------------------------------------------------
# Transformers: every entry that explains a ViT, on torchvision's and on an explicit SDPA ViT
# ---------------------------------------------------------------------------------------------

#: Entries refused on a GELU ViT (no ReLU to change; no layer cutting the residual stream).
NOT_ON_VIT = {"guided_backprop", "deconvnet", "guided_grad_cam", "contrastive_excitation_backprop",
              "rise", "extremal_perturbation", "occlusion", "score_cam", "ablation_cam",
              "smooth_grad", "integrated_gradients"}
VIT_METHODS = sorted(set(METHODS) - NOT_ON_VIT)


@pytest.fixture(scope="module")
def vits() -> Dict[str, nn.Module]:
    vit = make_vit()
    return {"torchvision": vit, "sdpa": ExplicitViT(vit, "sdpa")}


@pytest.mark.parametrize("kind", ["torchvision", "sdpa"])
@pytest.mark.parametrize("name", VIT_METHODS)
def test_vit_batch_rows_equal_single_calls(name, kind, vits):
    x = hostile_batch((32, 32), seed=2)
    batched = call(name, vits[kind], x, TARGETS)
    assert batched.shape[:2] == (3, 1)
    assert_rows_equal(batched, singles(name, vits[kind], x, lambda i: [TARGETS[i]],
                                       lambda i: {}), name)
    assert_targets_read_per_row(name, batched)


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("name", ["attention_rollout", "attention_flow"])
def test_vit_rollout_options_stay_per_sample(name, head_fusion, vits):
    """Discarding the weakest attention is a per-image quantile, not the batch's."""
    torch.manual_seed(11)
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    x = torch.cat([a, 50 * b - 20, -a])
    extra = {"head_fusion": head_fusion, "discard_ratio": 0.5}
    batched = call(name, vits["torchvision"], x, None, **extra)
    assert_rows_equal(batched, singles(name, vits["torchvision"], x, lambda i: None,
                                       lambda i: extra), name)


@pytest.mark.parametrize("name", ["integrated_gradients", "occlusion", "score_cam", "rise"])
def test_vit_perturbation_and_path_methods(name, vits):
    x = hostile_batch((32, 32), seed=2)
    opts = {"integrated_gradients": {"n_steps": 4, "internal_batch_size": 5},
            "occlusion": {"window": 8, "stride": 8, "batch_size": 5},
            "score_cam": {"batch_size": 7},
            "rise": {"num_masks": 32, "num_cells": 4, "batch_size": 10}}[name]
    batched = call(name, vits["torchvision"], x, TARGETS, **opts)
    assert_rows_equal(batched, singles(name, vits["torchvision"], x, lambda i: [TARGETS[i]],
                                       lambda i: opts), name)


# ---------------------------------------------------------------------------------------------
# Per-batch options: how many rows go into one forward pass never changes a sample's map
# ---------------------------------------------------------------------------------------------

PER_BATCH = [("rise", "batch_size", [1, 2, 3, 7, 64]),
             ("score_cam", "batch_size", [1, 2, 4, 64]),
             ("ablation_cam", "batch_size", [1, 2, 4, 64]),
             ("occlusion", "batch_size", [1, 5, 64]),
             ("integrated_gradients", "internal_batch_size", [1, 3, 64]),
             ("smooth_grad", "batch_size", [1, 5, 64])]


@pytest.mark.parametrize("name,option,values", PER_BATCH)
def test_forward_batch_sizes_do_not_mix_samples(name, option, values):
    model, x = conv_net(2), hostile_batch((12, 12), seed=5)
    reference = singles(name, model, x, lambda i: [TARGETS[i]],
                        lambda i: {**options(name, x, i), option: 64})
    for value in values:
        batched = call(name, model, x, TARGETS, **{**options(name, x), option: value})
        assert_rows_equal(batched, reference, f"{name} {option}={value}")


# ---------------------------------------------------------------------------------------------
# Random methods: what makes a batch row reproducible alone
# ---------------------------------------------------------------------------------------------


def test_rise_shares_its_masks_across_the_batch():
    """Same seed, generator or bank: the same masks for every image, so each row is the single
    call's map; the default seed (0) is such a seed."""
    model, x = conv_net(2), hostile_batch((12, 12), seed=6)
    fast = {"num_masks": 48, "num_cells": 3, "batch_size": 8}
    bank = torch.rand(48, 1, 12, 12, generator=torch.Generator().manual_seed(0)).round()
    for draw in ({}, {"seed": 7}, {"generator": 11},
                 {"filter_masks": bank, "p": float(bank.mean()), "score": "softmax"}):
        batched = rise(model, x, TARGETS, **fast, **draw)
        single = torch.cat([rise(model, x[i:i + 1], TARGETS[i], **fast, **draw)
                            for i in range(3)])
        assert_rows_equal(batched, single, f"rise {sorted(draw)}")
    # Every class at once (target None): each row of the (N, K) maps, too.
    everything = rise(model, x, None, **fast)
    assert everything.shape == (3, 4, 12, 12)
    assert_rows_equal(everything, torch.cat([rise(model, x[i:i + 1], None, **fast)
                                             for i in range(3)]), "rise target=None")


class MaxPoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_rise_auto_stops_for_the_whole_batch_as_documented():
    """``num_masks="auto"`` stops when every map of the batch has converged (rise's docstring):
    a map that converges early alone gets the batch's count, so its row is the single call
    with that count (a cap and a tolerance it cannot reach), not its own ``"auto"`` call.
    Every estimate but the count is per map."""
    model = MaxPoolNet().eval()
    torch.manual_seed(0)
    x = 3 * torch.rand(3, 3, 12, 12)
    batched, info = rise(model, x, TARGETS, num_masks="auto", num_cells=4, return_info=True)
    alone = [rise(model, x[i:i + 1], TARGETS[i], num_masks="auto", num_cells=4,
                  return_info=True) for i in range(3)]
    counts = [a[1].num_masks for a in alone]
    assert info.num_masks == max(counts) and min(counts) < max(counts)  # the hostile case
    for i, (smap, single) in enumerate(alone):
        if single.num_masks == info.num_masks:  # the slowest map: its own "auto" call
            assert_rows_equal(batched[i:i + 1], smap, "rise auto (slowest)")
        else:
            assert not torch.allclose(batched[i:i + 1], smap, rtol=1e-4, atol=0)
        forced = rise(model, x[i:i + 1], TARGETS[i], num_masks=info.num_masks, tol=1e-9,
                      num_cells=4)
        assert_rows_equal(batched[i:i + 1], forced, "rise auto (batch count)")
    assert "for every map" in " ".join(rise.__doc__.split())


def test_extremal_perturbation_seeds_each_image():
    """Image ``n`` of a call seeded ``s`` draws its jitter with seed ``s + n`` (documented);
    a list gives each image its own; with any reward scale and game."""
    model, x = conv_net(2), hostile_batch((12, 12), seed=7)
    fast = dict(max_iter=4, areas=[0.15, 0.4], step=2, sigma=1.5)
    for extra in ({}, {"reward_scale": "auto"}, {"variant": "dual"}):
        batched = METHODS["extremal_perturbation"](model, x, TARGETS, generator=20,
                                                   **fast, **extra)
        listed = METHODS["extremal_perturbation"](model, x, TARGETS, generator=[20, 21, 22],
                                                  **fast, **extra)
        assert torch.equal(batched, listed)
        single = torch.cat([METHODS["extremal_perturbation"](model, x[i:i + 1], TARGETS[i],
                                                             generator=20 + i, **fast, **extra)
                            for i in range(3)])
        assert_rows_equal(batched, single, f"extremal_perturbation {extra}")


def test_smooth_grad_noise_bank_slices_reproduce_rows():
    model, x = conv_net(2), hostile_batch((12, 12), seed=8)
    bank = 0.1 * torch.randn((5, 3, 3, 12, 12), generator=torch.Generator().manual_seed(1))
    for kind in ("smoothgrad", "smoothgrad_sq", "vargrad"):
        for method in ("gradient", "grad_cam"):
            batched = smooth_grad(model, x, TARGETS, method, noise=bank, kind=kind, batch_size=4)
            single = torch.cat([smooth_grad(model, x[i:i + 1], TARGETS[i], method,
                                            noise=bank[:, i:i + 1], kind=kind)
                                for i in range(3)])
            assert_rows_equal(batched, single, f"smooth_grad {kind} {method}")


def test_smooth_grad_seeded_noise_is_the_images_own():
    """A seed draws each image's noise with its own generator (image n: seed s + n), so a
    seeded batch row is the seeded single call of that image (up to float rounding of the
    batched forward passes), whatever the batch size."""
    model, x = conv_net(2), hostile_batch((12, 12), seed=8)
    batched = smooth_grad(model, x, TARGETS, n_samples=4, seed=3)
    single = torch.cat([smooth_grad(model, x[i:i + 1], TARGETS[i], n_samples=4, seed=3 + i)
                        for i in range(3)])
    assert_rows_equal(batched, single, "smooth_grad seed=3")
    assert_rows_equal(smooth_grad(model, x, TARGETS, n_samples=4, seed=3, batch_size=5), single,
                      "smooth_grad seed=3 batch_size=5")


def test_integrated_gradients_baselines():
    """A tensor baseline (one per image) reproduces each row alone; the ``"uniform"`` baseline
    is drawn image by image (seed s + n), like SmoothGrad's seeded noise."""
    model, x = conv_net(2), hostile_batch((12, 12), seed=9)
    base = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    fast = {"n_steps": 6, "internal_batch_size": 4}
    for baseline in (base, "blur", 0.5):
        batched = integrated_gradients(model, x, TARGETS, baseline=baseline, **fast)
        single = torch.cat([integrated_gradients(
            model, x[i:i + 1], TARGETS[i],
            baseline=baseline[i:i + 1] if isinstance(baseline, torch.Tensor) else baseline,
            **fast) for i in range(3)])
        assert_rows_equal(batched, single, f"integrated_gradients baseline={type(baseline)}")
    batched = integrated_gradients(model, x, TARGETS, baseline="uniform", generator=3, **fast)
    single = torch.cat([integrated_gradients(model, x[i:i + 1], TARGETS[i], baseline="uniform",
                                             generator=3 + i, **fast) for i in range(3)])
    assert_rows_equal(batched, single, "integrated_gradients uniform baseline, seed 3 + n")


# ---------------------------------------------------------------------------------------------
# explain: several methods at once, batch against one by one
# ---------------------------------------------------------------------------------------------

EXPLAIN_METHODS = ["gradient", "guided_backprop", "deconvnet", "linear_approx", "grad_cam",
                   "guided_grad_cam", "gradient_x_input", "grad_cam_plus_plus", "layer_cam",
                   "xgrad_cam", "hires_cam", "eigen_cam", "lrp", "lrp_epsilon_alpha2_beta1",
                   "excitation_backprop", "occlusion", "rise", "extremal_perturbation",
                   "integrated_gradients"]


def explain_options(x: torch.Tensor, i: int | None) -> Dict[str, Dict[str, Any]]:
    opts = {name: options(name, x, i) for name in EXPLAIN_METHODS if name in FAST}
    opts["grad_cam_at_input"] = {"saliency_layer": ""}
    return opts


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_explain_batch_equals_one_by_one(dims):
    model, x = (residual_bn(), hostile_batch((12, 12), seed=10)) if dims == 2 else (
        conv_net(dims), hostile_batch(LAYERS[dims][2], seed=10))
    labels: Dict[str, str] = {name: name for name in EXPLAIN_METHODS}
    labels["grad_cam_at_input"] = "grad_cam"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = explain(model, x, torch.tensor(TARGETS), labels, explain_options(x, None))
        alone: List[Dict[str, torch.Tensor]] = [
            explain(model, x[i:i + 1], [TARGETS[i]], labels, explain_options(x, i))
            for i in range(3)]
    assert list(batched) == list(labels)
    for label, name in labels.items():
        assert_rows_equal(batched[label], torch.cat([a[label] for a in alone]), name)
        if name != "extremal_perturbation":  # explain's EP entry returns the masks per area
            assert_targets_read_per_row(name, batched[label])


def test_explain_with_a_callable_target_equals_one_by_one():
    """A callable target (a per-row mixture of scores) through explain's shared passes: each
    row is the single call's."""
    model, x = residual_bn(), hostile_batch((12, 12), seed=13)
    names = ["gradient", "guided_backprop", "grad_cam", "eigen_cam", "lrp", "occlusion", "rise",
             "extremal_perturbation"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = explain(model, x, mixture, names,
                          {n: options(n, x) for n in names if n in FAST})
        alone = [explain(model, x[i:i + 1], mixture, names,
                         {n: options(n, x, i) for n in names if n in FAST}) for i in range(3)]
    for name in names:
        assert_rows_equal(batched[name], torch.cat([a[name] for a in alone]), name)


# ---------------------------------------------------------------------------------------------
# The sweep itself: it catches the leaks it is for
# ---------------------------------------------------------------------------------------------


def _leaks() -> Dict[str, Callable[..., torch.Tensor]]:
    plain = METHODS["grad_cam"]
    return {
        "batch max": lambda m, x, t, **k: (lambda s: s / s.abs().amax().clamp(min=1e-12))(
            plain(m, x, t, **k)),
        "first target for all": lambda m, x, t, **k: plain(
            m, x, int(torch.as_tensor(t).reshape(-1)[0]), **k),
        "1e-3 of the batch mean": lambda m, x, t, **k: (lambda s: s - 1e-3 * s.mean(
            0, keepdim=True))(plain(m, x, t, **k)),
    }


@pytest.mark.parametrize("leak", sorted(_leaks()))
def test_the_sweep_catches_a_leaking_method(leak, monkeypatch):
    leaky = MethodRegistry({**dict(METHODS), "grad_cam": _leaks()[leak]})
    monkeypatch.setattr(sys.modules[__name__], "METHODS", leaky)
    caught = 0
    for test, args in ((test_batch_rows_equal_single_calls, ("grad_cam", 2)),
                       (test_batch_of_different_scales, ("grad_cam",))):
        with contextlib.suppress(AssertionError):
            test(*args)
            continue
        caught += 1
    # Grad-CAM's rectified maps of the first batch can all be zero but one row's (a batch
    # maximum then changes nothing): the batch of different scales is there for that.
    assert caught >= 1 if leak == "batch max" else caught == 2


def test_attention_flow_work_bound_is_the_batchs(vits):
    """``max_work`` bounds the whole call (``N × T × L × T²``, documented): a batch over it is
    refused with the cost named, while each image alone (a third of the work) runs; never a
    different map."""
    x = hostile_batch((32, 32), seed=2)
    with pytest.raises(ValueError, match=r"max_work=2e\+04"):
        call("attention_flow", vits["torchvision"], x, None, max_work=2e4)
    alone = singles("attention_flow", vits["torchvision"], x, lambda i: None,
                    lambda i: {"max_work": 2e4})
    assert_rows_equal(call("attention_flow", vits["torchvision"], x, None), alone,
                      "attention_flow")
