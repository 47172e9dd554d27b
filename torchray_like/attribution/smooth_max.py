r"""The smooth-max pooling of extremal perturbation's smooth masks (Fong, Patrick, Vedaldi, ICCV
2019, arXiv 1910.08485), every axis of the parameter grid in one autograd node with a
hand-written backward.

Along one axis, the pooled value at evaluation point ``(q, s)`` (window ``q``, phase ``s``) is

.. math:: y_{qs} = \frac{\sum_i u_{qsi}\, e^{u_{qsi}}}{\sum_i e^{u_{qsi}}}, \qquad
          u_{qsi} = \bar m_{q+i-r}\, g_{si} / T,

over the valid candidates ``i`` (inside the grid, within 3σ), times ``T / norm`` so that a grid of
ones pools to ones; its derivative is ``∂y/∂u_i = e^{u_i}/Σe · (1 + u_i − y)``.

**Layout** (issue 22, round 5).  The window slot ``i`` and the phase ``s`` are the outer
dimensions and the pooled rows the inner one: every product, exponential and sum runs over
long contiguous runs of memory (vectorised), where windows of 14 or 20 slots as the inner
dimension ran in ATen's scalar loop.  The sums over the slots are outer reductions.  The
exponential is ``2^v`` with ``v = u·log₂e`` (the weights carry the factor; ``exp2`` is about
three times cheaper than ``exp`` on CPUs, and as accurate), and non-candidates get the bias
``−10³⁰`` (``2^v = 0`` exactly, without the slow path of underflowing results).  The result
equals the formula to float rounding (tested against a float64 dense formulation, values and
gradients), not bit for bit the layout of earlier rounds.  The clamp to ``[0, 1]`` sets values
within ``4·d`` units of rounding below 1 to 1 (``d`` axes), so that saturated parameters give
exactly tied masks whatever the summation order (see :func:`_clamp`).

:class:`~.smooth_masks.MaskGenerator` uses it for its ``"softmax"`` pooling in single and
double precision at temperatures from 0.03 up (where the cap at ``50·T`` is above every value a
mask pools).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["SmoothMaxAxis", "smooth_max_grid", "smooth_max_grid_vjp"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
# A non-candidate's exponent (in log₂ units): 2^v is exactly 0, and v·0 is 0 (not NaN).
_EXCLUDED = -1e30


class SmoothMaxAxis:
    """The constants of one axis's pooling, made once per mask generator.

    Parameters
    ----------
    scaled : torch.Tensor
        ``(sub, w)`` Gaussian weights divided by the temperature, per phase and window slot.
    valid : torch.Tensor
        ``(count, sub, w)`` 1 for a candidate, 0 for a slot outside the grid or beyond 3σ.
    scale : torch.Tensor
        ``(points,)`` the normalisation ``T / norm`` (``None`` while the norm is being made).
    points : int
        Evaluation points kept (the first ``points`` of ``count·sub``).
    """

    def __init__(self, scaled: torch.Tensor, valid: torch.Tensor, scale: Any,
                 points: int) -> None:
        # Slots that are no candidate anywhere (beyond 3σ for every phase) are left out.
        used = (valid.flatten(0, 1) > 0).any(0).nonzero().flatten().tolist()
        lo, hi = used[0], used[-1] + 1
        self.radius = (scaled.shape[1] - 2) // 2 - lo       # the slot of window q's parameter q
        scaled, valid = scaled[:, lo:hi], valid[..., lo:hi]
        self.sub, self.w = scaled.shape
        self.count = valid.shape[0]
        self.points = points
        dtype = scaled.dtype
        # (w, sub, 1, 1) weights in log₂ units, and (w, sub, count, 1) the exclusion bias.
        self.weights = (scaled.double() * _LOG2E).t().to(dtype).contiguous().view(
            self.w, self.sub, 1, 1)
        self.bias = torch.where(valid.permute(2, 1, 0) > 0, 0.0, _EXCLUDED).to(
            dtype).unsqueeze(-1).contiguous()
        self._log2e = torch.tensor(_LOG2E, dtype=dtype)      # (a 0-dim operand: no wrapping)
        # The weights spread over the rows, per row count (an operand that is constant along
        # the inner dimension would take the scalar loop a second time).
        self._spread: Dict[int, torch.Tensor] = {}
        self.scale = scale

    @property
    def scale(self) -> Any:
        """``(points,)`` the normalisation ``T / norm`` (``None``: the output is unscaled)."""
        return self._scale

    @scale.setter
    def scale(self, value: Any) -> None:
        self._scale = value
        ref = self.weights
        unit = (torch.full((self.points,), _LN2, dtype=torch.float64, device=ref.device)
                if value is None else value.double() * _LN2)
        # (sub, count, 1): the output's factor on the log₂-unit pooled value (ln 2 · scale),
        # and the gradient's (one more ln 2: ∂y/∂v = ln 2 · ∂y/∂u), zero past ``points``.
        pad = torch.zeros(self.count * self.sub - self.points, dtype=torch.float64,
                          device=ref.device)
        full = torch.cat([unit, pad]).view(self.count, self.sub).t().unsqueeze(-1)
        self._out_scale = full.to(ref.dtype).contiguous()
        # The largest output per unit of input: a weighted mean of v = x·w is at most the
        # largest, so an axis's output is at most max(x) times this.
        self.gain = float(self.weights.max()) * float(self._out_scale.max())
        self._grad_scale = (full * _LN2).to(ref.dtype).contiguous()

    def to(self, device: Any) -> None:
        self.weights, self.bias = self.weights.to(device), self.bias.to(device)
        self._log2e = self._log2e.to(device)
        self._out_scale = self._out_scale.to(device)
        self._grad_scale = self._grad_scale.to(device)
        self._spread = {}
        if self._scale is not None:
            self._scale = self._scale.to(device)

    def _spread_weights(self, rows: int) -> torch.Tensor:
        out = self._spread.get(rows)
        if out is None:
            if len(self._spread) >= 8:          # a few batch sizes in turn, not every one
                self._spread.clear()
            out = self.weights.expand(self.w, self.sub, 1, rows).contiguous()
            self._spread[rows] = out
        return out

    def forward(self, x: torch.Tensor, cap: Optional[float]
                ) -> Tuple[torch.Tensor, Tuple[Any, ...]]:
        """``(..., count)`` → ``(..., points)`` and what :meth:`backward` needs (``cap``
        ``None``: no value reaches the cap, known beforehand)."""
        r, w, count = self.radius, self.w, self.count
        lead = x.shape[:-1]
        rows = lead.numel()
        length = count + w - 1
        # The padded parameters, transposed: row j holds parameter j − r of every pooled row,
        # capped at 50·T (2^v ≤ e^50: no overflow, no shift by the maximum).
        xp = x.new_zeros((length,) + lead)
        if cap is None:
            xp[r:r + count].copy_(x.movedim(-1, 0))
        else:
            torch.clamp(x.movedim(-1, 0), max=cap, out=xp[r:r + count])
        win = xp.view(length, rows).as_strided((w, 1, count, rows), (rows, 0, rows, 1))
        # p[0]: v·2^v, p[1]: 2^v, per slot, phase, window and row; their sums over the slots.
        p = x.new_empty((2, w, self.sub, count, rows))
        v = torch.addcmul(self.bias, win, self._spread_weights(rows), out=p[0])
        e = torch.exp2(v, out=p[1])
        v.mul_(e)
        sums = p.sum(dim=1)
        pooled = sums[0].div_(sums[1])                                    # (sub, count, rows)
        y = x.new_empty(lead + (count * self.sub,))
        torch.mul(pooled, self._out_scale, out=y.view(rows, count, self.sub).permute(2, 1, 0))
        return y[..., :self.points], (x, p, sums[1], pooled)

    def backward(self, grad: torch.Tensor, saved: Tuple[Any, ...], cap: Optional[float]
                 ) -> torch.Tensor:
        """The gradient at ``x`` ``(..., count)`` for ``grad`` ``(..., points)``."""
        x, p, den, pooled = saved
        r, w, sub, count = self.radius, self.w, self.sub, self.count
        lead = x.shape[:-1]
        rows = den.shape[-1]
        g = F.pad(grad, (0, count * sub - self.points))
        gd = torch.empty_like(den)                       # (sub, count, rows), contiguous
        torch.mul(g.reshape(rows, count, sub).permute(2, 1, 0), self._grad_scale, out=gd)
        gd.div_(den)
        # ∂y/∂v_i ∝ 2^v_i (v_i − y + log₂e) = v·2^v − 2^v (y − log₂e), written into a buffer
        # laid out so that slot i of window q and parameter q + i − r line up: the gradient
        # at the parameters is then one product with the weights (∂v/∂x) over (slot, phase).
        length = count + w - 1
        block = length * rows                     # one (slot, phase): the windows, padded
        buf = grad.new_zeros(w * (sub * block + rows))
        t = buf.as_strided((w, sub, count, rows), (sub * block + rows, block, rows, 1),
                           (w - 1 - r) * rows)
        torch.addcmul(p[0], p[1], torch.sub(pooled, self._log2e), value=-1, out=t).mul_(gd)
        aligned = buf.as_strided((w * sub, count * rows), (block, 1), (w - 1) * rows)
        gx = torch.mm(self.weights.view(1, w * sub), aligned).view((count,) + lead)
        gx = gx.movedim(0, -1)
        return gx if cap is None else torch.where(x <= cap, gx, 0.0)


def _effective_cap(x: torch.Tensor, axes: Sequence[SmoothMaxAxis], cap: float
                   ) -> Optional[float]:
    """``None`` when no axis's input can reach ``cap`` (then nothing is clamped or masked),
    else ``cap``.  Masks' parameters are far below it: on the CPU one reduction of the
    parameters tells, with each earlier axis's gain as the bound on its output (NaN counts as
    reaching it).  Elsewhere the answer would wait for the device."""
    if x.device.type != "cpu":
        return cap
    if x.numel() == 0:
        return None
    bound = cap * (1 - 1e-5)
    for a in axes[:-1]:
        bound /= a.gain
    return None if x.max().item() <= bound else cap


def _pool(x: torch.Tensor, axes: Sequence[SmoothMaxAxis], cap: float
          ) -> Tuple[torch.Tensor, List[Tuple[Any, ...]], Optional[float]]:
    cap_used = _effective_cap(x, axes, cap)
    saved = []
    out = x
    for i, a in enumerate(axes):
        y, s = a.forward(out.movedim(2 + i, -1), cap_used)
        saved.append(s)
        out = y.movedim(-1, 2 + i)
    return out.contiguous(), saved, cap_used


def _unpool(grad: torch.Tensor, axes: Sequence[SmoothMaxAxis], saved: List[Tuple[Any, ...]],
            cap: Optional[float]) -> torch.Tensor:
    g = grad
    for i in reversed(range(len(axes))):
        g = axes[i].backward(g.movedim(2 + i, -1), saved[i], cap).movedim(-1, 2 + i)
    return g.contiguous()


def _clamp(out: torch.Tensor, dims: int) -> torch.Tensor:
    """``out`` clamped to ``[0, 1]`` in place, values within ``4·dims`` units of rounding
    below 1 set to 1.

    A saturated neighbourhood pools to exactly 1 by the normalisation, and to 1 ± a few units
    of rounding in floating point: the clamp ties those above 1 and leaves the others a hair
    below.  Extremal perturbation ranks the mask's values (the area constraint), and starts
    from saturated masks: without the snap, the rounding pattern of the pooling would decide
    which pixels are pushed down first.  With it, saturated pixels are tied, as in exact
    arithmetic (the change is at most the tolerance, and only at values that close to 1).
    """
    tol = 4 * dims * torch.finfo(out.dtype).eps
    return out.clamp_(0, 1).masked_fill_(out >= 1 - tol, 1.0)


class _SmoothMaxGrid(torch.autograd.Function):
    """Pool every axis in turn, then clamp to ``[0, 1]`` with the identity's gradient."""

    @staticmethod
    def forward(ctx, params, axes, cap, clamp):
        out, saved, ctx.cap = _pool(params, axes, cap)
        ctx.axes, ctx.saved = axes, saved
        return _clamp(out, len(axes)) if clamp else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _unpool(grad, ctx.axes, ctx.saved, ctx.cap), None, None, None


