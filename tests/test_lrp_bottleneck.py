"""LRP through ResNet blocks (torchvision's ``Bottleneck`` and ``BasicBlock``, stride 1 and 2,
identity and downsampling shortcuts) against a hand-written float64 matrix-form LRP, and who is
right where Zennit 0.5.1 (run as a black box) differs.

The reference applies the rules of Bach et al. (2015) and Montavon et al. (2019), "Layer-wise
relevance propagation: an overview", one dense matrix per affine map (``matrix`` of
``tests/test_lrp_closed.py``): batch norm folded into the convolution before it (canonization);
z⁺ on convolutions with the positive bias in the denominator and the stabiliser ``ε·sign(z)``
(``sign(0) = 1``), ε on the linear head, flat on the first layer for ``EpsilonPlusFlat``; a ReLU
passes relevance unchanged; average pooling and the residual sum ``a + b`` split relevance in
proportion to their inputs, ``R_a = a / (a + b) · R``.

Findings (float64, tests below): ours equals the reference to 1e-15.  Zennit equals the same
reference to 1e-8 only with three conventions of its own, each of which alone moves the map by
1e-5 to 1e-3 of its largest value:

1. average pooling: Zennit's ``Norm`` rule adds ``ε = 1e-6`` (times the sign) to the pooled
   *mean*, i.e. ``R_i = x_i / (Σ x + n·ε) · R`` over a window of ``n``; ours is exactly
   proportional (a paper convention; it conserves relevance);
2. the residual sum: Zennit's ``Norm`` on its ``Sum`` module adds ``ε·sign`` to ``a + b``; ours
   splits exactly;
3. batch norm folding: Zennit's ``ResNetCanonizer`` folds each batch norm into its convolution
   and leaves the batch norm as weight 1, bias 0, mean 0, variance 1 *with its own eps*, so every
   folded layer is scaled by ``1/sqrt(1 + eps)`` (eps = 1e-5: about 5e-6; the canonized model's
   output differs from the model's by about 1e-6 relative): Zennit explains a slightly different
   function.  Ours folds exactly.

With the batch norms' eps set to 0 and Zennit's ``Sum`` / ``AdaptiveAvgPool2d`` rules given no
stabiliser, ours and Zennit's agree to 1e-15 on a full Bottleneck ResNet.  1 and 2 are defensible
choices (ε stabilisers where a denominator may be near zero; ours gives zero relevance to an
exactly zero denominator instead, tested); 3 is Zennit's inexactness.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from torchray_like.attribution import lrp_composites
from torchray_like.attribution.registry import METHODS

from .test_lrp_closed import matrix

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
EPS = 1e-6  # the standard composites' ε (Zennit's too)
TARGET = 1
# (block, stride, downsampling shortcut): identity shortcut, 1x1 conv shortcut, stride 2
CONFIGS = [("bottleneck", 1, False), ("bottleneck", 1, True), ("bottleneck", 2, True),
           ("basic", 1, False), ("basic", 2, True)]
IDS = [f"{b}-s{s}-{'down' if d else 'id'}" for b, s, d in CONFIGS]


class Tiny(nn.Module):
    """conv (bias) → ReLU → one torchvision ResNet block → adaptive average pool → linear,
    batch norms with random statistics, float64."""

    def __init__(self, block: str, stride: int, down: bool, seed: int = 0, ch: int = 8):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, ch, 3, padding=1)
        self.relu = nn.ReLU()
        ds = (nn.Sequential(nn.Conv2d(ch, ch, 1, stride=stride, bias=False), nn.BatchNorm2d(ch))
              if down else None)
        unit = (Bottleneck(ch, ch // 4, stride=stride, downsample=ds) if block == "bottleneck"
                else BasicBlock(ch, ch, stride=stride, downsample=ds))
        self.layer1 = nn.Sequential(unit)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, 3)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        self.eval().to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.conv1(x)))
        return self.fc(self.avgpool(x).flatten(1))


# ---------------------------------------------------------------------------------------------
# The reference: dense matrices, one formula per rule, no library code.
# ---------------------------------------------------------------------------------------------

Op = Callable[[torch.Tensor], torch.Tensor]


def sign_stab(d: torch.Tensor, eps: float) -> torch.Tensor:
    return d + eps * torch.where(d >= 0, 1.0, -1.0).to(d.dtype)


def divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, zero where ``den`` is exactly zero (no relevance, not nan)."""
    return torch.where(den == 0, 0.0, num / torch.where(den == 0, 1.0, den))


