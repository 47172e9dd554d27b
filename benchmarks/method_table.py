r"""Which method when: is each attribution method class-discriminative, does it pass the sanity
checks, what does a map cost — measured on the embedded models (the table of the docs' methods
page, ``docs/methods.rst``).

Usage::

    python benchmarks/method_table.py                        # about a minute on a CPU
    python benchmarks/method_table.py --sanity out/sanity_checks --limit 8 --out out/table
    python benchmarks/method_table.py --methods gradient grad_cam --models embedded-vgg

Columns (every number from this run, except the sanity column, read from a sanity-check run):

**class-discriminative**
    On each of the first ``--limit`` embedded test images that hold two or more classes, the
    method's maps of the first two classes present (one call, the image twice with the two
    targets); ``r`` is the Pearson correlation of the two maps (flattened), averaged over the
    images and the models.  **yes** when ``r < 0.5`` (:data:`DISCRIMINATIVE_BELOW`): the two
    classes' maps differ more than they agree.  A constant map (no correlation defined) is left
    out of the mean ("n/a" when every map was).
**sanity**
    From ``sanity_checks.json`` of ``benchmarks/sanity_checks.py --out DIR`` (``--sanity DIR``,
    default ``./out/sanity_checks``): the Spearman rank correlation of the absolute maps of the
    trained model and of the model whose top layer is re-initialised (cascading randomisation,
    step 1, Adebayo et al. 2018), the worst (highest) over the models.  **passes** when it is
    below 0.5 (:data:`SANITY_BELOW`): the map depends on what the model learnt.  "not run":
    the sanity-check run did not hold the method.
**ms / map**
    CPU milliseconds per map on one thread (the process's CPU time, which a busy machine
    inflates less than the wall clock; on an idle one they agree), per model, from this run,
    after one untimed call; the options are the settings table's, benchmark
    ``"pointing_game"`` (the main job's).

The table is printed as reStructuredText and written to ``OUT/method_table.rst``,
``.csv`` and ``.json``.  Methods that explain transformers only are left out (the embedded
models have no attention).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from torchray_like.attribution.registry import METHODS, TRANSFORMER_ONLY_METHODS  # noqa: E402
from torchray_like.benchmark import embedded_cli  # noqa: E402
from torchray_like.benchmark.runner import positive_int_arg, seed_arg  # noqa: E402
from torchray_like.benchmark.settings import options_table  # noqa: E402

#: Mean correlation of two classes' maps under which a method is class-discriminative.
DISCRIMINATIVE_BELOW = 0.5
#: Rank correlation with the top-layer-randomised model's map under which a method passes.
SANITY_BELOW = 0.5
DEFAULT_METHODS = tuple(m for m in METHODS if m not in TRANSFORMER_ONLY_METHODS)
DEFAULT_MODELS = ("embedded-vgg", "embedded-resnet")
#: Methods whose options take a seed (``generator``) and a progress flag.
_SEEDED = ("rise", "extremal_perturbation", "smooth_grad")


def two_class_images(count: int) -> List[Tuple[torch.Tensor, List[int]]]:
    """The first ``count`` embedded test images holding two or more classes, with the first
    two classes present."""
    from torchray_like.benchmark.embedded_data import EmbeddedShapes

    data = EmbeddedShapes("test")
    out = []
    for index in range(len(data)):
        x, label = data[index]
        classes = [int(c) for c in label["class_ids"].tolist()]
        if len(classes) >= 2:
            out.append((x, classes[:2]))
        if len(out) == count:
            break
    return out


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps (flattened); NaN when either is constant."""
    a = a.detach().double().flatten()
    b = b.detach().double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def measure(model: torch.nn.Module, name: str, methods: Sequence[str],
            images: Sequence[Tuple[torch.Tensor, List[int]]], seed: int = 0
            ) -> Dict[str, Dict[str, float]]:
    """Per method: mean correlation of the two classes' maps and milliseconds per map."""
    options = options_table(methods, name, "pointing_game")
    out = {}
    for method in methods:
        kwargs = dict(options[method])
        if method in _SEEDED:
            kwargs.update(generator=seed, progress=False)
        correlations, seconds = [], 0.0
        for k, (x, classes) in enumerate(images):
            batch = x[None].expand(2, *x.shape).contiguous()
            if k == 0:  # a first call pays one-time set-up (lazy imports, caches): untimed
                METHODS[method](model, batch, classes, **kwargs)
            start = time.process_time()
            maps = METHODS[method](model, batch, classes, **kwargs)
            seconds += time.process_time() - start
            maps = maps[0] if isinstance(maps, tuple) else maps
            correlations.append(correlation(maps[0], maps[1]))
        finite = [c for c in correlations if math.isfinite(c)]
        out[method] = {"r": float(np.mean(finite)) if finite else float("nan"),
                       "ms": 1000.0 * seconds / (2 * len(images))}
    return out


