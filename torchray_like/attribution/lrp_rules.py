r"""Layer-wise relevance propagation rules, as values.

Bach et al., "On pixel-wise explanations for non-linear classifier decisions by layer-wise
relevance propagation", PLoS ONE 2015; Montavon et al., "Layer-wise relevance propagation: an
overview", 2019.  A rule says how the relevance ``R`` of the outputs of one linear operation
``z = op(x, w) + b`` (a convolution, a transposed convolution, a linear layer, a batch norm
taken as an element-wise affine map) is shared among its inputs.  Every rule here has the form

.. math::

    R_j = \sum_k \sum_i \frac{\tilde x^{(k)}_j \tilde w^{(k)}_{ij}}{\tilde z_i} R_i,
    \qquad \tilde z_i = \sum_k \sum_j \tilde x^{(k)}_j \tilde w^{(k)}_{ij} + \tilde b_i,

a sum of terms ``(x̃, w̃)`` (the input and the weight modified), computed as ``x̃ ⊙ op_w̃ᵀ(R /
z̃)``: one forward and one transposed application of the operation per term.  The rules
(:class:`Epsilon`, :class:`Gamma`, :class:`ZPlus`, :class:`AlphaBeta`, :class:`Flat`,
:class:`WSquare`, :class:`ZBox`) are frozen dataclasses: values a composite maps layers to.

**Gradient form.**  :class:`~torchray_like.attribution.lrp.LRPContext` propagates
``g = R / t`` (the *gradient* under the rules) rather than ``R``: the relevance of a tensor ``t``
is ``t ⊙ g``.  Rules whose relevance is proportional to their input (``R_j = x_j c_j``: ε, γ, z⁺,
α-β) return ``c`` exactly (:meth:`Rule.gradient`); the first-layer rules (flat, w², z^B) give
relevance to inputs equal to zero too, which the gradient form cannot carry: they return
``R / x`` where ``x ≠ 0`` and the rest is reported as lost (:meth:`Rule.relevance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, List, Optional, Sequence, Tuple, Union, cast

import torch

__all__ = ["ModifiedWeightError", "AffineCall", "LinearMap", "linear_map", "share_terms", "Rule",
           "Epsilon", "Gamma", "ZPlus", "AlphaBeta", "Flat", "WSquare", "ZBox", "stabilize",
           "safe_divide", "compute_dtype", "scale_shift", "share", "RULES"]


class ModifiedWeightError(ValueError, RuntimeError):
    """A layer's weight changed in place between the forward pass and the backward pass of a
    rule (LRP, excitation backprop), which would silently use weights the forward pass did not:
    a :class:`ValueError` about the caller's state, and a :class:`RuntimeError` as autograd's
    own error for a modified saved tensor (``except RuntimeError`` still catches it)."""


Term = Tuple[torch.Tensor, torch.Tensor]  # (modified input, modified weight)
_UNPARSED = object()  # AffineCall._map before the call's closed form is parsed


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rules compute in: float32 for 16-bit floats, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


#: The ε that keeps the denominators of the rules other than ε away from zero.
STABILIZER = 1e-6


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + ε · sign(z)`` with ``sign(0) = 1``: the denominator moved away from zero."""
    if epsilon == 0:
        return z
    # ε with z's sign bit, after z + 0.0 has turned -0.0 into +0.0 (sign(±0) = 1): the same
    # values as z + where(z >= 0, ε, -ε), in fewer passes over z (no where of two numbers;
    # ε a 0-dimensional tensor of z's dtype that copysign broadcasts, not a filled copy).
    z0 = z + 0.0
    signed = torch.copysign(_scalar(epsilon, z0), z0)
    # In place, unless autograd records it (copysign keeps its output for backward).
    return signed + z0 if z0.requires_grad else signed.add_(z0)


_SCALARS: dict = {}  # (value, dtype, device) -> 0-dimensional tensor (constants, never written)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    key = (value, like.dtype, like.device)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= 64:
            _SCALARS.clear()
        with torch.inference_mode(False):  # a normal tensor, also when first made in one
            t = _SCALARS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return t


