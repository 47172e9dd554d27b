"""TorchRay's offline helpers called as black boxes beside ours, on the same small inputs.

Every function of TorchRay 1.0.0.2 that runs offline (utils, the ``common`` helpers, the
``gradient_to_*`` functions, extremal-perturbation rewards / perturbations / mask generator,
excitation-backprop helpers, RISE, the pointing game, the models' transforms and surgery, COCO
and image-folder data sets written to ``tmp_path``, the plotting helpers under Agg) is called
on TorchRay (``/tmp/torchray_pkg`` or ``$TORCHRAY_PATH``; every test skipped without it) and on
``torchray_like``: values, shapes, dtypes and types agree, or the difference is a key of
:data:`BEHAVIOUR_DIFFERENCES` (name -> reason), marked ``# key`` where a test asserts that we
are right, and loud where TorchRay is silently wrong.  The surface itself (names,
signatures) is swept in ``test_torchray_api_sweep``.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from .test_datasets import make_coco, make_voc
from .test_torchray_api_sweep import torchray_on_path, write_image_folder

BEHAVIOUR_DIFFERENCES = {
    "utils.is_url": "file:// URLs count as URLs (imread reads them); TorchRay: False",
    "utils.imread resize": "works; TorchRay's uses Image.ANTIALIAS, gone from Pillow 10",
    "utils.get_config": "our keys (root_dir, voc_dir, ...; no MongoDB section)",
    "utils.imsmooth padding": "the documented size, H + 2 * padding (strided: floored / s); "
                              "TorchRay's output with padding > 0 has 2 * padding more",
    "utils.imarraysc spacing": "a border of `spacing` around each tile, as TorchRay's docstring "
                               "says; TorchRay's code leaves `spacing` between tiles only",
    "common.resize_saliency nearest": "works; TorchRay raises (align_corners with 'nearest')",
    "common.get_module unknown": "ValueError naming the modules; TorchRay returns None silently",
    "common.attach_debug_probes": "no probe on the root module (its output is the model's), and "
                                  "an empty dict instead of None when debug is False",
    "common.errors": "ValueError naming the argument where TorchRay raises IndexError, "
                     "AttributeError or RuntimeError (class out of range, no .grad)",
    "extremal.contrastive_reward": "(N,) rewards; TorchRay broadcasts (N,) - (N, 1) to (N, N)",
    "extremal.Perturbation blur": "borders replicated (TorchRay pads with zeros, darkening the "
                                  "border of blurred copies); equal away from the border",
    "extremal.Perturbation.pyramid": "(N, levels, C, H, W) for a batch; TorchRay: (levels, C, H, "
                                     "W) for one image",
    "extremal.MaskGenerator": "its own grid (shape_in, no shape_mid/radius); 'sigmoid' pooling "
                              "refused by name; use generator.shape_in for the parameters",
    "excitation.update_resnet": "returns the model unchanged: the rule context sees the "
                                "residual '+' itself, no EltwiseSum modules needed",
    "rise.target": "an int target gives (N, 1, H, W); TorchRay ignores target and returns all "
                   "classes; TorchRay's rise_class fails on an int target (len() of a 0-d tensor)",
    "rise.values": "another mask draw for the same seed (maps agree in distribution only)",
    "pointing_game.accuracy": "a float over the classes seen, NaN with nothing scored (TorchRay: "
                              "a 0-d tensor over all classes, unseen ones as 0); "
                              "counts are int64; str() is a table; a point outside the image is "
                              "a ValueError (TorchRay: a silent miss)",
    "models.get_transform": "'voc'/'coco' use ImageNet statistics like 'imagenet' (our heads sit "
                            "on torchvision backbones); TorchRay applies Caffe preprocessing "
                            "(0..255, mean subtracted, no std) for its Caffe-converted weights; "
                            "an unknown dataset is a ValueError (TorchRay: silently Caffe)",
    "models.replace_module": "in place, returning the model; TorchRay returns a copy whose "
                             "modules off the path are shared with the unchanged original",
    "datasets.VOCDetection": "TorchRay's fails on current torchvision (year=None passed on)",
    "datasets.COCO_CLASSES": "COCO's own names ('motorcycle'); TorchRay uses VOC-style names",
    "datasets.IMAGENET_CLASSES": "torchvision's short names; TorchRay: WordNet synonyms + '\\n'",
    "datasets.coco_as_class_ids": "sorted unique ids; TorchRay: annotation order with repeats",
    "datasets.limiter": "0 and negative limiters refused (TorchRay: 0 = all, -1 = all but last)",
    "resample offset": "TorchRay's numbers; a non-zero offset warns that TorchRay's code maps "
                       "u' = s*u - t while its docstring says + t",
    "benchmark.plot_example": "returns the Figure (TorchRay: None) with a colour bar; titles "
                              "name the category id, not an ImageNet name for every data set",
}


@pytest.fixture(scope="module")
def tr():
    """TorchRay's modules by path under ``torchray`` (the world restored afterwards)."""
    with torchray_on_path():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchRay's deprecation notices on import
            modules_by_path = {m: importlib.import_module("torchray." + m) for m in (
                "utils", "attribution.common", "attribution.grad_cam",
                "attribution.linear_approx", "attribution.excitation_backprop",
                "attribution.extremal_perturbation", "attribution.rise", "benchmark",
                "benchmark.pointing_game", "benchmark.models", "benchmark.datasets")}
        yield modules_by_path


