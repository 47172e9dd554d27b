"""explain(): several methods from one forward pass, each map bit for bit its own function's."""

from __future__ import annotations

import ast
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution import METHODS
from torchray_like.attribution.explain import SHARED_METHODS, explain
from torchray_like.attribution.grad_cam import find_saliency_layer
from torchray_like.attribution.targets import get_pointing_gradient

from .conftest import (
    ConvNet,
    assert_same_state,
    hook_counts,
    make_torchvision,
    primed_model_and_input,
    snapshot,
)

# One intra-op thread for the module (conftest.one_thread): small tensors on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nets():
    resnet = make_torchvision("resnet18")
    vgg = make_torchvision("vgg11")
    return {
        # name: (model, input, target, custom options, second layer)
        "convnet": (ConvNet(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                    [1, 4], "features.3"),
        "resnet18": (resnet, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)),
                     [1, 7], "layer3"),
        # One image: VGG's 4096-wide classifier dominates the cost at 64².
        "vgg11": (vgg, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)),
                  [9], "features.15"),
    }


def custom_options(layer):
    """Per-method options: other layers, resizes, smoothing."""
    return {
        "gradient": {"smooth": 0.05},
        "guided_backprop": {"resize": 16, "resize_mode": "nearest"},
        "deconvnet": {"smooth": 0.02, "resize": (12, 10)},
        "linear_approx": {"saliency_layer": layer, "resize": True},
        "grad_cam": {"saliency_layer": layer, "smooth": 0.1},
        "guided_grad_cam": {"resize": 8, "smooth": 0.03},
    }


def separate(model, x, target, names, options):
    out = {}
    for label, name in names.items():
        result = METHODS[name](model, x, target, **options.get(label, {}))
        out[label] = result[0] if isinstance(result, tuple) else result
    return out


def assert_equal_maps(got, want):
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), f"{k}: max diff {(got[k] - want[k]).abs().max()}"


def all_combinations(names):
    for r in range(1, len(names) + 1):
        yield from itertools.combinations(names, r)


#: TorchRay's six shared methods: every combination of them is checked.
TORCHRAY_SHARED = ("gradient", "guided_backprop", "deconvnet", "linear_approx", "grad_cam",
                   "guided_grad_cam")


def combinations_to_check():
    """Every combination of TorchRay's six (63), every described method alone and beside each
    rule (the rules switch between passes), and all of them at once: the combinations of all
    described methods (4095 for twelve) would cost minutes and add no new case."""
    yield from all_combinations(TORCHRAY_SHARED)
    for name in SHARED_METHODS:
        if name not in TORCHRAY_SHARED:
            yield (name,)
            yield (name, "guided_backprop", "deconvnet")
    yield tuple(SHARED_METHODS)


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("net", ["convnet", "resnet18", "vgg11"])
@pytest.mark.parametrize("kind", ["default", "custom"])
def test_every_combination_equals_the_separate_calls(nets, net, kind):
    model, x, target, layer = nets[net]
    options = {} if kind == "default" else custom_options(layer)
    want = separate(model, x, target, {m: m for m in SHARED_METHODS}, options)
    for combo in combinations_to_check():
        got = explain(model, x, target, combo, {m: options[m] for m in combo if m in options})
        assert_equal_maps(got, {m: want[m] for m in combo})


@pytest.mark.parametrize("net", ["convnet", "resnet18", "vgg11"])
def test_a_method_at_several_layers_in_one_call(nets, net):
    model, x, target, layer = nets[net]
    auto = find_saliency_layer(model, x)
    names = {"la_input": "linear_approx", "la_layer": "linear_approx",
             "la_auto": "linear_approx", "gc_auto": "grad_cam", "gc_layer": "grad_cam",
             "gc_input": "grad_cam", "gradient_layer": "gradient", "guided_layer":
             "guided_backprop", "deconv": "deconvnet", "ggc_layer": "guided_grad_cam",
             "gradient": "gradient"}
    options = {"la_layer": {"saliency_layer": layer}, "la_auto": {"saliency_layer": auto},
               "gc_layer": {"saliency_layer": layer}, "gc_input": {"saliency_layer": ""},
               "gradient_layer": {"saliency_layer": layer, "resize": True},
               "guided_layer": {"saliency_layer": layer},
               "ggc_layer": {"saliency_layer": layer}}
    assert_equal_maps(explain(model, x, target, names, options),
                      separate(model, x, target, names, options))


