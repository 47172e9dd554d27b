"""Linear approximation: first-order identities, finite differences, state, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.common import SaliencyDebug
from torchray_like.attribution.grad_cam import find_saliency_layer
from torchray_like.attribution.linear_approx import linear_approx, linear_approx_map

from .conftest import (
    AUTO_LAYERS,
    EXPLICIT_LAYERS,
    SIZES,
    Exploding,
    TwoBranch,
    assert_same_state,
    batch,
    hook_reference,
    make,
    primed_model_and_input,
    snapshot,
)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_first_order_identity_at_layer(dims):
    """Affine after the layer, y = <W, A> + b: the map sums to y - b = y(A) - y(A = 0)."""
    model = make(dims)
    x = batch(dims)
    classes = [0, 3, 1]
    smap = linear_approx(model, x, classes, "body")
    a = model.activation(x)
    with torch.no_grad():
        y = model(x)[torch.arange(3), classes]
        y0 = model.fc(torch.zeros_like(a).flatten(1))[torch.arange(3), classes]
    assert smap.shape == (3, 1) + SIZES[dims] and smap.dtype == torch.float64
    torch.testing.assert_close(smap.flatten(1).sum(1), y - y0, rtol=1e-10, atol=1e-12)
    # Per position: Σ_k A_k W_k, written out.
    w = model.fc.weight[classes].view(a.shape)
    torch.testing.assert_close(smap, (a * w).sum(1, keepdim=True), rtol=1e-12, atol=1e-12)
    assert (smap < 0).any() and (smap > 0).any()  # signed, not clamped


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_first_order_identity_at_input(dims):
    """A network linear in the input: gradient × input sums to y(x) - y(0)."""
    model = make(dims)
    x = batch(dims, n=2)
    smap = linear_approx(model, x, [2, 1])
    with torch.no_grad():
        y = model(x)[[0, 1], [2, 1]]
        y0 = model(torch.zeros_like(x))[[0, 1], [2, 1]]
    assert smap.shape == (2, 1) + SIZES[dims]
    torch.testing.assert_close(smap.flatten(1).sum(1), y - y0, rtol=1e-10, atol=1e-12)
    assert torch.equal(smap, linear_approx(model, x, [2, 1], ""))


def test_euler_identity_bias_free_relu_net():
    """A bias-free ReLU network is positively homogeneous: Σ x · ∂y/∂x = y exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 9, 3, bias=False)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)[[0, 1], [1, 2]]
    for layer in ("", "1", "4"):  # the input, a layer before an in-place ReLU, the last ReLU
        smap = linear_approx(model, x, [1, 2], layer)
        torch.testing.assert_close(smap.flatten(1).sum(1), y, rtol=1e-10, atol=1e-12)


def test_finite_differences_smooth_head():
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
            grad.view(-1)[idx] = (head(a + d)[0, 2] - head(a - d)[0, 2]) / (2 * eps)
    smap, info = linear_approx(model, x, 2, "0", debug=True)
    torch.testing.assert_close(smap, (a * grad).sum(1, keepdim=True), rtol=1e-6, atol=1e-8)
    assert isinstance(info, SaliencyDebug)
    torch.testing.assert_close(info.gradient, grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(linear_approx_map(a, grad), smap, rtol=1e-6, atol=1e-8)


def test_layer_followed_by_inplace_relu():
    model = make(2, relu_after=True, inplace=True)
    x = batch(2)
    a = model.activation(x)
    assert (a < 0).any()
    smap = linear_approx(model, x, [1, 0, 3], "body")
    expected = (a * model.layer_gradient(x, [1, 0, 3])).sum(1, keepdim=True)
    torch.testing.assert_close(smap, expected, rtol=1e-12, atol=1e-12)


def test_batch_targets_equal_per_sample_calls():
    model = make(3, relu_after=True)
    x = batch(3, n=3)
    targets = [2, 0, 2]
    together = linear_approx(model, x, targets, "body")
    alone = torch.cat([linear_approx(model, x[i:i + 1], t, "body")
                       for i, t in enumerate(targets)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def test_resize_float32_and_auto_layer_helper():
    model = make(2).float()
    x = batch(2).float()
    smap = linear_approx(model, x, 1, "body", resize=(10, 12))  # (W, H), as in TorchRay
    base = linear_approx(model, x, 1, "body")
    assert smap.dtype == torch.float32 and smap.shape == (3, 1, 12, 10)
    torch.testing.assert_close(smap, F.interpolate(base, size=(12, 10), mode="bilinear",
                                                   align_corners=False))
    layer = find_saliency_layer(model, x)
    # nn.Identity returns body's very tensor: it only renames body's output, which is chosen.
    assert layer == "body"
    torch.testing.assert_close(linear_approx(model, x, 1, layer), base)


def test_torchvision_models(torchvision_model):
    name, model = torchvision_model
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    classes = [3, 7]
    before = snapshot(model, x)
    layer = EXPLICIT_LAYERS[name]
    smap = linear_approx(model, x, classes, layer)
    a, g = hook_reference(model, x, classes, layer)
    expected = (a * g).sum(1, keepdim=True)
    assert smap.shape == (2, 1) + a.shape[2:] and smap.dtype == torch.float32
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(smap, expected, rtol=1e-4, atol=1e-5 * scale)
    # At the input: gradient × input summed over channels.
    at_input = linear_approx(model, x, classes)
    with torch.enable_grad():
        xx = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(model(xx)[[0, 1], classes].sum(), xx)
    expected = (x * gx).sum(1, keepdim=True)
    torch.testing.assert_close(at_input, expected, rtol=1e-4,
                               atol=1e-5 * float(expected.abs().max()))
    assert AUTO_LAYERS[name] == find_saliency_layer(model, x)
    assert_same_state(before, snapshot(model, x))


@pytest.mark.parametrize("layer", ["", "bn"])
def test_state_after_success_and_exception(layer):
    model, x = primed_model_and_input()
    before = snapshot(model, x)
    smap = linear_approx(model, x, [0, 2], layer)
    assert smap.shape[:2] == (2, 1) and smap.abs().max() > 0
    assert_same_state(before, snapshot(model, x))
    model.armed = True
    before = snapshot(model, x)
    with pytest.raises(RuntimeError, match="boom inside the model"):
        linear_approx(model, x, 1, layer)
    assert_same_state(before, snapshot(model, x))
    model.armed = False
    with pytest.raises(ValueError, match="out of range"):
        linear_approx(model, x, 7, layer)
    assert_same_state(before, snapshot(model, x))
    assert isinstance(model, Exploding)


def test_errors():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"saliency_layer 'fc' outputs shape \(2, 3\).*no "
                                         r"spatial dimensions"):
        linear_approx(model, x, 0, "fc")
    with pytest.raises(ValueError, match=r"no module named 'con'.*closest names: 'conv'"):
        linear_approx(model, x, 0, "con")
    with pytest.raises(ValueError, match="called 2 times"):
        linear_approx(model, x, 0, "twice")
    with pytest.raises(ValueError, match="2 class indices but the batch has 1"):
        linear_approx(model, x[:1], [0, 1])
    with pytest.raises(TypeError, match="floating-point tensor"):
        linear_approx(model, x.long(), 0)
    with pytest.raises(ValueError, match="target is required"):
        linear_approx(model, x, None)
    with pytest.raises(ValueError, match="gradient shape .* differs"):
        linear_approx_map(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="needs a tensor with spatial dimensions"):
        linear_approx_map(torch.zeros(1, 2), torch.zeros(1, 2))
