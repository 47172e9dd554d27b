"""Models transformed with PyTorch's own tools, for every entry of METHODS, for ``explain`` and
for the LRP composites: the map of the transformed model equals the map of the *equivalent
plain model* (the weights it computes baked into an untransformed copy with PyTorch's own
``remove_parametrizations(leave_parametrized=True)`` / ``prune.remove``), or the call is
refused with a ValueError naming the construct and what to do; and the call leaves the model
as it found it (parameters, buffers — spectral norm's ``u``/``v``, prune masks, fake-quantize
observers' statistics —, hooks, ``training`` flags, ``requires_grad``: ``tests/conftest.py``'s
``snapshot`` / ``assert_same_state``, which compare every buffer bit for bit).

Transforms (a small CNN with batch norm, a residual sum and in-place ReLUs; torchvision's
resnet18 at 32² with random weights where cheap; a small ViT for the transformer-only entries):
``parametrizations.weight_norm`` / ``spectral_norm`` / ``orthogonal``, ``prune``
(``l1_unstructured``, ``random_structured``, a pruned bias), ``fx.symbolic_trace`` and
``create_feature_extractor``, ``torch.export(...).module()``, ``fuse_conv_bn_eval``,
quantization-aware training (``prepare_qat``) and a converted int8 model, a single-process
gloo ``DistributedDataParallel``, tied weights.

What the sweep found (and the package now does):

* LRP, its composites and AttnLRP took a weight computed in the forward pass from parameters
  (weight norm, spectral norm, orthogonal, prune's ``weight_orig * weight_mask``, QAT's
  fake-quantized weights) for "an activation as weight": a model with only such layers was
  refused with a misleading message, a partly transformed one got a map mixing the rule with
  the plain gradient under a warning.  Such a weight is now a constant of the rule
  (``autograd_graph.parameter_function``): the plain model's map.
* A QAT model in eval mode (observers on: ``model.eval()`` does not switch them off) changed
  its observers' statistics and scales at every call, so successive maps differed and the
  user's model drifted.  The state guard now switches fake-quantize observation off for the
  call and lets plain observers record into copies: the map of the model as it is, nothing
  changed.
* A converted int8 (or ``quantize_dynamic``) model got "does not depend on the input",
  layer-choice errors or an all-zero LRP map: every method that differentiates now refuses it
  with a ValueError naming the quantized module; RISE and occlusion run on it.
* ``torch.export(...).module()`` calls ATen operators: the methods whose rules are ReLU rules
  and the plain-gradient and perturbation methods give the plain map (with a dynamic batch
  dimension; a static one is refused by the model's own guard, named); LRP and excitation
  backprop refuse, now saying it is the ATen graph (before: blamed threads); the CAM family
  finds no module to read (an unlifted graph has none) and says to pass ``saliency_layer``.
* A named container that a traced graph never calls (``saliency_layer="layer4"`` on a
  ``symbolic_trace`` of resnet18) said only "was not called"; it now says why and names a leaf
  inside it.  A graph node's name (``layer4.1.relu_1``) is no module (refused with the
  modules' names); a module the graph calls twice is refused as ambiguous, as before.
* Weight norm, spectral norm (eval: no power iteration), orthogonal, prune, ``symbolic_trace``,
  conv-bn fusion (float rounding), DDP and tied weights gave the plain map everywhere else.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.utils import parametrizations, parametrize, prune
from torch.nn.utils.fusion import fuse_conv_bn_eval

from tests.conftest import assert_same_state, snapshot
from tests.test_batch_sweep import GENERIC, options, residual_bn
from tests.test_forms_sweep import EXPLAIN
from tests.transformer_models import make_vit
from torchray_like.attribution import METHODS
from torchray_like.attribution.explain import explain
from torchray_like.attribution.registry import TRANSFORMER_ONLY_METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = [1, 2, 0]
LRP = sorted(name for name in METHODS if name.startswith("lrp") or name == "attn_lrp")


def image(n: int = 3, size: int = 12, seed: int = 3) -> torch.Tensor:
    """``n`` images, the last all zeros (a generator of its own: the global RNG is state)."""
    x = torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    x[-1] = 0
    return x


def quiet(name: str, model: nn.Module, x: torch.Tensor, **extra: Any) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about small inputs / the zero image
        return METHODS[name](model, x, TARGETS[:x.shape[0]], **options(name, x), **extra)


def assert_close_map(out: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 1e-5,
                     occlusion_atol: float = 2e-6) -> None:
    """test_batch_sweep's tolerance: relative to the map's largest value, and absolute for
    occlusion (differences of scores of order 1)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    scale = ref.abs().max().item()
    atol = max(rtol * scale, occlusion_atol if what.startswith("occlusion") else 0.0) + 1e-30
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def bake(plain: nn.Module) -> nn.Module:
    """The equivalent plain model: ``plain`` (a second build of the transformed model: a pruned
    one cannot be deep-copied) with every parametrization and pruning folded into a plain
    parameter by PyTorch's own tools (evaluated in the model's mode: eval)."""
    for m in plain.modules():
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
    assert not any(parametrize.is_parametrized(m) or m._forward_pre_hooks
                   for m in plain.modules())
    return plain