def sanity_scores(folder: Optional[str]) -> Dict[str, float]:
    """Method -> the highest ``rank|top`` over the models of ``folder/sanity_checks.json``
    (empty when there is none)."""
    if not folder:
        return {}
    path = os.path.join(folder, "sanity_checks.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        summary = json.load(f).get("summary", [])
    worst: Dict[str, float] = {}
    for row in summary:
        value = row.get("rank|top")
        if isinstance(value, (int, float)) and math.isfinite(value):
            worst[row["method"]] = max(worst.get(row["method"], -1.0), float(value))
    return worst


def make_rows(measured: Mapping[str, Mapping[str, Mapping[str, float]]],
              sanity: Mapping[str, float], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per method: ``r``, ``discriminative``, ``sanity_rank``, ``sanity``, and
    ``ms|<model>`` per model."""
    rows = []
    for method in methods:
        rs = [m[method]["r"] for m in measured.values() if math.isfinite(m[method]["r"])]
        r = float(np.mean(rs)) if rs else float("nan")
        rank = sanity.get(method, float("nan"))
        row: Dict[str, Any] = {
            "method": method, "r": r,
            "discriminative": "n/a" if not rs else (
                "yes" if r < DISCRIMINATIVE_BELOW else "no"),
            "sanity_rank": rank,
            "sanity": "not run" if not math.isfinite(rank) else (
                "passes" if rank < SANITY_BELOW else "fails")}
        for model, per_method in measured.items():
            row[f"ms|{model}"] = per_method[method]["ms"]
        rows.append(row)
    return rows


def _number(value: Any, digits: str) -> str:
    return "n/a" if not isinstance(value, float) or not math.isfinite(value) \
        else format(value, digits)


def rst_table(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> str:
    """The rows as a reStructuredText ``list-table``."""
    header = ["method", "class-discriminative (r)", "sanity (rank, top layer)"] \
        + [f"ms / map, {m}" for m in models]
    lines = [".. list-table::", "   :header-rows: 1", ""]
    body = [header] + [[
        f"``{r['method']}``", f"{r['discriminative']} ({_number(r['r'], '.2f')})",
        f"{r['sanity']} ({_number(r['sanity_rank'], '.2f')})"]
        + [_number(r[f"ms|{m}"], ".1f") for m in models] for r in rows]
    for cells in body:
        lines.append(f"   * - {cells[0]}")
        lines += [f"     - {c}" for c in cells[1:]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="method_table.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                        help="embedded models, comma- or space-separated (default: "
                             "%(default)s)")
    parser.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                        help="methods (default: all but the transformer-only ones)")
    parser.add_argument("--limit", type=positive_int_arg, default=4, metavar="N",
                        help="test images with two classes or more (default: %(default)s)")
    parser.add_argument("--sanity", default=os.path.join(".", "out", "sanity_checks"),
                        metavar="DIR", help="folder of a sanity-check run's sanity_checks.json "
                                            "(default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(".", "out", "method_table"),
                        metavar="DIR", help="folder of the outputs (default: %(default)s)")
    parser.add_argument("--seed", type=seed_arg, default=0,
                        help="seed of RISE, extremal perturbation and SmoothGrad")
    parser.add_argument("--reuse", action="store_true",
                        help="measure nothing: take the correlations and costs of "
                             "OUT/method_table.json and only read the sanity run again")
    return parser


def _json_clean(value: Any) -> Any:
    """NaN and infinities become null: standard JSON."""
    if isinstance(value, Mapping):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_outputs(out: str, rows: Sequence[Mapping[str, Any]], models: Sequence[str],
                  meta: Mapping[str, Any]) -> str:
    """``method_table.rst`` / ``.csv`` / ``.json`` in ``out``; returns the RST text."""
    os.makedirs(out, exist_ok=True)
    text = rst_table(rows, models)
    with open(os.path.join(out, "method_table.rst"), "w") as f:
        f.write(text + "\n")
    columns = ["method", "r", "discriminative", "sanity_rank", "sanity"] \
        + [f"ms|{m}" for m in models]
    with open(os.path.join(out, "method_table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "method_table.json"), "w") as f:
        json.dump(_json_clean({**meta, "rows": list(rows)}), f, indent=2)
    return text


def _measure_all(models: Sequence[str], methods: Sequence[str], count: int, seed: int
                 ) -> Tuple[Dict[str, Dict[str, Dict[str, float]]], int]:
    """:func:`measure` on every model, one thread (restored), the methods' warnings muted
    (they are the benchmarks' business); also the number of images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the costs are per CPU thread
    try:
        images = two_class_images(count)
        measured = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in models:
                model, _ = embedded_cli.load_benchmark_model(name, None)
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                measured[name] = measure(model, name, methods, images, seed)
    finally:
        torch.set_num_threads(threads)
    return measured, len(images)


def _reused(parser: argparse.ArgumentParser, out: str, models: Sequence[str],
            methods: Sequence[str]) -> Tuple[Dict[str, Dict[str, Dict[str, float]]], int]:
    """The measurements of ``out/method_table.json`` (``--reuse``)."""
    path = os.path.join(out, "method_table.json")
    try:
        with open(path) as f:
            data = json.load(f)
        measured = {m: {k: {q: float("nan") if v is None else float(v) for q, v in r.items()}
                        for k, r in data["measured"][m].items() if k in methods}
                    for m in models}
        images = int(data["images"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"--reuse: no usable measurements in {path} ({error}); run without "
                     "--reuse first")
    missing = [m for m in methods if any(m not in measured[k] for k in models)]
    if missing:
        parser.error(f"--reuse: {path} lacks {', '.join(missing)}; run without --reuse")
    return measured, images


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        models = embedded_cli.name_list(args.models, DEFAULT_MODELS, "--models")
        methods = embedded_cli.name_list(args.methods, DEFAULT_METHODS, "--methods")
    except ValueError as error:
        parser.error(str(error))
    if args.reuse:
        measured, images = _reused(parser, args.out, models, methods)
    else:
        measured, images = _measure_all(models, methods, args.limit, args.seed)
    sanity = sanity_scores(args.sanity)
    rows = make_rows(measured, sanity, methods)
    meta = {"command": " ".join(["method_table.py"] + list(sys.argv[1:] if argv is None
                                                             else argv)),
            "images": images, "models": list(models), "measured": measured,
            "discriminative_below": DISCRIMINATIVE_BELOW, "sanity_below": SANITY_BELOW,
            "sanity_source": os.path.join(args.sanity, "sanity_checks.json") if sanity
            else None}
    print(write_outputs(args.out, rows, models, meta))
    if not sanity:
        print(f"(no sanity_checks.json under {args.sanity}: run benchmarks/sanity_checks.py "
              "--out DIR and pass --sanity DIR for the sanity column)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
