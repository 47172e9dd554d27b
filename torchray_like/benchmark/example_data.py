"""Example data for demos and tests: a model, an input and two categories present in it.

:func:`get_example_data` has TorchRay's signature and return value, and TorchRay's example
snippets run on it unchanged — ``grad_cam(model, x, category_id, saliency_layer='features.29')``,
``contrastive_excitation_backprop(model, x, category_id, saliency_layer='features.9',
contrast_layer='features.30', classifier_layer='classifier.6')`` and the others.  TorchRay
downloads torchvision's ImageNet VGG16 and a photograph of a dog and a cat; this toolkit never
downloads anything, so what a user gets depends on what is on the machine:

1. **torchvision's ImageNet weights already in the local torch hub cache** (the file
   ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth`` for ``arch="vgg16"``, or the file of
   any of ``arch``'s torchvision ImageNet weights): torchvision's ``arch`` with those weights and
   a real photograph, scikit-image's public-domain ``skimage.data.chelsea()`` (a tabby cat),
   resized and centre-cropped to ``shape`` and normalised with ImageNet's mean and standard
   deviation, as TorchRay does.  The photograph shows one animal, so the two category ids are
   the two domestic-cat classes of ImageNet (281 tabby … 285 Egyptian cat) the network scores
   highest: both maps are of the same cat.
2. **Otherwise** (the usual case offline) one of the **embedded models**, trained on the
   embedded data set and shipped with the package, and a test image of that data set holding
   two objects of two classes, which the model ranks first and second:

   * ``"vgg16"`` (TorchRay's default) → ``"embedded-vgg16"``, a narrow network with
     torchvision VGG16's module names and layer kinds (``features.0`` … ``features.30``,
     ``avgpool``, ``classifier.0`` … ``classifier.6``), so TorchRay's layer names work;
   * other plain convolutional networks (``"vgg11"``, ``"vgg19"``, ``"vgg16_bn"``,
     ``"alexnet"``; their layer names differ from VGG16's anyway) → ``"embedded-vgg"``;
   * every other torchvision classifier (``"resnet50"``, …) → ``"embedded-resnet"``;
   * an embedded model's name selects it directly (and warns about nothing).

   The image is ``IMAGE_SIZE × IMAGE_SIZE`` (64 × 64) whatever ``shape`` asks for: the models
   were trained at that size only, and resizing would change what they see.

Each substitution is announced by a :class:`UserWarning` naming the model, the picture, the
two categories and why (the cache file that was found, or that none was).
"""

from __future__ import annotations

import itertools
import os
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .embedded_data import EMBEDDED_CLASSES, IMAGE_SIZE, EmbeddedShapes
from .embedded_models import (
    EMBEDDED_EXAMPLE_MODELS,
    EMBEDDED_MODELS,
    WeightsError,
    load_embedded_model,
)

__all__ = ["get_example_data", "EXAMPLE_INDEX", "EXAMPLE_INDICES", "CAT_CATEGORIES",
           "embedded_model_for_arch", "cached_imagenet_weights"]

#: Index, in the seed-0 ``"test"`` split, of the example image of ``embedded-vgg`` and
#: ``embedded-resnet`` (a disc and a striped object).
EXAMPLE_INDEX = 21

#: Embedded model → index of its example image in the seed-0 ``"test"`` split (two objects of
#: two classes, which that model ranks first and second).  ``embedded-vgg16``'s, a triangle and a
#: ring, is the first test image with two classes on which its maps of both classes by guided
#: backprop, Grad-CAM and linear approximation (``features.29``) and (contrastive) excitation
#: backprop (``features.9``) all point at the right object.
EXAMPLE_INDICES = {"embedded-vgg": EXAMPLE_INDEX, "embedded-resnet": EXAMPLE_INDEX,
                   "embedded-vgg16": 158}

#: ImageNet's domestic-cat classes (tabby, tiger cat, Persian, Siamese, Egyptian cat): the
#: categories of the photograph ``skimage.data.chelsea()``.
CAT_CATEGORIES: Tuple[int, ...] = (281, 282, 283, 284, 285)

#: ImageNet's normalisation (torchvision's and TorchRay's).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_PLAIN = ("vgg", "alexnet")

Shape = Union[int, Tuple[int, int]]


