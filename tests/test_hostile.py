"""Hostile models and inputs: every call is right, or a clear ValueError / TypeError, or a
warning naming what the library cannot handle — never a silent wrong answer nor a foreign
exception (IndexError, PyTorch shape errors, TorchScript hook errors ...)."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from torchray_like.attribution.deconvnet import deconvnet
from torchray_like.attribution.excitation_backprop import excitation_backprop
from torchray_like.attribution.grad_cam import find_saliency_layer, grad_cam
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import guided_backprop
from torchray_like.attribution.guided_grad_cam import guided_grad_cam
from torchray_like.attribution.linear_approx import linear_approx

from .conftest import ConvNet, hook_reference, inputs, reference_map

INPUT_METHODS = {"gradient": gradient, "guided_backprop": guided_backprop,
                 "deconvnet": deconvnet}


class Small(nn.Module):
    """conv → relu → conv ('conv2', the layer read) → relu → pool → fc."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------
# 2. TorchScript modules
# ---------------------------------------------------------------------------------------------


def small_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def scripted_parts():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent PyTorch
    eager = small_resnet()
    partly = small_resnet()
    partly.layer3 = torch.jit.script(partly.layer3)
    traced = small_resnet()
    traced.layer2 = torch.jit.trace(traced.layer2, torch.randn(1, 64, 8, 8))
    whole = torch.jit.script(small_resnet())
    return eager, partly, traced, whole


def test_scripted_submodule_is_refused_where_rules_or_hooks_need_it(scripted_parts):
    eager, partly, traced, whole = scripted_parts
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for model, name in ((partly, "'layer3'"), (traced, "'layer2'")):
        for method in (guided_backprop, deconvnet):
            with pytest.raises(ValueError, match=f"TorchScript module {name}.*silently stay "
                                                 "plain.*load_state_dict"):
                method(model, x, 1)
        with pytest.raises(ValueError, match=f"TorchScript module {name}|{name} is a TorchScript"):
            excitation_backprop(model, x, 1)
        with pytest.raises(ValueError, match=f"TorchScript module {name}"):
            guided_grad_cam(model, x, 1)
    # A layer inside the scripted part cannot be probed; one outside can.
    for method in (grad_cam, linear_approx, gradient):
        with pytest.raises(ValueError, match=r"saliency_layer 'layer3.0' is inside the "
                                             r"TorchScript module 'layer3'.*forward hooks"):
            method(partly, x, 1, saliency_layer="layer3.0")
    with pytest.raises(ValueError, match="saliency_layer 'layer3' is the TorchScript module"):
        grad_cam(partly, x, 1, "layer3")
    # The automatic layer skips scripted parts (at 32² resnet18's layer4 is 1×1: the eager
    # model's choice is layer3, which is scripted in 'partly').
    assert find_saliency_layer(eager, x) == "layer3"
    assert find_saliency_layer(partly, x) == "layer2"
    torch.testing.assert_close(grad_cam(partly, x, [1, 2]), grad_cam(eager, x, [1, 2], "layer2"))
    # The plain gradient needs neither rules nor hooks: it works, and is right.
    for model in (partly, traced, whole):
        torch.testing.assert_close(gradient(model, x, [1, 2]), gradient(eager, x, [1, 2]),
                                   rtol=1e-4, atol=1e-6)
        with pytest.raises(ValueError, match="debug=True .* TorchScript modules do not take"):
            gradient(model, x, 1, debug=True)


def test_whole_scripted_model(scripted_parts):
    eager, _, _, whole = scripted_parts
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"TorchScript module \(the whole model\).*silently"):
        guided_backprop(whole, x, 0)
    for method in (grad_cam, guided_grad_cam):
        with pytest.raises(ValueError, match="the model is a TorchScript module"):
            method(whole, x, 0)
    with pytest.raises(ValueError, match="'layer4' is inside the TorchScript module "
                                         r"\(the whole model\)"):
        grad_cam(whole, x, 0, "layer4")


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def test_compiled_model_is_explained_through_its_original_module():
    net = Small().eval()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for method in INPUT_METHODS.values():
        torch.testing.assert_close(method(compiled, x, [0, 2]), method(net, x, [0, 2]))
    for method in (grad_cam, guided_grad_cam, linear_approx):
        expected = method(net, x, [0, 2], "conv2")
        for layer in ("conv2", "_orig_mod.conv2", net.conv2):
            torch.testing.assert_close(method(compiled, x, [0, 2], layer), expected)
    torch.testing.assert_close(grad_cam(compiled, x, 1), grad_cam(net, x, 1))
    torch.testing.assert_close(guided_grad_cam(compiled, x, 1), guided_grad_cam(net, x, 1))
    assert find_saliency_layer(compiled, x) == find_saliency_layer(net, x)


