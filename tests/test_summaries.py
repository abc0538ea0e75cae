"""int8 page summaries (``RetroConfig.summaries="int8"``): the format against hand-computed cases,
the bound it keeps against direct ``q . k``, and the whole op against naive oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retro_compile import RetroConfig
from retro_compile.kernels import reference as ref
from retro_compile.kernels.op import retro_attention
from retro_compile.state import StateShape, allocate

from .oracles import naive_dense, naive_quest_pages, page_positions
from .sequences import dense_rows, make_problem, mask_for, run


def test_quantize_summary_hand_case():
    """Max rows round up, min rows down, to whole steps of their dim's scale; beyond 127 steps
    they saturate."""
    scale = torch.tensor([[[0.5, 2.0, 0.25]]])  # (B, Hkv, D) = (1, 1, 3)
    rows = torch.tensor([[[[1.2, -3.0, 40.0], [1.0, 3.0, -40.0]]]])  # (1, 1, 2 pages, 3)
    up = ref.quantize_summary(rows, scale, up=True)
    down = ref.quantize_summary(rows, scale, up=False)
    assert up.dtype == down.dtype == torch.int8
    assert up.tolist() == [[[[3, -1, 127], [2, 2, -127]]]]  # 2.4 -> 3, -1.5 -> -1, 160 -> 127; 2 stays 2
    assert down.tolist() == [[[[2, -2, 127], [2, 1, -127]]]]


def test_prompt_summary_scale_hand_case():
    """Twice the largest |key| of each dim over the valid prompt positions, over 127; padding does
    not count, a dim of zeros gets the smallest positive float. A prefill of tables in the key
    dtype leaves the state's scale at the ones it was allocated with."""
    k = torch.tensor([[[[1.0, -4.0, 0.0], [-3.0, 2.0, 0.0], [100.0, 100.0, 0.0]]]])  # (1, 1, 3 positions, 3 dims)
    valid = torch.tensor([[True, True, False]])  # the third position is padding
    scale = ref.prompt_summary_scale(k, valid)
    torch.testing.assert_close(scale[0, 0, :2], torch.tensor([6.0 / 127, 8.0 / 127]))
    assert scale[0, 0, 2] == torch.finfo(torch.float32).tiny
    problem = make_problem()
    state = allocate(StateShape.of_call(problem.q, problem.k, problem.v, 12, 2))
    prompt = list(range(40))
    retro_attention(problem.q[:, :, prompt], problem.k, problem.v, mask_for(problem, prompt), state,
                    ref.SparseParams(8, 4, 0.0, 0, 1, 2))
    assert torch.equal(state.summary_scale, torch.ones_like(state.summary_scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_scores_bound_every_key_and_stay_within_a_step_of_the_exact_bound(dtype):
    """After a prefill, each page's int8 score is at least every ``q . k`` of its valid keys
    (computed directly) and at most the exact summaries' score plus one step per dim
    (``sum_d |q_d| * scale_d``), for every query head of the group."""
    problem = make_problem(batch=2, q_heads=4, kv_heads=2, head_dim=16, length=96, prompt=96, pad=(0, 5), dtype=dtype)
    states = {s: allocate(StateShape.of_call(problem.q, problem.k, problem.v, 12, 2, s)) for s in ("exact", "int8")}
    prompt = list(range(96))
    for state in states.values():
        retro_attention(problem.q[:, :, prompt], problem.k, problem.v, mask_for(problem, prompt), state,
                        ref.SparseParams(8, 4, 0.0, 0, 1, 2))
    int8, exact = states["int8"], states["exact"]
    assert int8.kmax.dtype == torch.int8 and exact.kmax.dtype == dtype
    valid = problem.valid
    for head in range(4):
        q = problem.q[:, head, 10].float()  # (B, D): one query head; the group's max over one head is itself
        q_row = torch.zeros_like(problem.q[:, :, 10]).index_copy(1, torch.tensor([head]), problem.q[:, [head], 10])
        kv = head // 2
        got = ref.page_scores(q_row, int8.kmax, int8.kmin, valid, 8, summary_scale=int8.summary_scale,
                              start=int8.start)[:, kv]
        tight = ref.page_scores(q_row, exact.kmax, exact.kmin, valid, 8, start=exact.start)[:, kv]
        keys = problem.k[:, kv].float()  # (B, L, D)
        dots = (keys @ q[:, :, None])[..., 0].masked_fill(~valid, float("-inf"))
        # Pages count from each row's first valid position (after 0 and 5 positions of padding).
        direct = torch.stack([F.pad(dots[b, pad:], (0, pad), value=float("-inf")) for b, pad in enumerate((0, 5))])
        direct = direct.view(2, 12, 8).amax(-1)
        slack = (q.abs() * int8.summary_scale[:, kv]).sum(-1, keepdim=True)  # (B, 1)
        live = direct > float("-inf")
        tol = 1e-4 if dtype == torch.float32 else 0.05 * slack
        assert (got[live] >= direct[live] - 1e-4).all()
        assert ((got - tight).abs()[live] <= (slack.expand_as(got) + tol)[live]).all()
        assert (got[~live] == float("-inf")).all()


def test_full_budget_with_int8_summaries_is_dense_sdpa():
    """A budget covering the context selects every page whatever the scores: prefill and decode
    rows equal dense SDPA with int8 summaries too, over rows that were written after the prefill."""
    problem = make_problem(batch=2, q_heads=4, kv_heads=2, length=96, prompt=60, pad=(0, 5))
    params = ref.SparseParams(8, 12, 0.0, 0, 1, 2)
    for positions, out in run(problem, params, steps=6, summaries="int8"):
        torch.testing.assert_close(out.float(), dense_rows(problem, positions), atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("budget,sink", [(3, 0), (5, 1)])
def test_window_one_with_int8_summaries_is_quest_over_outward_rounded_summaries(budget, sink):
    """w = 1 with int8 summaries: each decode row equals exact attention over the pages a naive
    Quest selects when every page's max is rounded up and min down to whole steps of
    ``2 * max |prompt key| / 127`` per dim (computed here by loops), decoded keys included."""
    problem = make_problem(batch=2, q_heads=4, kv_heads=2, head_dim=16, length=120, prompt=90, pad=(0, 5))
    page_size, group = 8, 2
    params = ref.SparseParams(page_size, budget, 0.0, sink, 1, 1)
    steps = {}
    for b in range(2):
        for hk in range(2):
            prompt_keys = [problem.k[b, hk, j].double() for j in range(problem.prompt) if problem.valid[b, j]]
            largest = torch.stack(prompt_keys).abs().max(0).values
            steps[b, hk] = (largest * 2 / 127).float().double()  # the fp32 scale the state stores
    for positions, out in list(run(problem, params, 8, summaries="int8"))[1:]:
        t = positions[-1]
        for b in range(2):
            for h in range(4):
                hk = h // group
                pages = naive_quest_pages(problem.q[b, hk * group:(hk + 1) * group, t], problem.k[b, hk],
                                          problem.valid[b], t, page_size, budget, sink, 1, step=steps[b, hk])
                visible = page_positions(pages, page_size, t, problem.valid[b])
                expected = naive_dense(problem.q[b, h, t], problem.k[b, hk], problem.v[b, hk], visible)
                torch.testing.assert_close(out[b, h, -1].double(), expected, atol=1e-5, rtol=1e-5)


def test_a_second_prompt_sets_its_own_scale():
    """One state, two requests: the second prefill (a longer prompt with far larger keys) replaces
    the scale, so its decode steps equal a fresh state's."""
    first = make_problem(length=80, prompt=40, seed=1)
    second = make_problem(length=100, prompt=70, seed=2)
    second.k.mul_(30.0)
    params = ref.SparseParams(8, 3, 0.0, 0, 1, 2)
    shared = allocate(StateShape.of_call(second.q, second.k, second.v, 13, 2, "int8"))
    fresh = allocate(StateShape.of_call(second.q, second.k, second.v, 13, 2, "int8"))
    prompt = list(range(40))
    k_first = torch.nn.functional.pad(first.k, (0, 0, 0, 20))
    v_first = torch.nn.functional.pad(first.v, (0, 0, 0, 20))
    valid_first = torch.nn.functional.pad(first.valid, (0, 20))
    first_mask = mask_for(type(first)(first.q, k_first, v_first, valid_first, 40), prompt)
    retro_attention(first.q[:, :, prompt], k_first, v_first, first_mask, shared, params)
    for state in (shared, fresh):
        prompt = list(range(70))
        retro_attention(second.q[:, :, prompt], second.k, second.v, mask_for(second, prompt), state, params)
    torch.testing.assert_close(shared.summary_scale, fresh.summary_scale, atol=0, rtol=0)
    for t in range(70, 76):
        rows = [t - 1, t]
        outs = [retro_attention(second.q[:, :, rows], second.k, second.v, mask_for(second, rows), state, params)
                for state in (shared, fresh)]
        torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_config_refuses_another_summary_format():
    with pytest.raises(ValueError, match=r"RetroConfig.summaries='fp8' is not one of \('exact', 'int8'\)"):
        RetroConfig(summaries="fp8")
    with pytest.raises(ValueError, match="summaries='bf16' is not one of"):
        StateShape.of_call(*(torch.zeros(1, 2, 4, 16),) * 3, 4, 2, "bf16")


def test_every_config_summary_format_allocates_its_tables():
    """Each format RetroConfig accepts has a table dtype in the state: the keys' for the stored
    summaries, one byte for int8; the scale is always fp32."""
    from retro_compile.config import SUMMARIES

    k = torch.zeros(1, 2, 32, 16, dtype=torch.bfloat16)
    states = {s: allocate(StateShape.of_call(k, k, k, 2, 2, s)) for s in SUMMARIES}
    assert {s: state.kmax.dtype for s, state in states.items()} == {"exact": torch.bfloat16, "int8": torch.int8}
    assert all(state.summary_scale.dtype == torch.float32 for state in states.values())
