"""``retro_compile(model)``: the one call a user makes."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from .backend import backend_for
from .config import RetroConfig
from .integrations import hf
from .state import StateStore

log = logging.getLogger(__name__)


def own_frame(fn: Callable) -> Callable:
    """``fn`` behind a function with a code object of its own.

    Dynamo keeps compiled graphs, and counts recompiles against ``recompile_limit``, per code
    object. Compiling ``model.forward`` directly would share one count among every model of the
    class in the process; past the limit Dynamo silently runs the model eagerly, with the SDPA
    calls un-rewritten. A fresh code object per compiled callable keeps each model's count its own.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__code__ = call.__code__.replace()  # a new code object, not the one shared by every `call`
    return call


def retro_compile(
    model: torch.nn.Module, config: RetroConfig | None = None, *, inductor: bool | None = None, **compile_kwargs: Any
) -> torch.nn.Module:
    """Make ``model`` decode with sparse + retrospective attention.

    For a Hugging Face causal LM this returns the same model, ready for ``model.generate(...)``:
    its attention runs through SDPA with grouped KV heads, every generate() call gets a static
    cache of ``config.max_context`` positions, and forward calls go through two graphs compiled
    with the ``retro`` backend (the prefill, with a dynamic prompt length, and the decode step).
    Any other module is returned as ``torch.compile(model, backend=retro)``.

    ``compile_kwargs`` go to ``torch.compile`` for the decode step (``mode="reduce-overhead"``
    for CUDA graphs, ``fullgraph=True``, ...). ``inductor`` chooses whether the rewritten decode
    graph is compiled by Inductor; by default it is on CUDA, while on CPU the graph runs as it is
    (the op runs its PyTorch reference there, and Inductor's C++ build of a 30-layer model takes
    minutes on a small machine).
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
        compiled = torch.compile(model, backend=backend_for(config, store, inductor=inductor), **compile_kwargs)
        compiled.retro_config = config
        return compiled

    hf.check_sdpa_support(model)
    sliding = hf.sliding_window_layers(model.config)
    if sliding and config.window > 1:
        raise ValueError(
            f"retro_compile: layers {list(sliding)} of {type(model).__name__} use a sliding-window cache, which the "
            "decode window cannot rewrite; use mode='quest' (window 1) or a model without sliding-window layers"
        )
    if sliding and config.mode != "dense":
        log.info("retro_compile: layers %s use a sliding window and stay dense", list(sliding))
        dense = config.dense_layers if isinstance(config.dense_layers, tuple) else tuple(range(config.dense_layers))
        config = dataclasses.replace(config, dense_layers=tuple(sorted(set(dense) | set(sliding))))
    hf.register_attention()
    model.set_attn_implementation(hf.ATTENTION_NAME)
    prefill = torch.compile(own_frame(model.forward), backend=backend_for(config, store, inductor=False), dynamic=False)
    decode = torch.compile(own_frame(model.forward), backend=backend_for(config, store, inductor=inductor),
                           dynamic=False, **compile_kwargs)
    driver = hf.install(model, config, store, prefill, decode)
    model.retro_config = config
    model.retro_state = store
    model.retro_driver = driver
    return model
