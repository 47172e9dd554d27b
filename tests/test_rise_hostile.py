"""RISE (Petsiuk, Das, Saenko, BMVC 2018): what it refuses, and how — bad arguments, models,
inputs, outputs, mask banks, non-finite values, unbatched or channels-last images; each with
the message that names the argument and what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from torchray_like.attribution.rise import RISE_SCORES, generate_masks, rise

from .rise_helpers import SmallNet, box_model

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


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
    model = box_model()
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
        rise(model if model is not None else box_model(), x, num_masks=2, num_cells=2)


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
    model = box_model()
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
# Hostile inputs and models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_an_error_naming_input(bad):
    model = box_model()
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
        rise(box_model(), x, 0, num_cells=2, generator=0, **kwargs)


def test_the_class_range_is_checked_once_after_the_first_forward_pass():
    model = box_model()
    with pytest.raises(ValueError, match=r"target class 7 is out of range: the scores have 2 "):
        rise(model, torch.rand(2, 1, 4, 4), [0, 7], num_masks=40, num_cells=2, batch_size=4)
    assert model.calls == [4]


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
