"""Video and 3-D volume sweep: torchvision's video networks (random weights) and a small
volume classifier with a single-logit head, explained by every method that reads 3-D input.

Numbers are checked against independent computations where the maths allows: the gradient
and Grad-CAM by hand with autograd (a forward hook at the chosen layer), occlusion of a linear
model by hand, integrated gradients' completeness, LRP's conservation on a bias-free model and
the binary-head rule (target 1 explains ``+logit``, target 0 ``-logit``)."""

from __future__ import annotations

import copy
import functools
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from scipy import ndimage

from torchray_like.attribution import METHODS
from torchray_like.attribution.driver import SaliencyDebug
from torchray_like.attribution.layer_choice import (
    BranchLayerWarning,
    LayerChoice,
    choose_layer,
    find_contrast_layer,
    find_saliency_layer,
)
from torchray_like.attribution.lrp import lrp_conservation
from torchray_like.attribution.maps import Shape
from torchray_like.attribution.registry import TRANSFORMER_ONLY_METHODS
from torchray_like.attribution.targets import TorchRayDifferenceWarning

from .conftest import (
    RefDeconvReLU,
    RefGuidedReLU,
    assert_same_state,
    reference_map,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: Video networks -> input.  r3d / r(2+1)d halve time three times: 16 frames keep 2 frames at
#: layer4 (a spatio-temporal map); mc3 keeps its 4 frames (3-D convolutions only in the stem).
VIDEO = {"r3d_18": (1, 3, 16, 32, 32), "mc3_18": (1, 3, 4, 32, 32),
         "r2plus1d_18": (1, 3, 16, 32, 32)}
#: Methods whose map has the input's resolution (linear_approx reads the input by default);
#: Grad-CAM reads the automatic layer.
INPUT_RES = ["gradient", "guided_backprop", "deconvnet", "linear_approx", "excitation_backprop",
             "lrp_epsilon_plus_flat", "integrated_gradients", "occlusion"]
LAYER_RES = ["grad_cam"]
FAST = {"integrated_gradients": {"n_steps": 2}, "smooth_grad": {"n_samples": 2},
        "occlusion": {"window": (2, 4, 4), "stride": (2, 4, 4)},
        "rise": {"num_masks": 16, "num_cells": 2},
        "extremal_perturbation": {"max_iter": 3, "areas": [0.3], "step": 2, "sigma": 1.5}}

#: Occlusion on videos: 2-frame, 16 x 16 windows (the volume's 2 x 4 x 4 would take hundreds of
#: forward passes).
VIDEO_OPTIONS = {"occlusion": {"window": (2, 16, 16), "stride": (2, 16, 16)}}


@functools.lru_cache(maxsize=None)
def video_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models.video, name)(num_classes=5).eval()


