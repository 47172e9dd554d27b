"""torchray_like.visualize and torchray_like.benchmark.plot: shapes, pixels, sizes, errors."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported anywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from torchray_like.benchmark.plot import plot_example  # noqa: E402
from torchray_like.visualize import (  # noqa: E402
    COLORBAR_WIDTH,
    DPI,
    IMAGE_PANEL,
    IMAGE_PANEL_COLORBAR,
    NONFINITE_COLOR,
    SIGNAL_PANEL,
    PlotWarning,
    overlay,
    plot_methods,
    saliency_plot,
)

JET = matplotlib.colormaps["jet"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def image_axes(fig):
    """The panels of a figure (colour bars excluded), in drawing order."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def pixel(fig, ax, col, row):
    """RGB (0..255) of the rendered figure at data point (col, row) of ``ax``."""
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())
    x, y = ax.transData.transform((col, row))
    return buf[int(round(buf.shape[0] - y)), int(round(x)), :3].astype(int)


def half_map(n=1, h=16, w=16):
    """Maps that are 0 on the left half and 1 on the right half."""
    s = torch.zeros(n, 1, h, w)
    s[..., w // 2:] = 1.0
    return s


def png_size(path):
    with Image.open(path) as im:
        return im.size


# ------------------------------------------------------------------------------------------------
# overlay
# ------------------------------------------------------------------------------------------------

def test_overlay_exact_blend_and_hot_where_salient():
    image = torch.full((3, 8, 8), 0.5)
    out = overlay(image, half_map()[0], alpha=0.5)
    assert out.shape == (8, 8, 3) and out.dtype == np.float64
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[0, 0], 0.25 + 0.5 * np.array(JET(0.0)[:3]))
    np.testing.assert_allclose(out[0, 7], 0.25 + 0.5 * np.array(JET(1.0)[:3]))
    # Jet: high saliency is red, low is blue.
    assert (out[:, 4:, 0] > out[:, :4, 0] + 0.2).all()
    assert (out[:, :4, 2] > out[:, 4:, 2] + 0.2).all()


def test_overlay_layouts_resizing_and_normalize():
    torch.manual_seed(0)
    chw = torch.rand(3, 6, 10)
    hwc = chw.permute(1, 2, 0).numpy()
    sal = torch.rand(3, 5)
    a = overlay(chw, sal)  # map resized (3, 5) -> (6, 10)
    np.testing.assert_allclose(overlay(hwc, sal.numpy()), a)
    np.testing.assert_allclose(overlay(chw[None], sal[None, None]), a)
    # alpha 0: the image itself; grey and uint8 images become RGB.
    np.testing.assert_allclose(overlay(hwc, sal, alpha=0.0), hwc, atol=1e-6)
    with pytest.warns(PlotWarning, match="saliency of input #0 is all zero"):
        grey = overlay(np.full((4, 4), 255, np.uint8), torch.zeros(4, 4), alpha=0.0)
    np.testing.assert_allclose(grey, np.ones((4, 4, 3)))
    # normalize=False clamps instead of stretching: 0.5 stays 0.5, and a constant is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = overlay(torch.zeros(1, 2, 2), torch.full((2, 2), 0.5), alpha=1.0, normalize=False)
    np.testing.assert_allclose(flat[0, 0], JET(0.5)[:3])
    with pytest.warns(PlotWarning, match=r"input #0 is constant \(0.5\): normalize=True has"):
        stretched = overlay(torch.zeros(1, 2, 2), torch.full((2, 2), 0.5), alpha=1.0)
    np.testing.assert_allclose(stretched[0, 0], JET(0.0)[:3])  # constant map -> 0


