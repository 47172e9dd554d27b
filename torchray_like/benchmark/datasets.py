r"""Benchmark data sets: PASCAL VOC 2007, MS COCO 2014 and ImageNet-style image folders.

The classes extend their :mod:`torchvision.datasets` counterparts with label
converters (class ids, object masks, image size) used by the pointing game
(:mod:`torchray_like.benchmark.pointing_game`).  The converters also exist as
stand-alone functions taking the label that the data set returns.

Nothing is downloaded unless ``download=True`` is given (and only VOC can be
downloaded by torchvision); the data are read from ``dataset_dir``.  See
``docs/datasets.rst`` for the expected layouts on disk.

Conventions
-----------
* **Class ids** are 0-based indices into :data:`VOC_CLASSES` (20 names) or :data:`COCO_CLASSES`
  (80 names, COCO's sparse category ids 1..90 mapped to 0..79 in increasing order).
* **Image sizes**: ``voc_as_image_size`` / ``coco_as_image_size`` return TorchRay's
  ``(width, height)``; masks and ``CocoTarget.image_size`` are ``(height, width)``.
* **Masks** are boolean :class:`torch.Tensor` of shape ``(height, width)``.
"""

from __future__ import annotations

__all__ = [
    "coco_as_class_ids", "coco_as_image_size", "coco_as_mask", "voc_as_class_ids",
    "voc_as_image_size", "voc_as_mask", "voc_as_image_name", "voc_load_label",
    "coco_as_image_id", "coco_as_image_name", "ImageFolder", "VOCDetection", "CocoDetection",
    "get_dataset",
    "DatasetNotFoundError", "DatasetFormatError", "CocoTarget", "VOC_CLASSES",
    "COCO_CLASSES", "COCO_CATEGORY_IDS", "IMAGENET_CLASSES", "DATASET_NAMES",
]

import json
import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data.dataloader import default_collate

from .dataset_common import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    IMAGENET_CLASSES,
    VOC_CLASSES,
    DatasetFormatError,
    DatasetNotFoundError,
    check_coco_image_size,
    check_limiter,
    first_items,
)
from .image_folder import ImageFolder, warn_partial_imagenet

PathLike = Union[str, "os.PathLike[str]"]

_COCO_CATEGORY_TO_CLASS = {cat: k for k, cat in enumerate(COCO_CATEGORY_IDS)}
_VOC_CLASS_TO_ID = {name: k for k, name in enumerate(VOC_CLASSES)}

DATASET_NAMES = ("voc_2007", "coco", "imagenet")
"""Names accepted by :func:`get_dataset`."""

_VOC_SUBSETS = ("train", "trainval", "val", "test")


# --------------------------------------------------------------------------- VOC


def _voc_annotation(label: Any) -> Mapping[str, Any]:
    """The ``annotation`` dict of a VOC label (as parsed by torchvision)."""
    if isinstance(label, Mapping) and isinstance(label.get("annotation"), Mapping):
        return label["annotation"]
    raise TypeError(
        "label must be a PASCAL VOC label, the dict {'annotation': {...}} returned by "
        f"VOCDetection (torchvision's parse_voc_xml); got {type(label).__name__}")


def _voc_where(label: Any) -> str:
    """' in the VOC annotation of <file>', for messages (empty when the label has no name)."""
    name = str(_voc_annotation(label).get("filename", "")).strip()
    return f" in the VOC annotation of image {name!r}" if name else " in the VOC label"


def voc_as_image_name(label: Any) -> str:
    """Image name (file stem, e.g. ``'000001'``) of a PASCAL VOC label; ``''`` if absent."""
    name = str(_voc_annotation(label).get("filename", "")).strip()
    return Path(name).stem if name else ""


def _voc_objects(label: Any) -> list[Mapping[str, Any]]:
    """The list of object dicts of a VOC label (none, one or many objects)."""
    objects = _voc_annotation(label).get("object", [])
    if isinstance(objects, Mapping):  # a hand-made label with a single object
        objects = [objects]
    out = []
    for obj in objects:
        if isinstance(obj, Mapping):
            out.append(obj)
        elif isinstance(obj, list):  # torchvision nests an image without objects as [[]]
            out.extend(o for o in obj if isinstance(o, Mapping))
    return out


