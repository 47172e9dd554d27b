r"""Figures of inputs and saliency maps: images, 3-D volumes / videos and 1-D signals.

* :func:`saliency_plot` — a batch of inputs, alone or with a saliency map drawn over each;
* :func:`plot_methods` — one row per input, one column per attribution method;
* :func:`overlay` — an image (or a batch) blended with a colour-mapped saliency map, as an array.

matplotlib is imported only when one of these functions runs.  Figures are made through pyplot
with ``save=None`` (they show in notebooks), as standalone Agg figures never registered with
pyplot with ``save=path``; at :data:`DPI` dots per inch, each panel :data:`IMAGE_PANEL`,
:data:`IMAGE_PANEL_COLORBAR` or :data:`SIGNAL_PANEL` inches (plus :data:`COLORBAR_WIDTH` for the
one colour bar of a shared scale), so that saved files have a predictable size.

Inputs ``x`` are batches ``(N, C, L)`` (signals), ``(N, C, H, W)`` (images) or
``(N, C, T, H, W)`` (volumes, videos), or channel-last images: one NumPy ``(H, W, 3 or 4)``
image, or a batch ``(N, H, W, C)`` whose last axis has 1, 3 or 4 entries and whose second has
not (RGBA loses its alpha).  Maps are ``(N, 1, *spatial)`` or ``(N, *spatial)``, resized to the
input by (bi/tri)linear interpolation.  Maps that cannot be shown as they are never are silently:
NaN and infinite values are painted :data:`NONFINITE_COLOR`, opaque, outside the colour scale,
and a map with no range is named on its panel (``"all zero"``) instead of being given an
invented colour bar, each with a :class:`PlotWarning`.
"""

from __future__ import annotations

import math
import os
import warnings
from numbers import Integral, Real
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .attribution.arguments import check_flag, check_real
from .utils import as_tensor, check_output_path

__all__ = ["saliency_plot", "overlay", "plot_methods", "PlotWarning", "DPI", "IMAGE_PANEL",
           "IMAGE_PANEL_COLORBAR", "SIGNAL_PANEL", "COLORBAR_WIDTH", "NONFINITE_COLOR"]

#: Dots per inch of every figure (and of the files saved from them).
DPI = 100
#: Size (width, height) in inches of an image panel without colour bar.
IMAGE_PANEL = (2.5, 2.5)
#: Size (width, height) in inches of an image panel with a colour bar beside it.
IMAGE_PANEL_COLORBAR = (3.0, 2.5)
#: Size (width, height) in inches of a 1-D signal panel.
SIGNAL_PANEL = (6.0, 2.0)
#: Width in inches added to a figure for its one colour bar when all its maps share one scale.
COLORBAR_WIDTH = 0.5
#: RGB colour of NaN and infinite map values (magenta: in none of the usual colormaps).
NONFINITE_COLOR = (1.0, 0.0, 1.0)

Normalization = Tuple[Union[float, Sequence[float]], Union[float, Sequence[float]]]
PathLike = Union[str, "os.PathLike[str]"]
Limits = Optional[Tuple[float, float]]  # colour limits of a map; None: it has no range to show

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}
_CHANNELS = (1, 3, 4)  # channel counts that mark an image's channel axis (grey, RGB, RGBA)
_MONTAGE_ROW = 8  # slices shown in one row for a volume before the montage wraps


class PlotWarning(UserWarning):
    """A map cannot be drawn as it is: non-finite values (masked) or no range (all zero)."""


def _warn(message: str) -> None:
    warnings.warn(message, PlotWarning, stacklevel=5)  # the user's call


def _channel_first(shape: Tuple[int, ...], default: bool, map_shape: Any,
                   name: Optional[str]) -> bool:
    """Whether a 3-D image ``shape`` is ``(C, H, W)``: the end with 1, 3 or 4 entries holds the
    channels; if both (or neither) may, the map's ``(H, W)`` decides, then the ``default``
    layout (with a warning naming ``name`` if both may and a name is given)."""
    map_hw = tuple(map_shape[-2:]) if map_shape is not None and len(map_shape) >= 2 else None
    first, last = shape[0] in _CHANNELS, shape[2] in _CHANNELS
    if first != last:
        return first
    fits_first, fits_last = tuple(shape[1:]) == map_hw, tuple(shape[:2]) == map_hw
    if fits_first != fits_last:
        return fits_first
    if first and name is not None:
        taken = "(C, H, W)" if default else "(H, W, C)"
        _warn(f"{name} of shape {shape} reads as (C, H, W) and as (H, W, C); it is taken as "
              f"{taken}. Pass a saliency map of the image's size (H, W) to settle it")
    return default


