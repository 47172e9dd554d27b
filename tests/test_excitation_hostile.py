"""Excitation backprop (Zhang et al. 2016, arXiv 1608.00507): what it refuses or warns of, and
the state it leaves — the model's state after success and failure, thread-locality, argument
errors, the operations the rules do not model (a warning each), and models the context cannot
see into (compiled, scripted, traced, checkpointed: refused clearly)."""

from __future__ import annotations

import re
import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.common import NoRuleAppliedWarning, UnhandledActivationWarning
from torchray_like.attribution.excitation_backprop import (
    ExcitationBackpropContext,
    UnhandledOperationWarning,
    contrastive_excitation_backprop,
    excitation_backprop,
    excitation_to_saliency,
)

from .conftest import ScaleByTwo, assert_same_state, snapshot
from .excitation_helpers import ConvHead, excite

# ---------------------------------------------------------------------------------------------
# State, threads, warnings
# ---------------------------------------------------------------------------------------------


class Raising(nn.Module):
    """Raises inside the forward pass after some replaced calls when ``armed``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.armed = False

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = h + F.relu(self.conv2(h))
        if self.armed:
            raise RuntimeError("boom inside the model")
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("method", ["ebp", "contrastive"])
def test_state_is_restored_after_success_and_failure(method):
    m = Raising().train()
    m.fc.weight.grad = torch.ones_like(m.fc.weight)
    m.conv.weight.requires_grad_(False)
    x = torch.rand(2, 3, 6, 6)

    def call():
        if method == "ebp":
            return excitation_backprop(m, x, [0, 1], saliency_layer="conv")
        return contrastive_excitation_backprop(m, x, [0, 1], "conv", "bn")

    before = snapshot(m, x)
    out = call()
    assert out.shape == (2, 1, 6, 6)
    assert_same_state(before, snapshot(m, x))
    m.armed = True
    with pytest.raises(RuntimeError, match="boom inside the model"):
        call()
    m.armed = False
    assert_same_state(before, snapshot(m, x))
    # A failure after the forward pass (an error found during the backward passes) too.
    with pytest.raises(ValueError):
        if method == "ebp":
            excitation_backprop(m, x, [0, 9], saliency_layer="conv")
        else:
            contrastive_excitation_backprop(m, x, [0, 1], "conv", "bn",
                                            classifier_layer="conv")
    assert_same_state(before, snapshot(m, x))
    assert torch.equal(call(), out)


def test_context_restores_on_exception_and_parameters_get_no_gradient():
    m = Raising()
    x = torch.rand(1, 3, 6, 6, requires_grad=True)
    before = torch._C._len_torch_function_stack()
    m.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        with ExcitationBackpropContext():
            m(x)
    assert torch._C._len_torch_function_stack() == before
    m.armed = False
    with ExcitationBackpropContext():
        y = m(x)
    y[0, 1].backward()
    # Replaced layers are not differentiated with respect to their parameters.
    assert m.conv.weight.grad is None and m.fc.weight.grad is None
    assert x.grad is not None and x.grad.sum().item() == pytest.approx(1.0, abs=1e-5)
    ctx = ExcitationBackpropContext()
    with ctx:
        with pytest.raises(RuntimeError, match="already active"):
            ctx.__enter__()


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_weights_changed_between_forward_and_backward_raise(layer):
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    x = torch.rand(1, 2, 4, 4, requires_grad=True)
    with ExcitationBackpropContext():
        y = m(x)
    with torch.no_grad():
        (m[0] if layer == "conv" else m[3]).weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place between the forward pass"):
        y[0, 0].backward()


def test_context_is_thread_local():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x = torch.rand(1, 3, 6, 6)

    def plain():
        xx = x.clone().requires_grad_(True)
        net(xx)[0, 1].backward()
        return xx.grad

    expected = plain()
    barrier = threading.Barrier(2, timeout=30)
    results = {}

    def other():
        barrier.wait()  # the main thread is inside its context now
        results["grad"] = plain()
        barrier.wait()

    thread = threading.Thread(target=other)
    thread.start()
    xx = x.clone().requires_grad_(True)
    with ExcitationBackpropContext() as ctx:
        barrier.wait()
        barrier.wait()  # the other thread ran a whole forward/backward meanwhile
        y = net(xx)
    y[0, 1].backward()
    thread.join()
    assert torch.equal(results["grad"], expected)
    assert ctx.counts == {"conv": 1, "linear": 1}
    assert xx.grad.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(xx.grad, expected)


def test_warnings_for_models_without_rules():
    relu_only = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.warns(NoRuleAppliedWarning, match="replaced no convolution"):
        with ExcitationBackpropContext():
            relu_only(torch.rand(1, 3, 2, 2))
    gelu = nn.Sequential(nn.Conv2d(3, 2, 1), nn.GELU())
    with pytest.warns(UnhandledActivationWarning, match="gelu"):
        with ExcitationBackpropContext():
            gelu(torch.rand(1, 3, 2, 2, requires_grad=True))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_excitation_backprop_errors():
    m = ConvHead().eval()
    x = torch.rand(1, 2, 6, 6)
    with pytest.raises(ValueError, match="no module named 'relu3'.*'relu1'"):
        excitation_backprop(m, x, 0, saliency_layer="relu3")
    with pytest.raises(TypeError, match="floating-point"):
        excitation_backprop(m, x.to(torch.uint8), 0)
    with pytest.raises(ValueError, match="out of range"):
        excitation_backprop(m, x, 4)
    with pytest.raises(ValueError, match="2 class indices but the batch has 1"):
        excitation_backprop(m, x, [0, 1])
    with pytest.raises(ValueError, match="replaced no convolution"):
        excitation_backprop(nn.Sequential(nn.ReLU(), nn.Flatten()), x, 0)
    with pytest.raises(ValueError, match=r"shape \(N, C, \*spatial\)"):
        excitation_backprop(m, torch.rand(2, 6), 0)
    with pytest.raises(ValueError, match="has no .grad"):
        excitation_to_saliency(torch.zeros(1, 2, 3))
    t = torch.zeros(3, requires_grad=True)
    t.grad = torch.zeros(3)
    with pytest.raises(ValueError, match=r"expected \(N, C, \*spatial\)"):
        excitation_to_saliency(t)


def test_contrastive_errors():
    m = ConvHead().eval()
    x = torch.rand(1, 2, 6, 6)
    with pytest.raises(TypeError, match="contrast_layer"):
        contrastive_excitation_backprop(m, x, 0, "relu1")  # required, as in TorchRay
    for missing in (None, ""):
        with pytest.raises(ValueError, match="contrast_layer is required"):
            contrastive_excitation_backprop(m, x, 0, "relu1", missing)
    with pytest.raises(ValueError, match="'relu1' is the saliency_layer"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu1")
    with pytest.raises(ValueError, match="contrast layer must be above the saliency layer"):
        contrastive_excitation_backprop(m, x, 0, "relu2", "relu1")
    with pytest.raises(ValueError, match="no module named 'relu9'"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu9")
    with pytest.raises(ValueError, match="classifier_layer 'relu2' made no convolution"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu2", classifier_layer="relu2")
    with pytest.raises(ValueError, match="classifier_layer 'conv2'.*is not between"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu2", classifier_layer="conv2")
    with pytest.raises(ValueError, match="out of range"):
        contrastive_excitation_backprop(m, x, 7, "relu1", "relu2")
    with pytest.raises(ValueError, match="target is required"):
        contrastive_excitation_backprop(m, x, None, "relu1", "relu2")
    with pytest.raises(ValueError, match="smooth must be a non-negative"):
        contrastive_excitation_backprop(m, x, 0, "relu1", "relu2", smooth=-1)
    with pytest.raises(TypeError, match="floating-point"):
        contrastive_excitation_backprop(m, x.double().long(), 0, "relu1", "relu2")

    class Extra(ConvHead):
        def __init__(self):
            super().__init__()
            self.side = nn.ReLU()
            self.unused = nn.ReLU()

        def forward(self, x):
            self.side(x)  # called, but the output does not depend on it
            return super().forward(x)

    e = Extra().eval()
    with pytest.raises(ValueError, match="do not depend on contrast_layer 'side'"):
        contrastive_excitation_backprop(e, x, 0, None, "side")
    with pytest.raises(ValueError, match="contrast_layer 'unused' was not called"):
        contrastive_excitation_backprop(e, x, 0, None, "unused")

    class Shared(ConvHead):
        def forward(self, x):
            h = self.relu1(self.conv1(x))
            h = self.relu1(self.conv2(h))
            return self.fc(h.flatten(1))

    with pytest.raises(ValueError, match="contrast_layer 'relu1' was called 2 times"):
        contrastive_excitation_backprop(Shared().eval(), x, 0, "conv1", "relu1")
    with pytest.raises(ValueError, match="replaced no convolution"):
        contrastive_excitation_backprop(nn.Sequential(nn.ReLU(), nn.Flatten()), x, 0, None,
                                        "1")

    class PoolOnly(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2).flatten(1)

    with pytest.raises(ValueError, match="makes no convolution or linear call"):
        contrastive_excitation_backprop(nn.Sequential(PoolOnly()), x, 0, None, "0")


# ---------------------------------------------------------------------------------------------
# Operations the rules do not model: a warning each
# ---------------------------------------------------------------------------------------------


class Unmodeled(nn.Module):
    """conv → op → ReLU → linear, with ``op`` one of the operations to check."""

    def __init__(self, op):
        super().__init__()
        torch.manual_seed(12)
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm([4, 4, 4])
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.post = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.register_buffer("mix", torch.rand(4, 4))
        self.op = op

    def forward(self, x):
        a, b = self.c1(x), F.relu(self.c2(x))
        op = self.op
        if op == "group_norm":
            h = self.gn(a)
        elif op == "layer_norm":
            h = self.ln(a)
        elif op == "instance_norm":
            h = self.inorm(a)
        elif op == "sub":
            h = a - b
        elif op == "sub_mean":
            h = a - a.mean(1, keepdim=True)
        elif op == "abs":
            h = a.abs()
        elif op == "neg":
            h = -a
        elif op == "rsub":
            h = 1 - a
        elif op == "add(alpha<0)":
            h = torch.add(a, b, alpha=-2)
        elif op == "mul by a negative factor":
            h = a * -2
        elif op == "mul of two activations":
            h = a * b
        elif op == "matmul":
            h = (self.mix @ a.flatten(2)).reshape(a.shape)
        else:
            raise AssertionError(op)
        return self.fc(F.relu(self.post(F.relu(h))).flatten(1))


UNMODELED = ["group_norm", "layer_norm", "instance_norm", "sub", "sub_mean", "abs", "neg",
             "rsub", "add(alpha<0)", "mul by a negative factor", "mul of two activations",
             "matmul"]


@pytest.mark.parametrize("op", UNMODELED)
def test_unmodeled_operations_warn(op):
    m = Unmodeled(op).eval()
    x = torch.rand(2, 2, 4, 4)
    name = {"sub_mean": "sub"}.get(op, op)
    with pytest.warns(UnhandledOperationWarning, match=re.escape(f"{name} ×1")):
        got, ctx = excite(m, x, torch.eye(3)[:2])
    assert ctx.unmodeled == {name: 1}
    with pytest.warns(UnhandledOperationWarning, match="does not model"):
        excitation_backprop(m, x, [0, 1])
    # Read above the operation: backpropagation does not reach it, nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnhandledOperationWarning)
        excitation_backprop(m, x, [0, 1], saliency_layer="post")
    # A subclass of UnhandledActivationWarning: filters on that class catch it.
    assert issubclass(UnhandledOperationWarning, UnhandledActivationWarning)


def test_modeled_scalings_do_not_warn_and_pass_the_signal():
    """x * c, c * x, x / c with c > 0 (a number or a constant tensor) and in place: the
    signal passes unchanged where the output is excited (the weight cancels)."""
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)[:, None]
    p = torch.rand(2, 3, 4, dtype=torch.float64)
    for signed in (True, False):
        for f in (lambda t: t * 3, lambda t: 0.5 * t, lambda t: t / std, lambda t: std * t,
                  lambda t: torch.mul(t, 2), lambda t: t.clone().mul_(2),
                  lambda t: t.clone().div_(std)):
            with warnings.catch_warnings():
                warnings.simplefilter("error", UnhandledOperationWarning)
                with ExcitationBackpropContext(signed=signed) as ctx:
                    y = f(x)
            (g,) = torch.autograd.grad(y, x, p)
            assert ctx.counts == {"scale": 1}
            torch.testing.assert_close(g, p if signed else p * (x > 0))


def test_calls_inside_custom_functions_warn():
    """Replaced calls made without autograd on inputs that require grad — inside a custom
    autograd.Function (a reentrant checkpoint, a hand-written activation) — keep the
    Function's own backward: a warning says so (not an error: the Function's backward is a
    legitimate part of the model)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            torch.manual_seed(13)
            self.c1, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)
            self.reentrant = reentrant

        def forward(self, x):
            if self.reentrant:
                h = checkpoint(lambda t: F.relu(self.c1(t)), x, use_reentrant=True)
            else:
                h = F.relu(ScaleByTwo.apply(self.c1(x)))
            return self.fc(h.mean((2, 3)))

    x = torch.rand(1, 3, 6, 6, requires_grad=True)
    for reentrant in (True, False):
        with pytest.warns(UnhandledOperationWarning, match=r"no_grad ×1.*custom"):
            with ExcitationBackpropContext():
                Net(reentrant)(x)
    with pytest.warns(UnhandledOperationWarning, match="no_grad"):
        smap = excitation_backprop(Net(False), x.detach(), 0, saliency_layer="c1")
    assert torch.isfinite(smap).all()
    # A reentrant checkpoint refuses torch.autograd.grad: a ValueError saying what to do.
    with pytest.warns(UnhandledOperationWarning), pytest.raises(
            ValueError,
            match="use_reentrant=True.*excitation backprop and LRP refuse any checkpoint"):
        excitation_backprop(Net(True), x.detach(), 0)


