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
class LayerKinds:
    """A model's layers that are not plain full attention, and the masks its forward takes.

    ``sliding``: sliding-window attention layers (window ``window``), which stay dense SDPA. The
    driver gives them full-length static cache layers (a ring buffer cannot be rewound to overwrite
    the window's past rows) and masks of their own: a query at cache slot ``q`` sees the slots
    ``q - window < k <= q`` that it may see at all, as transformers' sliding-window mask does.

    ``recurrent``: layers that keep a recurrent or convolution state (Mamba, linear attention,
    short convolutions), instead of attention or beside it. Every token fed advances that state
    and no cache rewind takes it back, so such a model decodes one token a step (window 1) and its
    cache is never cropped. Their forward takes the 2D padding mask of the call's own tokens, under
    ``recurrent_type`` in the mask mapping. ``attention`` lists the layers that attend (a
    ``hybrid`` layer does both), set where some layers are recurrent only.

    ``by_type``: the forward takes ``{layer type: mask}`` (models with ``layer_types``); otherwise
    every layer slides and takes one mask.
    """

    by_type: bool
    sliding: tuple[int, ...] = ()
    window: int | None = None
    recurrent: tuple[int, ...] = ()
    recurrent_type: str | None = None
    attention: tuple[int, ...] = ()

    def masks(self, full: torch.Tensor | None, rows: torch.Tensor, keys: int,
              padding: torch.Tensor | None = None) -> Any:
        """The forward's ``attention_mask`` for query rows at cache slots ``rows`` (n,), given the
        full-attention mask ``full`` ((B or 1, 1, n, keys) bool, or None: causal from slot 0) and
        the rows' padding ``padding`` ((B, n) bool, None where nothing is padded)."""
        masks: dict[str, Any] = {"full_attention": full}
        if self.sliding:
            masks["sliding_attention"] = (slot_mask(None, rows, keys) if full is None else full) & self.near(rows, keys)
            if not self.by_type:
                return masks["sliding_attention"]
        if self.recurrent:
            masks[self.recurrent_type] = padding
        return masks


    def near(self, rows: torch.Tensor, keys: int) -> torch.Tensor:
        """(n, keys) bool: the slots within a sliding layer's window of each row at ``rows`` (n,)."""
        return torch.arange(keys, device=rows.device) > rows[:, None] - self.window


def slot_mask(valid: torch.Tensor | None, rows: torch.Tensor, keys: int) -> torch.Tensor:
    """(B or 1, 1, n, keys) bool: query rows at cache slots ``rows`` (n,) see the slots up to their
    own that ``valid`` ((B or 1, >= keys) bool; None: every slot) marks. The one place the driver's
    masks are built (prefill chunks, decode window, sliding layers)."""
    causal = torch.arange(keys, device=rows.device) <= rows[:, None]
    return causal[None, None] if valid is None else valid[:, None, None, :keys] & causal


# layer type -> the mask mapping's key its forward reads ("hybrid": attention and a recurrent state in one layer)
RECURRENT_TYPES = {"conv": "conv", "linear_attention": "linear_attention", "hybrid": "linear_attention"}
RECURRENT_ONLY = ("conv", "linear_attention")  # the recurrent types without attention


def layer_kinds(hf_config: Any) -> LayerKinds | None:
    """The sliding-window and recurrent layers of a transformers config (None if it has neither)."""
    text = text_config(hf_config)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types:
        other = sorted(set(types) - {"full_attention", "sliding_attention"} - set(RECURRENT_TYPES))
        if other:
            raise ValueError(f"retro_compile: layer types {other} are not supported (full_attention, "
                             f"sliding_attention and the recurrent types {sorted(RECURRENT_TYPES)} are)")
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        recurrent = tuple(i for i, t in enumerate(types) if t in RECURRENT_TYPES)
        keys = {RECURRENT_TYPES[types[i]] for i in recurrent}
        if len(keys) > 1:
            raise ValueError(f"retro_compile: recurrent layers of several mask types {sorted(keys)} are not supported")
        if not sliding and not recurrent:
            return None
        attention = tuple(i for i, t in enumerate(types) if t not in RECURRENT_ONLY) if recurrent else ()
        return LayerKinds(by_type=True, sliding=sliding, window=window if sliding else None, recurrent=recurrent,
                          recurrent_type=keys.pop() if keys else None, attention=attention)
    if window and getattr(text, "use_sliding_window", True):
        return LayerKinds(by_type=False, sliding=tuple(range(text.num_hidden_layers)), window=window)
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
    gives sliding-window layers ``length`` positions too (see :class:`LayerKinds`).
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    hf = model.config
    cache = StaticCache(config=hf, max_cache_len=length)
    if full_length:
        cache.layers = [StaticLayer(max_cache_len=length) if getattr(layer, "is_sliding", False) else layer
                        for layer in cache.layers]
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
            raise TypeError(f"retro_compile: cannot rewind a {type(layer).__name__} cache layer (a recurrent state, or "
                            "a cache that is not static)")
        position.sub_(tokens)


def write_position(cache: Any) -> torch.Tensor:
    """The static cache's write position: the first attention layer's ``cumulative_length`` (a
    recurrent layer has none)."""
    return next(layer.cumulative_length for layer in cache.layers if hasattr(layer, "cumulative_length"))


def empty(cache: Any) -> None:
    """Empty a static cache in place, keeping every tensor's address: write positions to 0,
    recurrent and convolution states zeroed and marked as not yet prefilled (their layers'
    ``reset``). Keys and values stay: no query reads a slot its request did not write."""
    for layer in cache.layers:
        position = getattr(layer, "cumulative_length", None)
        if isinstance(position, torch.Tensor):
            position.zero_()
        if hasattr(layer, "recurrent_states"):
            from transformers.cache_utils import LinearAttentionCacheLayerMixin

            LinearAttentionCacheLayerMixin.reset(layer)  # its own part only: a hybrid layer's reset zeroes its keys too


def prefill_chunks(n: int, batch: int, max_tokens: int) -> list[tuple[int, int]]:
    """Split ``n`` prompt positions into [begin, end) chunks of at most ``max_tokens // batch``
    positions (at least one)."""
    size = max(1, max_tokens // batch)
    bounds = list(range(0, n, size)) + [n]
    return list(zip(bounds[:-1], bounds[1:]))
