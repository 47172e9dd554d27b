r"""The automatic choice of a layer for layer methods (Grad-CAM and its family).

:func:`find_saliency_layer` runs the model once, without autograd, and picks the last module to
finish its forward whose output has a spatial layout ``(N, C, *spatial)`` — for a vision
transformer, the last block whose patch tokens matter; see there for the exact rule and its
cache.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union, cast

import torch
import torch.nn as nn
from torch.autograd.graph import get_gradient_edge

from .autograd_graph import cuts
from .context import suspend_rule_contexts
from .inputs import call_model, check_grad_mode, check_input, layout_hint
from .modules import ModelScan, call_scan, check_model, opaque_modules, unwrap_compiled
from .reporting import warn_caller
from .state import model_state_guard
from .targets import Target, check_output_dtype, parse_target
from .tokens import infer_token_layout, is_token_model

__all__ = ["find_saliency_layer", "find_contrast_layer", "choose_layer", "LayerChoice",
           "BranchLayerWarning", "resolve_layer", "reachable_saliency_layer", "LayerType",
           "LAYER_CACHE"]

LayerType = Union[str, nn.Module, None]


#: The automatic choices made so far: model -> {(input signature, module structure):
#: :class:`LayerChoice`}.  Weak keys: the cache never keeps a model alive, and its entries go
#: with the model.  Read it, or drop a model's entries with ``LAYER_CACHE.pop(model, None)``.
LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[Tuple, LayerChoice]]" = (
    weakref.WeakKeyDictionary())
_LAYER_CACHE_LOCK = threading.Lock()
_LAYER_CACHE_PER_MODEL = 8


def _cache_key(scan: ModelScan, input: torch.Tensor) -> Tuple:
    # The structure part changes when a sub-module is replaced, added, removed or renamed,
    # which can change the answer: every module (identity, in ``named_modules`` order) with the
    # names of its children determines every dotted name.  It reads the call's scan of the
    # tree (no second walk, and no dotted names built: on small models they cost more than the
    # rest of a short call's checks).
    structure = tuple((id(m), tuple(m._modules.keys())) for m in scan.modules)
    return (tuple(input.shape[1:]), input.dtype, input.device.type, structure)


def _rng_fork(device: torch.device):
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)


@dataclass
class _Record:
    """One module's forward call seen by the discovery pass."""

    name: str
    shape: Optional[Tuple[int, ...]]   # of a floating tensor output, else None
    has_params: bool                   # the module or its children hold parameters
    own_params: bool                   # the module itself holds parameters
    alias: bool                        # it returned an earlier module's output it was given
    tensor: Optional[torch.Tensor] = None  # the output (floating), freed by the caller
    edge: Any = None  # the output's gradient edge when the module returned it


def _record_forward(model: nn.Module, input: torch.Tensor, first_only: bool = False
                    ) -> Tuple[List[_Record], Dict[str, int], Any, Any]:
    """Run the model once with a forward hook on every named module, with autograd recording,
    keeping the outputs and their gradient edges (on the whole batch, or on the first sample
    only with ``first_only``).  Returns the records, the calls per module, the output and the
    input leaf's gradient edge node.  A failure is explained with the whole input's shape."""
    records: List[_Record] = []
    calls: Dict[str, int] = {}
    outputs: Dict[int, Tuple[torch.Tensor, int]] = {}  # id -> (output, its version then)
    thread = threading.get_ident()

    def make_hook(name: str, has_params: bool, own_params: bool) -> Callable:
        def hook(module, inputs, output):
            if threading.get_ident() != thread:
                return  # another thread running the same model meanwhile: not our pass
            calls[name] = calls.get(name, 0) + 1
            floating = isinstance(output, torch.Tensor) and output.is_floating_point()
            # Returning an input that an earlier module output only renames that output —
            # unless the module changed it in place (ReLU(inplace=True)): then it computed the
            # values that continue, as the same module without inplace would have.
            alias = floating and id(output) in outputs and any(output is i for i in inputs) \
                and output._version == outputs[id(output)][1]
            records.append(_Record(
                name, tuple(output.shape) if floating else None, has_params, own_params,
                alias, output if floating else None,
                get_gradient_edge(output) if floating and output.requires_grad else None))
            if floating:
                outputs[id(output)] = (output, output._version)  # held: ids stay unique
        return hook

    # Hooks cannot be put inside TorchScript / compiled sub-modules: skip them (they are never
    # candidates; the driver refuses to probe them).
    hidden = {id(m) for _, om, _ in opaque_modules(model) for m in om.modules()}
    handles = []
    try:
        for name, module in model.named_modules():
            if name and id(module) not in hidden:
                handles.append(module.register_forward_hook(make_hook(
                    name, next(module.parameters(), None) is not None,
                    next(module.parameters(recurse=False), None) is not None)))
        # Model state and RNG restored, the caller's rule contexts suspended, and a copy of the
        # input (in-place normalisation).
        with suspend_rule_contexts(), model_state_guard(model, freeze=False), \
                torch.enable_grad(), _rng_fork(input.device):
            # The copy comes from a leaf that requires grad: the outputs are on a graph even
            # when every parameter is frozen, and the copy itself is no leaf (an in-place
            # normalisation of the input in the forward pass still works).
            leaf = (input[:1] if first_only else input).detach()
            if leaf.is_inference():  # made under inference_mode: no graph on it
                leaf = leaf.clone()
            leaf.requires_grad_(True)
            output = call_model(model, leaf.clone(), input)
    finally:
        for handle in handles:
            handle.remove()
    return records, calls, output, get_gradient_edge(leaf).node


