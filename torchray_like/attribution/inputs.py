r"""Input checks: a batch the methods can explain, and what to do when it is not one.

:func:`check_input` validates a batch ``(N, C, *spatial)`` of floating-point data; when the model
then fails on it, :func:`layout_hint` and :func:`dtype_hint` turn PyTorch's error into a sentence
that says what to do (an unbatched image, channels last, float64 data for a float32 model).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn as nn

from .modules import current_scan

__all__ = ["InferenceModeError", "check_grad_mode", "check_input", "layout_hint", "dtype_hint",
           "size_hint", "assertion_hint",
           "forward_failure", "call_model", "FORWARD_ERRORS", "outputs_agree",
           "ChannelsLastBatches"]


class InferenceModeError(ValueError, RuntimeError):
    """A method called inside :func:`torch.inference_mode`, which disables autograd.

    A :class:`ValueError` like the package's other refusals of a caller's state, and a
    :class:`RuntimeError` as it was before (``except RuntimeError`` still catches it)."""


def check_grad_mode() -> None:
    """Raise :class:`InferenceModeError` inside :func:`torch.inference_mode` (the methods
    need autograd; :func:`torch.no_grad` around a call is fine: they enable it themselves)."""
    if torch.is_inference_mode_enabled():
        raise InferenceModeError(
            "attribution needs autograd, which torch.inference_mode() disables; call it outside "
            "the inference_mode block (torch.no_grad() is fine)")


def check_input(input: Any, name: str = "input", min_dim: int = 3,
                needs_grad: bool = True) -> torch.Tensor:
    """Validate a batch ``(N, C, *spatial)`` of floating-point data and return it.

    Raises :class:`TypeError` for non-tensors and integer / boolean / complex tensors (with the
    conversion to use), :class:`ValueError` for a wrong rank or an empty batch.  When
    ``needs_grad`` (the method differentiates), also :class:`InferenceModeError` (a
    :class:`ValueError` and a :class:`RuntimeError`) inside :func:`torch.inference_mode` and
    :class:`ValueError` for an inference tensor.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if input.is_meta:
        raise ValueError(
            f"{name} is on the meta device (a tensor without data); pass a tensor with values "
            "on the model's device")
    if not input.is_floating_point():
        if input.dtype == torch.uint8:
            hint = ("an image stored as uint8: convert it with x.float() / 255 and normalise it "
                    "as the model expects")
        else:
            hint = "convert it, e.g. with x.float()"
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {input.dtype}; {hint}")
    if input.dim() < min_dim:
        raise ValueError(
            f"{name} must have shape (N, C, *spatial) — (N, C, L), (N, C, H, W) or "
            f"(N, C, T, H, W) — got shape {tuple(input.shape)}; add the batch dimension with "
            "x.unsqueeze(0)")
    if input.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(input.shape)})")
    if not needs_grad:
        return input
    check_grad_mode()
    if input.is_inference():
        raise ValueError(
            f"{name} is an inference tensor (created under torch.inference_mode()); autograd "
            "cannot use it: pass x.clone() made outside inference mode")
    return input


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layout_hint(model: nn.Module, input: torch.Tensor,
                certain_only: bool = False) -> Optional[str]:
    """What to do when ``input`` cannot be the batch the model's first convolution expects.

    The first ``Conv1d/2d/3d`` module of ``model`` (in registration order) tells the number of
    channels and of spatial dimensions.  Returns a sentence when ``input`` looks like a
    channels-last batch (``x.permute(0, 3, 1, 2)``), an unbatched sample (one dimension short,
    channels first: ``x.unsqueeze(0)``) or has another number of channels; ``None`` when it
    matches or the model has no such convolution.

    The methods refuse a channels-last batch before running the model (``certain_only``: the
    last dimension holds the channels and the second does not); the other cases can be
    legitimate (a model that reshapes its input first), so they only complete the error of a
    forward pass that failed.
    """
    scan = current_scan(model)  # the call's one walk, when there is one
    conv = next((m for m in (scan.modules if scan is not None else model.modules())
                 if isinstance(m, _CONV_TYPES)), None)
    if conv is None or not conv.in_channels:
        return None
    spatial = len(conv.kernel_size)
    c = conv.in_channels
    shape = tuple(input.shape)
    expected = "(N, C" + ", " + ", ".join(("L",) if spatial == 1 else
                                          ("H", "W") if spatial == 2 else ("T", "H", "W")) + ")"
    first = (f"the model's first convolution ({type(conv).__name__}, in_channels={c}) takes "
             f"a batch {expected} with C={c}")
    if input.dim() == spatial + 2 and shape[1] != c and shape[-1] == c:
        order = ", ".join(["0", str(spatial + 1)] + [str(i) for i in range(1, spatial + 1)])
        return (f"input has shape {shape}, channels last; {first}: pass x.permute({order}) "
                "(or x.movedim(-1, 1))")
    if certain_only:
        return None
    if input.dim() == spatial + 1 and shape[0] == c:
        return (f"input has shape {shape}: a single sample without the batch dimension; "
                f"{first}: pass x.unsqueeze(0)")
    if input.dim() == spatial + 2 and shape[1] != c:
        return f"input has shape {shape} with {shape[1]} channels; {first}"
    if input.dim() != spatial + 2 and input.dim() >= 3:
        # Another number of spatial dimensions: an image given to a video or volume model
        # (conv3d's own message then speaks of a 5-D input the caller never made), a clip
        # given to an image model.
        frames = (" (one frame as a clip: x.unsqueeze(2))" if spatial == 3 and input.dim() == 4
                  else "")
        return (f"input has shape {shape}, {input.dim() - 2} spatial dimension(s); {first}, "
                f"{spatial} spatial dimension(s){frames}")
    return None




