"""RISE (Petsiuk, Das, Saenko, BMVC 2018): masks, maps, reproducibility, memory, state, errors.

The masks are checked against an independent NumPy construction (linear interpolation written
from the definition of ``align_corners=False``), the maps against a direct sum over masks and
against the exact expectation enumerated over every mask configuration, and the method against
hand-built models whose evidence is known.
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchray_like.attribution import rise as rise_module
from torchray_like.attribution import rise_masks
from torchray_like.attribution.modules import check_model
from torchray_like.attribution.rise import (
    RISE_NORMALIZATIONS,
    RISE_SCORES,
    SlowRiseWarning,
    generate_masks,
    rise,
    rise_class,
)

from .conftest import assert_same_state, make_torchvision, snapshot


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this module runs: its tensors are small, and two threads on a
    busy 2-core machine make every op wait for the other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Hand-built models and an independent mask construction
# ---------------------------------------------------------------------------------------------


class BoxModel(nn.Module):
    """Logit k = ``scale`` × the mean of the input over box k (every channel)."""

    def __init__(self, boxes, scale=10.0):
        super().__init__()
        self.boxes = boxes
        self.scale = scale
        self.calls = []  # batch size of every forward

    def forward(self, x):
        self.calls.append(x.shape[0])
        cols = [x[(slice(None), slice(None)) + box].flatten(1).mean(1) for box in self.boxes]
        return self.scale * torch.stack(cols, dim=1)


class LinearModel(nn.Module):
    """Class 0: ``sum(w ⊙ x)``; class 1: 0.  A linear score, so E[RISE] has a closed form."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        f = (x * self.w).flatten(1).sum(1)
        return torch.stack([f, torch.zeros_like(f)], dim=1)


class SmallNet(nn.Module):
    """A small conv net with parameters, dropout and batch norm (state checks)."""

    def __init__(self, classes=5):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, classes)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(h.mean(dim=(2, 3))))


def interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Linear interpolation n_in → n_out with ``align_corners=False`` (PyTorch's definition:
    output pixel j samples input coordinate (j + ½)·n_in/n_out − ½, clamped to the edges)."""
    a = np.zeros((n_out, n_in))
    for j in range(n_out):
        src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        a[j, i0] += 1 - lam
        a[j, i1] += lam
    return a


def all_masks(size, cells, p):
    """Every mask the paper's construction can give, with its probability (NumPy)."""
    cell_size = [-(-n // s) for n, s in zip(size, cells)]
    mats = [interp_matrix(s, (s + 1) * c) for s, c in zip(cells, cell_size)]
    k = math.prod(cells)
    out = []
    for bits in itertools.product((0.0, 1.0), repeat=k):
        grid = np.array(bits).reshape(cells)
        up = grid
        for d, m in enumerate(mats):  # separable: interpolate along each axis
            up = np.moveaxis(np.tensordot(m, np.moveaxis(up, d, 0), axes=(1, 0)), 0, d)
        prob_grid = p ** sum(bits) * (1 - p) ** (k - sum(bits))
        for shift in itertools.product(*[range(c) for c in cell_size]):
            crop = up[tuple(slice(a, a + n) for a, n in zip(shift, size))]
            out.append((crop, prob_grid / math.prod(cell_size)))
    return out


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,cells", [((10,), (3,)), ((5, 6), (2, 2)), ((4, 3, 5), (2, 1, 2))])
def test_masks_match_independent_construction(size, cells):
    """Every generated mask is one of the masks the paper's construction can give."""
    bank = generate_masks(60, size, cells if len(set(cells)) > 1 else cells[0], 0.5, generator=3,
                          dtype=torch.float64)
    assert bank.shape == (60, 1) + size and bank.dtype == torch.float64
    ref = np.stack([m.ravel() for m, _ in all_masks(size, cells, 0.5)])
    got = bank.flatten(1).numpy()
    dist = np.abs(got[:, None, :] - ref[None, :, :]).max(axis=2).min(axis=1)
    assert dist.max() < 1e-12
    # The draws use several configurations, not one.
    assert len({tuple(np.round(r, 9)) for r in got}) > 10


def test_mask_statistics():
    bank = generate_masks(2000, (32, 32), 7, 0.5, generator=0)
    assert bank.shape == (2000, 1, 32, 32)
    assert bank.dtype == torch.float32 and bank.device.type == "cpu"
    assert float(bank.min()) >= 0.0 and float(bank.max()) <= 1.0
    assert abs(float(bank.mean()) - 0.5) < 0.01
    assert float((bank.mean(0) - 0.5).abs().max()) < 0.06  # every pixel has expectation p
    # Soft edges: interpolated values strictly between 0 and 1 occur.
    assert float(((bank > 0.01) & (bank < 0.99)).float().mean()) > 0.2
    low = generate_masks(2000, (16, 16), 4, 0.2, generator=0)
    assert abs(float(low.mean()) - 0.2) < 0.01
    torch.testing.assert_close(generate_masks(3, (5, 7), 2, 1.0), torch.ones(3, 1, 5, 7),
                               rtol=0, atol=1e-6)
    half = generate_masks(4, (8,), 2, generator=1, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.shape == (4, 1, 8)
    # num_cells larger than the side: cells of one pixel.
    tiny = generate_masks(50, (3, 3), 7, generator=2)
    assert tiny.shape == (50, 1, 3, 3) and float(tiny.max()) <= 1.0


def test_mask_seeds_and_global_rng():
    a = generate_masks(20, (9, 9), 3, generator=5)
    assert torch.equal(a, generate_masks(20, (9, 9), 3, generator=5))
    assert not torch.equal(a, generate_masks(20, (9, 9), 3, generator=6))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(generate_masks(20, (9, 9), 3, generator=g1),
                       generate_masks(20, (9, 9), 3, generator=g2))
    # A generator object is advanced: the next call gives new masks.
    assert not torch.equal(generate_masks(20, (9, 9), 3, generator=g1),
                           generate_masks(20, (9, 9), 3, generator=torch.Generator()
                                          .manual_seed(7)))
    torch.manual_seed(11)
    state = torch.get_rng_state()
    b = generate_masks(20, (9, 9), 3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not advanced
    assert torch.equal(b, generate_masks(20, (9, 9), 3))  # reproducible under manual_seed
    torch.manual_seed(12)
    assert not torch.equal(b, generate_masks(20, (9, 9), 3))


# ---------------------------------------------------------------------------------------------
# Maps on models whose evidence is known
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,boxes,cells", [
    ((64,), [(slice(5, 15),), (slice(40, 52),)], 6),
    ((32, 32), [(slice(2, 10), slice(3, 11)), (slice(20, 30), slice(18, 28))], 7),
    ((8, 16, 16), [(slice(0, 3), slice(1, 6), slice(2, 7)),
                   (slice(5, 8), slice(9, 15), slice(10, 15))], 4),
])
def test_map_peaks_in_the_box_of_its_class(size, boxes, cells):
    model = BoxModel(boxes)
    x = torch.ones((2, 3) + size)
    maps = rise(model, x, num_masks=600, num_cells=cells, generator=0)
    assert maps.shape == (2, 2) + size and maps.dtype == torch.float32
    for k, box in enumerate(boxes):
        other = boxes[1 - k]
        m = maps[0, k]
        inside = torch.zeros(size, dtype=torch.bool)
        inside[box] = True
        peak = np.unravel_index(int(m.argmax()), size)
        assert inside[tuple(int(i) for i in peak)], f"class {k} peaks outside its box"
        assert float(m[box].mean()) > float(m[~inside].mean()) + 0.06
        assert float(m[box].mean()) > float(m[other].mean()) + 0.15
    # Both images are identical: identical maps (shared masks).
    assert torch.allclose(maps[0], maps[1])
    # The softmax scores sum to one, so the class maps sum to sum_i M_i / (N p) ≈ 1.
    total = maps[0].sum(0)
    assert abs(float(total.mean()) - 1.0) < 0.05


def expected_linear_map(w, x, size, cells, p):
    """Exact E[f(x ⊙ M) M] / p for f = sum(w ⊙ x), enumerating every mask."""
    e = np.zeros(size)
    for m, prob in all_masks(size, cells, p):
        e += prob * float((w * x * m).sum()) * m
    return e / p


def test_converges_to_the_expectation_like_one_over_sqrt_n():
    size, cells, p = (10,), (3,), 0.5
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 1, 10, generator=gen, dtype=torch.float64)
    x = torch.rand(1, 1, 10, generator=gen, dtype=torch.float64) + 0.5
    exact = expected_linear_map(w[0, 0].numpy(), x[0, 0].numpy(), size, cells, p)
    model = LinearModel(w)

    def rms_error(n, seeds):
        errs = [rise(model, x, target=0, num_masks=n, num_cells=3, p=p, score="logit",
                     generator=s)[0, 0].numpy() - exact for s in seeds]
        return math.sqrt(np.mean(np.square(errs)) / np.mean(np.square(exact)))

    e_small = rms_error(64, range(12))
    e_large = rms_error(1024, range(100, 112))
    assert e_large < 0.12
    assert 2.5 < e_small / e_large < 6.5, (e_small, e_large)  # 1/sqrt(N): ratio 4


def test_matches_direct_sum_over_masks_torchvision():
    model = make_torchvision("resnet18")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    bank = generate_masks(32, (16, 16), 4, 0.5, generator=1)
    with torch.no_grad():
        probs = torch.stack([model(x[i] * bank).softmax(1) for i in range(2)])  # (2, M, K)
    direct = torch.einsum("imk,mp->ikp", probs, bank.flatten(1)) / (32 * 0.5)
    maps = rise(model, x, filter_masks=bank, batch_size=20)
    assert maps.shape == (2, 10, 16, 16)
    torch.testing.assert_close(maps.flatten(2), direct, rtol=1e-4, atol=1e-6)
    one = rise(model, x, target=[3, 7], filter_masks=bank, batch_size=20)
    assert one.shape == (2, 1, 16, 16)
    torch.testing.assert_close(one[:, 0], maps[[0, 1], [3, 7]], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("score", ["sigmoid", "logit"])
def test_scores_match_direct_sum(score):
    model = SmallNet().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model.double()
    bank = generate_masks(40, (12, 12), 3, 0.3, generator=4, dtype=torch.float64)
    with torch.no_grad():
        z = torch.stack([model(x[i] * bank) for i in range(2)])
    s = torch.sigmoid(z) if score == "sigmoid" else z
    direct = torch.einsum("imk,mp->ikp", s, bank.flatten(1)) / (40 * 0.3)
    maps = rise(model, x, filter_masks=bank, p=0.3, score=score, batch_size=7)
    assert maps.dtype == torch.float64
    torch.testing.assert_close(maps.flatten(2), direct, rtol=1e-10, atol=1e-12)


def test_callable_score_and_dict_output():
    class DictModel(nn.Module):
        def forward(self, x):
            return {"logits": torch.stack([x.mean((1, 2)), -x.mean((1, 2))], 1)}

    x = torch.rand(1, 2, 16)
    bank = generate_masks(30, (16,), 4, generator=0)
    maps = rise(DictModel(), x, filter_masks=bank, score=lambda out: out["logits"].softmax(1))
    # A single-logit head z = mean(x), target 1 explains +z.
    ref = rise(BoxModel([(slice(None),)], scale=1.0), x, target=1, filter_masks=bank, score="logit")
    assert maps.shape == (1, 2, 16)
    # Class 0 of the dict model: softmax of (a, -a) = sigmoid(2a).
    direct = sum(torch.sigmoid(2 * (x[0] * bank[i]).mean()) * bank[i, 0] for i in range(30))
    torch.testing.assert_close(maps[0, 0], direct / 15)
    one = rise(DictModel(), x, filter_masks=bank, score=lambda out: out["logits"][:, 1])
    assert one.shape == (1, 1, 16)
    assert ref.shape == (1, 1, 16)
    torch.testing.assert_close(one, -ref)


@pytest.mark.parametrize("shape", ["flat", "column"])
def test_binary_head(shape):
    class Binary(nn.Module):
        def forward(self, x):
            z = 4 * (x[:, :, :4].mean((1, 2)) - x[:, :, 4:].mean((1, 2)))
            return z if shape == "flat" else z[:, None]

    x = torch.ones(2, 1, 8)
    bank = generate_masks(200, (8,), 2, generator=0)
    maps = rise(Binary(), x, filter_masks=bank)
    assert maps.shape == (2, 2, 8)
    # Class 1 = sigmoid(z), class 0 = 1 - sigmoid(z): they sum to sum_i M_i / (N p).
    torch.testing.assert_close(maps[0].sum(0), bank.sum(0)[0] / 100, rtol=1e-5, atol=1e-6)
    assert float(maps[0, 1, :4].mean()) > float(maps[0, 1, 4:].mean()) + 0.1
    assert float(maps[0, 0, 4:].mean()) > float(maps[0, 0, :4].mean()) + 0.1
    torch.testing.assert_close(rise(Binary(), x, target=[1, 0], filter_masks=bank)[:, 0],
                               maps[[0, 1], [1, 0]])
    torch.testing.assert_close(rise(Binary(), x, filter_masks=bank, score="sigmoid"), maps)
    logit = rise(Binary(), x, filter_masks=bank, score="logit")
    torch.testing.assert_close(logit[:, 0], -logit[:, 1])
    with pytest.raises(ValueError, match=r"target class 2 is out of range: a single-logit "
                                         r"\(binary\) head takes target 1"):
        rise(Binary(), x, target=2, filter_masks=bank)


# ---------------------------------------------------------------------------------------------
# Reproducibility and batching
# ---------------------------------------------------------------------------------------------


def test_seeds_reproduce_and_bank_equals_streaming():
    model = SmallNet().eval()
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    a = rise(model, x, num_masks=50, num_cells=3, generator=9, batch_size=8)
    assert torch.equal(a, rise(model, x, num_masks=50, num_cells=3, seed=9, batch_size=8))
    # generator wins over seed (TorchRay's argument, default 0).
    assert torch.equal(a, rise(model, x, num_masks=50, num_cells=3, seed=4, generator=9,
                               batch_size=8))
    assert torch.equal(a, rise(model, x, num_masks=50, num_cells=3, batch_size=8,
                               generator=torch.Generator().manual_seed(9)))
    assert not torch.allclose(a, rise(model, x, num_masks=50, num_cells=3, generator=10,
                                      batch_size=8))
    bank = generate_masks(50, (10, 10), 3, generator=9)
    assert torch.equal(a, rise(model, x, filter_masks=bank, batch_size=8))
    # Masks do not depend on batch_size (only the summation order does).
    torch.testing.assert_close(a, rise(model, x, num_masks=50, num_cells=3, generator=9,
                                       batch_size=3), rtol=1e-5, atol=1e-7)
    # The default is TorchRay's seed=0: reproducible, and the global RNG is untouched.
    torch.manual_seed(3)
    state = torch.get_rng_state()
    default = rise(model, x, num_masks=20, num_cells=3)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(default, rise(model, x, num_masks=20, num_cells=3, generator=0))
    # seed=None and no generator: a seed derived from the global RNG state (not advanced).
    b = rise(model, x, num_masks=20, num_cells=3, seed=None)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(b, rise(model, x, num_masks=20, num_cells=3, seed=None))
    torch.manual_seed(4)
    assert not torch.equal(b, rise(model, x, num_masks=20, num_cells=3, seed=None))
    # The first num_masks masks of a bigger bank.
    torch.testing.assert_close(rise(model, x, filter_masks=bank[:30], batch_size=8),
                               rise(model, x, filter_masks=bank, num_masks=30, batch_size=8))


def test_batch_equals_per_sample_calls():
    model = SmallNet().eval()
    x = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    targets = [0, 4, 2]
    batch = rise(model, x, target=targets, num_masks=40, num_cells=3, generator=2, batch_size=9)
    full = rise(model, x, num_masks=40, num_cells=3, generator=2, batch_size=9)
    assert batch.shape == (3, 1, 10, 10) and full.shape == (3, 5, 10, 10)
    for i, t in enumerate(targets):
        single = rise(model, x[i:i + 1], target=t, num_masks=40, num_cells=3, generator=2)
        torch.testing.assert_close(batch[i:i + 1], single, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(full[i, t], single[0, 0], rtol=1e-5, atol=1e-7)
    # A tensor target and a single int.
    torch.testing.assert_close(
        rise(model, x, target=torch.tensor(targets), num_masks=40, num_cells=3, generator=2,
             batch_size=9), batch)
    torch.testing.assert_close(
        rise(model, x, target=4, num_masks=40, num_cells=3, generator=2, batch_size=9)[:, 0],
        full[:, 4])


@pytest.mark.parametrize("n_img,batch_size", [(3, 8), (5, 2), (1, 1), (4, 64)])
def test_forward_batches_never_exceed_batch_size(n_img, batch_size, monkeypatch):
    model = BoxModel([(slice(0, 3), slice(0, 3)), (slice(3, 6), slice(3, 6))])
    built = []
    original = rise_masks.MaskSampler.masks

    def spy(self, start, stop, device, dtype):
        built.append(stop - start)
        return original(self, start, stop, device, dtype)

    monkeypatch.setattr(rise_masks.MaskSampler, "masks", spy)
    x = torch.rand(n_img, 1, 6, 6)
    rise(model, x, num_masks=23, num_cells=2, batch_size=batch_size, generator=0)
    assert max(model.calls) <= batch_size
    assert sum(model.calls) == 23 * n_img  # every (image, mask) pair exactly once
    assert max(built) <= batch_size and sum(built) == 23  # masks built batch by batch, once


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
# Errors
# ---------------------------------------------------------------------------------------------


def _box():
    return BoxModel([(slice(0, 2), slice(0, 2)), (slice(2, 4), slice(2, 4))])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_masks=0), ValueError, r"num_masks must be a positive int \(>= 1\), got 0"),
    (dict(num_masks=2.5), TypeError, "num_masks must be a positive int, got 2.5"),
    (dict(num_cells=0), ValueError, "num_cells must be a positive int"),
    (dict(num_cells=(2, 2, 2)), ValueError, r"num_cells must be an int or 2 ints"),
    (dict(num_cells="7"), TypeError, "num_cells must be a positive int"),
    (dict(p=0), ValueError, r"p \(the probability of keeping a cell\) must be in \(0, 1\]"),
    (dict(p=1.5), ValueError, r"must be in \(0, 1\], got 1.5"),
    (dict(p=float("nan")), TypeError, r"p must be a number in \(0, 1\]"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(batch_size=True), TypeError, "batch_size must be a positive int"),
    (dict(score="prob"), ValueError, "score must be one of 'softmax', 'sigmoid', 'logit'"),
    (dict(progress="yes"), TypeError, "progress must be True, False or None"),
    (dict(target=[0, 1, 0]), ValueError, "target has 3 class indices but the batch has 2"),
    (dict(target=2), ValueError, r"target class 2 is out of range: the scores have 2 classes "
                                 r"\(valid: 0\.\.1\)"),
    (dict(target=-1), ValueError, "target class -1 is out of range"),
    (dict(target=1.0), ValueError, "target must be an integer class index"),
    (dict(target=torch.zeros(2)), ValueError, "target must hold integer class indices"),
    (dict(target=lambda out: out[:, 0], score="logit"), ValueError, "pass one or the other"),
    (dict(target=np.array([0.0, 1.0])), ValueError, "float64 NumPy array: class indices must"),
    (dict(target=torch.tensor([0, 1], device="meta")), ValueError, "target is on the meta dev"),
    (dict(return_info="yes"), TypeError, "return_info must be True or False"),
    (dict(resize=2.5), TypeError, "resize must be False, True, an int"),
    (dict(target="cat"), TypeError, "target must be an int"),
    (dict(generator="seed"), TypeError, "generator must be a torch.Generator, an int seed"),
    (dict(generator=-1), ValueError, r"an int seed must be in \[0, 2\*\*64\)"),
    (dict(normalize="mean"), ValueError, r"normalize must be one of \('paper', 'torchray'\)"),
    # The former alias masks= is gone: the bank is TorchRay's filter_masks.
    (dict(masks=torch.ones(4, 1, 4, 4) / 2), TypeError, "unexpected keyword argument 'masks'"),
    (dict(resize=(3, 3, 3)), ValueError, "resize must give 2 positive sizes"),
    (dict(resize_mode="cubic"), ValueError, "resize_mode must be one of"),
])
def test_argument_errors(kwargs, exc, match):
    model = _box()
    kw = dict(num_masks=4, num_cells=2, generator=0)
    kw.update(kwargs)
    if "resize_mode" in kwargs:
        kw["resize"] = (5, 5)
    with pytest.raises(exc, match=match):
        rise(model, torch.rand(2, 1, 4, 4), **kw)
    if exc is ValueError and "target class" not in match:
        assert model.calls == []  # rejected before any forward pass


