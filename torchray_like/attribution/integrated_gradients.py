r"""Integrated gradients.

Sundararajan, Taly, Yan, "Axiomatic attribution for deep networks", ICML 2017 (arXiv
1703.01365).  For an input :math:`x`, a baseline :math:`x'` and the target's score :math:`f`,

.. math::

    \mathrm{IG}_j(x) = (x_j - x'_j) \int_0^1
        \frac{\partial f}{\partial x_j}\bigl(x' + \alpha (x - x')\bigr)\, d\alpha ,

approximated by a quadrature :math:`\sum_k w_k\, g(\alpha_k)` over ``n_steps`` points (the
rules of :data:`INTEGRATION_RULES`).  Completeness: the exact integral sums to
:math:`f(x) - f(x')`; the gap of the quadrature, :math:`\sum_j \mathrm{IG}_j - (f(x) - f(x'))`,
is returned with ``return_convergence_delta=True`` (it shrinks as ``n_steps`` grows).

**Layer integrated gradients** (``saliency_layer`` a module), as Captum's
``LayerIntegratedGradients``: with :math:`a = \ell(x)` and :math:`a' = \ell(x')` the layer's
outputs, the path is straight *in the layer's space*: the model runs on :math:`x` with the
layer's output replaced by :math:`a' + \alpha (a - a')`, and the attribution is
:math:`(a - a') \int_0^1 \partial f / \partial a \, d\alpha`.  Completeness holds at the layer
when the rest of the network depends on the input through that layer only.

Every interpolation point is one row of a forward batch; the rows (steps × images) are cut into
batches of ``internal_batch_size`` rows, so peak memory is one batch with its graph whatever
``n_steps`` is.  The rows of a batch must not depend on one another: models normalising with
batch statistics in eval mode are refused (:func:`check_independent_rows`).
"""

from __future__ import annotations

from numbers import Real
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .arguments import (
    check_batch,
    check_flag,
    check_not_meta,
    check_progress,
    check_resize,
    positive_int,
)
from .context import suspend_rule_contexts
from .inputs import call_model
from .maps import (
    FLAT_SCORE_CAUSES,
    finish_map,
    samples_text,
    smooth_saliency,
    warn_degenerate,
    zero_rows,
)
from .modules import batch_statistics_layers, check_model, opaque_modules, unwrap_compiled
from .probe import get_module, layer_label
from .reporting import progress_bar
from .seeding import GeneratorsType, image_generators
from .state import autograd_grad, model_state_guard
from .targets import Target, TargetType, parse_target
from .tokens import TokensType, check_tokens, layer_tokens, tokens_to_map

__all__ = ["integrated_gradients", "INTEGRATION_RULES", "integration_points", "BASELINES",
           "resolve_baseline", "blur_baseline", "uniform_baseline", "REDUCTIONS",
           "reduce_channels", "row_scores", "check_independent_rows", "forward_rows"]

#: The quadrature rules of ``rule=`` (Captum's ``method=`` names).
INTEGRATION_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                     "riemann_trapezoid")
#: The baseline presets of ``baseline=``.
BASELINES = ("zeros", "blur", "uniform")
#: How attributions ``(N, C, *spatial)`` become maps ``(N, 1, *spatial)`` (``None``: kept).
REDUCTIONS = ("sum", "mean", None)

