"""Speed of every attribution method against its floor (and Captum), measured in one run.

Usage::

    python benchmarks/speed.py                  # quick: resnet18 and the embedded models at 64²,
                                                # batch 1, one thread (short calls)
    python benchmarks/speed.py --full           # resnet50 and vgg16 at 224², batch 4
    python benchmarks/speed.py --methods explain gradient --repeats 7 --out out/speed
    python benchmarks/speed.py --methods excitation_backprop --clock cpu   # a busy machine
    python benchmarks/speed.py --device cuda --full

For each method the table gives the median time per call, the median time of its *floor* — the
plain forward pass plus ``torch.autograd.grad`` down to the tensor the method reads — and their
ratio; with Captum installed (``pip install captum``), the time of Captum's equivalent and our
time divided by it (below 1: we are faster).  Method, floor and Captum are timed interleaved in
the same run.  A row over its target ratio (plus 3 % noise) is measured again, and flagged SLOW
only when the repeat confirms it.

The rows are the table :data:`CASES`, one function per family, each documenting its floors:
the rule methods, the layer methods (Grad-CAM, guided Grad-CAM, linear approximation),
excitation backprop, extremal perturbation, RISE, and ``explain`` — :func:`explain` with its
six shared methods (gradient, guided backprop, DeConvNet, linear approximation, Grad-CAM,
guided Grad-CAM, default options) against one forward + the six backward passes, with the six
separate calls and the six Captum calls beside it.  Layers, RISE's masks and extremal
perturbation's iterations come from :mod:`torchray_like.benchmark.settings` (benchmark
``"speed"``; ``--rise-masks``, ``--rise-batch``, ``--ep-iters`` override them).

Models have random weights (the embedded models their shipped ones) and are frozen once up
front (eval mode, ``requires_grad`` off), so floors do no state handling; the methods still run
their own.  The quick run pins one CPU thread (short calls gain little from more, and one
thread keeps a shared machine's timings steady); the full run uses PyTorch's default.
``--clock cpu`` times the process's CPU time instead of the wall clock: on a machine shared
with other jobs wall-clock ratios swing by tens of percent, CPU time (one thread) measures the
work done.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torchvision

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _references  # noqa: E402
from _beyond import BEYOND_CASES, drop_failing  # noqa: E402
from _harness import (  # noqa: E402
    HEADER,
    NOISE,
    Case,
    blas_threads,
    check_no_hooks_left,
    floor_input,
    floor_input_hooked,
    floor_input_seen,
    floor_iterations,
    floor_layer,
    floor_layer_and_input,
    floor_passes,
    format_row,
    freeze,
    frozen,
    measure,
    module_hooks,
)
from _memory import bounded_cases, case_peaks, peak_bytes  # noqa: E402,F401  (re-exported)

from torchray_like.attribution import METHODS  # noqa: E402
from torchray_like.attribution.common import GRADIENT_RULE, ReLUContext, saliency  # noqa: E402
from torchray_like.attribution.explain import explain  # noqa: E402
from torchray_like.attribution.layer_choice import find_saliency_layer  # noqa: E402
from torchray_like.attribution.rise import generate_masks, rise  # noqa: E402
from torchray_like.benchmark import embedded_cli  # noqa: E402
from torchray_like.benchmark.embedded_models import EMBEDDED_MODELS  # noqa: E402
from torchray_like.benchmark.runner import (  # noqa: E402
    device_arg,
    image_side_arg,
    positive_int_arg,
    threads_arg,
)
from torchray_like.benchmark.settings import options_table  # noqa: E402

#: Models on which the heavy rows (occlusion, Score-CAM, Ablation-CAM: hundreds of forward
#: passes per call; LRP: three composites, each against Zennit) run when --methods does not
#: name them; they are timed with at most HEAVY_REPEATS calls.
HEAVY_MODELS = ("embedded-vgg", "embedded-resnet")
HEAVY_REPEATS = 3
QUICK = {"models": ["resnet18", "embedded-vgg", "embedded-resnet"], "input_size": 64,
         "batch_size": 1, "threads": 1}
FULL = {"models": ["resnet50", "vgg16"], "input_size": 224, "batch_size": 4, "threads": None}
#: What --methods selects besides the methods: the rule context alone, and explain().
EXTRA_ROWS = ("relu_context", "explain")
#: Methods that are another row's computation under their own name: ``lrp``'s default
#: composite is EpsilonPlusFlat, so ``--methods lrp_epsilon_plus_flat`` times the ``lrp`` row.
SAME_ROW = {"lrp_epsilon_plus_flat": "lrp"}
#: TorchRay's six methods sharing explain's forward pass (the "explain(6 methods)" rows).
TORCHRAY_SHARED = ("gradient", "guided_backprop", "deconvnet", "linear_approx", "grad_cam",
                   "guided_grad_cam")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Setup:
    """One model's inputs for the cases: the frozen model, ``x``, one target per sample and
    every method's options from the settings table."""

    model: torch.nn.Module
    x: torch.Tensor
    target: List[int]
    options: Dict[str, Dict[str, Any]]
    captum: bool = True     # time Captum's equivalents (when it is installed)
    references: bool = True  # time pytorch-grad-cam's and Zennit's (when installed)


