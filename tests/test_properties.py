"""Property-based tests: random shapes, padding, budgets and windows against independent oracles.

Hypothesis draws batch 1-4, GQA groups 1-8, head dims 16-128, contexts up to 600 positions, page
sizes 4-32, random left padding, budgets below and above the context, windows 1-4 and the three
float dtypes. Runs are derandomized (the same examples every run) and bounded in number, so CI
stays fast and a failure reproduces.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retro_compile.kernels import decode  # needs triton (the test extra)
from retro_compile.kernels import op
from retro_compile.kernels import reference as ref

from .oracles import naive_dense, naive_quest_pages, page_positions
from .sequences import Problem, dense_rows, run

TOL = {torch.float32: 3e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, max_batch=4, max_group=8, head_dims=(16, 32, 64, 128), max_length=600, page_sizes=(4, 8, 16, 32),
             dtypes=tuple(DTYPES)):
    """(problem, window, page_size, steps): a prompt and ``steps`` decode positions after it."""
    window = draw(st.integers(1, 4))
    steps = draw(st.integers(1, 4))
    length = draw(st.integers(window + 1 + steps, max_length))
    prompt = length - steps
    batch = draw(st.integers(1, max_batch))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, max_group))
    head_dim = draw(st.sampled_from(head_dims))
    dtype = DTYPES[draw(st.sampled_from(dtypes))]
    pad = draw(st.lists(st.integers(0, prompt - 1), min_size=batch, max_size=batch))  # each row keeps >= 1 token
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=g).to(dtype)
    valid = torch.arange(length)[None, :] >= torch.tensor(pad)[:, None]
    return Problem(q, k, v, valid, prompt), window, draw(st.sampled_from(page_sizes)), steps


@settings(max_examples=30, **CHECKS)
@given(case=problems(), extra_pages=st.integers(0, 3), fraction=st.booleans())
def test_full_budget_is_dense_sdpa(case, extra_pages, fraction):
    """A budget covering the context (in pages, at or above it, or the fraction 1.0): every
    prefill row and every decode row equals dense SDPA."""
    problem, window, page_size, steps = case
    pages = -(-problem.length // page_size)
    params = ref.SparseParams(page_size, pages + extra_pages, 1.0 if fraction else 0.0, 0, 1, window)
    tol = TOL[problem.q.dtype]
    for positions, out in run(problem, params, steps):
        torch.testing.assert_close(out.float(), dense_rows(problem, positions), atol=tol, rtol=tol)


@settings(max_examples=12, **CHECKS)
@given(case=problems(max_batch=2, max_group=4, head_dims=(16, 32), max_length=200, dtypes=("fp32",)),
       budget=st.integers(1, 12), sink=st.integers(0, 1), local=st.integers(1, 2))
def test_window_one_is_plain_quest(case, budget, sink, local):
    """w = 1, any budget (below or above the context): each decode row equals exact attention over
    the page set a naive loop-over-pages Quest selects."""
    problem, _, page_size, steps = case
    budget = max(budget, sink + local)
    params = ref.SparseParams(page_size, budget, 0.0, sink, local, 1)
    q_heads, kv_heads = problem.q.shape[1], problem.k.shape[1]
    group = q_heads // kv_heads
    for positions, out in list(run(problem, params, steps))[1:]:
        t = positions[-1]
        for b in range(problem.q.shape[0]):
            for h in range(q_heads):
                hk = h // group
                pages = naive_quest_pages(problem.q[b, hk * group:(hk + 1) * group, t], problem.k[b, hk],
                                          problem.valid[b], t, page_size, budget, sink, local)
                visible = page_positions(pages, page_size, t, problem.valid[b])
                expected = naive_dense(problem.q[b, h, t], problem.k[b, hk], problem.v[b, hk], visible)
                torch.testing.assert_close(out[b, h, -1].double(), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=12, **CHECKS)
@given(case=problems(max_batch=2, max_group=4, head_dims=(16,), max_length=160, dtypes=("fp32",)),
       budget=st.integers(1, 4))
def test_past_row_after_its_last_correction_is_attention_over_the_union(case, budget):
    """Retro, any window: once a past row leaves the window, its output equals exact attention over
    the union of the pages the steps p .. p+w-1 selected (positions <= p)."""
    problem, window, page_size, steps = case
    window = max(window, 2)
    steps = max(steps, window)
    problem = Problem(problem.q, problem.k, problem.v, problem.valid, problem.length - steps)
    if problem.prompt <= window:
        return
    params = ref.SparseParams(page_size, budget, 0.0, 0, 1, window)
    group = problem.q.shape[1] // problem.k.shape[1]
    for positions, out in list(run(problem, params, steps))[1:]:
        oldest = positions[0]
        if len(positions) < window or oldest < problem.prompt:
            continue  # the oldest row was a prompt row: dense, not a sparse decode row
        for b in range(problem.q.shape[0]):
            for h in range(problem.q.shape[1]):
                hk = h // group
                union = set()
                for s in positions:
                    union |= set(naive_quest_pages(problem.q[b, hk * group:(hk + 1) * group, s], problem.k[b, hk],
                                                   problem.valid[b], s, page_size, budget))
                visible = page_positions(sorted(union), page_size, oldest, problem.valid[b])
                expected = naive_dense(problem.q[b, h, oldest], problem.k[b, hk], problem.v[b, hk], visible)
                torch.testing.assert_close(out[b, h, 0].double(), expected, atol=1e-5, rtol=1e-5)



@settings(max_examples=8, **CHECKS)
@pytest.mark.slow
@given(case=problems(max_batch=2, max_group=4, head_dims=(16, 32), max_length=160, page_sizes=(16, 32),
                     dtypes=("fp32", "fp16")),
       budget=st.integers(1, 6))
def test_kernel_stages_equal_the_reference(case, budget):
    """The whole op with its Triton stages (under the interpreter on CPU) equals the reference op,
    output by output, over a prefill and a few decode steps; the state ends equal too."""
    problem, window, page_size, steps = case
    params = ref.SparseParams(page_size, budget, 0.0, 0, 1, window)
    expected = [out for _, out in run(problem, params, steps)]
    with mock.patch.object(op, "use_kernels", lambda *a: True):
        got = [out for _, out in run(problem, params, steps)]
    tol = TOL[problem.q.dtype]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
