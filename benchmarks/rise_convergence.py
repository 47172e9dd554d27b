"""How many RISE masks are enough? The stopping rule ``num_masks="auto"`` against 8000 masks.

For the first ``--limit`` test images of the embedded benchmark and one embedded model, RISE
maps (Petsiuk et al. 2018) are computed with the fixed default (8000 masks, TorchRay's), two
fixed counts (1000, 2000), and the stopping rule (``rise(..., num_masks="auto", tol=t)``, the
rule is this library's: control variates on the masks' cells and a stop once every map's
estimated correlation with its converged map is at least ``1 - tol``; see
``torchray_like/attribution/rise_stopping.py``).  The stopping rule runs once per
(image, ground-truth class) with that class as the target, and once per image with
``target=None`` (every class; the rule then waits for the maps with at least half the image's
strongest signal).  Per setting, over the (image, ground-truth class) maps:

* the masks used (mean, median and largest) and the time per call,
* the Pearson correlation with the 8000-mask map of the same seed (median and smallest) — the
  issue's yardstick, itself a Monte-Carlo estimate with its own noise,
* the correlation with the *converged proxy*: the control-variate estimate from the same 8000
  masks (``tol`` below reach, so it runs to the cap), the best estimate of the infinite-mask
  map this run has (its own estimated correlation with the limit is printed),
* the pointing-game accuracy (Zhang et al. 2016; 15 px at 224 px, scaled),

and, with ``--independent``, the same against the two maps of the next seed, which share no
mask with the run (so a noisy 8000-mask map shows as two 8000-mask maps that disagree).

Run with no arguments (about 6 minutes per model on one CPU thread; ``--device cuda`` on a
GPU)::

    python benchmarks/rise_convergence.py
    python benchmarks/rise_convergence.py --model embedded-vgg --limit 24 --tols 0.03,0.02
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchray_like.attribution.rise import DEFAULT_NUM_MASKS, DEFAULT_TOL, rise  # noqa: E402
from torchray_like.benchmark import embedded_cli  # noqa: E402
from torchray_like.benchmark.embedded_data import IMAGE_SIZE, NUM_CLASSES, EmbeddedShapes  # noqa: E402
from torchray_like.benchmark.embedded_models import EMBEDDED_MODELS  # noqa: E402
from torchray_like.benchmark.pointing_game import PointingGame, saliency_to_point  # noqa: E402
from torchray_like.benchmark.runner import (  # noqa: E402
    device_arg,
    positive_int_arg,
    seed_arg,
    threads_arg,
)


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


def _call(model: torch.nn.Module, x: torch.Tensor, target: Optional[int], seed: int,
          kwargs: Dict) -> Tuple[torch.Tensor, Any]:
    """One call; the maps of every class ``(K, H, W)`` or of the target ``(1, H, W)``."""
    out, info = rise(model, x, target, seed=seed, return_info=True, **kwargs)
    return out[0].cpu(), info


Maps = Dict[Tuple[int, int], torch.Tensor]


def _references(model: torch.nn.Module, x: torch.Tensor, pairs: List[Tuple[int, int]],
                seed: int, independent: bool) -> Tuple[Dict[str, Maps], List[float]]:
    """The yardsticks, per (image, class) pair: the plain 8000-mask map ("8000") and the
    control-variate estimate of the same masks ("proxy"); with ``independent``, the same two
    from the next seed ("8000'", "proxy'").  Also the proxy's estimated correlations."""
    seeds = {"": seed, "'": seed + 1} if independent else {"": seed}
    refs: Dict[str, Maps] = {}
    rho: List[float] = []
    for mark, s in seeds.items():
        plain = [_call(model, x[i:i + 1], None, s, {})[0] for i in range(x.shape[0])]
        proxy = []
        for i in range(x.shape[0]):
            maps, info = _call(model, x[i:i + 1], None, s, {"num_masks": "auto", "tol": 1e-9})
            proxy.append(maps)
            if not mark:   # the run's own seed
                rho += [info.correlation[c] for i2, c in pairs if i2 == i]
        refs["8000" + mark] = {(i, c): plain[i][c] for i, c in pairs}
        refs["proxy" + mark] = {(i, c): proxy[i][c] for i, c in pairs}
    return refs, rho


def _against(got: Maps, refs: Dict[str, Maps]) -> Dict[str, Tuple[float, float]]:
    """(median, min) of the correlation of each map with each yardstick."""
    out = {}
    for name, ref in refs.items():
        r = torch.stack([correlation(got[p][None], ref[p][None])[0] for p in ref])
        out[name] = (float(r.median()), float(r.min()))
    return out


