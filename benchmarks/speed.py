"""Speed of every attribution method relative to its floor, measured in one run.

Usage::

    python benchmarks/speed.py                       # resnet50 and vgg16, 224², batch 4
    python benchmarks/speed.py --models resnet18 --size 112 --repeats 3 --methods gradient

For each method the table gives the median time per call, the median time of its *floor* — the
plain forward pass plus ``torch.autograd.grad`` down to the tensor the method reads, timed
alternately with the method in the same run — and their ratio.  Models have random weights;
timings use the CPU threads as set (``--threads``, default: PyTorch's).

Other benchmark modules extend the table: every ``benchmarks/speed_*.py`` defining
``cases(model, x, target, args) -> list[Case]`` is picked up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
from typing import List

import torch
import torchvision

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import HEADER, Case, floor_input, format_row, time_pair  # noqa: E402

from torchray_like.attribution import METHODS  # noqa: E402
from torchray_like.attribution.common import ReLUContext, saliency  # noqa: E402


def core_cases(model, x, target, args) -> List[Case]:
    floor = floor_input(model, x, target)
    cases = [Case(name, (lambda f=METHODS[name]: f(model, x, target)), floor, "fwd+grad(input)")
             for name in ("gradient", "guided_backprop", "deconvnet")]
    # The rule context with the plain-gradient rule: the cost of the mode and of routing every
    # ReLU through a custom autograd.Function, isolated.
    from torchray_like.attribution.common import GRADIENT_RULE
    cases.append(Case("relu_context(gradient rule)",
                      lambda: saliency(model, x, target,
                                       context_builder=lambda: ReLUContext(GRADIENT_RULE)),
                      floor, "fwd+grad(input)"))
    return cases


def plugin_cases(model, x, target, args) -> List[Case]:
    cases: List[Case] = []
    for path in sorted(HERE.glob("speed_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cases.extend(module.cases(model, x, target, args))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", nargs="*", default=None,
                        help="only cases whose name starts with one of these")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write results")
    parser.add_argument("--ep-iters", type=int, default=None, dest="ep_iters",
                        help="extremal perturbation: iterations per timed call (default 5)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.size}², median of {args.repeats}")
    print(HEADER)
    results = []
    for name in args.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
        target = list(range(args.batch))
        cases = core_cases(model, x, target, args) + plugin_cases(model, x, target, args)
        for case in cases:
            if args.methods and not any(case.name.startswith(m) for m in args.methods):
                continue
            res = time_pair(case.run, case.floor, args.repeats)
            print(format_row(name, case, res), flush=True)
            results.append({"model": name, "method": case.name, **res,
                            "target": case.target_ratio, "floor": case.floor_name})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