@pytest.mark.parametrize("model,x,exc,match", [
    (lambda x: x, torch.rand(1, 1, 4, 4), TypeError, "model must be a torch.nn.Module"),
    (None, torch.randint(0, 255, (1, 3, 4, 4), dtype=torch.uint8), TypeError,
     "input must be a floating-point tensor"),
    (None, torch.rand(3, 4), ValueError, r"input must have shape \(N, C, \*spatial\)"),
    (None, torch.rand(1, 1, 2, 2, 2, 2), ValueError, "1 to 3 spatial dimensions"),
    (None, torch.rand(0, 1, 4, 4), ValueError, "input is an empty batch"),
    (None, [[1.0]], TypeError, "input must be a torch.Tensor"),
])
def test_model_and_input_errors(model, x, exc, match):
    with pytest.raises(exc, match=match):
        rise(model if model is not None else _box(), x, num_masks=2, num_cells=2)


def test_output_and_score_errors():
    x = torch.rand(1, 1, 4, 4)

    class Tuple(nn.Module):
        def forward(self, x):
            return (x.mean((1, 2, 3))[:, None].repeat(1, 3),)

    class Map(nn.Module):
        def forward(self, x):
            return x.repeat(1, 3, 1, 1)

    class Shrink(nn.Module):
        def forward(self, x):
            return x[:1].flatten(1)

    with pytest.raises(TypeError, match="the model returned a tuple, not a tensor .* "
                                        "score=callable"):
        rise(Tuple(), x, num_masks=2, num_cells=2)
    with pytest.raises(ValueError, match=r"needs \(batch, classes\) logits, but the model output "
                                         r"has shape \(2, 3, 4, 4\)"):
        rise(Map(), x, num_masks=2, num_cells=2)
    with pytest.raises(ValueError, match="whose first dimension is not the forward batch size 2"):
        rise(Shrink(), x.repeat(2, 1, 1, 1), num_masks=1, num_cells=2, batch_size=2)
    with pytest.raises(TypeError, match="a callable score must return a tensor"):
        rise(Tuple(), x, num_masks=2, num_cells=2, score=lambda out: 1.0)
    with pytest.raises(ValueError, match=r"a callable score must return \(2, K\) or \(2,\)"):
        rise(Tuple(), x, num_masks=2, num_cells=2, score=lambda out: out[0][:1])
    with pytest.raises(ValueError, match=r"target class 5 is out of range: the scores have 3 "
                                         r"classes \(valid: 0\.\.2\)"):
        rise(Tuple(), x, target=5, num_masks=2, num_cells=2, score=lambda out: out[0])

    class Varying(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 2 + x.shape[0] % 2)

    with pytest.raises(ValueError, match="the score has 3 classes in one forward batch and 2"):
        rise(Varying(), x, num_masks=3, num_cells=2, batch_size=2)


