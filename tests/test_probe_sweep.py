"""Sweep of :class:`Probe` in users' own ``with`` blocks: contexts × layer kinds × lifecycle.

What it checks (``tests/test_probe.py`` holds the focused cases; nothing here repeats them):

* **contexts**: none (plain gradient), ``GuidedBackpropContext``, ``DeConvNetContext``,
  ``ExcitationBackpropContext`` (and the contrastive recipe with ``Probe.contrast``),
  ``LRPContext`` with each standard composite, ``TransformerLRPContext`` on a ViT token block;
* **layers** of a small CNN: conv followed by batch norm, batch norm, conv followed by an
  in-place ReLU, the in-place ``nn.ReLU`` probed itself, a residual block (sum written in
  ``forward``), a ReLU module called twice in one pass, a module returning its input
  (``nn.Identity``), max pooling, flatten, linear (input and output), the model's input
  (``target="input"``), an ``nn.Sequential`` container;
* **what is read**: ``probe.data`` values equal the module's real input/output, captured by
  forward hooks of this file on a copy of the model; ``probe.data[i].grad`` equals an
  independent computation — ``torch.autograd.grad`` w.r.t. a leaf that this file's own hook
  puts in place of the same tensor, on a copy whose ReLUs are replaced by the reference rules
  of ``tests/conftest.py`` (``RefGuidedReLU``, ``RefDeconvReLU``) for guided / DeConvNet; for
  the methods with no hand-written reference (excitation backprop, LRP, AttnLRP) the probe's
  reading equals the method function's own reading at ``saliency_layer`` (raw gradient through
  a ``gradient_to_saliency`` that returns it) and LRP relevance is conserved (Σ over the layer
  = target score for a bias-free network);
* **lifecycle**: no hook left after ``remove()`` / the probe's ``with`` block, also when the
  block raises; two probes on one module; a probe created inside vs outside the rule context;
  ``backward`` twice with ``retain_graph`` (PyTorch accumulates ``.grad``, as for any tensor);
  a new forward replaces ``data``; a ``torch.no_grad()`` forward inside a rule context.

Found three bugs, each fixed in ``probe.py`` (commits of their own) with its test here:

1. ``copy.deepcopy(model)`` copied the probed module's hook (and its weak reference to the
   probe): the *copy's* forward replaced ``probe.data``, so the original's ``.grad`` read None
   or the copy's gradient.  A probe now records calls of its own module only.
2. ``torch.utils.checkpoint(use_reentrant=False)``: the recomputation during backward was
   taken for a new forward pass and replaced ``probe.data``: ``.grad`` read None.
3. An input probe on the caller's leaf ``x`` recorded ``x`` itself: after a second pass its
   ``.grad`` was the sum of both passes, and one tensor hook per pass stayed on ``x``.

Every other combination agrees with the independent computation within float64 tolerance.
Not bugs: excitation backprop readings are signed (``signed=True`` default); α2β1 relevance is
not conserved where an output has no negative contribution (excluded from that test); a
guided context on a GELU ViT warns and gives the plain gradient; a new ``backward`` on the
same graph adds to ``.grad`` (PyTorch's rule).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from torchray_like.attribution.common import Probe, get_module
from torchray_like.attribution.deconvnet import DeConvNetContext
from torchray_like.attribution.excitation_backprop import (
    ExcitationBackpropContext,
    excitation_backprop,
)
from torchray_like.attribution.guided_backprop import GuidedBackpropContext
from torchray_like.attribution.lrp import LRPContext, lrp
from torchray_like.attribution.transformer_lrp import TransformerLRPContext, attn_lrp

from .conftest import (
    RefDeconvReLU,
    RefGuidedReLU,
    global_hook_counts,
    hook_counts,
    patched_functional,
)
from .transformer_models import make_vit

CLASSES = [1, 3]
COMPOSITES = ("EpsilonPlusFlat", "EpsilonPlus", "EpsilonAlpha2Beta1", "EpsilonGammaBox")


class Residual(nn.Module):
    """``x + conv(relu(x))``: the sum is written in ``forward``."""

    def __init__(self, c: int, bias: bool = True) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.relu(x))


class SweepNet(nn.Module):
    """A small CNN with every layer kind of the sweep (names are the sweep's layer names)."""

    def __init__(self, bias: bool = True, bn: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=bias),
            nn.BatchNorm2d(6) if bn else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 6, 3, padding=1, bias=bias),
            nn.ReLU(inplace=True))
        self.block = Residual(6, bias)
        self.act = nn.ReLU()        # called twice in one pass
        self.skip = nn.Identity()   # returns its input
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 4 * 4, 5, bias=bias)
        self.shift = 0.05 if bias else 0.0  # a constant shift absorbs relevance like a bias
        if bn:
            with torch.no_grad():  # eval-mode statistics that are not the identity
                self.features[1].running_mean.uniform_(-0.3, 0.3)
                self.features[1].running_var.uniform_(0.5, 2.0)
                self.features[1].weight.uniform_(0.5, 1.5)
                self.features[1].bias.uniform_(-0.2, 0.2)
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.block(self.features(x)))
        h = self.skip(h) + 0.5 * h
        h = self.act(h - self.shift)
        return self.fc(self.flatten(self.pool(h)))