def _output_tensors(output: Any) -> List[torch.Tensor]:
    """The tensors of a model output: a tensor, or the entries of a dict, tuple, list or
    dataclass (HuggingFace's ``ModelOutput``-like ``.logits``), one level deep."""
    if isinstance(output, dict):
        values: Any = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        values = [getattr(output, f.name, None) for f in dataclasses.fields(output)]
    else:
        values = [output]
    return [t for t in values if isinstance(t, torch.Tensor)]


def _class_counts(output: Any) -> Set[int]:
    """The numbers of classes of a model output (a tensor, or the tensors of a tuple / dict)."""
    return {int(t.shape[1]) if t.dim() >= 2 else 1 for t in _output_tensors(output)
            if t.dim() >= 1}


def _spatial(shape: Optional[Tuple[int, ...]], rank: int, batch: int) -> bool:
    """A layout (N, C, *spatial) of the input's batch and rank with more than one position: a
    video model's (N, heads, tokens, dim) or a 2-D layer of a 3-D model is no map of the
    input, nor is an image model's (N, tokens, dim) sequence."""
    if shape is None or len(shape) != rank or shape[0] != batch:
        return False
    positions = 1
    for s in shape[2:]:
        positions *= s
    return positions > 1


def _channels_last(records: List[_Record], i: int, end: int, input_shape: torch.Size) -> bool:
    """Whether record ``i`` holds a channels-last tensor ``(N, *spatial, C)`` rather than a map
    ``(N, C, *spatial)``: one of its "spatial" axes is longer than the input's (the channels)
    while another is shorter, or a later record (before the head) holds the same shape
    permuted to ``(N, C, *spatial)``.  ConvNeXt's and Swin's blocks compute in that layout
    between two permutes; when the model's last ``(N, C, 1, 1)`` map has a single position (a
    small input) the rule would otherwise read a block's ``(N, 1, 1, C)`` linear layer as one
    channel over a 1×C image."""
    shape = records[i].shape
    if shape is None or len(shape) < 4:
        return False  # 1-D data: one axis, nothing to compare
    pairs = list(zip(shape[2:], input_shape[2:]))
    if any(s > d for s, d in pairs) and any(s < d for s, d in pairs):
        return True
    permuted = (shape[0], shape[-1]) + tuple(shape[1:-1])
    return shape[1] != shape[-1] and any(r.shape == permuted for r in records[i + 1:end])


def _collapsed(shape: Optional[Tuple[int, ...]], rank: int, batch: int) -> bool:
    """A layout (N, C, 1, ..., 1) of the input's batch and rank: a map with one position."""
    return shape is not None and len(shape) == rank and shape[0] == batch and \
        all(s == 1 for s in shape[2:])


