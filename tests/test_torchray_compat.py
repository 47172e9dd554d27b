"""TorchRay's documented usage, run against torchray_like after renaming the import.

Each test follows a usage pattern described in TorchRay's documentation (the ``with`` blocks of
the backpropagation methods, ``Probe``, the one-call functions with positional arguments, the
manual variants with ``Probe`` and the ``gradient_to_*`` functions) and checks the numbers
against an independent computation: plain autograd on a hand-written reference rule, bare
PyTorch hooks, or closed forms.  The deliberate differences are tested as documented in
``docs/torchray.rst``.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from torchray_like.attribution.common import (
    NullContext,
    Patch,
    Probe,
    ReLUContext,
    SaliencyDebug,
    Shape,
    TorchRayDifferenceWarning,
    attach_debug_probes,
    get_backward_gradient,
    get_module,
    get_pointing_gradient,
    gradient_to_saliency,
    resize_saliency,
    saliency,
)
from torchray_like.attribution.deconvnet import DeConvNetContext, DeConvNetReLU, deconvnet
from torchray_like.attribution.excitation_backprop import (
    ExcitationBackpropContext,
    contrastive_excitation_backprop,
)
from torchray_like.attribution.grad_cam import grad_cam, gradient_to_grad_cam_saliency
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import (
    GuidedBackpropContext,
    GuidedBackpropReLU,
    guided_backprop,
)
from torchray_like.attribution.linear_approx import (
    gradient_to_linear_approx_saliency,
    linear_approx,
)

from .conftest import RefDeconvReLU, RefGuidedReLU, hook_reference, patched_functional


class SmallVGG(nn.Module):
    """VGG-like: ``features`` (conv, in-place ReLU, pool, conv, ReLU) then ``classifier``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 6, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def model_and_input(n: int = 1):
    model = SmallVGG().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 8, 12, generator=g, dtype=torch.float64)  # H = 8, W = 12
    return model, x


def reference_input_gradient(model, x, category, rule=None):
    """∂y_c/∂x with plain autograd; ``rule`` swaps every F.relu for a hand-written Function."""
    xx = x.detach().clone().requires_grad_(True)
    ctx = patched_functional(rule) if rule is not None else warnings.catch_warnings()
    with ctx:
        y = model(xx)
    (g,) = torch.autograd.grad(y[:, category].sum(), xx)
    return g


# ---------------------------------------------------------------------------------------------
# Signatures: TorchRay's positional order and defaults
# ---------------------------------------------------------------------------------------------

BACKPROP = ["model", "input", "target", "saliency_layer", "resize", "resize_mode", "smooth",
            "context_builder", "gradient_to_saliency", "get_backward_gradient", "debug"]


def params(fn):
    return list(inspect.signature(fn).parameters.values())


@pytest.mark.parametrize("fn,context,flatten", [
    (saliency, NullContext, gradient_to_saliency),
    (gradient, NullContext, gradient_to_saliency),
    (guided_backprop, GuidedBackpropContext, gradient_to_saliency),
    (deconvnet, DeConvNetContext, gradient_to_saliency),
    (grad_cam, NullContext, gradient_to_grad_cam_saliency),
    (linear_approx, NullContext, gradient_to_linear_approx_saliency),
])
def test_method_signatures_follow_torchray(fn, context, flatten):
    # TorchRay's parameters, in its order; our keyword-only extras (tokens=) come after them.
    ps = [p for p in params(fn) if p.kind is not p.KEYWORD_ONLY]
    assert [p.name for p in params(fn)][len(ps):] == ["tokens"]
    assert [p.name for p in ps] == BACKPROP
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in ps)
    defaults = {p.name: p.default for p in ps}
    assert defaults["resize"] is False and defaults["resize_mode"] == "bilinear"
    assert defaults["smooth"] == 0 and defaults["debug"] is False
    assert defaults["context_builder"] is context
    assert defaults["gradient_to_saliency"] is flatten
    assert defaults["get_backward_gradient"] is get_backward_gradient
    # TorchRay requires the layer of grad_cam / linear_approx; here it is optional (grad_cam
    # chooses one, linear_approx reads the input).  The others default to "" (the input).
    if fn in (grad_cam, linear_approx):
        assert defaults["saliency_layer"] is None
    else:
        assert defaults["saliency_layer"] == ""
    assert all(p.annotation is not inspect.Parameter.empty for p in ps)


