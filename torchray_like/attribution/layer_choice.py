r"""The automatic choice of a layer for layer methods (Grad-CAM and its family).

:func:`find_saliency_layer` runs the model once, without autograd, and picks the last module to
finish its forward whose output has a spatial layout ``(N, C, *spatial)``; see there for the
exact rule, the token models it refuses, and its cache.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .context import suspend_rule_contexts
from .state import (check_input, check_model, layout_hint, model_state_guard, opaque_modules,
                    unwrap_compiled)

__all__ = ["find_saliency_layer", "resolve_layer", "LayerType", "LAYER_CACHE"]

LayerType = Union[str, nn.Module, None]


#: The automatic choices made so far: model -> {(input signature, module structure): layer
#: name}.  Weak keys: the cache never keeps a model alive, and its entries go with the model.
#: Read it, or drop a model's entries with ``LAYER_CACHE.pop(model, None)``.
LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[Tuple, str]]" = (
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
    # (name, output shape or None, whether the module holds parameters)
    records: List[Tuple[str, Optional[Tuple[int, ...]], bool]] = []
    calls: Dict[str, int] = {}

    thread = threading.get_ident()

    def make_hook(name: str, has_params: bool) -> Callable:
        def hook(module, inputs, output):
            if threading.get_ident() != thread:
                return  # another thread running the same model meanwhile: not our pass
            calls[name] = calls.get(name, 0) + 1
            shape = (tuple(output.shape) if isinstance(output, torch.Tensor)
                     and output.is_floating_point() else None)
            records.append((name, shape, has_params))
        return hook

    # Hooks cannot be put inside TorchScript / compiled sub-modules: skip them (they are never
    # candidates; the driver refuses to probe them).
    hidden = {id(m) for _, om, _ in opaque_modules(model) for m in om.modules()}
    handles = []
    try:
        for name, module in model.named_modules():
            if name and id(module) not in hidden:
                has_params = next(module.parameters(), None) is not None
                handles.append(module.register_forward_hook(make_hook(name, has_params)))
        # One sample is enough to see the shapes; no graph, model state and RNG restored, the
        # caller's rule contexts suspended, and a copy of the input (in-place normalisation).
        with suspend_rule_contexts(), model_state_guard(model, freeze=False), torch.no_grad(), \
                _rng_fork(input.device):
            try:
                model(input[:1].detach().clone())
            except (RuntimeError, ValueError) as exc:
                hint = layout_hint(model, input)
                if hint is None:
                    raise
                raise ValueError(
                    f"{type(model).__name__} failed on input of shape {tuple(input.shape)} "
                    f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); {hint}"
                ) from exc
    finally:
        for handle in handles:
            handle.remove()

    rank = input.dim()

    def spatial(shape: Optional[Tuple[int, ...]]) -> bool:
        # A layout (N, C, *spatial): rank 4 or more (2-D and 3-D data), or rank 3 for 1-D data
        # only — (N, tokens, dim) sequences of image models are not spatial maps.
        if shape is None or shape[0] != 1 or not (len(shape) >= 4 or len(shape) == rank == 3):
            return False
        positions = 1
        for s in shape[2:]:
            positions *= s
        return positions > 1

    # Hooks fire when a module *finishes*, so an enclosing module returning the very same tensor
    # as its last child (ResNet's layer4 / layer4.1 / layer4.1.relu) comes after it: the last
    # record is the outermost.  Modules called more than once (a shared ReLU) are ambiguous.
    chosen = next((i for i in range(len(records) - 1, -1, -1)
                   if spatial(records[i][1]) and calls[records[i][0]] == 1), None)
    tokens = [(n, s) for n, s, p in records
              if p and rank >= 4 and s is not None and len(s) == 3 and s[0] == 1 and s[1] > 1]
    advice = ("pass saliency_layer explicitly: a module whose output is (N, C, *spatial); for "
              "a vision transformer, expose the patch tokens of a late block as a map "
              "(N, dim, h, w) with a reshaping module (see 'Grad-CAM on vision transformers' "
              "in docs/troubleshooting.rst)")
    if chosen is not None:
        name = records[chosen][0]
        # A token model (ViT): the only spatial layer is the patch embedding, which runs before
        # any other layer with parameters, and transformer blocks follow it.  Grad-CAM there
        # would explain the embedding, not the network: refuse rather than pick it.
        embedding = not any(p for n, _, p in records[:chosen]
                            if not n.startswith(name + "."))
        later_tokens = [(n, s) for n, s in tokens
                        if any(r[0] == n for r in records[chosen + 1:])]
        if not (embedding and later_tokens):
            return name
        raise ValueError(
            f"could not choose saliency_layer automatically: {type(model).__name__} turns its "
            f"input into a token sequence — the only spatial layer, {name!r} (output "
            f"{records[chosen][1]}), is the patch embedding, and later layers output "
            f"(N, tokens, dim) tensors ({later_tokens[0][0]!r} {later_tokens[0][1]}"
            + (f" and {len(later_tokens) - 1} more" if len(later_tokens) > 1 else "")
            + "), which have no spatial layout; " + advice)
    seen = sorted({f"{n} {s}" for n, s, _ in records if s is not None and len(s) >= 3})
    raise ValueError(
        f"could not choose saliency_layer automatically: no sub-module of "
        f"{type(model).__name__} called once outputs a tensor (N, C, *spatial) with more than "
        f"one spatial position for an input of shape {tuple(input.shape)}"
        + (f" (outputs seen: {', '.join(seen[:8])})" if seen else "")
        + ("; its (N, tokens, dim) outputs have no spatial layout" if tokens else "")
        + "; " + advice)


def find_saliency_layer(model: nn.Module, input: torch.Tensor) -> str:
    """Name of the layer Grad-CAM uses when ``saliency_layer`` is omitted.

    The rule: run the model once and take the **last module to finish its forward** whose output
    is a floating tensor with a spatial layout ``(N, C, *spatial)`` and more than one spatial
    position, among modules called exactly once (a module shared by several calls, such as the
    ``relu`` of a torchvision ResNet block, is ambiguous).  A spatial layout has rank 4 or more
    (2-D and 3-D data), or rank 3 only when the input itself is 1-D ``(N, C, L)``: for image
    models a rank-3 output is a token sequence ``(N, tokens, dim)`` or a flattened map, not a
    map.  When nested modules return the very same tensor the outermost finishes last and is
    chosen (ResNet: ``"layer4"``, not ``"layer4.1"``).  The model itself is never chosen, nor a
    module inside a TorchScript or compiled sub-module (hooks cannot see there).

    Token models are refused: when the chosen layer is a patch embedding (no layer with
    parameters runs before it) followed by layers with parameters that output token sequences
    — a vision transformer such as torchvision's ``VisionTransformer`` — a :class:`ValueError`
    asks for an explicit layer.  Expose the patch tokens of a late block as a map with a small
    reshaping module (recipe in ``docs/troubleshooting.rst``); that module is then chosen
    automatically too.

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
        When no sub-module qualifies (e.g. the input is so small that every feature map is 1×1,
        or a token model), or the model is a TorchScript module.
    """
    check_model(model)
    model = unwrap_compiled(model)  # torch.compile(model): the names of the original module
    check_input(input, needs_grad=False)
    for opaque_name, _, kind in opaque_modules(model):
        if opaque_name == "":
            raise ValueError(
                f"cannot choose saliency_layer automatically: the model is a {kind} module "
                f"({type(model).__name__}), whose layers forward hooks cannot see; layer "
                "methods need the eager (Python) model — build it from its class and load the "
                "weights, e.g. eager.load_state_dict(scripted.state_dict())")
    hint = layout_hint(model, input, certain_only=True)
    if hint is not None:
        raise ValueError(hint)
    key = _cache_key(model, input)
    with _LAYER_CACHE_LOCK:
        name = LAYER_CACHE.get(model, {}).get(key)
    if name is not None:
        return name
    name = _discover_layer(model, input)
    with _LAYER_CACHE_LOCK:
        entries = LAYER_CACHE.setdefault(model, {})
        if len(entries) >= _LAYER_CACHE_PER_MODEL:
            entries.pop(next(iter(entries)))  # oldest first: dicts keep insertion order
        entries[key] = name
    return name


def resolve_layer(model: nn.Module, input: torch.Tensor, saliency_layer: LayerType
                   ) -> Union[str, nn.Module]:
    """``None`` → the automatic layer; anything else is returned as given."""
    if saliency_layer is None:
        with suspend_rule_contexts():
            check_model(model)
            check_input(input)
            return find_saliency_layer(model, input)
    return saliency_layer