def propagate(Z: torch.Tensor, den: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``R_j = Σ_i Z_ij / den_i · R_i``."""
    return (Z * divide(R.flatten(), den)[:, None]).sum(0)


def zplus(op: Op, a: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    W, b = matrix(op, tuple(a.shape))
    Z = (a.flatten()[None, :] * W).clamp(min=0)
    return propagate(Z, sign_stab(Z.sum(1) + b.clamp(min=0), EPS), R).reshape(a.shape)


def epsilon(op: Op, a: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    W, b = matrix(op, tuple(a.shape))
    Z = a.flatten()[None, :] * W
    return propagate(Z, sign_stab(Z.sum(1) + b, EPS), R).reshape(a.shape)


def flat(conv: nn.Conv2d, a: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Every connection of the convolution counts 1 (its weights and the input ignored)."""
    ones = torch.ones_like(conv.weight)
    W, _ = matrix(lambda t: F.conv2d(t, ones, None, conv.stride, conv.padding), tuple(a.shape))
    return propagate(W, sign_stab(W.sum(1), EPS), R).reshape(a.shape)


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, keep_eps: bool) -> Op:
    """conv then batch norm as one affine map; ``keep_eps``: scaled by ``1/sqrt(1 + eps)``, as
    a folded batch norm left with its eps computes (Zennit's canonizer)."""
    scale = (1 + bn.eps) ** -0.5 if keep_eps else 1.0
    return lambda t: bn(conv(t)) * scale


def reference(m: Tiny, x: torch.Tensor, first: str = "zplus", pool_eps: float = 0.0,
              sum_eps: float = 0.0, keep_eps: bool = False) -> torch.Tensor:
    """Relevance at the input of ``m`` (one sample), channels summed.  ``pool_eps`` /
    ``sum_eps``: a stabiliser ``ε·sign`` on the pooled mean / the residual sum;
    ``keep_eps``: Zennit's fold (see :func:`folded`)."""
    blk = m.layer1[0]
    with torch.no_grad():
        x0 = x[0]
        a = m.conv1(x0[None])[0].clamp(min=0)
        pairs = [(blk.conv1, blk.bn1), (blk.conv2, blk.bn2)]
        if isinstance(blk, Bottleneck):
            pairs.append((blk.conv3, blk.bn3))
        convs, h = [], a
        for k, (conv, bn) in enumerate(pairs):
            op = folded(conv, bn, keep_eps)
            convs.append((op, h))
            h = op(h[None])[0]
            if k < len(pairs) - 1:
                h = h.clamp(min=0)
        short: Optional[Op] = (folded(blk.downsample[0], blk.downsample[1], keep_eps)
                               if blk.downsample is not None else None)
        s = short(a[None])[0] if short is not None else a
        o = (h + s).clamp(min=0)
        p = o.mean((1, 2))
        y = m.fc(p[None])[0]
        Ry = torch.zeros_like(y)
        Ry[TARGET] = y[TARGET]
        Rp = epsilon(m.fc, p, Ry)
        # average pooling: x_i / n over the stabilised mean (LRP-ε with weights 1/n)
        Ro = o / o[0].numel() * divide(Rp, sign_stab(p, pool_eps) if pool_eps else p)[:, None, None]
        total = sign_stab(h + s, sum_eps) if sum_eps else h + s
        R = h * divide(Ro, total)  # the ReLU after the sum passes Ro unchanged
        Rs = s * divide(Ro, total)
        for op, inp in reversed(convs):
            R = zplus(op, inp, R)
        Ra = R + (zplus(short, a, Rs) if short is not None else Rs)
        Rx = zplus(m.conv1, x0, Ra) if first == "zplus" else flat(m.conv1, x0, Ra)
    return Rx.sum(0)


def ours(m: nn.Module, x: torch.Tensor, composite: str = "epsilon_plus") -> torch.Tensor:
    return METHODS["lrp"](m, x, TARGET, composite=getattr(lrp_composites, composite)())[0, 0]


