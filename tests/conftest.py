"""Shared fixtures and helpers: small torchvision models with random weights, tiny hand-built
nets, reference rectifier rules written independently of the library, and state snapshots."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import threading
import types
from typing import Any, Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# The attention tests' fixtures (vit, models, x), defined beside their models.
pytest_plugins = ("tests.transformer_models",)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the machine's cores: one intra-op thread each avoids
    # oversubscription (which made small-op-heavy tests several times slower).
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module runs (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): for modules of small tensors, where two threads on a busy 2-core machine make
    every small op wait for the other (several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> types.ModuleType:
    """``benchmarks/<name>.py`` loaded as a fresh module (the scripts are no package): each call
    executes the script anew, so a test that patches its globals leaves other tests alone."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TORCHVISION_NAMES = ("vgg11", "resnet18", "densenet121", "squeezenet1_1", "mobilenet_v2")


def make_torchvision(name: str, num_classes: int = 10) -> torch.nn.Module:
    """A torchvision architecture with deterministic random weights, in eval mode."""
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=num_classes).eval()


@pytest.fixture(scope="session")
def torchvision_models():
    """name -> model (random weights, 10 classes).  Use inputs of 64×64 (vgg11 needs ≥ 32)."""
    return {name: make_torchvision(name) for name in TORCHVISION_NAMES}


@pytest.fixture(params=TORCHVISION_NAMES)
def torchvision_model(request, torchvision_models):
    return request.param, torchvision_models[request.param]


class ConvNet(nn.Module):
    """A small conv net for 1-D, 2-D or 3-D data, with batch norm and dropout."""

    def __init__(self, dims=2, classes=5, channels=3):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
        torch.manual_seed(0)
        self.features = nn.Sequential(conv(channels, 8, 3, padding=1), bn(8), nn.ReLU(inplace=True),
                                      conv(8, 8, 3, padding=1), nn.ReLU())
        self.pool = pool(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, classes)
        # Non-trivial running statistics.
        self.features[1].running_mean.uniform_(-0.2, 0.2)
        self.features[1].running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


def inputs(dims, n=2, size=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(dims)
    return torch.randn((n, 3) + (size,) * dims, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Reference rectifier rules (hand-written autograd.Functions, independent of the library)




class _RefRectifier(torch.autograd.Function):
    """relu(x), or clamp(x, 0, upper); subclasses give the backward rule."""

    @staticmethod
    def forward(ctx, x, upper=None):
        ctx.save_for_backward(x)
        ctx.upper = upper
        y = x.clamp(min=0)
        return y if upper is None else y.clamp(max=upper)


class RefGuidedReLU(_RefRectifier):
    """Springenberg et al.: p' = p · [x > 0] · [p > 0]."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        mask = (x > 0).to(g.dtype) * (g > 0).to(g.dtype)
        if ctx.upper is not None:
            mask = mask * (x < ctx.upper).to(g.dtype)
        return g * mask, None


class ScaleByTwo(torch.autograd.Function):
    """A user's custom autograd function, ``2 x`` with its own backward (the rule contexts
    must keep it: it is a legitimate part of a model)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class RefDeconvReLU(_RefRectifier):
    """Zeiler & Fergus: p' = max(p, 0) (and the upper clamp of ReLU6 keeps its gradient)."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        out = g.clamp(min=0)
        if ctx.upper is not None:
            out = out * (x < ctx.upper).to(g.dtype)
        return out, None


@contextlib.contextmanager
def patched_functional(function_class):
    """Globally replace F.relu / F.relu6 / F.hardtanh(x, 0, b) by ``function_class``.

    A crude but independent mechanism (global monkey-patching of torch.nn.functional) that
    catches nn.ReLU, nn.ReLU6 and direct F.relu calls in torchvision models.
    """
    orig_relu, orig_relu6, orig_hardtanh = F.relu, F.relu6, F.hardtanh

    def relu(x, inplace=False):
        return function_class.apply(x, None)

    def relu6(x, inplace=False):
        return function_class.apply(x, 6.0)

    def hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False):
        if min_val == 0:
            return function_class.apply(x, float(max_val))
        return orig_hardtanh(x, min_val, max_val)

    F.relu, F.relu6, F.hardtanh = relu, relu6, hardtanh
    try:
        yield
    finally:
        F.relu, F.relu6, F.hardtanh = orig_relu, orig_relu6, orig_hardtanh


def reference_map(model, x, target, function_class=None, layer=None):
    """max_c |∂y/∂x| (or at a layer) computed with plain autograd and the reference rule."""
    ctx = patched_functional(function_class) if function_class else contextlib.nullcontext()
    xx = x.detach().clone().requires_grad_(True)
    with ctx:
        y = model(xx)
    seed = torch.zeros_like(y)
    idx = torch.as_tensor(target).expand(y.shape[0]) if not isinstance(target, list) else \
        torch.tensor(target)
    seed[torch.arange(y.shape[0]), idx] = 1
    (g,) = torch.autograd.grad(y, xx, seed)
    return g.abs().amax(1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# State snapshots



_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def hook_counts(model: nn.Module) -> Dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d:
                out[f"{name}.{attr}"] = len(d)
    return out


def global_hook_counts() -> Dict[str, int]:
    from torch.nn.modules import module as mod
    return {k: len(getattr(mod, k)) for k in dir(mod)
            if k.startswith("_global_") and k.endswith("hooks") and isinstance(
                getattr(mod, k), dict)}


def snapshot(model: nn.Module, *tensors: torch.Tensor) -> Dict[str, Any]:
    """Everything observable that a call must not change."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: (None if p.grad is None else p.grad.clone())
                 for n, p in model.named_parameters()},
        "grad_id": {n: id(p.grad) for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": hook_counts(model),
        "global_hooks": global_hook_counts(),
        "modes": torch._C._len_torch_function_stack(),
        "grad_enabled": torch.is_grad_enabled(),
        "rng": torch.get_rng_state(),
        "tensors": [(t.requires_grad, None if t.grad is None else t.grad.clone(),
                     t.detach().clone()) for t in tensors],
        "threads": threading.active_count(),
    }


