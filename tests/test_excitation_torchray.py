"""Excitation backprop (Zhang et al. 2016, arXiv 1608.00507): TorchRay's API — signatures, the
context's ``enable``/``debug``, the gradient-to-saliency functions, ``eltwise_sum`` and
``update_resnet``, and the same maps as TorchRay's when it is installed."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

from torchray_like.attribution.excitation_backprop import (
    EltwiseSum,
    EltwiseSumFunction,
    ExcitationBackpropContext,
    UnhandledOperationWarning,
    contrastive_excitation_backprop,
    eltwise_sum,
    excitation_backprop,
    excitation_to_saliency,
    gradient_to_contrastive_excitation_backprop_saliency,
    gradient_to_excitation_backprop_saliency,
    update_resnet,
)

from .excitation_helpers import ConvHead, dense_ebp, quiet

# ---------------------------------------------------------------------------------------------
# TorchRay's API
# ---------------------------------------------------------------------------------------------


def test_torchray_signatures():
    def names(f):
        return list(inspect.signature(f).parameters)

    assert names(contrastive_excitation_backprop)[:10] == [
        "model", "input", "target", "saliency_layer", "contrast_layer", "classifier_layer",
        "resize", "resize_mode", "get_backward_gradient", "debug"]
    params = inspect.signature(contrastive_excitation_backprop).parameters
    assert params["smooth"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["saliency_layer"].default is inspect.Parameter.empty
    assert names(excitation_backprop)[:7] == [
        "model", "input", "target", "saliency_layer", "resize", "resize_mode", "smooth"]
    assert inspect.signature(excitation_backprop).parameters["context_builder"].kind is (
        inspect.Parameter.KEYWORD_ONLY)
    assert names(ExcitationBackpropContext)[:2] == ["enable", "debug"]
    assert names(update_resnet) == ["model", "debug"]
    for f in (excitation_backprop, contrastive_excitation_backprop):
        hints = inspect.signature(f)
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in hints.parameters.values())


def test_contrastive_positional_get_backward_gradient_is_used():
    """TorchRay's positional order: get_backward_gradient is the 9th argument."""
    m = ConvHead().double().eval()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    calls = []

    def seed(output, target):
        calls.append(target)
        g = torch.zeros_like(output)
        g[:, target] = 2.0
        return g

    doubled = contrastive_excitation_backprop(m, x, 1, "relu1", "relu2", None, False,
                                              "bilinear", seed)
    plain = contrastive_excitation_backprop(m, x, 1, "relu1", "relu2")
    assert calls == [1]
    torch.testing.assert_close(doubled, 2 * plain)
    smap, info = contrastive_excitation_backprop(m, x, 1, "relu1", "relu2", None, False,
                                                 "bilinear", seed, True)
    assert isinstance(info.gradient, torch.Tensor)


def test_context_enable_and_debug(capsys):
    m = ConvHead().double().eval()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad(m(x)[0, 1], x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ExcitationBackpropContext(enable=False) as ctx:
            y = m(x)
    (g,) = torch.autograd.grad(y[0, 1], x)
    assert torch.equal(g, plain) and ctx.counts == {}
    with ExcitationBackpropContext(False, True):  # positional, as TorchRay
        m(x)
    with ExcitationBackpropContext(debug=True):
        y = m(x)
    capsys.readouterr()
    (g,) = torch.autograd.grad(y[0, 1], x)
    out = capsys.readouterr().out
    assert out.count("excitation backprop:") == 3 and "linear #2" in out and "conv #0" in out
    assert g.sum().item() == pytest.approx(1.0)


def test_gradient_to_saliency_functions():
    x = torch.zeros(1, 3, 2, 2, requires_grad=True)
    x.grad = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]]).expand(1, 3, 2, 2).clone()
    x.grad[0, 1] *= 2
    total = torch.tensor([[[[4.0, -8.0], [2.0, 0.0]]]])
    assert torch.equal(gradient_to_excitation_backprop_saliency(x), total)
    assert torch.equal(gradient_to_contrastive_excitation_backprop_saliency(x),
                       total.clamp(min=0))
    assert excitation_to_saliency is gradient_to_excitation_backprop_saliency
    m = ConvHead().eval()
    xx = torch.rand(1, 2, 6, 6)
    default = excitation_backprop(m, xx, 0, "relu1")
    explicit = excitation_backprop(m, xx, 0, "relu1", context_builder=ExcitationBackpropContext,
                                   gradient_to_saliency=gradient_to_excitation_backprop_saliency)
    torch.testing.assert_close(default, explicit)


