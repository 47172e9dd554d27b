"""The saliency() driver: wrappers against references on every rank, layers, debug, autograd
modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from torchray_like.attribution.deconvnet import deconvnet
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import guided_backprop
from torchray_like.attribution.maps import resize_saliency, smooth_saliency
from torchray_like.attribution.targets import get_pointing_gradient

from .conftest import (
    ConvNet,
    RefDeconvReLU,
    RefGuidedReLU,
    assert_same_state,
    inputs,
    reference_map,
    snapshot,
)

WRAPPERS = {"gradient": (gradient, None), "guided_backprop": (guided_backprop, RefGuidedReLU),
            "deconvnet": (deconvnet, RefDeconvReLU)}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", list(WRAPPERS))
def test_wrappers_match_reference_on_every_rank(dims, name):
    net = ConvNet(dims).double().eval()
    x = inputs(dims, dtype=torch.float64)
    fn, ref_rule = WRAPPERS[name]
    smap = fn(net, x, [1, 3])
    assert smap.shape == (2, 1) + (8,) * dims
    assert smap.dtype == torch.float64 and smap.device == x.device
    assert not smap.requires_grad
    expected = reference_map(net, x, [1, 3], ref_rule)
    torch.testing.assert_close(smap, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_batch_with_per_sample_targets_equals_stacked_single_calls(name):
    net = ConvNet(2).eval()
    x = inputs(2, n=3)
    fn, _ = WRAPPERS[name]
    batched = fn(net, x, torch.tensor([4, 0, 2]))
    singles = torch.cat([fn(net, x[i:i + 1], t) for i, t in enumerate([4, 0, 2])])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-7)
    # A single int explains that class for every sample.
    torch.testing.assert_close(fn(net, x, 2), fn(net, x, [2, 2, 2]), rtol=0, atol=0)


def test_methods_run_the_model_in_eval_mode():
    """Dropout and batch norm in training mode would make maps random and samples dependent."""
    net = ConvNet(2).train()
    x = inputs(2)
    a = gradient(net, x, 1)
    b = gradient(net, x, 1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert net.training and all(m.training for m in net.modules())
    expected = reference_map(net.eval(), x, 1)
    torch.testing.assert_close(a, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    net = ConvNet(2).to(dtype).eval()
    x = inputs(2, dtype=dtype)
    for fn, _ in WRAPPERS.values():
        smap = fn(net, x, 0)
        assert smap.dtype == dtype and smap.shape == (2, 1, 8, 8)
        assert torch.isfinite(smap.float()).all()


def test_saliency_layer_reads_the_layer_gradient():
    net = ConvNet(2).double().eval()
    x = inputs(2, dtype=torch.float64)
    smap, info = gradient(net, x, 1, saliency_layer="features.3", debug=True)
    # Reference gradient at the conv output with plain autograd.
    store = {}

    def hook(m, i, o):
        o.retain_grad()
        store["a"] = o

    h = net.features[3].register_forward_hook(hook)
    net(x)[:, 1].sum().backward()
    h.remove()
    net.zero_grad(set_to_none=True)
    torch.testing.assert_close(info.activation, store["a"].detach())
    torch.testing.assert_close(info.gradient, store["a"].grad)
    torch.testing.assert_close(smap, store["a"].grad.abs().amax(1, keepdim=True))
    # The same layer as a module, and TorchRay's '' for the input.
    torch.testing.assert_close(gradient(net, x, 1, saliency_layer=net.features[3]), smap)
    torch.testing.assert_close(gradient(net, x, 1, saliency_layer=""), gradient(net, x, 1))


def test_saliency_layer_errors():
    net = ConvNet(2).eval()
    x = inputs(2)
    with pytest.raises(ValueError, match="no module named 'feature.3'.*'features.3'"):
        gradient(net, x, 1, saliency_layer="feature.3")

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.relu = nn.ReLU()
            self.unused = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.relu(self.conv(self.relu(x))).mean((2, 3)))

    with pytest.raises(ValueError, match="called 2 times"):
        gradient(Shared(), x, 1, saliency_layer="relu")
    with pytest.raises(ValueError, match="'unused' was not called"):
        gradient(Shared(), x, 1, saliency_layer="unused")


def test_debug_info():
    net = ConvNet(2).eval()
    x = inputs(2)
    smap, info = guided_backprop(net, x, [0, 1], debug=True)
    assert info.counts == {"relu": 2}
    assert info.output.shape == (2, 5) and not info.output.requires_grad
    torch.testing.assert_close(smap, info.gradient.abs().amax(1, keepdim=True))
    torch.testing.assert_close(info.activation, x)


def test_pointing_gradient_through_the_driver():
    class FCN(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    net = FCN().double()
    x = inputs(2, dtype=torch.float64)
    _, info = gradient(net, x, 2, get_backward_gradient=get_pointing_gradient, debug=True)
    xx = x.clone().requires_grad_(True)
    y = net(xx)
    (g,) = torch.autograd.grad(y, xx, get_pointing_gradient(y.detach(), 2))
    torch.testing.assert_close(info.gradient, g)


def test_smooth_argument_of_the_driver():
    net = ConvNet(2).double().eval()
    x = inputs(2, dtype=torch.float64)
    raw = gradient(net, x, 1)
    smoothed = gradient(net, x, 1, smooth=0.1)
    torch.testing.assert_close(smoothed, smooth_saliency(raw, 0.8))
    with pytest.raises(ValueError, match="smooth must be a non-negative number"):
        gradient(net, x, 1, smooth=-1)


def test_works_inside_no_grad():
    net = ConvNet(2).eval()
    x = inputs(2)
    expected = gradient(net, x, 1)
    with torch.no_grad():
        got = gradient(net, x, 1)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_weights_get_no_gradient_and_backprop_stops_at_the_layer():
    net = ConvNet(2).eval()
    seen = []
    net.features[0].register_full_backward_hook(lambda m, gi, go: seen.append(m))
    gradient(net, inputs(2), 1, saliency_layer="features.3")
    assert seen == []  # nothing below the layer was differentiated
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_torchvision_architectures(torchvision_model, name):
    arch, model = torchvision_model
    fn, ref_rule = WRAPPERS[name]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = snapshot(model, x)
    smap = fn(model, x, [3, 7])
    assert smap.shape == (2, 1, 64, 64) and smap.dtype == torch.float32
    assert torch.isfinite(smap).all() and (smap >= 0).all() and smap.sum() > 0
    expected = reference_map(model, x, [3, 7], ref_rule)
    torch.testing.assert_close(smap, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))
    assert_same_state(before, snapshot(model, x))


def test_layer_off_the_output_path_and_resize_rank_errors():
    class SideBranch(ConvNet):
        def __init__(self):
            super().__init__(2)
            self.side = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            self.side(x)  # computed, but unused by the output
            return super().forward(x)

    with pytest.raises(ValueError, match="(does|do) not depend on saliency_layer 'side'"):
        gradient(SideBranch().eval(), inputs(2), 1, saliency_layer="side")
    with pytest.raises(ValueError, match="resize=True: the map has 1 spatial dimensions"):
        resize_saliency(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 4), True)


# ---------------------------------------------------------------------------------------------
# Batch statistics: a sample's map explains its own score only (issue 17, item 3)


class BatchStatNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def own_score_gradient(model, x, target):
    """Sample i's gradient of its own score only: one backward per sample (Jacobian diagonal)."""
    xx = x.clone().requires_grad_(True)
    y = model(xx)
    rows = []
    for i, c in enumerate(target):
        (g,) = torch.autograd.grad(y[i, c], xx, retain_graph=True)
        rows.append(g[i])
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["gradient", "guided_backprop", "linear_approx", "grad_cam"])
def test_batch_statistics_do_not_mix_samples(name):
    from torchray_like.attribution import METHODS
    from torchray_like.attribution.modules import batch_statistics_layers
    model = BatchStatNet().eval()
    assert batch_statistics_layers(model) == ["bn"]
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    target = [0, 2, 1]
    smap = METHODS[name](model, x, target, **({"saliency_layer": "conv"}
                                              if name == "grad_cam" else {}))
    if name == "gradient":
        want = own_score_gradient(model, x, target).abs().amax(1, keepdim=True)
        torch.testing.assert_close(smap, want)
        # The summed-score gradient (what one backward pass gives) is far from it.
        xx = x.clone().requires_grad_(True)
        (mixed,) = torch.autograd.grad(model(xx)[torch.arange(3), target].sum(), xx)
        assert (mixed.abs().amax(1, keepdim=True) - want).abs().max() > 0.05 * want.max()
    # Every method: sample i's map is what it would be if only sample i were explained.
    for i in range(3):
        alone_seed = lambda out, i=i: out[i:i + 1, target[i]].expand(3) * torch.tensor(  # noqa
            [float(j == i) for j in range(3)])
        one = METHODS[name](model, x, alone_seed, **({"saliency_layer": "conv"}
                                                     if name == "grad_cam" else {}))
        torch.testing.assert_close(smap[i], one[i], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Layer methods record no graph below their layer (issue 24)


class SkipFromBelow(nn.Module):
    """A tensor from below the layer reaches the head without passing through it."""

    def __init__(self, checkpoint=None):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(8 * 36, 3)
        self.checkpoint = checkpoint

    def forward(self, x):
        low = torch.relu(self.stem(x))
        if self.checkpoint is None:
            high = self.block(low)
        else:
            from torch.utils.checkpoint import checkpoint
            high = checkpoint(self.block, low, use_reentrant=self.checkpoint)
        high = high.relu_()  # an in-place operation on the layer's output
        return self.head(torch.cat([low, high], 1).flatten(1))


def full_graph_layer_gradient(model, x, target, layer):
    """The layer's activation and gradient from a forward with the whole graph recorded."""
    box = []

    def hook(module, args, out):
        box.append(out)
        return out.clone()  # the model goes on with a copy: in-place ops leave ``out`` intact

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        y = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(y[torch.arange(len(target)), target].sum(), box[0])
    return box[0].detach(), g


@pytest.mark.parametrize("checkpoint", [None, False])
def test_layer_methods_give_the_full_graph_answer_without_the_graph_below(checkpoint):
    from torchray_like.attribution import METHODS
    model = SkipFromBelow(checkpoint).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    a, g = full_graph_layer_gradient(SkipFromBelow().eval(), x, [0, 2], "block")
    want_cam = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(METHODS["grad_cam"](model, x, [0, 2], "block"), want_cam)
    torch.testing.assert_close(METHODS["linear_approx"](model, x, [0, 2], "block"),
                               (a * g).sum(1, keepdim=True))


def test_no_graph_is_recorded_below_the_layer():
    from torchray_like.attribution.driver import forward_pass
    model = SkipFromBelow().eval()
    x = torch.randn(1, 3, 6, 6)
    seen = []
    handle = model.stem.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        with forward_pass(model, x, 1, {"layer": "block"}) as fp:
            read = fp.reads["layer"]
            assert read.requires_grad and read.is_leaf  # a fresh leaf: nothing below it
            assert fp.grad("layer").shape == read.shape
    finally:
        handle.remove()
    assert seen == [False]          # the stem ran without autograd
    assert torch.is_grad_enabled()  # the caller's grad mode is back
    # Reading the input (or a rule context) records the whole graph as before.
    seen.clear()
    handle = model.stem.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        with forward_pass(model, x, 1, {"layer": "block", "input": None}):
            pass
    finally:
        handle.remove()
    assert seen == [True]


def test_caller_grad_mode_is_restored_when_the_layer_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            self.conv(x)
            raise RuntimeError("boom after the layer")

    from torchray_like.attribution import METHODS
    for mode in (True, False):
        with torch.set_grad_enabled(mode):
            with pytest.raises(RuntimeError, match="boom after the layer"):
                METHODS["grad_cam"](Boom(), torch.randn(1, 3, 6, 6), 0, "conv")
            assert torch.is_grad_enabled() is mode
