r"""Token sequences as maps: how layer methods read a transformer block.

A vision transformer's block outputs a token sequence ``(N, T, D)``: ``P`` prefix tokens (class,
distillation, register tokens) followed by the patch tokens of an ``h × w`` grid (``t × h × w``
for video), ``T = P + h·w``.  Swin's stages output a channels-last map ``(N, h, w, C)``.  Layer
methods need ``(N, C, *grid)``: :func:`layer_tokens` finds the rearrangement — drop the prefix
tokens, put the patch tokens on their grid, move the channels first — and the engine applies
it to the activation **and** to its gradient before the method's map function, so every CAM
variant works unchanged (the rearrangement is linear: applying it to the gradient gives the
gradient of the rearranged activation).  This is what pytorch-grad-cam asks its users to write
as a ``reshape_transform`` (Gildenblat et al., pytorch-grad-cam); ViTs: Dosovitskiy et al.
2021 (arXiv 2010.11929), DeiT: Touvron et al. 2021 (arXiv 2012.12877), registers: Darcet et al.
2024 (arXiv 2309.16588), Swin: Liu et al. 2021 (arXiv 2103.14030), MViT: Fan et al. 2021 / Li
et al. 2022 (arXiv 2112.01526).

How the layout is inferred (``tokens=None``), duck-typed from the model and the shapes:

* a read ``(N, T, D)`` of an image or video input ``(N, C, *S)`` (rank 4 or 5) of a model that
  works on tokens (:func:`is_token_model`: a patch or position embedding, prefix-token
  parameters, attention modules) is a token sequence; in any other model it is read as it is (a
  CNN's flattened ``(N, C, h·w)``).  The patch stride ``p`` comes from the model
  (``patch_size``, as torchvision's ``VisionTransformer``; ``patch_embed.patch_size``, as timm),
  else from the stride of the first convolution of the input's rank (the patch embedding:
  ``conv_proj``, ``patch_embed.proj``); later stages may have pooled the grid by powers of two
  (MViT), video keeps the embedding's temporal stride.  The grid is ``S / (p·2^k)`` (rounded
  down or up) and the prefix ``T − h·w``, known from the model where it says (timm's
  ``num_prefix_tokens``; ``class_token`` / ``cls_token`` / ``dist_token`` / ``reg_token``
  parameters; MViT's ``pos_encoding.class_token``), otherwise any count up to the number of
  patch tokens.  Exactly one answer is taken; none, or several, is a :class:`ValueError` naming
  the shape and asking for ``tokens=``.  The prefix tokens must come *first*: a model that
  keeps its registers as a 2-D ``(R, D)`` tensor (vit-pytorch's SimpleViT with registers,
  which packs them after the patches) gets a :class:`TokenOrderError` unless the prefix
  count is given.
* a read of the input's rank is a channels-last map ``(N, *grid, C)`` only in a model that
  says it works channels-last (torchvision's ``SwinTransformer``, timm's ``output_fmt ==
  "NHWC"``) and whose dimensions say so (the middle ones are a grid of the input, the last
  ones are not); every other read of the input's rank — any CNN — is read as it is.

* an explicitly named layer (``layer=``) is first read by the module that produced it, where
  that makes the layout certain (:mod:`~torchray_like.attribution.layer_layout`): a
  ``Linear``, a last-axis ``LayerNorm`` or a ``Permute([0, 2, 3, 1])`` inside ConvNeXt's
  block is read channels-last in any model, a convolution's output as it is, MaxViT's window
  partitions and MLP-Mixer's token-mixing layers are refused.

``tokens=`` overrides: ``False`` (read the tensor as it is), a :class:`TokenLayout` (any field
left ``None`` is inferred), or a callable ``tensor -> (N, C, *grid)`` applied to the
activation and to the gradient alike (a pure rearrangement: slicing, reshaping, permuting).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple, Union, cast

import torch
import torch.nn as nn

from .layer_layout import explicit_layout, is_grid

__all__ = ["TokenLayout", "TokensType", "layer_tokens", "tokens_to_map", "infer_token_layout",
           "is_token_model", "check_tokens", "patch_grids", "has_class_token",
           "TokenOrderError"]

_ADVICE = ("pass tokens=TokenLayout(prefix=..., grid=(h, w)) (prefix tokens to drop, patch "
           "grid), or a callable tensor -> (N, C, *grid), or tokens=False to read the tensor "
           "as it is")

_PREFIX_PARAMETERS = ("class_token", "cls_token", "dist_token", "reg_token", "register_tokens")


@dataclass(frozen=True)
class TokenLayout:
    """How a layer's output is laid out, for turning it into an ``(N, C, *grid)`` map.

    Attributes
    ----------
    prefix : int, optional
        Tokens before the patch tokens (class, distillation, register tokens), dropped.
        ``None``: inferred.
    grid : tuple of int, optional
        The patch grid ``(h, w)`` (or ``(t, h, w)`` for video); the patch tokens are in
        row-major order over it.  ``None``: inferred from the input's size.
    channels_last : bool
        The output is already a grid with the channels last, ``(N, *grid, C)`` (Swin's
        stages); ``prefix`` must then be ``None`` or 0.
    """

    prefix: Optional[int] = None
    grid: Optional[Tuple[int, ...]] = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.prefix is not None and (isinstance(self.prefix, bool) or not isinstance(
                self.prefix, Integral) or self.prefix < 0):
            raise ValueError(f"TokenLayout: prefix must be a non-negative int or None, got "
                             f"{self.prefix!r}")
        if self.grid is not None:
            grid = tuple(self.grid) if isinstance(self.grid, (tuple, list, torch.Size)) else ()
            if not 1 <= len(grid) <= 3 or not all(
                    isinstance(s, Integral) and not isinstance(s, bool) and s > 0
                    for s in grid):
                raise ValueError(f"TokenLayout: grid must be 1 to 3 positive ints, e.g. (14, 14) "
                                 f"or (8, 7, 7), got {self.grid!r}")
            object.__setattr__(self, "grid", tuple(int(s) for s in grid))
        if not isinstance(self.channels_last, bool):
            raise TypeError(f"TokenLayout: channels_last must be a bool, got "
                            f"{self.channels_last!r}")
        if self.channels_last and self.prefix:
            raise ValueError("TokenLayout: a channels-last map (N, *grid, C) has no prefix "
                             "tokens; pass prefix=None")

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as ``(N, C, *grid)`` (a view where possible; the layout must be complete:
        :func:`infer_token_layout` fills the fields left ``None``)."""
        if self.channels_last:
            if self.grid is not None and tuple(tensor.shape[1:-1]) != self.grid:
                raise ValueError(f"tokens: the layer outputs shape {tuple(tensor.shape)}, not a "
                                 f"channels-last map of grid {self.grid}; {_ADVICE}")
            return tensor.movedim(-1, 1)
        if self.prefix is None or self.grid is None:
            raise ValueError("TokenLayout: prefix and grid must be set to apply a layout "
                             "(infer_token_layout fills them)")
        if tensor.dim() != 3 or tensor.shape[1] != self.prefix + math.prod(self.grid):
            raise ValueError(
                f"tokens: the layer outputs shape {tuple(tensor.shape)}, which is not a token "
                f"sequence (N, {self.prefix} + {'·'.join(map(str, self.grid))}, D) of "
                f"{self.prefix} prefix token(s) and a {self.grid} patch grid; {_ADVICE}")
        n, _, d = tensor.shape
        return tensor[:, self.prefix:].reshape((n,) + self.grid + (d,)).movedim(-1, 1)