BaselineType = Union[None, str, float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Helpers shared with occlusion and SmoothGrad
# ---------------------------------------------------------------------------------------------


def check_independent_rows(model: nn.Module, method: str) -> None:
    """Refuse a model whose samples are not independent within a batch.

    The perturbation-style methods put many perturbed copies (interpolation points, occluded or
    noisy copies) of several images in one forward batch.  A layer normalising with the
    batch's statistics in eval mode (batch norm with ``track_running_stats=False``) would mix
    them, and the result would depend on ``internal_batch_size`` / ``batch_size``.
    """
    layers = batch_statistics_layers(model)
    if layers:
        raise ValueError(
            f"{method}: layer(s) {', '.join(map(repr, layers[:5]))} normalise with the "
            "statistics of the batch even in eval mode (track_running_stats=False), so a "
            "perturbed copy's score would depend on the other copies batched with it; give "
            "these layers running statistics (track_running_stats=True, then calibrate them) "
            "to explain the model with this method")


def row_scores(target: Target, output: Any, rows: torch.Tensor, check_range: bool,
               name: str) -> torch.Tensor:
    """The target's score ``(B,)`` of each row of a forward batch; ``rows`` (``(B,)``) gives
    the image each row is a copy of.

    Class indices read ``output[row, class]`` (``±z`` for a single-logit head) as the
    backpropagation seed does; a callable target scores the rows itself; a seed-gradient
    target gives ``Σ seed[image] · output[row]``, the score whose gradient that seed is.
    """
    if target.kind != "seed":
        return target.scores(output, None, samples=rows, check_range=check_range, name=name)
    assert target.seed_gradient is not None
    if not isinstance(output, torch.Tensor) or output.shape[1:] != target.seed_gradient.shape[1:]:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(
            f"{name}: a seed-gradient target must be shaped like the model output, batch first; "
            f"got target {tuple(target.seed_gradient.shape)} for an output {got}")
    seed = target.seed_gradient.to(output.device, output.dtype).index_select(
        0, rows.to(output.device))
    return (output * seed).flatten(1).sum(1)


def forward_rows(model: nn.Module, batch: torch.Tensor, input: torch.Tensor) -> Any:
    """``model(batch)``; a failure caused by the input's layout or dtype says what to do
    (:func:`~torchray_like.attribution.inputs.call_model`)."""
    return call_model(model, batch, input)


def check_reduce(reduce: Any, resize: Any, resize_mode: Any, spatial: int) -> Any:
    """Validate ``reduce`` (one of :data:`REDUCTIONS`) and ``resize`` for it."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be 'sum', 'mean' or None (the per-channel attribution), "
                         f"got {reduce!r}")
    resize = check_resize(resize, resize_mode, spatial)
    if reduce is None and resize:
        raise ValueError("resize applies to maps: pass reduce='sum' or 'mean' with it (reduce=None "
                         "returns the per-channel attribution at its own resolution)")
    return resize


def reduce_channels(attribution: torch.Tensor, reduce: Optional[str], name: str,
                    where: str = "the input") -> torch.Tensor:
    """``(N, C, *spatial)`` attributions as ``(N, 1, *spatial)`` maps: the signed sum or mean
    over channels (``reduce=None``: unchanged)."""
    if reduce is None:
        return attribution
    if attribution.dim() < 3:
        raise ValueError(
            f"{name}: the attribution at {where} has shape {tuple(attribution.shape)}, without "
            "spatial dimensions, so it makes no map; choose a layer with an (N, C, *spatial) "
            "output, or pass reduce=None for the attribution itself")
    if reduce == "sum":
        return attribution.sum(1, keepdim=True)
    return attribution.mean(1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Quadrature and baselines
# ---------------------------------------------------------------------------------------------


def integration_points(rule: str, n_steps: int) -> Tuple[List[float], List[float]]:
    """The points ``α_k`` in ``[0, 1]`` and weights ``w_k`` of a quadrature rule.

    ``gausslegendre``: the Gauss–Legendre nodes mapped to ``[0, 1]`` (exact for polynomials
    of degree ``2 n - 1``); ``riemann_left/right/middle``: ``α_k = k/n, (k+1)/n, (k+½)/n`` with
    weights ``1/n``; ``riemann_trapezoid``: ``α_k = k/(n-1)`` with weights ``1/(n-1)``, halved at
    both ends (the weights sum to 1; Captum's sum to ``(n-1)/n``, so its trapezoid attributions
    are ``(n-1)/n`` times these).
    """
    if rule not in INTEGRATION_RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, INTEGRATION_RULES))}, got "
                         f"{rule!r}")
    n = positive_int(n_steps, "n_steps")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return [0.5 * (1.0 + float(t)) for t in nodes], [0.5 * float(w) for w in weights]
    if rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("rule 'riemann_trapezoid' needs n_steps >= 2 (both ends of the "
                             f"path), got {n}")
        ends = [0.5 / (n - 1)]
        return [k / (n - 1) for k in range(n)], ends + [1.0 / (n - 1)] * (n - 2) + ends
    shift = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
    return [(k + shift) / n for k in range(n)], [1.0 / n] * n


def blur_baseline(sigma: Union[float, Sequence[float]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A baseline function: the input blurred by a Gaussian of ``sigma`` pixels (one value or
    one per spatial axis), borders replicated (Sturmfels, Lundberg, Lee, Distill 2020)."""
    def blur(x: torch.Tensor) -> torch.Tensor:
        return smooth_saliency(x, sigma)
    return blur


def uniform_baseline(x: torch.Tensor, generator: GeneratorsType) -> torch.Tensor:
    """Uniform noise between each image's minimum and maximum, drawn with ``generator`` — one
    CPU generator for the whole batch, or a sequence of them, one per image (then an image's
    baseline does not depend on the rest of the batch); an int ``s``, ``None`` or a sequence
    of seeds draw image by image with :func:`~.seeding.image_generators` (image ``n``: seed
    ``s + n``), as :func:`resolve_baseline` does — on the CPU, so that a seed gives the same
    baseline on every device."""
    flat = x.detach().flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if isinstance(generator, torch.Generator):
        u = torch.rand(x.shape, generator=generator, dtype=dtype, device=generator.device)
    else:
        if not (isinstance(generator, (list, tuple))
                and all(isinstance(g, torch.Generator) for g in generator)):
            generator = image_generators(generator, x.shape[0])  # seeds: one generator each
        if len(generator) != x.shape[0]:
            raise ValueError(f"generator has {len(generator)} entries but the batch has "
                             f"{x.shape[0]} images; give one per image, or a single one")
        u = torch.stack([torch.rand(x.shape[1:], generator=g, dtype=dtype, device=g.device)
                         for g in generator])
    u = u.to(x.device, x.dtype)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return low.view(shape) + u * (high - low).view(shape)


def _check_baseline_tensor(value: Any, input: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        got = f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{what} must be a floating-point tensor, got {got}")
    check_not_meta(value, what)  # (before: PyTorch's "Cannot copy out of meta tensor")
    try:
        shape = torch.broadcast_shapes(value.shape, input.shape)
    except RuntimeError:
        shape = None
    if shape != input.shape:
        raise ValueError(
            f"{what} has shape {tuple(value.shape)}, which does not broadcast to the input's "
            f"{tuple(input.shape)}; pass one baseline per image, or one shared by all (e.g. "
            "shape (1, C, 1, 1) for a colour per channel)")
    value = value.detach().to(input.device, input.dtype).expand(input.shape)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} holds NaN or infinite values")
    return value


def resolve_baseline(baseline: BaselineType, input: torch.Tensor,
                     generator: GeneratorsType = None) -> torch.Tensor:
    """The baseline as a tensor shaped like ``input``.

    ``None`` or ``"zeros"``: zeros; a number: that constant; ``"blur"``: the input blurred by
    a Gaussian of a tenth of its largest spatial size (:func:`blur_baseline` for another
    sigma); ``"uniform"``: :func:`uniform_baseline` drawn image by image with the generators
    of ``generator`` (:func:`~.seeding.image_generators`: seed ``s + n`` for image ``n``); a tensor
    broadcastable to the input; a callable ``input -> tensor``.
    """
    x = input.detach()
    if baseline is None or (isinstance(baseline, str) and baseline == "zeros"):
        return torch.zeros_like(x)
    if isinstance(baseline, str):
        if baseline == "blur":
            return blur_baseline(0.1 * max(x.shape[2:]))(x)
        if baseline == "uniform":
            return uniform_baseline(x, image_generators(generator, x.shape[0]))
        raise ValueError(f"baseline must be one of {', '.join(map(repr, BASELINES))}, a number, "
                         f"a tensor or a callable input -> tensor, got {baseline!r}")
    if isinstance(baseline, Real) and not isinstance(baseline, (bool, np.bool_)):
        if not np.isfinite(float(baseline)):
            raise ValueError(f"baseline must be finite, got {baseline!r}")
        return torch.full_like(x, float(baseline))
    if isinstance(baseline, torch.Tensor):
        return _check_baseline_tensor(baseline, x, "baseline")
    if callable(baseline):
        with torch.no_grad():
            made = baseline(x.clone())
        return _check_baseline_tensor(made, x, "the tensor the baseline callable returned")
    raise TypeError(f"baseline must be None, 'zeros', 'blur', 'uniform', a number, a tensor or "
                    f"a callable input -> tensor, got {type(baseline).__name__}")


# ---------------------------------------------------------------------------------------------
# The layer: record its output, or replace it by a point of the path
# ---------------------------------------------------------------------------------------------


class _LayerSwap:
    """A forward hook on the saliency layer: records its output (``replacement is None``) or
    replaces it by ``replacement``, switching autograd on from there (the forward runs under
    ``no_grad``: nothing below the layer is recorded)."""

    def __init__(self, module: nn.Module, layer: Any) -> None:
        self.layer = layer
        self.recorded: List[torch.Tensor] = []
        self.replacement: Optional[torch.Tensor] = None
        self.calls = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        self.calls += 1
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"integrated_gradients: saliency_layer {layer_label(self.layer)} returns a "
                f"{type(output).__name__}, not a tensor; choose a layer whose output is one "
                "tensor")
        if self.replacement is None:
            self.recorded.append(output.detach().clone())
            return None
        torch.set_grad_enabled(True)  # undone when the caller's no_grad block ends
        # A copy: an in-place operation after the layer must not write into the leaf.
        return self.replacement.clone()

    def check_calls(self, rows: int) -> None:
        calls, self.calls = self.calls, 0
        if calls != 1:
            raise ValueError(
                f"integrated_gradients: saliency_layer {layer_label(self.layer)} was called "
                f"{calls} times in one forward pass; layer integrated gradients needs a layer "
                "called exactly once (choose another layer, or the input)")
        if self.recorded and self.recorded[-1].shape[:1] != (rows,):
            raise ValueError(
                f"integrated_gradients: saliency_layer {layer_label(self.layer)} outputs shape "
                f"{tuple(self.recorded[-1].shape)}, whose first dimension is not the batch "
                f"({rows}); choose a layer whose output is batch first")


