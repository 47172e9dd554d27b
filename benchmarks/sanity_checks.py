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
(cascading step 1), the top two, and every layer (the Spearman columns with their 95 %
bootstrap interval over images, :mod:`torchray_like.benchmark.intervals`), the lowest similarity
over the independent randomisations, and the seconds per image of the whole test; then the
published findings (guided backprop's map survives the randomisation better than the
gradient's, ...) as paired bootstrap differences.  Outputs under ``--out``:
``sanity_checks.csv`` (mean similarity per model, method, mode and step, with the ``_low`` /
``_high`` interval columns),
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

from torchray_like.attribution.registry import METHODS, TRANSFORMER_ONLY_METHODS  # noqa: E402
from torchray_like.benchmark import embedded_cli, runner  # noqa: E402
from torchray_like.benchmark.intervals import (  # noqa: E402
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Interval,
    mean_interval,
    paired_mean_difference,
    verdict,
)
from torchray_like.benchmark.sanity_checks import (  # noqa: E402
    METRICS,
    MODES,
    randomization_layers,
    sanity_checks,
)
from torchray_like.benchmark.settings import describe_options  # noqa: E402

EXPERIMENT = "sanity_checks/embedded"
#: Every method but extremal perturbation (slow) and those that explain transformers only
#: (the embedded CNNs have no attention: they refuse them).
DEFAULT_METHODS = tuple(m for m in METHODS if m != "extremal_perturbation"
                        and m not in TRANSFORMER_ONLY_METHODS)
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


def _values(rs: Sequence[Dict[str, Any]], mode: str, metric: str, step: int) -> np.ndarray:
    """One value per record (image); NaN where the similarity is undefined."""
    return np.array([np.nan if r[mode][metric][step] is None else r[mode][metric][step]
                     for r in rs], dtype=float)


def summarize(records: List[Dict[str, Any]], config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Mean (ignoring undefined values) with its 95 % bootstrap interval over images
    (``<metric>_low`` / ``_high``), standard deviation and count per (model, method, mode,
    step)."""
    rows = []
    for model in config["models"]:
        for method in config["methods"]:
            rs = sorted((r for r in records if r["model"] == model and r["method"] == method),
                        key=lambda r: r["image"])
            if not rs:
                continue
            for mode in config["modes"]:
                for step, layer in enumerate(rs[0]["layers"]):
                    row: Dict[str, Any] = {"model": model, "method": method, "mode": mode,
                                           "step": step, "layer": layer, "images": len(rs)}
                    for m in METRICS:
                        v = _values(rs, mode, m, step)
                        row.update(mean_interval(v, seed=config["seed"]).as_dict(m))
                        row[m + "_std"] = float(np.nanstd(v)) if np.isfinite(v).any() \
                            else float("nan")
                    row["s_per_img"] = float(np.mean([r["seconds"] for r in rs]))
                    rows.append(row)
    return rows


#: (column of the summary, summary row's step, metric) of the headline's columns.
HEADLINE = {"rank|top": (1, "spearman_abs"), "ssim|top": (1, "ssim"), "hog|top": (1, "hog"),
            "rank|top2": (2, "spearman_abs"), "rank|all": (-1, "spearman_abs"),
            "ssim|all": (-1, "ssim")}


def headline(rows: List[Dict[str, Any]], config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per (method, model): cascading similarity after the top layer, two layers, all (with
    their intervals); the lowest over the independent randomisations."""
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
                row["images"] = casc[0]["images"]
                for column, (step, metric) in HEADLINE.items():
                    source = casc[min(step, len(casc) - 1)]
                    row.update({column + k: source[metric + k] for k in ("", "_low", "_high")})
            if indep:
                row["rank|indep.min"] = min(r["spearman_abs"] for r in indep)
            row["s_per_img"] = (casc or indep)[0]["s_per_img"]
            out.append(row)
    return out


#: Published findings on cascading randomisation of the top layer: the first method's map
#: stays closer to the original (Spearman of |map|) than the second's — Adebayo et al. (2018)
#: for guided backprop and guided Grad-CAM, Sixt et al. (2020) for DeConvNet and
#: (non-contrastive) excitation backprop.
PUBLISHED_FINDINGS = (("guided_backprop", "gradient"), ("guided_grad_cam", "grad_cam"),
                      ("deconvnet", "gradient"),
                      ("excitation_backprop", "contrastive_excitation_backprop"))


def compare_published(records: List[Dict[str, Any]], config: Dict[str, Any]
                      ) -> List[Dict[str, Any]]:
    """Paired bootstrap (images both ran on) of rank|top(first) - rank|top(second) for each
    finding of :data:`PUBLISHED_FINDINGS` whose methods ran: ``reproduced`` (interval above
    0), ``reversed`` (below), ``not resolved`` or on ``too few images``."""
    out = []
    if "cascading" not in config["modes"]:
        return out
    for model in config["models"]:
        for first, second in PUBLISHED_FINDINGS:
            a = {r["image"]: r for r in records if r["model"] == model and r["method"] == first}
            b = {r["image"]: r for r in records if r["model"] == model and r["method"] == second}
            shared = sorted(set(a) & set(b))
            if not shared:
                continue
            d = paired_mean_difference(_values([a[i] for i in shared], "cascading",
                                               "spearman_abs", 1),
                                       _values([b[i] for i in shared], "cascading",
                                               "spearman_abs", 1), seed=config["seed"])
            out.append({"model": model, "better": first, "worse": second, "metric": "rank|top",
                        **d.as_dict("difference"), "images": d.n, "verdict": verdict(d)})
    return out


def _cell(row: Dict[str, Any], key: str) -> Any:
    if key + "_low" not in row:
        return row.get(key, "")
    interval = Interval(row[key], row[key + "_low"], row[key + "_high"], row["images"],
                        degenerate=row[key + "_low"] == row[key + "_high"])
    return interval.format(digits=2)


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


#: The columns of the printed summary; the three Spearman columns with their intervals (the
#: files hold the intervals of every column).
PRINTED = ["method", "model", "images", "rank|top", "ssim|top", "hog|top", "rank|top2",
           "rank|all", "ssim|all", "rank|indep.min", "s_per_img"]
WITH_INTERVAL = ("rank|top", "rank|top2", "rank|all")


def write_outputs(args: argparse.Namespace, config: Dict[str, Any],
                  records: List[Dict[str, Any]], wall: Optional[float]) -> None:
    rows = summarize(records, config)
    head = headline(rows, config)
    comparisons = compare_published(records, config)
    shown = [{**r, **{c: _cell(r, c) for c in WITH_INTERVAL if c in r}} for r in head]
    print(runner.format_table(shown, [c for c in PRINTED if any(c in r for r in head)],
                              {"s_per_img": ".2f", "images": "d", "ssim|top": ".2f",
                               "hog|top": ".2f", "ssim|all": ".2f", "rank|indep.min": ".2f"}))
    print("(Spearman of |map| [95 % bootstrap interval over images]; every column's interval "
          "in sanity_checks.csv / .json)")
    if comparisons:
        print("published findings (Adebayo et al. 2018; Sixt et al. 2020): the first map stays "
              "closer to the original after the top layer is randomised; paired 95 % bootstrap "
              "of the difference:")
    for c in comparisons:
        d = Interval(c["difference"], c["difference_low"], c["difference_high"], c["images"],
                     degenerate=c["difference_low"] == c["difference_high"])
        print(f"  {c['model']} rank|top {c['better']} - {c['worse']}: "
              f"{d.format(digits=2, signed=True)} ({c['images']} images) {c['verdict']}")
    csv_path = embedded_cli.write_csv(os.path.join(args.out, "sanity_checks.csv"), rows)
    intervals = {"method": "percentile bootstrap over images; differences paired on the "
                           "images both methods ran on", "level": DEFAULT_LEVEL,
                 "resamples": DEFAULT_RESAMPLES, "seed": config["seed"]}
    with open(os.path.join(args.out, "sanity_checks.json"), "w") as f:
        json.dump({"settings": config, "summary": head, "rows": rows,
                   "comparisons": comparisons, "intervals": intervals, "wall_seconds": wall},
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