def dtype_hint(model: nn.Module, input: torch.Tensor) -> Optional[str]:
    """A sentence when ``input``'s dtype differs from the model's floating parameters' (the
    usual cause of PyTorch's "Input type (double) and bias type (float) should be the same"),
    ``None`` otherwise.  Only used to complete the error of a forward pass that failed: a model
    may legitimately cast its input itself."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or input.dtype in dtypes:
        return None
    (dtype,) = dtypes
    name = str(dtype).replace("torch.", "")
    return (f"input is {str(input.dtype).replace('torch.', '')} but the model's parameters are "
            f"{name}: pass x.to(torch.{name}) (e.g. x.float() for an image from "
            f"torch.from_numpy of a float64 array), or convert the model with "
            f"model.to(torch.{str(input.dtype).replace('torch.', '')})")


#: PyTorch's words when a pooling or convolution window does not fit its input.
_TOO_SMALL = ("smaller than kernel size", "Output size is too small",
              "Kernel size can't be greater than actual input size")


def size_hint(input: torch.Tensor, exc: BaseException) -> Optional[str]:
    """A sentence when ``exc`` says a window of the model did not fit (PyTorch's "input image
    ... smaller than kernel size"): the input is too small for the model."""
    if not any(words in str(exc) for words in _TOO_SMALL):
        return None
    return (f"the input's spatial size {tuple(input.shape[2:])} is too small for the model's "
            "convolution or pooling windows at some layer; give larger inputs (the size the "
            "model was made for)")


def assertion_hint(input: torch.Tensor, exc: BaseException) -> Optional[str]:
    """A sentence when the model's own check refused the input (``torch._assert`` raises an
    :class:`AssertionError`: torchvision's ViT "Wrong image height! Expected 224 but got
    232!"): its message says what the model expects."""
    if not isinstance(exc, AssertionError):
        return None
    return ("the model's own check refused it; give inputs of the size "
            "and shape the model was built for (resize the images, or build the model for "
            "this size)")


def forward_failure(model: nn.Module, input: torch.Tensor, exc: BaseException
                    ) -> Optional[ValueError]:
    """The :class:`ValueError` to raise instead of ``exc`` when the model's forward pass failed
    on ``input`` for a reason :func:`layout_hint`, :func:`dtype_hint`, :func:`size_hint` or
    :func:`assertion_hint` can name; ``None`` when none can (re-raise ``exc`` then)."""
    hint = layout_hint(model, input) or dtype_hint(model, input) or size_hint(input, exc) \
        or assertion_hint(input, exc)
    if hint is None:
        return None
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return ValueError(f"{type(model).__name__} failed on input of shape {tuple(input.shape)} "
                      f"({type(exc).__name__}: {first}); {hint}")


#: What a model raises when it gets a batch it cannot take (a shape or dtype error, or an index
#: out of range once an unbatched image has lost a dimension, or the model's own
#: ``torch._assert`` on the input's size): the errors that :func:`forward_failure` may explain.
FORWARD_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, AssertionError)


