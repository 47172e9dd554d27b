"""Non-linearities a rectifier rule does not cover are named, however they are written.

Issue 17, item 5: an erf-written GELU, ``x * torch.special.expit(x)``, in-place
``x.sigmoid_()``, ``F.leaky_relu_`` and ``torch.where(x > 0, x, 0.1 * x)`` next to ReLUs used to
give a map mixing the guided rule with the plain gradient without the promised
:class:`UnhandledActivationWarning`.  Harmless operations (views, sums, concatenation, pooling,
a softmax at the output, a parameter's own non-linearity) must stay silent.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.common import ReLUContext, UnhandledActivationWarning
from torchray_like.attribution.deconvnet import DeConvNetContext, deconvnet
from torchray_like.attribution.guided_backprop import GuidedBackpropContext, guided_backprop

# construct -> (activation, the names the warning gives)
CONSTRUCTS = {
    "erf-written GELU": (lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), "erf"),
    "torch.special.erf GELU": (
        lambda x: 0.5 * x * (1 + torch.special.erf(x / math.sqrt(2))), "erf"),
    "x * torch.special.expit(x)": (lambda x: x * torch.special.expit(x), "sigmoid"),
    "in-place x.sigmoid_()": (lambda x: x * x.clone().sigmoid_(), "sigmoid"),
    "torch.sigmoid_": (lambda x: torch.sigmoid_(x * 1), "sigmoid"),
    "F.leaky_relu_": (lambda x: F.leaky_relu_(x * 1, 0.1), "leaky_relu"),
    "F.elu_": (lambda x: F.elu_(x * 1), "elu"),
    "Tensor.tanh_": (lambda x: (x * 1).tanh_(), "tanh"),
    "torch.ops.aten.gelu": (lambda x: torch.ops.aten.gelu(x), "gelu"),
    "torch.ops.aten.silu.default": (lambda x: torch.ops.aten.silu.default(x), "silu"),
    "where(x > 0, x, 0.1 * x)": (lambda x: torch.where(x > 0, x, 0.1 * x), "where"),
    "Tensor.where(x >= 0, 0.2 * x)": (lambda x: x.where(x >= 0, 0.2 * x), "where"),
    "ELU written with exp": (lambda x: torch.where(x > 0, x, x.exp() - 1), "exp", "where"),
    "x * (x > 0)": (lambda x: x * (x > 0), "mask multiply"),
    "masked_fill(x < 0, 0)": (lambda x: x.masked_fill(x < 0, 0.0), "masked_fill"),
    "sine activation": (lambda x: torch.sin(x), "sin"),
    "softplus by hand": (lambda x: torch.log1p(torch.exp(x)), "exp"),
}


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class ReLUThen(nn.Module):
    """conv → ReLU → conv → activation under test → linear."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = Act(act)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv2(F.relu(self.conv1(x)))).flatten(1))


def batch():
    return torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("construct", list(CONSTRUCTS))
def test_every_construct_is_named_by_the_context(construct):
    act, *names = CONSTRUCTS[construct]
    net = ReLUThen(act).double()
    with pytest.warns(UnhandledActivationWarning, match=f"{names[0]} ×1"):
        with GuidedBackpropContext() as ctx:
            net(batch())
    assert ctx.counts == {"relu": 1}
    assert ctx.unhandled == {name: 1 for name in names}


@pytest.mark.parametrize("construct", list(CONSTRUCTS))
@pytest.mark.parametrize("method", [guided_backprop, deconvnet])
def test_every_construct_is_named_by_the_methods(construct, method):
    act, *names = CONSTRUCTS[construct]
    net = ReLUThen(act).double()
    with pytest.warns(UnhandledActivationWarning, match=names[-1]) as record:
        smap = method(net, batch(), 1)
    assert smap.shape == (2, 1, 6, 6) and smap.dtype == torch.float64
    assert sum(issubclass(w.category, UnhandledActivationWarning) for w in record) == 1


