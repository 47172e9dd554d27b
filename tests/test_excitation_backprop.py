"""Excitation backprop and contrastive excitation backprop (Zhang et al. 2016, arXiv 1608.00507).

Every rule is checked against an independent float64 computation of the paper's formula
``P(a_j) = Σ_i r(x_j) w⁺_ij / (Σ_k r(x_k) w⁺_ik) · P(a_i)`` — with ``r(x) = x`` (signed, the
default: the authors' reference code and TorchRay) or ``r(x) = max(x, 0)`` (``signed=False``):
explicit numpy loops for linear layers, 2-D convolutions, pooling and residual sums, and a
dense-matrix form of the rule (the operator's matrix built with plain autograd outside the
context) for 1-D / 3-D / transposed convolutions.  Then: precision (float16 / bfloat16), the
operations the rules do not model (a warning each) or model (a correct map each), the checks of
the contrast layer, compiled / checkpointed / scripted models, and TorchRay's API.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.common import (
    NoRuleAppliedWarning,
    Probe,
    UnhandledActivationWarning,
    smooth_saliency,
)
from torchray_like.attribution.excitation_backprop import (
    EltwiseSum,
    EltwiseSumFunction,
    ExcitationBackpropContext,
    UnhandledOperationWarning,
    contrastive_excitation_backprop,
    eltwise_sum,
    excitation_backprop,
    excitation_eps,
    excitation_to_saliency,
    gradient_to_contrastive_excitation_backprop_saliency,
    gradient_to_excitation_backprop_saliency,
    update_resnet,
)

from .conftest import assert_same_state, snapshot

# ---------------------------------------------------------------------------------------------
# Independent reference computations (numpy, float64, explicit loops over the paper's formula)
# ---------------------------------------------------------------------------------------------


def rx(x, signed):
    """The input rule: x itself (signed) or its positive part."""
    return np.asarray(x, dtype=np.float64) if signed else np.maximum(x, 0)


def excitatory(z, signed):
    """Whether a denominator passes the signal on (non-zero signed, positive otherwise)."""
    return z != 0 if signed else z > 0


def np_linear_ebp(x, W, p, signed=True):
    """x (F,), W (O, F), p (O,) -> P(a_j) = Σ_i r(x_j) W⁺_ij p_i / Σ_k W⁺_ik r(x_k)."""
    xp, Wp = rx(x, signed), np.maximum(W, 0)
    out = np.zeros_like(xp)
    for i in range(W.shape[0]):
        z = sum(Wp[i, k] * xp[k] for k in range(len(xp)))
        if excitatory(z, signed):
            for j in range(len(xp)):
                out[j] += xp[j] * Wp[i, j] * p[i] / z
    return out


def np_conv2d_ebp(x, W, p, stride=1, padding=0, signed=True):
    """x (C, H, W), W (O, C, kh, kw), p (O, Ho, Wo): the rule window by window."""
    C, H, Wd = x.shape
    O, _, kh, kw = W.shape
    xp = np.pad(rx(x, signed), ((0, 0), (padding, padding), (padding, padding)))
    Wp = np.maximum(W, 0)
    out = np.zeros_like(xp)
    for o in range(O):
        for i in range(p.shape[1]):
            for j in range(p.shape[2]):
                r, c = i * stride, j * stride
                patch = xp[:, r:r + kh, c:c + kw]
                z = (Wp[o] * patch).sum()
                if excitatory(z, signed):
                    out[:, r:r + kh, c:c + kw] += patch * Wp[o] * p[o, i, j] / z
    return out[:, padding:padding + H, padding:padding + Wd]


def np_pool_ebp(x, p, windows, signed=True):
    """Average pooling of ``x`` (C, H, W) over ``windows[(i, j)] = (rows, cols)``: the
    positive-weight rule reduces to r(x) / Σ_window r(x) · p (the 1/|window| cancels)."""
    xp = rx(x, signed)
    out = np.zeros_like(xp)
    for (i, j), (rows, cols) in windows.items():
        patch = xp[:, rows, cols]
        z = patch.sum(axis=(1, 2))
        for c in range(x.shape[0]):
            if excitatory(z[c], signed):
                out[c, rows, cols] += patch[c] * p[c, i, j] / z[c]
    return out


def avg_windows(H, W, k):
    return {(i, j): (slice(i * k, i * k + k), slice(j * k, j * k + k))
            for i in range(H // k) for j in range(W // k)}


def adaptive_windows(H, W, oh, ow):
    # PyTorch's adaptive bins: [floor(i H / oh), ceil((i + 1) H / oh)).
    return {(i, j): (slice((i * H) // oh, -((-(i + 1) * H) // oh)),
                     slice((j * W) // ow, -((-(j + 1) * W) // ow)))
            for i in range(oh) for j in range(ow)}


def dense_ebp(op, x, p, signed=True):
    """The rule in matrix form for any non-negative linear operator ``op`` (weights already
    positive): A = d op / d x (plain autograd, no context), P' = r(x) ⊙ Aᵀ(P / (A r(x)))."""
    xp = x if signed else x.clamp(min=0)
    A = torch.autograd.functional.jacobian(op, xp).reshape(p.numel(), x.numel())
    z = A @ xp.reshape(-1)
    ok = z != 0 if signed else z > 0
    s = torch.where(ok, p.reshape(-1) / torch.where(ok, z, torch.ones_like(z)),
                    torch.zeros_like(z))
    return (xp.reshape(-1) * (A.t() @ s)).reshape(x.shape)


def onehot(n, c, k):
    p = np.zeros((n, k))
    p[np.arange(n), c] = 1
    return p


def quiet():
    """Silence NoRuleAppliedWarning for a block (enter it *outside* the context: the warning
    is raised when the context exits)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", NoRuleAppliedWarning)
    return stack


def excite(model, x, seed, **options):
    """Excitation at the input through the context (x.grad)."""
    x = x.detach().clone().requires_grad_(True)
    with ExcitationBackpropContext(**options) as ctx:
        y = model(x)
    y.backward(seed)
    return x.grad, ctx


# ---------------------------------------------------------------------------------------------
# Small networks
# ---------------------------------------------------------------------------------------------


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


class TwoLinear(nn.Module):
    def __init__(self, fin=5, hidden=8, out=3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(fin, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class ConvLinear(nn.Module):
    """conv (stride 2, padding 1, bias) -> ReLU -> [pool] -> flatten -> linear."""

    def __init__(self, pool=None, bn=False):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.pool = pool if pool is not None else nn.Identity()
        self.fc = None

    def forward(self, x):
        h = self.pool(self.relu(self.bn(self.conv(x))))
        return self.fc(h.flatten(1))


def build_conv_linear(pool=None, bn=False, hidden=(6, 4, 4), out=4):
    torch.manual_seed(0)
    m = ConvLinear(pool, bn)
    m.fc = nn.Linear(int(np.prod(hidden)), out)
    if bn:
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2)
            m.bn.weight.uniform_(0.5, 2)
            m.bn.bias.uniform_(-0.3, 0.3)
    return m.double().eval()


class Residual(nn.Module):
    """a = conv1 x (signed, like a batch-normalised branch), b = relu(conv2 x),
    s = relu(a ⊕ b) with ⊕ written in several ways, then a linear layer."""

    def __init__(self, style):
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 3)
        self.style = style

    def forward(self, x):
        a, b = self.conv1(x), F.relu(self.conv2(x))
        if self.style == "plus":
            s = a + b
        elif self.style == "iadd":
            a += b
            s = a
        elif self.style == "add_":
            a.add_(b)  # side effect only: the caller keeps using ``a``
            s = a
        elif self.style == "torch.add":
            s = torch.add(a, b)
        elif self.style == "method":
            s = a.add(b)
        elif self.style == "radd":
            s = b.__radd__(a)
        else:  # "iadd_relu": torchvision's BasicBlock pattern (in-place add, then in-place ReLU)
            a += b
            s = F.relu_(a)
        return self.fc(F.relu(s).flatten(1))


class KeywordConvs(nn.Module):
    """Functional calls with keyword arguments."""

    def __init__(self, keyword=True):
        super().__init__()
        g = seeded(3)
        self.w1 = nn.Parameter(torch.randn(3, 2, 3, 3, generator=g))
        self.b1 = nn.Parameter(torch.randn(3, generator=g))
        self.w2 = nn.Parameter(torch.randn(4, 3, 3, 3, generator=g))
        self.w3 = nn.Parameter(torch.randn(3, 4 * 3 * 3, generator=g))
        self.keyword = keyword

    def forward(self, x):
        if self.keyword:
            h = F.relu(F.conv2d(x, self.w1, padding=1, bias=self.b1))
            h = F.relu(F.conv2d(input=h, weight=self.w2, bias=None, stride=2, padding=1))
            return F.linear(input=h.flatten(1), weight=self.w3)
        h = F.relu(F.conv2d(x, self.w1, self.b1, 1, 1))
        h = F.relu(F.conv2d(h, self.w2, None, 2, 1))
        return F.linear(h.flatten(1), self.w3)


class Tower(nn.Module):
    """Conv, batch norm, ReLU, max pool, a residual block, a concatenation, average pooling:
    a network with non-negative activations on which excitation is conserved."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.block1 = nn.Conv2d(8, 8, 3, padding=1)
        self.block2 = nn.Conv2d(8, 8, 3, padding=1)
        self.branch_a = nn.Conv2d(8, 4, 1)
        self.branch_b = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 16),
                                  nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        out = self.block2(F.relu(self.block1(x)))
        out += x
        out = F.relu(out)
        cat = torch.cat([F.relu(self.branch_a(out)), F.relu(self.branch_b(out))], 1)
        return self.head(self.pool(cat))