def test_overlay_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"saliency has a batch of 2 maps for 1 input\(s\)"):
        overlay(torch.zeros(3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="alpha must be a number in"):
        overlay(torch.zeros(3, 4, 4), torch.zeros(4, 4), alpha=2)
    with pytest.raises(TypeError, match="image must be a torch.Tensor or a NumPy array"):
        overlay([[0.0]], torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"image must have shape \(C, H, W\) or \(H, W, C\)"):
        overlay(torch.zeros(1, 2, 3, 4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="cmap 'nope' is not a registered matplotlib colormap"):
        overlay(torch.zeros(3, 4, 4), torch.zeros(4, 4), cmap="nope")


# ------------------------------------------------------------------------------------------------
# saliency_plot: images
# ------------------------------------------------------------------------------------------------

def test_saliency_plot_images_axes_data_and_resize():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    s = torch.rand(4, 1, 8, 8)
    fig = saliency_plot(x, s)
    panels = image_axes(fig)
    assert len(panels) == 4 and len(fig.axes) == 8  # + one colour bar each
    assert panels[0].get_subplotspec().get_geometry()[:2] == (2, 2)  # ceil(sqrt(4)) columns
    for i, ax in enumerate(panels):
        img, sal = ax.images
        np.testing.assert_allclose(img.get_array(), x[i].permute(1, 2, 0).numpy())
        assert sal.get_array().shape == (16, 16)  # resized to the input
        assert sal.get_alpha() == 0.5 and sal.get_cmap().name == "jet"
        assert sal.get_clim() == pytest.approx((sal.get_array().min(), sal.get_array().max()))
        assert ax.get_title() == f"#{i}"
    up = torch.nn.functional.interpolate(s, size=(16, 16), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(panels[2].images[1].get_array(), up[2, 0].numpy(), atol=1e-6)


def test_saliency_plot_layout_options():
    x = torch.rand(3, 1, 8, 8)
    fig = saliency_plot(x, torch.rand(3, 8, 8), nrow=3, colorbar=False, cmap="viridis")
    panels = image_axes(fig)
    assert len(fig.axes) == 3
    assert panels[0].get_subplotspec().get_geometry()[:2] == (1, 3)
    assert panels[0].images[1].get_cmap().name == "viridis"
    img = panels[0].images[0]
    assert img.get_array().shape == (8, 8) and img.get_cmap().name == "gray"
    alone = saliency_plot(x)  # no saliency: the images only, no colour bar
    assert len(alone.axes) == 3 and all(len(ax.images) == 1 for ax in alone.axes)
    # An incomplete last row leaves no empty axes behind.
    assert len(saliency_plot(torch.rand(5, 3, 4, 4)).axes) == 5


def test_saliency_plot_is_hot_where_salient():
    x = torch.full((1, 1, 16, 16), 0.5)
    fig = saliency_plot(x, half_map(), colorbar=False)
    ax = fig.axes[0]
    cold, hot = pixel(fig, ax, 3, 8), pixel(fig, ax, 12, 8)
    assert hot[0] > cold[0] + 60  # red where the map is high
    assert cold[2] > hot[2] + 60  # blue where it is low
    # alpha 0.5 over grey 0.5 of jet(1) = (0.5, 0, 0): red 0.5*0.5 + 0.5*0.5 = 0.5.
    expected = np.round(255 * (0.25 + 0.5 * np.array(JET(1.0)[:3])))
    np.testing.assert_allclose(hot, expected, atol=3)


def test_saliency_plot_channels_denormalize_and_stretch():
    torch.manual_seed(0)
    raw = torch.rand(2, 3, 6, 6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normed = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    fig = saliency_plot(normed, denormalize=(mean, std))
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(),
                               raw[1].permute(1, 2, 0).numpy(), atol=1e-6)
    # Without denormalize, values outside [0, 1] are stretched per input.
    data = saliency_plot(normed).axes[0].images[0].get_array()
    assert data.min() == pytest.approx(0.0) and data.max() == pytest.approx(1.0)
    # Five channels: shown as their mean, in grey.
    five = torch.rand(1, 5, 6, 6)
    img = saliency_plot(five).axes[0].images[0]
    np.testing.assert_allclose(img.get_array(), five[0].mean(0).numpy(), atol=1e-6)
    # uint8 inputs are divided by 255.
    u8 = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    np.testing.assert_allclose(saliency_plot(u8).axes[0].images[0].get_array(), 1.0)
    with pytest.raises(ValueError, match="denormalize std must be a number or have one value"):
        saliency_plot(raw, denormalize=(0.5, (1.0, 2.0)))


# ------------------------------------------------------------------------------------------------
# saliency_plot: signals and volumes
# ------------------------------------------------------------------------------------------------

def test_saliency_plot_signals():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50)
    s = torch.rand(2, 1, 25)
    fig = saliency_plot(x, s)
    panels = image_axes(fig)
    assert len(panels) == 2 and len(fig.axes) == 4
    assert panels[0].get_subplotspec().get_geometry()[:2] == (2, 1)  # signals stack vertically
    for i, ax in enumerate(panels):
        assert len(ax.lines) == 3  # one line per channel
        np.testing.assert_allclose(ax.lines[1].get_ydata(), x[i, 1].numpy())
        band = ax.images[0]
        assert band.get_array().shape == (1, 50)  # map resized (linear) to the signal length
        y0, y1 = ax.get_ylim()
        assert band.get_extent() == pytest.approx([-0.5, 49.5, y0, y1])
        assert band.get_zorder() < ax.lines[0].get_zorder()  # behind the lines
    lin = torch.nn.functional.interpolate(s, size=50, mode="linear", align_corners=False)
    np.testing.assert_allclose(panels[1].images[0].get_array()[0], lin[1, 0].numpy(), atol=1e-6)


def test_saliency_plot_signal_band_is_hot_where_salient():
    x = torch.zeros(1, 1, 40)
    s = torch.zeros(1, 40)
    s[:, 20:] = 1.0
    fig = saliency_plot(x, s, colorbar=False, alpha=1.0)
    ax = fig.axes[0]
    y = 0.5 * sum(ax.get_ylim())
    y += 0.3 * (ax.get_ylim()[1] - y)  # away from the line at 0
    cold, hot = pixel(fig, ax, 8, y), pixel(fig, ax, 32, y)
    np.testing.assert_allclose(hot, np.round(255 * np.array(JET(1.0)[:3])), atol=3)
    np.testing.assert_allclose(cold, np.round(255 * np.array(JET(0.0)[:3])), atol=3)


def test_saliency_plot_volumes_slices():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 8, 8)
    s = torch.rand(2, 1, 5, 4, 4)
    fig = saliency_plot(x, s, colorbar=False)  # middle slice, T // 2 = 2
    panels = image_axes(fig)
    assert len(panels) == 2
    np.testing.assert_allclose(panels[1].images[0].get_array(),
                               x[1, :, 2].permute(1, 2, 0).numpy())
    assert panels[1].images[1].get_array().shape == (8, 8)
    assert panels[1].get_title() == "#1, slice 2"
    last = saliency_plot(x, s, slice=-1, colorbar=False)
    np.testing.assert_allclose(last.axes[0].images[0].get_array(),
                               x[0, :, 4].permute(1, 2, 0).numpy())
    every = saliency_plot(x, s, slice="all")
    panels = image_axes(every)
    assert len(panels) == 10 and len(every.axes) == 11  # one colour bar: frames share a scale
    assert panels[0].get_subplotspec().get_geometry()[:2] == (2, 5)  # inputs × slices
    assert [ax.get_title() for ax in panels[5:]] == [f"#1, slice {t}" for t in range(5)]
    tri = torch.nn.functional.interpolate(s, size=(5, 8, 8), mode="trilinear",
                                          align_corners=False)
    np.testing.assert_allclose(panels[7].images[1].get_array(), tri[1, 0, 2].numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# saliency_plot: saving and errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, map_shape, kwargs, grid, panel", [
    ((3, 3, 16, 16), (3, 1, 16, 16), {}, (2, 2), IMAGE_PANEL_COLORBAR),
    ((3, 3, 16, 16), None, {}, (2, 2), IMAGE_PANEL),
    ((3, 3, 16, 16), (3, 16, 16), dict(nrow=3, colorbar=False), (3, 1), IMAGE_PANEL),
    ((2, 2, 30), (2, 30), {}, (1, 2), SIGNAL_PANEL),
    ((2, 1, 4, 8, 8), (2, 1, 4, 8, 8), dict(slice="all", shared_scale=False), (4, 2),
     IMAGE_PANEL_COLORBAR),
    # A shared scale: one colour bar for the figure, COLORBAR_WIDTH wide.
    ((2, 1, 4, 8, 8), (2, 1, 4, 8, 8), dict(slice="all"), (4, 2), IMAGE_PANEL),
    ((3, 3, 16, 16), (3, 1, 16, 16), dict(vmin=0.0, vmax=1.0), (2, 2), IMAGE_PANEL),
])
def test_saved_png_has_the_documented_pixel_size(tmp_path, shape, map_shape, kwargs, grid,
                                                 panel):
    path = tmp_path / "fig.png"
    before = plt.get_fignums()
    sal = None if map_shape is None else torch.rand(map_shape)
    fig = saliency_plot(torch.rand(shape), sal, save=path, **kwargs)
    one_bar = panel == IMAGE_PANEL and map_shape is not None and kwargs.get("colorbar", True)
    extra = COLORBAR_WIDTH if one_bar else 0.0
    assert png_size(path) == (round((grid[0] * panel[0] + extra) * DPI),
                              round(grid[1] * panel[1] * DPI))
    assert plt.get_fignums() == before  # a saved figure is not left open in pyplot
    assert len(fig.axes) >= 1


