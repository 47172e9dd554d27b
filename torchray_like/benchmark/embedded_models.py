r"""The embedded models: two small CNNs trained on :mod:`~torchray_like.benchmark.embedded_data`.

``embedded-vgg``
    A plain VGG-style network: 3×3 convolutions with in-place ReLU and 2×2 max pooling in
    ``features`` (an :class:`torch.nn.Sequential`, so layers are named ``"features.N"`` as in
    torchvision's VGG), then a fully connected ``classifier`` on the flattened ``7 × 7`` map.
``embedded-resnet``
    A small ResNet: a strided stem, four stages ``layer1`` … ``layer4`` of torchvision-style
    basic blocks (two 3×3 convolutions with batch norm, ``out += identity``), global average
    pooling and ``fc``.

Both take ``(N, 3, 64, 64)`` images (:data:`~torchray_like.benchmark.embedded_data.IMAGE_SIZE`)
normalised by
:func:`~torchray_like.benchmark.embedded_data.normalize` (what
:class:`~torchray_like.benchmark.embedded_data.EmbeddedShapes` returns by default) and return
``(N, 8)`` logits, one independent (sigmoid) score per class of
:data:`~torchray_like.benchmark.embedded_data.EMBEDDED_CLASSES`: they were trained multi-label
with ``BCEWithLogitsLoss`` by ``benchmarks/train_embedded.py``, at 64 pixels only.  The ResNet
is fully convolutional up to its global pooling and accepts other sizes; the VGG's classifier
reads a 4×4 feature map, so it takes 64² images only.

The weights ship with the package (``torchray_like/benchmark/weights/*.pt``, state dicts); their
SHA-256 digests are recorded in :data:`EMBEDDED_WEIGHTS` and checked on every load.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .embedded_data import IMAGE_SIZE, NUM_CLASSES
from .embedded_vgg16 import EmbeddedVGG16
from .embedded_vit import VIT_LAYERS, build_embedded_vit

__all__ = [
    "EMBEDDED_MODELS", "EMBEDDED_LAYERS", "EMBEDDED_WEIGHTS", "EMBEDDED_ACCURACY",
    "EmbeddedVGG", "EmbeddedResNet", "BasicBlock", "build_embedded_model",
    "load_embedded_model", "weights_path", "WeightsError", "set_accuracy",
    "EMBEDDED_EXAMPLE_MODELS", "EmbeddedVGG16",
]

#: Names accepted by :func:`load_embedded_model`.
EMBEDDED_MODELS: Tuple[str, ...] = ("embedded-vgg", "embedded-resnet")
# The embedded transformer (torchvision's VisionTransformer; see embedded_vit).
EMBEDDED_MODELS += ("embedded-vit",)

#: Embedded models outside the benchmark's tables, also accepted by :func:`load_embedded_model`:
#: ``"embedded-vgg16"``, torchvision VGG16's layout for TorchRay's examples (see
#: :mod:`~torchray_like.benchmark.embedded_vgg16` and ``get_example_data``).
EMBEDDED_EXAMPLE_MODELS: Tuple[str, ...] = ("embedded-vgg16",)

#: Recommended layers per model and method, for the benchmark:
#:
#: ``grad_cam``
#:     Grad-CAM's layer (the last convolutional stage, at 8 × 8: a cell is 8 pixels, as for
#:     VGG16's conv5 at 224 px with 16-pixel cells, about).
#: ``excitation_backprop``
#:     The layer where (contrastive) excitation backprop reads its map.
#: ``contrast``
#:     The contrast layer of contrastive excitation backprop (it cuts the network between the
#:     saliency layer and the classifier).
EMBEDDED_LAYERS: Dict[str, Dict[str, str]] = {
    "embedded-vgg": {
        "grad_cam": "features.14",
        "excitation_backprop": "features.10",
        "contrast": "features.15",
    },
    "embedded-resnet": {
        "grad_cam": "layer3",
        "excitation_backprop": "layer2",
        "contrast": "layer3",
    },
}
EMBEDDED_LAYERS["embedded-vit"] = dict(VIT_LAYERS)
# TorchRay's example layers (relu5_3, pool2, pool5), at 4, 16 and 2 pixels at 64 px.
EMBEDDED_LAYERS["embedded-vgg16"] = {
    "grad_cam": "features.29", "excitation_backprop": "features.9", "contrast": "features.30"}

#: File name and SHA-256 of each model's shipped state dict.
EMBEDDED_WEIGHTS: Dict[str, Tuple[str, str]] = {
    "embedded-vgg": ("embedded_vgg.pt",
                     "9ec68a95d5e6e58522ca874ddb4f9e34a8fac4a2fa52d87468e12c4505beec83"),
    "embedded-resnet": ("embedded_resnet.pt",
                        "b73f2390de708208a1e91e23b658256d0109e952d06a01af31d5cc22ffcb6ec5"),
}
EMBEDDED_WEIGHTS["embedded-vit"] = (
    "embedded_vit.pt", "2280e65318fe145227b9b634efda39ef0ae17b7ac26a50c9785ec60eac5075e3")
EMBEDDED_WEIGHTS["embedded-vgg16"] = (
    "embedded_vgg16.pt", "43fbe08ed87e4f4739dbd813ec88c629d763172110e86fcfada01e9537eb1cc9")

#: Test-split figures of the shipped weights (``benchmarks/train_embedded.py`` prints them):
#: mean per-class average precision over the first 1 000 test images, and the accuracy of
#: thresholding each sigmoid at 0.5 (all 8 labels right) on the first 64, and
#: :func:`set_accuracy` (the top-``L`` classes are the ``L`` present ones) on the first 64.
EMBEDDED_ACCURACY: Dict[str, Dict[str, float]] = {
    "embedded-vgg": {"map": 0.9704, "exact_match_64": 0.875, "set_accuracy_64": 62 / 64},
    "embedded-resnet": {"map": 0.9655, "exact_match_64": 0.875, "set_accuracy_64": 61 / 64},
}
# The transformer is far weaker (8 epochs of 20 000 images on one shared CPU thread, 39 min).
EMBEDDED_ACCURACY["embedded-vit"] = {"map": 0.7023, "exact_match_64": 30 / 64,
                                     "set_accuracy_64": 44 / 64}
EMBEDDED_ACCURACY["embedded-vgg16"] = {"map": 0.9663, "exact_match_64": 0.90625,
                                      "set_accuracy_64": 61 / 64}

_FINAL = IMAGE_SIZE // 16   # side of the last feature map (4 at 64 px)

_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


class WeightsError(RuntimeError):
    """A shipped weight file is missing or does not match its recorded SHA-256."""


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


class EmbeddedVGG(nn.Module):
    """VGG-style plain network (conv, in-place ReLU, max pooling; fully connected head).

    ``features`` (``64 → 4`` pixels)::

        0 conv 3→16   1 relu  2 maxpool                              (32)
        3 conv 16→32  4 relu  5 maxpool                              (16)
        6 conv 32→64  7 relu  8 conv 64→64    9 relu  10 maxpool     (8)
        11 conv 64→128 12 relu 13 conv 128→128 14 relu 15 maxpool    (4)

    ``classifier``: ``0 Linear(128·4·4, 128)  1 ReLU  2 Dropout(0.3)  3 Linear(128, classes)``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES,
                 widths: Tuple[int, int, int, int] = (16, 32, 64, 128), hidden: int = 128) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = 3
        for width, convs in zip(widths, (1, 1, 2, 2)):
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels * _FINAL * _FINAL, hidden), nn.ReLU(inplace=True), nn.Dropout(0.3),
            nn.Linear(hidden, num_classes))
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                # He initialisation (as torchvision's VGG): deep plain ReLU stacks train at all.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                assert m.bias is not None       # built with bias=True (the default) above
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """torchvision's residual basic block: two 3×3 conv + BN, ``out += identity``, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class EmbeddedResNet(nn.Module):
    """Small torchvision-style ResNet (one basic block per stage).

    ``conv1`` (5×5, stride 2) → ``bn1`` → ``relu`` (56 px) → ``layer1`` (16 ch, 56) →
    ``layer2`` (32, 28) → ``layer3`` (64, 14) → ``layer4`` (128, 7) → ``avgpool`` (global) →
    ``fc``.
    """

    # The four stages are registered by ``setattr`` in ``__init__``; declared here for typing.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, num_classes: int = NUM_CLASSES, blocks: Tuple[int, ...] = (1, 1, 1, 1)
                 ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        inplanes = 16
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2), (128, 2))):
            stage = []
            for b in range(blocks[i]):
                stage.append(BasicBlock(inplanes, planes, stride if b == 0 else 1))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            # Zero-init the last BN of each block: every block starts as the identity.
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def set_accuracy(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of images whose ``L`` top-scoring classes are exactly their ``L`` classes.

    A threshold-free multi-label accuracy: an image with classes ``{2, 5}`` counts as right
    when classes 2 and 5 get the two highest scores.

    Parameters
    ----------
    scores : torch.Tensor
        ``(N, C)`` class scores (logits or probabilities).
    truth : torch.Tensor
        ``(N, C)`` bool (or 0/1) multi-hot targets.
    """
    if scores.dim() != 2 or scores.shape != truth.shape:
        raise ValueError(f"scores and truth must both be (N, C); got {tuple(scores.shape)} and "
                         f"{tuple(truth.shape)}")
    truth = truth.bool()
    right = 0
    for s, t in zip(scores, truth):
        k = int(t.sum())
        right += bool(t[s.topk(k).indices].all()) if k else True
    return right / max(len(scores), 1)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {EMBEDDED_MODELS}; got {type(name).__name__}")
    if name not in EMBEDDED_MODELS + EMBEDDED_EXAMPLE_MODELS:
        raise ValueError(f"name must be one of {EMBEDDED_MODELS + EMBEDDED_EXAMPLE_MODELS}, "
                         f"got {name!r}")
    return name


