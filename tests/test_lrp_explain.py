"""explain() with several LRP composites: one forward pass, one backward pass per composite, each
map bit for bit its function's; LRPContext.composite switched between backward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from torchray_like.attribution.explain import explain
from torchray_like.attribution.lrp import LRP_METHODS, LRPContext, shared_lrp_jobs
from torchray_like.attribution.lrp_composites import epsilon_gamma_box
from torchray_like.attribution.lrp_rules import Epsilon, Flat, Gamma, ZPlus
from torchray_like.attribution.registry import METHODS

COMPOSITES = list(LRP_METHODS)  # lrp, lrp_epsilon_plus, ..._flat, ..._alpha2_beta1, ..._gamma_box


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    with torch.no_grad():  # non-trivial running statistics, so that the fold matters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


class Counter:
    """Counts the model's forward calls with a forward hook."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.calls += 1


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 8)


def separate(model, x, target, methods, options=None):
    options = options or {}
    return {label: METHODS[name](model, x, target, **options.get(label, {}))
            for label, name in methods.items()}


def test_all_composites_equal_separate_calls_with_one_forward(x):
    model = conv_bn_net()
    counter = Counter(model)
    maps = explain(model, x, [1, 3], COMPOSITES)
    assert counter.calls == 1
    alone = separate(model, x, [1, 3], {n: n for n in COMPOSITES})
    assert counter.calls == 1 + len(COMPOSITES)
    assert list(maps) == COMPOSITES
    for name in COMPOSITES:
        assert maps[name].shape == (2, 1, 8, 8) and maps[name].dtype == torch.float32
        assert torch.equal(maps[name], alone[name]), name
    # The composites differ: a shared pass that ignored the switch would give equal maps.
    assert not torch.equal(maps["lrp_epsilon_plus"], maps["lrp_epsilon_alpha2_beta1"])
    assert not torch.equal(maps["lrp"], maps["lrp_epsilon_gamma_box"])
    counter.handle.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_gamma_box_bounds_per_sample_and_per_channel_and_user_composites(x):
    model = conv_bn_net()
    low, high = x.amin(dim=(0, 2, 3)).reshape(1, 3, 1, 1), x.amax(dim=(0, 2, 3)).reshape(
        1, 3, 1, 1)
    # A user mapping: a layer name, a module type (the running module is tracked) and a kind.
    user = {"3": Gamma(0.5), nn.Linear: Epsilon(0.1), "conv": ZPlus(), "first": Flat()}
    methods = {"box_sample": "lrp_epsilon_gamma_box", "box_channel": "lrp_epsilon_gamma_box",
               "user": "lrp", "plus": "lrp_epsilon_plus"}
    options = {"box_channel": {"composite": epsilon_gamma_box(low, high)},
               "user": {"composite": user}}
    counter = Counter(model)
    maps = explain(model, x, 2, methods, options)
    assert counter.calls == 1
    alone = separate(model, x, 2, methods, options)
    for label in methods:
        assert torch.equal(maps[label], alone[label]), label
    assert not torch.equal(maps["box_sample"], maps["box_channel"])
    assert not torch.equal(maps["user"], maps["plus"])


def test_saliency_layer_readings_and_resize(x):
    model = conv_bn_net()
    methods = {"a": "lrp_epsilon_plus", "b": "lrp_epsilon_alpha2_beta1", "c": "lrp",
               "d": "lrp_epsilon_plus"}
    options = {"a": {"saliency_layer": "1"}, "b": {"saliency_layer": "1", "resize": (16, 16)},
               "d": {"saliency_layer": "3", "smooth": 0.1}}
    counter = Counter(model)
    maps = explain(model, x, [0, 4], methods, options)
    assert counter.calls == 1
    alone = separate(model, x, [0, 4], methods, options)
    assert maps["b"].shape == (2, 1, 16, 16) and maps["d"].shape == (2, 1, 8, 8)
    for label in methods:
        assert torch.equal(maps[label], alone[label]), label


def test_resnet_with_batch_norm_folded():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    names = ["lrp_epsilon_plus", "lrp_epsilon_alpha2_beta1", "lrp_epsilon_gamma_box"]
    counter = Counter(model)
    maps = explain(model, x, 3, names)
    assert counter.calls == 1
    for name in names:
        assert torch.equal(maps[name], METHODS[name](model, x, 3)), name


def test_with_shared_gradient_methods_and_a_call_that_runs_alone(x):
    model = conv_bn_net()
    methods = {"g": "gradient", "p": "lrp_epsilon_plus", "f": "lrp", "own": "lrp_epsilon_plus"}
    seed = {"own": {"get_backward_gradient": lambda y, t: torch.ones_like(y) * 0 +
                    torch.nn.functional.one_hot(torch.tensor([t, t]), y.shape[1]).to(y)}}
    counter = Counter(model)
    maps = explain(model, x, 2, methods, seed)
    assert counter.calls == 3  # gradient's pass, the two LRP composites' pass, 'own' alone
    alone = separate(model, x, 2, methods, seed)
    for label in methods:
        assert torch.equal(maps[label], alone[label]), label