def test_unsaved_figures_belong_to_pyplot_and_saved_ones_do_not(tmp_path):
    fig = saliency_plot(torch.rand(1, 3, 4, 4))
    assert fig.number in plt.get_fignums()
    saved = saliency_plot(torch.rand(1, 3, 4, 4), save=str(tmp_path / "a.png"))
    assert not hasattr(saved, "number") or saved.number not in plt.get_fignums()
    saved.savefig(tmp_path / "b.png")  # still usable after saving
    assert png_size(tmp_path / "b.png") == png_size(tmp_path / "a.png")


@pytest.mark.parametrize("x, s, kwargs, words", [
    (torch.rand(3, 8, 8)[0], None, {}, "x must be a batch of shape"),
    (torch.rand(1, 2, 3, 4, 5, 6), None, {}, "x must be a batch of shape"),
    (torch.rand(2, 3, 8, 8), torch.rand(3, 1, 8, 8), {}, "saliency has a batch of 3 maps"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), {}, "saliency must have one channel"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 8), {}, "saliency must have shape"),
    (torch.rand(2, 3, 8, 8), None, dict(alpha=1.5), "alpha must be a number in"),
    (torch.rand(2, 3, 8, 8), None, dict(nrow=0), "nrow must be None or a positive"),
    (torch.rand(1, 1, 4, 8, 8), None, dict(slice=4), "slice=4 is out of range"),
    (torch.rand(1, 1, 4, 8, 8), None, dict(slice="middle"), "slice must be None, an int"),
    (torch.rand(1, 1, 4, 8, 8), None, dict(slice=[0, 9]), "slice=9 is out of range"),
])
def test_saliency_plot_rejects_bad_arguments(x, s, kwargs, words):
    with pytest.raises(ValueError, match=words):
        saliency_plot(x, s, **kwargs)


