"""The methods' fast path: a rectifier rule put on the graph of a plain forward pass.

Checked against the rule context (the same model run inside ``with ReLUContext``) and against
independent reference rules (hand-written autograd functions patched into ``F.relu``), on the
models that qualify, on models that stop qualifying between calls, and on every construct
that must keep the forward pass inside the context.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torchray_like.attribution import graph_rules
from torchray_like.attribution.common import (
    GRADIENT_RULE,
    ReLUContext,
    ReLURule,
    UnhandledActivationWarning,
    saliency,
)
from torchray_like.attribution.deconvnet import DECONVNET_RULE, deconvnet
from torchray_like.attribution.explain import explain
from torchray_like.attribution.guided_backprop import GUIDED_BACKPROP_RULE, guided_backprop
from torchray_like.attribution.guided_grad_cam import guided_grad_cam

from .conftest import (
    RefDeconvReLU,
    RefGuidedReLU,
    assert_same_state,
    hook_counts,
    make_torchvision,
    reference_map,
    snapshot,
)

RULES = {"gradient": GRADIENT_RULE, "guided": GUIDED_BACKPROP_RULE, "deconvnet": DECONVNET_RULE}


class Small(nn.Module):
    """Conv → ReLU (in place) → pool → conv → ReLU → linear: a graph that qualifies."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = act if act is not None else nn.ReLU()
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.pool(self.act1(self.conv1(x)))
        x = self.act2(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def context_grad(model, x, rule, target):
    """∂y[:, target]/∂x with the model run inside ``ReLUContext(rule)``: the slow path."""
    xx = x.detach().clone().requires_grad_()
    with ReLUContext(rule):
        y = model(xx)
    (g,) = torch.autograd.grad(y[:, target].sum(), xx)
    return g.abs().amax(1, keepdim=True)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 8)


# -- the rules' two forms ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RULES))
def test_backward_relu_is_the_rule(name):
    """``backward_relu(plain, grad)`` equals ``backward(grad, relu(x), None)`` (one rule)."""
    rule = RULES[name]
    torch.manual_seed(2)
    x, grad = torch.randn(4, 50), torch.randn(4, 50)
    x[0, :5] = 0.0  # the kink: ReLU's gradient there is 0, for both forms
    out = x.relu()
    plain = torch.ops.aten.threshold_backward(grad, out, 0)
    assert torch.equal(rule.backward_relu(plain, grad), rule.backward(grad, out, None))


def test_graph_capable_needs_both_forms_from_one_class():
    class OnlyBackward(ReLURule):
        def backward(self, grad, output, upper):
            return grad * 2

    class Both(OnlyBackward):
        def backward(self, grad, output, upper):
            return grad * 3

        def backward_relu(self, plain, grad):
            return grad * 3

    assert all(graph_rules.graph_capable(rule) for rule in RULES.values())
    assert not graph_rules.graph_capable(OnlyBackward())  # would inherit the plain gradient
    assert graph_rules.graph_capable(Both())
    assert not graph_rules.graph_capable(object())


# -- same numbers as the context ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg11", "resnet18", "squeezenet1_1", "densenet121"])
def test_fast_path_equals_the_context_on_torchvision(name):
    model = make_torchvision(name)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    first = guided_backprop(model, x, 4)  # inside the context: learns the model qualifies
    assert graph_rules.qualifies(model)
    for method, rule in ((guided_backprop, GUIDED_BACKPROP_RULE), (deconvnet, DECONVNET_RULE)):
        fast = method(model, x, 4)
        torch.testing.assert_close(fast, context_grad(model, x, rule, 4), rtol=0, atol=0)
    torch.testing.assert_close(first, guided_backprop(model, x, 4), rtol=0, atol=0)


@pytest.mark.parametrize("method, reference", [(guided_backprop, RefGuidedReLU),
                                               (deconvnet, RefDeconvReLU)])
def test_fast_path_equals_independent_reference(method, reference, x):
    model = Small().eval()
    method(model, x, 1)
    assert graph_rules.qualifies(model)
    torch.testing.assert_close(method(model, x, 1), reference_map(model, x, 1, reference))


