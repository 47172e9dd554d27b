"""The embedded benchmark: data set, shipped models and example data (fast, a few seconds)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes

from torchray_like.benchmark.embedded_data import (
    EMBEDDED_CLASSES,
    IMAGE_SIZE,
    NUM_CLASSES,
    EmbeddedShapes,
    denormalize,
    embedded_collate,
    normalize,
)
from torchray_like.benchmark.embedded_models import (
    EMBEDDED_ACCURACY,
    EMBEDDED_LAYERS,
    EMBEDDED_MODELS,
    EMBEDDED_WEIGHTS,
    WeightsError,
    load_embedded_model,
    set_accuracy,
    weights_path,
)
from torchray_like.benchmark.example_data import EXAMPLE_INDICES, get_example_data


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
        # The embedded transformer is far weaker (see EMBEDDED_ACCURACY and test_embedded_vit).
        assert acc >= (0.6 if name == "embedded-vit" else 0.9), (name, acc)
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
def test_get_example_data(arch, tmp_path, monkeypatch):
    # An empty torch hub cache: the offline route, whatever this machine has cached.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.warns(UserWarning, match="embedded"):
        model, x, c1, c2 = get_example_data(arch)
    assert x.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert c1 != c2
    name = "embedded-vgg16" if arch == "vgg16" else "embedded-resnet"
    index = EXAMPLE_INDICES[name]
    _, t = EmbeddedShapes("test", size=index + 1)[index]
    assert {c1, c2} <= set(t["class_ids"].tolist())
    with torch.no_grad():
        top2 = model(x)[0].topk(2).indices.tolist()
    assert top2 == [c1, c2]
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


# ---------------------------------------------------------------------------------------------
# The benchmarks' settings table and command-line plumbing


def test_settings_table_covers_the_benchmark_models():
    """The table holds the embedded models' layers, the published VGG16 / ResNet50 layers and
    the demo's network, and every layer exists in the model it names."""
    import torchvision

    from torchray_like.benchmark.settings import MODELS, torchvision_layers
    from torchray_like.demo import ColourNet

    for name in EMBEDDED_MODELS:
        assert MODELS[name].layers() == EMBEDDED_LAYERS[name]
        assert MODELS[name].input_size == IMAGE_SIZE and MODELS[name].multilabel
    assert MODELS["vgg16"].layers() == {"grad_cam": "features.29",
                                        "excitation_backprop": "features.23",
                                        "contrast": "classifier.4"}
    assert MODELS["resnet50"].layers() == {"grad_cam": "layer4", "excitation_backprop": "layer3",
                                           "contrast": "avgpool"}
    networks = {"vgg16": torchvision.models.vgg16(), "resnet50": torchvision.models.resnet50(),
                "colournet": ColourNet(), **{n: build_embedded(n) for n in EMBEDDED_MODELS}}
    for name, network in networks.items():
        names = dict(network.named_modules())
        assert all(layer in names for layer in MODELS[name].layers().values()), name
    # The rule gives the same layers on the torchvision networks themselves.
    assert torchvision_layers(networks["vgg16"]) == MODELS["vgg16"].layers()
    assert torchvision_layers(networks["resnet50"]) == MODELS["resnet50"].layers()


def build_embedded(name):
    from torchray_like.benchmark.embedded_models import build_embedded_model
    return build_embedded_model(name)


