"""Probe and get_module."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution.common import Probe, attach_debug_probes, get_module
from torchray_like.attribution.guided_backprop import GuidedBackpropContext

from .conftest import RefGuidedReLU, global_hook_counts, hook_counts


class VGGish(nn.Module):
    """conv → ReLU(inplace) → conv → ReLU(inplace) → linear, like VGG's features."""

    def __init__(self, inplace=True):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=inplace),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=inplace))
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def test_probe_survives_inplace_relu_after_the_probed_conv():
    net = VGGish(inplace=True).double()
    ref = VGGish(inplace=False).double()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)

    # Reference: the conv output kept with retain_grad in a net without in-place ops.
    store = {}
    h = ref.features[0].register_forward_hook(
        _keep(store))
    ref(x.clone().requires_grad_(True))[:, 1].sum().backward()
    h.remove()

    with Probe(net.features[0], target="output") as probe:
        net(x.clone().requires_grad_(True))[:, 1].sum().backward()
        (act,) = probe.data
        # The recorded values are the conv output, not the rectified one.
        torch.testing.assert_close(act, store["a"], rtol=0, atol=0)
        assert (act < 0).any()
        torch.testing.assert_close(act.grad, store["a"].grad, rtol=0, atol=0)
    assert probe.data == []


def test_probe_records_guided_gradient_inside_context():
    """The documented TorchRay usage: probe a layer, read activation and guided gradient."""
    net = VGGish().double()
    ref = VGGish(inplace=False).double()
    ref.load_state_dict(net.state_dict())
    ref.features[1] = ref.features[3] = _RefModule()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)

    probe = Probe(get_module(net, "features.2"), target="output")
    with GuidedBackpropContext():
        y = net(x)
        y[0, 2].backward()
    act, grad = probe.data[0], probe.data[0].grad
    probe.remove()

    store = {}
    h = ref.features[2].register_forward_hook(
        _keep(store))
    ref(x)[0, 2].backward()
    h.remove()
    torch.testing.assert_close(act, store["a"], rtol=0, atol=0)
    torch.testing.assert_close(grad, store["a"].grad, rtol=1e-12, atol=1e-12)


class _RefModule(nn.Module):
    def forward(self, x):
        return RefGuidedReLU.apply(x, None)


def _keep(store):
    def hook(module, inputs, output):
        output.retain_grad()
        store["a"] = output
    return hook


