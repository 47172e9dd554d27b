r"""Occlusion.

Zeiler, Fergus, "Visualizing and understanding convolutional networks", ECCV 2014 (arXiv
1311.2901).  A window of ``window`` elements (every channel) slides over the spatial axes with
``stride``; at each position :math:`p` the window is replaced by ``baseline`` and the drop of
the target's score is measured, :math:`d_p = f(x) - f(x \text{ occluded at } p)`.  The
attribution of an element is the mean of :math:`d_p` over the windows covering it — Captum's
``Occlusion`` with ``sliding_window_shapes = (C, *window)``.

Positions: along an axis of size ``L``, windows start at ``0, s, 2 s, …`` up to
``ceil((L − w) / s) · s``; the last one is cut at the border when ``s`` does not divide
``L − w``, so every element is covered (``stride > window`` would leave gaps and is refused).

Every occluded copy is one row of a forward batch (positions × images, ``batch_size`` rows at
a time) run under :func:`torch.no_grad`; the scores are spread back over the windows with one
transposed convolution per call.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .arguments import check_batch, check_not_meta, check_progress, per_axis, positive_int
from .context import suspend_rule_contexts
from .inputs import ChannelsLastBatches
from .integrated_gradients import (
    check_independent_rows,
    check_reduce,
    forward_rows,
    reduce_channels,
    row_scores,
)
from .maps import check_precision, constant_rows, finish_map, samples_text, warn_degenerate
from .modules import check_model, unwrap_compiled
from .reporting import progress_bar
from .state import model_state_guard
from .targets import Target, TargetType, parse_target

__all__ = ["occlusion", "occlusion_windows"]

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def occlusion_windows(spatial: Tuple[int, ...], window: Any = None, stride: Any = None
                      ) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """``(window, stride, grid)``: the window and stride per spatial axis and the number of
    positions along each.

    Defaults: ``window`` is an eighth of each axis (rounded up), ``stride`` half the window
    (at least 1).  A window larger than the axis, or a stride larger than the window (elements
    no window covers), is a :class:`ValueError`.
    """
    d = len(spatial)
    if window is None:
        win = tuple(max(1, math.ceil(size / 8)) for size in spatial)
    else:
        win = tuple(int(w) for w in per_axis(window, "window", spatial, integer=True, minimum=1,
                                               strict=False))
    if any(w > size for w, size in zip(win, spatial)):
        raise ValueError(f"window {win} is larger than the input's spatial size {spatial} "
                         "(torch order); pass a smaller window")
    if stride is None:
        step = tuple(max(1, w // 2) for w in win)
    else:
        step = tuple(int(s) for s in per_axis(stride, "stride", spatial, integer=True,
                                               minimum=1, strict=False))
    if any(s > w for s, w in zip(step, win)):
        raise ValueError(f"stride {step} is larger than window {win} along some axis: elements "
                         "between the windows would be covered by none; pass stride <= window")
    grid = tuple(math.ceil((size - w) / s) + 1 for size, w, s in zip(spatial, win, step))
    assert len(grid) == d
    return win, step, grid


def _check_baseline(baseline: Any, input: torch.Tensor) -> torch.Tensor:
    """The occlusion value as a tensor broadcastable to one image ``(C, *spatial)`` per
    image: a number, or a tensor broadcastable to the input (one per image, or shared)."""
    if isinstance(baseline, Real) and not isinstance(baseline, (bool, np.bool_)):
        if not math.isfinite(float(baseline)):
            raise ValueError(f"baseline must be a finite number or tensor, got {baseline!r}")
        return torch.full((1,) * input.dim(), float(baseline), dtype=input.dtype,
                          device=input.device)
    if not isinstance(baseline, torch.Tensor) or not baseline.is_floating_point():
        raise TypeError(f"baseline must be a number or a floating-point tensor broadcastable to "
                        f"the input, got {type(baseline).__name__}")
    check_not_meta(baseline, "baseline")  # (before: PyTorch's "item() ... on meta tensors")
    try:
        ok = torch.broadcast_shapes(baseline.shape, input.shape) == input.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"baseline has shape {tuple(baseline.shape)}, which does not broadcast "
                         f"to the input's {tuple(input.shape)}; pass e.g. shape (1, C, 1, 1) "
                         "for a value per channel")
    if not bool(torch.isfinite(baseline).all()):
        raise ValueError("baseline holds NaN or infinite values")
    value = baseline.detach().to(input.device, input.dtype)
    while value.dim() < input.dim():
        value = value.unsqueeze(0)
    return value


def _occluded(x: torch.Tensor, base: torch.Tensor, image: torch.Tensor, pos: torch.Tensor,
              win: Tuple[int, ...], step: Tuple[int, ...], grid: Tuple[int, ...]
              ) -> torch.Tensor:
    """The copies ``x[image]`` with the window at position ``pos`` (flat index in ``grid``)
    replaced by the baseline."""
    mask = torch.zeros((pos.numel(), 1) + tuple(x.shape[2:]), dtype=torch.bool,
                       device=x.device)
    for row, p in enumerate(pos.tolist()):
        corner = np.unravel_index(p, grid)
        mask[(row, 0) + tuple(slice(c * s, c * s + w)
                              for c, s, w in zip(corner, step, win))] = True
    images = x.index_select(0, image)
    fill = base if base.shape[0] == 1 else base.index_select(0, image)
    return torch.where(mask, fill, images)


def _score_drops(model: nn.Module, input: torch.Tensor, target: Target, base: torch.Tensor,
                 windows: Tuple[Tuple[int, ...], ...], batch: int,
                 progress: Optional[bool]) -> torch.Tensor:
    """``d[i, p] = f(x_i) − f(x_i occluded at p)``, shape ``(N, positions)``."""
    n, x = input.shape[0], input.detach()
    win, step, grid = windows
    count = math.prod(grid) * n
    drops = torch.empty(n, math.prod(grid), dtype=torch.float64, device=input.device)
    with torch.no_grad():
        rows = torch.arange(n, device=input.device)
        first = row_scores(target, forward_rows(model, x.clone(), input), rows, True,
                           "occlusion")
        clean = first.double()
        # The copies in channels-last memory (faster CPU convolutions; checked on the first
        # batch against the plain layout, which stays if the model disagrees).
        layout = ChannelsLastBatches(input, 0)
        with progress_bar(count, progress, "occlusion", unit="copy") as bar:
            for r0 in range(0, count, batch):
                index = torch.arange(r0, min(r0 + batch, count), device=input.device)
                pos, image = index // n, index % n
                copies = _occluded(x, base, image, pos, win, step, grid)
                scores = row_scores(target, layout.forward(model, copies, input), image, False,
                                    "occlusion").double()
                drops[image, pos] = clean[image] - scores
                bar.update(index.numel())
    if not bool(torch.isfinite(drops).all()):
        raise ValueError("occlusion: the target scores are not finite (NaN or inf) for the "
                         "input or some occluded copies")
    _check_drops(drops, clean, first.dtype)
    return drops


def _check_drops(drops: torch.Tensor, clean: torch.Tensor, dtype: torch.dtype) -> None:
    """Warn (:class:`~.maps.DegenerateMapWarning`) when a sample's map is flat — every
    occlusion changed its score by the same amount: zero, or the float rounding between the
    clean pass and the batched copies — or when the model's reduced-precision output rounds
    the drops."""
    rows = constant_rows(drops) if drops.shape[1] > 1 else []  # one window: nothing to compare
    if rows:
        value = drops[rows[0], 0].item()
        warn_degenerate(
            f"occlusion: the target's score did not change under any occlusion for sample(s) "
            f"{samples_text(rows)} (every drop is {value:.3g}: zero, or float rounding between "
            "batch sizes): the score does not depend on the input there, a step, rounding or a "
            "saturated sigmoid/softmax hides the change, the occluded image equals the image "
            "(it equals the baseline there), or every window's change rounds away — the map is "
            "flat; try a larger window or another baseline, or explain the logit rather than a "
            "saturated probability")
    check_precision("occlusion", dtype, clean, drops, "drop")


def _spread(drops: torch.Tensor, spatial: Tuple[int, ...],
            windows: Tuple[Tuple[int, ...], ...]) -> torch.Tensor:
    """The mean of the drops of the windows covering each element, ``(N, 1, *spatial)``."""
    win, step, grid = windows
    conv = _CONV_TRANSPOSE[len(spatial)]
    kernel = torch.ones((1, 1) + win, dtype=drops.dtype, device=drops.device)
    crop = (slice(None), slice(None)) + tuple(slice(0, size) for size in spatial)
    total = conv(drops.view((-1, 1) + grid), kernel, stride=step)[crop]
    covers = conv(torch.ones((1, 1) + grid, dtype=drops.dtype, device=drops.device), kernel,
                  stride=step)[crop]
    return total / covers


def occlusion(model: nn.Module, input: torch.Tensor, target: TargetType, *,
              window: Any = None, stride: Any = None,
              baseline: Union[float, torch.Tensor] = 0.0, batch_size: int = 64,
              reduce: Optional[str] = "mean", resize: Any = False,
              resize_mode: str = "bilinear", progress: Optional[bool] = None) -> torch.Tensor:
    """Occlusion maps (Zeiler & Fergus 2014): the score drop when a sliding window is occluded.

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode under :func:`torch.no_grad`, its ``training`` flags
        restored).  Refused: layers using batch statistics in eval mode.
    input : torch.Tensor
        ``(N, C, *spatial)`` finite floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The class to explain (one for all, one per sample), a seed-gradient tensor shaped like
        the output (the score ``Σ seed · output``), or a callable ``output -> (B,)`` scoring
        each row of a batch.
    window : int or sequence of int, optional
        The window's spatial size, one value or one per axis (torch order); it spans every
        channel.  Default: an eighth of each axis, rounded up.
    stride : int or sequence of int, optional
        Default: half the window (at least 1); at most the window.
    baseline : float or torch.Tensor
        The value put in the window (default 0): a number, or a tensor broadcastable to the
        input (per image, or shared, e.g. ``(1, C, 1, 1)`` per channel).
    batch_size : int
        Occluded copies per forward batch (default 64).
    reduce : {"mean", "sum", None}
        ``"mean"`` (default): the map is the attribution of a position (every channel of it is
        occluded together, so every channel has the same value); ``"sum"``: ``C`` times it (the
        channel sum of Captum's output, as its plots draw it); ``None``: the ``(N, C, *spatial)``
        attribution, equal to Captum's ``Occlusion``.
    resize, resize_mode
        Resize the map (see :func:`~torchray_like.attribution.maps.resize_saliency`).
    progress : bool, optional
        A progress bar (``None``: when stderr is a terminal).

    Returns
    -------
    torch.Tensor
        ``(N, 1, *spatial)`` signed maps (positive: occluding lowers the score), in the input's
        dtype (``(N, C, *spatial)`` with ``reduce=None``).
    """
    check_model(model, needs_autograd=False, method="occlusion")  # forward passes only
    check_batch(model, input, "occlusion", needs_grad=False)
    model = unwrap_compiled(model)
    check_independent_rows(model, "occlusion")
    parsed = parse_target(target, input.shape[0], device=input.device)
    spatial = tuple(input.shape[2:])
    windows = occlusion_windows(spatial, window, stride)
    base = _check_baseline(baseline, input)
    batch = positive_int(batch_size, "batch_size")
    resize = check_reduce(reduce, resize, resize_mode, len(spatial))
    progress = check_progress(progress)
    with suspend_rule_contexts(), model_state_guard(model, freeze=False):
        drops = _score_drops(model, input, parsed, base, windows, batch, progress)
    per_position = _spread(drops, spatial, windows).to(input.dtype)
    attribution = per_position.expand(input.shape)
    if reduce is None:
        return attribution.clone()
    smap = reduce_channels(attribution, reduce, "occlusion")
    return finish_map(input, smap, resize, resize_mode)
