"""Sphinx configuration: ``pip install -e ".[docs]" && sphinx-build docs docs/_build``."""

import torchray_like

project = "torchray_like"
version = release = torchray_like.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
              "sphinx.ext.viewcode"]
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
html_theme = "alabaster"
autodoc_inherit_docstrings = False  # torch.autograd.Function docstrings link to torch docs
