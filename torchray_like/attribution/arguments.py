r"""Argument checks shared by the methods that call the model many times (RISE, extremal
perturbation) and by the benchmarks built on them.

Every check either returns the value in a canonical form (a Python ``int``, ``float``, ``bool``
or list) or raises a :class:`TypeError` / :class:`ValueError` that names the argument and says
what to pass.  NumPy scalars and 1-D arrays are accepted wherever a Python number or a list of
numbers is (``np.float32(0.1)``, ``np.array([0.1, 0.2])``): they are what data pipelines hand
over, and refusing them with "must be a number" would contradict the input.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .inputs import FORWARD_ERRORS, check_input, layout_hint  # FORWARD_ERRORS: re-exported
from .maps import Shape, check_resize_mode

__all__ = ["is_number", "positive_int", "check_number", "check_flag", "check_function",
           "check_not_meta", "check_real",
           "number_list",
           "per_axis", "check_finite", "check_progress", "check_batch", "check_resize",
           "FORWARD_ERRORS"]


def is_number(value: Any) -> bool:
    """A real number that is not a ``bool`` (NumPy scalars included, ``np.bool_`` excluded)."""
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int ≥ 1, or a :class:`TypeError` / :class:`ValueError` naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")
    return int(value)


def check_number(value: Any, name: str, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval, or a :class:`ValueError` naming ``name``."""
    ok = is_number(value) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in {left}{low:g}, {high:g}{right}, "
                         f"got {value!r}")
    return float(value)


def check_flag(value: Any, name: str) -> bool:
    """``value`` as a ``bool`` (``np.bool_`` accepted), or a :class:`TypeError` naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_not_meta(tensor: torch.Tensor, name: str) -> None:
    """A :class:`ValueError` naming ``name`` for a tensor on the meta device: it has no values
    to order, compare, paint or show (reading them is PyTorch's NotImplementedError)."""
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device (a tensor without data); pass a tensor "
                         "with values")


def check_real(tensor: torch.Tensor, name: str) -> None:
    """That ``tensor`` holds real values: :func:`check_not_meta`, and a :class:`TypeError`
    naming ``name`` for a complex tensor (PyTorch's conversions keep its real part with at most
    a warning, and ordering, comparing, rescaling or painting it has no meaning)."""
    check_not_meta(tensor, name)
    if tensor.is_complex():
        raise TypeError(f"{name} is complex; pass its magnitude ({name}.abs()) or its real part "
                        f"({name} must be real, got dtype {tensor.dtype})")


def check_function(value: Any, name: str) -> None:
    """A :class:`TypeError` naming ``name`` when ``value`` cannot be called (Python's own
    "'int' object is not callable", raised later, names no argument).  An instance given
    where a class is expected (``context_builder=GuidedBackpropContext()``) is the usual
    mistake: the message says so."""
    if not callable(value):
        example = ("GuidedBackpropContext, not GuidedBackpropContext()"
                   if name == "context_builder" else "my_function, not my_function(...)")
        raise TypeError(
            f"{name} must be a function (or a class), got {type(value).__name__} "
            f"{value!r:.60}; pass the function itself, not the result of calling it "
            f"({name}={example})")


def number_list(value: Any) -> Optional[List[Any]]:
    """The entries of a list, tuple, ``torch.Size``, 1-D NumPy array or 1-D tensor as a list of
    Python scalars; ``None`` for anything else (a scalar, a string, a 2-D array)."""
    if isinstance(value, (list, tuple, torch.Size)):
        return list(value)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
        return value.tolist()
    return None


def per_axis(value: Any, name: str, spatial: Tuple[int, ...], *, integer: bool, minimum: float,
             strict: bool, time_scaled: bool = False) -> Tuple[float, ...]:
    """Expand ``value`` (one number or one per spatial axis) to one value per axis.

    A scalar is used as is on every axis, except along time for 3-D inputs (``time_scaled``),
    where it is multiplied by ``T / max(H, W)`` (at least 1 for integers).
    """
    d = len(spatial)

    def ok(v: Any) -> bool:
        return (is_number(v) and math.isfinite(v) and (v > minimum if strict else v >= minimum)
                and (not integer or float(v).is_integer()))

    cmp = ">" if strict else "≥"
    kind = "integer" if integer else "number"
    if is_number(value):
        if not ok(value):
            raise ValueError(f"{name} must be a finite {kind} {cmp} {minimum:g}, got {value!r}")
        vals = [float(value)] * d
        if time_scaled and d == 3:
            scaled = float(value) * spatial[0] / max(spatial[1:])
            vals[0] = max(1.0, float(round(scaled))) if integer else scaled
        return tuple(vals)
    values = number_list(value)
    if values is not None:
        if len(values) != d or not all(ok(v) for v in values):
            raise ValueError(
                f"{name} must be one {kind} {cmp} {minimum:g} or {d} of them (one per spatial "
                f"axis, torch order), got {value!r}")
        return tuple(float(v) for v in values)
    raise TypeError(f"{name} must be a number or a sequence of {d} numbers, got "
                    f"{type(value).__name__}")


