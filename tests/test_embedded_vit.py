"""The embedded transformer (``embedded-vit``): torchvision's ViT, shipped weights checked by
digest, accuracy on the test split, and which methods apply to it."""

from __future__ import annotations

import hashlib
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

from torchray_like.attribution.registry import METHODS
from torchray_like.benchmark.embedded_data import IMAGE_SIZE, NUM_CLASSES, EmbeddedShapes
from torchray_like.benchmark.embedded_models import (
    EMBEDDED_ACCURACY,
    EMBEDDED_LAYERS,
    EMBEDDED_MODELS,
    EMBEDDED_WEIGHTS,
    WeightsError,
    build_embedded_model,
    load_embedded_model,
    set_accuracy,
    weights_path,
)
from torchray_like.benchmark.embedded_vit import VIT_CONFIG, VIT_LAYERS, build_embedded_vit
from torchray_like.benchmark.settings import (
    MODELS,
    NOT_APPLICABLE,
    method_options,
    not_applicable,
)

NAME = "embedded-vit"
#: Floor of the set accuracy (top-L classes are the L present ones) on the first 200 test
#: images; the shipped weights' figure is in EMBEDDED_ACCURACY.
SET_ACCURACY_FLOOR = 0.5


@pytest.fixture(scope="module")
def vit():
    return load_embedded_model(NAME)


@pytest.fixture(scope="module")
def test_batch():
    data = EmbeddedShapes("test", size=200)
    items = [data[i] for i in range(len(data))]
    x = torch.stack([image for image, _ in items])
    truth = torch.stack([target["multi_hot"] for _, target in items]).bool()
    return x, truth


def test_registered_with_layers_settings_and_weights():
    assert NAME in EMBEDDED_MODELS
    assert EMBEDDED_LAYERS[NAME] == VIT_LAYERS
    assert MODELS[NAME].layers() == VIT_LAYERS
    assert MODELS[NAME].input_size == IMAGE_SIZE and MODELS[NAME].multilabel
    assert EMBEDDED_WEIGHTS[NAME][0] == "embedded_vit.pt"
    assert os.path.getsize(weights_path(NAME)) < 3_000_000


def test_is_torchvisions_vit_with_its_layer_names():
    model = build_embedded_model(NAME)
    assert type(model) is torchvision.models.VisionTransformer and model.training
    assert (model.image_size, model.patch_size, model.hidden_dim) == (64, 8, 96)
    modules = dict(model.named_modules())
    last = VIT_CONFIG["num_layers"] - 1
    for name in ("conv_proj", "encoder.ln", "heads.head", f"encoder.layers.encoder_layer_{last}",
                 "encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_0.mlp"):
        assert name in modules, name
    assert f"encoder.layers.encoder_layer_{last + 1}" not in modules
    assert isinstance(modules["encoder.layers.encoder_layer_0.self_attention"],
                      nn.MultiheadAttention)
    assert modules["encoder.layers.encoder_layer_0.self_attention"].num_heads == 3
    assert isinstance(modules["encoder.layers.encoder_layer_0.mlp.1"], nn.GELU)
    assert modules["heads.head"].out_features == NUM_CLASSES
    assert all(layer in modules for layer in VIT_LAYERS.values())
    # Past the stem, the parameter names of torchvision's own vit_b_16.
    def names(network):
        return {k.split(".", 3)[-1] if "encoder_layer" in k else k
                for k in network.state_dict() if not k.startswith("conv_proj")}
    assert names(model) == names(torchvision.models.vit_b_16())
    # The convolutional stem: 8 × 8 tokens of width 96, and no ReLU anywhere.
    assert model.conv_proj(torch.zeros(1, 3, 64, 64)).shape == (1, 96, 8, 8)
    assert isinstance(modules["conv_proj.conv_last"], nn.Conv2d)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert build_embedded_vit(16).heads.head.out_features == 16
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="num_outputs"):
            build_embedded_vit(bad)


def test_loads_in_eval_mode_and_gives_logits(vit, test_batch):
    assert not vit.training
    x = test_batch[0][:4]
    with torch.no_grad():
        out = vit(x)
    assert out.shape == (4, NUM_CLASSES) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    # Eval mode: deterministic.
    with torch.no_grad():
        assert torch.equal(vit(x), out)


def test_accuracy_above_floor_and_as_recorded(vit, test_batch):
    x, truth = test_batch
    with torch.no_grad():
        scores = vit(x)
    acc = set_accuracy(scores, truth)
    assert acc >= SET_ACCURACY_FLOOR, acc
    recorded = EMBEDDED_ACCURACY[NAME]
    assert abs(set_accuracy(scores[:64], truth[:64]) - recorded["set_accuracy_64"]) <= 1 / 64 + 1e-9
    exact = float(((scores[:64] > 0) == truth[:64]).all(1).float().mean())
    assert abs(exact - recorded["exact_match_64"]) <= 1 / 64 + 1e-9