def test_a_layer_given_as_name_and_as_module_is_probed_once(nets):
    model, x, target, layer = nets["resnet18"]
    module = model.get_submodule(layer)
    names = {"by_name": "grad_cam", "by_module": "linear_approx"}
    options = {"by_name": {"saliency_layer": layer}, "by_module": {"saliency_layer": module}}
    calls = []
    handle = module.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        got = explain(model, x, target, names, options)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert_equal_maps(got, separate(model, x, target, names, options))


@pytest.mark.parametrize("target", [3, [2, 4], torch.tensor([4, 0]),
                                    lambda out: out[:, 2] - out[:, 1]], ids=["int", "list",
                                                                             "tensor", "callable"])
def test_targets(nets, target):
    model, x, _, _ = nets["convnet"]
    names = {m: m for m in SHARED_METHODS}
    assert_equal_maps(explain(model, x, target), separate(model, x, target, names, {}))


def test_a_seed_gradient_target(nets):
    model, x, _, _ = nets["convnet"]
    seed = torch.randn(2, 5, generator=torch.Generator().manual_seed(5))
    names = {m: m for m in SHARED_METHODS}
    assert_equal_maps(explain(model, x, seed), separate(model, x, seed, names, {}))


def test_a_custom_flattening(nets):
    model, x, target, _ = nets["convnet"]

    def signed_sum(t):
        return t.grad.sum(1, keepdim=True)

    names = {m: m for m in ("gradient", "guided_backprop", "deconvnet", "guided_grad_cam")}
    options = {m: {"gradient_to_saliency": signed_sum} for m in names}
    assert_equal_maps(explain(model, x, target, names, options),
                      separate(model, x, target, names, options))


@pytest.mark.parametrize("dims", [1, 3])
def test_1d_and_3d_data(dims):
    model = ConvNet(dims=dims).eval()
    x = torch.randn((2, 3) + (6,) * dims, generator=torch.Generator().manual_seed(dims))
    names = {m: m for m in SHARED_METHODS}
    options = {"grad_cam": {"resize": True}, "gradient": {"smooth": 0.1}}
    assert_equal_maps(explain(model, x, [0, 2], names, options),
                      separate(model, x, [0, 2], names, options))


def test_double_precision_and_relu6():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 4, 3),
                          nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64) * 4
    names = {m: m for m in SHARED_METHODS}
    options = {"grad_cam": {"saliency_layer": "1"}, "guided_grad_cam": {"saliency_layer": "2"}}
    assert_equal_maps(explain(model, x, 1, names, options),
                      separate(model, x, 1, names, options))


# ---------------------------------------------------------------------------------------------
# One forward pass


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("net", ["convnet", "resnet18"])
def test_the_shared_methods_cost_one_forward_pass(nets, net):
    model, x, target, layer = nets[net]
    find_saliency_layer(model, x)  # the automatic layer choice is cached after one discovery
    calls, handle = count_forwards(model)
    try:
        explain(model, x, target, SHARED_METHODS, custom_options(layer))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_at_most_one_backward_pass_per_rule(nets, monkeypatch):
    model, x, target, layer = nets["convnet"]
    passes = []
    grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *args, **kwargs):
        passes.append(len(inputs) if isinstance(inputs, (list, tuple)) else 1)
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    explain(model, x, target, SHARED_METHODS, custom_options(layer))
    # plain (input + two layers), guided (input), DeConvNet (input)
    assert passes == [3, 1, 1]


# ---------------------------------------------------------------------------------------------
# Methods with their own forward passes


