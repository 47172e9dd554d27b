"""Rule contexts: every ReLU form, reference rules, threads, nesting, exceptions, counting."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchray_like.attribution.common import (
    GRADIENT_RULE,
    NoRuleAppliedWarning,
    ReLUContext,
    UnhandledActivationWarning,
    gradient_to_saliency,
)
from torchray_like.attribution.deconvnet import DECONVNET_RULE, DeConvNetContext, deconvnet
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import (
    GUIDED_BACKPROP_RULE,
    GuidedBackpropContext,
    guided_backprop,
)

from .conftest import RefDeconvReLU, RefGuidedReLU

SETTINGS = settings(max_examples=40, deadline=None)

# Every way a model can call a rectifier; the bool says whether it is bounded at 6.
FORMS = {
    "nn.ReLU": (lambda: nn.ReLU(), False),
    "nn.ReLU(inplace)": (lambda: nn.ReLU(inplace=True), False),
    "F.relu": (lambda: (lambda x: F.relu(x)), False),
    "F.relu(inplace)": (lambda: (lambda x: F.relu(x, inplace=True)), False),
    "F.relu_": (lambda: (lambda x: F.relu_(x)), False),
    "torch.relu": (lambda: (lambda x: torch.relu(x)), False),
    "torch.relu_": (lambda: (lambda x: torch.relu_(x)), False),
    "Tensor.relu": (lambda: (lambda x: x.relu()), False),
    "Tensor.relu_": (lambda: (lambda x: x.relu_()), False),
    "Tensor.relu_ side effect": (lambda: (lambda x: (x.relu_(), x)[1]), False),
    "nn.ReLU6": (lambda: nn.ReLU6(), True),
    "nn.ReLU6(inplace)": (lambda: nn.ReLU6(inplace=True), True),
    "F.relu6": (lambda: (lambda x: F.relu6(x)), True),
    "F.relu6(inplace)": (lambda: (lambda x: F.relu6(x, inplace=True)), True),
    "F.hardtanh(0,6)": (lambda: (lambda x: F.hardtanh(x, 0.0, 6.0)), True),
    # Rectifiers written another way (mathematically ReLUs, or bounded like ReLU6).
    "Tensor.clamp(min=0)": (lambda: (lambda x: x.clamp(min=0)), False),
    "torch.clamp(x, 0)": (lambda: (lambda x: torch.clamp(x, 0)), False),
    "torch.clamp(x, min=0.0)": (lambda: (lambda x: torch.clamp(x, min=0.0)), False),
    "Tensor.clamp_(min=0)": (lambda: (lambda x: x.clamp_(min=0)), False),
    "torch.clip(x, min=0)": (lambda: (lambda x: torch.clip(x, min=0)), False),
    "torch.clamp_min(x, 0)": (lambda: (lambda x: torch.clamp_min(x, 0)), False),
    "Tensor.clamp_min_(0)": (lambda: (lambda x: x.clamp_min_(0)), False),
    "torch.clamp(x, 0, 6)": (lambda: (lambda x: torch.clamp(x, 0, 6)), True),
    "Tensor.clip(0, 6.0)": (lambda: (lambda x: x.clip(0, 6.0)), True),
    "F.threshold(x, 0, 0)": (lambda: (lambda x: F.threshold(x, 0, 0)), False),
    "nn.Threshold(0, 0)": (lambda: nn.Threshold(0.0, 0.0), False),
    "nn.Threshold(0, 0, inplace)": (lambda: nn.Threshold(0.0, 0.0, inplace=True), False),
    "torch.where(x > 0, x, 0)": (lambda: (lambda x: torch.where(x > 0, x, 0.0)), False),
    "torch.where(x >= 0, x, zeros)": (
        lambda: (lambda x: torch.where(x >= 0, x, torch.zeros_like(x))), False),
    "Tensor.where(0 < x, 0)": (lambda: (lambda x: x.where(0 < x, 0.0)), False),
    "torch.where(x <= 0, 0, x)": (lambda: (lambda x: torch.where(x <= 0, 0.0, x)), False),
    "torch.maximum(x, zeros)": (lambda: (lambda x: torch.maximum(x, torch.zeros_like(x))),
                                False),
    "Tensor.maximum(scalar zero)": (
        lambda: (lambda x: x.maximum(torch.zeros((), dtype=x.dtype))), False),
    "torch.max(zeros, x)": (lambda: (lambda x: torch.max(torch.zeros_like(x), x)), False),
    "torch.ops.aten.relu": (lambda: (lambda x: torch.ops.aten.relu(x)), False),
    "torch.ops.aten.relu_.default": (lambda: (lambda x: torch.ops.aten.relu_.default(x)), False),
}


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class TinyNet(nn.Module):
    """conv → act → conv → act → linear; activations chosen per test."""

    def __init__(self, act1, act2, scale=1.0):
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 6 * 6, 4)
        self.act1 = act1 if isinstance(act1, nn.Module) else Act(act1)
        self.act2 = act2 if isinstance(act2, nn.Module) else Act(act2)
        self.scale = scale

    def forward(self, x):
        x = self.act1(self.conv1(x) * self.scale)
        x = self.act2(self.conv2(x) * self.scale)
        return self.fc(x.flatten(1))


def make_pair(form, function_class):
    build, bounded = FORMS[form]
    # Scale activations so that ReLU6 saturates on part of the map.
    scale = 8.0 if bounded else 1.0
    net = TinyNet(build(), build(), scale).double()
    upper = 6.0 if bounded else None
    ref = TinyNet(lambda x: function_class.apply(x, upper),
                  lambda x: function_class.apply(x, upper), scale).double()
    ref.load_state_dict(net.state_dict())
    return net, ref


def reference_grad(ref, x, target):
    xx = x.clone().requires_grad_(True)
    y = ref(xx)
    (g,) = torch.autograd.grad(y[:, target].sum(), xx)
    return g


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("method,context,function_class", [
    ("guided", GuidedBackpropContext, RefGuidedReLU),
    ("deconvnet", DeConvNetContext, RefDeconvReLU),
])
def test_rule_matches_reference_for_every_relu_form(form, method, context, function_class):
    net, ref = make_pair(form, function_class)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = 2
    expected = reference_grad(ref, x, target)

    xx = x.clone().requires_grad_(True)
    with torch.no_grad():
        plain_out = net(x.clone())
    with context() as ctx:
        out = net(xx)
    # Forward values are exactly the plain model's.
    assert torch.equal(out, plain_out)
    assert ctx.replaced == 2, ctx.counts
    (g,) = torch.autograd.grad(out[:, target].sum(), xx)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)

    # The rule matters: it differs from the plain gradient on this net.
    xp = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(net(xp)[:, target].sum(), xp)
    assert not torch.allclose(g, plain)

    # And the one-call wrapper gives the flattened reference map.
    wrapper = guided_backprop if method == "guided" else deconvnet
    smap = wrapper(net, x, target)
    torch.testing.assert_close(smap, expected.abs().amax(1, keepdim=True), rtol=1e-12,
                               atol=1e-12)


def test_relu6_rule_masks_the_saturated_side():
    # A single ReLU6 on a vector: the guided signal is p⁺ on 0 < x < 6 only.
    x = torch.tensor([-1.0, 0.5, 3.0, 7.0, 2.0], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([1.0, 1.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    with GuidedBackpropContext():
        y = F.relu6(x)
    (g,) = torch.autograd.grad(y, x, p)
    assert g.tolist() == [0.0, 1.0, 0.0, 0.0, 2.0]
    with DeConvNetContext():
        y = F.relu6(x)
    (g,) = torch.autograd.grad(y, x, p)
    # DeConvNet ignores the sign of x but the clamp at 6 keeps masking.
    assert g.tolist() == [1.0, 1.0, 0.0, 0.0, 2.0]
    with ReLUContext(GRADIENT_RULE):
        y = F.relu6(x)
    (g,) = torch.autograd.grad(y, x, p)
    assert g.tolist() == [0.0, 1.0, -1.0, 0.0, 2.0]


def test_plain_gradient_matches_finite_differences():
    net = TinyNet(nn.ReLU(), lambda x: F.relu(x)).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, info = gradient(net, x, 1, debug=True)
    eps = 1e-6
    flat = x.flatten()
    fd = torch.empty_like(flat)
    with torch.no_grad():
        for i in range(flat.numel()):
            e = torch.zeros_like(flat)
            e[i] = eps
            fd[i] = (net((flat + e).view_as(x))[0, 1]
                     - net((flat - e).view_as(x))[0, 1]) / (2 * eps)
    torch.testing.assert_close(info.gradient.flatten(), fd, rtol=1e-5, atol=1e-7)


def test_gradient_rule_context_equals_plain_gradient():
    net = TinyNet(nn.ReLU(inplace=True), lambda x: x.relu()).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    plain = gradient(net, x, 0)
    with_rule = gradient(net, x, 0, context_builder=lambda: ReLUContext(GRADIENT_RULE))
    torch.testing.assert_close(with_rule, plain, rtol=0, atol=0)


def test_user_function_class_is_accepted_torchray_style():
    class MyGuided(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp(min=0)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x > 0) * (g > 0)

    for form in ("nn.ReLU(inplace)", "F.relu", "Tensor.relu_ side effect", "nn.ReLU6(inplace)"):
        net, ref = make_pair(form, RefGuidedReLU)
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        xx = x.clone().requires_grad_(True)
        with ReLUContext(MyGuided) as ctx:
            y = net(xx)
        assert ctx.counts and ctx.rule is MyGuided
        (g,) = torch.autograd.grad(y[:, 1].sum(), xx)
        torch.testing.assert_close(g, reference_grad(ref, x, 1), rtol=1e-12, atol=1e-12)


def test_context_rejects_bad_rules():
    with pytest.raises(TypeError, match="function_class must be a ReLURule"):
        ReLUContext(lambda x: x)
    with pytest.raises(TypeError, match="only a ReLURule"):
        ReLUContext(GRADIENT_RULE).rule = "guided"


def test_rule_can_be_switched_between_backward_passes_of_one_forward():
    net = TinyNet(nn.ReLU(), nn.ReLU(inplace=True)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    ctx = ReLUContext(GRADIENT_RULE)
    with ctx:
        y = net(x)
    grads = {}
    for rule in (GRADIENT_RULE, GUIDED_BACKPROP_RULE, DECONVNET_RULE):
        ctx.rule = rule
        (grads[rule.name],) = torch.autograd.grad(y[:, 0].sum(), x, retain_graph=True)
    for name, wrapper in (("gradient", gradient), ("guided_backprop", guided_backprop),
                          ("deconvnet", deconvnet)):
        torch.testing.assert_close(gradient_to_saliency_of(grads[name]), wrapper(net, x, 0),
                                   rtol=0, atol=0)


def gradient_to_saliency_of(g):
    holder = torch.zeros_like(g)
    holder.grad = g
    return gradient_to_saliency(holder)


def test_backward_outside_the_block_still_uses_the_rule():
    net, ref = make_pair("nn.ReLU(inplace)", RefGuidedReLU)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    with GuidedBackpropContext():
        y = net(x)
    y[0, 3].backward()
    torch.testing.assert_close(x.grad, reference_grad(ref, x.detach(), 3))


def test_torchray_documented_usage_with_backward_inside():
    net, ref = make_pair("F.relu", RefGuidedReLU)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    x.requires_grad_(True)
    with GuidedBackpropContext():
        y = net(x)
        z = y[0, 1]
        z.backward()
    smap = gradient_to_saliency(x)
    assert smap.shape == (1, 1, 6, 6)
    torch.testing.assert_close(x.grad, reference_grad(ref, x.detach(), 1))
    # Weights got their (guided) gradients too, as with plain backward.
    assert net.conv1.weight.grad is not None


def test_contexts_nest_and_the_innermost_wins():
    x = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
    p = torch.tensor([1.0, -1.0, 1.0])
    depth = torch._C._len_torch_function_stack()
    with DeConvNetContext() as outer:
        with GuidedBackpropContext() as inner:
            assert torch._C._len_torch_function_stack() == depth + 2
            y_inner = torch.relu(x)
        y_outer = torch.relu(x)
    assert torch._C._len_torch_function_stack() == depth
    assert inner.counts == {"relu": 1} and outer.counts == {"relu": 1}
    (g,) = torch.autograd.grad(y_inner, x, p)
    assert g.tolist() == [0.0, 0.0, 1.0]  # guided
    (g,) = torch.autograd.grad(y_outer, x, p)
    assert g.tolist() == [1.0, 0.0, 1.0]  # deconvnet


def test_same_context_object_cannot_be_entered_twice():
    ctx = GuidedBackpropContext()
    depth = torch._C._len_torch_function_stack()
    with ctx:
        with pytest.raises(RuntimeError, match="already active"):
            with ctx:
                pass
        assert torch._C._len_torch_function_stack() == depth + 1
    assert torch._C._len_torch_function_stack() == depth
    with ctx:  # reusable once left
        pass


class Boom(RuntimeError):
    pass


class RaisingNet(nn.Module):
    def forward(self, x):
        x = F.relu(x)
        raise Boom("inside the model")


def test_context_is_removed_when_the_model_raises():
    depth = torch._C._len_torch_function_stack()
    ctx = GuidedBackpropContext()
    with pytest.raises(Boom):
        with ctx:
            RaisingNet()(torch.randn(3, requires_grad=True))
    assert torch._C._len_torch_function_stack() == depth
    # ReLU is plain again.
    x = torch.tensor([1.0, -1.0], requires_grad=True)
    (g,) = torch.autograd.grad(torch.relu(x), x, torch.tensor([-1.0, 1.0]))
    assert g.tolist() == [-1.0, 0.0]
    with ctx:  # and the context can be used again
        pass


def test_thread_isolation():
    """While one thread is inside a guided context, another thread's gradient is plain."""
    net = TinyNet(nn.ReLU(), lambda x: F.relu(x)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def plain_grad():
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xx)[:, 0].sum(), xx)
        return g

    expected = plain_grad()
    inside, done = threading.Event(), threading.Event()
    results = {}

    def guided_thread():
        with GuidedBackpropContext() as ctx:
            inside.set()
            done.wait(10)
            xx = x.clone().requires_grad_(True)
            y = net(xx)
        (results["guided"],) = torch.autograd.grad(y[:, 0].sum(), xx)
        results["count"] = ctx.replaced

    t = threading.Thread(target=guided_thread)
    t.start()
    assert inside.wait(10)
    try:
        results["plain"] = plain_grad()
    finally:
        done.set()
        t.join(10)
    torch.testing.assert_close(results["plain"], expected, rtol=0, atol=0)
    assert results["count"] == 2
    assert not torch.allclose(results["guided"], expected)