def test_saliency_plot_rejects_bad_types():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        saliency_plot([[[0.0]]])
    with pytest.raises(TypeError, match="slice must be None, an int, a non-empty sequence"):
        saliency_plot(torch.rand(1, 1, 2, 4, 4), slice=1.0)
    # Complex values are not cast silently to their real part.
    with pytest.raises(TypeError, match=r"x is complex; pass its magnitude \(x\.abs\(\)\)"):
        saliency_plot(torch.rand(1, 3, 4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"saliency is complex; pass its magnitude"):
        overlay(torch.rand(3, 4, 4), torch.rand(4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"vmin must be None or a number, got str"):
        saliency_plot(torch.rand(1, 1, 4, 4), torch.rand(1, 4, 4), vmin="0")
    with pytest.raises(TypeError, match=r"cmap must be a colormap name or a matplotlib Colormap"):
        saliency_plot(torch.rand(1, 1, 4, 4), torch.rand(1, 4, 4), cmap=3)


# ------------------------------------------------------------------------------------------------
# plot_methods
# ------------------------------------------------------------------------------------------------

def test_plot_methods_grid_titles_and_data(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 12)
    maps = {"gradient": torch.rand(2, 1, 12, 12), "grad_cam": torch.rand(2, 1, 3, 3),
            "rise": torch.rand(2, 12, 12)}
    path = tmp_path / "methods.png"
    fig = plot_methods(x, maps, save=path)
    panels = image_axes(fig)
    assert len(panels) == 2 * 4 and len(fig.axes) == 2 * 4 + 2 * 3
    assert panels[0].get_subplotspec().get_geometry()[:2] == (2, 4)
    assert [ax.get_title() for ax in panels[:4]] == ["input", "gradient", "grad_cam", "rise"]
    assert all(ax.get_title() == "" for ax in panels[4:])  # titles on the top row only
    np.testing.assert_allclose(panels[4].images[0].get_array(), x[1].permute(1, 2, 0).numpy())
    assert len(panels[4].images) == 1  # the input column has no map
    assert panels[6].images[1].get_array().shape == (12, 12)  # 3x3 map resized
    np.testing.assert_allclose(panels[7].images[1].get_array(), maps["rise"][1].numpy())
    assert png_size(path) == (round(4 * IMAGE_PANEL_COLORBAR[0] * DPI),
                              round(2 * IMAGE_PANEL_COLORBAR[1] * DPI))


def test_plot_methods_options_pixels_and_other_ranks():
    x = torch.full((1, 1, 16, 16), 0.5)
    fig = plot_methods(x, {"m": half_map()}, titles=["My method"], colorbar=False, alpha=1.0)
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "My method"
    ax = fig.axes[1]
    np.testing.assert_allclose(pixel(fig, ax, 12, 8), np.round(255 * np.array(JET(1.0)[:3])),
                               atol=3)
    np.testing.assert_allclose(pixel(fig, ax, 3, 8), np.round(255 * np.array(JET(0.0)[:3])),
                               atol=3)
    sig = plot_methods(torch.randn(2, 1, 20), {"a": torch.rand(2, 20)})
    assert len(image_axes(sig)) == 4 and sig.axes[1].images[0].get_array().shape == (1, 20)
    vol = torch.rand(1, 3, 6, 8, 8)
    volfig = plot_methods(vol, {"a": torch.rand(1, 1, 6, 8, 8)}, colorbar=False)
    np.testing.assert_allclose(volfig.axes[0].images[0].get_array(),
                               vol[0, :, 3].permute(1, 2, 0).numpy())  # middle slice


def test_plot_methods_rejects_bad_arguments():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"maps\['b'\] has a batch of 1 maps for 2 input"):
        plot_methods(x, {"a": torch.rand(2, 8, 8), "b": torch.rand(1, 8, 8)})
    with pytest.raises(ValueError, match="titles must have one entry per map"):
        plot_methods(x, {"a": torch.rand(2, 8, 8)}, titles=["a", "b"])
    with pytest.raises(TypeError, match="maps must be a mapping"):
        plot_methods(x, [torch.rand(2, 8, 8)])
    with pytest.raises(ValueError, match="x must be a batch"):
        plot_methods(x[0, 0], {})


# ------------------------------------------------------------------------------------------------
# benchmark.plot.plot_example
# ------------------------------------------------------------------------------------------------

def test_plot_example_panels_titles_and_scaling():
    torch.manual_seed(0)
    raw = torch.rand(1, 3, 32, 32)
    normed = (raw - 0.45) / 0.225  # ImageNet-like normalisation
    sal = torch.rand(1, 1, 7, 7)
    fig = plot_example(normed, sal, "grad_cam", 3, class_names=["a", "b", "c", "dog"])
    img_ax, map_ax = image_axes(fig)
    assert img_ax.get_title() == "input image"
    assert map_ax.get_title() == "grad_cam (dog (3))"
    shown = img_ax.images[0].get_array()
    assert shown.shape == (32, 32, 3)
    np.testing.assert_allclose(shown, ((raw - raw.min()) / (raw.max() - raw.min()))[0]
                               .permute(1, 2, 0).numpy(), atol=1e-5)
    smap = map_ax.images[0]
    assert smap.get_array().shape == (7, 7)
    assert smap.get_extent() == pytest.approx(img_ax.images[0].get_extent())  # same frame
    assert smap.get_array().min() == 0 and smap.get_array().max() == pytest.approx(1.0)
    assert len(fig.axes) == 3  # + colour bar


def test_plot_example_category_names():
    x, s = torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8)
    assert plot_example(x, s, "m", 7).axes[1].get_title() == "m (category 7)"
    assert plot_example(x, s, "m", 7, class_names=["a"]).axes[1].get_title() == "m (category 7)"
    assert plot_example(x, s, "m", 2, class_names={2: "cat"}).axes[1].get_title() == "m (cat (2))"
    title = plot_example(x, s, "m", torch.tensor(0), class_names="imagenet").axes[1].get_title()
    assert title == "m (tench (0))"
    with pytest.raises(ValueError, match="class_names must be None, 'imagenet'"):
        plot_example(x, s, "m", 0, class_names="voc")