def video_input(name: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(VIDEO[name])


class VolumeNet(nn.Module):
    """A 3-D volume classifier: Conv3d, BatchNorm3d, in-place ReLU, MaxPool3d, a residual sum
    and a single-logit (binary) head.  ``bias=False``: no bias anywhere and BatchNorm with zero
    mean (a pure scaling in eval mode), so LRP conserves relevance."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv3d(1, 4, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm3d(4, affine=bias)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d(2)
        self.block = nn.Conv3d(4, 4, 3, padding=1, bias=bias)
        self.relu2 = nn.ReLU(inplace=True)
        self.gap = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(4, 1, bias=bias)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)
            if bias:
                self.bn.running_mean.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.bn(self.stem(x))))
        h = h + self.relu2(self.block(h))
        return self.head(self.gap(h).flatten(1))


def volume() -> tuple:
    model = VolumeNet().eval()
    torch.manual_seed(2)
    return model, torch.rand(2, 1, 6, 8, 8)


def call(name: str, model: nn.Module, x: torch.Tensor, target, **kwargs) -> torch.Tensor:
    """``METHODS[name]`` with the fast options, checking the model's state is left as found."""
    before = snapshot(model, x)
    smap = METHODS[name](model, x, target, **{**FAST.get(name, {}), **kwargs})
    assert_same_state(before, snapshot(model, x))
    return smap


def check_map(smap: torch.Tensor, shape: tuple, x: torch.Tensor) -> None:
    assert smap.shape == shape and smap.dtype == x.dtype
    assert torch.isfinite(smap).all() and smap.abs().sum() > 0


def layer_output(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    outs = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: outs.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return outs[0]


def layer_by_hand(model: nn.Module, layer: str, x: torch.Tensor, sign: float,
                  columns: list) -> tuple:
    """``(A, ∂y/∂A)`` at ``layer`` for ``y = Σ_n sign · out[n, columns[n]]``, with a forward hook
    and autograd.  ReLUs made out of place on a copy (the numbers are the same) so the hooked
    output stays intact."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    outs = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: outs.append(o))
    try:
        out = model(x)
        score = sign * out[torch.arange(len(columns)), torch.tensor(columns)]
        (grad,) = torch.autograd.grad(score.sum(), outs[0])
    finally:
        handle.remove()
    return outs[0].detach(), grad


def grad_cam_by_hand(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_k mean_u(∂y/∂A_k) A_k), Selvaraju et al. 2017 eq. 1-2."""
    alpha = grad.mean(dim=tuple(range(2, act.dim())), keepdim=True)
    return (alpha * act).sum(1, keepdim=True).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# Video networks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VIDEO))
def test_video_networks_every_method_gives_a_finite_spatio_temporal_map(name):
    model, x = video_model(name), video_input(name)
    layer = layer_output(model, "layer4", x)
    assert layer.dim() == 5 and layer.shape[2] > 1  # T x H x W positions, T > 1
    with warnings.catch_warnings():
        # Only excitation backprop's note on torchvision's residual '+' (8 blocks) is expected.
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "excitation backprop split the signal of 8 residual",
                                TorchRayDifferenceWarning)
        for method in INPUT_RES:
            check_map(call(method, model, x, 3, **VIDEO_OPTIONS.get(method, {})),
                      (1, 1) + tuple(x.shape[2:]), x)
        for method in LAYER_RES:
            check_map(call(method, model, x, 3), (1, 1) + tuple(layer.shape[2:]), x)


@pytest.mark.parametrize("name", sorted(VIDEO))
def test_video_networks_gradient_and_grad_cam_by_hand(name):
    # Two clips (the second reversed in time), one class each.
    x = video_input(name)
    model, x, targets = video_model(name), torch.cat([x, x.flip(2)]), [3, 1]
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[[0, 1], targets].sum(), xg)
    torch.testing.assert_close(call("gradient", model, x, targets),
                               grad.abs().amax(1, keepdim=True))
    torch.testing.assert_close(call("linear_approx", model, x, targets),
                               (grad * x).sum(1, keepdim=True))
    # The automatic layer: layer4, the last block before pooling, read as (N, C, T, H, W).
    assert find_saliency_layer(model, x) == "layer4"
    act, grad = layer_by_hand(model, "layer4", x, 1.0, targets)
    cam = call("grad_cam", model, x, targets)
    assert cam.shape == (2, 1) + act.shape[2:]
    assert cam.shape[2:].numel() == 2 * 2 * (4 if name == "mc3_18" else 2)  # T x H x W
    torch.testing.assert_close(cam, grad_cam_by_hand(act, grad), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(call("linear_approx", model, x, targets, saliency_layer="layer4"),
                               (act * grad).sum(1, keepdim=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(VIDEO) + ["volume"])
def test_guided_backprop_and_deconvnet_by_hand(name):
    """Against plain autograd with hand-written rectifier rules (conftest's references)."""
    if name == "volume":
        (model, x), target, column = volume(), 1, 0  # target 1 of the binary head: column 0
    else:
        model, x, target, column = video_model(name), video_input(name), 3, 3
    for method, rule in (("guided_backprop", RefGuidedReLU), ("deconvnet", RefDeconvReLU)):
        expected = reference_map(model, x, column, rule)
        torch.testing.assert_close(call(method, model, x, target), expected,
                                   rtol=1e-4, atol=1e-7)


def test_video_occlusion_takes_a_3d_window_and_stride():
    name = "mc3_18"
    model, x = video_model(name), video_input(name)
    smap = call("occlusion", model, x, 2, window=(2, 16, 16), stride=(2, 16, 16))
    # Non-overlapping 2 x 16 x 16 windows: the map is constant on each of the 2 x 2 x 2 blocks.
    blocks = smap.reshape(1, 1, 2, 2, 2, 16, 2, 16)
    assert torch.equal(blocks, blocks[..., :1, :, :1].expand_as(blocks))
    base = x.clone()
    base[:, :, 2:4, 16:32, 0:16] = 0
    with torch.no_grad():
        drop = model(x)[0, 2] - model(base)[0, 2]
    torch.testing.assert_close(smap[0, 0, 3, 20, 5], drop, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The volume classifier
# ---------------------------------------------------------------------------------------------

VOLUME_METHODS = INPUT_RES + LAYER_RES + ["rise", "extremal_perturbation"]


@pytest.mark.parametrize("method", VOLUME_METHODS)
@pytest.mark.parametrize("target", [1, 0])
def test_volume_every_method_gives_its_map_for_both_binary_targets(method, target):
    model, x = volume()
    expected = (2, 1, 3, 4, 4) if method in LAYER_RES else (2, 1, 6, 8, 8)
    with warnings.catch_warnings():
        # Expected: target 0's TorchRay note, excitation's note on the residual sum, the
        # automatic layer's note that it is a branch (test below); no other.
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "saliency_layer was chosen automatically: 'relu2'",
                                BranchLayerWarning)
        warnings.filterwarnings("ignore", "target 0 on a single-logit head",
                                TorchRayDifferenceWarning)
        warnings.filterwarnings("ignore", "excitation backprop split the signal of 1 residual",
                                TorchRayDifferenceWarning)
        check_map(call(method, model, x, target), expected, x)


@pytest.mark.parametrize("method", ["linear_approx", "excitation_backprop",
                                    "lrp_epsilon_plus_flat", "occlusion",
                                    "integrated_gradients"])
def test_volume_binary_target_zero_is_the_negated_logit_for_signed_methods(method):
    """Target 0 explains -logit: a method linear in the explained score negates its map."""
    model, x = volume()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TorchRayDifferenceWarning)
        pos, neg = (call(method, model, x, t) for t in (1, 0))
    assert pos.abs().sum() > 0
    torch.testing.assert_close(neg, -pos)


def test_volume_rise_scores_the_binary_head_by_its_probabilities():
    """RISE weighs masks by sigmoid(z) for target 1 and 1 - sigmoid(z) for target 0."""
    model, x = volume()
    for target, prob in ((1, lambda out: torch.sigmoid(out[:, 0])),
                         (0, lambda out: 1 - torch.sigmoid(out[:, 0]))):
        torch.testing.assert_close(call("rise", model, x, target), call("rise", model, x, prob))


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(TRANSFORMER_ONLY_METHODS)))
def test_volume_in_training_mode_every_method_explains_eval_and_restores_the_state(method):
    """A volume model left in training mode (BatchNorm3d would use batch statistics), its stem
    frozen, a stale .grad on the head and an input that requires grad: each method explains
    the eval-mode network and leaves every flag, hook, gradient and value as it found them."""
    model, x = volume()
    kwargs = {"contrast_layer": "pool"} if method == "contrastive_excitation_backprop" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TorchRayDifferenceWarning)  # excitation's residual '+'
        expected = METHODS[method](model, x, 1, **{**FAST.get(method, {}), **kwargs})
        model.train()
        model.stem.requires_grad_(False)
        model.head.weight.grad = torch.ones_like(model.head.weight)
        x.requires_grad_(True)
        smap = call(method, model, x, 1, **kwargs)
    torch.testing.assert_close(smap, expected)
    assert model.training and model.bn.training and not model.stem.weight.requires_grad


