r"""Maps: flatten a (pseudo-)gradient over channels, resize and smooth saliency maps."""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from numbers import Integral, Real
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.nn.functional as F

from .precision import CPU_FLOAT64, without_autocast
from .reporting import warn_caller

__all__ = ["gradient_to_saliency", "resize_saliency", "smooth_saliency", "Shape",
           "gaussian_matrix", "MAX_KERNEL_RADIUS",
           "ResizeOrderWarning", "SizeType", "ActivationMap", "check_layer_map",
           "saliency_gradient", "finish_map", "check_smooth", "gaussian_kernel",
           "check_resize_mode", "DegenerateMapWarning", "warn_degenerate", "quiet_degenerate",
           "zero_rows", "constant_rows", "samples_text", "REDUCED_PRECISION", "FLAT_SCORE_CAUSES",
           "check_precision"]

#: What ``resize`` accepts: ``False``/``True``, an int, a tuple in TorchRay's order, a Shape.
SizeType = Union[bool, int, Sequence[int], torch.Size, None]


def saliency_gradient(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x.grad`` checked for flattening: it exists and is ``(N, C, *spatial)``.

    ``name`` (the flattening function) starts the error messages.
    """
    grad = x.grad if isinstance(x, torch.Tensor) else None
    if grad is None:
        raise ValueError(
            f"{name}: the tensor has no .grad; run backward first (did the output depend on "
            "it?)")
    if grad.dim() < 2:
        raise ValueError(f"{name}: expected (N, C, *spatial), got shape {tuple(grad.shape)}")
    return grad


class ActivationMap:
    """A ``gradient_to_saliency`` that computes ``map_fn(activation, gradient)`` for a layer.

    Layer methods (Grad-CAM, linear approximation ...) weight the activation by its gradient;
    this adapter hands the map function the read tensor's values and ``.grad`` (the layer's
    spatial layout is checked before, by the driver's
    :func:`~torchray_like.attribution.driver.check_spatial`, naming the method's hint).
    """

    def __init__(self, map_fn: Callable[[torch.Tensor, Any], torch.Tensor],
                 method: str, layer: Any, hint: str, gradient: bool = True) -> None:
        self.map_fn, self.method, self.layer, self.hint = map_fn, method, layer, hint
        self.gradient = gradient  # False: map_fn reads the activation only (Eigen-CAM)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gradient and x.grad is None:
            return self.map_fn(x.detach(), None)
        return self.map_fn(x.detach(), saliency_gradient(x, self.method))


def check_layer_map(activation: torch.Tensor, gradient: torch.Tensor, function: str,
                    needs: str, hint: str) -> None:
    """The checks every layer map function (``(activation, gradient) -> map``) shares: an
    activation ``(N, C, *spatial)`` and a gradient of its shape.  ``function`` names the map
    function; ``needs`` starts the message (``"Grad-CAM needs a layer output"``); ``hint``
    says what to do about a non-spatial layer."""
    if activation.dim() < 3:
        raise ValueError(
            f"{needs} with spatial dimensions, shape (N, C, *spatial); got shape "
            f"{tuple(activation.shape)}: {hint}")
    if gradient.shape != activation.shape:
        raise ValueError(
            f"{function}: gradient shape {tuple(gradient.shape)} differs from the activation "
            f"shape {tuple(activation.shape)}")


def gradient_to_saliency(x: torch.Tensor) -> torch.Tensor:
    """Channel-flattened saliency: the maximum over channels of ``|x.grad|``.

    Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks", 2013 (arXiv 1312.6034).
    ``x`` has shape ``(N, C, *spatial)`` (any number of spatial dimensions) and a ``.grad``; the
    map is ``(N, 1, *spatial)``.
    """
    grad = saliency_gradient(x, "gradient_to_saliency")
    return grad.abs().amax(dim=1, keepdim=True)


_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_RANK_MODES = {"linear": 1, "bilinear": 2, "bicubic": 2, "trilinear": 3}
_ANY_RANK_MODES = ("nearest", "nearest-exact", "area")
_TORCH_NAMES = {1: "(L,)", 2: "(H, W)", 3: "(T, H, W)"}
_TORCHRAY_NAMES = {1: "(L,)", 2: "(W, H)", 3: "(W, H, T)"}
_MODES_TEXT = "linear/bilinear/trilinear, bicubic (2-D), nearest, nearest-exact, area"


def check_resize_mode(mode: Any, spatial: Optional[int] = None) -> str:
    """``mode`` if it is a ``resize_mode`` :func:`resize_saliency` accepts (for a map with
    ``spatial`` spatial dimensions when given), else a :class:`ValueError` (a :class:`TypeError`
    for a non-string) naming ``resize_mode`` and the accepted modes.  Checked whether or not
    the map is resized, so that a typo never passes unnoticed."""
    if not isinstance(mode, str):
        raise TypeError(f"resize_mode must be a string, one of {_MODES_TEXT}; got {mode!r}")
    if mode not in _RANK_MODES and mode not in _ANY_RANK_MODES:
        raise ValueError(f"resize_mode must be one of {_MODES_TEXT}; got {mode!r}")
    if spatial is not None and mode in _RANK_MODES and mode not in _LINEAR_MODES.values() \
            and _RANK_MODES[mode] != spatial:
        raise ValueError(f"resize_mode {mode!r} needs {_RANK_MODES[mode]} spatial dimensions, "
                         f"the map has {spatial}")
    return mode


class Shape(tuple):
    """A resize target in **torch order**: ``Shape(H, W)``, ``Shape(T, H, W)``, ``Shape(L)``.

    A plain tuple given as ``resize`` is read as TorchRay reads it, in PIL's ``Image.size``
    order — the spatial sizes from last to first, ``(W, H)`` or ``(W, H, T)`` — so that a
    ported script passing an image's size gets the same map.  Wrap the sizes in ``Shape`` to
    give them in the order of ``tensor.shape`` instead::

        gradient(model, x, c, resize=(640, 480))          # 480 rows, 640 columns (TorchRay)
        gradient(model, x, c, resize=Shape(480, 640))     # the same map, torch order
        gradient(model, x, c, resize=Shape(x.shape[2:]))  # the input's size

    ``Shape`` takes the sizes as arguments or as one sequence (a ``torch.Size`` included).
    """

    def __new__(cls, *sizes: Any) -> "Shape":
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        return super().__new__(cls, sizes)

    def __repr__(self) -> str:
        return f"Shape{tuple(self)!r}"


class ResizeOrderWarning(UserWarning):
    """A ``torch.Size`` was given as ``resize``: it is read in TorchRay's (reversed) order."""


class DegenerateMapWarning(UserWarning):
    """The call succeeded but a map says nothing about the input, and the warning says why: the
    gradient of the target's score is exactly zero (a step, rounding or saturation in the model,
    every rectifier off), the score did not change under any perturbation, or the model's
    reduced-precision output rounds the score differences a perturbation method compares."""


_QUIET = threading.local()

#: Why a target's score can have an exactly zero gradient although the call succeeded (one
#: wording for every :class:`DegenerateMapWarning` about a zero gradient).
FLAT_SCORE_CAUSES = ("a constant output, a step, rounding, sign or argmax in the model, a "
                     "saturated sigmoid/softmax")

#: Output dtypes whose rounding a perturbation method's score differences can fall under, and
#: their relative precision (the spacing of values near 1: ``torch.finfo(dtype).eps``).
REDUCED_PRECISION = {torch.float16: torch.finfo(torch.float16).eps,
                     torch.bfloat16: torch.finfo(torch.bfloat16).eps}


@contextlib.contextmanager
def quiet_degenerate() -> Iterator[List[str]]:
    """No :class:`DegenerateMapWarning` from the calls inside, in this thread only; yields the
    list their messages are collected in.  A method that runs another on copies of the input
    (SmoothGrad) warns itself, naming the caller's samples, not the copies'."""
    before = getattr(_QUIET, "heard", None)
    heard: List[str] = []
    _QUIET.heard = heard
    try:
        yield heard
    finally:
        _QUIET.heard = before


def warn_degenerate(message: str) -> None:
    """A :class:`DegenerateMapWarning` pointing at the caller's line (collected instead inside
    :func:`quiet_degenerate`)."""
    heard = getattr(_QUIET, "heard", None)
    if heard is not None:
        heard.append(message)
    else:
        warn_caller(message, DegenerateMapWarning)


def _per_sample(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``(N, values)`` (a 0-d tensor: one sample; an empty batch: no row)."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    n = tensor.shape[0]
    # reshape(n, -1) cannot infer the width of an empty batch
    return tensor.reshape(n, -1) if n else tensor.reshape(0, 0)


def zero_rows(tensor: torch.Tensor) -> List[int]:
    """The samples (dim 0) of ``tensor`` that are exactly zero everywhere (NaN is not zero)."""
    nonzero = (_per_sample(tensor) != 0).any(1)
    return (~nonzero).nonzero().flatten().tolist()


def constant_rows(tensor: torch.Tensor) -> List[int]:
    """The samples (dim 0) of ``tensor`` whose values are all equal (zero included)."""
    flat = _per_sample(tensor)
    return (flat == flat[:, :1]).all(1).nonzero().flatten().tolist()


def samples_text(rows: Sequence[int]) -> str:
    """``[0, 2]`` (at most ten samples named, then how many more)."""
    rows = list(rows)
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    return f"{rows[:10]}{more}"


def check_precision(name: str, dtype: torch.dtype, scores: torch.Tensor,
                    changes: torch.Tensor, what: str = "score change") -> None:
    """Warn when a reduced-precision model output (float16 / bfloat16) rounds the score
    differences a perturbation method's map is made of: for the samples (dim 0) where the
    rounding step of the scores met, ``eps · 2^⌊log2 (|score| + max |change|)⌋`` (the
    largest magnitude among the clean and perturbed scores, so a score of 0 is no special
    case; never below the subnormal spacing), is over 1 % of the largest ``|changes|``
    (``scores`` ``(N,)`` and ``changes`` ``(N, ...)``, in float32/64)."""
    eps = REDUCED_PRECISION.get(dtype)
    if eps is None:
        return
    spread = changes.abs().reshape(changes.shape[0], -1).amax(1).double()
    _, exponent = torch.frexp(scores.abs().double() + spread)
    # below the smallest normal number the spacing stops shrinking (subnormals)
    step = (eps * torch.pow(2.0, exponent.double() - 1)).clamp(min=torch.finfo(dtype).tiny * eps)
    bad = (step > 0.01 * spread).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        warn_degenerate(
            f"{name}: the model's output is {dtype} (relative precision {eps:.1e}), so the "
            f"target's score rounds in steps of {step[i].item():.2g} (sample {i}: score "
            f"{scores[i].item():.4g}) against a largest {what} of {spread[i].item():.3g}: the "
            f"map of sample(s) {samples_text(bad)} is quantised to that step (errors up to "
            f"{min(100 * step[i].item() / max(spread[i].item(), 1e-300), 1e9):.3g} % of its "
            "largest value); run the model's head in float32 (drop the .half() / .bfloat16() "
            "on its output, or call model.float())")


def _spatial_size(size: Any, spatial: int, like: torch.Tensor) -> Optional[Tuple[int, ...]]:
    if size is None or size is False:
        return None
    if size is True:
        return tuple(like.shape[2:])
    if isinstance(size, bool):
        return None
    if isinstance(size, Integral):
        size = (int(size),) * spatial
    if not isinstance(size, (tuple, list, torch.Size)):
        raise TypeError(
            f"resize must be False, True, an int, a tuple of {spatial} ints in TorchRay's "
            f"order {_TORCHRAY_NAMES.get(spatial, '')} or Shape{_TORCH_NAMES.get(spatial, '')} "
            f"in torch order; got {size!r}")
    torch_order = isinstance(size, Shape)
    values = tuple(size)
    if len(values) != spatial or not all(isinstance(s, Integral) and not isinstance(s, bool)
                                         and cast(int, s) > 0 for s in values):
        if torch_order:
            raise ValueError(
                f"resize must give {spatial} positive sizes in torch order "
                f"Shape{_TORCH_NAMES.get(spatial, '')}, got {size!r}")
        raise ValueError(
            f"resize must give {spatial} positive sizes, as a tuple in TorchRay's order "
            f"{_TORCHRAY_NAMES.get(spatial, '')} (PIL's Image.size: last dimension first) or as "
            f"Shape{_TORCH_NAMES.get(spatial, '')} in torch order; got {size!r}")
    values = tuple(int(s) for s in values)
    if torch_order:
        return values
    if isinstance(size, torch.Size) and len(set(values)) > 1:
        warnings.warn(
            f"resize={size!r}: a torch.Size is read like any tuple, in TorchRay's order "
            f"{_TORCHRAY_NAMES[spatial]} (last dimension first), giving a map of spatial shape "
            f"{values[::-1]}; for torch order pass resize=Shape(...) (e.g. "
            "Shape(x.shape[2:])) or resize=True for the input's size",
            ResizeOrderWarning, stacklevel=4)
    return values[::-1]


def resize_saliency(tensor: torch.Tensor, saliency: torch.Tensor, size: SizeType,
                    mode: str = "bilinear") -> torch.Tensor:
    """Resize a saliency map ``(N, 1, *spatial)``.

    Parameters
    ----------
    tensor : torch.Tensor
        The input the map explains (gives the size for ``size=True``).
    saliency : torch.Tensor
        The map, ``(N, C, *spatial)`` with 1 to 3 spatial dimensions.
    size : bool, int, tuple or Shape
        ``False``/``None``: unchanged; ``True``: the input's spatial size; an int: that size on
        every side; a tuple: the sizes **in TorchRay's order**, last spatial dimension first —
        ``(W, H)`` for images (PIL's ``Image.size``), ``(W, H, T)`` for video, ``(L,)`` for
        signals; a :class:`Shape`: the sizes in torch order ``Shape(H, W)``,
        ``Shape(T, H, W)``.  A ``torch.Size`` counts as a tuple (TorchRay's order, with a
        :class:`ResizeOrderWarning` when its sizes differ).
    mode : str
        Any :func:`torch.nn.functional.interpolate` mode valid for the rank.  The linear family
        (``"linear"``, ``"bilinear"``, ``"trilinear"``) means multilinear interpolation and is
        adapted to the rank, so the default ``"bilinear"`` works for 1-D and 3-D maps too.
    """
    spatial = saliency.dim() - 2
    check_resize_mode(mode)  # also when the map keeps its size
    if size is True and tensor.dim() != saliency.dim():
        raise ValueError(
            f"resize=True: the map has {spatial} spatial dimensions (shape "
            f"{tuple(saliency.shape)}) but the input has {tensor.dim() - 2} (shape "
            f"{tuple(tensor.shape)}); give the size explicitly")
    out_size = _spatial_size(size, spatial, tensor)
    if out_size is None:
        return saliency
    if spatial < 1 or spatial > 3:
        raise ValueError(f"resize works for 1 to 3 spatial dimensions, got {spatial}")
    check_resize_mode(mode, spatial)
    if mode in ("linear", "bilinear", "trilinear"):
        mode = _LINEAR_MODES[spatial]
    if tuple(saliency.shape[2:]) == out_size:
        return saliency
    if mode in _ANY_RANK_MODES:
        return F.interpolate(saliency, size=out_size, mode=mode)
    return F.interpolate(saliency, size=out_size, mode=mode, align_corners=False)


#: The widest Gaussian kernel made (radius in taps): 2**20, a σ of 262 144 px at 4σ.
MAX_KERNEL_RADIUS = 2 ** 20


def gaussian_kernel(sigma: float, truncate: float, dtype: torch.dtype, device: Any,
                    radius: Optional[int] = None) -> torch.Tensor:
    """The normalised 1-D Gaussian of standard deviation ``sigma`` sampled on ``[-r, r]``: the
    one kernel of the package.  By default ``r = int(truncate * sigma + 0.5)``, scipy's
    ``gaussian_filter`` (the maps' smoothing is compared with it); TorchRay's ``imsmooth``
    passes ``radius = ceil(4 sigma)``, its own convention, so its numbers stay TorchRay's."""
    if radius is None:
        radius = int(truncate * sigma + 0.5)
    if radius > MAX_KERNEL_RADIUS:
        # (Before: torch.arange's OverflowError or the allocator's error.)
        raise ValueError(
            f"a Gaussian blur of sigma={sigma:g} px would need a kernel of {2 * radius + 1:.3g} "
            f"taps (at most {2 * MAX_KERNEL_RADIUS + 1}); a blur that wide is constant over any "
            "image: use a smaller sigma (max_blur, smooth or blur_sigma), or a constant")
    radius = max(radius, 1)
    t = torch.arange(-radius, radius + 1, **CPU_FLOAT64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_matrix(length: int, sigma: float, truncate: float = 4.0,
                    dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The ``(length, length)`` matrix of a 1-D Gaussian blur with replicated borders.

    ``K @ v`` applies :func:`smooth_saliency`'s operator (the kernel of :func:`gaussian_kernel`,
    cut at ``int(truncate·σ + 0.5)`` pixels, borders replicated) — scipy's
    ``gaussian_filter1d(v, sigma, mode="nearest", truncate=truncate)``.  A dense product is far
    faster on CPUs than a long 1-D convolution (σ = 20 px needs 161 taps).
    """
    k = gaussian_kernel(sigma, truncate, torch.float64, "cpu")
    radius = (k.numel() - 1) // 2
    # Row i, column j holds k[j − i + radius] (the band) ...
    i = torch.arange(length, device="cpu").view(-1, 1)
    offset = torch.arange(length, device="cpu").view(1, -1) - i
    mat = torch.where(offset.abs() <= radius, k[(offset + radius).clamp(0, 2 * radius)],
                      torch.zeros((), **CPU_FLOAT64))
    # ... plus, in the first and last columns, the taps that fall off the border (replicated).
    cum = torch.cat([torch.zeros(1, **CPU_FLOAT64), k.cumsum(0)])   # cum[n] = Σ k[:n]
    rows = i.view(-1)
    mat[:, 0] += cum[(radius - rows).clamp(0, 2 * radius + 1)]
    mat[:, -1] += 1 - cum[(radius + length - rows).clamp(0, 2 * radius + 1)]
    return mat.to(dtype=dtype, device=device)


def smooth_saliency(saliency: torch.Tensor, sigma: Union[float, Sequence[float]],
                    truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, C, *spatial)`` maps (1 to 3 spatial dims).

    ``sigma`` is in pixels (one value, or one per spatial dimension); the kernel is truncated
    at ``truncate`` standard deviations and borders are extended by replication (scipy's
    ``gaussian_filter(..., mode="nearest")``), so a constant map stays constant.
    """
    spatial = saliency.dim() - 2
    if spatial < 1 or spatial > 3:
        raise ValueError(f"smoothing works for 1 to 3 spatial dimensions, got {spatial}")
    sigmas = ([float(sigma)] * spatial if isinstance(sigma, (int, float))
              else [float(s) for s in sigma])
    if len(sigmas) != spatial or any(s < 0 or not math.isfinite(s) for s in sigmas):
        raise ValueError(f"sigma must be {spatial} non-negative numbers, got {sigma!r}")
    with without_autocast(saliency.device):  # the caller's would make a bfloat16 map
        return _smooth_axes(saliency, sigmas, truncate)


def _smooth_axes(saliency: torch.Tensor, sigmas: List[float], truncate: float) -> torch.Tensor:
    out = saliency
    for d, s in enumerate(sigmas):
        if s == 0:
            continue
        dim = 2 + d
        moved = out.movedim(dim, -1)
        shape = moved.shape
        if int(truncate * s + 0.5) >= shape[-1]:
            # A kernel wider than the map: the same operator as a dense (L, L) product, whose
            # cost does not grow with σ (the padded convolution's grows as σ · L).
            mat = gaussian_matrix(shape[-1], s, truncate, out.dtype, out.device)
            out = (moved @ mat.t()).movedim(-1, dim)
            continue
        k = gaussian_kernel(s, truncate, out.dtype, out.device)
        r = (k.numel() - 1) // 2
        flat = moved.reshape(-1, 1, shape[-1])
        flat = F.pad(flat, (r, r), mode="replicate")
        flat = F.conv1d(flat, k.view(1, 1, -1))
        out = flat.view(shape).movedim(-1, dim)
    return out.contiguous()


def check_smooth(smooth: Any) -> float:
    """Validate the ``smooth`` argument (a non-negative finite number, NumPy scalars too).

    ``smooth`` blurs the *map* with a Gaussian of ``sigma = smooth * max(spatial size)``; it is
    not SmoothGrad (:func:`~torchray_like.attribution.smooth_grad.smooth_grad` averages a
    method over noisy copies of the input)."""
    if isinstance(smooth, (bool, np.bool_)) or not (isinstance(smooth, Real)
                                                    and float(smooth) >= 0
                                                    and math.isfinite(smooth)):
        raise ValueError(f"smooth must be a non-negative number, got {smooth!r}")
    return float(smooth)


def finish_map(input: torch.Tensor, smap: torch.Tensor, resize: SizeType = False,
               resize_mode: str = "bilinear", smooth: float = 0) -> torch.Tensor:
    """The last steps every method shares: detach, cast to the input's dtype, resize, then
    smooth with ``sigma = smooth * max(spatial size)`` of the resized map.

    The cast matters under the caller's :func:`torch.autocast`: a layer's activation and
    gradient are then bfloat16 / float16, but a map of a float32 input is float32."""
    smap = smap.detach()
    if input.is_floating_point() and smap.dtype != input.dtype:
        smap = smap.to(input.dtype)
    smap = resize_saliency(input, smap, resize, resize_mode)
    if smooth:
        smap = smooth_saliency(smap, smooth * max(smap.shape[2:]))
    return smap

