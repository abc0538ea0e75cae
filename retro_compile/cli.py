"""The ``retro-compile`` command: ``retro-compile {demo,eval,bench,serve} [options]``.

The same as ``python -m retro_compile.demo``, ``python -m retro_compile.eval``,
``python -m retro_compile.bench`` and ``python -m retro_compile.serve``; ``retro-compile COMMAND -h``
describes each command's flags.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name -> (module with main(argv), one line for the help)
    "demo": ("retro_compile.demo", "generate from a long real text with dense, quest and retro attention, side by side"),
    "eval": ("retro_compile.eval.cli", "quality: long-decode perplexity, passkey retrieval, KV exposure"),
    "bench": ("retro_compile.bench", "speed on a CUDA GPU: the decode op alone (op), generate() end to end (e2e), "
                                     "continuous batching (serve)"),
    "serve": ("retro_compile.serve", "an OpenAI-compatible server (transformers serve) over retro_compile'd models"),
}


def usage() -> str:
    lines = ["usage: retro-compile {" + ",".join(COMMANDS) + "} [options]", "", "commands:"]
    lines += [f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "retro-compile COMMAND -h lists the command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}\n" if argv else ""
        raise SystemExit(f"{given}{usage()}")
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
