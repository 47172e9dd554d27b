"""Device placement: maps live on the input's device and agree with the CPU.

CUDA cases need a GPU (none on CI); they run wherever one is present.
"""

from __future__ import annotations

import pytest
import torch

from torchray_like.attribution import METHODS
from torchray_like.attribution.registry import TRANSFORMER_ONLY_METHODS

from .conftest import ConvNet, inputs

KWARGS = {
    "gradient": {}, "guided_backprop": {}, "deconvnet": {},
    "contrastive_excitation_backprop": {"saliency_layer": "features.0",
                                        "contrast_layer": "features.3"},
    "rise": {"num_masks": 64, "generator": 0, "progress": False},
    "extremal_perturbation": {"max_iter": 5, "generator": 0, "progress": False},
    "gradient_x_input": {}, "occlusion": {}, "integrated_gradients": {"n_steps": 8},
    "smooth_grad": {"n_samples": 4, "generator": 0},
    "score_cam": {"saliency_layer": "features.3"}, "ablation_cam": {"saliency_layer": "features.3"},
}

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_cuda_maps_match_cpu(name, dims):
    if name in TRANSFORMER_ONLY_METHODS:
        pytest.skip("explains transformers only (the model here is a CNN)")
    net = ConvNet(dims).double().eval()
    x = inputs(dims, dtype=torch.float64)
    kwargs = KWARGS.get(name, {"saliency_layer": "features.3"})
    expected = METHODS[name](net, x, [1, 2], **kwargs)
    got = METHODS[name](net.cuda(), x.cuda(), torch.tensor([1, 2]).cuda(), **kwargs)
    if isinstance(got, tuple):  # (masks, history)
        got, expected = got[0], expected[0]
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-9)


def test_cpu_output_device_and_target_on_another_device():
    net = ConvNet(2).eval()
    x = inputs(2)
    smap = METHODS["gradient"](net, x, torch.tensor([1, 2], device="cpu"))
    assert smap.device == x.device
