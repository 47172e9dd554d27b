"""Excitation backprop and contrastive excitation backprop (Zhang et al. 2016, arXiv 1608.00507)
on whole networks: conservation at every layer, torchvision models, batches, the contrastive map
(and the contrast layer that must cut the network), 16-bit precision.

Each rule against the paper's formula: test_excitation_rules.py; what the method refuses or
warns of, and the state it leaves: test_excitation_hostile.py; TorchRay's API:
test_excitation_torchray.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.common import Probe, smooth_saliency
from torchray_like.attribution.excitation_backprop import (
    ExcitationBackpropContext,
    contrastive_excitation_backprop,
    excitation_backprop,
    excitation_eps,
)

from .excitation_helpers import ConvHead, Tower, excite, np_conv2d_ebp, np_linear_ebp, onehot, quiet

# ---------------------------------------------------------------------------------------------
# Conservation (a probability distribution at every layer)
# ---------------------------------------------------------------------------------------------


def test_conservation_at_every_layer_of_a_tower():
    m = Tower().double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    layers = ["stem", "block1", "branch_b", "pool", "head.1", "head.3"]
    probes = {name: Probe(m.get_submodule(name), target="output") for name in layers}
    try:
        xx = x.clone().requires_grad_(True)
        with ExcitationBackpropContext() as ctx:
            y = m(xx)
        seed = torch.zeros_like(y)
        seed[torch.arange(3), torch.tensor([0, 3, 4])] = torch.tensor(
            [1.0, 2.0, 0.5], dtype=torch.float64)
        y.backward(seed)
        totals = {"input": xx.grad.flatten(1).sum(1)}
        for name, probe in probes.items():
            totals[name] = probe.data[0].grad.flatten(1).sum(1)
    finally:
        for probe in probes.values():
            probe.remove()
    expected = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    for name in ("input", "stem", "pool", "head.1", "head.3"):
        torch.testing.assert_close(totals[name], expected, rtol=1e-12, atol=1e-12)
    # A branch of the concatenation carries part of it.
    assert ((totals["branch_b"] > 0) & (totals["branch_b"] < expected)).all()
    assert ctx.counts == {"conv": 5, "batch_norm": 1, "sum": 1, "avg_pool": 1,
                          "adaptive_avg_pool": 1, "linear": 2}
    assert (xx.grad >= 0).all()


LAYERS = {
    "vgg11": ("features.5", "features.10", "features.15"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "densenet121": ("features.transition3", "features.denseblock4", "features.norm5"),
    "squeezenet1_1": ("features.3", "features.7", "features.10"),
    "mobilenet_v2": ("features.3", "features.7", "features.14"),
}


@pytest.mark.parametrize("signed", [True, False])
def test_torchvision_models(torchvision_model, signed):
    """Forward unchanged, counts, conservation at three layers (with the positive rule, a
    non-negative distribution), the map equals the channel sum of the excitation, contrastive
    runs and keeps the difference of two distributions (zero total) at the saliency layer.

    With the signed rule MobileNetV2's linear bottlenecks (signed inputs to 1×1 convolutions)
    make denominators cancel: shares in the thousands, conserved only up to float32 rounding.
    """
    name, model = torchvision_model
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        with quiet(), ExcitationBackpropContext() as ctx:
            inside = model(x)
    assert torch.equal(inside, plain)
    # Under no_grad nothing is replaced: the calls are counted as skipped.
    assert ctx.counts == {} and ctx.skipped.get("conv", 0) > 0
    with ExcitationBackpropContext() as ctx:
        inside = model(x.clone().requires_grad_(True))
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
    if name == "resnet18":
        assert ctx.counts == {"conv": 20, "batch_norm": 20, "sum": 8,
                              "adaptive_avg_pool": 1, "linear": 1}
    if name == "mobilenet_v2":
        assert ctx.counts["sum"] == 10 and ctx.counts["relu6"] == 35
    target = [3, 7]
    layers = LAYERS[name]
    probes = [Probe(model.get_submodule(layer), target="output") for layer in layers]
    try:
        with ExcitationBackpropContext(signed=signed):
            y = model(x)
        seed = torch.zeros_like(y)
        seed[[0, 1], target] = 1
        y.backward(seed)
        excitations = [probe.data[0].grad for probe in probes]
    finally:
        for probe in probes:
            probe.remove()
    atol = 1e-2 if signed and name == "mobilenet_v2" else 1e-4
    for e in excitations:
        assert torch.isfinite(e).all()
        torch.testing.assert_close(e.flatten(1).sum(1), torch.ones(2), rtol=0, atol=atol)
        if not signed:
            assert (e >= 0).all()
    if not signed:
        return  # the wrappers with the positive rule are checked on small nets
    smap = excitation_backprop(model, x, target, saliency_layer=layers[1])
    assert smap.shape == (2, 1) + excitations[1].shape[2:]
    assert smap.dtype == torch.float32 and smap.device == x.device
    torch.testing.assert_close(smap, excitations[1].sum(1, keepdim=True))
    cmap, info = contrastive_excitation_backprop(model, x, target, layers[0], layers[2],
                                                 resize=True, debug=True)
    assert cmap.shape == (2, 1, 64, 64) and (cmap >= 0).all() and cmap.amax() > 0
    torch.testing.assert_close(info.gradient.flatten(1).sum(1), torch.zeros(2), rtol=0,
                               atol=atol)


def test_batch_targets_equal_single_calls(torchvision_models):
    model = torchvision_models["resnet18"]
    torch.manual_seed(3)
    x = torch.randn(3, 3, 64, 64)
    target = [3, 7, 3]
    single = torch.cat([excitation_backprop(model, x[i:i + 1], target[i],
                                            saliency_layer="layer2") for i in range(3)])
    batch = excitation_backprop(model, x, torch.tensor(target), saliency_layer="layer2")
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(batch[0], batch[2])  # same class, different images


# ---------------------------------------------------------------------------------------------
# Contrastive excitation backprop
# ---------------------------------------------------------------------------------------------


def test_contrastive_matches_formula():
    m = ConvHead().double().eval()
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    target = [1, 3]
    smap, info = contrastive_excitation_backprop(m, x, target, "relu1", "relu2", debug=True)
    for n in range(2):
        h1 = m.relu1(m.conv1(x[n:n + 1]))[0].detach().numpy()
        h2 = m.relu2(m.conv2(torch.from_numpy(h1)[None]))[0].detach().numpy()
        W = m.fc.weight.detach().numpy()
        top = onehot(1, [target[n]], 4)[0]
        p_t = np_linear_ebp(h2.reshape(-1), W, top).reshape(h2.shape)
        p_d = np_linear_ebp(h2.reshape(-1), -W, top).reshape(h2.shape)  # the dual unit
        diff = (p_t - p_d) * (h2 > 0)
        p_h1 = np_conv2d_ebp(h1, m.conv2.weight.detach().numpy(), diff, 2, 1)
        np.testing.assert_allclose(info.gradient[n].numpy(), p_h1, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(smap[n, 0].numpy(), np.maximum(p_h1.sum(0), 0),
                                   rtol=1e-10, atol=1e-14)
    assert smap.shape == (2, 1, 6, 6) and smap.dtype == torch.float64
    # Naming the classifier (by name, by module, or an enclosing container) changes nothing.
    for cls in ("fc", m.fc, ""):
        torch.testing.assert_close(
            contrastive_excitation_backprop(m, x, target, "relu1", "relu2",
                                            classifier_layer=cls), smap, rtol=0, atol=0)


def test_contrastive_equals_difference_of_full_maps_any_contrast_layer(torchvision_models):
    """Linearity: independent of the contrast layer, and equal to the positive part of the
    difference between the model's map and the map of a copy whose classifier is negated."""
    model = torchvision_models["resnet18"]
    negated = copy.deepcopy(model)
    with torch.no_grad():
        negated.fc.weight.neg_()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    target = [2, 5]
    _, a = excitation_backprop(model, x, target, saliency_layer="layer2", debug=True)
    _, b = excitation_backprop(negated, x, target, saliency_layer="layer2", debug=True)
    expected = (a.gradient - b.gradient).sum(1, keepdim=True).clamp(min=0)
    for contrast in ("layer3", "avgpool"):
        got = contrastive_excitation_backprop(model, x, target, "layer2", contrast)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # A single-sample call agrees with the batch.
    single = contrastive_excitation_backprop(model, x[1:], target[1], "layer2", "layer4")
    torch.testing.assert_close(single, expected[1:], rtol=1e-4, atol=1e-6)


