"""Small vision-transformer variants for the architecture sweep (tests/test_transformer_sweep.py),
written here from the papers (no timm): one configurable :class:`VariantViT` with deterministic
random weights.

* ``pool``: ``"cls"`` (a class token read by the head, ViT: Dosovitskiy et al. 2021),
  ``"map"`` (attention pooling: a learned query attends over the patch tokens, ``(N, H, 1,
  T)`` scores, explicit or sdpa as the blocks),
  ``"gap"`` (no class token; the head reads the mean of the patch tokens), ``"distill"``
  (DeiT: a class and a distillation token, the head averages its two heads' logits; Touvron et
  al. 2021);
* ``registers``: extra learned tokens after the class / distillation tokens (Darcet et al.
  2024), dropped by the head;
* ``qkv``: ``"fused"`` (one ``qkv`` Linear) or ``"separate"`` (``q``, ``k``, ``v`` Linears);
  ``attention``: ``"explicit"`` (``softmax(q kᵀ/√d) v`` by hand) or ``"sdpa"``
  (``F.scaled_dot_product_attention``);
* ``norm``: ``"layer"`` (pre-norm ``nn.LayerNorm``) or ``"rms"`` (``nn.RMSNorm``);
* ``image`` / ``patch``: non-square images and patches (``(32, 48)``, ``(8, 12)``);
* ``bias=False``: no biases, no positional embedding, zero prefix tokens (a function of the
  input that is homogeneous of degree one once the attention and σ are held constant: the
  conservation checks of CP-LRP); ``activation="relu"`` for them;
* ``attention="bmm"``: the heads folded into the batch, ``(N·H, T, T)`` scores by
  ``torch.bmm``; ``layer_scale``: LayerScale (Touvron et al. 2021, CaiT); ``qk_norm``:
  LayerNorm on each head's queries and keys; ``activation="swiglu"``: a SwiGLU MLP;
* ``dropout``: dropout after attention and MLP, and attention dropout in the sdpa call,
  active in train mode only.

The attributes are named as timm names them (``cls_token``, ``dist_token``, ``reg_token``,
``patch_embed.proj`` / ``patch_embed.patch_size``, ``pos_embed``), or, with ``declare=False``,
with names no library reads (``start``, ``extra``), so that the layout must be inferred from
the shapes alone.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Pair = Union[int, Tuple[int, int]]


def _pair(value: Pair) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class PatchEmbed(nn.Module):
    """A strided convolution, as timm's ``PatchEmbed`` (``patch_size`` says the stride)."""

    def __init__(self, patch: Tuple[int, int], dim: int, bias: bool) -> None:
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused or separate q/k/v projection, computed by hand
    or by ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, qkv: str, attention: str, bias: bool,
                 dropout: float) -> None:
        super().__init__()
        self.heads, self.kind, self.dropout = heads, attention, dropout
        if qkv == "fused":
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.k = nn.Linear(dim, dim, bias=bias)
            self.v = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.attn_drop = nn.Dropout(dropout)
        #: A list to append each call's probabilities to (on the autograd graph), or None.
        self.kept: Optional[list] = None
        self.q_norm: nn.Module = nn.Identity()   # qk-norm: LayerNorm over each head's q, k
        self.k_norm: nn.Module = nn.Identity()

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, d = x.shape
        h = self.heads
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            return q, k, v
        return tuple(lin(x).reshape(n, t, h, d // h).transpose(1, 2)  # type: ignore[return-value]
                     for lin in (self.q, self.k, self.v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self._qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kind == "bmm":  # heads folded into the batch: (N·H, T, T) scores
            h = self.heads
            q, k, v = (z.reshape(n * h, t, d // h) for z in (q, k, v))
            a = (torch.bmm(q, k.transpose(1, 2)) * (d // h) ** -0.5).softmax(-1)
            o = torch.bmm(self.attn_drop(a), v).reshape(n, h, t, d // h)
        elif self.kind == "sdpa":
            o = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            a = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
            if self.kept is not None:
                self.kept.append(a)
            o = self.attn_drop(a) @ v
        return self.proj(o.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, qkv: str, attention: str, norm: str, bias: bool,
                 activation: str, dropout: float) -> None:
        super().__init__()
        make_norm = ((lambda: nn.LayerNorm(dim, bias=bias)) if norm == "layer"
                     else (lambda: nn.RMSNorm(dim)))
        self.norm1, self.norm2 = make_norm(), make_norm()
        self.attn = Attention(dim, heads, qkv, attention, bias, dropout)
        self.fc1 = nn.Linear(dim, (4 if activation == "swiglu" else 2) * dim, bias=bias)
        self.fc2 = nn.Linear(2 * dim, dim, bias=bias)
        self.act = nn.GELU() if activation in ("gelu", "swiglu") else nn.ReLU()
        self.swiglu = activation == "swiglu"
        self.drop = nn.Dropout(dropout)
        self.gamma1: Optional[nn.Parameter] = None   # LayerScale (CaiT, DeiT III, DINOv2)
        self.gamma2: Optional[nn.Parameter] = None

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:  # SwiGLU (EVA-02, DINOv2-g): silu(x W1) ⊙ (x W2)
            gate, value = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * value)
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.drop(self.attn(self.norm1(x)))
        x = x + (z if self.gamma1 is None else self.gamma1 * z)
        z = self.drop(self._mlp(self.norm2(x)))
        return x + (z if self.gamma2 is None else self.gamma2 * z)


class VariantViT(nn.Module):
    """A small ViT whose construction choices are the sweep's variants (see the module)."""

    def __init__(self, pool: str = "cls", registers: int = 0, qkv: str = "fused",
                 attention: str = "explicit", norm: str = "layer", image: Pair = 32,
                 patch: Pair = 8, dim: int = 16, heads: int = 2, depth: int = 2,
                 classes: int = 5, bias: bool = True, activation: str = "gelu",
                 dropout: float = 0.0, declare: bool = True, register_name: str = "",
                 layer_scale: bool = False, qk_norm: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        image, patch = _pair(image), _pair(patch)
        grid = (image[0] // patch[0], image[1] // patch[1])
        self.pool, self.declare = pool, declare
        self.patch_embed = PatchEmbed(patch, dim, bias)
        if not declare:
            del self.patch_embed.patch_size  # nothing but the convolution's stride says it
        prefix = {"cls": 1, "gap": 0, "distill": 2, "map": 0}[pool]
        tokens = [nn.Parameter(torch.randn(1, 1, dim) * 0.5 * bias) for _ in range(prefix)]
        names = ("cls_token", "dist_token") if declare else ("start", "start2")
        for name, token in zip(names, tokens):
            setattr(self, name, token)
        self.prefix_names = names[:prefix]
        self.register_names: Tuple[str, ...] = ()
        if registers:
            name = register_name or ("reg_token" if declare else "extra")
            setattr(self, name, nn.Parameter(torch.randn(1, registers, dim) * 0.5 * bias))
            self.register_names = (name,)
        count = prefix + registers + grid[0] * grid[1]
        self.positions = nn.Parameter(torch.randn(1, count, dim) * 0.1 * bias)
        if declare:
            self.pos_embed = self.positions
        self.blocks = nn.Sequential(*(Block(dim, heads, qkv, attention, norm, bias, activation,
                                            dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, bias=bias) if norm == "layer" else nn.RMSNorm(dim)
        self.head = nn.Linear(dim, classes, bias=bias)
        self.head_dist: Optional[nn.Linear] = (nn.Linear(dim, classes, bias=bias)
                                               if pool == "distill" else None)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("head"):
                    p.normal_(std=0.5 if name.endswith("weight") else 0.1)
                elif name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                    p.uniform_(0.5, 1.5)
        if pool == "map":  # a learned query attends over the tokens (timm's "map" pooling)
            self.latent = nn.Parameter(torch.randn(1, 1, dim))
            self.pool_kv = nn.Linear(dim, 2 * dim, bias=bias)
            self.heads, self.attention_kind = heads, attention
        for block in self.blocks:  # added last: the other weights stay those of the base
            if layer_scale:
                block.gamma1 = nn.Parameter(torch.rand(dim) + 0.5)
                block.gamma2 = nn.Parameter(torch.rand(dim) + 0.5)
            if qk_norm:
                block.attn.q_norm = nn.LayerNorm(dim // heads, bias=bias)
                block.attn.k_norm = nn.LayerNorm(dim // heads, bias=bias)
        self.eval()

    def _map(self, z: torch.Tensor) -> torch.Tensor:
        n, t, d = z.shape
        h = self.heads
        k, v = self.pool_kv(z).reshape(n, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
        q = self.latent.reshape(1, 1, h, d // h).transpose(1, 2).expand(n, -1, -1, -1)
        if self.attention_kind == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1) @ v
        return o.reshape(n, d)

    @property
    def num_prefix(self) -> int:
        """Tokens before the patch tokens (class, distillation, registers)."""
        return len(self.prefix_names) + sum(int(getattr(self, n).shape[-2])
                                            for n in self.register_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        patches = self.patch_embed(x)
        # (a register parameter may be 2-D, (R, D), as in some implementations)
        prefix = [getattr(self, name).reshape(1, -1, patches.shape[-1]).expand(n, -1, -1)
                  for name in self.prefix_names + self.register_names]
        z = torch.cat(prefix + [patches], dim=1) + self.positions
        z = self.norm(self.blocks(z))
        if self.pool == "gap":
            return self.head(z[:, self.num_prefix:].mean(1))
        if self.pool == "map":
            return self.head(self._map(z))
        if self.pool == "distill":
            assert self.head_dist is not None
            return (self.head(z[:, 0]) + self.head_dist(z[:, 1])) / 2
        return self.head(z[:, 0])
