"""Readable PyTorch implementation of docs/algorithm.md: the CPU path and the test oracle.

Every stage is its own function, in the order a decode step runs them:

1. :func:`~.masks.mask_to_allowed` / :func:`~.masks.query_positions` (in :mod:`.masks`): what each query
   row may see, and where it is.
2. :func:`build_summaries` / :func:`summarize_pages`: per-page key max/min over valid positions,
   stored as they are or as int8 steps of a per-dim scale (:func:`prompt_summary_scale`, :func:`quantize_summary`).
3. :func:`page_scores`: Quest's upper bound ``sum_d max(q_d kmax_d, q_d kmin_d)``, GQA group max
   (``-inf`` for pages the query has no valid position in), after refreshing the summaries of
   the pages a decode step wrote (:class:`PageRefresh`).
4. :func:`top_pages`: always-kept pages plus the top-scoring rest, up to the budget.
5. :func:`attend`: exact attention over a key mask, returning output and log-sum-exp.
6. :func:`merge`: the exact LSE merge of two partial attentions over disjoint keys.
7. :func:`window_attention` / :func:`attend_window` / :func:`merge_window`: the window's rows over
   the selected pages, merged with the output cache, and the state update.
8. :func:`decode_step` / :func:`prefill`: the whole step. :class:`Stages` names the functions a
   step calls that kernels/decode.py replaces on CUDA.

Shapes: ``q`` (B, Hq, n, D); ``k``/``v`` (B, Hkv, L, D) (the whole cache, positions 0..L-1);
``G = Hq // Hkv``. All math is in fp32; the output is cast back to ``q``'s dtype.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..state import LayerState
from .masks import first_slots, mask_to_allowed, page_any, pages_to_tokens, query_positions

NEG_INF = float("-inf")


class SparseParams(NamedTuple):
    """The scalar arguments of one sparse layer (derived from RetroConfig)."""

    page_size: int
    budget_pages: int  # the most pages a query may read
    budget_fraction: float  # 0.0: budget_pages is fixed; else pages = ceil(fraction * context / page_size)
    sink_pages: int
    local_pages: int
    window: int


# --------------------------------------------------------------------------------------------
# 2. Page summaries
# --------------------------------------------------------------------------------------------
def _paged(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, NP, P, D), zero-padding the last page."""
    b, h, length, d = x.shape
    pad = (-length) % page_size
    return F.pad(x, (0, 0, 0, pad)).view(b, h, -1, page_size, d)


