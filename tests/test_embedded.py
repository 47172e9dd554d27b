"""The embedded benchmark: data set, shipped models and example data (fast, a few seconds)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes

from torchray_like.benchmark import embedded_data as ed
from torchray_like.benchmark.embedded_data import (
    EMBEDDED_CLASSES, IMAGE_SIZE, NUM_CLASSES, EmbeddedShapes, denormalize, embedded_collate,
    normalize)
from torchray_like.benchmark.embedded_models import (
    EMBEDDED_ACCURACY, EMBEDDED_LAYERS, EMBEDDED_MODELS, EMBEDDED_WEIGHTS, WeightsError,
    load_embedded_model, set_accuracy, weights_path)
from torchray_like.benchmark.example_data import EXAMPLE_INDEX, get_example_data


def _same_target(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


@pytest.fixture(scope="module")
def test_items():
    data = EmbeddedShapes("test", size=64)
    return [data[i] for i in range(len(data))]


@pytest.fixture(scope="module")
def models():
    return {name: load_embedded_model(name) for name in EMBEDDED_MODELS}


# ---------------------------------------------------------------------------------------------
# Data set
# ---------------------------------------------------------------------------------------------


def test_deterministic_across_instances_orders_and_sizes():
    a = EmbeddedShapes("train", size=6, seed=3)
    b = EmbeddedShapes("train", size=100, seed=3)   # a larger set starts with the same images
    for i in (5, 0, 2):                               # any order
        xa, ta = a[i]
        xb, tb = b[i]
        assert torch.equal(xa, xb) and _same_target(ta, tb)
        xa2, ta2 = a[i]
        assert torch.equal(xa, xa2) and _same_target(ta, ta2)
    assert not torch.equal(a[0][0], EmbeddedShapes("train", size=1, seed=4)[0][0])
    assert not torch.equal(a[0][0], EmbeddedShapes("test", size=1, seed=3)[0][0])


def test_known_bytes():
    # Guards the "same images on every machine" promise against accidental changes of the
    # drawing code: a digest of the first test images' bytes and annotations.
    import hashlib
    data = EmbeddedShapes("test", size=4)
    h = hashlib.sha256()
    for i in range(4):
        image, ann = data.raw(i)
        h.update(image.tobytes())
        h.update(ann["labels"].tobytes())
        h.update(ann["masks"].tobytes())
    assert h.hexdigest()[:16] == KNOWN_DIGEST


KNOWN_DIGEST = "e5b6396ab29dd366"


def test_item_format(test_items):
    x, t = test_items[0]
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    k = len(t["labels"])
    assert 1 <= k <= 3
    assert t["boxes"].shape == (k, 4) and t["boxes"].dtype == torch.float32
    assert t["masks"].shape == (k, IMAGE_SIZE, IMAGE_SIZE) and t["masks"].dtype == torch.bool
    assert t["labels"].dtype == torch.int64 and t["difficult"].dtype == torch.bool
    assert t["image_size"] == (IMAGE_SIZE, IMAGE_SIZE)
    raw = EmbeddedShapes("test", size=1, normalized=False)[0][0]
    assert 0 <= raw.min() and raw.max() <= 1
    assert torch.allclose(normalize(raw), x, atol=1e-6)
    assert torch.allclose(denormalize(x), raw, atol=1e-6)
    images, targets = embedded_collate(test_items[:3])
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and len(targets) == 3


def test_targets_consistent_with_masks(test_items):
    for _, t in test_items:
        masks = t["masks"]
        assert masks.flatten(1).any(1).all(), "every object is visible"
        assert torch.equal(t["boxes"], masks_to_boxes(masks))
        assert not (masks.sum(0) > 1).any(), "visible parts do not overlap"
        assert torch.equal(t["class_ids"], torch.unique(t["labels"]))
        hot = torch.zeros(NUM_CLASSES)
        hot[t["labels"]] = 1
        assert torch.equal(t["multi_hot"], hot)
        assert ((0 <= t["labels"]) & (t["labels"] < NUM_CLASSES)).all()


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """Box-to-box gap (Chebyshev), from the masks, written independently of the module."""
    ya, xa = np.nonzero(a)
    yb, xb = np.nonzero(b)
    dx = max(xa.min() - xb.max(), xb.min() - xa.max(), 0)
    dy = max(ya.min() - yb.max(), yb.min() - ya.max(), 0)
    return max(dx, dy)


def test_difficult_flags_as_defined():
    data = EmbeddedShapes("test", size=48)
    quarter = IMAGE_SIZE * IMAGE_SIZE / 4
    beside = IMAGE_SIZE / 16
    seen = 0
    for i in range(len(data)):
        _, t = data[i]
        _, ann = data.raw(i)
        masks, labels = ann["masks"], ann["labels"]
        expected = []
        for k in range(len(labels)):
            area = masks[k].sum()
            near = [masks[j] for j in range(len(labels))
                    if labels[j] != labels[k] and masks[j].sum() >= area]
            near += [d for d in ann["distractor_masks"] if d.sum() >= area]
            expected.append(bool(area < quarter and any(_gap(masks[k], m) <= beside
                                                        for m in near)))
        assert t["difficult"].tolist() == expected
        for c, flag in zip(t["class_ids"].tolist(), t["class_difficult"].tolist()):
            mine = labels == c
            want = bool(np.any(np.array(expected)[mine]) and masks[mine].any(0).sum() < quarter)
            assert flag == want
            seen += flag
    assert seen > 0


def test_class_balance():
    data = EmbeddedShapes("train", size=400)
    counts = np.zeros(NUM_CLASSES)
    difficult = np.zeros(NUM_CLASSES)
    for i in range(len(data)):
        _, ann = data.raw(i)
        counts[np.unique(ann["labels"])] += 1
    mean = counts.mean()
    assert (counts > 0.7 * mean).all() and (counts < 1.3 * mean).all(), counts
    # and every class has difficult cases in the test split
    test = EmbeddedShapes("test", size=200)
    for i in range(len(test)):
        _, t = test[i]
        difficult[t["class_ids"][t["class_difficult"]]] += 1
    assert (difficult >= 5).all(), difficult


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        EmbeddedShapes("val")
    with pytest.raises(ValueError, match="size"):
        EmbeddedShapes("test", size=-1)
    with pytest.raises(ValueError, match="seed"):
        EmbeddedShapes("test", seed=1.5)
    with pytest.raises(TypeError, match="transform"):
        EmbeddedShapes("test", transform=3)
    with pytest.raises(IndexError):
        EmbeddedShapes("test", size=2)[2]
    with pytest.raises(TypeError, match="index"):
        EmbeddedShapes("test", size=2)["0"]


def test_transform_and_classes():
    data = EmbeddedShapes("test", size=1, transform=lambda x: x * 0)
    assert data[0][0].abs().sum() == 0
    assert len(EMBEDDED_CLASSES) == NUM_CLASSES == len(set(EMBEDDED_CLASSES))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_models_reproduce_stored_accuracy(models, test_items):
    images, targets = embedded_collate(test_items)
    truth = torch.stack([t["multi_hot"] for t in targets]) > 0
    for name, model in models.items():
        assert not model.training
        with torch.no_grad():
            scores = model(images)
        acc = set_accuracy(scores, truth)
        assert acc >= 0.9, (name, acc)
        assert abs(acc - EMBEDDED_ACCURACY[name]["set_accuracy_64"]) <= 1 / 64 + 1e-9, (name, acc)


def test_layer_names_exist(models):
    for name, model in models.items():
        modules = dict(model.named_modules())
        for method, layer in EMBEDDED_LAYERS[name].items():
            assert layer in modules, (name, method, layer)


def test_weights_checked(tmp_path):
    for name in EMBEDDED_MODELS:
        assert os.path.getsize(weights_path(name)) < 3_000_000
    path = weights_path("embedded-vgg")
    with pytest.raises(WeightsError, match="SHA-256"):
        load_embedded_model("embedded-vgg", path=path, sha256="0" * 64)
    corrupt = tmp_path / "w.pt"
    corrupt.write_bytes(open(path, "rb").read()[:-10])
    with pytest.raises(WeightsError, match="corrupt"):
        load_embedded_model("embedded-vgg", path=str(corrupt),
                            sha256=EMBEDDED_WEIGHTS["embedded-vgg"][1])
    with pytest.raises(WeightsError, match="not found"):
        load_embedded_model("embedded-vgg", path=str(tmp_path / "missing.pt"),
                            sha256=EMBEDDED_WEIGHTS["embedded-vgg"][1])
    with pytest.raises(ValueError, match="name"):
        load_embedded_model("vgg16")
    with pytest.raises(TypeError, match="pretrained"):
        load_embedded_model("embedded-vgg", pretrained="yes")
    random = load_embedded_model("embedded-resnet", pretrained=False)
    assert not random.training


# ---------------------------------------------------------------------------------------------
# Example data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
def test_get_example_data(arch):
    with pytest.warns(UserWarning, match="embedded"):
        model, x, c1, c2 = get_example_data(arch)
    assert x.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert c1 != c2
    _, t = EmbeddedShapes("test", size=EXAMPLE_INDEX + 1)[EXAMPLE_INDEX]
    assert {c1, c2} <= set(t["class_ids"].tolist())
    with torch.no_grad():
        top2 = model(x)[0].topk(2).indices.tolist()
    assert top2 == [c1, c2]
    name = "embedded-vgg" if arch.startswith("vgg") else "embedded-resnet"
    assert type(model) is type(load_embedded_model(name, pretrained=False))


def test_get_example_data_direct_and_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_example_data("embedded-resnet", shape=IMAGE_SIZE)
    with pytest.raises(ValueError, match="arch"):
        get_example_data("not-a-model")
    with pytest.raises(TypeError, match="arch"):
        get_example_data(16)
    with pytest.raises(TypeError, match="shape"):
        get_example_data("embedded-vgg", shape="224")
    with pytest.raises(ValueError, match="shape"):
        get_example_data("embedded-vgg", shape=0)


def test_weights_of_another_architecture_are_a_weights_error(tmp_path):
    import hashlib

    from torchray_like.benchmark.embedded_models import EmbeddedVGG
    path = tmp_path / "embedded_vgg.pt"
    torch.save(EmbeddedVGG(hidden=64).state_dict(), path)      # an older head width
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="do not fit the embedded-vgg architecture"):
        load_embedded_model("embedded-vgg", path=str(path), sha256=digest)
    path.write_bytes(b"not a state dict")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="do not fit"):
        load_embedded_model("embedded-vgg", path=str(path), sha256=digest)