def test_mask_bank_errors():
    model = _box()
    x = torch.rand(1, 1, 4, 4)
    good = generate_masks(50, (4, 4), 2, generator=0)
    cases = [
        (good[:, :, :3], ValueError, r"masks must have shape \(num_masks, 1, \*spatial\) = "
                                     r"\(M, 1, 4, 4\) .* got \(50, 1, 3, 4\)"),
        (good[:, 0], ValueError, r"masks must have shape"),
        (good[:0], ValueError, r"masks must have shape"),
        (good.repeat(1, 3, 1, 1), ValueError, r"masks must have shape"),
        ((good > 0.5), TypeError, "masks must be a floating-point tensor"),
        (good.numpy(), TypeError, "masks must be a tensor from generate_masks"),
        (torch.full_like(good, float("nan")), ValueError, "masks contain non-finite values"),
        (generate_masks(50, (4, 4), 2, 0.1, generator=0), ValueError,
         r"the masks have mean value 0\.\d+ but p=0.5: pass the p"),
    ]
    for masks, exc, match in cases:
        with pytest.raises(exc, match=match):
            rise(model, x, filter_masks=masks)
    with pytest.raises(ValueError, match="num_masks=60 but the masks bank holds only 50"):
        rise(model, x, filter_masks=good, num_masks=60)
    assert model.calls == []
    # The bank's own p is accepted.
    low = generate_masks(50, (4, 4), 2, 0.1, generator=0)
    assert rise(model, x, filter_masks=low, p=0.1).shape == (1, 2, 4, 4)


