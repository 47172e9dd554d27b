r"""Walks of the autograd graph: its nodes, what lies on a path between two tensors, what a
backward pass would reach — without computing any gradient (the rule contexts' checks, the
automatic layer's cut test, the reentrant-checkpoint check)."""

from __future__ import annotations

from typing import Any, Collection, Dict, Iterator, List, Sequence, Set

import torch

__all__ = ["gradient_node", "nodes_on_path", "depends_on", "graph_nodes", "ancestors", "cuts",
           "parameter_function"]


def gradient_node(tensor: torch.Tensor) -> Any:
    """The autograd node a gradient with respect to ``tensor`` is taken at (a tensor subclass's
    ``__torch_function__`` is not run: it would answer with a node of its own making, such as
    a view's)."""
    with torch._C.DisableTorchFunctionSubclass():
        return torch.autograd.graph.get_gradient_edge(tensor).node


def nodes_on_path(output: torch.Tensor, inputs: Sequence[torch.Tensor],
                  kinds: Collection[str]) -> List[Any]:
    """The autograd nodes of a kind in ``kinds`` (class names such as ``"ReluBackward0"``)
    that lie on a path from ``output`` back to one of ``inputs``.

    Those are exactly the nodes a backward pass from ``output`` to ``inputs`` goes through:
    nodes below an input, or on branches that reach no input, are left out.  Nodes made in any
    thread count, which is what a rule context cannot see.  One walk over the graph (tens of
    microseconds on a ResNet); the second walk, that decides which candidates lie on a path,
    runs only when candidates exist.
    """
    root = output.grad_fn
    stop_nodes = [gradient_node(t) for t in inputs
                  if isinstance(t, torch.Tensor) and t.requires_grad]
    if root is None or not stop_nodes:
        return []
    stops = {id(node) for node in stop_nodes}
    nodes = {}  # id -> node; holding the nodes keeps the ids unique
    found = []
    for node in graph_nodes(root, stops):
        nodes[id(node)] = node
        # Backward stops at an input: what lies below it is not on the path.
        if id(node) not in stops and type(node).__name__ in kinds:
            found.append(node)
    if not found:
        return []
    on_path = ancestors(nodes, stops)
    return [node for node in found if id(node) in on_path]


def depends_on(output: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether a backward pass from ``output`` reaches ``tensor`` (which requires grad): the
    answer of ``torch.autograd.grad(output, tensor, allow_unused=True) is not None`` from a walk
    of the graph (:func:`graph_nodes`), without computing any gradient."""
    root = output.grad_fn
    if root is None or not tensor.requires_grad:
        return False
    target = gradient_node(tensor)  # a leaf's AccumulateGrad, which graph_nodes leaves out
    return any(node is target or any(child is target for child, _ in node.next_functions)
               for node in graph_nodes(root))


def parameter_function(tensor: torch.Tensor, limit: int = 32) -> bool:
    """Whether ``tensor`` is computed from parameters alone: every leaf its autograd graph
    reaches is an ``nn.Parameter`` (and the graph has at most ``limit`` nodes).

    The weights that PyTorch's own tools compute in the forward pass are such tensors —
    ``torch.nn.utils.parametrizations`` (``weight_norm``, ``spectral_norm``, ``orthogonal``),
    ``torch.nn.utils.prune`` (``weight_orig * weight_mask``), quantization-aware training's
    fake-quantized weights — constants of the input like a parameter, not activations.  Their
    graphs have a few nodes; a larger graph (an activation, which reaches the input) answers
    ``False`` after ``limit`` nodes.
    """
    root = tensor.grad_fn
    if root is None:
        return isinstance(tensor, torch.nn.Parameter)
    seen = {id(root)}
    stack = [root]
    while stack:
        node = stack.pop()
        if type(node).__name__ == "AccumulateGrad":  # a leaf: a parameter, or the input
            if not isinstance(getattr(node, "variable", None), torch.nn.Parameter):
                return False
            continue
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen:
                if len(seen) >= limit:
                    return False
                seen.add(id(child))
                stack.append(child)
    return True


def graph_nodes(root: Any, stops: Collection[int] = ()) -> Iterator[Any]:
    """Every node of the autograd graph from ``root`` down, once each (depth first).

    Parameters' leaves (``AccumulateGrad``: half the nodes, and they lead nowhere) are left
    out; a node whose ``id`` is in ``stops`` is given, but nothing below it is visited.
    """
    seen = {id(root)}
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        if id(node) in stops:
            continue
        for child, _ in node.next_functions:
            if (child is not None and id(child) not in seen
                    and type(child).__name__ != "AccumulateGrad"):
                seen.add(id(child))
                stack.append(child)


def ancestors(nodes: Dict[int, Any], stops: Set[int], through_stops: bool = False) -> Set[int]:
    """The ids of the nodes from which a node of ``stops`` can be reached.

    By default the stops are included and nothing is reached through them (a stop's own
    inputs are below it).  With ``through_stops`` a stop counts only when another stop lies
    below it (the nodes a backward pass to several tensors read goes through)."""
    parents: Dict[int, List[int]] = {}
    for key, node in nodes.items():
        if key in stops and not through_stops:
            continue
        for child, _ in node.next_functions:
            if child is not None:
                parents.setdefault(id(child), []).append(key)
    reached: Set[int] = set() if through_stops else set(stops)
    frontier = list(stops)
    while frontier:
        for parent in parents.get(frontier.pop(), ()):
            if parent not in reached:
                reached.add(parent)
                frontier.append(parent)
    return reached


def cuts(roots: List[Any], stop: Any, leaf: Any) -> bool:
    """Whether every path of the autograd graph to the node ``leaf`` from each edge of
    ``roots`` that reaches the edge ``stop`` goes through it (``stop``: a module's output, as
    :func:`torch.autograd.graph.get_gradient_edge` gave it when the module returned it;
    in-place changes made later hang below their own nodes).  Outputs that do not depend on
    ``stop`` (another head) do not count."""
    def blocked(node: Any, nr: int) -> bool:
        return node is stop.node and nr == stop.output_nr

    for root in roots:
        stack = [root.node]
        seen = set()
        if blocked(root.node, root.output_nr):
            continue  # the output is the layer's own
        met = around = False
        while stack:
            node = stack.pop()
            if node is leaf:
                around = True
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            for nxt, nr in node.next_functions:
                if nxt is None:
                    continue
                if blocked(nxt, nr):
                    met = True
                else:
                    stack.append(nxt)
        if met and around:
            return False
    return True
