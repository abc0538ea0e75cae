"""Triton kernels for the heavy stages of a decode step (docs/algorithm.md, section 7).

* :func:`summarize_pages`: page key max/min, in place, for every page after a prefill (or any range),
  as they are or as int8 steps of a per-dim scale (``reference.quantize_summary``).
* :func:`page_scores`: Quest's page bound, reading each page summary once, GQA group max fused;
  pages with no valid position score -inf. A decode step's written pages are summarized anew
  by spare programs of the same launch, which score them too: the refresh has no launch of its own.
* :func:`top_pages`: the page selection without a sort: a search for the budget-th largest
  score, then the chosen pages; at small batch split over chunks of pages, then one pass per row.
* :func:`attend_window`: split-KV sparse attention and the state update, in two kernels. The
  attention kernel runs one program per (batch row, KV head, split); each walks its share of the
  selected pages a tile of pages at a time, loading each page's K and V once for all ``G * n``
  query rows of the group (G query heads x n window rows). Per row it applies the mask, and for
  past rows the unseen-page test ``last[page] < position``; then it stamps its pages in ``last``.
  The merge kernel, one program per (batch row, query head), folds the splits by log-sum-exp,
  merges past rows with the output cache, moves the cache on and writes the output.
* :func:`dense_window`: the same two kernels over every page, with no selection and no state: a
  dense layer's window rows, each key and value read once for all of a KV head's rows (its
  reference is ``reference.sdpa_row_by_row``).

The first four are drop-in replacements for the ``reference`` functions of the same names (same
arguments, same results; :func:`kernel_stages` bundles them), so ``reference.decode_step`` and
``reference.prefill`` run either. The kernels read their small inputs (the query's newest row,
positions) through strides, so a step launches little besides them and the query positions,
which Inductor reduces in two passes (a kernel with one program a row, measured on an H200, took
3x as long: 12 us against 3.6 at 128K keys).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import reference
from .reference import SparseParams


def _unit_last_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as the kernels index them (any strides but the last, which must be 1): a view
    that already has it is passed as it is, not copied."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _check_summary_layout(kmax: torch.Tensor, kmin: torch.Tensor, caller: str) -> None:
    """Summaries written in place are indexed with kmax's strides for both tables."""
    if kmax.stride(-1) != 1 or kmin.stride(-1) != 1 or kmax.stride() != kmin.stride():
        raise ValueError(f"kernels.decode.{caller}: kmax and kmin must share a layout with unit last stride")


# The kernels' @triton.jit helpers take values, never pointers: Inductor's analysis of which
# tensors a kernel writes counts a pointer passed to a helper as written, and then copies it
# before the launch (two small copy kernels a step, measured on an H200; for the keys of a
# summary it would be the whole cache). So kernels that read the same rows spell out the loads.


@triton.jit
def _page_summary(x, ok):
    """Max and min rows (fp32) of a page's keys ``x`` (P, D) over its valid rows ``ok`` (P,), and
    whether it has any; a page with no valid key summarizes to zeros."""
    written = tl.max(ok.to(tl.int32), axis=0) > 0
    kmax = tl.where(written, tl.max(tl.where(ok[:, None], x, float("-inf")), axis=0), 0.0)
    kmin = tl.where(written, tl.min(tl.where(ok[:, None], x, float("inf")), axis=0), 0.0)
    return kmax, kmin, written


@triton.jit
def _stored_summary(kmax, kmin, scale, QUANTIZED: tl.constexpr):
    """A page's max and min rows (fp32) as the tables store them: for int8 tables
    (``QUANTIZED``) steps of ``scale`` (D,), rounded outward and saturated
    (``reference.quantize_summary``; correctly rounded division, as PyTorch's); otherwise as they
    are. The caller casts to the tables' dtype."""
    if QUANTIZED:
        kmax = tl.clamp(tl.ceil(tl.div_rn(kmax, scale)), -127.0, 127.0)
        kmin = tl.clamp(tl.floor(tl.div_rn(kmin, scale)), -127.0, 127.0)
    return kmax, kmin