# ---------------------------------------------------------------------------------------------
# Captum's equivalents


def captum_calls(s: Setup) -> Optional[Dict[str, Callable[[str], Callable]]]:
    """name -> (layer -> callable running Captum's equivalent), or None without Captum (not
    installed, or ``--no-captum``)."""
    if not s.captum:
        return None
    model, x, target = s.model, s.x, s.target
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


def attach_captum(cases: List[Case], s: Setup) -> None:
    """Captum's equivalent beside each row that has one (at the row's layer)."""
    calls = captum_calls(s)
    if calls is None:
        return
    layer = s.options["grad_cam"]["saliency_layer"]
    auto = find_saliency_layer(s.model, s.x)
    for case in cases:
        if case.name in calls:
            case.others["captum"] = calls[case.name](layer)
        elif case.name == "grad_cam(auto layer)":
            case.others["captum"] = calls["grad_cam"](auto)


# ---------------------------------------------------------------------------------------------
# The cases: one function per family


def rule_cases(s: Setup) -> List[Case]:
    """Gradient, guided backprop, DeConvNet against forward + grad to the input; and the rule
    context with the plain-gradient rule, through the driver (which takes the fast path of
    ``graph_rules`` on models that qualify) and as a user's ``with`` block (the mode, and a
    custom autograd.Function per ReLU: what the fast path avoids), isolated."""
    model, x, target = s.model, s.x, s.target
    floor = floor_input(model, x, target)
    cases = [Case(name, name, (lambda f=METHODS[name]: f(model, x, target)), floor,
                  "fwd+grad(input)") for name in ("gradient", "guided_backprop", "deconvnet")]
    cases.append(Case("relu_context", "relu_context(gradient rule)",
                      lambda: saliency(model, x, target,
                                       context_builder=lambda: ReLUContext(GRADIENT_RULE)),
                      floor, "fwd+grad(input)"))
    cases.append(Case("relu_context", "with ReLUContext(gradient rule): a user's block",
                      floor_input(model, x, target, lambda: ReLUContext(GRADIENT_RULE)),
                      floor, "fwd+grad(input)",
                      target_ratio=1.25, note="the mode and a Python function per ReLU"))
    # What interception itself costs, with no rule and no check: the floor with every torch
    # call seen by a pass-through mode (what a rule context pays before doing anything), and
    # with a hook per nn.ReLU (the way Captum changes ReLUs; it misses functional ReLUs).
    cases.append(Case("relu_context", "floor, every call seen (pass-through mode)",
                      floor_input_seen(model, x, target), floor, "fwd+grad(input)",
                      target_ratio=1.10, note="interception alone: what a with block pays "
                      "before any rule (the methods skip it on models graph_rules serves)"))
    cases.append(Case("relu_context", "floor, a hook per nn.ReLU (Captum's way)",
                      floor_input_hooked(model, x, target), floor, "fwd+grad(input)",
                      target_ratio=1.10, note="hooks alone"))
    return cases


