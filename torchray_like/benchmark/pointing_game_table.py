r"""The pointing game's table from its records: accuracies with bootstrap intervals, the
published orderings' inputs, the printed table and the CSV / JSON files.

A record is what ``benchmarks/pointing_game.py`` stores per ``(model, method, image)``:
``{"model", "method", "index", "size", "pairs": [[class, all, difficult, [y, x]], ...],
"seconds"}`` with ``all`` / ``difficult`` +1 (hit), -1 (miss) or 0 (not in the subset).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from numbers import Integral
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from ..attribution.arguments import is_number
from . import intervals
from .interval_checks import check_names, check_num_classes, check_pair
from .pointing_game import PointingGame
from .runner import format_table

__all__ = ["make_table", "pairs_of_records", "print_table", "write_outputs", "check_records",
           "RECORD_KEYS", "TABLE_COLUMNS",
           "COMPARISON_COLUMNS"]



#: Where a record's pair holds the hit of each subset: ``[class, all, difficult, point]``.
_SUBSET_COLUMN = {"all": 1, "difficult": 2}


#: The keys :func:`make_table` reads from each record.
RECORD_KEYS = ("model", "method", "index", "pairs", "seconds")


def check_records(records: Any) -> List[Mapping[str, Any]]:
    """``records`` as a list, each a mapping with :data:`RECORD_KEYS`, an int ``index``, a
    finite non-negative ``seconds`` and ``pairs`` of ``[class, all, difficult, point]``; a
    ValueError or TypeError naming the record otherwise (a missing key was a KeyError)."""
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise TypeError(f"records must be a list of the benchmark's records (dicts), got "
                        f"{type(records).__name__}")
    records = list(records)
    for i, r in enumerate(records):
        missing = [k for k in RECORD_KEYS if not isinstance(r, Mapping) or k not in r]
        if missing:
            raise ValueError(f"records[{i}] must be a dict with keys {', '.join(RECORD_KEYS)}; "
                             f"missing {', '.join(missing)}")
        if isinstance(r["index"], bool) or not isinstance(r["index"], Integral):
            # int(1.5) would file the record under image 1, silently.
            raise ValueError(f"records[{i}]['index'] must be an int (the image), got "
                             f"{r['index']!r}")
        if not is_number(r["seconds"]) or not 0 <= r["seconds"] < math.inf:
            raise ValueError(f"records[{i}]['seconds'] must be a finite number >= 0, got "
                             f"{r['seconds']!r}")
        pairs = r["pairs"]
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable) or not all(
                isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 4
                for p in pairs):
            raise ValueError(f"records[{i}]['pairs'] must be a list of [class, all, difficult, "
                             f"point] entries, got {pairs!r:.80}")
    return records


def _check_hits(records: Sequence[Mapping[str, Any]], num_classes: int) -> None:
    """Each pair's class and its two hits, named by record (the game would not say which)."""
    for i, r in enumerate(records):
        for p in r["pairs"]:
            for column in (1, 2):
                check_pair((p[0], p[column]), num_classes, i, "records")


def _by_image(records: Sequence[Mapping[str, Any]], arch: str, method: str
              ) -> Dict[int, Mapping[str, Any]]:
    """``image index -> record`` of ``arch`` and ``method``; an image recorded twice with
    different pairs is refused (which one is right cannot be told), twice alike is kept once."""
    found: Dict[int, Mapping[str, Any]] = {}
    for r in records:
        if r["model"] != arch or r["method"] != method:
            continue
        index = int(r["index"])
        other = found.get(index)
        if other is not None and [tuple(p) for p in other["pairs"]] != \
                [tuple(p) for p in r["pairs"]]:
            raise ValueError(
                f"records: image {index} is recorded twice for model {arch!r} and method "
                f"{method!r}, with different pairs; give each image once (were two runs' "
                "results merged?)")
        found[index] = r
    return found


def _pairs(records: Sequence[Mapping[str, Any]], subset: str) -> List[List[Tuple[int, int]]]:
    """Each image's ``(class, hit)`` pairs of ``subset`` (the bootstrap's input)."""
    k = _SUBSET_COLUMN[subset]
    return [[(int(p[0]), int(p[k])) for p in r["pairs"]] for r in records]


def make_table(records: Sequence[Mapping[str, Any]], num_classes: int,
               models: Sequence[str], methods: Sequence[str], seed: int = 0
               ) -> List[Dict[str, Any]]:
    """One row per (model, method): accuracies on all and difficult pairs with their 95 %
    bootstrap intervals over images (``all_low``, ``all_high`` ...; classes averaged in every
    resample, :mod:`torchray_like.benchmark.intervals`, resamples seeded by ``seed``), seconds
    per image, images and pairs."""
    records = check_records(records)
    models, methods = check_names(models, "models"), check_names(methods, "methods")
    num_classes = check_num_classes(num_classes, 16, "the per-class hit and miss counts")
    _check_hits(records, num_classes)
    rows = []
    for arch in models:
        for method in methods:
            by_image = _by_image(records, arch, method)
            if not by_image:
                continue
            mine = [by_image[i] for i in sorted(by_image)]
            game_all = PointingGame(num_classes)
            game_difficult = PointingGame(num_classes)
            for r in mine:
                for c, in_all, in_difficult, _ in r["pairs"]:
                    game_all.aggregate(in_all, c)
                    game_difficult.aggregate(in_difficult, c)
            row: Dict[str, Any] = {"method": method, "model": arch}
            for subset, game in (("all", game_all), ("difficult", game_difficult)):
                interval = intervals.pointing_game_interval(_pairs(mine, subset), num_classes,
                                                            seed=seed)
                # The game's own accuracy (the same number): the table's reference.
                row.update(interval.as_dict(subset), **{subset: game.accuracy})
            row.update({
                "seconds_per_image": sum(r["seconds"] for r in mine) / len(mine),
                "images": len(mine),
                "pairs": int((game_all.hits + game_all.misses).sum()),
                "difficult_pairs": int((game_difficult.hits + game_difficult.misses).sum()),
            })
            rows.append(row)
    return rows


