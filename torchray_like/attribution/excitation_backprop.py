r"""Excitation backprop and contrastive excitation backprop.

Zhang, Lin, Brandt, Shen, Sclaroff, "Top-down neural attention by excitation backprop", ECCV 2016
(arXiv 1608.00507).

Excitation backprop propagates a *marginal winning probability* (MWP) from an output unit down
the network, a probabilistic winner-take-all.  For a layer computing ``z_i = Σ_k w_ik x_k (+ b)``
on non-negative inputs ``x``, the probability ``P(a_i)`` of unit ``i`` moves down as

.. math::

    P(a_j) = \sum_i \frac{x_j\, w^+_{ij}}{\sum_k x_k\, w^+_{ik}}\, P(a_i),
    \qquad w^+ = \max(w, 0),

the bias being ignored (only excitatory connections carry the signal).  With ``z⁺ = op(x, w⁺)``
and ``s = P / z⁺``, this is ``P' = x ⊙ op⁺ᵀ(s)``: one forward and one transposed application of
the operation with the positive weights, per layer.  The same rule holds for every non-negative
linear operation, so average pooling, adaptive average pooling and spatial means use it too, and a
sum of activations ``a + b`` (a residual connection) splits the signal in proportion to its
inputs, ``P'_a = a / (a + b) · P``.

Inside :class:`ExcitationBackpropContext`:

* ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d`` and ``F.linear`` (so ``nn.Conv*``,
  ``nn.ConvTranspose*`` and ``nn.Linear``), with positional or keyword arguments, use the rule
  with ``w⁺`` and no bias;
* ``F.avg_pool1d/2d/3d``, ``F.adaptive_avg_pool1d/2d/3d`` and ``x.mean(dims)`` /
  ``torch.mean(x, dims)`` over spatial dimensions (global average pooling) use it with their own
  (positive) weights;
* sums of two activations of the same shape — ``a + b``, ``out += identity``, ``torch.add``,
  ``Tensor.add`` / ``add_`` — split the signal in proportion to each input, so torchvision's
  ResNet blocks work as they are written (no model surgery);
* batch normalisation passes the signal through unchanged (the paper's networks have none; it is
  an affine re-scaling inside a neuron, before its activation);
* ReLU and max pooling keep their gradient (a unit with zero output receives no signal, so the
  ReLU mask drops nothing; max pooling routes the signal to the winner); the bounded rectifier
  ReLU6 (``nn.ReLU6``, ``F.relu6``, ``F.hardtanh(x, 0, b)``) passes the signal wherever its
  output is positive, the saturated side included (the activation is part of the neuron: a
  saturated unit is still excited);
* concatenation, reshapes and dropout in eval mode keep their gradient, which routes the signal.

Choices where the paper is silent (the paper's networks have ReLU inputs everywhere):

* **Signed inputs** (the normalised image, MobileNet's linear bottlenecks, the batch-normalised
  branch of a residual sum) take part through their positive part ``x⁺ = max(x, 0)``: the rule
  becomes ``P'_j = x⁺_j Σ_i w⁺_ij P_i / Σ_k w⁺_ik x⁺_k``, which is the paper's on non-negative
  inputs and keeps the excitation a non-negative distribution everywhere.  A map read at the
  input image therefore shows only the positive (normalised) pixel values' share; the paper reads
  maps at intermediate layers, as you should.
* **Zero denominators**: a unit whose positive input ``z⁺ = Σ_k w⁺_ik x⁺_k`` is below
  ``ε = sqrt(finfo(dtype).tiny)`` (≈ 1.1e-19 in float32, 1.5e-154 in float64) — in particular
  ``z⁺ = 0``, a unit excited only through its bias — passes nothing on: it has no excitatory
  input to give its signal to.  Every other unit passes on all of it (up to rounding).  The
  division is ``P / z⁺`` with ``z⁺ < ε`` replaced by ``+inf``, so no NaN or inf can appear.
* **Conservation**: with these rules, a sample's excitation summed over any layer that cuts the
  network equals the top signal, less what reached units with no excitatory input (above); it
  is never created, so the sum never exceeds the top signal.

Contrastive excitation backprop (paper Sec. 3.3): the *dual* of the target output unit has the
negated classifier weights; its MWP is subtracted from the target's at the contrast layer, the
difference continues down with the excitation rules, and the map keeps its positive part.  The
rules are linear in the top signal, so this equals the difference of the two full excitation
maps: the contrast layer only saves a second backward pass below it.

The saliency map of a layer is the excitation **summed over channels**: the marginal winning
probability of a location (:func:`excitation_to_saliency`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .context import RuleContext
from .driver import SaliencyDebug, detach_all, forward_pass, saliency
from .maps import SizeType, check_smooth, finish_map, saliency_gradient
from .probe import get_module, layer_label
from .rules import RectifierFunction, ReLURule, RuleCell
from .state import check_model
from .targets import TargetType, get_backward_gradient

__all__ = [
    "ExcitationBackpropContext",
    "excitation_backprop",
    "contrastive_excitation_backprop",
    "excitation_to_saliency",
    "excitation_eps",
]


def excitation_eps(dtype: torch.dtype) -> float:
    """The ε guarding excitation-backprop divisions for ``dtype``: ``sqrt(finfo(dtype).tiny)``.

    A unit whose positive input is below ε passes no signal on; ε is far below any real
    excitatory input, and ``signal / ε`` stays finite for signals up to about ``1 / ε``.
    """
    return float(torch.finfo(dtype).tiny) ** 0.5


def _denominator(z: torch.Tensor) -> torch.Tensor:
    """``z`` where ``z >= ε``, ``+inf`` elsewhere: ``P / denominator`` is 0 for such units."""
    return torch.where(z < excitation_eps(z.dtype), float("inf"), z)


# ---------------------------------------------------------------------------------------------
# Nodes: what one replaced call remembers for its backward
# ---------------------------------------------------------------------------------------------


class _Cell:
    """State shared by every node one context creates.

    ``negate`` is the index of the node whose weights are negated in the current backward pass
    (the dual unit of contrastive excitation backprop), read at backward time: one forward pass
    then serves both the target's and the dual's backward pass.  ``negated_used`` records that
    the negated node was reached.  ``cache`` keeps ``w⁺`` per weight tensor for the lifetime of
    the graph, so a second backward pass (or a weight shared by several calls) does not recompute
    it.  While ``keep`` is true, each node also keeps its ``op(x⁺, w⁺)`` and the graph of its
    transpose in ``replays`` so that the next backward pass through it only applies the
    transpose (the target's and the dual's passes share everything but the dual node).
    """

    __slots__ = ("negate", "negated_used", "cache", "keep", "replays")

    def __init__(self) -> None:
        self.negate: Optional[int] = None
        self.negated_used = False
        self.cache: Dict[Tuple[int, bool], Tuple[torch.Tensor, int, torch.Tensor]] = {}
        self.keep = False
        self.replays: Dict[Tuple[int, bool], Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]] = {}

    def positive_weight(self, weight: torch.Tensor, negate: bool) -> torch.Tensor:
        key = (id(weight), negate)
        hit = self.cache.get(key)
        if hit is not None and hit[0] is weight and hit[1] == weight._version:
            return hit[2]
        w = weight.detach()
        # (-w)⁺ = -(min(w, 0)): the positive part of the negated weights without negating twice.
        positive = w.clamp(max=0).neg_() if negate else w.clamp(min=0)
        self.cache[key] = (weight, weight._version, positive)
        return positive

    def clear(self) -> None:
        """Free the cached weights and replays (the nodes stay usable)."""
        self.cache.clear()
        self.replays.clear()


class _Call:
    """A replaced call with its input (and weight / bias) slots, replayable on new tensors."""

    __slots__ = ("func", "args", "kwargs", "x_slot", "w_slot", "b_slot", "weight",
                 "weight_version", "index", "cell")

    def __init__(self, func, args, kwargs, x_slot, w_slot=None, b_slot=None, weight=None,
                 index=-1, cell=None) -> None:
        self.func = func
        self.args = list(args)
        self.kwargs = dict(kwargs)
        self.x_slot, self.w_slot, self.b_slot = x_slot, w_slot, b_slot
        self.weight = weight
        self.weight_version = None if weight is None else weight._version
        self.index = index
        self.cell = cell
        # The node keeps no reference to the input tensor: autograd saves it (with its version).
        _put(self.args, self.kwargs, x_slot, None)

    def __call__(self, x, weight=None, drop_bias=False):
        args, kwargs = list(self.args), dict(self.kwargs)
        _put(args, kwargs, self.x_slot, x)
        if weight is not None:
            _put(args, kwargs, self.w_slot, weight)
        if drop_bias and self.b_slot is not None:
            _put(args, kwargs, self.b_slot, None)
        return self.func(*args, **kwargs)


def _slot(args: tuple, kwargs: dict, pos: int, names: Tuple[str, ...]) -> Union[int, str, None]:
    """Where argument ``pos`` (keyword ``names``) of a call is: an index, a keyword, or None."""
    if len(args) > pos:
        return pos
    for name in names:
        if name in kwargs:
            return name
    return None


def _get(args, kwargs, slot):
    if slot is None:
        return None
    return args[slot] if isinstance(slot, int) else kwargs[slot]


def _put(args: list, kwargs: dict, slot, value) -> None:
    if isinstance(slot, int):
        args[slot] = value
    elif slot is not None:
        kwargs[slot] = value


class _Excite(torch.autograd.Function):
    """A non-negative linear operation (conv / linear with ``w⁺``, pooling, mean) whose backward
    is the excitation rule ``P' = x⁺ ⊙ op⁺ᵀ(P / op⁺(x⁺))`` (no signal through units with
    ``op⁺(x⁺) < ε``); forward is the plain call."""

    @staticmethod
    def forward(ctx, x, call):  # type: ignore[override]
        with torch._C.DisableTorchFunction():
            out = call(x)
        ctx.save_for_backward(x)
        ctx.call = call
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, p):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        call: _Call = ctx.call
        cell: _Cell = call.cell
        if call.weight is not None and call.weight._version != call.weight_version:
            # What autograd says when a saved tensor changed: the rule would silently use
            # weights the forward pass did not.
            raise RuntimeError(
                "excitation backprop: the weight of a layer was modified in place between the "
                "forward pass and backward; run the forward pass again")
        with torch._C.DisableTorchFunction():
            negate = False
            if call.weight is not None and cell.negate == call.index:
                negate = cell.negated_used = True
            key = (call.index, negate)
            replay = cell.replays.pop(key, None) if cell.replays else None
            keep = cell.keep
            if call.func is F.linear and call.weight.dtype == x.dtype:
                denominator = None if replay is None else replay[0]
                g, denominator = _linear_rule(x, call.weight, p, negate, denominator)
                if keep:
                    cell.replays[key] = (denominator,)
                return g, None
            if replay is None:
                xp = x.clamp(min=0)
                weight = (None if call.weight is None
                          else cell.positive_weight(call.weight, negate))
                with torch.enable_grad():
                    leaf = xp.detach().requires_grad_(True)
                    z = call(leaf, weight, drop_bias=True)
                denominator = _denominator(z.detach())
            else:
                z, leaf, xp, denominator = replay
            if keep:
                cell.replays[key] = (z, leaf, xp, denominator)
            s = torch.div(p, denominator)
            (g,) = torch.autograd.grad(z, leaf, s, retain_graph=keep)
            return g.mul_(xp), None


#: Bytes of ``w⁺`` materialised at once by the linear rule on the CPU (a block that stays
#: cheap to rewrite; larger blocks on accelerators, where each block costs kernel launches).
_LINEAR_CHUNK_BYTES = 1 << 25
_LINEAR_CHUNK_BYTES_ACCELERATOR = 1 << 28


def _linear_rule(x: torch.Tensor, weight: torch.Tensor, p: torch.Tensor, negate: bool,
                 denominator: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The excitation rule of ``F.linear`` without materialising ``w⁺`` whole.

    ``w⁺`` is built block of rows by block of rows into one small buffer that serves both
    products of the block (``z = x⁺ w⁺ᵀ`` and ``s w⁺``): the weight is read once, like the plain
    gradient reads it, instead of being clamped into a fresh copy as large as the layer (for
    VGG's first classifier layer, 400 MB written and read twice per call).  Returns the signal
    for ``x`` and the denominators (to reuse in a second backward pass).
    """
    in_features = weight.shape[-1]
    out_features = weight.shape[0]
    xp = x.clamp(min=0).reshape(-1, in_features)
    p2 = p.reshape(-1, out_features)
    w = weight.detach()
    budget = _LINEAR_CHUNK_BYTES if w.device.type == "cpu" else _LINEAR_CHUNK_BYTES_ACCELERATOR
    rows = max(1, min(out_features, budget // max(1, in_features * w.element_size())))
    buffer = torch.empty((rows, in_features), dtype=w.dtype, device=w.device)
    grad = torch.zeros_like(xp)
    fresh = denominator is None
    if fresh:
        denominator = torch.empty((xp.shape[0], out_features), dtype=xp.dtype, device=xp.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        block = buffer[:stop - start]
        if negate:
            torch.clamp(w[start:stop], max=0, out=block).neg_()
        else:
            torch.clamp(w[start:stop], min=0, out=block)
        if fresh:
            denominator[:, start:stop] = _denominator(xp @ block.t())
        grad.addmm_(p2[:, start:stop] / denominator[:, start:stop], block)
    return grad.mul_(xp).reshape(x.shape), denominator


class _ExciteSum(torch.autograd.Function):
    """``a + b`` (or ``a += b``) whose backward splits the signal ``P'_a = a⁺ / (a⁺ + b⁺) · P``."""

    @staticmethod
    def forward(ctx, a, b, inplace):  # type: ignore[override]
        with torch._C.DisableTorchFunction():
            if inplace:
                # ``a`` is about to be overwritten (and later, often, rectified in place): keep
                # its values.  Only calls that autograd follows get here.
                saved_a = a.clone()
                saved_b = b.clone() if _shares_memory(a, b) else b
                out = a.add_(b)
                ctx.mark_dirty(a)
            else:
                saved_a, saved_b = a, b
                out = torch.add(a, b)
        ctx.save_for_backward(saved_a, saved_b)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, p):  # type: ignore[override]
        a, b = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            ap = a.clamp(min=0)
            bp = b.clamp(min=0)
            s = torch.div(p, _denominator(torch.add(ap, bp)))
            grad_a = ap.mul_(s) if ctx.needs_input_grad[0] else None
            grad_b = bp.mul_(s) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


class _PassThrough(torch.autograd.Function):
    """An operation (batch normalisation) whose forward is the plain call and whose backward
    passes the signal through unchanged."""

    @staticmethod
    def forward(ctx, x, call):  # type: ignore[override]
        with torch._C.DisableTorchFunction():
            return call(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, p):  # type: ignore[override]
        return p, None


class _PositiveOutputRule(ReLURule):
    """Bounded rectifiers under excitation backprop: the signal passes wherever the output is
    positive, the saturated side included (the unit is excited, it just does not grow)."""

    name = "excitation"

    def backward(self, grad: torch.Tensor, output: torch.Tensor,
                 upper: Optional[float]) -> torch.Tensor:
        return torch.ops.aten.threshold_backward(grad, output, 0)


_POSITIVE_OUTPUT_RULE = _PositiveOutputRule()


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------
# The context
# ---------------------------------------------------------------------------------------------

_CONV = (torch.conv1d, torch.conv2d, torch.conv3d)
_CONV_TRANSPOSE = (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d)
_AVG_POOL = (torch.avg_pool1d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d)
_ADAPTIVE_AVG_POOL = (torch.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                      torch._C._nn.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool3d)
_MEAN = (torch.mean, torch.Tensor.mean)
_BATCH_NORM = (F.batch_norm, torch.batch_norm)
_ADD = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
_ADD_INPLACE = (torch.Tensor.add_, torch.Tensor.__iadd__)


def _differentiated(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and torch.is_grad_enabled() and x.requires_grad


class ExcitationBackpropContext(RuleContext):
    """Inside this context, backpropagation computes excitation (marginal winning probability).

    Zhang et al. 2016 (arXiv 1608.00507).  Every convolution, transposed convolution, linear
    layer, average pooling, spatial mean and sum of activations the model calls — as a module,
    a functional call with positional or keyword arguments, or a tensor method — gets the
    excitation rule in backward; batch normalisation passes the signal through; ReLU6 passes it
    where its output is positive; everything else keeps its gradient (see the module
    docstring for the rules and the ε guarding divisions).  Forward values are exactly
    PyTorch's, in-place additions stay in place.  Thread-local, nestable, removed on exit also
    when the block raises (see :class:`~torchray_like.attribution.common.RuleContext`).

    The gradient of an input (or of a probed layer) computed from a forward pass run inside the
    context is its excitation: on a network with non-negative activations it is a distribution
    that sums to the top signal.  Parameters get no gradient from nodes the context replaced;
    changing a weight in place between the forward pass and backward is a ``RuntimeError``.

    Cost: nothing in the forward pass beyond routing the calls; in backward, each convolution
    above the layer read computes ``op(x⁺, w⁺)`` besides the transposed operation the plain
    gradient needs (so about one extra forward pass of those layers), and linear layers build
    ``w⁺`` block by block instead of copying their weights.  An in-place residual sum
    (``out += identity``) that autograd follows copies ``out`` first, since backward needs its
    value and ``out`` is usually rectified in place next.  Calls that autograd does not follow
    (below the layer read) run the plain operation.

    Attributes
    ----------
    counts : dict
        Replaced calls by kind: ``conv``, ``conv_transpose``, ``linear``, ``avg_pool``,
        ``adaptive_avg_pool``, ``mean``, ``sum``, ``batch_norm``, ``relu6``.

    Examples
    --------
    >>> x.requires_grad_(True)                             # doctest: +SKIP
    >>> with ExcitationBackpropContext():
    ...     y = model(x)
    ...     y[0, category_id].backward()
    >>> excitation = x.grad           # sums to 1 over a non-negative input
    """

    replaces = "convolution, linear, average-pooling or residual-sum call"
    requirement = "a model made of convolutions / linear layers"
    report_other_activations = True

    def __init__(self) -> None:
        super().__init__()
        self._cell = _Cell()
        self._relu_cell = RuleCell(_POSITIVE_OUTPUT_RULE)
        self._next_index = 0
        #: Forward-order indices of the convolution / linear calls of the last forward pass.
        self.affine_calls: List[int] = []
        h = self.handlers
        for f in _CONV:
            h[f] = self._conv
        for f in _CONV_TRANSPOSE:
            h[f] = self._conv_transpose
        h[F.linear] = self._linear
        for f in _AVG_POOL:
            h[f] = self._avg_pool
        for f in _ADAPTIVE_AVG_POOL:
            h[f] = self._adaptive_avg_pool
        for f in _MEAN:
            h[f] = self._mean
        for f in _BATCH_NORM:
            h[f] = self._batch_norm
        for f in _ADD:
            h[f] = self._add
        for f in _ADD_INPLACE:
            h[f] = self._add_inplace
        h[F.relu6] = self._relu6
        h[F.hardtanh] = self._hardtanh
        h[F.hardtanh_] = self._hardtanh_inplace

    def __enter__(self):
        out = super().__enter__()
        self.affine_calls = []
        return out

    # -- handlers ------------------------------------------------------------------------------
    def _weighted(self, func, args, kwargs, kind: str):
        self.count(kind)
        index = self._next_index
        self._next_index += 1
        self.affine_calls.append(index)
        x_slot = _slot(args, kwargs, 0, ("input",))
        x = _get(args, kwargs, x_slot)
        if not _differentiated(x):
            return func(*args, **kwargs)
        w_slot = _slot(args, kwargs, 1, ("weight",))
        weight = _get(args, kwargs, w_slot)
        call = _Call(func, args, kwargs, x_slot, w_slot, _slot(args, kwargs, 2, ("bias",)),
                     weight, index, self._cell)
        return _Excite.apply(x, call)

    def _conv(self, func, args, kwargs):
        return self._weighted(func, args, kwargs, "conv")

    def _conv_transpose(self, func, args, kwargs):
        return self._weighted(func, args, kwargs, "conv_transpose")

    def _linear(self, func, args, kwargs):
        return self._weighted(func, args, kwargs, "linear")

    def _unweighted(self, func, args, kwargs, kind: str, names=("input",)):
        self.count(kind)
        x_slot = _slot(args, kwargs, 0, names)
        x = _get(args, kwargs, x_slot)
        if not _differentiated(x):
            return func(*args, **kwargs)
        index = self._next_index
        self._next_index += 1
        return _Excite.apply(x, _Call(func, args, kwargs, x_slot, index=index, cell=self._cell))

    def _avg_pool(self, func, args, kwargs):
        return self._unweighted(func, args, kwargs, "avg_pool")

    def _adaptive_avg_pool(self, func, args, kwargs):
        return self._unweighted(func, args, kwargs, "adaptive_avg_pool")

    def _mean(self, func, args, kwargs):
        x = _get(args, kwargs, _slot(args, kwargs, 0, ("input", "self")))
        dim = _get(args, kwargs, _slot(args, kwargs, 1, ("dim",)))
        # Only a mean over spatial dimensions is a pooling (global average pooling); other
        # means (over channels, the batch, everything) keep their gradient.
        if (not isinstance(x, torch.Tensor) or x.dim() < 3 or dim is None
                or kwargs.get("dtype") is not None or "out" in kwargs):
            return func(*args, **kwargs)
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if not dims or any(not isinstance(d, int) or d % x.dim() < 2 for d in dims):
            return func(*args, **kwargs)
        return self._unweighted(func, args, kwargs, "mean", ("input", "self"))

    def _batch_norm(self, func, args, kwargs):
        self.count("batch_norm")
        x_slot = _slot(args, kwargs, 0, ("input",))
        x = _get(args, kwargs, x_slot)
        if not _differentiated(x):
            return func(*args, **kwargs)
        return _PassThrough.apply(x, _Call(func, args, kwargs, x_slot))

    @staticmethod
    def _sum_operands(args, kwargs):
        """The two activations of a residual sum, or None for any other addition."""
        a = _get(args, kwargs, _slot(args, kwargs, 0, ("input", "self")))
        b = _get(args, kwargs, _slot(args, kwargs, 1, ("other",)))
        if len(args) > 2 or "out" in kwargs or kwargs.get("alpha", 1) != 1:
            return None
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return None
        # A parameter (or a tensor of another shape, broadcast) is a bias, not an activation:
        # like a layer's bias it takes no share of the signal.
        if (isinstance(a, nn.Parameter) or isinstance(b, nn.Parameter) or a.shape != b.shape
                or a.dtype != b.dtype or a.device != b.device or not a.is_floating_point()
                or a.dim() == 0):
            return None
        return a, b

    def _add(self, func, args, kwargs, inplace: bool = False):
        operands = self._sum_operands(args, kwargs)
        if operands is None:
            return func(*args, **kwargs)
        self.count("sum")
        a, b = operands
        if not (_differentiated(a) or _differentiated(b)):
            return func(*args, **kwargs)
        return _ExciteSum.apply(a, b, inplace)

    def _add_inplace(self, func, args, kwargs):
        return self._add(func, args, kwargs, inplace=True)

    def _rectify(self, func, args, kwargs, upper: float, inplace: bool):
        x = _get(args, kwargs, _slot(args, kwargs, 0, ("input",)))
        self.count("relu6" if upper == 6.0 else "hardtanh")
        if not _differentiated(x):
            return func(*args, **kwargs)
        return RectifierFunction.apply(x, self._relu_cell, upper, inplace)

    def _relu6(self, func, args, kwargs):
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return self._rectify(func, args, kwargs, 6.0, bool(inplace))

    def _hardtanh_bounds(self, args, kwargs):
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return float(lo), float(hi)

    def _hardtanh(self, func, args, kwargs):
        lo, hi = self._hardtanh_bounds(args, kwargs)
        if lo != 0.0 or hi <= 0.0:
            return func(*args, **kwargs)  # not a rectifier: keeps its gradient
        inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
        return self._rectify(func, args, kwargs, hi, bool(inplace))

    def _hardtanh_inplace(self, func, args, kwargs):
        lo, hi = self._hardtanh_bounds(args, kwargs)
        if lo != 0.0 or hi <= 0.0:
            return func(*args, **kwargs)
        return self._rectify(func, args, kwargs, hi, True)


# ---------------------------------------------------------------------------------------------
# Maps and drivers
# ---------------------------------------------------------------------------------------------


def excitation_to_saliency(x: torch.Tensor) -> torch.Tensor:
    """Channel-flattened excitation map: the **sum** over channels of ``x.grad``.

    The excitation of a unit is the probability that it is a winner; the probability that a
    location wins is the sum over its channels (Zhang et al. 2016).  ``x`` is
    ``(N, C, *spatial)`` with a ``.grad``; the map is ``(N, 1, *spatial)``.
    """
    grad = saliency_gradient(x, "excitation_to_saliency")
    return grad.sum(dim=1, keepdim=True)


def excitation_backprop(model: nn.Module, input: torch.Tensor, target: TargetType,
                        saliency_layer: Union[str, nn.Module, None] = None,
                        resize: SizeType = False, resize_mode: str = "bilinear",
                        smooth: float = 0,
                        gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] =
                        excitation_to_saliency,
                        get_backward_gradient: Callable = get_backward_gradient,
                        debug: bool = False
                        ) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """Excitation-backprop saliency map (Zhang et al. 2016, arXiv 1608.00507).

    The excitation (marginal winning probability) of ``target`` at the output of
    ``saliency_layer``, summed over channels.

    Parameters
    ----------
    model : torch.nn.Module
        The network (any mix of convolutions, linear layers, pooling, residual sums,
        concatenations, batch norm and ReLU; no changes needed).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The output unit(s) to explain; see
        :func:`~torchray_like.attribution.common.get_backward_gradient`.  The top signal is the
        seed (one at the target class), so each sample's map sums to one on networks with
        non-negative activations.
    saliency_layer : str or torch.nn.Module, optional
        Layer whose output excitation is read; ``None`` / ``""`` means the input.  The paper
        reads intermediate layers (e.g. a VGG pooling layer, a ResNet stage): at the image only
        positive normalised pixel values take part (see the module notes).
    resize, resize_mode, smooth, get_backward_gradient, debug
        As in :func:`~torchray_like.attribution.common.saliency`.
    gradient_to_saliency : callable
        Flattening of the excitation; the default sums over channels.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *spatial)`` non-negative maps.

    Raises
    ------
    ValueError
        For a model in which the context replaced nothing (no convolution, linear layer,
        average pooling or residual sum), an unknown layer, a wrong target.
    """
    return saliency(model, input, target, saliency_layer=saliency_layer, resize=resize,
                    resize_mode=resize_mode, smooth=smooth,
                    context_builder=ExcitationBackpropContext,
                    gradient_to_saliency=gradient_to_saliency,
                    get_backward_gradient=get_backward_gradient, debug=debug)


class _CallRange:
    """Forward hooks recording which affine calls of ``context`` a module made (this thread)."""

    def __init__(self, module: nn.Module, context: ExcitationBackpropContext) -> None:
        self.context = context
        self.thread = threading.get_ident()
        self.start: Optional[int] = None
        self.indices: List[int] = []
        self.handles = [module.register_forward_pre_hook(self._pre),
                        module.register_forward_hook(self._post)]

    def _pre(self, module, inputs):
        if threading.get_ident() == self.thread:
            self.start = len(self.context.affine_calls)

    def _post(self, module, inputs, output):
        if threading.get_ident() == self.thread and self.start is not None:
            self.indices.extend(self.context.affine_calls[self.start:])
            self.start = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def contrastive_excitation_backprop(
        model: nn.Module, input: torch.Tensor, target: TargetType,
        saliency_layer: Union[str, nn.Module, None] = None,
        contrast_layer: Union[str, nn.Module, None] = None,
        classifier_layer: Union[str, nn.Module, None] = None,
        resize: SizeType = False, resize_mode: str = "bilinear", smooth: float = 0,
        get_backward_gradient: Callable = get_backward_gradient,
        debug: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """Contrastive excitation-backprop saliency map (Zhang et al. 2016, Sec. 3.3).

    One forward pass inside :class:`ExcitationBackpropContext`; two backward passes from the
    output to ``contrast_layer``, for the target unit and for its *dual* (the classifier's
    weights negated, read at backward time — the model's weights are never modified); their
    difference continues down to ``saliency_layer`` with the excitation rules, is summed over
    channels and clamped at zero.

    Because the rules are linear in the top signal, the result equals the positive part of
    (target excitation − dual excitation) at ``saliency_layer``, whatever the contrast layer; the
    contrast layer only bounds the part of the network traversed twice.  It must cut the
    network between the two layers (every path from ``saliency_layer`` to the output passes
    through it, e.g. a whole ResNet stage), otherwise signal on the paths around it is lost.

    Parameters
    ----------
    model, input, target
        As in :func:`excitation_backprop`.
    saliency_layer : str or torch.nn.Module, optional
        Layer whose output is read (``None`` / ``""``: the input).
    contrast_layer : str or torch.nn.Module
        Layer between ``saliency_layer`` and the classifier where the dual's excitation is
        subtracted (required; e.g. ``"layer4"`` for a ResNet, ``"features.30"`` for VGG16).
    classifier_layer : str or torch.nn.Module, optional
        Module holding the classifier whose weights the dual negates: its last convolution or
        linear call.  ``None``: the last convolution / linear call of the forward pass (the
        layer producing the logits in torchvision classifiers).
    resize, resize_mode, smooth, get_backward_gradient, debug
        As in :func:`~torchray_like.attribution.common.saliency`; ``debug`` returns the
        contrastive excitation (before the channel sum) as the gradient.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *spatial)`` non-negative maps.
    """
    if contrast_layer is None or contrast_layer == "":
        raise ValueError(
            "contrastive_excitation_backprop: contrast_layer is required — a layer between "
            "saliency_layer and the classifier, e.g. 'layer4' for a ResNet or 'features.30' for "
            "VGG16")
    smooth = check_smooth(smooth)
    check_model(model)
    sal = None if saliency_layer is None or saliency_layer == "" else get_module(
        model, saliency_layer)
    if sal is not None and sal is get_module(model, contrast_layer):
        raise ValueError(
            f"contrast_layer {layer_label(contrast_layer)} is the saliency_layer: it must be "
            "above it (closer to the output)")
    cls = None if classifier_layer is None or classifier_layer == "" else get_module(
        model, classifier_layer)
    context = ExcitationBackpropContext()
    call_range = _CallRange(cls, context) if cls is not None else None
    cell = context._cell
    try:
        with forward_pass(model, input, target, {"saliency_layer": saliency_layer,
                                                 "contrast_layer": contrast_layer},
                          context, get_backward_gradient) as fp:
            sal_read, con_read = fp.reads["saliency_layer"], fp.reads["contrast_layer"]
            if call_range is not None:
                if not call_range.indices:
                    raise ValueError(
                        f"classifier_layer {layer_label(classifier_layer)} made no convolution "
                        "or linear call in the forward pass; name the module holding the "
                        "classifier weights")
                classifier = call_range.indices[-1]
            else:
                classifier = context.affine_calls[-1] if context.affine_calls else None
                if classifier is None:
                    raise ValueError(
                        f"{type(model).__name__} makes no convolution or linear call: there is "
                        "no classifier whose weights the dual unit could negate")
            # The target's pass keeps each node's op(x⁺, w⁺) for the dual's pass.
            cell.negate, cell.keep = None, True
            try:
                top = fp.grad("contrast_layer", retain_graph=True)
            finally:
                cell.keep = False
            cell.negate, cell.negated_used = classifier, False
            try:
                (dual,) = torch.autograd.grad(fp.scores, con_read, fp.seed)
            finally:
                cell.negate = None
                cell.clear()
            if not cell.negated_used:
                raise ValueError(
                    "the classifier (" + (f"classifier_layer {layer_label(classifier_layer)}"
                                          if cls is not None else
                                          "the last convolution / linear call") +
                    f") is not between contrast_layer {layer_label(contrast_layer)} and the "
                    "output, so the dual unit would equal the target; pass the module producing "
                    "the scores as classifier_layer, or a lower contrast_layer")
            top = top - dual  # (not in place: a pass-through graph may hand back the seed)
            del dual
            if con_read.grad_fn is None:
                grad = None
            else:
                (grad,) = torch.autograd.grad(con_read, sal_read, top, allow_unused=True)
            if grad is None:
                where = "the input" if sal is None else (
                    f"saliency_layer {layer_label(saliency_layer)}")
                raise ValueError(
                    f"contrast_layer {layer_label(contrast_layer)} does not depend on {where}: "
                    "the contrast layer must be above the saliency layer (closer to the output)")
            smap = grad.sum(dim=1, keepdim=True).clamp_(min=0)
    finally:
        cell.clear()
        if call_range is not None:
            call_range.remove()
    smap = finish_map(input, smap, resize, resize_mode, smooth)
    if debug:
        return smap, SaliencyDebug(detach_all(fp.output), sal_read.detach(), grad.detach(),
                                   dict(context.counts))
    return smap
