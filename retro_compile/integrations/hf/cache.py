"""The driver's static caches and masks: allocating a ``StaticCache`` per batch size, rewinding it,
splitting a prompt into prefill chunks, sliding-window layers, and the facts of a model's config
they need."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

def text_config(hf_config: Any) -> Any:
    """The decoder's own config: ``hf_config`` itself, or its text sub-config for a multimodal model."""
    return hf_config.get_text_config(decoder=True) if hasattr(hf_config, "get_text_config") else hf_config


@dataclass(frozen=True)
class SlidingLayers:
    """A model's sliding-window attention layers, which stay dense SDPA.

    The driver gives them full-length static cache layers (a ring buffer cannot be rewound to
    overwrite the window's past rows) and masks of their own: a query at cache slot ``q`` sees the
    slots ``q - window < k <= q`` that it may see at all, as transformers' sliding-window mask does.
    ``by_type``: the forward takes ``{"full_attention": mask, "sliding_attention": mask}``
    (models with ``layer_types``); otherwise every layer slides and takes one mask.
    """

    window: int
    layers: tuple[int, ...]
    by_type: bool

    def masks(self, full: torch.Tensor | None, rows: torch.Tensor, keys: int) -> Any:
        """The forward's ``attention_mask`` for query rows at cache slots ``rows`` (n,), given the
        full-attention mask ``full`` ((B or 1, 1, n, keys) bool, or None: causal from slot 0)."""
        near = torch.arange(keys, device=rows.device) > rows[:, None] - self.window
        sliding = (slot_mask(None, rows, keys) if full is None else full) & near
        return {"full_attention": full, "sliding_attention": sliding} if self.by_type else sliding


def slot_mask(valid: torch.Tensor | None, rows: torch.Tensor, keys: int) -> torch.Tensor:
    """(B or 1, 1, n, keys) bool: query rows at cache slots ``rows`` (n,) see the slots up to their
    own that ``valid`` ((B or 1, >= keys) bool; None: every slot) marks. The one place the driver's
    masks are built (prefill chunks, decode window, sliding layers)."""
    causal = torch.arange(keys, device=rows.device) <= rows[:, None]
    return causal[None, None] if valid is None else valid[:, None, None, :keys] & causal


def sliding_layers(hf_config: Any) -> SlidingLayers | None:
    """The sliding-window layers of a transformers config (None if it has none)."""
    text = text_config(hf_config)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types:
        other = sorted(set(types) - {"full_attention", "sliding_attention"})
        if other:
            raise ValueError(f"retro_compile: layer types {other} are not supported (full_attention and "
                             "sliding_attention are): the driver's static cache holds no recurrent or convolution "
                             "state, and a decode step feeds the window's last tokens again, which would advance "
                             "such a state twice")
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        return SlidingLayers(window, layers, by_type=True) if layers else None
    if window and getattr(text, "use_sliding_window", True):
        return SlidingLayers(window, tuple(range(text.num_hidden_layers)), by_type=False)
    return None


def cache_argument(model: torch.nn.Module) -> str:
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def tp_size(model: torch.nn.Module) -> int:
    """Processes the model's heads are sharded over (transformers' tensor parallelism,
    ``from_pretrained(distributed_config=DistributedConfig(tp_plan=...))``); 1 unsharded."""
    return getattr(model, "tp_size", None) or 1


@torch.inference_mode(False)  # updated in place by calls in and out of inference mode
def static_cache(model: torch.nn.Module, batch: int, length: int, device: torch.device,
                 full_length: bool = False) -> Any:
    """A ``StaticCache`` of ``length`` positions for ``batch`` rows, allocated now.

    Allocated up front (not lazily inside a compiled prefill), its tensors keep fixed addresses for
    CUDA graphs, and transformers marks them static for its own compiled decode. ``full_length``
    gives sliding-window layers ``length`` positions too (see :class:`SlidingLayers`).
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    hf = model.config
    cache = StaticCache(config=hf, max_cache_len=length)
    if full_length:
        cache.layers = [layer if not layer.is_sliding else StaticLayer(max_cache_len=length) for layer in cache.layers]
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    cache.early_initialization(batch, kv_heads // tp_size(model), head_dim, model.dtype, device)  # this rank's share
    return cache


def causal_lm_output(logits: torch.Tensor, cache: Any) -> Any:
    """What a causal LM's forward returns, with its cache under the field name of this transformers."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(logits=logits, **{field: cache})


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


def prefill_chunks(n: int, batch: int, max_tokens: int) -> list[tuple[int, int]]:
    """Split ``n`` prompt positions into [begin, end) chunks of at most ``max_tokens // batch``
    positions (at least one)."""
    size = max(1, max_tokens // batch)
    bounds = list(range(0, n, size)) + [n]
    return list(zip(bounds[:-1], bounds[1:]))