def _voc_class_id(obj: Mapping[str, Any], label: Any = None) -> int:
    name = str(obj.get("name", "")).strip()
    if name not in _VOC_CLASS_TO_ID:
        where = _voc_where(label) if label is not None else ""
        raise ValueError(
            f"VOC object name {name!r}{where} is not one of the 20 VOC_CLASSES; is this a "
            "PASCAL VOC annotation?")
    return _VOC_CLASS_TO_ID[name]


def _voc_is_difficult(obj: Mapping[str, Any]) -> bool:
    return str(obj.get("difficult", "0")).strip() not in ("0", "", "False", "false")


def _check_class_id(class_id: Any, classes: Sequence[str], what: str) -> int:
    if isinstance(class_id, bool) or not isinstance(class_id, (int, np.integer)):
        raise TypeError(f"class_id must be an int in [0, {len(classes)}), got {class_id!r}")
    if not 0 <= int(class_id) < len(classes):
        raise ValueError(f"class_id must be in [0, {len(classes)}) for {what}, got {class_id}")
    return int(class_id)


def voc_as_class_ids(label: Any, include_difficult: bool = True) -> list[int]:
    """Class ids of the objects in a PASCAL VOC label.

    Parameters
    ----------
    label:
        The label of a VOC image (second element of a :class:`VOCDetection` item).
    include_difficult:
        Whether classes whose objects are all marked ``difficult`` count.  The
        default keeps them, so that a benchmark loop visits them and
        :class:`~torchray_like.benchmark.pointing_game.PointingGameBenchmark`
        reports them as skipped (0).

    Returns
    -------
    list of int
        Sorted, unique indices into :data:`VOC_CLASSES`.
    """
    ids = {_voc_class_id(obj, label) for obj in _voc_objects(label)
           if include_difficult or not _voc_is_difficult(obj)}
    return sorted(ids)


def voc_as_image_size(label: Any) -> tuple[int, int]:
    """Size ``(width, height)`` of the image of a PASCAL VOC label (TorchRay's order).

    Parameters
    ----------
    label:
        The label of a VOC image.

    Returns
    -------
    tuple of int
        ``(width, height)`` in pixels, read from the annotation's ``size`` field (the
        order of PIL's ``image.size``; a tensor's trailing dimensions are the reverse).
    """
    size: Any = _voc_annotation(label).get("size")
    try:
        return int(size["width"]), int(size["height"])
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(f"no valid 'size' (height, width) field{_voc_where(label)}; got "
                         f"{size!r}") from error


def voc_as_mask(label: Any, class_id: int, exclude_difficult: bool = False) -> torch.Tensor:
    """Union of the bounding boxes of a class's objects, as a boolean mask.

    VOC boxes are 1-based inclusive pixel ranges: ``xmin=1, xmax=W`` covers the
    full width.

    Parameters
    ----------
    label:
        The label of a VOC image.
    class_id:
        Index into :data:`VOC_CLASSES`.
    exclude_difficult:
        Leave out objects marked ``difficult`` (the pointing-game protocol does).

    Returns
    -------
    torch.Tensor
        Boolean ``(height, width)`` mask; all False when the class is absent.

    Raises
    ------
    DatasetFormatError
        A box of the class is malformed (missing, ``xmin > xmax``, ``ymin > ymax``, or
        outside the image): the message names the image file and the object.
    """
    class_id = _check_class_id(class_id, VOC_CLASSES, "VOC")
    width, height = voc_as_image_size(label)
    mask = torch.zeros(height, width, dtype=torch.bool)
    for number, obj in enumerate(_voc_objects(label), 1):
        if _voc_class_id(obj, label) != class_id or (exclude_difficult
                                                     and _voc_is_difficult(obj)):
            continue
        xmin, ymin, xmax, ymax = _voc_box(label, obj, number, (height, width))
        # 1-based inclusive -> 0-based half-open, clipped to the image.
        mask[max(ymin - 1, 0):min(ymax, height), max(xmin - 1, 0):min(xmax, width)] = True
    return mask


