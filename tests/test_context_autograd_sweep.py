"""The ``with`` blocks (rule contexts, probes) under every way a user drives autograd.

Each construct gives the rule's gradient — guided backprop and DeConvNet against the hand-written
reference rules of ``conftest`` (RefGuidedReLU / RefDeconvReLU applied to every ReLU of the same
net), excitation backprop and LRP against their canonical use (``with ctx: y.backward()``, itself
checked against hand references in test_excitation_backprop / test_lrp) — or a clear error
naming the construct.  A silently plain gradient is the bug these tests look for.
"""

from __future__ import annotations

import functools
import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch.autograd.function import once_differentiable

from torchray_like.attribution import METHODS
from torchray_like.attribution.autograd_guards import (
    SecondOrderError,
    TransformNotSupportedError,
)
from torchray_like.attribution.context import NoRuleAppliedWarning, active_rule_contexts
from torchray_like.attribution.deconvnet import DECONVNET_RULE, DeConvNetContext, DeConvNetReLU
from torchray_like.attribution.excitation_backprop import ExcitationBackpropContext
from torchray_like.attribution.guided_backprop import GuidedBackpropContext, GuidedBackpropReLU
from torchray_like.attribution.lrp import LRPContext
from torchray_like.attribution.probe import Probe
from torchray_like.attribution.rules import ReLUContext
from torchray_like.attribution.transformer_lrp import TransformerLRPContext

from .conftest import RefDeconvReLU, RefGuidedReLU, ScaleByTwo, hook_counts
from .transformer_models import make_vit

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXTS = {"guided": GuidedBackpropContext, "deconv": DeConvNetContext,
            "ebp": ExcitationBackpropContext, "lrp": LRPContext,
            # AttnLRP's ε rule on convolutions; the default ε (1e-6) is the plain gradient
            # up to 1e-4 on this net, too close to tell a rule that did not apply
            "tlrp": functools.partial(TransformerLRPContext, epsilon=0.05)}
NAMES = {kind: getattr(c, "func", c).__name__ for kind, c in CONTEXTS.items()}
REFERENCE_RULES = {"guided": RefGuidedReLU, "deconv": RefDeconvReLU}
#: Contexts that refuse saved-tensor hooks (their rules read the forward pass's activations).
REFUSE_SAVED_HOOKS = ("ebp", "lrp", "tlrp")
CLASS = 1


Scale2 = ScaleByTwo  # a user's custom function: ``2 x`` with its own backward

class Scale2Once(Scale2):
    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return g * 2


class Net(nn.Module):
    """conv -> BN -> in-place ReLU module -> conv -> F.relu -> conv + residual -> F.relu -> fc.

    ``reference``: every ReLU is that hand-written autograd function instead (the reference
    rule); ``custom``: a user autograd.Function after the first block."""

    def __init__(self, reference=None, custom=None):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.r1 = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.bn.running_mean.uniform_(-0.2, 0.2)
        self.bn.running_var.uniform_(0.5, 1.5)
        self.reference, self.custom = reference, custom
        self.eval()

    def act(self, x, module=None):
        if self.reference is not None:
            return self.reference.apply(x, None)
        return module(x) if module is not None else F.relu(x)

    def forward(self, x):
        h = self.act(self.bn(self.c1(x)), self.r1)
        if self.custom is not None:
            h = self.custom.apply(h)
        h = self.act(self.c3(self.act(self.c2(h))) + h)
        return self.fc(h.mean((2, 3)))


NET = Net()
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def input_grad(kind, net=NET, x=X):
    """The canonical use: backward() inside the block (for the reference nets, no block)."""
    xx = x.clone().requires_grad_()
    if kind in REFERENCE_RULES:
        y = Net(REFERENCE_RULES[kind], net.custom)(xx)
    elif kind == "plain":
        y = net(xx)
    else:
        with CONTEXTS[kind]():
            y = net(xx)
    y[:, CLASS].sum().backward()
    return xx.grad


REF = {kind: input_grad(kind) for kind in list(CONTEXTS) + ["plain"]}


