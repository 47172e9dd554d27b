"""The timing harness of ``benchmarks/speed.py``: nothing it builds may stay attached to the model
while rows are timed (a reference library object that hooks its layer from construction until
released made every row and floor pay for its hooks)."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import _harness  # noqa: E402
import _references  # noqa: E402
import speed  # noqa: E402
from _beyond import LRP_ROWS  # noqa: E402

from torchray_like.attribution.registry import METHODS  # noqa: E402


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_a_hook_left_behind_stops_the_timing():
    model = net()
    before = _harness.module_hooks(model)
    assert before == {}
    handle = model[0].register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match=r"left hooks on the model \(\{'0': 1\}"):
        _harness.check_no_hooks_left(model, before, "a reference")
    handle.remove()
    _harness.check_no_hooks_left(model, before, "a reference")  # nothing left: silent


@pytest.mark.parametrize("method", sorted(_references.GRAD_CAM_CLASSES))
def test_pytorch_grad_cam_references_hook_only_inside_their_call(method):
    pytest.importorskip("pytorch_grad_cam")
    model, x = net(), torch.rand(1, 3, 12, 12)
    batch = 4 if method in ("score_cam", "ablation_cam") else None
    run = _references.grad_cam_method(method, model, x, [1], model[0], batch)
    assert _harness.module_hooks(model) == {}  # built: no hook yet
    out = run()
    assert out.shape == (1, 12, 12)
    assert _harness.module_hooks(model) == {}  # called: released
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_building_every_row_leaves_no_hook():
    args = speed.parse_args(["--models", "embedded-vgg"])  # with the reference libraries
    s = speed.setup("embedded-vgg", args, torch.device("cpu"))
    before = _harness.module_hooks(s.model)
    cases = [c for family in speed.CASES for c in family(s)]  # alive while checked
    _harness.check_no_hooks_left(s.model, before, "building the rows")
    assert len(cases) > 30


def test_blas_threads_caps_numpy_blas_for_the_run_and_restores_it():
    # NumPy's OpenBLAS threads spin after each call (pytorch-grad-cam's SVD): uncapped, the
    # Eigen-CAM row was charged their spinning (3.0 -> 7.9 ms of process CPU time measured).
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pytest.importorskip("numpy")
    before = {p["filepath"]: p["num_threads"] for p in threadpoolctl.threadpool_info()}
    with _harness.blas_threads(1):
        inside = threadpoolctl.threadpool_info()
        assert inside and all(p["num_threads"] == 1 for p in inside)
    after = {p["filepath"]: p["num_threads"] for p in threadpoolctl.threadpool_info()}
    assert after == before


def test_blas_threads_without_threadpoolctl_does_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    with _harness.blas_threads(1) as value:
        assert value is None


def test_a_model_that_does_not_take_the_input_size_stops_the_run_clearly(capsys):
    # The embedded VGG takes 64² images only: a raw shape error from the first row before.
    with pytest.raises(SystemExit, match=r"embedded-vgg does not take 96×96 inputs .*"
                                         r"--input-size it was made for \(64"):
        speed.main(["--models", "embedded-vgg", "--input-size", "96", "--methods", "gradient",
                    "--repeats", "1", "--no-references"])


@pytest.mark.parametrize("size", [["--batch-size", str(2 ** 42)],
                                  ["--batch-size", str(2 ** 30), "--input-size", "16384"]])
def test_a_batch_beyond_memory_stops_the_run_with_what_to_do(size):
    # Before: the allocator's error, or "Storage size calculation overflowed", as a traceback.
    with pytest.raises(SystemExit, match=r"speed\.py: a batch of .* does not fit \(.*\); use "
                                         r"a smaller --batch-size or --input-size"):
        speed.main(["--models", "embedded-vgg", "--methods", "gradient", "--repeats", "1",
                    "--no-references", *size])


@pytest.mark.parametrize("script, argv, message", [
    ("speed", ["--models", "resnet19"], r"--models: unknown model\(s\) resnet19; give embedded "
                                        r"or torchvision classification models, e\.g\."),
    ("speed_rise", ["--models", "resnet19"], r"--models: unknown model\(s\) resnet19; give "
                                             r"torchvision classification models"),
    ("speed_rise", ["--repeats", "0"], r"--repeats: expected a positive integer, got 0"),
    ("speed_rise", ["--rise-masks", "8", "0"], r"--rise-masks: expected a positive integer"),
    # Before: torch's RuntimeError from set_num_threads, and the library's seed error as a
    # traceback.
    ("speed", ["--threads", "-1"], r"--threads: expected a positive integer, got -1"),
    ("compare", ["--seed", "-1"], r"--seed: expected a non-negative integer, got -1"),
    # Before: NumPy's "Seed must be between 0 and 2**32 - 1" as a traceback (Quantus seeds
    # NumPy's legacy generator); train_embedded.py had its own copies of the int types.
    ("quantus_metrics", ["--seed", str(2 ** 32)], r"--seed: a seed must be at most 2\*\*32 - 1"),
    ("train_embedded", ["--seed", str(2 ** 32)], r"--seed: a seed must be at most 2\*\*32 - 1"),
    ("train_embedded", ["--epochs", "0"], r"--epochs: expected a positive integer, got 0"),
    ("train_embedded", ["--workers", "-1"], r"--workers: expected a non-negative integer"),
    # Before: torch.set_num_threads's "Overflow when unpacking long", and for a blur wider
    # than the library's largest kernel an OverflowError / the allocator's error.
    ("deletion_insertion", ["--threads", str(2 ** 42)], r"--threads: a thread count must be "
                                                        r"at most 1024, got 4398046511104"),
    ("speed", ["--threads", "1025"], r"--threads: a thread count must be at most 1024"),
    ("speed", ["--repeats", "0"], r"--repeats: expected a positive integer, got 0"),
    # Before: torch.device's RuntimeError ("Invalid device string") as a traceback.
    ("speed", ["--device", "nan"], r"--device: not a device: 'nan' \(use cpu, cuda"),
    # Before: "Storage size calculation overflowed" as a traceback.
    ("speed_rise", ["--input-size", str(2 ** 42)], r"--input-size: an image side \(px\) must be "
                                                   r"at most 16384, got 4398046511104"),
    ("speed_rise", ["--device", "0"], r"--device: not a device: '0'"),
    ("compare", ["--device", "-1"], r"--device: not a device: '-1'"),
    ("deletion_insertion", ["--blur-sigma", "1e99"], r"--blur-sigma must be at most 262143 px "
                                                     r"\(a wider blur is constant over any "
                                                     r"image\), got 1e\+99"),
    # Before: the library's ValueError as a traceback.
    ("speed_extremal", ["--areas", "0.1", "1.5"], r"--areas: expected a fraction strictly "
                                                   r"between 0 and 1, got 1\.5"),
    ("speed_extremal", ["--sigma", "0"], r"--sigma: expected a finite number > 0, got 0\.0"),
])
def test_bad_command_lines_are_argparse_errors(script, argv, message, capsys):
    # Before: AttributeError from torchvision.models for an unknown name, and
    # statistics.StatisticsError ("no median for empty data") for --repeats 0.
    from .conftest import load_benchmark
    main = speed.main if script == "speed" else load_benchmark(script).main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_every_lrp_method_has_a_speed_row():
    # lrp_epsilon_plus had no row ("no speed case"); lrp_epsilon_plus_flat is the lrp row's
    # computation (lrp's default composite), timed under that row.
    args = speed.parse_args(["--methods", "lrp_epsilon_plus_flat", "lrp", "lrp_epsilon_plus"])
    assert args.methods == ["lrp", "lrp_epsilon_plus"]
    assert sorted(args.named_methods) == ["lrp", "lrp", "lrp_epsilon_plus"]
    cnn_lrp = [m for m in METHODS if m.startswith("lrp")]
    rows = {speed.SAME_ROW.get(m, m) for m in cnn_lrp}
    assert rows <= {method for method, _ in LRP_ROWS}
