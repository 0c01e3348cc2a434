"""The one switch between pgreuse's C modules and their Python references.

``PGREUSE_PURE_PYTHON=1`` selects the Python references even where the C modules are built (a test
leg runs that way). Without the C modules (no compiler when pgreuse was installed) the references
serve too: the proxy's scanners and session core in Python, and no shared-memory claims (every
transaction of a pgreuse connection then goes through the broker's proxy).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE_PYTHON = os.environ.get("PGREUSE_PURE_PYTHON", "") not in ("", "0")


def load(name: str) -> ModuleType | None:
    """``pgreuse.<name>`` if it is built and the switch allows C, else ``None``."""
    if PURE_PYTHON:
        return None
    try:
        return importlib.import_module(f"pgreuse.{name}")
    except ImportError:  # not built (no C compiler at install time)
        return None