def _check_x(x: Any, saliency: Any = None, name: str = "x") -> torch.Tensor:
    """``x`` as a float batch ``(N, C, *spatial)``, channel-last images transposed."""
    one_image = isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[-1] in (3, 4)
    x = as_tensor(x, name)
    check_real(x, name)
    if one_image:
        x = x.unsqueeze(0)  # a NumPy (H, W, C) image, as overlay takes it
    # A batch (N, C, H, W) follows PyTorch's layout when it may, without a warning.
    if x.dim() == 4 and not _channel_first(tuple(x.shape[1:]), not one_image,
                                           getattr(saliency, "shape", None),
                                           "x" if one_image else None):
        x = x[..., :3].permute(0, 3, 1, 2)  # channel-last (N, H, W, C); RGBA loses its alpha
    if x.dim() not in (3, 4, 5):
        raise ValueError("x must be a batch of shape (N, C, L) (signals), (N, C, H, W) (images) "
                         f"or (N, C, T, H, W) (volumes/videos); got {tuple(x.shape)}. "
                         "For a single input add the batch dimension: x.unsqueeze(0)")
    if 0 in x.shape:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): it needs a sample, a "
                         "channel and one element along every spatial dimension")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()  # 8-bit: the 0..255 range
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} NaN or infinite value(s) and cannot be shown; fix "
                         f"it, or replace them with torch.nan_to_num({name})")
    return x


def _check_alpha(alpha: Any) -> float:
    if not isinstance(alpha, Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_save(save: Any) -> None:
    # Before drawing: a missing folder or an unknown extension would fail after the work.
    check_output_path(save, "save")


def _check_labels(labels: Any, count: int, name: str, what: str) -> Optional[List[str]]:
    """``labels`` (one per ``what``) as a list of str, or None."""
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        got = "a single string" if isinstance(labels, str) else type(labels).__name__
        raise TypeError(f"{name} must be a sequence of strings, one per {what}, got {got}")
    if len(labels) != count:
        raise ValueError(f"{name} must have one entry per {what} ({count}), got {len(labels)}")
    return [str(label) for label in labels]


def _check_limit(value: Any, name: str) -> Optional[float]:
    if value is None:
        return None
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be None or a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _colormap(cmap: Any):
    """``cmap``, a name or a Colormap, as a Colormap."""
    import matplotlib

    if isinstance(cmap, str):
        try:
            cmap = matplotlib.colormaps[cmap]
        except KeyError:
            raise ValueError(f"cmap {cmap!r} is not a registered matplotlib colormap; "
                             "see matplotlib.colormaps for the names") from None
    if not isinstance(cmap, matplotlib.colors.Colormap):
        raise TypeError(f"cmap must be a colormap name or a matplotlib Colormap, got "
                        f"{type(cmap).__name__}")
    return cmap


def _denormalize(x: torch.Tensor, denormalize: Optional[Normalization]) -> torch.Tensor:
    """Undo ``(x - mean) / std`` channel-wise."""
    if denormalize is None:
        return x
    try:
        mean, std = denormalize
    except (TypeError, ValueError):
        raise TypeError("denormalize must be None or a pair (mean, std) of numbers or "
                        f"per-channel sequences, got {denormalize!r}") from None
    c = x.shape[1]
    shape = (1, c) + (1,) * (x.dim() - 2)
    out = []
    for name, value in (("mean", mean), ("std", std)):
        t = torch.as_tensor(value, dtype=x.dtype).flatten()
        if t.numel() not in (1, c):
            raise ValueError(f"denormalize {name} must be a number or have one value per channel "
                             f"({c}), got {t.numel()} values")
        out.append(t.expand(c).reshape(shape) if t.numel() == 1 else t.reshape(shape))
    return x * out[1] + out[0]


def _to_display_range(x: torch.Tensor, denormalized: bool) -> torch.Tensor:
    """Values for display in ``[0, 1]``: clamped after denormalisation, kept if already in range,
    otherwise stretched per sample (min → 0, max → 1)."""
    if denormalized:
        return x.clamp(0.0, 1.0)
    if x.numel() and x.min() >= 0 and x.max() <= 1:
        return x
    dims = tuple(range(1, x.dim()))
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    return ((x - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))).clamp(0.0, 1.0)


