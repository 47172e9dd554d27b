"""Other libraries' equivalents of the new methods, for ``benchmarks/speed.py`` (a private helper
module: nothing to run).

Each builder returns a callable running the reference with the *same work* as our row (the same
steps, samples, window, layer and batch size), or a string saying why there is none
(``"n/a (not installed)"``, ``"n/a (RuntimeError: ...)"`` when the library refuses the model).
The libraries are optional and used as black boxes: Captum (``IntegratedGradients``,
``NoiseTunnel`` over ``Saliency``, ``Occlusion``, ``LRP``), pytorch-grad-cam (``ScoreCAM``,
``AblationCAM``, ``GradCAMPlusPlus``, ``LayerCAM``, ``XGradCAM``, ``HiResCAM``, ``EigenCAM``)
and Zennit (its ``Gradient`` attributor with the composites ``EpsilonPlusFlat``,
``EpsilonGammaBox``, ``EpsilonAlpha2Beta1`` and the torchvision canonizers that
``tests/test_lrp_zennit.py`` uses).
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn

#: The reference columns, in the order a row shows the first one it has.
LIBRARIES = ("captum", "grad-cam", "zennit")
Ref = Union[Callable[[], object], str]
NOT_INSTALLED = "n/a (not installed)"


def _import(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def versions() -> Dict[str, Optional[str]]:
    """Installed version of each reference library (``None``: not installed)."""
    found = {}
    for lib, module in (("captum", "captum"), ("grad-cam", "pytorch_grad_cam"),
                        ("zennit", "zennit")):
        mod = _import(module)
        if mod is None:
            found[lib] = None
            continue
        version = getattr(mod, "__version__", None)
        if version is None:
            from importlib import metadata
            try:
                version = metadata.version({"grad-cam": "grad-cam"}.get(lib, lib))
            except metadata.PackageNotFoundError:
                version = "?"
        found[lib] = version
    return found


def checked(ref: Ref) -> Ref:
    """Run a reference once: a library that refuses the model becomes an ``n/a`` string (the row
    is still measured) instead of an exception in the middle of the timing loop."""
    if isinstance(ref, str):
        return ref
    try:
        ref()
    except Exception as exc:  # the reference's own refusal, reported in the row
        return f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''})"
    return ref


# ---------------------------------------------------------------------------------------------
# Captum


def captum_integrated_gradients(model: nn.Module, x: torch.Tensor, target: List[int],
                                steps: int, batch: int) -> Ref:
    """``IntegratedGradients`` with the same ``n_steps``, Gauss–Legendre points and
    ``internal_batch_size`` (rows per forward batch, as ours)."""
    captum = _import("captum.attr")
    if captum is None:
        return NOT_INSTALLED
    t = torch.as_tensor(target)
    ig = captum.IntegratedGradients(model)
    return lambda: ig.attribute(x, target=t, n_steps=steps, method="gausslegendre",
                                internal_batch_size=batch)


def captum_smooth_grad(model: nn.Module, x: torch.Tensor, target: List[int], copies: int,
                       level: float) -> Ref:
    """``NoiseTunnel(Saliency)`` SmoothGrad: ``copies`` noisy copies in one batch, σ =
    ``level`` × the batch's range (ours takes each image's range: the same work)."""
    captum = _import("captum.attr")
    if captum is None:
        return NOT_INSTALLED
    t = torch.as_tensor(target)
    tunnel = captum.NoiseTunnel(captum.Saliency(model))
    sigma = level * float(x.max() - x.min())
    return lambda: tunnel.attribute(x, nt_type="smoothgrad", nt_samples=copies,
                                    nt_samples_batch_size=copies, stdevs=sigma, target=t)


def captum_occlusion(model: nn.Module, x: torch.Tensor, target: List[int], window: int,
                     stride: int, batch: int) -> Ref:
    """``Occlusion`` with the same window (every channel), stride and copies per forward."""
    captum = _import("captum.attr")
    if captum is None:
        return NOT_INSTALLED
    t = torch.as_tensor(target)
    occ = captum.Occlusion(model)
    c = x.shape[1]
    return lambda: occ.attribute(x, target=t, sliding_window_shapes=(c, window, window),
                                 strides=(c, stride, stride), baselines=0,
                                 perturbations_per_eval=batch)


def captum_lrp(model: nn.Module, x: torch.Tensor, target: List[int]) -> Ref:
    """Captum's ``LRP`` with its default rules (ε on every layer): it refuses models with layers
    it has no rule for (batch norm, residual additions), then the row says so."""
    captum = _import("captum.attr")
    if captum is None:
        return NOT_INSTALLED
    t = torch.as_tensor(target)
    return lambda: captum.LRP(model).attribute(x, target=t)


# ---------------------------------------------------------------------------------------------
# pytorch-grad-cam

GRAD_CAM_CLASSES = {"score_cam": "ScoreCAM", "ablation_cam": "AblationCAM",
                    "grad_cam": "GradCAM", "grad_cam_plus_plus": "GradCAMPlusPlus",
                    "layer_cam": "LayerCAM", "xgrad_cam": "XGradCAM", "hires_cam": "HiResCAM",
                    "eigen_cam": "EigenCAM"}


def grad_cam_method(method: str, model: nn.Module, x: torch.Tensor, target: List[int],
                    layer: nn.Module, batch: Optional[int] = None) -> Ref:
    """pytorch-grad-cam's class for ``method`` on the same layer; ``batch``: masked / ablated
    copies per forward pass (its ``batch_size``).  It returns maps resized to the input and
    normalised, in numpy: our row is timed with ``resize=True`` to do comparable work."""
    cams = _import("pytorch_grad_cam")
    if cams is None:
        return NOT_INSTALLED
    targets_mod = _import("pytorch_grad_cam.utils.model_targets")
    cls = getattr(cams, GRAD_CAM_CLASSES[method])
    targets = [targets_mod.ClassifierOutputTarget(c) for c in target]
    params = list(model.parameters())

    def run():
        # pytorch-grad-cam's objects hook the layer from their construction until released:
        # made and released per call (its documented ``with`` form), so that its hooks are never
        # on the model while our rows and floors are timed.  The benchmark's model is frozen;
        # pytorch-grad-cam backpropagates from the score with ``backward()``, which needs
        # trainable parameters (as a user's model has them).
        with cls(model=model, target_layers=[layer]) as cam:
            if batch is not None:
                cam.batch_size = batch
            trained = params if cam.uses_gradients else []
            for p in trained:
                p.requires_grad_(True)
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # ScoreCAM's bar per image
                    return cam(input_tensor=x, targets=targets)
            finally:
                for p in trained:
                    p.requires_grad_(False)
                    p.grad = None
    return run


# ---------------------------------------------------------------------------------------------
# Zennit

ZENNIT_COMPOSITES = {"lrp": "EpsilonPlusFlat", "lrp_epsilon_plus_flat": "EpsilonPlusFlat",
                     "lrp_epsilon_gamma_box": "EpsilonGammaBox",
                     "lrp_epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
                     "lrp_epsilon_plus": "EpsilonPlus"}


def _canonizer(zennit_tv, model: nn.Module):
    names = {type(m).__name__ for m in model.modules()}
    if "BasicBlock" in names or "Bottleneck" in names:
        return zennit_tv.ResNetCanonizer()
    if "BatchNorm2d" in names:
        return zennit_tv.SequentialMergeBatchNorm()
    return zennit_tv.VGGCanonizer()


def zennit_lrp(method: str, model: nn.Module, x: torch.Tensor, target: List[int]) -> Ref:
    """Zennit's ``Gradient`` attributor under the method's composite, with the torchvision
    canonizer of the model (ResNet, VGG), relevance started at the target score as ours.  The
    ``with`` block — registering the rules, canonizing, removing them — is inside the timed
    call, as our call enters and leaves its context."""
    if _import("zennit") is None:
        return NOT_INSTALLED
    composites = _import("zennit.composites")
    attribution = _import("zennit.attribution")
    canonizers = [_canonizer(_import("zennit.torchvision"), model)]
    name = ZENNIT_COMPOSITES[method]
    if name == "EpsilonGammaBox":
        low, high = float(x.min()), float(x.max())
        composite = composites.EpsilonGammaBox(low=torch.full_like(x, low),
                                               high=torch.full_like(x, high),
                                               canonizers=canonizers)
    else:
        composite = getattr(composites, name)(canonizers=canonizers)
    rows = torch.arange(x.shape[0])
    t = torch.as_tensor(target)

    def seed(out: torch.Tensor) -> torch.Tensor:
        one_hot = torch.zeros_like(out)
        one_hot[rows, t] = 1
        return one_hot * out

    def run():
        with attribution.Gradient(model, composite) as attributor:
            return attributor(x, seed)[1]
    return run