def test_tampered_or_foreign_weights_refused(tmp_path):
    shipped = open(weights_path(NAME), "rb").read()
    assert hashlib.sha256(shipped).hexdigest() == EMBEDDED_WEIGHTS[NAME][1]
    tampered = bytearray(shipped)
    tampered[len(tampered) // 2] ^= 0x01            # one bit of one weight
    path = tmp_path / "embedded_vit.pt"
    path.write_bytes(bytes(tampered))
    with pytest.raises(WeightsError, match="corrupt or not the shipped ones"):
        load_embedded_model(NAME, path=str(path), sha256=EMBEDDED_WEIGHTS[NAME][1])
    # A file of another architecture whose digest is the one asked for: refused by shape.
    vgg = weights_path("embedded-vgg")
    with pytest.raises(WeightsError, match="do not fit the embedded-vit architecture"):
        load_embedded_model(NAME, path=vgg, sha256=EMBEDDED_WEIGHTS["embedded-vgg"][1])
    with pytest.raises(WeightsError, match="not found"):
        load_embedded_model(NAME, path=str(tmp_path / "missing.pt"), sha256="0" * 64)


def test_other_input_sizes_refused_by_torchvision(vit):
    # The position embedding has 65 entries: torchvision's ViT checks the size itself.
    with pytest.raises(AssertionError, match="Wrong image height"):
        vit(torch.zeros(1, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE))


def test_not_applicable_methods_say_why_and_refuse_or_warn(vit, test_batch):
    """The rectifier methods refuse the ViT with a ValueError naming GELU, excitation backprop
    and the CNN LRP composites warn that GELU / LayerNorm are outside their rules: all are listed in
    NOT_APPLICABLE (reported "n/a" by the benchmarks) with their reason."""
    table = NOT_APPLICABLE[NAME]
    assert set(table) == {"guided_backprop", "deconvnet", "guided_grad_cam",
                          "excitation_backprop",
                          "contrastive_excitation_backprop", "lrp", "lrp_epsilon_plus",
                          "lrp_epsilon_plus_flat", "lrp_epsilon_alpha2_beta1",
                          "lrp_epsilon_gamma_box"}
    assert set(table) <= set(METHODS)
    assert not_applicable(NAME, "guided_backprop") == table["guided_backprop"]
    assert "GELU" in table["guided_backprop"] and "LayerNorm" in table["lrp"]
    assert "attn_lrp" in table["lrp"]
    assert not_applicable(NAME, "gradient") is None
    assert not_applicable("embedded-vgg", "guided_backprop") is None
    x = test_batch[0][:1]
    for method in ("guided_backprop", "deconvnet", "guided_grad_cam"):
        with pytest.raises(ValueError, match="gelu"):
            METHODS[method](vit, x, 0, **method_options(method, NAME))
    for method in ("excitation_backprop", "lrp"):
        with pytest.warns(UserWarning, match="gelu"):
            METHODS[method](vit, x, 0, **method_options(method, NAME))


def test_attention_methods_not_applicable_to_the_cnns(test_batch):
    x = test_batch[0][:1]
    cnn = load_embedded_model("embedded-resnet")
    for method in ("attention_rollout", "attention_flow", "grad_rollout", "cp_lrp"):
        assert "no attention" in not_applicable("embedded-resnet", method)
        assert not_applicable(NAME, method) is None
        # The rollouts name the network; cp_lrp's wording is its own module's business.
        with pytest.raises(ValueError, match="" if method == "cp_lrp" else "EmbeddedResNet"):
            METHODS[method](cnn, x, 0)


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus", "layer_cam", "xgrad_cam",
                                    "hires_cam", "eigen_cam", "linear_approx", "score_cam",
                                    "ablation_cam", "attention_rollout", "grad_rollout"])
def test_token_methods_give_patch_grid_maps(vit, test_batch, method):
    """The CAM family on the last block's ln_1 tokens and attention rollout give one map per
    sample on the 8 × 8 patch grid."""
    x = test_batch[0][:2]
    out = METHODS[method](vit, x, [0, 3], **method_options(method, NAME))
    assert out.shape == (2, 1, 8, 8) and out.dtype == torch.float32, method
    assert bool(torch.isfinite(out).all()) and float(out.abs().sum()) > 0
    assert all(p.grad is None for p in vit.parameters())


@pytest.mark.parametrize("method", ["gradient", "gradient_x_input", "smooth_grad",
                                    "integrated_gradients", "occlusion"])
def test_model_agnostic_methods_give_input_maps(vit, test_batch, method):
    x = test_batch[0][:2]
    options = method_options(method, NAME, "speed")
    if method in ("smooth_grad", "integrated_gradients"):
        options = dict(options, **({"n_samples": 4} if method == "smooth_grad"
                                   else {"n_steps": 4}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = METHODS[method](vit, x, [0, 3], **options)
    assert out.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all()) and float(out.abs().sum()) > 0
    assert all(p.grad is None for p in vit.parameters())


def test_an_untrained_vit_has_a_random_head_not_torchvisions_zero_head():
    """Random-weight benchmarks and sanity checks need scores that are not all exactly 0."""
    torch.manual_seed(0)
    model = build_embedded_vit().eval()
    weight = model.heads.head.weight
    assert bool((weight != 0).all()) and 0.005 < float(weight.std()) < 0.03
    with torch.no_grad():
        scores = model(torch.randn(2, 3, 64, 64))
    assert scores.shape == (2, 8) and bool((scores != 0).all())