def test_eltwise_sum_and_update_resnet(torchvision_models):
    torch.manual_seed(16)
    a = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    c = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    p = torch.rand(2, 3, dtype=torch.float64)
    # Outside the context: a plain sum.
    y = EltwiseSum()(a, b)
    assert torch.equal(y, a + b)
    assert all(torch.equal(g, p) for g in torch.autograd.grad(y, (a, b), p))
    # Inside: the sum rule, as the context applies to a + b.
    for signed in (True, False):
        with ExcitationBackpropContext(signed=signed) as ctx:
            y1 = EltwiseSum()(a, b)
            y2 = a + b
        assert ctx.counts == {"sum_dims": 1, "sum": 1}  # stack + sum, and a + b
        for g1, g2 in zip(torch.autograd.grad(y1, (a, b), p), torch.autograd.grad(y2, (a, b),
                                                                                   p)):
            torch.testing.assert_close(g1, g2)
    with ExcitationBackpropContext():
        y = eltwise_sum(a, b, c)
    grads = torch.autograd.grad(y, (a, b, c), p)
    den = (a + b + c).detach()
    for g, t in zip(grads, (a, b, c)):
        torch.testing.assert_close(g, t.detach() / den * p)
    assert issubclass(EltwiseSumFunction, torch.autograd.Function)
    # update_resnet: the same model, unchanged, the same maps.
    model = torchvision_models["resnet18"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    before = excitation_backprop(model, x, 3, "layer2")
    assert update_resnet(model) is model and update_resnet(model, debug=False) is model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(excitation_backprop(model, x, 3, "layer2"), before, rtol=0,
                               atol=0)


def test_signed_default_differs_from_positive_at_the_input(torchvision_models):
    """The two rules agree wherever inputs are non-negative; at the normalised image and
    across ResNet's batch-normalised residual branches they differ."""
    model = torchvision_models["resnet18"]
    torch.manual_seed(4)
    x = torch.randn(1, 3, 32, 32)
    signed = excitation_backprop(model, x, 3)
    positive = excitation_backprop(model, x, 3, signed=False)
    assert (signed < 0).any() and (positive >= 0).all()
    assert not torch.allclose(signed, positive, atol=1e-3)
    a = excitation_backprop(model, x, 3, "layer2")
    b = excitation_backprop(model, x, 3, "layer2", signed=False)
    assert 0 < (a - b).abs().max() < 1


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "area"])
def test_interpolation_follows_the_dense_rule(mode):
    """Upsampling (an FPN / U-Net decoder) is a linear map with non-negative weights."""
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.rand(1, 2, 6, 8, dtype=torch.float64)
    options = {} if mode != "bilinear" else {"align_corners": False}

    def op(t):
        return F.interpolate(t, size=(6, 8), mode=mode, **options)

    for signed in (True, False):
        with ExcitationBackpropContext(signed=signed) as ctx:
            y = op(x)
        (g,) = torch.autograd.grad(y, x, p)
        assert ctx.counts == {"interpolate": 1}
        torch.testing.assert_close(g, dense_ebp(op, x.detach(), p, signed))
    with pytest.warns(UnhandledOperationWarning, match=r"interpolate\(bicubic\)"), quiet():
        with ExcitationBackpropContext():
            y = F.interpolate(x, scale_factor=2, mode="bicubic")
        torch.autograd.grad(y, x, torch.ones_like(y))


def test_same_maps_as_torchray_when_installed():
    """Black-box parity with TorchRay (``pip install torchray``; skipped without it): the
    default (signed) rule gives TorchRay's maps at the input, at a layer and contrastively.
    Measured with TorchRay 1.0.0.2 on VGG16 / ResNet-50 at 224²: within 1e-9."""
    torchray_ebp = pytest.importorskip("torchray.attribution.excitation_backprop")
    import torchvision

    for name, layers in (("vgg11", ("features.10", "features.15", "classifier.6")),
                         ("resnet18", ("layer2", "layer3", "fc"))):
        torch.manual_seed(0)
        # float64: the contrastive map is a difference of two maps, whose float32 rounding
        # (kernel order, which differs by CPU) reaches 2 % on its smallest elements.
        model = getattr(torchvision.models, name)(num_classes=10).double().eval()
        x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
        ours = [excitation_backprop(model, x, 3), excitation_backprop(model, x, 3, layers[0]),
                contrastive_excitation_backprop(model, x, 3, *layers)]
        # TorchRay's ResNet surgery on a copy (it may patch the blocks it is given).
        theirs_model = (torchray_ebp.update_resnet(copy.deepcopy(model))
                        if name.startswith("resnet") else model)
        theirs = [torchray_ebp.excitation_backprop(theirs_model, x, 3, saliency_layer=""),
                  torchray_ebp.excitation_backprop(theirs_model, x, 3,
                                                   saliency_layer=layers[0]),
                  torchray_ebp.contrastive_excitation_backprop(
                      theirs_model, x, 3, saliency_layer=layers[0], contrast_layer=layers[1],
                      classifier_layer=layers[2])]
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype == torch.float64 and b.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * float(b.abs().max()))


def test_residual_sums_written_with_plus_warn_of_torchrays_number():
    """TorchRay passes a '+' residual sum's signal unchanged unless update_resnet was called;
    ours splits it (the paper's rule): a TorchRayDifferenceWarning says so, once per call."""
    import warnings

    import torchvision

    from torchray_like.attribution.context import TorchRayDifferenceWarning
    from torchray_like.attribution.excitation_backprop import update_resnet
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(TorchRayDifferenceWarning, match=r"split the signal of 8 residual sum"):
        plain = excitation_backprop(model, x, 3, "layer2")
    with pytest.warns(TorchRayDifferenceWarning, match="update_resnet"):
        contrastive_excitation_backprop(model, x, 3, "layer2", "layer4")
    # After update_resnet (TorchRay's conversion) TorchRay's map is ours: no warning, same map.
    converted = update_resnet(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TorchRayDifferenceWarning)
        torch.testing.assert_close(excitation_backprop(converted, x, 3, "layer2"), plain)
        # A model without residual sums never warns.
        vgg = torchvision.models.vgg11(num_classes=10).eval()
        excitation_backprop(vgg, x, 3, "features.5")
