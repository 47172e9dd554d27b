r"""Conservative relevance propagation for transformers: CP-LRP and AttnLRP as one rule context.

Both methods are *gradient × input under modified backward rules*; :class:`TransformerLRPContext`
installs the rules for the code inside its ``with`` block (thread-locally, a
:class:`~.lrp.LRPContext` with transformer rules added), and :func:`attn_lrp` / :func:`cp_lrp`
read the relevance ``x ⊙ ∂y_c/∂x`` at the input, summed over channels.

**CP-LRP** (Ali et al., "XAI for transformers: better explanations through conservative
propagation", ICML 2022, arXiv 2202.07304): the attention probabilities ``softmax(q kᵀ)`` and
LayerNorm's ``1/σ`` are held constant in the backward pass (the forward is unchanged); every
other operation keeps its gradient (LRP-0 on the linear layers unless a ``composite`` is
given).  Attention then mixes the values linearly and LayerNorm is a linear map per token,
so relevance is conserved through both.

**AttnLRP** (Achtibat et al., "AttnLRP: attention-aware layer-wise relevance propagation for
transformers", ICML 2024, arXiv 2402.05602):

* linear layers (and convolutions, the patch embedding): the ε-rule (``composite``; default
  ε = 1e-6 everywhere), with the projections inside ``nn.MultiheadAttention`` included;
* the softmax: ``R_i = x_i (R_i^out − s_i Σ_j R_j^out)`` — in gradient form
  (``R = t ⊙ g``) this is exactly the plain gradient, which is what we keep;
* the bilinear products ``q kᵀ`` and ``A v`` (and any product of two activations, ``matmul``,
  ``einsum``, ``bmm``, element-wise ``mul``): the uniform rule, each of the ``n`` operands
  receives ``1/n`` of the relevance — the plain gradient scaled by ``1/n``;
* normalisation (LayerNorm, RMSNorm): the identity rule on the division by σ, which in
  gradient form is holding ``σ`` constant (``g_x = (y/x)·g_y = g_y/σ``); the mean subtraction
  and the affine parameters are linear (LRP-0; the bias absorbs its share);
* element-wise activations (GELU, SiLU): the identity rule ``R_x = R_y``, i.e.
  ``g_x = (y / x)·g_y``.

The operations are seen however the model calls them: ``F.layer_norm`` (``nn.LayerNorm``),
``F.rms_norm``, ``F.scaled_dot_product_attention`` (fused: it is re-written explicitly for the
backward only, :func:`~.attention.substitute`), ``F.multi_head_attention_forward``
(``nn.MultiheadAttention``; its fast path is not taken inside the context), ``softmax`` in all
spellings, ``matmul`` / ``@`` / ``bmm`` / ``einsum`` / ``mul``, ``F.gelu`` / ``F.silu``.  The
model's output values are unchanged.  Operations no rule covers (``exp``, a hand-written
normalisation with ``div`` of two activations, ``tanh`` ...) are named in an
:class:`~.context.UnhandledActivationWarning`.

Conservation: with no biases and ε → 0, CP-LRP conserves relevance exactly through attention,
LayerNorm and ReLU layers (the input relevance sums to the target score); AttnLRP's softmax
rule has a bias term, so its sum is close to, not equal to, the score.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import (
    SOFTMAX_FUNCTIONS,
    AttentionOps,
    explicit_mha,
    explicit_sdpa,
    held_constant,
    is_attention_softmax,
    mha_arguments,
    sdpa_arguments,
    softmax_dim,
    substitute,
)
from .autograd_guards import first_order
from .context import records_gradient
from .driver import SaliencyDebug
from .engine import saliency
from .linear_approx import gradient_to_linear_approx_saliency
from .lrp import LRPContext
from .lrp_composites import Composite, CompositeSpec, make_composite
from .lrp_rules import Epsilon
from .maps import SizeType
from .modules import unwrap_compiled
from .targets import TargetType, get_backward_gradient

__all__ = ["TransformerLRPContext", "attn_lrp", "cp_lrp", "TRANSFORMER_RULES",
           "scale_gradient", "IdentityRuleFunction"]

#: The rule sets :class:`TransformerLRPContext` knows.
TRANSFORMER_RULES = ("attnlrp", "cp-lrp")

Layer = Union[str, nn.Module, None]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float, owner: Any) -> torch.Tensor:
        ctx.factor, ctx.owner = factor, owner
        return x.clone()

    @staticmethod
    @first_order("transformer LRP")  # a second derivative / vmap: a clear error
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        if ctx.owner is not None:
            ctx.owner.applied += 1
        with torch._C.DisableTorchFunction():
            return grad * ctx.factor, None, None


def scale_gradient(x: torch.Tensor, factor: float, owner: Any = None) -> torch.Tensor:
    """``x`` (same values) whose backward multiplies the gradient by ``factor`` (the uniform
    rule of a product of ``1/factor`` activations); ``owner.applied`` counts the passes."""
    return _ScaleGradient.apply(x, factor, owner)


class IdentityRuleFunction(torch.autograd.Function):
    """An element-wise activation ``y = f(x)`` with the identity rule ``R_x = R_y``: in
    gradient form ``g_x = (y / x) · g_y`` (zero where ``x = 0``, whose relevance is zero)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
                owner: Any = None) -> torch.Tensor:
        out = compute(x)
        ctx.save_for_backward(x, out)
        ctx.owner = owner
        return out

    @staticmethod
    @first_order("transformer LRP")
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        x, out = ctx.saved_tensors
        if ctx.owner is not None:
            ctx.owner.applied += 1
        with torch._C.DisableTorchFunction():
            zero = x == 0
            ratio = torch.where(zero, 0.0, out / torch.where(zero, 1.0, x))
            return grad * ratio, None, None


