"""README.rst: its Python examples run, its two set-up commands exist, the demo works."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text()


def code_blocks(language: str):
    blocks = []
    for match in re.finditer(rf"^\.\. code-block:: {language}\n\n((?:   .*\n|\n)+)", README,
                             re.MULTILINE):
        lines = [line[3:] for line in match.group(1).splitlines()]
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


PYTHON_BLOCKS = code_blocks("python")


def test_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index):
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(PYTHON_BLOCKS[index], f"README.rst[python block {index}]", "exec"), namespace)


def test_readme_starts_with_exactly_two_setup_commands():
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import readme_command
    finally:
        sys.path.pop(0)
    cmds = readme_command.commands(ROOT / "README.rst")
    assert "pip install" in cmds["install"]
    assert "benchmarks/pointing_game.py" in cmds["install"]   # the main job
    assert "benchmarks/compare.py" in cmds["install"]
    assert "pytest" in cmds["test"]
    # The set-up block is the first code block of the page.
    assert README.index(".. code-block:: bash") < README.index(".. code-block:: python")


def test_demo_runs_and_finds_the_evidence(tmp_path):
    png = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, "-m", "torchray_like.demo", "--methods", "gradient",
         "guided_backprop", "--save", str(png)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 2 and all(line.count("hit") == 2 for line in lines), result.stdout
    assert png.stat().st_size > 1000
