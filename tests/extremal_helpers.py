"""Shared by the extremal perturbation tests (test_extremal_*.py): models whose evidence is
known — a patterned image scored inside fixed boxes (``BoxScore``), and boxes scored at every
scale of logit or as a probability (``ScaledBoxLogit``) — with the measures of a mask's overlap
with a box."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def pattern(shape, period=8):
    """A product of cosines: the evidence, destroyed by blurring or fading."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    out = torch.ones(shape, dtype=torch.float64)
    for g, s in zip(grids, shape):
        out = out * torch.cos(2 * math.pi * g / period)
    return out


class BoxScore(nn.Module):
    """Class ``c`` scores the correlation of the image with a fixed pattern inside box ``c``:
    ``y_c = mean_{u ∈ box_c} Σ_channels x(u)·pattern(u)``.  The evidence for class ``c`` is
    exactly box ``c`` of a patterned image.

    ``pattern_shape`` gives the pattern a shape that broadcasts (constant along some axes).
    The model records, per call, the batch size, its training flag, grad mode and whether its
    parameter required grad; ``fail_at`` makes the n-th call raise.
    """

    def __init__(self, boxes, shape, pattern_shape=None, fail_at=None):
        super().__init__()
        self.boxes = [tuple(slice(a, b) for a, b in box) for box in boxes]
        pat = pattern(pattern_shape or shape)
        self.register_buffer("pat", pat.expand(shape).clone().float())
        self.gain = nn.Parameter(torch.ones(()))
        self.calls = []
        self.fail_at = fail_at

    def forward(self, x):
        self.calls.append((x.shape[0], self.training, torch.is_grad_enabled(),
                           self.gain.requires_grad))
        if self.fail_at is not None and len(self.calls) >= self.fail_at:
            raise RuntimeError("boom inside the model")
        e = (x * self.pat.to(x.dtype)).sum(1)
        scores = [e[(slice(None),) + box].flatten(1).mean(1) for box in self.boxes]
        return torch.stack(scores, 1) * self.gain


def box_fraction(box, shape):
    return math.prod(b - a for a, b in box) / math.prod(shape)


def inside_fraction(mask, box):
    """Share of the mask's mass inside the box."""
    sl = tuple(slice(a, b) for a, b in box)
    return float(mask[sl].sum() / mask.sum())


def support_inside(mask, box):
    """Share of the thresholded mask (m ≥ 0.5) inside the box."""
    sl = tuple(slice(a, b) for a, b in box)
    support = (mask >= 0.5).float()
    return float(support[sl].sum() / support.sum().clamp(min=1))


SHAPE2 = (48, 48)
BOXES2 = [((6, 18), (6, 21)), ((28, 43), (24, 44))]          # 7.8 % and 13 % of the image
AREAS = [0.05, 0.1, 0.2]
# The box models score a box's mean (×1 to ×200, or its probability), far from the logit scale
# the paper's raw reward (the default reward_scale=1) is calibrated for: they use "auto".
KW2 = dict(step=2, sigma=3, max_blur=3, progress=False, reward_scale="auto")


def image2(n=2, dtype=torch.float32):
    return pattern(SHAPE2).expand(n, 3, *SHAPE2).clone().to(dtype)


SIDE = 64
BOX = (slice(8, 24), slice(36, 52))          # 16 × 16 px: 6.25 % of the image
RIVAL = (slice(40, 56), slice(8, 24))


class ScaledBoxLogit(nn.Module):
    """Image ``b`` of the batch: class k's logit is ``scales[b]`` × the mean of the input inside
    box k (class 0: BOX, class 1: RIVAL); images with ``prob[b]`` return the softmax instead.
    One call optimises every (scale, seed) combination at once; each mask has its own reward
    unit and its own ranking, so this equals one call per image."""

    def __init__(self, scales, prob):
        super().__init__()
        w = torch.zeros(2, SIDE, SIDE)
        w[0][BOX] = 1 / 256
        w[1][RIVAL] = 1 / 256
        self.register_buffer("w", w)
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32).view(-1, 1))
        self.register_buffer("prob", torch.tensor(prob).view(-1, 1))

    def forward(self, x):
        z = self.scales.to(x.dtype) * torch.einsum("nchw,khw->nk", x, self.w.to(x.dtype))
        z = z / x.shape[1]
        return torch.where(self.prob, z.softmax(1), z)


SCALES = {"logit x1": (1.0, False), "logit x20": (20.0, False), "logit x200": (200.0, False),
          "softmax": (20.0, True)}


def box_images(seeds):
    return torch.cat([torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(s))
                      * 0.2 + 0.8 for s in seeds])


class DictModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"logits": self.inner(x)}