class _RuleOps(AttentionOps):
    """The explicit attention's operations under the context's rules."""

    def __init__(self, context: "TransformerLRPContext") -> None:
        self.context = context

    def linear(self, x, weight, bias):
        # The projections' weights are (views of) parameters: constants for the rules.
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        if self.context.replaces_linear:
            return self.context.affine_call(F.linear, (x, weight, bias))
        return F.linear(x, weight, bias)

    def scores(self, q, k):
        out = torch.matmul(q, k.transpose(-2, -1))
        return scale_gradient(out, 0.5, self.context) if self.context.rule == "attnlrp" else out

    def softmax(self, logits):
        out = torch.softmax(logits, dim=-1)
        return out.detach() if self.context.rule == "cp-lrp" else out

    def mix(self, probs, v):
        out = torch.matmul(probs, v)
        both = probs.requires_grad and v.requires_grad
        if self.context.rule == "attnlrp" and both:
            return scale_gradient(out, 0.5, self.context)
        return out


_LN_NAMES = ("input", "normalized_shape", "weight", "bias", "eps")


def _named(names: Tuple[str, ...], defaults: tuple, args: tuple, kwargs: dict) -> dict:
    values = dict(zip(names, defaults))
    values.update(zip(names, args))
    values.update(kwargs)
    return values


