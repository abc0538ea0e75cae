"""retro::attention against independent oracles: dense SDPA, a naive Quest, page-set unions."""

from __future__ import annotations

import pytest
import torch

from retro_compile.kernels import masks
from retro_compile.kernels import reference as ref
from retro_compile.kernels.op import retro_attention
from retro_compile.kernels.reference import SparseParams
from retro_compile.state import STATE_FIELDS, StateShape, allocate

from .oracles import naive_dense, naive_quest_pages, page_positions
from .sequences import dense_rows, make_problem, mask_for, run

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def params(window=1, budget_pages=1000, page_size=8, fraction=0.0, sink=0, local=1):
    return SparseParams(page_size, budget_pages, fraction, sink, local, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (3, 1), (8, 2), (8, 1)])
def test_full_budget_equals_sdpa(dtype, window, q_heads, kv_heads):
    """Budget covering the context: prefill and every decode row equal dense SDPA."""
    problem = make_problem(batch=3, q_heads=q_heads, kv_heads=kv_heads, pad=(0, 5, 11), dtype=dtype)
    for positions, out in run(problem, params(window=window), steps=12):
        expected = dense_rows(problem, positions)
        torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


def test_fraction_budget_of_one_is_dense():
    problem = make_problem()
    for positions, out in run(problem, params(window=2, budget_pages=12, fraction=1.0), steps=8):
        torch.testing.assert_close(out, dense_rows(problem, positions), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (3, 1), (4, 1), (8, 1)])
@pytest.mark.parametrize("budget,sink,local", [(3, 0, 1), (4, 1, 2), (2, 0, 2)])
def test_window_one_is_plain_quest(q_heads, kv_heads, budget, sink, local):
    """w = 1 equals a naive, loop-over-pages Quest (GQA group max, always-kept pages)."""
    problem = make_problem(batch=3, q_heads=q_heads, kv_heads=kv_heads, pad=(0, 3, 13), seed=1)
    group = q_heads // kv_heads
    p = params(window=1, budget_pages=budget, sink=sink, local=local)
    for positions, out in list(run(problem, p, steps=10))[1:]:
        t = positions[-1]
        for b in range(3):
            for h in range(q_heads):
                hk = h // group
                pages = naive_quest_pages(problem.q[b, hk * group:(hk + 1) * group, t], problem.k[b, hk],
                                          problem.valid[b], t, p.page_size, budget, sink, local)
                visible = page_positions(pages, p.page_size, t, problem.valid[b])
                expected = naive_dense(problem.q[b, h, t], problem.k[b, hk], problem.v[b, hk], visible)
                torch.testing.assert_close(out[b, h, -1].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [2, 3, 4])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 2), (3, 3)])
