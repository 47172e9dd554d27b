"""Speed of every attribution method against its floor (and Captum), measured in one run.

Usage::

    python benchmarks/speed.py                  # quick: resnet18 and the embedded models at 64²,
                                                # batch 1, one thread (short calls)
    python benchmarks/speed.py --full           # resnet50 and vgg16 at 224², batch 4
    python benchmarks/speed.py --methods explain gradient --repeat 7 --out speed.csv
    python benchmarks/speed.py --device cuda --full

For each method the table gives the median time per call, the median time of its *floor* — the
plain forward pass plus ``torch.autograd.grad`` down to the tensor the method reads — and their
ratio; with Captum installed (``pip install captum``), the time of Captum's equivalent and our
time divided by it (below 1: we are faster).  Method, floor and Captum are timed interleaved in
the same run.  A row over its target ratio (plus 3 % noise) is measured again, and flagged SLOW
only when the repeat confirms it.

The ``explain(6 methods)`` rows time :func:`torchray_like.attribution.explain.explain` with its
six shared methods (gradient, guided backprop, DeConvNet, linear approximation, Grad-CAM, guided
Grad-CAM, default options) against one forward + the six backward passes, and list the six
separate calls and the six Captum calls beside it.

Models have random weights and are frozen once up front (eval mode, ``requires_grad`` off), so
floors do no state handling; the methods still run their own.  The quick run pins one CPU thread
(short calls gain little from more, and one thread keeps a shared machine's timings steady); the
full run uses PyTorch's default.  Other modules extend the table: every
``benchmarks/speed_*.py`` defining ``cases(model, x, target, args) -> list[Case]`` is picked up.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import pathlib
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torchvision

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _harness import (HEADER, NOISE, Case, floor_input, floor_passes, format_row,  # noqa: E402
                      freeze, measure)

from torchray_like.attribution import METHODS  # noqa: E402
from torchray_like.attribution.common import GRADIENT_RULE, ReLUContext, saliency  # noqa: E402
from torchray_like.attribution.explain import SHARED_METHODS, explain  # noqa: E402
from torchray_like.attribution.grad_cam import find_saliency_layer  # noqa: E402

QUICK = {"models": ["resnet18", "embedded-vgg", "embedded-resnet"], "size": 64, "batch": 1, "threads": 1}
FULL = {"models": ["resnet50", "vgg16"], "size": 224, "batch": 4, "threads": None}


# ---------------------------------------------------------------------------------------------
# Captum's equivalents


def captum_calls(model, x, target) -> Optional[Dict[str, Callable[[str], Callable]]]:
    """name -> (layer -> callable running Captum's equivalent), or None without Captum."""
    try:
        from captum import attr
    except ImportError:
        return None
    t = torch.as_tensor(target, device=x.device)

    def module(layer):
        return model.get_submodule(layer)

    return {
        "gradient": lambda layer: lambda: attr.Saliency(model).attribute(x, target=t),
        "guided_backprop": lambda layer: lambda: attr.GuidedBackprop(model).attribute(
            x, target=t),
        "deconvnet": lambda layer: lambda: attr.Deconvolution(model).attribute(x, target=t),
        "grad_cam": lambda layer: lambda: attr.LayerGradCam(model, module(layer)).attribute(
            x, target=t, relu_attributions=True),
        "guided_grad_cam": lambda layer: lambda: attr.GuidedGradCam(
            model, module(layer)).attribute(x, target=t),
        "linear_approx(input)": lambda layer: lambda: attr.InputXGradient(model).attribute(
            x, target=t),
        "linear_approx": lambda layer: lambda: attr.LayerGradientXActivation(
            model, module(layer)).attribute(x, target=t),
    }


def make_model(name: str) -> torch.nn.Module:
    """A torchvision model with random weights, or a shipped embedded model (64² inputs)."""
    from torchray_like.benchmark.embedded_models import EMBEDDED_MODELS, load_embedded_model
    if name in EMBEDDED_MODELS:
        return load_embedded_model(name)
    return getattr(torchvision.models, name)()


def case_layer(model, x) -> str:
    """The layer speed_layer.py's rows read (else the automatic one)."""
    layer_for = getattr(sys.modules.get("speed_layer"), "layer_for", None)
    return layer_for(model, x) if layer_for is not None else find_saliency_layer(model, x)


def attach_captum(cases: List[Case], model, x, target) -> None:
    calls = captum_calls(model, x, target)
    if calls is None:
        return
    auto = find_saliency_layer(model, x)
    for case in cases:
        if case.name in calls:
            case.others["captum"] = calls[case.name](case_layer(model, x))
        elif case.name == "grad_cam(auto layer)":
            case.others["captum"] = calls["grad_cam"](auto)


# ---------------------------------------------------------------------------------------------
# Cases


def core_cases(model, x, target, args) -> List[Case]:
    floor = floor_input(model, x, target)
    cases = [Case(name, (lambda f=METHODS[name]: f(model, x, target)), floor, "fwd+grad(input)")
             for name in ("gradient", "guided_backprop", "deconvnet")]
    # The rule context with the plain-gradient rule: the cost of the mode and of routing every
    # ReLU through a custom autograd.Function, isolated.
    cases.append(Case("relu_context(gradient rule)",
                      lambda: saliency(model, x, target,
                                       context_builder=lambda: ReLUContext(GRADIENT_RULE)),
                      floor, "fwd+grad(input)"))
    return cases


def explain_cases(model, x, target, args) -> List[Case]:
    """explain() with its six shared methods at their defaults, two floors."""
    layer = find_saliency_layer(model, x)  # Grad-CAM's and guided Grad-CAM's default layer

    def separate():
        return [METHODS[name](model, x, target) for name in SHARED_METHODS]

    others: Dict[str, Callable] = {"separate": separate}
    calls = captum_calls(model, x, target)
    if calls is not None:
        captum = [calls[name](layer) for name in ("gradient", "guided_backprop", "deconvnet",
                                                  "linear_approx(input)", "grad_cam",
                                                  "guided_grad_cam")]
        others["captum"] = lambda: [c() for c in captum]
    run = lambda: explain(model, x, target)  # noqa: E731
    # One backward pass per method: gradient, guided, DeConvNet, linear approximation and the
    # guided part of guided Grad-CAM to the input, Grad-CAM to its layer (guided Grad-CAM's
    # plain pass to the layer is the same as Grad-CAM's and counted once).
    six = floor_passes(model, x, target, [[None]] * 5 + [[layer]])
    # What explain does, with plain autograd: the plain rule to the input and the layer at once,
    # then the guided and the DeConvNet rules to the input.
    three = floor_passes(model, x, target, [[None, layer], [None], [None]])
    return [
        Case("explain(6 methods)", run, six, f"fwd+6 bwd(5×input, {layer})", others=others),
        Case("explain(6 methods) vs 3 passes", run, three,
             f"fwd+3 bwd(input&{layer}, input, input)", target_ratio=1.10,
             note="the guided and DeConvNet rules' own cost"),
    ]


def plugin_cases(model, x, target, args) -> List[Case]:
    cases: List[Case] = []
    for path in sorted(HERE.glob("speed_*.py")):
        module = sys.modules.get(path.stem)
        try:
            if module is None:
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            if hasattr(module, "cases"):
                cases.extend(module.cases(model, x, target, args))
        except Exception as exc:  # a broken plugin must not lose the rest of the table
            sys.modules.pop(path.stem, None)
            print(f"{path.name}: ERROR {type(exc).__name__}: {exc} (its rows are skipped)",
                  flush=True)
    return cases


# ---------------------------------------------------------------------------------------------
# Output


def summary(rows: List[dict], models: List[str]) -> str:
    """The table method × model: ms per call, ratio to the floor, ratio to Captum."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["model"], r["method"]): r for r in rows}
    width = 32
    lines = [f"{'method':46s}" + "".join(f"{m:>{width}s}" for m in models),
             f"{'':46s}" + "".join(f"{'ms':>12s} {'×floor':>6s} {'×cptm':>7s} {'flag':>4s}"
                                   for _ in models)]
    for method in methods:
        line = f"{method:46s}"
        for model in models:
            r = cell.get((model, method))
            if r is None:
                line += f"{'-':>{width}s}"
                continue
            captum = f"{r['vs_captum']:.2f}" if r.get("vs_captum") is not None else "-"
            flag = "SLOW" if r["status"] == "SLOW" else ""
            line += f"{r['ms']:>12.1f} {r['ratio']:6.2f} {captum:>7s} {flag:>4s}"
        lines.append(line)
    return "\n".join(lines)


def write_out(path: pathlib.Path, rows: List[dict], settings: dict) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    elif path.suffix == ".csv":
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys + list(settings))
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, **settings})
    else:
        raise SystemExit(f"--out: give a .csv or .json file name, got {path}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without arguments: the quick run (resnet18, embedded-vgg and embedded-resnet at "
               "64², batch 1, one thread: the short calls of a benchmark; a few minutes on a "
               "busy 2-core machine).")
    parser.add_argument("--full", action="store_true",
                        help="the long run: resnet50 and vgg16 at 224², batch 4, every method")
    parser.add_argument("--models", nargs="+", default=None,
                        help="torchvision model names or embedded-vgg / embedded-resnet (64² "
                             "only; default: resnet18 embedded-vgg embedded-resnet; --full: "
                             "resnet50 vgg16)")
    parser.add_argument("--size", type=int, default=None, help="input side (64; --full: 224)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (1; --full: 4)")
    parser.add_argument("--repeat", "--repeats", type=int, default=5, dest="repeat",
                        help="timed calls of each function per measurement; the median is "
                             "reported (default: 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (1; --full: PyTorch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="only rows whose name starts with one of these")
    parser.add_argument("--no-captum", action="store_true", help="skip the Captum columns")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="also write the rows to this .csv or .json file")
    parser.add_argument("--json", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ep-iters", type=int, default=None, dest="ep_iters",
                        help="extremal perturbation: iterations per timed call (default 5)")
    parser.add_argument("--rise-masks", type=int, default=None, dest="rise_masks",
                        help="RISE: masks per timed call (default 64)")
    parser.add_argument("--rise-batch", type=int, default=None, dest="rise_batch",
                        help="RISE: masks per forward batch (default 32)")
    args = parser.parse_args(argv)
    preset = FULL if args.full else QUICK
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.json is not None and args.out is None:
        args.out = args.json
    if args.out is not None and args.out.suffix not in (".csv", ".json"):
        parser.error(f"--out: give a .csv or .json file name, got {args.out}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_captum:
        sys.modules["captum"] = None  # makes `from captum import attr` raise ImportError
    device = torch.device(args.device)
    warnings.simplefilter("ignore")  # Captum warns on every call; the table is the output
    try:
        import captum
        captum_version = captum.__version__
    except ImportError:
        captum_version = None
    settings = {"torch": torch.__version__, "device": str(device),
                "threads": torch.get_num_threads(), "batch": args.batch, "size": args.size,
                "repeat": args.repeat, "captum": captum_version}
    shown = sys.argv[1:] if argv is None else list(argv)
    print("$ python benchmarks/speed.py" + "".join(f" {a}" for a in shown))
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, batch "
          f"{args.batch}, {args.size}², median of {args.repeat}, noise ±{NOISE:.0%}, captum "
          f"{captum_version or 'not installed'}")
    print(HEADER, flush=True)
    rows: List[dict] = []
    errors: List[str] = []
    start = time.perf_counter()
    for name in args.models:
        torch.manual_seed(0)
        model = freeze(make_model(name).to(device))
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        target = list(range(args.batch))
        cases = (core_cases(model, x, target, args) + plugin_cases(model, x, target, args)
                 + explain_cases(model, x, target, args))
        attach_captum(cases, model, x, target)
        for case in cases:
            if args.methods and not any(case.name.startswith(m) for m in args.methods):
                continue
            try:
                res = measure(case, args.repeat, device=device)
            except Exception as exc:  # one broken method must not lose the rest of the table
                print(f"{name:9s} {case.name:46s} ERROR {type(exc).__name__}: {exc}", flush=True)
                errors.append(f"{name} {case.name}")
                continue
            print(format_row(name, case, res), flush=True)
            rows.append({"model": name, "method": case.name, "ms": res["method_s"] * 1e3,
                         "floor_ms": res["floor_s"] * 1e3, "ratio": res["ratio"],
                         "target": case.target_ratio, "status": res["status"],
                         "first_ratio": res.get("first_ratio"),
                         "captum_ms": (res["captum_s"] * 1e3 if "captum_s" in res else None),
                         "vs_captum": res.get("vs_captum"),
                         "separate_ms": (res["separate_s"] * 1e3 if "separate_s" in res
                                         else None),
                         "vs_separate": res.get("vs_separate"),
                         "floor": case.floor_name, "note": case.note})
    if rows:
        print(f"\n{summary(rows, args.models)}")
    for r in rows:
        if r["method"] == "explain(6 methods)":
            print(f"\n{r['model']}: explain(6 methods) {r['ms']:.1f} ms = {r['ratio']:.3f} × "
                  f"(fwd + 6 bwd, {r['floor_ms']:.1f} ms); six separate calls "
                  f"{r['separate_ms']:.1f} ms, {1 / r['vs_separate']:.2f}× slower"
                  + (f"; six Captum calls {r['captum_ms']:.1f} ms, "
                     f"{1 / r['vs_captum']:.2f}× slower" if r["captum_ms"] else ""))
    slow = [f"{r['model']} {r['method']}" for r in rows if r["status"] == "SLOW"]
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s; "
          + (f"SLOW (confirmed by a repeat): {', '.join(slow)}" if slow else "none confirmed slow")
          + (f"; ERROR: {', '.join(errors)}" if errors else ""))
    if args.out is not None:
        write_out(args.out, rows, settings)
        print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
