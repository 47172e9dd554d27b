r"""One self-contained HTML page of what the benchmark scripts wrote.

Usage::

    python benchmarks/report.py                      # reads ./out, writes ./out/report.html
    python benchmarks/report.py out/ --output report.html --gallery-images 4
    python benchmarks/report.py out/ --gallery-images 0   # tables and figures only (seconds)

The page gathers, from every folder under ``OUT_DIR`` (three levels deep):

* ``pointing_game.json`` (``benchmarks/pointing_game.py``): the accuracies with their 95 %
  bootstrap intervals per model, and the published orderings with their paired differences;
* ``deletion_insertion.json`` and ``deletion_insertion_curves.png``: the AUCs with intervals,
  the comparisons with the random map, the curves;
* ``sanity_checks.json`` and ``sanity_checks_*.png``: the similarities with intervals, the
  published findings, the curves;
* ``speed.json`` (``benchmarks/speed.py --out DIR``) and ``quantus_metrics.json``
  (``benchmarks/quantus_metrics.py``): their tables;
* every other PNG figure found there;

and a **gallery**: every method's map (settings table, benchmark ``"compare"``) over the first
``--gallery-images`` embedded test images for each embedded model, each image labelled with
the class explained (the first present) and the classes it holds.  Images are embedded as data
URIs: the page needs no network and no server, and can be mailed or archived as one file.
``benchmarks/pointing_game.py`` writes ``OUT/report.html`` the same way at the end of a run.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
import math
import os
import sys
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: The JSON files the page knows, in the order of its sections.
KNOWN = ("pointing_game.json", "deletion_insertion.json", "sanity_checks.json", "speed.json",
         "quantus_metrics.json")
TITLES = {"pointing_game.json": "The pointing game",
          "deletion_insertion.json": "Deletion and insertion",
          "sanity_checks.json": "Sanity checks (model randomisation)",
          "speed.json": "Speed", "quantus_metrics.json": "Quantus metrics"}
#: Figures larger than this are left out (a page of tens of megabytes helps nobody).
MAX_FIGURE_BYTES = 8 * 2 ** 20
DEFAULT_GALLERY_IMAGES = 3

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;
color:#222;max-width:1400px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.text,th.text{text-align:left}
span.ci{color:#666;font-size:.9em}
td.reproduced{background:#e3f4e3}td.reversed{background:#f8dede}td.unresolved{background:#f6f3dc}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption,p.meta{color:#555;font-size:.85em}
table.gallery td,table.gallery th{text-align:center;font-size:.75em;padding:.15em}
table.gallery img{width:96px;height:96px;image-rendering:pixelated;display:block;margin:auto}
"""


# ---------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _esc(value)
    return _esc(value if isinstance(value, int) else f"{value:.{digits}f}")


