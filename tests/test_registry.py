"""The package re-exports every public name of every method module, and METHODS."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import torchray_like.attribution as attribution
from torchray_like.attribution import METHODS, MethodRegistry

MODULES = sorted(m.name for m in pkgutil.iter_modules(attribution.__path__))


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_reexported(module_name):
    module = importlib.import_module(f"torchray_like.attribution.{module_name}")
    assert module.__all__, f"{module_name} has an empty __all__"
    for name in module.__all__:
        assert getattr(attribution, name) is getattr(module, name), name
        assert name in attribution.__all__


def test_every_method_module_is_registered():
    expected = {"gradient", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam",
                "linear_approx", "excitation_backprop", "contrastive_excitation_backprop",
                "rise", "extremal_perturbation"}
    present = expected & set(dir(attribution))
    assert set(METHODS) == present
    for name in METHODS:
        assert METHODS[name] is getattr(attribution, name)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown attribution method 'gradcam'.*grad_cam"):
        METHODS["gradcam"]
    with pytest.raises(ValueError, match="unknown attribution method 3"):
        METHODS[3]
    assert isinstance(METHODS, MethodRegistry) and len(METHODS) == len(list(METHODS))
    with pytest.raises(TypeError):
        METHODS["gradient"] = None  # read-only