@triton.jit
def _summarize_pages_kernel(
    K, VALID, FIRST, START, KMAX, KMIN, SCALE,
    stride_kb, stride_kh, stride_kl, stride_vb, stride_first,
    stride_sb, stride_sh, stride_sp, stride_cb, stride_ch,
    length, num_pages,
    P: tl.constexpr, D: tl.constexpr, QUANTIZED: tl.constexpr,
):
    b, h, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    page = tl.minimum(tl.load(FIRST + b * stride_first) // P + t, num_pages - 1)
    keys = tl.load(START + b) + page * P + tl.arange(0, P)  # a row's pages start at its first valid slot
    dims = tl.arange(0, D)
    # The keys load beside the valid bytes, not under them: a load whose mask waits on another
    # load waits on it too (the summary leaves out the rows that are not valid).
    inside = keys < length
    ok = inside & (tl.load(VALID + b * stride_vb + keys, mask=inside, other=0) != 0)
    x = tl.load(K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kl + dims[None, :],
                mask=inside[:, None], other=0.0).to(tl.float32)
    kmax, kmin, _ = _page_summary(x, ok)
    scale = 1.0
    if QUANTIZED:
        scale = tl.load(SCALE + b * stride_cb + h * stride_ch + dims)
    kmax, kmin = _stored_summary(kmax, kmin, scale, QUANTIZED)
    offs = b * stride_sb + h * stride_sh + page * stride_sp + dims
    tl.store(KMAX + offs, kmax.to(KMAX.dtype.element_ty))
    tl.store(KMIN + offs, kmin.to(KMIN.dtype.element_ty))


def summarize_pages(
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    first_position: torch.Tensor,
    count: int,
    page_size: int,
    summary_scale: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> None:
    """Same as ``reference.summarize_pages``: one program per (batch row, KV head, page) reads the
    page's keys once and writes its max and min rows in place (int8 tables: as steps of
    ``summary_scale``). ``first_position`` (B,) may be a strided view (the first row's column of
    the positions), read as it is."""
    b, hkv, length, d = k.shape
    _check_summary_layout(kmax, kmin, "summarize_pages")
    k, valid = _unit_last_stride(k, valid)
    summary_scale = _summary_scale(kmax, summary_scale, "summarize_pages")
    start = _row_starts(start, b, k.device)
    wrap_triton(_summarize_pages_kernel)[(b, hkv, count)](
        k, valid, first_position, start, kmax, kmin, summary_scale,
        k.stride(0), k.stride(1), k.stride(2), valid.stride(0), first_position.stride(0),
        kmax.stride(0), kmax.stride(1), kmax.stride(2), summary_scale.stride(0), summary_scale.stride(1),
        length, kmax.shape[2], P=page_size, D=d, QUANTIZED=kmax.dtype == torch.int8,
    )


def _row_starts(start: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Each row's first valid slot (B,) int32, contiguous, as the kernels read it (None: slot 0)."""
    if start is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    if start.dtype != torch.int32 or start.shape != (batch,):
        raise ValueError(f"kernels.decode: start must be int32 of shape ({batch},), got {start.dtype} {tuple(start.shape)}")
    return start.contiguous()


def _summary_scale(kmax: torch.Tensor, summary_scale: torch.Tensor | None, caller: str) -> torch.Tensor:
    """The scale a kernel is given (``reference.table_scale``): int8 tables' own, with unit last
    stride. Other tables never read it and get what was passed, or a stand-in."""
    step = reference.table_scale(kmax, summary_scale, f"kernels.decode.{caller}")
    if step is None:
        return kmax if summary_scale is None else summary_scale
    return _unit_last_stride(step)[0]


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
    # whole kernel 10% slower on an H200 (84 us against 74 for two launches, B=8/128K).
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
        if program < REFRESH:  # the page and loads of _summarize_pages_kernel (see the note on helpers)
            page = tl.minimum(first + program, num_pages - 1)
            page_keys = row_start + page * P + tl.arange(0, P)
            inside = page_keys < length
            written = inside & (tl.load(VALID + b * stride_vb + page_keys, mask=inside, other=0) != 0)
            x = tl.load(K + b * stride_kb + hkv * stride_kh + page_keys[:, None] * stride_kl + dims[None, :],
                        mask=inside[:, None], other=0.0).to(tl.float32)
            page_max, page_min, page_valid = _page_summary(x, written)
            page_max, page_min = _stored_summary(page_max, page_min, scale, QUANTIZED)
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


SCORING_PROGRAMS_PER_SM = 2  # an SM's: the kernel holds 208-255 registers a thread (Triton 3.6, 4 warps)


def _scoring_blocks_per_program(rows: int, blocks_per_row: int, refreshers: int, quantized: bool,
                                device: torch.device) -> int:
    """Blocks of pages a scoring program walks, for ``rows`` (batch row, KV head) pairs of
    ``blocks_per_row`` blocks, with ``refreshers`` refresh programs a pair.

    As many as leave at least 256 programs, at most 8. With stored (not int8) tables and a
    refresh, more if that brings the whole grid, refresh programs included, into one wave of the
    device's SMs (:data:`SCORING_PROGRAMS_PER_SM` each): at B=1/128K 16 refresh programs beside 256
    scoring ones were 272 where an H200 holds 264, and 8 programs of 4 blocks ran in a second
    wave. Side by side on an H200 (stored summaries), scoring with the refresh took 8.55 us
    against 9.25 at B=1/128K (5 blocks a program), 6.12 against 6.46 at B=1/64K and 6.49 against
    8.12 at B=8/8K; at B=4/32K scoring won 0.1 us and the whole step lost 0.4 (39.70 against
    39.33). With int8 tables it lost at every shape it changed (9.55 against 9.32 at B=1/128K,
    7.96 against 6.84 at B=8/8K), so those keep the first rule.
    """
    per_program = min(8, max(1, rows * blocks_per_row // 256))
    if refreshers and not quantized:
        per_program = next((n for n in range(per_program, 9) if _one_wave(
            rows * (refreshers + triton.cdiv(blocks_per_row, n)), device, SCORING_PROGRAMS_PER_SM)), per_program)
    return per_program


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
    otherwise elementwise in fp32. On an H200 (bf16, 32 query / 8 KV heads) the products took
    10.0 us at B=1/128K against 12.8 elementwise, and 70.7 against 84.6 at B=8/128K.
    int8 tables need their ``summary_scale`` (B, Hkv, D).

    A program scores ``blocks_per_program`` blocks in a loop whose loads Triton pipelines
    (``num_stages``): one block a program leaves each program's loads and products in series.
    Defaults: blocks of 64 pages, as many a program as :func:`_scoring_blocks_per_program` picks.
    On an H200 at B=8/128K that took 52.1 us with int8 tables against 70.8 for the best single
    block (128 pages), and 67.9 against 79.0 with bf16 tables; at B=1/128K 9.5 against 10.8 and
    8.2 against 10.9; at B=1/32K (256 blocks) one block a program was the fastest (without the
    refresh, which now takes it to 2).

    ``tables_as_b`` puts the tables second in the products (query x tables, not tables x query);
    None: for int8 tables only. Same process on an H200, int8 tables: 43.5 us against 52.3 at
    B=8/128K, 13.6 against 16.1 at B=8/32K, 8.2 against 9.5 at B=1/128K, 4.1 at B=1/32K either way;
    bf16 tables: 9.1 against 8.2 at B=1/128K, 4.4 against 3.9 at B=1/32K, equal at B=8/128K.
    """
    b, hq, d = q_row.shape
    hkv, num_pages = kmax.shape[1], kmax.shape[2]
    quantized = kmax.dtype == torch.int8
    block_pages = block_pages or 64
    if blocks_per_program is None:
        blocks_per_program = _scoring_blocks_per_program(b * hkv, triton.cdiv(num_pages, block_pages),
                                                         0 if refresh is None else refresh.count, quantized,
                                                         q_row.device)
    summary_scale = _summary_scale(kmax, summary_scale, "page_scores")
    if refresh is None:
        kmax, kmin = kmax.contiguous(), kmin.contiguous()
        k, first_position, count = kmax, kmax[:, 0, 0, 0], 0  # never read
    else:
        _check_summary_layout(kmax, kmin, "page_scores")  # written in place
        (k,), first_position, count = _unit_last_stride(refresh.k), refresh.first_position, refresh.count
    q_row, valid = _unit_last_stride(q_row, valid)  # q_row: a strided view of the query's newest row
    start = _row_starts(start, b, q_row.device)
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


@triton.jit
def _key_to_float(key):
    """The float whose order-preserving key (see _top_mask) is ``key``."""
    signed = (key - (1 << 31)).to(tl.int32)
    return (signed ^ ((signed >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _ranked_scores(score, pages, num_pages, position, page_size, sink_pages, local_pages):
    """Scores (loaded with -inf past ``num_pages``) as the selection ranks them: always-kept pages
    +inf (unless -inf: no valid position), pages past ``num_pages`` NaN (padding, which no
    comparison counts). ``position`` is the query's."""
    own = position // page_size
    keep = (pages < sink_pages) | ((pages <= own) & (pages > own - local_pages))
    return tl.where(pages < num_pages, tl.where(keep & (score > float("-inf")), float("inf"), score), float("nan"))


@triton.jit
def _float_to_key(x):
    """The order-preserving integer key of a float: flip the magnitude bits of negatives, add 2**31."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + (1 << 31)


INTERPOLATED_ROUNDS = tl.constexpr(8)  # the threshold search's first rounds guess by interpolation, then it bisects
SEARCH_BINS = tl.constexpr(32)  # bins of each histogram that narrows the search's bracket
SEARCH_LEVELS = tl.constexpr(2)  # histograms before the search


@triton.jit
def _sum_min_max(sum_a, min_a, max_a, sum_b, min_b, max_b):
    return sum_a + sum_b, tl.minimum(min_a, min_b), tl.maximum(max_a, max_b)


@triton.jit
def _max_min_max(a0, a1, a2, b0, b1, b2):
    return tl.maximum(a0, b0), tl.minimum(a1, b1), tl.maximum(a2, b2)


@triton.jit
def _min_max(min_a, max_a, min_b, max_b):
    return tl.minimum(min_a, min_b), tl.maximum(max_a, max_b)


@triton.jit
def _top_mask(ranked, budget):
    """Exactly ``min(budget, non-NaN count)`` entries of ``ranked``, none below one left out; ties
    at the threshold go to the first in order. Returns the mask, each entry's count of taken
    entries up to and including it (its slot + 1 if taken), and how many are taken.

    The threshold is the budget-th largest value, or any value with exactly ``budget`` values at or
    above it. It is -inf when fewer than ``budget`` values are above -inf, +inf when at least
    ``budget`` are +inf (always-kept pages), and otherwise lies between the smallest and largest
    finite values: a search over their order-preserving integer keys (see :func:`_float_to_key`)
    keeps ``lo`` (``count_lo >= budget`` values at or above it) and ``hi`` (``count_hi < budget``
    values above it) and stops once a count is exact or ``lo == hi``. Its first rounds guess where
    the budget-th value lies by linear interpolation of the counts, kept inside the middle 60% of
    the range; later rounds bisect, so it ends within 8 + 32 rounds whatever the values.
    Each round is one comparison per value and one sum; comparisons are on floats. Around
    the rounds, each reduction or prefix sum over the program's values waits on its warps to meet,
    so those that can share one do: the counts with the bounds, both prefix counts at the end.

    Before the rounds, SEARCH_LEVELS histograms of SEARCH_BINS bins narrow the bracket to one
    bin's values (the bin of a bin, ...), in one histogram and one small reduction a level. In a
    simulation on Quest bounds of random Gaussian keys (budget 128; 1024 and 2048 values) the
    interpolating search took 7.7 and 8.1 rounds on average from the finite values' bounds, 0.6
    and 0.7 after two levels of 32 bins. On an H200, side by side with the search alone
    (``results/compare_search_h200.json``), the selection took 4.1 us against 5.6 at B=1/8K,
    6.8 against 7.0 at B=1/32K and 10.0 against 10.2 at B=1/128K (9.7 with the 8 warps of
    ``top_pages``, ``results/compare_search_warps_h200.json``).
    """
    above_neg_inf, at_pos_inf = ranked > float("-inf"), ranked == float("inf")
    finite = above_neg_inf & ~at_pos_inf
    # three counts in one sum, 21 bits each: non-NaN values, values above -inf, values at +inf
    packed = (ranked == ranked).to(tl.int64) + (above_neg_inf.to(tl.int64) << 21) + (at_pos_inf.to(tl.int64) << 42)
    counts, smallest, largest = tl.reduce(
        (packed, tl.where(finite, ranked, float("inf")), tl.where(finite, ranked, float("-inf"))), 0, _sum_min_max)
    every, up, at_inf = counts & 0x1FFFFF, (counts >> 21) & 0x1FFFFF, counts >> 42
    search = (every > budget) & (up >= budget) & (at_inf < budget)
    no_search = tl.where(at_inf >= budget, tl.full((), 0xFF800000, tl.int64), 0x7FFFFF)  # key(+inf) or key(-inf)
    lo, hi, count_lo, count_hi = no_search, no_search, up, at_inf
    if search:  # the bracket narrowed by histograms (a row without a search, e.g. a short context, skips them)
        # Each level splits the current bin's value range into SEARCH_BINS equal bins and keeps
        # the bin holding the budget-th value. A value's bin is a monotone function of it
        # (rounding and clamping are), so the kept bin's values are all the values between its
        # smallest and largest, and the counts (at or above the kept bin, above it) carry over.
        inside = finite
        value_range = tl.where(largest > smallest, largest - smallest, 1.0)
        start, scale = smallest, tl.full((), SEARCH_BINS, tl.float32) / value_range
        bins = tl.arange(0, SEARCH_BINS)
        for _ in tl.static_range(SEARCH_LEVELS):
            t = (ranked - start) * scale
            value_bin = tl.where(t > 0, tl.minimum(t, SEARCH_BINS - 1), 0.0).to(tl.int32)  # NaN (0 x inf): bin 0
            in_bin = tl.histogram(value_bin, SEARCH_BINS, mask=inside)
            at_or_above = count_lo - tl.cumsum(in_bin, axis=0) + in_bin  # values at or above each bin
            reaches = at_or_above >= budget
            kept, count_lo, count_hi = tl.reduce(
                (tl.where(reaches, bins, -1), tl.where(reaches, at_or_above, count_lo),
                 tl.where(reaches, count_hi, at_or_above)), 0, _max_min_max)
            inside &= value_bin == kept
            start += kept / tl.where(scale > 0, scale, 1.0)  # scale 0 (a range past the largest float): bin 0
            scale *= SEARCH_BINS
        bin_min, bin_max = tl.reduce(
            (tl.where(inside, ranked, float("inf")), tl.where(inside, ranked, float("-inf"))), 0, _min_max)
        lo, hi = _float_to_key(bin_min), _float_to_key(bin_max)
    rounds = 0
    while (lo < hi) & (count_lo != budget):
        span = hi - lo
        mid = lo + (span + 1) // 2
        if rounds < INTERPOLATED_ROUNDS:
            low, high = _key_to_float(lo), _key_to_float(hi)
            guess = low + (high - low) * ((count_lo - budget) / (count_lo - count_hi)).to(tl.float32)
            margin = span // 5
            mid = tl.minimum(tl.maximum(_float_to_key(guess), lo + 1 + margin), hi - margin)
        at_least = tl.sum((ranked >= _key_to_float(mid)).to(tl.int32), axis=0)
        enough = at_least >= budget
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
        count_lo = tl.where(enough, at_least, count_lo)
        count_hi = tl.where(enough, count_hi, at_least)
        rounds += 1
    threshold = _key_to_float(lo)
    above = ranked > threshold
    ties = ranked == threshold
    # At most MAX_KERNEL_PAGES (2**14) values: both prefix counts fit one int32, ties in the high half.
    prefix = tl.cumsum(above.to(tl.int32) + (ties.to(tl.int32) << 16), axis=0)
    above_so_far, ties_so_far = prefix & 0xFFFF, prefix >> 16
    room = tl.maximum(budget - tl.sum(above.to(tl.int32), axis=0), 0)  # for ties, the first in order
    return (above | (ties & (ties_so_far <= room)), above_so_far + tl.minimum(ties_so_far, room),
            tl.minimum(every, budget).to(tl.int32))


@triton.jit
def _top_pages_kernel(
    SCORES, POS, BUDGET, CAND_SCORE, CAND_PAGE, COUNTS, IDX, CHOSEN,
    stride_sb, stride_sh, stride_pos, stride_nb, stride_nh,
    kv_heads, num_pages, K, page_size, sink_pages, local_pages,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, KEEP_BLOCK: tl.constexpr, FIXED_BUDGET: tl.constexpr,
):
    """Each (batch row, KV head)'s ``budget`` best pages. The budget is ``K`` (FIXED_BUDGET) or
    the row's entry of BUDGET.

    CHUNK 0: one program per (batch row, KV head) ranks its scores. Otherwise the row is split:
    one program per chunk of CHUNK pages keeps its chunk's K best pages as candidates (ranked
    scores, in page order; NaN and page -1 fill the rest of its slots), and the last of a row's
    programs to finish picks from them (any page of the row's top K is among its chunk's top K).
    COUNTS counts the finished chunks and is left at zero."""
    row = tl.program_id(0)
    b, h = row // kv_heads, row % kv_heads
    position = tl.load(POS + b * stride_pos)
    if CHUNK > 0:
        chunk = tl.program_id(1)
        chunk_pages = chunk * CHUNK + tl.arange(0, CHUNK)
        score = tl.load(SCORES + b * stride_sb + h * stride_sh + chunk_pages, mask=chunk_pages < num_pages,
                        other=float("-inf"))
        chunk_ranked = _ranked_scores(score, chunk_pages, num_pages, position, page_size, sink_pages, local_pages)
        keep, kept_so_far, kept = _top_mask(chunk_ranked, K)
        slot = kept_so_far - 1
        candidates = row * tl.num_programs(1) * K
        base = candidates + chunk * K
        tl.store(CAND_SCORE + base + slot, chunk_ranked, mask=keep)
        tl.store(CAND_PAGE + base + slot, chunk_pages, mask=keep)
        empty = tl.arange(0, KEEP_BLOCK)
        empty = tl.where((empty >= kept) & (empty < K), empty, -1)
        tl.store(CAND_SCORE + base + empty, float("nan"), mask=empty >= 0)
        tl.store(CAND_PAGE + base + empty, -1, mask=empty >= 0)
        # The count: the barrier puts every warp's stores above before it, and the atomic (acquire
        # and release, GPU scope) orders the other chunks' candidates before the last program's
        # reads, which skip the SM's L1 (".cg"), where an earlier step's candidates may linger.
        tl.debug_barrier()
        counter = COUNTS + b * stride_nb + h * stride_nh
        if tl.atomic_add(counter, 1) != tl.num_programs(1) - 1:
            return
        tl.store(counter, 0)  # every chunk of this step has counted: ready for the next step
        at = tl.arange(0, BLOCK)
        inside = at < tl.num_programs(1) * K
        ranked = tl.load(CAND_SCORE + candidates + at, mask=inside, other=float("nan"), cache_modifier=".cg")
        pages = tl.load(CAND_PAGE + candidates + at, mask=inside, other=-1, cache_modifier=".cg")
    else:
        pages = tl.arange(0, BLOCK)
        score = tl.load(SCORES + b * stride_sb + h * stride_sh + pages, mask=pages < num_pages, other=float("-inf"))
        ranked = _ranked_scores(score, pages, num_pages, position, page_size, sink_pages, local_pages)
    budget = K if FIXED_BUDGET else tl.load(BUDGET + b)
    take, taken_so_far, _ = _top_mask(ranked, budget)
    # Taken pages fill slots 0..budget-1 in page order; the rest follow, so all K slots hold
    # distinct pages (the reference's state update writes through every slot). Every entry is
    # taken or not, so the entries not taken up to entry i number i + 1 - (taken up to i). NaN
    # entries (padding) come last, after at least K real pages.
    at = tl.arange(0, BLOCK)
    slot = tl.where(take, taken_so_far - 1, budget + at - taken_so_far)
    out = (ranked == ranked) & (slot < K)
    tl.store(IDX + row * K + slot, pages.to(tl.int64), mask=out)
    tl.store(CHOSEN + row * K + slot, take & (ranked > float("-inf")), mask=out)


MAX_KERNEL_PAGES = 16384  # one program holds a row of page scores in registers
SPLIT_BELOW_ROWS = 128  # fewer (batch row, KV head) pairs than this: the selection may be split over chunks


def top_pages(
    scores: torch.Tensor, position: torch.Tensor, params: SparseParams, counts: torch.Tensor | None = None,
    chunk_pages: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same selection as ``reference.top_pages`` without a sort: per (batch row, KV head), a
    search (see :func:`_top_mask`) finds the budget-th largest score, then the chosen pages are
    written in page order.

    One program per (batch row, KV head) leaves most of the GPU idle at small batch (8 programs
    for 8192 pages each at B=1, 128K). There the selection is split: programs over chunks of
    ``chunk_pages`` pages keep each chunk's best ``K`` (the page cap), and the last of a row's
    programs picks from those candidates, in the same launch. ``chunk_pages`` None picks it (see
    below); 0 forces one program a row. ``counts`` (B, Hkv) int32, zero (the layer state's)
    counts a row's finished chunks; None allocates them. ``num_warps`` None picks them from the
    values each program ranks.

    The page set equals the reference's (ties at the threshold aside, where either choice is a
    valid top-k); the slot order differs, which nothing downstream depends on.
    """
    b, hkv, num_pages = scores.shape
    if num_pages > MAX_KERNEL_PAGES:
        return reference.top_pages(scores, position, params)
    k = min(params.budget_pages, num_pages)
    if chunk_pages is None:
        # On an H200 (budget 128 pages, 8 KV heads), the selection in one launch: at B=1 and 8192
        # pages a row, 8 chunks of 1024 took 10.5 us against 13.3 one program a row and 13.6 in
        # chunks of 2048; at B=4 and B=8 (8192 pages) chunks of 2048 took 12.5 and 14.0 us against
        # 13.1 and 15.2 in chunks of 1024 and 15.1 and 15.4 one program a row; at B=8 and 4096
        # pages, one program a row 11.4 against 12.0 in 2 chunks. Splits into fewer than 8 chunks
        # lost at B=1 (2048 pages: 7.4 us one program a row, 10.4 in two launches).
        rows = b * hkv
        chunk_pages, min_chunks = (1024, 8) if rows < 32 else (2048, 4)
        chunk_pages = max(chunk_pages, 4 * triton.next_power_of_2(k))
        if rows >= SPLIT_BELOW_ROWS or num_pages < min_chunks * chunk_pages:
            chunk_pages = 0
    if chunk_pages and (chunk_pages & (chunk_pages - 1) or chunk_pages < k):
        raise ValueError(f"kernels.decode.top_pages: chunk_pages={chunk_pages} must be 0 or a power of two >= {k}")
    chunks = triton.cdiv(num_pages, chunk_pages) if chunk_pages else 1
    if counts is None:
        counts = torch.zeros(b, hkv, dtype=torch.int32, device=scores.device)
    # A fixed budget (no budget_fraction) is the kernel's argument; only a fraction of the context needs a tensor.
    budget = None if params.budget_fraction == 0.0 else \
        reference.budget_pages_for(params, position).clamp(max=k).to(torch.int32)
    scores = scores.contiguous()  # position, the newest row's column of (B, n), is read through its stride
    indices = torch.empty(b, hkv, k, dtype=torch.int64, device=scores.device)
    chosen = torch.empty(b, hkv, k, dtype=torch.bool, device=scores.device)
    entries = chunks * k if chunk_pages else num_pages  # the final pick's values: candidates, or the scores
    block = max(16, triton.next_power_of_2(entries))
    # Each search round is a reduction over the values: more warps split the comparisons, fewer
    # pay less to combine (H200: 8 warps for 8192 values took 15.3 us against 17.0 with 16; 4 for
    # 512 values 5.9 against 6.5 with 1). The histograms' work (warp votes, a few a value) grows
    # with the values a thread holds, so where the programs leave SMs idle more warps pay: 8 warps
    # for 2048 values took 6.8 us against 7.4 with 4 at B=1/32K and 10.9 against 11.5 at B=4/128K
    # (128 programs), for 1024 values 9.7 against 10.0 at B=1/128K (64 programs), but 13.6 against
    # 13.2 at B=8/128K (256 programs); 16 warps lost (7.6 at B=1/32K).
    values = max(block, chunk_pages)
    fits_sms = _one_wave(b * hkv * chunks, scores.device)
    num_warps = num_warps or (8 if values >= 8192 or (values >= 1024 and fits_sms) else 4)
    if chunk_pages:
        cand_score = torch.empty(b * hkv, chunks * k, dtype=torch.float32, device=scores.device)
        cand_page = torch.empty(b * hkv, chunks * k, dtype=torch.int32, device=scores.device)
    else:
        cand_score, cand_page = scores, scores  # unused by one program a row (read-only here)
    wrap_triton(_top_pages_kernel)[(b * hkv, chunks)](
        scores, position, indices if budget is None else budget,  # FIXED_BUDGET never reads it
        cand_score, cand_page, counts, indices, chosen,
        scores.stride(0), scores.stride(1), position.stride(0), counts.stride(0), counts.stride(1),
        hkv, num_pages, k, params.page_size, params.sink_pages, params.local_pages,
        BLOCK=block, CHUNK=chunk_pages, KEEP_BLOCK=triton.next_power_of_2(k), FIXED_BUDGET=budget is None,
        num_warps=num_warps,
    )
    return indices, chosen


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

    ``tile_pages`` and ``num_stages`` None: 4-page tiles in a 3-stage software pipeline, except
    where every program has an SM to itself and a split is at most ``ONE_TILE_PAGES``: then a
    split is one tile, loaded without pipelining. Alone on its SM a program's serial latency is the
    stage's time, and a pipeline of one iteration only adds its staging and barriers; with several
    programs an SM, the pipeline keeps more loads in flight. On an H200 (``tune_floors_h200.json``): B=1
    (128 programs of 8 pages) 8.8 us against 9.8; B=4 (512 programs) 17.4 against 15.6.
    """
    if bias is not None:  # never sent here: use_kernels routes float masks to the reference
        raise ValueError("kernels.decode.attend_window: additive mask biases are served by the reference")
    if page_size < 16:
        raise ValueError(f"kernels.decode.attend_window: page_size={page_size} must be >= 16 (tl.dot tiles)")
    if any(t.stride(-1) != 1 for t in (state.last, state.out_cache, state.lse_cache)):
        raise ValueError("kernels.decode.attend_window: last, out_cache and lse_cache are written in place "
                         "and must have unit last stride")
    selection = (indices.contiguous(), chosen.contiguous(), state.last, position.contiguous(),
                 _row_starts(state.start, q.shape[0], q.device))
    num_pages = indices.shape[-1]
    pages_per_split = pages_per_split or _split_pages(num_pages, q.shape[0], k.shape[1])
    programs = q.shape[0] * k.shape[1] * triton.cdiv(num_pages, pages_per_split)
    alone = pages_per_split <= ONE_TILE_PAGES and _one_wave(programs, q.device)
    if tile_pages is None:
        tile_pages = ONE_TILE_PAGES if alone else 4  # _attend caps a tile at its split
    if num_stages is None:
        num_stages = 1 if alone else 3
    return _attend(q, k, v, allowed, selection, state.out_cache, state.lse_cache, scale, page_size, num_pages,
                   pages_per_split, tile_pages, num_warps, num_stages)


ONE_TILE_PAGES = 8  # splits of at most this many pages are one tile where each program has an SM to itself


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter runs no programs side by side)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _one_wave(programs: int, device: torch.device, programs_per_sm: int = 1) -> bool:
    """Whether a grid of ``programs`` runs all at once on ``device``, ``programs_per_sm`` an SM (the
    kernel's occupancy); never without a GPU."""
    return programs <= programs_per_sm * _sm_count(device)


DENSE_PAGE = 16  # keys per page when dense_window walks the whole cache


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
    ``tile_pages`` None: 8 pages a tile for splits of at least 32 pages, else 4. Alone on an H200
    (two window rows, 128K keys), 8-page tiles took 937 us against 1209 with 4 at B=8 and 139
    against 158 at B=1 (64K: 81 against 88); at 8K keys (8-page splits) 23 against 19.
    """
    num_pages = triton.cdiv(k.shape[2], DENSE_PAGE)
    pages_per_split = pages_per_split or _split_pages(num_pages, q.shape[0], k.shape[1])
    if tile_pages is None:
        tile_pages = 8 if pages_per_split >= 32 else 4
    no_cache = torch.empty(q.shape[0], q.shape[1], 0, v.shape[3], dtype=torch.float32, device=q.device)
    return _attend(q, k, v, allowed, None, no_cache, no_cache[..., 0], scale, DENSE_PAGE, num_pages,
                   pages_per_split, tile_pages, num_warps, num_stages)


def _split_pages(num_pages: int, batch: int, kv_heads: int) -> int:
    """Default pages per split: about 512 programs over (batch, KV heads, splits), each at least 8
    pages. At B=1 fewer, longer splits were faster (H200: 8 pages 9.9 us, 2 pages 12.9), and leave
    the merge less to fold."""
    return max(8, triton.cdiv(num_pages * batch * kv_heads, 512))


def _attend(q, k, v, allowed, selection, out_cache, lse_cache, scale, page_size, num_pages, pages_per_split,
            tile_pages, num_warps, num_stages) -> torch.Tensor:
    """The split attention and merge launches of :func:`attend_window` (``selection``: indices,
    chosen, last, position, start) and :func:`dense_window` (``selection`` None: every one of
    ``num_pages`` pages, no output cache), splits and tiles as their callers chose them."""
    q, k, v, allowed = _unit_last_stride(q, k, v, allowed)
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


def kernel_stages() -> reference.Stages:
    """The Triton stages, for ``reference.decode_step`` and ``reference.prefill``."""
    return reference.Stages(summarize_pages, page_scores, top_pages, attend_window)
