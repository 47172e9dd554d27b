"""The physical forms of an input tensor and the containers of a model output, for every entry
of METHODS and for ``explain``.

A form of the input (channels-last storage, a strided or expanded view, a tensor that requires
grad, a non-leaf with a graph, an ``nn.Parameter``, a tensor subclass, a view the caller keeps)
gives the map of the plain case — a contiguous float32 leaf that does not require grad — bit
for bit, except channels-last storage, where convolutions sum in another order (float
rounding, the tolerance of ``tests/test_batch_sweep.py``).  A dtype other than the model's is
refused by every entry with the same class of answer (a ValueError saying to cast).  The
caller's tensor is left exactly as it was: values, ``requires_grad``, ``.grad``, ``is_leaf``,
``grad_fn``, strides and ``_version``; the model's state too.

A model output in a container (tuple, dict, namedtuple, a ModelOutput-like object) is refused
with a TypeError saying to pass a callable target, and with that callable gives the plain
model's map; ``(N, K, 1, 1)`` logits are class scores; ``(N,)`` and ``(N, 1)`` heads are the
same binary head; a detached head is refused by the methods that differentiate (the
forward-only ones, RISE, occlusion, Score-CAM and Ablation-CAM, need no gradient and give the
plain map); an integer output (an argmax head, one-hot labels) is refused by every entry.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any, Callable, Dict, Optional

import pytest
import torch
import torch.nn as nn
from torchvision import tv_tensors

from tests.conftest import assert_same_state, snapshot
from tests.test_batch_sweep import GENERIC, LAYERS, conv_net, options
from tests.transformer_models import make_vit
from torchray_like.attribution import METHODS
from torchray_like.attribution.driver import detach_all
from torchray_like.attribution.explain import explain
from torchray_like.attribution.registry import TRANSFORMER_ONLY_METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = [1, 2]
#: Entries that only run the model forward (no gradient): a detached head is no obstacle.
FORWARD_ONLY = {"rise", "occlusion", "score_cam", "ablation_cam"}


def image(dims: int = 2, seed: int = 1) -> torch.Tensor:
    # A generator of its own: the global RNG is part of the state a call must leave alone.
    return torch.rand((2, 3) + LAYERS[dims][2], generator=torch.Generator().manual_seed(seed))


def run(name: str, model: nn.Module, x: torch.Tensor, target: Any = TARGETS,
        like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``METHODS[name]`` with the fast options of test_batch_sweep (drawn for ``like``'s shape:
    SmoothGrad's noise bank, EP's seed), notes about small inputs silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return METHODS[name](model, x, target, **options(name, x if like is None else like))


_PLAIN: Dict[tuple, torch.Tensor] = {}


def plain_map(name: str, dims: int = 2) -> torch.Tensor:
    """The plain case's map (computed once per entry and rank)."""
    key = (name, dims)
    if key not in _PLAIN:
        _PLAIN[key] = run(name, conv_net(dims), image(dims))
    return _PLAIN[key]


def assert_same_map(out: torch.Tensor, ref: torch.Tensor, exact: bool, what: str) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    if exact:
        assert torch.equal(out, ref), f"{what}: max diff {(out - ref).abs().max().item():.3g}"
    else:  # test_batch_sweep's tolerances: relative 1e-5 of the map's largest value, and
        # absolute 2e-6 for occlusion, whose maps are differences of scores of order 1
        scale = ref.abs().max().item()
        atol = max(1e-5 * scale, 2e-6 if what.startswith("occlusion") else 0.0) + 1e-30
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol,
                                   msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# Input forms
# ---------------------------------------------------------------------------------------------


class Trivial(torch.Tensor):
    """A tensor subclass that keeps its type through every op (the default
    ``__torch_function__``)."""


