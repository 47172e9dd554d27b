"""Hostile inputs found by the third sweep of the public API (the methods beyond TorchRay's,
the rule contexts and probes): each test is one case that used to end in a foreign exception
or a silently wrong answer, with the message or the numbers it must give now."""

from __future__ import annotations

import re
import threading

import pytest
import torch

import torchray_like as trl
from tests.conftest import assert_same_state, snapshot
from tests.transformer_models import make_vit
from torchray_like.attribution.common import Probe
from torchray_like.attribution.excitation_backprop import ExcitationBackpropContext
from torchray_like.attribution.guided_backprop import GuidedBackpropContext
from torchray_like.attribution.layer_choice import find_saliency_layer
from torchray_like.attribution.tokens import TokenLayout

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_vit():
    return make_vit()  # 32² images, 8² patches, 5 classes


def _images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# The model's own input check (torch._assert: torchvision's ViT on a wrong image size) was an
# AssertionError from inside torchvision; it is a ValueError naming the input and what to do.

@pytest.mark.parametrize("method", ["gradient", "grad_cam_plus_plus", "score_cam", "occlusion",
                                    "integrated_gradients", "lrp", "attn_lrp", "grad_rollout",
                                    "attention_rollout"])
def test_model_assertion_on_input_size_is_a_value_error(small_vit, method):
    x = _images(2, 3, 40, 40)
    before = snapshot(small_vit, x)
    with pytest.raises(ValueError, match=r"VisionTransformer failed on input of shape "
                       r"\(2, 3, 40, 40\) \(AssertionError: Wrong image height! Expected 32 but "
                       r"got 40!\); the model's own check refused it; give inputs of the size"):
        trl.METHODS[method](small_vit, x, 1)
    assert_same_state(before, snapshot(small_vit, x))


# ---------------------------------------------------------------------------------------------
# Attention rollout / flow / gradient-weighted rollout: a NaN pixel gave a NaN map (rollout) or
# a finite map without meaning (flow's integer capacities); a class the model lacks was
# accepted by the class-agnostic two.

@pytest.mark.parametrize("method", ["attention_rollout", "attention_flow", "grad_rollout"])
def test_attention_methods_refuse_nan_input(small_vit, method):
    x = _images(2, 3, 32, 32)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=rf"{method}: input has 1 NaN value\(s\) \(shape "
                       r"\(2, 3, 32, 32\)\); replace them first, e.g. with torch.nan_to_num"):
        trl.METHODS[method](small_vit, x, 1)


@pytest.mark.parametrize("method", ["attention_rollout", "attention_flow"])
def test_class_agnostic_attention_methods_check_the_target_range(small_vit, method):
    x = _images(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"target class 7 is out of range: the model output "
                       r"has 5 classes \(valid: 0..4\)"):
        trl.METHODS[method](small_vit, x, [1, 7])
    # A valid class, a callable or no target: the same class-agnostic map.
    plain = trl.METHODS[method](small_vit, x)
    assert torch.equal(trl.METHODS[method](small_vit, x, [1, 4]), plain)
    assert torch.equal(trl.METHODS[method](small_vit, x, lambda out: out[:, 0]), plain)


# ---------------------------------------------------------------------------------------------
# A transformer whose parameters are all frozen (a fine-tuning setup, a deployed model): the
# automatic layer choice found no graph to ask which tokens matter and refused ("could not
# choose saliency_layer automatically"); it chooses what it chooses for the unfrozen model.

@pytest.mark.parametrize("method", ["grad_cam_plus_plus", "layer_cam", "eigen_cam"])
def test_frozen_transformer_gets_the_same_automatic_layer(method):
    x = _images(2, 3, 32, 32)
    model, frozen = make_vit(), make_vit()
    for p in frozen.parameters():
        p.requires_grad_(False)
    before = snapshot(frozen, x)
    assert find_saliency_layer(frozen, x) == \
        "encoder.layers.encoder_layer_1.ln_1"
    torch.testing.assert_close(trl.METHODS[method](frozen, x, [1, 3]),
                               trl.METHODS[method](model, x, [1, 3]))
    assert_same_state(before, snapshot(frozen, x))


# ---------------------------------------------------------------------------------------------
# TorchRay's function-valued options given something else (a context *instance*, a string)
# ended in Python's "'X' object is not callable", naming no argument.

def _convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


