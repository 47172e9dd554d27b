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
  dropped (:mod:`.rise_masks`).  Upsampling then cropping is separable, so a mask is a few small
  matrix products with the rows of the upsampling matrices (``interpolate``'s weights) that the
  crop keeps.  A bank from :func:`generate_masks` with the same seed holds exactly the masks
  :func:`rise` draws, so a whole data set can be explained with one bank.
* The masks are shared by every image of the batch; the forward batches hold
  ``batch_size // N`` masks × ``N`` images (or ``batch_size`` images × 1 mask when
  ``N > batch_size``).  Scores are folded into the maps with one matrix product
  ``scoresᵀ @ masks`` per 64 masks or so (fewer when ``batch_size`` is small), scaled on the
  way, so the method costs its forward passes.  Peak memory: one batch of masked inputs and the
  model's activations for it, the masks of one fold (at most about one more batch), and the maps
  ``(N, K, *spatial)`` — whatever ``num_masks`` is.
* Images ``(N, C, H, W)`` with several channels are masked straight into channels-last batches,
  on which CPU convolutions run 1.2–1.5× faster; the first batch checks that the model gives the
  same output on that layout (else contiguous batches are used; see :class:`_Scorer`).
* The target is parsed once, at entry (:func:`~.targets.parse_target`): class indices, or a
  callable scoring each masked input, exactly as for the backpropagation methods; the class
  range is checked once, after the first forward pass.
* ``num_masks="auto"`` / ``tol``: the map returned is a control-variate estimate of the same
  expectation, and the rule stops when each map's estimated correlation with its converged
  map reaches ``1 - tol`` (:mod:`.rise_stopping`).
* Everything runs under :func:`torch.no_grad` (not ``inference_mode``, which would leave
  inference tensors in a model that materialises ``Lazy*`` parameters or caches buffers in its
  forward pass) with the model in eval mode (its ``training`` flags are restored afterwards,
  also on errors); the global RNG is never used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .arguments import (
    check_batch,
    check_flag,
    check_number,
    check_progress,
    check_resize,
    positive_int,
)
from .context import TorchRayDifferenceWarning
from .inputs import ChannelsLastBatches
from .maps import resize_saliency, samples_text, warn_degenerate
from .modules import check_model
from .precision import autocast_forward, check_autocast
from .reporting import progress_bar, warn_caller
from .rise_masks import MaskBank, MaskSampler, check_bank, check_cells, check_p, generate_masks
from .rise_stopping import ControlVariates
from .seeding import GeneratorType, make_generator
from .state import model_state_guard
from .targets import SCORES, SEED_NOT_A_SCORE, Target, parse_target

__all__ = ["rise", "rise_class", "generate_masks", "RiseInfo", "RISE_SCORES",
           "RISE_NORMALIZATIONS", "DEFAULT_NUM_MASKS", "DEFAULT_TOL", "SlowRiseWarning"]

#: Names accepted by ``rise(score=...)``.
RISE_SCORES = SCORES
#: Names accepted by ``rise(normalize=...)``: the paper's ``1 / (N p)`` (with the softmax by
#: default) or TorchRay's ``1 / N`` (with the sigmoid by default).
RISE_NORMALIZATIONS = ("paper", "torchray")

ScoreType = Union[str, Callable[[Any], torch.Tensor]]

# Fold the scores into the maps at least this many masks at a time (see _MapAccumulator).
_MIN_FOLD = 64
#: TorchRay's default number of masks (also the cap of ``num_masks="auto"``).
DEFAULT_NUM_MASKS = 8000
#: Tolerance of ``num_masks="auto"``: stop when every map's estimated correlation with its
#: converged (infinite-mask) map is at least ``1 - tol`` = 0.985 (:mod:`.rise_stopping`;
#: ``benchmarks/rise_convergence.py``).
DEFAULT_TOL = 0.015
# The stopping rule never stops before this many masks: below, the variance estimate itself is
# too noisy to trust.
_AUTO_MIN_MASKS = 256
# ... and checks at most every this many masks (whatever the fold: a tiny batch_size makes
# tiny folds, and a check costs about one fold of one class).
_CHECK_EVERY = 64
#: A CPU run with the default 8000 masks that is predicted to take longer than this many seconds
#: warns once per process (:class:`SlowRiseWarning`).
SLOW_CPU_SECONDS = 120.0


