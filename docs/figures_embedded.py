"""Draw the figure of ``docs/embedded.rst``: sample test images of the embedded data set.

Usage::

    python docs/figures_embedded.py            # writes docs/_static/embedded_samples.png

Each panel is one test image (seed 0) with the box and class of every object; difficult objects
have dashed boxes.  The images are upsampled without smoothing so that pixels stay visible.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torchray_like.benchmark.embedded_data import EMBEDDED_CLASSES, EmbeddedShapes  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_static",
                   "embedded_samples.png")


def sample_figure(path: str = OUT, rows: int = 3, cols: int = 6, dpi: int = 80) -> str:
    """Write a ``rows × cols`` grid of annotated test images to ``path``; return the path."""
    data = EmbeddedShapes("test", size=rows * cols, seed=0)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.95 * rows))
    for i, ax in enumerate(axes.flat):
        image, ann = data.raw(i)
        ax.imshow(image, interpolation="nearest")
        for box, label, difficult in zip(ann["boxes"], ann["labels"], ann["difficult"]):
            x1, y1, x2, y2 = box
            ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1,
                                       fill=False, lw=1.2, color="white",
                                       ls="--" if difficult else "-"))
            ax.text(x1, y1 - 1, EMBEDDED_CLASSES[label], fontsize=6.5, color="white",
                    va="bottom", bbox=dict(facecolor="black", alpha=0.7, pad=0.6, lw=0))
        ax.set_title(f"test {i}", fontsize=7, pad=2)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.4)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help=f"output PNG (default {OUT})")
    args = parser.parse_args(argv)
    path = sample_figure(args.out)
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
