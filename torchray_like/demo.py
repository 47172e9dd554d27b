"""A short demo: every registered method on a network whose evidence is known.

Run ``python -m torchray_like.demo`` (add ``--save demo.png`` for a figure).

The network is built by hand, so no weights are downloaded: class 0 ("red") fires on red
blobs, class 1 ("green") on green ones.  The image holds a red square at the top left and a
green square at the bottom right, so a good map for class 0 points at the red square and one for
class 1 at the green square.  The demo prints, for each method, where its map peaks and whether
that is inside the right square.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Dict, List, Optional, Tuple, cast

import torch
import torch.nn as nn

from torchray_like.attribution import METHODS

SIZE = 32
BOXES = {0: (slice(4, 12), slice(4, 12)), 1: (slice(20, 28), slice(20, 28))}


class ColourNet(nn.Module):
    """conv (colour detectors) → ReLU → conv → ReLU → global average pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        # nn.Sequential's items are typed as plain modules.
        conv1 = cast(nn.Conv2d, self.features[0])
        conv2 = cast(nn.Conv2d, self.features[2])
        assert conv1.bias is not None and conv2.bias is not None  # built with bias=True
        with torch.no_grad():
            w = torch.zeros(2, 3, 3, 3)
            # Red minus the mean of the others, green likewise: zero on grey, positive on the
            # colour even when blurred into the background.
            w[0, 0], w[0, 1], w[0, 2] = 1 / 9, -0.5 / 9, -0.5 / 9
            w[1, 1], w[1, 0], w[1, 2] = 1 / 9, -0.5 / 9, -0.5 / 9
            conv1.weight.copy_(w)
            conv1.bias.fill_(-0.03)  # silences the background noise
            conv2.weight.zero_()
            for c in range(2):
                conv2.weight[c, c] = 1 / 9
            conv2.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[200.0, -100.0], [-100.0, 200.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def demo_image() -> torch.Tensor:
    """A grey 32×32 image with a red and a green square (values in [0, 1])."""
    torch.manual_seed(0)
    x = torch.full((1, 3, SIZE, SIZE), 0.3) + 0.01 * torch.randn(1, 3, SIZE, SIZE)
    x[0, :, BOXES[0][0], BOXES[0][1]] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    x[0, :, BOXES[1][0], BOXES[1][1]] = torch.tensor([0.1, 0.9, 0.1])[:, None, None]
    return x


def method_kwargs(name: str) -> Dict[str, object]:
    """Arguments that make each method produce an input-sized map on ColourNet."""
    if name in ("grad_cam", "guided_grad_cam", "linear_approx", "excitation_backprop"):
        return {"saliency_layer": "features.2", "resize": True}
    if name == "contrastive_excitation_backprop":
        return {"saliency_layer": "features.0", "contrast_layer": "features.2", "resize": True}
    if name == "rise":
        return {"num_masks": 500, "generator": 0, "progress": False}
    if name == "extremal_perturbation":
        # Step and sigma scaled to the 32-px image (the paper's 7 and 21 are for 224 px).
        return {"areas": [0.1], "max_iter": 300, "step": 2, "sigma": 3, "max_blur": 5,
                "generator": 0, "progress": False}
    return {}


def explain(name: str, model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """The map of method ``name`` for ``target`` as an (H, W) tensor."""
    out = METHODS[name](model, x, target, **method_kwargs(name))
    if isinstance(out, tuple):  # extremal perturbation returns (masks, history)
        out = out[0]
    return out.detach()[0, 0]


def peak(smap: torch.Tensor) -> Tuple[int, int]:
    idx = int(smap.argmax())
    return idx // smap.shape[1], idx % smap.shape[1]


def run(save: Optional[str] = None, methods: Optional[List[str]] = None) -> int:
    """Print where each method's map peaks; return the number of misses."""
    model, x = ColourNet().eval(), demo_image()
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    print(f"ColourNet on a red and a green square: p(red)={probs[0]:.2f}, "
          f"p(green)={probs[1]:.2f}")
    names = methods or list(METHODS)
    maps: Dict[Tuple[str, int], torch.Tensor] = {}
    misses = 0
    for name in names:
        row = []
        for target in (0, 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                smap = explain(name, model, x, target)
            maps[name, target] = smap
            r, c = peak(smap)
            rows, cols = BOXES[target]
            hit = rows.start <= r < rows.stop and cols.start <= c < cols.stop
            misses += not hit
            row.append(f"class {target} peak ({r:2d},{c:2d}) {'hit ' if hit else 'MISS'}")
        print(f"  {name:34s} " + "   ".join(row))
    if save:
        _save_figure(save, x, maps, names)
        print(f"figure written to {save}")
    return misses


def _save_figure(path: str, x: torch.Tensor, maps, names) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(names) + 1, figsize=(2 * (len(names) + 1), 4.2),
                             squeeze=False)
    for row in range(2):
        axes[row, 0].imshow(x[0].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[row, 0].set_title(f"class {row}", fontsize=8)
        for col, name in enumerate(names, start=1):
            axes[row, col].imshow(maps[name, row].float().numpy(), cmap="jet")
            axes[row, col].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", help="write a figure of the maps to this PNG file")
    parser.add_argument("--methods", nargs="*", help="methods to run (default: all)")
    args = parser.parse_args(argv)
    run(args.save, args.methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
