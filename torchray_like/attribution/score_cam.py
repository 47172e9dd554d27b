r"""Score-CAM, and the batched channel passes it shares with Ablation-CAM.

Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu, "Score-CAM: score-weighted visual explanations
for convolutional neural networks", CVPR workshops 2020 (arXiv 1910.01279).  No gradient: each
channel ``A_k`` of a layer's activation, upsampled to the input's size and normalised to
``[0, 1]``, masks the input, and the target's score of the masked input weights the channel:

.. math::

    H_k = \frac{\mathrm{Up}(A_k) - \min \mathrm{Up}(A_k)}{\max \mathrm{Up}(A_k) -
    \min \mathrm{Up}(A_k)}, \qquad
    \alpha_k = \operatorname{softmax}_k\big(y_c(x \odot H_k) - y_c(x_b)\big), \qquad
    M = \operatorname{ReLU}\Big(\sum_k \alpha_k A_k\Big),

as in the paper's Algorithm 1: ``y_c`` is the class logit (the score a target selects: ``±z``
for a single-logit head, a callable target's own scores) and the softmax runs over the channels.
The baseline's score ``y_c(x_b)`` is the same for every channel, so it cancels in the softmax
and is not computed.  The upsampling is linear, bilinear or trilinear by rank
(``align_corners=False``, the convention of ``resize``).  A channel that is constant over space
has no extent to normalise (the paper leaves it undefined): its mask is zero, the input masked
out entirely.

The authors' released code weights channels by the *softmax probability* of the class instead
of a softmax of logits over channels; we follow the paper.  The libraries, measured as black
boxes (``tests/test_cam_family.py``): pytorch-grad-cam 1.5.7's ``ScoreCAM`` follows the paper's
weights but upsamples the masks with ``align_corners=True`` — with ``align_corners=True`` here
the maps are equal after the same normalisation and resize; TorchCAM 0.5's ``ScoreCAM`` follows
the paper's weights but normalises each channel *before* upsampling it (``Up(s(A_k))``) — equal
maps when the layer has the input's resolution (no upsampling).

Transformers: a block's token sequence ``(N, P + h·w, D)`` is read on its patch grid, as by
every layer method (:mod:`~torchray_like.attribution.tokens`): prefix tokens dropped, feature
``k`` of the patch tokens is the map ``A_k`` ``(h, w)``, upsampled into a mask as for a CNN
(pytorch-grad-cam's ``reshape_transform``).

Cost: one forward pass per channel and sample (512 for a ResNet-18 image), batched
``batch_size`` masked inputs at a time into one preallocated buffer; peak memory is one batch of
inputs and its activations, whatever the number of channels.  The layer is chosen as for
Grad-CAM when ``saliency_layer`` is omitted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arguments import check_batch, check_flag, check_progress, check_resize, positive_int
from .context import check_data_parallel, suspend_rule_contexts
from .driver import check_visible, is_input, strip_compiled_prefix
from .grad_cam_plus_plus import channel_sum
from .inputs import ChannelsLastBatches
from .integrated_gradients import check_independent_rows, forward_rows, row_scores
from .layer_choice import resolve_layer
from .maps import (
    check_precision,
    check_smooth,
    constant_rows,
    finish_map,
    samples_text,
    warn_degenerate,
)
from .modules import check_model, unwrap_compiled
from .probe import get_module, layer_label
from .reporting import progress_bar
from .state import model_state_guard
from .targets import Target, TargetType, parse_target
from .tokens import TokensType, check_tokens, layer_tokens, tokens_to_map

__all__ = ["score_cam", "score_cam_masks", "ChannelConfig", "configure_channels",
           "LayerActivation", "LayerRead", "layer_forward", "channel_scores",
           "check_channel_scores"]

_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


@dataclass(frozen=True)
class ChannelConfig:
    """The validated arguments of a channel-perturbation CAM (Score-CAM, Ablation-CAM), built
    by keyword before any forward pass."""

    name: str                  # the method, starting every message
    model: nn.Module           # the eager module (torch.compile unwrapped)
    target: Target
    layer: Any                 # the saliency layer as given or chosen
    module: nn.Module
    batch_size: int
    resize: Any
    resize_mode: str
    smooth: float
    progress: Optional[bool]
    tokens: TokensType = None  # how a token layer's output becomes a map
    automatic: bool = False    # the layer was chosen, not given (the messages differ)


def configure_channels(name: str, model: Any, input: Any, target: Any, saliency_layer: Any,
                       resize: Any, resize_mode: Any, smooth: Any, batch_size: Any,
                       progress: Any, tokens: Any = None) -> ChannelConfig:
    """Check every argument (model, input, target, layer, options) and resolve the layer."""
    check_model(model)
    tokens = check_tokens(tokens)
    check_batch(model, input, name, needs_grad=False)
    parsed = parse_target(target, input.shape[0], device=input.device)
    batch_size = positive_int(batch_size, "batch_size")
    progress = check_progress(progress)
    smooth = check_smooth(smooth)
    resize = check_resize(resize, resize_mode, input.dim() - 2)
    check_independent_rows(model, name)
    eager = unwrap_compiled(model)
    layer = resolve_layer(eager, input, strip_compiled_prefix(saliency_layer, eager))
    if is_input(layer):
        raise ValueError(
            f"{name} weights the channels of a layer's activation: saliency_layer="
            f"{layer!r} (the input) has no such channels; name a convolutional layer, or omit "
            "saliency_layer to pick one automatically")
    module = get_module(eager, layer)
    check_visible(eager, {"saliency_layer": module}, {"saliency_layer": layer}, None)
    check_data_parallel(eager)
    return ChannelConfig(name=name, model=eager, target=parsed, layer=layer, module=module,
                         batch_size=batch_size, resize=resize, resize_mode=resize_mode,
                         smooth=smooth, progress=progress, tokens=tokens,
                         automatic=saliency_layer is None)


class LayerActivation:
    """A forward hook on the saliency layer, in the calling thread only: with ``record``, keeps
    a copy of every output (safe from in-place operations after the layer); when
    ``replacement`` is set, returns it instead of the layer's output."""

    def __init__(self, module: nn.Module, record: bool = True) -> None:
        self.thread = threading.get_ident()
        self.record = record
        self.outputs: List[Any] = []
        self.replacement: Optional[torch.Tensor] = None
        self.rows_in: Optional[int] = None   # the layer input's batch while bypassing, if not
        self.handle = module.register_forward_hook(self.hook)  # the replacement's

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if threading.get_ident() != self.thread:
            return None
        if self.record:
            self.outputs.append(output.clone() if isinstance(output, torch.Tensor) else output)
        if self.replacement is None:
            return None
        if not isinstance(output, torch.Tensor) or (
                output.shape != self.replacement.shape and output is not self.replacement):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise ValueError(
                f"the saliency layer's output changed shape between forward passes ({got} for "
                f"a batch of {tuple(self.replacement.shape)}); the method needs a layer whose "
                "output has one row per sample")
        return self.replacement

    def bypass(self, module: nn.Module) -> Callable[[], None]:
        """Skip the layer's own computation while ``replacement`` is set (Ablation-CAM replaces
        its whole output: computing it first is wasted work), in the calling thread only, for
        calls whose first argument has the replacement's batch.  Returns the function that
        restores the module; a module whose ``forward`` cannot be swapped (TorchScript) is left
        as it is (the hook still replaces its output)."""
        had = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            swap = self.replacement
            if swap is None:
                return original(*args, **kwargs)
            rows = swap.shape[0] if self.rows_in is None else self.rows_in
            if (threading.get_ident() == self.thread and args
                    and isinstance(args[0], torch.Tensor) and args[0].dim() > 0
                    and args[0].shape[0] == rows):
                return swap
            return original(*args, **kwargs)

        try:
            setattr(module, "forward", forward)
        except (AttributeError, RuntimeError, TypeError):
            return lambda: None

        def restore() -> None:
            if had:
                setattr(module, "forward", previous)
            else:
                del module.forward
        return restore

    def remove(self) -> None:
        self.handle.remove()


