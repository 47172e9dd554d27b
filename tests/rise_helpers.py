"""Shared by the RISE tests (test_rise*.py): hand-built models whose evidence is known, and an
independent NumPy construction of the paper's masks (linear interpolation written from the
definition of ``align_corners=False``, every mask configuration enumerated)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BoxModel(nn.Module):
    """Logit k = ``scale`` × the mean of the input over box k (every channel)."""

    def __init__(self, boxes, scale=10.0):
        super().__init__()
        self.boxes = boxes
        self.scale = scale
        self.calls = []  # batch size of every forward

    def forward(self, x):
        self.calls.append(x.shape[0])
        cols = [x[(slice(None), slice(None)) + box].flatten(1).mean(1) for box in self.boxes]
        return self.scale * torch.stack(cols, dim=1)


class LinearModel(nn.Module):
    """Class 0: ``sum(w ⊙ x)``; class 1: 0.  A linear score, so E[RISE] has a closed form."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        f = (x * self.w).flatten(1).sum(1)
        return torch.stack([f, torch.zeros_like(f)], dim=1)


class SmallNet(nn.Module):
    """A small conv net with parameters, dropout and batch norm (state checks)."""

    def __init__(self, classes=5):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, classes)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(h.mean(dim=(2, 3))))


def interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Linear interpolation n_in → n_out with ``align_corners=False`` (PyTorch's definition:
    output pixel j samples input coordinate (j + ½)·n_in/n_out − ½, clamped to the edges)."""
    a = np.zeros((n_out, n_in))
    for j in range(n_out):
        src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        a[j, i0] += 1 - lam
        a[j, i1] += lam
    return a


def all_masks(size, cells, p):
    """Every mask the paper's construction can give, with its probability (NumPy)."""
    cell_size = [-(-n // s) for n, s in zip(size, cells)]
    mats = [interp_matrix(s, (s + 1) * c) for s, c in zip(cells, cell_size)]
    k = math.prod(cells)
    out = []
    for bits in itertools.product((0.0, 1.0), repeat=k):
        grid = np.array(bits).reshape(cells)
        up = grid
        for d, m in enumerate(mats):  # separable: interpolate along each axis
            up = np.moveaxis(np.tensordot(m, np.moveaxis(up, d, 0), axes=(1, 0)), 0, d)
        prob_grid = p ** sum(bits) * (1 - p) ** (k - sum(bits))
        for shift in itertools.product(*[range(c) for c in cell_size]):
            crop = up[tuple(slice(a, a + n) for a, n in zip(shift, size))]
            out.append((crop, prob_grid / math.prod(cell_size)))
    return out


def box_model():
    """Two classes, the means of the top-left and bottom-right 2 × 2 boxes (4 × 4 inputs)."""
    return BoxModel([(slice(0, 2), slice(0, 2)), (slice(2, 4), slice(2, 4))])
