"""``generate()`` on a ``retro_compile``d model: the wrapped ``generate``, ``forward`` and
``create_masks_for_generate`` that route a request through the decode-window driver
(:mod:`.driver`), and the checks a request passes before any work."""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch

from ...config import RetroConfig
from ...state import StateStore
from .cache import LayerKinds
from .driver import DecodeWindowDriver
from .serving import continuous_batching_method


def requested_positions(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """(prompt tokens, new tokens) a ``generate(*args, **kwargs)`` call asks for, as generate()
    itself resolves them (``max_new_tokens`` wins over ``max_length``); None without token ids."""
    ids = _prompt_ids(args, kwargs)
    if ids is None:
        return None
    prompt = ids.shape[1]
    generation = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", generation.max_new_tokens)
    if new is None:
        total = kwargs.get("max_length", generation.max_length)
        new = max(0, total - prompt) if total is not None else 0
    return prompt, new


def _prompt_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def check_generate_options(generation: Any, kwargs: dict[str, Any], kinds: LayerKinds | None) -> None:
    """Refuse, before any work, the generate() options whose cache use the decode state does not follow."""
    if (kwargs.get("num_beams") or generation.num_beams or 1) > 1:
        raise ValueError("retro_compile: beam search (num_beams > 1) is not supported: it reorders the cache "
                         "between steps, which the decode state does not follow")
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("retro_compile: generate(inputs_embeds=...) is not supported: each decode step feeds the "
                         "window's last tokens again by their ids; pass input_ids instead")
    if kwargs.get("assistant_early_exit") is not None or getattr(generation, "assistant_early_exit", None) is not None:
        raise ValueError("retro_compile: generate(assistant_early_exit=...) is not supported: its drafts run the "
                         "model's own first layers on the same cache, outside the decode window; use "
                         "assistant_model=... or prompt_lookup_num_tokens=... (both supported) instead")
    if kinds is not None and kinds.recurrent:
        for name in ("assistant_model", "prompt_lookup_num_tokens"):
            if kwargs.get(name) is not None or getattr(generation, name, None) is not None:
                raise ValueError(f"retro_compile: generate({name}=...) is not supported on a model with recurrent "
                                 f"layers {list(kinds.recurrent)}: rejected drafts would have to be taken back out "
                                 "of their state, which only a cache rewind of attention layers does")


def take_prefill_chunk_size(generation: Any, kwargs: dict[str, Any]) -> int | None:
    """Take ``prefill_chunk_size`` out of generate()'s arguments (and out of a copy of its
    generation config) for the driver to chunk the prompt with: transformers would feed the chunks
    as forward calls of their own, and the driver chunks a prompt itself, into the same pieces."""
    chunk = kwargs.pop("prefill_chunk_size", None)
    if chunk is None:
        chunk = getattr(generation, "prefill_chunk_size", None)
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"retro_compile: generate(prefill_chunk_size={chunk!r}) must be an int >= 1")
    if getattr(generation, "prefill_chunk_size", None) is not None:
        generation = copy.deepcopy(generation)
        generation.prefill_chunk_size = None
        kwargs["generation_config"] = generation
    return chunk


def driver_methods(model: torch.nn.Module, config: RetroConfig, store: StateStore,
                   compile_prefill: Callable[[], Callable], compile_step: Callable[[], Callable], cuda_graphs: bool,
                   kinds: LayerKinds | None) -> tuple[DecodeWindowDriver, dict[str, Callable]]:
    """The driver, and the ``forward``, ``generate`` and ``create_masks_for_generate`` that route
    the model's calls through it (a generate() that runs every request on the driver's static
    cache), and the ``init_continuous_batching`` that batches requests continuously (:mod:`.serving`)."""
    from transformers import masking_utils

    driver = DecodeWindowDriver(model, config, store, compile_prefill, compile_step, cuda_graphs, kinds)
    original_generate, original_forward = model.generate, model.forward
    cache_arg = driver.cache_arg

    @functools.wraps(original_generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        driver.generating = True
        try:
            return _generate(*args, **kwargs)
        finally:
            driver.generating, driver.chunk_positions = False, None

    def _generate(*args: Any, **kwargs: Any) -> Any:
        request = requested_positions(model, args, kwargs)
        if request is not None:
            driver.check_request(*request)
        generation = kwargs.get("generation_config") or model.generation_config
        check_generate_options(generation, kwargs, kinds)
        ids = _prompt_ids(args, kwargs)
        driver.chunk_positions = take_prefill_chunk_size(generation, kwargs)
        driver.reset(kwargs.get("attention_mask"))
        if kwargs.get(cache_arg) is None and kwargs.get("past_key_values") is None and ids is not None:
            copies = kwargs.get("num_return_sequences") or generation.num_return_sequences or 1
            kwargs[cache_arg] = driver.cache_for(ids.shape[0] * copies, ids.device)  # each prompt, once per sequence
        kwargs["disable_compile"] = True  # the driver compiles; generate() must not compile again
        return original_generate(*args, **kwargs)

    @functools.wraps(original_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if driver.generating or driver.serves(kwargs):
            return driver.forward(*args, **kwargs)
        return original_forward(*args, **kwargs)  # the model's own computation: scoring, losses, features

    original_masks = getattr(model, "create_masks_for_generate", masking_utils.create_masks_for_generate)

    def create_masks_for_generate(*args: Any, **kwargs: Any) -> Any:
        """generate()'s 4D attention masks, except for the driver's decode steps: those build their
        masks on the device (:func:`window_step`) and would leave a (B, 1, 1, L) one unused, built
        with a few device ops per token (and, in transformers' ``sdpa_mask``, a look at the padding
        mask on the host)."""
        cache, embeds = kwargs.get("cache", kwargs.get("past_key_values")), kwargs.get("inputs_embeds")
        if driver.generating and embeds is not None and driver.decodes(cache, embeds.shape[1]):
            return None
        return original_masks(*args, **kwargs)

    init_continuous_batching = continuous_batching_method(model, config, store.model_dense, kinds)

    # generate() looks create_masks_for_generate up on the model
    return driver, dict(forward=forward, generate=generate, create_masks_for_generate=create_masks_for_generate,
                        init_continuous_batching=init_continuous_batching)
