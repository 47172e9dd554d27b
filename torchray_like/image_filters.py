r"""Filtering and resampling of image batches: TorchRay's ``imsmooth`` and ``resample``.

Re-exported by :mod:`torchray_like.utils` (TorchRay's import path); here so that the utilities
module holds display, reading and environment helpers only.
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .attribution.maps import gaussian_kernel

__all__ = ["imsmooth", "resample"]


_PADDING_MODES = ("constant", "reflect", "replicate", "circular")


def _check_imsmooth(tensor: Any, sigma: Any, stride: Any, padding: Any,
                    padding_mode: Any) -> float:
    """:func:`imsmooth`'s arguments checked; returns ``sigma`` as a float."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 4:
        raise ValueError("tensor must have shape (N, C, H, W); got "
                         f"{tuple(tensor.shape)} (add batch/channel dimensions with unsqueeze)")
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must be floating point, got {tensor.dtype}; convert with .float()")
    if isinstance(sigma, torch.Tensor):
        sigma = float(sigma.item())
    if not isinstance(sigma, Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0)):
        if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    return float(sigma)


def imsmooth(tensor: torch.Tensor, sigma: float, stride: int = 1, padding: int = 0,
             padding_mode: str = "constant", padding_value: float = 0) -> torch.Tensor:
    r"""Smooth each channel of a batch of images with an isotropic Gaussian.

    The kernel is the Gaussian of standard deviation ``sigma`` sampled at integer offsets
    :math:`-r..r`, :math:`r = \lceil 4\sigma\rceil`, normalised to sum to one, and applied
    separably (rows, then columns) to every channel independently.  The input is padded by
    ``r + padding`` on every side, so with ``padding=0`` and ``stride=1`` the output has the
    input's size; in general the output side is :math:`\lfloor (H + 2p - 1) / s\rfloor + 1`.

    Parameters
    ----------
    tensor : torch.Tensor
        Batch :math:`N\times C\times H\times W` (floating point).
    sigma : float
        Standard deviation in pixels, ``>= 0``; ``0`` leaves the values unchanged (only
        ``padding`` and ``stride`` apply).
    stride : int, optional
        Subsampling step of the output.  Default: 1.
    padding : int, optional
        Extra padding added on each side, beyond the kernel radius.  Default: 0.
    padding_mode : str, optional
        How the border is extended: ``'constant'`` (with ``padding_value``), ``'reflect'``,
        ``'replicate'`` or ``'circular'`` (see :func:`torch.nn.functional.pad`).
        Default: ``'constant'``.
    padding_value : float, optional
        Fill value for ``padding_mode='constant'``.  Default: 0.

    Returns
    -------
    torch.Tensor
        Smoothed batch :math:`N\times C\times H'\times W'`, same dtype and device; differentiable.
    """
    sigma = _check_imsmooth(tensor, sigma, stride, padding, padding_mode)
    n, c, h, w = tensor.shape
    if sigma == 0:
        radius, kernel = 0, None
    else:
        # TorchRay's radius, ceil(4 sigma): the kernel of the maps' smoothing, sampled wider.
        kernel = gaussian_kernel(float(sigma), 4.0, tensor.dtype, tensor.device,
                                 radius=math.ceil(4.0 * sigma))
        radius = (kernel.numel() - 1) // 2
    pad = radius + padding
    if pad > 0:
        if padding_mode == "reflect" and (pad >= h or pad >= w):
            raise ValueError(f"padding_mode='reflect' needs a padding ({pad} = kernel radius + "
                             f"padding) smaller than the image ({h}x{w}); use 'replicate' or a "
                             "smaller sigma")
        kwargs = {"value": float(padding_value)} if padding_mode == "constant" else {}
        x = F.pad(tensor, (pad, pad, pad, pad), mode=padding_mode, **kwargs)
    else:
        x = tensor
    if kernel is not None:
        # Depthwise (groups = C) separable convolution: each channel is smoothed on its own.
        kh = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
        kw = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
        x = F.conv2d(x, kh, stride=(stride, 1), groups=c)
        x = F.conv2d(x, kw, stride=(1, stride), groups=c)
    elif stride > 1:
        x = x[:, :, ::stride, ::stride]
    return x


def _from_torchray_transform(st: torch.Tensor) -> torch.Tensor:
    """TorchRay's ``[[s_u, t_u], [s_v, t_v]]`` as our ``[A | b]`` on pixel-centre coordinates."""
    scale, offset = st[:, 0], st[:, 1]
    if bool((scale == 0).any()):
        raise ValueError(f"transform: TorchRay's 2x2 form [[s_u, t_u], [s_v, t_v]] needs non-zero "
                         f"scales, got s = {scale.tolist()}")
    if bool((offset != 0).any()):
        warnings.warn("resample: TorchRay's 2x2 transform with offsets t = "
                      f"{offset.tolist()} maps source u to u' = s*u - t (TorchRay's code, "
                      "followed here; its docstring says + t); pass a (2, 3) matrix [A | b] "
                      "to state the map explicitly", UserWarning, stacklevel=3)
    # u = (u' + t) / s with u = x + 1/2 (unit squares) -> x_s = x' / s + (t + 1/2) / s - 1/2.
    return torch.cat([torch.diag(1 / scale), ((offset + 0.5) / scale - 0.5)[:, None]], dim=1)


