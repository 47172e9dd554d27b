"""How many RISE masks are enough? The stopping rule ``num_masks="auto"`` against 8000 masks.

For the first ``--limit`` test images of the embedded benchmark and one embedded model, RISE
maps of every class are computed with the fixed default (8000 masks, TorchRay's) and with the
stopping rule at several tolerances (``rise(..., num_masks="auto", tol=t)``, Petsiuk et al. 2018
for RISE; the rule is this library's).  For each setting the table gives

* the masks used (mean and largest over the images) and the time,
* the correlation of each image's ground-truth class maps with the 8000-mask maps (mean and
  smallest; the same random stream, so the 8000-mask map is the limit the run is heading to),
* the pointing-game accuracy (Zhang et al. 2016; the embedded benchmark's 15 px at 224 px,
  scaled to the image size) over the images' (image, class) pairs,

plus two fixed counts (1000 and 2000 masks) for reference, and optionally ``--autocast`` to add
bfloat16 forward passes.  Run with no arguments (about 5 minutes on a 2-core CPU; ``--device
cuda`` on a GPU)::

    python benchmarks/rise_convergence.py
    python benchmarks/rise_convergence.py --model embedded-vgg --limit 24 --tols 0.1,0.05
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchray_like.attribution.rise import DEFAULT_NUM_MASKS, rise  # noqa: E402
from torchray_like.benchmark import embedded_cli  # noqa: E402
from torchray_like.benchmark.embedded_data import IMAGE_SIZE, NUM_CLASSES, EmbeddedShapes  # noqa: E402
from torchray_like.benchmark.embedded_models import EMBEDDED_MODELS  # noqa: E402
from torchray_like.benchmark.pointing_game import PointingGame, saliency_to_point  # noqa: E402
from torchray_like.benchmark.runner import positive_int_arg  # noqa: E402


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of maps (flattened over their last dimensions)."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-30)


def pointing(maps: torch.Tensor, labels: List[dict]) -> float:
    """Pointing-game accuracy of ``(N, K, H, W)`` maps over the images' ground-truth classes."""
    game = PointingGame(NUM_CLASSES, tolerance=15 * IMAGE_SIZE / 224)
    for i, label in enumerate(labels):
        for c in label["class_ids"].tolist():
            mask = label["masks"][label["labels"] == c].any(0)
            point = saliency_to_point(maps[i, c], (IMAGE_SIZE, IMAGE_SIZE))
            game.aggregate(game.evaluate(mask, point), c)
    return game.accuracy


def run(model: torch.nn.Module, x: torch.Tensor, labels: List[dict],
        settings: Sequence[Tuple[str, Dict]], seed: int) -> List[Dict]:
    """One row per setting; each image is explained on its own (the stopping rule is per call)."""
    rows: List[Dict] = []
    reference: Optional[torch.Tensor] = None
    pairs = [(i, c) for i, label in enumerate(labels) for c in label["class_ids"].tolist()]
    for name, kwargs in tqdm(settings, desc="settings", unit="setting"):
        maps, used, seconds = [], [], 0.0
        for i in range(x.shape[0]):
            out, info = rise(model, x[i:i + 1], None, seed=seed, return_info=True, **kwargs)
            maps.append(out)
            used.append(info.num_masks)
            seconds += info.seconds
        all_maps = torch.cat(maps).cpu()
        if reference is None:
            reference = all_maps
        corr = torch.stack([correlation(all_maps[i, c][None], reference[i, c][None])[0]
                            for i, c in pairs])
        rows.append({"setting": name, "masks_mean": sum(used) / len(used),
                     "masks_max": max(used), "corr_mean": float(corr.mean()),
                     "corr_min": float(corr.min()), "pointing": pointing(all_maps, labels),
                     "s_per_image": seconds / x.shape[0]})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-resnet", choices=EMBEDDED_MODELS,
                        help="the embedded model (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int_arg, default=8, metavar="N",
                        help="the first N test images (default: %(default)s)")
    parser.add_argument("--tols", default="0.15,0.1,0.05",
                        help="comma-separated tolerances of num_masks='auto'")
    parser.add_argument("--autocast", action="store_true",
                        help="add the default tolerance with bfloat16 forward passes")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads for the run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="RISE's seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--weights", default=None, metavar="FILE|random",
                        help="a state-dict FILE (e.g. from train_embedded.py) or random "
                             "(untrained, seeded by --seed); omitted: the shipped weights")
    args = parser.parse_args(argv)
    try:
        tols = [float(t) for t in args.tols.split(",") if t]
    except ValueError:
        parser.error(f"--tols: give comma-separated numbers, got {args.tols!r}")
    if not tols:
        parser.error("--tols: give at least one tolerance")
    try:
        model = embedded_cli.load_benchmark_model(args.model, args.weights, args.seed)[0]
    except (ValueError, OSError, RuntimeError) as error:
        parser.error(f"--weights: {error}")
    return embedded_cli.with_threads(lambda a: _run(a, model, tols), args)


def _run(args: argparse.Namespace, model: torch.nn.Module, tols: List[float]) -> int:
    data = EmbeddedShapes("test", size=args.limit, seed=0)
    model = model.to(args.device)
    x = torch.stack([data[i][0] for i in range(args.limit)]).to(args.device)
    labels = [data[i][1] for i in range(args.limit)]
    settings: List[Tuple[str, Dict]] = [(f"fixed {DEFAULT_NUM_MASKS}", {})]
    settings += [(f"fixed {n}", {"num_masks": n}) for n in (1000, 2000)]
    settings += [(f"auto tol={t:g}", {"num_masks": "auto", "tol": t}) for t in tols]
    if args.autocast:
        settings.append((f"auto tol={tols[-1]:g} bf16",
                         {"num_masks": "auto", "tol": tols[-1], "autocast": torch.bfloat16}))
    print(f"RISE on {args.limit} embedded test images, {args.model}, maps of every class, "
          f"seed {args.seed}; correlation and pointing over the ground-truth classes")
    rows = run(model, x, labels, settings, args.seed)
    head = (f"{'setting':<22} {'masks mean':>10} {'max':>6} {'corr mean':>9} {'min':>7} "
            f"{'pointing':>8} {'s/image':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['setting']:<22} {r['masks_mean']:>10.0f} {r['masks_max']:>6d} "
              f"{r['corr_mean']:>9.4f} {r['corr_min']:>7.4f} {100 * r['pointing']:>7.1f}% "
              f"{r['s_per_image']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
