"""Extremal perturbation's fused pieces (issue 22): the smooth-max pooling, the crops and the
pyramid blend as single autograd nodes with hand-written backwards, the mask generator shared
across calls, the blur matrices kept.  Each must give exactly the numbers of the autograd graph
it replaces (the optimisation is chaotic: a rounding difference changes the masks), and refuse
what it cannot do."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torchray_like.attribution.extremal_perturbation import extremal_perturbation
from torchray_like.attribution.perturbation_pyramid import Perturbation
from torchray_like.attribution.smooth_masks import MaskGenerator, shared_generator


class _SmoothMax(torch.autograd.Function):
    """``Σ u e^u / Σ e^u`` over the last axis with the derivative ``e^u/Σe^u · (1 + u − y)``
    (the formula of the pooling before it was fused, kept here as the reference)."""

    @staticmethod
    def forward(ctx, u, valid):
        e = u.exp().mul_(valid)
        den = e.sum(dim=-1)
        out = (u * e).sum(dim=-1).div_(den)
        ctx.save_for_backward(u, e, den, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        u, e, den, out = ctx.saved_tensors
        return (u - out.unsqueeze(-1)).add_(1).mul_(e).mul_((grad / den).unsqueeze(-1)), None


def _graph_grid(gen: MaskGenerator, params: torch.Tensor) -> torch.Tensor:
    """The smooth-max grid as an autograd graph of the formula, axis by axis (the reference)."""
    out = params
    temperature = gen.temperature
    for i, a in enumerate(gen.axes):
        x = out.movedim(2 + i, -1).clamp(max=50.0 * temperature)
        w = a.weights.shape[1]
        radius = (w - 2) // 2
        win = F.pad(x, (radius, radius + 1)).unfold(-1, w, 1)
        u = win.unsqueeze(-2) * (a.weights / temperature)
        pooled = _SmoothMax.apply(u, (a.bias == 0).to(u.dtype))
        pooled = pooled.flatten(-2)[..., :a.points] * (temperature / a.norm)
        out = pooled.movedim(-1, 2 + i)
    return out + (out.clamp(0, 1) - out).detach()


@pytest.mark.parametrize("shape,step,sigma", [((40, 36), 4, 8.0), ((23,), 3, 5.0),
                                              ((6, 10, 12), 2, 3.0), ((30, 8), 6, 5.0)])
def test_fused_smooth_max_pooling_equals_the_autograd_graph_bit_for_bit(shape, step, sigma):
    # Two to six phases per grid step (the phases' sum takes two paths, up to four and more).
    gen = MaskGenerator(shape, step, sigma, jitter=step // 2)
    assert {a.sub for a in gen.axes} & {2, 3, 6}
    g = torch.Generator().manual_seed(0)
    params = torch.rand((3, 1) + gen.param_shape, generator=g).requires_grad_(True)
    fused = gen.grid(params)
    reference = _graph_grid(gen, params)
    seed = torch.randn(fused.shape, generator=g)
    (g_fused,) = torch.autograd.grad(fused, params, seed)
    (g_reference,) = torch.autograd.grad(reference, params, seed)
    assert fused.shape == (3, 1) + tuple(a.points for a in gen.axes)
    assert fused.dtype == torch.float32
    # The same operations in the same order: the same numbers, bit for bit.
    assert torch.equal(fused, reference)
    assert torch.equal(g_fused, g_reference)
    # Without a graph, the same values.
    assert torch.equal(gen.grid(params.detach()), fused.detach())


def test_fused_nodes_have_the_right_gradients_in_double_precision():
    gen = MaskGenerator((9, 8), 3, 2.0, jitter=1, dtype=torch.float64)
    params = torch.rand((2, 1) + gen.param_shape, dtype=torch.float64) * 0.8 + 0.1
    shift = torch.tensor([[1, -1], [0, 1]])
    params.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: gen.grid(p), (params,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda p: gen.pair(p, shift), (params,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda p: gen.pair(p, None)[0], (params,), fast_mode=True)
    image = torch.rand(1, 2, 6, 5, dtype=torch.float64)
    pyramid = Perturbation(image, num_levels=4, max_blur=3)
    # Away from the levels' knots (where the blend has a kink) the blend is smooth.
    mask = (torch.rand(2, 1, 6, 5, dtype=torch.float64) * 0.2 + 0.4).requires_grad_(True)
    assert torch.autograd.gradcheck(pyramid.apply, (mask,), fast_mode=True)


def test_fused_nodes_refuse_a_second_derivative_instead_of_a_wrong_one():
    gen = MaskGenerator((16, 16), 4, 6.0, jitter=2)
    params = torch.rand((1, 1) + gen.param_shape, requires_grad=True)
    mask, moved = gen.pair(params, torch.tensor([[1, 1]]))
    (g,) = torch.autograd.grad((mask * moved).sum(), params, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
    pyramid = Perturbation(torch.rand(1, 3, 16, 16))
    m = torch.full((1, 1, 16, 16), 0.3, requires_grad=True)
    (g,) = torch.autograd.grad(pyramid.apply(m).pow(2).sum(), m, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_shared_generator_is_made_once_per_arguments_and_equals_a_fresh_one():
    cpu = torch.device("cpu")
    a = shared_generator((32, 32), (4.0, 4.0), (8.0, 8.0), "softmax", (2, 2), 0.05, cpu,
                         torch.float32)
    b = shared_generator((32, 32), [4, 4], [8, 8], "softmax", [2, 2], 0.05, cpu, torch.float32)
    assert a is b
    for other in (shared_generator((32, 32), (4, 4), (8, 8), "softmax", (1, 1), 0.05, cpu,
                                   torch.float32),
                  shared_generator((32, 32), (4, 4), (8, 8), "softmax", (2, 2), 0.05, cpu,
                                   torch.float64),
                  shared_generator((32, 32), (4, 4), (8, 8), "max", (2, 2), 0.05, cpu,
                                   torch.float32)):
        assert other is not a
    fresh = MaskGenerator((32, 32), 4, 8.0, jitter=2)
    params = torch.rand((2, 1) + fresh.param_shape)
    shift = torch.tensor([[2, -1], [0, 1]])
    for x, y in zip(a.pair(params, shift), fresh.pair(params, shift)):
        assert torch.equal(x, y)
    assert torch.equal(a.footprint(), fresh.footprint())
    assert a.footprint() is a.footprint()                     # kept, not remade


def test_pyramids_of_one_size_share_blur_matrices_but_not_their_values():
    x = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    p1 = Perturbation(x, num_levels=5, max_blur=4)
    p2 = Perturbation(x, num_levels=5, max_blur=4)
    assert torch.equal(p1.pyramid, p2.pyramid)
    p1.pyramid.zero_()                              # a caller's change stays in its pyramid
    p3 = Perturbation(x, num_levels=5, max_blur=4)
    assert torch.equal(p3.pyramid, p2.pyramid) and float(p3.pyramid.abs().sum()) > 0
    # Another blur width gets its own matrices.
    p4 = Perturbation(x, num_levels=5, max_blur=2)
    assert not torch.equal(p4.pyramid[:, 0], p2.pyramid[:, 0])
    assert torch.equal(p4.pyramid[:, -1], x)


class _Box(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = x[:, :, 4:12, 14:22].mean(dim=(1, 2, 3))
        return torch.stack([20 * inside, -inside], dim=1)


def test_history_written_in_blocks_matches_every_iteration():
    # A bright box on a dark image: blurring it lowers the score, so the mask must keep it.
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.1
    x[:, :, 4:12, 14:22] += 0.9
    masks, hist = extremal_perturbation(_Box(), x, 0, areas=[0.05, 0.1], max_iter=53, step=4,
                                        sigma=6, generator=0, progress=False)
    assert hist.shape == (2, 3, 53)
    assert torch.isfinite(hist).all()
    # The area row is the masks' mean, the energy row weight · area loss − reward.
    expected = hist.weight[:, None] * hist.area_loss - hist.reward / hist.reward_scale
    assert torch.allclose(hist.energy, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(hist.area[-1], masks.flatten(1).mean(1), rtol=0, atol=0)
    assert math.isclose(float(hist.weight[0]), 300.0, rel_tol=1e-6)
    # The reward follows the masks: the toy's box gets the evidence.
    box = masks[:, 0, 4:12, 14:22].mean(dim=(1, 2))
    assert float(box.min()) > float(masks.mean()) + 0.2


def test_a_reward_that_turns_non_finite_late_is_reported_with_its_iteration():
    calls = {"n": 0}

    class Late(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            out = x.mean(dim=(2, 3))
            return out * float("nan") if calls["n"] > 52 else out

    with pytest.raises(ValueError, match="non-finite .* at iteration 52"):
        extremal_perturbation(Late(), torch.rand(1, 3, 16, 16), 0, areas=[0.1], max_iter=60,
                              step=2, sigma=3, progress=False)
