"""retro_compile on a tensor-parallel model: two CPU processes (gloo), the model sharded by its
``tp_plan``; every rank rewrites its own SDPA sites for its own heads and keeps its own state."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retro_compile import RetroConfig, retro_compile

from .hf_models import greedy_new_tokens, prompts, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "full": RetroConfig(mode="retro", budget=128, page_size=8, dense_layers=1, max_context=128),
    "retro-small": RetroConfig(mode="retro", budget=16, page_size=8, dense_layers=1, max_context=128),
    "quest-small": RetroConfig(mode="quest", budget=16, page_size=8, dense_layers=1, max_context=128),
}


@pytest.mark.slow
def test_two_ranks_give_the_single_process_tokens(tmp_path):
    """Full budget: the single-process untouched model's greedy tokens; small budgets: the
    single-process retro_compile run's tokens. Each rank holds half the KV heads, in its cache and
    in its decode state."""
    model = tiny_model("llama", seed=7)  # 4 query / 2 KV heads: one KV head per rank
    model.save_pretrained(tmp_path / "model")
    ids, mask = prompts(2, 40, pad=(0, 5), seed=8)
    new_tokens = 10
    expected = {"untouched": greedy_new_tokens(model, ids, mask, new_tokens).tolist()}
    for name, config in CONFIGS.items():
        expected[name] = greedy_new_tokens(retro_compile(copy.deepcopy(model), config), ids, mask, new_tokens).tolist()
    assert expected["full"] == expected["untouched"] and expected["retro-small"] != expected["untouched"]

    request = dict(ids=ids.tolist(), mask=mask.tolist(), new_tokens=new_tokens,
                   configs={name: dataclasses.asdict(config) for name, config in CONFIGS.items()})
    out = tmp_path / "ranks.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "tp_worker.py"), str(tmp_path / "model"), str(out), json.dumps(request)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for seen in ranks:
        assert seen["k_proj_local_rows"] == model.model.layers[0].self_attn.k_proj.weight.shape[0] // 2  # sharded
        assert seen["untouched"] == expected["untouched"]
        for name in CONFIGS:
            assert seen[name] == expected[name], name
            assert seen[f"{name}_state_kv_heads"] == [1]  # the rank's own KV head