@pytest.mark.parametrize("method, option, value, example", [
    ("gradient", "context_builder", GuidedBackpropContext(),
     r"context_builder=GuidedBackpropContext, not GuidedBackpropContext\(\)"),
    ("excitation_backprop", "context_builder", 3, "context_builder=GuidedBackpropContext"),
    ("grad_cam_plus_plus", "gradient_to_saliency", "max", "gradient_to_saliency=my_function"),
    ("lrp", "gradient_to_saliency", 3, "gradient_to_saliency=my_function"),
    ("linear_approx", "get_backward_gradient", 3, "get_backward_gradient=my_function"),
    ("attn_lrp", "get_backward_gradient", 3, "get_backward_gradient=my_function"),
    ("contrastive_excitation_backprop", "get_backward_gradient", 3,
     "get_backward_gradient=my_function"),
])
def test_function_options_must_be_callable(method, option, value, example):
    model, x = _convnet(), _images(2, 3, 8, 8)
    before = snapshot(model, x)
    with pytest.raises(TypeError, match=rf"^{option} must be a function \(or a class\), got "
                       rf"{type(value).__name__} .*; pass the function itself, not the result "
                       rf"of calling it \({example}"):
        trl.METHODS[method](model, x, 1, **{option: value})
    assert_same_state(before, snapshot(model, x))


# ---------------------------------------------------------------------------------------------
# SmoothGrad over another method: method_kwargs that is no mapping was dict()'s own error
# ("cannot convert dictionary update sequence element #0 to a sequence"); an error the inner
# method raises names the noisy batch's shapes (6 rows for 2 images), now with a note.

def test_smooth_grad_method_kwargs_must_be_a_mapping():
    with pytest.raises(TypeError, match=r"method_kwargs must be a mapping of the method's "
                       r"options \(e.g. dict\(saliency_layer='layer4'\)\), got list"):
        trl.smooth_grad(_convnet(), _images(2, 3, 8, 8), 1, "grad_cam", method_kwargs=[1])


@pytest.mark.parametrize("method", ["gradient", "grad_cam", "integrated_gradients"])
def test_smooth_grad_inner_errors_say_the_batch_is_noisy_copies(method):
    x = _images(2, 3, 8, 8).double()  # a float32 model
    with pytest.raises(ValueError, match=r"failed on input of shape \(6, 3, 8, 8\)") as info:
        trl.smooth_grad(_convnet(), x, 1, method, n_samples=3, seed=0)
    assert str(info.value).endswith(
        f"model.to(torch.float64) (smooth_grad: {method} raised this on a batch of 6 noisy "
        "copies of the input of shape (2, 3, 8, 8), row r a copy of image r mod 2; the shapes "
        "it names are that batch's)")


# ---------------------------------------------------------------------------------------------
# torch.utils.checkpoint(use_reentrant=False) under the LRP rules: the recomputation in backward
# runs outside the context (plain convolutions), so PyTorch's CheckpointError ("Recomputed
# values ... have different metadata") came out of the backward pass.  LRPContext refuses
# saved-tensor hooks in its block, as excitation backprop already did (one shared guard).

class _Checkpointed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _convnet()

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(self.inner, x, use_reentrant=False)


@pytest.mark.parametrize("method, context", [
    ("lrp", "LRPContext"), ("lrp_epsilon_gamma_box", "LRPContext"),
    ("attn_lrp", "TransformerLRPContext"), ("excitation_backprop", "ExcitationBackpropContext")])
def test_rule_methods_refuse_non_reentrant_checkpoints(method, context):
    model, x = _Checkpointed().eval(), _images(2, 3, 8, 8)
    before = snapshot(model, x)
    name = "excitation backprop" if method == "excitation_backprop" else "LRP"
    with pytest.raises(RuntimeError, match=rf"^{name} does not support torch.utils.checkpoint\("
                       rf"use_reentrant=False\) \(or other saved-tensor hooks\) inside "
                       rf"{context}: .* Run the model without activation checkpointing"):
        trl.METHODS[method](model, x, 1)
    assert_same_state(before, snapshot(model, x))
    # The plain-gradient methods go through the checkpoint exactly.
    torch.testing.assert_close(trl.gradient_x_input(model, x, 1),
                               trl.gradient_x_input(model.inner, x, 1))


