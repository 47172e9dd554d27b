"""Score-CAM and Ablation-CAM at a transformer block: the block's tokens ``(N, 1 + h·w, D)``
are read on the patch grid (class token dropped), the masks / ablated channels are the patch
tokens' features, and the maps equal a hand computation with explicit forward passes (Wang et
al. 2020; Desai & Ramaswamy 2020).  On a CNN nothing changes; ``tokens=`` overrides; a layer
that is neither a map nor tokens gets advice that fits how it was chosen."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.transformer_models import tv_vit
from torchray_like.attribution.ablation_cam import ablation_cam
from torchray_like.attribution.score_cam import score_cam
from torchray_like.attribution.tokens import TokenLayout

LAYER = "encoder.layers.encoder_layer_1.ln_1"   # the automatic choice on this ViT


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tv_vit()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _grid(tokens: torch.Tensor) -> torch.Tensor:
    """(N, 1 + 16, D) -> (N, D, 4, 4) by hand: the class token dropped, row-major patches."""
    return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)


def _tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(LAYER).register_forward_hook(
        lambda m, a, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def _hand_score_cam(model: nn.Module, x: torch.Tensor, c: int) -> torch.Tensor:
    maps = []
    for i in range(x.shape[0]):
        act = _grid(_tokens(model, x[i:i + 1]))[0]            # (D, 4, 4)
        scores = []
        for k in range(act.shape[0]):
            up = F.interpolate(act[k][None, None], size=(32, 32), mode="bilinear",
                               align_corners=False)
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
            with torch.no_grad():
                scores.append(model(x[i:i + 1] * mask)[0, c])
        w = torch.softmax(torch.stack(scores), 0)
        maps.append(torch.relu((w[:, None, None] * act).sum(0))[None])
    return torch.stack(maps)


def _hand_ablation_cam(model: nn.Module, x: torch.Tensor, c: int) -> torch.Tensor:
    layer = model.get_submodule(LAYER)
    maps = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        tokens = _tokens(model, xi)
        with torch.no_grad():
            y = model(xi)[0, c]
        drops = []
        for k in range(tokens.shape[2]):
            ablated = tokens.clone()
            ablated[:, 1:, k] = 0                               # the patch tokens' feature k
            handle = layer.register_forward_hook(lambda m, a, out: ablated)
            with torch.no_grad():
                drops.append((y - model(xi)[0, c]) / y.abs())
            handle.remove()
        w = torch.stack(drops)
        maps.append(torch.relu((w[:, None, None] * _grid(tokens)[0]).sum(0))[None])
    return torch.stack(maps)


def test_score_cam_on_vit_is_the_hand_computation_on_the_patch_grid(vit, x):
    got = score_cam(vit, x, 3)
    assert got.shape == (2, 1, 4, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, _hand_score_cam(vit, x, 3), rtol=1e-4, atol=1e-6)
    assert float(got.amax()) > 0


def test_ablation_cam_on_vit_is_the_hand_computation_on_the_patch_grid(vit, x):
    got = ablation_cam(vit, x, 2)
    assert got.shape == (2, 1, 4, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, _hand_ablation_cam(vit, x, 2), rtol=1e-4, atol=1e-6)
    assert float(got.amax()) > 0


def test_ablation_cam_on_vit_keeps_its_fast_path_and_leaves_the_model_as_it_was(vit, x):
    rows = []
    handle = vit.conv_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        # The layer named: the automatic choice's own passes (cached per model, so present
        # or not depending on the tests before) are not what is counted here.
        ablation_cam(vit, x, 1, saliency_layer=LAYER, batch_size=16)
    finally:
        handle.remove()
    # The clean pass (2 rows), then the layers below the block run on one copy per batch.
    assert rows == [2, 1, 1, 1, 1]
    layer = vit.get_submodule(LAYER)
    assert "forward" not in layer.__dict__ and not layer._forward_hooks
    assert not vit.training


@pytest.mark.parametrize("method", [score_cam, ablation_cam])
def test_tokens_spec_and_callable_give_the_inferred_maps(vit, x, method):
    inferred = method(vit, x, 1)
    torch.testing.assert_close(method(vit, x, 1, tokens=TokenLayout(prefix=1, grid=(4, 4))),
                               inferred)
    torch.testing.assert_close(method(vit, x, 1, saliency_layer=LAYER, tokens=_grid), inferred)
    # A different layout is honoured: 2 x 8 patches give a 2 x 8 map.
    assert method(vit, x, 1, tokens=TokenLayout(prefix=1, grid=(2, 8))).shape == (2, 1, 2, 8)


@pytest.mark.parametrize("method", [score_cam, ablation_cam])
def test_cnn_maps_are_unchanged_by_tokens(method):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    plain = method(cnn, x, 1, saliency_layer="3")
    assert plain.shape == (2, 1, 8, 8) and float(plain.amax()) > 0
    torch.testing.assert_close(method(cnn, x, 1, saliency_layer="3", tokens=False), plain)
    # An identity callable goes through the token path (for Ablation-CAM, the index map of
    # the zeroed entries): the same numbers.
    torch.testing.assert_close(method(cnn, x, 1, saliency_layer="3", tokens=lambda t: t),
                               plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", [score_cam, ablation_cam])
def test_bad_layer_message_fits_how_the_layer_was_chosen(vit, x, method):
    name = method.__name__
    with pytest.raises(ValueError) as chosen:
        method(vit, x, 1, tokens=False)         # automatic layer, tokens read as they are
    text = str(chosen.value)
    assert text.startswith(f"{name}: saliency_layer '{LAYER}' outputs shape (2, 17, 32)")
    assert "chosen automatically" in text and "tokens=" in text
    assert "omit saliency_layer" not in text
    with pytest.raises(ValueError) as given:
        method(vit, x, 1, saliency_layer=LAYER, tokens=False)
    assert "omit saliency_layer" in str(given.value)
    layer = vit.get_submodule(LAYER)
    assert not layer._forward_hooks and "forward" not in layer.__dict__


@pytest.mark.parametrize("method", [score_cam, ablation_cam])
def test_bad_tokens_are_refused_with_the_method_named(vit, x, method):
    name = method.__name__
    with pytest.raises(TypeError, match="tokens must be None"):
        method(vit, x, 1, tokens="cls")
    with pytest.raises(ValueError, match=rf"^{name}: saliency_layer .*tokens: .*prefix"):
        method(vit, x, 1, tokens=TokenLayout(prefix=3))      # 14 tokens are no 4 x 4 grid
    with pytest.raises(ValueError, match=rf"^{name}: .*tokens: the callable must return"):
        method(vit, x, 1, tokens=lambda t: t[0])


def test_ablation_cam_refuses_a_tokens_callable_that_computes(vit, x):
    def doubled(t):
        return 2 * _grid(t) + 1
    # Score-CAM only reads the map: fine.  Ablation-CAM must find the entries to zero.
    assert score_cam(vit, x, 1, tokens=doubled).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="ablation_cam: tokens= must rearrange"):
        ablation_cam(vit, x, 1, tokens=doubled)
