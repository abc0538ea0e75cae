"""GPU-only checks (skipped without CUDA): the op on CUDA tensors, Inductor + CUDA graphs end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from retro_compile import RetroConfig, retro_compile

from .hf_models import prompts, tiny_model
from .sequences import Problem, dense_rows, make_problem, run
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


def test_generate_with_cuda_graphs_matches_dense_and_never_recompiles():
    model = tiny_model("llama").cuda()
    ids, mask = prompts(2, 40, pad=(0, 5))
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0)
    expected = model.generate(**kw)
    config = RetroConfig(mode="retro", budget=128, page_size=16, dense_layers=1, max_context=128)
    compiled = retro_compile(copy.deepcopy(model), config, mode="reduce-overhead")
    assert torch.equal(compiled.generate(**kw), expected)
    with torch.compiler.set_stance("fail_on_recompile"):  # a second request: 64 steps, no new graph
        assert torch.equal(compiled.generate(**kw), expected)


def test_generate_small_budget_runs_on_cuda():
    model = tiny_model("llama").cuda()
    ids, mask = prompts(2, 90, pad=(0, 5))
    config = RetroConfig(mode="retro", budget=32, page_size=16, dense_layers=1, max_context=128)
    compiled = retro_compile(copy.deepcopy(model), config, mode="reduce-overhead")
    out = compiled.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=20, do_sample=False,
                            pad_token_id=0)
    assert out.shape == (2, 110)