def test_volume_grad_cam_layer_and_map_by_hand():
    model, x = volume()
    # The last module with a spatial output: the block's ReLU before the residual sum.
    assert find_saliency_layer(model, x) == "relu2"
    for target, sign in ((1, 1.0), (0, -1.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TorchRayDifferenceWarning)
            cam = call("grad_cam", model, x, target)
        expected = grad_cam_by_hand(*layer_by_hand(model, "relu2", x, sign, [0, 0]))
        assert cam.shape == (2, 1, 3, 4, 4)  # T x H x W = 3 x 4 x 4 positions
        torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-7)
    # +logit and -logit give complementary maps: where one is positive the other is zero.
    with pytest.warns(TorchRayDifferenceWarning, match="target 0 on a single-logit head"):
        neg = METHODS["grad_cam"](model, x, 0)
    assert not (neg * METHODS["grad_cam"](model, x, 1)).any()


def test_volume_binary_head_gradient_follows_the_sign_rule():
    model, x = volume()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)
    _, dbg1 = METHODS["gradient"](model, x, 1, debug=True)
    with pytest.warns(TorchRayDifferenceWarning, match=r"explains -logit"):
        _, dbg0 = METHODS["gradient"](model, x, 0, debug=True)
    assert isinstance(dbg1, SaliencyDebug)
    torch.testing.assert_close(dbg1.gradient, grad)
    torch.testing.assert_close(dbg0.gradient, -grad)
    torch.testing.assert_close(call("gradient", model, x, 1), grad.abs().amax(1, keepdim=True))
    with pytest.raises(ValueError, match="single-logit"):
        METHODS["gradient"](model, x, 2)