def _layer_module(model: nn.Module, layer: Any) -> Optional[nn.Module]:
    """The module of ``saliency_layer`` (``None``: the input), refused inside a TorchScript or
    compiled sub-module (a hook cannot see inside)."""
    if layer is None or (isinstance(layer, str) and layer == ""):
        return None
    module = get_module(model, layer)
    for name, opaque, kind in opaque_modules(model):
        if any(m is module for m in opaque.modules()) and opaque is not module:
            raise ValueError(
                f"integrated_gradients: saliency_layer {layer_label(layer)} is inside the "
                f"{kind} module {name!r}, whose layers a hook cannot replace; choose a layer "
                "outside it, or the input")
    return module


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class _Path:
    """The straight path of one call: where it starts (the baseline, or the layer's output on
    it), where it ends, and the target's scores at both ends."""

    def __init__(self, model: nn.Module, input: torch.Tensor, baseline: torch.Tensor,
                 target: Target, swap: Optional[_LayerSwap], need_gap: bool) -> None:
        n = input.shape[0]
        x = input.detach()
        self.gap: Optional[torch.Tensor] = None
        if swap is None and not need_gap:
            # At the input without the completeness gap the ends are known: no forward pass
            # (the path's own batches check the class range and that scores are finite).
            self.end, self.start = x, baseline
            self.diff = x - baseline
            return
        with torch.no_grad():
            output = forward_rows(model, torch.cat([x, baseline]), input)
            if swap is not None:
                swap.check_calls(2 * n)
            rows = torch.arange(n, device=input.device).repeat(2)
            scores = row_scores(target, output, rows, True, "integrated_gradients")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("integrated_gradients: the target scores of the input or the "
                             "baseline are not finite (NaN or inf)")
        self.gap = scores[:n] - scores[n:]                       # f(x) - f(x')
        both = swap.recorded.pop() if swap is not None else torch.cat([x, baseline])
        self.end, self.start = both[:n], both[n:]
        self.diff = self.end - self.start


