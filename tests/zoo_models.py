"""Architectures of the torchvision model zoo beyond the five of ``conftest.TORCHVISION_NAMES``,
for the architecture sweep (``test_zoo_sweep.py``): the smallest variants with deterministic
random weights, 10 classes, eval mode, and the smallest inputs they accept; plus toys for the
heavy ones (ResNeXt's grouped convolutions, Wide ResNet) built from torchvision's own blocks."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet


def _tv(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10, **kwargs).eval()


def resnext_toy() -> nn.Module:
    """ResNeXt's bottleneck (grouped 3×3 convolution, 8 groups of 4) with one block a stage."""
    torch.manual_seed(0)
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=8, width_per_group=4).eval()


def wide_resnet_toy() -> nn.Module:
    """Wide ResNet's bottleneck (twice the inner width) with one block a stage."""
    torch.manual_seed(0)
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=128).eval()


class BiasFreeShuffleNet(nn.Module):
    """A bias-free ReLU net made only of operations LRP covers: a grouped convolution, a
    channel shuffle (reshape / transpose), a concatenation, a residual sum, max and average
    pooling and a linear head — relevance is conserved exactly (ε → 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.branch = nn.Conv2d(8, 8, 1, bias=False)
        self.fc = nn.Linear(16, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = nn.functional.max_pool2d(h, 2)
        g = torch.relu(self.grouped(h))
        n, c, hh, ww = g.shape
        g = g.reshape(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)  # shuffle
        h = torch.cat([h + g, torch.relu(self.branch(g))], 1)
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


#: name -> (builder, input side).  The sides are the smallest that keep a spatial feature map
#: (inception_v3 needs 75²; convnext_tiny at 32² ends in a 1×1 map on purpose: the automatic
#: layer must not read a channels-last block then).
ZOO: Dict[str, Tuple[Callable[[], nn.Module], int]] = {
    "mobilenet_v3_small": (lambda: _tv("mobilenet_v3_small"), 64),
    "efficientnet_b0": (lambda: _tv("efficientnet_b0"), 64),
    "convnext_tiny": (lambda: _tv("convnext_tiny"), 32),
    "regnet_x_400mf": (lambda: _tv("regnet_x_400mf"), 64),
    "shufflenet_v2_x0_5": (lambda: _tv("shufflenet_v2_x0_5"), 64),
    "resnext_toy": (resnext_toy, 64),
    "googlenet": (lambda: _tv("googlenet", aux_logits=True, transform_input=True,
                              init_weights=True), 64),
    "inception_v3": (lambda: _tv("inception_v3", aux_logits=True, transform_input=True,
                                 init_weights=True), 75),
    "mnasnet0_5": (lambda: _tv("mnasnet0_5"), 64),
    "wide_resnet_toy": (wide_resnet_toy, 64),
    "alexnet": (lambda: _tv("alexnet"), 64),
}

#: What each model calls besides ReLU that a rectifier rule does not cover (the names the
#: warnings use), and whether it calls ReLU at all.
NONLINEARITIES: Dict[str, Tuple[bool, Tuple[str, ...]]] = {
    "mobilenet_v3_small": (True, ("hardsigmoid", "hardswish")),
    "efficientnet_b0": (False, ("sigmoid", "silu")),
    "convnext_tiny": (False, ("gelu",)),
}

#: Products of two activations (squeeze-excitation) and normalisations LRP does not cover.
LRP_UNCOVERED: Dict[str, Tuple[str, ...]] = {
    "mobilenet_v3_small": ("hardsigmoid", "hardswish", "mul of two activations"),
    "efficientnet_b0": ("mul of two activations", "sigmoid", "silu"),
    "convnext_tiny": ("gelu", "layer_norm"),
}


def zoo_input(side: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))