def test_bad_composites_fail_before_any_forward(x):
    model = conv_bn_net()
    counter = Counter(model)
    with pytest.raises(ValueError, match="unknown LRP composite 'Nope'"):
        explain(model, x, 1, {"a": "lrp", "b": "lrp"}, {"b": {"composite": "Nope"}})
    with pytest.raises(ValueError, match="names layers 'features.9'"):
        explain(model, x, 1, {"a": "lrp", "b": "lrp"},
                {"b": {"composite": {"features.9": ZPlus()}}})
    with pytest.raises(TypeError, match="must be an LRP rule"):
        explain(model, x, 1, {"a": "lrp", "b": "lrp"}, {"b": {"composite": {"conv": 3}}})
    assert counter.calls == 0


def test_context_rule_switch_equals_separate_contexts(x):
    model = conv_bn_net()
    inp = x.clone().requires_grad_()
    with LRPContext("EpsilonPlus", model=model, track_modules=True) as ctx:  # (ignored)
        y = model(inp)
    (g_plus,) = torch.autograd.grad(y[:, 1].sum(), inp, retain_graph=True)
    assert ctx.rules[0] == ("conv", "zplus")
    ctx.composite = {nn.Conv2d: Gamma(0.25), "first": Flat()}
    assert ctx.rules[0] == ("conv", "flat") and ctx.rules[1] == ("conv", "gamma")
    (g_user,) = torch.autograd.grad(y[:, 1].sum(), inp)
    for spec, grad in (("EpsilonPlus", g_plus), ({nn.Conv2d: Gamma(0.25), "first": Flat()},
                                                 g_user)):
        inp2 = x.clone().requires_grad_()
        with LRPContext(spec, model=model):
            (ref,) = torch.autograd.grad(model(inp2)[:, 1].sum(), inp2)
        assert torch.equal(grad, ref)


def test_switching_to_a_module_composite_needs_no_tracking_flag(x):
    """The running modules are always recorded: a block begun with a composite that selects
    by kind switches to one that selects by module type after the forward pass, with the
    numbers of a block begun with it; an unknown composite is still refused."""
    model = conv_bn_net()
    inp = x.clone().requires_grad_()
    user = {nn.Conv2d: Gamma(0.25), "first": Flat()}
    with LRPContext("EpsilonPlus", model=model) as ctx:
        y = model(inp)
    ctx.composite = user
    assert ctx.rules[0] == ("conv", "flat") and ctx.rules[1] == ("conv", "gamma")
    (got,) = torch.autograd.grad(y[:, 1].sum(), inp)
    inp2 = x.clone().requires_grad_()
    with LRPContext(user, model=model):
        (want,) = torch.autograd.grad(model(inp2)[:, 1].sum(), inp2)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="unknown LRP composite"):
        ctx.composite = "Nope"
    assert ctx.composite.rules[0][0] is nn.Conv2d  # unchanged after a refused assignment


def test_shared_lrp_jobs_selects_only_lrp_calls_with_shared_options():
    model = conv_bn_net()
    calls = [("a", METHODS["lrp"], {}), ("b", METHODS["gradient"], {}),
             ("c", METHODS["lrp_epsilon_plus"], {"get_backward_gradient": None}),
             ("d", METHODS["lrp_epsilon_plus"], {"composite": "EpsilonAlpha2Beta1"})]
    jobs = shared_lrp_jobs(model, calls)
    assert list(jobs) == ["a", "d"]
    assert jobs["d"].reads == [] and "composite" not in jobs["d"].options
    assert jobs["d"].method.reads[0].rule.name == "EpsilonAlpha2Beta1"
    assert shared_lrp_jobs(object(), calls) == {}  # type: ignore[arg-type]


def test_switch_rule_protocol_and_contexts_without_a_switchable_rule(x):
    from torchray_like.attribution.context import RuleContext
    from torchray_like.attribution.guided_backprop import GuidedBackpropContext
    from torchray_like.attribution.rules import GRADIENT_RULE, ReLUContext

    with pytest.raises(TypeError, match="RuleContext cannot switch its rule"):
        RuleContext().switch_rule(GRADIENT_RULE)
    guided = GuidedBackpropContext()
    guided.switch_rule(GRADIENT_RULE)
    assert guided.rule is GRADIENT_RULE
    ctx = LRPContext("EpsilonPlus")
    ctx.switch_rule("EpsilonAlpha2Beta1")
    assert ctx.composite.name == "EpsilonAlpha2Beta1" and ctx.rules == []
    with pytest.raises(TypeError, match="only a ReLURule"):
        ReLUContext(GRADIENT_RULE).switch_rule("EpsilonPlus")  # type: ignore[arg-type]
