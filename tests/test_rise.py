"""RISE (Petsiuk, Das, Saenko, BMVC 2018): the masks, the maps and their math, reproducibility,
batching and TorchRay parity.

The masks are checked against an independent NumPy construction (linear interpolation written
from the definition of ``align_corners=False``), the maps against a direct sum over masks and
against the exact expectation enumerated over every mask configuration, and the method against
hand-built models whose evidence is known (tests/rise_helpers.py).  How RISE runs the model:
test_rise_running.py; what it refuses: test_rise_hostile.py; ``num_masks="auto"``:
test_rise_stopping.py.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from torchray_like.attribution import rise_masks
from torchray_like.attribution.rise import RISE_NORMALIZATIONS, generate_masks, rise, rise_class

from .conftest import make_torchvision
from .rise_helpers import BoxModel, LinearModel, SmallNet, all_masks

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


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
