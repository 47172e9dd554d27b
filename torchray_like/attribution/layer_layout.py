r"""The layout of an explicitly named layer's output, from the module that produced it.

Layer methods read ``saliency_layer``'s output as ``(N, C, *spatial)``.  Inside the blocks of
ConvNeXt, Swin and MaxViT, modules compute on other layouts: torchvision's ConvNeXt block runs
``Permute([0, 2, 3, 1])``, ``LayerNorm``, ``Linear``, ``GELU``, ``Linear`` on a channels-last
``(N, H, W, C)`` map (Liu et al. 2022, "A ConvNet for the 2020s", arXiv 2201.03545); MaxViT's
attention runs on window partitions ``(N, windows, window tokens, C)`` (Tu et al. 2022, arXiv
2204.01697).  Read as it is, such an output is a silently wrong map (``C = H``), and with
``resize=True`` even one of the right shape.  :func:`module_layout` says what the module that
produced the tensor makes certain:

* ``nn.Linear`` acts on the last axis: its output's features are last.  So are those of an
  ``nn.LayerNorm`` over the last axis only (``normalized_shape`` of length 1; torchvision's
  ``LayerNorm2d``, which overrides ``forward`` to normalise the channels of ``(N, C, H, W)``,
  gives no such verdict), and those of a ``Permute`` module (torchvision's
  ``torchvision.ops.misc.Permute``: a ``dims`` list) that moves axis 1 last (``[0, 2, 3, 1]``).
  A ``Permute`` that moves the last axis to 1 (``[0, 3, 1, 2]``) gives a channels-first map;
  another permutation is refused.
* convolutions, batch / group / instance norms and pooling give channels-first maps.
* a module that keeps its input's layout (activations, dropout, ``Identity``, torchvision's
  ``StochasticDepth``) has the layout of the module run before it when both are children of an
  ``nn.Sequential`` (whose order is its execution order, unless a subclass overrides
  ``forward``); such an ``nn.Sequential`` has the layout of its last child.  Elsewhere
  nothing is certain and nothing is decided here.
* anything inside a window-partitioned attention layer (a module with ``partition_op`` and
  ``departition_op``: torchvision's MaxViT) except the departition itself is refused.

:func:`explicit_layout` turns the verdict into a read:

* a features-last output of the input's rank whose middle axes are a grid of the input (one
  common stride) is read channels-last (``(N, *grid, C)`` → ``(N, C, *grid)``); one whose
  middle axes are no such grid (MaxViT's windows, MobileViT's unfolded patches, a linear
  layer over a map's width) is refused;
* a features-last ``(N, T, D)`` of an image or video is a token sequence, inferred as in a
  token model (:mod:`~torchray_like.attribution.tokens`) even in a model that does not say it
  works on tokens (it was read as a 1-D map ``(N, C=T, D)``) — except that of a linear layer
  with as many inputs or outputs as the input has patches: MLP-Mixer's token-mixing MLP
  (Tolstikhin et al. 2021, arXiv 2105.01601) runs on ``(N, D, T)`` and puts the *tokens*
  last, which its shape cannot tell apart, so it is refused;
* a channels-first verdict at the input's rank reads the tensor as it is (also in a model
  whose stages are channels-last: Swin's patch-embedding convolution);
* anything else is left to the token inference, as before.

A refusal is a :class:`ValueError` naming ``saliency_layer``, the module, its output shape and
what to pass instead (the enclosing block whose output is a map; or ``tokens=``).
``tokens=`` given (``False``, a ``TokenLayout``, a callable) overrides all of this.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple, TypeGuard, Union

import torch.nn as nn

from .modules import current_scan, iter_modules, strip_compiled_prefix, unwrap_compiled

__all__ = ["module_layout", "explicit_layout", "is_grid", "Verdict"]

#: ``"first"`` (channels-first map), ``"last"`` (features last), ``("refuse", why)`` or None.
Verdict = Union[None, str, Tuple[str, str]]

_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                   nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                   nn.GroupNorm, nn.LocalResponseNorm, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                   nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)

#: Modules whose output has their input's layout (element-wise, or the identity).
_KEEPS_LAYOUT = (nn.Identity, nn.modules.dropout._DropoutNd, nn.GELU, nn.ReLU, nn.ReLU6,
                 nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                 nn.ELU, nn.Mish, nn.Softplus, nn.PReLU)
_KEEPS_LAYOUT_NAMES = ("StochasticDepth", "DropPath")


def _keeps_layout(module: nn.Module) -> bool:
    return isinstance(module, _KEEPS_LAYOUT) or type(module).__name__ in _KEEPS_LAYOUT_NAMES


def _permute_verdict(module: nn.Module, rank: int) -> Verdict:
    dims = getattr(module, "dims", None)
    if not isinstance(dims, (list, tuple)) or sorted(dims) != list(range(rank)):
        return None
    dims = list(dims)
    if dims == list(range(rank)):
        return "keep"
    if dims == [0] + list(range(2, rank)) + [1]:
        return "last"
    if dims == [0, rank - 1] + list(range(1, rank - 1)):
        return "first"
    return ("refuse", f"it permutes the axes by {dims}, which is neither channels-last "
                      f"{[0] + list(range(2, rank)) + [1]} nor channels-first")


def _own_verdict(module: nn.Module, rank: int) -> Verdict:
    """What the module's own kind says of its output (``"keep"``: its input's layout)."""
    if isinstance(module, nn.Linear):
        return "last"
    if isinstance(module, nn.LayerNorm):
        # torchvision's LayerNorm2d overrides forward (channels of an NCHW map): no verdict
        plain = type(module).forward is nn.LayerNorm.forward
        return "last" if plain and len(module.normalized_shape) == 1 else None
    if isinstance(module, _CHANNELS_FIRST):
        return "first"
    if type(module).__name__ == "Permute":
        return _permute_verdict(module, rank)
    if _keeps_layout(module):
        return "keep"
    return None


class _Tree:
    """The parent of each of ``model``'s modules: along the dotted ``path`` the layer was
    named by (a module shared by two parents is read where the name puts it), then those a
    verdict reads in an ``nn.Sequential``; one walk of the whole tree only for a parent still
    unknown (a layer given as a module object).  Without building the dotted names, which
    cost more than the walk; :meth:`name` builds them for an error message."""

    def __init__(self, model: nn.Module, path: str = "") -> None:
        self.model = model
        self._parent: Optional[Dict[int, Tuple[nn.Module, str]]] = None
        self._windows: Optional[bool] = None
        # The parents known without the walk: along the layer's dotted name, and the children
        # of the Sequentials a verdict reads (the walk of a whole model costs ~15 µs on every
        # layer read of a small CNN, a few per cent of Grad-CAM's call on a tiny one).
        self._known: Dict[int, Tuple[nn.Module, str]] = {}
        module = model
        for part in path.split(".") if path else ():
            child = module._modules.get(part)
            if child is None:
                break
            self._known[id(child)] = (module, part)
            module = child

    def note(self, child: nn.Module, parent: nn.Module, name: str) -> None:
        """Record ``parent`` as the module holding ``child`` under ``name`` (read without the
        walk)."""
        self._known.setdefault(id(child), (parent, name))

    def parent_of(self, module: nn.Module) -> Optional[Tuple[nn.Module, str]]:
        """The module holding ``module`` and its name there (``None``: the model, or a module
        outside it)."""
        if module is self.model:
            return None
        known = self._known.get(id(module))
        return known if known is not None else self.parent.get(id(module))

    @property
    def parent(self) -> Dict[int, Tuple[nn.Module, str]]:
        if self._parent is None:
            self._parent = {}
            stack = [self.model]
            while stack:
                module = stack.pop()
                for child_name, child in module._modules.items():
                    if child is not None and id(child) not in self._parent \
                            and child is not self.model:
                        self._parent[id(child)] = (module, child_name)
                        stack.append(child)
        return self._parent

    @property
    def has_windows(self) -> bool:
        """Whether some module is a window-partitioned attention layer (one look per module,
        through the call's scan of the tree when there is one)."""
        if self._windows is None:
            scan = current_scan(self.model)
            modules = scan.modules if scan is not None else iter_modules(self.model)
            self._windows = any(_is_window_layer(m) for m in modules)
        return self._windows

    def name(self, module: nn.Module) -> str:
        parts: List[str] = []
        found = self.parent_of(module)
        while found is not None and len(parts) < 64:
            module, part = found
            parts.append(part)
            found = self.parent_of(module)
        return ".".join(reversed(parts))

    def ancestors(self, module: nn.Module) -> List[nn.Module]:
        out: List[nn.Module] = []
        found = self.parent_of(module)
        while found is not None and len(out) < 64:
            module = found[0]
            out.append(module)
            found = self.parent_of(module)
        return out


Decision = Tuple[Verdict, Optional[nn.Module]]


def _in_order(module: nn.Module) -> TypeGuard[nn.Sequential]:
    """An nn.Sequential that runs its children in order (its forward not overridden)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _decide(tree: _Tree, module: nn.Module, rank: int, depth: int = 0) -> Decision:
    """The verdict on ``module``'s output and the module whose kind gave it."""
    if depth >= 32:
        return None, None
    if _in_order(module) and len(module) > 0:
        name, last = next(reversed(module._modules.items()))
        if last is None:
            return None, None
        tree.note(last, module, name)
        return _decide(tree, last, rank, depth + 1)
    own = _own_verdict(module, rank)
    if own != "keep":
        return own, module if own is not None else None
    return _decide_before(tree, module, rank, depth + 1)


def _decide_before(tree: _Tree, module: nn.Module, rank: int, depth: int) -> Decision:
    """The verdict on ``module``'s input, when an enclosing nn.Sequential (whose order is the
    execution order) makes it known: the previous child's output, or the Sequential's input."""
    parent = tree.parent_of(module)
    if parent is None or not _in_order(parent[0]) or depth >= 32:
        return None, None
    named = list(parent[0]._modules.items())
    index = next(i for i, (_, child) in enumerate(named) if child is module)
    if index == 0:
        return _decide_before(tree, parent[0], rank, depth + 1)
    name, before = named[index - 1]
    if before is None:
        return None, None
    tree.note(before, parent[0], name)
    return _decide(tree, before, rank, depth + 1)


def _is_window_layer(module: nn.Module) -> bool:
    # Sub-modules assigned as attributes are registered children: a dict lookup each.
    children = module._modules
    return "partition_op" in children and "departition_op" in children


def _partitioned(tree: _Tree, module: nn.Module) -> Optional[nn.Module]:
    """The window-partitioned attention layer ``module`` lies inside (MaxViT), if any."""
    # Its ancestors known along the dotted name: a look at each (cheaper than asking whether
    # the model has such a layer at all, a look at every module).
    if id(module) not in tree._known and not tree.has_windows:
        return None
    for ancestor in tree.ancestors(module):
        if _is_window_layer(ancestor):
            return None if module is ancestor._modules["departition_op"] else ancestor
    return None


def _module_decision(tree: _Tree, module: nn.Module, rank: int) -> Decision:
    window = _partitioned(tree, module)
    if window is not None:
        return ("refuse", f"it lies inside {type(window).__name__} {tree.name(window)!r}, "
                          "which computes on window partitions (N, windows, window tokens, C), "
                          "no map of the input"), window
    return _decide(tree, module, rank)


def module_layout(model: nn.Module, module: nn.Module, rank: int) -> Verdict:
    """What ``module`` (a sub-module of ``model``) makes certain of the layout of its output
    of rank ``rank``: ``"first"`` (``(N, C, *spatial)``), ``"last"`` (features on the last
    axis), ``("refuse", reason)`` or ``None`` (nothing certain; module docstring)."""
    return _module_decision(_Tree(model), module, rank)[0]


def is_grid(dims: Sequence[int], spatial: Sequence[int]) -> bool:
    """Whether ``dims`` is ``spatial`` divided by one common stride (rounded down or up); for
    video ``(T, H, W)`` the time axis may have a stride of its own (a tubelet embedding's)."""
    if len(dims) != len(spatial) or not spatial:
        return False

    def divides(d: Sequence[int], n: Sequence[int]) -> bool:
        return any(all(a in {b // s, -(-b // s)} for a, b in zip(d, n))
                   for s in range(1, max(n) + 1))

    if len(spatial) == 3:
        return divides(dims[:1], spatial[:1]) and divides(dims[1:], spatial[1:])
    return divides(dims, spatial)


def _enclosing(tree: _Tree, module: nn.Module, rank: int) -> str:
    """The closest enclosing module the rules read as a map or leave to the usual read (for
    the advice of a refusal)."""
    window = _partitioned(tree, module)
    if window is not None:
        return tree.name(window)
    for ancestor in tree.ancestors(module):
        if ancestor is not tree.model and _decide(tree, ancestor, rank)[0] in (None, "first"):
            return tree.name(ancestor)
    return ""


def _resolve(model: nn.Module, layer: Any) -> Tuple[Optional[nn.Module], str]:
    """``layer`` (a module, or its dotted name, ``torch.compile``'s ``_orig_mod.`` prefix
    allowed) as a module of ``model`` and its dotted name (``""`` for a module given as it
    is); ``None`` for the input or a name not found (the callers resolve the layer themselves
    and say what is wrong with it)."""
    if isinstance(layer, nn.Module):
        return layer, ""
    layer = strip_compiled_prefix(layer, model)
    if not isinstance(layer, str) or layer == "":
        return None, ""
    try:
        return model.get_submodule(layer), layer
    except AttributeError:
        return None, ""


def _mixes_tokens(decider: Optional[nn.Module], patches: Collection[int]) -> bool:
    """A linear layer with as many inputs or outputs as the input has patches: it may mix the
    tokens (MLP-Mixer's token-mixing MLP, run on ``(N, D, T)``), so its last axis may hold
    tokens, not features."""
    return isinstance(decider, nn.Linear) and bool(
        {decider.in_features, decider.out_features} & set(patches))


def explicit_layout(model: nn.Module, layer: Any, shape: Sequence[int],
                    input_shape: Sequence[int], patches: Collection[int] = (),
                    token_model: bool = True) -> Any:
    """How the output of ``shape`` of the explicitly named ``layer`` (a module of ``model`` or
    its name) is read for an input of ``input_shape`` whose patch grid (at the patch
    embedding's stride) may have any count in ``patches``: ``None`` (nothing certain: the
    token inference decides), ``False`` (read as it is, a map), ``"last"`` (a channels-last
    map ``(N, *grid, C)``) or ``"tokens"`` (a features-last token sequence ``(N, T, D)`` of an
    image or video, inferred as in a token model).  For 1-D data a features-last output
    ``(N, L, D)`` is read channels-last only in a ``token_model``
    (:func:`~.tokens.is_token_model`): elsewhere it cannot be told from a linear layer over the
    length axis of ``(N, C, L)`` (a grid of almost any length passes), and it is refused.

    Raises
    ------
    ValueError
        The module makes the output no map of the input (a window partition, a features-last
        tensor whose middle axes are no grid of the input, an unknown permutation, a linear
        layer that may mix tokens); the message names ``saliency_layer``, the module, the
        shape and what to pass instead.
    """
    shape, input_shape = tuple(shape), tuple(input_shape)
    model = unwrap_compiled(model)  # torch.compile(model): the original module's names
    module, path = _resolve(model, layer)
    if module is None or module is model or len(input_shape) < 3:
        return None
    tree = _Tree(model, path)
    verdict, decider = _module_decision(tree, module, len(shape))
    why = _refusal(verdict, decider, shape, input_shape, patches) or (
        _ambiguous_1d(verdict, shape, input_shape) if not token_model else None)
    if why is None:
        if verdict == "last":
            return "last" if len(shape) == len(input_shape) else (
                "tokens" if len(shape) == 3 and len(input_shape) >= 4 else None)
        return False if verdict == "first" and len(shape) == len(input_shape) else None
    label = repr(layer) if isinstance(layer, str) else type(layer).__name__
    block = _enclosing(tree, module, len(shape))
    raise ValueError(
        f"saliency_layer {label} ({type(module).__name__}) outputs shape {shape}, which is no "
        f"(N, C, *spatial) map of the input of shape {input_shape}: {why}; pass instead the "
        f"enclosing block" + (f" (saliency_layer={block!r})" if block else "")
        + " whose output is a map, or, where the method takes tokens=, a callable tensor -> "
        "(N, C, *grid) (tokens=TokenLayout(channels_last=True) for a channels-last map, "
        "TokenLayout(prefix=..., grid=(h, w)) for a token sequence, tokens=False to read the "
        "tensor as it is)")


def _ambiguous_1d(verdict: Verdict, shape: Tuple[int, ...],
                  input_shape: Tuple[int, ...]) -> Optional[str]:
    if verdict == "last" and len(shape) == len(input_shape) == 3:
        return ("for 1-D data a features-last output (N, L, D) cannot be told from a linear "
                "layer over the length axis of (N, C, L); pass tokens=TokenLayout("
                "channels_last=True) if its last axis holds the features, tokens=False if it "
                "holds positions")
    return None


def _refusal(verdict: Verdict, decider: Optional[nn.Module], shape: Tuple[int, ...],
             input_shape: Tuple[int, ...], patches: Collection[int]) -> Optional[str]:
    """Why the output cannot be read (``None``: it can)."""
    if isinstance(verdict, tuple):
        return verdict[1]
    if verdict != "last":
        return None
    if len(shape) == len(input_shape) and not is_grid(shape[1:-1], input_shape[2:]):
        return (f"its features are on the last axis, and the other axes {shape[1:-1]} are no "
                f"grid of the input's {input_shape[2:]}")
    if len(shape) == 3 and len(input_shape) >= 4 and _mixes_tokens(decider, patches):
        assert isinstance(decider, nn.Linear)
        return (f"it comes from {type(decider).__name__}({decider.in_features}, "
                f"{decider.out_features}), and the input has {sorted(patches)} patches: a "
                "linear layer over the tokens (MLP-Mixer's token mixing, run on (N, D, T)) "
                "has the tokens last, which cannot be told from a features-last (N, T, D)")
    return None
