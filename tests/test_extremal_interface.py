"""Extremal perturbation (Fong, Patrick, Vedaldi, ICCV 2019): how it is called — TorchRay's names,
signature, ``reward_func``, ``print_iter`` and ``debug``; bfloat16 autocast; callable targets;
NumPy arguments; and the caller's state (modes, gradients, grad mode) left as found."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import torchray_like.attribution.extremal_perturbation as ep
import torchray_like.attribution.extremal_rewards as rewards_module
import torchray_like.attribution.mask_optimizer as optimizer_module
import torchray_like.attribution.perturbation_pyramid as pyramid_module
import torchray_like.attribution.smooth_masks as smooth_module
from torchray_like.attribution.extremal_perturbation import (
    BLUR_PERTURBATION,
    DELETE_VARIANT,
    DUAL_VARIANT,
    FADE_PERTURBATION,
    PRESERVE_VARIANT,
    extremal_perturbation,
    simple_reward,
)

from .conftest import assert_same_state, snapshot
from .extremal_helpers import BOXES2, KW2, SHAPE2, BoxScore, DictModel, image2, inside_fraction

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


# ---------------------------------------------------------------------------------------------
# State invariants
# ---------------------------------------------------------------------------------------------


def test_state_is_restored_after_success_and_after_an_exception():
    model = BoxScore(BOXES2, SHAPE2).train()
    model.gain.grad = torch.tensor(0.5)
    x = image2().requires_grad_(True)
    x.grad = torch.ones_like(x)
    before = snapshot(model, x)
    extremal_perturbation(model, x, [0, 1], areas=[0.1], max_iter=3, **KW2)
    assert_same_state(before, snapshot(model, x))
    model.fail_at = 2
    with pytest.raises(RuntimeError, match="boom inside the model"):
        extremal_perturbation(model, x, [0, 1], areas=[0.1], max_iter=3, **KW2)
    assert_same_state(before, snapshot(model, x))
    model.fail_at = None
    # An error found after the first forward pass (target out of range) restores too.
    with pytest.raises(ValueError, match="out of range"):
        extremal_perturbation(model, x, [0, 5], areas=[0.1], max_iter=3, **KW2)
    assert_same_state(before, snapshot(model, x))


def test_works_inside_no_grad_and_leaves_it_on():
    model = BoxScore(BOXES2, SHAPE2)
    x = image2(1)
    ref, _ = extremal_perturbation(model, x, 0, areas=[0.1], max_iter=10, **KW2)
    with torch.no_grad():
        before = snapshot(model, x)
        masks, _ = extremal_perturbation(model, x, 0, areas=[0.1], max_iter=10, **KW2)
        assert_same_state(before, snapshot(model, x))
        assert not torch.is_grad_enabled()
    assert torch.equal(masks, ref) and not masks.requires_grad


def test_inference_mode_is_a_clear_error():
    model = BoxScore(BOXES2, SHAPE2)
    with torch.inference_mode():
        x = image2(1)
        with pytest.raises(RuntimeError, match="inference_mode"):
            extremal_perturbation(model, x, 0, max_iter=2, **KW2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda():
    model = BoxScore(BOXES2, SHAPE2).cuda()
    x = image2().cuda()
    masks, hist = extremal_perturbation(model, x, [0, 1], areas=[0.05], max_iter=60, **KW2)
    assert masks.device == x.device and hist.energy.device == x.device
    for n in range(2):
        assert inside_fraction(masks[n, 0].cpu(), BOXES2[n]) > 0.8


# ---------------------------------------------------------------------------------------------
# TorchRay's names and signature
# ---------------------------------------------------------------------------------------------


def test_torchray_names_are_the_machinery_and_the_signature_is_torchrays():
    assert (PRESERVE_VARIANT, DELETE_VARIANT, DUAL_VARIANT) == ep.VARIANTS
    assert (BLUR_PERTURBATION, FADE_PERTURBATION) == ep.PERTURBATIONS
    # The re-exported names are the machinery's objects, not copies.
    homes = {"MaskGenerator": smooth_module, "Perturbation": pyramid_module,
             "ranking_area_loss": optimizer_module, "ExtremalHistory": optimizer_module,
             "BLUR_PERTURBATION": pyramid_module, "FADE_PERTURBATION": pyramid_module,
             "PERTURBATIONS": pyramid_module, "simple_reward": rewards_module,
             "contrastive_reward": rewards_module, "VARIANTS": rewards_module}
    for name, home in homes.items():
        assert getattr(ep, name) is getattr(home, name), name
    for name in ep.__all__:
        assert hasattr(ep, name), name
    params = list(inspect.signature(extremal_perturbation).parameters.values())
    torchray = ["model", "input", "target", "areas", "perturbation", "max_iter", "num_levels",
                "step", "sigma", "jitter", "variant", "print_iter", "debug", "reward_func",
                "resize", "resize_mode", "smooth"]
    assert [q.name for q in params[:len(torchray)]] == torchray
    assert all(q.kind is q.KEYWORD_ONLY for q in params[len(torchray):])
    defaults = {q.name: q.default for q in params}
    assert (defaults["max_iter"], defaults["num_levels"], defaults["step"], defaults["sigma"],
            defaults["jitter"], defaults["variant"], defaults["reward_func"]) == (
                800, 8, 7, 21, True, "preserve", simple_reward)
    # The authors' optimisation settings.
    assert (defaults["learning_rate"], defaults["momentum"], defaults["dampening"]) == (
        0.01, 0.9, 0.9)
    assert defaults["area_weight"][0] == 300.0
    assert defaults["area_weight"][1] == pytest.approx(300 * 1.0035 ** 799)


# ---------------------------------------------------------------------------------------------
# TorchRay's interface: reward_func, print_iter, debug
# ---------------------------------------------------------------------------------------------


def test_reward_func_receives_what_torchray_passes():
    model = BoxScore(BOXES2, SHAPE2)
    calls = []

    def reward(activation, target, variant):
        calls.append((tuple(activation.shape), target, variant))
        return simple_reward(activation, target, variant)

    # An int target is passed as given (TorchRay's single-image case) ...
    extremal_perturbation(model, image2(1), 1, areas=[0.1, 0.2], max_iter=2,
                          reward_func=reward, **KW2)
    assert calls[0] == ((2, 2), 1, "preserve") and isinstance(calls[0][1], int)
    # ... per-image targets become one per mask (sample-major), and "dual" gets the preserved
    # then the deleted images.
    calls.clear()
    extremal_perturbation(model, image2(2), [1, 0], areas=[0.1, 0.2], max_iter=2,
                          variant="dual", reward_func=reward, **KW2)
    shape, target, variant = calls[0]
    assert shape == (8, 2) and variant == "dual"
    assert torch.equal(target, torch.tensor([1, 1, 0, 0]))


def test_print_iter_prints_the_energy_and_debug_every_mask(capsys):
    model = BoxScore(BOXES2, SHAPE2)
    masks, hist = extremal_perturbation(model, image2(1), 0, areas=[0.1, 0.2], max_iter=6,
                                        print_iter=3, **KW2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[0001/0006", "[0003/0006", "[0006/0006"]
    energy = float(lines[-1].split("energy ")[1].split()[0])
    assert energy == pytest.approx(float(hist.energy[5].mean()), rel=1e-3)
    extremal_perturbation(model, image2(1), 0, areas=[0.1, 0.2], max_iter=6, print_iter=3,
                          debug=True, **KW2)
    out = capsys.readouterr().out
    assert out.count("mask 0:") == 3 and out.count("mask 1:") == 3 and "reward_scale" in out
    extremal_perturbation(model, image2(1), 0, areas=[0.1], max_iter=3, **KW2)
    assert capsys.readouterr().out == ""


def test_bfloat16_autocast_runs_the_model_in_bfloat16_and_keeps_masks_in_float32(
        torchvision_models):
    model = torchvision_models["resnet18"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    seen = []
    handle = model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        kw = dict(areas=[0.1], max_iter=20, step=4, sigma=8, max_blur=6, generator=0,
                  progress=False)
        ref, ref_hist = extremal_perturbation(model, x, 3, **kw)
        low, low_hist = extremal_perturbation(model, x, 3, autocast=torch.bfloat16, **kw)
    finally:
        handle.remove()
    assert seen[:20] == [torch.float32] * 20 and seen[20:] == [torch.bfloat16] * 20
    assert low.dtype == torch.float32 and low_hist.energy.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    a, b = ref.flatten(), low.flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr > 0.95, corr
    with pytest.raises(TypeError, match="autocast must be None, torch.bfloat16"):
        extremal_perturbation(model, x, 3, autocast=torch.float64, **kw)


# ---------------------------------------------------------------------------------------------
# Callable targets, layouts, NumPy arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["preserve", "delete", "dual"])
def test_a_callable_target_is_the_class_score_it_returns(variant):
    """A callable target scores the perturbed rows itself: the same masks and history, bit for
    bit, as the class index whose score it returns — also through a dict output."""
    kw = dict(areas=[0.1, 0.2], max_iter=4, variant=variant, generator=3, **KW2)
    masks, hist = extremal_perturbation(BoxScore(BOXES2, SHAPE2), image2(), 1, **kw)
    got, got_hist = extremal_perturbation(BoxScore(BOXES2, SHAPE2), image2(),
                                          lambda out: out[:, 1], **kw)
    assert torch.equal(got, masks) and torch.equal(got_hist, hist)
    wrapped = DictModel(BoxScore(BOXES2, SHAPE2))
    got, got_hist = extremal_perturbation(wrapped, image2(), lambda out: out["logits"][:, 1],
                                          **kw)
    assert torch.equal(got, masks) and torch.equal(got_hist.reward, hist.reward)
    rows = 2 * 2 * (2 if variant == "dual" else 1)
    assert [c[0] for c in wrapped.inner.calls] == [rows] * 4


def test_numpy_arguments_are_accepted_and_give_the_same_masks():
    kw = dict(max_iter=3, sigma=3, max_blur=3, progress=False, reward_scale="auto")
    masks, hist = extremal_perturbation(
        BoxScore(BOXES2, SHAPE2), image2(), [0, 1], areas=[0.1, 0.2], smooth=0.125, generator=1,
        step=2, area_weight=(2.0, 9.0), momentum=0.5, debug=False, **kw)
    got, got_hist = extremal_perturbation(
        BoxScore(BOXES2, SHAPE2), image2(), np.array([0, 1]), areas=np.array([0.1, 0.2]),
        smooth=np.float32(0.125), generator=np.int64(1), step=np.int64(2),
        area_weight=np.array([2.0, 9.0]), momentum=np.float64(0.5), debug=np.bool_(False), **kw)
    assert torch.equal(got, masks) and torch.equal(got_hist, hist)
    got, _ = extremal_perturbation(BoxScore(BOXES2, SHAPE2), image2(), np.int64(1),
                                   areas=torch.tensor([0.1]), max_iter=2, **KW2)
    ref, _ = extremal_perturbation(BoxScore(BOXES2, SHAPE2), image2(), 1, areas=[0.1],
                                   max_iter=2, **KW2)
    assert got.shape == (2, 1) + SHAPE2 and torch.equal(got, ref)
