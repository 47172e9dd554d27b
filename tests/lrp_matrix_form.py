"""A hand-written LRP in matrix form: every affine map as a dense matrix, one formula per rule
written from the contributions ``z_ij = x_j w_ij`` (Montavon et al. 2019, "Layer-wise relevance
propagation: an overview"), no library code.  The reference of ``tests/test_lrp_closed.py`` and
``tests/test_lrp_sign_paths.py``."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.lrp_rules import AlphaBeta, Epsilon, ZPlus

DT = torch.float64

__all__ = ["DT", "matrix", "stab", "share", "hand_rule", "hand_lrp", "FoldNet", "library_lrp"]


def matrix(op, shape):
    """``(W, b)`` with ``op(x) = W x + b`` on one sample of ``shape``."""
    n = math.prod(shape)
    with torch.no_grad():
        b = op(torch.zeros((1,) + shape, dtype=DT)).flatten()
        W = (op(torch.eye(n, dtype=DT).reshape((n,) + shape)).reshape(n, -1) - b).t()
    return W, b


def stab(z, eps):
    e = torch.full_like(z, eps)  # in z's dtype: a where of two numbers would be float32
    return z + torch.where(z >= 0, e, -e)


def share(Z, bias, R, eps):
    """Σ_i Z_ij / (Σ_j Z_ij + bias_i) R_i, zero where the denominator is exactly zero."""
    d = stab(Z.sum(1) + bias, eps)
    s = torch.where(d == 0, 0.0, R / torch.where(d == 0, 1.0, d))
    return (Z * s[:, None]).sum(0)


def hand_rule(rule, x, W, b, R):
    Z = x[None, :] * W
    pos, neg = Z.clamp(min=0), Z.clamp(max=0)
    if isinstance(rule, Epsilon):
        return share(Z, b, R, rule.epsilon)
    if isinstance(rule, AlphaBeta):
        return (rule.alpha * share(pos, b.clamp(min=0), R, rule.epsilon)
                - rule.beta * share(neg, b.clamp(max=0), R, rule.epsilon))
    if isinstance(rule, ZPlus):
        return share(pos, b.clamp(min=0), R, rule.epsilon)
    z = Z.sum(1) + b  # Gamma: outputs > 0 favour positive contributions, the others negative
    up = share(Z + rule.gamma * pos, b + rule.gamma * b.clamp(min=0),
               torch.where(z > 0, R, 0.0), rule.epsilon)
    return up + share(Z + rule.gamma * neg, b + rule.gamma * b.clamp(max=0),
                      torch.where(z > 0, 0.0, R), rule.epsilon)


def hand_lrp(steps, x, target, rule):
    """``steps``: ``("affine", op, own rule or None for ``rule``)``, ``("relu",)``,
    ``("pool", k)``, ``("shift", c)`` (``t - c``); relevance at the input, shaped as ``x``."""
    acts, saved = [x[0]], []
    for step in steps:
        a = acts[-1]
        if step[0] == "affine":
            W, b = matrix(step[1], tuple(a.shape))
            saved.append((W, b))
            out = (W @ a.flatten() + b).reshape(step[1](a[None]).shape[1:])
        elif step[0] == "relu":
            out = a.clamp(min=0)
        elif step[0] == "shift":
            out = a - step[1]
            saved.append(out)
        else:
            out, idx = F.max_pool2d(a[None], step[1], return_indices=True)
            out = out[0]
            saved.append(idx[0])
        acts.append(out)
    R = torch.zeros_like(acts[-1].flatten())
    R[target] = acts[-1].flatten()[target]
    for step, a in zip(reversed(steps), reversed(acts[:-1])):
        if step[0] == "affine":
            W, b = saved.pop()
            R = hand_rule(step[2] or rule, a.flatten(), W, b, R)
        elif step[0] == "pool":  # the winner of each window takes its relevance
            idx = saved.pop().flatten(1)
            full = torch.zeros_like(a.flatten(1))
            full.scatter_add_(1, idx, R.reshape(idx.shape))
            R = full.flatten()
        elif step[0] == "shift":  # not a layer: relevance / activation passes unchanged
            R = a.flatten() * R / saved.pop().flatten()
        # a ReLU passes relevance unchanged (it is proportional to the activation, which the
        # ReLU zeroes where it is off)
    return R.reshape(x.shape[1:])


class FoldNet(nn.Module):
    """conv → ReLU → conv [bias] → BN (``scales``) → [ReLU] → flatten → linear: the second
    conv sees a ReLU's output, and its batch norm is folded into it; without the ReLU after it
    its negative outputs carry relevance.  ``first``: the first conv's rule in :meth:`steps`
    (``None``: the rule under test)."""

    def __init__(self, bias: bool, scales, relu_after: bool = True, first=None,
                 seed: int = 41):
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 6 * 6, 2)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor(scales))
            self.bn.bias.copy_(torch.tensor([0.2, -0.3, 0.05]))
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
            self.bn.running_var.copy_(torch.tensor([0.5, 1.5, 0.8]))
        self.relu_after, self.first = relu_after, first
        self.to(DT).eval()

    def forward(self, x):
        t = self.bn(self.c2(torch.relu(self.c1(x))))
        return self.fc((torch.relu(t) if self.relu_after else t).flatten(1))

    def steps(self):
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        folded = ("affine", lambda t: self.c2(t) * scale[:, None, None] + shift[:, None, None],
                  None)
        return ([("affine", self.c1, self.first), ("relu",), folded]
                + ([("relu",)] if self.relu_after else [])
                + [("affine", lambda t: self.fc(t.flatten(1)), Epsilon(1e-6))])


def library_lrp(net, x, target, composite):
    """The library's side of the comparisons: the relevance ``x ⊙ g`` of sample 0 under
    ``LRPContext(composite)`` (``g`` the gradient of the target's score)."""
    from torchray_like.attribution.lrp import LRPContext

    with LRPContext(composite, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, target].sum(), xx)
    return (xx * g).detach()[0]
