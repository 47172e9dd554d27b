"""get_example_data: TorchRay's example snippets run unchanged on our example data.

Offline (no torchvision weights in the torch hub cache) ``get_example_data()`` returns
``embedded-vgg16`` — torchvision VGG16's module layout, trained on the embedded data set — and
a test image with two objects; with VGG16's ImageNet weights in the cache it returns
torchvision's VGG16 and scikit-image's cat photograph (tested with a stand-in state dict written
to a temporary hub folder: nothing is downloaded).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from torchray_like.benchmark import get_example_data, plot_example
from torchray_like.benchmark.embedded_data import EMBEDDED_CLASSES, IMAGE_SIZE, EmbeddedShapes
from torchray_like.benchmark.embedded_models import (
    EMBEDDED_ACCURACY,
    EMBEDDED_LAYERS,
    EMBEDDED_WEIGHTS,
    EmbeddedResNet,
    EmbeddedVGG,
    WeightsError,
    load_embedded_model,
    set_accuracy,
    weights_path,
)
from torchray_like.benchmark.embedded_vgg16 import EmbeddedVGG16, deepen_embedded_vgg
from torchray_like.benchmark.example_data import CAT_CATEGORIES, EXAMPLE_INDICES

TORCHRAY_PATH = "/tmp/torchray_pkg"


@contextlib.contextmanager
def _hub_at(folder):
    """torch.hub.get_dir() is ``folder/hub`` inside the block (through TORCH_HOME, or
    torch.hub.set_dir where a caller set it), as it was afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(folder))
        hub_dir = os.path.join(str(folder), "hub")
        if torch.hub.get_dir() == hub_dir:
            yield hub_dir
            return
        old = torch.hub.get_dir()          # an explicit torch.hub.set_dir wins over TORCH_HOME
        torch.hub.set_dir(hub_dir)
        try:
            yield hub_dir
        finally:
            torch.hub.set_dir(old)


@pytest.fixture
def hub(tmp_path):
    """An empty torch hub folder for the test (the user's cache must not change the outcome)."""
    with _hub_at(tmp_path / "torch") as hub_dir:
        yield pathlib.Path(hub_dir)


