"""Ablation-CAM's fast path: the ablated layer is skipped and the layers below run on one copy
of the image per batch; the maps stay those of the plain definition (every ablated copy run
through the whole model), also for models that need the full batch or pass a tensor around the
layer, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution import METHODS

from .conftest import channel_zeroed


class Counting(nn.Conv2d):
    """A convolution that counts the rows it computes (its forward, not its hooks)."""

    def __init__(self, *args, calls=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen = calls

    def forward(self, x):
        self.seen.append(x.shape[0])
        return super().forward(x)


class Net(nn.Module):
    """conv -> block (the ablated layer) -> head; ``skip`` adds the block's input after it,
    ``batch_from_input`` reshapes with the batch size read from the input."""

    def __init__(self, skip: bool = False, batch_from_input: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.calls = {"stem": [], "block": []}
        self.stem = Counting(3, 6, 3, padding=1, calls=self.calls["stem"])
        self.block = Counting(6, 6, 3, padding=1, calls=self.calls["block"])
        self.fc = nn.Linear(6 * 4 * 4, 4)
        self.skip, self.batch_from_input = skip, batch_from_input

    def forward(self, x):
        n = x.shape[0]
        h = F.relu(self.stem(x))
        b = self.block(h)
        if self.skip:
            b = b + h
        b = F.adaptive_avg_pool2d(F.relu(b), 4)
        return self.fc(b.reshape(n, -1) if self.batch_from_input else b.flatten(1))


def brute_force(model: Net, x: torch.Tensor, target: int) -> torch.Tensor:
    """Ablation-CAM by its definition: one full forward pass per zeroed channel."""
    maps = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            act = model.block(F.relu(model.stem(xi)))
            clean = model(xi)[0, target]
            drops = []
            for k in range(act.shape[1]):
                with channel_zeroed(model.block, k):
                    drops.append((clean - model(xi)[0, target]) / clean.abs())
            w = torch.stack(drops)
            maps.append(F.relu((w[:, None, None] * act[0]).sum(0, keepdim=True)))
    return torch.stack(maps)


@pytest.mark.parametrize("kind", ["plain", "skip", "batch_from_input"])
def test_maps_equal_the_definition(kind):
    model = Net(skip=kind == "skip", batch_from_input=kind == "batch_from_input").eval()
    x = torch.randn(2, 3, 8, 8)
    smap = METHODS["ablation_cam"](model, x, 1, saliency_layer="block", batch_size=4)
    ref = brute_force(model, x, 1)
    assert smap.shape == (2, 1, 8, 8)
    assert torch.allclose(smap, ref, rtol=1e-4, atol=1e-6)


def test_layers_below_run_on_one_copy_and_the_layer_only_on_the_clean_pass():
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    METHODS["ablation_cam"](model, x, 1, saliency_layer="block", batch_size=4)
    # Clean pass (2 rows), then 6 channels per image in batches of 4 and 2: one row each.
    assert model.calls["stem"] == [2, 1, 1, 1, 1]
    assert model.calls["block"] == [2]


def test_a_model_needing_the_full_batch_falls_back_to_it():
    model = Net(batch_from_input=True).eval()
    x = torch.randn(1, 3, 8, 8)
    METHODS["ablation_cam"](model, x, 1, saliency_layer="block", batch_size=4)
    # The one-row try fails on its first batch; from then on every batch has 4 or 2 rows (the
    # ablated layer itself is still skipped).
    assert model.calls["stem"] == [1, 1, 4, 2]
    assert model.calls["block"] == [1]


def test_the_module_is_left_as_it_was_also_after_an_error():
    model = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    METHODS["ablation_cam"](model, x, 1, saliency_layer="block")
    assert "forward" not in model.block.__dict__
    assert not model.block._forward_hooks

    calls = []

    def own_forward(h):  # an instance-level forward the user set: restored as it was
        calls.append(h.shape[0])
        return Counting.forward(model.block, h)

    model.block.forward = own_forward
    METHODS["ablation_cam"](model, x, 1, saliency_layer="block")
    assert model.block.__dict__["forward"] is own_forward
    del model.block.forward

    def boom(m, a, o):
        if o.shape[0] == 4:
            raise RuntimeError("boom after the layer")

    handle = model.fc.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom after the layer"):
            METHODS["ablation_cam"](model, x, 1, saliency_layer="block", batch_size=4)
    finally:
        handle.remove()
    assert "forward" not in model.block.__dict__
    assert not model.block._forward_hooks