def test_common_signatures_follow_torchray():
    def names(fn):
        return [(p.name, p.default) for p in params(fn)]

    empty = inspect.Parameter.empty
    assert names(Probe)[:2] == [("module", empty), ("target", "input")]
    assert names(get_pointing_gradient) == [("pred_y", empty), ("y", empty), ("normalize", True)]
    assert names(get_backward_gradient) == [("pred_y", empty), ("y", empty)]
    assert names(attach_debug_probes) == [("model", empty), ("debug", False)]
    assert [n for n, _ in names(resize_saliency)] == ["tensor", "saliency", "size", "mode"]
    assert [n for n, _ in names(get_module)] == ["model", "module"]
    assert [n for n, _ in names(gradient_to_saliency)] == ["x"]
    assert [n for n, _ in names(gradient_to_grad_cam_saliency)] == ["x"]
    assert [n for n, _ in names(gradient_to_linear_approx_saliency)] == ["x"]
    assert isinstance(inspect.getattr_static(Patch, "resolve"), staticmethod)
    for fn in (GuidedBackpropReLU, DeConvNetReLU):
        assert issubclass(fn, torch.autograd.Function)


# ---------------------------------------------------------------------------------------------
# The ``with`` blocks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context,rule", [
    (NullContext, None),
    (GuidedBackpropContext, RefGuidedReLU),
    (DeConvNetContext, RefDeconvReLU),
    (lambda: ReLUContext(GuidedBackpropReLU), RefGuidedReLU),
    (lambda: ReLUContext(DeConvNetReLU), RefDeconvReLU),
])
def test_manual_with_block(context, rule):
    """x.requires_grad_(True); with Context(): y = model(x); y[0, c].backward();
    saliency = gradient_to_saliency(x)."""
    model, x = model_and_input()
    category_id = 2
    x.requires_grad_(True)
    with context():
        y = model(x)
        z = y[0, category_id]
        z.backward()
    smap = gradient_to_saliency(x)
    expected = reference_input_gradient(model, x, category_id, rule)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(smap, expected.abs().amax(1, keepdim=True), rtol=1e-12,
                               atol=1e-14)


def test_torchray_relu_functions_used_directly():
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64)
    for fn, expected in [(GuidedBackpropReLU, [0.0, 0.0, 1.0]), (DeConvNetReLU, [3.0, 0.0, 1.0])]:
        y = fn.apply(x)
        assert torch.equal(y, x.detach().clamp(min=0))
        (g,) = torch.autograd.grad(y, x, seed)
        assert g.tolist() == expected


def test_patch_with_a_dotted_name():
    """TorchRay's Patch(target, new_callable): a global swap of F.relu gives the guided map."""
    model, x = model_and_input()
    original = F.relu

    def guided_relu(input, inplace=False):
        return RefGuidedReLU.apply(input, None)

    patch = Patch("torch.nn.functional.relu", guided_relu)
    try:
        assert F.relu is guided_relu
        xx = x.clone().requires_grad_(True)
        model(xx)[0, 1].backward()
    finally:
        patch.remove()
    assert F.relu is original
    torch.testing.assert_close(xx.grad, reference_input_gradient(model, x, 1, RefGuidedReLU))
    torch.testing.assert_close(guided_backprop(model, x, 1),
                               xx.grad.abs().amax(1, keepdim=True), rtol=1e-12, atol=1e-14)
    assert Patch.resolve("torch.nn.functional.relu") == (F, "relu")
    assert Patch.resolve("torch.Tensor.relu") == (torch.Tensor, "relu")
    import json.decoder
    assert Patch.resolve("json.decoder.JSONDecoder") == (json.decoder, "JSONDecoder")
    with pytest.raises(ValueError, match="dotted name"):
        Patch.resolve("relu")
    with pytest.raises(ValueError, match="neither an attribute nor an importable module"):
        Patch("torch.no_such_module.relu", guided_relu)
    with pytest.raises(TypeError, match="dotted name"):
        Patch(F, guided_relu)
    with Patch("torch.relu", guided_relu):  # also a context manager
        assert torch.relu is guided_relu
    assert torch.relu is not guided_relu