def strided(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a view with strides 2 on the spatial axes (a slice of a larger tensor)."""
    big = torch.full((x.shape[0], x.shape[1]) + tuple(2 * s for s in x.shape[2:]), -7.0)
    index = (slice(None), slice(None)) + (slice(None, None, 2),) * (x.dim() - 2)
    big[index] = x
    return big[index]


def transposed(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the transpose of a contiguous transposed copy (strides swapped)."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def leaf_with_grad(x: torch.Tensor) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    leaf.grad = torch.full_like(leaf, 0.25)
    return leaf


def non_leaf(x: torch.Tensor) -> torch.Tensor:
    """``w * base`` with ``w`` a leaf requiring grad: the caller's graph must not grow."""
    return torch.ones((), requires_grad=True) * x


INPUT_FORMS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "strided_slice": strided,
    "transposed": transposed,
    "leaf_with_grad": leaf_with_grad,
    "non_leaf": non_leaf,
    "parameter": lambda x: nn.Parameter(x.clone()),
    "subclass": lambda x: x.clone().as_subclass(Trivial),
    # torchvision's transforms v2 image: a subclass whose ops return plain tensors.
    "tv_image": lambda x: tv_tensors.Image(x.clone()),
}


def tensor_state(x: torch.Tensor) -> Dict[str, Any]:
    """Everything of the caller's tensor a call must leave alone."""
    grad = x.grad if x.is_leaf else None
    return {"values": x.detach().clone(), "requires_grad": x.requires_grad,
            "grad": None if grad is None else (grad, grad.clone()), "is_leaf": x.is_leaf,
            "grad_fn": x.grad_fn, "stride": x.stride(), "version": x._version,
            "channels_last": x.is_contiguous(memory_format=torch.channels_last),
            "type": type(x)}


def assert_tensor_unchanged(x: torch.Tensor, before: Dict[str, Any]) -> None:
    after = tensor_state(x)
    assert torch.equal(after["values"], before["values"])
    for key in ("requires_grad", "is_leaf", "stride", "version", "channels_last", "type"):
        assert after[key] == before[key], key
    assert after["grad_fn"] is before["grad_fn"]
    if before["grad"] is None:
        assert after["grad"] is None
    else:  # the same .grad tensor, with the same values
        assert after["grad"][0] is before["grad"][0]
        assert torch.equal(after["grad"][0], before["grad"][1])


@pytest.mark.parametrize("form", list(INPUT_FORMS))
@pytest.mark.parametrize("name", GENERIC)
def test_input_form_gives_the_plain_map(name, form):
    model, x = conv_net(2), INPUT_FORMS[form](image())
    view = x[0]  # a view the caller keeps
    view_before = view.detach().clone()
    before, state = tensor_state(x), snapshot(model)
    out = run(name, model, x, like=image())
    assert_same_map(out, plain_map(name), form != "channels_last", f"{name} {form}")
    assert_tensor_unchanged(x, before)
    assert torch.equal(view, view_before)
    assert_same_state(state, snapshot(model))
    if form == "non_leaf":  # the caller's graph was not extended nor backpropagated into
        assert x.grad_fn.next_functions[0][0].variable.grad is None


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name", GENERIC)
def test_forms_of_signals_and_volumes(name, dims):
    """1-D signals and 3-D volumes: the strided, transposed, grad-requiring and Parameter
    forms, and a channels-last-3d volume."""
    base = image(dims)
    forms = ["strided_slice", "transposed", "leaf_with_grad", "non_leaf", "parameter"]
    if dims == 3:
        forms.append("channels_last_3d")
    for form in forms:
        x = (base.contiguous(memory_format=torch.channels_last_3d) if form == "channels_last_3d"
             else INPUT_FORMS[form](base))
        before = tensor_state(x)
        out = run(name, conv_net(dims), x, like=base)
        assert_same_map(out, plain_map(name, dims), form != "channels_last_3d",
                        f"{name} {dims}-D {form}")
        assert_tensor_unchanged(x, before)


