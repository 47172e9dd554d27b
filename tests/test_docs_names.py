"""The names the docs give exist: every dotted ``torchray_like.…`` name of ``README.rst`` and
``docs/*.rst`` (in roles, ``literals`` or prose) resolves to a module or an attribute, every
``benchmarks/*.py``, ``tests/*.py`` and ``docs/*.py`` file named exists, and every ``--option``
of a documented ``python benchmarks/X.py ...`` command line is spelled out in that script or
in the shared option code it uses (argparse would also accept an unambiguous prefix, such as
``--model`` for ``--models``; the docs should not rely on that).

Sphinx ``-W`` catches broken cross-reference *roles* only; a renamed function quoted as a
``literal`` or a renamed test file goes unnoticed without this file.  Fast (text and imports,
no script is run) and offline.
"""

from __future__ import annotations

import importlib
import pathlib
import re
from typing import List, NamedTuple, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.rst"] + sorted((ROOT / "docs").glob("*.rst"))

# Source files whose argparse options every benchmark script shares (``--device``, ``--seed``,
# ``--out``, ``--store``, ``--resume`` ...), besides the script itself.
SHARED_OPTION_SOURCES = [ROOT / "torchray_like" / "benchmark" / "runner.py",
                         ROOT / "torchray_like" / "benchmark" / "embedded_cli.py",
                         *sorted((ROOT / "benchmarks").glob("_*.py"))]

_DOTTED = re.compile(r"(?<![\w.])torchray_like(?:\.[A-Za-z_]\w*)+")
_FILE = re.compile(r"(?<![\w/.])((?:benchmarks|tests|docs)/[\w/]+\.py)\b")
# ``python benchmarks/X.py`` or ``torchrun ... benchmarks/X.py`` and what follows it on the
# line, up to a comment, a closing literal or a shell operator.
_COMMAND = re.compile(r"(?:python\S*|torchrun)\s[^`#&|;]*?(benchmarks/\w+\.py)([^`#&|;]*)")
_OPTION = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


class Mention(NamedTuple):
    page: str
    line: int
    text: str


def _logical_lines(page: pathlib.Path) -> List[Mention]:
    """The page's lines, with shell continuations (a trailing backslash) joined."""
    out: List[Mention] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        start, text = i + 1, lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i].strip()
        out.append(Mention(page.name, start, text))
        i += 1
    return out


def _mentions(pattern: re.Pattern, group: int = 0) -> List[Mention]:
    found = []
    for page in PAGES:
        for where in _logical_lines(page):
            for m in pattern.finditer(where.text):
                found.append(Mention(where.page, where.line, m.group(group).rstrip(".")))
    return found


def _resolves(dotted: str) -> bool:
    """``dotted`` is an importable module, or an attribute chain below the longest one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


DOTTED = _mentions(_DOTTED)
FILES = _mentions(_FILE, 1)
COMMANDS = [Mention(m.page, m.line, m.text) for page in PAGES for m in _logical_lines(page)
            if _COMMAND.search(m.text)]


def test_the_pages_name_things():
    # The extraction itself works: the pages quote many names, files and commands.
    assert len({m.text for m in DOTTED}) > 100
    assert len({m.text for m in FILES}) > 20
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("name", sorted({m.text for m in DOTTED}))
def test_dotted_name_exists(name: str):
    pages = sorted({f"{m.page}:{m.line}" for m in DOTTED if m.text == name})
    assert _resolves(name), f"{name} (named in {', '.join(pages)}) does not exist"


def test_named_files_exist():
    missing = [f"{m.page}:{m.line}: {m.text}" for m in FILES if not (ROOT / m.text).is_file()]
    assert not missing, "files named in the docs that do not exist:\n" + "\n".join(missing)


def _spelled_options(script: str) -> Set[str]:
    sources = [ROOT / script, *SHARED_OPTION_SOURCES]
    text = "\n".join(p.read_text(encoding="utf-8") for p in sources if p.is_file())
    return {"--help"} | set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", text))


def test_command_line_options_exist():
    bad = []
    for where in COMMANDS:
        for m in _COMMAND.finditer(where.text):
            script, rest = m.group(1), m.group(2)
            if not (ROOT / script).is_file():
                bad.append(f"{where.page}:{where.line}: {script} does not exist")
                continue
            known = _spelled_options(script)
            bad += [f"{where.page}:{where.line}: {script} has no option {opt}"
                    for opt in _OPTION.findall(rest) if opt not in known]
    assert not bad, "command lines of the docs that the scripts do not accept:\n" + "\n".join(bad)
