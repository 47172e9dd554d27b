"""Extremal perturbation's masks without autograd (issue 22, round 4): the mask generator's
forward and backward called directly (``MaskGenerator.pair_with_backward``, used by
``MaskOptimizer``) must give exactly the numbers of the autograd nodes they bypass — the
optimisation is chaotic, a rounding difference changes the masks — and the smooth max's skipped
cap must change nothing where no value reaches the cap, and still cap where one does."""

from __future__ import annotations

import pytest
import torch

from torchray_like.attribution.mask_optimizer import MaskOptimizer
from torchray_like.attribution.smooth_masks import MaskGenerator


def _autograd_pair(gen, params, shift, grads):
    """``pair`` through autograd: the masks and the gradient at ``params`` for ``grads``."""
    p = params.clone().requires_grad_(True)
    mask, moved = gen.pair(p, shift)
    outputs = [mask] if moved is mask else [mask, moved]
    (g,) = torch.autograd.grad(outputs, p, grads[:len(outputs)])
    return mask.detach(), moved.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,step,sigma,jitter", [((40, 36), 4, 8.0, 2),
                                                     ((30, 8), (6, 2), (5.0, 3.0), (3, 1)),
                                                     ((16, 16), 2, 6.0, 1)])
def test_pair_with_backward_equals_pair_and_autograd_bit_for_bit(shape, step, sigma, jitter,
                                                                  dtype):
    gen = MaskGenerator(shape, step, sigma, jitter=jitter, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    params = torch.rand((3, 1) + gen.param_shape, generator=g, dtype=dtype)
    params[0] = 1.0                                    # the initialisation: saturated masks
    bound = torch.tensor([a.jitter for a in gen.axes])
    shifts = torch.randint(-8, 9, (2, 3, 2), generator=g) % (2 * bound + 1) - bound
    starts = gen.starts(shifts)
    assert starts.shape == (2, 6, 2) and starts.dtype == torch.int64
    grads = [torch.randn((3, 1) + tuple(shape), generator=g, dtype=dtype) for _ in range(2)]
    for t in range(2):
        mask, moved, backward = gen.pair_with_backward(params, starts[t])
        ref_mask, ref_moved, ref_grad = _autograd_pair(gen, params, shifts[t], grads)
        assert moved is not mask and not mask.requires_grad
        assert mask.dtype == dtype and mask.shape == (3, 1) + tuple(shape)
        assert torch.equal(mask, ref_mask) and torch.equal(moved, ref_moved)
        got = backward(torch.cat(grads))
        assert got.shape == params.shape and torch.equal(got, ref_grad)
    # Without a shift: one mask, and the gradient of its one output.
    mask, moved, backward = gen.pair_with_backward(params)
    ref_mask, _, ref_grad = _autograd_pair(gen, params, None, grads)
    assert moved is mask and torch.equal(mask, ref_mask)
    assert torch.equal(backward(grads[0]), ref_grad)


def test_pair_with_backward_declines_what_it_does_not_cover_and_checks_params():
    # 1-D and 3-D masks, the hard max: None (the caller uses autograd).
    assert MaskGenerator((20,), 3, 4.0).pair_with_backward(torch.rand(1, 1, 8)) is None
    gen3 = MaskGenerator((4, 6, 6), 2, 2.0)
    assert gen3.pair_with_backward(torch.rand((1, 1) + gen3.param_shape)) is None
    hard = MaskGenerator((12, 12), 3, 4.0, pooling_method="max")
    assert hard.pair_with_backward(torch.rand((1, 1) + hard.param_shape)) is None
    gen = MaskGenerator((12, 12), 3, 4.0)
    with pytest.raises(ValueError, match=r"mask parameters must have shape \(K, 1, "):
        gen.pair_with_backward(torch.rand(1, 1, 3, 3))
    # Double-precision parameters for a single-precision generator: single-precision masks,
    # a double-precision gradient (as autograd's through the cast).
    p64 = torch.rand((2, 1) + gen.param_shape, dtype=torch.float64)
    mask, _, backward = gen.pair_with_backward(p64)
    ref_mask, _, ref_grad = _autograd_pair(gen, p64, None, [torch.ones(2, 1, 12, 12)])
    got = backward(torch.ones(2, 1, 12, 12))
    assert mask.dtype == torch.float32 and torch.equal(mask, ref_mask)
    assert got.dtype == torch.float64 and torch.equal(got, ref_grad)


def _run(opt, shifts, starts, steps):
    """``steps`` updates with gradients made from the masks (so that they differ per step)."""
    history = []
    for t in range(steps):
        shift = None if shifts is None else shifts[t]
        mask, moved = opt.masks(shift, None if starts is None else starts[t])
        g_mask = torch.sin(7 * mask.detach()) - 0.3
        if moved is mask:
            opt.step([mask], [g_mask])
        else:
            opt.step([mask, moved], [g_mask, torch.cos(5 * moved.detach())])
        history.append(opt.params.clone())
    return history


@pytest.mark.parametrize("jitter", [0, 2])
def test_mask_optimizer_without_autograd_takes_the_same_steps(jitter):
    gen = MaskGenerator((24, 20), 4, 6.0, jitter=jitter)
    g = torch.Generator().manual_seed(5)
    shifts = (torch.randint(-jitter, jitter + 1, (6, 2, 2), generator=g) if jitter else None)
    starts = None if shifts is None else gen.starts(shifts)
    fast = MaskOptimizer(gen, 2, 1.0, learning_rate=0.05, momentum=0.9, dampening=0.5)
    slow = MaskOptimizer(gen, 2, 1.0, learning_rate=0.05, momentum=0.9, dampening=0.5)
    got = _run(fast, shifts, starts, 6)
    # Shifts without their starts go through autograd (the reference); without jitter, the
    # autograd path is forced by a generator that declines.
    if shifts is None:
        slow.generator = _Declining(gen)
    want = _run(slow, shifts, None, 6)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert float((got[-1] - got[0]).abs().max()) > 1e-3      # the parameters did move
    assert not fast.params.requires_grad


class _Declining:
    """A generator that offers no autograd-free path (the optimiser falls back to autograd)."""

    def __init__(self, gen):
        self.gen = gen

    def pair_with_backward(self, params, start=None):
        return None

    def pair(self, params, shift=None):
        return self.gen.pair(params, shift)


def test_mask_optimizer_step_refuses_outputs_it_did_not_make():
    gen = MaskGenerator((16, 16), 4, 6.0, jitter=2)
    opt = MaskOptimizer(gen, 1, 1.0, learning_rate=0.1, momentum=0.9, dampening=0.9)
    shift = torch.tensor([[1, -2]])
    mask, moved = opt.masks(shift, gen.starts(shift[None])[0])
    with pytest.raises(ValueError, match=r"outputs must be the masks the last masks\(\) call "
                                         r"returned: \[mask\] when it has no shift, \[mask, "
                                         r"moved\] otherwise"):
        opt.step([moved], [torch.ones_like(moved)])
    before = opt.params.clone()
    mask, _ = opt.masks()
    opt.step([mask], [torch.ones_like(mask)])
    assert torch.equal(before, torch.ones_like(before))          # the refusal moved nothing
    assert float(opt.params.mean()) < 0.9                        # a positive pull lowers them


def test_smooth_max_caps_large_parameters_and_passes_no_gradient_there():
    # Temperature 0.05: parameters above 50·T = 2.5 are capped (no overflow without a shift by
    # the maximum); below the cap the skipped clamp changes nothing.
    gen = MaskGenerator((20, 20), 4, 6.0, temperature=0.05, clamp=False)
    low = torch.full((1, 1) + gen.param_shape, 0.3)
    high = low.clone()
    high[0, 0, 2, 3] = 4.0                           # above the cap: pools as 2.5 would
    capped = low.clone()
    capped[0, 0, 2, 3] = 2.5
    for p in (low, high, capped):
        p.requires_grad_(True)
    out_high = gen.grid(high)
    assert torch.equal(out_high, gen.grid(capped))
    assert float(out_high.detach().max()) > 1.5 > float(gen.grid(low).detach().max())
    (g_high,) = torch.autograd.grad(out_high.sum(), high)
    (g_capped,) = torch.autograd.grad(gen.grid(capped).sum(), capped)
    assert float(g_high[0, 0, 2, 3]) == 0.0 and float(g_capped[0, 0, 2, 3]) != 0.0
    mask = torch.ones_like(g_high, dtype=torch.bool)
    mask[0, 0, 2, 3] = False
    assert torch.equal(g_high[mask], g_capped[mask])
    # The autograd-free path caps alike.
    out, _, backward = gen.pair_with_backward(high.detach())
    ref = gen.pair(high)[0]
    assert torch.equal(out, ref.detach())
    (g_ref,) = torch.autograd.grad(ref, high, torch.ones_like(ref))
    assert torch.equal(backward(torch.ones_like(out)), g_ref)
    # NaN parameters: NaN masks (they count as capped, and get no gradient).
    nan = low.detach().clone()
    nan[0, 0, 1, 1] = float("nan")
    out, _, backward = gen.pair_with_backward(nan)
    grad = backward(torch.ones_like(out))
    assert bool(out.isnan().any()) and float(grad[0, 0, 1, 1]) == 0.0


@pytest.mark.parametrize("temperature", [0.029, 0.015, 0.011, 0.002])
def test_low_temperatures_pool_ones_to_ones_instead_of_the_cap_or_nan(temperature):
    # Below T = 0.03 the cap at 50·T would bind (a grid of ones pooled to 50·T; NaN once
    # exp(1/T) overflows, below 0.0113 in single precision): the shifted formula is used.
    for dtype in (torch.float32, torch.float64):
        gen = MaskGenerator((20, 20), 4, 6.0, temperature=temperature, clamp=False,
                            dtype=dtype)
        assert gen.pair_with_backward(torch.ones((1, 1) + gen.param_shape, dtype=dtype)) is None
        ones = gen.grid(torch.ones((1, 1) + gen.param_shape, dtype=dtype))
        torch.testing.assert_close(ones, torch.ones_like(ones), rtol=0, atol=1e-5)
        # A single bright parameter is a smooth bump, finite, about one at its peak.
        p = torch.zeros((1, 1) + gen.param_shape, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            p[0, 0, 3, 3] = 1.0
        out = gen.grid(p)
        (g,) = torch.autograd.grad(out.sum(), p)
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(g).all())
        assert 0.9 < float(out.detach().max()) < 1.05 and float(g[0, 0, 3, 3]) > 0


def test_extremal_perturbation_at_a_low_temperature_finds_the_box():
    # T = 0.01 used to pool a grid of ones to NaN (exp(100) overflows in single precision)
    # and stop with "the model's output is not finite".
    from torchray_like.attribution.extremal_perturbation import extremal_perturbation

    class Box(torch.nn.Module):
        def forward(self, x):
            inside = x[:, :, 4:12, 14:22].mean(dim=(1, 2, 3))
            return torch.stack([20 * inside, -inside], dim=1)

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.1
    x[:, :, 4:12, 14:22] += 0.9
    masks, hist = extremal_perturbation(Box(), x, 0, areas=[0.1], max_iter=60, step=4,
                                        sigma=6, temperature=0.01, generator=0,
                                        progress=False)
    assert bool(torch.isfinite(masks).all()) and bool(torch.isfinite(hist).all())
    assert float(masks[0, 0, 4:12, 14:22].mean()) > float(masks.mean()) + 0.3


@pytest.mark.parametrize("variant", ["preserve", "delete"])
def test_class_index_scores_equal_a_callable_targets_bit_for_bit(variant):
    # From the second iteration the class scores are one gather (not Target.scores): the
    # same numbers as the callable path, which scores the output itself.
    from torchray_like.attribution.extremal_perturbation import extremal_perturbation

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(16, 5)).eval()
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    common = dict(areas=[0.1, 0.2], max_iter=25, step=3, sigma=5.0, variant=variant,
                  generator=1, progress=False)
    m1, h1 = extremal_perturbation(model, x, [3, 1], **common)
    cls = torch.tensor([3, 3, 1, 1])
    m2, h2 = extremal_perturbation(model, x, lambda out: out.gather(1, cls[:, None])[:, 0],
                                   **common)
    assert torch.equal(m1, m2) and torch.equal(h1, h2)
    assert float((m1 - m1.mean()).abs().max()) > 0.1            # the masks did take shape