def _collapsing_block(model: nn.Module, records: List[_Record], i: int, end: int, rank: int,
                      batch: int) -> Optional[str]:
    """The name of a module enclosing record ``i`` (not an ``nn.Sequential``, a chain) whose
    output has one position and at least two children whose outputs have one position too
    — parallel paths reduced inside the block (Inception's Mixed_7a, a bottleneck with a
    strided shortcut, a ShuffleNet unit) — else ``None``.  Inside such a block a layer is a
    branch: the output also depends on the input through its other paths, and Grad-CAM there
    would explain part of the network."""
    name = records[i].name
    for r in records[i + 1:end]:
        if not name.startswith(r.name + ".") or not _collapsed(r.shape, rank, batch) or \
                isinstance(model.get_submodule(r.name), nn.Sequential):
            continue
        prefix = r.name + "."
        children = {c.name for c in records[:end] if c.name.startswith(prefix)
                    and "." not in c.name[len(prefix):] and not c.alias
                    and _collapsed(c.shape, rank, batch)}
        if len(children) >= 2:
            return r.name
    return None


def _last_candidate(model: nn.Module, records: List[_Record], calls: Dict[str, int], end: int,
                    input_shape: torch.Size, batch: int,
                    accept: Optional[Callable[[int], bool]] = None) -> Optional[int]:
    """The index of the last record before ``end`` that qualifies as a map (see
    :func:`find_saliency_layer`), preferring one outside blocks that reduce parallel paths to
    a single position (:func:`_collapsing_block`; small inputs: ResNet-50 at 32² would read
    ``layer4.0.bn1``, which its strided shortcut goes around, instead of ``layer3``); when no
    record outside qualifies, the last one inside.  ``accept`` (index -> bool) rules out more
    records (:func:`_cut_choice`: those the network goes around)."""
    rank = len(input_shape)
    outside: Tuple[str, ...] = ()
    chosen = None
    for i in range(end - 1, -1, -1):
        r = records[i]
        if not _spatial(r.shape, rank, batch) or calls[r.name] != 1 or r.alias or \
                r.name.startswith(outside) or _channels_last(records, i, end, input_shape) or \
                (accept is not None and not accept(i)):
            continue
        block = _collapsing_block(model, records, i, end, rank, batch)
        if block is None:
            return i
        chosen = i if chosen is None else chosen
        outside += (block + ".",)
    return chosen


def _head_start(records: List[_Record], classes: Set[int], rank: int, batch: int) -> int:
    """Where the classifier head starts: the last module with parameters of its own, when it
    outputs a class-score map (N, K, *spatial) with K a class count of the output (SqueezeNet's
    final 1×1 convolution, a segmentation head); else past the end.  Grad-CAM reads the
    layer *before* the head: class-score maps are the head's output, not features."""
    last = next((i for i in range(len(records) - 1, -1, -1) if records[i].own_params), None)
    if last is not None and _spatial(records[last].shape, rank, batch) and \
            records[last].shape[1] in classes:  # type: ignore[index]
        return last
    return len(records)


_ADVICE = ("pass saliency_layer explicitly: a module whose output is (N, C, *spatial), or a "
           "transformer block's (N, tokens, dim) output with tokens=TokenLayout(prefix=..., "
           "grid=(h, w)) when its layout cannot be inferred (see docs/transformers.rst)")


def _token_model(records: List[_Record], end: int, rank: int) -> Optional[_Record]:
    """The last record with parameters and rank >= 3 before the head, when it is a token
    sequence (N, T, D) of an image or video model (a transformer's final representation);
    else ``None`` (a CNN, or a channels-last Swin whose head reads an (N, C, h, w) map)."""
    if rank < 4:
        return None
    last = next((r for r in reversed(records[:end]) if r.has_params and r.shape is not None
                 and len(r.shape) >= 3), None)
    return last if last is not None and len(last.shape) == 3 else None  # type: ignore[arg-type]


def _patch_tokens_reached(model: nn.Module, input: torch.Tensor, records: List[_Record],
                          grads: List[Optional[torch.Tensor]]) -> List[str]:
    """The names of the records whose patch tokens (prefix dropped) get a non-zero gradient."""
    names = []
    for record, grad in zip(records, grads):
        try:
            layout = infer_token_layout(model, record.shape or (), input.shape)
        except ValueError:
            continue
        if grad is not None and layout is not None and layout.prefix is not None and \
                bool(grad[:, layout.prefix:].ne(0).any()):
            names.append(record.name)
    return names


