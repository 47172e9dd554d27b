"""Extremal perturbation (Fong, Patrick, Vedaldi, ICCV 2019): its machinery, part by part —
the smooth masks (against the paper's formula, by brute force), the perturbation pyramid
(against SciPy), the rewards, ``MaskGenerator``, the area constraint and the optimiser's parts,
by hand.  The method itself: test_extremal_perturbation.py."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator

from torchray_like.attribution.common import smooth_saliency
from torchray_like.attribution.extremal_perturbation import (
    FADE_PERTURBATION,
    MaskGenerator,
    Perturbation,
    contrastive_reward,
    ranking_area_loss,
    simple_reward,
)
from torchray_like.attribution.mask_optimizer import (
    MaskOptimizer,
    RewardScale,
    area_ones,
    ranking_loss_and_gradient,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


# ---------------------------------------------------------------------------------------------
# Smooth masks
# ---------------------------------------------------------------------------------------------


def grid_positions(gen, axis):
    a = gen.axes[axis]
    return gen.grid_origin[axis] + a.step * np.arange(a.count)


def brute_force_max(params, positions, sigma, points):
    """The paper's mask with the hard max, by brute force: at each point ``u``,
    ``max_w g_σ(u − w) m̄(w)`` over the grid points ``w`` within 3σ along every axis."""
    grids = np.meshgrid(*positions, indexing="ij")
    w = np.stack([g.ravel() for g in grids], 1)                       # (P, d)
    vals = params.reshape(params.shape[0], -1)                        # (B, P)
    out = np.zeros((params.shape[0], len(points)))
    for i, u in enumerate(points):
        diff = u[None, :] - w
        g = np.exp(-0.5 * (diff ** 2 / np.asarray(sigma) ** 2).sum(1))
        g[(np.abs(diff) > 3 * np.asarray(sigma)).any(1)] = 0
        out[:, i] = (vals * g).max(1)
    return out


@pytest.mark.parametrize("shape,step,sigma,jitter,sub", [
    ((13, 17), (3, 2), (5.0, 4.0), (1, 0), None),
    ((13, 17), (3, 2), (5.0, 4.0), (1, 0), (1, 2)),
    ((5, 9, 7), (1, 2, 3), (1.5, 3.0, 4.0), (0, 1, 1), (1, 1, 2)),
])
def test_hard_max_mask_is_the_papers_formula_at_the_lattice_then_linear(shape, step, sigma,
                                                                        jitter, sub):
    gen = MaskGenerator(shape, step, sigma, pooling_method="max", jitter=jitter,
                        dtype=torch.float64, subdivision=sub)
    d = len(shape)
    g = torch.Generator().manual_seed(0)
    params = torch.rand((2, 1) + gen.param_shape, generator=g, dtype=torch.float64)
    pos = [grid_positions(gen, a) for a in range(d)]
    for a in range(d):          # the grid covers the canvas (image ± jitter)
        assert pos[a][0] <= -jitter[a] and pos[a][-1] >= shape[a] - 1 + jitter[a]
        assert pos[a][1] - pos[a][0] == step[a]
    lattice = [gen.points(a).numpy() for a in range(d)]
    if sub is not None:
        for a in range(d):       # the lattice subdivides the grid `sub` times
            np.testing.assert_allclose(lattice[a][::sub[a]], pos[a])
            assert len(lattice[a]) == sub[a] * (len(pos[a]) - 1) + 1
    pts = np.stack([m.ravel() for m in np.meshgrid(*lattice, indexing="ij")], 1)
    expected = brute_force_max(params[:, 0].numpy(), pos, sigma, pts)
    ones = brute_force_max(np.ones((1,) + gen.param_shape), pos, sigma, pts)
    values = gen.grid(params)
    assert values.shape == (2, 1) + tuple(len(p) for p in lattice)
    assert values.dtype == torch.float64
    np.testing.assert_allclose(values.flatten(1).numpy(), np.minimum(expected / ones, 1),
                               atol=1e-12)
    # Between lattice points: multilinear interpolation, on a canvas `jitter` pixels wider.
    canvas = gen.canvas(params)
    assert canvas.shape == (2, 1) + tuple(s + 2 * j for s, j in zip(shape, jitter))
    pixels = [np.arange(-j, s + j) for s, j in zip(shape, jitter)]
    pix = np.stack([m.ravel() for m in np.meshgrid(*pixels, indexing="ij")], 1)
    for b in range(2):
        interp = RegularGridInterpolator(lattice, values[b, 0].numpy())
        np.testing.assert_allclose(canvas[b, 0].flatten().numpy(), interp(pix), atol=1e-12)
    # The image window of the canvas.
    mask = gen(params)
    assert mask.shape == (2, 1) + tuple(shape)
    sl = (slice(None), slice(None)) + tuple(slice(j, j + s) for s, j in zip(shape, jitter))
    assert torch.equal(mask, canvas[sl])


def test_mask_is_close_to_the_formula_at_every_pixel_with_the_papers_ratio():
    # step 7, σ 21 as in the paper, evaluated every 3.5 pixels: near the (normalised) formula
    # evaluated at every pixel, and equal to it with one evaluation point per pixel.
    gen = MaskGenerator((40, 40), 7, 21.0, pooling_method="max", dtype=torch.float64)
    exact_gen = MaskGenerator((40, 40), 7, 21.0, pooling_method="max", dtype=torch.float64,
                              subdivision=(7, 7))
    assert gen.axes[0].sub == 2
    pos = [grid_positions(gen, a) for a in range(2)]
    pts = np.stack([m.ravel() for m in np.meshgrid(np.arange(40), np.arange(40),
                                                    indexing="ij")], 1)
    ones = brute_force_max(np.ones((1,) + gen.param_shape), pos, (21.0, 21.0), pts)
    blob = torch.zeros((1, 1) + gen.param_shape, dtype=torch.float64)
    blob[0, 0, 2:4, 3] = 1.0
    blob[0, 0, 5, 5] = 0.6
    rnd = torch.rand((1, 1) + gen.param_shape, generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64)
    for params, tol in ((blob, 0.02), (rnd, 0.045)):
        exact = np.minimum(brute_force_max(params[:, 0].numpy(), pos, (21.0, 21.0), pts) / ones,
                           1)
        err = np.abs(gen(params).flatten(1).numpy() - exact).max()
        assert err < tol, err
        np.testing.assert_allclose(exact_gen(params).flatten(1).numpy(), exact, atol=1e-12)


def test_smooth_max_mask_matches_an_independent_separable_computation():
    shape, step, sigma, temp = (11, 10), (2, 3), (3.0, 5.0), 0.1
    gen = MaskGenerator(shape, step, sigma, temperature=temp, dtype=torch.float64,
                        subdivision=(1, 1))
    params = torch.rand((1, 1) + gen.param_shape, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)

    def smax_axis(values, s, sg):            # values (..., Q) along the last axis
        q = values.shape[-1]
        out = np.zeros_like(values)
        for i in range(q):
            # Candidates: the grid points within 3σ.
            near = [j for j in range(q) if abs(s * (i - j)) <= 3 * sg]
            g = np.asarray([np.exp(-0.5 * (s * (i - j) / sg) ** 2) for j in near])
            z = g * values[..., near]
            w = np.exp(z / temp)
            out[..., i] = (z * w).sum(-1) / w.sum(-1)
        return out

    m = params[0, 0].numpy()
    for axis in range(2):
        moved = np.moveaxis(m, axis, -1)
        ones = np.ones(moved.shape[-1])
        moved = smax_axis(moved, step[axis], sigma[axis]) / smax_axis(ones, step[axis],
                                                                       sigma[axis])
        m = np.moveaxis(moved, -1, axis)
    np.testing.assert_allclose(gen.grid(params)[0, 0].numpy(), np.minimum(m, 1), atol=1e-12)
    assert gen.axes[0].sub == 1 and gen.axes[1].sub == 1


@pytest.mark.parametrize("pooling", ["max", "softmax", "sum"])
def test_mask_limits_ones_zeros_and_range(pooling):
    gen = MaskGenerator((20, 24), (3, 4), (6.0, 8.0), pooling_method=pooling, jitter=(1, 2))
    ones = torch.ones((1, 1) + gen.param_shape)
    assert torch.allclose(gen(ones), torch.ones(1, 1, 20, 24), atol=1e-6)
    assert torch.equal(gen(torch.zeros_like(ones)), torch.zeros(1, 1, 20, 24))
    rnd = torch.rand((3, 1) + gen.param_shape, generator=torch.Generator().manual_seed(2))
    m = gen(rnd)
    assert m.min() >= 0 and m.max() <= 1
    # Differentiable with respect to the parameters ...
    rnd.requires_grad_(True)
    (g,) = torch.autograd.grad(gen(rnd).sum(), rnd)
    assert g.shape == rnd.shape and g.abs().sum() > 0
    # ... also at the paper's start, a grid of ones, where the mask is exactly 1: the clamp to
    # [0, 1] limits the value only (torch.clamp would give a zero gradient and a stuck mask).
    ones.requires_grad_(True)
    (g1,) = torch.autograd.grad(gen(ones).sum(), ones)
    assert (g1 > 0).sum() >= 0.5 * g1.numel() and torch.isfinite(g1).all()
    pert = Perturbation(torch.rand(1, 3, 20, 24), num_levels=4, max_blur=2.0)
    m1 = torch.ones(1, 1, 20, 24, requires_grad=True)
    (gp,) = torch.autograd.grad(pert.apply(m1).sum(), m1)
    assert gp.abs().sum() > 0


def test_crop_shifts_the_mask():
    gen = MaskGenerator((10, 12), 2, 3.0, pooling_method="max", jitter=2)
    params = torch.rand((2, 1) + gen.param_shape, generator=torch.Generator().manual_seed(3))
    canvas = gen.canvas(params)
    plain = gen.crop(canvas)
    shift = torch.tensor([[1, -2], [0, 2]])
    moved = gen.crop(canvas, shift)
    # A mask shifted by +s shows at pixel u the value at u − s.
    assert torch.equal(moved[0, 0, 1:, :], canvas[0, 0, 2:11, 4:16])
    assert torch.equal(moved[0, 0, :, :], canvas[0, 0, 1:11, 4:16])
    assert torch.equal(moved[1, 0], canvas[1, 0, 2:12, 0:12])
    assert torch.equal(plain, canvas[:, :, 2:12, 2:14])


# ---------------------------------------------------------------------------------------------
# Perturbation pyramid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,max_blur", [((2, 3, 19, 23), 5.0),
                                            ((1, 2, 6, 12, 10), (1.0, 3.0, 2.5)),
                                            ((2, 1, 30), 4.0)])
def test_blur_pyramid_matches_scipy(shape, max_blur):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    levels = 5
    pert = Perturbation(x, num_levels=levels, max_blur=max_blur)
    assert pert.pyramid.shape == (shape[0], levels) + shape[1:]
    assert pert.pyramid.dtype == torch.float64
    d = len(shape) - 2
    blur = (max_blur,) * d if isinstance(max_blur, float) else max_blur
    for l in range(levels):
        sig = [b * (1 - l / (levels - 1)) for b in blur]
        for n in range(shape[0]):
            for c in range(shape[1]):
                ref = ndimage.gaussian_filter(x[n, c].numpy(), sig, mode="nearest",
                                              truncate=4.0)
                np.testing.assert_allclose(pert.pyramid[n, l, c].numpy(), ref, atol=1e-12)
    # The top level is the image itself; the same operator as common.smooth_saliency.
    assert torch.equal(pert.pyramid[:, -1], x)
    np.testing.assert_allclose(pert.pyramid[:, 0].numpy(), smooth_saliency(x, blur).numpy(),
                               atol=1e-12)


def test_perturbation_apply_selects_and_interpolates_levels():
    x = torch.randn(2, 3, 8, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pert = Perturbation(x, num_levels=5, max_blur=4.0)
    pyr = pert.pyramid
    # K = 3 masks per image, sample-major: mask b perturbs image b // 3.
    values = torch.tensor([0.0, 0.25, 1.0, 0.6, 0.9, 0.5], dtype=torch.float64)
    masks = values.view(6, 1, 1, 1).expand(6, 1, 8, 9)
    out = pert.apply(masks)
    assert out.shape == (6, 3, 8, 9)
    for b, v in enumerate(values.tolist()):
        t = v * 4
        lo = min(int(math.floor(t)), 3)
        expected = pyr[b // 3, lo] + (t - lo) * (pyr[b // 3, lo + 1] - pyr[b // 3, lo])
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-12)
    # A spatially varying mask picks per pixel; the gradient is the level difference.
    m = torch.rand(2, 1, 8, 9, generator=torch.Generator().manual_seed(6),
                   dtype=torch.float64) * 0.9 + 0.05
    m.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda mm: pert.apply(mm), (m,))


def test_fade_perturbation_is_the_convex_combination():
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    m = torch.rand(2, 1, 7, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    zero = Perturbation(x, num_levels=4, type=FADE_PERTURBATION)
    torch.testing.assert_close(zero.apply(m), m * x, rtol=0, atol=1e-12)
    mean = Perturbation(x, num_levels=3, type="fade", fade_to="mean")
    base = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(mean.apply(m), m * x + (1 - m) * base, rtol=0, atol=1e-12)
    assert zero.to("cpu") is zero and zero.pyramid.device.type == "cpu"


def test_perturbation_errors():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="num_levels must be an integer ≥ 2"):
        Perturbation(x, num_levels=1)
    with pytest.raises(ValueError, match=r"perturbation type must be one of \('blur', 'fade'\)"):
        Perturbation(x, type="noise")
    with pytest.raises(ValueError, match="fade_to must be 'zero' or 'mean'"):
        Perturbation(x, type="fade", fade_to="one")
    with pytest.raises(ValueError, match="max_blur must be a finite number ≥ 0"):
        Perturbation(x, max_blur=-1)
    with pytest.raises(ValueError, match="max_blur must be one number ≥ 0 or 2 of them"):
        Perturbation(x, max_blur=(1.0, 2.0, 3.0))
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        Perturbation(x.to(torch.uint8))
    with pytest.raises(ValueError, match="1 to 3 spatial dimensions"):
        Perturbation(torch.randn(1, 1, 2, 2, 2, 2))
    pert = Perturbation(x)
    with pytest.raises(ValueError, match=r"mask must have shape \(N·K, 1, 8, 8\)"):
        pert.apply(torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"mask must have shape"):
        pert.apply(torch.rand(2, 1, 8, 7))


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


def test_simple_and_contrastive_rewards():
    act = torch.tensor([[1.0, 5.0, 2.0], [4.0, -1.0, 3.0]])
    tgt = torch.tensor([1, 2])
    assert torch.equal(simple_reward(act, tgt, "preserve"), torch.tensor([5.0, 3.0]))
    assert torch.equal(simple_reward(act, tgt, "delete"), torch.tensor([-5.0, -3.0]))
    dual = torch.cat([act, act - 1])
    assert torch.equal(simple_reward(dual, tgt, "dual"), torch.tensor([1.0, 1.0]))
    assert torch.equal(contrastive_reward(act, tgt, "preserve"), torch.tensor([3.0, -1.0]))
    assert torch.equal(contrastive_reward(act, tgt, "delete"), torch.tensor([-3.0, 1.0]))
    dual2 = torch.cat([act, torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])])
    assert torch.equal(contrastive_reward(dual2, tgt, "dual"), torch.tensor([5.0, -1.0]))
    # Single-logit heads: target 1 explains +z, target 0 explains −z.
    z = torch.tensor([2.0, -3.0])
    assert torch.equal(simple_reward(z, torch.tensor([1, 0]), "preserve"),
                       torch.tensor([2.0, 3.0]))
    assert torch.equal(simple_reward(z.view(2, 1), torch.tensor([1, 1]), "preserve"), z)
    with pytest.raises(ValueError, match="variant must be one of"):
        simple_reward(act, tgt, "both")
    with pytest.raises(ValueError, match=r"dual variant expects .* \(4 rows\)"):
        simple_reward(act, tgt, "dual")
    with pytest.raises(TypeError, match="simple_reward: the model returned a dict, not a tensor"):
        simple_reward({"logits": act}, tgt, "preserve")
    with pytest.raises(ValueError, match="at least two classes"):
        contrastive_reward(z, tgt, "preserve")
    with pytest.raises(ValueError, match=r"target has 2 class indices but the batch has 3 "
                                         r"samples.*output has shape \(3, 3\)"):
        simple_reward(torch.zeros(3, 3), tgt, "preserve")
    # An int target (TorchRay passes the target as given) applies to every row.
    assert torch.equal(simple_reward(act, 2, "preserve"), torch.tensor([2.0, 3.0]))
    assert torch.equal(simple_reward(dual, 1, "dual"), torch.tensor([1.0, 1.0]))
    assert torch.equal(contrastive_reward(act, 0, "preserve"), torch.tensor([-4.0, 1.0]))
    assert torch.equal(contrastive_reward(act, torch.tensor(0), "delete"),
                       torch.tensor([4.0, -1.0]))
    with pytest.raises(ValueError, match="dual variant expects"):
        simple_reward(torch.zeros(3, 3), 1, "dual")


def test_contrastive_reward_contrasts_each_row_with_its_own_rival():
    # Several masks (areas) in one batch: row b's reward is its target score minus the best
    # other score *of row b* (TorchRay's version mixes the rows' maxima when there are several).
    act = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 1.0, 4.0]])
    reward = contrastive_reward(act, 0, "preserve")
    hand = torch.tensor([3.0 - 1.0, 0.0 - 5.0, 1.0 - 4.0])
    assert torch.equal(reward, hand)
    broadcast = act[:, 0].view(-1, 1) - act[:, 1:].amax(1).view(1, -1)   # the mixing slip
    assert not torch.equal(broadcast.diagonal(), broadcast[0])


def test_mask_generator_errors():
    with pytest.raises(ValueError, match="subdivision must be between 1 and step=3, got 4"):
        MaskGenerator((8, 8), 3, 3.0, subdivision=(4, 1))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0 for the "
                                         "'softmax' pooling"):
        MaskGenerator((8, 8), 3, 3.0, temperature=float("inf"))
    with pytest.raises(ValueError, match=r"pooling_method must be one of \('softmax', 'max', "
                                         r"'sum'\), got 'sigmoid'"):
        MaskGenerator((8, 8), 3, 3.0, True, "sigmoid")
    with pytest.raises(ValueError, match=r"step 16 is too large for sigma 2: .* use step ≤ 12 "
                                         r"or sigma ≥ 2.66667"):
        MaskGenerator((64, 64), 16, 2.0)
    with pytest.raises(ValueError, match=r"mask parameters must have shape \(K, 1, 5, 5\)"):
        MaskGenerator((8, 8), 2, 3.0).generate(torch.ones(1, 1, 4, 4))


def test_mask_generator_has_torchrays_interface():
    # MaskGenerator(shape, step, sigma, clamp=True, pooling_method='softmax'), positionally.
    names = list(inspect.signature(MaskGenerator).parameters)[:5]
    assert names == ["shape", "step", "sigma", "clamp", "pooling_method"]
    gen = MaskGenerator((20, 24), 3, 6.0, True, "softmax", jitter=2)
    assert gen.shape == (20, 24) and gen.shape_in == gen.param_shape
    assert gen.shape_out == (24, 28)
    params = torch.rand((2, 1) + gen.shape_in, generator=torch.Generator().manual_seed(0))
    mask, full = gen.generate(params)
    assert mask.shape == (2, 1, 20, 24) and full.shape == (2, 1, 24, 28)
    assert torch.equal(mask, full[:, :, 2:22, 2:26])        # the window is the centre
    assert torch.equal(mask, gen(params))
    assert gen.to("cpu") is gen and torch.equal(gen.generate(params)[0], mask)
    # The pooling methods, on one blob: max ≤ smooth max ≤ ... and "sum" is a blur (lower peak).
    peak = {}
    for m in ("max", "softmax", "sum"):
        g = MaskGenerator((20, 24), 3, 6.0, pooling_method=m)
        blob = torch.zeros((1, 1) + g.shape_in)
        blob[0, 0, 3, 4] = 1.0
        peak[m] = float(g.generate(blob)[0].max())
    assert peak["max"] == pytest.approx(1.0) and peak["sum"] < 0.5 < peak["softmax"] <= 1.0
    # clamp: the mask is limited to [0, 1] (parameters above 1 give 1), or not.
    twos = torch.full((1, 1) + gen.shape_in, 2.0)
    torch.testing.assert_close(gen(twos), torch.ones(1, 1, 20, 24))
    torch.testing.assert_close(MaskGenerator((20, 24), 3, 6.0, False, "max", jitter=2)(twos),
                               torch.full((1, 1, 20, 24), 2.0))


# ---------------------------------------------------------------------------------------------
# The area constraint


def test_ranking_loss_equals_the_sorted_formula_and_its_gradient():
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(4, 1, 7, 9, generator=g, dtype=torch.float64)
    areas = [0.1, 0.5, 0.02, 0.9]
    m = mask.clone().requires_grad_(True)
    loss = ranking_area_loss(m, areas)
    (grad,) = torch.autograd.grad(loss.sum(), m)
    # The paper's formula: sort, compare with (1 − a)|Ω| zeros then a|Ω| ones.
    ref_m = mask.clone().requires_grad_(True)
    flat = ref_m.flatten(1)
    ones = torch.tensor([round(a * 63) for a in areas])
    reference = (torch.arange(63).view(1, -1) >= (63 - ones).view(-1, 1)).double()
    expected = (flat.sort(dim=1).values - reference).pow(2).mean(1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), ref_m)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    # Ties (saturated masks): the value is exact, the tied values share the gradient equally.
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.2]], dtype=torch.float64,
                        requires_grad=True)
    value = ranking_area_loss(tied, 2 / 6)
    torch.testing.assert_close(value, torch.tensor([(1 + 0.04) / 6], dtype=torch.float64))
    (g_tied,) = torch.autograd.grad(value.sum(), tied)
    torch.testing.assert_close(g_tied, 2 * (tied.detach() - torch.tensor(
        [[2 / 3, 2 / 3, 2 / 3, 0, 0, 0]], dtype=torch.float64)) / 6)
    # No ones, all ones.
    torch.testing.assert_close(ranking_area_loss(mask, 0.0), mask.flatten(1).pow(2).mean(1))
    torch.testing.assert_close(ranking_area_loss(mask, 1.0),
                               (mask.flatten(1) - 1).pow(2).mean(1))
    with pytest.raises(ValueError, match="area must be one fraction or 4 \\(one per mask\\)"):
        ranking_area_loss(mask, [0.1, 0.2])


# ---------------------------------------------------------------------------------------------
# The optimiser's parts, by hand
# ---------------------------------------------------------------------------------------------


def test_ranking_loss_and_gradient_without_autograd_equal_the_autograd_ones():
    mask = torch.rand(3, 1, 6, 7, generator=torch.Generator().manual_seed(12),
                      dtype=torch.float64)
    areas = [0.1, 0.3, 0.1]
    ones = area_ones(areas, 3, 42)
    assert ones == (4, 13, 4)
    m = mask.clone().requires_grad_(True)
    loss = ranking_area_loss(m, areas)
    (grad,) = torch.autograd.grad(loss.sum(), m)
    loss2, grad2 = ranking_loss_and_gradient(mask, ones)
    torch.testing.assert_close(loss2, loss.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(grad2, grad, rtol=0, atol=1e-14)


def test_footprint_preconditioner_by_hand():
    # 10 pixels, step 4, no jitter: grid points at 0, 4, 8, 12 (the last past the image).  The
    # cell [v - 2, v + 2) of each point, inside [-0.5, 9.5): lengths 2.5, 4, 3.5, 0 → shares
    # 0.625, 1, 0.875 and 0, floored at 1/4.
    gen = MaskGenerator((10,), 4, 3.0)
    assert gen.grid_origin == (0,) and gen.param_shape == (4,)
    torch.testing.assert_close(gen.footprint(), torch.tensor([0.625, 1, 0.875, 0.25]))
    # With jitter 2 the grid starts at -4: a cell fully outside gets the floor.
    torch.testing.assert_close(MaskGenerator((10,), 4, 3.0, jitter=2).footprint(),
                               torch.tensor([0.25, 0.625, 1, 0.875, 0.25]))
    gen2 = MaskGenerator((10, 6), (4, 3), (3.0, 3.0))
    torch.testing.assert_close(gen2.footprint(),
                               gen.footprint()[:, None] * MaskGenerator((6,), 3, 3.0).footprint())


def test_mask_optimizer_is_torchs_sgd_on_the_preconditioned_gradient():
    gen = MaskGenerator((10,), 4, 3.0, dtype=torch.float64)
    opt = MaskOptimizer(gen, 2, 1.0, learning_rate=0.1, momentum=0.9, dampening=0.5)
    ref = torch.full((2, 1, 4), 1.0, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([ref], lr=0.1, momentum=0.9, dampening=0.5)
    g = torch.Generator().manual_seed(13)
    for _ in range(4):
        grads = torch.randn(2, 1, 10, generator=g, dtype=torch.float64)
        mask, moved = opt.masks()
        assert moved is mask
        opt.step([mask], [grads])
        (gr,) = torch.autograd.grad(gen(ref), ref, grads)
        ref.grad = gr / gen.footprint()
        sgd.step()
        with torch.no_grad():
            ref.clamp_(0, 1)
        torch.testing.assert_close(opt.params, ref.detach(), rtol=0, atol=1e-14)
    assert opt.params.min() >= 0 and opt.params.max() <= 1


def test_reward_scale_by_hand():
    grad = torch.zeros(2, 1, 10)
    grad[0, 0] = torch.tensor([5.0, -4, 3, 0, 0, 0, 0, 0, 0, 1])
    grad[1, 0, 2] = 2.0
    # Areas 0.2 and 0.1 of 10 pixels: the mean of the 2 (1) largest |g|.  Unit: 10·ḡ /
    # (2 · ratio · λ0) with λ0 = 300, ratio 0.25.
    scale = RewardScale("auto", [0.2, 0.1], 10, 300.0, 0.25, "cpu", torch.float32)
    torch.testing.assert_close(scale.update(grad), torch.tensor([4.5, 2.0]) * 10 / 150)
    # A running maximum: a weaker gradient keeps the unit, a stronger one raises it.
    torch.testing.assert_close(scale.update(grad / 2), torch.tensor([4.5, 2.0]) * 10 / 150)
    torch.testing.assert_close(scale.update(grad * 3), torch.tensor([13.5, 6.0]) * 10 / 150)
    # No gradient yet: a finite unit (the reward has no pull anyway).
    zero = RewardScale("auto", [0.2], 10, 300.0, 0.25, "cpu", torch.float32)
    assert float(zero.update(torch.zeros(1, 1, 10))) > 0
    fixed = RewardScale(2.5, [0.2, 0.1], 10, 300.0, 0.25, "cpu", torch.float32)
    torch.testing.assert_close(fixed.update(grad), torch.tensor([2.5, 2.5]))


# ---------------------------------------------------------------------------------------------
# The optimiser's fused mask pair and ranking of several areas (issue 22)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,step,sigma,jitter", [((64, 64), 4, 8.0, 2), ((30, 41), 7, 21.0, 3),
                                                     ((20, 24), 2, 3.0, 1), ((17, 17), 3, 9.0, 0),
                                                     ((40,), 4, 8.0, 2)])
def test_mask_pair_is_canvas_then_crop(shape, step, sigma, jitter):
    """The optimiser's fused interpolation-and-crop (issue 22) gives the masks of canvas()
    and crop(), values and gradients, up to float64 rounding."""
    gen = MaskGenerator(shape, step, sigma, jitter=jitter, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    params = torch.rand((3, 1) + gen.param_shape, dtype=torch.float64, generator=g)
    shift = torch.randint(-jitter, jitter + 1, (3, len(shape)), generator=g)
    p1 = params.clone().requires_grad_(True)
    canvas = gen.canvas(p1)
    ref = (gen.crop(canvas), gen.crop(canvas, shift))
    p2 = params.clone().requires_grad_(True)
    got = gen.pair(p2, shift)
    w = [torch.rand(r.shape, dtype=torch.float64, generator=g) for r in ref]
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (3, 1) + tuple(shape)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    (g1,) = torch.autograd.grad(ref, p1, w)
    (g2,) = torch.autograd.grad(got, p2, w)
    torch.testing.assert_close(g2, g1, rtol=0, atol=1e-12)
    # No shift: one mask, returned twice.
    a, b = gen.pair(params)
    assert a is b
    torch.testing.assert_close(a, gen(params), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ones", [(3, 7, 3, 7), (0, 5, 0, 5), (16, 2, 16, 2), (1, 2, 3),
                                  (4, 4, 9, 4, 4, 9), (0, 16), (5, 5)])
def test_ranking_reference_of_several_areas_is_the_per_row_one(ones):
    """Several areas in one batch (one selection per area on a strided view, issue 22) give
    exactly the loss and gradient of each row on its own, ties and empty/full rows included."""
    g = torch.Generator().manual_seed(len(ones))
    mask = torch.rand(len(ones), 1, 4, 4, generator=g)
    mask[:, 0, 0] = 0.5                       # ties at the threshold
    loss, grad = ranking_loss_and_gradient(mask, ones)
    for r, n1 in enumerate(ones):
        l1, g1 = ranking_loss_and_gradient(mask[r:r + 1], (n1,))
        assert torch.equal(loss[r:r + 1], l1) and torch.equal(grad[r:r + 1], g1)
    assert loss.shape == (len(ones),) and grad.shape == mask.shape