def _example(arch="vgg16", **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = get_example_data(arch, **kwargs)
    return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.fixture(scope="module")
def example():
    with _hub_at(os.path.join(os.path.dirname(__file__), "no-such-torch-home")):
        (model, x, c1, c2), messages = _example()
    index = EXAMPLE_INDICES["embedded-vgg16"]
    _, target = EmbeddedShapes("test", size=index + 1, seed=0)[index]
    return model, x, c1, c2, messages, target


def _structure(model: nn.Module):
    return [(name, type(m).__name__) for name, m in model.named_modules()
            if name.count(".") <= 1 and name]


# ---------------------------------------------------------------------------------------------
# What get_example_data returns offline
# ---------------------------------------------------------------------------------------------


def test_vgg16_is_embedded_vgg16_with_torchvision_layer_names(example):
    model, x, c1, c2, messages, target = example
    assert isinstance(model, EmbeddedVGG16) and not model.training
    with torch.device("meta"):
        reference = torchvision.models.vgg16()
    assert _structure(model) == _structure(reference)
    names = dict(model.named_modules())
    assert isinstance(names["features.29"], nn.ReLU) and isinstance(names["features.30"],
                                                                    nn.MaxPool2d)
    assert isinstance(names["classifier.6"], nn.Linear)
    assert names["classifier.6"].out_features == len(EMBEDDED_CLASSES)
    assert x.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert isinstance(c1, int) and isinstance(c2, int) and c1 != c2
    assert {c1, c2} <= set(target["class_ids"].tolist())
    with torch.no_grad():
        assert model(x)[0].topk(2).indices.tolist() == [c1, c2]
    assert EMBEDDED_LAYERS["embedded-vgg16"] == {
        "grad_cam": "features.29", "excitation_backprop": "features.9",
        "contrast": "features.30"}


def test_offline_warning_says_what_and_why(example):
    *_, c1, c2, messages, _ = example
    assert len(messages) == 1, messages
    message = messages[0]
    for part in ("torchvision's ImageNet weights of 'vgg16' are not in the local torch hub cache",
                 "never downloads", "'embedded-vgg16'",
                 f"test image {EXAMPLE_INDICES['embedded-vgg16']} of the embedded data set",
                 f"{EMBEDDED_CLASSES[c1]} = {c1}", f"{EMBEDDED_CLASSES[c2]} = {c2}",
                 "the image is 64x64, the size the model was trained at, not the requested "
                 "224x224"):
        assert part in message, (part, message)
    assert "RANDOM" not in message


def test_other_archs_and_direct_names(hub):
    (model, x, c1, c2), messages = _example("vgg11")
    assert type(model) is EmbeddedVGG and "'embedded-vgg'" in messages[0]
    (model, x, c1, c2), messages = _example("resnet50", shape=IMAGE_SIZE)
    assert type(model) is EmbeddedResNet and "requested" not in messages[0]
    (model, x, c1, c2), messages = _example("embedded-vgg16", shape=(64, 64))
    assert isinstance(model, EmbeddedVGG16) and messages == []
    assert x.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("shape, error, match", [
    ("224", TypeError, "shape must be an int or a"), (True, TypeError, "shape"),
    (0, ValueError, "shape must be positive"), ((0, 5), ValueError, "shape must be positive"),
    ((1, 2, 3), ValueError, r"\(height, width\) pair"), ((2.5, 3), TypeError, "shape")])
def test_bad_shapes(shape, error, match):
    with pytest.raises(error, match=match):
        get_example_data("embedded-vgg16", shape=shape)


def test_bad_arch():
    with pytest.raises(ValueError, match="arch must be a torchvision classification model"):
        get_example_data("vgg17")
    with pytest.raises(TypeError, match="arch must be a str"):
        get_example_data(None)


# ---------------------------------------------------------------------------------------------
# The shipped model
# ---------------------------------------------------------------------------------------------


def test_weights_digest_size_and_accuracy():
    path = weights_path("embedded-vgg16")
    data = open(path, "rb").read()
    assert hashlib.sha256(data).hexdigest() == EMBEDDED_WEIGHTS["embedded-vgg16"][1]
    assert len(data) < 5_000_000
    images, targets = zip(*(EmbeddedShapes("test", size=64, seed=0)[i] for i in range(64)))
    truth = torch.stack([t["multi_hot"] for t in targets]) > 0
    with torch.no_grad():
        scores = load_embedded_model("embedded-vgg16")(torch.stack(images))
    accuracy = set_accuracy(scores, truth)
    assert abs(accuracy - EMBEDDED_ACCURACY["embedded-vgg16"]["set_accuracy_64"]) <= 1 / 64 + 1e-9
    assert accuracy >= 0.8


def test_corrupt_weights_are_refused(tmp_path):
    corrupt = tmp_path / "embedded_vgg16.pt"
    corrupt.write_bytes(open(weights_path("embedded-vgg16"), "rb").read()[:-10])
    with pytest.raises(WeightsError, match="corrupt or not the shipped ones: SHA-256"):
        load_embedded_model("embedded-vgg16", path=str(corrupt),
                            sha256=EMBEDDED_WEIGHTS["embedded-vgg16"][1])


def test_deepened_embedded_vgg_computes_its_features_exactly():
    """embedded-vgg16's recipe: embedded-vgg's convolutions in VGG16's layout, identities
    elsewhere; features.23 (pool4) is embedded-vgg's last pooled map, bit for bit."""
    vgg = load_embedded_model("embedded-vgg")
    deep = deepen_embedded_vgg(vgg, num_classes=5).eval()
    assert len(deep.features) == 31 and deep.classifier[6].out_features == 5
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(deep.features[:24](x), vgg.features(x), rtol=0, atol=0)
    # The shipped network kept those convolutions (only its classifier was trained).
    shipped = load_embedded_model("embedded-vgg16")
    for a, b in zip(shipped.features, deep.features):
        if isinstance(a, nn.Conv2d):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(ValueError, match="vgg must be an embedded-vgg"):
        deepen_embedded_vgg(load_embedded_model("embedded-resnet", pretrained=False))
    with pytest.raises(ValueError, match="widths must have 5 entries"):
        EmbeddedVGG16(widths=(8, 16))


# ---------------------------------------------------------------------------------------------
# TorchRay's example snippets, unchanged but for the package name
# ---------------------------------------------------------------------------------------------

_HEAD = "from torchray_like.benchmark import get_example_data, plot_example\n"
SNIPPETS = {
    "gradient": ("from torchray_like.attribution.gradient import gradient\n" + _HEAD +
                 "model, x, category_id, _ = get_example_data()\n"
                 "saliency = gradient(model, x, category_id)\n"
                 "plot_example(x, saliency, 'gradient backprop', category_id)\n", IMAGE_SIZE),
    "deconvnet": ("from torchray_like.attribution.deconvnet import deconvnet\n" + _HEAD +
                  "model, x, category_id, _ = get_example_data()\n"
                  "saliency = deconvnet(model, x, category_id)\n"
                  "plot_example(x, saliency, 'deconvnet', category_id)\n", IMAGE_SIZE),
    "guided_backprop": ("from torchray_like.attribution.guided_backprop import guided_backprop\n"
                        + _HEAD + "model, x, category_id, _ = get_example_data()\n"
                        "saliency = guided_backprop(model, x, category_id)\n"
                        "plot_example(x, saliency, 'guided backprop', category_id)\n",
                        IMAGE_SIZE),
    "grad_cam": ("from torchray_like.attribution.grad_cam import grad_cam\n" + _HEAD +
                 "model, x, category_id, _ = get_example_data()\n"
                 "saliency = grad_cam(model, x, category_id, saliency_layer='features.29')\n"
                 "plot_example(x, saliency, 'grad-cam backprop', category_id)\n", 4),
    "linear_approx": ("from torchray_like.attribution.linear_approx import linear_approx\n"
                      + _HEAD + "model, x, category_id, _ = get_example_data()\n"
                      "saliency = linear_approx(model, x, category_id, "
                      "saliency_layer='features.29')\n"
                      "plot_example(x, saliency, 'linear approx', category_id)\n", 4),
    "excitation_backprop": (
        "from torchray_like.attribution.excitation_backprop import excitation_backprop\n"
        + _HEAD + "model, x, category_id, _ = get_example_data()\n"
        "saliency = excitation_backprop(\n    model,\n    x,\n    category_id,\n"
        "    saliency_layer='features.9',\n)\n"
        "plot_example(x, saliency, 'excitation backprop', category_id)\n", 16),
    "contrastive_excitation_backprop": (
        "from torchray_like.attribution.excitation_backprop import "
        "contrastive_excitation_backprop\n" + _HEAD +
        "model, x, category_id, _ = get_example_data()\n"
        "saliency = contrastive_excitation_backprop(\n    model,\n    x,\n    category_id,\n"
        "    saliency_layer='features.9',\n    contrast_layer='features.30',\n"
        "    classifier_layer='classifier.6',\n)\n"
        "plot_example(x, saliency, 'contrastive excitation backprop', category_id)\n", 16),
}


@pytest.fixture
def quiet_plots(monkeypatch, hub):
    """Agg figures, closed after the test; get_example_data's (expected) warning silenced."""
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    plt.switch_backend("agg")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="get_example_data")
        yield
    plt.close("all")
    plt.switch_backend(backend)


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_torchray_snippet_runs_unchanged(name, quiet_plots):
    code, side = SNIPPETS[name]
    namespace: dict = {}
    exec(compile(code, f"<TorchRay example {name}>", "exec"), namespace)
    saliency = namespace["saliency"]
    assert saliency.shape == (1, 1, side, side) and saliency.dtype == torch.float32
    assert torch.isfinite(saliency).all() and saliency.abs().max() > 0


