"""Extremal perturbation's per-iteration work outside the pooling, made cheaper without
changing one bit (issue 22, docs/speed_perturbation.rst round 6): the pyramid blend by flat
``index_select`` and without an autograd node (:meth:`Perturbation.apply_with_backward`), and
the ranking constraint's elementwise work in NumPy with one partition for every area.  The
optimisation is chaotic (a rounding difference moves the masks), so each piece is compared
with ``torch.equal`` against the code it replaced, kept here as the reference, and whole runs
with the reference pieces swapped in must give the same masks and history."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import pytest
import torch
import torch.nn as nn

import torchray_like.attribution.extremal_optimisation as optimisation_module
from torchray_like.attribution.extremal_perturbation import extremal_perturbation
from torchray_like.attribution.mask_optimizer import ranking_area_loss, ranking_loss_and_gradient
from torchray_like.attribution.perturbation_pyramid import Perturbation

# ---------------------------------------------------------------------------------------------
# The references: the code before round 6
# ---------------------------------------------------------------------------------------------


class _OldBlend(torch.autograd.Function):
    """The blend before round 6: two gathers from an expanded view of the pyramid."""

    @staticmethod
    def forward(ctx, m, pyr, k):
        n, levels, c = pyr.shape[:3]
        spatial = tuple(pyr.shape[3:])
        t = m.clamp(0, 1) * (levels - 1)
        lower = torch.nan_to_num(t, nan=0.0).floor_().clamp_(0, levels - 2)
        frac = (t - lower).view((n, k, 1, 1) + spatial)
        level = lower.long().view((n, k, 1, 1) + spatial)
        view = pyr.unsqueeze(1).expand((n, k) + tuple(pyr.shape[1:]))
        low = view.gather(2, level.expand((n, k, 1, c) + spatial))
        high = view.gather(2, (level + 1).expand((n, k, 1, c) + spatial))
        out = torch.lerp(low, high, frac)
        ctx.save_for_backward(low, high)
        ctx.levels = levels
        return out.reshape((n * k, c) + spatial)

    @staticmethod
    def backward(ctx, grad):
        low, high = ctx.saved_tensors
        g = (grad.view(low.shape) * (high - low)).sum(3, keepdim=True)
        return (g.view((-1, 1) + tuple(low.shape[4:])) * (ctx.levels - 1)), None, None


def _old_apply(self: Perturbation, mask: torch.Tensor) -> torch.Tensor:
    """:meth:`Perturbation.apply` before round 6 (the fade pyramid is unchanged)."""
    pyr = self.pyramid
    if pyr.shape[0] and mask.shape[0] % pyr.shape[0] == 0 and self.type == "blur":
        return _OldBlend.apply(mask.to(pyr.dtype), pyr, mask.shape[0] // pyr.shape[0])
    return _NEW_APPLY(self, mask)


_NEW_APPLY = Perturbation.apply


def _old_reference(flat: torch.Tensor, ones: Sequence[int]) -> torch.Tensor:
    """The ranking reference before round 6: one ``kthvalue`` per area, torch operations."""
    ones = tuple(int(n) for n in ones)
    b, p = flat.shape
    if len(set(ones)) == 1:
        n1 = ones[0]
        if n1 <= 0 or n1 >= p:
            return torch.full((b, p), 0.0 if n1 <= 0 else 1.0, dtype=flat.dtype)
        tau = flat.kthvalue(p - n1 + 1, dim=1, keepdim=True).values
        above = torch.gt(flat, tau, out=torch.empty_like(flat))
        tied = torch.eq(flat, tau, out=torch.empty_like(flat))
        share = (n1 - above.sum(1, keepdim=True)) / tied.sum(1, keepdim=True)
        return torch.addcmul(above, tied, share)
    k = next(k for k in range(1, b + 1) if b % k == 0 and ones == ones[:k] * (b // k))
    rows = flat.view(b // k, k, p)
    taus = [rows[:, j].kthvalue(p - min(max(ones[j], 1), p) + 1, dim=1).values
            for j in range(k)]
    tau = torch.stack(taus, dim=1).view(b, 1)
    above = torch.gt(flat, tau, out=torch.empty_like(flat))
    tied = torch.eq(flat, tau, out=torch.empty_like(flat))
    count = torch.tensor(ones, dtype=flat.dtype).view(-1, 1)
    ref = torch.addcmul(above, tied, (count - above.sum(1, keepdim=True))
                        / tied.sum(1, keepdim=True))
    if min(ones) <= 0 or max(ones) >= p:
        ref = torch.where(count <= 0, 0.0, torch.where(count >= p, 1.0, ref))
    return ref


def _old_ranking(mask: torch.Tensor, ones: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`ranking_loss_and_gradient` before round 6."""
    flat = mask.detach().flatten(1)
    ref = _old_reference(flat, ones)
    count = torch.tensor([int(n) for n in ones], dtype=flat.dtype)
    loss = (torch.sub(flat.pow(2).sum(1), (flat * ref).sum(1), alpha=2) + count) / flat.shape[1]
    return loss, ((flat - ref) * (2 / flat.shape[1])).view_as(mask)


