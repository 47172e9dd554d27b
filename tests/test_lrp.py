"""Layer-wise relevance propagation: rules against a hand-written matrix-form LRP, conservation,
batch-norm folding, composites, the operation level, uncovered operations, the method's API."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchray_like
from torchray_like.attribution.context import UnhandledActivationWarning
from torchray_like.attribution.explain import explain
from torchray_like.attribution.lrp import LRPContext, RelevanceLostWarning, lrp, lrp_conservation
from torchray_like.attribution.lrp_composites import Composite, make_composite
from torchray_like.attribution.lrp_rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    WSquare,
    ZBox,
    ZPlus,
)
from torchray_like.attribution.registry import METHODS

DT = torch.float64
EPS = 1e-6  # the rules' stabiliser


# ---------------------------------------------------------------------------------------------
# A hand-written LRP in matrix form (independent of the library): dense layers, explicit
# contributions z_ij = x_j w_ij, one formula per rule.
# ---------------------------------------------------------------------------------------------


def dense(op, in_shape, out_bias=True):
    """``(W, b)`` of the affine map ``op`` on inputs of ``in_shape`` (one sample)."""
    n = math.prod(in_shape)
    with torch.no_grad():
        b = op(torch.zeros((1,) + in_shape, dtype=DT)).flatten()
        cols = op(torch.eye(n, dtype=DT).reshape((n,) + in_shape)).reshape(n, -1) - b
    return cols.t(), b


def signed(z, eps):
    """``ε · sign(z)`` (sign(0) = 1) in z's dtype (a where of two numbers would be float32)."""
    e = torch.full_like(z, eps)
    return torch.where(z >= 0, e, -e)


def stab(z):
    return z + signed(z, EPS)


def ref_rule(rule, x, W, b, R, connect=None):
    """Relevance of the inputs ``x`` (vector) of ``W x + b`` given the outputs' ``R``."""
    Z = x[None, :] * W
    pos, neg = Z.clamp(min=0), Z.clamp(max=0)
    if isinstance(rule, Epsilon):
        return (Z / (Z.sum(1) + b + signed(Z.sum(1) + b, rule.epsilon))[:, None]
                * R[:, None]).sum(0)
    if isinstance(rule, ZPlus):
        return (pos / stab(pos.sum(1) + b.clamp(min=0))[:, None] * R[:, None]).sum(0)
    if isinstance(rule, AlphaBeta):
        p = pos / stab(pos.sum(1) + b.clamp(min=0))[:, None]
        q = neg / stab(neg.sum(1) + b.clamp(max=0))[:, None]
        return ((rule.alpha * p - rule.beta * q) * R[:, None]).sum(0)
    if isinstance(rule, Gamma):
        z = Z.sum(1) + b
        up = torch.where((z > 0)[:, None], Z + rule.gamma * pos, Z + rule.gamma * neg)
        bias = torch.where(z > 0, b + rule.gamma * b.clamp(min=0), b + rule.gamma * b.clamp(max=0))
        return (up / stab(up.sum(1) + bias)[:, None] * R[:, None]).sum(0)
    if isinstance(rule, Flat):
        return (connect / stab(connect.sum(1))[:, None] * R[:, None]).sum(0)
    if isinstance(rule, WSquare):
        return (W ** 2 / stab((W ** 2).sum(1) + b ** 2)[:, None] * R[:, None]).sum(0)
    if isinstance(rule, ZBox):
        lo, hi = torch.full_like(x, rule.low), torch.full_like(x, rule.high)
        Zb = Z - lo[None] * W.clamp(min=0) - hi[None] * W.clamp(max=0)
        return (Zb / stab(Zb.sum(1))[:, None] * R[:, None]).sum(0)
    raise AssertionError(rule)