def test_rise_and_extremal_perturbation_snippets(quiet_plots):
    """TorchRay's RISE and extremal perturbation examples, with smaller budgets (500 masks
    instead of 8000, 50 iterations instead of 800) to keep the test short."""
    code = (
        "from torchray_like.attribution.rise import rise\n"
        "from torchray_like.attribution.extremal_perturbation import extremal_perturbation, "
        "contrastive_reward\n" + _HEAD + "from torchray_like.utils import get_device\n"
        "model, x, category_id_1, category_id_2 = get_example_data()\n"
        "device = get_device()\nmodel.to(device)\nx = x.to(device)\n"
        "saliency = rise(model, x, num_masks=500)\n"
        "saliency = saliency[:, category_id_1].unsqueeze(0)\n"
        "plot_example(x, saliency, 'RISE', category_id_1)\n"
        "masks_1, _ = extremal_perturbation(model, x, category_id_1, "
        "reward_func=contrastive_reward, debug=False, areas=[0.12], max_iter=50)\n"
        "plot_example(x, masks_1, 'extremal perturbation', category_id_1)\n")
    namespace: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # many small batches: a second thread only adds contention
    try:
        exec(compile(code, "<TorchRay examples rise, extremal_perturbation>", "exec"),
             namespace)
    finally:
        torch.set_num_threads(threads)
    assert namespace["saliency"].shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert namespace["masks_1"].shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)
    target = EmbeddedShapes("test", size=EXAMPLE_INDICES["embedded-vgg16"] + 1,
                            seed=0)[EXAMPLE_INDICES["embedded-vgg16"]][1]
    assert _hits(namespace["saliency"], target, namespace["category_id_1"])
    # Extremal perturbation's mask keeps about the area asked for (12 %).  It does not point at
    # the triangle on this image (not even with the example's 800 iterations): measured, not
    # asserted.  After 50 of the example's 800 iterations the area constraint has not settled:
    # the mean is 0.04-0.10 depending on the machine's rounding (0.042 on CI's fresh venv), so
    # the bounds only rule out an empty or a full mask.
    mask = namespace["masks_1"]
    assert float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert 0.02 < float(mask.mean()) < 0.3


