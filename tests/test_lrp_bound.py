"""benchmarks/lrp_bound.py: the embedded models rewritten so that plain autograd computes
EpsilonPlus (z⁺ and ε as the gradient of forward-exact expressions, batch norms folded) — an
independent computation of LRP's rules that ``lrp()`` must match above the first layer."""

from __future__ import annotations

import pytest
import torch

from torchray_like.benchmark.embedded_models import load_embedded_model

from .conftest import load_benchmark

BOUND = load_benchmark("lrp_bound")


@pytest.mark.parametrize("name", ["embedded-vgg", "embedded-resnet"])
def test_rewritten_model_gives_lrps_relevance_and_the_models_output(name):
    torch.manual_seed(3)
    model = load_embedded_model(name)
    side = 64 if name == "embedded-vgg" else 32  # (the VGG's classifier takes 64² only)
    x = torch.randn(2, 3, side, side)
    # check() raises when the rewritten forward pass differs from the model's by one bit.
    for target in (0, 5):
        assert BOUND.check(model, x, target, name) < 1e-6


def test_a_batch_norm_with_a_negative_scale_folds_the_weight():
    """Behind a batch norm with a scale ≤ 0 the rule's weight is the folded one (w'⁺ ≠ a w⁺):
    the rewritten model still equals lrp()."""
    torch.manual_seed(4)
    model = load_embedded_model("embedded-resnet")
    with torch.no_grad():
        model.layer2[0].bn1.weight[:3] = -model.layer2[0].bn1.weight[:3].abs() - 0.1
    assert BOUND.check(model, torch.randn(1, 3, 32, 32), 2, "embedded-resnet") < 1e-6
    assert load_embedded_model("embedded-resnet") is not model  # (each call loads a copy)


def test_main_prints_one_row_per_model(capsys):
    BOUND.main(["--models", "embedded-resnet", "--repeats", "2", "--input-size", "32"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["model", "floor", "ms"]
    row = out[2].split()
    assert row[0] == "embedded-resnet" and float(row[4]) > 0  # bound×, a ratio to the floor
    assert "of lrp(EpsilonPlus)" in out[2]


def test_an_input_size_the_vgg_cannot_take_is_refused_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        BOUND.main(["--models", "embedded-vgg", "--repeats", "2", "--input-size", "32"])
    assert "--input-size 32: embedded-vgg does not take a 32² input; use 64" in \
        capsys.readouterr().err
