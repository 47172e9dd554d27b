r"""Excitation backprop and contrastive excitation backprop.

Zhang, Lin, Brandt, Shen, Sclaroff, "Top-down neural attention by excitation backprop", ECCV 2016
(arXiv 1608.00507).

Excitation backprop propagates a *marginal winning probability* (MWP) from an output unit down
the network, a probabilistic winner-take-all.  For a layer computing ``z_i = Σ_k w_ik x_k (+ b)``
the probability ``P(a_i)`` of unit ``i`` moves down as

.. math::

    P(a_j) = \sum_i \frac{r(x_j)\, w^+_{ij}}{\sum_k r(x_k)\, w^+_{ik}}\, P(a_i),
    \qquad w^+ = \max(w, 0),

the bias being ignored (only excitatory connections carry the signal).  With
``z⁺ = op(r(x), w⁺)`` and ``s = P / z⁺`` this is ``P' = r(x) ⊙ op⁺ᵀ(s)``: one forward and one
transposed application of the operation with the positive weights, per layer.  The same rule
holds for every non-negative linear operation, so average pooling, interpolation and sums or
means over dimensions use it too, and a weighted sum of activations ``a + α b`` (``α > 0``; a
residual connection) splits the signal in proportion to its terms:

.. math::

    P_a = \frac{r(a)}{r(a) + α\, r(b)}\, P, \qquad P_b = \frac{α\, r(b)}{r(a) + α\, r(b)}\, P.

**The input rule r** — the paper's networks have non-negative (ReLU) inputs everywhere, where
both choices below agree.  They differ on signed inputs: the normalised image, a batch-normalised
branch of a residual sum, MobileNet's linear bottlenecks.

* ``signed=True`` (the default): ``r(x) = x``, as in the authors' reference (Caffe) code and in
  TorchRay — a convolution's input keeps its sign, ``P(a_j) ∝ x_j w⁺_ij``, and a residual sum
  splits as ``a / (a + b)``, ``b / (a + b)`` on signed values.  The signal is conserved
  (``Σ_j P(a_j) = Σ_i P(a_i)`` over units with a non-zero denominator) but individual shares
  can be negative, or exceed the unit's signal when the denominator is small through
  cancellation; maps read at the image are signed.  TorchRay divides without a guard (a zero
  denominator gives inf / NaN); here a unit with ``|z⁺| < ε`` passes nothing on.
* ``signed=False``: ``r(x) = max(x, 0)``: only the positive part of an input takes part, the
  excitation is a non-negative distribution at every layer and never exceeds the top signal;
  a unit with ``z⁺ < ε`` passes nothing on.  At the input image only positive (normalised)
  pixel values receive signal.

ε is :func:`excitation_eps`: ``sqrt(finfo.tiny)`` of the compute dtype (≈ 1.1e-19 in float32,
1.5e-154 in float64).  Every rule computes in float32 at least: float16 / bfloat16 data are
promoted for the normalisation and the result cast back (with float16's own ε, 7.8e-3, small
units would lose all their signal).

Inside :class:`ExcitationBackpropContext`:

* ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d`` and ``F.linear`` (so ``nn.Conv*``,
  ``nn.ConvTranspose*`` and ``nn.Linear``), with positional or keyword arguments, use the rule
  with ``w⁺`` and no bias;
* ``F.avg_pool1d/2d/3d``, ``F.adaptive_avg_pool1d/2d/3d``, ``F.interpolate`` (nearest, linear,
  bilinear, trilinear, area), ``x.mean(dims)`` and ``x.sum(dims)`` over explicit dimensions use
  it with their own (positive) weights — so ``torch.stack([a, b]).sum(0)`` is a sum of ``a`` and
  ``b``.  A full reduction without ``dim`` (a score or a loss) keeps its gradient;
* sums of two activations — ``a + b``, ``out += identity``, ``torch.add`` (also with
  ``alpha > 0``), ``Tensor.add`` / ``add_``, ``a - α b`` with ``α < 0``, a broadcast operand
  that autograd follows — split the signal in proportion to each term, so torchvision's ResNet
  blocks work as they are written (no model surgery).  A parameter, a number or a smaller
  constant tensor is a bias: it takes no share;
* a scaling by a non-negative constant (``2 * b``, ``x / std`` with a constant ``std``) is a
  one-input unit with a positive weight: the signal passes unchanged where the output is
  excited, so ``a + 2 * b`` follows the weighted-sum rule;
* batch normalisation passes the signal through unchanged (the paper's networks have none; it
  is an affine re-scaling inside a neuron, before its activation);
* ReLU and max pooling keep their gradient (a unit with zero output receives no signal;
  max pooling routes the signal to the winner); the bounded rectifier ReLU6 (``nn.ReLU6``,
  ``F.relu6``, ``F.hardtanh(x, 0, b)``) passes the signal wherever its output is positive, the
  saturated side included;
* concatenation, stacking, indexing, reshapes and dropout in eval mode keep their gradient,
  which routes the signal.

**Not modeled** (a :class:`UnhandledOperationWarning` names them; they keep their plain
gradient, so the excitation can turn negative or exceed the top signal): subtracting or negating
an activation (``a - b``, ``x - x.mean(1)``, ``-x``, ``1 - x``, ``add(alpha<0)``), a negative
factor, ``abs``, products and quotients of two activations (gates, attention), matrix products
and ``einsum``, group / layer / instance / RMS normalisation and ``F.normalize``, bicubic
interpolation, and replaced calls run without autograd inside the block.  Non-linearities other
than rectifiers (GELU, SiLU ...) keep their gradient too and are reported with
:class:`~torchray_like.attribution.common.UnhandledActivationWarning`.

**What the context cannot see**: ``torch.compile(model)`` is explained through its original
module (the same map, computed eagerly); compiled sub-modules and TorchScript
(``torch.jit.script`` / ``trace``) modules run operations the context cannot see, and the
wrappers refuse them with a :class:`ValueError` saying what to pass instead.
``torch.utils.checkpoint(use_reentrant=False)`` recomputes the forward pass during backward,
outside the context: inside the context it raises a :class:`RuntimeError` at once.  Calls made
inside a custom :class:`torch.autograd.Function` (a reentrant checkpoint included) run without
autograd and keep the Function's own backward: the context warns (``no_grad`` in
:class:`UnhandledOperationWarning`); the wrappers refuse a reentrant checkpoint that the
backward pass goes through with a :class:`ValueError` (``torch.autograd.grad`` cannot
differentiate it).

Contrastive excitation backprop (paper Sec. 3.3): the *dual* of the target output unit has the
negated classifier weights; its MWP is subtracted from the target's at the contrast layer, the
difference continues down with the excitation rules, and the map keeps its positive part.  The
rules are linear in the top signal, so this equals the difference of the two full excitation
maps: the contrast layer only saves a second backward pass below it — provided it cuts the
network (every path from the saliency layer to the output passes through it), which is checked.

The saliency map of a layer is the excitation **summed over channels**: the marginal winning
probability of a location (:func:`gradient_to_excitation_backprop_saliency`).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .arguments import check_flag
from .context import RuleContext, TorchRayDifferenceWarning, UnhandledActivationWarning
from .driver import SaliencyDebug, detach_all, forward_pass, strip_compiled_prefix
from .engine import saliency
from .excitation_contrast import (
    ClassifierCalls,
    check_contrast_cuts,
    check_contrast_layers,
    contrast_signal,
    is_input_layer,
    propagate,
)
from .excitation_handlers import UNMODELED_HINTS, ExcitationHandlers
from .excitation_rules import excitation_eps
from .maps import SizeType, check_resize_mode, check_smooth, finish_map, saliency_gradient
from .reporting import warn_caller
from .rules import UNHANDLED_NODES
from .state import check_model, unwrap_compiled
from .targets import TargetType, get_backward_gradient
from .tokens import layer_tokens, tokens_to_map

__all__ = [
    "ExcitationBackpropContext",
    "excitation_backprop",
    "contrastive_excitation_backprop",
    "gradient_to_excitation_backprop_saliency",
    "gradient_to_contrastive_excitation_backprop_saliency",
    "excitation_to_saliency",
    "excitation_eps",
    "UnhandledOperationWarning",
    "EltwiseSum",
    "EltwiseSumFunction",
    "eltwise_sum",
    "update_resnet",
    "warn_if_torchray_differs",
]

Layer = Union[str, nn.Module, None]


class UnhandledOperationWarning(UnhandledActivationWarning):
    """The model calls operations excitation backprop does not model (``a - b``, ``abs``,
    group / layer normalisation, products of activations ...).

    They keep their plain gradient, so the excitation can become negative or exceed the top
    signal: the map is no longer a winning probability.  A subclass of
    :class:`~torchray_like.attribution.common.UnhandledActivationWarning`, so filters on that
    class apply to it too.
    """


# ---------------------------------------------------------------------------------------------
# The context
# ---------------------------------------------------------------------------------------------

class ExcitationBackpropContext(RuleContext):
    """Inside this context, backpropagation computes excitation (marginal winning probability).

    Zhang et al. 2016 (arXiv 1608.00507).  Every convolution, transposed convolution, linear
    layer, average pooling, interpolation, sum / mean over dimensions, scaling by a positive
    constant and sum of activations the model calls — as a module, a functional call with
    positional or keyword arguments, or a tensor method — gets the excitation rule in backward;
    batch normalisation passes the signal through; ReLU6 passes it where its output is positive;
    everything else keeps its gradient (see the module docstring for the rules, the ε guarding
    divisions and what is not modeled).  Forward values are exactly PyTorch's, in-place
    additions stay in place.  Thread-local, nestable, removed on exit also when the block raises
    (see :class:`~torchray_like.attribution.common.RuleContext`).

    The gradient of an input (or of a probed layer) computed from a forward pass run inside the
    context is its excitation: on a network with non-negative activations it is a distribution
    that sums to the top signal.  Parameters get no gradient from nodes the context replaced;
    changing a weight in place between the forward pass and backward is a ``RuntimeError``.

    Operations the rules do not model are listed in :attr:`unmodeled` and reported with an
    :class:`UnhandledOperationWarning` when a backward pass goes through them (reading a layer
    above them is fine).  ``torch.utils.checkpoint(use_reentrant=False)`` inside the block
    raises a ``RuntimeError`` (its recomputation would run outside the rules).  The context
    cannot see inside ``torch.compile``'d or TorchScript modules: use the original modules (the
    wrappers check this).

    Cost: nothing in the forward pass beyond routing the calls; in backward, each convolution
    above the layer read computes ``op(r(x), w⁺)`` besides the transposed operation the plain
    gradient needs (so about one extra forward pass of those layers), and linear layers build
    ``w⁺`` block by block instead of copying their weights.  An in-place residual sum
    (``out += identity``) that autograd follows copies ``out`` first, since backward needs its
    value and ``out`` is usually rectified in place next.  Calls that autograd does not record
    run the plain operation; replaced calls that backward does not reach (below the layer read)
    cost nothing in backward.

    Parameters
    ----------
    enable : bool
        ``False`` makes the context do nothing (the plain gradient), as TorchRay's.
    debug : bool
        Print one line per excitation node during backward: the signal it received and the
        signal it passed on (where the signal is lost or created).
    signed : bool, keyword-only
        The input rule: ``True`` (default) lets inputs keep their sign, as the authors'
        reference code and TorchRay do; ``False`` uses their positive parts, which keeps the
        excitation a non-negative distribution.  Both agree on non-negative inputs.

    Attributes
    ----------
    counts : dict
        Replaced calls by kind: ``conv``, ``conv_transpose``, ``linear``, ``avg_pool``,
        ``adaptive_avg_pool``, ``interpolate``, ``mean``, ``sum_dims``, ``sum``, ``scale``,
        ``batch_norm``, ``relu6``; calls of those kinds that autograd does not record are in
        ``skipped``.
    unmodeled : dict
        Operations autograd records that the rules do not model, with their count.
    affine_calls : list of int
        Forward-order indices of the convolution / linear calls of the last forward pass.

    Examples
    --------
    >>> x.requires_grad_(True)                             # doctest: +SKIP
    >>> with ExcitationBackpropContext():
    ...     y = model(x)
    ...     y[0, category_id].backward()
    >>> excitation = x.grad           # sums to 1 over a non-negative input
    """

    replaces = "convolution, linear, average-pooling or residual-sum"
    requirement = "a model made of convolutions / linear layers"
    report_other_activations = True
    # The node kinds of those activations: the ones on the path from the output to the tensor
    # read are named even when made where the context could not see them, the others (below a
    # layer read) are not (:meth:`~.context.RuleContext.check_path`).
    unhandled_kinds = UNHANDLED_NODES

    refuses_checkpoints = "excitation backprop"

    def __init__(self, enable: bool = True, debug: bool = False, *, signed: bool = True) -> None:
        super().__init__()
        # ("no" or 0.5 would be truthy: a TypeError naming the flag instead.)
        self.enable = check_flag(enable, "ExcitationBackpropContext: enable")
        self.debug = check_flag(debug, "ExcitationBackpropContext: debug")
        self.signed = check_flag(signed, "ExcitationBackpropContext: signed")
        self._rules = ExcitationHandlers(self.count, self.skip, self._warn_unmodeled,
                                         signed=self.signed, debug=self.debug)
        if self.enable:
            self.handlers.update(self._rules.table())
        self._warned: set = set()

    @property
    def affine_calls(self) -> List[int]:
        return self._rules.affine_calls

    @property
    def unmodeled(self) -> dict:
        return dict(self._rules.unmodeled)

    @property
    def applied(self) -> int:
        """How many times backward went through a node this context replaced (ever).

        Read it before and after a backward pass: no increase means no replaced call lies
        between the differentiated tensor and the output, so the gradient is the plain one.
        """
        return self._rules.applied

    def __enter__(self):
        if not self.enable:
            return self
        out = super().__enter__()
        self._rules.reset()
        self._warned = set()
        return out

    def __exit__(self, exc_type, exc_val, exc_tb):
        if not self.enable:
            return False
        super().__exit__(exc_type, exc_val, exc_tb)
        if exc_type is None and "no_grad" in self._rules.unmodeled:
            self._warn_unmodeled("no_grad", stacklevel=3)
        return False

    def _warn_unmodeled(self, name: str, stacklevel: int = 2) -> None:
        """Warn (once per operation and forward pass) that a backward pass went through an
        operation the rules do not model — or, for ``no_grad``, that the forward pass made
        replaced calls without autograd."""
        if name in self._warned:
            return
        self._warned.add(name)
        count = self._rules.unmodeled.get(name, 0)
        if name in UNMODELED_HINTS:
            what = f"{name} ×{count}: {UNMODELED_HINTS[name]}"
        else:
            what = (f"{name} ×{count} in the forward pass, and backpropagation goes through "
                    "it; it keeps its plain gradient, so the excitation can be negative or "
                    "exceed the top signal and the map is not a winning probability. Read the "
                    "map below it (a saliency layer closer to the output), or write it as a "
                    "sum with non-negative weights")
        warnings.warn(
            f"{type(self).__name__}: the model calls an operation excitation backprop does not "
            f"model ({what}).", UnhandledOperationWarning, stacklevel=stacklevel)


# ---------------------------------------------------------------------------------------------
# TorchRay's names for residual sums (no model surgery needed here)
# ---------------------------------------------------------------------------------------------


def _sum_terms(terms) -> torch.Tensor:
    if len(terms) > 1 and all(t.shape == terms[0].shape for t in terms):
        return torch.stack(terms).sum(0)  # one node: P_k = r(a_k) / Σ_l r(a_l) · P
    return functools.reduce(torch.add, terms)


class EltwiseSumFunction(torch.autograd.Function):
    """``inputs[0] + inputs[1] + …`` whose backward is the excitation sum rule under
    :class:`ExcitationBackpropContext`.

    TorchRay's function for the residual sums of ResNet blocks.  Made inside an active context
    (in this thread), its backward splits the signal in proportion to the terms,
    ``P_k = r(a_k) / Σ_l r(a_l) · P``, with the context's input rule; made outside, it is a
    plain sum (each input receives the whole gradient).  The forward pass computes the sum on
    copies of the inputs as the context sees it, and the backward pass differentiates that.
    The context already applies this rule to ``a + b`` itself, so models need not call it.
    """

    @staticmethod
    def forward(ctx, *inputs):
        """The sum of ``inputs`` (as the active context, if any, computes it)."""
        if not inputs:
            raise ValueError("EltwiseSumFunction: at least one input is required")
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
            out = _sum_terms(leaves)
        ctx.leaves, ctx.out = leaves, out
        return out.detach()

    @staticmethod
    def backward(ctx, p):
        """Each input's share of ``p`` (the whole of it for a plain sum)."""
        return torch.autograd.grad(ctx.out, ctx.leaves, p, retain_graph=True,
                                   allow_unused=True)


