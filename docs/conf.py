"""Sphinx configuration of the jaxpeft documentation (MyST Markdown pages, API reference from the docstrings).

Build it as CI does (warnings, broken cross-references and missing pages fail the build)::

    .venv/bin/python -m sphinx -W --keep-going -n -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # jaxpeft and examples/ from the clone, without an install
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # docs/_nitpick.py

import jaxpeft  # noqa: E402
from _nitpick import nitpick_ignore_regex  # noqa: E402, F401  (annotation targets outside the reference)

project = "jaxpeft"
author = "the jaxpeft developers"
copyright = "2026, the jaxpeft developers"  # noqa: A001
release = jaxpeft.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# No network at build time: intersphinx inventories are not fetched (an empty mapping keeps the build offline).
intersphinx_mapping: dict = {}

html_theme = "furo"
html_title = f"jaxpeft {release}"
html_static_path: list[str] = []