# ---------------------------------------------------------------------------------------------
# The transforms, each on a fresh ResidualBN (batch norm, residual sum, in-place ReLUs)
# ---------------------------------------------------------------------------------------------


def weight_norm(m: nn.Module) -> nn.Module:
    for layer in (m.conv1, m.conv2, m.fc):
        parametrizations.weight_norm(layer)
    return m


def spectral_norm(m: nn.Module) -> nn.Module:
    for layer in (m.conv1, m.conv2, m.fc):
        parametrizations.spectral_norm(layer)
    return m


def orthogonal(m: nn.Module) -> nn.Module:
    parametrizations.orthogonal(m.conv2)  # conv1 stays plain: a partly transformed model
    parametrizations.orthogonal(m.fc, orthogonal_map="householder")
    return m


def pruned(m: nn.Module) -> nn.Module:
    torch.manual_seed(1)  # random_structured draws
    prune.l1_unstructured(m.conv1, "weight", 0.3)
    prune.random_structured(m.conv2, "weight", 0.3, dim=0)
    prune.l1_unstructured(m.fc, "weight", 0.5)
    prune.l1_unstructured(m.fc, "bias", 0.5)
    return m


TRANSFORMS: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "weight_norm": weight_norm, "spectral_norm": spectral_norm, "orthogonal": orthogonal,
    "prune": pruned}


def transformed(kind: str) -> nn.Module:
    model = TRANSFORMS[kind](residual_bn())
    if kind == "spectral_norm":  # a few power iterations, as training would leave them
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(image(4, seed=9))
    return model.eval()


_MODELS: Dict[str, tuple] = {}


def pair(kind: str) -> tuple:
    """(transformed model, its baked plain copy), built once per transform."""
    if kind not in _MODELS:
        _MODELS[kind] = (transformed(kind), bake(transformed(kind)))
    return _MODELS[kind]


def test_baked_copies_compute_the_same_function():
    x = image()
    for kind in TRANSFORMS:
        model, plain = pair(kind)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
