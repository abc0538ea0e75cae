"""The modules of benchmarks/ (not a package, not installed), for the tests that check them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_script(name: str):
    """``benchmarks/<name>.py``, loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
