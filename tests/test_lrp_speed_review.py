"""Hostile cases for the fast closed forms of LRP-γ / LRP-αβ (ε in the products' biases, the
choice by the output's sign as arithmetic, one transposed product where no relevance reaches
outputs with z ≤ 0, γ behind a folded batch norm) and for excitation backprop's division by
its denominators (one native selection of the quotient).

Every number is checked against an independent computation: the matrix-form LRP of
``tests/lrp_matrix_form.py`` (dense matrices, float64) or the excitation rule written out with
``torch.where``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tests.lrp_matrix_form import DT, FoldNet, hand_lrp, hand_rule, library_lrp, matrix
from torchray_like.attribution.excitation_backprop import (
    contrastive_excitation_backprop,
    excitation_backprop,
)
from torchray_like.attribution.excitation_rules import ExcitationCell, excitation_eps
from torchray_like.attribution.explain import explain
from torchray_like.attribution.lrp import LRPContext
from torchray_like.attribution.lrp_closed import closed_gradient, gamma_folded
from torchray_like.attribution.lrp_rules import AffineCall, AlphaBeta, Epsilon, Gamma, ZPlus

# γ's and α-β's folded forms on these small layers too (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("folded_forms_on_small_layers")


def dense_relevance(rule, call: AffineCall, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The rule's input relevance per sample from the layer's dense matrix (float64)."""
    out = []
    for n in range(x.shape[0]):
        xs = x[n].to(DT)
        W, b = matrix(lambda t: call.cast(DT).output(t), tuple(xs.shape))
        out.append(hand_rule(rule, xs.flatten(), W, b, r[n].to(DT).flatten()).reshape(xs.shape))
    return torch.stack(out)