@torch.enable_grad()  # the scores' sum differentiated below, under the caller's no_grad too
def _choose_tokens(model: nn.Module, input: torch.Tensor, last: _Record,
                   classes: Set[int], kept: Optional[Tuple[List[_Record], Dict[str, int], Any]]
                   = None) -> Optional[str]:
    """The automatic layer of a token model: the last module called once, with parameters,
    whose output is a token sequence with an inferable layout, no wider than the final tokens
    (not an attention's q/k/v projection nor an MLP's hidden layer), and whose patch tokens
    the output depends on.

    With a class-token head, the patch tokens after the last block's attention reach the
    output through nothing (the MLP and LayerNorm act per token): their gradient is zero and
    Grad-CAM there would be blank.  The rule then lands on the last block's first LayerNorm
    (torchvision ``encoder.layers.encoder_layer_{L-1}.ln_1``, timm ``blocks.{L-1}.norm1``,
    MViT ``blocks.{L-1}.norm1``), pytorch-grad-cam's usual choice; with a pooled head, on the
    last block's output.  One forward and backward pass on the first sample, with autograd
    (``kept``: the records, calls and output of such a forward pass already made)."""
    records, calls, output = kept if kept is not None else _record_forward(model, input[:1])[:3]
    end = _head_start(records, classes, input.dim(), 1)
    width = (last.shape or (0,))[-1]
    candidates = [r for r in records[:end] if r.tensor is not None and r.has_params
                  and r.shape is not None and len(r.shape) == 3 and r.shape[-1] <= width
                  and calls[r.name] == 1 and not r.alias and r.tensor.requires_grad]
    tensors = [cast(torch.Tensor, r.tensor) for r in candidates]
    scores = [t.sum() for t in _floating_outputs(output) if t.requires_grad]
    if not scores:
        _no_scores(model, output)
    final = next((i for i, r in enumerate(candidates) if r.name == last.name), None)
    try:
        if not scores or final is None:
            return None
        grads = torch.autograd.grad(torch.stack(scores).sum(), tensors, allow_unused=True,
                                    retain_graph=True)
        if grads[final] is None or not bool(grads[final].ne(0).any()):
            # A head that reads nothing yet (torchvision's ViT head starts at zero): ask which
            # tokens reach the final tokens a head reads, the prefix tokens (or all), along a
            # fixed random direction (a constant one sums a LayerNorm's output: zero gradient).
            layout = infer_token_layout(model, tensors[final].shape, input.shape)
            noise = torch.randn(tensors[final].shape, device="cpu",  # not the default device
                                generator=torch.Generator().manual_seed(0))
            seed = torch.zeros_like(tensors[final])
            upto = layout.prefix if layout is not None and layout.prefix else None
            seed[:, :upto] = noise[:, :upto].to(seed)
            grads = torch.autograd.grad(tensors[final], tensors, seed, allow_unused=True)
        reached = _patch_tokens_reached(model, input, candidates, list(grads))
        return reached[-1] if reached else None
    except ValueError:
        return None  # the final tokens' layout cannot be inferred: refused below
    finally:
        for r in records:
            r.tensor = None  # free the graph


