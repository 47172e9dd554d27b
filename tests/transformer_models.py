"""Small vision transformers for the attention tests: torchvision's VisionTransformer (which
uses nn.MultiheadAttention) and the same weights run by an explicit ViT written here, with the
attention as explicit softmax / matmul or as F.scaled_dot_product_attention, and with the
reference rules of CP-LRP and AttnLRP written as ``.detach()`` tricks (gradient × input of
these references is the relevance the papers define)."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


def tv_vit() -> nn.Module:
    """torchvision's VisionTransformer as the token tests use it (32² images, 8² patches, two
    blocks, width 32), deterministic random weights (the head's too: torchvision starts it at
    zero), eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_()
    return model


def make_vit(layers: int = 2, heads: int = 2, dim: int = 16, image: int = 32, patch: int = 8,
             classes: int = 5, bias: bool = True, seed: int = 0) -> nn.Module:
    """torchvision's VisionTransformer with deterministic random weights (the head too: its
    default is zeros), eval mode.  ``bias=False`` zeroes every bias, the positional embedding
    and the class token (for conservation checks)."""
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=image, patch_size=patch, num_layers=layers, num_heads=heads,
        hidden_dim=dim, mlp_dim=2 * dim, num_classes=classes).eval()
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight, std=0.5)
        nn.init.normal_(model.heads.head.bias, std=0.1)
        nn.init.normal_(model.class_token, std=0.5)
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith(
                    "ln.weight"):
                p.uniform_(0.5, 1.5)
            if not bias and (name.endswith("bias") or name in ("class_token",
                                                                "encoder.pos_embedding")):
                p.zero_()
    return model


class ExplicitViT(nn.Module):
    """The forward pass of a torchvision ViT written out.

    ``attention``: ``"explicit"`` (softmax of q·kᵀ, then @ v), ``"einsum"`` (the same with
    ``torch.einsum`` and ``F.softmax``) or ``"sdpa"``.  ``reference``:
    ``None`` (plain), ``"cp-lrp"`` (softmax output and LayerNorm's σ detached) or
    ``"attnlrp"`` (σ detached, each bilinear product passes half the gradient to each operand,
    GELU and ReLU with the identity rule, ε-rule on every linear layer and convolution with
    ``epsilon``).  ``activation``: ``"gelu"`` (the model's) or ``"relu"``.
    """

    def __init__(self, vit: nn.Module, attention: str = "explicit", reference=None,
                 epsilon: float = 0.0, activation: str = "gelu") -> None:
        super().__init__()
        self.vit, self.attention, self.reference = vit, attention, reference
        self.epsilon, self.activation = epsilon, activation

    # -- the reference rules, as detach tricks ----------------------------------------------
    def _eps(self, z: torch.Tensor) -> torch.Tensor:
        if self.reference != "attnlrp" or not self.epsilon:
            return z
        stab = z + torch.where(z >= 0, self.epsilon, -self.epsilon)
        ratio = (z / stab).detach()
        # value z, gradient scaled by z / (z + ε sign z): the ε-rule in gradient form
        return z * ratio + (z * (1 - ratio)).detach()

    def _half(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + 0.5 * z.detach() if self.reference == "attnlrp" else z

    def _norm(self, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            return ln(x)
        centred = x - x.mean(-1, keepdim=True)
        sigma = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps).detach()
        return centred / sigma * ln.weight + ln.bias

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(x) if self.activation == "gelu" else F.relu(x)
        if self.reference == "attnlrp":
            ratio = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, 1, x))
            return x * ratio.detach()  # identity rule: g_x = (y / x) g_y
        return y

    def _linear(self, x, weight, bias):
        return self._eps(F.linear(x, weight, bias))

    def _attend(self, x: torch.Tensor, mha: nn.MultiheadAttention) -> torch.Tensor:
        n, t, d = x.shape
        h = mha.num_heads
        qkv = self._linear(x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.attention == "einsum":
            a = torch.einsum("nhqd,nhkd->nhqk", q, k) * (d // h) ** -0.5
            o = torch.einsum("nhqk,nhkd->nhqd", F.softmax(a, dim=-1), v)
        else:
            a = self._half(q @ k.transpose(-2, -1)) * (d // h) ** -0.5
            a = a.softmax(-1)
            if self.reference == "cp-lrp":
                a = a.detach()
            o = self._half(a @ v)
        o = o.transpose(1, 2).reshape(n, t, d)
        return self._linear(o, mha.out_proj.weight, mha.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        n = x.shape[0]
        x = self._eps(vit.conv_proj(x)).flatten(2).transpose(1, 2)
        x = torch.cat([vit.class_token.expand(n, -1, -1), x], dim=1)
        x = x + vit.encoder.pos_embedding
        for layer in vit.encoder.layers:
            x = x + self._attend(self._norm(layer.ln_1, x), layer.self_attention)
            z = self._norm(layer.ln_2, x)
            z = self._linear(z, layer.mlp[0].weight, layer.mlp[0].bias)
            z = self._linear(self._act(z), layer.mlp[3].weight, layer.mlp[3].bias)
            x = x + z
        x = self._norm(vit.encoder.ln, x)
        return self._linear(x[:, 0], vit.heads.head.weight, vit.heads.head.bias)


def reference_relevance(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Gradient × input of ``model``'s target logit, summed over channels: ``(N, 1, H, W)``."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return (x * grad).sum(1, keepdim=True).detach()


# ---------------------------------------------------------------------------------------------
# Fixtures shared by the attention tests: ``tests/conftest.py`` registers this module as a
# plugin, so every test module sees ``vit``, ``models`` and ``x`` (its own fixture of the same
# name wins)

#: The four ways the test ViT runs its attention (see :func:`vit_variants`).
KINDS = ("torchvision", "explicit", "sdpa", "einsum")


def vit_variants(vit: nn.Module) -> Dict[str, nn.Module]:
    """``vit`` itself and the explicit ViTs with its weights, by attention kind."""
    return {"torchvision": vit, "explicit": ExplicitViT(vit), "sdpa": ExplicitViT(vit, "sdpa"),
            "einsum": ExplicitViT(vit, "einsum")}


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    """:func:`make_vit` with its defaults."""
    return make_vit()


@pytest.fixture(scope="module")
def models(vit: nn.Module) -> Dict[str, nn.Module]:
    """:func:`vit_variants` of the ``vit`` fixture."""
    return vit_variants(vit)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    """Two 32² images (seed 1)."""
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)