@pytest.mark.parametrize("args,exc,match", [
    ((0, (4, 4)), ValueError, "num_masks must be a positive int"),
    ((3, 4), TypeError, r"input_size must be a tuple .* got the int 4"),
    ((3, "44"), TypeError, "input_size must be a tuple"),
    ((3, (0, 4)), ValueError, "input_size must hold 1 to 3 positive ints"),
    ((3, (2, 2, 2, 2)), ValueError, "input_size must hold 1 to 3 positive ints"),
    ((3, (4, 4), (2, 2, 2)), ValueError, "num_cells must be an int or 2 ints"),
    ((3, (4, 4), 2, 0.0), ValueError, r"must be in \(0, 1\]"),
])
def test_generate_masks_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        generate_masks(*args)


def test_generate_masks_dtype_error():
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        generate_masks(2, (4, 4), dtype=torch.int64)
    assert RISE_SCORES == ("softmax", "sigmoid", "logit")


# ---------------------------------------------------------------------------------------------
# TorchRay parity
# ---------------------------------------------------------------------------------------------


def test_signature_has_torchrays_positional_order():
    params = list(inspect.signature(rise).parameters.values())
    names = [q.name for q in params]
    torchray = ["model", "input", "target", "seed", "num_masks", "num_cells", "filter_masks",
                "batch_size", "p", "resize", "resize_mode"]
    assert names[:len(torchray)] == torchray
    assert all(q.kind is q.POSITIONAL_OR_KEYWORD for q in params[:len(torchray)])
    assert all(q.kind is q.KEYWORD_ONLY for q in params[len(torchray):])
    assert {"score", "normalize", "generator", "progress"} <= set(names)
    assert "masks" not in names  # the former alias of filter_masks is gone
    defaults = {q.name: q.default for q in params}
    assert (defaults["seed"], defaults["num_cells"], defaults["batch_size"], defaults["p"],
            defaults["resize"], defaults["resize_mode"]) == (0, 7, 32, 0.5, False, "bilinear")
    assert defaults["normalize"] == "paper" and RISE_NORMALIZATIONS == ("paper", "torchray")
    # A positional call (TorchRay's order) is the keyword call.
    model = SmallNet().eval()
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    pos = rise(model, x, 3, 7, 30, 3, None, 8, 0.4, (5, 5), "nearest")
    kw = rise(model, x, target=3, seed=7, num_masks=30, num_cells=3, batch_size=8, p=0.4,
              resize=(5, 5), resize_mode="nearest")
    assert torch.equal(pos, kw) and pos.shape == (2, 1, 5, 5)
    # rise_class takes the target positionally too.
    assert torch.equal(rise_class(model, x, 3, seed=7, num_masks=30, num_cells=3, p=0.4,
                                  batch_size=8), rise(model, x, 3, 7, 30, 3, None, 8, 0.4))


