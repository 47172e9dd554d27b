r"""What the perturbation methods (RISE, extremal perturbation) share.

* **Randomness** — one policy for every randomised method: an ``int`` seed or a
  :class:`torch.Generator` reproduces a call exactly; ``None`` derives a seed from the global
  RNG state *without advancing it*, so ``torch.manual_seed(s)`` makes the call reproducible and
  repeated calls draw the same values.  The global RNG is never used.
* **Progress** — a tqdm bar that is off unless stderr is a terminal (or asked for), and never
  leaves tqdm's monitor thread running.
* **Argument checks** shared by the perturbation methods.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
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
    if not 0 <= value < 2 ** 64:
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
