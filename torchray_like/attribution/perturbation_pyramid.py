r"""The perturbation pyramid of extremal perturbations (Fong, Patrick, Vedaldi, ICCV 2019):
``num_levels`` copies of the image, blurred (or faded) less and less; a mask value picks and
interpolates the level of each pixel.  :mod:`.extremal_perturbation` re-exports
:class:`Perturbation`.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union, cast

import torch
from torch.autograd.function import once_differentiable

from .arguments import per_axis
from .inputs import check_input
from .maps import gaussian_matrix
from .smooth_masks import PerAxis, clamp01

__all__ = ["BLUR_PERTURBATION", "FADE_PERTURBATION", "PERTURBATIONS", "Perturbation",
           "gaussian_matrix"]

#: Blur pyramid perturbation.
BLUR_PERTURBATION = "blur"
#: Fade-to-baseline perturbation.
FADE_PERTURBATION = "fade"
PERTURBATIONS = (BLUR_PERTURBATION, FADE_PERTURBATION)


_MATRICES: Dict[Tuple[Any, ...], torch.Tensor] = {}


def _level_matrices(length: int, sigmas: Tuple[float, ...], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """``(len(sigmas), length, length)`` blur matrices (the identity for σ = 0), made once per
    (length, σs, dtype, device) and kept: building them costs several times the blur itself,
    and every call of extremal perturbation on images of one size asks for the same ones."""
    key = (length, sigmas, dtype, device)
    mats = _MATRICES.get(key)
    if mats is None:
        # A few image sizes at a time (at most 64 MB of matrices: 28 MB for 1024 px).
        size = len(sigmas) * length * length * torch.finfo(dtype).bits // 8
        if sum(m.numel() * m.element_size() for m in _MATRICES.values()) + size > 2 ** 26:
            _MATRICES.clear()
        eye = torch.eye(length, dtype=dtype, device=device)
        mats = torch.stack([gaussian_matrix(length, s, dtype=dtype, device=device)
                            if s > 0 else eye for s in sigmas])
        _MATRICES[key] = mats
    return mats


def _blur_stack(x: torch.Tensor, sigmas: Sequence[Sequence[float]]) -> torch.Tensor:
    """Blur ``(N, C, *spatial)`` with each per-axis ``sigmas[l]``: ``(N, len(sigmas), C, ...)``,
    separably, one batched matrix product per axis for all the levels at once."""
    levels = len(sigmas)
    y = x.unsqueeze(0).expand((levels,) + tuple(x.shape))
    for a in range(x.dim() - 2):
        length = x.shape[2 + a]
        per_level = tuple(float(s[a]) for s in sigmas)
        if all(s == 0 for s in per_level):
            continue
        mats = _level_matrices(length, per_level, x.dtype, x.device)
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

    def to(self, dev: Union[str, torch.device]) -> "Perturbation":
        """Move the pyramid to device ``dev`` (TorchRay's name), in place; returns ``self``."""
        self.pyramid = self.pyramid.to(dev)
        if self._fade is not None:
            self._fade = (self._fade[0].to(dev), self._fade[1].to(dev))
        return self

    def _masks_per_image(self, mask: Any) -> int:
        """``K`` for ``(N·K, 1, *spatial)`` masks; anything else is a ValueError."""
        pyr = self.pyramid
        n = pyr.shape[0]
        spatial = tuple(pyr.shape[3:])
        if not isinstance(mask, torch.Tensor) or mask.dim() != pyr.dim() - 1 or \
                mask.shape[1] != 1 or tuple(mask.shape[2:]) != spatial or \
                mask.shape[0] % n != 0:
            raise ValueError(
                f"mask must have shape (N·K, 1, {', '.join(map(str, spatial))}) with N·K a "
                f"multiple of the {n} images, got {tuple(getattr(mask, 'shape', ()))}")
        return mask.shape[0] // n

    def apply_with_backward(self, mask: torch.Tensor
                            ) -> Optional[Tuple[torch.Tensor, Callable[[torch.Tensor],
                                                                       torch.Tensor]]]:
        """:meth:`apply` without autograd, and its backward: ``(out, backward)`` with
        ``backward(grad_out)`` the gradient at ``mask`` that autograd gives through
        :meth:`apply` (the same operations, the same numbers), for a caller that
        differentiates the model with respect to ``out`` itself (one autograd node less per
        call).  ``None`` for the ``"fade"`` pyramid: use :meth:`apply` and autograd.
        """
        if self._fade is not None:
            self._masks_per_image(mask)
            return None
        pyr = self.pyramid
        k = self._masks_per_image(mask)
        with torch.no_grad():
            out, diff = _blend(mask.to(pyr.dtype), pyr, k)
        levels, dtype = pyr.shape[1], mask.dtype

        def backward(grad: torch.Tensor) -> torch.Tensor:
            return _blend_backward(grad, diff, levels).to(dtype)
        return out, backward

    def games_with_backward(self, mask: torch.Tensor, keep: bool, drop: bool
                            ) -> Optional[Tuple[torch.Tensor, Callable[[torch.Tensor],
                                                                       torch.Tensor]]]:
        """The batch ``[apply(m)]`` (``keep``) followed by ``[apply(1 − m)]`` (``drop``) without
        autograd, and the map from its gradient to the gradient at ``mask`` that autograd
        computes through the same expression, in its order (``1 − m`` gives ``−g``; the two
        halves add).  ``None`` for the ``"fade"`` pyramid (see :meth:`apply_with_backward`).
        """
        if not (keep or drop):
            return None
        kept = self.apply_with_backward(mask) if keep else None
        dropped = self.apply_with_backward(1 - mask) if drop else None
        if (kept or dropped) is None:            # the fade pyramid: autograd
            return None
        b = mask.shape[0]

        def backward(grad: torch.Tensor) -> torch.Tensor:
            if dropped is None:
                return cast(Tuple[Any, Callable], kept)[1](grad)
            if kept is None:
                return -dropped[1](grad)
            return kept[1](grad[:b]) + -dropped[1](grad[b:])
        if kept is not None and dropped is not None:
            return torch.cat([kept[0], dropped[0]]), backward
        return cast(Tuple[torch.Tensor, Any], kept or dropped)[0], backward

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
        k = self._masks_per_image(mask)
        if self._fade is None:
            return _Blend.apply(mask.to(pyr.dtype), pyr, k)
        m = clamp01(mask.to(pyr.dtype))
        base, delta = self._fade
        out = torch.addcmul(base.unsqueeze(1), m.view((n, k, 1) + spatial), delta.unsqueeze(1))
        return out.reshape((n * k, c) + spatial)


_BASES: Dict[Tuple[Any, ...], torch.Tensor] = {}


def _flat_base(pyr: torch.Tensor) -> torch.Tensor:
    """``(N, 1, 1, C, *spatial)``: the flat index of pixel ``(n, 0, c, u)`` of a contiguous
    pyramid shaped like ``pyr``, made once per (shape, device); 32-bit where every index fits
    (``index_select`` takes them, and the index arithmetic costs a third of 64-bit's)."""
    key = (tuple(pyr.shape), pyr.device)
    base = _BASES.get(key)
    if base is None:
        if len(_BASES) > 16:
            _BASES.clear()
        n, levels = pyr.shape[:2]
        base = torch.arange(pyr[:, 0].numel(), device=pyr.device).view(
            (n, 1, 1) + tuple(pyr.shape[2:]))
        base = base + (torch.arange(n, device=pyr.device) * ((levels - 1) * pyr[0, 0].numel())
                       ).view((n,) + (1,) * (pyr.dim()))
        _BASES[key] = base = base.int() if pyr.numel() < 2 ** 31 else base
    return base


def _blend(m: torch.Tensor, pyr: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two pyramid levels around ``m·(L − 1)`` interpolated linearly (``m`` clamped to
    ``[0, 1]``): ``(out, high − low)``, the difference kept for :func:`_blend_backward`
    (taken here, while both levels are in the cache: the backward's operation, moved)."""
    n, levels, c = pyr.shape[:3]
    spatial = tuple(pyr.shape[3:])
    t = m.clamp(0, 1) * (levels - 1)
    # (A NaN mask — from a model whose output is not finite — must not become an index.)
    lower = torch.nan_to_num(t, nan=0.0).floor_().clamp_(0, levels - 2)
    frac = (t - lower).view((n, k, 1, 1) + spatial)
    # Both levels by one flat index (``index_select`` of a 1-D tensor: a third cheaper than
    # a gather from an expanded view): pixel (n, level, channel, u) of the contiguous pyramid
    # is element ``level·C·|Ω| + base[n, channel, u]``, and the level above it the same
    # element of the pyramid shifted by one level.  The same elements, so the same numbers;
    # ``lerp`` sees the same shapes and strides as before (its vectorised and scalar paths
    # round apart).
    flat = pyr.reshape(-1)
    plane = c * math.prod(spatial)
    base = _flat_base(pyr)
    index = torch.add(base, lower.to(base.dtype).mul_(plane).view((n, k, 1, 1) + spatial))
    shape = index.shape
    index = index.view(-1)
    low = flat.index_select(0, index).view(shape)
    high = flat[plane:].index_select(0, index).view(shape)
    out = torch.lerp(low, high, frac)
    return out.reshape((n * k, c) + spatial), high - low


def _blend_backward(grad: torch.Tensor, diff: torch.Tensor, levels: int) -> torch.Tensor:
    """``∂out/∂m = (L − 1)·Σ_c g·(high − low)``: the operations autograd ran for the same
    graph, in its order (the same numbers)."""
    g = (grad.view(diff.shape) * diff).sum(3, keepdim=True)
    return g.view((-1, 1) + tuple(diff.shape[4:])) * (levels - 1)


class _Blend(torch.autograd.Function):
    """:func:`_blend` as one autograd node (``m`` clamped to ``[0, 1]`` with the identity's
    gradient)."""

    @staticmethod
    def forward(ctx, m, pyr, k):
        out, diff = _blend(m, pyr, k)
        ctx.save_for_backward(diff)
        ctx.levels = pyr.shape[1]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return _blend_backward(grad, diff, ctx.levels), None, None
