r"""A rectifier rule applied to the graph of a plain forward pass: the methods' fast path.

A :class:`~.rules.ReLUContext` sees every call the model makes, as a
:class:`~torch.overrides.TorchFunctionMode`: that is what lets it catch a rectifier however it is
written, and it is what the ``with`` block a user writes runs.  The price is a Python dispatch per
torch call of the forward pass and a Python autograd function per rectifier — a quarter to a
third of a short call's time on the embedded models (64², batch 1).

The methods (``guided_backprop``, ``deconvnet``, ``guided_grad_cam``, :func:`explain` ...) can
avoid it: they own the forward pass, and for a model whose graph holds nothing but ReLUs and
operations no rectifier rule touches, the rule can be put on the graph *after* a plain forward
pass, as a hook on each ``ReluBackward0`` node (:func:`attach_relu_rule`).  The forward pass is
then exactly the model's own, the backward pass PyTorch's plus one small kernel per ReLU.

Exactness: a graph qualifies only when every node on it is of a kind listed in
:data:`PLAIN_NODES` (convolutions, linear layers, pooling, batch norm, sums, views ...) or a
``ReluBackward0``; for such a graph the rule context would have replaced exactly the calls that
made the ``ReluBackward0`` nodes (every rectifier spelling the context knows besides ReLU —
ReLU6, ``clamp``, ``threshold``, ``where``, ``maximum`` — and every non-linearity it reports
makes a node outside the list), so both give the same numbers.  Anything else — an unknown
node, a custom :class:`torch.autograd.Function`, a compiled graph, a ``x * (x > 0)`` — and the
method runs its forward pass inside the context instead, as it always did.  Which models
qualify is learnt from a pass inside the context (:func:`learn`) and remembered per model; a
model that no longer qualifies is caught by the check of each call, and run inside the context
from then on (:func:`forget` lets it learn anew).

A rule qualifies when it can be written with the plain gradient through the ReLU: its class
defines :meth:`~.rules.ReLURule.backward_relu` next to (or below) its ``backward``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, List, Optional

import torch
import torch.nn as nn

from .autograd_graph import graph_nodes

__all__ = ["PLAIN_NODES", "RELU_NODE", "graph_capable", "relu_nodes", "attach_relu_rule",
           "learn", "qualifies", "disqualify", "forget"]

#: The autograd node of ``relu`` / ``relu_`` in every spelling (module, functional, method).
RELU_NODE = "ReluBackward0"

#: Autograd nodes no rectifier rule changes and no rule context reports: linear operations,
#: pooling, normalisation, shape changes, sums, the score's selection.  A graph of these and
#: ReLUs gets the rule from hooks on the ReLUs.  Deliberately short: what is missing only costs
#: speed (the forward pass then runs inside the context).
PLAIN_NODES = frozenset({
    "AccumulateGrad", "ConvolutionBackward0", "AddmmBackward0", "MmBackward0", "TBackward0",
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward1",
    "DivBackward0", "DivBackward1", "NegBackward0",
    "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0",
    "AvgPool2DBackward0", "AvgPool3DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveAvgPool3DBackward0", "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0",
    "MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1",
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0",
    "TransposeBackward0", "PermuteBackward0", "ExpandBackward0", "UnsqueezeBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3",
    "SqueezeBackward4", "CatBackward0", "StackBackward0", "SplitBackward0",
    "SplitWithSizesBackward0", "SelectBackward0", "SliceBackward0", "IndexBackward0",
    "GatherBackward0", "ToCopyBackward0",
})

#: Whether a model's forward passes qualified when last seen (model -> bool).
_QUALIFIED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def graph_capable(rule: Any) -> bool:
    """Whether ``rule`` can be applied from the plain gradient through a ReLU.

    True when the class that defines the rule's ``backward`` also defines (or inherits below
    it) ``backward_relu`` — a subclass overriding ``backward`` alone does not qualify, since the
    inherited ``backward_relu`` would not be its rule.
    """
    mro = type(rule).__mro__
    owner = {name: next((i for i, cls in enumerate(mro) if name in vars(cls)), None)
             for name in ("backward", "backward_relu")}
    return (owner["backward_relu"] is not None and owner["backward"] is not None
            and owner["backward_relu"] <= owner["backward"])


def _bool_operand(node: Any) -> Optional[bool]:
    """Whether a ``MulBackward0`` multiplies by a boolean mask (``x * (x > 0)``, a rectifier
    the context reports); ``None`` when its saved operands cannot be read."""
    try:
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                   for t in (getattr(node, "_saved_self", None),
                             getattr(node, "_saved_other", None)))
    except RuntimeError:  # freed, or a checkpoint's saved tensor: cannot tell
        return None


def _walk(output: torch.Tensor, accept: Callable[[Any, str], Optional[bool]]
          ) -> Optional[List[Any]]:
    """The nodes ``accept(node, kind)`` calls rectifiers (``True``), over the whole graph of
    ``output`` (:func:`~.context.graph_nodes`); ``None`` as soon as a node is neither a
    rectifier nor plain (``accept`` gives ``None``)."""
    if output.grad_fn is None:
        return None
    found = []
    for node in graph_nodes(output.grad_fn):
        verdict = accept(node, type(node).__name__)
        if verdict is None:
            return None
        if verdict:
            found.append(node)
    return found


def _plain(node: Any, kind: str) -> Optional[bool]:
    if kind in PLAIN_NODES:
        return False
    if kind == "MulBackward0" and _bool_operand(node) is False:
        return False
    return None


def _accept_plain_graph(node: Any, kind: str) -> Optional[bool]:
    return True if kind == RELU_NODE else _plain(node, kind)


def relu_nodes(output: torch.Tensor) -> Optional[List[Any]]:
    """The ``ReluBackward0`` nodes of ``output``'s graph, or ``None`` when the graph holds a
    node outside :data:`PLAIN_NODES` (or no ReLU at all)."""
    found = _walk(output, _accept_plain_graph)
    return found if found else None


def attach_relu_rule(nodes: Iterable[Any], cell: Any) -> int:
    """Make each ReLU node pass back ``cell.rule.backward_relu(plain, grad)``, counted in
    ``cell.applied``; returns the number of nodes.  The rule is read at backward time, so it can
    be switched between backward passes of one forward (``retain_graph``).  The hooks live on the
    nodes, and go with the graph."""
    def hook(grad_inputs, grad_outputs):
        plain, grad = grad_inputs[0], grad_outputs[0]
        if plain is None or grad is None:
            return None
        cell.applied += 1
        return (cell.rule.backward_relu(plain, grad),)

    n = 0
    for node in nodes:
        node.register_hook(hook)
        n += 1
    return n


def qualifies(model: nn.Module) -> bool:
    """Whether ``model``'s last pass inside a ReLU context showed a graph the hooks can serve."""
    return _QUALIFIED.get(model, False)  # (the methods refuse unhashable modules first)


