"""Host time per decode token of ``generate()`` through the driver, the decode step itself stubbed out.

    python benchmarks/host_time.py [--tokens 1024] [--runs 5]

On a GPU a decode step is one CUDA graph replay, so what the host does between replays
(transformers' generate loop and the driver) adds to every token. This times that part alone on
the CPU: a tiny random Llama is compiled by ``retro_compile``, then its decode step is replaced by
one that returns fixed logits. It times requests with the driver's ``create_masks_for_generate``
(no host-side mask for decode steps) and without it (transformers' own), alternately, then counts
the aten ops and device reads each issues per token.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import transformers

from retro_compile import RetroConfig, retro_compile
from retro_compile.integrations import hf

log = logging.getLogger("host_time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024, help="new tokens per request")
    p.add_argument("--runs", type=int, default=5, help="requests per variant (medians reported)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    vocab, context = 128, args.tokens + 128
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model = retro_compile(model, RetroConfig(mode="retro", budget=128, page_size=16, dense_layers=1,
                                             max_context=context))
    request = dict(input_ids=torch.randint(1, vocab, (1, 64)), attention_mask=torch.ones(1, 64, dtype=torch.long),
                   do_sample=False, pad_token_id=0)
    model.generate(**request, max_new_tokens=4)  # compiles the prefill and the step

    logits = torch.zeros(1, 1, vocab)

    def stub_step(driver: hf.DecodeWindowDriver, input_ids: torch.Tensor):
        driver.length += 1
        driver.steps += 1
        return hf.causal_lm_output(logits, driver.cache)

    hf.DecodeWindowDriver._decode = stub_step
    driver_masks = model.create_masks_for_generate

    def use_masks(variant: str) -> None:
        if variant == "driver":
            model.create_masks_for_generate = driver_masks
        elif "create_masks_for_generate" in vars(model):
            del model.create_masks_for_generate  # transformers' own, from the class or its module

    per_token: dict[str, list[float]] = {"driver": [], "transformers": []}
    for _ in range(args.runs):
        for variant in per_token:
            use_masks(variant)
            start = time.perf_counter()
            model.generate(**request, max_new_tokens=args.tokens + 1)
            per_token[variant].append((time.perf_counter() - start) / args.tokens * 1e3)
    for variant, times in per_token.items():
        log.info("%s masks: %.3f ms per token (median of %d; %s)", variant, statistics.median(times), args.runs,
                 ", ".join(f"{t:.3f}" for t in times))
    # What the host issues per token: on CUDA every aten op that computes is a launch, and every
    # _local_scalar_dense (a tensor read as a Python number) waits for the device.
    for variant in per_token:
        use_masks(variant)
        with torch.profiler.profile() as prof:
            model.generate(**request, max_new_tokens=args.tokens + 1)
        ops = [e.name for e in prof.events() if e.name.startswith("aten::")]
        log.info("%s masks: %.1f aten ops and %.2f device reads per token", variant, len(ops) / args.tokens,
                 ops.count("aten::_local_scalar_dense") / args.tokens)


if __name__ == "__main__":
    main()
