"""LRP-γ and LRP-αβ on ReLU'd inputs, in closed form (``lrp_closed``), against the matrix-form
LRP of ``tests/lrp_matrix_form.py`` — on the paths the closed form takes by the sign of the
layer's output:

* γ shares the relevance of outputs with ``z > 0`` by ``w + γw⁺`` and of the others by
  ``w + γw⁻``.  Where no relevance reaches an output with ``z ≤ 0`` (a ReLU right after the
  layer zeroes their gradient) it takes one transposed product; otherwise two.
* The stabiliser ε is folded into the bias of the products (``z̃⁺ + ε``, ``z̃⁻ − ε``), and
  ``ε = 0`` or ``γ = 0`` take the general one.
* Outputs exactly zero (``R = 0`` there) and layers without bias, stacked and separate
  products.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.lrp_matrix_form import DT, FoldNet, hand_lrp, library_lrp
from torchray_like.attribution import lrp_closed
from torchray_like.attribution.lrp import LRPContext
from torchray_like.attribution.lrp_closed import (
    alpha_beta_folded,
    closed_gradient,
    gamma_folded,
    zplus_folded,
)
from torchray_like.attribution.lrp_rules import (
    AffineCall,
    AlphaBeta,
    Epsilon,
    Gamma,
    LinearMap,
    ZPlus,
)

# γ's and α-β's folded forms on these small layers too (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("folded_forms_on_small_layers")

RULES = [Gamma(0.25), Gamma(0.1), Gamma(0.0), Gamma(0.25, epsilon=0.0), Gamma(0.25, epsilon=1e-2),
         Gamma(3.0), AlphaBeta(2.0, 1.0), AlphaBeta(1.0, 0.0), AlphaBeta(3.0, 2.0),
         AlphaBeta(2.0, 1.0, epsilon=0.0), AlphaBeta(2.0, 1.0, epsilon=1e-2), ZPlus()]


class SignNet(nn.Module):
    """conv (signed input) → ReLU → conv ``c2`` → ReLU → conv ``c3`` → flatten → linear:
    ``c2``'s negative outputs get no relevance (the ReLU after it), ``c3``'s do (the linear
    layer reads them directly)."""

    def __init__(self, bias: bool, wide: bool):
        super().__init__()
        torch.manual_seed(51)
        c = 24 if wide else 4  # wide on a 2×2 map: weights larger than the unfolded input
        self.c1 = nn.Conv2d(2, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=bias)
        self.c3 = nn.Conv2d(c, 3, 3, padding=1, bias=bias)
        self.side = 2 if wide else 6
        self.fc = nn.Linear(3 * self.side ** 2, 2)
        if bias:
            with torch.no_grad():  # a zero bias: outputs exactly 0 on the input's zero region
                self.c2.bias[0] = 0.0
                self.c3.bias[1] = 0.0
        self.to(DT).eval()

    def forward(self, x):
        t = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(self.c3(t).flatten(1))

    def steps(self):
        return [("affine", self.c1, Epsilon(1e-6)), ("relu",), ("affine", self.c2, None),
                ("relu",), ("affine", self.c3, None),
                ("affine", lambda t: self.fc(t.flatten(1)), Epsilon(1e-6))]


def lrp_input(net: SignNet, x: torch.Tensor, target: int, rule) -> torch.Tensor:
    composite = {net.c1: Epsilon(1e-6), net.c2: rule, net.c3: rule, "linear": Epsilon(1e-6)}
    with LRPContext(composite, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, target].sum(), xx)
    return (xx * g).detach()[0]


def inputs(side: int) -> torch.Tensor:
    torch.manual_seed(52)
    x = torch.randn(1, 2, side, side, dtype=DT) * 3
    x[:, :, : side // 2] = 0.0  # c1's output is its bias there, c2's outputs its own
    return x


@pytest.mark.parametrize("wide", [False, True], ids=["stacked", "separate"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_rules_on_both_output_sign_paths_equal_matrix_form(rule, bias, wide):
    net = SignNet(bias, wide)
    x = inputs(net.side)
    for target in (0, 1):
        got = lrp_input(net, x, target, rule)
        with torch.no_grad():
            want = hand_lrp(net.steps(), x, target, rule)
        assert got.shape == x.shape[1:] and got.dtype == DT
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("rule", [Gamma(0.25), Gamma(0.25, epsilon=0.0)], ids=repr)
def test_gamma_takes_one_transposed_product_where_negative_outputs_get_no_relevance(
        rule, monkeypatch):
    """``c2`` (a ReLU after it) transposes with its own number of output channels, ``c3``
    (whose negative outputs carry relevance) with twice as many: both shares stacked."""
    net = SignNet(bias=True, wide=False)
    x = inputs(net.side)
    seen: List[Tuple[int, int]] = []
    transpose = LinearMap.transpose

    def spy(self, s, weight, xin):
        seen.append((int(xin.shape[1]), int(weight.shape[0])))
        return transpose(self, s, weight, xin)

    monkeypatch.setattr(LinearMap, "transpose", spy)
    lrp_input(net, x, 0, rule)
    # (input channels, rows of the transposed weight) per conv, from the top down
    c3_rows = [rows for channels, rows in seen if channels == 4 and rows in (3, 6)]
    c2_rows = [rows for channels, rows in seen if channels == 4 and rows == 4]
    assert c3_rows == [6] and c2_rows == [4]
    with torch.no_grad():  # and c3's relevance does reach outputs with z ≤ 0
        z3 = net.c3(torch.relu(net.c2(torch.relu(net.c1(x)))))
        assert bool((z3 <= 0).any()) and bool((z3 > 0).any())


def test_gamma_float32_on_a_residual_block_matches_float64():
    """A residual sum before the ReLU (negative outputs of the block's last convolution carry
    relevance) in float32 against the same model in float64: the one- and two-product paths
    mixed within one network, to float32 rounding."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(53)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            with torch.no_grad():
                self.bn.running_var.uniform_(0.5, 2.0)
                self.bn.running_mean.normal_(0, 0.2)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu(h + self.bn(self.b(torch.relu(self.a(h)))))
            return self.fc(h.mean((2, 3)))

    net32 = Block().eval()
    net64 = Block().to(DT).eval()
    x = torch.randn(2, 3, 10, 10)
    maps = []
    for net, xx in ((net32, x), (net64, x.to(DT))):
        with LRPContext({"conv": Gamma(0.25), "linear": Epsilon(1e-6)}, model=net):
            xx = xx.clone().requires_grad_()
            (g,) = torch.autograd.grad(net(xx)[:, 2].sum(), xx)
        maps.append((xx * g).detach())
    assert maps[0].dtype == torch.float32 and maps[1].abs().max() > 0
    torch.testing.assert_close(maps[0].to(DT), maps[1], rtol=1e-4,
                               atol=1e-5 * float(maps[1].abs().max()))


