"""Excitation backprop (Zhang et al. 2016, arXiv 1608.00507): each rule against the paper's formula.

Every rule is checked against an independent float64 computation of
``P(a_j) = Σ_i r(x_j) w⁺_ij / (Σ_k r(x_k) w⁺_ik) · P(a_i)`` — with ``r(x) = x`` (signed, the
default: the authors' reference code and TorchRay) or ``r(x) = max(x, 0)`` (``signed=False``):
explicit numpy loops for linear layers, 2-D convolutions, pooling and residual sums, and a
dense-matrix form of the rule (the operator's matrix built with plain autograd outside the
context) for 1-D / 3-D / transposed convolutions (tests/excitation_helpers.py).
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.excitation_backprop import (
    ExcitationBackpropContext,
    UnhandledOperationWarning,
    contrastive_excitation_backprop,
    excitation_eps,
)

from .excitation_helpers import (
    KeywordConvs,
    Residual,
    TwoLinear,
    adaptive_windows,
    avg_windows,
    build_conv_linear,
    dense_ebp,
    excitatory,
    excite,
    np_conv2d_ebp,
    np_linear_ebp,
    np_pool_ebp,
    onehot,
    quiet,
    rx,
)

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
            steps = [lambda t: F.relu(m.conv(t)), lambda t: F.avg_pool1d(t, 2),
                     lambda t: F.relu(m.conv2(t)), lambda t: F.adaptive_avg_pool1d(t, 3)]
        else:
            ops = [lambda t: F.conv3d(t, m.conv.weight.clamp(min=0), None, 1, 1),
                   lambda t: F.avg_pool3d(t, 2),
                   lambda t: F.conv_transpose3d(t, m.convt.weight.clamp(min=0), None, 2),
                   lambda t: F.adaptive_avg_pool3d(t, 2)]
            steps = [lambda t: F.relu(m.conv(t)), lambda t: F.avg_pool3d(t, 2),
                     lambda t: F.relu(m.convt(t)), lambda t: F.adaptive_avg_pool3d(t, 2)]
        acts = [xn]  # each operator's input, then the last one's output
        for step in steps:
            acts.append(step(acts[-1]))
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


class SameConv(nn.Module):
    """A ``padding="same"`` convolution (no closed form) beside strided, dilated, grouped and
    transposed ones (closed form)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.same = nn.Conv2d(2, 4, 3, padding="same")
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2)
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.grouped(F.relu(self.same(x))))
        h = F.relu(self.up(h))
        return self.fc(F.conv2d(h, self.up.weight[:3, :3], padding=1).mean((2, 3)))


@pytest.mark.parametrize("contrastive", [False, True])
def test_closed_form_convolutions_equal_the_autograd_replay(monkeypatch, contrastive):
    """The convolutions' transposed products in closed form (``aten.convolution_backward``)
    are autograd's own: the maps are bit for bit those of the replay through autograd, which a
    call the closed form does not cover (``padding="same"``) still takes."""
    from torchray_like.attribution import excitation_rules
    m = SameConv().double().eval()
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    taken = []
    closed = excitation_rules.closed_form

    def recording(call, t):
        op = closed(call, t)
        taken.append(op is not None)
        return op

    def run():
        if contrastive:
            return contrastive_excitation_backprop(m, x, [0, 2], saliency_layer="same",
                                                   contrast_layer="up")
        seed = torch.tensor(onehot(2, [0, 2], 3))
        return excite(m, x, seed)[0]

    monkeypatch.setattr(excitation_rules, "closed_form", recording)
    got = run()
    assert any(taken) and not all(taken)  # the mean (and "same" padding): replayed
    monkeypatch.setattr(excitation_rules, "closed_form", lambda call, t: None)
    assert torch.equal(got, run())