def interval_cell(row: Mapping[str, Any], key: str, scale: float = 1.0, digits: int = 3,
                  signed: bool = False) -> str:
    """``estimate [low, high]`` of ``row[key]`` and ``row[key_low]``, ``row[key_high]`` as HTML
    (the bare number when the row has no interval; ``-`` when undefined)."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    spec = ("+" if signed else "") + f".{digits}f"

    def show(v: Any) -> str:
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return format(v * scale + 0.0, spec) if ok else "-"

    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    if low is None and high is None:
        return _esc(show(value))
    mark = "*" if low == high else ""
    return f'{_esc(show(value))} <span class="ci">[{show(low)}, {show(high)}]{mark}</span>'


def html_table(header: Sequence[str], rows: Iterable[Sequence[str]],
               text_columns: int = 1, cls: str = "results",
               cell_classes: Optional[Sequence[Sequence[str]]] = None) -> str:
    """A table of HTML cells (already escaped); the first ``text_columns`` left-aligned."""
    head = "".join(f'<th class="{"text" if i < text_columns else ""}">{_esc(h)}</th>'
                   for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        extra = cell_classes[r] if cell_classes is not None else [""] * len(row)
        cells = "".join(
            f'<td class="{("text " if i < text_columns else "") + extra[i]}">{c}</td>'
            for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return (f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table>")


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(path: str, caption: str) -> str:
    """An ``<figure>`` with the PNG file embedded (empty when missing or too large)."""
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_FIGURE_BYTES:
        return ""
    with open(path, "rb") as f:
        uri = png_data_uri(f.read())
    return (f'<figure><img src="{uri}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _meta(data: Mapping[str, Any], path: str) -> str:
    parts = [f"from <code>{_esc(path)}</code>"]
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    command = data.get("command") or settings.get("command")
    if command:
        parts.append(f"command <code>{_esc(command)}</code>")
    wall = data.get("wall_seconds")
    if isinstance(wall, (int, float)):
        parts.append(f"wall time {wall:.0f} s")
    intervals = data.get("intervals")
    if isinstance(intervals, dict):
        parts.append(f"intervals: {_esc(intervals.get('method', ''))}, level "
                     f"{intervals.get('level')}, {intervals.get('resamples')} resamples, "
                     f"seed {intervals.get('seed')}")
    return '<p class="meta">' + "; ".join(parts) + "</p>"


VERDICT_CLASS = {"reproduced": "reproduced", "reversed": "reversed",
                 "not resolved": "unresolved", "too few images": "unresolved",
                 "better": "reproduced", "worse": "reversed"}


def comparison_table(comparisons: Sequence[Mapping[str, Any]], scale: float, digits: int,
                     label: str) -> str:
    """Paired differences: model, comparison, difference [CI], images, published, verdict."""
    header = ["model", "comparison", f"{label} [95 % CI]", "images", "published", "verdict"]
    rows, classes = [], []
    for c in comparisons:
        name = f"{c.get('better')} − {c.get('worse')}" + (
            f" ({c['subset']})" if c.get("subset") else "") + (
            f" ({c['metric']})" if c.get("metric") else "")
        published = c.get("published")
        rows.append([_esc(c.get("model")), _esc(name),
                     interval_cell(c, "difference", scale, digits, signed=True),
                     _number(c.get("images")),
                     _esc(f"{published:+.1f}" if isinstance(published, (int, float))
                          else published or ""),
                     _esc(c.get("verdict", ""))])
        classes.append([""] * 5 + [VERDICT_CLASS.get(str(c.get("verdict")), "")])
    return html_table(header, rows, text_columns=2, cell_classes=classes)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def pointing_game_section(data: Mapping[str, Any], folder: str) -> str:
    """Methods as rows, each model's all / difficult accuracy with its interval, images."""
    rows = data.get("rows") or []
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    header = ["method"] + [f"{m} {s}" for m in models for s in ("all %", "difficult %",
                                                                 "images")]
    table = []
    for method in methods:
        line = [_esc(method)]
        for model in models:
            row = next((r for r in rows if r["model"] == model and r["method"] == method), None)
            line += ([interval_cell(row, "all", 100, 1), interval_cell(row, "difficult", 100, 1),
                      _number(row["images"])] if row else ["", "", ""])
        table.append(line)
    out = [html_table(header, table)]
    out.append('<p class="meta">95 % intervals by bootstrap over images; * marks a zero-width '
               "interval (every image scored alike): it understates the uncertainty.</p>")
    if data.get("comparisons"):
        out.append("<h3>Published orderings (Fong et al. 2019, Table 1, VOC07 VGG16)</h3>")
        out.append(comparison_table(data["comparisons"], 100, 1, "difference (points)"))
    return "".join(out)


def deletion_insertion_section(data: Mapping[str, Any], folder: str) -> str:
    games = [k[:-4] for k in (data.get("rows") or [{}])[0] if k.endswith("_auc")]
    header = ["method", "model", "images"] + [f"{g} AUC" for g in games] + ["s/image"]
    table = [[_esc(r["method"]), _esc(r["model"]), _number(r.get("images"))]
             + [interval_cell(r, f"{g}_auc", 1, 3) for g in games]
             + [_number(r.get("s_per_img"))] for r in data.get("rows") or []]
    out = [html_table(header, table, text_columns=2)]
    if data.get("comparisons"):
        out.append("<h3>Against the random map (paired, deletion: random − method; insertion: "
                   "method − random; positive is better)</h3>")
        out.append(comparison_table(data["comparisons"], 1, 3, "AUC difference"))
    out.append(figure(os.path.join(folder, "deletion_insertion_curves.png"),
                      "mean deletion and insertion curves"))
    return "".join(out)


SANITY_COLUMNS = ("rank|top", "ssim|top", "hog|top", "rank|top2", "rank|all", "ssim|all",
                  "rank|indep.min")