def ours(module: str):
    return importlib.import_module("torchray_like." + module)


def same(a, b, atol=1e-6) -> bool:
    """Equal type, shape, dtype and values (tensors, arrays, numbers, sequences)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and torch.allclose(a.double(), b.double(), atol=atol, equal_nan=True))
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
                and np.allclose(a, b, atol=atol))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def test_every_behaviour_difference_has_a_reason_and_a_test():
    source = Path(__file__).read_text()
    tests = source[source.index("def test_utils_against_torchray"):]
    for key, reason in BEHAVIOUR_DIFFERENCES.items():
        assert isinstance(reason, str) and len(reason) > 15 and f"# {key}" in tests, key


def test_utils_against_torchray(tr, tmp_path):
    t, o = tr["utils"], ours("utils")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 10, generator=g)
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 7, 3), np.uint8))
    for call in (lambda m: m.im_to_numpy(x[0]), lambda m: m.tensor_to_im(x),
                 lambda m: m.pil_to_tensor(pil), lambda m: m.pil_to_tensor(pil.convert("L")),
                 lambda m: m.imsmooth(x, 1.5), lambda m: m.imsmooth(x, 1.0, stride=2),
                 lambda m: m.imsmooth(x, 1.0, padding=2, padding_mode="replicate"),
                 lambda m: m.resample(x, (16, 20), torch.tensor([[2.0, 0.0], [2.0, 0.0]])),
                 lambda m: (m.is_url("http://a.b/c"), m.is_url("/tmp/x")),
                 lambda m: (m.get_device(), m.get_device(-1))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert same(call(t), call(o), atol=1e-5)
    assert (t.is_url("file:///x"), o.is_url("file:///x")) == (False, True)  # utils.is_url
    pil.save(tmp_path / "a.png")
    pil.convert("L").save(tmp_path / "g.png")
    for name, kwargs in [("a.png", {}), ("g.png", {}), ("g.png", {"to_rgb": True})]:
        assert same(t.imread(str(tmp_path / name), **kwargs), o.imread(tmp_path / name, **kwargs))
    with pytest.raises(AttributeError, match="ANTIALIAS"):  # utils.imread resize
        t.imread(str(tmp_path / "a.png"), resize=(4, 3))
    assert o.imread(tmp_path / "a.png", resize=(4, 3)).shape == (3, 3, 4)  # (width, height)
    assert same(t.imsc(pil, quiet=True)[0], o.imsc(pil, quiet=True)[0])
    assert "mongo" in t.get_config() and "mongo" not in o.get_config()  # utils.get_config
    # utils.imsmooth padding: the documented H + 2 * padding rows
    assert o.imsmooth(x, 1.0, padding=1).shape == (2, 3, 10, 12)
    assert t.imsmooth(x, 1.0, padding=1).shape == (2, 3, 12, 14)
    with pytest.warns(UserWarning, match="docstring says"):  # resample offset
        shifted = o.resample(x, (8, 10), torch.tensor([[0.5, 1.0], [0.5, 0.0]]))
    assert same(shifted, t.resample(x, (8, 10), torch.tensor([[0.5, 1.0], [0.5, 0.0]])))


def test_plotting_helpers_against_torchray(tr):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    shown = []
    for m in (tr["utils"], ours("utils")):
        plt.close("all")
        image, none = m.imsc(x[0], quiet=True)
        tiles, _ = m.imarraysc(x.expand(5, 3, 16, 20), quiet=True)
        _, handle = m.imsc(x[0, :1], lim=[0.2, 0.8])
        shown.append((image, tiles, none, type(handle).__name__, len(plt.gcf().axes)))
        plt.close("all")
    assert same(shown[0][0], shown[1][0]) and same(shown[0][1], shown[1][1])
    assert shown[0][2:] == shown[1][2:] == (None, "AxesImage", 1)
    spaced = [m.imarraysc(x.expand(4, 3, 16, 20), spacing=1, quiet=True)[0].shape
              for m in (tr["utils"], ours("utils"))]  # utils.imarraysc spacing
    assert spaced == [(3, 33, 41), (3, 36, 44)]
    structure = []
    for m in (tr["benchmark"], ours("benchmark")):
        plt.close("all")
        result = m.plot_example(x, x[:, :1], "gradient", 3, show_plot=False)
        structure.append((type(result).__name__, [len(a.images) for a in plt.gcf().axes],
                          plt.gcf().axes[0].get_title()))
        plt.close("all")
    # benchmark.plot_example: ours adds a colour-bar axis and returns the Figure
    assert structure == [("NoneType", [1, 1], "input image"),
                         ("Figure", [1, 1, 0], "input image")]


def test_common_helpers_against_torchray(tr):
    t, o = tr["attribution.common"], ours("attribution.common")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 3, 8, 10, generator=g), torch.randn(2, 5, generator=g)
    y4 = torch.randn(1, 5, 3, 3, generator=g)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1)))
    for call in (lambda m: m.resize_saliency(x, x[:, :1, :4, :5], (8, 10), "bilinear"),
                 lambda m: m.resize_saliency(x, x[:, :1, :4, :5], True, "bilinear"),
                 lambda m: m.resize_saliency(x, x[:, :1, :4, :5], False, "bilinear"),
                 lambda m: m.get_backward_gradient(y, 3),
                 lambda m: m.get_backward_gradient(y, [1, 2]),
                 lambda m: m.get_backward_gradient(y, torch.tensor([1, 2])),
                 lambda m: m.get_backward_gradient(y, torch.ones(2, 5)),
                 lambda m: m.get_pointing_gradient(y4, 2),
                 lambda m: m.get_pointing_gradient(y4, 2, normalize=False),
                 lambda m: (m.get_module(net, "1.0") is net[1][0], m.get_module(net, net[0])
                            is net[0], m.get_module(net, "") is net)):
        assert same(call(t), call(o))
    leaf = torch.randn(1, 4, 5, 5, generator=g, requires_grad=True)
    (leaf * torch.randn(1, 4, 5, 5, generator=g)).sum().backward()
    pairs = [(t.gradient_to_saliency, o.gradient_to_saliency)] + [
        (getattr(tr[f"attribution.{mod}"], fn), getattr(ours(f"attribution.{mod}"), fn))
        for mod, fn in GRADIENT_TO]
    for theirs_fn, our_fn in pairs:
        assert same(theirs_fn(leaf), our_fn(leaf)) and our_fn(leaf).shape == (1, 1, 5, 5)
    with pytest.raises(ValueError, match="out of range"):  # common.errors
        o.get_backward_gradient(y, 7)
    with pytest.raises(ValueError, match="no .grad"):
        o.gradient_to_saliency(torch.zeros(1, 2, 3, 3))
    assert t.get_module(net, "7") is None  # common.get_module unknown
    with pytest.raises(ValueError, match="no module named '7'"):
        o.get_module(net, "7")
    nearest = o.resize_saliency(x, x[:, :1, :4, :5], (10, 8), "nearest")  # size is (W, H)
    assert torch.equal(nearest, x[:, :1, :4, :5].repeat_interleave(2, 2).repeat_interleave(2, 3))
    with pytest.raises(ValueError, match="align_corners"):  # common.resize_saliency nearest
        t.resize_saliency(x, x[:, :1, :4, :5], (10, 8), "nearest")
    probes = [m.attach_debug_probes(net, debug=True) for m in (t, o)]  # common.attach_debug_probes
    assert list(probes[0]) == ["", *probes[1]] and t.attach_debug_probes(net) is None
    for p in [*probes[0].values(), *probes[1].values()]:
        p.remove()


GRADIENT_TO = [("grad_cam", "gradient_to_grad_cam_saliency"),
               ("linear_approx", "gradient_to_linear_approx_saliency"),
               ("excitation_backprop", "gradient_to_excitation_backprop_saliency"),
               ("excitation_backprop", "gradient_to_contrastive_excitation_backprop_saliency")]


def test_extremal_helpers_against_torchray(tr):
    t, o = tr["attribution.extremal_perturbation"], ours("attribution.extremal_perturbation")
    g = torch.Generator().manual_seed(0)
    scores, x = torch.randn(4, 5, generator=g), torch.rand(1, 3, 40, 40, generator=g)
    mask = torch.rand(2, 1, 40, 40, generator=g)
    for variant in ("preserve", "delete", "dual"):
        assert same(t.simple_reward(scores, 3, variant), o.simple_reward(scores, 3, variant))
        theirs = t.contrastive_reward(scores, 3, variant)  # extremal.contrastive_reward
        assert same(theirs.diagonal() if theirs.dim() == 2 else theirs,
                    o.contrastive_reward(scores, 3, variant).view(-1))
    with pytest.raises(ValueError, match="variant must be one of"):
        o.simple_reward(scores, 3, "sideways")
    fade = [m.Perturbation(x, num_levels=4, type="fade") for m in (t, o)]
    assert same(fade[0].pyramid, fade[1].pyramid[0])  # extremal.Perturbation.pyramid
    assert same(fade[0].apply(mask), fade[1].apply(mask))
    blur = [m.Perturbation(x, num_levels=3, max_blur=2) for m in (t, o)]
    inner = (..., slice(9, -9), slice(9, -9))  # beyond the 4-sigma kernel radius (8 px)
    assert same(blur[0].pyramid[inner], blur[1].pyramid[0][inner])  # extremal.Perturbation blur
    assert not torch.allclose(blur[0].pyramid, blur[1].pyramid[0], atol=1e-3)
    generators = [m.MaskGenerator((16, 20), 4, 3) for m in (t, o)]  # extremal.MaskGenerator
    for generator in generators:
        masks = generator.generate(torch.rand(2, 1, *generator.shape_in, generator=g))
        assert isinstance(masks, tuple) and masks[0].shape == (2, 1, 16, 20)
    with pytest.raises(ValueError, match="sigmoid"):
        o.MaskGenerator((16, 20), 4, 3, pooling_method="sigmoid")


def test_excitation_helpers_and_rise_against_torchray(tr):
    import torchvision

    t, o = tr["attribution.excitation_backprop"], ours("attribution.excitation_backprop")
    a, b = torch.rand(2, 3), torch.rand(2, 3)
    assert same(t.EltwiseSum()(a, b), o.EltwiseSum()(a, b))
    assert same(t.EltwiseSumFunction.apply(a, b), o.EltwiseSumFunction.apply(a, b))
    resnets = [torchvision.models.resnet18(num_classes=3) for _ in range(2)]
    assert t.update_resnet(resnets[0]) is resnets[0] and o.update_resnet(resnets[1]) is resnets[1]
    kinds = [sum(type(m).__name__ == "EltwiseSum" for m in r.modules()) for r in resnets]
    assert kinds == [8, 0]  # excitation.update_resnet
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).eval()
    x = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    t_rise, o_rise = tr["attribution.rise"], ours("attribution.rise")
    every = [m.rise(net, x, num_masks=64, batch_size=16) for m in (t_rise, o_rise)]
    assert every[0].shape == every[1].shape == (1, 4, 16, 20)  # rise.values: other draws
    assert every[0].dtype == every[1].dtype == torch.float32
    assert t_rise.rise(net, x, target=2, num_masks=64).shape == (1, 4, 16, 20)  # rise.target
    one = o_rise.rise(net, x, target=2, num_masks=64, batch_size=16)
    assert torch.allclose(one, every[1][:, 2:3], atol=1e-6)
    with pytest.raises(TypeError, match="len"):
        t_rise.rise_class(net, x, target=2, num_masks=64)
    assert o_rise.rise_class(net, x, target=2, num_masks=64, batch_size=16).shape == \
        (1, 1, 16, 20)


def test_pointing_game_against_torchray(tr):
    t, o = tr["benchmark.pointing_game"], ours("benchmark.pointing_game")
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[5:8, 10:14] = True
    games = [m.PointingGame(3, tolerance=3) for m in (t, o)]
    for point in [(1, 1), (12, 6), (29, 19), (0, 0), (16, 9), (17, 9)]:
        assert games[0].evaluate(mask, point) == games[1].evaluate(mask, point), point
    for hit, class_id in [(1, 0), (0, 0), (-1, 1), (1, 2)]:
        for game in games:
            game.aggregate(hit, class_id)
    assert same(games[0].class_accuracies, games[1].class_accuracies)
    assert float(games[0].accuracy) == pytest.approx(games[1].accuracy) == 2 / 3
    empty = [m.PointingGame(2) for m in (t, o)]  # pointing_game.accuracy
    assert isinstance(empty[0].accuracy, torch.Tensor) and float(empty[0].accuracy) == 0.0
    assert isinstance(empty[1].accuracy, float) and np.isnan(empty[1].accuracy)
    assert games[1].hits.dtype == torch.int64
    assert games[0].evaluate(mask, (-1, -1)) == -1
    with pytest.raises(ValueError, match="lies outside the image"):
        games[1].evaluate(mask, (-1, -1))


def test_pointing_game_benchmark_torchray_loop(tr, tmp_path):
    """TorchRay's loop, evaluate then aggregate: the same counts (ours counts in evaluate)."""
    from torchray_like.attribution.common import TorchRayDifferenceWarning

    root = make_coco(tmp_path)
    benches = []
    for d, p in ((tr["benchmark.datasets"], tr["benchmark.pointing_game"]),
                 (ours("benchmark.datasets"), ours("benchmark.pointing_game"))):
        dataset = d.get_dataset("coco", "val2014", str(root), str(root / "annotations"))
        bench = p.PointingGameBenchmark(dataset, tolerance=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for k in range(len(dataset)):
                label = dataset[k][1]
                for class_id in sorted(set(dataset.as_class_ids(label))):
                    for point in [(20, 20), (1, 1), (45, 15), (0, 5)]:
                        bench.aggregate(bench.evaluate(label, class_id, point), class_id)
        benches.append((bench, [w for w in caught if w.category is TorchRayDifferenceWarning]))
    (theirs, _), (mine, skipped) = benches
    assert torch.equal(theirs.hits.long(), mine.hits) and torch.equal(theirs.misses.long(),
                                                                       mine.misses)
    assert len(skipped) == int(mine.hits.sum() + mine.misses.sum()) == 16
    assert "already counted" in str(skipped[0].message)
    # pointing_game.accuracy: TorchRay averages over all 80 classes (unseen ones as 0)
    seen = int(((mine.hits + mine.misses) > 0).sum())
    assert seen == 2 and float(theirs.accuracy) == pytest.approx(mine.accuracy * seen / 80)


def test_models_against_torchray(tr):
    t, o = tr["benchmark.models"], ours("benchmark.models")
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
    assert same(t.get_transform(size=32)(pil), o.get_transform(size=32)(pil))
    red = Image.new("RGB", (8, 6), (255, 0, 0))  # models.get_transform
    caffe = t.get_transform("voc", size=(6, 8))(red)[:, 0, 0]
    assert torch.allclose(caffe, torch.tensor([255 - 123.68, -116.779, -103.939]))
    assert same(o.get_transform("voc", size=(6, 8))(red), o.get_transform(size=(6, 8))(red))
    with pytest.raises(ValueError, match="dataset must be one of"):
        o.get_transform("foo")
    results = []
    for m in (t, o):  # models.replace_module
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1)))
        new = m.replace_module(net, "1.0", nn.Identity())
        results.append((repr(new), new is net, type(net[1][0]).__name__, new[1][1] is net[1][1]))
    assert results[0][0] == results[1][0]
    assert results[0][1:] == (False, "ReLU", True) and results[1][1:] == (True, "Identity", True)
    with pytest.raises(ValueError, match="no sub-module '1.7'"):
        o.replace_module(net, "1.7", nn.Identity())