def ref_lrp(layers, x, target, rules):
    """Matrix-form LRP of a chain ``affine (ReLU) affine (ReLU) ... affine``: ``layers`` is a
    list of ``(op, connectivity op or None, relu_after)``; ``rules`` one rule per affine op."""
    acts, mats = [x[0]], []
    for op, ones_op, relu in layers:
        shape = tuple(acts[-1].shape)
        W, b = dense(op, shape)
        connect = None if ones_op is None else dense(ones_op, shape)[0]
        mats.append((W, b, connect, shape))
        z = (W @ acts[-1].flatten() + b).reshape(op(acts[-1][None]).shape[1:])
        acts.append(z.clamp(min=0) if relu else z)
    R = torch.zeros_like(acts[-1].flatten())
    R[target] = acts[-1].flatten()[target]
    for (W, b, connect, shape), a, rule in zip(reversed(mats), reversed(acts[:-1]),
                                               reversed(rules)):
        R = ref_rule(rule, a.flatten(), W, b, R, connect).reshape(shape)
        R = R.flatten()
    return R.reshape(x.shape[1:])


def conv_net(bias=True):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.ReLU(),
                        nn.Conv2d(3, 4, 3, stride=2, bias=bias), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16, 3, bias=bias)).to(DT).eval()
    return net


def conv_layers(net):
    c1, c2, lin = net[0], net[2], net[5]
    ones = lambda conv: (lambda t: F.conv2d(t, torch.ones_like(conv.weight), None,  # noqa: E731
                                            conv.stride, conv.padding))
    return [(c1, ones(c1), True), (c2, ones(c2), True),
            (lambda t: lin(t.flatten(1)), lambda t: t.flatten(1) @ torch.ones_like(lin.weight).t(),
             False)]


def our_relevance(net, x, target, composite):
    with LRPContext(composite, model=net):
        xx = x.clone().requires_grad_()
        y = net(xx)
        (g,) = torch.autograd.grad(y[:, target].sum(), xx)
    return (xx * g).detach()


MIDDLE = [Epsilon(0.0), Epsilon(0.1), ZPlus(), AlphaBeta(2.0, 1.0), AlphaBeta(1.0, 0.0),
          Gamma(0.25)]