def test_contrastive_at_the_input_and_resize_smooth():
    m = ConvHead().double().eval()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    smap, info = contrastive_excitation_backprop(m, x, 0, None, "relu2", debug=True)
    assert smap.shape == (1, 1, 6, 6) and info.activation.shape == x.shape
    big = contrastive_excitation_backprop(m, x, 0, None, "relu2", resize=(12, 12))
    assert big.shape == (1, 1, 12, 12)
    smooth = contrastive_excitation_backprop(m, x, 0, None, "relu2", smooth=0.1)
    assert smooth.shape == (1, 1, 6, 6) and not torch.equal(smooth, smap)
    torch.testing.assert_close(smooth, smooth_saliency(smap, 0.1 * 6), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Precision: 16-bit floats keep their signal
# ---------------------------------------------------------------------------------------------


class SmallStack(nn.Module):
    """conv → ReLU → conv → ReLU → avg pool → residual-free linear head; activations small
    (inputs scaled by 1e-3), where float16's own sqrt(tiny) = 7.8e-3 would swallow every unit."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        with torch.no_grad():
            for m in (self.c1, self.c2, self.fc):
                m.weight.abs_()  # every unit has excitatory inputs
                m.bias.zero_()

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        h = F.avg_pool2d(h, 2) + F.avg_pool2d(h, 2) * 0.5  # a weighted sum, in 16 bits too
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_floats_conserve_the_signal(dtype):
    m = SmallStack().eval()
    x = torch.rand(2, 3, 8, 8) * 1e-3
    seed = torch.zeros(2, 5)
    seed[[0, 1], [1, 4]] = 1
    ref, _ = excite(m, x, seed)
    got, ctx = excite(m.to(dtype), x.to(dtype), seed.to(dtype))
    assert got.dtype == dtype
    mass = got.float().flatten(1).sum(1)
    torch.testing.assert_close(mass, torch.ones(2), rtol=0, atol=2e-2)
    torch.testing.assert_close(got.float(), ref, rtol=5e-2, atol=2e-4)
    assert ctx.counts["conv"] == 2 and ctx.counts["sum"] == 1 and ctx.counts["scale"] == 1
    assert excitation_eps(dtype) == excitation_eps(torch.float32)
    # The wrapper too, at a layer.
    smap = excitation_backprop(m, x.to(dtype), [1, 4], saliency_layer="c1")
    torch.testing.assert_close(smap.float().flatten(1).sum(1), torch.ones(2), rtol=0,
                               atol=2e-2)


# ---------------------------------------------------------------------------------------------
# Contrastive: the contrast layer must cut the network
# ---------------------------------------------------------------------------------------------


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(14)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=1))
        self.out = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = self.out(h + self.block(h))
        return self.head(h.mean((2, 3)))


def test_contrast_layer_must_cut_the_network():
    m = ResidualNet().eval()
    x = torch.rand(2, 3, 6, 6)
    for inside in ("block.0", "block.2", "block"):
        with pytest.raises(ValueError, match=rf"'{inside}' does not cut the network.*identity"):
            contrastive_excitation_backprop(m, x, [0, 1], "stem", inside)
    # Above the residual sum every path passes through: fine.
    smap = contrastive_excitation_backprop(m, x, [0, 1], "stem", "out")
    assert smap.shape == (2, 1, 6, 6) and (smap >= 0).all()
    # Inside the block, with the saliency layer inside it too, the cut holds.
    smap = contrastive_excitation_backprop(m, x, [0, 1], "block.0", "block.1")
    assert smap.shape == (2, 1, 6, 6)


def test_contrast_layer_cut_on_resnet(torchvision_models):
    model = torchvision_models["resnet18"]
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="does not cut the network"):
        contrastive_excitation_backprop(model, x, 3, "layer2", "layer3.0.conv2")
    assert contrastive_excitation_backprop(model, x, 3, "layer2", "layer3.1").amax() > 0
