"""``torch.export`` programs: rewrite an ``ExportedProgram``'s SDPA calls into ``retro::attention``.

An exported program is a functional graph with a fixed signature, so the rewrite does not edit it
in place: it takes the program's module (``ep.module()``, SDPA as ``aten.scaled_dot_product_attention``),
rewrites its call sites as the compile pass does, registering each sparse layer's state as a
buffer, and exports that module again, at the same example inputs. The state buffers are mutated
in place by the op, which the new program records as buffer mutations.

A decoder is usually exported twice: a prefill program (prompt rows) and a decode program (one
step's rows). Both must be exported from the same module object (so that they share its KV
cache) and rewritten with the same :class:`~retro_compile.state.StateStore` (so that they share
the decode state), the prefill first: a decode site is rewritten only where a prefill site of
that store built its state, and stays dense SDPA (with a warning) otherwise.

What an exported program does not have: the run-time check of the compiled path that a decode
step only reads state its own prefill built. Running the decode program before the prefill
program gives answers from whatever the state holds.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import RetroConfig
from ..passes.rewrite import rewrite_sdpa
from ..state import StateStore


def rewrite_exported_program(
    program: torch.export.ExportedProgram,
    config: RetroConfig | None = None,
    *,
    store: StateStore | None = None,
    dynamic_shapes: Any = None,
) -> torch.export.ExportedProgram:
    """A new program whose sparse layers run ``retro::attention``; ``program`` is left as it is.

    Args:
        program: a program exported from a module that calls SDPA.
        config: the attention's settings (default ``RetroConfig()``).
        store: the decode state; pass the same one for a model's prefill and decode programs
            (see the module docstring). A fresh one by default.
        dynamic_shapes: ``torch.export.export``'s argument for the new program (default: the
            shapes of ``program``'s example inputs, static).
    """
    config = config or RetroConfig()
    if not isinstance(config, RetroConfig):
        raise TypeError(f"rewrite_exported_program: config must be a RetroConfig, got {type(config).__name__}")
    if program.example_inputs is None:
        raise ValueError("rewrite_exported_program: the program has no example inputs to export it again with")
    module = program.module()
    rewrite_sdpa(module, config, StateStore() if store is None else store)
    args, kwargs = program.example_inputs
    return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes)
