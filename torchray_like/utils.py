r"""General helpers with TorchRay's names: displaying tensors, reading images, smoothing,
resampling, devices, directories and the configuration file.

Importing this module does not import matplotlib: the display helpers (:func:`imsc`,
:func:`imarraysc`) import :mod:`matplotlib.pyplot` when they are called, so the module is safe
to use on a headless machine, in worker processes and in code that never plots.

Image conventions:

* A *tensor image* has shape :math:`C\times H\times W` (``C = 1`` grey, ``C = 3`` RGB) and, when
  it holds colours, values in ``[0, 1]`` (see :func:`pil_to_tensor`).
* A *NumPy image* has shape :math:`H\times W\times C` (what matplotlib and PIL expect); see
  :func:`im_to_numpy`.
"""

from __future__ import annotations

import io
import json
import math
import os
import urllib.parse
from numbers import Integral
from typing import Any, Dict, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch

from .attribution.arguments import check_not_meta, check_real
from .image_filters import imsmooth, resample

__all__ = [
    "get_config",
    "get_device",
    "im_to_numpy",
    "imarraysc",
    "imread",
    "imsc",
    "imsmooth",
    "is_url",
    "pil_to_tensor",
    "resample",
    "tensor_to_im",
    "xmkdir",
]

PathLike = Union[str, "os.PathLike[str]"]

#: URL schemes that :func:`is_url` recognises.
URL_SCHEMES = ("http", "https", "ftp", "file")

#: Environment variable naming a configuration file to read instead of the default locations.
CONFIG_ENV = "TORCHRAY_LIKE_CONFIG"


# ------------------------------------------------------------------------------------------------
# Display
# ------------------------------------------------------------------------------------------------

