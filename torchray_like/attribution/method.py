r"""Backpropagation methods described once, as data.

A :class:`BackpropMethod` says everything that makes one method differ from another: the tensors
it reads (the saliency layer, or the input) and the backward rule that reaches each
(:class:`Read`), how the read tensors and their (pseudo-)gradients become a map, its default
layer (the input, or an automatic choice) and its default flattening.  From that one description
come

* the public function with TorchRay's signature and defaults (:meth:`BackpropMethod.function`),
* its entry in :data:`~torchray_like.attribution.registry.METHODS`,
* its place in :func:`~torchray_like.attribution.explain.explain`'s shared forward pass,

and every call, alone or shared, runs the one engine :func:`~.engine.run_jobs`, so a method can
never give another answer (or raise another error) inside ``explain`` than alone.  Adding a
backpropagation method is one module with one description, plus its line in the registry.

In the spirit of Zennit's rules and composites registered as data and TorchCAM's methods that
override one hook; no code is shared with either.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

import torch

from .context import NullContext
from .maps import ActivationMap, gradient_to_saliency
from .rules import GRADIENT_RULE, ReLURule
from .targets import get_backward_gradient

__all__ = ["Read", "Reading", "BackpropMethod", "SHARED_OPTIONS", "flatten_reading",
           "NO_CONTEXT_ARGUMENT", "description", "TOKENS_DOC"]

#: Options every description can honour inside :func:`explain`'s shared pass.
SHARED_OPTIONS = frozenset({"saliency_layer", "resize", "resize_mode", "smooth",
                            "gradient_to_saliency", "tokens"})

#: The ``tokens`` parameter every described method takes (keyword-only, after TorchRay's).
TOKENS_DOC = """    tokens : None, False, TokenLayout or callable, keyword-only
        How ``saliency_layer``'s output becomes an ``(N, C, *grid)`` map when it is a
        transformer block's token sequence ``(N, T, D)`` or a channels-last ``(N, h, w, C)``
        stage: ``None`` (default) infers it (class, distillation and register tokens dropped,
        patch tokens put on the patch grid of the input; see
        :mod:`~torchray_like.attribution.tokens`), ``False`` reads the tensor as it is, a
        :class:`~torchray_like.attribution.tokens.TokenLayout` says it, a callable
        ``tensor -> (N, C, *grid)`` does it (applied to the activation and to its gradient).
        A CNN layer's ``(N, C, *spatial)`` output is read as it is.
"""

_ABSENT = object()  # a description without a ``context_builder`` argument


@dataclass(frozen=True)
class Read:
    """One tensor a method reads, and the backward rule that reaches it.

    Attributes
    ----------
    rule : ReLURule
        The rectifier rule of the backward pass down to this tensor (the plain gradient by
        default).
    context : callable, optional
        Builds the rule context whose nodes apply ``rule`` (e.g. ``GuidedBackpropContext``);
        ``None`` for the plain gradient, which needs no context.
    at_layer : bool
        ``True``: the method's saliency layer (which may be the input); ``False``: the input.
    check_rules : bool
        Whether a backward pass that goes through none of the rule's nodes is an error (the
        result would be the plain gradient under the method's name).
    gradient : bool
        Whether the map uses the tensor's gradient.  ``False`` (Eigen-CAM reads the activation
        only): a call that needs no other gradient runs no backward pass, and the map gets
        ``None`` for the gradient (it is computed when ``debug=True`` asks for it, or when
        :func:`~torchray_like.attribution.explain.explain` computes it for another method).
    """

    rule: ReLURule = GRADIENT_RULE
    context: Optional[Callable[[], Any]] = None
    at_layer: bool = True
    check_rules: bool = True
    gradient: bool = True


@dataclass
class Reading:
    """What a method's map is made of: the read tensors, their gradients, and the call.

    Attributes
    ----------
    input : torch.Tensor
        The caller's input.
    x : torch.Tensor
        The leaf the input gradient was taken at (``.grad`` may be set on it temporarily).
    tensors, grads : tuple of torch.Tensor
        The tensors read and their gradients, in the order of :attr:`BackpropMethod.reads`.
    layer : str, module or None
        The saliency layer (resolved when it was chosen automatically).
    options : dict
        The call's keyword arguments.
    """

    input: torch.Tensor
    x: torch.Tensor
    tensors: Tuple[torch.Tensor, ...]
    grads: Tuple[Optional[torch.Tensor], ...]
    layer: Any
    options: Dict[str, Any] = field(default_factory=dict)


def with_grad(tensor: torch.Tensor, grad: Optional[torch.Tensor],
              fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(tensor)`` with ``tensor.grad`` set to ``grad`` for the call (TorchRay's flatteners
    read the gradient from ``.grad``)."""
    tensor.grad = grad
    try:
        return fn(tensor)
    finally:
        tensor.grad = None


