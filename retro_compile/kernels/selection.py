"""Page selection (docs/algorithm.md, section 3) on the GPU: ``top_pages``, the Triton stage that
replaces ``reference.top_pages``, without a sort: a search for the budget-th largest score, then
the chosen pages; at small batch split over chunks of pages, then one pass per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import reference
from .launch import MAX_KERNEL_PAGES, selection_chunk_pages, selection_warps
from .reference import SparseParams


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
    and 0.7 after two levels of 32 bins.
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
    COUNTS (zero at launch) counts each row's finished chunks."""
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


def top_pages(
    scores: torch.Tensor, position: torch.Tensor, params: SparseParams,
    chunk_pages: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same selection as ``reference.top_pages`` without a sort: per (batch row, KV head), a
    search (see :func:`_top_mask`) finds the budget-th largest score, then the chosen pages are
    written in page order.

    At small batch the selection is split: programs over chunks of ``chunk_pages`` pages keep each
    chunk's best ``K`` (the page cap), and the last of a row's programs picks from those
    candidates, in the same launch. ``chunk_pages`` None picks it
    (:func:`~.launch.selection_chunk_pages`); 0 forces one program a row. ``num_warps`` None picks
    them from the values each program ranks (:func:`~.launch.selection_warps`).

    The page set equals the reference's (ties at the threshold aside, where either choice is a
    valid top-k); the slot order differs, which nothing downstream depends on.
    """
    b, hkv, num_pages = scores.shape
    if num_pages > MAX_KERNEL_PAGES:
        return reference.top_pages(scores, position, params)
    k = min(params.budget_pages, num_pages)
    if chunk_pages is None:
        chunk_pages = selection_chunk_pages(b * hkv, num_pages, k)
    if chunk_pages and (chunk_pages & (chunk_pages - 1) or chunk_pages < k):
        raise ValueError(f"top_pages: chunk_pages={chunk_pages} must be 0 or a power of two >= {k}")
    chunks = triton.cdiv(num_pages, chunk_pages) if chunk_pages else 1
    # A fixed budget (no budget_fraction) is the kernel's argument; only a fraction of the context needs a tensor.
    budget = None if params.budget_fraction == 0.0 else \
        reference.budget_pages_for(params, position).clamp(max=k).to(torch.int32)
    scores = scores.contiguous()  # position, the newest row's column of (B, n), is read through its stride
    indices = torch.empty(b, hkv, k, dtype=torch.int64, device=scores.device)
    chosen = torch.empty(b, hkv, k, dtype=torch.bool, device=scores.device)
    entries = chunks * k if chunk_pages else num_pages  # the final pick's values: candidates, or the scores
    block = max(16, triton.next_power_of_2(entries))
    num_warps = num_warps or selection_warps(max(block, chunk_pages), b * hkv * chunks, scores.device)
    if chunk_pages:
        cand_score = torch.empty(b * hkv, chunks * k, dtype=torch.float32, device=scores.device)
        cand_page = torch.empty(b * hkv, chunks * k, dtype=torch.int32, device=scores.device)
        counts = torch.zeros(b, hkv, dtype=torch.int32, device=scores.device)  # each row's finished chunks
    else:
        cand_score, cand_page, counts = scores, scores, scores  # unused by one program a row (read-only here)
    wrap_triton(_top_pages_kernel)[(b * hkv, chunks)](
        scores, position, indices if budget is None else budget,  # FIXED_BUDGET never reads it
        cand_score, cand_page, counts, indices, chosen,
        scores.stride(0), scores.stride(1), position.stride(0), counts.stride(0), counts.stride(1),
        hkv, num_pages, k, params.page_size, params.sink_pages, params.local_pages,
        BLOCK=block, CHUNK=chunk_pages, KEEP_BLOCK=triton.next_power_of_2(k), FIXED_BUDGET=budget is None,
        num_warps=num_warps,
    )
    return indices, chosen

