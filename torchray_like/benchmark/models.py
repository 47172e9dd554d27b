r"""Benchmark models: torchvision classifiers with a head for the data set's classes.

* :func:`get_model` builds a torchvision architecture (``vgg16``, ``resnet50``
  or any torchvision classifier name) or one of the embedded models
  (``embedded-vgg``, ``embedded-resnet``), with weights from torchvision's
  enums (read only from the local torch hub cache: nothing is downloaded) or a
  local state-dict file.
* :func:`convert_to_fully_convolutional` turns VGG and ResNet classifiers into
  networks that output a class score map ``(N, C, h, w)``.
* :func:`get_transform` is the matching input transform;
  :func:`replace_module` swaps a sub-module by dotted name.
"""

from __future__ import annotations

__all__ = ["get_model", "get_transform", "replace_module", "convert_to_fully_convolutional",
           "FullyConvolutionalVGG", "NUM_CLASSES", "EMBEDDED_MODELS",
           "IMAGENET_MEAN", "IMAGENET_STD"]

import copy
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
import torchvision
from torchvision import transforms as T

PathLike = Union[str, "os.PathLike[str]"]

NUM_CLASSES = {"voc": 20, "coco": 80, "imagenet": 1000}
"""Number of output classes of each data set's head."""

EMBEDDED_MODELS: tuple[str, ...] = ("embedded-vgg", "embedded-resnet")
"""Model names served by :mod:`torchray_like.benchmark.embedded_models`."""
EMBEDDED_MODELS += ("embedded-vit",)  # the embedded transformer (embedded_vit)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- transforms


