"""Image-folder data set (ImageNet ILSVRC 2012 layout) with TorchRay's ``limiter``.

Re-exported by :mod:`.datasets` (TorchRay's import path).
"""

from __future__ import annotations

import operator
import os
import re
import warnings
from typing import Any, Optional, Sequence, Union

import torchvision

from .dataset_common import DatasetNotFoundError, round_robin_selection

__all__ = ["ImageFolder", "warn_partial_imagenet"]

PathLike = Union[str, "os.PathLike[str]"]


class ImageFolder(torchvision.datasets.ImageFolder):
    """Image-folder data set (ImageNet ILSVRC 2012 layout: one folder per class).

    A :class:`torchvision.datasets.ImageFolder`; the label of an item is its
    class index.  With the 1000 ImageNet folders (wnids, sorted) the index
    matches :data:`~.datasets.IMAGENET_CLASSES`.

    Parameters
    ----------
    root, *args, **kwargs:
        As for :class:`torchvision.datasets.ImageFolder`.
    limiter:
        Keep ``limiter`` images (a positive int) taken from each class in turn, as
        TorchRay does: the first image of every class, then the second, ...; ``None``
        keeps all.  The kept indices (into the full folder) are :attr:`selection`.
    full_classes:
        The names of all classes (e.g. the 1000 ImageNet names) when the folder holds
        a subset; kept as :attr:`full_classes` (TorchRay's attribute), labels are not
        renumbered.
    """

    def __init__(self, root: PathLike, *args: Any, limiter: Optional[int] = None,
                 full_classes: Optional[Sequence[str]] = None, **kwargs: Any) -> None:
        if full_classes is not None and (isinstance(full_classes, str) or not all(
                isinstance(name, str) for name in full_classes)):
            raise TypeError("full_classes must be None or a sequence of class names (str)")
        try:
            super().__init__(root, *args, **kwargs)
        except FileNotFoundError as error:  # torchvision's message may omit the folder
            raise DatasetNotFoundError(
                f"the image folder {root} holds no images ({error}); it must hold "
                "<class folder>/<images> (ImageNet: one folder per wnid)") from None
        self.full_classes = None if full_classes is None else list(full_classes)
        samples: list[tuple[str, int]] = list(self.samples)  # type: ignore[has-type]
        self.selection = round_robin_selection([label for _, label in samples], limiter)
        self.samples = self.imgs = [samples[k] for k in self.selection]
        self.targets = [label for _, label in self.samples]

    @staticmethod
    def as_class_ids(label: Any) -> list[int]:
        """The label as a one-element list of class ids."""
        return [int(label)]

    def get_image_url(self, i: int) -> str:
        """The path of image ``i`` (TorchRay's name)."""
        try:  # an int, a NumPy integer or an integer scalar tensor; not a float (int(1.5) = 1)
            index = operator.index(i)
        except TypeError:
            index = None
        if index is None or isinstance(i, bool):
            raise TypeError(f"image index must be an int, got {i!r}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"image index {i!r} is out of range for {len(self)} images")
        return str(self.samples[index][0])


_WNID = re.compile(r"n\d{8}")


def warn_partial_imagenet(dataset: ImageFolder) -> None:
    """Warn when ``dataset``'s class folders are ImageNet wnids but not all 1000 of them: its
    labels are then the folders' positions (0 … K-1), not ImageNet class indices, and an
    ImageNet model's score for the label would be another class's."""
    classes = list(dataset.classes)
    if len(classes) != 1000 and classes and all(_WNID.fullmatch(c) for c in classes):
        warnings.warn(
            f"the image folder holds {len(classes)} of ImageNet's 1000 class folders (wnids): "
            f"its labels are their positions 0-{len(classes) - 1}, not ImageNet class indices, "
            "so an ImageNet model's score for a label is another class's; keep all 1000 folders "
            "(with a limiter=) or map dataset.classes to ImageNet indices yourself",
            UserWarning, stacklevel=3)
