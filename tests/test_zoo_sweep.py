"""Architecture sweep: the backpropagation and CAM methods over the torchvision model zoo beyond
the five architectures the other tests use (``zoo_models.ZOO``: MobileNet-v3 (Hardswish,
Hardsigmoid, squeeze-excitation), EfficientNet (SiLU, SE, stochastic depth), ConvNeXt
(LayerNorm, GELU, layer scale, channels-last blocks), RegNet, ShuffleNet-v2 (channel shuffle),
a ResNeXt toy (grouped convolutions), GoogLeNet / Inception-v3 (auxiliary heads,
``transform_input``, concatenation), MnasNet, a Wide-ResNet toy, AlexNet).

Each (model, method) gives one of: a map of the documented shape with finite values, checked
by hand where the method's math allows (plain autograd with forward hooks, the reference
rectifier rules of ``conftest``); a warning naming the construct the rule does not cover; or a
``ValueError`` saying what to do.  Every call leaves the model's state as it found it.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List

import pytest
import torch

from torchray_like.attribution.context import UnhandledActivationWarning
from torchray_like.attribution.explain import explain
from torchray_like.attribution.layer_choice import find_saliency_layer
from torchray_like.attribution.lrp import lrp_conservation
from torchray_like.attribution.registry import METHODS

from .conftest import (
    RefDeconvReLU,
    RefGuidedReLU,
    assert_same_state,
    hook_reference,
    reference_map,
    snapshot,
)
from .zoo_models import LRP_UNCOVERED, NONLINEARITIES, ZOO, BiasFreeShuffleNet, zoo_input

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = [1, 3]

INPUT_METHODS = ("gradient", "guided_backprop", "deconvnet", "excitation_backprop",
                 "contrastive_excitation_backprop", "lrp", "lrp_epsilon_gamma_box",
                 "gradient_x_input", "integrated_gradients", "smooth_grad")
LAYER_METHODS = ("linear_approx", "grad_cam", "grad_cam_plus_plus", "layer_cam", "score_cam")
# One midpoint step: integrated gradients is then x · ∇f(x / 2) (zero baseline), by hand.
OPTIONS: Dict[str, Dict[str, Any]] = {"integrated_gradients": {"n_steps": 1,
                                                               "rule": "riemann_middle"},
                                      "score_cam": {"batch_size": 64}}

_BUILT: Dict[str, torch.nn.Module] = {}


def zoo_model(name: str) -> torch.nn.Module:
    """Each model built once per session (building ConvNeXt / Inception costs a second)."""
    if name not in _BUILT:
        _BUILT[name] = ZOO[name][0]()
    return _BUILT[name]


def run(model: torch.nn.Module, x: torch.Tensor, method: str, **kwargs: Any) -> Any:
    """Call ``METHODS[method]`` recording warnings; assert the state comes back."""
    before = snapshot(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out: Any = METHODS[method](model, x, TARGET[:x.shape[0]],
                                       **OPTIONS.get(method, {}), **kwargs)
        except ValueError as exc:
            out = exc
    assert_same_state(before, snapshot(model, x))
    return out, [w for w in caught if issubclass(w.category, UnhandledActivationWarning)]


def unhandled_text(caught: List[warnings.WarningMessage]) -> str:
    return " | ".join(str(w.message) for w in caught)


def assert_map(out: Any, shape: tuple) -> None:
    assert isinstance(out, torch.Tensor), out
    assert out.shape == shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("method", INPUT_METHODS)
@pytest.mark.parametrize("name", list(ZOO))
def test_input_methods(name: str, method: str) -> None:
    model, side = zoo_model(name), ZOO[name][1]
    x = zoo_input(side)
    # SmoothGrad with a given bank of two noisy copies: the mean of their gradient maps.
    noise = 0.1 * torch.randn((2,) + x.shape, generator=torch.Generator().manual_seed(1))
    out, caught = run(model, x, method, **({"noise": noise} if method == "smooth_grad" else {}))
    relu, others = NONLINEARITIES.get(name, (True, ()))
    if method in ("guided_backprop", "deconvnet"):
        if not relu:  # nothing the rule could replace: refused, naming what the model uses
            assert isinstance(out, ValueError)
            assert "needs a model that uses ReLU" in str(out)
            assert all(a in str(out) for a in others), str(out)
            return
        assert_map(out, (2, 1, side, side))
        if others:  # the rule mixed with plain gradients: said, naming each activation
            assert all(a in unhandled_text(caught) for a in others), unhandled_text(caught)
        else:
            ref = RefGuidedReLU if method == "guided_backprop" else RefDeconvReLU
            assert not caught
            torch.testing.assert_close(out, reference_map(model, x, TARGET, ref),
                                       rtol=1e-4, atol=1e-6)
        return
    assert_map(out, (2, 1, side, side))
    if method.startswith("lrp"):
        names = LRP_UNCOVERED.get(name, ())
        assert all(a in unhandled_text(caught) for a in names), unhandled_text(caught)
        assert bool(caught) == bool(names), unhandled_text(caught)
    elif "excitation" in method:
        assert all(a in unhandled_text(caught) for a in others), unhandled_text(caught)
        if name in LRP_UNCOVERED:  # SE products, layer norm: named as unmodelled operations
            assert any("does not model" in str(w.message) for w in caught)
        else:
            assert not caught, unhandled_text(caught)
    else:  # no rule: nothing to warn about
        assert not caught, unhandled_text(caught)
    if method in ("gradient", "gradient_x_input", "integrated_gradients", "smooth_grad"):
        torch.testing.assert_close(out, hand_map(model, x, method, noise), rtol=1e-4,
                                   atol=1e-7)


def plain_gradient(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    xx = x.clone().requires_grad_(True)
    y = model(xx)
    (g,) = torch.autograd.grad(y[torch.arange(x.shape[0]), TARGET].sum(), xx)
    return g


def hand_map(model: torch.nn.Module, x: torch.Tensor, method: str,
             noise: torch.Tensor) -> torch.Tensor:
    """The map of a rule-free input method with plain autograd."""
    if method == "gradient":
        return plain_gradient(model, x).abs().amax(1, keepdim=True)
    if method == "gradient_x_input":
        return (plain_gradient(model, x) * x).sum(1, keepdim=True)
    if method == "integrated_gradients":
        return (plain_gradient(model, x / 2) * x).sum(1, keepdim=True)
    return torch.stack([plain_gradient(model, x + n).abs().amax(1, keepdim=True)
                        for n in noise]).mean(0)


def layer_reference(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if method == "linear_approx":
        return (a * g).sum(1, keepdim=True)
    if method == "grad_cam":
        weights = g.mean(tuple(range(2, g.dim())), keepdim=True)
        return (weights * a).sum(1, keepdim=True).clamp(min=0)
    return (g.clamp(min=0) * a).sum(1, keepdim=True).clamp(min=0)  # layer_cam


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("name", list(ZOO))
def test_layer_methods(name: str, method: str) -> None:
    """At the automatic layer, the map equals the hand computation from a bare forward hook
    (Grad-CAM, Layer-CAM, the linear approximation given that layer); Grad-CAM++ and Score-CAM
    (one image: it costs a forward pass a channel) give non-negative finite maps on the same
    grid."""
    if name in ("wide_resnet_toy", "resnext_toy") and method == "score_cam":
        pytest.skip("2048 channels at layer4: 2048 forward passes (4-15 s); Score-CAM reads "
                    "the layer as Grad-CAM does, which this sweep checks on the same model")
    model, side = zoo_model(name), ZOO[name][1]
    x = zoo_input(side, n=1 if method == "score_cam" else 2)
    layer = find_saliency_layer(model, x)
    a, g = hook_reference(model, x, torch.tensor(TARGET[:x.shape[0]]), layer)
    assert a.dim() == 4 and a.shape[1] > 1, (layer, a.shape)  # a real (N, C, h, w) map
    # The linear approximation reads the input by default: it is given the layer.
    out, caught = run(model, x, method, **({"saliency_layer": layer}
                                           if method == "linear_approx" else {}))
    assert not caught, unhandled_text(caught)
    assert_map(out, (x.shape[0], 1) + tuple(a.shape[2:]))
    if method in ("grad_cam_plus_plus", "score_cam"):
        assert bool((out >= 0).all())
    else:
        torch.testing.assert_close(out, layer_reference(method, a, g), rtol=1e-4, atol=1e-6)


def test_channels_last_blocks_are_not_chosen_as_maps() -> None:
    """ConvNeXt at 32² ends in a 1×1 map; its blocks compute in (N, 1, 1, C) between two
    permutes.  Before: the automatic layer was ``features.7.2.block.5`` (a channels-last linear
    layer) and Grad-CAM returned a (2, 1, 1, 768) "map" over channels.  Now: the last
    (N, C, h, w) map with more than one position, the stage-3 downsampling's LayerNorm2d; at 64²
    (2×2 final map) still ``features``."""
    model = zoo_model("convnext_tiny")
    assert find_saliency_layer(model, zoo_input(32)) == "features.6.0"  # (2, 384, 2, 2)
    assert find_saliency_layer(model, zoo_input(64, n=1)) == "features"
    smap = METHODS["grad_cam"](model, zoo_input(32), TARGET)
    assert smap.shape == (2, 1, 2, 2)


@pytest.mark.parametrize("name, side, layer", [
    ("inception_v3", 75, "Mixed_6e"),       # was "Mixed_7a.branch7x7x3_3" (one branch)
    ("resnext_toy", 32, "layer3"),          # was "layer4.0.bn1" (the shortcut goes around)
    ("wide_resnet_toy", 32, "layer3"),      # the same
    ("regnet_x_400mf", 32, "trunk_output.block3"),  # was "...block4-0.f.a"
    ("shufflenet_v2_x0_5", 32, "stage3"),   # was "stage4.0.branch2.2" (branch1 goes around)
    # Unchanged where the layer inside the strided block is a cut (no shortcut around it):
    ("mobilenet_v3_small", 32, "features.9.block.0"),
    ("efficientnet_b0", 32, "features.6.0.block.0"),
    ("mnasnet0_5", 32, "layers.12.0.layers.2"),
    ("googlenet", 32, "inception4e"),
])
def test_small_inputs_choose_a_layer_every_path_passes_through(name, side, layer) -> None:
    """When the last stage's map has one position (CIFAR-sized inputs), the automatic layer is
    the last map with several positions — but not one inside a block whose parallel paths
    (a strided shortcut, Inception's branches, ShuffleNet's two branches) meet at that single
    position: Grad-CAM there explained one path of the block and silently left out the others.
    The choice is a cut: contrastive excitation backprop, which refuses contrast layers that
    are not, accepts it."""
    model, x = zoo_model(name), zoo_input(side)
    assert find_saliency_layer(model, x) == layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SiLU, SE products ... (checked above)
        out = METHODS["contrastive_excitation_backprop"](model, x, TARGET, contrast_layer=layer)
    assert_map(out, (2, 1, side, side))


def test_training_mode_model_is_explained_in_eval_mode_and_restored() -> None:
    """GoogLeNet in training mode returns a named tuple with its auxiliary heads; the methods
    run it in eval mode (one logits tensor, the same map) and give the flags back."""
    model, side = zoo_model("googlenet"), ZOO["googlenet"][1]
    x = zoo_input(side)
    expected = METHODS["gradient"](model, x, TARGET)
    model.train()
    try:
        before = snapshot(model, x)
        for method in ("gradient", "grad_cam", "lrp"):
            out = METHODS[method](model, x, TARGET)
            assert bool(torch.isfinite(out).all())
        assert_same_state(before, snapshot(model, x))
        torch.testing.assert_close(METHODS["gradient"](model, x, TARGET), expected)
    finally:
        model.eval()


def test_lrp_conserves_relevance_through_grouped_conv_shuffle_and_concat() -> None:
    """Bias-free, every operation covered (grouped convolution, channel shuffle, concatenation,
    residual sum, max / average pooling): the relevance sums to the target score at the input
    and at the stem, which every path passes (ε = 1e-6 of the composite absorbs next to
    nothing)."""
    model = BiasFreeShuffleNet().eval()
    x = zoo_input(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnhandledActivationWarning)
        sums = lrp_conservation(model, x, TARGET, layers=("stem",),
                                composite="EpsilonPlus")
    assert bool((sums["score"].abs() > 1e-3).all())
    for key in ("input", "stem"):
        torch.testing.assert_close(sums[key], sums["score"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name, method, named, not_named", [
    # EfficientNet's SiLU / sigmoid all lie below "features"; its head is pooling + linear.
    ("efficientnet_b0", "excitation_backprop", (), ("silu", "sigmoid")),
    ("efficientnet_b0", "lrp", ("mul of two activations",), ("silu", "sigmoid")),
    # MobileNet-v3's head calls Hardswish (above "features"), its SE blocks Hardsigmoid.
    ("mobilenet_v3_small", "excitation_backprop", ("hardswish",), ("hardsigmoid",)),
    ("mobilenet_v3_small", "lrp", ("hardswish",), ("hardsigmoid",)),
    # ConvNeXt's head has a LayerNorm2d (above "features"), its blocks GELU.
    ("convnext_tiny", "lrp", ("layer_norm",), ("gelu",)),
])
def test_warnings_name_only_what_lies_above_the_layer_read(name, method, named, not_named):
    """Read at ``features``, the map does not depend on the non-linearities below it.  Before:
    the warning named every one the forward pass called (EfficientNet: "sigmoid ×16, silu ×49
    ... keep their plain gradient" for a map no SiLU touches).  Now only those on the path from
    the output to the layer; at the input, all of them still.  (The product of an SE block is
    no node kind of its own, so LRP still names it: a warning too many, never one too few.)"""
    model = zoo_model(name)
    x = zoo_input(ZOO[name][1])
    _, caught = run(model, x, method, saliency_layer="features")
    text = unhandled_text(caught)
    assert all(a in text for a in named) and not any(a in text for a in not_named), text
    assert bool(named) == any(w.category is UnhandledActivationWarning for w in caught), text
    _, caught = run(model, x, method)
    text = unhandled_text(caught)
    assert all(a in text for a in named + not_named), text


def test_a_pass_reading_the_input_and_a_layer_names_what_lies_between_them() -> None:
    """The paths from the output pass through the layer read on their way to the input:
    the non-linearities below the layer still shape the input's map and stay named — in
    ``explain``'s shared pass (guided backprop at the input, Grad-CAM at ``features``) and in
    contrastive excitation backprop (the contrast layer, then the input; checked on every
    model by ``test_input_methods``)."""
    model = zoo_model("mobilenet_v3_small")
    x = zoo_input(ZOO["mobilenet_v3_small"][1])
    before = snapshot(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = explain(model, x, TARGET, {"gb": "guided_backprop", "gc": "grad_cam"},
                       {"gc": {"saliency_layer": "features"}})
    assert_same_state(before, snapshot(model, x))
    text = unhandled_text([w for w in caught
                           if issubclass(w.category, UnhandledActivationWarning)])
    assert "hardsigmoid" in text and "hardswish" in text, text
    assert maps["gb"].shape == (2, 1, 64, 64) and maps["gc"].shape == (2, 1, 2, 2)


def test_excitation_refusal_reads_as_english() -> None:
    """A contrast layer with nothing to replace above it is refused by name; the message said
    "residual-sum call call(s)" (the context's ``replaces`` ended in "call")."""
    model, x = zoo_model("efficientnet_b0"), zoo_input(64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnhandledActivationWarning)
        with pytest.raises(ValueError, match=r"residual-sum call\(s\) in EfficientNet's") as exc:
            METHODS["contrastive_excitation_backprop"](model, x, TARGET, saliency_layer="features",
                                                       contrast_layer="classifier")
    assert "call call" not in str(exc.value) and "'classifier'" in str(exc.value)
