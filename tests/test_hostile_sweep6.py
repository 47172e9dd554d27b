"""Hostile arguments for the evaluation side (sweep 6): intervals, the pointing game and its
table, deletion/insertion, sanity checks and plot_example.  Each case was a foreign exception
(NumPy's, PyTorch's, a KeyError, a bare TypeError) or a silently wrong value before; each now
asserts the message that names the argument and what to give."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from torchray_like.benchmark import deletion_insertion as D
from torchray_like.benchmark import intervals as I
from torchray_like.benchmark import sanity_checks as S
from torchray_like.benchmark.interval_checks import MAX_COUNTS_BYTES, check_num_classes
from torchray_like.benchmark.intervals import Interval
from torchray_like.benchmark.plot import plot_example
from torchray_like.benchmark.pointing_game import (
    MAX_IMAGE_PIXELS,
    PointingGame,
    read_difficult_file,
    saliency_to_point,
)
from torchray_like.benchmark.pointing_game_table import (
    make_table,
    pairs_of_records,
    print_table,
    write_outputs,
)

META = "is on the meta device"


# ----------------------------------------------------------------------------- intervals


def test_check_num_classes_is_the_one_home_of_the_bound():
    assert check_num_classes(np.int64(20), 16, "x") == 20
    assert type(check_num_classes(np.int64(20), 16, "x")) is int
    with pytest.raises(ValueError, match=r"num_classes=16777217 is more than MAX_NUM_CLASSES="
                                         r"16777216 \(my arrays would take 0.25 GiB\)"):
        check_num_classes(2 ** 24 + 1, 16, "my arrays")
    for bad in ("3", 3.0, True, 0, -1, None, torch.tensor(3)):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            check_num_classes(bad, 16, "x")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"digits": -1}, ValueError, r"digits must be an int in \[0, 17\]"),
    ({"digits": "1"}, ValueError, "digits must be an int"),
    ({"digits": 1.5}, ValueError, "digits must be an int"),
    ({"digits": 99}, ValueError, "digits must be an int"),
    ({"scale": "1"}, ValueError, r"scale must be a finite number \(100.0 for percent\)"),
    ({"scale": math.nan}, ValueError, "scale must be a finite number"),
    ({"scale": math.inf}, ValueError, "scale must be a finite number"),
])
def test_interval_format_refuses_bad_options(kwargs, error, match):
    # Were Python's "Format specifier missing precision", "can't multiply sequence", or a
    # silent "nan [nan, nan]" for scale=nan.
    with pytest.raises(error, match=match):
        Interval(0.1, 0.0, 0.2, 10).format(**kwargs)
    assert Interval(0.1234, 0.0, 0.2, 10).format(100.0, digits=0) == "12 [0, 20]"
    assert Interval(0.1234, 0.0, 0.2, 10).format(np.float32(100.0), digits=np.int64(2)) \
        == "12.34 [0.00, 20.00]"


@pytest.mark.parametrize("args, match", [
    (("a", 0.0, 0.2, 10), "Interval.estimate must be a real number, got 'a'"),
    ((0.1, None, 0.2, 10), "Interval.low must be a real number"),
    ((0.1, 0.0, 0.2, 10.0), "Interval.n must be a non-negative int, got 10.0"),
    ((0.1, 0.0, 0.2, -1), "Interval.n must be a non-negative int"),
    ((0.1, 0.0, 0.2, 10, "0.95"), "Interval.level must be a real number"),
])
def test_interval_refuses_non_numbers(args, match):
    with pytest.raises(TypeError, match=match):
        Interval(*args)


def test_interval_as_dict_needs_a_string_prefix():
    with pytest.raises(TypeError, match="prefix must be a str"):
        Interval(0.1, 0.0, 0.2, 10).as_dict(1)
    assert Interval(0.1, 0.0, 0.2, 10).as_dict("auc") == {"auc": 0.1, "auc_low": 0.0,
                                                          "auc_high": 0.2}


def test_bootstrap_refuses_what_numpy_would_mangle():
    with pytest.raises(TypeError, match="statistic must be a function"):
        I.bootstrap(np.ones((3, 2)), None)
    with pytest.raises(TypeError, match="statistic_b must be a function"):
        I.paired_difference(np.ones((3, 2)), np.ones((3, 2)), I.mean_of_sums, statistic_b=1)
    # Complex contributions were a ComplexWarning and a silent NaN interval.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="contributions must be real numbers"):
            I.bootstrap(np.ones((3, 2)) * 1j, I.mean_of_sums)
    with pytest.raises(ValueError, match=r"contributions must be a non-empty \(images, k\) "
                                         r"array of numbers \(setting an array element"):
        I.bootstrap([[1, 2], [1]], I.mean_of_sums)                      # ragged
    with pytest.raises(ValueError, match="contributions must be a non-empty.*could not convert"):
        I.bootstrap([["a", "b"]], I.mean_of_sums)
    with pytest.raises(ValueError, match="contributions " + META):
        I.bootstrap(torch.ones(3, 2, device="meta"), I.mean_of_sums)
    with pytest.raises(ValueError, match=r"statistic must return numbers .*'a'"):
        I.bootstrap(np.ones((3, 2)), lambda s: np.array(["a"] * len(s)))
    # A (1, 10**6) array is 8 MB, but its 2000 resampled sums would be 15 GiB.
    with pytest.raises(ValueError, match=r"resamples=2000 of 1000000 sums need 14.9 GiB \(more "
                                         rf"than MAX_COUNTS_BYTES={MAX_COUNTS_BYTES}\); use "
                                         "fewer resamples"):
        I.bootstrap(np.zeros((1, 10 ** 6)), lambda s: s[..., 0])
    interval = I.bootstrap(torch.tensor([[1.0, 1.0], [3.0, 1.0]]), I.mean_of_sums, resamples=100)
    assert interval.estimate == 2.0 and interval.n == 2


def test_means_refuse_meta_values_and_an_overflowing_sum():
    with pytest.raises(ValueError, match="values " + META):
        I.mean_interval(torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="values_b " + META):
        I.paired_mean_difference([1.0, 2.0], torch.ones(2, device="meta"))
    # Was an infinite mean with two RuntimeWarnings.
    with pytest.raises(ValueError, match=r"values holds values up to 1e\+308: their sum over 2 "
                                         "images overflows float64; rescale them"):
        I.mean_interval([1e308, -1e308])
    assert I.mean_interval([1e300, 3e300], resamples=100).estimate == pytest.approx(2e300)


@pytest.mark.parametrize("function, sums, match", [
    (I.mean_of_sums, np.ones((3, 1)), r"mean_of_sums reads sums \(..., k\) with k 2 \(sum, "
                                      r"count\), got shape \(3, 1\)"),
    (I.mean_of_sums, np.ones((3, 3)), "mean_of_sums reads sums"),
    (I.pointing_game_accuracy, np.ones(3), r"k an even number .*got shape \(3,\)"),
    (I.pointing_game_accuracy, np.ones((2, 0)), "k an even number"),
    (I.pointing_game_accuracy, np.float64(1.0), r"got shape \(\)"),
])
def test_statistics_refuse_sums_of_the_wrong_width(function, sums, match):
    # Were an IndexError (1 column), an AttributeError (a list) or a silently wrong value (the
    # pointing game read 3 columns as one class and dropped the third).
    with pytest.raises(ValueError, match=match):
        function(sums)


def test_statistics_accept_lists():
    assert I.mean_of_sums([6.0, 3.0]) == 2.0
    assert I.pointing_game_accuracy([[1, 0, 2, 0]]).tolist() == [0.5]


def test_pointing_game_pairs_from_any_iterable_and_bad_images():
    interval = I.pointing_game_interval(([(0, 1)] for _ in range(3)), 2, resamples=100)
    assert interval.estimate == 1.0 and interval.n == 3
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a list of \(class_id, hit\) "
                                        "pairs .*got NoneType"):
        I.pointing_game_interval([None], 2)
    with pytest.raises(TypeError, match="pairs must be a sequence holding one list"):
        I.pointing_game_interval(None, 2)
    with pytest.raises(TypeError, match="pairs_b must be a sequence"):
        I.paired_pointing_game_difference([[(0, 1)]], 5, 2)
    with pytest.raises(ValueError, match=r"pairs\[0\]: hit must be \+1"):   # ambiguous truth
        I.pointing_game_interval([[(0, np.array([1, 1]))]], 2)
    with pytest.raises(ValueError, match=r"pairs_a\[0\] must hold \(class_id, hit\) pairs, got 0"):
        I.paired_pointing_game_difference([[0]], [[(0, 1)]], 2)    # was "cannot unpack"


def _pairs_of(model, method, subset):
    return {0: [(0, 1)], 1: [(1, -1)]}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"pairs_of": None}, TypeError, "pairs_of must be a function"),
    ({"pairs_of": lambda *a: None}, TypeError,
     r"pairs_of\('vgg16', 'grad_cam', 'all'\) must return a mapping .*got NoneType"),
    ({"models": "vgg16"}, TypeError, r"models must be a list of names, got str 'vgg16'; pass "
                                     r"\['vgg16'\]"),
    ({"methods": "grad_cam"}, TypeError, "methods must be a list of names"),
    ({"orderings": [("all", "a")]}, ValueError, r"orderings\[0\] must be \(subset, better, "
                                                r"worse, .* got \('all', 'a'\)"),
    ({"orderings": [("all", "a", "b", "86", 60.0)]}, ValueError, r"orderings\[0\] must be"),
    ({"orderings": 3}, TypeError, "orderings must be a sequence"),
])
def test_compare_orderings_refuses_bad_arguments(kwargs, error, match):
    # Were "'NoneType' object is not callable / iterable", Python's unpacking error, or (a
    # string of models) one model per letter, silently.
    arguments = {"pairs_of": _pairs_of, "models": ["vgg16"], "methods": ["grad_cam", "center"],
                 "num_classes": 20, "resamples": 100, **kwargs}
    with pytest.raises(error, match=match):
        I.compare_orderings(**arguments)


def test_format_orderings_names_the_missing_keys():
    with pytest.raises(ValueError, match=r"comparisons\[0\] must be a dict of compare_orderings, "
                                         "missing subset, better"):
        I.format_orderings([{"model": "m"}])     # was KeyError: 'better'
    with pytest.raises(ValueError, match=r"comparisons\[0\].*missing model"):
        I.format_orderings([3])
    rows = I.compare_orderings(_pairs_of, ["vgg16"], ["grad_cam", "center"], 20, resamples=100)
    assert len(rows) == 1 and "vgg16" in I.format_orderings(rows)


# -------------------------------------------------------------------------- pointing game


def test_saliency_to_point_refuses_a_huge_size_and_non_numeric_arrays():
    # Was the allocator's RuntimeError (a 4 TB resized map) and torch.from_numpy's TypeError.
    with pytest.raises(ValueError, match=r"size=\(1000000, 1000000\) has 1000000000000 pixels, "
                                         rf"more than MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS} \(the "
                                         r"resized map would take 3.73e\+03 GiB\)"):
        saliency_to_point(torch.ones(4, 4), (10 ** 6, 10 ** 6))
    with pytest.raises(TypeError, match="saliency must hold numbers, got a numpy array of dtype "
                                        "object"):
        saliency_to_point(np.array([[None, 1]]), (4, 4))
    with pytest.raises(TypeError, match="saliency must hold numbers.*<U1"):
        saliency_to_point(np.array([["a"]]), (4, 4))
    assert saliency_to_point(np.array([[0, 1], [0, 0]], dtype=np.uint8), (2, 2)) == (1, 0)
    assert MAX_IMAGE_PIXELS == 2 ** 28


def test_evaluate_refuses_meta_points_object_and_empty_masks():
    game = PointingGame(3)
    # Were NotImplementedError ("Cannot copy out of meta tensor") and RuntimeError (.item()).
    with pytest.raises(ValueError, match="point " + META):
        game.evaluate(torch.ones(4, 4), torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="point " + META):
        game.evaluate(torch.ones(4, 4), (torch.zeros((), device="meta"), 1))
    with pytest.raises(TypeError, match="mask must hold numbers, got a numpy array of dtype "
                                        "object"):
        game.evaluate(np.array([[None, 1]]), (0, 0))
    with pytest.raises(ValueError, match=r"mask must have shape \(H, W\) .*H, W > 0, got "
                                         r"\(0, 0\)"):
        game.evaluate(torch.ones(0, 0), (0, 0))     # was "u is a column in [0, -1]"
    assert game.evaluate(torch.ones(4, 4), (torch.tensor(1), torch.tensor(2.0))) == 1


@pytest.mark.parametrize("hit", [np.array([1, 1]), torch.tensor([1, 1]), torch.tensor(0.5),
                                 np.array([0.5]), 1 + 0j, "1", None, math.nan])
def test_aggregate_refuses_hits_that_are_not_one_number(hit):
    # Were NumPy's / PyTorch's ambiguous-truth errors; tensor(0.5) truncated to a silent skip.
    game = PointingGame(3)
    with pytest.raises(ValueError, match=r"hit must be \+1 \(hit\), -1 \(miss\) or 0 \(skip\)"):
        game.aggregate(hit, 0)
    assert int(game.hits.sum()) == int(game.misses.sum()) == 0


def test_aggregate_accepts_one_element_tensors_and_arrays():
    game = PointingGame(3)
    game.aggregate(torch.tensor(1), 0)
    game.aggregate(np.array([-1]), 0)
    game.aggregate(torch.tensor([1.0]), 2)
    game.aggregate(np.int8(0), 1)
    assert game.hits.tolist() == [1, 0, 1] and game.misses.tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="hit " + META):
        game.aggregate(torch.tensor(1, device="meta"), 0)


def test_tolerance_beyond_int_and_float_range():
    # 1e300 was stored as a 301-digit int and overflowed torch's comparison; 10**400 was
    # math.isfinite's OverflowError.
    game = PointingGame(3, tolerance=1e300)
    assert game.tolerance == 1e300 and isinstance(game.tolerance, float)
    assert game.evaluate(torch.eye(4), (3, 0)) == 1
    assert PointingGame(3, tolerance=15.0).tolerance == 15
    assert isinstance(PointingGame(3, tolerance=np.float32(15)).tolerance, int)
    for bad in (10 ** 400, 1 + 0j, np.complex64(1), torch.tensor(15.0), True):
        with pytest.raises(ValueError, match="tolerance must be a positive finite number of "
                                             "pixels"):
            PointingGame(3, tolerance=bad)


def test_read_difficult_file_checks_its_arguments(tmp_path):
    path = tmp_path / "difficult.txt"
    path.write_text("img1 0 1 0\n")
    # Were Path's "expected str, bytes or os.PathLike object, not NoneType", and "expected 0
    # 0/1 flags" for num_classes=0 or "3".
    for bad in (None, 123):
        with pytest.raises(TypeError, match=r"path must be a str or os.PathLike \(the "
                                            "difficult-pair file\\), got"):
            read_difficult_file(bad, 3)
    for bad in (0, "3", 3.0):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            read_difficult_file(path, bad)
    with pytest.raises(ValueError, match="num_classes=1000000000000 is more than MAX_NUM_"
                                         "CLASSES"):
        read_difficult_file(path, 10 ** 12)
    assert read_difficult_file(str(path), np.int64(3))["img1"].tolist() == [False, True, False]


# -------------------------------------------------------------------- pointing-game table


def _record(**changes):
    return {"model": "m", "method": "g", "index": 0, "size": [4, 4],
            "pairs": [[0, 1, 0, [1, 1]]], "seconds": 0.1, **changes}


@pytest.mark.parametrize("records, error, match", [
    (None, TypeError, "records must be a list of the benchmark's records"),
    ({"model": "m"}, TypeError, "records must be a list"),
    ([None], ValueError, r"records\[0\] must be a dict with keys model, method, index, pairs, "
                         "seconds; missing model"),
    ([{"model": "m", "method": "g", "index": 0}], ValueError, "missing pairs, seconds"),
    ([_record(index=1.5)], ValueError, r"records\[0\]\['index'\] must be an int .*got 1.5"),
    ([_record(index="a")], ValueError, r"records\[0\]\['index'\] must be an int"),
    ([_record(seconds=math.nan)], ValueError, r"records\[0\]\['seconds'\] must be a finite "
                                              "number >= 0, got nan"),
    ([_record(seconds="1")], ValueError, r"\['seconds'\] must be"),
    ([_record(), _record(pairs=[[0, 1]])], ValueError, r"records\[1\]\['pairs'\] must be a list "
                                                       r"of \[class, all, difficult, point\]"),
    ([_record(pairs=[["0", 1, 0, None]])], ValueError, r"records\[0\]: class_id must be an int "
                                                       r"in \[0, 3\), got '0'"),
    ([_record(pairs=[[0, 1, 0.5, None]])], ValueError, r"records\[0\]: hit must be \+1"),
])
def test_make_table_names_the_bad_record(records, error, match):
    # Were KeyError('pairs'), "'NoneType' object is not subscriptable", int('a')'s message, a
    # record of index 1.5 filed under image 1 and a NaN seconds per image, silently.
    with pytest.raises(error, match=match):
        make_table(records, 3, ["m"], ["g"])


def test_make_table_and_pairs_of_records_other_arguments():
    with pytest.raises(TypeError, match=r"models must be a list of names, got str 'm'"):
        make_table([_record()], 3, "m", ["g"])
    with pytest.raises(ValueError, match="num_classes=1000000000000 is more than MAX_NUM_"):
        make_table([_record()], 10 ** 12, ["m"], ["g"])
    with pytest.raises(ValueError, match=r"subset must be one of \['all', 'difficult'\], got "
                                         "'easy'"):
        pairs_of_records([_record()])("m", "g", "easy")         # was KeyError: 'easy'
    assert pairs_of_records([_record()])("m", "g", "all") == {0: [(0, 1)]}
    rows = make_table([_record(), _record(index=1, pairs=[[2, -1, -1, None]])], 3, ["m"], ["g"])
    assert rows[0]["all"] == 0.5 and rows[0]["difficult"] == 0.0 and rows[0]["images"] == 2
    assert "50.0 [" in print_table(rows)


def test_an_image_recorded_twice_with_different_pairs_is_refused():
    """Was: the last record of the image kept, silently (two runs' results merged)."""
    twice = [_record(), _record(pairs=[[0, -1, -1, [1, 1]]])]
    with pytest.raises(ValueError, match=r"records: image 0 is recorded twice for model 'm' and "
                                         r"method 'g', with different pairs"):
        make_table(twice, 3, ["m"], ["g"])
    with pytest.raises(ValueError, match="recorded twice"):
        pairs_of_records(twice)("m", "g", "all")
    # The same record twice (a file merged with itself) counts once.
    assert make_table([_record(), _record()], 3, ["m"], ["g"])[0]["images"] == 1


def test_print_table_and_write_outputs_check_their_arguments(tmp_path):
    rows = make_table([_record()], 3, ["m"], ["g"])
    with pytest.raises(ValueError, match=r"rows\[0\] is missing model, all, .*pass the rows "
                                         "make_table"):
        print_table([{"method": "g"}])                           # was KeyError: 'model'
    with pytest.raises(TypeError, match="rows must be a list of dicts, got NoneType"):
        print_table(None)
    with pytest.raises(TypeError, match=r"out must be a directory path \(str or os.PathLike\), "
                                        "got NoneType"):
        write_outputs(None, rows, {})
    with pytest.raises(TypeError, match=r"meta must be a dict \(written to the JSON file\)"):
        write_outputs(str(tmp_path), rows, None)
    with pytest.raises(ValueError, match=r"rows\[0\] is missing method"):
        write_outputs(str(tmp_path), [{"zzz": 1}], {})           # was a CSV of empty cells
    with pytest.raises(ValueError, match=r"comparisons\[0\] is missing model"):
        write_outputs(str(tmp_path), rows, {}, [{}])
    with pytest.raises(TypeError, match=r"meta must hold JSON values .*not JSON serializable"):
        write_outputs(str(tmp_path / "new"), rows, {"a": object()})
    assert not (tmp_path / "new").exists()                        # nothing half-written
    csv_path, json_path = write_outputs(tmp_path / "out", rows, {"seed": 0})
    assert open(json_path).read().count('"difficult": null') == 1


# --------------------------------------------------------------------- deletion / insertion


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()


@pytest.mark.parametrize("call, error, match", [
    (lambda: D.default_step("a"), TypeError, "num_pixels must be a positive int, got 'a'"),
    (lambda: D.default_step(0), ValueError, r"num_pixels must be a positive int \(>= 1\), got 0"),
    (lambda: D.default_step(math.nan), TypeError, "num_pixels must be a positive int"),
    (lambda: D.default_blur_sigma([]), TypeError, "spatial must be a non-empty sequence"),
    (lambda: D.default_blur_sigma("ab"), TypeError, "spatial must be a non-empty sequence"),
    (lambda: D.default_blur_sigma([-16]), ValueError, "spatial sizes must be a positive int"),
    (lambda: D.step_fractions(10 ** 12, 1), ValueError,
     r"step=1 over 1000000000000 pixels gives 1000000000001 points, more than MAX_CURVE_POINTS"
     r"=16777216 \(a forward pass each\); use step >= 59605"),
])
def test_step_helpers_refuse_bad_sizes(call, error, match):
    # Were "unsupported operand type(s) for /", "max() arg is an empty sequence", a silent
    # step 1 for 0 pixels, a negative sigma, and the allocator's error for 8 TB of fractions.
    with pytest.raises(error, match=match):
        call()


def test_step_fractions_at_the_limit():
    assert D.MAX_CURVE_POINTS == 2 ** 24
    fits = math.ceil(10 ** 12 / (D.MAX_CURVE_POINTS - 1))
    assert D.step_fractions(10 ** 12, fits).numel() <= D.MAX_CURVE_POINTS
    assert D.default_blur_sigma((112, 224)) == 14.0 and D.default_step(224 * 224) == 224


@pytest.mark.parametrize("curve, fractions, error, match", [
    (torch.zeros(3, device="meta"), None, ValueError, "curve " + META),
    (torch.ones(3, dtype=torch.complex64), None, TypeError, "curve must be real"),
    (torch.tensor([0.0, math.nan]), None, ValueError, "curve holds NaN or infinite values"),
    (torch.ones(3), torch.zeros(3, device="meta"), ValueError, "fractions " + META),
    (torch.ones(3), "abc", TypeError, "fractions must be a 1-D tensor or sequence of numbers"),
    (torch.ones(3), torch.ones(3, dtype=torch.complex64), TypeError, "fractions must be real"),
    (torch.ones(3), torch.tensor([2.0, 3.0, 5.0]), ValueError,
     r"fractions must be finite and non-decreasing, in \[0, 1\]"),
    (torch.ones(3), [-0.5, 0.5, 1.0], ValueError, r"in \[0, 1\]"),
])
def test_auc_refuses_what_has_no_area(curve, fractions, error, match):
    # Were NotImplementedError (meta), a ComplexWarning and the real part, a NaN area, torch's
    # "new(): invalid data type 'str'", and complex or out-of-range fractions (0 or 3).
    with pytest.raises(error, match=match):
        D.auc(curve, fractions)


def test_auc_values():
    assert float(D.auc(torch.tensor([0.0, 1.0]), [0.0, 1.0])) == 0.5
    assert float(D.auc(torch.tensor([True, True]))) == 1.0
    assert D.auc(torch.ones(2, 3, dtype=torch.int64)).dtype == torch.float32


@pytest.mark.parametrize("saliency, error, match", [
    ([1, 2], TypeError, r"saliency must be a tensor \(N, 1, \*spatial\), got list"),
    (torch.tensor(1.0), TypeError, r"saliency must be a tensor .*got torch.Size\(\[\]\)"),
    (torch.ones(1, 1, 2, 2, device="meta"), ValueError, "saliency " + META),
    (torch.ones(1, 1, 2, 2, dtype=torch.complex64), TypeError, "saliency must be real"),
    (torch.tensor([[[[True, False]]]]), ValueError, r"dtype torch.bool; pass saliency.float\(\)"),
    (torch.tensor([[[[math.nan, 1.0]]]]), ValueError, "saliency holds NaN values"),
])
def test_pixel_order_refuses_what_has_no_order(saliency, error, match):
    # Were AttributeError, IndexError, a meta "order", PyTorch's sort/negation errors and a NaN
    # ranked wherever sort put it.
    with pytest.raises(error, match=match):
        D.pixel_order(saliency)


def test_pixel_order_values():
    assert D.pixel_order(torch.tensor([[[[1.0, 3.0], [3.0, 0.0]]]])).tolist() == [[1, 2, 0, 3]]
    assert D.pixel_order(torch.ones(0, 1, 2, 2)).shape == (0, 4)   # was a reshape error


def test_deletion_insertion_substrate_and_method_saliency():
    model, x, s = _tiny_model(), torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"substrate=1e\+300 does not fit the input's dtype "
                                         "torch.float32"):
        D.deletion_insertion(model, x, s, 1, substrate=1e300)   # was torch's overflow error
    # A NumPy number is a number (was "substrate must be ... a number, ..., got float32").
    a = D.deletion_insertion(model, x, s, 1, substrate=np.float32(0.5), step=16)
    b = D.deletion_insertion(model, x, s, 1, substrate=0.5, step=16)
    assert torch.equal(a[0], b[0]) and a[0].shape == (2, 5)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        D.method_saliency(lambda m, i, t: torch.ones(2, 1, 8, 8), model, [[1.0]], 1)
    for out, match in ((torch.full((2, 1, 8, 8), math.nan), "holding NaN or infinite values"),
                       (torch.ones(2, 1, 8, 8, device="meta"), "on meta: expected real values"),
                       (torch.ones(2, 1, 8, 8, dtype=torch.complex64), "dtype torch.complex64")):
        with pytest.raises(ValueError, match="method <function .* returned maps .*" + match):
            D.method_saliency(lambda m, i, t, out=out: out, model, x, 1)
    with pytest.raises(ValueError, match=r"score must be one of \('softmax'"):
        D.top_present_class(model, x, [[1], [2]], score="nope")   # was accepted, silently