def test_volume_integrated_gradients_is_complete_and_flips_with_the_target():
    model, x = volume()
    smap, delta = METHODS["integrated_gradients"](model, x, 1, n_steps=32,
                                                   return_convergence_delta=True)
    with torch.no_grad():
        gap = model(x)[:, 0] - model(torch.zeros_like(x))[:, 0]
    # Piecewise-linear (ReLU, max pooling): 32 Gauss-Legendre nodes leave ~0.2 % of the gap.
    torch.testing.assert_close(smap.sum((1, 2, 3, 4)), gap, rtol=5e-3, atol=1e-5)
    torch.testing.assert_close(delta, smap.sum((1, 2, 3, 4)) - gap, rtol=1e-3, atol=1e-6)
    neg = METHODS["integrated_gradients"](model, x, 0, n_steps=32)
    torch.testing.assert_close(neg, -smap)


def test_volume_lrp_conserves_relevance_without_biases():
    model = VolumeNet(bias=False).eval()
    torch.manual_seed(3)
    x = torch.rand(2, 1, 6, 8, 8)
    sums = lrp_conservation(model, x, 1, ("stem",), composite="EpsilonPlusFlat")
    assert (sums["score"].abs() > 1e-3).all()
    # The composite's ε = 1e-6 absorbs next to nothing (test_lrp.py's tolerance).
    for key in ("input", "stem"):
        torch.testing.assert_close(sums[key], sums["score"], rtol=1e-4, atol=1e-7)
    # The map's sum over the input is the same relevance.
    smap = call("lrp", model, x, 1, composite="EpsilonPlusFlat")
    torch.testing.assert_close(smap.sum((1, 2, 3, 4)), sums["input"], rtol=1e-5, atol=1e-7)


def test_volume_maps_are_smoothed_and_resized_in_3d():
    model, x = volume()
    for method in ("gradient", "grad_cam"):
        raw = call(method, model, x, 1)
        smoothed = call(method, model, x, 1, smooth=0.1)
        # sigma = smooth x the map's longest side, a 3-D Gaussian with replicated borders.
        sigma = 0.1 * max(raw.shape[2:])
        expected = ndimage.gaussian_filter(raw.double().numpy(), (0, 0, sigma, sigma, sigma),
                                           mode="nearest", truncate=4.0)
        torch.testing.assert_close(smoothed, torch.from_numpy(expected).float())
        assert smoothed.shape == raw.shape and not torch.allclose(smoothed, raw)
        for resize in (True, Shape(6, 8, 8)):
            assert call(method, model, x, 1, resize=resize).shape == (2, 1, 6, 8, 8)
        # A plain tuple is TorchRay's (reversed) order: (W, H, T).
        assert call(method, model, x, 1, resize=(8, 7, 5)).shape == (2, 1, 5, 7, 8)
        with pytest.raises(ValueError, match="resize"):
            call(method, model, x, 1, resize=(8, 8))


# ---------------------------------------------------------------------------------------------
# Occlusion of a linear model: the answer by hand
# ---------------------------------------------------------------------------------------------


