"""RISE's ``num_masks="auto"`` (``tol``): the control-variate estimate and the stopping rule.

The estimate and the rule's statistic are recomputed here from their definitions in float64
(least squares with NumPy, the cells' covariance with the masks enumerated over every mask
configuration), and the estimator is checked to be unbiased and to have a lower variance than
the plain map.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from torchray_like.attribution.rise import DEFAULT_TOL, generate_masks, rise
from torchray_like.attribution.rise_masks import MaskSampler
from torchray_like.attribution.seeding import make_generator

from .rise_helpers import BoxModel, LinearModel, SmallNet, interp_matrix

# One intra-op thread for the module (conftest.one_thread): small tensors on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _box():
    return BoxModel([(slice(0, 2), slice(0, 2)), (slice(2, 4), slice(2, 4))])


def exact_cell_covariance(size, cells, p):
    """``E[(z_k - p) M]`` by enumerating every grid and shift (NumPy, from the definition)."""
    cell_size = [-(-n // s) for n, s in zip(size, cells)]
    mats = [interp_matrix(s, (s + 1) * c) for s, c in zip(cells, cell_size)]
    k = math.prod(cells)
    out = np.zeros((k,) + tuple(size))
    for bits in itertools.product((0.0, 1.0), repeat=k):
        grid = np.array(bits).reshape(cells)
        up = grid
        for d, m in enumerate(mats):
            up = np.moveaxis(np.tensordot(m, np.moveaxis(up, d, 0), axes=(1, 0)), 0, d)
        prob = p ** sum(bits) * (1 - p) ** (k - sum(bits)) / math.prod(cell_size)
        for shift in itertools.product(*[range(c) for c in cell_size]):
            crop = up[tuple(slice(a, a + n) for a, n in zip(shift, size))]
            out += prob * (np.array(bits) - p)[:, None].reshape((k,) + (1,) * len(size)) * crop
    return out.reshape(k, -1)


def by_hand(scores, masks, cells, p, unit, cov=None):
    """The regression estimate and each map's estimated correlation with its limit, float64.

    ``scores (n, K)``, ``masks (n, P)``, ``cells (n, k)`` binary grids and ``cov`` their exact
    covariance with the masks (``None``: intercept only, the bank's mean value for E[M]);
    ``unit``: 1/p (paper) or 1 (TorchRay)."""
    n, pixels = masks.shape
    k = 0 if cells is None else cells.shape[1]
    d = 1 + k if n >= 4 * (1 + k) else 1
    x = np.ones((n, 1)) if d == 1 else np.concatenate([np.ones((n, 1)), cells - p], 1)
    b = np.linalg.lstsq(x, scores, rcond=None)[0]                      # (d, K)
    r = scores - x @ b
    w = r.T @ masks / n                                                 # (K, P)
    if d > 1:
        w = w + b[1:].T @ cov
    mean = p if cells is not None else masks.mean()
    est = unit * (b[0][:, None] * mean + w)
    u = r.T[:, :, None] * (masks - masks.mean(1, keepdims=True))[None]  # (K, n, P)
    spread = ((u - u.mean(1, keepdims=True)) ** 2).sum((1, 2))
    noise = spread / ((n - d) * n * pixels)
    total = w.var(1)
    rho = np.sqrt(np.clip(1 - noise / total, 0, 1))
    return est, rho


def _scores(model, x, masks, target=None, score="softmax"):
    with torch.no_grad():
        out = model(x * masks.float())
    out = out.softmax(1) if score == "softmax" else out
    out = out.double().numpy()
    return out if target is None else out[:, [target]]


def _draws(n, size, cells, p, seed):
    sampler = MaskSampler(n, size, cells, p, make_generator(seed))
    masks = sampler.masks(0, n, torch.device("cpu"), torch.float64)
    return masks, masks.flatten(1).numpy(), sampler.grid.double().numpy()


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,cells", [((10,), (3,)), ((5, 6), (2, 2)), ((4, 3, 5), (2, 1, 2))])
def test_cell_covariance_is_the_exact_expectation(size, cells):
    sampler = MaskSampler(1, size, cells, 0.3, make_generator(0))
    got = sampler.cell_covariance(torch.device("cpu"), torch.float64)
    assert got.shape == (math.prod(cells), math.prod(size)) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), exact_cell_covariance(size, cells, 0.3),
                               rtol=1e-12, atol=1e-14)
    # The centred cells are the grid minus p.
    cells_c = sampler.cells_centered(0, 1, torch.device("cpu"), torch.float64)
    assert torch.equal(cells_c, sampler.grid.double() - 0.3)


# ---------------------------------------------------------------------------------------------
# The estimate and the rule, recomputed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["paper", "torchray"])
def test_auto_map_and_statistic_are_the_regression_estimate_by_hand(normalize):
    model, p, tol = _box(), 0.5, 0.03
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3)) + 0.5
    cov = exact_cell_covariance((4, 4), (2, 2), p)
    score = "softmax" if normalize == "paper" else "sigmoid"
    out, info = rise(model, x, 0, num_masks="auto", tol=tol, num_cells=2, generator=5,
                     normalize=normalize, score=score, return_info=True)
    n = info.num_masks
    assert 256 <= n < 8000 and n % 64 == 0 and info.converged
    assert out.shape == (1, 1, 4, 4) and out.dtype == torch.float32
    masks, flat, grid = _draws(n, (4, 4), (2, 2), p, 5)
    with torch.no_grad():
        logits = model(x * masks.float()).double()
    f = (logits.softmax(1) if score == "softmax" else logits.sigmoid())[:, [0]].numpy()
    est, rho = by_hand(f, flat, grid, p, 1 / p if normalize == "paper" else 1.0, cov)
    np.testing.assert_allclose(out.flatten().double().numpy(), est[0], rtol=1e-4, atol=1e-6)
    assert info.correlation == pytest.approx(tuple(rho), rel=1e-4)
    assert info.rel_error == pytest.approx(1 - rho[0], rel=1e-3)
    assert info.rel_error <= tol
    # It stops at the first check that reaches 1 - tol: 64 masks earlier it had not.
    if n > 256:
        _, rho_before = by_hand(f[:n - 64], flat[:n - 64], grid[:n - 64], p, 1.0, cov)
        assert 1 - rho_before[0] > tol
    # The same masks' plain map is another estimate of the same thing, not the same numbers.
    plain = rise(model, x, 0, num_masks=n, num_cells=2, generator=5, normalize=normalize,
                 score=score)
    assert not torch.allclose(out, plain, rtol=1e-3)
    assert torch.corrcoef(torch.stack([out.flatten(), plain.flatten()]))[0, 1] > 0.9


def test_every_class_counts_the_maps_with_signal_and_reports_each():
    torch.manual_seed(0)
    model = SmallNet(classes=3).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out, info = rise(model, x, None, num_masks=320, tol=1e-9, num_cells=3, generator=2,
                     return_info=True)
    assert out.shape == (2, 3, 8, 8) and info.num_masks == 320 and not info.converged
    assert len(info.correlation) == 6
    masks, flat, grid = _draws(320, (8, 8), (3, 3), 0.5, 2)
    cov = exact_cell_covariance((8, 8), (3, 3), 0.5)
    rhos = []
    for i in range(2):
        est, rho = by_hand(_scores(model, x[i:i + 1], masks), flat, grid, 0.5, 2.0, cov)
        np.testing.assert_allclose(out[i].flatten(1).double().numpy(), est, rtol=2e-4,
                                   atol=1e-6)
        rhos += list(rho)
    assert info.correlation == pytest.approx(tuple(rhos), rel=1e-3, abs=1e-6)


def test_a_flat_map_does_not_hold_up_the_others():
    """Class 1 of the linear model is the constant 0: its map is flat (no signal, no noise),
    so with every class the rule stops where it stops for class 0 alone."""
    w = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    model = LinearModel(w)
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    kw = dict(num_masks="auto", tol=0.01, num_cells=3, generator=0, score="logit",
              return_info=True)
    both, info = rise(model, x, None, **kw)
    one, info_one = rise(model, x, 0, **kw)
    assert info.num_masks == info_one.num_masks < 8000
    assert info.correlation[1] == 1.0
    torch.testing.assert_close(both[:, :1], one, rtol=1e-5, atol=1e-6)
    assert torch.equal(both[:, 1], torch.zeros_like(both[:, 1]))


def test_the_estimate_is_unbiased_and_less_noisy_than_the_plain_map():
    """Over 40 seeds at 128 masks, against the exact expectation enumerated over every mask."""
    from .rise_helpers import all_masks
    w = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(LinearModel(w))
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(2)) + 0.5
    exact = sum(prob * float((w * x * torch.tensor(m)).sum()) * m
                for m, prob in all_masks((4, 4), (2, 2), 0.5)) / 0.5
    exact = torch.tensor(exact, dtype=torch.float64).flatten()
    kw = dict(num_masks=128, num_cells=2, score="logit", batch_size=64)
    cv = torch.stack([rise(model, x.double(), 0, tol=1e-9, generator=s, **kw).flatten()
                      for s in range(40)])
    plain = torch.stack([rise(model, x.double(), 0, generator=s, **kw).flatten()
                         for s in range(40)])
    cv_mse = (cv - exact).square().mean()
    plain_mse = (plain - exact).square().mean()
    assert cv_mse < 0.1 * plain_mse
    # Unbiased: the mean over seeds is within 4 standard errors of the exact map.
    se = cv.std(0) / math.sqrt(40)
    assert ((cv.mean(0) - exact).abs() <= 4 * se + 1e-9).all()


# ---------------------------------------------------------------------------------------------
# Banks, batch sizes, hostile cases
# ---------------------------------------------------------------------------------------------


def test_with_a_bank_the_intercept_only_estimate_and_the_bank_cap():
    model = _box()
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(6)) + 0.5
    bank = generate_masks(320, (4, 4), 2, generator=2)
    out, info = rise(model, x, 1, filter_masks=bank, num_masks="auto", tol=1e-6,
                     score="softmax", return_info=True)
    assert info.num_masks == 320 and not info.converged
    flat = bank.flatten(1).double().numpy()
    est, rho = by_hand(_scores(model, x, bank, 1), flat, None, 0.5, 2.0)
    np.testing.assert_allclose(out.flatten().double().numpy(), est[0], rtol=1e-4, atol=1e-6)
    assert info.correlation == pytest.approx(tuple(rho), rel=1e-3)
    tr = rise(model, x, 1, filter_masks=bank, num_masks="auto", tol=1e-6, normalize="torchray")
    f = torch.sigmoid(model(x * bank)).double().numpy()[:, [1]]
    np.testing.assert_allclose(tr.flatten().double().numpy(),
                               by_hand(f, flat, None, 0.5, 1.0)[0][0], rtol=1e-4, atol=1e-6)


def test_the_rule_stops_at_the_same_count_whatever_batch_size():
    model = _box()
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3)) + 0.5
    kw = dict(num_masks="auto", tol=0.03, num_cells=2, generator=5, return_info=True)
    ref, info = rise(model, x, 0, **kw)
    for batch_size in (1, 3, 100):
        got, got_info = rise(model, x, 0, batch_size=batch_size, **kw)
        assert got_info.num_masks == info.num_masks
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # Forward batches never exceed batch_size, also when folds are cut at the checks.
    model.calls.clear()
    rise(model, x, 0, batch_size=3, **kw)
    assert max(model.calls) <= 3


def test_tiny_counts_keep_masks_and_cells_and_stay_finite():
    model = _box()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4)) + 0.5
    for n in (1, 2, 5, 40):
        out, info = rise(model, x, None, num_masks=n, tol=0.5, num_cells=2, generator=1,
                         return_info=True)
        assert out.shape == (2, 2, 4, 4) and torch.isfinite(out).all()
        assert info.num_masks == n and len(info.correlation) == 4
        assert all(0.0 <= c <= 1.0 for c in info.correlation)
    # One mask: the intercept is its score, nothing is left to the residuals: a flat map at
    # the score (the paper's unit times E[M] = p).
    one = rise(model, x, 0, num_masks=1, tol=0.5, num_cells=2, generator=1)
    masks = generate_masks(1, (4, 4), 2, generator=1)
    f = torch.softmax(model(x * masks), 1)[:, 0]
    torch.testing.assert_close(one, f.view(2, 1, 1, 1).expand(2, 1, 4, 4), rtol=1e-5,
                               atol=1e-6)
    # With a one-mask bank E[M] is the bank's mean value.
    bank_one = rise(model, x, 0, filter_masks=masks, num_masks="auto", score="softmax")
    torch.testing.assert_close(bank_one, (f * masks.mean() / 0.5).view(2, 1, 1, 1).expand(
        2, 1, 4, 4), rtol=1e-5, atol=1e-6)


def test_p_one_gives_the_plain_constant_map_and_converges():
    model = _box()
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(4)) + 0.5
    out, info = rise(model, x, 0, num_masks="auto", p=1.0, num_cells=2, return_info=True)
    assert info.num_masks == 256 and info.converged and info.correlation == (1.0,)
    torch.testing.assert_close(out, rise(model, x, 0, num_masks=256, p=1.0, num_cells=2),
                               rtol=1e-5, atol=1e-6)


def test_default_tolerance_and_non_finite_scores():
    assert DEFAULT_TOL == 0.015

    class NaNModel(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"the model's scores are not finite \(NaN or inf\)"):
        rise(NaNModel(), x, 0, num_masks="auto", num_cells=2)


@pytest.mark.parametrize("tol", [float("nan"), float("inf"), -0.1, 0.0, 1.01, "0.1", True])
def test_bad_tolerances_name_tol(tol):
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"tol must be a finite number in \(0, 1\]"):
        rise(_box(), x, 0, num_masks="auto", tol=tol)