def learn(model: nn.Module, output: torch.Tensor, counts: dict, unhandled: dict,
          function_class: type) -> None:
    """Remember whether ``model`` qualifies, from a forward pass inside a ReLU context.

    It does when the context replaced plain ReLUs only (no ReLU6, ``clamp``, ``where`` ...), saw
    no other non-linearity, and the graph holds nothing but the context's rectifier nodes
    (``function_class``) and :data:`PLAIN_NODES`.
    """
    if model in _QUALIFIED:
        return  # learnt already (a model that stopped qualifying is not walked each call)
    ok = set(counts) == {"relu"} and not unhandled

    def accept(node: Any, kind: str) -> Optional[bool]:
        if getattr(node, "_forward_cls", None) is function_class:
            return True
        return _plain(node, kind)

    if ok:
        ok = bool(_walk(output, accept))
    _QUALIFIED[model] = ok


def disqualify(model: nn.Module) -> None:
    """Run ``model``'s next passes inside the context: its graph stopped qualifying (it is not
    learnt again; :func:`forget` makes the next pass inside the context learn anew)."""
    _QUALIFIED[model] = False


def forget(model: nn.Module) -> None:
    """Forget what was learnt about ``model``: its next pass inside a ReLU context learns
    anew."""
    _QUALIFIED.pop(model, None)
