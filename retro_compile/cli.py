"""``retro-compile`` command: ``retro-compile demo [options]`` (same as ``python -m retro_compile.demo``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "retro_compile.demo"}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: retro-compile {{{'|'.join(commands)}}} [options]  (-h after a command for its options)")
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
