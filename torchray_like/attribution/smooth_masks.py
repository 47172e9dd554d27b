r"""Smooth masks (Fong, Patrick, Vedaldi, ICCV 2019, arXiv 1910.08485): the mask
``m(u) = pool_v g_σ(u − v) m̄(v)`` of a coarse parameter grid ``m̄`` (pool: smooth max, max or
normalised sum), evaluated on a lattice and interpolated, on a canvas large enough to be
shifted (jitter).  :mod:`.extremal_perturbation` drives it and re-exports
:class:`MaskGenerator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .arguments import is_number, per_axis
from .precision import CPU_FLOAT64
from .smooth_max import SmoothMaxAxis, smooth_max_grid, smooth_max_grid_vjp

__all__ = ["POOLING_METHODS", "MaskGenerator", "shared_generator", "clamp01", "PerAxis"]

#: How :class:`MaskGenerator` pools the Gaussian-weighted parameters.
POOLING_METHODS = ("softmax", "max", "sum")

# The mask kernel is cut at 3σ (weight 0.011), the blur of the perturbation pyramid at 4σ
# (scipy's default).  They are different kernels on purpose: the mask's is an unnormalised
# weight inside a (smooth) max, where a weight of 0.011 can no longer win, and its width sets
# the cost of every iteration (the pooling window); the blur's is a normalised convolution
# computed once per call, where the tails' mass matters for matching scipy.
_TRUNCATE = 3.0

Number = Union[int, float]
PerAxis = Union[Number, Sequence[Number]]


def clamp01(x: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to ``[0, 1]`` with the gradient of the identity (straight through).

    :func:`torch.clamp` has zero gradient at its bounds, so a mask that starts at exactly 1 (the
    paper's initialisation) would never move; here the bound only limits the value.
    """
    return x + (x.clamp(0, 1) - x).detach()


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
    scale: Optional[torch.Tensor] = None   # unit / norm, the pooling's normalisation
    fast: Optional[SmoothMaxAxis] = None   # the softmax pooling's constants (not in half)

    @property
    def points(self) -> int:
        return self.sub * (self.count - 1) + 1

    def footprint(self) -> torch.Tensor:
        """``(count,)`` share of each parameter's cell (``step`` pixels around it) inside the
        image, at least a quarter."""
        pos = self.origin + self.step * torch.arange(self.count, **CPU_FLOAT64)
        low = torch.clamp(pos - self.step / 2, min=-0.5)
        high = torch.clamp(pos + self.step / 2, max=self.length - 0.5)
        return ((high - low).clamp(min=0) / self.step).clamp(min=0.25)

    def to(self, device: Union[str, torch.device]) -> None:
        self.scale = None
        for name in ("weights", "bias", "norm", "valid", "scaled", "index", "frac"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.fast is not None:
            self.fast.to(device)


def _crop(grid: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor) -> torch.Tensor:
    return (ry @ grid) @ rx.t()


def _crop_backward(ry: torch.Tensor, rx: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    shapes = grad.shape[:-1] + (rx.shape[1],)                      # the rows (B, 1, H, Px)
    g_rows = (grad.reshape(-1, grad.shape[-1]) @ rx).view(shapes)
    b = g_rows.shape[0]
    g = ry.t().expand((b, 1) + ry.t().shape).reshape(-1, *ry.t().shape).bmm(
        g_rows.reshape(-1, *g_rows.shape[2:]))
    return g.view(b, 1, *g.shape[1:])


class _Crop2d(torch.autograd.Function):
    """``ry @ grid @ rxᵀ`` for ``grid`` ``(B, 1, Py, Px)``, one node; the backward runs the
    products autograd's graph would, in its order (the same numbers)."""

    @staticmethod
    def forward(ctx, grid, ry, rx):
        ctx.save_for_backward(ry, rx)
        return _crop(grid, ry, rx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ry, rx = ctx.saved_tensors
        return _crop_backward(ry, rx, grad), None, None


def _shifted_crops(grid: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = ry.bmm(grid.repeat(2, 1, 1, 1).squeeze(1))        # (2B, H, Px)
    both = rows.bmm(rx.transpose(1, 2)).unsqueeze(1)
    b = grid.shape[0]
    return both[:b], both[b:]


def _shifted_crops_backward(ry: torch.Tensor, rx: torch.Tensor, g_both: torch.Tensor
                            ) -> torch.Tensor:
    """The gradient at the grid for ``g_both`` ``(2B, 1, H, W)``, the gradients at the masks
    and at the shifted masks, one after the other."""
    b = ry.shape[0] // 2
    g_rows = g_both.squeeze(1).bmm(rx)
    g = ry.transpose(1, 2).bmm(g_rows)                       # (2B, Py, Px)
    return g.view(2, b, 1, *g.shape[1:]).sum(0)


class _ShiftedCrops2d(torch.autograd.Function):
    """``ry[i] @ grid[i mod B] @ rx[i]ᵀ`` for ``2B`` windows: the masks unshifted and shifted
    (two ``(B, 1, H, W)`` outputs), one node with the products autograd's graph would run."""

    @staticmethod
    def forward(ctx, grid, ry, rx):
        ctx.save_for_backward(ry, rx)
        return _shifted_crops(grid, ry, rx)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mask, g_moved):
        ry, rx = ctx.saved_tensors
        if g_mask is None:
            g_mask = torch.zeros_like(g_moved)
        if g_moved is None:
            g_moved = torch.zeros_like(g_mask)
        return _shifted_crops_backward(ry, rx, torch.cat([g_mask, g_moved])), None, None


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
        ``T`` of the ``"softmax"`` pooling (> 0; use ``"max"`` for ``T = 0``).  From 0.03
        up (the default 0.05) in single and double precision, a fused pooling that caps its
        inputs at ``50·T``; below, and in half precision, the formula shifted by its maximum
        (exact at any temperature, slower).
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
        self._windows: dict = {}
        self.axes: List[_Axis] = []
        for length, s, sg, j, f in zip(self.shape, steps, sigmas, jitters, subs):
            self.axes.append(self._axis(length, int(s), float(sg), int(j), f, device, dtype))
        # The fused pooling caps its inputs at 50·T, so that exp(u) ≤ e^50 needs no shift by
        # the maximum: far from overflow in single and double precision (not in half), and
        # harmless while the cap is above every value it pools (1.5: parameters in [0, 1], and
        # the first axis overshoots 1 by a few percent).  At lower temperatures the cap would
        # bind — a grid of ones pooling to 50·T, or to NaN once exp(1/T) overflows — and the
        # shifted formula below (no cap) is used instead.
        safe = math.log(torch.finfo(dtype).max) > 70 and 50 * self.temperature >= 1.5
        for a in self.axes:
            a.valid = (a.bias == 0).to(dtype) if safe else None
            a.scaled = a.weights / self.temperature if self.temperature > 0 else None
        self.param_shape = tuple(a.count for a in self.axes)
        self.shape_in = self.param_shape
        self.shape_out = tuple(a.length + 2 * a.jitter for a in self.axes)
        self.grid_origin = tuple(a.origin for a in self.axes)
        for a in self.axes:
            ones = torch.ones(1, a.count, device=device, dtype=dtype)
            if self.pooling_method == "softmax" and a.valid is not None and a.scaled is not None:
                a.fast = SmoothMaxAxis(a.scaled, a.valid, None, a.points)
                a.norm = a.fast.forward(ones, math.inf)[0].squeeze(0) * self.temperature
                a.fast.scale = self.temperature / a.norm
            else:
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
        # Slots farther than the grid's length from the centre hold no parameter for any
        # window: a kernel wider than the grid (a huge sigma) needs no more of them.
        radius = max(1, min(count, math.ceil(_TRUNCATE * sg / s)))
        phase = torch.arange(f, **CPU_FLOAT64).view(-1, 1) * s / f
        dist = phase - s * torch.arange(-radius, radius + 2, **CPU_FLOAT64).view(1, -1)
        near = dist.abs() <= _TRUNCATE * sg
        w = torch.where(near, torch.exp(-0.5 * (dist / sg) ** 2), torch.zeros_like(dist))
        # The pooling runs over the grid points within 3σ: window q, slot i holds parameter
        # q + i − radius, which may fall outside the grid.  Windows past the last evaluation
        # point (computed, then dropped) may have no candidate: they get their own slot so that
        # nothing there is 0/0 (a NaN there would poison the gradient).
        k = (torch.arange(count, device="cpu").view(-1, 1, 1)
             + torch.arange(-radius, radius + 2, device="cpu").view(1, 1, -1))
        valid = near.view(1, f, -1) & (k >= 0) & (k < count)
        valid[..., radius] |= ~valid.any(-1)
        bias = torch.zeros(valid.shape, **CPU_FLOAT64).masked_fill(~valid, -math.inf)
        # Canvas pixel c is image pixel c − j, at (c − j − first·s)·f/s evaluation points.
        coord = (torch.arange(length + 2 * j, **CPU_FLOAT64) - j - first * s) * f / s
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
        return a.origin + torch.arange(a.points, **CPU_FLOAT64) * a.step / a.sub

    def _pool_axis(self, x: torch.Tensor, a: _Axis) -> torch.Tensor:
        """Pool along the last dimension: ``(..., count)`` → ``(..., points)``."""
        radius = (a.weights.shape[1] - 2) // 2
        unit = 1.0
        # (The "softmax" pooling in single and double precision is smooth_max_grid's.)
        win = F.pad(x, (radius, radius + 1)).unfold(-1, 2 * radius + 2, 1)
        v = win.unsqueeze(-2) * a.weights                             # (..., count, sub, w)
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
        if a.norm is None:
            return out * unit
        if a.scale is None or a.scale.dtype != out.dtype:
            a.scale = unit / a.norm          # made once (an operation per call saved)
        return out * a.scale

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
        if all(a.fast is not None for a in self.axes):
            return smooth_max_grid(out, [a.fast for a in self.axes if a.fast is not None],
                                   self.temperature, self.clamp)
        for i, a in enumerate(self.axes):
            dim = 2 + i
            out = self._pool_axis(out.movedim(dim, -1), a).movedim(-1, dim)
        return clamp01(out) if self.clamp else out

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

    def windows(self, axis: int) -> torch.Tensor:
        """``(2·jitter + 1, length, points)``: for each crop start ``s`` along ``axis``, the
        linear interpolation from the evaluation points to the pixels ``s … s + length − 1`` of
        the canvas as a matrix (rows of :meth:`canvas`'s interpolation, cropped).  Built once
        and cached."""
        a = self.axes[axis]
        cached = self._windows.get(axis)
        if cached is not None:
            return cached
        canvas = a.length + 2 * a.jitter
        rows = torch.arange(canvas, device=a.index.device)
        full = torch.zeros(canvas, a.points, dtype=self.dtype, device=a.index.device)
        if a.sub == a.step:
            full[rows, a.index] = 1.0
        else:
            full[rows, a.index] = 1.0 - a.frac
            full[rows, a.index + 1] += a.frac
        out = full.unfold(0, a.length, 1).permute(0, 2, 1).contiguous()
        self._windows[axis] = out
        return out

    def pair(self, params: torch.Tensor, shift: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mask, moved)``: :meth:`__call__` without and with ``shift``, made together.

        For 2-D masks the interpolation and the crop are one matrix product per axis,
        ``R_y · grid · R_xᵀ`` with the rows :meth:`windows` keeps for each shift (the same
        numbers as :meth:`canvas` then :meth:`crop` up to float rounding, in a handful of
        operations instead of dozens, forward and backward: extremal perturbation's mask
        generation is mostly per-operation overhead).  Other ranks use the two methods.
        ``moved`` is ``mask`` itself when ``shift`` is ``None`` or there is no jitter.
        """
        jitters = [a.jitter for a in self.axes]
        if len(self.axes) != 2:
            canvas = self.canvas(params)
            mask = self.crop(canvas)
            return mask, (mask if shift is None or not any(jitters) else
                          self.crop(canvas, shift))
        grid = self.grid(params)                                   # (B, 1, Py, Px)
        ry, rx = self.windows(0), self.windows(1)
        if shift is None or not any(jitters):
            mask = _Crop2d.apply(grid, ry[jitters[0]], rx[jitters[1]])
            return mask, mask
        b = grid.shape[0]
        centre = torch.tensor([jitters], device=shift.device)
        start = torch.cat([centre.expand(b, 2), centre - shift])
        mask, moved = _ShiftedCrops2d.apply(grid, ry[start[:, 0]], rx[start[:, 1]])
        return mask, moved

    def starts(self, shifts: torch.Tensor) -> torch.Tensor:
        """``(T, 2B, 2)`` window starts for the shifts ``(T, B, 2)`` of ``T`` iterations: the
        centre for the ``B`` masks, then ``jitter − shift`` for their shifted copies (what
        :meth:`pair` computes per call, made once for an optimisation)."""
        t, b = shifts.shape[:2]
        centre = torch.tensor([a.jitter for a in self.axes], device=shifts.device)
        return torch.cat([centre.expand(t, b, 2), centre - shifts], dim=1)

    def pair_with_backward(self, params: torch.Tensor, start: Optional[torch.Tensor] = None
                           ) -> Optional[Tuple[torch.Tensor, torch.Tensor,
                                               Callable[[torch.Tensor], torch.Tensor]]]:
        """``(mask, moved, backward)``: :meth:`pair` without autograd, for 2-D masks with the
        ``"softmax"`` pooling in single or double precision (``None`` otherwise).  ``start``
        is one iteration of :meth:`starts` (``None``: no shift); ``backward`` takes the
        gradients at ``mask`` and at ``moved`` stacked ``(2B, 1, H, W)`` (only ``mask``'s,
        ``(B, 1, H, W)``, when ``moved`` is ``mask``) to the gradient at ``params``.  The same
        operations as :meth:`pair` and its autograd nodes' backwards, hence the same numbers,
        without building and walking a graph for every iteration.  The gradient has the
        dtype of ``params`` (as autograd's would).
        """
        if len(self.axes) != 2 or any(a.fast is None for a in self.axes):
            return None
        self._check_params(params)
        grid, pooled_backward = smooth_max_grid_vjp(
            params.to(self.dtype), [a.fast for a in self.axes if a.fast is not None],
            self.temperature, self.clamp)
        dtype = params.dtype

        def grid_backward(grad: torch.Tensor) -> torch.Tensor:
            g = pooled_backward(grad)
            return g if g.dtype == dtype else g.to(dtype)
        ry, rx = self.windows(0), self.windows(1)
        if start is None or not any(a.jitter for a in self.axes):
            cy, cx = ry[self.axes[0].jitter], rx[self.axes[1].jitter]
            with torch.no_grad():
                mask = _crop(grid, cy, cx)

            def backward(grad: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return grid_backward(_crop_backward(cy, cx, grad))
            return mask, mask, backward
        sy, sx = ry[start[:, 0]], rx[start[:, 1]]
        with torch.no_grad():
            mask, moved = _shifted_crops(grid, sy, sx)

        def backward_shifted(g_both: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return grid_backward(_shifted_crops_backward(sy, sx, g_both))
        return mask, moved, backward_shifted

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
        cached = self._windows.get("footprint")
        if cached is not None:
            return cached
        out = torch.ones((), **CPU_FLOAT64)
        for i, a in enumerate(self.axes):
            shape = [1] * len(self.axes)
            shape[i] = a.count
            out = out * a.footprint().view(shape)
        out = out.to(device=self.axes[0].weights.device, dtype=self.dtype)
        self._windows["footprint"] = out
        return out

    def to(self, dev: Union[str, torch.device]) -> "MaskGenerator":
        """Move the generator to device ``dev`` (TorchRay's name), in place; returns ``self``."""
        for a in self.axes:
            a.to(dev)
        self._windows = {}
        return self


_SHARED: Dict[Tuple[Any, ...], MaskGenerator] = {}


def shared_generator(shape: Tuple[int, ...], step: Sequence[float], sigma: Sequence[float],
                     pooling_method: str, jitter: Sequence[int], temperature: float,
                     device: torch.device, dtype: torch.dtype) -> MaskGenerator:
    """A :class:`MaskGenerator` made once per set of arguments and kept (its constants — the
    kernels, the normalisation, the interpolation windows, the footprint — cost more than a
    short optimisation's iterations).  It holds no per-call state; the caller must neither
    move it (:meth:`MaskGenerator.to`) nor change it."""
    key = (tuple(shape), tuple(float(s) for s in step), tuple(float(s) for s in sigma),
           pooling_method, tuple(int(j) for j in jitter), float(temperature), device, dtype)
    gen = _SHARED.get(key)
    if gen is None:
        if len(_SHARED) >= 16:
            _SHARED.clear()
        gen = _SHARED[key] = MaskGenerator(shape, step, sigma, pooling_method=pooling_method,
                                           jitter=jitter, temperature=temperature,
                                           device=device, dtype=dtype)
    return gen
