"""Grad-CAM and guided Grad-CAM: hand computations, the paper's properties, state, errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.common import SaliencyDebug, smooth_saliency
from torchray_like.attribution.grad_cam import find_saliency_layer, grad_cam, grad_cam_map
from torchray_like.attribution.guided_backprop import guided_backprop
from torchray_like.attribution.guided_grad_cam import GuidedGradCamDebug, guided_grad_cam

from .conftest import (
    AUTO_LAYERS,
    EXPLICIT_LAYERS,
    SIZES,
    TwoBranch,
    assert_same_state,
    batch,
    hook_reference,
    make,
    primed_model_and_input,
    snapshot,
)

# The module itself (the package re-exports the function under the same name).
grad_cam_module = importlib.import_module("torchray_like.attribution.grad_cam")
from torchray_like.attribution import layer_choice  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Small hand-built networks
# ---------------------------------------------------------------------------------------------




def hand_grad_cam(activation, gradient):
    """Selvaraju et al. eq. 1-2 written out with explicit loops over channels."""
    n, k = activation.shape[:2]
    out = torch.zeros((n, 1) + activation.shape[2:], dtype=activation.dtype)
    for i in range(n):
        for c in range(k):
            alpha = gradient[i, c].sum() / gradient[i, c].numel()  # mean over all positions
            out[i, 0] += alpha * activation[i, c]
    return torch.where(out > 0, out, torch.zeros_like(out))






# ---------------------------------------------------------------------------------------------
# Grad-CAM against hand computations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("relu_after", [False, True])
def test_grad_cam_matches_hand_computation(dims, relu_after):
    model = make(dims, relu_after=relu_after)
    x = batch(dims)
    classes = [0, 3, 1]
    smap = grad_cam(model, x, classes, "body")
    expected = hand_grad_cam(model.activation(x), model.layer_gradient(x, classes))
    assert smap.shape == (3, 1) + SIZES[dims]
    assert smap.dtype == torch.float64 and smap.device == x.device
    assert not smap.requires_grad
    torch.testing.assert_close(smap, expected, rtol=1e-10, atol=1e-12)
    # The check can fail: the map is non-trivial, and it is not the un-averaged weighting.
    assert (expected > 0).any() and (expected == 0).any()
    unaveraged = (model.activation(x) * model.layer_gradient(x, classes)).sum(1, keepdim=True)
    assert not torch.allclose(smap, unaveraged.clamp(min=0))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grad_cam_module_argument_and_pure_map(dims):
    model = make(dims)
    x = batch(dims, n=2)
    by_module = grad_cam(model, x, 2, model.body)
    a, g = model.activation(x), model.layer_gradient(x, [2, 2])
    torch.testing.assert_close(by_module, hand_grad_cam(a, g), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_cam_map(a, g), hand_grad_cam(a, g), rtol=1e-10, atol=1e-12)


def test_grad_cam_finite_differences_on_smooth_head():
    """The gradient Grad-CAM averages is ∂y/∂A: check by central differences (float64)."""
    torch.manual_seed(3)
    body = nn.Conv2d(2, 3, 3, padding=1).double()
    head = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Softplus(), nn.Flatten(),
                         nn.Linear(2 * 16, 4)).double()
    model = nn.Sequential(body, head).eval()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    a = body(x).detach()
    eps = 1e-6
    grad = torch.zeros_like(a)
    with torch.no_grad():
        for idx in range(a.numel()):
            d = torch.zeros(a.numel(), dtype=torch.float64)
            d[idx] = eps
            d = d.view_as(a)
            grad.view(-1)[idx] = (head(a + d)[0, 1] - head(a - d)[0, 1]) / (2 * eps)
    smap = grad_cam(model, x, 1, "0")
    torch.testing.assert_close(smap, hand_grad_cam(a, grad), rtol=1e-6, atol=1e-8)
    assert smap.max() > 0


def test_grad_cam_relu_keeps_positive_part_of_signed_sum():
    model = make(2)
    x = batch(2, n=2)
    a = model.activation(x)
    onehot = torch.zeros(2, 4, dtype=torch.float64)
    onehot[:, 1] = 1
    pos = grad_cam(model, x, onehot, "body")
    neg = grad_cam(model, x, -onehot, "body")  # seed -1: explains -y
    g = model.layer_gradient(x, [1, 1])
    signed = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True)
    assert (signed > 0).any() and (signed < 0).any()
    torch.testing.assert_close(pos - neg, signed, rtol=1e-10, atol=1e-12)
    assert (pos >= 0).all() and (neg >= 0).all()
    assert ((pos == 0) | (neg == 0)).all()


def test_grad_cam_averages_over_every_spatial_dim_3d():
    """Video: α averages over T, H and W — not per frame."""
    model = make(3)
    x = batch(3, n=1)
    a, g = model.activation(x), model.layer_gradient(x, [0])
    smap = grad_cam(model, x, 0, "body")
    per_frame = (g.mean(dim=(3, 4), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(smap, hand_grad_cam(a, g), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(smap, per_frame)


def test_grad_cam_layer_followed_by_inplace_relu():
    """The probed conv output is then rectified in place: the map uses the pre-ReLU values."""
    model = make(2, relu_after=True, inplace=True)
    x = batch(2)
    a = model.activation(x)
    assert (a < 0).any()
    smap, info = grad_cam(model, x, [1, 1, 2], "body", debug=True)
    assert isinstance(info, SaliencyDebug)
    torch.testing.assert_close(info.activation, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(info.gradient, model.layer_gradient(x, [1, 1, 2]))
    torch.testing.assert_close(smap, hand_grad_cam(a, model.layer_gradient(x, [1, 1, 2])))


def test_grad_cam_batch_targets_equal_per_sample_calls():
    model = make(2, relu_after=True)
    x = batch(2, n=4)
    targets = [3, 0, 2, 0]
    together = grad_cam(model, x, torch.tensor(targets), "body")
    alone = torch.cat([grad_cam(model, x[i:i + 1], t, "body") for i, t in enumerate(targets)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(together, grad_cam(model, x, 0, "body"))


class CountingIdentity(torch.autograd.Function):
    """Identity whose backward counts its calls."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        CountingIdentity.calls += 1
        return g


class BelowLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.top = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        h = self.conv(CountingIdentity.apply(x))
        return self.fc(F.relu(self.top(F.relu(h))).flatten(1))


def test_backprop_stops_at_the_layer():
    from torchray_like.attribution.linear_approx import linear_approx

    torch.manual_seed(0)
    model = BelowLayer().train()  # parameters require grad: they must not pull backward down
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    CountingIdentity.calls = 0
    grad_cam(model, x, 1, "top")
    linear_approx(model, x, 1, "top")
    assert CountingIdentity.calls == 0
    guided_grad_cam(model, x, 1, "top")  # its guided part goes down to the input, once
    assert CountingIdentity.calls == 1


def test_grad_cam_callable_target():
    model = make(1)
    x = batch(1, n=2)
    by_callable = grad_cam(model, x, lambda out: out[:, 2] - out[:, 0], "body")
    g = model.layer_gradient(x, [2, 2]) - model.layer_gradient(x, [0, 0])
    torch.testing.assert_close(by_callable, hand_grad_cam(model.activation(x), g))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grad_cam_resize_and_smooth(dims):
    model = make(dims)
    x = batch(dims, n=2)
    base = grad_cam(model, x, 1, "body")
    size = tuple(2 * s for s in SIZES[dims])
    resized = grad_cam(model, x, 1, "body", resize=size[::-1])  # TorchRay order: (W, H[, T])
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[dims]
    torch.testing.assert_close(resized, F.interpolate(base, size=size, mode=mode,
                                                      align_corners=False))
    same = grad_cam(model, x, 1, "body", resize=True)  # input size = layer size here
    torch.testing.assert_close(same, base)
    smoothed = grad_cam(model, x, 1, "body", smooth=0.1)
    torch.testing.assert_close(smoothed, smooth_saliency(base, 0.1 * max(SIZES[dims])))


