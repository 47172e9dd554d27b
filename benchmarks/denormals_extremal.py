"""Denormal floats and extremal perturbation: what flushing them costs and saves.

Arithmetic on denormal floats (magnitudes below 1.2e-38 in float32) is many times slower than on
normal ones on most CPUs.  Extremal perturbation's masks, gradients and momentum buffers decay
geometrically far from the evidence and can drift into that range; ``extremal_perturbation``
therefore flushes denormals to zero for the duration of the call (``flush_denormals=True``, the
default; the caller's setting is restored afterwards).  This script prints

1. the penalty of denormal arithmetic on this CPU (a multiply-add over denormals vs normals);
2. the time of one ``extremal_perturbation`` call on the toy of the tests (64² image, a box
   model, fade, 5 % area, ``max_iter`` iterations, step 4, sigma 8, no jitter), with and without
   flushing, timed alternately;
3. how many denormal values the call produces when they are not flushed (every tensor an
   operator returns is inspected, in a separate run).

Usage::

    python benchmarks/denormals_extremal.py                 # about a minute on 2 busy cores
    python benchmarks/denormals_extremal.py --ep-iters 200 --repeats 1
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from torchray_like.attribution.extremal_perturbation import extremal_perturbation  # noqa: E402
from torchray_like.benchmark.runner import image_side_arg, positive_int_arg, threads_arg  # noqa: E402

TINY = torch.finfo(torch.float32).tiny


class BoxLogit(nn.Module):
    """Class 0's logit is ``scale`` × the mean of the input inside a 16 × 16 box."""

    def __init__(self, side: int, scale: float = 20.0) -> None:
        super().__init__()
        w = torch.zeros(2, side, side)
        a = side // 8
        w[0, a:a + side // 4, 4 * a + a // 2:4 * a + a // 2 + side // 4] = 1.0
        w[1, 5 * a:5 * a + side // 4, a:a + side // 4] = 1.0
        self.register_buffer("w", w / w[0].sum())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.einsum("nchw,khw->nk", x, self.w.to(x.dtype)) / x.shape[1]


def flushes_denormals() -> bool:
    """Whether the CPU flushes denormals now (PyTorch has no getter: half of the smallest normal
    float is 0 when it does)."""
    return bool((torch.tensor([TINY]) * 0.5) == 0)


def arithmetic_penalty(n: int = 1 << 20, repeats: int = 5) -> float:
    """Time of ``a * b + c`` over denormals divided by the time over normal numbers."""
    def timed(value: float) -> float:
        a = torch.full((n,), value)
        b = torch.full((n,), 0.999)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.addcmul(a, a, b)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return timed(TINY / 8) / timed(1.0)


def call(model: nn.Module, x: torch.Tensor, iters: int, flush: bool) -> float:
    t0 = time.perf_counter()
    extremal_perturbation(model, x, 0, areas=[0.05], perturbation="fade", max_iter=iters, step=4,
                          sigma=8, jitter=False, progress=False, flush_denormals=flush)
    return time.perf_counter() - t0


class CountDenormals(TorchDispatchMode):
    """Counts the denormal values in every floating tensor an operator computes.

    Not counted: uninitialised memory (``empty`` ...), views (they show values computed
    elsewhere, or not yet written), and the one-element probe with which the method reads the
    CPU's setting (``tiny / 2``)."""

    SKIP = ("empty", "empty_like", "empty_strided", "new_empty")

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        views = any(r.alias_info is not None and not r.alias_info.is_write
                    for r in func._schema.returns)
        if name in self.SKIP or views:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                tiny = torch.finfo(t.dtype).tiny
                if t.numel() == 1 and float(t) == tiny / 2:
                    continue
                d = int(((t != 0) & (t.abs() < tiny)).sum())
                if d:
                    self.counts[name] += d
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--ep-iters", type=positive_int_arg, default=800, metavar="N",
                        help="extremal perturbation iterations per call (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int_arg, default=2,
                        help="timed calls per setting, alternating (default: %(default)s)")
    parser.add_argument("--input-size", type=image_side_arg, default=64, metavar="PX",
                        help="image side (default: %(default)s)")
    parser.add_argument("--threads", type=threads_arg, default=1,
                        help="torch.set_num_threads for the run (default: %(default)s)")
    parser.add_argument("--no-count", action="store_true",
                        help="skip the run that counts denormal values (the slowest part)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    flushing = flushes_denormals()       # the caller's setting, put back afterwards
    try:
        return run(args)
    finally:
        torch.set_flush_denormal(flushing)
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    """The three measurements of the module notes."""
    supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); flushing denormals "
          f"{'is' if supported else 'is NOT'} supported on this CPU")
    print(f"denormal arithmetic on this CPU: {arithmetic_penalty():.1f}× the time of normal "
          "arithmetic (addcmul over 1M floats)")
    side, iters = args.input_size, args.ep_iters
    model = BoxLogit(side)
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    x = x * 0.2 + 0.8
    call(model, x, 5, True)                     # warm-up
    times: dict = {True: [], False: []}
    for _ in range(args.repeats):
        for flush in (True, False):
            times[flush].append(call(model, x, iters, flush))
    on, off = (statistics.median(times[f]) for f in (True, False))
    print(f"extremal_perturbation, {side}² toy, {iters} iterations:")
    print(f"  flush_denormals=True  (default) {on:7.2f} s")
    print(f"  flush_denormals=False           {off:7.2f} s   ({off / on:.2f}× the default)")
    if not args.no_count:
        counter = CountDenormals()
        with counter:
            extremal_perturbation(model, x, 0, areas=[0.05], perturbation="fade",
                                  max_iter=iters, step=4, sigma=8, jitter=False,
                                  progress=False, flush_denormals=False)
        total = sum(counter.counts.values())
        print(f"denormal values produced without flushing: {total}"
              + (" (" + ", ".join(f"{k}: {v}" for k, v in counter.counts.most_common(5)) + ")"
                 if total else " — the values stay out of the denormal range"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
