"""Speed of extremal perturbation against its floor (picked up by ``benchmarks/speed.py``).

The floor is what the method cannot avoid: ``max_iter`` plain forward passes of the ``N·K``
perturbed images (``N`` images, ``K`` areas) with ``torch.autograd.grad`` down to that batch,
measured in the same run.  The method adds the blur pyramid (once), the smooth masks, the
perturbation, the ranking constraint and the SGD step; the target is ≤ 1.15× the floor.

Run alone::

    python benchmarks/speed.py --methods extremal --repeats 3 --ep-iters 5
    python benchmarks/speed_extremal.py --models resnet50 --ep-iters 10
"""

from __future__ import annotations

import pathlib
import sys
from typing import Callable, List

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _harness import Case, frozen  # noqa: E402

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
    iters = int(getattr(args, "ep_iters", None) or ITERS)
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
    """The speed table restricted to extremal perturbation (same options as speed.py)."""
    from speed import main as speed_main
    argv = list(sys.argv[1:] if argv is None else argv)
    return speed_main(["--methods", "extremal_perturbation", "--repeats", "3"] + argv)


if __name__ == "__main__":
    sys.exit(main())
