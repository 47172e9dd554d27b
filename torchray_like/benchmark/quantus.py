r"""Every method of the library as a Quantus ``explain_func``.

`Quantus <https://github.com/understandable-machine-intelligence-lab/Quantus>`_ (0.6) scores
explanations with metrics such as faithfulness correlation, max-sensitivity, sparseness and
model-parameter randomisation.  Where a metric needs new explanations — of perturbed inputs,
of a randomised model — it calls ``explain_func(model=..., inputs=..., targets=...,
**explain_func_kwargs)`` with NumPy arrays, channels first for PyTorch models, and adds
``device``.  :func:`explain` is that function for every method of
:data:`~torchray_like.attribution.registry.METHODS`, chosen by name::

    import quantus
    from torchray_like.benchmark.quantus import explain

    metric = quantus.MaxSensitivity(nr_samples=10)
    scores = metric(model=model, x_batch=x, y_batch=y, explain_func=explain,
                    explain_func_kwargs={"method": "grad_cam", "saliency_layer": "layer4"},
                    device="cpu")

The conventions it follows (each checked against an installed Quantus 0.6 by
``tests/test_quantus_adapter.py``):

* ``inputs``: a float array ``(N, C, *spatial)`` (also a tensor); ``channel_first=False``
  takes ``(N, *spatial, C)`` and returns the maps in that layout;
* ``targets``: one class index per input (an int array, a sequence, or one int for all);
* the result: a float32 NumPy array ``(N, 1, *spatial)`` at the **input's** resolution — layer
  methods (Grad-CAM, excitation backprop ...) are called with ``resize=True``, which Quantus
  needs to compare a map with the input pixel by pixel;
* the computation runs on the model's device (its parameters'; ``device`` only for a model
  without any), the model is never moved, its state (training mode, ``requires_grad``,
  hooks) is left as found, and gradients are enabled for the call even inside
  ``torch.no_grad()``;
* the many-pass methods (RISE, extremal perturbation) run without progress bars unless
  ``progress=True`` is given: a metric calls them hundreds of times.

Quantus itself is not needed to use :func:`explain`; ``benchmarks/quantus_metrics.py``
tabulates Quantus metrics for every method on the embedded models.
"""

from __future__ import annotations

import inspect
from numbers import Integral
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attribution.arguments import check_flag

__all__ = ["explain", "QUANTUS_HINT"]

#: What to do when Quantus is missing (the scripts print it).
QUANTUS_HINT = ("Quantus is not installed: pip install quantus (0.6; an optional dependency, "
                "only benchmarks/quantus_metrics.py and the Quantus metrics need it)")

ArrayLike = Union[np.ndarray, torch.Tensor]


def _method(method: Any) -> Any:
    from ..attribution.registry import METHODS

    if not isinstance(method, str):
        raise TypeError(f"method must be the name of a method of METHODS (a str), got "
                        f"{type(method).__name__}; pass it in explain_func_kwargs, e.g. "
                        "{'method': 'grad_cam'}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method]


def _check_options(name: str, fn: Any, options: Dict[str, Any]) -> Dict[str, Any]:
    """The method's options, with ``resize=True`` and ``progress=False`` by default; an option
    the method does not take is a TypeError naming it (not Python's message from deep down)."""
    params = inspect.signature(fn).parameters
    reserved = {"model", "input", "target"} & set(options)
    if reserved:
        raise TypeError(f"explain: {', '.join(sorted(reserved))} cannot be an option of "
                        f"{name}: Quantus passes the model, inputs and targets")
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params]
    if unknown and not open_ended:
        known = [k for k in params if k not in ("model", "input", "target")]
        raise TypeError(f"explain: method {name!r} takes no option(s) "
                        f"{', '.join(map(repr, unknown))}; its options are {', '.join(known)}")
    out = dict(options)
    if "resize" in params:
        out.setdefault("resize", True)  # Quantus compares maps and inputs pixel by pixel
    if "progress" in params:
        out.setdefault("progress", False)
    return out


