r"""Deletion and insertion metrics (Petsiuk, Das, Saenko, BMVC 2018, arXiv 1806.07421).

A saliency map ranks the input's pixels (spatial positions, all channels together). The
**deletion** game removes them in that order, most salient first, replacing them step by step
by a *substrate* (by default zeros, which in the normalised input space is the data set's mean
colour); a good map makes the class probability drop fast, so its area under the curve (AUC) is
low. The **insertion** game starts from a *canvas* (by default a Gaussian-blurred copy of the
input) and copies the input's pixels back in the same order; a good map makes the probability
rise fast (high AUC).

The curve holds the class probability after each step, the start (nothing changed) and the end
(everything changed) included: with ``P`` pixels and ``step`` pixels per step there are
``K = ceil(P / step)`` steps and ``K + 1`` points, at the fractions
``min(k · step, P) / P`` of the pixels (:func:`step_fractions`). The AUC is the trapezoid rule
over those fractions on ``[0, 1]`` (so a last, shorter step gets its true width).

Choices of ours (the paper leaves them open or uses other values), all arguments:

* ties in the map are broken by position (row-major order, first pixel first), so a constant
  map deletes the image top to bottom and the result is deterministic;
* the map is resized to the input's size by (bi/tri)linear interpolation before ranking;
* the default step removes ``1/224`` of the pixels (the paper's 224 pixels per step at 224²);
* the default canvas blur is ``blur_sigma = max(spatial) / 16`` pixels (7 px at 112², 14 px
  at 224²), strong enough to erase the shape of objects a tenth of the image wide;
* the class probability is the softmax of the logits (``score="softmax"``); for models trained
  multi-label (independent sigmoids, such as the embedded models) pass ``score="sigmoid"``.

:func:`random_saliency` gives the random-map baseline the paper reports; :func:`method_saliency`
gives any method of the registry (or the baseline) as ``(N, 1, *spatial)`` maps at the input's
size, with the options of :mod:`~torchray_like.benchmark.settings` (the benchmark scripts use
both).
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..attribution.arguments import (
    check_finite,
    check_not_meta,
    check_number,
    check_progress,
    check_real,
    is_number,
    positive_int,
)
from ..attribution.inputs import call_model
from ..attribution.maps import Shape, resize_saliency, smooth_saliency
from ..attribution.precision import CPU_FLOAT64
from ..attribution.reporting import progress_bar
from ..attribution.seeding import GeneratorType, make_generator
from ..attribution.state import check_input, check_model, model_state_guard
from ..attribution.targets import SCORES, class_indices, output_scores

__all__ = ["deletion_insertion", "deletion_insertion_both", "step_fractions", "auc",
           "random_saliency", "default_step", "default_blur_sigma", "MODES",
           "method_saliency", "top_present_class", "pixel_order", "MAX_CURVE_POINTS"]

#: The two games.
MODES = ("deletion", "insertion")

#: The most points a curve may have (:func:`step_fractions`): 2**24, a forward pass each; a
#: ``step`` that would give more is refused with the smallest step that fits, rather than an
#: allocator error (step 1 on a 10**12-pixel input asked for 8 TB of fractions).
MAX_CURVE_POINTS = 2 ** 24

SubstrateType = Union[None, str, float, int, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Steps and area under the curve
# ---------------------------------------------------------------------------------------------


def default_step(num_pixels: int) -> int:
    """Pixels per step by default: ``ceil(P / 224)`` — the paper's 224 pixels per step (one
    224th of a 224² image), i.e. at most 224 steps whatever the size."""
    # 0 pixels would give step 1 of nothing, silently.
    return max(1, math.ceil(positive_int(num_pixels, "num_pixels") / 224))


def default_blur_sigma(spatial: Sequence[int]) -> float:
    """The insertion canvas's default blur: ``max(spatial) / 16`` pixels."""
    if isinstance(spatial, (str, bytes)) or not isinstance(spatial, Sequence) or not spatial:
        raise TypeError(f"spatial must be a non-empty sequence of sizes (the input's "
                        f"shape[2:]), got {spatial!r}")
    return max(positive_int(size, "spatial sizes") for size in spatial) / 16.0


