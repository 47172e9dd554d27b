"""Speed cases for the layer methods: Grad-CAM, guided Grad-CAM, linear approximation.

Picked up by ``benchmarks/speed.py`` (``--methods grad_cam guided linear``); alone,
``python benchmarks/speed_layer.py`` prints speed.py's table restricted to these rows (speed.py's
options apply, e.g. ``--full``).  Floors:

* ``grad_cam``, ``linear_approx`` at a layer: plain forward + ``autograd.grad`` to the layer's
  output and no further (:func:`_harness.floor_layer`);
* ``linear_approx`` at the input: plain forward + ``autograd.grad`` to the input;
* ``guided_grad_cam``: its least possible work with plain gradients — one forward, then
  ``autograd.grad`` to the layer (kept graph) and to the input.  Grad-CAM's weights need the
  plain gradient at the layer and the guided part needs a full backward, so the part of the
  backward above the layer is necessarily run twice; the second row compares with the
  single-backward floor to show what that costs.
* ``grad_cam(auto layer)``: the layer chosen by ``find_saliency_layer`` (cached after the warm-up
  call, so the automatic choice should cost nothing).
"""

from __future__ import annotations

import pathlib
import sys
from typing import List

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _harness import Case, floor_input, floor_layer, frozen  # noqa: E402

from torchray_like.attribution.common import get_backward_gradient, get_module  # noqa: E402
from torchray_like.attribution.grad_cam import find_saliency_layer, grad_cam  # noqa: E402
from torchray_like.attribution.guided_grad_cam import guided_grad_cam  # noqa: E402
from torchray_like.attribution.linear_approx import linear_approx  # noqa: E402

LAYERS = {"ResNet": "layer4", "VGG": "features.29"}


def layer_for(model, x) -> str:
    """The layer the rows read: from LAYERS when the model has it, else the automatic one."""
    layer = LAYERS.get(type(model).__name__)
    if layer is None or layer not in dict(model.named_modules()):  # vgg11 has no features.29
        layer = find_saliency_layer(model, x)
    return layer


def floor_layer_and_input(model, x, target, layer):
    """Plain forward, then autograd.grad to the layer's output (graph kept) and to the input."""
    module = get_module(model, layer)

    def run():
        box: List[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, i, o: box.append(o))
        try:
            with frozen(model):
                xx = x.detach().requires_grad_(True)
                y = model(xx)
                seed = get_backward_gradient(y, target)
                g_layer = torch.autograd.grad(y, box[0], seed, retain_graph=True)[0]
                return g_layer, torch.autograd.grad(y, xx, seed)[0]
        finally:
            handle.remove()
    return run


def cases(model, x, target, args) -> List[Case]:
    layer = layer_for(model, x)
    auto = find_saliency_layer(model, x)
    at_layer = floor_layer(model, x, target, layer)
    layer_name = f"fwd+grad({layer})"
    return [
        Case("grad_cam", lambda: grad_cam(model, x, target, layer), at_layer, layer_name),
        Case("grad_cam(auto layer)", lambda: grad_cam(model, x, target),
             floor_layer(model, x, target, auto), f"fwd+grad({auto})"),
        Case("guided_grad_cam", lambda: guided_grad_cam(model, x, target, layer),
             floor_layer_and_input(model, x, target, layer),
             f"fwd+grad({layer})+grad(input)"),
        Case("guided_grad_cam(vs 1 backward)", lambda: guided_grad_cam(model, x, target, layer),
             floor_input(model, x, target), "fwd+grad(input)", target_ratio=1.25,
             note="the part above the layer is differentiated twice"),
        Case("linear_approx", lambda: linear_approx(model, x, target, layer), at_layer,
             layer_name),
        Case("linear_approx(input)", lambda: linear_approx(model, x, target),
             floor_input(model, x, target), "fwd+grad(input)"),
    ]


def main(argv=None) -> int:
    """The speed table restricted to the layer methods (same options as speed.py)."""
    from speed import main as speed_main
    argv = list(sys.argv[1:] if argv is None else argv)
    return speed_main(["--methods", "grad_cam", "guided_grad_cam", "linear_approx"] + argv)


if __name__ == "__main__":
    sys.exit(main())