def close(a, b, tol=1e-5):
    """Equal up to ``tol`` relative to ``b``'s largest value (float32 rounding)."""
    return float((a - b).abs().max()) <= tol * float(b.abs().max()) + 1e-9


def score_in(kind):
    """``x -> net(x)[:, CLASS].sum()`` run inside a fresh context of ``kind``."""
    def f(xx):
        with CONTEXTS[kind]():
            return NET(xx)[:, CLASS].sum()
    return f


# ---------------------------------------------------------------------------------------------
# First-order drivers


def test_references_differ_from_the_plain_gradient():
    for kind in CONTEXTS:  # otherwise the sweep could not tell a plain gradient from the rule
        assert not close(REF[kind], REF["plain"], 1e-2), kind
    for kind in REFERENCE_RULES:  # the library's canonical use is the hand-written rule
        xx = X.clone().requires_grad_()
        with CONTEXTS[kind]():
            NET(xx)[:, CLASS].sum().backward()
        assert close(xx.grad, REF[kind])


def _grad(kind, xx):
    with CONTEXTS[kind]():
        y = NET(xx)
        return torch.autograd.grad(y[:, CLASS].sum(), xx)[0]


def _backward_tensors(kind, xx):
    with CONTEXTS[kind]():
        y = NET(xx)
        seed = torch.zeros_like(y)
        seed[:, CLASS] = 1
        torch.autograd.backward([y], [seed])
    return xx.grad


def _after_exit(kind, xx):
    with CONTEXTS[kind]():
        y = NET(xx)
    y[:, CLASS].sum().backward()  # the nodes hold the rule: read after the block, still applies
    return xx.grad


def _retain_twice(kind, xx):
    with CONTEXTS[kind]():
        y = NET(xx)
        (first,) = torch.autograd.grad(y[:, CLASS].sum(), xx, retain_graph=True)
    (second,) = torch.autograd.grad(y[:, CLASS].sum(), xx)
    assert torch.equal(first, second)
    return second


def _create_graph(kind, xx):
    with CONTEXTS[kind]():
        y = NET(xx)
        (g,) = torch.autograd.grad(y[:, CLASS].sum(), xx, create_graph=True)
    assert g.requires_grad  # marked: differentiating it raises (below), never zeros
    return g.detach()


def _vjp(kind, xx):
    return torch.autograd.functional.vjp(score_in(kind), xx.detach())[1]


def _jacobian(kind, xx):
    return torch.autograd.functional.jacobian(score_in(kind), xx.detach())


def _anomaly(kind, xx):
    with torch.autograd.set_detect_anomaly(True):
        return _grad(kind, xx)


DRIVERS = {"autograd.grad": _grad, "autograd.backward": _backward_tensors,
           "after_exit": _after_exit, "retain_graph_twice": _retain_twice,
           "create_graph_first_order": _create_graph, "functional.vjp": _vjp,
           "functional.jacobian": _jacobian, "detect_anomaly": _anomaly}


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("kind", CONTEXTS)
def test_first_order_drivers_apply_the_rule(kind, driver):
    g = DRIVERS[driver](kind, X.clone().requires_grad_())
    assert g.shape == X.shape and g.dtype == X.dtype
    assert close(g, REF[kind]), (kind, driver, float((g - REF[kind]).abs().max()))


def test_rule_is_read_at_backward_time_after_the_block():
    # rules.py: "a graph built inside the context can be differentiated after the block has
    # ended, and the rule can be switched between two backward passes of one forward".
    xx = X.clone().requires_grad_()
    with GuidedBackpropContext() as ctx:
        y = NET(xx)
    (guided,) = torch.autograd.grad(y[:, CLASS].sum(), xx, retain_graph=True)
    ctx.rule = DECONVNET_RULE
    (deconv,) = torch.autograd.grad(y[:, CLASS].sum(), xx)
    assert close(guided, REF["guided"]) and close(deconv, REF["deconv"])


# ---------------------------------------------------------------------------------------------
# Second order, batched backward passes, torch.func: refused, naming the construct


