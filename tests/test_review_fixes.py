"""Hostile cases found in the review of the day's changes (one test per fix)."""

import torch
import torch.nn as nn

from torchray_like.attribution.grad_cam import grad_cam
from torchray_like.attribution.layer_layout import explicit_layout


class SharedReLU(nn.Module):
    """One ReLU instance registered in two Sequentials: after a convolution (the path run and
    named) and after a linear layer (registered later, never run)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        act = nn.ReLU()
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act)
        self.a = nn.Sequential(nn.Linear(8, 8), act)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(x).mean((2, 3)))


def test_a_shared_module_is_read_through_the_path_named():
    """The layout of ``"b.1"`` comes from ``b`` (a convolution before it: channels first),
    not from whichever parent a walk of the tree met first (``a``: a linear layer, which read
    the (N, C, H, W) map channels-last, C taken for W)."""
    model, x = SharedReLU().eval(), torch.randn(2, 3, 8, 8)
    assert explicit_layout(model, "b.1", (2, 8, 8, 8), (2, 3, 8, 8)) is False
    torch.testing.assert_close(grad_cam(model, x, [0, 1], saliency_layer="b.1"),
                               grad_cam(model, x, [0, 1], saliency_layer="b.1", tokens=False))
