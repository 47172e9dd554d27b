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
geometrically during the optimisation, so the mask first follows the reward and is then held to
its area.  The pieces — :class:`Perturbation`, :class:`MaskGenerator`, :func:`ranking_area_loss`
— are in :mod:`._extremal_masks` and re-exported here.

Settings
--------
As the paper's authors published them: mask parameters initialised to 1, SGD with learning rate
0.01, momentum 0.9 and dampening 0.9, ``λ_t = 300 · 1.0035^t`` (the defaults give exactly this at
``max_iter = 800``; other lengths stretch the same growth from 300 to 4920), and the mask of the
last iteration (before its update) is returned, and the energy uses the raw reward (the default
``reward_scale=1``), which is calibrated for logits and finds the objects on trained networks
(tested on the embedded models).  Three additions make the optimisation find the evidence
whatever the scale of the scores (tested on a model whose class score is ×1, ×20, ×200 a box's
mean, and its softmax probability, on four images each), the first one opt-in:

* **The reward in its own unit** (``reward_scale="auto"``, see
  :class:`~torchray_like.attribution._extremal_masks.RewardScale`): the paper's ``λ = 300`` is
  calibrated for one network's logits.  With scores ten times smaller the area term alone shapes
  the mask (which then settles wherever the ranking dynamics put it); ten times larger, the area
  is never enforced.  The reward is divided by a running measure of its pull on the best
  ``a·|Ω|`` pixels so that this pull starts at a quarter of the area term's.
* **Footprint preconditioning** (:class:`~torchray_like.attribution._extremal_masks.MaskOptimizer`):
  parameters whose cell is partly outside the image get a smaller gradient for the same
  per-pixel pull; plain SGD lets them fall slower under the area constraint, and the ranking
  then keeps the corners of the image.
* **Clamps that pass the gradient**: the mask's clamp to ``[0, 1]`` (and the pyramid's) keeps the
  identity's gradient at the bounds; :func:`torch.clamp` has zero gradient there and a mask
  starting at exactly 1 would never move.

Other choices (the paper leaves them open or we differ on purpose):

