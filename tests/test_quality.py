"""Project checks that run with the tests: the linter, the type checker and the docs build.

They are run as the developers run them (``ruff check .``; ``mypy torchray_like``;
``sphinx-build -W``), so a lint error, a type error or a docs warning fails CI like a failing
test.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    """pyflakes, pycodestyle, import order and McCabe complexity ≤ 12 (``ruff.toml``)."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    pytest.importorskip("mypy")
    result = subprocess.run([sys.executable, "-m", "mypy", "torchray_like"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
                             "html", str(ROOT / "docs"), str(tmp_path / "html")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                    if not p.name.startswith("_"))


#: Flags retired so that a name means the same in every script: --limit counts images,
#: --input-size is the input side, --repeats the timed calls, --weights FILE|random a file.
RETIRED_FLAGS = ("--images", "--size", "--repeat", "--random-weights", "--json", "--batch",
                 "--iters", "--masks")


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_script_has_help(script):
    """Every public script under benchmarks/ answers --help (private helpers start with _),
    with the shared flag names only."""
    import re

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage:" in result.stdout and "--" in result.stdout, result.stdout
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", result.stdout))
    assert not flags & set(RETIRED_FLAGS), (script, sorted(flags & set(RETIRED_FLAGS)))
    if "--weights" in flags:
        assert "FILE" in result.stdout, script


def test_speed_cases_are_a_table_not_plugins():
    """speed.py lists its cases (no speed_*.py discovered by file name, no sys.modules
    back-channel), and no script re-implements the pointing game."""
    text = (ROOT / "benchmarks" / "speed.py").read_text()
    assert "CASES = (" in text and "glob(" not in text and "sys.modules" not in text
    assert sorted(p.name for p in (ROOT / "benchmarks").glob("speed_*.py")) == [
        "speed_extremal.py", "speed_rise.py"]
    assert not (ROOT / "benchmarks" / "_pointing_check.py").exists()
