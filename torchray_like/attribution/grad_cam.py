r"""Grad-CAM.

Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: visual explanations from deep
networks via gradient-based localization", ICCV 2017 (arXiv 1610.02391).  For a layer with
activations ``A`` of shape ``(N, K, *spatial)`` and the class score ``y_c``:

* the weight of channel ``k`` is the gradient averaged over every spatial position,
  ``α_k = mean_{u ∈ spatial} ∂y_c / ∂A_k[u]`` (all of ``L``, ``H × W`` or ``T × H × W``);
* the map is ``ReLU(Σ_k α_k A_k)``, at the layer's resolution ``(N, 1, *spatial)`` unless
  resized.

Backpropagation stops at the layer: a call costs one forward pass and the backward pass from the
score down to the layer's output, nothing below it.

When ``saliency_layer`` is omitted the layer is chosen by :func:`find_saliency_layer`: the last
module, in the order modules finish their forward, whose output still has more than one spatial
position (see there for the exact rule and its cache).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .driver import SaliencyDebug, saliency
from .maps import ActivationMap, SizeType
from .state import check_input, check_model, model_state_guard
from .targets import TargetType, get_backward_gradient

__all__ = ["grad_cam", "grad_cam_map", "find_saliency_layer"]

LayerType = Union[str, nn.Module, None]


# ---------------------------------------------------------------------------------------------
# The map
# ---------------------------------------------------------------------------------------------


def grad_cam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM map from a layer's activation and the gradient of the score with respect to it.

    Selvaraju et al. 2017, eq. 1–2: ``α_k = mean_u ∂y/∂A_k[u]`` over every spatial dimension,
    ``map = ReLU(Σ_k α_k A_k)``.

    Parameters
    ----------
    activation : torch.Tensor
        ``(N, K, *spatial)`` with 1 to 3 (or more) spatial dimensions.
    gradient : torch.Tensor
        The gradient of the explained score with respect to ``activation``, same shape.

    Returns
    -------
    torch.Tensor
        ``(N, 1, *spatial)``, non-negative, dtype and device of ``activation``.
    """
    if activation.dim() < 3:
        raise ValueError(
            f"Grad-CAM needs a layer output with spatial dimensions, shape (N, C, *spatial); got "
            f"shape {tuple(activation.shape)}: choose a convolutional layer (or omit "
            "saliency_layer to pick one automatically)")
    if gradient.shape != activation.shape:
        raise ValueError(
            f"grad_cam_map: gradient shape {tuple(gradient.shape)} differs from the activation "
            f"shape {tuple(activation.shape)}")
    spatial = tuple(range(2, activation.dim()))
    alpha = gradient.mean(dim=spatial)  # (N, K)
    # Σ_k α_k A_k as one batched matrix product: no (N, K, *spatial) temporary.
    n, k = activation.shape[:2]
    flat = activation.reshape(n, k, -1)
    weighted = torch.bmm(alpha.unsqueeze(1).to(flat.dtype), flat)  # (N, 1, positions)
    return weighted.view((n, 1) + tuple(activation.shape[2:])).clamp_(min=0)


# ---------------------------------------------------------------------------------------------
# Automatic layer choice
# ---------------------------------------------------------------------------------------------

# model -> {(input signature, module structure): layer name}.  Weak keys: the cache never keeps a
# model alive, and its entries go with the model.
_LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[Tuple, str]]" = (
    weakref.WeakKeyDictionary())
_LAYER_CACHE_LOCK = threading.Lock()
_LAYER_CACHE_PER_MODEL = 8


def _cache_key(model: nn.Module, input: torch.Tensor) -> Tuple:
    # The structure part changes when a sub-module is replaced or added, which can change the
    # answer; it costs one walk over the module tree (microseconds).
    structure = tuple((name, id(m)) for name, m in model.named_modules())
    return (tuple(input.shape[1:]), input.dtype, input.device.type, structure)


def _rng_fork(device: torch.device):
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _discover_layer(model: nn.Module, input: torch.Tensor) -> str:
    records: List[Tuple[str, Optional[Tuple[int, ...]]]] = []
    calls: Dict[str, int] = {}

    thread = threading.get_ident()

    def make_hook(name: str) -> Callable:
        def hook(module, inputs, output):
            if threading.get_ident() != thread:
                return  # another thread running the same model meanwhile: not our pass
            calls[name] = calls.get(name, 0) + 1
            shape = (tuple(output.shape) if isinstance(output, torch.Tensor)
                     and output.is_floating_point() else None)
            records.append((name, shape))
        return hook

    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        # One sample is enough to see the shapes; no graph, model state and RNG restored.
        with model_state_guard(model), torch.no_grad(), _rng_fork(input.device):
            model(input[:1].detach())
    finally:
        for handle in handles:
            handle.remove()

    def positions(shape: Tuple[int, ...]) -> int:
        out = 1
        for s in shape[2:]:
            out *= s
        return out

    # Hooks fire when a module *finishes*, so an enclosing module returning the very same tensor
    # as its last child (ResNet's layer4 / layer4.1 / layer4.1.relu) comes after it: the last
    # record is the outermost.  Modules called more than once (a shared ReLU) are ambiguous.
    for name, shape in reversed(records):
        if shape is not None and len(shape) >= 3 and positions(shape) > 1 and calls[name] == 1:
            return name
    seen = sorted({f"{n} {s}" for n, s in records if s is not None and len(s) >= 3})
    raise ValueError(
        f"could not choose saliency_layer automatically: no sub-module of "
        f"{type(model).__name__} called once outputs a tensor (N, C, *spatial) with more than "
        f"one spatial position for an input of shape {tuple(input.shape)}"
        + (f" (spatial outputs seen: {', '.join(seen[:8])})" if seen else "")
        + "; pass saliency_layer explicitly (a module name or the module)")


