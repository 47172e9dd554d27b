"""Integrated gradients (and gradient × input): Captum parity for every rule and at a layer,
completeness, baselines, batching, the METHODS / explain contract, and the hostile cases."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import torchray_like as trl
from torchray_like.attribution.explain import explain
from torchray_like.attribution.integrated_gradients import (
    INTEGRATION_RULES,
    blur_baseline,
    integrated_gradients,
    integration_points,
    resolve_baseline,
)
from torchray_like.attribution.linear_approx import linear_approx
from torchray_like.attribution.registry import METHODS, SHARED_METHODS

from .conftest import ConvNet, assert_same_state, hook_counts, inputs, snapshot

captum_attr = pytest.importorskip("captum.attr")


def smooth_net(dims: int = 2, classes: int = 3) -> nn.Module:
    """A smooth (tanh / softplus) float64 conv net: the path integral is well approximated."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    torch.manual_seed(0)
    return nn.Sequential(conv(3, 4, 3, padding=1), nn.Tanh(), conv(4, 4, 3, padding=1),
                         nn.Softplus(), pool(1), nn.Flatten(), nn.Linear(4, classes)
                         ).double().eval()


def data(dims: int = 2, n: int = 2, size: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3) + (size,) * dims, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Captum parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", INTEGRATION_RULES)
def test_equals_captum_for_every_rule(rule):
    model, x = smooth_net(), data()
    base = 0.1 * data(seed=1)
    ref = captum_attr.IntegratedGradients(model).attribute(x, base, target=[1, 2], n_steps=7,
                                                           method=rule)
    ours = integrated_gradients(model, x, [1, 2], baseline=base, n_steps=7, rule=rule,
                                reduce=None, internal_batch_size=5)
    # Captum's trapezoid weights sum to (n-1)/n (ours to 1): documented factor.
    factor = 6 / 7 if rule == "riemann_trapezoid" else 1.0
    assert ours.shape == x.shape and ours.dtype == torch.float64
    assert (ref - factor * ours).abs().max().item() <= 1e-5


def test_equals_captum_layer_integrated_gradients():
    """Layer IG interpolates in the layer's space and feeds the input, as Captum does; the
    layer is followed by an in-place ReLU (the replacement must not be written into)."""
    model = ConvNet(2).double().eval()
    x = inputs(2, dtype=torch.float64)
    layer = model.features[1]
    # Captum itself fails on the in-place ReLU: its reference runs on an out-of-place copy.
    reference = copy.deepcopy(model)
    reference.features[2].inplace = False
    ref = captum_attr.LayerIntegratedGradients(reference, reference.features[1]).attribute(
        x, torch.zeros_like(x), target=3, n_steps=9, method="riemann_middle")
    ours = integrated_gradients(model, x, 3, saliency_layer="features.1", n_steps=9,
                                rule="riemann_middle", reduce=None, internal_batch_size=4)
    assert ours.shape == ref.shape == (2, 8, 8, 8)
    assert (ref - ours).abs().max().item() <= 1e-5
    smap = integrated_gradients(model, x, 3, saliency_layer=layer, n_steps=9,
                                rule="riemann_middle")
    assert torch.allclose(smap, ours.sum(1, keepdim=True), atol=1e-12)


def test_convergence_delta_equals_captum():
    model, x = smooth_net(), data()
    _, ref = captum_attr.IntegratedGradients(model).attribute(
        x, target=0, n_steps=5, return_convergence_delta=True)
    _, ours = integrated_gradients(model, x, 0, n_steps=5, return_convergence_delta=True)
    assert ours.shape == (2,) and (ref - ours).abs().max().item() <= 1e-8


# ---------------------------------------------------------------------------------------------
# Mathematics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_completeness_on_a_smooth_net(dims):
    model, x = smooth_net(dims), data(dims, size=5)
    smap, delta = integrated_gradients(model, x, 1, baseline=0.3, return_convergence_delta=True)
    with torch.no_grad():
        gap = model(x)[:, 1] - model(torch.full_like(x, 0.3))[:, 1]
    assert smap.shape == (2, 1) + (5,) * dims
    assert torch.allclose(smap.flatten(1).sum(1), gap, atol=1e-8, rtol=0)
    assert delta.abs().max().item() < 1e-8
    # The left Riemann sum converges too, slowly: the gap is reported, not hidden.
    _, coarse = integrated_gradients(model, x, 1, baseline=0.3, n_steps=4, rule="riemann_left",
                                     return_convergence_delta=True)
    assert coarse.abs().max().item() > 1e-6


