"""The closed-form LRP backward (lrp_closed, LinearMap): equal to a hand-written matrix-form LRP
on nets whose layers take the fast paths (ReLU'd inputs through max pooling and reshapes, batch
norm with negative scales folded in) and the general ones (signed inputs, grouped convolutions,
``padding="same"``, a ReLU output shifted in place); the transposed maps against autograd; the
guard that decides when the ``x⁻`` terms are skipped."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.lrp_matrix_form import DT, FoldNet, hand_lrp, hand_rule, matrix, share, stab
from torchray_like.attribution.lrp import LRPContext
from torchray_like.attribution.lrp_closed import closed_gradient, rectified
from torchray_like.attribution.lrp_rules import (
    AffineCall,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    LinearMap,
    ZBox,
    ZPlus,
    safe_divide,
    stabilize,
)

RULES = [Epsilon(1e-6), Epsilon(0.0), ZPlus(), AlphaBeta(2.0, 1.0), AlphaBeta(1.0, 0.0),
         Gamma(0.25), Gamma(0.01)]


def ours(net, x, target, rule):
    with LRPContext({"conv": rule, "linear": Epsilon(1e-6)}, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, target].sum(), xx)
    return (xx * g).detach()[0]


class Net(nn.Module):
    """conv → conv "same" (signed inputs: the x⁻ terms) → BN with negative scales → ReLU → max
    pool → grouped conv (ReLU'd input through a pool) → ReLU → [shift] → conv without
    bias → ReLU → flatten → linear."""

    def __init__(self, shift: bool):
        super().__init__()
        torch.manual_seed(11)
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding="same")
        self.bn = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.c4 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3 * 4 * 4, 3)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.9, -2.0]))
            self.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
            self.bn.running_mean.copy_(torch.randn(4) * 0.1)
            self.bn.running_var.copy_(torch.rand(4) + 0.5)
        self.shift = shift
        self.to(DT).eval()

    def forward(self, x):
        t = F.max_pool2d(torch.relu(self.bn(self.c2(self.c1(x)))), 2)
        t = torch.relu(self.c3(t))
        if self.shift:
            t = t - 0.3  # a ReLU's output, no longer non-negative
        return self.fc(torch.relu(self.c4(t)).flatten(1))

    def steps(self):
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale

        def c2_bn(t):  # the batch norm folded into c2: one LRP layer
            return self.c2(t) * scale[:, None, None] + shift[:, None, None]

        out = [("affine", self.c1, None), ("affine", c2_bn, None), ("relu",), ("pool", 2),
               ("affine", self.c3, None), ("relu",)]
        if self.shift:
            out.append(("shift", 0.3))
        return out + [("affine", self.c4, None), ("relu",),
                      ("affine", lambda t: self.fc(t.flatten(1)), Epsilon(1e-6))]


@pytest.mark.parametrize("shift", [False, True], ids=["rectified", "shifted"])
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_rules_equal_matrix_form_lrp_on_fast_and_general_paths(rule, shift):
    net = Net(shift)
    torch.manual_seed(12)
    x = torch.randn(1, 2, 8, 8, dtype=DT)  # signed: c1 and c2 see negative inputs
    got = ours(net, x, 1, rule)
    want = hand_lrp(net.steps(), x, 1, rule)
    assert got.shape == (2, 8, 8) and got.dtype == DT
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_weights_larger_than_the_input_are_not_stacked(rule):
    """Linear layers and a wide convolution on a 2×2 map (weights bigger than the unfolded
    input: separate products, no copy of the weights) against the matrix form."""
    torch.manual_seed(17)
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 3)).to(DT).eval()
    x = torch.randn(1, 3, 2, 2, dtype=DT)
    with LRPContext({"conv": rule, "linear": rule}, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, 2].sum(), xx)
    got = (xx * g).detach()[0]
    steps = [("affine", net[0], None), ("relu",), ("affine", net[2], None), ("relu",),
             ("affine", lambda t: net[5](t.flatten(1)), None), ("relu",),
             ("affine", net[7], None)]
    want = hand_lrp(steps, x, 2, rule)
    assert LinearMap.of(AffineCall(F.linear, net[5].weight, None, (), {}, "linear")) \
        .stacks(torch.zeros(1, 96), net[5].weight) is False
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("rule", RULES[2:], ids=repr)
def test_fast_path_equals_the_rule_on_a_relu_output(rule):
    """float32: the closed form on x ≥ 0 against the rule's own gradient (two x terms,
    autograd-free share): the relevance x ⊙ g equal to 1e-5 relative."""
    torch.manual_seed(13)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.relu(torch.randn(2, 6, 7, 7))
    call = AffineCall(torch.conv2d, conv.weight, conv.bias, (1, 1), {}, "conv")
    z = call.output(x)
    r = z * torch.randn_like(z)
    fast = closed_gradient(rule, x, call, z, r, True)
    slow = rule.gradient(x, call, r)
    assert fast is not None and fast.shape == x.shape and fast.dtype == torch.float32
    rel = (x * fast - x * slow).abs().max() / (x * slow).abs().max()
    assert rel <= 1e-5
    # Where x > 0 the gradients agree too; where x = 0 the fast path does not compute the x⁻
    # term's product (their relevance is zero either way).
    on = x > 0
    assert on.float().mean() > 0.3
    torch.testing.assert_close(fast[on], slow[on], rtol=1e-4, atol=1e-5 * float(slow.abs().max()))


def test_fast_path_declines_what_it_does_not_cover():
    torch.manual_seed(14)
    conv = nn.Conv2d(3, 2, 3, padding=1)
    x = torch.randn(1, 3, 5, 5)
    call = AffineCall(torch.conv2d, conv.weight, conv.bias, (1, 1), {}, "conv")
    z = call.output(x)
    # signed input: z⁺, α-β and γ need their x⁻ terms (the rule's own method)
    assert closed_gradient(ZPlus(), x, call, z, z, False) is None
    assert closed_gradient(Gamma(), x, call, z, z, False) is None
    # a subclass may change gradient(): never bypassed

    class MyEpsilon(Epsilon):
        pass

    assert closed_gradient(MyEpsilon(), x, call, z, z, True) is None
    same = AffineCall(torch.conv2d, conv.weight, conv.bias, (1, "same"), {}, "conv")
    assert LinearMap.of(same) is None
    assert closed_gradient(Epsilon(), x, same, z, z, True) is None
    bn = AffineCall(F.batch_norm, conv.weight, None, (), {}, "batch_norm")
    assert LinearMap.of(bn) is None


@pytest.mark.parametrize("case", ["conv1d", "conv2d_groups", "conv3d", "convT2d", "linear3d"])
def test_transpose_is_the_input_gradient(case):
    torch.manual_seed(15)
    if case == "conv1d":
        func, w, x, rest, kw = torch.conv1d, torch.randn(4, 3, 3), torch.randn(2, 3, 9), \
            (2, 1, 2), {}
    elif case == "conv2d_groups":
        func, w, x, rest, kw = torch.conv2d, torch.randn(6, 2, 3, 2), torch.randn(1, 4, 7, 6), \
            (), {"stride": (2, 1), "padding": "valid", "groups": 2, "dilation": (1, 2)}
    elif case == "conv3d":
        func, w, x, rest, kw = torch.conv3d, torch.randn(2, 2, 2, 2, 2), \
            torch.randn(1, 2, 4, 5, 4), (1, 1), {}
    elif case == "convT2d":
        func, w, x, rest, kw = torch.conv_transpose2d, torch.randn(3, 4, 3, 3), \
            torch.randn(1, 3, 4, 4), (2, 1, 1), {}
    else:
        func, w, x, rest, kw = F.linear, torch.randn(5, 4), torch.randn(2, 3, 4), (), {}
    kind = {"conv_transpose2d": "conv_transpose", "linear": "linear"}.get(func.__name__, "conv")
    call = AffineCall(func, w, None, rest, kw, kind)
    op = LinearMap.of(call)
    assert op is not None and op.usable(x)
    leaf = x.clone().requires_grad_()
    y = func(leaf, w, None, *rest, **kw)
    s = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, leaf, s)
    got = op.transpose(s, w, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unbatched_convolution_is_left_to_autograd():
    call = AffineCall(torch.conv1d, torch.randn(2, 3, 3), None, (), {}, "conv")
    op = LinearMap.of(call)
    assert op is not None and not op.usable(torch.randn(3, 8))
    assert call.linear_map(torch.randn(3, 8)) is None


def test_rectified_reads_the_graph():
    leaf = torch.randn(1, 2, 4, 4, requires_grad=True)
    a = torch.relu(leaf * 2)
    assert rectified(a)
    assert rectified(F.max_pool2d(a, 2).flatten(1))
    assert not rectified(leaf)                       # a leaf: no ReLU made it
    assert not rectified((leaf * 2).abs())           # non-negative, but gradient passes at 0
    assert not rectified((leaf * 2).clamp(min=0))    # clamp passes the gradient at 0
    assert not rectified(torch.sigmoid(leaf))
    b = torch.relu(leaf * 2)
    b.add_(-0.5)                                     # a ReLU's output shifted in place
    assert not rectified(b)


def test_safe_divide_masks_zero_denominators_when_epsilon_vanishes_in_the_dtype():
    z = torch.tensor([0.0, 2.0, -0.0], dtype=torch.float32)
    r = torch.tensor([1.0, 4.0, 3.0])
    # 1e-50 is zero in float32: the denominators at z = 0 stay zero and must be masked
    out = safe_divide(r, z, 1e-50)
    assert torch.equal(out, torch.tensor([0.0, 2.0, 0.0]))
    assert torch.isfinite(safe_divide(r, z, 1e-6)).all()
    assert torch.equal(safe_divide(r, z, 0.0), torch.tensor([0.0, 2.0, 0.0]))


def test_stabilize_adds_epsilon_in_the_dtype_with_sign_of_zero_one():
    z = torch.tensor([-0.0, 0.0, 2.0, -3.0, 1e-300], dtype=DT)
    # ε = 0.1 exactly in float64 (not rounded to float32), +ε at -0.0 and +0.0
    want = torch.tensor([0.1, 0.1, 2.0 + 0.1, -3.0 - 0.1, 1e-300 + 0.1], dtype=DT)
    assert torch.equal(stabilize(z, 0.1), want)
    assert stabilize(z, 0.1).dtype == DT
    assert torch.equal(stabilize(z, 0.0), z)
    # float32 after float64 (ε kept per dtype): ε rounded to float32, not float64's 0.1
    z32 = z.float()
    assert torch.equal(stabilize(z32, 0.1), torch.tensor([0.1, 0.1, 2.1, -3.1, 0.1]))
    # differentiable where autograd records it (slope one), and under inference mode
    leaf = z.clone().requires_grad_()
    stabilize(leaf, 0.1).sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(z))
    with torch.inference_mode():
        assert torch.equal(stabilize(z, 0.1), want)
    assert torch.equal(stabilize(z, 0.1), want)


@pytest.mark.parametrize("rule", [Epsilon(1e-6), ZPlus(), Gamma(0.25), AlphaBeta(2.0, 1.0)],
                         ids=repr)
def test_bfloat16_model_computes_the_rules_in_float32(rule):
    """The forward output of a bfloat16 layer is not reused (the rules compute in float32
    from the input): relevance within bfloat16's rounding of the float32 model's."""
    torch.manual_seed(16)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).eval()
    x = torch.randn(1, 2, 6, 6)
    half = copy.deepcopy(net).to(torch.bfloat16)
    with torch.no_grad():  # the float32 model with bfloat16's weights and input, for a fair match
        for p, q in zip(net.parameters(), half.parameters()):
            p.copy_(q.float())
    xb = x.to(torch.bfloat16)
    want = ours(net.double(), xb.double(), 1, rule)
    got = ours(half, xb, 1, rule)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 6, 6)
    scale = float(want.abs().max())
    assert scale > 0
    assert float((got.double() - want).abs().max()) <= 0.05 * scale


# ---------------------------------------------------------------------------------------------
# Flat on an ungrouped convolution: one-channel products (lrp_rules.Flat.relevance)
# ---------------------------------------------------------------------------------------------


def hand_flat(conv, x, R):
    """Flat in matrix form: every connection of the convolution has weight one, no bias."""
    ones = copy.deepcopy(conv)
    with torch.no_grad():
        ones.weight.fill_(1.0)
    ones.bias = None
    M, b = matrix(ones, tuple(x.shape[1:]))
    return share(M, b, R, 1e-6).reshape(x.shape[1:])


FLAT_CONVS = {
    "3x3 pad 1": dict(kernel_size=3, padding=1),
    "5x5 stride 2 pad 2": dict(kernel_size=5, stride=2, padding=2),
    "3x3 dilation 2": dict(kernel_size=3, dilation=2, padding=1),
    # outputs on the border see only padding: count 0, stabilised to ε, nothing goes back
    "1x1 pad 1": dict(kernel_size=1, padding=1),
    "grouped (general way)": dict(kernel_size=3, padding=1, groups=3),
}


@pytest.mark.parametrize("options", list(FLAT_CONVS.values()), ids=list(FLAT_CONVS))
def test_flat_first_layer_equals_matrix_form(options):
    torch.manual_seed(23)
    conv = nn.Conv2d(3, 6, **options).to(DT).eval()
    head = nn.Linear(6 * conv(torch.zeros(1, 3, 7, 7, dtype=DT)).shape[-1] ** 2, 4).to(DT)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head).eval()
    x = torch.randn(2, 3, 7, 7, dtype=DT)  # a batch of two: the channel sum is per sample
    with LRPContext({"first": Flat(), "linear": Epsilon(1e-6)}, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, 1].sum(), xx)
    got = (xx * g).detach()
    assert got.shape == x.shape and got.dtype == DT
    net.requires_grad_(False)
    for n in range(2):
        acts = torch.relu(conv(x[n:n + 1]))
        W, b = matrix(lambda t: head(t.flatten(1)), tuple(acts.shape[1:]))
        out = W @ acts.flatten() + b
        R = torch.zeros_like(out)
        R[1] = out[1]
        R_act = hand_rule(Epsilon(1e-6), acts.flatten(), W, b, R)
        want = hand_flat(conv, x[n:n + 1], R_act)
        assert want.abs().max() > 0
        torch.testing.assert_close(got[n], want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


def test_flat_one_channel_products_equal_the_full_ones():
    """The one-channel form against full products with all-one weights (what the rule's
    general form computes) on float32, strided, batch of two."""
    torch.manual_seed(29)
    w = torch.randn(8, 3, 3, 3)
    call = AffineCall(torch.conv2d, w, None, (2, 1), {}, "conv")
    x = torch.randn(2, 3, 9, 9)
    r = torch.randn(2, 8, 5, 5)
    fast = Flat().relevance(x, call, r)
    ones = torch.ones_like(w)
    s = safe_divide(r, F.conv2d(torch.ones_like(x), ones, None, 2, 1), 1e-6)
    general = torch.nn.grad.conv2d_input(x.shape, ones, s, 2, 1)
    assert fast.shape == x.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, general, rtol=1e-6, atol=1e-6 * float(general.abs().max()))


@pytest.mark.parametrize("eps", [1e-6, 1e-3, 0.0], ids=["eps1e-6", "eps1e-3", "eps0"])
def test_zplus_denominator_on_zero_outputs(eps):
    """z⁺ on a ReLU'd input whose patches are all zero (z⁺ = b⁺ = 0 exactly, ±0) and biases of
    both signs: the one-pass ``z⁺ + ε`` against the matrix form (ε = 0: masked zeros)."""
    torch.manual_seed(31)
    c1, c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
    fc = nn.Linear(3 * 6 * 6, 2)
    with torch.no_grad():
        c1.bias.fill_(-1.0)  # off where x is zero
        c2.bias.copy_(torch.tensor([-0.2, 0.0, 0.3]))
    net = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), fc).to(DT).eval()
    x = torch.randn(1, 2, 6, 6, dtype=DT) * 5
    x[:, :, :3] = 0.0  # a region where the first layer's output is 0 (and -0.0 products)
    x[:, 1, :3] = -0.0
    rule = ZPlus(epsilon=eps)
    got = ours(net, x, 0, rule)
    steps = [("affine", c1, None), ("relu",), ("affine", c2, None), ("relu",),
             ("affine", lambda t: fc(t.flatten(1)), Epsilon(1e-6))]
    with torch.no_grad():
        want = hand_lrp(steps, x, 0, rule)
        hidden = torch.relu(c1(x))
        zplus = F.conv2d(hidden, c2.weight.clamp(min=0), padding=1)
        assert bool((zplus == 0).any())  # some z⁺ is exactly zero
    assert want.abs().max() > 0 and got.dtype == DT
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# z⁺ through a folded batch norm whose scales are all positive: the scale moves into the bias
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scales", [[1.5, 0.7, 0.9], [1.5, -0.7, 0.9], [1.5, 0.0, 0.9]],
                         ids=["positive", "negative", "zero"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_zplus_through_folded_batch_norm_equals_matrix_form(bias, scales):
    """All scales positive: the folded weight is never built (``zplus_folded``); a negative or
    zero scale: the weight is folded.  Either way the matrix-form LRP of the merged layer."""
    net = FoldNet(bias, scales)
    torch.manual_seed(42)
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    got = ours(net, x, 1, ZPlus())
    with torch.no_grad():
        want = hand_lrp(net.steps(), x, 1, ZPlus())
    assert got.shape == (2, 6, 6) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))



@pytest.mark.parametrize("rule", [AlphaBeta(2.0, 1.0), AlphaBeta(1.0, 0.0), AlphaBeta(3.0, 2.0)],
                         ids=repr)
def test_alpha_beta_on_signed_linear_input_equals_matrix_form(rule):
    """α-β on a linear layer whose input is signed (both sign blocks in one product, and one
    ``s @ Ŵ`` for the transposed one: the weight is smaller than the batch's input), against
    the matrix form."""
    torch.manual_seed(45)
    l1, l2 = nn.Linear(6, 3), nn.Linear(3, 3)
    net = nn.Sequential(l1, nn.ReLU(), l2).to(DT).eval()
    x = torch.randn(4, 6, dtype=DT)
    x[0, 2] = 0.0  # an exact zero: relevance zero, whichever sign block its gradient takes
    call = AffineCall(F.linear, l1.weight, l1.bias)
    with torch.no_grad():
        z = l1(x)
        assert closed_gradient(rule, x, call, z, z, False) is not None  # the stacked path
    with LRPContext({"linear": rule}, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, 1].sum(), xx)
    got = (xx * g).detach()[0]
    with torch.no_grad():
        want = hand_lrp([("affine", l1, None), ("relu",), ("affine", l2, None)], x[:1], 1, rule)
    assert got.shape == (6,) and float(got[2]) == 0.0 and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("bounds", ["numbers", "channels", "none", "none-batch", "pixels"])
def test_zbox_bounds_equal_matrix_form(bounds, monkeypatch):
    """z^B with bounds constant per input channel (numbers, ``(1, C, 1, 1)``, ``None`` on one
    sample: one product over ``C + 1`` channels) and with bounds that vary over the batch or
    the positions (the three-term product), against the matrix form of each sample."""
    torch.manual_seed(46)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    n = 2 if bounds == "none-batch" else 1
    x = torch.rand(n, 3, 5, 5, dtype=DT) * 2 - 1
    low, high = {
        "numbers": (-1.5, 1.5),
        "channels": (torch.tensor([-1.0, -2.0, -1.5], dtype=DT).reshape(1, 3, 1, 1),
                     torch.tensor([1.0, 2.5, 1.5], dtype=DT).reshape(1, 3, 1, 1)),
        "none": (None, None), "none-batch": (None, None),
        "pixels": (-1.0 - torch.rand(1, 3, 5, 5, dtype=DT), 1.0 + torch.rand(1, 3, 5, 5, dtype=DT)),
    }[bounds]
    rule = ZBox(low, high)
    call = AffineCall(F.conv2d, conv.weight, conv.bias, (1, 1), kind="conv")
    r = torch.randn(n, 4, 5, 5, dtype=DT)
    channels = []  # input channels of each forward product
    forward = LinearMap.forward
    monkeypatch.setattr(LinearMap, "forward",
                        lambda op, t, *a: channels.append(t.shape[1]) or forward(op, t, *a))
    with torch.no_grad():
        got = rule.relevance(x, call, r)
        W, _ = matrix(conv, (3, 5, 5))
        assert channels == ([4] if bounds in ("numbers", "channels", "none") else [9])
        for i in range(n):
            xi = x[i].flatten()
            lo = (xi.min() if low is None else torch.as_tensor(low, dtype=DT)).expand(x[:1].shape)
            hi = (xi.max() if high is None else torch.as_tensor(high, dtype=DT)).expand(x[:1].shape)
            Zb = (xi[None] * W - lo.flatten()[None] * W.clamp(min=0)
                  - hi.flatten()[None] * W.clamp(max=0))
            want = (Zb / stab(Zb.sum(1), rule.epsilon)[:, None] * r[i].flatten()[:, None]).sum(0)
            assert got.shape == x.shape and got.dtype == DT
            torch.testing.assert_close(got[i].flatten(), want, rtol=1e-9,
                                       atol=1e-12 * float(want.abs().max()))


def test_create_graph_gives_the_same_gradient_which_is_not_differentiable_again():
    """Backward with ``create_graph=True`` (grad mode on inside backward) takes the
    once_differentiable path: the same numbers as without it, and differentiating them again
    is refused by PyTorch (the rules are not differentiable) instead of giving a wrong
    second derivative."""
    net = FoldNet(True, [1.5, 0.7, 0.9])
    torch.manual_seed(47)
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    grads = []
    for create_graph in (False, True):
        with LRPContext("EpsilonPlusFlat", model=net):
            xx = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(net(xx)[:, 1].sum(), xx, create_graph=create_graph)
        grads.append(g)
    assert not grads[0].requires_grad and grads[1].requires_grad
    assert torch.equal(grads[0], grads[1].detach())
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grads[1].sum().backward()


def test_batch_norm_fold_of_parameters_that_require_grad():
    """A model whose parameters are not frozen (the context used by hand): the same relevance
    as the frozen model, and the parameters get no gradient from the input's."""
    torch.manual_seed(48)
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    frozen = FoldNet(True, [1.5, -0.7, 0.9]).requires_grad_(False)
    live = FoldNet(True, [1.5, -0.7, 0.9])
    assert all(p.requires_grad for p in live.parameters())
    got = ours(live, x, 1, ZPlus())
    want = ours(frozen, x, 1, ZPlus())
    assert torch.equal(got, want) and want.abs().max() > 0
    assert all(p.grad is None for p in live.parameters())