def test_plot_example_save_and_show(tmp_path, monkeypatch):
    x, s = torch.rand(1, 3, 8, 8), torch.rand(1, 1, 4, 4)
    before = plt.get_fignums()
    path = tmp_path / "example.png"
    fig = plot_example(x, s, "gradient", 1, save_path=path)
    assert png_size(path) == (800, 360)  # 8 x 3.6 inches at 100 dpi
    assert plt.get_fignums() == before  # closed after saving
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(True))
    fig = plot_example(x, s, "gradient", 1, show_plot=True)
    assert shown == [True] and fig.number in plt.get_fignums()


@pytest.mark.parametrize("x, s, exc, words", [
    (torch.rand(2, 3, 8, 8), torch.rand(2, 1, 8, 8), ValueError, "input must hold one example"),
    (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), ValueError, "input must have shape"),
    (torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), ValueError, "saliency must have shape"),
    (np.zeros((1, 3, 8, 8)), torch.rand(1, 1, 8, 8), TypeError, "input must be a torch.Tensor"),
])
def test_plot_example_rejects_bad_arguments(x, s, exc, words):
    with pytest.raises(exc, match=words):
        plot_example(x, s, "m", 0)


# ------------------------------------------------------------------------------------------------
# Never silently wrong: non-finite and all-zero maps, layouts, empty inputs (issue 17)
# ------------------------------------------------------------------------------------------------

