"""Property-based tests (hypothesis) of targets, seeds, smoothing and the rectifier rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from torchray_like.attribution.common import (get_backward_gradient, get_pointing_gradient,
                                              resize_saliency, smooth_saliency)
from torchray_like.attribution.deconvnet import DeConvNetContext
from torchray_like.attribution.guided_backprop import GuidedBackpropContext

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(n=st.integers(1, 6), c=st.integers(2, 9), data=st.data())
def test_one_hot_seed_for_any_per_sample_targets(n, c, data):
    targets = data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    out = torch.randn(n, c)
    seed = get_backward_gradient(out, targets)
    assert seed.shape == out.shape and seed.sum().item() == n
    assert seed[torch.arange(n), torch.tensor(targets)].eq(1).all()
    bad = data.draw(st.one_of(st.integers(c, c + 20), st.integers(-20, -1)))
    wrong = list(targets)
    wrong[data.draw(st.integers(0, n - 1))] = bad
    with pytest.raises(ValueError, match="out of range"):
        get_backward_gradient(out, wrong)
    with pytest.raises(ValueError, match="class indices but the batch has"):
        get_backward_gradient(out, targets + [0])


@SETTINGS
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6),
       scale=st.floats(1e-3, 1e4), data=st.data())
def test_pointing_seed_is_a_distribution_over_space(n, c, h, w, scale, data):
    target = data.draw(st.integers(0, c - 1))
    maps = torch.randn(n, c, h, w, dtype=torch.float64) * scale
    seed = get_pointing_gradient(maps, target)
    assert torch.isfinite(seed).all() and (seed >= 0).all()
    torch.testing.assert_close(seed[:, target].sum((1, 2)), torch.ones(n, dtype=torch.float64))
    assert seed.sum().item() == pytest.approx(n)
    # The seed peaks where the target channel does.
    assert torch.equal(seed[:, target].flatten(1).argmax(1), maps[:, target].flatten(1).argmax(1))


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
    out = resize_saliency(x, maps, size)
    assert out.shape == (2, 1) + size
    assert out.min() >= maps.min() - 1e-6 and out.max() <= maps.max() + 1e-6


@SETTINGS
@given(values=st.lists(st.floats(-10, 10), min_size=1, max_size=20), data=st.data())
def test_rectifier_rules_elementwise(values, data):
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    p = torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=len(values),
                                        max_size=len(values))), dtype=torch.float64)
    with GuidedBackpropContext():
        y = torch.relu(x)
    (g,) = torch.autograd.grad(y, x, p)
    expected = [pi if (xi > 0 and pi > 0) else 0.0 for xi, pi in zip(values, p.tolist())]
    assert g.tolist() == expected
    assert torch.equal(y, x.detach().clamp(min=0))
    with DeConvNetContext():
        y = torch.relu(x)
    (g,) = torch.autograd.grad(y, x, p)
    assert g.tolist() == [max(pi, 0.0) for pi in p.tolist()]