def build_embedded_model(name: str, num_outputs: int = NUM_CLASSES) -> nn.Module:
    """The architecture ``name`` with fresh (random) weights, in train mode.

    ``num_outputs`` other than the 8 classes is for training (auxiliary outputs).
    """
    _check_name(name)
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive int, got {num_outputs!r}")
    if name == "embedded-vit":
        return build_embedded_vit(num_outputs)
    if name == "embedded-vgg16":
        return EmbeddedVGG16(num_outputs)
    return EmbeddedVGG(num_outputs) if name == "embedded-vgg" else EmbeddedResNet(num_outputs)


def weights_path(name: str) -> str:
    """Path of the shipped state dict of model ``name``."""
    return os.path.join(_WEIGHTS_DIR, EMBEDDED_WEIGHTS[_check_name(name)][0])


def _read_checked(name: str, path: str, sha256: str) -> bytes:
    retrain = ("reinstall torchray_like, or rebuild the weights with "
               "`python benchmarks/train_embedded.py --model "
               f"{name}` and record the printed digest in EMBEDDED_WEIGHTS")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise WeightsError(f"weights of {name!r} not found at {path}: {retrain}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise WeightsError(
            f"weights of {name!r} at {path} are corrupt or not the shipped ones: SHA-256 "
            f"{digest}, expected {sha256}; {retrain}")
    return data