def _inputs(inputs: Any, channel_first: bool) -> torch.Tensor:
    if isinstance(inputs, np.ndarray):
        if not np.issubdtype(inputs.dtype, np.floating):
            raise TypeError(f"inputs must be a floating-point array (N, C, *spatial), got dtype "
                            f"{inputs.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(inputs))
    elif isinstance(inputs, torch.Tensor):
        if not inputs.is_floating_point():
            raise TypeError(f"inputs must be floating-point, got {inputs.dtype}")
        if inputs.is_meta:
            raise ValueError("inputs are on the meta device (a tensor without data); pass a "
                             "tensor or array with values")
        x = inputs.detach()
    else:
        raise TypeError(f"inputs must be a NumPy array or a tensor (N, C, *spatial), got "
                        f"{type(inputs).__name__}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"inputs must have shape (N, C, *spatial) with 1 to 3 spatial "
                         f"dimensions (channels first, as Quantus passes them to PyTorch "
                         f"models), got {tuple(x.shape)}")
    if not channel_first:
        x = x.movedim(-1, 1).contiguous()  # the layout of channels-first inputs, bit for bit
    if not bool(torch.isfinite(x).all()):
        raise ValueError("inputs contain NaN or infinite values")
    return x


def _targets(targets: Any, n: int) -> List[int]:
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    if isinstance(targets, (Integral, np.integer)) and not isinstance(targets, bool):
        return [int(targets)] * n
    t = np.asarray(targets)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    integral = np.issubdtype(t.dtype, np.integer) or (
        np.issubdtype(t.dtype, np.floating) and bool(np.all(np.mod(t, 1) == 0)))
    if t.ndim != 1 or not integral or t.dtype == bool:
        raise ValueError(f"targets must hold one class index per input (an int array of shape "
                         f"(N,)), got {t.dtype} of shape {t.shape}")
    if len(t) != n:
        raise ValueError(f"targets must hold one class per input: {n} inputs, {len(t)} targets")
    return [int(v) for v in t]


def _device(model: nn.Module, device: Any) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device  # the model's: it is never moved
    try:
        return torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got "
                         f"{device!r} ({error})") from None


def _dtype(model: nn.Module, x: torch.Tensor) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return x.dtype


def explain(model: nn.Module, inputs: ArrayLike, targets: Any, *, method: str = "gradient",
            device: Optional[Union[str, torch.device]] = None, channel_first: bool = True,
            **options: Any) -> np.ndarray:
    """Saliency maps of ``method`` in Quantus's ``explain_func`` convention.

    Parameters
    ----------
    model : torch.nn.Module
        The network Quantus passes (perhaps a randomised copy).
    inputs : numpy.ndarray or torch.Tensor
        ``(N, C, *spatial)`` floating-point inputs (``(N, *spatial, C)`` with
        ``channel_first=False``).
    targets : array_like or int
        One class index per input, or one for all.
    method : str
        A name of :data:`~torchray_like.attribution.registry.METHODS` (default
        ``"gradient"``).
    device : str or torch.device, optional
        What Quantus passes; used only for a model without parameters or buffers (otherwise
        the model's device is used and the model is not moved).
    channel_first : bool
        Layout of ``inputs`` and of the result (default True, Quantus's for PyTorch).
    **options
        The method's own options (``saliency_layer``, ``num_masks``, ``smooth`` ...);
        ``resize`` defaults to True and ``progress`` to False.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, 1, *spatial)`` maps at the input's resolution (``(N, *spatial, 1)`` with
        ``channel_first=False``), on the CPU.

    Raises
    ------
    TypeError
        For a model that is not a module, non-float inputs, a method given as other than a
        name, or an option the method does not take.
    ValueError
        For an unknown method, inputs of the wrong rank or with NaN, or targets that are not
        one class index per input.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # ("no" is truthy: the layout would silently be taken as channels first.)
    check_flag(channel_first, "channel_first")
    fn = _method(method)
    kwargs = _check_options(method, fn, options)
    x = _inputs(inputs, channel_first)
    target = _targets(targets, x.shape[0])
    where = _device(model, device)
    x = x.to(device=where, dtype=_dtype(model, x))
    with torch.enable_grad():  # a metric may call us under torch.no_grad()
        maps = fn(model, x, target, **kwargs)
    maps = maps.detach()
    if tuple(maps.shape[2:]) != tuple(x.shape[2:]):
        # A method without a resize option (or a map of another size): linear by rank.
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
        maps = F.interpolate(maps.float(), size=tuple(x.shape[2:]), mode=mode,
                             align_corners=False)
    out = maps.to("cpu", torch.float32).numpy()
    return out if channel_first else np.moveaxis(out, 1, -1)