def _channels_hint(name: str, shape: Tuple[int, ...], x_channels: int) -> str:
    """What to do with a map of several channels: classes are selected, input channels reduced."""
    select = (f"select the target's channel, {name}[:, c:c + 1] (one class per input: "
              f"{name}[torch.arange(N), target].unsqueeze(1))")
    reduce = f"reduce them, e.g. {name}.abs().amax(1, keepdim=True)"
    advice = (f"Its {shape[1]} channels match x's: if they are per-input-channel attributions, "
              f"{reduce}; if they are classes, {select}" if shape[1] == x_channels else
              f"If its {shape[1]} channels are classes (a multi-class map), {select}; if they "
              f"are per-input-channel attributions, {reduce}")
    return (f"{name} must have one channel, shape (N, 1, *spatial) or (N, *spatial); got "
            f"{shape}. {advice}")


def _warn_unshowable(values: np.ndarray, label: str, constant_note: Optional[str]) -> None:
    """Warn about ``values``' NaN / infinities and (with a note to give) a map with no range."""
    finite = np.isfinite(values)
    if not finite.all():
        nan, pos = int(np.isnan(values).sum()), int(np.isposinf(values).sum())
        neg = int(values.size - finite.sum()) - nan - pos
        _warn(f"{label} has {values.size - int(finite.sum())} non-finite value(s) ({nan} NaN, "
              f"{pos} +inf, {neg} -inf): they are painted magenta (NONFINITE_COLOR) and left out "
              "of the colour scale. Replace them first (torch.nan_to_num, or clamp a log-ratio "
              "map) to give them a colour")
    kept = values[finite]
    if constant_note is not None and kept.size and kept.min() == kept.max():
        what = "all zero" if kept[0] == 0 else f"constant ({kept[0]:.3g})"
        _warn(f"{label} is {what}: {constant_note}. A method gives such a map when it finds no "
              "evidence or when its gradient does not reach the input")


def _check_map(saliency: Any, x: torch.Tensor, name: str,
               constant_note: Optional[str] = "its panels say so, and no colour scale is "
                                                 "invented for it") -> torch.Tensor:
    """A saliency map for batch ``x`` as ``(N, *spatial)``, resized to ``x``'s spatial size."""
    s = as_tensor(saliency, name)
    check_real(s, name)
    s = s.float()
    shape, n, rank = tuple(s.shape), x.shape[0], x.dim() - 2
    if s.dim() == rank and n == 1:
        s = s.unsqueeze(0)  # the one map of one input
    if s.dim() == rank + 2:
        if s.shape[1] != 1:
            raise ValueError(_channels_hint(name, tuple(s.shape), x.shape[1]))
        s = s[:, 0]
    elif s.dim() != rank + 1:
        raise ValueError(f"{name} must have shape (N, 1, *spatial) or (N, *spatial) with "
                         f"{rank} spatial dimension(s) like the input {tuple(x.shape)}; "
                         f"got {shape}")
    if s.shape[0] != n:
        hint = f"; if they are classes, select the target's: {name}[c]" if n == 1 else ""
        raise ValueError(f"{name} has a batch of {s.shape[0]} maps for {n} input(s); pass one "
                         f"map per input{hint}")
    if 0 in s.shape:
        raise ValueError(f"{name} is empty (shape {shape}): there is no map to draw")
    for i in range(n):
        _warn_unshowable(s[i].numpy(), f"{name} of input #{i}", constant_note)
    if tuple(s.shape[1:]) != tuple(x.shape[2:]):
        s = F.interpolate(s.unsqueeze(1), size=tuple(x.shape[2:]), mode=_INTERP[rank],
                          align_corners=False)[:, 0]
    return s


def _limits(values: np.ndarray, vmin: Optional[float], vmax: Optional[float]) -> Limits:
    """Colour limits of ``values`` (finite ones only), ``vmin`` / ``vmax`` taking precedence."""
    finite = values[np.isfinite(values)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else None)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else None)
    if lo is None or hi is None or (hi <= lo and vmin is None and vmax is None):
        return None  # no finite value, or a constant map: no range, and none is invented
    if hi > lo:
        return lo, hi
    raise ValueError(f"vmin ({lo:g}) must be below vmax ({hi:g}); "
                     + ("give both" if vmin is None or vmax is None else "swap them"))


