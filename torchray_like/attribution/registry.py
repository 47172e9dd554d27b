"""The method registry: a method's name → its function, for scripts and benchmarks.

One entry per method.  Backpropagation methods are described as data
(:class:`~.method.BackpropMethod`, reachable from their function with
:func:`~.method.description`); :func:`~torchray_like.attribution.explain.explain` shares one
forward pass among every described method without naming any.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

from .deconvnet import deconvnet
from .excitation_backprop import contrastive_excitation_backprop, excitation_backprop
from .extremal_perturbation import extremal_perturbation
from .grad_cam import grad_cam
from .gradient import gradient
from .guided_backprop import guided_backprop
from .guided_grad_cam import guided_grad_cam
from .linear_approx import linear_approx
from .method import description
from .rise import rise

__all__ = ["METHODS", "MethodRegistry", "SHARED_METHODS"]


class MethodRegistry(Mapping):
    """A read-only mapping from method name to function; unknown names raise ``ValueError``
    listing the known ones (a ``KeyError`` would not say what to type)."""

    def __init__(self, methods: Dict[str, Callable]) -> None:
        self._methods = dict(methods)

    def __getitem__(self, name: str) -> Callable:
        try:
            return self._methods[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown attribution method {name!r}; known methods: "
                f"{', '.join(sorted(self._methods))}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def get(self, name: Any, default: Any = None) -> Any:
        return self._methods.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def __repr__(self) -> str:
        return f"MethodRegistry({sorted(self._methods)})"


#: Method name → function ``f(model, input, target, **kwargs)``.  Backprop methods and RISE
#: return maps; ``extremal_perturbation`` returns ``(masks, history)`` as in TorchRay.
METHODS = MethodRegistry({fn.__name__: fn for fn in (
    gradient,
    guided_backprop,
    deconvnet,
    linear_approx,
    grad_cam,
    guided_grad_cam,
    excitation_backprop,
    contrastive_excitation_backprop,
    rise,
    extremal_perturbation,
)})

#: The methods described as data: they share one forward pass in ``explain``.
SHARED_METHODS: Tuple[str, ...] = tuple(name for name, fn in METHODS.items()
                                        if description(fn) is not None)
