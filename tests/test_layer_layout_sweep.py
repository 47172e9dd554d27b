"""Explicitly named layers whose output is not an ``(N, C, *spatial)`` map.

Every layer-reading method turns the tensor it reads into a map by taking axis 1 as the
channels.  Inside ConvNeXt's block (``Permute``, ``LayerNorm``, ``Linear``, ``GELU`` on a
channels-last ``(N, H, W, C)`` map), inside Swin's stages, inside MaxViT's window partitions and
inside an MLP-Mixer's token-mixing MLP that read is wrong.  The module that produced the
tensor decides (:mod:`torchray_like.attribution.layer_layout`): read channels-last where that
is certain, refuse with a ValueError naming ``saliency_layer``, the module, the shape and what
to pass instead where it is not, and keep every ordinary ``(N, C, H, W)`` read as it was
(``tokens=False`` is the old read as it is).  Small torchvision models with random weights.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)
from torchvision.ops.misc import Permute

import torchray_like as trl
from torchray_like.attribution.layer_layout import explicit_layout, module_layout
from torchray_like.attribution.maps import DegenerateMapWarning
from torchray_like.attribution.tokens import TokenLayout

pytestmark = pytest.mark.usefixtures("one_thread")

CHANNELS_LAST = TokenLayout(channels_last=True)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def convnext() -> nn.Module:
    torch.manual_seed(0)
    # layer_scale 1 (not 1e-6): the blocks' maps must not vanish beside the shortcut
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], layer_scale=1.0,
                    num_classes=3).eval()


@pytest.fixture(scope="module")
def swin() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                           window_size=[2, 2], num_classes=3).eval()


@pytest.fixture(scope="module")
def swin_v2() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                           window_size=[2, 2], num_classes=3, block=SwinTransformerBlockV2,
                           downsample_layer=PatchMergingV2).eval()


@pytest.fixture(scope="module")
def maxvit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.MaxVit(
        input_size=(28, 28), stem_channels=8, partition_size=7, block_channels=[16],
        block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=3).eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=3).eval()


class MixerBlock(nn.Module):
    """MLP-Mixer's block (Tolstikhin et al. 2021, arXiv 2105.01601): a token-mixing MLP run on
    ``(N, D, T)``, then a channel-mixing MLP on ``(N, T, D)``."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(),
                                       nn.Linear(2 * tokens, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                         nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """A toy MLP-Mixer: 8×8 patches of a 32² image (16 tokens of 24 features)."""

    def __init__(self, stem: str = "stem") -> None:
        super().__init__()
        self.stem_name = stem
        setattr(self, stem, nn.Conv2d(3, 24, 8, 8))
        self.blocks = nn.Sequential(MixerBlock(16, 24), MixerBlock(16, 24))
        self.norm, self.head = nn.LayerNorm(24), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, self.stem_name)(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


class MobileViTBlock(nn.Module):
    """MobileViT's block (Mehta & Rastegari 2022, arXiv 2110.02178): a local convolution, a
    transformer over the unfolded 2×2 patches ``(N, 4, h·w/4, d)``, folded back."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.local = nn.Conv2d(channels, dim, 3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.fuse = nn.Conv2d(dim, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        n, d, h, w = y.shape
        patches = y.reshape(n, d, h // 2, 2, w // 2, 2).permute(0, 3, 5, 2, 4, 1)
        patches = patches.reshape(n, 4, (h // 2) * (w // 2), d)
        patches = patches + self.mlp(self.norm(patches))
        y = patches.reshape(n, 2, 2, h // 2, w // 2, d).permute(0, 5, 3, 1, 4, 2)
        return x + self.fuse(y.reshape(n, d, h, w))


class MobileViTToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.block = MobileViTBlock(8, 12)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to tolerances relative to the map's scale (maps of random weights can be
    small); a map that vanishes would make any comparison pass, so it must not."""
    scale = float(expected.abs().max())
    assert scale > 1e-6, scale
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def _x(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _hand_grad_cam(model: nn.Module, layer: str, x: torch.Tensor, target: int,
                   to_map: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) written out: the layer's output put on its grid by
    ``to_map``, channel weights the gradient's spatial mean, ReLU of the weighted sum."""
    module = model.get_submodule(layer)
    saved: Dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, i, o: saved.setdefault("a", o))
    try:
        out = model(x)
    finally:
        handle.remove()
    act = saved["a"]
    grad, = torch.autograd.grad(out[:, target].sum(), act)
    a, g = to_map(act.detach()), to_map(grad)
    weights = g.mean(dim=tuple(range(2, g.dim())), keepdim=True)
    return (weights * a).sum(1, keepdim=True).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# ConvNeXt: the block's channels-last internals
# ---------------------------------------------------------------------------------------------

CN_INSIDE = ["features.1.0.block.1", "features.1.0.block.2", "features.1.0.block.3",
             "features.1.0.block.4", "features.1.0.block.5"]
CN_MAPS = ["features.0.0", "features.0.1", "features.1.0.block.0", "features.1.0.block.6",
           "features.1.0.block", "features.1.0", "features.2.0", "features.2.1"]


@pytest.mark.parametrize("layer", CN_INSIDE)
def test_convnext_block_inside_is_channels_last(convnext: nn.Module, layer: str) -> None:
    x = _x()
    smap = trl.grad_cam(convnext, x, 1, saliency_layer=layer)
    expected = _hand_grad_cam(convnext, layer, x, 1, lambda t: t.permute(0, 3, 1, 2))
    assert smap.shape == (2, 1, 8, 8) and smap.dtype == torch.float32
    _close(smap, expected)
    # the old read (axis 1 as channels) is another map: H=8 rows as channels
    old = trl.grad_cam(convnext, x, 1, saliency_layer=layer, tokens=False)
    assert old.shape[-1] != 8


def test_convnext_resize_reads_the_grid(convnext: nn.Module) -> None:
    """With resize=True the old read had the right shape but the wrong content."""
    x = _x()
    layer = "features.1.0.block.3"
    smap = trl.grad_cam(convnext, x, 1, saliency_layer=layer, resize=True)
    grid = _hand_grad_cam(convnext, layer, x, 1, lambda t: t.permute(0, 3, 1, 2))
    expected = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
    assert smap.shape == (2, 1, 32, 32)
    _close(smap, expected)
    old = trl.grad_cam(convnext, x, 1, saliency_layer=layer, resize=True, tokens=False)
    assert old.shape == smap.shape and not torch.allclose(old, smap)


@pytest.mark.parametrize("layer", CN_MAPS)
def test_convnext_maps_read_as_before(convnext: nn.Module, layer: str) -> None:
    x = _x()
    smap = trl.grad_cam(convnext, x, 1, saliency_layer=layer)
    expected = _hand_grad_cam(convnext, layer, x, 1, lambda t: t)
    assert smap.shape == expected.shape and smap.shape[-2:] in ((8, 8), (4, 4))
    _close(smap, expected)
    assert torch.equal(smap, trl.grad_cam(convnext, x, 1, saliency_layer=layer, tokens=False))


def test_convnext_module_object_as_layer(convnext: nn.Module) -> None:
    x = _x()
    module = convnext.get_submodule("features.1.0.block.4")
    torch.testing.assert_close(trl.grad_cam(convnext, x, 2, saliency_layer=module),
                               trl.grad_cam(convnext, x, 2, saliency_layer="features.1.0.block.4"))


METHODS_WITH_TOKENS = ["grad_cam_plus_plus", "layer_cam", "xgrad_cam", "hires_cam",
                       "eigen_cam", "score_cam", "ablation_cam", "gradient", "linear_approx",
                       "lrp", "integrated_gradients"]


@pytest.mark.filterwarnings("ignore:LRPContext.*non-linearities")
@pytest.mark.parametrize("method", METHODS_WITH_TOKENS)
def test_every_layer_method_reads_channels_last(convnext: nn.Module, method: str) -> None:
    """Each method's map at a channels-last layer is its map with the layout given."""
    x = _x()
    fn: Any = getattr(trl, method)
    layer = "features.1.0.block.3"
    smap = fn(convnext, x, 1, saliency_layer=layer)
    assert smap.shape == (2, 1, 8, 8)
    torch.testing.assert_close(smap, fn(convnext, x, 1, saliency_layer=layer,
                                        tokens=CHANNELS_LAST))


def test_excitation_backprop_reads_channels_last(convnext: nn.Module) -> None:
    """excitation_backprop (no tokens=): the excitation at the layer summed over the features
    on the last axis, not over the rows."""
    x = _x()
    with pytest.warns(UserWarning):  # its note on the modules it does not model (GELU, LN)
        smap = trl.excitation_backprop(convnext, x, 1, saliency_layer="features.1.0.block.5")
    assert smap.shape == (2, 1, 8, 8) and smap.dtype == torch.float32  # was (2, 1, 8, 16)
    assert float(smap.abs().max()) > 0


# ---------------------------------------------------------------------------------------------
# Swin (v1, v2), ViT: unchanged, and the patch embedding's convolution is a map
# ---------------------------------------------------------------------------------------------

SWIN_LAST = ["features.0.1", "features.0.2", "features.0", "features.1.0.norm1",
             "features.1.0.mlp.0", "features.1.0.mlp.1", "features.1.0.mlp",
             "features.1.0", "features.2.reduction", "features.2", "norm"]


@pytest.mark.parametrize("which", ["swin", "swin_v2"])
def test_swin_stages(request: pytest.FixtureRequest, which: str) -> None:
    model = request.getfixturevalue(which)
    x = _x()
    for layer in SWIN_LAST:
        smap = trl.grad_cam(model, x, 0, saliency_layer=layer)
        torch.testing.assert_close(smap, trl.grad_cam(model, x, 0, saliency_layer=layer,
                                                      tokens=CHANNELS_LAST))
        assert smap.shape[:2] == (2, 1) and smap.shape[2] == smap.shape[3] in (1, 4, 8), layer
    conv = trl.grad_cam(model, x, 0, saliency_layer="features.0.0")  # the patch embedding
    _close(conv, _hand_grad_cam(model, "features.0.0", x, 0, lambda t: t))
    assert conv.shape == (2, 1, 8, 8)


def test_video_swin_stages_channels_last() -> None:
    """torchvision's SwinTransformer3d computes channels-last (N, T, H, W, C) with a tubelet
    stride of its own in time: its stages (and the automatic layer, its final norm) were read
    as (N, C=T, ...) before."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(0)
    model = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1],
                              num_heads=[2, 2], window_size=[2, 2, 2], num_classes=3).eval()
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))

    def to_map(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 4, 1, 2, 3)

    for layer, grid in (("features.0", (2, 8, 8)), ("features.0.0.mlp", (2, 8, 8)),
                        ("features.1.reduction", (2, 4, 4)), ("norm", (2, 4, 4))):
        smap = trl.grad_cam(model, x, 0, saliency_layer=layer)
        assert smap.shape == (2, 1) + grid
        _close(smap, _hand_grad_cam(model, layer, x, 0, to_map))
    auto = trl.grad_cam(model, x, 0)
    assert auto.shape == (2, 1, 2, 4, 4)
    _close(auto, _hand_grad_cam(model, "norm", x, 0, to_map))
    conv = trl.grad_cam(model, x, 0, saliency_layer="patch_embed.proj")
    _close(conv, _hand_grad_cam(model, "patch_embed.proj", x, 0, lambda t: t))


def test_vit_tokens_and_patch_embedding(vit: nn.Module) -> None:
    x = _x()
    conv = trl.eigen_cam(vit, x, 0, saliency_layer="conv_proj")  # (Grad-CAM's maps vanish here)
    assert conv.shape == (2, 1, 4, 4) and float(conv.max()) > 0
    assert torch.equal(conv, trl.eigen_cam(vit, x, 0, saliency_layer="conv_proj", tokens=False))
    layout = TokenLayout(prefix=1, grid=(4, 4))
    # torchvision's ViT starts with a zero head (every gradient zero): a head that reads
    # something, so that Grad-CAM's maps are no zeros that any layout would match.
    model = copy.deepcopy(vit)
    with torch.no_grad():
        model.heads.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    for layer in ("encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_0.mlp",
                  "encoder.layers.encoder_layer_0.ln_1", "encoder.ln"):
        # EigenCAM reads the activations alone: non-zero maps at every layer.
        smap = trl.eigen_cam(model, x, 0, saliency_layer=layer)
        assert smap.shape == (2, 1, 4, 4) and float(smap.amax((1, 2, 3)).min()) > 0
        torch.testing.assert_close(smap, trl.eigen_cam(model, x, 0, saliency_layer=layer,
                                                       tokens=layout))
    ln_1 = "encoder.layers.encoder_layer_0.ln_1"  # before the only attention: patches read
    smap = trl.grad_cam(model, x, 0, saliency_layer=ln_1)
    assert smap.shape == (2, 1, 4, 4) and float(smap.amax((1, 2, 3)).min()) > 0
    torch.testing.assert_close(smap, trl.grad_cam(model, x, 0, saliency_layer=ln_1,
                                                  tokens=layout))
    # After it, the class-token head reads no patch token: zero maps, said so.
    with pytest.warns(DegenerateMapWarning, match="reads nothing of its patch tokens"):
        smap = trl.grad_cam(model, x, 0, saliency_layer="encoder.layers.encoder_layer_0.mlp")
    assert not smap.any()


# ---------------------------------------------------------------------------------------------
# MaxViT: window partitions refused, the partition layer itself a map
# ---------------------------------------------------------------------------------------------

MAXVIT_WINDOW = "blocks.0.layers.0.layers.window_attention"
MAXVIT_INSIDE = ["partition_op", "partition_swap", "attn_layer.0", "attn_layer.1",
                 "attn_layer.1.merge", "attn_layer", "mlp_layer.1",
                 "mlp_layer.2", "mlp_layer", "departition_swap"]


@pytest.mark.parametrize("inner", MAXVIT_INSIDE)
def test_maxvit_window_partitions_refused(maxvit: nn.Module, inner: str) -> None:
    layer = f"{MAXVIT_WINDOW}.{inner}"
    module = maxvit.get_submodule(layer)
    with pytest.raises(ValueError) as info:
        trl.grad_cam(maxvit, _x(28), 0, saliency_layer=layer)
    message = str(info.value)
    assert f"saliency_layer {layer!r} ({type(module).__name__}) outputs shape (2, " in message
    assert "window partitions" in message and "PartitionAttentionLayer" in message
    assert f"saliency_layer={MAXVIT_WINDOW!r}" in message
    assert not module._forward_hooks and not maxvit._forward_hooks


@pytest.mark.parametrize("method", ["score_cam", "integrated_gradients", "gradient"])
def test_maxvit_refusal_in_other_methods(maxvit: nn.Module, method: str) -> None:
    with pytest.raises(ValueError, match=r"saliency_layer '.*mlp_layer\.1' \(Linear\) outputs "
                                         r"shape \(2, 1, 49, 64\).*window partitions"):
        getattr(trl, method)(maxvit, _x(28), 0, saliency_layer=f"{MAXVIT_WINDOW}.mlp_layer.1")


def test_maxvit_maps(maxvit: nn.Module) -> None:
    x = _x(28)
    for layer in (MAXVIT_WINDOW, f"{MAXVIT_WINDOW}.departition_op",
                  "blocks.0.layers.0.layers.MBconv", "stem"):
        smap = trl.grad_cam(maxvit, x, 0, saliency_layer=layer)
        _close(smap, _hand_grad_cam(maxvit, layer, x, 0, lambda t: t))
        assert smap.shape[:2] == (2, 1) and smap.shape[2] in (7, 14)


# ---------------------------------------------------------------------------------------------
# MLP-Mixer and MobileViT toys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["stem", "patch_embed"])
def test_mixer(stem: str) -> None:
    torch.manual_seed(0)
    model = Mixer(stem).eval()
    x = _x()
    grid = TokenLayout(prefix=0, grid=(4, 4))
    for layer in ("blocks.0.norm1", "blocks.0.channel_mlp.2", "blocks.0.channel_mlp", "norm"):
        smap = trl.grad_cam(model, x, 1, saliency_layer=layer)  # features last: tokens
        expected = _hand_grad_cam(model, layer, x, 1, grid)
        _close(smap, expected)
        assert smap.shape == (2, 1, 4, 4)
    assert trl.grad_cam(model, x, 1, saliency_layer=stem).shape == (2, 1, 4, 4)
    for layer in ("blocks.0.token_mlp.0", "blocks.0.token_mlp.1", "blocks.0.token_mlp"):
        with pytest.raises(ValueError, match=r"saliency_layer '.*token_mlp.*' \((Linear|GELU|"
                                             r"Sequential)\) outputs shape \(2, 24, (32|16)\).*"
                                             r"token mixing.*saliency_layer='blocks.0'"):
            trl.grad_cam(model, x, 1, saliency_layer=layer)


def test_mobilevit_toy() -> None:
    torch.manual_seed(0)
    model = MobileViTToy().eval()
    x = _x()
    for layer in ("stem", "block.local", "block.fuse", "block"):
        smap = trl.grad_cam(model, x, 0, saliency_layer=layer)
        assert smap.shape == (2, 1, 16, 16)
        _close(smap, _hand_grad_cam(model, layer, x, 0, lambda t: t))
    for layer in ("block.norm", "block.mlp.0", "block.mlp"):  # (N, 4 pixels, 64 patches, d)
        with pytest.raises(ValueError, match=r"outputs shape \(2, 4, 64, (12|24)\).*no grid of "
                                             r"the input's \(32, 32\).*saliency_layer='block'"):
            trl.grad_cam(model, x, 0, saliency_layer=layer)


# ---------------------------------------------------------------------------------------------
# Hostile cases: unknown permutations, a linear layer over a map's width, overrides
# ---------------------------------------------------------------------------------------------


class OddCNN(nn.Module):
    def __init__(self, dims: Any) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), Permute(dims), nn.ReLU())
        self.width = nn.Linear(16, 5)          # over the last axis of (N, C, H, W): W -> 5
        self.norm = nn.LayerNorm([6, 16, 16])  # (C, H, W): a channels-first map
        self.head = nn.Linear(6, 2)
        self.inverse = [list(dims).index(i) for i in range(4)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.body(x).permute(*self.inverse))  # back to (N, C, H, W)
        return self.head(y.mean((2, 3))) + self.width(y).mean((1, 2, 3))[:, None]


def test_unknown_permutation_refused() -> None:
    torch.manual_seed(0)
    model = OddCNN([0, 1, 3, 2]).eval()
    x = _x(16)
    with pytest.raises(ValueError, match=r"saliency_layer 'body.1' \(Permute\) outputs shape "
                                         r"\(2, 6, 16, 16\).*permutes the axes by \[0, 1, 3, 2\]"):
        trl.grad_cam(model, x, 0, saliency_layer="body.1")
    with pytest.raises(ValueError, match=r"'body.2' \(ReLU\).*permutes the axes"):
        trl.grad_cam(model, x, 0, saliency_layer="body.2")
    # the override reads the tensor as it is (the caller knows the layout)
    assert trl.grad_cam(model, x, 0, saliency_layer="body.1", tokens=False).shape == (2, 1, 16, 16)


def test_linear_over_width_refused_and_layernorm_chw_kept() -> None:
    torch.manual_seed(0)
    model = OddCNN([0, 2, 3, 1]).eval()
    x = _x(16)
    with pytest.raises(ValueError, match=r"saliency_layer 'width' \(Linear\) outputs shape "
                                         r"\(2, 6, 16, 5\).*\(6, 16\) are no grid of the input's "
                                         r"\(16, 16\)"):
        trl.grad_cam(model, x, 0, saliency_layer="width")
    smap = trl.grad_cam(model, x, 0, saliency_layer="norm")  # LayerNorm over (C, H, W)
    _close(smap, _hand_grad_cam(model, "norm", x, 0, lambda t: t))
    # body.1 moves the channels last: read channels-last, as the ReLU after it
    for layer in ("body.1", "body.2", "body"):
        smap = trl.grad_cam(model, x, 0, saliency_layer=layer)
        _close(smap, _hand_grad_cam(model, layer, x, 0,
                                                        lambda t: t.permute(0, 3, 1, 2)))


def test_channels_last_1d() -> None:
    """A 1-D model that is no token model: a linear layer's ``(N, L, D)`` output cannot be told
    from one over the length axis of ``(N, C, L)``, so it is refused, saying what to pass;
    ``tokens=TokenLayout(channels_last=True)`` reads the features last (a hand Grad-CAM), and
    a linear layer over the length of a 1-D CNN's ``(N, C, L)`` (which the grid test let
    through as channels-last) is refused the same way."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.mix = nn.Conv1d(2, 8, 4, 4), nn.Linear(8, 12)
            self.head = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.mix(self.embed(x).transpose(1, 2)).mean(1))

    torch.manual_seed(0)
    model = Seq().eval()
    x = torch.randn(2, 2, 32)
    with pytest.raises(ValueError, match=r"saliency_layer 'mix' \(Linear\) outputs shape "
                                         r"\(2, 8, 12\).*for 1-D data a features-last output"):
        trl.grad_cam(model, x, 0, saliency_layer="mix")
    smap = trl.grad_cam(model, x, 0, saliency_layer="mix",
                        tokens=TokenLayout(channels_last=True))
    assert smap.shape == (2, 1, 8)
    _close(smap, _hand_grad_cam(model, "mix", x, 0,
                                                    lambda t: t.transpose(1, 2)))


