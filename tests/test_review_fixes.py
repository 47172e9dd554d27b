"""Regression tests for the review of the day's changes (one test per fixed finding)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from torchray_like.attribution.gradient import gradient


class _Gated(nn.Module):
    """A float model holding a ``FloatFunctional`` (as torchvision's quantizable models do)."""

    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notes
            from torch.ao.nn.quantized import FloatFunctional
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.add = FloatFunctional()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.add.add(self.conv(x), self.conv(x))
        return self.fc(y.mean((2, 3)))


def test_float_functional_is_not_a_quantized_module() -> None:
    """FloatFunctional lives in torch.ao.nn.quantized but computes in float: the model's
    gradient map is that of the same model with a plain ``+`` (not a ValueError)."""
    torch.manual_seed(0)
    model = _Gated().eval()
    x = torch.randn(2, 3, 6, 6)
    smap = gradient(model, x, 1)
    xr = x.clone().requires_grad_(True)
    model(xr)[:, 1].sum().backward()
    assert smap.shape == (2, 1, 6, 6) and smap.dtype == torch.float32
    torch.testing.assert_close(smap, xr.grad.abs().amax(1, keepdim=True))


def test_converted_int8_module_is_still_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized as nnq
    model = nn.Sequential(nnq.Quantize(1.0, 0, torch.quint8), nnq.DeQuantize(),
                          nn.Flatten(), nn.Linear(12, 2)).eval()
    with pytest.raises(ValueError, match=r"model module '0' .*is a quantized module"):
        gradient(model, torch.randn(1, 3, 2, 2), 0)


def test_get_dataset_refuses_a_non_path_annotation_dir(tmp_path) -> None:
    """``get_dataset(name, subset, dir, True)`` (download passed fourth, the old order) names
    annotation_dir, not PyTorch's/pathlib's "expected str, bytes or os.PathLike"."""
    from torchray_like.benchmark.datasets import get_dataset

    (tmp_path / "val2014").mkdir()
    with pytest.raises(TypeError, match=r"annotation_dir must be a folder path .* got bool; "
                                        r"pass download=\.\.\. by keyword"):
        get_dataset("coco", "val2014", tmp_path, True)


def test_image_folder_url_refuses_a_float_index(tmp_path) -> None:
    """``get_image_url(1.5)`` was image 1 (``int(1.5)``); integers of any kind still work."""
    import numpy as np
    from PIL import Image

    from torchray_like.benchmark.datasets import ImageFolder

    for k in range(2):
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "a" / f"img{k}.png")
    folder = ImageFolder(str(tmp_path))
    want = str(tmp_path / "a" / "img1.png")
    assert folder.get_image_url(1) == folder.get_image_url(np.int64(1)) == want
    assert folder.get_image_url(torch.tensor(-1)) == want
    for bad in (1.5, True, "1"):
        with pytest.raises(TypeError, match=r"image index must be an int, got "):
            folder.get_image_url(bad)
    with pytest.raises(IndexError, match="out of range for 2 images"):
        folder.get_image_url(2)


def _int8_model() -> nn.Module:
    """A converted (int8) model: quantized conv and linear between QuantStub/DeQuantStub."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notes
        import torch.ao.quantization as tq

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.q, self.dq = tq.QuantStub(), tq.DeQuantStub()
                self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                          nn.Flatten(), nn.Linear(4, 5))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.dq(self.body(self.q(x)))

        torch.manual_seed(0)
        model = Net().eval()
        model.qconfig = tq.get_default_qconfig("fbgemm")
        tq.prepare(model, inplace=True)
        model(torch.randn(4, 3, 8, 8))
        return tq.convert(model)


def test_forward_only_metrics_accept_an_int8_model() -> None:
    """deletion/insertion and top_present_class run forward passes only: an int8 model is
    scored as before the quantized-module check (which is for gradient methods)."""
    from torchray_like.benchmark.deletion_insertion import deletion_insertion, top_present_class

    model = _int8_model()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        scores = model(x)
    present = [[1, 2], [3]]
    want = [max(p, key=lambda c: float(scores.softmax(1)[i, c])) for i, p in enumerate(present)]
    assert top_present_class(model, x, present) == want
    curves, areas = deletion_insertion(model, x, torch.rand(2, 1, 8, 8), want)
    assert curves.shape == (2, 65) and areas.shape == (2,)
    assert bool(torch.isfinite(curves).all()) and bool(((areas >= 0) & (areas <= 1)).all())
    # the first point of a deletion curve is the clean image's probability of the class
    torch.testing.assert_close(curves[:, 0].float(),
                               scores.softmax(1)[[0, 1], want].float(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"model module 'q' .*is a quantized module"):
        gradient(model, x, 1)


def test_auc_of_listed_fractions_under_a_meta_default_device() -> None:
    """Fractions given as a list are read on the CPU whatever the default device (the
    evenly spaced default already was): not "fractions is on the meta device"."""
    from torchray_like.benchmark.deletion_insertion import auc

    curve = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]])
    with torch.device("meta"):
        area = auc(curve, [0.0, 0.25, 1.0])
    assert area.device.type == "cpu" and area.dtype == torch.float32
    # trapezoids: 0.25 * (1 + 0.5) / 2 + 0.75 * 0.5 / 2, and 0.25 * 1 / 2 + 0.75 * 2 / 2
    torch.testing.assert_close(area, torch.tensor([0.375, 0.875]))


class _FailingClone(torch.Tensor):
    """A buffer whose copy fails (as an out-of-memory copy would)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is torch.Tensor.clone:
            raise RuntimeError("clone failed")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_guard_gives_back_what_it_changed_when_hiding_an_observer_fails() -> None:
    """An exception while the state guard is being applied (after it switched modules to eval
    mode) leaves every ``training`` flag as it was, and the next call works."""
    from torch.ao.quantization.observer import MinMaxObserver

    from torchray_like.attribution.state import model_state_guard

    observer = MinMaxObserver()
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 2), observer).train()
    observer.min_val = torch.zeros(()).as_subclass(_FailingClone)
    with pytest.raises(RuntimeError, match="clone failed"):
        with model_state_guard(model, freeze=False):
            pass  # pragma: no cover - never entered
    assert all(m.training for m in model.modules())
    observer.min_val = torch.tensor(float("inf"))
    with model_state_guard(model, freeze=False):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
