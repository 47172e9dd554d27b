"""The gradient-weighted CAM family (issue 19): Grad-CAM++, Layer-CAM, XGrad-CAM, HiResCAM and
Eigen-CAM against hand computations written here, their sharing of Grad-CAM's pass inside
``explain``, and the hostile cases of each formula.  Parity with pytorch-grad-cam and TorchCAM is
in ``test_cam_parity.py``; Score-CAM and Ablation-CAM in ``test_cam_perturbation.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import torchray_like
from torchray_like.attribution.context import TorchRayDifferenceWarning
from torchray_like.attribution.eigen_cam import (
    eigen_cam,
    eigen_cam_map,
    eigen_cam_projection,
    first_right_singular_vector,
)
from torchray_like.attribution.explain import explain
from torchray_like.attribution.grad_cam import grad_cam
from torchray_like.attribution.grad_cam_plus_plus import (
    grad_cam_plus_plus,
    grad_cam_plus_plus_map,
    gradient_to_grad_cam_plus_plus_saliency,
)
from torchray_like.attribution.hires_cam import hires_cam, hires_cam_map
from torchray_like.attribution.layer_cam import layer_cam, layer_cam_map
from torchray_like.attribution.layer_choice import find_saliency_layer
from torchray_like.attribution.method import description
from torchray_like.attribution.registry import METHODS, SHARED_METHODS
from torchray_like.attribution.xgrad_cam import xgrad_cam, xgrad_cam_map

from .conftest import (
    ConvNet,
    assert_same_state,
    batch,
    hook_reference,
    inputs,
    make,
    make_torchvision,
    primed_model_and_input,
    snapshot,
)

GRADIENT_CAMS = {"grad_cam_plus_plus": grad_cam_plus_plus, "layer_cam": layer_cam,
                 "xgrad_cam": xgrad_cam, "hires_cam": hires_cam, "eigen_cam": eigen_cam}
MAPS = {"grad_cam_plus_plus": grad_cam_plus_plus_map, "layer_cam": layer_cam_map,
        "xgrad_cam": xgrad_cam_map, "hires_cam": hires_cam_map, "eigen_cam": eigen_cam_map}


# ---------------------------------------------------------------------------------------------
# Hand computations (float64, element by element where it matters)
# ---------------------------------------------------------------------------------------------


def paper_grad_cam_plus_plus(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Chattopadhay et al. eq. 19 and 10 as written: α = g² / (2g² + ΣA·g³), 0 where g = 0."""
    spatial = tuple(range(2, a.dim()))
    total = a.sum(spatial, keepdim=True)
    denom = 2 * g ** 2 + total * g ** 3
    alpha = torch.where(g != 0, g ** 2 / torch.where(g != 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(g))
    w = (alpha * g.clamp(min=0)).sum(spatial, keepdim=True)
    return (w * a).sum(1, keepdim=True).clamp(min=0)


def reference(name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    spatial = tuple(range(2, a.dim()))
    if name == "grad_cam_plus_plus":
        return paper_grad_cam_plus_plus(a, g)
    if name == "layer_cam":
        return (g.clamp(min=0) * a).sum(1, keepdim=True).clamp(min=0)
    if name == "hires_cam":
        return (g * a).sum(1, keepdim=True).clamp(min=0)
    if name == "xgrad_cam":
        total = a.sum(spatial, keepdim=True)
        w = (a * g).sum(spatial, keepdim=True) / total
        w = torch.where(total == 0, torch.zeros_like(w), w)   # all-zero channels (ReLU)
        return (w * a).sum(1, keepdim=True).clamp(min=0)
    return numpy_eigen(a).clamp(min=0)


def numpy_eigen(a: torch.Tensor) -> torch.Tensor:
    """First principal component by NumPy's SVD, sign chosen by correlation with the channel
    mean (independent of the library's code)."""
    out = []
    for sample in a.double().numpy():
        x = sample.reshape(sample.shape[0], -1).T
        x = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        p = x @ vt[0]
        mean_map = x.mean(axis=1)
        if np.dot(p, mean_map - mean_map.mean()) < 0:
            p = -p
        out.append(p.reshape((1,) + sample.shape[1:]))
    return torch.from_numpy(np.stack(out)).to(a.dtype)


@pytest.mark.parametrize("name", sorted(GRADIENT_CAMS))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_method_equals_hand_computation(name, dims):
    model, x = make(dims, relu_after=True), batch(dims)
    classes = [0, 2, 3]
    a, g = hook_reference(model, x, classes, "act")
    got = GRADIENT_CAMS[name](model, x, classes, "act")
    want = reference(name, a, g)
    assert got.shape == (3, 1) + x.shape[2:] and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got - want).abs().max()
    assert got.min() >= 0 and got.max() > 0


@pytest.mark.parametrize("name", sorted(GRADIENT_CAMS))
def test_map_function_equals_method_and_flattener(name):
    model, x = make(2, relu_after=True), batch(2)
    a, g = hook_reference(model, x, [1, 1, 1], "act")
    assert torch.equal(MAPS[name](a, g), GRADIENT_CAMS[name](model, x, 1, "act"))
    leaf = a.clone().requires_grad_(True)
    leaf.grad = g
    assert torch.equal(description(GRADIENT_CAMS[name]).gradient_to_saliency(leaf),
                       MAPS[name](a, g))


def test_grad_cam_plus_plus_is_the_closed_form_without_the_libraries_epsilon():
    # Tiny gradients: the paper's α is scale-free (≈ 1/2 here), an ε of 1e-6 would not be.
    torch.manual_seed(0)
    a = torch.rand(2, 4, 3, 3, dtype=torch.float64)
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64) * 1e-4
    got = grad_cam_plus_plus_map(a, g)
    assert torch.allclose(got, paper_grad_cam_plus_plus(a, g), rtol=1e-10, atol=0)
    # pytorch-grad-cam's ε = 1e-6 in the denominator would change these weights by far more
    # than rounding: g² ≈ 1e-8 is small next to it.
    spatial = (2, 3)
    alpha_eps = g ** 2 / (2 * g ** 2 + a.sum(spatial, keepdim=True) * g ** 3 + 1e-6)
    w_eps = (alpha_eps * g.clamp(min=0)).sum(spatial, keepdim=True)
    with_eps = (w_eps * a).sum(1, keepdim=True).clamp(min=0)
    assert ((with_eps - got).abs().max() / got.max()) > 0.5
    # No underflow: g³ of a float32 gradient of 1e-15 is 0, g / (2 + Σ A g) is not.
    tiny = grad_cam_plus_plus_map(a.float(), (g * 1e-11).float())
    assert tiny.max() > 0 and torch.isfinite(tiny).all()


