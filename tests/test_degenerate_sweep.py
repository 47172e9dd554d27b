"""Degenerate models, scores and inputs, for every entry of METHODS and for ``explain``: the map
is right and the user is told when it says nothing (a :class:`DegenerateMapWarning` naming the
samples and the cause), or the call is a clear ValueError; never NaN, never silence.

The contract, by case (float32, CPU; the fast options of ``tests/test_batch_sweep.py``):

* A score that does not change through autograd — a constant head (``y * 0``), rounding, sign,
  a saturated sigmoid — gives every gradient method an all-zero map *and* a warning naming the
  samples (the driver's quick finiteness sum proves the common case non-zero for free);
  perturbation methods warn that the score never changed (occlusion's map is flat, RISE's is
  the masks' coverage, Score-CAM's / Ablation-CAM's channel weights are all equal, EP's masks
  follow the area alone).  A head with no gradient at all (``torch.where`` on constants, a
  one-hot argmax) is a ValueError for the methods that differentiate.
* Every rectifier off for one sample: the warning names that sample only, and the other
  sample's map is its single call's.
* A float16 / bfloat16 output: occlusion and Ablation-CAM warn when the rounding step of the
  score is over 1 % of the largest change (measured here: occlusion off by 22 % / 169 %);
  RISE, EP, Score-CAM and the gradient methods are within 1 % of the float32 head (no warning).
* Constant, all-zero, huge (1e6) and tiny (1e-30) images: finite maps; a one-pixel image: a
  map or a ValueError that says what to change.
* Zero and constant maps: no 0/0 anywhere (CAM family, resize, smoothing, the plot helpers).
* A non-finite score: a ValueError from every method.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Dict, List, Tuple

import matplotlib
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from tests.conftest import assert_same_state, snapshot
from tests.test_batch_sweep import GENERIC, conv_net, options
from tests.transformer_models import make_vit
from torchray_like.attribution import METHODS
from torchray_like.attribution.driver import nonzero_finite_rows
from torchray_like.attribution.explain import explain
from torchray_like.attribution.maps import (
    DegenerateMapWarning,
    check_precision,
    quiet_degenerate,
    warn_degenerate,
)
from torchray_like.attribution.registry import TRANSFORMER_ONLY_METHODS

matplotlib.use("Agg")

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = [1, 2]
#: Entries that perturb the input and compare scores (no gradient of the score).
PERTURBATION = {"occlusion", "rise", "score_cam", "ablation_cam", "extremal_perturbation"}
#: What each perturbation entry says when the score never changes.
NO_CHANGE = {"occlusion": "did not change under any occlusion",
             "rise": "same under every mask",
             "score_cam": "same for every perturbed channel",
             "ablation_cam": "same for every perturbed channel",
             "extremal_perturbation": "reward never changed"}
#: Entries that backpropagate under a rule context (the zero-gradient warning names its rules).
RULE_METHODS = {"guided_backprop", "guided_grad_cam", "deconvnet", "excitation_backprop",
                "contrastive_excitation_backprop", "attn_lrp"} | {
                    n for n in GENERIC if n.startswith("lrp")}


class Head(nn.Module):
    """``head(body(x))``: the small CNN of the batch sweep with a head on its logits."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor],
                 body: nn.Module | None = None) -> None:
        super().__init__()
        self.body = conv_net(2) if body is None else body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


FLAT_HEADS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "times_zero": lambda y: y * 0,
    "rounded": lambda y: (y * 10).round(),
    "sign": torch.sign,
    "saturated": lambda y: torch.sigmoid(1000 * y + 1000),   # exactly 1.0: gradient 0
}


