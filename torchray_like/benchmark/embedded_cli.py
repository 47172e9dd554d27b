"""Command-line plumbing shared by the embedded-benchmark scripts (deletion/insertion, sanity
checks): which weights to load, how many threads, and one sharded pass over the items.

The scripts under ``benchmarks/`` keep their own arguments, records and outputs; what they share
— ``--weights DIR`` / ``--random-weights`` / ``--threads``, loading the models with their
SHA-256, and running ``(model, image, method)`` items through
:func:`~torchray_like.benchmark.runner.run_sharded` — lives here once.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import runner
from .deletion_insertion import top_present_class
from .embedded_data import EmbeddedShapes
from .embedded_models import EMBEDDED_WEIGHTS, WeightsError, load_embedded_model

__all__ = ["add_model_arguments", "load_model", "weights_label", "with_threads", "EmbeddedWorker", "load_models_or_exit",
           "run_items", "run_benchmark"]

Item = Tuple[str, int, str]   # (model name, image index, method)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--random-weights``, ``--weights DIR`` and ``--threads`` (default 1)."""
    parser.add_argument("--random-weights", action="store_true",
                        help="use untrained models, initialised from --seed (when the shipped "
                             "weights are missing)")
    parser.add_argument("--weights", default=None, metavar="DIR",
                        help="load the models from this folder (files named as the shipped "
                             "ones, e.g. written by train_embedded.py --out) instead of the "
                             "shipped weights")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 0 keeps PyTorch's default (default: "
                             "%(default)s: the many small operations gain little from more, and "
                             "suffer when cores are shared; use torchrun to use more cores)")


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_model(name: str, args: argparse.Namespace) -> torch.nn.Module:
    """The embedded model ``name``: shipped, untrained (``--random-weights``) or from
    ``--weights DIR`` (its SHA-256 goes into the settings instead of being checked)."""
    if args.random_weights:
        with torch.random.fork_rng(devices=[]):      # the same untrained model in every process
            torch.manual_seed(args.seed)
            return load_embedded_model(name, pretrained=False)
    if args.weights is None:
        return load_embedded_model(name)
    path = os.path.join(args.weights, EMBEDDED_WEIGHTS[name][0])
    return load_embedded_model(name, path=path, sha256=_digest(path))


def weights_label(args: argparse.Namespace) -> Any:
    """What the settings record about the weights: "random", "shipped" or the digests."""
    if args.random_weights:
        return "random"
    if args.weights is None:
        return "shipped"
    out = {}
    for name in args.models:
        path = os.path.join(args.weights, EMBEDDED_WEIGHTS[name][0])
        try:
            out[name] = _digest(path)
        except OSError:
            out[name] = f"missing: {path}"
    return out


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
            model = load_model(name, self.args)
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
    """``worker.model(name)`` for each name, so that missing weights end the script with a
    message (and what to pass instead) rather than a traceback on every rank."""
    try:
        for name in names:
            worker.model(name)
    except (WeightsError, OSError) as exc:
        raise SystemExit(f"{exc}\n(run with --random-weights to try the benchmark on "
                         "untrained models)")


def run_items(args: argparse.Namespace, worker: Any, store: runner.ResultsStore, rank: int,
              desc: str) -> Optional[Tuple[List[Dict[str, Any]], float]]:
    """Run every ``(model, image, method)`` item of ``args`` through ``worker``, sharded.

    Returns, on rank 0, this run's records and the wall time; ``None`` on the other ranks.
    """
    items: List[Item] = [(name, index, method) for name in args.models
                         for index in range(args.limit) for method in args.methods]

    def key(it: Item) -> str:
        return f"{it[0]}|{it[1]:06d}|{it[2]}"

    start = time.perf_counter()
    runner.run_sharded(items, worker, store, key=key, progress=not args.no_progress, desc=desc)
    wall = time.perf_counter() - start
    if rank != 0:
        return None
    wanted = {key(it) for it in items}
    records: List[Dict[str, Any]] = [r for r in store.records() if r["key"] in wanted]
    return records, wall


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
        done = run_items(args, worker, store, rank, desc)
        if done is not None:
            records, wall = done
            write_outputs(args, settings, records, wall)
            print(f"wall time {wall:.0f} s")
    return 0