@pytest.mark.parametrize("kind", CONTEXTS)
def test_second_derivative_through_a_rule_is_refused(kind):
    # Before: guided raised PyTorch's "threshold_backward(): functions with out=...", DeConvNet
    # returned a mixed second derivative, excitation backprop / LRP returned None (zeros).
    xx = X.clone().requires_grad_()
    with CONTEXTS[kind]():
        y = NET(xx)
        (g,) = torch.autograd.grad(y[:, CLASS].sum(), xx, create_graph=True)
    with pytest.raises(SecondOrderError, match="second derivative") as info:
        torch.autograd.grad((g * g).sum(), xx, allow_unused=True)
    assert isinstance(info.value, ValueError) and "create_graph=False" in str(info.value)
    with pytest.raises(SecondOrderError, match="hessian"):
        torch.autograd.functional.hessian(score_in(kind), X[:1].clone())
    assert torch._C._len_torch_function_stack() == 0


def test_a_rule_whose_kernels_batch_gives_the_loops_gradients():
    """Batched gradients are recognised only when a rule fails on them (no cost on the common
    path): DeConvNet's rule (a ReLU of the signal) batches, and gives exactly the loop's."""
    f = score_in("deconv")
    torch.testing.assert_close(torch.autograd.functional.jacobian(f, X.clone(), vectorize=True),
                               torch.autograd.functional.jacobian(f, X.clone()), rtol=0, atol=0)
    xx = X.clone().requires_grad_()
    with CONTEXTS["deconv"]():
        y = NET(xx)[:, CLASS]
    batched = torch.autograd.grad(y, xx, torch.eye(2), is_grads_batched=True, retain_graph=True)
    loop = [torch.autograd.grad(y, xx, row, retain_graph=True)[0] for row in torch.eye(2)]
    torch.testing.assert_close(batched[0], torch.stack(loop), rtol=0, atol=0)


@pytest.mark.parametrize("kind", [k for k in CONTEXTS if k != "deconv"])
def test_batched_backward_passes_are_refused(kind):
    # Before: "Batching rule not implemented for aten::threshold_backward.grad_input" (guided),
    # "... aten::alias" (excitation), "Cannot access data pointer ..." (LRP).
    with pytest.raises(TransformNotSupportedError, match="vectorize=False") as info:
        torch.autograd.functional.jacobian(score_in(kind), X.clone(), vectorize=True)
    assert isinstance(info.value, ValueError)
    xx = X.clone().requires_grad_()
    with CONTEXTS[kind]():
        y = NET(xx)[:, CLASS]
    with pytest.raises(TransformNotSupportedError, match="is_grads_batched"):
        torch.autograd.grad(y, xx, torch.eye(2), is_grads_batched=True)


def _func_grad(f, x):
    return torch.func.grad(f)(x)


def _func_vjp(f, x):
    return torch.func.vjp(f, x)[1](torch.ones(()))[0]


def _per_sample(f, x):
    return torch.func.vmap(torch.func.grad(lambda xi: f(xi[None])))(x)


def _jacrev(f, x):
    return torch.func.jacrev(f)(x)


TRANSFORMS = {"grad": _func_grad, "vjp": _func_vjp, "vmap_grad": _per_sample,
              "jacrev": _jacrev}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kind", CONTEXTS)
def test_torch_func_transforms_are_refused_naming_the_context(kind, transform):
    # Before: PyTorch's "... must override the setup_context staticmethod".
    name = NAMES[kind]
    with pytest.raises(TransformNotSupportedError, match=f"{name} cannot run under torch.func"):
        TRANSFORMS[transform](score_in(kind), X.clone())
    with pytest.raises(TransformNotSupportedError, match="per-sample"):  # block outside
        with CONTEXTS[kind]():
            TRANSFORMS[transform](lambda t: NET(t)[:, CLASS].sum(), X.clone())
    assert torch._C._len_torch_function_stack() == 0 and not active_rule_contexts()


