"""``retro_compile(model)``: the one call a user makes."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .backend import backend_for
from .config import RetroConfig
from .integrations import hf
from .state import StateStore

log = logging.getLogger(__name__)


def retro_compile(
    model: torch.nn.Module,
    config: RetroConfig | None = None,
    *,
    inductor: bool | None = None,
    cuda_graphs: bool | None = None,
    mode: str | None = None,
    **compile_kwargs: Any,
) -> torch.nn.Module:
    """Make ``model`` decode with sparse + retrospective attention.

    For a Hugging Face causal LM this returns the same model, ready for ``model.generate(...)``:
    its attention runs through SDPA with grouped KV heads, every generate() call runs on a static
    cache of ``config.max_context`` positions that the model keeps per batch size, and its forward
    calls go through two graphs compiled with the ``retro`` backend (the prefill, with a dynamic
    prompt length, and the decode step). Forward calls that are not decoding (``labels``, hidden
    states, no static cache) run the model's own forward, uncompiled. Any other module is returned
    as ``torch.compile(model, backend=retro)``.

    Args:
        model: a Hugging Face causal LM, or any module that calls SDPA.
        config: the attention's settings (default ``RetroConfig()``).
        inductor: compile the rewritten decode step with Inductor. By default it is on CUDA, while on
            CPU the graph runs as it is (the op runs its PyTorch reference there, and Inductor's C++
            build of a 30-layer model takes minutes on a small machine).
        cuda_graphs: record each batch size's decode step in one CUDA graph and replay it (Hugging
            Face models on CUDA; on by default there). A ``mode`` with CUDA graphs
            (``"reduce-overhead"``, ``"max-autotune"``) turns them on; the graph is the driver's own,
            so Inductor compiles without its ``cudagraphs`` option.
        mode: Inductor's mode for the decode step (``torch.compile``'s ``mode``).
        compile_kwargs: further ``torch.compile`` arguments for the decode step (``fullgraph=True``, ...).
    """
    config = config or RetroConfig()
    if not isinstance(config, RetroConfig):
        raise TypeError(f"retro_compile: config must be a RetroConfig, got {type(config).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("retro_compile: the model is already torch.compile'd; pass the original module (model._orig_mod)")
    previous = getattr(model, "retro_config", None)
    if previous is not None:
        if previous == config:
            log.info("retro_compile: model already compiled with this config; returning it unchanged")
            return model
        raise ValueError(
            f"retro_compile: model was already compiled with {previous}; load a fresh model to use {config}"
        )
    store = StateStore()
    if inductor is None:
        inductor = any(p.is_cuda for p in model.parameters())
    if not hf.is_hf_causal_lm(model):
        compiled = torch.compile(model, backend=backend_for(config, store, inductor=inductor), mode=mode,
                                 **compile_kwargs)
        compiled.retro_config = config
        return compiled

    return hf.compile_causal_lm(model, config, store, inductor=inductor, cuda_graphs=cuda_graphs, mode=mode,
                                **compile_kwargs)
