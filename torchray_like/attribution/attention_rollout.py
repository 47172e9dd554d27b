r"""Attention rollout, attention flow and gradient-weighted rollout for vision transformers.

* **Attention rollout** (Abnar & Zuidema, "Quantifying attention flow in transformers",
  ACL 2020, arXiv 2005.00928).  Per layer the heads are fused (mean, max or min), optionally the
  lowest ``discard_ratio`` fraction of the fused weights is set to zero, the residual
  connection is added and the rows are normalised: ``Â = (A + I) / rowsum`` — equal to
  ``0.5·A + 0.5·I`` for mean fusion without discarding, since then ``A``'s rows sum to one.
  The rollout is ``Â_L ⋯ Â_2 Â_1`` (first layer applied first); its class-token row over the
  patch tokens is the map — the mean of the patch tokens' rows for a model without a class
  token (average-pooled patches, also behind register tokens, or timm's ``global_pool="avg"``:
  :func:`~.tokens.has_class_token`).  DeiT's distillation token is dropped with the other
  prefix tokens; its row is not read.
* **Attention flow** (same paper): the layers form a graph whose nodes are the tokens at each
  layer's input and whose edge ``(l, j) → (l + 1, i)`` has capacity ``Â_l[i, j]``; a patch's
  value is the maximum flow from that patch at the input to the class token at the top.  One
  max-flow per patch and image (SciPy's Dinic on integer capacities scaled by 2³⁰, error below
  1e-9 per edge): the cost grows as ``patches × layers × tokens²`` per image — about 4 s of
  CPU per image for ViT-B/16 at 224² (197 tokens, 12 layers) — so it is bounded by
  ``max_work`` (a ``ValueError`` saying the cost when exceeded).
* **Gradient-weighted rollout** (Chefer, Gur, Wolf, "Generic attention-model explainability
  for interpreting bi-modal and encoder-decoder transformers", ICCV 2021, arXiv 2103.15679):
  ``Ā_l = E_h[(∇A_l ⊙ A_l)⁺]`` with ``∇A_l = ∂y_c/∂A_l``, and ``R ← R + Ā_l R`` from ``R = I``;
  class-specific.

The attention probabilities are read by :class:`~.attention.AttentionCapture`, whichever way
the model computes them (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``, an
explicit softmax); the model's output is unchanged.  Maps are ``(N, 1, h, w)`` on the patch
grid (``(N, 1, n)`` for 1-D inputs), resized to the input with ``resize=True``.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .arguments import check_finite, is_number, number_list
from .attention import AttentionCapture, NoAttentionError
from .context import suspend_rule_contexts
from .inputs import call_model, check_input
from .maps import (
    FLAT_SCORE_CAUSES,
    SizeType,
    check_resize_mode,
    finish_map,
    samples_text,
    warn_degenerate,
)
from .modules import check_model
from .state import autograd_grad, model_state_guard
from .targets import TargetType, parse_target
from .tokens import (
    TokenLayout,
    TokenOrderError,
    has_class_token,
    infer_token_layout,
    patch_grids,
)

__all__ = ["attention_rollout", "attention_flow", "grad_rollout", "rollout", "fuse_heads",
           "grad_weighted_rollout", "flow_to_token", "tokens_to_grid", "read_attentions"]

HEAD_FUSIONS = ("mean", "max", "min")


#: How the refusals of windowed attention end (Swin's windows in the batch, MaxViT's blocks).
_WINDOWED = ("so attention cannot be rolled out across its layers; use a method that reads "
             "gradients (grad_cam on a stage, integrated_gradients)")


def read_attentions(model: nn.Module, input: torch.Tensor, method: str,
                    differentiable: bool = False) -> Tuple[List[torch.Tensor], Any]:
    """Run ``model`` on ``input`` in an :class:`~.attention.AttentionCapture` (eval mode, the
    caller's rule contexts suspended): ``(attentions, output)``.

    Raises :class:`~.attention.NoAttentionError` (a ``ValueError``) when the model computed no
    attention, and when the layers' token counts differ (rollout multiplies square matrices).
    """
    check_model(model, needs_autograd=differentiable, method=method)
    check_input(input, min_dim=3, needs_grad=differentiable)
    # A NaN pixel spreads through attention to every token: a NaN map, or (attention flow's
    # integer capacities) a finite map without meaning.
    check_finite(input, "input", method)
    with model_state_guard(model, freeze=False), suspend_rule_contexts():
        grad = torch.enable_grad() if differentiable else torch.no_grad()
        with grad, AttentionCapture(differentiable=differentiable) as capture:
            output = call_model(model, input.detach().requires_grad_(differentiable), input)
    attentions = capture.attentions
    if capture.blocked:
        raise NoAttentionError(
            f"{method}: {type(model).__name__} computes attention of shape "
            f"{capture.blocked[0]} — more than (N, heads, T, T): attention within windows or "
            "blocks (as MaxViT's), whose tokens are positions inside each window, not one "
            f"token sequence per image, {_WINDOWED}")
    if not attentions:
        raise NoAttentionError(
            f"{method}: {type(model).__name__} computed no attention: no "
            "F.scaled_dot_product_attention, nn.MultiheadAttention (F.multi_head_attention_"
            "forward) or softmax over a square (…, T, T) or (N, heads, L, S) score tensor was "
            "called in its forward "
            "pass. These methods explain transformers; for a convolutional network use e.g. "
            "grad_cam or lrp")
    tokens = {tuple(a.shape[-2:]) for a in attentions}
    if len(tokens) != 1 or any(a.shape[-1] != a.shape[-2] for a in attentions):
        raise NoAttentionError(
            f"{method}: the attention layers have score matrices of shapes "
            f"{sorted(tokens)}; rollout needs self-attention over one token sequence "
            "(square, equal T × T in every layer). Fewer queries than keys is cross-attention "
            "or attention pooling by a learned query (timm's global_pool='map', CaiT's class "
            "attention), whose query is no token of the sequence: use grad_cam, attn_lrp or "
            "cp_lrp")
    batches = list(dict.fromkeys(int(a.shape[0]) for a in attentions))
    if batches != [input.shape[0]]:
        # Windowed attention (Swin's shifted windows, MaxViT's blocks) folds the windows into
        # the batch: each matrix mixes the tokens of one window, not the image's sequence.
        # Heads folded into the batch ((N·H, T, T) scores of torch.bmm) look the same: the
        # windows cannot be told from heads by shape, so neither is guessed.
        raise NoAttentionError(
            f"{method}: the attention layers attend over batches of {batches} sequences for "
            f"{input.shape[0]} image(s): the model attends within windows (as Swin and MaxViT "
            f"do), not over one token sequence per image, {_WINDOWED}. If it instead folds its "
            "heads into the batch ((N·heads, T, T) scores, as torch.bmm over (N·heads, T, d) "
            "does), compute the scores as (N, heads, T, T) before the softmax, or use "
            "F.scaled_dot_product_attention / nn.MultiheadAttention")
    return attentions, output


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """``(N, H, T, T)`` → ``(N, T, T)`` by ``head_fusion`` (``"mean"``, ``"max"``, ``"min"``)."""
    if head_fusion == "mean":
        return attention.mean(1)
    if head_fusion == "max":
        return attention.amax(1)
    if head_fusion == "min":
        return attention.amin(1)
    raise ValueError(f"head_fusion must be one of {', '.join(map(repr, HEAD_FUSIONS))}, got "
                     f"{head_fusion!r}")


def _check_layout_args(num_prefix_tokens: Any, grid: Any, input: Any) -> Optional[Tuple[int, ...]]:
    """Check ``num_prefix_tokens`` (an int or ``None``; its range is checked against the
    tokens later) and ``grid`` (``None``, or one positive int per spatial dimension of the
    input: a grid of another rank made maps of another rank than the input's); the grid as
    a tuple."""
    if num_prefix_tokens is not None and not (
            isinstance(num_prefix_tokens, Integral) and not isinstance(num_prefix_tokens, bool)):
        raise ValueError(f"num_prefix_tokens must be an int (the class and other non-patch "
                         f"tokens first in the sequence) or None, got {num_prefix_tokens!r}")
    if grid is None:
        return None
    rank = input.dim() - 2 if isinstance(input, torch.Tensor) else None
    values = number_list(grid)
    if values is None or any(not isinstance(v, Integral) or isinstance(v, bool) or v < 1
                             for v in values) or (rank is not None and len(values) != rank):
        raise ValueError(
            f"grid must be the patch grid: {rank} positive int(s), one per spatial dimension "
            f"of the input (e.g. (14, 14) for a 224² image in 16² patches), got {grid!r}")
    return tuple(int(v) for v in values)


def _check_options(head_fusion: Any, discard_ratio: Any, num_prefix_tokens: Any, grid: Any,
                   input: Any, resize_mode: Any) -> Optional[Tuple[int, ...]]:
    """The class-agnostic methods' options, checked before any work (the resize mode also
    when the map keeps its size); the grid as a tuple (:func:`_check_layout_args`)."""
    fuse_heads(torch.zeros(1, 1, 1, 1), head_fusion)
    _check_discard(discard_ratio)
    checked = _check_layout_args(num_prefix_tokens, grid, input)
    check_resize_mode(resize_mode)
    return checked


def _class_agnostic_attentions(model: nn.Module, input: torch.Tensor, target: Any,
                               method: str) -> List[torch.Tensor]:
    """:func:`read_attentions` for a class-agnostic method; a ``target`` (accepted for a
    uniform signature) is checked against the model's classes: one it lacks is a mistake."""
    parsed = parse_target(target, input.shape[0] if isinstance(input, torch.Tensor) else 1,
                          allow_none=True)
    attentions, output = read_attentions(model, input, method)
    parsed.check_range(output)
    return attentions


def _check_discard(discard_ratio: Any) -> float:
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not (
            0.0 <= discard_ratio < 1.0):
        raise ValueError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}")
    return float(discard_ratio)


