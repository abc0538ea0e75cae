"""Continuous batching on a ``retro_compile``d model: requests of different lengths, each decoded
with its own page selection and window, through transformers' ``generate_batch``.

SmolLM2-135M-Instruct on passages of four Shakespeare plays (600 to 1500 tokens), 24 new tokens
each, a 256-token budget. Each request's tokens are checked against that request alone through
``generate()``. About a minute on 2 CPU cores.

    python examples/continuous_batching.py
"""

from __future__ import annotations

import logging

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from retro_compile import RetroConfig, retro_compile
from retro_compile.data import BOOKS, load_model, passage

NEW_TOKENS = 24


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    model, tokenizer = load_model("smollm2")
    model = retro_compile(model, RetroConfig(mode="retro", budget=256, max_context=2048))
    prompts = [passage(tokenizer, book, tokens, offset_tokens=1000)
               for book, tokens in zip(BOOKS, (600, 1500, 900, 1200))]
    generation = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    outputs = model.generate_batch(inputs=prompts, generation_config=generation,
                                   continuous_batching_config=ContinuousBatchingConfig(page_size=64))
    for i, prompt in enumerate(prompts):
        served = outputs[f"req_{i}"].generated_tokens
        alone = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
        same = "same as alone" if served == alone else "DIFFERS from alone"
        print(f"{BOOKS[i]} ({len(prompt)} tokens, {same}): {tokenizer.decode(served)!r}")


if __name__ == "__main__":
    main()