def test_method_options_merge_model_benchmark_and_overrides():
    from torchray_like.benchmark.settings import BENCHMARKS, method_options

    assert method_options("grad_cam", "embedded-vgg") == {"saliency_layer": "features.14"}
    assert method_options("contrastive_excitation_backprop", "embedded-resnet") == {
        "saliency_layer": "layer2", "contrast_layer": "layer3"}
    assert method_options("gradient", "vgg16", "pointing_game") == {"smooth": 0.02}
    assert method_options("gradient", "vgg16", "deletion_insertion") == {}
    rise = method_options("rise", "embedded-vgg", "deletion_insertion",
                          overrides={"num_masks": 10, "batch_size": None})
    assert rise == {"score": "sigmoid", "num_masks": 10, "num_cells": 7, "batch_size": 64}
    assert "score" not in method_options("rise", "resnet50", "paper")      # ImageNet: softmax
    assert method_options("rise", "resnet50", "pointing_game_paper")["score"] == "sigmoid"
    # Extremal perturbation's geometry scales with the input side (the paper's at 224 px).
    ep = method_options("extremal_perturbation", "vgg16", "paper")
    assert (ep["step"], ep["sigma"], ep["max_blur"]) == (7, 21.0, 20.0)
    assert ep["areas"] == [0.025, 0.05, 0.1, 0.2] and ep["max_iter"] == 800
    ep = method_options("extremal_perturbation", "embedded-vgg", "paper", input_size=112)
    assert (ep["step"], ep["sigma"], ep["max_blur"]) == (4, 10.5, 10.0)
    # Fresh lists: changing the returned options never changes the table.
    ep["areas"].append(0.5)
    assert BENCHMARKS["paper"]["extremal_perturbation"]["areas"] == [0.025, 0.05, 0.1, 0.2]


def test_method_options_of_other_torchvision_networks():
    import torchvision

    from torchray_like.benchmark.settings import method_options

    vgg11 = torchvision.models.vgg11()
    assert method_options("contrastive_excitation_backprop", "vgg11", network=vgg11) == {
        "saliency_layer": "features.15", "contrast_layer": "classifier.4"}
    resnet18 = torchvision.models.resnet18()
    assert method_options("grad_cam", "resnet18", network=resnet18) == {
        "saliency_layer": "layer4"}


@pytest.mark.parametrize("call, message", [
    (lambda f: f("nope", "embedded-vgg"), "unknown method 'nope'; choose from gradient"),
    (lambda f: f("rise", "embedded-vgg", "fast"), "unknown benchmark 'fast'; choose from paper"),
    (lambda f: f("grad_cam", "resnet18"), "no benchmark settings for model 'resnet18'.*"
                                          "pass the network"),
    (lambda f: f("grad_cam", "mlp", network=torch.nn.Linear(2, 2)),
     "no benchmark settings for a Linear.*saliency_layer"),
    (lambda f: f("rise", "embedded-vgg", input_size=0), "input_size must be a positive int"),
    (lambda f: f("rise", "embedded-vgg", input_size=True), "input_size must be a positive int"),
])
def test_method_options_errors_say_what_to_do(call, message):
    from torchray_like.benchmark.settings import method_options

    with pytest.raises(ValueError, match=message):
        call(method_options)


