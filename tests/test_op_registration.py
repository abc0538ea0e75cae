"""retro::attention as a torch.library op: opcheck, torch.compile, and bad input."""

from __future__ import annotations

import pytest
import torch

from retro_compile.kernels.op import retro_attention
from retro_compile.kernels.reference import SparseParams
from retro_compile.state import StateShape, allocate

from .sequences import make_problem, mask_for

PARAMS = SparseParams(8, 2, 0.0, 0, 1, 2)


def fresh_state(problem, window=2, summaries="exact"):
    return allocate(StateShape.of_call(problem.q, problem.k, problem.v, -(-problem.q.shape[2] // 8), window, summaries))


def call_args(problem, positions, state, params=PARAMS):
    return (problem.q[:, :, positions], problem.k, problem.v, mask_for(problem, positions), *state, False, None, *params)


@pytest.mark.parametrize("phase", ["prefill", "decode", "decode with positions"])
@pytest.mark.parametrize("summaries", ["exact", "int8"])
@pytest.mark.slow
def test_opcheck(phase, summaries):
    problem = make_problem()
    state = fresh_state(problem, summaries=summaries)
    torch.ops.retro.attention(*call_args(problem, list(range(40)), state))
    positions = list(range(40)) if phase == "prefill" else [40, 41]
    args = call_args(problem, positions, state)
    if phase == "decode with positions":  # as the rewrite passes them: one tensor shared by the layers
        args = (*args, torch.tensor([positions] * problem.q.shape[0]))
    torch.library.opcheck(torch.ops.retro.attention.default, args)


def test_compiled_matches_eager_without_graph_break_or_recompile():
    problem = make_problem()
    eager_state, compiled_state = fresh_state(problem), fresh_state(problem)

    def step(q, k, v, mask, state):
        return retro_attention(q, k, v, mask, state, PARAMS) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    calls = [list(range(40))] + [[t - 1, t] for t in range(40, 46)]
    for i, positions in enumerate(calls):
        args = (problem.q[:, :, positions], problem.k, problem.v, mask_for(problem, positions))
        expected = step(*args, eager_state)
        if i >= 2:  # prefill and first decode compiled; every later decode step reuses the graph
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled(*args, compiled_state)
        else:
            got = compiled(*args, compiled_state)
        torch.testing.assert_close(got, expected)
        for a, b in zip(compiled_state, eager_state):
            torch.testing.assert_close(a, b)


def _bad(problem, state, **change):
    args = dict(q=problem.q[:, :, [40, 41]], k=problem.k, v=problem.v, attn_mask=mask_for(problem, [40, 41]))
    args.update(change)
    return args


@pytest.mark.parametrize("change,error,words", [
    (lambda p: dict(q=p.q[0, :, [40, 41]]), ValueError, "query must have 4 dims"),
    (lambda p: dict(k=p.k[:, :1].expand(2, 3, -1, -1)), ValueError, "key heads"),
    (lambda p: dict(k=p.k[..., :8]), ValueError, "key head_dim"),
    (lambda p: dict(v=p.v.double()), TypeError, "value dtype"),
    (lambda p: dict(q=p.q[:, :, [40, 41]].half()), TypeError, "dtypes differ"),
    (lambda p: dict(q=p.q[:, :, [40, 41]].to("meta")), ValueError, "devices differ"),
    (lambda p: dict(attn_mask=torch.ones(2, 4, 2, 96, dtype=torch.bool)), ValueError, "one head"),
    (lambda p: dict(attn_mask=torch.ones(2, 1, 2, 96, dtype=torch.int64)), TypeError, "attn_mask dtype"),
    (lambda p: dict(q=p.q[:1, :, [40, 41]]), ValueError, "batch sizes differ"),
])
def test_bad_input_raises_and_leaves_state_alone(change, error, words):
    problem = make_problem()
    state = fresh_state(problem)
    retro_attention(problem.q[:, :, :40], problem.k, problem.v, mask_for(problem, list(range(40))), state, PARAMS)
    before = [t.clone() for t in state]
    args = _bad(problem, state, **change(problem))
    with pytest.raises(error, match=words):
        retro_attention(args["q"], args["k"], args["v"], args["attn_mask"], state, PARAMS)
    for a, b in zip(state, before):
        assert torch.equal(a, b)


def test_context_beyond_max_context_raises():
    problem = make_problem()
    state = allocate(StateShape(2, 4, 2, 16, 16, 4, 2, torch.float32, torch.device("cpu")))  # 32 positions
    with pytest.raises(ValueError, match="exceeds the state's max_context"):
        retro_attention(problem.q[:, :, [40, 41]], problem.k, problem.v, mask_for(problem, [40, 41]), state, PARAMS)


def test_state_for_another_window_raises():
    problem = make_problem()
    state = fresh_state(problem, window=3)
    with pytest.raises(ValueError, match="state out_cache has shape"):
        retro_attention(problem.q[:, :, [40, 41]], problem.k, problem.v, mask_for(problem, [40, 41]), state, PARAMS)


def test_state_fields_of_another_shape_or_dtype_raise():
    """The kernels index ``last`` and ``start`` as 32-bit integers and ``start`` per batch row: any
    other layout is refused, naming the field."""
    problem = make_problem()
    args = (problem.q[:, :, [40, 41]], problem.k, problem.v, mask_for(problem, [40, 41]))
    state = fresh_state(problem)
    with pytest.raises(TypeError, match="state last has dtype torch.int64, expected torch.int32"):
        retro_attention(*args, state._replace(last=state.last.long()), PARAMS)
    with pytest.raises(TypeError, match="state start has dtype torch.int64, expected torch.int32"):
        retro_attention(*args, state._replace(start=state.start.long()), PARAMS)
    with pytest.raises(ValueError, match=r"state start has shape \(2, 1\), expected \(2,\)"):
        retro_attention(*args, state._replace(start=state.start[:, None]), PARAMS)


def test_summaries_of_another_dtype_or_a_bad_scale_raise():
    """Summary tables are both the key dtype or both int8; the scale is fp32 (B, Hkv, D)."""
    problem = make_problem()
    args = (problem.q[:, :, [40, 41]], problem.k, problem.v, mask_for(problem, [40, 41]))
    state = fresh_state(problem, summaries="int8")
    with pytest.raises(TypeError, match=r"summaries dtypes \(torch.int8, torch.float32\) must both be the key dtype"):
        retro_attention(*args, state._replace(kmin=state.kmin.float()), PARAMS)
    with pytest.raises(TypeError, match="summaries dtypes .* torch.float16"):
        retro_attention(*args, state._replace(kmax=state.kmax.half(), kmin=state.kmin.half()), PARAMS)
    with pytest.raises(TypeError, match="state summary_scale has dtype torch.float16, expected torch.float32"):
        retro_attention(*args, state._replace(summary_scale=state.summary_scale.half()), PARAMS)
    with pytest.raises(ValueError, match="state summary_scale has shape"):
        retro_attention(*args, state._replace(summary_scale=state.summary_scale[..., :8]), PARAMS)


def test_bad_input_fails_while_tracing():
    """The fake implementation validates too: a compiled call fails before running anything."""
    problem = make_problem()
    state = fresh_state(problem)

    def step(q, k, v, mask):
        return retro_attention(q, k, v, mask, state, PARAMS)

    with pytest.raises(Exception, match="key head_dim"):
        torch.compile(step, fullgraph=True, backend="eager")(problem.q[:, :, [40, 41]], problem.k[..., :8],
                                                            problem.v, mask_for(problem, [40, 41]))


@pytest.mark.slow
def test_compiled_decode_step_updates_the_summaries_in_place():
    """The summary refresh writes a few pages of the state; compiled, it must not copy the whole table.

    A scatter_ into the state buffer used to compile to a full copy of kmax and kmin (and a copy
    back) every step: the largest cost of a step at batch 8. Inductor's generated code for a step
    must hold no flat loop over the table's size.
    """
    from torch._inductor.utils import run_and_get_code

    problem = make_problem(batch=1, q_heads=3, kv_heads=3, length=1000, head_dim=16)
    state = fresh_state(problem)
    numel = state.kmax.numel()  # 3 * 125 * 16 = 6000: no other tensor of the step has this size
    prompt = list(range(problem.prompt))
    retro_attention(problem.q[:, :, prompt], problem.k, problem.v, mask_for(problem, prompt), state, PARAMS)
    rows = [problem.prompt, problem.prompt + 1]

    def step(q, k, v, mask):
        return retro_attention(q, k, v, mask, state, PARAMS)

    with torch._inductor.config.patch(force_disable_caches=True):
        _, code = run_and_get_code(torch.compile(step, fullgraph=True), problem.q[:, :, rows], problem.k, problem.v,
                                   mask_for(problem, rows))
    source = "\n".join(code)
    assert f"<static_cast<int64_t>({numel}L)" not in source.replace(" ", "")