def sanity_checks_section(data: Mapping[str, Any], folder: str) -> str:
    summary = data.get("summary") or []
    columns = [c for c in SANITY_COLUMNS if any(c in r for r in summary)]
    header = ["method", "model", "images"] + list(columns) + ["s/image"]
    table = [[_esc(r["method"]), _esc(r["model"]), _number(r.get("images"))]
             + [interval_cell(r, c, 1, 2) if c in r else "" for c in columns]
             + [_number(r.get("s_per_img"), 2)] for r in summary]
    out = [html_table(header, table, text_columns=2)]
    if data.get("comparisons"):
        out.append("<h3>Published findings (Adebayo et al. 2018; Sixt et al. 2020): the first "
                   "method's map survives the randomisation better</h3>")
        out.append(comparison_table(data["comparisons"], 1, 2, "difference"))
    for mode in ("cascading", "independent"):
        out.append(figure(os.path.join(folder, f"sanity_checks_{mode}.png"),
                          f"similarity to the original map, {mode} randomisation"))
    return "".join(out)


def generic_section(data: Mapping[str, Any], folder: str) -> str:
    """Any ``{"rows": [...]}``: its scalar columns (with intervals where ``_low`` / ``_high``
    columns exist)."""
    rows = [r for r in data.get("rows") or [] if isinstance(r, dict)]
    if not rows:
        return "<p>(no rows)</p>"
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()
                              if v is None or isinstance(v, (str, int, float))))
    keys = [k for k in keys if not k.endswith(("_low", "_high"))]
    text = sum(1 for k in keys[:3] if all(isinstance(r.get(k), str) for r in rows))
    table = [[interval_cell(r, k, 1, 4) if isinstance(r.get(k), float) else _number(r.get(k))
              for k in keys] for r in rows]
    return html_table(keys, table, text_columns=text)


SECTIONS = {"pointing_game.json": pointing_game_section,
            "deletion_insertion.json": deletion_insertion_section,
            "sanity_checks.json": sanity_checks_section}


def find_results(out_dir: str, depth: int = 3) -> List[Tuple[str, str]]:
    """``(name, path)`` of the known JSON files under ``out_dir`` (``depth`` levels)."""
    found = []
    base = os.path.abspath(out_dir)
    for folder, dirs, files in os.walk(base):
        if folder[len(base):].count(os.sep) >= depth:
            dirs[:] = []
        dirs.sort()
        found += [(name, os.path.join(folder, name)) for name in KNOWN if name in files]
    return sorted(found, key=lambda item: (KNOWN.index(item[0]), item[1]))


def _other_figures(out_dir: str, shown: Iterable[str], depth: int = 3) -> List[str]:
    base = os.path.abspath(out_dir)
    shown = set(shown)
    out = []
    for folder, dirs, files in os.walk(base):
        if folder[len(base):].count(os.sep) >= depth:
            dirs[:] = []
        dirs.sort()
        out += [os.path.join(folder, f) for f in sorted(files)
                if f.lower().endswith(".png") and os.path.join(folder, f) not in shown]
    return out


def result_sections(out_dir: str) -> Tuple[List[Tuple[str, str, str]], List[str]]:
    """``(anchor, title, html)`` of every result file found, and the figures they show."""
    sections, shown = [], []
    for k, (name, path) in enumerate(find_results(out_dir)):
        folder = os.path.dirname(path)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as error:
            body = f"<p>could not read <code>{_esc(path)}</code>: {_esc(error)}</p>"
        else:
            body = _meta(data, os.path.relpath(path, out_dir))
            body += SECTIONS.get(name, generic_section)(data, folder)
        shown += [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png")
                  and f.startswith(name[:-5])]
        sections.append((f"s{k}", TITLES[name], body))
    return sections, shown


# ---------------------------------------------------------------------------------------------
# Gallery
# ---------------------------------------------------------------------------------------------


def _png(rgb: np.ndarray) -> str:
    """A float ``(H, W, 3)`` image in ``[0, 1]`` as a PNG data URI."""
    from PIL import Image

    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return png_data_uri(buffer.getvalue())


#: The gallery's departures from the settings table's ``"compare"`` options: RISE with 300
#: masks instead of 1000 (3 s instead of 9 for three images on a CPU; the maps are coarser).
GALLERY_OVERRIDES = {"rise": {"num_masks": 300}}


