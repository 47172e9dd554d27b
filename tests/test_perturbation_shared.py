"""What RISE and extremal perturbation share, in the public modules named after what they hold:
the seed policy (``seeding``), the progress bar and warnings that point at the caller
(``reporting``), the argument and input checks (``arguments``), denormal flushing and autocast
(``precision``)."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from torchray_like.attribution import reporting
from torchray_like.attribution.arguments import (
    check_batch,
    check_finite,
    check_flag,
    check_number,
    check_progress,
    check_resize,
    is_number,
    number_list,
    per_axis,
    positive_int,
)
from torchray_like.attribution.maps import Shape
from torchray_like.attribution.precision import (
    autocast_forward,
    check_autocast,
    denormals_flushed,
    flush_denormals,
)
from torchray_like.attribution.reporting import progress_bar, warn_caller
from torchray_like.attribution.seeding import global_seed, image_seeds, make_generator

TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------
# Randomness: one policy for RISE and extremal perturbation
# ---------------------------------------------------------------------------------------------


def test_int_seed_and_generator_reproduce_and_none_follows_the_global_rng():
    draw = lambda g: torch.rand(5, generator=g)
    assert torch.equal(draw(make_generator(7)), draw(make_generator(7)))
    assert not torch.equal(draw(make_generator(7)), draw(make_generator(8)))
    g = torch.Generator().manual_seed(3)
    assert make_generator(g) is g                         # a generator is used as it is
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = draw(make_generator(None))
    assert torch.equal(state, torch.get_rng_state())      # the global RNG is not advanced
    assert torch.equal(a, draw(make_generator(None)))     # so repeated calls agree
    assert global_seed() == global_seed()
    torch.manual_seed(6)
    assert not torch.equal(a, draw(make_generator(None)))
    # TorchRay's seed= is generator=int; both at once is ambiguous.
    assert torch.equal(draw(make_generator(None, seed=4)), draw(make_generator(4)))
    with pytest.raises(ValueError, match="pass either generator or seed"):
        make_generator(1, seed=1)


def test_image_seeds_make_a_batch_equal_to_per_image_calls():
    assert image_seeds(10, 3) == [10, 11, 12]
    assert image_seeds([4, 9], 2) == [4, 9]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert image_seeds(g1, 2) == image_seeds(g2, 2)
    base = image_seeds(None, 1)[0]
    assert image_seeds(None, 3) == [base, base + 1, base + 2]
    with pytest.raises(ValueError, match="generator has 3 entries but the batch has 2 images"):
        image_seeds([1, 2, 3], 2)
    with pytest.raises(TypeError, match="generator entry must be a torch.Generator"):
        image_seeds([1, "a"], 2)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, an int seed"):
        image_seeds(1.5, 2)
    with pytest.raises(ValueError, match=r"an int seed must be in \[0, 2\*\*64\)"):
        make_generator(-1)


# ---------------------------------------------------------------------------------------------
# Progress bar
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [True, False, None])
def test_progress_bar_leaves_no_thread_behind(progress, capsys):
    before = set(threading.enumerate())
    with progress_bar(3, progress, "work") as bar:
        for _ in range(3):
            bar.update(1)
    with pytest.raises(RuntimeError, match="inside"):
        with progress_bar(3, progress, "work") as bar:
            raise RuntimeError("inside")
    assert set(threading.enumerate()) == before
    err = capsys.readouterr().err
    assert ("work" in err) == bool(progress)     # None: off, stderr is not a terminal here


def test_check_progress():
    for ok in (True, False, None):
        check_progress(ok)
    with pytest.raises(TypeError, match=r"progress must be True, False or None \(automatic\)"):
        check_progress("yes")


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def test_number_checks():
    assert is_number(3) and is_number(2.5) and not is_number(True) and not is_number("1")
    assert positive_int(3, "n") == 3
    with pytest.raises(ValueError, match=r"n must be a positive int \(>= 1\), got 0"):
        positive_int(0, "n")
    with pytest.raises(TypeError, match="n must be a positive int, got True"):
        positive_int(True, "n")
    assert check_number(0.5, "p", 0, 1, low_open=True) == 0.5
    with pytest.raises(ValueError, match=r"p must be a finite number in \(0, 1\], got 0"):
        check_number(0, "p", 0, 1, low_open=True)
    with pytest.raises(ValueError, match="finite number"):
        check_number(float("nan"), "p")


def test_check_finite_names_the_argument_and_the_kind():
    check_finite(torch.ones(3), "input", "m")
    x = torch.ones(2, 3)
    x[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"m: input has 1 NaN value\(s\) \(shape \(2, 3\)\); "
                                         r"replace them first, e.g. with torch.nan_to_num"):
        check_finite(x, "input", "m")
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"m: input has 2 NaN and infinite value\(s\)"):
        check_finite(x, "input", "m")


# ---------------------------------------------------------------------------------------------
# Denormal floats
# ---------------------------------------------------------------------------------------------


def _denormal_product() -> float:
    return float(torch.full((1,), TINY).mul(0.5).item())


@pytest.mark.parametrize("initial", [False, True])
def test_flush_denormals_restores_the_callers_setting(initial):
    if not torch.set_flush_denormal(initial) and initial:
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert denormals_flushed() is initial
        with flush_denormals() as active:
            assert active and denormals_flushed()
            assert _denormal_product() == 0.0
            with flush_denormals():            # nesting keeps it on ...
                assert denormals_flushed()
            assert denormals_flushed()         # ... and the inner block does not turn it off
        assert denormals_flushed() is initial
        assert (_denormal_product() == 0.0) is initial
        # Also when the block raises.
        with pytest.raises(RuntimeError):
            with flush_denormals():
                raise RuntimeError("inside")
        assert denormals_flushed() is initial
        with flush_denormals(enabled=False) as active:
            assert active is initial and denormals_flushed() is initial
    finally:
        torch.set_flush_denormal(False)


def test_flush_denormals_is_per_thread():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def worker():
        with flush_denormals():
            seen["worker"] = denormals_flushed()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    seen["main while worker flushes"] = denormals_flushed()
    release.set()
    t.join()
    assert seen == {"worker": True, "main while worker flushes": False}
    assert not denormals_flushed()


# ---------------------------------------------------------------------------------------------
# Warnings point at the caller
# ---------------------------------------------------------------------------------------------


def test_warn_caller_points_at_the_first_frame_outside_the_package():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        warn_caller("from inside")
    assert len(w) == 1 and w[0].filename == __file__ and str(w[0].message) == "from inside"
    assert reporting.__file__ != __file__


# ---------------------------------------------------------------------------------------------
# NumPy values are numbers, flags and lists
# ---------------------------------------------------------------------------------------------


def test_numpy_scalars_and_arrays_are_numbers_flags_and_lists():
    assert is_number(np.float32(0.1)) and is_number(np.int64(3)) and not is_number(np.bool_(1))
    assert positive_int(np.int64(3), "n") == 3 and type(positive_int(np.int64(3), "n")) is int
    with pytest.raises(TypeError, match="n must be a positive int, got np.True_"):
        positive_int(np.bool_(True), "n")
    assert check_number(np.float32(0.5), "p", 0, 1) == 0.5
    assert check_flag(np.bool_(True), "debug") is True
    with pytest.raises(TypeError, match="debug must be True or False, got 1"):
        check_flag(1, "debug")
    assert check_progress(np.bool_(False)) is False and check_progress(None) is None
    assert number_list(np.array([1, 2])) == [1, 2] and number_list(torch.tensor([0.5])) == [0.5]
    assert number_list((3,)) == [3] and number_list(3) is None and number_list("ab") is None
    assert number_list(np.zeros((2, 2))) is None
    assert per_axis(np.array([2, 3]), "step", (8, 8), integer=True, minimum=1,
                    strict=False) == (2.0, 3.0)
    assert image_seeds(np.array([4, 9]), 2) == [4, 9] and image_seeds(np.int64(5), 2) == [5, 6]
    assert torch.equal(torch.rand(3, generator=make_generator(np.uint64(7))),
                       torch.rand(3, generator=make_generator(7)))


# ---------------------------------------------------------------------------------------------
# Resize arguments, checked before the work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resize,mode,spatial,expected", [
    (False, "bilinear", 2, False), (None, "bilinear", 2, None), (True, "nearest", 3, True),
    (np.bool_(True), "bilinear", 2, True), (np.int64(5), "bilinear", 2, 5),
    ((4, 6), "bicubic", 2, (4, 6)), (np.array([4, 6]), "area", 2, (4, 6)),
    (Shape(3, 4), "linear", 2, Shape(3, 4)), (7, "linear", 1, 7)])
def test_check_resize_accepts_what_resize_saliency_reads(resize, mode, spatial, expected):
    got = check_resize(resize, mode, spatial)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("resize,mode,spatial,error,match", [
    ((3, 3, 3), "bilinear", 2, ValueError, r"resize must give 2 positive sizes, as a tuple in "
                                           r"TorchRay's order \(W, H\)"),
    (Shape(3), "bilinear", 2, ValueError, r"resize must give 2 positive sizes in torch order "
                                          r"Shape\(H, W\)"),
    (0, "bilinear", 2, ValueError, "resize must give 2 positive sizes"),
    (2.5, "bilinear", 2, TypeError, "resize must be False, True, an int, a tuple of 2 ints"),
    ((4, 4), "cubic", 2, ValueError, "resize_mode must be one of linear/bilinear/trilinear"),
    ((4, 4, 4), "bicubic", 3, ValueError, "resize_mode 'bicubic' needs 2 spatial dimensions"),
    (True, "cubic", 2, ValueError, "resize_mode must be one of"),
])
def test_check_resize_errors(resize, mode, spatial, error, match):
    with pytest.raises(error, match=match):
        check_resize(resize, mode, spatial)


# ---------------------------------------------------------------------------------------------
# The input of a perturbation method
# ---------------------------------------------------------------------------------------------


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_check_batch_refuses_channels_last_and_more_than_three_spatial_dims():
    net = _conv_net()
    x = torch.zeros(2, 3, 5, 5)
    assert check_batch(net, x, "m", needs_grad=False) is x
    with pytest.raises(ValueError, match=r"m: input has shape \(2, 5, 5, 3\), channels last; .*"
                                         r"x\.permute\(0, 3, 1, 2\)"):
        check_batch(net, torch.zeros(2, 5, 5, 3), "m", needs_grad=False)
    with pytest.raises(ValueError, match=r"1 to 3 spatial dimensions\), got shape "
                                         r"\(1, 1, 2, 2, 2, 2\)"):
        check_batch(net, torch.zeros(1, 1, 2, 2, 2, 2), "m", needs_grad=False)
    with pytest.raises(ValueError, match=r"m: input has 3 NaN value"):
        check_batch(net, torch.tensor([[[[float("nan")]]]]).expand(1, 3, 1, 1), "m", False)
    with pytest.raises(RuntimeError, match="torch.inference_mode"):
        with torch.inference_mode():
            check_batch(net, x, "m", needs_grad=True)


# ---------------------------------------------------------------------------------------------
# Autocast
# ---------------------------------------------------------------------------------------------


def test_check_autocast_and_the_forward_context():
    cpu = torch.device("cpu")
    assert check_autocast(None, cpu) is None
    assert check_autocast(torch.bfloat16, cpu) is torch.bfloat16
    for bad in (torch.float32, True, "bf16"):
        with pytest.raises(TypeError, match="autocast must be None, torch.bfloat16 or "
                                            "torch.float16"):
            check_autocast(bad, cpu)
    with autocast_forward(torch.bfloat16, cpu):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_forward(None, cpu):
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")

