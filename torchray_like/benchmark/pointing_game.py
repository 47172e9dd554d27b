r"""The pointing game benchmark (Zhang et al., 2016, "Top-down neural attention by
excitation backprop", [EBP]).

For each (image, class) pair of a detection data set, an attribution method
points at one pixel, usually the maximiser of its saliency map.  The point is a
*hit* when its Euclidean distance to the class's object mask is *less than*
``tolerance`` pixels (15 in [EBP]; strictly less, as TorchRay, whose published
numbers use this rule), else a *miss*.  The score of a class is ``hits / (hits + misses)``
and the benchmark reports the mean over classes.

* :class:`PointingGame` is the bare game: :meth:`~PointingGame.evaluate` a point
  against a mask, :meth:`~PointingGame.aggregate` per class.
* :class:`PointingGameBenchmark` wraps a PASCAL VOC or MS COCO data set
  (:mod:`torchray_like.benchmark.datasets`) with the [EBP] protocol:

  - VOC 2007: the mask is the union of the class's bounding boxes, leaving out
    objects marked *difficult*; a class whose objects are all difficult is
    skipped.
  - COCO 2014: the mask is the union of the class's segmentation masks.
  - The *difficult* subset: (image, class) pairs whose class objects cover less
    than a quarter of the image while another class is present, or the pairs
    listed in a file given by the user.

Typical use::

    dataset = get_dataset('voc_2007', 'test', dataset_dir=...)
    benchmark = PointingGameBenchmark(dataset)
    for index in range(len(dataset)):
        image, label = dataset[index]
        for class_id in dataset.as_class_ids(label):
            saliency = my_method(model, transform(image)[None], class_id)
            benchmark.evaluate(label, class_id, saliency)  # resized, argmax, scored
    print(benchmark)  # per-class table and mean accuracy

Points are ``(u, v)`` = (column, row) pixel coordinates in the original image.
"""

from __future__ import annotations

__all__ = ["PointingGame", "PointingGameBenchmark", "as_class_id", "centre_point",
           "saliency_to_point", "read_difficult_file", "DIFFICULT_AREA_FRACTION", "MAX_NUM_CLASSES",
           "MAX_IMAGE_PIXELS"]

import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from ..attribution.arguments import check_not_meta, check_real, is_number
from ..attribution.context import TorchRayDifferenceWarning
from . import datasets as ads
from .interval_checks import MAX_NUM_CLASSES, check_num_classes

PathLike = Union[str, "os.PathLike[str]"]
Point = tuple[float, float]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

DIFFICULT_AREA_FRACTION = 0.25
"""[EBP]'s difficult pairs: the class's objects cover less than this fraction of the image."""


#: The largest image :func:`saliency_to_point` resizes a map to: 2**28 pixels (16384 x 16384;
#: the resized float32 map then takes 1 GiB).  A larger ``size`` is refused with a ValueError
#: rather than an allocator error.
MAX_IMAGE_PIXELS = 2 ** 28


# ----------------------------------------------------------------------- helpers


def _as_bool_mask(mask: Any) -> torch.Tensor:
    """A 2-D boolean tensor from a tensor or array (non-zero counts as object)."""
    if isinstance(mask, np.ndarray):
        mask = _from_numpy(mask, "mask")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mask must be a torch.Tensor or numpy array of shape (H, W), got "
            f"{type(mask).__name__}")
    check_real(mask, "mask")
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2 or mask.numel() == 0:
        raise ValueError(f"mask must have shape (H, W) (or (1, H, W)), H, W > 0, got "
                         f"{tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        # NaN != 0 is True: a NaN pixel would silently count as object.
        raise ValueError("mask contains NaN or infinite values; pass a boolean or 0/1 mask")
    return mask != 0


def _from_numpy(array: np.ndarray, name: str) -> torch.Tensor:
    # torch.from_numpy's own TypeError for strings or objects lists dtypes but no argument.
    if array.dtype.kind not in "biufc":
        raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {array.dtype}; "
                        "pass a boolean or numeric array")
    return torch.from_numpy(np.ascontiguousarray(array))


