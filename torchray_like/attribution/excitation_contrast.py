r"""Contrastive excitation backprop's machinery (Zhang et al. 2016, Sec. 3.3).

The checks of the three layers (saliency, contrast, classifier) and of the cuts the contrast
needs (:func:`check_contrast_layers`, :func:`check_contrast_cuts`, :func:`graph_reaches`), the
recording of the classifier's calls (:class:`ClassifierCalls`), the contrast signal at the
contrast layer — the target's excitation minus the dual unit's, whose classifier weights are
negated (:func:`contrast_signal`) — and its propagation down to the saliency layer
(:func:`propagate`), for
:func:`~torchray_like.attribution.excitation_backprop.contrastive_excitation_backprop`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .probe import get_module, layer_label
from .state import autograd_grad

if TYPE_CHECKING:  # the context's module imports this one
    from .excitation_backprop import ExcitationBackpropContext

__all__ = ["is_input_layer", "where", "check_contrast_layers", "check_contrast_cuts",
           "graph_reaches", "ClassifierCalls", "contrast_signal", "propagate", "Layer"]

Layer = Union[str, nn.Module, None]


def is_input_layer(layer: Layer) -> bool:
    return layer is None or (isinstance(layer, str) and layer == "")


def where(layer: Layer) -> str:
    return "the input" if is_input_layer(layer) else f"saliency_layer {layer_label(layer)}"


def check_contrast_layers(model: nn.Module, saliency_layer: Layer, contrast_layer: Layer,
                           classifier_layer: Layer) -> Optional[nn.Module]:
    """Check the three layers exist and differ; return the classifier module (or None)."""
    if is_input_layer(contrast_layer):
        raise ValueError(
            "contrastive_excitation_backprop: contrast_layer is required — a layer between "
            "saliency_layer and the classifier, e.g. 'layer4' for a ResNet or 'features.30' for "
            "VGG16")
    contrast = get_module(model, contrast_layer)
    if not is_input_layer(saliency_layer) and get_module(model, saliency_layer) is contrast:
        raise ValueError(
            f"contrast_layer {layer_label(contrast_layer)} is the saliency_layer: it must be "
            "above it (closer to the output)")
    return None if is_input_layer(classifier_layer) else get_module(model, classifier_layer)


def check_contrast_cuts(fp: Any, saliency_layer: Layer, contrast_layer: Layer) -> None:
    """The contrast layer lies between the saliency layer and the output, and every path from
    the saliency layer to the output passes through it (the autograd graph of the pass)."""
    sal, con = fp.reads["saliency_layer"], fp.reads["contrast_layer"]
    if not graph_reaches(con, sal):
        raise ValueError(
            f"contrast_layer {layer_label(contrast_layer)} does not depend on "
            f"{where(saliency_layer)}: the contrast layer must be above the saliency layer "
            "(closer to the output)")
    if not graph_reaches(fp.scores, con):
        raise ValueError(
            f"the target scores do not depend on contrast_layer {layer_label(contrast_layer)}")
    if graph_reaches(fp.scores, sal, avoid=con):
        raise ValueError(
            f"contrast_layer {layer_label(contrast_layer)} does not cut the network: the output "
            f"also depends on {where(saliency_layer)} through paths that go around it (e.g. "
            "the identity connection around a layer inside a residual block), whose signal "
            "would be lost. Choose a layer that every path to the output passes through — a "
            "whole block or stage (e.g. 'layer4' or 'layer4.0' rather than 'layer4.0.conv2')")


def graph_reaches(start: torch.Tensor, goal: torch.Tensor,
                   avoid: Optional[torch.Tensor] = None) -> bool:
    """Whether the autograd graph of ``start`` reaches ``goal``, not going through ``avoid``."""

    def node_of(t: torch.Tensor) -> Tuple[Any, Optional[torch.Tensor]]:
        # A leaf has no grad_fn: its AccumulateGrad node is recognised by its variable.
        return (t.grad_fn, None) if t.grad_fn is not None else (None, t)

    goal_node, goal_leaf = node_of(goal)
    stop_node, stop_leaf = node_of(avoid) if avoid is not None else (None, None)
    if start is goal:
        return True
    stack = [start.grad_fn]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if node is goal_node or (goal_leaf is not None and variable is goal_leaf):
            return True
        if node is stop_node or (stop_leaf is not None and variable is stop_leaf):
            continue
        stack.extend(n for n, _ in node.next_functions)
    return False


class ClassifierCalls:
    """Forward hooks recording which convolution / linear calls of ``context`` the classifier
    module made (this thread); without a module, the classifier is the last such call."""

    def __init__(self, module: Optional[nn.Module], context: ExcitationBackpropContext) -> None:
        self.module = module
        self.context = context
        self.thread = threading.get_ident()
        self.start: Optional[int] = None
        self.indices: List[int] = []
        self.handles: List[Any] = []
        if module is not None:
            self.handles = [module.register_forward_pre_hook(self._pre),
                            module.register_forward_hook(self._post)]

    def _pre(self, module, inputs):
        if threading.get_ident() == self.thread:
            self.start = len(self.context.affine_calls)

    def _post(self, module, inputs, output):
        if threading.get_ident() == self.thread and self.start is not None:
            self.indices.extend(self.context.affine_calls[self.start:])
            self.start = None

    def last(self, classifier_layer: Layer, model: nn.Module) -> int:
        """The index of the call whose weights the dual unit negates."""
        if self.module is not None:
            if not self.indices:
                raise ValueError(
                    f"classifier_layer {layer_label(classifier_layer)} made no convolution or "
                    "linear call in the forward pass; name the module holding the classifier "
                    "weights")
            return self.indices[-1]
        if not self.context.affine_calls:
            raise ValueError(
                f"{type(model).__name__} makes no convolution or linear call: there is no "
                "classifier whose weights the dual unit could negate")
        return self.context.affine_calls[-1]

    def __enter__(self) -> "ClassifierCalls":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def contrast_signal(fp: Any, context: ExcitationBackpropContext, classifier: int,
                     classifier_layer: Layer, contrast_layer: Layer) -> torch.Tensor:
    """The target's excitation minus its dual's at the contrast layer: two backward passes
    from the output sharing every node's ``op⁺(r(x))`` but the negated classifier's."""
    cell = context._rules.cell
    contrast = fp.reads["contrast_layer"]
    try:
        cell.share_next_pass()
        target = fp.grad("contrast_layer", retain_graph=True)
        cell.negate_in_next_pass(classifier)
        (dual,) = autograd_grad(fp.scores, contrast, fp.seed)
        negated = cell.negated_used
    finally:
        cell.clear()
    if not negated:
        raise ValueError(
            "the classifier (" + ("the last convolution / linear call" if is_input_layer(
                classifier_layer) else f"classifier_layer {layer_label(classifier_layer)}") +
            f") is not between contrast_layer {layer_label(contrast_layer)} and the output, so "
            "the dual unit would equal the target; pass the module producing the scores as "
            "classifier_layer, or a lower contrast_layer")
    return target - dual  # (not in place: a pass-through graph may hand back the seed)


def propagate(contrast: torch.Tensor, read: torch.Tensor, signal: torch.Tensor
               ) -> torch.Tensor:
    """The excitation rules from the contrast layer's output down to the tensor read."""
    (grad,) = autograd_grad(contrast, read, signal)
    return grad