def layer_case(call: AffineCall, x: torch.Tensor, relu_after: bool, seed: int = 0):
    """``(z, r)`` of ``call`` on ``x`` with ``r = z ⊙ g`` (``g`` zero where ``z ≤ 0`` when a
    ReLU follows the layer)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        z = call.output(x)
        g = torch.randn_like(z)
        if relu_after:
            g = g * (z > 0)
    return z, z * g


def assert_relevance(rule, call, x, relu_after=False, rtol=1e-9):
    z, r = layer_case(call, x, relu_after)
    with torch.no_grad():
        c = closed_gradient(rule, x, call, z, r, True)
    assert c is not None and c.shape == x.shape and c.dtype == x.dtype
    # (The ReLU before the layer passes no gradient where x = 0, which may be inf there.)
    got = torch.where(x > 0, x * c, 0.0).to(DT)
    want = dense_relevance(rule, call, x, r)
    assert bool(torch.isfinite(got).all()) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def conv_input(dtype=torch.float32, side=6, channels=2) -> torch.Tensor:
    """``x ≥ 0`` with a zero band wider than a 3×3 kernel: outputs with ``z = 0`` and
    ``q = op(x, w⁺) = 0`` where the layer has no bias."""
    torch.manual_seed(1)
    x = torch.rand(1, channels, side, side, dtype=dtype)
    x[:, :, : side // 2 + 1] = 0.0
    return x


# ---------------------------------------------------------------------------------------------
# γ: the stabiliser ε/γ added to the product's bias must be a normal, finite number of the dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [None, [0.0, -0.5, 0.3]], ids=["nobias", "bias"])
@pytest.mark.parametrize("rule", [Gamma(1e20, epsilon=1e-30), Gamma(1e6, epsilon=1e-34)],
                         ids=repr)
def test_gamma_shift_that_underflows_keeps_zero_outputs_finite(rule, bias):
    """ε/γ below float32's normal range (0 or subnormal in the bias): where z = q = 0 the
    shifted denominator was 0 and R / z̃ = 0/0 = NaN; the general stabiliser gives 0 there.
    An output channel without weights (a pruned filter, bias 0) has z = q = 0 everywhere, and
    its NaN reached every input (NaN · 0 in the transposed product)."""
    torch.manual_seed(2)
    w = torch.randn(3, 2, 3, 3)
    w[0] = 0.0
    b = None if bias is None else torch.tensor(bias)
    call = AffineCall(F.conv2d, w, b, (1, 1), kind="conv")
    for relu_after in (False, True):
        assert_relevance(rule, call, conv_input(), relu_after, rtol=1e-5)


@pytest.mark.parametrize("bias", [None, [0.0, -0.5, 0.3]], ids=["nobias", "bias"])
def test_gamma_shift_that_overflows_neither_raises_nor_makes_nan(bias):
    """γ = 1e-45 (a float32 subnormal) with ε = 1e-6: ε/γ ≈ 1e39 is a finite Python float but
    overflows float32 (torch.full raised RuntimeError, the bias turned inf and z̃ NaN)."""
    torch.manual_seed(3)
    w = torch.randn(3, 2, 3, 3)
    b = None if bias is None else torch.tensor(bias)
    call = AffineCall(F.conv2d, w, b, (1, 1), kind="conv")
    for relu_after in (False, True):
        assert_relevance(Gamma(1e-45, epsilon=1e-6), call, conv_input(), relu_after, rtol=1e-5)


@pytest.mark.parametrize("rule", [Gamma(1e-40), Gamma(1e6), Gamma(0.25, epsilon=1e-40),
                                  Gamma(0.25, epsilon=0.0), Gamma(0.0),
                                  AlphaBeta(2.0, 1.0, epsilon=1e-40),
                                  AlphaBeta(2.0, 1.0, epsilon=1e-3)], ids=repr)
def test_extreme_gamma_and_epsilon_in_float32_equal_matrix_form(rule):
    """Subnormal γ or ε, huge γ, ε = 0, γ = 0: each rule's own denominators, to float32."""
    torch.manual_seed(4)
    call = AffineCall(F.conv2d, torch.randn(3, 2, 3, 3), torch.tensor([0.0, -0.5, 0.3]),
                      (1, 1), kind="conv")
    for relu_after in (False, True):
        assert_relevance(rule, call, conv_input(), relu_after, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# γ and α-β on every layout of a linear map (float64, to rounding)
# ---------------------------------------------------------------------------------------------


def _layouts():
    torch.manual_seed(5)
    r = torch.randn
    return {
        "conv1d": (AffineCall(F.conv1d, r(4, 3, 3, dtype=DT), r(4, dtype=DT), (1, 1),
                              kind="conv"), torch.rand(2, 3, 7, dtype=DT)),
        "conv3d": (AffineCall(F.conv3d, r(4, 3, 3, 3, 3, dtype=DT), None, (1, 1), kind="conv"),
                   torch.rand(1, 3, 4, 4, 4, dtype=DT)),
        "grouped": (AffineCall(F.conv2d, r(6, 2, 3, 3, dtype=DT), r(6, dtype=DT),
                               (1, 1, 1, 2), kind="conv"), torch.rand(2, 4, 5, 5, dtype=DT)),
        "transposed": (AffineCall(F.conv_transpose2d, r(3, 4, 3, 3, dtype=DT), r(4, dtype=DT),
                                  (2, 1), kind="conv_transpose"), torch.rand(1, 3, 4, 4, dtype=DT)),
        "transposed-grouped": (AffineCall(F.conv_transpose2d, r(4, 3, 3, 3, dtype=DT), None,
                                          (2, 1, 0, 2), kind="conv_transpose"),
                               torch.rand(1, 4, 3, 3, dtype=DT)),
        "tokens": (AffineCall(F.linear, r(5, 6, dtype=DT), r(5, dtype=DT), (), kind="linear"),
                   torch.rand(2, 7, 6, dtype=DT)),
        "tokens-stacked": (AffineCall(F.linear, r(3, 4, dtype=DT), None, (), kind="linear"),
                           torch.rand(2, 30, 4, dtype=DT)),
        "channels-last": (AffineCall(F.conv2d, r(4, 3, 3, 3, dtype=DT), r(4, dtype=DT), (1, 1),
                                     kind="conv"),
                          torch.rand(2, 3, 5, 5, dtype=DT).to(memory_format=torch.channels_last)),
    }


LAYOUTS = _layouts()


@pytest.mark.parametrize("relu_after", [False, True], ids=["both-signs", "relu-after"])
@pytest.mark.parametrize("rule", [Gamma(0.25), Gamma(3.0, epsilon=1e-2), AlphaBeta(2.0, 1.0),
                                  AlphaBeta(1.0, 0.0)], ids=repr)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rules_on_every_layout_equal_matrix_form(layout, rule, relu_after):
    call, x = LAYOUTS[layout]
    x = x.clone()
    x[x < 0.25] = 0.0  # exact zeros of the input (and of outputs without a bias)
    assert_relevance(rule, call, x, relu_after)


# ---------------------------------------------------------------------------------------------
# γ behind a folded batch norm whose scales are positive but tiny
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 1e-39), (torch.float32, 1e-38),
                                        (torch.float64, 1e-310)], ids=["f32-sub", "f32-min", "f64"])
