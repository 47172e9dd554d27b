"""The least LRP's rules cost in eager PyTorch, against the floor and against ``lrp()``.

``lrp()`` (Bach et al. 2015; Montavon et al. 2019, "Layer-wise relevance propagation: an
overview") intercepts the model's operations and applies each layer's rule in the backward pass.
This script measures what the rules themselves cost when nothing is intercepted: the embedded
VGG and ResNet are rewritten by hand so that an ordinary forward and backward pass *is* LRP
with the EpsilonPlus rules (z⁺ on the convolutions after the first, ε on the linear layers;
batch norms folded into the convolutions before them), built so that the forward values are the
model's own, bit for bit, and the gradient is the rule's:

* z⁺ on ``x ≥ 0``: ``z ⊙ (d / d.detach())`` with ``z`` the plain output (computed without
  autograd) and ``d = op(x, w⁺) + b⁺ + ε`` (recorded): its value is ``z`` (times exactly one),
  its gradient ``op_{w⁺}ᵀ(z ⊙ g / d)`` — the rule in gradient form.  Behind a batch norm
  ``a ⊙ y + c`` with every ``a > 0``: ``w'⁺ = a ⊙ w⁺``, so ``d = op(x, w⁺) + (b'⁺ + ε) / a``
  with the folded bias ``b' = a ⊙ b + c`` and the batch norm's output in place of ``z``.
* ε: ``z + (t − t.detach())`` with ``t = z ⊙ (z_g / (z + ε sign z))`` and ``z_g`` the recorded
  output: value ``z``, gradient ``op_wᵀ(z ⊙ g / (z + ε sign z))``.

The first layer runs plainly (cheaper than any first-layer rule), so the bound is a lower bound
of every composite that uses z⁺ and ε above it.  The relevance it gives above the first layer is
checked against ``lrp(..., composite="EpsilonPlus")`` read at the same layer (to float rounding).

Times are the CPU time of the calling thread with one PyTorch thread, the three functions
interleaved call by call, medians reported; the ratios are to the floor (forward + gradient to
the input).

Usage::

    python benchmarks/lrp_bound.py                 # both embedded models, 64², about a minute
    python benchmarks/lrp_bound.py --repeats 400 --input-size 112
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time
from typing import Callable, Dict, Tuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _harness import floor_input, freeze, frozen, time_interleaved  # noqa: E402

from torchray_like.attribution.lrp import lrp  # noqa: E402
from torchray_like.benchmark.embedded_models import (  # noqa: E402
    BasicBlock,
    EmbeddedResNet,
    EmbeddedVGG,
    load_embedded_model,
)
from torchray_like.benchmark.runner import image_side_arg, positive_int_arg  # noqa: E402

EPSILON = 1e-6  # the ε of ZPlus() and of the standard composites' linear layers


def zplus(x: torch.Tensor, conv: nn.Conv2d, bn: "nn.BatchNorm2d | None" = None) -> torch.Tensor:
    """``conv`` (and ``bn``) on ``x ≥ 0`` with the z⁺ rule as its gradient (module docstring)."""
    w = conv.weight
    with torch.no_grad():
        z = conv(x) if bn is None else bn(conv(x))
        wp = w.clamp(min=0)
        if bn is None:
            bias = None if conv.bias is None else conv.bias.clamp(min=0) + EPSILON
        else:
            assert bn.running_var is not None and bn.running_mean is not None
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            folded = shift if conv.bias is None else conv.bias * scale + shift
            if bool((scale > 0).all()):
                bias = (folded.clamp(min=0) + EPSILON) / scale
            else:  # w'⁺ is not a ⊙ w⁺: fold the weight
                wp = (w * scale.view(-1, 1, 1, 1)).clamp(min=0)
                bias = folded.clamp(min=0) + EPSILON
    d = F.conv2d(x, wp, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if bias is None:
        d = d + EPSILON
    return z * (d / d.detach())


def epsilon(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear`` with LRP-ε as its gradient (module docstring)."""
    zg = linear(x)
    z = zg.detach()
    t = z * (zg / (z + EPSILON * torch.where(z >= 0, 1.0, -1.0)))
    return z + (t - t.detach())


def vgg_stem(m: EmbeddedVGG, x: torch.Tensor) -> torch.Tensor:
    """The first convolution, its ReLU and max pooling, plainly (``features.0``–``2``)."""
    return m.features[2](m.features[1](m.features[0](x)))


def vgg_rest(m: EmbeddedVGG, h: torch.Tensor) -> torch.Tensor:
    """Everything after the stem, with the rules."""
    for module in list(m.features)[3:]:
        h = zplus(h, module) if isinstance(module, nn.Conv2d) else module(h)
    h = torch.flatten(h, 1)
    for module in m.classifier:
        h = epsilon(h, module) if isinstance(module, nn.Linear) else module(h)
    return h