def layer_cases(s: Setup) -> List[Case]:
    """Grad-CAM and linear approximation against forward + grad to their layer and no further;
    guided Grad-CAM against forward + grad to the layer (graph kept) and to the input — the
    part above the layer is necessarily differentiated twice, the ``(vs 1 backward)`` row
    shows what that costs; ``grad_cam(auto layer)``: the automatic choice (cached after the
    warm-up call, so it should cost nothing)."""
    model, x, target = s.model, s.x, s.target
    layer = s.options["grad_cam"]["saliency_layer"]
    auto = find_saliency_layer(model, x)
    at_layer = floor_layer(model, x, target, layer)
    layer_name = f"fwd+grad({layer})"

    def call(method, **kw):
        return lambda: METHODS[method](model, x, target, **kw)

    return [
        Case("grad_cam", "grad_cam", call("grad_cam", saliency_layer=layer), at_layer,
             layer_name),
        Case("grad_cam", "grad_cam(auto layer)", call("grad_cam"),
             floor_layer(model, x, target, auto), f"fwd+grad({auto})"),
        Case("guided_grad_cam", "guided_grad_cam", call("guided_grad_cam", saliency_layer=layer),
             floor_layer_and_input(model, x, target, layer), f"fwd+grad({layer})+grad(input)"),
        Case("guided_grad_cam", "guided_grad_cam(vs 1 backward)",
             call("guided_grad_cam", saliency_layer=layer), floor_input(model, x, target),
             "fwd+grad(input)", target_ratio=1.25,
             note="the part above the layer is differentiated twice"),
        Case("linear_approx", "linear_approx", call("linear_approx", saliency_layer=layer),
             at_layer, layer_name),
        Case("linear_approx", "linear_approx(input)", call("linear_approx"),
             floor_input(model, x, target), "fwd+grad(input)"),
    ]


def excitation_cases(s: Setup) -> List[Case]:
    """Excitation backprop (signed and positive input rule) and contrastive excitation
    backprop against forward + grad to the saliency layer.  Each convolution / linear layer
    above it computes ``op(r(x), w⁺)`` and its transpose instead of the transpose alone, and
    the contrastive variant backpropagates twice to the contrast layer: target 1.5×."""
    model, x, target = s.model, s.x, s.target
    ebp = s.options["excitation_backprop"]
    contrastive = s.options["contrastive_excitation_backprop"]
    layer = ebp["saliency_layer"]
    floor = floor_layer(model, x, target, layer)
    name = f"fwd+grad({layer})"
    return [
        Case("excitation_backprop", f"excitation_backprop({layer})",
             lambda: METHODS["excitation_backprop"](model, x, target, **ebp), floor, name,
             target_ratio=1.5),
        Case("excitation_backprop", f"excitation_backprop({layer}, positive)",
             lambda: METHODS["excitation_backprop"](model, x, target, signed=False, **ebp),
             floor, name, target_ratio=1.5),
        Case("contrastive_excitation_backprop",
             f"contrastive_excitation_backprop({layer}|{contrastive['contrast_layer']})",
             lambda: METHODS["contrastive_excitation_backprop"](model, x, target,
                                                                **contrastive),
             floor, name, target_ratio=1.5),
    ]


def extremal_cases(s: Setup) -> List[Case]:
    """Extremal perturbation against ``max_iter`` plain forward passes of the ``N·K``
    perturbed images (``K`` areas) with grad down to that batch: the method adds the blur
    pyramid (once), the smooth masks, the perturbation, the ranking constraint and the SGD
    step; target ≤ 1.25× (issue 22's bound).  The ratio does not depend on the count beyond
    the one-off pyramid, which a small count over-weights."""
    options = dict(s.options["extremal_perturbation"], progress=False)
    iters, k = options["max_iter"], len(options["areas"])
    batch = s.x.repeat_interleave(k, dim=0)
    target = torch.as_tensor(s.target).repeat_interleave(k)
    return [Case("extremal_perturbation", "extremal_perturbation",
                 lambda: METHODS["extremal_perturbation"](s.model, s.x, s.target, **options),
                 floor_iterations(s.model, batch, target, iters),
                 f"{iters}×(fwd+grad(N·K batch))", target_ratio=1.25,
                 note=f"max_iter={iters}, K={k}")]