def test_grad_cam_float32_and_at_the_input():
    model = make(2).float()
    x = batch(2).float()
    smap = grad_cam(model, x, 0, "body")
    assert smap.dtype == torch.float32
    # "" means the input: α per input channel.
    at_input = grad_cam(model, x, 0, "")
    with torch.enable_grad():
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xx)[:, 0].sum(), xx)
    torch.testing.assert_close(at_input, hand_grad_cam(x, g))


# ---------------------------------------------------------------------------------------------
# Guided Grad-CAM
# ---------------------------------------------------------------------------------------------


class HandGuidedReLU(torch.autograd.Function):
    """Springenberg et al.: p' = p · [x > 0] · [p > 0], written out."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, p):
        (x,) = ctx.saved_tensors
        return p * (x > 0).to(p.dtype) * (p > 0).to(p.dtype)


class PoolNet(nn.Module):
    """conv1 -> relu -> maxpool 2 -> conv2 (the Grad-CAM layer, half resolution) -> relu -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 3)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        h = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(F.relu(self.conv2(h)).flatten(1))

    def guided_forward(self, x):
        """Same network with the hand-written guided ReLU."""
        h = F.max_pool2d(HandGuidedReLU.apply(self.conv1(x)), 2)
        return self.fc(HandGuidedReLU.apply(self.conv2(h)).flatten(1))


def test_guided_grad_cam_equals_product_of_independent_parts():
    torch.manual_seed(0)
    model = PoolNet().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    classes = [2, 0]
    smap, info = guided_grad_cam(model, x, classes, "conv2", debug=True)

    # Grad-CAM part, in closed form from the plain gradient: ∂y/∂A2 = fc row · [A2 > 0].
    h = F.max_pool2d(torch.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)), 2)
    a2 = F.conv2d(h, model.conv2.weight, model.conv2.bias, padding=1)
    g2 = model.fc.weight[classes].view(a2.shape) * (a2 > 0).double()
    cam = hand_grad_cam(a2, g2)
    cam_up = F.interpolate(cam, size=(8, 8), mode="bilinear", align_corners=False)
    # Guided part with the hand-written rule.
    with torch.enable_grad():
        xx = x.clone().requires_grad_(True)
        y = model.guided_forward(xx)
        (guided,) = torch.autograd.grad(y[[0, 1], classes].sum(), xx)
    expected = (guided * cam_up).abs().amax(1, keepdim=True)

    assert smap.shape == (2, 1, 8, 8) and smap.dtype == torch.float64
    torch.testing.assert_close(smap, expected, rtol=1e-10, atol=1e-12)
    assert smap.max() > 0 and (smap == 0).any()
    assert isinstance(info, GuidedGradCamDebug)
    torch.testing.assert_close(info.cam, cam, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info.guided_gradient, guided, rtol=1e-10, atol=1e-12)
    # α comes from the plain gradient, which has negative entries the guided rule would drop.
    torch.testing.assert_close(info.gradient, g2, rtol=1e-12, atol=1e-12)
    assert (g2 < 0).any()
    guided_cam = hand_grad_cam(a2, g2.clamp(min=0))
    assert not torch.allclose(info.cam, guided_cam)
    # And it is the composition of this library's own two methods.
    composed = guided_backprop(model, x, classes) * grad_cam(model, x, classes, "conv2",
                                                             resize=True)
    torch.testing.assert_close(smap, composed, rtol=1e-10, atol=1e-12)


def test_guided_grad_cam_one_forward_pass():
    torch.manual_seed(0)
    model = PoolNet().eval()
    x = torch.randn(2, 3, 8, 8)
    guided_grad_cam(model, x, 1, "conv2")
    assert model.forwards == 1
    guided_grad_cam(model, x, 1)  # discovery (1) + the call (1)
    assert model.forwards == 3
    guided_grad_cam(model, x, 1)
    assert model.forwards == 4


