r"""Reading a transformer's attention, whichever way the model computes it.

:class:`AttentionCapture` is a rule context (a :class:`torch.overrides.TorchFunctionMode`,
thread-local) that records each attention layer's probabilities
``A = softmax(q kᵀ · scale + mask)``, shaped ``(N, heads, L, S)``, in forward order:

* ``F.scaled_dot_product_attention`` (the fused kernel does not expose ``A``): ``A`` is computed
  on the side from the same ``q``, ``k``, mask, ``is_causal``, ``scale`` and GQA grouping;
* ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls — its fused fast
  path is never taken inside a torch-function mode): ``q`` and ``k`` are projected from the
  same weights and masks;
* a softmax written by hand (``F.softmax``, ``torch.softmax``, ``Tensor.softmax``) over the last
  dimension of a ``(…, T, T)`` score matrix (a ViT written with explicit ``q @ kᵀ``).

**The model's output is never changed**: the op's own result is returned.  When
``differentiable=True`` (gradient-weighted rollout needs ``∂y/∂A``), the fused op's result is
returned *with the value of the fused op and the backward of the explicit formula*
``A @ v`` (:func:`substitute`), so ``A`` lies on the autograd graph of the output while the
forward values stay bit-identical.

The explicit attention is written once (:func:`explicit_sdpa`, :func:`explicit_mha`) with its
operations taken from an :class:`AttentionOps` object, so that the transformer LRP contexts
(:mod:`.transformer_lrp`) reuse it with their own backward rules.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .autograd_guards import first_order
from .context import RuleContext, records_gradient

__all__ = ["AttentionCapture", "AttentionOps", "explicit_sdpa", "explicit_mha", "substitute",
           "held_constant", "sdpa_arguments", "mha_arguments", "SOFTMAX_FUNCTIONS",
           "NoAttentionError", "softmax_dim", "is_attention_softmax"]


class NoAttentionError(ValueError):
    """The model computed no attention the capture could read."""


class _Held(torch.autograd.Function):
    """Forward: the value in ``holder``, for a rule context ``owner`` (or none).  ``anchor``: a
    one-element copy of the input (its graph leads to the model's input), what
    :func:`~.autograd_guards.first_order` ties its refusal of a second derivative to where the
    incoming gradient does not depend on the input (a frozen head after the last LayerNorm);
    one element, not the input itself, so as to keep no activation alive."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, holder: list, owner: Any,
                anchor: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.owner = owner
        if anchor is not None:
            ctx.save_for_backward(anchor)
        return holder.pop()


class _Substitute(_Held):
    """Forward: the model's own value (``holder[0]``); backward: the gradient flows to
    ``explicit`` as if it had been returned (no rule context: no ``owner``, no ``anchor``)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None, None]:
        return grad, None, None, None


class _RuleSubstitute(_Held):
    """:class:`_Substitute` for a rule context: ``explicit`` holds quantities the rule keeps
    constant (CP-LRP's LayerNorm σ), so its graph's derivative is the rule's first-order
    gradient only — differentiating that gradient again raises."""

    @staticmethod
    @first_order("transformer LRP")  # a second derivative would miss the held constants
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None, None]:
        ctx.owner.applied += 1
        return grad, None, None, None


class _HeldConstant(_Held):
    """No gradient reaches the input (a constant, as a ``.detach()``), but the pass is
    counted; under ``create_graph=True`` the gradient is a zero marked so that differentiating
    it raises (the derivative of the held-constant form is not the method's)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None]:
        ctx.owner.applied += 1
        if not torch.is_grad_enabled():
            return None, None, None, None
        return _held_constant_zero(ctx, grad)


@first_order("transformer LRP")
def _held_constant_zero(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None, None]:
    return torch.zeros_like(grad), None, None, None


def _anchor(x: torch.Tensor) -> Optional[torch.Tensor]:
    return x[(0,) * x.dim()].clone() if x.requires_grad and x.numel() else None


def held_constant(x: torch.Tensor, value: torch.Tensor, owner: Any) -> torch.Tensor:
    """``value`` (computed from ``x``) in the forward pass; in backward no gradient reaches
    ``x`` — a constant, as ``value.detach()`` — but the pass is counted in ``owner.applied``
    (the rule context), and a second derivative through it raises
    :class:`~.autograd_guards.SecondOrderError` (CP-LRP's attention probabilities)."""
    return _HeldConstant.apply(x, [value.detach()], owner, _anchor(x))


def substitute(explicit: torch.Tensor, exact: torch.Tensor, owner: Any = None) -> torch.Tensor:
    """``exact``'s values with ``explicit``'s backward.

    ``exact`` is what the model's own operation returned (a fused kernel); ``explicit`` the
    same quantity written with the operations whose backward a method needs.  The result is
    bit-identical to ``exact`` and differentiates through ``explicit``.  ``owner``: the rule
    context whose ``applied`` counter each backward pass through the result increments; with
    one, a second derivative through the result raises
    :class:`~.autograd_guards.SecondOrderError` (``explicit`` is the rule's form, whose own
    derivative is not the method's).
    """
    if exact.shape != explicit.shape:
        raise RuntimeError(f"internal: explicit attention shape {tuple(explicit.shape)} differs "
                           f"from the op's {tuple(exact.shape)}")
    value = exact.detach()
    if value is exact or value.data_ptr() == exact.data_ptr():
        value = value.clone()  # never hand autograd a tensor that is also someone's input
    explicit = explicit.to(exact.dtype)
    if owner is None:
        return _Substitute.apply(explicit, [value], None, None)
    return _RuleSubstitute.apply(explicit, [value], owner, _anchor(explicit))


class AttentionOps:
    """The operations explicit attention is written with; a context overrides some of them.

    The plain versions are PyTorch's own.  ``scores`` and ``mix`` are the two bilinear
    products (``q kᵀ`` and ``A v``), ``softmax`` the attention softmax, ``linear`` the
    projections of ``nn.MultiheadAttention``; ``record`` receives each layer's probabilities.
    """

    def linear(self, x: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, k.transpose(-2, -1))

    def softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def mix(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(probs, v)

    def record(self, probs: torch.Tensor, source: str) -> None:
        """Called with each layer's ``(N, H, L, S)`` (or ``(…, L, S)``) probabilities."""


def _softmax_rows(ops: AttentionOps, logits: torch.Tensor) -> torch.Tensor:
    probs = ops.softmax(logits)
    # A fully masked row is 0/0 in the explicit formula; the fused kernels give zeros there.
    if not bool(torch.isfinite(logits).any(-1).all()):
        probs = torch.where(torch.isfinite(logits).any(-1, keepdim=True), probs,
                            torch.zeros((), dtype=probs.dtype, device=probs.device))
    return probs


_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
               "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def sdpa_arguments(args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The arguments of a ``F.scaled_dot_product_attention`` call, by name."""
    values = dict(zip(_SDPA_NAMES, _SDPA_DEFAULTS))
    values.update(zip(_SDPA_NAMES, args))
    values.update(kwargs)
    return values


def _check_dropout(p: Any, training: bool, where: str) -> None:
    if training and isinstance(p, (int, float)) and p > 0:
        raise ValueError(
            f"{where} is called with dropout_p={p}: the attention is random, so no map can be "
            "read from it; put the model in eval mode (model.eval()) or pass dropout_p=0 "
            "while explaining")


def explicit_sdpa(values: Dict[str, Any], ops: AttentionOps) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` written out (PyTorch's documented reference):
    ``softmax(q kᵀ · scale + mask) v`` with ``is_causal``, boolean (``True`` = attend) or
    additive masks, and grouped-query heads."""
    q, k, v = values["query"], values["key"], values["value"]
    _check_dropout(values["dropout_p"], True, "F.scaled_dot_product_attention")
    length, source = q.shape[-2], k.shape[-2]
    scale = values["scale"]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if values["enable_gqa"] and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    logits = ops.scores(q, k) * scale
    bias = _sdpa_bias(values["attn_mask"], values["is_causal"], length, source, logits)
    if bias is not None:
        logits = logits + bias
    probs = _softmax_rows(ops, logits)
    ops.record(probs, "scaled_dot_product_attention")
    return ops.mix(probs, v)


def _sdpa_bias(mask: Any, is_causal: bool, length: int, source: int,
               like: torch.Tensor) -> Optional[torch.Tensor]:
    """The additive bias of an sdpa call (``-inf`` where a boolean mask is ``False``)."""
    bias = None
    if is_causal:
        keep = torch.ones(length, source, dtype=torch.bool, device=like.device).tril()
        bias = torch.zeros(length, source, dtype=like.dtype, device=like.device)
        bias = bias.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            extra = torch.zeros(mask.shape, dtype=like.dtype, device=like.device)
            extra = extra.masked_fill(~mask, float("-inf"))
        else:
            extra = mask.to(like.dtype)
        bias = extra if bias is None else bias + extra
    return bias


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def mha_arguments(args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The arguments of an ``F.multi_head_attention_forward`` call, by name (defaults filled)."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


_MHA_UNSUPPORTED = (("bias_k", "add_bias_kv=True"), ("bias_v", "add_bias_kv=True"),
                    ("static_k", "static_k"), ("static_v", "static_v"))


def _check_mha(values: Dict[str, Any]) -> None:
    for name, what in _MHA_UNSUPPORTED:
        if values.get(name) is not None:
            raise ValueError(
                f"nn.MultiheadAttention with {what} is not supported by the attention contexts "
                "(its extra key/value rows have no token); build the layer without it")
    if values.get("add_zero_attn"):
        raise ValueError("nn.MultiheadAttention with add_zero_attn=True is not supported by the "
                         "attention contexts; build the layer without it")
    _check_dropout(values["dropout_p"], bool(values["training"]), "nn.MultiheadAttention")


def _mha_mask(mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """An MHA mask as an additive bias (boolean ``True`` = *not* allowed, PyTorch's MHA
    convention, the opposite of sdpa's)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf"))
    return mask.to(like.dtype)


def _projections(values: Dict[str, Any]) -> Tuple[Tuple[Any, Any, Any], Tuple[Any, Any, Any]]:
    bias = values["in_proj_bias"]
    biases = bias.chunk(3) if bias is not None else (None, None, None)
    if values["use_separate_proj_weight"]:
        weights = (values["q_proj_weight"], values["k_proj_weight"], values["v_proj_weight"])
    else:
        weights = values["in_proj_weight"].chunk(3)
    return weights, biases


def explicit_mha(values: Dict[str, Any], ops: AttentionOps
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``F.multi_head_attention_forward`` written out: ``(output, weights or None)``.

    Inputs are ``(L, N, E)`` (or unbatched ``(L, E)``), as ``nn.MultiheadAttention`` passes them;
    masks follow PyTorch's MHA conventions (``key_padding_mask (N, S)``, ``attn_mask (L, S)`` or
    ``(N·H, L, S)``, boolean ``True`` = not allowed, or additive floats).
    """
    _check_mha(values)
    query, key, value = values["query"], values["key"], values["value"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    length, batch, embed = query.shape
    source, heads = key.shape[0], values["num_heads"]
    head_dim = embed // heads
    (wq, wk, wv), (bq, bk, bv) = _projections(values)
    q = ops.linear(query, wq, bq).reshape(length, batch, heads, head_dim).permute(1, 2, 0, 3)
    k = ops.linear(key, wk, bk).reshape(source, batch, heads, head_dim).permute(1, 2, 0, 3)
    v = ops.linear(value, wv, bv).reshape(source, batch, heads, head_dim).permute(1, 2, 0, 3)
    logits = ops.scores(q, k) * (1.0 / math.sqrt(head_dim))
    attn_mask = values["attn_mask"]
    if attn_mask is None and values["is_causal"]:
        attn_mask = torch.ones(length, source, dtype=torch.bool,
                               device=query.device).triu(1)
    bias = _mha_mask(attn_mask, logits)
    if bias is not None:
        logits = logits + (bias.reshape(batch, heads, length, source) if bias.dim() == 3
                           else bias)
    padding = _mha_mask(values["key_padding_mask"], logits)
    if padding is not None:
        logits = logits + padding.reshape(batch, 1, 1, source)
    probs = _softmax_rows(ops, logits)
    ops.record(probs, "multi_head_attention_forward")
    mixed = ops.mix(probs, v).permute(2, 0, 1, 3).reshape(length, batch, embed)
    out = ops.linear(mixed, values["out_proj_weight"], values["out_proj_bias"])
    weights = None
    if values["need_weights"]:
        weights = probs.mean(1) if values["average_attn_weights"] else probs
        if unbatched:
            weights = weights.squeeze(0)
    return (out.squeeze(1) if unbatched else out), weights


#: The softmax spellings a model may use, as torch-function keys.
SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.Tensor.softmax)


def softmax_dim(args: tuple, kwargs: dict) -> Any:
    """The ``dim`` of a softmax call (``None`` when not given)."""
    return kwargs.get("dim", args[1] if len(args) > 1 else None)


def is_attention_softmax(x: Any, dim: Any) -> bool:
    """Whether a softmax over ``dim`` of ``x`` looks like attention: the last dimension of a
    ``(…, T, T)`` (square) score matrix of at least three dimensions, or of any
    ``(N, heads, L, S)`` score tensor (cross-attention, attention pooling with a learned
    query as timm's ``global_pool="map"``: ``(N, heads, 1, T)``, which the fused
    ``F.scaled_dot_product_attention`` path records as well)."""
    return (isinstance(x, torch.Tensor) and x.dim() >= 3 and isinstance(dim, int)
            and dim in (-1, x.dim() - 1) and (x.shape[-1] == x.shape[-2] or x.dim() >= 4))


class _Recorder(AttentionOps):
    def __init__(self, capture: "AttentionCapture") -> None:
        self.capture = capture

    def record(self, probs: torch.Tensor, source: str) -> None:
        self.capture.add(probs, source)


# Fused paths that a torch-function mode normally keeps PyTorch from taking; met directly,
# their attention cannot be read.
_FUSED = tuple(getattr(torch, name) for name in ("_native_multi_head_attention",
                                                  "_transformer_encoder_layer_fwd")
               if hasattr(torch, name))


class AttentionCapture(RuleContext):
    """Record every attention layer's probabilities during the forward passes in the block.

    Parameters
    ----------
    differentiable : bool
        Keep the recorded probabilities on the autograd graph of the output (their gradient
        ``∂y/∂A`` is then ``torch.autograd.grad(y, capture.attentions)``).  The model's output
        values are unchanged either way.

    Attributes
    ----------
    attentions : list of torch.Tensor
        ``(N, H, L, S)`` probabilities per attention call, in forward order (``H = 1`` for a
        three-dimensional hand-written softmax).
    sources : list of str
        Which operation each came from (``"scaled_dot_product_attention"``,
        ``"multi_head_attention_forward"`` or ``"softmax"``).
    blocked : list of tuple
        The original shapes of calls with more than one non-singleton dimension between the
        batch and the ``L × S`` scores (recorded with those dimensions merged into ``H``):
        ``(N, G, H, L, S)`` of attention within ``G`` windows or blocks (MaxViT), which a
        method that follows tokens across layers cannot tell from heads.

    Examples
    --------
    >>> with AttentionCapture() as capture:            # doctest: +SKIP
    ...     model(x)
    >>> [a.shape for a in capture.attentions]
    """

    replaces = "attention call"
    requirement = "a transformer (scaled_dot_product_attention, nn.MultiheadAttention or an " \
                  "explicit softmax over q·kᵀ)"

    def __init__(self, differentiable: bool = False) -> None:
        super().__init__()
        self.differentiable = bool(differentiable)
        self.warn_if_unused = False
        self.attentions: List[torch.Tensor] = []
        self.sources: List[str] = []
        self.blocked: List[Tuple[int, ...]] = []
        self._ops = _Recorder(self)
        self.handlers[F.scaled_dot_product_attention] = self._sdpa
        self.handlers[F.multi_head_attention_forward] = self._mha
        for func in SOFTMAX_FUNCTIONS:
            self.handlers[func] = self._softmax
        for func in _FUSED:
            self.handlers[func] = self._fused

    def __enter__(self):
        self.attentions, self.sources, self.blocked = [], [], []
        return super().__enter__()

    def add(self, probs: torch.Tensor, source: str) -> None:
        """Record one layer's probabilities (as ``(N, H, L, S)``)."""
        if probs.dim() == 3:
            probs = probs.unsqueeze(1)
        elif probs.dim() == 2:
            probs = probs.unsqueeze(0).unsqueeze(0)
        elif probs.dim() > 4:
            if sum(1 for d in probs.shape[1:-2] if d != 1) > 1:
                self.blocked.append(tuple(probs.shape))
            probs = probs.flatten(1, -3)
        self.attentions.append(probs if self.differentiable else probs.detach())
        self.sources.append(source)
        self.count("attention")

    def _differentiate(self, args: tuple, kwargs: dict) -> bool:
        return self.differentiable and records_gradient(args, kwargs)

    def _sdpa(self, func, args, kwargs):
        values = sdpa_arguments(args, kwargs)
        if not self._differentiate(args, kwargs):
            out = func(*args, **kwargs)
            with torch.no_grad():
                explicit_sdpa(values, self._ops)
            return out
        with torch.no_grad():
            exact = func(*args, **kwargs)
        return substitute(explicit_sdpa(values, self._ops), exact)

    def _mha(self, func, args, kwargs):
        values = mha_arguments(args, kwargs)
        _check_mha(values)
        if not self._differentiate(args, kwargs):
            out = func(*args, **kwargs)
            with torch.no_grad():
                explicit_mha(values, self._ops)
            return out
        with torch.no_grad():
            exact_out, exact_weights = func(*args, **kwargs)
        out, weights = explicit_mha(values, self._ops)
        out = substitute(out, exact_out)
        if exact_weights is not None and weights is not None:
            weights = substitute(weights, exact_weights)
        return out, (weights if exact_weights is not None else None)

    def _softmax(self, func, args, kwargs):
        out = func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        if is_attention_softmax(x, softmax_dim(args, kwargs)):
            self.add(out, "softmax")
        return out

    def _fused(self, func, args, kwargs):
        raise ValueError(
            f"the model calls the fused kernel torch.{func.__name__} directly, whose attention "
            "probabilities cannot be read; call nn.MultiheadAttention / "
            "F.scaled_dot_product_attention instead (inside the capture PyTorch then takes the "
            "explicit path)")