class TransformerLRPContext(LRPContext):
    """Inside this context, gradient × input is CP-LRP or AttnLRP relevance (see the module).

    Parameters
    ----------
    rule : {"attnlrp", "cp-lrp"}
        The rule set.
    composite : Composite, str or mapping, optional
        The LRP rules of the linear layers and convolutions (see :class:`~.lrp.LRPContext`).
        Default: ε (``epsilon``) on every one for AttnLRP; none for CP-LRP (plain gradient,
        LRP-0, as in Ali et al.).
    model : torch.nn.Module, optional
        As in :class:`~.lrp.LRPContext`.
    epsilon : float
        The ε of AttnLRP's default composite.

    Attributes
    ----------
    counts, rules, applied, unhandled
        As in :class:`~.lrp.LRPContext`; ``counts`` also has ``layer_norm``, ``attention``,
        ``softmax``, ``bilinear``, ``gelu`` ... entries.

    Examples
    --------
    >>> with TransformerLRPContext("attnlrp", model=vit):        # doctest: +SKIP
    ...     y = vit(x.requires_grad_())
    ...     (g,) = torch.autograd.grad(y[:, c].sum(), x)
    >>> relevance = x * g
    """

    replaces = "transformer operation (layer norm, attention, linear layer)"
    requirement = "a transformer or a network of linear layers"

    def __init__(self, rule: str = "attnlrp", composite: Optional[CompositeSpec] = None,
                 model: Optional[nn.Module] = None, epsilon: float = 1e-6) -> None:
        if rule not in TRANSFORMER_RULES:
            raise ValueError(f"TransformerLRPContext: rule must be one of "
                             f"{', '.join(map(repr, TRANSFORMER_RULES))}, got {rule!r}")
        spec = composite
        if spec is None:
            spec = Composite(f"{rule} default", default=Epsilon(epsilon if rule == "attnlrp"
                                                                else 0.0))
        super().__init__(make_composite(spec), model=model)
        self.rule = rule
        self.replaces_linear = not (composite is None and rule == "cp-lrp")
        if not self.replaces_linear:
            # CP-LRP keeps the linear layers' gradient (LRP-0 in gradient form).
            self.handlers = {f: h for f, h in self.handlers.items()
                             if getattr(h, "func", None) != self._affine}
            self.escaped_kinds = {}  # plain convolutions are expected, not escaped calls
            self.requirement = (
                "a transformer (attention or layer norm); on a model without them CP-LRP is "
                "gradient × input: use gradient_x_input, or pass a composite for LRP rules on "
                "the linear layers")
        self._ops = _RuleOps(self)
        self.handlers[F.layer_norm] = self._layer_norm
        if hasattr(F, "rms_norm"):
            self.handlers[F.rms_norm] = self._rms_norm
        self.handlers[F.scaled_dot_product_attention] = self._sdpa
        self.handlers[F.multi_head_attention_forward] = self._mha
        for func in SOFTMAX_FUNCTIONS:
            self.handlers[func] = self._softmax
        self.handlers[F.gelu] = functools.partial(self._activation, name="gelu")
        self.handlers[F.silu] = functools.partial(self._activation, name="silu")
        covered = {"NativeLayerNormBackward0", "SoftmaxBackward0", "GeluBackward0",
                   "SiluBackward0"}
        self.unhandled_kinds = {k: v for k, v in LRPContext.unhandled_kinds.items()
                                if k not in covered}

    def affine_call(self, func: Callable, args: tuple) -> torch.Tensor:
        """A linear call under the composite's rule (the projections of explicit attention)."""
        return self._affine(func, args, {}, kind="linear")

    # -- handlers ---------------------------------------------------------------------------
    def _layer_norm(self, func, args, kwargs):
        if not records_gradient(args, kwargs):
            return func(*args, **kwargs)
        values = _named(_LN_NAMES, (None, None, None, None, 1e-5), args, kwargs)
        x, shape = values["input"], values["normalized_shape"]
        dims = tuple(range(-len(tuple(shape) if not isinstance(shape, int) else (shape,)), 0))
        with torch.no_grad():
            exact = func(*args, **kwargs)
        centred = x - x.mean(dims, keepdim=True)
        sigma = torch.sqrt(centred.detach().pow(2).mean(dims, keepdim=True) + values["eps"])
        y = centred / sigma  # σ held constant: CP-LRP, and AttnLRP's identity rule on 1/σ
        if values["weight"] is not None:
            y = y * values["weight"]
        if values["bias"] is not None:
            y = y + values["bias"]
        self.count("layer_norm")
        return substitute(y, exact, self)

    def _rms_norm(self, func, args, kwargs):
        if not records_gradient(args, kwargs):
            return func(*args, **kwargs)
        values = _named(("input", "normalized_shape", "weight", "eps"), (None, None, None, None),
                        args, kwargs)
        x, shape = values["input"], values["normalized_shape"]
        dims = tuple(range(-len(tuple(shape) if not isinstance(shape, int) else (shape,)), 0))
        eps = values["eps"] if values["eps"] is not None else torch.finfo(x.dtype).eps
        with torch.no_grad():
            exact = func(*args, **kwargs)
        y = x / torch.sqrt(x.detach().pow(2).mean(dims, keepdim=True) + eps)
        if values["weight"] is not None:
            y = y * values["weight"]
        self.count("rms_norm")
        return substitute(y, exact, self)

    def _sdpa(self, func, args, kwargs):
        if not records_gradient(args, kwargs):
            return func(*args, **kwargs)
        values = sdpa_arguments(args, kwargs)
        with torch.no_grad():
            exact = func(*args, **kwargs)
        self.count("attention")
        return substitute(explicit_sdpa(values, self._ops), exact, self)

    def _mha(self, func, args, kwargs):
        if not records_gradient(args, kwargs):
            return func(*args, **kwargs)
        values = mha_arguments(args, kwargs)
        out, weights = explicit_mha(values, self._ops)  # checks the options first
        with torch.no_grad():
            exact_out, exact_weights = func(*args, **kwargs)
        self.count("attention")
        if exact_weights is not None and weights is not None:
            exact_weights = substitute(weights, exact_weights, self)
        return substitute(out, exact_out, self), exact_weights

    def _softmax(self, func, args, kwargs):
        out = func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        if not records_gradient(args, kwargs):
            return out
        if self.rule == "attnlrp":
            self.count("softmax")  # AttnLRP's softmax rule is the gradient in this form
            return out
        if is_attention_softmax(x, softmax_dim(args, kwargs)):
            self.count("softmax")
            # CP-LRP: attention probabilities held constant (a counted ``.detach()``)
            return held_constant(x, out, self)
        self.unhandle("softmax that is not attention over a square (…, T, T) or (N, heads, L, S) "
                      "score tensor "
                      "(an output layer? plain gradient)")
        return out

    def _activation(self, func, args, kwargs, name: str):
        if not records_gradient(args, kwargs):
            return func(*args, **kwargs)
        if self.rule == "cp-lrp":
            if name != "gelu":
                self.unhandle(name)
            return func(*args, **kwargs)  # Ali et al.: gradient × input through GELU
        self.count(name)
        x, rest = args[0], args[1:]
        return IdentityRuleFunction.apply(x, lambda t: func(t, *rest, **kwargs), self)

    def _product(self, func, args, kwargs, name: str):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if name == "einsum" and args and isinstance(args[-1], (list, tuple)):
            tensors += [t for t in args[-1] if isinstance(t, torch.Tensor)]
        active = [t for t in tensors if records_gradient((t,), {})
                  and not isinstance(t, nn.Parameter)]
        if len(active) < 2 or name == "div":
            return super()._product(func, args, kwargs, name)
        if self.rule == "attnlrp":
            self.count("bilinear")  # the uniform rule: each operand gets 1/n
            return scale_gradient(func(*args, **kwargs), 1.0 / len(active), self)
        if name != "mul":
            # CP-LRP: q kᵀ's path is cut by the constant softmax, A v is linear in v.
            return func(*args, **kwargs)
        return super()._product(func, args, kwargs, name)