MAGENTA = np.array(NONFINITE_COLOR)


def colorbars(fig, visible=True):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>" and ax.get_visible() == visible]


def test_overlay_masks_nonfinite_values_and_scales_the_rest():
    s = torch.tensor([[0.0, 1.0], [2.0, float("inf")]])
    s_nan = s.clone()
    s_nan[0, 0] = float("nan")
    with pytest.warns(PlotWarning, match=r"1 non-finite value\(s\) \(0 NaN, 1 \+inf, 0 -inf\)"):
        out = overlay(torch.zeros(3, 2, 2), s, alpha=1.0)
    np.testing.assert_allclose(out[1, 1], MAGENTA)  # the inf, masked
    # The finite values keep their own scale: 0 -> jet(0), 1 -> jet(0.5), 2 -> jet(1).
    np.testing.assert_allclose(out[0, 0], JET(0.0)[:3])
    np.testing.assert_allclose(out[0, 1], JET(0.5)[:3])
    np.testing.assert_allclose(out[1, 0], JET(1.0)[:3])
    with pytest.warns(PlotWarning, match=r"2 non-finite value\(s\) \(1 NaN, 1 \+inf"):
        out = overlay(torch.zeros(3, 2, 2), s_nan, alpha=1.0)
    np.testing.assert_allclose(out[0, 0], MAGENTA)  # NaN is not painted as the minimum
    np.testing.assert_allclose(out[0, 1], JET(0.0)[:3])