def as_tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` as a detached CPU tensor, for display and plotting helpers.

    Parameters
    ----------
    value : torch.Tensor or numpy.ndarray
        The data; a tensor is detached and moved to the CPU, an array is wrapped (made
        contiguous first, so negative strides are accepted).
    name : str
        The argument's name, used in the error message.

    Returns
    -------
    torch.Tensor
        The data on the CPU, without autograd history, in its own dtype.

    Raises
    ------
    TypeError
        If ``value`` is neither a tensor nor a NumPy array.
    ValueError
        If ``value`` is a tensor on the meta device (it has no values to show).
    """
    if isinstance(value, torch.Tensor):
        check_not_meta(value, name)
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor (or a NumPy array), got {type(value).__name__}")


def check_output_path(path: Any, name: str) -> None:
    """Check, before any drawing, that a figure can be saved to ``path``.

    Parameters
    ----------
    path : str or path-like or None
        Where the figure goes (``None``: nowhere, nothing to check).
    name : str
        The argument's name, used in the error messages.

    Raises
    ------
    TypeError
        If ``path`` is not a path.
    ValueError
        If ``path`` is a folder, its folder does not exist, or its extension is not a format
        matplotlib writes (no extension: PNG, as matplotlib does).
    """
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be None or a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{name} is a folder ({path!r}); give a file name in it, e.g. "
                         f"{os.path.join(path, 'figure.png')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{name}: the folder {folder!r} does not exist; create it first "
                         "(os.makedirs(folder, exist_ok=True))")
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext and ext not in formats:
        raise ValueError(f"{name} has the extension {ext!r}, which matplotlib cannot write; use "
                         f"one of {', '.join(sorted(formats))}")


def _check_lim(lim: Optional[Sequence[float]]) -> Optional[Tuple[float, float]]:
    if lim is None:
        return None
    try:
        lo, hi = (float(v) for v in lim)
    except (TypeError, ValueError):
        raise TypeError(f"lim must be None or a pair (lo, hi) of numbers, got {lim!r}") from None
    if not hi > lo:
        raise ValueError(f"lim must satisfy lo < hi, got lim={lim!r}")
    return lo, hi


def _rescale(img: torch.Tensor, lim: Optional[Tuple[float, float]]) -> torch.Tensor:
    """Map ``lim`` (default: the tensor's own min and max) to ``[0, 1]``, clamping outside it."""
    img = img.float()
    if lim is None:
        lo, hi = img.min().item(), img.max().item()
    else:
        lo, hi = lim
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError("the image contains NaN or infinite values; it cannot be rescaled")
    if hi <= lo:
        # A constant image has no range to stretch: show it as black rather than divide by 0.
        return torch.zeros_like(img)
    return ((img - lo) / (hi - lo)).clamp_(0.0, 1.0)


def _image_chw(img: Any, name: str = "img") -> torch.Tensor:
    """Validate a displayable image and return it as ``(C, H, W)`` with ``C`` in ``{1, 3}``."""
    img = as_tensor(img, name)
    check_real(img, name)  # (the rescale would keep the real part only, silently)
    if img.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(img.shape)}): there is nothing to show")
    if img.dim() == 4:
        if img.shape[0] != 1:
            raise ValueError(f"{name} has a batch of {img.shape[0]} images; imsc shows one image: "
                             f"pass {name}[i], or use imarraysc for a batch")
        img = img[0]
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"{name} must have shape (C, H, W) with C = 1 or 3, (H, W), or "
                         f"(1, C, H, W); got {tuple(img.shape)}")
    return img


def imsc(img: Any, *args: Any, quiet: bool = False, lim: Optional[Sequence[float]] = None,
         interpolation: str = "lanczos", **kwargs: Any) -> Tuple[torch.Tensor, Any]:
    r"""Rescale an image to ``[0, 1]`` and display it with :func:`matplotlib.pyplot.imshow`.

    Parameters
    ----------
    img : torch.Tensor or PIL.Image.Image
        Image of shape :math:`C\times H\times W` with ``C = 1`` (grey) or ``C = 3`` (RGB),
        :math:`H\times W` (grey), or with a leading batch dimension of size 1; a PIL image (as
        TorchRay accepts) is read with :func:`pil_to_tensor`.
    *args
        Passed to :func:`matplotlib.pyplot.imshow`.
    quiet : bool, optional
        If ``True``, do not display the image (matplotlib is not even imported); only the
        rescaled image is computed.  Default: ``False``.
    lim : (float, float), optional
        Values mapped to 0 and 1; values outside are clamped.  Default: the image's own minimum
        and maximum (a constant image becomes all zeros).
    interpolation : str, optional
        matplotlib interpolation.  Default: ``'lanczos'``.
    **kwargs
        Passed to :func:`matplotlib.pyplot.imshow`.

    Returns
    -------
    bitmap : torch.Tensor
        The rescaled image, shape :math:`C\times H\times W`, float values in ``[0, 1]``.
    handle : matplotlib.image.AxesImage or None
        The image drawn in the current axes; ``None`` when ``quiet`` is true.

    Notes
    -----
    The return value is always the pair ``(bitmap, handle)`` so that ``quiet`` changes only
    what is drawn, not what is returned.  Grey images are shown with the ``'gray'`` colormap and
    the fixed range ``[0, 1]`` (so a rescaled grey image looks the same as its RGB copy).
    """
    lim = _check_lim(lim)
    if type(img).__module__.startswith("PIL."):  # a PIL image, without importing PIL here
        img = pil_to_tensor(img)
    bitmap = _rescale(_image_chw(img), lim)
    if quiet:
        return bitmap, None
    import matplotlib.pyplot as plt  # lazy: importing this module must not select a backend

    if bitmap.shape[0] == 1:
        kwargs.setdefault("cmap", "gray")
        kwargs.setdefault("vmin", 0.0)
        kwargs.setdefault("vmax", 1.0)
        data = bitmap[0].numpy()
    else:
        data = bitmap.permute(1, 2, 0).numpy()
    handle = plt.imshow(data, *args, interpolation=interpolation, **kwargs)
    return bitmap, handle


#: The largest mosaic :func:`imarraysc` builds with a border (``spacing > 0``), in bytes: a
#: larger one is refused with a ValueError naming the largest spacing that fits, rather than an
#: allocator error.  (Without a border the mosaic is the tiles' own size and is not capped.)
MAX_MOSAIC_BYTES = 4 * 2 ** 30


def _check_spacing(spacing: int, c: int, h: int, w: int, grid: Tuple[int, int]) -> int:
    """``spacing`` if the mosaic of a ``grid`` of ``c × h × w`` tiles with that border fits in
    :data:`MAX_MOSAIC_BYTES`, else a ValueError naming the largest spacing that fits."""
    item = torch.empty(0).element_size()          # the mosaic is in the default dtype
    cells = grid[0] * grid[1]
    size = c * cells * (h + 2 * spacing) * (w + 2 * spacing) * item
    if spacing == 0 or size <= MAX_MOSAIC_BYTES:
        return spacing
    # The largest s with (h + 2s)(w + 2s) <= area: the positive root of a quadratic, then
    # stepped down past rounding.
    area = MAX_MOSAIC_BYTES // (c * cells * item)
    best = max(0, int((math.sqrt((h - w) ** 2 + 4 * area) - (h + w)) // 4))
    while best > 0 and (h + 2 * best) * (w + 2 * best) > area:
        best -= 1
    gib = f"{size / 2 ** 30:.3g}" if size < 2 ** 1000 else "over 1e290"  # (no float overflow)
    raise ValueError(
        f"spacing={spacing} makes a mosaic of {gib} GiB ({grid[0]}×{grid[1]} tiles of "
        f"{c}×{h}×{w} with their border), more than MAX_MOSAIC_BYTES "
        f"({MAX_MOSAIC_BYTES / 2 ** 30:.3g} GiB); spacing is the border around each tile in "
        f"pixels: use at most {best} (a few pixels are usual)")


def imarraysc(tiles: Any, spacing: int = 0, quiet: bool = False,
              lim: Optional[Sequence[float]] = None,
              interpolation: str = "lanczos") -> Tuple[torch.Tensor, Any]:
    r"""Arrange a batch of images as a near-square mosaic, each tile rescaled on its own, and
    display it with :func:`imsc`.

    Parameters
    ----------
    tiles : torch.Tensor
        Batch of shape :math:`K\times C\times H\times W` (``C = 1`` or ``3``) or
        :math:`K\times H\times W` (grey).
    spacing : int, optional
        Thickness, in pixels, of the zero border drawn around each tile.  Default: 0.  A
        border that would make the mosaic larger than :data:`MAX_MOSAIC_BYTES` (4 GiB) is
        refused with a :class:`ValueError` naming the largest that fits.
    quiet : bool, optional
        If ``True``, build the mosaic without displaying it.  Default: ``False``.
    lim : (float, float), optional
        Range mapped to ``[0, 1]`` for every tile.  Default: each tile's own minimum and maximum.
    interpolation : str, optional
        matplotlib interpolation.  Default: ``'lanczos'``.

    Returns
    -------
    mosaic : torch.Tensor
        Tensor of shape :math:`C\times M(H + 2s)\times N(W + 2s)` with ``s = spacing``,
        :math:`N = \lceil\sqrt{K}\rceil` columns and :math:`M = \lceil K / N\rceil` rows filled
        row by row; missing tiles are zeros.
    handle : matplotlib.image.AxesImage or None
        As in :func:`imsc`; ``None`` when ``quiet`` is true.
    """
    tiles = as_tensor(tiles, "tiles")
    if tiles.dim() == 3:
        tiles = tiles.unsqueeze(1)
    if tiles.dim() != 4 or tiles.shape[1] not in (1, 3) or tiles.shape[0] == 0:
        raise ValueError("tiles must have shape (K, C, H, W) with K >= 1 and C = 1 or 3, or "
                         f"(K, H, W); got {tuple(tiles.shape)}")
    if not isinstance(spacing, Integral) or isinstance(spacing, bool) or spacing < 0:
        raise ValueError(f"spacing must be a non-negative integer, got {spacing!r}")
    lim = _check_lim(lim)
    k, c, h, w = tiles.shape
    ncols = math.ceil(math.sqrt(k))
    nrows = math.ceil(k / ncols)
    spacing = _check_spacing(int(spacing), c, h, w, (nrows, ncols))
    th, tw = h + 2 * spacing, w + 2 * spacing
    mosaic = torch.zeros(c, nrows * th, ncols * tw)
    for i in range(k):
        r, q = divmod(i, ncols)
        y0, x0 = r * th + spacing, q * tw + spacing
        mosaic[:, y0:y0 + h, x0:x0 + w] = _rescale(tiles[i], lim)
    if quiet:
        return mosaic, None
    # Tiles are already in [0, 1]: a fixed range keeps imsc from re-stretching the mosaic.
    _, handle = imsc(mosaic, lim=(0.0, 1.0), interpolation=interpolation)
    return mosaic, handle


# ------------------------------------------------------------------------------------------------
# Reading and converting images
# ------------------------------------------------------------------------------------------------

def is_url(obj: Any) -> bool:
    """Whether ``obj`` is a string holding an ``http``, ``https``, ``ftp`` or ``file`` URL.

    Parameters
    ----------
    obj : object
        Anything; only strings can be URLs.

    Returns
    -------
    bool
        ``True`` for e.g. ``'https://host/a.jpg'`` or ``'file:///tmp/a.png'``; ``False`` for plain
        paths (including Windows paths such as ``'C:\\img.png'``) and non-strings.
    """
    if not isinstance(obj, str):
        return False
    parsed = urllib.parse.urlparse(obj)
    if parsed.scheme.lower() not in URL_SCHEMES:
        return False
    # 'http:foo' has a scheme but names nothing; file URLs may have an empty host.
    return bool(parsed.netloc) or (parsed.scheme.lower() == "file" and bool(parsed.path))


def imread(file: Union[PathLike, Any], as_pil: bool = False,
           resize: Optional[Union[int, Sequence[int]]] = None,
           to_rgb: bool = False) -> Any:
    r"""Read an image as a float tensor :math:`C\times H\times W` in ``[0, 1]`` (TorchRay's).

    Parameters
    ----------
    file : str, path-like or file object
        A path, a URL (see :func:`is_url`; ``file://`` URLs are read locally, others are fetched
        with :func:`urllib.request.urlopen`), or an open binary file.
    as_pil : bool, optional
        Return the :class:`PIL.Image.Image` instead of a tensor.  Default: ``False``.
    resize : int or (int, int), optional
        If an int, scale the image so that its *shorter* side has this many pixels, keeping the
        aspect ratio; if a pair ``(width, height)`` (TorchRay's and PIL's order), resize to
        exactly that size.  Bilinear resampling.  Default: no resize.
    to_rgb : bool, optional
        Convert to 3-channel RGB (grey, palette and RGBA images included).  Default: ``False``.

    Returns
    -------
    torch.Tensor or PIL.Image.Image
        :func:`pil_to_tensor` of the image: ``(3, H, W)`` for RGB, ``(1, H, W)`` for grey,
        ``(4, H, W)`` for RGBA, float32 in ``[0, 1]``; or the PIL image when ``as_pil`` is true.
        (A NumPy ``(H, W, C)`` array: :func:`im_to_numpy` of the tensor.)
    """
    from PIL import Image

    if not isinstance(file, (str, os.PathLike)) and not hasattr(file, "read"):
        raise TypeError(f"file must be a path, a URL or an open binary file, got "
                        f"{type(file).__name__}")
    if is_url(file):
        import urllib.request

        parsed = urllib.parse.urlparse(cast(str, file))  # is_url: a str
        if parsed.scheme.lower() == "file":
            file = urllib.request.url2pathname(parsed.path)
        else:
            url = cast(str, file)  # is_url: a str
            with urllib.request.urlopen(url) as response:  # noqa: S310 - the user's own URL
                file = io.BytesIO(response.read())
    img: Image.Image = Image.open(file)
    img.load()  # read now, so a closed or temporary file is not needed later
    if to_rgb and img.mode != "RGB":
        img = img.convert("RGB")
    if resize is not None:
        img = img.resize(_pil_size(img.size, resize), Image.Resampling.BILINEAR)
    return img if as_pil else pil_to_tensor(img)


def _pil_size(size_wh: Tuple[int, int], resize: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """PIL's ``(width, height)`` for a :func:`imread` ``resize`` argument."""
    w, h = size_wh
    if isinstance(resize, Integral) and not isinstance(resize, bool):
        side = cast(int, resize)  # an Integral: int arithmetic
        if side <= 0:
            raise ValueError(f"resize must be positive, got {side}")
        if w <= h:
            return int(side), max(1, round(h * side / w))
        return max(1, round(w * side / h)), int(side)
    try:
        rw, rh = (int(v) for v in cast(Sequence[int], resize))
    except (TypeError, ValueError):
        raise TypeError("resize must be None, an int (shorter side) or a pair (width, height), "
                        f"got {resize!r}") from None
    if rh <= 0 or rw <= 0:
        raise ValueError(f"resize must hold positive sizes, got {resize!r}")
    return rw, rh


def pil_to_tensor(pil_image: Any) -> torch.Tensor:
    r"""Convert a PIL image to a float tensor :math:`C\times H\times W` with values in ``[0, 1]``.

    Parameters
    ----------
    pil_image : PIL.Image.Image
        Grey (``'L'``, ``'1'``, 16-bit ``'I;16'``), ``'RGB'``, ``'RGBA'``, palette (``'P'``,
        converted to RGB) or float (``'F'``, values kept as they are) image.

    Returns
    -------
    torch.Tensor
        ``float32`` tensor; ``C = 1`` for grey, 3 for RGB, 4 for RGBA.  8-bit values are divided
        by 255 and 16-bit values by 65535.
    """
    from PIL import Image

    if not isinstance(pil_image, Image.Image):
        raise TypeError(f"pil_image must be a PIL.Image.Image, got {type(pil_image).__name__}")
    if pil_image.mode == "P":
        pil_image = pil_image.convert("RGBA" if "transparency" in pil_image.info else "RGB")
    array = np.array(pil_image)
    if array.dtype == np.bool_:
        array = array.astype(np.float32)
    elif array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype.kind == "u" and array.dtype.itemsize == 2:
        array = array.astype(np.float32) / 65535.0
    else:
        # 'I' (32-bit int) and 'F' (float) carry no fixed range: keep the values.
        array = array.astype(np.float32)
    tensor = torch.from_numpy(array)
    if tensor.dim() == 2:
        return tensor.unsqueeze(0)
    return tensor.permute(2, 0, 1).contiguous()


def im_to_numpy(tensor: Any) -> np.ndarray:
    r"""Convert a tensor image :math:`K\times H\times W` to a NumPy image :math:`H\times W\times K`.

    Parameters
    ----------
    tensor : torch.Tensor
        Image of shape :math:`K\times H\times W` (any ``K``), or :math:`1\times K\times H\times
        W` (the batch dimension is dropped), or :math:`H\times W` (returned as ``(H, W)``).  It
        is detached and moved to the CPU; the dtype is kept.

    Returns
    -------
    numpy.ndarray
        Array of shape :math:`H\times W\times K` (a copy, independent of the tensor).
    """
    tensor = as_tensor(tensor, "tensor")
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() == 2:
        return tensor.numpy().copy()
    if tensor.dim() != 3:
        raise ValueError("tensor must have shape (K, H, W), (1, K, H, W) or (H, W); "
                         f"got {tuple(tensor.shape)}")
    return tensor.permute(1, 2, 0).numpy().copy()


def tensor_to_im(tensor: Any) -> torch.Tensor:
    r"""Reshape a tensor :math:`N\times K\times H\times W` to a grayscale image stack
    :math:`(NK)\times 1\times H\times W` (TorchRay's documented behaviour).

    Each channel becomes an image of its own, ready for :func:`imarraysc`.  To turn a
    :math:`K\times H\times W` image into a NumPy :math:`H\times W\times K` array, use
    :func:`im_to_numpy`.

    Parameters
    ----------
    tensor : torch.Tensor
        Tensor of shape :math:`N\times K\times H\times W`.

    Returns
    -------
    torch.Tensor
        The same data (a view where possible) with shape :math:`(NK)\times 1\times H\times W`;
        device, dtype and autograd history are kept.

    Raises
    ------
    TypeError
        If ``tensor`` is not a :class:`torch.Tensor`.
    ValueError
        If ``tensor`` does not have 4 dimensions, or is on the meta device.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    check_not_meta(tensor, "tensor")
    if tensor.dim() != 4:
        raise ValueError(f"tensor must have shape (N, K, H, W), got {tuple(tensor.shape)}; for a "
                         "(K, H, W) image as an (H, W, K) NumPy array use im_to_numpy")
    return tensor.reshape(-1, 1, *tensor.shape[2:])


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------

def get_device(gpu: Optional[int] = 0) -> torch.device:
    """The :class:`torch.device` to use.

    Parameters
    ----------
    gpu : int or None, optional
        Index of the CUDA device.  ``None`` or a negative number forces the CPU.  Default: 0.

    Returns
    -------
    torch.device
        ``cuda:<gpu>`` when CUDA is available and ``gpu`` is a non-negative index, else ``cpu``
        (so the same script runs on machines without a GPU).

    Raises
    ------
    ValueError
        If CUDA is available but ``gpu`` is not a valid device index.
    """
    if gpu is not None and (not isinstance(gpu, Integral) or isinstance(gpu, bool)):
        raise TypeError(f"gpu must be an int or None, got {gpu!r}")
    if gpu is None or gpu < 0 or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if gpu >= count:
        raise ValueError(f"gpu={gpu} but only {count} CUDA device(s) are visible; "
                         f"use an index below {count}, or None for the CPU")
    return torch.device(f"cuda:{int(gpu)}")


def xmkdir(path: Optional[PathLike]) -> None:
    """Create a directory and its parents, like ``mkdir -p``.

    Parameters
    ----------
    path : str or path-like or None
        Directory to create.  Nothing happens if it exists already, or if ``path`` is ``None``
        or empty (convenient for ``xmkdir(os.path.dirname(file))`` when ``file`` has no
        directory part).

    Raises
    ------
    FileExistsError
        If ``path`` exists and is not a directory.
    """
    if path is None or os.fspath(path) == "":
        return
    os.makedirs(path, exist_ok=True)


#: Keys of :func:`get_config` that environment variables ``TORCHRAY_LIKE_<KEY>`` can set.
CONFIG_KEYS = ("root_dir", "voc_dir", "coco_dir", "imagenet_dir", "models_dir", "experiments_dir")


def _default_config() -> Dict[str, Any]:
    root = os.path.join(os.path.expanduser("~"), ".torchray_like")
    return {
        "root_dir": root,
        # Data sets are the user's own copies: no guessed location, so that code asking for
        # one reports "not configured" instead of "not found in a made-up directory".
        "voc_dir": None,
        "coco_dir": None,
        "imagenet_dir": None,
        "models_dir": os.path.join(root, "models"),
        "experiments_dir": os.path.join(root, "experiments"),
    }


def _read_config_file(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"configuration file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"configuration file {path} must hold a JSON object, "
                         f"got {type(data).__name__}")
    return data


def get_config() -> Dict[str, Any]:
    """Read the torchray_like configuration.

    The result starts from the defaults below and is updated, in this order (later wins), by:

    1. the JSON file ``~/.torchray_like/config`` (user's home directory);
    2. the JSON file ``.torchray_like/config`` in the current directory;
    3. instead of 1 and 2, the JSON file named by the environment variable
       ``TORCHRAY_LIKE_CONFIG`` if it is set (it must exist);
    4. the environment variables ``TORCHRAY_LIKE_ROOT_DIR``, ``TORCHRAY_LIKE_VOC_DIR``,
       ``TORCHRAY_LIKE_COCO_DIR``, ``TORCHRAY_LIKE_IMAGENET_DIR``, ``TORCHRAY_LIKE_MODELS_DIR``
       and ``TORCHRAY_LIKE_EXPERIMENTS_DIR`` (one per key of the defaults).

    A file holds a JSON object and may set only some keys, e.g. ``{"voc_dir": "~/data/voc"}``;
    other keys are kept as they are.  ``~`` and ``$VARS`` are expanded in string values whose key
    ends with ``_dir`` or ``_file``.  The function only reads: it creates no directory and
    downloads nothing.

    Defaults::

        {"root_dir": "~/.torchray_like",               # expanded
         "voc_dir": None,                              # PASCAL VOC 2007 (not configured)
         "coco_dir": None,                             # COCO (not configured)
         "imagenet_dir": None,                         # ImageNet (not configured)
         "models_dir": "~/.torchray_like/models",
         "experiments_dir": "~/.torchray_like/experiments"}

    Returns
    -------
    dict
        The configuration (a new dict on every call; changing it changes nothing else).  A
        value of ``None`` means "not configured".

    Raises
    ------
    ValueError
        If a configuration file is not valid JSON or not a JSON object.
    FileNotFoundError
        If ``TORCHRAY_LIKE_CONFIG`` names a missing file.
    """
    config = _default_config()
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"{CONFIG_ENV}={explicit} does not name a file")
        paths = [explicit]
    else:
        home = os.path.join(os.path.expanduser("~"), ".torchray_like", "config")
        local = os.path.join(os.getcwd(), ".torchray_like", "config")
        paths = [p for p in dict.fromkeys([home, local]) if os.path.isfile(p)]
    for path in paths:
        config.update(_read_config_file(path))
    for key in CONFIG_KEYS:
        value = os.environ.get(f"TORCHRAY_LIKE_{key.upper()}")
        if value:
            config[key] = value
    for key, value in config.items():
        if isinstance(value, str) and (key.endswith("_dir") or key.endswith("_file")):
            config[key] = os.path.expanduser(os.path.expandvars(value))
    return config