def residual_attention(attention: torch.Tensor, head_fusion: str = "mean",
                       discard_ratio: float = 0.0) -> torch.Tensor:
    """One layer's ``Â = (A' + I) / rowsum`` with ``A'`` the fused heads after discarding the
    lowest ``discard_ratio`` fraction of each sample's entries; ``(N, T, T)``, rows sum to 1."""
    fused = fuse_heads(attention, head_fusion).to(torch.float64)
    discard = _check_discard(discard_ratio)
    n, t, _ = fused.shape
    drop = int(t * t * discard)
    if drop:
        flat = fused.reshape(n, -1).clone()
        index = flat.topk(drop, dim=-1, largest=False).indices
        fused = flat.scatter(-1, index, 0.0).reshape(n, t, t)
    fused = fused + torch.eye(t, dtype=fused.dtype, device=fused.device)
    return fused / fused.sum(-1, keepdim=True)


def rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean",
            discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout of per-layer ``(N, H, T, T)`` probabilities (first layer first):
    ``Â_L ⋯ Â_1``, ``(N, T, T)`` in float64, rows summing to one (Abnar & Zuidema 2020)."""
    if not attentions:
        raise ValueError("rollout needs at least one layer's attention")
    result = None
    for attention in attentions:
        layer = residual_attention(attention, head_fusion, discard_ratio)
        result = layer if result is None else layer @ result
    assert result is not None
    return result


def grad_weighted_rollout(attentions: Sequence[torch.Tensor],
                          gradients: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """Chefer et al. 2021: ``R ← R + E_h[(∇A ⊙ A)⁺] R`` from ``R = I``, first layer first;
    ``(N, T, T)`` float64.  A layer without gradient (``None``: it does not reach the
    target) adds nothing."""
    first = attentions[0]
    n, t = first.shape[0], first.shape[-1]
    relevance = torch.eye(t, dtype=torch.float64, device=first.device).expand(n, t, t)
    for attention, grad in zip(attentions, gradients):
        if grad is None:
            continue
        weighted = (grad.to(torch.float64) * attention.to(torch.float64)).clamp(min=0).mean(1)
        relevance = relevance + weighted @ relevance
    return relevance


def tokens_to_grid(values: torch.Tensor, input: torch.Tensor,
                   num_prefix_tokens: Optional[int] = None,
                   grid: Optional[Sequence[int]] = None,
                   model: Optional[nn.Module] = None) -> torch.Tensor:
    """Per-token values ``(N, T)`` → ``(N, 1, *grid)`` over the patch tokens.

    The first ``num_prefix_tokens`` tokens (class / distillation / register tokens) are dropped
    and the rest laid out row-major on ``grid``.  Both are inferred when not given: from the
    ``model`` (its patch stride and prefix-token parameters,
    :func:`~.tokens.infer_token_layout`) for image and video inputs, else as the first prefix
    among 1, 0, 2 … 8 leaving a grid with the input's aspect ratio (``h·W == w·H``) — and,
    when the model's own layout did not fit, a grid of its patch stride.  A
    ``ValueError`` says what to pass when nothing fits.
    """
    n, t = values.shape
    spatial = tuple(input.shape[2:])
    if num_prefix_tokens is not None and (not isinstance(num_prefix_tokens, int) or isinstance(
            num_prefix_tokens, bool) or not 0 <= num_prefix_tokens < t):
        raise ValueError(f"num_prefix_tokens must be an int in [0, {t}), got "
                         f"{num_prefix_tokens!r}")
    reason = ""
    if model is not None and len(spatial) in (2, 3):
        try:
            layout = infer_token_layout(model, (n, t, 1), tuple(input.shape), TokenLayout(
                prefix=num_prefix_tokens, grid=None if grid is None else tuple(grid)))
            if layout is not None and not layout.channels_last:
                return layout(values.unsqueeze(-1))
        except TokenOrderError:
            raise  # registers that may follow the patches: no guess
        except ValueError as exc:
            reason = f" ({exc})"
    prefixes = (num_prefix_tokens,) if num_prefix_tokens is not None else (1, 0) + tuple(
        range(2, 9))
    if reason and grid is not None and num_prefix_tokens is None:
        prefixes = ()  # the model contradicts the grid given: no guess of the prefix
    # The model's inference failed (prefix tokens it does not declare): a guess must still be
    # a grid of its patch stride (8 undeclared registers + a class token on a 4 × 4 grid made
    # 25 tokens, guessed as a 5 × 5 grid).
    allowed = set(patch_grids(model, spatial)) if reason and model is not None else None
    for prefix in prefixes:
        shape = _grid_for(t - prefix, spatial, grid)
        if shape is not None and (allowed is None or shape in allowed):
            return values[:, prefix:].reshape((n, 1) + shape)
    raise ValueError(
        f"cannot lay the {t} tokens out on a patch grid of the input {spatial}"
        + (f" with grid={tuple(grid)}" if grid is not None else "")
        + "; pass num_prefix_tokens= (the class and other non-patch tokens first in the "
        "sequence) and grid=(h, w)" + reason)


def _grid_for(count: int, spatial: Tuple[int, ...], grid: Optional[Sequence[int]]
              ) -> Optional[Tuple[int, ...]]:
    if grid is not None:
        shape = tuple(int(g) for g in grid)
        return shape if math.prod(shape) == count else None
    if len(spatial) == 1:
        return (count,)
    if len(spatial) != 2 or count <= 0:
        return None
    height, width = spatial
    h = max(1, round(math.sqrt(count * height / width)))
    for rows in (h - 1, h, h + 1):
        if rows > 0 and count % rows == 0 and rows * width == (count // rows) * height:
            return (rows, count // rows)
    return None


def _prefix_count(t: int, input: torch.Tensor, num_prefix_tokens: Optional[int],
                  grid: Optional[Tuple[int, ...]], model: nn.Module) -> int:
    if num_prefix_tokens is not None:
        return num_prefix_tokens
    shape = tokens_to_grid(torch.zeros(1, t), input[:1], None, grid, model).shape
    return t - math.prod(shape[2:])


def _check_class_token(class_token: Any) -> Optional[bool]:
    if class_token is not None and not isinstance(class_token, bool):
        raise TypeError(f"class_token must be None (from the model), True (token 0 is the class "
                        f"token the head reads) or False (the head pools the patch tokens), "
                        f"got {class_token!r}")
    return class_token


def _reads_class_token(model: nn.Module, num_prefix_tokens: int,
                       class_token: Optional[bool] = None) -> bool:
    """Whether token 0 is a class token: ``class_token`` when given, else there are prefix
    tokens and the model does not say they are registers only or that its head pools the
    patches (:func:`~.tokens.has_class_token`)."""
    if class_token and num_prefix_tokens < 1:
        raise ValueError("class_token=True, but the tokens are all patches "
                         "(num_prefix_tokens=0); pass num_prefix_tokens= too")
    if class_token is not None:
        return class_token
    return num_prefix_tokens > 0 and has_class_token(model) is not False


def _token_row(matrix: torch.Tensor, input: torch.Tensor, num_prefix_tokens: Optional[int],
               grid: Optional[Tuple[int, ...]], model: nn.Module,
               class_token: Optional[bool] = None) -> torch.Tensor:
    """The class token's row (token 0; DeiT's distillation token, token 1, is not read), or
    the mean of the patch tokens' rows for a model without a class token (average-pooled
    patches, with or without register tokens before them: a register's row is no readout)."""
    prefix = _prefix_count(matrix.shape[-1], input, num_prefix_tokens, grid, model)
    row = (matrix[:, 0] if _reads_class_token(model, prefix, class_token)
           else matrix[:, prefix:].mean(1))
    return tokens_to_grid(row, input, prefix, grid, model)


