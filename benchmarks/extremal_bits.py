"""Extremal perturbation's masks and histories, dumped for a bit-for-bit comparison of two
versions of the code (docs/speed_perturbation.rst, round 6).

Run once per version, then compare::

    PYTHONPATH=/path/to/old/worktree python benchmarks/extremal_bits.py dump /tmp/old.pt
    python benchmarks/extremal_bits.py dump /tmp/new.pt
    python benchmarks/extremal_bits.py compare /tmp/old.pt /tmp/new.pt

With no arguments it runs the cases and prints a digest of each (a hash of the masks' and the
history's bytes), to compare two versions by eye.

``compare`` checks ``torch.equal`` on every mask, the history tensor and each history attribute
(the weights, the reward units, the areas) of every case, and exits 1 on any difference.  Cases:
1-D, 2-D and 3-D masks; one and two images; one to three areas; the preserve, delete and dual
games; blur and fade; single and double precision; the 64² box toy and the embedded models.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from torchray_like.attribution.extremal_perturbation import extremal_perturbation
from torchray_like.benchmark.embedded_models import load_embedded_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from speed_extremal import BoxLogit  # noqa: E402  (the toy of the speed comparison)


class _Linear(nn.Module):
    """A fixed random linear classifier of ``(N, C, *spatial)`` inputs (1-D and 3-D cases)."""

    def __init__(self, numel: int, classes: int = 4) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(numel, classes,
                                              generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w.to(x.dtype))


def _cases() -> List[Dict]:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 64, 64, generator=g) * 0.2 + 0.8
    box = BoxLogit(64)
    cases: List[Dict] = []
    for variant in ("preserve", "delete", "dual"):
        for pert in ("blur", "fade"):
            for dtype in (torch.float32, torch.float64):
                cases.append(dict(name=f"box-2d-{variant}-{pert}-{dtype}", model=box,
                                  x=img[:1].to(dtype), target=0, areas=[0.05, 0.1],
                                  perturbation=pert, variant=variant, max_iter=120,
                                  step=4, sigma=8))
    cases.append(dict(name="box-2d-two-images-three-areas", model=box, x=img, target=[0, 1],
                      areas=[0.05, 0.1, 0.2], max_iter=120, step=4, sigma=8))
    cases.append(dict(name="box-2d-one-area-200", model=box, x=img[:1], target=0,
                      areas=[0.1], max_iter=200, step=4, sigma=8))
    seq = torch.rand(2, 3, 96, generator=g)
    for variant in ("preserve", "dual"):
        cases.append(dict(name=f"linear-1d-{variant}", model=_Linear(3 * 96), x=seq,
                          target=[1, 2], areas=[0.1, 0.3], variant=variant, max_iter=100,
                          step=5, sigma=9))
    vid = torch.rand(1, 3, 6, 20, 20, generator=g)
    for pert in ("blur", "fade"):
        cases.append(dict(name=f"linear-3d-{pert}", model=_Linear(3 * 6 * 20 * 20), x=vid,
                          target=2, areas=[0.1, 0.2, 0.3], perturbation=pert, max_iter=80,
                          step=4, sigma=8))
        cases.append(dict(name=f"linear-3d-{pert}-double", model=_Linear(3 * 6 * 20 * 20),
                          x=vid.double(), target=2, areas=[0.2], perturbation=pert,
                          max_iter=60, step=4, sigma=8))
    photo = (torch.rand(1, 3, 64, 64, generator=g) - 0.5) / 0.25
    for name in ("embedded-vgg", "embedded-resnet"):
        model = load_embedded_model(name).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        cases.append(dict(name=f"{name}-preserve", model=model, x=photo, target=0,
                          areas=[0.05, 0.1], max_iter=100, step=4, sigma=8))
        cases.append(dict(name=f"{name}-dual-fade", model=model, x=photo, target=1,
                          areas=[0.1], variant="dual", perturbation="fade", max_iter=60,
                          step=4, sigma=8))
    return cases


def _run_cases() -> Dict[str, Dict[str, torch.Tensor]]:
    import torchray_like
    print("torchray_like from", torchray_like.__file__, flush=True)
    torch.set_num_threads(1)
    out = {}
    for case in _cases():
        kw = dict(case)
        name, model, x, target = kw.pop("name"), kw.pop("model"), kw.pop("x"), kw.pop("target")
        masks, hist = extremal_perturbation(model, x, target, progress=False, generator=0, **kw)
        out[name] = dict(masks=masks, history=torch.Tensor.as_subclass(hist, torch.Tensor),
                         weight=hist.weight, units=hist.reward_scale, area=hist.area,
                         achieved=hist.achieved_area)
    return out


def _digest(record: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(record):
        h.update(record[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def dump(path: str) -> None:
    out = _run_cases()
    for name, record in out.items():
        print(f"{name:45s} {_digest(record)}", flush=True)
    torch.save(out, path)


def compare(a: str, b: str) -> int:
    old, new = torch.load(a), torch.load(b)
    bad = 0
    if set(old) != set(new):
        print("different cases:", sorted(set(old) ^ set(new)))
        bad += 1
    for name in sorted(set(old) & set(new)):
        diff = [k for k in old[name] if not torch.equal(old[name][k], new[name][k])]
        print(f"{name:45s} {'DIFFERENT ' + ', '.join(diff) if diff else 'identical'}")
        bad += bool(diff)
    print(f"{len(old)} cases, {bad} different")
    return int(bad > 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("dump", help="run the cases and save them").add_argument("path")
    cmp = sub.add_parser("compare", help="compare two dumps bit for bit (exit 1 if not)")
    cmp.add_argument("old")
    cmp.add_argument("new")
    args = parser.parse_args(argv)
    if args.command == "dump":
        dump(args.path)
        return 0
    if args.command == "compare":
        return compare(args.old, args.new)
    for name, record in _run_cases().items():
        print(f"{name:45s} {_digest(record)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