def _layer_advice(cfg: ChannelConfig) -> str:
    """What to do about an unusable layer: it was given, or chosen automatically (then
    "omit saliency_layer" is no advice)."""
    if cfg.automatic:
        return ("it was chosen automatically: name a layer that outputs (N, C, *spatial) maps "
                "as saliency_layer, or, for a transformer block's token sequence, say its "
                "layout with tokens=TokenLayout(prefix=..., grid=(h, w)) or a callable "
                "tensor -> (N, C, *grid)")
    return ("choose a convolutional layer or a transformer block (its tokens are read on the "
            "patch grid; tokens= says a layout that is not inferred), or omit saliency_layer")


def _checked_activation(cfg: ChannelConfig, input: torch.Tensor, outputs: List[Any]
                        ) -> Tuple[torch.Tensor, Optional[Callable[[torch.Tensor], torch.Tensor]],
                                   torch.Tensor]:
    """The one recorded call of the layer: the output as recorded, the rearrangement of a token
    layer to its grid (:func:`~torchray_like.attribution.tokens.layer_tokens`; ``None`` for a
    map) and the map — floating ``(N, K, *spatial)``, finite, with the input's batch and number
    of spatial dimensions."""
    where = f"{cfg.name}: saliency_layer {layer_label(cfg.layer)}"
    if len(outputs) != 1:
        raise ValueError(
            f"{where} was called {len(outputs)} times in the forward pass; the method reads "
            "one call: choose a module called exactly once (e.g. the enclosing block)")
    (act,) = outputs
    if not isinstance(act, torch.Tensor) or not act.is_floating_point():
        raise ValueError(f"{where} returned {type(act).__name__}, not a floating tensor; "
                         + _layer_advice(cfg))
    try:
        convert = layer_tokens(cfg.model, act, input, cfg.tokens,
                               layer=cfg.layer) if act.dim() > 0 else None
        (grid,) = tokens_to_map(convert, act)
    except ValueError as error:  # the layout's own message says what to pass as tokens=
        text = str(error)
        # It may name saliency_layer itself (layer_layout's refusals): the method's name only.
        raise ValueError(f"{cfg.name}: {text}" if text.startswith("saliency_layer ")
                         else f"{where}: {text}") from None
    if grid.dim() != input.dim() or grid.shape[0] != input.shape[0]:
        read = "" if convert is None else f" (read as {tuple(grid.shape)})"
        raise ValueError(
            f"{where} outputs shape {tuple(act.shape)}{read}, not (N, C, *spatial) with the "
            f"input's batch and {input.dim() - 2} spatial dimension(s) (input "
            f"{tuple(input.shape)}); " + _layer_advice(cfg))
    if not bool(torch.isfinite(grid).all()):
        raise ValueError(f"{where}'s activation holds NaN or infinite values for this input")
    return act, convert, grid