def gallery_inputs(images: int) -> Tuple[torch.Tensor, List[int], List[List[int]]]:
    """The first ``images`` embedded test images, the class explained (the first present) and
    the classes present."""
    from torchray_like.benchmark.embedded_data import EmbeddedShapes

    data = EmbeddedShapes("test", size=images)
    xs, targets, present = [], [], []
    for i in range(images):
        x, label = data[i]
        xs.append(x)
        present.append([int(c) for c in label["class_ids"].tolist()])
        targets.append(present[-1][0])
    return torch.stack(xs), targets, present


def gallery_maps(model: torch.nn.Module, name: str, methods: Sequence[str], images: int,
                 seed: int = 0) -> Tuple[torch.Tensor, List[int], List[List[int]],
                                         Dict[str, torch.Tensor], List[str]]:
    """The first ``images`` embedded test images, the class explained (the first present),
    the classes present, every method's maps (options of the settings table, benchmark
    ``"compare"``, with :data:`GALLERY_OVERRIDES`; RISE and extremal perturbation seeded by
    ``seed``) and the warnings the methods gave (shown on the page)."""
    from torchray_like.attribution.explain import explain
    from torchray_like.benchmark.settings import options_table

    x, targets, present = gallery_inputs(images)
    if not methods:
        return x, targets, present, {}, []
    options = options_table(methods, name, "compare", overrides=GALLERY_OVERRIDES)
    for method in ("rise", "extremal_perturbation"):
        if method in options:
            options[method].update(generator=seed, progress=False)
    device = next(iter(model.parameters()), torch.empty(0)).device
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = explain(model, x.to(device), targets, methods=list(methods), options=options)
    notes = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    return x, targets, present, {m: v.detach().float().cpu() for m, v in maps.items()}, notes


def _given_maps(given: Optional[Mapping[str, Mapping[int, torch.Tensor]]],
                methods: Sequence[str], images: int) -> Dict[str, torch.Tensor]:
    """The maps of ``given`` (method -> image -> ``(1, 1, h, w)`` map of its first class) of
    the methods that hold every gallery image, as ``(images, 1, h, w)``."""
    out = {}
    for method in methods:
        per_image = (given or {}).get(method, {})
        if all(i in per_image for i in range(images)):
            out[method] = torch.cat([per_image[i].detach().float().cpu()
                                     for i in range(images)])
    return out


def gallery_section(models: Mapping[str, torch.nn.Module], methods: Sequence[str],
                    images: int,
                    given: Optional[Mapping[str, Mapping[str, Mapping[int, torch.Tensor]]]]
                    = None) -> str:
    """One table per model: rows are images (with their classes), columns methods.

    ``given``: model -> method -> image -> map of the image's first class, already computed
    (the pointing game's); the methods it lacks for some gallery image are computed here.
    """
    from torchray_like.benchmark.embedded_data import EMBEDDED_CLASSES, EMBEDDED_MEAN, EMBEDDED_STD
    from torchray_like.benchmark.settings import not_applicable
    from torchray_like.visualize import overlay

    methods = [m for m in methods if m != "center"]
    mean = torch.tensor(EMBEDDED_MEAN)[:, None, None]
    std = torch.tensor(EMBEDDED_STD)[:, None, None]
    out = []
    for name, model in models.items():
        # What the settings say does not apply to this model (guided backprop on the ViT)
        # gets an n/a cell instead of stopping the page.
        skipped = {m: why for m in methods if (why := not_applicable(name, m)) is not None}
        ready = _given_maps((given or {}).get(name), methods, images)
        x, targets, present, maps, notes = gallery_maps(
            model, name, [m for m in methods if m not in ready and m not in skipped], images)
        maps.update(ready)
        rows = []
        for i in range(len(x)):
            rgb = (x[i] * std + mean).clamp(0, 1)
            label = (f"image {i}: explaining <b>{_esc(EMBEDDED_CLASSES[targets[i]])}</b><br>"
                     f"holds {_esc(', '.join(EMBEDDED_CLASSES[c] for c in present[i]))}")
            cells = [f'<img src="{_png(rgb.permute(1, 2, 0).numpy())}" alt="test image {i}">'
                     f"{label}"]
            for method in methods:
                if method in skipped:
                    cells.append(f"n/a: {_esc(skipped[method])}")
                    continue
                blend = overlay(rgb, maps[method][i], alpha=0.5)
                cells.append(f'<img src="{_png(blend)}" alt="{_esc(method)}, image {i}">')
            rows.append(cells)
        out.append(f"<h3>{_esc(name)}</h3>")
        if ready:
            out.append(f'<p class="meta">{len(ready)} of {len(methods)} methods: the maps the '
                       "pointing game scored (its settings).</p>")
        out.append(html_table(["image"] + list(methods), rows, text_columns=0, cls="gallery"))
        out += [f'<p class="meta">warning: {_esc(n)}</p>' for n in notes]
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