# --------------------------------------------------------------------------- sanity checks


def _record_of(**changes):
    return {"method": "g", "mode": "cascading", "step": 0, "layer": "original",
            "spearman_abs": 1.0, "spearman": 1.0, "ssim": 1.0, "hog": 1.0, **changes}


def test_randomize_layer_checks_its_module():
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module \(a layer of the "
                                        "model\\), got NoneType"):
        S.randomize_layer(None, 0)                      # was AttributeError
    module = torch.nn.Module()
    module.register_parameter("w", torch.nn.Parameter(torch.ones(2, 2, dtype=torch.int64),
                                                      requires_grad=False))
    with pytest.raises(TypeError, match="randomize_layer redraws floating-point parameters; w "
                                        "has dtype torch.int64: pass reinit="):
        S.randomize_layer(module, 0)                    # was NotImplementedError
    assert module.w.tolist() == [[1, 1], [1, 1]]


def test_compare_maps_names_unreadable_maps_and_takes_a_batch_of_one():
    # Were NumPy's "could not convert string to float" / "inhomogeneous shape" naming no map.
    with pytest.raises(ValueError, match=r"reference must be a map of numbers \(could not "):
        S.compare_maps("abc", "abc")
    with pytest.raises(ValueError, match=r"other must be a map of numbers \(setting an array"):
        S.compare_maps([[1.0, 2.0], [3.0, 4.0]], [[1, 2], [1]])
    # A (1, 1, H, W) map (a method's output for one image) was read as a 3-D volume: SSIM and
    # HOG were NaN, silently.
    torch.manual_seed(0)
    a, b = torch.rand(8, 8), torch.rand(8, 8)
    assert S.compare_maps(a[None, None], b[None, None]) == S.compare_maps(a, b)
    assert math.isfinite(S.compare_maps(a[None, None], b[None, None])["hog"])


