r"""RISE: randomized input sampling for explanation.

Petsiuk, Das, Saenko, "RISE: Randomized input sampling for explanation of black-box models",
BMVC 2018 (arXiv 1806.07421).

The model is run on ``N`` randomly masked copies ``x ⊙ M_i`` of the input and the saliency of
class ``c`` is the score-weighted average of the masks,

.. math::

    S_c = \frac{1}{N \, p} \sum_{i=1}^{N} f_c(x \odot M_i) \, M_i ,

a Monte-Carlo estimate of :math:`E[f_c(x \odot M) \, M] / p`, i.e. of
:math:`E[f_c(x \odot M) \mid M(\lambda) = 1]` per pixel for binary masks, with ``f_c`` the class
probability (the softmax).  Each mask is a binary grid of ``num_cells`` cells per side whose
cells are kept with probability ``p``, upsampled (linear / bilinear / trilinear by rank) to
``(num_cells + 1) × cell_size`` with ``cell_size = ceil(side / num_cells)``, and cropped at a
random shift in ``[0, cell_size)`` per dimension — soft-edged masks placed at every sub-cell
offset.  Every pixel of a mask has expectation exactly ``p``.

TorchRay's ``rise`` averages the *sigmoid* of the logits and divides by ``N`` only,
:math:`\frac{1}{N} \sum_i \sigma(z_c(x \odot M_i))\, M_i`: ``normalize="torchray"`` gives that
formula (the maps are then ``p`` times the paper's for the same scores).

Design
------
* The random draws (cells and shifts, a few bytes per mask) are made up front with a private
  :class:`torch.Generator`; the masks themselves are built a forward batch at a time, used and
  dropped.  Upsampling then cropping is separable, so a mask is a few small matrix products with
  the rows of the upsampling matrices (``interpolate``'s weights) that the crop keeps.  A bank from
  :func:`generate_masks` with the same seed holds exactly the masks :func:`rise` draws, so a
  whole data set can be explained with one bank.
* The masks are shared by every image of the batch; the forward batches hold
  ``batch_size // N`` masks × ``N`` images (or ``batch_size`` images × 1 mask when
  ``N > batch_size``).  Scores are folded into the maps with one matrix product
  ``scoresᵀ @ masks`` per 64 masks or so (fewer when ``batch_size`` is small), scaled on the
  way, so the method costs its forward passes.  Peak memory: one batch of masked inputs and the
  model's activations for it, the masks of one fold (at most about one more batch), and the maps
  ``(N, K, *spatial)`` — whatever ``num_masks`` is.
* Everything runs under :func:`torch.inference_mode` with the model in eval mode (its
  ``training`` flags are restored afterwards, also on errors); the global RNG is never used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._perturbation import (GeneratorType, autocast_forward, check_autocast, check_finite,
                            check_number, check_progress, make_generator, positive_int,
                            progress_bar, warn_caller)
from .maps import resize_saliency
from .state import check_input, check_model, model_state_guard
from .targets import (BINARY_HEAD_RULE, SCORES, check_class_range, class_indices, is_binary_head,
                      output_scores)

__all__ = ["rise", "rise_class", "generate_masks", "RiseInfo", "RISE_SCORES",
           "RISE_NORMALIZATIONS", "DEFAULT_NUM_MASKS", "DEFAULT_TOL", "SlowRiseWarning"]

#: Names accepted by ``rise(score=...)``.
RISE_SCORES = SCORES
#: Names accepted by ``rise(normalize=...)``: the paper's ``1 / (N p)`` (with the softmax by
#: default) or TorchRay's ``1 / N`` (with the sigmoid by default).
RISE_NORMALIZATIONS = ("paper", "torchray")

ScoreType = Union[str, Callable[[Any], torch.Tensor]]

# The random draws are made in blocks of this many masks: bounded temporary memory, and a stream
# of draws that does not depend on batch_size (so the masks do not either).
_DRAW_BLOCK = 4096
# Fold the scores into the maps at least this many masks at a time (see _MapAccumulator).
_MIN_FOLD = 64
#: TorchRay's default number of masks (also the cap of ``num_masks="auto"``).
DEFAULT_NUM_MASKS = 8000
#: Tolerance of ``num_masks="auto"``: stop when the maps' standard error is 5 % of their range
#: (on the embedded benchmark: correlation 0.988 on average with the 8000-mask map, with 42 % of
#: its masks; ``benchmarks/rise_convergence.py``).
DEFAULT_TOL = 0.05
# The stopping rule never stops before this many masks: below, the variance estimate itself is
# too noisy to trust.
_AUTO_MIN_MASKS = 256
#: A CPU run with the default 8000 masks that is predicted to take longer than this many seconds
#: warns once per process (:class:`SlowRiseWarning`).
SLOW_CPU_SECONDS = 120.0
_warned_slow = False


class SlowRiseWarning(UserWarning):
    """A CPU run of RISE with the default 8000 masks will take minutes per call."""


@dataclass(frozen=True)
class RiseInfo:
    """What one :func:`rise` call did (``return_info=True``).

    Attributes
    ----------
    num_masks : int
        Masks used: ``num_masks`` when fixed, fewer when ``num_masks="auto"`` / ``tol`` stopped
        early.
    rel_error : float or None
        The stopping statistic at the end (see :func:`rise`, ``tol``); ``None`` when no
        tolerance was given.
    converged : bool
        Whether ``rel_error <= tol`` (always ``True`` without a tolerance).
    seconds : float
        Wall-clock time of the call.
    """

    num_masks: int
    rel_error: Optional[float]
    converged: bool
    seconds: float


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not math.isfinite(float(p)):
        raise TypeError(f"p must be a number in (0, 1], got {p!r}")
    if not 0.0 < float(p) <= 1.0:
        raise ValueError(
            f"p (the probability of keeping a cell) must be in (0, 1], got {p!r}")
    return float(p)


def _check_size(input_size: Any) -> Tuple[int, ...]:
    if isinstance(input_size, (bool, Integral)):
        raise TypeError(
            f"input_size must be a tuple of spatial sizes in torch order — (L,), (H, W) or "
            f"(T, H, W) — got the int {input_size!r}; write (L,) for 1-D or (S, S) for 2-D")
    if not isinstance(input_size, (tuple, list, torch.Size)):
        raise TypeError(
            f"input_size must be a tuple (L,), (H, W) or (T, H, W), got "
            f"{type(input_size).__name__}")
    size = tuple(input_size)
    if not 1 <= len(size) <= 3 or not all(
            isinstance(s, Integral) and not isinstance(s, bool) and int(s) >= 1 for s in size):
        raise ValueError(
            f"input_size must hold 1 to 3 positive ints — (L,), (H, W) or (T, H, W) — got "
            f"{input_size!r}")
    return tuple(int(s) for s in size)


def _check_cells(num_cells: Any, rank: int) -> Tuple[int, ...]:
    if isinstance(num_cells, (tuple, list)):
        if len(num_cells) != rank:
            raise ValueError(
                f"num_cells must be an int or {rank} ints (one per spatial dimension), got "
                f"{num_cells!r}")
        return tuple(positive_int(s, "num_cells") for s in num_cells)
    return (positive_int(num_cells, "num_cells"),) * rank


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


class _MaskSampler:
    """The random draws of ``num_masks`` RISE masks; :meth:`masks` builds any slice of them.

    Holds only the binary cells (``num_masks × prod(num_cells)`` booleans) and the shifts; the
    masks are upsampled on demand, so building them ``batch_size`` at a time or all at once
    gives the same values.
    """

    def __init__(self, num_masks: int, size: Tuple[int, ...], cells: Tuple[int, ...], p: float,
                 generator: torch.Generator) -> None:
        self.num_masks = num_masks
        self.size = size
        self.cells = cells
        self.cell_size = tuple(-(-side // s) for side, s in zip(size, cells))
        self.up_size = tuple((s + 1) * c for s, c in zip(cells, self.cell_size))
        k, rank = math.prod(cells), len(size)
        grids: List[torch.Tensor] = []
        shifts: List[torch.Tensor] = []
        cs = torch.tensor(self.cell_size, dtype=torch.float64, device=generator.device)
        for start in range(0, num_masks, _DRAW_BLOCK):
            n = min(_DRAW_BLOCK, num_masks - start)
            # One uniform draw per cell (kept iff u < p) and per shift (floor(u · cell_size)).
            u = torch.rand(n, k + rank, generator=generator, device=generator.device,
                           dtype=torch.float64)
            grids.append(u[:, :k] < p)
            shift = (u[:, k:] * cs).floor().long()
            shifts.append(torch.minimum(shift, cs.long() - 1))
        self.grid = torch.cat(grids)
        self.shift = torch.cat(shifts)
        self._matrices: dict = {}

    def _matrix(self, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(up_size[d], cells[d])`` weights of the linear upsampling along dimension ``d``:
        exactly what :func:`torch.nn.functional.interpolate` computes (``align_corners=False``),
        obtained by interpolating the identity."""
        key = (d, device, dtype)
        if key not in self._matrices:
            s = self.cells[d]
            eye = torch.eye(s, device=device, dtype=dtype).view(s, 1, s)
            up = F.interpolate(eye, size=self.up_size[d], mode="linear", align_corners=False)
            self._matrices[key] = up[:, 0].t().contiguous()
        return self._matrices[key]

    def masks(self, start: int, stop: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
        """Masks ``start:stop`` as a ``(stop - start, 1, *size)`` tensor."""
        n, rank = stop - start, len(self.size)
        # Work in at least single precision (half matmuls are not available everywhere).
        work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        out = self.grid[start:stop].to(device=device, dtype=work).view(n, *self.cells)
        shift = self.shift[start:stop].to(device)
        # Upsample-then-crop is separable: along each dimension only the rows of the upsampling
        # matrix that the crop keeps are needed, so each mask is a few small matrix products
        # and no upsampled grid is built.
        cells, sizes = "abc"[:rank], "xyz"[:rank]
        cur = list(cells)
        for d in reversed(range(rank)):
            rows = shift[:, d, None] + torch.arange(self.size[d], device=device)
            mat = self._matrix(d, device, work)[rows]  # (n, size[d], cells[d])
            src = "n" + "".join(cur)
            cur[d] = sizes[d]
            out = torch.einsum(f"{src},n{sizes[d]}{cells[d]}->n{''.join(cur)}", out, mat)
        # Interpolating ones can round one ulp above 1: keep masks in [0, 1] as documented.
        return out.clamp_(0.0, 1.0).unsqueeze(1).to(dtype)


def generate_masks(num_masks: int, input_size: Sequence[int], num_cells: Union[int,
                   Sequence[int]] = 7, p: float = 0.5, generator: GeneratorType = None,
                   device: Union[str, torch.device, None] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A bank of RISE masks (Petsiuk et al. 2018), reusable across calls of :func:`rise`.

    Parameters
    ----------
    num_masks : int
        Number of masks.
    input_size : tuple of int
        Spatial size in torch order: ``(L,)``, ``(H, W)`` or ``(T, H, W)``.
    num_cells : int or tuple of int
        Cells per side of the binary grid (the paper's ``s``, 7); one per dimension allowed
        (e.g. fewer cells along time).
    p : float
        Probability of keeping a cell, in ``(0, 1]``.
    generator : torch.Generator, int or None
        Source of randomness: a generator (advanced by the call), an int seed, or ``None`` for a
        seed derived from the global RNG state, which is not advanced (so the bank is
        reproducible under :func:`torch.manual_seed`).  The global RNG is never used.
    device, dtype
        Where and in which floating type to build the bank (default: CPU, the default dtype).

    Returns
    -------
    torch.Tensor
        ``(num_masks, 1, *input_size)`` masks with values in ``[0, 1]`` and expectation ``p`` at
        every pixel.  ``rise(..., masks=bank, p=p)`` with this bank gives exactly what
        ``rise(..., num_masks=num_masks, num_cells=num_cells, p=p, generator=<same seed>)``
        gives.  Memory: ``num_masks × prod(input_size)`` values (8000 masks at 224² in float32
        take 1.6 GB) — :func:`rise` without a bank never holds more than ``batch_size`` masks.
    """
    num_masks = positive_int(num_masks, "num_masks")
    size = _check_size(input_size)
    cells = _check_cells(num_cells, len(size))
    p = _check_p(p)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device("cpu" if device is None else device)
    sampler = _MaskSampler(num_masks, size, cells, p, make_generator(generator))
    return sampler.masks(0, num_masks, device, dtype)


class _Bank:
    """Masks ``start:stop`` of a bank given by the caller, on the input's device."""

    def __init__(self, masks: torch.Tensor) -> None:
        self.bank = masks

    def masks(self, start: int, stop: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
        return self.bank[start:stop].to(device=device, dtype=dtype)


def _check_bank(masks: Any, input: torch.Tensor, num_masks: Optional[int], p: float,
                check_mean: bool) -> int:
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a tensor from generate_masks, got {type(masks).__name__}")
    if not masks.is_floating_point():
        raise TypeError(f"masks must be a floating-point tensor, got dtype {masks.dtype}")
    want = (1,) + tuple(input.shape[2:])
    if masks.dim() != input.dim() or tuple(masks.shape[1:]) != want or masks.shape[0] == 0:
        raise ValueError(
            f"masks must have shape (num_masks, 1, *spatial) = (M, {', '.join(map(str, want))}) "
            f"to match the input {tuple(input.shape)}, got {tuple(masks.shape)}; build the bank "
            f"with generate_masks(M, {tuple(input.shape[2:])})")
    available = masks.shape[0]
    if num_masks is None:
        num_masks = available
    elif num_masks > available:
        raise ValueError(
            f"num_masks={num_masks} but the masks bank holds only {available} masks")
    mean = float(masks[:num_masks].mean())  # in the bank's dtype: no copy of a large bank
    if not math.isfinite(mean):
        raise ValueError("masks contain non-finite values (nan or inf)")
    # The paper's normalisation divides by p, the masks' expectation: a bank drawn with another
    # p would silently scale every map.  The tolerance leaves room for few, coarse masks.
    if check_mean and abs(mean - p) > 0.1 + 2.0 / math.sqrt(num_masks):
        raise ValueError(
            f"the masks have mean value {mean:.3f} but p={p}: pass the p the bank was generated "
            f"with (the maps are divided by p)")
    return num_masks


# ---------------------------------------------------------------------------------------------
# RISE
# ---------------------------------------------------------------------------------------------


@dataclass
class _Config:
    """The validated arguments of one call (every check runs before any forward pass)."""

    num_masks: int
    batch_size: int
    score: ScoreType
    scale: float                      # 1 / (N p) or 1 / N
    idx: Optional[torch.Tensor]       # one class per image, or None for every class
    source: Any                       # _MaskSampler or _Bank
    tol: Optional[float]              # stopping tolerance (num_masks is then the cap)
    autocast: Optional[torch.dtype]
    warn_slow: bool                   # the default 8000 masks on the CPU: maybe warn

    @classmethod
    def check(cls, model: Any, input: Any, target: Any, seed: Optional[int],
              num_masks: Union[int, str, None], num_cells: Any, filter_masks: Any, batch_size: Any,
              p: Any, resize: Any, resize_mode: Any, score: Any, normalize: Any,
              generator: Any, progress: Any, masks: Any, tol: Any = None,
              autocast: Any = None) -> "_Config":
        if not isinstance(model, nn.Module):
            check_model(model)  # raises the TypeError explaining what to pass
        check_input(input, needs_grad=False)
        rank = input.dim() - 2
        if rank > 3:
            raise ValueError(
                f"input must have 1 to 3 spatial dimensions — (N, C, L), (N, C, H, W) or "
                f"(N, C, T, H, W) — got shape {tuple(input.shape)}")
        check_finite(input, "input", "rise")
        if normalize not in RISE_NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {RISE_NORMALIZATIONS}, got {normalize!r}")
        if score is None:
            score = "softmax" if normalize == "paper" else "sigmoid"
        if not (callable(score) or score in RISE_SCORES):
            raise ValueError(
                f"score must be one of {', '.join(repr(s) for s in RISE_SCORES)} or a callable "
                f"output -> (batch, K) scores, got {score!r}")
        check_progress(progress)
        batch_size = positive_int(batch_size, "batch_size")
        p = _check_p(p)
        defaulted = num_masks is None
        if isinstance(num_masks, str):
            if num_masks != "auto":
                raise ValueError(
                    f"num_masks must be a positive int, None (8000) or 'auto', got {num_masks!r}")
            tol = DEFAULT_TOL if tol is None else tol
            num_masks = None
        elif num_masks is not None:
            num_masks = positive_int(num_masks, "num_masks")
        if tol is not None:
            tol = check_number(tol, "tol", 0.0, 1.0, low_open=True)
        autocast = check_autocast(autocast, input.device)
        idx = None
        if target is not None:
            if callable(target) and not isinstance(target, torch.Tensor):
                raise TypeError(
                    "rise: target must be None, an int or one class per sample; to explain "
                    "another quantity pass score=callable(output) -> (batch, K) scores")
            if isinstance(target, torch.Tensor) and (target.is_floating_point()
                                                     or target.is_complex()):
                raise ValueError(
                    f"rise: target must hold integer class indices, got a {target.dtype} tensor")
            idx = class_indices(target, input.shape[0], input.device)
        # Check resize before the work (an empty map resizes for free).
        resize_saliency(input, input.new_zeros((0, 1) + (1,) * rank), resize, resize_mode)
        if filter_masks is not None and masks is not None and filter_masks is not masks:
            raise ValueError("pass the mask bank once: masks is an alias of filter_masks")
        bank = masks if masks is not None else filter_masks
        if bank is not None:
            num_masks = _check_bank(bank, input, num_masks, p, check_mean=normalize == "paper")
            source: Any = _Bank(bank)
        else:
            num_masks = DEFAULT_NUM_MASKS if num_masks is None else num_masks
            # generator wins; seed (TorchRay's) is used when no generator is given.
            rng = make_generator(generator if generator is not None else seed)
            source = _MaskSampler(num_masks, tuple(input.shape[2:]),
                                  _check_cells(num_cells, rank), p, rng)
        scale = 1.0 / (num_masks * p) if normalize == "paper" else 1.0 / num_masks
        warn_slow = defaulted and bank is None and tol is None and input.device.type == "cpu"
        return cls(num_masks, batch_size, score, scale, idx, source, tol, autocast, warn_slow)


class _MapAccumulator:
    """Folds the scores of the masked inputs into the maps, ``S += scale · scoresᵀ @ masks``.

    Scores and masks are staged for ``fold`` masks, then folded with one matrix product: a
    product with a short inner dimension would re-read and re-write the maps for every forward
    batch (costly with 1000 classes).  The first fold overwrites the uninitialised maps
    (``beta=0``: no zeroing pass) and the scale rides along (``alpha``: no final pass).
    """

    def __init__(self, input: torch.Tensor, cfg: _Config, fold: int,
                 dtype: torch.dtype) -> None:
        self.n_img = input.shape[0]
        self.spatial = tuple(input.shape[2:])
        self.pixels = math.prod(self.spatial)
        self.cfg, self.fold, self.dtype, self.device = cfg, fold, dtype, input.device
        self.masks = torch.empty(fold, self.pixels, dtype=dtype, device=self.device)
        self.maps: Optional[torch.Tensor] = None
        self.squares: Optional[torch.Tensor] = None   # sum of (score · mask)², with tol
        self.lhs: Optional[torch.Tensor] = None
        self.num_classes = 0
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)

    def stage_masks(self, offset: int, masks: torch.Tensor) -> torch.Tensor:
        """Keep masks ``offset : offset + len(masks)`` of the fold; return them as a view."""
        flat = self.masks[offset:offset + masks.shape[0]]
        flat.copy_(masks.view(masks.shape[0], self.pixels))
        return flat

    def stage_scores(self, offset: int, i0: int, scores: torch.Tensor, output: Any) -> None:
        """Scores ``(masks, images, K)`` of images ``i0 :`` under masks ``offset :``."""
        mb, gi, k = scores.shape
        if self.maps is None:
            self._allocate(k, output)
        elif k != self.num_classes:
            raise ValueError(
                f"the score has {k} classes in one forward batch and {self.num_classes} in "
                "another")
        if self.cfg.idx is not None:
            sel = self.cfg.idx[i0:i0 + gi].view(1, gi, 1).expand(mb, gi, 1)
            scores = scores.gather(2, sel)
            k = 1
        self.finite &= torch.isfinite(scores).all()
        assert self.lhs is not None
        # lhs row (image i, class c), column j: the score under mask offset + j.
        self.lhs[i0 * k:(i0 + gi) * k, offset:offset + mb] = scores.permute(1, 2, 0).reshape(
            gi * k, mb)

    def _allocate(self, k: int, output: Any) -> None:
        self.num_classes = k
        if self.cfg.idx is not None:
            if not callable(self.cfg.score) and isinstance(output, torch.Tensor) and \
                    is_binary_head(output):
                check_class_range(self.cfg.idx, 0, 2, BINARY_HEAD_RULE)
            else:
                check_class_range(self.cfg.idx, 0, k,
                                  f"the scores have {k} classes (valid: 0..{k - 1})")
        rows = self.n_img * (1 if self.cfg.idx is not None else k)
        with torch.inference_mode(False):  # the result is a normal tensor
            self.maps = torch.empty(rows, self.pixels, dtype=self.dtype, device=self.device)
        if self.cfg.tol is not None:
            self.squares = torch.empty_like(self.maps)
        self.lhs = torch.empty(rows, self.fold, dtype=self.dtype, device=self.device)

    def fold_in(self, first: bool, n: int) -> None:
        """Add the staged ``n`` masks to the maps."""
        assert self.maps is not None and self.lhs is not None
        if not bool(self.finite):
            raise ValueError(
                "rise: the model's scores are not finite (NaN or inf) for some masked inputs; "
                "check the model on inputs with zeroed regions (x * mask)")
        beta = 0 if first else 1
        if self.squares is None:
            self.maps.addmm_(self.lhs[:, :n], self.masks[:n], beta=beta, alpha=self.cfg.scale)
            return
        # With a stopping rule the final count is unknown: keep plain sums (scaled at the end)
        # and the sums of squares for the variance.
        self.maps.addmm_(self.lhs[:, :n], self.masks[:n], beta=beta)
        self.squares.addmm_(self.lhs[:, :n].square(), self.masks[:n].square(), beta=beta)

    def rel_error(self, n: int) -> float:
        """Monte-Carlo standard error of the maps after ``n`` masks, relative to their range.

        Per map, the root mean square over pixels of the standard error of the mean of
        ``score · mask``, divided by the map's range (max - min); with every class
        (``target=None``) the largest of an image's classes over the largest range of its
        classes; the largest over the images.  Neither depends on the normalisation.
        """
        assert self.maps is not None and self.squares is not None
        mean = self.maps / n
        var = (self.squares / n - mean.square()).clamp_(min=0) * (n / max(n - 1, 1))
        rms_se = (var.mean(1) / n).sqrt().view(self.n_img, -1)
        span = (mean.amax(1) - mean.amin(1)).view(self.n_img, -1)
        ratio = rms_se.amax(1) / span.amax(1).clamp(min=torch.finfo(self.dtype).tiny)
        return float(ratio.max())

    def result(self, n: int) -> torch.Tensor:
        assert self.maps is not None
        if self.squares is not None:
            # scale · num_masks is the normalisation per mask (1 / p, or 1 for "torchray").
            self.maps.mul_(self.cfg.scale * self.cfg.num_masks / n)
        return self.maps.view((self.n_img, self.maps.shape[0] // self.n_img) + self.spatial)


def rise(model: nn.Module, input: torch.Tensor, target: Any = None, seed: Optional[int] = 0,
         num_masks: Union[int, str, None] = None, num_cells: Union[int, Sequence[int]] = 7,
         filter_masks: Optional[torch.Tensor] = None, batch_size: int = 32, p: float = 0.5,
         resize: Any = False, resize_mode: str = "bilinear", *,
         score: Optional[ScoreType] = None, normalize: str = "paper",
         generator: GeneratorType = None, progress: Optional[bool] = None,
         masks: Optional[torch.Tensor] = None, tol: Optional[float] = None,
         autocast: Optional[torch.dtype] = None, return_info: bool = False) -> Any:
    r"""RISE saliency maps (Petsiuk, Das, Saenko, BMVC 2018, arXiv 1806.07421).

    :math:`S_c = \frac{1}{N p} \sum_i f_c(x \odot M_i)\, M_i` over ``N = num_masks`` random
    masks (see the module docstring for how masks are drawn).  The arguments up to
    ``resize_mode`` are TorchRay's, in its order (positional use works); the rest are
    keyword-only.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier.  It runs in eval mode under :func:`torch.inference_mode`; its
        ``training`` flags are restored afterwards (also when it raises).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating batch, 1 to 3 spatial dimensions, finite.  Masks are
        applied as ``x ⊙ M`` (the masked-out value is 0, e.g. the mean colour of normalised
        images).
    target : None, int, sequence or 1-D integer tensor
        ``None``: maps for every class, ``(N, K, *spatial)``.  An int (every sample) or one class
        per sample: ``(N, 1, *spatial)``.
    seed : int or None
        TorchRay's seed of the masks, used when ``generator`` is not given (``generator`` wins).
        The default 0 makes calls reproducible, as in TorchRay; ``None`` (with no generator)
        derives the seed from the global RNG state without advancing it.
    num_masks : int, "auto" or None
        Number of masks; ``None``: 8000 (TorchRay's default), or with a bank all its masks (an
        int takes the bank's first ``num_masks``).  ``"auto"``: stop as soon as the maps have
        converged (``tol``, default 0.05), at most 8000 masks (or the bank's); with ``tol``
        given, an int is the cap.  On the CPU a run of the default 8000 masks that will take
        over two minutes warns once per process (:class:`SlowRiseWarning`).
    num_cells : int or tuple of int
        Grid cells per side (default 7), or one per spatial dimension.
    filter_masks : torch.Tensor, optional
        A bank ``(M, 1, *spatial)`` of masks (from :func:`generate_masks`, any device):
        skips the draws, so a data set can be explained with one bank; ``num_cells``, ``seed``
        and ``generator`` are unused.  ``masks`` is an alias.
    batch_size : int
        Most inputs per forward pass.  Peak memory is about that forward batch (masked inputs
        and activations), the masks of one fold (at most about one more batch of inputs) and
        the maps, whatever ``num_masks`` is.
    p : float
        Probability of keeping a cell, in ``(0, 1]``; the paper's maps are divided by it.  With
        a bank pass the ``p`` of the bank (with ``normalize="paper"``, a bank whose mean value
        is far from ``p`` is an error).
    resize : bool, int or tuple
        Resize the maps (see :func:`~torchray_like.attribution.maps.resize_saliency`); they are
        already at the input's size.
    resize_mode : str
        Interpolation mode for ``resize``.
    score : {"softmax", "sigmoid", "logit"} or callable, optional
        What is averaged: the softmax probability (the paper; the default with
        ``normalize="paper"``), the sigmoid (multi-label heads; TorchRay; the default with
        ``normalize="torchray"``), the raw logit, or ``callable(output) -> (batch, K)`` (or
        ``(batch,)``) scores for any other output (tuples, dicts, score maps); ``target`` then
        indexes its ``K`` columns.  Single-logit binary heads (output ``(batch,)`` or
        ``(batch, 1)``) have two classes: 1 scores ``sigmoid(z)`` and 0 scores
        ``1 - sigmoid(z)`` (the two-class softmax with logits ``∓z/2``); with "logit", ``z`` and
        ``-z``.
    normalize : {"paper", "torchray"}
        ``"paper"``: :math:`\frac{1}{N p} \sum_i f_c(x \odot M_i) M_i` with the softmax;
        ``"torchray"``: TorchRay's :math:`\frac{1}{N} \sum_i \sigma(z_c(x \odot M_i)) M_i`
        (the sigmoid of the logits, divided by ``N`` only; ``p`` then only sets the masks).
    generator : torch.Generator, int or None
        Randomness of the masks: a generator (advanced), an int seed, or ``None`` to use
        ``seed``.  A seed gives the same masks for every ``batch_size`` and on every device (up
        to float rounding there).
    progress : bool or None
        A tqdm progress bar: ``True`` always, ``False`` never, ``None`` when stderr is a
        terminal.  No tqdm monitor thread is left behind.
    masks : torch.Tensor, optional
        Alias of ``filter_masks``.
    tol : float, optional
        The stopping rule (Monte-Carlo error, in ``(0, 1]``): after every fold of masks (64 or
        so, never before 256 masks) the standard error of each map is estimated from the running
        sums of ``score · mask`` and of its square; RISE stops when its root mean square over
        pixels, divided by the map's range, is at most ``tol`` for every map (with
        ``target=None``, per image: the largest over the classes divided by the largest range).
        The masks used are the first ones of the same random stream, so the result is the map
        of a fixed ``num_masks`` equal to the count used (up to float rounding).  Measured on
        the embedded VGG (8 images, every class): ``tol=0.05`` used 3 384 masks on average
        for maps correlated 0.988 (mean; 0.978 at worst) with the 8000-mask maps, ``0.035``
        5 912 masks for 0.997 (0.993), and ``0.15`` 448 masks for the same pointing-game
        hits as 8000 (``benchmarks/rise_convergence.py``; see the docs' speed page).
    autocast : torch.dtype, optional
        ``torch.bfloat16`` (CPUs and GPUs) or ``torch.float16`` (GPUs): run the forward passes
        under :class:`torch.autocast` to that dtype; scores, masks and maps stay in float32.
        Typically 1.5–2× faster on CPUs with bfloat16 support, with map correlations above
        0.999 to float32.
    return_info : bool
        Also return a :class:`RiseInfo` (masks used, final error, time).

    Returns
    -------
    torch.Tensor, or (torch.Tensor, RiseInfo) with ``return_info=True``
        ``(N, K, *spatial)`` (``target=None``) or ``(N, 1, *spatial)`` maps on the input's
        device, in the input's dtype (float32 for half-precision inputs), not requiring grad.

    Raises
    ------
    TypeError, ValueError
        For a non-module model, an integer, wrongly shaped or non-finite input, bad
        ``num_masks``, ``num_cells``, ``p``, ``batch_size``, ``score``, ``normalize``,
        ``progress``, a masks bank that does not match the input, targets of the wrong length or
        out of the classes' range, ``tol``, ``autocast``, and a model whose scores are not
        finite.
    """
    started = time.perf_counter()
    cfg = _Config.check(model, input, target, seed, num_masks, num_cells, filter_masks,
                        batch_size, p, resize, resize_mode, score, normalize, generator,
                        progress, masks, tol, autocast)
    n_img = input.shape[0]
    # Masks and maps in at least single precision (the masked inputs in the input's dtype).
    dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    group = min(n_img, cfg.batch_size)            # images per forward batch
    per_batch = max(1, cfg.batch_size // group)   # masks per forward batch
    # A fold holds at most about one forward batch of masked inputs (batch_size × channels ×
    # pixels values), and whole forward batches.
    want = min(_MIN_FOLD, cfg.batch_size * input.shape[1])
    fold = min(cfg.num_masks, per_batch * max(1, -(-want // per_batch)))
    acc = _MapAccumulator(input, cfg, fold, dtype)
    x = input.detach()
    used, error = cfg.num_masks, None
    with model_state_guard(model, freeze=False), torch.inference_mode(), \
            progress_bar(cfg.num_masks, progress, "RISE", unit="mask") as bar:
        for f0 in range(0, cfg.num_masks, fold):
            f1 = min(f0 + fold, cfg.num_masks)
            for start in range(f0, f1, per_batch):
                stop = min(start + per_batch, f1)
                m = acc.stage_masks(start - f0, cfg.source.masks(start, stop, input.device,
                                                                 dtype))
                m = m.view((stop - start, 1) + acc.spatial).to(input.dtype)
                for i0 in range(0, n_img, group):
                    i1 = min(i0 + group, n_img)
                    # Mask-major batch: row j·gi + i is image i0 + i under mask start + j.
                    batch = (x[None, i0:i1] * m[:, None]).view((-1,) + x.shape[1:])
                    with autocast_forward(cfg.autocast, input.device):
                        output = model(batch)
                    scores = output_scores(output, cfg.score, batch.shape[0], dtype)
                    acc.stage_scores(start - f0, i0, scores.view(stop - start, i1 - i0, -1),
                                     output)
                bar.update(stop - start)
            acc.fold_in(f0 == 0, f1 - f0)
            if f0 == 0 and cfg.warn_slow:
                _warn_if_slow(time.perf_counter() - started, f1, cfg.num_masks)
            if cfg.tol is not None and (f1 >= _AUTO_MIN_MASKS or f1 == cfg.num_masks):
                used, error = f1, acc.rel_error(f1)
                if error <= cfg.tol:
                    break
    saliency = resize_saliency(input, acc.result(used), resize, resize_mode)
    if not return_info:
        return saliency
    converged = cfg.tol is None or (error is not None and error <= cfg.tol)
    return saliency, RiseInfo(used, error, converged, time.perf_counter() - started)


def _warn_if_slow(seconds: float, done: int, total: int) -> None:
    """Warn once per process when the default run will take over :data:`SLOW_CPU_SECONDS`."""
    global _warned_slow
    predicted = seconds * total / done
    if _warned_slow or predicted <= SLOW_CPU_SECONDS:
        return
    _warned_slow = True
    warn_caller(
        f"rise: the default {total} masks will take about {predicted / 60:.0f} min per call on "
        f"this CPU (measured on the first {done}); pass num_masks='auto' to stop when the map "
        "has converged (typically a fraction of the masks; see RiseInfo with return_info=True), "
        "autocast=torch.bfloat16 for faster forward passes, or a smaller num_masks (1000 to "
        "2000 give a usable map)", SlowRiseWarning)


def rise_class(*args: Any, target: Any = None, **kwargs: Any) -> torch.Tensor:
    """RISE maps of the ``target`` classes only, ``(N, 1, *spatial)`` (TorchRay's name).

    Same arguments as :func:`rise`; ``target`` (an int or one class per sample) is required.
    """
    if target is None and len(args) >= 3:
        target, args = args[2], args[:2] + args[3:]
    if target is None:
        raise ValueError("rise_class needs a target: an int or one class per sample")
    if len(args) < 2:
        raise TypeError("rise_class needs the model and the input")
    return rise(args[0], args[1], target, *args[2:], **kwargs)
