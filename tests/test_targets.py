"""Targets: class indices, seed gradients, callables, binary heads, the pointing gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.guided_backprop import guided_backprop
from torchray_like.attribution.context import TorchRayDifferenceWarning
from torchray_like.attribution.targets import get_backward_gradient, get_pointing_gradient

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
