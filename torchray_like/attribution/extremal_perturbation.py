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
its area.  The pieces — :class:`Perturbation` (:mod:`.perturbation_pyramid`),
:class:`MaskGenerator` (:mod:`.smooth_masks`), :func:`ranking_area_loss` and the optimiser
(:mod:`.mask_optimizer`) — are re-exported here.

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
  :class:`~torchray_like.attribution.mask_optimizer.RewardScale`): the paper's ``λ = 300`` is
  calibrated for one network's logits.  With scores ten times smaller the area term alone shapes
  the mask (which then settles wherever the ranking dynamics put it); ten times larger, the area
  is never enforced.  The reward is divided by a running measure of its pull on the best
  ``a·|Ω|`` pixels so that this pull starts at a quarter of the area term's.
* **Footprint preconditioning** (:class:`~torchray_like.attribution.mask_optimizer.MaskOptimizer`):
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
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .arguments import (
    check_batch,
    check_flag,
    check_number,
    check_progress,
    check_resize,
    is_number,
    number_list,
    per_axis,
    positive_int,
)
from .extremal_rewards import (
    DELETE_VARIANT,
    DUAL_VARIANT,
    PRESERVE_VARIANT,
    VARIANTS,
    RewardFunc,
    TargetArg,
    contrastive_reward,
    simple_reward,
)
from .inputs import call_model
from .maps import check_smooth, resize_saliency, smooth_saliency
from .mask_optimizer import (
    ExtremalHistory,
    MaskOptimizer,
    RewardScale,
    area_ones,
    ranking_area_loss,
    ranking_loss_and_gradient,
)
from .modules import check_model
from .perturbation_pyramid import BLUR_PERTURBATION, FADE_PERTURBATION, PERTURBATIONS, Perturbation
from .precision import autocast_forward, check_autocast
from .precision import flush_denormals as flushing
from .reporting import progress_bar, warn_caller
from .seeding import GeneratorsType, image_seeds
from .smooth_masks import MaskGenerator, shared_generator
from .state import autograd_grad, model_state_guard
from .targets import SEED_NOT_A_SCORE, Target, check_output_tensor, parse_target

__all__ = [
    "PRESERVE_VARIANT", "DELETE_VARIANT", "DUAL_VARIANT", "BLUR_PERTURBATION",
    "FADE_PERTURBATION", "VARIANTS", "PERTURBATIONS", "Perturbation", "MaskGenerator",
    "ExtremalHistory", "simple_reward", "contrastive_reward", "ranking_area_loss",
    "extremal_perturbation",
]

#: ``λ`` at the first and the last iteration by default: the authors' ``300 · 1.0035^t`` over
#: 800 iterations.
AREA_WEIGHT = (300.0, 300.0 * 1.0035 ** 799)
#: With ``reward_scale="auto"``: the reward's pull on the best pixels at the start, as a share of
#: the area constraint's pull on a pixel at the wrong end.
REWARD_RATIO = 0.25

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _check_areas(areas: Any) -> Tuple[float, ...]:
    values = [areas] if is_number(areas) else number_list(areas)
    if values is None:
        raise TypeError(f"areas must be a number or a sequence of numbers in (0, 1), got "
                        f"{type(areas).__name__}")
    if len(values) == 0:
        raise ValueError("areas is empty; give at least one area fraction in (0, 1), e.g. [0.1]")
    for a in values:
        if not is_number(a) or not (0 < float(a) < 1):
            raise ValueError(
                f"areas must be fractions of the image strictly between 0 and 1, got {a!r} in "
                f"{values!r}")
    return tuple(float(a) for a in values)


def _check_target(target: Any, input: torch.Tensor, reward_func: Any) -> Target:
    """The target parsed once: class indices (on the input's device) or a callable, which
    scores the perturbed images itself — so it replaces ``reward_func``."""
    parsed = parse_target(target, input.shape[0], device=input.device)
    if parsed.kind == "seed":
        raise ValueError(f"extremal_perturbation: {SEED_NOT_A_SCORE}")
    if not callable(reward_func):
        raise TypeError(f"reward_func must be callable, got {type(reward_func).__name__}")
    if parsed.kind == "callable" and reward_func is not simple_reward:
        raise ValueError(
            "extremal_perturbation: pass either a callable target (its scores are the reward) "
            "or reward_func(activation, target, variant) with class indices, not both")
    return parsed