FIRST = [Epsilon(1e-6), ZPlus(), Gamma(0.5), Flat(), WSquare(), ZBox(-4.0, 4.0)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("middle", MIDDLE, ids=repr)
def test_rules_equal_matrix_form_lrp_on_a_conv_net(middle, bias):
    net = conv_net(bias)
    torch.manual_seed(2)
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    ours = our_relevance(net, x, 2, {"conv": middle, "linear": Epsilon(1e-6)})
    ref = ref_lrp(conv_layers(net), x, 2, [middle, middle, Epsilon(1e-6)])
    assert ours.shape == (1, 2, 6, 6) and ours.dtype == DT
    torch.testing.assert_close(ours[0], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first", FIRST, ids=repr)
def test_first_layer_rules_equal_matrix_form_lrp(first):
    net = conv_net(bias=True)
    torch.manual_seed(3)
    x = torch.rand(1, 2, 6, 6, dtype=DT) * 4 - 2  # inside ZBox's [-4, 4], no exact zeros
    ours = our_relevance(net, x, 0, {"first": first, "conv": ZPlus(), "linear": Epsilon()})
    ref = ref_lrp(conv_layers(net), x, 0, [first, ZPlus(), Epsilon()])
    torch.testing.assert_close(ours[0], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", MIDDLE[2:], ids=repr)
def test_rules_on_an_mlp_with_signed_inputs(rule):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(DT).eval()
    x = torch.randn(1, 5, dtype=DT)
    ours = our_relevance(net, x, 1, {"linear": rule})
    ref = ref_lrp([(net[0], None, True), (net[2], None, False)], x, 1, [rule, rule])
    torch.testing.assert_close(ours[0], ref, rtol=1e-9, atol=1e-12)


def test_lrp0_is_gradient_times_input_through_bn_pool_and_residual_sums():
    torch.manual_seed(5)

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
            self.head = nn.Linear(3, 4)

        def forward(self, x):
            out = F.relu(self.bn(self.conv(x)))
            out = F.max_pool2d(out + x, 2)
            return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))

    net = Res().to(DT).eval()
    net.bn.running_mean.normal_()
    net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    ours = our_relevance(net, x, 3, {"default": Epsilon(0.0)})
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(net(xx)[:, 3].sum(), xx)
    torch.testing.assert_close(ours, (x * g), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Conservation
# ---------------------------------------------------------------------------------------------


EXACT = [{"first": ZBox(-5.0, 5.0, epsilon=0.0), "conv": Gamma(0.25, epsilon=0.0),
           "linear": Epsilon(0.0)},
          {"conv": ZPlus(epsilon=0.0), "linear": Epsilon(0.0)},
          {"conv": AlphaBeta(2.0, 1.0, epsilon=0.0), "linear": Epsilon(0.0)}]


@pytest.mark.parametrize("composite", ["EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1",
                                       "EpsilonGammaBox"] + EXACT)
def test_conservation_at_every_layer_without_biases(composite):
    net = conv_net(bias=False)
    torch.manual_seed(6)
    x = torch.randn(3, 2, 6, 6, dtype=DT)
    sums = lrp_conservation(net, x, [0, 1, 2], ("1", "3"), composite=composite)
    assert set(sums) == {"score", "input", "1", "3"}
    # Exact with ε = 0; the standard composites' ε = 1e-6 (and the stabiliser) absorb a little.
    tol = 1e-12 if isinstance(composite, dict) else 1e-4
    for key in ("input", "1", "3"):
        torch.testing.assert_close(sums[key], sums["score"], rtol=tol, atol=1e-12)


def test_conservation_with_biases_reports_the_absorbed_share():
    net = conv_net(bias=True)
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    sums = lrp_conservation(net, x, 1, ("3",), composite={"default": Epsilon(0.0)})
    # Below the last layer: the score less that layer's bias, exactly (LRP-0).
    torch.testing.assert_close(sums["3"], sums["score"] - net[5].bias[1].detach())
    assert not torch.allclose(sums["input"], sums["score"])


def test_relevance_at_a_layer_is_activation_times_gradient():
    net = conv_net(bias=False)
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    smap = lrp(net, x, 0, saliency_layer="3", composite="EpsilonPlus")
    assert smap.shape == (1, 1, 2, 2) and smap.dtype == DT
    torch.testing.assert_close(smap.sum(), net(x)[0, 0].detach(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# Batch norm folded inside the rule
# ---------------------------------------------------------------------------------------------


def test_batch_norm_is_folded_into_the_convolution_and_the_model_is_unchanged():
    torch.manual_seed(7)
    conv, bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    net = nn.Sequential(conv, bn, head).to(DT).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    merged = nn.Conv2d(2, 3, 3, padding=1).to(DT)
    merged.weight.data = conv.weight * scale[:, None, None, None]
    merged.bias.data = (conv.bias - bn.running_mean) * scale + bn.bias
    ref_net = nn.Sequential(merged, head).eval()
    x = torch.randn(2, 2, 4, 4, dtype=DT)
    for rule in (ZPlus(), Gamma(0.25), AlphaBeta(2.0, 1.0)):
        ours = our_relevance(net, x, 1, {"conv": rule})
        ref = our_relevance(ref_net, x, 1, {"conv": rule})
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_layer_output_feeding_batch_norm_and_another_op_is_refused():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return (self.bn(y) + y).flatten(1)

    net = Fork().to(DT).eval()
    with pytest.raises(ValueError, match="feeds its batch norm and also another operation"):
        lrp(net, torch.randn(1, 1, 2, 2, dtype=DT), 0, composite="EpsilonPlus")


# ---------------------------------------------------------------------------------------------
# Operation level and composites
# ---------------------------------------------------------------------------------------------


class Functional(nn.Module):
    """The conv net of :func:`conv_net`, calling ``F.conv2d`` / ``F.linear`` directly."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        c1, c2, lin = self.net[0], self.net[2], self.net[5]
        x = F.relu(F.conv2d(x, c1.weight, c1.bias, padding=1))
        x = F.relu(F.conv2d(x, c2.weight, c2.bias, stride=2))
        return F.linear(x.flatten(1), lin.weight, lin.bias)


@pytest.mark.parametrize("composite", ["EpsilonPlusFlat", "EpsilonGammaBox"])
def test_functional_calls_get_the_same_rules_as_modules(composite):
    net = conv_net()
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    a = lrp(net, x, 1, composite=composite)
    b = lrp(Functional(net), x, 1, composite=composite)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_selectors_by_type_name_module_and_predicate():
    net = conv_net()
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    by_kind = {"conv": ZPlus(), "linear": Epsilon(0.5)}
    ref = our_relevance(net, x, 0, by_kind)
    for composite in ({nn.Conv2d: ZPlus(), nn.Linear: Epsilon(0.5)},
                      {"0": ZPlus(), net[2]: ZPlus(), "5": Epsilon(0.5)},
                      {(lambda m: isinstance(m, nn.Conv2d)): ZPlus(), "linear": Epsilon(0.5)}):
        with LRPContext(composite, model=net) as context:
            xx = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(net(xx)[:, 0].sum(), xx)
        assert context.rules == [("conv", "zplus"), ("conv", "zplus"), ("linear", "epsilon")]
        torch.testing.assert_close(xx.detach() * g, ref, rtol=0, atol=0)


def test_first_layer_rule_applies_once_per_forward_pass_with_model():
    net = conv_net()
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    with LRPContext("EpsilonPlusFlat", model=net) as context:
        net(x.requires_grad_())
        net(x)
    assert [r for _, r in context.rules] == ["flat", "zplus", "epsilon"] * 2


class Twice(nn.Module):
    """A stem applied twice (weights shared) inside one forward pass, then a head: the stem's
    second call is not a new forward pass, its convolution not a first layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))

    def forward(self, x):
        return self.head(self.stem(self.stem(x)))


@pytest.mark.parametrize("composite", ["EpsilonPlusFlat",
                                       {nn.Conv2d: Gamma(0.25), "first": Flat()}])
def test_a_methods_context_equals_a_users_block(composite):
    """lrp() runs the model once per block; with a composite that selects by kind its context
    keeps no module stack (a user's block always does): the same rules, the same relevance,
    also for a sub-module called twice in one pass (only the very first call is the first
    layer), and with a composite that selects by module type."""
    net = Twice().to(DT).eval()
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    with LRPContext(composite, model=net) as context:
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, 1].sum(), xx)
    first = "flat"
    middle = "zplus" if composite == "EpsilonPlusFlat" else "gamma"
    assert [r for _, r in context.rules] == [first, middle, middle, "epsilon"]
    got = lrp(net, x, 1, composite=composite)
    torch.testing.assert_close(got, (xx.detach() * g).sum(1, keepdim=True), rtol=0, atol=0)