# ---------------------------------------------------------------------------------------------
# Each rule against the paper's formula
# ---------------------------------------------------------------------------------------------


def test_linear_rule_matches_formula():
    torch.manual_seed(1)
    m = TwoLinear().double()
    x = torch.rand(3, 5, dtype=torch.float64)
    target = [0, 2, 1]
    seed = torch.tensor(onehot(3, target, 3))
    got, ctx = excite(m, x, seed)
    W1, W2 = m.fc1.weight.detach().numpy(), m.fc2.weight.detach().numpy()
    b1 = m.fc1.bias.detach().numpy()
    for n in range(3):
        h = np.maximum(W1 @ x[n].numpy() + b1, 0)
        p1 = np_linear_ebp(h, W2, seed[n].numpy()) * (h > 0)
        p0 = np_linear_ebp(x[n].numpy(), W1, p1)
        np.testing.assert_allclose(got[n].numpy(), p0, rtol=1e-12, atol=1e-15)
        assert got[n].sum().item() == pytest.approx(1.0, abs=1e-12)
    assert got.dtype == torch.float64 and got.device == x.device
    assert ctx.counts == {"linear": 2}


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_linear_rule_in_row_blocks(monkeypatch, chunk_rows):
    """The linear rule builds w⁺ block by block: any block size gives the formula, for inputs
    with extra dimensions, for the dual (negated) weights of the contrastive variant, and for a
    second backward pass that reuses the denominators."""
    rules = importlib.import_module("torchray_like.attribution.excitation_rules")

    monkeypatch.setattr(rules, "LINEAR_CHUNK_BYTES", chunk_rows * 5 * 8)
    torch.manual_seed(1)
    m = TwoLinear().double()
    x = torch.rand(2, 3, 5, dtype=torch.float64)
    seed = torch.rand(2, 3, 3, dtype=torch.float64)
    got, _ = excite(m, x, seed)
    W1, W2, b1 = (t.detach().numpy() for t in (m.fc1.weight, m.fc2.weight, m.fc1.bias))
    for n in range(2):
        for r in range(3):
            h = np.maximum(W1 @ x[n, r].numpy() + b1, 0)
            p1 = np_linear_ebp(h, W2, seed[n, r].numpy()) * (h > 0)
            np.testing.assert_allclose(got[n, r].numpy(), np_linear_ebp(x[n, r].numpy(), W1, p1),
                                       rtol=1e-12, atol=1e-15)
    # Contrastive with two linear layers above the contrast layer: the target's pass keeps the
    # middle layer's denominators for the dual's pass.
    mid = nn.Linear(8, 8).double()
    net = nn.Sequential(nn.Flatten(), m.fc1, nn.ReLU(), mid, nn.ReLU(), m.fc2)
    Wm, bm = mid.weight.detach().numpy(), mid.bias.detach().numpy()
    x4 = torch.rand(2, 5, 1, dtype=torch.float64)
    _, info = contrastive_excitation_backprop(net, x4, [0, 2], "0", "2", debug=True)
    for n, c in enumerate([0, 2]):
        h1 = np.maximum(W1 @ x4[n, :, 0].numpy() + b1, 0)
        h2 = np.maximum(Wm @ h1 + bm, 0)
        top = onehot(1, [c], 3)[0]
        t = np_linear_ebp(h1, Wm, np_linear_ebp(h2, W2, top) * (h2 > 0))
        d = np_linear_ebp(h1, Wm, np_linear_ebp(h2, -W2, top) * (h2 > 0))
        np.testing.assert_allclose(info.gradient[n].numpy(), np_linear_ebp(
            x4[n, :, 0].numpy(), W1, (t - d) * (h1 > 0)), rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("signed", [True, False])
def test_signed_inputs(signed):
    """Signed (default, the authors' rule): a signed input keeps its sign, P_j ∝ x_j w⁺_ij;
    positive: only x⁺ takes part and the map is a non-negative distribution."""
    torch.manual_seed(1)
    m = TwoLinear().double()
    x = torch.randn(2, 5, dtype=torch.float64)
    assert (x < 0).any()
    seed = torch.tensor(onehot(2, [1, 1], 3))
    got, _ = excite(m, x, seed, **({} if signed else {"signed": False}))  # default: signed
    W1, W2 = m.fc1.weight.detach().numpy(), m.fc2.weight.detach().numpy()
    for n in range(2):
        h = np.maximum(W1 @ x[n].numpy() + m.fc1.bias.detach().numpy(), 0)
        p0 = np_linear_ebp(x[n].numpy(), W1, np_linear_ebp(h, W2, seed[n].numpy(), signed),
                           signed)
        np.testing.assert_allclose(got[n].numpy(), p0, rtol=1e-12, atol=1e-15)
    if signed:
        assert (got[x < 0] != 0).any() and (got < 0).any()
        # Conserved: the shares of every unit with a non-zero denominator sum to its signal.
        torch.testing.assert_close(got.sum(1), torch.ones(2, dtype=torch.float64))
    else:
        assert (got[x < 0] == 0).all() and (got >= 0).all()


def test_rules_agree_on_non_negative_inputs():
    m = build_conv_linear(nn.AvgPool2d(2), hidden=(6, 2, 2))
    x = torch.rand(2, 2, 8, 7, dtype=torch.float64)
    seed = torch.tensor(onehot(2, [1, 3], 4))
    signed, _ = excite(m, x, seed)
    positive, _ = excite(m, x, seed, signed=False)
    torch.testing.assert_close(signed, positive, rtol=1e-13, atol=0)


def test_signed_zero_denominators_pass_nothing():
    """Signed inputs can cancel: Σ_k x_k w⁺_ik = 0 exactly.  TorchRay divides by it (inf /
    NaN); here the unit passes nothing on, and sums a + b = 0 likewise."""
    fc = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # unit 0: z = 0, unit 1: z = 1
    got, _ = excite(fc, x, torch.tensor([[5.0, 1.0]], dtype=torch.float64))
    assert torch.equal(got, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[-1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    with ExcitationBackpropContext():
        s = a + b
    ga, gb = torch.autograd.grad(s, (a, b), torch.ones_like(s))
    assert torch.equal(ga, torch.tensor([[0.0, 2 / 3]], dtype=torch.float64))
    assert torch.equal(gb, torch.tensor([[0.0, 1 / 3]], dtype=torch.float64))


@pytest.mark.parametrize("pool", ["none", "avg", "adaptive", "mean"])
def test_conv_and_pooling_rules_match_formula(pool):
    pools = {"none": None, "avg": nn.AvgPool2d(2), "adaptive": nn.AdaptiveAvgPool2d((3, 3)),
             "mean": None}
    hidden = {"none": (6, 4, 4), "avg": (6, 2, 2), "adaptive": (6, 3, 3), "mean": (6,)}[pool]
    m = build_conv_linear(pools[pool], hidden=hidden)
    if pool == "mean":
        m.pool = MeanPool()
    x = torch.rand(2, 2, 8, 7, dtype=torch.float64)
    target = [3, 0]
    seed = torch.tensor(onehot(2, target, 4))
    got, ctx = excite(m, x, seed)
    W = m.conv.weight.detach().numpy()
    Wfc = m.fc.weight.detach().numpy()
    for n in range(2):
        xn = x[n].numpy()
        h = np.maximum(F.conv2d(x[n:n + 1], m.conv.weight, m.conv.bias, 2, 1)[0].detach()
                       .numpy(), 0)
        if pool == "none":
            pooled = h
        elif pool == "avg":
            pooled = F.avg_pool2d(torch.from_numpy(h), 2).numpy()
        else:
            size = (3, 3) if pool == "adaptive" else (1, 1)
            pooled = F.adaptive_avg_pool2d(torch.from_numpy(h), size).numpy()
        p_pooled = np_linear_ebp(pooled.reshape(-1), Wfc, seed[n].numpy()).reshape(pooled.shape)
        if pool == "none":
            p_h = p_pooled
        elif pool == "avg":
            p_h = np_pool_ebp(h, p_pooled, avg_windows(4, 4, 2))
        elif pool == "adaptive":
            p_h = np_pool_ebp(h, p_pooled, adaptive_windows(4, 4, 3, 3))
        else:
            p_h = np_pool_ebp(h, p_pooled.reshape(-1, 1, 1), adaptive_windows(4, 4, 1, 1))
        p_x = np_conv2d_ebp(xn, W, p_h * (h > 0), stride=2, padding=1)
        np.testing.assert_allclose(got[n].numpy(), p_x, rtol=1e-11, atol=1e-14)
        assert got[n].sum().item() == pytest.approx(1.0, abs=1e-12)
    kind = {"none": None, "avg": "avg_pool", "adaptive": "adaptive_avg_pool", "mean": "mean"}
    expected = {"conv": 1, "linear": 1}
    if kind[pool]:
        expected[kind[pool]] = 1
    assert ctx.counts == expected


class MeanPool(nn.Module):
    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_sums_and_means_over_dimensions_split_in_proportion(reduce):
    """A sum or mean over explicit dimensions is a sum with positive weights: each term gets
    its share r(x_c) / Σ_c r(x_c).  A full reduction (a score) keeps its gradient."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    p = torch.rand(2, 4, 4, dtype=torch.float64)
    for signed in (True, False):
        with ExcitationBackpropContext(signed=signed) as ctx:
            y = getattr(x, reduce)(1)
        (g,) = torch.autograd.grad(y, x, p)
        xr = x.detach() if signed else x.detach().clamp(min=0)
        total = xr.sum(1, keepdim=True)
        expected = torch.where(total != 0, xr / total, 0.0) * p[:, None]
        torch.testing.assert_close(g, expected)
        assert ctx.counts == {"mean" if reduce == "mean" else "sum_dims": 1}
    with quiet(), ExcitationBackpropContext() as ctx:
        y = getattr(x, reduce)()
    (g,) = torch.autograd.grad(y, x)
    assert ctx.counts == {}
    torch.testing.assert_close(g, torch.full_like(x, 1 / x.numel() if reduce == "mean" else 1))


def test_batch_norm_passes_the_signal_through():
    m = build_conv_linear(bn=True)
    x = torch.rand(2, 2, 8, 7, dtype=torch.float64)
    seed = torch.tensor(onehot(2, [1, 2], 4))
    got, ctx = excite(m, x, seed)
    for n in range(2):
        pre = m.bn(F.conv2d(x[n:n + 1], m.conv.weight, m.conv.bias, 2, 1))[0].detach().numpy()
        h = np.maximum(pre, 0)
        p_h = np_linear_ebp(h.reshape(-1), m.fc.weight.detach().numpy(),
                            seed[n].numpy()).reshape(h.shape)
        # Identity through batch norm: the conv rule receives the signal of the BN output.
        p_x = np_conv2d_ebp(x[n].numpy(), m.conv.weight.detach().numpy(), p_h * (h > 0), 2, 1)
        np.testing.assert_allclose(got[n].numpy(), p_x, rtol=1e-11, atol=1e-14)
    assert ctx.counts["batch_norm"] == 1
    # Batch norm alone: the signal comes back unchanged (the plain gradient would be scaled).
    bn = m.bn
    z = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    with quiet(), ExcitationBackpropContext():
        out = bn(z)
    (g,) = torch.autograd.grad(out, z, p)
    assert torch.equal(g, p)


@pytest.mark.parametrize("style", ["plus", "iadd", "add_", "torch.add", "method", "radd",
                                   "iadd_relu"])
@pytest.mark.parametrize("signed", [True, False])
def test_residual_sum_splits_in_proportion(style, signed):
    """Signed: a / (a + b), b / (a + b) on signed values (the authors' rule); positive:
    a⁺ / (a⁺ + b⁺)."""
    m = Residual(style).double().eval()
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    target = [2, 0]
    seed = torch.tensor(onehot(2, target, 3))
    got, ctx = excite(m, x, seed, signed=signed)
    with torch.no_grad():
        plain = m(x)
    x2 = x.clone().requires_grad_(True)
    with ExcitationBackpropContext():
        inside = m(x2)
    assert torch.equal(inside, plain)  # forward values (and in-place side effects) unchanged
    assert ctx.counts == {"conv": 2, "sum": 1, "linear": 1}
    W1, W2 = m.conv1.weight.detach().numpy(), m.conv2.weight.detach().numpy()
    for n in range(2):
        a = F.conv2d(x[n:n + 1], m.conv1.weight, m.conv1.bias, padding=1)[0].detach().numpy()
        b = np.maximum(F.conv2d(x[n:n + 1], m.conv2.weight, m.conv2.bias, padding=1)[0]
                       .detach().numpy(), 0)
        assert (a < 0).any()
        h = np.maximum(a + b, 0)
        p_h = np_linear_ebp(h.reshape(-1), m.fc.weight.detach().numpy(),
                            seed[n].numpy()).reshape(h.shape)
        p_s = p_h * (h > 0)
        ra = rx(a, signed)
        den = ra + b
        ok = excitatory(den, signed)
        share_a = np.where(ok, ra / np.where(ok, den, 1), 0)
        share_b = np.where(ok, b / np.where(ok, den, 1), 0)
        p_x = (np_conv2d_ebp(x[n].numpy(), W1, p_s * share_a, padding=1)
               + np_conv2d_ebp(x[n].numpy(), W2, p_s * share_b * (b > 0), padding=1))
        np.testing.assert_allclose(got[n].numpy(), p_x, rtol=1e-11, atol=1e-14)
        assert got[n].sum().item() == pytest.approx(1.0, abs=1e-12)
        if signed:
            assert (share_a < 0).any() and (share_b > 1).any()


def test_biases_keep_their_gradient():
    """Adding a number, a parameter or a smaller constant tensor (a bias) is not a sum of
    activations: the bias takes no share, the signal passes unchanged."""
    x = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    bias = nn.Parameter(torch.rand(2, 3, dtype=torch.float64), requires_grad=False)
    for add in [lambda: x + 1, lambda: 2.0 + x, lambda: x + bias, lambda: x - bias,
                lambda: x + torch.ones(3, dtype=torch.float64), lambda: x - 1,
                lambda: torch.add(x, 1.5, alpha=2)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnhandledOperationWarning)
            with quiet(), ExcitationBackpropContext() as ctx:
                y = add()
        (g,) = torch.autograd.grad(y.sum(), x)
        assert ctx.counts == {}
        torch.testing.assert_close(g, torch.ones_like(x))


def test_weighted_sums_split_in_proportion():
    """a + α b (α > 0) in any spelling — torch.add(alpha=), a + 2 * b, a - (-α) b, a constant
    or broadcast operand, stack then sum — gives each term α r(b) / (r(a) + α r(b))."""
    torch.manual_seed(0)
    a = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.rand(2, 3, 4, dtype=torch.float64)

    def shares(alpha, signed=True, b_value=None):
        bv = b.detach() if b_value is None else b_value
        ra = a.detach() if signed else a.detach().clamp(min=0)
        rb = alpha * (bv if signed else bv.clamp(min=0))
        den = ra + rb
        return ra / den * p, rb / den * p

    cases = {
        "alpha": (lambda: torch.add(a, b, alpha=2), 2.0),
        "scaled": (lambda: a + 2 * b, 2.0),
        "scaled_div": (lambda: a + b / 0.5, 2.0),
        "method": (lambda: a.add(b, alpha=0.5), 0.5),
        "sub_negative_alpha": (lambda: torch.sub(a, b, alpha=-3), 3.0),
        "stack_sum": (lambda: torch.stack([a, b]).sum(0), 1.0),
        "stack_mean": (lambda: torch.stack([a, b], 1).mean(1), 1.0),
    }
    for name, (f, alpha) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnhandledOperationWarning)
            with ExcitationBackpropContext() as ctx:
                y = f()
        torch.testing.assert_close(y, a.detach() + alpha * b.detach() if "mean" not in name
                                   else (a.detach() + b.detach()) / 2)
        ga, gb = torch.autograd.grad(y, (a, b), p)
        ea, eb = shares(alpha)
        torch.testing.assert_close(ga, ea, msg=name)
        torch.testing.assert_close(gb, eb, msg=name)
        torch.testing.assert_close(ga + gb, p)  # conserved
    # The positive rule on the same sum.
    with ExcitationBackpropContext(signed=False):
        y = torch.add(a, b, alpha=2)
    ga, gb = torch.autograd.grad(y, (a, b), p)
    ea, eb = shares(2.0, signed=False)
    torch.testing.assert_close(ga, torch.where(ea.isfinite(), ea, 0.0))
    torch.testing.assert_close(gb, torch.where(eb.isfinite(), eb, 0.0))
    # A constant (same shape, not followed by autograd) takes its share; a broadcast operand
    # that autograd follows is an activation: its signal sums over the broadcast positions.
    with ExcitationBackpropContext() as ctx:
        y = a + b.detach() * 3
    (ga,) = torch.autograd.grad(y, a, p)
    torch.testing.assert_close(ga, shares(3.0)[0])
    assert ctx.counts == {"sum": 1}
    c = torch.rand(2, 1, 4, dtype=torch.float64, requires_grad=True)
    with ExcitationBackpropContext():
        y = a + c
    ga, gc = torch.autograd.grad(y, (a, c), p)
    den = a.detach() + c.detach()
    torch.testing.assert_close(ga, a.detach() / den * p)
    torch.testing.assert_close(gc, (c.detach() / den * p).sum(1, keepdim=True))


def test_relu6_passes_the_saturated_side():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU6(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        m[0].weight.mul_(20)
        m[0].weight[:, 0].abs_()  # every hidden unit has an excitatory input
        m[2].weight.abs_()
    x = torch.rand(3, 4, dtype=torch.float64)
    h = F.relu6(m[0](x)).detach()
    assert ((h == 6).any() and (h == 0).any())
    seed = torch.tensor(onehot(3, [0, 1, 0], 2))
    got, ctx = excite(m, x, seed)
    W1, W2 = m[0].weight.detach().numpy(), m[2].weight.detach().numpy()
    for n in range(3):
        hn = h[n].numpy()
        p0 = np_linear_ebp(x[n].numpy(), W1, np_linear_ebp(hn, W2, seed[n].numpy()) * (hn > 0))
        np.testing.assert_allclose(got[n].numpy(), p0, rtol=1e-12, atol=1e-15)
        assert got[n].sum().item() == pytest.approx(1.0, abs=1e-12)
    assert ctx.counts == {"linear": 2, "relu6": 1}
    # F.relu6 / F.hardtanh(x, 0, 6, inplace) / hardtanh_ give the same rule; other bounds no.
    z = torch.tensor([-1.0, 3.0, 7.0], dtype=torch.float64, requires_grad=True)
    for f in (lambda t: F.relu6(t), lambda t: F.hardtanh(t.clone(), 0.0, 6.0, True),
              lambda t: F.hardtanh_(t.clone(), 0.0, 6.0)):
        with quiet(), ExcitationBackpropContext():
            out = f(z)
        (g,) = torch.autograd.grad(out.sum(), z)
        assert g.tolist() == [0.0, 1.0, 1.0]
    with quiet(), ExcitationBackpropContext() as ctx:
        out = F.hardtanh(z)
    assert ctx.counts == {}
    assert torch.autograd.grad(out.sum(), z)[0].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("keyword", [True, False])
def test_functional_calls_with_keywords(keyword):
    m = KeywordConvs(keyword).double()
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    seed = torch.tensor(onehot(2, [1, 2], 3))
    got, ctx = excite(m, x, seed)
    assert ctx.counts == {"conv": 2, "linear": 1}
    w1, w2, w3 = (t.detach().numpy() for t in (m.w1, m.w2, m.w3))
    for n in range(2):
        h1 = np.maximum(F.conv2d(x[n:n + 1], m.w1, m.b1, padding=1)[0].detach().numpy(), 0)
        h2 = np.maximum(F.conv2d(torch.from_numpy(h1)[None], m.w2, stride=2, padding=1)[0]
                        .detach().numpy(), 0)
        p2 = np_linear_ebp(h2.reshape(-1), w3, seed[n].numpy()).reshape(h2.shape) * (h2 > 0)
        p1 = np_conv2d_ebp(h1, w2, p2, stride=2, padding=1) * (h1 > 0)
        p0 = np_conv2d_ebp(x[n].numpy(), w1, p1, padding=1)
        np.testing.assert_allclose(got[n].numpy(), p0, rtol=1e-11, atol=1e-14)


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv1d(2, 3, 3, stride=1, padding=1, dilation=1)
        self.conv2 = nn.Conv1d(3, 4, 3, padding=2, dilation=2, groups=1)
        self.fc = nn.Linear(4 * 3, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = F.avg_pool1d(h, 2)
        h = F.relu(self.conv2(h))
        h = F.adaptive_avg_pool1d(h, 3)
        return self.fc(h.flatten(1))


class Net3d(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.convt = nn.ConvTranspose3d(4, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 2 * 2 * 2, 3)

    def forward(self, x):
        h = F.avg_pool3d(F.relu(self.conv(x)), 2)
        h = F.relu(self.convt(h))
        return self.fc(F.adaptive_avg_pool3d(h, 2).flatten(1))


@pytest.mark.parametrize("net,shape", [(Net1d, (2, 2, 6)), (Net3d, (2, 2, 4, 4, 4))])
def test_1d_and_3d_nets_match_dense_rule(net, shape):
    m = net().double().eval()
    x = torch.rand(*shape, dtype=torch.float64)
    seed = torch.tensor(onehot(2, [0, 2], 3))
    got, ctx = excite(m, x, seed)
    # Independent chain: each layer's operator matrix with positive weights, float64.
    for n in range(2):
        xn = x[n:n + 1]
        if net is Net1d:
            ops = [lambda t: F.conv1d(t, m.conv.weight.clamp(min=0), None, 1, 1),
                   lambda t: F.avg_pool1d(t, 2),
                   lambda t: F.conv1d(t, m.conv2.weight.clamp(min=0), None, 1, 2, 2),
                   lambda t: F.adaptive_avg_pool1d(t, 3)]
            acts = [xn]
            a = F.relu(m.conv(xn))
            acts.append(a)
            a = F.avg_pool1d(a, 2)
            acts.append(a)
            a = F.relu(m.conv2(a))
            acts.append(a)
            a = F.adaptive_avg_pool1d(a, 3)
            acts.append(a)
        else:
            ops = [lambda t: F.conv3d(t, m.conv.weight.clamp(min=0), None, 1, 1),
                   lambda t: F.avg_pool3d(t, 2),
                   lambda t: F.conv_transpose3d(t, m.convt.weight.clamp(min=0), None, 2),
                   lambda t: F.adaptive_avg_pool3d(t, 2)]
            acts = [xn]
            a = F.relu(m.conv(xn))
            acts.append(a)
            a = F.avg_pool3d(a, 2)
            acts.append(a)
            a = F.relu(m.convt(a))
            acts.append(a)
            a = F.adaptive_avg_pool3d(a, 2)
            acts.append(a)
        acts = [t.detach() for t in acts]
        top = torch.tensor(np_linear_ebp(acts[-1].reshape(-1).numpy(),
                                         m.fc.weight.detach().numpy(), seed[n].numpy()))
        p = top.reshape(acts[-1].shape)
        for op, inp in zip(reversed(ops), reversed(acts[:-1])):
            p = dense_ebp(op, inp, p)
        torch.testing.assert_close(got[n:n + 1], p, rtol=1e-11, atol=1e-14)
        if net is Net1d:
            assert got[n].sum().item() == pytest.approx(1.0, abs=1e-12)
        else:
            # The transposed convolution has units excited only by their bias (few inputs
            # each): their share is dropped, never created.
            assert 0.5 < got[n].sum().item() <= 1.0 + 1e-12
    assert ctx.counts == ({"conv": 2, "avg_pool": 1, "adaptive_avg_pool": 1, "linear": 1}
                          if net is Net1d else
                          {"conv": 1, "avg_pool": 1, "conv_transpose": 1,
                           "adaptive_avg_pool": 1, "linear": 1})


def test_conv_transpose_2d_and_grouped_conv_match_dense_rule():
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2).double()
    convt = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1).double()
    x = torch.rand(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    p = torch.rand(1, 3, 6, 6, dtype=torch.float64)
    with ExcitationBackpropContext() as ctx:
        h = F.relu(conv(x))
        y = convt(h)
    (g,) = torch.autograd.grad(y, x, p)
    assert ctx.counts == {"conv": 1, "conv_transpose": 1}
    hd = h.detach()
    ph = dense_ebp(lambda t: F.conv_transpose2d(t, convt.weight.clamp(min=0), None, 2, 1, 1),
                   hd, p) * (hd > 0)
    ref = dense_ebp(lambda t: F.conv2d(t, conv.weight.clamp(min=0), None, 2, 1, 1, 2),
                    x.detach(), ph)
    torch.testing.assert_close(g, ref, rtol=1e-11, atol=1e-14)


def test_zero_denominator_drops_the_signal_without_nan():
    """A unit excited only through its bias (no excitatory input) passes nothing on."""
    fc1 = nn.Linear(2, 2).double()
    fc2 = nn.Linear(2, 1).double()
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, 2.0]]))
        fc1.bias.copy_(torch.tensor([5.0, 0.0]))
        fc2.weight.copy_(torch.tensor([[1.0, 1.0]]))
    m = nn.Sequential(fc1, nn.ReLU(), fc2)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    # h = [3, 3]: the top signal splits 1/2, 1/2; unit 0 has z⁺ = 0, its half is dropped.
    got, _ = excite(m, x, torch.tensor([[1.0]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[1 / 6, 2 / 6]], dtype=torch.float64))
    # A huge top signal neither overflows nor makes NaNs.
    got, _ = excite(m, x, torch.tensor([[1e15]], dtype=torch.float64))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([[1e15 / 6, 2e15 / 6]], dtype=torch.float64))
    x0 = torch.zeros(1, 2)
    got, _ = excite(m.float(), x0, torch.tensor([[1e30]]))
    assert torch.equal(got, torch.zeros(1, 2))
    assert excitation_eps(torch.float32) == pytest.approx(torch.finfo(torch.float32).tiny ** .5)
    assert 1e-20 < excitation_eps(torch.float32) < 1e-18
    # Units below ε pass nothing; above it, everything.
    tiny = excitation_eps(torch.float64)
    lin = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
    for value, expected in [(tiny / 2, 0.0), (tiny * 2, 1.0)]:
        got, _ = excite(lin, torch.tensor([[value]], dtype=torch.float64),
                        torch.ones(1, 1, dtype=torch.float64))
        assert got.item() == expected


# ---------------------------------------------------------------------------------------------
# Conservation (a probability distribution at every layer)
# ---------------------------------------------------------------------------------------------


def test_conservation_at_every_layer_of_a_tower():
    m = Tower().double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    layers = ["stem", "block1", "branch_b", "pool", "head.1", "head.3"]
    probes = {name: Probe(m.get_submodule(name), target="output") for name in layers}
    try:
        xx = x.clone().requires_grad_(True)
        with ExcitationBackpropContext() as ctx:
            y = m(xx)
        seed = torch.zeros_like(y)
        seed[torch.arange(3), torch.tensor([0, 3, 4])] = torch.tensor(
            [1.0, 2.0, 0.5], dtype=torch.float64)
        y.backward(seed)
        totals = {"input": xx.grad.flatten(1).sum(1)}
        for name, probe in probes.items():
            totals[name] = probe.data[0].grad.flatten(1).sum(1)
    finally:
        for probe in probes.values():
            probe.remove()
    expected = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    for name in ("input", "stem", "pool", "head.1", "head.3"):
        torch.testing.assert_close(totals[name], expected, rtol=1e-12, atol=1e-12)
    # A branch of the concatenation carries part of it.
    assert ((totals["branch_b"] > 0) & (totals["branch_b"] < expected)).all()
    assert ctx.counts == {"conv": 5, "batch_norm": 1, "sum": 1, "avg_pool": 1,
                          "adaptive_avg_pool": 1, "linear": 2}
    assert (xx.grad >= 0).all()


LAYERS = {
    "vgg11": ("features.5", "features.10", "features.15"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "densenet121": ("features.transition3", "features.denseblock4", "features.norm5"),
    "squeezenet1_1": ("features.3", "features.7", "features.10"),
    "mobilenet_v2": ("features.3", "features.7", "features.14"),
}


@pytest.mark.parametrize("signed", [True, False])
def test_torchvision_models(torchvision_model, signed):
    """Forward unchanged, counts, conservation at three layers (with the positive rule, a
    non-negative distribution), the map equals the channel sum of the excitation, contrastive
    runs and keeps the difference of two distributions (zero total) at the saliency layer.

    With the signed rule MobileNetV2's linear bottlenecks (signed inputs to 1×1 convolutions)
    make denominators cancel: shares in the thousands, conserved only up to float32 rounding.
    """
    name, model = torchvision_model
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        with quiet(), ExcitationBackpropContext() as ctx:
            inside = model(x)
    assert torch.equal(inside, plain)
    # Under no_grad nothing is replaced: the calls are counted as skipped.
    assert ctx.counts == {} and ctx.skipped.get("conv", 0) > 0
    with ExcitationBackpropContext() as ctx:
        inside = model(x.clone().requires_grad_(True))
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
    if name == "resnet18":
        assert ctx.counts == {"conv": 20, "batch_norm": 20, "sum": 8,
                              "adaptive_avg_pool": 1, "linear": 1}
    if name == "mobilenet_v2":
        assert ctx.counts["sum"] == 10 and ctx.counts["relu6"] == 35
    target = [3, 7]
    layers = LAYERS[name]
    probes = [Probe(model.get_submodule(layer), target="output") for layer in layers]
    try:
        with ExcitationBackpropContext(signed=signed):
            y = model(x)
        seed = torch.zeros_like(y)
        seed[[0, 1], target] = 1
        y.backward(seed)
        excitations = [probe.data[0].grad for probe in probes]
    finally:
        for probe in probes:
            probe.remove()
    atol = 1e-2 if signed and name == "mobilenet_v2" else 1e-4
    for e in excitations:
        assert torch.isfinite(e).all()
        torch.testing.assert_close(e.flatten(1).sum(1), torch.ones(2), rtol=0, atol=atol)
        if not signed:
            assert (e >= 0).all()
    if not signed:
        return  # the wrappers with the positive rule are checked on small nets
    smap = excitation_backprop(model, x, target, saliency_layer=layers[1])
    assert smap.shape == (2, 1) + excitations[1].shape[2:]
    assert smap.dtype == torch.float32 and smap.device == x.device
    torch.testing.assert_close(smap, excitations[1].sum(1, keepdim=True))
    cmap, info = contrastive_excitation_backprop(model, x, target, layers[0], layers[2],
                                                 resize=True, debug=True)
    assert cmap.shape == (2, 1, 64, 64) and (cmap >= 0).all() and cmap.amax() > 0
    torch.testing.assert_close(info.gradient.flatten(1).sum(1), torch.zeros(2), rtol=0,
                               atol=atol)


def test_batch_targets_equal_single_calls(torchvision_models):
    model = torchvision_models["resnet18"]
    torch.manual_seed(3)
    x = torch.randn(3, 3, 64, 64)
    target = [3, 7, 3]
    single = torch.cat([excitation_backprop(model, x[i:i + 1], target[i],
                                            saliency_layer="layer2") for i in range(3)])
    batch = excitation_backprop(model, x, torch.tensor(target), saliency_layer="layer2")
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(batch[0], batch[2])  # same class, different images


# ---------------------------------------------------------------------------------------------
# Contrastive excitation backprop
# ---------------------------------------------------------------------------------------------


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(5 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).flatten(1))


def test_contrastive_matches_formula():
    m = ConvHead().double().eval()
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    target = [1, 3]
    smap, info = contrastive_excitation_backprop(m, x, target, "relu1", "relu2", debug=True)
    for n in range(2):
        h1 = m.relu1(m.conv1(x[n:n + 1]))[0].detach().numpy()
        h2 = m.relu2(m.conv2(torch.from_numpy(h1)[None]))[0].detach().numpy()
        W = m.fc.weight.detach().numpy()
        top = onehot(1, [target[n]], 4)[0]
        p_t = np_linear_ebp(h2.reshape(-1), W, top).reshape(h2.shape)
        p_d = np_linear_ebp(h2.reshape(-1), -W, top).reshape(h2.shape)  # the dual unit
        diff = (p_t - p_d) * (h2 > 0)
        p_h1 = np_conv2d_ebp(h1, m.conv2.weight.detach().numpy(), diff, 2, 1)
        np.testing.assert_allclose(info.gradient[n].numpy(), p_h1, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(smap[n, 0].numpy(), np.maximum(p_h1.sum(0), 0),
                                   rtol=1e-10, atol=1e-14)
    assert smap.shape == (2, 1, 6, 6) and smap.dtype == torch.float64
    # Naming the classifier (by name, by module, or an enclosing container) changes nothing.
    for cls in ("fc", m.fc, ""):
        torch.testing.assert_close(
            contrastive_excitation_backprop(m, x, target, "relu1", "relu2",
                                            classifier_layer=cls), smap, rtol=0, atol=0)


def test_contrastive_equals_difference_of_full_maps_any_contrast_layer(torchvision_models):
    """Linearity: independent of the contrast layer, and equal to the positive part of the
    difference between the model's map and the map of a copy whose classifier is negated."""
    model = torchvision_models["resnet18"]
    negated = copy.deepcopy(model)
    with torch.no_grad():
        negated.fc.weight.neg_()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    target = [2, 5]
    _, a = excitation_backprop(model, x, target, saliency_layer="layer2", debug=True)
    _, b = excitation_backprop(negated, x, target, saliency_layer="layer2", debug=True)
    expected = (a.gradient - b.gradient).sum(1, keepdim=True).clamp(min=0)
    for contrast in ("layer3", "avgpool"):
        got = contrastive_excitation_backprop(model, x, target, "layer2", contrast)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # A single-sample call agrees with the batch.
    single = contrastive_excitation_backprop(model, x[1:], target[1], "layer2", "layer4")
    torch.testing.assert_close(single, expected[1:], rtol=1e-4, atol=1e-6)


def test_contrastive_at_the_input_and_resize_smooth():
    m = ConvHead().double().eval()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    smap, info = contrastive_excitation_backprop(m, x, 0, None, "relu2", debug=True)
    assert smap.shape == (1, 1, 6, 6) and info.activation.shape == x.shape
    big = contrastive_excitation_backprop(m, x, 0, None, "relu2", resize=(12, 12))
    assert big.shape == (1, 1, 12, 12)
    smooth = contrastive_excitation_backprop(m, x, 0, None, "relu2", smooth=0.1)
    assert smooth.shape == (1, 1, 6, 6) and not torch.equal(smooth, smap)
    torch.testing.assert_close(smooth, smooth_saliency(smap, 0.1 * 6), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# State, threads, warnings
# ---------------------------------------------------------------------------------------------


class Raising(nn.Module):
    """Raises inside the forward pass after some replaced calls when ``armed``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.armed = False

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = h + F.relu(self.conv2(h))
        if self.armed:
            raise RuntimeError("boom inside the model")
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("method", ["ebp", "contrastive"])
def test_state_is_restored_after_success_and_failure(method):
    m = Raising().train()
    m.fc.weight.grad = torch.ones_like(m.fc.weight)
    m.conv.weight.requires_grad_(False)
    x = torch.rand(2, 3, 6, 6)

    def call():
        if method == "ebp":
            return excitation_backprop(m, x, [0, 1], saliency_layer="conv")
        return contrastive_excitation_backprop(m, x, [0, 1], "conv", "bn")

    before = snapshot(m, x)
    out = call()
    assert out.shape == (2, 1, 6, 6)
    assert_same_state(before, snapshot(m, x))
    m.armed = True
    with pytest.raises(RuntimeError, match="boom inside the model"):
        call()
    m.armed = False
    assert_same_state(before, snapshot(m, x))
    # A failure after the forward pass (an error found during the backward passes) too.
    with pytest.raises(ValueError):
        if method == "ebp":
            excitation_backprop(m, x, [0, 9], saliency_layer="conv")
        else:
            contrastive_excitation_backprop(m, x, [0, 1], "conv", "bn",
                                            classifier_layer="conv")
    assert_same_state(before, snapshot(m, x))
    assert torch.equal(call(), out)


def test_context_restores_on_exception_and_parameters_get_no_gradient():
    m = Raising()
    x = torch.rand(1, 3, 6, 6, requires_grad=True)
    before = torch._C._len_torch_function_stack()
    m.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        with ExcitationBackpropContext():
            m(x)
    assert torch._C._len_torch_function_stack() == before
    m.armed = False
    with ExcitationBackpropContext():
        y = m(x)
    y[0, 1].backward()
    # Replaced layers are not differentiated with respect to their parameters.
    assert m.conv.weight.grad is None and m.fc.weight.grad is None
    assert x.grad is not None and x.grad.sum().item() == pytest.approx(1.0, abs=1e-5)
    ctx = ExcitationBackpropContext()
    with ctx:
        with pytest.raises(RuntimeError, match="already active"):
            ctx.__enter__()


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_weights_changed_between_forward_and_backward_raise(layer):
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    x = torch.rand(1, 2, 4, 4, requires_grad=True)
    with ExcitationBackpropContext():
        y = m(x)
    with torch.no_grad():
        (m[0] if layer == "conv" else m[3]).weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place between the forward pass"):
        y[0, 0].backward()


def test_context_is_thread_local():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x = torch.rand(1, 3, 6, 6)

    def plain():
        xx = x.clone().requires_grad_(True)
        net(xx)[0, 1].backward()
        return xx.grad

    expected = plain()
    barrier = threading.Barrier(2, timeout=30)
    results = {}

    def other():
        barrier.wait()  # the main thread is inside its context now
        results["grad"] = plain()
        barrier.wait()

    thread = threading.Thread(target=other)
    thread.start()
    xx = x.clone().requires_grad_(True)
    with ExcitationBackpropContext() as ctx:
        barrier.wait()
        barrier.wait()  # the other thread ran a whole forward/backward meanwhile
        y = net(xx)
    y[0, 1].backward()
    thread.join()
    assert torch.equal(results["grad"], expected)
    assert ctx.counts == {"conv": 1, "linear": 1}
    assert xx.grad.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(xx.grad, expected)


def test_warnings_for_models_without_rules():
    relu_only = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.warns(NoRuleAppliedWarning, match="replaced no convolution"):
        with ExcitationBackpropContext():
            relu_only(torch.rand(1, 3, 2, 2))
    gelu = nn.Sequential(nn.Conv2d(3, 2, 1), nn.GELU())
    with pytest.warns(UnhandledActivationWarning, match="gelu"):
        with ExcitationBackpropContext():
            gelu(torch.rand(1, 3, 2, 2, requires_grad=True))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_excitation_backprop_errors():
    m = ConvHead().eval()
    x = torch.rand(1, 2, 6, 6)
    with pytest.raises(ValueError, match="no module named 'relu3'.*'relu1'"):
        excitation_backprop(m, x, 0, saliency_layer="relu3")
    with pytest.raises(TypeError, match="floating-point"):
        excitation_backprop(m, x.to(torch.uint8), 0)
    with pytest.raises(ValueError, match="out of range"):
        excitation_backprop(m, x, 4)
    with pytest.raises(ValueError, match="2 class indices but the batch has 1"):
        excitation_backprop(m, x, [0, 1])
    with pytest.raises(ValueError, match="replaced no convolution"):
        excitation_backprop(nn.Sequential(nn.ReLU(), nn.Flatten()), x, 0)
    with pytest.raises(ValueError, match=r"shape \(N, C, \*spatial\)"):
        excitation_backprop(m, torch.rand(2, 6), 0)
    with pytest.raises(ValueError, match="has no .grad"):
        excitation_to_saliency(torch.zeros(1, 2, 3))
    t = torch.zeros(3, requires_grad=True)
    t.grad = torch.zeros(3)
    with pytest.raises(ValueError, match=r"expected \(N, C, \*spatial\)"):
        excitation_to_saliency(t)


def test_contrastive_errors():
    m = ConvHead().eval()
    x = torch.rand(1, 2, 6, 6)
    with pytest.raises(TypeError, match="contrast_layer"):
        contrastive_excitation_backprop(m, x, 0, "relu1")  # required, as in TorchRay
    for missing in (None, ""):
        with pytest.raises(ValueError, match="contrast_layer is required"):
            contrastive_excitation_backprop(m, x, 0, "relu1", missing)
    with pytest.raises(ValueError, match="'relu1' is the saliency_layer"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu1")
    with pytest.raises(ValueError, match="contrast layer must be above the saliency layer"):
        contrastive_excitation_backprop(m, x, 0, "relu2", "relu1")
    with pytest.raises(ValueError, match="no module named 'relu9'"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu9")
    with pytest.raises(ValueError, match="classifier_layer 'relu2' made no convolution"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu2", classifier_layer="relu2")
    with pytest.raises(ValueError, match="classifier_layer 'conv2'.*is not between"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu2", classifier_layer="conv2")
    with pytest.raises(ValueError, match="out of range"):
        contrastive_excitation_backprop(m, x, 7, "relu1", "relu2")
    with pytest.raises(ValueError, match="target is required"):
        contrastive_excitation_backprop(m, x, None, "relu1", "relu2")
    with pytest.raises(ValueError, match="smooth must be a non-negative"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu2", smooth=-1)
    with pytest.raises(TypeError, match="floating-point"):
        contrastive_excitation_backprop(m, x.double().long(), 0, "relu1", "relu2")

    class Extra(ConvHead):
        def __init__(self):
            super().__init__()
            self.side = nn.ReLU()
            self.unused = nn.ReLU()

        def forward(self, x):
            self.side(x)  # called, but the output does not depend on it
            return super().forward(x)

    e = Extra().eval()
    with pytest.raises(ValueError, match="do not depend on contrast_layer 'side'"):
        contrastive_excitation_backprop(e, x, 0, None, "side")
    with pytest.raises(ValueError, match="contrast_layer 'unused' was not called"):
        contrastive_excitation_backprop(e, x, 0, None, "unused")

    class Shared(ConvHead):
        def forward(self, x):
            h = self.relu1(self.conv1(x))
            h = self.relu1(self.conv2(h))
            return self.fc(h.flatten(1))

    with pytest.raises(ValueError, match="contrast_layer 'relu1' was called 2 times"):
        contrastive_excitation_backprop(Shared().eval(), x, 0, "conv1", "relu1")
    with pytest.raises(ValueError, match="replaced no convolution"):
        contrastive_excitation_backprop(nn.Sequential(nn.ReLU(), nn.Flatten()), x, 0, None,
                                        "1")

    class PoolOnly(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2).flatten(1)

    with pytest.raises(ValueError, match="makes no convolution or linear call"):
        contrastive_excitation_backprop(nn.Sequential(PoolOnly()), x, 0, None, "0")


# ---------------------------------------------------------------------------------------------
# Precision: 16-bit floats keep their signal
# ---------------------------------------------------------------------------------------------


class SmallStack(nn.Module):
    """conv → ReLU → conv → ReLU → avg pool → residual-free linear head; activations small
    (inputs scaled by 1e-3), where float16's own sqrt(tiny) = 7.8e-3 would swallow every unit."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        with torch.no_grad():
            for m in (self.c1, self.c2, self.fc):
                m.weight.abs_()  # every unit has excitatory inputs
                m.bias.zero_()

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        h = F.avg_pool2d(h, 2) + F.avg_pool2d(h, 2) * 0.5  # a weighted sum, in 16 bits too
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_floats_conserve_the_signal(dtype):
    m = SmallStack().eval()
    x = torch.rand(2, 3, 8, 8) * 1e-3
    seed = torch.zeros(2, 5)
    seed[[0, 1], [1, 4]] = 1
    ref, _ = excite(m, x, seed)
    got, ctx = excite(m.to(dtype), x.to(dtype), seed.to(dtype))
    assert got.dtype == dtype
    mass = got.float().flatten(1).sum(1)
    torch.testing.assert_close(mass, torch.ones(2), rtol=0, atol=2e-2)
    torch.testing.assert_close(got.float(), ref, rtol=5e-2, atol=2e-4)
    assert ctx.counts["conv"] == 2 and ctx.counts["sum"] == 1 and ctx.counts["scale"] == 1
    assert excitation_eps(dtype) == excitation_eps(torch.float32)
    # The wrapper too, at a layer.
    smap = excitation_backprop(m, x.to(dtype), [1, 4], saliency_layer="c1")
    torch.testing.assert_close(smap.float().flatten(1).sum(1), torch.ones(2), rtol=0,
                               atol=2e-2)


# ---------------------------------------------------------------------------------------------
# Operations the rules do not model: a warning each
# ---------------------------------------------------------------------------------------------


class Unmodeled(nn.Module):
    """conv → op → ReLU → linear, with ``op`` one of the operations to check."""

    def __init__(self, op):
        super().__init__()
        torch.manual_seed(12)
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm([4, 4, 4])
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.post = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.register_buffer("mix", torch.rand(4, 4))
        self.op = op

    def forward(self, x):
        a, b = self.c1(x), F.relu(self.c2(x))
        op = self.op
        if op == "group_norm":
            h = self.gn(a)
        elif op == "layer_norm":
            h = self.ln(a)
        elif op == "instance_norm":
            h = self.inorm(a)
        elif op == "sub":
            h = a - b
        elif op == "sub_mean":
            h = a - a.mean(1, keepdim=True)
        elif op == "abs":
            h = a.abs()
        elif op == "neg":
            h = -a
        elif op == "rsub":
            h = 1 - a
        elif op == "add(alpha<0)":
            h = torch.add(a, b, alpha=-2)
        elif op == "mul by a negative factor":
            h = a * -2
        elif op == "mul of two activations":
            h = a * b
        elif op == "matmul":
            h = (self.mix @ a.flatten(2)).reshape(a.shape)
        else:
            raise AssertionError(op)
        return self.fc(F.relu(self.post(F.relu(h))).flatten(1))


UNMODELED = ["group_norm", "layer_norm", "instance_norm", "sub", "sub_mean", "abs", "neg",
             "rsub", "add(alpha<0)", "mul by a negative factor", "mul of two activations",
             "matmul"]


@pytest.mark.parametrize("op", UNMODELED)
def test_unmodeled_operations_warn(op):
    m = Unmodeled(op).eval()
    x = torch.rand(2, 2, 4, 4)
    name = {"sub_mean": "sub"}.get(op, op)
    with pytest.warns(UnhandledOperationWarning, match=re.escape(f"{name} ×1")):
        got, ctx = excite(m, x, torch.eye(3)[:2])
    assert ctx.unmodeled == {name: 1}
    with pytest.warns(UnhandledOperationWarning, match="does not model"):
        excitation_backprop(m, x, [0, 1])
    # Read above the operation: backpropagation does not reach it, nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnhandledOperationWarning)
        excitation_backprop(m, x, [0, 1], saliency_layer="post")
    # A subclass of UnhandledActivationWarning: filters on that class catch it.
    assert issubclass(UnhandledOperationWarning, UnhandledActivationWarning)


def test_modeled_scalings_do_not_warn_and_pass_the_signal():
    """x * c, c * x, x / c with c > 0 (a number or a constant tensor) and in place: the
    signal passes unchanged where the output is excited (the weight cancels)."""
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)[:, None]
    p = torch.rand(2, 3, 4, dtype=torch.float64)
    for signed in (True, False):
        for f in (lambda t: t * 3, lambda t: 0.5 * t, lambda t: t / std, lambda t: std * t,
                  lambda t: torch.mul(t, 2), lambda t: t.clone().mul_(2),
                  lambda t: t.clone().div_(std)):
            with warnings.catch_warnings():
                warnings.simplefilter("error", UnhandledOperationWarning)
                with ExcitationBackpropContext(signed=signed) as ctx:
                    y = f(x)
            (g,) = torch.autograd.grad(y, x, p)
            assert ctx.counts == {"scale": 1}
            torch.testing.assert_close(g, p if signed else p * (x > 0))


def test_calls_inside_custom_functions_warn():
    """Replaced calls made without autograd on inputs that require grad — inside a custom
    autograd.Function (a reentrant checkpoint, a hand-written activation) — keep the
    Function's own backward: a warning says so (not an error: the Function's backward is a
    legitimate part of the model)."""
    from torch.utils.checkpoint import checkpoint

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Net(nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            torch.manual_seed(13)
            self.c1, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)
            self.reentrant = reentrant

        def forward(self, x):
            if self.reentrant:
                h = checkpoint(lambda t: F.relu(self.c1(t)), x, use_reentrant=True)
            else:
                h = F.relu(Double.apply(self.c1(x)))
            return self.fc(h.mean((2, 3)))

    x = torch.rand(1, 3, 6, 6, requires_grad=True)
    for reentrant in (True, False):
        with pytest.warns(UnhandledOperationWarning, match=r"no_grad ×1.*custom"):
            with ExcitationBackpropContext():
                Net(reentrant)(x)
    with pytest.warns(UnhandledOperationWarning, match="no_grad"):
        smap = excitation_backprop(Net(False), x.detach(), 0, saliency_layer="c1")
    assert torch.isfinite(smap).all()
    # A reentrant checkpoint refuses torch.autograd.grad: a ValueError saying what to do.
    with pytest.warns(UnhandledOperationWarning), pytest.raises(
            ValueError, match="use_reentrant=True.*excitation backprop refuses any checkpoint"):
        excitation_backprop(Net(True), x.detach(), 0)


# ---------------------------------------------------------------------------------------------
# Contrastive: the contrast layer must cut the network
# ---------------------------------------------------------------------------------------------


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(14)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=1))
        self.out = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = self.out(h + self.block(h))
        return self.head(h.mean((2, 3)))


def test_contrast_layer_must_cut_the_network():
    m = ResidualNet().eval()
    x = torch.rand(2, 3, 6, 6)
    for inside in ("block.0", "block.2", "block"):
        with pytest.raises(ValueError, match=rf"'{inside}' does not cut the network.*identity"):
            contrastive_excitation_backprop(m, x, [0, 1], "stem", inside)
    # Above the residual sum every path passes through: fine.
    smap = contrastive_excitation_backprop(m, x, [0, 1], "stem", "out")
    assert smap.shape == (2, 1, 6, 6) and (smap >= 0).all()
    # Inside the block, with the saliency layer inside it too, the cut holds.
    smap = contrastive_excitation_backprop(m, x, [0, 1], "block.0", "block.1")
    assert smap.shape == (2, 1, 6, 6)


def test_contrast_layer_cut_on_resnet(torchvision_models):
    model = torchvision_models["resnet18"]
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="does not cut the network"):
        contrastive_excitation_backprop(model, x, 3, "layer2", "layer3.0.conv2")
    assert contrastive_excitation_backprop(model, x, 3, "layer2", "layer3.1").amax() > 0


# ---------------------------------------------------------------------------------------------
# Models the context cannot see into: refused clearly
# ---------------------------------------------------------------------------------------------


def small_net():
    torch.manual_seed(15)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def test_compiled_models():
    """torch.compile(model) is explained through its original module (same map, computed
    eagerly, layer names with or without the '_orig_mod.' prefix); a compiled sub-module, or a
    module compiled in place, is refused with what to pass instead."""
    m = small_net()
    x = torch.rand(2, 3, 6, 6)
    compiled = torch.compile(m)
    torch.testing.assert_close(excitation_backprop(compiled, x, [0, 2]),
                               excitation_backprop(m, x, [0, 2]), rtol=0, atol=0)
    expected = contrastive_excitation_backprop(m, x, [0, 2], "0", "1")
    for layers in (("0", "1"), ("_orig_mod.0", "_orig_mod.1")):
        torch.testing.assert_close(
            contrastive_excitation_backprop(compiled, x, [0, 2], *layers), expected)
    parent = nn.Sequential(torch.compile(small_net()))
    for f in (lambda: excitation_backprop(parent, x, 0),
              lambda: contrastive_excitation_backprop(parent, x, 0, "", "0._orig_mod.1")):
        with pytest.raises(ValueError, match=r"torch.compile.*_orig_mod"):
            f()
    in_place = small_net()
    in_place.compile()
    with pytest.raises(ValueError, match=r"torch.compile"):
        excitation_backprop(in_place, x, 0)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_submodules_are_refused(how):
    m = small_net()
    x = torch.rand(1, 3, 6, 6)
    conv = m[0]
    m[0] = (torch.jit.script(conv) if how == "script"
            else torch.jit.trace(conv, torch.rand(1, 3, 6, 6)))
    with pytest.raises(ValueError, match=r"TorchScript module '0'"):
        excitation_backprop(m, x, 0)
    with pytest.raises(ValueError, match="TorchScript"):
        contrastive_excitation_backprop(m, x, 0, "", "1")


def test_non_reentrant_checkpoint_is_refused():
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = small_net()

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    x = torch.rand(1, 3, 6, 6)
    with pytest.raises(RuntimeError, match=r"checkpoint\(use_reentrant=False\).*without"):
        excitation_backprop(Net(), x, 0)
    with pytest.raises(RuntimeError, match=r"checkpoint\(use_reentrant=False\)"):
        with ExcitationBackpropContext():
            Net()(x.requires_grad_(True))
    # Outside the context saved-tensor hooks work again.
    y = Net()(x.detach().requires_grad_(True))
    y.sum().backward()


# ---------------------------------------------------------------------------------------------
# TorchRay's API
# ---------------------------------------------------------------------------------------------


def test_torchray_signatures():
    def names(f):
        return list(inspect.signature(f).parameters)

    assert names(contrastive_excitation_backprop)[:10] == [
        "model", "input", "target", "saliency_layer", "contrast_layer", "classifier_layer",
        "resize", "resize_mode", "get_backward_gradient", "debug"]
    params = inspect.signature(contrastive_excitation_backprop).parameters
    assert params["smooth"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["saliency_layer"].default is inspect.Parameter.empty
    assert names(excitation_backprop)[:7] == [
        "model", "input", "target", "saliency_layer", "resize", "resize_mode", "smooth"]
    assert inspect.signature(excitation_backprop).parameters["context_builder"].kind is (
        inspect.Parameter.KEYWORD_ONLY)
    assert names(ExcitationBackpropContext)[:2] == ["enable", "debug"]
    assert names(update_resnet) == ["model", "debug"]
    for f in (excitation_backprop, contrastive_excitation_backprop):
        hints = inspect.signature(f)
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in hints.parameters.values())


def test_contrastive_positional_get_backward_gradient_is_used():
    """TorchRay's positional order: get_backward_gradient is the 9th argument."""
    m = ConvHead().double().eval()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    calls = []

    def seed(output, target):
        calls.append(target)
        g = torch.zeros_like(output)
        g[:, target] = 2.0
        return g

    doubled = contrastive_excitation_backprop(m, x, 1, "relu1", "relu2", None, False,
                                              "bilinear", seed)
    plain = contrastive_excitation_backprop(m, x, 1, "relu1", "relu2")
    assert calls == [1]
    torch.testing.assert_close(doubled, 2 * plain)
    smap, info = contrastive_excitation_backprop(m, x, 1, "relu1", "relu2", None, False,
                                                 "bilinear", seed, True)
    assert isinstance(info.gradient, torch.Tensor)


def test_context_enable_and_debug(capsys):
    m = ConvHead().double().eval()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad(m(x)[0, 1], x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ExcitationBackpropContext(enable=False) as ctx:
            y = m(x)
    (g,) = torch.autograd.grad(y[0, 1], x)
    assert torch.equal(g, plain) and ctx.counts == {}
    with ExcitationBackpropContext(False, True):  # positional, as TorchRay
        m(x)
    with ExcitationBackpropContext(debug=True):
        y = m(x)
    capsys.readouterr()
    (g,) = torch.autograd.grad(y[0, 1], x)
    out = capsys.readouterr().out
    assert out.count("excitation backprop:") == 3 and "linear #2" in out and "conv #0" in out
    assert g.sum().item() == pytest.approx(1.0)


def test_gradient_to_saliency_functions():
    x = torch.zeros(1, 3, 2, 2, requires_grad=True)
    x.grad = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]]).expand(1, 3, 2, 2).clone()
    x.grad[0, 1] *= 2
    total = torch.tensor([[[[4.0, -8.0], [2.0, 0.0]]]])
    assert torch.equal(gradient_to_excitation_backprop_saliency(x), total)
    assert torch.equal(gradient_to_contrastive_excitation_backprop_saliency(x),
                       total.clamp(min=0))
    assert excitation_to_saliency is gradient_to_excitation_backprop_saliency
    m = ConvHead().eval()
    xx = torch.rand(1, 2, 6, 6)
    default = excitation_backprop(m, xx, 0, "relu1")
    explicit = excitation_backprop(m, xx, 0, "relu1", context_builder=ExcitationBackpropContext,
                                   gradient_to_saliency=gradient_to_excitation_backprop_saliency)
    torch.testing.assert_close(default, explicit)


