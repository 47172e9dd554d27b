"""Benchmark models: heads per data set, fully convolutional conversion (checked against the
original logits), weights from a state-dict file and from the torch hub cache (never
downloaded), transforms and module surgery.  Random weights throughout.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from torchray_like.benchmark import models
from torchray_like.benchmark.models import (
    FullyConvolutionalVGG,
    convert_to_fully_convolutional,
    get_model,
    get_transform,
    replace_module,
)


@pytest.fixture(scope="module")
def vgg16_voc():
    torch.manual_seed(0)
    return get_model("vgg16", "voc")


@pytest.fixture(scope="module")
def resnet50_coco():
    torch.manual_seed(0)
    return get_model("resnet50", "coco")


def _input(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ fully convolutional


def test_vgg16_fully_convolutional(vgg16_voc):
    assert not vgg16_voc.training and vgg16_voc.classifier[6].out_features == 20
    converted = convert_to_fully_convolutional(vgg16_voc)
    assert isinstance(converted, FullyConvolutionalVGG) and not converted.training
    conv6, conv7, conv8 = (converted.classifier[i] for i in (0, 3, 6))
    assert conv6.kernel_size == (7, 7) and conv7.kernel_size == conv8.kernel_size == (1, 1)
    assert isinstance(vgg16_voc.classifier[0], nn.Linear)  # the original is untouched
    assert dict(converted.named_modules()).keys() >= {"features.29", "classifier.6"}
    x = _input(224)
    with torch.no_grad():
        logits, scores = vgg16_voc(x), converted(x)
        assert scores.shape == (1, 20, 1, 1)
        torch.testing.assert_close(scores[:, :, 0, 0], logits, rtol=1e-4, atol=1e-5)
        big = converted(_input(288, 1))  # 9x9 features -> 3x3 windows of fc6
    assert big.shape == (1, 20, 3, 3)
    with pytest.raises(ValueError, match="input too small"):
        with torch.no_grad():
            converted(_input(160))


def test_vgg16_get_model_converted():
    model = get_model("vgg16", "imagenet", convert_to_fully_convolutional=True)
    assert isinstance(model, FullyConvolutionalVGG) and model.classifier[6].out_channels == 1000


def test_resnet50_fully_convolutional(resnet50_coco):
    assert resnet50_coco.fc.out_features == 80
    converted = convert_to_fully_convolutional(resnet50_coco)
    assert isinstance(converted.fc, nn.Conv2d) and converted.fc.kernel_size == (1, 1)
    assert "avgpool" not in dict(converted.named_children())
    with torch.no_grad():
        for size, side in ((224, 7), (256, 8)):
            x = _input(size, size)
            scores = converted(x)
            assert scores.shape == (1, 80, side, side)
            # the spatial mean of the score map is the original network's output
            torch.testing.assert_close(scores.mean(dim=(2, 3)), resnet50_coco(x),
                                       rtol=1e-4, atol=1e-5)


def test_convert_unsupported():
    with pytest.raises(TypeError, match="supports VGG and ResNet"):
        convert_to_fully_convolutional(torchvision.models.squeezenet1_1())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert_to_fully_convolutional("vgg16")


# ---------------------------------------------------------------- heads, names


@pytest.mark.parametrize("dataset, classes", [("voc", 20), ("coco", 80), ("imagenet", 1000)])
def test_heads(dataset, classes):
    model = get_model("resnet18", dataset)
    assert not model.training and model.fc.out_features == classes
    with torch.no_grad():
        assert model(_input(64)).shape == (1, classes)


def test_bad_names():
    with pytest.raises(ValueError, match="arch must be 'vgg16', 'resnet50'"):
        get_model("vgg17")
    with pytest.raises(ValueError, match="dataset must be one of"):
        get_model("resnet18", "pascal")
    with pytest.raises(TypeError, match="weights must be None"):
        get_model("resnet18", weights=3)
    with pytest.raises(FileNotFoundError, match="neither a torchvision weights name"):
        get_model("resnet18", weights="/no/such/file.pth")


# ------------------------------------------------------------------ weights


def test_state_dict_path(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=20)
    path = tmp_path / "resnet18_voc.pth"
    torch.save(source.state_dict(), path)
    model = get_model("resnet18", "voc", weights=path)
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}},
               wrapped)
    assert torch.equal(get_model("resnet18", "voc", weights=str(wrapped)).fc.weight,
                       source.fc.weight)
    assert torch.equal(get_model("resnet18", "voc", weights=source.state_dict()).fc.bias,
                       source.fc.bias)
    with pytest.raises(ValueError, match="does not fit ResNet with this head"):
        get_model("resnet18", "coco", weights=path)


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch hub cache, restored afterwards."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def test_torchvision_weights_from_cache_only(hub_dir):
    with pytest.raises(FileNotFoundError, match="not in the local torch hub cache") as info:
        get_model("squeezenet1_1", "imagenet", weights="DEFAULT")
    url = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1.url
    cached = hub_dir / url.rsplit("/", 1)[-1]
    assert str(cached) in str(info.value)
    torch.manual_seed(2)
    source = torchvision.models.squeezenet1_1()
    hub_dir.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    model = get_model("squeezenet1_1", "imagenet", weights="IMAGENET1K_V1")
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    # a data set with other classes: the same backbone, a new (conv) head
    voc = get_model("squeezenet1_1", "voc",
                    weights=torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1)
    assert voc.classifier[1].out_channels == 20
    assert torch.equal(voc.features[0].weight, source.features[0].weight)
    with torch.no_grad():
        assert voc(_input(64)).shape == (1, 20)


def test_torchvision_linear_head_replaced(hub_dir):
    torch.manual_seed(3)
    source = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    hub_dir.mkdir(parents=True)
    torch.save(source.state_dict(), hub_dir / url.rsplit("/", 1)[-1])
    model = get_model("resnet18", "coco", weights="ResNet18_Weights.IMAGENET1K_V1",
                      convert_to_fully_convolutional=True)
    assert model.fc.out_channels == 80 and isinstance(model.fc, nn.Conv2d)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


# ----------------------------------------------------------------- embedded


def test_embedded_dispatch(monkeypatch, tmp_path):
    """The embedded names go to embedded_models.load_embedded_model (replaced by a fake)."""
    calls = []
    fake = types.ModuleType("torchray_like.benchmark.embedded_models")

    def load_embedded_model(name, pretrained=True):
        calls.append((name, pretrained))
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=3).train()

    fake.load_embedded_model = load_embedded_model
    monkeypatch.setitem(sys.modules, "torchray_like.benchmark.embedded_models", fake)
    model = get_model("embedded-resnet", convert_to_fully_convolutional=True)
    assert calls == [("embedded-resnet", True)] and isinstance(model.fc, nn.Conv2d)
    assert not model.training
    torch.manual_seed(1)
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    torch.save(state, tmp_path / "retrained.pt")
    model = get_model("embedded-vgg", weights=tmp_path / "retrained.pt")
    assert calls[-1] == ("embedded-vgg", False) and torch.equal(model.fc.bias, state["fc.bias"])
    with pytest.raises(ValueError, match="must be None \\(the shipped weights\\)"):
        get_model("embedded-resnet", weights="DEFAULT")


_HAS_EMBEDDED = importlib.util.find_spec("torchray_like.benchmark.embedded_models") is not None


@pytest.mark.skipif(not _HAS_EMBEDDED, reason="torchray_like.benchmark.embedded_models absent")
@pytest.mark.parametrize("arch", ["embedded-vgg", "embedded-resnet"])
def test_embedded_architectures_convert(arch):
    """The real embedded architectures (random weights) convert exactly."""
    from torchray_like.benchmark.embedded_data import IMAGE_SIZE
    from torchray_like.benchmark.embedded_models import build_embedded_model

    torch.manual_seed(0)
    model = build_embedded_model(arch).eval()
    converted = convert_to_fully_convolutional(model)
    with torch.no_grad():
        x = _input(IMAGE_SIZE)  # the embedded models' input size
        scores = converted(x)
        torch.testing.assert_close(scores.mean(dim=(2, 3)), model(x), rtol=1e-4, atol=1e-5)
        bigger = converted(_input(IMAGE_SIZE * 3 // 2, 1))
    assert bigger.shape[:2] == scores.shape[:2]
    assert bigger.shape[-1] > scores.shape[-1] and bigger.shape[-2] > scores.shape[-2]


@pytest.mark.skipif(not _HAS_EMBEDDED, reason="torchray_like.benchmark.embedded_models absent")
@pytest.mark.parametrize("arch", ["embedded-vgg", "embedded-resnet"])
def test_embedded_models_shipped_weights(arch):
    from torchray_like.benchmark import embedded_models

    try:
        model = get_model(arch)
    except getattr(embedded_models, "WeightsError", OSError) as error:
        pytest.skip(f"embedded weights not available yet: {error}")
    assert isinstance(model, nn.Module) and not model.training


# ---------------------------------------------------------- transform, surgery


def test_transform():
    image = Image.fromarray(np.full((200, 300, 3), (124, 116, 104), dtype=np.uint8))
    x = get_transform()(image)
    assert x.shape == (3, 224, 336)  # shorter side to 224, aspect kept
    assert x.abs().max() < 0.02  # the ImageNet mean colour maps to ~0
    assert get_transform("voc", size=(32, 48))(image).shape == (3, 32, 48)
    with pytest.raises(ValueError, match="dataset must be one of"):
        get_transform("cifar")
    with pytest.raises(ValueError, match="size must be a positive int"):
        get_transform(size=0)


def test_replace_module():
    model = torchvision.models.resnet18(num_classes=5)
    new = nn.Identity()
    assert replace_module(model, "layer4.1.conv2", new) is model  # TorchRay returns the model
    assert model.layer4[1].conv2 is new
    head = nn.Linear(512, 7)
    replace_module(model, "fc", head)
    assert model.fc is head
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    replace_module(seq, "1", nn.Tanh())
    assert isinstance(seq[1], nn.Tanh)
    with pytest.raises(ValueError, match="no sub-module 'layer9.conv'"):
        replace_module(model, "layer9.conv", nn.Identity())
    with pytest.raises(ValueError, match="no sub-module 'fc.weight'"):
        replace_module(model, "fc.weight", nn.Identity())
    with pytest.raises(TypeError, match="new_module must be"):
        replace_module(model, "fc", "linear")


def test_public_names():
    for name in models.__all__:
        assert hasattr(models, name), name


def test_get_example_data_runs_offline_with_a_stated_stand_in():
    """TorchRay's example scripts start with get_example_data(): it works offline and says which
    model and image it used (trained embedded weights, or a random-weight stand-in)."""
    from torchray_like.benchmark import get_example_data
    from torchray_like.benchmark.embedded_data import IMAGE_SIZE

    with pytest.warns(UserWarning, match="embedded"):
        model, x, c1, c2 = get_example_data("vgg16")
    assert x.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert isinstance(c1, int) and isinstance(c2, int) and c1 != c2
    assert not model.training
    with torch.no_grad():
        assert model(x).shape[0] == 1
