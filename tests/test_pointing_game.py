"""Pointing game: the hit rule against a brute-force distance transform, the statistics, and
the [EBP] protocol on the tiny VOC / COCO trees of ``tests.test_datasets`` with known numbers.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from tests.test_datasets import (
    BOTTLE,
    CAR,
    CAT,
    COCO_DOG,
    COCO_PERSON,
    DOG,
    PERSON,
    make_coco,
    make_voc,
)
from torchray_like.benchmark.datasets import VOC_CLASSES, get_dataset
from torchray_like.benchmark.pointing_game import (
    MAX_NUM_CLASSES,
    PointingGame,
    PointingGameBenchmark,
    as_class_id,
    centre_point,
    read_difficult_file,
    saliency_to_point,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ------------------------------------------------------------------ the hit rule


def test_hit_within_tolerance_of_single_pixel():
    mask = torch.zeros(40, 60, dtype=torch.bool)
    mask[10, 20] = True  # row 10, column 20
    game = PointingGame(5, tolerance=15)
    assert game.evaluate(mask, (20, 10)) == 1
    assert game.evaluate(mask, (34, 10)) == 1  # distance 14
    assert game.evaluate(mask, (30, 21)) == 1  # sqrt(10² + 11²) = 14.87
    assert game.evaluate(mask, (31, 21)) == -1  # sqrt(11² + 11²) = 15.56
    assert game.evaluate(mask, (20.0, 24.9)) == 1  # float point, distance 14.9
    assert game.evaluate(mask, (20.5, 25.5)) == -1  # 15.51
    exact = PointingGame(5, tolerance=1)  # an integer point must lie on the mask
    assert exact.evaluate(mask, (20, 10)) == 1 and exact.evaluate(mask, (21, 10)) == -1


def test_hit_boundary_is_strict_as_torchray():
    """A point exactly `tolerance` pixels from the mask is a miss (TorchRay's strict <)."""
    mask = torch.zeros(40, 60, dtype=torch.bool)
    mask[10, 20] = True
    game = PointingGame(5, tolerance=15)
    # 15 = 15 along a row or column, and sqrt(9² + 12²) = 15 on a diagonal
    for point in [(35, 10), (5, 10), (20, 25), (29, 22), (32, 19), (20.0, 25.0)]:
        assert game.evaluate(mask, point) == -1, point
    for point in [(34, 10), (20, 24), (28, 22), (29, 21)]:  # 14, 14, 14.4, 14.2
        assert game.evaluate(mask, point) == 1, point
    fractional = PointingGame(1, tolerance=4.5)
    assert fractional.evaluate(mask, (24.5, 10)) == -1  # exactly 4.5
    assert fractional.evaluate(mask, (24.4, 10)) == 1


def test_hit_rule_matches_torchray_black_box():
    """TorchRay 1.0 (run as a black box, skipped when absent) scores every case the same."""
    reference = pytest.importorskip("torchray.benchmark.pointing_game")
    rng = np.random.default_rng(1)
    cases = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchRay's torch.meshgrid indexing notice
        for trial in range(40):
            height, width = (int(x) for x in rng.integers(8, 60, size=2))
            mask = torch.from_numpy(rng.random((height, width)) < rng.choice([0.003, 0.03]))
            tolerance = int(rng.integers(1, 20))
            ours, theirs = PointingGame(1, tolerance), reference.PointingGame(1, tolerance)
            ys, xs = torch.nonzero(mask, as_tuple=True)
            points = [(int(rng.integers(0, width)), int(rng.integers(0, height)))
                      for _ in range(5)]
            if len(xs):  # and points exactly `tolerance` away along a row or column
                u, v = int(xs[0]), int(ys[0])
                points += [(x, y) for x, y in [(u + tolerance, v), (u, v + tolerance)]
                           if x < width and y < height]
            for point in points:
                assert ours.evaluate(mask, point) == theirs.evaluate(mask, point), \
                    (trial, point, tolerance)
                cases += 1
    assert cases >= 200


def test_hit_rule_matches_distance_transform():
    """Hit <=> the Euclidean distance to the nearest mask pixel is less than the tolerance."""
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for trial in range(30):
        height, width = rng.integers(5, 50, size=2)
        mask = rng.random((height, width)) < rng.choice([0.002, 0.02, 0.2])
        tolerance = int(rng.integers(1, 20))
        distance = (ndimage.distance_transform_edt(~mask) if mask.any()
                    else np.full(mask.shape, np.inf))
        game = PointingGame(1, tolerance=tolerance)
        for _ in range(20):
            u, v = int(rng.integers(0, width)), int(rng.integers(0, height))
            expected = 1 if distance[v, u] < tolerance else -1
            assert game.evaluate(mask, (u, v)) == expected, (trial, u, v)


def test_mask_and_point_types():
    game = PointingGame(2)
    mask = np.zeros((8, 9), dtype=np.uint8)
    mask[2:4, 2:4] = 1
    assert game.evaluate(mask, np.array([3, 3])) == 1
    assert game.evaluate(mask, (torch.tensor(3), torch.tensor(2))) == 1
    assert game.evaluate(torch.from_numpy(mask)[None], torch.tensor([3, 3])) == 1
    assert PointingGame(2, tolerance=1).evaluate(mask, [8, 7]) == -1
    assert game.evaluate(np.zeros((8, 9), bool), (0, 0)) == -1  # empty mask: always a miss


def test_bad_arguments():
    game = PointingGame(3)
    mask = torch.ones(10, 20, dtype=torch.bool)
    with pytest.raises(ValueError, match="outside the image"):
        game.evaluate(mask, (20, 5))  # u must be < width
    with pytest.raises(ValueError, match="outside the image"):
        game.evaluate(mask, (5, -1))
    with pytest.raises(TypeError, match=r"point must be a pair \(u, v\)"):
        game.evaluate(mask, (1, 2, 3))
    with pytest.raises(ValueError, match="finite"):
        game.evaluate(mask, (float("nan"), 1))
    with pytest.raises(ValueError, match=r"mask must have shape \(H, W\)"):
        game.evaluate(torch.ones(2, 3, 4), (0, 0))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        game.evaluate([[1]], (0, 0))
    with pytest.raises(ValueError, match="hit must be"):
        game.aggregate(2, 0)
    with pytest.raises(ValueError, match=r"class_id must be in \[0, 3\)"):
        game.aggregate(1, 3)
    with pytest.raises(TypeError, match="class_id must be an int"):
        game.aggregate(1, 1.0)
    with pytest.raises(ValueError, match="tolerance"):
        PointingGame(3, tolerance=-1)
    with pytest.raises(ValueError, match=r"tolerance must be a positive .* use tolerance=1"):
        PointingGame(3, tolerance=0)  # every point would be a miss
    with pytest.raises(ValueError, match="num_classes"):
        PointingGame(0)
    with pytest.raises(ValueError, match="class_names"):
        PointingGame(3, class_names=["a"])


@pytest.mark.parametrize("num_classes", [10 ** 12, MAX_NUM_CLASSES + 1, 2 ** 63, np.int64(2 ** 40),
                                         10 ** 400])
def test_huge_num_classes_is_refused_before_allocating(num_classes):
    # Was the allocator's RuntimeError (10**12: 16 TB of counts) or torch's overflow TypeError.
    with pytest.raises(ValueError) as info:
        PointingGame(num_classes)
    message = str(info.value)
    assert message.startswith(f"num_classes={num_classes} is more than "
                              f"MAX_NUM_CLASSES={MAX_NUM_CLASSES}")
    assert "GiB" in message and "give the number of classes of the data set" in message


def test_class_names_from_a_generator_are_read_once():
    # Was "object of type 'generator' has no len()".
    game = PointingGame(3, class_names=(name for name in ["cat", "dog", "cow"]))
    assert game.class_names == ["cat", "dog", "cow"]
    assert "\ncow " in str(game)
    assert PointingGame(2, class_names=("a", "a")).class_names == ["a", "a"]  # labels only
    assert PointingGame(2, class_names={"x": 0, "y": 1}).class_names == ["x", "y"]


@pytest.mark.parametrize("class_names, error, match", [
    ("abc", TypeError, r"class_names must be an iterable of num_classes=3 strings .*got str"),
    (b"abc", TypeError, "class_names must be an iterable.*got bytes"),
    (3, TypeError, "class_names must be an iterable.*got int"),
    (["a", 1, "c"], TypeError, r"class_names\[1\] is int 1; pass str\(name\)"),
    ([None, "b", "c"], TypeError, r"class_names\[0\] is NoneType"),
    ((n for n in "ab"), ValueError, "class_names must have num_classes=3 names, got 2"),
    (["a", "b", "c", "d"], ValueError, "got 4"),
])
def test_bad_class_names(class_names, error, match):
    with pytest.raises(error, match=match):
        PointingGame(3, class_names=class_names)


def test_large_but_legal_num_classes_works():
    assert MAX_NUM_CLASSES == 2 ** 24
    game = PointingGame(10 ** 6)                     # 16 MB of counts
    assert game.hits.shape == game.misses.shape == (10 ** 6,)
    assert game.hits.dtype == torch.int64
    game.aggregate(1, 10 ** 6 - 1)
    game.aggregate(-1, 10 ** 6 - 1)
    assert int(game.hits[-1]) == 1 and int(game.misses[-1]) == 1 and game.accuracy == 0.5


# ------------------------------------------------------------------ statistics


def test_aggregate_accuracies_reset_and_table():
    game = PointingGame(4, class_names=["a", "b", "c", "d"])
    assert math.isnan(game.accuracy) and torch.isnan(game.class_accuracies).all()
    for hit, class_id in [(1, 0), (-1, 0), (1, 0), (-1, 2), (0, 1), (0, 3), (1, 3)]:
        game.aggregate(hit, class_id)
    assert game.hits.tolist() == [2, 0, 0, 1] and game.misses.tolist() == [1, 0, 1, 0]
    accuracies = game.class_accuracies
    assert accuracies[0] == pytest.approx(2 / 3) and math.isnan(accuracies[1])
    assert accuracies[2] == 0 and accuracies[3] == 1
    assert game.accuracy == pytest.approx((2 / 3 + 0 + 1) / 3)  # b never seen: left out
    text = str(game)
    assert "66.67%" in text and "mean accuracy over 3 classes: 55.56%" in text
    assert "\nb " in text and text.count("\n") == 6
    assert "PointingGame(num_classes=4" in repr(game)
    game.reset()
    assert game.hits.sum() == 0 and game.misses.sum() == 0 and math.isnan(game.accuracy)


# ------------------------------------------------------------------ helpers


def test_centre_point_and_saliency_to_point():
    assert centre_point((80, 100)) == (50, 40)
    assert centre_point(torch.Size([5, 7])) == (3, 2)
    with pytest.raises(ValueError, match=r"size must be a pair \(height, width\)"):
        centre_point((0, 3))
    full = torch.zeros(1, 1, 6, 8)
    full[0, 0, 4, 7] = 1
    assert saliency_to_point(full, (6, 8)) == (7, 4)  # same size: no resizing
    low = np.zeros((8, 10), dtype=np.float32)
    low[2, 2] = 1  # x10 bilinear: output pixels 24 and 25 tie at the peak, the first wins
    assert saliency_to_point(low, (80, 100)) == (24, 24)
    with pytest.raises(ValueError, match="one map"):
        saliency_to_point(torch.zeros(2, 1, 4, 4), (8, 8))
    with pytest.raises(ValueError, match="NaN"):
        saliency_to_point(torch.full((4, 4), float("nan")), (8, 8))


# --------------------------------------------------------------- VOC protocol


@pytest.fixture
def voc(tmp_path):
    return get_dataset("voc_2007", "test", dataset_dir=make_voc(tmp_path / "voc"))


# (image index, class id, point (u, v), expected result) on the boxes of tests.test_datasets:
# dog: columns 10..39, rows 10..29; person: columns 60..89, rows 40..69 (image 0, 100x80)
VOC_PLAY = [
    (0, DOG, (25, 20), 1),
    (0, DOG, (54, 20), -1),  # 15 px right of the box: not < 15
    (0, DOG, (53, 20), 1),  # 14 px: within tolerance
    (0, PERSON, (0, 0), -1),
    (1, CAT, (30, 25), 1),
    (1, BOTTLE, (7, 7), 0),  # its only object is difficult: skipped
    (2, CAR, (40, 40), 1),
    (2, DOG, (40, 40), 0),  # absent class: skipped
]


def test_voc_benchmark_known_accuracy(voc):
    benchmark = PointingGameBenchmark(voc)
    for index, class_id, point, expected in VOC_PLAY:
        assert benchmark.evaluate(index, class_id, point) == expected, (index, class_id)
    assert benchmark.hits[DOG] == 2 and benchmark.misses[DOG] == 1
    # dog 2/3, person 0, cat 1, car 1
    assert benchmark.accuracy == pytest.approx((2 / 3 + 0 + 1 + 1) / 4)
    assert "dog" in str(benchmark) and "mean accuracy over 4 classes: 66.67%" in str(benchmark)


def test_voc_benchmark_labels_equal_indices(voc):
    by_index, by_label = PointingGameBenchmark(voc), PointingGameBenchmark(voc)
    for index, class_id, point, _ in VOC_PLAY:
        by_index.evaluate(index, class_id, point)
        by_label.evaluate(voc[index][1], class_id, point)
    assert torch.equal(by_index.hits, by_label.hits)
    assert torch.equal(by_index.misses, by_label.misses)


def test_voc_benchmark_saliency_maps(voc):
    """Low-resolution maps are resized to the image (bilinear) and their argmax is scored."""
    benchmark = PointingGameBenchmark(voc)
    saliency = torch.zeros(1, 1, 8, 10)
    saliency[0, 0, 2, 2] = 1  # -> pixel (24, 24): in the dog box
    assert benchmark.evaluate(0, DOG, saliency) == 1
    assert benchmark.evaluate(0, PERSON, saliency) == -1
    saliency = torch.zeros(8, 10)
    saliency[6, 8] = 1  # -> pixel (84, 64): in the person box
    assert benchmark.evaluate(0, PERSON, saliency.numpy()) == 1
    assert benchmark.accuracy == pytest.approx(0.75)


def test_voc_centre_baseline(voc):
    benchmark = PointingGameBenchmark(voc)
    for index in range(len(voc)):
        label = voc.load_label(index)
        for class_id in voc.as_class_ids(label):
            benchmark.evaluate(label, class_id, centre_point(voc.as_image_size(label)[::-1]))
    # centre (50, 40) of image 0: the dog box's corner (39, 29) is 15.6 px away, a miss
    assert benchmark.hits.tolist()[DOG] == 0 and benchmark.misses.tolist()[DOG] == 1
    assert benchmark.hits[PERSON] == 1  # (60, 40) is 10 px away
    assert benchmark.hits[CAT] == 1 and benchmark.hits[CAR] == 1
    assert benchmark.accuracy == pytest.approx(0.75)


def test_voc_difficult_subset_rule(voc):
    """Difficult: the class covers < 1/4 of the image and another class is present."""
    benchmark = PointingGameBenchmark(voc, difficult=True)
    results = [benchmark.evaluate(i, c, p) for i, c, p, _ in VOC_PLAY]
    # image 0: dog (600/8000) and person (900/8000) are small and together: kept.
    # image 1: the cat covers the image; image 2: the car is alone: skipped.
    assert results == [1, -1, 1, -1, 0, 0, 0, 0]
    assert benchmark.accuracy == pytest.approx((2 / 3 + 0) / 2)


def test_voc_difficult_subset_file(voc, tmp_path):
    flags = ["0"] * len(VOC_CLASSES)
    dog_only, car_only = list(flags), list(flags)
    dog_only[DOG], car_only[CAR] = "1", "1"
    path = tmp_path / "difficult.txt"
    path.write_text("# image flags\n000001 " + " ".join(dog_only)
                    + "\n000003.jpg " + " ".join(car_only) + "\n999999 " + " ".join(flags) + "\n")
    benchmark = PointingGameBenchmark(voc, difficult=str(path))
    results = [benchmark.evaluate(i, c, p) for i, c, p, _ in VOC_PLAY]
    # image 1 is not listed: its pairs are skipped
    assert results == [1, -1, 1, 0, 0, 0, 1, 0]
    assert benchmark.accuracy == pytest.approx((2 / 3 + 1) / 2)


def test_difficult_file_errors(voc, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("000001 0 1\n")
    with pytest.raises(ValueError, match="line 1: expected an image name and 20"):
        PointingGameBenchmark(voc, difficult=path)
    path.write_text("123456 " + " ".join(["0"] * 20) + "\n")
    with pytest.raises(ValueError, match="no image of the data set appears"):
        PointingGameBenchmark(voc, difficult=path)
    with pytest.raises(FileNotFoundError):
        PointingGameBenchmark(voc, difficult=tmp_path / "missing.txt")
    table = read_difficult_file(tmp_path / "bad.txt", 20)
    assert set(table) == {"123456"} and table["123456"].dtype == torch.bool


def test_difficult_file_keys_keep_dotted_stems(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("2008_000001.jpg 0 1\nscan.v2 1 0\nscan.v3.PNG 1 1\n")
    assert set(read_difficult_file(path, 2)) == {"2008_000001", "1", "scan.v2", "scan.v3"}


def test_voc_malformed_box_refused_by_the_benchmark(tmp_path):
    """xmin > xmax gave an empty mask and a silent miss; now the file and object are named."""
    root = make_voc(tmp_path / "voc")
    xml = root / "VOCdevkit" / "VOC2007" / "Annotations" / "000003.xml"
    xml.write_text(xml.read_text().replace("<xmin>31</xmin>", "<xmin>60</xmin>"))
    benchmark = PointingGameBenchmark(get_dataset("voc_2007", "test", dataset_dir=root))
    with pytest.raises(ValueError, match=r"object 1 \('car'\) in the VOC annotation of image "
                                         r"'000003.jpg' has a malformed box \(xmin > xmax\)"):
        benchmark.evaluate(2, CAR, (40, 40))
    assert benchmark.hits.sum() == 0 and benchmark.misses.sum() == 0  # nothing counted
    assert benchmark.evaluate(0, DOG, (25, 20)) == 1


def test_voc_subset_and_bad_arguments(voc):
    subset = torch.utils.data.Subset(voc, [2, 0])
    benchmark = PointingGameBenchmark(subset)
    assert benchmark.evaluate(0, CAR, (40, 40)) == 1  # index 0 of the subset = image 2
    assert benchmark.evaluate(1, DOG, (25, 20)) == 1
    with pytest.raises(ValueError, match="out of range"):
        benchmark.evaluate(2, DOG, (0, 0))
    with pytest.raises(ValueError, match="outside the image"):
        benchmark.evaluate(1, DOG, (100, 0))
    with pytest.raises(ValueError, match=r"class_id must be in \[0, 20\)"):
        benchmark.evaluate(0, 20, (0, 0))
    with pytest.raises(TypeError, match="VOCDetection or CocoDetection"):
        PointingGameBenchmark([1, 2, 3])
    with pytest.raises(TypeError, match="difficult must be a bool or a path"):
        PointingGameBenchmark(voc, difficult=1.5)


# -------------------------------------------------------------- COCO protocol


@pytest.fixture
def coco(tmp_path):
    pytest.importorskip("pycocotools")
    return get_dataset("coco", "val2014", dataset_dir=make_coco(tmp_path / "coco"))


# dataset order is by image id: index 0 = image 7 (50x50), index 1 = image 42 (64x48)
COCO_PLAY = [
    (1, COCO_PERSON, (20, 20), 1),
    (1, COCO_PERSON, (4, 44), 1),  # the second, small person
    (1, COCO_DOG, (20, 20), -1),  # 25 px from the triangle's corner (40, 5)
    (0, COCO_DOG, (25, 25), 1),
    (0, COCO_PERSON, (10, 5), 1),  # 10 px from the crowd (column 0, rows 0..9)
    (0, COCO_PERSON, (30, 40), -1),
]


def test_coco_benchmark_known_accuracy(coco):
    benchmark = PointingGameBenchmark(coco)
    for index, class_id, point, expected in COCO_PLAY:
        assert benchmark.evaluate(index, class_id, point) == expected, (index, class_id, point)
    assert benchmark.hits[COCO_PERSON] == 3 and benchmark.misses[COCO_PERSON] == 1
    assert benchmark.accuracy == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert benchmark.evaluate(0, 5, (1, 1)) == 0  # a bus: absent


def test_coco_benchmark_labels_and_difficult(coco, tmp_path):
    benchmark = PointingGameBenchmark(coco, difficult=True)
    results = [benchmark.evaluate(coco[i][1], c, p) for i, c, p, _ in COCO_PLAY]
    # image 42: both classes small and together; image 7: the big dog is skipped, the
    # 10-pixel crowd is small next to the dog.
    assert results == [1, 1, -1, 0, 1, -1]
    flags = ["0"] * 80
    flags[COCO_DOG] = "1"
    path = tmp_path / "coco_difficult.txt"
    path.write_text("COCO_val2014_000000000042.jpg " + " ".join(flags) + "\n")
    benchmark = PointingGameBenchmark(coco, difficult=path)
    results = [benchmark.evaluate(i, c, p) for i, c, p, _ in COCO_PLAY]
    assert results == [0, 0, -1, 0, 0, 0]
    assert benchmark.accuracy == 0


@pytest.mark.parametrize("class_id", [2, np.int64(2), torch.tensor(2), torch.tensor([2]),
                                      np.array(2), np.array([2], dtype=np.uint8),
                                      torch.tensor(2, dtype=torch.uint8)])
def test_a_data_sets_integer_label_is_a_class_id(class_id):
    """Labels straight from a data set (0-d / one-element integer tensors or arrays) are
    class ids, counted where an int would be."""
    game = PointingGame(3)
    game.aggregate(1, class_id)
    game.aggregate(-1, class_id)
    assert game.hits.tolist() == [0, 0, 1] and game.misses.tolist() == [0, 0, 1]
    assert as_class_id(class_id, 3) == 2 and type(as_class_id(class_id, 3)) is int


@pytest.mark.parametrize("class_id, error, pattern", [
    (torch.tensor(2.0), TypeError, r"class_id must be one int, got a Tensor of shape \(\) and "
                                   r"dtype torch.float32"),
    (torch.tensor([1, 2]), TypeError, r"one int, got a Tensor of shape \(2,\)"),
    (torch.tensor(True), TypeError, "dtype torch.bool"),
    (np.array([0.5]), TypeError, "dtype float64"),
    (np.array([], dtype=np.int64), TypeError, r"shape \(0,\)"),
    (True, TypeError, "class_id must be an int, got True"),
    (torch.tensor(3), ValueError, r"class_id must be in \[0, 3\), got 3"),
    (np.int32(-1), ValueError, r"got -1"),
    (torch.empty((), dtype=torch.long, device="meta"), ValueError,
     "class_id is on the meta device"),
])
def test_class_ids_that_are_no_single_integer_are_refused_naming_class_id(class_id, error,
                                                                         pattern):
    game = PointingGame(3)
    with pytest.raises(error, match=pattern):
        game.aggregate(1, class_id)
    assert game.hits.sum() == 0 and game.misses.sum() == 0


def test_torchray_loop_counts_each_pair_once_and_reset_forgets_the_last_evaluate(tmp_path):
    """TorchRay's ``aggregate(evaluate(...), c)``: ``evaluate`` already counted the pair, so
    the ``aggregate`` right after it with that result is skipped with a warning; another
    result, an ``aggregate`` after a ``reset()``, or a second ``aggregate`` count as usual."""
    from torchray_like.attribution.context import TorchRayDifferenceWarning

    root = make_coco(tmp_path)
    dataset = get_dataset("coco", "val2014", dataset_dir=str(root))
    bench = PointingGameBenchmark(dataset, tolerance=3)
    label = dataset[0][1]
    class_id = sorted(set(dataset.as_class_ids(label)))[0]
    hit = bench.evaluate(label, class_id, (1, 1))
    assert hit in (1, -1)
    with pytest.warns(TorchRayDifferenceWarning, match="already counted"):
        bench.aggregate(hit, class_id)
    assert int(bench.hits.sum() + bench.misses.sum()) == 1
    bench.aggregate(hit, class_id)                 # a second one is the caller's own count
    assert int(bench.hits.sum() + bench.misses.sum()) == 2
    bench.evaluate(label, class_id, (1, 1))
    bench.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench.aggregate(hit, class_id)             # after reset(): counted, no warning
    assert int(bench.hits.sum() + bench.misses.sum()) == 1
    bench.evaluate(label, class_id, (1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench.aggregate(-hit, class_id)            # another result: counted
    assert int(bench.hits.sum() + bench.misses.sum()) == 3
