"""The benchmark scripts ``benchmarks/pointing_game.py`` and ``benchmarks/compare.py``.

They run on tiny subsets (random weights unless the shipped ones exist), and the numbers they
write are checked: the centre baseline against a hand computation on the same images, the
ranges and row counts, resume after a kill, and a two-process ``torchrun`` run against a
single-process one.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from torchray_like.benchmark.runner import ResultsStore

from .conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pointing_game.py"
EXPERIMENT = "pointing_game/embedded"

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


pg = load_benchmark("pointing_game")


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process runs use one thread (as the subprocesses do, OMP_NUM_THREADS=1): on a busy
    machine several threads per process mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(argv, capsys=None):
    code = pg.main([str(a) for a in argv])
    assert code == 0
    return capsys.readouterr() if capsys is not None else None


def _csv(folder):
    with open(Path(folder) / "pointing_game.csv") as f:
        return list(csv.DictReader(f))


def _json(folder):
    with open(Path(folder) / "pointing_game.json") as f:
        return json.load(f)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------- hand computation


def hand_centre_accuracy(n_images: int):
    """Centre baseline on the first test images, computed from the raw masks (no package code
    beyond the data set): the centre pixel (side // 2, side // 2) hits when a class pixel lies
    within 15 · side / 224 pixels (7.5 px for 112-pixel images)."""
    from torchray_like.benchmark.embedded_data import IMAGE_SIZE, EmbeddedShapes

    data = EmbeddedShapes("test", size=n_images)
    tol2 = (15 * IMAGE_SIZE / 224) ** 2
    centre = float(IMAGE_SIZE // 2)
    stats = {"all": {}, "difficult": {}}
    pairs = {"all": 0, "difficult": 0}
    for i in range(n_images):
        _, t = data[i]
        for k, c in enumerate(t["class_ids"].tolist()):
            mask = t["masks"][t["labels"] == c].any(0).numpy()
            ys, xs = np.nonzero(mask)
            hit = bool((((ys - centre) ** 2 + (xs - centre) ** 2) <= tol2).any())
            subsets = ["all"] + (["difficult"] if bool(t["class_difficult"][k]) else [])
            for s in subsets:
                h, n = stats[s].get(c, (0, 0))
                stats[s][c] = (h + hit, n + 1)
                pairs[s] += 1
    acc = {s: float(np.mean([h / n for h, n in v.values()])) if v else float("nan")
           for s, v in stats.items()}
    return acc, pairs


# ------------------------------------------------------------------------- arguments


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        pg.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--dataset", "--data-root", "--models", "--weights", "--methods", "--limit",
                   "--resume", "--from-store", "--store", "--out", "--device", "--seed",
                   "--rise-masks", "--rise-batch", "--ep-iters", "--no-progress", "torchrun"):
        assert option in out
    flat = " ".join(out.split())
    assert "RISE masks per image (default: 500 embedded; voc07/coco14: the paper's)" in flat


@pytest.mark.parametrize("argv, message", [
    (["--methods", "gradient,nope"], "--methods: unknown name(s) nope"),
    (["--methods", "gradient", "nope"], "--methods: unknown name(s) nope"),
    (["--limit", "0"], "positive integer"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--models", "vgg16", "--weights", "random"], "does not fit --dataset embedded"),
    (["--weights", "/no/such/file.pt"], "no such file"),
    (["--weights", "DEFAULT"], "DEFAULT is for torchvision models"),
    (["--data-root", "somewhere"], "--data-root is for"),
    (["--models", "embedded-vgg,embedded-vgg"], "--models: give distinct names"),
    (["--models", "embedded-vgg", "embedded-vgg"], "--models: give distinct names"),
    (["--weights", "random,random,random,random"], "one per model"),
    (["--ep-limit", "-3"], "positive integer"),
    (["--rise-limit", "0"], "positive integer"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        pg.main(argv + ["--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_dataset_is_an_argparse_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        pg.main(["--dataset", "voc07", "--data-root", str(tmp_path), "--weights", "random",
                 "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "PASCAL VOC 2007 not found" in capsys.readouterr().err


# ------------------------------------------------------------------------- a tiny run


TINY = ["--weights", "random", "--models", "embedded-vgg,embedded-resnet", "--threads", "1",
        "--limit", "4", "--rise-limit", "2",
        "--ep-limit", "2", "--no-report",
        "--rise-masks", "30", "--ep-iters", "3", "--methods",
        "center,gradient,grad_cam,contrastive_excitation_backprop,rise,extremal_perturbation"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    pg.main(TINY + ["--out", str(out)])
    return out


def test_tiny_run_table(tiny_run):
    rows = _csv(tiny_run)
    methods = ["center", "gradient", "grad_cam", "contrastive_excitation_backprop", "rise",
               "extremal_perturbation"]
    assert [(r["model"], r["method"]) for r in rows] == [
        (m, x) for m in ("embedded-vgg", "embedded-resnet") for x in methods]
    for r in rows:
        assert 0 <= float(r["all"]) <= 1 and 0 <= float(r["difficult"]) <= 1
        assert float(r["seconds_per_image"]) >= 0
        assert int(r["images"]) == (2 if r["method"] in pg.SLOW_METHODS else 4)
    meta = _json(tiny_run)
    assert [(r["model"], r["method"]) for r in meta["rows"]] == [
        (r["model"], r["method"]) for r in rows]
    assert meta["images"] == 4 and meta["rise_images"] == meta["ep_images"] == 2
    settings = meta["config"]["models"]["embedded-vgg"]["settings"]
    assert settings["rise"]["kwargs"]["num_masks"] == 30
    assert settings["grad_cam"]["kwargs"]["saliency_layer"] == "features.14"


def test_tiny_run_intervals_and_comparisons(tiny_run):
    """The interval columns hold the estimate, the JSON says how they were made, and the
    published orderings of the methods run are compared (too few images to say here)."""
    from torchray_like.benchmark.intervals import pointing_game_interval

    rows = _csv(tiny_run)
    assert list(rows[0]) == ["method", "model", "all", "all_low", "all_high", "difficult",
                             "difficult_low", "difficult_high", "seconds_per_image", "images",
                             "pairs", "difficult_pairs"]
    for r in rows:
        for subset in ("all", "difficult"):
            low, value, high = (float(r[f"{subset}_low"]), float(r[subset]),
                                float(r[f"{subset}_high"]))
            assert 0 <= low <= value <= high <= 1, r
    meta = _json(tiny_run)
    assert meta["intervals"]["level"] == 0.95 and meta["intervals"]["resamples"] == 2000
    assert meta["intervals"]["seed"] == 0
    # The grad_cam row is the bootstrap of the stored pairs, image by image.
    store = ResultsStore(tiny_run / "results.sqlite", EXPERIMENT)
    mine = sorted((r for r in store.records()
                   if r["model"] == "embedded-vgg" and r["method"] == "grad_cam"),
                  key=lambda r: r["index"])
    expected = pointing_game_interval([[(p[0], p[1]) for p in r["pairs"]] for r in mine], 8)
    row = next(r for r in meta["rows"] if r["model"] == "embedded-vgg"
               and r["method"] == "grad_cam")
    assert (row["all"], row["all_low"], row["all_high"]) == pytest.approx(
        (expected.estimate, expected.low, expected.high))
    comparisons = meta["comparisons"]
    assert [(c["subset"], c["better"], c["worse"]) for c in comparisons[:6]] == [
        ("all", "grad_cam", "center"), ("all", "gradient", "center"),
        ("difficult", "grad_cam", "gradient"),
        ("difficult", "contrastive_excitation_backprop", "gradient"),
        ("difficult", "rise", "gradient"), ("difficult", "extremal_perturbation", "gradient")]
    assert len(comparisons) == 12 and all(c["verdict"] == "too few images"
                                          for c in comparisons)
    assert [c["images"] for c in comparisons[:6]] == [4, 4, 4, 4, 2, 2]
    with open(tiny_run / "pointing_game_comparisons.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    assert not (tiny_run / "report.html").exists()          # --no-report


def test_printed_table_shows_the_intervals(tiny_run, capsys):
    out = _run(["--from-store", "--store", str(tiny_run / "results.sqlite"), "--out",
                str(tiny_run / "again"), "--methods", "center,grad_cam", "--no-report"],
               capsys).out
    assert "all % [95 % CI]" in out and "difficult % [95 % CI]" in out
    row = next(r for r in _csv(tiny_run) if r["method"] == "grad_cam")
    shown = f"{100 * float(row['all']):.1f} [{100 * float(row['all_low']):.1f}, " \
            f"{100 * float(row['all_high']):.1f}]"
    assert shown in out.replace("*", "")
    assert "published orderings (Fong et al. 2019, Table 1, VOC07 VGG16)" in out
    assert "Grad-CAM - centre" in out and "too few images" in out


def test_settings_come_from_the_table_and_the_hit_rule_is_recorded(tiny_run):
    """Every method's stored options are the settings table's (with the flags' overrides), and
    the configuration says a point at the tolerance misses."""
    from torchray_like.benchmark.settings import method_options

    config = _json(tiny_run)["config"]
    assert config["hit_rule"] == "strict"
    for model in ("embedded-vgg", "embedded-resnet"):
        stored = config["models"][model]["settings"]
        overrides = {"rise": {"num_masks": 30}, "extremal_perturbation": {"max_iter": 3}}
        for method in pg.METHODS:
            assert stored[method]["kwargs"] == method_options(
                method, model, "pointing_game", overrides=overrides.get(method)), method
        assert stored["extremal_perturbation"]["kwargs"]["areas"] == [0.025, 0.05, 0.1, 0.2]
        assert stored["rise"]["all_classes_once"] is True


def test_one_progress_bar_per_method_and_threads_restored(tmp_path, capsys):
    torch.set_num_threads(2)
    _run(["--weights", "random", "--models", "embedded-vgg", "--limit", "2", "--methods",
          "center", "grad_cam", "--threads", "1", "--out", tmp_path])
    err = capsys.readouterr().err
    assert "pointing game 1/2 center" in err and "pointing game 2/2 grad_cam" in err
    assert torch.get_num_threads() == 2        # --threads 1 held for the run only
    _run(["--weights", "random", "--models", "embedded-vgg", "--limit", "2", "--methods",
          "center", "--no-progress", "--out", tmp_path])
    assert "pointing game" not in capsys.readouterr().err


def test_centre_baseline_equals_hand_computation(tiny_run):
    acc, pairs = hand_centre_accuracy(4)
    for r in _csv(tiny_run):
        if r["method"] != "center":
            continue
        assert float(r["all"]) == pytest.approx(acc["all"], abs=1e-12)
        assert int(r["pairs"]) == pairs["all"]
        assert int(r["difficult_pairs"]) == pairs["difficult"]
        if pairs["difficult"]:
            assert float(r["difficult"]) == pytest.approx(acc["difficult"], abs=1e-12)
    # Every method is scored on the same pairs.
    assert len({(r["pairs"], r["difficult_pairs"]) for r in _csv(tiny_run)
                if r["method"] not in pg.SLOW_METHODS}) == 1


def test_resume_when_done_recomputes_nothing(tiny_run, tmp_path, capsys):
    store = ResultsStore(tiny_run / "results.sqlite", EXPERIMENT)
    before = {r["key"]: r["_time"] for r in store.records(meta=True)}
    assert len(before) == 2 * (4 * 4 + 2 * 2)
    rows_before = _csv(tiny_run)
    # --resume with everything stored: the same table, no record rewritten.
    out = _run(TINY + ["--out", str(tiny_run), "--resume"], capsys).out
    assert "20 of 40 items stored" not in out and "40 of 40 items stored" in out
    assert {r["key"]: r["_time"] for r in store.records(meta=True)} == before
    assert _csv(tiny_run) == rows_before
    # --from-store: no model, no data, the same numbers (written elsewhere).
    copy = tmp_path / "copy"
    _run(["--from-store", "--store", str(tiny_run / "results.sqlite"), "--out", str(copy),
          "--methods", TINY[-1]], capsys)
    strip = [{k: v for k, v in r.items()} for r in rows_before]
    assert _csv(copy) == strip


def test_resume_refuses_other_settings(tiny_run, capsys):
    argv = [a if a != "30" else "31" for a in TINY]  # --rise-masks 31
    with pytest.raises(SystemExit) as info:
        pg.main(argv + ["--out", str(tiny_run), "--resume"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "num_masks: 30 -> 31" in err


def test_fewer_methods_reuse_the_store(tiny_run, capsys):
    # The settings of every method are in the config, so a subset of methods resumes.
    _run(TINY[:-1] + ["center,grad_cam", "--out", str(tiny_run), "--resume"], capsys)
    assert [r["method"] for r in _csv(tiny_run)] == ["center", "grad_cam"] * 2


# ------------------------------------------------------------------------- trained models


def _shipped_weights() -> bool:
    from torchray_like.benchmark.embedded_models import EMBEDDED_WEIGHTS, weights_path
    return all(digest and os.path.isfile(weights_path(name))
               for name, (_, digest) in EMBEDDED_WEIGHTS.items())


@pytest.mark.skipif(not _shipped_weights(), reason="the embedded models' weights are not shipped")
def test_trained_models_reproduce_the_published_ordering(tmp_path, capsys):
    """The shape of Fong et al. (2019), Table 1, on the embedded benchmark's defaults (128 test
    images; RISE on the first 8, too few to resolve its orderings; extremal perturbation is
    checked on the trained models in test_extremal_perturbation.py, at seconds per image it is
    too slow here), judged by the paired bootstrap of the run.

    On the VGG every published ordering among the fast methods is reproduced significantly:
    Grad-CAM and the gradient above the centre and DeConvNet, Grad-CAM above the gradient and
    guided backprop on the difficult pairs, contrastive excitation backprop above excitation
    backprop and the gradient there.  On the ResNet the orderings on all pairs hold too;
    guided backprop is as class-selective as the best methods there (see docs/embedded.rst),
    so no ordering is reversed but the difficult-pair ones need more images to resolve."""
    out = tmp_path / "trained"
    _run(["--out", out, "--no-report", "--models", "embedded-vgg,embedded-resnet",
          "--methods", "center,gradient,deconvnet,guided_backprop,"
          "grad_cam,excitation_backprop,contrastive_excitation_backprop,rise"], capsys)
    verdicts = {(c["model"], c["subset"], c["better"], c["worse"]): c["verdict"]
                for c in _json(out)["comparisons"]}
    fast = [k for k in verdicts if k[2] != "rise"]
    assert len(fast) == 2 * 8
    for key in fast:
        if key[0] == "embedded-vgg" or key[1] == "all":
            assert verdicts[key] == "reproduced", (key, verdicts)
        else:
            assert verdicts[key] != "reversed", (key, verdicts)
    for model in ("embedded-vgg", "embedded-resnet"):
        assert verdicts[model, "difficult", "rise", "gradient"] in ("not resolved",
                                                                    "reproduced")
    table = {(r["model"], r["method"]): r for r in _csv(out)}
    assert int(table["embedded-vgg", "grad_cam"]["images"]) == 128
    assert int(table["embedded-vgg", "rise"]["images"]) == 8
    # DeConvNet lands at the centre baseline on the ResNet, as on VOC07.
    deconv, centre = (table["embedded-resnet", m] for m in ("deconvnet", "center"))
    assert float(deconv["all_low"]) < float(centre["all_high"])


# ------------------------------------------------------------------------- kill and resume


def test_killed_run_resumes_computing_only_the_missing_items(tmp_path):
    out = tmp_path / "killed"
    argv = ["--weights", "random", "--models", "embedded-resnet", "--methods", "center,rise",
            "--limit", "4", "--rise-limit", "4", "--rise-masks", "1000", "--rise-batch", "100",
            "--out", str(out), "--threads", "1", "--no-report"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT)] + argv, cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = out / "results.sqlite"
    deadline = time.time() + 120
    stored = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if path.exists():
                stored = len(ResultsStore(path, EXPERIMENT))
                if stored >= 5:  # the 4 centre items and at least one RISE item
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert stored >= 5, proc.stderr.read().decode()[-2000:]
    store = ResultsStore(path, EXPERIMENT)
    before = {r["key"]: (r["_pid"], r["_time"]) for r in store.records(meta=True)}
    assert 5 <= len(before) < 8
    _run(argv + ["--resume"])
    after = {r["key"]: (r["_pid"], r["_time"]) for r in store.records(meta=True)}
    assert len(after) == 8
    for key, value in after.items():
        if key in before:
            assert value == before[key]  # kept, not recomputed
        else:
            assert value[0] == os.getpid()  # computed by the resumed run
    rows = _csv(out)
    assert [(r["method"], r["images"]) for r in rows] == [("center", "4"), ("rise", "4")]


# ------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(tmp_path):
    # Extremal perturbation batches each process's own images; occlusion replays its passes.
    argv = ["--weights", "random", "--models", "embedded-vgg,embedded-resnet", "--limit", "8",
            "--rise-limit", "2", "--rise-masks", "30", "--ep-limit", "4", "--ep-iters", "2",
            "--slow-limit", "2", "--methods", "center,gradient,grad_cam,excitation_backprop,"
            "rise,extremal_perturbation,occlusion", "--threads", "1", "--no-report"]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(SCRIPT)] + argv + ["--out", str(two)]
    result = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    one = tmp_path / "one"
    _run(argv + ["--out", str(one)])

    def numbers(folder):
        return [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in _csv(folder)]

    assert numbers(two) == numbers(one)
    assert len(numbers(one)) == 2 * 7

    def records(folder):
        store = ResultsStore(folder / "results.sqlite", EXPERIMENT)
        return {r["key"]: (r["pairs"], r["_rank"]) for r in store.records(meta=True)}

    r1, r2 = records(one), records(two)
    assert r1.keys() == r2.keys()
    assert all(r1[k][0] == r2[k][0] for k in r1)  # same points and hits, image by image
    assert {rank for _, rank in r2.values()} == {0, 1}


# ------------------------------------------------------------------------- VOC protocol


def test_voc07_protocol_on_a_tiny_tree(tmp_path, capsys):
    from tests.test_datasets import make_voc
    from torchray_like.benchmark.datasets import get_dataset
    from torchray_like.benchmark.pointing_game import PointingGameBenchmark, centre_point

    root = make_voc(tmp_path / "voc")
    out = tmp_path / "out"
    text = _run(["--dataset", "voc07", "--data-root", root, "--models", "resnet18",
                 "--weights", "random", "--input-size", "64", "--rise-masks", "20",
                 "--methods", "center,gradient,grad_cam,contrastive_excitation_backprop,rise",
                 "--out", out], capsys).out
    assert "fully_convolutional, pointing_gradient" in text
    assert "saliency_layer=layer4" in text and "contrast_layer=avgpool" in text
    rows = {r["method"]: r for r in _csv(out)}
    assert set(rows) == {"center", "gradient", "grad_cam", "contrastive_excitation_backprop",
                         "rise"}
    # The centre baseline with the package's benchmark, image by image.
    data = get_dataset("voc_2007", "test", dataset_dir=root)
    bench = PointingGameBenchmark(data)
    from torchray_like.benchmark import datasets as ads
    for index in range(len(data)):
        label = data.load_label(index)
        for c in ads.voc_as_class_ids(label):
            bench.evaluate(index, c, centre_point(ads.voc_as_image_size(label)[::-1]))
    assert float(rows["center"]["all"]) == pytest.approx(bench.accuracy)
    assert int(rows["center"]["pairs"]) == int((bench.hits + bench.misses).sum())
    for r in rows.values():
        assert int(r["images"]) == 3 and 0 <= float(r["all"]) <= 1


def test_coco14_protocol_on_a_tiny_tree(tmp_path, capsys):
    from tests.test_datasets import make_coco
    from torchray_like.benchmark import datasets as ads
    from torchray_like.benchmark.datasets import get_dataset
    from torchray_like.benchmark.pointing_game import PointingGameBenchmark, centre_point

    root = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    _run(["--dataset", "coco14", "--data-root", root, "--models", "resnet18", "--weights",
          "random", "--input-size", "48", "--methods", "center,grad_cam", "--out", out], capsys)
    rows = {r["method"]: r for r in _csv(out)}
    data = get_dataset("coco", "val2014", dataset_dir=root)
    bench = PointingGameBenchmark(data, difficult=True)
    for index in range(len(data)):
        label = data.load_label(index)
        for c in ads.coco_as_class_ids(label):
            bench.evaluate(index, c, centre_point(ads.coco_as_image_size(data, label)[::-1]))
    assert int(rows["center"]["difficult_pairs"]) == int((bench.hits + bench.misses).sum())
    assert float(rows["center"]["difficult"]) == pytest.approx(bench.accuracy, nan_ok=True)
    assert int(rows["grad_cam"]["images"]) == 2


# ------------------------------------------------------------------------- compare.py


def test_compare_on_the_vit_lists_the_methods_that_do_not_apply(tmp_path, capsys):
    compare = load_benchmark("compare")
    path = tmp_path / "vit.png"
    assert compare.main(["--model", "embedded-vit", "--weights", "random", "--limit", "1",
                         "--methods", "gradient,guided_backprop,grad_rollout",
                         "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "guided_backprop: n/a (rectifier method" in out
    assert "2 methods in" in out and path.stat().st_size > 1000


def test_compare_embedded_figure(tmp_path, capsys):
    compare = load_benchmark("compare")
    path = tmp_path / "fig.png"
    assert compare.main(["--weights", "random", "--limit", "2", "--methods",
                         "gradient,grad_cam,contrastive_excitation_backprop,rise",
                         "--rise-masks", "20", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"figure: {path}" in out
    from PIL import Image
    with Image.open(path) as image:
        width, height = image.size
    assert width > height > 0  # 2 rows, 5 columns (input + 4 methods)


def test_compare_image_file(tmp_path, capsys):
    from PIL import Image
    compare = load_benchmark("compare")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
                    ).save(tmp_path / "cat.jpg")
    assert compare.main(["--image", str(tmp_path / "cat.jpg"), "--model", "resnet18",
                         "--weights", "random", "--target", "3", "--input-size", "64",
                         "--methods", "gradient,grad_cam,excitation_backprop",
                         "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compare.png").is_file()
    assert f"figure: {tmp_path / 'compare.png'}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nope"], "--methods: unknown name(s) nope"),
    (["--model", "resnet50"], "needs --image"),
    (["--image", "/no/such.jpg"], "cannot read"),
    (["--ep-area", "1.5"], "--ep-area"),
    (["--limit", "0"], "positive integer"),
    (["--rise-masks", "-1"], "positive integer"),
])
def test_compare_bad_arguments(argv, message, capsys):
    compare = load_benchmark("compare")
    with pytest.raises(SystemExit) as info:
        compare.main(argv + ["--weights", "random"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_compare_missing_weights_file_is_an_argparse_error(capsys, tmp_path):
    compare = load_benchmark("compare")
    with pytest.raises(SystemExit) as info:
        compare.main(["--weights", str(tmp_path / "none.pt")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--model embedded-vgg" in err and "none.pt" in err and "Traceback" not in err


def test_compare_options_are_the_settings_table(tmp_path):
    """compare.py calls every method with the table's options (benchmark "compare") and the
    flags' overrides; --ep-area replaces the areas."""
    import argparse

    from torchray_like.benchmark.settings import method_options

    compare = load_benchmark("compare")
    model = torch.nn.Sequential()   # only used for models outside the table
    args = argparse.Namespace(model="embedded-resnet", image=None, rise_masks=7,
                              rise_batch=None, ep_iters=None, ep_area=0.3, seed=5)
    x = torch.zeros(1, 3, 64, 64)
    table = compare.method_options(["grad_cam", "rise", "extremal_perturbation"], model, x,
                                   args)
    assert table["grad_cam"] == method_options("grad_cam", "embedded-resnet", "compare")
    assert table["rise"] == {**method_options("rise", "embedded-resnet", "compare"),
                             "num_masks": 7, "generator": 5, "progress": False}
    assert table["extremal_perturbation"]["areas"] == [0.3]
    assert table["extremal_perturbation"]["max_iter"] == 100


# ------------------------------------------------------------------------- issue 22: shared work


def test_shared_methods_give_their_own_functions_points(tmp_path):
    """The shared backpropagation methods come from one explain call per image: every point is
    the one the method's own function gives, and the call's time is split evenly."""
    from torchray_like.attribution.registry import METHODS
    from torchray_like.benchmark.embedded_cli import load_benchmark_model
    from torchray_like.benchmark.embedded_data import EmbeddedShapes
    from torchray_like.benchmark.pointing_game import saliency_to_point
    from torchray_like.benchmark.settings import method_options

    methods = ["gradient", "guided_backprop", "grad_cam", "gradient_x_input", "eigen_cam"]
    _run(["--weights", "random", "--models", "embedded-vgg", "--limit", "3", "--no-report",
          "--no-progress", "--methods", ",".join(methods), "--out", tmp_path])
    records = {(r["method"], r["index"]): r
               for r in ResultsStore(tmp_path / "results.sqlite", EXPERIMENT).records()}
    assert len(records) == 3 * len(methods)
    model, _ = load_benchmark_model("embedded-vgg", "random", 0, "coco")
    data = EmbeddedShapes("test", size=3)
    for index in range(3):
        x, label = data[index]
        classes = label["class_ids"].tolist()
        batch = x[None].expand(len(classes), *x.shape).contiguous()
        for method in methods:
            maps = METHODS[method](model, batch, classes,
                                   **method_options(method, "embedded-vgg", "pointing_game"))
            own = [list(saliency_to_point(maps[k], tuple(label["image_size"])))
                   for k in range(len(classes))]
            assert [p[3] for p in records[(method, index)]["pairs"]] == own, (method, index)
        assert len({records[(m, index)]["seconds"] for m in methods}) == 1


def test_lrp_limit_and_the_methods_a_model_refuses(tmp_path, capsys):
    out = _run(["--weights", "random", "--models", "embedded-vgg", "--limit", "3",
                "--lrp-limit", "2", "--no-report", "--no-progress", "--methods",
                "center,lrp,attention_rollout", "--out", tmp_path], capsys).out
    assert [(r["method"], r["images"]) for r in _csv(tmp_path)] == [("center", "3"),
                                                                     ("lrp", "2")]
    # The reason: the settings table's, or the method's own refusal (tried on one image).
    assert re.search(r"\n    attention_rollout +n/a: .*attention", out)
    assert _json(tmp_path)["lrp_images"] == 2
    with pytest.raises(SystemExit) as info:
        pg.main(["--lrp-limit", "0", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_smooth_grad_is_seeded_per_image(tmp_path):
    """SmoothGrad's noise comes from each image's seed: two runs give the same points."""
    argv = ["--weights", "random", "--models", "embedded-vgg", "--limit", "2", "--no-report",
            "--no-progress", "--methods", "smooth_grad"]
    points = []
    for run in ("a", "b"):
        torch.manual_seed(len(run) + ord(run))  # a different global state: not used
        _run(argv + ["--out", tmp_path / run])
        store = ResultsStore(tmp_path / run / "results.sqlite", EXPERIMENT)
        points.append({r["key"]: r["pairs"] for r in store.records()})
    assert len(points[0]) == 2 and points[0] == points[1]


def test_compare_leaves_out_the_methods_the_model_refuses(tmp_path, capsys):
    compare = load_benchmark("compare")
    path = tmp_path / "fig.png"
    assert compare.main(["--weights", "random", "--limit", "1", "--methods",
                         "grad_cam,attention_rollout", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "attention_rollout: n/a (attention_rollout: EmbeddedVGG computed no attention" in out
    assert "1 methods in" in out and path.is_file()
    with pytest.raises(SystemExit) as info:
        compare.main(["--weights", "random", "--methods", "attention_rollout",
                      "--out", str(path)])
    assert info.value.code == 2
    assert "the model refuses every method given" in capsys.readouterr().err