# ---------------------------------------------------------------------------------------------
# Probe and the manual layer methods
# ---------------------------------------------------------------------------------------------


def test_manual_grad_cam_with_probe():
    """saliency_layer = get_module(model, name); probe = Probe(saliency_layer, target='output');
    y = model(x); y[0, c].backward(); saliency = gradient_to_grad_cam_saliency(probe.data[0])."""
    model, x = model_and_input()
    category_id = 3
    saliency_layer = get_module(model, "features.3")
    probe = Probe(saliency_layer, target="output")
    y = model(x)
    z = y[0, category_id]
    z.backward()
    smap = gradient_to_grad_cam_saliency(probe.data[0])
    probe.remove()
    # By hand, from a bare hook: α_k = mean of the gradient, map = ReLU(Σ_k α_k A_k).
    a, g = hook_reference(model, x, [category_id], "features.3")
    expected = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(smap, expected, rtol=1e-12, atol=1e-14)
    # The one-call form, all arguments positional.
    one_call = grad_cam(model, x, category_id, "features.3", False, "bilinear", 0, NullContext,
                        gradient_to_grad_cam_saliency, get_backward_gradient, False)
    torch.testing.assert_close(one_call, expected, rtol=1e-12, atol=1e-14)
    # gradient_to_saliency= plugs another flattening into grad_cam.
    plain = grad_cam(model, x, category_id, "features.3", gradient_to_saliency=gradient_to_saliency)
    torch.testing.assert_close(plain, g.abs().amax(1, keepdim=True), rtol=1e-12, atol=1e-14)


def test_manual_linear_approx_with_probe():
    model, x = model_and_input(n=2)
    probe = Probe(get_module(model, "features.2"), target="output")
    y = model(x)
    y[:, 4].sum().backward()
    smap = gradient_to_linear_approx_saliency(probe.data[0])
    probe.remove()
    a, g = hook_reference(model, x, [4, 4], "features.2")
    expected = (a * g).sum(1, keepdim=True)
    torch.testing.assert_close(smap, expected, rtol=1e-12, atol=1e-14)
    one_call = linear_approx(model, x, 4, "features.2", False, "bilinear", 0, NullContext,
                             gradient_to_linear_approx_saliency, get_backward_gradient, False)
    torch.testing.assert_close(one_call, expected, rtol=1e-12, atol=1e-14)
    assert (expected < 0).any()  # signed


@pytest.mark.parametrize("fn,context,rule", [
    (gradient, NullContext, None),
    (guided_backprop, GuidedBackpropContext, RefGuidedReLU),
    (deconvnet, DeConvNetContext, RefDeconvReLU),
])
def test_one_call_backprop_methods_positional(fn, context, rule):
    model, x = model_and_input(n=2)
    expected = reference_input_gradient(model, x, 1, rule).abs().amax(1, keepdim=True)
    smap = fn(model, x, 1, "", False, "bilinear", 0, context, gradient_to_saliency,
              get_backward_gradient, False)
    torch.testing.assert_close(smap, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fn(model, x, 1), expected, rtol=1e-12, atol=1e-14)
    via_driver = saliency(model, x, 1, "", False, "bilinear", 0, context)
    torch.testing.assert_close(via_driver, expected, rtol=1e-12, atol=1e-14)


def test_probe_default_target_is_the_module_input():
    """TorchRay's Probe records the input: on a ReLU, that is the pre-activation."""
    model, x = model_and_input()
    probe = Probe(model.features[1])  # the in-place ReLU after the first conv
    model(x)[0, 0].backward()
    (rec,) = probe.data
    probe.remove()
    with torch.no_grad():
        pre = model.features[0](x)
    torch.testing.assert_close(rec, pre, rtol=0, atol=0)  # not rectified by the in-place ReLU
    assert (rec < 0).any()
    # Its gradient is the gradient at the conv output (the ReLU mask applied).
    a, g = hook_reference(model, x, [0], "features.0")
    torch.testing.assert_close(rec.grad, g, rtol=1e-12, atol=1e-14)


