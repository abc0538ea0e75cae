"""The perplexity harness on a tiny random model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from retro_compile import RetroConfig, retro_compile
from retro_compile.eval.ppl import perplexity, teacher_forced_nll

from .hf_models import prompts, tiny_model


def test_dense_ppl_equals_one_forward_loss():
    model = tiny_model("llama", seed=9)
    ids, _ = prompts(1, 80, seed=10)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, 39:-1]
    direct = F.cross_entropy(logits.float(), ids[0, 40:], reduction="none")
    dense = retro_compile(copy.deepcopy(model), RetroConfig(mode="dense", max_context=128))
    nll = teacher_forced_nll(dense, ids, prefill=40)
    torch.testing.assert_close(nll, direct, atol=1e-4, rtol=1e-4)


def test_full_budget_ppl_is_the_same_in_every_mode():
    model = tiny_model("llama", seed=9)
    ids, _ = prompts(1, 80, seed=10)
    ppl = {}
    for mode in ("dense", "quest", "retro"):
        config = RetroConfig(mode=mode, budget=128, page_size=8, dense_layers=1, max_context=128)
        ppl[mode] = perplexity(teacher_forced_nll(retro_compile(copy.deepcopy(model), config), ids, prefill=40))
    assert ppl["quest"] == pytest.approx(ppl["dense"], rel=1e-4)
    assert ppl["retro"] == pytest.approx(ppl["dense"], rel=1e-4)


def test_small_budget_changes_ppl():
    model = tiny_model("llama", seed=9)
    ids, _ = prompts(1, 100, seed=10)
    dense = perplexity(teacher_forced_nll(retro_compile(copy.deepcopy(model), RetroConfig(mode="dense", max_context=128)),
                                          ids, prefill=40))
    config = RetroConfig(mode="quest", budget=16, page_size=8, dense_layers=1, max_context=128)
    quest = perplexity(teacher_forced_nll(retro_compile(copy.deepcopy(model), config), ids, prefill=40))
    assert quest != pytest.approx(dense, rel=1e-4)
