"""benchmarks/method_table.py: the methods page's "which method when" table."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from .conftest import load_benchmark

mt = load_benchmark("method_table")


def test_correlation_by_hand():
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert mt.correlation(a, a) == pytest.approx(1.0)
    assert mt.correlation(a, -a) == pytest.approx(-1.0)
    assert mt.correlation(a, torch.tensor([[1.0, 0.0], [3.0, 2.0]])) == pytest.approx(0.6)
    assert math.isnan(mt.correlation(a, torch.ones(2, 2)))      # constant: undefined


def test_rows_thresholds_and_missing_values():
    measured = {"m1": {"a": {"r": 0.2, "ms": 1.0}, "b": {"r": float("nan"), "ms": 2.0}},
                "m2": {"a": {"r": 0.6, "ms": 3.0}, "b": {"r": float("nan"), "ms": 4.0}}}
    rows = mt.make_rows(measured, {"a": 0.49, "b": 0.5}, ["a", "b"])
    assert rows[0] == {"method": "a", "r": pytest.approx(0.4), "discriminative": "yes",
                       "sanity_rank": 0.49, "sanity": "passes", "ms|m1": 1.0, "ms|m2": 3.0}
    assert rows[1]["discriminative"] == "n/a" and rows[1]["sanity"] == "fails"
    assert mt.make_rows(measured, {}, ["a"])[0]["sanity"] == "not run"
    text = mt.rst_table(rows, ["m1", "m2"])
    assert text.startswith(".. list-table::") and "   * - ``b``" in text
    assert "     - n/a (n/a)" in text and "     - fails (0.50)" in text


def test_sanity_scores_take_the_worst_model(tmp_path):
    (tmp_path / "sanity_checks.json").write_text(json.dumps({"summary": [
        {"method": "gradient", "model": "x", "rank|top": 0.1},
        {"method": "gradient", "model": "y", "rank|top": 0.3},
        {"method": "guided_backprop", "model": "x", "rank|top": None}]}))
    assert mt.sanity_scores(str(tmp_path)) == {"gradient": 0.3}
    assert mt.sanity_scores(str(tmp_path / "absent")) == {}


def test_command_line(tmp_path, capsys):
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "sanity_checks.json").write_text(json.dumps({"summary": [
        {"method": "gradient", "model": "embedded-vgg", "rank|top": 0.12}]}))
    threads = torch.get_num_threads()
    assert mt.main(["--models", "embedded-vgg", "--methods", "gradient,grad_cam",
                    "--limit", "2", "--sanity", str(tmp_path / "sc"),
                    "--out", str(tmp_path / "out")]) == 0
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert printed.strip() == (tmp_path / "out" / "method_table.rst").read_text().strip()
    with open(tmp_path / "out" / "method_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["gradient", "grad_cam"]
    assert rows[0]["sanity"] == "passes" and rows[1]["sanity"] == "not run"
    for r in rows:
        assert -1 <= float(r["r"]) <= 1 and float(r["ms|embedded-vgg"]) > 0
        assert r["discriminative"] == ("yes" if float(r["r"]) < 0.5 else "no")
    meta = json.loads((tmp_path / "out" / "method_table.json").read_text())
    assert meta["images"] == 2 and meta["sanity_below"] == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--methods", "attention_rollout"], "unknown name(s) attention_rollout"),
    (["--models", "vgg16"], "unknown name(s) vgg16"),
    (["--limit", "0"], "expected a positive integer, got 0"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        mt.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_reuse_reads_the_sanity_run_again(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--models", "embedded-vgg", "--methods", "gradient", "--limit", "1",
            "--sanity", str(tmp_path / "none"), "--out", str(out)]
    assert mt.main(argv) == 0
    first = json.loads((out / "method_table.json").read_text())
    assert first["rows"][0]["sanity"] == "not run" and first["rows"][0]["sanity_rank"] is None
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "sanity_checks.json").write_text(json.dumps({"summary": [
        {"method": "gradient", "model": "embedded-vgg", "rank|top": 0.7}]}))
    argv[argv.index(str(tmp_path / "none"))] = str(tmp_path / "sc")
    assert mt.main(argv + ["--reuse"]) == 0
    again = json.loads((out / "method_table.json").read_text())
    assert again["rows"][0]["sanity"] == "fails"
    assert again["rows"][0]["r"] == first["rows"][0]["r"]
    assert again["measured"] == first["measured"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        mt.main(argv[:-2] + ["--out", str(tmp_path / "empty"), "--reuse"])
    assert "--reuse: no usable measurements" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mt.main(["--models", "embedded-vgg", "--methods", "grad_cam", "--out", str(out),
                 "--reuse"])
    assert "lacks grad_cam" in capsys.readouterr().err
