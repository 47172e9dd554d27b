r"""Targets: what to explain, as class indices, seed gradients or scores.

One home for the rules every method shares: how a target (an int, one class per sample, a seed
tensor, a callable) is validated, and the single-logit (binary head) convention.
"""

from __future__ import annotations

import warnings
from numbers import Integral
from typing import Any, Callable, Sequence, Tuple, Union

import torch

from .context import TorchRayDifferenceWarning

__all__ = ["get_backward_gradient", "get_pointing_gradient", "class_indices", "TargetType"]

TargetType = Union[int, Sequence[int], torch.Tensor, Callable[[Any], torch.Tensor]]


_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _check_int64(value: int) -> None:
    # A Python int beyond int64 cannot be a class index; torch would raise OverflowError.
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(
            f"target class {value} is out of range: class indices must be between 0 and the "
            "number of classes - 1")


def class_indices(target: Any, batch: int, device: Union[str, torch.device] = "cpu"
                  ) -> torch.Tensor:
    """Turn an int, a sequence of ints or a 1-D integer tensor into a ``(batch,)`` long tensor.

    Raises :class:`ValueError` for floats, wrong lengths and wrong ranks, :class:`TypeError` for
    booleans and other types.  The range is not checked (see :func:`check_class_range`).
    """
    if isinstance(target, bool) or (isinstance(target, torch.Tensor)
                                    and target.dtype == torch.bool):
        raise TypeError(f"target must be a class index (int), got the boolean {target!r}")
    if isinstance(target, Integral):
        _check_int64(int(target))
        return torch.full((batch,), int(target), dtype=torch.long, device=device)
    if isinstance(target, float):
        raise ValueError(
            f"target must be an integer class index, got the float {target!r}; pass "
            f"int({target!r}) or a tensor shaped like the output for a custom seed gradient")
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex():
            raise ValueError(
                f"target is a {target.dtype} tensor of shape {tuple(target.shape)}: a floating "
                "target is a seed gradient and must have the output's shape; class indices must "
                "be an integer tensor")
        if target.dim() == 0:
            return torch.full((batch,), int(target), dtype=torch.long, device=device)
        if target.dim() != 1:
            raise ValueError(
                f"target class indices must be an int or a 1-D tensor with one class per "
                f"sample, got shape {tuple(target.shape)}")
        idx = target.to(device=device, dtype=torch.long)
    elif isinstance(target, (list, tuple, range)) or (
            hasattr(target, "__len__") and hasattr(target, "__getitem__")
            and not isinstance(target, (str, bytes, dict))):
        values = list(target)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, Integral):
                kind = "float" if isinstance(v, float) else type(v).__name__
                raise ValueError(
                    f"target sequence must hold integer class indices, found the {kind} {v!r}")
        for v in values:
            _check_int64(int(v))
        idx = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
    else:
        raise TypeError(
            "target must be an int, a sequence / 1-D integer tensor of one class per sample, a "
            "tensor shaped like the model output (a seed gradient), or a callable output -> "
            f"(N,) scores; got {type(target).__name__}")
    if idx.numel() != batch:
        raise ValueError(
            f"target has {idx.numel()} class indices but the batch has {batch} samples; give "
            "one class per sample, or a single int for all")
    return idx


def check_class_range(idx: torch.Tensor, low: int, high: int, what: str) -> None:
    """Raise :class:`ValueError` (ending with ``what``) if an index is outside [low, high)."""
    if idx.numel() and (int(idx.min()) < low or int(idx.max()) >= high):
        bad = idx[(idx < low) | (idx >= high)].tolist()
        raise ValueError(f"target class {bad[0]} is out of range: {what}")


def is_binary_head(pred_y: torch.Tensor) -> bool:
    """Whether a model output is a single-logit (binary) head: ``(N,)`` or ``(N, 1)``."""
    return pred_y.dim() == 1 or (pred_y.dim() == 2 and pred_y.shape[1] == 1)


#: The binary-head convention, said once for every method.
BINARY_HEAD_RULE = ("a single-logit (binary) head takes target 1 (explain +logit, the "
                    "probability sigmoid(z)) or 0 (explain -logit, 1 - sigmoid(z))")


def warn_binary_target_zero() -> None:
    """Say once per call site that target 0 of an ``(N, 1)`` head is not TorchRay's number."""
    warnings.warn(
        "target 0 on a single-logit head of shape (N, 1) explains -logit (the probability "
        "1 - sigmoid(z) of class 0); TorchRay reads it as column 0, i.e. +logit. For TorchRay's "
        "number pass target=1 (or the seed torch.ones_like(output)).",
        TorchRayDifferenceWarning, stacklevel=4)