def test_torchray_normalization_is_the_mean_sigmoid_over_the_same_masks():
    """normalize="torchray": S_c = (1/N) Σ_i sigmoid(f(x ⊙ M_i))_c M_i, by hand."""
    model = SmallNet().eval().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    n, p = 40, 0.3
    bank = generate_masks(n, (12, 12), 3, p, generator=11, dtype=torch.float64)
    hand = torch.zeros(2, 5, 144, dtype=torch.float64)
    for i in range(n):            # one mask at a time, written out
        with torch.no_grad():
            s = torch.sigmoid(model(x * bank[i]))          # (2, 5)
        hand += s[:, :, None] * bank[i].flatten()[None, None, :]
    hand /= n
    # The bank given positionally as TorchRay's filter_masks, or drawn from the same seed.
    maps = rise(model, x, None, 0, None, 7, bank, 16, p, normalize="torchray")
    torch.testing.assert_close(maps.flatten(2), hand, rtol=1e-10, atol=1e-12)
    drawn = rise(model, x, seed=11, num_masks=n, num_cells=3, p=p, normalize="torchray")
    torch.testing.assert_close(drawn.flatten(2), hand, rtol=1e-10, atol=1e-12)
    # The paper's normalisation with the same score divides by N p instead of N.
    paper = rise(model, x, filter_masks=bank, p=p, score="sigmoid")
    torch.testing.assert_close(paper * p, maps, rtol=1e-12, atol=1e-14)
    # and its default score is the softmax.
    soft = torch.zeros_like(hand)
    for i in range(n):
        with torch.no_grad():
            soft += model(x * bank[i]).softmax(1)[:, :, None] * bank[i].flatten()[None, None]
    torch.testing.assert_close(rise(model, x, filter_masks=bank, p=p).flatten(2), soft / (n * p),
                               rtol=1e-10, atol=1e-12)
    # With TorchRay's normalisation the bank's mean need not match p (p is not used).
    low = generate_masks(30, (12, 12), 3, 0.1, generator=0, dtype=torch.float64)
    assert rise(model, x, filter_masks=low, normalize="torchray").shape == (2, 5, 12, 12)


