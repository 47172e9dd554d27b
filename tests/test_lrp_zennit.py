"""LRP against Zennit 0.5.x run as a black box (its public API only): VGG-16 and ResNet-18 with
random weights, the four standard composites, ResNet with Zennit's own canonizers (our side
needs none).  Skipped when Zennit is not installed (``pip install zennit``)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from torchray_like.attribution import lrp_composites as ours
from torchray_like.attribution.lrp import LRPContext

zennit = pytest.importorskip("zennit")
from zennit import composites as theirs  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402

TOLERANCE = 1e-4  # max |difference| / max |relevance|


def _model(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics to fold
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def models():
    return {"vgg16": _model("vgg16"), "resnet18": _model("resnet18")}


def _ours(model, x, target, composite):
    with LRPContext(composite, model=model):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xx)[:, target].sum(), xx)
    return (xx * g).detach()


def _theirs(model, x, target, composite):
    # Our relevance starts at the target score; Zennit's at the seed it is given.
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(x.clone(), lambda out: torch.eye(out.shape[1])[
            [target] * out.shape[0]] * out)
    return relevance.detach()


PAIRS = {
    "EpsilonPlus": (ours.epsilon_plus, theirs.EpsilonPlus),
    "EpsilonPlusFlat": (ours.epsilon_plus_flat, theirs.EpsilonPlusFlat),
    "EpsilonAlpha2Beta1": (ours.epsilon_alpha2_beta1, theirs.EpsilonAlpha2Beta1),
    "EpsilonGammaBox": (ours.epsilon_gamma_box, theirs.EpsilonGammaBox),
}


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
@pytest.mark.parametrize("composite", sorted(PAIRS))
def test_standard_composites_equal_zennit(models, name, composite):
    model = models[name]
    torch.manual_seed(1)
    # ResNet at 64²: at 32² its last stage is 1×1 and Zennit's stabiliser on residual sums and
    # the average pool (1e-6 added to their denominators; ours divide exactly) reaches 1.8e-4.
    size = 32 if name == "vgg16" else 64
    x = torch.randn(1, 3, size, size)
    canonizer = VGGCanonizer() if name == "vgg16" else ResNetCanonizer()
    mine, zen = PAIRS[composite]
    if composite == "EpsilonGammaBox":
        low, high = float(x.min()), float(x.max())
        a = _ours(model, x, 3, mine(low, high))
        b = _theirs(model, x, 3, zen(low=torch.full_like(x, low), high=torch.full_like(x, high),
                                     canonizers=[canonizer]))
    else:
        a = _ours(model, x, 3, mine())
        b = _theirs(model, x, 3, zen(canonizers=[canonizer]))
    assert a.shape == b.shape == (1, 3, size, size)
    error = float((a - b).abs().max() / b.abs().max())
    assert error <= TOLERANCE, f"{name} {composite}: {error:.3g}"
    assert abs(float(a.sum() - b.sum())) <= TOLERANCE * float(b.abs().sum())
