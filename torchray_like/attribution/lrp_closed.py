r"""Closed-form backward of the LRP rules: the transposed linear map applied directly.

Every LRP rule of :mod:`.lrp_rules` computes ``c = op_w̃ᵀ(R / z̃)`` for a linear operation ``op``
(a convolution, transposed convolution or linear layer) with modified weights ``w̃``.  The
transposed map is the input-gradient of ``op``, which PyTorch exposes without building a graph:
``s @ w`` for a linear layer and ``aten.convolution_backward`` (what autograd's own
``ConvolutionBackward0`` calls, see ``torch.nn.grad.conv2d_input``) for a convolution.
:class:`~.lrp_rules.LinearMap` gives both directions of one recorded call;
:func:`~.lrp_rules.share` uses it: the same products in the same order as the nested
``torch.autograd.grad`` it replaces (bit for bit equal on the CPU), without a second autograd
graph per layer.

:func:`closed_gradient` adds what a rule gains from two facts the context knows (the rules as
Montavon et al., "Layer-wise relevance propagation: an overview", 2019, state them):

* the layer's output ``z = op(x, w) + b`` was computed in the forward pass, so LRP-ε needs no
  product beyond the transposed one (its ``z̃`` *is* ``z``), and LRP-γ gets its two
  denominators from ``z`` and one product with ``w⁺``:
  ``z̃⁺ = z + γ(op(x, w⁺) + b⁺)`` and ``z̃⁻ = z + γ(z − b − op(x, w⁺) + b⁻)`` (``w⁻ = w − w⁺``);
* a layer whose input a ReLU produced (directly, or through max pooling and reshapes) sees
  ``x ≥ 0``: the ``x⁻`` terms of z⁺, α-β and γ are exactly zero and are not computed.  Their
  transposed products only set the gradient at elements where ``x = 0``, whose relevance
  ``x ⊙ g`` is zero and which the ReLU does not pass on (its gradient is zero where its output
  is): no relevance anywhere changes.

:func:`zplus_folded` is z⁺ behind a folded batch norm whose scales are all positive, without
the folded weight (the scale moves into the bias of the product); α-β on a signed input (a first
layer) splits and stacks the input's signs once for both of its shares.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, cast

import torch

from .lrp_rules import (
    AffineCall,
    AlphaBeta,
    Epsilon,
    Gamma,
    LinearMap,
    Rule,
    ZPlus,
    linear_map,
    safe_divide,
)

__all__ = ["FOLD_FIXED_COST", "alpha_beta_folded", "closed_gradient", "folded_gradient",
           "gamma_folded", "rectified", "zplus_folded"]

# Autograd nodes whose output is >= 0 and whose gradient is zero where the output is zero.
_RECTIFIERS = frozenset({"ReluBackward0"})
# Nodes that only move elements: a zero of their input stays a zero whose gradient goes there.
_MOVERS = frozenset({"MaxPool1DWithIndicesBackward0", "MaxPool2DWithIndicesBackward0",
                     "MaxPool3DWithIndicesBackward0", "ViewBackward0", "ReshapeAliasBackward0",
                     "UnsafeViewBackward0", "FlattenBackward0"})


def rectified(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ReLU's output, directly or through max pooling and reshapes.

    Then ``x ≥ 0``, and the gradient reaching an element where ``x = 0`` stops at the ReLU.
    Read from the autograd graph, so it costs no pass over the data."""
    node = x.grad_fn
    for _ in range(8):
        if node is None:
            return False
        name = node.name()
        if name in _RECTIFIERS:
            return True
        if name not in _MOVERS:
            return False
        node = node.next_functions[0][0]
    return False


# dtype -> (torch.finfo(dtype).tiny, torch.finfo(dtype).max / 16) (finfo is slow to build for
# each layer; max / 16 bounds a shift whose sums with the values stay finite)
_LIMITS: Dict[torch.dtype, Tuple[float, float]] = {}


def _limits(dtype: torch.dtype) -> Tuple[float, float]:
    limits = _LIMITS.get(dtype)
    if limits is None:
        info = torch.finfo(dtype)
        limits = _LIMITS[dtype] = (float(info.tiny), float(info.max) / 16)
    return limits


def _tiny(dtype: torch.dtype) -> float:
    return _limits(dtype)[0]


def _huge(dtype: torch.dtype) -> float:
    return _limits(dtype)[1]


