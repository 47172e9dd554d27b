r"""Model checks: what a module must be to be explained, and what hooks and rules cannot see.

:func:`check_model` refuses inference, meta and uninitialised (lazy) parameters with what to do;
:func:`opaque_modules` finds TorchScript modules (``torch.jit.script`` / ``torch.jit.trace``) and
modules compiled with ``torch.compile``, inside which rule contexts and probes see nothing;
:func:`unwrap_compiled` gives the eager module behind ``torch.compile(model)``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parameter import UninitializedTensorMixin, is_lazy  # type: ignore[attr-defined]

__all__ = ["check_model", "iter_modules", "iter_tensors", "is_compiled_wrapper",
           "unwrap_compiled", "opaque_kind", "opaque_modules", "batch_statistics_layers",
           "ModelScan", "scan_model", "call_scan", "current_scan", "strip_compiled_prefix",
           "is_observer"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def iter_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` once (``model`` first), like ``model.modules()`` but without
    building the dotted names: the per-call checks walk the tree several times, and on small
    models the names cost more than the checks."""
    seen = {id(model)}
    stack = [model]
    while stack:
        module = stack.pop()
        yield module
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)


def iter_tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """``("parameter" | "buffer", tensor)`` for every parameter and buffer, shared ones once."""
    seen = set()
    for module in iter_modules(model):
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for t in tensors.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield kind, t


class ModelScan:
    """What the per-call checks need to know about a model, from **one** walk of its tree.

    Attributes
    ----------
    model : torch.nn.Module
        The model walked.
    modules : list of torch.nn.Module
        Every module once, in ``model.modules()`` order (registration order, depth first).
    unset : bool
        Some parameter or buffer is uninitialised (``torch.nn.Lazy*``) or on the meta device.
    inference : bool
        Some parameter or buffer is an inference tensor.
    opaque : bool
        Some module is TorchScript or compiled (:func:`opaque_kind`).
    batch_statistics : bool
        Some batch norm normalises with the batch's statistics in eval mode.
    data_parallel : bool
        Some ``nn.DataParallel`` spans several devices.
    quantized : bool
        Some module is a quantized (integer) module of ``torch.ao.quantization.convert`` or
        ``quantize_dynamic``, which autograd cannot differentiate through.
    observers : list of torch.nn.Module
        The quantization observers and fake-quantize modules (which record statistics in
        every forward pass, eval mode included), in :attr:`modules` order.
    unhashable : type or None
        The class of a module that cannot be hashed (``__eq__`` defined without
        ``__hash__``), which PyTorch's own walks of the tree (``model.modules()``,
        ``model.eval()``) cannot handle.
    """

    __slots__ = ("model", "modules", "unset", "inference", "opaque", "batch_statistics",
                 "data_parallel", "unhashable", "quantized", "observers")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = modules = _preorder(model)
        unset = inference = False
        found = 0  # _MAYBE_OPAQUE | _BATCH_NORM | _DATA_PARALLEL bits that hold
        self.unhashable: Optional[type] = None
        self.observers: List[nn.Module] = []
        for m in modules:
            for table in (m._parameters, m._buffers):
                for t in table.values():
                    if t is None:
                        continue
                    lazy = TENSOR_CLASSES.get(type(t))
                    if lazy is None:
                        lazy = _unset_class(type(t))
                    if lazy:
                        unset = True  # (an uninitialised tensor refuses every other question)
                        continue
                    unset = unset or t.is_meta
                    inference = inference or t.is_inference()
            kind = MODULE_CLASSES.get(type(m))
            if kind is None:
                kind = _module_kind(type(m))
            if "_compiled_call_impl" in m.__dict__:
                kind |= _MAYBE_OPAQUE  # compiled in place: this instance, not its class
            if kind & _UNHASHABLE:
                self.unhashable = type(m)
            if kind & _OBSERVER:
                self.observers.append(m)
            if kind:
                found |= _special_flags(m, kind)
        self.unset, self.inference = unset, inference
        self.opaque = bool(found & _MAYBE_OPAQUE)
        self.batch_statistics = bool(found & _BATCH_NORM)
        self.data_parallel = bool(found & _DATA_PARALLEL)
        self.quantized = bool(found & _QUANTIZED)