def rise_cases(s: Setup) -> List[Case]:
    """RISE on one image against the same masked forward passes done directly —
    ``model(x * masks)`` in batches of the same size under ``inference_mode`` with a
    precomputed bank: the ratio is the cost of drawing and upsampling the masks and folding
    the scores into the maps (target ≤ 1.05), for the target and for every class."""
    options = dict(s.options["rise"], generator=0, progress=False)
    x1, t1 = s.x[:1], s.target[0]
    bank = generate_masks(options["num_masks"], tuple(s.x.shape[2:]), generator=0,
                          device=s.x.device, dtype=s.x.dtype)

    def floor():
        with frozen(s.model), torch.inference_mode():
            return [s.model(x1 * chunk) for chunk in bank.split(options["batch_size"])]

    name = f"{options['num_masks']} masked fwd, batch {options['batch_size']}"
    return [Case("rise", "rise", lambda: METHODS["rise"](s.model, x1, t1, **options), floor,
                 name),
            Case("rise", "rise(all classes)", lambda: rise(s.model, x1, None, **options),
                 floor, name)]


def explain_cases(s: Setup) -> List[Case]:
    """explain() with TorchRay's six shared methods at their defaults, two floors: one backward
    pass per method (guided Grad-CAM's plain pass to the layer is Grad-CAM's, counted once), and
    what explain does with plain autograd — the plain rule to the input and the layer at once,
    then the guided and the DeConvNet rules to the input."""
    model, x, target = s.model, s.x, s.target
    layer = find_saliency_layer(model, x)  # Grad-CAM's and guided Grad-CAM's default layer

    def separate():
        return [METHODS[name](model, x, target) for name in TORCHRAY_SHARED]

    others: Dict[str, Callable] = {"separate": separate}
    calls = captum_calls(s)
    if calls is not None:
        captum = [calls[name](layer) for name in ("gradient", "guided_backprop", "deconvnet",
                                                  "linear_approx(input)", "grad_cam",
                                                  "guided_grad_cam")]
        others["captum"] = lambda: [c() for c in captum]
    run = lambda: explain(model, x, target, TORCHRAY_SHARED)  # noqa: E731
    six = floor_passes(model, x, target, [[None]] * 5 + [[layer]])
    three = floor_passes(model, x, target, [[None, layer], [None], [None]])
    return [
        Case("explain", "explain(6 methods)", run, six, f"fwd+6 bwd(5×input, {layer})",
             others=others),
        Case("explain", "explain(6 methods) vs 3 passes", run, three,
             f"fwd+3 bwd(input&{layer}, input, input)", target_ratio=1.10,
             note="the guided and DeConvNet rules' own cost"),
    ]


#: The table of cases, in the order of the rows.
CASES = (rule_cases, layer_cases, excitation_cases, extremal_cases, rise_cases, *BEYOND_CASES,
         explain_cases)


def make_model(name: str) -> torch.nn.Module:
    """A torchvision model with random weights, or a shipped embedded model."""
    from torchray_like.benchmark.embedded_models import load_embedded_model
    if name in EMBEDDED_MODELS:
        return load_embedded_model(name)
    return getattr(torchvision.models, name)()


def check_input_size(model: torch.nn.Module, name: str, x: torch.Tensor) -> None:
    """One forward pass of ``x``: a model that does not take its size (the embedded VGG and
    ViT take 64² images only) stops the run with what to do, not a shape error from a row."""
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise SystemExit(
            f"speed.py: {name} does not take {x.shape[-2]}×{x.shape[-1]} inputs ({exc}); run it "
            "with the --input-size it was made for (64 for the embedded models) or leave it "
            "out of --models") from exc