def test_unused_context_warns_and_wrappers_raise():
    gelu_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(1, 3, 8, 8)
    gelu_net(x)  # materialise the lazy layer
    with pytest.warns(NoRuleAppliedWarning, match="replaced no ReLU"):
        with GuidedBackpropContext():
            gelu_net(x)
    with pytest.raises(ValueError, match="replaced no ReLU.*uses gelu"):
        guided_backprop(gelu_net, x, 0)
    with pytest.raises(ValueError, match="replaced no ReLU"):
        deconvnet(gelu_net, x, 0)


def test_partly_covered_model_warns_about_other_activations():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.SiLU(),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UnhandledActivationWarning, match="silu ×1"):
        with GuidedBackpropContext():
            net(x)
    with pytest.warns(UnhandledActivationWarning, match="silu"):
        guided_backprop(net, x, 0)


def test_no_warning_when_rule_applied_and_nothing_else():
    net = TinyNet(nn.ReLU(), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GuidedBackpropContext() as ctx:
            net(torch.randn(1, 3, 6, 6))
    assert ctx.counts == {"relu": 2}


def test_no_grad_forward_inside_context_is_plain_and_skipped():
    """Under no_grad nothing can be differentiated: calls are plain, listed as skipped, and the
    context says that it replaced nothing."""
    net = TinyNet(nn.ReLU(inplace=True), nn.ReLU6())
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        expected = net(x)
        with pytest.warns(NoRuleAppliedWarning, match="not recorded by autograd"):
            with GuidedBackpropContext() as ctx:
                out = net(x)
    assert torch.equal(out, expected)
    assert ctx.counts == {} and ctx.skipped == {"relu": 1, "relu6": 1}


def test_hardtanh_that_is_not_a_rectifier_is_left_alone():
    x = torch.tensor([-2.0, 0.5, 2.0], requires_grad=True)
    with pytest.warns(NoRuleAppliedWarning):
        with GuidedBackpropContext() as ctx:
            y = F.hardtanh(x)  # [-1, 1]: not a rectifier
    assert ctx.replaced == 0
    (g,) = torch.autograd.grad(y, x, torch.tensor([-1.0, -1.0, -1.0]))
    assert g.tolist() == [0.0, -1.0, 0.0]


@SETTINGS
@given(values=st.lists(st.floats(-10, 10), min_size=1, max_size=20), data=st.data())
def test_rectifier_rules_elementwise(values, data):
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    p = torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=len(values),
                                        max_size=len(values))), dtype=torch.float64)
    with GuidedBackpropContext():
        y = torch.relu(x)
    (g,) = torch.autograd.grad(y, x, p)
    expected = [pi if (xi > 0 and pi > 0) else 0.0 for xi, pi in zip(values, p.tolist())]
    assert g.tolist() == expected
    assert torch.equal(y, x.detach().clamp(min=0))
    with DeConvNetContext():
        y = torch.relu(x)
    (g,) = torch.autograd.grad(y, x, p)
    assert g.tolist() == [max(pi, 0.0) for pi in p.tolist()]