# What a module's class tells the scan (flags), found once per class: the per-call scan then
# costs a dict lookup per module instead of four isinstance tests (on a small model the walk
# is most of a short call's fixed cost).
_MAYBE_OPAQUE, _BATCH_NORM, _DATA_PARALLEL, _UNHASHABLE, _QUANTIZED, _OBSERVER = (
    1, 2, 4, 8, 16, 32)
#: Where ``torch.ao.quantization``'s observer and fake-quantize base classes live (read only
#: when loaded: a class deriving from one was defined after importing it).
_OBSERVER_BASES = (("torch.ao.quantization.observer", "ObserverBase"),
                   ("torch.ao.quantization.fake_quantize", "FakeQuantizeBase"))
#: The packages of PyTorch's quantized (integer) modules: no autograd runs through them.
_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                       "torch.ao.nn.sparse.quantized", "torch.nn.quantized",
                       "torch.nn.intrinsic.quantized")
#: The float modules of those packages: the ``torch.add`` / ``torch.cat`` wrappers that
#: quantizable float models (torchvision's ``quantize=False`` models, QAT-prepared ones) hold.
_FLOAT_FUNCTIONALS = ("FloatFunctional", "FXFloatFunctional")
#: What the scan learnt per module class (flags) and per tensor class (uninitialised or not);
#: each holds at most :data:`CLASS_CACHE_SIZE` classes (it is emptied when full), so classes
#: made on the fly (tests, notebooks) cannot grow it without bound.
MODULE_CLASSES: Dict[type, int] = {}
TENSOR_CLASSES: Dict[type, bool] = {}
CLASS_CACHE_SIZE = 4096


def _module_kind(cls: type) -> int:
    kind = ((_MAYBE_OPAQUE if issubclass(cls, torch.jit.ScriptModule)
             or cls.__name__ == "OptimizedModule" else 0)
            | (_BATCH_NORM if issubclass(cls, _BATCH_NORMS) else 0)
            | (_DATA_PARALLEL if issubclass(cls, nn.DataParallel) else 0)
            | (_UNHASHABLE if cls.__hash__ is None else 0)
            | (_QUANTIZED if cls.__module__.startswith(_QUANTIZED_PACKAGES)
               and ".reference" not in cls.__module__  # reference modules are float
               and cls.__name__ not in _FLOAT_FUNCTIONALS else 0)
            | (_OBSERVER if _is_observer_class(cls) else 0))
    return _learn(MODULE_CLASSES, cls, kind)


def _is_observer_class(cls: type) -> bool:
    bases = (getattr(sys.modules.get(module), name, None) for module, name in _OBSERVER_BASES)
    return any(base is not None and issubclass(cls, base) for base in bases)


def is_observer(module: nn.Module) -> bool:
    """Whether ``module`` is a quantization observer or fake-quantize module (its class learnt
    once into :data:`MODULE_CLASSES`, as the scan does)."""
    kind = MODULE_CLASSES.get(type(module))
    if kind is None:
        kind = _module_kind(type(module))
    return bool(kind & _OBSERVER)


def _learn(cache: Dict[type, Any], cls: type, value: Any) -> Any:
    """``cache[cls] = value`` (``cache`` emptied first when full); returns ``value``."""
    if len(cache) >= CLASS_CACHE_SIZE:
        cache.clear()
    cache[cls] = value
    return value


def _special_flags(m: nn.Module, kind: int) -> int:
    """The flags that hold for ``m``, a module of ``kind`` (its class's, or compiled)."""
    flags = 0
    if kind & _MAYBE_OPAQUE and opaque_kind(m) is not None:
        flags |= _MAYBE_OPAQUE
    if kind & _BATCH_NORM and m.running_mean is None:
        flags |= _BATCH_NORM
    if kind & _DATA_PARALLEL and len(getattr(m, "device_ids", None) or []) > 1:
        flags |= _DATA_PARALLEL
    return flags | (kind & _QUANTIZED)


def _unset_class(cls: type) -> bool:
    """Whether tensors of class ``cls`` are uninitialised (``torch.nn.Lazy*`` parameters);
    learnt into :data:`TENSOR_CLASSES` (the scan looks there first)."""
    return _learn(TENSOR_CLASSES, cls, issubclass(cls, UninitializedTensorMixin))