def _finite(scores: torch.Tensor, name: str, what: str) -> torch.Tensor:
    bad = ~torch.isfinite(scores.reshape(scores.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: the target's score is not finite (NaN or inf) for sample(s) "
            f"{bad.nonzero().flatten().tolist()[:10]} on {what}; check the model there")
    return scores


@dataclass(frozen=True)
class LayerRead:
    """The saliency layer's output for the clean input, and the target's scores."""

    grid: torch.Tensor     # the activation as a map (N, K, *spatial): a token layer's on its grid
    scores: torch.Tensor   # the target's scores (N,)
    output: torch.Tensor   # the layer's output as it is (tokens (N, T, D) for a token layer)
    convert: Optional[Callable[[torch.Tensor], torch.Tensor]]  # output -> grid; None: the same


def layer_forward(cfg: ChannelConfig, input: torch.Tensor) -> LayerRead:
    """One forward pass of the clean input: the layer's activation as an ``(N, K, *spatial)``
    map (a transformer block's tokens on their patch grid) and the target's scores ``(N,)``
    (class range checked here, once)."""
    probe = LayerActivation(cfg.module)
    try:
        output = forward_rows(cfg.model, input.detach().clone(), input)
    finally:
        probe.remove()
    act, convert, grid = _checked_activation(cfg, input, probe.outputs)
    rows = torch.arange(input.shape[0], device=input.device)
    scores = row_scores(cfg.target, output, rows, True, cfg.name)
    return LayerRead(grid, _finite(scores.detach(), cfg.name, "the input"), act, convert)


FillType = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def channel_scores(cfg: ChannelConfig, input: torch.Tensor, channels: int, fill: FillType,
                   unit: str, replaces: bool = False) -> torch.Tensor:
    """The target's scores ``(N, channels)`` of one perturbed forward pass per (sample,
    channel) pair, ``cfg.batch_size`` rows at a time.

    ``fill(images, channels, buffer)`` writes the batch's inputs into ``buffer`` (a view of one
    preallocated buffer) for rows that perturb channel ``channels[r]`` of image ``images[r]``,
    and may return a replacement for the layer's output of the batch.  With ``replaces`` (it
    always does), each batch holds copies of one image, the layer itself is skipped and the
    layers below run on *one* copy (:func:`_one_copy_forward`): the rows differ only from the
    layer on.
    """
    n = input.shape[0]
    total = n * channels
    rows = min(cfg.batch_size, channels if replaces else total)
    # Perturbed images in channels-last memory: CPU convolutions run them about twice as fast
    # at these batch sizes.  Checked on the first batch against the plain layout (a model
    # that views its input as contiguous, say): any disagreement, and the plain layout stays.
    layout = ChannelsLastBatches(input, rows, enabled=not replaces)
    scores = torch.empty(total, dtype=torch.float32 if input.dtype != torch.float64
                         else torch.float64, device=input.device)
    hook = LayerActivation(cfg.module, record=False)
    restore = hook.bypass(cfg.module) if replaces else (lambda: None)
    one_copy = replaces
    try:
        with progress_bar(total, cfg.progress, cfg.name, unit=unit) as bar:
            for index in _chunks(n, channels, rows, replaces, input.device):
                images, chans = index // channels, index % channels
                batch = layout.buffer[:index.numel()]
                hook.replacement = fill(images, chans, batch)
                output = _one_copy_forward(cfg, hook, input, images) if one_copy else None
                if output is None:
                    if one_copy:  # the model needs the full batch: refill (in-place ops)
                        one_copy = False
                        hook.replacement = fill(images, chans, batch)
                    output = layout.forward(cfg.model, batch, input)
                r0 = int(index[0])
                scores[r0:r0 + index.numel()] = row_scores(cfg.target, output, images, False,
                                                           cfg.name).detach().to(scores.dtype)
                bar.update(index.numel())
    finally:
        restore()
        hook.remove()
    return _finite(scores.view(n, channels), cfg.name, "some perturbed inputs")


def _chunks(n: int, channels: int, rows: int, per_image: bool,
            device: torch.device) -> Iterator[torch.Tensor]:
    """Row indices ``image · channels + channel`` in batches of at most ``rows``; with
    ``per_image`` no batch straddles two images."""
    if not per_image:
        for r0 in range(0, n * channels, rows):
            yield torch.arange(r0, min(r0 + rows, n * channels), device=device)
        return
    for image in range(n):
        for c0 in range(0, channels, rows):
            yield torch.arange(image * channels + c0, image * channels + min(c0 + rows, channels),
                               device=device)


def _one_copy_forward(cfg: ChannelConfig, hook: LayerActivation, input: torch.Tensor,
                      images: torch.Tensor) -> Optional[torch.Tensor]:
    """The model on one copy of the batch's image, the layer's (skipped) output replaced by the
    batch's rows, or ``None`` when the model does not give one output row per replaced row
    (it reads the batch size from its input, say): the caller then runs the full batch.

    Every row is a copy of the same image, so whatever the layers below compute is the same for
    each row; anything they pass around the layer (a skip connection) broadcasts from one row
    to all, exactly.
    """
    assert hook.replacement is not None
    hook.rows_in = 1
    try:
        output = forward_rows(cfg.model, input.detach()[images[:1]], input)
    except (RuntimeError, ValueError):  # e.g. a shape mismatch from one row: use the full batch
        return None
    finally:
        hook.rows_in = None
    if not isinstance(output, torch.Tensor) or output.dim() == 0 or \
            output.shape[0] != hook.replacement.shape[0]:
        return None
    return output


def check_channel_scores(name: str, clean: torch.Tensor, scores: torch.Tensor) -> None:
    """Warn (:class:`~.maps.DegenerateMapWarning`) when the target's score is the same for
    every perturbed channel of a sample — its channel weights are then all equal, and the map
    the channels' sum scaled (or zero), whatever the target — or (Ablation-CAM) when a
    reduced-precision output (``clean``'s dtype) rounds the drops."""
    rows = constant_rows(scores) if scores.shape[1] > 1 else []
    if rows:
        warn_degenerate(
            f"{name}: the target's score is the same for every perturbed channel of sample(s) "
            f"{samples_text(rows)}: the channel weights are all equal, so the map is the "
            "channels' sum scaled (or zero), whatever the target; the score does not "
            "depend on the layer there, the perturbation leaves the input unchanged (an "
            "all-zero image), or a step, rounding or a saturated sigmoid/softmax hides the "
            "change (explain the logit, or another layer)")
    if name == "ablation_cam":
        # Its weights are the drops themselves; Score-CAM's softmax of the scores moves by the
        # rounding itself (a ~1e-3 relative change of the weights), not by rounding / spread.
        check_precision(name, clean.dtype, clean.to(scores.dtype),
                        scores - clean.to(scores.dtype)[:, None])


def score_cam_masks(activation: torch.Tensor, size: Tuple[int, ...],
                    align_corners: bool = False) -> torch.Tensor:
    """Score-CAM's masks: each channel ``(B, *spatial)`` upsampled (linear family, by rank) to
    ``size`` and min-max normalised to ``[0, 1]``; a constant channel gives a zero mask.

    Returns ``(B, 1, *size)`` in at least float32.
    """
    dtype = activation.dtype if activation.dtype == torch.float64 else torch.float32
    up = F.interpolate(activation.unsqueeze(1).to(dtype), size=size,
                       mode=_LINEAR[len(size)], align_corners=align_corners)
    flat = up.view(up.shape[0], -1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    flat.sub_(low).div_(torch.where(span > 0, span, torch.ones_like(span)))
    return up


def score_cam(model: nn.Module, input: torch.Tensor, target: TargetType,
              saliency_layer: Any = None, resize: Any = False, resize_mode: str = "bilinear",
              smooth: float = 0, batch_size: int = 32, *, progress: Optional[bool] = None,
              align_corners: bool = False, tokens: TokensType = None) -> torch.Tensor:
    """Score-CAM saliency map (Wang et al. 2020); see the module docstring for the formula.

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode under :func:`torch.no_grad`, its ``training`` flags
        restored; parameters untouched).  Refused: layers using batch statistics in eval mode
        (masked copies batched together would change one another's scores).
    input : torch.Tensor
        ``(N, C, *spatial)`` finite floating-point batch (1-D, 2-D or 3-D data).  The masked
        value is 0 (e.g. the mean colour of normalised images).
    target : int, sequence, torch.Tensor or callable
        The class to explain (one int for all samples, one per sample), a seed-gradient tensor
        shaped like the output (the score ``Σ seed · output``), or a callable
        ``output -> (B,)`` scoring each row of a forward batch of masked copies.  A
        single-logit head takes 1 (the logit) or 0 (its negation).
    saliency_layer : str or torch.nn.Module, optional
        The layer whose channels mask the input; ``None`` (default): chosen as for Grad-CAM
        (:func:`~torchray_like.attribution.layer_choice.find_saliency_layer`).  It must output
        ``(N, K, *spatial)`` with the input's number of spatial dimensions, or a transformer
        block's tokens (read on the patch grid, see ``tokens``), once per forward.
    resize : bool, int or tuple
        ``False``: the map stays at the layer's resolution; ``True``: the input's size; or an
        explicit size (see :func:`~torchray_like.attribution.maps.resize_saliency`).
    resize_mode : str
        Interpolation for ``resize``.
    smooth : float
        If positive, Gaussian smoothing with ``sigma = smooth * max(map size)``.
    batch_size : int
        Masked inputs per forward pass (default 32).
    progress : bool, optional
        A progress bar (``None``: when stderr is a terminal).
    align_corners : bool
        How the masks are upsampled: ``False`` (default) is the convention of ``resize`` and of
        the authors' code; ``True`` gives pytorch-grad-cam's masks (its
        ``UpsamplingBilinear2d``), hence its maps.
    tokens : None, False, TokenLayout or callable, keyword-only
        How ``saliency_layer``'s output becomes an ``(N, K, *grid)`` map when it is a
        transformer block's tokens ``(N, T, D)`` (or a channels-last stage): ``None``
        (default) infers it (prefix tokens dropped, patch tokens on the patch grid; see
        :mod:`~torchray_like.attribution.tokens`), ``False`` reads the tensor as it is, a
        :class:`~torchray_like.attribution.tokens.TokenLayout` says it, a callable
        ``tensor -> (N, K, *grid)`` does it.  The grid's channels are the masks.

    Returns
    -------
    torch.Tensor
        ``(N, 1, *layer_spatial)`` non-negative maps (or resized), on the input's device, in
        the input's dtype, not requiring grad.

    Raises
    ------
    TypeError, ValueError
        For a non-module model, an input that is not a finite floating batch, a bad target,
        ``batch_size``, ``resize``, ``smooth`` or ``progress``, the input as the layer, a layer
        called more than once or without spatial maps, batch-statistics layers, and scores that
        are not finite.
    """
    cfg = configure_channels("score_cam", model, input, target, saliency_layer, resize,
                             resize_mode, smooth, batch_size, progress, tokens)
    align_corners = check_flag(align_corners, "align_corners")
    x = input.detach()
    with suspend_rule_contexts(), model_state_guard(cfg.model, freeze=False), torch.no_grad():
        read = layer_forward(cfg, input)
        act = read.grid  # a token layer's activation on its patch grid
        size = tuple(input.shape[2:])

        def fill(images: torch.Tensor, chans: torch.Tensor, batch: torch.Tensor) -> None:
            torch.index_select(x, 0, images, out=batch)
            batch.mul_(score_cam_masks(act[images, chans], size, align_corners).to(
                batch.dtype))

        scores = channel_scores(cfg, input, act.shape[1], fill, "mask")
        check_channel_scores(cfg.name, read.scores, scores)
        weights = torch.softmax(scores, dim=1)
        smap = channel_sum(weights, act.to(weights.dtype))
    return finish_map(input, smap, cfg.resize, cfg.resize_mode, cfg.smooth)
