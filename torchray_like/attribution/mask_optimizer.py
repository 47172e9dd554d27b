r"""Optimising an extremal perturbation's masks (Fong, Patrick, Vedaldi, ICCV 2019): the area
constraint by ranking, the unit the reward is measured in, and the preconditioned SGD of the
mask parameters.

* :func:`ranking_area_loss` — the area constraint by ranking, ``‖vecsort(m) − r_a‖²``
  (re-exported by :mod:`.extremal_perturbation`).
* :class:`RewardScale` — the reward in its own unit, so that the balance with the area
  constraint does not depend on the scale of the model's scores.
* :class:`MaskOptimizer` — SGD with momentum on the parameters, preconditioned so that every
  parameter moves at the speed its pixels ask for.
* :class:`ExtremalHistory` — what the optimisation records (re-exported by
  :mod:`.extremal_perturbation`, which returns it).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .smooth_masks import MaskGenerator

__all__ = ["ranking_area_loss", "area_ones", "ranking_loss_and_gradient", "RewardScale",
           "MaskOptimizer", "ExtremalHistory"]


def _period(ones: Tuple[int, ...]) -> int:
    """The shortest period ``K`` of ``ones`` (``ones[b] == ones[b % K]``, ``K`` dividing the
    length): the areas of ``N`` images × ``K`` areas, sample-major."""
    b = len(ones)
    for k in range(1, b + 1):
        if b % k == 0 and ones == ones[:k] * (b // k):
            return k
    return b


_COUNTS: Dict[Tuple[Any, ...], torch.Tensor] = {}


def _counts(ones: Tuple[int, ...], flat: torch.Tensor) -> torch.Tensor:
    """``ones`` as a ``(B, 1)`` tensor like ``flat``, made once per (ones, dtype, device)."""
    key = (ones, flat.dtype, flat.device)
    out = _COUNTS.get(key)
    if out is None:
        if len(_COUNTS) > 64:
            _COUNTS.clear()
        out = _COUNTS[key] = torch.tensor(ones, dtype=flat.dtype, device=flat.device).view(-1, 1)
    return out


def _thresholds(flat: torch.Tensor, ones: Tuple[int, ...]) -> torch.Tensor:
    """``(B, 1)``: the ``ones[b]``-th largest value ``τ`` of each row of ``flat`` (``ones``
    clipped to ``[1, P]``; rows with no or all ones are set apart by the caller).

    A selection, never a sort.  On the CPU one ``numpy.partition`` of all the rows at the
    distinct ranks (no indices, one call: about half the time of a ``kthvalue`` per area);
    elsewhere one ``kthvalue`` per distinct area on a strided view of the rows that share it.
    Either gives an element of the row, the same number (a ``-0.0``/``+0.0`` tie aside,
    which compares the same below).
    """
    b, p = flat.shape
    ones = tuple(min(max(n, 1), p) for n in ones)
    if flat.device.type == "cpu":
        distinct, rank, rows, _ = _ranks(ones, p)
        picked = np.partition(flat.detach().numpy(), distinct, axis=1)[rows, rank]
        return torch.from_numpy(picked).view(b, 1)
    k = _period(ones)
    ranks = [p - n for n in ones[:k]]                         # 0-based, ascending order
    view = flat.view(b // k, k, p)
    taus = [view[:, j].kthvalue(ranks[j] + 1, dim=1).values for j in range(k)]
    return torch.stack(taus, dim=1).view(b, 1)


def _reference(flat: torch.Tensor, ones: Sequence[int]) -> torch.Tensor:
    """The sorted reference ``r̂`` matched to each value of ``flat`` ``(B, P)``: 1 for the
    ``ones[b]`` largest values of row ``b``, 0 below; values tied at the threshold share the
    remaining ones equally (the average over the sort orders of the ties).

    One selection (:func:`_thresholds`), then one batched pass for every row: a few operations
    whatever the number of areas.  The two indicators are written into one buffer and counted
    by one sum (counts of ones: exact in any order).
    """
    ones = tuple(int(n) for n in ones)
    b, p = flat.shape
    tau = _thresholds(flat, ones)
    ind = torch.empty((2, b, p), dtype=flat.dtype, device=flat.device)
    # (Each comparison writes 1/0 in flat's dtype: several times cheaper than a comparison
    # and a conversion from bool.)
    torch.gt(flat, tau, out=ind[0])
    torch.eq(flat, tau, out=ind[1])
    counts = ind.sum(2, keepdim=True)
    count = _counts(ones, flat)
    ref = torch.addcmul(ind[0], ind[1], (count - counts[0]) / counts[1])
    if min(ones) <= 0 or max(ones) >= p:
        ref = torch.where(count <= 0, 0.0, torch.where(count >= p, 1.0, ref))
    return ref


def _ranking_loss(flat: torch.Tensor, ref: torch.Tensor, ones: Sequence[int]) -> torch.Tensor:
    """``mean((vecsort(m) − r)²)`` per row, as ``(Σ m² − 2·Σ m·r̂ + ones) / P``."""
    count = _counts(tuple(int(n) for n in ones), flat).view(-1)
    # (a − 2·b as one subtraction: 2·b is exact, so the same number.)
    return (torch.sub(flat.pow(2).sum(1), (flat * ref).sum(1), alpha=2) + count) / flat.shape[1]


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
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        made = _ranking_numpy(flat, tuple(int(n) for n in ones))
        if made is not None:
            return made[0], made[1].view_as(mask)
    ref = _reference(flat, ones)
    return _ranking_loss(flat, ref, ones), ((flat - ref) * (2 / flat.shape[1])).view_as(mask)


_RANKS: Dict[Tuple[Any, ...], Tuple[Any, ...]] = {}


def _ranks(ones: Tuple[int, ...], p: int) -> Tuple[Any, ...]:
    """For :func:`_ranking_numpy`: the distinct 0-based ascending ranks of the thresholds,
    each row's rank, the rows and the counts ``ones`` (NumPy), made once per (ones, P)."""
    key = (ones, p)
    made = _RANKS.get(key)
    if made is None:
        if len(_RANKS) > 64:
            _RANKS.clear()
        rank = np.array([p - n for n in ones])
        made = _RANKS[key] = (sorted(set(rank.tolist())), rank, np.arange(len(ones)),
                              np.array(ones, dtype=np.float64))
    return made


