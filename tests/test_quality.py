"""Project checks that run with the tests: the type checker and the docs build.

Both are run as the developers run them (``mypy torchray_like``; ``sphinx-build -W``), so a
type error or a docs warning fails CI like a failing test.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_script_has_help(script):
    """Every public script under benchmarks/ answers --help (private helpers start with _)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage:" in result.stdout and "--" in result.stdout, result.stdout