def _transpose_sum(op: LinearMap, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                   x: torch.Tensor) -> torch.Tensor:
    """``Σ_k op_{w_k}ᵀ(s_k)`` for ``pairs = [(s_k, w_k)]``: one product over the stacked
    output channels where that pays (:meth:`~.lrp_rules.LinearMap.stacks`)."""
    if op.stacks(x, pairs[0][1]):
        dim = -1 if op.kind == "linear" else 1
        s = torch.cat([s for s, _ in pairs], dim)
        w = torch.cat([w for _, w in pairs], 0)
        return op.transpose(s, w, x)
    total = op.transpose(pairs[0][0], pairs[0][1], x)
    for s, w in pairs[1:]:
        total = total + op.transpose(s, w, x)
    return total


def closed_gradient(rule: Rule, x: torch.Tensor, call: AffineCall, z: torch.Tensor,
                    r: torch.Tensor, nonnegative: bool) -> Optional[torch.Tensor]:
    """The rule's :meth:`~.lrp_rules.Rule.gradient` from the layer's output ``z`` (its bias
    included) and ``r = z ⊙ g``, or ``None`` where only the rule's own method applies.

    ``nonnegative``: ``x`` is a ReLU's output (:func:`rectified`).  Only the library's rule
    classes themselves are handled (a subclass may change :meth:`gradient`)."""
    kind = type(rule)
    if kind not in (Epsilon, ZPlus, AlphaBeta, Gamma):
        return None
    op = linear_map(call, x)
    if op is None:
        return None
    w, b = call.weight, call.bias
    if kind is Epsilon:
        # z̃ = op(x, w) + b is the layer's output itself.
        return op.transpose(safe_divide(r, z, cast(Epsilon, rule).epsilon), w, x)
    if not nonnegative:
        return _alpha_beta_signed(op, cast(AlphaBeta, rule), x, w, b, r) \
            if kind is AlphaBeta else None
    if kind is AlphaBeta:
        return _alpha_beta(op, cast(AlphaBeta, rule), x, w, b, r)
    wp = w.clamp(min=0)
    bp = None if b is None else b.clamp(min=0)
    if kind is ZPlus:
        eps = cast(ZPlus, rule).epsilon
        if bp is not None and eps >= _tiny(r.dtype):
            # x, w⁺, b⁺ ≥ 0: z⁺ ≥ 0 (+0 or -0 at the least), whose stabilised form
            # z⁺ + ε·sign(z⁺) (sign(±0) = 1) is z⁺ + ε: ε joins the bias of the product (one
            # operation on the bias instead of a pass over the outputs).
            return op.transpose(torch.div(r, op.forward(x, wp, bp.add_(eps))), wp, x)
        zp = op.forward(x, wp, bp)
        if eps >= _tiny(zp.dtype):
            # The same without a bias: z⁺ + ε in one pass instead of safe_divide's four.
            return op.transpose(torch.div(r, zp.add_(eps)), wp, x)
        return op.transpose(safe_divide(r, zp, eps), wp, x)
    return _gamma(op, cast(Gamma, rule), x, z, w, wp, bp, r)


#: Elements of a pass that cost about what the folded forms' few extra small operations on
#: the per-channel scales do (about 30 µs on one CPU thread): :func:`gamma_folded` and
#: :func:`alpha_beta_folded` leave layers whose weight is smaller to the folded weight (the
#: same relevance, to rounding; 0 turns the size test off, as tests do).
FOLD_FIXED_COST = 1 << 16


def _fold(call: AffineCall, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
          usable: bool) -> Optional[Tuple[LinearMap, torch.Tensor]]:
    """The closed form of ``call`` and its folded bias ``b' = a ⊙ b + c``, where a batch norm's
    scale can move out of the weight: ``usable`` (the rule's ε does not vanish in the dtype),
    a closed form other than a transposed convolution, tensors on the CPU (on an accelerator
    the caller's test of the scales' signs would wait for the device at every layer: the folded
    weight is cheaper there).  ``None`` otherwise; the scales' signs are the caller's to test."""
    if not usable or scale.device.type != "cpu":
        return None
    op = linear_map(call, x)
    if op is None or op.kind == "conv_transpose":
        return None
    return op, shift if call.bias is None else torch.addcmul(shift, call.bias, scale)


