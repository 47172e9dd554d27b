"""The example figure of TorchRay's examples: an input image next to its saliency map."""

from __future__ import annotations

import os
import warnings
from numbers import Integral
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..attribution.arguments import check_flag, check_not_meta, check_real
from ..utils import check_output_path
from ..visualize import NONFINITE_COLOR, PlotWarning

__all__ = ["plot_example"]

PathLike = Union[str, "os.PathLike[str]"]


def _category_name(category_id: int, class_names: Any) -> Optional[str]:
    """The name of ``category_id`` in ``class_names``, or ``None`` when it has none."""
    if class_names is None:
        return None
    if isinstance(class_names, str):
        if class_names.lower() != "imagenet":
            raise ValueError(f"class_names must be None, 'imagenet', a sequence or a mapping of "
                             f"names, got the string {class_names!r}")
        # The 1000 ImageNet names ship inside torchvision (no download).
        from torchvision.models import ResNet18_Weights

        class_names = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    if isinstance(class_names, Mapping):
        # A dict read from JSON has str keys ("1": "goldfish").
        name = class_names.get(category_id, class_names.get(str(category_id)))
        return None if name is None else str(name)
    if isinstance(class_names, np.ndarray) and class_names.ndim == 1:
        class_names = class_names.tolist()
    if isinstance(class_names, Sequence) and not isinstance(class_names, (bytes, bytearray)):
        return str(class_names[category_id]) if 0 <= category_id < len(class_names) else None
    raise TypeError(f"class_names must be None, 'imagenet', a sequence or a mapping, got "
                    f"{type(class_names).__name__}; pass a list indexed by category_id or a dict")


def _category_id(category_id: Any) -> int:
    """An int from an int or a one-element integer tensor (a float would be truncated)."""
    if isinstance(category_id, torch.Tensor):
        check_not_meta(category_id, "category_id")
        if category_id.numel() == 1 and not (category_id.is_floating_point()
                                             or category_id.is_complex()
                                             or category_id.dtype == torch.bool):
            category_id = int(category_id.item())
    if not isinstance(category_id, Integral) or isinstance(category_id, (bool, np.bool_)):
        raise TypeError(f"category_id must be an int (or a one-element integer tensor), got "
                        f"{category_id!r}")
    return int(category_id)