def _choose(model: nn.Module, input: torch.Tensor, records: List[_Record],
            calls: Dict[str, int], output: Any, batch: int, reuse: bool = False) -> str:
    """The rule of :func:`find_saliency_layer` on the records of a pass of ``batch`` samples
    (``reuse``: all the records of a pass on the first sample with autograd and the outputs
    kept, which the token rule then reads instead of making its own)."""
    rank = input.dim()
    end = _head_start(records, _class_counts(output), rank, batch)
    last = _token_model(records, end, rank)
    if last is not None and is_token_model(model):
        # The discovery's pass (first sample, autograd, outputs kept) serves the token rule.
        name = _choose_tokens(model, input, last, _class_counts(output),
                              (records, calls, output) if reuse else None)
        if name is not None:
            return name
        raise ValueError(
            f"could not choose saliency_layer automatically: {type(model).__name__} ends in a "
            f"token sequence ({last.name!r} outputs {last.shape}), but no module called once "
            f"outputs tokens of that width whose layout on the input of shape "
            f"{tuple(input.shape)} can be inferred (patch grid and class/register tokens) and "
            "which the output depends on; " + _ADVICE)
    # Hooks fire when a module *finishes*, so an enclosing module returning the very same tensor
    # as its last child (ResNet's layer4 / layer4.1 / layer4.1.relu) comes after it: the last
    # record is the outermost.  Modules called more than once (a shared ReLU) are ambiguous;
    # a module returning an earlier module's output it was given unchanged (Identity,
    # eval-mode Dropout) only renames it: the module that computed it is chosen.
    chosen = _last_candidate(model, records, calls, end, input.shape, batch)
    tokens = [r for r in records if r.has_params and rank >= 4 and r.shape is not None
              and len(r.shape) == 3 and r.shape[1] > 1]
    if chosen is not None:
        name = records[chosen].name
        # A token model (ViT): the only spatial layer is the patch embedding, which runs before
        # any other layer with parameters, and transformer blocks follow it.  Grad-CAM there
        # would explain the embedding, not the network: refuse rather than pick it.
        embedding = not any(r.has_params for r in records[:chosen]
                            if not r.name.startswith(name + "."))
        later = [r for r in tokens if any(o.name == r.name for o in records[chosen + 1:])]
        if not (embedding and later):
            return name
        raise ValueError(
            f"could not choose saliency_layer automatically: {type(model).__name__} turns its "
            f"input into a token sequence — the only spatial layer, {name!r} (output "
            f"{records[chosen].shape}), is the patch embedding, and later layers output "
            f"(N, tokens, dim) tensors ({later[0].name!r} {later[0].shape}"
            + (f" and {len(later) - 1} more" if len(later) > 1 else "")
            + "), which have no spatial layout; " + _ADVICE)
    seen = sorted({f"{r.name} {r.shape}" for r in records
                   if r.shape is not None and len(r.shape) >= 3})
    # The layers of a compiled or scripted sub-module are never seen: say so, or the message
    # reads as if the model had no convolutional layer at all.
    hidden = [f"{name!r} ({kind})" for name, _, kind in opaque_modules(model) if name]
    raise ValueError(
        f"could not choose saliency_layer automatically: no sub-module of "
        f"{type(model).__name__} called once outputs a tensor (N, C, *spatial) of the input's "
        f"rank with more than one spatial position for an input of shape "
        f"{tuple(input.shape)}" + (f" (outputs seen: {', '.join(seen[:8])})" if seen else "")
        + ("; its (N, tokens, dim) outputs have no spatial layout" if tokens else "")
        + (f"; the layers inside {', '.join(hidden[:4])} cannot be seen (hooks do not reach "
           "into compiled or scripted modules): explain the uncompiled model, or name a layer "
           "outside them" if hidden else "")
        + "; " + _ADVICE)


@dataclass(frozen=True)
class LayerChoice:
    """An automatic choice of :func:`find_saliency_layer` (the values of :data:`LAYER_CACHE`).

    Attributes
    ----------
    name : str
        The layer chosen.
    cut : str or None
        ``name`` when every path from the input to the output goes through that layer's
        output; else the last layer that qualifies and does, ``None`` when none does.  A
        transformer's token layer is taken as it is (its residual stream goes around it by
        design), and so is a layer autograd does not record (run under ``torch.no_grad()``
        in ``forward``: the methods then refuse it, saying why).
    contrast : str or None
        For a token layer: it or the innermost module enclosing it (by dotted name) whose
        output every path crosses — the last block's output for a ViT's ``ln_1`` — the
        automatic ``contrast_layer`` (:func:`find_contrast_layer`); ``None`` otherwise (not
        compared: two choices are equal by ``name`` and ``cut``).
    """

    name: str
    cut: Optional[str]
    contrast: Optional[str] = field(default=None, compare=False)


class BranchLayerWarning(UserWarning):
    """The automatically chosen layer lies on one branch of the network: the output also
    depends on the input by a path around it (a skip or residual sum written in ``forward``),
    so a map read there explains part of the network."""


def _floating_outputs(output: Any) -> List[torch.Tensor]:
    return [t for t in _output_tensors(output) if t.is_floating_point()]