def test_torch_func_still_works_without_a_context_and_vmap_forward_inside_one():
    g = torch.func.grad(lambda t: NET(t)[:, CLASS].sum())(X.clone())
    assert close(g, REF["plain"])
    with GuidedBackpropContext() as ctx, warnings.catch_warnings(record=True):
        y = torch.func.vmap(lambda xi: NET(xi[None])[0])(X.clone())  # nothing differentiated
    assert close(y, NET(X)) and ctx.replaced == 0 and ctx.skipped.get("relu") == 3


def test_per_sample_rule_gradients_are_one_backward_of_the_sum():
    # What TRANSFORM_ADVICE tells: with batch norm in eval mode each sample's rule gradient
    # is its own slice of the batch's backward pass.
    for kind in CONTEXTS:
        for i in range(2):
            xi = X[i:i + 1].clone().requires_grad_()
            with CONTEXTS[kind]():
                NET(xi)[:, CLASS].sum().backward()
            assert close(xi.grad[0], REF[kind][i]), kind


# ---------------------------------------------------------------------------------------------
# Probes


def _reference_layer_grad(kind):
    """The gradient at c2's output by hand: a forward hook keeps it (no Probe)."""
    kept = []
    net = Net(REFERENCE_RULES.get(kind)) if kind in REFERENCE_RULES else NET
    handle = net.c2.register_forward_hook(lambda m, i, o: kept.append(o) or o.retain_grad())
    try:
        xx = X.clone().requires_grad_()
        if kind in CONTEXTS and kind not in REFERENCE_RULES:
            with CONTEXTS[kind]():
                y = net(xx)
        else:
            y = net(xx)
        y[:, CLASS].sum().backward()
    finally:
        handle.remove()
    return kept[0].grad


@pytest.mark.parametrize("kind", ["plain"] + list(CONTEXTS))
def test_probe_with_and_without_a_context(kind):
    reference = _reference_layer_grad(kind)
    before = hook_counts(NET)
    with Probe(NET.c2, target="output") as probe:
        for use in ("backward", "autograd.grad"):
            xx = X.clone().requires_grad_()
            with CONTEXTS[kind]() if kind in CONTEXTS else torch.enable_grad():
                y = NET(xx)
                if use == "backward":
                    y[:, CLASS].sum().backward()
                    g = probe.data[0].grad
                else:
                    (g,) = torch.autograd.grad(y[:, CLASS].sum(), probe.data[0])
            assert len(probe.data) == 1 and g.shape == (2, 6, 8, 8)
            assert close(g, reference), (kind, use)
        # Before: PyTorch's "attempting to call Tensor.retain_grad() inside of a function
        # being transformed by a functorch transform", from inside the probe's hook.
        # (inside a context, the context's own refusal comes first)
        with pytest.raises(TransformNotSupportedError,
                           match="Probe on Conv2d" if kind == "plain" else "torch.func"):
            with CONTEXTS[kind]() if kind in CONTEXTS else torch.enable_grad():
                torch.func.grad(lambda t: NET(t)[:, CLASS].sum())(X.clone())
    assert hook_counts(NET) == before


# ---------------------------------------------------------------------------------------------
# User hooks


@pytest.mark.parametrize("kind", CONTEXTS)
def test_tensor_hook_sees_and_changes_the_rule_gradient(kind):
    seen = []

    def double(g):
        seen.append(g)
        return 2 * g

    handle = NET.bn.register_forward_hook(lambda m, i, o: o.register_hook(double) and None)
    try:
        xx = X.clone().requires_grad_()
        with CONTEXTS[kind]():
            NET(xx)[:, CLASS].sum().backward()
    finally:
        handle.remove()
    # every path to the input goes through bn's output, and each rule is linear in its signal
    assert len(seen) == 1 and close(xx.grad, 2 * REF[kind])


