"""Hugging Face transformers integration: ``retro_compile`` for a causal LM.

This module installs the parts: the attention function (:mod:`.attention`), the static caches
and masks (:mod:`.cache`) and the decode-window driver that ``generate()`` runs on (:mod:`.driver`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from ...config import RetroConfig
from ...state import StateStore
from .. import installed
from .attention import ATTENTION_NAME, register_attention, retro_sdpa_mask
from .cache import (LayerKinds, cache_argument, causal_lm_output, layer_kinds, prefill_chunks, rewind, static_cache,
                    text_config, tp_size)
from .driver import DecodeWindowDriver, compiled_window_step
from .generate import driver_methods

log = logging.getLogger(__name__)

# The package's surface: what code outside it uses.
__all__ = ["ATTENTION_NAME", "DecodeWindowDriver", "cache_argument", "causal_lm_output", "check_sdpa_support",
           "compile_causal_lm", "is_hf_causal_lm", "prefill_chunks", "register_attention", "retro_sdpa_mask", "rewind",
           "static_cache", "tp_size"]


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin)


def check_sdpa_support(model: torch.nn.Module) -> None:
    """Raise if the architecture cannot run SDPA attention (so there would be nothing to rewrite), or
    if its cache holds something other than per-head keys and values (multi-head latent attention).

    Attention logit softcapping (Gemma 2) is refused whatever the model class says: transformers
    before 5.24 declared SDPA support for Gemma 2 and dropped the softcap there."""
    softcap = getattr(text_config(model.config), "attn_logit_softcapping", None)
    if not getattr(model, "_supports_sdpa", False) or softcap:
        why = f"it caps attention logits (attn_logit_softcapping={softcap})" if softcap else "its attention is eager-only"
        raise ValueError(
            f"retro_compile: {type(model).__name__} does not support SDPA attention in transformers "
            f"({why}), so there is no SDPA call site to rewrite. "
            "Use an architecture that supports attn_implementation='sdpa'."
        )
    latent = getattr(text_config(model.config), "kv_lora_rank", None)
    if latent:
        raise ValueError(
            f"retro_compile: {type(model).__name__} uses multi-head latent attention (kv_lora_rank={latent}): its "
            "cache holds a compressed latent, not the per-head keys and values that page selection summarises, "
            "and this package does not serve it yet. Run the model without retro_compile."
        )


def compile_causal_lm(model: torch.nn.Module, config: RetroConfig, store: StateStore, *, inductor: bool,
                      cuda_graphs: bool | None, mode: str | None, **compile_kwargs: Any) -> torch.nn.Module:
    """:func:`retro_compile.retro_compile` for a Hugging Face causal LM (see its docstring).

    Switches the attention to grouped SDPA, marks sliding-window layers dense, compiles the prefill
    (rewrite only, dynamic prompt length) and the decode step (rewrite + Inductor with ``mode``'s
    options, minus its CUDA graphs: the driver records its own) per batch size, as the driver
    meets them, and installs the driver.
    """
    from ...backend import backend_for

    check_sdpa_support(model)
    kinds = layer_kinds(model.config)
    if kinds is not None and kinds.recurrent:
        config = recurrent_model_config(model, config, kinds)

    def recompile(clone: torch.nn.Module) -> torch.nn.Module:  # a deep copy's own compilation
        return compile_causal_lm(clone, config, StateStore(), inductor=inductor, cuda_graphs=cuda_graphs, mode=mode,
                                 **compile_kwargs)

    original_attention = installed.attention_implementations(model)
    for layer in kinds.sliding if kinds is not None else ():
        store.declare_model_dense(layer, f"sliding-window attention (window {kinds.window})")
    options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    graphs_in_mode = options.pop("triton.cudagraphs", False)
    step_kwargs = dict(compile_kwargs)
    options.update(step_kwargs.pop("options", None) or {})
    use_graphs = cuda_graphs
    if use_graphs is None:
        use_graphs = graphs_in_mode or (mode is None and any(p.is_cuda for p in model.parameters()))
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    own_forward = model.forward  # the class's, bound: the driver's forward replaces the attribute

    def compile_prefill() -> Callable:
        return torch.compile(own_frame(own_forward), dynamic=False,
                             backend=backend_for(config, store, inductor=False, phase="prefill"))

    def compile_step() -> Callable:
        return compiled_window_step(model, own_forward, kinds, lambda fn: torch.compile(
            own_frame(fn), backend=backend_for(config, store, inductor=inductor, phase="decode"), dynamic=False,
            options=options or None, **step_kwargs))

    driver, methods = driver_methods(model, config, store, compile_prefill, compile_step, cuda_graphs=bool(use_graphs),
                                     kinds=kinds)
    installed.install(model, dict(methods, retro_config=config, retro_state=store, retro_driver=driver),
                      original_attention, recompile)
    return model


def recurrent_model_config(model: torch.nn.Module, config: RetroConfig, kinds: LayerKinds) -> RetroConfig:
    """``config`` as a model with recurrent layers (:class:`LayerKinds`) can run it.

    Every token fed advances a recurrent layer's state, so the retrospective window, which feeds
    the last ``w - 1`` tokens again each step, would advance it twice: such a model decodes in
    quest mode (window 1), said in one log line. ``dense_layers=n`` keeps its meaning, the first
    ``n`` attention layers, as a tuple of their indices.
    """
    name = type(model).__name__
    changes: dict[str, Any] = {}
    if config.window > 1:
        log.warning("retro-compile: %s has recurrent layers %s, whose state every fed token advances; the "
                    "retrospective window feeds tokens again, so this model decodes in quest mode (window 1)",
                    name, list(kinds.recurrent))
        changes.update(mode="quest", window=1)
    if isinstance(config.dense_layers, int):
        changes["dense_layers"] = kinds.attention[:config.dense_layers]
    return dataclasses.replace(config, **changes)


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
