"""Draw the figure of ``docs/lrp.rst``: every LRP composite on the same embedded test images.

Usage::

    python docs/figures_lrp.py                 # writes docs/_static/lrp_composites.png
    python docs/figures_lrp.py --model embedded-resnet --out /tmp/lrp.png

One row per test image (seed 0, the first class present in it), one column per composite of
:data:`~torchray_like.attribution.lrp.LRP_METHODS`, with gradient × input beside them (LRP-0 on
a ReLU network is gradient × input: the composites differ from it by their rules only).  Each
map has its own colour scale (red: most relevance for the class; negative relevance, where a
rule gives it, at the blue end).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import torch  # noqa: E402

from torchray_like.attribution.registry import METHODS  # noqa: E402
from torchray_like.benchmark.embedded_data import (  # noqa: E402
    EMBEDDED_CLASSES,
    EMBEDDED_MEAN,
    EMBEDDED_STD,
    EmbeddedShapes,
)
from torchray_like.benchmark.embedded_models import load_embedded_model  # noqa: E402
from torchray_like.visualize import plot_methods  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_static", "lrp_composites.png")
COLUMNS = ("gradient_x_input", "lrp", "lrp_epsilon_plus", "lrp_epsilon_alpha2_beta1",
           "lrp_epsilon_gamma_box")


def images(count: int):
    """The first ``count`` embedded test images, their first class and its name."""
    data = EmbeddedShapes("test", size=count, seed=0)
    xs, classes = [], []
    for i in range(count):
        x, ann = data[i]
        xs.append(x)
        classes.append(int(ann["labels"][0]))
    return torch.stack(xs), classes, [EMBEDDED_CLASSES[c] for c in classes]


def lrp_figure(path: str = OUT, model_name: str = "embedded-vgg", count: int = 4) -> str:
    """Write the composites figure for ``count`` images to ``path``; return the path."""
    model = load_embedded_model(model_name).eval()
    x, classes, names = images(count)
    maps = {name: METHODS[name](model, x, classes) for name in COLUMNS}
    fig = plot_methods(x, maps, row_titles=names,
                       denormalize=(EMBEDDED_MEAN, EMBEDDED_STD))
    fig.savefig(path, dpi=55, bbox_inches="tight")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded-vgg",
                        help="embedded model (default: %(default)s)")
    parser.add_argument("--count", type=int, default=4, help="images (default: %(default)s)")
    parser.add_argument("--out", default=OUT, help="output PNG (default: %(default)s)")
    args = parser.parse_args(argv)
    start = time.time()
    path = lrp_figure(args.out, args.model, args.count)
    print(f"wrote {path} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
