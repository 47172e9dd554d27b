"""The package layout: no callable modules, pickling, the flat namespace and the registry."""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
import pkgutil
import types

import pytest
import torch

import torchray_like
import torchray_like.attribution as attribution
from torchray_like.attribution import METHODS, MethodRegistry
from torchray_like.attribution.registry import TRANSFORMER_ONLY_METHODS

MODULES = sorted(m.name for m in pkgutil.iter_modules(attribution.__path__))


@pytest.mark.parametrize("module_name", MODULES)
def test_a_module_and_a_function_never_share_a_dotted_name(module_name):
    module = importlib.import_module(f"torchray_like.attribution.{module_name}")
    # The package attribute is the module itself, a plain (not callable) module.
    assert getattr(attribution, module_name) is module
    assert type(module) is types.ModuleType and not callable(module)
    for name in getattr(module, "__all__", []):
        assert hasattr(module, name), f"{module_name}.__all__ names a missing {name!r}"


@pytest.mark.parametrize("module_name", MODULES)
def test_no_module_imports_another_modules_private_names(module_name):
    module = importlib.import_module(f"torchray_like.attribution.{module_name}")
    for name, value in vars(module).items():
        if not name.startswith("_") or name.startswith("__"):
            continue
        home = getattr(value, "__module__", None)
        if home is not None and home.startswith("torchray_like") and home != module.__name__:
            pytest.fail(f"{module_name} imports the private name {name} of {home}")


def test_torchray_import_paths_give_functions():
    import torchray_like.attribution.grad_cam as gc
    from torchray_like.attribution.grad_cam import grad_cam
    from torchray_like.attribution.rise import rise

    assert inspect.isfunction(grad_cam) and inspect.isfunction(rise)
    assert isinstance(gc, types.ModuleType) and gc.grad_cam is grad_cam


# Methods whose own function keeps TorchRay's return value (every class without a target, or
# extremal perturbation's (masks, history)): METHODS holds their uniform map view.
UNIFORM_VIEWS = {"rise", "extremal_perturbation", "contrastive_excitation_backprop"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_pickles_and_is_in_the_flat_namespace(name):
    fn = METHODS[name]
    if name in UNIFORM_VIEWS:
        assert fn.__name__ == f"{name}_map" and callable(getattr(torchray_like, name))
    else:
        assert getattr(torchray_like, name) is fn
    assert fn.__module__ == f"torchray_like.attribution.{fn.__module__.rsplit('.', 1)[1]}"
    # functools.partial(method, model) must reach a spawned worker (benchmark sharding).
    model = torch.nn.Linear(2, 2)
    restored = pickle.loads(pickle.dumps(functools.partial(fn, model)))
    assert restored.func is fn and isinstance(restored.args[0], torch.nn.Linear)


def test_flat_namespace_gives_the_same_maps_as_the_modules():
    from torchray_like.attribution.grad_cam import grad_cam

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(2, 3, 8, 8)
    expected = grad_cam(model, x, 1, "0")
    assert expected.shape == (2, 1, 6, 6) and expected.abs().sum() > 0
    assert torch.equal(torchray_like.grad_cam(model, x, 1, "0"), expected)


def test_every_method_is_registered():
    expected = {"gradient", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam",
                "linear_approx", "excitation_backprop", "contrastive_excitation_backprop",
                "rise", "extremal_perturbation",
                # issue 19: beyond TorchRay
                "gradient_x_input", "integrated_gradients", "smooth_grad", "occlusion",
                "grad_cam_plus_plus", "layer_cam", "xgrad_cam", "hires_cam", "eigen_cam",
                "score_cam", "ablation_cam",
                # issue 20: layer-wise relevance propagation and its standard composites
                "lrp", "lrp_epsilon_plus", "lrp_epsilon_plus_flat", "lrp_epsilon_alpha2_beta1",
                "lrp_epsilon_gamma_box",
                # issue 21: transformers
                "attention_rollout", "attention_flow", "grad_rollout", "attn_lrp", "cp_lrp"}
    assert set(METHODS) == expected
    for name in METHODS:
        assert inspect.isfunction(METHODS[name])
        assert METHODS[name].__name__ == (f"{name}_map" if name in UNIFORM_VIEWS else name)


#: dims -> (convolution, adaptive pooling, input's spatial shape); 3-D is video / volumes.
LAYERS = {1: (torch.nn.Conv1d, torch.nn.AdaptiveAvgPool1d, (16,)),
          2: (torch.nn.Conv2d, torch.nn.AdaptiveAvgPool2d, (16, 16)),
          3: (torch.nn.Conv3d, torch.nn.AdaptiveAvgPool3d, (6, 8, 8))}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_entry_returns_one_map_per_sample_for_the_target(name, dims):
    """One contract for METHODS: (N, 1, *spatial) maps of that target, by name alone."""
    if name in TRANSFORMER_ONLY_METHODS:
        pytest.skip("explains transformers only (contract on a ViT: test_attention_rollout.py)")
    torch.manual_seed(0)
    conv, pool, spatial = LAYERS[dims]
    model = torch.nn.Sequential(conv(3, 6, 3, padding=1), torch.nn.ReLU(),
                                conv(6, 6, 3, padding=1), torch.nn.ReLU(), pool(1),
                                torch.nn.Flatten(), torch.nn.Linear(6, 4)).eval()
    x = torch.rand((2, 3) + spatial)
    # sigma 1.5 on the 6x8x8 volume: 3 would be over a quarter of its sides (a warning).
    fast = {"rise": {"num_masks": 32, "num_cells": 4},
            "extremal_perturbation": {"max_iter": 3, "areas": [0.1, 0.3], "step": 2,
                                      "sigma": 3 if dims < 3 else 1.5}}.get(name, {})
    smap = METHODS[name](model, x, [1, 2], **fast)
    assert isinstance(smap, torch.Tensor) and smap.dtype == x.dtype
    assert smap.shape == (2, 1) + spatial  # padding 1 keeps every layer at the input size
    assert torch.isfinite(smap).all()


class UnhashableSequential(torch.nn.Sequential):
    """A model whose class defines ``__eq__`` without ``__hash__``: its instances cannot be
    hashed, which PyTorch's own ``model.modules()`` and ``model.eval()`` need."""

    def __eq__(self, other):
        return self is other


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_entry_refuses_an_unhashable_model_clearly(name):
    torch.manual_seed(0)
    model = UnhashableSequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                 torch.nn.Linear(6, 4))
    with pytest.raises(TypeError):
        hash(model)
    with pytest.raises(TypeError, match=r"UnhashableSequential cannot be hashed.*__hash__ = "):
        METHODS[name](model, torch.rand(2, 3, 12, 12), [1, 2])
    if name not in TRANSFORMER_ONLY_METHODS:
        model.__class__ = torch.nn.Sequential  # what the message says: a hashable class
        fast = {"rise": {"num_masks": 32, "num_cells": 4},
                "extremal_perturbation": {"max_iter": 3, "areas": [0.1], "step": 2,
                                          "sigma": 3}}.get(name, {})
        smap = METHODS[name](model, torch.rand(2, 3, 12, 12), [1, 2], **fast)
        assert smap.shape == (2, 1, 12, 12)