def zennit_map(m: nn.Module, x: torch.Tensor, exact: bool = False,
               composite: str = "EpsilonPlus") -> torch.Tensor:
    """Zennit 0.5.1 as a black box; ``exact``: its ``Sum`` and ``AdaptiveAvgPool2d`` rules
    without stabiliser (a zero denominator left as 1: its numerator is zero there)."""
    zc = pytest.importorskip("zennit.composites")
    from zennit import layer as zlayer
    from zennit import rules as zrules
    from zennit import torchvision as ztv
    from zennit.attribution import Gradient

    def plain(d: torch.Tensor) -> torch.Tensor:
        return torch.where(d == 0, torch.ones_like(d), d)

    layer_map = ([(zlayer.Sum, zrules.Norm(stabilizer=plain)),
                  (nn.AdaptiveAvgPool2d, zrules.Norm(stabilizer=plain))] if exact else None)
    comp = getattr(zc, composite)(layer_map=layer_map, canonizers=[ztv.ResNetCanonizer()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Gradient(copy.deepcopy(m), comp) as attributor:
            _, rel = attributor(x, lambda out: torch.eye(out.shape[1], dtype=out.dtype)[
                [TARGET] * out.shape[0]] * out)
    return rel.sum(1)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def sample(seed: int = 1, size: int = 6) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(1, 3, size, size, dtype=DT)


def zero_eps(m: nn.Module) -> nn.Module:
    m = copy.deepcopy(m)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eps = 0.0
    return m


# ---------------------------------------------------------------------------------------------
# Ours against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("first", ["zplus", "flat"])
def test_ours_equals_the_matrix_form_reference(config: Tuple[str, int, bool], first: str):
    m, x = Tiny(*config), sample()
    got = ours(m, x, "epsilon_plus" if first == "zplus" else "epsilon_plus_flat")
    want = reference(m, x, first)
    assert got.shape == (6, 6) and got.dtype == DT and want.abs().max() > 1e-4
    assert rel(got, want) <= 1e-12
    # the three Zennit conventions each move the reference measurably (the test can tell)
    for kw in ({"pool_eps": EPS}, {"sum_eps": EPS}, {"keep_eps": True}):
        assert rel(reference(m, x, first, **kw), want) > 1e-9, kw


def test_zero_denominators_give_zero_relevance_not_nan():
    """Hostile: a block output channel that is zero everywhere (pooled mean exactly 0) and a
    residual sum exactly 0 at some positions: ours and the reference give finite, equal maps."""
    m, x = Tiny("bottleneck", 1, False), sample()
    blk = m.layer1[0]
    with torch.no_grad():
        blk.bn3.bias[0] = -100.0  # channel 0 of the block output is dead: its mean is 0
        m.conv1.bias[1] = -100.0  # channel 1: the shortcut is 0 ...
        blk.conv3.weight[1].zero_()  # ... and so is the residual branch: a + b = 0 exactly
        blk.bn3.running_mean[1] = 0.0
        blk.bn3.bias[1] = 0.0
    a = torch.relu(m.conv1(x))
    h = blk.bn3(blk.conv3(torch.relu(blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(a))))))))
    assert bool((blk(a)[0, 0] == 0).all()) and bool(((h + a)[0, 1] == 0).all())
    got, want = ours(m, x), reference(m, x)
    assert bool(torch.isfinite(got).all()) and rel(got, want) <= 1e-12


# ---------------------------------------------------------------------------------------------
# Zennit against the reference: equal with its three conventions, and to ours without them
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_zennit_equals_the_reference_with_its_three_conventions(config: Tuple[str, int, bool]):
    m, x = Tiny(*config), sample()
    theirs = zennit_map(m, x)
    zennit_like = reference(m, x, pool_eps=EPS, sum_eps=EPS, keep_eps=True)
    assert rel(theirs, zennit_like) <= 1e-8
    assert rel(theirs, reference(m, x)) > 1e-5  # the plain rules are not Zennit's
    assert rel(ours(m, x), theirs) > 1e-5


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_zennit_without_its_conventions_equals_ours(config: Tuple[str, int, bool]):
    m, x = zero_eps(Tiny(*config)), sample()
    assert rel(ours(m, x), zennit_map(m, x, exact=True)) <= 1e-12


@pytest.mark.parametrize("composite", ["EpsilonPlus", "EpsilonPlusFlat"])
def test_full_bottleneck_resnet_float64(composite: str):
    """torchvision ``ResNet(Bottleneck, [1, 1, 1, 1])`` (default batch norms, eps 1e-5), 32×32:
    Zennit's default differs from ours by about 1e-4 of the largest relevance; with batch
    norm eps 0 and no stabiliser on its sums and average pool, by float64 rounding only."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5).eval().to(DT)
    x = sample(0, 32)
    snake = {"EpsilonPlus": "epsilon_plus", "EpsilonPlusFlat": "epsilon_plus_flat"}[composite]
    assert rel(ours(model, x, snake), zennit_map(model, x, composite=composite)) > 1e-5
    exact = zero_eps(model)
    assert rel(ours(exact, x, snake), zennit_map(exact, x, True, composite)) <= 1e-12