def assert_same_state(before: Dict[str, Any], after: Dict[str, Any]) -> None:
    """Assert two snapshots agree exactly (values bit for bit)."""
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys(), key
        for n in before[key]:
            assert torch.equal(before[key][n], after[key][n]), f"{key} {n} changed"
    for key in ("requires_grad", "grad_id", "training", "hooks", "global_hooks", "modes",
                "grad_enabled", "threads"):
        assert before[key] == after[key], f"{key}: {before[key]} != {after[key]}"
    for n, g in before["grad"].items():
        h = after["grad"][n]
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), f"grad {n}"
    assert torch.equal(before["rng"], after["rng"]), "global RNG state changed"
    for (r0, g0, v0), (r1, g1, v1) in zip(before["tensors"], after["tensors"]):
        assert r0 == r1, "input requires_grad changed"
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1)), \
            "input .grad changed"
        assert torch.equal(v0, v1), "input values changed"


# ---------------------------------------------------------------------------------------------
# Layer-method fixtures (Grad-CAM, linear approximation)

class ConvHead(nn.Module):
    """``x -> body (ConvNd) -> [ReLU] -> flatten -> fc``.  Affine after ``body`` unless
    ``relu_after``; the gradient at ``body``'s output then varies over space (``fc`` weights)."""

    def __init__(self, dims: int, cin: int = 2, k: int = 3, classes: int = 4,
                 relu_after: bool = False, inplace: bool = False) -> None:
        super().__init__()
        self.dims = dims
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.body = conv(cin, k, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace) if relu_after else nn.Identity()
        positions = 1
        for s in SIZES[dims]:
            positions *= s
        self.fc = nn.Linear(k * positions, classes)

    def forward(self, x):
        return self.fc(self.act(self.body(x)).flatten(1))

    # -- the hand computation (no autograd) ---------------------------------------------------
    def activation(self, x):
        return CONV[self.dims](x, self.body.weight, self.body.bias, padding=1)

    def layer_gradient(self, x, classes):
        """∂y_c/∂A in closed form: the fc row, masked by the ReLU if there is one."""
        a = self.activation(x)
        w = self.fc.weight[torch.as_tensor(classes)].view(a.shape)
        return w * (a > 0).to(w.dtype) if isinstance(self.act, nn.ReLU) else w


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


