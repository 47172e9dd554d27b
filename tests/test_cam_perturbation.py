"""Score-CAM and Ablation-CAM (issue 19) against direct implementations written here (one
masked or ablated copy at a time), their batching, targets, data ranks, and hostile cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchray_like
from torchray_like.attribution.ablation_cam import ablation_cam, ablation_weights
from torchray_like.attribution.registry import METHODS
from torchray_like.attribution.score_cam import LayerActivation, score_cam, score_cam_masks

from .conftest import (
    ConvNet,
    assert_same_state,
    channel_zeroed,
    inputs,
    primed_model_and_input,
    snapshot,
)

METHODS_HERE = {"score_cam": score_cam, "ablation_cam": ablation_cam}
LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def layer_output(model, x, layer):
    box = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: box.append(o.detach().clone()))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    return box[0], out


def pick(out, c):
    return out[0, c] if out.dim() == 2 and out.shape[1] > 1 else out.reshape(-1)[0] * (2 * c - 1)


def direct_score_cam(model, x, classes, layer, align_corners=False):
    """Paper's Algorithm 1, one channel and one image at a time, in float64."""
    maps = []
    for i, c in enumerate(classes):
        a, _ = layer_output(model, x[i:i + 1], layer)
        scores = []
        for k in range(a.shape[1]):
            up = F.interpolate(a[:, k:k + 1].double(), size=x.shape[2:],
                               mode=LINEAR[x.dim() - 2], align_corners=align_corners)
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
            with torch.no_grad():
                scores.append(pick(model(x[i:i + 1] * mask.to(x.dtype)), c).double())
        w = torch.softmax(torch.stack(scores), 0)
        maps.append((w.view(-1, *[1] * (a.dim() - 2)) * a[0].double()).sum(0).clamp(min=0))
    return torch.stack(maps)[:, None]


def direct_ablation_cam(model, x, classes, layer):
    """Desai & Ramaswamy with |y|: channel k zeroed by a forward hook, one copy at a time."""
    module = dict(model.named_modules())[layer]
    maps = []
    for i, c in enumerate(classes):
        a, out = layer_output(model, x[i:i + 1], layer)
        y = pick(out, c).double()
        drops = []
        for k in range(a.shape[1]):
            with channel_zeroed(module, k), torch.no_grad():
                drops.append((y - pick(model(x[i:i + 1]), c).double()) / y.abs())
        w = torch.stack(drops)
        maps.append((w.view(-1, *[1] * (a.dim() - 2)) * a[0].double()).sum(0).clamp(min=0))
    return torch.stack(maps)[:, None]


DIRECT = {"score_cam": direct_score_cam, "ablation_cam": direct_ablation_cam}


@pytest.mark.parametrize("name", sorted(METHODS_HERE))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_equals_the_direct_implementation_for_every_rank(name, dims):
    model, x = ConvNet(dims).eval(), inputs(dims, n=3, size=6)
    classes = [1, 4, 0]
    want = DIRECT[name](model, x, classes, "features")
    # batch_size 5 does not divide 3 × 8 rows: batches straddle images.
    got = METHODS_HERE[name](model, x, classes, "features", batch_size=5)
    assert got.shape == (3, 1) + x.shape[2:] and got.dtype == torch.float32
    assert not got.requires_grad and got.min() >= 0
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("name", sorted(METHODS_HERE))
def test_batch_size_does_not_change_the_map_and_float64_stays(name):
    model, x = ConvNet(2).double().eval(), inputs(2, n=2, size=8, dtype=torch.float64)
    maps = [METHODS_HERE[name](model, x, [2, 3], batch_size=b) for b in (1, 7, 1000)]
    assert all(m.dtype == torch.float64 for m in maps)
    assert torch.allclose(maps[0], maps[1], rtol=1e-12)
    assert torch.allclose(maps[0], maps[2], rtol=1e-12)
    assert METHODS[name] is METHODS_HERE[name] and getattr(torchray_like, name) is METHODS[name]


def test_score_cam_align_corners_option_changes_only_the_masks():
    model, x = ConvNet(2).eval(), inputs(2, n=1, size=8)
    model.features[3].stride = (2, 2)   # a layer at half the input's resolution: masks upsample
    got = score_cam(model, x, [2], "features", align_corners=True)
    want = direct_score_cam(model, x, [2], "features", align_corners=True)
    assert got.shape == (1, 1, 4, 4)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)
    assert (got - score_cam(model, x, [2], "features")).abs().max() > 1e-5
    with pytest.raises(TypeError, match="align_corners must be True or False"):
        score_cam(model, x, 2, "features", align_corners="yes")