def test_methods_that_cannot_share_run_by_their_own_function(nets):
    model, x, target, _ = nets["convnet"]
    names = {"gradient": "gradient", "excitation_backprop": "excitation_backprop",
             "contrastive_excitation_backprop": "contrastive_excitation_backprop",
             "rise": "rise", "extremal_perturbation": "extremal_perturbation",
             "grad_cam": "grad_cam"}
    options = {"excitation_backprop": {"saliency_layer": "features.0"},
               "contrastive_excitation_backprop": {"saliency_layer": "features.0",
                                                   "contrast_layer": "features.3"},
               "rise": {"num_masks": 16, "batch_size": 8, "seed": 3, "progress": False},
               "extremal_perturbation": {"max_iter": 3, "areas": [0.3], "progress": False,
                                         "generator": None, "jitter": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = explain(model, x, target, names, options)
        want = separate(model, x, target, names, options)
    assert_equal_maps(got, want)


def test_an_option_the_shared_pass_cannot_honour_runs_the_method_alone(nets):
    model, x, target, _ = nets["convnet"]
    from torchray_like.attribution.rules import GRADIENT_RULE, ReLUContext
    names = {"gradient": "gradient", "pointing": "grad_cam", "ctx": "linear_approx",
             "guided": "guided_backprop"}
    options = {"pointing": {"get_backward_gradient": get_pointing_gradient},
               "ctx": {"context_builder": lambda: ReLUContext(GRADIENT_RULE)}}
    calls, handle = count_forwards(model)
    try:
        got = explain(model, x, target, names, options)
    finally:
        handle.remove()
    assert len(calls) == 3  # the shared pass + two methods alone
    assert_equal_maps(got, separate(model, x, target, names, options))


# ---------------------------------------------------------------------------------------------
# State and hooks


def test_model_and_input_state_restored_and_no_hook_left():
    model, x = primed_model_and_input()
    before = snapshot(model, x)
    explain(model, x, [0, 2], SHARED_METHODS, {"grad_cam": {"saliency_layer": "conv"},
                                               "guided_grad_cam": {"saliency_layer": "bn"},
                                               "linear_approx": {"saliency_layer": "conv"}})
    assert_same_state(before, snapshot(model, x))


@pytest.mark.parametrize("failure", ["model raises", "bad target", "foreign layer",
                                     "separate method raises"])
def test_state_restored_when_something_raises(failure):
    model, x = primed_model_and_input()
    foreign = nn.Conv2d(1, 1, 1)  # (built before the snapshot: building draws random weights)
    before = snapshot(model, x)
    target, options = [0, 2], {"grad_cam": {"saliency_layer": "conv"},
                               "guided_grad_cam": {"saliency_layer": "conv"}}
    names = list(SHARED_METHODS)
    if failure == "model raises":
        model.armed = True
        error = RuntimeError
    elif failure == "bad target":
        target, error = [0, 7], ValueError
    elif failure == "foreign layer":
        options["grad_cam"] = {"saliency_layer": foreign}
        error = ValueError
    else:
        names.append("excitation_backprop")
        options["excitation_backprop"] = {"saliency_layer": "nowhere"}
        error = ValueError
    with pytest.raises(error):
        explain(model, x, target, names, options)
    model.armed = False
    assert_same_state(before, snapshot(model, x))


def test_the_graph_is_freed(nets):
    import gc
    import weakref
    model, x, target, _ = nets["convnet"]
    out = explain(model, x, target)
    refs = [weakref.ref(t) for t in out.values()]
    assert all(not t.requires_grad and t.grad_fn is None for t in out.values())
    del out
    gc.collect()
    assert all(r() is None for r in refs)
    assert hook_counts(model) == {}


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_method_lists_the_known_ones(nets):
    model, x, target, _ = nets["convnet"]
    with pytest.raises(ValueError, match="unknown attribution method 'gradcam'.*grad_cam"):
        explain(model, x, target, ["gradient", "gradcam"])


def test_unknown_option_names_the_methods_options(nets):
    model, x, target, _ = nets["convnet"]
    with pytest.raises(ValueError, match="grad_cam has no option 'layer'.*saliency_layer"):
        explain(model, x, target, ["grad_cam"], {"grad_cam": {"layer": "features.3"}})
    with pytest.raises(ValueError, match="guided_backprop has no option 'context_builder'"):
        explain(model, x, target, ["guided_backprop"],
                {"guided_backprop": {"context_builder": None}})
    with pytest.raises(ValueError, match="rise has no option 'saliency_layer'"):
        explain(model, x, target, ["rise"], {"rise": {"saliency_layer": "features.3"}})


def test_options_for_a_method_not_asked_for(nets):
    model, x, target, _ = nets["convnet"]
    with pytest.raises(ValueError, match="options given for 'grad_cam'.*not among the methods"):
        explain(model, x, target, ["gradient"], {"grad_cam": {"resize": True}})


def test_debug_is_refused(nets):
    model, x, target, _ = nets["convnet"]
    with pytest.raises(ValueError, match="debug.*maps only"):
        explain(model, x, target, ["gradient"], {"gradient": {"debug": True}})


def test_duplicates_and_empty_lists(nets):
    model, x, target, _ = nets["convnet"]
    with pytest.raises(ValueError, match="listed twice.*mapping"):
        explain(model, x, target, ["gradient", "gradient"])
    with pytest.raises(ValueError, match="empty"):
        explain(model, x, target, [])
    with pytest.raises(ValueError, match="smooth"):
        explain(model, x, target, ["gradient"], {"gradient": {"smooth": -1}})


def test_a_single_method_name(nets):
    model, x, target, _ = nets["convnet"]
    assert_equal_maps(explain(model, x, target, "grad_cam"),
                      {"grad_cam": METHODS["grad_cam"](model, x, target)})


class GeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(F.gelu(self.conv(x)).flatten(1))


def test_a_model_without_relu():
    model = GeluNet().eval()
    x = torch.randn(2, 3, 6, 6)
    names = {m: m for m in ("gradient", "grad_cam", "linear_approx")}
    options = {"grad_cam": {"saliency_layer": "conv"}}
    # The plain-rule methods need no rule context: they work without ReLUs ...
    assert_equal_maps(explain(model, x, 1, names, options),
                      separate(model, x, 1, names, options))
    # ... and a rule method refuses, as its own function does.
    with pytest.raises(ValueError, match="replaced no ReLU"):
        METHODS["guided_backprop"](model, x, 1)
    with pytest.raises(ValueError, match="replaced no ReLU"):
        explain(model, x, 1, ["gradient", "guided_backprop"])
    assert hook_counts(model) == {}


def test_the_target_scores_must_depend_on_the_layer():
    from .conftest import TwoBranch
    model = TwoBranch().eval()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="depend on"):
        METHODS["grad_cam"](model, x, 0, saliency_layer="unused")
    with pytest.raises(ValueError, match="do not depend on"):
        explain(model, x, 0, ["gradient", "grad_cam"], {"grad_cam": {"saliency_layer": "unused"}})
    assert hook_counts(model) == {}


# ---------------------------------------------------------------------------------------------
# One path: explain raises and warns exactly as the methods do (issue: methods as data)


class ReluOffPath(nn.Module):
    """The only ReLU acts on a branch the target does not use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        self.unused = F.relu(self.side(x))  # computed, never reaches the output
        return self.fc(self.conv(x).flatten(1))


class NanBackward(nn.Module):
    """Finite scores whose DeConvNet backward meets 0 × inf (sqrt at 0 under the rule)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.fc(torch.sqrt(h).flatten(1))


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet", "guided_grad_cam"])
def test_explain_refuses_a_rule_method_whose_relus_are_off_the_path(name):
    model = ReluOffPath().eval()
    x = torch.randn(2, 3, 6, 6)
    options = {"guided_grad_cam": {"saliency_layer": "conv"}} if name == "guided_grad_cam" else {}
    with pytest.raises(ValueError, match="none of them lies between") as alone:
        METHODS[name](model, x, 1, **options.get(name, {}))
    with pytest.raises(ValueError, match="none of them lies between") as shared:
        explain(model, x, 1, ["gradient", name], options)
    # The method's own message, then which methods of the call need the rules.
    assert str(shared.value) == (f"{alone.value} (so do {name} in this call; the other methods "
                                 "need no rule: ask for them alone, methods=['gradient'])")
    # The plain gradient of the same model works in both.
    assert torch.equal(explain(model, x, 1, ["gradient"])["gradient"],
                       METHODS["gradient"](model, x, 1))
    assert hook_counts(model) == {}


def test_explain_refuses_a_non_finite_gradient_as_the_method_does():
    model = NanBackward().eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="not finite") as alone:
        METHODS["deconvnet"](model, x, 1)
    with pytest.raises(ValueError, match="not finite") as shared:
        explain(model, x, 1, ["guided_backprop", "deconvnet"])
    assert "gradient with respect to the input is not finite" in str(shared.value)
    assert str(alone.value) == str(shared.value)