def test_lrp_context_by_hand_refuses_checkpoints_in_its_thread_only():
    model, x = _Checkpointed().eval(), _images(2, 3, 8, 8).requires_grad_()
    with pytest.raises(RuntimeError, match=r"LRP does not support .* inside LRPContext"):
        with trl.LRPContext("EpsilonPlus", model=model):
            model(x)
    done = []
    with trl.LRPContext("EpsilonPlus", model=model.inner):
        thread = threading.Thread(target=lambda: done.append(model(x).sum().backward()))
        thread.start()
        thread.join()
    assert done == [None] and x.grad is not None  # another thread checkpoints as usual
    model(x).sum().backward()  # and so does this one after the block


@pytest.mark.filterwarnings("ignore:.*replaced no")  # the refused call below ran nothing
def test_a_method_inside_a_users_rule_context_may_checkpoint():
    """A method suspends the caller's contexts: their refusal of checkpoints too (a plain
    gradient inside ``with LRPContext():`` was refused before), restored after the call."""
    model, x = _Checkpointed().eval(), _images(2, 3, 8, 8)
    expected = trl.gradient(model, x, 1)
    with trl.LRPContext("EpsilonPlus"), ExcitationBackpropContext():
        torch.testing.assert_close(trl.gradient(model, x, 1), expected)
        with pytest.raises(RuntimeError, match="^excitation backprop does not support"):
            model(x.clone().requires_grad_())
    model(x.clone().requires_grad_()).sum().backward()


# ---------------------------------------------------------------------------------------------
# The attention methods' layout options: num_prefix_tokens='1' was Python's "'>' not supported
# between 'str' and 'int'", grid='4x4' int()'s "invalid literal", a 3-int grid on an image a
# 3-D map (N, 1, 4, 4, 1) for a 2-D input, max_work='big' a TypeError from a comparison and
# max_work=NaN no bound at all.

@pytest.mark.parametrize("method", ["attention_rollout", "attention_flow", "grad_rollout"])
@pytest.mark.parametrize("option, value, message", [
    ("num_prefix_tokens", "1", r"num_prefix_tokens must be an int \(the class and other "
     r"non-patch tokens first in the sequence\) or None, got '1'"),
    ("num_prefix_tokens", 2.5, r"num_prefix_tokens must be an int .* got 2.5"),
    ("grid", "4x4", r"grid must be the patch grid: 2 positive int\(s\), one per spatial "
     r"dimension of the input \(e.g. \(14, 14\) for a 224² image in 16² patches\), got '4x4'"),
    ("grid", (4, 4, 1), r"grid must be the patch grid: 2 positive int\(s\).*got \(4, 4, 1\)"),
    ("grid", (4, -4), r"grid must be the patch grid.*got \(4, -4\)"),
    ("grid", (2.5, 4), r"grid must be the patch grid.*got \(2.5, 4\)"),
])
def test_attention_layout_options_are_checked(small_vit, method, option, value, message):
    with pytest.raises(ValueError, match=message):
        trl.METHODS[method](small_vit, _images(2, 3, 32, 32), 1, **{option: value})


@pytest.mark.parametrize("max_work", ["big", float("nan"), -1, 0])
def test_attention_flow_max_work_is_checked(small_vit, max_work):
    with pytest.raises(ValueError, match=r"max_work must be a positive number "
                       r"\(float\('inf'\): no bound\), got"):
        trl.attention_flow(small_vit, _images(2, 3, 32, 32), max_work=max_work)


def test_attention_layout_options_in_other_spellings(small_vit):
    x = _images(2, 3, 32, 32)
    expected = trl.attention_rollout(small_vit, x, num_prefix_tokens=1, grid=(4, 4))
    for grid in (torch.Size([4, 4]), [4, 4], torch.tensor([4, 4])):
        assert torch.equal(trl.attention_rollout(small_vit, x, grid=grid), expected)
    assert torch.equal(trl.attention_flow(small_vit, x, max_work=float("inf")),
                       trl.attention_flow(small_vit, x))


# A TokenLayout grid of another rank than the input's spatial rank: the backprop layer methods
# returned (N, 1, 16) maps for images (Score-/Ablation-CAM refused it with another message).

@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus", "eigen_cam", "score_cam"])
@pytest.mark.parametrize("grid", [(16,), (4, 4, 1)])
def test_token_grid_must_have_the_inputs_rank(small_vit, method, grid):
    layout = TokenLayout(prefix=1, grid=grid)
    with pytest.raises(ValueError, match=rf"tokens: the grid {re.escape(str(grid))} has "
                       rf"{len(grid)} dimension\(s\) but the input of shape \(2, 3, 32, 32\) "
                       r"has 2 spatial dimension\(s\); give one grid size per spatial"):
        trl.METHODS[method](small_vit, _images(2, 3, 32, 32), 1, tokens=layout)