@pytest.mark.parametrize("spec, error, match", [
    ("Nope", ValueError, "unknown LRP composite 'Nope'; standard composites: EpsilonAlpha2Beta1"),
    (3, TypeError, "composite must be a Composite"),
    ({"conv": "zplus"}, TypeError, "must be an LRP rule such as Epsilon"),
    ({3.5: ZPlus()}, TypeError, "selector 3.5 .float. is none of"),
])
def test_bad_composites_are_refused(spec, error, match):
    with pytest.raises(error, match=match):
        make_composite(spec)


def test_layer_names_need_the_model_and_must_exist():
    with pytest.raises(ValueError, match="selects layers by name .'features.0'.: pass model="):
        LRPContext({"features.0": Flat()})
    with pytest.raises(ValueError, match="names layers 'features.0' that Sequential does not"):
        LRPContext({"features.0": Flat()}, model=conv_net())


@pytest.mark.parametrize("make, error, match", [
    (lambda: AlphaBeta(1.0, 1.0), ValueError, "alpha - beta must be 1"),
    (lambda: Epsilon(-1.0), ValueError, "epsilon must be a finite number >= 0"),
    (lambda: Gamma("a"), TypeError, "gamma must be a number, got str"),
    (lambda: ZBox("a", 1.0), TypeError, "low must be a number, a tensor or None"),
])
def test_bad_rules_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_zbox_bounds_that_do_not_broadcast_are_refused():
    net = conv_net()
    with pytest.raises(ValueError, match=r"ZBox: low of shape \(5,\) does not broadcast"):
        lrp(net, torch.randn(1, 2, 6, 6, dtype=DT), 0,
            composite={"first": ZBox(torch.zeros(5), 1.0)})