def image(n: int = 2, size: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def run(name: str, model: nn.Module, x: torch.Tensor, target: Any = TARGETS,
        **extra: Any) -> Tuple[torch.Tensor, List[str]]:
    """The map (EP: its masks) and the DegenerateMapWarning messages of one call (other
    notes — small inputs, few masks — are not the point here)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = METHODS[name](model, x, target, **{**options(name, x), **extra})
    out = out[0] if isinstance(out, tuple) else out
    return out, [str(w.message) for w in caught if w.category is DegenerateMapWarning]


def zero_samples(m: torch.Tensor) -> List[bool]:
    return [bool((row == 0).all()) for row in m]


# ---------------------------------------------------------------------------------------------
# A score that does not change through autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", sorted(FLAT_HEADS))
@pytest.mark.parametrize("name", GENERIC)
def test_flat_score_warns_with_the_samples(name, head):
    model, x = Head(FLAT_HEADS[head]), image()
    before = snapshot(model, x)
    if name == "ablation_cam" and head == "times_zero":  # the relative drop is 0 / 0
        with pytest.raises(ValueError, match=r"score is exactly 0 for sample\(s\) \[0, 1\]"):
            run(name, model, x)
        return
    m, said = run(name, model, x)
    assert_same_state(before, snapshot(model, x))
    assert m.shape[:2] == (2, 1) and bool(torch.isfinite(m).all())
    if name == "eigen_cam":  # the activations' principal component: no score involved
        assert said == [] and not any(zero_samples(m))
        return
    assert said, f"{name} gave {'zero' if not m.any() else 'a'} map and no warning"
    text = said[-1]
    if name in PERTURBATION:
        # Rounding may still flip under some perturbation (a score on a rounding boundary).
        assert NO_CHANGE[name] in text
        assert "sample(s) [0, 1]" in text or (head == "rounded" and "sample(s) [" in text)
        if name in ("occlusion", "ablation_cam"):   # flat maps (occlusion: rounding at most)
            assert m.flatten(1).std(1).max().item() < 1e-6
        return
    assert zero_samples(m) == [True, True]
    assert "exactly zero" in text and "sample(s) [0, 1]" in text
    assert "rounding" in text and "perturbation method" in text
    assert ("rules let no signal" in text) == (name in RULE_METHODS)


@pytest.mark.parametrize("head", ["where", "one_hot_argmax"])
@pytest.mark.parametrize("name", GENERIC)
def test_a_head_without_gradient_is_refused_or_warned(name, head):
    """No graph to the output at all: the differentiating entries refuse it (naming autograd),
    the forward-only ones warn that the score never changed (Ablation-CAM: a one-hot score of
    0 for the target is the 0 / 0 refusal)."""
    fn = {"where": lambda y: torch.where(y > 0, torch.ones_like(y), -torch.ones_like(y)),
          "one_hot_argmax": lambda y: F.one_hot(y.argmax(1), 4).float()}[head]
    model, x = Head(fn), image()
    if name in PERTURBATION - {"extremal_perturbation"}:
        if name == "ablation_cam" and head == "one_hot_argmax":
            with pytest.raises(ValueError, match="exactly 0"):
                run(name, model, x)
            return
        _, said = run(name, model, x)
        assert said and NO_CHANGE[name] in said[-1]
        return
    with pytest.raises(ValueError, match="through autograd"):
        run(name, model, x)


def dead_net() -> nn.Module:
    """The small CNN with positive first filters and bias -20: every rectifier of an image in
    [0, 1] is off, an image in [0, 100] keeps some on."""
    net = conv_net(2)
    with torch.no_grad():
        net[0].weight.abs_()
        net[0].bias.fill_(-20.0)
    return net


#: Entries whose map of a dead sample is not zero by definition: DeConvNet passes the signal
#: through a rectifier by its own sign; EP's / RISE's / Score-CAM's maps are mask statistics.
NOT_ZERO_WHEN_DEAD = {"deconvnet", "rise", "score_cam", "extremal_perturbation", "occlusion"}
#: Layer methods whose zero map comes from the zero activation (the gradient at the layer is
#: not zero): the engine's dead-layer warning names the sample (Ablation-CAM says its channel
#: weights are all equal).
ZERO_ACTIVATION = {"grad_cam", "grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam",
                   "eigen_cam", "ablation_cam"}


@pytest.mark.parametrize("name", GENERIC)
def test_every_rectifier_off_for_one_sample(name):
    net, x = dead_net(), image()
    x[0] *= 100
    m, said = run(name, net, x)
    assert bool(torch.isfinite(m).all())
    if name in ZERO_ACTIVATION - {"ablation_cam"}:
        assert zero_samples(m) == [False, True]
        assert len(said) == 1 and "the same at every position for sample(s) [1] (" in said[0]
        return
    if name in NOT_ZERO_WHEN_DEAD | ZERO_ACTIVATION:
        if name in NO_CHANGE and name != "ablation_cam":
            assert said and "sample(s) [1]" in said[-1]
        return
    assert zero_samples(m) == [False, True]
    assert said and all("sample(s) [1]" in s and "[0" not in s for s in said), said
    alone, said_alone = run(name, net, x[:1], TARGETS[:1])
    assert said_alone == []
    torch.testing.assert_close(m[:1], alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())


def test_smooth_grad_names_the_callers_samples_not_the_copies():
    net, x = dead_net(), image(3)
    x[0] *= 100
    x[2] *= 100
    _, said = run("smooth_grad", net, x, [1, 2, 3])
    assert len(said) == 1 and said[0].startswith("smooth_grad: the map of sample(s) [1] ")


def test_smooth_grad_passes_on_what_its_method_said():
    """A note that is not about a zero map (occlusion's float16 rounding) reaches the user
    once, saying that its rows are noisy copies."""
    body, x = conv_net(2), image()
    _, said = run("smooth_grad", Head(lambda y: y.half(), body), x, method="occlusion",
                  window=3, stride=2)
    assert len(said) == 1
    assert said[0].startswith("smooth_grad: occlusion said of a batch of noisy copies (row r a "
                              "copy of image r mod 2): occlusion: the model's output is "
                              "torch.float16")


def test_integrated_gradients_input_equal_to_baseline():
    x = image()
    x[1] = 0.0
    m, said = run("integrated_gradients", conv_net(2), x)
    assert zero_samples(m) == [False, True]
    assert len(said) == 1 and "equals the baseline" in said[0] and "sample(s) [1]" in said[0]
    _, said = run("integrated_gradients", conv_net(2), x, baseline=0.5)
    assert said == []


def test_a_gradient_summing_to_zero_is_not_called_zero():
    """The quick check is a sum per sample: a gradient that cancels goes to the exact check,
    which finds it non-zero; tiny sums (whose product would underflow) pass the quick check."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -1.0, 2.0, -2.0], [1e-30, 1e-30, 0, 0]]))
    x = torch.rand(64, 1, 2, 2)
    grad = model[1].weight[1].expand(64, 4).reshape(64, 1, 2, 2)
    assert nonzero_finite_rows(grad, 64)  # 2e-30 each (their product underflows)
    assert nonzero_finite_rows(torch.full((64, 3, 8, 8), 1e-8), 64)
    for target in (0, 1):
        m, said = run("gradient", model, x, target)
        assert said == [] and not any(zero_samples(m))


def test_quick_check_finds_every_zero_and_non_finite_row():
    g = torch.randn(3, 2, 4, 4)
    assert nonzero_finite_rows(g, 3) and nonzero_finite_rows(g[:1], 1)
    for bad in (0.0, float("nan"), float("inf")):
        h = g.clone()
        h[1] = bad
        assert not nonzero_finite_rows(h, 3)
    assert not nonzero_finite_rows(g.to(torch.int64), 3)
    cl = g.to(memory_format=torch.channels_last)
    assert nonzero_finite_rows(cl, 3)


def test_quiet_degenerate_is_per_thread_and_collects():
    heard_elsewhere: List[List[str]] = []

    def other() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_degenerate("from the other thread")
        heard_elsewhere.append([str(w.message) for w in caught])

    with quiet_degenerate() as heard, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_degenerate("inside")
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert heard == ["inside"] and caught == []
    assert heard_elsewhere == [["from the other thread"]]


# ---------------------------------------------------------------------------------------------
# Reduced-precision heads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["occlusion", "ablation_cam", "score_cam", "rise",
                                  "extremal_perturbation", "gradient", "grad_cam",
                                  "integrated_gradients"])
