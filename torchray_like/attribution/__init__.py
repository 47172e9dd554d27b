"""Attribution methods.

Every public name of every method module is re-exported here, and :data:`METHODS` maps a method
name to its function so that scripts can say ``METHODS[name](model, x, target, **kwargs)``::

    from torchray_like.attribution import METHODS, guided_backprop
    saliency_map = METHODS["guided_backprop"](model, x, target)

A method and its module share a name (``grad_cam`` the function lives in ``grad_cam`` the
module).  So that both ``torchray_like.attribution.grad_cam(model, x, c)`` and
``import torchray_like.attribution.grad_cam as gc; gc.find_saliency_layer(...)`` work, the
package attribute is the module made callable: calling it calls the function of the same name
(its signature and docstring are the function's, for ``help`` and ``inspect``).  ``METHODS``
holds the plain functions.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Callable, Dict, Iterator, Mapping

from . import common
from .common import *  # noqa: F401,F403
from .deconvnet import *  # noqa: F401,F403
from .excitation_backprop import *  # noqa: F401,F403
from .extremal_perturbation import *  # noqa: F401,F403
from .grad_cam import *  # noqa: F401,F403
from .gradient import *  # noqa: F401,F403
from .guided_backprop import *  # noqa: F401,F403
from .guided_grad_cam import *  # noqa: F401,F403
from .linear_approx import *  # noqa: F401,F403
from .rise import *  # noqa: F401,F403

_MODULE_NAMES = ("gradient", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam",
                 "linear_approx", "excitation_backprop", "rise", "extremal_perturbation")


class _MethodModule(types.ModuleType):
    """A method module that, called, calls its function of the same name."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _callable_module(name: str) -> types.ModuleType:
    module = sys.modules[f"{__name__}.{name}"]
    function = getattr(module, name)
    module.__class__ = _MethodModule
    # inspect.signature() and help() on the package attribute describe the function.
    module.__signature__ = inspect.signature(function)
    return module


_MODULES = [sys.modules[f"{__name__}.{name}"] for name in _MODULE_NAMES]
# The star imports bound each method's name to its function; bind it to the callable module.
for _name in _MODULE_NAMES:
    globals()[_name] = _callable_module(_name)
del _name


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


#: Method name → function ``f(model, input, target, **kwargs)``.  Backprop methods and RISE
#: return maps; ``extremal_perturbation`` returns ``(masks, history)`` as in TorchRay.
METHODS = MethodRegistry({
    "gradient": gradient.gradient,
    "guided_backprop": guided_backprop.guided_backprop,
    "deconvnet": deconvnet.deconvnet,
    "grad_cam": grad_cam.grad_cam,
    "guided_grad_cam": guided_grad_cam.guided_grad_cam,
    "linear_approx": linear_approx.linear_approx,
    "excitation_backprop": excitation_backprop.excitation_backprop,
    "contrastive_excitation_backprop": excitation_backprop.contrastive_excitation_backprop,
    "rise": rise.rise,
    "extremal_perturbation": extremal_perturbation.extremal_perturbation,
})

__all__ = ["METHODS", "MethodRegistry", "common"] + list(common.__all__) + [
    name for module in _MODULES for name in module.__all__]