def call_model(model: nn.Module, batch: Any, input: torch.Tensor) -> Any:
    """``model(batch)``; a failure that :func:`forward_failure` can explain from ``input`` (the
    caller's batch: a layout or dtype mistake) becomes its :class:`ValueError`."""
    try:
        return model(batch)
    except FORWARD_ERRORS as exc:
        failure = forward_failure(model, input, exc)
        if failure is None:
            raise
        raise failure from exc


def outputs_agree(output: Any, reference: Any, reduced: bool) -> bool:
    """Whether the first rows of ``output`` are ``reference`` up to the rounding of another
    convolution algorithm (float32) or of the reduced precision of autocast; outputs that are
    not tensors (dicts, tuples, dataclasses) are compared entry by entry."""
    if isinstance(output, torch.Tensor) and isinstance(reference, torch.Tensor):
        if not output.is_floating_point():
            return bool(torch.equal(output[:reference.shape[0]], reference))
        a = output[:reference.shape[0]].double()
        b = reference.double()
        if a.shape != b.shape or not bool(torch.isfinite(b).all()):
            return a.shape == b.shape and bool(torch.equal(a.isfinite(), b.isfinite()))
        tol = (5e-2 if reduced else 1e-3) * (float(b.abs().max()) + 1e-6)
        return bool(((a - b).abs() <= tol).all())
    if isinstance(output, dict) and isinstance(reference, dict):
        return output.keys() == reference.keys() and all(
            outputs_agree(output[k], reference[k], reduced) for k in output)
    if isinstance(output, (tuple, list)) and isinstance(reference, (tuple, list)):
        return len(output) == len(reference) and all(
            outputs_agree(a, b, reduced) for a, b in zip(output, reference))
    if type(output) is type(reference) and dataclasses.is_dataclass(output) \
            and not isinstance(output, type):
        # A dataclass holding the tensors (``.logits``): its fields are the output; comparing
        # the type alone let a model whose numbers depend on the layout through.
        return all(outputs_agree(getattr(output, f.name, None), getattr(reference, f.name, None),
                                 reduced) for f in dataclasses.fields(output))
    return type(output) is type(reference)


class ChannelsLastBatches:
    """Perturbed copies of an image batch in channels-last memory, while the model agrees.

    CPU convolutions run ``(N, C, H, W)`` batches stored channels-last about twice as fast at
    the batch sizes of the perturbation methods (Score-CAM, occlusion).  The first batch is
    also run in the plain layout (two rows) and compared (:func:`outputs_agree`): a model that
    fails on the layout (``x.view(n, -1)``) or reads its input's storage gives the plain
    layout for the rest of the call, so the numbers never depend on the layout beyond
    convolution rounding.

    Parameters
    ----------
    input : torch.Tensor
        The caller's batch (its shape and dtype; 4-D with more than one channel qualifies).
    rows : int
        Rows of :attr:`buffer`, a preallocated batch the caller may fill in place.
    enabled : bool
        ``False``: the plain layout throughout.
    reduced : bool
        The forward passes run in reduced precision (autocast): the check's tolerance is that
        of :func:`outputs_agree` for it.
    """

    def __init__(self, input: torch.Tensor, rows: int, enabled: bool = True,
                 reduced: bool = False) -> None:
        self.reduced = reduced
        self.channels_last = enabled and input.dim() == 4 and input.shape[1] > 1
        self.checked = not self.channels_last
        self.buffer = torch.empty((rows,) + tuple(input.shape[1:]), dtype=input.dtype,
                                  device=input.device)
        if self.channels_last:
            self.buffer = self.buffer.contiguous(memory_format=torch.channels_last)

    def forward(self, model: Any, batch: torch.Tensor, input: torch.Tensor) -> Any:
        """``model(batch)``, ``batch`` put in the layout in use (a copy when it is not)."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        else:
            return call_model(model, batch.contiguous(), input)
        if self.checked:
            return call_model(model, batch, input)
        self.checked = True
        plain = batch.contiguous()
        try:
            output = model(batch)
        except Exception:  # noqa: BLE001 - any failure: the plain layout decides
            output = None
        if output is None or not outputs_agree(output, call_model(model, plain[:2], input),
                                               self.reduced):
            self.channels_last = False
            self.buffer = self.buffer.contiguous()
            return call_model(model, plain, input)
        return output