def test_datasets_against_torchray(tr, tmp_path):
    t, o = tr["benchmark.datasets"], ours("benchmark.datasets")
    assert t.VOC_CLASSES == o.VOC_CLASSES
    assert "motorbike" in t.COCO_CLASSES and "motorcycle" in o.COCO_CLASSES  # datasets.COCO_CLASSES
    # datasets.IMAGENET_CLASSES: the same classes in the same order, other spellings
    assert t.IMAGENET_CLASSES[0] == "tench, Tinca tinca\n" and o.IMAGENET_CLASSES[0] == "tench"
    root = make_coco(tmp_path / "coco")
    sets = [m.get_dataset("coco", "val2014", dataset_dir=str(root),
                          annotation_dir=str(root / "annotations")) for m in (t, o)]
    assert len(sets[0]) == len(sets[1]) == 2 and sets[0].images == sets[1].images
    for k in range(2):
        labels = [s[k][1] for s in sets]
        assert list(labels[0]) == list(labels[1])
        ids = [s.as_class_ids(label) for s, label in zip(sets, labels)]
        assert sorted(set(ids[0])) == ids[1]  # datasets.coco_as_class_ids
        for s, label in zip(sets, labels):
            assert s.as_image_size(label) == sets[0].as_image_size(labels[0])
            assert s.as_image_name(label) == t.coco_as_image_name(sets[0], labels[0])
            assert s.get_image_url(k) == sets[0].get_image_url(k)
        for class_id in ids[1]:
            assert same(sets[0].as_mask(labels[0], class_id), sets[1].as_mask(labels[1], class_id))
    limited = [m.get_dataset("coco", "val2014", str(root), str(root / "annotations"), None, 1)
               for m in (t, o)]
    assert len(limited[0]) == len(limited[1]) == 1
    with pytest.raises(ValueError, match="year"):  # datasets.VOCDetection
        t.get_dataset("voc_2007", "test", dataset_dir=str(tmp_path))
    folder = write_image_folder(tmp_path / "folder", {"a": 3, "b": 1, "c": 2})
    for limiter in (None, 2, 4):
        sets = [m.ImageFolder(str(folder), limiter=limiter) for m in (t, o)]
        assert list(sets[0].selection) == sets[1].selection
        assert [sets[0].get_image_url(i) for i in range(len(sets[0]))] == \
            [sets[1].get_image_url(i) for i in range(len(sets[1]))]
    assert len(t.get_dataset("coco", "val2014", str(root), str(root / "annotations"),
                             limiter=0)) == 2  # datasets.limiter


def test_voc_label_converters_against_torchray(tr, tmp_path):
    """TorchRay's VOC data set fails on current torchvision, its converters do not."""
    t, o = tr["benchmark.datasets"], ours("benchmark.datasets")
    dataset = o.get_dataset("voc_2007", "test", make_voc(tmp_path))
    for k in range(len(dataset)):
        label = dataset[k][1]
        for fn in ("voc_as_class_ids", "voc_as_image_size", "voc_as_image_name"):
            assert same(getattr(t, fn)(label), getattr(o, fn)(label)), fn
        for class_id in set(o.voc_as_class_ids(label)):  # difficult objects included by both
            assert same(t.voc_as_mask(label, class_id), o.voc_as_mask(label, class_id))
