r"""The optimisation behind :func:`~.extremal_perturbation.extremal_perturbation`.

Fong, Patrick, Vedaldi, "Understanding deep networks via extremal perturbations and smooth masks",
ICCV 2019 (arXiv 1910.08485).

:class:`ExtremalConfig` holds one call's validated arguments (checked by
:mod:`~torchray_like.attribution.extremal_perturbation` before any forward pass);
:class:`MaskOptimisation` is the state of the call: the perturbation pyramid, the mask generator,
the optimiser, the jitter shifts and the history.  Each iteration perturbs the image by the
(jittered) masks, scores the batch, and moves the masks' parameters down the gradient of the
energy ``λ_t · area_loss − reward / reward_scale`` (see the method's module notes for the
settings and why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .extremal_rewards import DELETE_VARIANT, DUAL_VARIANT, PRESERVE_VARIANT, RewardFunc
from .inputs import call_model
from .maps import samples_text, warn_degenerate
from .mask_optimizer import (
    ExtremalHistory,
    MaskOptimizer,
    RewardScale,
    area_ones,
    ranking_loss_and_gradient,
)
from .perturbation_pyramid import Perturbation
from .precision import autocast_forward
from .smooth_masks import shared_generator
from .state import autograd_grad
from .targets import Target, check_output_tensor

__all__ = ["REWARD_RATIO", "ExtremalConfig", "MaskOptimisation"]

#: With ``reward_scale="auto"``: the reward's pull on the best pixels at the start, as a share of
#: the area constraint's pull on a pixel at the wrong end.
REWARD_RATIO = 0.25


@dataclass(frozen=True)
class ExtremalConfig:
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
    bound = torch.tensor(jitter, dtype=torch.long, device="cpu")  # whatever the default
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        u = torch.randint(-2 ** 30, 2 ** 30, (iters, k, len(jitter)), generator=g,
                          device="cpu")
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


class MaskOptimisation:
    """One call's state: the pyramid, the mask generator, the optimiser, the history."""

    def __init__(self, model: nn.Module, input: torch.Tensor, cfg: ExtremalConfig) -> None:
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

    def check_varied(self) -> None:
        """Warn (:class:`~.maps.DegenerateMapWarning`) for the images whose reward never
        changed while their masks moved (read from the history): their masks followed the area
        constraint alone.  Checked over two iterations or more."""
        rewards = self.series[:self.cfg.max_iter, 1]
        if rewards.shape[0] < 2:
            return
        same = (rewards == rewards[:1]).all(0).view(-1, len(self.cfg.areas)).all(1)
        if bool(same.any()):
            rows = same.nonzero().flatten().tolist()
            warn_degenerate(
                f"extremal_perturbation: the reward never changed over {rewards.shape[0]} "
                f"iterations for sample(s) {samples_text(rows)}: the target's score does not "
                "depend on the input there, the perturbation leaves the image unchanged (a "
                "constant image is its own blur), or a step, rounding or a saturated "
                "sigmoid/softmax hides the change — the masks follow the area constraint alone "
                "and say nothing about the target (explain the logit, or check the model)")

    def result(self) -> Tuple[torch.Tensor, ExtremalHistory]:
        """The masks of the last iteration and the history."""
        self.check_finite(self.cfg.max_iter)
        self.check_varied()
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