def test_grad_cam_plus_plus_infinite_alpha_is_an_error():
    # Σ_u A = -2 and g = 1: the denominator 2g² + ΣA·g³ is 0 at a positive gradient.
    a = torch.tensor([[[[-1.0, -1.0], [0.0, 0.0]]]])
    with pytest.raises(ValueError, match="alpha is infinite for sample 0, channel 0.*after its "
                                         "ReLU"):
        grad_cam_plus_plus_map(a, torch.ones_like(a))
    # A negative gradient there contributes nothing (ReLU(g) = 0): no error, zero weight.
    assert torch.equal(grad_cam_plus_plus_map(a, -torch.ones_like(a)), torch.zeros(1, 1, 2, 2))


class Pattern(nn.Module):
    """Outputs a fixed activation (differentiable in x through a zero product)."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern)

    def forward(self, x):
        return self.pattern.expand(x.shape[0], -1, -1, -1) + 0 * x[:, :1]


class PatternNet(nn.Module):
    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.layer = Pattern(pattern)

    def forward(self, x):
        return self.layer(x).flatten(2).sum(2)   # one class per channel, ∂y_k/∂A_k = 1


def test_xgrad_cam_undefined_weight_is_an_error_here_and_in_explain():
    pattern = torch.tensor([[[1.0, -1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    model, x = PatternNet(pattern).eval(), torch.randn(2, 1, 2, 2)
    message = "channel 0 of sample 0 has activations that sum to zero without all being zero"
    with pytest.raises(ValueError, match=message):
        xgrad_cam(model, x, 0, "layer")
    with pytest.raises(ValueError, match=message):
        explain(model, x, 0, ["grad_cam", "xgrad_cam"], {"grad_cam": {"saliency_layer": "layer"},
                                                         "xgrad_cam": {"saliency_layer": "layer"}})
    # An all-zero channel adds nothing, whatever its weight: weight 0, no NaN.
    a = torch.stack([pattern.abs()] * 2)
    smap = xgrad_cam_map(a, torch.ones_like(a))
    assert torch.isfinite(smap).all()
    assert torch.allclose(smap[0, 0], pattern[0].abs())   # w_0 = Σ A·1 / Σ A = 1


def test_grad_cam_plus_plus_error_through_the_method():
    pattern = torch.tensor([[[-1.0, -1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    model, x = PatternNet(pattern).eval(), torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="Grad-CAM\\+\\+: the weight alpha is infinite"):
        grad_cam_plus_plus(model, x, 0, "layer")


@pytest.mark.parametrize("name", sorted(MAPS))
def test_map_functions_refuse_bad_shapes(name):
    with pytest.raises(ValueError, match=r"spatial dimensions.*got shape \(2, 3\)"):
        MAPS[name](torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"gradient shape \(2, 3, 4\) differs"):
        MAPS[name](torch.ones(2, 3, 5), torch.ones(2, 3, 4))
    with pytest.raises(TypeError, match="must be tensors"):
        MAPS[name](np.ones((2, 3, 5)), torch.ones(2, 3, 5))


@pytest.mark.parametrize("name", sorted(GRADIENT_CAMS))
def test_layer_without_spatial_dimensions(name):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()
    with pytest.raises(ValueError, match=r"outputs shape \(2, 64\).*no spatial dimensions"):
        GRADIENT_CAMS[name](model, torch.randn(2, 3, 6, 6), 0, "1")


# ---------------------------------------------------------------------------------------------
# Eigen-CAM
# ---------------------------------------------------------------------------------------------


def test_eigen_cam_is_the_first_principal_component_with_a_fixed_sign():
    torch.manual_seed(0)
    s = torch.zeros(5, 6, dtype=torch.float64)
    s[1:3, 2:5] = 1.0                              # where every channel agrees
    loadings = torch.rand(8, dtype=torch.float64) + 0.5
    a = (loadings[:, None, None] * s + 0.01 * torch.randn(8, 5, 6, dtype=torch.float64))[None]
    p = eigen_cam_projection(a)
    assert torch.allclose(p, numpy_eigen(a), atol=1e-10)
    smap = eigen_cam_map(a)
    assert smap[0, 0, 1:3, 2:5].min() > 0.5 * smap.max() and smap[0, 0, 4].max() == 0
    # The sign is the same whichever sign the SVD returns: flipping the data's sign flips the
    # centred matrix, so the rule keeps the projection correlated with the mean activation.
    centred = a - a.mean((2, 3), keepdim=True)
    assert (p * (centred.mean(1, keepdim=True))).sum() > 0


@pytest.mark.parametrize("p, k", [(5, 12), (12, 5), (7, 7), (1, 4)])
def test_first_right_singular_vector_is_the_svds_up_to_sign(p, k):
    g = torch.Generator().manual_seed(p * 31 + k)
    x = torch.randn(3, p, k, generator=g, dtype=torch.float64)
    v = first_right_singular_vector(x)
    want = torch.linalg.svd(x, full_matrices=False)[2][:, 0]
    sign = torch.sign((v * want).sum(1, keepdim=True))
    assert v.shape == (3, k) and v.dtype == torch.float64
    assert torch.allclose(v * sign, want, atol=1e-12)
    assert torch.allclose(v.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-13)
    assert torch.equal(first_right_singular_vector(torch.zeros(2, p, k, dtype=torch.float64))
                       .isfinite(), torch.ones(2, k, dtype=torch.bool))


def test_eigen_cam_without_spatial_variation_is_zero_and_ignores_the_gradient():
    a = torch.ones(2, 3, 4, 4)
    assert torch.equal(eigen_cam_map(a), torch.zeros(2, 1, 4, 4))
    b = torch.rand(2, 3, 4, 4)
    assert torch.equal(eigen_cam_map(b, torch.randn(2, 3, 4, 4)), eigen_cam_map(b))


def test_eigen_cam_refuses_non_finite_activations():
    a = torch.rand(1, 3, 4, 4)
    a[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="Eigen-CAM: the activation holds NaN or infinite"):
        eigen_cam_map(a)
    # Finite values whose float32 sum overflows (the quick check) are still explained.
    big = torch.rand(1, 3, 4, 4) * 3e38
    assert torch.isinf(big.sum()) and torch.isfinite(eigen_cam_map(big)).all()


def test_eigen_cam_does_not_depend_on_the_target():
    model, x = make(2, relu_after=True), batch(2)
    assert torch.equal(eigen_cam(model, x, 0, "act"), eigen_cam(model, x, [3, 1, 2], "act"))


# ---------------------------------------------------------------------------------------------
# Conventions shared with Grad-CAM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GRADIENT_CAMS))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_automatic_layer_resize_and_per_sample_targets(name, dims):
    model, x = ConvNet(dims).eval(), inputs(dims, n=3)
    f = GRADIENT_CAMS[name]
    auto = f(model, x, [1, 4, 0])
    assert torch.equal(auto, f(model, x, [1, 4, 0], find_saliency_layer(model, x)))
    for i, c in enumerate([1, 4, 0]):
        assert torch.allclose(auto[i:i + 1], f(model, x[i:i + 1], c), atol=1e-6)
    resized = f(model, x, [1, 4, 0], resize=True)
    assert resized.shape == (3, 1) + x.shape[2:] and resized.dtype == x.dtype


@pytest.mark.parametrize("name", sorted(GRADIENT_CAMS))
def test_binary_head_target_zero_explains_the_negated_logit(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(5 * 16, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    a, g = hook_reference(model, x, [0, 0], "3")   # ∂z/∂A (column 0 of the (N, 1) output)
    f = GRADIENT_CAMS[name]
    assert torch.allclose(f(model, x, 1, "3"), reference(name, a.double(), g.double()).float(),
                          atol=1e-6)
    with pytest.warns(TorchRayDifferenceWarning, match="explains -logit"):
        negated = f(model, x, 0, "3")
    assert torch.allclose(negated, reference(name, a.double(), -g.double()).float(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(GRADIENT_CAMS))
def test_state_restored_after_success_and_failure(name):
    model, x = primed_model_and_input()
    before = snapshot(model, x)
    smap = GRADIENT_CAMS[name](model, x, [0, 2], "bn")
    assert smap.shape == (2, 1, 5, 5) and not smap.requires_grad
    assert_same_state(before, snapshot(model, x))
    model.armed = True
    before = snapshot(model, x)
    with pytest.raises(RuntimeError, match="boom inside the model"):
        GRADIENT_CAMS[name](model, x, 1, "bn")
    assert_same_state(before, snapshot(model, x))


# ---------------------------------------------------------------------------------------------
# One forward pass for the whole family in explain
# ---------------------------------------------------------------------------------------------


FAMILY = ["grad_cam", "grad_cam_plus_plus", "layer_cam", "xgrad_cam", "hires_cam", "eigen_cam"]


def count_forwards(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda m, args: calls.append(1))


@pytest.mark.parametrize("net", ["resnet18", "vgg11", "convnet3d"])
def test_explain_shares_one_forward_and_equals_the_separate_calls(net):
    if net == "convnet3d":
        model, x = ConvNet(3).eval(), inputs(3, n=2)
    else:
        model, x = make_torchvision(net), torch.randn(2, 3, 64, 64)
    target = [3, 1]
    find_saliency_layer(model, x)   # cached: the calls below are the methods' own passes
    want = {name: METHODS[name](model, x, target) for name in FAMILY}
    calls, handle = count_forwards(model)
    try:
        got = explain(model, x, target, FAMILY)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert list(got) == FAMILY
    for name in FAMILY:
        assert torch.equal(got[name], want[name]), name
    # Each call alone costs one forward pass too.
    calls, handle = count_forwards(model)
    try:
        METHODS["layer_cam"](model, x, target)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_family_is_registered_shared_and_in_the_flat_namespace():
    for name in GRADIENT_CAMS:
        assert name in SHARED_METHODS and METHODS[name] is GRADIENT_CAMS[name]
        assert getattr(torchray_like, name) is GRADIENT_CAMS[name]
        assert GRADIENT_CAMS[name].__module__ == f"torchray_like.attribution.{name}"
        assert description(GRADIENT_CAMS[name]).auto_layer
    assert "score_cam" not in SHARED_METHODS and "ablation_cam" not in SHARED_METHODS
    assert grad_cam is METHODS["grad_cam"]


def test_flattener_name_in_the_docstring_and_manual_probe_use():
    assert ":func:`gradient_to_grad_cam_plus_plus_saliency`" in grad_cam_plus_plus.__doc__
    with pytest.raises(ValueError, match="gradient_to_grad_cam_plus_plus_saliency: the tensor "
                                         "has no .grad"):
        gradient_to_grad_cam_plus_plus_saliency(torch.ones(1, 2, 3, 3))


# ---------------------------------------------------------------------------------------------
# Eigen-CAM reads no gradient: a call of its own runs no backward pass
# ---------------------------------------------------------------------------------------------


class _CountBackward(torch.autograd.Function):
    """The identity, counting (or refusing) its backward passes."""

    calls = 0
    refuse = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _CountBackward.calls += 1
        if _CountBackward.refuse:
            raise RuntimeError("no backward pass was expected")
        return grad


class _Counted(nn.Module):
    """``make(2)``'s network with the counting identity on the head's input."""

    def __init__(self):
        super().__init__()
        self.net = make(2, relu_after=True)

    def forward(self, x):
        self.net.act.register_forward_hook(lambda m, a, o: _CountBackward.apply(o))
        try:
            return self.net(x)
        finally:
            self.net.act._forward_hooks.clear()


def test_eigen_cam_alone_runs_no_backward_pass_and_equals_its_map(monkeypatch):
    model, x = make(2, relu_after=True), batch(2)
    counted = _Counted()
    counted.net.load_state_dict(model.state_dict())
    monkeypatch.setattr(_CountBackward, "calls", 0)
    monkeypatch.setattr(_CountBackward, "refuse", True)
    smap = eigen_cam(counted, x, 1, "net.act")
    assert _CountBackward.calls == 0
    activation = hook_reference(model, x, [1, 1, 1], "act")[0]
    assert torch.allclose(smap, eigen_cam_map(activation), atol=1e-12)
    assert smap.shape == (3, 1) + tuple(x.shape[2:]) and smap.dtype == torch.float64
    # Grad-CAM on the same model needs the backward pass (the counting identity refuses it).
    with pytest.raises(RuntimeError, match="no backward pass was expected"):
        grad_cam(counted, x, 1, "net.act")


def test_eigen_cam_computes_the_gradient_where_something_reads_it(monkeypatch):
    model, x = make(2, relu_after=True), batch(2)
    monkeypatch.setattr(_CountBackward, "refuse", False)
    _, g = hook_reference(model, x, [1, 1, 1], "act")
    # A caller's own flattener may read .grad: it gets the plain gradient.
    seen = []

    def flatten(t):
        seen.append(t.grad.clone())
        return t.grad.sum(1, keepdim=True)

    smap = eigen_cam(model, x, 1, "act", gradient_to_saliency=flatten)
    assert len(seen) == 1 and torch.allclose(seen[0], g, atol=1e-12)
    assert torch.allclose(smap, g.sum(1, keepdim=True), atol=1e-12)
    # debug=True records the gradient as for every method.
    smap, record = eigen_cam(model, x, 1, "act", debug=True)
    assert torch.allclose(record.gradient, g, atol=1e-12)
    # explain with Grad-CAM: one pass, the same maps as the separate calls.
    got = explain(model, x, 1, ["eigen_cam", "grad_cam"],
                  {"eigen_cam": {"saliency_layer": "act"}, "grad_cam": {"saliency_layer": "act"}})
    assert torch.equal(got["eigen_cam"], eigen_cam(model, x, 1, "act"))
    assert torch.equal(got["grad_cam"], grad_cam(model, x, 1, "act"))


def test_eigen_cam_still_refuses_a_layer_off_the_output_path():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(2, 3, 3), nn.Conv2d(2, 3, 3)
            self.head = nn.Linear(3, 4)

        def forward(self, x):
            self.unused(x)
            return self.head(self.used(x).mean((2, 3)))

    model, x = TwoHeads().double().eval(), batch(2)
    with pytest.raises(ValueError, match="scores do not depend on saliency_layer 'unused'"):
        eigen_cam(model, x, 1, "unused")
    assert eigen_cam(model, x, 1, "used").shape == (3, 1, x.shape[2] - 2, x.shape[3] - 2)


@pytest.mark.parametrize("others", [["guided_backprop"], ["deconvnet", "grad_cam"]])
def test_eigen_cam_in_explain_beside_rule_methods_equals_its_own_call(others):
    # Eigen-CAM's reading needs no pass; the rule methods' passes switch the context's rule.
    model, x = make_torchvision("resnet18"), torch.randn(2, 3, 64, 64)
    got = explain(model, x, [1, 2], ["eigen_cam"] + others)
    for name in ["eigen_cam"] + others:
        assert torch.equal(got[name], METHODS[name](model, x, [1, 2])), name