def test_guided_grad_cam_multiplies_before_flattening():
    """With a custom flattening (signed channel sum) the per-channel product is what counts."""
    torch.manual_seed(0)
    model = PoolNet().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    flat_sum = lambda t: t.grad.sum(1, keepdim=True)  # noqa: E731
    smap, info = guided_grad_cam(model, x, 1, "conv2", gradient_to_saliency=flat_sum,
                                 debug=True)
    cam_up = F.interpolate(info.cam, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(smap, (info.guided_gradient * cam_up).sum(1, keepdim=True))


@pytest.mark.parametrize("dims", [1, 3])
def test_guided_grad_cam_1d_3d(dims):
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    pool = {1: nn.MaxPool1d, 3: nn.MaxPool3d}[dims]
    size = (8,) * dims
    model = nn.Sequential(conv(2, 3, 3, padding=1), nn.ReLU(), pool(2),
                          conv(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 ** dims, 3)).double().eval()
    x = torch.randn((2, 2) + size, dtype=torch.float64)
    smap = guided_grad_cam(model, x, [1, 2], "3")
    composed = guided_backprop(model, x, [1, 2]) * grad_cam(model, x, [1, 2], "3", resize=True)
    assert smap.shape == (2, 1) + size
    torch.testing.assert_close(smap, composed, rtol=1e-10, atol=1e-12)
    assert smap.max() > 0


def test_guided_grad_cam_batch_targets_equal_per_sample_calls():
    torch.manual_seed(0)
    model = PoolNet().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    targets = [1, 2, 0]
    together = guided_grad_cam(model, x, targets, "conv2", resize=(4, 4))
    alone = torch.cat([guided_grad_cam(model, x[i:i + 1], t, "conv2", resize=(4, 4))
                       for i, t in enumerate(targets)])
    assert together.shape == (3, 1, 4, 4)
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# torchvision models
# ---------------------------------------------------------------------------------------------

# Conv followed by an in-place ReLU (VGG), torch.cat outputs (DenseNet block, SqueezeNet Fire).




def test_torchvision_grad_cam(torchvision_model):
    name, model = torchvision_model
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    classes = [3, 7]
    assert find_saliency_layer(model, x) == AUTO_LAYERS[name]
    before = snapshot(model, x)
    for layer in (None, EXPLICIT_LAYERS[name]):
        smap = grad_cam(model, x, classes, layer)
        a, g = hook_reference(model, x, classes, layer or AUTO_LAYERS[name])
        expected = hand_grad_cam(a.double(), g.double()).float()
        assert smap.shape == (2, 1) + a.shape[2:]
        assert (smap >= 0).all() and smap.max() > 0
        torch.testing.assert_close(smap, expected, rtol=1e-4, atol=1e-5 * float(expected.max()))
    assert_same_state(before, snapshot(model, x))


def test_torchvision_guided_grad_cam(torchvision_model):
    name, model = torchvision_model
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    classes = [3, 7]
    before = snapshot(model, x)
    smap, info = guided_grad_cam(model, x, classes, debug=True)
    assert smap.shape == (2, 1, 64, 64) and (smap >= 0).all() and smap.max() > 0
    cam_up = grad_cam(model, x, classes, resize=True)
    composed = guided_backprop(model, x, classes) * cam_up
    torch.testing.assert_close(smap, composed, rtol=1e-4, atol=1e-5 * float(composed.max()))
    torch.testing.assert_close(F.interpolate(info.cam, size=(64, 64), mode="bilinear",
                                             align_corners=False), cam_up)
    assert info.guided_gradient.shape == (2, 3, 64, 64)
    assert_same_state(before, snapshot(model, x))


# ---------------------------------------------------------------------------------------------
# State invariants
# ---------------------------------------------------------------------------------------------






METHODS = {"grad_cam": grad_cam, "guided_grad_cam": guided_grad_cam}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("layer", [None, "bn"])
def test_state_restored_after_success(method, layer):
    model, x = primed_model_and_input()
    before = snapshot(model, x)
    smap = METHODS[method](model, x, [0, 2], layer)
    assert smap.shape[:2] == (2, 1) and smap.max() > 0
    assert_same_state(before, snapshot(model, x))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("layer", [None, "bn"])
def test_state_restored_after_exception_in_model(method, layer):
    model, x = primed_model_and_input()
    if layer is None:
        find_saliency_layer(model, x)  # cached: the exception then comes from the call itself
    model.armed = True
    before = snapshot(model, x)
    with pytest.raises(RuntimeError, match="boom inside the model"):
        METHODS[method](model, x, 1, layer)
    assert_same_state(before, snapshot(model, x))
    # Discovery itself raising leaves nothing behind either.
    layer_choice.LAYER_CACHE.pop(model, None)
    with pytest.raises(RuntimeError, match="boom inside the model"):
        METHODS[method](model, x, 1)
    assert_same_state(before, snapshot(model, x))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_restored_after_error_after_forward(method):
    model, x = primed_model_and_input()
    before = snapshot(model, x)
    with pytest.raises(ValueError, match="out of range"):
        METHODS[method](model, x, 5, "bn")
    assert_same_state(before, snapshot(model, x))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------




@pytest.mark.parametrize("method", sorted(METHODS))
def test_errors(method):
    f = METHODS[method]
    torch.manual_seed(0)
    model = TwoBranch().eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"no module named 'conv2'.*closest names: 'conv'"):
        f(model, x, 0, "conv2")
    with pytest.raises(ValueError, match="not a sub-module"):
        f(model, x, 0, nn.Conv2d(3, 4, 1))
    with pytest.raises(TypeError, match="dotted name or an nn.Module"):
        f(model, x, 0, 3)
    with pytest.raises(ValueError, match="out of range"):
        f(model, x, 3, "conv")
    with pytest.raises(ValueError, match="3 class indices but the batch has 2"):
        f(model, x, [0, 1, 2], "conv")
    with pytest.raises(ValueError, match="target is required"):
        f(model, x, None, "conv")
    with pytest.raises(TypeError, match="floating-point tensor.*uint8"):
        f(model, (x * 10).to(torch.uint8), 0, "conv")
    with pytest.raises(ValueError, match=r"must have shape \(N, C, \*spatial\)"):
        f(model, x[0, 0], 0, "conv")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        f(lambda t: t, x, 0, "conv")
    with pytest.raises(ValueError, match="called 2 times"):
        f(model, x, 0, "twice")
    with pytest.raises(ValueError, match="(does|do) not depend on saliency_layer 'unused'"):
        f(model, x, 0, "unused")
    with pytest.raises(ValueError, match="smooth must be a non-negative number"):
        f(model, x, 0, "conv", smooth=-1)
    with pytest.raises(ValueError, match="resize must give 2 positive sizes"):
        f(model, x, 0, "conv", resize=(3, 0))
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        f(model, x, 0, "conv", resize=True, resize_mode="cubic")


def test_grad_cam_errors_specific():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"saliency_layer 'fc' outputs shape \(2, 3\).*no "
                                         r"spatial dimensions"):
        grad_cam(model, x, 0, "fc")
    with pytest.raises(ValueError, match="gradient shape .* differs"):
        grad_cam_map(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="Grad-CAM needs a layer output with spatial"):
        grad_cam_map(torch.zeros(1, 2), torch.zeros(1, 2))


def test_guided_grad_cam_errors_specific():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"saliency_layer 'flat' outputs shape \(2, 4, 16\) "
                                         r"but the input has shape \(2, 3, 4, 4\)"):
        guided_grad_cam(model, x, 0, "flat")
    no_relu = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)).eval()
    with pytest.raises(ValueError, match=r"replaced no ReLU.*tanh"):
        guided_grad_cam(no_relu, x, 0, "0")