def flatten_reading(method: "BackpropMethod", reading: Reading
                    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The map of a one-read method: ``gradient_to_saliency`` of the read tensor (a layer map
    such as Grad-CAM's weighting when the method has one and the default is kept)."""
    return with_grad(reading.tensors[0], reading.grads[0],
                     method.flattener(reading.options, reading.layer)), {}


@dataclass(frozen=True)
class BackpropMethod:
    """The description of one backpropagation method.

    Attributes
    ----------
    name : str
        The method's name (its function's and module's name, its key in ``METHODS``).
    reads : tuple of Read
        What the method reads, with the rule reaching each.
    module : str
        The module the public function belongs to.
    doc : str
        The public function's docstring.
    make_map : callable
        ``(method, reading) -> (map, debug extras)``; default :func:`flatten_reading`.
    saliency_layer : str, module or None
        The function's default ``saliency_layer`` (``""``: the input).
    auto_layer : bool
        Whether ``saliency_layer=None`` means the automatic layer
        (:func:`~torchray_like.attribution.grad_cam.find_saliency_layer`) rather than the input.
    gradient_to_saliency : callable
        The function's default flattening (TorchRay's public name).
    layer_map : callable, optional
        ``(activation, gradient) -> map``: with the default flattening, the map is this,
        with errors naming the method and ``layer_hint``.
    layer_hint : str
        What to do when the layer has no spatial dimensions.
    context_builder : callable
        The function's default ``context_builder`` argument (a description without that
        argument leaves it out of the signature).
    debug_type : type
        The record returned with ``debug=True``.
    check_read : callable, optional
        ``(tensor, layer, x)``: raises before any backward pass when the read layer cannot make
        this method's map (default: the layer must have spatial dimensions).
    shared_options : frozenset of str
        The options :func:`~torchray_like.attribution.explain.explain` honours in its shared
        pass (any other option runs the method by its own function).
    fixed : frozenset of str
        Arguments TorchRay's function fixes itself (``guided_backprop``'s context):
        ``explain`` refuses them.
    """

    name: str
    reads: Tuple[Read, ...]
    module: str
    doc: str
    make_map: Callable[["BackpropMethod", Reading], Tuple[torch.Tensor, Dict[str, Any]]] = (
        flatten_reading)
    saliency_layer: Any = ""
    auto_layer: bool = False
    gradient_to_saliency: Callable[[torch.Tensor], torch.Tensor] = gradient_to_saliency
    layer_map: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    layer_hint: str = ""
    context_builder: Any = NullContext
    debug_type: Optional[type] = None
    check_read: Optional[Callable[[torch.Tensor, Any, torch.Tensor], None]] = None
    shared_options: FrozenSet[str] = SHARED_OPTIONS
    fixed: FrozenSet[str] = frozenset()

    def flattener(self, options: Dict[str, Any], layer: Any
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ``gradient_to_saliency`` of a call: the option, or the method's layer map."""
        flatten = options.get("gradient_to_saliency", self.gradient_to_saliency)
        if flatten is self.gradient_to_saliency and self.layer_map is not None:
            return ActivationMap(self.layer_map, self.name, layer, self.layer_hint,
                                 gradient=all(read.gradient for read in self.reads))
        return flatten

    def uses_gradient(self, read: Read, options: Dict[str, Any]) -> bool:
        """Whether a call's map uses ``read``'s gradient: the read's own say
        (:attr:`Read.gradient`), unless the call passes its own ``gradient_to_saliency``
        (which may read ``.grad``)."""
        return read.gradient or options.get(
            "gradient_to_saliency", self.gradient_to_saliency) is not self.gradient_to_saliency

    def default_context(self, options: Dict[str, Any]) -> bool:
        """Whether the call keeps the method's own rule context (so its rules decide)."""
        given = options.get("context_builder", self.context_builder)
        return given is self.context_builder

    def signature(self) -> inspect.Signature:
        """TorchRay's signature of the method's function, with this method's defaults."""
        def arg(name: str, default: Any = inspect.Parameter.empty,
                annotation: Any = inspect.Parameter.empty) -> inspect.Parameter:
            return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     default=default, annotation=annotation)

        params = [arg("model", annotation="nn.Module"), arg("input", annotation="torch.Tensor"),
                  arg("target", annotation="TargetType"),
                  arg("saliency_layer", self.saliency_layer, "Union[str, nn.Module, None]"),
                  arg("resize", False, "SizeType"), arg("resize_mode", "bilinear", "str"),
                  arg("smooth", 0, "float")]
        if self.context_builder is not _ABSENT:
            params.append(arg("context_builder", self.context_builder,
                              "Optional[Callable[[], Any]]"))
        params += [arg("gradient_to_saliency", self.gradient_to_saliency,
                       "Callable[[torch.Tensor], torch.Tensor]"),
                   arg("get_backward_gradient", get_backward_gradient, "Callable"),
                   arg("debug", False, "bool"),
                   inspect.Parameter("tokens", inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation="TokensType")]
        return inspect.Signature(params, return_annotation="Union[torch.Tensor, Tuple["
                                                           "torch.Tensor, SaliencyDebug]]")

    def function(self) -> Callable[..., Any]:
        """The public function: TorchRay's signature, this method's defaults and docstring,
        running :func:`~.engine.run_method` (imported here: the engine imports this module)."""
        from .engine import run_method

        signature = self.signature()
        method = self
        names = tuple(name for name, p in signature.parameters.items()
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        defaults = {name: p.default for name, p in signature.parameters.items()
                    if p.default is not inspect.Parameter.empty}

        def function(*args: Any, **kwargs: Any) -> Any:
            # What signature.bind gives, without its cost on a short call; anything unusual
            # (a missing, unknown or doubled argument) goes through bind for its TypeError.
            if len(args) >= 3 and len(args) <= len(names) and not any(
                    key not in defaults or key in names[:len(args)] for key in kwargs):
                arguments = dict(defaults)
                arguments.update(zip(names, args))
                arguments.update(kwargs)
                return run_method(method, **arguments)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return run_method(method, **bound.arguments)

        function.__name__ = function.__qualname__ = self.name
        function.__module__ = self.module
        function.__doc__ = _with_tokens_doc(self.doc)
        function.__signature__ = signature  # type: ignore[attr-defined]
        function.description = self  # type: ignore[attr-defined]
        return function


def _with_tokens_doc(doc: str) -> str:
    """``doc`` with the ``tokens`` parameter documented last among the parameters."""
    if "tokens :" in doc or "\n    Returns\n" not in doc:
        return doc
    head, tail = doc.split("\n    Returns\n", 1)
    return head.rstrip("\n") + "\n" + TOKENS_DOC + "\n    Returns\n" + tail


#: The value of :attr:`BackpropMethod.context_builder` for a method without that argument.
NO_CONTEXT_ARGUMENT = _ABSENT


def description(function: Any) -> Optional[BackpropMethod]:
    """The :class:`BackpropMethod` a public function was made from, or ``None`` (a method with
    its own forward passes, such as RISE)."""
    found = getattr(function, "description", None)
    return found if isinstance(found, BackpropMethod) else None