def test_overlay_reads_either_layout_for_both_types():
    torch.manual_seed(0)
    chw = torch.rand(3, 6, 10)
    sal = torch.rand(6, 10)
    want = overlay(chw, sal)
    np.testing.assert_allclose(overlay(chw.numpy(), sal), want)  # (C, H, W) array
    np.testing.assert_allclose(overlay(chw.permute(1, 2, 0), sal), want)  # (H, W, C) tensor
    grey = torch.rand(1, 6, 10)
    np.testing.assert_allclose(overlay(grey.permute(1, 2, 0).numpy(), sal), overlay(grey, sal))
    # Both ends could hold channels: the map's size settles it, silently.
    square = np.random.default_rng(0).random((3, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert overlay(square, np.zeros((4, 4)), normalize=False).shape == (4, 4, 3)
        assert overlay(square, np.zeros((3, 4)), normalize=False).shape == (3, 4, 3)
    # Nothing settles it: the array convention, named in a warning.
    with pytest.warns(PlotWarning, match=r"reads as \(C, H, W\) and as \(H, W, C\); it is "
                                         r"taken as \(H, W, C\)"):
        assert overlay(square, np.zeros((2, 2)), normalize=False).shape == (3, 4, 3)


def test_overlay_of_a_batch():
    torch.manual_seed(0)
    images, maps = torch.rand(2, 3, 6, 6), torch.rand(2, 1, 3, 3)
    out = overlay(images, maps)
    assert out.shape == (2, 6, 6, 3) and out.dtype == np.float64
    for k in range(2):
        np.testing.assert_allclose(out[k], overlay(images[k], maps[k]))
    np.testing.assert_allclose(overlay(images.permute(0, 2, 3, 1).numpy(), maps[:, 0]), out)
    assert overlay(images[:1], maps[:1]).shape == (6, 6, 3)  # a batch of one: one image
    with pytest.raises(ValueError, match=r"saliency must have shape \(N, 1, \*spatial\) or"):
        overlay(images, torch.rand(6, 6))


@pytest.mark.parametrize("image, s, words", [
    (torch.zeros(3, 5, 6), torch.zeros(0, 0), r"saliency is empty \(shape \(0, 0\)\)"),
    (torch.zeros(3, 0, 0), torch.zeros(0, 0), r"image is empty \(shape \(1, 3, 0, 0\)\)"),
    (torch.full((3, 4, 4), float("nan")), torch.zeros(4, 4), r"image has 48 NaN or infinite"),
    (torch.zeros(3, 4, 4), torch.zeros(5, 4, 4), r"if they are classes, select the target's: "
                                                 r"saliency\[c\]"),
    (torch.zeros(3, 4, 4), torch.zeros(1, 5, 4, 4), r"If its 5 channels are classes \(a multi"),
])
def test_overlay_refuses_empty_nonfinite_images_and_multiclass_maps(image, s, words):
    with pytest.raises(ValueError, match=words):
        overlay(image, s)


def test_saliency_plot_masks_nonfinite_values_visibly():
    x = torch.full((1, 1, 16, 16), 0.5)
    s = torch.linspace(0, 1, 16).repeat(16, 1)[None, None].clone()
    s[0, 0, 2, 2], s[0, 0, 12, 3] = float("inf"), float("nan")
    with pytest.warns(PlotWarning, match=r"saliency of input #0 has 2 non-finite") as record:
        fig = saliency_plot(x, s, alpha=0.5)
    assert record[0].filename == __file__  # the warning points at the caller
    ax = image_axes(fig)[0]
    img, sal, mask = ax.images
    assert sal.get_clim() == pytest.approx((0.0, 1.0))  # from the finite values, not inf
    np.testing.assert_allclose(mask.get_array()[2, 2], [1, 0, 1, 1])
    np.testing.assert_allclose(mask.get_array()[0, 0], [0, 0, 0, 0])
    np.testing.assert_allclose(pixel(fig, ax, 2, 2), 255 * MAGENTA, atol=3)  # opaque
    np.testing.assert_allclose(pixel(fig, ax, 3, 12), 255 * MAGENTA, atol=3)
    assert [t.get_text() for t in ax.texts] == ["2 NaN/inf (magenta)"]


def test_all_zero_map_is_named_and_gets_no_invented_colour_bar():
    x = torch.full((2, 1, 16, 16), 0.5)
    s = torch.rand(2, 1, 16, 16)
    s[1] = 0.0
    with pytest.warns(PlotWarning, match="saliency of input #1 is all zero"):
        fig = saliency_plot(x, s)
    a, b = image_axes(fig)
    assert [t.get_text() for t in b.texts] == ["all zero"] and len(a.texts) == 0
    assert len(colorbars(fig)) == 1 and len(colorbars(fig, visible=False)) == 1
    np.testing.assert_allclose(pixel(fig, b, 3, 3), [128, 128, 128], atol=2)  # the image only
    with pytest.warns(PlotWarning, match=r"is constant \(0\.3\)"):
        fig = saliency_plot(x[:1], torch.full((1, 16, 16), 0.3))
    assert image_axes(fig)[0].texts[0].get_text() == "constant 0.3"
    with pytest.warns(PlotWarning, match=r"maps\['m'\] of input #0 is all zero"):
        fig = plot_methods(x[:1], {"m": torch.zeros(1, 16, 16)})
    assert fig.axes[1].texts[0].get_text() == "all zero" and colorbars(fig) == []


def test_saliency_plot_takes_numpy_and_channel_last_images():
    torch.manual_seed(0)
    chw = torch.rand(2, 3, 8, 10)
    hwc = chw.permute(0, 2, 3, 1)
    want = chw[0].permute(1, 2, 0).numpy()
    for x in (hwc[0].numpy(), hwc.numpy(), hwc, chw.numpy()):
        fig = saliency_plot(x, torch.rand(x.shape[0] if x.ndim == 4 else 1, 8, 10))
        np.testing.assert_allclose(image_axes(fig)[0].images[0].get_array(), want, atol=1e-6)
    rgba = np.concatenate([hwc[0].numpy(), np.ones((8, 10, 1), np.float32)], axis=2)
    np.testing.assert_allclose(saliency_plot(rgba).axes[0].images[0].get_array(), want,
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"x is empty \(shape \(1, 3, 0, 4\)\)"):
        saliency_plot(torch.rand(1, 3, 0, 4))
    with pytest.raises(ValueError, match=r"x has 1 NaN or infinite value\(s\)"):
        saliency_plot(torch.tensor([[[[0.0, float("inf")]]]]))
    with pytest.raises(ValueError, match=r"saliency is empty \(shape \(1, 0, 4\)\)"):
        saliency_plot(torch.rand(1, 3, 4, 4), torch.rand(1, 0, 4))


@pytest.mark.parametrize("k, words", [
    (5, r"If its 5 channels are classes \(a multi-class map\), select the target's channel"),
    (3, r"Its 3 channels match x's: if they are per-input-channel attributions, reduce"),
])
def test_multichannel_map_hint_names_the_right_fix(k, words):
    with pytest.raises(ValueError, match=words):
        saliency_plot(torch.rand(2, 3, 8, 8), torch.rand(2, k, 8, 8))


# ------------------------------------------------------------------------------------------------
# Titles, shared scales and volume montages (issue 18)
# ------------------------------------------------------------------------------------------------

def test_titles_and_row_titles():
    x = torch.rand(2, 3, 8, 8)
    fig = saliency_plot(x, torch.rand(2, 8, 8), titles=["cat", "dog"])
    assert [ax.get_title() for ax in image_axes(fig)] == ["cat", "dog"]
    vol = saliency_plot(torch.rand(1, 1, 3, 4, 4), titles=["scan"], slice=[0, 2])
    assert [ax.get_title() for ax in image_axes(vol)] == ["scan, slice 0", "scan, slice 2"]
    rows = plot_methods(x, {"m": torch.rand(2, 8, 8)}, row_titles=["cat", "dog"])
    assert [ax.get_ylabel() for ax in image_axes(rows)[::2]] == ["cat", "dog"]
    before = plt.get_fignums()
    with pytest.raises(ValueError, match=r"titles must have one entry per input \(2\), got 1"):
        saliency_plot(x, titles=["cat"])
    with pytest.raises(TypeError, match=r"titles must be a sequence of strings.*single string"):
        saliency_plot(x, titles="cat")
    with pytest.raises(ValueError, match=r"row_titles must have one entry per input \(2\)"):
        plot_methods(x, {"m": torch.rand(2, 8, 8)}, row_titles=["a", "b", "c"])
    assert plt.get_fignums() == before  # refused before any figure is made


def test_volume_frames_share_one_colour_scale_and_one_bar():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 4, 8, 8)
    s = torch.rand(1, 1, 4, 8, 8) * torch.arange(1.0, 5.0).view(1, 1, 4, 1, 1)
    fig = saliency_plot(x, s, slice="all")
    clims = {ax.images[1].get_clim() for ax in image_axes(fig)}
    assert len(clims) == 1
    assert clims.pop() == pytest.approx((float(s.min()), float(s.max())))
    assert len(colorbars(fig)) == 1
    own = saliency_plot(x, s, slice="all", shared_scale=False)
    assert len({ax.images[1].get_clim() for ax in image_axes(own)}) == 4
    assert len(colorbars(own)) == 4
    fixed = saliency_plot(torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), vmin=-1.0, vmax=2.0)
    assert {ax.images[1].get_clim() for ax in image_axes(fixed)} == {(-1.0, 2.0)}
    assert len(colorbars(fixed)) == 1  # both limits given: one scale, one bar
    with pytest.raises(ValueError, match=r"vmin \(5\) must be below vmax \(.*\); give both"):
        saliency_plot(x, s, vmin=5.0)
    with pytest.raises(ValueError, match=r"vmin \(2\) must be below vmax \(1\); swap them"):
        saliency_plot(x, s, vmin=2.0, vmax=1.0)
    with pytest.raises(TypeError, match="shared_scale must be None, True or False"):
        saliency_plot(x, s, shared_scale="yes")