def test_sanity_checks_targets_and_return_maps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, padding=1),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match="return_maps must be True or False, got 'no'"):
        S.sanity_checks(model, x, 1, "gradient", layers=["2"], return_maps="no")
    # A NumPy array of targets was recorded as target None, silently.
    records = S.sanity_checks(model, x, np.array([1, 3]), "gradient", layers=["2"])
    assert [r["target"] for r in records] == [1, 3, 1, 3]


@pytest.mark.parametrize("records, keys, error, match", [
    (None, ("method",), TypeError, "records must be a list of sanity_checks' records"),
    ({"a": 1}, ("method",), TypeError, "records must be a list"),
    ([_record_of()], None, TypeError, "keys must be a sequence of record field names"),
    ([_record_of(ssim="x")], ("method",), ValueError,
     r"records\[0\]\['ssim'\] must be a real number \(NaN where undefined\), got 'x'"),
    ([_record_of(), _record_of(hog=1j)], ("method",), ValueError, r"records\[1\]\['hog'\]"),
    ([_record_of(layer=["a"])], ("layer",), TypeError,
     r"records\[0\]\['layer'\] must be a hashable value to group by"),
])
def test_summarize_names_the_bad_record(records, keys, error, match):
    # Were Python's "'NoneType' object is not iterable", NumPy's "could not convert string to
    # float", float()'s complex error and "unhashable type: 'list'".
    with pytest.raises(error, match=match):
        S.summarize(records, keys)