def test_module_layout_verdicts(convnext: nn.Module, maxvit: nn.Module) -> None:
    verdicts = {name: module_layout(convnext, convnext.get_submodule(name), 4)
                for name in CN_INSIDE + ["features.1.0.block.0", "features.1.0.block.6",
                                         "features.1.0.block", "features.1.0", "features.0.1"]}
    assert [verdicts[n] for n in CN_INSIDE] == ["last"] * 5
    assert [verdicts[n] for n in ("features.1.0.block.0", "features.1.0.block.6",
                                  "features.1.0.block")] == ["first"] * 3
    assert verdicts["features.1.0"] is None and verdicts["features.0.1"] is None  # LayerNorm2d
    refused = module_layout(maxvit, maxvit.get_submodule(f"{MAXVIT_WINDOW}.partition_op"), 4)
    assert isinstance(refused, tuple) and refused[0] == "refuse"


def test_sequential_order_trusted_only_when_forward_is_sequentials() -> None:
    """A GELU after a convolution in an nn.Sequential has the convolution's layout; inside an
    nn.Sequential subclass with its own forward (a residual here) nothing is decided."""

    class Residual(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GELU(), Residual(nn.GELU()),
                          nn.Sequential(nn.GELU()), Permute([0, 2, 3, 1]), nn.GELU())
    verdicts = [module_layout(model, model[i], 4) for i in range(6)]
    assert verdicts == ["first", "first", None, None, "last", "last"]
    assert module_layout(model, model[2][0], 4) is None


