"""Extremal perturbation's speed: against TorchRay at equal settings, and against its floor.

For each model — the 64² box toy of the tests (a model that costs nothing, so the method's own
work is all there is) and the embedded models at their 64² input — one table row gives the CPU
time per call of

* ours: ``extremal_perturbation`` (Fong, Patrick, Vedaldi, ICCV 2019) with TorchRay's settings
  (blur perturbation, 8 levels, ``max_blur`` 20, ``step`` and ``sigma`` as given, jitter on);
* TorchRay: TorchRay 1.0.0.2's ``extremal_perturbation`` (installed separately, or unpacked and
  given with ``--torchray-path``; run as a black box) with the same areas, iterations, step and
  sigma;
* the floor: what no implementation can avoid, ``max_iter`` × (forward of the ``N·K`` perturbed
  images + ``autograd.grad`` down to them), as ``benchmarks/speed.py`` defines it;

and the ratios TorchRay / ours (above 1: we are faster) and ours / floor.  The three are timed in
turn (interleaved, the order rotating), ``--repeats`` times, and the median is kept; the time is
the CPU time of the calling thread (``time.thread_time``), with one PyTorch thread, so that other
work on a busy machine does not enter the ratios.

Usage::

    python benchmarks/speed_extremal.py                       # a few minutes on a 2-core CPU
    python benchmarks/speed_extremal.py --torchray-path /tmp/torchray_pkg --ep-iters 800
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from torchray_like.attribution.extremal_perturbation import extremal_perturbation  # noqa: E402
from torchray_like.benchmark.embedded_models import (  # noqa: E402
    EMBEDDED_MODELS,
    load_embedded_model,
)
from torchray_like.benchmark.runner import positive_int_arg  # noqa: E402


class BoxLogit(nn.Module):
    """The toy: class 0's logit is 20 × the mean of the input inside a box of a quarter of
    the side (class 1 another box); costs next to nothing, so only the method is timed."""

    def __init__(self, side: int) -> None:
        super().__init__()
        w = torch.zeros(2, side, side)
        a = side // 8
        w[0, a:a + side // 4, 4 * a + a // 2:4 * a + a // 2 + side // 4] = 1.0
        w[1, 5 * a:5 * a + side // 4, a:a + side // 4] = 1.0
        self.register_buffer("w", w / w[0].sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * torch.einsum("nchw,khw->nk", x, self.w.to(x.dtype)) / x.shape[1]


def _floor(model: nn.Module, x: torch.Tensor, target: int, k: int,
           iters: int) -> Callable[[], None]:
    """``iters`` × (forward of the ``N·K`` batch + ``autograd.grad`` to it)."""
    batch = x.repeat_interleave(k, dim=0)

    def run() -> None:
        for _ in range(iters):
            xx = batch.detach().requires_grad_(True)
            torch.autograd.grad(model(xx)[:, target].sum(), xx)
    return run


def _calls(model: nn.Module, x: torch.Tensor, target: int, args: argparse.Namespace,
           torchray_ep: Optional[Callable]) -> Dict[str, Callable[[], object]]:
    common = dict(areas=args.areas, max_iter=args.ep_iters, step=args.step, sigma=args.sigma)
    calls: Dict[str, Callable[[], object]] = {
        "ours": lambda: extremal_perturbation(model, x, target, **common, progress=False,
                                              max_blur=20, num_levels=8),
        "floor": _floor(model, x, target, len(args.areas), args.ep_iters)}
    if torchray_ep is not None:
        calls["TorchRay"] = lambda: torchray_ep(model, x, target, **common)
    return calls


def _time(calls: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median CPU time of the calling thread per call, the calls interleaved."""
    for fn in calls.values():                     # warm-up
        fn()
    times: Dict[str, List[float]] = {k: [] for k in calls}
    keys = list(calls)
    for turn in range(repeats):
        for k in keys[turn % len(keys):] + keys[:turn % len(keys)]:
            t0 = time.thread_time()
            calls[k]()
            times[k].append(time.thread_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _model(name: str, side: int) -> nn.Module:
    model = BoxLogit(side) if name == "box" else load_embedded_model(name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value}")
    return value


def _area(text: str) -> float:
    """argparse type: an area fraction strictly between 0 and 1."""
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got "
                                         f"{value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        default=["box", "embedded-vgg", "embedded-resnet"],
                        help="'box' (the toy) and embedded models (default: %(default)s)")
    parser.add_argument("--ep-iters", type=positive_int_arg, default=300, metavar="N",
                        help="iterations per call (default: %(default)s)")
    parser.add_argument("--areas", type=_area, nargs="+", default=[0.05, 0.1],
                        help="area fractions (default: %(default)s)")
    parser.add_argument("--step", type=positive_int_arg, default=4,
                        help="grid step (default: %(default)s)")
    parser.add_argument("--sigma", type=_positive_float, default=8.0,
                        help="mask smoothing sigma (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int_arg, default=3,
                        help="timed calls of each, interleaved (default: %(default)s)")
    parser.add_argument("--torchray-path", default=None, metavar="DIR",
                        help="folder holding an unpacked torchray package, put first on "
                             "sys.path (default: the installed torchray, if any)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m != "box" and m not in EMBEDDED_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: use 'box' or one of {EMBEDDED_MODELS}")
    if args.torchray_path:
        sys.path.insert(0, args.torchray_path)
    try:
        from torchray.attribution.extremal_perturbation import (
            extremal_perturbation as torchray_ep,
        )
    except ImportError:
        torchray_ep = None
        print("TorchRay is not installed (or give --torchray-path): its column is empty")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(args, torchray_ep)
    finally:
        torch.set_num_threads(threads)
    return 0


def run(args: argparse.Namespace, torchray_ep: Optional[Callable]) -> None:
    print(f"extremal_perturbation, {args.ep_iters} iterations, areas {args.areas}, step "
          f"{args.step}, sigma {args.sigma:g}, blur, jitter; 1 image 64², 1 thread, CPU time "
          f"per call (s), median of {args.repeats} interleaved turns")
    print(f"{'model':16s} {'TorchRay':>9s} {'ours':>8s} {'floor':>8s} {'TR/ours':>8s} "
          f"{'ours/floor':>10s}")
    for name in args.models:
        model = _model(name, 64)
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        x = x * 0.2 + 0.8 if name == "box" else (x - 0.5) / 0.25
        med = _time(_calls(model, x, 0, args, torchray_ep), args.repeats)
        tr = med.get("TorchRay", float("nan"))
        print(f"{name:16s} {tr:9.3f} {med['ours']:8.3f} {med['floor']:8.3f} "
              f"{tr / med['ours']:8.2f} {med['ours'] / med['floor']:10.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