def test_linear_model_is_gradient_times_difference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = data(1, size=4)
    ig = integrated_gradients(model, x, 2, reduce=None, n_steps=3)
    w = model[1].weight[2].view(3, 4)
    assert torch.allclose(ig, x * w, atol=1e-12)


def test_integration_points_weights_and_nodes():
    for rule in INTEGRATION_RULES:
        alphas, weights = integration_points(rule, 6)
        assert len(alphas) == len(weights) == 6
        assert abs(sum(weights) - 1.0) < 1e-12
        assert all(0.0 <= a <= 1.0 for a in alphas)
    alphas, weights = integration_points("gausslegendre", 3)
    # Exact for polynomials of degree 5: ∫ α^5 = 1/6.
    assert abs(sum(w * a ** 5 for a, w in zip(alphas, weights)) - 1 / 6) < 1e-14
    assert integration_points("riemann_middle", 2) == ([0.25, 0.75], [0.5, 0.5])


def test_batching_does_not_change_the_result():
    model, x = smooth_net(), data(n=3)
    ref = integrated_gradients(model, x, [0, 1, 2], n_steps=11, internal_batch_size=1000)
    for batch in (1, 2, 7):
        out = integrated_gradients(model, x, [0, 1, 2], n_steps=11, internal_batch_size=batch)
        assert torch.allclose(out, ref, atol=1e-12)


def test_forward_batches_never_exceed_internal_batch_size():
    model, x = smooth_net(), data(n=3)
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        integrated_gradients(model, x, 1, n_steps=5, internal_batch_size=4)
        plain = list(sizes)
        sizes.clear()
        integrated_gradients(model, x, 1, n_steps=5, internal_batch_size=4,
                             return_convergence_delta=True)
    finally:
        handle.remove()
    # 15 rows in batches of at most 4; the completeness gap adds one pass for f(x) and
    # f(baseline) (2 N rows), which the map alone does not need (Captum's cost).
    assert plain == [4, 4, 4, 3]
    assert sizes == [6, 4, 4, 4, 3]