def _check_step(step: Any, num_pixels: int) -> int:
    if step is None:
        return default_step(num_pixels)
    if isinstance(step, bool) or not isinstance(step, Integral):
        raise ValueError(
            f"step must be a positive int (pixels changed per step) or None, got {step!r}")
    if step < 1:
        raise ValueError(f"step must be a positive int (pixels changed per step), got {step!r}")
    return int(step)


def step_fractions(num_pixels: int, step: int) -> torch.Tensor:
    """The x-axis of a curve: ``min(k · step, P) / P`` for ``k = 0 .. ceil(P / step)``
    (float64, from 0 to 1)."""
    for value, name in ((num_pixels, "num_pixels"), (step, "step")):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    k = math.ceil(num_pixels / step)
    if k + 1 > MAX_CURVE_POINTS:
        fits = math.ceil(num_pixels / (MAX_CURVE_POINTS - 1))
        raise ValueError(
            f"step={step} over {num_pixels} pixels gives {k + 1} points, more than "
            f"MAX_CURVE_POINTS={MAX_CURVE_POINTS} (a forward pass each); use step >= {fits}, "
            "or step=None for the default (at most 225 points)")
    counts = torch.clamp(torch.arange(k + 1, **CPU_FLOAT64) * step,
                         max=num_pixels)  # on the CPU whatever the default device
    return counts / num_pixels


def auc(curve: torch.Tensor, fractions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Area under ``curve`` (``(..., K + 1)``) by the trapezoid rule over ``fractions`` (evenly
    spaced on ``[0, 1]`` when not given); computed in float64, returned in the curve's dtype
    (float32 for an integer curve) on its device."""
    if not isinstance(curve, torch.Tensor) or curve.dim() < 1 or curve.shape[-1] < 2:
        raise ValueError(
            f"curve must be a tensor (..., K + 1) with at least two points, got "
            f"{getattr(curve, 'shape', type(curve).__name__)}")
    check_real(curve, "curve")
    if not bool(torch.isfinite(curve).all()):
        raise ValueError("curve holds NaN or infinite values: its area is undefined")
    if fractions is None:
        fractions = torch.linspace(0, 1, curve.shape[-1], **CPU_FLOAT64)
    elif not isinstance(fractions, torch.Tensor):
        try:
            fractions = torch.as_tensor(fractions, **CPU_FLOAT64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"fractions must be a 1-D tensor or sequence of numbers, got "
                            f"{type(fractions).__name__}") from None
    check_real(fractions, "fractions")
    x = fractions.detach().cpu().to(torch.float64)
    if x.shape != (curve.shape[-1],):
        raise ValueError(
            f"fractions must have shape ({curve.shape[-1]},) like the curve's last dimension, "
            f"got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()) or bool((x[1:] < x[:-1]).any()) \
            or bool((x < 0).any()) or bool((x > 1).any()):
        # Decreasing fractions would flip the trapezoids' sign: a negative "area", silently.
        raise ValueError(f"fractions must be finite and non-decreasing, in [0, 1] (the "
                         f"fraction of pixels changed at each point), got {x.tolist()}")
    return _area(curve, x)


def _area(curve: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The trapezoid area over float64 fractions ``x`` (a NaN score of the model stays NaN)."""
    c = curve.detach().cpu().to(torch.float64)      # float64 on the CPU (MPS has none)
    area = ((x[1:] - x[:-1]) * (c[..., 1:] + c[..., :-1]) / 2).sum(-1)
    return area.to(device=curve.device,
                   dtype=curve.dtype if curve.is_floating_point() else torch.float32)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_saliency(saliency: Any, input: torch.Tensor) -> torch.Tensor:
    """``(N, 1, *spatial)`` (or ``(N, *spatial)``) finite real maps, resized to the input."""
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"saliency must be a torch.Tensor, got {type(saliency).__name__}")
    check_not_meta(saliency, "saliency")
    if saliency.is_complex() or saliency.dtype == torch.bool:
        raise ValueError(f"saliency must be a real tensor, got dtype {saliency.dtype}")
    spatial = input.dim() - 2
    if saliency.dim() == spatial + 1:
        saliency = saliency.unsqueeze(1)
    if saliency.dim() != spatial + 2 or saliency.shape[1] != 1:
        raise ValueError(
            f"saliency must have shape (N, 1, *spatial) with {spatial} spatial dimensions like "
            f"the input {tuple(input.shape)}, got {tuple(saliency.shape)}")
    if saliency.shape[0] != input.shape[0]:
        raise ValueError(
            f"saliency has {saliency.shape[0]} maps but the input has {input.shape[0]} samples; "
            "give one map per sample")
    if saliency.numel() == 0:
        raise ValueError(f"saliency is empty (shape {tuple(saliency.shape)})")
    saliency = saliency.detach().to(device=input.device)
    if not saliency.is_floating_point():
        saliency = saliency.to(torch.float64)
    if not bool(torch.isfinite(saliency).all()):
        raise ValueError("saliency holds NaN or infinite values; the pixel order is undefined")
    if spatial > 3 and tuple(saliency.shape[2:]) != tuple(input.shape[2:]):
        raise ValueError(
            f"saliency must have the input's spatial size {tuple(input.shape[2:])} for "
            f"{spatial} spatial dimensions (resizing works for 1 to 3), got "
            f"{tuple(saliency.shape[2:])}")
    return resize_saliency(input, saliency, Shape(input.shape[2:]), "bilinear")