def eltwise_sum(*inputs: torch.Tensor) -> torch.Tensor:
    """The sum of ``inputs`` with the excitation sum rule (:class:`EltwiseSumFunction`)."""
    return EltwiseSumFunction.apply(*inputs)


class EltwiseSum(nn.Module):
    """A module summing its inputs: ``EltwiseSum()(a, b) == a + b``.

    TorchRay's module for ResNet's residual sums.  Under :class:`ExcitationBackpropContext` its
    backward follows the sum rule; elsewhere it is a plain sum.  Not needed here: the context
    handles ``a + b`` and ``out += identity`` directly.
    """

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return eltwise_sum(*inputs)


def update_resnet(model: nn.Module, debug: bool = False) -> nn.Module:
    """Return ``model`` unchanged: TorchRay's ResNet surgery is not needed here.

    TorchRay replaces the ``+`` of torchvision's ResNet blocks by :class:`EltwiseSum` so that
    excitation backprop splits the signal at residual sums.  :class:`ExcitationBackpropContext`
    applies the sum rule to ``a + b`` / ``out += identity`` wherever the model calls them, so the
    model is returned as it is (not copied, not modified).  ``debug`` prints a note saying so.
    """
    check_model(model)
    if debug:
        print(f"update_resnet: {type(model).__name__} returned unchanged — "
              "ExcitationBackpropContext handles residual sums without model surgery")
    _CONVERTED.add(model)  # TorchRay's numbers now equal ours: no difference warning
    return model


