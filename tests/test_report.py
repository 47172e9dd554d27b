"""benchmarks/report.py: one self-contained HTML page of the benchmark scripts' outputs.

The page is parsed (every table, figure and gallery image present, images embedded as PNG data
URIs, no external resource, numbers equal to the CSV's) and, where Debian's ``chromium`` is on
the PATH, rendered headless to a screenshot.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from torchray_like.benchmark.embedded_cli import load_benchmark_model
from torchray_like.benchmark.embedded_data import EMBEDDED_CLASSES, EmbeddedShapes
from torchray_like.benchmark.intervals import Interval

from .conftest import load_benchmark

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


report = load_benchmark("report")


class Page(HTMLParser):
    """Tables (as lists of rows of cell texts), images, links, scripts and section ids."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.links, self.sections = [], [], [], []
        self.scripts = self.stylesheets = 0
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"class": attrs.get("class"), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")
        elif tag == "a":
            self.links.append(attrs.get("href", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "link":
            self.stylesheets += 1
        elif tag == "section":
            self.sections.append(attrs.get("id"))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path):
    page = Page()
    page.feed(Path(path).read_text(encoding="utf-8"))
    return page


def png_size(src):
    from PIL import Image

    assert src.startswith("data:image/png;base64,")
    data = base64.b64decode(src.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """What the scripts write, on tiny runs (random weights), plus a speed and a Quantus table
    and one more figure."""
    from PIL import Image

    out = tmp_path_factory.mktemp("out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert load_benchmark("pointing_game").main([
            "--weights", "random", "--models", "embedded-vgg,embedded-resnet", "--limit", "3",
            "--no-progress", "--no-report",
            "--methods", "center,gradient,grad_cam", "--out", str(out / "pointing_game")]) == 0
        assert load_benchmark("deletion_insertion").main([
            "--weights", "random", "--models", "embedded-vgg", "--methods", "random,gradient",
            "--limit", "2", "--steps", "4", "--no-progress",
            "--out", str(out / "deletion_insertion")]) == 0
        assert load_benchmark("sanity_checks").main([
            "--weights", "random", "--models", "embedded-vgg", "--methods", "gradient",
            "guided_backprop", "--limit", "2", "--modes", "cascading", "--no-progress",
            "--out", str(out / "sanity_checks")]) == 0
    finally:
        torch.set_num_threads(threads)
    (out / "speed").mkdir()
    (out / "speed" / "speed.json").write_text(json.dumps({"settings": {"quick": True}, "rows": [
        {"method": "gradient", "model": "resnet18", "ms": 3.25, "floor_ms": 3.1, "ratio": 1.05},
        {"method": "grad_cam", "model": "resnet18", "ms": 2.5, "floor_ms": 2.4, "ratio": 1.04}]}))
    (out / "quantus").mkdir()
    (out / "quantus" / "quantus_metrics.json").write_text(json.dumps({"rows": [
        {"method": "gradient", "model": "embedded-vgg", "images": 3, "sparseness": 0.5,
         "sparseness_low": 0.4, "sparseness_high": 0.6, "sparseness_defined": 3}]}))
    (out / "compare").mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(out / "compare" / "compare.png")
    return out


@pytest.fixture(scope="module")
def page(out_dir):
    model, _ = load_benchmark_model("embedded-vgg", "random", seed=1)
    path = report.write_report(str(out_dir), gallery_models={"embedded-vgg": model.eval()},
                               gallery_methods=["center", "gradient", "grad_cam"],
                               gallery_images=2)
    assert path == str(out_dir / "report.html")
    return path, parse(path)


def test_every_section_table_and_figure_is_there(page):
    _, p = page
    assert p.sections == ["s0", "s1", "s2", "s3", "s4", "gallery", "figures"]
    headers = [t["rows"][0][:2] for t in p.tables]
    assert headers == [
        ["method", "embedded-vgg all %"],                # pointing game
        ["model", "comparison"],                         # published orderings
        ["method", "model"],                             # deletion / insertion
        ["model", "comparison"],                         # against the random map
        ["method", "model"],                             # sanity checks
        ["model", "comparison"],                         # published findings
        ["method", "model"],                             # speed
        ["method", "model"],                             # Quantus
        ["image", "gradient"],                           # gallery (centre left out)
    ]
    # Figures: deletion curves, the cascading sanity checks, 2 x 3 gallery cells, compare.png.
    assert len(p.images) == 1 + 1 + 2 * 3 + 1
    sizes = [png_size(img["src"]) for img in p.images]
    assert sizes[2:8] == [(64, 64)] * 6 and sizes[8] == (30, 20)
    assert all(img.get("alt") for img in p.images)


def test_self_contained(page):
    path, p = page
    text = Path(path).read_text(encoding="utf-8")
    assert p.scripts == 0 and p.stylesheets == 0
    assert all(link.startswith("#") for link in p.links)
    assert "http://" not in text and "https://" not in text and "src=\"//" not in text
    assert text.startswith("<!DOCTYPE html>")


def test_pointing_game_cells_are_the_csv_numbers(page, out_dir):
    _, p = page
    with open(out_dir / "pointing_game" / "pointing_game.csv") as f:
        rows = list(csv.DictReader(f))
    table = {r[0]: r for r in p.tables[0]["rows"][1:]}
    header = p.tables[0]["rows"][0]
    assert [r["method"] for r in rows[:3]] == list(table)
    for r in rows:
        column = header.index(f"{r['model']} all %")
        expected = Interval(float(r["all"]), float(r["all_low"]), float(r["all_high"]),
                            int(r["images"]),
                            degenerate=r["all_low"] == r["all_high"]).format(100)
        assert table[r["method"]][column] == expected
        assert table[r["method"]][column + 2] == r["images"]


def test_comparisons_and_verdicts(page, out_dir):
    _, p = page
    data = json.loads((out_dir / "pointing_game" / "pointing_game.json").read_text())
    ordering = p.tables[1]["rows"][1:]
    assert len(ordering) == len(data["comparisons"]) == 3 * 2      # 3 orderings x 2 models
    assert {r[1] for r in ordering} == {"grad_cam − center (all)", "gradient − center (all)",
                                        "grad_cam − gradient (difficult)"}
    assert [r[3] for r in ordering] == ["3"] * 6
    assert all(r[-1] == "too few images" for r in ordering)       # 3 < MIN_IMAGES
    random = p.tables[3]["rows"][1:]
    assert [r[1] for r in random] == ["gradient − random (deletion)",
                                      "gradient − random (deletion_blur)",
                                      "gradient − random (insertion)"]
    assert p.tables[5]["rows"][1][1] == "guided_backprop − gradient (rank|top)"


def test_gallery_names_the_classes(page):
    path, p = page
    text = Path(path).read_text(encoding="utf-8")
    data = EmbeddedShapes("test", size=2)
    rows = p.tables[-1]["rows"]
    assert rows[0] == ["image", "gradient", "grad_cam"]
    for i in range(2):
        classes = [EMBEDDED_CLASSES[c] for c in data[i][1]["class_ids"].tolist()]
        assert rows[i + 1][0] == f"image {i}: explaining {classes[0]} holds {', '.join(classes)}"
    assert "gallery" in text


def test_generic_tables_keep_their_columns_and_intervals(page):
    _, p = page
    speed, quantus = p.tables[6]["rows"], p.tables[7]["rows"]
    assert speed[0] == ["method", "model", "ms", "floor_ms", "ratio"]
    assert speed[1] == ["gradient", "resnet18", "3.2500", "3.1000", "1.0500"]
    assert quantus[0] == ["method", "model", "images", "sparseness", "sparseness_defined"]
    assert quantus[1][3] == "0.5000 [0.4000, 0.6000]"


def test_command_line(out_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        report.main([str(tmp_path / "missing")])
    assert info.value.code == 2 and "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        report.main([str(out_dir), "--gallery-images", "-1"])
    assert info.value.code == 2 and "--gallery-images must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        report.main([str(out_dir), "--methods", "nope"])
    assert info.value.code == 2 and "--methods: unknown name(s) nope" in capsys.readouterr().err
    # An empty folder: a page that says so.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty), "--gallery-images", "0"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {empty / 'report.html'}"
    assert parse(empty / "report.html").sections == ["empty"]
    # No gallery with --gallery-images 0; --output elsewhere.
    target = tmp_path / "r" / "page.html"
    assert report.main([str(out_dir), "--gallery-images", "0", "--output", str(target)]) == 0
    assert "gallery" not in parse(target).sections and target.exists()


def test_bad_gallery_images_argument(out_dir):
    with pytest.raises(ValueError, match="gallery_images must be a non-negative int"):
        report.write_report(str(out_dir), gallery_images=-2)


def test_pointing_game_prints_the_path_of_its_report(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = load_benchmark("pointing_game").main([
            "--weights", "random", "--models", "embedded-vgg", "--limit", "2", "--no-progress",
            "--methods", "center,gradient", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'report.html'}" in out
    p = parse(tmp_path / "report.html")
    assert p.sections == ["s0", "gallery"]
    assert len(p.images) == 3 * 2          # three test images: the image and the gradient
    # Two images computed, three shown: the gallery computes its own gradient maps.
    assert "the maps the pointing game scored" not in (tmp_path / "report.html").read_text()


def test_pointing_game_gallery_shows_the_maps_it_scored(tmp_path):
    """With the gallery's three images computed, the page shows the pointing game's own maps
    (not computed again): the overlay of its gradient map of image 0, pixel for pixel."""
    from torchray_like.attribution.registry import METHODS
    from torchray_like.benchmark.settings import method_options
    from torchray_like.visualize import overlay

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert load_benchmark("pointing_game").main([
            "--weights", "random", "--models", "embedded-vgg", "--limit", "3", "--no-progress",
            "--methods", "center,gradient,grad_cam", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "report.html").read_text()
    assert "2 of 2 methods: the maps the pointing game scored (its settings)." in text
    p = parse(tmp_path / "report.html")
    shown = [i for i in p.images if i.get("alt") == "gradient, image 0"]
    assert len(shown) == 1
    model, _ = load_benchmark_model("embedded-vgg", "random", 0, "coco")
    x, label = EmbeddedShapes("test", size=1)[0]
    smap = METHODS["gradient"](model, x[None], [int(label["class_ids"][0])],
                               **method_options("gradient", "embedded-vgg", "pointing_game"))
    from torchray_like.benchmark.embedded_data import EMBEDDED_MEAN, EMBEDDED_STD
    rgb = (x * torch.tensor(EMBEDDED_STD)[:, None, None]
           + torch.tensor(EMBEDDED_MEAN)[:, None, None]).clamp(0, 1)
    from PIL import Image

    data = base64.b64decode(shown[0]["src"].split(",", 1)[1])
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = (np.clip(overlay(rgb, smap[0], alpha=0.5), 0, 1) * 255).round()
    assert np.array_equal(pixels, expected.astype(np.uint8))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on the PATH")
def test_renders_in_headless_chromium(page, tmp_path):
    from PIL import Image

    path, _ = page
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1400,2400",
                    Path(path).as_uri()], check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert image.shape[:2] == (2400, 1400)
    assert image.std() > 5          # not a blank page: text, tables and maps drawn


def test_rst_tables_for_the_docs(out_dir, capsys):
    assert report.main([str(out_dir), "--rst"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == lines[2] and set(lines[0]) == {"=", " "}
    assert lines[1].split()[:3] == ["method", "embedded-vgg", "all"]
    assert sum(line.startswith("* embedded-") for line in lines) == 6
    assert "**too few images**" in text
    assert "*" not in text.replace("\\*", "").replace("**", "").replace("* embedded", "")
    with pytest.raises(SystemExit):
        report.main([str(out_dir / "compare"), "--rst"])
    assert "no pointing_game.json" in capsys.readouterr().err


def test_the_scripts_report_the_settings_n_a_pairs_instead_of_running_them(tmp_path, capsys):
    """Deletion/insertion on the ViT with a rectifier method: the pair is listed as n/a with
    the reason, the other method runs (a crash in the method would fail the run)."""
    from torchray_like.benchmark.embedded_cli import not_applicable_pairs

    assert not_applicable_pairs(["embedded-vit", "embedded-vgg"],
                                ["gradient", "guided_backprop", "grad_rollout"]) == [
        ("embedded-vit", "guided_backprop", not_applicable_pairs(
            ["embedded-vit"], ["guided_backprop"])[0][2]),
        ("embedded-vgg", "grad_rollout", not_applicable_pairs(
            ["embedded-vgg"], ["grad_rollout"])[0][2])]
    out = tmp_path / "di"
    assert load_benchmark("deletion_insertion").main([
        "--weights", "random", "--models", "embedded-vit", "--limit", "1", "--no-progress",
        "--methods", "gradient,guided_backprop", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "embedded-vit guided_backprop: n/a (rectifier method" in text
    rows = list(csv.DictReader(open(out / "deletion_insertion.csv")))
    assert {r["method"] for r in rows} == {"gradient"}


def test_gallery_marks_methods_that_do_not_apply_to_a_model_instead_of_stopping(out_dir,
                                                                             tmp_path):
    # Before: report.py's default gallery ran guided backprop on the embedded ViT and stopped
    # with its "replaced no ReLU" error.
    model, _ = load_benchmark_model("embedded-vit", "random", seed=1)
    path = report.write_report(str(out_dir), str(tmp_path / "vit.html"),
                               gallery_models={"embedded-vit": model.eval()},
                               gallery_methods=["gradient", "guided_backprop"],
                               gallery_images=1)
    rows = parse(path).tables[-1]["rows"]
    assert rows[0] == ["image", "gradient", "guided_backprop"]
    assert rows[1][2].startswith("n/a: rectifier method") and "ViT has none" in rows[1][2]
