"""GPU-only checks (skipped without CUDA): the op on CUDA tensors, Inductor + CUDA graphs end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from retro_compile import RetroConfig, retro_compile

from .hf_models import prompts, tiny_model
from .sequences import Problem, dense_rows, make_problem, run
from .test_kernels import chosen_sets
from .test_op import params

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_full_budget_equals_sdpa_on_cuda(dtype, window):
    cpu = make_problem(batch=3, q_heads=8, kv_heads=2, pad=(0, 5, 11), dtype=dtype)
    problem = Problem(cpu.q.cuda(), cpu.k.cuda(), cpu.v.cuda(), cpu.valid.cuda(), cpu.prompt)
    for positions, out in run(problem, params(window=window), steps=8):
        assert out.is_cuda
        expected = dense_rows(cpu, positions)
        torch.testing.assert_close(out.float().cpu(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("summaries", ["exact", "int8"])
def test_generate_with_cuda_graphs_matches_dense_and_never_recompiles(summaries):
    model = tiny_model("llama").cuda()
    ids, mask = prompts(2, 40, pad=(0, 5))
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0)
    expected = model.generate(**kw)
    config = RetroConfig(mode="retro", budget=128, page_size=16, dense_layers=1, max_context=128, summaries=summaries)
    compiled = retro_compile(copy.deepcopy(model), config, mode="reduce-overhead")
    assert torch.equal(compiled.generate(**kw), expected)
    with torch.compiler.set_stance("fail_on_recompile"):  # a second request: 64 steps, no new graph
        assert torch.equal(compiled.generate(**kw), expected)


def test_one_cuda_graph_replay_per_decode_step_on_a_deep_model():
    """16 layers, several requests and batch sizes: each batch size records one CUDA graph, in its
    first request; every later decode step is one replay of it, and the tokens stay the untouched
    model's (full budget)."""
    from retro_compile.bench_e2e import GraphCounter

    model = tiny_model("llama", layers=16).cuda()
    config = RetroConfig(mode="retro", budget=256, page_size=16, dense_layers=2, max_context=256)
    compiled = retro_compile(copy.deepcopy(model), config, mode="reduce-overhead")
    new_tokens = 40
    captures = 0
    for batch, expected_captures in ((2, 1), (1, 2), (2, 2)):
        ids, mask = prompts(batch, 60, pad=(0, 5)[:batch], seed=batch)
        kw = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
        with GraphCounter() as graphs:
            got = compiled.generate(**kw)
        assert torch.equal(got, model.generate(**kw))
        captures += graphs.captures
        assert captures == expected_captures
        # The prefill gives the first token; the first decode step runs the compiled step (warm-up
        # and the state check); each of the other new_tokens - 2 steps is one replay.
        assert graphs.replays == new_tokens - 2


def test_generate_small_budget_runs_on_cuda():
    model = tiny_model("llama").cuda()
    ids, mask = prompts(2, 90, pad=(0, 5))
    config = RetroConfig(mode="retro", budget=32, page_size=16, dense_layers=1, max_context=128)
    compiled = retro_compile(copy.deepcopy(model), config, mode="reduce-overhead")
    out = compiled.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=20, do_sample=False,
                            pad_token_id=0)
    assert out.shape == (2, 110)


