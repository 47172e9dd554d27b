r"""Extremal perturbations.

Fong, Patrick, Vedaldi, "Understanding deep networks via extremal perturbations and smooth masks",
ICCV 2019 (arXiv 1910.08485).

For a target area fraction ``a``, an *extremal perturbation* is the smooth mask ``m`` of area
``a`` that maximises the class score when only the masked region of the image is kept intact and
the rest is perturbed (the *preservation* game), or that minimises it when the masked region is
perturbed (the *deletion* game), or both (*dual*):

.. math::

    m_a = \operatorname{argmax}_{m} \Phi(m \otimes x) - \lambda \, \lVert
          \operatorname{vecsort}(m) - r_a \rVert^2 ,

where ``m ⊗ x`` perturbs ``x`` where ``m`` is low (a blur whose width grows as ``m`` falls, or a
fade), ``vecsort`` sorts the mask values and ``r_a`` is the sorted reference vector with
``(1 − a)·|Ω|`` zeros and ``a·|Ω|`` ones (the area constraint by ranking).  The weight ``λ`` grows
geometrically during the optimisation, so the mask first follows the reward and is then held to its
area.

Parts of the method, as in the paper:

* **Smooth masks.**  The mask is a smooth-max interpolation of a coarse grid of parameters
  ``m̄ ∈ [0, 1]`` placed every ``step`` pixels:
  ``m(u) = smax_T { g_σ(u − v) m̄(v) }`` over the grid points ``v`` (here those within 3σ),
  with ``g_σ`` a Gaussian of width ``sigma`` and
  ``smax_T(z) = Σ z_i e^{z_i/T} / Σ e^{z_i/T}`` (the max as ``T → 0``).
* **Perturbation pyramid** (:class:`Perturbation`): ``num_levels`` copies of the image blurred with
  ``σ_l = max_blur · (1 − l / (num_levels − 1))``; the mask value selects (and linearly
  interpolates) the level, i.e. the pixel ``u`` is blurred with ``σ ≈ max_blur · (1 − m(u))``.
  The ``"fade"`` perturbation replaces the blur by ``m·x + (1 − m)·baseline``.
* **Jitter**: the mask is randomly perturbed at every iteration (see below for how).
* **Optimisation**: SGD with momentum on ``m̄``, clamped to ``[0, 1]`` after every step.

Choices of this implementation (the paper leaves them open or they are ours):

* The smooth max is evaluated on a lattice at most ``σ/6`` apart (twice as fine as the grid
  for the paper's step 7 and σ 21) and interpolated linearly (bilinear, trilinear) in between:
  within 0.02 of the formula at every pixel for blob-like masks (0.04 for a random parameter
  field, whose max has many kinks), at a cost proportional to the number of pixels
  (the formula at every pixel costs ``(step/subdivision)^d`` times more in the smooth max:
  at 224² with step 7 that is several times the cost of everything else an iteration does
  besides the network).
  It is applied along each axis in turn: exact for ``T = 0`` (the max),
  because the Gaussian kernel factorises and the max of products of non-negative factors
  separates; a separable smooth max for ``T > 0``.  Each axis is normalised by its response to
  an all-ones grid, so a grid of ones gives a mask of exactly one; the result is clamped to
  ``[0, 1]``.  The default ``T = 0.05`` spreads the gradient over the few largest terms.
* The ranking constraint compares the sorted mask with the reference by the mean squared
  difference; its weight grows geometrically from ``area_weight[0]`` to ``area_weight[1]``.
  The parameters start at 0.5; SGD uses ``learning_rate`` 0.1 and ``momentum`` 0.9.
* Jitter shifts the mask (not the image) by a random integer offset in
  ``[−step//2, step//2]`` per axis, independently for each mask and iteration, so that the
  optimum cannot exploit the phase of the grid; the returned mask is unshifted.  The shifts
  come from one private generator per image (see ``generator``).
* Several images, one target each, and every requested area are optimised together: one forward
  and one backward pass of ``N·K`` perturbed images per iteration (``2·N·K`` for ``"dual"``).
* 3-D inputs ``(N, C, T, H, W)`` get masks over ``T, H, W``.  Scalar ``step``, ``sigma`` and
  ``max_blur`` apply to the spatial axes as they are; along time they are scaled by
  ``T / max(H, W)`` (the time axis is treated as if stretched to the spatial size; at least one
  frame for ``step``).  Give one value per axis to choose otherwise.  1-D inputs work as well.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .maps import resize_saliency, smooth_saliency
from .state import check_input, check_model, model_state_guard
from .targets import check_class_range, class_indices

__all__ = [
    "PRESERVE_VARIANT",
    "DELETE_VARIANT",
    "DUAL_VARIANT",
    "BLUR_PERTURBATION",
    "FADE_PERTURBATION",
    "VARIANTS",
    "PERTURBATIONS",
    "Perturbation",
    "MaskGenerator",
    "ExtremalHistory",
    "simple_reward",
    "contrastive_reward",
    "ranking_area_loss",
    "extremal_perturbation",
]

#: Keep the masked region, perturb the rest; maximise the class score.
PRESERVE_VARIANT = "preserve"
#: Perturb the masked region; minimise the class score.
DELETE_VARIANT = "delete"
#: Both games at once: reward = preserve score − delete score.
DUAL_VARIANT = "dual"
#: Blur pyramid perturbation.
BLUR_PERTURBATION = "blur"
#: Fade-to-baseline perturbation.
FADE_PERTURBATION = "fade"

VARIANTS = (PRESERVE_VARIANT, DELETE_VARIANT, DUAL_VARIANT)
PERTURBATIONS = (BLUR_PERTURBATION, FADE_PERTURBATION)

_TRUNCATE = 3.0  # the smooth-max kernel is cut at 3σ (weight 0.011)

Number = Union[int, float]
PerAxis = Union[Number, Sequence[Number]]


# ---------------------------------------------------------------------------------------------
# Small validators
# ---------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _per_axis(value: Any, name: str, spatial: Tuple[int, ...], *, integer: bool,
              minimum: float, strict: bool, time_scaled: bool) -> Tuple[float, ...]:
    """Expand ``value`` (one number or one per spatial axis) to one value per axis.

    A scalar is used as is on every axis, except along time for 3-D inputs (``time_scaled``),
    where it is multiplied by ``T / max(H, W)``.
    """
    d = len(spatial)
    ok = (lambda v: _is_number(v) and math.isfinite(v) and (v > minimum if strict else
                                                            v >= minimum)
          and (not integer or float(v).is_integer()))
    cmp = ">" if strict else "≥"
    kind = "integer" if integer else "number"
    if _is_number(value):
        if not ok(value):
            raise ValueError(f"{name} must be a finite {kind} {cmp} {minimum:g}, got {value!r}")
        vals = [float(value)] * d
        if time_scaled and d == 3:
            scaled = float(value) * spatial[0] / max(spatial[1:])
            vals[0] = max(1.0, float(round(scaled))) if integer else scaled
        return tuple(vals)
    if isinstance(value, (list, tuple, torch.Size)):
        if len(value) != d or not all(ok(v) for v in value):
            raise ValueError(
                f"{name} must be one {kind} {cmp} {minimum:g} or {d} of them (one per spatial "
                f"axis, torch order), got {value!r}")
        return tuple(float(v) for v in value)
    raise TypeError(f"{name} must be a number or a sequence of {d} numbers, got "
                    f"{type(value).__name__}")


def _check_areas(areas: Any) -> List[float]:
    if _is_number(areas):
        areas = [areas]
    if isinstance(areas, torch.Tensor):
        areas = areas.flatten().tolist()
    if not isinstance(areas, (list, tuple)):
        raise TypeError(f"areas must be a number or a sequence of numbers in (0, 1), got "
                        f"{type(areas).__name__}")
    if len(areas) == 0:
        raise ValueError("areas is empty; give at least one area fraction in (0, 1), e.g. [0.1]")
    for a in areas:
        if not _is_number(a) or not (0 < float(a) < 1):
            raise ValueError(
                f"areas must be fractions of the image strictly between 0 and 1, got {a!r} in "
                f"{list(areas)!r}")
    return [float(a) for a in areas]


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


def _class_scores(activation: Any, target: torch.Tensor, name: str) -> torch.Tensor:
    """One score per row: ``activation[i, target[i]]`` (summed over score-map positions); for a
    single-logit head ``(B,)``/``(B, 1)``, ``+z`` for target 1 and ``−z`` for target 0."""
    if not isinstance(activation, torch.Tensor):
        raise TypeError(
            f"{name}: the model returned a {type(activation).__name__}, not a tensor; pass a "
            "reward_func(activation, target, variant) that extracts the scores")
    if activation.dim() == 0 or activation.shape[0] != target.shape[0]:
        raise ValueError(
            f"{name}: the model output has shape {tuple(activation.shape)}, expected a batch of "
            f"{target.shape[0]} rows")
    rows = torch.arange(target.shape[0], device=activation.device)
    target = target.to(activation.device)
    if activation.dim() == 1 or (activation.dim() == 2 and activation.shape[1] == 1):
        return activation.reshape(-1) * (target * 2 - 1).to(activation.dtype)
    scores = activation[rows, target]
    return scores.flatten(1).sum(1) if scores.dim() > 1 else scores


def _split_dual(activation: Any, target: torch.Tensor, variant: str, name: str):
    if variant not in VARIANTS:
        raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {variant!r}")
    if variant != DUAL_VARIANT:
        return activation, None
    if not isinstance(activation, torch.Tensor) or activation.shape[0] != 2 * target.shape[0]:
        raise ValueError(
            f"{name}: the dual variant expects the outputs of the preserved images followed by "
            f"those of the deleted ones ({2 * target.shape[0]} rows), got "
            f"{tuple(getattr(activation, 'shape', ()))}")
    b = target.shape[0]
    return activation[:b], activation[b:]


def simple_reward(activation: torch.Tensor, target: torch.Tensor, variant: str) -> torch.Tensor:
    """The paper's reward: the target class score of the perturbed image.

    Parameters
    ----------
    activation : torch.Tensor
        Model output for the perturbed batch: ``(B, C)`` (or a single-logit head ``(B,)``).
        For ``"dual"`` it is ``(2B, C)``: the ``B`` preserved images, then the ``B`` deleted ones.
    target : torch.Tensor
        ``(B,)`` class indices, one per mask.
    variant : {"preserve", "delete", "dual"}

    Returns
    -------
    torch.Tensor
        ``(B,)`` rewards to maximise: ``y_c(m⊗x)`` (preserve), ``−y_c((1−m)⊗x)`` (delete), or
        their sum ``y_c(m⊗x) − y_c((1−m)⊗x)`` (dual).
    """
    keep, drop = _split_dual(activation, target, variant, "simple_reward")
    if variant == PRESERVE_VARIANT:
        return _class_scores(keep, target, "simple_reward")
    if variant == DELETE_VARIANT:
        return -_class_scores(keep, target, "simple_reward")
    return (_class_scores(keep, target, "simple_reward")
            - _class_scores(drop, target, "simple_reward"))


def _contrast(activation: Any, target: torch.Tensor) -> torch.Tensor:
    if not isinstance(activation, torch.Tensor) or activation.dim() != 2 or \
            activation.shape[1] < 2:
        raise ValueError(
            "contrastive_reward needs (B, C) class scores with at least two classes, got "
            f"{tuple(getattr(activation, 'shape', ()))}")
    score = _class_scores(activation, target, "contrastive_reward")
    rows = torch.arange(target.shape[0], device=activation.device)
    others = activation.clone()
    others[rows, target.to(activation.device)] = -math.inf
    return score - others.amax(dim=1)


def contrastive_reward(activation: torch.Tensor, target: torch.Tensor,
                       variant: str) -> torch.Tensor:
    """A class-contrastive reward: the target score minus the best other class score.

    ``y_c − max_{c' ≠ c} y_{c'}`` of the preserved image (preserve), its negation for the deleted
    image (delete), or the difference of the two (dual).  Same arguments and layout as
    :func:`simple_reward`; needs ``(B, C)`` outputs with ``C ≥ 2``.
    """
    keep, drop = _split_dual(activation, target, variant, "contrastive_reward")
    if variant == PRESERVE_VARIANT:
        return _contrast(keep, target)
    if variant == DELETE_VARIANT:
        return -_contrast(keep, target)
    return _contrast(keep, target) - _contrast(drop, target)


# ---------------------------------------------------------------------------------------------
# Perturbation pyramid
# ---------------------------------------------------------------------------------------------


# MOVE-TO-COMMON: a faster smooth_saliency for wide kernels (same operator, exactly).
def _gaussian_matrix(length: int, sigma: float, truncate: float = 4.0,
                     dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The ``(length, length)`` matrix of a 1-D Gaussian blur with replicated borders.

    ``K @ v`` equals ``scipy.ndimage.gaussian_filter1d(v, sigma, mode="nearest",
    truncate=truncate)`` and :func:`~torchray_like.attribution.common.smooth_saliency`: the
    kernel is cut at ``int(truncate·σ + 0.5)`` pixels and normalised to sum to one.
    """
    radius = max(int(truncate * sigma + 0.5), 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    # Row i, column j holds k[j − i + radius] (the band) ...
    i = torch.arange(length).view(-1, 1)
    offset = torch.arange(length).view(1, -1) - i
    band = offset.abs() <= radius
    mat = torch.where(band, k[(offset + radius).clamp(0, 2 * radius)],
                      torch.zeros((), dtype=torch.float64))
    # ... plus, in the first and last columns, the taps that fall off the border (replicated).
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), k.cumsum(0)])   # cum[n] = Σ k[:n]
    rows = i.view(-1)
    mat[:, 0] += cum[(radius - rows).clamp(0, 2 * radius + 1)]
    mat[:, -1] += 1 - cum[(radius + length - rows).clamp(0, 2 * radius + 1)]
    return mat.to(dtype=dtype, device=device)


