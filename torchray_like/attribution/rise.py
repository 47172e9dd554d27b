r"""RISE: randomized input sampling for explanation.

Petsiuk, Das, Saenko, "RISE: Randomized input sampling for explanation of black-box models",
BMVC 2018 (arXiv 1806.07421).

The model is run on ``N`` randomly masked copies ``x ⊙ M_i`` of the input and the saliency of
class ``c`` is the score-weighted average of the masks,

.. math::

    S_c = \frac{1}{N \, p} \sum_{i=1}^{N} f_c(x \odot M_i) \, M_i ,

a Monte-Carlo estimate of :math:`E[f_c(x \odot M) \, M] / p`, i.e. of
:math:`E[f_c(x \odot M) \mid M(\lambda) = 1]` per pixel for binary masks.  Each mask is a binary
grid of ``num_cells`` cells per side whose cells are kept with probability ``p``, upsampled
(linear / bilinear / trilinear by rank) to ``(num_cells + 1) × cell_size`` with
``cell_size = ceil(side / num_cells)``, and cropped at a random shift in ``[0, cell_size)`` per
dimension — soft-edged masks placed at every sub-cell offset.  Every pixel of a mask has
expectation exactly ``p`` (interpolation is a convex combination of cells).

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
  ``scoresᵀ @ masks`` per 64 masks or so (fewer when ``batch_size`` is small), scaled by
  ``1 / (N p)`` on the way, so the method costs its forward passes.  Peak memory: one batch of
  masked inputs and the model's activations for it, the masks of one fold (at most about one
  more batch), and the maps ``(N, K, *spatial)`` — whatever ``num_masks`` is.
* Everything runs under :func:`torch.inference_mode` with the model in eval mode (its
  ``training`` flags are restored afterwards, also on errors); the global RNG is never used.
"""

from __future__ import annotations

import hashlib
import math
from numbers import Integral, Real
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .maps import resize_saliency
from .state import check_input, check_model, model_state_guard
from .targets import check_class_range, class_indices

__all__ = ["generate_masks", "rise", "rise_class", "RISE_SCORES"]

#: Names accepted by ``rise(score=...)``.
RISE_SCORES = ("softmax", "sigmoid", "logit")

ScoreType = Union[str, Callable[[Any], torch.Tensor]]
GeneratorType = Union[torch.Generator, int, None]

# The random draws are made in blocks of this many masks: bounded temporary memory, and a stream
# of draws that does not depend on batch_size (so the masks do not either).
_DRAW_BLOCK = 4096
# Fold the scores into the maps at least this many masks at a time (see rise).
_MIN_FOLD = 64


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


# MOVE-TO-COMMON: _positive_int (generic argument check, extremal perturbation needs it too).
def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")
    return int(value)


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
            isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in size):
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
        return tuple(_positive_int(s, "num_cells") for s in num_cells)
    return (_positive_int(num_cells, "num_cells"),) * rank


# MOVE-TO-COMMON: _resolve_generator — every randomised method (extremal perturbation's jitter)
# should take a generator / seed / None the same way and leave the global RNG alone.
def _resolve_generator(generator: GeneratorType, seed: Optional[int] = None) -> torch.Generator:
    """A private generator for the draws; the global RNG is neither used nor advanced."""
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either generator or seed (an alias of generator=int), not both")
        generator = seed
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        # Derived from the global RNG state without advancing it: reproducible under
        # torch.manual_seed, and successive calls use the same masks (as one bank would).
        state = torch.get_rng_state().numpy().tobytes()
        generator = int.from_bytes(hashlib.sha256(state).digest()[:8], "little")
    if isinstance(generator, bool) or not isinstance(generator, Integral):
        raise TypeError(
            f"generator must be a torch.Generator, an int seed or None, got "
            f"{type(generator).__name__}")
    if not 0 <= generator < 2 ** 64:
        raise ValueError(f"an int seed must be in [0, 2**64), got {generator!r}")
    return torch.Generator(device="cpu").manual_seed(int(generator))


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
    num_masks = _positive_int(num_masks, "num_masks")
    size = _check_size(input_size)
    cells = _check_cells(num_cells, len(size))
    p = _check_p(p)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device("cpu" if device is None else device)
    sampler = _MaskSampler(num_masks, size, cells, p, _resolve_generator(generator))
    return sampler.masks(0, num_masks, device, dtype)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


