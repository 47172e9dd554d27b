r"""The machinery of extremal perturbations: perturbation pyramid, smooth masks, area loss, and
the optimiser of the mask parameters.

Fong, Patrick, Vedaldi, "Understanding deep networks via extremal perturbations and smooth masks",
ICCV 2019 (arXiv 1910.08485).  :mod:`.extremal_perturbation` drives these pieces and re-exports
the public ones (:class:`Perturbation`, :class:`MaskGenerator`, :func:`ranking_area_loss`).

* :class:`Perturbation` — ``num_levels`` copies of the image, blurred (or faded) less and less;
  the mask value picks and interpolates the level of each pixel.
* :class:`MaskGenerator` — the smooth mask ``m(u) = pool_v g_σ(u − v) m̄(v)`` of a coarse
  parameter grid ``m̄`` (pool: smooth max, max or normalised sum).
* :func:`ranking_area_loss` — the area constraint by ranking, ``‖vecsort(m) − r_a‖²``.
* :class:`MaskOptimizer` — SGD with momentum on ``m̄``, preconditioned so that every parameter
  moves at the speed its pixels ask for, with the reward measured in its own unit
  (:class:`RewardScale`) so that the balance with the area constraint does not depend on the
  scale of the model's scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._perturbation import is_number
from .maps import gaussian_kernel
from .state import check_input

__all__ = ["BLUR_PERTURBATION", "FADE_PERTURBATION", "PERTURBATIONS", "POOLING_METHODS",
           "Perturbation", "MaskGenerator", "ranking_area_loss", "RewardScale", "MaskOptimizer",
           "per_axis", "gaussian_matrix"]

#: Blur pyramid perturbation.
BLUR_PERTURBATION = "blur"
#: Fade-to-baseline perturbation.
FADE_PERTURBATION = "fade"
PERTURBATIONS = (BLUR_PERTURBATION, FADE_PERTURBATION)
#: How :class:`MaskGenerator` pools the Gaussian-weighted parameters.
POOLING_METHODS = ("softmax", "max", "sum")

_TRUNCATE = 3.0  # the mask kernel is cut at 3σ (weight 0.011)

Number = Union[int, float]
PerAxis = Union[Number, Sequence[Number]]


# ---------------------------------------------------------------------------------------------
# Per-axis arguments
# ---------------------------------------------------------------------------------------------


def per_axis(value: Any, name: str, spatial: Tuple[int, ...], *, integer: bool, minimum: float,
             strict: bool, time_scaled: bool = False) -> Tuple[float, ...]:
    """Expand ``value`` (one number or one per spatial axis) to one value per axis.

    A scalar is used as is on every axis, except along time for 3-D inputs (``time_scaled``),
    where it is multiplied by ``T / max(H, W)`` (at least 1 for integers).
    """
    d = len(spatial)

    def ok(v: Any) -> bool:
        return (is_number(v) and math.isfinite(v) and (v > minimum if strict else v >= minimum)
                and (not integer or float(v).is_integer()))

    cmp = ">" if strict else "≥"
    kind = "integer" if integer else "number"
    if is_number(value):
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


# ---------------------------------------------------------------------------------------------
# Perturbation pyramid
# ---------------------------------------------------------------------------------------------


def gaussian_matrix(length: int, sigma: float, truncate: float = 4.0,
                    dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The ``(length, length)`` matrix of a 1-D Gaussian blur with replicated borders.

    ``K @ v`` applies :func:`~torchray_like.attribution.maps.smooth_saliency`'s operator (the
    kernel of :func:`~torchray_like.attribution.maps.gaussian_kernel`, cut at
    ``int(truncate·σ + 0.5)`` pixels, borders replicated) — scipy's
    ``gaussian_filter1d(v, sigma, mode="nearest", truncate=truncate)``.  A dense product is far
    faster on CPUs than a long 1-D convolution (σ = 20 px needs 161 taps).
    """
    k = gaussian_kernel(sigma, truncate, torch.float64, "cpu")
    radius = (k.numel() - 1) // 2
    # Row i, column j holds k[j − i + radius] (the band) ...
    i = torch.arange(length).view(-1, 1)
    offset = torch.arange(length).view(1, -1) - i
    mat = torch.where(offset.abs() <= radius, k[(offset + radius).clamp(0, 2 * radius)],
                      torch.zeros((), dtype=torch.float64))
    # ... plus, in the first and last columns, the taps that fall off the border (replicated).
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), k.cumsum(0)])   # cum[n] = Σ k[:n]
    rows = i.view(-1)
    mat[:, 0] += cum[(radius - rows).clamp(0, 2 * radius + 1)]
    mat[:, -1] += 1 - cum[(radius + length - rows).clamp(0, 2 * radius + 1)]
    return mat.to(dtype=dtype, device=device)


