"""Stage 1 of docs/algorithm.md in PyTorch: which keys each query row may see, where it sits, and
which page of its row each cache slot is on.

SDPA's mask conventions are read here once (:func:`mask_to_allowed`); a query's position is the
last key it may see (:func:`query_positions`), or said by the caller (a decode step's window slots).
Pages are counted from each row's first valid slot (:func:`first_slots`), so a left-padded row
pages its tokens as an unpadded one does. :mod:`.reference` and the rewrite build on these.
"""

from __future__ import annotations

import torch


def mask_to_allowed(
    attn_mask: torch.Tensor | None, is_causal: bool, batch: int, n: int, length: int, device: torch.device,
    last: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA's mask conventions as (allowed (B, r, L) bool, additive bias (B, r, L) fp32 or None),
    for the last ``r = last`` of the ``n`` query rows (all of them by default).

    A boolean mask is True where attention is allowed; a float mask is added to the logits and
    ``-inf`` (or the dtype's lowest value, as Hugging Face writes it) disallows. No mask with
    ``is_causal`` is SDPA's top-left causal mask; no mask without it allows every key. A prefill
    needs only its last rows, so a long prompt never materialises an (n, L) mask here.
    """
    r = n if last is None else min(last, n)
    if attn_mask is None:
        if is_causal:
            rows = torch.arange(n - r, n, device=device)[:, None]
            allowed = torch.arange(length, device=device)[None, :] <= rows
        else:
            allowed = torch.ones(r, length, dtype=torch.bool, device=device)
        return allowed.expand(batch, r, length), None
    mask = attn_mask.expand(batch, 1, n, length)[:, 0, n - r:]
    if mask.dtype == torch.bool:
        return mask, None
    bias = mask.float()
    allowed = bias > torch.finfo(attn_mask.dtype).min / 2
    return allowed, bias.masked_fill(~allowed, 0.0)


POSITION_CHUNK = 1024  # keys per program in the first stage of :func:`query_positions`


def query_positions(allowed: torch.Tensor) -> torch.Tensor:
    """Cache position of each query row (B, n): the last key it may see (a query sees itself).

    A decode step has a handful of rows over a cache of up to 128K keys: reduced in one pass, a
    compiled step gives each row one program that walks the whole cache. Two stages (the last key
    of every chunk, then of the chunks) spread the first, long one over many programs. The second
    reduces at least 8 chunks: Inductor unrolls a reduction of fewer (its
    ``unroll_reductions_threshold``) into an expression each consumer recomputes, and a step's
    kernels take several views of the positions (each an extra kernel a step).
    """
    length = allowed.shape[-1]
    seen = torch.where(allowed, torch.arange(length, device=allowed.device), -1)
    if length >= 8 * POSITION_CHUNK and length % POSITION_CHUNK == 0:
        seen = seen.unflatten(-1, (-1, POSITION_CHUNK)).amax(dim=-1)
    return seen.amax(dim=-1)


def mask_positions(attn_mask: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """:func:`query_positions` (B, n) of ``batch`` rows of ``n`` queries under the SDPA mask
    ``attn_mask``, as :func:`.reference.decode_step` finds them. Every layer of a decoder reads the same mask,
    so the rewrite computes this once per graph and hands it to each layer's decode step
    (``positions``), instead of each layer reducing the whole mask again."""
    allowed, _ = mask_to_allowed(attn_mask, False, batch, n, attn_mask.shape[-1], attn_mask.device)
    return query_positions(allowed)


def first_slots(valid: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B,) int32: each row's first valid slot (0 for a row with none)."""
    return valid.to(torch.int8).argmax(dim=-1).to(torch.int32)


def row_pages(start: torch.Tensor | None, batch: int, length: int, page_size: int,
              device: torch.device) -> torch.Tensor:
    """(B, L) int64: the page of each cache slot, counted from its row's first valid slot ``start``
    (B,) (None: slot 0). Slots before it (left padding, never valid) map to page 0 and count for
    nothing: every caller masks them out."""
    slots = torch.arange(length, device=device).expand(batch, length)
    if start is not None:
        slots = (slots - start[:, None]).clamp(min=0)
    return slots // page_size


def pages_to_tokens(per_page: torch.Tensor, page_size: int, length: int,
                    start: torch.Tensor | None = None) -> torch.Tensor:
    """Expand a (B, H, NP) per-page tensor to (B, H, L) per slot (pages counted from ``start``)."""
    b, h, num_pages = per_page.shape
    pages = row_pages(start, b, length, page_size, per_page.device).clamp(max=num_pages - 1)
    return per_page.gather(-1, pages[:, None, :].expand(b, h, length))


def page_any(valid: torch.Tensor, page_size: int, start: torch.Tensor | None = None,
             num_pages: int | None = None) -> torch.Tensor:
    """(B, L) bool -> (B, NP) bool: does the page (counted from ``start``) hold any valid slot.
    NP is ``num_pages`` (the state's pages, which may reach past a cache shorter than its
    capacity: those hold none), by default the pages the cache spans."""
    batch, length = valid.shape
    pages = row_pages(start, batch, length, page_size, valid.device)
    num_pages = -(-length // page_size) if num_pages is None else num_pages
    out = torch.zeros(batch, num_pages, dtype=torch.int32, device=valid.device)
    return out.scatter_reduce(1, pages, valid.to(torch.int32), "amax") > 0
