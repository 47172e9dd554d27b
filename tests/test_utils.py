"""torchray_like.utils: display helpers, image I/O, smoothing, resampling, devices, config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported anywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from torchray_like import utils  # noqa: E402
from torchray_like.utils import (  # noqa: E402
    MAX_MOSAIC_BYTES,
    get_config,
    get_device,
    im_to_numpy,
    imarraysc,
    imread,
    imsc,
    imsmooth,
    is_url,
    pil_to_tensor,
    resample,
    tensor_to_im,
    xmkdir,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_all_lists_the_public_helpers():
    assert set(utils.__all__) == {
        "get_config", "get_device", "im_to_numpy", "imarraysc", "imread", "imsc", "imsmooth",
        "is_url", "pil_to_tensor", "resample", "tensor_to_im", "xmkdir"}
    assert all(callable(getattr(utils, name)) for name in utils.__all__)


def test_importing_the_plotting_modules_does_not_import_matplotlib():
    code = ("import sys, torchray_like.utils, torchray_like.visualize, "
            "torchray_like.benchmark.plot; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# imsc / imarraysc
# ------------------------------------------------------------------------------------------------

def test_imsc_rescales_to_unit_range_and_draws_rgb():
    img = torch.arange(2 * 3 * 4, dtype=torch.float32).view(3, 2, 4) - 5.0
    bitmap, handle = imsc(img)
    assert bitmap.shape == (3, 2, 4)
    assert bitmap.min().item() == 0.0 and bitmap.max().item() == 1.0
    torch.testing.assert_close(bitmap, (img + 5.0) / 23.0)
    assert handle.get_array().shape == (2, 4, 3)
    np.testing.assert_allclose(handle.get_array(), bitmap.permute(1, 2, 0).numpy())
    assert handle.get_interpolation() == "lanczos"
    assert plt.gca().images[-1] is handle


def test_imsc_quiet_lim_grey_and_batch_of_one():
    img = torch.tensor([[[-1.0, 0.0], [0.5, 2.0]]])  # (1, 2, 2) grey
    before = plt.get_fignums()
    bitmap, handle = imsc(img[None], quiet=True, lim=(0.0, 1.0))
    assert handle is None and plt.get_fignums() == before  # nothing drawn
    torch.testing.assert_close(bitmap, torch.tensor([[[0.0, 0.0], [0.5, 1.0]]]))
    bitmap, handle = imsc(img[0], interpolation="nearest")  # (H, W)
    assert handle.get_array().shape == (2, 2)
    assert handle.get_cmap().name == "gray" and handle.get_clim() == (0.0, 1.0)
    assert handle.get_interpolation() == "nearest"
    # A constant image has no range: it is shown black instead of dividing by zero.
    bitmap, _ = imsc(torch.full((3, 2, 2), 7.0), quiet=True)
    assert torch.equal(bitmap, torch.zeros(3, 2, 2))


@pytest.mark.parametrize("bad, exc, words", [
    (torch.zeros(2, 3, 4, 4), ValueError, "batch of 2"),
    (torch.zeros(2, 4, 4), ValueError, "C = 1 or 3"),
    (torch.zeros(4), ValueError, "(C, H, W)"),
    ([[0.0]], TypeError, "img must be a torch.Tensor"),
])
def test_imsc_rejects_bad_images(bad, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        imsc(bad, quiet=True)


def test_imsc_rejects_bad_lim():
    with pytest.raises(ValueError, match="lim must satisfy lo < hi"):
        imsc(torch.zeros(1, 2, 2), lim=(1, 1), quiet=True)
    with pytest.raises(TypeError, match="lim must be None or a pair"):
        imsc(torch.zeros(1, 2, 2), lim=3, quiet=True)


def test_imarraysc_layout_spacing_and_per_tile_scaling():
    torch.manual_seed(0)
    tiles = torch.randn(5, 3, 4, 6) * torch.arange(1, 6).view(5, 1, 1, 1)
    mosaic, handle = imarraysc(tiles, spacing=1, quiet=True)
    assert handle is None
    # 5 tiles -> 3 columns, 2 rows; each cell is (4 + 2) x (6 + 2).
    assert mosaic.shape == (3, 2 * 6, 3 * 8)
    for i in range(5):
        r, c = divmod(i, 3)
        tile = mosaic[:, r * 6 + 1:r * 6 + 5, c * 8 + 1:c * 8 + 7]
        t = tiles[i]
        torch.testing.assert_close(tile, (t - t.min()) / (t.max() - t.min()))
    # Borders and the missing sixth tile are zeros.
    assert mosaic[:, 0].abs().sum() == 0 and mosaic[:, :, 0].abs().sum() == 0
    assert mosaic[:, 6:, 16:].abs().sum() == 0
    mosaic2, handle = imarraysc(tiles, quiet=False)
    assert mosaic2.shape == (3, 2 * 4, 3 * 6)
    np.testing.assert_allclose(handle.get_array(), mosaic2.permute(1, 2, 0).numpy())


def test_imarraysc_grey_batch_and_errors():
    mosaic, _ = imarraysc(torch.rand(4, 5, 5), quiet=True)  # (K, H, W) grey
    assert mosaic.shape == (1, 10, 10)
    with pytest.raises(ValueError, match="spacing must be a non-negative integer"):
        imarraysc(torch.rand(2, 1, 3, 3), spacing=-1, quiet=True)
    with pytest.raises(ValueError, match="tiles must have shape"):
        imarraysc(torch.rand(2, 2, 3, 3), quiet=True)


@pytest.mark.parametrize("spacing", [10 ** 4, 10 ** 6, np.int64(10 ** 6), 10 ** 400])
def test_imarraysc_huge_spacing_is_refused_before_allocating(spacing):
    # Was the allocator's RuntimeError (10**6: 192 TB for four 8x8 tiles).
    assert MAX_MOSAIC_BYTES == 4 * 2 ** 30
    with pytest.raises(ValueError) as info:
        imarraysc(torch.rand(4, 3, 8, 8), spacing=spacing, quiet=True)
    message = str(info.value)
    assert message.startswith(f"spacing={spacing} makes a mosaic of ")
    # 2x2 cells of 3 x (8 + 2s)^2 float32 fit in 4 GiB for s <= 4725.
    assert "(2×2 tiles of 3×8×8 with their border), more than MAX_MOSAIC_BYTES (4 GiB)" in message
    assert message.endswith("use at most 4725 (a few pixels are usual)")


def test_imarraysc_suggested_spacing_is_the_largest_that_fits(monkeypatch):
    monkeypatch.setattr(utils, "MAX_MOSAIC_BYTES", 10_000)     # 2500 float32 values
    tiles = torch.rand(3, 1, 3, 5)                               # 2x2 cells
    with pytest.raises(ValueError, match=r"use at most (\d+) ") as info:
        imarraysc(tiles, spacing=100, quiet=True)
    best = int(str(info.value).split("use at most ")[1].split()[0])
    assert best == 10                 # 4 * (3 + 20) * (5 + 20) = 2300 <= 2500 < 4 * 25 * 27
    mosaic, _ = imarraysc(tiles, spacing=best, quiet=True)
    assert mosaic.shape == (1, 2 * 23, 2 * 25) and mosaic.numel() * 4 <= 10_000
    with pytest.raises(ValueError, match="use at most 10 "):
        imarraysc(tiles, spacing=best + 1, quiet=True)
    # Without a border the mosaic is the tiles' own size: never refused.
    monkeypatch.setattr(utils, "MAX_MOSAIC_BYTES", 8)
    assert imarraysc(tiles, spacing=0, quiet=True)[0].shape == (1, 6, 10)


def test_imarraysc_large_but_legal_spacing_works():
    tiles = torch.rand(2, 1, 2, 2)
    mosaic, _ = imarraysc(tiles, spacing=1000, quiet=True)      # 1 x 2002 x 4004: 32 MB
    assert mosaic.shape == (1, 2002, 4004) and mosaic.dtype == torch.float32
    for i in range(2):
        x0 = i * 2002 + 1000
        t = tiles[i]
        torch.testing.assert_close(mosaic[:, 1000:1002, x0:x0 + 2],
                                   (t - t.min()) / (t.max() - t.min()))
    assert float(mosaic.sum()) == pytest.approx(float(mosaic[:, 1000:1002].sum()))


# ------------------------------------------------------------------------------------------------
# Reading and converting images
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("obj, expected", [
    ("https://example.com/cat.jpg", True),
    ("http://host:8080/a.png?x=1", True),
    ("ftp://host/file", True),
    ("file:///tmp/a.png", True),
    ("/tmp/a.png", False),
    ("relative/a.png", False),
    ("C:\\images\\a.png", False),
    ("mailto:someone@example.com", False),
    ("http:nothing", False),
    (b"https://example.com", False),
    (None, False),
])
def test_is_url(obj, expected):
    assert is_url(obj) is expected


@pytest.fixture
def rgb_file(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(20, 40, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    return path, array


def test_imread_array_pil_and_file_url(rgb_file):
    path, array = rgb_file
    out = imread(str(path))  # TorchRay's: a (C, H, W) float tensor in [0, 1]
    assert out.dtype == torch.float32 and out.shape == (3, 20, 40)
    torch.testing.assert_close(out, torch.from_numpy(array).permute(2, 0, 1) / 255.0)
    pil = imread(path, as_pil=True)
    assert isinstance(pil, Image.Image) and pil.size == (40, 20)
    torch.testing.assert_close(imread(path.as_uri()), out)  # file:// URL, read locally


def test_imread_resize_and_to_rgb(rgb_file, tmp_path):
    path, _ = rgb_file
    assert imread(path, resize=10).shape == (3, 10, 20)  # shorter side (height 20) -> 10
    assert imread(path, resize=(5, 7)).shape == (3, 7, 5)  # TorchRay's (width, height)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((3, 4), 200, np.uint8)).save(grey)
    assert imread(grey).shape == (1, 3, 4)
    rgb = imread(grey, to_rgb=True)
    assert rgb.shape == (3, 3, 4) and torch.allclose(rgb, torch.tensor(200 / 255.0))
    with pytest.raises(TypeError, match="resize must be None, an int"):
        imread(path, resize="big")
    with pytest.raises(ValueError, match="resize must be positive"):
        imread(path, resize=0)


def test_pil_to_tensor_modes():
    array = np.array([[[0, 128, 255], [10, 20, 30]]], dtype=np.uint8)  # (1, 2, 3)
    t = pil_to_tensor(Image.fromarray(array))
    assert t.dtype == torch.float32 and t.shape == (3, 1, 2)
    torch.testing.assert_close(t, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    grey = pil_to_tensor(Image.fromarray(np.array([[0, 255]], np.uint8)))
    assert grey.shape == (1, 1, 2) and grey.tolist() == [[[0.0, 1.0]]]
    deep = pil_to_tensor(Image.fromarray(np.array([[0, 65535]], np.uint16)))
    assert deep.tolist() == [[[0.0, 1.0]]]
    pal = Image.fromarray(array).convert("P")
    assert pil_to_tensor(pal).shape == (3, 1, 2)
    with pytest.raises(TypeError, match="pil_image must be a PIL.Image.Image"):
        pil_to_tensor(array)


def test_im_to_numpy_and_tensor_to_im():
    t = torch.arange(24).view(2, 3, 4)
    a = im_to_numpy(t)
    assert a.shape == (3, 4, 2)
    assert a[1, 2, 0] == t[0, 1, 2] and a[1, 2, 1] == t[1, 1, 2]
    assert im_to_numpy(t[None]).shape == (3, 4, 2)  # batch of one dropped
    assert im_to_numpy(t[0]).shape == (3, 4)
    a[0, 0, 0] = -1
    assert t[0, 0, 0] == 0  # a copy
    roundtrip = pil_to_tensor(Image.fromarray((im_to_numpy(torch.rand(3, 5, 6)) * 255)
                                              .astype(np.uint8)))
    assert roundtrip.shape == (3, 5, 6)
    with pytest.raises(ValueError, match="tensor must have shape"):
        im_to_numpy(torch.zeros(2, 2, 2, 2))
    # TorchRay's tensor_to_im: (N, K, H, W) -> (N*K, 1, H, W), channel k of image n at n*K + k.
    stack = tensor_to_im(torch.arange(48).view(2, 2, 3, 4))
    assert stack.shape == (4, 1, 3, 4) and stack[3, 0, 2, 1] == 1 * 24 + 1 * 12 + 2 * 4 + 1
    with pytest.raises(ValueError, match=r"shape \(N, K, H, W\), got \(2, 3, 4\).*im_to_numpy"):
        tensor_to_im(t)


# ------------------------------------------------------------------------------------------------
# imsmooth
# ------------------------------------------------------------------------------------------------

def test_imsmooth_matches_scipy_gaussian_filter():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 30, dtype=torch.float64)
    out = imsmooth(x, 2.0)  # radius ceil(4 * 2) = 8, as scipy's truncate=4.0
    assert out.shape == x.shape and out.dtype == x.dtype
    for n in range(2):
        for c in range(3):
            ref = ndimage.gaussian_filter(x[n, c].numpy(), 2.0, mode="constant", cval=0.0)
            np.testing.assert_allclose(out[n, c].numpy(), ref, atol=1e-10)
    rep = imsmooth(x, 2.0, padding_mode="replicate")
    ref = ndimage.gaussian_filter(x[0, 0].numpy(), 2.0, mode="nearest")
    np.testing.assert_allclose(rep[0, 0].numpy(), ref, atol=1e-10)


def test_imsmooth_impulse_constant_sigma0_and_channels():
    x = torch.zeros(1, 2, 21, 21)
    x[0, 0, 10, 10] = 1.0
    out = imsmooth(x, 1.5)
    assert out[0, 0].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert out[0, 0].argmax().item() == 10 * 21 + 10
    torch.testing.assert_close(out[0, 0], out[0, 0].t())  # isotropic
    assert out[0, 1].abs().sum() == 0  # channels are smoothed independently
    const = imsmooth(torch.full((1, 1, 9, 9), 3.0), 1.0, padding_mode="replicate")
    torch.testing.assert_close(const, torch.full((1, 1, 9, 9), 3.0))
    padded = imsmooth(torch.zeros(1, 1, 9, 9), 1.0, padding_value=1.0)
    assert padded[0, 0, 4, 4] == 0 and padded[0, 0, 0, 0] > 0.2  # border sees the fill value
    assert torch.equal(imsmooth(x, 0), x)


def test_imsmooth_stride_padding_and_gradient():
    x = torch.rand(1, 1, 20, 20, requires_grad=True)
    assert imsmooth(x, 1.0, stride=2).shape == (1, 1, 10, 10)
    assert imsmooth(x, 1.0, padding=2).shape == (1, 1, 24, 24)
    assert imsmooth(x, 1.0, stride=3, padding=1).shape == (1, 1, 8, 8)
    assert imsmooth(x, 0, stride=2).shape == (1, 1, 10, 10)
    imsmooth(x, 1.0).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(tensor=torch.zeros(1, 4, 4), sigma=1), ValueError, "tensor must have shape"),
    (dict(tensor=torch.zeros(1, 1, 4, 4, dtype=torch.long), sigma=1), TypeError,
     "floating point"),
    (dict(tensor=torch.zeros(1, 1, 4, 4), sigma=-1), ValueError, "sigma must be"),
    (dict(tensor=torch.zeros(1, 1, 4, 4), sigma=1, stride=0), ValueError, "stride must be"),
    (dict(tensor=torch.zeros(1, 1, 4, 4), sigma=1, padding_mode="wrap"), ValueError,
     "padding_mode must be one of"),
    (dict(tensor=torch.zeros(1, 1, 4, 4), sigma=2, padding_mode="reflect"), ValueError,
     "smaller than the image"),
])
def test_imsmooth_rejects_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        imsmooth(**kwargs)


# ------------------------------------------------------------------------------------------------
# resample
# ------------------------------------------------------------------------------------------------

def test_resample_identity_translation_flip():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 8, dtype=torch.float64)
    ident = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    torch.testing.assert_close(resample(x, (6, 8), ident), x)
    torch.testing.assert_close(resample(x, x.shape, torch.eye(3)), x)  # homogeneous, full size
    # out(y, x) = src(y + 1, x + 2): an integer shift, exact.
    shifted = resample(x, (5, 6), [[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(shifted, x[:, :, 1:, 2:])
    flipped = resample(x, (6, 8), [[-1.0, 0.0, 7.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(flipped, x.flip(-1))


def test_resample_downsample_and_per_image_transforms():
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    half = resample(x, (4, 4), [[2.0, 0.0, 0.5], [0.0, 2.0, 0.5]])
    torch.testing.assert_close(half, torch.nn.functional.avg_pool2d(x, 2))  # block centres
    per_image = torch.tensor([[[1.0, 0, 0], [0, 1, 0]], [[-1.0, 0, 7], [0, 1, 0]]],
                             dtype=torch.float64)
    out = resample(x, (8, 8), per_image)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], x[1].flip(-1))
    # Outside the source: zeros by default.
    outside = resample(x, (8, 8), [[1.0, 0, 100], [0, 1, 0]])
    assert outside.abs().sum() == 0


def test_resample_rejects_bad_arguments():
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="source must be a tensor of shape"):
        resample(x[0], (4, 4), torch.eye(3))
    with pytest.raises(ValueError, match="does not match the source's batch"):
        resample(x, (3, 1, 4, 4), torch.eye(3))
    with pytest.raises(ValueError, match="target_size must be"):
        resample(x, (4,), torch.eye(3))
    with pytest.raises(ValueError, match=r"TorchRay's 2x2 form .* needs non-zero scales"):
        resample(x, (4, 4), torch.eye(2))  # [[s_u, t_u], [s_v, t_v]] with s_v = 0
    with pytest.raises(ValueError, match="transform must have shape"):
        resample(x, (4, 4), torch.zeros(3, 2, 3))


# ------------------------------------------------------------------------------------------------
# get_device / xmkdir / get_config
# ------------------------------------------------------------------------------------------------

def test_get_device(monkeypatch):
    assert get_device(None) == torch.device("cpu")
    assert get_device(-1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_device(0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert get_device() == torch.device("cuda:0")
    assert get_device(1) == torch.device("cuda:1")
    with pytest.raises(ValueError, match="gpu=2 but only 2 CUDA"):
        get_device(2)
    with pytest.raises(TypeError, match="gpu must be an int or None"):
        get_device("0")


def test_xmkdir(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    xmkdir(target)
    assert target.is_dir()
    xmkdir(str(target))  # exists: no error
    xmkdir("")  # e.g. os.path.dirname("file.png")
    xmkdir(None)
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        xmkdir(tmp_path / "f")


@pytest.fixture
def config_env(tmp_path, monkeypatch):
    """A fake home and working directory, and no TORCHRAY_LIKE_* variables."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for key in list(os.environ):
        if key.startswith("TORCHRAY_LIKE_"):
            monkeypatch.delenv(key)
    return home, work


