"""Hostile cases of small fixes: an observer shared by two guarded models, a deep-copied
probe, a reentrant checkpoint inside a rule context."""

from __future__ import annotations

import copy
import threading
import warnings
from typing import Any, Dict

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from torchray_like.attribution.common import NoRuleAppliedWarning, Probe
from torchray_like.attribution.guided_backprop import GuidedBackpropContext
from torchray_like.attribution.lrp import LRPContext
from torchray_like.attribution.state import model_state_guard

from .conftest import hook_counts


@pytest.fixture(scope="module")
def quantization():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notes
        import torch.ao.quantization as quant
        yield quant


def shared_observer_models(quant: Any):
    """Two models sharing one fake-quantize module that has observed a batch (enabled)."""
    fake = quant.FakeQuantize()
    fake(torch.linspace(-3.0, 5.0, 32))  # some statistics: min -3, max 5
    first = nn.Sequential(nn.Linear(4, 4), fake)
    second = nn.Sequential(nn.Identity(), fake, nn.ReLU())
    return first.eval(), second.eval(), fake


def buffers(module: nn.Module) -> Dict[str, torch.Tensor]:
    return dict(module.named_buffers(recurse=True))


def assert_originals(fake: nn.Module, originals: Dict[str, torch.Tensor]) -> None:
    now = buffers(fake)
    assert now.keys() == originals.keys()
    for name, t in originals.items():
        assert now[name] is t, f"{name} is not the original tensor"
    assert int(fake.observer_enabled) == 1
    assert float(fake.activation_post_process.min_val) == -3.0
    assert float(fake.activation_post_process.max_val) == 5.0


def assert_hidden(fake: nn.Module, originals: Dict[str, torch.Tensor]) -> None:
    assert int(fake.observer_enabled) == 0
    assert fake.observer_enabled is not originals["observer_enabled"]
    assert fake.scale is not originals["scale"]


@pytest.mark.parametrize("order", ["last-in-first-out", "first-in-first-out"])
def test_shared_observer_nested_guards_restore_the_originals_once(quantization, order):
    first, second, fake = shared_observer_models(quantization)
    originals = buffers(fake)
    outer, inner = model_state_guard(first), model_state_guard(second)
    outer.__enter__()
    assert_hidden(fake, originals)
    inner.__enter__()
    assert_hidden(fake, originals)
    first(10 * torch.ones(1, 4))  # records into copies only
    (inner if order == "last-in-first-out" else outer).__exit__(None, None, None)
    assert_hidden(fake, originals)  # still hidden for the other model's guard
    (outer if order == "last-in-first-out" else inner).__exit__(None, None, None)
    assert_originals(fake, originals)
    # and hidden afresh by a later guard, given back again
    with model_state_guard(second):
        assert_hidden(fake, originals)
    assert_originals(fake, originals)


def test_shared_observer_guards_in_two_threads(quantization):
    first, second, fake = shared_observer_models(quantization)
    originals = buffers(fake)
    entered, first_left = threading.Event(), threading.Event()
    seen: Dict[str, Any] = {}

    def one() -> None:
        with model_state_guard(first):
            entered.set()
            assert seen.setdefault("second_entered", second_in.wait(10))
        first_left.set()

    def two() -> None:
        entered.wait(10)
        with model_state_guard(second):
            second_in.set()
            first_left.wait(10)
            seen["enabled_after_first_left"] = int(fake.observer_enabled)
            second(10 * torch.ones(1, 4))
    second_in = threading.Event()
    threads = [threading.Thread(target=one), threading.Thread(target=two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == {"second_entered": True, "enabled_after_first_left": 0}
    assert_originals(fake, originals)


@pytest.mark.parametrize("this_thread_only", [False, True])
@pytest.mark.parametrize("target", ["output", "input"])
def test_a_deep_copy_of_a_probed_model_loses_the_dead_hook(target, this_thread_only):
    """The copy's calls (here from another thread) are no calls of the probe: before, the
    copy kept a dead hook forever and, for a this-thread-only probe, counted its calls as the
    probed module's calls from another thread."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    with Probe(model[1], target, this_thread_only=this_thread_only) as probe:
        twin = copy.deepcopy(model)
        assert hook_counts(twin) == hook_counts(model) == {
            "1._forward_hooks" if target == "output" else "1._forward_pre_hooks": 1}
        seen: list = []
        thread = threading.Thread(target=lambda: seen.append(twin(x)))
        thread.start()
        thread.join(10)
        assert len(seen) == 1 and hook_counts(twin) == {}  # gone at the copy's first call
        assert probe.other_thread_calls == 0 and probe.data == []  # the copy is no call of its
        y = model(x)
        assert probe.active and len(probe.data) == 1
        expected = model[0](x) if target == "input" else torch.relu(model[0](x))
        torch.testing.assert_close(probe.data[0].detach(), expected, rtol=0, atol=0)
        torch.testing.assert_close(twin(x), y, rtol=0, atol=0)
    assert hook_counts(model) == {}


def checkpointed(reentrant: bool, relu_outside: bool) -> Any:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    return lambda x: (torch.relu(x) if relu_outside else x) + checkpoint(
        block, 2 * x, use_reentrant=reentrant).sum(1, keepdim=True)


@pytest.mark.parametrize("relu_outside", [False, True])
def test_a_reentrant_checkpoint_in_a_users_context_is_named_in_the_warning(relu_outside):
    """Before: 'gradients disabled, or inputs that do not require grad' when nothing else was
    replaced, and no warning at all when a rectifier outside the checkpoint was replaced."""
    x = torch.randn(2, 3, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GuidedBackpropContext():
            y = checkpointed(True, relu_outside)(x)
        y.sum().backward()
    messages = [(str(w.message), w.category, w.filename) for w in caught]
    assert len(messages) == 1, messages
    message, category, filename = messages[0]
    assert category is NoRuleAppliedWarning and filename == __file__
    assert message.startswith("GuidedBackpropContext: operations it replaces (ReLU) ran "
                              "inside torch.utils.checkpoint(use_reentrant=True)")
    assert "checkpoint with use_reentrant=False" in message
    assert ("mixes both" in message) == relu_outside
    assert ("plain gradients, not the method's" in message) == (not relu_outside)


def test_no_grad_and_non_reentrant_checkpoints_do_not_name_the_checkpoint():
    x = torch.randn(2, 3, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), GuidedBackpropContext():
            checkpointed(False, True)(x)
        with GuidedBackpropContext():  # the rules apply in the recomputation: no warning
            y = checkpointed(False, True)(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "gradients disabled" in messages[0]
    assert "checkpoint" not in messages[0]
    assert grad.shape == (2, 3) and grad.dtype == torch.float32


def test_a_reentrant_checkpoint_in_a_context_refusing_checkpoints_says_run_without_one():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.warns(NoRuleAppliedWarning) as caught:
        with LRPContext():
            checkpointed(True, False)(x)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("LRPContext: operations it replaces (convolution or linear-layer "
                              "call) ran inside torch.utils.checkpoint(use_reentrant=True)")
    assert message.endswith("run the model without activation checkpointing (LRP supports no "
                            "checkpoint).")