class InPlaceInput(nn.Module):
    """Normalises its input in place (``x.sub_().div_()``) before a small CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.sub_(0.5).div_(0.25))


@pytest.mark.parametrize("name", GENERIC)
def test_expanded_input_and_a_model_writing_into_its_input(name):
    """``x.expand(2, ...)`` of one image (stride 0 on the batch axis) through a model that
    writes into its input: the map of the contiguous copy, both rows identical, and neither
    the expanded tensor nor a contiguous one is written into."""
    one = image()[:1]
    expanded = one.expand(2, -1, -1, -1)
    model = InPlaceInput().eval()
    contiguous = expanded.contiguous()
    before_one, before_c = one.clone(), tensor_state(contiguous)
    ref = run(name, model, contiguous, [1, 1], like=contiguous)
    out = run(name, model, expanded, [1, 1], like=contiguous)
    assert_same_map(out, ref, True, f"{name} expand")
    if name not in ("smooth_grad", "extremal_perturbation"):  # per-row noise / jitter seeds
        # Up to rounding: the forward batches of the perturbation methods and integrated
        # gradients' internal batches hold the two rows at different positions.
        assert_same_map(out[1], out[0], False, f"{name} rows")
    assert torch.equal(one, before_one) and expanded.stride()[0] == 0
    assert_tensor_unchanged(contiguous, before_c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", GENERIC)
def test_other_dtype_than_the_model_is_refused_alike(name, dtype):
    """The same answer from every entry: a ValueError naming both dtypes and the cast."""
    x = image().to(dtype)
    before = tensor_state(x)
    short = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"input is {short} but the model's parameters are "
                                         r"float32: pass x\.to\(torch\.float32\)"):
        run(name, conv_net(2), x, like=image())
    assert_tensor_unchanged(x, before)


# ---------------------------------------------------------------------------------------------
# Output forms
# ---------------------------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", "logits features")


@dataclasses.dataclass
class ModelOutput:
    """Like HuggingFace's ModelOutput: the logits as an attribute."""

    logits: torch.Tensor
    aux: Optional[torch.Tensor] = None


class Wrapped(nn.Module):
    """The small CNN of the plain case (the same modules, so the same automatic layer) with
    its output put in another form."""

    def __init__(self, form: str) -> None:
        super().__init__()
        net = conv_net(2)
        self.body, self.head, self.form = net[:4], net[4:], form

    def forward(self, x: torch.Tensor) -> Any:
        features = self.body(x)
        y = self.head(features)
        return {"tuple": lambda: (y, features), "list": lambda: [y, features],
                "dict": lambda: {"logits": y, "aux": features},
                "namedtuple": lambda: Pair(y, features),
                "model_output": lambda: ModelOutput(y, features),
                "nk11": lambda: y[:, :, None, None], "n": lambda: y[:, 1],
                "n1": lambda: y[:, 1:2], "detached": lambda: y.detach(),
                "argmax": lambda: y.argmax(1),
                "one_hot": lambda: nn.functional.one_hot(y.argmax(1), 4)}[self.form]()


#: How a callable target reads class 1's logit from each container.
PICK: Dict[str, Callable[[Any], torch.Tensor]] = {
    "tuple": lambda out: out[0][:, 1], "list": lambda out: out[0][:, 1],
    "dict": lambda out: out["logits"][:, 1],
    "namedtuple": lambda out: out.logits[:, 1], "model_output": lambda out: out.logits[:, 1]}

_CALLABLE_PLAIN: Dict[str, torch.Tensor] = {}


@pytest.mark.parametrize("form", list(PICK))
@pytest.mark.parametrize("name", GENERIC)
def test_container_outputs_need_a_callable_target(name, form):
    model = Wrapped(form).eval()
    state = snapshot(model)
    with pytest.raises(TypeError, match=r"not a tensor.*callable target"):
        run(name, model, image())
    if name not in _CALLABLE_PLAIN:
        _CALLABLE_PLAIN[name] = run(name, conv_net(2), image(), lambda out: out[:, 1])
    out = run(name, model, image(), PICK[form])
    assert_same_map(out, _CALLABLE_PLAIN[name], False, f"{name} {form} callable")
    assert_same_state(state, snapshot(model))


