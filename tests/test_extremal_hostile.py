"""Extremal perturbation (Fong, Patrick, Vedaldi, ICCV 2019): what it refuses, and how — bad
arguments, targets, inputs and models, non-finite values, unbatched or channels-last images —
and hostile inputs it must survive (coarse grids, half precision, the caller's denormal
setting)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from torchray_like.attribution.extremal_perturbation import (
    contrastive_reward,
    extremal_perturbation,
    simple_reward,
)
from torchray_like.attribution.precision import denormals_flushed

from .conftest import assert_same_state, snapshot
from .extremal_helpers import (
    BOX,
    BOXES2,
    KW2,
    SHAPE2,
    SIDE,
    BoxScore,
    DictModel,
    ScaledBoxLogit,
    box_images,
    image2,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.w.detach().expand(x.shape[0], 3)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(areas=[0.1, 1.0]), ValueError, r"areas must be fractions .* strictly between 0 and 1, "
                                          r"got 1.0"),
    (dict(areas=0.0), ValueError, "strictly between 0 and 1, got 0.0"),
    (dict(areas=[-0.2]), ValueError, "strictly between 0 and 1"),
    (dict(areas=[]), ValueError, "areas is empty"),
    (dict(areas=["0.1"]), ValueError, "strictly between 0 and 1, got '0.1'"),
    (dict(areas="0.1"), TypeError, "areas must be a number or a sequence"),
    (dict(variant="keep"), ValueError, r"variant must be one of \('preserve', 'delete', 'dual'\)"),
    (dict(perturbation="noise"), ValueError, r"perturbation must be one of \('blur', 'fade'\)"),
    (dict(max_iter=0), ValueError, "max_iter must be an integer ≥ 1, got 0"),
    (dict(max_iter=2.5), ValueError, "max_iter must be an integer ≥ 1, got 2.5"),
    # Before: the allocator's RuntimeError (or a Python loop over every iteration first).
    (dict(max_iter=2 ** 42), ValueError, r"max_iter=4398046511104 does not fit in memory: the "
                                         r"optimisation's history .* needs \d.* GiB on cpu for 2 "
                                         r"masks; use fewer iterations"),
    (dict(num_levels=1), ValueError, "num_levels must be an integer ≥ 2"),
    (dict(step=0), ValueError, "step must be a finite integer ≥ 1, got 0"),
    (dict(step=1.5), ValueError, "step must be a finite integer ≥ 1, got 1.5"),
    (dict(step=(2, 2, 2)), ValueError, r"step must be one integer ≥ 1 or 2 of them"),
    (dict(step="2"), TypeError, "step must be a number or a sequence of 2 numbers"),
    (dict(sigma=0), ValueError, "sigma must be a finite number > 0, got 0"),
    (dict(sigma=float("nan")), ValueError, "sigma must be a finite number > 0"),
    (dict(max_blur=-2), ValueError, "max_blur must be a finite number ≥ 0"),
    # Before: the allocator's RuntimeError from the pyramid's kernel.
    (dict(max_blur=1e12), ValueError, r"a Gaussian blur of sigma=1e\+12 px would need a kernel "
                                      r"of .* taps .* use a smaller sigma \(max_blur"),
    (dict(reward_func="simple"), TypeError, "reward_func must be callable"),
    (dict(reward_func=lambda a, t, v: a[:, 0:1]), ValueError,
     r"reward_func must return a tensor of 2 rewards \(one per mask\), got \(2, 1\)"),
    (dict(smooth=-1), ValueError, "smooth must be a non-negative number"),
    (dict(resize=(3, 4, 5)), ValueError, "resize must give 2 positive sizes"),
    (dict(resize=True, resize_mode="cubic"), ValueError, "resize_mode must be one of"),
    (dict(learning_rate=0), ValueError, "learning_rate must be a positive number"),
    (dict(momentum=1.0), ValueError, r"momentum must be a finite number in \[0, 1\)"),
    (dict(area_weight=(1.0,)), ValueError, r"area_weight must be two positive numbers"),
    (dict(area_weight=(0.0, 10.0)), ValueError, r"area_weight must be two positive numbers"),
    (dict(temperature=-0.1), ValueError, "temperature must be a finite number ≥ 0"),
    (dict(progress="yes"), TypeError, "progress must be True, False or None"),
    (dict(generator=[1, 2, 3]), ValueError, "generator has 3 entries but the batch has 2 images"),
    (dict(generator=[1, "a"]), TypeError, "generator entry must be a torch.Generator, an int"),
    (dict(generator=1.5), TypeError, "generator must be a torch.Generator, an int seed or None"),
    (dict(dampening=1.5), ValueError, r"dampening must be a finite number in \[0, 1\], got 1.5"),
    (dict(reward_scale="raw"), ValueError, "reward_scale must be 'auto' or a positive number"),
    (dict(reward_scale=0), ValueError, "reward_scale must be 'auto' or a positive number"),
    (dict(print_iter=0), ValueError, r"print_iter must be a positive int \(>= 1\)"),
    (dict(debug="yes"), TypeError, "debug must be True or False"),
    (dict(flush_denormals=1), TypeError, "flush_denormals must be True or False"),
    (dict(step=8, sigma=1.0), ValueError, r"step 8 is too large for sigma 1: .* use step ≤ 6 or "
                                          r"sigma ≥ 1.33333"),
    (dict(fade_to="grey", perturbation="fade"), ValueError, "fade_to must be 'zero' or 'mean'"),
])
def test_argument_errors(kwargs, error, match):
    model = BoxScore(BOXES2, SHAPE2)
    x = image2()
    before = snapshot(model, x)
    args = dict(max_iter=2, step=2, sigma=3, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        extremal_perturbation(model, x, [0, 1], **args)
    assert_same_state(before, snapshot(model, x))
    # Argument errors are found before any work, except the reward's (after one pass).
    assert len(model.calls) == (1 if callable(kwargs.get("reward_func")) else 0)


@pytest.mark.parametrize("target,error,match", [
    ([0], ValueError, "target has 1 class indices but the batch has 2 samples"),
    ([0, 1, 1], ValueError, "target has 3 class indices but the batch has 2 samples"),
    ([0, 2], ValueError, r"target class 2 is out of range: the model output has 2 classes "
                         r"\(valid: 0..1\)"),
    (-1, ValueError, "target class -1 is out of range"),
    (0.5, ValueError, "target must be an integer class index, got the float 0.5"),
    (torch.tensor([0.0, 1.0]), ValueError, "target must hold integer class indices"),
    (torch.zeros(2, 2), ValueError, "a floating tensor is a seed gradient, which only the "
                                    "backpropagation methods use"),
    (np.array([0.0, 1.0]), ValueError, "float64 NumPy array: class indices must be integers"),
    (np.array([True, False]), TypeError, "boolean array"),
    (torch.tensor([0, 1], device="meta"), ValueError, "target is on the meta device"),
    (torch.tensor([[0, 1]]), ValueError, "1-D tensor with one class per sample"),
    (True, TypeError, "got the boolean"),
])
def test_target_errors(target, error, match):
    model = BoxScore(BOXES2, SHAPE2)
    with pytest.raises(error, match=match):
        extremal_perturbation(model, image2(), target, max_iter=2, **KW2)
    if "out of range" not in match:
        assert model.calls == []  # parsed once, at entry: refused before any forward pass


def test_input_and_model_errors():
    model = BoxScore(BOXES2, SHAPE2)
    with pytest.raises(TypeError, match="input must be a floating-point tensor.*uint8"):
        extremal_perturbation(model, image2().to(torch.uint8), 0, max_iter=2, **KW2)
    with pytest.raises(ValueError, match=re.escape("input must have shape (N, C, *spatial)")):
        extremal_perturbation(model, torch.rand(48, 48), 0, max_iter=2, **KW2)
    with pytest.raises(ValueError, match=re.escape("input must be (N, C, L), (N, C, H, W) or")):
        extremal_perturbation(model, torch.rand(1, 1, 4, 4, 4, 4), 0, max_iter=2, step=1,
                              sigma=1, progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        extremal_perturbation(lambda x: x, image2(), 0, max_iter=2, **KW2)
    with pytest.raises(ValueError, match="the reward does not depend on the mask"):
        extremal_perturbation(Constant(), image2(), 0, max_iter=2, **KW2)
    with pytest.raises(TypeError, match="the model returned a dict, not a tensor"):
        extremal_perturbation(DictModel(model), image2(), 0, max_iter=2, **KW2)
    # ... which a reward_func handles.
    masks, _ = extremal_perturbation(
        DictModel(model), image2(), [0, 1], max_iter=2,
        reward_func=lambda out, t, v: simple_reward(out["logits"], t, v), **KW2)
    assert masks.shape == (2, 1) + SHAPE2


def test_warns_when_sigma_is_too_large_for_the_input_at_the_callers_line():
    model = BoxScore(BOXES2, SHAPE2)
    x = image2()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        extremal_perturbation(model, x, 0, max_iter=1, progress=False)
    found = [r for r in w if "more than a quarter of the input size" in str(r.message)]
    assert len(found) == 1 and found[0].category is UserWarning
    assert found[0].filename == __file__          # this line, not the library's


# ---------------------------------------------------------------------------------------------
# Hostile inputs (issue 8)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_an_error_naming_input(bad):
    model = BoxScore(BOXES2, SHAPE2)
    x = image2()
    x[1, 2, 5, 7] = bad
    with pytest.raises(ValueError, match=r"extremal_perturbation: input has 1 (NaN|infinite) "
                                         r"value"):
        extremal_perturbation(model, x, [0, 1], max_iter=2, **KW2)
    assert model.calls == []


def test_non_finite_model_output_is_an_error_not_an_index_error():
    class Bad(nn.Module):
        def __init__(self, after):
            super().__init__()
            self.inner, self.calls, self.after = BoxScore(BOXES2, SHAPE2), 0, after

        def forward(self, x):
            self.calls += 1
            out = self.inner(x)
            return out * float("nan") if self.calls > self.after else out

    for after in (0, 3):                  # NaN from the first pass, or later
        with pytest.raises(ValueError, match="reward (is|became) not finite|non-finite"):
            extremal_perturbation(Bad(after), image2(), [0, 1], max_iter=6, **KW2)


@pytest.mark.parametrize("step,sigma", [(26, 8.0), (8, 2.0)])
def test_coarse_grids_give_finite_masks(step, sigma):
    # Formerly "index -9223372036854775808 is out of bounds": a NaN from 0/0 in the smooth max
    # of windows with no candidate poisoned the gradient.
    model = ScaledBoxLogit([20.0], [False])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # sigma 8 is large for 64 px, and says so
        masks, hist = extremal_perturbation(model, box_images([0]), 0, areas=[0.05],
                                            perturbation="fade", max_iter=30, step=step,
                                            sigma=sigma, jitter=True, progress=False,
                                            generator=0)
    assert torch.isfinite(masks).all() and torch.isfinite(hist).all()
    assert masks.min() >= 0 and masks.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_and_models(dtype):
    # Formerly "index_copy_(): self and source expected to have the same dtype".
    model = ScaledBoxLogit([20.0], [False]).to(dtype)
    x = box_images([0]).to(dtype)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    masks, hist = extremal_perturbation(model, x, 0, areas=[0.05], perturbation="fade",
                                        max_iter=200, step=4, sigma=8, jitter=False,
                                        progress=False)
    assert set(seen) == {dtype}                    # the model sees its own dtype
    assert masks.dtype == torch.float32 and hist.dtype == torch.float32
    ref, _ = extremal_perturbation(model.float(), x.float(), 0, areas=[0.05],
                                   perturbation="fade", max_iter=200, step=4, sigma=8,
                                   jitter=False, progress=False)
    assert float((masks - ref).abs().max()) < 0.1
    inside = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    inside[BOX] = True
    assert not ((masks[0, 0] > 0.5) & ~inside).any()


@pytest.mark.parametrize("initial", [False, True])
def test_the_callers_denormal_setting_is_restored(initial):
    if not torch.set_flush_denormal(initial) and initial:
        pytest.skip("this CPU cannot flush denormals")
    seen = []

    class Spy(BoxScore):
        def forward(self, x):
            seen.append(denormals_flushed())
            return super().forward(x)

    try:
        extremal_perturbation(Spy(BOXES2, SHAPE2), image2(1), 0, max_iter=2, **KW2)
        assert seen == [True, True]                # flushed during the call ...
        assert denormals_flushed() is initial      # ... and the caller's setting is back
        with pytest.raises(RuntimeError):
            extremal_perturbation(BoxScore(BOXES2, SHAPE2, fail_at=1), image2(1), 0,
                                  max_iter=2, **KW2)
        assert denormals_flushed() is initial
    finally:
        torch.set_flush_denormal(False)


# ---------------------------------------------------------------------------------------------
# Callable target refusals, unbatched and channels-last images
# ---------------------------------------------------------------------------------------------


def test_callable_target_errors_name_what_to_pass():
    model = BoxScore(BOXES2, SHAPE2)
    with pytest.raises(ValueError, match="pass either a callable target .* or reward_func"):
        extremal_perturbation(model, image2(), lambda out: out[:, 0], max_iter=2,
                              reward_func=contrastive_reward, **KW2)
    assert model.calls == []
    with pytest.raises(ValueError, match=r"one score per row of the model output, shape \(2,\) "
                                         r"for a forward batch of 2, got \(2, 2\)"):
        extremal_perturbation(model, image2(), lambda out: out, max_iter=2, **KW2)
    with pytest.raises(TypeError, match="a callable target must return a tensor of one score "
                                        "per row of the model output, got float"):
        extremal_perturbation(model, image2(), lambda out: 1.0, max_iter=2, **KW2)
    with pytest.raises(ValueError, match="the reward does not depend on the mask"):
        extremal_perturbation(model, image2(), lambda out: out[:, 0].detach(), max_iter=2,
                              **KW2)


def test_a_dict_output_with_a_class_index_names_the_callable_target():
    model = DictModel(BoxScore(BOXES2, SHAPE2))
    with pytest.raises(TypeError, match=r"extremal_perturbation: the model returned a dict, not "
                                        r"a tensor; pass a callable target .* target=lambda"):
        extremal_perturbation(model, image2(), 0, max_iter=2, **KW2)


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_unbatched_and_channels_last_images_say_what_to_do():
    model = TinyConv()
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = snapshot(model, image[None])
    kw = dict(max_iter=1, step=2, sigma=3, progress=False, generator=0)
    with pytest.raises(ValueError, match=r"extremal_perturbation: .*channels last.*"
                                         r"x\.permute\(0, 3, 1, 2\)"):
        extremal_perturbation(model, image.permute(1, 2, 0)[None], 0, **kw)
    with pytest.raises(ValueError, match=r"TinyConv failed on input of shape \(3, 16, 16\) "
                                         r"\(IndexError: .*without the "
                                         r"batch dimension.*x\.unsqueeze\(0\)") as info:
        extremal_perturbation(model, image, 0, **kw)
    assert isinstance(info.value.__cause__, IndexError)   # the model's own error, as the cause
    assert_same_state(before, snapshot(model, image[None]))
