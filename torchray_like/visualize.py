r"""Figures of inputs and saliency maps: images, 3-D volumes / videos and 1-D signals.

* :func:`saliency_plot` — a batch of inputs, alone or with a saliency map drawn over each;
* :func:`plot_methods` — one row per input, one column per attribution method;
* :func:`overlay` — a single image blended with a colour-mapped saliency map, as an array.

matplotlib is imported only when one of these functions runs (importing this module is cheap
and selects no backend).  Figures are plain :class:`matplotlib.figure.Figure` objects:

* with ``save=None`` the figure is created through :mod:`matplotlib.pyplot`, so it appears in a
  notebook or with :func:`matplotlib.pyplot.show` as usual — close it with
  ``plt.close(fig)`` when making many;
* with ``save=path`` it is built as a standalone ``Figure`` on an Agg canvas, saved and returned:
  it is never registered with pyplot, so it never opens a window and is freed when the last
  reference to it goes, however many are made.

Sizes are fixed so that a saved file's pixel size is predictable: figures are drawn at
:data:`DPI` dots per inch and every panel of a grid has the size given by :data:`IMAGE_PANEL`,
:data:`IMAGE_PANEL_COLORBAR` or :data:`SIGNAL_PANEL` (in inches); a saved figure has exactly
``round(columns * panel_width * DPI)`` × ``round(rows * panel_height * DPI)`` pixels.

Layout of the inputs: ``x`` is a batch ``(N, C, *spatial)`` whose number of spatial dimensions
selects the kind of plot — ``(N, C, L)`` signals, ``(N, C, H, W)`` images, ``(N, C, T, H, W)``
volumes or videos (shown one slice / frame at a time).  Saliency maps are ``(N, 1, *spatial)``
or ``(N, *spatial)``; if their spatial size differs from the input's they are resized to it by
linear / bilinear / trilinear interpolation.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.nn.functional as F

from .utils import as_tensor

__all__ = ["saliency_plot", "overlay", "plot_methods", "DPI", "IMAGE_PANEL",
           "IMAGE_PANEL_COLORBAR", "SIGNAL_PANEL"]

#: Dots per inch of every figure (and of the files saved from them).
DPI = 100
#: Size (width, height) in inches of an image panel without colour bar.
IMAGE_PANEL = (2.5, 2.5)
#: Size (width, height) in inches of an image panel with a colour bar beside it.
IMAGE_PANEL_COLORBAR = (3.0, 2.5)
#: Size (width, height) in inches of a 1-D signal panel.
SIGNAL_PANEL = (6.0, 2.0)

Normalization = Tuple[Union[float, Sequence[float]], Union[float, Sequence[float]]]
PathLike = Union[str, "os.PathLike[str]"]

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


# ------------------------------------------------------------------------------------------------
# Argument checks and conversions
# ------------------------------------------------------------------------------------------------

def _check_x(x: Any) -> torch.Tensor:
    x = as_tensor(x, "x")
    if x.dim() not in (3, 4, 5):
        raise ValueError("x must be a batch of shape (N, C, L) (signals), (N, C, H, W) (images) "
                         f"or (N, C, T, H, W) (volumes/videos); got {tuple(x.shape)}. "
                         "For a single input add the batch dimension: x.unsqueeze(0)")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must hold at least one sample and one channel, got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0  # 8-bit images: the usual 0..255 range
    return x.float()


def _check_alpha(alpha: Any) -> float:
    if not isinstance(alpha, Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_save(save: Any) -> None:
    if save is not None and not isinstance(save, (str, os.PathLike)):
        raise TypeError(f"save must be None or a file path, got {type(save).__name__}")


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
    flat = x.flatten(1)
    lo = flat.min(1).values.view(-1, *([1] * (x.dim() - 1)))
    hi = flat.max(1).values.view(-1, *([1] * (x.dim() - 1)))
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return ((x - lo) / span).clamp(0.0, 1.0)


def _check_map(saliency: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """A saliency map for batch ``x`` as ``(N, *spatial)``, resized to ``x``'s spatial size."""
    s = as_tensor(saliency, name).float()
    n, rank = x.shape[0], x.dim() - 2
    if s.dim() == rank + 2:
        if s.shape[1] != 1:
            raise ValueError(f"{name} must have one channel, shape (N, 1, *spatial) or "
                             f"(N, *spatial); got {tuple(s.shape)}. Reduce the channels first, "
                             f"e.g. {name}.abs().amax(1, keepdim=True)")
        s = s[:, 0]
    elif s.dim() != rank + 1:
        raise ValueError(f"{name} must have shape (N, 1, *spatial) or (N, *spatial) with "
                         f"{rank} spatial dimension(s) like x {tuple(x.shape)}; "
                         f"got {tuple(s.shape)}")
    if s.shape[0] != n:
        raise ValueError(f"{name} has a batch of {s.shape[0]} maps but x has {n} inputs; "
                         "pass one map per input")
    if tuple(s.shape[1:]) != tuple(x.shape[2:]):
        s = F.interpolate(s.unsqueeze(1), size=tuple(x.shape[2:]), mode=_INTERP[rank],
                          align_corners=False)[:, 0]
    return s