# A saliency_layer returning a tuple (an LSTM, a block returning (features, aux)) or an integer
# tensor: the backprop methods raised the probe's "Probe: the output of X is a tuple" TypeError,
# naming no argument.

class _TupleBlock(torch.nn.Module):
    def forward(self, x):
        return x * 1.0, x.sum()


class _WithTupleBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.block = _TupleBlock()
        self.fc = torch.nn.Linear(3, 5)

    def forward(self, x):
        h, _ = self.block(self.conv(x))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("method", ["grad_cam_plus_plus", "layer_cam", "eigen_cam", "lrp",
                                    "attn_lrp", "gradient_x_input", "grad_cam"])
def test_a_tuple_returning_layer_is_refused_naming_saliency_layer(method):
    model, x = _WithTupleBlock().eval(), _images(2, 3, 8, 8)
    before = snapshot(model, x)
    with pytest.raises(ValueError, match=r"^saliency_layer 'block' returned a tuple, not a "
                       r"floating-point tensor; choose a layer whose output is one"):
        trl.METHODS[method](model, x, 1, saliency_layer="block")
    assert_same_state(before, snapshot(model, x))
    # The layer before it works.
    assert trl.METHODS[method](model, x, 1, saliency_layer="conv").shape == (2, 1, 8, 8)


# Probe.contrast as a list: one contrast per recorded call; a longer list (from a pass with more
# calls) was silently cut to the calls there were.

@pytest.mark.parametrize("count", [0, 2])
def test_probe_contrast_list_must_match_the_calls(count):
    layer = torch.nn.Linear(4, 4)
    x = _images(2, 4).requires_grad_()
    with Probe(layer, target="output") as probe:
        probe.contrast = [torch.ones(2, 4)] * count
        y = layer(x)
        with pytest.raises(ValueError, match=rf"Probe.contrast holds {count} tensor\(s\) but "
                           r"Linear was called 1 time\(s\) \(call 0 is being backpropagated\); "
                           "give one contrast per recorded call"):
            y.sum().backward()
        probe.contrast = [torch.ones(2, 4)]
        layer(x).sum().backward()
        torch.testing.assert_close(probe.data[0].grad, torch.zeros(2, 4))


def test_smooth_grad_leaves_messages_without_batch_shapes_alone():
    with pytest.raises(ValueError, match=r"no module named 'nope'; top-level names: '0'.*'6'$"):
        trl.smooth_grad(_convnet(), _images(2, 3, 8, 8), 1, "grad_cam", n_samples=2, seed=0,
                        saliency_layer="nope")


# ---------------------------------------------------------------------------------------------
# The automatic layer of a model ending "conv -> ReLU(inplace=True)": the in-place ReLU was taken
# for a renaming (as nn.Identity) and the conv chosen, so the CAM family read pre-ReLU values
# and its maps changed with the inplace flag alone.

def _conv_relu(inplace: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace), nn.Conv2d(4, 4, 3),
                         nn.ReLU(inplace), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).eval()


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus", "layer_cam", "eigen_cam",
                                    "score_cam", "ablation_cam"])
def test_automatic_layer_does_not_depend_on_inplace(method):
    x = _images(2, 3, 8, 8)
    inplace, plain = _conv_relu(True), _conv_relu(False)
    assert find_saliency_layer(inplace, x) == find_saliency_layer(plain, x) == "3"
    torch.testing.assert_close(trl.METHODS[method](inplace, x, [1, 3]),
                               trl.METHODS[method](plain, x, [1, 3]))
    # Eigen-CAM reads the activation only: post-ReLU, so no negative value enters it.
    assert (trl.eigen_cam(inplace, x, 1, saliency_layer="3")
            == trl.eigen_cam(inplace, x, 1)).all()


def test_identity_after_a_layer_still_only_renames_it():
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.Dropout(0.5), nn.Flatten(),
                          nn.LazyLinear(5)).eval()
    x = _images(2, 3, 8, 8)
    model(x)
    assert find_saliency_layer(model, x) == "0"


# A patch grid that contradicts the model's declared prefix tokens: grid=(3, 3) on a ViT with
# 16 patches and a class token took 8 of its 17 tokens for prefix tokens and made a 3×3 map.