def _check_rule(rule: Any) -> None:
    if rule not in TRANSFORMER_RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, TRANSFORMER_RULES))}, got "
                         f"{rule!r}")


def attn_lrp(model: nn.Module, input: torch.Tensor, target: TargetType,
             saliency_layer: Layer = "", resize: SizeType = False,
             resize_mode: str = "bilinear", smooth: float = 0,
             gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] =
             gradient_to_linear_approx_saliency,
             get_backward_gradient: Callable[[torch.Tensor, TargetType], torch.Tensor] =
             get_backward_gradient, debug: bool = False, *, rule: str = "attnlrp",
             composite: Optional[CompositeSpec] = None, epsilon: float = 1e-6
             ) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """AttnLRP (or CP-LRP) relevance map: gradient × input under
    :class:`TransformerLRPContext`'s rules, summed over channels.

    Parameters
    ----------
    model : torch.nn.Module
        A transformer (any model: without attention it is LRP with ``composite``).
    input : torch.Tensor
        ``(N, C, *spatial)`` batch.
    target : int, sequence, torch.Tensor or callable
        The output unit(s) to explain.
    saliency_layer, resize, resize_mode, smooth, gradient_to_saliency, get_backward_gradient, debug
        As in :func:`~torchray_like.attribution.lrp.lrp`.
    rule : {"attnlrp", "cp-lrp"}, keyword-only
        The rule set (Achtibat et al. 2024; Ali et al. 2022).
    composite : optional, keyword-only
        Rules of the linear layers (see :class:`TransformerLRPContext`).
    epsilon : float, keyword-only
        ε of AttnLRP's default composite.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *spatial)`` signed relevance.
    """
    _check_rule(rule)
    spec = None if composite is None else make_composite(composite)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{rule}: model must be a torch.nn.Module, got {type(model).__name__}")
    owner = unwrap_compiled(model)
    return saliency(model, input, target, saliency_layer=saliency_layer, resize=resize,
                    resize_mode=resize_mode, smooth=smooth,
                    context_builder=lambda: TransformerLRPContext(rule, spec, model=owner,
                                                                  epsilon=epsilon),
                    gradient_to_saliency=gradient_to_saliency,
                    get_backward_gradient=get_backward_gradient, debug=debug)


def cp_lrp(model: nn.Module, input: torch.Tensor, target: TargetType,
           saliency_layer: Layer = "", resize: SizeType = False, resize_mode: str = "bilinear",
           smooth: float = 0,
           gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] =
           gradient_to_linear_approx_saliency,
           get_backward_gradient: Callable[[torch.Tensor, TargetType], torch.Tensor] =
           get_backward_gradient, debug: bool = False, *,
           composite: Optional[CompositeSpec] = None
           ) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """CP-LRP relevance map (Ali et al. 2022): :func:`attn_lrp` with ``rule="cp-lrp"`` —
    gradient × input with the attention probabilities and LayerNorm's σ held constant."""
    return attn_lrp(model, input, target, saliency_layer, resize, resize_mode, smooth,
                    gradient_to_saliency, get_backward_gradient, debug, rule="cp-lrp",
                    composite=composite)