#: What ``tokens=`` accepts.
TokensType = Union[None, bool, TokenLayout, Callable[[torch.Tensor], torch.Tensor]]


def _model_prefix(model: nn.Module) -> Optional[int]:
    """The prefix-token count the model declares, if any (duck-typed)."""
    declared = getattr(model, "num_prefix_tokens", None)  # timm
    if isinstance(declared, Integral) and not isinstance(declared, bool):
        return int(declared)
    count, found = 0, False
    for name in _PREFIX_PARAMETERS:
        value = getattr(model, name, None)
        if isinstance(value, torch.Tensor):
            found = True
            # (1, R, D) as timm, or (R, D): a 2-D (4, D) register tensor was counted as 1
            count += int(value.shape[-2]) if value.dim() >= 2 else 1
    pos = getattr(model, "pos_encoding", None)   # torchvision MViT
    if isinstance(getattr(pos, "class_token", None), torch.Tensor):
        found, count = True, count + 1
    return count if found else None


_CLASS_PARAMETERS = ("class_token", "cls_token")


def has_class_token(model: nn.Module) -> Optional[bool]:
    """Whether ``model``'s first token is a class token the head reads: ``True`` when it has a
    ``class_token`` / ``cls_token`` tensor (torchvision, timm; MViT's
    ``pos_encoding.class_token``) and does not pool the patch tokens (timm's ``global_pool``
    ``"avg"``, ``"max"``, ``"avgmax"``; Hugging Face's ``config.use_mean_pooling``);
    ``False`` when it pools them, or declares its prefix
    tokens (timm's ``num_prefix_tokens``, ``reg_token``, ``dist_token``, a ``cls_token`` set
    to ``None``) without a class token (registers before average-pooled patches); ``None``
    when nothing says."""
    if getattr(model, "global_pool", None) in ("avg", "max", "avgmax") or getattr(
            getattr(model, "config", None), "use_mean_pooling", None) is True:
        # timm's pooled heads, Hugging Face's BEiT / Data2Vec-vision: the head pools the
        # patch tokens, also when a class token exists
        return False
    pos = getattr(model, "pos_encoding", None)   # torchvision MViT
    if any(isinstance(getattr(model, name, None), torch.Tensor) for name in _CLASS_PARAMETERS
           ) or isinstance(getattr(pos, "class_token", None), torch.Tensor):
        return True
    # (a class-token attribute that is not a tensor: timm's ``cls_token = None``)
    declares = any(hasattr(model, name) for name in _CLASS_PARAMETERS) or (
        _model_prefix(model) is not None)
    return False if declares else None