def _reward_target(target: Any, parsed: Target, k: int) -> Any:
    """What a ``reward_func`` receives: an int as given (as TorchRay passes it), else one class
    per mask (sample-major)."""
    if isinstance(target, Integral) and not isinstance(target, bool):
        return int(target)
    return None if parsed.indices is None else parsed.indices.repeat_interleave(k)


def _check_choice(value: Any, name: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_iterations(max_iter: Any) -> int:
    if isinstance(max_iter, bool) or not isinstance(max_iter, Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer ≥ 1, got {max_iter!r}")
    return int(max_iter)


def _check_grid(step: Any, sigma: Any, spatial: Tuple[int, ...]
                ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``step`` and ``sigma`` per axis; a warning when masks cannot localise."""
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
    return steps, sigmas


def _check_positive(value: Any, name: str, what: str = "a positive number") -> float:
    if not (is_number(value) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _check_area_weight(area_weight: Any) -> Tuple[float, float]:
    values = number_list(area_weight)
    if values is None or len(values) != 2 or not all(
            is_number(w) and w > 0 and math.isfinite(w) for w in values):
        raise ValueError(
            f"area_weight must be two positive numbers (first, last), got {area_weight!r}")
    return float(values[0]), float(values[1])


def _check_reward_scale(reward_scale: Any) -> Union[str, float]:
    if reward_scale == "auto":
        return "auto"
    return _check_positive(reward_scale, "reward_scale", "'auto' or a positive number")


def _check_temperature(temperature: Any) -> float:
    if not (is_number(temperature) and temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number ≥ 0, got {temperature!r}")
    return float(temperature)


@dataclass(frozen=True)
class _Config:
    """The validated arguments of one call, built by keyword (every check runs before any
    forward pass)."""

    target: Target                         # parsed once; class indices on the input's device
    reward_func: Optional[RewardFunc]      # None: the target's own score (simple_reward's)
    reward_target: Any                     # what reward_func receives
    areas: Tuple[float, ...]
    variant: str
    perturbation: str
    num_levels: int
    max_blur: Any
    fade_to: str
    max_iter: int
    steps: Tuple[float, ...]
    sigmas: Tuple[float, ...]
    jitter: Tuple[int, ...]
    temperature: float
    learning_rate: float
    momentum: float
    dampening: float
    weights: Tuple[float, float]
    reward_scale: Union[str, float]
    seeds: Tuple[int, ...]
    print_iter: Optional[int]
    debug: bool
    progress: Optional[bool]
    flush_denormals: bool
    autocast: Optional[torch.dtype]
    resize: Any
    resize_mode: str
    smooth: float


# ---------------------------------------------------------------------------------------------
# The optimisation
# ---------------------------------------------------------------------------------------------


def _draw_shifts(seeds: Sequence[int], k: int, iters: int, jitter: Tuple[int, ...]
                 ) -> torch.Tensor:
    """``(iters, N·K, d)`` integer shifts, image ``n``'s drawn from its own CPU generator, so that
    a batch and per-image calls with the same seeds draw the same shifts."""
    bound = torch.tensor(jitter, dtype=torch.long)
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        u = torch.randint(-2 ** 30, 2 ** 30, (iters, k, len(jitter)), generator=g)
        out.append(u % (2 * bound + 1) - bound)
    return torch.cat(out, dim=1)


def _history(iters: int, b: int, dtype: torch.dtype, device: Any
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(iters, 3, b)``, ``(iters, b)`` and ``(iters, b)`` history tensors (energy, reward,
    area loss; area; reward unit), or a :class:`ValueError` naming ``max_iter`` where they do
    not fit in memory (the allocator's error would not say which argument asked for it)."""
    try:
        return (torch.empty(iters, 3, b, dtype=dtype, device=device),
                torch.empty(iters, b, dtype=dtype, device=device),
                torch.empty(iters, b, dtype=dtype, device=device))
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        size = 5 * iters * b * torch.empty(0, dtype=dtype).element_size() / 2 ** 30
        raise ValueError(
            f"max_iter={iters} does not fit in memory: the optimisation's history (energy, "
            f"reward, area per mask and iteration) needs {size:.3g} GiB on {device} for "
            f"{b} masks; use fewer iterations (the paper's is 800)") from error


class _Optimisation:
    """One call's state: the pyramid, the mask generator, the optimiser, the history."""

    def __init__(self, model: nn.Module, input: torch.Tensor, cfg: _Config) -> None:
        self.model, self.cfg, self.input = model, cfg, input
        self.input_dtype = input.dtype
        # Masks and the optimisation in at least single precision.
        dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
        device = input.device
        spatial = tuple(input.shape[2:])
        k = len(cfg.areas)
        self.batch = b = input.shape[0] * k
        self.pyramid = Perturbation(input, cfg.num_levels, cfg.max_blur, cfg.perturbation,
                                    cfg.fade_to)
        self.gen = shared_generator(spatial, cfg.steps, cfg.sigmas,
                                    "softmax" if cfg.temperature > 0 else "max", cfg.jitter,
                                    cfg.temperature or 0.05, torch.device(device), dtype)
        self.opt = MaskOptimizer(self.gen, b, 1.0, cfg.learning_rate, cfg.momentum,
                                 cfg.dampening)
        self.mask_areas = cfg.areas * input.shape[0]
        # The image of each mask (sample-major), for the target's own score.
        self.samples = torch.arange(input.shape[0], device=device).repeat_interleave(k)
        self.ones = area_ones(self.mask_areas, b, math.prod(spatial))
        # Each mask's class: from the second iteration on, a (B, C) output's scores by a gather.
        self.columns = (cfg.target.indices.index_select(0, self.samples).view(-1, 1)
                        if cfg.target.function is None and cfg.target.indices is not None
                        else None)
        self.scale = RewardScale(cfg.reward_scale, self.mask_areas, math.prod(spatial),
                                 cfg.weights[0], REWARD_RATIO, device, dtype)
        # The history first: the largest tensors per iteration, so that a max_iter beyond
        # memory is refused before the shifts and weights are drawn one per iteration.
        self.series, self.area, self.units = _history(cfg.max_iter, b, dtype, device)
        self.shifts = (_draw_shifts(cfg.seeds, k, cfg.max_iter, cfg.jitter).to(device)
                       if any(cfg.jitter) else None)
        # The shifts as window starts, made once (2-D masks).
        self.starts = (self.gen.starts(self.shifts) if self.shifts is not None
                       and len(spatial) == 2 else None)
        w0, w1 = cfg.weights
        self.weights = torch.tensor([w0 * (w1 / w0) ** (t / max(cfg.max_iter - 1, 1))
                                     for t in range(cfg.max_iter)], dtype=dtype, device=device)
        self.weight_values = self.weights.tolist()
        self.last: Optional[torch.Tensor] = None
        # (reward, area loss, area, unit) of the iterations not yet in the history tensors.
        self.pending: List[Tuple[torch.Tensor, ...]] = []
        self.written = 0

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

    def reward_and_gradient(self, moved: torch.Tensor, first: bool
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The reward of the jittered masks ``moved`` and its gradient at them (``None``
        where the reward does not depend on them).  With the blur pyramid, autograd runs
        through the model only, from the perturbed batch, and the pyramid's backward is
        applied to its gradient by hand (the same numbers, fewer autograd nodes)."""
        variant = self.cfg.variant
        made = self.pyramid.games_with_backward(moved, variant != DELETE_VARIANT,
                                                variant != PRESERVE_VARIANT)
        if made is None:
            moved = moved.requires_grad_(True)
            reward = self.reward(moved, first)
            (grad,) = autograd_grad(reward.sum(), moved, allow_unused=True)
            return reward, grad
        batch, backward = made
        leaf = batch.to(self.input_dtype).requires_grad_(True)
        # (The model gets a copy: it may write into its input in place.)
        reward = self.reward(leaf.clone(), first, perturbed=True)
        (grad,) = autograd_grad(reward.sum(), leaf, allow_unused=True)
        return reward, None if grad is None else backward(grad.to(batch.dtype))

    def reward(self, moved: torch.Tensor, first: bool, perturbed: bool = False) -> torch.Tensor:
        """The reward of the masks ``moved`` (with ``perturbed``: of the batch ``moved``)."""
        with autocast_forward(self.cfg.autocast, moved.device):
            output = self.forward(moved if perturbed else self.perturbed(moved))
        if self.cfg.autocast is not None and isinstance(output, torch.Tensor) and \
                output.is_floating_point():
            output = output.float()  # the reward and the energy in float32
        if self.cfg.reward_func is None:
            reward = self.own_reward(output, first)
        else:
            if first:
                self.cfg.target.check_range(output)
            reward = self.cfg.reward_func(output, self.cfg.reward_target, self.cfg.variant)
        if first:
            self.check_first_reward(reward)
        return reward

    def forward(self, batch: torch.Tensor) -> Any:
        """The model on a perturbed batch; a failure caused by the input's layout (an
        unbatched image) or dtype says what to do."""
        return call_model(self.model, batch, self.input)

    def own_reward(self, output: Any, first: bool) -> torch.Tensor:
        """The target's score of the perturbed images, by the game: class indices give
        :func:`simple_reward`'s numbers, a callable target its own scores (called once on the
        whole output, ``2·N·K`` rows for ``"dual"``)."""
        target, b, name = self.cfg.target, self.batch, "extremal_perturbation"
        dual = self.cfg.variant == DUAL_VARIANT
        if not (first or dual or self.columns is None) and isinstance(output, torch.Tensor) \
                and output.dim() == 2 and output.shape[0] == b and output.shape[1] > 1 \
                and output.device == self.columns.device:
            keep = output.gather(1, self.columns).view(-1)     # Target.scores' selection
            return keep if self.cfg.variant == PRESERVE_VARIANT else -keep
        if target.function is not None:
            scores = target.scores(output, samples=self.samples.repeat(2 if dual else 1),
                                   check_range=False, name=name)
            keep, drop = scores[:b], scores[b:]
        else:
            rows = check_output_tensor(output, name)
            keep = target.scores(rows[:b] if dual else rows, samples=self.samples,
                                 check_range=first, name=name)
            drop = (target.scores(rows[b:], samples=self.samples, check_range=False, name=name)
                     if dual else keep)
        if self.cfg.variant == PRESERVE_VARIANT:
            return keep
        if self.cfg.variant == DELETE_VARIANT:
            return -keep
        return keep - drop

    def check_first_reward(self, reward: Any) -> None:
        """The reward of the first iteration: one per mask, differentiable, finite."""
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

    def iterate(self, t: int) -> None:
        """One step: perturb, score, and move the masks down the energy's gradient."""
        mask_g, moved_g = self.opt.masks(None if self.shifts is None else self.shifts[t],
                                         None if self.starts is None else self.starts[t])
        # The reward and the area loss are differentiated apart (the reward is rescaled by its
        # gradient) at a copy of the masks ...
        mask = mask_g.detach()
        moved = moved_g.detach()
        reward, g_reward = self.reward_and_gradient(moved, t == 0)
        area_loss, g_area = ranking_loss_and_gradient(mask, self.ones)
        if g_reward is None:
            g_reward = torch.zeros_like(moved)
        unit = self.scale.update(g_reward)
        # ... then the energy's gradient goes back through the mask generator (x / 1 is x:
        # the paper's raw reward skips the division).
        if self.scale.fixed != 1.0:
            g_reward = g_reward / unit.view((-1,) + (1,) * (moved.dim() - 1))
        weight = self.weight_values[t]       # the float32 value: the same products
        if moved_g is mask_g:
            self.opt.step([mask_g], [g_area * weight - g_reward])
        else:
            self.opt.step([mask_g, moved_g], [g_area * weight, -g_reward])
        # The history is written in blocks (every 50 iterations, when printed, at the end) and
        # the energy row filled from it: fewer operations per iteration, the same numbers.
        self.pending.append((reward.detach(), area_loss, mask.flatten(1).mean(dim=1), unit))
        self.last = mask
        if (t + 1) % 50 == 0:
            self.check_finite(t + 1)
        if self.cfg.print_iter and ((t + 1) % self.cfg.print_iter == 0 or t == 0):
            self.report(t)

    def write_history(self) -> None:
        """Copy the pending iterations' numbers into the history tensors."""
        if not self.pending:
            return
        t0, t1 = self.written, self.written + len(self.pending)
        with torch.no_grad():
            for i, out in enumerate((self.series[t0:t1, 1], self.series[t0:t1, 2],
                                     self.area[t0:t1], self.units[t0:t1])):
                out.copy_(torch.stack([p[i] for p in self.pending]))
        self.pending, self.written = [], t1

    def report(self, t: int) -> None:
        """``print_iter``: the mean energy, reward, area loss and area over the masks; with
        ``debug``, one line per mask as well."""
        self.write_history()
        self.fill_energy(t, t + 1)
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

    def fill_energy(self, t0: int, t1: int) -> None:
        """``energy = weight · area_loss − reward / reward_scale`` for iterations ``t0:t1``."""
        s = self.series[t0:t1]
        torch.sub(self.weights[t0:t1, None] * s[:, 2], s[:, 1] / self.units[t0:t1],
                  out=s[:, 0])

    def check_finite(self, done: int) -> None:
        """Stop with a clear error once the reward of the first ``done`` iterations is not
        finite (checked every 50 iterations: each check waits for the device)."""
        self.write_history()
        bad = ~torch.isfinite(self.series[:done, 1]).all(dim=1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise ValueError(
                f"extremal_perturbation: the reward became non-finite (NaN or inf) at iteration "
                f"{first}: the model's output is not finite for some perturbed images")

    def result(self) -> Tuple[torch.Tensor, ExtremalHistory]:
        """The masks of the last iteration and the history."""
        self.check_finite(self.cfg.max_iter)
        self.fill_energy(0, self.cfg.max_iter)
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
    target : int, sequence of int, 1-D integer tensor or array, or callable
        The class to explain: one for all images, or one per image (NumPy integers and
        integer arrays too); or a callable ``output -> (B,)`` giving the score to preserve
        (or delete) of every row of the model output, for any output (a dict, a tuple, a
        score map to pool): it is called on the whole batch of ``N·K`` perturbed images
        (``2·N·K`` for ``"dual"``), so it must score each row on its own, e.g.
        ``target=lambda out: out["logits"][:, 3]``.  It replaces ``reward_func``.
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
        it), else one class per mask (``(N·K,)``, sample-major).  :func:`simple_reward` (the
        default: the target's own score), :func:`contrastive_reward`, or your own (TorchRay's
        interface; a callable ``target`` is the simpler way to explain another quantity).
    resize : bool, int or tuple
        Resize the returned masks (see :func:`~torchray_like.attribution.maps.resize_saliency`);
        masks are computed at the input's resolution already.
    resize_mode : str
        Interpolation mode for ``resize``.
    smooth : float
        If positive, Gaussian smoothing of the returned masks with ``sigma = smooth·max(size)``.
        (NumPy scalars and 1-D arrays are accepted for every number or list of numbers.)
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
        of the wrong length or out of range, a seed-gradient target, a callable target together
        with a ``reward_func``, NaN in the input, a channels-last batch, a step too large for
        sigma ...), for a model that fails on an unbatched image (with the ``unsqueeze`` to
        apply), and for a model whose output is not finite.

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
    check_model(model)
    check_batch(model, input, "extremal_perturbation", needs_grad=True)
    spatial = tuple(input.shape[2:])
    parsed = _check_target(target, input, reward_func)
    area_list = _check_areas(areas)
    steps, sigmas = _check_grid(step, sigma, spatial)
    cfg = _Config(
        target=parsed, reward_func=None if reward_func is simple_reward else reward_func,
        reward_target=_reward_target(target, parsed, len(area_list)), areas=area_list,
        variant=_check_choice(variant, "variant", VARIANTS),
        perturbation=_check_choice(perturbation, "perturbation", PERTURBATIONS),
        # num_levels, max_blur and fade_to are checked by Perturbation, before any pass.
        num_levels=num_levels, max_blur=max_blur, fade_to=fade_to,
        max_iter=_check_iterations(max_iter), steps=steps, sigmas=sigmas,
        jitter=tuple((int(s) // 2) if jitter else 0 for s in steps),
        temperature=_check_temperature(temperature),
        learning_rate=_check_positive(learning_rate, "learning_rate"),
        momentum=check_number(momentum, "momentum", 0, 1, high_open=True),
        dampening=check_number(dampening, "dampening", 0, 1),
        weights=_check_area_weight(area_weight), reward_scale=_check_reward_scale(reward_scale),
        seeds=tuple(image_seeds(generator, input.shape[0])),
        print_iter=None if print_iter is None else positive_int(print_iter, "print_iter"),
        debug=check_flag(debug, "debug"), progress=check_progress(progress),
        flush_denormals=check_flag(flush_denormals, "flush_denormals"),
        autocast=check_autocast(autocast, input.device),
        resize=check_resize(resize, resize_mode, len(spatial)), resize_mode=resize_mode,
        smooth=check_smooth(float(smooth) if is_number(smooth) else smooth))
    run = _Optimisation(model, input, cfg)
    with model_state_guard(model), torch.enable_grad(), flushing(cfg.flush_denormals), \
            progress_bar(cfg.max_iter, cfg.progress, "extremal perturbation") as bar:
        for t in range(cfg.max_iter):
            run.iterate(t)
            bar.update(1)
    masks, history = run.result()
    # Not maps.finish_map, which casts to the input's dtype: masks of half-precision inputs
    # stay in the single precision they were optimised in.
    masks = resize_saliency(input, masks, cfg.resize, cfg.resize_mode)
    if cfg.smooth:
        masks = smooth_saliency(masks, cfg.smooth * max(masks.shape[2:]))
    return masks, history