def _as_hit(hit: Any) -> int:
    """``+1``, ``-1`` or ``0`` from a number or a one-element tensor or array."""
    if isinstance(hit, torch.Tensor):
        check_not_meta(hit, "hit")
    if isinstance(hit, (torch.Tensor, np.ndarray)) and hit.ndim <= 1 and math.prod(hit.shape) == 1:
        hit = hit.item()  # .item(), not int(): 0.5 would truncate to a silent skip
    # A Real first: an array's "in" would raise an ambiguous-truth error.
    if not is_number(hit) or hit not in (-1, 0, 1):
        raise ValueError(f"hit must be +1 (hit), -1 (miss) or 0 (skip), got {hit!r}")
    return int(hit)


def _as_point(point: Any) -> Point:
    """``(u, v)`` floats from a pair of numbers (tuple, list, tensor or array)."""
    for x in point if isinstance(point, (tuple, list)) else [point]:
        if isinstance(x, torch.Tensor):
            check_not_meta(x, "point")
    if isinstance(point, (torch.Tensor, np.ndarray)) and point.ndim == 1 and len(point) == 2:
        point = point.tolist()
    if isinstance(point, (tuple, list)):  # e.g. (tensor(3), tensor(4)) from an argmax
        point = [x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x
                 for x in point]
    if (not isinstance(point, (tuple, list)) or len(point) != 2
            or not all(isinstance(x, (int, float, np.integer, np.floating))
                       and not isinstance(x, bool) for x in point)):
        raise TypeError(f"point must be a pair (u, v) = (column, row) of numbers, got {point!r}")
    u, v = float(point[0]), float(point[1])
    if not (math.isfinite(u) and math.isfinite(v)):
        raise ValueError(f"point must be finite, got {point!r}")
    return u, v


def _point_hits_mask(mask: torch.Tensor, point: Point, tolerance: float) -> bool:
    """Whether a True pixel of ``mask`` lies at a distance ``< tolerance`` of ``point``.

    Strictly less, as TorchRay (a pixel exactly ``tolerance`` away is a miss).  Only the
    ``(2t+1)²`` window around the point is examined (O(t²) per call, no distance
    transform of the whole image).
    """
    height, width = mask.shape
    u, v = point
    if not (0 <= u <= width - 1 and 0 <= v <= height - 1):
        raise ValueError(
            f"point (u, v) = {point} lies outside the image of size (H, W) = "
            f"({height}, {width}); u is a column in [0, {width - 1}], v a row in "
            f"[0, {height - 1}]")
    r0, r1 = max(math.ceil(v - tolerance), 0), min(math.floor(v + tolerance), height - 1)
    c0, c1 = max(math.ceil(u - tolerance), 0), min(math.floor(u + tolerance), width - 1)
    window = mask[r0:r1 + 1, c0:c1 + 1]
    if not bool(window.any()):
        return False
    # On the mask's device, whatever the caller's default device.
    rows = torch.arange(r0, r1 + 1, dtype=torch.float64, device=mask.device)[:, None] - v
    cols = torch.arange(c0, c1 + 1, dtype=torch.float64, device=mask.device)[None, :] - u
    disk = rows * rows + cols * cols < tolerance * tolerance
    return bool((window & disk).any())


def centre_point(size: Sequence[int]) -> tuple[int, int]:
    """The centre pixel of an image: the *centre baseline* of the pointing game.

    Parameters
    ----------
    size:
        Image size ``(height, width)`` (the reverse of ``voc_as_image_size``).

    Returns
    -------
    tuple of int
        ``(u, v) = (width // 2, height // 2)``.
    """
    height, width = _check_size(size)
    return width // 2, height // 2


