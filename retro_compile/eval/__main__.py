"""``python -m retro_compile.eval``: see :mod:`retro_compile.eval.cli`."""

from .cli import main

main()
