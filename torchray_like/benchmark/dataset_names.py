"""Class-name lists and error types of the benchmark data sets (PASCAL VOC, MS COCO, ImageNet).

Kept apart from :mod:`.datasets`, which re-exports every name (TorchRay's import path).
"""

from __future__ import annotations

import torchvision

__all__ = ["VOC_CLASSES", "COCO_CLASSES", "COCO_CATEGORY_IDS", "IMAGENET_CLASSES",
           "DatasetNotFoundError", "DatasetFormatError"]

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