#: (layer name, probe target, what the layer is).
LAYERS = [
    ("features.0", "input", "the model's input"),
    ("features.0", "output", "conv followed by batch norm"),
    ("features.1", "output", "batch norm"),
    ("features.3", "output", "conv followed by an in-place ReLU"),
    ("features.2", "output", "in-place nn.ReLU probed itself"),
    ("features.4", "input", "input of an in-place ReLU"),
    ("block", "output", "residual block (sum in forward)"),
    ("act", "output", "ReLU module called twice"),
    ("act", "input", "inputs of a module called twice"),
    ("skip", "output", "module returning its input"),
    ("pool", "output", "max pooling"),
    ("flatten", "output", "flatten"),
    ("fc", "input", "linear's input"),
    ("fc", "output", "linear's output"),
    ("features", "output", "nn.Sequential container"),
    ("", "output", "the model itself"),
]
LAYER_IDS = [f"{n}-{t}" for n, t, _ in LAYERS]


def batch(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, 3, 8, 8, dtype=torch.float64)


def score(y: torch.Tensor) -> torch.Tensor:
    """The explained score: class 1 of sample 0 plus class 3 of sample 1."""
    return y[torch.arange(2), torch.tensor(CLASSES)].sum()


class Capture:
    """This file's own hook: adds a zero leaf ``e`` to the probed tensor of each call, so that
    ``autograd.grad`` w.r.t. ``e`` is the gradient there (without cutting the graph above, which
    an earlier call of the same module needs), and keeps the values."""

    def __init__(self, module: nn.Module, target: str) -> None:
        self.leaves: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        if target == "output":
            self.handle = module.register_forward_hook(self._output)
        else:
            self.handle = module.register_forward_pre_hook(self._input)

    def _tap(self, t: torch.Tensor) -> torch.Tensor:
        self.values.append(t.detach().clone())
        leaf = torch.zeros_like(t, requires_grad=True)
        self.leaves.append(leaf)
        return t + leaf

    def _output(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return self._tap(out)

    def _input(self, module: nn.Module, args: Any) -> Any:
        return (self._tap(args[0]),) + tuple(args[1:])


def reference(model: nn.Module, x: torch.Tensor, name: str, target: str,
              rectifier: Optional[type] = None) -> List[torch.Tensor]:
    """Values (with ``.grad``) of each call of ``name`` on a copy of ``model``, whose ReLUs run
    ``rectifier`` (a conftest reference rule) when given."""
    ref = copy.deepcopy(model)
    for m in ref.modules():  # the reference rules are out-of-place
        if isinstance(m, nn.ReLU):
            m.inplace = False
    cap = Capture(get_module(ref, name), target)
    ctx = patched_functional(rectifier) if rectifier else _null()
    with ctx:
        y = ref(x)
    grads = torch.autograd.grad(score(y), cap.leaves)
    cap.handle.remove()
    for value, g in zip(cap.values, grads):
        value.grad = g
    return cap.values


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def probed(model: nn.Module, x: torch.Tensor, name: str, target: str,
           context: Callable[[], Any], inside: bool = False) -> List[torch.Tensor]:
    """TorchRay's recipe: a probe, a forward and ``backward`` in the user's ``with`` block."""
    before = (hook_counts(model), global_hook_counts())
    module = get_module(model, name)
    probe = None if inside else Probe(module, target=target)
    with context():
        if inside:
            probe = Probe(module, target=target)
        score(model(x)).backward()
    assert probe is not None
    data = list(probe.data)
    probe.remove()
    assert probe.data == [] and not probe.active
    assert (hook_counts(model), global_hook_counts()) == before
    return data


def assert_same(data: List[torch.Tensor], refs: List[torch.Tensor]) -> None:
    assert len(data) == len(refs)
    for d, r in zip(data, refs):
        assert d.shape == r.shape and d.dtype == torch.float64
        torch.testing.assert_close(d.detach(), r.detach(), rtol=0, atol=0)
        assert d.grad is not None, "no .grad on the probed tensor"
        torch.testing.assert_close(d.grad, r.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Plain gradient, guided backprop, DeConvNet: against the conftest reference rules


RECTIFIERS = {"gradient": (_null, None), "guided": (GuidedBackpropContext, RefGuidedReLU),
              "deconvnet": (DeConvNetContext, RefDeconvReLU)}


@pytest.mark.parametrize("method", list(RECTIFIERS))
@pytest.mark.parametrize("name,target,what", LAYERS, ids=LAYER_IDS)
def test_probe_reads_the_values_and_the_rule_gradient_of_every_layer_kind(method, name,
                                                                          target, what):
    context, rectifier = RECTIFIERS[method]
    model = SweepNet()
    x = batch()
    data = probed(model, x, name, target, context)
    assert len(data) == (2 if name == "act" else 1), what
    assert_same(data, reference(model, x, name, target, rectifier))


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
@pytest.mark.parametrize("name,target", [("features.3", "output"), ("act", "output"),
                                         ("skip", "output")])
def test_probe_created_inside_the_context_reads_the_same(method, name, target):
    context, rectifier = RECTIFIERS[method]
    model, x = SweepNet(), batch()
    outside = probed(model, x, name, target, context)
    inside = probed(model, x, name, target, context, inside=True)
    assert_same(inside, outside)
    assert_same(inside, reference(model, x, name, target, rectifier))


# ---------------------------------------------------------------------------------------------
# Excitation backprop and LRP: against the method function's own reading at the same layer


def raw_gradient(t: torch.Tensor) -> torch.Tensor:
    """A ``gradient_to_saliency`` that returns the gradient read, unflattened."""
    assert t.grad is not None
    return t.grad.detach().clone()


def raw_relevance(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return (t.detach() * t.grad).clone()


#: Spatial layers called once (the methods' ``saliency_layer`` reads an output).
SPATIAL = ["features.0", "features.1", "features.2", "features.3", "block", "skip", "pool"]


def _quiet() -> Any:
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.simplefilter("ignore")
    return catcher


def nonneg_batch() -> torch.Tensor:
    """Excitation backprop's inputs are activations: non-negative."""
    return batch().abs()


@pytest.mark.parametrize("name", SPATIAL)
def test_excitation_backprop_probe_matches_the_method_reading(name):
    model, x = SweepNet(), nonneg_batch()
    catcher = _quiet()
    try:
        data = probed(model, x, name, "output", ExcitationBackpropContext)
        expected = excitation_backprop(model, x, CLASSES, saliency_layer=name,
                                       gradient_to_saliency=raw_gradient)
    finally:
        catcher.__exit__(None, None, None)
    assert len(data) == 1 and data[0].grad is not None
    assert isinstance(expected, torch.Tensor)
    torch.testing.assert_close(data[0].grad, expected, rtol=1e-10, atol=1e-12)


def test_contrastive_excitation_recipe_with_probe_contrast():
    """The manual contrastive recipe: the dual pass's gradient at a layer becomes the
    ``contrast`` of the target pass; the reading below is the difference's back-propagation."""
    model, x = SweepNet(), nonneg_batch()
    layer, below = get_module(model, "block"), get_module(model, "features.3")
    catcher = _quiet()
    try:
        with Probe(layer, "output") as upper, Probe(below, "output") as lower:
            with ExcitationBackpropContext():
                score(model(x)).backward()
            target_top = upper.data[0].grad.clone()
            target_low = lower.data[0].grad.clone()
            # A second pass from the contrast's score (class 0) gives the dual gradient.
            with ExcitationBackpropContext():
                model(x)[:, 0].sum().backward()
            dual_top = upper.data[0].grad.clone()
            dual_low = lower.data[0].grad.clone()
            upper.contrast = dual_top
            with ExcitationBackpropContext():
                score(model(x)).backward()
            contrasted = lower.data[0].grad.clone()
            torch.testing.assert_close(upper.data[0].grad, target_top - dual_top)
    finally:
        catcher.__exit__(None, None, None)
    # Below the probe the rules are linear in the incoming signal (they depend on the forward
    # activations only), so the contrasted reading is the difference of the two readings.
    torch.testing.assert_close(contrasted, target_low - dual_low, rtol=1e-9, atol=1e-12)
    assert upper.data == [] and upper.contrast is None


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("name", SPATIAL)
def test_lrp_probe_relevance_matches_lrp_at_saliency_layer(composite, name):
    model, x = SweepNet(), batch()
    catcher = _quiet()
    try:
        data = probed(model, x, name, "output", lambda: LRPContext(composite, model=model))
        expected = lrp(model, x, CLASSES, saliency_layer=name, composite=composite,
                       gradient_to_saliency=raw_relevance)
    finally:
        catcher.__exit__(None, None, None)
    assert len(data) == 1 and data[0].grad is not None
    torch.testing.assert_close(data[0].detach() * data[0].grad, expected, rtol=1e-9,
                               atol=1e-12)


CONSERVED = [(c, n) for c in COMPOSITES for n in ("features.2", "features.3", "block", "pool",
                                                   "fc")
             # α2β1 conserves only where every output has positive and negative contributions;
             # one output of features.3 here has none negative (z⁻ = 0), so it gains α·R.
             if (c, n) != ("EpsilonAlpha2Beta1", "features.2")]


@pytest.mark.parametrize("composite,name", CONSERVED)
def test_lrp_probe_relevance_is_conserved_without_biases(composite, name):
    """Σ relevance at a layer above the first = the target score (no bias, no batch norm).
    The input of ``fc`` is read (its output's relevance is the logit itself)."""
    model, x = SweepNet(bias=False, bn=False), batch()
    target = "input" if name == "fc" else "output"
    probe = Probe(get_module(model, name), target)
    catcher = _quiet()
    try:
        with LRPContext(composite, model=model):
            y = model(x)
            score(y).backward()
    finally:
        catcher.__exit__(None, None, None)
    (t,) = probe.data
    relevance = (t.detach() * t.grad).flatten(1).sum(1)
    probe.remove()
    expected = y.detach()[torch.arange(2), torch.tensor(CLASSES)]
    torch.testing.assert_close(relevance, expected, rtol=1e-4, atol=1e-6)


def test_attn_lrp_probe_on_a_token_block_matches_the_method_reading():
    """``TransformerLRPContext`` in a with-block: a probe on an encoder block of a small ViT
    reads the relevance ``attn_lrp`` reads at the same ``saliency_layer``."""
    vit = make_vit().double()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    block = vit.encoder.layers[0]
    for rule in ("attnlrp", "cp-lrp"):
        before = hook_counts(vit)
        catcher = _quiet()
        try:
            with Probe(block, "output") as probe:
                with TransformerLRPContext(rule, model=vit):
                    score(vit(x)).backward()
                (t,) = probe.data
                got = (t.detach() * t.grad).clone()
            expected = attn_lrp(vit, x, CLASSES, saliency_layer=block, rule=rule,
                                gradient_to_saliency=raw_relevance)
        finally:
            catcher.__exit__(None, None, None)
        assert got.shape == (2, 17, 16)
        # The method lays the patch tokens out on their grid, (N, C, 4, 4), class token left.
        grid = got[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4)
        torch.testing.assert_close(grid, expected, rtol=1e-9, atol=1e-12)
        assert hook_counts(vit) == before


def test_plain_gradient_on_a_token_block_matches_an_own_hook():
    vit = make_vit().double()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for name, target in (("encoder.layers.encoder_layer_0", "output"),
                         ("encoder.layers.encoder_layer_1", "input"),
                         ("encoder.layers.encoder_layer_0.ln_1", "output")):
        data = probed(vit, x, name, target, _null)
        assert_same(data, reference(vit, x, name, target))


def test_guided_context_on_a_gelu_vit_warns_and_the_probe_reads_the_plain_gradient():
    """No ReLU to replace (GELU): the context says so, and the reading is the plain gradient
    (the warning is the user's signal that it is not guided)."""
    vit = make_vit().double()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    name = "encoder.layers.encoder_layer_1"
    with pytest.warns(UserWarning, match="GELU|replaced no ReLU"):
        data = probed(vit, x, name, "output", GuidedBackpropContext)
    assert_same(data, reference(vit, x, name, "output"))


# ---------------------------------------------------------------------------------------------
# Lifecycle


def test_an_exception_inside_both_with_blocks_leaves_no_hook_and_no_context():
    model, x = SweepNet(), batch()
    before = (hook_counts(model), global_hook_counts())
    with pytest.raises(RuntimeError, match="user error"):
        with Probe(get_module(model, "block"), "output") as probe:
            with GuidedBackpropContext():
                model(x)
                raise RuntimeError("user error")
    assert (hook_counts(model), global_hook_counts()) == before
    assert probe.data == [] and not probe.active
    # The rule context is gone too: a later backward is the plain gradient.
    assert_same(probed(model, x, "block", "output", _null),
                reference(model, x, "block", "output"))


def test_two_probes_on_one_module_read_the_same_and_keep_the_model_output():
    model, x = SweepNet(), batch()
    plain = model(x).detach()
    layer = get_module(model, "features.3")
    with Probe(layer, "output") as p1, Probe(layer, "output") as p2, \
            Probe(layer, "input") as p3:
        with GuidedBackpropContext():
            y = model(x)
            score(y).backward()
        torch.testing.assert_close(y.detach(), plain, rtol=0, atol=0)
        ref = reference(model, x, "features.3", "output", RefGuidedReLU)
        assert_same(p1.data, ref)
        assert_same(p2.data, ref)
        assert_same(p3.data, reference(model, x, "features.3", "input", RefGuidedReLU))
    assert hook_counts(model) == {}


def test_backward_twice_accumulates_and_a_new_forward_replaces_the_data():
    model, x = SweepNet(), batch()
    ref = reference(model, x, "block", "output", RefGuidedReLU)
    with Probe(get_module(model, "block"), "output") as probe:
        with GuidedBackpropContext():
            y = model(x)
            score(y).backward(retain_graph=True)
            score(y).backward()
        (t,) = probe.data
        # PyTorch's rule for any tensor's .grad: a second backward adds to it.
        torch.testing.assert_close(t.grad, 2 * ref[0].grad, rtol=1e-10, atol=1e-12)
        # A new forward pass (another input) replaces the reading.
        x2 = batch(seed=5)
        with GuidedBackpropContext():
            score(model(x2)).backward()
        assert len(probe.data) == 1 and probe.data[0] is not t
        assert_same(probe.data, reference(model, x2, "block", "output", RefGuidedReLU))


def test_no_grad_forward_inside_a_rule_context_records_values_only():
    model, x = SweepNet(), batch()
    ref = reference(model, x, "features.3", "output")
    with Probe(get_module(model, "features.3"), "output") as probe:
        with pytest.warns(UserWarning, match="replaced no ReLU"):
            with GuidedBackpropContext(), torch.no_grad():
                y = model(x)
        (t,) = probe.data
        torch.testing.assert_close(t, ref[0].detach(), rtol=0, atol=0)
        assert not t.requires_grad and t.grad is None
        assert not y.requires_grad


def test_probe_on_a_frozen_model_under_deconvnet_reads_the_rule_gradient():
    """Parameters frozen and an input without grad: the probed tensor becomes the leaf."""
    model, x = SweepNet(), batch()
    for p in model.parameters():
        p.requires_grad_(False)
    data = probed(model, x, "block", "output", DeConvNetContext)
    assert_same(data, reference(model, x, "block", "output", RefDeconvReLU))
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_a_deep_copy_of_the_model_does_not_write_into_the_probe():
    """``copy.deepcopy(model)`` copies the module's hook table, weak reference to the probe
    included.  Before the fix the copy's forward pass replaced ``probe.data`` with the copy's
    tensors: the original's backward then left ``.grad`` None (or a later backward of the
    copy filled it with the copy's gradient) — a silently wrong reading."""
    model, x = SweepNet(), batch()
    with Probe(get_module(model, "block"), "output") as probe:
        with GuidedBackpropContext():
            y = model(x)
            twin = copy.deepcopy(model)
            with torch.no_grad():
                twin.fc.weight.mul_(-1.0)
            y_twin = twin(batch(seed=7))
            score(y).backward()
            score(y_twin).backward()
        assert len(probe.data) == 1
        assert_same(probe.data, reference(model, x, "block", "output", RefGuidedReLU))
    assert hook_counts(model) == {}


def test_every_layer_kind_at_once_with_one_backward():
    """Probes on all the sweep's layers at the same time read what each reads alone."""
    model, x = SweepNet(), batch()
    probes: Dict[str, Probe] = {f"{n}-{t}": Probe(get_module(model, n), t)
                                for n, t, _ in LAYERS}
    with GuidedBackpropContext():
        score(model(x)).backward()
    for (name, target, what), key in zip(LAYERS, LAYER_IDS):
        assert_same(probes[key].data, reference(model, x, name, target, RefGuidedReLU))
        probes[key].remove()
    assert hook_counts(model) == {}


class Checkpointed(nn.Module):
    """``SweepNet`` with its ``features`` run under ``torch.utils.checkpoint``."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.net = SweepNet()
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        h = checkpoint(net.features, x, use_reentrant=self.reentrant)
        h = net.act(net.block(h))
        h = net.act(net.skip(h) + 0.5 * h - net.shift)
        return net.fc(net.flatten(net.pool(h)))


@pytest.mark.parametrize("method", ["gradient", "guided"])
def test_a_non_reentrant_checkpoint_recomputation_does_not_replace_the_reading(method):
    """Before the fix, the checkpoint's recomputation during backward was taken for a new
    forward pass: ``probe.data`` then held the recomputed tensors and ``.grad`` was None."""
    context, rectifier = RECTIFIERS[method]
    model, x = Checkpointed(reentrant=False), batch().requires_grad_(True)
    for name in ("features.0", "features.3"):
        probe = Probe(get_module(model.net, name), "output")
        with context():
            score(model(x)).backward()
        data = list(probe.data)
        probe.remove()
        assert len(data) == 1
        assert_same(data, reference(model.net, x, name, "output", rectifier))


def test_a_reentrant_checkpoint_reading_is_the_recomputed_gradient():
    """The reentrant checkpoint's first pass runs under no_grad; its recomputation (which
    the inner backward reaches) is what the probe holds, with the right gradient."""
    model, x = Checkpointed(reentrant=True), batch().requires_grad_(True)
    probe = Probe(get_module(model.net, "features.3"), "output")
    score(model(x)).backward()
    data = list(probe.data)
    probe.remove()
    assert_same(data, reference(model.net, x, "features.3", "output"))


@pytest.mark.parametrize("method", ["gradient", "guided"])
def test_input_probe_on_the_callers_leaf_reads_this_pass_and_leaves_no_hook(method):
    """Before the fix, an input probe whose input was the caller's ``x`` (a leaf that
    requires grad) recorded ``x`` itself: a second pass's ``.grad`` was the sum of both passes
    (a leaf's ``.grad`` accumulates) and a tensor hook per pass stayed on ``x`` after
    ``remove()``."""
    context, rectifier = RECTIFIERS[method]
    model, x = SweepNet(), batch().requires_grad_(True)
    with Probe(get_module(model, "features.0"), "input") as probe:
        for classes in ([0, 2], CLASSES):
            with context():
                y = model(x)
                y[torch.arange(2), torch.tensor(classes)].sum().backward()
        assert probe.data[0] is not x
        assert_same(probe.data, reference(model, x, "features.0", "input", rectifier))
    assert not x._backward_hooks  # no hook left on the caller's tensor
    # x.grad is the caller's: it accumulates both passes, as PyTorch does.
    latest = reference(model, x, "features.0", "input", rectifier)[0].grad
    assert x.grad is not None and not torch.allclose(x.grad, latest)