def saliency_to_point(saliency: Any, size: Sequence[int]) -> tuple[int, int]:
    """The maximiser of a saliency map resized to the image size.

    Parameters
    ----------
    saliency:
        Map of shape ``(h, w)``, ``(1, h, w)`` or ``(1, 1, h, w)`` (tensor or
        array), e.g. the output of an attribution method for one image.
    size:
        Original image size ``(height, width)``; the map is resized to it with
        bilinear interpolation (``align_corners=False``) unless already that size.

    Returns
    -------
    tuple of int
        ``(u, v)`` = (column, row) of the maximum; the first one in row-major
        order on ties.
    """
    height, width = _check_size(size)
    if height * width > MAX_IMAGE_PIXELS:
        # The map is resized to the image: a float32 (height, width) array.
        raise ValueError(
            f"size={tuple(size)} has {height * width} pixels, more than MAX_IMAGE_PIXELS="
            f"{MAX_IMAGE_PIXELS} (the resized map would take {height * width / 2 ** 28:.3g} GiB); "
            "give the image's (height, width), e.g. voc_as_image_size(label)[::-1]")
    if isinstance(saliency, np.ndarray):
        saliency = _from_numpy(saliency, "saliency")
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"saliency must be a torch.Tensor or numpy array, got "
                        f"{type(saliency).__name__}")
    check_real(saliency, "saliency")
    if saliency.dim() < 2 or any(s != 1 for s in saliency.shape[:-2]) or saliency.dim() > 4:
        raise ValueError(
            "saliency must be one map of shape (h, w), (1, h, w) or (1, 1, h, w), got "
            f"{tuple(saliency.shape)}; pass one image and one class at a time")
    if saliency.numel() == 0:
        raise ValueError(f"saliency is empty: shape {tuple(saliency.shape)}")
    saliency = saliency.detach().to("cpu", torch.float32).reshape(1, 1, *saliency.shape[-2:])
    if not bool(torch.isfinite(saliency).all()):
        raise ValueError("saliency contains NaN or infinite values")
    if saliency.shape[-2:] != (height, width):
        saliency = F.interpolate(saliency, size=(height, width), mode="bilinear",
                                 align_corners=False)
    index = int(torch.argmax(saliency.reshape(-1)))
    return index % width, index // width


