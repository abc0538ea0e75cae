"""Sparse window attention and its merge (docs/algorithm.md, section 4) on the GPU:
``attend_window``, the Triton stage that replaces ``reference.attend_window``, and
``dense_window``, a dense layer's window rows (its reference: ``reference.sdpa_row_by_row``).

The attention kernel runs one program per (batch row, KV head, split); each walks its share of the
selected pages a tile of pages at a time, loading each page's K and V once for all ``G * n``
query rows of the group (G query heads x n window rows). Per row it applies the mask, and for past
rows the unseen-page test ``last[page] < position``; then it stamps its pages in ``last``. The
merge kernel, one program per (batch row, query head), folds the splits by log-sum-exp, merges
past rows with the output cache, moves the cache on and writes the output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import reference
from .launch import DENSE_PAGE, attention_tiles, dense_tile_pages, row_starts, split_pages, unit_last_stride


@triton.jit
def _selected_pages(index, chosen):
    """The pages of a (batch row, KV head)'s list slots: -1 for unchosen ones (and slots loaded past
    the list's end with index -1 or chosen 0)."""
    return tl.where(chosen != 0, index, -1).to(tl.int32)


@triton.jit
def _window_attention_kernel(
    Q, K, V, ALLOWED, INDICES, CHOSEN, LAST, POS, START, OUT, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ab, stride_an,
    stride_pb, stride_ph,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_os, stride_or,
    stride_eb, stride_eh, stride_es,
    length, num_selected, pages_per_split, scale,
    G: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr, P: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    TILE: tl.constexpr, ONE_TILE: tl.constexpr, PRECISION: tl.constexpr, DENSE: tl.constexpr,
):
    b, hkv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, ROWS)  # row r = (query head g = r // N, window row i = r % N)
    head, win = rows // N, rows % N
    live = rows < G * N
    dims, vdims = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(Q + b * stride_qb + (hkv * G + head)[:, None] * stride_qh + win[:, None] * stride_qn + dims[None, :],
                mask=live[:, None], other=0.0)
    row_start = 0  # dense: the cache's pages from slot 0
    if not DENSE:
        position = tl.load(POS + b * N + win, mask=live, other=0)
        newest = win == N - 1
        newest_position = tl.load(POS + b * N + N - 1).to(tl.int32)  # stamped into `last` at the end
        row_start = tl.load(START + b)  # the row's pages start at its first valid slot

    m = tl.full((ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, DV), tl.float32)
    first = split * pages_per_split
    selection = b * stride_pb + hkv * stride_ph  # this (batch row, KV head)'s list of selected pages
    end = tl.minimum(first + pages_per_split, num_selected)
    within = tl.arange(0, P)
    if ONE_TILE:  # a split of one tile: its pages serve the tile and the stamp after it
        slot = first + tl.arange(0, TILE)
        split_page = _selected_pages(tl.load(INDICES + selection + slot, mask=slot < end, other=-1),
                                     tl.load(CHOSEN + selection + slot, mask=slot < end, other=0))
    for j in range(first, end, TILE):  # TILE pages per iteration
        slot = j + tl.arange(0, TILE)
        if DENSE:  # every page of the cache, no selection
            page = tl.where(slot < end, slot, -1)
        elif ONE_TILE:
            page = split_page
        else:
            page = _selected_pages(tl.load(INDICES + selection + slot, mask=slot < end, other=-1),
                                   tl.load(CHOSEN + selection + slot, mask=slot < end, other=0))
        # Key offsets as (page, offset in page), so loads of the byte mask below see runs of P
        # contiguous bytes (as one flat vector they looked like single bytes: too small for the
        # asynchronous copies Triton pipelines loads into).
        page_keys = row_start + page[:, None] * P + within[None, :]  # (TILE, P)
        page_inside = (page[:, None] >= 0) & (page_keys < length)
        keys = tl.reshape(page_keys, (TILE * P,))
        inside = tl.reshape(page_inside, (TILE * P,))
        k = tl.load(K + b * stride_kb + hkv * stride_kh + keys[:, None] * stride_kl + dims[None, :],
                    mask=inside[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + hkv * stride_vh + keys[:, None] * stride_vl + vdims[None, :],
                    mask=inside[:, None], other=0.0)
        if DENSE:
            row_ok = live[:, None] & (page >= 0)[None, :]  # (ROWS, TILE)
        else:  # past rows see only pages they never saw
            seen_at = tl.load(LAST + b * stride_lb + hkv * stride_lh + page, mask=page >= 0, other=0)  # (TILE,)
            row_ok = live[:, None] & (newest[:, None] | (seen_at[None, :] < position[:, None]))  # (ROWS, TILE)
        # The byte mask loads beside `last`, not under it (a load whose mask waits on another load
        # waits on it too): a past row's bytes of a page it has seen are read, then dropped.
        allowed = tl.load(ALLOWED + b * stride_ab + win[:, None, None] * stride_an + page_keys[None, :, :],
                          mask=live[:, None, None] & page_inside[None, :, :], other=0)  # (ROWS, TILE, P)
        allowed = tl.reshape((allowed != 0) & row_ok[:, :, None], (ROWS, TILE * P))
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)  # (ROWS, TILE * P)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
        alpha = tl.exp(m - shift)
        p = tl.exp(s - shift[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out_offs = b * stride_ob + hkv * stride_oh + split * stride_os + rows[:, None] * stride_or + vdims[None, :]
    tl.store(OUT + out_offs, acc / tl.where(l > 0, l, 1.0)[:, None], mask=live[:, None])
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    tl.store(LSE + b * stride_eb + hkv * stride_eh + split * stride_es + rows, lse, mask=live)
    if not DENSE:
        # Stamp this split's pages as loaded by the newest row. Pages are distinct within a (batch
        # row, KV head), so no other program reads these entries; the barrier keeps every warp's
        # reads of `last` above before the stores.
        tl.debug_barrier()
        if ONE_TILE:
            tl.store(LAST + b * stride_lb + hkv * stride_lh + split_page, newest_position, mask=split_page >= 0)
        else:
            for j in range(first, end, TILE):
                slot = j + tl.arange(0, TILE)
                page = _selected_pages(tl.load(INDICES + selection + slot, mask=slot < end, other=-1),
                                       tl.load(CHOSEN + selection + slot, mask=slot < end, other=0))
                tl.store(LAST + b * stride_lb + hkv * stride_lh + page, newest_position, mask=page >= 0)


@triton.jit
def _merge_window_kernel(
    PART_OUT, PART_LSE, OUT_CACHE, LSE_CACHE, OUT,
    stride_pb, stride_ph, stride_ps, stride_pr,
    stride_eb, stride_eh, stride_es,
    stride_cb, stride_ch, stride_cr,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_on,
    splits,
    G: tl.constexpr, N: tl.constexpr, NB: tl.constexpr, CACHE: tl.constexpr, CB: tl.constexpr, KEEP: tl.constexpr,
    DV: tl.constexpr, SB: tl.constexpr,
):
    b, hq = tl.program_id(0), tl.program_id(1)
    hkv, g = hq // G, hq % G
    win = tl.arange(0, NB)  # window row i of query head hq is partial row g * N + i
    live = win < N
    vdims = tl.arange(0, DV)
    # 0. Every read of the output cache first: none depends on the partial results, so their
    # latency overlaps the splits' loads (each is written only after the barrier in 3).
    past = live & (win < N - 1) & (CACHE > 0)  # no cache (dense rows): nothing to merge with
    cache_row = CACHE - (N - 1) + win  # past row i merges with cache row CACHE - (N - 1) + i
    cache_base = OUT_CACHE + b * stride_cb + hq * stride_ch
    lse_base = LSE_CACHE + b * stride_lb + hq * stride_lh
    cached_lse = tl.load(lse_base + cache_row, mask=past, other=float("-inf"))
    cached_out = tl.load(cache_base + cache_row[:, None] * stride_cr + vdims[None, :], mask=past[:, None], other=0.0)
    if CACHE > 0:  # the rows that stay, for 3.
        slot = tl.arange(0, CB)
        stays = slot < CACHE - KEEP
        kept_out = tl.load(cache_base + (slot + KEEP)[:, None] * stride_cr + vdims[None, :], mask=stays[:, None], other=0.0)
        kept_lse = tl.load(lse_base + slot + KEEP, mask=stays, other=0.0)
    # 1. The splits' partial results, merged by log-sum-exp, SB splits at a time.
    m = tl.full((NB,), float("-inf"), tl.float32)
    l = tl.zeros((NB,), tl.float32)
    acc = tl.zeros((NB, DV), tl.float32)
    for first in range(0, splits, SB):
        split = first + tl.arange(0, SB)
        ok = (split < splits)[:, None] & live[None, :]  # (SB, NB)
        part = b * stride_pb + hkv * stride_ph + split[:, None] * stride_ps + (g * N + win)[None, :] * stride_pr
        o = tl.load(PART_OUT + part[:, :, None] + vdims[None, None, :], mask=ok[:, :, None], other=0.0)
        lse = tl.load(PART_LSE + b * stride_eb + hkv * stride_eh + split[:, None] * stride_es + (g * N + win)[None, :],
                      mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        weight = tl.exp(lse - shift[None, :])
        l = l * alpha + tl.sum(weight, axis=0)
        acc = acc * alpha[:, None] + tl.sum(weight[:, :, None] * o, axis=0)
        m = m_new
    # 2. Past rows merge with their cached outputs.
    top = tl.maximum(m, cached_lse)
    shift = tl.where(top == float("-inf"), 0.0, top)
    ours, theirs = tl.exp(m - shift), tl.exp(cached_lse - shift)
    total = l * ours + theirs
    out = (acc * ours[:, None] + cached_out * theirs[:, None]) / tl.where(total > 0, total, 1.0)[:, None]
    lse = tl.where(total > 0, shift + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(OUT + b * stride_ob + hq * stride_oh + win[:, None] * stride_on + vdims[None, :],
             out.to(OUT.dtype.element_ty), mask=live[:, None])
    # 3. The cache moves on: its newest CACHE - KEEP rows move up, and this step's last KEEP rows
    # join. Every read of the cache (in 0) comes before the barrier, every write after.
    if CACHE > 0:
        tl.debug_barrier()
        tl.store(cache_base + slot[:, None] * stride_cr + vdims[None, :], kept_out, mask=stays[:, None])
        tl.store(lse_base + slot, kept_lse, mask=stays)
        joins = live & (win >= N - KEEP)
        tl.store(cache_base + (CACHE - N + win)[:, None] * stride_cr + vdims[None, :], out, mask=joins[:, None])
        tl.store(lse_base + CACHE - N + win, lse, mask=joins)


def attend_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    chosen: torch.Tensor,
    state: reference.LayerState,
    position: torch.Tensor,
    scale: float,
    page_size: int,
    pages_per_split: int | None = None,
    tile_pages: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Same as ``reference.attend_window``, in two launches: the attention kernel (which also stamps
    ``last``) and one merge kernel (splits, output cache, cache update, cast to ``q``'s dtype).

    ``pages_per_split``, ``tile_pages`` and ``num_stages`` None: the launch rules'
    (:func:`~.launch.split_pages`, :func:`~.launch.attention_tiles`).
    """
    if bias is not None:  # never sent here: use_kernels routes float masks to the reference
        raise ValueError("attend_window: additive mask biases are served by the reference")
    if page_size < 16:
        raise ValueError(f"attend_window: page_size={page_size} must be >= 16 (tl.dot tiles)")
    if any(t.stride(-1) != 1 for t in (state.last, state.out_cache, state.lse_cache)):
        raise ValueError("attend_window: last, out_cache and lse_cache are written in place "
                         "and must have unit last stride")
    selection = (indices.contiguous(), chosen.contiguous(), state.last, position.contiguous(),
                 row_starts(state.start, q.shape[0], q.device))
    num_pages = indices.shape[-1]
    pages_per_split = pages_per_split or split_pages(num_pages, q.shape[0], k.shape[1])
    programs = q.shape[0] * k.shape[1] * triton.cdiv(num_pages, pages_per_split)
    tiles, stages = attention_tiles(pages_per_split, programs, q.device)  # _attend caps a tile at its split
    tile_pages, num_stages = tile_pages or tiles, num_stages or stages
    return _attend(q, k, v, allowed, selection, state.out_cache, state.lse_cache, scale, page_size, num_pages,
                   pages_per_split, tile_pages, num_warps, num_stages)


def dense_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    pages_per_split: int | None = None,
    tile_pages: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Exact attention of a decode window's n rows over every key each may see: q (B, Hq, n, D),
    k and v (B, Hkv, L, D), ``allowed`` (B, n, L) bool -> (B, Hq, n, Dv) in ``q``'s dtype.

    A dense layer's window (``dense_layers``) asks this at every step. SDPA with several rows and
    a mask over a long cache runs a prefill kernel with little parallelism, and one row at a time
    it reads the cache once per row; here the split attention kernel reads each key and value
    once for all ``G * n`` rows of a KV head's group (G query heads), as it does for selected
    pages, and the merge folds the splits (no selection, no state, no output cache).
    ``pages_per_split`` and ``tile_pages`` None: the launch rules' (:func:`~.launch.split_pages`,
    :func:`~.launch.dense_tile_pages`).
    """
    num_pages = triton.cdiv(k.shape[2], DENSE_PAGE)
    pages_per_split = pages_per_split or split_pages(num_pages, q.shape[0], k.shape[1])
    tile_pages = tile_pages or dense_tile_pages(pages_per_split)
    no_cache = torch.empty(q.shape[0], q.shape[1], 0, v.shape[3], dtype=torch.float32, device=q.device)
    return _attend(q, k, v, allowed, None, no_cache, no_cache[..., 0], scale, DENSE_PAGE, num_pages,
                   pages_per_split, tile_pages, num_warps, num_stages)


def _attend(q, k, v, allowed, selection, out_cache, lse_cache, scale, page_size, num_pages, pages_per_split,
            tile_pages, num_warps, num_stages) -> torch.Tensor:
    """The split attention and merge launches of :func:`attend_window` (``selection``: indices,
    chosen, last, position, start) and :func:`dense_window` (``selection`` None: every one of
    ``num_pages`` pages, no output cache), splits and tiles as their callers chose them."""
    q, k, v, allowed = unit_last_stride(q, k, v, allowed)
    b, hq, n, d = q.shape
    hkv, length, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    dense = selection is None
    indices, chosen, last, position, start = (allowed,) * 5 if dense else selection  # dense: never read, any strides do
    splits = triton.cdiv(num_pages, pages_per_split)
    tile = min(tile_pages, triton.next_power_of_2(pages_per_split))
    rows = max(16, triton.next_power_of_2(group * n))
    part_out = torch.empty(b, hkv, splits, group * n, dv, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, hkv, splits, group * n, dtype=torch.float32, device=q.device)
    wrap_triton(_window_attention_kernel)[(b, hkv, splits)](
        q, k, v, allowed, indices, chosen, last, position, start, part_out, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        allowed.stride(0), allowed.stride(1),
        indices.stride(0), indices.stride(1),  # chosen: the same shape, contiguous too
        last.stride(0), last.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_out.stride(3),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        length, num_pages, pages_per_split, scale,
        G=group, N=n, ROWS=rows, P=page_size, D=d, DV=dv, TILE=tile, ONE_TILE=not dense and tile >= pages_per_split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 exact; 16-bit inputs ignore it
        DENSE=dense, num_warps=num_warps, num_stages=num_stages,
    )
    cache = out_cache.shape[2]
    out = torch.empty(b, hq, n, dv, dtype=q.dtype, device=q.device)
    wrap_triton(_merge_window_kernel)[(b, hq)](
        part_out, part_lse, out_cache, lse_cache, out,
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_out.stride(3),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        out_cache.stride(0), out_cache.stride(1), out_cache.stride(2),
        lse_cache.stride(0), lse_cache.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        splits, G=group, N=n, NB=triton.next_power_of_2(n), CACHE=cache,
        CB=triton.next_power_of_2(max(cache, 1)), KEEP=min(cache, n), DV=dv, SB=min(16, triton.next_power_of_2(splits)),
    )
    return out