def test_compiled_submodule_is_refused_for_rules_and_probes():
    net = Small().eval()

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.compile(net, backend="eager")

        def forward(self, x):
            return self.body(x)

    model = Outer().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"torch.compile module 'body'.*model.body._orig_mod"):
        guided_backprop(model, x, 0)
    with pytest.raises(ValueError, match="inside the torch.compile module 'body'"):
        grad_cam(model, x, 0, "body._orig_mod.conv2")
    in_place = Small().eval()
    in_place.compile(backend="eager")
    with pytest.raises(ValueError, match=r"torch.compile module \(the whole model\).*compiled "
                                         r"in place with .compile\(\) cannot be unwrapped"):
        deconvnet(in_place, x, 0)
    # The plain gradient at the input runs the compiled graph, and is right.
    torch.testing.assert_close(gradient(model, x, 0), gradient(net, x, 0))


# ---------------------------------------------------------------------------------------------
# 3. Token models (vision transformers)
# ---------------------------------------------------------------------------------------------


def tiny_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10).eval()


def test_vit_automatic_layer_reads_the_last_blocks_tokens():
    """A ViT needs no wrapper: the automatic layer is the last block's first LayerNorm (its
    patch tokens reach the class token through attention; after it they reach nothing) and
    its tokens become the 4×4 patch grid, class token dropped."""
    vit = tiny_vit()
    with torch.no_grad():
        vit.heads.head.weight.normal_()   # torchvision starts the head at zero
    x = torch.randn(2, 3, 32, 32)
    name = "encoder.layers.encoder_layer_1.ln_1"
    assert find_saliency_layer(vit, x) == name
    smap = grad_cam(vit, x, [1, 7])
    assert smap.shape == (2, 1, 4, 4) and smap.dtype == torch.float32
    a, g = hook_reference(vit, x, torch.tensor([1, 7]), name)
    a, g = (t[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2) for t in (a, g))
    expected = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(smap, expected, rtol=1e-4, atol=1e-6)
    assert float(smap.amax()) > 0
    # Guided Grad-CAM's guided part needs ReLUs: a GELU ViT is refused, naming them.
    with pytest.raises(ValueError, match="ReLU"):
        guided_grad_cam(vit, x, 1)


def test_rank3_outputs_of_image_models_are_never_chosen():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.flat = nn.Flatten(2)     # (N, 4, 64): no spatial layout
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.flat(self.conv(x)).mean(2))

    assert find_saliency_layer(Flat(), torch.randn(1, 3, 8, 8)) == "conv"


# ---------------------------------------------------------------------------------------------
# 5. Rectifiers off the path, 11. non-spatial layers
# ---------------------------------------------------------------------------------------------


class GateNet(nn.Module):
    """The only ReLU acts on a parameter (frozen or not) or on a constant."""

    def __init__(self, where: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Parameter(torch.randn(4, 1, 1), requires_grad=where != "frozen")
        self.fc = nn.Linear(4, 3)
        self.where = where

    def forward(self, x):
        gate = torch.ones(4, 1, 1) if self.where == "constant" else self.gate
        return self.fc((self.conv(x) * F.relu(gate)).mean(dim=(2, 3)))


@pytest.mark.parametrize("where", ["frozen", "constant", "trainable"])
@pytest.mark.parametrize("method", [guided_backprop, deconvnet])
def test_rectifiers_off_the_path_to_the_input_raise(where, method):
    x = torch.randn(1, 3, 6, 6)
    match = "none of them lies between the input" if where == "trainable" else "replaced no ReLU"
    with pytest.raises(ValueError, match=match):
        method(GateNet(where), x, 1)


def test_rectifiers_below_the_layer_read_raise():
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match="none of them lies between saliency_layer '2'"):
        guided_backprop(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3),
                                      nn.Flatten(), nn.Linear(8, 3)), x, 1, saliency_layer="2")
    # With a ReLU above the layer it works.
    smap = guided_backprop(Small(), x, 1, saliency_layer="conv2")
    assert smap.shape == (1, 1, 6, 6)


@pytest.mark.parametrize("method", [gradient, guided_backprop, deconvnet, linear_approx,
                                    grad_cam])
def test_non_spatial_layer_is_one_error_for_every_method(method):
    net = ConvNet(2).eval()
    x = inputs(2)
    for layer, label in (("fc", "'fc'"), (net, "ConvNet")):
        with pytest.raises(ValueError, match=f"saliency_layer {label} outputs shape \\(2, 5\\), "
                                             "which has no spatial dimensions"):
            method(net, x, 1, saliency_layer=layer)


