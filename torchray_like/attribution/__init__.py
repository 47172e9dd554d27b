"""Attribution methods.

Every public name of every method module is re-exported here, and :data:`METHODS` maps a method
name to its function so that scripts can say ``METHODS[name](model, x, target, **kwargs)``::

    from torchray_like.attribution import METHODS, guided_backprop
    saliency_map = METHODS["guided_backprop"](model, x, target)
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, Iterator, Mapping

from . import common
from .common import *  # noqa: F401,F403
from .deconvnet import *  # noqa: F401,F403
from .gradient import *  # noqa: F401,F403
from .guided_backprop import *  # noqa: F401,F403

# The star imports above rebind names such as ``gradient`` from the sub-module to the function
# (as users expect); the modules themselves stay reachable through ``sys.modules``.
def _module(name: str):
    return sys.modules[f"{__name__}.{name}"]


_gradient = _module("gradient")
_guided_backprop = _module("guided_backprop")
_deconvnet = _module("deconvnet")


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

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def __repr__(self) -> str:
        return f"MethodRegistry({sorted(self._methods)})"


#: Method name → function ``f(model, input, target, **kwargs)``.
METHODS = MethodRegistry({
    "gradient": _gradient.gradient,
    "guided_backprop": _guided_backprop.guided_backprop,
    "deconvnet": _deconvnet.deconvnet,
})

__all__ = (["METHODS", "MethodRegistry", "common"] + list(common.__all__)
           + list(_gradient.__all__) + list(_guided_backprop.__all__)
           + list(_deconvnet.__all__))