def attention_rollout(model: nn.Module, input: torch.Tensor, target: Optional[TargetType] = None,
                      head_fusion: str = "mean", discard_ratio: float = 0.0, *,
                      num_prefix_tokens: Optional[int] = None,
                      grid: Optional[Sequence[int]] = None, resize: SizeType = False,
                      resize_mode: str = "bilinear",
                      class_token: Optional[bool] = None) -> torch.Tensor:
    """Attention rollout map (Abnar & Zuidema 2020): how much the class token attends to each
    patch through all layers.  Class-agnostic: ``target`` is accepted for the common
    signature and checked, but does not change the map.

    Parameters
    ----------
    model : torch.nn.Module
        A transformer; its attention is read however it is computed (fused
        ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``, an explicit softmax).
    input : torch.Tensor
        ``(N, C, H, W)`` (or ``(N, C, L)``) batch.
    target : optional
        Ignored (checked only: one per sample when a sequence).
    head_fusion : {"mean", "max", "min"}
        How each layer's heads are fused.
    discard_ratio : float
        Fraction in ``[0, 1)`` of each fused matrix's lowest entries set to zero before the
        residual is added.
    num_prefix_tokens, grid : optional
        The non-patch tokens at the start of the sequence and the patch grid (inferred; see
        :func:`tokens_to_grid`).  Without a class token (no prefix tokens, or only
        registers before average-pooled patches) the mean of the patch rows is used.
    class_token : bool, optional, keyword-only
        Whether token 0 is the class token the head reads (its row is the map) or the head
        pools the patch tokens (their mean row is the map).  ``None``: from the model
        (:func:`~.tokens.has_class_token`; a model that does not say is read by token 0 when
        it has prefix tokens).
    resize, resize_mode
        As in :func:`~torchray_like.attribution.common.saliency`.

    Returns
    -------
    torch.Tensor
        ``(N, 1, h, w)`` maps (rows of the rollout, non-negative), in the input's dtype.

    Raises
    ------
    ValueError
        A model without attention (naming what was looked for), an unknown ``head_fusion``,
        ``discard_ratio`` outside ``[0, 1)``, tokens that fit no grid.
    """
    grid = _check_options(head_fusion, discard_ratio, num_prefix_tokens, grid, input,
                          resize_mode)
    _check_class_token(class_token)
    attentions = _class_agnostic_attentions(model, input, target, "attention_rollout")
    matrix = rollout(attentions, head_fusion, discard_ratio)
    smap = _token_row(matrix, input, num_prefix_tokens, grid, model, class_token)
    return finish_map(input, smap, resize, resize_mode)