def resample(source: torch.Tensor, target_size: Sequence[int], transform: Any, *,
             mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    r"""Resample images through an affine map given in pixel coordinates.

    Output pixel :math:`(x, y)` (column, row; pixel centres at integer coordinates, the first
    pixel's centre at ``(0, 0)``) takes the value of ``source`` at

    .. math:: \begin{bmatrix}x_s\\ y_s\end{bmatrix} = A\begin{bmatrix}x\\ y\end{bmatrix} + b,
       \qquad \texttt{transform} = [A \mid b],

    interpolated with :func:`torch.nn.functional.grid_sample` (the pixel map is converted to the
    normalised coordinates of :func:`torch.nn.functional.affine_grid`, ``align_corners=False``).
    The identity ``[[1, 0, 0], [0, 1, 0]]`` with ``target_size`` equal to the source size
    returns the source; ``[[2, 0, 0.5], [0, 2, 0.5]]`` with half the size downsamples by two,
    each output pixel sampling the centre of a 2×2 block.

    Parameters
    ----------
    source : torch.Tensor
        Images :math:`N\times C\times H\times W` (floating point).
    target_size : sequence of int
        Output ``(H', W')``, or a full ``(N, C, H', W')`` whose ``N`` and ``C`` match ``source``
        (so ``x.shape`` can be passed).
    transform : torch.Tensor or array-like
        Affine map from output to source pixel coordinates: :math:`2\times 3` (or homogeneous
        :math:`3\times 3`) for the whole batch, or :math:`N\times 2\times 3`
        (:math:`N\times 3\times 3`) per image.  TorchRay's :math:`2\times 2` form
        ``[[s_u, t_u], [s_v, t_v]]`` (scale and offset per axis, pixels as unit squares) is
        accepted and gives TorchRay's numbers: source :math:`u = (u' + t_u)/s_u`, i.e.
        :math:`u' = s_u u - t_u` (TorchRay's docstring says :math:`+t_u`; a non-zero offset
        warns, pass the :math:`2\times 3` matrix to be explicit).
    mode : str, optional
        ``grid_sample`` interpolation: ``'bilinear'``, ``'nearest'`` or ``'bicubic'``.
    padding_mode : str, optional
        ``grid_sample`` padding for points outside the source: ``'zeros'``, ``'border'`` or
        ``'reflection'``.

    Returns
    -------
    torch.Tensor
        Resampled images :math:`N\times C\times H'\times W'`; differentiable with respect to
        ``source`` and ``transform``.
    """
    if not isinstance(source, torch.Tensor) or source.dim() != 4:
        shape = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
        raise ValueError(f"source must be a tensor of shape (N, C, H, W), got {shape}")
    if not source.is_floating_point():
        raise TypeError(f"source must be floating point, got {source.dtype}; use .float()")
    n, c, h, w = source.shape
    size = tuple(int(v) for v in target_size)
    if len(size) == 4:
        if size[:2] != (n, c):
            raise ValueError(f"target_size {size} does not match the source's batch and "
                             f"channels {(n, c)}; pass just (H, W)")
        size = size[2:]
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"target_size must be (H, W) or (N, C, H, W) of positive sizes, "
                         f"got {tuple(target_size)}")
    th, tw = size
    a = torch.as_tensor(transform, dtype=source.dtype, device=source.device)
    if a.shape == (2, 2):
        a = _from_torchray_transform(a)
    if a.dim() == 2:
        a = a.unsqueeze(0).expand(n, -1, -1)
    if a.dim() != 3 or a.shape[0] != n or a.shape[1:] not in ((2, 3), (3, 3)):
        raise ValueError(f"transform must have shape (2, 3), (3, 3), (N, 2, 3) or (N, 3, 3) "
                         f"with N = {n}; got {tuple(torch.as_tensor(transform).shape)}")
    a = a[:, :2, :]
    # pixel = D u + c maps normalised coordinates u in [-1, 1] to pixel coordinates.
    d_t = torch.tensor([tw / 2.0, th / 2.0], dtype=a.dtype, device=a.device)
    c_t = torch.tensor([(tw - 1) / 2.0, (th - 1) / 2.0], dtype=a.dtype, device=a.device)
    d_s = torch.tensor([w / 2.0, h / 2.0], dtype=a.dtype, device=a.device)
    c_s = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=a.dtype, device=a.device)
    lin, off = a[:, :, :2], a[:, :, 2]
    theta_lin = lin * d_t.view(1, 1, 2) / d_s.view(1, 2, 1)
    theta_off = (lin @ c_t + off - c_s) / d_s
    theta = torch.cat([theta_lin, theta_off.unsqueeze(-1)], dim=2)
    grid = F.affine_grid(theta, [n, c, th, tw], align_corners=False)
    return F.grid_sample(source, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