# Look-alikes that are no rectifier at zero, and non-linearities the ReLU rules do not cover:
# they keep their plain gradient and are named in an UnhandledActivationWarning.
LOOKALIKES = {
    "nn.Hardtanh()": (lambda: nn.Hardtanh(), r"hardtanh\(-1, 1\)"),
    "F.hardtanh(x, -2, 2)": (lambda: (lambda x: F.hardtanh(x, -2.0, 2.0)), r"hardtanh\(-2, 2\)"),
    "F.threshold(x, 0.5, 0)": (lambda: (lambda x: F.threshold(x, 0.5, 0.0)), "threshold"),
    "nn.Threshold(0.1, 20)": (lambda: nn.Threshold(0.1, 20.0), "threshold"),
    "nn.Hardshrink": (lambda: nn.Hardshrink(), "hardshrink"),
    "F.softshrink": (lambda: (lambda x: F.softshrink(x)), "softshrink"),
    "nn.Tanhshrink": (lambda: nn.Tanhshrink(), "tanhshrink"),
    "abs(x)": (lambda: (lambda x: abs(x)), "abs"),
    "torch.abs": (lambda: (lambda x: torch.abs(x)), "abs"),
    "where(mask, x, 0)": (
        lambda: (lambda x: torch.where(torch.ones_like(x, dtype=torch.bool), x, 0.0)), "where"),
    "maximum(x, zero requiring grad)": (
        lambda: (lambda x: torch.maximum(x, torch.zeros((), dtype=x.dtype,
                                                        requires_grad=True))), "maximum"),
    "maximum(x, zeros of a wider dtype)": (
        lambda: (lambda x: torch.maximum(x.float(), torch.zeros_like(x))), "maximum"),
}