def setup(name: str, args: argparse.Namespace, device: torch.device) -> Setup:
    """Model ``name`` frozen on the device, a seeded random batch and the options."""
    with torch.random.fork_rng(devices=[]):   # the same weights and inputs in every run
        torch.manual_seed(0)
        model = freeze(make_model(name).to(device))
        try:
            x = torch.randn(args.batch_size, 3, args.input_size, args.input_size).to(device)
        except RuntimeError as exc:   # the allocator's or the size computation's error
            raise SystemExit(
                f"speed.py: a batch of {args.batch_size} × 3 × {args.input_size}² does not fit "
                f"({exc}); use a smaller --batch-size or --input-size") from exc
    check_input_size(model, name, x)
    options = options_table(list(METHODS), name, "speed", network=model,
                            input_size=args.input_size,
                            overrides=embedded_cli.perturbation_overrides(args))
    return Setup(model, x, list(range(args.batch_size)), options,
                 captum=not (args.no_captum or args.no_references),
                 references=not args.no_references)


# ---------------------------------------------------------------------------------------------
# Output


#: One letter per reference library in the summary's ``×ref`` column.
REF_TAGS = {"captum": "c", "grad-cam": "g", "zennit": "z"}


def summary(rows: List[dict], models: List[str]) -> str:
    """The table method × model: ms per call, ratio to the floor, ratio to the reference (its
    library as a letter: c Captum, g pytorch-grad-cam, z Zennit)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["model"], r["method"]): r for r in rows}
    width, first = 32, max([46] + [len(m) + 1 for m in methods])
    lines = [f"{'method':{first}s}" + "".join(f"{m:>{width}s}" for m in models),
             f"{'':{first}s}" + "".join(f"{'ms':>12s} {'×floor':>6s} {'×ref':>7s} {'flag':>4s}"
                                        for _ in models)]
    for method in methods:
        line = f"{method:{first}s}"
        for model in models:
            r = cell.get((model, method))
            if r is None:
                line += f"{'-':>{width}s}"
                continue
            ref = (f"{r['vs_ref']:.2f}{REF_TAGS.get(r['ref'], '?')}"
                   if r.get("vs_ref") is not None else "-")
            flag = "SLOW" if r["status"] == "SLOW" else ""
            line += f"{r['ms']:>12.1f} {r['ratio']:6.2f} {ref:>7s} {flag:>4s}"
        lines.append(line)
    return "\n".join(lines)


def write_out(folder: pathlib.Path, rows: List[dict], settings: dict) -> List[pathlib.Path]:
    """``speed.csv`` (a row per case, the settings repeated) and ``speed.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "speed.csv", folder / "speed.json"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with paths[0].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + list(settings))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **settings})
    paths[1].write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without arguments: the quick run (resnet18, embedded-vgg and embedded-resnet at "
               "64², batch 1, one thread: the short calls of a benchmark; a few minutes on a "
               "busy 2-core machine).")
    parser.add_argument("--full", action="store_true",
                        help="the long run: resnet50 and vgg16 at 224², batch 4, every method")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help="torchvision model names or embedded-vgg / embedded-resnet, comma- "
                             "or space-separated (default: resnet18 embedded-vgg "
                             "embedded-resnet; --full: resnet50 vgg16)")
    parser.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                        help="rows of these methods only, comma- or space-separated, among "
                             + ", ".join(tuple(METHODS) + EXTRA_ROWS) + " (default: all)")
    parser.add_argument("--input-size", type=image_side_arg, default=None, metavar="PX",
                        help="input side (64; --full: 224)")
    parser.add_argument("--batch-size", type=positive_int_arg, default=None, metavar="N",
                        help="images per input batch (1; --full: 4)")
    parser.add_argument("--repeats", type=positive_int_arg, default=5,
                        help="timed calls of each function per measurement; the median is "
                             "reported (default: %(default)s)")
    parser.add_argument("--threads", type=threads_arg, default=None,
                        help="CPU threads (1; --full: PyTorch's default)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall clock (default) or the process's CPU time (steadier on a "
                             "busy machine; use with --threads 1 on the CPU)")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-captum", action="store_true", help="skip the Captum columns")
    parser.add_argument("--no-references", action="store_true",
                        help="skip every other library (Captum, pytorch-grad-cam, Zennit)")
    parser.add_argument("--memory", action="store_true",
                        help="instead of times: each row's peak memory over its floor's (CPU: "
                             "the allocator's reports to torch.profiler; CUDA: "
                             "max_memory_allocated), and IG, SmoothGrad, RISE, Score-CAM at two "
                             "sizes each")
    parser.add_argument("--out", type=pathlib.Path, default=None, metavar="DIR",
                        help="also write the rows to DIR/speed.csv and DIR/speed.json")
    embedded_cli.add_perturbation_arguments(parser, "speed")
    args = parser.parse_args(argv)
    preset = FULL if args.full else QUICK
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.models = embedded_cli.model_names(args.models)
        args.named_methods = [] if args.methods == ["all"] else [
            SAME_ROW.get(m, m) for m in embedded_cli.name_list(
                args.methods, tuple(METHODS) + EXTRA_ROWS, "--methods")]
        args.methods = list(dict.fromkeys(SAME_ROW.get(m, m) for m in embedded_cli.name_list(
            args.methods, tuple(METHODS) + EXTRA_ROWS, "--methods")))
    except ValueError as error:
        parser.error(str(error))
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        parser.error("--clock cpu times CPU work: use it with --device cpu")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        # NumPy's BLAS threads (pytorch-grad-cam's references) would spin into the next row.
        with warnings.catch_warnings(), blas_threads(torch.get_num_threads()):
            warnings.simplefilter("ignore")  # Captum warns on every call; the table is the output
            return (run_memory if args.memory else run)(args, argv)
    finally:
        torch.set_num_threads(threads)