def build_summaries(k: torch.Tensor, valid: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise max/min of every page's valid keys; pages with none get zeros.

    ``valid`` (B, L) marks the positions that count (written, not padding).
    """
    paged = _paged(k.float(), page_size)  # (B, H, NP, P, D)
    ok = _paged(valid[:, None, :, None].float(), page_size).bool()  # (B, 1, NP, P, 1)
    kmax = paged.masked_fill(~ok, NEG_INF).amax(dim=3)
    kmin = paged.masked_fill(~ok, float("inf")).amin(dim=3)
    empty = ~ok.any(dim=3)
    return kmax.masked_fill(empty, 0.0).to(k.dtype), kmin.masked_fill(empty, 0.0).to(k.dtype)


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
    """Recompute, in place, the summaries of ``count`` pages from the one holding
    ``first_position[b]`` on (clamped to the last page), from those pages' keys alone, never the
    whole cache. int8 tables store them as :func:`quantize_summary` steps of ``summary_scale``
    (B, Hkv, D), which they need; tables in the key dtype store them as they are. Pages and
    ``first_position`` are counted from each row's first valid slot ``start`` (B,) (None: slot 0).

    A decode step refreshes the pages its rows were written to (from its first row's position);
    a prefill builds every page (from position 0).
    """
    _, heads, length, dim = k.shape
    pages = summarized_pages(first_position, count, page_size, kmax.shape[2])
    positions = (pages[:, :, None] * page_size + torch.arange(page_size, device=k.device)).flatten(1)  # (B, m*P)
    if start is not None:
        positions = positions + start[:, None]
    inside = positions < length
    positions = positions.clamp(max=length - 1)
    keys = k.gather(2, positions[:, None, :, None].expand(-1, heads, -1, dim))
    page_max, page_min = build_summaries(keys, valid.gather(1, positions) & inside, page_size)  # (B, H, m, D)
    step = table_scale(kmax, summary_scale, "summarize_pages")
    if step is not None:
        page_max = quantize_summary(page_max, step, up=True)
        page_min = quantize_summary(page_min, step, up=False)
    put_pages(kmax, pages[:, None, :], page_max)
    put_pages(kmin, pages[:, None, :], page_min)


SUMMARY_HEADROOM = 2.0  # an int8 summary's range is this many times the prompt's largest |key| of its dim


def table_scale(kmax: torch.Tensor, summary_scale: torch.Tensor | None, caller: str) -> torch.Tensor | None:
    """The one rule for which summaries have a scale: int8 tables stand for their steps times
    ``summary_scale``, which they need (an error naming ``caller`` without it); tables in the key
    dtype hold the values themselves and have none (None, whatever was passed)."""
    if kmax.dtype != torch.int8:
        return None
    if summary_scale is None:
        raise ValueError(f"{caller}: int8 summary tables need their summary_scale")
    return summary_scale


def prompt_summary_scale(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, D) fp32: the value of one int8 step of a dim's summaries, set from the prompt's
    keys ``k`` at its ``valid`` (B, L) positions: ``SUMMARY_HEADROOM`` times their largest
    magnitude, over 127, so that keys decoded later may grow that much before they saturate.
    A scale per (batch row, KV head, dim), not per page: a few key dims are far larger than the
    rest, and a page's summary alone could not say how far its later keys range."""
    magnitude = torch.where(valid[:, None, :, None], k, 0).abs().amax(dim=2).float()
    return (magnitude * (SUMMARY_HEADROOM / 127)).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_summary(x: torch.Tensor, summary_scale: torch.Tensor, up: bool) -> torch.Tensor:
    """Summary rows ``x`` (B, Hkv, m, D) as int8 steps of ``summary_scale`` (B, Hkv, D): rounded
    outward (the max rows ``up``, the min rows down), so a page's score stays an upper bound of
    its keys' ``q . k``, and saturated at +-127: the one way a score can fall below it, for keys
    beyond ``SUMMARY_HEADROOM`` times the prompt's largest."""
    steps = x.float() / summary_scale[:, :, None]
    steps = torch.ceil(steps) if up else torch.floor(steps)
    return steps.clamp(-127, 127).to(torch.int8)


def summarized_pages(first_position: torch.Tensor, count: int, page_size: int, num_pages: int) -> torch.Tensor:
    """(B, count): the pages :func:`summarize_pages` rewrites, from the one holding
    ``first_position[b]`` on, clamped to the last page."""
    first_page = first_position // page_size
    return (first_page[:, None] + torch.arange(count, device=first_position.device)).clamp(max=num_pages - 1)


def put_pages(table: torch.Tensor, pages: torch.Tensor, values: torch.Tensor) -> None:
    """``table[b, h, pages[b, h, j]] = values[b, h, j]`` in place; table (B, H, NP, ...), pages (B, 1 or H, m).

    ``index_put_``, not ``scatter_``: compiled, Inductor turns a functional index_put on a state
    buffer back into an in-place store, while ``scatter_`` becomes a copy of the whole table.
    """
    rows = torch.arange(table.shape[0], device=table.device)[:, None, None]
    heads = torch.arange(table.shape[1], device=table.device)[None, :, None]
    table.index_put_((rows, heads, pages), values)


# --------------------------------------------------------------------------------------------
# 3-4. Scoring and selection (Quest)
# --------------------------------------------------------------------------------------------
class PageRefresh(NamedTuple):
    """Pages whose summaries a step refreshes before it scores them (see :func:`summarize_pages`):
    ``count`` pages from the one holding ``first_position[b]`` (counted from the row's first valid
    slot), from the keys ``k``."""

    k: torch.Tensor  # (B, Hkv, L, D)
    first_position: torch.Tensor  # (B,)
    count: int

    @classmethod
    def of_window(cls, k: torch.Tensor, position: torch.Tensor, page_size: int,
                  start: torch.Tensor | None = None) -> "PageRefresh":
        """The pages a decode window's rows, at the consecutive slots ``position`` (B, n), were
        written to: from the first row's page on, as many as a run of n positions can straddle.
        ``start`` (B,): the rows' first valid slots (None: slot 0)."""
        # A window row before its row's first valid slot is padding (a prompt shorter than the
        # window): it writes no page of the row's, so the refresh starts at the row's first page.
        first = position[:, 0] if start is None else (position[:, 0] - start).clamp(min=0)
        return cls(k, first, (position.shape[1] - 1) // page_size + 2)


def page_scores(
    q_row: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor, valid: torch.Tensor, page_size: int,
    refresh: PageRefresh | None = None, summary_scale: torch.Tensor | None = None, start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Upper bound of ``q . k`` over each page, maxed over each KV head's query group; ``-inf`` for
    a page with no position in ``valid`` (B, L) (beyond the query, or all padding).

    q_row (B, Hq, D); kmax/kmin (B, Hkv, NP, D) -> (B, Hkv, NP) fp32. With ``refresh``, the
    summaries of the pages it names are first recomputed in place (a decode step's written pages),
    so that the kernel can do both in one pass. For int8 tables ``summary_scale`` (B, Hkv, D) is
    folded into the query: each head's ``q * scale``, rounded to the query's dtype as the kernels'
    matrix products take it, scores the tables' steps (:func:`table_scale`). Pages are counted
    from each row's first valid slot ``start`` (B,) (None: slot 0).
    """
    if refresh is not None:
        summarize_pages(kmax, kmin, refresh.k, valid, refresh.first_position, refresh.count, page_size, summary_scale,
                        start)
    b, hq, d = q_row.shape
    hkv = kmax.shape[1]
    q = q_row.float().view(b, hkv, hq // hkv, 1, d)
    step = table_scale(kmax, summary_scale, "page_scores")
    if step is not None:
        q = (q * step[:, :, None, None]).to(q_row.dtype).float()
    upper = torch.maximum(q * kmax.float()[:, :, None], q * kmin.float()[:, :, None]).sum(-1)  # (B, Hkv, G, NP)
    return upper.amax(dim=2).masked_fill(~page_any(valid, page_size, start, kmax.shape[2])[:, None, :], NEG_INF)


def budget_pages_for(params: SparseParams, position: torch.Tensor) -> torch.Tensor:
    """Pages the query at ``position`` (B,) may read: fixed, or a fraction of the context."""
    kept = params.sink_pages + params.local_pages
    if params.budget_fraction == 0.0:
        return torch.full_like(position, params.budget_pages)
    pages = torch.ceil(params.budget_fraction * (position + 1).double() / params.page_size).long()
    return pages.clamp(min=kept, max=params.budget_pages)


def top_pages(
    scores: torch.Tensor, position: torch.Tensor, params: SparseParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection as a page list: (indices (B, Hkv, K), chosen (B, Hkv, K) bool), K = the page cap.
    ``position`` (B,) is the query's, counted from its row's first valid slot, as the pages are.

    Always kept: the sink pages and the ``local_pages`` pages ending with the query's own page.
    Then the top-scoring pages until the budget is met. A page scored ``-inf`` (no valid position
    for this query: see :func:`page_scores`) is never chosen.
    """
    num_pages = scores.shape[-1]
    page = torch.arange(num_pages, device=scores.device)
    own = (position // params.page_size)[:, None, None]
    keep = (page < params.sink_pages) | ((page <= own) & (page > own - params.local_pages))
    ranked = torch.where(keep & (scores > NEG_INF), float("inf"), scores)
    k = min(params.budget_pages, num_pages)
    top = ranked.topk(k, dim=-1)
    within_budget = torch.arange(k, device=scores.device) < budget_pages_for(params, position)[:, None, None]
    return top.indices, (top.values > NEG_INF) & within_budget


# --------------------------------------------------------------------------------------------
# 5-6. Attention over a key mask, and the LSE merge
# --------------------------------------------------------------------------------------------
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q (B, Hq, r, D) over the keys ``key_mask`` allows.

    ``key_mask`` is (B, 1 or Hkv, r, L); ``bias`` (B, r, L) is added to the logits. Returns
    (output (B, Hq, r, Dv) fp32, lse (B, Hq, r) fp32); a row with no key gets zeros and -inf.
    Each KV head serves its group's query heads in one product; the keys are never repeated.
    """
    b, hq, r, _ = q.shape
    hkv, group = k.shape[1], q.shape[1] // k.shape[1]
    logits = torch.matmul(q.float().reshape(b, hkv, group * r, -1), k.float().transpose(-1, -2)) * scale
    logits = logits.view(b, hkv, group, r, -1)
    if bias is not None:
        logits = logits + bias[:, None, None]
    logits = logits.masked_fill(~key_mask[:, :, None], NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    out = torch.matmul(probs.view(b, hkv, group * r, -1), v.float())
    return out.view(b, hq, r, -1), lse.view(b, hq, r)


def merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of attention over disjoint key sets A and B into attention over A and B."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    return w1 * o1 + w2 * o2, lse


# --------------------------------------------------------------------------------------------
# 7. The step
# --------------------------------------------------------------------------------------------
class Stages(NamedTuple):
    """The heavy stages of a step. kernels/decode.py has Triton versions with the same contracts."""

    summarize_pages: Callable[..., None]
    page_scores: Callable[..., torch.Tensor]
    top_pages: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    attend_window: Callable[..., torch.Tensor]


def reference_stages() -> Stages:
    """This module's stage functions, looked up at call time (so tests can patch one)."""
    return Stages(summarize_pages, page_scores, top_pages, attend_window)


def sdpa_row_by_row(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                    enable_gqa: bool = False) -> torch.Tensor:
    """SDPA for a decode window's few rows, one row at a time; the same result (not for
    ``is_causal``, whose mask depends on the number of rows). The reference of ``retro::dense_window``,
    and what it runs where its kernel does not apply.

    A dense layer's decode step with ``w > 1`` rows and a mask over a long cache is otherwise sent
    to a prefill kernel with little parallelism, an order of magnitude slower than one row's decode
    kernel over a long cache. Each row reads the cache once more.
    """
    per_row_mask = attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] > 1
    outs = []
    for row in range(query.shape[-2]):
        mask = attn_mask[..., row:row + 1, :] if per_row_mask else attn_mask
        outs.append(F.scaled_dot_product_attention(
            query[..., row:row + 1, :], key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale,
            enable_gqa=enable_gqa))
    return torch.cat(outs, dim=-2)


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    state: LayerState,
    params: SparseParams,
    stages: Stages | None = None,
) -> torch.Tensor:
    """Dense causal attention (SDPA itself) and the state the first decode step needs.

    A prompt may come in chunks, each a call over the keys written so far: every call rebuilds the
    summaries and ``last`` from the whole cache, and moves the output cache on by its rows, so a
    chunk of fewer than ``w - 1`` rows keeps the rows of the chunks before it."""
    batch, _, n, _ = q.shape
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=True
    )
    rows = min(state.out_cache.shape[2], n)  # the last w-1 prompt rows, seen densely, go to the output cache
    allowed, bias = mask_to_allowed(attn_mask, is_causal, batch, n, k.shape[2], q.device, last=max(rows, 1))
    position = query_positions(allowed)[:, -1]
    stages = stages or reference_stages()
    first = torch.zeros_like(position)
    state.start.copy_(first_slots(allowed[:, -1]))
    if table_scale(state.kmax, state.summary_scale, "prefill") is not None:  # int8 tables: the prompt sets it
        state.summary_scale.copy_(prompt_summary_scale(k, allowed[:, -1]))
    stages.summarize_pages(state.kmax, state.kmin, k, allowed[:, -1], first, state.kmax.shape[2], params.page_size,
                           state.summary_scale, state.start)
    state.last.copy_(position[:, None, None].to(state.last.dtype).expand_as(state.last))
    if rows:
        o, lse = attend(q[:, :, -rows:], k, v, allowed[:, None, -rows:], default_scale(q, scale),
                        None if bias is None else bias[:, -rows:])
        push_rows(state.out_cache, o)
        push_rows(state.lse_cache, lse)
    return out.contiguous()


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    bias: torch.Tensor | None,
    pages: torch.Tensor,
    last: torch.Tensor,
    position: torch.Tensor,
    scale: float,
    page_size: int,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's attention, before any merge: (out (B, Hq, n, Dv) fp32, lse (B, Hq, n) fp32).

    ``pages`` (B, Hkv, K) int lists the newest row's selected pages (-1: none), counted from each
    row's first valid slot ``start`` (B,) (None: slot 0). The newest row attends over all of them;
    past row ``p`` only over those whose ``last`` (as it was before this step) is below ``p``: the
    pages it has not seen. Every row keeps to the keys ``allowed`` (B, n, L).
    """
    length = k.shape[2]
    num_pages = last.shape[-1]
    slot = torch.where(pages >= 0, pages, num_pages).long()  # unused entries go to a spare slot
    selected = torch.zeros(*last.shape[:-1], num_pages + 1, dtype=torch.bool, device=last.device)
    selected = selected.scatter(-1, slot, True)[..., :num_pages]  # (B, Hkv, NP)
    selected_keys = pages_to_tokens(selected, page_size, length, start)[:, :, None]  # (B, Hkv, 1, L)
    last_keys = pages_to_tokens(last, page_size, length, start)[:, :, None]
    newest = torch.arange(q.shape[2], device=q.device) == q.shape[2] - 1  # (n,)
    unseen = newest[:, None] | (last_keys < position[:, None, :, None])  # (B, Hkv, n, L)
    return attend(q, k, v, selected_keys & unseen & allowed[:, None], scale, bias)


def attend_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    chosen: torch.Tensor,
    state: LayerState,
    position: torch.Tensor,
    scale: float,
    page_size: int,
) -> torch.Tensor:
    """The step's attention and its state update; returns the window's output in ``q``'s dtype.

    :func:`window_attention` over the chosen pages; each past row merged with its cached output;
    the chosen pages stamped with the newest row's position in ``last``; the output cache moved
    one step on (:func:`merge_window`). ``indices`` (B, Hkv, K) are distinct pages, ``chosen`` marks
    the selected ones.
    """
    out, lse = window_attention(q, k, v, allowed, bias, torch.where(chosen, indices, -1), state.last, position,
                                scale, page_size, state.start)
    newest = position[:, -1, None, None].to(state.last.dtype)
    put_pages(state.last, indices, torch.where(chosen, newest, state.last.gather(-1, indices)))
    return merge_window(out, lse, state.out_cache, state.lse_cache).to(q.dtype)


def merge_window(
    out: torch.Tensor, lse: torch.Tensor, out_cache: torch.Tensor, lse_cache: torch.Tensor
) -> torch.Tensor:
    """Merge the past rows of a step's (out, lse) with their cached outputs, and move the cache on.

    The cache holds the last ``w - 1`` rows' outputs, oldest first, aligned to the newest row:
    past row ``i`` of ``n`` is cache row ``w - 1 - (n - 1) + i``. Afterwards the cache holds the
    newest ``w - 1`` rows, this step's included. Returns ``out`` (fp32), past rows merged.
    """
    n, cache_rows = out.shape[2], out_cache.shape[2]
    past = n - 1
    cached = slice(cache_rows - past, None)
    out[:, :, :past], lse[:, :, :past] = merge(out_cache[:, :, cached], lse_cache[:, :, cached],
                                               out[:, :, :past], lse[:, :, :past])
    push_rows(out_cache, out)
    push_rows(lse_cache, lse)
    return out


def push_rows(cache: torch.Tensor, rows: torch.Tensor) -> None:
    """Move ``cache`` on along dim 2, in place: ``rows`` join at the end and as many of its oldest
    rows drop (all of them, if ``rows`` has more than it holds)."""
    joined = torch.cat([cache, rows], dim=2)
    cache.copy_(joined[:, :, joined.shape[2] - cache.shape[2]:])


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    state: LayerState,
    params: SparseParams,
    stages: Stages | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step over the window of ``n <= w`` consecutive rows (docs/algorithm.md, section 4).

    The newest row attends to its selected pages; each past row attends to the selected pages it
    has not seen yet and merges that into its cached output. Then the state moves one step on.
    Pages are counted from each row's first valid slot (``state.start``, set by the prefill).
    ``stages`` defaults to this module's (:func:`reference_stages`). ``positions`` (B, n) are the
    rows' :func:`~.masks.query_positions` if the caller has them already (:func:`~.masks.mask_positions`).
    """
    stages = stages or reference_stages()
    batch, _, n, _ = q.shape
    length, page_size = k.shape[2], params.page_size
    allowed, bias = mask_to_allowed(attn_mask, is_causal, batch, n, length, q.device)
    position = query_positions(allowed) if positions is None else positions  # (B, n)
    newest = position[:, -1]
    valid = allowed[:, -1]  # every key the newest row may see: written, not padding, <= newest

    written = PageRefresh.of_window(k, position, page_size, state.start)
    scores = stages.page_scores(q[:, :, -1], state.kmax, state.kmin, valid, page_size, refresh=written,
                                summary_scale=state.summary_scale, start=state.start)
    indices, chosen = stages.top_pages(scores, newest - state.start, params)
    return stages.attend_window(q, k, v, allowed, bias, indices, chosen, state, position,
                                default_scale(q, scale), page_size)
