r"""Layer-wise relevance propagation (LRP) as a rule context.

Bach et al. 2015 (PLoS ONE 10(7)); Montavon et al., "Layer-wise relevance propagation: an
overview", 2019.  The relevance of the target score is passed down the network layer by layer;
each linear operation shares its outputs' relevance among its inputs by a *rule*
(:mod:`.lrp_rules`: ε, γ, z⁺, α-β, flat, w², z^B), chosen per layer by a *composite*
(:mod:`.lrp_composites`).

:class:`LRPContext` is a :class:`~.context.RuleContext`: inside its ``with`` block every
convolution, transposed convolution and linear layer the model calls — a module,
``F.conv2d`` / ``F.linear`` called directly, a custom layer — gets its composite's rule in
backward, thread-locally, without touching the model.  Batch norm right after a convolution or
linear layer is folded into that layer *inside the rule* (the merged weight and bias are used
for the relevance; the model's parameters are not changed).

**Gradient form.**  What backpropagates is ``g = R / t`` — the gradient of the output under the
rules — so that the relevance of any tensor ``t`` (the input, or a layer read with a probe) is
``t ⊙ g`` (the *input × gradient* convention), and the relevance of the output is the target
score itself (the seed is one at the target class).  In this form the operations between the
linear layers need no rule: ReLU and max pooling pass relevance as their gradient does (to the
active units, to the winner), and every linear operation without bias — average and adaptive
pooling, residual sums ``a + b`` (each term gets its proportional share ``a / (a + b)``),
concatenation, reshapes, sums and means, scalings — is LRP-0 with its plain gradient.

Conservation: with ε → 0 and no biases the relevance at every layer sums to the target score;
biases (and ε) absorb the rest (:func:`lrp_conservation` reports each layer's sum).  The map
of :func:`lrp` is the relevance summed over channels.

Uncovered operations — layer / group / instance norm, softmax, attention and products of two
activations, non-linearities other than rectifiers (GELU, SiLU, tanh ...), bounded rectifiers
(ReLU6, whose saturated side would lose relevance) — keep their plain gradient and are named in
an :class:`~.context.UnhandledActivationWarning`: the map is then not pure LRP.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autograd_graph import parameter_function
from .context import RuleContext, records_gradient
from .driver import SaliencyDebug
from .engine import Job, saliency
from .linear_approx import gradient_to_linear_approx_saliency
from .lrp_closed import rectified
from .lrp_composites import Composite, CompositeSpec, make_composite
from .lrp_layers import (
    BatchNormFoldFunction,
    LayerNode,
    LRPFunction,
    affine_args,
    batch_norm_args,
    bn_scale_shift,
    records,
)
from .lrp_rules import AffineCall, Rule
from .maps import SizeType
from .method import SHARED_OPTIONS, BackpropMethod, Read
from .modules import unwrap_compiled
from .rules import UNHANDLED_NODES
from .state import model_state_guard
from .targets import TargetType, get_backward_gradient, parse_target
from .tokens import TokensType

__all__ = ["LRPContext", "lrp", "RelevanceLostWarning", "lrp_conservation", "lrp_epsilon_plus",
           "lrp_epsilon_plus_flat", "lrp_epsilon_alpha2_beta1", "lrp_epsilon_gamma_box",
           "LRP_METHODS", "shared_lrp_jobs"]

Layer = Union[str, nn.Module, None]


class RelevanceLostWarning(UserWarning):
    """A first-layer rule (flat, w², z^B) gave relevance to input elements equal to zero,
    which the gradient form (relevance = input × gradient) cannot carry."""


_CONV = {torch.conv1d: "conv", torch.conv2d: "conv", torch.conv3d: "conv",
         torch.conv_transpose1d: "conv_transpose", torch.conv_transpose2d: "conv_transpose",
         torch.conv_transpose3d: "conv_transpose", F.linear: "linear"}

# Operations no rule covers: they keep their plain gradient, and are named in a warning.
_UNCOVERED = {F.layer_norm: "layer_norm", F.group_norm: "group_norm",
              F.instance_norm: "instance_norm", F.local_response_norm: "local_response_norm",
              F.normalize: "normalize", F.softmax: "softmax", F.log_softmax: "log_softmax",
              torch.softmax: "softmax", torch.log_softmax: "log_softmax",
              torch.Tensor.softmax: "softmax", torch.Tensor.log_softmax: "log_softmax",
              F.scaled_dot_product_attention: "scaled_dot_product_attention",
              F.multi_head_attention_forward: "attention", F.relu6: "relu6",
              F.hardtanh: "hardtanh (ReLU6)", F.hardtanh_: "hardtanh (ReLU6)"}
if hasattr(F, "rms_norm"):
    _UNCOVERED[F.rms_norm] = "rms_norm"
# Products: a linear map when one operand is constant, uncovered when both are activations.
_PRODUCTS = {torch.matmul: "matmul", torch.Tensor.matmul: "matmul",
             torch.Tensor.__matmul__: "matmul", torch.Tensor.__rmatmul__: "matmul",
             torch.mm: "matmul", torch.Tensor.mm: "matmul", torch.bmm: "matmul",
             torch.Tensor.bmm: "matmul", torch.einsum: "einsum",
             torch.mul: "mul", torch.Tensor.mul: "mul", torch.Tensor.__mul__: "mul",
             torch.Tensor.__rmul__: "mul", torch.Tensor.mul_: "mul",
             torch.div: "div", torch.Tensor.div: "div", torch.Tensor.__truediv__: "div",
             torch.Tensor.__rtruediv__: "div"}

_UNCOVERED_NODES = dict(UNHANDLED_NODES, **{
    "NativeLayerNormBackward0": ("layer_norm",), "NativeGroupNormBackward0": ("group_norm",),
    "SoftmaxBackward0": ("softmax",), "LogSoftmaxBackward0": ("log_softmax",),
    "HardtanhBackward0": ("hardtanh (ReLU6)",)})


def _escaped_conv(node: Any, context: "RuleContext") -> bool:
    # A convolution on the path that the context did not replace: made in another thread
    # (one with an activation as weight is reported as uncovered instead).
    return "conv with an activation as weight" not in context.unhandled


def _normalises_channels(call: AffineCall, x: torch.Tensor) -> bool:
    """Whether a batch norm of the layer output ``x`` (which normalises dimension 1) scales
    the layer's output channels, so that it can fold into the layer: a linear layer's features
    are dimension 1 only of a 2-D output (not of ``(N, T, C)`` tokens), a convolution's
    channels only of a batched output (not of an unbatched ``(C, L)``)."""
    return x.dim() == 2 if call.kind == "linear" else x.dim() == call.weight.dim()


class LRPContext(RuleContext):
    """Inside this context, backpropagation computes layer-wise relevance (gradient form).

    Every convolution, transposed convolution and linear layer the model calls gets the rule
    its composite chooses; batch norm right after one is folded into it inside the rule; ReLU,
    max pooling and bias-free linear operations (pooling, residual sums, reshapes) keep their
    gradient, which is their LRP rule in this form.  The gradient of a tensor ``t`` computed
    from a forward pass run in the block is ``R_t / t``: its relevance is ``t * t.grad``.
    Thread-local, nestable, removed on exit also when the block raises.

    Parameters
    ----------
    composite : Composite, str or mapping
        The rules per layer: a :class:`~.lrp_composites.Composite`, a standard composite's name
        (``"EpsilonPlusFlat"`` (default), ``"EpsilonPlus"``, ``"EpsilonAlpha2Beta1"``,
        ``"EpsilonGammaBox"``), or a mapping ``{selector: rule}``
        (see :func:`~.lrp_composites.make_composite`).
    model : torch.nn.Module, optional
        The model: needed when the composite selects layers by name; when given, each call of
        the model starts a new forward pass (its first linear operation gets the first-layer
        rule again).  Without it, the first linear operation after entering the block is the
        first layer, and again after each new call of the first module called in the block
        (a loop over batches).  A model other than ``model`` called in the block is delimited
        the same way: each of its outermost calls after a call of ``model``, and each new call
        of the first of them, starts a new forward pass.
    track_modules : bool, keyword-only
        Accepted for compatibility and ignored: the running module of every replaced call is
        always recorded, so :attr:`composite` can be set to one that selects layers by module
        after the forward pass whatever the composite the block began with.

    Attributes
    ----------
    counts : dict
        Replaced calls by kind (``conv``, ``conv_transpose``, ``linear``, ``batch_norm_fold``).
    rules : list of (str, str)
        ``(kind, rule name)`` of each replaced call, in forward order.
    applied : int
        Backward passes through replaced calls.
    unhandled : dict
        Operations no rule covers that autograd records, with their count (warned about).

    Examples
    --------
    >>> with LRPContext("EpsilonPlusFlat", model=model):    # doctest: +SKIP
    ...     y = model(x.requires_grad_())
    ...     (grad,) = torch.autograd.grad(y[:, c].sum(), x)
    >>> relevance = x * grad            # sums to y[:, c] up to the biases' share
    """

    replaces = "convolution or linear-layer call"
    requirement = "a model made of convolutions / linear layers"
    report_other_activations = True
    escaped_kinds = {"ConvolutionBackward0": _escaped_conv}
    unhandled_kinds = _UNCOVERED_NODES

    refuses_checkpoints = "LRP"

    def __init__(self, composite: CompositeSpec = "EpsilonPlusFlat",
                 model: Optional[nn.Module] = None, *, track_modules: bool = False) -> None:
        super().__init__()
        self._composite: Composite = make_composite(composite)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"LRPContext: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        self.model = None if model is None else unwrap_compiled(model)
        self._named = self._resolve_names(self.composite)
        del track_modules  # always tracked (see the docstring)
        # Set by the methods (lrp, shared_lrp_jobs), which run one model once per block and
        # know every composite they will switch to: no module stack to keep (see __enter__).
        self._one_pass_of_model = False
        self._nodes: List[Any] = []   # weak references to this forward pass's nodes, in order
        self.applied = 0
        self.rules: List[Tuple[str, str]] = []
        self.lost: Dict[str, int] = {}
        self._first_pending = True
        self._outputs: Dict[int, Tuple[Any, LayerNode]] = {}
        self._stack: List[nn.Module] = []
        self._outermost: Optional[Any] = None  # weakref to the first outermost module called
        self._hooks: List[Any] = []
        for func, kind in _CONV.items():
            self.handlers[func] = functools.partial(self._affine, kind=kind)
        self.handlers[F.batch_norm] = self._batch_norm
        for func, name in _UNCOVERED.items():
            self.handlers[func] = functools.partial(self._uncovered, name=name)
        for func, name in _PRODUCTS.items():
            self.handlers[func] = functools.partial(self._product, name=name)

    #: Uncovered operations that AttnLRP's rules cover (:mod:`.transformer_lrp`).
    transformer_rule_kinds = frozenset({"layer_norm", "rms_norm", "gelu", "silu", "softmax",
                                        "scaled_dot_product_attention", "attention"})

    def unhandled_advice(self) -> str:
        """Points to AttnLRP when the uncovered operations are ones its rules cover."""
        kinds = sorted(k for k in self.unhandled if k in self.transformer_rule_kinds)
        if not kinds:
            return ""
        return (f" attn_lrp (TransformerLRPContext) has LRP rules for {', '.join(kinds)} "
                "(AttnLRP, Achtibat et al. 2024: normalisation's σ held constant, relevance "
                "passed through GELU / SiLU and softmax) and conserves relevance through them: "
                "use it for such models (ConvNeXt, transformers).")

    def _resolve_names(self, composite: Composite) -> Dict[str, nn.Module]:
        names = composite.names
        if not names:
            return {}
        if self.model is None:
            raise ValueError(
                f"LRPContext: composite {composite.name!r} selects layers by name "
                f"({', '.join(map(repr, names))}): pass model=... to resolve them")
        modules = dict(self.model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(
                f"LRPContext: composite {composite.name!r} names layers "
                f"{', '.join(map(repr, missing))} that {type(self.model).__name__} does not "
                f"have (its layers: {', '.join(list(n for n in modules if n)[:12])} ...)")
        return {n: modules[n] for n in names}

    @property
    def composite(self) -> Composite:
        """The composite whose rules the replaced calls apply in backward.

        Assignable (a composite, a standard composite's name or a mapping) between two
        backward passes of one forward pass (``retain_graph=True``): every LRP rule changes
        only the backward, so one forward serves several composites (as
        :attr:`.ReLUContext.rule` does for rectifier rules)."""
        return self._composite

    @composite.setter
    def composite(self, value: CompositeSpec) -> None:
        composite = make_composite(value)
        named = self._resolve_names(composite)
        self._composite, self._named = composite, named
        rules = []
        for ref in self._nodes:
            node = ref()
            if node is None:
                continue
            # The rule depends on the layer's kind, module and position only, never on the
            # values of the forward pass: choosing again is what a new forward would do.
            node.rule = composite.rule_for(node.call.kind, node.module, node.first, named)
            rules.append((node.call.kind, node.rule.name))
        self.rules = rules

    def switch_rule(self, rule: Any) -> None:
        """Assign :attr:`composite` (the engine's way to switch rules between passes)."""
        self.composite = rule

    # -- enter / exit: module tracking ------------------------------------------------------
    def __enter__(self):
        out = super().__enter__()
        self.applied, self.rules, self._outputs, self._nodes = 0, [], {}, []
        self._first_pending, self._stack, self._outermost = True, [], None
        thread = threading.get_ident()
        ref = weakref.ref(self)
        if self._one_pass_of_model:
            # One call of ``model`` per block and composites that select by kind: the first
            # linear operation after entering is the first layer, and no rule needs the
            # running module; the hooks below would cost two Python calls per module call.
            return out
        if self.model is not None:
            self._hooks.append(self.model.register_forward_pre_hook(
                functools.partial(_new_pass, ref, thread)))
        # The module stack tells a new call of the first outermost module (a loop over batches
        # in one block; another model than ``model`` called in the block): its first layer
        # gets the first-layer rule again.
        hooks = nn.modules.module
        self._hooks.append(hooks.register_module_forward_pre_hook(
            functools.partial(_push, ref, thread)))
        self._hooks.append(hooks.register_module_forward_hook(
            functools.partial(_pop, ref, thread), always_call=True))
        return out

    def __exit__(self, exc_type, exc_val, exc_tb):
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._stack, self._outputs = [], [], {}
        return super().__exit__(exc_type, exc_val, exc_tb)

    # -- handlers ---------------------------------------------------------------------------
    def _affine(self, func, args, kwargs, kind: str):
        if kwargs or len(args) < 2:
            x, weight, bias, rest, other = affine_args(args, kwargs)
        else:  # the usual positional call (what the modules make): no parsing
            x, weight, bias, rest, other = args[0], args[1], (
                args[2] if len(args) > 2 else None), args[3:], None
        # The first layer by position, also when autograd does not record it (a layer read).
        first, self._first_pending = self._first_pending, False
        if not records(x):
            self.skip(kind)
            return func(*args, **kwargs)
        if not isinstance(weight, torch.Tensor) or (
                weight.requires_grad and not isinstance(weight, nn.Parameter)
                and not parameter_function(weight)):  # parametrized / pruned: a constant
            self.unhandle("conv with an activation as weight" if kind != "linear"
                          else "linear with an activation as weight")
            return func(*args, **kwargs)
        module = self._stack[-1] if self._stack else None
        rule = self._composite.rule_for(kind, module, first, self._named)
        node = LayerNode(AffineCall(func, weight, bias, rest, other, kind), rule, self,
                     weight._version, module, first)
        node.rectified = rectified(x)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.rules.append((kind, rule.name))
        self._nodes.append(weakref.ref(node))
        out = LRPFunction.apply(x, node)
        self._outputs[id(out)] = (weakref.ref(out), node)
        return out

    def _batch_norm(self, func, args, kwargs):
        x, mean, var, weight, bias, training, momentum, eps = batch_norm_args(args, kwargs)
        if not records(x):
            return func(*args, **kwargs)
        if training or mean is None:
            self.unhandle("batch_norm with batch statistics (training mode)")
            return func(*args, **kwargs)
        entry = self._outputs.get(id(x))
        node = entry[1] if entry is not None and entry[0]() is x else None
        if node is None or node.fold is not None or node.call.kind not in ("conv", "linear") \
                or var is None or not eps >= 0 or not _normalises_channels(node.call, x):
            # Not after a layer, or not over its output channels: an element-wise affine map,
            # whose plain gradient is LRP-0 (F.batch_norm refuses a negative eps itself).
            return func(*args, **kwargs)
        node.fold = bn_scale_shift(mean, var, weight, bias, eps, x.dtype)
        self.counts["batch_norm_fold"] = self.counts.get("batch_norm_fold", 0) + 1
        return BatchNormFoldFunction.apply(x, node, weight, bias, mean, var, momentum, eps)

    def _uncovered(self, func, args, kwargs, name: str):
        if records_gradient(args, kwargs):
            self.unhandle(name)
        return func(*args, **kwargs)

    def _product(self, func, args, kwargs, name: str):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if name == "einsum" and args and isinstance(args[-1], (list, tuple)):
            tensors += [t for t in args[-1] if isinstance(t, torch.Tensor)]
        active = [t for t in tensors if records_gradient((t,), {})
                  and not isinstance(t, nn.Parameter) and not parameter_function(t)]
        if len(active) > 1 or (name == "div" and active and active[-1] is not tensors[0]):
            self.unhandle(f"{name} of two activations" if len(active) > 1 else "reciprocal")
        return func(*args, **kwargs)

    # -- reports -----------------------------------------------------------------------------
    def report_lost(self, rule: Rule, count: int, share: float) -> None:
        """Warn that a first-layer rule's relevance at zero inputs is not representable."""
        self.lost[rule.name] = self.lost.get(rule.name, 0) + count
        warnings.warn(
            f"LRPContext: the first-layer rule {type(rule).__name__} gave relevance to {count} "
            f"input element(s) equal to zero ({share:.3g} of that layer's relevance), which "
            "the gradient form (relevance = input × gradient) cannot carry: they are left out "
            "of the map. Use a first-layer rule proportional to the input (a composite "
            "without 'first', e.g. 'EpsilonPlus'), or shift the input away from exact zeros",
            RelevanceLostWarning, stacklevel=2)


def _owner(ref: Any, thread: int) -> Optional[LRPContext]:
    context = ref()
    if context is None or threading.get_ident() != thread or context._suspended:
        return None
    return context


def _new_pass(ref: Any, thread: int, module: nn.Module, args: Any) -> None:
    context = _owner(ref, thread)
    if context is not None:
        # A call of the model: the next outermost call of another module starts a new pass.
        context._first_pending, context._outermost = True, None


def _push(ref: Any, thread: int, module: nn.Module, args: Any) -> None:
    context = _owner(ref, thread)
    if context is not None:
        if not context._stack and module is not context.model:
            # An outermost module call (the model's own calls are _new_pass's): the first one
            # since the block began or the model last ran starts a new forward pass, and so
            # does that module called again; another module (a classifier called after the
            # features by hand) continues the same pass.  So a model B called in a block
            # built with model=A gets the first-layer rule on each of its passes.
            first = context._outermost
            if first is None:
                context._outermost = weakref.ref(module)
                context._first_pending = True
            elif first() is module:
                context._first_pending = True
        context._stack.append(module)


def _pop(ref: Any, thread: int, module: nn.Module, args: Any, output: Any) -> None:
    context = _owner(ref, thread)
    if context is not None and context._stack and context._stack[-1] is module:
        context._stack.pop()


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


def _method_context(composites: Sequence[Composite], model: nn.Module) -> LRPContext:
    """The context of a method call: ``model`` runs once in its block, and the engine switches
    it only among ``composites`` (the first is the initial one; see :attr:`LRPContext.composite`).
    Where none of them selects by module, the context keeps no module stack: no rule needs the
    running module, and the first linear operation after entering is the first layer."""
    context = LRPContext(composites[0], model=model)
    context._one_pass_of_model = not any(c.needs_modules for c in composites)
    return context


def lrp(model: nn.Module, input: torch.Tensor, target: TargetType,
        saliency_layer: Layer = "", resize: SizeType = False, resize_mode: str = "bilinear",
        smooth: float = 0,
        gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] =
        gradient_to_linear_approx_saliency,
        get_backward_gradient: Callable[[torch.Tensor, TargetType], torch.Tensor] =
        get_backward_gradient, debug: bool = False, *,
        composite: CompositeSpec = "EpsilonPlusFlat", tokens: TokensType = None
        ) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """Layer-wise relevance propagation map: the relevance at ``saliency_layer`` summed over
    channels.

    One forward pass inside :class:`LRPContext` (``composite``'s rules), one backward pass
    from the target score; the relevance of the tensor read ``t`` is ``t ⊙ g`` (input ×
    gradient under the rules), summed over channels.  It sums to the target score, less what
    the biases (and ε) absorb.

    Parameters
    ----------
    model : torch.nn.Module
        The network, as it is (no canonization needed: batch norm after a convolution or
        linear layer is folded inside the rule; residual sums split proportionally).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The output unit(s) to explain (see
        :func:`~torchray_like.attribution.common.get_backward_gradient`).
    saliency_layer : str or torch.nn.Module, optional
        Layer whose output relevance is read; ``""`` / ``None`` (default) means the input.  A
        convolution followed by batch norm is one LRP layer: read it at the batch norm.
    resize, resize_mode, smooth, get_backward_gradient, debug
        As in :func:`~torchray_like.attribution.common.saliency`.
    gradient_to_saliency : callable
        Turns the read tensor (``.grad``: the gradient under the rules) into the map; default
        ``Σ_c t_c · g_c``, the channel-summed relevance.
    composite : Composite, str or mapping, keyword-only
        The rules per layer (see :class:`LRPContext`); default ``"EpsilonPlusFlat"``.
    tokens : None, False, TokenLayout or callable, keyword-only
        How a transformer block's token output becomes a map (inferred by default; see
        :mod:`~torchray_like.attribution.tokens`).

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *spatial)`` signed relevance maps.

    Raises
    ------
    ValueError
        For a model without convolution or linear layer, an unknown composite or layer name,
        and whatever :func:`~torchray_like.attribution.common.saliency` refuses.
    """
    spec = make_composite(composite)  # errors before any work
    if not isinstance(model, nn.Module):
        raise TypeError(f"lrp: model must be a torch.nn.Module, got {type(model).__name__}")
    owner = unwrap_compiled(model)
    return saliency(model, input, target, saliency_layer=saliency_layer, resize=resize,
                    resize_mode=resize_mode, smooth=smooth,
                    context_builder=lambda: _method_context([spec], owner),
                    gradient_to_saliency=gradient_to_saliency,
                    get_backward_gradient=get_backward_gradient, debug=debug, tokens=tokens)


def lrp_conservation(model: nn.Module, input: torch.Tensor, target: TargetType,
                     layers: Tuple[Layer, ...] = (), composite: CompositeSpec = "EpsilonPlusFlat"
                     ) -> Dict[str, torch.Tensor]:
    """Where the relevance goes: per-sample sums of the relevance at the input and at each layer
    of ``layers``, and the target scores it starts from.

    Returns ``{"score": (N,), "input": (N,), "<layer>": (N,) ...}``.  Between two readings the
    difference is what the biases (and ε) in between absorbed; with ε → 0 and no biases every
    entry equals ``"score"``.  One :func:`lrp` call per reading.
    """
    spec = make_composite(composite)
    with model_state_guard(model, freeze=False), torch.no_grad():  # eval mode, as lrp() runs
        output = model(input)
    sums = {"score": parse_target(target, input.shape[0]).scores(output).detach()}
    for layer in ("",) + tuple(layers):
        smap = cast(torch.Tensor, lrp(model, input, target, saliency_layer=layer,
                                      composite=spec))
        key = "input" if layer == "" else (layer if isinstance(layer, str) else repr(layer))
        sums[key] = smap.flatten(1).sum(1)
    return sums


def _variant(name: str, composite: str) -> Callable[..., Any]:
    """:func:`lrp` with another default composite (a ``METHODS`` entry)."""

    def method(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("composite", composite)
        return lrp(*args, **kwargs)

    sig = inspect.signature(lrp)
    method.__signature__ = sig.replace(parameters=[  # type: ignore[attr-defined]
        p.replace(default=composite) if p.name == "composite" else p
        for p in sig.parameters.values()])
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f":func:`lrp` with ``composite={composite!r}``."
    return method


lrp_epsilon_plus = _variant("lrp_epsilon_plus", "EpsilonPlus")
lrp_epsilon_plus_flat = _variant("lrp_epsilon_plus_flat", "EpsilonPlusFlat")
lrp_epsilon_alpha2_beta1 = _variant("lrp_epsilon_alpha2_beta1", "EpsilonAlpha2Beta1")
lrp_epsilon_gamma_box = _variant("lrp_epsilon_gamma_box", "EpsilonGammaBox")

#: The ``METHODS`` entries of LRP: ``"lrp"`` (EpsilonPlusFlat) and one per standard composite.
LRP_METHODS: Dict[str, Callable[..., Any]] = {
    "lrp": lrp, "lrp_epsilon_plus": lrp_epsilon_plus,
    "lrp_epsilon_plus_flat": lrp_epsilon_plus_flat,
    "lrp_epsilon_alpha2_beta1": lrp_epsilon_alpha2_beta1,
    "lrp_epsilon_gamma_box": lrp_epsilon_gamma_box,
}

# Each entry's default composite (what its function uses without composite=).
_DEFAULT_COMPOSITE = {"lrp": "EpsilonPlusFlat", "lrp_epsilon_plus": "EpsilonPlus",
                      "lrp_epsilon_plus_flat": "EpsilonPlusFlat",
                      "lrp_epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
                      "lrp_epsilon_gamma_box": "EpsilonGammaBox"}

#: The options of an LRP call that :func:`shared_lrp_jobs` honours in one shared forward pass.
LRP_SHARED_OPTIONS = SHARED_OPTIONS | {"composite"}


def shared_lrp_jobs(model: nn.Module, calls: Sequence[Tuple[str, Callable[..., Any],
                                                              Dict[str, Any]]]
                    ) -> Dict[str, Job]:
    """Engine jobs for the LRP calls among ``calls`` that can share one forward pass.

    ``calls`` are ``(label, function, options)``; a call joins when ``function`` is one of
    :data:`LRP_METHODS` and its options are among :data:`LRP_SHARED_OPTIONS` (a call with its
    own ``get_backward_gradient`` runs alone).  Every LRP rule changes only the backward pass
    (the forward is the plain operation; the rule is chosen from the layer's kind, module and
    position; batch-norm folding is the same for every composite), so
    :func:`~.engine.run_jobs` runs the model once inside one :class:`LRPContext` and switches
    its composite (:attr:`LRPContext.rule`) between the backward passes: each map is, bit for
    bit, what the call's own function returns.  Returns ``label -> Job``; composites are
    validated here (unknown name, layer names the model lacks), before any work.
    """
    if not isinstance(model, nn.Module):
        return {}
    owner = unwrap_compiled(model)
    chosen: List[Tuple[str, str, Dict[str, Any], Composite]] = []
    for label, function, options in calls:
        name = next((n for n, f in LRP_METHODS.items() if f is function), None)
        if name is None or not set(options) <= LRP_SHARED_OPTIONS:
            continue
        composite = make_composite(options.get("composite", _DEFAULT_COMPOSITE[name]))
        LRPContext(composite, model=owner)  # the call's own errors (layer names), before work
        # Equal composites are one object: the engine gives each distinct rule one pass.
        composite = next((c for _, _, _, c in chosen if c == composite), composite)
        chosen.append((label, name, options, composite))

    composites = [composite for _, _, _, composite in chosen]

    def context() -> LRPContext:
        return _method_context(composites, owner)

    jobs = {}
    for label, name, options, composite in chosen:
        # The composite is the "rule" of the read: the engine switches the context to it
        # before the backward pass that reads it (equal composites share the pass).
        method = BackpropMethod(name=name, reads=(Read(rule=cast(Any, composite),
                                                       context=context),),
                                module=__name__, doc=LRP_METHODS[name].__doc__ or "",
                                gradient_to_saliency=gradient_to_linear_approx_saliency)
        jobs[label] = Job(label, method, {k: v for k, v in options.items()
                                          if k != "composite"})
    return jobs
