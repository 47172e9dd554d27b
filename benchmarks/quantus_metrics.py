r"""Quantus metrics of every attribution method on the embedded models.

Usage::

    python benchmarks/quantus_metrics.py                  # 8 images, both models: minutes
    python benchmarks/quantus_metrics.py --methods gradient grad_cam rise --limit 16
    python benchmarks/quantus_metrics.py --metrics sparseness mprt --out out/quantus

Quantus 0.6 (``pip install quantus``; an optional dependency) scores the maps of each method,
served to it by :func:`torchray_like.benchmark.quantus.explain` (its ``explain_func``), on the
first ``--limit`` embedded test images, each explained for its first class:

``faithfulness_correlation`` (Bhatt et al. 2020; higher is better)
    the correlation between the attribution summed over random pixel subsets (64 pixels,
    replaced by black) and the drop of the class score, over 20 subsets per image;
``max_sensitivity`` (Yeh et al. 2019; lower is better)
    the largest change of the map (relative norm) over 5 uniformly perturbed copies of the
    input (radius 0.2);
``sparseness`` (Chalasani et al. 2020; higher is sparser)
    the Gini index of the absolute map;
``mprt`` (Adebayo et al. 2018; lower is better: the map depends on the model)
    Quantus's model-parameter randomisation test: the Spearman correlation of the absolute,
    normalised map with that of the model whose top layer is randomised.

Each number is the mean over images with its 95 % bootstrap interval over images
(:mod:`torchray_like.benchmark.intervals`; undefined values — a constant map's correlation —
are left out and counted).  Every method runs with the options of
:mod:`torchray_like.benchmark.settings` (benchmark ``"sanity_checks"``: RISE with 200 masks,
extremal perturbation 100 iterations; each metric explains the batch again several times, so
extremal perturbation is left out by default).  Outputs: ``OUT/quantus_metrics.csv`` and
``.json`` (``python benchmarks/report.py`` shows them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torchray_like.attribution.registry import METHODS  # noqa: E402
from torchray_like.benchmark import embedded_cli, runner  # noqa: E402
from torchray_like.benchmark.embedded_models import EMBEDDED_MODELS  # noqa: E402
from torchray_like.benchmark.intervals import (  # noqa: E402
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Interval,
    mean_interval,
)
from torchray_like.benchmark.quantus import QUANTUS_HINT, explain  # noqa: E402
from torchray_like.benchmark.settings import method_options  # noqa: E402

#: Metric name -> (Quantus class name, constructor options, better: "higher" / "lower").
METRICS: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "faithfulness_correlation": ("FaithfulnessCorrelation",
                                 {"nr_runs": 20, "subset_size": 64, "return_aggregate": False},
                                 "higher"),
    "max_sensitivity": ("MaxSensitivity", {"nr_samples": 5, "lower_bound": 0.2}, "lower"),
    "sparseness": ("Sparseness", {}, "higher"),
    "mprt": ("MPRT", {}, "lower"),
}
DEFAULT_METHODS = tuple(m for m in METHODS if m != "extremal_perturbation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantus_metrics.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["all"], metavar="MODEL",
                        help=f"embedded models, among {', '.join(EMBEDDED_MODELS)} (default: "
                             "all)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help="methods, comma- or space-separated, or all (default: all but "
                             "extremal_perturbation)")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), metavar="METRIC",
                        help=f"among {', '.join(METRICS)} (default: all)")
    parser.add_argument("--limit", type=runner.positive_int_arg, default=8, metavar="N",
                        help="the first N embedded test images (default: %(default)s)")
    embedded_cli.add_model_arguments(parser)
    parser.add_argument("--device", type=runner.device_arg, default="cpu",
                        help="device (default: %(default)s)")
    parser.add_argument("--seed", type=runner.seed_arg, default=0,
                        help="seed of Quantus's perturbations and of the bootstrap "
                             "(default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(".", "out", "quantus_metrics"),
                        metavar="DIR", help="output folder (default: %(default)s)")
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace,
                                                       argparse.ArgumentParser]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.models = embedded_cli.name_list(args.models, EMBEDDED_MODELS, "--models")
        args.methods = embedded_cli.name_list(args.methods, tuple(METHODS), "--methods")
        args.metrics = embedded_cli.name_list(args.metrics, tuple(METRICS), "--metrics")
    except ValueError as error:
        parser.error(str(error))
    try:
        args.device = str(torch.device(args.device))
    except (RuntimeError, ValueError):
        parser.error(f"--device: not a device: {args.device!r} (cpu, cuda, cuda:N)")
    embedded_cli.check_weights(parser, args, args.models)
    return args, parser


def batch(limit: int) -> Tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` embedded test images (float32, channels first) and their first
    classes."""
    from torchray_like.benchmark.embedded_data import EmbeddedShapes

    data = EmbeddedShapes("test", size=limit)
    items = [data[i] for i in range(limit)]
    x = np.stack([item[0].numpy() for item in items]).astype(np.float32)
    y = np.array([int(item[1]["class_ids"][0]) for item in items], dtype=np.int64)
    return x, y