@pytest.mark.parametrize("method, options", [
    ("attention_rollout", dict(grid=(3, 3))), ("grad_rollout", dict(grid=(3, 3))),
    ("grad_cam", dict(tokens=TokenLayout(grid=(3, 3)))),
    ("score_cam", dict(tokens=TokenLayout(grid=(3, 3))))])
def test_grid_contradicting_the_models_prefix_tokens_is_refused(small_vit, method, options):
    with pytest.raises(ValueError, match=r"tokens: the grid \(3, 3\) leaves 8 of the layer's 17 "
                       r"tokens as prefix tokens, but VisionTransformer declares 1 \(class / "
                       r"register tokens\); check the grid, or give the prefix count too"):
        trl.METHODS[method](small_vit, _images(2, 3, 32, 32), 1, **options)


def test_grid_with_the_prefix_count_given_is_taken_as_said(small_vit):
    x = _images(2, 3, 32, 32)
    assert trl.attention_rollout(small_vit, x, grid=(3, 3), num_prefix_tokens=8).shape == \
        (2, 1, 3, 3)
    torch.testing.assert_close(trl.grad_cam(small_vit, x, 1, tokens=TokenLayout(grid=(4, 4))),
                               trl.grad_cam(small_vit, x, 1))


# A model whose convolutions all sit in a torch.compile'd sub-module: "could not choose
# saliency_layer automatically: no sub-module ... outputs a tensor (N, C, *spatial)" read as if
# the model had none; the message names the compiled sub-module now.

def test_automatic_layer_names_the_compiled_sub_module_it_cannot_see():
    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.compile(_convnet(), backend="eager")

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(ValueError, match=r"the layers inside 'inner' \(torch.compile\) cannot "
                       r"be seen \(hooks do not reach into compiled or scripted modules\): "
                       r"explain the uncompiled model, or name a layer outside them"):
        trl.grad_cam_plus_plus(Outer(), _images(2, 3, 8, 8), 1)


# A target list of 0-d integer tensors (list(t) of a 1-D tensor, [y.argmax() for y in ...]) was
# refused as "found the Tensor tensor(1)"; it is one class per sample, as the ints are.

@pytest.mark.parametrize("method", ["gradient", "grad_cam_plus_plus", "occlusion",
                                    "integrated_gradients", "score_cam", "lrp"])
def test_target_list_of_0d_integer_tensors(method):
    model, x = _convnet(), _images(2, 3, 8, 8)
    expected = trl.METHODS[method](model, x, [1, 3])
    for target in (list(torch.tensor([1, 3])), [torch.tensor(1, dtype=torch.int32), 3]):
        assert torch.equal(trl.METHODS[method](model, x, target), expected)
    with pytest.raises(ValueError, match=r"target sequence must hold integer class indices, "
                       r"found the Tensor tensor\(1.\)"):
        trl.METHODS[method](model, x, [torch.tensor(1.0), 3])


# LRPContext without model=, a loop over batches in one block: the first layer of the second
# pass got the middle layers' rule instead of the first-layer rule (Flat, z^B), silently.

def _lrp_input_gradient(call, x):
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(call(x)[:, 1].sum(), x)
    return grad


@pytest.mark.parametrize("composite", ["EpsilonPlusFlat", "EpsilonGammaBox"])
def test_lrp_context_without_model_restarts_each_pass(composite):
    model, batches = _convnet(), [_images(2, 3, 8, 8), _images(2, 3, 8, 8) * 2]
    with trl.LRPContext(composite, model=model):
        expected = [_lrp_input_gradient(model, x) for x in batches]
    with trl.LRPContext(composite):
        got = [_lrp_input_gradient(model, x) for x in batches]
    # A forward pass split by hand (features, then the head) is one pass; the features called
    # again start the next.
    features, head = model[:4], model[4:]
    with trl.LRPContext(composite):
        split = [_lrp_input_gradient(lambda x: head(features(x)), x) for x in batches]
    for a, b, c in zip(got, split, expected):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)
    assert not torch.allclose(expected[0], _lrp_input_gradient(model, batches[0]))


def test_smooth_grad_option_given_twice_is_refused():
    with pytest.raises(ValueError, match=r"smooth_grad: 'saliency_layer' given both in "
                       r"method_kwargs and as a keyword argument; give it once"):
        trl.smooth_grad(_convnet(), _images(2, 3, 8, 8), 1, "grad_cam", n_samples=2,
                        method_kwargs=dict(saliency_layer="0"), saliency_layer="2")