def get_transform(dataset: str = "imagenet", size: Union[int, tuple[int, int]] = 224) -> T.Compose:
    """Input transform for the benchmark models (PIL image -> normalised tensor).

    Parameters
    ----------
    dataset:
        ``'imagenet'``, ``'voc'`` or ``'coco'``.  All use ImageNet's mean and
        standard deviation, the statistics the torchvision weights were trained with.
    size:
        An int resizes the shorter side to ``size`` keeping the aspect ratio; a
        pair ``(height, width)`` resizes to exactly that size.

    Returns
    -------
    torchvision.transforms.Compose
        Resize (bilinear, antialiased), ``ToTensor``, ``Normalize``.
    """
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {tuple(NUM_CLASSES)}, got {dataset!r}")
    valid = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
        isinstance(size, (tuple, list)) and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size))
    if not valid:
        raise ValueError(f"size must be a positive int (shorter side) or a pair (height, width) "
                         f"of positive ints, got {size!r}")
    return T.Compose([
        T.Resize(size if isinstance(size, int) else tuple(size),
                 interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


# ---------------------------------------------------------------- surgery


def replace_module(model: nn.Module, module_name: str, new_module: nn.Module) -> nn.Module:
    """Replace the sub-module ``module_name`` of ``model`` in place.

    Parameters
    ----------
    model:
        The network.
    module_name:
        Dotted name as in ``model.named_modules()``, e.g. ``'classifier.6'`` or
        ``'layer4.1.conv2'``.
    new_module:
        The replacement.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, so that TorchRay's ``model = replace_module(model, name, new)``
        works.  (TorchRay returns a copy whose modules off the path are shared with the
        unchanged original; to keep the original, ``copy.deepcopy`` it first.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(new_module, nn.Module):
        raise TypeError(f"new_module must be a torch.nn.Module, got {type(new_module).__name__}")
    if not isinstance(module_name, str) or not module_name:
        raise ValueError(f"module_name must be a non-empty dotted name, got {module_name!r}")
    parent_name, _, child_name = module_name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    if parent is None or child_name not in parent._modules:
        raise ValueError(
            f"model has no sub-module {module_name!r}; names look like "
            f"{[n for n, _ in model.named_modules() if n][:6]}...")
    setattr(parent, child_name, new_module)
    return model


def _linear_to_conv(linear: nn.Linear, in_channels: int, kernel_size: tuple[int, int]) -> nn.Conv2d:
    """A convolution computing ``linear`` on each ``kernel_size`` window (same weights)."""
    kh, kw = kernel_size
    if linear.in_features != in_channels * kh * kw:
        raise ValueError(
            f"cannot convert Linear({linear.in_features}, {linear.out_features}) into a "
            f"{kh}x{kw} convolution over {in_channels} channels")
    conv = nn.Conv2d(in_channels, linear.out_features, (kh, kw), bias=linear.bias is not None)
    with torch.no_grad():
        # Linear's input is the (C, kh, kw) feature block flattened in C-major order.
        conv.weight.copy_(linear.weight.reshape(linear.out_features, in_channels, kh, kw))
        if linear.bias is not None and conv.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv.to(linear.weight.device, linear.weight.dtype)


class FullyConvolutionalVGG(nn.Sequential):
    """VGG with its classifier as convolutions: ``features`` then ``classifier``.

    Outputs a class score map ``(N, C, h, w)`` (``1×1`` for the input size the
    classifier was built for, e.g. ``224×224`` for torchvision's VGG16).  Module
    names (``features.29``, ``classifier.6``) are those of the original VGG.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        features: Any = self.features
        classifier: Any = self.classifier
        x = features(x)
        kh, kw = classifier[0].kernel_size
        if x.shape[-2] < kh or x.shape[-1] < kw:
            raise ValueError(
                f"input too small for the fully convolutional VGG: the features are "
                f"{tuple(x.shape[-2:])}, fc6 needs at least {kh}x{kw}; feed a larger image "
                "(at least the size the classifier was trained on)")
        return classifier(x)


def _vgg_fc6_kernel(model: nn.Module) -> Optional[tuple[int, int]]:
    """Spatial size of the feature block that the first classifier Linear reads, if VGG-like.

    VGG-like: ``features`` then ``classifier`` (Linear/ReLU/Dropout, Linear first),
    with an optional adaptive ``avgpool`` in between (torchvision's VGG) or none
    (a plain VGG whose features already have the right size).
    """
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if not (isinstance(features, nn.Sequential) and isinstance(classifier, nn.Sequential)
            and len(classifier) and isinstance(classifier[0], nn.Linear)
            and all(isinstance(m, (nn.Linear, nn.ReLU, nn.Dropout, nn.Identity))
                    for m in classifier)):
        return None
    pool = getattr(model, "avgpool", None)
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        size: Any = pool.output_size
        kernel = (size, size) if isinstance(size, int) else tuple(size)
        return None if None in kernel else (int(kernel[0]), int(kernel[1]))
    if pool is not None:
        return None
    convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    area, rest = divmod(classifier[0].in_features, convs[-1].out_channels)
    side = int(round(area ** 0.5))
    return (side, side) if rest == 0 and side * side == area else None


def _convert_vgg(model: Any, kernel: tuple[int, int]) -> FullyConvolutionalVGG:
    layers: list[tuple[str, nn.Module]] = []
    for index, (name, module) in enumerate(model.classifier.named_children()):
        if isinstance(module, nn.Linear) and index == 0:
            # fc6: a kh x kw convolution over the feature block
            in_channels = module.in_features // (kernel[0] * kernel[1])
            module = _linear_to_conv(module, in_channels, kernel)
        elif isinstance(module, nn.Linear):  # fc7, fc8: 1x1 convolutions
            module = _linear_to_conv(module, module.in_features, (1, 1))
        else:
            module = copy.deepcopy(module)
        layers.append((name, module))
    # An adaptive pooling is dropped: at the training size it is the identity, and on
    # larger inputs fc6 slides over the feature map instead.
    converted = FullyConvolutionalVGG(OrderedDict(
        features=copy.deepcopy(model.features), classifier=nn.Sequential(OrderedDict(layers))))
    return converted.train(model.training)


# Children of a ResNet in forward order (torchvision's; the embedded ResNet has no maxpool).
_RESNET_CHILDREN = (["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                     "avgpool", "fc"],
                    ["conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4",
                     "avgpool", "fc"])


def _is_resnet_like(model: nn.Module) -> bool:
    if isinstance(model, torchvision.models.ResNet):
        return True
    pool = getattr(model, "avgpool", None)
    return (list(dict(model.named_children())) in _RESNET_CHILDREN
            and isinstance(getattr(model, "fc", None), nn.Linear)
            and isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1)))


def _convert_resnet(model: Any) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_children():
        if name == "avgpool":
            continue  # averaging commutes with the 1x1 conv: average the score map instead
        if name == "fc":
            module = _linear_to_conv(model.fc, model.fc.in_features, (1, 1))
        else:
            module = copy.deepcopy(module)
        layers.append((name, module))
    return nn.Sequential(OrderedDict(layers)).train(model.training)


def convert_to_fully_convolutional(model: nn.Module) -> nn.Module:
    """Make a VGG or ResNet classifier output a class score map.

    * VGG (torchvision's, or any model with ``features`` and a ``classifier``
      of Linear/ReLU/Dropout, with or without an adaptive ``avgpool``, such as
      ``embedded-vgg``): ``fc6`` becomes a ``7×7`` convolution (the size of the
      feature block it reads), ``fc7`` and ``fc8`` ``1×1`` convolutions, and the
      adaptive pooling is removed (:class:`FullyConvolutionalVGG`).  At the
      training input size (``224×224`` for VGG16) the ``1×1`` score map equals
      the original logits.
    * ResNet (torchvision's, or one with the same children in forward order, such
      as ``embedded-resnet``): ``avgpool`` + ``fc`` become a ``1×1`` convolution
      with ``fc``'s weights; the spatial mean of the score map equals the
      original logits for any input size.

    Parameters
    ----------
    model:
        The classifier; it is left unchanged.

    Returns
    -------
    torch.nn.Module
        A new network (copied weights) mapping ``(N, 3, H, W)`` to ``(N, C, h, w)``,
        in the same train/eval mode; sub-module names are kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _is_resnet_like(model):
        return _convert_resnet(model)
    kernel = _vgg_fc6_kernel(model)
    if kernel is not None:
        return _convert_vgg(model, kernel)
    raise TypeError(
        f"convert_to_fully_convolutional supports VGG and ResNet models, got "
        f"{type(model).__name__}")


_to_fully_convolutional = convert_to_fully_convolutional


# ---------------------------------------------------------------- weights


def _classifier_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _final_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the classification head (last Linear/Conv2d with 1000 outputs)."""
    found = None
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module.out_features == 1000) or (
                isinstance(module, nn.Conv2d) and module.out_channels == 1000):
            if not name.startswith(("AuxLogits", "aux")):  # Inception/GoogLeNet side heads
                found = (name, module)
    if found is None:
        raise ValueError(f"cannot find the 1000-class head of {type(model).__name__}")
    return found


def _new_head(head: Any, num_classes: int) -> nn.Module:
    """A freshly initialised head like ``head`` with ``num_classes`` outputs."""
    if isinstance(head, nn.Linear):
        new: nn.Module = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    else:  # a Conv2d head (SqueezeNet)
        new = nn.Conv2d(head.in_channels, num_classes, head.kernel_size, head.stride,
                        head.padding, bias=head.bias is not None)
    return new.to(head.weight.device, head.weight.dtype)


def _weights_enum(arch: str, weights: Any) -> Optional[Any]:
    """The torchvision weights enum member meant by ``weights``, or None if not one."""
    if isinstance(weights, torchvision.models.WeightsEnum):
        return weights
    if not isinstance(weights, str):
        return None
    enum = torchvision.models.get_model_weights(arch)
    if weights == "DEFAULT":
        return enum.DEFAULT
    name = weights.split(".")[-1]  # accept 'IMAGENET1K_V1' and 'ResNet50_Weights.IMAGENET1K_V1'
    return enum.__members__.get(name)


def _cached_weights_file(weights: Any) -> Path:
    """The torch hub cache file of a torchvision weights entry (must exist)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {weights} are not in the local torch hub cache and nothing is "
            f"downloaded: put the file {os.path.basename(weights.url)} (from {weights.url}) "
            f"at {path} (the cache is $TORCH_HOME/hub/checkpoints), or pass a local "
            "state-dict path as weights")
    return path


def _load_state_dict(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"the state dict {source} does not fit {type(model).__name__} with this "
            f"head ({_head_size(model)} classes); check arch and dataset:\n{error}") from error


def _head_size(model: nn.Module) -> str:
    for module in reversed(list(model.modules())):
        if isinstance(module, nn.Linear):
            return str(module.out_features)
        if isinstance(module, nn.Conv2d):
            return str(module.out_channels)
    return "?"


def get_model(arch: str = "vgg16", dataset: str = "voc",
              convert_to_fully_convolutional: bool = False,
              weights: Union[None, str, PathLike, Mapping[str, Any], Any] = None) -> nn.Module:
    """A benchmark model, in eval mode.

    Parameters
    ----------
    arch:
        ``'vgg16'``, ``'resnet50'``, any torchvision classifier name
        (``torchvision.models.list_models(module=torchvision.models)``), or
        ``'embedded-vgg'`` / ``'embedded-resnet'`` (the models of
        :mod:`torchray_like.benchmark.embedded_models`).
    dataset:
        ``'voc'`` (20 classes), ``'coco'`` (80) or ``'imagenet'`` (1000): the
        size of the classification head.  Ignored by the embedded models, whose
        head is that of the embedded data set.
    convert_to_fully_convolutional:
        Return :func:`convert_to_fully_convolutional` of the model (VGG, ResNet).
    weights:
        ``None``: random initialisation.  ``'DEFAULT'``, an enum member name
        (``'IMAGENET1K_V1'``) or a :class:`torchvision.models.WeightsEnum`:
        torchvision's ImageNet weights, loaded only from the local torch hub
        cache (``torch.hub.get_dir()/checkpoints``); for ``'voc'``/``'coco'`` the
        1000-class head is then replaced by a new, randomly initialised one.  A
        path to a file (or a dict) holding a state dict for ``arch`` with the
        ``dataset``'s head: loaded strictly.  For the embedded models, ``None``
        loads their shipped weights and a state dict (file or dict) replaces them.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    FileNotFoundError
        torchvision weights not in the cache, or a missing state-dict file.
    ValueError
        Unknown ``arch``/``dataset``/``weights``, or a state dict that does not fit.
    """
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a string, got {type(arch).__name__}")
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {tuple(NUM_CLASSES)}, got {dataset!r}")
    num_classes = NUM_CLASSES[dataset]

    if arch in EMBEDDED_MODELS:
        model = _build_embedded(arch, weights)
    else:
        names = _classifier_names()
        if arch not in names:
            raise ValueError(
                f"arch must be 'vgg16', 'resnet50', another torchvision classifier "
                f"({', '.join(names[:5])}, ...) or one of {EMBEDDED_MODELS}; got {arch!r}")
        model = _build_torchvision(arch, num_classes, weights)

    model.eval()
    if convert_to_fully_convolutional:
        model = _to_fully_convolutional(model)  # the argument shadows the function's name
    return model


def _build_embedded(arch: str, weights: Any) -> nn.Module:
    # Imported lazily: a separate module, only needed for these names.
    from torchray_like.benchmark.embedded_models import load_embedded_model

    if weights is None:
        return load_embedded_model(arch)  # the shipped weights
    if isinstance(weights, Mapping):
        state, source = weights, "given as a dict"
    elif isinstance(weights, (str, os.PathLike)) and Path(weights).expanduser().is_file():
        state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        source = f"in {weights}"
        if not isinstance(state, Mapping):
            raise ValueError(f"{weights} does not hold a state dict (got {type(state).__name__})")
    else:
        raise ValueError(
            f"weights for {arch!r} must be None (the shipped weights), a state-dict file or a "
            f"state dict; got {weights!r}")
    model = load_embedded_model(arch, pretrained=False)
    _load_state_dict(model, state, source)
    return model


def _build_torchvision(arch: str, num_classes: int, weights: Any) -> nn.Module:
    if weights is None:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if isinstance(weights, Mapping):
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        _load_state_dict(model, weights, "given as a dict")
        return model
    if isinstance(weights, (str, os.PathLike)) and Path(weights).expanduser().is_file():
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{weights} does not hold a state dict (got {type(state).__name__})")
        _load_state_dict(model, state, f"in {weights}")
        return model
    enum_member = _weights_enum(arch, weights)
    if enum_member is not None:
        _cached_weights_file(enum_member)
        # torchvision reads an existing cache file without downloading anything.
        model = torchvision.models.get_model(arch, weights=enum_member)
        if num_classes != len(enum_member.meta["categories"]):
            name, head = _final_head(model)
            replace_module(model, name, _new_head(head, num_classes))
        return model
    if isinstance(weights, (str, os.PathLike)):
        members = list(torchvision.models.get_model_weights(arch).__members__)
        raise FileNotFoundError(
            f"weights={str(weights)!r} is neither a torchvision weights name for {arch} "
            f"('DEFAULT', {', '.join(repr(m) for m in members)}) nor an existing "
            "state-dict file")
    raise TypeError(f"weights must be None, a weights name, a WeightsEnum, a path or a state "
                    f"dict; got {type(weights).__name__}")