def _settings(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    captum_version = None
    if not args.no_captum:
        try:
            import captum
            captum_version = captum.__version__
        except ImportError:
            pass
    return {"torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "input_size": args.input_size, "repeats": args.repeats, "clock": args.clock,
            "captum": captum_version,
            **({} if args.no_references else
               {k: v for k, v in _references.versions().items() if k != "captum"})}


def _row(name: str, case: Case, res: Dict[str, Any]) -> Dict[str, Any]:
    def ms(key: str) -> Optional[float]:
        return res[key] * 1e3 if key in res else None

    return {"model": name, "method": case.name, "ms": res["method_s"] * 1e3,
            "floor_ms": res["floor_s"] * 1e3, "ratio": res["ratio"],
            "target": case.target_ratio, "status": res["status"],
            "first_ratio": res.get("first_ratio"), "captum_ms": ms("captum_s"),
            "vs_captum": res.get("vs_captum"), "ref": res.get("ref"),
            "ref_ms": ms(f"{res['ref']}_s") if "ref" in res else None,
            "vs_ref": res.get("vs_ref"), "ref_target": case.ref_target,
            "separate_ms": ms("separate_s"),
            "vs_separate": res.get("vs_separate"), "floor": case.floor_name,
            "note": case.note}


def run(args: argparse.Namespace, argv=None) -> int:
    device = torch.device(args.device)
    settings = _settings(args, device)
    shown = sys.argv[1:] if argv is None else list(argv)
    print("$ python benchmarks/speed.py" + "".join(f" {a}" for a in shown))
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, batch "
          f"{args.batch_size}, {args.input_size}², median of {args.repeats}, noise "
          f"±{NOISE:.0%}, {args.clock} clock, captum {settings['captum'] or 'not used'}, "
          f"grad-cam {settings.get('grad-cam') or 'not used'}, "
          f"zennit {settings.get('zennit') or 'not used'}")
    print(HEADER, flush=True)
    rows: List[dict] = []
    errors: List[str] = []
    start = time.perf_counter()
    for name in args.models:
        s = setup(name, args, device)
        hooks = module_hooks(s.model)
        every = [c for family in CASES for c in family(s)]
        missing = [m for m in args.methods if m not in {c.method for c in every}]
        if missing:  # say so rather than leave rows out silently
            print(f"{name:9s} no speed case for {', '.join(missing)} (CASES has no row for them "
                  "yet)", flush=True)
        cases = [c for c in every if c.method in args.methods]
        heavy = [c.name for c in cases if c.heavy and not _heavy_here(name, c, args)]
        if heavy:
            print(f"{name:9s} left out (heavy: name them in --methods to time them here): "
                  f"{', '.join(heavy)}", flush=True)
        cases = [c for c in cases if c.name not in heavy]
        attach_captum(cases, s)
        check_no_hooks_left(s.model, hooks, "building the rows")
        for case in cases:
            try:
                drop_failing(case)
                res = measure(case, min(args.repeats, HEAVY_REPEATS) if case.heavy else
                              args.repeats, device=device, clock=CLOCKS[args.clock])
            except Exception as exc:  # one broken method must not lose the rest of the table
                print(f"{name:9s} {case.name:46s} ERROR {type(exc).__name__}: {exc}", flush=True)
                errors.append(f"{name} {case.name}")
                continue
            check_no_hooks_left(s.model, hooks, case.name)
            print(format_row(name, case, res), flush=True)
            rows.append(_row(name, case, res))
    _report(rows, args, errors, time.perf_counter() - start)
    if args.out is not None:
        paths = write_out(args.out, rows, settings)
        print(f"wrote {', '.join(map(str, paths))}")
    return 1 if errors else 0