def folded_gradient(rule: Rule, x: torch.Tensor, call: AffineCall, scale: torch.Tensor,
                    shift: torch.Tensor, z: torch.Tensor, r: torch.Tensor
                    ) -> Optional[torch.Tensor]:
    """The rule's gradient on ``x ≥ 0`` of ``call`` followed by a batch norm ``y ↦ a ⊙ y + c``
    folded into it (``z`` the folded output), without building the folded weight —
    :func:`zplus_folded`, :func:`gamma_folded` or :func:`alpha_beta_folded` by the rule — or
    ``None`` where none applies (the caller folds the weight)."""
    kind = type(rule)
    if kind is ZPlus:
        return zplus_folded(rule, x, call, scale, shift, r)
    if kind is Gamma:
        return gamma_folded(rule, x, call, scale, shift, z, r)
    if kind is AlphaBeta:
        return alpha_beta_folded(rule, x, call, scale, shift, r)
    return None


def zplus_folded(rule: Rule, x: torch.Tensor, call: AffineCall, scale: torch.Tensor,
                 shift: torch.Tensor, r: torch.Tensor) -> Optional[torch.Tensor]:
    """z⁺ on ``x ≥ 0`` of ``call`` followed by a batch norm ``y ↦ a ⊙ y + c`` (``scale``,
    ``shift``) folded into it, without building the folded weight, or ``None``.

    The folded layer has ``w' = a ⊙ w`` and ``b' = a ⊙ b + c`` per output channel.  Where every
    ``a > 0``, ``w'⁺ = a ⊙ w⁺``, so ``z̃ = a ⊙ op(x, w⁺) + b'⁺`` and
    ``op_{w'⁺}ᵀ(R / (z̃ + ε)) = op_{w⁺}ᵀ(R / (op(x, w⁺) + (b'⁺ + ε) / a))``: the scale moves
    from the weight (a pass over it) into the bias of the product (one number per channel).
    ``None`` where some ``a ≤ 0`` (``w'⁺`` is then not ``a ⊙ w⁺``), ``ε`` vanishes in the dtype,
    the call has no closed form or the tensors are not on the CPU: the caller folds the
    weight."""
    if type(rule) is not ZPlus:
        return None
    eps = cast(ZPlus, rule).epsilon
    found = _fold(call, x, scale, shift, eps >= _tiny(r.dtype))
    if found is None or not bool((scale > 0).all()):
        return None
    op, bias = found
    wp = call.weight.clamp(min=0)
    return op.transpose(torch.div(r, op.forward(x, wp, bias.clamp(min=0).add_(eps).div_(scale))),
                        wp, x)


