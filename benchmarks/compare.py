r"""Every attribution method side by side: one row per image, one column per method.

Without arguments: the first ``--limit`` (4) embedded test images with ``embedded-vgg`` (or
``--model embedded-resnet``), each explained for the first class present in it.  With
``--image``: one image file and a torchvision classifier::

    python benchmarks/compare.py
    python benchmarks/compare.py --model embedded-resnet --limit 6 --out figs/
    python benchmarks/compare.py --image cat.jpg --model resnet50 --weights DEFAULT --target 281

Every method runs with the options of :mod:`torchray_like.benchmark.settings` (benchmark
``"compare"``: the models' layers, RISE with 1000 masks, extremal perturbation's mask of area
0.1 after 100 iterations; ``--rise-masks``, ``--ep-iters`` and ``--ep-area`` override them).
The backpropagation methods share one forward pass (:func:`torchray_like.attribution.explain`).
The figure is
drawn with :func:`torchray_like.visualize.plot_methods` (a colour bar beside every map; each
map uses its own colour scale) and written to ``OUT/compare.png``, whose path is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from torchray_like.attribution.explain import explain  # noqa: E402
from torchray_like.attribution.registry import METHODS  # noqa: E402
from torchray_like.benchmark import embedded_cli  # noqa: E402
from torchray_like.benchmark.embedded_models import EMBEDDED_MODELS  # noqa: E402
from torchray_like.benchmark.runner import (  # noqa: E402
    device_arg,
    image_side_arg,
    positive_int_arg,
    seed_arg,
)
from torchray_like.benchmark.settings import not_applicable, options_table  # noqa: E402

EMBEDDED = EMBEDDED_MODELS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", metavar="FILE",
                        help="an image file to explain with a torchvision --model (default: "
                             "embedded test images)")
    parser.add_argument("--model", default=None,
                        help="embedded-vgg (default), embedded-resnet or embedded-vit; with "
                             "--image a torchvision VGG or ResNet name, e.g. resnet50 or vgg16")
    parser.add_argument("--weights", default=None, metavar="FILE|DEFAULT|random",
                        help="a state-dict FILE; random: untrained weights seeded by --seed; "
                             "DEFAULT: torchvision's ImageNet weights (from the local torch hub "
                             "cache; with --image). Omitted: the embedded models' shipped "
                             "weights, random ones for a torchvision model (with a warning)")
    parser.add_argument("--num-classes", type=positive_int_arg, default=1000,
                        help="with --image and a weights FILE: classes of its head "
                             "(default: %(default)s)")
    parser.add_argument("--target", type=int, default=None,
                        help="class to explain (default: the first class present in each "
                             "embedded image; the top prediction for --image)")
    parser.add_argument("--limit", type=positive_int_arg, default=4, metavar="N",
                        help="the first N embedded test images (rows) (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                        help="methods, comma- or space-separated (default: all of "
                             + ", ".join(METHODS) + ")")
    embedded_cli.add_perturbation_arguments(parser, "compare")
    parser.add_argument("--ep-area", type=float, default=None,
                        help="extremal perturbation: the area fraction of the mask shown "
                             "(default: 0.1)")
    parser.add_argument("--input-size", type=image_side_arg, default=224, metavar="PX",
                        help="with --image: network input side (default: %(default)s)")
    parser.add_argument("--device", type=device_arg, default="cpu",
                        help="device (default: %(default)s)")
    parser.add_argument("--seed", type=seed_arg, default=0,
                        help="seed (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(".", "out", "compare"),
                        help="output folder, or a file name ending in .png/.pdf/.svg "
                             "(default: %(default)s)")
    return parser


Inputs = Tuple[torch.nn.Module, torch.Tensor, List[int], Any, List[str]]


def _load(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser,
          head: str = "imagenet") -> torch.nn.Module:
    """The model of ``--model`` with ``--weights`` (a torchvision model without weights gets
    random ones, with a warning: the figure then shows an untrained network)."""
    weights = args.weights
    if weights is None and name not in EMBEDDED:
        print("warning: no --weights: random weights (pass --weights DEFAULT or FILE)",
              file=sys.stderr)
        weights = "random"
    try:
        return embedded_cli.load_benchmark_model(name, weights, args.seed, head)[0]
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as error:
        parser.error(f"--model {name}: {error} (pass --weights random to use random weights)")


def _embedded_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Inputs:
    from torchray_like.benchmark.embedded_data import (
        EMBEDDED_CLASSES,
        EMBEDDED_MEAN,
        EMBEDDED_STD,
        NUM_CLASSES,
        EmbeddedShapes,
    )

    name = args.model or "embedded-vgg"
    if name not in EMBEDDED:
        parser.error(f"--model {name}: without --image use {' or '.join(EMBEDDED)} (a "
                     "torchvision model needs --image FILE)")
    if args.target is not None and not 0 <= args.target < NUM_CLASSES:
        parser.error(f"--target must be in [0, {NUM_CLASSES}), got {args.target}")
    model = _load(name, args, parser)
    data = EmbeddedShapes("test", size=args.limit)
    xs, targets, labels = [], [], []
    for i in range(args.limit):
        x, label = data[i]
        xs.append(x)
        c = int(label["class_ids"][0]) if args.target is None else args.target
        targets.append(c)
        labels.append(f"image {i}: {EMBEDDED_CLASSES[c]}")
    return model, torch.stack(xs), targets, (EMBEDDED_MEAN, EMBEDDED_STD), labels


def _file_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Inputs:
    from PIL import Image
    from torchvision import transforms as T

    from torchray_like.benchmark.models import IMAGENET_MEAN, IMAGENET_STD

    arch = args.model or "resnet50"
    if arch in EMBEDDED:
        parser.error("--image needs a torchvision model (e.g. --model resnet50)")
    try:
        image = Image.open(os.path.expanduser(args.image)).convert("RGB")
    except OSError as error:
        parser.error(f"--image: cannot read {args.image!r}: {error}")
    head = {1000: "imagenet", 20: "voc", 80: "coco"}.get(args.num_classes)
    if head is None:
        parser.error("--num-classes must be 1000 (ImageNet), 20 (VOC) or 80 (COCO)")
    model = _load(arch, args, parser, head)
    side = args.input_size
    transform = T.Compose([T.Resize(side, antialias=True), T.CenterCrop(side),
                           T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = transform(image)[None]
    if args.target is None:
        with torch.no_grad():
            target = int(model.eval()(x).argmax(1))
        print(f"explaining the top prediction, class {target}")
    else:
        target = args.target
        if not 0 <= target < args.num_classes:
            parser.error(f"--target must be in [0, {args.num_classes}), got {target}")
    return (model, x, [target], (IMAGENET_MEAN, IMAGENET_STD),
            [f"{os.path.basename(args.image)}: class {target}"])


def method_options(methods: Sequence[str], model: torch.nn.Module, x: torch.Tensor,
                   args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """The settings table's options (benchmark ``"compare"``) with the flags' overrides."""
    name = args.model or ("embedded-vgg" if args.image is None else "resnet50")
    overrides = embedded_cli.perturbation_overrides(args)
    overrides["extremal_perturbation"]["areas"] = (None if args.ep_area is None
                                                   else [args.ep_area])
    try:
        table = options_table(methods, name, "compare", network=model,
                              input_size=x.shape[-1], overrides=overrides)
    except ValueError as error:
        raise SystemExit(f"compare.py: --model {name}: {error}")
    for method in ("rise", "extremal_perturbation"):
        if method in table:
            table[method].update(generator=args.seed, progress=False)
    return table


def _title(method: str, options: Dict[str, Dict[str, Any]]) -> str:
    if method == "extremal_perturbation":
        areas = options[method]["areas"]
        return "extremal pert. a=" + "+".join(f"{a:g}" for a in areas)
    return (method.replace("contrastive_excitation_backprop", "contrastive EBP")
            .replace("excitation_backprop", "excitation BP").replace("_", " "))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        methods = embedded_cli.name_list(args.methods, tuple(METHODS), "--methods")
    except ValueError as error:
        parser.error(str(error))
    if args.ep_area is not None and not 0 < args.ep_area < 1:
        parser.error(f"--ep-area must be in (0, 1), got {args.ep_area}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        parser.error(f"--device: not a device: {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    model, x, targets, norm, labels = (
        _embedded_inputs if args.image is None else _file_inputs)(args, parser)
    model = model.eval().to(device)
    x = x.to(device)
    refused = embedded_cli.refused_methods(model, x, methods)
    if args.image is None:          # the settings' n/a pairs of the embedded models
        name = args.model or "embedded-vgg"
        refused.update({m: why for m in methods
                        if m not in refused and (why := not_applicable(name, m)) is not None})
    for method, why in refused.items():
        print(f"{method}: n/a ({why})")
    methods = [m for m in methods if m not in refused]
    if not methods:
        parser.error("--methods: the model refuses every method given")
    options = method_options(methods, model, x, args)
    start = time.time()
    maps = explain(model, x, targets, methods=methods, options=options)
    maps = {m: v.detach().float().cpu() for m, v in maps.items()}
    from torchray_like.visualize import plot_methods

    out = args.out
    path = out if os.path.splitext(out)[1].lower() in (".png", ".pdf", ".svg") else \
        os.path.join(out, "compare.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    titles = [_title(m, options) for m in methods]
    plot_methods(x.cpu(), maps, titles=titles, row_titles=labels, denormalize=norm, save=path)
    print("rows: " + "; ".join(labels))
    print(f"{len(methods)} methods in {time.time() - start:.1f} s")
    print(f"figure: {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
