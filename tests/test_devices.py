"""Device placement: maps live on the input's device and agree with the CPU.

CUDA cases need a GPU (none on CI); they run wherever one is present.
"""

from __future__ import annotations

import pytest
import torch

from torchray_like.attribution import METHODS

from .test_saliency import ConvNet, inputs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_cuda_maps_match_cpu(name, dims):
    net = ConvNet(dims).double().eval()
    x = inputs(dims, dtype=torch.float64)
    kwargs = {} if name in ("gradient", "guided_backprop", "deconvnet") else {
        "saliency_layer": "features.3"}
    expected = METHODS[name](net, x, [1, 2], **kwargs)
    got = METHODS[name](net.cuda(), x.cuda(), torch.tensor([1, 2]).cuda(), **kwargs)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-12)


def test_cpu_output_device_and_target_on_another_device():
    net = ConvNet(2).eval()
    x = inputs(2)
    smap = METHODS["gradient"](net, x, torch.tensor([1, 2], device="cpu"))
    assert smap.device == x.device