def test_score_cam_masks_are_normalised_and_constant_channels_masked_out():
    a = torch.tensor([[[0.0, 2.0], [4.0, 8.0]], [[3.0, 3.0], [3.0, 3.0]]])
    masks = score_cam_masks(a, (4, 4))
    assert masks.shape == (2, 1, 4, 4)
    assert masks[0].min() == 0 and masks[0].max() == 1
    assert torch.equal(masks[1], torch.zeros(1, 4, 4))


class Binary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("name", sorted(METHODS_HERE))
def test_binary_head_and_callable_targets(name):
    model, x = Binary().eval(), torch.randn(2, 3, 6, 6)
    f = METHODS_HERE[name]
    z = model(x).detach()[:, 0]
    both = f(model, x, [1, 0], "features")   # class 1: +z, class 0: -z
    want = DIRECT[name](model, x, [1, 0], "features")
    assert torch.allclose(both.double(), want, rtol=1e-4, atol=1e-6)
    # A callable target scores every row of a batch of copies: -z is class 0.
    by_callable = f(model, x, lambda out: -out[:, 0], "features")
    assert torch.allclose(by_callable, f(model, x, [0, 0], "features"), atol=1e-6)
    assert z.shape == (2,)


def test_ablation_divides_by_the_absolute_score():
    assert torch.equal(ablation_weights(torch.tensor([2.0, -2.0]),
                                        torch.tensor([[1.0, 3.0], [-3.0, -1.0]])),
                       torch.tensor([[0.5, -0.5], [0.5, -0.5]]))
    with pytest.raises(ValueError, match=r"score is exactly 0 for sample\(s\) \[1\]"):
        ablation_weights(torch.tensor([1.0, 0.0]), torch.zeros(2, 3))


def test_ablation_zero_score_through_the_method():
    model = Binary().eval()
    model.fc.bias.data.zero_()
    model.fc.weight.data.zero_()
    with pytest.raises(ValueError, match="undefined; explain another class, or use score_cam"):
        ablation_cam(model, torch.randn(1, 3, 6, 6), 1, "features")


