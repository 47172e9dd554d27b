r"""Targets: what to explain, as class indices, seed gradients or scores.

One home for the rules every method shares: how a target (an int, one class per sample, a seed
tensor, a callable) is validated, and the single-logit (binary head) convention.

A target is parsed **once**, at the entry of a method, by :func:`parse_target` into a
:class:`Target`: everything that needs no forward pass is checked there (a missing target,
booleans, floats, class indices beyond int64, lengths against the batch, meta tensors), and the
value then answers the two questions the methods ask of the model output —
:meth:`Target.seed` (the backpropagation methods: what to differentiate, and its seed
gradient) and :meth:`Target.scores` (the perturbation methods: the target's score of every
output row).  A callable target therefore works the same way for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .context import TorchRayDifferenceWarning
from .reporting import warn_caller

__all__ = ["get_backward_gradient", "get_pointing_gradient", "class_indices", "TargetType",
           "Target", "parse_target", "backward_seed", "class_seed", "check_output_tensor",
           "target_logits", "output_scores", "SCORES", "check_score_dtype",
           "check_output_dtype"]

TargetType = Union[int, Sequence[int], torch.Tensor, Callable[[Any], torch.Tensor]]


_INT64 = (-(2 ** 63), 2 ** 63 - 1)


_META_TARGET = ("target is on the meta device (a tensor without values); pass class indices as "
                "ints or as a tensor with values")


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
    if isinstance(target, (bool, np.bool_)) or (isinstance(target, torch.Tensor)
                                                and target.dtype == torch.bool):
        raise TypeError(f"target must be a class index (int), got the boolean {target!r}")
    if isinstance(target, Integral):
        _check_int64(int(target))
        return torch.full((batch,), int(target), dtype=torch.long, device=device)
    if isinstance(target, Real):
        raise ValueError(
            f"target must be an integer class index, got the float {target!r}; pass "
            f"int({target!r}) or a tensor shaped like the output for a custom seed gradient")
    if isinstance(target, torch.Tensor):
        if target.is_meta:  # (no value to read or copy: PyTorch's own errors)
            raise ValueError(_META_TARGET)
        if target.dim() == 0 and not (target.is_floating_point() or target.is_complex()):
            return torch.full((batch,), int(target), dtype=torch.long, device=device)
        idx = _tensor_indices(target, device)
    elif isinstance(target, (list, tuple, range)) or (
            hasattr(target, "__len__") and hasattr(target, "__getitem__")
            and not isinstance(target, (str, bytes, dict))):
        idx = _sequence_indices(list(target), device)
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


def _tensor_indices(target: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    if target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"target is a {target.dtype} tensor of shape {tuple(target.shape)}: a floating "
            "target is a seed gradient and must have the output's shape; class indices must "
            "be an integer tensor")
    if target.dim() != 1:
        raise ValueError(
            f"target class indices must be an int or a 1-D tensor with one class per "
            f"sample, got shape {tuple(target.shape)}")
    return target.to(device=device, dtype=torch.long)


def _sequence_indices(values: List[Any], device: Union[str, torch.device]) -> torch.Tensor:
    # 0-d integer tensors are class indices too (list(t) of a 1-D tensor, [y.argmax() ...]).
    values = [int(v) if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_meta
              and not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool)
              else v for v in values]
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, Integral):
            kind = ("float" if isinstance(v, Real) and not isinstance(v, (bool, np.bool_))
                    else type(v).__name__)
            raise ValueError(
                f"target sequence must hold integer class indices, found the {kind} {v!r}")
    for v in values:
        _check_int64(int(v))
    return torch.tensor([int(v) for v in values], dtype=torch.long, device=device)


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
    """Say once per call site (the user's line) that target 0 of an ``(N, 1)`` head is not
    TorchRay's number."""
    warn_caller(
        "target 0 on a single-logit head of shape (N, 1) explains -logit (the probability "
        "1 - sigmoid(z) of class 0); TorchRay reads it as column 0, i.e. +logit. For TorchRay's "
        "number pass target=1 (or the seed torch.ones_like(output)).",
        TorchRayDifferenceWarning)


def binary_sign(idx: torch.Tensor) -> torch.Tensor:
    """The sign that explains class ``idx`` of a single-logit head with logit ``z``.

    The logistic of ``z`` is the two-class softmax with logits ``(-z/2, +z/2)``, so class 1 is
    explained by ``+z`` and class 0 by ``-z``: the sign is ``2 idx - 1``.
    """
    return idx * 2 - 1


def check_target_range(output: torch.Tensor, idx: torch.Tensor) -> None:
    """Check class indices ``idx`` against a model output: ``{0, 1}`` for a binary head,
    ``0 .. C-1`` for ``(N, C, ...)`` scores; a :class:`ValueError` says what is valid.  An
    integer output is refused first (:func:`check_output_dtype`): an ``(N,)`` argmax is no
    binary head."""
    check_output_dtype(output)
    if is_binary_head(output):
        check_class_range(idx, 0, 2, BINARY_HEAD_RULE)
    else:
        c = output.shape[1]
        check_class_range(idx, 0, c, f"the model output has {c} classes (valid: 0..{c - 1})")


def check_output_dtype(output: Any, name: str = "") -> None:
    """Refuse a non-floating tensor output (a :class:`TypeError` starting with ``name``): an
    integer or boolean output (argmax, labels, a threshold) is already rounded, so autograd
    cannot differentiate it and a perturbation changes it only when the prediction flips."""
    if isinstance(output, torch.Tensor) and not output.is_floating_point():
        raise TypeError(
            f"{name + ': ' if name else ''}the model output has dtype {output.dtype} (shape "
            f"{tuple(output.shape)}); it must be floating point: an integer or boolean output "
            "(argmax, predicted labels, a threshold) is already rounded, so no map can explain "
            "it. Make the model return the logits or probabilities (before argmax, .long() or "
            "the threshold), or pass a callable target that reads floating scores from it")


def check_output_tensor(output: Any, name: str) -> torch.Tensor:
    """``output`` if it is a tensor with a batch dimension; else a :class:`TypeError` (another
    type: say to pass a callable target) or :class:`ValueError` (a scalar), starting with
    ``name``."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{name}: the model returned a {type(output).__name__}, not a tensor; pass a "
            "callable target that maps the output to one score per row, e.g. "
            "target=lambda out: out['logits'][:, 3]")
    if output.dim() == 0:
        raise ValueError(f"{name}: the model output is a scalar; it needs a batch dimension")
    check_output_dtype(output, name)
    return output


def target_logits(output: Any, idx: torch.Tensor, name: str) -> torch.Tensor:
    """One score per row: ``output[i, idx[i]]`` (summed over score-map positions), or ``±z`` for
    a single-logit head (:func:`binary_sign`).  ``name`` starts the error messages."""
    check_output_tensor(output, name)
    if output.shape[0] != idx.shape[0]:
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
        check_score_dtype(s, "", "score")
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
            "a callable target mapping the output to one score per row (e.g. target=lambda "
            "out: out['logits'].softmax(1)[:, 3]), or score=callable mapping it to (batch, K) "
            "scores, e.g. score=lambda out: out['logits'].softmax(1)")
    check_output_dtype(output)
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
    _check_output(pred_y)
    if isinstance(y, torch.Tensor) and y.is_floating_point():
        return _given_seed(pred_y, y)
    if pred_y.dim() == 0:
        raise ValueError("the model output is a scalar; it needs a batch dimension")
    return class_seed(pred_y, class_indices(y, pred_y.shape[0], pred_y.device))


def _check_output(pred_y: Any) -> None:
    if not isinstance(pred_y, torch.Tensor):
        raise TypeError(
            f"the model returned a {type(pred_y).__name__}, not a tensor: pass a callable target "
            "that maps the output to one score per sample, e.g. target=lambda out: "
            "out['logits'][:, 3]")
    check_output_dtype(pred_y)


def _given_seed(pred_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.shape != pred_y.shape:
        raise ValueError(
            f"a floating target is a seed gradient and must have the output's shape "
            f"{tuple(pred_y.shape)}, got {tuple(y.shape)}; class indices must be integers")
    return y.to(device=pred_y.device, dtype=pred_y.dtype)


def class_seed(pred_y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The seed gradient of class indices ``idx`` ``(N,)`` (on ``pred_y``'s device): one-hot at
    the class (over every position of a score map), or ``±1`` for a single-logit head.  The
    range is checked against ``pred_y``."""
    check_target_range(pred_y, idx)
    if is_binary_head(pred_y):
        if pred_y.dim() == 2 and bool((idx == 0).any()):
            warn_binary_target_zero()
        return binary_sign(idx).to(pred_y.dtype).view(pred_y.shape)
    seed = torch.zeros_like(pred_y)
    seed[torch.arange(pred_y.shape[0], device=pred_y.device), idx] = 1
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


def check_score_dtype(scores: torch.Tensor, name: str, argument: str = "target") -> None:
    """Refuse the scores of a callable ``target`` (or ``score``) that are not floating point
    (a :class:`TypeError` naming the argument).  Integer or boolean scores are already
    rounded by the function (``.long()``, ``argmax``, a comparison): casting them afterwards
    cannot restore the differences the perturbation methods measure, and autograd cannot
    differentiate them."""
    if not scores.is_floating_point():
        raise TypeError(
            f"{name + ': ' if name else ''}{argument} is a callable that returned scores of "
            f"dtype {scores.dtype}; scores must be floating point (an integer or boolean score "
            "is already rounded, so the map would be wrong): return the logits or "
            f"probabilities as they are, e.g. {argument}=lambda out: out"
            f"{'[:, 3]' if argument == 'target' else '.softmax(1)'}, without .long(), .int() "
            "or argmax")


def target_scores(output: Any, target: Callable, batch: int) -> torch.Tensor:
    """Evaluate a callable target on the model output and check it gives ``(batch,)`` scores
    that autograd can differentiate (the backpropagation methods' view)."""
    scores = target(output)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"a callable target must return a tensor of {batch} scores, got "
            f"{type(scores).__name__}")
    check_score_dtype(scores, "")
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


