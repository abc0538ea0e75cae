"""Independent oracles: deliberately naive loops that share no code with retro_compile."""

from __future__ import annotations

import math

import torch


def naive_dense(q, k, v, visible, scale=None):
    """Attention of one query vector q (D,) over keys k (L, D) where ``visible`` (L,) is True."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    idx = [j for j in range(k.shape[0]) if visible[j]]
    if not idx:
        return torch.zeros(v.shape[-1], dtype=torch.float64)
    logits = torch.stack([(q.double() * k[j].double()).sum() * scale for j in idx])
    w = torch.softmax(logits, dim=0)
    return sum(w[i] * v[j].double() for i, j in enumerate(idx))


def on_steps(values, step, rounding):
    """``values`` (D,) as whole multiples of ``step`` (D,), each rounded by ``rounding`` and kept
    within +-127 steps, in float64."""
    return torch.tensor([max(-127, min(127, rounding(x / s))) * s for x, s in zip(values.tolist(), step.double().tolist())],
                        dtype=torch.float64)


def first_valid(valid) -> int:
    """The row's first valid position: its pages are counted from there (0 for a row with none)."""
    for j in range(valid.shape[0]):
        if valid[j]:
            return j
    return 0


def naive_quest_pages(q_group, k, valid, t, page_size, budget_pages, sink_pages=0, local_pages=1, step=None):
    """Quest's page set for the query at position t of one KV head.

    q_group (G, D): the group's query vectors; k (L, D); valid (L,) bool (written, not padding).
    Page ``i`` holds positions ``start + i * page_size ..`` from the row's first valid position
    ``start``, so left padding never moves a page boundary.
    ``step`` (D,): summaries kept as whole multiples of it (int8 summaries), each max rounded up
    and each min down, within +-127 steps. Returns the sorted list of selected page indices.
    """
    start = first_valid(valid)
    own = (t - start) // page_size
    candidates, scores = [], {}
    for page in range(own + 1):
        first = start + page * page_size
        positions = [j for j in range(first, min(first + page_size, t + 1)) if valid[j]]
        if not positions:
            continue
        keys = torch.stack([k[j].double() for j in positions])
        kmax, kmin = keys.max(0).values, keys.min(0).values
        if step is not None:
            kmax, kmin = on_steps(kmax, step, math.ceil), on_steps(kmin, step, math.floor)
        best = max(float(torch.maximum(qh.double() * kmax, qh.double() * kmin).sum()) for qh in q_group)
        candidates.append(page)
        scores[page] = best
    kept = [p for p in candidates if p < sink_pages or own - local_pages < p <= own]
    rest = sorted((p for p in candidates if p not in kept), key=lambda p: -scores[p])
    return sorted(kept + rest[: max(0, budget_pages - len(kept))])


def page_positions(pages, page_size, t, valid):
    """Visible-position mask (L,) for a page set (pages counted from the row's first valid
    position, as :func:`naive_quest_pages` counts them), positions <= t, valid only."""
    visible = torch.zeros_like(valid)
    start = first_valid(valid)
    for page in pages:
        for j in range(start + page * page_size, min(start + (page + 1) * page_size, t + 1)):
            visible[j] = bool(valid[j])
    return visible