def _check_size(size: Any) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                       and s > 0 for s in size)):
        raise ValueError(f"size must be a pair (height, width) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


# ------------------------------------------------------------------ the game


def as_class_id(class_id: Any, num_classes: int) -> int:
    """``class_id`` as an int in ``[0, num_classes)``: an int, a NumPy integer, or a tensor /
    array holding one integer (a data set's label, ``labels[i]``); anything else — a bool, a
    float, several values — is a :class:`TypeError` and an index out of range a
    :class:`ValueError`, naming ``class_id``."""
    value = class_id
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if isinstance(value, torch.Tensor):
            check_not_meta(value, "class_id")
            size = value.numel()
            integral = not (value.is_floating_point() or value.is_complex()
                            or value.dtype == torch.bool)
        else:
            size, integral = value.size, bool(np.issubdtype(value.dtype, np.integer))
        if size != 1 or not integral:
            raise TypeError(f"class_id must be one int, got a {type(value).__name__} of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"class_id must be an int, got {class_id!r}")
    if not 0 <= value < num_classes:
        raise ValueError(f"class_id must be in [0, {num_classes}), got {value}")
    return int(value)


class PointingGame:
    """The pointing game: hits and misses per class.

    Parameters
    ----------
    num_classes:
        Number of classes of the data set, at most :data:`MAX_NUM_CLASSES`.
    tolerance:
        A point whose Euclidean distance (pixels) to the object mask is less than
        this is a hit; 15 in [EBP].  Positive: 1 requires an integer point to lie
        on the mask.
    class_names:
        Optional names for the :meth:`__str__` table: any iterable of ``num_classes``
        strings (read once; a generator is fine).  Names label rows only, so a repeated
        name is accepted.

    Attributes
    ----------
    hits, misses:
        Int64 tensors of shape ``(num_classes,)``.
    class_names:
        A list of ``num_classes`` strings, or ``None``.
    """

    def __init__(self, num_classes: int, tolerance: float = 15,
                 class_names: Optional[Sequence[str]] = None) -> None:
        # Two int64 counts per class: 10**12 classes would ask the allocator for 16 TB.
        num_classes = check_num_classes(num_classes, 16, "the per-class hit and miss counts")
        self.num_classes = num_classes
        self.tolerance = _check_tolerance(tolerance)
        self.class_names = _check_class_names(class_names, num_classes)
        self.hits = torch.zeros(self.num_classes, dtype=torch.int64, device="cpu")
        self.misses = torch.zeros(self.num_classes, dtype=torch.int64, device="cpu")

    def evaluate(self, mask: Any, point: Any) -> int:
        """Score one point against an object mask (does not aggregate).

        Parameters
        ----------
        mask:
            Object mask of shape ``(H, W)``, boolean (non-zero counts as object).
        point:
            ``(u, v)`` = (column, row) in pixels.

        Returns
        -------
        int
            ``+1`` for a hit, ``-1`` for a miss.

        Raises
        ------
        ValueError
            The point lies outside the image.
        """
        hit = _point_hits_mask(_as_bool_mask(mask), _as_point(point), self.tolerance)
        return 1 if hit else -1

    def aggregate(self, hit: int, class_id: int) -> None:
        """Add a result to the statistics of a class.

        Parameters
        ----------
        hit:
            ``+1`` (hit), ``-1`` (miss) or ``0`` (skipped pair: ignored).
        class_id:
            Index of the class in ``[0, num_classes)``.
        """
        hit = _as_hit(hit)
        class_id = as_class_id(class_id, self.num_classes)
        if hit == 1:
            self.hits[class_id] += 1
        elif hit == -1:
            self.misses[class_id] += 1

    def reset(self) -> None:
        """Forget all hits and misses."""
        self.hits.zero_()
        self.misses.zero_()

    @property
    def class_accuracies(self) -> torch.Tensor:
        """Float64 tensor ``(num_classes,)``: hits / (hits + misses); NaN if never seen."""
        total = (self.hits + self.misses).to(torch.float64)
        accuracies = self.hits.to(torch.float64) / total
        return torch.where(total > 0, accuracies, torch.full_like(accuracies, float("nan")))

    @property
    def accuracy(self) -> float:
        """Mean of the class accuracies over the classes seen (NaN if none)."""
        accuracies = self.class_accuracies
        seen = ~torch.isnan(accuracies)
        return float(accuracies[seen].mean()) if bool(seen.any()) else float("nan")

    def __str__(self) -> str:
        names = self.class_names or [str(k) for k in range(self.num_classes)]
        width = max(8, max(len(n) for n in names))
        lines = [f"{type(self).__name__} (tolerance {self.tolerance} px)",
                 f"{'class':<{width}}  {'hits':>6}  {'misses':>6}  {'accuracy':>8}"]
        for k, (name, acc) in enumerate(zip(names, self.class_accuracies.tolist())):
            shown = "-" if math.isnan(acc) else f"{100 * acc:.2f}%"
            lines.append(f"{name:<{width}}  {int(self.hits[k]):>6}  {int(self.misses[k]):>6}"
                         f"  {shown:>8}")
        seen = int(((self.hits + self.misses) > 0).sum())
        mean = self.accuracy
        lines.append(f"mean accuracy over {seen} classes: "
                     + ("-" if math.isnan(mean) else f"{100 * mean:.2f}%"))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, "
                f"tolerance={self.tolerance}, accuracy={self.accuracy:.4f})")


def _check_tolerance(tolerance: Any) -> Union[int, float]:
    """A positive, finite number of pixels: an int when integral (as the table prints it)."""
    try:
        value = float(tolerance) if is_number(tolerance) else math.nan
    except OverflowError:  # an int beyond float range (10**400)
        value = math.inf
    if not math.isfinite(value) or value <= 0:
        # A hit is a distance < tolerance: 0 would make every point a silent miss.
        raise ValueError(
            f"tolerance must be a positive finite number of pixels (a hit is a point at a "
            f"distance < tolerance from the mask), got {tolerance!r:.40}; use tolerance=1 to "
            "require the point to lie on the mask")
    # An int only where exact: int(1e300) would overflow the distance comparison in torch.
    return int(value) if value.is_integer() and value < 2 ** 53 else value


def _check_class_names(class_names: Any, num_classes: int) -> Optional[list[str]]:
    """``class_names`` materialised once as a list of ``num_classes`` strings (or ``None``)."""
    if class_names is None:
        return None
    # A string is an iterable of characters: "abc" would silently name three classes.
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Iterable):
        raise TypeError(f"class_names must be an iterable of num_classes={num_classes} strings "
                        f"(or None), got {type(class_names).__name__}")
    names = list(class_names)
    for k, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class_names must hold strings: class_names[{k}] is "
                            f"{type(name).__name__} {name!r}; pass str(name) for each class")
    if len(names) != num_classes:
        raise ValueError(f"class_names must have num_classes={num_classes} names, got "
                         f"{len(names)}")
    return names


