"""The README's set-up: CI runs the README's test command, in a virtual environment of its own."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> list[str]:
    """The steps of the README's test command (the line under ``# 2. The tests``)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("# 2. The tests"))
    return [step.strip() for step in lines[heading + 1].split("&&")]


def normalised(step: str) -> str:
    return re.sub(r"\s+", " ", step.replace(" --quiet", "")).strip()


def test_ci_runs_the_readme_test_command_in_a_fresh_virtual_environment():
    steps = readme_test_command()
    assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    assert steps[-1] == "python -m pytest -q"
    ci = [normalised(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert any(line.startswith("python3 -m venv ") for line in ci)  # its own environment, made fresh
    assert any(line.startswith(". ") and line.endswith("/bin/activate\"") for line in ci)
    positions = [ci.index(normalised(step)) for step in steps[2:]]  # every later step, verbatim and in order
    assert positions == sorted(positions)