def _as_image(value: Any, name: str, channels: Optional[int]) -> torch.Tensor:
    """``value`` as a CPU float ``(C, H, W)``; a leading batch of one is dropped."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_real(value, name)  # (.float() would keep the real part with only a warning)
    # float64: a float64 value beyond float32's range would show as infinite.
    t = value.detach().cpu().double()
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"{name} must hold one example (batch size 1), got "
                             f"{tuple(t.shape)}; pass {name}[i:i+1]")
        t = t[0]
    if t.dim() == 2 and channels == 1:
        t = t.unsqueeze(0)
    if t.dim() != 3 or (channels is not None and t.shape[0] != channels):
        want = f"(1, {channels}, H, W) or ({channels}, H, W)" if channels else "(1, C, H, W)"
        if channels == 1:
            want += " or (H, W)"
        raise ValueError(f"{name} must have shape {want}; got {tuple(value.shape)}")
    return t


def _stretch(t: torch.Tensor) -> torch.Tensor:
    """Min → 0, max → 1 (zeros for a constant tensor): undoes any affine normalisation."""
    lo, hi = t.min(), t.max()
    # Halved: a range of ±1e308 would overflow to inf and show as zeros.
    return (t / 2 - lo / 2) / (hi / 2 - lo / 2) if hi > lo else torch.zeros_like(t)


def _map_for_display(smap: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, Optional[str]]:
    """The map stretched to ``[0, 1]`` over its finite values, its mask of non-finite values,
    and, when it has no range to stretch, what to write instead of a colour scale."""
    m = smap.double().numpy()
    finite = np.isfinite(m)
    kept = m[finite]
    if kept.size == 0:
        return np.zeros_like(m), ~finite, "no finite value"
    lo, hi = float(kept.min()), float(kept.max())
    if hi == lo:
        return np.zeros_like(m), ~finite, "all zero" if lo == 0 else f"constant {lo:.3g}"
    return np.where(finite, (m / 2 - lo / 2) / (hi / 2 - lo / 2), 0.0), ~finite, None


def _warn_map(bad: np.ndarray, note: Optional[str]) -> None:
    if bad.any():
        warnings.warn(f"saliency has {int(bad.sum())} NaN or infinite value(s): they are "
                      "painted magenta and left out of the colour scale; replace them first "
                      "(torch.nan_to_num) to give them a colour", PlotWarning, stacklevel=4)
    if note is not None:
        warnings.warn(f"saliency is {note}: there is no range to show, so the panel says so "
                      "and draws no colour bar", PlotWarning, stacklevel=4)


def _draw_map(fig, ax, smap: torch.Tensor, h: int, w: int) -> None:
    """The map over the image's extent, masked values and a missing range shown as such."""
    shown, bad, note = _map_for_display(smap)
    _warn_map(bad, note)
    # Same extent as the image so that coordinates match whatever the map's resolution.
    where = dict(interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    handle = ax.imshow(shown, cmap="jet", vmin=0.0, vmax=1.0,
                       alpha=1.0 if note is None else 0.0, **where)
    if bad.any():  # a layer of its own, opaque, in NONFINITE_COLOR
        mask = np.zeros(bad.shape + (4,))
        mask[bad] = NONFINITE_COLOR + (1.0,)
        ax.imshow(mask, **where)
    notes = ([] if note is None else [note]) + ([f"{int(bad.sum())} NaN/inf (magenta)"]
                                                if bad.any() else [])
    if notes:
        ax.text(0.5, 0.5, "\n".join(notes), transform=ax.transAxes, ha="center",
                va="center", bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    # Hidden without a range, never an invented 0..1 scale; the layout stays the same.
    fig.colorbar(handle, ax=ax, shrink=0.85).ax.set_visible(note is None)


def plot_example(input: torch.Tensor, saliency: torch.Tensor, method: str,
                 category_id: int, show_plot: bool = False,
                 save_path: Optional[PathLike] = None, *,
                 class_names: Union[None, str, Sequence[str], Mapping[int, str]] = None):
    """Plot an input image (left) next to its saliency map (right).

    Parameters
    ----------
    input : torch.Tensor
        Image of shape ``(1, 3, H, W)`` (or ``(3, H, W)``), possibly ImageNet-normalised: it is
        shown with its values stretched to ``[0, 1]`` (minimum → 0, maximum → 1), which undoes
        any per-image affine normalisation up to per-channel differences.
    saliency : torch.Tensor
        Map of shape ``(1, 1, h, w)`` (or ``(1, h, w)``, ``(h, w)``), at any resolution; it is
        drawn over the same extent as the image (a 7×7 Grad-CAM map shows as 7×7 blocks),
        stretched to ``[0, 1]`` over its finite values, with the ``'jet'`` colormap and a
        colour bar.  NaN and infinite values are painted
        :data:`~torchray_like.visualize.NONFINITE_COLOR`; a map with no range (all zero) is
        named on its panel instead of being given a colour bar; both with a
        :class:`~torchray_like.visualize.PlotWarning`.
    method : str
        Name of the attribution method, used in the title.
    category_id : int
        Class the map explains, used in the title.
    show_plot : bool, optional
        Call :func:`matplotlib.pyplot.show` after drawing.  Default: False.
    save_path : str or path-like, optional
        Save the figure there (the format follows the extension).  When given and
        ``show_plot`` is false, the figure is closed in pyplot after saving so that saving many
        examples does not accumulate open figures; the returned object stays usable.
    class_names : sequence, mapping or 'imagenet', optional
        Names of the categories: a list indexed by ``category_id``, a dict from id to name, or
        ``'imagenet'`` for torchvision's 1000 ImageNet names.  The title uses the name when
        ``category_id`` has one, else the number.

    Returns
    -------
    matplotlib.figure.Figure
        The figure, with two axes: the image (title ``'input image'``) and the map (title
        ``'<method> (<category>)'``).

    Raises
    ------
    ValueError
        On a bad shape, an empty input or map, or an input with NaN / infinite values.
    TypeError
        If an argument has the wrong type.
    """
    import matplotlib.pyplot as plt  # lazy: no backend selected at import time

    check_flag(show_plot, "show_plot")
    check_output_path(save_path, "save_path")  # before drawing, not after
    image = _as_image(input, "input", 3)
    if not bool(torch.isfinite(image).all()):
        raise ValueError("input has NaN or infinite values and cannot be shown; fix it or "
                         "replace them with torch.nan_to_num(input)")
    smap = _as_image(saliency, "saliency", 1)
    if 0 in image.shape or 0 in smap.shape:
        raise ValueError(f"input {tuple(input.shape)} and saliency {tuple(saliency.shape)} "
                         "must not be empty")
    if not isinstance(method, str):
        raise TypeError(f"method must be the method's name (a str), got {type(method).__name__}")
    category_id = _category_id(category_id)
    name = _category_name(category_id, class_names)
    label = f"{name} ({category_id})" if name is not None else f"category {category_id}"

    _, h, w = image.shape
    fig, (ax_img, ax_map) = plt.subplots(1, 2, figsize=(8.0, 3.6), dpi=100, layout="constrained")
    ax_img.imshow(_stretch(image).permute(1, 2, 0).numpy())
    ax_img.set_title("input image", fontsize="medium")
    _draw_map(fig, ax_map, smap[0], h, w)
    ax_map.set_title(f"{method} ({label})", fontsize="medium")
    for ax in (ax_img, ax_map):
        ax.set_xticks([])
        ax.set_yticks([])
    if save_path is not None:
        fig.savefig(save_path)
    if show_plot:
        plt.show()
    elif save_path is not None:
        plt.close(fig)
    return fig