def safe_divide(r: torch.Tensor, z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``r / stabilize(z, ε)``, zero where the denominator is exactly zero (``ε = 0``)."""
    d = stabilize(z, epsilon)
    if epsilon >= torch.finfo(d.dtype).tiny:
        # ε moves every finite z at least ε away from zero (and is no subnormal that the
        # dtype could flush to zero): no denominator is zero, no masking is needed.
        return r / d
    return torch.where(d == 0, torch.zeros_like(r), r / torch.where(d == 0, 1.0, d))


def _scaled_weight(call: "AffineCall", scale: torch.Tensor) -> torch.Tensor:
    """The weight multiplied per output channel by ``scale`` (a batch norm folded into it)."""
    w = call.weight
    shape = [1] * w.dim()
    out_dim = 1 if call.kind == "conv_transpose" else 0
    shape[out_dim] = -1
    return w * scale.reshape(shape)


class AffineCall:
    """One linear operation the context replaced, replayable with other inputs and weights.

    ``func(x, weight, bias, *rest, **kwargs)`` is the operation (``F.linear``,
    ``torch.conv2d`` ...); ``kind`` is ``"conv"``, ``"conv_transpose"``, ``"linear"`` or
    ``"batch_norm"`` (an element-wise affine map, weights of the input's channels).
    """

    __slots__ = ("func", "weight", "bias", "rest", "kwargs", "kind", "_map")

    def __init__(self, func: Callable, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 rest: Sequence[Any] = (), kwargs: Optional[dict] = None,
                 kind: str = "linear") -> None:
        self.func, self.kind = func, kind
        # Detached where autograd tracks them (a frozen parameter is used as it is).
        self.weight = weight.detach() if weight.requires_grad else weight
        self.bias = bias.detach() if bias is not None and bias.requires_grad else bias
        self.rest, self.kwargs = tuple(rest), dict(kwargs or {})
        # The closed form (LinearMap) of the operation, parsed once: see linear_map().
        self._map: Any = _UNPARSED

    def apply(self, x: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``op(x, weight) + bias`` (the plain operation, no rule context)."""
        with torch._C.DisableTorchFunction():
            return self.func(x, weight, bias, *self.rest, **self.kwargs)

    def folded(self, scale: torch.Tensor, shift: torch.Tensor) -> "AffineCall":
        """The operation followed by ``y ↦ scale ⊙ y + shift`` per output channel, merged."""
        bias = shift if self.bias is None else self.bias * scale + shift
        return self._like(_scaled_weight(self, scale), bias)

    def cast(self, dtype: torch.dtype) -> "AffineCall":
        """The same operation with weight and bias in ``dtype``."""
        if self.weight.dtype == dtype:
            return self
        bias = None if self.bias is None else self.bias.to(dtype)
        return self._like(self.weight.to(dtype), bias)

    def _like(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> "AffineCall":
        """The same operation with another weight and bias (and the same closed form)."""
        # Not through __init__: the weights are the rule's own (no detach), the rest shared.
        call = AffineCall.__new__(AffineCall)
        call.func, call.rest, call.kwargs, call.kind = self.func, self.rest, self.kwargs, self.kind
        call.weight, call.bias, call._map = weight, bias, self._map
        return call

    def linear_map(self, x: torch.Tensor) -> Optional["LinearMap"]:
        """The operation's closed form (:class:`LinearMap`) for inputs shaped as ``x``, or
        ``None`` where it has none."""
        if self._map is _UNPARSED:
            self._map = LinearMap.cached(self)
        op = self._map
        return op if op is not None and op.usable(x) else None

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """``op(x, w) + b``."""
        return self.apply(x, self.weight, self.bias)


def scale_shift(x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x ⊙ weight + bias`` along dimension 1: a batch norm with running statistics."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = x * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


def _bias(call: AffineCall, modifier: Optional[Callable[[torch.Tensor], torch.Tensor]]
          ) -> Optional[torch.Tensor]:
    if call.bias is None or modifier is None:
        return None
    return modifier(call.bias)


def _ints(value, n: int, name: str) -> Optional[List[int]]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    if name == "padding" and value == "valid":
        return [0] * n
    return None  # "same" (possibly asymmetric) or an unexpected value: the autograd path


_CONV_NAMES = ("stride", "padding", "dilation", "groups")
_CONV_T_NAMES = ("stride", "padding", "output_padding", "groups", "dilation")
_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
_MAPS: dict = {}  # LinearMap.cached: (operation, kind, weight dims, arguments) -> LinearMap


class LinearMap:
    """Both directions of one recorded linear call: ``forward(x, w, b) = op(x, w) + b`` and
    ``transpose(s, w, x)`` = the gradient of ``⟨s, op(x, w)⟩`` with respect to ``x``.

    Built by :meth:`of`, which returns ``None`` for a call it cannot transpose in closed form
    (``padding="same"``, a batch norm): the rules then use autograd.  It keeps the operation
    and its arguments, not the call's weight, and is shared by the calls with the same ones
    (:meth:`cached`).
    """

    __slots__ = ("func", "rest", "kwargs", "kind", "ndim", "conv", "transposed", "stride",
                 "padding", "dilation", "output_padding", "groups")

    def __init__(self, call: AffineCall) -> None:
        self.func, self.rest, self.kwargs = call.func, call.rest, call.kwargs
        self.kind, self.ndim = call.kind, call.weight.dim()
        self.conv = call.kind in ("conv", "conv_transpose")
        self.transposed = call.kind == "conv_transpose"
        self.stride: List[int] = []
        self.padding: List[int] = []
        self.dilation: List[int] = []
        self.output_padding: List[int] = []
        self.groups = 1

    @classmethod
    def of(cls, call: AffineCall) -> Optional["LinearMap"]:
        """The closed form of ``call``, or ``None``."""
        op = cls(call)
        if call.kind == "linear":
            return op
        if not op.conv:
            return None
        names = _CONV_T_NAMES if op.transposed else _CONV_NAMES
        if len(call.rest) > len(names) or set(call.kwargs) - set(names):
            return None
        values = dict(_DEFAULTS, **dict(zip(names, call.rest)), **call.kwargs)
        n = call.weight.dim() - 2
        groups = values["groups"]
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            return None
        op.groups = groups
        for name in ("stride", "padding", "dilation", "output_padding"):
            ints = _ints(values[name], n, name)
            if ints is None:
                return None
            setattr(op, name, ints)
        return op

    @classmethod
    def cached(cls, call: AffineCall) -> Optional["LinearMap"]:
        """:meth:`of`, parsed once per operation and arguments (a few hundred kept)."""
        try:
            key: Any = (call.func, call.kind, call.weight.dim(), call.rest,
                        tuple(sorted(call.kwargs.items())))
            hash(key)
        except TypeError:  # a list among the arguments: parse this call alone
            return cls.of(call)
        if key not in _MAPS:
            if len(_MAPS) >= 256:
                _MAPS.clear()
            _MAPS[key] = cls.of(call)
        return _MAPS[key]

    def forward(self, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``op(x, weight) + bias``."""
        with torch._C.DisableTorchFunction():
            return self.func(x, weight, bias, *self.rest, **self.kwargs)

    def transpose(self, s: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``op_weightᵀ(s)``, shaped as ``x`` (whose values are not read)."""
        if not self.conv:
            return s @ weight
        if x.dim() != weight.dim():
            raise ValueError("LinearMap: unbatched convolution input")  # ruled out by callers
        return torch.ops.aten.convolution_backward(
            s, x, weight, None, self.stride, self.padding, self.dilation, self.transposed,
            self.output_padding, self.groups, [True, False, False])[0]

    def stacks(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether products with several weights like ``weight`` on inputs like ``x`` are
        better done as one product over stacked channels: the layout allows it (a linear
        layer, an ungrouped convolution), and the weights, which stacking copies, are smaller
        than the input unfolded for the product (which the separate products each build)."""
        if not (self.kind == "linear" or (self.kind == "conv" and self.groups == 1)):
            return False
        unfolded = x.numel() * (math.prod(weight.shape[2:]) if self.conv else 1)
        return weight.numel() <= unfolded

    def usable(self, x: torch.Tensor) -> bool:
        """Whether :meth:`transpose` applies to inputs shaped as ``x``."""
        return not self.conv or x.dim() == self.ndim


def linear_map(call: AffineCall, x: torch.Tensor) -> Optional[LinearMap]:
    """:meth:`AffineCall.linear_map`: the call's closed form for inputs shaped as ``x``."""
    return call.linear_map(x)


def share_terms(op: LinearMap, terms: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                bias: Optional[torch.Tensor], r: torch.Tensor,
                epsilon: float) -> List[torch.Tensor]:
    """``c_k = op_{w̃_k}ᵀ(R / z̃)`` with ``z̃ = Σ_k op(x̃_k, w̃_k) + b̃`` (see
    :func:`~.lrp_rules.share`), in closed form."""
    if len(terms) > 1 and op.stacks(terms[0][0], terms[0][1]):
        # One product over the terms' inputs stacked along the input channels (and one
        # transposed): the same sums, fewer calls.
        dim = -1 if op.kind == "linear" else 1
        xs = torch.cat([x for x, _ in terms], dim)
        ws = torch.cat([w for _, w in terms], 1)
        s = safe_divide(r, op.forward(xs, ws, bias), epsilon)
        return list(op.transpose(s, ws, xs).split([x.shape[dim] for x, _ in terms], dim))
    z: Optional[torch.Tensor] = None
    for x, w in terms:
        out = op.forward(x, w, bias if z is None else None)
        z = out if z is None else z + out
    assert z is not None
    s = safe_divide(r, z, epsilon)
    return [op.transpose(s, w, x) for x, w in terms]


def share(call: AffineCall, terms: Sequence[Term], bias: Optional[torch.Tensor],
          r: torch.Tensor, epsilon: float) -> List[torch.Tensor]:
    """``c_k = op_{w̃_k}ᵀ(R / z̃)`` for each term, with ``z̃ = Σ_k op(x̃_k, w̃_k) + b̃``
    stabilised by ``ε``: one replay of the operation on leaves, one transposed pass.

    In closed form (:class:`LinearMap`) where the call allows: the same products, no nested
    autograd graph."""
    op = linear_map(call, terms[0][0])
    if op is not None:
        return share_terms(op, terms, bias, r, epsilon)
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x, _ in terms]
        z = None
        for leaf, (_, w) in zip(leaves, terms):
            out = call.apply(leaf, w, bias if z is None else None)
            z = out if z is None else z + out
    assert z is not None
    s = safe_divide(r, z.detach(), epsilon)
    return list(torch.autograd.grad(z, leaves, s))


def positive(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=0)


def negative(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=0)


@dataclass(frozen=True)
class Rule:
    """Base of the LRP rules: how one linear operation shares its outputs' relevance.

    Subclasses implement :meth:`gradient` (relevance proportional to the input, ``R_x = x ⊙
    gradient``) or, for first-layer rules that are not, :meth:`relevance`.
    """

    #: Whether ``R_x = x ⊙ g`` for the returned ``g`` (the gradient form is exact).
    proportional: ClassVar[bool] = True
    #: The rule's name in messages and tables.
    name: ClassVar[str] = "rule"

    def gradient(self, x: torch.Tensor, call: AffineCall, r: torch.Tensor) -> torch.Tensor:
        """``g`` with ``R_x = x ⊙ g``, given the relevance ``r`` of the outputs."""
        raise NotImplementedError

    def relevance(self, x: torch.Tensor, call: AffineCall, r: torch.Tensor) -> torch.Tensor:
        """``R_x`` itself."""
        return x * self.gradient(x, call, r)


def _signed_terms(x: torch.Tensor, w_for_positive_x: torch.Tensor,
                  w_for_negative_x: torch.Tensor) -> List[Term]:
    return [(positive(x), w_for_positive_x), (negative(x), w_for_negative_x)]


def _by_sign(x: torch.Tensor, c_pos: torch.Tensor, c_neg: torch.Tensor) -> torch.Tensor:
    """``g`` with ``x ⊙ g = x⁺ ⊙ c_pos + x⁻ ⊙ c_neg``."""
    return torch.where(x > 0, c_pos, c_neg)


@dataclass(frozen=True)
class Epsilon(Rule):
    r"""LRP-ε: ``R_j = Σ_i x_j w_ij / (z_i + ε sign z_i) · R_i`` (``z`` with its bias, which
    absorbs its share).  ``epsilon=0`` is LRP-0 (gradient × input)."""

    epsilon: float = 1e-6
    name: ClassVar[str] = "epsilon"

    def __post_init__(self) -> None:
        _check_number(self, "epsilon", self.epsilon)

    def gradient(self, x: torch.Tensor, call: AffineCall, r: torch.Tensor) -> torch.Tensor:
        (c,) = share(call, [(x, call.weight)], call.bias, r, self.epsilon)
        return c


@dataclass(frozen=True)
class Gamma(Rule):
    r"""LRP-γ: positive contributions favoured, ``w + γ w⁺`` (and ``b + γ b⁺``); ``ε`` only
    stabilises the denominator."""

    gamma: float = 0.25
    epsilon: float = 1e-6
    name: ClassVar[str] = "gamma"

    def __post_init__(self) -> None:
        _check_number(self, "gamma", self.gamma)
        _check_number(self, "epsilon", self.epsilon)

    def gradient(self, x: torch.Tensor, call: AffineCall, r: torch.Tensor) -> torch.Tensor:
        w, gamma = call.weight, self.gamma
        with torch.no_grad():
            z = call.output(x)
        grads = []
        # Positive outputs favour positive contributions, negative outputs negative ones.
        for favour, other, mask in ((positive, negative, z > 0), (negative, positive, z <= 0)):
            def raised(b: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor] = favour
                       ) -> torch.Tensor:
                return b + gamma * f(b)
            bias = _bias(call, raised)
            c_pos, c_neg = share(call, _signed_terms(x, w + gamma * favour(w),
                                                     w + gamma * other(w)),
                                 bias, torch.where(mask, r, 0.0), self.epsilon)
            grads.append(_by_sign(x, c_pos, c_neg))
        return grads[0] + grads[1]


@dataclass(frozen=True)
class ZPlus(Rule):
    r"""LRP-z⁺ (α1β0): only positive contributions ``x⁺w⁺ + x⁻w⁻`` share the relevance; the
    bias takes none.  Excitation backprop's rule on non-negative inputs."""

    epsilon: float = 1e-6
    name: ClassVar[str] = "zplus"

    def gradient(self, x: torch.Tensor, call: AffineCall, r: torch.Tensor) -> torch.Tensor:
        w = call.weight
        c_pos, c_neg = share(call, _signed_terms(x, positive(w), negative(w)),
                             _bias(call, positive), r, self.epsilon)
        return _by_sign(x, c_pos, c_neg)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    r"""LRP-αβ: ``α`` times the positive contributions' share minus ``β`` times the negative
    ones' (``α − β = 1`` conserves relevance); the bias takes none."""

    alpha: float = 2.0
    beta: float = 1.0
    epsilon: float = 1e-6
    name: ClassVar[str] = "alpha_beta"

    def __post_init__(self) -> None:
        _check_number(self, "alpha", self.alpha)
        _check_number(self, "beta", self.beta)
        if abs(self.alpha - self.beta - 1) > 1e-9:
            raise ValueError(
                f"AlphaBeta(alpha={self.alpha}, beta={self.beta}): alpha - beta must be 1 for "
                "relevance to be conserved, e.g. AlphaBeta(1, 0) or AlphaBeta(2, 1)")

    def gradient(self, x: torch.Tensor, call: AffineCall, r: torch.Tensor) -> torch.Tensor:
        w = call.weight
        wp, wn = positive(w), negative(w)
        pos = share(call, _signed_terms(x, wp, wn), _bias(call, positive), r, self.epsilon)
        neg = share(call, _signed_terms(x, wn, wp), _bias(call, negative), r, self.epsilon)
        return (_by_sign(x, pos[0], pos[1]) * self.alpha
                - _by_sign(x, neg[0], neg[1]) * self.beta)


class _InputFree(Rule):
    """A first-layer rule that shares relevance by the weights alone (not proportional)."""

    proportional: ClassVar[bool] = False

    def weight(self, call: AffineCall) -> torch.Tensor:
        raise NotImplementedError

    def bias(self, call: AffineCall) -> Optional[torch.Tensor]:
        return None

    def relevance(self, x: torch.Tensor, call: AffineCall, r: torch.Tensor) -> torch.Tensor:
        (c,) = share(call, [(torch.ones_like(x), self.weight(call))], self.bias(call), r,
                     STABILIZER)
        return c


@dataclass(frozen=True)
class Flat(_InputFree):
    r"""Flat: every input an output sees gets an equal share, ``R_j = Σ_i R_i / n_i``."""

    name: ClassVar[str] = "flat"

    def weight(self, call: AffineCall) -> torch.Tensor:
        return torch.ones_like(call.weight)

    def relevance(self, x: torch.Tensor, call: AffineCall, r: torch.Tensor) -> torch.Tensor:
        op = linear_map(call, x)
        if op is None or op.kind != "conv" or op.groups != 1:
            return super().relevance(x, call, r)
        return _flat_conv(op, x, call.weight, r)


def _flat_conv(op: LinearMap, x: torch.Tensor, weight: torch.Tensor,
               r: torch.Tensor) -> torch.Tensor:
    """Flat on an ungrouped convolution, on one channel: every output channel sees every input
    channel with weight one, so ``z̃ = op(1, 1)`` is ``C_in`` times the one-channel count of
    the taps that fall inside the input (an integer, exact in floating point: the same
    denominator as the full product), and ``op_1ᵀ(s)`` is the same for every input channel:
    the one-channel transpose of ``Σ_out s`` (the same sum in another order).  Two products
    on one channel instead of two over all of them."""
    one = torch.ones((1, 1) + tuple(weight.shape[2:]), dtype=r.dtype, device=r.device)
    count = op.forward(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=r.dtype,
                                  device=r.device), one)
    s = safe_divide(r, count * weight.shape[1], STABILIZER)
    c = op.transpose(s.sum(1, keepdim=True), one, x[:, :1])
    return c.expand(x.shape)


@dataclass(frozen=True)
class WSquare(_InputFree):
    r"""w²: shares by squared weights, ``R_j = Σ_i w_ij² / Σ_j w_ij² · R_i``."""

    name: ClassVar[str] = "wsquare"

    def weight(self, call: AffineCall) -> torch.Tensor:
        return call.weight * call.weight

    def bias(self, call: AffineCall) -> Optional[torch.Tensor]:
        return _bias(call, lambda b: b * b)


Bound = Union[float, torch.Tensor]


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    r"""z^B for inputs bounded in ``[low, high]`` (the first layer on images):
    ``R_j = Σ_i (x_j w_ij − l_j w⁺_ij − h_j w⁻_ij) / z_i · R_i`` (``z`` with its bias).
    ``low`` and ``high`` are numbers, tensors broadcastable to the input (per channel for
    normalised images, ``(1, C, 1, 1)``), or ``None``: each sample's own minimum / maximum."""

    low: Optional[Bound] = None
    high: Optional[Bound] = None
    epsilon: float = 1e-6
    proportional: ClassVar[bool] = False
    name: ClassVar[str] = "zbox"

    def __post_init__(self) -> None:
        for field_name in ("low", "high"):
            value = getattr(self, field_name)
            if value is not None and not isinstance(value, torch.Tensor):
                _check_real(self, field_name, value)

    def _key(self) -> Tuple[Any, ...]:
        # Tensor bounds compare by identity (their == is element-wise); the rest by value.
        return tuple(id(v) if isinstance(v, torch.Tensor) else v
                     for v in (self.low, self.high, self.epsilon))

    def __eq__(self, other: object) -> bool:
        # Rule's generated __eq__ sees no fields here and would call every ZBox equal.
        return type(other) is type(self) and self._key() == cast(ZBox, other)._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _bound(self, value: Optional[Bound], x: torch.Tensor, what: str) -> torch.Tensor:
        if value is None:
            flat = x.detach().reshape(x.shape[0], -1)
            edge = flat.amin(1) if what == "low" else flat.amax(1)
            return edge.reshape((-1,) + (1,) * (x.dim() - 1)).expand_as(x)
        if not isinstance(value, torch.Tensor):
            return torch.full_like(x, float(value))
        try:
            return value.detach().to(x.device, x.dtype).expand_as(x)
        except RuntimeError:
            raise ValueError(
                f"ZBox: {what} of shape {tuple(value.shape)} does not broadcast to the first "
                f"layer's input of shape {tuple(x.shape)}; give a number or a tensor such as "
                "(1, C, 1, 1) for per-channel bounds") from None

    def _channel_bound(self, value: Optional[Bound], x: torch.Tensor, what: str
                       ) -> Optional[torch.Tensor]:
        """The bound as one value per input channel, or ``None`` where it varies over the
        batch or the positions (or does not broadcast: :meth:`_bound` then says so)."""
        if value is None:
            if x.shape[0] != 1:  # each sample's own extreme
                return None
            edge = x.detach().amin() if what == "low" else x.detach().amax()
            return edge.expand(x.shape[1])
        if not isinstance(value, torch.Tensor):
            return torch.full((x.shape[1],), float(value), dtype=x.dtype, device=x.device)
        if value.dim() > x.dim():
            return None
        shape = (1,) * (x.dim() - value.dim()) + tuple(value.shape)
        if shape[0] != 1 or any(n != 1 for n in shape[2:]) or shape[1] not in (1, x.shape[1]):
            return None
        return value.detach().to(x.device, x.dtype).reshape(-1).expand(x.shape[1])

    def _constant_bounds(self, x: torch.Tensor, call: AffineCall,
                         r: torch.Tensor) -> Optional[torch.Tensor]:
        """z^B on an ungrouped convolution whose bounds are constant per input channel (a
        number, a ``(1, C, 1, 1)`` tensor, or ``None`` on one sample): with
        ``w_lh = l ⊙ w⁺ + h ⊙ w⁻`` (per input channel), ``z̃ = op(x, w) − op(1, Σ_c w_lh)``
        (a one-channel image of ones beside ``x``: one product over ``C + 1`` channels instead
        of ``3C``), and ``R = x ⊙ op_wᵀ(s) − op_{w_lh}ᵀ(s)`` (``s = R / z̃``): the same sums as
        the three terms of :meth:`relevance`, in another order."""
        op = linear_map(call, x)
        if op is None or op.kind != "conv" or op.groups != 1:
            return None
        low = self._channel_bound(self.low, x, "low")
        high = self._channel_bound(self.high, x, "high")
        if low is None or high is None:
            return None
        w = call.weight
        shape = (1, -1) + (1,) * (w.dim() - 2)
        w_lh = torch.addcmul(w.clamp(min=0) * low.reshape(shape), w.clamp(max=0),
                             high.reshape(shape))
        ones = torch.ones((x.shape[0], 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
        s = safe_divide(r, op.forward(torch.cat([x, ones], 1),
                                      torch.cat([w, -w_lh.sum(1, keepdim=True)], 1)),
                        self.epsilon)
        return x * op.transpose(s, w, x) - op.transpose(s, w_lh, x)

    def relevance(self, x: torch.Tensor, call: AffineCall, r: torch.Tensor) -> torch.Tensor:
        fast = self._constant_bounds(x, call, r)
        if fast is not None:
            return fast
        low, high = self._bound(self.low, x, "low"), self._bound(self.high, x, "high")
        w = call.weight
        terms = [(x, w), (low, -positive(w)), (high, -negative(w))]
        c = share(call, terms, None, r, self.epsilon)
        return x * c[0] + low * c[1] + high * c[2]


def _check_real(rule: Any, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"{type(rule).__name__}: {name} must be a number, a tensor or None, "
                        f"got {type(value).__name__} {value!r}")


def _check_number(rule: Any, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{type(rule).__name__}: {name} must be a number, got "
                        f"{type(value).__name__} {value!r}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{type(rule).__name__}: {name} must be a finite number >= 0, got "
                         f"{value!r}")


#: The rules by name (what a composite given as a mapping of names may use).
RULES = {cls.name: cls for cls in (Epsilon, Gamma, ZPlus, AlphaBeta, Flat, WSquare, ZBox)}
