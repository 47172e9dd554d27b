r"""The smooth-max pooling of extremal perturbation's smooth masks (Fong, Patrick, Vedaldi, ICCV
2019, arXiv 1910.08485), every axis of the parameter grid in one autograd node with a
hand-written backward.

Along one axis, the pooled value at evaluation point ``(q, s)`` (window ``q``, phase ``s``) is

.. math:: y_{qs} = \frac{\sum_i u_{qsi}\, e^{u_{qsi}}}{\sum_i e^{u_{qsi}}}, \qquad
          u_{qsi} = \bar m_{q+i-r}\, g_{si} / T,

over the valid candidates ``i`` (inside the grid, within 3σ), times ``T / norm`` so that a grid of
ones pools to ones; its derivative is ``∂y/∂u_i = e^{u_i}/Σe · (1 + u_i − y)``.  One node for
all axes, whose forward and backward run the operations autograd ran for the graph of the same
expression, in its order and on tensors of the same layout: the same numbers bit for bit (the
optimisation is chaotic — the ranking constraint's threshold is discontinuous — so a rounding
difference would change the masks), without the graph's per-node cost.  The one liberty: the
backward's sum over two to four phases is a running sum where that is the reduction's own order
(checked once per axis).  :class:`~.smooth_masks.MaskGenerator` uses it for its ``"softmax"``
pooling in single and double precision at temperatures from 0.03 up (where the cap at ``50·T``
is above every value a mask pools).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["SmoothMaxAxis", "smooth_max_grid", "smooth_max_grid_vjp"]


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
        self.sub, self.w = scaled.shape
        self.count = valid.shape[0]
        self.radius = (self.w - 2) // 2
        self.points = points
        self.scaled, self.valid, self.scale = scaled, valid, scale
        # Whether summing the phases in turn is the reduction's order (None: not checked yet).
        self.phase_sum: Optional[bool] = None

    def to(self, device: Any) -> None:
        self.scaled, self.valid = self.scaled.to(device), self.valid.to(device)
        if self.scale is not None:
            self.scale = self.scale.to(device)

    def forward(self, x: torch.Tensor, cap: float) -> Tuple[torch.Tensor, Tuple[Any, ...]]:
        """``(..., count)`` → ``(..., points)`` and what :meth:`backward` needs."""
        r = self.radius
        # Parameters capped at 50·T: exp(u) ≤ e^50, no overflow and no shift by the maximum.
        # Masks' values are far below the cap: on the CPU one reduction tells, and saves the
        # clamp here and the comparison and selection of the backward (``capped`` False: x ≤
        # cap everywhere, so the clamp is the identity; NaN counts as capped).  Elsewhere the
        # answer would wait for the device: clamp and select as before.
        capped = x.device.type != "cpu" or (x.numel() > 0 and not bool(x.amax() <= cap))
        win = F.pad(x.clamp(max=cap) if capped else x, (r, r + 1)).unfold(-1, self.w, 1)
        # (The product's memory layout follows the window view's strides, and the sums below
        # reduce in an order that follows the layout: keep both as they are.)
        u = win.unsqueeze(-2) * self.scaled                                # (..., count, sub, w)
        e = u.exp().mul_(self.valid)
        den = e.sum(dim=-1)
        out = (u * e).sum(dim=-1).div_(den)                                # (..., count, sub)
        flat = out.flatten(-2)[..., :self.points]
        y = flat if self.scale is None else flat * self.scale
        return y, (x, u, e, den, out, capped)

    def backward(self, grad: torch.Tensor, saved: Tuple[Any, ...], cap: float) -> torch.Tensor:
        """The gradient at ``x`` ``(..., count)`` for ``grad`` ``(..., points)``: the operations
        autograd runs for :meth:`forward`, in its order (the same numbers)."""
        x, u, e, den, out, capped = saved
        r = self.radius
        g = grad * self.scale
        g = F.pad(g, (0, self.count * self.sub - self.points)).view(out.shape)
        gu = (u - out.unsqueeze(-1)).add_(1).mul_(e).mul_((g / den).unsqueeze(-1))
        gwin = self._sum_phases(gu.mul_(self.scaled))                     # (..., count, w)
        size = list(x.shape)
        size[-1] += 2 * r + 1
        gpad = torch.ops.aten.unfold_backward(gwin, size, x.dim() - 1, self.w, 1)
        inner = gpad[..., r:r + self.count]
        # (Where no value was capped, the selection would copy ``inner`` bit for bit.)
        return torch.where(x <= cap, inner, 0.0) if capped else inner


    def _sum_phases(self, p: torch.Tensor) -> torch.Tensor:
        """``p.sum(dim=-2)``, as the running sum of the phases where that is the reduction's
        own order: several times faster for the two to four phases of the usual settings (a
        short reduction over a strided dimension is slow).  Whether it is the same order is
        checked once per axis, on the first gradient, bit for bit."""
        if self.sub > 4 or self.phase_sum is False:
            return p.sum(dim=-2)
        out = p[..., 0, :] + 0.0               # the reduction starts from +0: −0 becomes +0
        for s in range(1, self.sub):
            out += p[..., s, :]
        if self.phase_sum is None:
            ref = p.sum(dim=-2)
            self.phase_sum = bool(torch.equal(out, ref) and torch.equal(out.signbit(),
                                                                        ref.signbit()))
            if not self.phase_sum:
                return p.sum(dim=-2)
        return out


def _pool(x: torch.Tensor, axes: Sequence[SmoothMaxAxis], cap: float
          ) -> Tuple[torch.Tensor, List[Tuple[Any, ...]]]:
    saved = []
    out = x
    for i, a in enumerate(axes):
        y, s = a.forward(out.movedim(2 + i, -1), cap)
        saved.append(s)
        out = y.movedim(-1, 2 + i)
    return out, saved


def _unpool(grad: torch.Tensor, axes: Sequence[SmoothMaxAxis], saved: List[Tuple[Any, ...]],
            cap: float) -> torch.Tensor:
    g = grad
    for i in reversed(range(len(axes))):
        g = axes[i].backward(g.movedim(2 + i, -1), saved[i], cap).movedim(-1, 2 + i)
    return g


class _SmoothMaxGrid(torch.autograd.Function):
    """Pool every axis in turn, then clamp to ``[0, 1]`` with the identity's gradient."""

    @staticmethod
    def forward(ctx, params, axes, cap, clamp):
        out, saved = _pool(params, axes, cap)
        ctx.axes, ctx.cap, ctx.saved = axes, cap, saved
        return out.clamp_(0, 1) if clamp else out

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
        out, saved = _pool(params.detach(), axes, cap)
        if clamp:
            out.clamp_(0, 1)

    def backward(grad: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _unpool(grad, axes, saved, cap)
    return out, backward


def smooth_max_grid(params: torch.Tensor, axes: Sequence[SmoothMaxAxis], temperature: float,
                    clamp: bool) -> torch.Tensor:
    """``(B, 1, *count)`` parameters → ``(B, 1, *points)`` smooth-max pooled along every axis
    (clamped to ``[0, 1]`` with the identity's gradient if ``clamp``); differentiable once."""
    cap = 50.0 * temperature
    if not (params.requires_grad and torch.is_grad_enabled()):
        with torch.no_grad():
            out, _ = _pool(params, axes, cap)
        return out.clamp_(0, 1) if clamp else out
    return _SmoothMaxGrid.apply(params, tuple(axes), cap, clamp)
