"""Occlusion: Captum parity in 1-D, 2-D and 3-D (windows cut at the border included), the
windows' geometry, batching, baselines, the METHODS contract, state and hostile cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import torchray_like as trl
from torchray_like.attribution.explain import explain
from torchray_like.attribution.occlusion import occlusion, occlusion_windows
from torchray_like.attribution.registry import METHODS

from .conftest import ConvNet, assert_same_state, inputs, snapshot

captum_attr = pytest.importorskip("captum.attr")


def net(dims: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    torch.manual_seed(0)
    return nn.Sequential(conv(3, 4, 3, padding=1), nn.Tanh(), conv(4, 4, 3, padding=1),
                         nn.ReLU(), pool(2), nn.Flatten(), nn.Linear(4 * 2 ** dims, 3)
                         ).double().eval()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("window, stride", [(3, 3), (3, 2), (2, 1), (4, 3)])
def test_equals_captum(dims, window, stride):
    model = net(dims)
    g = torch.Generator().manual_seed(dims)
    size = {1: (7,), 2: (7, 8), 3: (5, 4, 6)}[dims]  # sizes the windows do not divide
    x = torch.randn((2, 3) + size, generator=g, dtype=torch.float64)
    win, step = (window,) * dims, (stride,) * dims
    ref = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(3,) + win, strides=(3,) + step, target=[1, 2], baselines=0.5)
    ours = occlusion(model, x, [1, 2], window=win, stride=step, baseline=0.5, reduce=None,
                     batch_size=7)
    assert ours.shape == x.shape and ours.dtype == torch.float64
    assert (ref - ours).abs().max().item() <= 1e-5
    smap = occlusion(model, x, [1, 2], window=win, stride=step, baseline=0.5)
    assert smap.shape == (2, 1) + x.shape[2:]
    assert torch.allclose(smap, ours[:, :1], atol=1e-12)
    summed = occlusion(model, x, [1, 2], window=win, stride=step, baseline=0.5, reduce="sum")
    assert torch.allclose(summed, 3 * smap, atol=1e-12)


def test_equals_captum_with_a_per_channel_baseline_tensor():
    model, x = net(2), torch.randn(1, 3, 6, 6, dtype=torch.float64)
    colour = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64).view(1, 3, 1, 1)
    ref = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(3, 2, 3), strides=(3, 2, 1), target=0,
        baselines=colour.expand_as(x))
    ours = occlusion(model, x, 0, window=(2, 3), stride=(2, 1), baseline=colour, reduce=None)
    assert (ref - ours).abs().max().item() <= 1e-5


def test_one_window_is_the_score_drop():
    """A window covering everything: every element gets f(x) − f(baseline)."""
    model, x = net(2), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    smap = occlusion(model, x, 2, window=5, stride=1, baseline=0.0)
    with torch.no_grad():
        drop = model(x)[:, 2] - model(torch.zeros_like(x))[:, 2]
    assert torch.allclose(smap, drop.view(2, 1, 1, 1).expand(2, 1, 5, 5), atol=1e-12)


def test_windows_geometry():
    assert occlusion_windows((7,), 3, 3) == ((3,), (3,), (3,))    # 0, 3, 6 (cut at 7)
    assert occlusion_windows((8, 6), (3, 2), (3, 1)) == ((3, 2), (3, 1), (3, 5))
    assert occlusion_windows((64, 64)) == ((8, 8), (4, 4), (15, 15))
    assert occlusion_windows((5,)) == ((1,), (1,), (5,))


def test_batching_does_not_change_the_result_and_bounds_the_batches():
    model, x = net(2), torch.randn(3, 3, 6, 6, dtype=torch.float64)
    ref = occlusion(model, x, [0, 1, 2], window=2, stride=2, batch_size=1000)
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        out = occlusion(model, x, [0, 1, 2], window=2, stride=2, batch_size=4)
    finally:
        handle.remove()
    # (Not bit for bit: on some CPUs the convolution's summation order depends on the batch
    # size — AVX512 machines, float64, 1e-16 of the largest score.)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14 * float(ref.abs().max()))
    # The clean pass (3), the batches of the 27 copies (at most 4), and once the first batch's
    # first two rows in the plain layout (the channels-last check).
    assert sizes[0] == 3 and max(sizes[1:]) == 4 and sum(sizes[1:]) == 27 + 2
    assert sizes[1:3] == [4, 2]


def test_targets_callable_and_seed_equal_class_indices():
    model, x = net(2), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ref = occlusion(model, x, [2, 0], window=3)
    seed = torch.zeros(2, 3, dtype=torch.float64)
    seed[0, 2] = seed[1, 0] = 1
    assert torch.allclose(occlusion(model, x, seed, window=3), ref, atol=1e-12)
    assert torch.allclose(occlusion(model, x, lambda out: out[:, 1], window=3),
                          occlusion(model, x, 1, window=3), atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_methods_entry_and_explain(dims):
    model, x = ConvNet(dims).eval(), inputs(dims)
    smap = METHODS["occlusion"](model, x, 1)
    assert smap.shape == (2, 1) + x.shape[2:] and smap.dtype == torch.float32
    out = explain(model, x, 1, ["occlusion"], options={"occlusion": {"window": 2}})
    assert torch.equal(out["occlusion"], occlusion(model, x, 1, window=2))
    assert trl.occlusion is occlusion


def test_state_restored_and_resize():
    model = ConvNet(2).train()
    x = inputs(2).requires_grad_(True)
    before = snapshot(model, x)
    smap = occlusion(model, x, 1, window=4, resize=(16, 16))
    assert smap.shape == (2, 1, 16, 16)
    assert_same_state(before, snapshot(model, x))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(window=9), ValueError, "larger than the input"),
    (dict(window=0), ValueError, "window must be"),
    (dict(window=(2, 2, 2)), ValueError, "window must be one integer"),
    (dict(window="big"), TypeError, "window must be a number"),
    (dict(window=2, stride=3), ValueError, "stride .* is larger than window"),
    (dict(stride=1.5), ValueError, "stride must be"),
    (dict(baseline="grey"), TypeError, "baseline must be a number"),
    (dict(baseline=float("nan")), ValueError, "baseline must be a finite"),
    (dict(baseline=torch.zeros(2, 3)), ValueError, "does not broadcast"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(reduce="max"), ValueError, "reduce must be"),
    (dict(reduce=None, resize=True), ValueError, "resize applies to maps"),
])
def test_argument_errors(kwargs, exc, match):
    model, x = ConvNet(2).eval(), inputs(2)
    with pytest.raises(exc, match=match):
        occlusion(model, x, 1, **kwargs)


def test_model_and_input_errors():
    x = inputs(2)
    with pytest.raises(ValueError, match="class"):
        occlusion(ConvNet(2), x, 9)
    stats = ConvNet(2).eval()
    stats.features[1].track_running_stats = False
    stats.features[1].running_mean = stats.features[1].running_var = None
    with pytest.raises(ValueError, match="statistics of the batch"):
        occlusion(stats, x, 1)
    with pytest.raises(ValueError, match="channels last"):
        occlusion(ConvNet(2), x.permute(0, 2, 3, 1).contiguous()[:, :, :3], 1)
    with pytest.raises(TypeError, match="floating-point"):
        occlusion(ConvNet(2), (x * 100).long(), 1)

    class Exploding(nn.Module):
        def forward(self, x):
            return (x.flatten(1).sum(1, keepdim=True) / (x[:, :1, :1, :1].flatten(1) != 0)
                    ).repeat(1, 2)

    with pytest.raises(ValueError, match="not finite"):
        occlusion(Exploding(), x, 0, window=2)