def test_gamma_folded_with_tiny_scales_declines_or_is_finite(dtype, tiny):
    """A positive scale so small that (b'⁺ + ε/γ) / a overflows: the product's bias was inf, z̃
    NaN.  ``gamma_folded`` declines such a scale (the caller folds the weight)."""
    torch.manual_seed(6)
    call = AffineCall(F.conv2d, torch.randn(3, 2, 3, 3, dtype=dtype),
                      torch.tensor([0.5, 0.2, -0.1], dtype=dtype), (1, 1), kind="conv")
    x = torch.rand(1, 2, 5, 5, dtype=dtype)
    scale = torch.tensor([tiny, 1.0, 2.0], dtype=dtype)
    shift = torch.tensor([3.0, -0.2, 0.1], dtype=dtype)
    folded = call.folded(scale, shift)
    with torch.no_grad():
        z = folded.output(x)
        r = z * torch.randn_like(z)
        got = gamma_folded(Gamma(0.25), x, call, scale, shift, z, r)
        want = closed_gradient(Gamma(0.25), x, folded, z, r, True)
    assert got is None
    assert want is not None and bool(torch.isfinite(want).all())
    # and the folded weight's answer is the matrix form's
    torch.testing.assert_close((x * want).to(DT), dense_relevance(Gamma(0.25), folded, x, r),
                               rtol=1e-5 if dtype == torch.float32 else 1e-9,
                               atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("rule", [Gamma(0.25), AlphaBeta(2.0, 1.0), ZPlus()], ids=repr)
def test_gamma_through_batch_norm_with_a_subnormal_scale_equals_matrix_form(rule):
    """The same through a model: a batch norm whose weight is subnormal in one channel (for
    z⁺ and α-β, whose folded forms divide the bias by the scale too)."""
    # (in float64: 1e-310 is 0 in float32)
    net = FoldNet(True, [1e-310, 0.7, 0.9], relu_after=False, first=Epsilon(1e-6), seed=7)
    torch.manual_seed(8)
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    got = library_lrp(net, x, 1, {net.c1: Epsilon(1e-6), net.c2: rule, "linear": Epsilon(1e-6)})
    with torch.no_grad():
        want = hand_lrp(net.steps(), x, 1, rule)
    assert bool(torch.isfinite(got).all()) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# Whole models: 16-bit floats, channels_last, parameters requiring grad, dispatch modes
# ---------------------------------------------------------------------------------------------


class BNNet(nn.Module):
    """conv-BN-ReLU, a residual conv-BN (outputs ≤ 0 carry relevance), a 1×1 conv read by the
    classifier directly, average pooling, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 5)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_var.uniform_(0.5, 2)
                bn.running_mean.normal_(0, 0.3)
                bn.weight.uniform_(0.2, 1.5)
                bn.bias.normal_(0, 0.3)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        h = F.relu(h + self.bn2(self.c2(h)))
        return self.fc(F.adaptive_avg_pool2d(self.c3(h), 1).flatten(1))


LRP_METHODS = ["lrp", "lrp_epsilon_plus", "lrp_epsilon_alpha2_beta1", "lrp_epsilon_gamma_box"]


def test_lrp_composites_in_16_bit_and_channels_last_follow_float64():
    """``explain`` with four composites: float32 channels_last and bfloat16 / float16 models
    (parameters requiring grad) against the same model and input, rounded to the dtype, in
    float64 (16-bit activations keep the forward pass's rounding: a few % of the map's
    largest value, the same before the fast closed forms)."""
    torch.manual_seed(12)
    x = torch.randn(2, 3, 8, 8)
    for dtype, fmt, tol in ((torch.float32, torch.channels_last, 1e-4),
                            (torch.bfloat16, torch.contiguous_format, 8e-2),
                            (torch.float16, torch.contiguous_format, 6e-2)):
        xd = x.to(dtype)
        want = explain(BNNet().to(dtype).to(DT).eval(), xd.to(DT), 1, LRP_METHODS)
        net = BNNet().to(dtype).eval()
        for p in net.parameters():
            p.requires_grad_(True)
        got = explain(net, xd.to(memory_format=fmt), 1, LRP_METHODS)
        for k in LRP_METHODS:
            assert got[k].dtype == dtype and got[k].shape == (2, 1, 8, 8)
            scale = float(want[k].abs().max())
            assert scale > 0
            torch.testing.assert_close(got[k].to(DT), want[k], rtol=tol, atol=tol * scale)


def _modes():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    return [FlopCounterMode(display=False), Passthrough(),
            torch.autograd.graph.allow_mutation_on_saved_tensors()]


@pytest.mark.parametrize("mode", range(3), ids=["flops", "dispatch", "mutation"])
def test_lrp_composites_under_the_callers_modes_are_unchanged(mode):
    net = BNNet().to(DT).eval()
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    want = explain(net, x, 1, LRP_METHODS)
    with _modes()[mode]:
        got = explain(net, x, 1, LRP_METHODS)
    for k in LRP_METHODS:
        assert torch.equal(got[k], want[k])


# ---------------------------------------------------------------------------------------------
# Excitation backprop: p / z where z is excitatory, 0 elsewhere
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "positive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_excitation_denominator_at_the_threshold(dtype, signed):
    """At ε exactly, just below and above it, ±0, subnormals, ±inf and NaN: a unit passes
    ``p / z`` where ``|z| ≥ ε`` (signed) or ``z ≥ ε``, nothing elsewhere (finite signals)."""
    eps = torch.tensor(excitation_eps(dtype), dtype=dtype)
    below = torch.nextafter(eps, torch.zeros_like(eps))
    above = torch.nextafter(eps, torch.ones_like(eps))
    sub = float(torch.finfo(dtype).tiny) / 4  # subnormal
    z = torch.stack([eps, -eps, below, -below, above, -above]).tolist() + [
        0.0, -0.0, sub, -sub, 1.0, -2.0, float("inf"), -float("inf"), float("nan")]
    z = torch.tensor(z, dtype=dtype)
    passes = [True, signed, False, False, True, signed, False, False, False, False, True,
              signed, True, signed, None]
    cell = ExcitationCell(signed=signed)
    for p in (torch.linspace(-3, 3, z.numel(), dtype=dtype), torch.full_like(z, 1e30)):
        got = p / cell.denominator(z)
        assert got.dtype == dtype
        for k, ok in enumerate(passes):
            if ok is None:
                assert bool(got[k].isnan())
            elif ok:
                assert got[k].item() == (p[k] / z[k]).item()
            else:
                assert got[k].item() == 0.0


class EBPNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(F.relu(self.up(h)).mean((2, 3)))


def _ebp_maps(net, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [excitation_backprop(net, x, 2, saliency_layer="c1"),
                excitation_backprop(net, x, 2, saliency_layer="c1", signed=False),
                contrastive_excitation_backprop(net, x, 2, saliency_layer="c1",
                                                contrast_layer="up")]


@pytest.mark.parametrize("dtype,fmt", [(torch.float64, torch.channels_last),
                                       (torch.bfloat16, torch.contiguous_format)],
                         ids=["f64-channels-last", "bf16"])
def test_excitation_backprop_ignores_the_callers_modes(dtype, fmt):
    """Excitation backprop, its positive variant and the contrastive replay (two backward
    passes over cached denominators) under the caller's dispatch modes: bit for bit the maps
    without them; the contrastive map is the positive part of the difference of the target's
    and the dual's excitation (linear in the top signal)."""
    net = EBPNet().to(dtype).eval()
    net.c1.weight.requires_grad_(True)
    torch.manual_seed(11)
    x = torch.randn(2, 3, 8, 8).to(dtype).to(memory_format=fmt)
    got = _ebp_maps(net, x)
    for a in got:
        assert a.dtype == dtype and a.shape == (2, 1, 8, 8)
        assert bool((a.flatten(1).abs().amax(1) > 0).all())
    for mode in _modes():
        with mode:
            again = _ebp_maps(net, x)
        assert all(torch.equal(a, b) for a, b in zip(again, got))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_gamma_through_batch_norm_1d_equals_matrix_form(kind):
    """γ behind a BatchNorm1d folded into a linear layer (features last) or a 1-D convolution
    (channels at dimension 1), outputs of both signs carrying relevance: the matrix form."""
    torch.manual_seed(13)
    if kind == "linear":
        first, layer, last = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)
        x = torch.randn(3, 5, dtype=DT)
    else:
        first, layer = nn.Conv1d(2, 6, 3, padding=1), nn.Conv1d(6, 4, 3, padding=1)
        last = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5, 3))
        x = torch.randn(3, 2, 5, dtype=DT)
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.normal_(0, 0.3)
        bn.weight.uniform_(0.3, 1.5)
        bn.bias.normal_(0, 0.3)
    net = nn.Sequential(first, nn.ReLU(), layer, bn, last).to(DT).eval()
    rule = Gamma(0.25)
    with LRPContext({first: Epsilon(1e-6), layer: rule, "linear": Epsilon(1e-6)}, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, 1].sum(), xx)
    got = (xx * g).detach()
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    shift = (bn.bias - bn.running_mean * scale).detach()
    if kind == "conv1d":
        scale, shift = scale[:, None], shift[:, None]
    steps = [("affine", first, Epsilon(1e-6)), ("relu",),
             ("affine", lambda t: layer(t) * scale + shift, None),
             ("affine", last, Epsilon(1e-6))]
    assert got.shape == x.shape and got.dtype == DT
    for n in range(x.shape[0]):
        with torch.no_grad():
            want = hand_lrp(steps, x[n:n + 1], 1, rule)
        assert want.abs().max() > 0
        torch.testing.assert_close(got[n], want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