def occlusion_by_hand(weight: torch.Tensor, x: torch.Tensor, window: tuple, stride: tuple,
                      baseline: torch.Tensor) -> torch.Tensor:
    """Mean over the windows covering each element of ``w · (x - baseline)`` in the window (the
    score drop of a linear model when the window, every channel, is set to the baseline); the
    last window along an axis is cut at the border."""
    spatial = x.shape[2:]
    total = torch.zeros(x.shape[0], 1, *spatial, dtype=x.dtype)
    count = torch.zeros(spatial, dtype=x.dtype)
    starts = [range(0, max(size - w, 0) + s, s) for size, w, s in zip(spatial, window, stride)]
    diff = x - baseline
    for corner in itertools.product(*starts):
        sl = tuple(slice(c, min(c + w, size)) for c, w, size in zip(corner, window, spatial))
        drop = (weight[(slice(None), slice(None)) + sl]
                * diff[(slice(None), slice(None)) + sl]).sum(tuple(range(1, x.dim())))
        total[(slice(None), slice(None)) + sl] += drop.view(-1, 1, 1, 1, 1)
        count[sl] += 1
    return total / count


@pytest.mark.parametrize("window, stride, baseline", [
    ((2, 3, 3), (1, 2, 2), 0.0), ((1, 2, 3), (1, 2, 3), 0.0), (2, 1, 0.0),
    # One value per channel, shaped (1, C, 1, 1, 1).
    ((2, 3, 3), (2, 3, 3), torch.tensor([0.5, -1.0]).view(1, 2, 1, 1, 1))])
def test_occlusion_of_a_linear_volume_model_by_hand(window, stride, baseline):
    torch.manual_seed(4)
    spatial = (4, 6, 5)  # 6 and 5 with window 3, stride 2: the last window is cut (6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 6 * 5, 3)).eval()
    x = torch.randn(2, 2, *spatial)
    smap = call("occlusion", model, x, 1, window=window, stride=stride, baseline=baseline)
    weight = model[1].weight[1].detach().view(1, 2, *spatial)
    win = window if isinstance(window, tuple) else (window,) * 3
    step = stride if isinstance(stride, tuple) else (stride,) * 3
    expected = occlusion_by_hand(weight, x, win, step, torch.as_tensor(baseline))
    assert smap.shape == (2, 1) + spatial
    # reduce="mean": the map is the attribution of a position (every channel shares it).
    torch.testing.assert_close(smap, expected, rtol=1e-5, atol=1e-6)


def test_occlusion_refuses_a_3d_window_of_the_wrong_length_or_too_large():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 6 * 5, 3)).eval()
    x = torch.randn(1, 2, 4, 6, 5)
    with pytest.raises(ValueError, match="window"):
        METHODS["occlusion"](model, x, 1, window=(2, 2))
    with pytest.raises(ValueError, match="window"):
        METHODS["occlusion"](model, x, 1, window=(5, 2, 2))
    with pytest.raises(ValueError, match="stride"):
        METHODS["occlusion"](model, x, 1, window=(2, 2, 2), stride=(1, 3, 1))


# ---------------------------------------------------------------------------------------------
# Per-axis options on 3-D input, and what is refused
# ---------------------------------------------------------------------------------------------


def test_volume_perturbation_options_take_three_values_or_refuse_two():
    model, x = volume()
    smap = call("rise", model, x, 1, num_cells=(2, 3, 3))
    check_map(smap, (2, 1, 6, 8, 8), x)
    with pytest.raises(ValueError, match=r"num_cells must be an int or 3 ints"):
        METHODS["rise"](model, x, 1, num_masks=16, num_cells=(2, 3))
    smap = call("extremal_perturbation", model, x, 1, step=(1, 2, 2), sigma=(1.0, 1.5, 1.5))
    check_map(smap, (2, 1, 6, 8, 8), x)
    with pytest.raises(ValueError, match=r"step must be one integer .* or 3 of them"):
        METHODS["extremal_perturbation"](model, x, 1, max_iter=3, step=(1, 2), sigma=1.5)