* **Jitter** shifts the mask (not the image) by a random integer offset in ``[−step//2,
  step//2]`` per axis, independently for each mask and iteration, so the optimum cannot exploit
  the phase of the grid (the authors' code flips the mask on even iterations); the returned
  mask is unshifted.  The shifts come from one private generator per image (see
  ``generator``).
* **Blur borders** are replicated (scipy's ``mode="nearest"``), not zero-padded: zero padding
  darkens the border of every blurred copy, a perturbation that is not in the image.
* **Smooth max**: evaluated on a lattice at most σ/6 apart and interpolated linearly in
  between (see :class:`MaskGenerator`); temperature 0.05, kernel cut at 3σ.
* **Precision**: masks, the pyramid and the optimisation are computed in at least single
  precision (half-precision inputs and models work: the perturbed images are cast to the
  input's dtype for the model); denormal floats are flushed for the duration of the call (they
  appear as masks and gradients decay far from the evidence, and cost up to tens of times more
  on CPUs), and the caller's setting is restored.
* Several images, one target each, and every requested area are optimised together: one forward
  and one backward pass of ``N·K`` perturbed images per iteration (``2·N·K`` for ``"dual"``).
* 3-D inputs ``(N, C, T, H, W)`` get masks over ``T, H, W``.  Scalar ``step``, ``sigma`` and
  ``max_blur`` apply to the spatial axes as they are; along time they are scaled by
  ``T / max(H, W)`` (at least one frame for ``step``).  Give one value per axis to choose
  otherwise.  1-D inputs work as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._extremal_masks import (BLUR_PERTURBATION, FADE_PERTURBATION, PERTURBATIONS, MaskGenerator,
                              MaskOptimizer, Perturbation, RewardScale, area_ones, per_axis,
                              ranking_area_loss, ranking_loss_and_gradient)
from ._perturbation import (GeneratorsType, check_finite, check_progress, image_seeds, is_number,
                            positive_int, progress_bar, warn_caller)
from ._perturbation import autocast_forward, check_autocast
from ._perturbation import flush_denormals as flushing
from .maps import check_smooth, finish_map, resize_saliency
from .state import autograd_grad, check_input, check_model, model_state_guard
from .targets import check_target_range, class_indices, target_logits

__all__ = [
    "PRESERVE_VARIANT", "DELETE_VARIANT", "DUAL_VARIANT", "BLUR_PERTURBATION",
    "FADE_PERTURBATION", "VARIANTS", "PERTURBATIONS", "Perturbation", "MaskGenerator",
    "ExtremalHistory", "simple_reward", "contrastive_reward", "ranking_area_loss",
    "extremal_perturbation",
]

#: Keep the masked region, perturb the rest; maximise the class score.
PRESERVE_VARIANT = "preserve"
#: Perturb the masked region; minimise the class score.
DELETE_VARIANT = "delete"
#: Both games at once: reward = preserve score − delete score.
DUAL_VARIANT = "dual"
VARIANTS = (PRESERVE_VARIANT, DELETE_VARIANT, DUAL_VARIANT)

#: ``λ`` at the first and the last iteration by default: the authors' ``300 · 1.0035^t`` over
#: 800 iterations.
AREA_WEIGHT = (300.0, 300.0 * 1.0035 ** 799)
#: With ``reward_scale="auto"``: the reward's pull on the best pixels at the start, as a share of
#: the area constraint's pull on a pixel at the wrong end.
REWARD_RATIO = 0.25

TargetArg = Union[int, Sequence[int], torch.Tensor]
RewardFunc = Callable[[Any, Union[int, torch.Tensor], str], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


def _halves(activation: Any, target: Any, variant: str, name: str):
    """The outputs to score, ``(keep, drop)`` (``drop`` only for ``"dual"``), and the target as
    one class index per row of ``keep``."""
    if variant not in VARIANTS:
        raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(activation, torch.Tensor) or activation.dim() == 0:
        target_logits(activation, torch.zeros(1, dtype=torch.long), name)  # raises, says why
        raise ValueError(f"{name}: the model output is a scalar; it needs a batch dimension")
    rows = activation.shape[0]
    keep, drop = activation, None
    if variant == DUAL_VARIANT:
        per_target = (None if isinstance(target, Integral) or (isinstance(
            target, torch.Tensor) and target.dim() == 0) else len(target))
        if rows % 2 or (per_target is not None and rows != 2 * per_target):
            raise ValueError(
                f"{name}: the dual variant expects the outputs of the preserved images followed "
                f"by those of the deleted ones ({2 * (per_target or rows // 2)} rows), got "
                f"{tuple(activation.shape)}")
        keep, drop = activation[:rows // 2], activation[rows // 2:]
    try:
        idx = class_indices(target, keep.shape[0], activation.device)
    except ValueError as err:
        raise ValueError(f"{name}: {err}; the model output has shape "
                         f"{tuple(activation.shape)}") from None
    return keep, drop, idx


def simple_reward(activation: torch.Tensor, target: TargetArg, variant: str) -> torch.Tensor:
    """The paper's reward: the target class score of the perturbed image.

    Parameters
    ----------
    activation : torch.Tensor
        Model output for the perturbed batch: ``(B, C)`` (or a single-logit head ``(B,)`` /
        ``(B, 1)``, where target 1 scores ``+z`` and target 0 ``−z``).  For ``"dual"`` it is
        ``(2B, C)``: the ``B`` preserved images, then the ``B`` deleted ones.
    target : int, sequence of int or integer tensor
        The class: one for every row (as TorchRay passes it), or one per row (``B``).
    variant : {"preserve", "delete", "dual"}

    Returns
    -------
    torch.Tensor
        ``(B,)`` rewards to maximise: ``y_c(m⊗x)`` (preserve), ``−y_c((1−m)⊗x)`` (delete), or
        their sum ``y_c(m⊗x) − y_c((1−m)⊗x)`` (dual).
    """
    keep, drop, idx = _halves(activation, target, variant, "simple_reward")
    score = target_logits(keep, idx, "simple_reward")
    if variant == PRESERVE_VARIANT:
        return score
    if variant == DELETE_VARIANT:
        return -score
    return score - target_logits(drop, idx, "simple_reward")


def _contrast(activation: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if activation.dim() != 2 or activation.shape[1] < 2:
        raise ValueError(
            "contrastive_reward needs (B, C) class scores with at least two classes, got "
            f"{tuple(activation.shape)}")
    col = idx.view(-1, 1)
    others = activation.scatter(1, col, -math.inf)
    return activation.gather(1, col)[:, 0] - others.amax(dim=1)


def contrastive_reward(activation: torch.Tensor, target: TargetArg,
                       variant: str) -> torch.Tensor:
    """A class-contrastive reward: the target score minus the best other class score.

    ``y_c − max_{c' ≠ c} y_{c'}`` of the preserved image (preserve), its negation for the deleted
    image (delete), or the difference of the two (dual).  Same arguments and layout as
    :func:`simple_reward`; needs ``(B, C)`` outputs with ``C ≥ 2``.

    Each row is contrasted with its own best other class.  (TorchRay's ``contrastive_reward``
    subtracts the per-row maxima as a row vector from a column of scores: with several areas
    every mask's reward then mixes in the other masks' maxima — a broadcasting slip that this
    version does not reproduce; with one area both agree.)
    """
    keep, drop, idx = _halves(activation, target, variant, "contrastive_reward")
    score = _contrast(keep, idx)
    if variant == PRESERVE_VARIANT:
        return score
    if variant == DELETE_VARIANT:
        return -score
    return score - _contrast(drop, idx)


# ---------------------------------------------------------------------------------------------
# History
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


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _check_areas(areas: Any) -> List[float]:
    if is_number(areas):
        areas = [areas]
    if isinstance(areas, torch.Tensor):
        areas = areas.flatten().tolist()
    if not isinstance(areas, (list, tuple)):
        raise TypeError(f"areas must be a number or a sequence of numbers in (0, 1), got "
                        f"{type(areas).__name__}")
    if len(areas) == 0:
        raise ValueError("areas is empty; give at least one area fraction in (0, 1), e.g. [0.1]")
    for a in areas:
        if not is_number(a) or not (0 < float(a) < 1):
            raise ValueError(
                f"areas must be fractions of the image strictly between 0 and 1, got {a!r} in "
                f"{list(areas)!r}")
    return [float(a) for a in areas]


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


def _in_range(value: Any, name: str, low: float, high: float, low_open: bool,
              high_open: bool) -> float:
    ok = is_number(value) and math.isfinite(value) and \
        (value > low if low_open else value >= low) and (value < high if high_open else
                                                         value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


@dataclass
class _Config:
    """The validated arguments of one call (every check runs before any forward pass)."""

    targets: torch.Tensor        # (N,) class per image
    areas: List[float]
    perturbation: str
    max_iter: int
    num_levels: int
    steps: Tuple[float, ...]
    sigmas: Tuple[float, ...]
    jitter: Tuple[int, ...]
    variant: str
    reward_func: RewardFunc
    reward_target: Union[int, torch.Tensor]   # what reward_func receives
    learning_rate: float
    momentum: float
    dampening: float
    weights: Tuple[float, float]
    reward_scale: Union[str, float]
    max_blur: Any
    fade_to: str
    temperature: float
    print_iter: Optional[int]
    debug: bool
    seeds: List[int]
    autocast: Optional[torch.dtype]

    @classmethod
    def check(cls, model: Any, input: Any, target: Any, areas: Any, perturbation: Any,
              max_iter: Any, num_levels: Any, step: Any, sigma: Any, jitter: Any, variant: Any,
              print_iter: Any, debug: Any, reward_func: Any, resize: Any, resize_mode: Any,
              smooth: Any, generator: Any, progress: Any, learning_rate: Any, momentum: Any,
              dampening: Any, area_weight: Any, reward_scale: Any, max_blur: Any, fade_to: Any,
              temperature: Any, flush_denormals: Any, autocast: Any) -> "_Config":
        check_model(model)
        check_input(input, "input")
        spatial = tuple(input.shape[2:])
        if not 1 <= len(spatial) <= 3:
            raise ValueError(
                f"input must be (N, C, L), (N, C, H, W) or (N, C, T, H, W), got shape "
                f"{tuple(input.shape)}")
        check_finite(input, "input", "extremal_perturbation")
        n = input.shape[0]
        targets = _check_target(target, n)
        area_list = _check_areas(areas)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, Integral) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer ≥ 1, got {max_iter!r}")
        steps = per_axis(step, "step", spatial, integer=True, minimum=1, strict=False,
                         time_scaled=True)
        sigmas = per_axis(sigma, "sigma", spatial, integer=False, minimum=0.0, strict=True,
                          time_scaled=True)
        if any(sg > size / 4 for sg, size in zip(sigmas, spatial)):
            # The paper's step 7 / sigma 21 are for 224² images; on small inputs one parameter
            # then spreads over the whole image and the masks cannot localise anything.
            warn_caller(
                f"extremal_perturbation: sigma {tuple(sigmas)} is more than a quarter of the "
                f"input size {spatial}, so masks can hardly localise; scale step and sigma with "
                "the image (the defaults 7 and 21 are for 224 px: about side/32 and 3 × step)")
        if not callable(reward_func):
            raise TypeError(f"reward_func must be callable, got {type(reward_func).__name__}")
        check_smooth(smooth)
        if not (is_number(learning_rate) and learning_rate > 0 and math.isfinite(learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
        momentum = _in_range(momentum, "momentum", 0, 1, False, True)
        dampening = _in_range(dampening, "dampening", 0, 1, False, False)
        if not (isinstance(area_weight, (tuple, list)) and len(area_weight) == 2
                and all(is_number(w) and w > 0 and math.isfinite(w) for w in area_weight)):
            raise ValueError(
                f"area_weight must be two positive numbers (first, last), got {area_weight!r}")
        if not (reward_scale == "auto" or (is_number(reward_scale) and reward_scale > 0
                                           and math.isfinite(reward_scale))):
            raise ValueError(
                f"reward_scale must be 'auto' or a positive number, got {reward_scale!r}")
        if not (is_number(temperature) and temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number ≥ 0, got {temperature!r}")
        check_progress(progress)
        if print_iter is not None:
            print_iter = positive_int(print_iter, "print_iter")
        for name, flag in (("debug", debug), ("flush_denormals", flush_denormals)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        # Check resize and resize_mode now (on a one-pixel map), not after the optimisation.
        resize_saliency(input, input.new_zeros((1, 1) + (1,) * len(spatial)), resize,
                        resize_mode)
        seeds = image_seeds(generator, n)
        k = len(area_list)
        # TorchRay passes the target as given; per-image targets become one per mask.
        reward_target = (int(target) if isinstance(target, Integral)
                         else targets.repeat_interleave(k).to(input.device))
        return cls(targets, area_list, perturbation, int(max_iter), num_levels, steps, sigmas,
                   tuple((int(s) // 2) if jitter else 0 for s in steps), variant, reward_func,
                   reward_target, float(learning_rate), momentum, dampening,
                   (float(area_weight[0]), float(area_weight[1])), reward_scale, max_blur,
                   fade_to, float(temperature), print_iter, debug, seeds,
                   check_autocast(autocast, input.device))


# ---------------------------------------------------------------------------------------------
# The optimisation
# ---------------------------------------------------------------------------------------------


def _draw_shifts(seeds: List[int], k: int, iters: int, jitter: Tuple[int, ...]) -> torch.Tensor:
    """``(iters, N·K, d)`` integer shifts, image ``n``'s drawn from its own CPU generator, so that
    a batch and per-image calls with the same seeds draw the same shifts."""
    bound = torch.tensor(jitter, dtype=torch.long)
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        u = torch.randint(-2 ** 30, 2 ** 30, (iters, k, len(jitter)), generator=g)
        out.append(u % (2 * bound + 1) - bound)
    return torch.cat(out, dim=1)


class _Optimisation:
    """One call's state: the pyramid, the mask generator, the optimiser, the history."""

    def __init__(self, model: nn.Module, input: torch.Tensor, cfg: _Config) -> None:
        self.model, self.cfg = model, cfg
        self.input_dtype = input.dtype
        # Masks and the optimisation in at least single precision.
        dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
        device = input.device
        spatial = tuple(input.shape[2:])
        k = len(cfg.areas)
        self.batch = b = input.shape[0] * k
        self.pyramid = Perturbation(input, cfg.num_levels, cfg.max_blur, cfg.perturbation,
                                    cfg.fade_to)
        self.gen = MaskGenerator(spatial, cfg.steps, cfg.sigmas,
                                 pooling_method="softmax" if cfg.temperature > 0 else "max",
                                 jitter=cfg.jitter, temperature=cfg.temperature or 0.05,
                                 device=device, dtype=dtype)
        self.opt = MaskOptimizer(self.gen, b, 1.0, cfg.learning_rate, cfg.momentum,
                                 cfg.dampening)
        self.mask_areas = cfg.areas * input.shape[0]
        self.ones = area_ones(self.mask_areas, b, math.prod(spatial))
        self.scale = RewardScale(cfg.reward_scale, self.mask_areas, math.prod(spatial),
                                 cfg.weights[0], REWARD_RATIO, device, dtype)
        self.shifts = (_draw_shifts(cfg.seeds, k, cfg.max_iter, cfg.jitter).to(device)
                       if any(cfg.jitter) else None)
        w0, w1 = cfg.weights
        self.weights = torch.tensor([w0 * (w1 / w0) ** (t / max(cfg.max_iter - 1, 1))
                                     for t in range(cfg.max_iter)], dtype=dtype, device=device)
        self.series = torch.empty(cfg.max_iter, 3, b, dtype=dtype, device=device)
        self.area = torch.empty(cfg.max_iter, b, dtype=dtype, device=device)
        self.units = torch.empty(cfg.max_iter, b, dtype=dtype, device=device)
        self.last: Optional[torch.Tensor] = None

    def perturbed(self, moved: torch.Tensor) -> torch.Tensor:
        """The batch the model sees for the (jittered) masks, in the input's dtype."""
        apply = self.pyramid.apply
        if self.cfg.variant == PRESERVE_VARIANT:
            batch = apply(moved)
        elif self.cfg.variant == DELETE_VARIANT:
            batch = apply(1 - moved)
        else:
            batch = torch.cat([apply(moved), apply(1 - moved)])
        return batch.to(self.input_dtype)

    def reward(self, moved: torch.Tensor, first: bool) -> torch.Tensor:
        with autocast_forward(self.cfg.autocast, moved.device):
            output = self.model(self.perturbed(moved))
        if self.cfg.autocast is not None and isinstance(output, torch.Tensor) and \
                output.is_floating_point():
            output = output.float()  # the reward and the energy in float32
        if first and isinstance(output, torch.Tensor) and output.dim() > 0:
            check_target_range(output, self.cfg.targets)
        reward = self.cfg.reward_func(output, self.cfg.reward_target, self.cfg.variant)
        if first:
            b = self.batch
            if not isinstance(reward, torch.Tensor) or tuple(reward.shape) != (b,):
                raise ValueError(
                    f"reward_func must return a tensor of {b} rewards (one per mask), got "
                    f"{tuple(getattr(reward, 'shape', ())) or type(reward).__name__}")
            if not reward.requires_grad:
                raise ValueError(
                    "the reward does not depend on the mask through autograd (does the "
                    "model detach its activations or run under torch.no_grad()?)")
            if not bool(torch.isfinite(reward).all()):
                raise ValueError(
                    "extremal_perturbation: the reward is not finite (NaN or inf) for the "
                    "unperturbed masks: the model's output is not finite")
        return reward

    def iterate(self, t: int) -> None:
        """One step: perturb, score, and move the masks down the energy's gradient."""
        mask_g, moved_g = self.opt.masks(None if self.shifts is None else self.shifts[t])
        # The reward and the area loss are differentiated apart (the reward is rescaled by its
        # gradient) at a copy of the masks ...
        mask = mask_g.detach()
        moved = moved_g.detach().requires_grad_(True)
        reward = self.reward(moved, t == 0)
        (g_reward,) = autograd_grad(reward.sum(), moved, allow_unused=True)
        area_loss, g_area = ranking_loss_and_gradient(mask, self.ones)
        if g_reward is None:
            g_reward = torch.zeros_like(moved)
        unit = self.scale.update(g_reward)
        # ... then the energy's gradient goes back through the mask generator.
        g_reward = g_reward / unit.view((-1,) + (1,) * (moved.dim() - 1))
        if moved_g is mask_g:
            self.opt.step([mask_g], [self.weights[t] * g_area - g_reward])
        else:
            self.opt.step([mask_g, moved_g], [self.weights[t] * g_area, -g_reward])
        with torch.no_grad():
            reward = reward.detach().to(self.series.dtype)
            self.series[t] = torch.stack(
                [self.weights[t] * area_loss - reward / unit, reward, area_loss])
            self.area[t] = mask.flatten(1).mean(dim=1)
            self.units[t] = unit
        self.last = mask.detach()
        if (t + 1) % 50 == 0:
            self.check_finite(t + 1)
        if self.cfg.print_iter and ((t + 1) % self.cfg.print_iter == 0 or t == 0):
            self.report(t)

    def report(self, t: int) -> None:
        """``print_iter``: the mean energy, reward, area loss and area over the masks; with
        ``debug``, one line per mask as well."""
        e, r, a = self.series[t].mean(dim=1).tolist()
        print(f"[{t + 1:04d}/{self.cfg.max_iter:04d}] energy {e:.4g} reward {r:.4g} area_loss "
              f"{a:.4g} area {float(self.area[t].mean()):.4f} weight "
              f"{float(self.weights[t]):.4g}", flush=True)
        if self.cfg.debug and self.last is not None:
            support = (self.last > 0.5).flatten(1).float().mean(1).tolist()
            for b in range(self.batch):
                print(f"    mask {b}: area target {self.mask_areas[b]:.4f} mean "
                      f"{float(self.area[t, b]):.4f} support {support[b]:.4f} reward "
                      f"{float(self.series[t, 1, b]):.4g} area_loss "
                      f"{float(self.series[t, 2, b]):.4g} reward_scale "
                      f"{float(self.units[t, b]):.4g}", flush=True)

    def check_finite(self, done: int) -> None:
        """Stop with a clear error once the reward of the first ``done`` iterations is not
        finite (checked every 50 iterations: each check waits for the device)."""
        bad = ~torch.isfinite(self.series[:done, 1]).all(dim=1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise ValueError(
                f"extremal_perturbation: the reward became non-finite (NaN or inf) at iteration "
                f"{first}: the model's output is not finite for some perturbed images")

    def result(self) -> Tuple[torch.Tensor, ExtremalHistory]:
        """The masks of the last iteration and the history."""
        self.check_finite(self.cfg.max_iter)
        masks = self.last
        assert masks is not None, "no iteration ran"
        achieved = masks.flatten(1).mean(dim=1)
        support = (masks > 0.5).flatten(1).to(masks.dtype).mean(dim=1)
        history = ExtremalHistory(
            self.series, area=self.area, weight=self.weights, reward_scale=self.units,
            target_area=torch.tensor(self.mask_areas, dtype=masks.dtype, device=masks.device),
            achieved_area=achieved, support_area=support, seeds=list(self.cfg.seeds))
        return masks, history


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


def extremal_perturbation(model: nn.Module, input: torch.Tensor, target: TargetArg,
                          areas: Union[float, Sequence[float]] = (0.1,),
                          perturbation: str = BLUR_PERTURBATION, max_iter: int = 800,
                          num_levels: int = 8, step: Union[int, Sequence[int]] = 7,
                          sigma: Union[float, Sequence[float]] = 21, jitter: bool = True,
                          variant: str = PRESERVE_VARIANT, print_iter: Optional[int] = None,
                          debug: bool = False, reward_func: RewardFunc = simple_reward,
                          resize: Any = False, resize_mode: str = "bilinear",
                          smooth: float = 0, *,
                          generator: GeneratorsType = None,
                          progress: Optional[bool] = None,
                          learning_rate: float = 0.01, momentum: float = 0.9,
                          dampening: float = 0.9,
                          area_weight: Tuple[float, float] = AREA_WEIGHT,
                          reward_scale: Union[str, float] = 1.0,
                          max_blur: Union[float, Sequence[float]] = 20, fade_to: str = "zero",
                          temperature: float = 0.05, flush_denormals: bool = True,
                          autocast: Optional[torch.dtype] = None
                          ) -> Tuple[torch.Tensor, ExtremalHistory]:
    """Extremal perturbation masks (Fong, Patrick, Vedaldi, ICCV 2019).

    For every image and every requested area, finds the smooth mask of that area that best
    preserves (or deletes) the evidence for the target class; see the module notes for the
    method and the settings.  All ``N`` images and ``K`` areas are optimised together, one batch
    of ``N·K`` perturbed images per iteration.  The arguments up to ``smooth`` are TorchRay's, in
    its order.

    Parameters
    ----------
    model : torch.nn.Module
        The network; run in eval mode with frozen parameters, everything restored afterwards.
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point images, 1 to 3 spatial dimensions (3-D: video
        ``(N, C, T, H, W)`` with masks over ``T, H, W``); NaN or infinite values are an error.
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
        Width in pixels of the mask kernel; ``3·sigma ≥ step / 2`` is required.
    jitter : bool
        Shift each mask by a random offset of up to ``step // 2`` pixels per axis at every
        iteration (drawn from per-image generators, see ``generator``).
    variant : {"preserve", "delete", "dual"}
        The game: keep the masked region (maximise the score), remove it (minimise the score), or
        both (one forward pass of ``2·N·K`` images).
    print_iter : int, optional
        Print the energy, reward, area loss, mean mask value and ``λ`` (means over the masks) at
        the first iteration and every ``print_iter`` iterations.
    debug : bool
        With ``print_iter``, also print one line per mask (requested area, mean value,
        thresholded area, reward, area loss, reward unit).  (TorchRay plots the masks instead;
        the returned history holds every number.)
    reward_func : callable
        ``reward_func(activation, target, variant) -> (N·K,)`` rewards to maximise, given the
        model output for the perturbed batch (``2·N·K`` rows for ``"dual"``: preserved, then
        deleted) and the target — the int as given when ``target`` is an int (as TorchRay passes
        it), else one class per mask (``(N·K,)``, sample-major).  :func:`simple_reward`,
        :func:`contrastive_reward`, or your own.
    resize : bool, int or tuple
        Resize the returned masks (see :func:`~torchray_like.attribution.maps.resize_saliency`);
        masks are computed at the input's resolution already.
    resize_mode : str
        Interpolation mode for ``resize``.
    smooth : float
        If positive, Gaussian smoothing of the returned masks with ``sigma = smooth·max(size)``.
    generator : None, int, torch.Generator or a sequence of them (one per image)
        Seeds the jitter.  Image ``n`` uses its own generator seeded with ``s + n`` for an int
        ``s`` (``None``: ``s`` derived from the global RNG state, which is not advanced — so
        :func:`torch.manual_seed` makes a call reproducible; a ``torch.Generator`` gives ``s``
        by one draw).  Hence explaining image ``n`` alone with seed ``s + n`` gives the same masks
        as the batched call with seed ``s``.
    progress : bool, optional
        Show a tqdm progress bar (``None``: only on a terminal).
    learning_rate, momentum, dampening : float
        SGD on the mask parameters (preconditioned, clamped to ``[0, 1]`` after every step).
    area_weight : (float, float)
        ``λ`` at the first and the last iteration; it grows geometrically in between.  The
        default is the authors' ``300 · 1.0035^t`` over 800 iterations.
    reward_scale : float or "auto"
        The unit of the reward: a number divides the reward by it (the default ``1``: the
        paper's energy with the raw reward, calibrated for logits); ``"auto"`` measures it by
        its gradient (see the module notes), for scores far from the logit scale
        (probabilities, a box's mean).  On the trained embedded models ``"auto"`` lets the area
        term win (masks off the objects), the raw reward finds them.
    max_blur : float or sequence of float
        σ in pixels of the strongest blur (see :class:`Perturbation`).
    fade_to : {"zero", "mean"}
        Baseline of the ``"fade"`` perturbation.
    temperature : float
        Smooth-max temperature ``T`` (0: the hard max).
    flush_denormals : bool
        Flush denormal floats to zero on the CPU during the call (in the calling thread; the
        caller's setting is restored afterwards, also on errors).  Masks and gradients far from
        the evidence decay towards zero, and arithmetic on denormals is many times slower on
        most CPUs.  ``False`` leaves the setting alone (``benchmarks/denormals_extremal.py``
        times both).
    autocast : torch.dtype, optional
        ``torch.bfloat16`` (CPUs and GPUs) or ``torch.float16`` (GPUs): the model's forward
        (and so its backward) passes run under :class:`torch.autocast` to that dtype; a tensor
        output is read back in float32, and the masks, rewards, energies and optimiser state
        stay in float32.

    Returns
    -------
    masks : torch.Tensor
        ``(N·K, 1, *spatial)`` masks in ``[0, 1]``, sample-major (mask ``n·K + k`` is image ``n``
        at area ``areas[k]``), detached, on the input's device, in the input's dtype (float32
        for half-precision inputs).
    history : ExtremalHistory
        TorchRay's ``(N·K, 3, max_iter)`` tensor of energy, reward and area loss, with every
        per-iteration series and the achieved areas as attributes.

    Raises
    ------
    ValueError, TypeError
        For invalid arguments (areas outside ``(0, 1)``, unknown variant or perturbation, target
        of the wrong length or out of range, NaN in the input, a step too large for sigma ...),
        and for a model whose output is not finite.

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
    cfg = _Config.check(model, input, target, areas, perturbation, max_iter, num_levels, step,
                        sigma, jitter, variant, print_iter, debug, reward_func, resize,
                        resize_mode, smooth, generator, progress, learning_rate, momentum,
                        dampening, area_weight, reward_scale, max_blur, fade_to, temperature,
                        flush_denormals, autocast)
    run = _Optimisation(model, input, cfg)
    with model_state_guard(model), torch.enable_grad(), flushing(flush_denormals), \
            progress_bar(cfg.max_iter, progress, "extremal perturbation") as bar:
        for t in range(cfg.max_iter):
            run.iterate(t)
            bar.update(1)
    masks, history = run.result()
    return finish_map(input, masks, resize, resize_mode, smooth), history
