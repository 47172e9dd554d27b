"""Transformer blocks as saliency layers: token sequences and channels-last stages become
(N, C, *grid) maps for every layer method, without editing the model (torchray_like.tokens)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from torchray_like.attribution.eigen_cam import eigen_cam
from torchray_like.attribution.engine import saliency
from torchray_like.attribution.explain import explain
from torchray_like.attribution.grad_cam import find_saliency_layer, grad_cam
from torchray_like.attribution.grad_cam_plus_plus import grad_cam_plus_plus
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.hires_cam import hires_cam
from torchray_like.attribution.integrated_gradients import integrated_gradients
from torchray_like.attribution.layer_cam import layer_cam
from torchray_like.attribution.linear_approx import linear_approx
from torchray_like.attribution.lrp import lrp
from torchray_like.attribution.tokens import (
    TokenLayout,
    infer_token_layout,
    is_token_model,
    layer_tokens,
)
from torchray_like.attribution.xgrad_cam import xgrad_cam

from .conftest import ConvNet, hook_reference
from .transformer_models import tv_vit

# One intra-op thread for the module (conftest.one_thread): small tensors on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Models: torchvision's with small sizes and random weights, and hand-written ViTs
# ---------------------------------------------------------------------------------------------


def tv_swin() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
        num_classes=5).eval()


def tv_mvit() -> nn.Module:
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    blocks = [MSBlockConfig(num_heads=1, input_channels=8, output_channels=8, kernel_q=[3, 3, 3],
                            kernel_kv=[3, 3, 3], stride_q=[1, 1, 1], stride_kv=[1, 2, 2]),
              MSBlockConfig(num_heads=2, input_channels=8, output_channels=16,
                            kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3], stride_q=[1, 2, 2],
                            stride_kv=[1, 1, 1])]
    torch.manual_seed(0)
    return MViT(spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=True,
                residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True,
                num_classes=5).eval()


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class HandViT(nn.Module):
    """A small ViT: convolutional patch embedding, a class token and ``registers`` register
    tokens, position embeddings interpolated to the input's grid (any input size), two blocks,
    a head on the class token (``pool="cls"``) or on the mean patch token (``"mean"``).
    ``video``: tubelets of 2 frames.  ``named=False`` hides the prefix-token attributes."""

    def __init__(self, registers: int = 0, pool: str = "cls", video: bool = False,
                 named: bool = True, dim: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.video, self.pool, self.prefix = video, pool, 1 + registers
        self.grid = (2, 4, 4) if video else (4, 4)
        self.patch_embed = (nn.Conv3d(3, dim, (2, 8, 8), (2, 8, 8)) if video
                            else nn.Conv2d(3, dim, 8, 8))
        prefix = nn.Parameter(torch.randn(1, 1 + registers, dim))
        setattr(self, "cls_token" if named else "start", prefix)
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, dim, *self.grid))
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        f = self.patch_embed(x)                                      # (N, D, *grid)
        pos = F.interpolate(self.pos_embed, size=f.shape[2:],
                            mode="trilinear" if self.video else "bicubic", align_corners=False)
        tokens = (f + pos).flatten(2).transpose(1, 2)                # (N, h·w, D)
        prefix = getattr(self, "cls_token", None)
        prefix = prefix if prefix is not None else self.start
        t = torch.cat([prefix.expand(x.shape[0], -1, -1), tokens], 1)
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0] if self.pool == "cls" else t[:, self.prefix:].mean(1))


def as_grid(t: torch.Tensor, prefix: int, grid) -> torch.Tensor:
    """The hand reshape: drop the prefix tokens, patch tokens on the grid, channels first."""
    return t[:, prefix:].reshape(t.shape[0], *grid, t.shape[-1]).movedim(-1, 1)


def cam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    spatial = tuple(range(2, a.dim()))
    return (g.mean(spatial, keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)


LAYER_METHODS = [grad_cam, grad_cam_plus_plus, layer_cam, xgrad_cam, hires_cam, eigen_cam,
                 linear_approx, gradient, saliency, lrp]

# ---------------------------------------------------------------------------------------------
# Every layer method on a block returns a map of the patch grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:LRPContext:UserWarning")  # GELU, attention: named there
@pytest.mark.parametrize("method", LAYER_METHODS, ids=lambda m: m.__name__)
def test_every_layer_method_maps_a_vit_block_on_the_patch_grid(method):
    model, x = tv_vit(), torch.randn(2, 3, 32, 32)
    smap = method(model, x, [1, 3], saliency_layer="encoder.layers.encoder_layer_0")
    assert smap.shape == (2, 1, 4, 4) and smap.dtype == torch.float32
    assert bool(torch.isfinite(smap).all()) and float(smap.abs().amax()) > 0


def test_layer_integrated_gradients_maps_a_block_and_keeps_its_layout_unreduced():
    model, x = tv_vit(), torch.randn(2, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_0"
    smap = integrated_gradients(model, x, 1, saliency_layer=layer, n_steps=8)
    raw = integrated_gradients(model, x, 1, saliency_layer=layer, n_steps=8, reduce=None)
    assert smap.shape == (2, 1, 4, 4) and raw.shape == (2, 17, 32)
    torch.testing.assert_close(smap, as_grid(raw, 1, (4, 4)).sum(1, keepdim=True))


def test_grad_cam_and_linear_approx_equal_the_hand_computation():
    model, x = tv_vit(), torch.randn(2, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    a, g = hook_reference(model, x, torch.tensor([1, 3]), layer)
    a, g = as_grid(a, 1, (4, 4)), as_grid(g, 1, (4, 4))
    torch.testing.assert_close(grad_cam(model, x, [1, 3], saliency_layer=layer), cam(a, g),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(linear_approx(model, x, [1, 3], saliency_layer=layer),
                               (a * g).sum(1, keepdim=True), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer_cam(model, x, [1, 3], saliency_layer=layer),
                               (g.clamp(min=0) * a).sum(1, keepdim=True).clamp(min=0),
                               rtol=1e-4, atol=1e-6)


def test_explain_shares_the_pass_and_agrees_with_the_single_methods():
    model, x = tv_vit(), torch.randn(2, 3, 32, 32)
    layout = TokenLayout(prefix=1, grid=(4, 4))
    maps = explain(model, x, 1, ["grad_cam", "layer_cam"],
                   options={"grad_cam": {"tokens": layout}})
    assert torch.equal(maps["grad_cam"], grad_cam(model, x, 1))
    assert torch.equal(maps["layer_cam"], layer_cam(model, x, 1))


# ---------------------------------------------------------------------------------------------
# The automatic layer
# ---------------------------------------------------------------------------------------------


def test_automatic_layer_per_family():
    x = torch.randn(2, 3, 32, 32)
    # Class-token heads: the last block's first LayerNorm (after it, the patch tokens reach
    # nothing); mean-pooled heads: the final LayerNorm; Swin: its permuted (N, C, h, w) output.
    assert find_saliency_layer(tv_vit(), x) == "encoder.layers.encoder_layer_1.ln_1"
    assert find_saliency_layer(HandViT(), x) == "blocks.1.norm1"
    assert find_saliency_layer(HandViT(pool="mean"), x) == "norm"
    assert find_saliency_layer(tv_swin(), x) == "permute"
    assert find_saliency_layer(tv_mvit(), torch.randn(1, 3, 4, 32, 32)) == "blocks.1.norm1"


def test_torchvision_vit_with_a_zero_head_still_gets_the_last_blocks_layernorm():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5).eval()
    assert not bool(model.heads.head.weight.detach().any())
    assert find_saliency_layer(model, torch.randn(1, 3, 32, 32)) == \
        "encoder.layers.encoder_layer_2.ln_1"


def test_automatic_layer_of_a_registers_vit_and_its_map():
    model, x = HandViT(registers=4), torch.randn(2, 3, 32, 32)
    assert infer_token_layout(model, (2, 21, 24), x.shape) == TokenLayout(prefix=5, grid=(4, 4))
    layer = find_saliency_layer(model, x)
    a, g = hook_reference(model, x, torch.tensor([0, 2]), layer)
    expected = cam(as_grid(a, 5, (4, 4)), as_grid(g, 5, (4, 4)))
    torch.testing.assert_close(grad_cam(model, x, [0, 2]), expected, rtol=1e-4, atol=1e-6)


def test_prefix_inferred_from_the_count_when_the_model_does_not_say():
    model = HandViT(registers=2, named=False)
    assert is_token_model(model)  # its attention modules say so
    assert infer_token_layout(model, (1, 19, 24), (1, 3, 32, 32)) == TokenLayout(3, (4, 4))


# ---------------------------------------------------------------------------------------------
# Non-square inputs, Swin's channels-last stages, video token grids
# ---------------------------------------------------------------------------------------------


def test_non_square_input_with_interpolated_position_embeddings():
    model, x = HandViT(), torch.randn(2, 3, 32, 48)
    smap = grad_cam(model, x, 1)
    assert smap.shape == (2, 1, 4, 6)
    a, g = hook_reference(model, x, torch.tensor([1, 1]), "blocks.1.norm1")
    torch.testing.assert_close(smap, cam(as_grid(a, 1, (4, 6)), as_grid(g, 1, (4, 6))),
                               rtol=1e-4, atol=1e-6)
    assert grad_cam(model, x, 1, resize=True).shape == (2, 1, 32, 48)


def test_swin_channels_last_stages_become_maps():
    model, x = tv_swin(), torch.randn(2, 3, 32, 32)
    smap = grad_cam(model, x, 1, saliency_layer="features.1")
    assert smap.shape == (2, 1, 8, 8)
    a, g = hook_reference(model, x, torch.tensor([1, 1]), "features.1")   # (N, 8, 8, C)
    assert a.shape == (2, 8, 8, 16)
    torch.testing.assert_close(smap, cam(a.movedim(-1, 1), g.movedim(-1, 1)),
                               rtol=1e-4, atol=1e-6)
    for method in (layer_cam, linear_approx):
        assert method(model, x, 1, saliency_layer="features.3").shape == (2, 1, 4, 4)
    # The patch embedding's convolution is (N, C, h, w) already: read as it is.
    assert grad_cam(model, x, 1, saliency_layer="features.0.0").shape == (2, 1, 8, 8)


def test_video_token_grid():
    model, x = HandViT(video=True), torch.randn(2, 3, 4, 32, 32)
    smap = grad_cam(model, x, 1)
    assert smap.shape == (2, 1, 2, 4, 4)
    a, g = hook_reference(model, x, torch.tensor([1, 1]), "blocks.1.norm1")
    torch.testing.assert_close(smap, cam(as_grid(a, 1, (2, 4, 4)), as_grid(g, 1, (2, 4, 4))),
                               rtol=1e-4, atol=1e-6)


def test_mvit_pooled_stages():
    model, x = tv_mvit(), torch.randn(1, 3, 4, 32, 32)
    # conv_proj strides (2, 4, 4): an (2, 8, 8) grid, pooled to (2, 4, 4) in the second block.
    assert grad_cam(model, x, 1).shape == (1, 1, 2, 8, 8)
    assert linear_approx(model, x, 1, saliency_layer="norm").shape == (1, 1, 2, 4, 4)


# ---------------------------------------------------------------------------------------------
# tokens=: a spec, a callable, False; CNNs unchanged
# ---------------------------------------------------------------------------------------------


def test_tokens_spec_and_callable_give_the_inferred_map():
    model, x = tv_vit(), torch.randn(2, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_0"
    inferred = grad_cam(model, x, 1, saliency_layer=layer)
    for spec in (TokenLayout(prefix=1, grid=(4, 4)), TokenLayout(prefix=1), TokenLayout(
            grid=(4, 4)), lambda t: t[:, 1:].reshape(t.shape[0], 4, 4, -1).permute(0, 3, 1, 2)):
        assert torch.equal(grad_cam(model, x, 1, saliency_layer=layer, tokens=spec), inferred)
    # False: the (N, 17, 32) tensor read as it is, (N, C, L): a 1-D "map" of 32 positions.
    assert grad_cam(model, x, 1, saliency_layer=layer, tokens=False).shape == (2, 1, 32)


def test_cnn_maps_are_unchanged():
    model, x = ConvNet(), torch.randn(2, 3, 8, 8)
    assert not is_token_model(model)
    for method in (grad_cam, linear_approx, layer_cam):
        ref = method(model, x, 1, saliency_layer="features", tokens=False)
        assert torch.equal(method(model, x, 1, saliency_layer="features"), ref)
    assert layer_tokens(model, torch.zeros(2, 8, 8, 8), x) is None


def test_token_layout_application_and_validation():
    t = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    out = TokenLayout(prefix=1, grid=(4, 4))(t)
    assert out.shape == (2, 3, 4, 4) and torch.equal(out[:, :, 0, 1], t[:, 2])
    assert torch.equal(TokenLayout(channels_last=True)(out.movedim(1, -1)), out)
    with pytest.raises(ValueError, match="prefix must be a non-negative int"):
        TokenLayout(prefix=-1)
    with pytest.raises(ValueError, match="grid must be 1 to 3 positive ints"):
        TokenLayout(grid=(4, 0))
    with pytest.raises(ValueError, match="no prefix tokens"):
        TokenLayout(prefix=1, channels_last=True)
    with pytest.raises(ValueError, match=r"shape \(2, 17, 3\), which is not a token sequence "
                                         r"\(N, 1 \+ 3·3, D\)"):
        TokenLayout(prefix=1, grid=(3, 3))(t)


# ---------------------------------------------------------------------------------------------
# Hostile: what cannot be inferred is refused, naming the shape and tokens=
# ---------------------------------------------------------------------------------------------


class Truncated(nn.Module):
    """Keeps the first 11 tokens: no prefix + patch grid of a 32×32 input at stride 8."""

    def __init__(self, early: bool = False) -> None:
        super().__init__()
        self.vit = HandViT()
        self.cut = nn.Linear(24, 24)
        self.early = early  # cut before the blocks: no token layer has a known layout

    def forward(self, x):
        f = self.vit.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.vit.cls_token.expand(x.shape[0], -1, -1), f], 1)
        t = self.cut(self.vit.blocks(t[:, :11] if self.early else t)[:, :11])
        return self.vit.head(t[:, 0])


def test_uninferable_token_count_is_refused_naming_the_shape():
    model, x = Truncated(), torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(2, 11, 24\).*11 tokens are no prefix.*"
                                         r"tokens=TokenLayout"):
        grad_cam(model, x, 1, saliency_layer="cut")
    # The automatic choice skips it for a block whose layout is known.
    assert find_saliency_layer(model, x) == "vit.blocks.1.norm1"
    with pytest.raises(ValueError, match=r"could not choose saliency_layer automatically.*"
                                         r"'cut' outputs \(1, 11, 24\).*tokens="):
        grad_cam(Truncated(early=True), x, 1)
    # Told, it works (the first 8 tokens after the class token as a 2×4 grid).
    smap = grad_cam(model, x, 1, saliency_layer="cut", tokens=TokenLayout(prefix=3, grid=(2, 4)))
    assert smap.shape == (2, 1, 2, 4)


def test_ambiguous_token_count_is_refused_listing_the_readings():
    # 30×30 at stride 8: 3×3 (floor) or 3×4 / 4×4 (ceil) grids; 13 tokens fit 4 + 3×3 and 1 + 3×4.
    model = HandViT(named=False)
    with pytest.raises(ValueError, match=r"\(1, 13, 24\).*13 tokens could be 4 prefix \+ 3×3, "
                                         r"1 prefix \+ 3×4.*tokens="):
        infer_token_layout(model, (1, 13, 24), (1, 3, 30, 30))


def test_bad_tokens_arguments():
    model, x = tv_vit(), torch.randn(2, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_0"
    with pytest.raises(TypeError, match="tokens must be None .* got int 3"):
        grad_cam(model, x, 1, saliency_layer=layer, tokens=3)
    with pytest.raises(TypeError, match="tokens must be None"):
        integrated_gradients(model, x, 1, saliency_layer=layer, tokens="cls")
    with pytest.raises(ValueError, match=r"callable must return an \(N, C, \*grid\) tensor "
                                         r"with N = 2.*shape \(2, 544\)"):
        grad_cam(model, x, 1, saliency_layer=layer, tokens=lambda t: t.flatten(1))
    with pytest.raises(ValueError, match=r"shape \(2, 17, 32\), which is not a token sequence"):
        grad_cam(model, x, 1, saliency_layer=layer, tokens=TokenLayout(prefix=2, grid=(4, 4)))


def test_the_call_leaves_the_model_as_it_found_it():
    model, x = tv_vit(), torch.randn(2, 3, 32, 32)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    grad_cam(model, x, 1)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is None and not x.requires_grad


# ---------------------------------------------------------------------------------------------
# A trained case: the map's grid is the image's
# ---------------------------------------------------------------------------------------------


def bright_patch_data(n: int, g: torch.Generator):
    """Noise with one bright 8×8 patch (on the patch grid); the class is its quadrant."""
    x = 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    pos = torch.randint(0, 16, (n,), generator=g)
    for i, p in enumerate(pos.tolist()):
        r, c = divmod(p, 4)
        x[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 1.0
    return x, (pos // 8) * 2 + (pos % 4) // 2, pos


def test_trained_vit_map_singles_out_the_bright_patch():
    """A mean-pooled ViT trained (150 Adam steps) to tell the quadrant of a bright patch: the
    linear approximation at the automatic layer (the final LayerNorm, where it decomposes the
    score exactly) is most extreme at the bright patch — read on the patch grid as inferred; a
    transposed reading misses it.  (The bright token itself scores *lowest*: the model reads
    the quadrant from the tokens around it; the extremum is the point here.)"""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = HandViT(pool="mean")
    model.head = nn.Linear(24, 4)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        x, y, _ = bright_patch_data(32, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, pos = bright_patch_data(64, g)
    assert float((model(x).argmax(1) == y).float().mean()) > 0.9
    assert find_saliency_layer(model, x) == "norm"

    def hits(smap):
        flat = smap.flatten(1)
        return float(((flat - flat.median(1, keepdim=True).values).abs().argmax(1) == pos)
                     .float().mean())

    assert hits(linear_approx(model, x, y, saliency_layer="norm")) > 0.8
    transposed = linear_approx(model, x, y, saliency_layer="norm", tokens=lambda t: as_grid(
        t, 1, (4, 4)).transpose(2, 3))
    assert hits(transposed) < 0.3


def test_tokens_for_the_input_is_refused():
    model, x = tv_vit(), torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="linear_approx: tokens= says how a layer's token "
                                         "output becomes a map, but saliency_layer is the input"):
        linear_approx(model, x, 1, tokens=TokenLayout(prefix=1))
    assert linear_approx(model, x, 1, tokens=False).shape == (1, 1, 32, 32)


def test_swin_v2_t_at_full_size():
    """torchvision's swin_v2_t (random weights, one 224² image): the automatic layer is its
    (N, C, 7, 7) permute; a channels-last stage maps on its own grid."""
    torch.manual_seed(0)
    model, x = torchvision.models.swin_v2_t().eval(), torch.randn(1, 3, 224, 224)
    assert find_saliency_layer(model, x) == "permute"
    assert grad_cam(model, x, 1).shape == (1, 1, 7, 7)
    smap = layer_cam(model, x, 1, saliency_layer="features.5")   # stage 3: (1, 14, 14, 384)
    assert smap.shape == (1, 1, 14, 14) and float(smap.amax()) > 0


def test_contrastive_excitation_backprop_reads_a_block_on_the_patch_grid():
    """Not a described method, but a layer method all the same: its excitation at a block is
    rearranged to the patch grid (never an (N, 1, dim) 'map' over the channels)."""
    from torchray_like.attribution.excitation_backprop import contrastive_excitation_backprop

    torch.manual_seed(0)
    model = tv_vit()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # GELU / LayerNorm are outside the EBP rule
        smap, debug = contrastive_excitation_backprop(
            model, x, [1, 2], saliency_layer="encoder.layers.encoder_layer_0",
            contrast_layer="encoder.layers.encoder_layer_1", debug=True)
    assert smap.shape == (2, 1, 4, 4) and smap.dtype == torch.float32
    excitation = debug.gradient
    assert excitation.shape == debug.activation.shape == (2, 32, 4, 4)
    assert torch.equal(smap, excitation.sum(1, keepdim=True).clamp(min=0))
