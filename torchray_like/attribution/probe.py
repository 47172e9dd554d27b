r"""Reading a layer: find a sub-module by name and record its activation and gradient."""

from __future__ import annotations

import difflib
import threading
import weakref
from typing import Any, Dict, List, Union

import torch
import torch.nn as nn

__all__ = ["get_module", "Probe", "attach_debug_probes"]


def get_module(model: nn.Module, module: Union[str, nn.Module, None]) -> nn.Module:
    """Return the sub-module of ``model`` called ``module`` (a dotted name such as
    ``"features.11"`` or ``"layer4.1.conv2"``), or ``module`` itself when it is a module of
    ``model``.  ``""`` names ``model`` itself.

    Raises
    ------
    ValueError
        When no sub-module has that name (the closest existing names are listed) or the module
        given is not part of ``model``.
    TypeError
        When ``module`` is neither a string nor a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_module: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(module, nn.Module):
        if any(m is module for m in model.modules()):
            return module
        raise ValueError(
            f"get_module: the module {type(module).__name__} given is not a sub-module of the "
            f"model {type(model).__name__}")
    if not isinstance(module, str):
        raise TypeError(
            f"get_module: module must be a dotted name or an nn.Module, got {module!r}")
    names = dict(model.named_modules())
    if module in names:
        return names[module]
    close = difflib.get_close_matches(module, [n for n in names if n], n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if n and (module in n or n.startswith(module.split(".")[0]))][:5]
    hint = f"; closest names: {', '.join(repr(c) for c in close)}" if close else (
        f"; top-level names: {', '.join(repr(n) for n in names if n and '.' not in n)}")
    raise ValueError(f"get_module: the model has no module named {module!r}{hint}")


class _ProbeHook:
    """The hook a :class:`Probe` installs.  It holds the probe weakly: no cycle through the
    module's hook table keeps the probe (and the tensors it recorded) alive."""

    __slots__ = ("probe",)

    def __init__(self, probe: "Probe") -> None:
        self.probe = weakref.ref(probe)

    @staticmethod
    def _record(probe: "Probe", value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"Probe: the {probe.target} of {type(probe.module).__name__} is a "
                f"{type(value).__name__}, not a tensor; probe a module whose {probe.target} is "
                "a tensor")
        if not (torch.is_grad_enabled() and value.is_floating_point()):
            probe.data.append(value)
            return None
        rec = value
        if not rec.requires_grad:
            # Frozen model or input: the recorded tensor becomes a leaf, so backward both reaches
            # it and stops there.
            rec = value.detach().requires_grad_(True)
        else:
            rec.retain_grad()
        probe.data.append(rec)
        # The network continues from a copy: an in-place operation downstream (VGG's
        # ReLU(inplace=True)) then cannot change the recorded values or its gradient.
        return rec.clone()

    def __call__(self, module, inputs, output=None):
        probe = self.probe()
        if probe is None or (probe.thread is not None and probe.thread != threading.get_ident()):
            return None
        if probe.target == "output":
            return self._record(probe, output)
        if not inputs:
            raise TypeError(
                f"Probe: {type(module).__name__} was called without a positional input")
        new = self._record(probe, inputs[0])
        return None if new is None else (new,) + tuple(inputs[1:])


class Probe:
    """Record a module's output (or input) and, after backward, its gradient.

    Parameters
    ----------
    module : torch.nn.Module
        The module to watch.
    target : {"output", "input"}
        What to record: the module's output, or its first positional input.
    this_thread_only : bool
        Record only calls made by the thread that created the probe (the library's own
        wrappers use this, so that other threads running the same model do not add readings).

    Attributes
    ----------
    data : list of torch.Tensor
        One tensor per call of the module, in call order (a module called several times in one
        forward, such as torchvision ResNet's shared ``relu``, records every call).  After
        backward each has its ``.grad``.  When the recorded tensor did not require grad (frozen
        model), it is recorded as a new leaf that does, so backward reaches it and stops there.

    Notes
    -----
    The network continues from a copy of the recorded tensor, so an in-place operation that
    follows the module (``ReLU(inplace=True)`` after a convolution) changes neither the recorded
    values nor their gradient.  The probe holds no reference cycle: dropping it removes its
    hook; :meth:`remove` (or leaving its ``with`` block) removes the hook and frees the data.
    """

    def __init__(self, module: nn.Module, target: str = "output",
                 this_thread_only: bool = False) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"Probe: module must be a torch.nn.Module, got {type(module).__name__}")
        if target not in ("output", "input"):
            raise ValueError(f"Probe: target must be 'output' or 'input', got {target!r}")
        self.module = module
        self.target = target
        self.thread = threading.get_ident() if this_thread_only else None
        self.data: List[torch.Tensor] = []
        hook = _ProbeHook(self)
        if target == "output":
            handle = module.register_forward_hook(hook)
        else:
            handle = module.register_forward_pre_hook(hook)
        self._finalizer = weakref.finalize(self, handle.remove)

    @property
    def active(self) -> bool:
        """Whether the hook is still installed."""
        return self._finalizer.alive

    def remove(self) -> None:
        """Remove the hook and free the recorded tensors (idempotent)."""
        self._finalizer()
        self.data = []

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        return (f"Probe({type(self.module).__name__}, target={self.target!r}, "
                f"calls={len(self.data)}, active={self.active})")


def attach_debug_probes(model: nn.Module, debug: bool = False) -> Dict[str, Probe]:
    """Attach an output :class:`Probe` to every named sub-module of ``model``.

    Returns a dict name → probe (empty when ``debug`` is false, as in TorchRay).  Remove them
    with ``for p in probes.values(): p.remove()``.
    """
    if not debug:
        return {}
    return {name: Probe(m, "output") for name, m in model.named_modules() if name}


def layer_label(name: Any) -> str:
    """How error messages name a layer given by name or as a module."""
    return repr(name) if isinstance(name, str) else type(name).__name__


def single_call(probe: Probe, label: str = "saliency_layer", name: Any = None) -> torch.Tensor:
    """The one tensor ``probe`` recorded, or a ValueError naming ``label`` (the argument)."""
    what = f"{label} {layer_label(name if name is not None else probe.module)}"
    if not probe.data:
        raise ValueError(f"{what} was not called in the forward pass")
    if len(probe.data) > 1:
        raise ValueError(
            f"{what} was called {len(probe.data)} times in one forward pass (a shared module "
            "such as torchvision ResNet's 'relu'), so which call to read is ambiguous; choose a "
            "module called once (e.g. the enclosing block)")
    read = probe.data[0]
    if not read.requires_grad:
        raise ValueError(f"{what} produced a tensor autograd cannot follow")
    return read