@pytest.mark.parametrize("name", ["embedded-resnet", "embedded-vit"])
def test_every_method_runs_with_the_table_options_and_gives_one_map_per_sample(name):
    """The contract the benchmarks rely on: METHODS[m](model, x, target, **options) is
    (N, 1, *spatial) for every method with the table's options (here with small counts),
    except the methods the settings say do not apply to the model."""
    from torchray_like.attribution.registry import METHODS
    from torchray_like.benchmark.settings import not_applicable, options_table

    model = build_embedded(name).eval()
    if name == "embedded-vit":  # torchvision starts the head at zero: every score would be 0,
        with torch.no_grad():   # which Ablation-CAM's relative drop (y - y_k) / |y| refuses
            model.heads.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    x = EmbeddedShapes("test", size=2)[0][0][None].repeat(2, 1, 1, 1)
    methods = [m for m in METHODS if not_applicable(name, m) is None]
    assert len(methods) >= 19
    table = options_table(methods, name, "speed",
                          overrides={"rise": {"num_masks": 8}, "extremal_perturbation": {
                              "max_iter": 2}})
    for method, options in table.items():
        if method in ("rise", "extremal_perturbation"):
            options = dict(options, generator=0, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = METHODS[method](model, x, [0, 3], **options)
        assert out.dim() == 4 and out.shape[:2] == (2, 1), (method, out.shape)
        assert out.dtype == torch.float32 and bool(torch.isfinite(out).all()), method


def test_name_list_parsing():
    from torchray_like.benchmark.embedded_cli import name_list

    choices = ("a", "b", "c")
    assert name_list(["c,a"], choices, "--x") == ["a", "c"]          # the table's order
    assert name_list(["c", "a,"], choices, "--x") == ["a", "c"]
    assert name_list(["all"], choices, "--x") == ["a", "b", "c"]
    assert name_list(["z,y"], None, "--x") == ["z", "y"]              # free names keep order
    with pytest.raises(ValueError, match=r"--x: unknown name\(s\) d; choose from a, b, c"):
        name_list(["a,d"], choices, "--x")
    with pytest.raises(ValueError, match=r"--x: unknown name\(s\) \(none given\)"):
        name_list([","], choices, "--x")
    with pytest.raises(ValueError, match="--x: give distinct names, got z, z"):
        name_list(["z", "z"], None, "--x")


def test_weights_flag_is_a_file_per_model(tmp_path):
    """--weights is a state-dict FILE (or random / DEFAULT), one for all models or one per
    model; what the settings record about each."""
    import argparse

    from torchray_like.benchmark.embedded_cli import (
        check_weights,
        load_benchmark_model,
        split_weights,
        weights_label,
    )

    models = ["embedded-vgg", "embedded-resnet"]   # the two CNNs (the list has grown)
    assert split_weights(None, models) == {m: None for m in models}
    assert split_weights("random", models) == {m: "random" for m in models}
    assert split_weights("a.pt,", models) == {"embedded-vgg": "a.pt", "embedded-resnet": None}
    with pytest.raises(ValueError, match=r"--weights: give one value or one per model \(2"):
        split_weights("a,b,c", models)
    # A file written by train_embedded.py --out loads, and its digest is recorded.
    path = tmp_path / "vgg.pt"
    torch.save(build_embedded("embedded-vgg").state_dict(), path)
    model, fingerprint = load_benchmark_model("embedded-vgg", str(path))
    assert isinstance(model, torch.nn.Module) and not model.training
    args = argparse.Namespace(weights=f"{path},random", models=models, seed=3)
    label = weights_label(args)
    assert label["embedded-vgg"] == fingerprint and fingerprint.startswith("sha256:")
    assert label["embedded-resnet"] == "random:3"
    # Random weights are seeded and leave the global RNG alone.
    state = torch.get_rng_state()
    a, _ = load_benchmark_model("embedded-resnet", "random", 3)
    b, _ = load_benchmark_model("embedded-resnet", "random", 3)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="no such weights file"):
        load_benchmark_model("embedded-vgg", str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match="vgg16 needs --weights FILE"):
        load_benchmark_model("vgg16", None)
    parser = argparse.ArgumentParser(prog="x")
    for text, message in ((str(tmp_path / "none.pt"), "no such file"),
                          ("DEFAULT", "DEFAULT is for torchvision models")):
        with pytest.raises(SystemExit):
            check_weights(parser, argparse.Namespace(weights=text), models)


def test_demo_uses_the_table_and_restores_the_thread_count(capsys):
    from torchray_like import demo

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        misses = demo.run(methods=["grad_cam", "excitation_backprop"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert misses == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 2 and all(line.count("hit") == 2 for line in lines)
    maps = demo.method_maps("extremal_perturbation", demo.ColourNet().eval(), demo.demo_image())
    assert maps.shape == (2, demo.SIZE, demo.SIZE) and maps.dtype == torch.float32
    assert not hasattr(demo, "explain")


def test_write_csv_makes_the_folder_and_keeps_the_columns(tmp_path):
    import csv

    from torchray_like.benchmark.embedded_cli import write_csv

    path = write_csv(str(tmp_path / "new" / "t.csv"), [{"model": "a", "auc": 0.5},
                                                       {"model": "b", "auc": 0.25}])
    with open(path) as f:
        assert list(csv.DictReader(f)) == [{"model": "a", "auc": "0.5"},
                                           {"model": "b", "auc": "0.25"}]
    empty = write_csv(str(tmp_path / "e.csv"), [])
    assert open(empty).read().strip() == "model,method"