# MOVE-TO-COMMON: _scores — class scores (softmax / sigmoid / logit / callable) with the
# binary-head convention of get_backward_gradient; deletion / insertion games need the same.
def _scores(output: Any, score: ScoreType, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """Turn the model output of one forward batch into ``(batch, K)`` scores."""
    if callable(score):
        s = score(output)
        if not isinstance(s, torch.Tensor):
            raise TypeError(
                f"a callable score must return a tensor of shape ({batch}, K), got "
                f"{type(s).__name__}")
        if s.dim() == 1:
            s = s[:, None]
        if s.dim() != 2 or s.shape[0] != batch:
            raise ValueError(
                f"a callable score must return ({batch}, K) or ({batch},) scores for a forward "
                f"batch of {batch}, got shape {tuple(s.shape)}")
        return s.to(dtype)
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the model returned a {type(output).__name__}, not a tensor of class scores: pass "
            "score=callable mapping the output to (batch, K) scores, e.g. "
            "score=lambda out: out['logits'].softmax(1)")
    if output.dim() == 0 or output.shape[0] != batch:
        raise ValueError(
            f"the model output has shape {tuple(output.shape)}, whose first dimension is not the "
            f"forward batch size {batch}")
    z = output.to(dtype)
    if z.dim() == 1 or (z.dim() == 2 and z.shape[1] == 1):
        # Single-logit binary head: two classes, 0 (negative) and 1 (positive).  softmax with
        # logits (-z/2, z/2) is the logistic of z, so "softmax" and "sigmoid" agree here.
        z = z.reshape(batch, 1)
        if score == "logit":
            return torch.cat([-z, z], dim=1)
        return torch.cat([torch.sigmoid(-z), torch.sigmoid(z)], dim=1)
    if z.dim() != 2:
        raise ValueError(
            f"score={score!r} needs (batch, classes) logits, but the model output has shape "
            f"{tuple(output.shape)}; pass score=callable mapping the output to (batch, K) "
            "scores (e.g. pool a score map)")
    if score == "softmax":
        return torch.softmax(z, dim=1)
    if score == "sigmoid":
        return torch.sigmoid(z)
    return z


# ---------------------------------------------------------------------------------------------
# RISE
# ---------------------------------------------------------------------------------------------


def _check_bank(masks: Any, input: torch.Tensor, num_masks: Optional[int], p: float) -> int:
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
    if abs(mean - p) > 0.1 + 2.0 / math.sqrt(num_masks):
        raise ValueError(
            f"the masks have mean value {mean:.3f} but p={p}: pass the p the bank was generated "
            f"with (the maps are divided by p)")
    return num_masks