def _preorder(model: nn.Module) -> List[nn.Module]:
    """``list(model.modules())`` without the generator per module."""
    seen = set()
    out: List[nn.Module] = []
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:  # a module met again: named_modules' memo, at visit time
            continue
        seen.add(id(module))
        out.append(module)
        children = module._modules
        if children:
            for child in reversed(children.values()):
                if child is not None:
                    stack.append(child)
    return out


def scan_model(model: nn.Module) -> ModelScan:
    """The :class:`ModelScan` of ``model`` now (one walk of the module tree)."""
    return ModelScan(model)


class _CallScans(threading.local):
    def __init__(self) -> None:
        self.scans: Dict[int, ModelScan] = {}


_CALL_SCANS = _CallScans()


def current_scan(model: nn.Module) -> Optional[ModelScan]:
    """The scan of ``model`` made by the :func:`call_scan` block this thread is in, if any."""
    scan = _CALL_SCANS.scans.get(id(model))
    return scan if scan is not None and scan.model is model else None


class call_scan:  # noqa: N801 - a function-like context manager, named as one
    """Scan ``model`` once for the block: inside it (this thread only), :func:`check_model`,
    :func:`opaque_modules`, :func:`batch_statistics_layers`, the data-parallel check and the
    state guard read the scan instead of walking the module tree each.

    The scan lives for one call only, so a model changed between calls (modules added,
    removed or replaced, flags, tensors moved or re-created) is seen as it is at the next
    call; nothing is cached across calls.  A block for a model already scanned by an
    enclosing block reuses that scan.
    """

    __slots__ = ("model", "scan", "own")

    # A class rather than a generator context manager: entered once per method call, where
    # contextlib's generator machinery cost a third of what the scan's bookkeeping did.
    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_compiled(model)

    def __enter__(self) -> ModelScan:
        model = self.model
        scans = _CALL_SCANS.scans
        outer = scans.get(id(model))
        self.own = outer is None or outer.model is not model
        if outer is not None and not self.own:
            self.scan = outer
            return outer
        self.scan = scans[id(model)] = ModelScan(model)
        return self.scan

    def __exit__(self, *exc: Any) -> None:
        if self.own:
            scans = _CALL_SCANS.scans
            if scans.get(id(self.model)) is self.scan:
                del scans[id(self.model)]


def check_model(model: Any, needs_autograd: bool = True, method: str = "") -> nn.Module:
    """Validate that ``model`` is a module whose parameters hold values (and, with
    ``needs_autograd``, that autograd can differentiate through).

    Every parameter and buffer is looked at (a flag test each): uninitialised parameters of
    ``torch.nn.Lazy*`` modules, tensors on the ``meta`` device (no values) and — for the methods
    that differentiate — inference tensors (made under :func:`torch.inference_mode`) are a
    :class:`ValueError` naming the tensor, its message starting with ``method`` when given
    (RISE, which only runs forward passes, passes ``needs_autograd=False``).
    """
    if not isinstance(model, nn.Module):
        if callable(model):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function "
                "in an nn.Module whose forward calls it")
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    scan = current_scan(model)
    if scan is None:
        scan = ModelScan(model)
    if scan.unhashable is not None:
        name = scan.unhashable.__name__
        raise TypeError(
            f"model: module class {name} cannot be hashed (it defines __eq__ without "
            "__hash__), and PyTorch's walks of a module tree (model.modules(), model.eval()) "
            f"need hashable modules; add `__hash__ = torch.nn.Module.__hash__` to {name}")
    if not (scan.unset or (needs_autograd and (scan.inference or scan.quantized))):
        return model
    # Something is wrong: find its name (the slow walk, on the error path only).
    prefix = f"{method}: " if method else ""
    for kind, named in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, p in named:
            if is_lazy(p):
                raise ValueError(
                    f"{prefix}model {kind} {name!r} is not initialised yet (a torch.nn.Lazy* "
                    "module infers its shape on the first forward pass); run the model once "
                    "first, e.g. `with torch.no_grad(): model(x)`, so that explaining it does "
                    "not change it")
            if needs_autograd and p.is_inference():
                raise ValueError(
                    f"{prefix}model {kind} {name!r} is an inference tensor (the model was built "
                    "or loaded under torch.inference_mode()); rebuild or clone it outside "
                    "inference mode")
            if p.is_meta:
                raise ValueError(
                    f"{prefix}model {kind} {name!r} is on the meta device (it has no values); "
                    "materialise the model first, e.g. model.to_empty(device='cpu') then "
                    "load_state_dict(...)")
    if needs_autograd and scan.quantized:
        _refuse_quantized(model, prefix)
    return model


