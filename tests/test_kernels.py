"""Triton kernels against the reference stages (on CPU under TRITON_INTERPRET=1, set in conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retro_compile.kernels import decode, launch  # needs triton (the test extra)
from retro_compile.kernels import reference as ref
from retro_compile.state import LayerState

from .sequences import dense_rows, make_problem, mask_for, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def int8_tables(g: torch.Generator, b: int, kv_heads: int, num_pages: int, d: int):
    """Random int8 summary tables (max >= min) and their scale (B, Hkv, D), on DEVICE."""
    kmax = torch.randint(-100, 128, (b, kv_heads, num_pages, d), generator=g)
    kmin = (kmax - torch.randint(0, 28, kmax.shape, generator=g)).clamp(min=-127)
    scale = torch.rand(b, kv_heads, d, generator=g) * 0.05 + 0.001
    return kmax.to(torch.int8).to(DEVICE), kmin.to(torch.int8).to(DEVICE), scale.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 2), (3, 1)])
@pytest.mark.parametrize("num_pages,block_pages,as_products,blocks_per_program", [
    (11, 32, False, 1), (11, 4, False, 1), (11, 32, True, 1), (37, 32, True, 1), (11, 4, False, 2), (37, 16, True, 2)])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("tables_as_b", [False, True])
def test_page_scores_kernel(dtype, q_heads, kv_heads, num_pages, block_pages, as_products, blocks_per_program, int8,
                            tables_as_b):
    """Scores, and -inf for pages with no valid position (a padded page, pages past the query);
    with small blocks, a ragged last block; as matrix products, over a padded group of heads, in
    one block or two (the second ragged), the tables as either operand; several blocks a program,
    the last program's ragged; tables in the key dtype or int8 with a scale per dim."""
    g = torch.Generator().manual_seed(0)
    page = 16
    q = torch.randn(2, q_heads, 16, generator=g).to(dtype).to(DEVICE)
    kmax = torch.randn(2, kv_heads, num_pages, 16, generator=g).to(dtype).to(DEVICE)
    kmin = kmax - torch.rand(2, kv_heads, num_pages, 16, generator=g).to(dtype).to(DEVICE)
    scale = None
    if int8:
        kmax, kmin, scale = int8_tables(g, 2, kv_heads, num_pages, 16)
    valid = torch.arange(num_pages * page - 5) <= torch.tensor([[170], [100]])
    valid[1, 16:32] = False
    valid = valid.to(DEVICE)
    got = decode.page_scores(q, kmax, kmin, valid, page, block_pages, as_products=as_products, summary_scale=scale,
                             blocks_per_program=blocks_per_program, tables_as_b=tables_as_b)
    want = ref.page_scores(q, kmax, kmin, valid, page, summary_scale=scale)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    assert (got[1, :, 1] == float("-inf")).all() and (got[1, :, 7:] == float("-inf")).all()
    assert (got[0, :, :11] > float("-inf")).all() and (got[0, :, 11:] == float("-inf")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("as_products", [False, True])
@pytest.mark.parametrize("first,count", [([3, 1], 2), ([4, 4], 2), ([0, 2], 3)])
@pytest.mark.parametrize("int8,blocks_per_program", [(False, 1), (True, 1), (True, 2)])
def test_page_scores_kernel_refreshes_the_written_pages(dtype, as_products, first, count, int8, blocks_per_program):
    """Scoring with a refresh: the named pages' summaries are rebuilt in place from the keys (a
    pair that straddles two blocks of 4 pages, one clamped at the last page, a range holding an
    all-padding page) and scored from the new rows; every other page is left as it was. Against
    the reference's refresh then score, on the same stale tables (int8 ones: quantized with the
    scale, which is not changed)."""
    g = torch.Generator().manual_seed(sum(first) + count)
    b, hq, hkv, length, d, page = 2, 4, 2, 75, 16, 16
    num_pages = -(-length // page)  # 5, the last one ragged
    k = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    valid = torch.rand(b, length, generator=g) > 0.2
    valid[1, 16:32] = False  # page 1 of row 1: all padding
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    stale = [(torch.randn(b, hkv, num_pages, d, generator=g) + shift).to(dtype) for shift in (1, -1)]
    scale = None
    if int8:  # about a quarter of the keys' range: the largest keys saturate
        *stale, scale = (t.cpu() for t in int8_tables(g, b, hkv, num_pages, d))
        scale = scale + 0.01
    position = torch.tensor(first) * page + 2
    want_tables = [t.clone() for t in stale]
    want = ref.page_scores(q, *want_tables, valid, page, refresh=ref.PageRefresh(k, position, count),
                           summary_scale=scale)
    got_tables = [t.clone().to(DEVICE) for t in stale]
    refresh = ref.PageRefresh(k.to(DEVICE), position.to(DEVICE), count)
    got = decode.page_scores(q.to(DEVICE), *got_tables, valid.to(DEVICE), page, block_pages=4, as_products=as_products,
                             refresh=refresh, summary_scale=None if scale is None else scale.to(DEVICE),
                             blocks_per_program=blocks_per_program)
    for table, expected in zip(got_tables, want_tables):
        torch.testing.assert_close(table.cpu(), expected, atol=0, rtol=0)  # max, min and their steps are exact
    torch.testing.assert_close(got.cpu(), want, atol=TOL[dtype], rtol=TOL[dtype])
    touched = [{min(first[row] + t, num_pages - 1) for t in range(count)} for row in range(b)]
    for row in range(b):
        for p in range(num_pages):
            if p not in touched[row]:
                assert torch.equal(got_tables[0][row, :, p].cpu(), stale[0][row, :, p]), (row, p)
    if int8:
        assert (want_tables[0] == 127).any() and (want_tables[1] == -127).any(), "no refreshed key saturated"


def test_scoring_blocks_per_program_fills_one_wave(monkeypatch):
    """With a refresh and stored tables, scoring walks more blocks a program where that brings
    its grid, refresh programs included, into one wave of 2 programs an SM; int8 tables, no
    refresh, a grid no count up to 8 brings in, or no GPU keep as many as leave 256 programs."""
    def pick(rows, blocks_per_row, refreshers, quantized=False):
        return launch.scoring_blocks_per_program(rows, blocks_per_row, refreshers, quantized, torch.device("cpu"))

    monkeypatch.setattr(launch, "sm_count", lambda device: 132)  # an H200: 264 programs a wave
    assert pick(8, 128, 2) == 5  # B=1/128K: 8 x (2 + 128/4) = 272 programs; 8 x (2 + 26) = 224
    assert pick(8, 32, 2) == 2  # B=1/32K: 8 x (2 + 32) = 272; 8 x (2 + 16) = 144
    assert pick(64, 8, 2) == 4  # B=8/8K: 64 x (2 + 4) = 384; 3 blocks: 64 x (2 + 3) = 320; 4: 256
    assert pick(8, 128, 2, quantized=True) == 4
    assert pick(8, 128, 0) == 4
    assert pick(16, 128, 2) == 8  # 16 x (2 + 128/8) = 288 at the most blocks a program
    assert pick(2, 8, 2) == 1  # 2 x (2 + 8) = 20: fits as it is
    monkeypatch.setattr(launch, "sm_count", lambda device: 0)
    assert pick(8, 128, 2) == 4


def test_page_scores_kernel_with_blocks_raised_to_fit_a_wave_matches_reference(monkeypatch):
    """The refresh and scores stay exact where the grid is fitted to a wave: on a pretend GPU of
    2 SMs (4 programs a wave), 4 blocks of 2 pages beside 2 refresh programs become 2 programs of
    2 blocks."""
    monkeypatch.setattr(launch, "sm_count", lambda device: 2)
    g = torch.Generator().manual_seed(5)
    b, hq, hkv, length, d, page = 1, 4, 1, 120, 16, 16
    num_pages = -(-length // page)  # 8, the last one ragged
    assert launch.scoring_blocks_per_program(b * hkv, num_pages // 2, 2, False, torch.device(DEVICE)) == 2
    k = torch.randn(b, hkv, length, d, generator=g)
    valid = torch.rand(b, length, generator=g) > 0.2
    q = torch.randn(b, hq, d, generator=g)
    stale = [torch.randn(b, hkv, num_pages, d, generator=g) + shift for shift in (1, -1)]
    position = torch.tensor([3 * page + 9])
    want_tables = [t.clone() for t in stale]
    want = ref.page_scores(q, *want_tables, valid, page, refresh=ref.PageRefresh(k, position, 2))
    got_tables = [t.clone().to(DEVICE) for t in stale]
    got = decode.page_scores(q.to(DEVICE), *got_tables, valid.to(DEVICE), page, block_pages=2, as_products=False,
                             refresh=ref.PageRefresh(k.to(DEVICE), position.to(DEVICE), 2))
    for table, expected in zip(got_tables, want_tables):
        torch.testing.assert_close(table.cpu(), expected, atol=0, rtol=0)
    torch.testing.assert_close(got.cpu(), want, atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("first,count", [([0, 0], 5), ([2, 3], 2), ([4, 1], 3)])
@pytest.mark.parametrize("int8", [False, True])
def test_summarize_pages_kernel(dtype, first, count, int8):
    """In-place page summaries: a ragged last page, padding, an all-padding page, ranges that run
    past the last page (clamped), and pages outside the range left alone; int8 tables hold the
    reference's outward steps of the scale, bit for bit."""
    g = torch.Generator().manual_seed(2)
    b, kv_heads, length, d, page = 2, 3, 70, 16, 16
    num_pages = -(-length // page)
    k = torch.randn(b, kv_heads, length, d, generator=g).to(dtype)
    valid = torch.rand(b, length, generator=g) > 0.3
    valid[1, 16:32] = False
    scale = torch.rand(b, kv_heads, d, generator=g) * 0.03 + 0.04 if int8 else None  # no key saturates
    sentinel = torch.full((b, kv_heads, num_pages, d), 7, dtype=torch.int8 if int8 else dtype)
    want = [sentinel.clone(), sentinel.clone()]
    position = torch.tensor(first) * page + torch.tensor([3, page - 1])  # somewhere in each first page
    ref.summarize_pages(*want, k, valid, position, count, page, scale)
    got = [sentinel.clone().to(DEVICE), sentinel.clone().to(DEVICE)]
    position = torch.stack([position, position + 1], dim=1).to(DEVICE)[:, 0]  # a strided column, as the op passes
    decode.summarize_pages(*got, k.to(DEVICE), valid.to(DEVICE), position, count, page,
                           None if scale is None else scale.to(DEVICE))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.cpu(), e, atol=0, rtol=0)  # max, min and their steps are exact
    full = ref.build_summaries(k, valid, page)
    for row in range(b):
        written = sorted({min(first[row] + t, num_pages - 1) for t in range(count)})
        for table, summary in zip(got, full):
            table = table[row, :, written].cpu().float()
            if int8:  # one step of the scale at most outside the true bound, on its outer side
                step = scale[row, :, None]
                lo, hi = (summary[row, :, written], summary[row, :, written] + step) if summary is full[0] else \
                    (summary[row, :, written] - step, summary[row, :, written])
                assert ((table * step >= lo - 1e-6) & (table * step <= hi + 1e-6)).all()
            else:
                torch.testing.assert_close(table, summary[row, :, written].float())
        for table in got:
            untouched = [p for p in range(num_pages) if p not in written]
            assert (table[row, :, untouched].cpu() == 7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads,n,window", [(4, 2, 2, 2), (3, 1, 1, 1), (2, 2, 4, 4), (4, 2, 2, 4)])
@pytest.mark.parametrize("pages_per_split,tile_pages", [(2, 4), (3, 2), (6, 4), (None, None), (3, None)])
def test_attend_window_kernel(dtype, q_heads, kv_heads, n, window, pages_per_split, tile_pages):
    """Attention, output-cache merge and state update against the reference stage: random page
    lists (some not chosen), last-loaded table, cached outputs, positions and masks; splits of
    several tiles, splits that end inside a tile, and the default tiles (on a GPU, one unpipelined
    tile a split here: every program has an SM to itself)."""
    g = torch.Generator().manual_seed(1)
    b, length, d, page = 2, 120, 16, 16
    num_pages = -(-length // page)
    q = torch.randn(b, q_heads, n, d, generator=g).to(dtype)
    k = torch.randn(b, kv_heads, length, d, generator=g).to(dtype)
    v = torch.randn(b, kv_heads, length, d, generator=g).to(dtype)
    newest = torch.tensor([100, 117])
    position = newest[:, None] - torch.arange(n - 1, -1, -1)
    allowed = (torch.arange(length) <= position[:, :, None]) & (torch.rand(b, 1, length, generator=g) > 0.2)
    allowed[torch.arange(b)[:, None], torch.arange(n), position] = True
    indices = torch.stack([torch.randperm(num_pages, generator=g)[:6] for _ in range(b * kv_heads)]).view(b, kv_heads, 6)
    chosen = torch.rand(b, kv_heads, 6, generator=g) > 0.25
    state = LayerState(
        kmax=torch.zeros(0), kmin=torch.zeros(0),  # not read by this stage
        last=torch.randint(95, 118, (b, kv_heads, num_pages), generator=g, dtype=torch.int32),
        out_cache=torch.randn(b, q_heads, window - 1, d, generator=g),
        lse_cache=torch.randn(b, q_heads, window - 1, generator=g),
        summary_scale=torch.zeros(0),  # not read by this stage
        start=torch.zeros(b, dtype=torch.int32),
    )
    want_state = LayerState(*(t.clone() for t in state))
    want = ref.attend_window(q, k, v, allowed, None, indices, chosen, want_state, position, 0.25, page)
    got_state = LayerState(*(t.to(DEVICE) for t in state))
    got = decode.attend_window(*(t.to(DEVICE) for t in (q, k, v, allowed)), None, indices.to(DEVICE),
                               chosen.to(DEVICE), got_state, position.to(DEVICE), 0.25, page,
                               pages_per_split, tile_pages)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(got_state.last.cpu(), want_state.last)
    for name in ("out_cache", "lse_cache"):
        torch.testing.assert_close(getattr(got_state, name).cpu(), getattr(want_state, name),
                                   atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("summaries", ["exact", "int8"])
@pytest.mark.parametrize("prompt,pad", [(50, 7), (6, 4)], ids=["padded", "two-token-row"])
@pytest.mark.slow
def test_decode_step_with_kernels_matches_reference(window, summaries, prompt, pad, monkeypatch):
    """The whole op with the kernel stages, against the reference op, over a decode sequence. Row
    1's padding puts its page boundaries off the cache's; with a prompt of two tokens after 4 of
    padding, its first windows reach back into the padding, before its first page."""
    from retro_compile.kernels import op

    problem = make_problem(batch=2, q_heads=4, kv_heads=2, length=80, prompt=prompt, pad=(0, pad))
    problem = type(problem)(*(t.to(DEVICE) for t in (problem.q, problem.k, problem.v, problem.valid)), problem.prompt)
    p = ref.SparseParams(16, 2, 0.0, 0, 1, window)
    expected = [out for _, out in run(problem, p, steps=4, summaries=summaries)]
    monkeypatch.setattr(op, "use_kernels", lambda *a: True)
    got = [out for _, out in run(problem, p, steps=4, summaries=summaries)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    full = ref.SparseParams(16, 8, 0.0, 0, 1, window)
    for positions, out in run(problem, full, steps=3, summaries=summaries):
        torch.testing.assert_close(out, dense_rows(problem, positions).to(out.device), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_a_state_with_pages_past_the_keys_decodes_as_one_sized_to_them(kernels, monkeypatch):
    """A continuous-batching request's call holds its own keys only, fewer than its state has pages
    for: pages past the keys hold no valid position and change nothing. The op (reference stages
    and kernel stages) with 12 pages over 80 keys against the reference with the 5 they span."""
    from retro_compile.kernels import op

    problem = make_problem(batch=2, q_heads=4, kv_heads=2, length=80, prompt=50, pad=(0, 7))
    problem = type(problem)(*(t.to(DEVICE) for t in (problem.q, problem.k, problem.v, problem.valid)), problem.prompt)
    p = ref.SparseParams(16, 2, 0.0, 0, 1, 2)
    expected = [out for _, out in run(problem, p, steps=4)]
    monkeypatch.setattr(op, "use_kernels", lambda *a: kernels)
    got = [out for _, out in run(problem, p, steps=4, num_pages=12)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,local", [(2, 1), (4, 1), (2, 0), (4, 2)])
@pytest.mark.parametrize("summaries", ["exact", "int8"])
@pytest.mark.slow
def test_decode_steps_over_rewritten_keys_match_reference(window, local, summaries, monkeypatch):
    """As a model runs the window: every step writes new keys and values at all its rows'
    positions (the past rows' corrected ones), so the written pages' summaries change at each
    step, also where the window straddles two pages and the older one is ranked (local 1), or
    the query's own page is (local 0). The op with the kernel stages against the reference op,
    step by step: outputs, and the summary tables at the end."""
    from retro_compile.kernels import op
    from retro_compile.state import StateShape, allocate

    problem = make_problem(batch=2, q_heads=4, kv_heads=2, length=80, prompt=42, pad=(0, 7))
    params = ref.SparseParams(16, 3, 0.0, 0, local, window)

    def decode_steps(kernels: bool):
        monkeypatch.setattr(op, "use_kernels", lambda *a: kernels)
        g = torch.Generator().manual_seed(7)
        q, k, v = (t.clone().to(DEVICE) for t in (problem.q, problem.k, problem.v))
        state = allocate(StateShape.of_call(q, k, v, 5, window, summaries))
        positions = list(range(problem.prompt))
        outs = [op.retro_attention(q[:, :, positions], k, v, mask_for(problem, positions).to(DEVICE), state, params)]
        for t in range(problem.prompt, problem.prompt + 12):  # across the page boundary at 48
            positions = list(range(t - min(window, t + 1) + 1, t + 1))
            for cache in (k, v):
                cache[:, :, positions] = torch.randn(cache[:, :, positions].shape, generator=g).to(DEVICE)
            outs.append(op.retro_attention(q[:, :, positions], k, v, mask_for(problem, positions).to(DEVICE), state,
                                           params))
        return outs, state

    expected, want_state = decode_steps(False)
    got, got_state = decode_steps(True)
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    assert torch.equal(got_state.kmax, want_state.kmax) and torch.equal(got_state.kmin, want_state.kmin)


def test_decode_sequence_with_the_selection_split_matches_reference(monkeypatch):
    """The op with the kernel stages and the selection forced into chunks (the layer state's
    counter decides which program picks, and must be back at zero for the next step), against
    the reference op, over a decode sequence of one state."""
    from retro_compile.kernels import op

    problem = make_problem(batch=2, q_heads=4, kv_heads=2, length=160, prompt=100, pad=(0, 7))
    problem = type(problem)(*(t.to(DEVICE) for t in (problem.q, problem.k, problem.v, problem.valid)), problem.prompt)
    p = ref.SparseParams(16, 3, 0.0, 0, 1, 2)
    expected = [out for _, out in run(problem, p, steps=5)]
    stages = decode.kernel_stages()
    split = stages._replace(top_pages=lambda *args: decode.top_pages(*args, chunk_pages=4))  # 10 pages in 3 chunks
    monkeypatch.setattr(op, "use_kernels", lambda *a: True)
    monkeypatch.setattr(decode, "kernel_stages", lambda: split)
    got = [out for _, out in run(problem, p, steps=5)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def chosen_sets(indices, chosen):
    return [[sorted(indices[b, h][chosen[b, h]].tolist()) for h in range(indices.shape[1])]
            for b in range(indices.shape[0])]


def scores_for(scores, page_valid):
    """Scores as page_scores returns them: -inf where a page has no valid position."""
    return scores.masked_fill(~page_valid[:, None, :], float("-inf"))


@pytest.mark.parametrize("num_pages,budget_pages,fraction,sink,local,chunk_pages", [
    (11, 4, 0.0, 0, 1, 0), (11, 4, 0.0, 1, 2, 0), (37, 8, 0.0, 0, 1, 0), (37, 30, 0.5, 1, 1, 0), (9, 9, 0.0, 0, 1, 0),
    (300, 16, 0.0, 2, 1, 0),
    # split over chunks: sinks and the query's page in several chunks, a ragged last chunk, a row
    # with fewer valid pages than one chunk's share, a budget below the cap
    (11, 4, 0.0, 1, 2, 4), (37, 8, 0.0, 0, 1, 8), (37, 8, 0.5, 2, 2, 16), (300, 16, 0.0, 2, 1, 64), (300, 16, 0.0, 0, 3, 16),
])
def test_top_pages_kernel_selects_the_reference_page_set(num_pages, budget_pages, fraction, sink, local, chunk_pages):
    g = torch.Generator().manual_seed(num_pages)
    b, hkv, page = 3, 2, 16
    position = torch.tensor([num_pages * page - 1, num_pages * page // 2, 5 * page + 3]).to(DEVICE)
    position = torch.stack([position - 1, position], dim=1)[:, -1]  # a strided column of (B, n), as the op passes
    page_valid = (torch.arange(num_pages, device=DEVICE) <= (position // page)[:, None])
    page_valid[1, 1] = False  # an all-padding page
    page_valid[1, 0] = False  # ... which is also a sink
    scores = scores_for(torch.randn(b, hkv, num_pages, generator=g).to(DEVICE), page_valid)
    params = ref.SparseParams(page, budget_pages, fraction, sink, local, 2)
    got = decode.top_pages(scores, position, params, chunk_pages=chunk_pages)
    want = ref.top_pages(scores, position, params)
    assert chosen_sets(*got) == chosen_sets(*want)
    k = got[0].shape[-1]
    assert all(len(set(row.tolist())) == k for row in got[0].reshape(-1, k))  # every slot a distinct page...
    assert ((got[0] >= 0) & (got[0] < num_pages)).all()  # ...written, not left as allocated


def test_top_pages_kernel_hand_case():
    """Page 4 holds the query (local), page 0 is a sink; of the rest, the two best scores are pages 2 and 5...
    but page 5 lies beyond the query and page 3 is padding (both -inf), so pages 2 and 1 fill the budget of 4."""
    inf = float("inf")
    scores = torch.tensor([[[0.0, 1.0, 9.0, -inf, -5.0, -inf]]], device=DEVICE)
    params = ref.SparseParams(16, 4, 0.0, 1, 1, 1)
    indices, chosen = decode.top_pages(scores, torch.tensor([4 * 16 + 2], device=DEVICE), params)
    assert chosen_sets(indices, chosen) == [[[0, 1, 2, 4]]]


@pytest.mark.parametrize("chunk_pages", [0, 32])
def test_top_pages_kernel_with_ties_takes_a_top_k(chunk_pages):
    """Scores with many equal values (and negatives, and -inf pages): the chosen set is a top-k
    whatever the tie-breaking: exactly ``budget`` pages, none scoring below a page left out."""
    g = torch.Generator().manual_seed(5)
    b, hkv, num_pages, page = 2, 3, 200, 16
    position = torch.tensor([num_pages * page - 1, 150 * page], device=DEVICE)
    page_valid = torch.arange(num_pages, device=DEVICE) <= (position // page)[:, None]
    scores = scores_for(torch.randint(-3, 4, (b, hkv, num_pages), generator=g).float().to(DEVICE), page_valid)
    params = ref.SparseParams(page, 24, 0.0, 1, 1, 1)
    indices, chosen = decode.top_pages(scores, position, params, chunk_pages=chunk_pages)
    for i in range(b):
        assert_a_top_k(indices[i], chosen[i], scores[i], 24, kept={0, int(position[i]) // page})


def assert_a_top_k(indices, chosen, scores, budget, kept):
    """Per KV head: exactly ``budget`` pages chosen, the always-kept ones among them, and no
    other chosen page scoring below a page left out (whatever the tie-breaking)."""
    for h in range(indices.shape[0]):
        taken = set(indices[h][chosen[h]].tolist())
        ranked = scores[h].tolist()
        left = [ranked[p] for p in range(len(ranked)) if p not in taken]
        assert len(taken) == budget and kept <= taken, (h, sorted(taken))
        assert min(ranked[p] for p in taken - kept) >= max(left), h


@pytest.mark.parametrize("seed", [0, 1])
def test_top_pages_kernel_on_adjacent_floats(seed):
    """Scores on a few adjacent floats (consecutive bit patterns, positive and negative), each
    taken by many pages: the threshold search must land on an exact key with ties on it, where a
    range bound off by one key takes too many pages or too few."""
    g = torch.Generator().manual_seed(seed)
    b, hkv, num_pages, page = 2, 2, 96, 16
    bits = torch.cat([torch.arange(6) + 0x3F800000, torch.arange(6) + 0xBF800000 - (1 << 32)]).to(torch.int32)
    scores = torch.stack([bits.repeat(8)[torch.randperm(num_pages, generator=g)] for _ in range(b * hkv)])
    scores = scores.view(torch.float32).reshape(b, hkv, num_pages).to(DEVICE)
    position = torch.full((b,), num_pages * page - 1, device=DEVICE)
    own = num_pages - 1  # the query's page, always kept
    for budget in (5, 17, 48, 49, 80):
        params = ref.SparseParams(page, budget, 0.0, 0, 1, 1)
        for chunk_pages in {0, 128 if budget <= 32 else 0}:
            indices, chosen = decode.top_pages(scores, position, params, chunk_pages=chunk_pages)
            for i in range(b):
                assert_a_top_k(indices[i], chosen[i], scores[i], budget, kept={own})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # "wide": the guess's overflow
@pytest.mark.parametrize("case", ["wide", "tiny", "equal", "kept_over_budget", "skewed"])
@pytest.mark.parametrize("chunk_pages", [0, 32])
def test_top_pages_kernel_on_extreme_score_ranges(case, chunk_pages):
    """The threshold search brackets the finite scores and guesses inside them by interpolation:
    scores spanning the whole float range (where the interpolation overflows), denormals around
    zero, one repeated finite value, more always-kept pages than the budget, and a heavy tail
    (where a linear guess lands far off). The chosen set is still a top-k of the budget."""
    g = torch.Generator().manual_seed(7)
    b, hkv, num_pages, page, budget = 2, 2, 160, 16, 24
    base = torch.randn(b, hkv, num_pages, generator=g)
    scores = {
        "wide": base.sign() * torch.finfo(torch.float32).max * base.abs().clamp(max=1),
        "tiny": base * 1e-42,  # denormals, both signs, and zeros
        "equal": torch.full_like(base, 2.5),
        "kept_over_budget": base,
        "skewed": base.exp() ** 8,
    }[case]
    position = torch.tensor([num_pages * page - 1, 100 * page + 3], device=DEVICE)
    page_valid = torch.arange(num_pages, device=DEVICE) <= (position // page)[:, None]
    scores = scores_for(scores.to(DEVICE), page_valid)
    sink = 30 if case == "kept_over_budget" else 1
    params = ref.SparseParams(page, budget, 0.0, sink, 1, 1)
    indices, chosen = decode.top_pages(scores, position, params, chunk_pages=chunk_pages)
    for i in range(b):
        if case == "kept_over_budget":  # 31 always-kept pages for 24 slots: only kept pages are chosen
            assert all(p < sink or p == int(position[i]) // page
                       for h in range(hkv) for p in indices[i, h][chosen[i, h]].tolist())
            assert chosen[i].sum(-1).tolist() == [budget] * hkv
        else:
            assert_a_top_k(indices[i], chosen[i], scores[i], budget, kept={0, int(position[i]) // page})


def test_top_pages_kernel_slots_when_the_best_pages_come_first():
    """Budget below the page cap, best scores on the first pages: taken pages fill the first slots,
    the others the rest, every slot a distinct page (hand-computed)."""
    scores = torch.tensor([[[9.0, 8.0, 7.0, 1.0, 2.0, float("-inf")]]], device=DEVICE)  # page 5: past the query
    params = ref.SparseParams(16, 5, 0.25, 0, 1, 1)  # budget ceil(0.25 * 80 / 16) = 2 of a cap of 5
    indices, chosen = decode.top_pages(scores, torch.tensor([4 * 16 + 15], device=DEVICE), params)
    assert chosen.tolist() == [[[True, True, False, False, False]]]
    assert sorted(indices[0, 0, :2].tolist()) == [0, 4] and indices[0, 0].tolist()[2:] == [1, 2, 3]


def test_top_pages_split_selection_checks_its_chunk_size():
    """A chunk size that is not a power of two, or smaller than the page cap, is refused by name;
    a valid one selects what one stage and the reference select."""
    scores = torch.randn(1, 2, 64, device=DEVICE)
    params = ref.SparseParams(16, 8, 0.0, 0, 1, 1)
    position = torch.tensor([64 * 16 - 1], device=DEVICE)
    for bad in (12, 4):
        with pytest.raises(ValueError, match="chunk_pages"):
            decode.top_pages(scores, position, params, chunk_pages=bad)
    split = decode.top_pages(scores, position, params, chunk_pages=16)
    whole = decode.top_pages(scores, position, params, chunk_pages=0)
    assert chosen_sets(*split) == chosen_sets(*whole) == chosen_sets(*ref.top_pages(scores, position, params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads,n,length,pages_per_split", [
    (4, 2, 2, 100, None), (4, 2, 4, 100, 2), (3, 1, 3, 64, 1), (2, 2, 2, 37, None), (8, 2, 2, 300, 3),
    (4, 2, 2, 1100, 40),  # splits of 32 pages or more: 8-page tiles
])
def test_dense_window_kernel_matches_sdpa(dtype, q_heads, kv_heads, n, length, pages_per_split):
    """Every window row over every key it may see, against SDPA one row at a time: causal rows
    ending at the cache's last positions, a left-padded batch row, a cache that is not a whole
    number of pages, splits of one page to all of them, tiles of 4 and 8 pages."""
    g = torch.Generator().manual_seed(length + n)
    b, d = 2, 16
    q = torch.randn(b, q_heads, n, d, generator=g).to(dtype).to(DEVICE)
    k, v = (torch.randn(b, kv_heads, length, d, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    keys, rows = torch.arange(length), torch.arange(length - n, length)
    allowed = (keys[None, :] <= rows[:, None]).expand(b, n, length).clone()
    allowed[1, :, :7] = False  # left padding of the second batch row
    allowed = allowed.to(DEVICE)
    got = decode.dense_window(q, k, v, allowed, 0.25, pages_per_split=pages_per_split)
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, i:i + 1].float(), k.float(), v.float(), attn_mask=allowed[:, None, i:i + 1], scale=0.25,
        enable_gqa=True) for i in range(n)], dim=2)
    assert got.dtype == dtype and got.shape == (b, q_heads, n, d)
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel launch, as the wrappers make it, compiles to an sm_90 cubin with Triton's own
    compiler, and Inductor finds it writes exactly its outputs; the compile cache keys on every
    kernel's source (tests/compile_worker.py, in a process without the interpreter, which accepts
    code the compiler rejects and runs kernels that have no source to key on)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(root / "tests" / "compile_worker.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "launches compiled for sm_90 and write what they should" in done.stdout
    assert "the compile cache keys on every kernel's source" in done.stdout
