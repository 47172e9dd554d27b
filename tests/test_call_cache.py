"""One walk of the module tree per call (issue 22), and no stale knowledge between calls.

The per-call checks (model, opaque parts, batch statistics, DataParallel, the state guard,
the first convolution) read one :class:`~torchray_like.attribution.modules.ModelScan` made at
the start of each call and dropped at its end, so a model changed between two calls is seen
as it is at the second call: each change below is made after a first call, and the second
call must give the map (or the refusal) a fresh model gives.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import torchray_like.attribution.modules as modules_module
from torchray_like.attribution.driver import all_finite
from torchray_like.attribution.explain import explain
from torchray_like.attribution.modules import ModelScan, call_scan, current_scan, scan_model
from torchray_like.attribution.registry import METHODS

gradient, guided_backprop, deconvnet, grad_cam, linear_approx = (
    METHODS[name] for name in ("gradient", "guided_backprop", "deconvnet", "grad_cam",
                               "linear_approx"))


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


def plain_gradient_map(model: nn.Module, x: torch.Tensor, c: int) -> torch.Tensor:
    """The gradient map by hand: max over channels of |d y[:, c] / d x|."""
    xx = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(model(xx)[:, c].sum(), xx)
    return g.abs().amax(1, keepdim=True)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 8)


class CountingSequential(nn.Sequential):
    """Counts the named walks of the tree (``modules()`` goes through ``named_modules``)."""

    walks = 0

    def named_modules(self, *args, **kwargs):  # type: ignore[override]
        CountingSequential.walks += 1
        return super().named_modules(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# One walk per call


@pytest.mark.parametrize("method, kwargs", [
    (gradient, {}), (guided_backprop, {}), (deconvnet, {}),
    (grad_cam, {"saliency_layer": "2"}), (linear_approx, {"saliency_layer": "2"})])
def test_one_scan_and_no_named_walk_per_call(monkeypatch, x, method, kwargs):
    model = CountingSequential(*small_net())
    scans = []
    original = ModelScan.__init__

    def counting_init(self, m):
        scans.append(m)
        original(self, m)

    monkeypatch.setattr(ModelScan, "__init__", counting_init)
    method(model, x, 1, **kwargs)  # warm (nothing is cached across calls anyway)
    scans.clear()
    CountingSequential.walks = 0
    smap = method(model, x, 1, **kwargs)
    assert smap.shape == (2, 1, 8, 8)
    assert [m is model for m in scans] == [True]           # exactly one scan, of the model
    assert CountingSequential.walks == 0                   # no other walk of the tree


def test_explain_shares_one_scan(monkeypatch, x):
    model = small_net()
    scans = []
    original = ModelScan.__init__
    monkeypatch.setattr(ModelScan, "__init__",
                        lambda self, m: (scans.append(m), original(self, m))[1])
    maps = explain(model, x, 1, ["gradient", "guided_backprop", "grad_cam"],
                   {"grad_cam": {"saliency_layer": "2"}})
    assert len(scans) == 1
    assert torch.equal(maps["gradient"], gradient(model, x, 1))


def test_scan_lives_for_one_call_in_one_thread(x):
    model = small_net()
    assert current_scan(model) is None
    with call_scan(model) as scan:
        assert current_scan(model) is scan
        assert scan.modules == list(model.modules())
        with call_scan(model) as inner:                    # an enclosing scan is reused
            assert inner is scan
        seen = []
        thread = threading.Thread(target=lambda: seen.append(current_scan(model)))
        thread.start()
        thread.join()
        assert seen == [None]                              # other threads walk for themselves
        assert current_scan(small_net()) is None           # another model: no scan
    assert current_scan(model) is None
    gradient(model, x, 1)
    assert current_scan(model) is None                     # a call leaves no scan behind


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_scan_facts():
    model = small_net()
    scan = scan_model(model)
    assert (scan.unset, scan.inference, scan.opaque, scan.batch_statistics,
            scan.data_parallel) == (False,) * 5
    model.add_module("bn", nn.BatchNorm2d(3, track_running_stats=False))
    model.add_module("lazy", nn.LazyLinear(2))
    model.add_module("script", torch.jit.script(nn.Linear(2, 2)))
    with torch.inference_mode():
        model.add_module("frozen", nn.Linear(2, 2))
    scan = scan_model(model)
    assert (scan.unset, scan.inference, scan.opaque, scan.batch_statistics) == (True,) * 4
    assert scan.modules[0] is model and len(scan.modules) == len(list(model.modules()))


def test_scan_class_facts_hold_for_subclasses_instances_and_many_classes():
    # The scan learns what a module's class means once per class; instances of the same class
    # still differ (running statistics on or off, compiled in place), subclasses count, and
    # classes made on the fly do not grow the per-class knowledge without bound.
    class MyNorm(nn.BatchNorm2d):
        pass

    model = small_net()
    model.add_module("norm", MyNorm(3))
    assert not scan_model(model).batch_statistics
    model.add_module("norm2", MyNorm(3, track_running_stats=False))
    assert scan_model(model).batch_statistics
    inner = nn.Linear(2, 2)
    model.add_module("inner", inner)
    assert not scan_model(model).opaque
    inner.compile()  # compiled in place: the same class, an opaque instance
    assert scan_model(model).opaque
    for i in range(modules_module.CLASS_CACHE_SIZE + 10):
        scan_model(type(f"Made{i}", (nn.Module,), {})())
    assert len(modules_module.MODULE_CLASSES) <= modules_module.CLASS_CACHE_SIZE
    scan = scan_model(model)
    assert (scan.batch_statistics, scan.opaque, scan.unset) == (True, True, False)


# ---------------------------------------------------------------------------------------------
# The model changes between two calls: the second call sees the change


def test_module_replaced_between_calls(x):
    model = small_net()
    assert torch.equal(gradient(model, x, 1), plain_gradient_map(model, x, 1))
    model[2] = nn.Conv2d(4, 6, 5, padding=2)
    assert torch.equal(gradient(model, x, 1), plain_gradient_map(model, x, 1))


def test_module_added_and_removed_between_calls(x):
    model = small_net()
    gradient(model, x, 1)
    model.insert(2, nn.Conv2d(4, 4, 1))
    assert torch.equal(gradient(model, x, 1), plain_gradient_map(model, x, 1))
    by_name = grad_cam(model, x, 1, saliency_layer="2")   # the new module at "2"
    assert torch.equal(by_name, grad_cam(model, x, 1, saliency_layer=model[2]))
    assert not torch.equal(by_name, grad_cam(model, x, 1, saliency_layer="3"))
    del model[2]
    assert torch.equal(gradient(model, x, 1), plain_gradient_map(model, x, 1))
    with pytest.raises(ValueError, match="no module named '7'"):
        grad_cam(model, x, 1, saliency_layer="7")


def test_lazy_module_added_between_calls_is_refused(x):
    model = small_net()
    gradient(model, x, 1)
    model[6] = nn.LazyLinear(5)
    with pytest.raises(ValueError, match=r"parameter '6.weight' is not initialised"):
        gradient(model, x, 1)
    assert isinstance(model[6].weight, nn.parameter.UninitializedParameter)  # untouched


def test_inference_and_meta_tensors_set_between_calls_are_refused(x):
    model = small_net()
    gradient(model, x, 1)
    with torch.inference_mode():
        model[6] = nn.Linear(6, 5)
    with pytest.raises(ValueError, match=r"parameter '6.weight' is an inference tensor"):
        gradient(model, x, 1)
    model[6] = nn.Linear(6, 5, device="meta")
    with pytest.raises(ValueError, match=r"'6.weight' is on the meta device"):
        gradient(model, x, 1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_scripted_module_inserted_between_calls_is_refused_for_rules(x):
    model = small_net()
    guided_backprop(model, x, 1)
    model[2] = torch.jit.script(nn.Conv2d(4, 6, 3, padding=1))
    with pytest.raises(ValueError, match=r"TorchScript module '2'.*silently stay"):
        guided_backprop(model, x, 1)
    assert torch.equal(gradient(model, x, 1), plain_gradient_map(model, x, 1))


def test_training_flag_set_between_calls(x):
    model = small_net()
    model.insert(5, nn.Dropout(0.5))
    reference = gradient(model, x, 1)
    model.train()
    assert torch.equal(gradient(model, x, 1), reference)   # eval mode inside the call
    assert all(m.training for m in model.modules())         # and given back
    model.eval()
    assert torch.equal(gradient(model, x, 1), reference)
    assert not any(m.training for m in model.modules())


def test_requires_grad_changed_between_calls(x):
    model = small_net()
    reference = gradient(model, x, 1)
    for p in model.parameters():
        p.requires_grad_(False)
    assert torch.equal(gradient(model, x, 1), reference)
    assert not any(p.requires_grad for p in model.parameters())
    model[0].weight.requires_grad_(True)
    assert torch.equal(gradient(model, x, 1), reference)
    assert [p.requires_grad for p in model.parameters()][:2] == [True, False]
    assert all(p.grad is None for p in model.parameters())


def test_hook_added_between_calls(x):
    model = small_net()
    reference = gradient(model, x, 1)
    handle = model[6].register_forward_hook(lambda m, i, o: o * 2)
    try:
        assert torch.equal(gradient(model, x, 1), plain_gradient_map(model, x, 1))
        assert torch.equal(gradient(model, x, 1), 2 * reference)
    finally:
        handle.remove()
    assert torch.equal(gradient(model, x, 1), reference)


def test_dtype_changed_between_calls(x):
    model = small_net()
    gradient(model, x, 1)
    model.double()
    smap = gradient(model, x.double(), 1)
    assert smap.dtype == torch.float64
    assert torch.equal(smap, plain_gradient_map(model, x.double(), 1))


def test_batch_statistics_switched_on_between_calls(x):
    model = small_net()
    model.insert(1, nn.BatchNorm2d(4))
    gradient(model, x, 1)
    model[1] = nn.BatchNorm2d(4, track_running_stats=False)
    # Each sample explains its own score in the batch it ran with: one backward per row.
    xx = x.detach().clone().requires_grad_(True)
    out = model(xx)
    rows = [torch.autograd.grad(out[i, 1], xx, retain_graph=True)[0][i] for i in range(2)]
    expected = torch.stack(rows).abs().amax(1, keepdim=True)
    assert torch.equal(gradient(model, x, 1), expected)


def test_first_convolution_changed_between_calls(x):
    model = small_net()
    gradient(model, x, 1)
    model[0] = nn.Conv2d(5, 4, 3, padding=1)  # now takes 5 channels: x has 3
    with pytest.raises(ValueError, match=r"3 channels; the model's first convolution "
                                         r"\(Conv2d, in_channels=5\)"):
        gradient(model, x, 1)


# ---------------------------------------------------------------------------------------------
# The short call's other savings give the same answers


def test_int_targets_seed_like_tensor_targets(x):
    model = small_net()
    by_int = gradient(model, x, 3)
    assert torch.equal(gradient(model, x, [3, 3]), by_int)
    assert torch.equal(gradient(model, x, torch.tensor([3, 3])), by_int)
    mixed = gradient(model, x, [4, 0])
    assert torch.equal(mixed, gradient(model, x, torch.tensor([4, 0])))
    for bad in (5, [0, 5], -1):
        with pytest.raises(ValueError, match=r"target class (5|-1) is out of range: the model "
                                             r"output has 5 classes \(valid: 0..4\)"):
            gradient(model, x, bad)


def test_all_finite_is_a_proof_or_sends_to_the_exact_check():
    assert all_finite(torch.ones(3, 4))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([1.0, float("inf"), -float("inf")]))
    assert not all_finite(torch.tensor([6e4, 6e4], dtype=torch.float16))  # the sum overflows
    assert not all_finite(torch.ones(3, dtype=torch.long))


def test_gradient_whose_sum_overflows_is_no_error():
    # Finite gradients whose sum overflows float32 take the exact check, which passes.
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.Flatten(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(1e38)
        model[2].bias.zero_()
    x = torch.full((1, 1, 2, 2), 1e-3)
    smap = gradient(model, x, 1)
    assert torch.equal(smap, torch.full((1, 1, 2, 2), 1e38))
    assert not all_finite(torch.full((4,), 1e38))


def test_argument_binding_is_signature_bind(x):
    model = small_net()
    positional = METHODS["grad_cam"](model, x, 1, "2", False, "bilinear", 0)
    assert torch.equal(positional, grad_cam(model, x, 1, saliency_layer="2"))
    with pytest.raises(TypeError, match="missing a required argument: 'target'"):
        gradient(model, x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        gradient(model, x, 1, foo=1)
    with pytest.raises(TypeError, match="multiple values for argument 'input'"):
        gradient(model, x, 1, input=x)
    with pytest.raises(TypeError, match="too many positional arguments"):
        gradient(model, x, 1, "", False, "bilinear", 0, None, None, None, False, None, None)


def test_no_module_level_state_left(x):
    model = small_net()
    gradient(model, x, 1)
    with pytest.raises(ValueError):
        gradient(model, x, 9)
    assert current_scan(model) is None
    assert modules_module.current_scan(model) is None


def test_explain_lrp_composites_with_gradient_methods_equal_separate_calls(x):
    # The LRP composites run by their own functions (each its own forward pass under its
    # rules); the gradient methods share one pass; all maps are those of the separate calls.
    model = small_net()
    names = ["lrp", "lrp_epsilon_plus", "lrp_epsilon_alpha2_beta1", "lrp_epsilon_gamma_box",
             "gradient", "grad_cam"]
    maps = explain(model, x, [1, 3], names)
    assert list(maps) == names
    for name in names:
        alone = METHODS[name](model, x, [1, 3])
        assert maps[name].shape == (2, 1, 8, 8) or name == "grad_cam"
        assert torch.equal(maps[name], alone), name
    assert current_scan(model) is None