def _blur_stack(x: torch.Tensor, sigmas: Sequence[Sequence[float]]) -> torch.Tensor:
    """Blur ``(N, C, *spatial)`` with each per-axis ``sigmas[l]``: ``(N, len(sigmas), C, ...)``,
    separably, one batched matrix product per axis for all the levels at once."""
    levels = len(sigmas)
    y = x.unsqueeze(0).expand((levels,) + tuple(x.shape))
    for a in range(x.dim() - 2):
        length = x.shape[2 + a]
        per_level = [float(s[a]) for s in sigmas]
        if all(s == 0 for s in per_level):
            continue
        eye = torch.eye(length, dtype=x.dtype, device=x.device)
        mats = torch.stack([gaussian_matrix(length, s, dtype=x.dtype, device=x.device)
                            if s > 0 else eye for s in per_level])
        moved = y.movedim(3 + a, -1)
        shape = moved.shape
        out = torch.matmul(moved.reshape(levels, -1, length), mats.transpose(1, 2))
        y = out.view(shape).movedim(-1, 3 + a)
    return y.movedim(0, 1).contiguous()


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to ``[0, 1]`` with the gradient of the identity (straight through).

    :func:`torch.clamp` has zero gradient at its bounds, so a mask that starts at exactly 1 (the
    paper's initialisation) would never move; here the bound only limits the value.
    """
    return x + (x.clamp(0, 1) - x).detach()


class Perturbation:
    """A perturbation pyramid: the mask value chooses how much each pixel is perturbed.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, *spatial)`` images (1 to 3 spatial dimensions).  Half-precision images are
        perturbed in single precision.
    num_levels : int
        Number of pyramid levels (≥ 2).  Level ``num_levels − 1`` is the image itself, level 0
        the most perturbed copy.
    max_blur : float or sequence of float
        ``"blur"``: the Gaussian σ (pixels) of level 0, one value or one per spatial axis (torch
        order; one value is scaled by ``T / max(H, W)`` along the time axis of 3-D inputs).
        Level ``l`` is blurred with ``σ_l = max_blur · (1 − l/(num_levels − 1))``, separably,
        the kernel truncated at 4σ and the borders replicated: the operator of
        ``scipy.ndimage.gaussian_filter(..., mode="nearest")`` and of
        :func:`~torchray_like.attribution.maps.smooth_saliency`.  (TorchRay pads with zeros,
        which darkens the border of the blurred copies: a frame of perturbation that is not in
        the image.)
    type : {"blur", "fade"}
        ``"fade"``: level ``l`` is ``baseline + (l/(num_levels − 1))·(x − baseline)``, so
        :meth:`apply` gives exactly ``m·x + (1 − m)·baseline``.
    fade_to : {"zero", "mean"}
        The fade baseline: zeros, or each image's per-channel mean.

    Attributes
    ----------
    pyramid : torch.Tensor
        ``(N, num_levels, C, *spatial)``.
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
        blur = per_axis(max_blur, "max_blur", spatial, integer=False, minimum=0.0,
                        strict=False, time_scaled=True)
        self.pyramid: torch.Tensor
        self.type = type
        self.num_levels = int(num_levels)
        self.max_blur = blur
        self._fade: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        x = input.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        top = self.num_levels - 1
        with torch.no_grad():
            if type == BLUR_PERTURBATION:
                blurred = _blur_stack(x, [[b * (1 - lv / top) for b in blur] for lv in range(top)])
                self.pyramid = torch.cat([blurred, x.unsqueeze(1)], dim=1)
            else:
                base = (torch.zeros_like(x) if fade_to == "zero"
                        else x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x))
                self.pyramid = torch.stack(
                    [base + (lv / top) * (x - base) for lv in range(self.num_levels)], dim=1)
                # The levels are linear in l: interpolating them is base + m·(x − base).
                self._fade = (base.contiguous(), (x - base).contiguous())

    def to(self, device: Union[str, torch.device]) -> "Perturbation":
        """Move the pyramid to ``device`` (in place); returns ``self``."""
        self.pyramid = self.pyramid.to(device)
        if self._fade is not None:
            self._fade = (self._fade[0].to(device), self._fade[1].to(device))
        return self

    def apply(self, mask: torch.Tensor) -> torch.Tensor:
        """Perturb the images with ``mask``.

        Parameters
        ----------
        mask : torch.Tensor
            ``(B, 1, *spatial)`` values in ``[0, 1]`` (1 keeps the pixel, 0 perturbs it
            fully; values outside are clamped, with the identity's gradient), with ``B`` a
            multiple ``N·K`` of the number of images: mask ``b`` perturbs image ``b // K``.

        Returns
        -------
        torch.Tensor
            ``(B, C, *spatial)`` in the pyramid's dtype, differentiable with respect to
            ``mask``: the two levels around ``m·(num_levels − 1)`` interpolated linearly.
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
        m = _clamp01(mask.to(pyr.dtype))
        if self._fade is not None:
            base, delta = self._fade
            out = torch.addcmul(base.unsqueeze(1), m.view((n, k, 1) + spatial),
                                delta.unsqueeze(1))
            return out.reshape((n * k, c) + spatial)
        t = m * (levels - 1)
        # (A NaN mask — from a model whose output is not finite — must not become an index.)
        lower = torch.nan_to_num(t.detach(), nan=0.0).floor_().clamp_(0, levels - 2)
        frac = (t - lower).view((n, k, 1, 1) + spatial)
        index = lower.long().view((n, k, 1, 1) + spatial).expand((n, k, 1, c) + spatial)
        # Gather from a broadcast view: the K masks of an image share its pyramid, no copy.
        view = pyr.unsqueeze(1).expand((n, k) + tuple(pyr.shape[1:]))
        low = view.gather(2, index)
        high = view.gather(2, index + 1)
        return torch.lerp(low, high, frac).reshape((n * k, c) + spatial)


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
    valid: Optional[torch.Tensor]  # bias as 1/0 weights (softmax pooling, not in half precision)
    scaled: Optional[torch.Tensor]  # weights / T (softmax pooling)
    index: torch.Tensor            # (canvas,) evaluation point at or before each canvas pixel
    frac: torch.Tensor             # (canvas,) interpolation weight of the next point

    @property
    def points(self) -> int:
        return self.sub * (self.count - 1) + 1

    def footprint(self) -> torch.Tensor:
        """``(count,)`` share of each parameter's cell (``step`` pixels around it) inside the
        image, at least a quarter."""
        pos = self.origin + self.step * torch.arange(self.count, dtype=torch.float64)
        low = torch.clamp(pos - self.step / 2, min=-0.5)
        high = torch.clamp(pos + self.step / 2, max=self.length - 0.5)
        return ((high - low).clamp(min=0) / self.step).clamp(min=0.25)

    def to(self, device: Union[str, torch.device]) -> None:
        for name in ("weights", "bias", "norm", "valid", "scaled", "index", "frac"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))


class _SoftmaxPool(torch.autograd.Function):
    """``Σ_i u_i e^{u_i} / Σ_i e^{u_i}`` over valid candidates ``u = window · weights``.

    ``win`` ``(..., count, w)``, ``scaled`` ``(sub, w)`` (weights / T), ``valid`` ``(count, sub,
    w)`` 0/1 → ``(..., count, sub)``.  Written as a function with its own backward,
    ``∂out/∂u_i = e^{u_i}/Σe · (1 + u_i − out)``: half the passes over the window tensor that
    autograd's graph of the same expression makes (this is most of an iteration's own work).
    """

    @staticmethod
    def forward(ctx, win, scaled, valid):
        u = win.unsqueeze(-2) * scaled                 # (..., count, sub, w)
        e = u.exp().mul_(valid)
        den = e.sum(dim=-1)
        out = (u * e).sum(dim=-1).div_(den)
        ctx.save_for_backward(u, e, den, out, scaled)
        return out

    @staticmethod
    def backward(ctx, grad):
        u, e, den, out, scaled = ctx.saved_tensors
        gu = (u - out.unsqueeze(-1)).add_(1).mul_(e).mul_((grad / den).unsqueeze(-1))
        return (gu * scaled).sum(dim=-2), None, None


def _tuple(value: Any, d: int, name: str) -> Tuple[Any, ...]:
    if isinstance(value, (list, tuple, torch.Size)):
        if len(value) != d:
            raise ValueError(f"{name} must be one value or {d} (one per spatial axis), got "
                             f"{value!r}")
        return tuple(value)
    return (value,) * d


class MaskGenerator:
    r"""Smooth masks from a coarse parameter grid (Fong et al. 2019, "smooth masks").

    The parameters ``m̄`` sit on a grid with stride ``step`` pixels.  The mask is

    .. math:: m(u) = \operatorname{pool}_{v} \; g_\sigma(u - v)\, \bar m(v)

    over the grid points ``v`` within 3σ of ``u`` along every axis, with ``g_σ`` a Gaussian of
    width ``sigma``.  The pooling, applied separably along each axis and normalised so that a
    grid of ones gives a mask of ones, is

    * ``"softmax"`` (default): the smooth max ``Σ z_i e^{z_i/T} / Σ e^{z_i/T}`` with temperature
      ``T = temperature``;
    * ``"max"``: the max (exact: the Gaussian factorises and the max of products of
      non-negative factors separates);
    * ``"sum"``: the Gaussian-weighted mean of the parameters (a blur of the grid).

    It is evaluated on a lattice ``subdivision`` times finer than the grid and interpolated
    linearly (bilinear / trilinear) in between: with ``subdivision = step`` that is every pixel;
    the default, ``ceil(6·step/σ)`` (at most ``step``), spaces the points at most ``σ/6`` apart:
    within 0.02 of the per-pixel formula for blob-like masks and 0.04 for random parameters
    (tested), ``(step/subdivision)^d`` times cheaper (12× for the paper's step 7 and σ 21).
    The mask is computed on a canvas ``jitter`` pixels larger than the image on each side, so
    that :meth:`crop` can shift it.

    Parameters
    ----------
    shape : int or tuple of int
        Spatial size of the masks (torch order).
    step : int or tuple of int
        Grid stride in pixels (≥ 1), one value or one per axis.
    sigma : float or tuple of float
        Gaussian width in pixels (> 0).  ``3σ ≥ step/2`` is required: otherwise pixels halfway
        between grid points are out of every parameter's reach (the mask would be zero there
        whatever the parameters) and a :class:`ValueError` says so.
    clamp : bool
        Clamp the mask to ``[0, 1]`` (the smooth max can overshoot 1 slightly).  The clamp
        limits the value and keeps the identity's gradient, so a mask starting at exactly 1
        can move.
    pooling_method : {"softmax", "max", "sum"}
        See above.  (TorchRay's ``"sigmoid"`` pooling is not provided.)
    jitter : int or tuple of int
        Largest shift in pixels per axis (≥ 0), see :meth:`crop`.
    temperature : float
        ``T`` of the ``"softmax"`` pooling (> 0; use ``"max"`` for ``T = 0``).
    subdivision : int or tuple of int, optional
        Evaluation points per grid step (1 to ``step``).
    device, dtype
        Where and in which floating type the masks are made.

    Attributes
    ----------
    shape : tuple of int
        The mask's spatial size.
    shape_in : tuple of int
        Spatial shape of the parameter grid (TorchRay's name; also ``param_shape``).
    shape_out : tuple of int
        Spatial shape of the canvas, ``shape + 2·jitter`` (the second mask of :meth:`generate`).
    grid_origin : tuple of int
        Pixel position of parameter 0 along each axis (parameter ``k`` is at
        ``grid_origin + k·step``; the grid reaches past the canvas on both sides).
    """

    def __init__(self, shape: Union[int, Sequence[int]], step: PerAxis, sigma: PerAxis,
                 clamp: bool = True, pooling_method: str = "softmax", *,
                 jitter: Union[int, Sequence[int]] = 0, temperature: float = 0.05,
                 subdivision: Optional[Union[int, Sequence[int]]] = None,
                 device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        d = len(shape)
        if not 1 <= d <= 3 or not all(isinstance(s, Integral) and not isinstance(s, bool)
                                      and s >= 1 for s in shape):
            raise ValueError(f"shape must be 1 to 3 positive ints (torch order), got {shape!r}")
        self.shape = tuple(int(s) for s in shape)
        steps = per_axis(step, "step", self.shape, integer=True, minimum=1, strict=False)
        sigmas = per_axis(sigma, "sigma", self.shape, integer=False, minimum=0.0, strict=True)
        jitters = per_axis(jitter, "jitter", self.shape, integer=True, minimum=0, strict=False)
        if pooling_method not in POOLING_METHODS:
            raise ValueError(
                f"pooling_method must be one of {POOLING_METHODS}, got {pooling_method!r}")
        if pooling_method == "softmax" and not (is_number(temperature) and temperature > 0
                                                and math.isfinite(temperature)):
            raise ValueError(
                f"temperature must be a finite number > 0 for the 'softmax' pooling (use "
                f"pooling_method='max' for the hard max), got {temperature!r}")
        for s, sg in zip(steps, sigmas):
            if _TRUNCATE * sg < s / 2:
                raise ValueError(
                    f"step {int(s)} is too large for sigma {sg:g}: pixels halfway between grid "
                    f"points are beyond the kernel's reach ({_TRUNCATE:g}σ = "
                    f"{_TRUNCATE * sg:g} px), so the mask would be zero there whatever the "
                    f"parameters; use step ≤ {int(2 * _TRUNCATE * sg)} or sigma ≥ "
                    f"{s / (2 * _TRUNCATE):g} (the paper uses sigma = 3 × step)")
        if subdivision is None:
            subdivision = [min(int(s), math.ceil(6 * s / sg)) for s, sg in zip(steps, sigmas)]
        subs = _tuple(subdivision, d, "subdivision")
        self.clamp = bool(clamp)
        self.pooling_method = pooling_method
        self.temperature = float(temperature) if pooling_method == "softmax" else 0.0
        self.dtype = dtype
        self.axes: List[_Axis] = []
        for length, s, sg, j, f in zip(self.shape, steps, sigmas, jitters, subs):
            self.axes.append(self._axis(length, int(s), float(sg), int(j), f, device, dtype))
        # exp(50) is far from overflow in single and double precision (not in half).
        safe = math.log(torch.finfo(dtype).max) > 70
        for a in self.axes:
            a.valid = (a.bias == 0).to(dtype) if safe else None
            a.scaled = a.weights / self.temperature if self.temperature > 0 else None
        self.param_shape = tuple(a.count for a in self.axes)
        self.shape_in = self.param_shape
        self.shape_out = tuple(a.length + 2 * a.jitter for a in self.axes)
        self.grid_origin = tuple(a.origin for a in self.axes)
        for a in self.axes:
            ones = torch.ones(1, a.count, device=device, dtype=dtype)
            a.norm = self._pool_axis(ones, a).squeeze(0)

    @staticmethod
    def _axis(length: int, s: int, sg: float, j: int, f: Any, device: Any,
              dtype: torch.dtype) -> _Axis:
        if isinstance(f, bool) or not isinstance(f, Integral) or not 1 <= int(f) <= s:
            raise ValueError(f"subdivision must be between 1 and step={s}, got {f!r}")
        f = int(f)
        first = -((j + s - 1) // s)                       # last grid point ≤ −jitter
        last = (length - 1 + j + s - 1) // s              # first grid point ≥ length−1+jitter
        count = last - first + 1
        radius = max(1, math.ceil(_TRUNCATE * sg / s))
        phase = torch.arange(f, dtype=torch.float64).view(-1, 1) * s / f
        dist = phase - s * torch.arange(-radius, radius + 2, dtype=torch.float64).view(1, -1)
        near = dist.abs() <= _TRUNCATE * sg
        w = torch.where(near, torch.exp(-0.5 * (dist / sg) ** 2), torch.zeros_like(dist))
        # The pooling runs over the grid points within 3σ: window q, slot i holds parameter
        # q + i − radius, which may fall outside the grid.  Windows past the last evaluation
        # point (computed, then dropped) may have no candidate: they get their own slot so that
        # nothing there is 0/0 (a NaN there would poison the gradient).
        k = torch.arange(count).view(-1, 1, 1) + torch.arange(-radius, radius + 2).view(1, 1, -1)
        valid = near.view(1, f, -1) & (k >= 0) & (k < count)
        valid[..., radius] |= ~valid.any(-1)
        bias = torch.zeros(valid.shape, dtype=torch.float64).masked_fill(~valid, -math.inf)
        # Canvas pixel c is image pixel c − j, at (c − j − first·s)·f/s evaluation points.
        coord = (torch.arange(length + 2 * j, dtype=torch.float64) - j - first * s) * f / s
        points = f * (count - 1) + 1
        index = coord.round().long() if f == s else coord.floor().clamp(max=points - 2).long()
        frac = coord - index
        return _Axis(length, s, sg, j, count, first * s, f,
                     w.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype), None,
                     None, None, index.to(device), frac.to(device=device, dtype=dtype))

    # -- evaluation --------------------------------------------------------------------------

    def points(self, axis: int) -> torch.Tensor:
        """Pixel positions (float64) of the evaluation points along ``axis``."""
        a = self.axes[axis]
        return a.origin + torch.arange(a.points, dtype=torch.float64) * a.step / a.sub

    def _pool_axis(self, x: torch.Tensor, a: _Axis) -> torch.Tensor:
        """Pool along the last dimension: ``(..., count)`` → ``(..., points)``."""
        radius = (a.weights.shape[1] - 2) // 2
        unit = 1.0
        if self.pooling_method == "softmax" and a.valid is not None:
            # Work in units of T: u = g·m̄/T.  Parameters are capped at 50·T (far above the
            # [0, 1] the optimiser keeps them in), so exp(u) ≤ e^50 cannot overflow and no
            # shift by the row maximum is needed; the 0/1 weights drop the candidates outside
            # the grid or beyond 3σ.  (torch.softmax is slow on CPUs for rows this short.)
            x = x.clamp(max=50.0 * self.temperature)
            win = F.pad(x, (radius, radius + 1)).unfold(-1, 2 * radius + 2, 1)
            out = _SoftmaxPool.apply(win, a.scaled, a.valid)          # (..., count, sub)
            unit = self.temperature
        else:
            win = F.pad(x, (radius, radius + 1)).unfold(-1, 2 * radius + 2, 1)
            v = win.unsqueeze(-2) * a.weights                         # (..., count, sub, w)
            if self.pooling_method == "max":
                out = v.amax(dim=-1)
            elif self.pooling_method == "sum":
                out = v.sum(dim=-1)
            else:
                # Half precision: shift by the (detached) row maximum, which changes neither
                # the value nor the gradient; non-candidates get the bias −inf.
                z = v / self.temperature + a.bias
                e = (z - z.detach().amax(dim=-1, keepdim=True)).exp()
                out = (v * e).sum(dim=-1) / e.sum(dim=-1)
        out = out.flatten(-2)[..., :a.points]
        return out * unit if a.norm is None else out * (unit / a.norm)

    @staticmethod
    def _interp_axis(x: torch.Tensor, a: _Axis) -> torch.Tensor:
        """Linear interpolation from the evaluation points to the canvas (last dimension)."""
        lo = x.index_select(-1, a.index)
        if a.sub == a.step:         # the points are the pixels
            return lo
        hi = x.index_select(-1, a.index + 1)
        return torch.lerp(lo, hi, a.frac)

    def _check_params(self, params: Any) -> None:
        if not isinstance(params, torch.Tensor) or params.dim() != len(self.shape) + 2 or \
                params.shape[1] != 1 or tuple(params.shape[2:]) != self.param_shape:
            raise ValueError(
                f"mask parameters must have shape (K, 1, {', '.join(map(str, self.shape_in))}) "
                f"(shape_in), got {tuple(getattr(params, 'shape', ()))}")

    def grid(self, params: torch.Tensor) -> torch.Tensor:
        """The mask at the evaluation points: ``(B, 1, *param_shape)`` →
        ``(B, 1, *points)`` (see :meth:`points`)."""
        self._check_params(params)
        out = params.to(self.dtype)
        for i, a in enumerate(self.axes):
            dim = 2 + i
            out = self._pool_axis(out.movedim(dim, -1), a).movedim(-1, dim)
        return _clamp01(out) if self.clamp else out

    def canvas(self, params: torch.Tensor) -> torch.Tensor:
        """Masks on the jitter canvas: ``(B, 1, *param_shape)`` → ``(B, 1, *shape_out)``."""
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

    def generate(self, mask_in: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """TorchRay's interface: ``(mask, mask_full)`` for parameters ``(K, 1, *shape_in)``.

        ``mask`` is ``(K, 1, *shape)``, the image window; ``mask_full`` is the canvas
        ``(K, 1, *shape_out)``, the same mask with a margin of ``jitter`` pixels on each side
        (the window is its centre).  Both are differentiable with respect to ``mask_in``.
        """
        canvas = self.canvas(mask_in)
        return self.crop(canvas), canvas

    def footprint(self) -> torch.Tensor:
        """``param_shape`` tensor: the share of each parameter's cell inside the image (at
        least 1/4 per axis) — how much of the mask a parameter moves, relative to one in the
        middle of the image.  :class:`MaskOptimizer` divides the gradient by it."""
        out = torch.ones((), dtype=torch.float64)
        for i, a in enumerate(self.axes):
            shape = [1] * len(self.axes)
            shape[i] = a.count
            out = out * a.footprint().view(shape)
        return out.to(device=self.axes[0].weights.device, dtype=self.dtype)

    def to(self, device: Union[str, torch.device]) -> "MaskGenerator":
        """Move the generator to ``device`` (in place); returns ``self``."""
        for a in self.axes:
            a.to(device)
        return self


# ---------------------------------------------------------------------------------------------
# The area constraint
# ---------------------------------------------------------------------------------------------


def _reference(flat: torch.Tensor, ones: Sequence[int]) -> torch.Tensor:
    """The sorted reference ``r̂`` matched to each value of ``flat`` ``(B, P)``: 1 for the
    ``ones[b]`` largest values of row ``b``, 0 below; values tied at the threshold share the
    remaining ones equally (the average over the sort orders of the ties)."""
    b, p = flat.shape
    groups: dict = {}
    for row, n1 in enumerate(ones):      # host-side: no device synchronisation
        groups.setdefault(n1, []).append(row)
    if len(groups) == 1:                 # one area for every row: no gathering
        return _reference_rows(flat, next(iter(groups)))
    ref = torch.zeros_like(flat)
    for n1, rows in groups.items():
        index = torch.tensor(rows, device=flat.device)
        ref.index_copy_(0, index, _reference_rows(flat.index_select(0, index), n1))
    return ref


def _reference_rows(flat: torch.Tensor, n1: int) -> torch.Tensor:
    """:func:`_reference` for rows that share the number of ones ``n1``."""
    b, p = flat.shape
    if n1 <= 0 or n1 >= p:
        return torch.full((b, p), 0.0 if n1 <= 0 else 1.0, dtype=flat.dtype, device=flat.device)
    tau = flat.kthvalue(p - n1 + 1, dim=1, keepdim=True).values
    above = (flat > tau).to(flat.dtype)
    tied = (flat == tau).to(flat.dtype)
    share = (n1 - above.sum(1, keepdim=True)) / tied.sum(1, keepdim=True)
    return torch.addcmul(above, tied, share)


def _ranking_loss(flat: torch.Tensor, ref: torch.Tensor, ones: Sequence[int]) -> torch.Tensor:
    """``mean((vecsort(m) − r)²)`` per row, as ``(Σ m² − 2·Σ m·r̂ + ones) / P``."""
    count = torch.tensor(ones, dtype=flat.dtype, device=flat.device)
    return (flat.pow(2).sum(1) - 2 * (flat * ref).sum(1) + count) / flat.shape[1]


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
    def forward(ctx, flat, ones):
        ref = _reference(flat, ones)
        ctx.save_for_backward(flat, ref)
        return _ranking_loss(flat, ref, ones)

    @staticmethod
    def backward(ctx, grad):
        flat, ref = ctx.saved_tensors
        return grad.view(-1, 1) * 2 * (flat - ref) / flat.shape[1], None


def area_ones(area: Union[float, Sequence[float]], rows: int, pixels: int) -> Tuple[int, ...]:
    """The number of ones of each row's reference: ``round(a·|Ω|)``."""
    areas = ([float(area)] * rows if isinstance(area, (int, float))
             else [float(a) for a in area])
    if len(areas) != rows:
        raise ValueError(f"area must be one fraction or {rows} (one per mask), got {len(areas)}")
    return tuple(int(round(a * pixels)) for a in areas)


def ranking_loss_and_gradient(mask: torch.Tensor, ones: Sequence[int]
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`ranking_area_loss` and its gradient with respect to ``mask`` (shaped like it),
    without autograd; ``ones`` from :func:`area_ones`."""
    flat = mask.detach().flatten(1)
    ref = _reference(flat, ones)
    return _ranking_loss(flat, ref, ones), ((flat - ref) * (2 / flat.shape[1])).view_as(mask)


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
    return _RankingLoss.apply(flat, area_ones(area, flat.shape[0], flat.shape[1]))


# ---------------------------------------------------------------------------------------------
# The optimiser
# ---------------------------------------------------------------------------------------------


class RewardScale:
    """The unit in which a reward is measured, per mask.

    ``"auto"``: the reward is divided by ``u_t = max_{s ≤ t} |Ω|·ḡ_s / (2·ratio·λ_0)``, where
    ``ḡ_s`` is the mean of the ``round(a·|Ω|)`` largest ``|∂R/∂m(u)|`` at iteration ``s`` (the
    reward's pull on the pixels the mask should keep).  The area constraint pulls a pixel with
    ``2·λ·(m − r)/|Ω|``; so at the start the reward pulls the best pixels with ``ratio`` times the
    force with which the area constraint pulls a pixel at the wrong end — whatever the scale of
    the scores (logits ×1 or ×200, probabilities).  The running maximum never amplifies a reward
    whose gradient fades (a saturated softmax) and follows one that grows.  A number: the
    reward is divided by it at every iteration (1: the paper's raw reward).
    """

    def __init__(self, scale: Union[str, float], areas: Sequence[float], pixels: int,
                 first_weight: float, ratio: float, device: Any, dtype: torch.dtype) -> None:
        self.fixed = None if scale == "auto" else float(scale)
        self.ones = [max(1, int(round(a * pixels))) for a in areas]
        self.ranks = torch.tensor(self.ones, device=device).view(-1, 1)
        self.factor = pixels / (2.0 * ratio * first_weight)
        self.value = torch.zeros(len(areas), device=device, dtype=dtype)

    def update(self, grad: torch.Tensor) -> torch.Tensor:
        """Take the reward's gradient ``(B, ...)`` at the masks; return the unit ``(B,)``."""
        if self.fixed is not None:
            return self.value.fill_(self.fixed)
        flat = grad.detach().flatten(1).abs()
        k = max(self.ones)
        top = flat.topk(min(k, flat.shape[1]), dim=1).values
        if len(set(self.ones)) == 1:
            mean = top.mean(1)
        else:
            ranks = torch.arange(1, top.shape[1] + 1, device=top.device).view(1, -1)
            keep = ranks <= self.ranks
            mean = (top * keep).sum(1) / keep.sum(1)
        torch.maximum(self.value, mean.to(self.value.dtype) * self.factor, out=self.value)
        # A reward that has never had a gradient keeps a finite unit (its gradient is zero).
        return self.value.clamp_min(torch.finfo(self.value.dtype).tiny)


class MaskOptimizer:
    """SGD with momentum on the mask parameters ``m̄ ∈ [0, 1]``, preconditioned by footprint.

    The update is torch's SGD — ``b ← μ·b + (1 − d)·g`` (``b = g`` at the first step),
    ``m̄ ← clamp(m̄ − lr·b, 0, 1)`` — applied to the gradient divided by
    :meth:`MaskGenerator.footprint`: a parameter whose cell is partly outside the image moves as
    fast as one in the middle for the same per-pixel pull.  Without it, parameters at the
    borders and corners (whose few pixels give a small gradient) fall slower under the area
    constraint and win the ranking: masks drift to the corners whenever the reward is weak.
    """

    def __init__(self, generator: MaskGenerator, batch: int, init: float, learning_rate: float,
                 momentum: float, dampening: float, precondition: bool = True) -> None:
        dtype = generator.dtype
        device = generator.axes[0].weights.device
        self.generator = generator
        self.params = torch.full((batch, 1) + generator.param_shape, float(init), dtype=dtype,
                                 device=device)
        self.scale = 1 / generator.footprint() if precondition else None
        self.lr, self.momentum, self.dampening = learning_rate, momentum, dampening
        self.buffer: Optional[torch.Tensor] = None

    def masks(self, shift: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The masks of the current parameters and their shifted copies (the same tensor when
        ``shift`` is ``None``), in the graph that :meth:`step` differentiates."""
        canvas = self.generator.canvas(self.params.requires_grad_(True))
        mask = self.generator.crop(canvas)
        return mask, (mask if shift is None else self.generator.crop(canvas, shift))

    def step(self, outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Backpropagate ``grads`` (the energy's gradient at ``outputs``, tensors returned by
        :meth:`masks`) to the parameters and update them."""
        (g,) = torch.autograd.grad(list(outputs), self.params, list(grads))
        self.params = self.params.detach()
        if self.scale is not None:
            g = g * self.scale
        if self.buffer is None:
            self.buffer = g
        else:
            self.buffer = self.buffer.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
        self.params.sub_(self.buffer, alpha=self.lr).clamp_(0, 1)