def test_eltwise_sum_and_update_resnet(torchvision_models):
    torch.manual_seed(16)
    a = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    c = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    p = torch.rand(2, 3, dtype=torch.float64)
    # Outside the context: a plain sum.
    y = EltwiseSum()(a, b)
    assert torch.equal(y, a + b)
    assert all(torch.equal(g, p) for g in torch.autograd.grad(y, (a, b), p))
    # Inside: the sum rule, as the context applies to a + b.
    for signed in (True, False):
        with ExcitationBackpropContext(signed=signed) as ctx:
            y1 = EltwiseSum()(a, b)
            y2 = a + b
        assert ctx.counts == {"sum_dims": 1, "sum": 1}  # stack + sum, and a + b
        for g1, g2 in zip(torch.autograd.grad(y1, (a, b), p), torch.autograd.grad(y2, (a, b),
                                                                                   p)):
            torch.testing.assert_close(g1, g2)
    with ExcitationBackpropContext():
        y = eltwise_sum(a, b, c)
    grads = torch.autograd.grad(y, (a, b, c), p)
    den = (a + b + c).detach()
    for g, t in zip(grads, (a, b, c)):
        torch.testing.assert_close(g, t.detach() / den * p)
    assert issubclass(EltwiseSumFunction, torch.autograd.Function)
    # update_resnet: the same model, unchanged, the same maps.
    model = torchvision_models["resnet18"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    before = excitation_backprop(model, x, 3, "layer2")
    assert update_resnet(model) is model and update_resnet(model, debug=False) is model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(excitation_backprop(model, x, 3, "layer2"), before, rtol=0,
                               atol=0)


def test_signed_default_differs_from_positive_at_the_input(torchvision_models):
    """The two rules agree wherever inputs are non-negative; at the normalised image and
    across ResNet's batch-normalised residual branches they differ."""
    model = torchvision_models["resnet18"]
    torch.manual_seed(4)
    x = torch.randn(1, 3, 32, 32)
    signed = excitation_backprop(model, x, 3)
    positive = excitation_backprop(model, x, 3, signed=False)
    assert (signed < 0).any() and (positive >= 0).all()
    assert not torch.allclose(signed, positive, atol=1e-3)
    a = excitation_backprop(model, x, 3, "layer2")
    b = excitation_backprop(model, x, 3, "layer2", signed=False)
    assert 0 < (a - b).abs().max() < 1


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "area"])
def test_interpolation_follows_the_dense_rule(mode):
    """Upsampling (an FPN / U-Net decoder) is a linear map with non-negative weights."""
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.rand(1, 2, 6, 8, dtype=torch.float64)
    options = {} if mode != "bilinear" else {"align_corners": False}

    def op(t):
        return F.interpolate(t, size=(6, 8), mode=mode, **options)

    for signed in (True, False):
        with ExcitationBackpropContext(signed=signed) as ctx:
            y = op(x)
        (g,) = torch.autograd.grad(y, x, p)
        assert ctx.counts == {"interpolate": 1}
        torch.testing.assert_close(g, dense_ebp(op, x.detach(), p, signed))
    with pytest.warns(UnhandledOperationWarning, match=r"interpolate\(bicubic\)"), quiet():
        with ExcitationBackpropContext():
            y = F.interpolate(x, scale_factor=2, mode="bicubic")
        torch.autograd.grad(y, x, torch.ones_like(y))