SIZES = {1: (8,), 2: (6, 5), 3: (4, 3, 5)}


def make(dims, seed=0, **kw):
    torch.manual_seed(seed)
    return ConvHead(dims, **kw).double().eval()


def batch(dims, n=3, seed=1, cin=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, cin) + SIZES[dims], generator=g, dtype=torch.float64)


# SqueezeNet: "features", the last layer before its head (the final 1×1 convolution outputs
# class-score maps, which are the head's output, not features).
AUTO_LAYERS = {"vgg11": "avgpool", "resnet18": "layer4", "densenet121": "features",
               "squeezenet1_1": "features", "mobilenet_v2": "features"}


EXPLICIT_LAYERS = {"vgg11": "features.18", "resnet18": "layer3", "densenet121":
                   "features.denseblock4", "squeezenet1_1": "features.12",
                   "mobilenet_v2": "features.17"}


def hook_reference(model, x, classes, layer_name):
    """Activation and plain gradient at a layer with a bare forward hook (no library code)."""
    module = dict(model.named_modules())[layer_name]
    box = []

    def hook(m, i, o):
        leaf = o.detach().clone().requires_grad_(True)
        box.append(leaf)
        return leaf * 1.0  # in-place ops downstream act on this copy, not on the leaf

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            y = model(x)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(y[torch.arange(len(classes)), classes].sum(), box[0])
    return box[0].detach(), g


class Exploding(nn.Module):
    """A ReLU net that raises inside its forward pass, after the Grad-CAM layer, when armed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 5 * 5, 3)
        self.armed = False

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        if self.armed:
            raise RuntimeError("boom inside the model")
        return self.fc(self.drop(h).flatten(1))


def primed_model_and_input():
    torch.manual_seed(0)
    model = Exploding().train()  # training flags must come back
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.conv.bias.requires_grad_(False)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    x.grad = torch.full_like(x, 0.5)
    return model, x


class TwoBranch(nn.Module):
    """'unused' runs but does not reach the output; 'flat' outputs (N, C, L) from 2-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = nn.Conv2d(3, 2, 1)
        self.flat = nn.Flatten(2)
        self.twice = nn.ReLU()
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        self.unused(x)
        h = self.twice(self.twice(self.conv(x)))
        return self.fc(self.flat(h).flatten(1))


def trained_embedded_model(name):
    """The shipped embedded model ``name``, or the one in $TORCHRAY_LIKE_CANDIDATE_WEIGHTS (a
    folder of candidate weights from ``train_embedded.py --out``, checked before shipping);
    skips the test when neither is there."""
    import hashlib
    import os

    from torchray_like.benchmark import embedded_models as em
    folder = os.environ.get("TORCHRAY_LIKE_CANDIDATE_WEIGHTS")
    try:
        if folder:
            path = os.path.join(folder, em.EMBEDDED_WEIGHTS[name][0])
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            return em.load_embedded_model(name, path=path, sha256=digest)
        return em.load_embedded_model(name)
    except (em.WeightsError, FileNotFoundError) as exc:
        pytest.skip(f"weights of {name} not available: {exc}")


@pytest.fixture
def folded_forms_on_small_layers(monkeypatch):
    """Reach LRP-γ's and α-β's folded forms (``lrp_closed.gamma_folded``,
    ``alpha_beta_folded``) on small test layers too: by default a small weight is folded
    instead (``FOLD_FIXED_COST``), which gives the same relevance by another path."""
    from torchray_like.attribution import lrp_closed

    monkeypatch.setattr(lrp_closed, "FOLD_FIXED_COST", 0)


@contextlib.contextmanager
def channel_zeroed(module: torch.nn.Module, k: int):
    """Inside the block, ``module``'s output has channel ``k`` set to zero (a forward hook
    that returns a copy): the ablated forward pass of Ablation-CAM's hand references."""
    def zero(_module, _inputs, out):
        out = out.clone()
        out[:, k] = 0
        return out

    handle = module.register_forward_hook(zero)
    try:
        yield
    finally:
        handle.remove()