def test_score_cam_names_saliency_layer_once_in_a_layout_refusal():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Permute([0, 1, 3, 2]), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match=r"^score_cam: saliency_layer '1' \(Permute\) outputs "
                                         r"shape \(1, 4, 10, 8\)") as info:
        trl.score_cam(model, torch.randn(1, 3, 8, 10), 1, saliency_layer="1")
    assert str(info.value).count("saliency_layer '1'") == 1


def test_a_compiled_models_layer_is_read_by_its_module_with_or_without_the_prefix():
    """torch.compile(model) is explained through its original module: a layer named without
    the ``_orig_mod.`` prefix is found there too (it fell back to the shape-only inference)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Permute([0, 2, 3, 1]), nn.Linear(4, 4))
    compiled = torch.compile(model)
    for layer in ("2", "_orig_mod.2"):
        assert explicit_layout(compiled, layer, (1, 8, 8, 4), (1, 3, 8, 8)) == "last"


def test_a_linear_layer_over_a_1d_cnns_length_is_refused() -> None:
    model = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.Linear(32, 16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 16, 3)).eval()
    with pytest.raises(ValueError, match="cannot be told from a linear layer over the length"):
        trl.grad_cam(model, torch.randn(2, 2, 32), 0, saliency_layer="1")
    # Read as it is on request: the map over the 8 channels' 16 mixed positions.
    assert trl.grad_cam(model, torch.randn(2, 2, 32), 0, saliency_layer="1",
                        tokens=False).shape == (2, 1, 16)
