"""Timing harness of ``benchmarks/speed.py`` (a private helper module: nothing to run).

A *case* is a method call together with its *floor* — the plain forward pass plus
``torch.autograd.grad`` down to the tensor the method reads — and optional *others* to compare
with (Captum's equivalent, the same maps from separate calls ...).  All of them are timed
interleaved in the same run (A B C, B C A, C A B ...: the start rotates), so drift of a shared
machine hits each alike, and the median of each is reported.

A row is flagged ``SLOW`` only when a repeat confirms it: a ratio above ``target × (1 + NOISE)``
is measured again, and only a second ratio above that bound flags the row.  The clock is a
parameter: the wall clock (``time.perf_counter``, default) or the process's CPU time
(``time.process_time``), steadier on a machine shared with other jobs.

:func:`blas_threads` caps the thread pools of the BLAS libraries loaded besides PyTorch's
(NumPy's OpenBLAS, which pytorch-grad-cam's SVD and products use) for a run: their threads spin
for milliseconds after each call, and on a 2-core machine that spinning was charged to whatever
was timed next (the process's CPU time counts every thread, and the wall clock lost a core).
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from torchray_like.attribution.common import get_backward_gradient, get_module

#: Relative timing noise tolerated before a row is re-measured (and, if confirmed, flagged).
NOISE = 0.03


@dataclass
class Case:
    """One line of the speed table.

    ``others`` maps a column name (``"captum"``, ``"grad-cam"``, ``"zennit"``,
    ``"separate"``) to a callable doing the equivalent work another way; it is timed
    interleaved with ``run`` and ``floor``.  ``method`` is the method the row times
    (``speed.py --methods`` selects by it).  The row's *reference* is ``ref`` if given, else
    the first library of :data:`REFERENCES` in ``others``; with ``ref_target`` the time over
    the reference's is a target too (checked and repeated as the floor's ratio).
    """

    method: str
    name: str
    run: Callable[[], object]
    floor: Callable[[], object]
    floor_name: str
    target_ratio: float = 1.05
    note: str = ""
    others: Dict[str, Callable[[], object]] = field(default_factory=dict)
    ref_target: Optional[float] = None
    ref: str = ""
    heavy: bool = False     # hundreds of forward passes per call: fewer repeats, fewer models

    def reference(self) -> Optional[str]:
        """The library this row is compared with (``None``: none available)."""
        if self.ref and self.ref in self.others:
            return self.ref
        return next((lib for lib in REFERENCES if lib in self.others), None)


#: The other libraries a row can be compared with, in order of preference.
REFERENCES = ("captum", "grad-cam", "zennit")


# ---------------------------------------------------------------------------------------------
# Model state: freeze once, so floors do no per-call state handling

_FROZEN: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def module_hooks(model: nn.Module) -> Dict[str, int]:
    """Module name -> number of forward, pre-forward and backward hooks on it (those present)."""
    found = {}
    for name, module in model.named_modules():
        n = sum(len(getattr(module, attr)) for attr in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
        if n:
            found[name or "(model)"] = n
    return found


def check_no_hooks_left(model: nn.Module, before: Dict[str, int], what: str) -> None:
    """Refuse to time anything while ``what`` has left hooks on ``model``: every row and floor
    would silently pay for them (a reference library object that hooks its layer from its
    construction until released did so once)."""
    after = module_hooks(model)
    if after != before:
        raise RuntimeError(
            f"{what} left hooks on the model ({after}, before: {before}); every timing after "
            "it would include them — build such objects inside the timed call and release them")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad`` off for good, as the methods run the model.

    Floors of a model frozen here skip :func:`frozen`'s guard, so they cost only the forward and
    backward passes; the methods still run their own state guard (part of what they cost).
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _FROZEN.add(model)
    return model


def frozen(model: nn.Module):
    """Eval mode and frozen parameters for a block (nothing to do after :func:`freeze`)."""
    if model in _FROZEN:
        return contextlib.nullcontext(model)
    from torchray_like.attribution.common import model_state_guard
    return model_state_guard(model)


# ---------------------------------------------------------------------------------------------
# Floors


def floor_input(model: nn.Module, x: torch.Tensor, target,
                around: Callable[[], ContextManager] = contextlib.nullcontext
                ) -> Callable[[], object]:
    """Plain forward + autograd.grad down to the input; the forward pass runs inside
    ``around()`` (nothing by default)."""
    def run():
        with frozen(model):
            xx = x.detach().requires_grad_(True)
            with around():
                y = model(xx)
            return torch.autograd.grad(y, xx, get_backward_gradient(y, target))[0]
    return run


class PassThroughMode(TorchFunctionMode):
    """A :class:`~torch.overrides.TorchFunctionMode` that changes nothing: every torch call of
    the forward pass goes through Python once and runs as it would.  Timing the floor inside it
    gives what *seeing* every call costs — the price of a rule context, before any rule."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def floor_input_seen(model: nn.Module, x: torch.Tensor, target) -> Callable[[], object]:
    """:func:`floor_input` with the forward pass inside a :class:`PassThroughMode`: the least
    any method that intercepts the model's operations (a rule context) costs."""
    return floor_input(model, x, target, PassThroughMode)


