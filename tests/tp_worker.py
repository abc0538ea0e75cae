"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), launched by torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py MODEL_DIR OUT.json REQUEST_JSON

Loads the saved model with ``tp_plan="auto"`` (gloo on the CPU), decodes greedily untouched, with
``retro_compile`` at a full and at a small budget, and writes what it saw, per rank.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DistributedConfig

from retro_compile import RetroConfig, retro_compile


def load(model_dir: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_plan="auto"),
                                                 dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = load(model_dir)
    prompt = json.loads(sys.argv[3])
    ids, mask = torch.tensor(prompt["ids"]), torch.tensor(prompt["mask"])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=prompt["new_tokens"], do_sample=False, pad_token_id=0)
    seen = {"untouched": model.generate(**kw)[:, ids.shape[1]:].tolist()}
    weight = model.model.layers[0].self_attn.k_proj.weight
    seen["k_proj_local_rows"] = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
    for name, config in prompt["configs"].items():
        compiled = retro_compile(load(model_dir), RetroConfig(**config))  # a sharded model is not deep-copied
        seen[name] = compiled.generate(**kw)[:, ids.shape[1]:].tolist()
        seen[f"{name}_state_kv_heads"] = sorted({s.kmax.shape[1] for s in compiled.retro_state.states()})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