# The models passed through update_resnet (weakly held: never kept alive, never modified).
_CONVERTED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------


def gradient_to_excitation_backprop_saliency(x: torch.Tensor) -> torch.Tensor:
    """Channel-flattened excitation map: the **sum** over channels of ``x.grad``.

    The excitation of a unit is the probability that it is a winner; the probability that a
    location wins is the sum over its channels (Zhang et al. 2016).  ``x`` is
    ``(N, C, *spatial)`` with a ``.grad``; the map is ``(N, 1, *spatial)``.
    """
    grad = saliency_gradient(x, "gradient_to_excitation_backprop_saliency")
    return grad.sum(dim=1, keepdim=True)


def gradient_to_contrastive_excitation_backprop_saliency(x: torch.Tensor) -> torch.Tensor:
    """Contrastive map: the positive part of the channel sum of ``x.grad``."""
    grad = saliency_gradient(x, "gradient_to_contrastive_excitation_backprop_saliency")
    return grad.sum(dim=1, keepdim=True).clamp_(min=0)


#: Our earlier name for :func:`gradient_to_excitation_backprop_saliency`.
excitation_to_saliency = gradient_to_excitation_backprop_saliency


# ---------------------------------------------------------------------------------------------
# Excitation backprop
# ---------------------------------------------------------------------------------------------


