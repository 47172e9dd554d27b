r"""Replayable calls: a torch call recorded by a rule context, with the slots of its input,
weight and bias, that a backward rule can call again on other tensors (``op(r(x), w⁺)``).

The one home of the argument-slot helpers the rule contexts share: :func:`arg_slot` finds
where an argument was passed (position or keyword), :func:`get_arg` / :func:`put_arg` read and
replace it, and :class:`Call` replays the call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Slot", "arg_slot", "get_arg", "put_arg", "arg", "first_arg", "with_first_arg", "Call"]


Slot = Union[int, str, None]


def arg_slot(args: tuple, kwargs: dict, pos: int, names: Tuple[str, ...]) -> Slot:
    """Where argument ``pos`` (keyword ``names``) of a call is: an index, a keyword, or None."""
    if len(args) > pos:
        return pos
    for name in names:
        if name in kwargs:
            return name
    return None


def get_arg(args: Sequence[Any], kwargs: dict, slot: Slot) -> Any:
    if slot is None:
        return None
    return args[slot] if isinstance(slot, int) else kwargs[slot]


def put_arg(args: list, kwargs: dict, slot: Slot, value: Any) -> None:
    if isinstance(slot, int):
        args[slot] = value
    elif slot is not None:
        kwargs[slot] = value


def arg(args: Sequence[Any], kwargs: dict, index: int, names: Tuple[str, ...],
        default: Any = None) -> Any:
    """Argument ``index`` (keyword ``names``) of a call, or ``default`` when it was not given."""
    slot = arg_slot(tuple(args), kwargs, index, names)
    return default if slot is None else get_arg(args, kwargs, slot)


def first_arg(args: Sequence[Any], kwargs: dict,
              names: Tuple[str, ...] = ("input", "self")) -> Any:
    """The operand of a unary call (position 0 or a keyword of ``names``); a
    :class:`TypeError` when the call has none."""
    slot = arg_slot(tuple(args), kwargs, 0, names)
    if slot is None:
        raise TypeError("rectifier called without an input tensor")
    return get_arg(args, kwargs, slot)


def with_first_arg(func: Callable, args: Sequence[Any], kwargs: dict, names: Tuple[str, ...]
                   ) -> Callable[[torch.Tensor], Any]:
    """``t -> func(*args, **kwargs)`` with the operand (position 0 or a keyword of ``names``)
    replaced by ``t``."""
    slot = arg_slot(tuple(args), kwargs, 0, names)
    if slot is None:
        raise TypeError("rectifier called without an input tensor")

    def call(t: torch.Tensor) -> Any:
        new_args, new_kwargs = list(args), dict(kwargs)
        put_arg(new_args, new_kwargs, slot, t)
        return func(*new_args, **new_kwargs)
    return call


class Call:
    """A replaced call with its input (and weight / bias) slots, replayable on new tensors."""

    __slots__ = ("func", "args", "kwargs", "x_slot", "w_slot", "b_slot", "weight",
                 "weight_version", "index", "cell", "kind")

    def __init__(self, func: Callable, args: tuple, kwargs: dict, x_slot: Slot,
                 w_slot: Slot = None, b_slot: Slot = None,
                 weight: Optional[torch.Tensor] = None, index: int = -1,
                 cell: Any = None, kind: str = "") -> None:
        self.func = func
        self.args = list(args)
        self.kwargs = dict(kwargs)
        self.x_slot, self.w_slot, self.b_slot = x_slot, w_slot, b_slot
        self.weight = weight
        self.weight_version = None if weight is None else weight._version
        self.index = index
        self.cell = cell
        self.kind = kind
        # The node keeps no reference to the input tensor: autograd saves it (with its version).
        put_arg(self.args, self.kwargs, x_slot, None)

    def __call__(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 drop_bias: bool = False) -> torch.Tensor:
        args, kwargs = list(self.args), dict(self.kwargs)
        put_arg(args, kwargs, self.x_slot, x)
        if weight is not None:
            put_arg(args, kwargs, self.w_slot, weight)
        if drop_bias and self.b_slot is not None:
            put_arg(args, kwargs, self.b_slot, None)
        return self.func(*args, **kwargs)