def test_explain_checks_each_rule_reading_on_its_own():
    # guided backprop read at the input (ReLUs on the path) and at a layer above every ReLU:
    # alone, the layer reading raises; in one shared pass it must raise too, although the
    # input reading went through the ReLUs.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match="none of them lies between"):
        METHODS["guided_backprop"](model, x, 0, saliency_layer="2")
    names = {"at_input": "guided_backprop", "above": "guided_backprop"}
    with pytest.raises(ValueError, match="none of them lies between"):
        explain(model, x, 0, names, {"above": {"saliency_layer": "2"}})


@pytest.mark.parametrize("methods,options,error,match", [
    (None, None, TypeError, "methods must be a method name"),
    (42, None, TypeError, "methods must be a method name"),
    (["gradient"], {"gradient": 3}, TypeError, r"options\['gradient'\] must be a dict"),
    (["gradient"], [("gradient", {})], TypeError, "options must be a mapping"),
])
def test_malformed_methods_and_options_are_clear_errors(nets, methods, options, error, match):
    model, x, target, _ = nets["convnet"]
    with pytest.raises(error, match=match):
        explain(model, x, target, methods, options)


def test_a_new_backprop_method_is_one_description():
    """A throw-away method — |gradient| summed over channels — defined as one description and
    one function: it runs alone and inside explain's shared pass, with the same map."""
    from torchray_like.attribution.engine import Job, run_jobs
    from torchray_like.attribution.method import BackpropMethod, Read, description

    def l1_flatten(x):
        return x.grad.abs().sum(1, keepdim=True)

    spec = BackpropMethod(name="l1_gradient", reads=(Read(),), module=__name__,
                          doc="L1 gradient.", gradient_to_saliency=l1_flatten)
    l1_gradient = spec.function()
    assert description(l1_gradient) is spec
    model, x, target, _ = make_torchvision("resnet18"), torch.randn(1, 3, 32, 32), [3], None
    alone = l1_gradient(model, x, target)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.eval()(xx)[0, 3], xx)
    torch.testing.assert_close(alone, g.abs().sum(1, keepdim=True))
    shared = run_jobs(model, x, target, [Job("l1", spec, {}),
                                         Job("grad", description(METHODS["gradient"]), {})])
    assert torch.equal(shared["l1"][0], alone)
    assert torch.equal(shared["grad"][0], METHODS["gradient"](model, x, target))