# ------------------------------------------------------------- difficult file


def _name_keys(name: Any) -> set[str]:
    """Keys under which an image is matched: file stem, and its number if numeric."""
    path = Path(str(name).strip())
    # Only an image suffix goes: 'a.b' (a stem already) keeps its dot.
    stem = path.stem if path.suffix.lower() in _IMAGE_SUFFIXES else str(name).strip()
    keys = {stem} if stem else set()
    digits = stem.rsplit("_", 1)[-1]
    if digits.isdigit():  # '000042', '42' and 'COCO_val2014_000000000042' all match 42
        keys.add(str(int(digits)))
    return keys


def read_difficult_file(path: PathLike, num_classes: int) -> dict[str, torch.Tensor]:
    """Read a list of difficult (image, class) pairs.

    The format is the one published with the excitation-backprop pointing game:
    one line per image, the image name followed by one ``0``/``1`` flag per
    class (``1`` = the pair belongs to the difficult subset), separated by
    white space or commas.  Blank lines and lines starting with ``#`` are
    skipped.

    Parameters
    ----------
    path:
        The file.
    num_classes:
        Expected number of flags per line (20 for VOC, 80 for COCO).

    Returns
    -------
    dict
        Image key -> boolean tensor ``(num_classes,)``; each image is stored
        under its name's stem and, when numeric, its number (``'000042'`` and
        ``'42'``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (the difficult-pair file), got "
                        f"{type(path).__name__}")
    # One bool flag per class and image; the file's lines say how many images.
    num_classes = check_num_classes(num_classes, 1, "each image's flags")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"difficult-pair file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:  # a ValueError that would not name the file
        raise ValueError(f"difficult-pair file {path} is not UTF-8 text ({error}); pass the "
                         "text list of image names and 0/1 flags") from None
    table: dict[str, torch.Tensor] = {}
    for number, line in enumerate(lines, 1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        flags = fields[1:]
        if len(flags) != num_classes or any(f not in ("0", "1") for f in flags):
            raise ValueError(
                f"{path}, line {number}: expected an image name and {num_classes} "
                f"0/1 flags, got {len(flags)} fields after the name: {line.strip()!r}")
        value = torch.tensor([f == "1" for f in flags], dtype=torch.bool)
        for key in _name_keys(fields[0]):
            table[key] = value
    if not table:
        raise ValueError(f"difficult-pair file {path} has no entries")
    return table


# -------------------------------------------------------------- the benchmark


def _unwrap(dataset: Any) -> tuple[Any, Optional[list[int]]]:
    """The underlying data set of (possibly nested) Subsets, and the index map."""
    indices: Optional[list[int]] = None
    while isinstance(dataset, Subset):
        inner = [int(i) for i in dataset.indices]
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


class PointingGameBenchmark(PointingGame):
    """The pointing game on PASCAL VOC or MS COCO with the [EBP] protocol.

    Parameters
    ----------
    dataset:
        A :class:`~torchray_like.benchmark.datasets.VOCDetection` or
        :class:`~torchray_like.benchmark.datasets.CocoDetection` (torchvision's
        classes are accepted too), possibly wrapped in
        :class:`torch.utils.data.Subset`.
    tolerance:
        Hit tolerance in pixels (15 in [EBP]).
    difficult:
        ``False``: all pairs.  ``True``: only the *difficult* pairs, computed as
        in [EBP]: the class's mask covers less than
        :data:`DIFFICULT_AREA_FRACTION` of the image and an object of another
        class is present.  A path: only the pairs flagged in that file (format
        in :func:`read_difficult_file`; images absent from it are skipped).
        Pairs outside the subset evaluate to 0 (skipped).
    """

    def __init__(self, dataset: Any, tolerance: float = 15,
                 difficult: Union[bool, PathLike] = False) -> None:
        base, indices = _unwrap(dataset)
        if isinstance(base, ads.torchvision.datasets.VOCDetection):
            self.kind, classes = "voc", ads.VOC_CLASSES
        elif isinstance(base, ads.torchvision.datasets.CocoDetection):
            self.kind, classes = "coco", ads.COCO_CLASSES
        else:
            raise TypeError(
                "dataset must be a VOCDetection or CocoDetection (see "
                "torchray_like.benchmark.datasets.get_dataset), got "
                f"{type(dataset).__name__}")
        super().__init__(len(classes), tolerance, class_names=classes)
        self.dataset = dataset
        self._base, self._indices = base, indices
        self._counted: Optional[tuple[int, int]] = None  # what evaluate() last counted

        self._difficult_table: Optional[dict[str, torch.Tensor]] = None
        if isinstance(difficult, bool):
            self.difficult: Union[bool, Path] = difficult
        elif isinstance(difficult, (str, os.PathLike)):
            self.difficult = Path(difficult).expanduser()
            self._difficult_table = read_difficult_file(self.difficult, self.num_classes)
            self._check_difficult_names()
        else:
            raise TypeError(f"difficult must be a bool or a path to a difficult-pair file, "
                            f"got {type(difficult).__name__}")

    def aggregate(self, hit: int, class_id: int) -> None:
        """Count a result (:meth:`PointingGame.aggregate`).

        :meth:`evaluate` already counts its result, where TorchRay's does not: TorchRay's
        ``hit = benchmark.evaluate(label, c, p); benchmark.aggregate(hit, c)`` would count
        it twice, so an ``aggregate`` right after :meth:`evaluate` with the result it
        returned is skipped with a :class:`TorchRayDifferenceWarning`.
        """
        counted, self._counted = self._counted, None
        if counted is not None and counted == (_as_hit(hit),
                                               as_class_id(class_id, self.num_classes)):
            warnings.warn("PointingGameBenchmark.evaluate already counted this result (TorchRay's "
                          "evaluate does not); this aggregate() call is skipped so that it is "
                          "not counted twice: drop it", TorchRayDifferenceWarning, stacklevel=2)
            return
        super().aggregate(hit, class_id)

    def reset(self) -> None:
        """Forget all hits and misses (and the last :meth:`evaluate`, so that the next
        ``aggregate`` is counted)."""
        super().reset()
        self._counted = None

    # -- label access

    def _image_names(self) -> list[str]:
        if self.kind == "voc":
            return [Path(p).stem for p in self._base.images]
        return [Path(info["file_name"]).stem for info in self._base.coco.imgs.values()]

    def _check_difficult_names(self) -> None:
        assert self._difficult_table is not None
        if not any(k in self._difficult_table for name in self._image_names()
                   for k in _name_keys(name)):
            raise ValueError(
                f"no image of the data set appears in the difficult-pair file "
                f"{self.difficult}; its lines must start with the image names "
                "(e.g. '000001' for VOC, 'COCO_val2014_000000000042' for COCO)")

    def _label(self, label_or_index: Any) -> Any:
        """The raw label of an image given as a data-set index or as its label."""
        if isinstance(label_or_index, (int, np.integer)) and not isinstance(label_or_index, bool):
            index = int(label_or_index)
            length = len(self.dataset)
            if not -length <= index < length:
                raise ValueError(f"image index {index} is out of range for a data set of "
                                 f"{length} images")
            if self._indices is not None:
                index = self._indices[index]
            if self.kind == "voc":
                return ads.voc_load_label(self._base, index)
            image_id = self._base.ids[index]
            info = self._base.coco.imgs[image_id]
            return ads.CocoTarget(self._base.coco.loadAnns(self._base.coco.getAnnIds(image_id)),
                                  image_id=image_id,
                                  image_size=(int(info["height"]), int(info["width"])))
        return label_or_index

    def _image_size(self, label: Any) -> tuple[int, int]:
        # (height, width); the converters return TorchRay's (width, height).
        if self.kind == "voc":
            return ads.voc_as_image_size(label)[::-1]
        return ads.coco_as_image_size(self._base, label)[::-1]

    def _class_ids(self, label: Any) -> list[int]:
        if self.kind == "voc":
            return ads.voc_as_class_ids(label, include_difficult=True)
        return ads.coco_as_class_ids(label)

    def _mask(self, label: Any, class_id: int) -> torch.Tensor:
        if self.kind == "voc":
            return ads.voc_as_mask(label, class_id, exclude_difficult=True)
        return ads.coco_as_mask(self._base, label, class_id)

    def _image_keys(self, label: Any) -> set[str]:
        if self.kind == "voc":
            return _name_keys(ads.voc_as_image_name(label))
        image_id = ads.coco_as_image_id(label)
        if image_id is None:
            return set()
        keys = {str(image_id)}
        info = self._base.coco.imgs.get(image_id)
        if info is not None:
            keys |= _name_keys(info["file_name"])
        return keys

    def _in_subset(self, label: Any, class_id: int, mask: torch.Tensor) -> bool:
        """Whether the (image, class) pair belongs to the evaluated subset."""
        if self._difficult_table is not None:
            for key in self._image_keys(label):
                if key in self._difficult_table:
                    return bool(self._difficult_table[key][class_id])
            return False
        if self.difficult is True:
            small = float(mask.sum()) < DIFFICULT_AREA_FRACTION * mask.numel()
            return small and len(self._class_ids(label)) > 1
        return True

    # -- the protocol

    def evaluate(self, label: Any, class_id: int, point: Any) -> int:  # type: ignore[override]
        """Play the pointing game for one (image, class) pair and aggregate.

        Parameters
        ----------
        label:
            The image's label as returned by the data set, or the image's index
            in the data set (its annotation is then read without decoding the image).
        class_id:
            Class index (into ``VOC_CLASSES`` or ``COCO_CLASSES``).
        point:
            Either a point ``(u, v)`` = (column, row) in original-image pixels, or
            a saliency map (``(h, w)``, ``(1, h, w)`` or ``(1, 1, h, w)``), which
            is resized bilinearly to the image size and replaced by its argmax
            (:func:`saliency_to_point`).

        Returns
        -------
        int
            ``+1`` hit, ``-1`` miss, ``0`` skipped: the class is absent from the
            image, all its VOC objects are *difficult*, or the pair is outside the
            difficult subset when ``difficult`` is set.
        """
        self._counted = None
        class_id = as_class_id(class_id, self.num_classes)
        label = self._label(label)
        size = self._image_size(label)
        point = self._point(point, size)
        if class_id not in self._class_ids(label):
            return 0
        if self.kind == "voc" and class_id not in ads.voc_as_class_ids(label, False):
            return 0  # all its objects are difficult
        mask = self._mask(label, class_id)
        if not self._in_subset(label, class_id, mask):
            return 0
        hit = 1 if _point_hits_mask(mask, point, self.tolerance) else -1
        super().aggregate(hit, class_id)
        self._counted = (hit, class_id)
        return hit

    @staticmethod
    def _point(point: Any, size: tuple[int, int]) -> Point:
        """A point from a point or a saliency map."""
        if isinstance(point, (torch.Tensor, np.ndarray)) and point.ndim >= 2:
            return saliency_to_point(point, size)
        return _as_point(point)
