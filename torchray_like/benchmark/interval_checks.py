"""The checks of :mod:`torchray_like.benchmark.intervals`' arguments, and the one home of
:func:`check_num_classes`, which :class:`~torchray_like.benchmark.pointing_game.PointingGame`
shares: each refuses with a ValueError or TypeError naming the argument and what to give, before
NumPy would raise its own error (a MemoryError, a ComplexWarning, an ambiguous truth value)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any, List, Tuple

import numpy as np
import torch

from ..attribution.arguments import check_not_meta

__all__ = ["MAX_NUM_CLASSES", "MAX_COUNTS_BYTES", "PER_IMAGE", "check_num_classes",
           "check_options", "as_float_array", "check_contributions", "check_sums",
           "check_pairs", "check_pair", "check_names"]

#: The most classes a pointing game accepts: 2**24 (16.8 million, far above any detection data
#: set; :class:`~torchray_like.benchmark.pointing_game.PointingGame`'s hit and miss counts then
#: take 256 MiB).  A larger ``num_classes`` is refused with a ValueError rather than an
#: allocator error (:func:`check_num_classes`).
MAX_NUM_CLASSES = 2 ** 24

#: The resample counts are a dense (resamples, images) array (int64, then float64): refused
#: above this many bytes, with what to do, rather than a MemoryError from NumPy.
MAX_COUNTS_BYTES = 4 * 2 ** 30


def check_num_classes(num_classes: Any, bytes_per_class: int, what: str) -> int:
    """``num_classes`` as an int, checked to be positive and at most :data:`MAX_NUM_CLASSES`.

    The one home of the check that :class:`~torchray_like.benchmark.pointing_game.PointingGame`
    and :mod:`~torchray_like.benchmark.intervals`' pointing-game functions share.

    Parameters
    ----------
    num_classes : int
        Classes of the data set.
    bytes_per_class : int
        What one class would take in the caller's arrays, for the message.
    what : str
        Those arrays, for the message (``"the per-class hit and miss counts"``).

    Raises
    ------
    ValueError
        For a value that is not a positive int, or one above :data:`MAX_NUM_CLASSES`: the
        message names the value, the limit, the memory it would take and what to give.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    num_classes = int(num_classes)
    if num_classes > MAX_NUM_CLASSES:
        # 10**12 classes would ask the allocator for terabytes; 10**400 is beyond float range.
        gib = bytes_per_class * num_classes / 2 ** 30 if num_classes < 2 ** 900 else math.inf
        raise ValueError(
            f"num_classes={num_classes} is more than MAX_NUM_CLASSES={MAX_NUM_CLASSES} "
            f"({what} would take {gib:.3g} GiB); give the number of classes of the data set "
            "(20 for PASCAL VOC, 80 for COCO)")
    return num_classes


def check_options(level: Any, resamples: Any, seed: Any) -> Tuple[float, int, int]:
    """``(level, resamples, seed)`` of a bootstrap, checked, or a ValueError naming the one
    that is wrong."""
    if isinstance(level, bool) or not isinstance(level, Real) or not 0 < float(level) < 1:
        raise ValueError(f"level must be a coverage in (0, 1), e.g. 0.95, got {level!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, Integral) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100 (2000 by default: fewer make the "
                         f"percentiles themselves noisy), got {resamples!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return float(level), int(resamples), int(seed)


def as_float_array(values: Any, name: str, what: str) -> np.ndarray:
    """``values`` (a sequence, array or tensor on any device) as a float64 array, or a
    TypeError / ValueError naming ``name`` (``what`` says what it must hold)."""
    if isinstance(values, torch.Tensor):
        check_not_meta(values, name)
        values = values.detach().cpu()  # NumPy reads no GPU tensor
    try:
        complex_values = np.iscomplexobj(values)  # arrays, lists and tensors alike
        array = None if complex_values else np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:  # ragged, strings, objects
        raise ValueError(f"{name} must be {what} ({error})") from None
    if array is None:
        # NumPy would drop the imaginary part with only a ComplexWarning.
        raise TypeError(f"{name} must be real numbers, got complex values; pass their real "
                        "part or magnitude explicitly")
    return array


def check_contributions(contributions: Any, name: str) -> np.ndarray:
    """A non-empty, finite ``(images, k)`` float64 array, or an error naming ``name``."""
    c = as_float_array(contributions, name, "a non-empty (images, k) array of numbers")
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (images, k) array of per-image "
                         f"contributions, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError(f"{name} must be finite (encode an undefined value as a zero "
                         "contribution, as mean_contributions does)")
    return c


def check_sums(sums: Any, statistic: str, even: bool) -> np.ndarray:
    """The ``(..., k)`` sums a statistic reads, as float64 (k = 2, or even for the pointing
    game); a wrong width would be read as other columns, silently."""
    s = as_float_array(sums, "sums", "an array of summed contributions")
    width = s.shape[-1] if s.ndim else 0
    if (even and (width < 2 or width % 2)) or (not even and width != 2):
        need = "an even number (hits then pairs per class)" if even else "2 (sum, count)"
        raise ValueError(f"{statistic} reads sums (..., k) with k {need}, got shape {s.shape}")
    return s


#: What :func:`check_num_classes` says the pointing-game functions of ``intervals`` allocate.
PER_IMAGE = "each image's per-class contributions"


def check_pairs(pairs: Any, num_classes: int, name: str) -> List[List[Tuple[int, int]]]:
    """Every image's checked ``(class_id, hit)`` pairs, materialised once (a generator is
    read once; its images are then counted)."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(f"{name} must be a sequence holding one list of (class_id, hit) pairs "
                        f"per image, got {type(pairs).__name__}")
    images = []
    for i, image in enumerate(pairs):
        if isinstance(image, (str, bytes)) or not isinstance(image, Iterable):
            raise TypeError(f"{name}[{i}] must be a list of (class_id, hit) pairs (empty for "
                            f"an image without one), got {type(image).__name__}")
        images.append([check_pair(pair, num_classes, i, name) for pair in image])
    if not images:
        raise ValueError(f"{name} must hold at least one image (one list of (class_id, hit) "
                         "pairs per image)")
    return images


def check_names(names: Any, name: str) -> List[str]:
    """A list of names (models, methods), or a TypeError naming ``name``."""
    # A string would be iterated letter by letter: "vgg16" as five models, silently.
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"{name} must be a list of names, got {type(names).__name__} "
                        f"{names!r:.60}" + (f"; pass [{names!r}]" if isinstance(names, str)
                                            else ""))
    return list(names)


def check_pair(pair: Any, num_classes: int, image: int, name: str = "pairs") -> Tuple[int, int]:
    """One ``(class_id, hit)`` pair of image ``image`` as ints, or a ValueError naming
    ``name[image]``."""
    try:
        c, hit = pair
    except (TypeError, ValueError):
        raise ValueError(f"{name}[{image}] must hold (class_id, hit) pairs, got {pair!r}"
                         ) from None
    if isinstance(c, bool) or not isinstance(c, Integral) or not 0 <= int(c) < num_classes:
        raise ValueError(f"{name}[{image}]: class_id must be an int in [0, {num_classes}), "
                         f"got {c!r}")
    # A Real first: an array's "in" would raise NumPy's ambiguous-truth error.
    if isinstance(hit, bool) or not isinstance(hit, Real) or hit not in (-1, 0, 1):
        raise ValueError(f"{name}[{image}]: hit must be +1 (hit), -1 (miss) or 0 (not scored), "
                         f"got {hit!r}")
    return int(c), int(float(hit))
