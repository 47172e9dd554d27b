"""RISE's own overhead, its peak memory, and TorchRay's RISE against ours.

RISE's speed against its floor is a row of ``benchmarks/speed.py`` (``--methods rise``); this
script measures what that row cannot:

Overhead (``python benchmarks/speed_rise.py``, the default, or ``--overhead``): the comparison
split into its parts, robust on a busy machine — RISE with a model that returns constant scores
(so only the mask drawing and the accumulation of 1000-class maps are timed) against the direct
loop with that model, divided by the time of the real masked forward passes.

Memory (``--memory``): the peak memory of RISE at each value of ``--rise-masks``, each measured
in a fresh subprocess (peak RSS from ``resource.getrusage``, or
``torch.cuda.max_memory_allocated`` on CUDA), next to the peak of one plain forward batch.  It
must not grow with ``num_masks``.

TorchRay (``--vs-torchray``): TorchRay's ``rise`` (installed separately, or unpacked and given
with ``--torchray-path``; run as a black box) against ours in float32 and with
``autocast=torch.bfloat16``, at equal masks; with ``--threads 1`` on the CPU the times are the
CPU time of the calling thread (robust on a busy machine)::

    python benchmarks/speed_rise.py --vs-torchray --models resnet18 vgg11 --rise-masks 128 \
        --repeats 3 --threads 1 --torchray-path /tmp/torchray_pkg
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from typing import List

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from torchray_like.attribution.rise import generate_masks, rise  # noqa: E402
from torchray_like.benchmark import embedded_cli  # noqa: E402
from torchray_like.benchmark.runner import (  # noqa: E402
    device_arg,
    image_side_arg,
    positive_int_arg,
    threads_arg,
)

# ---------------------------------------------------------------------------------------------
# Peak memory, one subprocess per measurement
# ---------------------------------------------------------------------------------------------


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(model_name: str, size: int, num_masks: int, batch_size: int, device: str,
           target: str) -> None:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)().eval().to(device)
    x = torch.randn(1, 3, size, size, device=device)
    seen = []
    model.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape[0]))
    # Baseline: one plain forward batch of the same size (what any batched method needs).
    with torch.inference_mode():
        model(x.expand(batch_size, -1, -1, -1).contiguous())
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            model(x.expand(batch_size, -1, -1, -1).contiguous())
    base = _peak_bytes(device)
    seen.clear()
    out = rise(model, x, None if target == "all" else 0, num_masks=num_masks,
               batch_size=batch_size, generator=0, progress=False)
    peak = _peak_bytes(device)
    print(json.dumps({"num_masks": num_masks, "baseline_peak": base, "rise_peak": peak,
                      "largest_forward_batch": max(seen), "forwards": sum(seen),
                      "map_bytes": out.numel() * out.element_size()}))


def memory(models: List[str], size: int, masks: List[int], batch_size: int, device: str,
           target: str) -> None:
    for name in models:
        _memory(name, size, masks, batch_size, device, target)


def _memory(model_name: str, size: int, masks: List[int], batch_size: int, device: str,
            target: str) -> None:
    print(f"RISE peak memory, {model_name} {size}², batch_size {batch_size}, target {target}, "
          f"{device} ({'max_memory_allocated' if device == 'cuda' else 'peak RSS'})")
    print(f"{'num_masks':>10s} {'fwd-batch peak MiB':>19s} {'RISE peak MiB':>14s} "
          f"{'largest batch':>14s} {'forwards':>9s} {'maps MiB':>9s}")
    for n in masks:
        res = subprocess.run(
            [sys.executable, __file__, "--child", model_name, str(size), str(n), str(batch_size),
             device, target], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        mib = 1024 ** 2
        print(f"{n:10d} {r['baseline_peak'] / mib:19.1f} {r['rise_peak'] / mib:14.1f} "
              f"{r['largest_forward_batch']:14d} {r['forwards']:9d} {r['map_bytes'] / mib:9.1f}",
              flush=True)


class _ConstantScores(torch.nn.Module):
    """A stand-in model: 1000 constant logits, so that only RISE's own work is timed."""

    def forward(self, x):
        return x.new_zeros(x.shape[0], 1000)


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def overhead(models: List[str], size: int, num_masks: int, batch_size: int, device: str,
             repeats: int) -> None:
    import torchvision

    x = torch.randn(1, 3, size, size, device=device)
    bank = generate_masks(num_masks, (size, size), generator=0, device=device)

    def direct(model, n):
        def run():
            with torch.inference_mode():
                out = [model(x * chunk) for chunk in bank[:n].split(batch_size)]
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    def method(model, target):
        def run():
            out = rise(model, x, target, num_masks=num_masks, batch_size=batch_size,
                       generator=0, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    null = _ConstantScores()
    base = _median_time(direct(null, num_masks), repeats)
    own = {t: _median_time(method(null, t), repeats) - base for t in (0, None)}
    print(f"RISE's own work, {num_masks} masks, batch_size {batch_size}, {size}², {device}, "
          f"{torch.get_num_threads()} threads: one class {own[0] * 1e3:.1f} ms, 1000 classes "
          f"{own[None] * 1e3:.1f} ms")
    for name in models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval().to(device)
        # The masked forward passes, timed on the first batch_size masks and scaled.
        per_batch = _median_time(direct(model, batch_size), 3)
        fwd = per_batch * num_masks / min(batch_size, num_masks)
        print(f"{name:10s} {num_masks} masked forwards {fwd:8.2f} s   ratio one class "
              f"{1 + own[0] / fwd:.4f}   ratio 1000 classes {1 + own[None] / fwd:.4f}",
              flush=True)


def vs_torchray(models: List[str], size: int, num_masks: int, batch_size: int, device: str,
                repeats: int) -> None:
    """TorchRay's ``rise`` (installed separately; used as a black box) against ours in float32
    and with ``autocast=torch.bfloat16``, at equal masks, timed in turn (interleaved)."""
    import torchvision
    try:
        from torchray.attribution.rise import rise as torchray_rise
    except ImportError:
        torchray_rise = None
        print("TorchRay is not installed (pip install torchray --no-deps): its column is empty")
    x = torch.randn(1, 3, size, size, device=device)
    print(f"RISE, {num_masks} masks, batch_size {batch_size}, 1 image {size}², all classes, "
          f"{device}, {torch.get_num_threads()} threads; median of {repeats} interleaved turns")
    print(f"{'model':10s} {'TorchRay':>9s} {'ours fp32':>9s} {'ours bf16':>9s} "
          f"{'TR/fp32':>8s} {'TR/bf16':>8s}  corr(bf16, fp32)")
    for name in models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval().to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        runs = {
            "ours fp32": lambda: rise(model, x, num_masks=num_masks, batch_size=batch_size,
                                      generator=0, progress=False, normalize="torchray"),
            "ours bf16": lambda: rise(model, x, num_masks=num_masks, batch_size=batch_size,
                                      generator=0, progress=False, normalize="torchray",
                                      autocast=torch.bfloat16)}
        if torchray_rise is not None:
            runs["TorchRay"] = lambda: torchray_rise(model, x, num_masks=num_masks,
                                                     batch_size=batch_size)
        # One CPU thread: the CPU time of this thread (other work on a busy machine does not
        # enter the ratios); otherwise wall-clock time.
        clock = (time.thread_time if device == "cpu" and torch.get_num_threads() == 1
                 else time.perf_counter)
        times: dict = {k: [] for k in runs}
        outs = {k: fn() for k, fn in runs.items()}          # warm-up, and the maps
        for turn in range(repeats):
            keys = list(runs)
            keys = keys[turn % len(keys):] + keys[:turn % len(keys)]
            for k in keys:
                t0 = clock()
                runs[k]()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[k].append(clock() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        a, b = outs["ours fp32"].flatten(1).double(), outs["ours bf16"].flatten(1).double()
        corr = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True),
                                                     b - b.mean(1, keepdim=True)).min()
        tr = med.get("TorchRay", float("nan"))
        print(f"{name:10s} {tr:9.2f} {med['ours fp32']:9.2f} {med['ours bf16']:9.2f} "
              f"{tr / med['ours fp32']:8.2f} {tr / med['ours bf16']:8.2f}  {float(corr):.5f}",
              flush=True)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, size, n, bs, device, target = sys.argv[2:8]
        _child(name, int(size), int(n), int(bs), device, target)
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without --memory or --vs-torchray: --overhead. RISE against its floor: "
               "python benchmarks/speed.py --methods rise.")
    parser.add_argument("--overhead", action="store_true",
                        help="time RISE's own work with a constant model (the default)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory")
    parser.add_argument("--vs-torchray", action="store_true",
                        help="TorchRay's RISE vs ours in float32 and bfloat16")
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"], metavar="MODEL",
                        help="torchvision models (default: resnet50 vgg16)")
    parser.add_argument("--repeats", type=positive_int_arg, default=5,
                        help="timed calls per measurement (default: %(default)s)")
    parser.add_argument("--threads", type=threads_arg, default=None,
                        help="CPU threads (default: PyTorch's)")
    parser.add_argument("--input-size", type=image_side_arg, default=224, metavar="PX",
                        help="input side (default: %(default)s)")
    parser.add_argument("--rise-masks", type=positive_int_arg, nargs="+", default=[32, 256],
                        metavar="N",
                        help="num_masks values: --memory measures each, --overhead and "
                             "--vs-torchray use the last (default: 32 256)")
    parser.add_argument("--rise-batch", type=positive_int_arg, default=32, metavar="N",
                        help="RISE masked images per forward pass (default: %(default)s)")
    parser.add_argument("--target", choices=["one", "all"], default="all",
                        help="--memory: one class or every class (default: %(default)s)")
    parser.add_argument("--device", type=device_arg,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--torchray-path", default=None, metavar="DIR",
                        help="folder holding an unpacked torchray package, put first on "
                             "sys.path (default: the installed torchray, if any)")
    args = parser.parse_args(argv)
    if args.torchray_path:
        sys.path.insert(0, args.torchray_path)
    try:
        models = embedded_cli.model_names(args.models, embedded=False)
    except ValueError as error:
        parser.error(str(error))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.overhead or not (args.memory or args.vs_torchray):
            overhead(models, args.input_size, args.rise_masks[-1], args.rise_batch,
                     args.device, args.repeats)
        if args.vs_torchray:
            vs_torchray(models, args.input_size, args.rise_masks[-1], args.rise_batch,
                        args.device, args.repeats)
        if args.memory:
            memory(models, args.input_size, args.rise_masks, args.rise_batch, args.device,
                   args.target)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
