r"""LRP composites: which rule each layer gets, as data.

A :class:`Composite` is an ordered tuple of ``(selector, rule)`` pairs, a rule for the first
layer, and a default.  For each linear operation the model calls (a convolution, transposed
convolution, linear layer, or a batch norm not folded into one) the first pair whose selector
matches gives the rule:

* a *kind* — ``"conv"``, ``"conv_transpose"``, ``"linear"``, ``"batch_norm"`` — matches the
  operation itself, however it is called (module, ``F.conv2d``, a custom layer);
* a module type (``nn.Linear``, a custom layer's class) matches the calls made while a module
  of that type runs (the innermost running module);
* a module, or a layer name (``"features.0"``, resolved in the model), matches that module's
  calls;
* any other callable ``predicate(module) -> bool`` matches the calls of the modules it accepts.

``first`` is the rule of the first linear operation of each forward pass (the layer that sees
the input: flat, w² or z^B), chosen automatically.  The standard composites are Zennit's
(:func:`epsilon_plus`, :func:`epsilon_plus_flat`, :func:`epsilon_alpha2_beta1`,
:func:`epsilon_gamma_box`); a user's own is a mapping ``{selector: rule}`` (with an optional
``"first"`` key) given to :func:`make_composite`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch.nn as nn

from .lrp_rules import AlphaBeta, Bound, Epsilon, Flat, Gamma, Rule, ZBox, ZPlus

__all__ = ["Composite", "KINDS", "make_composite", "epsilon_plus", "epsilon_plus_flat",
           "epsilon_alpha2_beta1", "epsilon_gamma_box", "COMPOSITES", "CompositeSpec"]

#: The operation kinds a selector can name.
KINDS = ("conv", "conv_transpose", "linear", "batch_norm")

#: The default ε of the standard composites' linear layers (Zennit's).
LINEAR_EPSILON = 1e-6


@dataclass(frozen=True)
class Composite:
    """Rules per layer, chosen by kind, type, module, name or predicate (see the module).

    Attributes
    ----------
    name : str
        For messages.
    rules : tuple of (selector, Rule)
        In priority order.
    first : Rule, optional
        The rule of the first linear operation of a forward pass.
    default : Rule
        The rule of a linear operation no selector matches.
    """

    name: str
    rules: Tuple[Tuple[Any, Rule], ...] = ()
    first: Optional[Rule] = None
    default: Rule = field(default_factory=lambda: Epsilon(LINEAR_EPSILON))

    def __post_init__(self) -> None:
        for selector, rule in self.rules:
            _check_rule(rule, f"the rule of {selector!r}")
            _check_selector(selector)
        if self.first is not None:
            _check_rule(self.first, "first")
        _check_rule(self.default, "default")

    @property
    def needs_modules(self) -> bool:
        """Whether a selector looks at modules (the context then tracks the running one)."""
        return any(not (isinstance(s, str) and s in KINDS) for s, _ in self.rules)

    @property
    def names(self) -> Tuple[str, ...]:
        """The layer names among the selectors (resolved in a model)."""
        return tuple(s for s, _ in self.rules if isinstance(s, str) and s not in KINDS)

    def rule_for(self, kind: str, module: Optional[nn.Module], first: bool,
                 named: Mapping[str, nn.Module]) -> Rule:
        """The rule of one call of ``kind`` made while ``module`` runs (innermost)."""
        if first and self.first is not None:
            return self.first
        for selector, rule in self.rules:
            if _matches(selector, kind, module, named):
                return rule
        return self.default


def _matches(selector: Any, kind: str, module: Optional[nn.Module],
             named: Mapping[str, nn.Module]) -> bool:
    if isinstance(selector, str):
        return selector == kind if selector in KINDS else (
            module is not None and named.get(selector) is module)
    if module is None:
        return False
    if isinstance(selector, type):
        return isinstance(module, selector)
    if isinstance(selector, nn.Module):
        return selector is module
    return bool(selector(module))


def _check_rule(rule: Any, where: str) -> None:
    if not isinstance(rule, Rule):
        raise TypeError(
            f"composite: {where} must be an LRP rule such as Epsilon(1e-6), ZPlus() or "
            f"Gamma(0.25) (torchray_like.attribution.lrp_rules), got {type(rule).__name__} "
            f"{rule!r}")


def _check_selector(selector: Any) -> None:
    if isinstance(selector, (str, type, nn.Module)) or callable(selector):
        return
    raise TypeError(
        f"composite: selector {selector!r} ({type(selector).__name__}) is none of: a kind "
        f"({', '.join(KINDS)}), a layer name, a module type, a module, or a predicate "
        "module -> bool")


def epsilon_plus(epsilon: float = LINEAR_EPSILON) -> Composite:
    """z⁺ on convolutions, ε on linear layers (Zennit's ``EpsilonPlus``)."""
    return Composite("EpsilonPlus", (("conv", ZPlus()), ("conv_transpose", ZPlus()),
                                     ("linear", Epsilon(epsilon))))


def epsilon_plus_flat(epsilon: float = LINEAR_EPSILON) -> Composite:
    """:func:`epsilon_plus` with the flat rule on the first layer (Zennit's
    ``EpsilonPlusFlat``)."""
    base = epsilon_plus(epsilon)
    return Composite("EpsilonPlusFlat", base.rules, first=Flat())


def epsilon_alpha2_beta1(epsilon: float = LINEAR_EPSILON) -> Composite:
    """α2β1 on convolutions, ε on linear layers (Zennit's ``EpsilonAlpha2Beta1``)."""
    rule = AlphaBeta(2.0, 1.0)
    return Composite("EpsilonAlpha2Beta1", (("conv", rule), ("conv_transpose", rule),
                                            ("linear", Epsilon(epsilon))))


def epsilon_gamma_box(low: Optional[Bound] = None, high: Optional[Bound] = None,
                      gamma: float = 0.25,
                      epsilon: float = LINEAR_EPSILON) -> Composite:
    """z^B on the first layer (inputs in ``[low, high]``), γ on convolutions, ε on linear
    layers (Zennit's ``EpsilonGammaBox``).  ``low`` / ``high``: numbers, tensors
    broadcastable to the input (per channel for normalised images), or ``None`` (default):
    each sample's own minimum / maximum."""
    rule = Gamma(gamma)
    return Composite("EpsilonGammaBox", (("conv", rule), ("conv_transpose", rule),
                                         ("linear", Epsilon(epsilon))),
                     first=ZBox(low, high))


#: The standard composites by name (Zennit's names and snake-case ones).
COMPOSITES: Dict[str, Callable[[], Composite]] = {
    "EpsilonPlus": epsilon_plus, "EpsilonPlusFlat": epsilon_plus_flat,
    "EpsilonAlpha2Beta1": epsilon_alpha2_beta1, "EpsilonGammaBox": epsilon_gamma_box,
    "epsilon_plus": epsilon_plus, "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1, "epsilon_gamma_box": epsilon_gamma_box,
}

CompositeSpec = Union[Composite, str, Mapping[Any, Rule]]


def make_composite(spec: CompositeSpec) -> Composite:
    """A :class:`Composite` from itself, a standard composite's name, or a mapping
    ``{selector: rule}`` (key ``"first"``: the first layer's rule; key ``"default"``: the rule
    of unmatched layers, ``Epsilon(1e-6)`` if absent)."""
    if isinstance(spec, Composite):
        return spec
    if isinstance(spec, str):
        if spec not in COMPOSITES:
            raise ValueError(
                f"unknown LRP composite {spec!r}; standard composites: "
                f"{', '.join(sorted(k for k in COMPOSITES if k[0].isupper()))}, or pass a "
                "mapping {selector: rule}")
        return COMPOSITES[spec]()
    if isinstance(spec, Mapping):
        rules = dict(spec)
        first = rules.pop("first", None)
        default = rules.pop("default", Epsilon(LINEAR_EPSILON))
        return Composite("custom", tuple(rules.items()), first=first, default=default)
    raise TypeError(
        f"composite must be a Composite, a standard composite's name (e.g. "
        f"'EpsilonPlusFlat') or a mapping {{selector: rule}}, got {type(spec).__name__}")