def _integrate(model: nn.Module, input: torch.Tensor, path: _Path, target: Target,
               swap: Optional[_LayerSwap], points: Tuple[List[float], List[float]],
               batch: int, progress: Optional[bool], where: str) -> torch.Tensor:
    """``Σ_k w_k ∂f/∂a (a' + α_k (a − a'))`` per image, ``batch`` rows (step, image) at a
    time."""
    n = input.shape[0]
    alphas = torch.tensor(points[0], dtype=path.diff.dtype, device=input.device)
    weights = torch.tensor(points[1], dtype=path.diff.dtype, device=input.device)
    total = torch.zeros_like(path.diff)
    count = alphas.numel() * n
    view = (-1,) + (1,) * (path.diff.dim() - 1)
    with progress_bar(count, progress, "integrated gradients", unit="point") as bar:
        for r0 in range(0, count, batch):
            index = torch.arange(r0, min(r0 + batch, count), device=input.device)
            step, image = index // n, index % n
            point = (path.start[image] + alphas[step].view(view) * path.diff[image]
                     ).requires_grad_(True)
            # At a layer, the forward runs without a graph up to the layer (its hook switches
            # autograd on); at the input, with one from the copy of the point on.
            with torch.enable_grad() if swap is None else torch.no_grad():
                if swap is None:
                    output = forward_rows(model, point.clone(), input)
                else:
                    swap.replacement = point
                    output = forward_rows(model, input.detach()[image], input)
                    swap.check_calls(index.numel())
                scores = row_scores(target, output, image, r0 == 0, "integrated_gradients")
            if not scores.requires_grad:
                raise ValueError(f"integrated_gradients: the target scores do not depend on "
                                 f"{where} through autograd")
            if not bool(torch.isfinite(scores).all()):
                raise ValueError("integrated_gradients: the target scores at a point of the path "
                                 "are not finite (NaN or inf)")
            (grad,) = autograd_grad(scores, point, torch.ones_like(scores))
            if not bool(torch.isfinite(grad).all()):
                raise ValueError("integrated_gradients: the gradient at a point of the path is "
                                 "not finite (NaN or inf)")
            total.index_add_(0, image, grad * weights[step].view(view))
            bar.update(index.numel())
    return total