def _refuse_quantized(model: nn.Module, prefix: str) -> None:
    """The ValueError for a model with quantized (integer) modules, naming the first."""
    for name, m in model.named_modules():
        if _module_kind(type(m)) & _QUANTIZED:
            raise ValueError(
                f"{prefix}model module {name!r} ({type(m).__module__}.{type(m).__name__}) is "
                "a quantized module (torch.ao.quantization.convert or quantize_dynamic): "
                "autograd does not run through integer kernels, so no gradient-based method "
                "can explain it; explain the float model, or the model prepared for "
                "quantization-aware training before convert (its fake-quantized weights have "
                "gradients); the forward-only methods (rise, occlusion) and the deletion / "
                "insertion metric accept it as it is")


def is_compiled_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper :func:`torch.compile` returns for a module."""
    return (type(module).__name__ == "OptimizedModule"
            and isinstance(getattr(module, "_orig_mod", None), nn.Module))


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile(model)`` (``model`` itself otherwise).

    Backward rules and probes need to see the operations and the sub-modules as they run; a
    compiled graph hides both (hooks added after compilation are not guarded, a rule read at
    backward time is baked in at tracing).  The methods therefore explain the original module,
    which shares the compiled model's parameters: the answer is the same, computed eagerly.
    """
    while is_compiled_wrapper(model):
        inner = model._orig_mod
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


_COMPILED_PREFIX = "_orig_mod."


def strip_compiled_prefix(layer: Any, original: nn.Module) -> Any:
    """A layer name in ``torch.compile(model)`` → the same layer in its original module:
    ``"_orig_mod.layer4"`` → ``"layer4"``, ``"_orig_mod"`` → the original module itself."""
    while isinstance(layer, str) and layer.startswith(_COMPILED_PREFIX):
        layer = layer[len(_COMPILED_PREFIX):]
    if isinstance(layer, str) and layer == _COMPILED_PREFIX[:-1]:
        return original
    return layer


def opaque_kind(module: nn.Module) -> Optional[str]:
    """``"TorchScript"``, ``"torch.compile"`` or ``None``: whether hooks and rule contexts can
    see what ``module`` runs."""
    if isinstance(module, torch.jit.ScriptModule):
        return "TorchScript"
    if is_compiled_wrapper(module) or module.__dict__.get("_compiled_call_impl") is not None:
        return "torch.compile"
    return None


def opaque_modules(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """The outermost sub-modules of ``model`` (``model`` included, name ``""``) whose inside
    hooks and rule contexts cannot see: ``(name, module, kind)`` with ``kind`` from
    :func:`opaque_kind`.  One walk over the module tree."""
    found: List[Tuple[str, nn.Module, str]] = []
    scan = current_scan(model)
    if (not scan.opaque if scan is not None
            else all(opaque_kind(m) is None for m in iter_modules(model))):
        return found
    for name, module in model.named_modules():
        if any(name == n or name.startswith(n + ".") or n == "" for n, _, _ in found):
            continue
        kind = opaque_kind(module)
        if kind is not None:
            found.append((name, module, kind))
    return found


def batch_statistics_layers(model: nn.Module) -> List[str]:
    """Names of the layers that normalise with the statistics of the batch even in eval mode
    (batch norm with ``track_running_stats=False``), so that one sample's output depends on
    the other samples of the batch.  Empty for almost every model (one walk of the tree)."""
    scan = current_scan(model)
    if (not scan.batch_statistics if scan is not None
            else not any(isinstance(m, _BATCH_NORMS) and m.running_mean is None
                         for m in iter_modules(model))):
        return []
    return [name for name, m in model.named_modules()
            if isinstance(m, _BATCH_NORMS) and m.running_mean is None]
