"""Sanity checks (Adebayo et al. 2018): model randomisation of the embedded models.

Usage::

    python benchmarks/sanity_checks.py                            # 4 images: minutes on a CPU
    python benchmarks/sanity_checks.py --limit 20 --methods gradient guided_backprop grad_cam
    python benchmarks/sanity_checks.py --methods extremal_perturbation --ep-iters 100
    torchrun --nproc_per_node=4 benchmarks/sanity_checks.py --limit 100 --resume
    python benchmarks/sanity_checks.py --from-store               # tables from stored results

For each embedded model, each of the first ``--limit`` test images (explaining its most
confident ground-truth class) and each method, the map of the trained model is compared with
the maps of randomised copies of it:

* **cascading**: the convolution and linear layers are re-initialised from the top (logits)
  down, one more at each step, until all are random;
* **independent**: one layer at a time is re-initialised, the others trained.

Similarities (:func:`torchray_like.benchmark.sanity_checks.compare_maps`): Spearman rank
correlation of the absolute maps and of the signed maps, SSIM, and the Spearman correlation of
HOG features.  A method that explains the model loses similarity as soon as the top layers are
random; the paper finds gradient and Grad-CAM do, guided backprop and guided Grad-CAM do not.

The table gives, per method and model, the similarity after randomising the top layer only
(cascading step 1), the top two, and every layer, the lowest similarity over the independent
randomisations, and the seconds per image of the whole test.  Outputs under ``--out``:
``sanity_checks.csv`` (mean similarity per model, method, mode and step),
``sanity_checks.json``, ``sanity_checks_cascading.png`` and
``sanity_checks_independent.png`` (similarity versus layer) and the results store.  ``--docs``
also saves the figures under ``docs/_static/``.  Extremal perturbation is left out by default
(hundreds of optimisation steps for each of the ~20 randomised models per image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torchray_like.attribution.registry import METHODS  # noqa: E402
from torchray_like.benchmark import embedded_cli, runner  # noqa: E402
from torchray_like.benchmark.sanity_checks import (  # noqa: E402
    METRICS, MODES, randomization_layers, sanity_checks)
from torchray_like.benchmark.settings import describe_options  # noqa: E402

EXPERIMENT = "sanity_checks/embedded"
DEFAULT_METHODS = tuple(m for m in METHODS if m != "extremal_perturbation")
DOCS_DIR = os.path.join(ROOT, "docs", "_static")
METRIC_LABELS = {"spearman_abs": "Spearman |map|", "spearman": "Spearman (signed)",
                 "ssim": "SSIM", "hog": "Spearman of HOG"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sanity_checks.py", description=__doc__.splitlines()[0],
        epilog="See the module docstring (python -m pydoc benchmarks/sanity_checks.py) for "
               "the protocol.")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES,
                        help="randomisation modes (default: both)")
    parser.add_argument("--score", choices=("sigmoid", "softmax"), default="sigmoid",
                        help="RISE's class score, and the choice of the explained class "
                             "(default: %(default)s; the embedded models are multi-label)")
    parser.add_argument("--docs", action="store_true",
                        help="also save the figures under docs/_static/")
    embedded_cli.add_embedded_arguments(parser, "sanity_checks", tuple(METHODS),
                                        DEFAULT_METHODS, limit=4)
    return embedded_cli.parse_embedded_arguments(parser, argv, tuple(METHODS))


def method_kwargs(method: str, model_name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """The options of one method (the same masks / seed for every randomised model)."""
    return embedded_cli.script_options(method, model_name, "sanity_checks", args)


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    return {
        "models": list(args.models), "methods": list(args.methods), "modes": list(args.modes),
        "weights": embedded_cli.weights_label(args), "split": "test",
        "score": args.score, "seed": args.seed,
        "reinit": "module.reset_parameters() under a per-layer seed",
        "layers": "convolutions and linear layers, top down",
        "method_kwargs": {m: {n: method_kwargs(m, n, args) for n in args.models}
                          for m in args.methods},
    }


class Worker(embedded_cli.EmbeddedWorker):
    """One record per ``(model, image, method)``: every mode's similarity curves."""

    def __call__(self, item: tuple) -> Dict[str, Any]:
        name, index, method = item
        model, x, target = self.image(name, index)
        start = time.perf_counter()
        out: Dict[str, Any] = {"model": name, "method": method, "image": index,
                               "target": target}
        for mode in self.args.modes:
            records = sanity_checks(model, x, [target], method, mode=mode, seed=self.args.seed,
                                    method_kwargs=method_kwargs(method, name, self.args))
            out["layers"] = [r["layer"] for r in records]
            out[mode] = {m: [_json_float(r[m]) for r in records] for m in METRICS}
        out["seconds"] = time.perf_counter() - start
        return out