def _warn_zero_gradient(total: torch.Tensor, diff: torch.Tensor, where: str) -> None:
    """A :class:`~.maps.DegenerateMapWarning` for the samples whose attribution is zero for a
    reason the user should hear: the gradient is exactly zero at every point of the path, or
    the input equals the baseline (at a layer: the same activation)."""
    rows = zero_rows(total)
    if rows:
        warn_degenerate(
            f"integrated_gradients: the gradient of the target score with respect to {where} "
            f"is exactly zero at every point of the path for sample(s) {samples_text(rows)}: "
            f"the score does not change through autograd there ({FLAT_SCORE_CAUSES}, or every "
            "rectifier off) — the map is all zeros; explain a score that varies smoothly with "
            "the input, or use a perturbation method (occlusion, rise)")
    same = sorted(set(zero_rows(diff)) - set(rows))
    if same:
        warn_degenerate(
            f"integrated_gradients: the input equals the baseline (the path has length zero "
            f"at {where}) for sample(s) {samples_text(same)}, so the attribution is zero by "
            "definition (it sums to f(x) - f(baseline) = 0); choose another baseline (a number, "
            "'blur', 'uniform' or a tensor)")


def integrated_gradients(model: nn.Module, input: torch.Tensor, target: TargetType, *,
                         saliency_layer: Union[str, nn.Module, None] = "",
                         baseline: BaselineType = None, n_steps: int = 50,
                         rule: str = "gausslegendre", internal_batch_size: int = 64,
                         return_convergence_delta: bool = False, reduce: Optional[str] = "sum",
                         resize: Any = False, resize_mode: str = "bilinear",
                         generator: GeneratorsType = None, progress: Optional[bool] = None,
                         tokens: TokensType = None
                         ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    r"""Integrated-gradients maps (Sundararajan et al. 2017), at the input or at a layer.

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode, its ``training`` flags restored; parameters untouched;
        no hook left behind).  Refused: layers using batch statistics in eval mode.
    input : torch.Tensor
        ``(N, C, *spatial)`` finite floating-point batch (1-D, 2-D or 3-D data).
    target : int, sequence, torch.Tensor or callable
        The class to explain (one for all, one per sample), a seed-gradient tensor shaped like
        the output, or a callable ``output -> (B,)`` scoring each row of a batch.
    saliency_layer : str or torch.nn.Module, optional
        ``""`` or ``None`` (default): the input.  A layer (dotted name or module): layer
        integrated gradients as Captum's ``LayerIntegratedGradients`` (see the module
        docstring); the layer must be called once per forward pass.
    baseline : None, str, float, torch.Tensor or callable
        ``None``/``"zeros"`` (default), ``"blur"``, ``"uniform"`` (with ``generator``), a
        number, a tensor broadcastable to the input, or ``input -> tensor``
        (:func:`resolve_baseline`).
    n_steps : int
        Points of the quadrature (default 50, as Captum).
    rule : str
        One of :data:`INTEGRATION_RULES` (Captum's ``method=``): default ``"gausslegendre"``.
    internal_batch_size : int
        Rows (step × image) per forward batch: the memory bound (default 64).
    return_convergence_delta : bool
        Also return the completeness gap ``Σ attribution − (f(x) − f(x'))``, shape ``(N,)``.
    reduce : {"sum", "mean", None}
        The map is the signed sum (default) or mean over channels; ``None`` returns the
        per-channel attribution (Captum's output).
    resize, resize_mode
        Resize the map (see :func:`~torchray_like.attribution.maps.resize_saliency`).
    generator : torch.Generator, int, a sequence of them, or None
        Draws the ``"uniform"`` baseline image by image (:func:`~.seeding.image_seeds`: an int
        ``s`` seeds image ``n`` with ``s + n``; ``None``: ``s`` from the global RNG, not
        advanced), so row ``n`` of a seeded batch is the call of that image alone with seed
        ``s + n``.
    progress : bool, optional
        A progress bar (``None``: when stderr is a terminal).
    tokens : None, False, TokenLayout or callable
        How a transformer block's token output becomes a map (``reduce`` not ``None``):
        inferred by default (see :mod:`~torchray_like.attribution.tokens`); ``reduce=None``
        returns the attribution in the layer's own layout.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``(N, 1, *spatial)`` signed maps (``(N, C, *spatial)`` with ``reduce=None``) in the
        input's dtype, detached; with ``return_convergence_delta``, also the ``(N,)`` gap.
    """
    check_model(model)
    check_batch(model, input, "integrated_gradients", needs_grad=True)
    model = unwrap_compiled(model)
    check_independent_rows(model, "integrated_gradients")
    parsed = parse_target(target, input.shape[0], device=input.device)
    points = integration_points(rule, n_steps)
    batch = positive_int(internal_batch_size, "internal_batch_size")
    delta_wanted = check_flag(return_convergence_delta, "return_convergence_delta")
    resize = check_reduce(reduce, resize, resize_mode, input.dim() - 2)
    progress = check_progress(progress)
    tokens = check_tokens(tokens)
    module = _layer_module(model, saliency_layer)
    where = "the input" if module is None else f"saliency_layer {layer_label(saliency_layer)}"
    base = resolve_baseline(baseline, input, generator)
    swap = None if module is None else _LayerSwap(module, saliency_layer)
    try:
        with suspend_rule_contexts(), model_state_guard(model, freeze=False):
            path = _Path(model, input, base, parsed, swap, delta_wanted)
            total = _integrate(model, input, path, parsed, swap, points, batch, progress, where)
    finally:
        if swap is not None:
            swap.handle.remove()
    _warn_zero_gradient(total, path.diff, where)
    attribution = (path.diff * total).to(input.dtype)
    # A transformer block's tokens on their patch grid (the products commute with that).
    maps = attribution if module is None or reduce is None else tokens_to_map(
        layer_tokens(model, attribution, input, tokens, layer=saliency_layer), attribution)[0]
    smap = reduce_channels(maps, reduce, "integrated_gradients", where)
    if reduce is not None:
        smap = finish_map(input, smap, resize, resize_mode)
    if not delta_wanted:
        return smap
    assert path.gap is not None  # computed when the gap is wanted
    delta = attribution.flatten(1).sum(1) - path.gap.to(attribution.dtype)
    return smap, delta
