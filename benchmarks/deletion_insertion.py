"""Deletion and insertion (Petsiuk et al. 2018) of every attribution method, embedded benchmark.

Usage::

    python benchmarks/deletion_insertion.py                       # a few minutes on a CPU
    python benchmarks/deletion_insertion.py --limit 100 --steps 224 --full
    python benchmarks/deletion_insertion.py --methods gradient grad_cam random --limit 20
    torchrun --nproc_per_node=4 benchmarks/deletion_insertion.py --limit 200 --resume
    python benchmarks/deletion_insertion.py --from-store          # tables from stored results

For each embedded model (``embedded-vgg``, ``embedded-resnet``, trained on the procedurally
generated data set of :mod:`torchray_like.benchmark.embedded_data`), each of the first
``--limit`` test images and each method of the registry (plus a seeded random map), the map of
the image's most confident ground-truth class is computed, then:

* **deletion**: pixels are replaced by zeros (the mean colour: the images are normalised), most
  salient first, ``--steps`` steps; the class probability is recorded after each step;
* **deletion to the blur**: the same, but pixels are replaced by those of a Gaussian-blurred
  copy of the image (σ = ``--blur-sigma``, by default 1/16 of the image side).  The embedded
  classes are shapes, and a constant fill keeps an object's outline: a model may still see the
  shape in the hole (see docs/benchmarks.rst);
* **insertion**: pixels are copied, in the same order, into the blurred copy.

The table gives the mean area under each curve (trapezoid rule on ``[0, 1]``; deletion: lower is
better, insertion: higher is better) with its 95 % bootstrap interval over images
(:mod:`torchray_like.benchmark.intervals`; ``*`` marks a zero-width one), and the seconds per
image the method took to make its map.  Each method is then compared with the random map on the
same images (a paired bootstrap of the AUC improvement): better, worse or not resolved.
Every method runs with the options of :mod:`torchray_like.benchmark.settings` (benchmark
``"deletion_insertion"``: RISE and extremal perturbation with reduced counts, printed;
``--full`` for the papers').
The embedded models were trained multi-label (one sigmoid per class): the probability recorded
is the sigmoid by default (``--score softmax`` for the softmax over the classes, as in the
paper's single-label setting).

Outputs under ``--out``: ``deletion_insertion.csv`` (the table, with the ``_low`` / ``_high``
interval columns), ``deletion_insertion_comparisons.csv`` (against the random map),
``deletion_insertion.json`` (settings, table, comparisons, mean curves),
``deletion_insertion_curves.png`` (mean curves per model and game) and the results store
(``--resume`` continues an interrupted run; under ``torchrun`` the work is sharded over the
processes).  ``--docs`` also saves the figure as
``docs/_static/deletion_insertion_curves.png``.
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

from torchray_like.attribution.maps import MAX_KERNEL_RADIUS  # noqa: E402
from torchray_like.attribution.registry import METHODS, TRANSFORMER_ONLY_METHODS  # noqa: E402
from torchray_like.benchmark import embedded_cli, runner  # noqa: E402
from torchray_like.benchmark.deletion_insertion import (  # noqa: E402
    default_blur_sigma,
    deletion_insertion,
    method_saliency,
    step_fractions,
)
from torchray_like.benchmark.embedded_data import IMAGE_SIZE  # noqa: E402
from torchray_like.benchmark.intervals import (  # noqa: E402
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Interval,
    mean_interval,
    paired_mean_difference,
    verdict,
)
from torchray_like.benchmark.settings import describe_options  # noqa: E402

EXPERIMENT = "deletion_insertion/embedded"
ALL_METHODS = ("random",) + tuple(METHODS)
#: The default: every method but those that explain transformers only (the embedded CNNs
#: have no attention: they refuse them).
DEFAULT_METHODS = tuple(m for m in ALL_METHODS if m not in TRANSFORMER_ONLY_METHODS)
DOCS_FIGURE = os.path.join(ROOT, "docs", "_static", "deletion_insertion_curves.png")
# The widest blur whose kernel (cut at 4σ, scipy's rule) the library makes.
MAX_BLUR_SIGMA = MAX_KERNEL_RADIUS // 4 - 1

#: The games played for every map: name -> (mode, substrate).  Deletion to zeros is the paper's;
#: deletion to the blurred image is reported beside it because a constant fill keeps an
#: object's outline, which a shape classifier can still recognise.
GAMES = {"deletion": ("deletion", "zero"), "deletion_blur": ("deletion", "blur"),
         "insertion": ("insertion", "blur")}
GAME_TITLES = {"deletion": "deletion (to zeros)", "deletion_blur": "deletion (to the blur)",
               "insertion": "insertion (into the blur)"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deletion_insertion.py", description=__doc__.splitlines()[0],
        epilog="See the module docstring (python -m pydoc benchmarks/deletion_insertion.py) for "
               "the protocol.")
    parser.add_argument("--steps", type=runner.positive_int_arg, default=64,
                        help="steps per curve (step = ceil(pixels / steps)); the paper's is "
                             "224 (default: %(default)s)")
    parser.add_argument("--score", choices=("sigmoid", "softmax"), default="sigmoid",
                        help="class probability recorded (the embedded models are multi-label; "
                             "default: %(default)s)")
    parser.add_argument("--blur-sigma", type=float, default=None,
                        help="σ in pixels of the insertion canvas's blur (default: side / 16)")
    parser.add_argument("--batch-size", type=runner.positive_int_arg, default=65,
                        help="perturbed images per forward pass (default: %(default)s)")
    parser.add_argument("--full", action="store_true",
                        help="the papers' settings for RISE (4000 masks) and extremal "
                             "perturbation (800 iterations)")
    parser.add_argument("--docs", action="store_true",
                        help=f"also save the figure as {os.path.relpath(DOCS_FIGURE, ROOT)}")
    embedded_cli.add_embedded_arguments(parser, "deletion_insertion", ALL_METHODS,
                                        DEFAULT_METHODS, limit=8)
    args = embedded_cli.parse_embedded_arguments(parser, argv, ALL_METHODS)
    if args.blur_sigma is not None and not (args.blur_sigma >= 0 and math.isfinite(
            args.blur_sigma)):
        parser.error(f"--blur-sigma must be a non-negative number, got {args.blur_sigma}")
    if args.blur_sigma is not None and args.blur_sigma > MAX_BLUR_SIGMA:
        parser.error(f"--blur-sigma must be at most {MAX_BLUR_SIGMA:g} px (a wider blur is "
                     f"constant over any image), got {args.blur_sigma:g}")
    return args


def method_kwargs(method: str, model_name: str, args: argparse.Namespace,
                  image: int) -> Dict[str, Any]:
    """The options of one method call (printed in the header, stored in the config)."""
    if method == "random":
        return {"seed": args.seed + image}
    return embedded_cli.script_options(
        method, model_name, "paper" if args.full else "deletion_insertion", args)


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Everything the records depend on (the store refuses to mix runs that differ)."""
    pixels = IMAGE_SIZE * IMAGE_SIZE
    return {
        "models": list(args.models), "methods": list(args.methods),
        "weights": embedded_cli.weights_label(args),
        "split": "test", "score": args.score, "steps": args.steps,
        "step_pixels": math.ceil(pixels / args.steps),
        "games": {g: {"mode": m, "substrate": sub} for g, (m, sub) in GAMES.items()},
        "insertion_canvas_blur_sigma": (default_blur_sigma((IMAGE_SIZE, IMAGE_SIZE))
                                        if args.blur_sigma is None else args.blur_sigma),
        "seed": args.seed,
        "method_kwargs": {m: {n: method_kwargs(m, n, args, 0) for n in args.models}
                          for m in args.methods if m != "random"},
    }