def test_padded_rows_decode_as_their_prompts_alone_on_cuda():
    """Kernels, Inductor and CUDA graphs: at a small budget each row of a left-padded batch gets
    the tokens of its prompt alone and unpadded (pages count from each row's first position)."""
    model = tiny_model("llama").cuda()
    config = RetroConfig(mode="retro", budget=32, page_size=16, dense_layers=1, max_context=128)
    compiled = retro_compile(copy.deepcopy(model), config)
    lengths, width = (70, 90, 53), 95
    ids, mask = prompts(3, width, pad=tuple(width - n for n in lengths), seed=12)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    batch = compiled.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), **kw)[:, width:]
    for row, n in enumerate(lengths):
        alone = compiled.generate(input_ids=ids[row:row + 1, width - n:].cuda(),
                                  attention_mask=mask[row:row + 1, width - n:].cuda(), **kw)[:, n:]
        assert torch.equal(batch[row], alone[0]), row


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("context", [4096, 32768, 131072])
@pytest.mark.parametrize("kv_heads", [8, 4])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_kernels_match_reference_bf16_realistic(batch, context, kv_heads, window, monkeypatch):
    """The op with the Triton stages against the op with the reference stages, on the GPU in bf16:
    32 query heads (GQA 4 and 8), head dim 128, page 16, budgets below and above the context.

    Both score pages with the kernel: its sums run in another order than the reference's, so a
    near-tie at the budget's edge may pick another page, and the selection, ``last`` and the
    outputs would differ where neither is wrong. The scores themselves are checked against the
    reference by ``test_page_scores_as_products_match_the_reference_bf16``."""
    from retro_compile.bench import causal_mask
    from retro_compile.kernels import decode as kernels
    from retro_compile.kernels import op
    from retro_compile.kernels import reference
    from retro_compile.kernels.op import retro_attention
    from retro_compile.kernels.reference import SparseParams
    from retro_compile.state import StateShape, allocate

    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(batch, kv_heads, context, 128, **kw) for _ in range(2))
    q = torch.randn(batch, 32, window + 1, 128, **kw)
    prefill = causal_mask(torch.arange(context - 2 * window - 1, context - window, device="cuda"), batch, context)
    decode = causal_mask(torch.arange(context - window, context, device="cuda"), batch, context)
    monkeypatch.setattr(reference, "page_scores", kernels.page_scores)  # the reference stages look it up per call
    for budget in (2048, 2 * context):
        params = SparseParams(16, min(budget, context) // 16, 0.0, 0, 1, window)
        outs = []
        for use_kernels in (True, False):
            monkeypatch.setattr(op, "use_kernels", lambda *a, _k=use_kernels: _k)
            state = allocate(StateShape.of_call(q, k, v, context // 16, window))
            retro_attention(q, k, v, prefill, state, params)
            outs.append((retro_attention(q[:, :, 1:], k, v, decode, state, params).float(), state))
        (got, s_got), (want, s_want) = outs
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        assert torch.equal(s_got.last, s_want.last)
        torch.testing.assert_close(s_got.out_cache, s_want.out_cache, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("batch,context", [(1, 131072), (8, 32768)])
def test_page_scores_as_products_match_the_reference_bf16(batch, context):
    """Page bounds as two matrix products on tensor cores, over summaries a prefill built (bf16,
    32 query / 8 KV heads, head dim 128): the reference's scores within bf16 rounding, the same
    pages at -inf, and the same top pages as the elementwise kernel's scores give."""
    from retro_compile.bench import op_case, stage_inputs
    from retro_compile.kernels import decode
    from retro_compile.kernels import reference as ref

    state, params, inputs = op_case(batch, context, 2)
    x = stage_inputs(state, params, inputs)
    got = decode.page_scores(x.q_row, state.kmax, state.kmin, x.valid, params.page_size, as_products=True)
    want = ref.page_scores(x.q_row, state.kmax, state.kmin, x.valid, params.page_size)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    elementwise = decode.page_scores(x.q_row, state.kmax, state.kmin, x.valid, params.page_size, as_products=False)
    products, plain = (sum(chosen_sets(*decode.top_pages(scores, x.position[:, -1], params)), [])
                       for scores in (got, elementwise))
    overlap = sum(len(set(a) & set(b)) for a, b in zip(products, plain))
    assert overlap >= 0.99 * batch * 8 * params.budget_pages  # near-ties may order differently


@pytest.mark.parametrize("batch,context", [(1, 131072), (8, 32768)])
def test_int8_summaries_match_the_reference_bf16(batch, context, monkeypatch):
    """int8 summaries at real size (bf16 keys, 32 query / 8 KV heads, head dim 128): the kernels'
    prefill leaves the reference's tables and scale bit for bit, and so does a step's refresh;
    the scores are the reference's within bf16 rounding, with the same pages at -inf and nearly
    all the same top pages."""
    from retro_compile.bench import op_case, stage_inputs
    from retro_compile.kernels import decode, op
    from retro_compile.kernels import reference as ref

    state, params, inputs = op_case(batch, context, 2, summaries="int8")
    monkeypatch.setattr(op, "use_kernels", lambda *a: False)
    want_state, _, _ = op_case(batch, context, 2, summaries="int8")
    assert state.kmax.dtype == torch.int8
    for name in ("kmax", "kmin", "summary_scale"):
        assert torch.equal(getattr(state, name), getattr(want_state, name)), name
    x = stage_inputs(state, params, inputs)
    got = decode.page_scores(x.q_row, state.kmax, state.kmin, x.valid, params.page_size, refresh=x.refresh,
                             summary_scale=state.summary_scale)
    want = ref.page_scores(x.q_row, want_state.kmax, want_state.kmin, x.valid, params.page_size, refresh=x.refresh,
                           summary_scale=want_state.summary_scale)
    assert torch.equal(state.kmax, want_state.kmax) and torch.equal(state.kmin, want_state.kmin)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    kernel_sets, reference_sets = (sum(chosen_sets(*decode.top_pages(scores, x.position[:, -1], params)), [])
                                   for scores in (got, want))
    overlap = sum(len(set(a) & set(b)) for a, b in zip(kernel_sets, reference_sets))
    assert overlap >= 0.99 * batch * 8 * params.budget_pages  # near-ties may order differently


@pytest.mark.parametrize("batch", [1, 4])
def test_split_selection_over_steps_matches_one_program_a_row_bf16(batch):
    """At 128K the default selection splits each row into chunks whose last program picks, found
    through a counter of finished chunks (B=1: 8 chunks of 1024 pages, B=4: 4 of 2048). Step after
    step, its page sets equal one program a row's on the same scores."""
    from retro_compile.bench import op_case, stage_inputs
    from retro_compile.kernels import decode

    state, params, inputs = op_case(batch, 131072, 2)
    x = stage_inputs(state, params, inputs)
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(4):
        scores = x.scores + step * torch.randn(x.scores.shape, generator=g, device="cuda")  # -inf stays
        split = decode.top_pages(scores, x.position[:, -1], params)
        whole = decode.top_pages(scores, x.position[:, -1], params, chunk_pages=0)
        assert chosen_sets(*split) == chosen_sets(*whole)


@pytest.mark.parametrize("batch,kv_heads,rows", [(1, 8, 2), (4, 8, 2), (2, 4, 4)])
def test_dense_window_kernel_matches_sdpa_row_by_row_bf16(batch, kv_heads, rows):
    """A dense layer's window on the GPU in bf16: 32 query heads, head dim 128, 32K keys, causal
    rows at the end of the cache, the last batch row left-padded; the kernel path is taken."""
    from retro_compile.kernels.op import dense_window_kernel_applies
    from retro_compile.kernels.reference import sdpa_row_by_row

    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    length = 32768
    q = torch.randn(batch, 32, rows, 128, **kw)
    k, v = (torch.randn(batch, kv_heads, length, 128, **kw) for _ in range(2))
    keys, ends = torch.arange(length, device="cuda"), torch.arange(length - rows, length, device="cuda")
    mask = (keys[None, :] <= ends[:, None]).expand(batch, 1, rows, length).clone()
    mask[-1, :, :, :1000] = False
    assert dense_window_kernel_applies(q, k, v, mask, True)
    got = torch.ops.retro.dense_window(q, k, v, mask, None, True)
    want = sdpa_row_by_row(q.float(), k.float(), v.float(), mask, enable_gqa=True)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_inductor_inlines_the_triton_kernels():
    """Under torch.compile the op's body is traced: its Triton kernels appear in Inductor's code,
    and a decode step's summary refresh runs inside scoring, with no launch of its own."""
    from torch._inductor.utils import run_and_get_code

    from retro_compile.bench import op_case
    from retro_compile.kernels.op import retro_attention

    state, params, inputs = op_case(1, 131072, 2)  # 8192 pages: the selection runs in two stages

    def step(q, k, v, mask):
        return retro_attention(q, k, v, mask, state, params)

    expected = step(*inputs)
    state, params, inputs = op_case(1, 131072, 2)
    got, code = run_and_get_code(torch.compile(step, fullgraph=True), *inputs)
    torch.testing.assert_close(got, expected)
    source = "\n".join(code)
    for kernel in ("_page_scores_kernel", "_top_pages_kernel", "_window_attention_kernel", "_merge_window_kernel"):
        assert kernel in source, kernel
    assert "def _summarize_pages_kernel(" not in source  # the refresh runs inside the scoring launch


@pytest.mark.parametrize("family", ["qwen2-sliding", "gemma3", "lfm2", "bamba"])
def test_sliding_window_and_hybrid_families_with_cuda_graphs_match_untouched(family):
    """A sliding/global mix, or recurrent layers beside attention, on CUDA with the driver's CUDA
    graph: full budget gives the untouched model's tokens (batch 2, left padding), and a second
    request (its recurrent states zeroed in place) replays without recompiling."""
    from .test_model_matrix import build

    model = build(family).cuda()
    ids, mask = prompts(2, 40, pad=(0, 5))
    kw = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, do_sample=False, pad_token_id=0)
    expected = model.generate(**kw)
    config = RetroConfig(mode="retro", budget=128, page_size=16, dense_layers=1, max_context=128)
    compiled = retro_compile(copy.deepcopy(model), config, mode="reduce-overhead")
    assert torch.equal(compiled.generate(**kw), expected)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(compiled.generate(**kw), expected)


def test_continuous_batching_on_cuda_matches_untouched_and_generate_alone():
    """Continuous batching with the op's kernel stages, eagerly: at full budget the untouched
    model's continuous batching; at a small budget each request as it decodes alone through
    generate() (Inductor and CUDA graphs)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = tiny_model("llama").cuda()
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (37, 90, 21, 64)]
    gen = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cache = ContinuousBatchingConfig(page_size=16, num_blocks=32, max_batch_tokens=64)

    def served(m) -> list[list[int]]:
        out = m.generate_batch(inputs=inputs, generation_config=gen, continuous_batching_config=cache)
        assert all(o.error is None for o in out.values()), [o.error for o in out.values()]
        return [out[f"req_{i}"].generated_tokens for i in range(len(inputs))]

    full = RetroConfig(mode="retro", budget=128, page_size=16, dense_layers=1, max_context=128)
    assert served(retro_compile(copy.deepcopy(model), full)) == served(model)
    small = retro_compile(copy.deepcopy(model), RetroConfig(mode="retro", budget=32, page_size=16, dense_layers=1,
                                                            max_context=128))
    alone = [small.generate(input_ids=torch.tensor([p]).cuda(), max_new_tokens=12, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in inputs]
    assert served(small) == alone
