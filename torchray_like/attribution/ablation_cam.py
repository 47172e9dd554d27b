r"""Ablation-CAM.

Desai, Ramaswamy, "Ablation-CAM: visual explanations for deep convolutional network via
gradient-free localization", WACV 2020.  No gradient: channel ``k`` of a layer's activation is
set to zero (the rest of the network runs on the ablated activation) and the relative drop of
the target's score weights the channel:

.. math::

    w_k = \frac{y_c - y_c^{(k)}}{|y_c|}, \qquad
    M = \operatorname{ReLU}\Big(\sum_k w_k A_k\Big),

with ``y_c`` the class logit (the score a target selects: ``±z`` for a single-logit head, a
callable target's own scores) and ``y_c^{(k)}`` the same score with channel ``k`` ablated.  The
paper divides by ``y_c``, assuming a positive score; dividing by a negative score would flip
every weight, so the ReLU would keep the regions whose removal *raises* the score.  We divide by
``|y_c|`` (the paper's formula when ``y_c > 0``); a score of exactly 0 leaves the relative
drop undefined and is a :class:`ValueError`.  pytorch-grad-cam 1.5.7's ``AblationCAM`` divides
by ``y_c``: for positive scores the maps agree after the same normalisation and resize
(``tests/test_cam_family.py``; TorchCAM 0.5 has no Ablation-CAM).

Transformers: a block's token sequence ``(N, P + h·w, D)`` is read on its patch grid, as by
every layer method (:mod:`~torchray_like.attribution.tokens`): channel ``k`` is feature ``k``
of the patch tokens, ``A_k`` its ``(h, w)`` map.  Ablating channel ``k`` zeroes feature ``k``
of the **patch tokens only**: the class (and other prefix) tokens keep it, so the drop measures
exactly what ``A_k`` shows on the grid (zeroing the class token's feature too would add a
location-less effect to every patch).  The zeroed entries are found by passing the token
layout (or ``tokens=`` callable) an index tensor, so any pure rearrangement works.
pytorch-grad-cam 1.5.7's ``AblationLayerVit`` (run as a black box on a torchvision ViT) sets
feature ``k`` of *every* token, the class token included, to ``min − 10⁷`` (the running
minimum of the batch), not to 0: no ablation in the paper's sense, so its maps differ.

Cost: one forward pass per channel and sample, batched ``batch_size`` at a time through one
preallocated input buffer; the layer's output in each pass is replaced (forward hook) by the
recorded activation with one channel zeroed per row, so every row differs from the clean pass
in exactly that channel.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .context import suspend_rule_contexts
from .grad_cam_plus_plus import channel_sum
from .maps import finish_map
from .score_cam import (
    channel_scores,
    check_channel_scores,
    configure_channels,
    layer_forward,
)
from .state import model_state_guard
from .targets import TargetType
from .tokens import TokensType

__all__ = ["ablation_cam", "ablation_weights", "channel_positions"]


def ablation_weights(clean: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """``(y - y_k) / |y|``: the relative score drops ``(N, K)`` from the clean scores ``(N,)``
    and the ablated ones ``(N, K)``; a clean score of 0 is a :class:`ValueError`."""
    zero = clean == 0
    if bool(zero.any()):
        raise ValueError(
            f"ablation_cam: the target's score is exactly 0 for sample(s) "
            f"{zero.nonzero().flatten().tolist()[:10]}, so the relative drop (y - y_k) / |y| is "
            "undefined; explain another class, or use score_cam for these samples")
    clean = clean.to(ablated.dtype)[:, None]
    return (clean - ablated) / clean.abs()


def ablation_cam(model: nn.Module, input: torch.Tensor, target: TargetType,
                 saliency_layer: Any = None, resize: Any = False, resize_mode: str = "bilinear",
                 smooth: float = 0, batch_size: int = 32, *,
                 progress: Optional[bool] = None, tokens: TokensType = None) -> torch.Tensor:
    """Ablation-CAM saliency map (Desai & Ramaswamy 2020); see the module docstring.

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode under :func:`torch.no_grad`, its ``training`` flags
        restored; parameters untouched).  Refused: layers using batch statistics in eval mode.
    input : torch.Tensor
        ``(N, C, *spatial)`` finite floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The class to explain (one int for all samples, one per sample), a seed-gradient tensor
        shaped like the output (the score ``Σ seed · output``), or a callable
        ``output -> (B,)`` scoring each row of a forward batch.  A single-logit head takes 1
        (the logit) or 0 (its negation).
    saliency_layer : str or torch.nn.Module, optional
        The layer whose channels are ablated; ``None`` (default): chosen as for Grad-CAM.  It
        must output ``(N, K, *spatial)`` with the input's number of spatial dimensions, or a
        transformer block's tokens (read on the patch grid, see ``tokens``), once per forward
        pass.
    resize : bool, int or tuple
        ``False``: the map stays at the layer's resolution; ``True``: the input's size; or an
        explicit size.
    resize_mode : str
        Interpolation for ``resize``.
    smooth : float
        If positive, Gaussian smoothing with ``sigma = smooth * max(map size)``.
    batch_size : int
        Ablated copies per forward pass (default 32).
    progress : bool, optional
        A progress bar (``None``: when stderr is a terminal).
    tokens : None, False, TokenLayout or callable, keyword-only
        How ``saliency_layer``'s output becomes an ``(N, K, *grid)`` map when it is a
        transformer block's tokens ``(N, T, D)`` (or a channels-last stage): ``None``
        (default) infers it (prefix tokens dropped, patch tokens on the patch grid; see
        :mod:`~torchray_like.attribution.tokens`), ``False`` reads the tensor as it is, a
        :class:`~torchray_like.attribution.tokens.TokenLayout` says it, a callable
        ``tensor -> (N, K, *grid)`` does it (it must be a pure rearrangement: slicing,
        reshaping, permuting).  Ablating channel ``k`` zeroes the entries of the layer's
        output that become the grid's channel ``k`` (the patch tokens' feature ``k``).

    Returns
    -------
    torch.Tensor
        ``(N, 1, *layer_spatial)`` non-negative maps (or resized), on the input's device, in
        the input's dtype, not requiring grad.

    Raises
    ------
    TypeError, ValueError
        As :func:`~torchray_like.attribution.score_cam.score_cam`, and for a target score of
        exactly 0.
    """
    cfg = configure_channels("ablation_cam", model, input, target, saliency_layer, resize,
                             resize_mode, smooth, batch_size, progress, tokens)
    x = input.detach()
    with suspend_rule_contexts(), model_state_guard(cfg.model, freeze=False), torch.no_grad():
        read = layer_forward(cfg, input)
        act, out = read.grid, read.output
        # Where each channel of the map lies in one row of the layer's output (token layers).
        where = None if read.convert is None else channel_positions(read.convert, out)

        def fill(images: torch.Tensor, chans: torch.Tensor,
                 batch: torch.Tensor) -> torch.Tensor:
            torch.index_select(x, 0, images, out=batch)
            ablated = out.index_select(0, images)
            rows = torch.arange(images.numel(), device=images.device)
            if where is None:
                ablated[rows, chans] = 0
            else:
                ablated.view(rows.numel(), -1)[rows[:, None], where[chans]] = 0
            return ablated

        ablated = channel_scores(cfg, input, act.shape[1], fill, "copy", replaces=True)
        drops = ablation_weights(read.scores, ablated)
        check_channel_scores(cfg.name, read.scores, ablated)
        smap = channel_sum(drops, act.to(drops.dtype))
    return finish_map(input, smap, cfg.resize, cfg.resize_mode, cfg.smooth)


def channel_positions(convert: Callable[[torch.Tensor], torch.Tensor],
                      output: torch.Tensor) -> torch.Tensor:
    """``(K, S)`` indices: where the map channel ``k``'s ``S`` entries lie in one row of the
    layer's ``output`` flattened, ``convert`` being the rearrangement ``output -> (N, K,
    *grid)``.  Found by rearranging an index tensor (exact in float32 up to 2^24 entries a
    row).

    Raises
    ------
    ValueError
        ``convert`` is no pure rearrangement (it changed the values, or repeats entries).
    """
    size = output[0].numel()
    dtype = torch.float32 if size <= 2 ** 24 else torch.float64
    index = torch.arange(size, dtype=dtype, device=output.device).view(output.shape[1:])
    mapped = convert(index.expand(output.shape).contiguous())[0]
    positions = mapped.reshape(mapped.shape[0], -1)
    exact = bool((positions == positions.round()).all()) and positions.numel() > 0 and bool(
        (positions >= 0).all() and (positions < size).all())
    if not exact or positions.unique().numel() != positions.numel():
        raise ValueError(
            "ablation_cam: tokens= must rearrange the layer's output (slicing, reshaping, "
            "permuting), not compute from it: ablating a channel zeroes the entries that "
            "become it, and this callable's map entries are not entries of its input")
    return positions.long()
