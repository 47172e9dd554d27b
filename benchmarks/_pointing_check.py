"""Quick pointing-game check of the embedded benchmark (private helper, not the benchmark itself).

Runs a handful of attribution methods on the first ``--images`` test images of
:class:`~torchray_like.benchmark.embedded_data.EmbeddedShapes` with the embedded models and
prints the pointing-game accuracy (all / difficult) of each, to check that the data set and
models reproduce the published ordering of methods (Zhang et al. 2016; Fong et al. 2019)::

    python benchmarks/_pointing_check.py --model embedded-vgg --images 150
    python benchmarks/_pointing_check.py --methods center,grad_cam,rise --rise-masks 1000

The hit rule is the usual one: the map's maximum (after resizing to the image) is a hit when it
lies within ``15 · 112 / 224 = 7.5`` pixels of a pixel of an object of the class (its visible
mask); accuracy is ``hits / (hits + misses)`` per class, averaged over classes; the difficult
subset keeps the difficult ``(image, class)`` pairs.  This file computes it in a few lines on its
own, independently of the package's pointing-game module.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchray_like.benchmark.embedded_data import (  # noqa: E402
    IMAGE_SIZE, NUM_CLASSES, EmbeddedShapes)
from torchray_like.benchmark.embedded_models import (  # noqa: E402
    EMBEDDED_LAYERS, EMBEDDED_MODELS, EMBEDDED_WEIGHTS, load_embedded_model)

#: Pointing tolerance in pixels: the paper's 15 px at 224 px, scaled to the embedded size.
TOLERANCE = 15.0 * IMAGE_SIZE / 224.0

METHODS = ("center", "gradient", "deconvnet", "guided_backprop", "grad_cam",
           "excitation_backprop", "contrastive_excitation_backprop", "rise",
           "extremal_perturbation")

Pairs = List[Tuple[int, int, bool]]   # (image index, class, difficult)


def collect(n: int, seed: int = 0) -> Tuple[torch.Tensor, Pairs, List[Dict[int, np.ndarray]]]:
    """Images, (image, class, difficult) pairs, and per image the union mask of each class."""
    data = EmbeddedShapes("test", size=n, seed=seed)
    images, pairs, masks = [], [], []
    for i in range(n):
        x, t = data[i]
        images.append(x)
        per_class = {}
        for k, c in enumerate(t["class_ids"].tolist()):
            per_class[c] = t["masks"][t["labels"] == c].any(0).numpy()
            pairs.append((i, c, bool(t["class_difficult"][k])))
        masks.append(per_class)
    return torch.stack(images), pairs, masks


def hit(point: Tuple[float, float], mask: np.ndarray, tol: float = TOLERANCE) -> bool:
    """Whether ``point`` (y, x) is within ``tol`` pixels of a pixel of ``mask``."""
    ys, xs = np.nonzero(mask)
    return bool(((ys - point[0]) ** 2 + (xs - point[1]) ** 2).min() <= tol * tol)


def argmax_point(saliency: torch.Tensor) -> Tuple[int, int]:
    """(y, x) of the maximum of a ``(H, W)`` map (first one on ties)."""
    flat = int(torch.argmax(saliency.reshape(-1)))
    return flat // saliency.shape[-1], flat % saliency.shape[-1]


def score(points: Sequence[Tuple[float, float]], pairs: Pairs,
          masks: List[Dict[int, np.ndarray]]) -> Tuple[float, float]:
    """Mean over classes of the per-class hit rate, on all pairs and on the difficult ones."""
    out = []
    for subset in (False, True):
        hits = np.zeros(NUM_CLASSES)
        total = np.zeros(NUM_CLASSES)
        for (i, c, difficult), p in zip(pairs, points):
            if subset and not difficult:
                continue
            total[c] += 1
            hits[c] += hit(p, masks[i][c])
        keep = total > 0
        out.append(float((hits[keep] / total[keep]).mean()) if keep.any() else float("nan"))
    return out[0], out[1]


def saliency_fn(method: str, name: str, args: argparse.Namespace
                ) -> Callable[[torch.nn.Module, torch.Tensor, List[int]], torch.Tensor]:
    """``(model, x, targets) -> (N, H, W)`` maps at the image size."""
    layers = EMBEDDED_LAYERS[name]
    if method in ("gradient", "deconvnet", "guided_backprop"):
        module = __import__(f"torchray_like.attribution.{method}", fromlist=[method])
        fn = getattr(module, method)
        return lambda m, x, t: fn(m, x, t, resize=True)[:, 0]
    if method == "grad_cam":
        from torchray_like.attribution.grad_cam import grad_cam
        return lambda m, x, t: grad_cam(m, x, t, saliency_layer=layers["grad_cam"],
                                        resize=True)[:, 0]
    if method == "excitation_backprop":
        from torchray_like.attribution.excitation_backprop import excitation_backprop
        return lambda m, x, t: excitation_backprop(
            m, x, t, saliency_layer=layers["excitation_backprop"], resize=True)[:, 0]
    if method == "contrastive_excitation_backprop":
        from torchray_like.attribution.excitation_backprop import (
            contrastive_excitation_backprop)
        return lambda m, x, t: contrastive_excitation_backprop(
            m, x, t, saliency_layer=layers["excitation_backprop"],
            contrast_layer=layers["contrast"], resize=True)[:, 0]
    if method == "rise":
        from torchray_like.attribution.rise import rise

        def run_rise(m, x, t):
            # Multi-label model: average the sigmoid of the class, not a softmax over classes.
            maps = rise(m, x, t, num_masks=args.rise_masks, score="sigmoid", seed=0,
                        batch_size=256, num_cells=7)
            return maps[:, 0]
        return run_rise
    if method == "extremal_perturbation":
        from torchray_like.attribution.extremal_perturbation import extremal_perturbation
        areas = (0.025, 0.05, 0.1, 0.2)
        s = IMAGE_SIZE / 224

        def run_ep(m, x, t):
            masks, _ = extremal_perturbation(
                m, x, t, areas=areas, max_iter=args.ep_iters, step=max(int(round(7 * s)), 1),
                sigma=21 * s, max_blur=20 * s, generator=0)
            # Nested masks: their sum peaks inside the smallest one.
            return masks.view(len(x), len(areas), *x.shape[-2:]).sum(1)
        return run_ep
    raise ValueError(f"unknown method {method!r}")


def load(name: str, weights: Optional[str]) -> torch.nn.Module:
    if weights is None:
        return load_embedded_model(name)
    path = os.path.join(weights, EMBEDDED_WEIGHTS[name][0])
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return load_embedded_model(name, path=path, sha256=digest)


def run(name: str, methods: Sequence[str], args: argparse.Namespace) -> Dict[str, Tuple]:
    model = load(name, args.weights)
    for p in model.parameters():
        p.requires_grad_(False)
    images, pairs, masks = collect(args.images)
    n_difficult = sum(d for _, _, d in pairs)
    print(f"{name}: {args.images} images, {len(pairs)} (image, class) pairs, "
          f"{n_difficult} difficult; tolerance {TOLERANCE:.1f} px")
    results = {}
    for method in methods:
        start = time.time()
        if method == "center":
            c = (IMAGE_SIZE - 1) / 2
            points = [(c, c)] * len(pairs)
        elif method == "rise":
            # One run per image gives every class's map (the masked forwards are shared).
            from torchray_like.attribution.rise import rise
            maps = torch.cat([rise(model, images[b:b + 8], None, num_masks=args.rise_masks,
                                   score="sigmoid", seed=0, batch_size=256)
                              for b in range(0, len(images), 8)])
            points = [argmax_point(maps[i, c]) for i, c, _ in pairs]
        else:
            fn = saliency_fn(method, name, args)
            pairs_use = pairs
            if method == "extremal_perturbation" and args.ep_pairs < len(pairs):
                pairs_use = pairs[:args.ep_pairs]
            points = []
            bs = args.batch_size if method != "extremal_perturbation" else args.ep_batch
            for b in range(0, len(pairs_use), bs):
                chunk = pairs_use[b:b + bs]
                x = images[[i for i, _, _ in chunk]]
                maps = fn(model, x, [c for _, c, _ in chunk])
                points += [argmax_point(m) for m in maps]
            if len(pairs_use) < len(pairs):
                sub_pairs = pairs_use
                acc = score(points, sub_pairs, masks)
                results[method] = acc
                print(f"  {method:34s} {100 * acc[0]:5.1f} / {100 * acc[1]:5.1f}   "
                      f"({len(pairs_use)} pairs, {time.time() - start:.0f} s)", flush=True)
                continue
        acc = score(points, pairs, masks)
        results[method] = acc
        print(f"  {method:34s} {100 * acc[0]:5.1f} / {100 * acc[1]:5.1f}   "
              f"({time.time() - start:.0f} s)", flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=EMBEDDED_MODELS + ("all",), default="all")
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--methods", default="center,gradient,deconvnet,guided_backprop,"
                        "grad_cam,excitation_backprop,contrastive_excitation_backprop,rise")
    parser.add_argument("--weights", default=None,
                        help="folder of weights to check instead of the shipped ones")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rise-masks", type=int, default=1000)
    parser.add_argument("--ep-iters", type=int, default=150)
    parser.add_argument("--ep-pairs", type=int, default=60)
    parser.add_argument("--ep-batch", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
    if args.images < 1:
        parser.error("--images must be >= 1")
    torch.set_num_threads(args.threads)
    names = EMBEDDED_MODELS if args.model == "all" else (args.model,)
    for name in names:
        run(name, methods, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