def test_the_map_is_the_mixed_one_the_warning_announces():
    """What the warning says is true: the leaky part keeps its plain gradient (slope 0.1 on
    the negative side), the ReLU gets the guided rule."""
    x = torch.tensor([[-2.0, -1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    with pytest.warns(UnhandledActivationWarning, match="where"):
        with GuidedBackpropContext():
            y = torch.where(x > 0, x, 0.1 * x) + torch.relu(x)
    (g,) = torch.autograd.grad(y, x, torch.tensor([[-1.0, 1.0, 1.0]], dtype=torch.float64))
    assert g.tolist() == [[-0.1, 0.1, 2.0]]


def test_thresholds_away_from_zero_stay_silent_as_before():
    """Only a gate on the sign of a tensor autograd records is reported (the where-written
    rectifier family); where(x > 0.2, ...) is left alone, as the rule test asserts."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GuidedBackpropContext() as ctx:
            torch.where(x > 0.2, x, 0.1 * x)
            torch.relu(x)
    assert ctx.unhandled == {}


class Harmless(nn.Module):
    """A ReLU network with every common operation that is no activation: views, adds,
    concatenation, batch norm, pooling, a constant's and a parameter's own non-linearity,
    masks built from constants, and a softmax at the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.log_scale = nn.Parameter(torch.tensor(0.3))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = torch.cat([h, h.flip(-1)], 1).view(x.shape[0], 8, 6, 6) + 1.0
        h = self.bn(h) * self.log_scale.exp()            # a parameter's exp: not on the path
        position = torch.sin(torch.arange(6.0, dtype=x.dtype))  # a constant's sine
        h = h + position
        mask = torch.ones(6, 6, dtype=x.dtype) > 0        # a constant mask
        h = torch.where(mask, h, h.flip(-1)).masked_fill(~mask, 0.0) * 2.0
        h = F.max_pool2d(h, 2) + F.avg_pool2d(h, 2)
        logits = self.fc(h.mean((2, 3)).reshape(-1, 8))
        return F.softmax(logits, 1)


@pytest.mark.parametrize("model", ["pure ReLU", "harmless operations"])
def test_harmless_models_warn_nothing(model):
    net = (ReLUThen(torch.relu) if model == "pure ReLU" else Harmless()).double().eval()
    x = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GuidedBackpropContext() as ctx:
            net(x)
        gb = guided_backprop(net, x, 1)
        dc = deconvnet(net, x, 1)
    assert ctx.unhandled == {} and ctx.replaced == (2 if model == "pure ReLU" else 1)
    assert gb.shape == dc.shape == (2, 1, 6, 6)


def test_no_grad_and_constant_nonlinearities_are_not_counted():
    """A non-linearity autograd does not record changes no gradient: not reported."""
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UnhandledActivationWarning, match=r"\(tanh ×1\)"), \
            GuidedBackpropContext() as ctx:
        with torch.no_grad():
            torch.sigmoid(x)
        F.gelu(torch.ones(3))
        y = torch.relu(x) + torch.tanh(x)
    assert ctx.unhandled == {"tanh": 1} and ctx.counts == {"relu": 1}
    assert y.requires_grad


def test_torchray_style_context_reports_too():
    """ReLUContext built with a user autograd.Function reports the same constructs."""
    from torchray_like.attribution.guided_backprop import GuidedBackpropReLU

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UnhandledActivationWarning, match=r"leaky_relu ×1, sigmoid ×1"):
        with ReLUContext(GuidedBackpropReLU) as ctx:
            F.leaky_relu_(torch.relu(x) * 1) + torch.special.expit(x)
    assert ctx.counts == {"relu": 1}


def test_deconvnet_context_reports_in_place_forms():
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UnhandledActivationWarning, match=r"elu ×1, leaky_relu ×1"):
        with DeConvNetContext() as ctx:
            F.elu_(F.leaky_relu_(torch.relu(x) - 0.5))
    assert ctx.unhandled == {"leaky_relu": 1, "elu": 1}