def gamma_folded(rule: Rule, x: torch.Tensor, call: AffineCall, scale: torch.Tensor,
                 shift: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> Optional[torch.Tensor]:
    """γ on ``x ≥ 0`` of ``call`` followed by a batch norm ``y ↦ a ⊙ y + c`` folded into it
    (``z`` the folded output), without building the folded weight, or ``None``.

    Where every ``a > 0``: ``w'⁺ = a ⊙ w⁺``, so ``op(x, w'⁺) + b'⁺ = a ⊙ (op(x, w⁺) + b'⁺ / a)``
    (the scale moves to the product's bias and output) and ``op_{w'}ᵀ(s) = op_wᵀ(a ⊙ s)`` (to
    the transposed products' input): passes over the outputs instead of over the weight, which
    at batch 1 is the larger.  ``None`` where :func:`zplus_folded` would decline too."""
    if type(rule) is not Gamma or (
            FOLD_FIXED_COST and call.weight.numel() <= 2 * r.numel() + FOLD_FIXED_COST):
        # (It trades a pass over the weight for two over the outputs and a few small
        # operations: on small layers the folded weight is cheaper.)
        return None
    gs = _gamma_shift(cast(Gamma, rule), r.dtype)
    found = _fold(call, x, scale, shift, gs != 0)
    if found is None:
        return None
    op, bias = found
    bp = bias.clamp(min=0)
    # (b'⁺ + ε/γ) / a, the product's bias, must stay far from overflow (a scale near zero, or
    # subnormal: q = inf there, and z̃ NaN): per channel, one test with the scales' signs.
    if not bool(((scale > 0) & ((bp + gs) / scale <= _huge(r.dtype))).all()):
        return None
    return _gamma(op, cast(Gamma, rule), x, z, call.weight, call.weight.clamp(min=0), bp, r,
                  scale)


def alpha_beta_folded(rule: Rule, x: torch.Tensor, call: AffineCall, scale: torch.Tensor,
                      shift: torch.Tensor, r: torch.Tensor) -> Optional[torch.Tensor]:
    """α-β on ``x ≥ 0`` of ``call`` followed by a batch norm ``y ↦ a ⊙ y + c`` folded into it,
    without building the folded weight, or ``None``.

    Where every ``a > 0``, ``w'^± = a ⊙ w^±``, so ``z̃^± = a ⊙ (op(x, w^±) + b'^± / a)`` and
    ``op_{w'^±}ᵀ(R / (z̃^± ± ε)) = op_{w^±}ᵀ(R / (op(x, w^±) + (b'^± ± ε) / a))``: the scale
    cancels (as in :func:`zplus_folded`).  ``None`` where :func:`zplus_folded` would decline
    too."""
    if type(rule) is not AlphaBeta or call.weight.numel() <= FOLD_FIXED_COST:
        return None  # (a few small operations against a pass over a small weight)
    eps = cast(AlphaBeta, rule).epsilon
    found = _fold(call, x, scale, shift, eps >= _tiny(r.dtype))
    if found is None or not bool((scale > 0).all()):
        return None
    op, bias = found
    bp = bias.clamp(min=0).add_(eps).div_(scale)
    bn = bias.clamp(max=0).sub_(eps).div_(scale)
    return _alpha_beta_stabilised(op, cast(AlphaBeta, rule), x, call.weight, bp, bn, r)


def _alpha_beta(op: LinearMap, rule: AlphaBeta, x: torch.Tensor, w: torch.Tensor,
                b: Optional[torch.Tensor], r: torch.Tensor) -> torch.Tensor:
    """α-β on ``x ≥ 0``: ``α op_{w⁺}ᵀ(R / z̃⁺) − β op_{w⁻}ᵀ(R / z̃⁻)``, ``z̃^± = op(x, w^±) + b^±``
    (both products at once over stacked output channels where that pays).

    ``z̃⁺ ≥ 0`` and ``z̃⁻ ≤ 0``, so their stabilised forms are ``z̃⁺ + ε`` and ``z̃⁻ − ε``: ε
    joins the biases of the products, and each share is one division.  (``safe_divide`` would
    add ``+ε`` where ``z̃⁻ = 0``; there every term ``x_j w⁻_j`` and ``b⁻`` is 0, so the share
    ``x_j w⁻_j R / z̃⁻`` is 0 whatever the denominator: no relevance changes.)"""
    eps = rule.epsilon
    if eps < _tiny(r.dtype):  # ε vanishes in the dtype: safe_divide masks zero denominators
        bp = None if b is None else b.clamp(min=0)
        bn = None if b is None else b.clamp(max=0)
        if not op.stacks(x, w):
            wp, wn = w.clamp(min=0), w.clamp(max=0)
            sp = safe_divide(r, op.forward(x, wp, bp), eps) * rule.alpha
            sn = safe_divide(r, op.forward(x, wn, bn), eps) * -rule.beta
            return _transpose_sum(op, [(sp, wp), (sn, wn)], x)
        dim = -1 if op.kind == "linear" else 1
        ws = _signed_stack(w)
        bs = None if b is None else torch.cat([cast(torch.Tensor, bp), cast(torch.Tensor, bn)])
        return op.transpose(_ab_share(rule, r, op.forward(x, ws, bs), dim), ws, x)
    if b is None:
        bp = torch.full((_channels(op, r),), eps, dtype=w.dtype, device=w.device)
        bn = -bp
    else:
        bp, bn = b.clamp(min=0).add_(eps), b.clamp(max=0).sub_(eps)
    return _alpha_beta_stabilised(op, rule, x, w, bp, bn, r)


def _alpha_beta_stabilised(op: LinearMap, rule: AlphaBeta, x: torch.Tensor, w: torch.Tensor,
                           bp: torch.Tensor, bn: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """α-β's shares with the stabilised biases ``bp = b⁺ + ε`` and ``bn = b⁻ − ε``."""
    if not op.stacks(x, w):
        signed = ((w.clamp(min=0), bp, rule.alpha), (w.clamp(max=0), bn, -rule.beta))
        return _transpose_sum(op, [(_share(r, factor, op.forward(x, wk, bk)), wk)
                                   for wk, bk, factor in signed], x)
    dim = -1 if op.kind == "linear" else 1
    ws = _signed_stack(w)
    zs = op.forward(x, ws, torch.cat([bp, bn]))
    shares = ((bp, rule.alpha), (bn, -rule.beta))
    n = r.shape[dim]
    for k, (_, factor) in enumerate(shares):  # in place of z̃: no stacked copy of R
        _share(r, factor, zs.narrow(dim, k * n, n), out=True)
    return op.transpose(zs, ws, x)


def _signed_stack(w: torch.Tensor) -> torch.Tensor:
    """``[w⁺; w⁻]`` over the output channels, clamped straight into place (no concatenated
    copy)."""
    n = w.shape[0]
    ws = w.new_empty((2 * n,) + tuple(w.shape[1:]))
    torch.clamp(w, min=0, out=ws[:n])
    torch.clamp(w, max=0, out=ws[n:])
    return ws


def _share(r: torch.Tensor, factor: float, z: torch.Tensor, out: bool = False) -> torch.Tensor:
    """``factor ⊙ R / z`` (the numerator scaled first: exact for the powers of two of α2β1
    and α1β0), into ``z`` itself with ``out``."""
    num = r if factor == 1.0 else r * factor
    return torch.div(num, z, out=z) if out else num / z


def _ab_share(rule: AlphaBeta, r: torch.Tensor, zs: torch.Tensor, dim: int) -> torch.Tensor:
    """``[α R / z̃⁺, −β R / z̃⁻]`` from ``zs = [z̃⁺, z̃⁻]`` stacked along the output channels
    (``α``, ``β`` scale the numerators: exact for the powers of two of α2β1 and α1β0)."""
    return safe_divide(torch.cat([r * rule.alpha, r * -rule.beta], dim), zs, rule.epsilon)


def _alpha_beta_signed(op: LinearMap, rule: AlphaBeta, x: torch.Tensor, w: torch.Tensor,
                       b: Optional[torch.Tensor], r: torch.Tensor) -> Optional[torch.Tensor]:
    """α-β on signed ``x`` (a first layer on images), or ``None`` where the layout does not
    allow stacking the input's signs (a grouped convolution) or the weights are larger than
    the unfolded input (:meth:`~.lrp_rules.LinearMap.stacks`).

    With ``x̂ = [x⁺, x⁻]`` stacked along the input channels, the positive contributions
    ``x⁺w⁺ + x⁻w⁻`` are ``op(x̂, [w⁺, w⁻])`` and the negative ones ``op(x̂, [w⁻, w⁺])``: one
    product each.  The transposed products of ``α R/z̃⁺`` and ``−β R/z̃⁻`` with the same
    stacked weights, summed, hold in their first block the gradient where ``x > 0``
    (``α op_{w⁺}ᵀ(R/z̃⁺) − β op_{w⁻}ᵀ(R/z̃⁻)``) and in their second the gradient where
    ``x < 0``: the products :meth:`AlphaBeta.gradient` computes, with the input's signs
    split and stacked once instead of twice and one selection by sign instead of two."""
    if not op.stacks(x, w):
        return None
    dim = -1 if op.kind == "linear" else 1
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    w_pos, w_neg = torch.cat([wp, wn], 1), torch.cat([wn, wp], 1)
    xs = torch.cat([x.clamp(min=0), x.clamp(max=0)], dim)
    eps = rule.epsilon
    s_pos = safe_divide(r * rule.alpha, op.forward(xs, w_pos, None if b is None
                                                  else b.clamp(min=0)), eps)
    s_neg = safe_divide(r * -rule.beta, op.forward(xs, w_neg, None if b is None
                                                  else b.clamp(max=0)), eps)
    c = op.transpose(s_pos, w_pos, xs).add_(op.transpose(s_neg, w_neg, xs))
    c_pos, c_neg = c.split(x.shape[dim], dim)
    return torch.where(x > 0, c_pos, c_neg)


def _gamma(op: LinearMap, rule: Gamma, x: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
           wp: torch.Tensor, bp: Optional[torch.Tensor], r: torch.Tensor,
           scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """γ on ``x ≥ 0`` from ``z`` and one product with ``w⁺``.

    With ``q = op(x, w⁺) + b⁺``: ``z̃⁺ = z + γq`` (outputs with ``z > 0``, which share by
    ``w + γw⁺``) and ``z̃⁻ = z + γ(z − q)`` (the others, by ``w + γw⁻``; ``w⁻ = w − w⁺``,
    ``b⁻ = b − b⁺``).  With ``s = R / z̃`` (``z̃`` the one of each output) and ``s⁻`` its part
    on outputs with ``z ≤ 0``,
    ``op_{w+γw⁺}ᵀ(s − s⁻) + op_{w+γw⁻}ᵀ(s⁻) = op_wᵀ(s + γs⁻) + γ op_{w⁺}ᵀ(s − 2s⁻)``: two
    transposed products, one over stacked output channels where the layout allows.  Where no
    relevance reaches an output with ``z ≤ 0`` (``s⁻ = 0``: a ReLU after the layer, as in VGG,
    zeroes their gradient), one: ``op_{w+γw⁺}ᵀ(s)`` — the cost of z⁺.

    ``z̃⁺ > 0`` and ``z̃⁻ ≤ (1 + γ) z ≤ 0``, so their stabilised forms are ``z̃⁺ + ε`` and
    ``z̃⁻ − ε`` — both from ``q + ε/γ`` in place of ``q``: ε joins the bias of the product.
    (Where ``z = 0``, ``R = z ⊙ g = 0`` and the share is 0 whatever the denominator.)  The
    choices by the sign of ``z`` are arithmetic with the 0/1 weight ``n = [z ≤ 0]`` (``lerp``
    returns one of its ends exactly for finite values), not ``torch.where``, whose CPU kernel
    takes about ten times as long as one pass of arithmetic over the same tensor.

    ``scale``: the per-channel scales ``a > 0`` of a batch norm folded into the layer
    (:func:`gamma_folded`; ``w``, ``wp`` the layer's own, ``bp`` the folded bias's ``b'⁺``)."""
    gamma, eps = rule.gamma, rule.epsilon
    a = None if scale is None else scale.view([-1] + [1] * (z.dim() - 2) if op.conv else [-1])
    n = torch.le(z, 0, out=torch.empty_like(z))  # 1.0 where z ≤ 0, else 0.0
    shift = _gamma_shift(rule, r.dtype)
    if shift > 0:
        bias = (torch.full((_channels(op, r),), shift, dtype=wp.dtype, device=wp.device)
                if bp is None else bp.add_(shift))
        if a is None:
            q = op.forward(x, wp, bias)  # q + ε/γ
        else:  # a ⊙ (op(x, w⁺) + (b'⁺ + ε/γ) / a)
            q = op.forward(x, wp, bias.div_(cast(torch.Tensor, scale))).mul_(a)
        s = torch.div(r, torch.add(z, torch.lerp(q, z - q, n), alpha=gamma))
    else:  # γ = 0 or ε vanishing in the dtype: the general stabiliser
        q = op.forward(x, wp, bp)
        s = safe_divide(r, torch.add(z, torch.lerp(q, z - q, n), alpha=gamma), eps)
    if a is not None:  # op_{a⊙w}ᵀ(s) = op_wᵀ(a ⊙ s)
        s.mul_(a)
    sn = s * n
    if s.device.type == "cpu" and not bool(sn.any()):
        # (On an accelerator the test would wait for the device at every layer.)
        return op.transpose(s, torch.add(w, wp, alpha=gamma), x)
    if op.stacks(x, w):
        dim = -1 if op.kind == "linear" else 1
        k = s.shape[dim]
        shape = list(s.shape)
        shape[dim] = 2 * k
        stacked = s.new_empty(shape)
        torch.add(s, sn, alpha=gamma, out=stacked.narrow(dim, 0, k))
        torch.add(s, sn, alpha=-2.0, out=stacked.narrow(dim, k, k)).mul_(gamma)
        return op.transpose(stacked, torch.cat([w, wp], 0), x)
    return _transpose_sum(op, [(torch.add(s, sn, alpha=gamma), w),
                               (torch.add(s, sn, alpha=-2.0).mul_(gamma), wp)], x)


def _gamma_shift(rule: Gamma, dtype: torch.dtype) -> float:
    """``ε/γ``, the shift of ``q`` that stabilises both of γ's denominators, or 0 where the
    general stabiliser applies (``γ = 0``, or ε vanishing in ``dtype``)."""
    if rule.gamma <= 0 or rule.epsilon < _tiny(dtype):
        return 0.0
    shift = rule.epsilon / rule.gamma
    # A normal number of the dtype (a shift that underflows leaves z̃ = 0/0 where z = q = 0),
    # and far from its overflow (q + ε/γ and the lerp's 2(q + ε/γ) stay finite; huge γ or
    # tiny γ: the general stabiliser).
    return shift if _tiny(dtype) <= shift <= _huge(dtype) else 0.0


def _channels(op: LinearMap, r: torch.Tensor) -> int:
    """The number of output channels of ``op`` (``r`` shaped as its output)."""
    return r.shape[-1] if op.kind == "linear" else r.shape[1]