def per_image(quantus: Any, metric: str, model: torch.nn.Module, x: np.ndarray, y: np.ndarray,
              kwargs: Dict[str, Any], device: str, seed: int) -> np.ndarray:
    """One value per image of ``metric`` (NaN where undefined)."""
    name, options, _ = METRICS[metric]
    # Quantus draws its perturbations from NumPy's global generator (and MPRT seeds torch's):
    # seeded here for a reproducible table, and both restored afterwards.
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            np.random.seed(seed)
            score = getattr(quantus, name)(disable_warnings=True, **options)(
                model=model, x_batch=x, y_batch=y, explain_func=explain,
                explain_func_kwargs=kwargs, device=device)
    finally:
        np.random.set_state(state)
    if isinstance(score, dict):  # MPRT: layer -> values; the first randomised layer
        layers = [k for k in score if k != "original"]
        score = score[layers[0]]
    values = np.asarray(score, dtype=np.float64).reshape(-1)
    return np.where(np.isfinite(values), values, np.nan)


def evaluate(quantus: Any, args: argparse.Namespace, model: torch.nn.Module, name: str,
             x: np.ndarray, y: np.ndarray) -> List[Dict[str, Any]]:
    """One row per method: each metric's mean with its interval and the images defined."""
    rows = []
    for method in args.methods:
        kwargs = {"method": method, **method_options(method, name, "sanity_checks")}
        if method in ("rise", "extremal_perturbation"):
            kwargs["generator"] = args.seed
        row: Dict[str, Any] = {"method": method, "model": name, "images": len(x)}
        start = time.perf_counter()
        for metric in args.metrics:
            values = per_image(quantus, metric, model, x, y, kwargs, args.device, args.seed)
            row.update(mean_interval(values, seed=args.seed).as_dict(metric))
            row[f"{metric}_defined"] = int(np.isfinite(values).sum())
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"  {name} {method}: {row['seconds']:.1f} s", flush=True)
    return rows


def _cell(row: Dict[str, Any], metric: str) -> str:
    value = row[metric]
    if value is None or not math.isfinite(value):
        return "-"
    interval = Interval(value, row[f"{metric}_low"], row[f"{metric}_high"],
                        row[f"{metric}_defined"],
                        degenerate=row[f"{metric}_low"] == row[f"{metric}_high"])
    defined = row[f"{metric}_defined"]
    return interval.format(digits=2) + ("" if defined == row["images"] else f" ({defined})")


def print_table(rows: Sequence[Dict[str, Any]], metrics: Sequence[str]) -> str:
    header = [f"{m} ({METRICS[m][2]} better)" for m in metrics]
    shown = [{"method": r["method"], "model": r["model"], "images": r["images"],
              **{h: _cell(r, m) for h, m in zip(header, metrics)}} for r in rows]
    return (runner.format_table(shown, ["method", "model", "images"] + header)
            + "\n(mean [95 % bootstrap interval over images]; (k): only k images defined)")


def write(args: argparse.Namespace, rows: List[Dict[str, Any]], wall: float,
          version: str) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = embedded_cli.write_csv(os.path.join(args.out, "quantus_metrics.csv"), rows)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in r.items()} for r in rows]
    settings = {"quantus": version, "limit": args.limit, "models": args.models,
                "methods": args.methods, "weights": embedded_cli.weights_label(args),
                "metrics": {m: {"quantus": METRICS[m][0], **METRICS[m][1],
                                "better": METRICS[m][2]} for m in args.metrics},
                "options_benchmark": "sanity_checks", "seed": args.seed,
                "command": " ".join(["quantus_metrics.py"] + sys.argv[1:])}
    intervals = {"method": "percentile bootstrap over images", "level": DEFAULT_LEVEL,
                 "resamples": DEFAULT_RESAMPLES, "seed": args.seed}
    with open(os.path.join(args.out, "quantus_metrics.json"), "w") as f:
        json.dump({"settings": settings, "rows": clean, "intervals": intervals,
                   "wall_seconds": wall}, f, indent=1)
    print(f"wrote {path} and {os.path.join(args.out, 'quantus_metrics.json')}")


def import_quantus() -> Any:
    """Quantus, or ``None`` with :data:`~torchray_like.benchmark.quantus.QUANTUS_HINT`
    printed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import quantus
    except ImportError:
        print(f"quantus_metrics.py: {QUANTUS_HINT}", file=sys.stderr)
        return None
    return quantus


def run(args: argparse.Namespace, parser: argparse.ArgumentParser,
        load: Callable[[], Any] = import_quantus) -> int:
    quantus = load()
    if quantus is None:
        return 1
    start = time.time()
    x, y = batch(args.limit)
    print(f"Quantus {quantus.__version__}: metrics {', '.join(args.metrics)}; "
          f"{len(args.methods)} methods; {args.limit} test images; models "
          f"{', '.join(args.models)}", flush=True)
    rows = []
    for name in args.models:
        try:
            model, _ = embedded_cli.load_benchmark_model(name, args.weights_of[name], args.seed)
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            parser.error(f"--models {name}: {error} (pass --weights random)")
        model = model.eval().to(args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Quantus warns on every call
            rows += evaluate(quantus, args, model, name, x, y)
    print(print_table(rows, args.metrics))
    write(args, rows, time.time() - start, quantus.__version__)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, parser = parse_args(argv)
    return embedded_cli.with_threads(lambda a: run(a, parser), args)


if __name__ == "__main__":
    sys.exit(main())