def _named_substrate(name: str, input: torch.Tensor, blur_sigma: Optional[float]
                     ) -> Tuple[torch.Tensor, str]:
    """``substrate="zero"`` or ``"blur"``."""
    if name == "zero":
        return torch.zeros_like(input), "zeros"
    if name == "blur":
        spatial = input.shape[2:]
        sigma = default_blur_sigma(spatial) if blur_sigma is None else check_number(
            blur_sigma, "blur_sigma", 0)
        if len(spatial) > 3:
            raise ValueError(
                f"substrate='blur' works for 1 to 3 spatial dimensions, the input has "
                f"{len(spatial)}; pass a tensor or a callable substrate")
        return smooth_saliency(input, sigma), f"blur(sigma={sigma:g})"
    raise ValueError(
        f"substrate must be None, 'zero', 'blur', a number, a tensor broadcastable to the "
        f"input or a callable input -> tensor; got {name!r}")


def _tensor_substrate(out: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """A tensor substrate, checked and broadcast to the input's shape, dtype and device."""
    check_not_meta(out, "substrate")
    if not out.is_floating_point():
        raise ValueError(f"substrate must be a floating-point tensor, got dtype {out.dtype}")
    try:
        out = torch.broadcast_to(out.detach().to(device=input.device, dtype=input.dtype),
                                 input.shape)
    except RuntimeError:
        raise ValueError(
            f"substrate of shape {tuple(out.shape)} does not broadcast to the input's shape "
            f"{tuple(input.shape)}") from None
    if not bool(torch.isfinite(out).all()):
        raise ValueError("substrate holds NaN or infinite values")
    return out


def _substrate(substrate: SubstrateType, input: torch.Tensor, mode: str,
               blur_sigma: Optional[float]) -> Tuple[torch.Tensor, str]:
    """The tensor (shaped like the input) the pixels go to (deletion) or come from (insertion's
    canvas), and a description of it."""
    if substrate is None:
        substrate = "zero" if mode == "deletion" else "blur"
    if isinstance(substrate, str):
        return _named_substrate(substrate, input, blur_sigma)
    if isinstance(substrate, bool):
        raise ValueError(f"substrate must not be a bool, got {substrate!r}")
    if is_number(substrate):
        value = check_number(substrate, "substrate")
        if abs(value) > torch.finfo(input.dtype).max:
            raise ValueError(f"substrate={value:g} does not fit the input's dtype {input.dtype} "
                             f"(at most {torch.finfo(input.dtype).max:g} in magnitude)")
        return torch.full_like(input, value), f"constant({value:g})"
    if isinstance(substrate, torch.Tensor):
        return _tensor_substrate(substrate, input), "tensor"
    if not callable(substrate):
        raise TypeError(
            f"substrate must be None, 'zero', 'blur', a number, a tensor or a callable, got "
            f"{type(substrate).__name__}")
    out = substrate(input)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"a callable substrate must return a tensor shaped like the input, got "
            f"{type(out).__name__}")
    return _tensor_substrate(out, input), getattr(substrate, "__name__", "callable")