def _voc_box(label: Any, obj: Mapping[str, Any], number: int,
             size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The 1-based inclusive box of an object, refused when it would give a wrong mask."""
    box = obj.get("bndbox", {})
    what = f"object {number} ({str(obj.get('name', '')).strip()!r}){_voc_where(label)}"
    try:
        xmin, ymin, xmax, ymax = (int(round(float(box[k])))
                                  for k in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, KeyError, ValueError, OverflowError) as error:
        raise DatasetFormatError(f"{what} has no valid 'bndbox' (four finite numbers "
                                 f"xmin, ymin, xmax, ymax): {box!r}") from error
    # An inverted or off-image box would give an empty mask: every point a silent miss.
    problem = ("xmin > xmax" if xmin > xmax else "ymin > ymax" if ymin > ymax else
               "outside the image" if min(xmax, ymax) < 1 or xmin > size[1] or ymin > size[0]
               else "")
    if problem:
        raise DatasetFormatError(
            f"{what} has a malformed box ({problem}): xmin={xmin}, ymin={ymin}, xmax={xmax}, "
            f"ymax={ymax} in an image of (height, width) = {size}; fix the annotation file or "
            "leave the image out (torch.utils.data.Subset)")
    return xmin, ymin, xmax, ymax


def voc_load_label(dataset: Any, index: int) -> dict[str, Any]:
    """The label ``{'annotation': {...}}`` of item ``index`` of a VOC data set (this
    module's or torchvision's ``VOCDetection``), read without decoding the image.

    Raises :class:`DatasetFormatError` naming the annotation file when it is not well-formed
    VOC XML, :class:`DatasetNotFoundError` when it is missing.
    """
    _check_index(index, len(dataset))
    path = dataset.annotations[index]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise DatasetFormatError(f"the VOC annotation file {path} is not well-formed XML "
                                 f"({error}); restore it from the VOC archive") from None
    except FileNotFoundError:
        raise DatasetNotFoundError(f"the VOC annotation file {path} is missing (listed in "
                                   "the ImageSets split file)") from None
    if root.tag != "annotation":
        raise DatasetFormatError(f"the VOC annotation file {path} has root element "
                                 f"<{root.tag}>, not <annotation>")
    return dataset.parse_voc_xml(root)


def _detection_collate(batch: Sequence[tuple[Any, Any]]) -> tuple[Any, list[Any]]:
    """``collate_fn`` for a DataLoader: images stacked by default collation, labels as a list."""
    images = default_collate([item[0] for item in batch])
    return images, [item[1] for item in batch]


class VOCDetection(torchvision.datasets.VOCDetection):
    """PASCAL VOC detection data set with label converters.

    A :class:`torchvision.datasets.VOCDetection`; items are ``(image, label)``
    with ``label`` torchvision's dict parsed from the annotation XML.
    """

    classes = VOC_CLASSES
    num_classes = len(VOC_CLASSES)

    def __init__(self, *args: Any, limiter: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.images = first_items(self.images, limiter)  # type: ignore[has-type]
        self.targets = first_items(self.targets, limiter)  # type: ignore[has-type]

    # The converters are the module's functions (their docstrings apply).
    as_class_ids = staticmethod(voc_as_class_ids)
    as_image_name = staticmethod(voc_as_image_name)
    as_image_size = staticmethod(voc_as_image_size)
    as_mask = staticmethod(voc_as_mask)
    collate = staticmethod(_detection_collate)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """``(image, label)``; a malformed annotation file is named (:func:`voc_load_label`)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__} {index!r}")
        if not -len(self) <= index < len(self):
            # IndexError (not ValueError): iteration over a data set stops on it.
            raise IndexError(f"index {index!r} is out of range for a data set of "
                             f"{len(self)} items")
        label = voc_load_label(self, int(index))
        image = Image.open(self.images[index]).convert("RGB")
        if self.transforms is not None:
            image, label = self.transforms(image, label)
        return image, label

    def load_label(self, index: int) -> dict[str, Any]:
        """The label of item ``index`` without decoding its image (cheap)."""
        return voc_load_label(self, index)

    def image_name(self, index: int) -> str:
        """Image name (file stem, e.g. ``'000001'``) of item ``index``."""
        _check_index(index, len(self))
        return Path(self.images[index]).stem

    def get_image_url(self, i: int) -> str:
        """The path of image ``i`` (TorchRay's name)."""
        _check_index(i, len(self))
        return str(self.images[i])