def _no_scores(model: nn.Module, output: Any) -> None:
    """Why a token model's output gives no score to find its layer with: an integer output
    (the :class:`TypeError` of :func:`~.targets.check_output_dtype`), or one autograd does not
    record (a :class:`ValueError`)."""
    tensors = _output_tensors(output)
    for t in tensors:
        check_output_dtype(t, "saliency_layer=None")
    raise ValueError(
        f"could not choose saliency_layer automatically: {type(model).__name__}'s output "
        + ("holds no tensor" if not tensors else
           "does not depend on its input through autograd (a detached head, or one run under "
           "torch.no_grad())")
        + ", so which token layer it reads cannot be found; " + _ADVICE)


def _output_edges(output: Any) -> List[Any]:
    """The gradient edges of the model output's floating tensors on the graph (the roots of
    the cut checks)."""
    return [get_gradient_edge(t) for t in _floating_outputs(output) if t.requires_grad]


def _cut_choice(model: nn.Module, input: torch.Tensor, records: List[_Record],
                calls: Dict[str, int], output: Any, roots: List[Any], leaf: Any,
                name: str) -> Optional[str]:
    """:attr:`LayerChoice.cut` for the layer ``name`` chosen from ``records`` (the pass of
    :func:`_record_forward` on the first sample; ``roots``: :func:`_output_edges`)."""
    index = next(i for i in range(len(records) - 1, -1, -1) if records[i].name == name)
    if not _spatial(records[index].shape, input.dim(), 1) or not roots \
            or records[index].edge is None:
        # A token layer, or an output autograd does not see, or a layer off the graph (run
        # under no_grad / a reentrant checkpoint: the driver refuses it, saying so): taken as
        # it is, no claim of a path around it.
        return name

    def cut(i: int) -> bool:
        return records[i].edge is not None and cuts(roots, records[i].edge, leaf)

    if cut(index):
        return name
    end = _head_start(records, _class_counts(output), input.dim(), 1)
    found = _last_candidate(model, records, calls, end, input.shape, 1, accept=cut)
    return None if found is None else records[found].name


def _token_contrast(input: torch.Tensor, records: List[_Record], calls: Dict[str, int],
                    roots: List[Any], leaf: Any, name: str) -> Optional[str]:
    """:attr:`LayerChoice.contrast` for the token layer ``name``: it or the innermost module
    enclosing it whose (N, T, D) output every path crosses (``None`` for a map layer)."""
    record = next((r for r in reversed(records) if r.name == name), None)
    if record is None or _spatial(record.shape, input.dim(), 1) or not roots:
        return None
    last = {r.name: r for r in records}  # the outermost record of a name comes last
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        r = last.get(".".join(parts[:k]))
        if r is not None and calls.get(r.name) == 1 and not r.alias and r.edge is not None \
                and r.shape is not None and len(r.shape) == 3 and cuts(roots, r.edge, leaf):
            return r.name
    return None


def _discover_layer(model: nn.Module, input: torch.Tensor) -> LayerChoice:
    # One pass on the first sample with autograd: the rule reads the module outputs, the cut
    # check their graph.
    records, calls, output, leaf = _record_forward(model, input, first_only=True)
    try:
        name = _choose(model, input, records, calls, output, 1, reuse=True)
        roots = _output_edges(output)
        return LayerChoice(name,
                           _cut_choice(model, input, records, calls, output, roots, leaf, name),
                           _token_contrast(input, records, calls, roots, leaf, name))
    finally:
        for r in records:
            r.tensor = r.edge = None  # free the graph


