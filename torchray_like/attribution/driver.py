r"""The driver every backpropagation method is built on.

:func:`saliency` plugs together a rule context (or none), a layer to read (the input, or a
:class:`~.probe.Probe` on a module), a seed gradient chosen by the target, a way to turn the read
(pseudo-)gradient into a map, a resize and an optional smoothing.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn

from .context import NullContext, RuleContext, UnhandledActivationWarning
from .maps import SizeType, check_smooth, finish_map, gradient_to_saliency
from .probe import Probe, get_module, layer_label, single_call
from .state import check_input, check_model, model_state_guard
from .targets import TargetType, backward_seed, get_backward_gradient

__all__ = ["saliency", "SaliencyDebug", "ForwardPass", "forward_pass"]


@dataclass
class SaliencyDebug:
    """What :func:`saliency` returns beside the map when ``debug=True``.

    Attributes
    ----------
    output : Any
        The model output (detached).
    activation : torch.Tensor
        The tensor read: the input, or the probed layer's output / input (detached).
    gradient : torch.Tensor
        Its (pseudo-)gradient.
    counts : dict
        What the rule context replaced (empty without a context).
    """

    output: Any
    activation: torch.Tensor
    gradient: torch.Tensor
    counts: Dict[str, int] = field(default_factory=dict)


def detach_all(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: detach_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detach_all(v) for v in value)
    return value


def is_input(layer: Any) -> bool:
    return layer is None or (isinstance(layer, str) and layer == "")


@dataclass
class ForwardPass:
    """One forward pass made by :func:`forward_pass`, ready to differentiate.

    Attributes
    ----------
    x : torch.Tensor
        The leaf the model ran on (a detached alias of the caller's input; it requires grad
        only when a reading is the input).
    output : Any
        The model output.
    scores : torch.Tensor
        The tensor to differentiate (the output, or the callable target's scores).
    seed : torch.Tensor
        Its seed gradient.
    context : Any
        The context the forward ran in.
    reads : dict
        Label → the tensor read (the input ``x``, or the single recorded call of a layer).
    """

    x: torch.Tensor
    output: Any
    scores: torch.Tensor
    seed: torch.Tensor
    context: Any
    reads: Dict[str, torch.Tensor]
    layers: Dict[str, Any]

    def grad(self, label: str, retain_graph: bool = False) -> torch.Tensor:
        """``∂(seed · scores) / ∂ reads[label]`` (under the context's rules)."""
        (grad,) = torch.autograd.grad(self.scores, self.reads[label], self.seed,
                                      retain_graph=retain_graph, allow_unused=True)
        if grad is None:
            layer = self.layers[label]
            where = "the input" if is_input(layer) else f"{label} {layer_label(layer)}"
            raise ValueError(f"the target scores do not depend on {where}")
        return grad


@contextlib.contextmanager
def forward_pass(model: nn.Module, input: torch.Tensor, target: TargetType,
                 layers: Dict[str, Union[str, nn.Module, None]], context: Any = None,
                 get_backward_gradient: Callable = get_backward_gradient
                 ) -> Iterator[ForwardPass]:
    """Run ``model(input)`` as every backprop method does and yield a :class:`ForwardPass`.

    Checks the model, input and target; inside :func:`model_state_guard` (eval mode, frozen
    parameters, all restored on exit) and with autograd enabled, probes each layer of ``layers``
    (label → name, module, or ``None``/``""`` for the input), runs the forward pass inside
    ``context`` and computes the seed.  A :class:`RuleContext` that replaced nothing raises a
    :class:`ValueError`.  Probes are removed on exit, also when the body raises.

    Backpropagation from ``scores`` reaches only what the readings need: parameters are frozen
    and the input requires grad only when it is read, so a probed layer is a leaf of the graph.
    """
    check_model(model)
    check_input(input)
    modules = {label: None if is_input(layer) else get_module(model, layer)
               for label, layer in layers.items()}
    if target is None:
        backward_seed(None, None, 0)  # raises the explanation before any work
    batch = input.shape[0]
    probes: Dict[str, Probe] = {}
    with model_state_guard(model), torch.enable_grad():
        x = input.detach().requires_grad_(any(m is None for m in modules.values()))
        try:
            for label, module in modules.items():
                if module is not None:
                    probes[label] = Probe(module, "output", this_thread_only=True)
            if context is None:
                context = NullContext()
            if isinstance(context, RuleContext):
                context.warn_if_unused = False
            with context:
                output = model(x)
            if isinstance(context, RuleContext):
                check_context_used(context, model)
            reads = {label: x if module is None else single_call(probes[label], label,
                                                                  layers[label])
                     for label, module in modules.items()}
            scores, seed = backward_seed(output, target, batch, get_backward_gradient)
            if not scores.requires_grad:
                where = " or ".join(
                    "the input" if m is None else f"{label} {layer_label(layers[label])}"
                    for label, m in modules.items())
                raise ValueError(
                    f"the model output does not depend on {where} through autograd (is the "
                    "layer on the path to the output? does the model detach its activations or "
                    "run under torch.no_grad()?)")
            yield ForwardPass(x, output, scores, seed, context, reads, dict(layers))
        finally:
            for probe in probes.values():
                probe.remove()


def saliency(model: nn.Module, input: torch.Tensor, target: TargetType,
             saliency_layer: Union[str, nn.Module, None] = None,
             resize: SizeType = False, resize_mode: str = "bilinear", smooth: float = 0,
             context_builder: Optional[Callable[[], Any]] = None,
             gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] = gradient_to_saliency,
             get_backward_gradient: Callable = get_backward_gradient,
             debug: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, SaliencyDebug]]:
    """Backpropagation saliency: the driver every backprop method is built on.

    Runs ``model(input)`` inside ``context_builder()`` (a rule context, or nothing for the plain
    gradient), backpropagates the seed chosen by ``target`` down to the tensor read — the input,
    or the output of ``saliency_layer`` — and turns that tensor's (pseudo-)gradient into a map
    with ``gradient_to_saliency``.

    Parameters
    ----------
    model : torch.nn.Module
        The network.  It runs in eval mode with frozen parameters for the call; every
        sub-module's ``training`` flag and every parameter's ``requires_grad`` and ``.grad`` are
        restored afterwards, also when the model raises.
    input : torch.Tensor
        ``(N, C, *spatial)`` floating-point batch (1-D, 2-D or 3-D data).  It is not modified:
        its ``requires_grad`` and ``.grad`` stay as they were.
    target : int, sequence, torch.Tensor or callable
        See :func:`get_backward_gradient`; a callable maps the model output (tensor, tuple or
        dict) to ``(N,)`` scores to explain.
    saliency_layer : str or torch.nn.Module, optional
        Module whose output is read (a dotted name or the module).  ``None`` or ``""`` (TorchRay)
        means the input.  Backpropagation stops at that tensor.
    resize : bool, int or tuple
        See :func:`resize_saliency`.
    resize_mode : str
        Interpolation mode (the linear family adapts to the rank).
    smooth : float
        If positive, Gaussian smoothing with ``sigma = smooth * max(spatial size)`` of the
        (resized) map.
    context_builder : callable, optional
        Returns the context to run the forward in (e.g. ``GuidedBackpropContext``).  If it is a
        :class:`RuleContext` that replaced nothing, a :class:`ValueError` is raised rather than
        returning the plain gradient under the method's name.
    gradient_to_saliency : callable
        Turns the read tensor (with ``.grad``) into ``(N, 1, *spatial)`` maps.
    get_backward_gradient : callable
        ``(output, target) -> seed`` (e.g. :func:`get_pointing_gradient`).
    debug : bool
        Also return a :class:`SaliencyDebug` with the output, the activation and its gradient.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SaliencyDebug)
        The map ``(N, 1, *spatial)`` (detached, on the input's device).
    """
    smooth = check_smooth(smooth)
    context = context_builder() if context_builder is not None else None
    with forward_pass(model, input, target, {"saliency_layer": saliency_layer}, context,
                      get_backward_gradient) as fp:
        read = fp.reads["saliency_layer"]
        grad = fp.grad("saliency_layer")
        read.grad = grad
        try:
            smap = gradient_to_saliency(read)
        finally:
            read.grad = None
    smap = finish_map(input, smap, resize, resize_mode, smooth)
    if debug:
        return smap, SaliencyDebug(detach_all(fp.output), read.detach(), grad.detach(),
                                   dict(getattr(fp.context, "counts", {})))
    return smap


def check_context_used(context: RuleContext, model: nn.Module) -> None:
    if context.replaced == 0:
        raise ValueError(
            f"{type(context).__name__} replaced no {context.replaces} in "
            f"{type(model).__name__}'s forward pass, so the result would be the plain gradient; "
            f"this method needs {context.requirement}" + (
                f" — the model uses {', '.join(sorted(context.unhandled))} instead"
                if context.unhandled else ""))
    if context.unhandled:
        seen = ", ".join(f"{k} ×{v}" for k, v in sorted(context.unhandled.items()))
        warnings.warn(
            f"{type(context).__name__}: {type(model).__name__} also calls non-linearities the "
            f"rule does not cover ({seen}); those keep their plain gradient.",
            UnhandledActivationWarning, stacklevel=5)
