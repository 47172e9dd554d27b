"""The CAM family against pytorch-grad-cam 1.5.7 and TorchCAM 0.5, run as black boxes, after the
same normalisation and resize (issue 19): ResNet-18 and VGG-11 with random weights and the
embedded models.  Where a library departs from the paper, the test pins down how (the module
docstrings say the same).  Skipped when a library is not importable."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.grad_cam_plus_plus import channel_sum
from torchray_like.attribution.registry import METHODS

from .conftest import hook_reference, make_torchvision, trained_embedded_model

TOL = 1e-4
PGC_CLASSES = {"grad_cam_plus_plus": "GradCAMPlusPlus", "layer_cam": "LayerCAM",
               "xgrad_cam": "XGradCAM", "hires_cam": "HiResCAM", "eigen_cam": "EigenCAM",
               "score_cam": "ScoreCAM", "ablation_cam": "AblationCAM"}
TCAM_CLASSES = {"layer_cam": "LayerCAM", "xgrad_cam": "XGradCAM"}
# Score-CAM and Ablation-CAM cost a forward pass per channel: 128-channel layers.
PERTURBATION_LAYERS = {"resnet18": "layer2", "vgg11": "features.5"}


class Scaled(nn.Module):
    """The model with its scores multiplied by ``k`` (larger gradients, same maps for every CAM
    that does not depend on the gradient's scale)."""

    def __init__(self, model: nn.Module, k: float) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x):
        return self.model(x) * self.k


def rescale(m: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample min-max scaling ``(m - min) / (max(m - min) + eps)`` of ``(N, *spatial)``."""
    flat = m.flatten(1)
    shifted = flat - flat.min(1, keepdim=True)[0]
    return (shifted / (shifted.max(1, keepdim=True)[0] + eps)).view(m.shape)


def pgc_view(smap: torch.Tensor, size) -> torch.Tensor:
    """pytorch-grad-cam's output: scaled, resized to the input (bilinear), scaled again."""
    scaled = rescale(smap[:, 0], 1e-7)[:, None]
    up = F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)[:, 0]
    return rescale(up, 1e-7)


def run_pgc(name, model, layer, x, classes):
    pgc = pytest.importorskip("pytorch_grad_cam")
    targets_module = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    targets = [targets_module.ClassifierOutputTarget(int(c)) for c in classes]
    with getattr(pgc, PGC_CLASSES[name])(model=model, target_layers=[layer]) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=targets))


def run_tcam(cls_name, model, layer_name, x, classes):
    methods = pytest.importorskip("torchcam.methods")
    extractor = getattr(methods, cls_name)(model, layer_name, input_shape=tuple(x.shape[1:]))
    try:
        out = model(x)
        return extractor(list(classes), out)[0]
    finally:
        extractor.remove_hooks()


@functools.lru_cache(maxsize=None)
def case_named(case):
    """(label, model, layer name, input) of a parity case, built once per session."""
    if case.startswith("embedded"):
        from torchray_like.benchmark.embedded_data import EmbeddedShapes, embedded_collate

        data = EmbeddedShapes("test", size=64)
        images, _ = embedded_collate([data[i] for i in range(2)])
        layer = "features" if case == "embedded-vgg" else "layer4"
        return case, trained_embedded_model(case), layer, images
    torch.manual_seed(0)
    size = 64 if case == "vgg11" else 96
    layer = "features" if case == "vgg11" else "layer4"
    return case, make_torchvision(case), layer, torch.randn(2, 3, size, size)


def top_classes(model, x):
    with torch.no_grad():
        out = model(x)
    classes = out.argmax(1)
    assert bool((out.gather(1, classes[:, None]) > 0).all())
    return classes.tolist()


def parity_cases():
    return ["resnet18", "vgg11", "embedded-vgg", "embedded-resnet"]


# ---------------------------------------------------------------------------------------------
# pytorch-grad-cam
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", parity_cases())
@pytest.mark.parametrize("name", ["grad_cam_plus_plus", "layer_cam", "xgrad_cam", "hires_cam"])
def test_gradient_cams_equal_pytorch_grad_cam(case, name):
    _, model, layer, x = case_named(case)
    # Scores × 1000: pytorch-grad-cam's ε = 1e-6 in Grad-CAM++'s α is then negligible.
    scaled = Scaled(model, 1000.0).eval()
    classes = top_classes(model, x)
    ours = METHODS[name](scaled, x, classes, "model." + layer)
    theirs = run_pgc(name, scaled, dict(model.named_modules())[layer], x, classes)
    diff = (pgc_view(ours, x.shape[2:]) - theirs).abs().max().item()
    assert diff <= TOL, f"{name} on {case}: max difference {diff:.2e}"


