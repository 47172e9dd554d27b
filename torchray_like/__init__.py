"""torchray_like: attribution methods for PyTorch convolutional networks.

A clean-room toolkit compatible with TorchRay's public API (rename ``torchray`` to
``torchray_like``): rule contexts and probes in :mod:`torchray_like.attribution.common`, one
wrapper per method in :mod:`torchray_like.attribution`.
"""

__version__ = "0.1.0"
