"""Peak memory of ``benchmarks/speed.py --memory`` (a private helper module: nothing to run).

What is measured: the peak of the bytes allocated *during* a call above what was allocated when
it started — tensors, autograd's saved tensors and the kernels' own workspaces alike.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching
  allocator's own statistics).
* CPU: PyTorch's CPU allocator reports every allocation and free to the profiler when
  ``torch.profiler.profile(profile_memory=True)`` records; the peak is the maximum of their
  running sum over the call.  (``tracemalloc`` does not see them: PyTorch allocates tensor
  storage outside Python's allocator — a 4 MB tensor shows as 80 bytes there.)

The first profiled call of a process takes a few seconds to start the profiler; the profiler
prints a few ``USDT``/``ERROR`` lines of its own on stderr (no GPU found), which are harmless.
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Tuple

import _references as refs
import torch
from torch.profiler import ProfilerActivity, profile

from torchray_like.attribution import METHODS

MB = 1 << 20


def peak_bytes(fn: Callable[[], object], device: Optional[torch.device] = None) -> int:
    """Peak bytes allocated during ``fn()`` above those allocated when it started (what it
    returns is dropped inside the measurement)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def case_peaks(run: Callable[[], object], floor: Callable[[], object],
               others: Dict[str, Callable[[], object]],
               device: Optional[torch.device] = None) -> Dict[str, object]:
    """Peaks of a row's method, floor and other columns (each run once to warm up, so one-off
    caches do not count), in MB, and the method's ratio to the floor."""
    res: Dict[str, object] = {}
    for name, fn in {"method": run, "floor": floor, **others}.items():
        fn()
        res[f"{name}_mb"] = peak_bytes(fn, device) / MB
    floor_mb = float(res["floor_mb"])  # type: ignore[arg-type]
    res["ratio"] = float(res["method_mb"]) / floor_mb if floor_mb > 0 else float("nan")  # type: ignore[arg-type]
    return res


def smaller_layer(model: torch.nn.Module, x: torch.Tensor, layer: str) -> Optional[str]:
    """The last named module called before ``layer`` whose output has the input's rank and at
    most half ``layer``'s channels (Score-CAM's second size: fewer masks), or ``None``."""
    seen: List[Tuple[str, int]] = []
    handles = [m.register_forward_hook(
        lambda mod, i, o, name=name: seen.append((name, o.shape[1]))
        if isinstance(o, torch.Tensor) and o.dim() == x.dim() else None)
        for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    names = [n for n, _ in seen]
    if layer not in names:
        return None
    channels = dict(seen)[layer]
    fewer = [n for n, c in reversed(seen[:names.index(layer)]) if c <= channels // 2]
    same_depth = [n for n in fewer if n.count(".") == layer.count(".")]  # a sibling block
    return (same_depth or fewer or [None])[0]


#: The methods whose memory must not grow with their count, at two counts and one batch.
STEPS, SAMPLES, MASKS, BATCH = (50, 200), (16, 64), (256, 1024), 16


def bounded_cases(model: torch.nn.Module, x: torch.Tensor, target: List[int], layer: str,
                  references: bool = True
                  ) -> List[Tuple[str, str, Dict[str, Callable[[], object]]]]:
    """``(row, size, {column: call})``: integrated gradients (``n_steps`` 50 and 200),
    SmoothGrad (16 and 64 copies), RISE (256 and 1024 masks) at ``BATCH`` rows per forward
    pass, Score-CAM at a layer with half the channels and at ``layer`` (its masks are the
    channels) with batch 32; Captum's IG and pytorch-grad-cam's ScoreCAM beside them with
    ``references``."""
    n = len(target)
    rows: List[Tuple[str, str, Dict[str, Callable[[], object]]]] = []
    for steps in STEPS:
        calls: Dict[str, Callable[[], object]] = {
            "ours": lambda k=steps: METHODS["integrated_gradients"](
                model, x, target, n_steps=k, internal_batch_size=BATCH)}
        ref = refs.captum_integrated_gradients(model, x, target, steps, BATCH)
        if references and not isinstance(ref, str):
            calls["captum"] = ref
        rows.append((f"integrated_gradients(batch {BATCH})", f"{steps} steps", calls))
    for k in SAMPLES:
        rows.append((f"smooth_grad(batch {BATCH})", f"{k} copies",
                     {"ours": lambda k=k: METHODS["smooth_grad"](
                         model, x, target, n_samples=k, batch_size=BATCH, generator=0)}))
    for k in MASKS:
        rows.append((f"rise(batch {BATCH})", f"{k} masks",
                     {"ours": lambda k=k: METHODS["rise"](model, x[:1], target[0], num_masks=k,
                                                         batch_size=BATCH, generator=0,
                                                         progress=False)}))
    second = smaller_layer(model, x, layer)
    for name in ([second] if second else []) + [layer]:
        module = model.get_submodule(name)
        calls = {"ours": lambda name=name: METHODS["score_cam"](
            model, x, target, saliency_layer=name, batch_size=32, resize=True)}
        ref = refs.grad_cam_method("score_cam", model, x, target, module, 32)
        if references and not isinstance(ref, str):
            calls["grad-cam"] = ref
        channels = _channels(model, x, module)
        rows.append(("score_cam(batch 32)", f"{name}: {channels * n} masks", calls))
    return rows


def _channels(model: torch.nn.Module, x: torch.Tensor, module: torch.nn.Module) -> int:
    box: List[int] = []
    handle = module.register_forward_hook(lambda m, i, o: box.append(o.shape[1]))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    return box[0]
