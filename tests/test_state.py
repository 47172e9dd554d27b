"""Input and model checks; the model and the caller's tensors are left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchray_like.attribution.deconvnet import deconvnet
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import guided_backprop

from .conftest import ConvNet, assert_same_state, inputs, snapshot

WRAPPERS = {"gradient": gradient, "guided_backprop": guided_backprop, "deconvnet": deconvnet}


def test_input_errors():
    net = ConvNet(2).eval()
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.uint8.*x.float"):
        gradient(net, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        gradient(net, torch.zeros(1, 3, 8, 8, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        gradient(net, np.zeros((1, 3, 8, 8), np.float32), 0)
    with pytest.raises(ValueError, match=r"shape \(N, C, \*spatial\).*x.unsqueeze\(0\)"):
        gradient(net, torch.zeros(3, 8), 0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gradient(lambda x: x, torch.zeros(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="empty batch"):
        gradient(net, torch.zeros(0, 3, 8, 8), 0)


def test_inference_mode_is_a_clear_error():
    net = ConvNet(2).eval()
    x = inputs(2)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            gradient(net, x, 1)
        y = x.clone()
    with pytest.raises(ValueError, match="inference tensor"):
        gradient(net, y, 1)
    with torch.inference_mode():
        inference_net = ConvNet(2)
    with pytest.raises(ValueError, match="parameter 'features.0.weight' is an inference tensor"):
        gradient(inference_net, x, 1)


class Fails(ConvNet):
    def forward(self, x):
        self.features(x)  # the rule context has replaced ReLUs by now
        raise RuntimeError("model failure")


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_state_is_restored_after_success_and_failure(name):
    fn = WRAPPERS[name]
    net = ConvNet(2).train()
    net.features[0].weight.requires_grad_(False)          # a mix of frozen and trainable
    net.fc.weight.grad = torch.ones_like(net.fc.weight)   # an existing gradient
    net.features[1].eval()                                # a mix of training flags
    x = inputs(2)
    x.requires_grad_(True)
    x.grad = torch.full_like(x, 3.0)
    before = snapshot(net, x)
    fn(net, x, [0, 1], saliency_layer=None)
    fn(net, x, [0, 1], saliency_layer="features.3", resize=True, smooth=0.05)
    assert_same_state(before, snapshot(net, x))

    bad = Fails(2).train()
    bad.fc.weight.grad = torch.ones_like(bad.fc.weight)
    before = snapshot(bad, x)
    with pytest.raises(RuntimeError, match="model failure"):
        fn(bad, x, [0, 1])
    with pytest.raises(RuntimeError, match="model failure"):
        fn(bad, x, [0, 1], saliency_layer="features.3")
    assert_same_state(before, snapshot(bad, x))
    # A bad target after a successful forward also restores everything.
    before = snapshot(net, x)
    with pytest.raises(ValueError, match="out of range"):
        fn(net, x, [0, 9], saliency_layer="features.3")
    assert_same_state(before, snapshot(net, x))


def test_concurrent_calls_on_one_model_restore_its_state():
    """Two threads explaining one trainable model: neither leaves it frozen or in eval mode."""
    import threading

    net = ConvNet(2).train()
    x = inputs(2)
    expected = gradient(net, x, 1)
    before = snapshot(net)
    errors, results = [], []
    start = threading.Barrier(4)

    def work():
        try:
            start.wait(10)
            for _ in range(10):
                results.append(gradient(net, x, 1))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 40
    for r in results:
        torch.testing.assert_close(r, expected, rtol=0, atol=0)
    assert_same_state(before, snapshot(net))


# ---------------------------------------------------------------------------------------------
# Issue 17: dtypes, lazy modules, the caller's autocast, other threads' gradients


def test_float64_input_to_a_float32_model_says_what_to_do():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3)).eval()
    x = torch.from_numpy(np.random.default_rng(0).random((2, 3, 8, 8)))  # float64
    for method in (gradient, guided_backprop):
        with pytest.raises(ValueError, match=r"input is float64 but the model's parameters are "
                                             r"float32: pass x.to\(torch.float32\)"):
            method(net, x, 1)
    from torchray_like import grad_cam
    with pytest.raises(ValueError, match="input is float64"):
        grad_cam(net, x, 1)  # the automatic layer's discovery pass too
    # The right dtype works, and a model that casts its input itself is not refused.
    assert gradient(net, x.float(), 1).dtype == torch.float32

    class Casting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.float())

    assert gradient(Casting(), x, 1).dtype == torch.float64


def test_uninitialised_lazy_modules_are_refused_and_left_uninitialised():
    from torch.nn.parameter import is_lazy

    from torchray_like import grad_cam
    net = torch.nn.Sequential(torch.nn.LazyConv2d(4, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.LazyLinear(3))
    x = torch.randn(2, 3, 8, 8)
    for method in (gradient, grad_cam):
        with pytest.raises(ValueError, match=r"parameter '0.weight' is not initialised.*"
                                             r"run the model once first"):
            method(net, x, 1)
    assert all(is_lazy(p) for p in net.parameters())
    with torch.no_grad():
        net(x)
    assert gradient(net, x, 1).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("name", ["gradient", "grad_cam", "linear_approx", "guided_grad_cam"])
def test_the_map_has_the_inputs_dtype_under_the_callers_autocast(name):
    from torchray_like.attribution import METHODS
    torch.manual_seed(0)
    net = ConvNet(2).eval()
    x = inputs(2)
    plain = METHODS[name](net, x, 1)
    with torch.autocast("cpu", torch.bfloat16):
        mixed = METHODS[name](net, x, 1)
    assert mixed.dtype == x.dtype == plain.dtype and mixed.shape == plain.shape
    # Computed in bfloat16 (8 bits of mantissa): close to the float32 map, not equal.
    scale = plain.abs().max()
    assert (mixed - plain).abs().max() <= 0.1 * scale


def test_another_threads_gradients_are_not_reset():
    """A manual backward() elsewhere while a method runs: its .grad survives the call."""
    torch.manual_seed(0)
    net = ConvNet(2).eval()
    x = inputs(2)
    weight = next(net.parameters())
    accumulated = torch.full_like(weight, 3.0)

    def other_thread_backward(module, args, output):
        # Stands for another thread accumulating into .grad during the call.
        weight.grad = accumulated

    handle = net.register_forward_hook(other_thread_backward)
    try:
        gradient(net, x, 1)
    finally:
        handle.remove()
    assert weight.grad is accumulated
    assert all(p.grad is None for p in net.parameters() if p is not weight)
