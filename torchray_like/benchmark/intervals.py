r"""Bootstrap confidence intervals for the benchmarks: over images, seeded, paired.

A benchmark number is a statistic of per-image results: a mean AUC, a mean similarity, a
pointing-game accuracy.  On a few dozen images a difference of a few points between two methods
can be noise, and the number alone does not say so.  The *percentile bootstrap over images*
does: draw ``resamples`` sets of ``n`` images with replacement from the ``n`` images, recompute
the statistic on each, and report the central ``level`` range of the recomputed values.

Every statistic here is a function of **sums of per-image contributions**, so that a resample
is one matrix product (``counts @ contributions``) and all resamples are computed at once:

* the mean of per-image values (:func:`mean_interval`): each image contributes ``[v, 1]``, an
  undefined value (NaN) ``[0, 0]`` — ignored, as the benchmarks' means ignore it;
* the pointing game (:func:`pointing_game_interval`): each image contributes its hits and its
  scored pairs *per class*, and the statistic is the mean over classes of hits / pairs, over
  the classes seen in the resample — the benchmark's per-class averaging, not a pooled hit
  rate;
* a **paired** difference between two methods on the same images
  (:func:`paired_difference`, :func:`paired_mean_difference`,
  :func:`paired_pointing_game_difference`): both methods' contributions are resampled with the
  *same* images, so what the images have in common (an easy image is easy for both) cancels.
  Two intervals that overlap can still give a difference whose interval excludes zero.

Resamples are drawn by NumPy's generator from ``seed`` and depend only on ``(n, resamples,
seed)``: every method of a table is resampled with the same image sets, which makes the
marginal intervals and the paired differences consistent, and a run reproducible.

Limits, said where they show:

* the interval is conditional on the images; it says nothing about other data sets;
* when every resample gives the same value — one image, or every image a hit — the bootstrap
  sees no spread and returns a zero-width interval that understates the uncertainty:
  :attr:`Interval.degenerate` is then true and :meth:`Interval.format` marks it with ``*``;
* resamples whose statistic is undefined (no difficult pair drawn, say) are left out of the
  percentiles: the interval is then conditional on the statistic being defined.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ..attribution.arguments import check_function, is_number
from .interval_checks import (
    MAX_COUNTS_BYTES,
    MAX_NUM_CLASSES,
    PER_IMAGE,
    as_float_array,
    check_contributions,
    check_names,
    check_num_classes,
    check_options,
    check_pairs,
    check_sums,
)

__all__ = ["Interval", "DEFAULT_LEVEL", "DEFAULT_RESAMPLES", "MIN_IMAGES", "MAX_NUM_CLASSES",
           "MAX_COUNTS_BYTES", "DENSE_BYTES", "check_num_classes", "verdict",
           "resample_counts", "bootstrap",
           "paired_difference", "mean_contributions", "mean_of_sums", "mean_interval",
           "paired_mean_difference", "pointing_game_contributions", "pointing_game_accuracy",
           "pointing_game_interval", "paired_pointing_game_difference", "PUBLISHED_ORDERINGS",
           "SHORT_NAMES", "compare_orderings", "format_orderings"]

#: The coverage of the intervals by default (95 %).
DEFAULT_LEVEL = 0.95
#: Bootstrap resamples by default: the 2.5 % and 97.5 % percentiles then move by about a tenth
#: of the interval's width from one seed to another.
DEFAULT_RESAMPLES = 2000

#: Fewer images than this and :func:`verdict` gives no sign: the percentile bootstrap of so
#: few images is far narrower than its level says (with two images, two methods that do not
#: differ agree in sign on both half of the time, and the interval then excludes zero).
MIN_IMAGES = 8

#: ``(..., k)`` sums of contributions -> ``(...)`` values of the statistic.
Statistic = Callable[[np.ndarray], np.ndarray]
#: One image's scored pairs of the pointing game: ``(class_id, hit)``, hit +1 / -1 / 0 (skip).
Pairs = Sequence[Tuple[int, int]]


@dataclass(frozen=True)
class Interval:
    """A statistic and its bootstrap confidence interval.

    Attributes
    ----------
    estimate : float
        The statistic on all the images (NaN when undefined).
    low, high : float
        The ``level`` percentile interval (NaN when no resample was defined).
    n : int
        Images resampled (for a paired difference: the images the two methods share).
    level : float
        Coverage, e.g. 0.95.
    resamples : int
        Bootstrap resamples drawn.
    degenerate : bool
        Every defined resample gave the same value (one image, or every image alike — all
        hits, say): the zero-width interval understates the uncertainty.
    """

    estimate: float
    low: float
    high: float
    n: int
    level: float = DEFAULT_LEVEL
    resamples: int = DEFAULT_RESAMPLES
    degenerate: bool = False

    def __post_init__(self) -> None:
        # A string or a tensor given for a number would fail later, in format(), far from here.
        for name in ("estimate", "low", "high", "level"):
            if not is_number(getattr(self, name)):
                raise TypeError(f"Interval.{name} must be a real number, got "
                                f"{getattr(self, name)!r}")
        for name in ("n", "resamples"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral) \
                    or value < 0:
                raise TypeError(f"Interval.{name} must be a non-negative int, got {value!r}")

    @property
    def significant(self) -> bool:
        """The interval excludes zero (for a difference: the sign is resolved)."""
        return bool(self.low > 0 or self.high < 0)

    def format(self, scale: float = 1.0, digits: int = 1, signed: bool = False) -> str:
        """``"86.6 [80.1, 92.0]"`` (values times ``scale``); ``signed`` writes ``+`` on
        positive values (differences); ``*`` marks a degenerate interval; ``-`` when the
        statistic is undefined."""
        if not is_number(scale) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number (100.0 for percent), got {scale!r}")
        if isinstance(digits, (bool, np.bool_)) or not isinstance(digits, Integral) \
                or not 0 <= digits <= 17:
            raise ValueError(f"digits must be an int in [0, 17] (digits after the point), "
                             f"got {digits!r}")
        digits = int(digits)
        if not math.isfinite(self.estimate):
            return "-"
        spec = ("+" if signed else "") + f".{digits}f"

        def show(value: float) -> str:
            # Rounded first: -0.004 would print as "-0.00", a sign the data do not show.
            if not math.isfinite(value):
                return "-"
            return format(round(value * scale, digits) + 0.0, spec)

        text = f"{show(self.estimate)} [{show(self.low)}, {show(self.high)}]"
        return text + ("*" if self.degenerate else "")

    def as_dict(self, prefix: str) -> Dict[str, Any]:
        """``{prefix: estimate, prefix_low: low, prefix_high: high}`` (the files' columns)."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str (the column name), got {prefix!r}")
        return {prefix: self.estimate, f"{prefix}_low": self.low, f"{prefix}_high": self.high}


def verdict(interval: Interval, positive: str = "reproduced", negative: str = "reversed",
            min_images: int = MIN_IMAGES) -> str:
    """What a difference's interval says: ``positive`` (above zero), ``negative`` (below),
    ``"not resolved"`` (zero inside, or undefined), or ``"too few images"`` (fewer than
    ``min_images``: the bootstrap cannot be trusted to say)."""
    if not isinstance(interval, Interval):
        raise TypeError(f"interval must be an Interval (from mean_interval, "
                        f"paired_mean_difference, ...), got {type(interval).__name__}")
    if isinstance(min_images, bool) or not isinstance(min_images, Integral) or min_images < 1:
        raise ValueError(f"min_images must be a positive int, got {min_images!r}")
    if interval.n < min_images:
        return "too few images"
    if interval.low > 0:
        return positive
    if interval.high < 0:
        return negative
    return "not resolved"


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The bootstrap
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _counts(n: int, resamples: int, seed: int) -> np.ndarray:
    if 16 * n * resamples > MAX_COUNTS_BYTES:
        raise ValueError(
            f"resamples={resamples} of {n} images need {16 * n * resamples / 2 ** 30:.0f} GiB "
            f"(more than {MAX_COUNTS_BYTES / 2 ** 30:.0f}); use fewer resamples (2000 is the "
            "default, 10000 is plenty for a 95 % interval)")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    counts.setflags(write=False)  # shared by the cache: nobody may change it
    return counts


def resample_counts(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """How often each of ``n`` images is drawn in each resample: float64 ``(resamples, n)``,
    every row summing to ``n`` (a read-only array, the same for the same arguments)."""
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"n must be a positive int (images), got {n!r}")
    _, resamples, seed = check_options(DEFAULT_LEVEL, resamples, seed)
    return _counts(int(n), resamples, seed)


def bootstrap(contributions: Any, statistic: Statistic, *, level: float = DEFAULT_LEVEL,
              resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap over images of a statistic of summed contributions.

    Parameters
    ----------
    contributions : array_like
        ``(n, k)``: what each of ``n`` images adds to the ``k`` sums the statistic reads.
    statistic : callable
        ``(..., k)`` sums -> ``(...)`` values (NaN where undefined), vectorised.
    level : float, optional
        Coverage (default 0.95).
    resamples : int, optional
        Resamples (default 2000, at least 100).
    seed : int, optional
        Seed of the resamples (default 0).

    Returns
    -------
    Interval
        The statistic of the sums over all images, and its interval.

    Raises
    ------
    ValueError
        For an empty or non-finite ``contributions`` or a bad option.
    """
    level, resamples, seed = check_options(level, resamples, seed)
    check_function(statistic, "statistic")
    c = check_contributions(contributions, "contributions")
    return _bootstrap(c, statistic, level, resamples, seed)


def _bootstrap(c: np.ndarray, statistic: Statistic, level: float, resamples: int,
               seed: int) -> Interval:
    estimate = float(_statistic_values(statistic, c.sum(0)[None]).reshape(-1)[0])
    counts = _counts(len(c), resamples, seed)
    if 8 * resamples * c.shape[1] > MAX_COUNTS_BYTES:
        # The resampled sums are a dense (resamples, k) array: refused before NumPy's MemoryError.
        raise ValueError(
            f"resamples={resamples} of {c.shape[1]} sums need "
            f"{8 * resamples * c.shape[1] / 2 ** 30:.3g} GiB (more than "
            f"MAX_COUNTS_BYTES={MAX_COUNTS_BYTES}); use fewer resamples or fewer columns of "
            "contributions")
    values = _statistic_values(statistic, counts @ c)
    if values.shape != (resamples,):
        raise ValueError(f"statistic must map sums (..., k) to values (...): got shape "
                         f"{values.shape} for sums {(resamples, c.shape[1])}")
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Interval(estimate, math.nan, math.nan, len(c), level, resamples, True)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    # A mean of equal values differs by rounding between resamples: no spread all the same.
    spread = float(finite.max() - finite.min())
    degenerate = len(c) < 2 or spread <= 1e-12 * max(1.0, abs(float(finite.max())))
    return Interval(estimate, float(low), float(high), len(c), level, resamples, degenerate)


def _statistic_values(statistic: Statistic, sums: np.ndarray) -> np.ndarray:
    values = statistic(sums)
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"statistic must return numbers (one per row of sums), got "
                         f"{values!r:.80}") from None


def paired_difference(contributions_a: Any, contributions_b: Any, statistic: Statistic, *,
                      statistic_b: Statistic | None = None, level: float = DEFAULT_LEVEL,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """Paired bootstrap of ``statistic(a) - statistic_b(b)`` on the same images.

    Row ``i`` of both arrays must be the same image: each resample draws the same images for
    both methods.  ``statistic_b`` defaults to ``statistic``.

    Raises
    ------
    ValueError
        When the two arrays do not hold the same number of images (pass the images both
        methods were run on), or as :func:`bootstrap`.
    """
    level, resamples, seed = check_options(level, resamples, seed)
    check_function(statistic, "statistic")
    if statistic_b is not None:
        check_function(statistic_b, "statistic_b")
    a = check_contributions(contributions_a, "contributions_a")
    b = check_contributions(contributions_b, "contributions_b")
    if len(a) != len(b):
        raise ValueError(f"contributions_a and contributions_b must hold the same images, row "
                         f"for row: got {len(a)} and {len(b)} images; pass the images both "
                         "methods were run on")
    k = a.shape[1]
    stat_b = statistic if statistic_b is None else statistic_b

    def difference(sums: np.ndarray) -> np.ndarray:
        return statistic(sums[..., :k]) - stat_b(sums[..., k:])

    return _bootstrap(np.concatenate([a, b], axis=1), difference, level, resamples, seed)


# ---------------------------------------------------------------------------------------------
# Means of per-image values
# ---------------------------------------------------------------------------------------------


def mean_contributions(values: Any, name: str = "values") -> np.ndarray:
    """``(n, 2)``: ``[v, 1]`` per image, ``[0, 0]`` where ``v`` is NaN (undefined: ignored).

    Raises
    ------
    ValueError
        For a value that is infinite, or not a 1-D sequence of numbers.
    """
    v = as_float_array(values, name, "a 1-D sequence of numbers, one per image")
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, one value per image, got "
                         f"shape {v.shape}")
    if np.isinf(v).any():
        raise ValueError(f"{name} holds infinite values: a mean over images would be "
                         "meaningless (NaN marks an undefined value, which is ignored)")
    defined = ~np.isnan(v)
    if defined.any() and np.abs(v[defined]).max() > np.finfo(np.float64).max / len(v):
        # The sums of a resample would overflow to inf: an infinite mean, with only a warning.
        raise ValueError(f"{name} holds values up to {np.abs(v[defined]).max():.3g}: their sum "
                         f"over {len(v)} images overflows float64; rescale them")
    return np.stack([np.where(defined, v, 0.0), defined.astype(np.float64)], axis=1)


def mean_of_sums(sums: np.ndarray) -> np.ndarray:
    """The statistic of :func:`mean_contributions`: sum of values / number defined."""
    sums = check_sums(sums, "mean_of_sums", even=False)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[..., 1] > 0, sums[..., 0] / sums[..., 1], np.nan)


def mean_interval(values: Any, *, level: float = DEFAULT_LEVEL,
                  resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """The mean of per-image values (NaN ignored) and its bootstrap interval over images.

    ``n`` of the result counts the images with a defined value.
    """
    c = mean_contributions(values)
    level, resamples, seed = check_options(level, resamples, seed)
    interval = _bootstrap(c, mean_of_sums, level, resamples, seed)
    return _with_n(interval, int(c[:, 1].sum()))


def paired_mean_difference(values_a: Any, values_b: Any, *, level: float = DEFAULT_LEVEL,
                           resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """Paired bootstrap of ``mean(a) - mean(b)``, value ``i`` of both being image ``i``.

    An image where either value is undefined (NaN) is left out of both means, so the two
    means stay on the same images.
    """
    a = mean_contributions(values_a, "values_a")
    b = mean_contributions(values_b, "values_b")
    if len(a) != len(b):
        raise ValueError(f"values_a and values_b must hold the same images, in the same order: "
                         f"got {len(a)} and {len(b)} values")
    both = (a[:, 1] * b[:, 1])[:, None]
    interval = paired_difference(a * both, b * both, mean_of_sums, level=level,
                                 resamples=resamples, seed=seed)
    return _with_n(interval, int(both.sum()))


def _with_n(interval: Interval, n: int) -> Interval:
    return Interval(interval.estimate, interval.low, interval.high, n, interval.level,
                    interval.resamples, interval.degenerate or n < 2)


# ---------------------------------------------------------------------------------------------
# The pointing game
# ---------------------------------------------------------------------------------------------


def pointing_game_contributions(pairs: Sequence[Pairs], num_classes: int) -> np.ndarray:
    """``(n, 2 · num_classes)``: per image, its hits per class then its scored pairs per class.

    Parameters
    ----------
    pairs : sequence
        One entry per image (an image without a pair contributes zeros but is still drawn):
        its ``(class_id, hit)`` pairs, hit ``+1`` (hit), ``-1`` (miss) or ``0`` (not scored,
        e.g. outside the difficult subset).
    num_classes : int
        Classes of the data set, at most :data:`MAX_NUM_CLASSES`.

    Raises
    ------
    TypeError
        For ``pairs`` (or one image's entry) that is not a sequence of pairs.
    ValueError
        For a class outside ``[0, num_classes)``, a hit other than +1 / -1 / 0, no image,
        a ``num_classes`` that is not a positive int or above :data:`MAX_NUM_CLASSES`, or an
        array above :data:`MAX_COUNTS_BYTES` (the interval functions keep only the classes
        scored, and take no such memory).
    """
    num_classes = check_num_classes(num_classes, 16, PER_IMAGE)
    images = check_pairs(pairs, num_classes, "pairs")
    if 16 * len(images) * num_classes > MAX_COUNTS_BYTES:
        raise ValueError(
            f"num_classes={num_classes} for {len(images)} images needs a "
            f"{16 * len(images) * num_classes / 2 ** 30:.3g} GiB array (more than "
            f"MAX_COUNTS_BYTES={MAX_COUNTS_BYTES}); give the number of classes of the data set, "
            "or call pointing_game_interval, which keeps only the classes scored")
    return _contributions(images, range(num_classes))


def _contributions(images: Sequence[Sequence[Tuple[int, int]]],
                   classes: Sequence[int]) -> np.ndarray:
    """``(n, 2 · len(classes))``: hits then scored pairs, one column per class of ``classes``
    (every scored class must be among them)."""
    column = {c: j for j, c in enumerate(classes)}
    k = len(column)
    out = np.zeros((len(images), 2 * k), dtype=np.float64)
    for i, image in enumerate(images):
        for c, hit in image:
            if hit != 0:
                out[i, column[c]] += hit == 1
                out[i, k + column[c]] += 1
    return out


#: Up to this size (64 MiB: 1 000 classes × 2 000 resamples take 32 MiB) the pointing-game
#: intervals give every class its columns, as :func:`pointing_game_contributions` does; above it
#: only the scored classes (the same values up to the last bit, in bounded memory).
DENSE_BYTES = 64 * 2 ** 20


def _columns(num_classes: int, rows: int, *images: Sequence[Sequence[Tuple[int, int]]]
             ) -> Sequence[int]:
    """The classes given columns in the bootstrap: all of them where the arrays of ``rows``
    rows (images or resamples) take at most :data:`DENSE_BYTES` — the same arithmetic, bit for
    bit, whatever the data — else only those with a scored pair (at least one).

    A class without a scored pair adds nothing to any resample and is never "seen" by
    :func:`pointing_game_accuracy`: leaving its columns out changes no value (up to the order
    in which the classes' mean is summed, the last bit), and keeps the bootstrap's memory
    independent of ``num_classes``."""
    if 16 * num_classes * rows <= DENSE_BYTES:
        return range(num_classes)
    classes = sorted({c for group in images for image in group for c, hit in image if hit != 0})
    return classes or [0]


def pointing_game_accuracy(sums: np.ndarray) -> np.ndarray:
    """The statistic of :func:`pointing_game_contributions`: the mean over the classes with a
    scored pair of hits / pairs (NaN when no class has one) — as
    :attr:`~torchray_like.benchmark.pointing_game.PointingGame.accuracy`."""
    sums = check_sums(sums, "pointing_game_accuracy", even=True)
    k = sums.shape[-1] // 2
    hits, totals = sums[..., :k], sums[..., k:]
    seen = totals > 0
    per_class = np.where(seen, hits / np.where(seen, totals, 1.0), 0.0)
    count = seen.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, per_class.sum(-1) / np.maximum(count, 1), np.nan)


def pointing_game_interval(pairs: Sequence[Pairs], num_classes: int, *,
                           level: float = DEFAULT_LEVEL, resamples: int = DEFAULT_RESAMPLES,
                           seed: int = 0) -> Interval:
    """Pointing-game accuracy (mean over classes) and its bootstrap interval over images.

    See :func:`pointing_game_contributions` for ``pairs``; ``n`` of the result counts every
    image given, also those without a scored pair (they are drawn like the others).
    """
    level, resamples, seed = check_options(level, resamples, seed)
    num_classes = check_num_classes(num_classes, 16, PER_IMAGE)
    images = check_pairs(pairs, num_classes, "pairs")
    c = _contributions(images, _columns(num_classes, max(resamples, len(images)),
                                        images))
    return _bootstrap(c, pointing_game_accuracy, level, resamples, seed)


def paired_pointing_game_difference(pairs_a: Sequence[Pairs], pairs_b: Sequence[Pairs],
                                    num_classes: int, *, level: float = DEFAULT_LEVEL,
                                    resamples: int = DEFAULT_RESAMPLES, seed: int = 0
                                    ) -> Interval:
    """Paired bootstrap of accuracy(a) - accuracy(b), entry ``i`` of both being image ``i``
    (each accuracy averaged over its classes, as the benchmark does).

    Raises
    ------
    ValueError
        Where the two lists differ in length (:func:`paired_difference`), or image ``i`` was
        scored on other classes by ``a`` than by ``b``: the difference would compare other
        questions, not the methods.
    """
    level, resamples, seed = check_options(level, resamples, seed)
    num_classes = check_num_classes(num_classes, 16, PER_IMAGE)
    images_a = check_pairs(pairs_a, num_classes, "pairs_a")
    images_b = check_pairs(pairs_b, num_classes, "pairs_b")
    for i, (pa, pb) in enumerate(zip(images_a, images_b)):
        if sorted(c for c, _ in pa) != sorted(c for c, _ in pb):
            raise ValueError(
                f"image {i} was scored on classes {sorted(c for c, _ in pa)} in pairs_a "
                f"and {sorted(c for c, _ in pb)} in pairs_b: a paired difference needs "
                "both methods scored on the same (image, class) pairs")
    classes = _columns(num_classes, max(len(images_a), resamples), images_a, images_b)
    a, b = _contributions(images_a, classes), _contributions(images_b, classes)
    return paired_difference(a, b, pointing_game_accuracy, level=level, resamples=resamples,
                             seed=seed)


# ---------------------------------------------------------------------------------------------
# The published orderings of the pointing game
# ---------------------------------------------------------------------------------------------

#: Orderings of Fong et al. (2019), Table 1 (VOC07 test, VGG16; accuracy in %) that the
#: pointing game checks with a paired bootstrap: ``(subset, better, worse, published accuracy
#: of the better, of the worse)``.  Gaps of at least 5 points only (the published shape:
#: DeConvNet ~ centre < gradient ~ guided backprop < excitation backprop < the
#: class-discriminative methods, most clearly on the difficult pairs).
PUBLISHED_ORDERINGS: Tuple[Tuple[str, str, str, float, float], ...] = (
    ("all", "grad_cam", "center", 86.6, 69.6),
    ("all", "gradient", "center", 76.3, 69.6),
    ("all", "gradient", "deconvnet", 76.3, 67.5),
    ("all", "grad_cam", "deconvnet", 86.6, 67.5),
    ("difficult", "grad_cam", "gradient", 74.0, 56.9),
    ("difficult", "grad_cam", "guided_backprop", 74.0, 53.0),
    ("difficult", "contrastive_excitation_backprop", "excitation_backprop", 66.5, 56.6),
    ("difficult", "contrastive_excitation_backprop", "gradient", 66.5, 56.9),
    ("difficult", "rise", "gradient", 75.1, 56.9),
    ("difficult", "extremal_perturbation", "gradient", 76.1, 56.9),
)

#: The papers' names of the methods, for the printed orderings.
SHORT_NAMES = {"center": "centre", "gradient": "gradient", "deconvnet": "DeConvNet",
               "guided_backprop": "guided BP", "grad_cam": "Grad-CAM",
               "excitation_backprop": "EBP", "contrastive_excitation_backprop": "c-EBP",
               "rise": "RISE", "extremal_perturbation": "EP"}

#: ``(model, method, subset) -> {image index: that image's (class, hit) pairs}``.
PairsOf = Callable[[str, str, str], Mapping[int, Pairs]]


def compare_orderings(pairs_of: PairsOf, models: Sequence[str], methods: Sequence[str],
                      num_classes: int,
                      orderings: Sequence[Tuple[str, str, str, float, float]] = PUBLISHED_ORDERINGS,
                      *, level: float = DEFAULT_LEVEL, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0) -> List[Dict[str, Any]]:
    """Per model, each ordering whose two methods are in ``methods`` and share images: the
    paired bootstrap of accuracy(better) - accuracy(worse) on the images both ran on, and its
    :func:`verdict`.

    Returns
    -------
    list of dict
        ``model, subset, better, worse, published`` (the published difference in points),
        ``difference, difference_low, difference_high`` (fractions), ``images, verdict``.
    """
    check_function(pairs_of, "pairs_of")
    models, methods = check_names(models, "models"), check_names(methods, "methods")
    orderings = _check_orderings(orderings)
    out = []
    for model in models:
        for subset, better, worse, pub_better, pub_worse in orderings:
            if better not in methods or worse not in methods:
                continue
            a, b = _pairs_by_image(pairs_of, model, better, subset), \
                _pairs_by_image(pairs_of, model, worse, subset)
            shared = sorted(set(a) & set(b))
            if not shared:
                continue
            d = paired_pointing_game_difference([a[i] for i in shared], [b[i] for i in shared],
                                                num_classes, level=level, resamples=resamples,
                                                seed=seed)
            out.append({"model": model, "subset": subset, "better": better, "worse": worse,
                        "published": round(pub_better - pub_worse, 1), **d.as_dict("difference"),
                        "images": d.n, "verdict": verdict(d)})
    return out


def _check_orderings(orderings: Any) -> List[Tuple[str, str, str, float, float]]:
    if isinstance(orderings, (str, bytes)) or not isinstance(orderings, Iterable):
        raise TypeError(f"orderings must be a sequence of (subset, better, worse, published "
                        f"accuracy of better, of worse) tuples, got {type(orderings).__name__}")
    out = []
    for k, ordering in enumerate(orderings):
        if not isinstance(ordering, (tuple, list)) or len(ordering) != 5 \
                or not all(isinstance(x, str) for x in ordering[:3]) \
                or not all(is_number(x) for x in ordering[3:]):
            raise ValueError(f"orderings[{k}] must be (subset, better, worse, published accuracy "
                             f"of better, of worse), e.g. {PUBLISHED_ORDERINGS[0]}, got "
                             f"{ordering!r:.80}")
        subset, better, worse, pub_better, pub_worse = ordering
        out.append((subset, better, worse, float(pub_better), float(pub_worse)))
    return out


def _pairs_by_image(pairs_of: PairsOf, model: str, method: str, subset: str
                    ) -> Mapping[int, Pairs]:
    pairs = pairs_of(model, method, subset)
    if not isinstance(pairs, Mapping):
        raise TypeError(f"pairs_of({model!r}, {method!r}, {subset!r}) must return a mapping "
                        f"{{image index: that image's (class_id, hit) pairs}}, got "
                        f"{type(pairs).__name__}")
    return pairs


#: The keys :func:`format_orderings` reads from each comparison.
_COMPARISON_KEYS = ("model", "subset", "better", "worse", "published", "difference",
                    "difference_low", "difference_high", "images", "verdict")


def format_orderings(comparisons: Sequence[Mapping[str, Any]]) -> str:
    """:func:`compare_orderings`'s result, one line each, and a count per model."""
    if not comparisons:
        return ""
    for k, c in enumerate(comparisons):
        missing = [key for key in _COMPARISON_KEYS if not isinstance(c, Mapping) or key not in c]
        if missing:
            raise ValueError(f"comparisons[{k}] must be a dict of compare_orderings, missing "
                             f"{', '.join(missing)}; pass compare_orderings' result")
    lines = ["published orderings (Fong et al. 2019, Table 1, VOC07 VGG16), paired 95 % "
             "bootstrap of the difference (points) on the images both methods ran on:"]
    names = [f"{SHORT_NAMES.get(c['better'], c['better'])} - "
             f"{SHORT_NAMES.get(c['worse'], c['worse'])}" for c in comparisons]
    width = max(len(n) for n in names)
    for c, name in zip(comparisons, names):
        d = Interval(c["difference"], c["difference_low"], c["difference_high"], c["images"],
                     degenerate=c["difference_low"] == c["difference_high"])
        lines.append(f"  {c['model']:<15} {c['subset']:<9} {name:<{width}} "
                     f"{d.format(100.0, signed=True):<21} {c['images']:>4} img  "
                     f"(published {c['published']:+.1f})  {c['verdict']}")
    for model in dict.fromkeys(c["model"] for c in comparisons):
        mine = [c for c in comparisons if c["model"] == model]
        counts = {v: sum(c["verdict"] == v for c in mine)
                  for v in ("reproduced", "reversed", "not resolved", "too few images")}
        lines.append(f"  {model}: {counts['reproduced']} of {len(mine)} reproduced "
                     f"significantly, {counts['reversed']} reversed significantly, "
                     f"{counts['not resolved']} not resolved"
                     + (f", {counts['too few images']} on too few images (< {MIN_IMAGES})"
                        if counts["too few images"] else ""))
    return "\n".join(lines)