def test_volume_montage_wraps_long_volumes():
    x, s = torch.rand(2, 1, 12, 4, 4), torch.rand(2, 1, 12, 4, 4)
    fig = saliency_plot(x, s, slice="all")
    panels = image_axes(fig)
    assert len(panels) == 24
    assert panels[0].get_subplotspec().get_geometry()[:2] == (6, 4)  # 3 rows of 4 per volume
    assert panels[12].get_title() == "#1, slice 0"
    assert panels[12].get_subplotspec().rowspan.start == 3  # the second volume starts below
    picked = saliency_plot(x, s, slice=[0, -1], nrow=1)
    assert [ax.get_title() for ax in image_axes(picked)][:2] == ["#0, slice 0", "#0, slice 11"]
    assert image_axes(picked)[0].get_subplotspec().get_geometry()[:2] == (4, 1)


# ------------------------------------------------------------------------------------------------
# plot_example: non-finite and all-zero maps, non-finite inputs
# ------------------------------------------------------------------------------------------------

def test_plot_example_masks_nonfinite_and_names_all_zero_maps():
    x = torch.rand(1, 3, 8, 8)
    s = torch.tensor([[0.0, 1.0], [2.0, float("inf")]])
    with pytest.warns(PlotWarning, match=r"saliency has 1 NaN or infinite value\(s\)"):
        fig = plot_example(x, s, "m", 0)
    ax_map = image_axes(fig)[1]
    np.testing.assert_allclose(ax_map.images[0].get_array(), [[0.0, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(ax_map.images[1].get_array()[1, 1], [1, 0, 1, 1])
    assert ax_map.texts[0].get_text() == "1 NaN/inf (magenta)"
    with pytest.warns(PlotWarning, match="saliency is all zero"):
        fig = plot_example(x, torch.zeros(1, 1, 4, 4), "m", 0)
    assert image_axes(fig)[1].texts[0].get_text() == "all zero" and colorbars(fig) == []
    with pytest.raises(ValueError, match="input has NaN or infinite values"):
        plot_example(torch.full((1, 3, 4, 4), float("nan")), s, "m", 0)