@pytest.mark.parametrize("name", GENERIC)
def test_score_map_and_binary_heads(name):
    """``(N, K, 1, 1)`` logits are the ``(N, K)`` scores (RISE's softmax needs ``(N, K)``: a
    clear refusal naming ``score``); ``(N,)`` and ``(N, 1)`` single-logit heads give the same
    maps and refuse a class other than 0/1."""
    if name == "rise":
        with pytest.raises(ValueError, match=r"score='softmax' needs \(batch, classes\).*"
                                             r"score=callable"):
            run(name, Wrapped("nk11").eval(), image())
    else:
        assert_same_map(run(name, Wrapped("nk11").eval(), image()), plain_map(name), True,
                        f"{name} (N, K, 1, 1)")
    n = run(name, Wrapped("n").eval(), image(), [1, 0])
    n1 = run(name, Wrapped("n1").eval(), image(), [1, 0])
    assert_same_map(n, n1, True, f"{name} (N,) vs (N, 1)")
    assert n.shape == (2, 1, 12, 12) and bool(torch.isfinite(n).all())
    for form in ("n", "n1"):
        with pytest.raises(ValueError, match=r"target class 2 is out of range: a single-logit"):
            run(name, Wrapped(form).eval(), image())


@pytest.mark.parametrize("name", GENERIC)
def test_detached_head(name):
    model = Wrapped("detached").eval()
    if name in FORWARD_ONLY:  # scores only: the plain map
        assert_same_map(run(name, model, image()), plain_map(name), True, f"{name} detached")
        return
    with pytest.raises(ValueError, match=r"(does|do) not depend on .*through autograd"):
        run(name, model, image())


@pytest.mark.parametrize("form", ["argmax", "one_hot"])
@pytest.mark.parametrize("name", GENERIC)
def test_integer_outputs_are_refused(name, form):
    """An argmax head (read as a single-logit head before) and one-hot labels (read as class
    scores by the perturbation methods, which returned maps): a TypeError naming the dtype."""
    model = Wrapped(form).eval()
    state = snapshot(model)
    for target in (TARGETS, [1, 0]):
        with pytest.raises(TypeError, match=r"the model output has dtype torch\.int64 .*must "
                                            r"be floating point.*return the logits"):
            run(name, model, image(), target)
    assert_same_state(state, snapshot(model))