def _heavy_here(model: str, case: Case, args: argparse.Namespace) -> bool:
    """Whether a heavy row runs on this model: always when --methods names its method, else
    on the embedded models only."""
    return case.method in (args.named_methods or ()) or model in HEAVY_MODELS


def run_memory(args: argparse.Namespace, argv=None) -> int:
    """``--memory``: each selected row's peak memory (MB) over its floor's, with the reference
    libraries' peaks, then the bounded methods at two sizes."""
    device = torch.device(args.device)
    shown = sys.argv[1:] if argv is None else list(argv)
    print("$ python benchmarks/speed.py" + "".join(f" {a}" for a in shown))
    tracer = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
              "CPU allocator reports to torch.profiler(profile_memory=True)")
    print(f"torch {torch.__version__}, {device}, batch {args.batch_size}, {args.input_size}², "
          f"peak MB allocated during a call above the start ({tracer})")
    print(f"{'model':9s} {'method':46s} {'MB':>8s} {'floor MB':>8s} {'ratio':>6s}  references")
    rows: List[dict] = []
    start = time.perf_counter()
    for name in args.models:
        s = setup(name, args, device)
        hooks = module_hooks(s.model)
        cases = [c for family in CASES for c in family(s) if c.method in args.methods]
        attach_captum(cases, s)
        check_no_hooks_left(s.model, hooks, "building the rows")
        for case in cases:
            drop_failing(case)
            res = case_peaks(case.run, case.floor, case.others, device)
            others = "  ".join(f"{k} {res[f'{k}_mb']:.1f}" for k in case.others)
            print(f"{name:9s} {case.name:46s} {res['method_mb']:8.1f} {res['floor_mb']:8.1f} "
                  f"{res['ratio']:6.2f}  {others}", flush=True)
            rows.append({"model": name, "method": case.name, **res})
        layer = s.options["score_cam"]["saliency_layer"]
        print(f"\n{name}: peak MB at two sizes (bounded by the batch option: the larger size "
              "should not need more)")
        for row, size, calls in bounded_cases(s.model, s.x, s.target, layer,
                                              references=not args.no_references):
            peaks = {k: case_peaks(fn, fn, {}, device)["method_mb"] for k, fn in calls.items()}
            print(f"  {row:34s} {size:28s} " + "  ".join(f"{k} {v:8.1f}"
                                                         for k, v in peaks.items()), flush=True)
            rows.append({"model": name, "method": row, "size": size,
                         **{f"{k}_mb": v for k, v in peaks.items()}})
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.json").write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out / 'memory.json'}")
    return 0


def _report(rows: List[dict], args: argparse.Namespace, errors: List[str],
            seconds: float) -> None:
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
    print(f"\n{len(rows)} rows in {seconds:.0f} s; "
          + (f"SLOW (confirmed by a repeat): {', '.join(slow)}" if slow else "none confirmed slow")
          + (f"; ERROR: {', '.join(errors)}" if errors else ""))


if __name__ == "__main__":
    sys.exit(main())
