"""Maps: channel flattening, resize and smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.maps import (
    ResizeOrderWarning,
    Shape,
    gradient_to_saliency,
    resize_saliency,
    smooth_saliency,
)

from .conftest import ConvNet, inputs

SETTINGS = settings(max_examples=40, deadline=None)


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
    size = tuple(range(5, 5 + dims))  # torch order (L,), (H, W), (T, H, W)
    resized = gradient(net, x, 1, resize=size[::-1])  # a tuple is TorchRay's (W, H[, T])
    assert resized.shape == (2, 1) + size
    assert torch.equal(gradient(net, x, 1, resize=Shape(size)), resized)
    assert torch.equal(gradient(net, x, 1, resize=Shape(*size)), resized)
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
    with pytest.raises(ValueError, match=r"2 positive sizes, as a tuple in TorchRay's order "
                                         r"\(W, H\).*or as Shape\(H, W\) in torch order"):
        resize_saliency(x, s, (4, 4, 4))
    with pytest.raises(ValueError, match=r"2 positive sizes in torch order Shape\(H, W\)"):
        resize_saliency(x, s, Shape(4, 0))
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


def test_very_wide_smoothing_is_scipys_and_bounded():
    # A kernel far wider than the map runs as the dense (L, L) operator: scipy's numbers, in
    # float32 too, at a cost that does not grow with sigma (the padded convolution's did).
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(2, 1, 7, 11, generator=g, dtype=torch.float64)
    for sigma in (3.0, 40.0, 5000.0):
        out = smooth_saliency(maps, sigma)
        for i in range(2):
            ref = ndimage.gaussian_filter(maps[i, 0].numpy(), sigma, mode="nearest",
                                          truncate=4.0)
            np.testing.assert_allclose(out[i, 0].numpy(), ref, rtol=1e-9, atol=1e-12)
        out32 = smooth_saliency(maps.float(), sigma)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32, out.float(), rtol=1e-5, atol=1e-6)
    # Before: torch.arange's OverflowError (1e99) or the allocator's error (4e12).
    for sigma in (1e99, 4e12):
        with pytest.raises(ValueError, match=r"a Gaussian blur of sigma=\S+ px would need a "
                                             r"kernel of .* taps \(at most 2097153\); a blur "
                                             r"that wide is constant over any image"):
            smooth_saliency(maps, sigma)


@SETTINGS
@given(dims=st.integers(1, 3), sigma=st.floats(0.3, 6.0), size=st.integers(2, 9))
def test_smoothing_equals_scipy_for_any_sigma(dims, sigma, size):
    maps = torch.rand((1, 1) + (size,) * dims, dtype=torch.float64)
    ref = ndimage.gaussian_filter(maps[0, 0].numpy(), sigma, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(smooth_saliency(maps, sigma)[0, 0].numpy(), ref, rtol=1e-9,
                               atol=1e-12)
    # Smoothing preserves the mean of a map only up to border effects, but never leaves the
    # range of the input.
    out = smooth_saliency(maps, sigma)
    assert out.min() >= maps.min() - 1e-12 and out.max() <= maps.max() + 1e-12


@SETTINGS
@given(dims=st.integers(1, 3), data=st.data())
def test_resize_gives_any_requested_size(dims, data):
    size = tuple(data.draw(st.lists(st.integers(1, 12), min_size=dims, max_size=dims)))
    maps = torch.rand((2, 1) + (4,) * dims)
    x = torch.zeros((2, 3) + (5,) * dims)
    out = resize_saliency(x, maps, Shape(size))
    assert out.shape == (2, 1) + size
    assert torch.equal(resize_saliency(x, maps, size[::-1]), out)
    assert torch.equal(resize_saliency(x, maps, list(size[::-1])), out)
    assert out.min() >= maps.min() - 1e-6 and out.max() <= maps.max() + 1e-6


def test_resize_tuple_is_torchrays_width_height():
    """A ported script passes PIL's ``Image.size`` (width, height): the map has height rows."""
    x = torch.zeros(1, 3, 8, 8)
    ramp = torch.arange(4.0).view(1, 1, 2, 2)  # rows differ from columns
    wide = resize_saliency(x, ramp, (6, 3), "nearest")  # width 6, height 3
    assert wide.shape == (1, 1, 3, 6)
    torch.testing.assert_close(wide, F.interpolate(ramp, size=(3, 6), mode="nearest"))
    assert torch.equal(resize_saliency(x, ramp, Shape(3, 6), "nearest"), wide)
    video = torch.rand(1, 1, 2, 3, 4)
    out = resize_saliency(torch.zeros(1, 3, 2, 3, 4), video, (8, 6, 4))  # (W, H, T)
    assert out.shape == (1, 1, 4, 6, 8)
    assert resize_saliency(torch.zeros(1, 3, 5), torch.rand(1, 1, 5), (9,)).shape == (1, 1, 9)
    assert repr(Shape(3, 6)) == "Shape(3, 6)" and Shape(torch.Size([3, 6])) == (3, 6)


def test_torch_size_resize_warns_and_follows_torchray():
    x = torch.zeros(1, 3, 8, 8)
    s = torch.rand(1, 1, 2, 2)
    with pytest.warns(ResizeOrderWarning, match=r"Shape\(x.shape\[2:\]\)"):
        out = resize_saliency(x, s, torch.Size([5, 7]))
    assert out.shape == (1, 1, 7, 5)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resize_saliency(x, s, torch.Size([5, 5])).shape == (1, 1, 5, 5)  # square: silent


def test_numpy_scalars_are_numbers_for_smooth_and_target():
    """Issue 17 item 17: ``smooth=np.float32(0.1)`` and ``target=np.int64(1)`` are accepted
    (with the same map as the Python numbers); NumPy booleans are not numbers."""
    import numpy as np

    from torchray_like import gradient
    from torchray_like.attribution.maps import check_smooth
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    want = gradient(model, x, 1, smooth=0.1)
    torch.testing.assert_close(gradient(model, x, np.int64(1), smooth=np.float32(0.1)), want)
    assert check_smooth(np.float64(0.25)) == 0.25
    with pytest.raises(ValueError, match="smooth must be a non-negative number"):
        check_smooth(np.bool_(True))
