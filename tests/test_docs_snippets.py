"""The Python examples of the Sphinx pages run against the library as it is.

Each ``.. code-block:: python`` of ``docs/*.rst`` is run with the names a reader has at that
point of the page (a model, an input batch, a class) bound to the embedded models and images,
the blocks of a page in order in one namespace, as a reader runs them.  A renamed function, a
changed argument or a wrong layer name in the docs fails here.  Blocks that need data we cannot
ship (PASCAL VOC) or a user's own function are listed with the reason and checked to compile.
"""

from __future__ import annotations

import pathlib
import re
import textwrap
from typing import Any, Callable, Dict, List, Tuple

import matplotlib
import pytest
import torch
import torch.nn as nn
import torchvision

from torchray_like.attribution.registry import METHODS
from torchray_like.benchmark.embedded_data import EmbeddedShapes
from torchray_like.benchmark.embedded_models import load_embedded_model

matplotlib.use("Agg")

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"^( *)\.\. code-block:: python\n((?:\1 +:.*\n)*)\n((?:\1   .*\n|\n)+)",
                    re.MULTILINE)


def python_blocks() -> Dict[str, List[Tuple[int, str]]]:
    """Page name → ``[(line, code)]`` of its Python blocks, in order."""
    pages: Dict[str, List[Tuple[int, str]]] = {}
    for path in sorted(DOCS.glob("*.rst")):
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text[:match.start()].count("\n") + 1
            pages.setdefault(path.name, []).append((line, textwrap.dedent(match.group(3))))
    return pages


PAGES = python_blocks()

# Blocks that cannot run here, by (page, index on the page) → why.
NOT_RUN = {
    ("datasets.rst", 0): "reads PASCAL VOC from disk (tests/test_datasets.py builds a tiny one)",
    ("benchmarks.rst", 0): "a template around the user's own compute_one, run by "
                           "tests/test_runner.py's run_sharded tests",
}


def _images(n: int) -> torch.Tensor:
    data = EmbeddedShapes("test", size=n, seed=0)
    return torch.stack([data[i][0] for i in range(n)])


class MyAttentionFreeBlock(nn.Module):
    """The custom layer type of docs/lrp.rst's composite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def _lrp_names() -> Dict[str, Any]:
    # A VGG-16 (the page names features.28) whose first layer starts with a custom block,
    # random weights.
    torch.manual_seed(0)
    model = torchvision.models.vgg16(num_classes=8).eval()
    model.features[0] = nn.Sequential(MyAttentionFreeBlock(), model.features[0])
    x = _images(2)
    names: Dict[str, Any] = {"torch": torch, "x": x, "category": 1,
                             "MyAttentionFreeBlock": MyAttentionFreeBlock,
                             "low": x.amin(dim=(0, 2, 3), keepdim=True),
                             "high": x.amax(dim=(0, 2, 3), keepdim=True)}
    names["model"] = load_embedded_model("embedded-resnet").eval()
    names["vgg_model"] = model
    return names


def _plotting_names() -> Dict[str, Any]:
    model = load_embedded_model("embedded-resnet").eval()
    x4 = _images(4)
    cam4 = METHODS["grad_cam"](model, x4, 1, saliency_layer="layer3", resize=True)
    return {"torch": torch, "x4": x4, "cam4": cam4,
            "grad_map": METHODS["gradient"](model, x4[:2], 1), "cam_map": cam4[:2],
            "rise_map": METHODS["rise"](model, x4[:1], 1, num_masks=64,
                                        generator=0).expand(2, -1, -1, -1),
            "signals": torch.randn(2, 2, 200), "video": torch.rand(1, 3, 6, 48, 48)}


def _model_names() -> Dict[str, Any]:
    return {"torch": torch, "model": load_embedded_model("embedded-resnet").eval(),
            "x": _images(2), "target": [1, 2], "category": 1, "c": 1}


def _vit_names() -> Dict[str, Any]:
    return {"torch": torch, "vit": load_embedded_model("embedded-vit").eval(),
            "x": _images(2), "category": 1}


def _troubleshooting_names() -> Dict[str, Any]:
    names = _model_names()
    from torchray_like.attribution.guided_backprop import GuidedBackpropContext
    names["GuidedBackpropContext"] = GuidedBackpropContext
    return names


SETUP: Dict[str, Callable[[], Dict[str, Any]]] = {
    "lrp.rst": _lrp_names, "plotting.rst": _plotting_names, "speed.rst": _model_names,
    "transformer_relevance.rst": _vit_names, "troubleshooting.rst": _troubleshooting_names,
}

# What a block of a page runs on where the page's model is not the setup's default.
BLOCK_MODEL = {("lrp.rst", 1): "vgg_model"}


def _special(page: str, index: int, code: str, names: Dict[str, Any]) -> str:
    """Per-block adjustments that keep the page's text: the plotting page's 1-D and video
    blocks get maps of their own inputs' shapes."""
    if page == "plotting.rst":
        # The page's first figure shows four images, the next ones two.
        names["x"] = names["x4"] if index == 0 else names["x4"][:2]
    if page == "plotting.rst" and "signals" in code:
        names["saliency"] = torch.rand(2, 1, 200)
    elif page == "plotting.rst" and "video" in code:
        names["saliency"] = torch.rand(1, 1, 6, 48, 48)
    elif page == "plotting.rst":
        names["saliency"] = names["cam4"] if index == 0 else names["cam4"][:2]
    if (page, index) in BLOCK_MODEL:
        names["model"] = names[BLOCK_MODEL[(page, index)]]
    return code


def test_the_docs_have_python_examples():
    assert sum(len(blocks) for blocks in PAGES.values()) >= 15
    assert set(NOT_RUN) | {(p, i) for p in SETUP for i in range(len(PAGES.get(p, [])))} \
        <= {(p, i) for p, blocks in PAGES.items() for i in range(len(blocks))}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # examples save figures in the working folder
    names = SETUP[page]() if page in SETUP else {}
    names["__name__"] = f"docs_{page}"
    for index, (line, code) in enumerate(PAGES[page]):
        compiled = compile(code, f"docs/{page}:{line}", "exec")
        if (page, index) in NOT_RUN:
            continue
        code = _special(page, index, code, names)
        exec(compile(code, f"docs/{page}:{line}", "exec"), names)
        assert compiled is not None