def test_same_maps_as_torchray_when_installed():
    """Black-box parity with TorchRay (``pip install torchray``; skipped without it): the
    default (signed) rule gives TorchRay's maps at the input, at a layer and contrastively.
    Measured with TorchRay 1.0.0.2 on VGG16 / ResNet-50 at 224²: within 1e-9."""
    torchray_ebp = pytest.importorskip("torchray.attribution.excitation_backprop")
    import torchvision

    for name, layers in (("vgg11", ("features.10", "features.15", "classifier.6")),
                         ("resnet18", ("layer2", "layer3", "fc"))):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10).eval()
        x = torch.randn(1, 3, 64, 64)
        ours = [excitation_backprop(model, x, 3), excitation_backprop(model, x, 3, layers[0]),
                contrastive_excitation_backprop(model, x, 3, *layers)]
        # TorchRay's ResNet surgery on a copy (it may patch the blocks it is given).
        theirs_model = (torchray_ebp.update_resnet(copy.deepcopy(model))
                        if name.startswith("resnet") else model)
        theirs = [torchray_ebp.excitation_backprop(theirs_model, x, 3, saliency_layer=""),
                  torchray_ebp.excitation_backprop(theirs_model, x, 3,
                                                   saliency_layer=layers[0]),
                  torchray_ebp.contrastive_excitation_backprop(
                      theirs_model, x, 3, saliency_layer=layers[0], contrast_layer=layers[1],
                      classifier_layer=layers[2])]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


def test_residual_sums_written_with_plus_warn_of_torchrays_number():
    """TorchRay passes a '+' residual sum's signal unchanged unless update_resnet was called;
    ours splits it (the paper's rule): a TorchRayDifferenceWarning says so, once per call."""
    import warnings

    import torchvision

    from torchray_like.attribution.context import TorchRayDifferenceWarning
    from torchray_like.attribution.excitation_backprop import update_resnet
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(TorchRayDifferenceWarning, match=r"split the signal of 8 residual sum"):
        plain = excitation_backprop(model, x, 3, "layer2")
    with pytest.warns(TorchRayDifferenceWarning, match="update_resnet"):
        contrastive_excitation_backprop(model, x, 3, "layer2", "layer4")
    # After update_resnet (TorchRay's conversion) TorchRay's map is ours: no warning, same map.
    converted = update_resnet(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TorchRayDifferenceWarning)
        torch.testing.assert_close(excitation_backprop(converted, x, 3, "layer2"), plain)
        # A model without residual sums never warns.
        vgg = torchvision.models.vgg11(num_classes=10).eval()
        excitation_backprop(vgg, x, 3, "features.5")