# ---------------------------------------------------------------------------------------------
# The maps mean something: the two categories' maps differ and point at their objects
# ---------------------------------------------------------------------------------------------


def _hits(smap: torch.Tensor, target, category: int, tolerance: int = 4) -> bool:
    """The pointing game (Zhang et al. 2016): the map's maximum, upsampled to the image, falls
    within ``tolerance`` pixels of an object of ``category``."""
    up = F.interpolate(smap.detach().float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                       align_corners=False)[0, 0]
    point = int(up.flatten().argmax())
    y, x = divmod(point, IMAGE_SIZE)
    mask = target["masks"][target["labels"] == category].any(0).float()
    grown = F.max_pool2d(mask[None, None], 2 * tolerance + 1, 1, tolerance)[0, 0] > 0
    return bool(grown[y, x])


def _maps(model, x, category):
    from torchray_like.attribution.excitation_backprop import (
        contrastive_excitation_backprop,
        excitation_backprop,
    )
    from torchray_like.attribution.grad_cam import grad_cam
    from torchray_like.attribution.guided_backprop import guided_backprop
    from torchray_like.attribution.linear_approx import linear_approx

    return {
        "guided_backprop": guided_backprop(model, x, category),
        "grad_cam": grad_cam(model, x, category, saliency_layer="features.29"),
        "linear_approx": linear_approx(model, x, category, saliency_layer="features.29"),
        "excitation_backprop": excitation_backprop(model, x, category,
                                                   saliency_layer="features.9"),
        "contrastive_excitation_backprop": contrastive_excitation_backprop(
            model, x, category, saliency_layer="features.9", contrast_layer="features.30",
            classifier_layer="classifier.6"),
    }


def test_the_two_categories_maps_differ_and_point_at_their_objects(example):
    """Every map points at its own category's object; the class-discriminative ones (Grad-CAM,
    linear approximation, contrastive EBP) also differ between the categories by at least a
    quarter of their range somewhere (measured: 64 %, 49 %, 100 %).  Plain excitation backprop
    and guided backprop are nearly class-blind (7 % and 24 %; Zhang et al. 2016 introduced the
    contrastive variant for this), so for them only the pointing is asserted."""
    model, x, c1, c2, _, target = example
    first, second = _maps(model, x, c1), _maps(model, x, c2)
    for name in first:
        a, b = first[name], second[name]
        assert _hits(a, target, c1), (name, EMBEDDED_CLASSES[c1])
        assert _hits(b, target, c2), (name, EMBEDDED_CLASSES[c2])
        if name in ("grad_cam", "linear_approx", "contrastive_excitation_backprop"):
            change = float((a / a.abs().max() - b / b.abs().max()).abs().max())
            assert change > 0.25, (name, change)


# ---------------------------------------------------------------------------------------------
# torchvision's VGG16 weights in the cache: the photograph
# ---------------------------------------------------------------------------------------------