def pixel_order(saliency: torch.Tensor) -> torch.Tensor:
    """``(N, P)`` flat pixel indices by decreasing saliency, ties by increasing index.

    ``saliency`` is ``(N, 1, *spatial)``; the order is deterministic (a stable sort).

    Raises
    ------
    TypeError, ValueError
        For a ``saliency`` that is not a real tensor of at least two dimensions, on the meta
        device, boolean, or holding NaN (which has no place in the order).
    """
    if not isinstance(saliency, torch.Tensor) or saliency.dim() < 2:
        raise TypeError(f"saliency must be a tensor (N, 1, *spatial), got "
                        f"{getattr(saliency, 'shape', type(saliency).__name__)}")
    check_real(saliency, "saliency")
    if saliency.dtype == torch.bool:
        raise ValueError("saliency must be a real tensor, got dtype torch.bool; pass "
                         "saliency.float()")
    if bool(torch.isnan(saliency).any()):
        raise ValueError("saliency holds NaN values; the pixel order is undefined")
    flat = saliency.flatten(1)
    return torch.sort(-flat, dim=1, stable=True).indices


# ---------------------------------------------------------------------------------------------
# The games
# ---------------------------------------------------------------------------------------------


def deletion_insertion(model: nn.Module, input: torch.Tensor, saliency: torch.Tensor,
                       target: Any, *, mode: str = "deletion", step: Optional[int] = None,
                       substrate: SubstrateType = None, batch_size: int = 64,
                       blur_sigma: Optional[float] = None,
                       score: Union[str, Callable[[Any], torch.Tensor]] = "softmax",
                       progress: Optional[bool] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deletion or insertion curve and its AUC (Petsiuk et al. 2018), for a batch of maps.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier; run in eval mode without gradients (its state is restored).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch, in the model's (normalised) input space.
    saliency : torch.Tensor
        ``(N, 1, *spatial')`` maps (or ``(N, *spatial')``), resized (bi/tri)linearly to the
        input's spatial size when they differ (1 to 3 spatial dimensions; more need the input's
        size). Pixels are ranked by decreasing value, ties by position.
    target : int, sequence of int or 1-D integer tensor
        The class whose probability is recorded: one for all samples or one per sample.
    mode : {"deletion", "insertion"}
        Deletion replaces the ranked pixels by the substrate; insertion copies them into the
        canvas.
    step : int, optional
        Pixels changed per step (every channel of a pixel at once); default
        :func:`default_step` (``ceil(P / 224)``).
    substrate : None, "zero", "blur", float, tensor or callable
        Deletion: what replaces the pixels (default ``"zero"``: zeros, the mean colour in a
        normalised space). Insertion: the canvas the pixels are copied into (default
        ``"blur"``: the input blurred with a Gaussian of ``blur_sigma`` pixels, replicated
        borders). A number is a constant, a tensor is broadcast to the input's shape, a
        callable maps the input to such a tensor.
    batch_size : int
        Perturbed images per forward pass (steps of several samples share a batch).
    blur_sigma : float, optional
        Width of the blur of ``substrate="blur"``; default :func:`default_blur_sigma`.
    score : {"softmax", "sigmoid", "logit"} or callable
        How the output becomes class probabilities
        (:func:`~torchray_like.attribution.targets.output_scores`; a single-logit head gives
        classes 0 and 1).
    progress : bool, optional
        tqdm progress bar over the forward passes (``None``: only on a terminal).

    Returns
    -------
    curve : torch.Tensor
        ``(N, K + 1)``: the probability of ``target`` after ``k`` steps, ``k = 0 .. K``
        (``curve[:, 0]`` is the unperturbed input for deletion, the canvas for insertion).
    auc : torch.Tensor
        ``(N,)``: the trapezoid area under the curve over :func:`step_fractions` on ``[0, 1]``.

    Raises
    ------
    ValueError, TypeError
        For a bad ``mode``, ``step``, ``batch_size``, ``substrate``, ``blur_sigma``,
        ``score``, a ``saliency`` of the wrong shape or with NaNs, a ``target`` of the wrong
        length or outside the model's classes.
    """
    check_model(model, needs_autograd=False, method="deletion_insertion")  # forward passes only
    check_input(input, "input", needs_grad=False)
    # A NaN pixel makes every perturbed image NaN: the curves would be NaN with no word why.
    check_finite(input, "input", "deletion_insertion")
    if mode not in MODES:
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (callable(score) or score in SCORES):
        raise ValueError(f"score must be one of {SCORES} or a callable, got {score!r}")
    check_progress(progress)
    if blur_sigma is not None:
        check_number(blur_sigma, "blur_sigma", 0)
    n = input.shape[0]
    spatial = tuple(input.shape[2:])
    num_pixels = int(np.prod(spatial)) if spatial else 1
    if not spatial:
        raise ValueError(f"input must have spatial dimensions (N, C, *spatial), got "
                         f"{tuple(input.shape)}")
    step = _check_step(step, num_pixels)
    idx = class_indices(target, n, input.device)
    saliency = _check_saliency(saliency, input)
    input = input.detach()
    other, _ = _substrate(substrate, input, mode, blur_sigma)

    # rank[i, p]: position of pixel p in image i's order (0 = most salient).
    order = pixel_order(saliency)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_pixels, device=input.device).expand(n, -1))
    fractions = step_fractions(num_pixels, step)
    num_points = fractions.numel()
    counts = torch.clamp(torch.arange(num_points, device=input.device) * step, max=num_pixels)
    # Deletion shows `other` on the first `count` pixels; insertion shows the input there.
    first, rest = (other, input) if mode == "deletion" else (input, other)

    total = n * num_points
    curve = torch.empty(total, dtype=input.dtype, device=input.device)
    with model_state_guard(model), torch.no_grad(), \
            progress_bar(total, progress, mode, unit="img") as bar:
        for start in range(0, total, batch_size):
            flat = torch.arange(start, min(start + batch_size, total), device=input.device)
            img, k = flat // num_points, flat % num_points
            changed = (rank[img] < counts[k][:, None]).view((len(flat), 1) + spatial)
            x = torch.where(changed, first[img], rest[img])
            # A dtype mismatch (float64 input, float32 model) is named, not PyTorch's words.
            output = call_model(model, x, input)
            probs = output_scores(output, score, len(flat), input.dtype)
            if start == 0:
                classes = probs.shape[1]
                if int(idx.min()) < 0 or int(idx.max()) >= classes:
                    bad = idx[(idx < 0) | (idx >= classes)][0].item()
                    raise ValueError(
                        f"target class {bad} is out of range: the scores have {classes} "
                        f"classes (valid: 0..{classes - 1})")
                idx = idx.to(probs.device)
            rows = torch.arange(len(flat), device=probs.device)
            curve[start:start + len(flat)] = probs[rows, idx[img.to(probs.device)]].to(
                curve.device)
            bar.update(len(flat))
    curve = curve.view(n, num_points)
    return curve, _area(curve, fractions)


def deletion_insertion_both(model: nn.Module, input: torch.Tensor, saliency: torch.Tensor,
                            target: Any, **kwargs: Any
                            ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Both games with the same arguments: ``{"deletion": (curve, auc), "insertion": ...}``.

    ``substrate`` (if given) applies to both; leave it ``None`` for each game's default.
    """
    if "mode" in kwargs:
        raise ValueError("deletion_insertion_both runs both modes; do not pass mode")
    return {m: deletion_insertion(model, input, saliency, target, mode=m, **kwargs)
            for m in MODES}