def test_explain_and_guided_grad_cam_on_the_fast_path(x):
    model = Small().eval()
    methods = ["gradient", "guided_backprop", "deconvnet", "guided_grad_cam"]
    options = {"guided_grad_cam": {"saliency_layer": "conv2"}}
    before = explain(model, x, 2, methods=methods, options=options)
    assert graph_rules.qualifies(model)
    after = explain(model, x, 2, methods=methods, options=options)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    torch.testing.assert_close(guided_grad_cam(model, x, 2, saliency_layer="conv2"),
                               before["guided_grad_cam"], rtol=0, atol=0)


def test_debug_counts_and_no_state_left_on_the_fast_path(x):
    model = Small().eval()
    guided_backprop(model, x, 0)
    state = snapshot(model, x)
    hooks = hook_counts(model)
    _, debug = guided_backprop(model, x, 0, debug=True)
    assert debug.counts == {"relu": 2}
    assert hook_counts(model) == hooks
    assert_same_state(state, snapshot(model, x))


def test_non_reentrant_checkpoint_on_the_fast_path(x):
    class Checkpointed(Small):
        def forward(self, x):
            x = checkpoint(lambda t: self.pool(self.act1(self.conv1(t))), x,
                           use_reentrant=False)
            return self.fc(torch.flatten(self.act2(self.conv2(x)), 1))

    model, plain = Checkpointed().eval(), Small().eval()
    model.load_state_dict(plain.state_dict())
    guided_backprop(model, x, 3)
    assert graph_rules.qualifies(model)
    torch.testing.assert_close(guided_backprop(model, x, 3),
                               reference_map(plain, x, 3, RefGuidedReLU))


# -- what keeps the forward pass inside the context --------------------------------------------
def test_a_model_changed_between_calls_is_seen(x):
    """A model that qualified, then gets a GELU: the next call checks its graph, runs inside
    the context (the warning names the GELU) and stops taking the fast path."""
    model = Small().eval()
    guided_backprop(model, x, 1)
    assert graph_rules.qualifies(model)
    model.act2 = nn.GELU()
    with pytest.warns(UnhandledActivationWarning, match="gelu"):
        out = guided_backprop(model, x, 1)
    assert not graph_rules.qualifies(model)
    torch.testing.assert_close(out, context_grad(model, x, GUIDED_BACKPROP_RULE, 1))
    model.act2 = nn.ReLU()  # a model that stopped qualifying is not learnt again ...
    guided_backprop(model, x, 1)
    assert not graph_rules.qualifies(model)
    graph_rules.forget(model)  # ... until told to
    guided_backprop(model, x, 1)
    assert graph_rules.qualifies(model)


class Switching(Small):
    """A rectifier written as ``where`` for some inputs: the graph check of each call sees it."""

    use_where = False

    def forward(self, x):
        x = self.pool(self.act1(self.conv1(x)))
        x = self.conv2(x)
        x = torch.where(x > 0, x, 0.0) if self.use_where else F.relu(x)
        return self.fc(torch.flatten(x, 1))


def test_input_dependent_graphs_are_checked_each_call(x):
    model = Switching().eval()
    guided_backprop(model, x, 2)
    assert graph_rules.qualifies(model)
    model.use_where = True
    out = guided_backprop(model, x, 2)  # where(x > 0, x, 0) is a rectifier for the context
    torch.testing.assert_close(out, reference_map(Small().eval(), x, 2, RefGuidedReLU))
    assert not graph_rules.qualifies(model)


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.GELU(), nn.Hardtanh(0.0, 3.0)])
def test_other_rectifiers_and_activations_never_qualify(act, x):
    model = Small(act).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnhandledActivationWarning)
        guided_backprop(model, x, 0)
    assert not graph_rules.qualifies(model)


def test_mask_multiply_keeps_its_warning(x):
    class MaskMultiply(Small):
        def forward(self, x):
            x = self.pool(self.act1(self.conv1(x)))
            x = self.conv2(x)
            return self.fc(torch.flatten(x * (x > 0), 1))

    model = MaskMultiply().eval()
    for _ in range(2):
        with pytest.warns(UnhandledActivationWarning, match="mask multiply"):
            guided_backprop(model, x, 0)
    assert not graph_rules.qualifies(model)