# -------------------------------------------------------------------------- COCO


class CocoTarget(list):
    """A COCO label: the list of annotation dicts, plus the image's id and size.

    A plain ``list`` for all purposes (torchvision's label), with attributes
    ``image_id`` and ``image_size`` (``(height, width)``) so that the label alone
    suffices for :func:`coco_as_mask` and :func:`coco_as_image_size`.
    """

    def __init__(self, annotations: Sequence[Any] = (), image_id: Optional[int] = None,
                 image_size: Optional[tuple[int, int]] = None) -> None:
        super().__init__(annotations)
        self.image_id = image_id
        self.image_size = image_size


def _coco_annotations(label: Any) -> list[Mapping[str, Any]]:
    if not isinstance(label, (list, tuple)) or not all(isinstance(a, Mapping) for a in label):
        raise TypeError(
            "label must be a COCO label, the list of annotation dicts returned by "
            f"CocoDetection; got {type(label).__name__}")
    return list(label)


def _coco_class_id(annotation: Mapping[str, Any]) -> int:
    category = annotation.get("category_id")
    if category not in _COCO_CATEGORY_TO_CLASS:
        raise ValueError(
            f"COCO annotation has category_id {category!r}, not one of the 80 standard "
            "COCO categories (ids 1..90, see COCO_CATEGORY_IDS)")
    return _COCO_CATEGORY_TO_CLASS[category]


def coco_as_class_ids(label: Any) -> list[int]:
    """Class ids of the objects in a COCO label.

    Parameters
    ----------
    label:
        The label of a COCO image (list of annotation dicts).

    Returns
    -------
    list of int
        Sorted, unique indices into :data:`COCO_CLASSES` (not COCO category ids).
    """
    return sorted({_coco_class_id(a) for a in _coco_annotations(label)})


def _split_dataset_args(args: tuple[Any, ...], name: str, extra: int) -> tuple[Any, tuple]:
    """Accept ``f(label, ...)`` and TorchRay's ``f(dataset, label, ...)``."""
    if len(args) == extra + 2:
        return args[0], args[1:]
    if len(args) == extra + 1:
        return None, args
    forms = ("label" + ", class_id" * extra, "dataset, label" + ", class_id" * extra)
    raise TypeError(f"{name}() takes ({forms[0]}) or ({forms[1]}); got {len(args)} "
                    "positional arguments")


def coco_as_image_id(label: Any) -> Optional[int]:
    """COCO image id of a label (its ``image_id``, else its annotations'); ``None`` if unknown."""
    image_id = getattr(label, "image_id", None)
    if image_id is None:
        ids = {int(a["image_id"]) for a in _coco_annotations(label)
               if a.get("image_id") is not None}
        if len(ids) > 1:
            raise ValueError(f"the COCO label mixes annotations of images {sorted(ids)}")
        image_id = ids.pop() if ids else None
    return image_id


def coco_as_image_name(dataset: Any, label: Any) -> str:
    """Image name (file stem) of a COCO label, looked up in ``dataset.coco`` (TorchRay's form)."""
    imgs = getattr(getattr(dataset, "coco", None), "imgs", None)
    image_id = coco_as_image_id(label)
    if imgs is None or image_id not in imgs:
        raise ValueError(f"coco_as_image_name: image id {image_id} is not in the data set "
                         "passed as dataset (pass the CocoDetection the label came from)")
    return Path(imgs[image_id]["file_name"]).stem


