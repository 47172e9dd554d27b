r"""Ways of driving autograd that a backward rule cannot serve, refused with a clear error.

A rule context (:class:`~.context.RuleContext`) puts custom :class:`torch.autograd.Function`
nodes in the graph; their backward *is* the method's rule (guided backprop, DeConvNet,
excitation backprop, LRP).  Three ways of differentiating such a graph would otherwise fail with
a foreign PyTorch error, or give a number that is silently not the method's:

* **a second derivative** (``torch.autograd.grad(..., create_graph=True)`` then differentiating
  the result, ``torch.autograd.functional.hessian``): autograd would differentiate the rule's
  formula and use the *rule* again for the forward pass's own derivative — neither the
  derivative of the method's map nor that of the plain gradient.  The first-order result of a
  ``create_graph=True`` pass is exact; differentiating it raises :class:`SecondOrderError`
  (before, excitation backprop and LRP returned ``None`` / zeros, guided backprop raised a
  PyTorch error about ``out=`` arguments, DeConvNet returned a mixed second derivative);
* **batched backward passes** (``torch.autograd.grad(..., is_grads_batched=True)``,
  ``torch.autograd.functional.jacobian(..., vectorize=True)``): where a rule's kernels have no
  vmap rule (guided backprop, excitation backprop, LRP), :class:`TransformNotSupportedError`
  says to loop instead (``vectorize=False``); a rule whose kernels batch (DeConvNet's) gives
  the loop's gradients;
* **torch.func transforms** (``torch.func.grad``, ``vjp``, ``jacrev``, ``vmap(grad(...))``)
  over a forward pass run inside a rule context: the rule nodes do not take part in functorch's
  autograd, :class:`TransformNotSupportedError` says what to use.

First-order ``backward()``, ``torch.autograd.grad``, ``torch.autograd.backward(tensors,
grads)``, ``retain_graph=True`` and ``torch.autograd.functional.vjp`` / ``jacobian`` (the
default ``vectorize=False``) are exact and unaffected.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch

__all__ = ["SecondOrderError", "TransformNotSupportedError", "first_order",
           "check_transform_error", "is_functorch_tensor", "TRANSFORM_ADVICE"]


class SecondOrderError(ValueError, RuntimeError):
    """A gradient computed with a method's backward rule was differentiated again: a
    :class:`ValueError` about the caller's use, and a :class:`RuntimeError` as autograd's own
    errors are."""


class TransformNotSupportedError(ValueError, RuntimeError):
    """A rule context met a ``torch.func`` transform or a batched backward pass (vmap): a
    :class:`ValueError` about the caller's use, and a :class:`RuntimeError` as PyTorch raised
    before."""


#: What to use instead of functorch / batched backward passes with a rule context.
TRANSFORM_ADVICE = (
    "differentiate with loss.backward(), torch.autograd.grad (without is_grads_batched) or "
    "torch.autograd.functional.vjp / jacobian(vectorize=False) instead; for per-sample "
    "gradients, the rules are per sample already: backpropagate the sum of the samples' "
    "scores once, each sample's gradient is its own (batch norm in eval mode)")


def is_functorch_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor wrapped by a functorch transform (vmap's batched tensor,
    torch.func.grad's wrapper)."""
    if not isinstance(value, torch.Tensor):
        return False
    functorch = torch._C._functorch
    # is_grads_batched / jacobian(vectorize=True) use the legacy batched tensor
    return bool(functorch.is_functorch_wrapped_tensor(value)
                or functorch.is_legacy_batchedtensor(value))


def check_transform_error(exc: BaseException, name: str) -> None:
    """Turn PyTorch's refusal of a rule's autograd function under a ``torch.func`` transform
    into a :class:`TransformNotSupportedError` naming the context ``name``; return quietly for
    any other error (the caller re-raises it)."""
    # Any failure of a handler while a transform runs (PyTorch's refusal of autograd functions
    # without setup_context, a kernel reading a wrapped tensor's storage ...).
    active = torch._C._functorch.peek_interpreter_stack() is not None
    if isinstance(exc, RuntimeError) and (active or "functorch transforms" in str(exc)):
        raise TransformNotSupportedError(
            f"{name} cannot run under torch.func transforms (torch.func.grad, vjp, jacrev, "
            "vmap, functional_call with grad): its backward rules are autograd functions "
            "outside functorch's autograd, so the gradient would not be the method's; "
            + TRANSFORM_ADVICE) from exc


class _RefuseSecondOrder(torch.autograd.Function):
    """The identity on a rule's first-order result; differentiating it raises."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, anchor: torch.Tensor,
                what: str) -> torch.Tensor:
        ctx.what = what
        return result.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise SecondOrderError(
            f"a second derivative through {ctx.what}'s backward rule is not defined (the rule "
            "is once_differentiable): it replaces the derivative of the forward pass, so "
            "differentiating its result "
            "(create_graph=True then another backward, torch.autograd.functional.hessian, a "
            "gradient penalty) would mix the rule with itself. Compute the first-order "
            "result only (create_graph=False), or differentiate the plain gradient outside "
            "the rule context")


def _anchor(ctx: Any, grads: Iterable[Any]) -> Any:
    """A tensor of the rule node's backward that requires grad under ``create_graph=True`` (a
    saved forward tensor, whose graph leads to the inputs, or an incoming gradient)."""
    for value in tuple(getattr(ctx, "saved_tensors", ())) + tuple(grads):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return value
    return None


def first_order(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate the ``backward`` of a rule's autograd function: batched gradients (vmap) are a
    :class:`TransformNotSupportedError`, and under ``create_graph=True`` the rule runs without
    a graph and its results are marked so that differentiating them raises
    :class:`SecondOrderError` (``what`` names the method in both messages).  Without
    ``create_graph`` the backward runs as it is (no cost beyond one check per node; batched
    gradients are recognised when the rule fails on them)."""
    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Any) -> Any:
            try:
                if not torch.is_grad_enabled():
                    return backward(ctx, *grads)
                with torch.no_grad():
                    out = backward(ctx, *grads)
            except RuntimeError as exc:
                # Batched gradients are looked for only when the rule failed (the rules'
                # kernels have no vmap rule): the common path pays nothing for the check.
                if any(is_functorch_tensor(g) for g in grads):
                    raise TransformNotSupportedError(
                        f"{what}: batched backward passes (torch.autograd.grad(..., "
                        "is_grads_batched=True), torch.autograd.functional.jacobian(..., "
                        "vectorize=True), vmap) are not supported by its backward rules; "
                        + TRANSFORM_ADVICE) from exc
                raise
            anchor = _anchor(ctx, grads)
            if anchor is None:
                return out
            single = not isinstance(out, tuple)
            guarded = tuple(_RefuseSecondOrder.apply(v, anchor, what)
                            if isinstance(v, torch.Tensor) else v
                            for v in ((out,) if single else out))
            return guarded[0] if single else guarded
        return wrapper
    return decorate
