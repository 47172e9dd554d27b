"""SmoothGrad, SmoothGrad² and VarGrad over any method: Captum's NoiseTunnel given the same
noise draws (a noise bank), statistical agreement otherwise, the noise's scale and seeding,
batching, the METHODS / explain contract, state and hostile cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import torchray_like as trl
from torchray_like.attribution.explain import explain
from torchray_like.attribution.grad_cam import grad_cam
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import guided_backprop
from torchray_like.attribution.integrated_gradients import integrated_gradients
from torchray_like.attribution.registry import METHODS
from torchray_like.attribution.smooth_grad import SMOOTH_GRAD_KINDS, smooth_grad

from .conftest import ConvNet, assert_same_state, inputs, snapshot

captum_attr = pytest.importorskip("captum.attr")


class Recorder(nn.Module):
    """Runs ``model`` and keeps every batch it is given (to read Captum's noise draws)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).double().eval()


def data(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 3, 5, 5), generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def raw_gradient(x: torch.Tensor) -> torch.Tensor:
    """A ``gradient_to_saliency`` that keeps the per-channel gradient (Captum's Saliency)."""
    return x.grad


def identity(model, x, target, **options):
    """A 'method' whose map is its input: SmoothGrad of it shows the noise itself."""
    return x.clone()


# ---------------------------------------------------------------------------------------------
# Captum's NoiseTunnel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SMOOTH_GRAD_KINDS)
def test_equals_noise_tunnel_with_the_same_draws(kind):
    model, x = net(), data()
    recorder = Recorder(model)
    ref = captum_attr.NoiseTunnel(captum_attr.Saliency(recorder)).attribute(
        x, nt_type=kind, nt_samples=4, stdevs=0.3, target=[1, 2], abs=False)
    # Captum's batch holds image 0's four copies, then image 1's: ours is copy-major.
    bank = (torch.cat(recorder.seen).view(2, 4, 3, 5, 5) - x[:, None]).transpose(0, 1)
    ours = smooth_grad(model, x, [1, 2], "gradient", noise=bank, kind=kind, batch_size=3,
                       gradient_to_saliency=raw_gradient)
    assert ours.shape == x.shape and ours.dtype == torch.float64
    assert (ref - ours).abs().max().item() <= 1e-5


def test_equals_noise_tunnel_over_integrated_gradients():
    model, x = net(), data()
    recorder = Recorder(model)
    ref = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(recorder)).attribute(
        x, nt_type="smoothgrad", nt_samples=3, stdevs=0.3, target=1, n_steps=5,
        method="riemann_right")
    # With riemann_right the last 6 rows of the batch are the noisy copies themselves (α = 1).
    noisy = torch.cat(recorder.seen)[-6:]
    bank = (noisy.view(2, 3, 3, 5, 5) - x[:, None]).transpose(0, 1)
    ours = smooth_grad(model, x, 1, "integrated_gradients", noise=bank, n_steps=5,
                       rule="riemann_right", reduce=None)
    assert (ref - ours).abs().max().item() <= 1e-5


def test_agrees_with_noise_tunnel_statistically():
    """Independent draws: the two means differ by Monte-Carlo error only (VarGrad gives the
    per-element variance of the maps)."""
    model, x = net(), data(n=1)
    level, n = 0.1, 300
    sigma = level * float(x.max() - x.min())
    torch.manual_seed(1)
    ref = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=n, stdevs=sigma, target=1, abs=False)
    ours = smooth_grad(model, x, 1, n_samples=n, noise_level=level, generator=5,
                       gradient_to_saliency=raw_gradient, batch_size=100)
    var = smooth_grad(model, x, 1, n_samples=n, noise_level=level, generator=6,
                      kind="vargrad", gradient_to_saliency=raw_gradient, batch_size=100)
    z = (ours - ref) / (2 * var / n).sqrt()
    assert z.abs().max().item() < 5
    assert (ours - ref).abs().max().item() > 0  # not the same draws


# ---------------------------------------------------------------------------------------------
# The noise
# ---------------------------------------------------------------------------------------------


def test_noise_scale_is_a_fraction_of_each_images_range():
    x = data()
    x[1] *= 10                            # image 1's range is ten times image 0's
    level, n = 0.2, 400
    mean = smooth_grad(nn.Identity(), x, lambda out: out.sum((1, 2, 3)), identity,
                       n_samples=n, noise_level=level, generator=0)
    var = smooth_grad(nn.Identity(), x, lambda out: out.sum((1, 2, 3)), identity,
                      n_samples=n, noise_level=level, generator=0, kind="vargrad")
    for i in range(2):
        sigma = level * float(x[i].max() - x[i].min())
        assert abs(var[i].mean().item() / sigma ** 2 - 1) < 0.05
        assert (mean[i] - x[i]).abs().max().item() < 5 * sigma / n ** 0.5
    square = smooth_grad(nn.Identity(), x, lambda out: out.sum((1, 2, 3)), identity,
                         n_samples=n, noise_level=level, generator=0, kind="smoothgrad_sq")
    assert torch.allclose(square - mean ** 2, var, atol=1e-9)