@pytest.mark.parametrize("case", parity_cases())
def test_eigen_cam_equals_pytorch_grad_cam_up_to_the_svd_sign(case):
    _, model, layer, x = case_named(case)
    classes = top_classes(model, x)
    module = dict(model.named_modules())[layer]
    a, _ = hook_reference(model, x, classes, layer)
    from torchray_like.attribution.eigen_cam import eigen_cam_projection

    p = eigen_cam_projection(a)
    theirs = run_pgc("eigen_cam", model, module, x, classes)
    same = (pgc_view(p.clamp(min=0), x.shape[2:]) - theirs).abs().flatten(1).amax(1)
    flipped = (pgc_view((-p).clamp(min=0), x.shape[2:]) - theirs).abs().flatten(1).amax(1)
    assert bool((torch.minimum(same, flipped) <= TOL).all()), (same, flipped)
    assert torch.allclose(METHODS["eigen_cam"](model, x, classes, layer), p.clamp(min=0),
                          atol=1e-6)


@pytest.mark.parametrize("case", parity_cases())
@pytest.mark.parametrize("name", ["score_cam", "ablation_cam"])
def test_perturbation_cams_equal_pytorch_grad_cam(case, name):
    _, model, layer, x = case_named(case)
    # One 64² image, and a 128-channel layer: 128 forward passes per method and library.
    layer = PERTURBATION_LAYERS.get(case, layer)
    x = x[:1, :, :64, :64]
    classes = top_classes(model, x)
    options = {"align_corners": True} if name == "score_cam" else {}
    ours = METHODS[name](model, x, classes, layer, batch_size=64, **options)
    theirs = run_pgc(name, model, dict(model.named_modules())[layer], x, classes)
    diff = (pgc_view(ours, x.shape[2:]) - theirs).abs().max().item()
    assert diff <= TOL, f"{name} on {case}: max difference {diff:.2e}"


# ---------------------------------------------------------------------------------------------
# TorchCAM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", parity_cases())
@pytest.mark.parametrize("name", sorted(TCAM_CLASSES))
def test_gradient_cams_equal_torchcam(case, name):
    _, model, layer, x = case_named(case)
    classes = top_classes(model, x)
    ours = METHODS[name](model, x, classes, layer)
    theirs = run_tcam(TCAM_CLASSES[name], model, layer, x, classes)
    diff = (rescale(ours[:, 0], 1e-8) - theirs).abs().max().item()
    assert diff <= TOL, f"{name} on {case}: max difference {diff:.2e}"


@pytest.mark.parametrize("case", ["resnet18", "embedded-vgg"])
def test_torchcam_grad_cam_plus_plus_drops_the_papers_denominator(case):
    """TorchCAM 0.5's GradCAMpp: the maps of the weights Σ g² ReLU(g), not the paper's."""
    _, model, layer, x = case_named(case)
    classes = top_classes(model, x)
    a, g = hook_reference(model, x, classes, layer)
    theirs = run_tcam("GradCAMpp", model, layer, x, classes)
    without = channel_sum((g ** 2 * g.clamp(min=0)).sum((2, 3)), a)[:, 0]
    assert (rescale(without, 1e-8) - theirs).abs().max() <= TOL
    ours = METHODS["grad_cam_plus_plus"](model, x, classes, layer)[:, 0]
    assert (rescale(ours, 1e-8) - theirs).abs().max() > 10 * TOL


def test_score_cam_equals_torchcam_at_the_input_resolution():
    """TorchCAM normalises each channel before upsampling it: the same masks when the layer
    has the input's resolution (here the embedded VGG's first block, 16 channels)."""
    _, model, _, x = case_named("embedded-vgg")
    classes = top_classes(model, x)
    ours = METHODS["score_cam"](model, x, classes, "features.1")
    theirs = run_tcam("ScoreCAM", model, "features.1", x, classes)
    assert ours.shape[2:] == x.shape[2:]
    assert (rescale(ours[:, 0], 1e-8) - theirs).abs().max() <= TOL