def coco_as_image_size(*args: Any) -> tuple[int, int]:
    """Size ``(width, height)`` of the image of a COCO label (TorchRay's order).

    Call as ``coco_as_image_size(label)`` when ``label`` comes from this
    module's :class:`CocoDetection` (a :class:`CocoTarget` that knows its
    size), or as ``coco_as_image_size(dataset, label)`` (TorchRay's form) to look
    the size up in ``dataset.coco``.

    Returns
    -------
    tuple of int
        ``(width, height)`` in pixels (``CocoTarget.image_size`` is the reverse).
    """
    dataset, (label,) = _split_dataset_args(args, "coco_as_image_size", 0)
    _coco_annotations(label)
    size = getattr(label, "image_size", None)  # (height, width)
    if size is not None:
        return int(size[1]), int(size[0])
    image_id = coco_as_image_id(label)
    coco = getattr(dataset, "coco", None)
    if coco is not None and image_id in getattr(coco, "imgs", {}):
        info = coco.imgs[image_id]
        return int(info["width"]), int(info["height"])
    for annotation in label:  # an RLE segmentation records the image size, (height, width)
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, Mapping) and "size" in segmentation:
            return int(segmentation["size"][1]), int(segmentation["size"][0])
    raise ValueError(
        "cannot tell the image size of this COCO label: pass the dataset too "
        "(coco_as_image_size(dataset, label)) or use a label from "
        "torchray_like.benchmark.datasets.CocoDetection")


def _coco_segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode one COCO segmentation (polygons or RLE) to a (height, width) uint8 array."""
    from pycocotools import mask as mask_utils  # optional dependency, needed for COCO only

    if isinstance(segmentation, list):  # polygons: one flat [x1, y1, x2, y2, ...] list each
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE
    elif isinstance(segmentation, Mapping) and "counts" in segmentation:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported COCO segmentation: {type(segmentation).__name__}")
    with warnings.catch_warnings():
        # pycocotools' compiled decoder trips a NumPy 2 "__array__ ... copy" deprecation
        # notice that is none of the caller's business.
        warnings.filterwarnings("ignore", message=r"__array__ implementation",
                                category=DeprecationWarning)
        return mask_utils.decode(rle)


def coco_as_mask(*args: Any, image_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Union of the segmentation masks of a class's objects in a COCO label.

    Call as ``coco_as_mask(label, class_id)`` with a label from this module's
    :class:`CocoDetection`, or ``coco_as_mask(dataset, label, class_id)``
    (TorchRay's form); ``image_size=(height, width)`` may be given for a bare
    list of annotations.  Crowd (RLE) annotations are included, as
    pycocotools' ``annToMask`` would decode them.

    Returns
    -------
    torch.Tensor
        Boolean ``(height, width)`` mask; all False when the class is absent.
    """
    dataset, (label, class_id) = _split_dataset_args(args, "coco_as_mask", 1)
    class_id = _check_class_id(class_id, COCO_CLASSES, "COCO (an index into COCO_CLASSES, "
                               "not a COCO category id)")
    if image_size is None:
        image_size = (coco_as_image_size(label) if dataset is None
                      else coco_as_image_size(dataset, label))[::-1]
    height, width = (int(s) for s in image_size)
    check_coco_image_size(_coco_annotations(label), height, width)
    mask = np.zeros((height, width), dtype=bool)
    for annotation in _coco_annotations(label):
        if _coco_class_id(annotation) == class_id:
            decoded = _coco_segmentation_mask(annotation.get("segmentation", []), height, width)
            if decoded.ndim == 3:  # pycocotools keeps a trailing axis for lists of RLEs
                decoded = np.asarray(decoded.any(axis=2))
            mask |= np.asarray(decoded, dtype=bool)
    return torch.from_numpy(mask)


