"""``retro-compile`` command: ``retro-compile demo|eval|bench [options]``, the same as ``python -m retro_compile.demo``,
``python -m retro_compile.eval`` and ``python -m retro_compile.bench``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "retro_compile.demo", "eval": "retro_compile.eval.cli", "bench": "retro_compile.bench"}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: retro-compile {{{'|'.join(commands)}}} [options]  (-h after a command for its options)")
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