@pytest.mark.parametrize("form", list(LOOKALIKES))
def test_lookalikes_and_other_nonlinearities_are_reported(form):
    build, name = LOOKALIKES[form]
    net = TinyNet(nn.ReLU(), build()).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with pytest.warns(UnhandledActivationWarning, match=name):
        with GuidedBackpropContext() as ctx:
            net(x.clone().requires_grad_(True))
    assert ctx.counts == {"relu": 1}
    with pytest.warns(UnhandledActivationWarning, match=name):
        guided_backprop(net, x, 0)


def test_glu_is_reported():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.GLU(dim=1),
                        nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with pytest.warns(UnhandledActivationWarning, match="glu"):
        deconvnet(net, torch.randn(1, 3, 6, 6), 0)


def test_ordinary_clamps_maxima_and_wheres_are_left_alone_silently():
    """clamp(min=eps), a max reduction, where/maximum without a zero operand: no rectifier."""
    def act(x):
        x = x.clamp(min=1e-3) + x.clamp(max=0.5) + x.clamp(-1.0, 1.0)
        x = x + x.max(dim=1, keepdim=True).values + torch.maximum(x, x.flip(-1))
        return torch.where(x > 0.2, x, 0.1 * x) + F.threshold(x, 0.0, 0.0) * 0

    net = TinyNet(nn.ReLU(), act).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GuidedBackpropContext() as ctx:
            net(x)
    assert ctx.counts == {"relu": 1, "threshold": 1} and not ctx.unhandled