def _scales(maps: List[np.ndarray], shared: bool, vmin: Optional[float],
            vmax: Optional[float]) -> List[Limits]:
    if shared:
        return [_limits(np.concatenate([m.ravel() for m in maps]), vmin, vmax)] * len(maps)
    return [_limits(m, vmin, vmax) for m in maps]


def _new_figure(ncols: int, nrows: int, panel: Tuple[float, float], standalone: bool,
                extra_width: float = 0.0):
    """A figure of ``nrows × ncols`` panels, with the axes grid (``squeeze=False``)."""
    size = (ncols * panel[0] + extra_width, nrows * panel[1])
    if standalone:
        # Never registered with pyplot: no window, no leak in plt's figure list.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=size, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
    else:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=size, dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, save: Optional[PathLike]) -> None:
    if save is None:
        return
    import matplotlib

    # Pin what user rcParams could change, so the file has exactly figsize × DPI pixels.
    with matplotlib.rc_context({"savefig.bbox": "standard"}):
        fig.savefig(save, dpi=DPI)


def _annotate(ax, sal: np.ndarray, finite: np.ndarray, scaled: bool) -> None:
    """Write on the panel what its colours cannot show: no range (unless ``scaled`` on a shared
    scale, where only an all-zero map is named), masked values."""
    notes = []
    kept = sal[finite]
    if kept.size == 0:
        notes.append("no finite value")
    elif kept.min() == kept.max() and (not scaled or kept[0] == 0):
        notes.append("all zero" if kept[0] == 0 else f"constant {kept[0]:.3g}")
    if not finite.all():
        notes.append(f"{sal.size - int(finite.sum())} NaN/inf (magenta)")
    if notes:
        ax.text(0.5, 0.5, "\n".join(notes), transform=ax.transAxes, ha="center", va="center",
                fontsize="small", bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))


def _draw_map(fig, ax, sal: np.ndarray, lim: Limits, *, alpha: float, cmap: Any,
              colorbar: bool, **where: Any):
    """Draw map ``sal`` on ``ax``; the handle, or None when the map has no colour scale."""
    finite = np.isfinite(sal)
    lo, hi = lim if lim is not None else (0.0, 1.0)
    # With no range the map layer is kept (its data stays readable) but not drawn.
    handle = ax.imshow(sal, cmap=cmap, alpha=alpha if lim is not None else 0.0, vmin=lo,
                       vmax=hi, **where)
    if not finite.all():  # a layer of its own, opaque: masked values must be seen
        mask = np.zeros(sal.shape + (4,))
        mask[~finite] = NONFINITE_COLOR + (1.0,)
        ax.imshow(mask, **where)
    _annotate(ax, sal, finite, lim is not None)
    if colorbar:  # hidden when there is no scale: never an invented one, same panel size
        fig.colorbar(handle, ax=ax, shrink=0.85).ax.set_visible(lim is not None)
    return None if lim is None else handle


