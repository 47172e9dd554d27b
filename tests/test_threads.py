"""Forward passes that leave the calling thread (issue 17, item 2).

Rule contexts are thread-local: a model running branches in worker threads (model-parallel
code, ``nn.DataParallel`` over several devices) keeps plain rectifiers there.  The methods
refuse such graphs with an error saying what to do instead of returning a map mixing the
rule with the plain gradient; on one device ``nn.DataParallel`` calls the module directly and
gives the module's own maps.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.context import (
    UnhandledActivationWarning,
    active_rule_contexts,
    check_data_parallel,
    depends_on,
    nodes_on_path,
)
from torchray_like.attribution.deconvnet import deconvnet
from torchray_like.attribution.grad_cam import grad_cam
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import GuidedBackpropContext, guided_backprop
from torchray_like.attribution.linear_approx import linear_approx

from .conftest import global_hook_counts

_POOL = ThreadPoolExecutor(2)  # made before any call: its workers exist already

#: The methods run these checks once the driver calls ``RuleContext.check_path`` after the
#: scores are known and ``check_data_parallel`` before the forward pass (the driver is being
#: rewritten); strict, so that the marker goes as soon as the calls are in.


def run_in_thread(fn, x):
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("y", fn(x)))
    worker.start()
    worker.join()
    return out["y"]


RUNNERS = {
    "sequential": lambda fn, x: fn(x),
    "threading.Thread": run_in_thread,
    "concurrent.futures": lambda fn, x: _POOL.submit(fn, x).result(),
}


class Branches(nn.Module):
    """Two conv + activation branches, the second run by ``runner``; summed, then a head."""

    def __init__(self, runner="sequential", second_act=F.relu, first_act=F.relu):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.runner = RUNNERS[runner]
        self.first_act, self.second_act = first_act, second_act

    def forward(self, x):
        first = self.first_act(self.a(x))
        second = self.runner(lambda t: self.second_act(self.b(t)), x)
        return self.fc(F.relu(first + second).flatten(1))


def batch():
    return torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def threaded_pair(runner, **kw):
    net = Branches(runner, **kw).double()
    ref = Branches("sequential", **kw).double()
    ref.load_state_dict(net.state_dict())
    return net, ref


@pytest.mark.parametrize("runner", ["threading.Thread", "concurrent.futures"])
def test_context_check_path_refuses_rectifiers_made_in_worker_threads(runner):
    net, _ = threaded_pair(runner)
    x = batch().requires_grad_(True)
    with GuidedBackpropContext() as ctx:
        y = net(x)
    assert ctx.counts == {"relu": 2}  # the worker thread's ReLU was not seen
    with pytest.raises(ValueError, match=r"1 ReLU call\(s\) on the path from the output to the "
                                         r"input were made outside the context \(ReluBackward0 ×1"
                                         r"\).*another thread.*model\.module.*one process per "
                                         "device"):
        ctx.check_path(y[:, 0].sum(), [x], "the input")


def test_check_path_is_silent_when_every_rectifier_was_replaced():
    net, _ = threaded_pair("sequential")
    x = batch().requires_grad_(True)
    with GuidedBackpropContext() as ctx:
        y = net(x)
    ctx.check_path(y[:, 0].sum(), [x], "the input")
    assert ctx.counts == {"relu": 3} and ctx.unhandled == {}


@pytest.mark.parametrize("runner", ["threading.Thread", "concurrent.futures"])
@pytest.mark.parametrize("method", [guided_backprop, deconvnet])
def test_rule_methods_refuse_threaded_branches(runner, method):
    net, _ = threaded_pair(runner)
    threads = threading.active_count()
    hooks = global_hook_counts()
    with pytest.raises(ValueError, match="another thread.*model.module"):
        method(net, batch(), 1)
    # The world is as it was: no context left active, no hook, no thread.
    assert active_rule_contexts() == ()
    assert global_hook_counts() == hooks and threading.active_count() == threads


class AllInThread(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(run_in_thread(lambda t: F.relu(self.b(t)), x).flatten(1))


def test_all_rectifiers_in_threads_is_the_thread_error_not_replaced_no_relu():
    net = AllInThread().double()
    with pytest.raises(ValueError, match="made outside the context.*another thread"):
        guided_backprop(net, batch(), 0)


@pytest.mark.parametrize("runner", ["threading.Thread", "concurrent.futures"])
def test_plain_gradient_of_threaded_branches_is_exact(runner):
    """Autograd itself crosses threads: methods without rules give the sequential maps."""
    net, ref = threaded_pair(runner)
    x = batch()
    torch.testing.assert_close(gradient(net, x, 1), gradient(ref, x, 1), rtol=0, atol=0)
    torch.testing.assert_close(grad_cam(net, x, 1, "a"), grad_cam(ref, x, 1, "a"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("runner", ["threading.Thread", "concurrent.futures"])
def test_reading_a_layer_called_in_a_worker_thread_says_so(runner):
    net, _ = threaded_pair(runner)
    with pytest.raises(ValueError, match=r"saliency_layer 'b' was called 1 time\(s\) in another "
                                         "thread and never in the thread running the method.*"
                                         "model.module"):
        linear_approx(net, batch(), 0, "b")


def test_unhandled_activation_made_in_a_thread_is_named():
    """A worker-thread sigmoid is invisible to the context; the graph check names it."""
    net, _ = threaded_pair("threading.Thread", second_act=torch.sigmoid)
    x = batch().requires_grad_(True)
    with GuidedBackpropContext() as ctx:
        y = net(x)
    assert ctx.unhandled == {}
    ctx.check_path(y[:, 2].sum(), [x], "the input")
    assert ctx.unhandled == {"sigmoid": 1} and ctx.counts == {"relu": 2}


def test_methods_name_an_unhandled_activation_made_in_a_thread():
    net, _ = threaded_pair("threading.Thread", second_act=torch.sigmoid)
    with pytest.warns(UnhandledActivationWarning, match=r"\(sigmoid ×1\)"):
        smap = guided_backprop(net, batch(), 2)
    assert smap.shape == (2, 1, 6, 6)


def test_nodes_on_path_keeps_only_nodes_between_output_and_inputs():
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    below = torch.relu(x)                 # below the read tensor: not on the path
    read = below * 2
    off = torch.relu(w)                   # a branch that reaches no read tensor
    out = (torch.relu(read) + off).sum()  # on the path
    found = nodes_on_path(out, [read], {"ReluBackward0"})
    assert len(found) == 1 and found[0] is out.grad_fn.next_functions[0][0] \
        .next_functions[0][0]
    assert len(nodes_on_path(out, [x], {"ReluBackward0"})) == 2
    assert nodes_on_path(out, [w], {"ReluBackward0"}) == [off.grad_fn]
    assert nodes_on_path(out.detach(), [x], {"ReluBackward0"}) == []
    assert nodes_on_path(out, [x.detach()], {"ReluBackward0"}) == []


def test_depends_on_answers_what_autograd_grad_would_find():
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(3, dtype=torch.float64, requires_grad=True)
    read = torch.relu(x) * 2
    side = (unused * 3).sum()             # a graph of its own, never reaching the output
    out = (torch.relu(read) + w).sum()
    for t in (x, w, read, unused):        # the independent answer: autograd itself
        found = torch.autograd.grad(out, t, retain_graph=True, allow_unused=True)[0]
        assert depends_on(out, t) is (found is not None)
    assert depends_on(out, out) and depends_on(side, unused) and not depends_on(side, x)
    assert not depends_on(out.detach(), x) and not depends_on(out, x.detach())


def test_data_parallel_on_one_device_gives_the_modules_maps():
    net, _ = threaded_pair("sequential")
    wrapped = nn.DataParallel(net)  # on the CPU (or one GPU) it calls the module directly
    if len(wrapped.device_ids) > 1:
        pytest.skip("several GPUs: the wrapper replicates (refused, tested below)")
    x = batch()
    for method in (guided_backprop, deconvnet, gradient):
        torch.testing.assert_close(method(wrapped, x, 1), method(net, x, 1), rtol=0, atol=0)
    torch.testing.assert_close(grad_cam(wrapped, x, 1, "module.a"), grad_cam(net, x, 1, "a"),
                               rtol=0, atol=0)


def several_devices(module):
    wrapped = nn.DataParallel(module)
    wrapped.device_ids = [0, 1]  # what DataParallel holds on a machine with two GPUs
    return wrapped


def test_data_parallel_over_several_devices_is_refused_with_what_to_do():
    net, _ = threaded_pair("sequential")
    with pytest.raises(ValueError, match=r"nn.DataParallel over 2 devices \(the whole model\).*"
                                         r"explain model\.module"):
        check_data_parallel(several_devices(net))
    outer = nn.Sequential()
    outer.add_module("backbone", several_devices(net))
    with pytest.raises(ValueError, match=r"\(backbone\).*explain model\.backbone\.module"):
        check_data_parallel(outer)
    check_data_parallel(net)  # no wrapper: nothing to say
    single = nn.DataParallel(net)
    single.device_ids = [0]
    check_data_parallel(single)


@pytest.mark.parametrize("method", [guided_backprop, deconvnet])
def test_rule_methods_refuse_data_parallel_over_several_devices(method):
    with pytest.raises(ValueError, match=r"DataParallel over 2 devices.*model\.module"):
        method(several_devices(threaded_pair("sequential")[0]), batch(), 0)


def test_layer_methods_refuse_data_parallel_over_several_devices():
    with pytest.raises(ValueError, match=r"DataParallel over 2 devices.*model\.module"):
        grad_cam(several_devices(threaded_pair("sequential")[0]), batch(), 0, "module.a")
