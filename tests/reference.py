"""Independent reference implementations of the ReLU rules: explicit autograd.Functions.

They are written from the papers' formulas, with plain masks and multiplications, and share no
code with the library.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class _RefRectifier(torch.autograd.Function):
    """relu(x), or clamp(x, 0, upper); subclasses give the backward rule."""

    @staticmethod
    def forward(ctx, x, upper=None):
        ctx.save_for_backward(x)
        ctx.upper = upper
        y = x.clamp(min=0)
        return y if upper is None else y.clamp(max=upper)


class RefGuidedReLU(_RefRectifier):
    """Springenberg et al.: p' = p · [x > 0] · [p > 0]."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        mask = (x > 0).to(g.dtype) * (g > 0).to(g.dtype)
        if ctx.upper is not None:
            mask = mask * (x < ctx.upper).to(g.dtype)
        return g * mask, None


class RefDeconvReLU(_RefRectifier):
    """Zeiler & Fergus: p' = max(p, 0) (and the upper clamp of ReLU6 keeps its gradient)."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        out = g.clamp(min=0)
        if ctx.upper is not None:
            out = out * (x < ctx.upper).to(g.dtype)
        return out, None


@contextlib.contextmanager
def patched_functional(function_class):
    """Globally replace F.relu / F.relu6 / F.hardtanh(x, 0, b) by ``function_class``.

    A crude but independent mechanism (global monkey-patching of torch.nn.functional) that
    catches nn.ReLU, nn.ReLU6 and direct F.relu calls in torchvision models.
    """
    orig_relu, orig_relu6, orig_hardtanh = F.relu, F.relu6, F.hardtanh

    def relu(x, inplace=False):
        return function_class.apply(x, None)

    def relu6(x, inplace=False):
        return function_class.apply(x, 6.0)

    def hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False):
        if min_val == 0:
            return function_class.apply(x, float(max_val))
        return orig_hardtanh(x, min_val, max_val)

    F.relu, F.relu6, F.hardtanh = relu, relu6, hardtanh
    try:
        yield
    finally:
        F.relu, F.relu6, F.hardtanh = orig_relu, orig_relu6, orig_hardtanh


def reference_map(model, x, target, function_class=None, layer=None):
    """max_c |∂y/∂x| (or at a layer) computed with plain autograd and the reference rule."""
    ctx = patched_functional(function_class) if function_class else contextlib.nullcontext()
    xx = x.detach().clone().requires_grad_(True)
    with ctx:
        y = model(xx)
    seed = torch.zeros_like(y)
    idx = torch.as_tensor(target).expand(y.shape[0]) if not isinstance(target, list) else \
        torch.tensor(target)
    seed[torch.arange(y.shape[0]), idx] = 1
    (g,) = torch.autograd.grad(y, xx, seed)
    return g.abs().amax(1, keepdim=True)