def test_seeded_batch_size_independent_and_global_rng_untouched():
    model, x = net(), data()
    state = torch.get_rng_state()
    a = smooth_grad(nn.Identity(), x, 0, identity, n_samples=5, generator=3, batch_size=1)
    b = smooth_grad(nn.Identity(), x, 0, identity, n_samples=5, seed=3, batch_size=7)
    c = smooth_grad(nn.Identity(), x, 0, identity, n_samples=5, generator=[3, 4],
                    batch_size=10)
    assert torch.equal(a, b) and torch.equal(a, c)
    # A generator gives the seed s by one draw (image n: s + n), reproducibly.
    g = smooth_grad(nn.Identity(), x, 0, identity, n_samples=5,
                    generator=torch.Generator().manual_seed(3))
    assert torch.equal(g, smooth_grad(nn.Identity(), x, 0, identity, n_samples=5,
                                      generator=torch.Generator().manual_seed(3)))
    # Image n of a seeded batch is the call of that image alone with seed s + n.
    for n in range(x.shape[0]):
        assert torch.equal(a[n:n + 1], smooth_grad(nn.Identity(), x[n:n + 1], 0, identity,
                                                   n_samples=5, generator=3 + n))
    assert not torch.equal(a, smooth_grad(nn.Identity(), x, 0, identity, n_samples=5,
                                          generator=4))
    d = smooth_grad(model, x, 1, n_samples=6)
    assert torch.equal(d, smooth_grad(model, x, 1, n_samples=6, batch_size=5))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("method, options, reference", [
    ("gradient", {}, gradient),
    ("guided_backprop", {}, guided_backprop),
    ("grad_cam", {"saliency_layer": "features.3"}, grad_cam),
    ("integrated_gradients", {"n_steps": 4}, integrated_gradients),
])
def test_zero_noise_gives_the_methods_map(method, options, reference):
    """Any method, with each image's own target (class indices, per sample)."""
    model, x = ConvNet(2).eval(), inputs(2)
    zero = torch.zeros((1,) + x.shape)
    smap = smooth_grad(model, x, [1, 3], method, noise=zero, **options)
    expected = reference(model, x, [1, 3], **options)
    assert smap.shape == expected.shape
    assert torch.allclose(smap, expected, atol=1e-6)


def test_targets_callable_and_seed_equal_class_indices():
    model, x = net(), data()
    ref = smooth_grad(model, x, [2, 0], n_samples=3, generator=1, batch_size=2)
    seed = torch.zeros(2, 3, dtype=torch.float64)
    seed[0, 2] = seed[1, 0] = 1
    assert torch.equal(smooth_grad(model, x, seed, n_samples=3, generator=1, batch_size=2), ref)
    one = smooth_grad(model, x, 1, n_samples=3, generator=1)
    assert torch.equal(smooth_grad(model, x, lambda out: out[:, 1], n_samples=3, generator=1),
                       one)


def test_method_kwargs_reach_options_named_like_smooth_grads():
    model, x = ConvNet(2).eval(), inputs(2, size=8)
    smap = smooth_grad(model, x, 1, "rise", n_samples=2, generator=0,
                       method_kwargs={"batch_size": 4, "seed": 1}, num_masks=8)
    assert smap.shape == (2, 1, 8, 8) and bool(torch.isfinite(smap).all())


# ---------------------------------------------------------------------------------------------
# Contract and hostile cases
# ---------------------------------------------------------------------------------------------


def test_methods_entry_explain_and_state():
    model = ConvNet(2).train()
    x = inputs(2).requires_grad_(True)
    before = snapshot(model, x)
    smap = METHODS["smooth_grad"](model, x, 1, n_samples=3)
    assert smap.shape == (2, 1, 8, 8) and smap.dtype == torch.float32
    assert_same_state(before, snapshot(model, x))
    out = explain(model, x, 1, ["smooth_grad"], options={"smooth_grad": {"n_samples": 3,
                                                                         "generator": 2}})
    assert torch.equal(out["smooth_grad"], smooth_grad(model, x, 1, n_samples=3, generator=2))
    assert trl.smooth_grad is smooth_grad


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(method="smoothgrad"), ValueError, "unknown attribution method 'smoothgrad'"),
    (dict(method="smooth_grad"), ValueError, "nest SmoothGrad"),
    (dict(method=3), TypeError, "method must be a method name or a callable"),
    (dict(saliency_layr="features.3"), ValueError, "gradient has no option 'saliency_layr'"),
    (dict(debug=True), ValueError, "debug=True"),
    (dict(kind="mean"), ValueError, "kind must be one of"),
    (dict(noise_level=-0.1), ValueError, "noise_level must be"),
    (dict(n_samples=0), ValueError, "n_samples must be a positive int"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(noise=torch.zeros(3, 2, 3, 8)), ValueError, "noise must have shape"),
    (dict(noise=torch.zeros(3, 2, 3, 8, 8), noise_level=0.1), ValueError, "not both"),
    (dict(noise=torch.zeros(3, 2, 3, 8, 8), generator=1), ValueError, "not both"),
    (dict(noise=torch.zeros(3, 2, 3, 8, 8), n_samples=4), ValueError, "holds 3 copies"),
    (dict(noise=torch.full((1, 2, 3, 8, 8), float("nan"))), ValueError, "NaN"),
    (dict(noise=[0.1]), TypeError, "noise must be a floating-point tensor"),
    (dict(method="integrated_gradients", return_convergence_delta=True, n_steps=2),
     ValueError, "returned a tuple"),
    (dict(method=lambda model, x, target: x[:1]), ValueError, "one map per sample"),
])
def test_argument_errors(kwargs, exc, match):
    model, x = ConvNet(2).eval(), inputs(2)
    kwargs.setdefault("n_samples", None if "noise" in kwargs else 2)
    with pytest.raises(exc, match=match):
        smooth_grad(model, x, 1, **kwargs)


def test_model_errors():
    x = inputs(2)
    stats = ConvNet(2).eval()
    stats.features[1].track_running_stats = False
    stats.features[1].running_mean = stats.features[1].running_var = None
    with pytest.raises(ValueError, match="statistics of the batch"):
        smooth_grad(stats, x, 1, n_samples=2)
    with pytest.raises(ValueError, match="class"):
        smooth_grad(ConvNet(2), x, 9, n_samples=2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        smooth_grad(lambda t: t, x, 1, n_samples=2)
