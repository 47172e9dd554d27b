r"""SmoothGrad, SmoothGrad² and VarGrad over any method of the library.

Smilkov, Thorat, Kim, Viégas, Wattenberg, "SmoothGrad: removing noise by adding noise", 2017
(arXiv 1706.03825).  A method's map :math:`M` is averaged over ``n`` noisy copies of the input,

.. math::

    \hat M(x) = \frac{1}{n} \sum_{k=1}^{n} M(x + \epsilon_k), \qquad
    \epsilon_k \sim \mathcal{N}(0, \sigma^2 I), \quad
    \sigma = \text{noise\_level} \cdot (\max x - \min x)

per image (the paper's noise level :math:`\sigma / (x_{max} - x_{min})`, 10–20 % recommended).
``kind="smoothgrad_sq"`` averages :math:`M^2` (SmoothGrad², Hooker et al. 2019) and
``kind="vargrad"`` gives the variance :math:`\overline{M^2} - \bar M^2` (Adebayo et al. 2018),
as Captum's ``NoiseTunnel``.

This is not the ``smooth=`` option of the backprop methods, which blurs the finished *map* with
a Gaussian filter; SmoothGrad perturbs the *input* and averages maps.

Every noisy copy is one row of a batch given to the method (copies × images, ``batch_size``
rows at a time).  Each image's noise is drawn from a private CPU generator of its own (seed
``s + n`` for image ``n``, as extremal perturbation seeds its images), so a seed gives the same
maps whatever ``batch_size``, device and batch the image comes in; ``noise=`` takes the draws
themselves (a noise bank).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from .arguments import (
    check_batch,
    check_flag,
    check_not_meta,
    check_number,
    check_progress,
    positive_int,
)
from .integrated_gradients import check_independent_rows
from .maps import quiet_degenerate, samples_text, warn_degenerate, zero_rows
from .modules import check_model
from .reporting import progress_bar
from .seeding import GeneratorsType, image_generators
from .targets import Target, TargetType, parse_target

__all__ = ["smooth_grad", "SMOOTH_GRAD_KINDS", "DEFAULT_NOISE_LEVEL", "DEFAULT_SAMPLES"]

#: The values of ``kind=``.
SMOOTH_GRAD_KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")
#: The paper's noise level σ / (max − min) when none is given.
DEFAULT_NOISE_LEVEL = 0.15
#: The paper's number of noisy copies when neither ``n_samples`` nor ``noise`` is given.
DEFAULT_SAMPLES = 50

MethodType = Union[str, Callable[..., torch.Tensor]]


def _resolve_method(method: Any, options: Dict[str, Any]) -> Callable[..., Any]:
    """The method's function; a named method's options are checked against its signature."""
    if callable(method) and not isinstance(method, str):
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name or a callable (model, input, target, "
                        f"**options) -> maps, got {type(method).__name__}")
    from .registry import METHODS  # the registry lists smooth_grad itself

    if method == "smooth_grad":
        raise ValueError("method='smooth_grad' would nest SmoothGrad in itself; name the method "
                         "to smooth, e.g. method='guided_backprop'")
    function = METHODS[method]  # ValueError listing the known methods
    params = list(inspect.signature(function).parameters.values())[3:]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = {p.name for p in params}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(f"smooth_grad: {method} has no option "
                             f"{', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(sorted(accepted))}")
    if "debug" in options and check_flag(options["debug"], "debug"):
        raise ValueError("smooth_grad averages maps: debug=True is not available through it")
    return function


def _check_noise(noise: Any, input: torch.Tensor, n_samples: Any,
                 noise_level: Any) -> torch.Tensor:
    """A noise bank ``(n, *input.shape)``: the additive noise of each copy."""
    if noise_level is not None:
        raise ValueError("pass noise_level or noise, not both: the noise bank is added as it is")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor (n_samples, *input.shape), got "
                        f"{type(noise).__name__}")
    if noise.dim() != input.dim() + 1 or noise.shape[1:] != input.shape or noise.shape[0] < 1:
        raise ValueError(f"noise must have shape (n_samples, *input.shape) = (n, "
                         f"{', '.join(map(str, input.shape))}), got {tuple(noise.shape)}")
    check_not_meta(noise, "noise")  # (before: PyTorch's "item() cannot be called on meta")
    if n_samples is not None and positive_int(n_samples, "n_samples") != noise.shape[0]:
        raise ValueError(f"n_samples={n_samples} but the noise bank holds {noise.shape[0]} "
                         "copies; omit n_samples")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise holds NaN or infinite values")
    return noise.detach().to(input.device, input.dtype)


class _Noise:
    """The noise of each row (copy k of image i is row ``k · N + i``): from a bank, or drawn
    with image i's own generator, copy after copy (rows come in increasing order), and scaled
    by the image's σ — so an image's noise does not depend on the rest of the batch."""

    def __init__(self, input: torch.Tensor, bank: Optional[torch.Tensor], level: float,
                 generators: Optional[List[torch.Generator]]) -> None:
        self.input, self.bank, self.generators = input, bank, generators
        flat = input.detach().flatten(1)
        self.sigma = (level * (flat.amax(1) - flat.amin(1))).tolist()
        self.dtype = input.dtype if input.dtype in (torch.float32, torch.float64) \
            else torch.float32

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        n = self.input.shape[0]
        if self.bank is not None:
            return self.bank[index // n, index % n]
        assert self.generators is not None
        gens = self.generators
        draws = [torch.randn(self.input.shape[1:], generator=gens[r % n], dtype=self.dtype,
                             device=gens[r % n].device)  # not the caller's default device
                 * self.sigma[r % n] for r in index.tolist()]
        return torch.stack(draws).to(self.input.device, self.input.dtype)


def _row_target(target: Target, image: torch.Tensor) -> Any:
    """The target of the copies ``image`` (a callable scores each row itself)."""
    if target.indices is not None:
        return target.indices.index_select(0, image.to(target.indices.device))
    if target.seed_gradient is not None:
        return target.seed_gradient.index_select(0, image.to(target.seed_gradient.device))
    return target.function


def _call(function: Callable[..., Any], model: nn.Module, noisy: torch.Tensor, target: Any,
          options: Dict[str, Any], name: str, input: torch.Tensor) -> Any:
    """``function`` on a batch of noisy copies; the message of an error it raises that names
    a shape of that batch ends with a note saying so (R copies of the N images, not the
    caller's input; the same exception: ``add_note`` needs Python 3.11)."""
    try:
        return function(model, noisy, target, **options)
    except (ValueError, TypeError) as exc:
        rows = noisy.shape[0]
        # Only a message naming a shape of the noisy batch ("(6, 3, 8, 8)", "(6,)") needs it.
        if exc.args and isinstance(exc.args[0], str) and (
                f"({rows}, " in exc.args[0] or f"({rows},)" in exc.args[0]):
            exc.args = (f"{exc.args[0]} (smooth_grad: {name} raised this on a batch of "
                        f"{rows} noisy copies of the input of shape "
                        f"{tuple(input.shape)}, row r a copy of image r mod {input.shape[0]}; "
                        "the shapes it names are that batch's)",) + exc.args[1:]
        raise


def _check_maps(maps: Any, rows: int, name: str) -> torch.Tensor:
    if isinstance(maps, tuple):
        raise ValueError(f"smooth_grad: {name} returned a tuple, not maps; pass options that make "
                         "it return one map per sample (no debug / return_convergence_delta)")
    if not isinstance(maps, torch.Tensor) or maps.dim() < 1 or maps.shape[0] != rows:
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"smooth_grad: {name} must return one map per sample, a tensor "
                         f"({rows}, ...) for {rows} noisy copies; got {got}")
    return maps


