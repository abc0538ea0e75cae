"""The modules of scripts/ (not a package), for the tests that check them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_script(name: str):
    """``scripts/<name>.py``, loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
