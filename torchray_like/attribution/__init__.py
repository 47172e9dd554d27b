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
from .excitation_backprop import *  # noqa: F401,F403
from .grad_cam import *  # noqa: F401,F403
from .gradient import *  # noqa: F401,F403
from .guided_backprop import *  # noqa: F401,F403
from .guided_grad_cam import *  # noqa: F401,F403
from .linear_approx import *  # noqa: F401,F403
from .rise import *  # noqa: F401,F403

# The star imports above rebind names such as ``gradient`` from the sub-module to the function
# (as users expect); the modules themselves stay reachable through ``sys.modules``.
def _module(name: str):
    return sys.modules[f"{__name__}.{name}"]


_MODULES = [_module(name) for name in (
    "gradient", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam", "linear_approx",
    "excitation_backprop", "rise")]


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
    "gradient": gradient,  # noqa: F405
    "guided_backprop": guided_backprop,  # noqa: F405
    "deconvnet": deconvnet,  # noqa: F405
    "grad_cam": grad_cam,  # noqa: F405
    "guided_grad_cam": guided_grad_cam,  # noqa: F405
    "linear_approx": linear_approx,  # noqa: F405
    "excitation_backprop": excitation_backprop,  # noqa: F405
    "contrastive_excitation_backprop": contrastive_excitation_backprop,  # noqa: F405
    "rise": rise,  # noqa: F405
})

__all__ = ["METHODS", "MethodRegistry", "common"] + list(common.__all__) + [
    name for module in _MODULES for name in module.__all__]
