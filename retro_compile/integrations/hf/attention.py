"""The attention function and mask function that ``retro_compile`` registers with transformers:
grouped SDPA that the rewrite can see per KV head, and no L x L mask for a long prompt."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ATTENTION_NAME = "retro_sdpa"
BATCH_KWARG = "retro_batch"  # the forward keyword that carries a continuous-batching ServedBatch


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
    the real KV heads and selects pages per KV head. Same result as transformers' "sdpa".

    Two cases read fewer keys than the static cache holds, both for queries that start at cache
    position 0 (a prefill): no mask with several rows means causal attention (SDPA's top-left
    alignment), so keys past the last row are never visible and are cut off; a mask narrower than
    the cache covers the first ``mask.shape[-1]`` keys, the rest being unwritten.

    A continuous-batching call (keyword ``retro_batch``) goes to its :class:`~.serving.ServedBatch`.
    """
    batch = kwargs.get(BATCH_KWARG)
    if batch is not None:  # a continuous-batching forward: every request's rows, packed
        return batch.attention(module, query, key, value, scaling), None
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("retro-compile: softcapping and position biases are not supported by SDPA attention")
    rows = query.shape[2]
    if attention_mask is None:
        if is_causal is None:
            is_causal = rows > 1 and getattr(module, "is_causal", True)
        if is_causal:
            key, value = key[:, :, :rows], value[:, :, :rows]
    else:
        is_causal = False
        if attention_mask.shape[-1] < key.shape[2]:
            key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=is_causal, enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def retro_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, minus the L x L mask of a long prompt.

    Several query rows from cache position 0 with no padding need no mask at all (SDPA's causal
    flag), where ``sdpa_mask`` would build a (B, 1, n, max_cache_len) one for a static cache (16 GiB
    for a 128K prompt). While tracing, the cache's write position cannot be read; a mask-less call
    with several rows is then taken as starting at position 0, which is what the decode driver's
    prefill guarantees (a later chunk gets an explicit 4D mask from it).
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    causal_rows = (
        not args and kwargs.get("q_length", 1) > 1 and kwargs.get("allow_is_causal_skip", True)
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None and kwargs.get("kv_offset", 0) == 0
    )
    if not causal_rows:  # one row (a decode step) among them: never read q_offset, a device tensor
        return sdpa_mask(*args, **kwargs)
    padding = kwargs.get("attention_mask")
    q_offset = kwargs.get("q_offset", 0)
    if _traced(q_offset):
        from_start = padding is None  # the driver's prefill (see above)
    else:
        from_start = int(q_offset) == 0 and (padding is None or (not _traced(padding) and bool(padding.all())))
    return None if from_start else sdpa_mask(*args, **kwargs)


def _traced(x: Any) -> bool:
    """Whether reading ``x``'s value would need a concrete tensor that tracing does not have."""
    return isinstance(x, torch.Tensor) and torch.compiler.is_compiling()


def register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, retro_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, retro_sdpa_mask)