def test_a_rule_without_its_relu_form_runs_inside_the_context(x):
    class Doubling(ReLURule):
        """Twice the plain gradient: defines ``backward`` only."""

        def backward(self, grad, output, upper):
            return 2 * torch.ops.aten.threshold_backward(grad, output, 0)

    model = Small().eval()
    guided_backprop(model, x, 1)
    assert graph_rules.qualifies(model)
    for _ in range(2):
        out = saliency(model, x, 1, context_builder=lambda: ReLUContext(Doubling()))
        # Two ReLUs on every path: 2 × 2 the plain gradient.
        torch.testing.assert_close(out, 4 * reference_map(model, x, 1))


def test_a_model_running_relus_in_a_thread_after_qualifying(x):
    """The context cannot see a worker thread's ReLUs (it refuses such a model); the hooks see
    every node, so the fast path gives the right map."""
    class Threaded(Small):
        threaded = False

        def forward(self, x):
            if not self.threaded:
                return super().forward(x)
            out = {}
            worker = threading.Thread(target=lambda: out.setdefault("y", super(
                Threaded, self).forward(x)))
            worker.start()
            worker.join()
            return out["y"]

    model = Threaded().eval()
    guided_backprop(model, x, 4)
    model.threaded = True
    torch.testing.assert_close(guided_backprop(model, x, 4),
                               reference_map(Small().eval(), x, 4, RefGuidedReLU))
    graph_rules.forget(model)
    with pytest.raises(ValueError, match="another thread"):
        guided_backprop(model, x, 4)


def test_qualification_is_forgotten_with_the_model():
    import gc
    import weakref

    model = Small().eval()
    guided_backprop(model, torch.randn(1, 3, 8, 8), 0)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None



def test_a_context_subclass_that_handles_calls_itself_sees_every_call(x):
    """A user's ReLUContext subclass overriding how a call is handled keeps seeing the calls:
    the fast path is for the library's own contexts (and subclasses that only configure)."""
    class Counting(ReLUContext):
        seen = 0

        def _relu_kw(self, func, args, kwargs):
            type(self).seen += 1
            return super()._relu_kw(func, args, kwargs)

    class Configured(ReLUContext):
        def __init__(self):
            super().__init__(GUIDED_BACKPROP_RULE)

    model = Small().eval()
    guided_backprop(model, x, 1)
    assert graph_rules.qualifies(model)
    for _ in range(2):
        out = saliency(model, x, 1, context_builder=lambda: Counting(GUIDED_BACKPROP_RULE))
        torch.testing.assert_close(out, reference_map(model, x, 1, RefGuidedReLU))
    assert Counting.seen == 4  # both nn.ReLU modules call F.relu, in each of the two calls
    ctx = Configured()
    assert ctx.plain_forward(model) and not Counting(GUIDED_BACKPROP_RULE).plain_forward(model)


def test_threads_explaining_one_model_at_once_on_the_fast_path(x):
    """Several threads on one qualifying model: each call hooks its own graph, so every map is
    the single-thread one, and a plain gradient computed meanwhile stays plain."""
    model = Small().eval()
    want_guided = guided_backprop(model, x, 2)
    want_deconv = deconvnet(model, x, 2)
    want_plain = reference_map(model, x, 2)
    assert graph_rules.qualifies(model)
    failures = []

    def work(method, want):
        for _ in range(15):
            got = method(model, x, 2)
            if not torch.equal(got, want):
                failures.append(method.__name__)

    def plain():
        for _ in range(15):
            xx = x.detach().clone().requires_grad_()
            (g,) = torch.autograd.grad(model(xx)[:, 2].sum(), xx)
            if not torch.allclose(g.abs().amax(1, keepdim=True), want_plain):
                failures.append("plain")

    threads = [threading.Thread(target=work, args=(guided_backprop, want_guided)),
               threading.Thread(target=work, args=(deconvnet, want_deconv)),
               threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
