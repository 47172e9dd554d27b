"""Command-line plumbing shared by the benchmark scripts under ``benchmarks/``.

The flags mean the same in every script:

``--models`` / ``--methods``
    Names separated by commas or spaces (``--methods gradient,grad_cam`` or ``--methods
    gradient grad_cam``), or ``all`` (:func:`name_list`).
``--weights FILE|random|DEFAULT``
    A state-dict *file*, one for every model or one per model (comma-separated, in the order
    of ``--models``); ``random``: untrained weights seeded by ``--seed``; ``DEFAULT``:
    torchvision's ImageNet weights (torchvision models only).  Omitted: the embedded models'
    shipped weights (:func:`load_benchmark_model`).
``--limit N``
    The first ``N`` test images (from :func:`~torchray_like.benchmark.runner.add_common_arguments`).
``--rise-masks``, ``--rise-batch``, ``--ep-iters``
    Override the counts of :data:`~torchray_like.benchmark.settings.BENCHMARKS`
    (:func:`add_perturbation_arguments`, :func:`perturbation_overrides`).
``--threads N``
    ``torch.set_num_threads`` for the run (restored afterwards).

Also here: the worker base of the embedded-benchmark scripts (deletion/insertion, sanity
checks) and one sharded pass over their ``(model, image, method)`` items.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import runner
from .deletion_insertion import top_present_class
from .embedded_data import EmbeddedShapes
from .embedded_models import EMBEDDED_MODELS, WeightsError
from .settings import not_applicable

__all__ = ["add_model_arguments", "add_perturbation_arguments", "perturbation_overrides",
           "add_embedded_arguments", "parse_embedded_arguments", "script_options",
           "name_list", "model_names", "split_weights", "check_weights", "load_benchmark_model",
           "weights_label", "write_csv", "with_threads", "EmbeddedWorker", "load_models_or_exit",
           "run_items", "run_benchmark", "refused_methods", "not_applicable_pairs"]

Item = Tuple[str, int, str]   # (model name, image index, method)

WEIGHTS_HELP = ("a state-dict FILE, one for all models or one per model (comma-separated, in "
                "the order of --models); random: untrained weights seeded by --seed; DEFAULT: "
                "torchvision's ImageNet weights (torchvision models). Omitted: the embedded "
                "models' shipped weights")


def model_names(values: Sequence[str], what: str = "--models", embedded: bool = True
                ) -> List[str]:
    """:func:`name_list` of model names, each an embedded model (with ``embedded``) or a
    torchvision classification model (``torchvision.models.list_models``).

    Raises
    ------
    ValueError
        Naming ``what`` and the unknown names, with examples of known ones.
    """
    import torchvision
    names = name_list(values, None, what)
    known = set(torchvision.models.list_models(module=torchvision.models))
    if embedded:
        known |= set(EMBEDDED_MODELS)
    unknown = [n for n in names if n not in known]
    if unknown:
        examples = ", ".join((sorted(EMBEDDED_MODELS) if embedded else [])
                             + ["resnet18", "vgg16", "resnet50"])
        raise ValueError(f"{what}: unknown model(s) {', '.join(unknown)}; give "
                         f"{'embedded or ' if embedded else ''}torchvision classification "
                         f"models, e.g. {examples} (torchvision.models.list_models())")
    return names


def name_list(values: Sequence[str], choices: Optional[Sequence[str]], what: str) -> List[str]:
    """Names given as ``a,b c`` (commas or separate words) or ``all``.

    With ``choices`` the names are checked against them and returned in their order (``all``:
    every choice); without, any names are kept in the order given.

    Raises
    ------
    ValueError
        Naming ``what`` (``"--methods"``) and the unknown or repeated names, or when none is
        given.
    """
    names = [n.strip() for v in values for n in str(v).split(",") if n.strip()]
    if choices is None:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated or not names:
            raise ValueError(f"{what}: give distinct names, got "
                             f"{', '.join(names) if names else '(none)'}")
        return names
    if [n.lower() for n in names] == ["all"]:
        return list(choices)
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise ValueError(f"{what}: unknown name(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(choices)} (or all)")
    return [c for c in choices if c in names]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--weights FILE|random[,...]`` and ``--threads`` (default 1)."""
    parser.add_argument("--weights", default=None, metavar="FILE|random", help=WEIGHTS_HELP)
    parser.add_argument("--threads", type=runner.threads_or_default_arg, default=1,
                        help="torch.set_num_threads; 0 keeps PyTorch's default (default: "
                             "%(default)s: the many small operations gain little from more, and "
                             "suffer when cores are shared; use torchrun to use more cores)")


