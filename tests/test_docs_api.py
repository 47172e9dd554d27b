"""The Sphinx API reference covers the package: every public module of ``torchray_like`` is named
by an ``.. automodule::`` directive of some ``docs/*.rst`` page (or allow-listed below with the
reason), each module's ``__all__`` names only what the module has, and no module is described
twice (Sphinx's "duplicate object description" warning, which ``sphinx -W`` turns into an error).

Fast: the pages are read as text and the modules imported; the docs build itself is
``tests/test_quality.py``'s.
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re
from typing import Dict, List, NamedTuple

import pytest

import torchray_like

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"

# Public modules deliberately left out of the API reference: module name -> why.  Keep each
# reason true; an entry that is documented after all, or no longer a module, fails
# test_allow_list_is_current.
NOT_DOCUMENTED: Dict[str, str] = {
    # (none at present: the packages' own docstrings, re-exports only, are rendered without
    # :members: so that their re-exported functions are described once, in their own modules)
}


class Directive(NamedTuple):
    page: str
    line: int
    module: str
    options: Dict[str, str]


# ``.. automodule:: name`` and its option lines (``:members:``, ``:no-index:`` ...), at any indent.
_AUTOMODULE = re.compile(r"^(?P<indent>[ \t]*)\.\. automodule::[ \t]+(?P<name>\S+)[ \t]*\n"
                         r"(?P<options>(?:(?P=indent)[ \t]+:[^\n]*\n)*)", re.M)
_OPTION = re.compile(r"^[ \t]+:(?P<key>[\w-]+):[ \t]*(?P<value>.*)$", re.M)


def automodule_directives() -> List[Directive]:
    out = []
    for page in sorted(DOCS.glob("*.rst")):
        text = page.read_text(encoding="utf-8")
        for m in _AUTOMODULE.finditer(text):
            options = {o["key"]: o["value"].strip() for o in _OPTION.finditer(m["options"])}
            out.append(Directive(page.name, text.count("\n", 0, m.start()) + 1, m["name"],
                                 options))
    return out


def public_modules() -> List[str]:
    """``torchray_like`` and every module below it, but those with a ``_private`` part."""
    def fail(name: str) -> None:
        raise ImportError(f"walk_packages could not import {name}")

    names = ["torchray_like"] + [m.name for m in pkgutil.walk_packages(
        torchray_like.__path__, "torchray_like.", onerror=fail)]
    return sorted(n for n in names if not any(p.startswith("_") for p in n.split(".")))


DIRECTIVES = automodule_directives()
MODULES = public_modules()
DOCUMENTED = sorted({d.module for d in DIRECTIVES})


def test_the_walk_and_the_parse_find_something():
    # Guards against a broken walk or regular expression passing every check vacuously.
    assert len(MODULES) >= 80 and "torchray_like.attribution.grad_cam" in MODULES
    assert not [m for m in MODULES if "._" in m]
    assert len(DIRECTIVES) >= 80
    grad_cam = [d for d in DIRECTIVES if d.module == "torchray_like.attribution.grad_cam"]
    assert [(d.page, d.options) for d in grad_cam] == [("api.rst", {"members": ""})]
    runner = [d for d in DIRECTIVES if d.module == "torchray_like.benchmark.runner"]
    assert runner[0].options["members"].startswith("ResultsStore, ")


def test_every_public_module_is_documented():
    missing = [m for m in MODULES if m not in DOCUMENTED and m not in NOT_DOCUMENTED]
    assert not missing, (
        f"{len(missing)} public module(s) named by no '.. automodule::' of docs/*.rst: {missing}; "
        "add each to the page of its neighbours (docs/api.rst for attribution modules), or to "
        "NOT_DOCUMENTED in this file with the reason")


def test_allow_list_is_current():
    assert all(reason.strip() for reason in NOT_DOCUMENTED.values())
    assert not [m for m in NOT_DOCUMENTED if m not in MODULES], "allow-listed non-module"
    assert not [m for m in NOT_DOCUMENTED if m in DOCUMENTED], "allow-listed but documented"


def test_every_directive_names_a_public_module():
    stray = [f"{d.page}:{d.line} {d.module}" for d in DIRECTIVES if d.module not in MODULES]
    assert not stray, f"automodule of no (public) module of torchray_like: {stray}"


def _no_index(d: Directive) -> bool:
    return "no-index" in d.options or "noindex" in d.options


def test_no_module_is_described_twice():
    """A module described by two directives (both indexed) is two descriptions of the module and,
    with ``:members:``, of each of its members: Sphinx warns (an error under ``-W``) and links go
    to either.  A second mention must say ``:no-index:``."""
    pages: Dict[str, List[str]] = {}
    for d in DIRECTIVES:
        if not _no_index(d):
            pages.setdefault(d.module, []).append(f"{d.page}:{d.line}")
    twice = {m: p for m, p in pages.items() if len(p) > 1}
    assert not twice, f"modules described by more than one indexed automodule: {twice}"
    with_members: Dict[str, List[str]] = {}
    for d in DIRECTIVES:
        if "members" in d.options and not _no_index(d):
            with_members.setdefault(d.module, []).append(d.page)
    assert all(len(p) == 1 for p in with_members.values()), with_members


@pytest.mark.parametrize("name", MODULES)
def test_dunder_all_names_exist(name):
    """A stale ``__all__`` entry breaks ``from module import *`` (AttributeError) and autodoc."""
    module = importlib.import_module(name)
    names = getattr(module, "__all__", None)
    if names is None:
        return
    assert isinstance(names, (list, tuple)), f"{name}.__all__ is a {type(names).__name__}"
    assert all(isinstance(n, str) for n in names), f"{name}.__all__ holds a non-string"
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"{name}.__all__ lists {duplicates} twice"
    stale = [n for n in names if not hasattr(module, n)]
    assert not stale, f"{name}.__all__ names what the module lacks: {stale}"
    namespace: Dict[str, object] = {}
    exec(f"from {name} import *", namespace)       # what a reader's star import gets
    assert set(names) <= set(namespace)


def _class_members(module: object) -> set:
    """Attributes and annotated fields of the classes a module defines: ``:exclude-members:``
    applies to the members of the module's classes too (dataclass fields included)."""
    names: set = set()
    for value in vars(module).values():
        if isinstance(value, type) and value.__module__ == getattr(module, "__name__", None):
            names |= set(dir(value)) | set(getattr(value, "__annotations__", {}))
    return names


def test_explicit_members_exist():
    """``:members: a, b`` names attributes of the module and ``:exclude-members: c`` attributes of
    the module or of its classes: a renamed function would otherwise vanish from the page
    (members) or reappear (exclude-members) without a warning."""
    wrong = []
    for d in DIRECTIVES:
        if d.module not in MODULES:
            continue
        module = importlib.import_module(d.module)
        known = {"members": set(dir(module)),
                 "exclude-members": set(dir(module)) | _class_members(module)}
        for key, names in known.items():
            listed = [n.strip() for n in d.options.get(key, "").split(",") if n.strip()]
            wrong += [f"{d.page}:{d.line} :{key}: {n}" for n in listed if n not in names]
    assert not wrong, f"names of no member: {wrong}"