def _configure_noise(input: torch.Tensor, n_samples: Any, noise_level: Any, noise: Any,
                     generator: Any, seed: Any) -> _Noise:
    if noise is not None:
        if generator is not None or seed is not None:
            raise ValueError("pass noise or generator/seed, not both: the noise bank is not drawn")
        return _Noise(input, _check_noise(noise, input, n_samples, noise_level), 0.0, None)
    level = DEFAULT_NOISE_LEVEL if noise_level is None else check_number(
        noise_level, "noise_level", 0.0)
    return _Noise(input, None, level, image_generators(generator, input.shape[0], seed))


def smooth_grad(model: nn.Module, input: torch.Tensor, target: TargetType,
                method: MethodType = "gradient", *, n_samples: Optional[int] = None,
                noise_level: Optional[float] = None, kind: str = "smoothgrad",
                generator: GeneratorsType = None, seed: Optional[int] = None,
                batch_size: int = 32, noise: Optional[torch.Tensor] = None,
                progress: Optional[bool] = None,
                method_kwargs: Optional[Mapping[str, Any]] = None,
                **method_options: Any) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017) of any method: its maps averaged over noisy copies.

    Parameters
    ----------
    model : torch.nn.Module
        The network, passed to the method (which restores its state).
    input : torch.Tensor
        ``(N, C, *spatial)`` finite floating-point batch.
    target : int, sequence, torch.Tensor or callable
        What the method explains; each copy gets its image's target (a callable target scores
        each row of a batch of copies).
    method : str or callable
        A name of :data:`~torchray_like.attribution.registry.METHODS` (default
        ``"gradient"``; ``"guided_backprop"``, ``"grad_cam"``, ``"integrated_gradients"`` ...)
        or a callable ``(model, input, target, **options) -> (B, ...)`` maps.
    n_samples : int, optional
        Noisy copies per image (default 50, the paper's; the bank's count with ``noise``).
    noise_level : float, optional
        σ as a fraction of each image's range ``max − min`` (default 0.15).
    kind : {"smoothgrad", "smoothgrad_sq", "vargrad"}
        The mean of the maps, the mean of their squares, or their variance.
    generator, seed : torch.Generator, int or a sequence of them, optional
        Draw the noise, image by image (:func:`~.seeding.image_seeds`): an int ``s`` seeds
        image ``n`` with ``s + n``, a generator gives ``s`` by one draw, a sequence gives one
        seed or generator per image, ``None`` takes ``s`` from the global RNG (not advanced).
        An image's noise therefore does not depend on the rest of the batch: row ``n`` of a
        seeded batch is the call of that image alone with seed ``s + n``, as for extremal
        perturbation.
    batch_size : int
        Noisy copies per call of the method (default 32).
    noise : torch.Tensor, optional
        A noise bank ``(n_samples, *input.shape)`` added as it is (``noise_level``,
        ``generator`` and ``seed`` are then not used), e.g. to reproduce another library's
        draws.
    progress : bool, optional
        A progress bar (``None``: when stderr is a terminal).
    method_kwargs : mapping, optional
        Options of the method whose names smooth_grad uses itself (RISE's ``batch_size`` ...).
    **method_options
        Options of the method (``saliency_layer="layer4"``, ``n_steps=20`` ...).

    Returns
    -------
    torch.Tensor
        ``(N, ...)``: the method's map shape, in its dtype.
    """
    check_model(model)
    check_batch(model, input, "smooth_grad", needs_grad=False)
    check_independent_rows(model, "smooth_grad")
    if kind not in SMOOTH_GRAD_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, SMOOTH_GRAD_KINDS))}, got "
                         f"{kind!r}")
    if method_kwargs is not None and not isinstance(method_kwargs, Mapping):
        raise TypeError(f"method_kwargs must be a mapping of the method's options (e.g. "
                        f"dict(saliency_layer='layer4')), got {type(method_kwargs).__name__}")
    both = sorted(set(method_kwargs or {}) & set(method_options))
    if both:  # one of the two would silently win
        raise ValueError(f"smooth_grad: {', '.join(map(repr, both))} given both in method_kwargs "
                         "and as a keyword argument; give it once")
    options = {**dict(method_kwargs or {}), **method_options}
    function = _resolve_method(method, options)
    parsed = parse_target(target, input.shape[0], device=input.device)
    sampler = _configure_noise(input, n_samples, noise_level, noise, generator, seed)
    copies = sampler.bank.shape[0] if sampler.bank is not None else (
        DEFAULT_SAMPLES if n_samples is None else positive_int(n_samples, "n_samples"))
    batch = positive_int(batch_size, "batch_size")
    progress = check_progress(progress)
    name = method if isinstance(method, str) else getattr(method, "__name__", "method")
    n, count = input.shape[0], copies * input.shape[0]
    total: Optional[torch.Tensor] = None
    squares: Optional[torch.Tensor] = None
    x = input.detach()
    notes: List[str] = []
    with progress_bar(count, progress, "SmoothGrad", unit="copy") as bar:
        for r0 in range(0, count, batch):
            index = torch.arange(r0, min(r0 + batch, count), device=input.device)
            image = index % n
            noisy = x.index_select(0, image) + sampler.rows(index)
            with quiet_degenerate() as heard:  # named below for the caller's samples
                maps = _check_maps(_call(function, model, noisy, _row_target(parsed, image),
                                         options, name, input), index.numel(), name).detach()
            notes = notes or heard
            if total is None:
                total = maps.new_zeros((n,) + maps.shape[1:], dtype=torch.float64)
                squares = torch.zeros_like(total)
            wide = maps.to(torch.float64)
            total.index_add_(0, image.to(maps.device), wide)
            assert squares is not None
            squares.index_add_(0, image.to(maps.device), wide.square())
            bar.update(index.numel())
            dtype = maps.dtype
            del noisy, maps, wide  # not alive during the next batch: memory is one batch's
    assert total is not None and squares is not None
    result = _combine(total / copies, squares / copies, kind)
    _warn_zero(total, notes, name, n)
    return result.to(dtype)


def _warn_zero(total: torch.Tensor, notes: List[str], name: str, n: int) -> None:
    """Pass on what ``name`` warned (:class:`~.maps.DegenerateMapWarning`) on the noisy copies:
    naming the caller's samples whose every copy gave a zero map, or else the copies' rows."""
    if not notes:
        return
    rows = zero_rows(total)
    if rows:
        warn_degenerate(f"smooth_grad: the map of sample(s) {samples_text(rows)} is all zeros, "
                        f"and {name} said of its noisy copies: {notes[0]}")
    else:
        warn_degenerate(f"smooth_grad: {name} said of a batch of noisy copies (row r a copy of "
                        f"image r mod {n}): {notes[0]}")


def _combine(mean: torch.Tensor, mean_sq: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "smoothgrad":
        return mean
    if kind == "smoothgrad_sq":
        return mean_sq
    return (mean_sq - mean.square()).clamp_(min=0)
