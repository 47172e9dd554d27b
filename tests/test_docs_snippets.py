"""The Python examples of the Sphinx pages run against the library as it is.

Each ``.. code-block:: python`` of ``docs/*.rst`` is run with the names a reader has at that
point of the page (a model, an input batch, a class) bound to the embedded models and images,
the blocks of a page in order in one namespace, as a reader runs them.  A renamed function, a
changed argument or a wrong layer name in the docs fails here.  Blocks that need data we cannot
ship (PASCAL VOC) or a user's own function are listed with the reason and checked to compile.
"""

from __future__ import annotations

import ast
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


def _literal_blocks(text: str) -> List[Tuple[int, str]]:
    """``[(line, code)]`` of the ``::`` literal blocks that are Python (they parse; shell
    commands and printed tables do not)."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        head = lines[i]
        if not head.rstrip().endswith("::") or head.lstrip().startswith(".. "):
            i += 1
            continue
        indent, j = len(head) - len(head.lstrip()), i + 1
        while j < len(lines) and (not lines[j].strip()
                                  or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        code = textwrap.dedent("\n".join(lines[i + 1:j])).strip("\n") + "\n"
        try:
            ast.parse(code)
        except SyntaxError:
            code = ""
        if code.strip():
            out.append((i + 2, code))
        i = j
    return out


def python_blocks() -> Dict[str, List[Tuple[int, str]]]:
    """Page name → ``[(line, code)]`` of its Python blocks (``code-block:: python`` and Python
    ``::`` blocks), in the page's order."""
    pages: Dict[str, List[Tuple[int, str]]] = {}
    for path in sorted(DOCS.glob("*.rst")):
        text = path.read_text()
        blocks = [(text[:m.start()].count("\n") + 1, textwrap.dedent(m.group(3)))
                  for m in _BLOCK.finditer(text)] + _literal_blocks(text)
        if blocks:
            pages[path.name] = sorted(blocks)
    return pages


PAGES = python_blocks()

# Blocks that cannot run here, by (page, index on the page) → why.
NOT_RUN = {
    ("datasets.rst", 0): "reads PASCAL VOC from disk (tests/test_datasets.py builds a tiny one)",
    ("benchmarks.rst", 2): "a template around the user's own compute_one, run by "
                           "tests/test_runner.py's run_sharded tests",
    ("evaluation.rst", 0): "per-image hits elided with '...' (tests/test_intervals.py)",
    ("torchray.rst", 0): "imports TorchRay itself, not a dependency",
    ("torchray.rst", 1): "a signature, not a call",
    ("torchray.rst", 2): "opens the reader's cat.jpg",
    ("transformers.rst", 0): "downloads torchvision's ViT-B/16 weights",
    ("transformers.rst", 1): "a timm ViT with registers and a Swin (tests/test_cam_tokens.py)",
    ("transformers.rst", 2): "a timm ViT (tests/test_cam_tokens.py)",
    ("transformers.rst", 3): "pytorch-grad-cam's code, for comparison",
    ("transformers.rst", 4): "a timm ViT (tests/test_cam_tokens.py)",
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


def _vgg_names() -> Dict[str, Any]:
    from torchray_like.attribution.common import Probe, get_module
    from torchray_like.attribution.excitation_backprop import ExcitationBackpropContext
    from torchray_like.attribution.grad_cam import grad_cam
    from torchray_like.attribution.guided_backprop import GuidedBackpropContext
    from torchray_like.attribution.maps import Shape
    torch.manual_seed(0)
    vgg16 = torchvision.models.vgg16(num_classes=8).eval()
    return {"torch": torch, "model": load_embedded_model("embedded-vgg").eval(),
            "resnet": load_embedded_model("embedded-resnet").eval(), "vgg16": vgg16,
            "x": _images(2)[:1], "x2": _images(2), "target": 1, "targets": [1, 2],
            "category_id": 1, "c": 1, "grad_cam": grad_cam, "Shape": Shape, "Probe": Probe,
            "get_module": get_module, "ExcitationBackpropContext": ExcitationBackpropContext,
            "GuidedBackpropContext": GuidedBackpropContext,
            "saliency_layer": "features.10", "contrast_layer": "features.15",
            "classifier_layer": "classifier.3"}


def _quantus_names() -> Dict[str, Any]:
    pytest.importorskip("quantus")
    data = EmbeddedShapes("test", size=2, seed=0)
    x = torch.stack([data[i][0] for i in range(2)])
    # A class present in each image (an absent one can have an all-zero Grad-CAM map, which
    # Quantus refuses).
    y = [int(data[i][1]["labels"][0]) for i in range(2)]
    return {"model": load_embedded_model("embedded-resnet").eval(), "x": x.numpy(), "y": y}


SETUP: Dict[str, Callable[[], Dict[str, Any]]] = {
    "benchmarks.rst": _vgg_names, "usage.rst": _vgg_names, "torchray.rst": _vgg_names,
    "evaluation.rst": _quantus_names,
    "lrp.rst": _lrp_names, "plotting.rst": _plotting_names, "speed.rst": _model_names,
    "transformer_relevance.rst": _vit_names, "troubleshooting.rst": _troubleshooting_names,
}

# What a block of a page runs on where the page's model is not the setup's default.
BLOCK_MODEL = {("lrp.rst", 1): "vgg_model", ("usage.rst", 2): "resnet",
               ("torchray.rst", 3): "vgg16"}


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
    if page in ("benchmarks.rst", "usage.rst"):
        names["x"], names["target"] = names["x2"], names["targets"]
    if page == "evaluation.rst":
        names["y"] = __import__("numpy").array(names["y"])
    if (page, index) in BLOCK_MODEL:
        names["model"] = names[BLOCK_MODEL[(page, index)]]
    return code


def test_the_docs_have_python_examples():
    assert sum(len(blocks) for blocks in PAGES.values()) >= 30
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
