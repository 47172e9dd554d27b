r"""Excitation backprop's node rules: what each call replaced by the context does in backward.

:class:`~torchray_like.attribution.excitation_backprop.ExcitationBackpropContext` owns an
:class:`~.excitation_handlers.ExcitationHandlers`, whose table maps each torch function the
context intercepts to a handler.  A handler computes exactly the plain forward value and returns
a tensor whose backward node applies one of the excitation rules of this module:

* :class:`ExciteFunction` — a non-negative linear operation (convolution / linear layer with
  ``w⁺``, average pooling, interpolation, sums and means over dimensions):
  ``P' = r(x) ⊙ op⁺ᵀ(P / op⁺(r(x)))``;
* :class:`ExciteSumFunction` — a weighted sum ``a + α b`` (``α > 0``): each operand takes its
  share ``r(a) / (r(a) + α r(b))`` of the signal;
* :class:`ExciteScaleFunction` — multiplication / division by a positive constant: the signal
  passes unchanged where the output is excited;
* :class:`PassThroughFunction` — batch normalisation: the signal passes unchanged;
* rectifiers reuse :class:`~torchray_like.attribution.rules.RectifierFunction` with
  :data:`POSITIVE_OUTPUT_RULE`.

``r`` is the context's *input rule*: ``r(x) = x`` (signed, the authors' reference code, the
default) or ``r(x) = max(x, 0)`` (positive parts).  Every rule is computed in float32 at least
(float16 / bfloat16 data are promoted for the normalisation and cast back), and a unit whose
denominator is below :func:`excitation_eps` in magnitude passes nothing on.

Operations the rules do not model (a subtraction of activations, a negation, ``abs``, group /
layer / instance normalisation, products of two activations, matrix products ...) keep their
plain gradient and are recorded in
:attr:`~.excitation_handlers.ExcitationHandlers.unmodeled`, which the context turns into a
warning.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .autograd_guards import first_order
from .call_args import Call
from .lrp_rules import AffineCall, LinearMap, ModifiedWeightError, linear_map
from .rules import ReLURule

__all__ = [
    "excitation_eps", "compute_dtype", "ExcitationCell", "sum_rule", "linear_rule",
    "ExciteFunction", "ExciteSumFunction", "ExciteScaleFunction", "PassThroughFunction",
    "POSITIVE_OUTPUT_RULE", "LINEAR_CHUNK_BYTES", "LINEAR_CHUNK_BYTES_ACCELERATOR",
]


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rules compute in for data of ``dtype``: float32 for 16-bit floats."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def excitation_eps(dtype: torch.dtype) -> float:
    """The ε guarding excitation-backprop divisions for data of ``dtype``.

    ``sqrt(finfo(d).tiny)`` of the dtype ``d`` the rules compute in (float32 for float16 and
    bfloat16 data, whose own ε — 7.8e-3 for float16 — would swallow real units): ≈ 1.1e-19 for
    float32, 1.5e-154 for float64.  A unit whose denominator is below ε in magnitude passes no
    signal on; ``signal / ε`` stays finite for signals up to about ``1 / ε``.
    """
    return float(torch.finfo(compute_dtype(dtype)).tiny) ** 0.5


def _nonzero_threshold(dtype: torch.dtype) -> float:
    """ε, or the smallest positive value of ``dtype`` where ε underflows in it (float16)."""
    info = torch.finfo(dtype)
    return max(excitation_eps(dtype), float(info.tiny) * float(info.eps))


# ---------------------------------------------------------------------------------------------
# State shared by the nodes of one context
# ---------------------------------------------------------------------------------------------


class ExcitationCell:
    """State shared by every node one context creates, read at backward time.

    ``signed`` selects the input rule (``r(x) = x`` or ``max(x, 0)``); ``debug`` prints one line
    per node in backward.  ``negate`` is the index of the node whose weights are negated in the
    current backward pass (the dual unit of contrastive excitation backprop): one forward pass
    then serves both the target's and the dual's backward pass; ``negated_used`` records that
    the negated node was reached; ``applied`` counts the backward passes through the nodes.
    ``cache`` keeps ``w⁺`` per weight tensor for the lifetime of the graph.  While ``keep`` is
    true, each node also keeps its ``op⁺(r(x))`` and the graph of its transpose in ``replays``
    so that the next backward pass through it only applies the transpose (the target's and the
    dual's passes share everything but the dual node).
    """

    __slots__ = ("signed", "debug", "negate", "negated_used", "cache", "keep", "replays",
                 "applied")

    def __init__(self, signed: bool = True, debug: bool = False) -> None:
        self.signed = signed
        self.debug = debug
        #: Backward passes through the nodes of this cell (one per node and pass).
        self.applied = 0
        self.negate: Optional[int] = None
        self.negated_used = False
        self.cache: Dict[Tuple[int, bool, torch.dtype], Tuple[torch.Tensor, int,
                                                              torch.Tensor]] = {}
        self.keep = False
        self.replays: Dict[Tuple[int, bool], Tuple[Any, ...]] = {}

    # -- the rule's pieces --------------------------------------------------------------------
    def rule_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``r(x)`` in ``dtype``: ``x`` itself (signed) or its positive part (a new tensor)."""
        if self.signed:
            return x if x.dtype == dtype else x.to(dtype)
        return x.clamp(min=0) if x.dtype == dtype else x.to(dtype).clamp_(min=0)

    def denominator(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` where it is an excitatory input (``|z| >= ε`` signed, ``z >= ε`` positive),
        ``+inf`` elsewhere: ``P / denominator`` is 0 for the other units."""
        eps = excitation_eps(z.dtype)
        small = z.abs() < eps if self.signed else z < eps
        return torch.where(small, float("inf"), z)

    def excited(self, out: torch.Tensor) -> torch.Tensor:
        """Where a positive scaling ``out = c · x`` passes the signal (``out`` is its own
        denominator)."""
        threshold = _nonzero_threshold(out.dtype)
        return out.abs() >= threshold if self.signed else out >= threshold

    def positive_weight(self, weight: torch.Tensor, negate: bool,
                        dtype: torch.dtype) -> torch.Tensor:
        """``w⁺`` (or ``(-w)⁺`` for the dual) in ``dtype``, cached per weight tensor."""
        key = (id(weight), negate, dtype)
        hit = self.cache.get(key)
        if hit is not None and hit[0] is weight and hit[1] == weight._version:
            return hit[2]
        w = weight.detach().to(dtype)
        # (-w)⁺ = -(min(w, 0)): the positive part of the negated weights without negating twice.
        positive = w.clamp(max=0).neg_() if negate else w.clamp(min=0)
        self.cache[key] = (weight, weight._version, positive)
        return positive

    # -- contrastive passes -------------------------------------------------------------------
    def share_next_pass(self) -> None:
        """The next backward pass keeps each node's ``op⁺(r(x))`` for the one after it."""
        self.negate, self.keep = None, True

    def negate_in_next_pass(self, index: int) -> None:
        """The next backward pass negates the weights of node ``index`` (the dual unit)."""
        self.keep = False
        self.negate, self.negated_used = index, False

    def clear(self) -> None:
        """End shared passes and free the cached weights and replays (nodes stay usable)."""
        self.negate, self.keep = None, False
        self.cache.clear()
        self.replays.clear()

    def report(self, what: str, p: torch.Tensor, grads: Sequence[Optional[torch.Tensor]]
               ) -> None:
        """The ``debug`` line of a node: the signal it received and what it passed on."""
        out = sum(float(g.double().sum()) for g in grads if g is not None)
        print(f"excitation backprop: {what}: received {float(p.double().sum()):.6g}, "
              f"passed on {out:.6g}")


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------


class ExciteFunction(torch.autograd.Function):
    """A non-negative linear operation (conv / linear with ``w⁺``, pooling, interpolation, sum
    or mean over dimensions) whose backward is the excitation rule
    ``P' = r(x) ⊙ op⁺ᵀ(P / op⁺(r(x)))`` (nothing through units whose denominator is below ε);
    forward is the plain call."""

    @staticmethod
    def forward(ctx, x, call):
        with torch._C.DisableTorchFunction():
            out = call(x)
        ctx.save_for_backward(x)
        ctx.call = call
        return out

    @staticmethod
    @first_order("excitation backprop")
    def backward(ctx, p):
        (x,) = ctx.saved_tensors
        call: Call = ctx.call
        cell: ExcitationCell = call.cell
        if call.weight is not None and call.weight._version != call.weight_version:
            # What autograd says when a saved tensor changed: the rule would silently use
            # weights the forward pass did not.
            raise ModifiedWeightError(
                "excitation backprop: the weight of a layer was modified in place between the "
                "forward pass and backward; run the forward pass again")
        cell.applied += 1
        with torch._C.DisableTorchFunction():
            negate = False
            if call.weight is not None and cell.negate == call.index:
                negate = cell.negated_used = True
            key = (call.index, negate)
            replay = cell.replays.pop(key, None) if cell.replays else None
            keep = cell.keep
            if call.func is F.linear and call.weight.dtype == x.dtype:
                denominator = None if replay is None else replay[0]
                g, denominator = linear_rule(x, call.weight, p, negate, cell, denominator)
                if keep:
                    cell.replays[key] = (denominator,)
            else:
                g = _operator_rule(x, call, p, negate, cell, key, replay, keep)
            if cell.debug:
                cell.report(f"{call.kind} #{call.index}" + (" (dual)" if negate else ""), p,
                            [g])
        return g, None


def closed_form(call: Call, x: torch.Tensor) -> Optional[LinearMap]:
    """The transposed map of a convolution the context replaced, without autograd
    (:class:`~.lrp_rules.LinearMap`: ``aten.convolution_backward``, what autograd's own node
    runs), or ``None``: another operation, arguments passed by keyword, ``padding="same"``.
    """
    if call.kind not in ("conv", "conv_transpose") or call.weight is None \
            or call.x_slot != 0 or call.w_slot != 1 or call.b_slot not in (2, None, "bias"):
        return None
    kwargs = {k: v for k, v in call.kwargs.items() if k != "bias"}
    return linear_map(AffineCall(call.func, call.weight, None, call.args[3:], kwargs,
                                 call.kind), x)


def _operator_rule(x: torch.Tensor, call: Call, p: torch.Tensor, negate: bool,
                   cell: ExcitationCell, key: Tuple[int, bool],
                   replay: Optional[Tuple[Any, ...]], keep: bool) -> torch.Tensor:
    """``r(x) ⊙ op⁺ᵀ(P / op⁺(r(x)))``: a convolution's transpose in closed form
    (:func:`closed_form`; the same products as autograd's), other operations replayed on a leaf
    and transposed by autograd."""
    dtype = compute_dtype(x.dtype)
    leaf: Optional[torch.Tensor] = None
    closed: Optional[Tuple[LinearMap, torch.Tensor]] = None  # (transposed map, its weight)
    if replay is None:
        xr = cell.rule_input(x, dtype)
        weight = None if call.weight is None else cell.positive_weight(call.weight, negate,
                                                                       dtype)
        op = closed_form(call, xr)
        if op is not None and weight is not None:
            closed = (op, weight)
            z = op.forward(xr, weight)
        else:
            with torch.enable_grad():
                leaf = xr.detach().requires_grad_(True)
                z = call(leaf, weight, drop_bias=True)
        denominator = cell.denominator(z.detach())
    else:
        z, leaf, closed, xr, denominator = replay
    if keep:
        cell.replays[key] = (z, leaf, closed, xr, denominator)
    s = torch.div(p.to(dtype), denominator)
    if closed is not None:
        g = closed[0].transpose(s, closed[1], xr)
    else:
        assert leaf is not None
        (g,) = torch.autograd.grad(z, leaf, s, retain_graph=keep)
    # In place when the transposed operation returned a fresh dense tensor (convolutions);
    # a sum's or mean's gradient is an expanded view of ``s``.
    dense = g.is_contiguous() or (g.dim() == 4 and g.is_contiguous(
        memory_format=torch.channels_last))
    return (g.mul_(xr) if dense else g * xr).to(x.dtype)


#: Bytes of ``w⁺`` materialised at once by the linear rule on the CPU (a block that stays
#: cheap to rewrite; larger blocks on accelerators, where each block costs kernel launches).
LINEAR_CHUNK_BYTES = 1 << 25
LINEAR_CHUNK_BYTES_ACCELERATOR = 1 << 28


def linear_rule(x: torch.Tensor, weight: torch.Tensor, p: torch.Tensor, negate: bool,
                cell: ExcitationCell, denominator: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The excitation rule of ``F.linear`` without materialising ``w⁺`` whole.

    ``w⁺`` is built block of rows by block of rows into one small buffer that serves both
    products of the block (``z = r(x) w⁺ᵀ`` and ``s w⁺``): the weight is read once, like the
    plain gradient reads it, instead of being clamped into a fresh copy as large as the layer
    (for VGG's first classifier layer, 400 MB written and read twice per call).  Returns the
    signal for ``x`` and the denominators (to reuse in a second backward pass).
    """
    dtype = compute_dtype(x.dtype)
    in_features = weight.shape[-1]
    out_features = weight.shape[0]
    xr = cell.rule_input(x, dtype).reshape(-1, in_features)
    p2 = p.reshape(-1, out_features).to(dtype)
    w = weight.detach()
    budget = LINEAR_CHUNK_BYTES if w.device.type == "cpu" else LINEAR_CHUNK_BYTES_ACCELERATOR
    rows = max(1, min(out_features, budget // max(1, in_features * w.element_size())))
    buffer = torch.empty((rows, in_features), dtype=dtype, device=w.device)
    grad = torch.zeros_like(xr)
    fresh = denominator is None
    if denominator is None:
        denominator = torch.empty((xr.shape[0], out_features), dtype=dtype, device=xr.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        block = buffer[:stop - start]
        if w.dtype != dtype:
            block.copy_(w[start:stop])
            if negate:
                block.clamp_(max=0).neg_()
            else:
                block.clamp_(min=0)
        elif negate:
            torch.clamp(w[start:stop], max=0, out=block).neg_()
        else:
            torch.clamp(w[start:stop], min=0, out=block)
        if fresh:
            denominator[:, start:stop] = cell.denominator(xr @ block.t())
        grad.addmm_(p2[:, start:stop] / denominator[:, start:stop], block)
    return grad.mul_(xr).reshape(x.shape).to(x.dtype), denominator


def sum_rule(terms: Sequence[torch.Tensor], weights: Sequence[float], p: torch.Tensor,
             cell: ExcitationCell) -> List[torch.Tensor]:
    """The signal of each term of ``Σ_k α_k t_k`` (``α_k > 0``): ``α_k r(t_k) / Σ_l α_l r(t_l)
    · P``, summed back to the term's shape where it was broadcast."""
    dtype = compute_dtype(p.dtype)
    scaled = []
    for t, alpha in zip(terms, weights):
        r = cell.rule_input(t, dtype)
        scaled.append(r if alpha == 1 else r * alpha)
    total = functools.reduce(torch.add, scaled)
    s = torch.div(p.to(dtype), cell.denominator(total))
    return [torch.mul(r, s).sum_to_size(t.shape).to(t.dtype) for r, t in zip(scaled, terms)]


class ExciteSumFunction(torch.autograd.Function):
    """``a + α b`` (or ``a += α b``), ``α > 0``, whose backward splits the signal in proportion
    to the terms: ``P_a = r(a) / (r(a) + α r(b)) · P`` and ``P_b = α r(b) / (r(a) + α r(b)) · P``.
    """

    @staticmethod
    def forward(ctx, a, b, alpha, inplace, cell):
        with torch._C.DisableTorchFunction():
            if inplace:
                # ``a`` is about to be overwritten (and later, often, rectified in place): keep
                # its values.  Only calls that autograd follows get here.
                saved_a = a.clone()
                saved_b = b.clone() if _shares_memory(a, b) else b
                out = a.add_(b, alpha=alpha) if alpha != 1 else a.add_(b)
                ctx.mark_dirty(a)
            else:
                saved_a, saved_b = a, b
                out = torch.add(a, b, alpha=alpha) if alpha != 1 else torch.add(a, b)
        ctx.save_for_backward(saved_a, saved_b)
        ctx.alpha, ctx.cell = alpha, cell
        return out

    @staticmethod
    @first_order("excitation backprop")
    def backward(ctx, p):
        a, b = ctx.saved_tensors
        cell: ExcitationCell = ctx.cell
        cell.applied += 1
        with torch._C.DisableTorchFunction():
            grad_a, grad_b = sum_rule((a, b), (1, ctx.alpha), p, cell)
            if cell.debug:
                cell.report("sum", p, [grad_a, grad_b])
        return (grad_a if ctx.needs_input_grad[0] else None,
                grad_b if ctx.needs_input_grad[1] else None, None, None, None)


class ExciteScaleFunction(torch.autograd.Function):
    """``c · x`` or ``x / c`` with a non-negative constant ``c`` (a number or a tensor that
    autograd does not follow): a one-input linear unit with weight ``c``, so the signal passes
    unchanged where ``r(x) c`` is an excitatory input (``c`` cancels in ``x c / (x c)``)."""

    @staticmethod
    def forward(ctx, x, call, cell, inplace):
        with torch._C.DisableTorchFunction():
            out = call(x)
            ctx.mask = cell.excited(out)
        if inplace:
            ctx.mark_dirty(x)
        ctx.cell = cell
        return out

    @staticmethod
    @first_order("excitation backprop")
    def backward(ctx, p):
        ctx.cell.applied += 1
        with torch._C.DisableTorchFunction():
            g = torch.where(ctx.mask, p, 0.0)
            if ctx.cell.debug:
                ctx.cell.report("scale", p, [g])
        return g, None, None, None


class PassThroughFunction(torch.autograd.Function):
    """An operation (batch normalisation) whose forward is the plain call and whose backward
    passes the signal through unchanged."""

    @staticmethod
    def forward(ctx, x, call, cell):
        ctx.cell = cell
        with torch._C.DisableTorchFunction():
            return call(x)

    @staticmethod
    @first_order("excitation backprop")
    def backward(ctx, p):
        ctx.cell.applied += 1
        return p, None, None


class _PositiveOutputRule(ReLURule):
    """Bounded rectifiers under excitation backprop: the signal passes wherever the output is
    positive, the saturated side included (the unit is excited, it just does not grow)."""

    name = "excitation"

    def backward(self, grad: torch.Tensor, output: torch.Tensor,
                 upper: Optional[float]) -> torch.Tensor:
        return torch.ops.aten.threshold_backward(grad, output, 0)


POSITIVE_OUTPUT_RULE = _PositiveOutputRule()


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