def test_zero_inputs_under_a_flat_first_layer_warn_with_the_lost_share():
    net = conv_net()
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    x[:, :, :3] = 0
    with pytest.warns(RelevanceLostWarning, match=r"Flat gave relevance to 36 input element"):
        lrp(net, x, 0, composite="EpsilonPlusFlat")


# ---------------------------------------------------------------------------------------------
# Uncovered operations
# ---------------------------------------------------------------------------------------------


class Odd(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        x = self.conv(x)
        if self.kind == "gelu":
            x = F.gelu(x)
        elif self.kind == "group_norm":
            x = F.relu(self.norm(x))
        elif self.kind == "relu6":
            x = F.relu6(x)
        else:  # attention-like: a product of two activations
            flat = x.flatten(2)
            x = (torch.softmax(flat @ flat.transpose(1, 2), -1) @ flat).reshape(x.shape)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("kind, name", [("gelu", "gelu"), ("group_norm", "group_norm"),
                                        ("relu6", "relu6"), ("attention", "matmul of two")])
def test_uncovered_operations_are_named_in_a_warning(kind, name):
    net = Odd(kind).to(DT).eval()
    with pytest.warns(UnhandledActivationWarning, match=name):
        smap = lrp(net, torch.randn(1, 2, 4, 4, dtype=DT), 0)
    assert smap.shape == (1, 1, 4, 4)


class NormGelu(nn.Module):
    """ConvNeXt's pattern: a layer norm over the channels (channels last) and a GELU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4, 3, bias=False)
        self.norm = nn.LayerNorm(4, elementwise_affine=False)

    def forward(self, x):
        x = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(F.gelu(x).mean((2, 3)))


def test_layer_norm_and_gelu_warnings_point_to_attn_lrp_which_conserves_through_them():
    net, x = NormGelu().to(DT).eval(), torch.randn(1, 2, 5, 5, dtype=DT)
    with pytest.warns(UnhandledActivationWarning,
                      match=r"\(gelu ×1, layer_norm ×1\).*attn_lrp \(TransformerLRPContext\) has "
                            r"LRP rules for gelu, layer_norm"):
        lrp(net, x, 1)
    with pytest.warns(UnhandledActivationWarning, match="attn_lrp"):
        with LRPContext("EpsilonPlusFlat", model=net):
            net(x)
    # The advice holds: AttnLRP's rules give the score back (no bias, ε = 1e-6).
    relevance = METHODS["attn_lrp"](net, x, 1)
    with torch.no_grad():
        score = float(net(x)[0, 1])
    assert float(relevance.sum()) == pytest.approx(score, rel=1e-4)
    # An uncovered operation AttnLRP does not cover either gets no such advice.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lrp(Odd("group_norm").to(DT).eval(), torch.randn(1, 2, 4, 4, dtype=DT), 0)
    assert seen and not any("attn_lrp" in str(w.message) for w in seen)


def test_a_covered_model_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrp(conv_net(), torch.randn(1, 2, 6, 6, dtype=DT), 0, composite="EpsilonPlus")


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="LRPContext replaced no convolution or linear"):
        lrp(nn.Sequential(nn.ReLU(), nn.AvgPool2d(2)), torch.randn(1, 2, 4, 4), 0)


# ---------------------------------------------------------------------------------------------
# The method's API
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lrp", "lrp_epsilon_plus", "lrp_epsilon_plus_flat",
                                  "lrp_epsilon_alpha2_beta1", "lrp_epsilon_gamma_box"])
def test_methods_entries_and_explain(name):
    net = conv_net()
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    smap = METHODS[name](net, x, [0, 2])
    assert smap.shape == (2, 1, 6, 6) and smap.dtype == DT
    torch.testing.assert_close(explain(net, x, [0, 2], methods=[name])[name], smap,
                               rtol=0, atol=0)


def test_lrp_in_the_flat_namespace_and_default_composite():
    net = conv_net()
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    assert torchray_like.lrp is lrp and torchray_like.LRPContext is LRPContext
    torch.testing.assert_close(lrp(net, x, 0), METHODS["lrp_epsilon_plus_flat"](net, x, 0))
    assert isinstance(make_composite("EpsilonPlusFlat"), Composite)


def test_unknown_composite_fails_before_any_work():
    calls = []
    net = conv_net()
    net.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="unknown LRP composite"):
        lrp(net, torch.randn(1, 2, 6, 6, dtype=DT), 0, composite="epsilon")
    assert calls == []


def test_state_restored_and_no_hooks_left():
    net = conv_net().train()
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    lrp(net, x, 0, composite={nn.Conv2d: ZPlus()})
    assert net.training and all(m.training for m in net.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    # The global module hooks of a type-selecting composite are gone: a forward pass after
    # the block records nothing.
    context = LRPContext({nn.Conv2d: ZPlus()}, model=net)
    with context:
        net(x.requires_grad_())
    count = dict(context.counts)
    net(x)
    assert context.counts == count and count == {"conv": 2, "linear": 1}


def test_float32_and_batch_of_targets():
    net = conv_net().float()
    x = torch.randn(3, 2, 6, 6)
    smap = lrp(net, x, [0, 1, 2], composite="EpsilonAlpha2Beta1")
    assert smap.dtype == torch.float32 and smap.shape == (3, 1, 6, 6)
    for i in range(3):
        torch.testing.assert_close(smap[i:i + 1], lrp(net, x[i:i + 1], i,
                                                      composite="EpsilonAlpha2Beta1"),
                                   rtol=1e-5, atol=1e-7)


class _PoolWritten(nn.Module):
    """Two convolutions, then average pooling written as a module or as a tensor method."""

    def __init__(self, as_module: bool) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.pool, self.as_module = nn.Linear(8, 4), nn.AdaptiveAvgPool2d(1), as_module

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(self.pool(h).flatten(1) if self.as_module else h.mean((2, 3)))


@pytest.mark.parametrize("composite", ["EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox",
                                       "EpsilonAlpha2Beta1"])
def test_relevance_does_not_depend_on_how_pooling_is_written(composite):
    # The rules follow the operation, not the module type (Zennit's relevance changes by 70 %
    # of its largest value on this network when the pooling is a tensor method).
    torch.manual_seed(0)
    as_module, as_method = _PoolWritten(True).eval(), _PoolWritten(False).eval()
    as_method.load_state_dict(as_module.state_dict())
    x = torch.rand(2, 3, 16, 16)
    maps = [lrp(m, x, [1, 2], composite=composite) for m in (as_module, as_method)]
    assert maps[0].shape == (2, 1, 16, 16) and maps[0].abs().max() > 0
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-6, atol=1e-7 * float(maps[0].abs().max()))