def random_saliency(input: torch.Tensor, *, generator: GeneratorType = None,
                    seed: Optional[int] = None) -> torch.Tensor:
    """The random-map baseline: ``(N, 1, *spatial)`` uniform values on ``[0, 1)``.

    Drawn on the CPU from ``generator`` (an int seed or a :class:`torch.Generator`; ``seed`` is
    an alias for an int; ``None`` derives a seed from the global RNG without advancing it) and
    moved to the input's device, so a seed gives the same map on every device.
    """
    if not isinstance(input, torch.Tensor) or input.dim() < 3:
        raise ValueError(
            f"input must be a tensor (N, C, *spatial), got "
            f"{getattr(input, 'shape', type(input).__name__)}")
    g = make_generator(generator, seed)
    shape = (input.shape[0], 1) + tuple(input.shape[2:])
    dtype = input.dtype if input.is_floating_point() else torch.float32
    return torch.rand(shape, generator=g, dtype=dtype, device=g.device).to(input.device)


# ---------------------------------------------------------------------------------------------
# Maps from the registry's methods, as the benchmarks call them
# ---------------------------------------------------------------------------------------------


def method_saliency(method: Union[str, Callable[..., Any]], model: nn.Module,
                    input: torch.Tensor, target: Any, **kwargs: Any) -> torch.Tensor:
    """``(N, 1, *spatial)`` maps of ``method`` for ``target``, detached, at the input's size.

    ``method`` is a name in :data:`~torchray_like.attribution.registry.METHODS` (every entry
    gives one map per sample for the target; the benchmarks' options are in
    :mod:`~torchray_like.benchmark.settings`), ``"random"`` (:func:`random_saliency` with
    ``kwargs`` such as ``seed``) or a function ``f(model, input, target, **kwargs)`` with the
    same contract.  Maps are resized bilinearly.

    Raises
    ------
    TypeError
        For a ``method`` that is neither a name nor callable, or that returns no tensor.
    ValueError
        For an unknown name, or maps that are not one ``(1, *spatial)`` map per sample.
    """
    if method == "random":
        return random_saliency(input, **kwargs)
    if isinstance(method, str):
        from ..attribution.registry import METHODS
        fn = METHODS[method]
    elif callable(method):
        fn = method
    else:
        raise TypeError(f"method must be a name or a callable, got {type(method).__name__}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor (N, C, *spatial), got "
                        f"{type(input).__name__}")
    out = fn(model, input, target, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"method {method!r} returned {type(out).__name__}, not a tensor of maps")
    _check_maps(out, method)
    n = input.shape[0]
    if out.dim() != input.dim() or out.shape[0] != n or out.shape[1] != 1:
        # Silently summing or picking maps would score something else than the method.
        raise ValueError(
            f"method {method!r} returned maps of shape {tuple(out.shape)}; expected one map "
            f"per sample for the target, ({n}, 1, *spatial) with {input.dim() - 2} spatial "
            "dimensions")
    return resize_saliency(input, out.detach(), Shape(input.shape[2:]), "bilinear")