def default_gallery_methods() -> List[str]:
    """Every registered method but those that explain transformers only (the embedded
    models of the gallery are CNNs without attention: those methods refuse them)."""
    from torchray_like.attribution.registry import METHODS, TRANSFORMER_ONLY_METHODS

    return [m for m in METHODS if m not in TRANSFORMER_ONLY_METHODS]


def write_report(out_dir: str, output: Optional[str] = None, *,
                 gallery_models: Optional[Mapping[str, torch.nn.Module]] = None,
                 gallery_methods: Optional[Sequence[str]] = None,
                 gallery_images: int = DEFAULT_GALLERY_IMAGES,
                 gallery_given: Optional[Mapping[str, Mapping[str, Mapping[int, torch.Tensor]]]]
                 = None) -> str:
    """Write the page for the results under ``out_dir``; returns its absolute path.

    Parameters
    ----------
    out_dir : str
        The folder the scripts wrote to (searched three levels deep).
    output : str, optional
        The page (default ``out_dir/report.html``).
    gallery_models : mapping name -> model, optional
        Embedded models whose maps the gallery shows (none: no gallery).
    gallery_methods : sequence of str, optional
        Methods of the gallery (default: :func:`default_gallery_methods`).
    gallery_images : int
        Test images of the gallery (default 3).
    gallery_given : mapping model -> method -> image -> map, optional
        Maps already computed (the ``(1, 1, h, w)`` map of the image's first class), e.g. by
        the pointing game: used instead of computing them again (the settings of whoever
        computed them; the page says which methods).
    """
    from torchray_like.attribution.registry import METHODS

    if isinstance(gallery_images, bool) or not isinstance(gallery_images, int) \
            or gallery_images < 0:
        raise ValueError(f"gallery_images must be a non-negative int, got {gallery_images!r}")
    output = os.path.abspath(output or os.path.join(out_dir, "report.html"))
    sections, shown = result_sections(out_dir)
    methods = [m for m in (gallery_methods or default_gallery_methods()) if m in METHODS]
    if gallery_models and gallery_images and methods:
        sections.append(("gallery", "Gallery: every method on the same test images",
                         '<p class="meta">maps of the class named under each image (settings '
                         'table, benchmark "compare"; RISE with 300 masks; or, where said, the '
                         "pointing game's), blended over the "
                         "image; each map stretched to its own range (blue low, red high).</p>"
                         + gallery_section(gallery_models, methods, gallery_images,
                                           gallery_given)))
    figures = [figure(p, os.path.relpath(p, out_dir)) for p in _other_figures(out_dir, shown)
               if os.path.abspath(p) != output]
    if any(figures):
        sections.append(("figures", "Other figures", "".join(figures)))
    if not sections:
        sections.append(("empty", "No results", f"<p>nothing known under <code>"
                         f"{_esc(out_dir)}</code>: run a benchmark script first.</p>"))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.write(_page(out_dir, sections))
    return output


def _page(out_dir: str, sections: Sequence[Tuple[str, str, str]]) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = " · ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_esc(t)}</h2>{b}</section>' for a, t, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>torchray_like benchmark report</title>"
            f"<style>{STYLE}</style></head><body><h1>torchray_like benchmark report</h1>"
            f'<p class="meta">results under <code>{_esc(os.path.abspath(out_dir))}</code>, '
            f"page written {when}</p><nav>{nav}</nav>{body}</body></html>\n")


# ---------------------------------------------------------------------------------------------
# reStructuredText (the docs' tables are regenerated from the JSON)
# ---------------------------------------------------------------------------------------------


def _plain(row: Optional[Mapping[str, Any]], key: str, signed: bool = False) -> str:
    """An interval cell without its markup."""
    if row is None:
        return ""
    text = html.unescape(interval_cell(row, key, 100, 1, signed).replace(
        '<span class="ci">', "").replace("</span>", ""))
    return text.replace("*", "\\*")  # a bare * would open emphasis


