"""The saliency() driver, targets, resize, smoothing, state invariants and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from torchray_like.attribution.common import (get_backward_gradient, get_pointing_gradient,
                                              gradient_to_saliency, resize_saliency, saliency,
                                              smooth_saliency)
from torchray_like.attribution.deconvnet import deconvnet
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import guided_backprop

from .reference import RefDeconvReLU, RefGuidedReLU, reference_map
from .state import assert_same_state, snapshot

WRAPPERS = {"gradient": (gradient, None), "guided_backprop": (guided_backprop, RefGuidedReLU),
            "deconvnet": (deconvnet, RefDeconvReLU)}


class ConvNet(nn.Module):
    """A small conv net for 1-D, 2-D or 3-D data, with batch norm and dropout."""

    def __init__(self, dims=2, classes=5, channels=3):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
        torch.manual_seed(0)
        self.features = nn.Sequential(conv(channels, 8, 3, padding=1), bn(8), nn.ReLU(inplace=True),
                                      conv(8, 8, 3, padding=1), nn.ReLU())
        self.pool = pool(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, classes)
        # Non-trivial running statistics.
        self.features[1].running_mean.uniform_(-0.2, 0.2)
        self.features[1].running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


def inputs(dims, n=2, size=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(dims)
    return torch.randn((n, 3) + (size,) * dims, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Maps against references, any rank


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


# ---------------------------------------------------------------------------------------------
# Targets


def test_get_backward_gradient():
    out = torch.randn(3, 4)
    seed = get_backward_gradient(out, 2)
    assert torch.equal(seed, torch.tensor([[0., 0, 1, 0]] * 3))
    seed = get_backward_gradient(out, [0, 3, 1])
    assert torch.equal(seed.argmax(1), torch.tensor([0, 3, 1])) and seed.sum() == 3
    custom = torch.randn(3, 4)
    assert torch.equal(get_backward_gradient(out, custom), custom)
    maps = torch.randn(2, 3, 4, 4)
    seed = get_backward_gradient(maps, [2, 0])
    assert torch.equal(seed[0, 2], torch.ones(4, 4)) and torch.equal(seed[1, 0], torch.ones(4, 4))
    assert seed.sum() == 32


@pytest.mark.parametrize("target,error,match", [
    (4, ValueError, r"target class 4 is out of range.*4 classes \(valid: 0..3\)"),
    (-1, ValueError, "target class -1 is out of range"),
    ([1, 2], ValueError, "2 class indices but the batch has 3"),
    (torch.tensor([1, 2, 3, 0]), ValueError, "4 class indices but the batch has 3"),
    (1.0, ValueError, "integer class index, got the float 1.0"),
    ([1, 2.5, 0], ValueError, "integer class indices, found the float 2.5"),
    (torch.randn(3), ValueError, "seed gradient and must have the output's shape"),
    (torch.ones(3, 4, dtype=torch.long)[None], ValueError, "1-D tensor"),
    (True, TypeError, "boolean"),
    ("cat", TypeError, "target must be an int"),
    (None, ValueError, "target is required"),
])
def test_target_errors(target, error, match):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(3, 3, 6, 6)
    before = snapshot(net, x)
    with pytest.raises(error, match=match):
        gradient(net, x, target)
    assert_same_state(before, snapshot(net, x))


class BinaryHead(nn.Module):
    def __init__(self, keepdim):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 1)
        self.keepdim = keepdim

    def forward(self, x):
        z = self.fc(F.relu(self.conv(x)).mean((2, 3)))
        return z if self.keepdim else z[:, 0]


@pytest.mark.parametrize("keepdim", [True, False])
def test_single_logit_binary_head(keepdim):
    net = BinaryHead(keepdim).double()
    x = inputs(2, dtype=torch.float64)
    _, pos = gradient(net, x, 1, debug=True)
    _, neg = gradient(net, x, 0, debug=True)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xx).sum(), xx)
    torch.testing.assert_close(pos.gradient, g)      # class 1 explains +logit
    torch.testing.assert_close(neg.gradient, -g)     # class 0 explains -logit
    # Per-sample: one of each.
    _, mixed = gradient(net, x, [1, 0], debug=True)
    torch.testing.assert_close(mixed.gradient, torch.stack([g[0], -g[1]]))
    # The rectifying rules make the two classes' maps differ.
    assert not torch.allclose(guided_backprop(net, x, 1), guided_backprop(net, x, 0))
    with pytest.raises(ValueError, match="single-logit .* takes target 1"):
        gradient(net, x, 2)


def test_callable_target_with_dict_and_tuple_outputs():
    class DictNet(ConvNet):
        def forward(self, x):
            return {"logits": super().forward(x), "aux": x.mean()}

    class TupleNet(ConvNet):
        def forward(self, x):
            return super().forward(x), x.mean()

    x = inputs(2)
    expected = gradient(ConvNet(2).eval(), x, [3, 1])
    pick = torch.tensor([3, 1])
    got = gradient(DictNet(2).eval(), x, lambda out: out["logits"][torch.arange(2), pick])
    torch.testing.assert_close(got, expected)
    got = gradient(TupleNet(2).eval(), x, lambda out: out[0].gather(1, pick[:, None]))
    torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match="returned a dict, not a tensor: pass a callable"):
        gradient(DictNet(2).eval(), x, 1)
    with pytest.raises(ValueError, match=r"one score per sample, shape \(2,\)"):
        gradient(ConvNet(2).eval(), x, lambda out: out.sum())
    with pytest.raises(ValueError, match="do not depend on the input through autograd"):
        gradient(ConvNet(2).eval(), x, lambda out: out[:, 0].detach())
    with pytest.raises(TypeError, match="must return a tensor"):
        gradient(ConvNet(2).eval(), x, lambda out: 3)


def test_regression_callable_target_equals_seeded_gradient():
    net = ConvNet(2, classes=1).double().eval()
    x = inputs(2, dtype=torch.float64)
    a = gradient(net, x, lambda out: out[:, 0] ** 2)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((net(xx)[:, 0] ** 2).sum(), xx)
    torch.testing.assert_close(a, g.abs().amax(1, keepdim=True))


def test_custom_seed_gradient():
    net = ConvNet(2).double().eval()
    x = inputs(2, dtype=torch.float64)
    seed = torch.randn(2, 5, dtype=torch.float64)
    _, info = gradient(net, x, seed, debug=True)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xx), xx, seed)
    torch.testing.assert_close(info.gradient, g)


def test_get_pointing_gradient():
    maps = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    seed = get_pointing_gradient(maps, [1, 2])
    for i, c in enumerate([1, 2]):
        expected = torch.softmax(maps[i, c].flatten(), 0).view(4, 5)
        torch.testing.assert_close(seed[i, c], expected)
        assert seed[i].sum().item() == pytest.approx(1.0)
    assert seed[0, 0].abs().sum() == 0 and seed[1, :2].abs().sum() == 0
    # Numerically stable for huge scores.
    big = torch.full((1, 2, 3, 3), 1e4)
    big[0, 1, 1, 1] = 1e4 + 1
    seed = get_pointing_gradient(big, 1)
    assert torch.isfinite(seed).all() and seed[0, 1].argmax() == 4
    # (N, C): the one-hot seed.
    assert torch.equal(get_pointing_gradient(torch.randn(2, 3), 1), get_backward_gradient(
        torch.randn(2, 3), 1))
    with pytest.raises(ValueError, match="out of range"):
        get_pointing_gradient(maps, 3)


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


# ---------------------------------------------------------------------------------------------
# Maps: flattening, resize, smoothing


def test_gradient_to_saliency():
    x = torch.zeros(2, 3, 4)
    x.grad = torch.tensor([[[1., -5, 0, 2]] * 3] * 2)
    x.grad[1, 2, 0] = -7
    smap = gradient_to_saliency(x)
    assert smap.shape == (2, 1, 4)
    assert smap[0, 0].tolist() == [1, 5, 0, 2] and smap[1, 0].tolist() == [7, 5, 0, 2]
    with pytest.raises(ValueError, match="has no .grad"):
        gradient_to_saliency(torch.zeros(1, 2, 3))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_resize(dims):
    net = ConvNet(dims).eval()
    x = inputs(dims)
    layer = gradient(net, x, 1, saliency_layer="features.3")
    assert layer.shape == (2, 1) + (8,) * dims
    size = tuple(range(5, 5 + dims))
    resized = gradient(net, x, 1, resize=size)
    assert resized.shape == (2, 1) + size
    expected = F.interpolate(gradient(net, x, 1), size=size,
                             mode={1: "linear", 2: "bilinear", 3: "trilinear"}[dims],
                             align_corners=False)
    torch.testing.assert_close(resized, expected)
    # resize=True: the input's size; every mode valid for the rank.
    small = torch.rand((2, 1) + (3,) * dims)
    for mode in ["nearest", "nearest-exact", "area", "bilinear",
                 {1: "linear", 2: "bicubic", 3: "trilinear"}[dims]]:
        out = resize_saliency(x, small, True, mode)
        assert out.shape == (2, 1) + (8,) * dims
    assert resize_saliency(x, small, False) is small
    assert resize_saliency(x, small, 6).shape == (2, 1) + (6,) * dims


def test_resize_errors():
    x = torch.zeros(1, 3, 8, 8)
    s = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"2 positive sizes in torch order \(H, W\)"):
        resize_saliency(x, s, (4, 4, 4))
    with pytest.raises(ValueError, match="bicubic' needs 2 spatial"):
        resize_saliency(torch.zeros(1, 3, 8, 8, 8), torch.zeros(1, 1, 2, 2, 2), True, "bicubic")
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        resize_saliency(x, s, True, "cubic")
    with pytest.raises(TypeError, match="resize must be False, True"):
        resize_saliency(x, s, "big")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_smoothing_matches_scipy(dims):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand((2, 1) + (9,) * dims, generator=g, dtype=torch.float64)
    out = smooth_saliency(maps, 1.3)
    for i in range(2):
        ref = ndimage.gaussian_filter(maps[i, 0].numpy(), 1.3, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(out[i, 0].numpy(), ref, rtol=1e-10, atol=1e-12)
    # A kernel wider than the map (replicated borders), and a constant map stays constant.
    wide = smooth_saliency(maps, 5.0)
    for i in range(2):
        ref = ndimage.gaussian_filter(maps[i, 0].numpy(), 5.0, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(wide[i, 0].numpy(), ref, rtol=1e-10, atol=1e-12)
    const = torch.full((1, 1) + (5,) * dims, 0.25, dtype=torch.float64)
    torch.testing.assert_close(smooth_saliency(const, 2.0), const)


def test_smooth_argument_of_the_driver():
    net = ConvNet(2).double().eval()
    x = inputs(2, dtype=torch.float64)
    raw = gradient(net, x, 1)
    smoothed = gradient(net, x, 1, smooth=0.1)
    torch.testing.assert_close(smoothed, smooth_saliency(raw, 0.8))
    with pytest.raises(ValueError, match="smooth must be a non-negative number"):
        gradient(net, x, 1, smooth=-1)


# ---------------------------------------------------------------------------------------------
# Input and model errors, autograd modes


def test_input_errors():
    net = ConvNet(2).eval()
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.uint8.*x.float"):
        gradient(net, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        gradient(net, torch.zeros(1, 3, 8, 8, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        gradient(net, np.zeros((1, 3, 8, 8), np.float32), 0)
    with pytest.raises(ValueError, match=r"shape \(N, C, \*spatial\).*x.unsqueeze\(0\)"):
        gradient(net, torch.zeros(3, 8), 0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gradient(lambda x: x, torch.zeros(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="empty batch"):
        gradient(net, torch.zeros(0, 3, 8, 8), 0)


def test_works_inside_no_grad():
    net = ConvNet(2).eval()
    x = inputs(2)
    expected = gradient(net, x, 1)
    with torch.no_grad():
        got = gradient(net, x, 1)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_inference_mode_is_a_clear_error():
    net = ConvNet(2).eval()
    x = inputs(2)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            gradient(net, x, 1)
        y = x.clone()
    with pytest.raises(ValueError, match="inference tensor"):
        gradient(net, y, 1)
    with torch.inference_mode():
        inference_net = ConvNet(2)
    with pytest.raises(ValueError, match="parameter 'features.0.weight' is an inference tensor"):
        gradient(inference_net, x, 1)


# ---------------------------------------------------------------------------------------------
# State invariants


class Fails(ConvNet):
    def forward(self, x):
        self.features(x)  # the rule context has replaced ReLUs by now
        raise RuntimeError("model failure")


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_state_is_restored_after_success_and_failure(name):
    fn, _ = WRAPPERS[name]
    net = ConvNet(2).train()
    net.features[0].weight.requires_grad_(False)          # a mix of frozen and trainable
    net.fc.weight.grad = torch.ones_like(net.fc.weight)   # an existing gradient
    net.features[1].eval()                                # a mix of training flags
    x = inputs(2)
    x.requires_grad_(True)
    x.grad = torch.full_like(x, 3.0)
    before = snapshot(net, x)
    fn(net, x, [0, 1], saliency_layer=None)
    fn(net, x, [0, 1], saliency_layer="features.3", resize=True, smooth=0.05)
    assert_same_state(before, snapshot(net, x))

    bad = Fails(2).train()
    bad.fc.weight.grad = torch.ones_like(bad.fc.weight)
    before = snapshot(bad, x)
    with pytest.raises(RuntimeError, match="model failure"):
        fn(bad, x, [0, 1])
    with pytest.raises(RuntimeError, match="model failure"):
        fn(bad, x, [0, 1], saliency_layer="features.3")
    assert_same_state(before, snapshot(bad, x))
    # A bad target after a successful forward also restores everything.
    before = snapshot(net, x)
    with pytest.raises(ValueError, match="out of range"):
        fn(net, x, [0, 9], saliency_layer="features.3")
    assert_same_state(before, snapshot(net, x))


def test_weights_get_no_gradient_and_backprop_stops_at_the_layer():
    net = ConvNet(2).eval()
    seen = []
    net.features[0].register_full_backward_hook(lambda m, gi, go: seen.append(m))
    gradient(net, inputs(2), 1, saliency_layer="features.3")
    assert seen == []  # nothing below the layer was differentiated
    assert all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# torchvision architectures


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


def test_saliency_with_no_context_equals_gradient():
    net = ConvNet(2).eval()
    x = inputs(2)
    torch.testing.assert_close(saliency(net, x, 1), gradient(net, x, 1), rtol=0, atol=0)


def test_concurrent_calls_on_one_model_restore_its_state():
    """Two threads explaining one trainable model: neither leaves it frozen or in eval mode."""
    import threading

    net = ConvNet(2).train()
    x = inputs(2)
    expected = gradient(net, x, 1)
    before = snapshot(net)
    errors, results = [], []
    start = threading.Barrier(4)

    def work():
        try:
            start.wait(10)
            for _ in range(10):
                results.append(gradient(net, x, 1))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 40
    for r in results:
        torch.testing.assert_close(r, expected, rtol=0, atol=0)
    assert_same_state(before, snapshot(net))


def test_layer_off_the_output_path_and_resize_rank_errors():
    class SideBranch(ConvNet):
        def __init__(self):
            super().__init__(2)
            self.side = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            self.side(x)  # computed, but unused by the output
            return super().forward(x)

    with pytest.raises(ValueError, match="does not depend on saliency_layer 'side'"):
        gradient(SideBranch().eval(), inputs(2), 1, saliency_layer="side")
    with pytest.raises(ValueError, match="resize=True: the map has 1 spatial dimensions"):
        resize_saliency(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 4), True)
