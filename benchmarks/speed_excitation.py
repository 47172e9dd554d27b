"""Speed of excitation backprop and contrastive excitation backprop against their floor.

The floor is the plain forward pass plus ``torch.autograd.grad`` down to the output of the
saliency layer (what the plain gradient to that layer costs).  Excitation backprop does more per
layer above it — each convolution / linear layer computes ``op(x⁺, w⁺)`` and its transpose
instead of the transpose alone — so the target is 1.5× that floor.  The contrastive variant also
backpropagates twice from the output to the contrast layer.

Picked up by ``benchmarks/speed.py``; alone::

    python benchmarks/speed.py --models resnet50 vgg16 --methods excitation contrastive
"""

from __future__ import annotations

from typing import List

from harness import Case, floor_layer

from torchray_like.attribution.excitation_backprop import (
    contrastive_excitation_backprop,
    excitation_backprop,
)

# model family -> (saliency layer, contrast layer)
LAYERS = {
    "resnet": ("layer3", "layer4"),
    "vgg": ("features.23", "features.30"),
}


def _layers(model) -> tuple:
    name = type(model).__name__.lower()
    for family, layers in LAYERS.items():
        if name.startswith(family):
            return layers
    return None


def cases(model, x, target, args) -> List[Case]:
    layers = _layers(model)
    if layers is None:
        return []
    saliency_layer, contrast_layer = layers
    floor = floor_layer(model, x, target, saliency_layer)
    floor_name = f"fwd+grad({saliency_layer})"
    return [
        Case(f"excitation_backprop({saliency_layer})",
             lambda: excitation_backprop(model, x, target, saliency_layer=saliency_layer),
             floor, floor_name, target_ratio=1.5),
        Case(f"contrastive_excitation_backprop({saliency_layer}|{contrast_layer})",
             lambda: contrastive_excitation_backprop(model, x, target, saliency_layer,
                                                     contrast_layer),
             floor, floor_name, target_ratio=1.5),
    ]