class SharedReLU(nn.Module):
    """One ReLU module called three times, as torchvision's ResNet blocks do."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x = self.relu(self.lin(x))
        x = self.relu(self.lin(x) - 0.1)
        return self.relu(self.lin(x) + 0.1).sum(1)


def test_module_called_several_times_records_every_call_in_order():
    net = SharedReLU().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    # Reference: explicit tensors of each call.
    h1 = F.relu(net.lin(x))
    h2 = F.relu(net.lin(h1) - 0.1)
    h3 = F.relu(net.lin(h2) + 0.1)
    for h in (h1, h2, h3):
        h.retain_grad()
    h3.sum(1).sum().backward()

    with Probe(net.relu, target="output") as probe:
        net(x.detach().requires_grad_(True)).sum().backward()
        assert len(probe.data) == 3
        for rec, h in zip(probe.data, (h1, h2, h3)):
            torch.testing.assert_close(rec, h, rtol=0, atol=0)
            torch.testing.assert_close(rec.grad, h.grad, rtol=0, atol=0)


def test_input_probe():
    net = VGGish().double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    with Probe(net.features[1], target="input") as probe:
        net(x)[0, 0].backward()
        (rec,) = probe.data
    # The input of the in-place ReLU is the conv output, recorded before the ReLU changed it.
    with torch.no_grad():
        conv = net.features[0](x)
    torch.testing.assert_close(rec, conv, rtol=0, atol=0)
    assert rec.grad.shape == conv.shape
    # Only positive positions pass the (plain) ReLU gradient.
    assert torch.all(rec.grad[conv <= 0] == 0)


def test_probe_on_frozen_model_makes_the_layer_a_leaf():
    net = VGGish().double()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    with Probe(net.features[2], target="output") as probe:
        y = net(x)
        y[0, 1].backward()
        rec = probe.data[0]
        assert rec.is_leaf and rec.grad is not None
    assert net.fc.weight.grad is None


def test_probe_under_no_grad_records_values_only():
    net = VGGish()
    x = torch.randn(1, 3, 5, 5)
    with Probe(net.features[0], target="output") as probe, torch.no_grad():
        net(x)
        assert len(probe.data) == 1 and not probe.data[0].requires_grad
        # The in-place ReLU after the conv acted on a copy: negative values were recorded.
        assert (probe.data[0] < 0).any()
        torch.testing.assert_close(probe.data[0], net.features[0](x), rtol=0, atol=0)


def test_remove_and_context_manager_leave_no_hooks():
    net = VGGish()
    before = hook_counts(net)
    p1 = Probe(net.features[0])
    p2 = Probe(net.features[1], target="input")
    assert hook_counts(net) != before
    p1.remove()
    p1.remove()  # idempotent
    p2.remove()
    assert hook_counts(net) == before
    with Probe(net.fc):
        assert hook_counts(net) != before
    assert hook_counts(net) == before
    assert not p1.active


def test_no_reference_cycles():
    """Dropping a probe frees it (and its hook) without the cycle collector."""
    net = VGGish()
    before = hook_counts(net)
    gc.collect()
    gc.disable()
    try:
        probe = Probe(net.features[0])
        net(torch.randn(1, 3, 5, 5))
        ref_probe = weakref.ref(probe)
        ref_tensor = weakref.ref(probe.data[0])
        del probe
        assert ref_probe() is None
        assert ref_tensor() is None
        assert hook_counts(net) == before
        # The model is not kept alive by a probe either.
        probe = Probe(net.features[0])
        ref_net = weakref.ref(net)
        del net, probe
        assert ref_net() is None
    finally:
        gc.enable()


def test_probe_errors():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        Probe("features.0")
    with pytest.raises(ValueError, match="target must be 'output' or 'input'"):
        Probe(nn.ReLU(), target="grad")

    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    m = TupleOut()
    with Probe(m, target="output"):
        with pytest.raises(TypeError, match="is a tuple, not a tensor"):
            m(torch.randn(2))
    with Probe(m, target="output", strict=False) as lenient:
        m(torch.randn(2))
        assert isinstance(lenient.data[0], tuple)


def test_get_module():
    net = VGGish()
    assert get_module(net, "features.2") is net.features[2]
    assert get_module(net, net.fc) is net.fc
    assert get_module(net, "") is net
    with pytest.raises(ValueError, match=r"no module named 'feature\.2'.*'features\.2'"):
        get_module(net, "feature.2")
    with pytest.raises(ValueError, match="no module named 'layer4'"):
        get_module(net, "layer4")
    with pytest.raises(ValueError, match="not a sub-module"):
        get_module(net, nn.ReLU())
    with pytest.raises(TypeError, match="dotted name or an nn.Module"):
        get_module(net, 3)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        get_module("net", "fc")


def test_attach_debug_probes():
    net = VGGish()
    assert attach_debug_probes(net) == {}
    probes = attach_debug_probes(net, debug=True)
    assert set(probes) == {"features", "features.0", "features.1", "features.2", "features.3",
                           "fc"}
    net(torch.randn(1, 3, 5, 5))
    assert probes["fc"].data[0].shape == (1, 3)
    for p in probes.values():
        p.remove()
    assert hook_counts(net) == {}


def test_probe_this_thread_only_ignores_other_threads():
    import threading

    net = VGGish()
    x = torch.randn(1, 3, 5, 5)
    with Probe(net.features[0], this_thread_only=True, accumulate=True) as mine, \
            Probe(net.features[0], accumulate=True) as every, Probe(net.features[0]) as latest:
        t = threading.Thread(target=lambda: net(x))
        t.start()
        t.join()
        net(x)
        assert len(mine.data) == 1 and len(every.data) == 2
        assert len(latest.data) == 1  # the latest pass (the main thread's)


def test_patch_restores_and_a_failed_patch_leaves_nothing(monkeypatch):
    import gc
    import sys

    from torchray_like.attribution.common import Patch

    class Holder:
        value = 1

    with Patch(Holder, "value", 2) as patch:
        assert Holder.value == 2
    assert Holder.value == 1 and not patch._active
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        Patch(Holder, "missing", 3)
    gc.collect()
    # The half-built Patch is collected without an error in __del__.
    assert unraisable == []


# ---------------------------------------------------------------------------------------------
# TorchRay's Probe semantics: input by default, latest pass, contrast
# ---------------------------------------------------------------------------------------------


def test_default_target_is_the_input_as_in_torchray():
    net = VGGish(inplace=False).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with Probe(net.features[2]) as probe:
        assert probe.target == "input"
        net(x)
        (rec,) = probe.data
    with torch.no_grad():
        expected = net.features[1](net.features[0](x))
    torch.testing.assert_close(rec, expected, rtol=0, atol=0)


def test_data_holds_the_latest_forward_pass_with_every_call_of_it():
    net = SharedReLU().double()
    x1 = torch.randn(3, 4, dtype=torch.float64)
    x2 = torch.randn(5, 4, dtype=torch.float64)
    before = global_hook_counts()
    with Probe(net.relu, target="output") as probe, \
            Probe(net.relu, target="output", accumulate=True) as every:
        net(x1)
        assert len(probe.data) == 3 and probe.data[0].shape == (3, 4)
        net(x2)
        assert len(probe.data) == 3 and all(t.shape == (5, 4) for t in probe.data)
        assert len(every.data) == 6
        # Calling the probed module on its own is a pass of its own.
        net.relu(torch.randn(7, 4, dtype=torch.float64))
        assert len(probe.data) == 1 and probe.data[0].shape == (7, 4)
        # A pass that raises does not glue the next pass to it.
        with pytest.raises(RuntimeError):
            net(torch.randn(2, 5, dtype=torch.float64))
        net(x1)
        assert len(probe.data) == 3
    assert global_hook_counts() == before


def test_latest_pass_gradients_after_two_passes():
    net = VGGish(inplace=True).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    with Probe(net.features[2], target="output") as probe:
        net(x)[0, 0].backward()
        first = probe.data[0].grad.clone()
        net(2 * x)[0, 1].backward()
        (rec,) = probe.data
    assert not torch.equal(rec.grad, first)
    # The gradient at a conv output followed by ReLU and the linear head, in closed form.
    with torch.no_grad():
        a = net.features[2](net.features[1](net.features[0](2 * x)))
    w = net.fc.weight[1].view(a.shape) * (a > 0)
    torch.testing.assert_close(rec.grad, w, rtol=0, atol=0)


def test_contrast_is_subtracted_from_the_gradient_flowing_below():
    """``contrast`` changes what flows past the probe: the input gradient is computed from
    ``grad - contrast`` (clamped at zero with ``non_negative_contrast``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.Linear(6, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    w1 = net[0].weight
    g_top = net[2].weight[1].expand(2, 6)  # ∂y_1/∂h for the affine head
    contrast = torch.randn(2, 6, dtype=torch.float64)
    for non_negative in (False, True):
        xx = x.clone().requires_grad_(True)
        with Probe(net[1]) as probe:
            probe.contrast = [contrast]
            probe.non_negative_contrast = non_negative
            net(xx)[:, 1].sum().backward()
            diff = g_top - contrast
            if non_negative:
                diff = diff.clamp(min=0)
            torch.testing.assert_close(probe.data[0].grad, diff)
        torch.testing.assert_close(xx.grad, diff @ w1)
    # A single tensor applies to every call; a wrong shape or too short a list is an error.
    with Probe(net[1]) as probe:
        probe.contrast = contrast
        xx = x.clone().requires_grad_(True)
        net(xx)[:, 1].sum().backward()
        torch.testing.assert_close(xx.grad, (g_top - contrast) @ w1)
        probe.contrast = torch.zeros(3, 6, dtype=torch.float64)
        with pytest.raises(ValueError, match="does not match the gradient"):
            net(x)[:, 1].sum().backward()
        probe.contrast = []
        with pytest.raises(ValueError, match="holds 0 tensor"):
            net(x)[:, 1].sum().backward()


def test_torchray_attributes():
    relu = nn.ReLU(inplace=True)
    with Probe(relu, target="output") as probe:
        assert probe.inplace and probe.contrast is None and not probe.non_negative_contrast
        assert probe.hook is not None and probe.hook.id in relu._forward_hooks
    assert probe.hook is None and not relu._forward_hooks
    assert not Probe(nn.Conv2d(1, 1, 1)).inplace


def test_dropping_a_probe_releases_the_global_pass_hooks():
    before = global_hook_counts()
    net = VGGish()
    probe = Probe(net.features[0])
    assert global_hook_counts() != before
    del probe
    assert global_hook_counts() == before
    Probe(net.features[0], accumulate=True)  # needs no global hook
    assert global_hook_counts() == before


# ---------------------------------------------------------------------------------------------
# Aliasing layers (issue 17, item 4): a layer returning its own input, which a skip connection
# also uses.  The layer's gradient is what flows through the layer, never the skip's.
# ---------------------------------------------------------------------------------------------

TAPS = {
    "nn.Identity": lambda: nn.Identity(),
    "eval nn.Dropout": lambda: nn.Dropout(0.5),
    "empty nn.Sequential": lambda: nn.Sequential(),
}


class SkipTap(nn.Module):
    """h = relu(conv1(x)); t = tap(h); y = conv2(t) + h (the skip uses the tap's input)."""

    def __init__(self, tap):
        super().__init__()
        torch.manual_seed(5)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.tap = tap
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        y = self.conv2(self.tap(h)) + h
        return self.head(F.relu(y).mean((2, 3)))


def through_the_tap(net, x, classes):
    """By hand: the tap's activation and the gradient reaching it through conv2 only."""
    h = F.relu(net.conv1(x)).detach()
    t = h.clone().requires_grad_(True)
    y = net.head(F.relu(net.conv2(t) + h).mean((2, 3)))
    (g,) = torch.autograd.grad(y[torch.arange(len(classes)), classes].sum(), t)
    return h, g


def skip_batch():
    return torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("tap", list(TAPS))
def test_output_probe_of_a_layer_returning_its_input_reads_its_own_gradient(tap):
    net = SkipTap(TAPS[tap]()).double().eval()
    x = skip_batch()
    activation, expected = through_the_tap(net, x, [0, 2])
    with Probe(net.tap, target="output") as probe:
        y = net(x)
        y[[0, 1], [0, 2]].sum().backward()
        (read,) = probe.data
        torch.testing.assert_close(read.detach(), activation, rtol=0, atol=0)
        torch.testing.assert_close(read.grad, expected, rtol=1e-12, atol=1e-12)
    # The skip's share is large: reading the shared tensor would be far off.
    h = F.relu(net.conv1(x)).detach().requires_grad_(True)
    y = net.head(F.relu(net.conv2(h) + h).mean((2, 3)))
    (aliased,) = torch.autograd.grad(y[[0, 1], [0, 2]].sum(), h)
    assert (aliased - expected).norm() > 0.5 * expected.norm()


@pytest.mark.parametrize("tap", list(TAPS))
def test_grad_cam_and_linear_approx_at_an_aliasing_layer_match_the_hand_computation(tap):
    from torchray_like import grad_cam
    from torchray_like.attribution.linear_approx import linear_approx

    net = SkipTap(TAPS[tap]()).double().eval()
    x = skip_batch()
    a, g = through_the_tap(net, x, [1, 2])
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    lin = (g * a).sum(1, keepdim=True)
    got_cam = grad_cam(net, x, [1, 2], saliency_layer="tap")
    got_lin = linear_approx(net, x, [1, 2], saliency_layer="tap")
    assert got_cam.shape == got_lin.shape == (2, 1, 7, 7)
    torch.testing.assert_close(got_cam, cam, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_lin, lin, rtol=1e-10, atol=1e-12)


def test_input_and_output_probes_of_an_identity_read_different_gradients():
    """TorchRay's input probe reads the input tensor, whose gradient includes the skip; the
    output probe reads the layer's own output."""
    net = SkipTap(nn.Identity()).double().eval()
    x = skip_batch()
    _, through = through_the_tap(net, x, [0, 0])
    with Probe(net.tap, target="input") as pin, Probe(net.tap, target="output") as pout:
        y = net(x)
        y[:, 0].sum().backward()
        assert pin.data[0] is not pout.data[0]
        torch.testing.assert_close(pout.data[0].grad, through, rtol=1e-12, atol=1e-12)
        assert (pin.data[0].grad - through).norm() > 0.5 * through.norm()


def test_in_place_module_output_probe_reads_a_copy_and_leaves_the_model_output():
    net = VGGish(inplace=True).double()
    ref = VGGish(inplace=False).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    with Probe(net.features[1], target="output") as probe:
        y = net(x)
        (read,) = probe.data
        y[0, 1].backward()
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
    assert read.shape == (1, 4, 5, 5) and bool((read >= 0).all())
    h = ref.features[:2](x).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(ref.fc(ref.features[2:](h).flatten(1))[0, 1], h)
    torch.testing.assert_close(read.grad, expected, rtol=1e-12, atol=1e-12)


def test_ignored_other_thread_calls_are_counted():
    import threading

    net = VGGish(inplace=False)
    with Probe(net.features[0], "output", this_thread_only=True) as probe:
        worker = threading.Thread(target=lambda: net(torch.randn(1, 3, 5, 5)))
        worker.start()
        worker.join()
        assert probe.data == [] and probe.other_thread_calls == 1
        net(torch.randn(1, 3, 5, 5))
        assert len(probe.data) == 1 and probe.other_thread_calls == 1


def test_a_probe_without_kept_gradients_records_only():
    """``keep_grad=False`` (the methods' own probes): the recorded tensor's gradient is read with
    autograd.grad, equal to a keeping probe's ``.grad``; nothing is kept, no contrast applies,
    and the network still continues from a copy (in-place successors are fine)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 3, 8, 8)
    keeping = Probe(model[0], "output")
    model(x)[:, 1].sum().backward()
    expected = keeping.data[0].grad.clone()
    keeping.remove()
    model.zero_grad()
    light = Probe(model[0], "output", keep_grad=False)
    light.contrast = torch.full_like(expected, 1e3)  # ignored without kept gradients
    out = model(x)
    (grad,) = torch.autograd.grad(out[:, 1].sum(), light.data[0])
    torch.testing.assert_close(grad, expected)
    assert not light.data[0].retains_grad and light.keep_grad is False
    assert light.data[0].min() < 0  # recorded before the in-place ReLU, which acted on a copy
    light.remove()
