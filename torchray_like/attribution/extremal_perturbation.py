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
(:mod:`.mask_optimizer`) — are re-exported here; the iterations themselves are
:class:`~torchray_like.attribution.extremal_optimisation.MaskOptimisation`, this module checks
the arguments and drives it.

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
from numbers import Integral
from typing import Any, Optional, Sequence, Tuple, Union

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
from .extremal_optimisation import REWARD_RATIO as REWARD_RATIO  # noqa: F401 (kept importable)
from .extremal_optimisation import ExtremalConfig, MaskOptimisation
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
from .maps import check_smooth, resize_saliency, smooth_saliency
from .mask_optimizer import (
    ExtremalHistory,
    ranking_area_loss,
)
from .modules import check_model
from .perturbation_pyramid import BLUR_PERTURBATION, FADE_PERTURBATION, PERTURBATIONS, Perturbation
from .precision import caller_autocast, check_autocast, without_autocast
from .precision import flush_denormals as flushing
from .reporting import progress_bar, warn_caller
from .seeding import GeneratorsType, image_seeds
from .smooth_masks import MaskGenerator
from .state import model_state_guard
from .targets import SEED_NOT_A_SCORE, Target, parse_target

__all__ = [
    "PRESERVE_VARIANT", "DELETE_VARIANT", "DUAL_VARIANT", "BLUR_PERTURBATION",
    "FADE_PERTURBATION", "VARIANTS", "PERTURBATIONS", "Perturbation", "MaskGenerator",
    "ExtremalHistory", "simple_reward", "contrastive_reward", "ranking_area_loss",
    "extremal_perturbation",
]

#: ``λ`` at the first and the last iteration by default: the authors' ``300 · 1.0035^t`` over
#: 800 iterations.
AREA_WEIGHT = (300.0, 300.0 * 1.0035 ** 799)

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
        stay in float32.  Called inside the caller's ``torch.autocast``, that autocast is this
        option (the model's passes only; the masks are optimised in float32 all the same).

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
    cfg = ExtremalConfig(
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
        autocast=check_autocast(autocast, input.device) or caller_autocast(input.device),
        resize=check_resize(resize, resize_mode, len(spatial)), resize_mode=resize_mode,
        smooth=check_smooth(float(smooth) if is_number(smooth) else smooth))
    # The caller's autocast is cfg.autocast (the forward passes); the masks' own arithmetic
    # (blur, pooling, ranking) stays in float32, as with autocast= (before: NumPy's TypeError
    # on a bfloat16 mask).
    with without_autocast(input.device):
        run = MaskOptimisation(model, input, cfg)
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
