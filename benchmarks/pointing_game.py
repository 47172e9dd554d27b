r"""Pointing game of every attribution method (Zhang et al. 2016; Fong et al. 2019, Table 1).

For each test image and each class present in it, every method computes the class's saliency
map; the map's maximum (after bilinear resizing to the image) is a *hit* when it lies within the
tolerance of an annotated pixel of the class.  Accuracy is hits / (hits + misses) per class,
averaged over the classes, on all (image, class) pairs and on the *difficult* pairs.  The
centre baseline points at the image centre.

Data sets
---------
``embedded`` (default)
    The procedurally drawn test set of :mod:`torchray_like.benchmark.embedded_data` (square
    images of ``IMAGE_SIZE`` pixels, 8 classes, visible-part masks, difficult pairs flagged)
    with the three shipped models ``embedded-vgg``, ``embedded-resnet`` and the transformer
    ``embedded-vit`` (methods that do not apply to a model are listed as n/a).  Tolerance: the
    paper's 15 px at 224 px scaled to the image, 15 · IMAGE_SIZE / 224.
``voc07`` / ``coco14``
    PASCAL VOC 2007 test / COCO 2014 val through
    :class:`~torchray_like.benchmark.pointing_game.PointingGameBenchmark` (box union /
    segmentation masks, 15 px at the original resolution) with a VGG16 / ResNet50 fine-tuned
    on the data set (``--weights FILE``, one per model).  Inputs: shorter side
    ``--input-size`` (224).  The
    backpropagation methods run on the fully convolutional network
    (:func:`~torchray_like.benchmark.models.convert_to_fully_convolutional`) seeded with
    :func:`~torchray_like.attribution.common.get_pointing_gradient`, the published protocol.

Every method's options come from :mod:`torchray_like.benchmark.settings` (the models' layers;
benchmark ``"pointing_game"`` on the embedded data, ``"pointing_game_paper"`` on VOC / COCO:
RISE's masks, extremal perturbation's areas and iterations, the gradient family's smoothing)
and are printed; ``--rise-masks``, ``--rise-batch`` and ``--ep-iters`` override the counts.  A
point exactly ``tolerance`` pixels from the object is a miss, as in TorchRay (``hit_rule``
``"strict"`` in the stored configuration).

Accuracies come with 95 % bootstrap intervals over images (classes averaged in every resample;
``*``: zero width, every image alike), and the published orderings of Fong et al. (2019) are
judged by a paired bootstrap (:mod:`torchray_like.benchmark.intervals`): reproduced, reversed,
not resolved, or too few images.  The CSV and JSON carry the intervals (``all_low`` ...) and
the comparisons; ``OUT/report.html`` shows them with a gallery of maps (``--no-report``).

The defaults take about 74 s of one core's time with the three models (82 s before the shared
occlusion passes and extremal perturbation's image batches, 214 s before issue 22): the
first 128 embedded test images for the fast methods, enough to resolve the published orderings
among them on the VGG, but only 8 for RISE (``--rise-limit``), 4 for extremal perturbation
(``--ep-limit``; 100 iterations, ``--ep-iters``), 8 for the methods of tens of passes per image
(``--slow-limit``) and 16 for the LRP family (``--lrp-limit``): wide intervals (RISE's and
EP's orderings were not resolved with 16 and 8 images either).  The methods described as data
share one forward pass per image (:func:`~torchray_like.attribution.explain.explain`: the same
maps, bit for bit; the call's time split evenly in ``s/image``); occlusion explains every class
of an image from one set of occluded passes (the later classes' calls replay them, bit for
bit), RISE from one call; extremal perturbation optimises the masks of several images in one
call (each with its image's seed: the same masks; the time split by rows); the report's
gallery shows the maps the run scored.  Methods a model refuses (transformer-only ones on
CNNs) are ``n/a``.  Each method has its own progress bar (their costs per image differ a
thousandfold).  Results
are stored image by image in an SQLite file (``OUT/results.sqlite``): ``--resume`` continues a
killed run, ``--from-store`` rebuilds the table without computing anything.  The same command
runs on K processes with ``torchrun --nproc_per_node=K benchmarks/pointing_game.py ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from torchray_like.attribution.explain import explain  # noqa: E402
from torchray_like.attribution.registry import METHODS, SHARED_METHODS  # noqa: E402
from torchray_like.benchmark import embedded_cli  # noqa: E402
from torchray_like.benchmark.pointing_game import PointingGame, centre_point, saliency_to_point  # noqa: E402
from torchray_like.benchmark.pointing_game_methods import (  # noqa: E402
    CENTER,
    IMAGE_BATCH_ROWS,
    all_classes_once,
    describe_settings,
    image_batch,
    method_settings,
)
from torchray_like.benchmark.pointing_game_table import report_tables  # noqa: E402
from torchray_like.benchmark.runner import (  # noqa: E402
    ConfigMismatchError,
    add_common_arguments,
    distributed,
    image_side_arg,
    local_device,
    open_store,
    positive_int_arg,
    run_sharded,
    shard,
)

#: Every method of the table, in its order (the centre baseline first).
ALL_METHODS: Tuple[str, ...] = (CENTER,) + tuple(METHODS)
#: Methods costing hundreds of forward passes per image: their own image limits
#: (``--rise-limit``, ``--ep-limit``).
SLOW_METHODS = ("rise", "extremal_perturbation")
#: Methods with random parts: each image gets its own seed (``--seed`` and the image index).
SEEDED_METHODS = SLOW_METHODS + ("smooth_grad",)
#: Methods of tens of passes per image (issue 19's): one more image limit (``--slow-limit``).
MANY_PASS_METHODS = ("integrated_gradients", "smooth_grad", "occlusion", "score_cam",
                     "ablation_cam", "attention_flow")
#: Layer-wise relevance propagation (every composite): two to five gradients' cost each
#: (``--lrp-limit``).
LRP_FAMILY = tuple(m for m in METHODS if "lrp" in m)
DATASETS = {
    # name: (package data-set name, split, default models, benchmark of the settings table)
    "embedded": (None, "test", "embedded-vgg,embedded-resnet,embedded-vit", "pointing_game"),
    "voc07": ("voc_2007", "test", "vgg16", "pointing_game_paper"),
    "coco14": ("coco", "val2014", "resnet50", "pointing_game_paper"),
}
DEFAULT_LIMIT = {"embedded": 128, "voc07": None, "coco14": None}
# Issue 22: the default run fits in 75 s on an idle two-core CPU.  The published orderings
# the intervals resolve (the fast methods, 128 images) keep every image; RISE's and extremal
# perturbation's were not resolved with 16 and 8 images either (EP - gradient: [-33, +33]
# points), and the other limited methods are in no published ordering.
DEFAULT_RISE_LIMIT = {"embedded": 8, "voc07": None, "coco14": None}
DEFAULT_EP_LIMIT = {"embedded": 4, "voc07": None, "coco14": None}
DEFAULT_SLOW_LIMIT = {"embedded": 8, "voc07": None, "coco14": None}
DEFAULT_LRP_LIMIT = {"embedded": 16, "voc07": None, "coco14": None}
EXPERIMENT = "pointing_game/{dataset}"
#: A point exactly ``tolerance`` pixels from the object misses (TorchRay's rule).
HIT_RULE = "strict"


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------


class Task:
    """The data set, the models and the per-method settings of one run (one per process)."""

    def __init__(self, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
        self.args = args
        self.dataset = args.dataset
        self.device = local_device(args.device)
        self.models: Dict[str, Dict[str, Any]] = {}
        self._samples: Dict[int, Any] = {}
        #: Points computed with another method's (shared pass) and not yet recorded.
        self._shared: Dict[Tuple[str, str, int], Tuple[List[Tuple[int, int]], float]] = {}
        #: Keys still to compute (set by the run; ``None``: all).
        self.pending: Optional[Set[str]] = None
        #: Keys this process computes in the current method's pass (``None``: unknown, each
        #: image on its own).
        self.mine: Optional[Set[str]] = None
        #: arch -> method -> image -> the map of its first class, for the report's gallery.
        self.gallery: Dict[str, Dict[str, Dict[int, torch.Tensor]]] = {}
        self.gallery_images = 0
        if self.dataset == "embedded":
            from torchray_like.benchmark.embedded_data import (
                EMBEDDED_CLASSES,
                IMAGE_SIZE,
                EmbeddedShapes,
            )

            self.data = EmbeddedShapes("test")  # seed 0: the shipped models' test split
            self.classes = list(EMBEDDED_CLASSES)
            self.tolerance = 15.0 * IMAGE_SIZE / 224.0
            self.game = PointingGame(len(self.classes), self.tolerance)  # evaluate: no state
            self.image_side = IMAGE_SIZE
        else:
            from torchray_like.benchmark.datasets import DatasetNotFoundError, get_dataset
            from torchray_like.benchmark.models import get_transform
            from torchray_like.benchmark.pointing_game import PointingGameBenchmark

            name, split = DATASETS[self.dataset][:2]
            kind = "voc" if self.dataset == "voc07" else "coco"
            try:
                self.data = get_dataset(name, split, dataset_dir=args.data_root,
                                        transform=get_transform(kind, size=args.input_size))
            except (DatasetNotFoundError, ValueError) as error:
                parser.error(f"--dataset {self.dataset}: {error}")
            self.bench_all = PointingGameBenchmark(self.data, tolerance=15)
            self.bench_difficult = PointingGameBenchmark(self.data, tolerance=15, difficult=True)
            self.classes = list(self.bench_all.class_names or [])
            self.tolerance = 15.0
            self.image_side = args.input_size
        self.num_images = (len(self.data) if args.limit is None
                           else min(args.limit, len(self.data)))
        self.method_images = {}
        limits = {"rise": args.rise_limit, "extremal_perturbation": args.ep_limit,
                  **{m: args.slow_limit for m in MANY_PASS_METHODS},
                  **{m: args.lrp_limit for m in LRP_FAMILY}}
        for method, limit in limits.items():
            self.method_images[method] = min(limit or self.num_images, self.num_images)
        for k, arch in enumerate(args.models):
            self.models[arch] = self._load(arch, args.weights_of[arch], k, parser)

    def _load(self, arch: str, weights: Optional[str], k: int,
              parser: argparse.ArgumentParser) -> Dict[str, Any]:
        from torchray_like.benchmark.models import convert_to_fully_convolutional

        embedded = arch.startswith("embedded-")
        if embedded != (self.dataset == "embedded"):
            parser.error(f"--models {arch} does not fit --dataset {self.dataset}: use "
                         f"{DATASETS[self.dataset][2]}")
        try:
            # Random weights are seeded identically on every process (same maps under
            # torchrun), differently per model.
            model, fingerprint = embedded_cli.load_benchmark_model(
                arch, weights, self.args.seed * 1000 + k, self._head())
            settings = method_settings(arch, model, self.image_side, DATASETS[self.dataset][3],
                                       self.dataset != "embedded",
                                       embedded_cli.perturbation_overrides(self.args))
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            hint = " (pass --weights random to run with random weights)" if embedded else ""
            parser.error(f"--models {arch}: {error}{hint}")
        if weights == "DEFAULT":
            print(f"warning: {arch} with ImageNet weights and a random {self._head()} head: "
                  "the maps do not explain trained classes", file=sys.stderr)
        model = _frozen(model, self.device)
        skip = self._not_applicable(arch, model)
        fully_conv = None
        if any(s.get("fully_convolutional") for s in settings.values()):
            fully_conv = _frozen(convert_to_fully_convolutional(model), self.device)
        return {"model": model, "fully_convolutional": fully_conv, "weights": fingerprint,
                "settings": settings, "not_applicable": skip}

    def _not_applicable(self, arch: str, model: torch.nn.Module) -> Dict[str, str]:
        """Method -> why it does not apply to the model: the settings table's reasons, and the
        transformer methods a model without attention refuses (tried on one image)."""
        from torchray_like.benchmark.settings import not_applicable

        skip = {m: why for m in ALL_METHODS if (why := not_applicable(arch, m)) is not None}
        x = self.sample(0)["x"][None].to(self.device)
        tried = [m for m in self.args.method_list if m not in skip]
        skip.update(embedded_cli.refused_methods(model, x, tried))
        return skip

    def _head(self) -> str:
        return "voc" if self.dataset == "voc07" else "coco"

    def config(self) -> Dict[str, Any]:
        """What the records depend on (a resumed run must match it)."""
        return {
            "dataset": self.dataset, "split": DATASETS[self.dataset][1],
            "tolerance": self.tolerance, "hit_rule": HIT_RULE, "seed": self.args.seed,
            "input_size": self.image_side,
            "models": {arch: {"weights": m["weights"], "settings": m["settings"]}
                       for arch, m in self.models.items()},
        }

    # -- samples

    def sample(self, index: int) -> Dict[str, Any]:
        """Image tensor, size and ``[(class, in_all, in_difficult)]`` candidates of one image."""
        if index in self._samples:
            return self._samples[index]
        if len(self._samples) > 256:
            self._samples.clear()
        x, label = self.data[index]
        if self.dataset == "embedded":
            masks = {}
            pairs = []
            for k, c in enumerate(label["class_ids"].tolist()):
                masks[c] = label["masks"][label["labels"] == c].any(0)
                pairs.append((c, bool(label["class_difficult"][k])))
            sample = {"x": x, "size": tuple(label["image_size"]), "pairs": pairs,
                      "masks": masks, "label": label}
        else:
            from torchray_like.benchmark import datasets as ads
            if self.dataset == "voc07":
                size = ads.voc_as_image_size(label)[::-1]  # (height, width)
                classes = ads.voc_as_class_ids(label, include_difficult=True)
            else:
                size = ads.coco_as_image_size(self.data, label)[::-1]
                classes = ads.coco_as_class_ids(label)
            sample = {"x": x, "size": tuple(size), "pairs": [(c, None) for c in classes],
                      "label": label}
        self._samples[index] = sample
        return sample

    def score(self, sample: Dict[str, Any], class_id: int, difficult: Optional[bool],
              point: Tuple[int, int]) -> Tuple[int, int]:
        """``(all, difficult)`` results of a point: +1 hit, -1 miss, 0 not in the subset."""
        if self.dataset == "embedded":
            # Many methods point at the same pixel: each (class, point) is judged once per image.
            hits = sample.setdefault("hits", {})
            hit = hits.get((class_id, tuple(point)))
            if hit is None:
                hit = hits[(class_id, tuple(point))] = self.game.evaluate(
                    sample["masks"][class_id], point)
            return hit, hit if difficult else 0
        label = sample["label"]
        return (self.bench_all.evaluate(label, class_id, point),
                self.bench_difficult.evaluate(label, class_id, point))

    # -- one item

    def compute(self, item: Tuple[str, str, int]) -> Dict[str, Any]:
        arch, method, index = item
        sample = self.sample(index)
        classes = [c for c, _ in sample["pairs"]]
        size = sample["size"]
        if method == CENTER or not classes:
            start = time.perf_counter()
            points = [centre_point(size)] * len(classes)
            seconds = time.perf_counter() - start
        else:
            points, seconds = self.points(arch, method, index, sample)
        results = []
        for (c, difficult), point in zip(sample["pairs"], points):
            in_all, in_difficult = self.score(sample, c, difficult, point)
            results.append([int(c), int(in_all), int(in_difficult),
                            [int(point[0]), int(point[1])]])
        return {"model": arch, "method": method, "index": index, "size": list(size),
                "pairs": results, "seconds": seconds}

    def shared_group(self, arch: str, method: str, index: int) -> List[str]:
        """The methods whose maps of image ``index`` one :func:`explain` call computes with
        ``method``'s: the shared backpropagation methods of the run on the original network
        (not the pointing-gradient protocol), whose record is still to compute."""
        settings = self.models[arch]["settings"]

        def shares(name: str) -> bool:
            entry = settings[name]
            return name in SHARED_METHODS and not entry.get("fully_convolutional") \
                and not entry.get("pointing_gradient")

        if not shares(method):
            return [method]
        return [m for m in self.args.method_list if m == method or (
            shares(m) and (self.pending is None or item_key((arch, m, index)) in self.pending))]

    def points(self, arch: str, method: str, index: int, sample: Dict[str, Any]
               ) -> Tuple[List[Tuple[int, int]], float]:
        """The maxima of the method's maps of the image's classes and the seconds they took.

        The shared methods come from one :func:`explain` call (the same maps, bit for bit, as
        their own functions: one forward pass, a backward pass per rule); its time is split
        evenly among them, and the others' points wait in a cache for their items.
        """
        cached = self._shared.pop((arch, method, index), None)
        if cached is not None:
            return cached
        images = self.batch_images(arch, method, index)
        if len(images) > 1:
            return self.batch_points(arch, method, images)
        classes = [c for c, _ in sample["pairs"]]
        group = self.shared_group(arch, method, index)
        start = time.perf_counter()
        if len(group) > 1:
            bundle = self.models[arch]
            x = sample["x"].to(self.device)
            batch = x[None].expand(len(classes), *x.shape).contiguous()
            maps = explain(bundle["model"], batch, classes, methods=group,
                           options={m: bundle["settings"][m]["kwargs"] for m in group})
        else:
            maps = {method: self.maps(arch, method, sample["x"], classes, index)}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result = {name: self._points_of(arch, name, index, smap, sample["size"])
                  for name, smap in maps.items()}
        seconds = (time.perf_counter() - start) / len(group)
        for name, points in result.items():
            if name != method:
                self._shared[(arch, name, index)] = (points, seconds)
        return result[method], seconds

    def _points_of(self, arch: str, method: str, index: int, maps: torch.Tensor,
                   size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The maxima of the ``(K, 1, h, w)`` maps of one image (the first kept for the
        report's gallery)."""
        if index < self.gallery_images:
            self.gallery.setdefault(arch, {}).setdefault(method, {})[index] = \
                maps[:1].detach().float().cpu()
        return [saliency_to_point(maps[k], size) for k in range(maps.shape[0])]

    def batch_images(self, arch: str, method: str, index: int) -> List[int]:
        """The images explained with ``index`` in one call (:data:`IMAGE_BATCH_ROWS`): the next
        ones this process computes, while their classes fit in the rows."""
        entry = self.models[arch]["settings"][method]
        if method not in IMAGE_BATCH_ROWS or self.mine is None or self.dataset != "embedded" \
                or entry.get("fully_convolutional") or entry.get("pointing_gradient"):
            return [index]
        mine = {i for i in range(self.num_images) if item_key((arch, method, i)) in self.mine}
        return image_batch(index, self.method_images.get(method, self.num_images),
                           lambda j: len(self.sample(j)["pairs"]), mine,
                           IMAGE_BATCH_ROWS[method])

    def batch_points(self, arch: str, method: str, images: List[int]
                     ) -> Tuple[List[Tuple[int, int]], float]:
        """:meth:`points` of several images from one call of the method (each row with its
        image's seed, as :meth:`maps` gives it); the others' points wait in the cache, and the
        call's time is split by rows."""
        bundle = self.models[arch]
        samples = [self.sample(j) for j in images]
        classes = [[c for c, _ in s["pairs"]] for s in samples]
        batch = torch.cat([s["x"][None].expand(len(c), *s["x"].shape)
                           for s, c in zip(samples, classes)]).to(self.device)
        seeds = [self.seed(j) + k for j, c in zip(images, classes) for k in range(len(c))]
        kwargs = dict(bundle["settings"][method]["kwargs"])
        if method in SEEDED_METHODS:
            kwargs.update(generator=seeds, progress=False)
        start = time.perf_counter()
        maps = METHODS[method](bundle["model"], batch, sum(classes, []), **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        per_row = (time.perf_counter() - start) / len(seeds)  # seeds: one per row
        first = 0
        for j, s, c in zip(images, samples, classes):
            points = self._points_of(arch, method, j, maps[first:first + len(c)], s["size"])
            self._shared[(arch, method, j)] = (points, per_row * len(c))
            first += len(c)
        return self._shared.pop((arch, method, images[0]))

    def seed(self, index: int) -> int:
        """The seed of image ``index``'s random parts (row ``k`` of its batch: ``+ k``)."""
        return (self.args.seed * 1_000_003 + index * 101) % (2 ** 31)

    def maps(self, arch: str, method: str, x: torch.Tensor, classes: List[int],
             index: int) -> torch.Tensor:
        """``(K, 1, h, w)`` maps of the image's ``K`` classes (any resolution)."""
        from torchray_like.attribution.common import get_pointing_gradient

        bundle = self.models[arch]
        entry = bundle["settings"][method]
        kwargs = dict(entry["kwargs"])
        fn = METHODS[method]
        x = x.to(self.device)
        batch = x[None].expand(len(classes), *x.shape).contiguous()
        seed = self.seed(index)
        if entry.get("all_classes_once"):
            return all_classes_once(method, bundle["model"], x[None], classes, kwargs, seed)
        if method in SEEDED_METHODS:  # reproducible: each image's noise from its own seed
            kwargs.update(generator=seed, progress=False)
        model = bundle["fully_convolutional"] if entry.get("fully_convolutional") \
            else bundle["model"]
        if entry.get("pointing_gradient"):
            kwargs["get_backward_gradient"] = get_pointing_gradient
        return fn(model, batch, classes, **kwargs)


def _frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode on the device, ``requires_grad`` off (the methods need no weight gradients)."""
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


_UNSET = -1  # "not given" (argparse would run a string default through the type)


def _limit_or_all(text: str) -> Optional[int]:
    if text.lower() in ("all", "none"):
        return None
    return positive_int_arg(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pointing_game.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="embedded",
                        help="data set (default: %(default)s)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="folder holding VOCdevkit/ (voc07) or val2014/ + annotations/ "
                             "(coco14)")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help="models, comma- or space-separated: embedded-vgg,embedded-resnet,"
                             "embedded-vit (embedded, the default), vgg16 (voc07 default), "
                             "resnet50 (coco14 default), or another torchvision VGG/ResNet")
    parser.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                        help="methods, comma- or space-separated, among: "
                             + ", ".join(ALL_METHODS) + " (default: all)")
    parser.add_argument("--rise-limit", type=_limit_or_all, default=_UNSET, metavar="N|all",
                        help="images for RISE, at most --limit (default: 8 embedded, all "
                             "voc07/coco14)")
    parser.add_argument("--ep-limit", type=_limit_or_all, default=_UNSET, metavar="N|all",
                        help="images for extremal perturbation, at most --limit (default: 4 "
                             "embedded, all voc07/coco14)")
    parser.add_argument("--slow-limit", type=_limit_or_all, default=_UNSET, metavar="N|all",
                        help="images for " + ", ".join(MANY_PASS_METHODS) + ", at most --limit "
                             "(default: 8 embedded, all voc07/coco14)")
    parser.add_argument("--lrp-limit", type=_limit_or_all, default=_UNSET, metavar="N|all",
                        help="images for " + ", ".join(LRP_FAMILY) + ", at most --limit "
                             "(default: 16 embedded, all voc07/coco14)")
    embedded_cli.add_perturbation_arguments(parser, "pointing_game")
    for action in parser._actions:
        if action.dest in ("rise_masks", "rise_batch", "ep_iters"):
            action.help = action.help[:-1] + " embedded; voc07/coco14: the paper's)"
    parser.add_argument("--input-size", type=image_side_arg, default=224, metavar="PX",
                        help="voc07/coco14: shorter side of the network input "
                             "(default: %(default)s)")
    embedded_cli.add_model_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--no-report", action="store_true",
                        help="do not write OUT/report.html (the tables, figures and a gallery "
                             "of the maps of a few test images: about a second more)")
    add_common_arguments(parser, default_out=os.path.join(".", "out", "pointing_game"))
    parser.set_defaults(limit=_UNSET)
    for action in parser._actions:
        if action.dest == "limit":
            action.help = "use only the first N test images (default: 128 embedded, all " \
                          "voc07/coco14)"
    return parser


def parse_args(argv: Optional[Sequence[str]] = None
               ) -> Tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.limit == _UNSET:
        args.limit = DEFAULT_LIMIT[args.dataset]
    if args.rise_limit == _UNSET:
        args.rise_limit = DEFAULT_RISE_LIMIT[args.dataset]
    if args.ep_limit == _UNSET:
        args.ep_limit = DEFAULT_EP_LIMIT[args.dataset]
    if args.slow_limit == _UNSET:
        args.slow_limit = DEFAULT_SLOW_LIMIT[args.dataset]
    if args.lrp_limit == _UNSET:
        args.lrp_limit = DEFAULT_LRP_LIMIT[args.dataset]
    if args.data_root is not None and args.dataset == "embedded":
        parser.error("--data-root is for --dataset voc07 / coco14 (the embedded data set is "
                     "drawn on the fly)")
    try:
        args.method_list = embedded_cli.name_list(args.methods, ALL_METHODS, "--methods")
        args.models = embedded_cli.name_list(args.models or [DATASETS[args.dataset][2]], None,
                                             "--models")
    except ValueError as error:
        parser.error(str(error))
    embedded_cli.check_weights(parser, args, args.models)
    return args, parser


def items_of(task: Task, methods: Sequence[str]) -> List[Tuple[str, str, int]]:
    items = []
    for arch, bundle in task.models.items():
        for method in methods:
            if method in bundle["not_applicable"]:
                continue
            n = task.method_images.get(method, task.num_images)
            items += [(arch, method, i) for i in range(n)]
    return items


def item_key(item: Tuple[str, str, int]) -> str:
    arch, method, index = item
    return f"{arch}/{method}/{index:06d}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, parser = parse_args(argv)
    # Small models: threads gain little and lose a lot on a shared machine; processes
    # (torchrun) scale better.  The caller's thread count is restored.
    return embedded_cli.with_threads(lambda a: run(a, parser, argv), args)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]]) -> int:
    """The benchmark, under ``torchrun`` or not (rank 0 reports)."""
    started = time.time()
    experiment = EXPERIMENT.format(dataset=args.dataset)
    with distributed(args.device) as (rank, world_size):
        if args.from_store:
            return _from_store(args, parser, experiment, rank)
        task = Task(args, parser)
        config = task.config()
        try:
            store = open_store(args, experiment, config)
        except ConfigMismatchError as error:
            parser.error(str(error))
        items = items_of(task, args.method_list)
        done = store.done()
        task.pending = {item_key(i) for i in items} - done
        if rank == 0:
            _announce(args, task, store, items, world_size)
            if not args.no_report and args.dataset == "embedded":
                # The report's gallery shows the maps of the first test images: keep them.
                task.gallery_images = _report_module().DEFAULT_GALLERY_IMAGES
        # One bar per method: their costs per image differ a thousandfold, so a shared bar
        # would reach 99 % long before the end.
        for k, method in enumerate(args.method_list, start=1):
            mine = [i for i in items if i[1] == method]
            if not mine:  # applies to none of the models
                continue
            # The keys this process computes (run_sharded's shard, less the stored ones).
            task.mine = set(shard([item_key(i) for i in mine], rank, world_size)) & task.pending
            run_sharded(mine, task.compute, store,
                        key=item_key, progress=not args.no_progress,
                        desc=f"pointing game {k}/{len(args.method_list)} {method}")
        if rank != 0:
            return 0
        keys = {item_key(i) for i in items}
        records = [r for r in store.records() if r["key"] in keys]
        wall = time.time() - started
        meta = {"command": " ".join([os.path.basename(sys.argv[0])] + list(
            sys.argv[1:] if argv is None else argv)), "dataset": args.dataset,
            "images": task.num_images, "rise_images": task.method_images["rise"],
            "ep_images": task.method_images["extremal_perturbation"],
            "slow_images": task.method_images["score_cam"],
            "lrp_images": task.method_images["lrp"],
            "world_size": world_size, "wall_seconds": wall, "config": config}
        gallery = {arch: m["model"] for arch, m in task.models.items()
                   if arch.startswith("embedded-")}
        shown = [m for m in args.method_list  # the gallery's methods apply to every model
                 if not any(m in task.models[arch]["not_applicable"] for arch in gallery)]
        _report(args, records, len(task.classes), list(task.models), meta, wall, gallery,
                task.gallery, shown)
    return 0


def _announce(args: argparse.Namespace, task: Task, store: Any,
              items: Sequence[Tuple[str, str, int]], world_size: int) -> None:
    print(f"pointing game on {args.dataset} ({DATASETS[args.dataset][1]}): "
          f"{task.num_images} images ({task.method_images['rise']} for RISE, "
          f"{task.method_images['extremal_perturbation']} for extremal perturbation, "
          f"{task.method_images['score_cam']} for {', '.join(MANY_PASS_METHODS)}, "
          f"{task.method_images['lrp']} for {', '.join(LRP_FAMILY)}), "
          f"tolerance {task.tolerance:.3g} px ({HIT_RULE}: a point at the tolerance misses), "
          f"{world_size} process(es), device {args.device}")
    for arch, bundle in task.models.items():
        print(f"  {arch} (weights {bundle['weights'][:23]}), settings:")
        print("\n".join(describe_settings(bundle["settings"], [
            m for m in args.method_list if m not in bundle["not_applicable"]])))
        for method, why in bundle["not_applicable"].items():
            if method in args.method_list:
                print(f"    {method:32s} n/a: {why}")
    print(f"  store {store.path} ({'resuming' if args.resume else 'fresh'}; "
          f"{len(store.done() & {item_key(i) for i in items})} of {len(items)} "
          "items stored)", flush=True)


def _report(args: argparse.Namespace, records: Sequence[Mapping[str, Any]], num_classes: int,
            models: Sequence[str], meta: Mapping[str, Any], wall: float,
            gallery: Optional[Mapping[str, torch.nn.Module]] = None,
            given: Optional[Mapping[str, Any]] = None,
            gallery_methods: Optional[Sequence[str]] = None) -> None:
    """The table with its intervals, the published orderings, the files and the HTML page
    (with a gallery of the maps of ``gallery``'s embedded models; none from the store)."""
    csv_path, json_path = report_tables(args.out, records, num_classes, models,
                                        args.method_list, meta, seed=args.seed)
    print(f"wrote {csv_path} and {json_path}; wall time {wall:.1f} s", flush=True)
    if not args.no_report:
        path = _report_module().write_report(
            args.out, gallery_models=gallery or {},
            gallery_methods=args.method_list if gallery_methods is None else gallery_methods,
            gallery_given=given)
        print(f"report: {path}", flush=True)


def _report_module() -> Any:
    """``benchmarks/report.py``, loaded from beside this script (not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.py")
    spec = importlib.util.spec_from_file_location("torchray_like_benchmark_report", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _from_store(args: argparse.Namespace, parser: argparse.ArgumentParser, experiment: str,
                rank: int) -> int:
    started = time.time()
    try:
        store = open_store(args, experiment)
    except FileNotFoundError as error:
        parser.error(str(error))
    if rank != 0:
        return 0
    config = store.config
    records = store.records()
    if config is None or not records:
        parser.error(f"--from-store: no records of {experiment!r} in {store.path}")
    from_config = list(config["models"])
    wanted = [m for m in args.models if m in from_config] or from_config
    if args.dataset == "embedded":
        from torchray_like.benchmark.embedded_data import NUM_CLASSES
        num_classes = NUM_CLASSES
    else:
        from torchray_like.benchmark.datasets import COCO_CLASSES, VOC_CLASSES
        num_classes = len(VOC_CLASSES if args.dataset == "voc07" else COCO_CLASSES)
    print(f"pointing game on {args.dataset} from {store.path}: {len(records)} stored records")
    meta = {"command": " ".join(sys.argv), "dataset": args.dataset, "from_store": True,
            "config": config}
    _report(args, records, num_classes, wanted, meta, time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