# ---------------------------------------------------------------------------------------------
# Hostile inputs and models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_an_error_naming_input(bad):
    model = _box()
    x = torch.rand(1, 1, 4, 4)
    x[0, 0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"rise: input has 1 (NaN|infinite) value"):
        rise(model, x, num_masks=4, num_cells=2)
    assert model.calls == []


def test_non_finite_model_output_is_an_error_naming_the_model():
    class NaNModel(nn.Module):
        def forward(self, x):
            out = x.flatten(1)[:, :3].clone()
            out[x.flatten(1)[:, 0] == 0] = float("nan")    # NaN once pixel 0 is masked out
            return out

    x = torch.rand(1, 1, 4, 4) + 0.5
    bank = generate_masks(20, (4, 4), 2, generator=0)
    bank[3, 0, 0, 0] = 0.0
    with pytest.raises(ValueError, match=r"the model's scores are not finite \(NaN or inf\)"):
        rise(NaNModel(), x, filter_masks=bank)
    with pytest.raises(ValueError, match="not finite"):
        rise(NaNModel(), x, target=1, filter_masks=bank, score="logit")


# ---------------------------------------------------------------------------------------------
# The stopping rule (num_masks="auto", tol), bfloat16 forward passes, the slow-default warning
# ---------------------------------------------------------------------------------------------