def _torchvision_names() -> List[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def embedded_model_for_arch(arch: str) -> str:
    """The embedded model that stands in for the torchvision architecture ``arch``.

    ``"vgg16"`` → ``"embedded-vgg16"`` (VGG16's layer names); other ``"vgg…"`` and
    ``"alexnet"`` → ``"embedded-vgg"``; other torchvision classifiers → ``"embedded-resnet"``;
    an embedded model's name → itself.

    Raises
    ------
    TypeError
        When ``arch`` is not a string.
    ValueError
        When ``arch`` is neither an embedded model nor a torchvision classification model.
    """
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str (e.g. 'vgg16'), got {type(arch).__name__}")
    if arch in EMBEDDED_MODELS + EMBEDDED_EXAMPLE_MODELS:
        return arch
    if arch not in _torchvision_names():
        raise ValueError(
            f"arch must be a torchvision classification model name (e.g. 'vgg16', 'resnet50') "
            f"or one of {EMBEDDED_MODELS + EMBEDDED_EXAMPLE_MODELS}, got {arch!r}")
    if arch == "vgg16":
        return "embedded-vgg16"
    return "embedded-vgg" if arch.startswith(_PLAIN) else "embedded-resnet"


def cached_imagenet_weights(arch: str) -> Optional[Tuple[str, object]]:
    """``(path, weights enum)`` of torchvision ImageNet weights of ``arch`` already in the local
    torch hub cache (``torch.hub.get_dir()/checkpoints``), or ``None``.  Never downloads.

    The default weights are preferred when several files are there.
    """
    import torchvision

    if arch not in _torchvision_names():
        return None
    enum = torchvision.models.get_model_weights(arch)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    for weights in candidates:
        categories = weights.meta.get("categories")
        if not categories or len(categories) != 1000:   # e.g. vgg16's feature-only weights
            continue
        path = os.path.join(folder, os.path.basename(weights.url))
        if os.path.isfile(path):
            return path, weights
    return None


def _check_shape(shape: object) -> Tuple[int, int]:
    """``shape`` (an int, or a (height, width) pair) as ``(height, width)``."""
    sides: Sequence[object] = shape if isinstance(shape, (tuple, list)) else (shape,)
    checked: List[int] = []
    for side in sides:
        if isinstance(side, bool) or not isinstance(side, int):
            raise TypeError(f"shape must be an int or a (height, width) pair of ints, got "
                            f"{shape!r}")
        if side < 1:
            raise ValueError(f"shape must be positive, got {shape!r}")
        checked.append(side)
    if len(checked) not in (1, 2):
        raise ValueError(f"shape must be an int or a (height, width) pair, got {shape!r}")
    return (checked[0], checked[-1])


def _photo_input(shape: object) -> torch.Tensor:
    """``skimage.data.chelsea()`` resized and centre-cropped to ``shape`` (TorchRay's
    ``Resize(shape)``, ``CenterCrop(shape)``), ImageNet-normalised, ``(1, 3, H, W)``."""
    import skimage.data
    import torchvision.transforms.functional as TF

    photo = torch.from_numpy(skimage.data.chelsea().copy()).permute(2, 0, 1).float() / 255
    height, width = _check_shape(shape)
    # An int resizes the shorter side (then crops the centre); a pair resizes to it exactly.
    size = [height] if isinstance(shape, int) else [height, width]
    photo = TF.resize(photo, size, antialias=True)
    photo = TF.center_crop(photo, [height, width]).clamp(0, 1)
    photo = TF.normalize(photo, _IMAGENET_MEAN, _IMAGENET_STD)
    return photo.unsqueeze(0).contiguous()


def _imagenet_example(arch: str, path: str, weights: object, shape: object
                      ) -> Optional[Tuple[nn.Module, torch.Tensor, int, int]]:
    """torchvision's ``arch`` with the cached ``weights`` and the cat photograph; ``None`` (with
    a warning) when the cached file does not load."""
    import torchvision

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Built on the meta device and given the file's tensors: no random initialisation of
        # (for VGG16) 138 million parameters that would be overwritten at once.
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, weights=None)
        model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            # A tensor the file does not hold (a non-persistent buffer): build it for real.
            model = torchvision.models.get_model(arch, weights=None)
            model.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - any unreadable file: say so, fall back
        first_line = (str(error).splitlines() or [""])[0]
        warnings.warn(f"get_example_data: the cached ImageNet weights {path} of {arch!r} do not "
                      f"load ({type(error).__name__}: {first_line}); using the embedded model "
                      "instead", UserWarning, stacklevel=3)
        return None
    model.eval()
    x = _photo_input(shape)
    with torch.no_grad():
        scores = model(x)[0]
    first, second = sorted(CAT_CATEGORIES, key=lambda c: -float(scores[c]))[:2]
    names = weights.meta["categories"]  # type: ignore[attr-defined]
    warnings.warn(
        f"get_example_data: torchvision's {arch!r} with the ImageNet weights found in the local "
        f"torch hub cache ({path}; nothing was downloaded) and the photograph "
        f"skimage.data.chelsea() (one cat) at {tuple(x.shape[-2:])}: categories {first} "
        f"({names[first]}) and {second} ({names[second]}), the two ImageNet cat classes the "
        "network scores highest, both of the same cat", UserWarning, stacklevel=3)
    return model, x, int(first), int(second)


