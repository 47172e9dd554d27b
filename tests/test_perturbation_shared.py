"""What RISE and extremal perturbation share (``attribution/_perturbation.py``): the seed policy,
the progress bar, the argument checks, the finiteness check, denormal flushing and warnings that
point at the caller."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from torchray_like.attribution import _perturbation as shared
from torchray_like.attribution._perturbation import (check_finite, check_number, check_progress,
                                                     denormals_flushed, flush_denormals,
                                                     global_seed, image_seeds, is_number,
                                                     make_generator, positive_int, progress_bar,
                                                     warn_caller)

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
    assert shared.__file__ != __file__