# ---------------------------------------------------------------------------------------------
# γ behind a folded batch norm whose scales are all positive: no folded weight (gamma_folded)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relu_after", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("scales", [[1.5, 0.7, 0.9], [1.5, -0.7, 0.9], [1.5, 0.0, 0.9]],
                         ids=["positive", "negative", "zero"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("rule", [Gamma(0.25), Gamma(0.1), Gamma(0.25, epsilon=0.0),
                                  AlphaBeta(2.0, 1.0), AlphaBeta(1.0, 0.0),
                                  AlphaBeta(2.0, 1.0, epsilon=0.0)], ids=repr)
def test_rules_through_folded_batch_norm_equal_matrix_form(rule, bias, scales, relu_after):
    """All scales positive: no folded weight (γ: the scale moves to the product's bias and the
    transposed products' input; α-β: it cancels); a scale ≤ 0 or ε = 0: the weight is folded.
    Either way the matrix-form LRP of the merged layer."""
    net = FoldNet(bias, scales, relu_after, first=Epsilon(1e-6), seed=54)
    torch.manual_seed(55)
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    got = library_lrp(net, x, 1, {net.c1: Epsilon(1e-6), net.c2: rule, "linear": Epsilon(1e-6)})
    with torch.no_grad():
        want = hand_lrp(net.steps(), x, 1, rule)
    assert got.shape == (2, 6, 6) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))



@pytest.mark.parametrize("rule", [Gamma(0.25), Gamma(0.25, epsilon=0.0), AlphaBeta(2.0, 1.0),
                                  AlphaBeta(2.0, 1.0, epsilon=0.0), ZPlus()], ids=repr)
def test_rules_on_stacked_linear_layers_equal_matrix_form(rule):
    """Linear layers on a batch large enough that both shares run as one product over stacked
    output features (``[..., 2·out]``), one followed by a ReLU and one read directly by the
    next layer (γ's one- and two-product paths): each sample against the matrix form."""
    torch.manual_seed(57)
    l1, l2, l3, l4 = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)
    net = nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3, l4).to(DT).eval()
    x = torch.randn(6, 6, dtype=DT) * 2
    with LRPContext({l1: Epsilon(1e-6), l2: rule, l3: rule, l4: Epsilon(1e-6)}, model=net):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx)[:, 2].sum(), xx)
    got = (xx * g).detach()
    assert got.shape == x.shape and got.dtype == DT
    steps = [("affine", l1, Epsilon(1e-6)), ("relu",), ("affine", l2, None), ("relu",),
             ("affine", l3, None), ("affine", l4, Epsilon(1e-6))]
    for n in range(x.shape[0]):
        with torch.no_grad():
            want = hand_lrp(steps, x[n:n + 1], 2, rule)
        torch.testing.assert_close(got[n], want, rtol=1e-9,
                                   atol=1e-12 * float(want.abs().max().clamp(min=1e-30)))
    assert bool(got.abs().sum(1).gt(0).all())


