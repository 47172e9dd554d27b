"""Reference parity across the torchvision zoo: our ``METHODS`` maps against Captum 0.9,
pytorch-grad-cam 1.5.7 and Zennit 0.5.1, run as black boxes on the *same* model and input.

Models: the zoo of ``zoo_models.ZOO`` plus torchvision ``resnet18``, ``vgg11_bn``,
``densenet121`` (functional ReLUs in its forward), ``mobilenet_v2`` (ReLU6) and
``squeezenet1_1`` (Fire modules, in-place ReLU); random weights, eval mode, batch 2 with two
different targets, one thread.  Checked:

* Captum: ``Saliency`` (``abs``, max over channels — our ``gradient`` flattening),
  ``GuidedBackprop`` and ``Deconvolution`` (same flattening), ``InputXGradient`` (sum over
  channels), ``IntegratedGradients`` (same steps, zero baseline, same rule), ``LayerGradCam``,
  ``GuidedGradCam`` (bilinear upsampling, as ours) and ``Occlusion`` (same window and stride),
  on every model.
* pytorch-grad-cam: GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM (after its
  normalisation and resize, applied to ours as ``test_cam_parity.pgc_view`` does), ScoreCAM,
  AblationCAM and EigenCAM (up to the SVD's sign) on the automatic layer of several models.
* Zennit: EpsilonPlusFlat, EpsilonGammaBox and EpsilonAlpha2Beta1 on AlexNet, VGG-11-BN (with
  its ``SequentialMergeBatchNorm`` canonizer; ours needs none) and SqueezeNet.

Found: every pair agrees within float tolerance except the differences of :data:`ACCEPTED`,
where each test shows the difference exists *and* that our map equals an independent hand
computation (plain autograd with a bare forward hook, the reference rectifier rules of
``conftest``): Captum's rectifier rules hook ``nn.ReLU`` modules only (functional ``F.relu`` in
DenseNet / GoogLeNet / Inception-v3 and ``nn.ReLU6`` in MobileNet-v2 keep the plain gradient,
and a model with no ReLU silently gets the plain gradient under a guided name, where we raise);
Captum's ``riemann_trapezoid`` weights sum to ``(n-1)/n``; pytorch-grad-cam's XGradCAM divides
by ``Σ A + 1e-7`` (the ε dominates the small channel sums of these random-weight models); and
pytorch-grad-cam reads DenseNet's last feature map *after* the model's in-place ``F.relu``
rewrote it (rectified activations with the gradient of the unrectified ones); and
pytorch-grad-cam's AblationCAM on an unrectified block output (MobileNet-v2, MnasNet) departs
from zeroing the channel, which ours does (its mechanism was not established black-box).  No
bug of ours was found.  On Bottleneck ResNets our LRP differs from Zennit's ``ResNetCanonizer``
result by 0.1–0.6 % of the largest relevance, in float64 too: three conventions of Zennit's
(ε on the pooled mean and on residual sums, the folded batch norms' ``eps`` left in place),
which ``tests/test_lrp_bottleneck.py`` pins against a matrix-form LRP that ours equals; with
them undone the two agree (``test_zennit_bottleneck_resnet_conventions``).  Several
random-weight zoo models give scores of 1e-8 to 1e-14, so the relative tolerances have no
absolute floor.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import warnings
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from torchray_like.attribution import lrp_composites
from torchray_like.attribution.context import NoRuleAppliedError
from torchray_like.attribution.layer_choice import find_saliency_layer
from torchray_like.attribution.registry import METHODS

from .conftest import (
    RefDeconvReLU,
    RefGuidedReLU,
    channel_zeroed,
    hook_reference,
    reference_map,
)
from .test_cam_parity import PGC_CLASSES, Scaled, pgc_view
from .zoo_models import ZOO, zoo_input

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = [1, 3]
TOL = 1e-4  # max |difference| / max |reference|
CAM_TOL = 2e-4  # after pytorch-grad-cam's normalisation to [0, 1]


def _torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=10).eval()


#: name -> (builder, input side)
MODELS: Dict[str, Tuple[Callable[[], nn.Module], int]] = dict(ZOO)
MODELS.update({"resnet18": (lambda: _torchvision("resnet18"), 32),
               "vgg11_bn": (lambda: _torchvision("vgg11_bn"), 32),
               "densenet121": (lambda: _torchvision("densenet121"), 64),
               "mobilenet_v2": (lambda: _torchvision("mobilenet_v2"), 64),
               "squeezenet1_1": (lambda: _torchvision("squeezenet1_1"), 64)})

#: Models whose rectifiers Captum's module hooks miss (functional F.relu; nn.ReLU6).
CAPTUM_MISSES_RECTIFIERS = ("densenet121", "googlenet", "inception_v3", "mobilenet_v2")
#: Models without any ReLU: our rectifier methods refuse them.
NO_RELU = ("efficientnet_b0", "convnext_tiny")
#: The CAM sweep's models (the cheaper ones, one of each family of layer layouts).
CAM_MODELS = ("mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5", "resnet18",
              "densenet121", "mobilenet_v2", "squeezenet1_1")
#: Models where pytorch-grad-cam's ε in XGradCAM's ``Σ A + ε`` shows (small channel sums).
XGRAD_EPS_MODELS = ("mobilenet_v3_small", "shufflenet_v2_x0_5", "mobilenet_v2")
#: Models whose forward rectifies the CAM layer's output in place afterwards.
IN_PLACE_AFTER_LAYER = ("densenet121",)
#: (model, layer) pairs whose layer output is not rectified, where pytorch-grad-cam's
#: AblationCAM departs from zeroing the channel.
ABLATION_UNRECTIFIED = {"mobilenet_v2": "features.3", "mnasnet0_5": "layers.9"}


@functools.lru_cache(maxsize=None)
def case(name: str) -> Tuple[nn.Module, torch.Tensor]:
    builder, side = MODELS[name]
    return builder(), zoo_input(side)


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    # No absolute floor: some random-weight zoo models give attributions of 1e-14.
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


def captum():
    return pytest.importorskip("captum.attr")


def quiet(method: str, *args, **kwargs) -> torch.Tensor:
    """Our map, without the warnings about constructs the rule does not cover (tested
    elsewhere: ``test_zoo_sweep.py``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return METHODS[method](*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Independent hand computations


def hand_trapezoid_ig(model: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """Per channel, Σ_k w_k ∂f/∂x(α_k x) · x with α_k = k/(n-1) and weights 1/(n-1), halved
    at both ends."""
    total = torch.zeros_like(x)
    for k in range(n):
        weight = (0.5 if k in (0, n - 1) else 1.0) / (n - 1)
        xx = (x * (k / (n - 1))).requires_grad_(True)
        y = model(xx)
        (g,) = torch.autograd.grad(y[torch.arange(len(TARGET)), TARGET].sum(), xx)
        total += weight * g
    return total * x


def hand_cam(name: str, a: torch.Tensor, g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Grad-CAM (paper: ReLU(Σ_k mean(g_k) A_k)) or XGrad-CAM (w_k = Σ g A / (Σ A + eps))."""
    if name == "grad_cam":
        w = g.mean((2, 3), keepdim=True)
    else:
        w = (g * a / (a.sum((2, 3), keepdim=True) + eps)).nan_to_num().sum((2, 3), keepdim=True)
    return (w * a).sum(1, keepdim=True).clamp(min=0)


def run_pgc(method: str, model: nn.Module, layer: nn.Module, x: torch.Tensor,
            target: List[int] = TARGET, batch: int = 64) -> torch.Tensor:
    pgc = pytest.importorskip("pytorch_grad_cam")
    targets_module = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    targets = [targets_module.ClassifierOutputTarget(c) for c in target]
    cls = getattr(pgc, "GradCAM" if method == "grad_cam" else PGC_CLASSES[method])
    with cls(model=model, target_layers=[layer]) as cam:
        cam.batch_size = batch
        with contextlib.redirect_stderr(io.StringIO()):  # Score-CAM's progress bar
            return torch.from_numpy(cam(input_tensor=x, targets=targets))


def cam_layer(name: str) -> Tuple[str, nn.Module]:
    model, x = case(name)
    layer = find_saliency_layer(model, x)
    return layer, dict(model.named_modules())[layer]


# ---------------------------------------------------------------------------------------------
# Accepted differences: name -> (reason, check).  Each check asserts the difference exists and
# that our map equals the independent computation.


def check_captum_rectifiers(ca) -> None:
    for name in CAPTUM_MISSES_RECTIFIERS:
        model, x = case(name)
        t = torch.tensor(TARGET)
        for ours_name, cls, ref in (("guided_backprop", ca.GuidedBackprop, RefGuidedReLU),
                                    ("deconvnet", ca.Deconvolution, RefDeconvReLU)):
            ours = quiet(ours_name, model, x, TARGET)
            theirs = cls(model).attribute(x, target=t).abs().amax(1, keepdim=True)
            assert rel(ours, theirs) > 1e-2, (name, ours_name)
            assert rel(ours, reference_map(model, x, TARGET, ref)) <= TOL, (name, ours_name)


def check_captum_no_relu(ca) -> None:
    for name in NO_RELU:
        model, x = case(name)
        t = torch.tensor(TARGET)
        plain = ca.Saliency(model).attribute(x, target=t, abs=True)
        for ours_name, cls in (("guided_backprop", ca.GuidedBackprop),
                               ("deconvnet", ca.Deconvolution)):
            theirs = cls(model).attribute(x, target=t).abs()
            assert rel(theirs, plain) <= TOL, (name, ours_name)  # the plain gradient, silently
            with pytest.raises(NoRuleAppliedError, match="replaced no ReLU"):
                quiet(ours_name, model, x, TARGET)


def check_captum_trapezoid(ca) -> None:
    n = 4
    for name in ("resnext_toy", "googlenet"):
        model, x = case(name)
        ours = METHODS["integrated_gradients"](model, x, TARGET, n_steps=n,
                                               rule="riemann_trapezoid", reduce=None)
        theirs = ca.IntegratedGradients(model).attribute(
            x, target=torch.tensor(TARGET), n_steps=n, method="riemann_trapezoid")
        assert rel(theirs, ours) > 0.2
        assert rel(ours, theirs * n / (n - 1)) <= TOL
        assert rel(ours, hand_trapezoid_ig(model, x, n)) <= TOL


def check_pgc_xgrad_eps(_) -> None:
    for name in XGRAD_EPS_MODELS:
        model, x = case(name)
        layer, module = cam_layer(name)
        a, g = hook_reference(model, x, TARGET, layer)
        theirs = run_pgc("xgrad_cam", model, module, x)
        ours = quiet("xgrad_cam", model, x, TARGET, layer)
        assert (pgc_view(ours, x.shape[2:]) - theirs).abs().max() > 1e-2, name
        assert (pgc_view(hand_cam("xgrad", a, g, 1e-7), x.shape[2:]) - theirs
                ).abs().max() <= CAM_TOL, name
        assert rel(ours, hand_cam("xgrad", a, g)) <= TOL, name


def check_pgc_in_place(_) -> None:
    for name in IN_PLACE_AFTER_LAYER:
        model, x = case(name)
        layer, module = cam_layer(name)
        a, g = hook_reference(model, x, TARGET, layer)
        assert bool((a < 0).any())  # the layer's own output is not rectified
        theirs = run_pgc("grad_cam", model, module, x)
        ours = quiet("grad_cam", model, x, TARGET, layer)
        assert (pgc_view(ours, x.shape[2:]) - theirs).abs().max() > 1e-2
        rectified = hand_cam("grad_cam", a.clamp(min=0), g)
        assert (pgc_view(rectified, x.shape[2:]) - theirs).abs().max() <= CAM_TOL
        assert rel(ours, hand_cam("grad_cam", a, g)) <= TOL


def check_pgc_ablation(_) -> None:
    for name, layer in ABLATION_UNRECTIFIED.items():
        model, x, target = one_image(name)
        a, _ = hook_reference(model, x, target, layer)
        assert bool((a < 0).any())  # no rectifier at the end of the block
        theirs = run_pgc("ablation_cam", model, dict(model.named_modules())[layer], x, target)
        ours = quiet("ablation_cam", model, x, target, layer, batch_size=64)
        assert (pgc_view(ours, x.shape[2:]) - theirs).abs().max() > 0.1, name
        assert rel(ours, hand_zero_ablation(model, x, target, layer)) <= 1e-3, name


ACCEPTED: Dict[str, Tuple[str, Callable]] = {
    "captum-rectifier-hooks": (
        "Captum's GuidedBackprop / Deconvolution override nn.ReLU modules only: functional "
        "F.relu (DenseNet, GoogLeNet, Inception-v3) and nn.ReLU6 (MobileNet-v2) keep the plain "
        "gradient; ours applies the rule to every rectifier, as the reference rules do",
        check_captum_rectifiers),
    "captum-no-relu": (
        "on a model without ReLU (EfficientNet: SiLU; ConvNeXt: GELU) Captum returns the plain "
        "gradient under the guided / deconvnet name; ours raises NoRuleAppliedError",
        check_captum_no_relu),
    "captum-trapezoid-weights": (
        "Captum's riemann_trapezoid weights sum to (n-1)/n: its maps are (n-1)/n times ours, "
        "and ours equals the trapezoid rule by hand (weights summing to 1)",
        check_captum_trapezoid),
    "pgc-xgrad-eps": (
        "pytorch-grad-cam's XGradCAM divides by Σ A + 1e-7: on channels with small sums the "
        "ε dominates; ours is the paper's Σ A (and 0 for a channel that is zero everywhere)",
        check_pgc_xgrad_eps),
    "pgc-in-place-after-layer": (
        "DenseNet's forward calls F.relu(features, inplace=True) after the CAM layer: "
        "pytorch-grad-cam's recorded activation is rectified in place (while its gradient is "
        "the unrectified one's); ours reads the layer's real output",
        check_pgc_in_place),
    "pgc-ablation-unrectified-layer": (
        "on an unrectified layer output (the residual sum ending an inverted-residual block of "
        "MobileNet-v2 / MnasNet) pytorch-grad-cam's AblationCAM departs from the paper's "
        "zeroed channel (its ablation value was not established black-box: neither 0, nor "
        "min - 1e7, nor a score-scale effect); ours equals zero-ablation by hand",
        check_pgc_ablation),
}


@pytest.mark.parametrize("key", sorted(ACCEPTED))
def test_accepted_difference_exists_and_we_match_the_hand_computation(key):
    reason, check = ACCEPTED[key]
    assert len(reason) > 40
    check(captum() if key.startswith("captum") else pytest.importorskip("pytorch_grad_cam"))


# ---------------------------------------------------------------------------------------------
# Captum, every model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_captum_gradient_methods(name):
    ca = captum()
    model, x = case(name)
    t = torch.tensor(TARGET)
    pairs: List[Tuple[str, torch.Tensor, torch.Tensor]] = [
        ("saliency", METHODS["gradient"](model, x, TARGET),
         ca.Saliency(model).attribute(x, target=t, abs=True).amax(1, keepdim=True)),
        ("input_x_gradient", METHODS["gradient_x_input"](model, x, TARGET),
         ca.InputXGradient(model).attribute(x, target=t).sum(1, keepdim=True)),
        ("integrated_gradients", METHODS["integrated_gradients"](model, x, TARGET, n_steps=2),
         ca.IntegratedGradients(model).attribute(x, target=t, n_steps=2,
                                                 method="gausslegendre").sum(1, keepdim=True)),
    ]
    if name not in NO_RELU + CAPTUM_MISSES_RECTIFIERS:  # ACCEPTED: captum-*
        for ours_name, cls in (("guided_backprop", ca.GuidedBackprop),
                               ("deconvnet", ca.Deconvolution)):
            pairs.append((ours_name, quiet(ours_name, model, x, TARGET),
                          cls(model).attribute(x, target=t).abs().amax(1, keepdim=True)))
    for label, ours, theirs in pairs:
        assert ours.shape == (2, 1) + x.shape[2:], label
        assert rel(ours, theirs) <= TOL, f"{label} on {name}: {rel(ours, theirs):.2e}"


@pytest.mark.parametrize("name", CAM_MODELS)
def test_captum_layer_methods(name):
    ca = captum()
    model, x = case(name)
    layer, module = cam_layer(name)
    t = torch.tensor(TARGET)
    ours = quiet("grad_cam", model, x, TARGET, layer)
    theirs = ca.LayerGradCam(model, module).attribute(x, target=t, relu_attributions=True)
    assert rel(ours, theirs) <= TOL
    guided = quiet("guided_grad_cam", model, x, TARGET, layer)
    if name in CAPTUM_MISSES_RECTIFIERS:  # ACCEPTED: captum-rectifier-hooks; by hand instead
        up = F.interpolate(ours, size=x.shape[2:], mode="bilinear", align_corners=False)
        expected = reference_map(model, x, TARGET, RefGuidedReLU) * up
    else:
        expected = ca.GuidedGradCam(model, module).attribute(
            x, target=t, interpolate_mode="bilinear").abs().amax(1, keepdim=True)
    assert rel(guided, expected) <= TOL
    # Occlusion in float64: its map is differences of scores, which in float32 carry the
    # rounding of two different kernel layouts (ours runs channels-last), amplified where the
    # differences are small (shufflenet: 5e-4 on an AVX512 CPU).
    w = x.shape[-1] // 4
    model64, x64 = copy.deepcopy(model).double(), x.double()
    occ = ca.Occlusion(model64).attribute(x64, target=t, sliding_window_shapes=(3, w, w),
                                          strides=(3, w // 2, w // 2), baselines=0)
    ours_occ = METHODS["occlusion"](model64, x64, TARGET, window=w, stride=w // 2,
                                    progress=False)
    assert rel(ours_occ, occ.mean(1, keepdim=True)) <= TOL


# ---------------------------------------------------------------------------------------------
# pytorch-grad-cam


@pytest.mark.parametrize("name", CAM_MODELS)
@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus", "xgrad_cam",
                                    "hires_cam", "layer_cam"])
def test_pytorch_grad_cam_gradient_cams(name, method):
    if name in IN_PLACE_AFTER_LAYER and method != "hires_cam" and method != "layer_cam":
        pytest.skip("ACCEPTED: pgc-in-place-after-layer")
    if name in XGRAD_EPS_MODELS and method == "xgrad_cam":
        pytest.skip("ACCEPTED: pgc-xgrad-eps")
    model, x = case(name)
    layer, module = cam_layer(name)
    # Scores × 1000: pytorch-grad-cam's ε = 1e-6 in Grad-CAM++'s α is then negligible.
    scaled = Scaled(model, 1000.0).eval()
    ours = quiet(method, scaled, x, TARGET, "model." + layer)
    theirs = run_pgc(method, scaled, module, x)
    diff = float((pgc_view(ours, x.shape[2:]) - theirs).abs().max())
    assert diff <= CAM_TOL, f"{method} on {name}: {diff:.2e}"


def one_image(name: str) -> Tuple[nn.Module, torch.Tensor, List[int]]:
    """The model, its first image cut to 32² (a forward pass per channel) and its top class."""
    model, x = case(name)
    x = x[:1, :, :32, :32]
    with torch.no_grad():
        return model, x, [int(model(x).argmax())]


def hand_zero_ablation(model: nn.Module, x: torch.Tensor, target: List[int],
                       layer: str) -> torch.Tensor:
    """Ablation-CAM by hand (Desai & Ramaswamy 2020): channel k set to 0 by a forward hook,
    w_k = (y - y_k) / y, map ReLU(Σ_k w_k A_k)."""
    module = dict(model.named_modules())[layer]
    a, _ = hook_reference(model, x, target, layer)
    with torch.no_grad():
        y = model(x)[0, target[0]]
    weights = []
    for k in range(a.shape[1]):
        with channel_zeroed(module, k), torch.no_grad():
            weights.append((y - model(x)[0, target[0]]) / y)
    return (torch.stack(weights)[None, :, None, None] * a).sum(1, keepdim=True).clamp(min=0)


@pytest.mark.parametrize("name, layer", [("squeezenet1_1", "features.3"),
                                         ("shufflenet_v2_x0_5", "stage2"),
                                         ("mobilenet_v2", "features.3")])
@pytest.mark.parametrize("method", ["score_cam", "ablation_cam", "eigen_cam"])
def test_pytorch_grad_cam_perturbation_and_eigen_cams(name, layer, method):
    if method == "ablation_cam" and name in ABLATION_UNRECTIFIED:
        pytest.skip("ACCEPTED: pgc-ablation-unrectified-layer")
    model, x, target = one_image(name)
    module = dict(model.named_modules())[layer]
    options: Dict[str, object] = {"align_corners": True} if method == "score_cam" else {}
    if method != "eigen_cam":
        options["batch_size"] = 64
    ours = quiet(method, model, x, target, layer, **options)
    theirs = run_pgc(method, model, module, x, target)
    if method == "eigen_cam":  # the SVD's sign is arbitrary: ours picks one, theirs another
        from torchray_like.attribution.eigen_cam import eigen_cam_projection

        a, _ = hook_reference(model, x, target, layer)
        p = eigen_cam_projection(a)
        assert rel(ours, p.clamp(min=0)) <= TOL
        diff = min(float((pgc_view(s.clamp(min=0), x.shape[2:]) - theirs).abs().max())
                   for s in (p, -p))
    else:
        diff = float((pgc_view(ours, x.shape[2:]) - theirs).abs().max())
    assert diff <= CAM_TOL, f"{method} on {name}: {diff:.2e}"


# ---------------------------------------------------------------------------------------------
# Zennit


ZENNIT_MODELS = {"alexnet": 64, "vgg11_bn": 32, "squeezenet1_1": 32}
COMPOSITES = {"EpsilonPlusFlat": lrp_composites.epsilon_plus_flat,
              "EpsilonGammaBox": lrp_composites.epsilon_gamma_box,
              "EpsilonAlpha2Beta1": lrp_composites.epsilon_alpha2_beta1}


@pytest.mark.parametrize("name", sorted(ZENNIT_MODELS))
@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_zennit_composites(name, composite):
    pytest.importorskip("zennit")
    from zennit import composites as theirs_composites
    from zennit import torchvision as zennit_tv
    from zennit.attribution import Gradient

    model, _ = case(name)
    x = zoo_input(ZENNIT_MODELS[name])
    canonizers = [zennit_tv.SequentialMergeBatchNorm()] if name == "vgg11_bn" else []
    low, high = float(x.min()), float(x.max())
    if composite == "EpsilonGammaBox":
        ours_composite = COMPOSITES[composite](low, high)
        theirs_composite = theirs_composites.EpsilonGammaBox(
            low=torch.full_like(x, low), high=torch.full_like(x, high), canonizers=canonizers)
    else:
        ours_composite = COMPOSITES[composite]()
        theirs_composite = getattr(theirs_composites, composite)(canonizers=canonizers)
    ours = quiet("lrp", model, x, TARGET, composite=ours_composite)

    def seed(out: torch.Tensor) -> torch.Tensor:
        one_hot = torch.zeros_like(out)
        one_hot[torch.arange(len(TARGET)), TARGET] = 1
        return one_hot * out

    with Gradient(model, theirs_composite) as attributor:
        theirs = attributor(x, seed)[1].sum(1, keepdim=True)
    assert rel(ours, theirs) <= TOL, f"{composite} on {name}: {rel(ours, theirs):.2e}"


def test_zennit_bottleneck_resnet_conventions():
    """Bottleneck ResNets: Zennit's ``ResNetCanonizer`` result differs from ours by three
    conventions of its own (``tests/test_lrp_bottleneck.py`` pins each against a float64
    matrix-form LRP, which ours equals): ε = 1e-6 on the average pool's mean and on the residual
    sum, and folded batch norms left with their eps (each folded layer scaled by
    ``1/sqrt(1 + eps)``).  With those removed (batch norm eps 0, its ``Sum`` and
    ``AdaptiveAvgPool2d`` rules unstabilised) the maps agree to float32 rounding."""
    import copy

    pytest.importorskip("zennit")
    from zennit import composites as theirs_composites
    from zennit import layer as zennit_layer
    from zennit import rules as zennit_rules
    from zennit import torchvision as zennit_tv
    from zennit.attribution import Gradient

    def plain(d: torch.Tensor) -> torch.Tensor:  # no stabiliser (its numerator is 0 at d = 0)
        return torch.where(d == 0, torch.ones_like(d), d)

    exact_map = [(zennit_layer.Sum, zennit_rules.Norm(stabilizer=plain)),
                 (nn.AdaptiveAvgPool2d, zennit_rules.Norm(stabilizer=plain))]
    model, _ = case("resnext_toy")
    exact = copy.deepcopy(model)
    for module in exact.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 0.0
    x = zoo_input(32)
    gaps = []
    for net, layer_map in ((model, None), (exact, exact_map)):
        ours = quiet("lrp", net, x, TARGET, composite=lrp_composites.epsilon_plus_flat())
        composite = theirs_composites.EpsilonPlusFlat(
            layer_map=layer_map, canonizers=[zennit_tv.ResNetCanonizer()])
        with Gradient(net, composite) as attributor:
            theirs = attributor(x, lambda out: torch.eye(out.shape[1])[TARGET] * out)[1]
        gaps.append(rel(ours.sum(1, keepdim=True), theirs.sum(1, keepdim=True)))
    assert gaps[0] > 5 * TOL and gaps[1] <= TOL / 10, gaps  # measured 1.3e-3, 3e-7
