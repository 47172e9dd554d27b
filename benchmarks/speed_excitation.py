"""Speed of excitation backprop and contrastive excitation backprop against their floor.

Usage::

    python benchmarks/speed_excitation.py            # resnet50 and vgg16 at 224², batch 1
    python benchmarks/speed_excitation.py --batch 4 --repeat 7 --models resnet50
    python benchmarks/speed_excitation.py --signed both   # also the positive-part rule
    python benchmarks/speed_excitation.py --clock cpu --threads 1   # on a busy machine

The floor is the plain forward pass plus ``torch.autograd.grad`` down to the output of the
saliency layer (what the plain gradient to that layer costs), timed interleaved with the method
in the same run.  Excitation backprop does more per layer above it — each convolution / linear
layer computes ``op(r(x), w⁺)`` and its transpose instead of the transpose alone — so the
target is 1.5× that floor.  The contrastive variant also backpropagates twice from the output
to the contrast layer (sharing ``op(r(x), w⁺)`` between the two passes); same target.

``--clock cpu`` times the process's CPU time instead of the wall clock: on a machine shared
with other jobs, wall-clock ratios swing by tens of percent while CPU time (with one thread)
measures the work done.  Also picked up by ``benchmarks/speed.py`` (``--methods excitation
contrastive``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import types
import warnings
from typing import List

import torch
import torchvision

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _harness  # noqa: E402
from _harness import HEADER, NOISE, Case, floor_layer, format_row, freeze, measure  # noqa: E402

from torchray_like.attribution.excitation_backprop import (  # noqa: E402
    contrastive_excitation_backprop,
    excitation_backprop,
)

# model family -> (saliency layer, contrast layer)
LAYERS = {
    "resnet": ("layer3", "layer4"),
    "vgg": ("features.23", "features.30"),
}


def _layers(model) -> tuple:
    name = type(model).__name__.lower()
    for family, layers in LAYERS.items():
        if name.startswith(family):
            return layers
    return None


def cases(model, x, target, args) -> List[Case]:
    layers = _layers(model)
    if layers is None:
        return []
    saliency_layer, contrast_layer = layers
    floor = floor_layer(model, x, target, saliency_layer)
    floor_name = f"fwd+grad({saliency_layer})"
    rules = {"signed": [True], "positive": [False], "both": [True, False]}[
        getattr(args, "signed", None) or "signed"]
    out = []
    for signed in rules:
        tag = "" if signed else ", positive"
        options = {} if signed else {"signed": False}
        out += [
            Case(f"excitation_backprop({saliency_layer}{tag})",
                 lambda o=options: excitation_backprop(model, x, target,
                                                       saliency_layer=saliency_layer, **o),
                 floor, floor_name, target_ratio=1.5),
            Case(f"contrastive_excitation_backprop({saliency_layer}|{contrast_layer}{tag})",
                 lambda o=options: contrastive_excitation_backprop(
                     model, x, target, saliency_layer, contrast_layer, **o),
                 floor, floor_name, target_ratio=1.5),
        ]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"],
                        help="torchvision model names (resnet* / vgg*; default: resnet50 vgg16)")
    parser.add_argument("--size", type=int, default=224, help="input side (default: 224)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed calls of each function; the median is reported (default: 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: PyTorch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda ...")
    parser.add_argument("--signed", choices=["signed", "positive", "both"], default="signed",
                        help="the input rule to time (default: signed, the default rule)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall clock (default) or the process's CPU time (steadier on a "
                             "busy machine; use with --threads 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu times CPU work: use it with --device cpu")
        _harness.time = types.SimpleNamespace(perf_counter=time.process_time)  # type: ignore
    device = torch.device(args.device)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, batch "
          f"{args.batch}, {args.size}², median of {args.repeat}, noise ±{NOISE:.0%}, "
          f"{args.clock} clock")
    print(HEADER, flush=True)
    for name in args.models:
        torch.manual_seed(0)
        model = freeze(getattr(torchvision.models, name)().to(device))
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        target = list(range(args.batch))
        selected = cases(model, x, target, args)
        if not selected:
            print(f"{name}: no layers known for this model family (resnet*, vgg*)")
        for case in selected:
            print(format_row(name, case, measure(case, args.repeat, device=device)),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