def reachable_saliency_layer(model: nn.Module, input: torch.Tensor, target: Any) -> str:
    """The automatic layer among the layers the target's scores depend on.

    :func:`find_saliency_layer` knows no target; on a model with several heads (torchvision's
    ``fcn_resnet50(aux_loss=True)``, class + box heads) its choice may feed a head the target
    does not use.  This runs the model once on ``input`` with autograd, differentiates the
    target's scores down to every module output, and applies the same rule to the modules they
    reach.  Raises a :class:`ValueError` listing what was seen when none qualifies.
    """
    records, calls, output, _ = _record_forward(model, input)
    parsed = target if isinstance(target, Target) else parse_target(target, input.shape[0])
    scores, seed = parsed.seed(output)
    kept = [(r, r.tensor) for r in records if r.tensor is not None and r.tensor.requires_grad]
    grads = torch.autograd.grad(scores, [t for _, t in kept], seed, allow_unused=True) \
        if kept and scores.requires_grad else [None] * len(kept)
    reached = {r.name for (r, _), g in zip(kept, grads) if g is not None}
    used = [r for r in records if r.name in reached]
    for r in records:
        r.tensor = None  # free the graph
    try:
        return _choose(model, input, used, calls, output, input.shape[0])
    except ValueError as exc:
        raise ValueError(f"the target's scores depend on no layer that qualifies: {exc}") \
            from None


def find_saliency_layer(model: nn.Module, input: torch.Tensor) -> str:
    """Name of the layer Grad-CAM uses when ``saliency_layer`` is omitted.

    The rule: run the model once and take the **last module to finish its forward** whose output
    is a floating tensor with a spatial layout ``(N, C, *spatial)`` and more than one spatial
    position, among modules called exactly once (a module shared by several calls, such as the
    ``relu`` of a torchvision ResNet block, is ambiguous).  A spatial layout has rank 4 or more
    (2-D and 3-D data), or rank 3 only when the input itself is 1-D ``(N, C, L)``: for image
    models a rank-3 output is a token sequence ``(N, tokens, dim)`` or a flattened map, not a
    map.  When nested modules return the very same tensor the outermost finishes last and is
    chosen (ResNet: ``"layer4"``, not ``"layer4.1"``).  A module returning its input unchanged
    (``nn.Identity``, eval-mode dropout) only renames the previous module's output, which is
    chosen instead; one that changed it in place (``nn.ReLU(inplace=True)``) is chosen as the
    same module without ``inplace`` would be (the map does not depend on that flag).  The model
    itself is never chosen, nor a module inside a TorchScript or compiled sub-module (hooks
    cannot see there).

    Small inputs, whose last feature maps have a single position, get two more rules.  A
    channels-last tensor ``(N, *spatial, C)`` (ConvNeXt's and Swin's blocks) is no map. And
    a layer inside a block whose parallel paths meet at a single position (a module other than
    ``nn.Sequential`` whose output and two or more of its children's outputs have one
    position: a bottleneck with a strided shortcut, Inception's ``Mixed_7a``, a ShuffleNet
    unit) is a branch that the other paths go around; the last map outside such blocks is
    chosen (ResNet-50 at 32²: ``"layer3"``, not ``"layer4.0.bn1"``; Inception-v3 at 75²:
    ``"Mixed_6e"``), or the branch when there is none.

    Token models — an image or video model that works on tokens
    (:func:`~.tokens.is_token_model`) whose last layer with parameters before the head outputs
    a token sequence ``(N, T, D)`` — get a transformer block instead: the last module called
    once, with parameters, whose output is a token sequence with an inferable layout
    (:func:`~.tokens.infer_token_layout`), no wider than the final tokens, and whose patch
    tokens the output depends on (one more forward and backward pass on the first sample
    decides).  With a class-token head that is the last block's first LayerNorm (torchvision
    ``vit_*``: ``encoder.layers.encoder_layer_{L-1}.ln_1``; ``mvit_*``:
    ``blocks.{L-1}.norm1``): after it the patch tokens reach nothing and Grad-CAM would be
    blank.  The layer methods then read its tokens on the patch grid (``tokens=``; see
    ``docs/transformers.rst``).  Swin (``swin_*``, ``swin_v2_*``) ends in an ``(N, C, h, w)``
    map: its ``permute`` is chosen by the rule above.

    Examples with torchvision at 64×64 (2×2 feature maps): ResNet → ``"layer4"``, DenseNet and
    MobileNet-v2 → ``"features"``, SqueezeNet → ``"classifier.2"`` (its class-score maps after
    ReLU: Grad-CAM there is the CAM of Zhou et al.), VGG → ``"avgpool"`` (its
    ``AdaptiveAvgPool2d(7)`` output; at 224² it equals ``"features"``' output).  DenseNet's
    ``"features"`` ends with a batch norm that its forward then rectifies in place with
    ``F.relu``: the layer is read before that ReLU (the probe keeps a copy).  Pass a layer
    explicitly when you want another one.

    A layer the network goes around — the output also depends on the input by another path, a
    skip or residual sum written in the model's ``forward`` (``h = h + self.block(h)``) — is
    still chosen by the rule, but with a :class:`BranchLayerWarning` naming the last layer that
    qualifies and that every path crosses (:class:`LayerChoice`; a map there explains the whole
    network, one on a branch only part of it).  Blocks that hold their residual sum inside a
    module (torchvision's) are cut by their outputs: no warning.  Token layers are exempt
    (a transformer's residual stream goes around every block by design).

    Cost: the discovery runs one forward pass on the first sample, with autograd (the cut
    check walks its graph), in eval mode and with the global RNG state restored.  The answer is
    cached per model (held by a weak reference, so the cache never keeps a model alive) and
    per input shape, dtype, device type and module structure, so repeated calls cost nothing
    more.  The cache assumes the model's
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
        or a token model none of whose token layers has an inferable layout), or the model is
        a TorchScript module.
    """
    choice = choose_layer(model, input)
    if choice.cut != choice.name:
        warn_caller(
            f"saliency_layer was chosen automatically: {choice.name!r}, the last layer that "
            f"qualifies, lies on one branch of {type(model).__name__} — the output also "
            "depends on the input by a path around it (a skip or residual sum written in "
            "forward), so a map read there explains part of the network; "
            + (f"{choice.cut!r} is the last layer every path goes through: pass "
               f"saliency_layer={choice.cut!r} for the whole network, or "
               if choice.cut is not None else "no layer that qualifies cuts the network: ")
            + f"pass saliency_layer={choice.name!r} to keep this one", BranchLayerWarning)
    return choice.name