def test_default_explain_on_a_model_without_relu_says_which_methods_to_drop():
    # Before: the default call on any GELU/SiLU model (ViT, ConvNeXt, EfficientNet) ended in
    # guided backprop's own "replaced no ReLU", naming none of the methods it had not asked for.
    from torchray_like.attribution.context import NoRuleAppliedError
    model, x = GeluNet().eval(), torch.randn(2, 3, 6, 6)
    with pytest.raises(NoRuleAppliedError) as info:
        explain(model, x, 1)
    message = str(info.value)
    assert message.startswith("GuidedBackpropContext replaced no ReLU in GeluNet's forward pass")
    assert "(so do guided_backprop, deconvnet, guided_grad_cam in this call;" in message
    asked = ast.literal_eval(message.split("methods=")[1][:-1])  # the list it suggests
    assert "guided_backprop" not in asked and "gradient" in asked
    got = explain(model, x, 1, asked)
    assert torch.equal(got["grad_cam"], METHODS["grad_cam"](model, x, 1))
    # Labels that are not method names are suggested as the mapping they were given in.
    with pytest.raises(NoRuleAppliedError, match=r"methods=\{'g': 'gradient'\}"):
        explain(model, x, 1, {"g": "gradient", "gb": "guided_backprop"})
    assert isinstance(info.value, ValueError)