def run(model: torch.nn.Module, x: torch.Tensor, labels: List[dict],
        settings: Sequence[Tuple[str, Dict]], seed: int, independent: bool = False
        ) -> Tuple[List[Dict], Dict]:
    """One row per setting over the (image, ground-truth class) pairs, and the yardsticks
    against each other.  Settings whose kwargs hold ``per_class=True`` run once per pair with
    the class as the target; the others once per image with every class."""
    pairs = [(i, c) for i, label in enumerate(labels) for c in label["class_ids"].tolist()]
    refs, proxy_rho = _references(model, x, pairs, seed, independent)
    rows: List[Dict] = []
    for name, kwargs in tqdm(settings, desc="settings", unit="setting"):
        kwargs = dict(kwargs)
        per_class = kwargs.pop("per_class", False)
        got: Maps = {}
        used: List[int] = []
        seconds = 0.0
        for i in range(x.shape[0]):
            for t in (labels[i]["class_ids"].tolist() if per_class else [None]):
                maps, info = _call(model, x[i:i + 1], t, seed, kwargs)
                used.append(info.num_masks)
                seconds += info.seconds
                for c in labels[i]["class_ids"].tolist():
                    if t is None or t == c:
                        got[i, c] = maps[0 if per_class else c]
        full = torch.zeros(x.shape[0], NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE)
        for (i, c), m in got.items():
            full[i, c] = m
        u = torch.tensor(used, dtype=torch.float64)
        rows.append({"setting": name, "masks_mean": float(u.mean()),
                     "masks_median": float(u.median()), "masks_max": int(u.max()),
                     "against": _against(got, refs), "pointing": pointing(full, labels),
                     "s_per_call": seconds / len(used)})
    rho = torch.tensor(proxy_rho)
    cross = {f"{a} vs {b}": _against(refs[a], {b: refs[b]})[b]
             for a, b in (("8000", "proxy"), ("8000", "8000'"), ("proxy", "proxy'"))
             if b in refs}
    return rows, {"cross": cross, "proxy_rho": (float(rho.median()), float(rho.min())),
                  "pairs": len(pairs), "yardsticks": list(refs)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-resnet", choices=EMBEDDED_MODELS,
                        help="the embedded model (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int_arg, default=8, metavar="N",
                        help="the first N test images (default: %(default)s)")
    parser.add_argument("--tols", default="0.015",
                        help="comma-separated tolerances of num_masks='auto' (1 - the "
                             "correlation to reach; default %(default)s), run per class")
    parser.add_argument("--autocast", action="store_true",
                        help="add the default tolerance with bfloat16 forward passes (per class)")
    parser.add_argument("--independent", action="store_true",
                        help="also measure against the 8000-mask maps (plain and converged "
                             "proxy) of the next seed: yardsticks that share no mask")
    parser.add_argument("--threads", type=threads_arg, default=1,
                        help="torch.set_num_threads for the run (default: %(default)s)")
    parser.add_argument("--seed", type=seed_arg, default=0,
                        help="RISE's seed (default 0)")
    parser.add_argument("--device", type=device_arg, default="cpu",
                        help="torch device (default cpu)")
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
    if not all(0.0 < t <= 1.0 for t in tols):
        parser.error(f"--tols: each tolerance must be in (0, 1], got {args.tols!r}")
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
    settings += [(f"auto tol={t:g} target", {"num_masks": "auto", "tol": t, "per_class": True})
                 for t in tols]
    settings.append((f"auto tol={DEFAULT_TOL:g} all", {"num_masks": "auto"}))
    if args.autocast:
        settings.append((f"auto tol={DEFAULT_TOL:g} target bf16",
                         {"num_masks": "auto", "per_class": True, "autocast": torch.bfloat16}))
    print(f"RISE on {args.limit} embedded test images, {args.model}, seed {args.seed}; "
          "over the (image, ground-truth class) maps")
    rows, refs = run(model, x, labels, settings, args.seed, args.independent)
    print(f"{refs['pairs']} maps.  Yardsticks against each other (median / min): "
          + "; ".join(f"{k} {m:.4f} / {n:.4f}" for k, (m, n) in refs["cross"].items())
          + "; the proxy's estimated correlation with the limit: "
          f"{refs['proxy_rho'][0]:.4f} / {refs['proxy_rho'][1]:.4f}")
    yard = refs["yardsticks"]
    head = (f"{'setting':<26} {'masks mean':>10} {'median':>6} {'max':>5} "
            + " ".join(f"{'vs ' + y + ' med':>14} {'min':>6}" for y in yard)
            + f" {'pointing':>8} {'s/call':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        cols = " ".join(f"{r['against'][y][0]:>14.4f} {r['against'][y][1]:>6.4f}" for y in yard)
        print(f"{r['setting']:<26} {r['masks_mean']:>10.0f} {r['masks_median']:>6.0f} "
              f"{r['masks_max']:>5d} {cols} {100 * r['pointing']:>7.1f}% "
              f"{r['s_per_call']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