@pytest.mark.parametrize("name", GENERIC)
def test_parametrized_and_pruned_models_give_the_plain_map(name, kind):
    model, plain = pair(kind)
    x = image()
    before = snapshot(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = METHODS[name](model, x, TARGETS, **options(name, x))
    assert_same_state(before, snapshot(model, x))  # u, v, masks, originals untouched
    assert_close_map(out, quiet(name, plain, x), f"{name} on {kind}")
    # No note that the plain model would not give either (LRP named these weights
    # "activations" and mixed in the plain gradient).
    assert not [w for w in caught if "activation as weight" in str(w.message)]


def test_spectral_norm_power_iteration_untouched_in_training_mode():
    """A model in training mode runs in eval mode for the call: spectral norm's ``u`` and
    ``v`` (power iteration runs in training mode only) and batch norm's statistics stay."""
    model = transformed("spectral_norm").train()
    x = image()
    before = snapshot(model, x)
    for name in ("gradient", "lrp", "rise", "grad_cam"):
        out = quiet(name, model, x)
        assert_same_state(before, snapshot(model, x))
        assert_close_map(out, quiet(name, pair("spectral_norm")[1], x), name)
    assert model.training


def test_parameter_function_tells_parametrized_weights_from_activations():
    from torchray_like.attribution.autograd_graph import parameter_function
    model, _ = pair("weight_norm")
    assert parameter_function(model.conv1.weight) and parameter_function(model.fc.weight)
    assert parameter_function(transformed("prune").conv2.weight)  # weight_orig * weight_mask
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    assert not parameter_function(x * model.conv1.weight.sum())  # reaches the input
    assert not parameter_function(torch.rand(3, requires_grad=True).exp())  # a plain leaf
    deep = nn.Parameter(torch.ones(3))
    chain = deep
    for _ in range(40):
        chain = chain * 1.5
    assert parameter_function(chain, limit=100) and not parameter_function(chain, limit=32)


# ---------------------------------------------------------------------------------------------
# Graph modules: symbolic_trace, create_feature_extractor, torch.export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GENERIC)
def test_symbolic_trace_gives_the_plain_map(name):
    plain = residual_bn()
    traced = torch.fx.symbolic_trace(plain)
    x = image()
    before = snapshot(traced, x)
    out = quiet(name, traced, x)
    assert_same_state(before, snapshot(traced, x))
    assert_close_map(out, quiet(name, plain, x), f"{name} on symbolic_trace")


@pytest.fixture(scope="module")
def resnets() -> Dict[str, nn.Module]:
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    return {"plain": plain, "traced": torch.fx.symbolic_trace(plain)}


RESNET_METHODS = ["gradient", "guided_backprop", "lrp", "lrp_epsilon_gamma_box",
                  "excitation_backprop", "linear_approx"]


def test_traced_resnet18(resnets):
    """symbolic_trace flattens the blocks: 'layer4' is never called (refused, named), a
    module called twice (torchvision's shared ReLU) is refused as ambiguous, a leaf module
    reads the same tensor as in the plain model."""
    x, plain, traced = image(2, 32), resnets["plain"], resnets["traced"]
    for name in RESNET_METHODS:
        assert_close_map(quiet(name, traced, x), quiet(name, plain, x), f"{name} on resnet18")
    layer = {"saliency_layer": "layer4.1.conv2"}
    assert_close_map(quiet("grad_cam", traced, x, **layer), quiet("grad_cam", plain, x, **layer),
                     "grad_cam at layer4.1.conv2")
    with pytest.raises(ValueError, match=r"'layer4' was not called in the forward pass; it "
                       r"holds sub-modules, which a torch.fx GraphModule.*'layer4\.1\.bn2'"):
        quiet("grad_cam", traced, x, saliency_layer="layer4")
    with pytest.raises(ValueError, match="called 2 times in one forward pass"):
        quiet("grad_cam", traced, x, saliency_layer="layer4.1.relu")


def test_pruned_and_weight_normed_resnet18(resnets):
    """Every convolution and the head pruned (or weight-normed): LRP folds each batch norm into
    the rule of a computed weight as into a parameter's."""
    x = image(2, 32)
    for kind in ("prune", "weight_norm"):
        models = []
        for _ in range(2):
            model = copy.deepcopy(resnets["plain"])
            for i, m in enumerate(m for m in model.modules() if isinstance(m, (nn.Conv2d,
                                                                                nn.Linear))):
                if kind == "prune":
                    prune.l1_unstructured(m, "weight", 0.1 + 0.1 * (i % 4))
                else:
                    parametrizations.weight_norm(m)
            models.append(model)
        model, plain = models[0], bake(models[1])
        before = snapshot(model, x)
        for name in RESNET_METHODS + ["grad_cam"]:
            assert_close_map(quiet(name, model, x), quiet(name, plain, x), f"{name} {kind}")
        assert_same_state(before, snapshot(model, x))


def test_feature_extractor_outputs_and_node_names(resnets):
    from torchvision.models.feature_extraction import create_feature_extractor
    x, plain = image(2, 32), resnets["plain"]
    extractor = create_feature_extractor(plain, return_nodes={"fc": "logits", "layer4": "f"})
    with pytest.raises(TypeError, match="returned a dict.*callable target"):
        quiet("gradient", extractor, x)
    def score(out: Dict[str, torch.Tensor]) -> torch.Tensor:
        return out["logits"][:, 1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zero image's flat map
        ref = METHODS["gradient"](plain, x, lambda out: out[:, 1])
        out = METHODS["gradient"](extractor, x, score)
    assert_close_map(out, ref, "gradient, feature extractor")
    # A graph node's name ('layer4.1.relu_1') is no module: refused with the modules' names.
    with pytest.raises(ValueError, match="no module named 'layer4.1.relu_1'.*'layer4.1.relu'"):
        METHODS["grad_cam"](extractor, x, score, saliency_layer="layer4.1.relu_1")


EXPORT_EXACT = {"gradient", "gradient_x_input", "guided_backprop", "deconvnet", "linear_approx",
                "integrated_gradients", "smooth_grad", "occlusion", "rise",
                "extremal_perturbation"}


@pytest.fixture(scope="module")
def exported() -> nn.Module:
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(residual_bn(), (image(),),
                               dynamic_shapes={"x": {0: batch}}).module()


@pytest.mark.parametrize("name", GENERIC)
def test_exported_module(name, exported):
    x = image()
    before = snapshot(exported, x)
    if name in EXPORT_EXACT:
        assert_close_map(quiet(name, exported, x), quiet(name, residual_bn(), x),
                         f"{name} on torch.export")
    elif name in LRP or name == "excitation_backprop":
        with pytest.raises(ValueError, match=r"ATen operators.*explain the original model"):
            quiet(name, exported, x)
    else:  # the CAM family: an unlifted graph has no sub-module to read
        with pytest.raises(ValueError, match="could not choose saliency_layer automatically"):
            quiet(name, exported, x)
    assert_same_state(before, snapshot(exported, x))


def test_exported_with_a_static_batch_is_refused_by_its_guard():
    static = torch.export.export(residual_bn(), (image(),)).module()
    with pytest.raises(ValueError, match="Guard failed.*give inputs of the size"):
        quiet("rise", static, image())


# ---------------------------------------------------------------------------------------------
# Conv-bn fusion, tied weights, DistributedDataParallel
# ---------------------------------------------------------------------------------------------


class Fused(nn.Module):
    """ResidualBN with each conv + batch norm fused by PyTorch (fuse_conv_bn_eval)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2 = fuse_conv_bn_eval(m.conv1, m.bn1), fuse_conv_bn_eval(m.conv2,
                                                                                      m.bn2)
        self.relu1, self.relu2, self.pool, self.fc = m.relu1, m.relu2, m.pool, m.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.conv1(x))
        h = self.relu2(self.conv2(h) + h)
        return self.fc(self.pool(h).flatten(1))


@pytest.mark.parametrize("name", GENERIC)
def test_fused_conv_bn_gives_the_unfused_map(name):
    """Fusion only rounds differently (LRP folds batch norm into the rule the same way)."""
    plain = residual_bn()
    fused = Fused(copy.deepcopy(plain)).eval()
    x = image()
    assert_close_map(quiet(name, fused, x), quiet(name, plain, x), f"{name} fused",
                     rtol=1e-4, occlusion_atol=2e-5)


class Tied(nn.Module):
    """Two convolutions sharing one weight (a different bias each), then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3.weight = self.conv2.weight
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv3(torch.relu(self.conv2(h))) + h)
        return self.fc(self.pool(h).flatten(1))


@pytest.mark.parametrize("name", GENERIC)
def test_tied_weights_give_the_untied_map(name):
    tied = Tied().eval()
    untied = copy.deepcopy(tied)
    untied.conv3.weight = nn.Parameter(tied.conv2.weight.detach().clone())
    x = image()
    before = snapshot(tied, x)
    out = quiet(name, tied, x)
    assert_same_state(before, snapshot(tied, x))
    assert tied.conv3.weight is tied.conv2.weight
    assert_close_map(out, quiet(name, untied, x), f"{name} tied")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """A single-process gloo group (file:// rendezvous in a temporary folder), destroyed after
    the module's tests."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    init = tmp_path_factory.mktemp("ddp") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield nn.parallel.DistributedDataParallel(residual_bn())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", GENERIC)
def test_distributed_data_parallel_gives_the_plain_map(name, ddp):
    x = image()
    before = snapshot(ddp, x)
    out = quiet(name, ddp, x)
    assert_same_state(before, snapshot(ddp, x))
    assert_close_map(out, quiet(name, residual_bn(), x), f"{name} DDP")


def test_distributed_data_parallel_named_layer(ddp):
    x = image()
    assert_close_map(quiet("grad_cam", ddp, x, saliency_layer="module.relu2"),
                     quiet("grad_cam", residual_bn(), x, saliency_layer="relu2"), "grad_cam")


# ---------------------------------------------------------------------------------------------
# Quantization: QAT-prepared (fake quantize), calibrating observers, converted int8
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantization():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notes
        import torch.ao.quantization as quant
        yield quant


def qat_model(quant: Any) -> nn.Module:
    """ResidualBN prepared for quantization-aware training and run on a few batches in training
    mode (observers and fake quantization on, as training leaves them), then put in eval mode —
    which does *not* switch observers off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = residual_bn().train()
        model.qconfig = quant.get_default_qat_qconfig("fbgemm")
        quant.prepare_qat(model, inplace=True)
        with torch.no_grad():
            model(image(4, seed=9))
    return model.eval()


@pytest.mark.parametrize("name", GENERIC)
def test_qat_model_gives_its_map_and_keeps_its_observers(name, quantization):
    """The map of the model as it is (the map of a copy whose observers are off), and the
    observers' statistics, scales, flags and tensors untouched."""
    model = qat_model(quantization)
    frozen = copy.deepcopy(model).apply(quantization.disable_observer)
    x = image()
    flag = model.conv1.activation_post_process.observer_enabled
    before = snapshot(model, x)
    out = quiet(name, model, x)
    assert_same_state(before, snapshot(model, x))  # min/max, scale, zero point, flags
    assert model.conv1.activation_post_process.observer_enabled is flag and int(flag) == 1
    assert_close_map(out, quiet(name, frozen, x), f"{name} on QAT")
    assert torch.equal(quiet(name, model, x), out)  # a second call: the same map


def test_observers_still_observe_the_users_own_passes(quantization):
    model = qat_model(quantization)
    quiet("gradient", model, image())
    fake = model.conv1.activation_post_process
    before = fake.activation_post_process.max_val.clone()
    with torch.no_grad():
        model(10 * image(4, seed=11))  # the user's own pass, outside any call
    assert not torch.equal(fake.activation_post_process.max_val, before)


def test_observers_come_back_after_a_failing_call_and_concurrent_calls(quantization):
    import threading
    model = qat_model(quantization)
    x = image()
    flag = model.fc.activation_post_process.observer_enabled
    before = snapshot(model, x)

    def failing(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the target raised")

    with pytest.raises(RuntimeError, match="the target raised"):
        METHODS["gradient"](model, x, failing)
    assert_same_state(before, snapshot(model, x))
    assert model.fc.activation_post_process.observer_enabled is flag
    expected = quiet("grad_cam", model, x)
    maps: list = []
    threads = [threading.Thread(target=lambda: maps.append(quiet("grad_cam", model, x)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(maps) == 3 and all(torch.equal(m, expected) for m in maps)
    assert_same_state(before, snapshot(model, x))


def test_calibrating_observers_record_nothing_of_a_call(quantization):
    """Post-training quantization's ``prepare``: plain observers record every forward pass."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = residual_bn()
        model.qconfig = quantization.get_default_qconfig("fbgemm")
        quantization.prepare(model, inplace=True)
        model(image(4, seed=9))
    x = 10 * image()
    before = snapshot(model, x)
    for name in ("gradient", "grad_cam", "lrp", "rise", "occlusion", "excitation_backprop"):
        plain = quiet(name, residual_bn(), x)
        assert_close_map(quiet(name, model, x), plain, f"{name} on a calibrating model")
        assert_same_state(before, snapshot(model, x))


class Quantized(nn.Module):
    """A float model between QuantStub / DeQuantStub, for ``convert``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), (
            torch.ao.quantization.DeQuantStub())
        self.conv1, self.relu = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        self.conv2, self.pool, self.fc = nn.Conv2d(6, 6, 3, padding=1), nn.AdaptiveAvgPool2d(
            1), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.conv2(self.relu(self.conv1(self.quant(x))))))
        return self.dequant(self.fc(h.flatten(1)))


@pytest.fixture(scope="module")
def int8(quantization) -> Dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Quantized().eval()
        model.qconfig = quantization.get_default_qconfig("fbgemm")
        quantization.prepare(model, inplace=True)
        model(image(8, seed=9))
        dynamic = quantization.quantize_dynamic(residual_bn(), {nn.Linear}, dtype=torch.qint8)
        return {"static": quantization.convert(model), "dynamic": dynamic}


FORWARD_ONLY = {"rise", "occlusion"}


@pytest.mark.parametrize("kind", ["static", "dynamic"])
@pytest.mark.parametrize("name", GENERIC)
def test_int8_models_are_refused_by_gradient_methods(name, kind, int8):
    """No autograd through integer kernels: a ValueError naming the quantized module and what
    to do; the forward-only methods explain the int8 model as it is."""
    model, x = int8[kind], image()
    before = snapshot(model, x)
    if name in FORWARD_ONLY:
        out = quiet(name, model, x)
        assert out.shape == (3, 1, 12, 12) and bool(torch.isfinite(out).all())
        assert torch.equal(quiet(name, model, x), out)
    else:
        module = "'quant'" if kind == "static" else "'fc'"
        with pytest.raises(ValueError, match=rf"model module {module} \(torch\.ao\.nn\.quantized"
                                             r".*quantized module.*explain the float model"):
            quiet(name, model, x)
    assert_same_state(before, snapshot(model, x))


# ---------------------------------------------------------------------------------------------
# explain on transformed models; the transformer-only entries on a transformed ViT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["weight_norm", "prune", "spectral_norm", "trace", "qat"])
def test_explain_on_transformed_models(kind, quantization):
    if kind == "trace":
        model, plain = torch.fx.symbolic_trace(residual_bn()), residual_bn()
    elif kind == "qat":
        model = qat_model(quantization)
        plain = copy.deepcopy(model).apply(quantization.disable_observer)
    else:
        model, plain = pair(kind)
    x = image()
    names = EXPLAIN + ["lrp_epsilon_gamma_box", "excitation_backprop", "linear_approx"]
    opts = {n: options(n, x) for n in names if options(n, x)}
    before = snapshot(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = explain(model, x, TARGETS, names, opts)
        ref = explain(plain, x, TARGETS, names, opts)
    assert_same_state(before, snapshot(model, x))
    for name in names:
        assert_close_map(out[name], ref[name], f"explain {name} on {kind}")


def vit_transformed(kind: str) -> nn.Module:
    vit = make_vit()
    linears = [m for m in vit.encoder.modules() if isinstance(m, nn.Linear)]
    for i, layer in enumerate(linears):
        if kind == "weight_norm":
            parametrizations.weight_norm(layer)
        else:
            prune.l1_unstructured(layer, "weight", 0.2 + 0.1 * (i % 3))
    return vit.eval()


VIT_ENTRIES = sorted(set(TRANSFORMER_ONLY_METHODS) | {"attn_lrp", "lrp", "gradient", "grad_cam"})


@pytest.mark.parametrize("kind", ["weight_norm", "prune"])
def test_transformer_entries_on_a_transformed_vit(kind):
    """weight norm / pruning of the attention's output projection and the MLPs."""
    model, plain = vit_transformed(kind), bake(vit_transformed(kind))
    x = image(2, 32)
    before = snapshot(model, x)
    for name in VIT_ENTRIES:
        target = None if name in ("attention_rollout", "attention_flow") else TARGETS[:2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = METHODS[name](model, x, target)
            ref = METHODS[name](plain, x, target)
        assert_close_map(out, ref, f"{name} on a {kind} ViT")
        assert_same_state(before, snapshot(model, x))