def get_example_data(arch: str = "vgg16", shape: Shape = 224
                     ) -> Tuple[nn.Module, torch.Tensor, int, int]:
    """A model, an input image and two categories present in it (TorchRay's example data).

    Parameters
    ----------
    arch : str
        A torchvision architecture name (``"vgg16"``, ``"resnet50"``, ...) or an embedded model
        name (see the module notes for which model and picture each gives).
    shape : int or (int, int)
        Side (or ``(height, width)``) of the photograph when torchvision's cached ImageNet
        weights are used.  The embedded image is always ``IMAGE_SIZE`` (64) pixels; another
        value is accepted for compatibility and noted in the warning.

    Returns
    -------
    model : torch.nn.Module
        The network in eval mode, on the CPU.
    input : torch.Tensor
        ``(1, 3, H, W)`` float32 (the model's dtype: float64 under
        ``torch.set_default_dtype(torch.float64)``), normalised as the model expects.
    category_id_1, category_id_2 : int
        Two different categories present in the image (embedded: indices into
        :data:`~torchray_like.benchmark.embedded_data.EMBEDDED_CLASSES`; photograph: ImageNet
        ids); the model scores the first higher.

    Raises
    ------
    TypeError, ValueError
        For a bad ``arch`` or ``shape``.

    Warns
    -----
    UserWarning
        When ``arch`` is a torchvision name: which model and picture it got, and why.
    """
    name = embedded_model_for_arch(arch)
    _check_shape(shape)
    if arch != name:
        cached = cached_imagenet_weights(arch)
        if cached is not None:
            example = _imagenet_example(arch, cached[0], cached[1], shape)
            if example is not None:
                return example
    return _embedded_example(arch, name, shape)


def _embedded_example(arch: str, name: str, shape: object
                      ) -> Tuple[nn.Module, torch.Tensor, int, int]:
    try:
        model = load_embedded_model(name)
    except WeightsError as error:
        # Until the shipped weights exist, a random-weight stand-in keeps TorchRay's example
        # scripts running; the warning says the maps are of an untrained model.
        warnings.warn(f"get_example_data: {error}; using {name!r} with RANDOM weights, so the "
                      "maps are of an untrained model", UserWarning, stacklevel=3)
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left alone
            torch.manual_seed(0)
            model = load_embedded_model(name, pretrained=False)
    index = EXAMPLE_INDICES.get(name, EXAMPLE_INDEX)   # a model added later: the common image
    x, target = EmbeddedShapes("test", size=index + 1, seed=0)[index]
    # In the model's dtype: float64 under the caller's torch.set_default_dtype(torch.float64).
    x = x.unsqueeze(0).to(next(model.parameters()).dtype)
    classes = target["class_ids"].tolist()
    with torch.no_grad():
        scores = model(x)[0]
    first, second = sorted(classes, key=lambda c: -float(scores[c]))[:2]
    if arch != name:
        wanted = _check_shape(shape)
        size_note = (f"; the image is {IMAGE_SIZE}x{IMAGE_SIZE}, the size the model was "
                     f"trained at, not the requested {wanted[0]}x{wanted[1]}"
                     if wanted != (IMAGE_SIZE, IMAGE_SIZE) else "")
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        warnings.warn(
            f"get_example_data: torchvision's ImageNet weights of {arch!r} are not in the local "
            f"torch hub cache ({cache}) and torchray_like never downloads, so arch={arch!r} is "
            f"replaced by the embedded model {name!r} and test image {index} of the embedded "
            f"data set ({EMBEDDED_CLASSES[first]} = {first} and {EMBEDDED_CLASSES[second]} = "
            f"{second}){size_note}", UserWarning, stacklevel=3)
    return model, x, int(first), int(second)