def _ranking_numpy(flat: torch.Tensor, ones: Tuple[int, ...]
                   ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`ranking_loss_and_gradient` of CPU rows with the elementwise work in NumPy (a
    fraction of torch's per-operation cost on rows of a few thousand values), the same
    numbers: the threshold is an element of the row (``numpy.partition`` of all the rows at
    once, no indices: half the time of a ``kthvalue`` per area); the reference ``r̂`` is
    exact (1, 0, or the row's share: one correctly rounded division of exact counts); every
    other elementwise step is one IEEE operation in the rows' dtype (the same result in any
    library); the two sums stay torch's reductions.  ``None`` for rows with no or all ones,
    and where a row has no value tied at its threshold (a NaN row, where torch's ``0·inf``
    makes the references NaN): the torch path handles those."""
    a = flat.numpy()
    b, p = a.shape
    if min(ones) <= 0 or max(ones) >= p:
        return None
    dt = a.dtype.type
    count = _ranks(ones, p)[3]
    tau = _thresholds(flat, ones).numpy()
    above = a > tau
    tied = a == tau
    n_tied = tied.view(np.uint8).sum(1, dtype=np.int64)
    if not n_tied.all():
        return None
    n_above = above.view(np.uint8).sum(1, dtype=np.int64)
    count = count.astype(a.dtype)
    share = (count - n_above.astype(a.dtype)) / n_tied.astype(a.dtype)
    ref = above + tied * share[:, None]
    squares = torch.from_numpy(a * a).sum(1).numpy()
    matched = torch.from_numpy(a * ref).sum(1).numpy()
    # (torch.sub(x, y, alpha=2) is x − 2·y; 2·y is exact.)
    loss = (squares - dt(2) * matched + count) / dt(p)
    return torch.from_numpy(loss), torch.from_numpy((a - ref) * dt(2 / p))


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
        # A fixed unit is written once (update returns it as it is).
        self.value = torch.full((len(areas),), 0.0 if self.fixed is None else self.fixed,
                                device=device, dtype=dtype)

    def update(self, grad: torch.Tensor) -> torch.Tensor:
        """Take the reward's gradient ``(B, ...)`` at the masks; return the unit ``(B,)``."""
        if self.fixed is not None:
            return self.value
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
        # The masks of the last masks() call and their backward, when made without autograd.
        self.made: Optional[Tuple[torch.Tensor, torch.Tensor, Any]] = None

    def masks(self, shift: Optional[torch.Tensor] = None, start: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The masks of the current parameters and their shifted copies (the same tensor when
        ``shift`` is ``None``), for :meth:`step` to differentiate.

        ``start``: ``shift`` as window starts (its iteration of :meth:`MaskGenerator.starts`).
        Without a shift, or with its starts, 2-D softmax masks are made without autograd
        (:meth:`MaskGenerator.pair_with_backward`, the same numbers); otherwise in an autograd
        graph."""
        self.made = None
        if shift is None or start is not None:
            made = self.generator.pair_with_backward(self.params,
                                                     None if shift is None else start)
            if made is not None:
                self.made = made
                return made[0], made[1]
        return self.generator.pair(self.params.requires_grad_(True), shift)

    def _backward(self, outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
                  ) -> torch.Tensor:
        """The gradient at the parameters of masks made without autograd."""
        assert self.made is not None
        mask, moved, backward = self.made
        self.made = None
        outs = list(outputs)
        if len(outs) == 1 and outs[0] is mask and moved is mask:
            return backward(grads[0])
        if len(outs) == 2 and outs[0] is mask and outs[1] is moved and moved is not mask:
            return backward(torch.cat(list(grads)))
        raise ValueError("MaskOptimizer.step: outputs must be the masks the last masks() call "
                         "returned: [mask] when it has no shift, [mask, moved] otherwise")

    def step(self, outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Backpropagate ``grads`` (the energy's gradient at ``outputs``, tensors returned by
        :meth:`masks`) to the parameters and update them."""
        if self.made is not None:
            g = self._backward(outputs, grads)
        else:
            (g,) = torch.autograd.grad(list(outputs), self.params, list(grads))
            self.params = self.params.detach()
        if self.scale is not None:
            g = g * self.scale
        if self.buffer is None:
            self.buffer = g
        else:
            self.buffer = self.buffer.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
        self.params.sub_(self.buffer, alpha=self.lr).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------
# The history
# ---------------------------------------------------------------------------------------------


class ExtremalHistory(torch.Tensor):
    """What :func:`extremal_perturbation` records: a tensor, with attributes.

    As a tensor it has TorchRay's layout, ``(N·K, 3, max_iter)``: for mask ``b`` (sample-major:
    mask ``n·K + k`` is image ``n`` at area ``areas[k]``) and iteration ``t``,
    ``history[b, 0, t]`` is the energy minimised, ``history[b, 1, t]`` the reward and
    ``history[b, 2, t]`` the area loss, with
    ``energy = weight[t] · area_loss − reward / reward_scale[t, b]``.  Operations on it give
    plain tensors.  Iteration ``t`` records the masks *before* its update.

    Attributes
    ----------
    energy, reward, area_loss : torch.Tensor
        ``(max_iter, N·K)`` views of the three rows: the energy, the reward (what
        ``reward_func`` returned, for the jittered masks) and the ranking regulariser
        ``mean((vecsort(m) − r_a)²)``.
    area : torch.Tensor
        ``(max_iter, N·K)`` the mean mask value.
    weight : torch.Tensor
        ``(max_iter,)`` the area weight ``λ_t``.
    reward_scale : torch.Tensor
        ``(max_iter, N·K)`` the unit the reward was divided by (see ``reward_scale``).
    target_area : torch.Tensor
        ``(N·K,)`` the requested areas.
    achieved_area : torch.Tensor
        ``(N·K,)`` the area of each returned mask, ``Σ m / |Ω|`` (before ``resize``/``smooth``);
        the soft edges of a smooth mask make it exceed the requested area.
    support_area : torch.Tensor
        ``(N·K,)`` the area of each returned mask thresholded at 0.5 (``m > 0.5``), the quantity
        the ranking constraint matches most closely.
    seeds : list of int
        The seed of each image's jitter generator.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, series: torch.Tensor, **attributes: Any) -> "ExtremalHistory":
        """``series``: ``(max_iter, 3, N·K)`` energy, reward and area loss."""
        obj = torch.Tensor._make_subclass(cls, series.permute(2, 1, 0).contiguous())
        obj.__dict__.update(attributes)
        return obj

    def _row(self, i: int) -> torch.Tensor:
        return torch.Tensor.as_subclass(self, torch.Tensor)[:, i].t()

    @property
    def energy(self) -> torch.Tensor:
        return self._row(0)

    @property
    def reward(self) -> torch.Tensor:
        return self._row(1)

    @property
    def area_loss(self) -> torch.Tensor:
        return self._row(2)