def binary_sign(idx: torch.Tensor) -> torch.Tensor:
    """The sign that explains class ``idx`` of a single-logit head with logit ``z``.

    The logistic of ``z`` is the two-class softmax with logits ``(-z/2, +z/2)``, so class 1 is
    explained by ``+z`` and class 0 by ``-z``: the sign is ``2 idx - 1``.
    """
    return idx * 2 - 1


def check_target_range(output: torch.Tensor, idx: torch.Tensor) -> None:
    """Check class indices ``idx`` against a model output: ``{0, 1}`` for a binary head,
    ``0 .. C-1`` for ``(N, C, ...)`` scores; a :class:`ValueError` says what is valid."""
    if is_binary_head(output):
        check_class_range(idx, 0, 2, BINARY_HEAD_RULE)
    else:
        c = output.shape[1]
        check_class_range(idx, 0, c, f"the model output has {c} classes (valid: 0..{c - 1})")


def target_logits(output: Any, idx: torch.Tensor, name: str) -> torch.Tensor:
    """One score per row: ``output[i, idx[i]]`` (summed over score-map positions), or ``±z`` for
    a single-logit head (:func:`binary_sign`).  ``name`` starts the error messages."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{name}: the model returned a {type(output).__name__}, not a tensor; pass a "
            "function that extracts the scores from it")
    if output.dim() == 0 or output.shape[0] != idx.shape[0]:
        raise ValueError(
            f"{name}: the model output has shape {tuple(output.shape)}, expected a batch of "
            f"{idx.shape[0]} rows")
    idx = idx.to(output.device)
    if is_binary_head(output):
        return output.reshape(-1) * binary_sign(idx).to(output.dtype)
    scores = output[torch.arange(idx.shape[0], device=output.device), idx]
    return scores.flatten(1).sum(1) if scores.dim() > 1 else scores


#: Names of the class scores :func:`output_scores` computes.
SCORES = ("softmax", "sigmoid", "logit")


def output_scores(output: Any, score: Union[str, Callable[[Any], torch.Tensor]], batch: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Turn a model output into ``(batch, K)`` class scores (the perturbation methods' view).

    ``score`` is ``"softmax"`` (probabilities), ``"sigmoid"`` (multi-label heads), ``"logit"``
    or ``callable(output) -> (batch, K)`` / ``(batch,)``.  A single-logit head has two classes,
    0 and 1: ``1 - sigmoid(z)`` and ``sigmoid(z)`` (softmax and sigmoid agree there, see
    :func:`binary_sign`), or ``-z`` and ``z`` for ``"logit"``.
    """
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
    if is_binary_head(z):
        z = z.reshape(batch, 1)
        logits = torch.cat([-z, z], dim=1)  # classes 0 and 1: binary_sign(0), binary_sign(1)
        return logits if score == "logit" else torch.sigmoid(logits)
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


def get_backward_gradient(pred_y: torch.Tensor, y: TargetType) -> torch.Tensor:
    """Seed gradient for backpropagating from the model output ``pred_y`` for target ``y``.

    Parameters
    ----------
    pred_y : torch.Tensor
        Model output: ``(N, C)`` scores, ``(N, C, *spatial)`` score maps, or a single-logit
        binary head ``(N,)`` / ``(N, 1)``.
    y : int, sequence of int, torch.Tensor
        * an ``int``: that class for every sample;
        * a sequence or 1-D integer tensor: one class per sample (its length must be ``N``);
        * a floating tensor shaped like ``pred_y``: used as the seed gradient as it is.

    Returns
    -------
    torch.Tensor
        Shaped like ``pred_y``: one-hot at the target class (over every spatial position of a
        score map, i.e. explaining the sum of the class's map).

    Notes
    -----
    Binary heads: the logistic of a logit ``z`` equals the two-class softmax with logits
    ``(-z/2, +z/2)``, so class 1 is explained by ``+z`` and class 0 by ``-z`` (seed ``+1`` or
    ``-1``).  Gradient methods are linear in the seed, so explaining class 0 gives the
    negated gradient; rules that rectify the signal (guided backprop, deconvnet) then give a
    genuinely different map.  TorchRay reads target 0 of an ``(N, 1)`` output as column 0, the
    ``+z`` logit: such calls warn once with a
    :class:`~torchray_like.attribution.context.TorchRayDifferenceWarning`; ``target=1`` gives
    TorchRay's number.
    """
    if not isinstance(pred_y, torch.Tensor):
        raise TypeError(
            f"the model returned a {type(pred_y).__name__}, not a tensor: pass a callable target "
            "that maps the output to one score per sample, e.g. target=lambda out: "
            "out['logits'][:, 3]")
    if isinstance(y, torch.Tensor) and y.is_floating_point():
        if y.shape != pred_y.shape:
            raise ValueError(
                f"a floating target is a seed gradient and must have the output's shape "
                f"{tuple(pred_y.shape)}, got {tuple(y.shape)}; class indices must be integers")
        return y.to(device=pred_y.device, dtype=pred_y.dtype)
    if pred_y.dim() == 0:
        raise ValueError("the model output is a scalar; it needs a batch dimension")
    batch = pred_y.shape[0]
    idx = class_indices(y, batch, pred_y.device)
    check_target_range(pred_y, idx)
    if is_binary_head(pred_y):
        if pred_y.dim() == 2 and bool((idx == 0).any()):
            warn_binary_target_zero()
        return binary_sign(idx).to(pred_y.dtype).view(pred_y.shape)
    seed = torch.zeros_like(pred_y)
    seed[torch.arange(batch, device=pred_y.device), idx] = 1
    return seed