def excitation_backprop(model: nn.Module, input: torch.Tensor, target: TargetType,
                        saliency_layer: Layer = "", resize: SizeType = False,
                        resize_mode: str = "bilinear", smooth: float = 0,
                        gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] =
                        gradient_to_excitation_backprop_saliency,
                        get_backward_gradient: Callable[[torch.Tensor, TargetType],
                                                        torch.Tensor] = get_backward_gradient,
                        debug: bool = False, *,
                        context_builder: Optional[Callable[[], Any]] = None,
                        signed: bool = True
                        ) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """Excitation-backprop saliency map (Zhang et al. 2016, arXiv 1608.00507).

    The excitation (marginal winning probability) of ``target`` at the output of
    ``saliency_layer``, summed over channels.

    Parameters
    ----------
    model : torch.nn.Module
        The network (any mix of convolutions, linear layers, pooling, residual sums,
        concatenations, batch norm and ReLU; no changes needed).  ``torch.compile(model)`` is
        explained through its original module; TorchScript or compiled sub-modules are refused
        (a :class:`ValueError` says what to pass instead).
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The output unit(s) to explain; see
        :func:`~torchray_like.attribution.common.get_backward_gradient`.  The top signal is the
        seed (one at the target class), so each sample's map sums to one on networks with
        non-negative activations.
    saliency_layer : str or torch.nn.Module, optional
        Layer whose output excitation is read; ``""`` / ``None`` means the input.  The paper
        reads intermediate layers (e.g. a VGG pooling layer, a ResNet stage).
    resize, resize_mode, smooth, get_backward_gradient, debug
        As in :func:`~torchray_like.attribution.common.saliency`.
    gradient_to_saliency : callable
        Flattening of the excitation; the default sums over channels.
    context_builder : callable, keyword-only
        Builds the context (TorchRay's keyword); default
        ``ExcitationBackpropContext(signed=signed)``.
    signed : bool, keyword-only
        The input rule (see :class:`ExcitationBackpropContext`): ``True`` (default, the authors'
        and TorchRay's) or ``False`` (positive parts: a non-negative map).

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *spatial)`` maps (non-negative when ``signed=False`` or on non-negative
        activations).

    Raises
    ------
    ValueError
        For a model in which the context replaced nothing (no convolution, linear layer,
        average pooling or residual sum), a compiled or scripted model, an unknown layer, a
        wrong target.
    """
    built: List[ExcitationBackpropContext] = []
    if context_builder is None:
        def context_builder() -> ExcitationBackpropContext:
            built.append(ExcitationBackpropContext(signed=signed))
            return built[-1]
    result = saliency(model, input, target, saliency_layer=saliency_layer, resize=resize,
                      resize_mode=resize_mode, smooth=smooth, context_builder=context_builder,
                      gradient_to_saliency=gradient_to_saliency,
                      get_backward_gradient=get_backward_gradient, debug=debug)
    if built:
        warn_if_torchray_differs(built[-1], model)
    return result


