"""Attention capture, rollout, flow and gradient-weighted rollout (issue 21, item 2).

One set of random ViT weights is run three ways — torchvision's VisionTransformer
(nn.MultiheadAttention), an explicit softmax/matmul ViT and an F.scaled_dot_product_attention
ViT — and every method must give the same map from each, equal to a hand computation."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.transformer_models import (
    KINDS,
    ExplicitViT,
)
from torchray_like.attribution import METHODS
from torchray_like.attribution.attention import AttentionCapture, explicit_sdpa, sdpa_arguments
from torchray_like.attribution.attention_rollout import (
    attention_flow,
    attention_rollout,
    grad_rollout,
    read_attentions,
    rollout,
    tokens_to_grid,
)
from torchray_like.attribution.registry import TRANSFORMER_ONLY_METHODS
from torchray_like.attribution.transformer_lrp import TransformerLRPContext

torch.set_num_threads(1)


def _hand_attentions(vit, x):
    """The attention probabilities of the explicit ViT, computed here by hand."""
    with torch.no_grad():
        n = x.shape[0]
        h = vit.conv_proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([vit.class_token.expand(n, -1, -1), h], 1) + vit.encoder.pos_embedding
        out = []
        for layer in vit.encoder.layers:
            mha = layer.self_attention
            y = layer.ln_1(h)
            d = y.shape[-1]
            q, k, _ = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).reshape(
                n, -1, 3, mha.num_heads, d // mha.num_heads).permute(2, 0, 3, 1, 4)
            out.append(((q @ k.transpose(-2, -1)) / (d // mha.num_heads) ** 0.5).softmax(-1))
            h = layer(h)
    return [a.numpy().astype(np.float64) for a in out]


def _numpy_rollout(attentions, fusion="mean", discard=0.0):
    result = None
    for a in attentions:
        fused = {"mean": a.mean(1), "max": a.max(1), "min": a.min(1)}[fusion]
        n, t, _ = fused.shape
        fused = fused.copy()
        drop = int(t * t * discard)
        for b in range(n):
            flat = fused[b].reshape(-1)
            flat[np.argsort(flat, kind="stable")[:drop]] = 0
        layer = fused + np.eye(t)
        layer = layer / layer.sum(-1, keepdims=True)
        result = layer if result is None else layer @ result
    return result


# -- capture --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("differentiable", [False, True])
def test_capture_reads_the_same_attention_and_leaves_the_output_bit_identical(
        models, vit, x, kind, differentiable):
    model = models[kind]
    xr = x.clone().requires_grad_()
    plain = model(xr)  # with autograd: nn.MultiheadAttention takes its documented math path
    with torch.set_grad_enabled(differentiable):
        with AttentionCapture(differentiable=differentiable) as capture:
            seen = model(xr)
    assert torch.equal(plain, seen)  # the model's output is never changed
    if kind == "torchvision":
        # Without autograd and outside any torch-function mode PyTorch takes MHA's fused fast
        # path, whose rounding differs; inside the capture it takes the math path.
        with torch.no_grad():
            torch.testing.assert_close(model(x), seen, atol=1e-6, rtol=1e-6)
    assert len(capture.attentions) == 2 and capture.counts == {"attention": 2}
    source = {"torchvision": "multi_head_attention_forward", "explicit": "softmax",
              "einsum": "softmax", "sdpa": "scaled_dot_product_attention"}[kind]
    assert capture.sources == [source, source]
    for got, want in zip(capture.attentions, _hand_attentions(vit, x)):
        assert got.shape == (2, 2, 17, 17)
        np.testing.assert_allclose(got.detach().double().numpy(), want, atol=2e-6)
        assert got.requires_grad == differentiable


def test_differentiable_capture_keeps_the_input_gradient(models, x):
    for kind in ("torchvision", "sdpa"):
        model = models[kind]
        xr = x.clone().requires_grad_()
        (plain,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
        with AttentionCapture(differentiable=True) as capture:
            y = model(xr)
        grads = torch.autograd.grad(y[:, 1].sum(), [xr] + capture.attentions)
        torch.testing.assert_close(grads[0], plain, atol=1e-6, rtol=1e-5)
        assert all(g.shape == (2, 2, 17, 17) and g.abs().sum() > 0 for g in grads[1:])


def test_explicit_sdpa_matches_the_fused_kernel_for_masks_causality_scale_and_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    cases = [{}, {"is_causal": True}, {"attn_mask": torch.rand(5, 5) > 0.3},
             {"attn_mask": torch.randn(2, 1, 5, 5)}, {"scale": 0.3}]
    for kw in cases:
        want = F.scaled_dot_product_attention(q, k, v, **kw)
        got = explicit_sdpa(sdpa_arguments((q, k, v), kw), _plain_ops())
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    k2, v2 = k[:, :2], v[:, :2]
    want = F.scaled_dot_product_attention(q, k2, v2, enable_gqa=True)
    got = explicit_sdpa(sdpa_arguments((q, k2, v2), {"enable_gqa": True}), _plain_ops())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def _plain_ops():
    from torchray_like.attribution.attention import AttentionOps

    return AttentionOps()


class _MaskedMHA(nn.Module):
    """nn.MultiheadAttention (batch first) with a key padding mask, returning its weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv1d(3, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.weights = None

    def forward(self, x):
        t = self.embed(x).transpose(1, 2)
        pad = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.bool)
        pad[:, -2:] = True
        out, self.weights = self.attn(t, t, t, key_padding_mask=pad, need_weights=True,
                                      average_attn_weights=False)
        return self.head(out.mean(1))