def patch_grids(model: nn.Module, spatial: Sequence[int]) -> List[Tuple[int, ...]]:
    """The patch grids an input of spatial size ``spatial`` may have in ``model``'s layers:
    ``spatial`` over the patch stride (from ``patch_size``, ``patch_embed.patch_size`` or the
    first convolution's stride) times 1, 2, 4 ... (rounded down or up)."""
    spatial = tuple(int(s) for s in spatial)
    return _grids(spatial, _patch_strides(model, len(spatial)))


class TokenOrderError(ValueError):
    """The model's tokens may not be prefix tokens followed by the patch tokens: no layout is
    inferred, and the attention methods make no guess."""


def _suffix_registers(model: nn.Module) -> Optional[str]:
    """A 2-D ``(R, D)`` register tensor (R > 1): implementations that keep registers so
    (vit-pytorch's SimpleViT with registers) pack them *after* the patch tokens."""
    for name in ("reg_token", "register_tokens"):
        value = getattr(model, name, None)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] > 1:
            return f"{name} of shape {tuple(value.shape)}"
    return None


def _check_register_order(model: nn.Module, given: TokenLayout) -> None:
    """A :class:`TokenOrderError` unless the prefix is given or the registers' place known."""
    suffix = None if given.prefix is not None else _suffix_registers(model)
    if suffix is not None:
        raise TokenOrderError(
            f"tokens: {type(model).__name__} keeps its registers as {suffix}; models that do "
            "(vit-pytorch's SimpleViT with registers) put them after the patch tokens, which "
            "a prefix layout cannot express: pass tokens= a callable tensor -> (N, C, *grid) "
            "that drops them (layer methods), or the prefix count (TokenLayout(prefix=...), "
            "num_prefix_tokens=) if they come first; the attention methods cannot read "
            "registers after the patches")