def add_perturbation_arguments(parser: argparse.ArgumentParser, benchmark: str) -> None:
    """``--rise-masks``, ``--rise-batch`` and ``--ep-iters``: counts overriding those of
    :data:`~torchray_like.benchmark.settings.BENCHMARKS` ``[benchmark]``."""
    from .settings import BENCHMARKS

    rise = BENCHMARKS[benchmark].get("rise", {})
    ep = BENCHMARKS[benchmark].get("extremal_perturbation", {})
    parser.add_argument("--rise-masks", type=runner.positive_int_arg, default=None, metavar="N",
                        help=f"RISE masks per image (default: {rise.get('num_masks', 'RISE')})")
    parser.add_argument("--rise-batch", type=runner.positive_int_arg, default=None, metavar="N",
                        help=f"RISE masked images per forward pass (default: "
                             f"{rise.get('batch_size', 32)})")
    parser.add_argument("--ep-iters", type=runner.positive_int_arg, default=None, metavar="N",
                        help=f"extremal perturbation iterations (default: "
                             f"{ep.get('max_iter', 800)}; the paper: 800)")


def perturbation_overrides(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """The per-method overrides of the flags of :func:`add_perturbation_arguments` (unset
    flags are ``None``, which :func:`~torchray_like.benchmark.settings.method_options`
    ignores)."""
    return {"rise": {"num_masks": getattr(args, "rise_masks", None),
                     "batch_size": getattr(args, "rise_batch", None)},
            "extremal_perturbation": {"max_iter": getattr(args, "ep_iters", None)}}


def add_embedded_arguments(parser: argparse.ArgumentParser, benchmark: str,
                           methods: Sequence[str], default_methods: Sequence[str],
                           limit: int) -> None:
    """The flags every embedded-benchmark script shares: ``--models``, ``--methods`` (among
    ``methods``), the counts of :func:`add_perturbation_arguments`, ``--weights``,
    ``--threads``, ``--no-progress`` and the common options with ``--limit`` defaulting to
    ``limit``.  :func:`parse_embedded_arguments` checks them."""
    left_out = [m for m in methods if m not in default_methods]
    default = "all" + (f" but {', '.join(left_out)}" if left_out else "")
    parser.add_argument("--models", nargs="+", default=["all"], metavar="MODEL",
                        help=f"embedded models, among {', '.join(EMBEDDED_MODELS)}, "
                             "comma- or space-separated (default: all)")
    parser.add_argument("--methods", nargs="+", default=list(default_methods),
                        metavar="METHOD",
                        help=f"methods, among {', '.join(methods)}, comma- or space-separated, "
                             f"or all (default: {default})")
    add_perturbation_arguments(parser, benchmark)
    add_model_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    runner.add_common_arguments(parser, default_out=os.path.join(".", "out", benchmark))
    parser.set_defaults(limit=limit)
    for action in parser._actions:
        if action.dest == "limit":
            action.help = f"use only the first N test images (default: {limit})"


def parse_embedded_arguments(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                             methods: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``--models`` / ``--methods`` become lists of names and ``--weights`` is
    checked (argparse errors naming the flag)."""
    args = parser.parse_args(argv)
    try:
        args.models = name_list(args.models, EMBEDDED_MODELS, "--models")
        args.methods = name_list(args.methods, methods, "--methods")
    except ValueError as error:
        parser.error(str(error))
    check_weights(parser, args, args.models)
    return args


def script_options(method: str, model: str, benchmark: str,
                   args: argparse.Namespace) -> Dict[str, Any]:
    """The options of one method call in an embedded-benchmark script: the settings table's
    (:func:`~torchray_like.benchmark.settings.method_options`) with the flags' counts, RISE
    scored by ``args.score`` and the random methods seeded by ``args.seed``."""
    from .settings import method_options

    options = method_options(method, model, benchmark,
                             overrides=perturbation_overrides(args).get(method))
    if method == "rise":
        options["score"] = args.score
    if method in ("rise", "extremal_perturbation"):
        options["generator"] = args.seed
    return options


def split_weights(text: Optional[str], models: Sequence[str]) -> Dict[str, Optional[str]]:
    """``--weights`` as ``{model: FILE | "random" | "DEFAULT" | None}``.

    Raises
    ------
    ValueError
        When the number of comma-separated values is neither one nor one per model.
    """
    if text is None:
        return {m: None for m in models}
    parts = [p.strip() or None for p in text.split(",")]
    if len(parts) == 1:
        parts = parts * len(models)
    if len(parts) != len(models):
        raise ValueError(f"--weights: give one value or one per model ({len(models)}: "
                         f"{', '.join(models)}), got {len(parts)}")
    return dict(zip(models, parts))


def check_weights(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  models: Sequence[str]) -> None:
    """:func:`split_weights` into ``args.weights_of``; a wrong count, a missing file or
    ``DEFAULT`` for an embedded model is an argparse error naming the flag."""
    try:
        args.weights_of = split_weights(args.weights, models)
    except ValueError as error:
        parser.error(str(error))
    for model, spec in args.weights_of.items():
        if spec == "DEFAULT" and model in EMBEDDED_MODELS:
            parser.error("--weights DEFAULT is for torchvision models; the embedded models use "
                         "their shipped weights (omit --weights) or a FILE")
        if spec not in (None, "random", "DEFAULT") and not os.path.isfile(
                os.path.expanduser(spec)):
            parser.error(f"--weights: no such file {spec!r} (for {model})")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_benchmark_model(name: str, weights: Optional[str], seed: int = 0,
                         head: str = "imagenet") -> Tuple[torch.nn.Module, str]:
    """Model ``name`` in eval mode and a fingerprint of its weights (for the settings).

    ``weights``: ``None`` (the embedded models' shipped weights), ``"random"`` (untrained,
    seeded by ``seed`` without touching the global RNG), ``"DEFAULT"`` (torchvision's
    ImageNet weights, a random ``head`` other than ImageNet's) or a state-dict file
    (fingerprint: its SHA-256).  ``head``: ``"imagenet"``, ``"voc"`` or ``"coco"`` for
    torchvision models.

    Raises
    ------
    ValueError
        A torchvision model without ``weights``, a missing file; what
        :func:`~.models.get_model` raises (a state dict of another model ...).
    """
    from .embedded_models import EMBEDDED_WEIGHTS, load_embedded_model
    from .models import get_model

    embedded = name in EMBEDDED_MODELS
    if weights == "random":
        with torch.random.fork_rng(devices=[]):      # the same untrained model in every process
            torch.manual_seed(seed)
            model = (load_embedded_model(name, pretrained=False) if embedded
                     else get_model(name, head, weights=None))
        return model.eval(), f"random:{seed}"
    if weights is None:
        if not embedded:
            raise ValueError(f"{name} needs --weights FILE (a state dict), DEFAULT (ImageNet "
                             "weights) or random")
        return get_model(name), "shipped:" + EMBEDDED_WEIGHTS[name][1]
    if weights == "DEFAULT":
        return get_model(name, head, weights="DEFAULT"), "torchvision:DEFAULT"
    path = os.path.expanduser(weights)
    if not os.path.isfile(path):
        raise ValueError(f"no such weights file {weights!r} for {name} (give a state-dict "
                         "file, random, or DEFAULT for torchvision models)")
    return get_model(name, head, weights=path), "sha256:" + _sha256(path)


def weights_label(args: argparse.Namespace) -> Dict[str, str]:
    """What the settings record about each model's weights (``shipped:…``, ``random:SEED``,
    ``sha256:…``) without loading them."""
    from .embedded_models import EMBEDDED_WEIGHTS

    out = {}
    for name, spec in split_weights(args.weights, args.models).items():
        if spec is None:
            out[name] = "shipped:" + EMBEDDED_WEIGHTS[name][1]
        elif spec == "random":
            out[name] = f"random:{args.seed}"
        else:
            path = os.path.expanduser(spec)
            out[name] = "sha256:" + _sha256(path) if os.path.isfile(path) else f"missing:{path}"
    return out


def write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> str:
    """``rows`` as a CSV file (columns: the first row's keys; a header only when empty), in a
    folder created if needed; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model", "method"])
        writer.writeheader()
        writer.writerows(rows)
    return path


class EmbeddedWorker:
    """What the workers of the embedded-benchmark scripts share: the test images, the models
    (loaded once per process, eval mode, on the device) and each image's target — its most
    confident ground-truth class under ``args.score``.  Subclasses compute the record of one
    ``(model, image, method)`` item in ``__call__``."""

    #: Turn the models' ``requires_grad`` off when loading them.
    freeze = False

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.data = EmbeddedShapes("test", size=max(args.limit, 1))
        self.models: Dict[str, torch.nn.Module] = {}
        self.targets: Dict[Tuple[str, int], int] = {}

    def model(self, name: str) -> torch.nn.Module:
        if name not in self.models:
            spec = split_weights(self.args.weights, self.args.models)[name]
            model, _ = load_benchmark_model(name, spec, self.args.seed)
            if self.freeze:
                for p in model.parameters():
                    p.requires_grad_(False)
            self.models[name] = model.to(self.device).eval()
        return self.models[name]

    def image(self, name: str, index: int) -> Tuple[torch.nn.Module, torch.Tensor, int]:
        """``(model, x, target)`` for test image ``index``: ``x`` is ``(1, C, H, W)`` on the
        device, the target is computed once per model and image."""
        model = self.model(name)
        x, ann = self.data[index]
        x = x[None].to(self.device)
        key = (name, index)
        if key not in self.targets:
            self.targets[key] = top_present_class(model, x, [ann["class_ids"].tolist()],
                                                  self.args.score)[0]
        return model, x, self.targets[key]


def with_threads(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)`` with ``torch.set_num_threads(args.threads)`` (0: unchanged), restored."""
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def load_models_or_exit(worker: Any, names: Sequence[str]) -> None:
    """``worker.model(name)`` for each name, so that unusable weights end the script with a
    message (and what to pass instead) rather than a traceback on every rank."""
    try:
        for name in names:
            worker.model(name)
    except (WeightsError, OSError, ValueError) as exc:
        raise SystemExit(f"{exc}\n(run with --weights random to try the benchmark on "
                         "untrained models)")


def run_items(args: argparse.Namespace, worker: Any, store: runner.ResultsStore, rank: int,
              desc: str) -> Optional[Tuple[List[Dict[str, Any]], float]]:
    """Run every ``(model, image, method)`` item of ``args`` through ``worker``, sharded, with
    one progress bar per method (their costs differ by orders of magnitude).

    Returns, on rank 0, this run's records and the wall time; ``None`` on the other ranks.
    """
    def key(it: Item) -> str:
        return f"{it[0]}|{it[1]:06d}|{it[2]}"

    start = time.perf_counter()
    items: List[Item] = []
    for k, method in enumerate(args.methods, start=1):
        # The settings' n/a pairs (a rectifier method on the ViT, ...) are left out, not run.
        mine = [(name, index, method) for name in args.models for index in range(args.limit)
                if not_applicable(name, method) is None]
        runner.run_sharded(mine, worker, store, key=key, progress=not args.no_progress,
                           desc=f"{desc} {k}/{len(args.methods)} {method}")
        items += mine
    wall = time.perf_counter() - start
    if rank != 0:
        return None
    wanted = {key(it) for it in items}
    records: List[Dict[str, Any]] = [r for r in store.records() if r["key"] in wanted]
    return records, wall


def not_applicable_pairs(models: Sequence[str], methods: Sequence[str]
                         ) -> List[Tuple[str, str, str]]:
    """``(model, method, why)`` for the pairs the settings say do not apply
    (:func:`~torchray_like.benchmark.settings.not_applicable`); the scripts report them as
    n/a instead of running them."""
    return [(name, method, why) for name in models for method in methods
            if (why := not_applicable(name, method)) is not None]


def run_benchmark(args: argparse.Namespace, experiment: str,
                  config: Callable[[argparse.Namespace], Dict[str, Any]],
                  make_worker: Callable[[argparse.Namespace, torch.device], Any],
                  announce: Callable[..., None],
                  write_outputs: Callable[..., Any], desc: str) -> int:
    """The body of an embedded-benchmark script, under ``torchrun`` or not.

    Opens the results store for ``config(args)`` (``--from-store``: only rewrites the outputs
    from it), makes the worker, loads its models, lets rank 0 ``announce(args, config, worker,
    world_size, device)`` the settings, runs the items sharded, and on rank 0 calls
    ``write_outputs(args, config, records, wall_seconds)``.
    """
    with runner.distributed(args.device) as (rank, world_size):
        device = runner.local_device(args.device)
        settings = config(args)
        store = runner.open_store(args, experiment, settings)
        if args.from_store:
            if rank == 0:
                write_outputs(args, store.config or settings, store.records(), None)
            return 0
        worker = make_worker(args, device)
        load_models_or_exit(worker, args.models)
        if rank == 0:
            announce(args, settings, worker, world_size, device)
            for name, method, why in not_applicable_pairs(args.models, args.methods):
                print(f"  {name} {method}: n/a ({why})")
        done = run_items(args, worker, store, rank, desc)
        if done is not None:
            records, wall = done
            write_outputs(args, settings, records, wall)
            print(f"wall time {wall:.0f} s")
    return 0


def refused_methods(model: torch.nn.Module, x: torch.Tensor,
                    methods: Sequence[str]) -> Dict[str, str]:
    """Method -> why ``model`` refuses it, for the methods of ``methods`` that explain
    transformers only (:data:`~torchray_like.attribution.registry.TRANSFORMER_ONLY_METHODS`):
    each is tried on ``x`` (one image is enough) and a :class:`ValueError` — what such a method
    raises for a model without attention — is the reason (its first sentence).  The other
    methods take any model and are not tried."""
    from ..attribution.registry import METHODS, TRANSFORMER_ONLY_METHODS

    refused = {}
    for method in methods:
        if method not in TRANSFORMER_ONLY_METHODS:
            continue
        try:
            METHODS[method](model, x[:1], 0)
        except ValueError as error:
            refused[method] = str(error).split(". ")[0]
    return refused