def _row_scores(output: Any, target: Callable, rows: int, name: str) -> torch.Tensor:
    """A callable target's ``(rows,)`` scores of a forward batch (the perturbation methods'
    view: the rows are perturbed copies of the images, so the function must score each row on
    its own, whatever its position)."""
    scores = target(output)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"{name}: a callable target must return a tensor of one score per row of the model "
            f"output, got {type(scores).__name__}")
    check_score_dtype(scores, name)
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (rows,):
        raise ValueError(
            f"{name}: a callable target must return one score per row of the model output, "
            f"shape ({rows},) for a forward batch of {rows}, got {tuple(scores.shape)}; it is "
            "called on batches of perturbed copies of the images, so it must score each row "
            "on its own (e.g. target=lambda out: out['logits'][:, 3])")
    return scores


#: Why a target is needed, said by every method that needs one.
TARGET_REQUIRED = ("target is required: an int class, one class per sample, a seed-gradient "
                   "tensor, or a callable output -> (N,) scores")


@dataclass(frozen=True, eq=False)
class Target:
    """A target parsed by :func:`parse_target`: exactly one of ``indices``, ``seed_gradient``
    and ``function`` is set (none of them for "no target", where a method allows it).

    Attributes
    ----------
    batch : int
        The number of samples it was parsed for.
    indices : torch.Tensor or None
        ``(batch,)`` long class indices.
    seed_gradient : torch.Tensor or None
        A floating tensor shaped like the model output, used as the seed gradient as it is.
    function : callable or None
        ``output -> (N,)`` scores.
    given : object
        The target as the caller gave it: a custom ``get_backward_gradient(output, target)``
        receives it unchanged, as in TorchRay.
    classes : tuple of int or None
        ``indices`` as Python ints, when the target was given as ints (an int or a sequence):
        the seed and its range check then need no reading back from the tensor.
    """

    batch: int
    indices: Optional[torch.Tensor] = None
    seed_gradient: Optional[torch.Tensor] = None
    function: Optional[Callable[[Any], torch.Tensor]] = None
    given: Any = None
    classes: Optional[Tuple[int, ...]] = None

    @property
    def kind(self) -> str:
        """``"classes"``, ``"seed"``, ``"callable"`` or ``"none"``."""
        if self.indices is not None:
            return "classes"
        if self.seed_gradient is not None:
            return "seed"
        return "callable" if self.function is not None else "none"

    def on(self, device: Union[str, torch.device]) -> "Target":
        """The same target with its class indices on ``device`` (moved once, not per pass)."""
        if self.indices is None or self.indices.device == torch.device(device):
            return self
        return replace(self, indices=self.indices.to(device))

    def seed(self, output: Any, get_backward_gradient: Callable = get_backward_gradient
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(tensor, seed)`` to differentiate for the model output ``output``.

        A callable target gives its ``(N,)`` scores with a seed of ones; otherwise the tensor is
        the output and the seed is shaped like it: from ``get_backward_gradient(output,
        given)`` for a custom function, else one-hot at the class indices (or the seed
        gradient itself).  Exactly what :func:`backward_seed` gives.
        """
        if self.function is not None:
            scores = target_scores(output, self.function, self.batch)
            return scores, torch.ones_like(scores)
        if self.kind == "none":
            raise ValueError(TARGET_REQUIRED)
        _check_output(output)    # a seed shaped like the output needs a tensor output
        if output.dim() == 0 or output.shape[0] != self.batch:
            raise ValueError(
                f"the model output has shape {tuple(output.shape)}, whose first dimension is not "
                f"the batch size {self.batch}; pass a callable target for outputs of another "
                "layout")
        if get_backward_gradient is _ONE_HOT:
            seed = self._own_seed(output)
        else:
            seed = get_backward_gradient(output, self.given)
        if not isinstance(seed, torch.Tensor) or seed.shape != output.shape:
            got = tuple(seed.shape) if isinstance(seed, torch.Tensor) else type(seed).__name__
            raise ValueError(
                f"get_backward_gradient must return a tensor shaped like the output "
                f"{tuple(output.shape)}, got {got}")
        return output, seed

    def _own_seed(self, output: torch.Tensor) -> torch.Tensor:
        """What :func:`get_backward_gradient` gives, without parsing the target again."""
        if self.seed_gradient is not None:
            return _given_seed(output, self.seed_gradient)
        assert self.indices is not None
        classes = self.classes
        if (classes is not None and len(classes) <= _FEW and not is_binary_head(output)
                and 0 <= min(classes) and max(classes) < output.shape[1]):
            # Class indices known as ints and in range: the same one-hot, set row by row,
            # without reading the indices back from a tensor (a short call's fixed cost).
            seed = torch.zeros_like(output)
            for row, c in enumerate(classes):
                seed[row, c] = 1
            return seed
        return class_seed(output, self.indices.to(output.device))

    def check_range(self, output: Any, num_classes: Optional[int] = None,
                    binary: bool = False) -> None:
        """Check the class indices against ``num_classes`` scores (``binary``: a single-logit
        head, classes 0 and 1) or, without them, against a tensor ``output`` (its classes, or
        the binary rule).  Nothing to check for other targets or outputs."""
        if self.indices is None:
            return
        if binary:
            check_class_range(self.indices, 0, 2, BINARY_HEAD_RULE)
        elif num_classes is not None:
            check_class_range(self.indices, 0, num_classes,
                              f"the scores have {num_classes} classes (valid: "
                              f"0..{num_classes - 1})")
        elif isinstance(output, torch.Tensor) and output.dim() > 0:
            check_target_range(output, self.indices)

    def scores(self, output: Any, score: Union[None, str, Callable[[Any], torch.Tensor]] = None,
               *, samples: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
               check_range: bool = True, name: str = "target") -> torch.Tensor:
        """The target's score of every row of a forward batch (the perturbation methods).

        Parameters
        ----------
        output : Any
            The model output for a batch of ``B`` rows.
        score : None, {"softmax", "sigmoid", "logit"} or callable
            How class indices are scored: ``None`` reads the output as the backpropagation
            seed does (``output[i, c]``, summed over a score map; ``±z`` for a single-logit
            head); a name or a callable ``output -> (B, K)`` goes through
            :func:`output_scores`.
        samples : torch.Tensor, optional
            ``(B,)`` the sample (image) of each row; default ``arange(batch)``.
        dtype : torch.dtype, optional
            The dtype of the scores of a ``score`` function (default: the output's).
        check_range : bool
            Check the class indices against the output's classes first.  The check waits for
            the device: a method calling this for every forward pass checks the first one only
            and passes ``False`` afterwards (the classes do not change).
        name : str
            Starts the error messages (the method's name).

        Returns
        -------
        torch.Tensor
            ``(B,)`` scores; ``(B, K)`` every class's when there is no target.  A callable
            target gives its own ``(B,)`` scores whatever ``score`` is.
        """
        rows = self.batch if samples is None else samples.shape[0]
        if self.function is not None:
            out = _row_scores(output, self.function, rows, name)
            return out if dtype is None else out.to(dtype)
        if self.seed_gradient is not None:
            raise ValueError(f"{name}: {SEED_NOT_A_SCORE}")
        check_output_dtype(output, name)  # before the range check reads it as a binary head
        idx = self._rows(samples)
        if score is None:
            if idx is None:
                raise ValueError(f"{name}: {TARGET_REQUIRED}")
            if check_range:
                self.check_range(output)
            return target_logits(output, idx, name)
        table = output_scores(output, score, rows, dtype or _dtype_of(output))
        if check_range:
            self.check_range(output, table.shape[1], binary=not callable(score) and isinstance(
                output, torch.Tensor) and is_binary_head(output))
        return table if idx is None else table.gather(1, idx.view(-1, 1))[:, 0]

    def _rows(self, samples: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.indices is None or samples is None:
            return self.indices
        return self.indices.index_select(0, samples.to(self.indices.device))


_ONE_HOT = get_backward_gradient
_FEW = 8  # up to this many rows, a one-hot seed is set row by row from Python ints

#: Why a seed-gradient target does not score a perturbed image.
SEED_NOT_A_SCORE = (
    "target must hold integer class indices or be a callable output -> one score per row; a "
    "floating tensor is a seed gradient, which only the backpropagation methods use (to "
    "weight the output, pass target=lambda out: (out * w).flatten(1).sum(1))")


def _dtype_of(output: Any) -> torch.dtype:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.dtype
    return torch.get_default_dtype()


def _from_numpy(target: Any) -> Any:
    """A NumPy array of class indices as a tensor (other NumPy values are left as they are)."""
    if not isinstance(target, np.ndarray):
        return target
    if target.dtype == np.bool_:
        raise TypeError(f"target must be class indices (ints), got a boolean array {target!r}")
    if target.dtype.kind not in "iu":
        raise ValueError(
            f"target is a {target.dtype} NumPy array: class indices must be integers (a seed "
            "gradient must be a torch tensor shaped like the model output)")
    if target.size and target.dtype.kind == "u" and int(target.max()) > _INT64[1]:
        raise ValueError(
            f"target class {int(target.max())} is out of range: class indices must be between 0 "
            "and the number of classes - 1")
    return torch.tensor(target.astype(np.int64))


def parse_target(target: Any, batch: int, *, allow_none: bool = False,
                 device: Union[str, torch.device, None] = None) -> Target:
    """Parse a method's ``target`` once, at entry, into a :class:`Target`.

    Parameters
    ----------
    target : None, int, sequence of int, integer tensor or array, floating tensor, or callable
        * an int (a NumPy integer too): that class for every sample;
        * a sequence, 1-D integer tensor or 1-D NumPy integer array: one class per sample;
        * a floating tensor shaped like the model output: a seed gradient, used as it is;
        * a callable ``output -> (N,)``: the scores to explain (any output: tuples, dicts,
          regression);
        * ``None``: only where ``allow_none`` (RISE: every class).
    batch : int
        The number of samples.
    allow_none : bool
        Whether "no target" is allowed; otherwise ``None`` is a :class:`ValueError`.
    device : str or torch.device, optional
        Where to put the class indices (default: the target tensor's device, else the CPU).

    Returns
    -------
    Target

    Raises
    ------
    TypeError
        Booleans, strings and other types.
    ValueError
        A missing target, floats, class indices beyond int64, a length that is not ``batch``,
        a target on the meta device, a seed gradient whose first dimension is not ``batch``.
    """
    if target is None:
        if allow_none:
            return Target(batch)
        raise ValueError(TARGET_REQUIRED)
    if callable(target) and not isinstance(target, torch.Tensor):
        return Target(batch, function=target, given=target)
    value = _from_numpy(target)
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            raise ValueError(_META_TARGET)
        if value.is_floating_point():
            if value.dim() == 0 or value.shape[0] != batch:
                raise ValueError(
                    f"a floating target is a seed gradient and must have the output's shape, "
                    f"batch first ({batch}, ...); got {tuple(value.shape)}; class indices must "
                    "be integers")
            return Target(batch, seed_gradient=value, given=target)
        if device is None:
            device = value.device
    indices = class_indices(value, batch, "cpu" if device is None else device)
    classes: Optional[Tuple[int, ...]] = None
    if isinstance(value, Integral):
        classes = (int(value),) * batch
    elif isinstance(value, (list, tuple, range)):
        classes = tuple(int(v) for v in value)  # class_indices checked they are ints
    return Target(batch, indices=indices, given=target, classes=classes)


def backward_seed(output: Any, target: TargetType, batch: int,
                  get_backward_gradient: Callable = get_backward_gradient
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(tensor, seed)`` to differentiate: the scores and their seed gradient.

    ``parse_target(target, batch).seed(output, get_backward_gradient)``: a callable ``target``
    is evaluated on the output (one score per sample, seed one); otherwise
    ``get_backward_gradient(output, target)`` gives a seed shaped like the output.  Methods
    that parse their target at entry call :meth:`Target.seed` directly.
    """
    return parse_target(target, batch).seed(output, get_backward_gradient)