def _as_strides(value: Any, dims: int) -> Optional[Tuple[int, ...]]:
    if isinstance(value, Integral) and not isinstance(value, bool) and int(value) > 0:
        return (int(value),) * dims
    if isinstance(value, (tuple, list)) and len(value) == dims and all(
            isinstance(v, Integral) and int(v) > 0 for v in value):
        return tuple(int(v) for v in value)
    return None


def _patch_strides(model: nn.Module, dims: int) -> Tuple[int, ...]:
    """The patch embedding's stride per spatial dimension (1 when nothing says)."""
    for value in (getattr(model, "patch_size", None),
                  getattr(getattr(model, "patch_embed", None), "patch_size", None)):
        strides = _as_strides(value, dims)
        if strides is not None:
            return strides
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(dims)
    for module in model.modules():
        if conv is not None and isinstance(module, conv):
            return _as_strides(tuple(module.stride), dims) or (1,) * dims
    return (1,) * dims


def _sizes(length: int, stride: int) -> Set[int]:
    return {length // stride, -(-length // stride)} - {0}


def _grids(spatial: Sequence[int], strides: Sequence[int]) -> List[Tuple[int, ...]]:
    """The patch grids of ``spatial`` at the patch strides times 1, 2, 4, ... (video: the
    temporal stride is kept)."""
    grids: List[Tuple[int, ...]] = []
    for k in range(16):
        scale = [s * 2 ** k for s in strides]
        if len(spatial) == 3:
            scale[0] = strides[0]
        if any(s > length for s, length in zip(scale[-2:], spatial[-2:])):
            break
        for grid in itertools.product(*(sorted(_sizes(length, s))
                                        for length, s in zip(spatial, scale))):
            if grid not in grids:
                grids.append(grid)
    return grids


_TOKEN_ATTRIBUTES = _PREFIX_PARAMETERS + ("num_prefix_tokens", "patch_size", "patch_embed",
                                          "pos_embed", "pos_encoding", "seq_length")
_TOKEN_CLASS_WORDS = ("Attention", "Transformer", "ViT", "Vit", "Swin", "MViT", "DeiT")


def is_token_model(model: nn.Module) -> bool:
    """Whether ``model`` says it works on tokens: it has a patch embedding, position embedding
    or prefix-token attribute (:data:`_TOKEN_ATTRIBUTES`), or it or a sub-module is an
    attention / transformer module (by class name).  Only then is a rank-3 output of an image
    read as tokens: in a CNN, ``(N, C, h·w)`` is a flattened map (read as it is, as always).
    (The attributes are looked up on the model only: a missed ``hasattr`` on a module costs
    an exception, and a walk over ResNet-50's modules took 9 ms.)"""
    if any(hasattr(model, name) for name in _TOKEN_ATTRIBUTES):
        return True
    return any(word in type(module).__name__ for module in model.modules()
               for word in _TOKEN_CLASS_WORDS)


def _channels_last_model(model: nn.Module) -> bool:
    """Models that say their stages are channels-last (torchvision Swin, timm NHWC models)."""
    return getattr(model, "output_fmt", None) == "NHWC" or (
        type(model).__name__.startswith("Swin") and (
            hasattr(model, "permute")  # torchvision's SwinTransformer (v1, v2)
            or type(model).__module__.startswith("torchvision.models.video.swin")))


def infer_token_layout(model: nn.Module, shape: Sequence[int], input_shape: Sequence[int],
                       layout: Optional[TokenLayout] = None) -> Optional[TokenLayout]:
    """The complete :class:`TokenLayout` of a layer output of ``shape`` for an input of
    ``input_shape``, or ``None`` when the output is read as it is (``(N, C, *spatial)``).

    ``layout``'s fields that are set are kept; the others are inferred (module docstring).

    Raises
    ------
    ValueError
        A token sequence whose layout cannot be inferred, or is ambiguous; the message names
        the shapes and says what to pass as ``tokens=``.
    """
    shape, input_shape = tuple(shape), tuple(input_shape)
    spatial = input_shape[2:]
    given = layout or TokenLayout()
    if given.grid is not None and len(given.grid) != len(spatial):
        # A (16,) grid on an image made (N, 1, 16) maps: no map of the input.
        raise ValueError(
            f"tokens: the grid {given.grid} has {len(given.grid)} dimension(s) but the input of "
            f"shape {input_shape} has {len(spatial)} spatial dimension(s); give one grid size "
            "per spatial dimension, e.g. TokenLayout(prefix=1, grid=(14, 14)) for an image")
    if len(shape) == len(input_shape):
        if given.channels_last or (layout is None and _channels_last_model(model)
                                   and is_grid(shape[1:-1], spatial)
                                   and not is_grid(shape[2:], spatial)):
            return TokenLayout(grid=shape[1:-1], channels_last=True)
        if layout is None:
            return None
    if layout is None and not (len(shape) == 3 and len(input_shape) >= 4
                               and is_token_model(model)):
        return None
    if len(shape) != 3 or given.channels_last:
        raise ValueError(
            f"tokens: the layer outputs shape {shape}, which is no token sequence (N, T, D) "
            f"{'nor channels-last map ' if given.channels_last else ''}for the input of shape "
            f"{input_shape}; {_ADVICE}")
    count = shape[1]
    if given.prefix is not None and given.grid is not None:
        return given  # complete: its call checks the count
    _check_register_order(model, given)
    if given.grid is not None:
        if count < math.prod(given.grid):
            raise ValueError(f"tokens: the layer outputs shape {shape}: {count} tokens are "
                             f"fewer than the grid {given.grid}'s {math.prod(given.grid)}; "
                             + _ADVICE)
        derived, declared = count - math.prod(given.grid), _model_prefix(model)
        if declared is not None and derived != declared:
            # ViT with grid=(3, 3) for its 4×4 patches took 8 of 17 tokens for prefix tokens.
            raise ValueError(
                f"tokens: the grid {given.grid} leaves {derived} of the layer's {count} tokens "
                f"as prefix tokens, but {type(model).__name__} declares {declared} "
                "(class / register tokens); check the grid, or give the prefix count too "
                "(TokenLayout(prefix=...); num_prefix_tokens= for the attention methods) if "
                "this layer has another number of prefix tokens")
        return TokenLayout(prefix=derived, grid=given.grid)
    prefix = given.prefix if given.prefix is not None else _model_prefix(model)
    grids = _grids(spatial, _patch_strides(model, len(spatial)))
    found = [(count - math.prod(g), g) for g in grids
             if (prefix is None or count - math.prod(g) == prefix)
             and 0 <= count - math.prod(g) <= math.prod(g) and math.prod(g) > 1]
    if len(found) == 1:
        return TokenLayout(prefix=found[0][0], grid=found[0][1])
    what = ", ".join(f"{p} prefix + {'×'.join(map(str, g))}" for p, g in found[:4])
    raise ValueError(
        f"tokens: cannot tell how the layer's output of shape {shape} (N, tokens, dim) lies on "
        f"the input of shape {input_shape}: "
        + (f"{count} tokens could be {what}" if found else
           f"{count} tokens are no prefix of class/register tokens plus a patch grid of the "
           f"input at the model's patch stride" + (f" (prefix {prefix})" if prefix is not None
                                                   else ""))
        + f"; {_ADVICE}")


def _checked(fn: Callable[[torch.Tensor], torch.Tensor], batch: int
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(tensor: torch.Tensor) -> torch.Tensor:
        out = fn(tensor)
        if not isinstance(out, torch.Tensor) or out.dim() < 3 or out.shape[0] != batch:
            raise ValueError(
                f"tokens: the callable must return an (N, C, *grid) tensor with N = {batch}; "
                f"for an input of shape {tuple(tensor.shape)} it returned "
                + (f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                   else type(out).__name__))
        return out
    return convert


def check_tokens(tokens: Any) -> TokensType:
    """``tokens`` validated (``True`` means ``None``, inferred): a :class:`TypeError` unless it
    is ``None``, a bool, a :class:`TokenLayout` or a callable."""
    if tokens is True:
        return None
    if tokens is None or tokens is False or isinstance(tokens, TokenLayout) or callable(tokens):
        return cast(TokensType, tokens)
    raise TypeError(
        f"tokens must be None (inferred), False, a TokenLayout or a callable "
        f"tensor -> (N, C, *grid); got {type(tokens).__name__} {tokens!r}")


def layer_tokens(model: nn.Module, read: torch.Tensor, input: torch.Tensor,
                 tokens: TokensType = None, layer: Any = None
                 ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The rearrangement that turns a layer's output ``read`` into ``(N, C, *grid)``, or
    ``None`` when it is read as it is (every CNN layer).

    Parameters
    ----------
    model : torch.nn.Module
        The network (its attributes say the patch size and prefix tokens, when they do).
    read : torch.Tensor
        The layer's output for ``input``.
    input : torch.Tensor
        The batch ``(N, C, *spatial)``.
    tokens : None, bool, TokenLayout or callable
        ``None`` (default): inferred (:func:`infer_token_layout`); ``False``: ``None`` is
        returned; a :class:`TokenLayout`, completed by inference; a callable ``tensor -> (N, C,
        *grid)``, returned as it is (checked when called).
    layer : str or torch.nn.Module, optional
        The layer read (as the caller names it: a module or its dotted name).  With ``tokens``
        ``None``, the module that produced ``read`` decides first where its layout is certain
        (:func:`~torchray_like.attribution.layer_layout.explicit_layout`: a ``Linear``,
        ``LayerNorm`` or channels-last ``Permute`` inside ConvNeXt's block is read
        channels-last, a convolution's output as it is, MaxViT's window partitions are
        refused).

    Raises
    ------
    TypeError
        ``tokens`` of another type.
    ValueError
        A token layout that cannot be inferred, or a layer whose output is no map of the
        input (the message says what to pass).
    """
    tokens = check_tokens(tokens)
    if tokens is False:
        return None
    if tokens is not None and not isinstance(tokens, TokenLayout):
        return _checked(cast(Callable[[torch.Tensor], torch.Tensor], tokens),
                        int(read.shape[0]))
    if tokens is None and layer is not None:
        read_as = explicit_layout(model, layer, read.shape, input.shape,
                                  _patch_counts(model, input.shape) if read.dim() == 3 else (),
                                  token_model=input.dim() != 3 or is_token_model(model))
        if read_as is False:
            return None
        if read_as == "last":
            return TokenLayout(grid=tuple(read.shape[1:-1]), channels_last=True)
        if read_as == "tokens":  # features last: a token sequence, in any model
            return infer_token_layout(model, read.shape, input.shape, TokenLayout())
    return infer_token_layout(model, read.shape, input.shape, tokens)


def _patch_counts(model: nn.Module, input_shape: Sequence[int]) -> Set[int]:
    """The numbers of patches an input has at the patch embedding's stride (rounded)."""
    spatial = tuple(int(s) for s in input_shape[2:])
    strides = _patch_strides(model, len(spatial))
    return {math.prod(g) for g in itertools.product(
        *(_sizes(n, s) for n, s in zip(spatial, strides)))}


def tokens_to_map(convert: Optional[Callable[[torch.Tensor], torch.Tensor]],
                  *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``tensors`` (an activation and its gradient, say) each rearranged by ``convert`` (from
    :func:`layer_tokens`; ``None`` leaves them as they are).  The results are detached
    (contiguous when rearranged): they are read, not differentiated."""
    if convert is None:
        return tensors
    out = tuple(convert(t.detach()).contiguous() for t in tensors)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"tokens: the activation and its gradient became maps of different "
                         f"shapes {sorted(shapes)}; the rearrangement must depend on the shape "
                         "only")
    return out
