"""Example data for demos and tests: a model, an input and two categories present in it.

:func:`get_example_data` has TorchRay's signature and return value.  TorchRay returns a
torchvision network with ImageNet weights and a photograph of a dog and a cat; this offline
toolkit ships no photograph with two ImageNet objects that it may redistribute (the only photo
at hand, matplotlib's sample ``grace_hopper.jpg``, shows one subject), and never downloads
weights, so it returns one of the **embedded models** and an image of the embedded data set
instead, with a :class:`UserWarning` that names them:

* ``arch`` names of plain convolutional networks (``"vgg…"``, ``"alexnet"``) →
  ``"embedded-vgg"``; every other torchvision classifier (``"resnet…"``, ``"densenet…"``, …) →
  ``"embedded-resnet"``; ``"embedded-vgg"`` / ``"embedded-resnet"`` select a model directly
  (and warn about nothing).
* The image is test image :data:`EXAMPLE_INDEX` of
  :class:`~torchray_like.benchmark.embedded_data.EmbeddedShapes` (seed 0): a disc and a striped
  object (two classes) on a cluttered background, which both embedded models rank first
  and second.  It is returned at the embedded models' own size,
  ``IMAGE_SIZE × IMAGE_SIZE`` (64 × 64), whatever ``shape`` asks for: the models were trained
  at that size only (the VGG's fully connected head needs it), and resizing would change what
  they see.  The warning says so when ``shape`` differs.

Even with torchvision's ImageNet weights in the local torch hub cache, the embedded pair is
returned (there is no two-object photo to pair them with); load those weights yourself with
``torchvision.models.get_model(arch, weights="DEFAULT")`` for ImageNet examples.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch
import torch.nn as nn

from .embedded_data import EMBEDDED_CLASSES, IMAGE_SIZE, EmbeddedShapes
from .embedded_models import EMBEDDED_MODELS, WeightsError, load_embedded_model

__all__ = ["get_example_data", "EXAMPLE_INDEX", "embedded_model_for_arch"]

#: Index, in the seed-0 ``"test"`` split, of the example image (two objects, two classes).
EXAMPLE_INDEX = 21

_PLAIN = ("vgg", "alexnet")


def embedded_model_for_arch(arch: str) -> str:
    """The embedded model that stands in for the torchvision architecture ``arch``.

    Raises
    ------
    TypeError
        When ``arch`` is not a string.
    ValueError
        When ``arch`` is neither an embedded model nor a torchvision classification model.
    """
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str (e.g. 'vgg16'), got {type(arch).__name__}")
    if arch in EMBEDDED_MODELS:
        return arch
    import torchvision

    known = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in known:
        raise ValueError(
            f"arch must be a torchvision classification model name (e.g. 'vgg16', 'resnet50') "
            f"or one of {EMBEDDED_MODELS}, got {arch!r}")
    return "embedded-vgg" if arch.startswith(_PLAIN) else "embedded-resnet"


def get_example_data(arch: str = "vgg16", shape: int = 224
                     ) -> Tuple[nn.Module, torch.Tensor, int, int]:
    """A model, an input image and two categories present in it (TorchRay's example data).

    Parameters
    ----------
    arch : str
        A torchvision architecture name (``"vgg16"``, ``"resnet50"``, ...) or an embedded model
        name; it selects the embedded model (see the module notes).
    shape : int
        Requested side of the input.  The embedded image is always ``IMAGE_SIZE`` (64) pixels
        (see the module notes); a different value is accepted for compatibility and noted in the
        warning.

    Returns
    -------
    model : torch.nn.Module
        The embedded model in eval mode, on the CPU.
    input : torch.Tensor
        ``(1, 3, 64, 64)`` float32, normalised as the model expects.
    category_id_1, category_id_2 : int
        Two different classes, each present in the image (indices into
        :data:`~torchray_like.benchmark.embedded_data.EMBEDDED_CLASSES`); the model scores the
        first higher.

    Raises
    ------
    TypeError, ValueError
        For a bad ``arch`` or ``shape``.

    Warns
    -----
    UserWarning
        When ``arch`` is a torchvision name: which embedded model and image stand in for it.
    """
    name = embedded_model_for_arch(arch)
    if isinstance(shape, bool) or not isinstance(shape, int):
        raise TypeError(f"shape must be an int, got {type(shape).__name__}")
    if shape < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    try:
        model = load_embedded_model(name)
    except WeightsError as error:
        # Until the shipped weights exist, a random-weight stand-in keeps TorchRay's example
        # scripts running; the warning says the maps are of an untrained model.
        warnings.warn(f"get_example_data: {error}; using {name!r} with RANDOM weights, so the "
                      "maps are of an untrained model", UserWarning, stacklevel=2)
        torch.manual_seed(0)
        model = load_embedded_model(name, pretrained=False)
    x, target = EmbeddedShapes("test", size=EXAMPLE_INDEX + 1, seed=0)[EXAMPLE_INDEX]
    x = x.unsqueeze(0)
    classes = target["class_ids"].tolist()
    with torch.no_grad():
        scores = model(x)[0]
    first, second = sorted(classes, key=lambda c: -float(scores[c]))[:2]
    if arch != name:
        size_note = (f"; the image is {IMAGE_SIZE}x{IMAGE_SIZE}, the size the model was "
                     f"trained at, not the requested {shape}x{shape}" if shape != IMAGE_SIZE
                     else "")
        warnings.warn(
            f"get_example_data: no ImageNet photo ships with torchray_like, so arch={arch!r} "
            f"is replaced by the embedded model {name!r} and test image {EXAMPLE_INDEX} of the "
            f"embedded data set ({EMBEDDED_CLASSES[first]} = {first} and "
            f"{EMBEDDED_CLASSES[second]} = {second}){size_note}", UserWarning, stacklevel=2)
    return model, x, int(first), int(second)
