r"""Every attribution method side by side: one row per image, one column per method.

Without arguments: the first ``--images`` (4) embedded test images with ``embedded-vgg`` (or
``--model embedded-resnet``), each explained for the first class present in it, with the layer
settings of the pointing-game benchmark (``benchmarks/pointing_game.py``).  With ``--image``:
one image file and a torchvision classifier::

    python benchmarks/compare.py
    python benchmarks/compare.py --model embedded-resnet --images 6 --out figs/
    python benchmarks/compare.py --image cat.jpg --model resnet50 --weights DEFAULT --target 281

The backpropagation methods share one forward pass (:func:`torchray_like.attribution.explain`).
RISE explains the class with ``--rise-masks`` masks; extremal perturbation shows the preserved
mask of area ``--ep-area`` (``--ep-iters`` iterations; the paper uses 800).  The figure is
drawn with :func:`torchray_like.visualize.plot_methods` (a colour bar beside every map; each
map uses its own colour scale) and written to ``OUT/compare.png``, whose path is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import torch  # noqa: E402

from torchray_like.attribution.registry import METHODS  # noqa: E402
from torchray_like.benchmark.runner import positive_int  # noqa: E402

EMBEDDED = ("embedded-vgg", "embedded-resnet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", metavar="FILE",
                        help="an image file to explain with a torchvision --model (default: "
                             "embedded test images)")
    parser.add_argument("--model", default=None,
                        help="embedded-vgg (default) or embedded-resnet; with --image a "
                             "torchvision VGG or ResNet name, e.g. resnet50 or vgg16")
    parser.add_argument("--weights", default=None, metavar="FILE|DEFAULT|random",
                        help="with --image: a state-dict file or DEFAULT (torchvision's "
                             "ImageNet weights, from the local torch hub cache); embedded "
                             "models: omitted = shipped weights, or a file, or random")
    parser.add_argument("--num-classes", type=positive_int, default=1000,
                        help="with --image and a weights FILE: classes of its head "
                             "(default: %(default)s)")
    parser.add_argument("--target", type=int, default=None,
                        help="class to explain (default: the first class present in each "
                             "embedded image; the top prediction for --image)")
    parser.add_argument("--images", type=positive_int, default=4,
                        help="number of embedded test images (rows) (default: %(default)s)")
    parser.add_argument("--methods", default="all",
                        help="comma-separated methods (default: all of "
                             + ", ".join(METHODS) + ")")
    parser.add_argument("--rise-masks", type=positive_int, default=None,
                        help="RISE masks (default: 1000 embedded, 2000 --image)")
    parser.add_argument("--ep-iters", type=positive_int, default=None,
                        help="extremal perturbation iterations (default: 100; the paper "
                             "uses 800)")
    parser.add_argument("--ep-area", type=float, default=0.1,
                        help="extremal perturbation area fraction (default: %(default)s)")
    parser.add_argument("--size", type=positive_int, default=224,
                        help="with --image: network input side (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="device (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(".", "out", "compare"),
                        help="output folder, or a file name ending in .png/.pdf/.svg "
                             "(default: %(default)s)")
    return parser


def _methods(text: str, parser: argparse.ArgumentParser) -> List[str]:
    if text.strip().lower() == "all":
        return list(METHODS)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in list(METHODS)]
    if unknown or not names:
        parser.error(f"--methods: unknown method(s) {', '.join(unknown) or '(none)'}; choose "
                     f"from {', '.join(METHODS)}")
    return names


def _embedded_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser
                     ) -> Tuple[torch.nn.Module, torch.Tensor, List[int], Dict[str, str],
                                Any, List[str]]:
    from torchray_like.benchmark.embedded_data import (
        EMBEDDED_CLASSES, EMBEDDED_MEAN, EMBEDDED_STD, NUM_CLASSES, EmbeddedShapes)
    from torchray_like.benchmark.embedded_models import EMBEDDED_LAYERS, load_embedded_model
    from torchray_like.benchmark.models import get_model

    name = args.model or "embedded-vgg"
    if name not in EMBEDDED:
        parser.error(f"--model {name}: without --image use {' or '.join(EMBEDDED)} (a "
                     "torchvision model needs --image FILE)")
    try:
        if args.weights == "random":
            torch.manual_seed(args.seed)
            model = load_embedded_model(name, pretrained=False)
        elif args.weights is None:
            model = get_model(name)
        else:
            model = get_model(name, weights=os.path.expanduser(args.weights))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        parser.error(f"--model {name}: {error} (pass --weights random to use random weights)")
    data = EmbeddedShapes("test", size=args.images)
    xs, targets, labels = [], [], []
    for i in range(args.images):
        x, label = data[i]
        xs.append(x)
        c = int(label["class_ids"][0]) if args.target is None else args.target
        if not 0 <= c < NUM_CLASSES:
            parser.error(f"--target must be in [0, {NUM_CLASSES}), got {c}")
        targets.append(c)
        labels.append(f"image {i}: {EMBEDDED_CLASSES[c]}")
    return (model, torch.stack(xs), targets, dict(EMBEDDED_LAYERS[name]),
            (EMBEDDED_MEAN, EMBEDDED_STD), labels)


def _file_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser
                 ) -> Tuple[torch.nn.Module, torch.Tensor, List[int], Dict[str, str],
                            Any, List[str]]:
    from PIL import Image
    from torchvision import transforms as T

    from pointing_game import published_layers  # benchmarks/pointing_game.py
    from torchray_like.benchmark.models import IMAGENET_MEAN, IMAGENET_STD, get_model

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
    try:
        if args.weights == "random" or args.weights is None:
            if args.weights is None:
                print("warning: no --weights: random weights (pass --weights DEFAULT or FILE)",
                      file=sys.stderr)
            torch.manual_seed(args.seed)
            model = get_model(arch, head, weights=None)
        else:
            weights = args.weights if args.weights == "DEFAULT" else os.path.expanduser(
                args.weights)
            model = get_model(arch, head, weights=weights)
        layers = published_layers(arch, model)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as error:
        parser.error(f"--model {arch}: {error}")
    transform = T.Compose([T.Resize(args.size, antialias=True), T.CenterCrop(args.size),
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
    return (model, x, [target], layers, (IMAGENET_MEAN, IMAGENET_STD),
            [f"{os.path.basename(args.image)}: class {target}"])


def method_options(methods: Sequence[str], layers: Dict[str, str], side: int,
                   args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    scale = side / 224.0
    options: Dict[str, Dict[str, Any]] = {
        "grad_cam": {"saliency_layer": layers["grad_cam"]},
        "guided_grad_cam": {"saliency_layer": layers["grad_cam"]},
        "linear_approx": {"saliency_layer": layers["grad_cam"]},
        "excitation_backprop": {"saliency_layer": layers["excitation_backprop"]},
        "contrastive_excitation_backprop": {"saliency_layer": layers["excitation_backprop"],
                                            "contrast_layer": layers["contrast"]},
        "rise": {"num_masks": args.rise_masks, "batch_size": 100, "generator": args.seed,
                 "progress": False},
        "extremal_perturbation": {"areas": (args.ep_area,), "max_iter": args.ep_iters,
                                  "step": max(int(round(7 * scale)), 1), "sigma": 21 * scale,
                                  "max_blur": 20 * scale, "generator": args.seed,
                                  "progress": False},
    }
    return {m: options[m] for m in methods if m in options}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = _methods(args.methods, parser)
    if not 0 < args.ep_area < 1:
        parser.error(f"--ep-area must be in (0, 1), got {args.ep_area}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        parser.error(f"--device: not a device: {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    embedded = args.image is None
    if args.rise_masks is None:
        args.rise_masks = 1000 if embedded else 2000
    if args.ep_iters is None:
        args.ep_iters = 100
    model, x, targets, layers, norm, labels = (
        _embedded_inputs if embedded else _file_inputs)(args, parser)
    model = model.eval().to(device)
    x = x.to(device)
    options = method_options(methods, layers, x.shape[-1], args)
    if "rise" in options and not embedded:
        options["rise"]["batch_size"] = 32
    if "rise" in options and embedded:
        options["rise"]["score"] = "sigmoid"  # the embedded models are multi-label
    start = time.time()
    try:
        from torchray_like.attribution.explain import explain
    except ImportError:  # explain() not available: one method at a time
        explain = None
    if explain is not None:
        maps = explain(model, x, targets, methods=methods, options=options)
    else:
        maps = {}
        for m in methods:
            result = METHODS[m](model, x, targets, **options.get(m, {}))
            maps[m] = result[0] if isinstance(result, tuple) else result
    maps = {m: v.detach().float().cpu() for m, v in maps.items()}
    from torchray_like.visualize import plot_methods

    out = args.out
    path = out if os.path.splitext(out)[1].lower() in (".png", ".pdf", ".svg") else \
        os.path.join(out, "compare.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    titles = [m.replace("contrastive_excitation_backprop", "contrastive EBP")
              .replace("excitation_backprop", "excitation BP")
              .replace("extremal_perturbation", f"extremal pert. a={args.ep_area:g}")
              .replace("_", " ") for m in methods]
    plot_methods(x.cpu(), maps, titles=titles, denormalize=norm, save=path)
    print("rows: " + "; ".join(labels))
    print(f"{len(methods)} methods in {time.time() - start:.1f} s")
    print(f"figure: {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