def rst_pointing_game(data: Mapping[str, Any]) -> str:
    """The pointing game of ``pointing_game.json`` as a reStructuredText simple table (methods
    as rows; per model, all and difficult accuracy with intervals and images) and its
    published orderings as a list."""
    rows = data.get("rows") or []
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = [["method"] + [f"{m} {s}" for m in models for s in ("all %", "difficult %", "n")]]
    for method in methods:
        line = [method]
        for model in models:
            row = next((r for r in rows if r["model"] == model and r["method"] == method), None)
            line += [_plain(row, "all"), _plain(row, "difficult"),
                     str(row["images"]) if row else ""]
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    rule = "  ".join("=" * w for w in widths)
    text = [rule, "  ".join(c.ljust(w) for c, w in zip(cells[0], widths)).rstrip(), rule]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in cells[1:]]
    text.append(rule)
    if data.get("comparisons"):
        text.append("")          # reStructuredText needs a blank line after a table
    for c in data.get("comparisons") or []:
        d = _plain(c, "difference", signed=True)
        text.append(f"* {c['model']}, {c['subset']} pairs: {c['better']} − {c['worse']} "
                    f"{d} on {c['images']} images (published {c['published']:+.1f}): "
                    f"**{c['verdict']}**")
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from torchray_like.benchmark.runner import device_arg
    parser = argparse.ArgumentParser(
        prog="report.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=os.path.join(".", "out"),
                        metavar="OUT_DIR", help="folder the benchmark scripts wrote to "
                                                "(default: %(default)s)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="the page (default: OUT_DIR/report.html)")
    parser.add_argument("--gallery-images", type=int, default=DEFAULT_GALLERY_IMAGES,
                        metavar="N", help="embedded test images in the gallery; 0: no gallery "
                                          "(default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=["all"], metavar="MODEL",
                        help="embedded models of the gallery, comma- or space-separated "
                             "(default: all)")
    parser.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                        help="methods of the gallery (default: all but the transformer-only ones)")
    parser.add_argument("--weights", default=None, metavar="FILE|random",
                        help="the gallery models' weights: a state-dict FILE, one per model "
                             "(comma-separated), or random (default: the shipped weights)")
    parser.add_argument("--device", type=device_arg, default="cpu",
                        help="device of the gallery's maps (default: %(default)s)")
    parser.add_argument("--rst", action="store_true",
                        help="print the pointing game's table and orderings as "
                             "reStructuredText (for the docs) instead of writing the page")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torchray_like.attribution.registry import METHODS
    from torchray_like.benchmark import embedded_cli
    from torchray_like.benchmark.embedded_models import EMBEDDED_MODELS

    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        parser.error(f"OUT_DIR {args.out_dir!r} is not a folder: give the folder the benchmark "
                     "scripts wrote to (their --out, or its parent)")
    if args.gallery_images < 0:
        parser.error(f"--gallery-images must be >= 0, got {args.gallery_images}")
    if args.rst:
        return _print_rst(args.out_dir, parser)
    try:
        names = embedded_cli.name_list(args.models, EMBEDDED_MODELS, "--models")
        methods = embedded_cli.name_list(args.methods, tuple(METHODS), "--methods")
        if [m.lower() for m in args.methods] == ["all"]:
            methods = default_gallery_methods()
    except ValueError as error:
        parser.error(str(error))
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        parser.error(f"--device: not a device: {args.device!r} (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    embedded_cli.check_weights(parser, args, names)
    models = {}
    if args.gallery_images:
        for name in names:
            try:
                model, _ = embedded_cli.load_benchmark_model(name, args.weights_of[name])
            except (ValueError, FileNotFoundError, RuntimeError) as error:
                parser.error(f"--models {name}: {error} (pass --weights random, or "
                             "--gallery-images 0 for no gallery)")
            models[name] = model.eval().to(device)
    path = write_report(args.out_dir, args.output, gallery_models=models,
                        gallery_methods=methods, gallery_images=args.gallery_images)
    print(f"report: {path}")
    return 0


def _print_rst(out_dir: str, parser: argparse.ArgumentParser) -> int:
    found = [path for name, path in find_results(out_dir) if name == "pointing_game.json"]
    if not found:
        parser.error(f"--rst: no pointing_game.json under {out_dir!r}")
    for path in found:
        with open(path) as f:
            print(rst_pointing_game(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
