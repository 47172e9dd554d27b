"""Targets: class indices, seed gradients, callables, binary heads, the pointing gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchray_like.attribution.context import TorchRayDifferenceWarning
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import guided_backprop
from torchray_like.attribution.targets import (
    backward_seed,
    class_indices,
    get_backward_gradient,
    get_pointing_gradient,
    parse_target,
)

from .conftest import ConvNet, assert_same_state, inputs, snapshot

SETTINGS = settings(max_examples=40, deadline=None)


def test_get_backward_gradient():
    out = torch.randn(3, 4)
    seed = get_backward_gradient(out, 2)
    assert torch.equal(seed, torch.tensor([[0., 0, 1, 0]] * 3))
    seed = get_backward_gradient(out, [0, 3, 1])
    assert torch.equal(seed.argmax(1), torch.tensor([0, 3, 1])) and seed.sum() == 3
    custom = torch.randn(3, 4)
    assert torch.equal(get_backward_gradient(out, custom), custom)
    maps = torch.randn(2, 3, 4, 4)
    seed = get_backward_gradient(maps, [2, 0])
    assert torch.equal(seed[0, 2], torch.ones(4, 4)) and torch.equal(seed[1, 0], torch.ones(4, 4))
    assert seed.sum() == 32


@pytest.mark.parametrize("target,error,match", [
    (4, ValueError, r"target class 4 is out of range.*4 classes \(valid: 0..3\)"),
    (-1, ValueError, "target class -1 is out of range"),
    ([1, 2], ValueError, "2 class indices but the batch has 3"),
    (torch.tensor([1, 2, 3, 0]), ValueError, "4 class indices but the batch has 3"),
    (1.0, ValueError, "integer class index, got the float 1.0"),
    ([1, 2.5, 0], ValueError, "integer class indices, found the float 2.5"),
    (torch.randn(3), ValueError, "seed gradient and must have the output's shape"),
    (torch.ones(3, 4, dtype=torch.long)[None], ValueError, "1-D tensor"),
    (True, TypeError, "boolean"),
    ("cat", TypeError, "target must be an int"),
    (None, ValueError, "target is required"),
])
def test_target_errors(target, error, match):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(3, 3, 6, 6)
    before = snapshot(net, x)
    with pytest.raises(error, match=match):
        gradient(net, x, target)
    assert_same_state(before, snapshot(net, x))


class BinaryHead(nn.Module):
    def __init__(self, keepdim):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 1)
        self.keepdim = keepdim

    def forward(self, x):
        z = self.fc(F.relu(self.conv(x)).mean((2, 3)))
        return z if self.keepdim else z[:, 0]


@pytest.mark.filterwarnings("ignore::torchray_like.attribution.context.TorchRayDifferenceWarning")
@pytest.mark.parametrize("keepdim", [True, False])
def test_single_logit_binary_head(keepdim):
    net = BinaryHead(keepdim).double()
    x = inputs(2, dtype=torch.float64)
    _, pos = gradient(net, x, 1, debug=True)
    _, neg = gradient(net, x, 0, debug=True)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xx).sum(), xx)
    torch.testing.assert_close(pos.gradient, g)      # class 1 explains +logit
    torch.testing.assert_close(neg.gradient, -g)     # class 0 explains -logit
    # Per-sample: one of each.
    _, mixed = gradient(net, x, [1, 0], debug=True)
    torch.testing.assert_close(mixed.gradient, torch.stack([g[0], -g[1]]))
    # The rectifying rules make the two classes' maps differ.
    assert not torch.allclose(guided_backprop(net, x, 1), guided_backprop(net, x, 0))
    with pytest.raises(ValueError, match="single-logit .* takes target 1"):
        gradient(net, x, 2)


def test_callable_target_with_dict_and_tuple_outputs():
    class DictNet(ConvNet):
        def forward(self, x):
            return {"logits": super().forward(x), "aux": x.mean()}

    class TupleNet(ConvNet):
        def forward(self, x):
            return super().forward(x), x.mean()

    x = inputs(2)
    expected = gradient(ConvNet(2).eval(), x, [3, 1])
    pick = torch.tensor([3, 1])
    got = gradient(DictNet(2).eval(), x, lambda out: out["logits"][torch.arange(2), pick])
    torch.testing.assert_close(got, expected)
    got = gradient(TupleNet(2).eval(), x, lambda out: out[0].gather(1, pick[:, None]))
    torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match="returned a dict, not a tensor: pass a callable"):
        gradient(DictNet(2).eval(), x, 1)
    with pytest.raises(ValueError, match=r"one score per sample, shape \(2,\)"):
        gradient(ConvNet(2).eval(), x, lambda out: out.sum())
    with pytest.raises(ValueError, match="do not depend on the input through autograd"):
        gradient(ConvNet(2).eval(), x, lambda out: out[:, 0].detach())
    with pytest.raises(TypeError, match="must return a tensor"):
        gradient(ConvNet(2).eval(), x, lambda out: 3)


def test_regression_callable_target_equals_seeded_gradient():
    net = ConvNet(2, classes=1).double().eval()
    x = inputs(2, dtype=torch.float64)
    a = gradient(net, x, lambda out: out[:, 0] ** 2)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((net(xx)[:, 0] ** 2).sum(), xx)
    torch.testing.assert_close(a, g.abs().amax(1, keepdim=True))


def test_custom_seed_gradient():
    net = ConvNet(2).double().eval()
    x = inputs(2, dtype=torch.float64)
    seed = torch.randn(2, 5, dtype=torch.float64)
    _, info = gradient(net, x, seed, debug=True)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xx), xx, seed)
    torch.testing.assert_close(info.gradient, g)


def test_get_pointing_gradient():
    maps = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    seed = get_pointing_gradient(maps, [1, 2])
    for i, c in enumerate([1, 2]):
        expected = torch.softmax(maps[i, c].flatten(), 0).view(4, 5)
        torch.testing.assert_close(seed[i, c], expected)
        assert seed[i].sum().item() == pytest.approx(1.0)
    assert seed[0, 0].abs().sum() == 0 and seed[1, :2].abs().sum() == 0
    # Numerically stable for huge scores.
    big = torch.full((1, 2, 3, 3), 1e4)
    big[0, 1, 1, 1] = 1e4 + 1
    seed = get_pointing_gradient(big, 1)
    assert torch.isfinite(seed).all() and seed[0, 1].argmax() == 4
    # (N, C): the one-hot seed.
    assert torch.equal(get_pointing_gradient(torch.randn(2, 3), 1), get_backward_gradient(
        torch.randn(2, 3), 1))
    with pytest.raises(ValueError, match="out of range"):
        get_pointing_gradient(maps, 3)


@SETTINGS
@given(n=st.integers(1, 6), c=st.integers(2, 9), data=st.data())
def test_one_hot_seed_for_any_per_sample_targets(n, c, data):
    targets = data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    out = torch.randn(n, c)
    seed = get_backward_gradient(out, targets)
    assert seed.shape == out.shape and seed.sum().item() == n
    assert seed[torch.arange(n), torch.tensor(targets)].eq(1).all()
    bad = data.draw(st.one_of(st.integers(c, c + 20), st.integers(-20, -1)))
    wrong = list(targets)
    wrong[data.draw(st.integers(0, n - 1))] = bad
    with pytest.raises(ValueError, match="out of range"):
        get_backward_gradient(out, wrong)
    with pytest.raises(ValueError, match="class indices but the batch has"):
        get_backward_gradient(out, targets + [0])


@SETTINGS
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6),
       scale=st.floats(1e-3, 1e4), data=st.data())
def test_pointing_seed_is_a_distribution_over_space(n, c, h, w, scale, data):
    target = data.draw(st.integers(0, c - 1))
    maps = torch.randn(n, c, h, w, dtype=torch.float64) * scale
    seed = get_pointing_gradient(maps, target)
    assert torch.isfinite(seed).all() and (seed >= 0).all()
    torch.testing.assert_close(seed[:, target].sum((1, 2)), torch.ones(n, dtype=torch.float64))
    assert seed.sum().item() == pytest.approx(n)
    # The seed peaks where the target channel does.
    assert torch.equal(seed[:, target].flatten(1).argmax(1), maps[:, target].flatten(1).argmax(1))


def test_binary_head_target_zero_warns_only_where_torchray_gives_a_number():
    """An (N, 1) output with target 0 is column 0 (+logit) in TorchRay: warn, say target=1."""
    import warnings

    with pytest.warns(TorchRayDifferenceWarning, match="pass target=1"):
        seed = get_backward_gradient(torch.randn(3, 1), [1, 0, 1])
    assert seed.view(-1).tolist() == [1, -1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_backward_gradient(torch.randn(3, 1), 1)   # +logit: TorchRay's number too
        get_backward_gradient(torch.randn(3), 0)      # (N,): TorchRay has no number for it
        get_backward_gradient(torch.randn(3, 2), 0)   # two columns: no binary rule


def test_pointing_gradient_unnormalised_is_the_exponential():
    maps = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    seed = get_pointing_gradient(maps, [0, 2], normalize=False)
    torch.testing.assert_close(seed[0, 0], maps[0, 0].exp(), rtol=0, atol=0)
    torch.testing.assert_close(seed[1, 2], maps[1, 2].exp(), rtol=0, atol=0)
    assert seed[0, 1:].abs().sum() == 0 and seed[1, :2].abs().sum() == 0
    # (N, C): one position, exp(score) unnormalised, one-hot normalised.
    out = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(get_pointing_gradient(out, 1, normalize=False)[:, 1],
                               out[:, 1].exp(), rtol=0, atol=0)
    assert torch.equal(get_pointing_gradient(out, 1), get_backward_gradient(out, 1))
    # Single-logit heads follow the binary rule in both modes.
    head = torch.randn(2, 1, dtype=torch.float64)
    assert torch.equal(get_pointing_gradient(head, 1, normalize=False), torch.ones_like(head))


# ---------------------------------------------------------------------------------------------
# The target parsed once: Target and parse_target
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    2, [0, 3, 1], (1, 1, 2), range(3), torch.tensor([2, 0, 1]), torch.tensor(3),
    np.int64(1), np.array([0, 3, 1]), np.array([1, 2, 0], dtype=np.uint8), np.array(2),
    [np.int32(1), 2, np.int64(0)]])
def test_seed_of_class_indices_is_exactly_get_backward_gradient(target):
    out = torch.randn(3, 4, 2, 2, requires_grad=True)
    parsed = parse_target(target, 3)
    assert parsed.kind == "classes" and parsed.indices.dtype == torch.long
    assert parsed.indices.shape == (3,)
    scores, seed = parsed.seed(out)
    expected = get_backward_gradient(out, torch.as_tensor(np.asarray(target)))
    assert scores is out and torch.equal(seed, expected) and seed.dtype == out.dtype
    # backward_seed is the same value, parsed on the spot.
    scores, again = backward_seed(out, target, 3)
    assert scores is out and torch.equal(again, seed)


def test_seed_of_a_seed_gradient_a_callable_and_a_custom_function():
    out = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    given = torch.randn(2, 5)
    _, seed = parse_target(given, 2).seed(out)
    assert torch.equal(seed, given.double()) and seed.dtype == torch.float64
    scores, ones = parse_target(lambda o: o[:, 1] * 2, 2).seed(out)
    assert torch.equal(scores, out[:, 1] * 2) and torch.equal(ones, torch.ones(2, dtype=out.dtype))
    # A custom get_backward_gradient receives the target as the caller gave it (TorchRay).
    seen = []

    def custom(pred_y, y):
        seen.append(y)
        return get_pointing_gradient(pred_y, y)

    _, seed = parse_target(np.int64(3), 2).seed(out, custom)
    assert type(seen[0]) is np.int64 and torch.equal(seed, get_pointing_gradient(out, 3))
    with pytest.raises(ValueError, match=r"get_backward_gradient must return a tensor shaped like "
                                         r"the output \(2, 5\), got \(2,\)"):
        parse_target(1, 2).seed(out, lambda pred_y, y: pred_y[:, 0])


@pytest.mark.parametrize("target,batch,error,match", [
    (None, 2, ValueError, "target is required: an int class, one class per sample"),
    (True, 2, TypeError, "got the boolean True"),
    (np.bool_(False), 2, TypeError, "got the boolean"),
    (np.array([True, False]), 2, TypeError, "boolean array"),
    (1.5, 2, ValueError, "integer class index, got the float 1.5"),
    (np.float32(2.0), 2, ValueError, "integer class index, got the float"),
    (np.array([0.0, 1.0]), 2, ValueError, "float64 NumPy array: class indices must be integers"),
    (np.array(["a", "b"]), 2, ValueError, "NumPy array: class indices must be integers"),
    (2 ** 63, 2, ValueError, "target class 9223372036854775808 is out of range"),
    ([0, -(2 ** 64)], 2, ValueError, "out of range"),
    (np.array([0, 2 ** 64 - 1], dtype=np.uint64), 2, ValueError,
     "target class 1844.* out of range"),
    ([0, 1, 2], 2, ValueError, "target has 3 class indices but the batch has 2 samples"),
    (np.array([[0, 1]]), 2, ValueError, r"1-D tensor with one class per sample, got shape "
                                        r"\(1, 2\)"),
    (torch.tensor([0, 1], device="meta"), 2, ValueError, "target is on the meta device"),
    (torch.zeros(3, 4), 2, ValueError, r"seed gradient and must have the output's shape, batch "
                                        r"first \(2, \.\.\.\); got \(3, 4\)"),
    (torch.tensor(1.0), 2, ValueError, "seed gradient"),
    (torch.tensor([1j, 2j]), 2, ValueError, "complex64 tensor"),
    ("cat", 2, TypeError, "target must be an int, a sequence"),
    ({"a": 1}, 2, TypeError, "got dict"),
])
def test_parse_target_refuses_what_needs_no_forward_pass(target, batch, error, match):
    with pytest.raises(error, match=match):
        parse_target(target, batch)


@pytest.mark.parametrize("target", [torch.tensor(1, device="meta"),
                                    torch.tensor([0, 1], device="meta")])
def test_class_indices_refuses_a_meta_target_of_any_rank(target):
    # A 0-d meta target was int()'s RuntimeError ("Tensor.item() cannot be called on meta").
    with pytest.raises(ValueError, match="target is on the meta device"):
        class_indices(target, 2)


def test_parse_target_none_devices_and_kinds():
    assert parse_target(None, 3, allow_none=True).kind == "none"
    with pytest.raises(ValueError, match="target is required"):
        parse_target(None, 3, allow_none=True).seed(torch.zeros(3, 2))
    assert parse_target(torch.zeros(2, 3), 2).kind == "seed"
    assert parse_target(len, 2).kind == "callable"
    parsed = parse_target([1, 0], 2)
    assert parsed.indices.device.type == "cpu" and parsed.on("cpu") is parsed
    assert parse_target(1, 2, device="meta").indices.is_meta
    moved = parsed.on("meta")
    assert moved.indices.is_meta and moved.given == [1, 0] and parsed.indices.device.type == "cpu"


def test_seed_errors_after_the_forward_pass_are_backward_seeds():
    with pytest.raises(ValueError, match=r"the model output has shape \(3, 4\), whose first "
                                         r"dimension is not the batch size 2"):
        parse_target(1, 2).seed(torch.zeros(3, 4))
    for function in (get_backward_gradient, lambda out, y: out["logits"]):
        with pytest.raises(TypeError, match="the model returned a dict, not a tensor: pass a "
                                            "callable"):
            parse_target(1, 2).seed({"logits": torch.zeros(2, 4)}, function)
    with pytest.raises(ValueError, match=r"target class 4 is out of range: the model output has 4 "
                                         r"classes \(valid: 0..3\)"):
        parse_target(4, 2).seed(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"must have the output's shape \(2, 4\), got \(2, 5\)"):
        parse_target(torch.zeros(2, 5), 2).seed(torch.zeros(2, 4))


def test_binary_target_zero_warns_at_the_callers_line():
    with pytest.warns(TorchRayDifferenceWarning, match="pass target=1") as record:
        parse_target([1, 0], 2).seed(torch.zeros(2, 1))
    assert record[0].filename == __file__


def test_scores_of_class_indices_callables_and_every_class():
    out = torch.randn(6, 3, dtype=torch.float64)
    samples = torch.tensor([0, 1, 0, 1, 0, 1])
    parsed = parse_target([2, 0], 2)
    raw = parsed.scores(out, samples=samples)
    assert torch.equal(raw, out[torch.arange(6), torch.tensor([2, 0] * 3)])
    soft = parsed.scores(out, "softmax", samples=samples, dtype=torch.float32)
    assert soft.dtype == torch.float32
    assert torch.equal(soft, out.float().softmax(1)[torch.arange(6), torch.tensor([2, 0] * 3)])
    table = parse_target(None, 2, allow_none=True).scores(out, "logit", samples=samples)
    assert torch.equal(table, out)
    with pytest.raises(ValueError, match="m: target is required"):
        parse_target(None, 2, allow_none=True).scores(out, samples=samples, name="m")
    fn = parse_target(lambda o: o[:, 1:2], 2)
    assert torch.equal(fn.scores(out, "softmax", samples=samples), out[:, 1])
    # Score maps are summed over positions; single-logit heads give ±z.
    maps = torch.randn(2, 3, 4, 4)
    assert torch.equal(parsed.scores(maps), maps[[0, 1], [2, 0]].flatten(1).sum(1))
    z = torch.randn(2, 1)
    assert torch.equal(parse_target([1, 0], 2).scores(z), torch.stack([z[0, 0], -z[1, 0]]))
    with pytest.raises(ValueError, match="m: target must hold integer class indices or be a "
                                         "callable"):
        parse_target(torch.zeros(2, 3), 2).scores(out, name="m")


@pytest.mark.parametrize("score,output,match", [
    (None, torch.zeros(2, 3), r"target class 5 is out of range: the model output has 3 classes"),
    ("softmax", torch.zeros(2, 3), r"target class 5 is out of range: the scores have 3 classes "
                                   r"\(valid: 0..2\)"),
    ("sigmoid", torch.zeros(2, 1), r"target class 5 is out of range: a single-logit \(binary\) "
                                   r"head takes target 1"),
    (lambda o: o.repeat(1, 4), torch.zeros(2, 1), r"the scores have 4 classes \(valid: 0..3\)"),
])
def test_scores_check_the_class_range(score, output, match):
    with pytest.raises(ValueError, match=match):
        parse_target(5, 2).scores(output, score)