def choose_layer(model: nn.Module, input: torch.Tensor) -> LayerChoice:
    """The :class:`LayerChoice` behind :func:`find_saliency_layer` (no warning): the layer and
    the last one that cuts the network (cached alike)."""
    if not isinstance(model, nn.Module):
        check_model(model)  # the TypeError saying what a model must be
    # One walk of the module tree for the checks and the cache key (the scan of the method
    # call this runs in, if any).
    with call_scan(model) as scan:
        return _choose_layer(model, input, scan)


def find_contrast_layer(model: nn.Module, input: torch.Tensor) -> str:
    """The automatic ``contrast_layer`` of contrastive excitation backprop: the automatic
    saliency layer when the network cannot go around it, else the last layer that qualifies
    and cuts the network (:attr:`LayerChoice.cut`); the contrast needs a layer every path
    crosses.  For a token layer (whose residual stream goes around it), the innermost block
    enclosing it that every path crosses (:attr:`LayerChoice.contrast`: a ViT's last block).
    When none does, the automatic layer (the method then says it does not cut the network)."""
    choice = choose_layer(model, input)
    if choice.contrast is not None:
        return choice.contrast
    return choice.name if choice.cut is None else choice.cut


def _choose_layer(model: nn.Module, input: torch.Tensor, scan: ModelScan) -> LayerChoice:
    check_model(model)
    model = unwrap_compiled(model)  # torch.compile(model): the names of the original module
    check_input(input, needs_grad=False)
    # The discovery reads output versions (in-place changes), which inference mode lacks.
    check_grad_mode()
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
    key = _cache_key(scan, input)
    with _LAYER_CACHE_LOCK:
        choice = LAYER_CACHE.get(model, {}).get(key)
    if choice is not None:
        return choice
    choice = _discover_layer(model, input)
    with _LAYER_CACHE_LOCK:
        entries = LAYER_CACHE.setdefault(model, {})
        if len(entries) >= _LAYER_CACHE_PER_MODEL:
            entries.pop(next(iter(entries)))  # oldest first: dicts keep insertion order
        entries[key] = choice
    return choice


def resolve_layer(model: nn.Module, input: torch.Tensor, saliency_layer: LayerType
                   ) -> Union[str, nn.Module]:
    """``None`` → the automatic layer; anything else is returned as given."""
    if saliency_layer is None:
        with suspend_rule_contexts():
            check_model(model)
            check_input(input)
            return find_saliency_layer(model, input)
    return saliency_layer