def test_merged_past_row_is_attention_over_union(window, q_heads, kv_heads):
    """With fixed q/k/v, a past row after its last correction equals exact attention over the
    union of the pages the steps p .. p+w-1 selected (restricted to positions <= p)."""
    problem = make_problem(batch=2, q_heads=q_heads, kv_heads=kv_heads, pad=(0, 6), seed=2)
    group = q_heads // kv_heads
    p = params(window=window, budget_pages=3)
    checked = 0
    for positions, out in list(run(problem, p, steps=14))[1:]:
        oldest, newest = positions[0], positions[-1]
        if len(positions) < window or oldest < problem.prompt:
            continue
        for b in range(2):
            for h in range(q_heads):
                hk = h // group
                union = set()
                for s in range(oldest, newest + 1):
                    union |= set(naive_quest_pages(problem.q[b, hk * group:(hk + 1) * group, s], problem.k[b, hk],
                                                   problem.valid[b], s, p.page_size, 3))
                visible = page_positions(sorted(union), p.page_size, oldest, problem.valid[b])
                expected = naive_dense(problem.q[b, h, oldest], problem.k[b, hk], problem.v[b, hk], visible)
                torch.testing.assert_close(out[b, h, 0].double(), expected, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked > 0


def test_retro_differs_from_quest_at_small_budget():
    """The supplement is not a no-op: past rows change when later steps load new pages."""
    problem = make_problem(seed=3)
    quest = [out[:, :, -1] for _, out in list(run(problem, params(window=1, budget_pages=2), steps=10))[1:]]
    retro = [out[:, :, 0] for _, out in list(run(problem, params(window=2, budget_pages=2), steps=11))[2:]]
    assert any(not torch.allclose(a, b) for a, b in zip(quest[:-1], retro))


def test_merge_is_exact_union():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    a = torch.zeros(1, 1, 1, 20, dtype=torch.bool)
    a[..., :7] = True
    b = torch.zeros_like(a)
    b[..., 12:] = True
    o1, l1 = ref.attend(q, k, v, a, 0.3)
    o2, l2 = ref.attend(q, k, v, b, 0.3)
    o, lse = ref.merge(o1, l1, o2, l2)
    o_u, l_u = ref.attend(q, k, v, a | b, 0.3)
    torch.testing.assert_close(o, o_u)
    torch.testing.assert_close(lse, l_u)
    # An empty side leaves the other as it was.
    o_e, l_e = ref.attend(q, k, v, torch.zeros_like(a), 0.3)
    o3, l3 = ref.merge(o1, l1, o_e, l_e)
    torch.testing.assert_close(o3, o1)
    torch.testing.assert_close(l3, l1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sink,local,budget", [(0, 1, 3), (1, 1, 4), (2, 3, 5), (0, 1, 50)])
def test_selection_properties(seed, sink, local, budget):
    g = torch.Generator().manual_seed(seed)
    batch, heads, num_pages, page_size = 3, 2, 12, 4
    scores = torch.randn(batch, heads, num_pages, generator=g)
    position = torch.tensor([5, 30, 45])
    valid = torch.rand(batch, num_pages * page_size, generator=g) > 0.3
    valid &= torch.arange(num_pages * page_size) <= position[:, None]
    valid[:, 8:12] = False  # a fully padded page
    valid[torch.arange(batch), position] = True  # a query sees itself
    page_valid = masks.page_any(valid, page_size)
    scores = scores.masked_fill(~page_valid[:, None], float("-inf"))  # as page_scores marks them
    p = SparseParams(page_size, budget, 0.0, sink, local, 1)
    indices, chosen = ref.top_pages(scores, position, p)
    sel = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, indices, chosen)  # (B, Hkv, NP)
    page = torch.arange(num_pages)
    for b in range(batch):
        own = int(position[b]) // page_size
        assert not sel[b, :, page > own].any(), "a page beyond the query was chosen"
        assert not sel[b, :, 2].any(), "a fully padded page was chosen"
        assert not sel[b, :, ~page_valid[b]].any()
        kept = page_valid[b] & ((page < sink) | ((page <= own) & (page > own - local)))
        assert sel[b, :, kept].all(), "an always-kept page was left out"
        expected = min(budget, int(page_valid[b].sum()))
        assert (sel[b].sum(-1) == expected).all(), "the budget was not met exactly"
        # The rest are the best-scoring: every chosen non-kept page outscores every left-out one.
        for h in range(heads):
            chosen = scores[b, h][sel[b, h] & ~kept]
            left = scores[b, h][~sel[b, h] & page_valid[b]]
            if len(chosen) and len(left):
                assert chosen.min() >= left.max()


def test_fraction_budget_grows_with_context():
    p = SparseParams(16, 64, 0.25, 0, 1, 1)
    pages = ref.budget_pages_for(p, torch.tensor([0, 63, 255, 100000]))
    assert pages.tolist() == [1, 1, 4, 64]


@pytest.mark.parametrize("length,prompt", [(6, 3), (8, 5)])
def test_context_shorter_than_a_page_and_budget_beyond_context(length, prompt):
    problem = make_problem(length=length, prompt=prompt, pad=(0, 1))
    for window in (1, 2):
        for positions, out in run(problem, params(window=window, budget_pages=4, page_size=16), steps=length - prompt):
            torch.testing.assert_close(out, dense_rows(problem, positions), atol=2e-5, rtol=2e-5)


def test_pages_straddling_prompt_end_are_refreshed():
    """A page half-written by the prompt gets the decoded keys in its summary."""
    problem = make_problem(prompt=37, pad=(0, 0))
    p = params(window=2, budget_pages=2)
    runs = list(run(problem, p, steps=3))
    assert len(runs) == 4  # prefill + 3 steps ran; now rebuild the state by hand and compare
    state = allocate(StateShape(2, 4, 2, 16, 16, 12, 2, torch.float32, torch.device("cpu")))
    valid = problem.valid & (torch.arange(problem.length) <= 39)
    kmax, kmin = ref.build_summaries(problem.k, valid, 8)
    ref.summarize_pages(state.kmax, state.kmin, problem.k, valid, torch.tensor([38, 38]), 2, 8)
    torch.testing.assert_close(state.kmax[:, :, 4], kmax[:, :, 4])
    torch.testing.assert_close(state.kmin[:, :, 4], kmin[:, :, 4])
    assert (state.kmax[:, :, :4] == 0).all(), "pages outside the written range were touched"


@pytest.mark.parametrize("length", [100, 6144, 8192, 9216])  # one stage; two (8 chunks or more of 1024)
def test_query_positions_is_the_last_allowed_key(length):
    """Against a hand loop: the last True index of each row, -1 for a row that sees nothing,
    whichever chunk that key falls in."""
    g = torch.Generator().manual_seed(length)
    allowed = torch.rand(3, 4, length, generator=g) < 0.001
    allowed[0, 0] = False
    allowed[0, 1, :] = False
    allowed[0, 1, 0] = True  # only the first key
    allowed[1, 2, length - 1] = True  # the very last key
    expected = torch.tensor([[max((j for j in range(length) if row[j]), default=-1) for row in rows.tolist()]
                             for rows in allowed])
    assert torch.equal(masks.query_positions(allowed), expected)
    compiled = torch.compile(masks.query_positions, dynamic=False)
    assert torch.equal(compiled(allowed), expected)


def test_shared_positions_give_the_steps_own_result():
    """A decode step handed its rows' positions (``masks.mask_positions``, which the rewrite
    computes once per graph for all layers) gives exactly the step that finds them itself, output
    and state, over a padded batch and a window of 2; and those positions are the rows' own."""
    problem = make_problem(pad=(0, 5))
    p = params(window=2, budget_pages=3, page_size=8)
    states = [allocate(StateShape.of_call(problem.q, problem.k, problem.v, 12, 2)) for _ in range(2)]
    prompt = list(range(problem.prompt))
    for state in states:
        retro_attention(problem.q[:, :, prompt], problem.k, problem.v, mask_for(problem, prompt), state, p)
    for t in range(problem.prompt, problem.prompt + 6):
        rows = [t - 1, t]
        mask = mask_for(problem, rows)
        positions = masks.mask_positions(mask, 2, 2)
        assert torch.equal(positions, torch.tensor([rows, rows]))
        q = problem.q[:, :, rows]
        own = retro_attention(q, problem.k, problem.v, mask, states[0], p)
        shared = retro_attention(q, problem.k, problem.v, mask, states[1], p, positions=positions)
        assert torch.equal(own, shared)
    for mine, theirs in zip(*states):
        assert torch.equal(mine, theirs)


def test_bad_positions_are_refused_by_name():
    """Positions of the wrong shape or dtype, or handed to a prefill, raise before anything runs."""
    problem = make_problem()
    p = params(window=2, page_size=8)
    state = allocate(StateShape.of_call(problem.q, problem.k, problem.v, 12, 2))
    rows = [50, 51]
    q, mask = problem.q[:, :, rows], mask_for(problem, rows)
    for bad in (torch.tensor([rows]), torch.tensor([rows, rows], dtype=torch.int32)):
        with pytest.raises(ValueError, match="positions must be int64 of shape"):
            retro_attention(q, problem.k, problem.v, mask, state, p, positions=bad)
    prompt = list(range(10))
    with pytest.raises(ValueError, match="positions are for decode steps"):
        retro_attention(problem.q[:, :, prompt], problem.k, problem.v, mask_for(problem, prompt), state, p,
                        positions=torch.zeros(2, 10, dtype=torch.long))


@pytest.mark.parametrize("window", [2, 4])
def test_a_row_with_fewer_tokens_than_the_window(window):
    """Row 1 holds two prompt tokens after 4 of padding, so its first windows reach back into the
    padding, before the slot its pages count from (and that slot lies inside the cache's first
    page): full budget stays dense SDPA, and small budgets stay finite."""
    problem = make_problem(batch=2, q_heads=4, kv_heads=2, prompt=6, pad=(0, 4), seed=5)
    for positions, out in run(problem, params(window=window), steps=8):
        torch.testing.assert_close(out, dense_rows(problem, positions), atol=2e-5, rtol=2e-5)
    for _, out in run(problem, params(window=window, budget_pages=2), steps=8):
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("chunks", [[40], [16, 16, 8], [37, 1, 2], [1, 38, 1]], ids=str)
@pytest.mark.parametrize("window", [2, 4])
def test_a_prompt_prefilled_in_chunks_leaves_the_state_of_one_piece(chunks, window):
    """A prompt prefilled in chunks (each told it is a prefill, whatever its rows, over the keys
    written so far) gives dense outputs and leaves the same state as one piece: summaries, `last`,
    the row starts, and the output cache's last w - 1 prompt rows, even where the last chunk has
    fewer rows than that (it keeps the rows of the chunk before)."""
    problem = make_problem(length=48, prompt=40, pad=(0, 5))
    params = SparseParams(16, 2, 0.0, 0, 1, window)
    states = []
    for pieces in ([40], chunks):
        state = allocate(StateShape.of_call(problem.q, problem.k, problem.v, 3, window))
        begin, outs = 0, []
        for n in pieces:
            rows = list(range(begin, begin + n))
            keys = begin + n
            part = type(problem)(problem.q, problem.k[:, :, :keys], problem.v[:, :, :keys], problem.valid[:, :keys],
                                 problem.prompt)
            outs.append(retro_attention(problem.q[:, :, rows], part.k, part.v, mask_for(part, rows), state, params,
                                        prefill=True))
            begin += n
        torch.testing.assert_close(torch.cat(outs, 2), dense_rows(problem, list(range(40))), atol=1e-5, rtol=1e-5)
        states.append(state)
    for name, one_piece, chunked in zip(STATE_FIELDS, *states):
        torch.testing.assert_close(chunked, one_piece, atol=1e-6, rtol=1e-6, msg=name)