def get_pointing_gradient(pred_y: torch.Tensor, y: TargetType,
                          normalize: bool = True) -> torch.Tensor:
    """Seed gradient that points at the most likely location of the target class.

    For score maps ``(N, C, *spatial)`` the seed is, in the target channel, the exponential of
    that channel's scores, ``exp(s[u])``, and zero elsewhere; with ``normalize=True`` (default)
    it is divided by its sum over the spatial positions (a softmax over space, which sums to
    one).  For ``(N, C)`` outputs there is one position: the seed is one-hot (``normalize``) or
    ``exp(score)`` at the target.  Single-logit heads follow :func:`get_backward_gradient`.

    Notes
    -----
    ``normalize=True`` is computed stably (the maximum is subtracted before ``exp``), so it is
    finite for any finite scores.  TorchRay exponentiates first and then divides: its seed
    overflows to ``inf / inf = NaN`` once a float32 score exceeds about 88.7 (about 709 in
    float64), while ours stays the softmax.  ``normalize=False`` is TorchRay's un-normalised
    ``exp`` and overflows the same way (to ``inf``) for such scores.
    """
    if (not isinstance(pred_y, torch.Tensor) or pred_y.dim() < 2 or is_binary_head(pred_y)
            or (isinstance(y, torch.Tensor) and y.is_floating_point())):
        return get_backward_gradient(pred_y, y)
    batch = pred_y.shape[0]
    idx = class_indices(y, batch, pred_y.device)
    check_target_range(pred_y, idx)
    rows = torch.arange(batch, device=pred_y.device)
    scores = pred_y.detach()[rows, idx].reshape(batch, -1)
    weights = torch.softmax(scores, dim=1) if normalize else scores.exp()
    seed = torch.zeros_like(pred_y)
    seed[rows, idx] = weights.view((batch,) + pred_y.shape[2:]).to(pred_y.dtype)
    return seed


def target_scores(output: Any, target: Callable, batch: int) -> torch.Tensor:
    """Evaluate a callable target on the model output and check it gives ``(batch,)`` scores."""
    scores = target(output)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"a callable target must return a tensor of {batch} scores, got "
            f"{type(scores).__name__}")
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (batch,):
        raise ValueError(
            f"a callable target must return one score per sample, shape ({batch},), got "
            f"{tuple(scores.shape)}")
    if not scores.requires_grad:
        raise ValueError(
            "the scores returned by the callable target do not depend on the input through "
            "autograd (did it detach them or convert to Python numbers?)")
    return scores


def backward_seed(output: Any, target: TargetType, batch: int,
                  get_backward_gradient: Callable = get_backward_gradient
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(tensor, seed)`` to differentiate: the scores and their seed gradient.

    A callable ``target`` is evaluated on the output (one score per sample, seed one);
    otherwise ``get_backward_gradient(output, target)`` gives a seed shaped like the output.
    """
    if target is None:
        raise ValueError(
            "target is required: an int class, one class per sample, a seed-gradient tensor, or "
            "a callable output -> (N,) scores")
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target_scores(output, target, batch)
        return scores, torch.ones_like(scores)
    if isinstance(output, torch.Tensor) and (output.dim() == 0 or output.shape[0] != batch):
        raise ValueError(
            f"the model output has shape {tuple(output.shape)}, whose first dimension is not the "
            f"batch size {batch}; pass a callable target for outputs of another layout")
    seed = get_backward_gradient(output, target)
    if not isinstance(seed, torch.Tensor) or seed.shape != output.shape:
        raise ValueError(
            f"get_backward_gradient must return a tensor shaped like the output "
            f"{tuple(output.shape)}, got {getattr(seed, 'shape', type(seed).__name__)}")
    return output, seed
