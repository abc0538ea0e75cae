"""Hugging Face transformers glue: attention function, static cache, and the decode-window driver.

What ``generate()`` sees does not change: every forward call still takes the newest token and
returns its logits. Inside, each decode step feeds the last ``w`` tokens (the ``w - 1`` already
generated ones again, plus the new one) at their own cache positions, so the static cache's
entries for the past tokens are overwritten with K/V computed from corrected hidden states
(ALGORITHM.md section 4). The prefill runs through the rewritten graph too, so it leaves the
sparse layers' state behind.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import RetroConfig
from ..state import StateStore


ATTENTION_NAME = "retro_sdpa"


def retro_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Plain SDPA with grouped-query heads left unexpanded (``enable_gqa``), so the rewrite sees
    the real KV heads and selects pages per KV head. Same result as transformers' "sdpa"."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("retro-compile: softcapping and position biases are not supported by SDPA attention")
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=is_causal, enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, retro_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin)


def check_sdpa_support(model: torch.nn.Module) -> None:
    """Raise if the architecture cannot run SDPA attention (so there would be nothing to rewrite)."""
    if not getattr(model, "_supports_sdpa", False):
        raise ValueError(
            f"retro_compile: {type(model).__name__} does not support SDPA attention in transformers "
            "(its attention is eager-only), so there is no SDPA call site to rewrite. "
            "Use an architecture that supports attn_implementation='sdpa'."
        )


def sliding_window_layers(hf_config: Any) -> tuple[int, ...]:
    """Layers whose cache is a sliding window (a ring buffer): they stay dense."""
    types = getattr(hf_config, "layer_types", None)
    if types:
        return tuple(i for i, t in enumerate(types) if t != "full_attention")
    if getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True):
        return tuple(range(hf_config.num_hidden_layers))
    return ()


def cache_argument(model: torch.nn.Module) -> str:
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class DecodeWindowDriver:
    """Replaces ``model.forward``: prefill through one compiled graph, window decode through another."""

    def __init__(self, model: torch.nn.Module, config: RetroConfig, store: StateStore, prefill: Callable,
                 decode: Callable) -> None:
        self.config = config
        self.store = store
        self.window = config.window
        self.prefill_fn = prefill
        self.decode_fn = decode
        self.cache_arg = cache_argument(model)
        self.reset()

    def reset(self) -> None:
        """Forget the current sequence: the next call must be a prefill."""
        self.cache: Any = None
        self.length = 0  # positions written in the cache
        self.recent: torch.Tensor | None = None  # (B, w-1) ids of the newest tokens ((B, 0) for w = 1)

    def check_request(self, prompt: int, new_tokens: int = 0) -> None:
        """Refuse, before any work, a request the window or the static state cannot hold."""
        if prompt <= self.window:
            raise ValueError(f"retro_compile: the prompt has {prompt} tokens; it needs more than window={self.window}")
        if prompt + new_tokens > self.config.max_context:
            raise ValueError(
                f"retro_compile: the prompt's {prompt} tokens plus {new_tokens} new tokens need {prompt + new_tokens} "
                f"positions, more than RetroConfig.max_context={self.config.max_context}; raise RetroConfig.max_context "
                "(or ask for fewer tokens)"
            )

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        cache = kwargs.get(self.cache_arg)
        if input_ids is None or cache is None or not getattr(cache, "is_compileable", False):
            raise ValueError(
                "retro_compile: a compiled model needs input_ids and a static cache "
                f"(got input_ids={'set' if input_ids is not None else None}, {self.cache_arg}={type(cache).__name__}); "
                "use model.generate(...), which sets both up"
            )
        if cache is not self.cache or input_ids.shape[1] > 1:
            return self._prefill(input_ids, attention_mask, position_ids, cache, kwargs)
        return self._decode(input_ids, attention_mask, position_ids, kwargs)

    def _prefill(self, input_ids, attention_mask, position_ids, cache, kwargs):
        n = input_ids.shape[1]
        if cache is not self.cache:
            self.reset()
            self.cache = cache
            self.length = int(cache.get_seq_length())
        self.check_request(self.length + n)
        masks = list(attention_mask.values()) if isinstance(attention_mask, dict) else [attention_mask]
        for t, dim in [(input_ids, 1), (position_ids, 1)] + [(m, 2 if _is_4d(m) else 1) for m in masks]:
            if t is not None:
                torch._dynamo.mark_dynamic(t, dim)
        self.store.forget_built()  # a prefill that runs no rewritten graph must leave nothing to decode from
        out = self.prefill_fn(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        self.length += n
        self.recent = input_ids[:, n - (self.window - 1):]
        return out

    def _decode(self, input_ids, attention_mask, position_ids, kwargs):
        w, newest = self.window, self.length
        if newest + 1 > self.config.max_context:
            raise ValueError(f"retro_compile: position {newest} is beyond RetroConfig.max_context={self.config.max_context}")
        device = input_ids.device
        rows = torch.arange(newest - w + 1, newest + 1, device=device)  # cache positions of the window
        window_mask = functools.partial(self._window_mask, rows=rows, batch=input_ids.shape[0])
        if isinstance(attention_mask, dict):  # one mask per layer type (all full attention: see retro_compile)
            mask = {kind: window_mask(m) for kind, m in attention_mask.items()}
            visible = next(iter(mask.values()))[:, :, -1:]
        else:
            mask = window_mask(attention_mask)
            visible = mask[:, :, -1:]
        if position_ids is None:
            position_ids = visible[:, 0, 0].sum(-1, keepdim=True) - 1
        position_ids = position_ids[:, -1:] + torch.arange(1 - w, 1, device=device)
        ids = torch.cat([self.recent, input_ids], dim=1)
        rewind(self.cache, w - 1)  # the window rewrites the past tokens' entries
        out = self.decode_fn(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs)
        self.length += 1
        self.recent = ids[:, 1:]
        out.logits = out.logits[:, -1:]
        return out

    def _window_mask(self, attention_mask, rows, batch) -> torch.Tensor:
        """(B, 1, w, L) bool: the keys the newest token may see, cut causally for each window row."""
        visible = self._visible_keys(attention_mask, batch, rows.device)
        return visible & (torch.arange(visible.shape[-1], device=rows.device) <= rows[:, None])

    def _visible_keys(self, attention_mask, batch, device) -> torch.Tensor:
        """Keys the newest token may see, as a (B, 1, 1, L) bool mask over the whole cache."""
        length = self.config.max_context
        if attention_mask is None:
            visible = torch.arange(length, device=device) <= self.length
            return visible.expand(batch, 1, 1, length)
        if _is_4d(attention_mask):
            row = attention_mask[:, :, -1:, :]
            return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
        visible = F.pad(attention_mask.bool(), (0, length - attention_mask.shape[1]))
        return visible[:, None, None, :]


def rewind(cache: Any, tokens: int) -> None:
    """Move a static cache's write position back by ``tokens``, so the next forward overwrites them.

    Static layers keep their write position in a device tensor, ``cumulative_length``, on
    transformers 5.17 through 5.24; ``StaticLayer.crop`` (5.24 only) does the same subtraction.
    Rewinding in place keeps the tensor's static address, so CUDA graphs stay valid.
    """
    if tokens == 0:
        return
    for layer in cache.layers:
        position = getattr(layer, "cumulative_length", None)
        if not isinstance(position, torch.Tensor):
            raise TypeError(f"retro_compile: cannot rewind a {type(layer).__name__} cache layer; use a StaticCache")
        position.sub_(tokens)


def _is_4d(t: torch.Tensor | None) -> bool:
    return t is not None and t.dim() == 4


def requested_positions(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """(prompt tokens, new tokens) a ``generate(*args, **kwargs)`` call asks for, as generate()
    itself resolves them (``max_new_tokens`` wins over ``max_length``); None without token ids."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    prompt = ids.shape[1]
    generation = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", generation.max_new_tokens)
    if new is None:
        total = kwargs.get("max_length", generation.max_length)
        new = max(0, total - prompt) if total is not None else 0
    return prompt, new


def install(model: torch.nn.Module, config: RetroConfig, store: StateStore, prefill: Callable,
            decode: Callable) -> DecodeWindowDriver:
    """Install the driver and a generate() that starts every request from a fresh static cache."""
    from transformers import StaticCache

    driver = DecodeWindowDriver(model, config, store, prefill, decode)
    original_generate, original_forward = model.generate, model.forward
    cache_arg = driver.cache_arg

    @functools.wraps(original_generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        request = requested_positions(model, args, kwargs)
        if request is not None:
            driver.check_request(*request)
        driver.reset()
        if kwargs.get(cache_arg) is None and kwargs.get("past_key_values") is None:
            kwargs[cache_arg] = StaticCache(config=model.config, max_cache_len=config.max_context)
        return original_generate(*args, **kwargs)

    @functools.wraps(original_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return driver.forward(*args, **kwargs)

    model.forward = forward
    model.generate = generate
    model.generation_config.disable_compile = True  # the driver compiles; generate must not again
    return driver