class LayoutSensitive(nn.Module):
    """Takes another path on a channels-last batch (its numbers change by 1) and returns a
    dataclass: the perturbation methods' check of the channels-last layout must compare the
    dataclass's fields (it compared the type only, and RISE and occlusion gave maps off by
    the shift)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net(2)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        y = self.net(x)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y + 1.0
        return ModelOutput(y)


@pytest.mark.parametrize("name", ["rise", "occlusion", "score_cam"])
def test_layout_check_reads_a_dataclass_output(name):
    ref = run(name, conv_net(2), image(), lambda out: out[:, 1])
    out = run(name, LayoutSensitive().eval(), image(), PICK["model_output"])
    assert_same_map(out, ref, False, f"{name} layout-sensitive dataclass")


# ---------------------------------------------------------------------------------------------
# explain, and the transformer-only entries on a ViT
# ---------------------------------------------------------------------------------------------

EXPLAIN = ["gradient", "guided_backprop", "grad_cam", "eigen_cam", "lrp", "occlusion", "rise",
           "extremal_perturbation", "integrated_gradients"]


def run_explain(model: nn.Module, x: torch.Tensor, target: Any = TARGETS) -> Dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explain(model, x, target, EXPLAIN,
                       {n: options(n, image()) for n in EXPLAIN if options(n, image())})


def test_explain_input_forms():
    plain = run_explain(conv_net(2), image())
    for form in ("channels_last", "strided_slice", "leaf_with_grad", "non_leaf", "parameter"):
        x = INPUT_FORMS[form](image())
        before = tensor_state(x)
        out = run_explain(conv_net(2), x)
        for name in EXPLAIN:
            assert_same_map(out[name], plain[name], form != "channels_last",
                            f"explain {name} {form}")
        assert_tensor_unchanged(x, before)
    with pytest.raises(ValueError, match=r"input is float64 .*pass x\.to\(torch\.float32\)"):
        run_explain(conv_net(2), image().double())


def test_explain_output_forms():
    plain = run_explain(conv_net(2), image(), lambda out: out[:, 1])
    with pytest.raises(TypeError, match=r"not a tensor.*callable target"):
        run_explain(Wrapped("dict").eval(), image())
    out = run_explain(Wrapped("dict").eval(), image(), PICK["dict"])
    for name in EXPLAIN:
        assert_same_map(out[name], plain[name], False, f"explain {name} dict")
    for form in ("argmax", "one_hot"):
        with pytest.raises(TypeError, match=r"dtype torch\.int64 .*must be floating point"):
            run_explain(Wrapped(form).eval(), image())


@pytest.fixture(scope="module")
def small_vit() -> nn.Module:
    return make_vit()


@pytest.mark.parametrize("name", sorted(TRANSFORMER_ONLY_METHODS))
def test_transformer_only_entries_input_forms(name, small_vit):
    torch.manual_seed(2)
    base = torch.rand(2, 3, 32, 32)
    target = None if name in ("attention_rollout", "attention_flow") else [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = METHODS[name](small_vit, base, target)
        for form in ("channels_last", "strided_slice", "leaf_with_grad", "non_leaf",
                     "parameter"):
            x = INPUT_FORMS[form](base)
            before = tensor_state(x)
            assert_same_map(METHODS[name](small_vit, x, target), ref,
                            form != "channels_last", f"{name} {form}")
            assert_tensor_unchanged(x, before)
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            short = str(dtype).replace("torch.", "")
            with pytest.raises(ValueError, match=rf"input is {short} .*pass x\.to\(torch\.float32"):
                METHODS[name](small_vit, base.to(dtype), target)


class WrappedViT(nn.Module):
    """The small ViT with its output in another form."""

    def __init__(self, vit: nn.Module, form: str) -> None:
        super().__init__()
        self.vit, self.form = vit, form

    def forward(self, x: torch.Tensor) -> Any:
        y = self.vit(x)
        return {"dict": lambda: {"logits": y}, "model_output": lambda: ModelOutput(y),
                "detached": lambda: y.detach(), "argmax": lambda: y.argmax(1)}[self.form]()


#: The rollouts read the attention alone: the output's form does not matter to them.
CLASS_AGNOSTIC = {"attention_rollout", "attention_flow"}


@pytest.mark.parametrize("name", sorted(TRANSFORMER_ONLY_METHODS))
def test_transformer_only_entries_output_forms(name, small_vit):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = METHODS[name](small_vit, x, lambda out: out[:, 1])
        for form in ("dict", "model_output"):
            model = WrappedViT(small_vit, form)
            if name in CLASS_AGNOSTIC:
                assert_same_map(METHODS[name](model, x, TARGETS), ref, True, f"{name} {form}")
            else:
                with pytest.raises(TypeError, match=r"not a tensor.*callable target"):
                    METHODS[name](model, x, TARGETS)
            assert_same_map(METHODS[name](model, x, PICK[form]), ref, False, f"{name} {form}")
        detached = WrappedViT(small_vit, "detached")
        if name in CLASS_AGNOSTIC:
            assert_same_map(METHODS[name](detached, x, TARGETS), ref, True, f"{name} detached")
        else:  # grad_rollout raised autograd's RuntimeError
            with pytest.raises(ValueError, match=r"does not depend on the input through autograd"):
                METHODS[name](detached, x, TARGETS)
        # A target is read against an integer output: its dtype is named, not the binary rule.
        with pytest.raises(TypeError, match=r"dtype torch\.int64 .*must be floating point"):
            METHODS[name](WrappedViT(small_vit, "argmax"), x, TARGETS)


VIT_EXPLAIN = ["attention_rollout", "attention_flow", "grad_rollout", "cp_lrp", "attn_lrp",
               "gradient", "grad_cam"]


def test_explain_on_a_vit_input_and_output_forms(small_vit):
    base = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = explain(small_vit, base, TARGETS, VIT_EXPLAIN)
        for form in ("channels_last", "strided_slice", "non_leaf", "leaf_with_grad",
                     "parameter", "tv_image"):
            x = INPUT_FORMS[form](base)
            before = tensor_state(x)
            out = explain(small_vit, x, TARGETS, VIT_EXPLAIN)
            for name in VIT_EXPLAIN:
                assert_same_map(out[name], ref[name], form != "channels_last",
                                f"explain {name} {form}")
            assert_tensor_unchanged(x, before)
        with pytest.raises(TypeError, match=r"not a tensor.*callable target"):
            explain(WrappedViT(small_vit, "dict"), base, TARGETS, VIT_EXPLAIN)
        ref = explain(small_vit, base, lambda out: out[:, 1], VIT_EXPLAIN)
        out = explain(WrappedViT(small_vit, "dict"), base, PICK["dict"], VIT_EXPLAIN)
    for name in VIT_EXPLAIN:
        assert_same_map(out[name], ref[name], False, f"explain {name} dict")


# ---------------------------------------------------------------------------------------------
# Found by this sweep and fixed: a subclass's node (context._gradient_node), a namedtuple
# debug record (driver.detach_all), a ViT's automatic layer behind a dataclass, integer or
# detached output (layer_choice)
# ---------------------------------------------------------------------------------------------


def test_debug_record_of_a_namedtuple_output():
    smap, record = METHODS["gradient"](Wrapped("namedtuple").eval(), image(),
                                       PICK["namedtuple"], debug=True)
    assert isinstance(record.output, Pair) and not record.output.logits.requires_grad
    assert_same_map(smap, METHODS["gradient"](conv_net(2), image(), lambda out: out[:, 1]),
                    True, "gradient namedtuple debug")


def test_vit_automatic_layer_with_a_dataclass_output(small_vit):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = METHODS["grad_cam"](WrappedViT(small_vit, "dict"), x, PICK["dict"])
        out = METHODS["grad_cam"](WrappedViT(small_vit, "model_output"), x,
                                  PICK["model_output"])
    assert_same_map(out, ref, True, "grad_cam ViT model_output")


def test_vit_automatic_layer_with_an_integer_output(small_vit):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with pytest.raises(TypeError, match=r"dtype torch\.int64 .*must be floating point"):
        METHODS["grad_cam"](WrappedViT(small_vit, "argmax"), x, TARGETS)


def test_vit_automatic_layer_with_a_detached_output_says_why(small_vit):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"could not choose saliency_layer automatically: "
                                         r"WrappedViT's output does not depend on its input "
                                         r"through autograd \(a detached head"):
        METHODS["grad_cam"](WrappedViT(small_vit, "detached"), x, TARGETS)


def test_detach_all_keeps_the_containers():
    """The debug record's output: every tensor detached, in the container the model made."""
    y = torch.ones(2, 3, requires_grad=True) * 2
    out = detach_all({"a": Pair(y, [y]), "b": ModelOutput(y), "c": (y,)})
    assert isinstance(out["a"], Pair) and isinstance(out["a"].features, list)
    assert isinstance(out["b"], ModelOutput) and isinstance(out["c"], tuple)
    assert not any(t.requires_grad for t in (out["a"].logits, out["a"].features[0],
                                            out["b"].logits, out["c"][0]))


@dataclasses.dataclass(frozen=True)
class Checked:
    """A frozen output whose ``__post_init__`` refuses to be rebuilt by ``replace``."""

    logits: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.logits.requires_grad is False and self.scale == 1.0:
            raise ValueError("rebuilt")


def test_detach_all_of_a_dataclass_replace_refuses():
    y = torch.ones(2, 3, requires_grad=True) * 2
    out = detach_all(Checked(y))
    assert isinstance(out, Checked) and not out.logits.requires_grad
    torch.testing.assert_close(out.logits, y.detach())
