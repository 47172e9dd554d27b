"""The package re-exports every public name of every method module, and METHODS."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import torchray_like.attribution as attribution
from torchray_like.attribution import METHODS, MethodRegistry

MODULES = sorted(m.name for m in pkgutil.iter_modules(attribution.__path__))


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_reexported(module_name):
    module = importlib.import_module(f"torchray_like.attribution.{module_name}")
    assert module.__all__, f"{module_name} has an empty __all__"
    for name in module.__all__:
        assert name in attribution.__all__
        exported = getattr(attribution, name)
        if name == module_name:
            # The method and its module share the name: the package attribute is the module,
            # callable as the method.
            assert exported is module and callable(exported)
            assert inspect.signature(exported) == inspect.signature(getattr(module, name))
        else:
            assert exported is getattr(module, name), name


def test_method_module_is_both_module_and_function():
    import torchray_like.attribution.grad_cam as gc  # the module, not the function
    from torchray_like.attribution import gradient

    assert hasattr(gc, "find_saliency_layer")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gradient(model, x, 1), gradient.gradient(model, x, 1))
    torch.testing.assert_close(attribution.grad_cam(model, x, 1, "0"),
                               gc.grad_cam(model, x, 1, "0"))


def test_every_method_is_registered():
    expected = {"gradient", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam",
                "linear_approx", "excitation_backprop", "contrastive_excitation_backprop",
                "rise", "extremal_perturbation"}
    assert set(METHODS) == expected
    for name in METHODS:
        assert inspect.isfunction(METHODS[name]) and METHODS[name].__name__ == name


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown attribution method 'gradcam'.*grad_cam"):
        METHODS["gradcam"]
    with pytest.raises(ValueError, match="unknown attribution method 3"):
        METHODS[3]
    assert isinstance(METHODS, MethodRegistry) and len(METHODS) == len(list(METHODS))
    with pytest.raises(TypeError):
        METHODS["gradient"] = None  # read-only