@pytest.mark.parametrize("kind", CONTEXTS)
def test_full_backward_hook_and_multi_grad_hook(kind):
    grads, multi = [], []
    handle = NET.c2.register_full_backward_hook(lambda m, gi, go: grads.append(gi[0]))
    try:
        xx = X.clone().requires_grad_()
        with CONTEXTS[kind]():
            y = NET(xx)
            torch.autograd.graph.register_multi_grad_hook(
                (xx, y), lambda gs: multi.append([g is not None for g in gs]))
            y[:, CLASS].sum().backward()
    finally:
        handle.remove()
    assert close(xx.grad, REF[kind]) and len(grads) == 1 and grads[0].shape == (2, 6, 8, 8)
    assert multi == [[True, True]]


@pytest.mark.parametrize("kind", REFERENCE_RULES)
def test_forward_hook_that_changes_the_output(kind):
    results = []
    for net in (NET, Net(REFERENCE_RULES[kind])):
        handle = net.c2.register_forward_hook(lambda m, i, o: o * 2 - 0.1)
        try:
            xx = X.clone().requires_grad_()
            with CONTEXTS[kind]() if net is NET else torch.enable_grad():
                net(xx)[:, CLASS].sum().backward()
            results.append(xx.grad)
        finally:
            handle.remove()
    assert close(results[0], results[1]) and not close(results[0], REF[kind], 1e-6)


@pytest.mark.parametrize("custom", [Scale2, Scale2Once])
@pytest.mark.parametrize("kind", REFERENCE_RULES)
def test_custom_autograd_function_in_the_model_keeps_its_backward(kind, custom):
    xx = X.clone().requires_grad_()
    with CONTEXTS[kind]():
        Net(custom=custom)(xx)[:, CLASS].sum().backward()
    assert close(xx.grad, input_grad(kind, Net(custom=custom)))


@pytest.mark.parametrize("kind", CONTEXTS)
def test_saved_tensor_hooks_inside_and_around(kind):
    xx = X.clone().requires_grad_()
    with torch.autograd.graph.save_on_cpu():  # around the block: kept, exact
        with CONTEXTS[kind]():
            y = NET(xx)
    y[:, CLASS].sum().backward()
    assert close(xx.grad, REF[kind])
    packed = []

    def pack(t):
        packed.append(1)
        return t.clone()

    xx = X.clone().requires_grad_()
    with CONTEXTS[kind]():
        if kind in REFUSE_SAVED_HOOKS:
            with pytest.raises(RuntimeError, match="saved-tensor hooks"):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    pass
            return
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = NET(xx)
        y[:, CLASS].sum().backward()
    assert packed and close(xx.grad, REF[kind])


@pytest.mark.parametrize("kind", CONTEXTS)
def test_checkpoint_inside_the_block(kind):
    xx = X.clone().requires_grad_()
    with CONTEXTS[kind]():
        if kind in REFUSE_SAVED_HOOKS:
            with pytest.raises(RuntimeError, match="checkpoint"):
                checkpoint.checkpoint(NET, xx, use_reentrant=False)
            return
        y = checkpoint.checkpoint(NET, xx, use_reentrant=False)
        y[:, CLASS].sum().backward()
    assert close(xx.grad, REF[kind])


# ---------------------------------------------------------------------------------------------
# Autocast and grad modes


@pytest.mark.parametrize("where", ["inside", "around"])
@pytest.mark.parametrize("kind", CONTEXTS)
def test_autocast_bfloat16(kind, where):
    def run(net, ctx):
        xx = X.clone().requires_grad_()
        cast = torch.autocast("cpu", dtype=torch.bfloat16)
        if where == "inside":
            with ctx, cast:
                y = net(xx)
        else:
            with cast, ctx:
                y = net(xx)
        y[:, CLASS].float().sum().backward()
        return xx.grad

    g = run(NET, CONTEXTS[kind]())
    assert g.dtype == torch.float32
    if kind in REFERENCE_RULES:
        # The same rule by hand under the same autocast (guided backprop's sign masks flip on
        # bfloat16's rounding: up to 20 % off the float32 map, entry-wise).
        ref = run(Net(REFERENCE_RULES[kind]), torch.enable_grad())
        assert close(g, ref, 1e-3)
        assert not close(g, run(NET, torch.enable_grad()), 1e-2)  # not the plain gradient
    else:
        assert close(g, REF[kind], 0.02)  # bfloat16's precision