def floor_input_hooked(model: nn.Module, x: torch.Tensor, target) -> Callable[[], object]:
    """:func:`floor_input` with what module hooks cost (the way Captum's guided backprop and
    DeConvNet change ReLUs): a forward hook on each ``nn.ReLU`` registering a gradient hook on
    its output that passes the gradient unchanged, removed after the pass."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]

    def keep(grad: torch.Tensor) -> torch.Tensor:
        return grad

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(keep)

    @contextlib.contextmanager
    def hooked() -> Iterator[None]:
        handles = [m.register_forward_hook(hook) for m in relus]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    return floor_input(model, x, target, hooked)


def floor_layer(model: nn.Module, x: torch.Tensor, target, layer) -> Callable[[], object]:
    """Plain forward + autograd.grad down to the output of ``layer`` (and no further)."""
    module = get_module(model, layer)

    def run():
        box: List[torch.Tensor] = []

        def hook(m, i, o):
            leaf = o.detach().requires_grad_(True)
            box.append(leaf)
            return leaf

        handle = module.register_forward_hook(hook)
        try:
            with frozen(model):
                y = model(x)
                return torch.autograd.grad(y, box[0], get_backward_gradient(y, target))[0]
        finally:
            handle.remove()
    return run


def floor_layer_and_input(model: nn.Module, x: torch.Tensor, target,
                          layer) -> Callable[[], object]:
    """Plain forward, then autograd.grad to the layer's output (graph kept) and to the input:
    the least guided Grad-CAM can do (its weights need the plain gradient at the layer, its
    guided part a full backward)."""
    module = get_module(model, layer)

    def run():
        box: List[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, i, o: box.append(o))
        try:
            with frozen(model):
                xx = x.detach().requires_grad_(True)
                y = model(xx)
                seed = get_backward_gradient(y, target)
                g_layer = torch.autograd.grad(y, box[0], seed, retain_graph=True)[0]
                return g_layer, torch.autograd.grad(y, xx, seed)[0]
        finally:
            handle.remove()
    return run


def floor_iterations(model: nn.Module, batch: torch.Tensor, target,
                     iters: int) -> Callable[[], object]:
    """``iters`` × (forward of ``batch`` + autograd.grad down to it): what extremal
    perturbation cannot avoid."""
    def run():
        with frozen(model):
            for _ in range(iters):
                xx = batch.detach().requires_grad_(True)
                y = model(xx)
                torch.autograd.grad(y, xx, get_backward_gradient(y, target))
    return run


def floor_passes(model: nn.Module, x: torch.Tensor, target,
                 passes: Sequence[Sequence[Optional[str]]]) -> Callable[[], object]:
    """One plain forward, then one ``autograd.grad`` per entry of ``passes``.

    Each entry lists the tensors that pass reaches: ``None`` for the input, a layer name for
    that layer's output.  ``[[None], ["layer4"]]`` is two backward passes, one to the input and
    one to layer4; ``[[None, "layer4"]]`` is one pass reaching both.
    """
    layers = sorted({r for p in passes for r in p if r is not None})
    modules = {name: get_module(model, name) for name in layers}
    needs_input = any(r is None for p in passes for r in p)

    def run():
        box: Dict[str, torch.Tensor] = {}

        def recorder(name: str) -> Callable:
            def hook(mod, i, o):
                if o.requires_grad:  # on the graph already (from the input or a layer below)
                    box[name] = o
                    return None
                box[name] = o.detach().requires_grad_(True)  # a leaf: the backward stops here
                return box[name]
            return hook

        handles = [m.register_forward_hook(recorder(name)) for name, m in modules.items()]
        try:
            with frozen(model):
                xx = x.detach().requires_grad_(needs_input)
                y = model(xx)
                seed = get_backward_gradient(y, target)
                out = []
                for i, reads in enumerate(passes):
                    out.append(torch.autograd.grad(
                        y, [xx if r is None else box[r] for r in reads], seed,
                        retain_graph=i < len(passes) - 1))
                return out
        finally:
            for h in handles:
                h.remove()
    return run


def floor_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One plain forward pass without autograd."""
    def run():
        with frozen(model), torch.no_grad():
            return model(x)
    return run