def test_probe_data_is_the_latest_pass():
    model, x = model_and_input()
    probe = Probe(get_module(model, "features.3"), target="output")
    for scale in (1.0, 2.0, 3.0):
        model(scale * x)
    assert len(probe.data) == 1
    with torch.no_grad():
        torch.testing.assert_close(probe.data[0], model.features[:4](3 * x), rtol=0, atol=0)
    probe.remove()


def test_manual_contrastive_excitation_backprop_with_probe_contrast():
    """The contrastive variant "by hand": a first pass with the classifier's sign flipped gives
    the contrast gradient at ``contrast_layer``; the probe subtracts it in a second pass."""
    model, x = model_and_input()
    x = x.abs()  # excitation backprop reads the positive part of the input
    category_id = 2
    saliency_layer = get_module(model, "features.2")
    contrast_layer = get_module(model, "features.4")
    classifier_layer = get_module(model, "classifier.1")
    saliency_probe = Probe(saliency_layer, target="output")
    contrast_probe = Probe(contrast_layer, target="output")
    x.requires_grad_(True)

    # Pass 1: the dual unit (classifier weights negated).
    with torch.no_grad():
        classifier_layer.weight.neg_()
    try:
        with ExcitationBackpropContext():
            y = model(x)
            y[0, category_id].backward()
        contrast = contrast_probe.data[0].grad.clone()
        dual = saliency_probe.data[0].grad.clone()
    finally:
        with torch.no_grad():
            classifier_layer.weight.neg_()

    # Pass 2: the target, with the contrast subtracted at the contrast layer.
    contrast_probe.contrast = [contrast]
    with ExcitationBackpropContext():
        y = model(x)
        y[0, category_id].backward()
    contrastive = saliency_probe.data[0].grad
    smap = contrastive.sum(1, keepdim=True).clamp(min=0)
    saliency_probe.remove()
    contrast_probe.remove()

    # Independently: plain excitation backprop of the target minus that of the dual (the
    # rules are linear in the top signal).
    with Probe(saliency_layer, target="output") as probe:
        with ExcitationBackpropContext():
            model(x.detach())[0, category_id].backward()
        target_excitation = probe.data[0].grad
    torch.testing.assert_close(contrastive, target_excitation - dual, rtol=1e-10, atol=1e-12)
    assert (contrastive < 0).any() and (contrastive > 0).any()
    one_call = contrastive_excitation_backprop(model, x.detach(), category_id, "features.2",
                                               "features.4", "classifier.1")
    torch.testing.assert_close(one_call, smap, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# debug=True, resize order, pointing gradient
# ---------------------------------------------------------------------------------------------


def test_debug_returns_the_probes_like_torchray():
    model, x = model_and_input()
    smap, probes = gradient(model, x, 1, debug=True)
    assert isinstance(probes, SaliencyDebug)
    assert list(probes) == [name for name, _ in model.named_modules() if name]
    assert "features.0" in probes and len(probes) == 9
    # Each probe holds the module's output and its gradient, as TorchRay's debug probes do.
    a, g = hook_reference(model, x, [1], "features.0")
    rec = probes["features.0"].data[0]
    torch.testing.assert_close(rec, a, rtol=0, atol=0)
    torch.testing.assert_close(rec.grad, g, rtol=1e-12, atol=1e-14)
    assert dict(probes.items()).keys() == probes.keys()
    assert SaliencyDebug(None, x, x)  # true even without probes (contrastive EBP's)
    # The probes are detached from the model, and the richer fields are there too.
    assert not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(probes.gradient, reference_input_gradient(model, x, 1))
    torch.testing.assert_close(smap, probes.gradient.abs().amax(1, keepdim=True))


def test_resize_takes_pil_image_size():
    """A ported script passes ``image.size`` (width, height): the map is height × width."""
    model, x = model_and_input()
    image = Image.new("RGB", (24, 16))  # width 24, height 16
    smap = gradient(model, x, 1, resize=image.size)
    assert smap.shape == (1, 1, 16, 24)
    expected = F.interpolate(gradient(model, x, 1), size=(16, 24), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(smap, expected)
    assert torch.equal(gradient(model, x, 1, resize=Shape(16, 24)), smap)
    cam = grad_cam(model, x, 1, "features.3", resize=image.size)
    assert cam.shape == (1, 1, 16, 24)


def test_pointing_gradient_normalize():
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    raw = get_pointing_gradient(maps, 1, normalize=False)
    torch.testing.assert_close(raw[:, 1], maps[:, 1].exp(), rtol=0, atol=0)
    assert raw[:, [0, 2]].abs().sum() == 0
    norm = get_pointing_gradient(maps, 1)
    torch.testing.assert_close(norm[:, 1], raw[:, 1] / raw[:, 1].sum((1, 2), keepdim=True))
    assert norm[:, [0, 2]].abs().sum() == 0
    # Scores near 100 in float32: exp-then-divide (TorchRay) gives NaN, ours the softmax.
    big = (maps * 3 + 100).float()
    e = big[:, 1].exp()
    assert torch.isnan(e / e.sum((1, 2), keepdim=True)).any()
    ours = get_pointing_gradient(big, 1)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[:, 1].double(), torch.softmax(
        big[:, 1].double().flatten(1), 1).view(2, 4, 5))


# ---------------------------------------------------------------------------------------------
# Deliberate differences (docs/torchray.rst)
# ---------------------------------------------------------------------------------------------


def test_get_module_raises_on_an_unknown_name():
    model, _ = model_and_input()
    with pytest.raises(ValueError, match="no module named 'feature.3'.*'features.3'"):
        get_module(model, "feature.3")


def test_the_callers_input_is_left_alone():
    """TorchRay sets ``requires_grad`` and ``.grad`` on the input; the map is what we return."""
    model, x = model_and_input()
    smap = gradient(model, x, 1)
    assert not x.requires_grad and x.grad is None
    torch.testing.assert_close(smap, reference_input_gradient(model, x, 1).abs().amax(
        1, keepdim=True))


def test_binary_head_target_zero_warns_and_target_one_is_torchrays_number():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 1)).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.warns(TorchRayDifferenceWarning, match="target=1"):
        minus = linear_approx(model, x, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plus = linear_approx(model, x, 1)  # TorchRay's number for its target 0 (column 0)
    torch.testing.assert_close(minus, -plus, rtol=0, atol=0)
    # By hand: gradient × input of the logit, summed over channels.
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xx)[:, 0].sum(), xx)
    torch.testing.assert_close(plus, (x * g).sum(1, keepdim=True), rtol=1e-12, atol=1e-14)


