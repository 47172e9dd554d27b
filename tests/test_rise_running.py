"""RISE (Petsiuk, Das, Saenko, BMVC 2018): how it runs the model — eval and inference modes,
devices, dtypes, the model's state left as found, the progress bar, bfloat16 forward passes, the
slow-default warning, callable targets, NumPy arguments and channels-last masked batches."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution import rise as rise_module
from torchray_like.attribution.modules import check_model
from torchray_like.attribution.rise import SlowRiseWarning, generate_masks, rise, rise_class

from .conftest import assert_same_state, make_torchvision, snapshot
from .rise_helpers import BoxModel, SmallNet

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


# ---------------------------------------------------------------------------------------------
# Modes, devices, dtypes, state
# ---------------------------------------------------------------------------------------------


def test_eval_mode_inference_and_output_tensor():
    model = SmallNet().train()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    before = snapshot(model, x)
    a = rise(model, x, num_masks=16, num_cells=2, generator=0, batch_size=8)
    assert_same_state(before, snapshot(model, x))
    assert set(model.modes) == {False}  # eval mode: dropout off, batch norm running stats
    assert model.training and x.grad is None
    assert not a.requires_grad and not a.is_inference() and a.device == x.device
    a += 1  # an ordinary tensor: in-place updates work outside inference mode
    ref = rise(model.eval(), x, num_masks=16, num_cells=2, generator=0, batch_size=8)
    torch.testing.assert_close(a - 1, ref)
    with torch.no_grad():
        torch.testing.assert_close(rise(model, x, num_masks=16, num_cells=2, generator=0,
                                        batch_size=8), ref)
    with torch.inference_mode():
        xi = x.detach().clone()
        torch.testing.assert_close(rise(model, xi, num_masks=16, num_cells=2, generator=0,
                                        batch_size=8), ref)


def test_state_restored_after_success_and_failure():
    model = SmallNet().train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.fc.weight.requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    before = snapshot(model, x)
    rise(model, x, num_masks=10, num_cells=2, generator=0, batch_size=4, progress=True)
    assert_same_state(before, snapshot(model, x))

    class Failing(SmallNet):
        def forward(self, x):
            if len(self.modes) == 2:
                raise RuntimeError("boom")
            return super().forward(x)

    bad = Failing().train()
    before = snapshot(bad, x)
    with pytest.raises(RuntimeError, match="boom"):
        rise(bad, x, num_masks=10, num_cells=2, generator=0, batch_size=4, progress=True)
    assert_same_state(before, snapshot(bad, x))
    assert bad.training


def test_dtypes_and_resize():
    model = BoxModel([(slice(0, 4),), (slice(4, 8),)])
    x64 = torch.rand(1, 2, 8, dtype=torch.float64)
    m64 = rise(model, x64, num_masks=20, num_cells=2, generator=0)
    assert m64.dtype == torch.float64
    m16 = rise(model, x64.half(), num_masks=20, num_cells=2, generator=0)
    assert m16.dtype == torch.float32  # accumulated and returned in single precision
    torch.testing.assert_close(m16.double(), m64, rtol=0.02, atol=0.02)
    x = torch.rand(1, 1, 8, 8)
    box = BoxModel([(slice(0, 4), slice(0, 4)), (slice(4, 8), slice(4, 8))])
    plain = rise(box, x, target=0, num_masks=20, num_cells=2, generator=0)
    big = rise(box, x, target=0, num_masks=20, num_cells=2, generator=0, resize=(12, 16))  # (W, H)
    assert big.shape == (1, 1, 16, 12)
    torch.testing.assert_close(big, F.interpolate(plain, size=(16, 12), mode="bilinear",
                                                  align_corners=False))
    assert torch.equal(rise(box, x, target=0, num_masks=20, num_cells=2, generator=0,
                            resize=True), plain)


def test_progress_bar_and_no_thread_left_behind(capsys):
    model = BoxModel([(slice(0, 2),), (slice(2, 4),)])
    x = torch.rand(1, 1, 4)
    before = set(threading.enumerate())
    rise(model, x, num_masks=8, num_cells=2, generator=0, progress=True)
    assert "RISE" in capsys.readouterr().err
    rise(model, x, num_masks=8, num_cells=2, generator=0, progress=False)
    rise(model, x, num_masks=8, num_cells=2, generator=0)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
    # Neither the bar nor its absence leaves tqdm's monitor thread (or any other) running,
    # also when the model raises.

    class Failing(BoxModel):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        rise(Failing([(slice(0, 2),)]), x, num_masks=8, num_cells=2, progress=True)
    assert set(threading.enumerate()) == before


def test_rise_class():
    model = BoxModel([(slice(0, 2),), (slice(2, 4),)])
    x = torch.rand(2, 1, 4)
    torch.testing.assert_close(
        rise_class(model, x, target=1, num_masks=10, num_cells=2, generator=0),
        rise(model, x, num_masks=10, num_cells=2, generator=0)[:, 1:])
    with pytest.raises(ValueError, match="rise_class needs a target"):
        rise_class(model, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - no GPU in CI
    model = SmallNet().eval()
    x = torch.randn(2, 3, 10, 10)
    cpu = rise(model, x, num_masks=30, num_cells=3, generator=1)
    gpu = rise(model.cuda(), x.cuda(), num_masks=30, num_cells=3, generator=1)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    bank = generate_masks(30, (10, 10), 3, generator=1, device="cuda")
    assert bank.device.type == "cuda"
    torch.testing.assert_close(bank.cpu(), generate_masks(30, (10, 10), 3, generator=1))


# ---------------------------------------------------------------------------------------------
# bfloat16 forward passes, the slow-default warning
# ---------------------------------------------------------------------------------------------


def test_bfloat16_forward_passes_keep_float32_maps_close_to_float32():
    model = make_torchvision("resnet18")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = snapshot(model, x)
    ref = rise(model, x, [1, 2], num_masks=256, generator=0, batch_size=64)
    low = rise(model, x, [1, 2], num_masks=256, generator=0, batch_size=64,
               autocast=torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    a, b = ref.flatten(1), low.flatten(1)
    corr = F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))
    assert float(corr.min()) > 0.99, corr
    assert not torch.equal(ref, low)  # the forward passes did run in bfloat16
    assert_same_state(before, snapshot(model, x))
    assert not torch.is_autocast_enabled("cpu")


def test_slow_default_warns_once_with_the_time_and_what_to_pass(monkeypatch):
    monkeypatch.setattr(rise_module, "SLOW_CPU_SECONDS", 0.0)
    monkeypatch.setattr(SlowRiseWarning, "given", False)
    model = BoxModel([(slice(0, 1), slice(0, 1))])
    x = torch.rand(1, 1, 2, 2)
    with pytest.warns(rise_module.SlowRiseWarning,
                      match=r"default 8000 masks will take about .* num_masks='auto'") as rec:
        rise(model, x, 0, num_cells=1, batch_size=512)
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rise(model, x, 0, num_cells=1, batch_size=512)      # once per process
        monkeypatch.setattr(SlowRiseWarning, "given", False)
        rise(model, x, 0, num_masks=100, num_cells=1)       # an explicit count: no warning
        rise(model, x, 0, num_masks="auto", num_cells=1)    # the stopping rule: no warning


# ---------------------------------------------------------------------------------------------
# Callable targets, the model left as it was found, layouts, NumPy arguments
# ---------------------------------------------------------------------------------------------


class DictOut(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"logits": self.inner(x)}


def test_a_callable_target_is_the_class_score_it_returns():
    """A callable target scores each masked input itself: the map of class 1 under the default
    softmax, bit for bit, also through a dict output the class index cannot read."""
    model = SmallNet().eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_masks=40, num_cells=2, generator=1, batch_size=8)
    ref = rise(model, x, 1, **kw)
    assert torch.equal(rise(model, x, lambda out: out.softmax(1)[:, 1], **kw), ref)
    got = rise(DictOut(model), x, lambda out: out["logits"].softmax(1)[:, 1], **kw)
    assert torch.equal(got, ref) and got.shape == (3, 1, 8, 8)
    # A regression-style score of any output.
    sums = rise(DictOut(model), x, lambda out: out["logits"].sum(1), **kw)
    assert sums.shape == (3, 1, 8, 8) and torch.isfinite(sums).all()
    with pytest.raises(TypeError, match="the model returned a dict, not a tensor of class "
                                        "scores: pass a callable target"):
        rise(DictOut(model), x, 1, **kw)
    with pytest.raises(ValueError, match=r"rise: a callable target must return one score per row "
                                         r"of the model output, shape \(6,\) for a forward batch "
                                         r"of 6, got \(3,\)"):
        rise(model, x, lambda out: out[:3, 0], **kw)


class CachingNet(nn.Module):
    """A buffer the forward pass caches (as RoPE tables are); ``Lazy*`` layers if ``lazy``."""

    def __init__(self, lazy=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.LazyConv2d(4, 3, padding=1) if lazy else nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.LazyLinear(3) if lazy else nn.Linear(4, 3)
        self.register_buffer("table", None)

    def forward(self, x):
        if self.table is None:
            self.table = torch.linspace(0, 1, x.shape[-1])
        return self.fc(self.conv(x * self.table).relu().mean((2, 3)))


def test_rise_leaves_no_inference_tensor_in_the_model():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # Un-initialised Lazy* layers: refused as the other methods refuse them (the first pass
    # would change the model), before any pass; once run, the model is explained.
    lazy = CachingNet(lazy=True)
    with pytest.raises(ValueError, match=r"rise: model parameter 'conv.weight' is not "
                                         r"initialised yet .* run the model once first"):
        rise(lazy, x, 0, num_masks=8, num_cells=2)
    assert lazy.table is None
    with torch.no_grad():
        lazy(x)
    assert rise(lazy, x, 0, num_masks=8, num_cells=2).shape == (2, 1, 8, 8)
    # A buffer cached by the forward pass is a normal tensor afterwards.
    model = CachingNet()
    rise(model, x, 0, num_masks=8, num_cells=2, generator=0)
    tensors = list(model.parameters()) + list(model.buffers())
    assert len(tensors) == 5 and not any(t.is_inference() for t in tensors)
    assert check_model(model) is model          # the gradient methods accept it afterwards
    model(x).sum().backward()                   # and it trains
    assert model.fc.weight.grad is not None and model.fc.weight.grad.shape == (3, 4)


def test_numpy_arguments_are_accepted_and_give_the_same_maps():
    model = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = rise(model, x, [1, 2], seed=3, num_masks=20, num_cells=(2, 3), batch_size=8, p=0.5,
               resize=4, progress=False)
    got = rise(model, x, np.array([1, 2]), seed=np.int64(3), num_masks=np.int64(20),
               num_cells=np.array([2, 3]), batch_size=np.int64(8), p=np.float32(0.5),
               resize=np.int64(4), progress=np.bool_(False))
    assert got.shape == (2, 1, 4, 4) and torch.equal(got, ref)
    kw = dict(seed=3, num_masks=20, num_cells=2, batch_size=8)
    assert torch.equal(rise(model, x, np.int64(2), **kw), rise(model, x, 2, **kw))
    bank = generate_masks(np.int64(6), np.array([8, 8]), np.int64(2), generator=np.uint64(1))
    assert torch.equal(bank, generate_masks(6, (8, 8), 2, generator=1))


# ---------------------------------------------------------------------------------------------
# Channels-last masked batches (issue 22)
# ---------------------------------------------------------------------------------------------


class _Layouts(nn.Module):
    """A small CNN that records the memory layout of every batch it sees; ``flat="view"``
    flattens with ``.view`` (which fails on channels-last activations), ``"raw"`` reads the
    batch in storage order (a stand-in for a custom kernel that ignores strides: silently
    different on channels-last data)."""

    def __init__(self, flat: str = "flatten") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.flat = flat
        self.layouts: list = []

    def forward(self, x):
        self.layouts.append(x.is_contiguous())
        if self.flat == "raw":
            x = x.new_empty(x.shape).copy_(x.permute(0, 2, 3, 1).reshape(x.shape)
                                           if not x.is_contiguous() else x)
        h = torch.relu(self.conv(x))
        h = h.view(h.shape[0], -1) if self.flat == "view" else torch.flatten(h, 1)
        return self.fc(h)


@pytest.mark.parametrize("flat", ["flatten", "view", "raw"])
def test_channels_last_batches_give_the_contiguous_maps(flat):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = _Layouts(flat)
    got = rise(model, x, [1, 3], num_masks=48, batch_size=16, generator=0, progress=False)
    # The reference: the same masks applied by hand, contiguous batches only.
    masks = generate_masks(48, (8, 8), generator=0)
    ref = torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        for i, c in enumerate([1, 3]):
            plain = _Layouts("flatten")
            scores = plain(x[i:i + 1] * masks).softmax(1)[:, c]
            ref[i, 0] = (scores.view(-1, 1, 1) * masks[:, 0]).sum(0) / (48 * 0.5)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # A well-behaved model runs channels-last; one that fails on, or disagrees with, the
    # layout is run contiguous after the first batch.
    later = model.layouts[3:]
    assert later and all(c == (flat != "flatten") for c in later)


def test_channels_last_skipped_for_one_channel_and_other_ranks():
    seen = []

    def model(x):
        seen.append(x.is_contiguous())
        return x.flatten(1)[:, :3]

    rise(model_wrap(model), torch.rand(1, 1, 6, 6), 0, num_masks=8, batch_size=4,
         generator=0, progress=False)
    rise(model_wrap(model), torch.rand(1, 3, 12), 0, num_masks=8, batch_size=4, generator=0,
         progress=False)
    assert seen and all(seen)


def model_wrap(fn):
    class Wrapped(nn.Module):
        def forward(self, x):
            return fn(x)
    return Wrapped()