# ---------------------------------------------------------------------------------------------
# Hostile cases
# ---------------------------------------------------------------------------------------------


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.relu(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("name", sorted(METHODS_HERE))
def test_errors_name_the_argument(name):
    f = METHODS_HERE[name]
    model, x = Twice().eval(), torch.randn(2, 3, 6, 6)
    cases = [
        (dict(saliency_layer=""), ValueError, "has no such channels.*name a convolutional"),
        (dict(saliency_layer="relu"), ValueError, "called 2 times in the forward pass"),
        (dict(saliency_layer="fc"), ValueError, r"outputs shape \(2, 3\), not \(N, C, \*spatial"),
        (dict(saliency_layer="conv2"), ValueError, "no module named 'conv2'"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(batch_size=2.5), TypeError, "batch_size must be a positive int"),
        (dict(progress="no"), TypeError, "progress must be True, False or None"),
        (dict(smooth=-1), ValueError, "smooth must be a non-negative number"),
        (dict(resize=(3, 0)), ValueError, "resize must give 2 positive sizes"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            f(model, x, 0, **{"saliency_layer": "conv", **options})
    with pytest.raises(ValueError, match="out of range"):
        f(model, x, 3, "conv")
    with pytest.raises(ValueError, match="target is required"):
        f(model, x, None, "conv")
    with pytest.raises(TypeError, match="floating-point tensor"):
        f(model, x.to(torch.uint8), 0, "conv")
    with pytest.raises(ValueError, match="NaN"):
        f(model, torch.full_like(x, float("nan")), 0, "conv")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        f(lambda t: t, x, 0, "conv")


@pytest.mark.parametrize("name", sorted(METHODS_HERE))
def test_batch_statistics_layers_are_refused(name):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        METHODS_HERE[name](model, torch.randn(2, 3, 6, 6), 0, "2")


@pytest.mark.parametrize("name", sorted(METHODS_HERE))
def test_dict_output_needs_a_callable_target(name):
    class DictNet(Twice):
        def forward(self, x):
            return {"logits": super().forward(x)}

    model, x = DictNet().eval(), torch.randn(2, 3, 6, 6)
    with pytest.raises(TypeError, match="callable target"):
        METHODS_HERE[name](model, x, 0, "conv")
    smap = METHODS_HERE[name](model, x, lambda out: out["logits"][:, 1], "conv")
    plain = Twice().eval()
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(smap, METHODS_HERE[name](plain, x, 1, "conv"), atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS_HERE))
def test_state_restored_after_success_and_failure(name):
    model, x = primed_model_and_input()
    before = snapshot(model, x)
    smap = METHODS_HERE[name](model, x, [0, 2], "bn", progress=True)
    assert smap.shape == (2, 1, 5, 5)
    assert_same_state(before, snapshot(model, x))
    model.armed = True
    before = snapshot(model, x)
    with pytest.raises(RuntimeError, match="boom inside the model"):
        METHODS_HERE[name](model, x, 1, "bn")
    assert_same_state(before, snapshot(model, x))


@pytest.mark.parametrize("name", sorted(METHODS_HERE))
def test_inplace_operation_after_the_layer_does_not_change_the_reading(name):
    class Inplace(Twice):
        def forward(self, x):
            h = self.conv(x)
            return self.fc(F.relu(h, inplace=True).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Inplace().eval(), torch.randn(2, 3, 6, 6)
    smap = METHODS_HERE[name](model, x, [0, 1], "conv")
    assert torch.allclose(smap.double(), DIRECT[name](model, x, [0, 1], "conv"), rtol=1e-4,
                          atol=1e-6)


def test_layer_hook_records_only_when_asked_and_checks_replacements():
    model, x = Twice().eval(), torch.randn(2, 3, 6, 6)
    quiet = LayerActivation(model.conv, record=False)
    try:
        model(x)
        assert quiet.outputs == []
        quiet.replacement = torch.zeros(3, 4, 6, 6)
        with pytest.raises(ValueError, match=r"changed shape between forward passes \(\(2, 4, 6, "
                                             r"6\) for a batch of \(3, 4, 6, 6\)\)"):
            model(x)
        quiet.replacement = torch.zeros(2, 4, 6, 6)
        with torch.no_grad():
            assert torch.allclose(model(x), model.fc(torch.zeros(2, 4)))
    finally:
        quiet.remove()
    assert not model.conv._forward_hooks


class ViewsInput(nn.Module):
    """A model that flattens its *input* with ``view`` (fails on a channels-last batch)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(3 * 6 * 6 + 4, 5)

    def forward(self, x):
        flat = x.view(x.shape[0], -1)
        return self.head(torch.cat([flat, self.features(x).mean((2, 3))], 1))


class ReadsStorage(nn.Module):
    """A model that reads its input's memory in storage order (a channels-last batch gives
    other numbers without an error)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(3 * 6 * 6 + 4, 5)

    def forward(self, x):
        raw = x.as_strided((x.shape[0], x[0].numel()), (x[0].numel(), 1))
        return self.head(torch.cat([raw, self.features(x).mean((2, 3))], 1))


@pytest.mark.parametrize("cls", [ViewsInput, ReadsStorage])
def test_score_cam_channels_last_batches_fall_back_to_the_plain_layout(cls):
    """Score-CAM's masked copies are channels-last (about twice as fast on CPU) only while the
    model agrees with the plain layout on the first batch; otherwise the map is the paper's."""
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    want = direct_score_cam(model, x, [1, 3], "features")
    got = score_cam(model, x, [1, 3], "features", batch_size=3)
    assert got.shape == (2, 1, 6, 6)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6), (got - want).abs().max()


def test_score_cam_channels_last_gives_the_plain_maps_on_a_convnet():
    model, x = ConvNet(2).eval(), inputs(2, n=2, size=8)
    got = score_cam(model, x, [2, 3], "features", batch_size=4)
    want = direct_score_cam(model, x, [2, 3], "features")
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("cls", [ViewsInput, ReadsStorage])
def test_occlusion_channels_last_batches_fall_back_to_the_plain_layout(cls):
    """Occlusion's copies too: channels-last only while the model agrees with the plain
    layout.  Non-overlapping 2 × 2 windows: each pixel's value is its window's score drop."""
    from torchray_like.attribution.occlusion import occlusion

    torch.manual_seed(0)
    model = cls().eval()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    got = occlusion(model, x, [1, 3], window=2, stride=2, batch_size=5)
    want = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        for i, c in enumerate([1, 3]):
            clean = model(x[i:i + 1])[0, c].double()
            for r in range(0, 6, 2):
                for s in range(0, 6, 2):
                    occluded = x[i:i + 1].clone()
                    occluded[..., r:r + 2, s:s + 2] = 0
                    want[i, 0, r:r + 2, s:s + 2] = clean - model(occluded)[0, c].double()
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6), (got - want).abs().max()