# The estimator and the rule themselves: tests/test_rise_stopping.py.


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_masks="many"), ValueError, "num_masks must be a positive int, None .* or 'auto'"),
    (dict(num_masks="auto", tol=0), ValueError, r"tol must be a finite number in \(0, 1\]"),
    (dict(tol=1.5), ValueError, r"tol must be a finite number in \(0, 1\]"),
    (dict(tol="small"), ValueError, "tol must be a finite number"),
    (dict(autocast=torch.float32), TypeError, "autocast must be None, torch.bfloat16"),
    (dict(autocast=True), TypeError, "autocast must be None, torch.bfloat16"),
    (dict(autocast="bf16"), TypeError, "autocast must be None, torch.bfloat16"),
])
def test_stopping_and_autocast_argument_errors(kwargs, exc, match):
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(exc, match=match):
        rise(_box(), x, 0, num_cells=2, generator=0, **kwargs)


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


def test_the_class_range_is_checked_once_after_the_first_forward_pass():
    model = _box()
    with pytest.raises(ValueError, match=r"target class 7 is out of range: the scores have 2 "):
        rise(model, torch.rand(2, 1, 4, 4), [0, 7], num_masks=40, num_cells=2, batch_size=4)
    assert model.calls == [4]


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


def test_a_classifier_on_the_meta_device_is_refused_before_any_pass():
    with torch.device("meta"):
        model = SmallNet()
    with pytest.raises(ValueError, match=r"rise: model parameter 'conv.weight' is on the meta "
                                         r"device .* model.to_empty"):
        rise(model, torch.rand(1, 3, 8, 8), 0, num_masks=4)


def test_unbatched_and_channels_last_images_say_what_to_do():
    model = SmallNet().eval()
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"rise: .*channels last.*x\.permute\(0, 3, 1, 2\)"):
        rise(model, image.permute(1, 2, 0)[None], 0, num_masks=4, num_cells=2)
    with pytest.raises(ValueError, match=r"SmallNet failed on input of shape \(3, 8, 8\) "
                                         r"\(RuntimeError: .*without the batch dimension.*"
                                         r"x\.unsqueeze\(0\)") as info:
        rise(model, image, 0, num_masks=4, num_cells=2)
    assert isinstance(info.value.__cause__, RuntimeError)
    # A float64 image (torch.from_numpy) for a float32 model: the cast to apply.
    with pytest.raises(ValueError, match=r"input is float64 but the model's parameters are "
                                         r"float32: pass x.to\(torch.float32\)"):
        rise(model, image[None].double(), 0, num_masks=4, num_cells=2)


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


def test_a_torchray_style_call_with_filter_masks_warns_of_torchrays_number():
    """``rise(model, x, filter_masks=bank, num_masks=N)`` — TorchRay's own arguments with our
    defaults (the paper's softmax and 1 / (N p)) — gives another number than TorchRay's rise
    (sigmoid, 1 / N): a TorchRayDifferenceWarning says how to get TorchRay's."""
    import warnings

    from torchray_like.attribution.context import TorchRayDifferenceWarning
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3)).eval()
    x = torch.rand(1, 3, 8, 8)
    bank = generate_masks(100, (8, 8), 4, 0.5, generator=0)
    with pytest.warns(TorchRayDifferenceWarning, match="normalize='torchray'"):
        paper = rise(model, x, filter_masks=bank, num_masks=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TorchRayDifferenceWarning)
        torchray = rise(model, x, filter_masks=bank, num_masks=100, normalize="torchray")
        rise(model, x, filter_masks=bank, score="softmax")   # the paper's, said explicitly
        rise(model, x, num_masks=64, generator=0)           # no TorchRay argument: no warning
    assert not torch.allclose(paper, torchray, rtol=0.1)


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
