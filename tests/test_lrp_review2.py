"""Review of LRP-αβ behind a folded batch norm (``alpha_beta_folded``) and of the transformer
rules' refusal of a second derivative: hostile layouts and scales against the matrix form, and
first- / second-order autograd on the transformer contexts and the attention capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.lrp_matrix_form import DT, hand_lrp
from tests.transformer_models import ExplicitViT, make_vit
from torchray_like.attribution.attention import AttentionCapture
from torchray_like.attribution.autograd_guards import SecondOrderError
from torchray_like.attribution.lrp import LRPContext
from torchray_like.attribution.lrp_rules import AlphaBeta, Epsilon
from torchray_like.attribution.transformer_lrp import TransformerLRPContext

# γ's and α-β's folded forms on these small layers too (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("folded_forms_on_small_layers")

CONV = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d),
        3: (nn.Conv3d, nn.BatchNorm3d)}


class ConvBN(nn.Module):
    """conv → ReLU → conv ``c2`` (``groups``, bias or not) → BN (``scales``, ``var``) →
    [ReLU] → flatten → linear, in 1-3 spatial dimensions."""

    def __init__(self, d, groups, bias, scales, var, relu_after, side):
        super().__init__()
        torch.manual_seed(1)
        conv, bn = CONV[d]
        self.c1 = conv(2, 4, 3, padding=1)
        self.c2 = conv(4, 4, 3, padding=1, groups=groups, bias=bias)
        self.bn = bn(4)
        self.fc = nn.Linear(4 * side ** d, 2)
        self.relu_after = relu_after
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor(scales))
            self.bn.bias.copy_(torch.tensor([0.2, -0.3, 0.05, 0.0]))
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
            self.bn.running_var.copy_(torch.tensor(var))
        self.to(DT).eval()

    def forward(self, x):
        t = self.bn(self.c2(torch.relu(self.c1(x))))
        return self.fc((torch.relu(t) if self.relu_after else t).flatten(1))

    def steps(self):
        return ([("affine", self.c1, Epsilon(1e-6)), ("relu",),
                 ("affine", lambda t: self.bn(self.c2(t)), None)]
                + ([("relu",)] if self.relu_after else [])
                + [("affine", lambda t: self.fc(t.flatten(1)), Epsilon(1e-6))])


def _relevance(net, layer, x, target, rule):
    with LRPContext({layer: rule, "linear": Epsilon(1e-6), "conv": Epsilon(1e-6)}, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx).flatten(1)[:, target].sum(), xx)
    return (xx * g).detach()


SCALES = {"positive": [1.5, 0.7, 0.9, 1.0], "mixed": [1.5, -0.7, 0.9, 1.0],
          "zero": [1.5, 0.0, 0.9, 1.0], "tiny": [1.5, 1e-300, 0.9, 1.0],
          "subnormal": [1.5, 5e-320, 0.9, 1.0], "huge": [1.5, 1e30, 0.9, 1.0]}


@pytest.mark.parametrize("scales", list(SCALES), ids=str)
@pytest.mark.parametrize("d,groups,bias", [(1, 1, True), (1, 4, False), (2, 2, True),
                                           (3, 1, False), (3, 2, True)])
@pytest.mark.parametrize("rule", [AlphaBeta(2.0, 1.0), AlphaBeta(1.0, 0.0), AlphaBeta(3.0, 2.0),
                                  AlphaBeta(2.0, 1.0, epsilon=0.0)], ids=repr)
def test_alpha_beta_behind_a_batch_norm_in_every_layout_equals_matrix_form(rule, d, groups,
                                                                          bias, scales):
    side = {1: 6, 2: 5, 3: 3}[d]
    var = [0.5, 1e-300, 0.8, 0.0] if scales == "positive" else [0.5, 1.5, 0.8, 1.0]
    for relu_after in (True, False):
        net = ConvBN(d, groups, bias, SCALES[scales], var, relu_after, side)
        torch.manual_seed(2)
        x = torch.randn((1, 2) + (side,) * d, dtype=DT)
        for target in (0, 1):
            got = _relevance(net, net.c2, x, target, rule)[0]
            with torch.no_grad():
                want = hand_lrp(net.steps(), x, target, rule)
            assert got.shape == x.shape[1:] and got.dtype == DT and want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-9,
                                       atol=1e-12 * float(want.abs().max()))


class LinearBN(nn.Module):
    """linear → ReLU → linear ``l1`` → BatchNorm1d → linear, on ``(N, features)``."""

    def __init__(self, bias, scales):
        super().__init__()
        torch.manual_seed(3)
        self.l0, self.l1 = nn.Linear(6, 7), nn.Linear(7, 5, bias=bias)
        self.bn, self.fc = nn.BatchNorm1d(5), nn.Linear(5, 3)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor(scales))
            self.bn.bias.copy_(torch.randn(5))
            self.bn.running_mean.copy_(torch.randn(5))
            self.bn.running_var.copy_(torch.rand(5) + 0.3)
        self.to(DT).eval()

    def forward(self, x):
        return self.fc(self.bn(self.l1(torch.relu(self.l0(x)))))

    def steps(self):
        return [("affine", self.l0, Epsilon(1e-6)), ("relu",),
                ("affine", lambda t: self.bn(self.l1(t)), None), ("affine", self.fc, Epsilon(1e-6))]


@pytest.mark.parametrize("batch", [1, 9], ids=["one", "stacked"])
@pytest.mark.parametrize("scales", [[1.5, 0.7, 0.9, 1.2, 0.3], [1.5, -0.7, 0.9, 1.2, 0.3],
                                    [1.5, 5e-320, 0.9, 1.2, 0.3]], ids=["pos", "neg", "sub"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rule", [AlphaBeta(2.0, 1.0), AlphaBeta(3.0, 2.0)], ids=repr)
def test_alpha_beta_linear_with_batch_norm1d_equals_matrix_form(rule, bias, scales, batch):
    net = LinearBN(bias, scales)
    torch.manual_seed(4)
    x = torch.randn(batch, 6, dtype=DT)
    got = _relevance(net, net.l1, x, 1, rule)
    for n in range(batch):
        with torch.no_grad():
            want = hand_lrp(net.steps(), x[n:n + 1], 1, rule)
        torch.testing.assert_close(got[n], want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


def test_alpha_beta_folded_float32_channels_last_frozen_and_create_graph():
    """float32 against float64; channels_last and trainable parameters (create_graph=True)
    equal to the plain call."""
    net64 = ConvBN(2, 1, True, SCALES["positive"], [0.5, 1.5, 0.8, 1.0], False, 8)
    torch.manual_seed(5)
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    rule = AlphaBeta(2.0, 1.0)
    want = _relevance(net64, net64.c2, x, 1, rule)
    net = ConvBN(2, 1, True, SCALES["positive"], [0.5, 1.5, 0.8, 1.0], False, 8).float()
    plain = _relevance(net, net.c2, x.float(), 1, rule)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain.double(), want, rtol=1e-4,
                               atol=1e-5 * float(want.abs().max()))
    net_cl = ConvBN(2, 1, True, SCALES["positive"], [0.5, 1.5, 0.8, 1.0], False, 8).float()
    net_cl = net_cl.to(memory_format=torch.channels_last)
    cl = _relevance(net_cl, net_cl.c2, x.float().to(memory_format=torch.channels_last), 1, rule)
    torch.testing.assert_close(cl, plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))
    with LRPContext({net.c2: rule, "linear": Epsilon(1e-6), "conv": Epsilon(1e-6)}, model=net):
        xx = x.float().clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, 1].sum(), xx, create_graph=True)
    assert all(p.requires_grad for p in net.parameters())
    assert torch.equal((xx * g).detach(), plain)


class Tokens(nn.Module):
    """linear on ``(N, T, C)`` tokens → BatchNorm1d(T) (dimension 1: the tokens, not the
    linear layer's output features) → ReLU → linear."""

    def __init__(self, t=4, c=4):
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1 = nn.Linear(3, 5), nn.Linear(5, c)
        self.bn, self.fc = nn.BatchNorm1d(t), nn.Linear(t * c, 2)
        with torch.no_grad():
            self.bn.weight.copy_(torch.rand(t) + 0.5)
            self.bn.bias.copy_(torch.randn(t))
            self.bn.running_mean.copy_(torch.randn(t))
            self.bn.running_var.copy_(torch.rand(t) + 0.5)
        self.to(DT).eval()

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.l1(torch.relu(self.l0(x))))).flatten(1))

    def steps(self):
        return [("affine", self.l0, Epsilon(1e-6)), ("relu",),
                ("affine", lambda t: self.bn(self.l1(t)), None), ("relu",),
                ("affine", lambda t: self.fc(t.flatten(1)), Epsilon(1e-6))]