def resnet_stem(m: EmbeddedResNet, x: torch.Tensor) -> torch.Tensor:
    """``conv1``, ``bn1``, ReLU, max pooling, plainly."""
    return m.maxpool(m.relu(m.bn1(m.conv1(x))))


def _block(b: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    down = b.downsample
    identity = x if down is None else zplus(x, cast(nn.Conv2d, down[0]),  # type: ignore[index]
                                            cast(nn.BatchNorm2d, down[1]))  # type: ignore[index]
    out = torch.relu(zplus(x, b.conv1, b.bn1))
    return torch.relu(zplus(out, b.conv2, b.bn2) + identity)


def resnet_rest(m: EmbeddedResNet, h: torch.Tensor) -> torch.Tensor:
    """The four stages, pooling and the classifier, with the rules."""
    for stage in (m.layer1, m.layer2, m.layer3, m.layer4):
        for block in stage:
            assert isinstance(block, BasicBlock)
            h = _block(block, h)
    return epsilon(torch.flatten(m.avgpool(h), 1), m.fc)


#: model name -> (stem, rest, the layer lrp() reads for the same relevance)
MODELS: Dict[str, Tuple[Callable, Callable, str]] = {
    "embedded-vgg": (vgg_stem, vgg_rest, "features.2"),
    "embedded-resnet": (resnet_stem, resnet_rest, "maxpool"),
}


def bound_call(model: nn.Module, x: torch.Tensor, target: int, name: str
               ) -> Callable[[], torch.Tensor]:
    """Forward and backward through the rewritten model: the gradient at the input."""
    stem, rest, _ = MODELS[name]

    def run() -> torch.Tensor:
        with frozen(model):
            xx = x.detach().requires_grad_(True)
            y = rest(model, stem(model, xx))
            return torch.autograd.grad(y[:, target].sum(), xx)[0]
    return run


def check(model: nn.Module, x: torch.Tensor, target: int, name: str) -> float:
    """Largest difference, relative to the largest value, between the rewritten model's
    relevance after the stem and ``lrp()``'s there; the outputs must be the model's, exactly."""
    stem, rest, layer = MODELS[name]
    with frozen(model):
        h = stem(model, x).detach().requires_grad_(True)
        y = rest(model, h)
        with torch.no_grad():
            if not torch.equal(y, model(x)):
                raise AssertionError(f"{name}: the rewritten model's output differs")
        (g,) = torch.autograd.grad(y[:, target].sum(), h)
    ours = (h.detach() * g).sum(1, keepdim=True)
    ref = cast(torch.Tensor, lrp(model, x, target, saliency_layer=layer,
                                 composite="EpsilonPlus"))
    return float((ours - ref).abs().max() / ref.abs().max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="The least LRP's z+/epsilon rules cost in eager PyTorch (the embedded "
                    "models rewritten so that plain autograd computes them), against the "
                    "floor and lrp().",
        epilog="Without arguments: both embedded models at 64², batch 1, 300 calls each.")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--input-size", type=image_side_arg, default=64, metavar="PX")
    parser.add_argument("--repeats", type=positive_int_arg, default=300,
                        help="calls of each function, interleaved (default: 300)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, batch 1, {args.input_size}², CPU time of the "
          f"thread, median of {args.repeats} interleaved calls")
    print(f"{'model':16} {'floor ms':>9} {'bound ms':>9} {'lrp ms':>8} {'bound×':>7} "
          f"{'lrp×':>6} {'lrp/bound':>9}  check")
    for name in args.models:
        # Frozen once, as benchmarks/speed.py does: no call pays for switching flags.
        model = freeze(load_embedded_model(name))
        x = torch.randn(1, 3, args.input_size, args.input_size)
        target = 3
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError:  # the embedded VGG's classifier takes 64² inputs only
            parser.error(f"--input-size {args.input_size}: {name} does not take a "
                         f"{args.input_size}² input; use 64 (or leave {name} out of --models)")
        error = check(model, x, target, name)
        fns: Dict[str, Callable[[], object]] = {
            "floor": floor_input(model, x, target),
            "bound": bound_call(model, x, target, name),
            "lrp": functools.partial(lrp, model, x, target, composite="EpsilonPlusFlat")}
        t = time_interleaved(fns, args.repeats, warmup=10, clock=time.thread_time)
        print(f"{name:16} {t['floor'] * 1e3:9.2f} {t['bound'] * 1e3:9.2f} "
              f"{t['lrp'] * 1e3:8.2f} {t['bound'] / t['floor']:7.2f} "
              f"{t['lrp'] / t['floor']:6.2f} {t['lrp'] / t['bound']:9.2f}  "
              f"relevance after the stem within {error:.1e} of lrp(EpsilonPlus)")


if __name__ == "__main__":
    main()