def test_mha_with_key_padding_mask_and_returned_weights():
    model = _MaskedMHA().eval()
    x = torch.randn(2, 3, 6)
    plain = model(x.clone().requires_grad_())  # autograd: MHA's math path, not the fast path
    returned = model.weights.detach()
    with torch.no_grad(), AttentionCapture() as capture:
        assert torch.equal(model(x), plain)
    (got,) = capture.attentions
    torch.testing.assert_close(got, returned, atol=1e-6, rtol=1e-5)
    assert float(got[..., -2:].abs().max()) == 0.0  # padded keys get no attention
    # The same under the differentiable capture, whose returned weights are substitutes.
    with AttentionCapture(differentiable=True) as capture:
        y = model(x.clone().requires_grad_())
    assert torch.equal(y, plain) and torch.equal(model.weights, returned)
    assert model.weights.requires_grad


# -- rollout --------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_equals_a_numpy_computation_from_every_attention_path(models, vit, x, fusion,
                                                                       discard):
    want = _numpy_rollout(_hand_attentions(vit, x), fusion, discard)[:, 0, 1:].reshape(
        2, 1, 4, 4)
    for kind in KINDS:
        got = attention_rollout(models[kind], x, head_fusion=fusion, discard_ratio=discard)
        assert got.shape == (2, 1, 4, 4) and got.dtype == torch.float32
        np.testing.assert_allclose(got.double().numpy(), want, atol=2e-6)


def test_rollout_rows_sum_to_one_and_mean_fusion_is_half_a_plus_half_identity(models, x):
    attentions, _ = read_attentions(models["explicit"], x, "test")
    for fusion in ("mean", "max", "min"):
        for discard in (0.0, 0.3, 0.9):
            matrix = rollout(attentions, fusion, discard)
            assert matrix.shape == (2, 17, 17) and matrix.dtype == torch.float64
            torch.testing.assert_close(matrix.sum(-1), torch.ones(2, 17, dtype=torch.float64))
            assert float(matrix.min()) >= 0
    half = [0.5 * a.mean(1).double() + 0.5 * torch.eye(17, dtype=torch.float64)
            for a in attentions]
    torch.testing.assert_close(rollout(attentions), half[1] @ half[0])