def test_targets_callable_and_seed_equal_class_indices():
    model, x = smooth_net(), data()
    ref = integrated_gradients(model, x, [2, 0], n_steps=5, reduce=None)
    by_callable = integrated_gradients(
        model, x, lambda out: out[:, 2] * 0 + out.gather(1, torch.tensor(
            [2, 0] * (out.shape[0] // 2)).view(-1, 1))[:, 0], n_steps=5, reduce=None,
        internal_batch_size=2)
    seed = torch.zeros(2, 3, dtype=torch.float64)
    seed[0, 2] = seed[1, 0] = 1
    by_seed = integrated_gradients(model, x, seed, n_steps=5, reduce=None)
    assert torch.allclose(by_seed, ref, atol=1e-12)
    assert torch.allclose(by_callable, ref, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def test_baselines_tensor_callable_number_blur():
    model, x = smooth_net(), data()
    colour = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64).view(1, 3, 1, 1)
    full = colour.expand_as(x).clone()
    a = integrated_gradients(model, x, 1, baseline=colour, n_steps=4, reduce=None)
    b = integrated_gradients(model, x, 1, baseline=full, n_steps=4, reduce=None)
    c = integrated_gradients(model, x, 1, baseline=lambda t: full.clone(), n_steps=4,
                             reduce=None)
    assert torch.equal(a, b) and torch.equal(a, c)
    zero = integrated_gradients(model, x, 1, n_steps=4, reduce=None)
    assert torch.equal(zero, integrated_gradients(model, x, 1, baseline=0, n_steps=4,
                                                  reduce=None))
    assert torch.equal(zero, integrated_gradients(model, x, 1, baseline="zeros", n_steps=4,
                                                  reduce=None))
    blurred = resolve_baseline("blur", x)
    assert torch.allclose(blurred, blur_baseline(0.6)(x), atol=1e-12)
    assert blurred.std() < x.std()


def test_uniform_baseline_is_seeded_and_leaves_the_global_rng():
    x = data()
    state = torch.get_rng_state()
    a = resolve_baseline("uniform", x, generator=3)
    b = resolve_baseline("uniform", x, generator=[3, 4])
    c = resolve_baseline("uniform", x)
    assert torch.equal(a, b) and not torch.equal(a, resolve_baseline("uniform", x, 4))
    # Image n's baseline is drawn with seed s + n: the same as that image's alone.
    assert torch.equal(a[1:], resolve_baseline("uniform", x[1:], 4))
    g = resolve_baseline("uniform", x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g, resolve_baseline("uniform", x, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="generator has 3 entries but the batch has 2 images"):
        resolve_baseline("uniform", x, generator=[1, 2, 3])
    assert torch.equal(c, resolve_baseline("uniform", x))
    assert torch.equal(state, torch.get_rng_state())
    for i in range(2):
        assert x[i].min() <= a[i].min() and a[i].max() <= x[i].max()


# ---------------------------------------------------------------------------------------------
# Contract: METHODS, explain, state, dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_methods_entry_gives_one_map_per_sample(dims):
    model, x = ConvNet(dims).eval(), inputs(dims)
    smap = METHODS["integrated_gradients"](model, x, 1)
    assert smap.shape == (2, 1) + x.shape[2:] and smap.dtype == torch.float32
    out = explain(model, x, 1, ["integrated_gradients", "gradient"],
                  options={"integrated_gradients": {"n_steps": 8}})
    assert torch.equal(out["integrated_gradients"],
                       integrated_gradients(model, x, 1, n_steps=8))


def test_state_restored_and_no_hook_left_after_success_and_failure():
    model = ConvNet(2).train()
    x = inputs(2).requires_grad_(True)
    before = snapshot(model, x)
    integrated_gradients(model, x, 1, saliency_layer="features.3", n_steps=3)
    assert_same_state(before, snapshot(model, x))
    calls = []

    def failing(out):  # fails inside the integration, with the layer's hook in place
        calls.append(1)
        if len(calls) > 1:
            raise ValueError("target failed")
        return out[:, 1]

    with pytest.raises(ValueError, match="target failed"):
        integrated_gradients(model, x, failing, saliency_layer="features.3", n_steps=3)
    assert_same_state(before, snapshot(model, x))
    with pytest.raises(ValueError, match="holds NaN"):
        integrated_gradients(model, x, 1, baseline=lambda t: t * float("nan"))


def test_works_under_no_grad_and_resizes():
    model, x = ConvNet(2).eval(), inputs(2)
    with torch.no_grad():
        smap = integrated_gradients(model, x, 1, saliency_layer="features.3", n_steps=3,
                                    resize=True)
    assert smap.shape == (2, 1, 8, 8) and not smap.requires_grad


# ---------------------------------------------------------------------------------------------
# Hostile cases
# ---------------------------------------------------------------------------------------------


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.conv(self.conv(x)).mean((2, 3)))


class TupleLayer(nn.Module):
    """``body`` returns a pair (its output and its input)."""

    def __init__(self):
        super().__init__()
        self.body = Pair()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.body(x)[0].mean((2, 3)))


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return self.conv(x), x


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rule="simpson"), ValueError, "rule must be one of"),
    (dict(n_steps=0), ValueError, "n_steps must be a positive int"),
    (dict(n_steps=1, rule="riemann_trapezoid"), ValueError, "n_steps >= 2"),
    (dict(n_steps=2.5), TypeError, "n_steps must be a positive int"),
    (dict(internal_batch_size=0), ValueError, "internal_batch_size"),
    (dict(baseline="black"), ValueError, "baseline must be one of"),
    (dict(baseline=[0.0, 1.0]), TypeError, "baseline must be None"),
    (dict(baseline=torch.zeros(3, 5)), ValueError, "does not broadcast"),
    (dict(baseline=torch.zeros(1, 3, 1, 1, dtype=torch.long)), TypeError, "floating-point"),
    (dict(baseline=float("inf")), ValueError, "baseline must be finite"),
    (dict(baseline=lambda t: t[:, :2]), ValueError, "baseline callable returned"),
    (dict(reduce="max"), ValueError, "reduce must be"),
    (dict(reduce=None, resize=True), ValueError, "resize applies to maps"),
    (dict(return_convergence_delta=1), TypeError, "return_convergence_delta"),
    (dict(saliency_layer="fc"), ValueError, "without spatial dimensions"),
    (dict(saliency_layer="featurs.0"), ValueError, "no module named 'featurs.0'"),
    (dict(progress="yes"), TypeError, "progress"),
])
def test_argument_errors(kwargs, exc, match):
    model, x = ConvNet(2).eval(), inputs(2)
    with pytest.raises(exc, match=match):
        integrated_gradients(model, x, 1, n_steps=kwargs.pop("n_steps", 3), **kwargs)