def test_torchray_keyword_names_of_patch_and_relu_context():
    """TorchRay's ``Patch(target, new_callable)`` and ``ReLUContext(relu_func)`` by keyword."""
    import torchray_like.attribution.common as common
    from torchray_like.attribution.guided_backprop import GuidedBackpropReLU

    original = torch.nn.functional.relu6
    with common.Patch(target="torch.nn.functional.relu6", new_callable=torch.relu):
        assert torch.nn.functional.relu6 is torch.relu
    assert torch.nn.functional.relu6 is original
    x = torch.randn(2, 3, requires_grad=True)
    for ctx in (common.ReLUContext(relu_func=GuidedBackpropReLU),
                common.ReLUContext(function_class=GuidedBackpropReLU),
                common.ReLUContext(GuidedBackpropReLU)):
        with ctx:
            y = torch.relu(x)
        (g,) = torch.autograd.grad(y, x, -torch.ones_like(y))
        assert torch.equal(g, torch.zeros_like(x))  # guided: negative signal blocked
    with pytest.raises(TypeError, match="ReLUContext takes one rule"):
        common.ReLUContext()
    with pytest.raises(TypeError, match="ReLUContext takes one rule"):
        common.ReLUContext(GuidedBackpropReLU, function_class=GuidedBackpropReLU)