def _json_float(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else float(v)


def summarize(records: List[Dict[str, Any]], config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Mean (ignoring undefined values) and count per (model, method, mode, step)."""
    rows = []
    for model in config["models"]:
        for method in config["methods"]:
            rs = [r for r in records if r["model"] == model and r["method"] == method]
            if not rs:
                continue
            for mode in config["modes"]:
                for step, layer in enumerate(rs[0]["layers"]):
                    row: Dict[str, Any] = {"model": model, "method": method, "mode": mode,
                                           "step": step, "layer": layer, "images": len(rs)}
                    for m in METRICS:
                        v = np.array([r[mode][m][step] for r in rs
                                      if r[mode][m][step] is not None], dtype=float)
                        row[m] = float(v.mean()) if v.size else float("nan")
                        row[m + "_std"] = float(v.std()) if v.size else float("nan")
                    row["s_per_img"] = float(np.mean([r["seconds"] for r in rs]))
                    rows.append(row)
    return rows


def headline(rows: List[Dict[str, Any]], config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per (method, model): cascading similarity after the top layer, two layers, all."""
    out = []
    for model in config["models"]:
        for method in config["methods"]:
            casc = [r for r in rows if r["model"] == model and r["method"] == method
                    and r["mode"] == "cascading"]
            indep = [r for r in rows if r["model"] == model and r["method"] == method
                     and r["mode"] == "independent" and r["step"] > 0]
            if not casc and not indep:
                continue
            row: Dict[str, Any] = {"method": method, "model": model}
            if casc:
                last = len(casc) - 1
                row.update({
                    "images": casc[0]["images"],
                    "rank|top": casc[1]["spearman_abs"], "ssim|top": casc[1]["ssim"],
                    "hog|top": casc[1]["hog"],
                    "rank|top2": casc[min(2, last)]["spearman_abs"],
                    "rank|all": casc[last]["spearman_abs"], "ssim|all": casc[last]["ssim"],
                })
            if indep:
                row["rank|indep.min"] = min(r["spearman_abs"] for r in indep)
            row["s_per_img"] = (casc or indep)[0]["s_per_img"]
            out.append(row)
    return out


def plot(rows: List[Dict[str, Any]], config: Dict[str, Any], mode: str,
         paths: Sequence[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in config["models"] if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(len(models), len(METRICS),
                             figsize=(3.3 * len(METRICS) + 2.6, 3.3 * len(models)),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for r_i, model in enumerate(models):
        for c_i, metric in enumerate(METRICS):
            ax = axes[r_i][c_i]
            layers: List[str] = []
            for k, method in enumerate(config["methods"]):
                rs = [r for r in rows if r["model"] == model and r["method"] == method
                      and r["mode"] == mode]
                if not rs:
                    continue
                layers = [r["layer"] for r in rs]
                ax.plot(range(len(rs)), [r[metric] for r in rs], marker="o", markersize=3,
                        color=cmap(k % 10), label=method, linewidth=1.3)
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(layers, rotation=90, fontsize=6)
            ax.axhline(0, color="grey", linewidth=0.6)
            lows = [r[metric] for r in rows if r["model"] == model and r["mode"] == mode
                    and math.isfinite(r[metric])]
            ax.set_ylim(min([-0.6 if metric != "ssim" else -0.1] + [v - 0.05 for v in lows]),
                        1.05)
            ax.grid(alpha=0.3)
            ax.set_title(f"{model}: {METRIC_LABELS[metric]}", fontsize=9)
    what = ("layers randomised from the top down (cumulative)" if mode == "cascading"
            else "one layer randomised at a time")
    fig.suptitle(f"Sanity checks, {mode} randomisation: similarity to the original map "
                 f"({what})", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="method",
               title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(args: argparse.Namespace, config: Dict[str, Any],
                  records: List[Dict[str, Any]], wall: Optional[float]) -> None:
    rows = summarize(records, config)
    head = headline(rows, config)
    cols = ["method", "model", "images", "rank|top", "ssim|top", "hog|top", "rank|top2",
            "rank|all", "ssim|all", "rank|indep.min", "s_per_img"]
    print(runner.format_table(head, [c for c in cols if any(c in r for r in head)],
                              {"s_per_img": ".2f", "images": "d"}))
    csv_path = embedded_cli.write_csv(os.path.join(args.out, "sanity_checks.csv"), rows)
    with open(os.path.join(args.out, "sanity_checks.json"), "w") as f:
        json.dump({"settings": config, "summary": head, "rows": rows, "wall_seconds": wall},
                  f, indent=1)
    written = [csv_path, "sanity_checks.json"]
    for mode in config["modes"]:
        paths = [os.path.join(args.out, f"sanity_checks_{mode}.png")]
        if args.docs:
            paths.append(os.path.join(DOCS_DIR, f"sanity_checks_{mode}.png"))
        plot(rows, config, mode, paths)
        written += paths
    print("wrote " + ", ".join(written))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return embedded_cli.with_threads(run, parse_args(argv))


def announce(args: argparse.Namespace, config: Dict[str, Any], worker: "Worker",
             world_size: int, device: torch.device) -> None:
    """Print the settings and the layers randomised, top down (rank 0)."""
    print(f"sanity checks: models {', '.join(args.models)}; {args.limit} test images; "
          f"{len(args.methods)} methods; modes {', '.join(args.modes)}; "
          f"{world_size} process(es) on {device}")
    x = worker.data[0][0][None].to(device)
    for name in args.models:
        layers = randomization_layers(worker.model(name), x)
        print(f"  {name}: {len(layers)} layers, top down: {', '.join(layers)}")
    for name in args.models:
        print(f"  {name}, options (torchray_like.benchmark.settings):")
        print("\n".join(describe_options({m: config["method_kwargs"][m][name]
                                          for m in args.methods})))


def run(args: argparse.Namespace) -> int:
    return embedded_cli.run_benchmark(args, EXPERIMENT, settings, Worker, announce,
                                      write_outputs, "sanity checks")


if __name__ == "__main__":
    sys.exit(main())