def test_layer_without_spatial_dimensions_gives_raw_attributions():
    model, x = ConvNet(2).eval(), inputs(2)
    attr, delta = integrated_gradients(model, x, 1, saliency_layer="fc", reduce=None,
                                       return_convergence_delta=True)
    assert attr.shape == (2, 5)
    assert delta.abs().max().item() < 1e-5  # the layer is the last: complete exactly


def test_model_errors():
    x = inputs(2)
    with pytest.raises(ValueError, match="called 2 times"):
        integrated_gradients(Twice(), x, 1, saliency_layer="conv", n_steps=2)
    model = TupleLayer()
    with pytest.raises(ValueError, match="returns a tuple"):
        integrated_gradients(model, x, 1, saliency_layer="body", n_steps=2)
    assert hook_counts(model) == {}
    stats = ConvNet(2).eval()
    stats.features[1].track_running_stats = False
    stats.features[1].running_mean = stats.features[1].running_var = None
    with pytest.raises(ValueError, match="statistics of the batch"):
        integrated_gradients(stats, x, 1)
    with pytest.raises(ValueError, match="class"):
        integrated_gradients(ConvNet(2), x, 7, n_steps=2)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        integrated_gradients(ConvNet(2), bad, 1)
    with pytest.raises(ValueError, match="target is required"):
        integrated_gradients(ConvNet(2), x, None)


def test_flat_namespace_and_signature():
    assert trl.integrated_gradients is integrated_gradients
    assert "integrated_gradients" in trl.__all__


# ---------------------------------------------------------------------------------------------
# Gradient × input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradient_x_input_is_the_linear_approximation_at_the_input(dims):
    model, x = ConvNet(dims).eval(), inputs(dims, dtype=torch.float64)
    model.double()
    smap = trl.gradient_x_input(model, x, [1, 3])
    xx = x.clone().requires_grad_(True)
    out = model(xx)
    (g,) = torch.autograd.grad(out[0, 1] + out[1, 3], xx)
    assert smap.shape == (2, 1) + x.shape[2:]
    assert torch.allclose(smap, (x * g).sum(1, keepdim=True), atol=1e-12)
    assert torch.equal(smap, linear_approx(model, x, [1, 3]))


def test_gradient_x_input_shares_explains_pass():
    model, x = ConvNet(2).eval(), inputs(2)
    assert "gradient_x_input" in SHARED_METHODS
    out = explain(model, x, 2, ["gradient", "gradient_x_input", "grad_cam"])
    assert torch.equal(out["gradient_x_input"], trl.gradient_x_input(model, x, 2))


class InfAtHalf(nn.Module):
    """Finite at the input and the baseline, infinite scores inside the path (α near 0.5)."""

    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True)
        scale = torch.where((s - 0.5 * 12).abs() < 2.0, torch.full_like(s, float("inf")),
                            torch.ones_like(s))
        return torch.cat([s * scale, -s], 1)


def test_infinite_scores_inside_the_path_raise_without_the_gap_pass():
    x = torch.ones(1, 1, 3, 4)
    with pytest.raises(ValueError, match=r"integrated_gradients: the target scores at a point "
                                         r"of the path are not finite"):
        integrated_gradients(InfAtHalf(), x, 0, n_steps=8)
    with pytest.raises(ValueError, match="class"):  # the range check without the gap pass
        integrated_gradients(InfAtHalf(), x, 5, n_steps=8)