def _hard_masks(b: int, spatial: Tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Masks like the optimisation's: many values saturated at 0 and 1 (ties), a few
    outside [0, 1], the rest spread."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand((b, 1) + spatial, generator=g, dtype=dtype) * 1.4 - 0.2
    m[m < 0.15] = 0.0
    m[m > 0.85] = 1.0
    return m


def _equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` where NaN equals NaN (and the NaNs sit at the same places)."""
    same_nan = torch.equal(torch.isnan(a), torch.isnan(b))
    return same_nan and torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


SHAPES = [(97,), (16, 16), (13, 21), (3, 7, 9)]


# ---------------------------------------------------------------------------------------------
# The blend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k", [(1, 1), (1, 3), (2, 2)])
def test_blend_and_its_gradient_equal_the_gathers(spatial, dtype, n, k):
    g = torch.Generator().manual_seed(7)
    x = torch.randn((n, 3) + spatial, generator=g, dtype=dtype)
    pert = Perturbation(x, num_levels=8, max_blur=3)
    mask = _hard_masks(n * k, spatial, dtype, seed=3)
    grad = torch.randn((n * k, 3) + spatial, generator=g, dtype=dtype)
    outs = []
    for apply in (_old_apply, Perturbation.apply):
        m = mask.clone().requires_grad_(True)
        out = apply(pert, m)
        outs.append((out.detach(), torch.autograd.grad(out, m, grad)[0]))
    made = pert.apply_with_backward(mask)
    assert made is not None
    out, backward = made
    assert not out.requires_grad and out.dtype == dtype and out.shape == (n * k, 3) + spatial
    for new in (outs[1], (out, backward(grad))):
        assert torch.equal(new[0], outs[0][0]) and torch.equal(new[1], outs[0][1])
        assert new[1].dtype == dtype and new[1].shape == mask.shape


def test_blend_of_a_nan_mask_is_nan_where_the_mask_is():
    pert = Perturbation(torch.rand(1, 3, 8, 8), num_levels=4, max_blur=2)
    mask = torch.rand(2, 1, 8, 8)
    mask[0, 0, 3, 4] = float("nan")
    old = _old_apply(pert, mask)
    made = pert.apply_with_backward(mask)
    assert made is not None
    assert _equal_nan(made[0], old) and _equal_nan(pert.apply(mask), old)
    assert torch.isnan(made[0][0, :, 3, 4]).all() and int(torch.isnan(made[0]).sum()) == 3


def test_apply_with_backward_refuses_what_apply_refuses_and_leaves_fade_to_autograd():
    pert = Perturbation(torch.rand(2, 3, 8, 8), num_levels=4, max_blur=2)
    with pytest.raises(ValueError, match=r"mask must have shape \(N·K, 1, 8, 8\)"):
        pert.apply_with_backward(torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="mask must have shape"):
        pert.apply_with_backward("mask")
    fade = Perturbation(torch.rand(2, 3, 8, 8), num_levels=4, type="fade")
    assert fade.apply_with_backward(torch.rand(4, 1, 8, 8)) is None
    with pytest.raises(ValueError, match="mask must have shape"):
        fade.apply_with_backward(torch.rand(4, 2, 8, 8))


@pytest.mark.parametrize("keep,drop", [(True, False), (False, True), (True, True)])
def test_games_with_backward_equal_autograd_through_the_games(keep, drop):
    g = torch.Generator().manual_seed(8)
    pert = Perturbation(torch.rand(2, 3, 9, 7, generator=g), num_levels=6, max_blur=2)
    mask = _hard_masks(4, (9, 7), torch.float32, seed=9)
    m = mask.clone().requires_grad_(True)
    parts = ([_old_apply(pert, m)] if keep else []) + ([_old_apply(pert, 1 - m)] if drop else [])
    old = torch.cat(parts)
    grad = torch.randn(old.shape, generator=g)
    (old_grad,) = torch.autograd.grad(old, m, grad)
    made = pert.games_with_backward(mask, keep, drop)
    assert made is not None
    assert torch.equal(made[0], old.detach()) and torch.equal(made[1](grad), old_grad)
    assert made[0].shape == (4 * (keep + drop), 3, 9, 7)


def test_games_with_backward_leaves_fade_and_no_game_to_the_caller():
    fade = Perturbation(torch.rand(1, 3, 8, 8), num_levels=4, type="fade")
    assert fade.games_with_backward(torch.rand(2, 1, 8, 8), True, True) is None
    blur = Perturbation(torch.rand(1, 3, 8, 8), num_levels=4, max_blur=2)
    assert blur.games_with_backward(torch.rand(2, 1, 8, 8), False, False) is None
    with pytest.raises(ValueError, match="mask must have shape"):
        blur.games_with_backward(torch.rand(2, 1, 8, 9), True, False)


def test_blend_follows_a_moved_or_replaced_pyramid():
    """The flat indices are made per pyramid shape: a pyramid replaced by one of another
    batch size is blended right."""
    pert = Perturbation(torch.rand(1, 3, 8, 8), num_levels=4, max_blur=2)
    mask = _hard_masks(2, (8, 8), torch.float32, seed=1)
    assert torch.equal(pert.apply(mask), _old_apply(pert, mask))
    other = Perturbation(torch.rand(2, 3, 8, 8), num_levels=4, max_blur=2)
    pert.pyramid = other.pyramid
    assert torch.equal(pert.apply(mask), _old_apply(pert, mask))
    assert torch.equal(pert.apply(mask), other.apply(mask))
    pert.pyramid = other.pyramid[:1]
    assert torch.equal(pert.apply(mask), _old_apply(pert, mask))
    assert pert.apply(mask).shape == (2, 3, 8, 8)


# ---------------------------------------------------------------------------------------------
# The ranking constraint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("areas", [(0.1,), (0.05, 0.1), (0.05, 0.3, 0.7)])
@pytest.mark.parametrize("images", [1, 2])
def test_ranking_equals_the_kthvalue_version(spatial, dtype, areas, images):
    p = math.prod(spatial)
    ones = tuple(int(round(a * p)) for a in areas) * images
    for seed in range(3):
        mask = _hard_masks(len(ones), spatial, dtype, seed)
        loss, grad = ranking_loss_and_gradient(mask, ones)
        old_loss, old_grad = _old_ranking(mask, ones)
        assert torch.equal(loss, old_loss) and torch.equal(grad, old_grad)
        assert loss.dtype == dtype and loss.shape == (len(ones),) and grad.shape == mask.shape


@pytest.mark.parametrize("ones", [(0, 5), (5, 64), (0,), (64,), (1, 63)])
def test_ranking_with_no_or_all_ones_equals_the_old_one(ones):
    mask = _hard_masks(len(ones), (8, 8), torch.float32, seed=4)
    loss, grad = ranking_loss_and_gradient(mask, ones)
    old_loss, old_grad = _old_ranking(mask, ones)
    assert torch.equal(loss, old_loss) and torch.equal(grad, old_grad)


def test_ranking_of_a_nan_row_is_nan_as_before():
    mask = _hard_masks(2, (8, 8), torch.float32, seed=5)
    mask[1, 0, 2, 2] = float("nan")
    loss, grad = ranking_loss_and_gradient(mask, (6, 12))
    old_loss, old_grad = _old_ranking(mask, (6, 12))
    assert _equal_nan(loss, old_loss) and _equal_nan(grad, old_grad)
    assert not torch.isnan(loss[0]) and torch.isnan(loss[1])


def test_ranking_area_loss_through_autograd_equals_the_old_one():
    mask = _hard_masks(3, (9, 11), torch.float64, seed=6).requires_grad_(True)
    loss = ranking_area_loss(mask, [0.1, 0.2, 0.4])
    (grad,) = torch.autograd.grad(loss.sum(), mask)
    ones = tuple(int(round(a * 99)) for a in (0.1, 0.2, 0.4))
    flat = mask.detach().flatten(1)
    old_loss, _ = _old_ranking(mask.detach(), ones)
    # (The autograd node's backward formula: g · 2 · (m − r̂) / P.)
    old_grad = torch.ones(3, 1, dtype=flat.dtype) * 2 * (flat - _old_reference(flat, ones)) / 99
    assert torch.equal(loss.detach(), old_loss) and torch.equal(grad, old_grad.view_as(mask))


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------


class _Box(nn.Module):
    """Class 0: 20 × the mean inside a box; class 1: another box (the speed toy)."""

    def __init__(self, side: int) -> None:
        super().__init__()
        w = torch.zeros(2, side, side)
        a = side // 8
        w[0, a:a + side // 4, 4 * a:4 * a + side // 4] = 1.0
        w[1, 5 * a:5 * a + side // 4, a:a + side // 4] = 1.0
        self.register_buffer("w", w / w[0].sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * torch.einsum("nchw,khw->nk", x, self.w.to(x.dtype)) / x.shape[1]


class _Linear(nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(numel, 3, generator=torch.Generator().manual_seed(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w.to(x.dtype))


def _runs(monkeypatch, model, x, target, **kw):
    """The run with the new pieces, then with the references swapped in."""
    new = extremal_perturbation(model, x, target, progress=False, generator=0, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(Perturbation, "apply", _old_apply)
        mp.setattr(Perturbation, "apply_with_backward", lambda self, mask: None)
        mp.setattr(optimisation_module, "ranking_loss_and_gradient", _old_ranking)
        old = extremal_perturbation(model, x, target, progress=False, generator=0, **kw)
    return new, old


def _same(new, old) -> None:
    (m1, h1), (m2, h2) = new, old
    assert torch.equal(m1, m2)
    for a, b in ((h1, h2), (h1.reward_scale, h2.reward_scale), (h1.area, h2.area)):
        assert torch.equal(torch.Tensor.as_subclass(a, torch.Tensor),
                           torch.Tensor.as_subclass(b, torch.Tensor))


@pytest.mark.parametrize("variant", ["preserve", "delete", "dual"])
@pytest.mark.parametrize("perturbation", ["blur", "fade"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whole_runs_are_bit_for_bit_the_old_ones_2d(monkeypatch, variant, perturbation, dtype):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=dtype)
    new, old = _runs(monkeypatch, _Box(32), x * 0.2 + 0.8, 0, areas=[0.05, 0.1],
                     variant=variant, perturbation=perturbation, max_iter=40, step=4, sigma=6)
    _same(new, old)
    assert new[0].shape == (2, 1, 32, 32) and new[1].shape == (2, 3, 40)


def test_whole_runs_are_bit_for_bit_two_images_three_areas(monkeypatch):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    new, old = _runs(monkeypatch, _Box(32), x, [0, 1], areas=[0.05, 0.1, 0.2], max_iter=40,
                     step=4, sigma=6, reward_scale="auto")
    _same(new, old)
    assert new[0].shape == (6, 1, 32, 32)


@pytest.mark.parametrize("spatial", [(60,), (6, 20, 20)])
@pytest.mark.parametrize("variant", ["preserve", "dual"])
def test_whole_runs_are_bit_for_bit_1d_and_3d(monkeypatch, spatial, variant):
    x = torch.rand((1, 3) + spatial, generator=torch.Generator().manual_seed(2))
    new, old = _runs(monkeypatch, _Linear(3 * math.prod(spatial)), x, 1, areas=[0.1, 0.3],
                     variant=variant, max_iter=30, step=3, sigma=4)
    _same(new, old)


def test_whole_run_with_half_precision_input_is_bit_for_bit(monkeypatch):
    """A half-precision input: the batch is cast for the model and its gradient back."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)).half()
    new, old = _runs(monkeypatch, _Box(16).half(), x, 0, areas=[0.1], max_iter=20, step=4,
                     sigma=4, variant="dual")
    _same(new, old)


class _Doubling(nn.Module):
    """The box of twice the input, doubled in place or not."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.box, self.in_place = _Box(16), in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.box(x.mul_(2.0) if self.in_place else x * 2.0)


def test_a_model_writing_into_its_input_in_place_runs_and_gets_the_right_numbers(monkeypatch):
    """The model gets a copy of the perturbed batch (not the leaf the gradient is taken at):
    writing into it in place works (before, the blend's output was a view made inside an
    autograd function, which autograd refused to let the model modify), and gives the numbers
    of the same model written out of place."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    kw = dict(areas=[0.1], max_iter=20, step=4, sigma=4, progress=False, generator=0)
    new = extremal_perturbation(_Doubling(True), x, 0, **kw)
    _, old = _runs(monkeypatch, _Doubling(False), x, 0, **{k: v for k, v in kw.items()
                                                          if k not in ("progress", "generator")})
    _same(new, old)
    assert torch.isfinite(new[0]).all() and new[0].shape == (1, 1, 16, 16)
