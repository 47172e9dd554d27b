r"""``embedded-vgg16``: torchvision's VGG16 layout, narrow, trained on the embedded data set.

TorchRay's examples and published snippets name VGG16's layers — ``grad_cam(model, x, c,
saliency_layer='features.29')``, ``contrastive_excitation_backprop(..., saliency_layer=
'features.9', contrast_layer='features.30', classifier_layer='classifier.6')`` — so the model
that :func:`~torchray_like.benchmark.get_example_data` returns for ``arch="vgg16"`` has exactly
the module names and kinds of :func:`torchvision.models.vgg16` (Simonyan & Zisserman, "Very Deep
Convolutional Networks for Large-Scale Image Recognition", ICLR 2015, configuration D):

``features`` (a :class:`torch.nn.Sequential`, ``64 → 2`` pixels)::

    0 conv  1 relu  2 conv  3 relu  4 maxpool                                    (32)  block 1
    5 conv  6 relu  7 conv  8 relu  9 maxpool                                    (16)  block 2
    10 conv 11 relu 12 conv 13 relu 14 conv 15 relu 16 maxpool                   (8)   block 3
    17 conv 18 relu 19 conv 20 relu 21 conv 22 relu 23 maxpool                   (4)   block 4
    24 conv 25 relu 26 conv 27 relu 28 conv 29 relu 30 maxpool                   (2)   block 5

``avgpool``: :class:`torch.nn.AdaptiveAvgPool2d` to ``2 × 2`` (torchvision's pools to 7 × 7,
the size of its pool5 at 224 pixels; 2 × 2 is this model's pool5 at 64 pixels, so the pooling
is the identity at the trained size and adapts at others).

``classifier``: ``0 Linear  1 ReLU  2 Dropout  3 Linear  4 ReLU  5 Dropout  6 Linear(→ 8)``.

Only the widths differ from torchvision's (:data:`WIDTHS` channels per block instead of
64 … 512, :data:`HIDDEN` hidden units instead of 4096), to keep the shipped file small and the
training on a CPU short.  Convolutions use 3 × 3 kernels with padding 1 and in-place ReLUs, as
torchvision's.

Training (``benchmarks/train_embedded.py --models embedded-vgg16``) deepens the trained
``embedded-vgg`` into this layout (:func:`deepen_embedded_vgg`, Net2DeeperNet of Chen et al.,
"Net2Net: Accelerating Learning via Knowledge Transfer", ICLR 2016): its six convolutions take
the places of VGG16's first convolution of blocks 1 and 2 and the first two of blocks 3 and 4,
and the seven other convolutions are identities (a 3 × 3 kernel that copies each channel at
its centre tap: between two ReLUs it is exactly the identity, the activations being
non-negative).  So ``features.0`` … ``features.23`` compute exactly ``embedded-vgg``'s
features, ``features.29`` is its last pooled map (4 × 4), and only the classifier — on pool5's
2 × 2 map — is trained anew.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .embedded_data import NUM_CLASSES

__all__ = ["EmbeddedVGG16", "WIDTHS", "HIDDEN", "POOLED", "deepen_embedded_vgg"]

#: Channels of the five convolutional blocks (torchvision's VGG16: 64, 128, 256, 512, 512;
#: these are embedded-vgg's, see :func:`deepen_embedded_vgg`).
WIDTHS: Tuple[int, int, int, int, int] = (16, 32, 64, 128, 128)

#: Hidden units of ``classifier.0`` and ``classifier.3`` (torchvision's: 4096).
HIDDEN = 128

#: Output side of ``avgpool`` (torchvision's: 7).
POOLED = 2

#: Convolutions per block (VGG16, configuration D).
_CONVS = (2, 2, 3, 3, 3)


def _features(widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    channels = 3
    for width, convs in zip(widths, _CONVS):
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class EmbeddedVGG16(nn.Module):
    """torchvision's VGG16 module layout with narrow widths (see the module notes).

    Parameters
    ----------
    num_classes : int
        Outputs of ``classifier.6`` (8, the embedded classes; more while training).
    widths : sequence of 5 ints
        Channels of the five blocks.
    hidden : int
        Units of the two hidden fully connected layers.
    dropout : float
        Probability of ``classifier.2`` and ``classifier.5`` (torchvision's: 0.5).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: Sequence[int] = WIDTHS,
                 hidden: int = HIDDEN, dropout: float = 0.3) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"widths must have 5 entries (one per VGG16 block), got {widths!r}")
        self.widths = tuple(int(w) for w in widths)
        self.features = _features(self.widths)
        self.avgpool = nn.AdaptiveAvgPool2d((POOLED, POOLED))
        self.classifier = nn.Sequential(
            nn.Linear(self.widths[-1] * POOLED * POOLED, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))
        for m in self.modules():
            # torchvision's VGG initialisation (He for the convolutions).
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                assert m.bias is not None       # built with bias=True (the default) above
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


#: Which ``embedded-vgg`` convolution fills each of VGG16's 13 convolutions (``None``: identity).
_PLAN = (0, None, 1, None, 2, 3, None, 4, 5, None, None, None, None)


@torch.no_grad()
def deepen_embedded_vgg(vgg: nn.Module, num_classes: int = NUM_CLASSES,
                        hidden: int = HIDDEN) -> EmbeddedVGG16:
    """VGG16's layout computing the features of ``vgg`` (an ``embedded-vgg``), new classifier.

    ``vgg``'s six convolutions become VGG16's convolutions 1, 3, 5, 6, 8 and 9 (one per
    ``embedded-vgg`` block, then two and two); the others are identities, exact between two
    ReLUs (Net2DeeperNet, Chen et al. 2016).  ``features.23`` then equals ``vgg.features``'s
    output.  The classifier is freshly initialised (``num_classes`` outputs).

    Raises
    ------
    ValueError
        When ``vgg`` is not laid out as ``embedded-vgg`` (six 3 × 3 convolutions in
        ``features``).
    """
    features = getattr(vgg, "features", None)
    convs = [m for m in features if isinstance(m, nn.Conv2d)] if features is not None else []
    if len(convs) != 6 or any(c.kernel_size != (3, 3) for c in convs):
        raise ValueError("vgg must be an embedded-vgg (six 3x3 convolutions in .features), e.g. "
                         "load_embedded_model('embedded-vgg')")
    widths = tuple(convs[i].out_channels for i in (0, 1, 3, 5, 5))
    deep = EmbeddedVGG16(num_classes, widths, hidden)
    slots = [m for m in deep.features if isinstance(m, nn.Conv2d)]
    for slot, source in zip(slots, _PLAN):
        assert slot.bias is not None            # built with bias=True (the default)
        if source is None:
            slot.weight.zero_()
            channels = torch.arange(slot.out_channels)
            slot.weight[channels, channels, 1, 1] = 1
            slot.bias.zero_()
        else:
            bias = convs[source].bias
            if bias is None:
                raise ValueError("vgg's convolutions must have biases (embedded-vgg's do)")
            slot.weight.copy_(convs[source].weight)
            slot.bias.copy_(bias)
    return deep