def test_volume_map_options_that_do_not_fit_3d_are_refused_clearly():
    model, x = volume()
    with pytest.raises(ValueError, match=r"resize_mode 'bicubic' needs 2 spatial dimensions, "
                                         r"the map has 3"):
        METHODS["grad_cam"](model, x, 1, resize=True, resize_mode="bicubic")
    for mode in ("trilinear", "nearest", "area"):
        assert call("grad_cam", model, x, 1, resize=True, resize_mode=mode).shape == (
            2, 1, 6, 8, 8)
    with pytest.raises(ValueError, match="smooth must be a non-negative number"):
        METHODS["gradient"](model, x, 1, smooth=(0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="saliency_layer 'head' outputs shape .2, 1., which has "
                                         "no spatial dimensions"):
        METHODS["grad_cam"](model, x, 1, saliency_layer="head")


def test_volume_automatic_layer_on_a_branch_warns_and_names_the_last_cut():
    """The residual sum is written in forward (h + relu2(block(h))): Grad-CAM's rule picks
    relu2, which the skip goes around; it warns naming the last layer every path crosses (the
    pooling), and Grad-CAM there equals the call naming it."""
    model, x = volume()
    assert choose_layer(model, x) == LayerChoice("relu2", "pool")
    with pytest.warns(BranchLayerWarning, match=r"'relu2', the last layer that qualifies, lies "
                      r"on one branch of VolumeNet .* pass saliency_layer='pool' for the whole "
                      r"network, or pass saliency_layer='relu2' to keep this one"):
        assert find_saliency_layer(model, x) == "relu2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a named layer: no warning
        at_pool = call("grad_cam", model, x, 1, saliency_layer="pool")
        at_relu2 = call("grad_cam", model, x, 1, saliency_layer="relu2")
    with pytest.warns(BranchLayerWarning):
        torch.testing.assert_close(call("grad_cam", model, x, 1), at_relu2)
    assert not torch.allclose(at_pool, at_relu2)
    # Without the skip, relu2 cuts the network: no warning.
    plain = copy.deepcopy(model)
    plain.forward = lambda h: plain.head(plain.gap(plain.relu2(plain.block(plain.pool(
        plain.relu(plain.bn(plain.stem(h))))))).flatten(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_saliency_layer(plain, x) == "relu2"


def test_volume_contrastive_excitation_contrasts_at_the_last_layer_that_cuts_the_network():
    """The contrast needs a layer every path crosses: the automatic contrast layer is the
    pooling, not Grad-CAM's relu2 (which the skip goes around); the map equals the call naming
    it, and naming relu2 is refused, naming contrast_layer."""
    model, x = volume()
    assert find_contrast_layer(model, x) == "pool"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TorchRayDifferenceWarning)
        auto = call("contrastive_excitation_backprop", model, x, 1)
        smap = call("contrastive_excitation_backprop", model, x, 1, contrast_layer="pool")
        with pytest.raises(ValueError, match=r"contrast_layer 'relu2' does not cut the network"):
            METHODS["contrastive_excitation_backprop"](model, x, 1, contrast_layer="relu2")
    check_map(smap, (2, 1, 6, 8, 8), x)
    torch.testing.assert_close(auto, smap)


@pytest.mark.parametrize("method", ["gradient", "grad_cam", "integrated_gradients", "rise",
                                    "occlusion", "lrp", "extremal_perturbation"])
def test_an_image_given_to_a_volume_model_is_a_value_error_naming_the_dimensions(method):
    """Was conv3d's RuntimeError about a 5-D input the caller never made ("expected
    input[1, 50, 3, 16, 16]" from integrated gradients' batch of steps)."""
    model = VolumeNet().eval()
    image = torch.rand(2, 1, 16, 16)  # (two images: (1, 1, 16, 16) is also one unbatched clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (extremal perturbation's sigma note on small inputs)
        with pytest.raises(ValueError, match=r"input has shape \(2, 1, 16, 16\), 2 spatial "
                                             r"dimension\(s\); the model's first convolution "
                                             r"\(Conv3d, in_channels=1\) takes a batch \(N, C, "
                                             r"T, H, W\) with C=1, 3 spatial dimension\(s\) "
                                             r"\(one frame as a clip: x.unsqueeze\(2\)\)"):
            METHODS[method](model, image, 1)


def test_a_clip_given_to_an_image_model_names_the_dimensions():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match=r"input has shape \(1, 3, 4, 8, 8\), 3 spatial "
                                         r"dimension\(s\); the model's first convolution "
                                         r"\(Conv2d, in_channels=3\) takes a batch \(N, C, H, "
                                         r"W\) with C=3, 2 spatial dimension\(s\)$"):
        METHODS["gradient"](model, torch.rand(1, 3, 4, 8, 8), 1)
