"""Shared fixtures: small torchvision models with random weights, tiny hand-built nets."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the machine's cores: one intra-op thread each avoids
    # oversubscription (which made small-op-heavy tests several times slower).
    torch.set_num_threads(1)

TORCHVISION_NAMES = ("vgg11", "resnet18", "densenet121", "squeezenet1_1", "mobilenet_v2")


def make_torchvision(name: str, num_classes: int = 10) -> torch.nn.Module:
    """A torchvision architecture with deterministic random weights, in eval mode."""
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=num_classes).eval()


@pytest.fixture(scope="session")
def torchvision_models():
    """name -> model (random weights, 10 classes).  Use inputs of 64×64 (vgg11 needs ≥ 32)."""
    return {name: make_torchvision(name) for name in TORCHVISION_NAMES}


@pytest.fixture(params=TORCHVISION_NAMES)
def torchvision_model(request, torchvision_models):
    return request.param, torchvision_models[request.param]