def test_where_rectifier_keeps_the_exact_forward_including_nan():
    """The forward of a replaced call is the caller's own expression, NaN handling included."""
    x = torch.tensor([-1.0, float("nan"), 2.0], requires_grad=True)
    with GuidedBackpropContext() as ctx:
        y = torch.where(x > 0, x, 0.0)
        z = x.clamp(min=0)
    assert ctx.counts == {"where": 1, "clamp": 1}
    assert y.tolist() == [0.0, 0.0, 2.0]                    # where drops the NaN
    assert z[0] == 0 and torch.isnan(z[1]) and z[2] == 2    # clamp keeps it


def test_rectifiers_off_the_autograd_path_are_skipped_not_counted():
    """A ReLU on a constant or a frozen parameter cannot change any gradient."""
    frozen = torch.randn(4)
    x = torch.randn(4, requires_grad=True)
    with GuidedBackpropContext() as ctx:
        F.relu(frozen)
        torch.relu(torch.ones(3))
        y = F.relu(x)
    assert ctx.counts == {"relu": 1} and ctx.skipped == {"relu": 2}
    before = ctx.applied
    y.sum().backward()
    assert ctx.applied == before + 1


def test_wrappers_ignore_the_callers_rule_context():
    """A method's own rules decide: gradient inside GuidedBackpropContext is the gradient."""
    from torchray_like.attribution.grad_cam import grad_cam
    from torchray_like.attribution.linear_approx import linear_approx

    net = TinyNet(nn.ReLU(), lambda x: F.relu(x)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = {
        "gradient": gradient(net, x, 1),
        "guided": guided_backprop(net, x, 1),
        "grad_cam": grad_cam(net, x, 1, "conv1"),
        "linear_approx": linear_approx(net, x, 1, "conv1"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GuidedBackpropContext() as outer:
            got = {"gradient": gradient(net, x, 1),
                   "grad_cam": grad_cam(net, x, 1, "conv1"),
                   "linear_approx": linear_approx(net, x, 1, "conv1")}
            with DeConvNetContext() as outer2:
                got["guided"] = guided_backprop(net, x, 1)
            # The contexts work again after the calls.
            y = torch.relu(torch.randn(3, requires_grad=True))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert outer.counts == {"relu": 1} and outer2.calls == 0
    assert y.grad_fn is not None
