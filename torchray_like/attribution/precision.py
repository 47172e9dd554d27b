r"""Floating-point precision of the methods that call the model many times.

* **Denormal floats** — :func:`flush_denormals` flushes them to zero for the duration of a call
  and restores the caller's setting (:func:`denormals_flushed` reads it).
* **Reduced-precision forward passes** — :func:`check_autocast` validates ``autocast=`` and
  :func:`autocast_forward` is the context of one forward pass.
"""

from __future__ import annotations

import contextlib
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Optional

import torch

__all__ = ["denormals_flushed", "flush_denormals", "AUTOCAST_DTYPES", "check_autocast",
           "autocast_forward", "caller_autocast", "without_autocast", "CPU_FLOAT64"]

#: Factory keywords (``torch.arange(n, **CPU_FLOAT64)``) for the float64 constants the methods
#: build (kernels, grids, positions): on the CPU whatever the caller's
#: ``torch.set_default_device`` (a meta or CUDA default would break them), moved to the
#: input's device and dtype after.  The one home of that rule.
CPU_FLOAT64: Mapping[str, Any] = MappingProxyType({"dtype": torch.float64, "device": "cpu"})


def denormals_flushed() -> bool:
    """Whether the CPU flushes denormal floats to zero in the calling thread.

    PyTorch has a setter (:func:`torch.set_flush_denormal`) but no getter, so this probes the
    hardware: ``2**-126 * 0.5`` (the smallest normal float32 halved) is a denormal, or zero when
    flushing is on.  The product runs on one element, in the calling thread.
    """
    smallest = torch.full((1,), torch.finfo(torch.float32).tiny, dtype=torch.float32, device="cpu")
    return bool(smallest.mul(0.5).item() == 0.0)


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush denormal floats to zero on the CPU for the block; restore the caller's setting.

    Yields whether flushing is in effect.  Arithmetic on denormals (magnitudes below
    ``1.2e-38`` in float32) is many times slower on most CPUs; optimisations whose values decay
    geometrically (momentum buffers, masks and their gradients far from the evidence) drift
    into that range.  Flushing changes results only in those tiny values.

    The setting (the FTZ/DAZ bits of the x86 MXCSR register; ARM's FZ) belongs to the calling
    thread: the block does not change it in other Python threads, so concurrent calls neither
    see nor undo each other's setting.  It does not reach PyTorch's intra-op worker threads
    either, which keep the setting they were started with.  ``enabled=False`` or a CPU without
    the feature (``torch.set_flush_denormal`` returns ``False``) leaves everything as it is.
    """
    if not enabled:
        yield denormals_flushed()
        return
    before = denormals_flushed()
    if before:
        yield True
        return
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported:
            torch.set_flush_denormal(False)


#: The dtypes accepted by ``autocast=`` of the perturbation methods.
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def check_autocast(autocast: Any, device: torch.device) -> Optional[torch.dtype]:
    """Validate ``autocast=`` (``None``, ``torch.bfloat16`` or ``torch.float16``) for ``device``.

    Raises :class:`TypeError` for anything else and :class:`ValueError` when PyTorch has no
    autocast for the device type.
    """
    if autocast is None:
        return None
    if autocast is True or not isinstance(autocast, torch.dtype) or \
            autocast not in AUTOCAST_DTYPES:
        raise TypeError(
            f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}; "
            "bfloat16 is the safe choice on CPUs and recent GPUs")
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(
            f"autocast={autocast}: PyTorch has no autocast for {device.type!r} tensors; pass "
            "autocast=None")
    return autocast


def autocast_forward(autocast: Optional[torch.dtype], device: torch.device
                     ) -> contextlib.AbstractContextManager:
    """The context of a forward pass: :class:`torch.autocast` to ``autocast``, or nothing.

    Under autocast matrix products and convolutions run in the reduced dtype; the caller reads
    the scores back in float32 and keeps every accumulation (maps, masks, losses) in float32.
    """
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast)


def caller_autocast(device: torch.device) -> Optional[torch.dtype]:
    """The dtype of the caller's :class:`torch.autocast` for ``device``'s type, or ``None``
    when it is off there (or PyTorch has no autocast for that device type, e.g. meta)."""
    if not torch.amp.is_autocast_available(device.type) or \
            not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Suspend the caller's :class:`torch.autocast` for ``device``'s type in the block: a map's or
    a mask's own arithmetic (a blur, a mask's pooling) is not the model's forward pass, and in
    bfloat16 it would return a bfloat16 map of a float32 input.  Nothing when autocast is off."""
    if caller_autocast(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
