"""Shared by the excitation backprop tests (test_excitation_*.py): the paper's rule computed
independently (NumPy in float64 with explicit loops for linear layers, 2-D convolutions and
pooling; a dense-matrix form built with plain autograd for any other linear operator), and the
small networks the rules are checked on.

The formula (Zhang et al. 2016, arXiv 1608.00507): ``P(a_j) = Σ_i r(x_j) w⁺_ij /
(Σ_k r(x_k) w⁺_ik) · P(a_i)`` with ``r(x) = x`` (signed, the default) or ``max(x, 0)``
(``signed=False``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.common import NoRuleAppliedWarning
from torchray_like.attribution.excitation_backprop import ExcitationBackpropContext

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