def test_summarize_reads_a_generator_once_and_none_as_undefined():
    rows = S.summarize((r for r in [_record_of(ssim=None), _record_of(ssim=0.5)]), ("method",))
    assert rows[0]["n"] == 2 and rows[0]["ssim"] == 0.5 and rows[0]["hog"] == 1.0
    assert S.summarize([_record_of(ssim=torch.tensor(0.25))], ["method"])[0]["ssim"] == 0.25


# ---------------------------------------------------------------------------- plot_example


@pytest.fixture
def agg():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    yield
    plt.close("all")


@pytest.mark.parametrize("category_id, error, match", [
    (torch.tensor(1, device="meta"), ValueError, "category_id " + META),
    (torch.tensor(1.5), TypeError, r"category_id must be an int \(or a one-element integer "
                                   r"tensor\), got tensor\(1.5000\)"),
    (torch.tensor(True), TypeError, "category_id must be an int"),
    (np.array([1]), TypeError, "category_id must be an int"),
])
def test_plot_example_category_id(agg, category_id, error, match):
    # Were .item()'s RuntimeError on meta, and tensor(1.5) / tensor(True) titled category 1.
    with pytest.raises(error, match=match):
        plot_example(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 4, 4), "g", category_id)


def test_plot_example_class_names(agg):
    x, s = torch.rand(1, 3, 8, 8), torch.rand(1, 1, 4, 4)
    title = lambda **k: plot_example(x, s, "g", torch.tensor(1), **k).axes[1].get_title()
    assert title(class_names={"1": "goldfish"}) == "g (goldfish (1))"   # JSON keys: was unnamed
    assert title(class_names=np.array(["a", "b"])) == "g (b (1))"      # was a TypeError
    with pytest.raises(TypeError, match="class_names must be .*got bytes; pass a list indexed"):
        title(class_names=b"ab")                                        # was titled "98"
    with pytest.raises(TypeError, match="class_names must be .*got set"):
        title(class_names={"a", "b"})


def test_plot_example_keeps_float64_range(agg):
    # float64 values beyond float32 were cast to inf: the input refused as "NaN or infinite",
    # the map painted magenta with a NaN warning.
    x = torch.tensor([1e300, -1e300], dtype=torch.float64).repeat(24).view(1, 3, 4, 4)
    s = torch.tensor([[1e308, -1e308], [0.0, 1.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_example(x, s, "g", 1)
    image = np.asarray(fig.axes[0].images[0].get_array())
    assert image.min() == 0.0 and image.max() == 1.0
    assert np.asarray(fig.axes[1].images[0].get_array()).tolist() == [[1.0, 0.0], [0.5, 0.5]]