class SlowRiseWarning(UserWarning):
    """A CPU run of RISE with the default 8000 masks will take minutes per call.

    Given once per process: :attr:`given` says whether it has been (set it back to ``False``
    to hear it again).
    """

    given: bool = False


@dataclass(frozen=True)
class RiseInfo:
    """What one :func:`rise` call did (``return_info=True``).

    Attributes
    ----------
    num_masks : int
        Masks used: ``num_masks`` when fixed, fewer when ``num_masks="auto"`` / ``tol`` stopped
        early.
    rel_error : float or None
        The stopping statistic at the end: ``1 -`` the smallest estimated correlation of a map
        (that counts) with its converged map (see :func:`rise`, ``tol``); ``None`` when no
        tolerance was given.
    converged : bool
        Whether ``rel_error <= tol`` (always ``True`` without a tolerance).
    seconds : float
        Wall-clock time of the call.
    correlation : tuple of float or None
        With a tolerance, the estimated correlation of each map (``(N, K)`` flattened, image
        major) with its converged map; ``None`` without one.
    """

    num_masks: int
    rel_error: Optional[float]
    converged: bool
    seconds: float
    correlation: Optional[Tuple[float, ...]] = None


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _check_target(target: Any, input: torch.Tensor, score: Any) -> Target:
    """The target parsed once: every class (``None``), class indices (on the input's device),
    or a callable that scores the masked inputs itself."""
    parsed = parse_target(target, input.shape[0], allow_none=True, device=input.device)
    if parsed.kind == "seed":
        raise ValueError(f"rise: {SEED_NOT_A_SCORE}")
    if parsed.kind == "callable" and score is not None:
        raise ValueError(
            "rise: score= says how class indices are scored; a callable target gives its own "
            "scores — pass one or the other")
    return parsed


def _check_score(score: Any, normalize: Any) -> ScoreType:
    """``score``, with the default of the normalisation (softmax for the paper's, sigmoid for
    TorchRay's)."""
    if normalize not in RISE_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {RISE_NORMALIZATIONS}, got {normalize!r}")
    if score is None:
        return "softmax" if normalize == "paper" else "sigmoid"
    if not (callable(score) or (isinstance(score, str) and score in RISE_SCORES)):
        raise ValueError(
            f"score must be one of {', '.join(repr(s) for s in RISE_SCORES)} or a callable "
            f"output -> (batch, K) scores, got {score!r}")
    return score


def _check_count(num_masks: Any, tol: Any) -> Tuple[Optional[int], Optional[float]]:
    """``(num_masks, tol)``: ``"auto"`` is the default tolerance with no count (the cap)."""
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
    return num_masks, tol


def _mask_source(input: torch.Tensor, bank: Any, num_masks: Optional[int],
                 num_cells: Any, p: float, generator: Any, normalize: str) -> Tuple[Any, int]:
    """Where the masks come from — a bank given by the caller (``filter_masks``), or fresh
    draws — and how many are used."""
    if bank is not None:
        count = check_bank(bank, input, num_masks, p, check_mean=normalize == "paper")
        return MaskBank(bank), count
    count = DEFAULT_NUM_MASKS if num_masks is None else num_masks
    cells = check_cells(num_cells, input.dim() - 2)
    return MaskSampler(count, tuple(input.shape[2:]), cells, p, make_generator(generator)), count