class CocoDetection(torchvision.datasets.CocoDetection):
    """MS COCO detection data set with label converters (needs ``pycocotools``).

    A :class:`torchvision.datasets.CocoDetection` whose labels are
    :class:`CocoTarget` lists (the annotation dicts, plus ``image_id`` and
    ``image_size``).
    """

    classes = COCO_CLASSES
    num_classes = len(COCO_CLASSES)

    def __init__(self, root: PathLike, annFile: PathLike,  # noqa: N803 - torchvision's name
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None,
                 transforms: Optional[Callable] = None, *, limiter: Optional[int] = None) -> None:
        try:
            super().__init__(root, str(annFile), transform, target_transform, transforms)
            self.ids = first_items(self.ids, limiter)  # type: ignore[has-type]
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError, KeyError,
                TypeError) as error:  # pycocotools' errors on a truncated or foreign file
            raise DatasetFormatError(
                f"the COCO annotation file {annFile} is not a valid COCO instances file "
                f"({type(error).__name__}: {error}); it may be truncated: download it "
                "again") from None

    def _load_target(self, id: int) -> CocoTarget:  # noqa: A002 - torchvision's name
        info = self.coco.imgs[id]
        return CocoTarget(super()._load_target(id), image_id=id,
                          image_size=(int(info["height"]), int(info["width"])))

    # The module's converters; as methods they get the data set first (TorchRay's form).
    as_class_ids = staticmethod(coco_as_class_ids)
    as_image_size = coco_as_image_size
    as_mask = coco_as_mask
    as_image_name = coco_as_image_name
    collate = staticmethod(_detection_collate)

    def load_label(self, index: int) -> CocoTarget:
        """The label of item ``index`` without decoding its image (cheap)."""
        _check_index(index, len(self))
        return self._load_target(self.ids[index])

    def image_name(self, index: int) -> str:
        """Image name (file stem, e.g. ``'COCO_val2014_000000000042'``) of item ``index``."""
        _check_index(index, len(self))
        return Path(self.coco.imgs[self.ids[index]]["file_name"]).stem

    @property
    def images(self) -> list[str]:
        """The file names of the images, in item order (TorchRay's attribute)."""
        return [str(self.coco.imgs[i]["file_name"]) for i in self.ids]

    def get_image_url(self, i: int) -> str:
        """The file name of image ``i`` in the image folder, as TorchRay returns it."""
        _check_index(i, len(self))
        return str(self.coco.imgs[self.ids[i]]["file_name"])


# ---------------------------------------------------------------------- factory


def _check_index(index: Any, length: int) -> None:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"index must be an int, got {index!r}")
    if not -length <= int(index) < length:
        raise ValueError(f"index {index} is out of range for a data set of {length} items")


def _non_empty(dataset: Any, source: Path) -> Any:
    """The data set, refused when it has no items (a benchmark of nothing is NaN)."""
    if len(dataset) == 0:
        raise DatasetNotFoundError(f"the data set read from {source} has no images")
    return dataset


def _default_dir(name: str) -> Path:
    """A directory from the optional configuration (``torchray_like.utils.get_config``)."""
    key = {"voc_2007": "voc_dir", "coco": "coco_dir", "imagenet": "imagenet_dir"}[name]
    try:
        from torchray_like.utils import get_config

        value = get_config()[key]
    except (ImportError, AttributeError, KeyError, TypeError):
        value = None
    if not value:
        raise ValueError(
            f"dataset_dir is required for {name!r}: pass the directory holding the data "
            "(see docs/datasets.rst for the layout)")
    return Path(value)


def _voc_root(dataset_dir: Path, subset: str, download: bool) -> Path:
    """The directory that holds ``VOCdevkit/VOC2007`` (torchvision's ``root``)."""
    # Also accept the VOCdevkit or VOC2007 folder itself.
    if dataset_dir.name == "VOCdevkit" and (dataset_dir / "VOC2007").is_dir():
        dataset_dir = dataset_dir.parent
    elif dataset_dir.name == "VOC2007" and dataset_dir.parent.name == "VOCdevkit":
        dataset_dir = dataset_dir.parent.parent
    if download:
        return dataset_dir
    voc = dataset_dir / "VOCdevkit" / "VOC2007"
    split = voc / "ImageSets" / "Main" / f"{subset}.txt"
    if not split.is_file():
        raise DatasetNotFoundError(
            f"PASCAL VOC 2007 not found: expected {split} under dataset_dir={dataset_dir}, "
            "laid out as VOCdevkit/VOC2007/ with JPEGImages/*.jpg, Annotations/*.xml and "
            f"ImageSets/Main/{subset}.txt (or pass download=True)")
    return dataset_dir


