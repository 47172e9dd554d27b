"""Make the figures of ``docs/plotting.rst`` (PNG files in ``docs/_static/``).

Run from anywhere: ``python docs/figures_plotting.py`` (``--out DIR`` writes them elsewhere).
The inputs and saliency maps are synthetic (shapes on a smooth background, maps centred on the
shapes), seeded, so the figures do not depend on a trained model nor on the attribution methods.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")  # headless

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from torchray_like.benchmark.plot import plot_example  # noqa: E402
from torchray_like.utils import imarraysc, imsmooth, xmkdir  # noqa: E402
from torchray_like.visualize import plot_methods, saliency_plot  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_static")
SIZE = 64


def _grid(size: int):
    coords = torch.arange(size, dtype=torch.float32)
    return torch.meshgrid(coords, coords, indexing="ij")


def synthetic_images(n: int = 4, size: int = SIZE):
    """``n`` RGB images, each a disc or a square on a colour gradient, and their centres."""
    g = torch.Generator().manual_seed(0)
    yy, xx = _grid(size)
    images, centres = [], []
    for i in range(n):
        background = torch.stack([0.2 + 0.5 * xx / size, 0.3 + 0.4 * yy / size,
                                  torch.full_like(xx, 0.6)])
        cy, cx = (torch.rand(2, generator=g) * 0.5 + 0.25) * size
        radius = size * 0.16
        if i % 2 == 0:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
        else:
            inside = ((yy - cy).abs() < radius) & ((xx - cx).abs() < radius)
        colour = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.4
        images.append(torch.where(inside, colour, background * 0.7))
        centres.append((float(cy), float(cx)))
    return torch.stack(images), centres


def blobs(centres, size: int = SIZE, sigma: float = 8.0):
    """One Gaussian bump per image, centred on its object: shape ``(N, 1, size, size)``."""
    yy, xx = _grid(size)
    maps = [torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
            for cy, cx in centres]
    return torch.stack(maps).unsqueeze(1)


def fake_methods(x, centres):
    """Three maps with the look of gradient, Grad-CAM (7×7) and RISE saliency."""
    g = torch.Generator().manual_seed(1)
    grey = x.mean(1, keepdim=True)
    # Gradient-like: sharp, concentrated on edges, speckled.
    edges = (grey - imsmooth(grey, 1.0, padding_mode="replicate")).abs()
    speckle = 0.5 + torch.rand(grey.shape, generator=g)
    gradient = edges * speckle * (0.3 + blobs(centres, sigma=14))
    # Grad-CAM-like: coarse, one cell per 9 × 9 pixels.
    grad_cam = torch.nn.functional.adaptive_avg_pool2d(blobs(centres, sigma=10), 7)
    # RISE-like: smooth and wide, with low-frequency noise.
    noise = imsmooth(torch.rand(grey.shape, generator=g), 6.0, padding_mode="replicate")
    rise = blobs(centres, sigma=16) + 0.5 * noise
    return {"gradient": gradient, "grad_cam": grad_cam, "rise": rise}


def synthetic_signals(n: int = 2, length: int = 200):
    """Two-channel signals with a burst; the map is the burst's envelope."""
    g = torch.Generator().manual_seed(2)
    t = torch.arange(length, dtype=torch.float32)
    xs, maps = [], []
    for i in range(n):
        centre = 60.0 + 80.0 * i
        envelope = torch.exp(-((t - centre) ** 2) / (2 * 10.0 ** 2))
        base = torch.stack([torch.sin(t / 9.0), 0.5 * torch.cos(t / 23.0)])
        burst = torch.stack([2.0 * envelope * torch.sin(t * 0.9), -envelope])
        xs.append(base + burst + 0.05 * torch.randn(2, length, generator=g))
        maps.append(envelope + 0.05 * torch.rand(length, generator=g))
    return torch.stack(xs), torch.stack(maps).unsqueeze(1)


def synthetic_video(frames: int = 6, size: int = 48):
    """A disc moving left to right; the map follows it at a quarter of the resolution."""
    yy, xx = _grid(size)
    video, maps = [], []
    for f in range(frames):
        cx = 8.0 + (size - 16.0) * f / (frames - 1)
        inside = ((yy - size / 2) ** 2 + (xx - cx) ** 2 < 7.0 ** 2).float()
        video.append(torch.stack([0.2 + 0.7 * inside, 0.3 + 0.2 * inside, 0.5 - 0.3 * inside]))
        maps.append(torch.exp(-((yy - size / 2) ** 2 + (xx - cx) ** 2) / (2 * 6.0 ** 2)))
    x = torch.stack(video, dim=1).unsqueeze(0)  # (1, 3, T, H, W)
    s = torch.nn.functional.avg_pool2d(torch.stack(maps).unsqueeze(1), 4)  # (T, 1, 12, 12)
    return x, s.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 1, T, 12, 12): resized when plotted


def main(argv: Optional[List[str]] = None) -> None:
    """Write the figures (into ``docs/_static``, or the folder given with ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT,
                        help="folder for the PNG files (default: %(default)s)")
    folder = parser.parse_args(argv).out
    xmkdir(folder)
    torch.manual_seed(0)
    x, centres = synthetic_images()
    written = []

    def out(name):
        path = os.path.join(folder, name)
        written.append(path)
        return path

    # Inputs, ImageNet-normalised as a model would see them, shown with denormalize.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normed = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    names = ["disc", "square"] * 2
    saliency_plot(normed, blobs(centres), denormalize=(mean, std), titles=names,
                  save=out("plotting_images.png"))

    maps = fake_methods(x, centres)
    plot_methods(x[:2], {name: m[:2] for name, m in maps.items()}, row_titles=names[:2],
                 save=out("plotting_methods.png"))

    signals, signal_maps = synthetic_signals()
    saliency_plot(signals, signal_maps, save=out("plotting_signals.png"))

    video, video_maps = synthetic_video()
    # Frames share one colour scale (the default for volumes): one colour bar for the montage.
    saliency_plot(video, video_maps, slice="all", titles=["disc"],
                  save=out("plotting_volume.png"))

    plot_example(normed[1:2], maps["grad_cam"][1:2], "grad_cam", 1,
                 class_names=["disc", "square"], save_path=out("plotting_example.png"))

    fig = plt.figure(figsize=(3, 3), dpi=100)
    imarraysc(x, spacing=2)
    plt.axis("off")
    fig.savefig(out("plotting_mosaic.png"))
    plt.close(fig)

    for path in written:
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