# ---------------------------------------------------------------------------------------------
# 9. Non-finite scores
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [gradient, guided_backprop, deconvnet, grad_cam,
                                    guided_grad_cam, linear_approx])
def test_nan_or_inf_pixels_raise(method):
    net = Small().eval()
    x = torch.randn(3, 3, 6, 6)
    x[1, 0, 2, 2] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"not finite .* sample\(s\) \[1, 2\]: input holds 2 "
                                         "NaN or infinite"):
        method(net, x, 0)


def test_overflowing_model_raises_and_finite_targets_elsewhere_pass():
    class Overflow(Small):
        def forward(self, x):
            out = super().forward(x)
            return torch.cat([out[:, :1] + float("inf"), out[:, 1:]], dim=1)

    class NanBackward(Small):
        def forward(self, x):
            out = super().forward(x)
            return torch.cat([out[:, :1] * float("inf"), out[:, 1:]], dim=1)

    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="input is finite, so the model overflows"):
        gradient(Overflow(), x, 0)
    assert torch.isfinite(gradient(Overflow(), x, 1)).all()  # class 1 is finite: fine
    # A finite score whose backward meets 0 × inf: a NaN map is an error too.
    for method in (gradient, grad_cam):
        with pytest.raises(ValueError, match=r"gradient .* is not finite .* sample\(s\) "
                                             r"\[0, 1\]"):
            method(NanBackward(), x, 1)


# ---------------------------------------------------------------------------------------------
# 10. Models that modify their input in place
# ---------------------------------------------------------------------------------------------


class InplaceNorm(Small):
    def forward(self, x):
        x.sub_(0.5).div_(2.0)
        return super().forward(x)


class OutOfPlaceNorm(Small):
    def forward(self, x):
        return super().forward((x - 0.5) / 2.0)


@pytest.mark.parametrize("method,layer", [
    (gradient, None), (guided_backprop, None), (deconvnet, None), (linear_approx, None),
    (linear_approx, "conv2"), (gradient, "conv2"), (grad_cam, None), (grad_cam, "conv1"),
    (guided_grad_cam, "conv2"), (excitation_backprop, None), (excitation_backprop, "conv1")])
def test_inplace_normalising_model_leaves_the_input_alone(method, layer):
    x = torch.rand(2, 3, 6, 6)
    original = x.clone()
    got = method(InplaceNorm().eval(), x, [0, 2], saliency_layer=layer)
    assert torch.equal(x, original)
    expected = method(OutOfPlaceNorm().eval(), x, [0, 2], saliency_layer=layer)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# Targets, devices and layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [gradient, guided_backprop, grad_cam, guided_grad_cam])
def test_target_and_device_errors(method):
    net = Small().eval()
    x = torch.randn(2, 3, 6, 6)
    for target in (10 ** 20, [0, 10 ** 20], -(10 ** 19)):
        with pytest.raises(ValueError, match="out of range"):
            method(net, x, target)
    with pytest.raises(ValueError, match="target is on the meta device"):
        method(net, x, torch.tensor([0, 1], device="meta"))
    with pytest.raises(ValueError, match="input is on the meta device"):
        method(net, torch.empty(2, 3, 6, 6, device="meta"), 0)
    with torch.device("meta"):
        meta_net = Small()
    with pytest.raises(ValueError, match="model parameter 'conv1.weight' is on the meta device"):
        method(meta_net, x, 0)


@pytest.mark.parametrize("method", ["rise", "extremal_perturbation", "excitation_backprop"])
def test_huge_class_indices_are_value_errors_for_every_method(method):
    import torchray_like as trl
    net = Small().eval()
    x = torch.randn(2, 3, 6, 6)
    kwargs = {"rise": dict(num_masks=4), "extremal_perturbation": dict(max_iter=1, areas=[0.3]),
              "excitation_backprop": {}}[method]
    for target in (10 ** 20, [0, 10 ** 20], -(10 ** 19)):
        with pytest.raises(ValueError, match="out of range"):
            getattr(trl, method)(net, x, target, **kwargs)


@pytest.mark.parametrize("method", [gradient, guided_backprop, grad_cam, linear_approx,
                                    guided_grad_cam])
def test_unbatched_and_channels_last_images_say_what_to_do(method):
    model = small_resnet()
    image = torch.randn(3, 32, 32)
    with pytest.raises(ValueError, match=r"without the batch dimension.*x.unsqueeze\(0\)"):
        method(model, image, 1)
    with pytest.raises(ValueError, match=r"channels last.*x.permute\(0, 3, 1, 2\)"):
        method(model, torch.randn(1, 32, 32, 3), 1)
    # Grayscale into an RGB model.
    with pytest.raises(ValueError, match="with 1 channels.*in_channels=3"):
        method(model, torch.randn(1, 1, 32, 32), 1)


