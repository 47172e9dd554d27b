"""Hostile inputs, fourth sweep: what the third sweep found and left (see test_hostile_sweep3)."""
from __future__ import annotations

import inspect
import re

import pytest
import torch

import torchray_like as trl
from tests.transformer_models import make_vit
from torchray_like.attribution.context import NoRuleAppliedError
from torchray_like.attribution.excitation_backprop import ExcitationBackpropContext
from torchray_like.attribution.inputs import InferenceModeError
from torchray_like.attribution.lrp_rules import ModifiedWeightError

pytestmark = pytest.mark.usefixtures("one_thread")
nn = torch.nn
_TRANSFORMER_METHODS = {"attention_rollout", "attention_flow", "grad_rollout", "attn_lrp",
                        "cp_lrp"}


@pytest.fixture(scope="module")
def small_vit():
    return make_vit()  # 32² images, 8² patches, 5 classes


def _images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _convnet(seed: int = 0, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, 4, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


# ---------------------------------------------------------------------------------------------
# LRPContext(composite, model=A) with a model B called in the block: passes were delimited by
# A's forward pre-hook only, so B's second pass lost the first-layer rule (Flat / z^B), silently.

def _pass(ctx_rules: list, call, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(call(x)[:, 1].sum(), x)
    return grad


@pytest.mark.parametrize("composite", ["EpsilonPlusFlat", "EpsilonGammaBox"])
def test_lrp_context_delimits_passes_of_another_model(composite):
    model_a, model_b = _convnet(0), _convnet(1, width=6)
    batches = [_images(2, 3, 8, 8), _images(2, 3, 8, 8) * 2]
    calls = [model_a, model_b, model_b, model_a, model_b]
    with trl.LRPContext(composite, model=model_a) as shared:
        got = [_pass(shared.rules, m, x) for m, x in zip(calls, batches * 3)]
    expected, rules = [], []
    for m, x in zip(calls, batches * 3):  # each model with its own context, one pass each
        with trl.LRPContext(composite, model=m) as own:
            expected.append(_pass(own.rules, m, x))
        rules += own.rules
    assert shared.rules == rules
    first = rules[0][1]
    assert [r for (_, r) in rules[::3]] == [first] * 5  # every pass's first layer
    assert first != rules[1][1]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    # The model's own call after another model's is a new pass too, and the other model's
    # layers split by hand (features, then head) stay one pass.
    features, head = model_b[:4], model_b[4:]
    with trl.LRPContext(composite, model=model_a) as split:
        _pass(split.rules, lambda x: head(features(x)), batches[0])
        _pass(split.rules, lambda x: head(features(x)), batches[1])
    assert split.rules == rules[3:9]


# ---------------------------------------------------------------------------------------------
# A model wrapping its body in torch.utils.checkpoint(use_reentrant=True): the rule methods said
# "replaced no ReLU" (the ReLUs run under no_grad in the checkpoint's first pass).

class _ReentrantCheckpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _convnet()

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(self.body, x, use_reentrant=True)


@pytest.mark.filterwarnings("ignore:ExcitationBackpropContext. the model calls an operation")
@pytest.mark.parametrize("method, context, advice", [
    ("guided_backprop", "GuidedBackpropContext", "checkpoint with use_reentrant=False"),
    ("deconvnet", "DeConvNetContext", "checkpoint with use_reentrant=False"),
    ("excitation_backprop", "ExcitationBackpropContext",
     "excitation backprop refuses any activation checkpoint, so run the model without"),
    ("lrp", "LRPContext", "LRP refuses any activation checkpoint, so run the model without"),
    ("attn_lrp", "TransformerLRPContext", "LRP refuses any activation checkpoint")])
def test_rule_methods_name_the_reentrant_checkpoint(method, context, advice):
    model, x = _ReentrantCheckpointed().eval(), _images(2, 3, 8, 8)
    with pytest.raises(NoRuleAppliedError, match=(
            rf"^{context} replaced no .* in _ReentrantCheckpointed's forward pass because the "
            r"model runs them inside torch.utils.checkpoint\(use_reentrant=True\), whose first "
            rf"pass runs the checkpointed layers under torch.no_grad\(\) .*: {advice}")):
        trl.METHODS[method](model, x, 1)
    assert isinstance(trl.METHODS[method](model.body, x, 1), torch.Tensor)  # without: fine


# ---------------------------------------------------------------------------------------------
# A method inside torch.inference_mode() raised a RuntimeError; the refusals of a caller's state
# are ValueErrors that stay RuntimeErrors (InferenceModeError, ModifiedWeightError,
# ContextActiveError derive from both), with the same messages.

_INFERENCE = (r"^attribution needs autograd, which torch.inference_mode\(\) disables; call it "
              r"outside the inference_mode block \(torch.no_grad\(\) is fine\)$")
_NO_AUTOGRAD = {"rise", "occlusion", "attention_rollout", "attention_flow"}  # run as they are


@pytest.mark.parametrize("method", sorted(set(trl.METHODS) - _NO_AUTOGRAD))
def test_inference_mode_is_a_value_error_and_a_runtime_error(method, small_vit):
    model, x = ((small_vit, _images(2, 3, 32, 32)) if method in _TRANSFORMER_METHODS
                else (_convnet(), _images(2, 3, 12, 12)))
    for kind in (ValueError, RuntimeError, InferenceModeError):
        with torch.inference_mode(), pytest.raises(kind, match=_INFERENCE):
            trl.METHODS[method](model, x, 1)
    try:  # both spellings of the caller's except clause
        with torch.inference_mode():
            trl.METHODS[method](model, x, 1)
    except ValueError as exc:
        assert isinstance(exc, RuntimeError) and type(exc) is trl.InferenceModeError


def test_methods_without_autograd_run_in_inference_mode():
    model, x = _convnet(), _images(2, 3, 12, 12)
    with torch.inference_mode():
        got = trl.occlusion(model, x, 1)
    torch.testing.assert_close(got, trl.occlusion(model, x, 1))


@pytest.mark.parametrize("context", ["LRPContext", "ExcitationBackpropContext"])
def test_weight_changed_before_backward_is_a_value_error_too(context):
    model = _convnet()
    x = _images(1, 3, 8, 8).requires_grad_()
    builder = trl.LRPContext if context == "LRPContext" else ExcitationBackpropContext
    with builder():
        y = model(x)
    with torch.no_grad():
        model[0].weight.mul_(2)
    with pytest.raises(ModifiedWeightError, match=r"weight .*modified in place between the "
                       r"forward pass and backward; run the forward pass again") as info:
        y[0, 1].backward()
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_context_entered_twice_is_a_value_error_too():
    ctx = trl.LRPContext()
    with ctx:
        for kind in (ValueError, RuntimeError):
            with pytest.raises(kind, match=r"^LRPContext is already active; create a new "
                               r"context object to nest contexts"):
                ctx.__enter__()


# ---------------------------------------------------------------------------------------------
# debug="x" and resize_mode="foo" (with resize=False, the default) passed unnoticed.

def _takes(method: str, option: str) -> bool:
    params = inspect.signature(trl.METHODS[method]).parameters
    return option in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _model_input(method: str, vit: nn.Module):
    if method in _TRANSFORMER_METHODS:
        return vit, _images(2, 3, 32, 32)
    return _convnet(), _images(2, 3, 12, 12)


@pytest.mark.filterwarnings("ignore:extremal_perturbation. sigma")  # the 12² test images
@pytest.mark.parametrize("method", sorted(trl.METHODS))
def test_debug_and_resize_mode_are_checked_whatever_the_other_options(method, small_vit):
    model, x = _model_input(method, small_vit)
    fn = trl.METHODS[method]
    assert _takes(method, "resize_mode"), method
    for options in (dict(resize_mode="foo"), dict(resize_mode="foo", resize=False),
                    dict(resize_mode="foo", resize=True)):
        with pytest.raises(ValueError, match=r"^resize_mode must be one of linear/bilinear/"
                           r"trilinear, bicubic \(2-D\), nearest, nearest-exact, area; "
                           r"got 'foo'$"):
            fn(model, x, 1, **options)
    with pytest.raises(TypeError, match=r"^resize_mode must be a string, one of linear/"
                       r"bilinear/trilinear, .*; got \['bilinear'\]$"):
        fn(model, x, 1, resize_mode=["bilinear"])
    if _takes(method, "debug"):
        for value in ("x", 1, None):
            with pytest.raises(TypeError, match=rf"^debug must be True or False, got "
                               rf"{re.escape(repr(value))}$"):
                fn(model, x, 1, debug=value)


# ---------------------------------------------------------------------------------------------
# A callable target returning integer scores: occlusion and score_cam took the truncated scores
# (silently wrong), the gradient methods said the scores "do not depend on the input".

def _rounded(out: torch.Tensor) -> torch.Tensor:
    return (out[:, 1] * 100).long()


_CNN_METHODS = sorted(set(trl.METHODS) - _TRANSFORMER_METHODS)
# The backpropagation methods read the target through one shared seed: no method name there.
_GRADIENT_TARGETS = {"gradient", "guided_backprop", "deconvnet", "linear_approx", "grad_cam",
                     "guided_grad_cam", "excitation_backprop", "contrastive_excitation_backprop",
                     "gradient_x_input", "smooth_grad", "grad_cam_plus_plus", "layer_cam",
                     "xgrad_cam", "hires_cam", "eigen_cam", "lrp", "lrp_epsilon_plus",
                     "lrp_epsilon_plus_flat", "lrp_epsilon_alpha2_beta1", "lrp_epsilon_gamma_box"}


@pytest.mark.filterwarnings("ignore:extremal_perturbation. sigma")
@pytest.mark.parametrize("method", _CNN_METHODS)
@pytest.mark.parametrize("target", [_rounded, lambda out: out[:, 1] > 0])
def test_callable_target_with_integer_scores_is_refused(method, target):
    model, x = _convnet(), _images(2, 3, 12, 12)
    name = "" if method in _GRADIENT_TARGETS else f"{method}: "
    with pytest.raises(TypeError, match=rf"^{name}target is a callable that returned scores of "
                       r"dtype torch.(int64|bool); scores must be floating point \(an integer "
                       r"or boolean score is already rounded"):
        trl.METHODS[method](model, x, target)


def test_callable_score_with_integer_scores_is_refused():
    model, x = _convnet(), _images(2, 3, 12, 12)
    with pytest.raises(TypeError, match=r"^score is a callable that returned scores of dtype "
                       r"torch.int64; .* e.g. score=lambda out: out.softmax\(1\)"):
        trl.rise(model, x, 1, num_masks=8, score=lambda out: (out * 100).long())


def test_float_callable_target_still_gives_the_class_map():
    model, x = _convnet(), _images(2, 3, 12, 12)
    for method in ("occlusion", "score_cam", "gradient"):
        torch.testing.assert_close(trl.METHODS[method](model, x, lambda out: out[:, 1]),
                                   trl.METHODS[method](model, x, 1))


@pytest.mark.parametrize("flag", ["enable", "debug", "signed"])
def test_excitation_backprop_context_flags_are_bools(flag):
    # Before: bool("no") is True (debug="no" printed the debug notes; enable="no" enabled).
    from torchray_like.attribution.excitation_backprop import ExcitationBackpropContext
    with pytest.raises(TypeError, match=f"ExcitationBackpropContext: {flag} must be True or "
                                        "False, got 'no'"):
        ExcitationBackpropContext(**{flag: "no"})
    assert getattr(ExcitationBackpropContext(**{flag: False}), flag) is False