@dataclass(frozen=True)
class _Config:
    """The validated arguments of one call, built by keyword (every check runs before any
    forward pass)."""

    target: Target                    # parsed once: None, class indices or a callable
    score: ScoreType
    num_masks: int
    batch_size: int
    scale: float                      # 1 / (N p) or 1 / N
    source: Any                       # MaskSampler or MaskBank
    tol: Optional[float]              # stopping tolerance (num_masks is then the cap)
    autocast: Optional[torch.dtype]
    warn_slow: bool                   # the default 8000 masks on the CPU: maybe warn
    progress: Optional[bool]
    resize: Any
    resize_mode: str
    return_info: bool


def _configure(model: Any, input: Any, target: Any, *, seed: Any, num_masks: Any,
               num_cells: Any, filter_masks: Any, batch_size: Any, p: Any, resize: Any,
               resize_mode: Any, score: Any, normalize: Any, generator: Any, progress: Any,
               tol: Any, autocast: Any, return_info: Any) -> _Config:
    """Check every argument of :func:`rise` and build the configuration by keyword; the
    random draws of the masks are made last, once everything else is valid."""
    # RISE never differentiates: inference tensors are fine, Lazy and meta ones are not.
    check_model(model, needs_autograd=False, method="rise")
    check_batch(model, input, "rise", needs_grad=False)
    parsed = _check_target(target, input, score)
    score = _check_score(score, normalize)
    count, tol = _check_count(num_masks, tol)
    p = check_p(p)
    progress = check_progress(progress)
    batch_size = positive_int(batch_size, "batch_size")
    autocast = check_autocast(autocast, input.device)
    resize = check_resize(resize, resize_mode, input.dim() - 2)
    return_info = check_flag(return_info, "return_info")
    # generator wins; seed (TorchRay's) is used when no generator is given.
    source, count = _mask_source(input, filter_masks, count, num_cells, p,
                                 generator if generator is not None else seed, normalize)
    defaulted = num_masks is None and isinstance(source, MaskSampler)
    return _Config(
        target=parsed, score=score, num_masks=count, batch_size=batch_size,
        scale=1.0 / (count * p) if normalize == "paper" else 1.0 / count, source=source,
        tol=tol, autocast=autocast, progress=progress, resize=resize, resize_mode=resize_mode,
        return_info=return_info,
        warn_slow=defaulted and tol is None and input.device.type == "cpu")
# ---------------------------------------------------------------------------------------------
# RISE
# ---------------------------------------------------------------------------------------------