def test_discard_ratio_zeroes_the_lowest_weights():
    a = torch.tensor([[[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]],
                     dtype=torch.float64)
    matrix = rollout([a], "mean", 0.34)  # int(9 * 0.34) = 3 lowest entries (the 0.1s)
    fused = a[0, 0].clone()
    fused[fused == 0.1] = 0
    want = fused + torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(matrix[0], want / want.sum(-1, keepdim=True))


# -- gradient-weighted rollout ----------------------------------------------------------------


def _hand_grad_rollout(vit, x, target):
    """Chefer et al. 2021 by hand on the explicit ViT, hooks on its softmax outputs."""
    probs = []

    class Keep(ExplicitViT):
        def _attend(self, h, mha):
            n, t, d = h.shape
            q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).reshape(
                n, t, 3, mha.num_heads, -1).permute(2, 0, 3, 1, 4)
            a = ((q @ k.transpose(-2, -1)) * (d // mha.num_heads) ** -0.5).softmax(-1)
            probs.append(a)
            return mha.out_proj((a @ v).transpose(1, 2).reshape(n, t, d))

    y = Keep(vit)(x)
    grads = torch.autograd.grad(y[:, target].sum(), probs)
    r = torch.eye(17, dtype=torch.float64).expand(2, 17, 17)
    for a, g in zip(probs, grads):
        r = r + (a * g).clamp(min=0).mean(1).double() @ r
    return r[:, 0, 1:].reshape(2, 1, 4, 4).detach()


def test_grad_rollout_equals_a_hand_computation_from_every_attention_path(models, vit, x):
    want = _hand_grad_rollout(vit, x, 3)
    assert float(want.abs().sum()) > 0
    for kind in KINDS:
        got = grad_rollout(models[kind], x, 3)
        assert got.shape == (2, 1, 4, 4) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    # class-specific: another class gives another map
    assert not torch.allclose(grad_rollout(models["sdpa"], x, 0), grad_rollout(
        models["sdpa"], x, 3))


# -- attention flow -------------------------------------------------------------------------


def test_attention_flow_equals_networkx_max_flow(models, vit, x):
    attentions = _hand_attentions(vit, x)
    layers = []
    for a in attentions:
        fused = a.mean(1) + np.eye(17)
        layers.append(fused / fused.sum(-1, keepdims=True))
    want = np.zeros((2, 17))
    for b in range(2):
        graph = nx.DiGraph()
        for level, layer in enumerate(layers):
            for i in range(17):
                for j in range(17):
                    graph.add_edge((level, j), (level + 1, i), capacity=layer[b, i, j])
        for source in range(1, 17):
            want[b, source] = nx.maximum_flow_value(graph, (0, source), (2, 0))
    for kind in KINDS:
        got = attention_flow(models[kind], x)
        assert got.shape == (2, 1, 4, 4)
        np.testing.assert_allclose(got.double().numpy().reshape(2, 16), want[:, 1:], atol=1e-5)


def test_attention_flow_is_bounded_and_says_its_cost(models, x):
    with pytest.raises(ValueError, match=r"max-flow problems.*max_work=1e\+03.*Raise max_work"):
        attention_flow(models["explicit"], x, max_work=1e3)


# -- the registry contract on a ViT, state, hostile inputs ----------------------------------


@pytest.mark.parametrize("name", sorted(set(TRANSFORMER_ONLY_METHODS) | {"attn_lrp"}))
def test_transformer_methods_keep_the_registry_contract_on_a_vit(models, x, name):
    smap = METHODS[name](models["torchvision"], x, [1, 2])
    assert isinstance(smap, torch.Tensor) and smap.dtype == x.dtype
    assert smap.shape[:2] == (2, 1) and smap.dim() == 4 and torch.isfinite(smap).all()
    resized = METHODS[name](models["torchvision"], x, [1, 2], resize=True)
    assert resized.shape == (2, 1, 32, 32)


def test_methods_leave_the_model_as_they_found_it(vit, x):
    vit.train()
    flags = {n: p.requires_grad for n, p in vit.named_parameters()}
    try:
        for fn in (attention_rollout, grad_rollout):
            fn(vit, x, 1)
        assert vit.training and all(m.training for m in vit.modules())
        assert {n: p.requires_grad for n, p in vit.named_parameters()} == flags
        assert all(p.grad is None for p in vit.parameters())
        assert not vit._forward_hooks and not vit._forward_pre_hooks
    finally:
        vit.eval()


def test_a_cnn_has_no_attention_to_read(x):
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    for fn in (attention_rollout, attention_flow):
        with pytest.raises(ValueError, match=r"Sequential computed no attention.*"
                                             r"scaled_dot_product_attention.*grad_cam"):
            fn(cnn, x)
    with pytest.raises(ValueError, match="computed no attention"):
        grad_rollout(cnn, x, 1)
    with pytest.raises(ValueError, match="gradient × input"):
        METHODS["cp_lrp"](cnn, x, 1)


def test_bad_arguments_are_refused_with_their_names(models, x):
    model = models["explicit"]
    with pytest.raises(ValueError, match="head_fusion must be one of 'mean', 'max', 'min'"):
        attention_rollout(model, x, head_fusion="median")
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="discard_ratio must be a number in"):
            attention_rollout(model, x, discard_ratio=bad)
    with pytest.raises(ValueError, match="target"):
        attention_rollout(model, x, [1, 2, 3])  # a length that is not the batch
    with pytest.raises(ValueError, match=r"cannot lay the 17 tokens.*grid=\(h, w\)"):
        attention_rollout(model, x, grid=(5, 5))
    with pytest.raises(ValueError, match="num_prefix_tokens must be an int"):
        attention_rollout(model, x, num_prefix_tokens=17)
    smap = attention_rollout(model, x, num_prefix_tokens=1, grid=(2, 8))
    assert smap.shape == (2, 1, 2, 8)


def test_tokens_to_grid_infers_prefix_and_aspect():
    values = torch.arange(2 * 33, dtype=torch.float32).reshape(2, 33)
    grid = tokens_to_grid(values, torch.zeros(2, 3, 16, 32))  # 32 patches, 4 × 8, one prefix
    assert grid.shape == (2, 1, 4, 8) and grid[0, 0, 0, 0] == 1
    assert tokens_to_grid(values[:, 1:], torch.zeros(2, 3, 16, 32)).shape == (2, 1, 4, 8)
    assert tokens_to_grid(values, torch.zeros(2, 3, 50)).shape == (2, 1, 32)


class _DropoutAttention(nn.Module):
    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        return F.scaled_dot_product_attention(t, t, t, dropout_p=0.5).mean((1, 2))[:, None]


def test_attention_dropout_is_refused():
    with pytest.raises(ValueError, match=r"dropout_p=0.5.*eval mode"):
        attention_rollout(_DropoutAttention(), torch.randn(1, 3, 4, 4))


def test_capture_does_not_leak_into_other_contexts(models, x):
    """Rollout inside a user's rule context: the context is suspended, the map unchanged."""
    want = attention_rollout(models["sdpa"], x)
    with pytest.warns(UserWarning, match="replaced no"), TransformerLRPContext("cp-lrp") as ctx:
        got = attention_rollout(models["sdpa"], x)
    assert torch.equal(got, want) and ctx.replaced == 0


def test_tokens_to_grid_reads_the_layout_from_the_model(vit):
    values = torch.arange(2 * 17, dtype=torch.float32).reshape(2, 17)
    x = torch.zeros(2, 3, 32, 32)
    grid = tokens_to_grid(values, x, model=vit)  # torchvision: patch_size 8, one class token
    assert grid.shape == (2, 1, 4, 4) and torch.equal(grid.flatten(1), values[:, 1:])
    with pytest.raises(ValueError, match=r"cannot lay the 17 tokens.*\(tokens:"):
        tokens_to_grid(values, x, grid=(5, 5), model=vit)


class _Windowed(nn.Module):
    """Self-attention within 2 × 2 windows of a 4 × 4 patch grid, then over a 2 × 2 grid of
    merged patches (Swin's layout): the windows are folded into the batch dimension."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 5)

    def forward(self, x):                                   # (N, 3, 4, 4)
        n = x.shape[0]
        w = x.reshape(n, 3, 2, 2, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n * 4, 4, 3)
        w = F.scaled_dot_product_attention(w, w, w)         # (4N, 4, 3): one window a row
        merged = w.mean(1).reshape(n, 4, 3)                 # 2 × 2 merged patches
        merged = F.scaled_dot_product_attention(merged, merged, merged)
        return self.head(merged.mean(1))


def test_windowed_attention_is_refused_not_a_shape_error():
    # Before: torchvision's swin_t reached rollout's matrix product and raised PyTorch's
    # "size of tensor a (16) must match the size of tensor b (64)".
    x = torch.randn(2, 3, 4, 4)
    for fn in (attention_rollout, lambda m, x: grad_rollout(m, x, 1)):
        with pytest.raises(ValueError, match=r"batches of \[8, 2\] sequences for 2 image\(s\)"
                                             r".*attends within windows.*grad_cam on a stage"):
            fn(_Windowed().eval(), x)


class _Blocked(nn.Module):
    """MaxViT's layout: ``(N, G, H, P, P)`` scores of G blocks by an explicit softmax."""

    def __init__(self, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.head = nn.Linear(3, 5)

    def forward(self, x):                                   # (N, 3, 4, 4)
        n = x.shape[0]
        t = x.reshape(n, 3, 2, 2, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n, 4, 1, 4, 3)
        t = t.expand(n, 4, self.heads, 4, 3)                # (N, G, H, P, D)
        probs = torch.softmax(t @ t.transpose(-1, -2), dim=-1)
        return self.head((probs @ t).mean((1, 2, 3)))


def test_attention_within_blocks_is_refused_not_rolled_out_as_heads():
    # Before: MaxViT's (1, G, H, 49, 49) scores were merged into "heads" and rolled out over
    # window-local positions: a map with no meaning, returned without a word.
    x = torch.randn(2, 3, 4, 4)
    for fn in (attention_rollout, attention_flow, lambda m, x: grad_rollout(m, x, 1)):
        with pytest.raises(ValueError, match=r"attention of shape \(2, 4, 2, 4, 4\) — more than "
                                             r"\(N, heads, T, T\).*within windows or blocks"):
            fn(_Blocked().eval(), x)
    # One non-singleton dimension besides the batch is read as heads, as before.
    with AttentionCapture() as capture:
        _Blocked(heads=1)(x)
    assert capture.blocked == [] and capture.attentions[0].shape == (2, 4, 4, 4)
