"""Extremal perturbation (Fong, Patrick, Vedaldi, ICCV 2019): the method on models whose evidence
is known (at the paper's settings, robust to the scale of the scores), on trained models, seeds
and batches, real architectures, resize and smoothing.  Its machinery: test_extremal_machinery.py;
TorchRay's interface and the caller's state: test_extremal_interface.py; refusals and hostile
inputs: test_extremal_hostile.py."""

from __future__ import annotations

import os
import pickle
import threading

import pytest
import torch

from torchray_like.attribution.arguments import per_axis
from torchray_like.attribution.common import smooth_saliency
from torchray_like.attribution.extremal_perturbation import (
    DELETE_VARIANT,
    DUAL_VARIANT,
    ExtremalHistory,
    Perturbation,
    contrastive_reward,
    extremal_perturbation,
)

from .conftest import assert_same_state, snapshot
from .extremal_helpers import (
    AREAS,
    BOX,
    BOXES2,
    KW2,
    RIVAL,
    SCALES,
    SHAPE2,
    SIDE,
    BoxScore,
    ScaledBoxLogit,
    box_fraction,
    box_images,
    image2,
    inside_fraction,
    pattern,
    support_inside,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


@pytest.fixture(scope="module")
def preserve_run():
    model = BoxScore(BOXES2, SHAPE2)
    x = image2()
    # The paper's settings (800 iterations).
    masks, hist = extremal_perturbation(model, x, [0, 1], areas=AREAS, generator=0, **KW2)
    return model, x, masks, hist


# ---------------------------------------------------------------------------------------------
# The method on known evidence
# ---------------------------------------------------------------------------------------------


def test_preserve_masks_find_the_box_of_each_class(preserve_run):
    model, x, masks, hist = preserve_run
    assert masks.shape == (6, 1) + SHAPE2 and masks.dtype == torch.float32
    assert masks.min() >= 0 and masks.max() <= 1
    for i in range(6):
        n, k = divmod(i, 3)
        box, area = BOXES2[n], AREAS[k]
        # The most of the mask the box can hold: all of it when the area fits in the box.
        best = min(1.0, box_fraction(box, SHAPE2) / area)
        # The thresholded mask lies in the box; so does most of its mass (its soft edges,
        # about 2σ wide, spill over).  A mask elsewhere would score near 0, a uniform one
        # the box's share of the image (8 % and 13 %).
        assert support_inside(masks[i, 0], box) >= 0.8 * best, i
        assert inside_fraction(masks[i, 0], box) >= 0.65 * best, i
        if best == 1.0:
            # Nothing of the other class's box (a larger area spends its surplus anywhere).
            assert inside_fraction(masks[i, 0], BOXES2[1 - n]) < 0.01, i


def test_achieved_areas_are_close_to_the_requested_ones(preserve_run):
    _, _, masks, hist = preserve_run
    target = torch.tensor(AREAS * 2)
    assert torch.equal(hist.target_area, target)
    torch.testing.assert_close(hist.achieved_area, masks.flatten(1).mean(1))
    torch.testing.assert_close(hist.support_area, (masks > 0.5).flatten(1).float().mean(1))
    # Within 2 percentage points of the image (soft area Σm/|Ω| and thresholded area).  The
    # ranking loss alone prefers smooth masks a little smaller than the area when thresholded
    # (it pulls the top values to 1 and the rest to 0, and the soft edges pay on both sides).
    assert ((hist.achieved_area - target).abs() <= 0.02).all(), hist.achieved_area
    assert ((hist.support_area - target).abs() <= 0.02).all(), hist.support_area


def test_preserve_reward_grows_with_area(preserve_run):
    model, x, masks, hist = preserve_run
    with torch.no_grad():
        scores = model(Perturbation(x, 8, 3).apply(masks))
    reward = scores[torch.arange(6), torch.tensor([0, 0, 0, 1, 1, 1])].view(2, 3)
    assert (reward[:, 1:] > reward[:, :-1]).all(), reward
    assert (hist.reward[-1].view(2, 3).diff(dim=1) > 0).all()
    # The masks start at 1 (the image kept whole): the first reward is the image's score, and
    # the last recorded reward is the one of the returned masks (before the last update).
    with torch.no_grad():
        full = model(x)[[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    torch.testing.assert_close(hist.reward[0], full)


def test_history_layout(preserve_run):
    _, _, masks, hist = preserve_run
    assert isinstance(hist, ExtremalHistory) and isinstance(hist, torch.Tensor)
    # TorchRay's tensor form: (N·K, 3, max_iter) = energy, reward, area loss per mask.
    assert hist.shape == (6, 3, 800)
    for i, key in enumerate(("energy", "reward", "area_loss")):
        assert torch.equal(hist[:, i].t(), getattr(hist, key)), key
    assert type(hist[:, 0]) is torch.Tensor            # operations give plain tensors
    for key in ("energy", "reward", "area_loss", "area", "reward_scale"):
        value = getattr(hist, key)
        assert value.shape == (800, 6) and torch.isfinite(value).all(), key
    # λ = 300 · 1.0035^t (the authors' schedule, at 800 iterations).
    w = hist.weight
    assert w.shape == (800,)
    torch.testing.assert_close(w, (300 * 1.0035 ** torch.arange(800.0, dtype=torch.float64))
                               .float())
    torch.testing.assert_close(hist.energy, hist.weight[:, None] * hist.area_loss
                               - hist.reward / hist.reward_scale)
    # The reward unit is a running maximum (never decreasing), positive.
    assert (hist.reward_scale > 0).all() and (hist.reward_scale.diff(dim=0) >= 0).all()
    # The ranking regulariser ends small: the sorted mask is close to the reference; it starts
    # at (1 − a)²·... for the all-ones start: mean((1 − r)²) = 1 − a.
    assert (hist.area_loss[-1] < 0.03).all()
    ones = torch.tensor([round(a * 48 * 48) for a in AREAS * 2]) / (48 * 48)
    torch.testing.assert_close(hist.area_loss[0], 1 - ones)
    torch.testing.assert_close(hist.area[0], torch.ones(6))
    assert len(hist.seeds) == 2 and hist.seeds[1] == hist.seeds[0] + 1
    # Picklable, attributes included.
    again = pickle.loads(pickle.dumps(hist))
    assert torch.equal(again, hist) and torch.equal(again.achieved_area, hist.achieved_area)
    assert torch.equal(again.energy, hist.energy)


def test_each_iteration_is_one_forward_pass_of_the_whole_batch_in_eval_mode():
    model = BoxScore(BOXES2, SHAPE2).train()
    x = image2()
    for variant, rows in (("preserve", 4), ("delete", 4), ("dual", 8)):
        model.calls.clear()
        extremal_perturbation(model, x, [0, 1], areas=[0.1, 0.2], max_iter=4, variant=variant,
                              **KW2)
        # One pass per iteration of N·K images (2·N·K for dual), model in eval mode, autograd
        # on, parameters frozen.
        assert model.calls == [(rows, False, True, False)] * 4, variant
    assert model.training and model.gain.requires_grad


def test_fade_perturbation_finds_the_box():
    model = BoxScore(BOXES2, SHAPE2)
    masks, hist = extremal_perturbation(model, image2(), [0, 1], areas=[0.05], max_iter=200,
                                        perturbation="fade", generator=0, **KW2)
    for n in range(2):
        assert support_inside(masks[n, 0], BOXES2[n]) > 0.95
        assert inside_fraction(masks[n, 0], BOXES2[n]) > 0.75
    # The thresholded area is the requested one; the soft edges add about a quarter of it.
    assert ((hist.support_area - 0.05).abs() < 0.0075).all(), hist.support_area
    assert ((hist.achieved_area - 0.05).abs() < 0.015).all(), hist.achieved_area


def test_contrastive_reward_keeps_the_other_class_out():
    # An area of 80 %: box 0 (7.8 %) and most of the rest.  The simple reward does not care
    # what else is kept, so the mask takes box 1 (13 %) along with the rest; the contrastive
    # reward is lowered by box 1's evidence (the rival class), so the mask leaves it out.
    model = BoxScore(BOXES2, SHAPE2)
    x = image2(1)
    kw = dict(areas=[0.8], max_iter=300, generator=0, **KW2)
    contrast, hist = extremal_perturbation(model, x, 0, reward_func=contrastive_reward, **kw)
    simple, _ = extremal_perturbation(model, x, 0, **kw)
    core = (slice(30, 41), slice(26, 42))            # box 1 without its border
    for m in (contrast[0, 0], simple[0, 0]):
        assert float(m[tuple(slice(a, b) for a, b in BOXES2[0])].mean()) > 0.9   # box 0 kept
    assert float(contrast[0, 0][core].max()) < 0.2 and support_inside(
        contrast[0, 0], BOXES2[1]) == 0.0
    assert float(simple[0, 0][core].min()) > 0.9
    assert abs(float(hist.support_area[0]) - 0.8) < 0.015


@pytest.mark.parametrize("variant", [DELETE_VARIANT, DUAL_VARIANT])
def test_delete_and_dual_masks_cover_the_evidence(variant):
    model = BoxScore(BOXES2, SHAPE2)
    x = image2()
    # Areas that cover each box: deleting the masked region removes the evidence.
    masks, hist = extremal_perturbation(model, x, [0, 1], areas=[0.12, 0.2], max_iter=120,
                                        variant=variant, generator=0, **KW2)
    assert masks.shape == (4, 1) + SHAPE2
    with torch.no_grad():
        full = model(x)[[0, 1], [0, 1]]
        deleted = model(Perturbation(x, 8, 3).apply(1 - masks))[torch.arange(4),
                                                                  torch.tensor([0, 0, 1, 1])]
    for i in range(4):
        n, k = divmod(i, 2)
        best = min(1.0, box_fraction(BOXES2[n], SHAPE2) / [0.12, 0.2][k])
        assert inside_fraction(masks[i, 0], BOXES2[n]) > 0.7 * best, i
        assert support_inside(masks[i, 0], BOXES2[n]) > 0.8 * best, i
        assert deleted[i] < 0.25 * full[n], (i, deleted[i], full[n])
    assert ((hist.achieved_area - torch.tensor([0.12, 0.2] * 2)).abs() < 0.025).all()


def test_video_masks_cover_time_height_and_width():
    shape = (8, 24, 24)
    box = ((2, 6), (4, 14), (8, 20))                                  # 10.4 % of the clip
    other = ((0, 8), (18, 24), (0, 6))
    model = BoxScore([box, other], shape, pattern_shape=(1, 24, 24))
    x = pattern((1, 24, 24)).expand(1, 2, *shape).clone().float()
    areas = [0.04, 0.06]
    masks, hist = extremal_perturbation(model, x, 0, areas=areas, step=(1, 2, 2),
                                        sigma=(1.0, 3.0, 3.0), max_blur=(0.0, 3.0, 3.0),
                                        progress=False, generator=0, reward_scale="auto")
    assert masks.shape == (2, 1) + shape
    for k, area in enumerate(areas):
        assert support_inside(masks[k, 0], box) > 0.85, k
        assert inside_fraction(masks[k, 0], box) > 0.6, k
        # The soft edges take more room in 3-D (two frames of eight along time): the soft
        # area overshoots more.
        assert abs(float(hist.support_area[k]) - area) <= 0.015, hist.support_area
        assert abs(float(hist.achieved_area[k]) - area) <= 0.025, hist.achieved_area
    # Frames outside the box's time span are nearly off.
    assert masks[:, 0, :2].mean() < 0.02 and masks[:, 0, 6:].mean() < 0.02


def test_one_dimensional_signals():
    model = BoxScore([((10, 26),), ((40, 56),)], (96,))
    x = pattern((96,)).expand(1, 1, 96).clone().float()
    masks, hist = extremal_perturbation(model, x, 1, areas=[0.15], max_iter=100, step=2,
                                        sigma=3, max_blur=3, progress=False, generator=0,
                                        reward_scale="auto")
    assert masks.shape == (1, 1, 96)
    assert inside_fraction(masks[0, 0], ((40, 56),)) > 0.8
    assert support_inside(masks[0, 0], ((40, 56),)) == 1.0


def test_time_axis_defaults_scale_with_the_clip_length():
    spatial = (16, 112, 112)
    assert per_axis(7, "step", spatial, integer=True, minimum=1, strict=False,
                    time_scaled=True) == (1.0, 7.0, 7.0)
    assert per_axis(21, "sigma", spatial, integer=False, minimum=0, strict=True,
                    time_scaled=True) == (3.0, 21.0, 21.0)
    assert per_axis(7, "step", (224, 224), integer=True, minimum=1, strict=False,
                    time_scaled=True) == (7.0, 7.0)
    assert per_axis((1, 7, 7), "step", spatial, integer=True, minimum=1, strict=False,
                    time_scaled=True) == (1.0, 7.0, 7.0)


# ---------------------------------------------------------------------------------------------
# Seeds and batches
# ---------------------------------------------------------------------------------------------


def test_seeds_reproduce_exactly_and_differ_between_seeds():
    model = BoxScore(BOXES2, SHAPE2)
    x = image2(1)
    run = lambda g: extremal_perturbation(model, x, 0, areas=[0.1], max_iter=25, generator=g,
                                          **KW2)[0]
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # None: a seed derived from the global RNG state, which is not advanced (the policy of
    # every randomised method).
    torch.manual_seed(5)
    state = torch.get_rng_state()
    d = run(None)
    assert torch.equal(state, torch.get_rng_state()) and torch.equal(d, run(None))
    torch.manual_seed(6)
    assert not torch.equal(d, run(None))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(run(g1), run(g2))
    # Without jitter nothing is random.
    nj = lambda g: extremal_perturbation(model, x, 0, areas=[0.1], max_iter=25, generator=g,
                                         jitter=False, **KW2)[0]
    assert torch.equal(nj(1), nj(2))


def test_batched_call_equals_per_image_calls():
    model = BoxScore(BOXES2, SHAPE2)
    x = image2(2, torch.float64)
    x[1] = x[1] * 0.8 + 0.1
    kw = dict(areas=[0.05, 0.15], max_iter=40, **KW2)
    masks, hist = extremal_perturbation(model, x, [0, 1], generator=5, **kw)
    m0, h0 = extremal_perturbation(model, x[:1], 0, generator=5, **kw)
    m1, h1 = extremal_perturbation(model, x[1:], [1], generator=6, **kw)
    torch.testing.assert_close(masks, torch.cat([m0, m1]), rtol=0, atol=1e-12)
    torch.testing.assert_close(hist.energy, torch.cat([h0.energy, h1.energy], 1), rtol=0,
                               atol=1e-12)
    # One seed per image, given explicitly.
    masks2, _ = extremal_perturbation(model, x, [0, 1], generator=[5, 6], **kw)
    assert torch.equal(masks, masks2)
    assert masks.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Real architectures, resize and smoothing, progress
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_torchvision_models(name, torchvision_models):
    model = torchvision_models[name]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    before = snapshot(model, x)
    masks, hist = extremal_perturbation(model, x, [3, 7], areas=[0.1, 0.3], max_iter=3,
                                        step=4, sigma=8, max_blur=6, progress=False)
    assert_same_state(before, snapshot(model, x))
    assert masks.shape == (4, 1, 64, 64) and masks.dtype == torch.float32
    assert masks.device == x.device and torch.isfinite(masks).all()
    assert masks.min() >= 0 and masks.max() <= 1
    # After three steps from the uniform start, the masks have moved and differ per image.
    assert not torch.allclose(masks[0], masks[2])
    assert torch.isfinite(hist.energy).all() and hist.energy.shape == (3, 4)


def test_resize_and_smooth():
    model = BoxScore(BOXES2, SHAPE2)
    x = image2(1)
    kw = dict(areas=[0.1], max_iter=5, **KW2)
    masks, _ = extremal_perturbation(model, x, 0, **kw)
    same, _ = extremal_perturbation(model, x, 0, resize=True, **kw)
    assert torch.equal(same, masks)
    small, _ = extremal_perturbation(model, x, 0, resize=(12, 24), **kw)  # (W, H)
    assert small.shape == (1, 1, 24, 12)
    torch.testing.assert_close(small, torch.nn.functional.interpolate(
        masks, size=(24, 12), mode="bilinear", align_corners=False))
    smooth, _ = extremal_perturbation(model, x, 0, smooth=0.05, **kw)
    torch.testing.assert_close(smooth, smooth_saliency(masks, 0.05 * 48))


def test_progress_bar_can_be_switched_on_and_off(capsys):
    model = BoxScore(BOXES2, SHAPE2)
    x = image2(1)
    threads = threading.active_count()
    extremal_perturbation(model, x, 0, areas=[0.1], max_iter=3, step=2, sigma=3,
                          progress=False)
    assert "extremal perturbation" not in capsys.readouterr().err
    extremal_perturbation(model, x, 0, areas=[0.1], max_iter=3, step=2, sigma=3,
                          progress=True)
    err = capsys.readouterr().err
    assert "extremal perturbation" in err and "/3 [" in err
    # tqdm's monitor thread is stopped again, also when the model raises.
    assert threading.active_count() == threads
    failing = BoxScore(BOXES2, SHAPE2, fail_at=2)
    before = snapshot(failing, x)
    with pytest.raises(RuntimeError, match="boom"):
        extremal_perturbation(failing, x, 0, areas=[0.1], max_iter=3, step=2, sigma=3,
                              progress=True)
    assert_same_state(before, snapshot(failing, x))


# ---------------------------------------------------------------------------------------------
# The evidence found whatever the scale of the scores (issue 8)
# ---------------------------------------------------------------------------------------------


def run_box_test(cases):
    """``cases``: (scale name, seed) pairs.  The brief's settings: fade, 5 %, 800 iterations,
    step 4, sigma 8, no jitter; everything else the defaults (the paper's settings)."""
    scales = [SCALES[name][0] for name, _ in cases]
    prob = [SCALES[name][1] for name, _ in cases]
    x = box_images([seed for _, seed in cases])
    masks, hist = extremal_perturbation(ScaledBoxLogit(scales, prob), x, 0, areas=[0.05],
                                        reward_scale="auto",
                                        perturbation="fade", max_iter=800, step=4, sigma=8,
                                        jitter=False, progress=False)
    inside = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    inside[BOX] = True
    for i, case in enumerate(cases):
        m = masks[i, 0]
        support = m > 0.5
        # Every pixel above 0.5 lies inside the box, ...
        assert not (support & ~inside).any(), (case, int((support & ~inside).sum()))
        # ... they cover the requested 5 % (205 px; a disk of σ-smooth mask this large just
        # fits the 16 px box) ...
        assert 0.045 <= float(hist.support_area[i]) <= 0.0525, (case, hist.support_area[i])
        # ... and the soft edges add at most 2.5 % of the image.
        assert float(hist.achieved_area[i]) <= 0.075, (case, hist.achieved_area[i])
        assert float(m[BOX].sum() / m.sum()) > 0.5, case
        assert float(m[RIVAL].max()) < 0.01, case
    return masks, hist


def test_box_is_found_at_every_score_scale():
    # Each scale with a different image (seed): four masks in one call.
    run_box_test([("logit x1", 0), ("logit x20", 1), ("logit x200", 2), ("softmax", 3)])


@pytest.mark.skipif(not os.environ.get("TORCHRAY_LIKE_SLOW_TESTS"),
                    reason="the full sweep (16 masks, ~10 s of CPU): TORCHRAY_LIKE_SLOW_TESTS=1")
def test_box_is_found_for_every_seed_and_score_scale():
    run_box_test([(name, seed) for name in SCALES for seed in range(4)])


# ---------------------------------------------------------------------------------------------
# The default reward on the trained embedded models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["embedded-vgg", "embedded-resnet"])
def test_default_reward_finds_the_objects_on_the_trained_embedded_models(name):
    """The paper's raw reward (the default) on trained models: the 10 % masks put more than
    twice the objects' share of the image on the explained objects, on average.  (The
    ``"auto"`` unit, calibrated on box models, let the area term win on these models.)"""
    from torchray_like.benchmark.embedded_data import EmbeddedShapes

    from .conftest import trained_embedded_model
    model = trained_embedded_model(name)
    data = EmbeddedShapes("test", size=4)
    x = torch.stack([data[i][0] for i in range(4)])
    targets = [int(data[i][1]["class_ids"][0]) for i in range(4)]
    masks, _ = extremal_perturbation(model, x, targets, areas=[0.1], max_iter=300, step=2,
                                     sigma=6.0, max_blur=5.7, progress=False, generator=0)
    on_object, share = [], []
    for i in range(4):
        obj = data[i][1]["masks"][data[i][1]["labels"] == targets[i]].any(0).float()
        on_object.append(float((masks[i, 0] * obj).sum() / masks[i, 0].sum()))
        share.append(float(obj.mean()))
    assert sum(on_object) / 4 > 2 * sum(share) / 4, (on_object, share)
    # The VGG's masks find all four objects; the ResNet's two (it misses the disc of image 1
    # and the small cross of image 2, 3.6 % of the image, at 300 iterations).
    found = 4 if name == "embedded-vgg" else 2
    assert sum(o > s for o, s in zip(on_object, share)) >= found, (on_object, share)