# ---------------------------------------------------------------------------------------------
# Timing


def blas_threads(threads: int) -> ContextManager[object]:
    """A block in which every BLAS / OpenMP pool that ``threadpoolctl`` finds (NumPy's OpenBLAS,
    loaded by the reference libraries) uses at most ``threads`` threads; restored on exit.

    PyTorch's own pools are set with :func:`torch.set_num_threads` by the scripts.  Without
    ``threadpoolctl`` (it comes with scikit-learn, which pytorch-grad-cam and Quantus need) the
    block does nothing: the references that would start such pools are then not installed
    either.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def _synchronizer(device: Optional[torch.device]) -> Callable[[], None]:
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     device: Optional[torch.device] = None,
                     clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median seconds per call of each function, timed interleaved with a rotating start."""
    sync = _synchronizer(device)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = clock()
            fns[name]()
            sync()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _over(case: Case, t: Dict[str, float]) -> bool:
    """Whether a measurement is over a bound: the floor's ratio or the reference's."""
    if t["method"] / t["floor"] > case.target_ratio * (1 + NOISE):
        return True
    ref = case.reference()
    return (case.ref_target is not None and ref is not None
            and t["method"] / t[ref] > case.ref_target * (1 + NOISE))


def measure(case: Case, repeats: int, warmup: int = 1, device: Optional[torch.device] = None,
            clock: Callable[[], float] = time.perf_counter) -> Dict[str, object]:
    """Time a case (method, floor and others interleaved); re-measure a ratio over the bound.

    Returns ``method_s``, ``floor_s``, ``ratio``, ``status`` (``ok``, ``ok, repeat`` — over a
    bound once, not on the repeat — or ``SLOW``), ``first_ratio`` when repeated, and
    ``<other>_s`` / ``vs_<other>`` (method time / other time) for each of ``case.others``;
    ``ref`` (the reference library) and ``vs_ref`` when the row has one.  The bounds are
    ``target_ratio`` over the floor and ``ref_target`` over the reference, each plus
    :data:`NOISE`.
    """
    fns = {"method": case.run, "floor": case.floor, **case.others}
    t = time_interleaved(fns, repeats, warmup, device, clock)
    res: Dict[str, object] = {"status": "ok"}
    if _over(case, t):
        first = t["method"] / t["floor"]
        t = time_interleaved(fns, repeats, 0, device, clock)
        res = {"status": "SLOW" if _over(case, t) else "ok, repeat", "first_ratio": first}
    res.update({"method_s": t["method"], "floor_s": t["floor"],
                "ratio": t["method"] / t["floor"]})
    for name in case.others:
        res[f"{name}_s"] = t[name]
        res[f"vs_{name}"] = t["method"] / t[name]
    ref = case.reference()
    if ref is not None:
        res["ref"], res["vs_ref"] = ref, t["method"] / t[ref]
    return res


# ---------------------------------------------------------------------------------------------
# Table

HEADER = (f"{'model':9s} {'method':46s} {'ms':>9s} {'floor ms':>9s} {'ratio':>6s} "
          f"{'target':>6s} {'status':10s} {'ref ms':>9s} {'vs ref':>6s} {'ref':8s}  floor")


def format_row(model: str, case: Case, res: Dict[str, object]) -> str:
    """One line of the table: times, the floor's ratio and target, the reference's time and
    ratio (``vs ref``, with its target when the row has one), then notes."""
    ref = res.get("ref")
    if ref is not None:
        refcol = (f"{res[f'{ref}_s'] * 1e3:9.1f} {res['vs_ref']:6.2f} {ref:8s}")
    else:
        refcol = f"{'-':>9s} {'-':>6s} {'-':8s}"
    notes = []
    if "first_ratio" in res:
        notes.append(f"first ratio {res['first_ratio']:.3f}")
    if case.ref_target is not None and ref is not None:
        notes.append(f"target vs {ref} {case.ref_target:.2f}")
    for key in res:
        if key.endswith("_s") and key not in ("method_s", "floor_s", f"{ref}_s"):
            other = key[:-2]
            notes.append(f"{other} {res[key] * 1e3:.1f} ms = {1 / res['vs_' + other]:.2f}× ours")
    if case.note:
        notes.append(case.note)
    return (f"{model:9s} {case.name:46s} {res['method_s'] * 1e3:9.1f} "
            f"{res['floor_s'] * 1e3:9.1f} {res['ratio']:6.3f} {case.target_ratio:6.2f} "
            f"{res['status']:10s} {refcol}  {case.floor_name}"
            + (f"  [{'; '.join(notes)}]" if notes else ""))
