"""Page scoring (docs/algorithm.md, section 3) on the GPU: ``page_scores``, the Triton stage that
replaces ``reference.page_scores``. A decode step's written pages are summarized anew by spare
programs of the same launch, which score them too: the refresh has no launch of its own."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import reference
from .launch import SCORING_BLOCK_PAGES, row_starts, scoring_blocks_per_program, unit_last_stride
from .summaries import check_summary_layout, page_summary, scale_argument, stored_summary


@triton.jit
def _page_scores_kernel(
    Q, KMAX, KMIN, VALID, OUT, K, FIRST, START, SCALE,
    stride_qb, stride_qh,
    stride_sb, stride_sh, stride_sp,
    stride_vb,
    stride_ob, stride_oh,
    stride_kb, stride_kh, stride_kl, stride_first,
    stride_cb, stride_ch,
    num_pages, length,
    G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT: tl.constexpr, HEADS: tl.constexpr, PRECISION: tl.constexpr, REFRESH: tl.constexpr,
    QUANTIZED: tl.constexpr, BLOCKS: tl.constexpr, TABLES_AS_B: tl.constexpr,
):
    # Programs 0..REFRESH-1 of the last grid axis refresh a step's written pages (REFRESH pages
    # from the one holding FIRST[b]): summarize, store, and score each from its new rows. The rest
    # score blocks of pages and leave those pages' scores to them. The refresh is spare programs
    # beside the scoring, not a branch inside it: a branch that rewrote the scoring tiles made the
    # whole kernel slower than two launches.
    # int8 tables (QUANTIZED) are scored by the query times the summary scale, rounded to the
    # query's dtype (reference.page_scores); the tables' steps are exact in any float dtype.
    b, hkv, program = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dims = tl.arange(0, D)
    heads = tl.arange(0, HEADS)
    row_start = tl.load(START + b)  # the row's pages start at its first valid slot
    scale = 1.0
    if QUANTIZED:
        scale = tl.load(SCALE + b * stride_cb + hkv * stride_ch + dims)
    q = tl.load(Q + b * stride_qb + (hkv * G + heads)[:, None] * stride_qh + dims[None, :],
                mask=(heads < G)[:, None], other=0.0)  # (HEADS, D): the group's heads, the rest zero
    if QUANTIZED:
        q = (q.to(tl.float32) * scale[None, :]).to(Q.dtype.element_ty)
    first = -1
    if REFRESH > 0:  # a kernel without the refresh holds none of its code, nor its stores
        first = tl.load(FIRST + b * stride_first) // P
        if program < REFRESH:  # the page and loads of _summarize_pages_kernel (see the note on helpers in summaries.py)
            page = tl.minimum(first + program, num_pages - 1)
            page_keys = row_start + page * P + tl.arange(0, P)
            inside = page_keys < length
            written = inside & (tl.load(VALID + b * stride_vb + page_keys, mask=inside, other=0) != 0)
            x = tl.load(K + b * stride_kb + hkv * stride_kh + page_keys[:, None] * stride_kl + dims[None, :],
                        mask=inside[:, None], other=0.0).to(tl.float32)
            page_max, page_min, page_valid = page_summary(x, written)
            page_max, page_min = stored_summary(page_max, page_min, scale, QUANTIZED)
            page_max, page_min = page_max.to(KMAX.dtype.element_ty), page_min.to(KMIN.dtype.element_ty)
            row = b * stride_sb + hkv * stride_sh + page * stride_sp + dims
            tl.store(KMAX + row, page_max)
            tl.store(KMIN + row, page_min)
            q_group = q.to(tl.float32)
            page_bound = tl.sum(tl.maximum(q_group * page_max.to(tl.float32)[None, :],
                                           q_group * page_min.to(tl.float32)[None, :]), axis=1)
            page_best = tl.max(tl.where(heads < G, page_bound, float("-inf")), axis=0)
            tl.store(OUT + b * stride_ob + hkv * stride_oh + page, tl.where(page_valid, page_best, float("-inf")))
            return
    if DOT:  # see below
        q_up, q_down = tl.maximum(q, 0.0).to(q.dtype), tl.minimum(q, 0.0).to(q.dtype)
    else:
        q_group = q.to(tl.float32)
    for block in tl.range((program - REFRESH) * BLOCKS, (program - REFRESH + 1) * BLOCKS):  # loads pipelined
        pages = block * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = pages < num_pages
        offs = b * stride_sb + hkv * stride_sh + pages[:, None] * stride_sp + dims[None, :]
        kmax = tl.load(KMAX + offs, mask=ok[:, None], other=0)
        kmin = tl.load(KMIN + offs, mask=ok[:, None], other=0)
        if DOT:
            # Since kmax >= kmin, max(q * kmax, q * kmin) summed over dims is
            # max(q, 0) . kmax + min(q, 0) . kmin: two matrix products over the group's HEADS (>= G,
            # the rest zero and left out of the max), on tensor cores instead of 3 ops per element and
            # head, in the query's dtype (int8 tables converted in registers: half the bytes to read).
            kmax, kmin = kmax.to(q.dtype), kmin.to(q.dtype)
            if TABLES_AS_B:
                # The tables as the products' second operand: Triton then reads int8 tiles from
                # shared memory 8 bytes at a time to convert them, where as the first operand it
                # read 2 (the sm_90 kernel: 904 SASS instructions against 1296).
                bound = tl.trans(tl.dot(q_up, tl.trans(kmax), input_precision=PRECISION)
                                 + tl.dot(q_down, tl.trans(kmin), input_precision=PRECISION))
            else:
                bound = (tl.dot(kmax, tl.trans(q_up), input_precision=PRECISION)
                         + tl.dot(kmin, tl.trans(q_down), input_precision=PRECISION))  # (BLOCK_P, HEADS) fp32
            best = tl.max(tl.where((heads < G)[None, :], bound, float("-inf")), axis=1)
        else:
            kmax, kmin = kmax.to(tl.float32), kmin.to(tl.float32)
            best = tl.full((BLOCK_P,), float("-inf"), tl.float32)
            for g in tl.static_range(G):
                q_head = tl.sum(tl.where((heads == g)[:, None], q_group, 0.0), axis=0)  # row g of the (scaled) group
                bound = tl.sum(tl.maximum(q_head[None, :] * kmax, q_head[None, :] * kmin), axis=1)
                best = tl.maximum(best, bound)
        keys = row_start + pages[:, None] * P + tl.arange(0, P)[None, :]
        valid = tl.load(VALID + b * stride_vb + keys, mask=keys < length, other=0) != 0
        any_valid = tl.max(valid.to(tl.int32), axis=1) > 0
        others = ok & ((pages < first) | (pages >= first + REFRESH))  # a written page's score is its refresher's
        tl.store(OUT + b * stride_ob + hkv * stride_oh + pages, tl.where(any_valid, best, float("-inf")), mask=others)


def page_scores(
    q_row: torch.Tensor,
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    valid: torch.Tensor,
    page_size: int,
    block_pages: int | None = None,
    num_warps: int = 4,
    as_products: bool = True,
    refresh: reference.PageRefresh | None = None,
    summary_scale: torch.Tensor | None = None,
    blocks_per_program: int | None = None,
    num_stages: int = 3,
    tables_as_b: bool | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same as ``reference.page_scores``: q_row (B, Hq, D) -> (B, Hkv, NP) fp32.

    One program scores ``block_pages`` pages of one (batch row, KV head) for the whole query group,
    and reads their bytes of ``valid`` to mark the pages with no valid position. Each page of
    ``refresh`` gets one more program, which summarizes it anew (in place) and scores it from the
    new rows (elementwise, in fp32): a step's refresh needs no launch of its own. ``as_products``
    computes each bound as two matrix products (``max(q, 0) . kmax + min(q, 0) . kmin``, the same
    sum in another order) where the shapes allow a ``tl.dot`` (blocks of at least 16 pages);
    otherwise elementwise in fp32 (tensor cores instead of 3 ops per element and head).
    int8 tables need their ``summary_scale`` (B, Hkv, D).

    A program scores ``blocks_per_program`` blocks in a loop whose loads Triton pipelines
    (``num_stages``): one block a program leaves each program's loads and products in series.
    Defaults: blocks of :data:`~.launch.SCORING_BLOCK_PAGES` pages, as many a program as
    :func:`~.launch.scoring_blocks_per_program` picks.

    ``tables_as_b`` puts the tables second in the products (query x tables, not tables x query);
    None: for int8 tables only, which Triton then converts from shared memory in wider loads.
    """
    b, hq, d = q_row.shape
    hkv, num_pages = kmax.shape[1], kmax.shape[2]
    quantized = kmax.dtype == torch.int8
    block_pages = block_pages or SCORING_BLOCK_PAGES
    if blocks_per_program is None:
        blocks_per_program = scoring_blocks_per_program(b * hkv, triton.cdiv(num_pages, block_pages),
                                                        0 if refresh is None else refresh.count, quantized,
                                                        q_row.device)
    summary_scale = scale_argument(kmax, summary_scale, "page_scores")
    if refresh is None:
        kmax, kmin = kmax.contiguous(), kmin.contiguous()
        k, first_position, count = kmax, kmax[:, 0, 0, 0], 0  # never read
    else:
        check_summary_layout(kmax, kmin, "page_scores")  # written in place
        (k,), first_position, count = unit_last_stride(refresh.k), refresh.first_position, refresh.count
    q_row, valid = unit_last_stride(q_row, valid)  # q_row: a strided view of the query's newest row
    start = row_starts(start, b, q_row.device)
    out = torch.empty(b, hkv, num_pages, dtype=torch.float32, device=q_row.device)
    block = min(block_pages, triton.next_power_of_2(num_pages))
    group = hq // hkv
    dot = as_products and block >= 16 and kmax.dtype in (q_row.dtype, torch.int8) and kmin.dtype == kmax.dtype
    grid = (b, hkv, count + triton.cdiv(triton.cdiv(num_pages, block), blocks_per_program))
    wrap_triton(_page_scores_kernel)[grid](
        q_row, kmax, kmin, valid, out, k, first_position, start, summary_scale,
        q_row.stride(0), q_row.stride(1),
        kmax.stride(0), kmax.stride(1), kmax.stride(2),
        valid.stride(0),
        out.stride(0), out.stride(1),
        k.stride(0), k.stride(1), k.stride(2), first_position.stride(0),
        summary_scale.stride(0), summary_scale.stride(1),
        num_pages, valid.shape[-1], G=group, D=d, P=page_size, BLOCK_P=block,
        DOT=dot, HEADS=max(16, triton.next_power_of_2(group)),
        PRECISION="ieee" if q_row.dtype == torch.float32 else "tf32",  # fp32 exact; 16-bit inputs ignore it
        REFRESH=count, QUANTIZED=quantized, BLOCKS=blocks_per_program,
        TABLES_AS_B=quantized if tables_as_b is None else tables_as_b, num_warps=num_warps, num_stages=num_stages,
    )
    return out