def _check_maps(out: torch.Tensor, method: Any) -> None:
    # Maps with no values, complex or NaN maps would fail later, in deletion_insertion, with
    # no word of the method that made them.
    if out.is_meta or out.is_complex() or out.dtype == torch.bool:
        raise ValueError(f"method {method!r} returned maps of dtype {out.dtype} on "
                         f"{out.device}: expected real values to rank")
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise ValueError(f"method {method!r} returned maps holding NaN or infinite values")


def top_present_class(model: nn.Module, input: torch.Tensor,
                      present: Sequence[Sequence[int]],
                      score: Union[str, Callable[[Any], torch.Tensor]] = "softmax"
                      ) -> list:
    """For each image, the class among ``present[i]`` (its ground-truth classes) that the model
    scores highest: the class the benchmarks explain (one per image, as in the paper, which
    explains the predicted class; restricting it to the classes present keeps the map about an
    object that is there)."""
    check_model(model, needs_autograd=False, method="top_present_class")  # forward passes only
    check_input(input, "input", needs_grad=False)
    if not (callable(score) or score in SCORES):
        raise ValueError(f"score must be one of {SCORES} or a callable, got {score!r}")
    if isinstance(present, (str, bytes)) or not hasattr(present, "__len__"):
        raise TypeError(f"present must be a sequence of class-index lists, one per image, got "
                        f"{type(present).__name__}")
    if len(present) != input.shape[0]:
        raise ValueError(
            f"present has {len(present)} entries but the input has {input.shape[0]} images")
    with model_state_guard(model), torch.no_grad():
        probs = output_scores(call_model(model, input, input), score, input.shape[0],
                              input.dtype)
    return [_top_class(probs[i], classes, i) for i, classes in enumerate(present)]


def _top_class(probs: torch.Tensor, classes: Any, i: int) -> int:
    """The class of ``classes`` (image ``i``'s) with the highest score, ties to the lower index;
    each checked to be an int in range (a negative index would wrap, a float be truncated)."""
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise TypeError(f"present[{i}] must be a list of class indices, got {classes!r}")
    classes = list(classes)
    if not classes:
        raise ValueError(f"present[{i}] is empty: image {i} has no class to explain")
    num_classes = probs.shape[0]
    for c in classes:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (Integral, torch.Tensor)) or (
                isinstance(c, torch.Tensor) and (c.dim() != 0 or c.is_floating_point()
                                                 or c.dtype == torch.bool)):
            raise TypeError(f"present[{i}] must hold int class indices, got {c!r}")
        if not 0 <= int(c) < num_classes:
            raise ValueError(f"present[{i}] holds class {int(c)}, out of range: the scores have "
                             f"{num_classes} classes (valid: 0..{num_classes - 1})")
    return max((int(c) for c in classes), key=lambda c: (float(probs[c]), -c))
