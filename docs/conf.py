"""Sphinx configuration: ``pip install -e ".[docs]" && sphinx-build docs docs/_build``."""

import torchray_like

project = "torchray_like"
version = release = torchray_like.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
              "sphinx.ext.viewcode"]
napoleon_numpy_docstring = True
# EmbeddedShapes documents its dataset items under an "Items" heading after its Parameters;
# unknown to napoleon, it would be read as more parameters (and warn).
napoleon_custom_sections = ["Items"]
autodoc_member_order = "bysource"
html_theme = "alabaster"
autodoc_inherit_docstrings = False  # torch.autograd.Function docstrings link to torch docs