@pytest.mark.parametrize("kind", CONTEXTS)
def test_grad_modes_nested_inside_the_block(kind):
    xx = X.clone().requires_grad_()
    with CONTEXTS[kind]() as ctx:
        with torch.no_grad():
            NET(xx)
        with torch.inference_mode():
            NET(X.clone())
        skipped = dict(ctx.skipped)
        with torch.no_grad(), torch.enable_grad():
            y = NET(xx)
        y[:, CLASS].sum().backward()
    assert skipped and close(xx.grad, REF[kind])


def test_compiled_sub_module_called_plain_first_then_inside_the_block():
    torch._dynamo.reset()
    net = Net()
    net.c2 = torch.compile(net.c2, backend="eager")
    xx = X.clone().requires_grad_()
    net(xx)[:, CLASS].sum().backward()  # a graph cached without the context
    assert close(xx.grad, REF["plain"])
    xx.grad = None
    with GuidedBackpropContext() as ctx:
        net(xx)[:, CLASS].sum().backward()
    assert ctx.counts == {"relu": 3} and close(xx.grad, REF["guided"])
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Nesting, re-entry, threads, exceptions


def test_nesting_same_kind_two_kinds_and_a_method_inside():
    xx = X.clone().requires_grad_()
    with GuidedBackpropContext(), GuidedBackpropContext():
        NET(xx)[:, CLASS].sum().backward()
    assert close(xx.grad, REF["guided"])
    xx.grad = None
    with warnings.catch_warnings():
        # The outer context replaced nothing because the inner one did: no "plain gradients"
        # warning (it said so before).
        warnings.simplefilter("error", NoRuleAppliedWarning)
        with DeConvNetContext() as outer, GuidedBackpropContext() as inner:
            NET(xx)[:, CLASS].sum().backward()  # the innermost handles a call
    assert close(xx.grad, REF["guided"]) and outer.replaced == 0
    assert outer.inner_replaced == inner.replaced > 0
    # An outer context around an inner one that replaced nothing still says so.
    with pytest.warns(NoRuleAppliedWarning, match="GuidedBackpropContext saw 3 torch calls "
                                                  "but replaced no"):
        with GuidedBackpropContext():
            with DeConvNetContext():
                pass
            torch.sigmoid(torch.ones(2, requires_grad=True) * 2)
    xx.grad = None
    alone = METHODS["guided_backprop"](NET, X[:1], CLASS)
    with DeConvNetContext() as ctx:
        inside = METHODS["guided_backprop"](NET, X[:1], CLASS)  # the caller's block suspended
        counted = ctx.replaced
        NET(xx)[:, CLASS].sum().backward()  # and back afterwards
    assert torch.equal(alone, inside) and counted == 0 and close(xx.grad, REF["deconv"])


@pytest.mark.parametrize("kind", CONTEXTS)
def test_reentered_context_and_exception_leave_the_world_as_before(kind):
    ctx = CONTEXTS[kind]()
    hooks = hook_counts(NET)
    with pytest.raises(KeyError):
        with ctx:
            NET(X.clone().requires_grad_())
            raise KeyError("boom")
    assert torch._C._len_torch_function_stack() == 0 and not active_rule_contexts()
    assert hook_counts(NET) == hooks
    xx = X.clone().requires_grad_()
    with ctx:
        NET(xx)[:, CLASS].sum().backward()
    assert close(xx.grad, REF[kind]) and hook_counts(NET) == hooks


def test_two_threads_two_contexts_and_one_context_in_two_threads():
    barrier, results, errors = threading.Barrier(2), {}, []

    def work(kind):
        try:
            xx = X.clone().requires_grad_()
            with CONTEXTS[kind]():
                barrier.wait(5)  # both blocks open at once
                NET(xx)[:, CLASS].sum().backward()
            results[kind] = xx.grad
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in ("guided", "deconv")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and close(results["guided"], REF["guided"])
    assert close(results["deconv"], REF["deconv"])
    shared, entered, opened, failed = (GuidedBackpropContext(), threading.Event(),
                                       threading.Event(), [])

    def hold():
        with shared:
            entered.set()
            opened.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(5)
        with pytest.raises(ValueError, match="already active"):
            with shared:
                failed.append("entered")
    finally:
        opened.set()
        holder.join()
    assert not failed and torch._C._len_torch_function_stack() == 0