def _image_for_display(img: torch.Tensor) -> Tuple[np.ndarray, bool]:
    """``(C, H, W)`` in ``[0, 1]`` → ``(H, W, 3)`` RGB, or ``(H, W)`` grey (flag ``True``) for
    one channel or for a number of channels other than 3 (their mean)."""
    if img.shape[0] == 3:
        return img.permute(1, 2, 0).numpy(), False
    return img.mean(0).numpy(), True


def _map_limits(values: np.ndarray) -> Tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)  # a constant map still gets a valid norm


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

def _new_figure(ncols: int, nrows: int, panel: Tuple[float, float], standalone: bool):
    """A figure of ``nrows × ncols`` panels, with the axes grid (``squeeze=False``)."""
    size = (ncols * panel[0], nrows * panel[1])
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


def _draw_image(fig, ax, img: torch.Tensor, sal: Optional[np.ndarray], *, alpha: float,
                cmap: Any, colorbar: bool) -> None:
    """Image ``(C, H, W)`` in ``[0, 1]`` with an optional map ``(H, W)`` blended on top."""
    data, grey = _image_for_display(img)
    if grey:
        ax.imshow(data, cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(data)
    if sal is not None:
        lo, hi = _map_limits(sal)
        handle = ax.imshow(sal, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi)
        if colorbar:
            fig.colorbar(handle, ax=ax, shrink=0.85)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_signal(fig, ax, sig: torch.Tensor, sal: Optional[np.ndarray], *, alpha: float,
                 cmap: Any, colorbar: bool) -> None:
    """Signal ``(C, L)`` as lines, with an optional map ``(L,)`` as a coloured band behind."""
    c, length = sig.shape
    t = np.arange(length)
    for k in range(c):
        ax.plot(t, sig[k].numpy(), linewidth=1.0, label=f"channel {k}")
    if 1 < c <= 8:
        ax.legend(loc="upper right", fontsize="x-small")
    ax.set_xlim(-0.5, length - 0.5)
    if sal is not None:
        y0, y1 = ax.get_ylim()
        lo, hi = _map_limits(sal)
        # The map stretched over the whole plot height, one column per sample, under the lines.
        handle = ax.imshow(sal[None, :], cmap=cmap, alpha=alpha, vmin=lo, vmax=hi,
                           extent=(-0.5, length - 0.5, y0, y1), aspect="auto", origin="lower",
                           interpolation="nearest", zorder=0)
        ax.set_ylim(y0, y1)
        ax.set_xlim(-0.5, length - 0.5)
        if colorbar:
            fig.colorbar(handle, ax=ax, shrink=0.85)


def _draw_panel(fig, ax, x_i: torch.Tensor, x_disp_i: Optional[torch.Tensor],
                sal_i: Optional[torch.Tensor], rank: int, **style: Any) -> None:
    sal = None if sal_i is None else sal_i.numpy()
    if rank == 1:
        _draw_signal(fig, ax, x_i, sal, **style)
    else:
        assert x_disp_i is not None  # only signals (rank 1) have no display image
        _draw_image(fig, ax, x_disp_i, sal, **style)


def _resolve_slice(slice_: Any, depth: int) -> Union[int, str]:
    if slice_ is None:
        return depth // 2
    if isinstance(slice_, str):
        if slice_ != "all":
            raise ValueError(f"slice must be None, an int or 'all', got {slice_!r}")
        return "all"
    if not isinstance(slice_, Integral) or isinstance(slice_, bool):
        raise TypeError(f"slice must be None, an int or 'all', got {type(slice_).__name__}")
    if not -depth <= cast(int, slice_) < depth:
        raise ValueError(f"slice={slice_} is out of range for {depth} slices/frames "
                         f"(use -{depth} ... {depth - 1})")
    return int(slice_) % depth


def saliency_plot(x: Any, saliency: Any = None, *, alpha: float = 0.5,
                  nrow: Optional[int] = None, slice: Union[None, int, str] = None,
                  colorbar: bool = True, cmap: Any = "jet",
                  denormalize: Optional[Normalization] = None,
                  save: Optional[PathLike] = None):
    r"""Plot a batch of inputs, each with its saliency map drawn over it.

    Parameters
    ----------
    x : torch.Tensor
        Inputs :math:`N\times C\times L` (signals), :math:`N\times C\times H\times W` (images)
        or :math:`N\times C\times T\times H\times W` (volumes / videos).  Images with ``C = 3``
        are shown in colour, ``C = 1`` in grey, any other ``C`` as the grey mean of the
        channels.  ``uint8`` inputs are divided by 255.
    saliency : torch.Tensor, optional
        Maps :math:`N\times 1\times` *spatial* or :math:`N\times` *spatial*, one per input;
        resized to the input's spatial size if it differs.  Each map is colour-mapped between
        its own minimum and maximum.  Default: show the inputs alone.
    alpha : float, optional
        Opacity of the map over the image (``1`` hides the image).  Default: 0.5.
    nrow : int, optional
        Number of panels in each row of the grid (torchvision's ``make_grid`` convention).
        Default: :math:`\lceil\sqrt{N}\rceil` for images and volumes, 1 for signals.  Ignored
        with ``slice='all'``.
    slice : int or 'all', optional
        For volumes / videos, the index along ``T`` to show (negative counts from the end);
        ``'all'`` shows every slice, one row per input and one column per slice.
        Default: the middle one, ``T // 2``.  Ignored for signals and images.
    colorbar : bool, optional
        Draw a colour bar (in the map's units) beside each panel that has a map.  Default: True.
    cmap : str or matplotlib.colors.Colormap, optional
        Colormap of the maps.  Default: ``'jet'``.
    denormalize : (mean, std), optional
        Undo an input normalisation ``(x - mean) / std`` before display (numbers or one value per
        channel, e.g. the ImageNet ones); the result is clamped to ``[0, 1]``.  Without it, image
        values already in ``[0, 1]`` are shown as they are and any other values are stretched
        per input from their minimum to their maximum.  Signals are plotted in their own units.
    save : str or path-like, optional
        Save the figure there (format from the extension) at :data:`DPI` dots per inch.

    Returns
    -------
    matplotlib.figure.Figure
        The figure.  Panel sizes are :data:`IMAGE_PANEL` (or :data:`IMAGE_PANEL_COLORBAR` when a
        colour bar is drawn) and :data:`SIGNAL_PANEL`; see the module notes for ``save`` and
        pyplot.  Panels are titled with the input's index (and the slice for volumes).  In each
        image panel ``ax.images[0]`` is the input and ``ax.images[1]`` the map.

    Raises
    ------
    ValueError
        If ``x`` or ``saliency`` has the wrong number of dimensions, their batch sizes differ,
        ``saliency`` has several channels, or ``alpha``, ``nrow`` or ``slice`` is out of range.
    """
    x = _check_x(x)
    alpha = _check_alpha(alpha)
    _check_save(save)
    if nrow is not None and (not isinstance(nrow, Integral) or isinstance(nrow, bool)
                             or nrow < 1):
        raise ValueError(f"nrow must be None or a positive integer, got {nrow!r}")
    sal = None if saliency is None else _check_map(saliency, x, "saliency")
    rank, n = x.dim() - 2, x.shape[0]
    x = _denormalize(x, denormalize)
    x_disp = None if rank == 1 else _to_display_range(x, denormalize is not None)
    style = dict(alpha=alpha, cmap=cmap, colorbar=colorbar and sal is not None)
    panel = (SIGNAL_PANEL if rank == 1
             else IMAGE_PANEL_COLORBAR if style["colorbar"] else IMAGE_PANEL)

    # The panels to draw: (index in the batch, slice along T or None).
    frames: List[Tuple[int, Optional[int]]]
    if rank == 3:
        chosen = _resolve_slice(slice, x.shape[2])
        if chosen == "all":
            depth = x.shape[2]
            frames = [(i, t) for i in range(n) for t in range(depth)]
            ncols = depth
        else:
            frames = [(i, cast(int, chosen)) for i in range(n)]  # not "all": an int
            ncols = nrow or math.ceil(math.sqrt(n))
    else:
        frames = [(i, None) for i in range(n)]
        ncols = nrow or (1 if rank == 1 else math.ceil(math.sqrt(n)))
    ncols = min(ncols, len(frames))
    nrows = math.ceil(len(frames) / ncols)

    fig, axes = _new_figure(ncols, nrows, panel, standalone=save is not None)
    flat = axes.ravel()
    for ax, (i, t) in zip(flat, frames):
        if t is None:
            _draw_panel(fig, ax, x[i], None if x_disp is None else x_disp[i],
                        None if sal is None else sal[i], rank, **style)
            ax.set_title(f"#{i}", fontsize="small")
        else:
            assert x_disp is not None  # slices only for rank 3, which has a display image
            _draw_panel(fig, ax, x[i, :, t], x_disp[i, :, t],
                        None if sal is None else sal[i, t], 2, **style)
            ax.set_title(f"#{i}, slice {t}", fontsize="small")
    for ax in flat[len(frames):]:
        ax.remove()  # empty cells of an incomplete last row
    _save(fig, save)
    return fig


def plot_methods(x: Any, maps: Mapping[str, Any], *, titles: Optional[Sequence[str]] = None,
                 denormalize: Optional[Normalization] = None,
                 save: Optional[PathLike] = None, colorbar: bool = True,
                 alpha: float = 0.5, cmap: Any = "jet"):
    r"""Compare attribution methods: one row per input, one column per method.

    Parameters
    ----------
    x : torch.Tensor
        Inputs, as in :func:`saliency_plot` (signals, images or volumes; volumes show their
        middle slice).
    maps : mapping of str to torch.Tensor
        Method name → maps for the batch, each :math:`N\times 1\times` *spatial* or
        :math:`N\times` *spatial* (resized to the input if needed).  Columns follow the
        mapping's order.
    titles : sequence of str, optional
        Column titles replacing the method names, one per map.
    denormalize : (mean, std), optional
        As in :func:`saliency_plot`.
    save : str or path-like, optional
        As in :func:`saliency_plot`.
    colorbar : bool, optional
        Draw a colour bar beside each map.  Default: True.
    alpha : float, optional
        Opacity of the maps over the input; ``1`` shows the maps alone.  Default: 0.5.
    cmap : str or matplotlib.colors.Colormap, optional
        Colormap of the maps.  Default: ``'jet'``.

    Returns
    -------
    matplotlib.figure.Figure
        Figure of :math:`N` rows and ``1 + len(maps)`` columns: the first column shows the input
        (titled ``'input'``), the others the input with each method's map over it, titled with
        the method name (top row).  Panel size as in :func:`saliency_plot`.

    Raises
    ------
    ValueError
        On a bad shape of ``x`` or of a map (the message names ``maps['<name>']``), batch
        sizes that differ, or ``titles`` of the wrong length.
    """
    x = _check_x(x)
    alpha = _check_alpha(alpha)
    _check_save(save)
    if not isinstance(maps, Mapping):
        raise TypeError(f"maps must be a mapping of method name to tensor (e.g. a dict), "
                        f"got {type(maps).__name__}")
    names = list(maps)
    if titles is None:
        titles = [str(name) for name in names]
    else:
        titles = list(titles)
        if len(titles) != len(names):
            raise ValueError(f"titles must have one entry per map ({len(names)}), "
                             f"got {len(titles)}")
    checked = [_check_map(maps[name], x, f"maps[{name!r}]") for name in names]
    rank, n = x.dim() - 2, x.shape[0]
    x = _denormalize(x, denormalize)
    if rank == 3:
        # Volumes: compare the methods on the middle slice.
        mid = x.shape[2] // 2
        x = x[:, :, mid]
        checked = [m[:, mid] for m in checked]
        rank = 2
    x_disp = None if rank == 1 else _to_display_range(x, denormalize is not None)
    show_bar = colorbar and bool(names)
    panel = (SIGNAL_PANEL if rank == 1 else IMAGE_PANEL_COLORBAR if show_bar else IMAGE_PANEL)
    fig, axes = _new_figure(1 + len(names), n, panel, standalone=save is not None)
    style = dict(alpha=alpha, cmap=cmap)
    for i in range(n):
        xd = None if x_disp is None else x_disp[i]
        _draw_panel(fig, axes[i, 0], x[i], xd, None, rank, colorbar=False, **style)
        axes[i, 0].set_ylabel(f"#{i}")
        for j, m in enumerate(checked):
            _draw_panel(fig, axes[i, j + 1], x[i], xd, m[i], rank, colorbar=show_bar, **style)
    axes[0, 0].set_title("input", fontsize="small")
    for j, title in enumerate(titles):
        axes[0, j + 1].set_title(title, fontsize="small")
    _save(fig, save)
    return fig


def overlay(image: Any, saliency: Any, *, alpha: float = 0.5, cmap: Any = "jet",
            normalize: bool = True) -> np.ndarray:
    r"""Blend an image with a colour-mapped saliency map.

    Parameters
    ----------
    image : torch.Tensor or numpy.ndarray
        A tensor :math:`C\times H\times W` (or :math:`1\times C\times H\times W`), or an array
        :math:`H\times W\times C`; either may also be :math:`H\times W` (grey).  ``C = 3`` is
        RGB, ``C = 1`` grey, other ``C`` (``4``: RGBA arrays included) use the first three
        channels if ``C = 4`` and the channel mean otherwise.  ``uint8`` values are divided by
        255; float values outside ``[0, 1]`` are stretched from their minimum to their maximum.
    saliency : torch.Tensor or numpy.ndarray
        Map :math:`H'\times W'`, :math:`1\times H'\times W'` or :math:`1\times 1\times H'\times
        W'`, resized bilinearly to :math:`H\times W` if needed.
    alpha : float, optional
        Weight of the colour-mapped saliency: ``out = (1 - alpha) * image + alpha * cmap(s)``.
        Default: 0.5.
    cmap : str or matplotlib.colors.Colormap, optional
        Colormap.  Default: ``'jet'`` (blue for low, red for high values).
    normalize : bool, optional
        If true, the map is stretched to ``[0, 1]`` (min → 0, max → 1; a constant map → 0)
        before colour mapping; if false it is only clamped to ``[0, 1]``.  Default: True.

    Returns
    -------
    numpy.ndarray
        ``float`` array :math:`H\times W\times 3` with values in ``[0, 1]``.
    """
    import matplotlib

    alpha = _check_alpha(alpha)
    rgb = _overlay_image(image)
    h, w = rgb.shape[:2]
    s = as_tensor(saliency, "saliency").float()
    while s.dim() > 2 and s.shape[0] == 1:
        s = s[0]
    if s.dim() != 2:
        raise ValueError("saliency must have shape (H, W), (1, H, W) or (1, 1, H, W); "
                         f"got {tuple(as_tensor(saliency, 'saliency').shape)}")
    if tuple(s.shape) != (h, w):
        s = F.interpolate(s[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    m: np.ndarray = s.numpy().astype(np.float64)
    if normalize:
        lo, hi = np.nanmin(m), np.nanmax(m)
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    m = np.clip(np.nan_to_num(m), 0.0, 1.0)
    if isinstance(cmap, str):
        try:
            colormap = matplotlib.colormaps[cmap]
        except KeyError:
            raise ValueError(f"cmap {cmap!r} is not a registered matplotlib colormap; "
                             "see matplotlib.colormaps for the names") from None
    else:
        colormap = cmap
    heat = colormap(m)[..., :3]
    return np.clip((1.0 - alpha) * rgb + alpha * heat, 0.0, 1.0)


def _overlay_image(image: Any) -> np.ndarray:
    """:func:`overlay`'s image as an ``(H, W, 3)`` float64 array in ``[0, 1]``."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3:
            t = t.permute(1, 2, 0)  # tensors are channel-first
        elif t.dim() != 2:
            raise ValueError("image tensor must have shape (C, H, W), (1, C, H, W) or (H, W); "
                             f"got {tuple(image.shape)}")
        arr = t.numpy()
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim not in (2, 3):
            raise ValueError(f"image array must have shape (H, W, C) or (H, W); got {arr.shape}")
    else:
        raise TypeError(f"image must be a torch.Tensor or a NumPy array, got "
                        f"{type(image).__name__}")
    arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[2]
    if c == 4:
        arr = arr[..., :3]  # RGBA: drop the alpha channel
    elif c != 3:
        arr = arr.mean(axis=2, keepdims=True)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        lo, hi = arr.min(), arr.max()
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.broadcast_to(arr, arr.shape[:2] + (3,)).copy()
