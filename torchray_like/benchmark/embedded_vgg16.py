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

Training uses batch normalisation after every convolution (the ``vgg16_bn`` layout, see
:func:`build_training_vgg16`): a deep plain stack trains much faster with it.  The
normalisation is then folded into the convolutions (:func:`fold_batch_norm`, exact in eval
mode), which gives the plain VGG16 layout that ships.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .embedded_data import NUM_CLASSES

__all__ = ["EmbeddedVGG16", "WIDTHS", "HIDDEN", "POOLED", "build_training_vgg16",
           "fold_batch_norm"]

#: Channels of the five convolutional blocks (torchvision's VGG16: 64, 128, 256, 512, 512).
WIDTHS: Tuple[int, int, int, int, int] = (16, 24, 32, 48, 64)

#: Hidden units of ``classifier.0`` and ``classifier.3`` (torchvision's: 4096).
HIDDEN = 128

#: Output side of ``avgpool`` (torchvision's: 7).
POOLED = 2

#: Convolutions per block (VGG16, configuration D).
_CONVS = (2, 2, 3, 3, 3)


def _features(widths: Sequence[int], batch_norm: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    channels = 3
    for width, convs in zip(widths, _CONVS):
        for _ in range(convs):
            layers.append(nn.Conv2d(channels, width, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
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
    batch_norm : bool
        ``True``: the ``vgg16_bn`` layout (batch norm after every convolution), for training
        only; :func:`fold_batch_norm` turns it into the shipped layout.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: Sequence[int] = WIDTHS,
                 hidden: int = HIDDEN, dropout: float = 0.3, batch_norm: bool = False) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"widths must have 5 entries (one per VGG16 block), got {widths!r}")
        self.widths = tuple(int(w) for w in widths)
        self.features = _features(self.widths, batch_norm)
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


def build_training_vgg16(num_outputs: int = NUM_CLASSES) -> EmbeddedVGG16:
    """The training network: :class:`EmbeddedVGG16` with batch norm after each convolution."""
    return EmbeddedVGG16(num_outputs, batch_norm=True)


@torch.no_grad()
def fold_batch_norm(model: EmbeddedVGG16) -> EmbeddedVGG16:
    """The plain VGG16 layout computing what ``model`` (with batch norm) computes in eval mode.

    Each ``conv → BatchNorm`` pair becomes one convolution with weight
    ``w · γ / √(σ² + ε)`` and bias ``(b − μ) · γ / √(σ² + ε) + β`` (the running statistics
    ``μ``, ``σ²``), as in Jacob et al., "Quantization and Training of Neural Networks for
    Efficient Integer-Arithmetic-Only Inference", CVPR 2018, section 3.2.

    Raises
    ------
    ValueError
        When ``model`` has no batch norm after a convolution (nothing to fold).
    """
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    if len(norms) != len(convs):
        raise ValueError("model must be built with batch_norm=True (one BatchNorm2d after each "
                         f"convolution); it has {len(norms)} for {len(convs)} convolutions")
    last = model.classifier[6]
    plain = EmbeddedVGG16(last.out_features, model.widths, last.in_features)
    targets = [m for m in plain.features if isinstance(m, nn.Conv2d)]
    for conv, norm, target in zip(convs, norms, targets):
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        target.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        target.bias.copy_((conv.bias - norm.running_mean) * scale + norm.bias)
    plain.classifier.load_state_dict(model.classifier.state_dict())
    return plain.eval()