def pairs_of_records(records: Sequence[Mapping[str, Any]]) -> Any:
    """``(model, method, subset) -> {image: pairs}``, what
    :func:`~torchray_like.benchmark.intervals.compare_orderings` reads."""
    records = check_records(records)

    def pairs_of(arch: str, method: str, subset: str) -> Dict[int, List[Tuple[int, int]]]:
        if subset not in _SUBSET_COLUMN:
            raise ValueError(f"subset must be one of {sorted(_SUBSET_COLUMN)}, got {subset!r}")
        mine = _by_image(records, arch, method)
        return dict(zip(mine, _pairs(list(mine.values()), subset)))

    return pairs_of


def _cell(row: Mapping[str, Any], key: str) -> str:
    interval = intervals.Interval(row[key], row[f"{key}_low"], row[f"{key}_high"],
                                  row["images"], degenerate=row[f"{key}_low"] == row[f"{key}_high"])
    return interval.format(100.0)


def print_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table, accuracies in % with their 95 % intervals ("86.6 [80.1, 92.0]")."""
    _check_rows(rows, TABLE_COLUMNS, "rows")
    shown = [{"method": r["method"], "model": r["model"],
              "all % [95 % CI]": _cell(r, "all"), "difficult % [95 % CI]": _cell(r, "difficult"),
              "s/image": r["seconds_per_image"], "images": r["images"], "pairs": r["pairs"],
              "difficult pairs": r["difficult_pairs"]} for r in rows]
    text = format_table(shown, ["method", "model", "all % [95 % CI]", "difficult % [95 % CI]",
                                "s/image", "images", "pairs", "difficult pairs"],
                        {"s/image": ".3f"})
    if any("*" in row["all % [95 % CI]"] + row["difficult % [95 % CI]"] for row in shown):
        text += "\n* zero width: every image scored alike; the uncertainty is understated"
    return text


def _check_rows(rows: Any, columns: Sequence[str], name: str) -> None:
    """Rows of :func:`make_table` (or comparisons of ``compare_orderings``): a missing column
    was a KeyError, or an empty CSV cell."""
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise TypeError(f"{name} must be a list of dicts, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in columns if not isinstance(row, Mapping) or k not in row]
        if missing:
            raise ValueError(f"{name}[{i}] is missing {', '.join(missing)}; pass the rows "
                             "make_table (or compare_orderings) returns")


def _json_clean(value: Any) -> Any:
    """NaN (no pair in a subset) becomes null: standard JSON."""
    if isinstance(value, dict):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_clean(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


TABLE_COLUMNS = ["method", "model", "all", "all_low", "all_high", "difficult", "difficult_low",
                 "difficult_high", "seconds_per_image", "images", "pairs", "difficult_pairs"]
COMPARISON_COLUMNS = ["model", "subset", "better", "worse", "published", "difference",
                      "difference_low", "difference_high", "images", "verdict"]


def _write_csv(path: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(out: str, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                  comparisons: Sequence[Mapping[str, Any]] = ()) -> Tuple[str, str]:
    """``pointing_game.csv`` (the table, with the interval columns),
    ``pointing_game_comparisons.csv`` (the published orderings) and ``pointing_game.json``
    (both, and ``meta``) in ``out``."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a directory path (str or os.PathLike), got "
                        f"{type(out).__name__}")
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict (written to the JSON file), got "
                        f"{type(meta).__name__}")
    _check_rows(rows, TABLE_COLUMNS, "rows")
    _check_rows(comparisons, COMPARISON_COLUMNS, "comparisons")
    try:  # before any file is written: no half-written output
        text = json.dumps(_json_clean({**meta, "rows": list(rows),
                                       "comparisons": list(comparisons)}), indent=2)
    except (TypeError, ValueError) as error:
        raise TypeError(f"meta must hold JSON values (str, numbers, lists, dicts): {error}"
                        ) from None
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "pointing_game.csv")
    json_path = os.path.join(out, "pointing_game.json")
    _write_csv(csv_path, rows, TABLE_COLUMNS)
    _write_csv(os.path.join(out, "pointing_game_comparisons.csv"), comparisons,
               COMPARISON_COLUMNS)
    with open(json_path, "w") as f:
        f.write(text)
    return csv_path, json_path


def report_tables(out: str, records: Sequence[Mapping[str, Any]], num_classes: int,
                  models: Sequence[str], methods: Sequence[str], meta: Mapping[str, Any],
                  seed: int = 0) -> Tuple[str, str]:
    """Print the table with its intervals (:func:`make_table`) and the published orderings
    (:func:`~torchray_like.benchmark.intervals.compare_orderings`), and write them to ``out``
    (:func:`write_outputs`, ``meta`` completed with the intervals' method); the two paths."""
    rows = make_table(records, num_classes, models, methods, seed=seed)
    comparisons = intervals.compare_orderings(pairs_of_records(records), models, methods,
                                              num_classes, seed=seed)
    meta = {**meta, "intervals": {
        "method": "percentile bootstrap over images (classes averaged in every resample); "
                  "differences paired on the images both methods ran on",
        "level": intervals.DEFAULT_LEVEL, "resamples": intervals.DEFAULT_RESAMPLES,
        "seed": seed}}
    print(print_table(rows))
    if comparisons:
        print(intervals.format_orderings(comparisons))
    return write_outputs(out, rows, meta, comparisons)