def test_reduced_precision_head(name, dtype):
    """Occlusion and Ablation-CAM compare scores whose differences fall under the output's
    precision: they warn, naming the dtype and the error bound.  The others stay within 1 %
    of the float32 head (measured), and say nothing."""
    body, x = conv_net(2), image()
    ref, said32 = run(name, Head(lambda y: y, body), x)
    m, said = run(name, Head(lambda y: y.to(dtype), body), x)
    assert said32 == [] and m.dtype == ref.dtype and bool(torch.isfinite(m).all())
    scale = ref.abs().amax((1, 2, 3))
    err = ((m - ref).abs().amax((1, 2, 3)) / scale.clamp_min(1e-30))[scale > 0]
    if name in ("occlusion", "ablation_cam"):
        assert said and str(dtype) in said[-1] and "quantised" in said[-1]
        assert "model.float()" in said[-1]
        assert err.max().item() > 0.005   # the warning is not a false alarm
    else:
        assert said == [] and err.max().item() < 0.01


def test_precision_check_numbers():
    """The rounding step at a score ``s`` is ``eps · 2^⌊log2 |s|⌋``: a float16 score of 0.26
    rounds in steps of 2^-12 · 2^-2 … and a change under 100 steps is flagged."""
    scores = torch.tensor([0.26, 0.26])
    changes = torch.tensor([[0.0, 0.01], [0.0, 1.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_precision("occlusion", torch.float16, scores, changes)
        check_precision("occlusion", torch.float32, scores, changes * 0)
    assert len(caught) == 1 and "sample(s) [0]" in str(caught[0].message)
    assert "steps of 0.00024" in str(caught[0].message)
    # a score of exactly 0: the step is that of the perturbed scores (before: eps / 2 = 4.9e-4,
    # which flagged a change of 0.01 rounded in steps of 7.6e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_precision("occlusion", torch.float16, torch.tensor([0.0, 0.0]),
                        torch.tensor([[0.0, 0.01], [0.0, 1e-6]]))  # subnormal: 6e-8 steps
    assert len(caught) == 1 and "sample(s) [1]" in str(caught[0].message)


# ---------------------------------------------------------------------------------------------
# Degenerate inputs
# ---------------------------------------------------------------------------------------------

INPUTS: Dict[str, Callable[[], torch.Tensor]] = {
    "constant": lambda: torch.full((2, 3, 12, 12), 0.5),
    "zeros": lambda: torch.zeros(2, 3, 12, 12),
    "huge": lambda: 1e6 * image(),
    "tiny": lambda: 1e-30 * image(),
}


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("name", GENERIC)
def test_degenerate_inputs_give_finite_maps(name, kind):
    model, x = conv_net(2), INPUTS[kind]()
    before = snapshot(model, x)
    m, said = run(name, model, x)
    assert_same_state(before, snapshot(model, x))
    assert m.shape[:2] == (2, 1) and bool(torch.isfinite(m).all())
    # A zero map is either zero by definition (gradient × input, z⁺ LRP, IG of the input equal
    # to the baseline: x = 0) or comes with a warning.
    by_definition = kind == "zeros" and name in {
        "gradient_x_input", "linear_approx", "lrp_epsilon_plus", "lrp_epsilon_alpha2_beta1",
        "attn_lrp", "grad_cam", "grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam",
        "guided_grad_cam"}
    if any(zero_samples(m)) and not by_definition and name not in ZERO_ACTIVATION:
        assert said, f"{name}: zero map of a {kind} image without a warning"


@pytest.mark.parametrize("name", GENERIC)
def test_one_pixel_image(name):
    """A 1×1 image: a map of that size, or a ValueError saying what to change (no layer
    with a spatial map to read, a window larger than the image)."""
    model, x = conv_net(2), image(size=1)
    try:
        m, _ = run(name, model, x)
    except ValueError as error:
        assert any(s in str(error) for s in ("saliency_layer", "window")), str(error)
        return
    assert m.shape == (2, 1, 1, 1) and bool(torch.isfinite(m).all())


@pytest.mark.parametrize("name", GENERIC)
def test_non_finite_score_is_refused(name):
    """A head that divides by zero for every sample: a ValueError naming non-finite scores
    (RISE, occlusion, Score-CAM, Ablation-CAM, EP and every gradient method)."""
    model, x = Head(lambda y: y / (y - y)), image()
    with pytest.raises(ValueError, match=r"(?i)not finite|non-finite"):
        run(name, model, x)


# ---------------------------------------------------------------------------------------------
# Zero and constant maps: no 0 / 0 in any normalisation
# ---------------------------------------------------------------------------------------------

CAMS = ["grad_cam", "grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam", "score_cam",
        "ablation_cam", "guided_grad_cam"]


def negative_evidence_net() -> nn.Module:
    """A CNN whose last convolution's rectified channels all lower class 0: every channel
    weight of class 0 is negative, so ReLU(Σ w_k A_k) is 0 everywhere."""
    net = conv_net(2)
    with torch.no_grad():
        net[6].weight[0] = -net[6].weight[0].abs() - 0.1
    return net


@pytest.mark.parametrize("options_", [{}, {"resize": True}, {"resize": True, "smooth": 0.1}])
@pytest.mark.parametrize("name", CAMS)
def test_cam_with_only_negative_evidence(name, options_):
    m, said = run(name, negative_evidence_net(), image(), [0, 0], **options_)
    assert bool(torch.isfinite(m).all()) and bool((m >= 0).all())
    if name not in ("score_cam", "ablation_cam"):  # their weights are score changes
        assert zero_samples(m) == [True, True]
    if name == "guided_grad_cam":  # guided backprop passes no negative signal: zero at the input
        assert len(said) == 1 and "GuidedBackpropContext's rules let no signal through" in said[0]
    else:
        assert said == []   # the right map: no region raises the score (documented)


def test_plot_helpers_with_zero_and_constant_maps(tmp_path):
    from torchray_like.benchmark.plot import plot_example
    from torchray_like.utils import imsc
    from torchray_like.visualize import overlay, plot_methods, saliency_plot
    x = image(1)
    for smap in (torch.zeros(1, 1, 12, 12), torch.full((1, 1, 12, 12), 0.3)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            saliency_plot(x, smap, save=tmp_path / "a.png")
            plot_methods(x, {"a": smap, "b": smap}, save=tmp_path / "b.png")
            blend = overlay(x[0], smap[0])
            plot_example(x, smap, "gradient", 1, save_path=str(tmp_path / "c.png"))
            shown = imsc(smap[0], quiet=True)
        assert bool(torch.isfinite(torch.as_tensor(blend)).all())
        assert bool(torch.isfinite(shown[0]).all())
        texts = " ".join(str(w.message) for w in caught)
        assert ("all zero" in texts) if not smap.any() else ("constant" in texts)


# ---------------------------------------------------------------------------------------------
# explain and the transformer entries
# ---------------------------------------------------------------------------------------------


def test_explain_warns_like_the_single_methods():
    model, x = Head(FLAT_HEADS["rounded"]), image()
    names = ["gradient", "grad_cam", "guided_backprop", "lrp", "occlusion"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = explain(model, x, TARGETS, names,
                       {"occlusion": options("occlusion", x)})
    said = [str(w.message) for w in caught if w.category is DegenerateMapWarning]
    assert all(not m.any() for m in maps.values())
    assert any("saliency_layer" in s for s in said) and any("the input" in s for s in said)
    assert any(s.startswith("occlusion:") for s in said)


def test_a_layer_that_sees_nothing_of_the_image_is_named():
    """Every ReLU before the layer off for one sample: its output is each channel's bias, so
    a CAM of it is constant — zero (negative bias) or not (positive bias) — and says nothing;
    ``explain`` warns per method as the single calls do, naming that sample only.  A 1x1
    layer (one position) and the input are never called constant."""
    x = image()
    x[0] *= 100
    for bias in (-0.5, 0.5):
        net = dead_net()
        with torch.no_grad():
            net[2].bias.fill_(bias)
        for name in ("grad_cam", "layer_cam", "eigen_cam"):
            m, said = run(name, net, x, saliency_layer="3")
            assert bool((m[1] == m[1].flatten()[0]).all()) and not bool(
                (m[0] == m[0].flatten()[0]).all())
            assert len(said) == 1 and "saliency_layer '3' is the same at every position for " \
                "sample(s) [1] (" in said[0] and said[0].startswith(f"{name}:")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            explain(net, x, TARGETS, ["grad_cam", "linear_approx", "gradient"],
                    {"grad_cam": {"saliency_layer": "3"},
                     "linear_approx": {"saliency_layer": "3"}})
        said = sorted(str(w.message)[:14] for w in caught if w.category is DegenerateMapWarning)
        # gradient: its own zero-gradient warning (the input's gradient is zero there too)
        assert said == ["grad_cam: the ", "gradient: the ",
                        *(["linear_approx:"] if bias < 0 else [])], said
    # the zero-gradient warning names the methods that read the input under each rule
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explain(dead_net(), x, TARGETS, ["gradient", "gradient_x_input", "guided_backprop"])
    said = sorted(str(w.message).split(": the (pseudo")[0] for w in caught
                  if w.category is DegenerateMapWarning)
    assert said == ["gradient, gradient_x_input", "guided_backprop"], said
    pooled = nn.Sequential(dead_net()[:4], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    _, said = run("grad_cam", pooled, x, saliency_layer="1")   # (N, 6, 1, 1): no positions
    assert said == []


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return make_vit()


@pytest.mark.parametrize("name", sorted(TRANSFORMER_ONLY_METHODS))
def test_transformer_entries_on_a_rounded_head(name, vit):
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = METHODS[name](Head(FLAT_HEADS["rounded"], vit), x, TARGETS)
    said = [str(w.message) for w in caught if w.category is DegenerateMapWarning]
    assert bool(torch.isfinite(m).all())
    if name in ("attention_rollout", "attention_flow"):   # the attention alone
        assert said == [] and m.any()
    else:
        assert zero_samples(m) == [True, True] and said and "sample(s) [0, 1]" in said[-1]


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("name", sorted(TRANSFORMER_ONLY_METHODS))
def test_transformer_entries_on_degenerate_inputs(name, kind, vit):
    x = F.interpolate(INPUTS[kind](), size=(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agnostic = name in ("attention_rollout", "attention_flow")
        m = METHODS[name](vit, x, None if agnostic else TARGETS)
    assert m.shape[:2] == (2, 1) and bool(torch.isfinite(m).all())


def test_patch_tokens_a_class_token_head_does_not_read_are_warned_about():
    """After a ViT's last attention, a class-token head reads only its own token: Grad-CAM at
    the final LayerNorm is all zeros although the layer's gradient is not (the class token's
    row), and says so; the automatic layer (the last block whose patch tokens the head reads)
    gives a map and no warning."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1,
                                               num_heads=2, hidden_dim=16, mlp_dim=32,
                                               num_classes=3).eval()
    nn.init.normal_(vit.heads.head.weight)  # (torchvision starts the head at zero)
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(DegenerateMapWarning, match=r"saliency_layer 'encoder.ln': the target "
                      r"score reads nothing of its patch tokens for sample\(s\) \[0, 1\]"):
        smap = METHODS["grad_cam"](vit, x, 1, saliency_layer="encoder.ln")
    assert smap.shape == (2, 1, 4, 4) and not smap.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateMapWarning)
        assert METHODS["grad_cam"](vit, x, 1).abs().sum() > 0