def flow_to_token(attentions: Sequence[torch.Tensor], sink: int = 0, head_fusion: str = "mean",
                  discard_ratio: float = 0.0, max_work: float = 1e9) -> torch.Tensor:
    """Attention flow (Abnar & Zuidema 2020): ``(N, T)`` maximum flows from each input token
    to token ``sink`` at the top, through capacities ``Â_l`` (:func:`residual_attention`).

    ``max_work`` bounds ``N × T × L × T²`` (samples × max-flows × edges); above it a
    ``ValueError`` gives the cost instead of running for hours.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    layers = [residual_attention(a, head_fusion, discard_ratio).cpu().numpy()
              for a in attentions]
    n, t, _ = layers[0].shape
    depth = len(layers)
    work = float(n) * t * depth * t * t
    if work > max_work:
        raise ValueError(
            f"attention_flow would solve {n * t} max-flow problems on graphs of {depth * t * t} "
            f"edges ({work:.3g} > max_work={max_work:.3g}); this grows as tokens³ × layers "
            "(measured: about 4 s of CPU per image for ViT-B/16 at 224², 197 tokens and 12 "
            "layers, work 9.2e7). Raise max_work to run it anyway, or use attention_rollout")
    scale = float(2 ** 30)
    flows = np.zeros((n, t))
    nodes = (depth + 1) * t
    for b in range(n):
        rows, cols, caps = [], [], []
        for level, layer in enumerate(layers):
            # edge from token j at level l to token i at level l + 1, capacity Â_l[i, j]
            i, j = np.nonzero(layer[b] > 0)
            rows.append(level * t + j)
            cols.append((level + 1) * t + i)
            caps.append(np.floor(layer[b][i, j] * scale).astype(np.int64))
        graph = csr_matrix((np.concatenate(caps).astype(np.int32),
                            (np.concatenate(rows), np.concatenate(cols))), shape=(nodes, nodes))
        for source in range(t):
            result = maximum_flow(graph, source, depth * t + sink, method="dinic")
            flows[b, source] = result.flow_value / scale
    return torch.from_numpy(flows)


def attention_flow(model: nn.Module, input: torch.Tensor, target: Optional[TargetType] = None,
                   head_fusion: str = "mean", discard_ratio: float = 0.0, *,
                   num_prefix_tokens: Optional[int] = None,
                   grid: Optional[Sequence[int]] = None, max_work: float = 1e9,
                   resize: SizeType = False, resize_mode: str = "bilinear",
                   class_token: Optional[bool] = None) -> torch.Tensor:
    """Attention flow map (Abnar & Zuidema 2020): the maximum flow from each patch at the
    input to the class token at the top of the layer graph (:func:`flow_to_token`).
    Class-agnostic; needs a class token.  Costly: ``N × T`` max-flows on ``L × T²`` edges,
    bounded by ``max_work`` (raise it knowingly).  Other arguments as
    :func:`attention_rollout`; returns ``(N, 1, h, w)``."""
    grid = _check_options(head_fusion, discard_ratio, num_prefix_tokens, grid, input,
                          resize_mode)
    if not is_number(max_work) or math.isnan(max_work) or max_work <= 0:
        raise ValueError(f"max_work must be a positive number (float('inf'): no bound), got "
                         f"{max_work!r}")
    _check_class_token(class_token)
    attentions = _class_agnostic_attentions(model, input, target, "attention_flow")
    num_prefix_tokens = _prefix_count(attentions[0].shape[-1], input, num_prefix_tokens, grid,
                                      model)
    if num_prefix_tokens < 1:
        raise ValueError("attention_flow needs a class token to flow into: the model's tokens "
                         "are all patches (num_prefix_tokens=0); use attention_rollout")
    if not _reads_class_token(model, num_prefix_tokens, class_token):
        raise ValueError(
            f"attention_flow needs a class token to flow into: {type(model).__name__}'s "
            f"{num_prefix_tokens} prefix token(s) are no class token (register tokens, or a "
            "head that pools the patch tokens; class_token=True if token 0 is one); use "
            "attention_rollout (it reads the mean of the patch tokens' rows)")
    flows = flow_to_token(attentions, 0, head_fusion, discard_ratio, max_work)
    smap = tokens_to_grid(flows.to(input.device), input, num_prefix_tokens, grid, model)
    return finish_map(input, smap, resize, resize_mode)


def _warn_zero_gradients(grads: List[Optional[torch.Tensor]], n: int) -> None:
    """A :class:`~.maps.DegenerateMapWarning` for the samples whose attention gradients are
    exactly zero in every layer: their map is then the class token's row of ``I`` (zero on the
    patches) whatever the image."""
    present = [g for g in grads if g is not None]
    if present and any(g.shape[0] != n for g in present):
        return
    rows = list(range(n))
    if present:
        nonzero = torch.zeros(n, dtype=torch.bool, device=present[0].device)
        for g in present:
            nonzero |= (g != 0).reshape(n, -1).any(1)
        rows = (~nonzero).nonzero().flatten().tolist()
    if rows:
        warn_degenerate(
            f"grad_rollout: the gradient of the target score with respect to every attention "
            f"map is exactly zero for sample(s) {samples_text(rows)}: the score does not change "
            f"through autograd there ({FLAT_SCORE_CAUSES}) — the map is all zeros; explain a "
            "score that varies smoothly with the input (attention_rollout does not use the "
            "target)")


def grad_rollout(model: nn.Module, input: torch.Tensor, target: TargetType, *,
                 num_prefix_tokens: Optional[int] = None, grid: Optional[Sequence[int]] = None,
                 resize: SizeType = False, resize_mode: str = "bilinear",
                 class_token: Optional[bool] = None) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer, Gur, Wolf, ICCV 2021): the class token's
    row of ``R`` (:func:`grad_weighted_rollout`) over the patches, for ``target``.

    Parameters
    ----------
    model, input, num_prefix_tokens, grid, resize, resize_mode, class_token
        As in :func:`attention_rollout`.
    target : int, sequence, torch.Tensor or callable
        The output unit(s) to explain (as every method).

    Returns
    -------
    torch.Tensor
        ``(N, 1, h, w)`` non-negative maps in the input's dtype (the identity's contribution
        to the class token's own row is not on the patches, so a map may be all zeros when no
        attention raises the target).
    """
    parsed = parse_target(target, input.shape[0] if isinstance(input, torch.Tensor) else 1)
    grid = _check_layout_args(num_prefix_tokens, grid, input)
    check_resize_mode(resize_mode)  # before the work, also when the map keeps its size
    _check_class_token(class_token)
    attentions, output = read_attentions(model, input, "grad_rollout", differentiable=True)
    scores, seed = parsed.seed(output)
    if not scores.requires_grad:  # a detached head: autograd's own error names no argument
        raise ValueError(
            "grad_rollout: the model output does not depend on the input through autograd "
            "(does the model detach its output or run under torch.no_grad()?); the gradient "
            "weights of the attention need it")
    grads = autograd_grad(scores, attentions, grad_outputs=seed, allow_unused=True)
    _warn_zero_gradients(list(grads), input.shape[0])
    with torch.no_grad():
        matrix = grad_weighted_rollout([a.detach() for a in attentions], list(grads))
    smap = _token_row(matrix, input, num_prefix_tokens, grid, model, class_token)
    return finish_map(input, smap, resize, resize_mode)
