r"""Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018, arXiv 1810.03292).

A map that explains *the model* must change when the model's weights are destroyed. The model
randomisation test re-initialises weights and compares the map of the randomised model with the
original map:

* **cascading** randomisation re-initialises the layers from the top (the logits) down, one
  more at each step, until every layer is random;
* **independent** randomisation re-initialises one layer at a time, the others trained.

Similarity (:func:`compare_maps`): the Spearman rank correlation of the absolute maps and of the
signed maps, the structural similarity (SSIM, :func:`skimage.metrics.structural_similarity`) and
the Spearman correlation of the maps' histograms of oriented gradients (HOG,
:func:`skimage.feature.hog`). The paper finds that gradient and Grad-CAM decorrelate as soon as
the top layers are random while guided backprop and guided Grad-CAM barely change (they do not
depend on the classifier); Sixt, Granz and Landgraf (ICML 2020, arXiv 1912.09818) show the same
for (non-contrastive) excitation backprop and deconvnet.

Choices of ours:

* the randomised layers are, by default, every module with its own weight of rank ≥ 2
  (convolutions, linear layers) in the reverse order of their first call in a forward pass
  (:func:`randomization_layers`);
* a layer is re-initialised by its own ``reset_parameters()`` (PyTorch's default
  initialisation: Kaiming-uniform for convolutions and linear layers; for normalisation layers
  the identity transform and fresh running statistics) under a seed derived from ``seed`` and
  the layer's name, so a layer gets the same random weights in both modes; a module without
  ``reset_parameters`` gets normal values with the scale (standard deviation) of the trained
  ones; ``reinit`` replaces the rule;
* maps are compared at the input's resolution (layer maps are upsampled bilinearly); SSIM and
  HOG see each map's absolute value scaled to ``[0, 1]`` by its maximum (``data_range=1``);
  HOG uses skimage's defaults (9 orientations, 3×3-cell blocks, L2-Hys) with 8-pixel cells, or
  smaller ones when a side is under 24 pixels; HOG is for 2-D maps only (NaN otherwise);
* a Spearman correlation with a constant map is 0 when only one map is constant (a constant
  map shares no ranking with a structured one: e.g. Grad-CAM of a random classifier is often
  all zeros) and NaN when both are.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections.abc import Hashable, Iterable
from numbers import Integral
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..attribution.arguments import check_flag, check_not_meta, is_number
from ..attribution.inputs import call_model
from ..attribution.state import check_input, check_model, model_state_guard
from .deletion_insertion import method_saliency

__all__ = ["sanity_checks", "randomization_layers", "randomize_layer", "layer_seed", "compare_maps",
           "summarize", "METRICS", "MODES"]

#: Metric names of a record, in the order of the paper's figures.
METRICS = ("spearman_abs", "spearman", "ssim", "hog")

#: Randomisation modes.
MODES = ("cascading", "independent")

LayerType = Union[str, nn.Module]


# ---------------------------------------------------------------------------------------------
# Layers and their re-initialisation
# ---------------------------------------------------------------------------------------------


def _own_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def randomization_layers(model: nn.Module, input: torch.Tensor) -> List[str]:
    """Names of the modules with their own weight of rank ≥ 2 (convolutions, linear layers),
    from the top down: the reverse order of their first call in a forward pass on ``input``
    (modules that are not called are left out)."""
    check_model(model)
    check_input(input, "input", needs_grad=False)
    names = {m: n for n, m in model.named_modules() if _own_weight(m)}
    called: List[str] = []
    seen = set()

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if module not in seen:
            seen.add(module)
            called.append(names[module])

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with model_state_guard(model), torch.no_grad():
            call_model(model, input, input)   # an unbatched or float64 input is named
    finally:
        for h in handles:
            h.remove()
    if not called:
        raise ValueError(
            "the model has no convolution or linear layer called in the forward pass; give "
            "layers explicitly")
    return called[::-1]


def layer_seed(seed: int, name: str) -> int:
    """The seed :func:`sanity_checks` re-initialises layer ``name`` with under run ``seed``
    (a hash of both: each layer's new weights do not depend on which others are randomised)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2 ** 63


def randomize_layer(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s own parameters in place, reproducibly from ``seed``.

    ``reset_parameters()`` when the module has it (run under the seed, the global RNG state is
    restored afterwards), otherwise each own parameter is redrawn from a normal distribution
    with mean 0 and the parameter's standard deviation (0.01 when that is 0).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module (a layer of the model), got "
                        f"{type(module).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2 ** 64:
        # torch.manual_seed would truncate 1.5 and wrap -1 around, silently.
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    params = list(module.parameters(recurse=False))
    for name, p in module.named_parameters(recurse=False):
        if not (p.is_floating_point() or p.is_complex()):
            # normal_ has no integer kernel: PyTorch's NotImplementedError names no parameter.
            raise TypeError(f"randomize_layer redraws floating-point parameters; {name} has "
                            f"dtype {p.dtype}: pass reinit= a function for this module")
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()
        else:
            for p in params:
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                p.normal_(0.0, std if std > 0 and math.isfinite(std) else 0.01)


def _layer_name(layer: Any, names: Dict[str, nn.Module]) -> str:
    """The name of one entry of ``layers`` (a name or a sub-module), with parameters of its
    own."""
    if isinstance(layer, nn.Module):
        found = [n for n, m in names.items() if m is layer]
        if not found:
            raise ValueError(
                f"layers: the module {type(layer).__name__} is not a sub-module of the model")
        name = found[0]
    elif isinstance(layer, str):
        if layer not in names:
            known = [n for n, m in names.items() if _own_weight(m)]
            raise ValueError(
                f"layers: the model has no module {layer!r}; layers with weights: "
                f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
        name = layer
    else:
        raise TypeError(f"layers must hold module names or modules, got {type(layer).__name__}")
    if not list(names[name].parameters(recurse=False)):
        raise ValueError(
            f"layers: module {name!r} ({type(names[name]).__name__}) has no parameters of "
            "its own to randomise")
    return name


def _resolve_layers(model: nn.Module, layers: Optional[Sequence[LayerType]],
                    input: torch.Tensor) -> List[str]:
    if layers is None:
        return randomization_layers(model, input)
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(
            f"layers must be a sequence of module names or modules, got "
            f"{type(layers).__name__}") from None
    if not layers:
        raise ValueError("layers is empty; give at least one layer (or None for all)")
    names = dict(model.named_modules())
    out: List[str] = []
    for layer in layers:
        name = _layer_name(layer, names)
        if name in out:
            raise ValueError(f"layers: {name!r} is given twice")
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    a, b = a.ravel(), b.ravel()
    const_a, const_b = bool(np.all(a == a[0])), bool(np.all(b == b[0]))
    if const_a and const_b:
        return float("nan")
    if const_a or const_b:
        return 0.0
    return float(spearmanr(a, b).statistic)


def _unit(x: np.ndarray) -> np.ndarray:
    """|x| scaled to [0, 1] by its maximum (zeros stay zeros)."""
    x = np.abs(x)
    top = x.max()
    return x / top if top > 0 else x


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    side = min(a.shape)
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return float("nan")
    return float(structural_similarity(a, b, data_range=1.0, win_size=win))


def _hog(x: np.ndarray) -> Optional[np.ndarray]:
    from skimage.feature import hog

    if x.ndim != 2:
        return None
    cell = min(8, min(x.shape) // 3)
    if cell < 1:
        return None
    return hog(x, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(3, 3),
               block_norm="L2-Hys", feature_vector=True)


def compare_maps(reference: Any, other: Any) -> Dict[str, float]:
    """Similarity of two maps of the same shape (tensors or arrays, ``(*spatial)``, a leading
    ``1`` channel allowed): ``{"spearman_abs", "spearman", "ssim", "hog"}`` as floats.

    ``spearman_abs``: Spearman rank correlation of ``|reference|`` and ``|other|``;
    ``spearman``: of the signed maps; ``ssim``: SSIM of the maps' absolute values scaled to
    ``[0, 1]`` by their maxima; ``hog``: Spearman correlation of the HOG features of those
    scaled maps (2-D maps only, NaN otherwise). See the module notes for constant maps.
    """
    a = _as_array(reference, "reference")
    b = _as_array(other, "other")
    if a.shape != b.shape:
        raise ValueError(
            f"reference and other must have the same shape, got {a.shape} and {b.shape}")
    ua, ub = _unit(a), _unit(b)
    ha, hb = _hog(ua), _hog(ub)
    return {
        "spearman_abs": _spearman(np.abs(a), np.abs(b)),
        "spearman": _spearman(a, b),
        "ssim": _ssim(ua, ub),
        "hog": (float("nan") if ha is None or hb is None or ha.size == 0
                else _spearman(ha, hb)),
    }


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        check_not_meta(x, name)
    try:
        complex_values = np.iscomplexobj(x)
    except (TypeError, ValueError) as error:  # ragged lists
        raise ValueError(f"{name} must be a map of numbers ({error})") from None
    if complex_values:
        # Casting would keep the real part only, with at most a ComplexWarning.
        raise TypeError(f"{name} must be a real map, got complex values; pass its real part or "
                        "magnitude (.abs()) explicitly")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:  # strings, ragged lists
        raise ValueError(f"{name} must be a map of numbers ({error})") from None
    for _ in range(2):  # a (1, 1, *spatial) map of a batch of one: HOG and SSIM need the 2-D
        if x.ndim >= 2 and x.shape[0] == 1:
            x = x[0]
    if x.ndim < 1 or x.size < 2:
        raise ValueError(f"{name} must be a map with at least two values, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------


def _method_name(method: Any) -> str:
    return method if isinstance(method, str) else getattr(method, "__name__", repr(method))


def _retarget_kwargs(kwargs: Dict[str, Any], model: nn.Module, twin: nn.Module
                     ) -> Dict[str, Any]:
    """Replace sub-modules of ``model`` in ``kwargs`` by the same-named modules of ``twin``."""
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, nn.Module) and value in names:
            value = twin.get_submodule(names[value])
        out[key] = value
    return out


def _check_arguments(model: nn.Module, input: torch.Tensor, method: Any, mode: Any, seed: Any,
                     method_kwargs: Any, reinit: Any
                     ) -> Tuple[Dict[str, Any], Callable[[nn.Module, int], None]]:
    """Check :func:`sanity_checks`'s arguments; ``method_kwargs`` and ``reinit`` with their
    defaults."""
    check_model(model)
    check_input(input, "input", needs_grad=False)
    if mode not in MODES:
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if method_kwargs is None:
        method_kwargs = {}
    if not isinstance(method_kwargs, dict):
        raise TypeError(f"method_kwargs must be a dict, got {type(method_kwargs).__name__}")
    if isinstance(method, str):
        from ..attribution.registry import METHODS
        METHODS[method]     # a ValueError listing the methods if unknown
    elif not callable(method):
        raise TypeError(f"method must be a method name or a callable, got "
                        f"{type(method).__name__}")
    if reinit is None:
        reinit = randomize_layer
    elif not callable(reinit):
        raise TypeError(f"reinit must be callable(module, seed), got {type(reinit).__name__}")
    return method_kwargs, reinit


def sanity_checks(model: nn.Module, input: torch.Tensor, target: Any,
                  method: Union[str, Callable[..., Any]],
                  layers: Optional[Sequence[LayerType]] = None, *, mode: str = "cascading",
                  seed: int = 0, method_kwargs: Optional[Dict[str, Any]] = None,
                  reinit: Optional[Callable[[nn.Module, int], None]] = None,
                  return_maps: bool = False
                  ) -> Union[List[Dict[str, Any]], Tuple[List[Dict[str, Any]], torch.Tensor]]:
    """Model randomisation test of a saliency method (Adebayo et al. 2018).

    Parameters
    ----------
    model : torch.nn.Module
        The trained model; never modified (the test runs on a deep copy).
    input : torch.Tensor
        ``(N, C, *spatial)`` batch.
    target : int, sequence of int or 1-D integer tensor
        The class explained, passed to the method.
    method : str or callable
        A name in :data:`~torchray_like.attribution.registry.METHODS` or a function
        ``f(model, input, target, **method_kwargs)`` returning ``(N, 1, *spatial)`` maps (see
        :func:`~torchray_like.benchmark.deletion_insertion.method_saliency`). Fix the seed of
        randomised methods (RISE's ``seed``) so that only the model changes between steps.
    layers : sequence of str or nn.Module, optional
        The layers to randomise, **from the top down** (default :func:`randomization_layers`:
        every convolution and linear layer, last called first).
    mode : {"cascading", "independent"}
        Cascading: step ``k`` has layers ``0 .. k-1`` random; independent: only layer ``k-1``.
    seed : int
        Seeds the re-initialisation; layer ``name`` gets the same weights in both modes.
    method_kwargs : dict, optional
        Passed to the method; sub-modules of ``model`` given as values (a ``saliency_layer``)
        are replaced by the copy's.
    reinit : callable, optional
        ``reinit(module, seed)`` re-initialises a module in place (default
        :func:`randomize_layer`).
    return_maps : bool
        Also return the maps: a ``(S, N, 1, *spatial)`` tensor, ``S = len(layers) + 1`` (step
        0 is the original model).

    Returns
    -------
    list of dict
        One record per step and image: ``method``, ``mode``, ``step`` (0 = original),
        ``layer`` (``"original"``, or the layer randomised at this step), ``image`` (index in
        the batch), ``target`` and the metrics of :func:`compare_maps` (:data:`METRICS`)
        against the original map (1 at step 0, NaN where undefined).

    Raises
    ------
    ValueError, TypeError
        For a bad ``mode``, ``seed``, ``layers`` (unknown names, modules without parameters,
        duplicates, an empty list), ``method`` or ``method_kwargs``.
    """
    method_kwargs, reinit = _check_arguments(model, input, method, mode, seed, method_kwargs,
                                             reinit)
    return_maps = check_flag(return_maps, "return_maps")  # "no" is truthy
    names = _resolve_layers(model, layers, input)
    try:
        twin = copy.deepcopy(model)
    except Exception as exc:  # pragma: no cover - depends on the model
        raise ValueError(
            f"sanity_checks works on a deep copy of the model, which failed: {exc}") from exc
    kwargs = _retarget_kwargs(method_kwargs, model, twin)
    targets = _target_list(target, input.shape[0])

    def maps() -> torch.Tensor:
        return method_saliency(method, twin, input, target, **kwargs).detach().cpu()

    original = maps()
    saved: Dict[str, Dict[str, torch.Tensor]] = {}
    all_maps = [original]
    records: List[Dict[str, Any]] = []
    name = _method_name(method)

    def record(step: int, layer: str, smap: torch.Tensor) -> None:
        for i in range(input.shape[0]):
            values = compare_maps(original[i], smap[i])
            records.append({"method": name, "mode": mode, "step": step, "layer": layer,
                            "image": i, "target": targets[i], **values})

    record(0, "original", original)
    for k, layer in enumerate(names, start=1):
        module = twin.get_submodule(layer)
        if mode == "independent":
            saved = {n: t.detach().clone() for n, t in module.state_dict().items()}
        reinit(module, layer_seed(seed, layer))
        smap = maps()
        if mode == "independent":
            module.load_state_dict(saved)
        all_maps.append(smap)
        record(k, layer, smap)
    if return_maps:
        return records, torch.stack(all_maps)
    return records


def _target_list(target: Any, n: int) -> List[Any]:
    if isinstance(target, torch.Tensor) and target.dim() == 1 and not target.is_floating_point():
        return [int(t) for t in target.tolist()]
    if isinstance(target, (list, tuple)):
        return list(target)
    if isinstance(target, np.ndarray) and target.ndim == 1 and target.dtype.kind in "iu":
        return [int(t) for t in target.tolist()]
    if isinstance(target, (int, np.integer)) or (isinstance(target, torch.Tensor)
                                                 and target.dim() == 0):
        return [int(target)] * n
    return [None] * n


def _check_summary_keys(records: Any, keys: Any
                        ) -> Tuple[List[Mapping[str, Any]], Tuple[str, ...]]:
    """``records`` as a list of mappings with real metrics, and ``keys`` as a tuple of names
    that every record has, with hashable values."""
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise TypeError(f"records must be a list of sanity_checks' records (dicts), got "
                        f"{type(records).__name__}")
    if isinstance(keys, str) or not isinstance(keys, Iterable):
        raise TypeError(f"keys must be a sequence of record field names, e.g. ('method', "
                        f"'layer'), got {keys!r}")
    keys, records = tuple(keys), list(records)
    if not all(isinstance(k, str) for k in keys):
        raise TypeError(f"keys must be a sequence of record field names, e.g. ('method', "
                        f"'layer'), got {keys!r}")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise TypeError(f"records[{i}] must be a dict (a record of sanity_checks), got "
                            f"{type(r).__name__}")
        missing = [k for k in keys if k not in r]
        if missing:
            raise ValueError(f"records[{i}] has no field {missing[0]!r} to group by; its "
                             f"fields: {', '.join(map(str, r))}")
        for k in keys:
            if not isinstance(r[k], Hashable):
                raise TypeError(f"records[{i}][{k!r}] must be a hashable value to group by "
                                f"(a str or a number), got {type(r[k]).__name__}")
        for m in METRICS:
            value = r.get(m)
            # None marks a metric not computed; a str or complex would be NumPy's error.
            if value is not None and not (is_number(value) or isinstance(value, torch.Tensor)
                                          and value.numel() == 1 and not value.is_complex()):
                raise ValueError(f"records[{i}][{m!r}] must be a real number (NaN where "
                                 f"undefined), got {value!r:.40}")
    return records, keys


def summarize(records: Sequence[Dict[str, Any]],
              keys: Sequence[str] = ("method", "mode", "step", "layer"), *,
              seed: int = 0) -> List[Dict[str, Any]]:
    """Mean (ignoring NaNs) and count of every metric over the records sharing ``keys``, in the
    order first seen: one dict per group with ``keys``, ``n``, ``<metric>`` /
    ``<metric>_std`` and the 95 % bootstrap interval of the mean over the group's records
    (images), ``<metric>_low`` / ``<metric>_high``
    (:func:`~torchray_like.benchmark.intervals.mean_interval`, resamples seeded by ``seed``).
    """
    from .intervals import mean_interval

    checked, keys = _check_summary_keys(records, keys)
    groups: Dict[Tuple, List[Mapping[str, Any]]] = {}
    for r in checked:  # a generator of records is read once
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rows in groups.items():
        summary: Dict[str, Any] = dict(zip(keys, key))
        summary["n"] = len(rows)
        for m in METRICS:
            values = np.array([np.nan if r[m] is None else float(r[m]) for r in rows if m in r],
                              dtype=np.float64)
            finite = values[np.isfinite(values)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                summary[m] = float(finite.mean()) if finite.size else float("nan")
                summary[m + "_std"] = float(finite.std()) if finite.size else float("nan")
            # Over all the group's records, undefined ones drawn too (as the scripts do).
            clean = np.where(np.isfinite(values), values, np.nan)
            interval = mean_interval(clean, seed=seed) if finite.size else None
            summary[m + "_low"] = interval.low if interval else float("nan")
            summary[m + "_high"] = interval.high if interval else float("nan")
        out.append(summary)
    return out