def find_saliency_layer(model: nn.Module, input: torch.Tensor) -> str:
    """Name of the layer Grad-CAM uses when ``saliency_layer`` is omitted.

    The rule: run the model once and take the **last module to finish its forward** whose output
    is a floating tensor ``(N, C, *spatial)`` with more than one spatial position, among modules
    called exactly once (a module shared by several calls, such as the ``relu`` of a torchvision
    ResNet block, is ambiguous).  When nested modules return the very same tensor the outermost
    finishes last and is chosen (ResNet: ``"layer4"``, not ``"layer4.1"``).  The model itself is
    never chosen.

    Examples with torchvision at 64×64 (2×2 feature maps): ResNet → ``"layer4"``, DenseNet and
    MobileNet-v2 → ``"features"``, SqueezeNet → ``"classifier.2"`` (its class-score maps after
    ReLU: Grad-CAM there is the CAM of Zhou et al.), VGG → ``"avgpool"`` (its
    ``AdaptiveAvgPool2d(7)`` output; at 224² it equals ``"features"``' output).  DenseNet's
    ``"features"`` ends with a batch norm that its forward then rectifies in place with
    ``F.relu``: the layer is read before that ReLU (the probe keeps a copy).  Pass a layer
    explicitly when you want another one.

    Cost: the discovery runs one forward pass on the first sample, without autograd, in eval mode
    and with the global RNG state restored.  The answer is cached per model (held by a weak
    reference, so the cache never keeps a model alive) and per input shape, dtype, device type
    and module structure, so repeated calls cost nothing more.  The cache assumes the model's
    layer shapes depend only on the input shape (no data-dependent control flow).

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    input : torch.Tensor
        A batch ``(N, C, *spatial)`` like the ones to explain.

    Returns
    -------
    str
        A dotted module name accepted by ``saliency_layer``.

    Raises
    ------
    ValueError
        When no sub-module qualifies (e.g. the input is so small that every feature map is 1×1).
    """
    check_model(model)
    check_input(input, needs_grad=False)
    key = _cache_key(model, input)
    with _LAYER_CACHE_LOCK:
        name = _LAYER_CACHE.get(model, {}).get(key)
    if name is not None:
        return name
    name = _discover_layer(model, input)
    with _LAYER_CACHE_LOCK:
        entries = _LAYER_CACHE.setdefault(model, {})
        if len(entries) >= _LAYER_CACHE_PER_MODEL:
            entries.pop(next(iter(entries)))  # oldest first: dicts keep insertion order
        entries[key] = name
    return name


def resolve_layer(model: nn.Module, input: torch.Tensor, saliency_layer: LayerType
                   ) -> Union[str, nn.Module]:
    """``None`` → the automatic layer; anything else is returned as given."""
    if saliency_layer is None:
        check_model(model)
        check_input(input)
        return find_saliency_layer(model, input)
    return saliency_layer


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


def grad_cam(model: nn.Module, input: torch.Tensor, target: TargetType,
             saliency_layer: LayerType = None, resize: SizeType = False,
             resize_mode: str = "bilinear", smooth: float = 0,
             context_builder: Optional[Callable[[], Any]] = None,
             get_backward_gradient: Callable = get_backward_gradient,
             debug: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """Grad-CAM saliency map (Selvaraju et al. 2017).

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode with frozen parameters; its state is restored).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The class to explain: one int for all samples, one per sample, a seed-gradient tensor
        shaped like the output, or a callable ``output -> (N,)`` scores.
    saliency_layer : str or torch.nn.Module, optional
        The layer whose output is weighted (dotted name or module).  ``None`` (default): chosen
        by :func:`find_saliency_layer`.  ``""`` means the input itself (the
        :func:`~torchray_like.attribution.common.saliency` convention).
    resize : bool, int or tuple
        ``False``: the map stays at the layer's resolution; ``True``: the input's spatial size;
        or an explicit size (see :func:`~torchray_like.attribution.common.resize_saliency`).
    resize_mode : str
        Interpolation for ``resize``; the linear family adapts to the rank (bilinear for images,
        trilinear for video, linear for 1-D).
    smooth : float
        If positive, Gaussian smoothing with ``sigma = smooth * max(map size)``.
    context_builder : callable, optional
        A rule context to run the forward pass in (default: none, the plain gradient).
    get_backward_gradient : callable
        ``(output, target) -> seed`` gradient.
    debug : bool
        Also return a :class:`~torchray_like.attribution.common.SaliencyDebug` (the layer's
        activation and gradient).

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *layer_spatial)`` non-negative maps (or resized), detached, on the input's
        device, in the input's dtype.
    """
    layer = resolve_layer(model, input, saliency_layer)
    return saliency(model, input, target, saliency_layer=layer, resize=resize,
                    resize_mode=resize_mode, smooth=smooth, context_builder=context_builder,
                    gradient_to_saliency=ActivationMap(
                        grad_cam_map, "grad_cam", layer,
                        "Grad-CAM needs (N, C, *spatial): choose a convolutional layer (or omit "
                        "saliency_layer to pick one automatically)"),
                    get_backward_gradient=get_backward_gradient, debug=debug)