# ---------------------------------------------------------------------------------------------
# Models the context cannot see into: refused clearly
# ---------------------------------------------------------------------------------------------


def small_net():
    torch.manual_seed(15)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def test_compiled_models():
    """torch.compile(model) is explained through its original module (same map, computed
    eagerly, layer names with or without the '_orig_mod.' prefix); a compiled sub-module, or a
    module compiled in place, is refused with what to pass instead."""
    m = small_net()
    x = torch.rand(2, 3, 6, 6)
    compiled = torch.compile(m)
    torch.testing.assert_close(excitation_backprop(compiled, x, [0, 2]),
                               excitation_backprop(m, x, [0, 2]), rtol=0, atol=0)
    expected = contrastive_excitation_backprop(m, x, [0, 2], "0", "1")
    for layers in (("0", "1"), ("_orig_mod.0", "_orig_mod.1")):
        torch.testing.assert_close(
            contrastive_excitation_backprop(compiled, x, [0, 2], *layers), expected)
    parent = nn.Sequential(torch.compile(small_net()))
    for f in (lambda: excitation_backprop(parent, x, 0),
              lambda: contrastive_excitation_backprop(parent, x, 0, "", "0._orig_mod.1")):
        with pytest.raises(ValueError, match=r"torch.compile.*_orig_mod"):
            f()
    in_place = small_net()
    in_place.compile()
    with pytest.raises(ValueError, match=r"torch.compile"):
        excitation_backprop(in_place, x, 0)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_submodules_are_refused(how):
    m = small_net()
    x = torch.rand(1, 3, 6, 6)
    conv = m[0]
    m[0] = (torch.jit.script(conv) if how == "script"
            else torch.jit.trace(conv, torch.rand(1, 3, 6, 6)))
    with pytest.raises(ValueError, match=r"TorchScript module '0'"):
        excitation_backprop(m, x, 0)
    with pytest.raises(ValueError, match="TorchScript"):
        contrastive_excitation_backprop(m, x, 0, "", "1")