class _FixedPool(nn.Module):
    """A convolution then a fixed 7 × 7 average pool (S3D's head): inputs below 7 × 7 fail."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(F.avg_pool2d(F.relu(self.conv(x)), 7).flatten(1))


@pytest.mark.parametrize("method", [gradient, guided_backprop, grad_cam, excitation_backprop])
def test_an_input_too_small_for_the_model_says_so(method):
    # Before: PyTorch's "input image (T: 2 H: 2 W: 2) smaller than kernel size" from the model's
    # pooling (torchvision's s3d on a 16 × 64 × 64 clip), as it is.
    model = _FixedPool().eval()
    kwargs = {"saliency_layer": "conv"} if method in (grad_cam, excitation_backprop) else {}
    with pytest.raises(ValueError, match=r"_FixedPool failed on input of shape \(1, 3, 4, 4\) "
                                         r"\(RuntimeError: .*\); the input's spatial size \(4, 4\) "
                                         r"is too small for the model's convolution or pooling"):
        method(model, torch.randn(1, 3, 4, 4), 1, **kwargs)
    assert method(model, torch.randn(1, 3, 7, 7), 1, **kwargs).shape == (1, 1, 7, 7)


def test_uint8_hint_is_one_correct_sentence():
    with pytest.raises(TypeError) as info:
        gradient(Small(), torch.zeros(1, 3, 6, 6, dtype=torch.uint8), 0)
    message = str(info.value)
    assert "x.float() / 255" in message and "e.g. with x.float()" not in message


def test_check_model_looks_at_every_parameter():
    net = Small()
    with torch.inference_mode():
        net.fc.weight = nn.Parameter(torch.randn(3, 5))
    with pytest.raises(ValueError, match="parameter 'fc.weight' is an inference tensor"):
        gradient(net, torch.randn(1, 3, 6, 6), 0)


# ---------------------------------------------------------------------------------------------
# Model state during a call
# ---------------------------------------------------------------------------------------------


class Spy(Small):
    """Records, during its forward, what the call changed on the model."""

    def forward(self, x):
        self.seen = (self.training, [p.requires_grad for p in self.parameters()])
        return super().forward(x)


@pytest.mark.parametrize("method", [gradient, guided_backprop, grad_cam, guided_grad_cam,
                                    linear_approx])
def test_call_switches_eval_mode_but_leaves_requires_grad(method):
    net = Spy().train()
    net.fc.bias.requires_grad_(False)
    method(net, torch.randn(2, 3, 6, 6), 1)
    training, flags = net.seen
    assert training is False
    assert flags == [True, True, True, True, True, False]
    assert net.training and all(p.grad is None for p in net.parameters())


def test_another_thread_sees_trainable_parameters_during_a_call():
    net = ConvNet(2).train()
    x = inputs(2)
    inside, release = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def forward(self, h):
            inside.set()
            release.wait(10)
            return h

    net.features.append(Slow())
    seen = {}
    worker = threading.Thread(target=lambda: seen.setdefault("map", gradient(net, x, 1)))
    worker.start()
    try:
        assert inside.wait(10)
        seen["requires_grad"] = [p.requires_grad for p in net.parameters()]
    finally:
        release.set()
        worker.join(20)
    assert all(seen["requires_grad"]) and seen["map"].shape == (2, 1, 8, 8)
    torch.testing.assert_close(seen["map"], reference_map(net.eval(), x, 1))


class _Checkpointed(nn.Module):
    """A conv block under torch.utils.checkpoint, then a plain block and a linear head."""

    def __init__(self, reentrant=None):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            h = self.a(x)
        else:
            h = torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=self.reentrant)
        return self.fc(self.b(h).mean((2, 3)))


@pytest.mark.parametrize("method", [gradient, guided_backprop, deconvnet, linear_approx])
def test_checkpointed_models_give_the_plain_models_map_or_a_clear_error(method):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = method(_Checkpointed().eval(), x, [1, 2])
    # Non-reentrant: the recomputed forward pass keeps the graph's rule nodes: the same map.
    torch.testing.assert_close(method(_Checkpointed(False).eval(), x, [1, 2]), expected,
                               rtol=0, atol=0)
    # Reentrant: torch.autograd.grad cannot go through it; say what to do instead.
    with pytest.raises(ValueError, match=r"use_reentrant=True.*use_reentrant=False"):
        method(_Checkpointed(True).eval(), x, [1, 2])
    # A layer read above the checkpoint never differentiates through it.
    above = grad_cam(_Checkpointed(True).eval(), x, [1, 2], saliency_layer="b")
    torch.testing.assert_close(above, grad_cam(_Checkpointed().eval(), x, [1, 2],
                                               saliency_layer="b"))
