"""Speed of extremal perturbation against its floor (picked up by ``benchmarks/speed.py``).

The floor is what the method cannot avoid: ``max_iter`` plain forward passes of the ``N·K``
perturbed images (``N`` images, ``K`` areas) with ``torch.autograd.grad`` down to that batch,
measured in the same run.  The method adds the blur pyramid (once), the smooth masks, the
perturbation, the ranking constraint and the SGD step; the target is ≤ 1.15× the floor.

Run alone::

    python benchmarks/speed.py --methods extremal --repeats 3
    python benchmarks/speed_extremal.py --models resnet50 vgg16 --iters 5
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Callable, List

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import Case, frozen  # noqa: E402

from torchray_like.attribution.common import get_backward_gradient  # noqa: E402
from torchray_like.attribution.extremal_perturbation import extremal_perturbation  # noqa: E402

#: Iterations per timed call (the paper runs 800; the ratio does not depend on the count
#: beyond the one-off pyramid, which a small count over-weights).
ITERS = 5
AREAS = (0.1,)


def floor_iterations(model: torch.nn.Module, batch: torch.Tensor, target: torch.Tensor,
                     iters: int) -> Callable[[], object]:
    """``iters`` × (forward of ``batch`` + autograd.grad down to it)."""
    def run():
        with frozen(model):
            for _ in range(iters):
                xx = batch.detach().requires_grad_(True)
                y = model(xx)
                torch.autograd.grad(y, xx, get_backward_gradient(y, target))
    return run


def cases(model, x, target, args) -> List[Case]:
    iters = int(getattr(args, "ep_iters", ITERS))
    k = len(AREAS)
    # The floor batch: each image repeated K times, as the method's N·K perturbed batch.
    batch = x.repeat_interleave(k, dim=0)
    tgt = torch.as_tensor(target).repeat_interleave(k)

    def run():
        return extremal_perturbation(model, x, target, areas=list(AREAS), max_iter=iters,
                                     progress=False)

    return [Case("extremal_perturbation", run, floor_iterations(model, batch, tgt, iters),
                 f"{iters}×(fwd+grad(N·K batch))", target_ratio=1.15,
                 note=f"max_iter={iters}, K={k}")]


def main(argv=None) -> int:
    import torchvision
    from harness import HEADER, format_row, time_pair
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=ITERS, dest="ep_iters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.size}², median of {args.repeats}")
    print(HEADER)
    for name in args.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
        target = list(range(args.batch))
        for case in cases(model, x, target, args):
            print(format_row(name, case, time_pair(case.run, case.floor, args.repeats)),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