# ---------------------------------------------------------------------------------------------
# A rectifier inside a user's autograd.Function, and transformer LRP on a small ViT


class HandReLU(torch.autograd.Function):
    """A user's ReLU with its own (plain) backward: the rule cannot reach inside it."""

    @staticmethod
    def forward(ctx, x):
        out = F.relu(x)  # grad mode is off here: the context cannot make it a rule node
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g * (out > 0)


@pytest.mark.parametrize("kind", REFERENCE_RULES)
def test_rectifier_inside_a_custom_function_is_named_not_silently_plain(kind):
    # Before: no warning, the map silently mixed the rule with HandReLU's plain gradient.
    xx = X.clone().requires_grad_()
    with pytest.warns(UserWarning, match="custom autograd.Function") as record:
        with CONTEXTS[kind]() as ctx:
            Net(custom=HandReLU)(xx)[:, CLASS].sum().backward()
    assert ctx.counts == {"relu": 3} and ctx.skipped == {"relu": 1}
    assert any("keep their plain gradient" in str(w.message) for w in record)
    with pytest.warns(UserWarning, match="replaced no ReLU.*custom autograd.Function"):
        with CONTEXTS[kind]():
            HandReLU.apply(X.clone().requires_grad_())


def test_transformer_lrp_on_a_vit_refuses_second_order_and_torch_func():
    vit = make_vit().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    xx = x.clone().requires_grad_()
    with TransformerLRPContext("attnlrp"):
        y = vit(xx)
        (g0,) = torch.autograd.grad(y[:, 1].sum(), xx, retain_graph=True)
        (g,) = torch.autograd.grad(y[:, 1].sum(), xx, create_graph=True)
    assert torch.equal(g0, g.detach())
    with pytest.raises(SecondOrderError):
        torch.autograd.grad((g * g).sum(), xx)
    # CP-LRP holds the attention probabilities and LayerNorm's σ constant with detached
    # tensors: before, its second derivative was that of the detached form, silently.
    xx = x.clone().requires_grad_()
    with TransformerLRPContext("cp-lrp"):
        y = vit(xx)
        (g0,) = torch.autograd.grad(y[:, 1].sum(), xx, retain_graph=True)
        (g,) = torch.autograd.grad(y[:, 1].sum(), xx, create_graph=True)
    assert torch.equal(g0, g.detach()) and g0.abs().max() > 0
    with pytest.raises(SecondOrderError, match="second derivative"):
        torch.autograd.grad((g * g).sum(), xx)
    for rule in ("attnlrp", "cp-lrp"):
        # cp-lrp before: "Cannot access data pointer of Tensor that doesn't have storage"
        with pytest.raises(TransformNotSupportedError, match="TransformerLRPContext"):
            with TransformerLRPContext(rule):
                torch.func.grad(lambda t: vit(t)[:, 1].sum())(x.clone())
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("kind", REFERENCE_RULES)
def test_torchray_style_function_class_under_create_graph(kind):
    # ReLUContext(GuidedBackpropReLU): before, create_graph=True raised PyTorch's
    # "threshold_backward(): functions with out=... arguments" even for the first order.
    function = GuidedBackpropReLU if kind == "guided" else DeConvNetReLU
    xx = X.clone().requires_grad_()
    with ReLUContext(function):
        y = NET(xx)
        (g,) = torch.autograd.grad(y[:, CLASS].sum(), xx, create_graph=True)
    assert close(g.detach(), REF[kind])
    with pytest.raises(SecondOrderError, match="second derivative"):
        torch.autograd.grad((g * g).sum(), xx)