FOLDED = {"zplus": (zplus_folded, [ZPlus(), ZPlus(epsilon=1e-3)], ZPlus(epsilon=0.0)),
          "gamma": (gamma_folded, [Gamma(0.25), Gamma(0.1)], Gamma(0.25, epsilon=0.0)),
          "alpha_beta": (alpha_beta_folded, [AlphaBeta(2.0, 1.0), AlphaBeta(3.0, 2.0)],
                         AlphaBeta(2.0, 1.0, epsilon=0.0))}


@pytest.mark.parametrize("form", sorted(FOLDED))
def test_folded_forms_take_positive_scales_only(form):
    """Each folded form equals its rule on the folded call where every scale is positive (both
    output signs carrying relevance), and declines (``None``) a scale ≤ 0, ε = 0, another
    rule, a call without a closed form, and tensors off the CPU."""
    fn, rules, no_eps = FOLDED[form]
    torch.manual_seed(56)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    x = torch.rand(2, 3, 5, 5, dtype=DT)  # x ≥ 0, as after a ReLU
    call = AffineCall(F.conv2d, conv.weight, conv.bias, (1, 1), kind="conv")
    scale = torch.tensor([0.5, 1.5, 2.0, 0.1], dtype=DT)
    shift = torch.tensor([0.1, -0.4, 0.0, 0.3], dtype=DT)
    folded = call.folded(scale, shift)
    with torch.no_grad():
        z = folded.output(x)
        r = z * torch.randn_like(z)
    assert bool((r[z <= 0] != 0).any())

    def run(rule, a=scale, c=call):
        with torch.no_grad():
            return fn(rule, x, c, a, shift, z, r) if form == "gamma" else fn(rule, x, c, a,
                                                                              shift, r)
    for rule in rules:
        got = run(rule)
        with torch.no_grad():
            want = closed_gradient(rule, x, folded, z, r, True)
        assert got is not None and got.shape == x.shape and got.dtype == DT
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14 * float(want.abs().max()))
    assert run(rules[0], -scale) is None
    assert run(rules[0], scale * torch.tensor([1.0, 0, 1, 1], dtype=DT)) is None
    assert run(no_eps) is None
    assert run(Epsilon(1e-6)) is None
    # off the CPU (here the meta device) the sign test would wait for the device: declined
    assert run(rules[0], scale.to("meta")) is None
    same = AffineCall(F.conv2d, conv.weight, conv.bias, (1, "same"), kind="conv")
    assert run(rules[0], c=same) is None


@pytest.mark.parametrize("form", ["gamma", "alpha_beta"])
def test_folded_forms_leave_small_layers_to_the_folded_weight(form, monkeypatch):
    """At the default ``FOLD_FIXED_COST`` a small layer is declined (the folded weight is
    cheaper there) and a layer whose weight outweighs its outputs is taken; the relevance of a
    model through both is the same to rounding."""
    monkeypatch.setattr(lrp_closed, "FOLD_FIXED_COST", 1 << 16)
    fn, rules, _ = FOLDED[form]
    torch.manual_seed(59)
    scale = torch.rand(512, dtype=DT) + 0.5
    shift = torch.randn(512, dtype=DT) * 0.1

    def call_for(conv, x):
        c = AffineCall(F.conv2d, conv.weight, conv.bias, (1, 1), kind="conv")
        with torch.no_grad():
            z = c.folded(scale[:conv.out_channels], shift[:conv.out_channels]).output(x)
        args = (rules[0], x, c, scale[:conv.out_channels], shift[:conv.out_channels])
        return fn(*args, z, z) if form == "gamma" else fn(*args, z)

    small = nn.Conv2d(3, 4, 3, padding=1).to(DT)  # 108 weights
    assert call_for(small, torch.rand(1, 3, 8, 8, dtype=DT)) is None
    large = nn.Conv2d(128, 512, 3, padding=1).to(DT)  # 590 k weights, 2 k outputs
    assert call_for(large, torch.rand(1, 128, 2, 2, dtype=DT)) is not None
    net = FoldNet(True, [1.5, 0.7, 0.9], relu_after=False, first=Epsilon(1e-6))
    x = torch.randn(1, 2, 6, 6, dtype=DT)
    composite = {net.c1: Epsilon(1e-6), net.c2: rules[0], "linear": Epsilon(1e-6)}
    weight_path = library_lrp(net, x, 1, composite)
    monkeypatch.setattr(lrp_closed, "FOLD_FIXED_COST", 0)
    folded_path = library_lrp(net, x, 1, composite)
    assert weight_path.abs().max() > 0
    torch.testing.assert_close(folded_path, weight_path, rtol=1e-9,
                               atol=1e-12 * float(weight_path.abs().max()))
