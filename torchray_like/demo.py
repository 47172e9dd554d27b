"""A short demo: every registered method on a network whose evidence is known.

Run ``python -m torchray_like.demo`` (add ``--save demo.png`` for a figure): a few seconds on
one CPU core (3.4 s measured on a busy two-core machine, a third of it importing PyTorch).

The network is built by hand, so no weights are downloaded: class 0 ("red") fires on red
blobs, class 1 ("green") on green ones.  The image holds a red square at the top left and a
green square at the bottom right, so a good map for class 0 points at the red square and one for
class 1 at the green square.  The demo prints, for each method, where its map peaks and whether
that is inside the right square.  Every method runs with the options of the benchmarks'
settings table (:mod:`torchray_like.benchmark.settings`, model ``"colournet"``, benchmark
``"demo"``), once for both classes.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Dict, List, Optional, Tuple, cast

import torch
import torch.nn as nn

from torchray_like.attribution import METHODS
from torchray_like.benchmark.settings import method_options

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


def method_maps(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``(2, H, W)`` maps of method ``name`` for classes 0 and 1 (one call, a batch of two
    copies of ``x``), with the settings table's options, resized to the image."""
    options = method_options(name, "colournet", "demo")
    if name in ("rise", "extremal_perturbation"):
        options.update(generator=0, progress=False)
    batch = x.expand(2, *x.shape[1:])
    return METHODS[name](model, batch, [0, 1], resize=True, **options).detach()[:, 0]


def peak(smap: torch.Tensor) -> Tuple[int, int]:
    idx = int(smap.argmax())
    return idx // smap.shape[1], idx % smap.shape[1]


def run(save: Optional[str] = None, methods: Optional[List[str]] = None) -> int:
    """Print where each method's map peaks; return the number of misses.

    Runs on one CPU thread (a 32-pixel image gains nothing from more, and loses much when the
    cores are shared); the caller's thread count is restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(save, methods)
    finally:
        torch.set_num_threads(threads)


def _run(save: Optional[str], methods: Optional[List[str]]) -> int:
    model, x = ColourNet().eval(), demo_image()
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    print(f"ColourNet on a red and a green square: p(red)={probs[0]:.2f}, "
          f"p(green)={probs[1]:.2f}")
    names = methods or list(METHODS)
    maps: Dict[Tuple[str, int], torch.Tensor] = {}
    misses = 0
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the demo's small maps trip size hints
            both = method_maps(name, model, x)
        row = []
        for target in (0, 1):
            maps[name, target] = both[target]
            r, c = peak(both[target])
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
    parser.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                        help="methods to run, comma- or space-separated (default: all)")
    args = parser.parse_args(argv)
    names = [n.strip() for v in args.methods for n in v.split(",") if n.strip()]
    if names != ["all"]:
        unknown = [n for n in names if n not in METHODS]
        if unknown or not names:
            parser.error(f"--methods: unknown name(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(METHODS)} (or all)")
    run(args.save, None if names == ["all"] else names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