def check_finite(tensor: torch.Tensor, name: str, method: str) -> None:
    """A :class:`ValueError` naming ``name`` if ``tensor`` holds a NaN or an infinity.

    One reduction over the tensor (and one device synchronisation): cheap next to the forward
    passes of a perturbation method, and it turns a silently NaN map (or an opaque indexing
    error deep inside the method) into a message that says where the bad value is.
    """
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = []
        if bool(torch.isnan(tensor).any()):
            kinds.append("NaN")
        if bool(torch.isinf(tensor).any()):
            kinds.append("infinite")
        raise ValueError(
            f"{method}: {name} has {bad} {' and '.join(kinds)} value(s) (shape "
            f"{tuple(tensor.shape)}); replace them first, e.g. with torch.nan_to_num({name})")


def check_progress(progress: Any) -> Optional[bool]:
    """``progress`` is ``True``, ``False`` or ``None`` (automatic); returned as such."""
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
    return None if progress is None else bool(progress)


def check_batch(model: nn.Module, input: Any, method: str, needs_grad: bool) -> torch.Tensor:
    """The input of a perturbation method: a finite floating batch ``(N, C, *spatial)`` with 1
    to 3 spatial dimensions, not channels last for the model's first convolution.

    A channels-last batch is refused before any forward pass, with the ``permute`` to apply
    (:func:`~torchray_like.attribution.inputs.layout_hint`); an unbatched image is reported
    when the model fails on it (:func:`~torchray_like.attribution.inputs.forward_failure`),
    because some models reshape their input themselves.
    """
    check_input(input, "input", needs_grad=needs_grad)
    if input.dim() > 5:
        raise ValueError(
            f"input must be (N, C, L), (N, C, H, W) or (N, C, T, H, W) (1 to 3 spatial "
            f"dimensions), got shape {tuple(input.shape)}")
    hint = layout_hint(model, input, certain_only=True)
    if hint is not None:
        raise ValueError(f"{method}: {hint}")
    check_finite(input, "input", method)
    return input


# What resize_saliency accepts (maps.py), checked before the work rather than after it.
_TORCH_NAMES = {1: "(L,)", 2: "(H, W)", 3: "(T, H, W)"}
_TORCHRAY_NAMES = {1: "(L,)", 2: "(W, H)", 3: "(W, H, T)"}


def _check_sizes(resize: Sequence[Any], spatial: int) -> None:
    values = tuple(resize)
    if len(values) == spatial and all(isinstance(s, Integral) and not isinstance(
            s, (bool, np.bool_)) and int(s) > 0 for s in values):
        return
    if isinstance(resize, Shape):
        raise ValueError(f"resize must give {spatial} positive sizes in torch order "
                         f"Shape{_TORCH_NAMES[spatial]}, got {resize!r}")
    raise ValueError(
        f"resize must give {spatial} positive sizes, as a tuple in TorchRay's order "
        f"{_TORCHRAY_NAMES[spatial]} (PIL's Image.size: last dimension first) or as "
        f"Shape{_TORCH_NAMES[spatial]} in torch order; got {resize!r}")


def check_resize(resize: Any, resize_mode: Any, spatial: int) -> Any:
    """Check ``resize`` and ``resize_mode`` as
    :func:`~torchray_like.attribution.maps.resize_saliency` will read them for a map with
    ``spatial`` (1 to 3) spatial dimensions, so that a typo fails before the forward passes
    rather than after them.  Returns ``resize`` with NumPy scalars and arrays made Python ones
    (a :class:`~torchray_like.attribution.maps.Shape` is returned as it is)."""
    if isinstance(resize, np.ndarray) and resize.ndim == 1:
        resize = tuple(resize.tolist())
    check_resize_mode(resize_mode)  # also when the map keeps its size
    if resize is None or (isinstance(resize, (bool, np.bool_)) and not resize):
        return None if resize is None else False
    if isinstance(resize, (bool, np.bool_)):
        resize = True
    elif isinstance(resize, Integral):
        _check_sizes((resize,) * spatial, spatial)
        resize = int(resize)
    elif isinstance(resize, (tuple, list, torch.Size)):
        _check_sizes(resize, spatial)
    else:
        raise TypeError(
            f"resize must be False, True, an int, a tuple of {spatial} ints in TorchRay's "
            f"order {_TORCHRAY_NAMES[spatial]} or Shape{_TORCH_NAMES[spatial]} in torch "
            f"order; got {resize!r}")
    check_resize_mode(resize_mode, spatial)
    return resize