def load_embedded_model(name: str, pretrained: bool = True, *,
                        map_location: Optional[str] = "cpu",
                        path: Optional[str] = None, sha256: Optional[str] = None) -> nn.Module:
    """One of :data:`EMBEDDED_MODELS`, in eval mode.

    Parameters
    ----------
    name : {"embedded-vgg", "embedded-resnet"}
        The model.
    pretrained : bool
        Load the shipped weights (default), checking their SHA-256; ``False``: random weights.
    map_location : str, optional
        Passed to :func:`torch.load`.
    path, sha256 : str, optional
        Load another file (e.g. one written by ``benchmarks/train_embedded.py --out``) and check
        it against ``sha256`` (required with ``path``: pass the digest the script printed).

    Returns
    -------
    torch.nn.Module
        The network in eval mode, on the CPU (or ``map_location``).

    Raises
    ------
    ValueError, TypeError
        For an unknown ``name`` or a bad ``pretrained`` / ``path`` / ``sha256``.
    WeightsError
        When the weight file is missing or its SHA-256 differs from the recorded one.  The
        shipped files are part of the package: reinstall it, or retrain with
        ``python benchmarks/train_embedded.py --model NAME`` and record the new digest.
    """
    _check_name(name)
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be a bool, got {type(pretrained).__name__}")
    if (path is None) != (sha256 is None):
        raise ValueError("path and sha256 go together: pass both or neither")
    # Shipped weights replace the random initialisation: draw it from a forked RNG so that
    # loading a trained model leaves the caller's global RNG as it was.  Built on the CPU
    # whatever the caller's default device (a meta one would leave nothing to load into).
    with torch.random.fork_rng(devices=[], enabled=pretrained), torch.device("cpu"):
        model = build_embedded_model(name)
    if pretrained:
        if path is None:
            path, sha256 = weights_path(name), EMBEDDED_WEIGHTS[name][1]
        # Checked above: ``path`` and ``sha256`` are both given or both defaulted here.
        assert sha256 is not None
        data = _read_checked(name, path, sha256)
        try:
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError, EOFError,
                pickle.UnpicklingError) as exc:
            # A file of another architecture or version (the digest matched what was asked).
            raise WeightsError(
                f"weights of {name!r} at {path} do not fit the {name} architecture of this "
                f"version ({type(exc).__name__}: {str(exc).splitlines()[0]}); retrain with "
                f"`python benchmarks/train_embedded.py --model {name}`") from None
    if map_location is not None:
        model = model.to(map_location)
    return model.eval()
