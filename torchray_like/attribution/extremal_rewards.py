r"""The rewards of extremal perturbations (Fong, Patrick, Vedaldi, ICCV 2019): what the mask
optimisation maximises, given the model output for the perturbed batch — TorchRay's
``reward_func(activation, target, variant)`` interface.  :mod:`.extremal_perturbation`
re-exports every name here (TorchRay's import path).
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from .targets import check_output_tensor, class_indices, target_logits

__all__ = ["PRESERVE_VARIANT", "DELETE_VARIANT", "DUAL_VARIANT", "VARIANTS", "simple_reward",
           "contrastive_reward", "RewardFunc", "TargetArg"]

#: Keep the masked region, perturb the rest; maximise the class score.
PRESERVE_VARIANT = "preserve"
#: Perturb the masked region; minimise the class score.
DELETE_VARIANT = "delete"
#: Both games at once: reward = preserve score − delete score.
DUAL_VARIANT = "dual"
VARIANTS = (PRESERVE_VARIANT, DELETE_VARIANT, DUAL_VARIANT)

TargetArg = Union[int, Sequence[int], torch.Tensor, Callable[[Any], torch.Tensor]]
RewardFunc = Callable[[Any, Union[int, torch.Tensor], str], torch.Tensor]


def _halves(activation: Any, target: Any, variant: str, name: str
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The outputs to score, ``(keep, drop)`` (``drop`` only for ``"dual"``), and the target as
    one class index per row of ``keep``."""
    if variant not in VARIANTS:
        raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {variant!r}")
    rows = check_output_tensor(activation, name).shape[0]
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
    assert drop is not None  # "dual": _halves gives the deleted half
    return score - _contrast(drop, idx)
