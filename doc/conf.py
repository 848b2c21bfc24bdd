"""Sphinx configuration of securemig's documentation (``make docs``).

Warnings are errors there (``sphinx-build -W``): a broken table, a dangling
reference or a command reference that no longer builds fails ``make test``.
"""

from __future__ import annotations

import sys
from importlib.metadata import version as _version
from pathlib import Path

# The command reference's extension lives beside this file, not in the package.
sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "securemig"
author = "the securemig developers"
copyright = "2026 the securemig developers (MIT License)"
# The installed distribution's version: said once, in securemig/__init__.py.
release = _version("securemig")
version = release

extensions = ["commandref", "sphinx.ext.autosectionlabel"]
# Sections are link targets as :ref:`document:Section title`.
autosectionlabel_prefix_document = True
root_doc = "index"
exclude_patterns = ["_build"]
# The documents write ``--option`` and ``'quotes'`` as they are typed.
smartquotes = False
html_theme = "alabaster"
html_title = f"securemig {release}"