class _MapAccumulator:
    """Folds the scores of the masked inputs into the maps, ``S += scale · scoresᵀ @ masks``.

    Scores and masks are staged for ``fold`` masks, then folded with one matrix product: a
    product with a short inner dimension would re-read and re-write the maps for every forward
    batch (costly with 1000 classes).  The first fold overwrites the uninitialised maps
    (``beta=0``: no zeroing pass) and the scale rides along (``alpha``: no final pass).
    With a stopping rule the maps hold plain sums, and :class:`~.rise_stopping.ControlVariates`
    the running sums of the lower-variance estimate returned (``cells``: the staged grids).
    """

    def __init__(self, input: torch.Tensor, cfg: _Config, fold: int,
                 dtype: torch.dtype) -> None:
        self.n_img = input.shape[0]
        self.spatial = tuple(input.shape[2:])
        self.pixels = math.prod(self.spatial)
        self.cfg, self.fold, self.dtype, self.device = cfg, fold, dtype, input.device
        self.masks = torch.empty(fold, self.pixels, dtype=dtype, device=self.device)
        self.maps: Optional[torch.Tensor] = None
        self.lhs: Optional[torch.Tensor] = None
        self.low: Optional[torch.Tensor] = None    # each row's smallest and largest score
        self.high: Optional[torch.Tensor] = None
        # With tol: the control variates, a work buffer like the maps, the staged grids.
        self.cv: Optional[ControlVariates] = None
        self.work: Optional[torch.Tensor] = None
        self.sampler = cfg.source if isinstance(cfg.source, MaskSampler) else None
        self.cells: Optional[torch.Tensor] = None
        if cfg.tol is not None and self.sampler is not None:
            self.cells = torch.empty(fold, self.sampler.num_cell_values, dtype=dtype,
                                     device=self.device)
        self.checked_at = 0       # masks at the last estimate
        self.num_classes = 0
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)

    def stage_masks(self, offset: int, masks: torch.Tensor, start: int) -> torch.Tensor:
        """Keep masks ``offset : offset + len(masks)`` of the fold (masks ``start :`` of the
        stream); return them as a view."""
        n = masks.shape[0]
        flat = self.masks[offset:offset + n]
        flat.copy_(masks.view(n, self.pixels))
        if self.cells is not None:
            assert self.sampler is not None
            self.cells[offset:offset + n] = self.sampler.cells_centered(
                start, start + n, self.device, self.dtype)
        return flat

    def stage_scores(self, offset: int, i0: int, scores: torch.Tensor) -> None:
        """Scores ``(masks, images, K)`` of images ``i0 :`` under masks ``offset :`` (``K`` is
        1 with a target)."""
        mb, gi, k = scores.shape
        if self.maps is None:
            self._allocate(k)
        elif k != self.num_classes:
            raise ValueError(
                f"the score has {k} classes in one forward batch and {self.num_classes} in "
                "another")
        self.finite &= torch.isfinite(scores).all()
        assert self.lhs is not None
        # lhs row (image i, class c), column j: the score under mask offset + j.
        block = scores.permute(1, 2, 0).reshape(gi * k, mb)
        self.lhs[i0 * k:(i0 + gi) * k, offset:offset + mb] = block
        # The range of each row's scores: a row whose scores never vary makes a map of the
        # masks' coverage alone (see check_varied).
        assert self.low is not None and self.high is not None
        torch.minimum(self.low[i0 * k:(i0 + gi) * k], block.amin(1),
                      out=self.low[i0 * k:(i0 + gi) * k])
        torch.maximum(self.high[i0 * k:(i0 + gi) * k], block.amax(1),
                      out=self.high[i0 * k:(i0 + gi) * k])

    def _allocate(self, k: int) -> None:
        self.num_classes = k
        rows = self.n_img * k
        self.maps = torch.empty(rows, self.pixels, dtype=self.dtype, device=self.device)
        if self.cfg.tol is not None:
            self.work = torch.empty_like(self.maps)
            sampler = self.sampler
            self.cv = ControlVariates(
                rows, k, self.pixels,
                None if sampler is None else sampler.cell_covariance(self.device, self.dtype),
                None if sampler is None else sampler.p, self.dtype, self.device)
        self.lhs = torch.empty(rows, self.fold, dtype=self.dtype, device=self.device)
        self.low = torch.full((rows,), math.inf, dtype=self.dtype, device=self.device)
        self.high = torch.full((rows,), -math.inf, dtype=self.dtype, device=self.device)

    def check_varied(self) -> None:
        """Warn (:class:`~.maps.DegenerateMapWarning`) for the images whose every score was
        the same under every mask: their map is that score times the masks' coverage."""
        if self.low is None or self.high is None or self.cfg.num_masks < 2:
            return
        same = (self.low == self.high).view(self.n_img, -1).all(1)
        if not bool(same.any()):
            return
        rows = same.nonzero().flatten().tolist()
        value = self.low.view(self.n_img, -1)[rows[0], 0].item()
        warn_degenerate(
            f"rise: the target's score is the same under every mask for sample(s) "
            f"{samples_text(rows)} (sample {rows[0]}: {value:.4g}): the map is that score times "
            "the masks' coverage (mask noise), not an attribution; the score does not depend on "
            "the input there, masking leaves the image unchanged (an all-zero image), or a "
            "step, rounding or a saturated sigmoid/softmax hides the change (explain the "
            "logit: score='logit')")

    def fold_in(self, first: bool, n: int) -> None:
        """Add the staged ``n`` masks to the maps."""
        assert self.maps is not None and self.lhs is not None
        if not bool(self.finite):
            raise ValueError(
                "rise: the model's scores are not finite (NaN or inf) for some masked inputs; "
                "check the model on inputs with zeroed regions (x * mask)")
        beta = 0 if first else 1
        if self.cv is None:
            self.maps.addmm_(self.lhs[:, :n], self.masks[:n], beta=beta, alpha=self.cfg.scale)
            return
        # With a stopping rule the final count is unknown: keep plain sums, and the running
        # sums of the control variates.
        self.maps.addmm_(self.lhs[:, :n], self.masks[:n], beta=beta)
        self.cv.add(self.lhs[:, :n], self.masks[:n],
                    None if self.cells is None else self.cells[:n])

    def rel_error(self, n: int) -> Tuple[float, torch.Tensor]:
        """The stopping statistic after ``n`` masks: ``1 -`` the smallest estimated
        correlation of a map that counts with its converged map, and every map's estimate
        (:meth:`~.rise_stopping.ControlVariates.estimate`)."""
        assert self.maps is not None and self.cv is not None and self.work is not None
        self.checked_at = n
        return self.cv.estimate(self.maps, self.work)

    def result(self, n: int) -> torch.Tensor:
        assert self.maps is not None
        maps = self.maps
        if self.cv is not None:
            assert self.work is not None
            if self.checked_at != n:
                self.rel_error(n)
            # scale · num_masks is the normalisation per mask (1 / p, or 1 for "torchray").
            maps = self.cv.finish(self.work, self.cfg.scale * self.cfg.num_masks)
        return maps.view((self.n_img, maps.shape[0] // self.n_img) + self.spatial)


class _Scorer:
    """Runs the model on masked copies of a group of images and reads the target's scores.

    Images ``(N, C, H, W)`` are masked straight into a channels-last batch: oneDNN's
    convolutions run 1.2× (float32) to 1.5× (bfloat16) faster on it than on the contiguous
    layout on CPUs (``benchmarks/speed_rise.py``), and the layout changes no operator's result.
    The first forward batch checks that: two of its rows are also run contiguous and the scores
    must agree (a model that fails on, or disagrees with, the layout — a ``view`` of its
    activations, a custom kernel reading raw memory — is run contiguous from then on).
    """

    def __init__(self, model: nn.Module, input: torch.Tensor, cfg: _Config,
                 dtype: torch.dtype) -> None:
        self.model, self.input, self.cfg, self.dtype = model, input, cfg, dtype
        self.x = input.detach()
        self.first = True
        self.layout = ChannelsLastBatches(input, 0, reduced=cfg.autocast is not None)
        self.rows: Dict[Tuple[int, int, int], torch.Tensor] = {}

    def masked(self, masks: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
        """The batch ``x[i] ⊙ masks[j]``, mask-major (row ``j·gi + i``), channels-last when
        that layout is in use."""
        x = self.x[None, i0:i1]
        rows = masks.shape[0] * (i1 - i0)
        if not self.layout.channels_last:
            return (x * masks[:, None]).view((rows,) + self.x.shape[1:])
        c, h, w = self.x.shape[1:]
        out = torch.empty((rows, h, w, c), dtype=self.x.dtype, device=self.x.device)
        out = out.permute(0, 3, 1, 2)
        torch.mul(x, masks[:, None], out=out.view((masks.shape[0], i1 - i0, c, h, w)))
        return out

    def __call__(self, masks: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
        """Scores ``(masks, images, K)`` of images ``i0:i1`` under ``masks`` ``(M, 1, ...)``;
        ``K`` is 1 with a target.  The class range is checked once, after the first pass."""
        mb = masks.shape[0]
        batch = self.masked(masks, i0, i1)
        with autocast_forward(self.cfg.autocast, self.input.device):
            # The first batch also decides the layout (see the class notes).
            output = self.layout.forward(self.model, batch, self.input)
        key = (i0, i1, mb)
        if key not in self.rows:
            self.rows[key] = torch.arange(i0, i1, device=self.input.device).repeat(mb)
        scores = self.cfg.target.scores(output, self.cfg.score, samples=self.rows[key],
                                        dtype=self.dtype, check_range=self.first, name="rise")
        self.first = False
        return scores.view(mb, i1 - i0, -1)


def _run(model: nn.Module, input: torch.Tensor, cfg: _Config, started: float
         ) -> Tuple[torch.Tensor, int, Optional[float], Optional[torch.Tensor]]:
    """The forward passes: ``(maps, masks used, final error, estimated correlations)``.

    Under :func:`torch.no_grad`, not :func:`torch.inference_mode`: parameters that a ``Lazy*``
    module materialises, or a buffer the forward pass caches (RoPE tables, anchors), would
    otherwise stay inference tensors in the model and break its later use with autograd.
    """
    n_img = input.shape[0]
    # Masks and maps in at least single precision (the masked inputs in the input's dtype).
    dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    group = min(n_img, cfg.batch_size)            # images per forward batch
    per_batch = max(1, cfg.batch_size // group)   # masks per forward batch
    # A fold holds at most about one forward batch of masked inputs (batch_size × channels ×
    # pixels values), and whole forward batches.
    want = min(_MIN_FOLD, cfg.batch_size * input.shape[1])
    fold = min(cfg.num_masks, per_batch * max(1, -(-want // per_batch)))
    if cfg.tol is not None:
        # Folds that tile the checks (a power of two up to _CHECK_EVERY, forward batches cut at
        # their ends): the rule checks at the same counts, so stops at the same map, whatever
        # batch_size is.
        fold = _CHECK_EVERY if fold >= _CHECK_EVERY else 1 << (fold.bit_length() - 1)
    acc = _MapAccumulator(input, cfg, fold, dtype)
    scorer = _Scorer(model, input, cfg, dtype)
    used, error, rho = cfg.num_masks, None, None
    next_check = _AUTO_MIN_MASKS
    with model_state_guard(model, freeze=False), torch.no_grad(), \
            progress_bar(cfg.num_masks, cfg.progress, "RISE", unit="mask") as bar:
        for f0 in range(0, cfg.num_masks, fold):
            f1 = min(f0 + fold, cfg.num_masks)
            for start in range(f0, f1, per_batch):
                stop = min(start + per_batch, f1)
                m = acc.stage_masks(start - f0, cfg.source.masks(start, stop, input.device,
                                                                 dtype), start)
                m = m.view((stop - start, 1) + acc.spatial).to(input.dtype)
                for i0 in range(0, n_img, group):
                    i1 = min(i0 + group, n_img)
                    acc.stage_scores(start - f0, i0, scorer(m, i0, i1))
                bar.update(stop - start)
            acc.fold_in(f0 == 0, f1 - f0)
            if f0 == 0 and cfg.warn_slow:
                _warn_if_slow(time.perf_counter() - started, f1, cfg.num_masks)
            if cfg.tol is not None and (f1 >= next_check or f1 == cfg.num_masks):
                used, (error, rho) = f1, acc.rel_error(f1)
                next_check = f1 + _CHECK_EVERY
                if error <= cfg.tol:
                    break
    acc.check_varied()
    return acc.result(used), used, error, rho


def rise(model: nn.Module, input: torch.Tensor, target: Any = None, seed: Optional[int] = 0,
         num_masks: Union[int, str, None] = None, num_cells: Union[int, Sequence[int]] = 7,
         filter_masks: Optional[torch.Tensor] = None, batch_size: int = 32, p: float = 0.5,
         resize: Any = False, resize_mode: str = "bilinear", *,
         score: Optional[ScoreType] = None, normalize: str = "paper",
         generator: GeneratorType = None, progress: Optional[bool] = None,
         tol: Optional[float] = None,
         autocast: Optional[torch.dtype] = None, return_info: bool = False) -> Any:
    r"""RISE saliency maps (Petsiuk, Das, Saenko, BMVC 2018, arXiv 1806.07421).

    :math:`S_c = \frac{1}{N p} \sum_i f_c(x \odot M_i)\, M_i` over ``N = num_masks`` random
    masks (see the module docstring for how masks are drawn).  The arguments up to
    ``resize_mode`` are TorchRay's, in its order (positional use works); the rest are
    keyword-only.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier.  It runs in eval mode under :func:`torch.no_grad`; its ``training``
        flags are restored afterwards (also when it raises).  A model on the ``meta`` device
        is refused.
    input : torch.Tensor
        ``(N, C, *spatial)`` floating batch, 1 to 3 spatial dimensions, finite.  Masks are
        applied as ``x ⊙ M`` (the masked-out value is 0, e.g. the mean colour of normalised
        images).  A channels-last batch is refused, and a model failing on an unbatched image
        says so (with the ``permute`` / ``unsqueeze`` to apply).
    target : None, int, sequence, 1-D integer tensor or array, or callable
        ``None``: maps for every class, ``(N, K, *spatial)``.  An int (every sample) or one class
        per sample (NumPy integers and integer arrays too): ``(N, 1, *spatial)``.  A callable
        ``output -> (B,)``: the map of that score, ``(N, 1, *spatial)``, for any output (a
        dict, a tuple, a score map to pool); it is called on batches of ``B`` masked copies of
        the images, so it must score each row on its own (e.g. ``lambda out:
        out["logits"].softmax(1)[:, 3]``), and ``score`` does not apply.
    seed : int or None
        TorchRay's seed of the masks, used when ``generator`` is not given (``generator`` wins).
        The default 0 makes calls reproducible, as in TorchRay; ``None`` (with no generator)
        derives the seed from the global RNG state without advancing it.
    num_masks : int, "auto" or None
        Number of masks; ``None``: 8000 (TorchRay's default), or with a bank all its masks (an
        int takes the bank's first ``num_masks``).  ``"auto"``: stop as soon as the maps have
        converged (``tol``, default 0.015: an estimated correlation of 0.985 with the
        converged map), at most 8000 masks (or the bank's); with ``tol`` given, an int is the
        cap.  On the CPU a run of the default 8000 masks that will take
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
        indexes its ``K`` columns (a callable ``target`` is the simpler way to one score).
        Single-logit binary heads (output ``(batch,)`` or ``(batch, 1)``) have two classes: 1
        scores ``sigmoid(z)`` and 0 scores ``1 - sigmoid(z)`` (the two-class softmax with
        logits ``∓z/2``); with "logit", ``z`` and ``-z``.
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
    tol : float, optional
        The stopping rule, in ``(0, 1]`` (:mod:`~torchray_like.attribution.rise_stopping`).
        *Estimator*: with a tolerance the map returned is the control-variate (regression)
        estimate of the same expectation as the plain map — the scores are regressed on the
        masks' grid cells by least squares, and the part of the map that the regression
        explains is added from its exact expectation instead of being sampled; the
        mask-coverage noise of the plain sum goes too (with a bank: the mean score only).  Its
        expectation is the plain map's up to ``O(1/N)``, so it is not the fixed-count map of
        the same masks, only closer to their limit.  *Rule*: every 64 masks (from 256 on; the
        same counts whatever ``batch_size``) the correlation of each map with its converged
        (infinite-mask) map is estimated as :math:`\hat\rho = \sqrt{1 - \hat\nu / s^2}`
        (:math:`s^2` the map's spatial variance, :math:`\hat\nu` the spatial variance of its
        Monte-Carlo noise, from running sums), and RISE stops when :math:`\hat\rho \ge 1 -
        tol` for every map — with ``target=None``, every map whose estimated signal is at
        least half of its image's strongest (near-flat maps of absent classes are not waited
        for; pass the classes as ``target`` to hold them to the rule).  *Batches*: the count
        is the batch's, that of its slowest map (the masks are shared), so an image's map in a
        batch is its single call with ``num_masks`` that count and a ``tol`` it cannot reach,
        not its own ``"auto"`` call (which may stop sooner).  *Guarantee*: an
        estimate, not a bound: it assumes independent masks and treats the noise as
        independent of the signal, and a map can stop just above the threshold by chance —
        hence the default 0.015, a margin of 0.005 over the 0.98 aimed at.  Measured on the
        embedded models (24 test images, the 38 ground-truth class maps, one call per class):
        every map correlated at least 0.980 with its converged map (the same 8 000 masks'
        estimate; median 0.99) with 1 880 masks on average (ResNet; median 1 344) and 1 305
        (VGG; median 896).  Against the plain 8 000-mask map the median is 0.985, but that map
        is itself a Monte-Carlo estimate (as low as 0.95 with its limit on the hardest
        image), so no map of fewer masks reaches 0.98 with it there
        (``benchmarks/rise_convergence.py``; see the docs' speed page).  Memory: besides the
        maps, a buffer like them and ``2 × cells × pixels`` values (the cells' sums and their
        exact covariance with the masks; 20 MB for 7 × 7 cells at 224²).  Cost: the checks
        and sums took 2–4 % of the time on the embedded models (64², 8 classes).
    autocast : torch.dtype, optional
        ``torch.bfloat16`` (CPUs and GPUs) or ``torch.float16`` (GPUs): run the forward passes
        under :class:`torch.autocast` to that dtype; scores, masks and maps stay in float32.
        On CPUs with bfloat16 support about 1.8× faster than float32, and 2.3–2.5× faster
        than TorchRay's RISE (ResNet-18, VGG-11, CPU time; ``benchmarks/speed_rise.py``), with
        map correlations above 0.999 to float32.
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
        out of the classes' range, a seed-gradient target, a callable target with ``score``,
        ``tol``, ``autocast``, a model on the meta device, a channels-last batch or an unbatched
        image the model fails on, and a model whose scores are not finite.
    """
    started = time.perf_counter()
    cfg = _configure(model, input, target, seed=seed, num_masks=num_masks, num_cells=num_cells,
                     filter_masks=filter_masks, batch_size=batch_size, p=p, resize=resize,
                     resize_mode=resize_mode, score=score, normalize=normalize,
                     generator=generator, progress=progress, tol=tol,
                     autocast=autocast, return_info=return_info)
    if filter_masks is not None and score is None and normalize == "paper":
        # TorchRay's own argument, with our defaults: a ported TorchRay call.
        warn_caller(
            "rise: filter_masks given with the default score and normalisation — the paper's "
            "softmax and 1 / (N p) — while TorchRay's rise averages the sigmoid and divides "
            "by N (relative difference about 0.5); pass normalize='torchray' for TorchRay's "
            "numbers (it implies score='sigmoid'), or score='softmax' to say you want the "
            "paper's", TorchRayDifferenceWarning)
    maps, used, error, rho = _run(model, input, cfg, started)
    saliency = resize_saliency(input, maps, cfg.resize, cfg.resize_mode)
    if not cfg.return_info:
        return saliency
    converged = cfg.tol is None or (error is not None and error <= cfg.tol)
    corr = None if rho is None else tuple(float(r) for r in rho.tolist())
    return saliency, RiseInfo(used, error, converged, time.perf_counter() - started, corr)


def _warn_if_slow(seconds: float, done: int, total: int) -> None:
    """Warn once per process when the default run will take over :data:`SLOW_CPU_SECONDS`."""
    predicted = seconds * total / done
    if SlowRiseWarning.given or predicted <= SLOW_CPU_SECONDS:
        return
    SlowRiseWarning.given = True
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