def _gaussian_blur_stack(x: torch.Tensor, sigmas: Sequence[Sequence[float]]) -> torch.Tensor:
    """Blur ``(N, C, *spatial)`` with each per-axis ``sigmas[l]``: ``(N, len(sigmas), C, ...)``.

    Separable, one batched matrix product per axis for all the levels at once: a dense product
    runs far faster on CPUs than a long 1-D convolution (σ = 20 px needs 161 taps).
    """
    levels = len(sigmas)
    y = x.unsqueeze(0).expand((levels,) + tuple(x.shape))
    for a in range(x.dim() - 2):
        length = x.shape[2 + a]
        per_level = [float(s[a]) for s in sigmas]
        if all(s == 0 for s in per_level):
            continue
        eye = torch.eye(length, dtype=x.dtype, device=x.device)
        mats = torch.stack([_gaussian_matrix(length, s, dtype=x.dtype, device=x.device)
                            if s > 0 else eye for s in per_level])
        moved = y.movedim(3 + a, -1)
        shape = moved.shape
        out = torch.matmul(moved.reshape(levels, -1, length), mats.transpose(1, 2))
        y = out.view(shape).movedim(-1, 3 + a)
    return y.movedim(0, 1).contiguous()


class Perturbation:
    """A perturbation pyramid: the mask value chooses how much each pixel is perturbed.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, *spatial)`` images (1 to 3 spatial dimensions).
    num_levels : int
        Number of pyramid levels (≥ 2).  Level ``num_levels − 1`` is the image itself, level 0
        the most perturbed copy.
    max_blur : float or sequence of float
        ``"blur"``: the Gaussian σ (pixels) of level 0, one value or one per spatial axis (torch
        order; one value is scaled by ``T / max(H, W)`` along the time axis of 3-D inputs).
        Level ``l`` is blurred with ``σ_l = max_blur · (1 − l/(num_levels − 1))``,
        separably, the kernel truncated at 4σ and the borders replicated: the operator of
        ``scipy.ndimage.gaussian_filter(..., mode="nearest")`` and of
        :func:`~torchray_like.attribution.common.smooth_saliency`.
    type : {"blur", "fade"}
        ``"fade"``: level ``l`` is ``baseline + (l/(num_levels − 1))·(x − baseline)``, so
        :meth:`apply` gives exactly ``m·x + (1 − m)·baseline``.
    fade_to : {"zero", "mean"}
        The fade baseline: zeros, or each image's per-channel mean.

    Attributes
    ----------
    pyramid : torch.Tensor
        ``(N, num_levels, C, *spatial)``.

    Notes
    -----
    :meth:`apply` interpolates linearly between the two levels around ``m·(num_levels − 1)``, so
    the perturbed pixel is a blur of width about ``max_blur·(1 − m)`` (Fong et al. 2019).
    """

    def __init__(self, input: torch.Tensor, num_levels: int = 8, max_blur: PerAxis = 20,
                 type: str = BLUR_PERTURBATION, fade_to: str = "zero") -> None:
        check_input(input, "input", needs_grad=False)
        spatial = tuple(input.shape[2:])
        if not 1 <= len(spatial) <= 3:
            raise ValueError(f"input must have 1 to 3 spatial dimensions, got shape "
                             f"{tuple(input.shape)}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, Integral) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer ≥ 2, got {num_levels!r}")
        if type not in PERTURBATIONS:
            raise ValueError(f"perturbation type must be one of {PERTURBATIONS}, got {type!r}")
        if fade_to not in ("zero", "mean"):
            raise ValueError(f"fade_to must be 'zero' or 'mean', got {fade_to!r}")
        blur = _per_axis(max_blur, "max_blur", spatial, integer=False, minimum=0.0,
                         strict=False, time_scaled=True)
        self.type = type
        self.num_levels = int(num_levels)
        self.max_blur = blur
        x = input.detach()
        top = self.num_levels - 1
        with torch.no_grad():
            if type == BLUR_PERTURBATION:
                blurred = _gaussian_blur_stack(
                    x, [[b * (1 - l / top) for b in blur] for l in range(top)])
                self.pyramid = torch.cat([blurred, x.unsqueeze(1)], dim=1)
            else:
                base = (torch.zeros_like(x) if fade_to == "zero"
                        else x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x))
                self.pyramid = torch.stack(
                    [base + (l / top) * (x - base) for l in range(self.num_levels)], dim=1)

    def to(self, device: Union[str, torch.device]) -> "Perturbation":
        """Move the pyramid to ``device`` (in place); returns ``self``."""
        self.pyramid = self.pyramid.to(device)
        return self

    def apply(self, mask: torch.Tensor) -> torch.Tensor:
        """Perturb the images with ``mask``.

        Parameters
        ----------
        mask : torch.Tensor
            ``(B, 1, *spatial)`` values in ``[0, 1]`` (1 keeps the pixel, 0 perturbs it
            fully), with ``B`` a multiple ``N·K`` of the number of images: masks are
            sample-major, mask ``b`` perturbs image ``b // K``.

        Returns
        -------
        torch.Tensor
            ``(B, C, *spatial)``, differentiable with respect to ``mask``.
        """
        pyr = self.pyramid
        n, levels, c = pyr.shape[:3]
        spatial = tuple(pyr.shape[3:])
        if not isinstance(mask, torch.Tensor) or mask.dim() != pyr.dim() - 1 or \
                mask.shape[1] != 1 or tuple(mask.shape[2:]) != spatial or \
                mask.shape[0] % n != 0:
            raise ValueError(
                f"mask must have shape (N·K, 1, {', '.join(map(str, spatial))}) with N·K a "
                f"multiple of the {n} images, got {tuple(getattr(mask, 'shape', ()))}")
        k = mask.shape[0] // n
        t = mask.clamp(0, 1) * (levels - 1)
        lower = t.detach().floor().clamp_(max=levels - 2)
        frac = (t - lower).view((n, k, 1, 1) + spatial)
        index = lower.long().view((n, k, 1, 1) + spatial).expand((n, k, 1, c) + spatial)
        # Gather from a broadcast view: the K masks of an image share its pyramid, no copy.
        view = pyr.unsqueeze(1).expand((n, k) + tuple(pyr.shape[1:]))
        low = view.gather(2, index)
        high = view.gather(2, index + 1)
        out = torch.lerp(low, high, frac) if frac.dtype == low.dtype else low + (high - low) * frac
        return out.reshape((n * k, c) + spatial)