def _draw_panel(fig, ax, x_i: torch.Tensor, disp_i: Optional[torch.Tensor],
                sal: Optional[np.ndarray], lim: Limits, **style: Any):
    """A signal ``x_i`` ``(C, L)`` as lines over its map as a band, or an image ``disp_i``
    ``(C, H, W)`` in ``[0, 1]`` under its map; the map's colour-bar handle or None."""
    if disp_i is not None:
        if disp_i.shape[0] == 3:
            ax.imshow(disp_i.permute(1, 2, 0).numpy())
        else:  # one channel, or another number than 3: their mean, in grey
            ax.imshow(disp_i.mean(0).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_xticks([])
        ax.set_yticks([])
        return None if sal is None else _draw_map(fig, ax, sal, lim, **style)
    c, length = x_i.shape
    for k in range(c):
        ax.plot(np.arange(length), x_i[k].numpy(), linewidth=1.0, label=f"channel {k}")
    if 1 < c <= 8:
        ax.legend(loc="upper right", fontsize="x-small")
    ax.set_xlim(-0.5, length - 0.5)
    if sal is None:
        return None
    y0, y1 = ax.get_ylim()
    # The map over the whole plot height, one column per sample, under the lines.
    handle = _draw_map(fig, ax, sal[None, :], lim, extent=(-0.5, length - 0.5, y0, y1),
                       aspect="auto", origin="lower", interpolation="nearest", zorder=0,
                       **style)
    ax.set(xlim=(-0.5, length - 0.5), ylim=(y0, y1))
    return handle


def _resolve_slices(slice_: Any, depth: int) -> List[int]:
    """The slices to show along ``T``: ``None`` (middle), an int, a sequence of ints, 'all'."""
    if slice_ is None or (isinstance(slice_, str) and slice_ == "all"):
        return [depth // 2] if slice_ is None else list(range(depth))
    many = isinstance(slice_, Sequence) and not isinstance(slice_, str) and len(slice_) > 0
    out = []
    for t in slice_ if many else [slice_]:
        if not isinstance(t, Integral) or isinstance(t, bool):
            kind = ValueError if isinstance(t, str) else TypeError
            raise kind(f"slice must be None, an int, a non-empty sequence of ints or 'all', "
                       f"got {t!r} in {slice_!r}")
        if not -depth <= int(t) < depth:
            raise ValueError(f"slice={int(t)} is out of range for {depth} slices/frames "
                             f"(use -{depth} ... {depth - 1})")
        out.append(int(t) % depth)
    return out


Cell = Tuple[int, Optional[int], int, int]  # input, slice (None: no T axis), grid row, column


def _grid(shape: Tuple[int, ...], slice_: Any, nrow: Any) -> Tuple[List[Cell], int, int]:
    """Where each panel goes: one per input, or a montage of slices per volume."""
    if nrow is not None and (not isinstance(nrow, Integral) or isinstance(nrow, bool)
                             or nrow < 1):
        raise ValueError(f"nrow must be None or a positive integer, got {nrow!r}")
    wanted, n, rank = 0 if nrow is None else int(nrow), shape[0], len(shape) - 2
    slices: List[Optional[int]] = ([None] if rank != 3 else
                                   list(_resolve_slices(slice_, shape[2])))
    if len(slices) == 1:
        ncols = min(wanted or (1 if rank == 1 else math.ceil(math.sqrt(n))), n)
        cells = [(i, slices[0], i // ncols, i % ncols) for i in range(n)]
    else:  # each volume: its slices in rows of ncols, the next volume below
        k = len(slices)
        ncols = min(wanted or (k if k <= _MONTAGE_ROW else math.ceil(math.sqrt(k))), k)
        per = math.ceil(k / ncols)
        cells = [(i, t, i * per + j // ncols, j % ncols)
                 for i in range(n) for j, t in enumerate(slices)]
    return cells, cells[-1][2] + 1, ncols


def _check_shared(shared_scale: Any, rank: int, vmin: Optional[float],
                  vmax: Optional[float]) -> bool:
    if shared_scale is None:  # volumes: frames compare; fixed limits: one bar is enough
        return rank == 3 or (vmin is not None and vmax is not None)
    if not isinstance(shared_scale, bool):
        raise TypeError(f"shared_scale must be None, True or False, got {shared_scale!r}")
    return shared_scale


def _finish(fig, axes, cells: List[Cell], handles: List[Any], one_bar: bool,
            save: Optional[PathLike]):
    used = {(r, c) for *_, r, c in cells}
    for (r, c), ax in np.ndenumerate(axes):
        if (r, c) not in used:
            ax.remove()  # empty cells of an incomplete row
    live = [h for h in handles if h is not None]
    if one_bar and live:
        fig.colorbar(live[0], ax=list(fig.axes), shrink=0.85)
    _save(fig, save)
    return fig


def saliency_plot(x: Any, saliency: Any = None, *, alpha: float = 0.5,
                  nrow: Optional[int] = None, slice: Union[None, int, Sequence[int], str] = None,
                  colorbar: bool = True, cmap: Any = "jet",
                  denormalize: Optional[Normalization] = None,
                  save: Optional[PathLike] = None, titles: Optional[Sequence[str]] = None,
                  vmin: Optional[float] = None, vmax: Optional[float] = None,
                  shared_scale: Optional[bool] = None):
    r"""Plot a batch of inputs, each with its saliency map drawn over it.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        Inputs :math:`N\times C\times L`, :math:`N\times C\times H\times W` or
        :math:`N\times C\times T\times H\times W`, or channel-last images (module notes).
        ``C = 3`` is shown in colour, other ``C`` in grey (the channel mean); ``uint8`` is
        divided by 255.  NaN or infinite values are refused.
    saliency : torch.Tensor or numpy.ndarray, optional
        Maps :math:`N\times 1\times` *spatial* or :math:`N\times` *spatial*, one per input
        (a multi-class map: select the target's channel first).  Default: the inputs alone.
    alpha : float, optional
        Opacity of the map over the image (``1`` hides the image).  Default: 0.5.
    nrow : int, optional
        Panels per row.  Default: :math:`\lceil\sqrt{N}\rceil` (signals: 1).  With several
        slices per volume, slices per row of each volume's montage (default: all up to 8, else
        :math:`\lceil\sqrt{k}\rceil` for :math:`k` slices).
    slice : int, sequence of int or 'all', optional
        For volumes, the index along ``T`` to show (negative from the end), several (a montage
        per input, one under the other) or ``'all'``.  Default: the middle one, ``T // 2``.
    colorbar : bool, optional
        Colour bars in the map's units: one per panel, or one for a shared scale.  Default: True.
    cmap : str or matplotlib.colors.Colormap, optional
        Colormap of the maps.  Default: ``'jet'``.
    denormalize : (mean, std), optional
        Undo ``(x - mean) / std`` (numbers or per-channel values) before display, then clamp
        to ``[0, 1]``.  Without it, images in ``[0, 1]`` are shown as they are and others
        stretched per input from their minimum to their maximum.
    save : str or path-like, optional
        Save the figure there (format from the extension) at :data:`DPI` dots per inch.
    titles : sequence of str, optional
        One title per input (class names, say) instead of ``'#<index>'``; volumes add
        ``', slice <t>'``.
    vmin, vmax : float, optional
        Fixed colour limits (default: from the maps' finite values).
    shared_scale : bool, optional
        One colour scale and one colour bar for all the maps, so that panels compare.
        Default: True for volumes (frames compare) and when both ``vmin`` and ``vmax`` are
        given, else False (one scale per panel).

    Returns
    -------
    matplotlib.figure.Figure
        The figure.  In an image panel ``ax.images`` holds the input, the map, and a layer of
        the map's non-finite values if any; ``ax.texts`` names what the colours cannot show.

    Raises
    ------
    ValueError
        On a wrong shape, an empty or non-finite ``x``, an empty map, batch sizes that differ,
        several map channels, or ``alpha``, ``nrow``, ``slice``, ``titles``, ``vmin`` /
        ``vmax`` out of range.
    TypeError
        If an argument has the wrong type.
    """
    x = _check_x(x, saliency)
    alpha = _check_alpha(alpha)
    _check_save(save)
    cells, nrows, ncols = _grid(tuple(x.shape), slice, nrow)
    labels = _check_labels(titles, x.shape[0], "titles", "input")
    vmin, vmax = _check_limit(vmin, "vmin"), _check_limit(vmax, "vmax")
    rank = x.dim() - 2
    shared = _check_shared(shared_scale, rank, vmin, vmax)
    colormap = _colormap(cmap)
    sal = None if saliency is None else _check_map(saliency, x, "saliency")
    x = _denormalize(x, denormalize)
    x_disp = None if rank == 1 else _to_display_range(x, denormalize is not None)
    maps: List[Optional[np.ndarray]] = [None] * len(cells)
    lims: List[Limits] = [None] * len(cells)
    if sal is not None:
        drawn = [(sal[i] if t is None else sal[i, t]).numpy() for i, t, _, _ in cells]
        maps, lims = list(drawn), _scales(drawn, shared, vmin, vmax)
    bar = check_flag(colorbar, "colorbar") and sal is not None  # "no" is truthy
    one_bar = bar and shared and lims[0] is not None
    panel = (SIGNAL_PANEL if rank == 1
             else IMAGE_PANEL_COLORBAR if bar and not shared else IMAGE_PANEL)
    fig, axes = _new_figure(ncols, nrows, panel, standalone=save is not None,
                            extra_width=COLORBAR_WIDTH if one_bar else 0.0)
    style = dict(alpha=alpha, cmap=colormap, colorbar=bar and not shared)
    handles = []
    for (i, t, r, c), m, lim in zip(cells, maps, lims):
        ax = axes[r, c]
        name = f"#{i}" if labels is None else labels[i]
        disp = None if x_disp is None else x_disp[i] if t is None else x_disp[i, :, t]
        name += "" if t is None else f", slice {t}"
        handles.append(_draw_panel(fig, ax, x[i], disp, m, lim, **style))
        ax.set_title(name, fontsize="small")
    return _finish(fig, axes, cells, handles, one_bar, save)


def plot_methods(x: Any, maps: Mapping[str, Any], *, titles: Optional[Sequence[str]] = None,
                 denormalize: Optional[Normalization] = None,
                 save: Optional[PathLike] = None, colorbar: bool = True,
                 alpha: float = 0.5, cmap: Any = "jet",
                 row_titles: Optional[Sequence[str]] = None):
    r"""Compare attribution methods: one row per input, one column per method.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        Inputs, as in :func:`saliency_plot` (volumes show their middle slice).
    maps : mapping of str to torch.Tensor
        Method name → maps for the batch, as ``saliency`` in :func:`saliency_plot`; columns
        follow the mapping's order, each map has its own colour scale.
    titles : sequence of str, optional
        Column titles replacing the method names, one per map.
    denormalize, save, alpha, cmap
        As in :func:`saliency_plot`.
    colorbar : bool, optional
        Draw a colour bar beside each map.  Default: True.
    row_titles : sequence of str, optional
        One label per input (its class name, say) beside its row, instead of ``'#<index>'``.

    Returns
    -------
    matplotlib.figure.Figure
        :math:`N` rows and ``1 + len(maps)`` columns: the input (titled ``'input'``), then the
        input under each method's map, titled with the method's name on the top row.

    Raises
    ------
    ValueError
        As :func:`saliency_plot` (messages name ``maps['<name>']``), or on ``titles`` /
        ``row_titles`` of the wrong length.
    """
    if not isinstance(maps, Mapping):
        raise TypeError(f"maps must be a mapping of method name to tensor (e.g. a dict), "
                        f"got {type(maps).__name__}")
    x = _check_x(x, next(iter(maps.values()), None))
    alpha = _check_alpha(alpha)
    _check_save(save)
    names = list(maps)
    columns = _check_labels(titles, len(names), "titles", "map") or [str(k) for k in names]
    n = x.shape[0]
    rows = _check_labels(row_titles, n, "row_titles", "input") or [f"#{i}" for i in range(n)]
    colormap = _colormap(cmap)
    checked = []
    for name in names:  # a loop, not a comprehension: warnings point at the caller
        checked.append(_check_map(maps[name], x, f"maps[{name!r}]"))
    rank = x.dim() - 2
    x = _denormalize(x, denormalize)
    if rank == 3:  # volumes: compare the methods on the middle slice
        mid, rank = x.shape[2] // 2, 2
        x, checked = x[:, :, mid], [m[:, mid] for m in checked]
    x_disp = None if rank == 1 else _to_display_range(x, denormalize is not None)
    show_bar = check_flag(colorbar, "colorbar") and bool(names)
    panel = (SIGNAL_PANEL if rank == 1 else IMAGE_PANEL_COLORBAR if show_bar else IMAGE_PANEL)
    fig, axes = _new_figure(1 + len(names), n, panel, standalone=save is not None)
    style = dict(alpha=alpha, cmap=colormap)
    for i in range(n):
        xd = None if x_disp is None else x_disp[i]
        _draw_panel(fig, axes[i, 0], x[i], xd, None, None, colorbar=False, **style)
        axes[i, 0].set_ylabel(rows[i])
        for j, m in enumerate(checked):
            sal = m[i].numpy()
            _draw_panel(fig, axes[i, j + 1], x[i], xd, sal, _limits(sal, None, None),
                        colorbar=show_bar, **style)
    axes[0, 0].set_title("input", fontsize="small")
    for j, title in enumerate(columns):
        axes[0, j + 1].set_title(title, fontsize="small")
    _save(fig, save)
    return fig


def overlay(image: Any, saliency: Any, *, alpha: float = 0.5, cmap: Any = "jet",
            normalize: bool = True) -> np.ndarray:
    r"""Blend an image (or a batch of images) with a colour-mapped saliency map.

    Parameters
    ----------
    image : torch.Tensor or numpy.ndarray
        :math:`C\times H\times W` or :math:`H\times W\times C`, tensors and arrays alike:
        the channel axis is the end with 1, 3 or 4 entries (if both ends are, the one that
        gives the map's size; failing that, with a :class:`PlotWarning`, channel-first for
        tensors and channel-last for arrays).  Also :math:`H\times W` (grey), or a batch
        :math:`N\times C\times H\times W` / :math:`N\times H\times W\times C`.  ``C = 3`` is
        RGB, ``4`` RGBA (alpha dropped), others the channel mean.  ``uint8`` is divided by
        255; values outside ``[0, 1]`` are stretched per image.  NaN / inf are refused.
    saliency : torch.Tensor or numpy.ndarray
        One image's map :math:`H'\times W'` (optionally with leading ones), or a batch's,
        :math:`N\times H'\times W'` or :math:`N\times 1\times H'\times W'`; resized
        bilinearly.
    alpha : float, optional
        ``out = (1 - alpha) * image + alpha * cmap(s)``.  Default: 0.5.
    cmap : str or matplotlib.colors.Colormap, optional
        Colormap.  Default: ``'jet'`` (blue for low, red for high values).
    normalize : bool, optional
        Stretch each map over its finite values to ``[0, 1]`` (a map with no range gives the
        colormap's 0 colour, with a :class:`PlotWarning`); if false, only clamp it.
        Default: True.

    Returns
    -------
    numpy.ndarray
        float64 :math:`H\times W\times 3` in ``[0, 1]``, or :math:`N\times H\times W\times 3`
        for a batch of :math:`N > 1`.  Where the resized map is NaN or infinite the pixel is
        :data:`NONFINITE_COLOR` (when ``alpha > 0``), with a :class:`PlotWarning`.

    Raises
    ------
    ValueError
        On a shape of neither layout, an empty image or map, maps that do not match the
        batch, several map channels, a non-finite image, or a bad ``alpha`` / ``cmap``.
    TypeError
        If ``image`` or ``saliency`` is not a tensor or an array.
    """
    alpha, normalize = _check_alpha(alpha), check_flag(normalize, "normalize")
    colormap = _colormap(cmap)
    x, single = _overlay_batch(image, saliency)
    note = "normalize=True has no range to stretch, so the blend shows the colormap's 0 colour"
    maps = _check_map(saliency, x, "saliency", note if normalize else None).double().numpy()
    x = x[:, :3] if x.shape[1] in (3, 4) else x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    rgb = _to_display_range(x, False).permute(0, 2, 3, 1).double().numpy()
    out = np.stack([_blend(rgb[k], maps[k], alpha, colormap, normalize)
                    for k in range(len(rgb))])
    return out[0] if single else out


def _overlay_batch(image: Any, saliency: Any) -> Tuple[torch.Tensor, bool]:
    """:func:`overlay`'s image(s) as a checked batch ``(N, C, H, W)``; whether one image."""
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        raise TypeError(f"image must be a torch.Tensor or a NumPy array, got "
                        f"{type(image).__name__}")
    t = as_tensor(image, "image")
    if t.dim() not in (2, 3, 4):
        raise ValueError("image must have shape (C, H, W) or (H, W, C) (either, for tensors and "
                         "arrays), (H, W), or (N, C, H, W) / (N, H, W, C) for a batch; got "
                         f"{tuple(t.shape)}")
    single = t.dim() < 4 or t.shape[0] == 1
    if t.dim() == 2:
        t = t[None, None]  # grey
    else:
        t = t if t.dim() == 4 else t[None]
        if not _channel_first(tuple(t.shape[1:]), isinstance(image, torch.Tensor),
                              getattr(saliency, "shape", None), "image"):
            t = t.permute(0, 3, 1, 2)
    return _check_x(t, name="image"), single


def _blend(rgb: np.ndarray, m: np.ndarray, alpha: float, colormap: Any,
           normalize: bool) -> np.ndarray:
    """One ``(H, W, 3)`` blend of image ``rgb`` with map ``m``; non-finite pixels masked."""
    finite = np.isfinite(m)
    kept = m[finite]
    lo, hi = (float(kept.min()), float(kept.max())) if kept.size else (0.0, 0.0)
    m = np.where(finite, m, lo)
    if normalize:
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    heat = np.asarray(colormap(np.clip(m, 0.0, 1.0)))[..., :3]
    out = np.clip((1.0 - alpha) * rgb + alpha * heat, 0.0, 1.0)
    if alpha > 0:
        out[~finite] = NONFINITE_COLOR  # opaque: a masked value must be seen
    return out
