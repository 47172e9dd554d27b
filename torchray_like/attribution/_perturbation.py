r"""What the perturbation methods (RISE, extremal perturbation) share.

* **Randomness** — one policy for every randomised method: an ``int`` seed or a
  :class:`torch.Generator` reproduces a call exactly; ``None`` derives a seed from the global
  RNG state *without advancing it*, so ``torch.manual_seed(s)`` makes the call reproducible and
  repeated calls draw the same values.  The global RNG is never used.
* **Progress** — a tqdm bar that is off unless stderr is a terminal (or asked for), and never
  leaves tqdm's monitor thread running.
* **Argument checks** shared by the perturbation methods, including :func:`check_finite`
  (a NaN or an infinity in the input would poison every score).
* **Denormal floats** — :func:`flush_denormals` flushes them to zero for the duration of a call
  and restores the caller's setting (:func:`denormals_flushed` reads it).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import types
import warnings
from numbers import Integral, Real
from typing import Any, Iterator, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

GeneratorType = Union[torch.Generator, int, None]
#: A generator per image is accepted too by methods that seed each image on its own.
GeneratorsType = Union[GeneratorType, Sequence[Union[int, torch.Generator]]]


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def is_number(value: Any) -> bool:
    """A real number that is not a ``bool``."""
    return isinstance(value, Real) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int ≥ 1, or a :class:`TypeError` / :class:`ValueError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")
    return int(value)


def check_number(value: Any, name: str, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval, or a :class:`ValueError` naming ``name``."""
    ok = is_number(value) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in {left}{low:g}, {high:g}{right}, "
                         f"got {value!r}")
    return float(value)


def check_finite(tensor: torch.Tensor, name: str, method: str) -> None:
    """A :class:`ValueError` naming ``name`` if ``tensor`` holds a NaN or an infinity.

    One reduction over the tensor (and one device synchronisation): cheap next to the forward
    passes of a perturbation method, and it turns a silently NaN map (or an opaque indexing
    error deep inside the method) into a message that says where the bad value is.
    """
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = []
        if bool(torch.isnan(tensor).any()):
            kinds.append("NaN")
        if bool(torch.isinf(tensor).any()):
            kinds.append("infinite")
        raise ValueError(
            f"{method}: {name} has {bad} {' and '.join(kinds)} value(s) (shape "
            f"{tuple(tensor.shape)}); replace them first, e.g. with torch.nan_to_num({name})")


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warn_caller(message: str, category: type = UserWarning) -> None:
    """:func:`warnings.warn` pointing at the first frame outside this package — the user's
    line that called the method — however deep inside the package the warning is raised."""
    frame: Optional[types.FrameType] = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _PACKAGE_DIR + os.sep):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def check_progress(progress: Any) -> None:
    """``progress`` is ``True``, ``False`` or ``None`` (automatic)."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")


# ---------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------


def _seed_from(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(
            f"{what} must be a torch.Generator, an int seed or None, got {type(value).__name__}")
    if not 0 <= int(value) < 2 ** 64:
        raise ValueError(f"an int seed must be in [0, 2**64), got {value!r}")
    return int(value)


def global_seed() -> int:
    """A seed derived from the global RNG state, which is not advanced."""
    state = torch.get_rng_state().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(state).digest()[:8], "little")


def make_generator(generator: GeneratorType, seed: Optional[int] = None) -> torch.Generator:
    """A private CPU generator following the policy of this module.

    ``seed`` is TorchRay's spelling of ``generator=int``; giving both is an error.  A
    :class:`torch.Generator` is used (and advanced) as it is.
    """
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either generator or seed (an alias of generator=int), not both")
        generator = seed
    if isinstance(generator, torch.Generator):
        return generator
    value = global_seed() if generator is None else _seed_from(generator, "generator")
    return torch.Generator(device="cpu").manual_seed(value)


def image_seeds(generator: GeneratorsType, n: int) -> List[int]:
    """One seed per image, so that a batched call equals per-image calls.

    An int ``s`` (or ``None``, with ``s`` from :func:`global_seed`) gives ``s, s+1, ...``; a
    generator gives ``s`` by one draw; a sequence gives one entry per image.
    """
    def draw(g: torch.Generator) -> int:
        return int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device).item())

    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(
                f"generator has {len(generator)} entries but the batch has {n} images; give one "
                "seed or torch.Generator per image, or a single one")
        return [draw(g) if isinstance(g, torch.Generator) else _seed_from(g, "generator entry")
                for g in generator]
    if isinstance(generator, torch.Generator):
        base = draw(generator)
    elif generator is None:
        base = global_seed()
    else:
        base = _seed_from(generator, "generator")
    return [(base + i) % 2 ** 64 for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class _NoBar:
    """What :func:`progress_bar` yields when the bar is off."""

    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, progress: Optional[bool], desc: str, unit: str = "it"
                 ) -> Iterator[Any]:
    """A tqdm bar with ``update(n)``, shown when ``progress`` (``None``: when stderr is a TTY).

    No tqdm object is made when the bar is off (even a disabled one starts tqdm's monitor
    thread), and a monitor thread that the bar started is stopped when the block ends, also when
    it raises.
    """
    show = progress if progress is not None else bool(getattr(sys.stderr, "isatty", None)
                                                      and sys.stderr.isatty())
    if not show:
        yield _NoBar()
        return
    had_monitor = getattr(tqdm, "monitor", None) is not None
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
    try:
        yield bar
    finally:
        bar.close()
        cls = type(bar)
        monitor = getattr(cls, "monitor", None)
        if not had_monitor and monitor is not None and not getattr(cls, "_instances", True):
            monitor.exit()
            cls.monitor = None


# ---------------------------------------------------------------------------------------------
# Denormal floats
# ---------------------------------------------------------------------------------------------


def denormals_flushed() -> bool:
    """Whether the CPU flushes denormal floats to zero in the calling thread.

    PyTorch has a setter (:func:`torch.set_flush_denormal`) but no getter, so this probes the
    hardware: ``2**-126 * 0.5`` (the smallest normal float32 halved) is a denormal, or zero when
    flushing is on.  The product runs on one element, in the calling thread.
    """
    smallest = torch.full((1,), torch.finfo(torch.float32).tiny, dtype=torch.float32)
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


# ---------------------------------------------------------------------------------------------
# Reduced-precision forward passes
# ---------------------------------------------------------------------------------------------

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