def smooth_max_grid_vjp(params: torch.Tensor, axes: Sequence[SmoothMaxAxis], temperature: float,
                        clamp: bool) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """:func:`smooth_max_grid` without autograd: the pooled grid and a function that takes the
    gradient at the grid to the gradient at ``params`` — the node's forward and backward, the
    same numbers, without the graph and the engine (an extremal perturbation iteration calls it
    once).  The backward may run once."""
    cap = 50.0 * temperature
    with torch.no_grad():
        out, saved, cap_used = _pool(params.detach(), axes, cap)
        if clamp:
            _clamp(out, len(axes))

    def backward(grad: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _unpool(grad, axes, saved, cap_used)
    return out, backward


def smooth_max_grid(params: torch.Tensor, axes: Sequence[SmoothMaxAxis], temperature: float,
                    clamp: bool) -> torch.Tensor:
    """``(B, 1, *count)`` parameters → ``(B, 1, *points)`` smooth-max pooled along every axis
    (clamped to ``[0, 1]`` with the identity's gradient if ``clamp``); differentiable once."""
    cap = 50.0 * temperature
    if not (params.requires_grad and torch.is_grad_enabled()):
        with torch.no_grad():
            out = _pool(params, axes, cap)[0]
        return _clamp(out, len(axes)) if clamp else out
    return _SmoothMaxGrid.apply(params, tuple(axes), cap, clamp)