# ---------------------------------------------------------------------------------------------
# Smooth masks
# ---------------------------------------------------------------------------------------------


@dataclass
class _Axis:
    length: int       # pixels of the image along this axis
    step: int         # grid stride (pixels)
    sigma: float      # Gaussian width (pixels)
    jitter: int       # largest shift (pixels)
    count: int        # number of parameters; parameter k sits at pixel origin + k·step
    origin: int       # pixel position of parameter 0
    sub: int          # evaluation points per grid step
    weights: torch.Tensor          # (sub, 2·radius + 2) kernel per phase, 0 beyond 3σ
    bias: torch.Tensor             # (count, sub, 2·radius + 2) 0 for a candidate, −inf if none
    norm: Optional[torch.Tensor]   # (points,) response to an all-ones grid
    index: torch.Tensor            # (canvas,) evaluation point at or before each canvas pixel
    frac: torch.Tensor             # (canvas, ) interpolation weight of the next point

    @property
    def points(self) -> int:
        return self.sub * (self.count - 1) + 1


class MaskGenerator:
    """Smooth masks from a coarse parameter grid (Fong et al. 2019, "smooth masks").

    The parameters ``m̄`` sit on a grid with stride ``step`` pixels.  The mask is the Gaussian
    smooth max ``m(u) = smax_T { g_σ(u − w) m̄(w) }`` over the grid points ``w`` within 3σ of
    ``u`` along every axis (so that it does not depend on the size of the grid), applied
    separably along each axis (exact for ``T = 0``) and normalised so that a grid of ones gives
    ones.  It is evaluated on a lattice ``subdivision`` times finer than the grid and
    interpolated linearly (bilinear / trilinear) in between: with ``subdivision = step`` that is
    every pixel; the default, ``ceil(6·step/σ)`` (at most ``step``), spaces the points at most
    ``σ/6`` apart: within 0.02 of the per-pixel formula for blob-like masks and 0.04 for random
    parameters (tested), with a smooth max ``(step/subdivision)^d`` times cheaper (12× for the
    paper's step 7 and σ 21 in 2-D).

    The mask is computed on a canvas ``jitter`` pixels larger than the image on each side, so
    that :meth:`crop` can shift it.

    Parameters
    ----------
    shape : tuple of int
        Spatial size of the image (torch order).
    step, sigma : tuple
        Per-axis grid stride (pixels, integers ≥ 1) and Gaussian width (pixels, > 0).
    jitter : tuple of int
        Per-axis largest shift (pixels, ≥ 0).
    temperature : float
        Smooth-max temperature ``T`` (0: the max).
    device, dtype
        Where the masks are made.
    subdivision : tuple of int, optional
        Per-axis evaluation points per grid step (1 to ``step``).

    Attributes
    ----------
    param_shape : tuple of int
        Shape of the parameter grid (without the batch and channel dimensions).
    grid_origin : tuple of int
        Pixel position of parameter 0 along each axis (parameter ``k`` is at
        ``grid_origin + k·step``; the grid extends past the image by at least ``jitter``).
    """

    def __init__(self, shape: Sequence[int], step: Sequence[int], sigma: Sequence[float],
                 jitter: Sequence[int], temperature: float = 0.0,
                 device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32,
                 subdivision: Optional[Sequence[int]] = None) -> None:
        if not (_is_number(temperature) and temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number ≥ 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.shape = tuple(int(s) for s in shape)
        if subdivision is None:
            subdivision = [min(int(s), math.ceil(6 * int(s) / float(sg)))
                           for s, sg in zip(step, sigma)]
        self.axes: List[_Axis] = []
        for length, s, sg, j, f in zip(self.shape, step, sigma, jitter, subdivision):
            s, j, sg, f = int(s), int(j), float(sg), int(f)
            if not 1 <= f <= s:
                raise ValueError(f"subdivision must be between 1 and step={s}, got {f}")
            first = -((j + s - 1) // s)                       # last grid point ≤ −jitter
            last = (length - 1 + j + s - 1) // s              # first grid point ≥ length−1+jitter
            radius = max(1, math.ceil(_TRUNCATE * sg / s))
            phase = torch.arange(f, dtype=torch.float64).view(-1, 1) * s / f
            d = phase - s * torch.arange(-radius, radius + 2, dtype=torch.float64).view(1, -1)
            w = torch.exp(-0.5 * (d / sg) ** 2)
            near = d.abs() <= _TRUNCATE * sg
            w = torch.where(near, w, torch.zeros_like(w))
            # The smooth max runs over the grid points within 3σ: window q, slot i holds
            # parameter q + i − radius, which may fall outside the grid.
            k = (torch.arange(last - first + 1).view(-1, 1, 1)
                 + torch.arange(-radius, radius + 2).view(1, 1, -1))
            valid = near.view(1, f, -1) & (k >= 0) & (k <= last - first)
            bias = torch.zeros(valid.shape, dtype=torch.float64).masked_fill(~valid, -math.inf)
            # Canvas pixel c is image pixel c − j, at (c − j − first·s)·f/s evaluation points.
            coord = (torch.arange(length + 2 * j, dtype=torch.float64) - j - first * s) * f / s
            points = f * (last - first) + 1
            if f == s:      # one point per pixel: a plain selection
                index = coord.round().long()
            else:
                index = coord.floor().clamp(max=points - 2).long()
            frac = coord - index
            self.axes.append(_Axis(length, s, sg, j, last - first + 1, first * s, f,
                                   w.to(device=device, dtype=dtype),
                                   bias.to(device=device, dtype=dtype), None,
                                   index.to(device), frac.to(device=device, dtype=dtype)))
        self.param_shape = tuple(a.count for a in self.axes)
        self.grid_origin = tuple(a.origin for a in self.axes)
        for a in self.axes:
            ones = torch.ones(1, a.count, device=device, dtype=dtype)
            a.norm = self._smax_axis(ones, a).squeeze(0).clamp_min(1e-12)

    def points(self, axis: int) -> torch.Tensor:
        """Pixel positions (float64) of the evaluation points along ``axis``."""
        a = self.axes[axis]
        return a.origin + torch.arange(a.points, dtype=torch.float64) * a.step / a.sub

    def _smax_axis(self, x: torch.Tensor, a: _Axis) -> torch.Tensor:
        """Smooth max along the last dimension: ``(..., count)`` → ``(..., points)``."""
        radius = (a.weights.shape[1] - 2) // 2
        win = F.pad(x, (radius, radius + 1)).unfold(-1, 2 * radius + 2, 1)   # (..., count, w)
        v = win.unsqueeze(-2) * a.weights                             # (..., count, sub, w)
        if self.temperature == 0:
            out = v.amax(dim=-1)
        else:
            # A softmax over the short last dimension, written out: torch.softmax is slow on
            # CPUs for rows this short.  Candidates outside the grid or beyond 3σ get weight 0
            # (bias −inf); the shift by the (detached) row max changes neither value nor
            # gradient.
            z = v / self.temperature + a.bias
            e = (z - z.detach().amax(dim=-1, keepdim=True)).exp()
            out = (v * e).sum(dim=-1) / e.sum(dim=-1)
        out = out.flatten(-2)[..., :a.points]
        return out if a.norm is None else out / a.norm

    @staticmethod
    def _interp_axis(x: torch.Tensor, a: _Axis) -> torch.Tensor:
        """Linear interpolation from the evaluation points to the canvas (last dimension)."""
        lo = x.index_select(-1, a.index)
        if a.sub == a.step:         # the points are the pixels
            return lo
        hi = x.index_select(-1, a.index + 1)
        return lo + (hi - lo) * a.frac

    def grid(self, params: torch.Tensor) -> torch.Tensor:
        """The mask at the evaluation points: ``(B, 1, *param_shape)`` →
        ``(B, 1, *points)`` (see :meth:`points`)."""
        out = params
        for i, a in enumerate(self.axes):
            dim = 2 + i
            out = self._smax_axis(out.movedim(dim, -1), a).movedim(-1, dim)
        return out.clamp(max=1.0)

    def canvas(self, params: torch.Tensor) -> torch.Tensor:
        """Masks on the jitter canvas: ``(B, 1, *param_shape)`` →
        ``(B, 1, *(shape + 2·jitter))``."""
        out = self.grid(params)
        for i in reversed(range(len(self.axes))):
            dim = 2 + i
            out = self._interp_axis(out.movedim(dim, -1), self.axes[i]).movedim(-1, dim)
        return out

    def crop(self, canvas: torch.Tensor, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The image-sized window of the canvas, shifted by ``shift`` ``(B, d)`` pixels (each in
        ``[−jitter, jitter]``; ``None`` for no shift).  A mask shifted by ``+s`` shows at pixel
        ``u`` the mask value at ``u − s``."""
        out = canvas
        for i, a in enumerate(self.axes):
            dim = 2 + i
            if shift is None or a.jitter == 0:
                out = out.narrow(dim, a.jitter, a.length)
                continue
            start = (a.jitter - shift[:, i]).view(-1, 1)
            idx = start + torch.arange(a.length, device=out.device).view(1, -1)   # (B, length)
            view = [out.shape[0]] + [1] * (out.dim() - 1)
            view[dim] = a.length
            size = list(out.shape)
            size[dim] = a.length
            out = out.gather(dim, idx.view(view).expand(size))
        return out

    def __call__(self, params: torch.Tensor, shift: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """Masks ``(B, 1, *shape)`` for the parameters ``(B, 1, *param_shape)``."""
        return self.crop(self.canvas(params), shift)


# ---------------------------------------------------------------------------------------------
# The area constraint
# ---------------------------------------------------------------------------------------------


class _RankingLoss(torch.autograd.Function):
    """``mean((vecsort(m) − r)²)`` per row, ``r`` the sorted reference with ``ones[b]`` ones.

    Computed without sorting: with ``τ`` the ``ones``-th largest value (a selection, several
    times cheaper than a sort on CPUs), ``Σ (vecsort(m) − r)² = Σ m² − 2·top + ones`` where
    ``top`` is the sum of the ``ones`` largest values.  The gradient ``2(m − r̂)/|Ω|`` assigns
    each value its reference entry ``r̂`` (1 above ``τ``, 0 below), as the backward of a sort
    does; values tied at ``τ`` share the remaining ones equally (the average of the gradients
    of the possible sort orders) instead of getting them in an arbitrary order.
    """

    @staticmethod
    def forward(ctx, flat, ones):  # type: ignore[override]
        b, p = flat.shape
        ref = torch.zeros_like(flat)
        groups: dict = {}
        for row, n1 in enumerate(ones):      # host-side: no device synchronisation
            groups.setdefault(n1, []).append(row)
        for n1, rows in groups.items():
            if n1 <= 0:
                continue
            index = torch.tensor(rows, device=flat.device)
            if n1 >= p:
                ref.index_fill_(0, index, 1.0)
                continue
            sub = flat.index_select(0, index)
            tau = sub.kthvalue(p - n1 + 1, dim=1, keepdim=True).values
            above = sub > tau
            tied = sub == tau
            share = (n1 - above.sum(1, keepdim=True)) / tied.sum(1, keepdim=True)
            ref.index_copy_(0, index, above.to(flat.dtype) + tied.to(flat.dtype) * share)
        ctx.save_for_backward(flat, ref)
        top = (flat * ref).sum(1)
        count = torch.tensor(ones, dtype=flat.dtype, device=flat.device)
        return (flat.pow(2).sum(1) - 2 * top + count) / p

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        flat, ref = ctx.saved_tensors
        return grad.view(-1, 1) * 2 * (flat - ref) / flat.shape[1], None


def ranking_area_loss(mask: torch.Tensor, area: Union[float, Sequence[float]]) -> torch.Tensor:
    """The area constraint by ranking (Fong et al. 2019): ``mean((vecsort(m) − r_a)²)``.

    Parameters
    ----------
    mask : torch.Tensor
        ``(B, 1, *spatial)`` (or any ``(B, ...)``) masks.
    area : float or sequence of float
        The area fraction ``a``, one for all rows or one per row; the reference ``r_a`` has
        ``round(a·|Ω|)`` ones and zeros elsewhere.

    Returns
    -------
    torch.Tensor
        ``(B,)`` losses, differentiable with respect to ``mask``.
    """
    flat = mask.flatten(1)
    b, p = flat.shape
    areas = [float(area)] * b if _is_number(area) else [float(a) for a in area]
    if len(areas) != b:
        raise ValueError(f"area must be one fraction or {b} (one per mask), got {len(areas)}")
    return _RankingLoss.apply(flat, tuple(int(round(a * p)) for a in areas))


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


@dataclass
class ExtremalHistory:
    """What :func:`extremal_perturbation` records (on the input's device).

    Rows are iterations, columns are masks in the order of the returned masks (sample-major:
    mask ``n·K + k`` is image ``n`` at area ``areas[k]``).  Iteration ``t`` records the masks
    *before* its update.

    Attributes
    ----------
    energy : torch.Tensor
        ``(max_iter, N·K)`` the minimised energy ``−reward + weight·area_loss``.
    reward : torch.Tensor
        ``(max_iter, N·K)`` the reward (see ``reward_func``) of the jittered masks.
    area_loss : torch.Tensor
        ``(max_iter, N·K)`` the ranking regulariser ``mean((vecsort(m) − r_a)²)``.
    area : torch.Tensor
        ``(max_iter, N·K)`` the mean mask value.
    weight : torch.Tensor
        ``(max_iter,)`` the regulariser weight ``λ_t``.
    target_area : torch.Tensor
        ``(N·K,)`` the requested areas.
    achieved_area : torch.Tensor
        ``(N·K,)`` the area of each returned mask, ``Σ m / |Ω|`` (before ``resize``/``smooth``).
        The soft edges of a smooth mask make it exceed the requested area slightly (by about
        10 % of it for masks a few σ wide).
    support_area : torch.Tensor
        ``(N·K,)`` the area of each returned mask thresholded at 0.5: the fraction of pixels with
        ``m ≥ 0.5``, the quantity the ranking constraint matches most closely.
    seeds : list of int
        The seed of each image's jitter generator.
    """

    energy: torch.Tensor
    reward: torch.Tensor
    area_loss: torch.Tensor
    area: torch.Tensor
    weight: torch.Tensor
    target_area: torch.Tensor
    achieved_area: torch.Tensor
    support_area: torch.Tensor
    seeds: List[int]


GeneratorType = Union[None, int, torch.Generator, Sequence[Union[int, torch.Generator]]]


def _sample_seeds(generator: GeneratorType, n: int) -> List[int]:
    """One seed per image.  ``None`` → seed 0; an int ``s`` → ``s, s+1, ...``; a generator →
    one draw from it, then consecutive; a sequence → one entry per image."""
    def from_gen(g: torch.Generator) -> int:
        return int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device).item())

    if generator is None:
        return list(range(n))
    if isinstance(generator, torch.Generator):
        base = from_gen(generator)
        return [base + i for i in range(n)]
    if isinstance(generator, Integral) and not isinstance(generator, bool):
        return [int(generator) + i for i in range(n)]
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(
                f"generator has {len(generator)} entries but the batch has {n} images; give one "
                "seed or torch.Generator per image, or a single one")
        out = []
        for g in generator:
            if isinstance(g, torch.Generator):
                out.append(from_gen(g))
            elif isinstance(g, Integral) and not isinstance(g, bool):
                out.append(int(g))
            else:
                raise TypeError(f"generator entries must be ints or torch.Generator, got {g!r}")
        return out
    raise TypeError(
        "generator must be None, an int seed, a torch.Generator, or one of those per image; got "
        f"{type(generator).__name__}")


def _draw_shifts(seeds: List[int], k: int, iters: int, jitter: Tuple[int, ...]) -> torch.Tensor:
    """``(iters, N·K, d)`` integer shifts, image ``n``'s drawn from its own CPU generator, so that
    a batch and per-image calls with the same seeds draw the same shifts."""
    d = len(jitter)
    bound = torch.tensor(jitter, dtype=torch.long)
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        u = torch.randint(-2 ** 30, 2 ** 30, (iters, k, d), generator=g)
        out.append(u % (2 * bound + 1) - bound)
    return torch.cat(out, dim=1)


# MOVE-TO-COMMON: every long-running method wants this progress bar.
@contextlib.contextmanager
def _progress(total: int, progress: Optional[bool], desc: str) -> Iterator[Iterable[int]]:
    """A context giving ``range(total)``, wrapped in a tqdm bar when ``progress`` (``None``: when
    stderr is a terminal).

    No tqdm object is made when the bar is off (even a disabled one starts tqdm's monitor
    thread), and a monitor thread that the bar started is stopped when the block ends, also
    when it raises.
    """
    show = progress if progress is not None else bool(getattr(sys.stderr, "isatty", None)
                                                      and sys.stderr.isatty())
    if not show:
        yield range(total)
        return
    had_monitor = getattr(tqdm, "monitor", None) is not None
    bar = tqdm(range(total), desc=desc, leave=False)
    try:
        yield bar
    finally:
        bar.close()
        cls = type(bar)
        monitor = getattr(cls, "monitor", None)
        if not had_monitor and monitor is not None and not getattr(cls, "_instances", True):
            monitor.exit()
            cls.monitor = None


def _check_target(target: Any, n: int) -> torch.Tensor:
    if callable(target) and not isinstance(target, torch.Tensor):
        raise TypeError(
            "extremal_perturbation: target must be a class index or one per image; for other "
            "scores pass reward_func(activation, target, variant) instead of a callable target")
    if isinstance(target, torch.Tensor) and (target.is_floating_point() or target.is_complex()):
        raise ValueError(
            f"extremal_perturbation: target must hold integer class indices, got a {target.dtype}"
            " tensor")
    return class_indices(target, n)


def _check_output_classes(output: Any, target: torch.Tensor) -> None:
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        return
    if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
        check_class_range(target, 0, 2, "a single-logit (binary) head takes target 1 (explain "
                                        "+logit) or 0 (explain −logit)")
    else:
        c = output.shape[1]
        check_class_range(target, 0, c, f"the model output has {c} classes (valid: 0..{c - 1})")


def extremal_perturbation(model: nn.Module, input: torch.Tensor, target: Any,
                          areas: Union[float, Sequence[float]] = (0.1,),
                          perturbation: str = BLUR_PERTURBATION, max_iter: int = 800,
                          num_levels: int = 8, step: PerAxis = 7, sigma: PerAxis = 21,
                          jitter: bool = True, variant: str = PRESERVE_VARIANT,
                          print_iter: Optional[int] = None, debug: bool = False,
                          reward_func: Callable[[Any, torch.Tensor, str], torch.Tensor]
                          = simple_reward,
                          resize: Any = False, resize_mode: str = "bilinear",
                          smooth: float = 0, *,
                          generator: GeneratorType = None,
                          progress: Optional[bool] = None,
                          learning_rate: float = 0.1, momentum: float = 0.9,
                          area_weight: Tuple[float, float] = (1.0, 1000.0),
                          max_blur: PerAxis = 20, fade_to: str = "zero",
                          temperature: float = 0.05) -> Tuple[torch.Tensor, ExtremalHistory]:
    """Extremal perturbation masks (Fong, Patrick, Vedaldi, ICCV 2019).

    For every image and every requested area, finds the smooth mask of that area that best
    preserves (or deletes) the evidence for the target class; see the module notes for the
    method.  All ``N`` images and ``K`` areas are optimised together, one batch of ``N·K``
    perturbed images per iteration.

    Parameters
    ----------
    model : torch.nn.Module
        The network; run in eval mode with frozen parameters, everything restored afterwards.
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point images, 1 to 3 spatial dimensions (3-D: video
        ``(N, C, T, H, W)`` with masks over ``T, H, W``).
    target : int, sequence of int or 1-D integer tensor
        The class to explain: one for all images, or one per image.
    areas : float or sequence of float
        Area fractions, each strictly in ``(0, 1)``.
    perturbation : {"blur", "fade"}
        See :class:`Perturbation`.
    max_iter : int
        Iterations (≥ 1); the paper uses 800.
    num_levels : int
        Levels of the perturbation pyramid (≥ 2).
    step : int or sequence of int
        Stride in pixels of the parameter grid (one value or one per spatial axis).
    sigma : float or sequence of float
        Width in pixels of the smooth-max kernel.
    jitter : bool
        Shift each mask by a random offset of up to ``step // 2`` pixels per axis at every
        iteration (drawn from per-image generators, see ``generator``).
    variant : {"preserve", "delete", "dual"}
        The game: keep the masked region (maximise the score), remove it (minimise the score), or
        both (one forward pass of ``2·N·K`` images).
    print_iter, debug
        Accepted for TorchRay compatibility; use ``progress`` and the returned history.
    reward_func : callable
        ``reward_func(activation, target, variant) -> (N·K,)`` rewards to maximise, given the model
        output for the perturbed batch and the per-mask targets (:func:`simple_reward`,
        :func:`contrastive_reward`, or your own).
    resize : bool, int or tuple
        Resize the returned masks (see :func:`~torchray_like.attribution.common.resize_saliency`);
        masks are computed at the input's resolution already.
    resize_mode : str
        Interpolation mode for ``resize``.
    smooth : float
        If positive, Gaussian smoothing of the returned masks with ``sigma = smooth·max(size)``.
    generator : None, int, torch.Generator or a sequence of them (one per image)
        Seeds the jitter.  Image ``n`` uses its own generator seeded with ``s + n`` for an int
        ``s`` (``None`` means ``s = 0``, so results are reproducible by default; a
        ``torch.Generator`` gives ``s`` by one draw).  Hence explaining image ``n`` alone with
        seed ``s + n`` gives the same masks as the batched call with seed ``s``.  The global RNG
        is never used.
    progress : bool, optional
        Show a tqdm progress bar (``None``: only on a terminal).
    learning_rate, momentum : float
        SGD on the mask parameters (clamped to ``[0, 1]`` after every step).
    area_weight : (float, float)
        ``λ`` at the first and the last iteration; it grows geometrically in between.
    max_blur : float or sequence of float
        σ in pixels of the strongest blur (see :class:`Perturbation`).
    fade_to : {"zero", "mean"}
        Baseline of the ``"fade"`` perturbation.
    temperature : float
        Smooth-max temperature ``T`` (0: the hard max).

    Returns
    -------
    masks : torch.Tensor
        ``(N·K, 1, *spatial)`` masks in ``[0, 1]``, sample-major (mask ``n·K + k`` is image ``n``
        at area ``areas[k]``), detached, on the input's device.
    history : ExtremalHistory
        Per-iteration energies, rewards, regularisers and areas (``(max_iter, N·K)`` each), and
        the achieved area of each returned mask (``history.achieved_area``: ``Σm/|Ω|``;
        ``history.support_area``: the fraction with ``m ≥ 0.5``).

    Raises
    ------
    ValueError, TypeError
        For invalid arguments (areas outside ``(0, 1)``, unknown variant or perturbation, target
        of the wrong length or out of range, ...).

    Notes
    -----
    ``step``, ``sigma`` and ``max_blur`` are in pixels; the defaults are the paper's for 224²
    images: scale them with the image size.  The batched result equals the per-image results
    (with the seeds above) as far as the model's outputs do not depend on the batch size.

    Examples
    --------
    >>> masks, history = extremal_perturbation(model, x, target=[3, 7],      # doctest: +SKIP
    ...                                        areas=[0.05, 0.1, 0.2])
    >>> masks.shape                    # 2 images × 3 areas                   # doctest: +SKIP
    torch.Size([6, 1, 224, 224])
    >>> history.achieved_area.view(2, 3)                                      # doctest: +SKIP
    """
    check_model(model)
    check_input(input, "input")
    spatial = tuple(input.shape[2:])
    d = len(spatial)
    if not 1 <= d <= 3:
        raise ValueError(
            f"input must be (N, C, L), (N, C, H, W) or (N, C, T, H, W), got shape "
            f"{tuple(input.shape)}")
    n = input.shape[0]
    target_idx = _check_target(target, n)
    area_list = _check_areas(areas)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer ≥ 1, got {max_iter!r}")
    steps = _per_axis(step, "step", spatial, integer=True, minimum=1, strict=False,
                      time_scaled=True)
    sigmas = _per_axis(sigma, "sigma", spatial, integer=False, minimum=0.0, strict=True,
                       time_scaled=True)
    if any(float(sg) > size / 4 for sg, size in zip(sigmas, spatial)):
        # The paper's step 7 / sigma 21 are for 224² images; on small inputs one parameter then
        # spreads over the whole image and the masks cannot localise anything.
        warnings.warn(
            f"extremal_perturbation: sigma {tuple(float(v) for v in sigmas)} is more than a "
            f"quarter of the input size {tuple(spatial)}, so masks can hardly localise; scale "
            "step and "
            "sigma with the image (the defaults 7 and 21 are for 224 px: about side/32 and "
            "3 × step)", UserWarning, stacklevel=2)
    if not callable(reward_func):
        raise TypeError(f"reward_func must be callable, got {type(reward_func).__name__}")
    if not (_is_number(smooth) and smooth >= 0 and math.isfinite(smooth)):
        raise ValueError(f"smooth must be a non-negative number, got {smooth!r}")
    if not (_is_number(learning_rate) and learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if not (_is_number(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if not (isinstance(area_weight, (tuple, list)) and len(area_weight) == 2
            and all(_is_number(w) and w > 0 and math.isfinite(w) for w in area_weight)):
        raise ValueError(
            f"area_weight must be two positive numbers (first, last), got {area_weight!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    # Check resize and resize_mode now (on a one-pixel map), not after the optimisation.
    resize_saliency(input, input.new_zeros((1, 1) + (1,) * d), resize, resize_mode)
    seeds = _sample_seeds(generator, n)

    k = len(area_list)
    b = n * k
    device, dtype = input.device, input.dtype
    jit = tuple((int(s) // 2) if jitter else 0 for s in steps)
    pert = Perturbation(input, num_levels, max_blur, perturbation, fade_to)
    gen = MaskGenerator(spatial, steps, sigmas, jit, temperature, device, dtype)
    mask_targets = target_idx.to(device).repeat_interleave(k)
    mask_areas = area_list * n
    target_area = torch.tensor(mask_areas, dtype=dtype, device=device)
    shifts = _draw_shifts(seeds, k, max_iter, jit).to(device) if any(jit) else None
    w0, w1 = float(area_weight[0]), float(area_weight[1])
    weights = torch.tensor([w0 * (w1 / w0) ** (t / max(max_iter - 1, 1))
                            for t in range(max_iter)], dtype=dtype, device=device)

    hist = {key: torch.empty(max_iter, b, dtype=dtype, device=device)
            for key in ("energy", "reward", "area_loss", "area")}
    with model_state_guard(model), torch.enable_grad(), \
            _progress(max_iter, progress, "extremal perturbation") as iterations:
        params = torch.full((b, 1) + gen.param_shape, 0.5, dtype=dtype, device=device,
                            requires_grad=True)
        optimizer = torch.optim.SGD([params], lr=learning_rate, momentum=momentum)
        for t in iterations:
            canvas = gen.canvas(params)
            mask = gen.crop(canvas)
            moved = mask if shifts is None else gen.crop(canvas, shifts[t])
            if variant == PRESERVE_VARIANT:
                batch = pert.apply(moved)
            elif variant == DELETE_VARIANT:
                batch = pert.apply(1 - moved)
            else:
                batch = torch.cat([pert.apply(moved), pert.apply(1 - moved)])
            output = model(batch)
            if t == 0:
                _check_output_classes(output, target_idx)
            reward = reward_func(output, mask_targets, variant)
            if t == 0:
                if not isinstance(reward, torch.Tensor) or tuple(reward.shape) != (b,):
                    raise ValueError(
                        f"reward_func must return a tensor of {b} rewards (one per mask), got "
                        f"{tuple(getattr(reward, 'shape', ())) or type(reward).__name__}")
                if not reward.requires_grad:
                    raise ValueError(
                        "the reward does not depend on the mask through autograd (does the "
                        "model detach its activations or run under torch.no_grad()?)")
            area_loss = ranking_area_loss(mask, mask_areas)
            energy = weights[t] * area_loss - reward
            (grad,) = torch.autograd.grad(energy.sum(), params)
            params.grad = grad
            optimizer.step()
            with torch.no_grad():
                params.clamp_(0, 1)
                hist["energy"][t] = energy
                hist["reward"][t] = reward
                hist["area_loss"][t] = area_loss
                hist["area"][t] = mask.flatten(1).mean(dim=1)
        params.grad = None
        with torch.no_grad():
            masks = gen(params.detach())
    achieved = masks.flatten(1).mean(dim=1)
    support = (masks >= 0.5).flatten(1).to(dtype).mean(dim=1)
    masks = resize_saliency(input, masks, resize, resize_mode)
    if smooth:
        masks = smooth_saliency(masks, smooth * max(masks.shape[2:]))
    history = ExtremalHistory(weight=weights, target_area=target_area, achieved_area=achieved,
                              support_area=support, seeds=seeds, **hist)
    return masks, history
