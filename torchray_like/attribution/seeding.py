r"""Randomness of the randomised methods (RISE's masks, extremal perturbation's jitter).

One policy for all of them: an ``int`` seed or a :class:`torch.Generator` reproduces a call
exactly; ``None`` derives a seed from the global RNG state *without advancing it*, so
``torch.manual_seed(s)`` makes the call reproducible and repeated calls draw the same values.
The global RNG is never used.  NumPy integers are seeds like Python ints.
"""

from __future__ import annotations

import hashlib
from numbers import Integral
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["GeneratorType", "GeneratorsType", "global_seed", "make_generator", "image_seeds",
           "image_generators"]

GeneratorType = Union[torch.Generator, int, None]
#: A generator per image is accepted too by methods that seed each image on its own.
GeneratorsType = Union[GeneratorType, Sequence[Union[int, torch.Generator]]]


def _seed_from(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(
            f"{what} must be a torch.Generator, an int seed or None, got {type(value).__name__}")
    if not 0 <= int(value) < 2 ** 64:
        raise ValueError(f"an int seed must be in [0, 2**64), got {value!r}")
    return int(value)


def global_seed() -> int:
    """A seed derived from the global RNG state, which is not advanced."""
    state = torch.get_rng_state().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(state).digest()[:8], "little")


def _with_seed(generator: Any, seed: Optional[int]) -> Any:
    """``generator``, or ``seed`` (TorchRay's spelling of ``generator=int``); both is an
    error."""
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("pass either generator or seed (an alias of generator=int), not both")
    return seed


def make_generator(generator: GeneratorType, seed: Optional[int] = None) -> torch.Generator:
    """A private CPU generator following the policy of this module.

    Parameters
    ----------
    generator : torch.Generator, int or None
        A generator is used (and advanced) as it is; an int seeds a new one; ``None`` seeds it
        from :func:`global_seed`.
    seed : int, optional
        TorchRay's spelling of ``generator=int``; giving both is an error.

    Returns
    -------
    torch.Generator
    """
    generator = _with_seed(generator, seed)
    if isinstance(generator, torch.Generator):
        return generator
    value = global_seed() if generator is None else _seed_from(generator, "generator")
    return torch.Generator(device="cpu").manual_seed(value)


def _draw(g: torch.Generator) -> int:
    return int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device).item())


def image_seeds(generator: Any, n: int) -> List[int]:
    """One seed per image, so that a batched call equals per-image calls.

    Parameters
    ----------
    generator : int, torch.Generator, None, or a sequence of them
        An int ``s`` (or ``None``, with ``s`` from :func:`global_seed`) gives ``s, s+1, ...``;
        a generator gives ``s`` by one draw; a sequence (or a 1-D NumPy array) gives one entry
        per image.
    n : int
        The number of images.

    Returns
    -------
    list of int
    """
    if isinstance(generator, np.ndarray) and generator.ndim == 1:
        generator = generator.tolist()
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(
                f"generator has {len(generator)} entries but the batch has {n} images; give one "
                "seed or torch.Generator per image, or a single one")
        return [_draw(g) if isinstance(g, torch.Generator) else _seed_from(g, "generator entry")
                for g in generator]
    if isinstance(generator, torch.Generator):
        base = _draw(generator)
    elif generator is None:
        base = global_seed()
    else:
        base = _seed_from(generator, "generator")
    return [(base + i) % 2 ** 64 for i in range(n)]


def image_generators(generator: Any, n: int, seed: Optional[int] = None
                     ) -> List[torch.Generator]:
    """One private CPU generator per image, seeded by :func:`image_seeds` (``seed``:
    TorchRay's spelling of ``generator=int``; giving both is an error)."""
    generator = _with_seed(generator, seed)
    return [torch.Generator(device="cpu").manual_seed(s) for s in image_seeds(generator, n)]