def _write_config(directory, data):
    (directory / ".torchray_like").mkdir(exist_ok=True)
    path = directory / ".torchray_like" / "config"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_get_config_defaults(config_env):
    home, _ = config_env
    config = get_config()
    root = str(home / ".torchray_like")
    assert config == {"root_dir": root, "voc_dir": None, "coco_dir": None,
                      "imagenet_dir": None, "models_dir": os.path.join(root, "models"),
                      "experiments_dir": os.path.join(root, "experiments")}
    assert not (home / ".torchray_like").exists()  # reading creates nothing
    config["models_dir"] = "changed"
    assert get_config()["models_dir"] != "changed"  # a fresh dict each call


def test_get_config_files_merge_and_environment_overrides(config_env, monkeypatch):
    home, work = config_env
    _write_config(home, {"voc_dir": "~/voc", "coco_dir": "/data/coco", "extra": 1})
    _write_config(work, {"coco_dir": "/local/coco"})
    config = get_config()
    assert config["voc_dir"] == str(home / "voc")  # ~ expanded
    assert config["coco_dir"] == "/local/coco"  # the current directory's file wins
    assert config["imagenet_dir"] is None
    assert config["models_dir"] == str(home / ".torchray_like" / "models")
    assert config["extra"] == 1
    monkeypatch.setenv("TORCHRAY_LIKE_MODELS_DIR", "/env/models")
    monkeypatch.setenv("TORCHRAY_LIKE_IMAGENET_DIR", "$HOME/imagenet")
    config = get_config()
    assert config["models_dir"] == "/env/models"
    assert config["imagenet_dir"] == str(home / "imagenet")


def test_get_config_explicit_file_and_errors(config_env, tmp_path, monkeypatch):
    home, _ = config_env
    _write_config(home, {"voc_dir": "/home/voc"})
    explicit = tmp_path / "my.json"
    explicit.write_text(json.dumps({"coco_dir": "/explicit/coco"}))
    monkeypatch.setenv("TORCHRAY_LIKE_CONFIG", str(explicit))
    config = get_config()
    assert config["coco_dir"] == "/explicit/coco"
    assert config["voc_dir"] is None  # the explicit file replaces the others
    monkeypatch.setenv("TORCHRAY_LIKE_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="TORCHRAY_LIKE_CONFIG"):
        get_config()
    monkeypatch.delenv("TORCHRAY_LIKE_CONFIG")
    _write_config(home, "{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        get_config()
    _write_config(home, "[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        get_config()
