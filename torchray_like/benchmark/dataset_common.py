"""Class-name lists, error types and TorchRay's ``limiter`` for the benchmark data sets.

Kept apart from :mod:`.datasets`, which re-exports the lists and errors (TorchRay's import path).
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Mapping, Optional, Sequence, TypeVar

import torchvision

T = TypeVar("T")

__all__ = ["VOC_CLASSES", "COCO_CLASSES", "COCO_CATEGORY_IDS", "IMAGENET_CLASSES",
           "DatasetNotFoundError", "DatasetFormatError", "check_limiter", "first_items",
           "round_robin_selection", "check_coco_image_size"]

VOC_CLASSES: list[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
"""The 20 PASCAL VOC class names; a VOC class id indexes this list."""

COCO_CLASSES: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup",
    "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]
"""The 80 MS COCO (2014/2017) category names; a COCO class id indexes this list."""

# COCO's category ids are sparse (1..90 with 10 gaps); class id k is the k-th smallest.
COCO_CATEGORY_IDS: list[int] = [
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
]
"""COCO category id of each class id (``COCO_CATEGORY_IDS[class_id]``)."""


# Read offline from torchvision's weight metadata (no file shipped, nothing downloaded).
IMAGENET_CLASSES: list[str] = list(
    torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
"""The 1000 ImageNet ILSVRC-2012 class names, in the usual class-index order."""


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A data set directory is missing or not laid out as expected.

    Derives from both :class:`FileNotFoundError` and :class:`ValueError` so that
    either ``except`` clause catches it.
    """


class DatasetFormatError(ValueError):
    """An annotation file or label is malformed (the message names the file)."""


def check_limiter(limiter: Any) -> Optional[int]:
    """TorchRay's ``limiter``: ``None`` (every image) or a positive int.

    TorchRay reads 0 as "no limit" and -1 as "all but the last" (slicing); both are refused
    here with a :class:`ValueError`.
    """
    if limiter is None:
        return None
    if isinstance(limiter, bool) or not isinstance(limiter, Integral) or limiter < 1:
        raise ValueError(f"limiter must be None or a positive int (the number of images to "
                         f"keep), got {limiter!r}")
    return int(limiter)


def first_items(items: Sequence[T], limiter: Any) -> list[T]:
    """The first ``limiter`` items (all for ``None``): the VOC and COCO ``limiter``."""
    limit = check_limiter(limiter)
    return list(items if limit is None else items[:limit])


def round_robin_selection(labels: Sequence[int], limiter: Any) -> list[int]:
    """Indices of ``limiter`` items taken from each class in turn, in increasing order.

    The image-folder ``limiter``: the first image of every class, then the second of every
    class, and so on, until ``limiter`` images are chosen (all for ``None``).
    """
    limit = check_limiter(limiter)
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    per_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        per_class.setdefault(int(label), []).append(index)
    queues = [per_class[k] for k in sorted(per_class)]
    chosen: list[int] = []
    for depth in range(max(len(q) for q in queues)):
        chosen += [q[depth] for q in queues if depth < len(q)]
        if len(chosen) >= limit:
            break
    return sorted(chosen[:limit])


def check_coco_image_size(annotations: Sequence[Mapping[str, Any]], height: int,
                          width: int) -> None:
    """A :class:`ValueError` when a COCO object (its ``bbox = [x, y, w, h]``, or its polygons)
    reaches beyond an image of ``height`` × ``width`` (1 px of slack): the size given is too
    small or in the other order — ``coco_as_mask``'s ``image_size`` is ``(height, width)``,
    while ``coco_as_image_size`` returns TorchRay's ``(width, height)``."""
    right = bottom = 0.0
    for annotation in annotations:
        box: Sequence[Any] = annotation.get("bbox") or []
        if len(box) == 4:
            right = max(right, float(box[0]) + float(box[2]))
            bottom = max(bottom, float(box[1]) + float(box[3]))
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list):  # polygons: x, y, x, y, ...
            for polygon in segmentation:
                if isinstance(polygon, (list, tuple)) and len(polygon) >= 2:
                    right = max(right, max(float(v) for v in polygon[0::2]))
                    bottom = max(bottom, max(float(v) for v in polygon[1::2]))
    if right > width + 1 or bottom > height + 1:
        raise ValueError(
            f"image_size=(height, width)=({height}, {width}) is smaller than the annotations' "
            f"objects, which reach x={right:g}, y={bottom:g}: image_size is (height, width) — "
            "coco_as_image_size returns TorchRay's (width, height), so reverse it "
            "(image_size=size[::-1])")