def test_uniform_views_keep_the_functions_return_values():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 4)).eval()
    x = torch.rand(2, 3, 12, 12)
    # extremal perturbation: the masks of the areas, summed per image.
    masks, history = torchray_like.extremal_perturbation(model, x, 1, areas=[0.1, 0.3],
                                                         max_iter=3, step=2, sigma=3)
    assert masks.shape == (4, 1, 12, 12)
    summed = METHODS["extremal_perturbation"](model, x, 1, areas=[0.1, 0.3], max_iter=3,
                                              step=2, sigma=3)
    assert torch.equal(summed, masks.view(2, 2, 12, 12).sum(1, keepdim=True))
    # RISE: the function gives every class without a target; the entry needs one.
    assert torchray_like.rise(model, x, num_masks=16).shape == (2, 4, 12, 12)
    with pytest.raises(ValueError, match="explains one target"):
        METHODS["rise"](model, x, None, num_masks=16)
    # contrastive excitation backprop: the contrast at the automatic layer, the map at the input.
    want = torchray_like.contrastive_excitation_backprop(model, x, 1, "", "1")
    assert torch.equal(METHODS["contrastive_excitation_backprop"](model, x, 1), want)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown attribution method 'gradcam'.*grad_cam"):
        METHODS["gradcam"]
    with pytest.raises(ValueError, match="unknown attribution method 3"):
        METHODS[3]
    assert isinstance(METHODS, MethodRegistry) and len(METHODS) == len(list(METHODS))
    with pytest.raises(TypeError):
        METHODS["gradient"] = None  # read-only
    # Membership and get() answer without raising (Mapping's defaults would catch KeyError only).
    assert "gradient" in METHODS and "gradcam" not in METHODS and 3 not in METHODS
    assert METHODS.get("gradcam") is None and METHODS.get("rise") is METHODS["rise"]


def test_common_facade_reexports_torchrays_names():
    from torchray_like.attribution import common

    torchray_names = {"Probe", "Patch", "NullContext", "ReLUContext", "attach_debug_probes",
                      "get_module", "get_backward_gradient", "get_pointing_gradient",
                      "gradient_to_saliency", "resize_saliency", "saliency"}
    assert torchray_names <= set(common.__all__)
    for name in common.__all__:
        value = getattr(common, name)
        home = getattr(value, "__module__", "")
        assert home != common.__name__, f"{name} should live in its concept's module"
