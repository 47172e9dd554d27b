"""Hostile inputs, fifth sweep: the evaluation and plotting functions a researcher calls directly
(benchmark.pointing_game, deletion_insertion, sanity_checks, intervals, quantus, plot; visualize;
utils)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported anywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest
import torch

from tests.test_datasets import make_voc
from torchray_like import utils, visualize
from torchray_like.benchmark import datasets, runner, settings
from torchray_like.benchmark import deletion_insertion as di
from torchray_like.benchmark import intervals as iv
from torchray_like.benchmark import pointing_game as pg
from torchray_like.benchmark import sanity_checks as sc
from torchray_like.benchmark.plot import plot_example
from torchray_like.benchmark.quantus import explain

pytestmark = pytest.mark.usefixtures("one_thread")
nn = torch.nn


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5)).eval()


def _images(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# deletion_insertion: a meta saliency was "Cannot copy out of meta tensor" (NotImplementedError),
# a meta substrate "does not broadcast" to a same-shaped input; a float64 batch for a float32
# model was PyTorch's "Input type (double) and bias type (float)"; a NaN pixel gave NaN curves
# and a NaN AUC without a word.


def test_deletion_insertion_meta_saliency_and_substrate():
    model, x, s = _convnet(), _images(1, 3, 8, 8), _images(1, 1, 8, 8)
    with pytest.raises(ValueError, match="saliency is on the meta device"):
        di.deletion_insertion(model, x, s.to("meta"), 1, step=16)
    with pytest.raises(ValueError, match="substrate is on the meta device"):
        di.deletion_insertion(model, x, s, 1, step=16,
                              substrate=torch.zeros(1, 3, 8, 8, device="meta"))


def test_deletion_insertion_dtype_mismatch_is_named():
    model, x, s = _convnet(), _images(1, 3, 8, 8), _images(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"input is float64 but the model's parameters are "
                                         r"float32: pass x.to\(torch.float32\)"):
        di.deletion_insertion(model, x.double(), s, 1, step=16)
    assert not model.training


def test_deletion_insertion_nan_input_is_refused():
    model, x, s = _convnet(), _images(1, 3, 8, 8), _images(1, 1, 8, 8)
    x[0, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"deletion_insertion: input has 1 NaN value"):
        di.deletion_insertion(model, x, s, 1, step=16)


# ---------------------------------------------------------------------------------------------
# pointing game: a complex saliency took its real part (a torch warning only when resized), a
# NaN mask pixel counted as object (NaN != 0), meta tensors were NotImplementedError /
# "Tensor.item() cannot be called on meta tensors".


def test_saliency_to_point_refuses_complex_and_meta():
    s = _images(1, 1, 7, 9)
    for size in [(7, 9), (14, 18)]:
        with pytest.raises(TypeError, match=r"saliency must be real, got dtype torch.complex64"):
            pg.saliency_to_point(s.to(torch.complex64), size)
        with pytest.raises(ValueError, match="saliency is on the meta device"):
            pg.saliency_to_point(s.to("meta"), size)


def test_pointing_game_mask_nan_and_meta():
    game = pg.PointingGame(3, tolerance=1)
    mask = torch.zeros(10, 10)
    mask[2:4, 2:4] = 1.0
    assert game.evaluate(mask, (3, 3)) == 1
    mask[8, 8] = float("nan")
    with pytest.raises(ValueError, match="mask contains NaN or infinite values"):
        game.evaluate(mask, (8, 8))
    with pytest.raises(ValueError, match="mask is on the meta device"):
        game.evaluate(torch.zeros(10, 10, dtype=torch.bool, device="meta"), (3, 3))


# ---------------------------------------------------------------------------------------------
# top_present_class: a class beyond the scores was an IndexError, a negative one wrapped around
# (-1 was the last class), a float was truncated, a flat list was "'int' object is not iterable";
# auc with decreasing fractions returned a negative area.


def test_top_present_class_checks_present():
    model, x = _convnet(), _images(2, 3, 8, 8)
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    expected = [max([1, 2], key=lambda c: float(probs[0, c])), 3]
    assert di.top_present_class(model, x, [[1, 2], np.array([3])]) == expected
    with pytest.raises(ValueError, match=r"present\[0\] holds class 9, out of range: the scores "
                                         r"have 5 classes"):
        di.top_present_class(model, x, [[9], [1]])
    with pytest.raises(ValueError, match=r"present\[1\] holds class -1, out of range"):
        di.top_present_class(model, x, [[1], [-1]])
    with pytest.raises(TypeError, match=r"present\[0\] must hold int class indices, got 1.5"):
        di.top_present_class(model, x, [[1.5], [1]])
    with pytest.raises(TypeError, match=r"present\[0\] must be a list of class indices, got 1"):
        di.top_present_class(model, x, [1, 2])
    with pytest.raises(TypeError, match="present must be a sequence of class-index lists"):
        di.top_present_class(model, x, None)


def test_auc_refuses_decreasing_fractions():
    curve = torch.tensor([1.0, 0.5, 0.0])
    assert float(di.auc(curve, torch.tensor([0.0, 0.5, 1.0]))) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="fractions must be finite and non-decreasing"):
        di.auc(curve, torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="fractions must be finite and non-decreasing"):
        di.auc(curve, torch.tensor([0.0, float("nan"), 1.0]))


# ---------------------------------------------------------------------------------------------
# intervals: complex values lost their imaginary part with only NumPy's ComplexWarning; verdict
# of a tuple was an AttributeError and took a negative or float min_images.


def test_mean_interval_refuses_complex():
    values = np.linspace(0.0, 1.0, 10)
    with pytest.raises(TypeError, match="values must be real numbers, got complex"):
        iv.mean_interval(values.astype(complex), resamples=100)
    with pytest.raises(TypeError, match="values_a must be real numbers"):
        iv.paired_mean_difference(torch.tensor(values, dtype=torch.complex128), values,
                                  resamples=100)


def test_verdict_checks_its_arguments():
    interval = iv.mean_interval(np.linspace(1.0, 2.0, 10), resamples=100)
    assert iv.verdict(interval) == "reproduced"
    with pytest.raises(TypeError, match="interval must be an Interval"):
        iv.verdict((0.0, 1.0))
    for bad in (-1, 0, 1.5, None, True):
        with pytest.raises(ValueError, match="min_images must be a positive int"):
            iv.verdict(interval, min_images=bad)



# ---------------------------------------------------------------------------------------------
# sanity checks: an unbatched or float64 input was PyTorch's "mat1 and mat2 shapes cannot be
# multiplied" / "Input type (double)"; a meta map was NotImplementedError, a complex one lost
# its imaginary part silently; summarize with an unknown key (or keys="method") was a KeyError;
# randomize_layer took seed=1.5 (truncated) and seed=-1 (wrapped).


def test_sanity_checks_names_unbatched_and_float64_inputs():
    model, x = _convnet(), _images(1, 3, 8, 8)
    with pytest.raises(ValueError, match="a single sample without the batch dimension"):
        sc.sanity_checks(model, x[0], 1, "gradient")
    with pytest.raises(ValueError, match="input is float64 but the model's parameters are "
                                         "float32"):
        sc.sanity_checks(model, x.double(), 1, "gradient")
    assert len(sc.sanity_checks(model, x, 1, "gradient", seed=np.int64(1))) == 3


def test_compare_maps_refuses_meta_and_complex():
    a = _images(8, 8)
    assert sc.compare_maps(a, a)["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="other is on the meta device"):
        sc.compare_maps(a, a.to("meta"))
    with pytest.raises(TypeError, match="reference must be a real map, got complex"):
        sc.compare_maps(a.to(torch.complex64), a)
    with pytest.raises(TypeError, match="other must be a real map, got complex"):
        sc.compare_maps(a.numpy(), a.numpy().astype(complex))


def test_summarize_checks_keys_and_records():
    records = [{"method": "m", "layer": "x", "spearman_abs": 0.5},
               {"method": "m", "layer": "x", "spearman_abs": 0.7}]
    (row,) = sc.summarize(records, keys=["method"])
    assert row["n"] == 2 and row["spearman_abs"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="records\\[0\\] has no field 'nope' to group by"):
        sc.summarize(records, keys=("nope",))
    with pytest.raises(TypeError, match="keys must be a sequence of record field names"):
        sc.summarize(records, keys="method")
    with pytest.raises(TypeError, match="records\\[1\\] must be a dict"):
        sc.summarize([records[0], 3], keys=("method",))


@pytest.mark.parametrize("seed", [-1, 1.5, True, 2 ** 64])
def test_randomize_layer_checks_seed(seed):
    layer = nn.Linear(2, 2)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="seed must be an int in \\[0, 2\\*\\*64\\)"):
        sc.randomize_layer(layer, seed)
    assert torch.equal(layer.weight, before)


# ---------------------------------------------------------------------------------------------
# Plots and display helpers: a meta tensor was "Cannot copy out of meta tensor"
# (NotImplementedError) in every plot and in imsc / imarraysc / im_to_numpy; plot_example and
# imsc showed a complex tensor's real part (plot_example with a PyTorch warning, imsc silently);
# imsc of an empty image was PyTorch's "min(): Expected reduction dim"; a save path in a missing
# folder was FileNotFoundError after the drawing, a folder was written as "<folder>.png",
# plot_example(save_path=3) an AttributeError, show_plot="no" showed the plot; imread(None) an
# AttributeError.


@pytest.fixture
def agg():
    yield
    plt.close("all")


def test_plots_refuse_meta_and_complex(agg):
    x, s = _images(1, 3, 8, 8), _images(1, 1, 8, 8)
    with pytest.raises(ValueError, match="saliency is on the meta device"):
        visualize.saliency_plot(x, s.to("meta"))
    with pytest.raises(ValueError, match="x is on the meta device"):
        visualize.saliency_plot(x.to("meta"), s)
    with pytest.raises(ValueError, match=r"maps\['a'\] is on the meta device"):
        visualize.plot_methods(x, {"a": s.to("meta")})
    with pytest.raises(ValueError, match="image is on the meta device"):
        visualize.overlay(x.to("meta"), s)
    with pytest.raises(ValueError, match="saliency is on the meta device"):
        plot_example(x, s.to("meta"), "gradient", 1)
    with pytest.raises(TypeError, match=r"saliency is complex; pass its magnitude"):
        plot_example(x, s.to(torch.complex64), "gradient", 1)
    with pytest.raises(TypeError, match=r"input is complex; pass its magnitude"):
        plot_example(x.to(torch.complex64), s, "gradient", 1)


def test_display_helpers_refuse_meta_complex_and_empty():
    img = _images(3, 8, 8)
    with pytest.raises(ValueError, match="img is on the meta device"):
        utils.imsc(img.to("meta"), quiet=True)
    with pytest.raises(TypeError, match=r"img is complex; pass its magnitude \(img.abs\(\)\)"):
        utils.imsc(img.to(torch.complex64), quiet=True)
    with pytest.raises(ValueError, match=r"img is empty \(shape \(3, 0, 8\)\)"):
        utils.imsc(torch.rand(3, 0, 8), quiet=True)
    with pytest.raises(ValueError, match="tiles is on the meta device"):
        utils.imarraysc(img[None].to("meta"), quiet=True)
    with pytest.raises(ValueError, match="tensor is on the meta device"):
        utils.tensor_to_im(img.to("meta"))
    for bad in (None, 3):
        with pytest.raises(TypeError, match="file must be a path, a URL or an open binary file"):
            utils.imread(bad)


def test_save_paths_are_checked_before_drawing(agg, tmp_path):
    x, s = _images(1, 3, 8, 8), _images(1, 1, 8, 8)
    missing = tmp_path / "missing" / "a.png"
    with pytest.raises(ValueError, match="save: the folder .*missing' does not exist; create it"):
        visualize.saliency_plot(x, s, save=missing)
    with pytest.raises(ValueError, match="save_path: the folder .*missing' does not exist"):
        plot_example(x, s, "gradient", 1, save_path=str(missing))
    with pytest.raises(ValueError, match="save is a folder"):
        visualize.plot_methods(x, {"a": s}, save=tmp_path)
    with pytest.raises(ValueError, match="save_path has the extension 'xyz', which matplotlib "
                                         "cannot write; use one of .*png"):
        plot_example(x, s, "gradient", 1, save_path=tmp_path / "a.xyz")
    with pytest.raises(TypeError, match="save_path must be None or a file path, got int"):
        plot_example(x, s, "gradient", 1, save_path=3)
    with pytest.raises(TypeError, match="show_plot must be True or False, got 'no'"):
        plot_example(x, s, "gradient", 1, show_plot="no")
    assert os.listdir(tmp_path) == []
    plot_example(x, s, "gradient", 1, save_path=tmp_path / "a.PDF")
    assert os.listdir(tmp_path) == ["a.PDF"]


# ---------------------------------------------------------------------------------------------
# quantus.explain: a meta input was "Tensor.item() cannot be called on meta tensors";
# channel_first="no" (truthy) was taken as channels first.  settings: torchvision_layers(None)
# was an AttributeError, options_table("grad_cam", ...) "unknown method 'g'".  runner:
# run_sharded(store=None) an AttributeError, items=None "'NoneType' object is not iterable",
# progress="yes" accepted; ResultsStore(None) "expected str, bytes or os.PathLike object".
# datasets: voc[1.5] / voc["a"] an IndexError "out of range", get_dataset(dataset_dir=3)
# "expected str, bytes or os.PathLike object".


def test_quantus_explain_refuses_meta_inputs_and_a_non_bool_layout():
    model, x = _convnet(), _images(2, 3, 8, 8)
    maps = explain(model, x.numpy(), [1, 2])
    assert maps.shape == (2, 1, 8, 8) and maps.dtype == np.float32
    with pytest.raises(ValueError, match="inputs are on the meta device"):
        explain(model, x.to("meta"), [1, 2])
    with pytest.raises(TypeError, match="channel_first must be True or False, got 'no'"):
        explain(model, x.numpy(), [1, 2], channel_first="no")


def test_settings_check_model_and_method_list():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
        settings.torchvision_layers(None)
    with pytest.raises(TypeError, match=r"methods must be a list of method names, got the str "
                                         r"'grad_cam'; pass \['grad_cam'\]"):
        settings.options_table("grad_cam", "vgg16")
    assert settings.options_table(["grad_cam"], "vgg16") == {
        "grad_cam": settings.method_options("grad_cam", "vgg16")}


def test_runner_checks_store_items_progress_and_path(tmp_path):
    store = runner.ResultsStore(tmp_path / "r.sqlite", "exp", {"a": 1})
    with pytest.raises(TypeError, match="store must be a ResultsStore, got NoneType"):
        runner.run_sharded([1], lambda i: {"v": i}, None, progress=False)
    with pytest.raises(TypeError, match="items must be a sequence of work items, got NoneType"):
        runner.run_sharded(None, lambda i: {"v": i}, store, progress=False)
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        runner.run_sharded([1], lambda i: {"v": i}, store, progress="yes")
    assert store.records() == []
    runner.run_sharded((1, 2), lambda i: {"v": i * 10}, store, progress=False)
    assert sorted(r["v"] for r in store.records()) == [10, 20]
    for bad in (None, 3):
        with pytest.raises(TypeError, match="path must be a file path"):
            runner.ResultsStore(bad, "exp")


def test_voc_index_type_and_dataset_dir_type(tmp_path):
    voc = datasets.get_dataset("voc_2007", "test", dataset_dir=str(make_voc(tmp_path / "voc")))
    assert voc[np.int64(0)][1] == voc[0][1]
    for bad in (1.5, "a", torch.tensor(0)):
        with pytest.raises(TypeError, match="index must be an int"):
            voc[bad]
    with pytest.raises(IndexError, match="index 3 is out of range for a data set of 3 items"):
        voc[3]  # IndexError: iteration stops on it
    with pytest.raises(TypeError, match="dataset_dir must be a folder path"):
        datasets.get_dataset("voc_2007", "test", dataset_dir=3)


# visualize: colorbar="no" and normalize="no" are truthy strings: a colour bar was drawn and the
# map stretched, against what the caller wrote.


def test_visualize_flags_must_be_bools(agg):
    x, s = _images(1, 3, 8, 8), _images(1, 1, 8, 8)
    with pytest.raises(TypeError, match="colorbar must be True or False, got 'no'"):
        visualize.saliency_plot(x, s, colorbar="no")
    with pytest.raises(TypeError, match="colorbar must be True or False, got 'no'"):
        visualize.plot_methods(x, {"a": s}, colorbar="no")
    with pytest.raises(TypeError, match="normalize must be True or False, got 'no'"):
        visualize.overlay(x, s, normalize="no")
    assert len(visualize.saliency_plot(x, s, colorbar=np.bool_(False)).axes) == 1


# read_difficult_file of a binary file was a bare UnicodeDecodeError that did not name the file.


def test_read_difficult_file_names_a_binary_file(tmp_path):
    good = tmp_path / "difficult.txt"
    good.write_text("000042 0 1 0\n")
    assert pg.read_difficult_file(good, 3)["42"].tolist() == [False, True, False]
    binary = tmp_path / "difficult.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match=r"difficult-pair file .*difficult.bin is not UTF-8 text"):
        pg.read_difficult_file(binary, 3)


# intervals with a huge resamples: NumPy's MemoryError "Unable to allocate 1.46 TiB".


def test_huge_resamples_is_refused_with_the_memory_it_needs():
    with pytest.raises(ValueError, match=r"resamples=10000000000 of 20 images need 2980 GiB.*use "
                                         r"fewer resamples"):
        iv.mean_interval(np.linspace(0.0, 1.0, 20), resamples=10 ** 10)
    with pytest.raises(ValueError, match="use fewer resamples"):
        iv.resample_counts(10 ** 6, resamples=10 ** 6)


def test_a_meta_target_in_deletion_insertion_is_named():
    # Before: PyTorch's NotImplementedError from copying the meta tensor to the input's device.
    from torchray_like.benchmark.deletion_insertion import deletion_insertion
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"target is on the meta device \(a tensor without "
                                         r"values\); pass class indices"):
        deletion_insertion(model, x, torch.rand(1, 1, 8, 8), torch.tensor([1], device="meta"))