def _check_folder(value: Any, name: str, hint: str = "") -> None:
    """A TypeError naming ``name`` unless ``value`` is ``None`` or a path."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a folder path (str or os.PathLike), got "
                        f"{type(value).__name__}{hint}")


def get_dataset(name: str, subset: str, dataset_dir: Optional[PathLike] = None,
                annotation_dir: Optional[PathLike] = None, transform: Optional[Callable] = None,
                limiter: Optional[int] = None, download: bool = False) -> Any:
    """Open a benchmark data set from disk.

    Parameters
    ----------
    name:
        ``'voc_2007'``, ``'coco'`` or ``'imagenet'``.
    subset:
        VOC: ``'train'``, ``'val'``, ``'trainval'`` or ``'test'``; COCO: the image
        folder / annotation suffix, e.g. ``'val2014'``; ImageNet: the sub-folder,
        e.g. ``'val'``.
    dataset_dir:
        Directory holding the data (layouts in ``docs/datasets.rst``): VOC, the
        folder containing ``VOCdevkit/``; COCO, the folder containing
        ``{subset}/`` and ``annotations/instances_{subset}.json``; ImageNet, the
        folder containing ``{subset}/<class folders>``.  When omitted, taken from
        ``torchray_like.utils.get_config()`` (keys ``voc_dir``, ``coco_dir``,
        ``imagenet_dir``) if that exists.
    annotation_dir:
        COCO only: the folder holding ``instances_{subset}.json`` (default
        ``dataset_dir/annotations``).
    transform:
        Transform applied to the PIL image (e.g. :func:`.models.get_transform`).
    limiter:
        Keep ``limiter`` images (a positive int; ``None`` keeps all): VOC and COCO the
        first ones, ImageNet one per class in turn (as TorchRay).
    download:
        Download VOC 2007 with torchvision (needs internet).  COCO and ImageNet
        cannot be downloaded this way.

    Returns
    -------
    VOCDetection, CocoDetection or ImageFolder

    Raises
    ------
    DatasetNotFoundError
        The directory does not have the expected layout.
    ValueError
        Unknown ``name`` or ``subset``, or an unsupported ``download``.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"name must be one of {DATASET_NAMES}, got {name!r}")
    if not isinstance(subset, str) or not subset:
        raise ValueError(f"subset must be a non-empty string, got {subset!r}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
    _check_folder(dataset_dir, "dataset_dir")
    root = (Path(dataset_dir) if dataset_dir is not None else _default_dir(name)).expanduser()
    check_limiter(limiter)  # before any file is read
    # (a bool as annotation_dir is download= passed fourth, the order before TorchRay's)
    _check_folder(annotation_dir, "annotation_dir", "; pass download=... by keyword")
    if annotation_dir is not None and name != "coco":
        raise ValueError(f"annotation_dir is only used for 'coco' ({name!r} reads its "
                         f"annotations from dataset_dir), got {annotation_dir!r}")

    if name == "voc_2007":
        if subset not in _VOC_SUBSETS:
            raise ValueError(f"subset must be one of {_VOC_SUBSETS} for VOC 2007, got {subset!r}")
        root = _voc_root(root, subset, download)
        return _non_empty(VOCDetection(str(root), year="2007", image_set=subset,
                                       download=download, transform=transform, limiter=limiter),
                          root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / f"{subset}.txt")

    if download:
        raise ValueError(
            f"download=True is only supported for 'voc_2007'; place {name!r} under "
            "dataset_dir by hand (see docs/datasets.rst)")
    if name == "coco":
        images = root / subset
        annotations = Path(annotation_dir or root / "annotations") / f"instances_{subset}.json"
        if not images.is_dir() or not annotations.is_file():
            raise DatasetNotFoundError(
                f"MS COCO {subset!r} not found under dataset_dir={root}: expected the "
                f"image folder {images} and the annotation file {annotations}")
        return _non_empty(CocoDetection(str(images), str(annotations), transform=transform,
                                        limiter=limiter),
                          annotations)

    folder = root / subset
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"image folder {folder} not found: dataset_dir={root} must hold "
            f"{subset}/<class folder>/<images> (ImageNet: one folder per wnid)")
    dataset = ImageFolder(str(folder), transform=transform, limiter=limiter)
    warn_partial_imagenet(dataset)
    return dataset
