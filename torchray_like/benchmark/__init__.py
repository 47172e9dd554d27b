"""Benchmarks: example data, the embedded data set and models, the pointing game, plots.

TorchRay's names: :func:`get_example_data`, :func:`plot_example`, and the modules
:mod:`.datasets`, :mod:`.models`, :mod:`.pointing_game`.  Imports are light: matplotlib is
loaded only when a plot is made.
"""

from __future__ import annotations

from .example_data import get_example_data
from .plot import plot_example

__all__ = ["get_example_data", "plot_example"]