def test_non_reentrant_checkpoint_is_refused():
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = small_net()

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    x = torch.rand(1, 3, 6, 6)
    with pytest.raises(RuntimeError, match=r"checkpoint\(use_reentrant=False\).*without"):
        excitation_backprop(Net(), x, 0)
    with pytest.raises(RuntimeError, match=r"checkpoint\(use_reentrant=False\)"):
        with ExcitationBackpropContext():
            Net()(x.requires_grad_(True))
    # Outside the context saved-tensor hooks work again.
    y = Net()(x.detach().requires_grad_(True))
    y.sum().backward()


class _Reciprocal(nn.Module):
    """``fc2(1 / relu(fc1(x)))``: a reciprocal (which the rules do not model) whose plain
    gradient ``-1/h²`` overflows float32 at ``h = 1e-30`` while the forward value is finite."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 2, bias=False), nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(2))
            self.fc2.weight.fill_(0.5)

    def forward(self, x):
        return self.fc2(torch.reciprocal(torch.relu(self.fc1(x.flatten(1)))))


def test_a_signal_blown_up_by_unmodeled_operations_is_blamed_on_them():
    # Before: the error said the *model's* backward met 0 × inf (torchvision's swin_t: EB's
    # signal through 29 layer norms and 24 matmuls).
    x = torch.tensor([1e-30, 1.0]).reshape(1, 2, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnhandledOperationWarning)
        with pytest.raises(ValueError, match=r"ExcitationBackpropContext sent its signal through "
                                             r"operations its rules do not model \(reciprocal ×1\)"
                                             r".*gradient, grad_cam"):
            excitation_backprop(_Reciprocal().eval(), x, 1)