class Worker(embedded_cli.EmbeddedWorker):
    """Computes one record per ``(model, image, method)``; models and targets are cached."""

    freeze = True

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        super().__init__(args, device)
        self.step = math.ceil(IMAGE_SIZE * IMAGE_SIZE / args.steps)

    def __call__(self, item: tuple) -> Dict[str, Any]:
        name, index, method = item
        model, x, target = self.image(name, index)
        kw = method_kwargs(method, name, self.args, index)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        saliency = method_saliency(method, model, x, [target], **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        record: Dict[str, Any] = {"model": name, "method": method, "image": index,
                                  "target": target, "seconds": seconds}
        for game, (mode, substrate) in GAMES.items():
            curve, auc = deletion_insertion(
                model, x, saliency, [target], mode=mode, substrate=substrate, step=self.step,
                score=self.args.score, batch_size=self.args.batch_size,
                blur_sigma=self.args.blur_sigma)
            record[f"{game}_auc"] = float(auc[0])
            record[f"{game}_curve"] = [float(v) for v in curve[0]]
        return record


def summarize(records: List[Dict[str, Any]], models: Sequence[str],
              methods: Sequence[str], seed: int = 0) -> List[Dict[str, Any]]:
    """One row per (model, method): mean AUCs with their 95 % bootstrap intervals over images
    (``<game>_auc_low`` / ``_high``, :mod:`torchray_like.benchmark.intervals`, seeded by
    ``seed``), their standard errors, seconds per image and the mean curves."""
    rows = []
    for model in models:
        for method in methods:
            rs = sorted((r for r in records if r["model"] == model and r["method"] == method),
                        key=lambda r: r["image"])
            if not rs:
                continue
            row: Dict[str, Any] = {"method": method, "model": model, "images": len(rs)}
            for game in GAMES:
                v = np.array([r[f"{game}_auc"] for r in rs])
                row.update(mean_interval(v, seed=seed).as_dict(f"{game}_auc"))
                row[f"{game}_sem"] = (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1
                                      else float("nan"))
            row["s_per_img"] = float(np.mean([r["seconds"] for r in rs]))
            for game in GAMES:
                row[f"{game}_curve"] = np.mean([r[f"{game}_curve"] for r in rs], 0).tolist()
            rows.append(row)
    return rows


def compare_with_random(records: List[Dict[str, Any]], models: Sequence[str],
                        methods: Sequence[str], seed: int = 0) -> List[Dict[str, Any]]:
    """Per model, method and game: the paired bootstrap (images both ran on) of the method's
    improvement over the random map — ``random - method`` for deletion (lower is better),
    ``method - random`` for insertion — and whether it is ``better`` (interval above 0),
    ``worse`` (below), ``not resolved`` or on ``too few images``."""
    out = []
    for model in models:
        base = {r["image"]: r for r in records if r["model"] == model and r["method"] == "random"}
        for method in methods:
            mine = {r["image"]: r for r in records
                    if r["model"] == model and r["method"] == method and method != "random"}
            shared = sorted(set(base) & set(mine))
            if not shared:
                continue
            for game, (mode, _) in GAMES.items():
                a = [mine[i][f"{game}_auc"] for i in shared]
                b = [base[i][f"{game}_auc"] for i in shared]
                d = paired_mean_difference(*((b, a) if mode == "deletion" else (a, b)),
                                           seed=seed)
                out.append({"model": model, "better": method, "worse": "random",
                            "metric": game, **d.as_dict("difference"), "images": d.n,
                            "verdict": verdict(d, "better", "worse")})
    return out


def _auc_cell(row: Dict[str, Any], key: str) -> str:
    interval = Interval(row[key], row[f"{key}_low"], row[f"{key}_high"], row["images"],
                        degenerate=row[f"{key}_low"] == row[f"{key}_high"])
    return interval.format(digits=3)


def print_comparisons(comparisons: Sequence[Dict[str, Any]]) -> str:
    """Per model and game: which methods beat the random map significantly, which not."""
    lines = ["against the random map (paired 95 % bootstrap of the AUC improvement over the "
             "images):"]
    for model in dict.fromkeys(c["model"] for c in comparisons):
        for game in GAMES:
            mine = [c for c in comparisons if c["model"] == model and c["metric"] == game]
            groups = {v: [c["better"] for c in mine if c["verdict"] == v]
                      for v in ("better", "not resolved", "worse", "too few images")}
            lines.append(f"  {model} {game}: better {len(groups['better'])} of {len(mine)}"
                         + "".join(f"; {v}: {', '.join(groups[v])}"
                                   for v in ("not resolved", "worse", "too few images")
                                   if groups[v]))
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], models: Sequence[str], fractions: np.ndarray,
         paths: Sequence[str], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(GAMES), figsize=(15, 3.4 * len(models)),
                             squeeze=False,
                             sharex=True, sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in
               enumerate(m for m in methods if m != "random")}
    for r_i, model in enumerate(models):
        for c_i, game in enumerate(GAMES):
            ax = axes[r_i][c_i]
            for row in rows:
                if row["model"] != model:
                    continue
                m = row["method"]
                style = ({"color": "black", "linestyle": "--", "linewidth": 2} if m == "random"
                         else {"color": colours[m], "linewidth": 1.3})
                ax.plot(fractions, row[f"{game}_curve"],
                        label=" / ".join([m] + [f"{row[f'{g}_auc']:.3f}" for g in GAMES]),
                        **style)
            ax.set_title(f"{model}: {GAME_TITLES[game]}", fontsize=10)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if c_i == len(GAMES) - 1:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                          title="method / AUC: deletion (zeros, blur) / insertion",
                          title_fontsize=7.5)
            if r_i == len(models) - 1:
                ax.set_xlabel("fraction of pixels deleted / inserted")
            if c_i == 0:
                ax.set_ylabel("class probability")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(args: argparse.Namespace, config: Dict[str, Any],
                  records: List[Dict[str, Any]], wall: Optional[float]) -> List[Dict[str, Any]]:
    models = [m for m in config["models"] if any(r["model"] == m for r in records)]
    rows = summarize(records, models, config["methods"], seed=config["seed"])
    comparisons = compare_with_random(records, models, config["methods"], seed=config["seed"])
    table = [{k: v for k, v in r.items() if not k.endswith("_curve")} for r in rows]
    shown = [{**r, **{f"{g}_auc": _auc_cell(r, f"{g}_auc") for g in GAMES}} for r in table]
    print(runner.format_table(shown, ["method", "model", "images"]
                              + [f"{g}_auc" for g in GAMES] + ["s_per_img"],
                              {"s_per_img": ".3f"}))
    print("(AUC [95 % bootstrap interval over images]; * zero width: every image alike)")
    if comparisons:
        print(print_comparisons(comparisons))
    csv_path = embedded_cli.write_csv(os.path.join(args.out, "deletion_insertion.csv"), table)
    embedded_cli.write_csv(os.path.join(args.out, "deletion_insertion_comparisons.csv"),
                           comparisons)
    fractions = step_fractions(IMAGE_SIZE * IMAGE_SIZE, config["step_pixels"]).numpy()
    intervals = {"method": "percentile bootstrap over images; differences paired on the "
                           "images both methods ran on", "level": DEFAULT_LEVEL,
                 "resamples": DEFAULT_RESAMPLES, "seed": config["seed"]}
    with open(os.path.join(args.out, "deletion_insertion.json"), "w") as f:
        json.dump({"settings": config, "fractions": fractions.tolist(), "rows": rows,
                   "comparisons": comparisons, "intervals": intervals,
                   "wall_seconds": wall}, f, indent=1)
    figures = [os.path.join(args.out, "deletion_insertion_curves.png")]
    if args.docs:
        figures.append(DOCS_FIGURE)
    n = max((r["images"] for r in rows), default=0)
    plot(rows, models, fractions, figures,
         f"Deletion and insertion (blur σ={config['insertion_canvas_blur_sigma']:g} px) "
         f"on the embedded test set, {n} images, {config['steps']} steps, "
         f"{config['score']} probability")
    print(f"wrote {csv_path}, deletion_insertion.json and {', '.join(figures)}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    return embedded_cli.with_threads(run, parse_args(argv))


def announce(args: argparse.Namespace, config: Dict[str, Any], worker: "Worker",
             world_size: int, device: torch.device) -> None:
    """Print the settings (rank 0)."""
    print(f"deletion/insertion: models {', '.join(args.models)}; {args.limit} test "
          f"images; {len(args.methods)} methods; {world_size} process(es) on {device}")
    print(f"  steps {args.steps} ({config['step_pixels']} px each); deletion to zeros "
          f"and to the blurred image, insertion into it (blur σ="
          f"{config['insertion_canvas_blur_sigma']:g} px); {args.score} probability of "
          "the most confident present class")
    for name in args.models:
        print(f"  {name}, options (torchray_like.benchmark.settings):")
        print("\n".join(describe_options({m: options[name] for m, options
                                          in config["method_kwargs"].items()})))


def run(args: argparse.Namespace) -> int:
    return embedded_cli.run_benchmark(args, EXPERIMENT, settings, Worker, announce,
                                      write_outputs, "deletion/insertion")


if __name__ == "__main__":
    sys.exit(main())
