"""argparse types for the benchmark scripts' command lines.

Each turns the text of one option into a checked value or raises
:class:`argparse.ArgumentTypeError`, which argparse shows as ``error: argument --x: ...`` with the
usage line, so a bad option is refused before any work starts.  Counts and sizes are capped
(:data:`MAX_SEED`, :data:`MAX_THREADS`, :data:`MAX_IMAGE_SIDE`) so that a typo such as an extra
zero is refused instead of reaching the allocator.  They are re-exported by
:mod:`torchray_like.benchmark.runner`, the import path the scripts use.  (The library's checks of
arguments given in Python are in :mod:`torchray_like.attribution.arguments`.)
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

__all__ = ["positive_int_arg", "device_arg", "non_negative_int_arg", "seed_arg", "MAX_SEED",
           "threads_arg", "threads_or_default_arg", "MAX_THREADS", "image_side_arg",
           "MAX_IMAGE_SIDE"]


def non_negative_int_arg(text: str) -> int:
    """argparse type: an int ≥ 0 (a seed; a thread count where 0 keeps PyTorch's default)."""
    return _int_arg(text, 0, "non-negative")


#: The largest seed every generator the benchmarks seed accepts (NumPy's legacy
#: ``np.random.seed``, which Quantus draws from, stops at 2**32 - 1).
MAX_SEED = 2 ** 32 - 1


def seed_arg(text: str) -> int:
    """argparse type: a seed, an int in ``[0, 2**32 - 1]`` (NumPy's range, the narrowest of the
    generators seeded)."""
    return _at_most(_int_arg(text, 0, "non-negative"), MAX_SEED, "a seed",
                    f"2**32 - 1 = {MAX_SEED} (NumPy's range)")


#: The most threads a ``--threads`` accepts (``torch.set_num_threads`` overflows at 2**31,
#: and far fewer already only oversubscribe the cores).
MAX_THREADS = 1024


def threads_arg(text: str) -> int:
    """argparse type: a thread count in ``[1, MAX_THREADS]``."""
    return _at_most(_int_arg(text, 1, "positive"), MAX_THREADS, "a thread count")


def threads_or_default_arg(text: str) -> int:
    """argparse type: a thread count in ``[0, MAX_THREADS]``, 0 keeping PyTorch's default."""
    return _at_most(_int_arg(text, 0, "non-negative"), MAX_THREADS, "a thread count")


def _at_most(value: int, maximum: int, what: str, shown: Optional[str] = None) -> int:
    """``value`` if at most ``maximum`` (written ``shown`` in the message), else an argparse
    error naming ``what``."""
    if value > maximum:
        raise argparse.ArgumentTypeError(f"{what} must be at most {shown or maximum}, got "
                                         f"{value}")
    return value


#: The largest image side an ``--input-size`` accepts (a 16 384² RGB float image is 3 GiB).
MAX_IMAGE_SIDE = 16384


def image_side_arg(text: str) -> int:
    """argparse type: an image side in pixels, in ``[1, MAX_IMAGE_SIDE]``."""
    return _at_most(_int_arg(text, 1, "positive"), MAX_IMAGE_SIDE, "an image side (px)")


def positive_int_arg(text: str) -> int:
    """argparse type: an int ≥ 1 from the command line's text (the library's checks of
    arguments given in Python are :func:`torchray_like.attribution.arguments.positive_int`)."""
    return _int_arg(text, 1, "positive")


def _int_arg(text: str, minimum: int, kind: str) -> int:
    """``int(text)`` if at least ``minimum``, else an argparse error naming ``kind``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
    return value


def device_arg(text: str) -> str:
    """argparse type: a device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"not a device: {text!r} (use cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but MPS is not available")
    return text
