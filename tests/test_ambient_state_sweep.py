"""Every entry of METHODS and ``explain`` called inside the caller's ambient PyTorch state.

The call gives the plain map — the one it gives outside that state, up to the float tolerance
of ``tests/test_batch_sweep.py`` — and the state is the same after the call as before it:

* ``torch.set_default_dtype(torch.float64)`` around a float32 model, a float64 model under the
  default float32 (its map in float64, the float32 map up to rounding);
* the default device (``with torch.device("meta")``, ``torch.set_default_device("meta")``)
  around a CPU model and input;
* the caller's own ``TorchFunctionMode`` and ``TorchDispatchMode`` (a pass-through mode,
  ``FlopCounterMode``) — which still see the model's operations — and ``torch.profiler``;
* grad modes (``no_grad``, ``set_grad_enabled(False)``, ``enable_grad``), anomaly detection,
  saved-tensor hooks (``saved_tensors_hooks``, ``save_on_cpu``), ``forward_ad.dual_level``,
  ``use_deterministic_algorithms(True)``;
* ``torch.autocast("cpu", dtype=torch.bfloat16)``: the documented contract (the model computes
  in bfloat16, the map has the input's dtype), extremal perturbation as with its own
  ``autocast=`` option;
* the user's hooks on the model: forward hooks that change a module's output, forward
  pre-hooks that change its input (``with_kwargs`` too), full backward hooks, and the global
  ones of ``torch.nn.modules.module``.  A hook that changes a value is part of the model: the
  map is that of a plain model computing the same thing (a wrapper module), and the user's
  hooks are all still there after the call, none of ours.

Found and fixed (before):

* under a meta (or any non-CPU) default device, extremal perturbation, SmoothGrad with a seed
  and integrated gradients' uniform baseline raised PyTorch's "Cannot copy out of meta tensor"
  (constants and CPU draws made without ``device=``);
* a noise bank, baseline or RISE mask bank on the meta device (what a bank made under the
  caller's ``with torch.device("meta")`` is) raised PyTorch's errors instead of a ValueError;
* under the caller's autocast, ``smooth=`` returned a bfloat16 map of a float32 input, and
  extremal perturbation raised NumPy's "Got unsupported ScalarType BFloat16";
* on a ViT under ``no_grad`` / ``set_grad_enabled(False)``, the automatic token layer of the
  CAM family, Score-CAM, Ablation-CAM and Eigen-CAM raised PyTorch's "element 0 of tensors does
  not require grad"; with a zero-initialised head under a meta default device, "Cannot copy out
  of meta tensor";
* under ``allow_mutation_on_saved_tensors``, guided backprop raised ``KeyError: 'out'`` (the
  mode reads every ``out=`` argument as ``kwargs["out"]``; the rule's fused op names it
  ``grad_input``).

Measured, not fixed: on this small net bfloat16 autocast moves the gradient-family maps by up
to 11 % of their largest value (correlation with the float32 map > 0.997); occlusion's map
(correlation 0.77) and Ablation-CAM's, differences of scores, come with a warning that the
scores round.

The state a call leaves behind (RNGs, flags, warnings filters, ...) is
``tests/test_ambient_leaks_sweep.py``'s.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
import torch
import torch.nn as nn
from torch.nn.modules import module as nn_module
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import global_hook_counts, hook_counts
from tests.test_batch_sweep import GENERIC, conv_net, options
from tests.test_forms_sweep import assert_same_map
from tests.transformer_models import make_vit
from torchray_like.attribution import METHODS
from torchray_like.attribution.explain import explain
from torchray_like.attribution.extremal_perturbation import extremal_perturbation
from torchray_like.attribution.registry import SHARED_METHODS, TRANSFORMER_ONLY_METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = [1, 2]
ALL = list(METHODS)


def subject(name: str) -> Tuple[nn.Module, torch.Tensor, Dict[str, Any]]:
    """Model, input and options of ``name``, made *outside* any ambient state (a factory
    without ``dtype=`` / ``device=`` under it would make the test's own tensors differ)."""
    g = torch.Generator().manual_seed(1)
    if name in TRANSFORMER_ONLY_METHODS:
        model, x = make_vit(), torch.rand((2, 3, 32, 32), generator=g)
    else:
        model, x = conv_net(2), torch.rand((2, 3, 12, 12), generator=g)
    return model, x, options(name, x)


def call(name: str, model: nn.Module, x: torch.Tensor, opts: Dict[str, Any]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about small inputs / few masks are not the point
        return METHODS[name](model, x, TARGETS, **opts)


_PLAIN: Dict[str, torch.Tensor] = {}


def plain(name: str) -> torch.Tensor:
    if name not in _PLAIN:
        _PLAIN[name] = call(name, *subject(name))
    return _PLAIN[name]


# ---------------------------------------------------------------------------------------------
# The ambient states
# ---------------------------------------------------------------------------------------------


class CountingFunctionMode(TorchFunctionMode):
    """A user's pass-through mode (a logger): counts what it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen += 1
        return func(*args, **(kwargs or {}))


class CountingDispatchMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def default_dtype_float64() -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def set_default_device_meta() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@contextlib.contextmanager
def counting_saved_tensors_hooks() -> Iterator[List[int]]:
    packed: List[int] = []

    def pack(t):
        packed.append(1)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield packed


@contextlib.contextmanager
def default_dtype_bfloat16() -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def warnings_as_errors() -> Iterator[None]:
    """The caller's ``simplefilter("error")``: no warning, PyTorch's own included, reaches it
    from these plain cases (the sweep's calls are not silenced under it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


AMBIENT: Dict[str, Callable[[], Any]] = {
    "default_dtype_float64": default_dtype_float64,
    "with_device_meta": lambda: torch.device("meta"),
    "set_default_device_meta": set_default_device_meta,
    "function_mode": CountingFunctionMode,
    "dispatch_mode": CountingDispatchMode,
    "flop_counter": lambda: FlopCounterMode(display=False),
    "profiler": lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
    "no_grad": torch.no_grad,
    "grad_disabled": lambda: torch.set_grad_enabled(False),
    "enable_grad": torch.enable_grad,
    "detect_anomaly": lambda: torch.autograd.set_detect_anomaly(True),
    "saved_tensors_hooks": counting_saved_tensors_hooks,
    "save_on_cpu": torch.autograd.graph.save_on_cpu,
    "forward_ad_dual_level": torch.autograd.forward_ad.dual_level,
    "deterministic_algorithms": deterministic_algorithms,
    "default_dtype_bfloat16": default_dtype_bfloat16,
    # Before: guided backprop raised KeyError 'out' (the mode reads out= arguments so).
    "allow_mutation_on_saved_tensors": torch.autograd.graph.allow_mutation_on_saved_tensors,
    "disable_saved_tensors_hooks": lambda: torch.autograd.graph.disable_saved_tensors_hooks(
        "the caller forbids saved-tensor hooks"),
    "autograd_multithreading_off": lambda: torch.autograd.set_multithreading_enabled(False),
    "warnings_as_errors": warnings_as_errors,
}


def inner_state() -> Tuple[Any, ...]:
    """What the ambient block set, read inside it: the call must leave it as it found it."""
    return (torch.is_grad_enabled(), torch.is_anomaly_enabled(), torch.get_default_dtype(),
            torch.get_default_device(), torch._C._len_torch_function_stack(),
            torch.are_deterministic_algorithms_enabled(), torch.is_autocast_enabled("cpu"),
            torch._C._autograd._top_saved_tensors_default_hooks(False) is not None)


def assert_saw_the_call(state: str, ctx: Any) -> None:
    """The caller's mode still sees the model's operations (ours are not hidden from it)."""
    if isinstance(ctx, (CountingFunctionMode, CountingDispatchMode)):
        assert ctx.seen > 0, state
    if isinstance(ctx, FlopCounterMode):
        assert ctx.get_total_flops() > 0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("state", AMBIENT)
def test_ambient_state_gives_the_plain_map(state, name):
    model, x, opts = subject(name)
    ref = plain(name)
    with AMBIENT[state]() as ctx:
        before = inner_state()
        out = (METHODS[name](model, x, TARGETS, **opts) if state == "warnings_as_errors"
               else call(name, model, x, opts))
        assert inner_state() == before, f"{name} changed the caller's {state}"
    assert out.device == x.device
    assert_same_map(out, ref, False, f"{name} under {state}")
    assert_saw_the_call(state, ctx)


#: The entries a ViT without ReLU can be explained by (guided backprop and DeConvNet refuse it).
VIT_ENTRIES = [n for n in ALL if n not in ("guided_backprop", "deconvnet", "guided_grad_cam")]
_VIT_PLAIN: Dict[Tuple[str, bool], torch.Tensor] = {}


def vit_subject(name: str, zero_head: bool) -> Tuple[nn.Module, torch.Tensor, Dict[str, Any]]:
    """A small ViT (``zero_head``: its head's weight zero, as torchvision initialises it: the
    automatic token layer then probes the tokens along a fixed random direction; not for the
    transformer-only entries, which read attention rather than a token layer)."""
    model = make_vit()
    if zero_head:
        with torch.no_grad():
            model.heads.head.weight.zero_()
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    return model, x, options(name, x)


@pytest.mark.parametrize("name, zero_head", [(n, z) for n in VIT_ENTRIES for z in (False, True)
                                             if n in GENERIC or not z])
@pytest.mark.parametrize("state", ["no_grad", "grad_disabled", "with_device_meta",
                                   "default_dtype_float64", "function_mode"])
def test_ambient_state_on_a_vit(state, name, zero_head):
    """Token models take other paths (the automatic token layer, attention capture).  Before:
    under no_grad the CAM family, Score-CAM, Ablation-CAM and Eigen-CAM raised PyTorch's
    "element 0 of tensors does not require grad"; with a zero head under a meta default device,
    "Cannot copy out of meta tensor"."""
    key = (name, zero_head)
    if key not in _VIT_PLAIN:
        _VIT_PLAIN[key] = call(name, *vit_subject(name, zero_head))
    model, x, opts = vit_subject(name, zero_head)
    with AMBIENT[state]():
        out = call(name, model, x, opts)
    assert_same_map(out, _VIT_PLAIN[key], False, f"{name} on a ViT under {state}")


@pytest.mark.parametrize("state", AMBIENT)
def test_explain_under_an_ambient_state(state):
    model = conv_net(2)
    x = torch.rand((2, 3, 12, 12), generator=torch.Generator().manual_seed(1))
    ref = explain(model, x, TARGETS)
    with AMBIENT[state]():
        out = explain(model, x, TARGETS)
    assert list(out) == list(ref)
    for label in ref:
        assert_same_map(out[label], ref[label], False, f"explain {label} under {state}")


@pytest.mark.parametrize("state", ["no_grad", "with_device_meta", "default_dtype_float64"])
def test_explain_on_a_vit_under_an_ambient_state(state):
    names = [n for n in VIT_ENTRIES if n in SHARED_METHODS] + list(TRANSFORMER_ONLY_METHODS)
    model, x, _ = vit_subject("gradient", False)
    ref = explain(model, x, TARGETS, names)
    fresh = vit_subject("gradient", False)[0]  # (no cached layer choice)
    with AMBIENT[state]():
        out = explain(fresh, x, TARGETS, names)
    assert list(out) == names
    for label in names:
        assert_same_map(out[label], ref[label], False, f"explain {label} on a ViT under {state}")


@pytest.mark.parametrize("name", ALL)
def test_float64_model_under_the_default_float32(name):
    """The map of a float64 model and input is float64 and the float32 map up to rounding
    (extremal perturbation after one step: its ranking of equal mask values at the start
    follows the rounding, and later steps amplify the difference)."""
    model, x, opts = subject(name)
    if name == "extremal_perturbation":
        opts["max_iter"] = 1
    ref = call(name, model, x, opts)
    opts64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    out = call(name, model.double(), x.double(), opts64)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("state", ["with_device_meta", "set_default_device_meta"])
def test_seeded_draws_under_a_meta_default_device(state):
    """SmoothGrad's noise and integrated gradients' uniform baseline are drawn on the
    generator's device, not the default one (before: "Cannot copy out of meta tensor")."""
    model, x, _ = subject("gradient")
    cases = {"smooth_grad": {"n_samples": 3, "generator": 3},
             "integrated_gradients": {"baseline": "uniform", "n_steps": 4, "generator": 3}}
    refs = {name: call(name, model, x, opts) for name, opts in cases.items()}
    with AMBIENT[state]():
        outs = {name: call(name, model, x, opts) for name, opts in cases.items()}
    for name in cases:
        assert_same_map(outs[name], refs[name], True, f"{name} under {state}")


def test_meta_default_device_options_made_under_it_are_refused_by_name():
    """Tensor options made under the caller's ``with torch.device("meta")`` hold no values:
    a ValueError naming the option (before: PyTorch's errors)."""
    model, x, _ = subject("gradient")
    with torch.device("meta"):
        bank, baseline = torch.zeros((3,) + tuple(x.shape)), torch.zeros(x.shape)
        masks = torch.rand(8, 1, 12, 12)
    cases = [("smooth_grad", {"noise": bank}, "noise"),
             ("integrated_gradients", {"baseline": baseline, "n_steps": 2}, "baseline"),
             ("occlusion", {"baseline": baseline, "window": 3}, "baseline"),
             ("rise", {"filter_masks": masks}, "masks")]
    for name, opts, what in cases:
        with pytest.raises(ValueError, match=f"{what} is on the meta device"):
            METHODS[name](model, x, 1, **opts)


# ---------------------------------------------------------------------------------------------
# The caller's autocast
# ---------------------------------------------------------------------------------------------

#: The entries whose maps are differences of scores: under bfloat16 they say that the scores
#: round (maps.check_precision) rather than being bfloat16's rounding noise silently.
ROUNDING_WARNED = {"occlusion", "ablation_cam"}


@pytest.mark.parametrize("name", ALL)
def test_caller_autocast_keeps_the_input_dtype(name):
    model, x, opts = subject(name)
    ref = plain(name)
    if name in ROUNDING_WARNED:
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                pytest.warns(UserWarning, match=r"output is torch.bfloat16.*rounds"):
            out = METHODS[name](model, x, TARGETS, **opts)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(name, model, x, opts)
        # The same map at bfloat16's precision: well correlated with the float32 one.
        corr = torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1]
        assert float(corr) > 0.99, (name, float(corr))
    assert out.dtype == x.dtype and out.shape == ref.shape and bool(out.isfinite().all())


#: The entries with ``smooth=`` (extremal perturbation's masks are checked on their own).
SMOOTHED = [n for n in GENERIC if "smooth" in inspect.signature(METHODS[n]).parameters
            and n != "extremal_perturbation"]


def test_caller_autocast_smoothing_and_extremal_perturbation():
    model, x, opts = subject("extremal_perturbation")
    own, _ = extremal_perturbation(model, x, TARGETS, autocast=torch.bfloat16, **opts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Before: NumPy's "Got unsupported ScalarType BFloat16" from the mask's ranking.
        caller, _ = extremal_perturbation(model, x, TARGETS, **opts)
        smoothed = {n: call(n, model, x, {**options(n, x), "smooth": 0.1}) for n in SMOOTHED}
        explained = explain(model, x, 1, ["gradient", "grad_cam"],
                            {"gradient": {"smooth": 0.1}, "grad_cam": {"smooth": 0.1}})
    assert torch.equal(own, caller) and caller.dtype == torch.float32
    for label, smap in list(smoothed.items()) + list(explained.items()):
        assert smap.dtype == torch.float32, label  # before: bfloat16 (the blur's product)


# ---------------------------------------------------------------------------------------------
# The user's hooks
# ---------------------------------------------------------------------------------------------


class Wrap(nn.Module):
    """``post(module(pre(x)))``: a plain model computing what a hook makes of ``module``."""

    def __init__(self, module: nn.Module, pre: Callable = lambda t: t,
                 post: Callable = lambda t: t) -> None:
        super().__init__()
        self.module, self.pre, self.post = module, pre, post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.module(self.pre(x)))


def double_input(t: torch.Tensor) -> torch.Tensor:
    return t * 2


def affine_output(t: torch.Tensor) -> torch.Tensor:
    return t * 2 + 0.1


def normalise(t: torch.Tensor) -> torch.Tensor:
    return (t - 0.5) / 0.25


def log_probabilities(t: torch.Tensor) -> torch.Tensor:
    return t.log_softmax(1) * 3


def reference(pre: Callable = lambda t: t, post: Callable = lambda t: t) -> nn.Module:
    model = conv_net(2)
    model[2] = Wrap(model[2], pre, post)
    return model


#: Hook name -> (register it on ``model[2]``, returning the handle; the plain model computing
#: the same thing).  Backward hooks only record: the map is the plain model's.
HOOKS: Dict[str, Tuple[Callable[[nn.Module], Any], Callable[[], nn.Module]]] = {
    "forward_hook": (lambda m: m[2].register_forward_hook(
        lambda mod, i, o: affine_output(o)), lambda: reference(post=affine_output)),
    "forward_hook_with_kwargs": (lambda m: m[2].register_forward_hook(
        lambda mod, a, k, o: affine_output(o), with_kwargs=True),
        lambda: reference(post=affine_output)),
    "forward_hook_always_call": (lambda m: m[2].register_forward_hook(
        lambda mod, i, o: affine_output(o), always_call=True),
        lambda: reference(post=affine_output)),
    "forward_pre_hook": (lambda m: m[2].register_forward_pre_hook(
        lambda mod, a: (double_input(a[0]),)), lambda: reference(pre=double_input)),
    "forward_pre_hook_with_kwargs": (lambda m: m[2].register_forward_pre_hook(
        lambda mod, a, k: ((double_input(a[0]),), k), with_kwargs=True),
        lambda: reference(pre=double_input)),
    "global_forward_hook": (lambda m: nn_module.register_module_forward_hook(
        lambda mod, i, o: affine_output(o) if mod is m[2] else None),
        lambda: reference(post=affine_output)),
    "global_forward_pre_hook": (lambda m: nn_module.register_module_forward_pre_hook(
        lambda mod, a: (double_input(a[0]),) if mod is m[2] else None),
        lambda: reference(pre=double_input)),
    # On the whole model: a normalisation in a pre-hook, log-probabilities in a hook.
    "model_forward_pre_hook": (lambda m: m.register_forward_pre_hook(
        lambda mod, a: (normalise(a[0]),)), lambda: Wrap(conv_net(2), pre=normalise)),
    "model_forward_hook": (lambda m: m.register_forward_hook(
        lambda mod, i, o: log_probabilities(o)), lambda: Wrap(conv_net(2), post=log_probabilities)),
    "full_backward_hook": (lambda m: m[2].register_full_backward_hook(
        lambda mod, gi, go: None), lambda: conv_net(2)),
    "global_full_backward_hook": (lambda m: nn_module.register_module_full_backward_hook(
        lambda mod, gi, go: None), lambda: conv_net(2)),
}


def test_hook_references_differ_from_the_plain_model():
    x = torch.rand((2, 3, 12, 12), generator=torch.Generator().manual_seed(1))
    plain_out = conv_net(2)(x)
    for name, (register, make_reference) in HOOKS.items():
        model = conv_net(2)
        handle = register(model)
        try:
            torch.testing.assert_close(model(x), make_reference()(x))
        finally:
            handle.remove()
        if "backward" not in name:  # otherwise the sweep could not tell a lost hook
            assert not torch.allclose(make_reference()(x), plain_out), name


@pytest.mark.parametrize("name", GENERIC)
@pytest.mark.parametrize("hook", HOOKS)
def test_user_hooks_are_part_of_the_model_and_stay(hook, name):
    register, make_reference = HOOKS[hook]
    model, x, opts = subject(name)
    handle = register(model)
    try:
        hooks, global_hooks = hook_counts(model), global_hook_counts()
        out = call(name, model, x, opts)
        assert hook_counts(model) == hooks and global_hook_counts() == global_hooks
    finally:
        handle.remove()
    assert_same_map(out, call(name, make_reference(), x, opts), False, f"{name} with {hook}")


@pytest.mark.parametrize("name", ["grad_cam", "linear_approx", "score_cam", "eigen_cam",
                                  "excitation_backprop", "lrp"])
def test_a_layer_read_is_the_hooked_module_output(name):
    """A method reading the hooked module itself reads what the hook returns (what the next
    module receives), not the module's output before the hook."""
    model, x, opts = subject(name)
    handle = model[2].register_forward_hook(lambda mod, i, o: affine_output(o))
    try:
        out = call(name, model, x, {**opts, "saliency_layer": model[2]})
    finally:
        handle.remove()
    ref_model = reference(post=affine_output)
    ref = call(name, ref_model, x, {**opts, "saliency_layer": ref_model[2]})
    assert_same_map(out, ref, False, f"{name} at the hooked layer")


class WrapAttention(nn.Module):
    """torchvision's attention module with its output changed as the hook below does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        return (affine_output(out[0]),) + tuple(out[1:])


@pytest.mark.parametrize("name", list(TRANSFORMER_ONLY_METHODS) + ["attn_lrp"])
def test_vit_hooks_on_attention_and_mlp(name):
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    vit, ref_model = make_vit(), make_vit()
    block, ref_block = vit.encoder.layers[0], ref_model.encoder.layers[0]
    handles = [block.self_attention.register_forward_hook(
        lambda mod, i, o: (affine_output(o[0]),) + tuple(o[1:])),
        block.mlp.register_forward_pre_hook(lambda mod, a: (double_input(a[0]),))]
    ref_block.self_attention = WrapAttention(ref_block.self_attention)
    ref_block.mlp = Wrap(ref_block.mlp, pre=double_input)
    try:
        hooks = hook_counts(vit)
        out = call(name, vit, x, {})
        assert hook_counts(vit) == hooks
    finally:
        for handle in handles:
            handle.remove()
    ref = call(name, ref_model, x, {})
    assert_same_map(out, ref, False, f"{name} with hooks")
    assert not torch.allclose(ref, call(name, make_vit(), x, {}))  # the hooks matter