def rise(model: nn.Module, input: torch.Tensor, target: Any = None, *,
         num_masks: Optional[int] = None, num_cells: Union[int, Sequence[int]] = 7,
         p: float = 0.5, batch_size: int = 32, score: ScoreType = "softmax",
         masks: Optional[torch.Tensor] = None, generator: GeneratorType = None,
         resize: Any = False, resize_mode: str = "bilinear", progress: Optional[bool] = None,
         seed: Optional[int] = None) -> torch.Tensor:
    r"""RISE saliency maps (Petsiuk, Das, Saenko, BMVC 2018, arXiv 1806.07421).

    :math:`S_c = \frac{1}{N p} \sum_i f_c(x \odot M_i)\, M_i` over ``N = num_masks`` random
    masks (see the module docstring for how masks are drawn).  Arguments after ``target`` are
    keyword-only.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier.  It runs in eval mode under :func:`torch.inference_mode`; its
        ``training`` flags are restored afterwards (also when it raises).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating batch, 1 to 3 spatial dimensions.  Masks are applied as
        ``x ⊙ M`` (the masked-out value is 0, e.g. the mean colour of normalised images).
    target : None, int, sequence or 1-D integer tensor
        ``None``: maps for every class, ``(N, K, *spatial)``.  An int (every sample) or one class
        per sample: ``(N, 1, *spatial)``.
    num_masks : int, optional
        Number of masks (default 8000, the paper's order; with ``masks=`` the whole bank, or
        its first ``num_masks``).
    num_cells : int or tuple of int
        Grid cells per side (default 7), or one per spatial dimension.
    p : float
        Probability of keeping a cell, in ``(0, 1]``; the maps are divided by it.  With
        ``masks=`` pass the ``p`` of the bank (a bank whose mean value is far from ``p`` is an
        error).
    batch_size : int
        Most inputs per forward pass.  Peak memory is about that forward batch (masked inputs
        and activations), the masks of one fold (at most about one more batch of inputs) and
        the maps, whatever ``num_masks`` is.
    score : {"softmax", "sigmoid", "logit"} or callable
        What is averaged: the softmax probability (the paper), the sigmoid (multi-label heads),
        the raw logit, or ``callable(output) -> (batch, K)`` (or ``(batch,)``) scores for any
        other output (tuples, dicts, score maps); ``target`` then indexes its ``K`` columns.
        Single-logit binary heads (output ``(batch,)`` or ``(batch, 1)``) have two classes:
        1 scores ``sigmoid(z)`` and 0 scores ``1 - sigmoid(z)`` (for "softmax" and "sigmoid",
        the two-class softmax with logits ``∓z/2``); with "logit", ``z`` and ``-z``.
    masks : torch.Tensor, optional
        A bank ``(M, 1, *spatial)`` from :func:`generate_masks` (any device): skips the draws, so
        a data set can be explained with one bank.  ``num_cells`` and ``generator`` are unused.
    generator : torch.Generator, int or None
        Randomness of the masks: a generator (advanced), an int seed, or ``None`` for a seed
        derived from the global RNG state without advancing it (reproducible under
        :func:`torch.manual_seed`; repeated calls use the same masks).  A seed gives the same
        masks for every ``batch_size`` and on every device (up to float rounding there).
    resize : bool, int or tuple
        Resize the maps (see :func:`~torchray_like.attribution.common.resize_saliency`); they
        are already at the input's size.
    resize_mode : str
        Interpolation mode for ``resize``.
    progress : bool or None
        A tqdm progress bar: ``True`` always, ``False`` never, ``None`` when stderr is a
        terminal and the call lasts more than two seconds.
    seed : int, optional
        Alias of ``generator=int`` (for code written against TorchRay).

    Returns
    -------
    torch.Tensor
        ``(N, K, *spatial)`` (``target=None``) or ``(N, 1, *spatial)`` maps on the input's
        device, in the input's dtype (float32 for half-precision inputs), not requiring grad.

    Raises
    ------
    TypeError, ValueError
        For a non-module model, an integer or wrongly shaped input, bad ``num_masks``,
        ``num_cells``, ``p``, ``batch_size``, ``score``, ``progress``, a masks bank that does not
        match the input, and targets of the wrong length or out of the classes' range.
    """
    if not isinstance(model, nn.Module):
        check_model(model)  # raises the TypeError explaining what to pass
    check_input(input, needs_grad=False)
    rank = input.dim() - 2
    if rank > 3:
        raise ValueError(
            f"input must have 1 to 3 spatial dimensions — (N, C, L), (N, C, H, W) or "
            f"(N, C, T, H, W) — got shape {tuple(input.shape)}")
    if not (callable(score) or score in RISE_SCORES):
        raise ValueError(
            f"score must be one of {', '.join(repr(s) for s in RISE_SCORES)} or a callable "
            f"output -> (batch, K) scores, got {score!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
    batch_size = _positive_int(batch_size, "batch_size")
    p = _check_p(p)
    if num_masks is not None:
        num_masks = _positive_int(num_masks, "num_masks")
    n_img = input.shape[0]
    idx = None
    if target is not None:
        if callable(target) and not isinstance(target, torch.Tensor):
            raise TypeError(
                "rise: target must be None, an int or one class per sample; to explain another "
                "quantity pass score=callable(output) -> (batch, K) scores")
        if isinstance(target, torch.Tensor) and (target.is_floating_point()
                                                 or target.is_complex()):
            raise ValueError(
                f"rise: target must hold integer class indices, got a {target.dtype} tensor")
        idx = class_indices(target, n_img, input.device)
    # Check resize before the work (an empty map resizes for free).
    resize_saliency(input, input.new_zeros((0, 1) + (1,) * rank), resize, resize_mode)

    # Masks and maps in at least single precision (the masked inputs in the input's dtype).
    acc_dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    if masks is not None:
        num_masks = _check_bank(masks, input, num_masks, p)

        def get_masks(start: int, stop: int) -> torch.Tensor:
            return masks[start:stop].to(device=input.device, dtype=acc_dtype)
    else:
        num_masks = 8000 if num_masks is None else num_masks
        cells = _check_cells(num_cells, rank)
        sampler = _MaskSampler(num_masks, tuple(input.shape[2:]), cells, p,
                               _resolve_generator(generator, seed))

        def get_masks(start: int, stop: int) -> torch.Tensor:
            return sampler.masks(start, stop, input.device, acc_dtype)

    group = min(n_img, batch_size)           # images per forward batch
    per_batch = max(1, batch_size // group)  # masks per forward batch
    # Scores are folded into the maps every `fold` masks with one matrix product: a product
    # with a short inner dimension would re-read and re-write the maps for every forward batch
    # (costly with 1000 classes).  The fold's masks are kept for it: fold × pixels values, at
    # most about one forward batch of masked inputs (batch_size × channels × pixels).
    want = min(_MIN_FOLD, batch_size * input.shape[1])
    fold = min(num_masks, per_batch * max(1, -(-want // per_batch)))
    spatial = tuple(input.shape[2:])
    pixels = math.prod(spatial)
    scale = 1.0 / (num_masks * p)
    acc: Optional[torch.Tensor] = None
    num_classes = 0
    bar = tqdm(total=num_masks, desc="RISE", unit="mask", disable=None if progress is None
               else not progress, delay=2.0 if progress is None else 0.0, leave=False)
    try:
        with model_state_guard(model, freeze=False), torch.inference_mode():
            x = input.detach()
            mbuf = torch.empty(fold, pixels, dtype=acc_dtype, device=input.device)
            lhs = None
            for f0 in range(0, num_masks, fold):
                f1 = min(f0 + fold, num_masks)
                for start in range(f0, f1, per_batch):
                    stop = min(start + per_batch, f1)
                    mb = stop - start
                    flat = mbuf[start - f0:stop - f0]
                    flat.copy_(get_masks(start, stop).view(mb, pixels))
                    m = flat.view((mb, 1) + spatial).to(input.dtype)
                    for i0 in range(0, n_img, group):
                        i1 = min(i0 + group, n_img)
                        gi = i1 - i0
                        # Mask-major batch: row j * gi + i is image i0 + i under mask start + j.
                        batch = (x[None, i0:i1] * m[:, None]).view((mb * gi,) + x.shape[1:])
                        output = model(batch)
                        s = _scores(output, score, mb * gi, acc_dtype).view(mb, gi, -1)
                        if acc is None:
                            num_classes = int(s.shape[2])
                            if idx is not None:
                                check_class_range(idx, 0, num_classes, _range_message(
                                    num_classes, score, output))
                            rows = n_img * (1 if idx is not None else num_classes)
                            with torch.inference_mode(False):  # the result is a normal tensor
                                acc = torch.empty(rows, pixels, dtype=acc_dtype,
                                                  device=input.device)
                            lhs = torch.empty(rows, fold, dtype=acc_dtype, device=input.device)
                        elif s.shape[2] != num_classes:
                            raise ValueError(
                                f"the score has {s.shape[2]} classes in one forward batch and "
                                f"{num_classes} in another")
                        if idx is not None:
                            sel = idx[i0:i1].view(1, gi, 1).expand(mb, gi, 1)
                            s = s.gather(2, sel)
                        k = s.shape[2]
                        # lhs row (image i, class c), column j: the score under mask f0 + j.
                        lhs[i0 * k:i1 * k, start - f0:stop - f0] = s.permute(1, 2, 0).reshape(
                            gi * k, mb)
                    bar.update(mb)
                n = f1 - f0
                # The first fold overwrites the uninitialised maps (beta=0): no zeroing pass,
                # and the 1 / (N p) normalisation rides along (alpha): no final pass either.
                acc.addmm_(lhs[:, :n], mbuf[:n], beta=0 if f0 == 0 else 1, alpha=scale)
    finally:
        bar.close()
    assert acc is not None
    smap = acc.view((n_img, acc.shape[0] // n_img) + spatial)
    return resize_saliency(input, smap, resize, resize_mode)


def _range_message(num_classes: int, score: ScoreType, output: Any) -> str:
    if not callable(score) and (output.dim() == 1 or output.shape[1] == 1):
        return ("a single-logit (binary) head has two classes: 1 (positive, sigmoid(z)) and 0 "
                "(negative, 1 - sigmoid(z))")
    return f"the scores have {num_classes} classes (valid: 0..{num_classes - 1})"


def rise_class(*args: Any, target: Any = None, **kwargs: Any) -> torch.Tensor:
    """RISE maps of the ``target`` classes only, ``(N, 1, *spatial)`` (TorchRay's name).

    Same arguments as :func:`rise`; ``target`` (an int or one class per sample) is required.
    """
    if target is None:
        raise ValueError("rise_class needs a target: an int or one class per sample")
    return rise(*args, target=target, **kwargs)