def warn_if_torchray_differs(context: ExcitationBackpropContext, model: nn.Module) -> None:
    """A :class:`~.context.TorchRayDifferenceWarning` when the context split the signal of
    residual sums written with ``+`` (proportionally to their terms, as the paper's rule for a
    sum node): TorchRay passes such a sum's signal unchanged to both terms unless the model was
    converted with :func:`update_resnet`, so its map differs there (0.57 relative difference on
    ResNet-18, 0.87 for the contrastive variant).  Models passed through :func:`update_resnet`
    do not warn, nor do sums made by :class:`EltwiseSum` (one stacked sum, counted apart)."""
    sums = context.counts.get("sum", 0)
    if sums > 0 and model not in _CONVERTED:
        warn_caller(
            f"excitation backprop split the signal of {sums} residual sum(s) written with '+' "
            "in proportion to their terms (the winning-probability rule of a sum node); "
            "TorchRay passes the signal of such a sum unchanged to both terms unless the model "
            "was converted with update_resnet(model) first, so TorchRay's map of this model "
            "differs (TorchRay with update_resnet gives ours). See 'Coming from TorchRay'.",
            TorchRayDifferenceWarning)


# ---------------------------------------------------------------------------------------------
# Contrastive excitation backprop
# ---------------------------------------------------------------------------------------------


