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
