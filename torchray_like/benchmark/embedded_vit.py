r"""The embedded transformer: a small Vision Transformer for the embedded data set.

``embedded-vit`` is torchvision's :class:`torchvision.models.VisionTransformer` itself (not a
copy), at a small size, so that every part of the library that recognises torchvision's ViT
(token-to-grid reshaping, attention rollout reading :class:`torch.nn.MultiheadAttention`)
applies to it unchanged:

=================  ==========================================================================
``image_size``     64 (:data:`~torchray_like.benchmark.embedded_data.IMAGE_SIZE`)
``patch_size``     8: an ``8 × 8`` grid of patch tokens (a cell is 8 pixels, as the embedded
                   CNNs' Grad-CAM layers), plus the class token (first), so blocks output
                   ``(N, 65, hidden_dim)``
``conv_proj``      torchvision's convolutional stem (``conv_stem_configs``): three stride-2
                   ``3 × 3`` convolutions with batch norm and GELU (24, 48, 96 channels;
                   torchvision names them ``conv_bn_relu_0`` … ``_2``), then ``conv_last``
                   (``1 × 1`` to ``hidden_dim``), output ``(N, 96, 8, 8)``
``num_layers``     4 encoder blocks ``encoder.layers.encoder_layer_0`` … ``_3`` (pre-norm:
                   ``ln_1``, ``self_attention``, ``ln_2``, ``mlp`` with GELU)
``hidden_dim``     96, ``num_heads`` 3 (32 per head), ``mlp_dim`` 192
``heads.head``     ``Linear(96, 8)`` on the class token after ``encoder.ln``
=================  ==========================================================================

It reads ``(N, 3, 64, 64)`` images normalised by
:func:`~torchray_like.benchmark.embedded_data.normalize` and returns ``(N, 8)`` logits, one
independent (sigmoid) score per class, as the embedded CNNs: trained multi-label by
``benchmarks/train_embedded.py`` (recipe ``RECIPE["embedded-vit"]`` there).  Unlike them it
accepts **only** 64-pixel inputs (its position embedding has 65 entries; torchvision asserts
the size).

Why a convolutional stem: the same network with the plain ``8 × 8``-patch linear embedding
reached only 36 % test mAP after two of eight epochs (the embedded CNNs: 97 % after
training); a stem of a few stride-2 convolutions in place of the patchify layer makes ViTs
optimise quickly and stably on small data (Xiao et al. 2021), and the rest of the network —
tokens, class token, position embedding, attention blocks, head — is the plain ViT.  The stem
uses GELU, as the blocks, so that the network has no ReLU at all.

References: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021; Xiao et al., "Early Convolutions Help Transformers See
Better", NeurIPS 2021.
"""

from __future__ import annotations

from typing import Dict, List

import torch.nn as nn
from torchvision.models import VisionTransformer
from torchvision.models.vision_transformer import ConvStemConfig

from .embedded_data import IMAGE_SIZE, NUM_CLASSES

__all__ = ["VIT_CONFIG", "VIT_STEM", "VIT_LAYERS", "StemGELU", "build_embedded_vit"]

#: Keyword arguments of :class:`torchvision.models.VisionTransformer` for ``embedded-vit``
#: (``num_classes`` aside).
VIT_CONFIG: Dict[str, int] = {
    "image_size": IMAGE_SIZE, "patch_size": 8, "num_layers": 4, "num_heads": 3,
    "hidden_dim": 96, "mlp_dim": 192,
}

#: Output channels of the convolutional stem's three stride-2 ``3 × 3`` convolutions (with
#: batch norm and GELU), after which torchvision adds a ``1 × 1`` convolution to ``hidden_dim``.
VIT_STEM = (24, 48, 96)


class StemGELU(nn.GELU):
    """:class:`torch.nn.GELU` that accepts (and ignores) ``inplace``, which torchvision's stem
    passes to its activation: the stem keeps the transformer's GELU, so that the network has no
    ReLU at all (the rectifier methods then refuse it as a whole, not half of it)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()


def _stem() -> List[ConvStemConfig]:
    return [ConvStemConfig(c, 3, 2, norm_layer=nn.BatchNorm2d, activation_layer=StemGELU)
            for c in VIT_STEM]


_LAST = f"encoder.layers.encoder_layer_{VIT_CONFIG['num_layers'] - 1}"

#: Layers for the layer methods, in the form of ``EMBEDDED_LAYERS`` of
#: :mod:`~torchray_like.benchmark.embedded_models`: Grad-CAM reads the last block's ``ln_1``
#: (its input tokens normalised, the usual choice for ViTs: the output of the last block only
#: reaches the class through the class token, so its patch tokens get no gradient from
#: attention any more); excitation backprop's layers are the same blocks, for the record —
#: the rectifier methods do not apply to GELU networks (see the benchmark settings).
VIT_LAYERS: Dict[str, str] = {
    "grad_cam": f"{_LAST}.ln_1",
    "excitation_backprop": f"encoder.layers.encoder_layer_{VIT_CONFIG['num_layers'] - 3}",
    "contrast": _LAST,
}


def build_embedded_vit(num_outputs: int = NUM_CLASSES) -> VisionTransformer:
    """The ``embedded-vit`` architecture with fresh (random) weights, in train mode (the head
    too: truncated normal, σ = 0.02, where torchvision's starts at zero).

    Parameters
    ----------
    num_outputs : int
        Size of ``heads.head``; other than the 8 classes only for training (the auxiliary
        distractor outputs of ``benchmarks/train_embedded.py``).
    """
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive int, got {num_outputs!r}")
    model = VisionTransformer(num_classes=num_outputs, conv_stem_configs=_stem(), **VIT_CONFIG)
    # torchvision starts the head at zero: every score of an untrained model would be exactly
    # 0 and every map blank (random-weight benchmarks, sanity checks); a small random head
    # instead, drawn from the global generator like the other layers.
    nn.init.trunc_normal_(model.heads.head.weight, std=0.02)
    return model