def _write_stand_in_vgg16(hub_dir) -> dict:
    """A random VGG16 state dict at ``hub/checkpoints/vgg16-397923af.pth`` (each tensor a
    random vector broadcast to its shape, so that the file is small)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s[-1], generator=g).expand(s) for k, s in shapes.items()}
    os.makedirs(hub_dir / "checkpoints", exist_ok=True)
    torch.save(state, hub_dir / "checkpoints" / "vgg16-397923af.pth")
    return state


def test_cached_vgg16_weights_give_torchvision_vgg16_and_the_cat_photo(hub, quiet_plots):
    import numpy as np
    import skimage.data
    from PIL import Image
    from torchvision import transforms

    state = _write_stand_in_vgg16(hub)
    (model, x, c1, c2), messages = _example("vgg16", shape=64)
    assert type(model) is torchvision.models.VGG and not model.training
    torch.testing.assert_close(model.features[0].weight, state["features.0.weight"],
                               rtol=0, atol=0)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    # TorchRay's preprocessing (PIL resize of the shorter side, centre crop, ImageNet's
    # normalisation); PIL's and torch's antialiased bilinear resizes differ by a few levels.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64),
                                   transforms.ToTensor(), transforms.Normalize(mean, std)])(
        Image.fromarray(np.asarray(skimage.data.chelsea())))
    assert float((x[0] - expected).abs().mean()) < 0.05
    assert c1 in CAT_CATEGORIES and c2 in CAT_CATEGORIES and c1 != c2
    with torch.no_grad():
        scores = model(x)[0]
    ranked = sorted(CAT_CATEGORIES, key=lambda c: -float(scores[c]))
    assert [c1, c2] == ranked[:2]
    names = torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(messages) == 1
    for part in ("torchvision's 'vgg16' with the ImageNet weights found in the local torch hub "
                 "cache", str(hub / "checkpoints" / "vgg16-397923af.pth"),
                 "nothing was downloaded", "skimage.data.chelsea()", "at (64, 64)",
                 f"categories {c1} ({names[c1]}) and {c2} ({names[c2]})"):
        assert part in messages[0], (part, messages[0])
    (model, x, c1, c2), _ = _example("vgg16", shape=(48, 72))
    assert x.shape == (1, 3, 48, 72)
    # The grad-cam snippet runs on it too (torchvision's own layer names).
    from torchray_like.attribution.grad_cam import grad_cam
    saliency = grad_cam(model, x, c1, saliency_layer="features.29")
    assert saliency.shape == (1, 1, 3, 4)
    figure = plot_example(x, saliency, "grad-cam backprop", c1, class_names="imagenet")
    assert figure.axes[1].get_title() == f"grad-cam backprop ({names[c1]} ({c1}))"


def test_unreadable_cached_weights_fall_back_and_say_so(hub):
    os.makedirs(hub / "checkpoints")
    (hub / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"not a state dict")
    (model, _, _, _), messages = _example("vgg16")
    assert isinstance(model, EmbeddedVGG16)
    assert "vgg16-397923af.pth of 'vgg16' do not load" in messages[0]
    assert "using the embedded model instead" in messages[0]


def test_nothing_is_downloaded(hub, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("get_example_data tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    (model, *_), _ = _example("vgg16")
    assert isinstance(model, EmbeddedVGG16)
    assert not (hub / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# TorchRay itself on the same example data (black box; skipped without it)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def torchray():
    """TorchRay 1.0.0.2 from /tmp/torchray_pkg (or installed); sys.path and sys.modules are
    restored afterwards."""
    path, modules = list(sys.path), set(sys.modules)
    if os.path.isdir(TORCHRAY_PATH):
        sys.path.insert(0, TORCHRAY_PATH)
    try:
        yield pytest.importorskip("torchray.attribution.excitation_backprop").__name__
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if name == "torchray" or name.startswith("torchray."):
                del sys.modules[name]


def test_same_maps_as_torchray_on_the_example_data(example, torchray):
    import importlib

    model, x, c1, c2, _, _ = example
    ours_module = "torchray_like.attribution"
    calls = [("gradient", "gradient", {}), ("deconvnet", "deconvnet", {}),
             ("guided_backprop", "guided_backprop", {}),
             ("grad_cam", "grad_cam", {"saliency_layer": "features.29"}),
             ("linear_approx", "linear_approx", {"saliency_layer": "features.29"}),
             ("excitation_backprop", "excitation_backprop", {"saliency_layer": "features.9"}),
             ("excitation_backprop", "contrastive_excitation_backprop",
              {"saliency_layer": "features.9", "contrast_layer": "features.30",
               "classifier_layer": "classifier.6"})]
    for module, function, kwargs in calls:
        ours = getattr(importlib.import_module(f"{ours_module}.{module}"), function)
        theirs = getattr(importlib.import_module(f"torchray.attribution.{module}"), function)
        for category in (c1, c2):
            a = ours(model, x, category, **kwargs)
            b = theirs(model, x, category, **kwargs)
            assert a.shape == b.shape, function
            a, b = a.detach(), b.detach()    # TorchRay returns maps that require grad
            error = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            assert error <= 1e-5, (function, category, error)