@pytest.mark.parametrize("rule", [AlphaBeta(2.0, 1.0), Epsilon(1e-6)], ids=repr)
def test_batch_norm_over_tokens_after_a_linear_layer_is_not_folded_as_features(rule):
    """BatchNorm1d(T) on a linear layer's ``(N, T, C)`` output scales tokens, not the layer's
    output features: it is not folded into the layer (before: folded as if it scaled the
    features, silently wrong with T == C) but passed as an element-wise affine map, whose
    plain gradient is LRP-0 — the layer's rule, then LRP-0 through the batch norm."""
    net = Tokens()  # T == C: the shapes broadcast, a fold would scale the wrong dimension
    torch.manual_seed(6)
    x = torch.randn(1, 4, 3, dtype=DT)
    got = _relevance(net, net.l1, x, 1, rule)[0]
    steps = [("affine", net.l0, Epsilon(1e-6)), ("relu",), ("affine", net.l1, None),
             ("affine", net.bn, Epsilon(0.0)), ("relu",),
             ("affine", lambda t: net.fc(t.flatten(1)), Epsilon(1e-6))]
    with torch.no_grad():
        want = hand_lrp(steps, x, 1, rule)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


def test_batch_norm_after_an_unbatched_convolution_is_not_folded():
    """An unbatched conv1d's ``(C, L)`` output under BatchNorm1d(L) (dimension 1: the
    positions): not folded into the convolution.  With LRP-0 on every layer the relevance is
    gradient × input exactly (before: 270 % off)."""
    torch.manual_seed(9)
    conv, bn, fc = nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(5), nn.Linear(15, 2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = conv, bn, fc

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten())[None]

    net = Unbatched().to(DT).eval()
    x = torch.randn(2, 5, dtype=DT)
    with LRPContext({"conv": Epsilon(0.0), "linear": Epsilon(0.0)}, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[0, 1], xx)
    xx = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(net(xx)[0, 1], xx)
    assert plain.abs().max() > 0
    torch.testing.assert_close(xx * g, x * plain, rtol=1e-9, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# The transformer rules' substitutes: first order unchanged, second order refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["cp-lrp", "attnlrp"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_second_derivative_refused_where_the_incoming_gradient_is_constant(rule, frozen):
    """GELU → LayerNorm → linear head: the gradient reaching the LayerNorm's substitute does
    not depend on the input, but its explicit form (σ held constant) does.  Before, CP-LRP's
    second derivative came back silently (that of the form with σ detached)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    for p in model.parameters():
        p.requires_grad_(not frozen)
    x = torch.randn(2, 8)
    xx = x.clone().requires_grad_()
    with TransformerLRPContext(rule):
        y = model(xx)
        (g0,) = torch.autograd.grad(y[:, 1].sum(), xx, retain_graph=True)
        (g,) = torch.autograd.grad(y[:, 1].sum(), xx, create_graph=True)
    assert torch.equal(g0, g.detach()) and g0.abs().max() > 0
    with pytest.raises(SecondOrderError, match="second derivative"):
        torch.autograd.grad((g * g).sum(), xx)
    with pytest.raises(SecondOrderError):
        with TransformerLRPContext(rule):
            torch.autograd.functional.hessian(lambda t: model(t)[:, 1].sum(), x)


@pytest.mark.parametrize("rule", ["cp-lrp", "attnlrp"])
@pytest.mark.parametrize("attention", ["sdpa", "explicit", "mha"])
def test_transformer_rules_first_order_unchanged_by_create_graph_and_jacobian(rule, attention):
    vit = make_vit().eval()
    model = vit if attention == "mha" else ExplicitViT(vit, attention=attention)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    xx = x.clone().requires_grad_()
    with TransformerLRPContext(rule):
        y = model(xx)
        (g0,) = torch.autograd.grad(y[:, 1].sum(), xx, retain_graph=True)
        (g1,) = torch.autograd.grad(y[:, 1].sum(), xx, create_graph=True)
        jac = torch.autograd.functional.jacobian(lambda t: model(t)[:, 1], x, vectorize=False)
    assert g0.abs().max() > 0 and torch.equal(g0, g1.detach()) and torch.equal(jac[0], g0)
    with pytest.raises(SecondOrderError):
        torch.autograd.grad((g1 * g1).sum(), xx)


@pytest.mark.parametrize("attention", ["sdpa", "mha"])
def test_attention_capture_second_derivative_equals_the_plain_models(attention):
    """The capture's substitutes have no owner: their explicit form is the exact attention,
    whose second derivative is the model's (PyTorch's math kernel as the reference)."""
    vit = make_vit().double().eval()
    model = vit if attention == "mha" else ExplicitViT(vit, attention="sdpa")
    x = torch.randn(1, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(9))
    results = []
    for capture in (False, True):
        xx = x.clone().requires_grad_()
        if capture:
            with AttentionCapture(differentiable=True) as cap:
                y = model(xx)
            assert len(cap.attentions) == 2
        else:
            with sdpa_kernel(SDPBackend.MATH):
                y = model(xx)
        (g,) = torch.autograd.grad(y[:, 1].sum(), xx, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), xx)
        results.append((y.detach(), g.detach(), h))
    assert results[0][2].abs().max() > 0
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


class SoftmaxAttention(nn.Module):
    """Self-attention written with an explicit softmax over (N, T, T) scores and no
    LayerNorm: CP-LRP holds the probabilities constant (``_HeldConstant``), and no substitute
    lies on the gradient's path."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.qkv, self.head = nn.Linear(6, 18), nn.Linear(6, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        probs = (q @ k.transpose(-2, -1) / 6 ** 0.5).softmax(dim=-1)
        return self.head((probs @ v).mean(1))


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_cp_lrp_held_probabilities_refuse_a_second_derivative(frozen):
    """Before: CP-LRP's second derivative through the held-constant probabilities was silently
    that of the form with ``.detach()`` (``hessian`` of a model without LayerNorm: zeros or
    None).  The first-order gradient is unchanged."""
    model = SoftmaxAttention().eval()
    for p in model.parameters():
        p.requires_grad_(not frozen)
    x = torch.randn(2, 4, 6)
    xx = x.clone().requires_grad_()
    with TransformerLRPContext("cp-lrp") as context:
        y = model(xx)
        (g0,) = torch.autograd.grad(y[:, 1].sum(), xx, retain_graph=True)
        (g,) = torch.autograd.grad(y[:, 1].sum(), xx, create_graph=True)
    assert context.counts.get("softmax", 0) >= 1
    assert torch.equal(g0, g.detach()) and g0.abs().max() > 0
    # The first-order rule: the gradient with the probabilities held constant (by hand).
    xh = x.clone().requires_grad_()
    q, k, v = model.qkv(xh).chunk(3, dim=-1)
    probs = (q @ k.transpose(-2, -1) / 6 ** 0.5).softmax(dim=-1).detach()
    (want,) = torch.autograd.grad(model.head((probs @ v).mean(1))[:, 1].sum(), xh)
    torch.testing.assert_close(g0, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(SecondOrderError, match="second derivative"):
        torch.autograd.grad((g * g).sum(), xx)


def test_attn_lrp_scaled_products_refuse_a_second_derivative_with_no_layer_after_them():
    """AttnLRP's halved gradients of the two attention products, on a model with no LRP
    layer on the gradient's path (attention of the input with itself, summed): a second
    derivative is refused all the same (the scores' node ties it to the softmax's gradient)."""
    x = torch.randn(2, 4, 6)

    def model(t):
        probs = (t @ t.transpose(-2, -1)).softmax(dim=-1)
        return (probs @ t).sum((1, 2))

    xx = x.clone().requires_grad_()
    with TransformerLRPContext("attnlrp") as context:
        y = model(xx)
        (g0,) = torch.autograd.grad(y.sum(), xx, retain_graph=True)
        (g,) = torch.autograd.grad(y.sum(), xx, create_graph=True)
    assert context.counts.get("softmax", 0) >= 1
    assert torch.equal(g0, g.detach()) and g0.abs().max() > 0
    with pytest.raises(SecondOrderError, match="second derivative"):
        torch.autograd.grad((g * g).sum(), xx)