def contrastive_excitation_backprop(
        model: nn.Module, input: torch.Tensor, target: TargetType,
        saliency_layer: Layer, contrast_layer: Layer, classifier_layer: Layer = None,
        resize: SizeType = False, resize_mode: str = "bilinear",
        get_backward_gradient: Callable[[torch.Tensor, TargetType],
                                        torch.Tensor] = get_backward_gradient,
        debug: bool = False, *, smooth: float = 0, signed: bool = True
        ) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """Contrastive excitation-backprop saliency map (Zhang et al. 2016, Sec. 3.3).

    One forward pass inside :class:`ExcitationBackpropContext`; two backward passes from the
    output to ``contrast_layer``, for the target unit and for its *dual* (the classifier's
    weights negated, read at backward time — the model's weights are never modified); their
    difference continues down to ``saliency_layer`` with the excitation rules, is summed over
    channels and clamped at zero.

    Because the rules are linear in the top signal, the result equals the positive part of
    (target excitation − dual excitation) at ``saliency_layer``, whatever the contrast layer; the
    contrast layer only bounds the part of the network traversed twice.  It must cut the
    network: every path from ``saliency_layer`` to the output passes through it (e.g. a whole
    ResNet stage or block, not a convolution inside a residual block, whose identity path goes
    around it); otherwise a :class:`ValueError` is raised.

    Parameters
    ----------
    model, input, target
        As in :func:`excitation_backprop`.
    saliency_layer : str or torch.nn.Module
        Layer whose output is read (``""`` / ``None``: the input).
    contrast_layer : str or torch.nn.Module
        Layer between ``saliency_layer`` and the classifier where the dual's excitation is
        subtracted (e.g. ``"layer4"`` for a ResNet, ``"features.30"`` for VGG16).
    classifier_layer : str or torch.nn.Module, optional
        Module holding the classifier whose weights the dual negates: its last convolution or
        linear call.  ``None``: the last convolution / linear call of the forward pass (the
        layer producing the logits in torchvision classifiers).
    resize, resize_mode, get_backward_gradient, debug
        As in :func:`~torchray_like.attribution.common.saliency`; ``debug`` returns the
        contrastive excitation (before the channel sum) as the gradient.
    smooth : float, keyword-only
        As in :func:`~torchray_like.attribution.common.saliency`.
    signed : bool, keyword-only
        The input rule, as in :func:`excitation_backprop`.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        ``(N, 1, *spatial)`` non-negative maps.
    """
    # Validation
    smooth = check_smooth(smooth)
    check_resize_mode(resize_mode)  # also when the map keeps its size
    debug = check_flag(debug, "debug")
    check_model(model)
    # torch.compile(model) is explained through its original module, as every method does.
    model = unwrap_compiled(model)
    saliency_layer, contrast_layer, classifier_layer = (
        strip_compiled_prefix(layer, model)
        for layer in (saliency_layer, contrast_layer, classifier_layer))
    classifier_module = check_contrast_layers(model, saliency_layer, contrast_layer,
                                               classifier_layer)
    layers = {"saliency_layer": saliency_layer, "contrast_layer": contrast_layer}
    # Set-up: one forward pass inside the context, recording the classifier's calls.
    context = ExcitationBackpropContext(signed=signed)
    with ClassifierCalls(classifier_module, context) as classifier_calls, forward_pass(
            model, input, target, layers, context, get_backward_gradient) as fp:
        check_contrast_cuts(fp, saliency_layer, contrast_layer)
        classifier = classifier_calls.last(classifier_layer, model)
        # The two passes: target minus dual at the contrast layer, then on down.
        contrast = contrast_signal(fp, context, classifier, classifier_layer, contrast_layer)
        excitation = propagate(fp.reads["contrast_layer"], fp.reads["saliency_layer"],
                                contrast)
    # The result
    warn_if_torchray_differs(context, model)
    read = fp.reads["saliency_layer"].detach()
    if not is_input_layer(saliency_layer):
        # A transformer block's tokens on their patch grid, as every layer method reads them.
        read, excitation = tokens_to_map(layer_tokens(model, read, input, layer=saliency_layer),
                                        read, excitation)
    smap = excitation.sum(dim=1, keepdim=True).clamp_(min=0)
    smap = finish_map(input, smap, resize, resize_mode, smooth)
    if debug:
        return smap, SaliencyDebug(detach_all(fp.output), read, excitation.detach(),
                                   dict(context.counts))
    return smap
