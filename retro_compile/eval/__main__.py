"""``python -m retro_compile.eval ppl``: long-decode perplexity per mode and budget, written as JSON.

    python -m retro_compile.eval ppl --budgets 64 128 256 512 --modes dense quest retro \\
        --window 2 --context 4096 --prefill 512 --passages 3 --out results/ppl.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from .. import RetroConfig, retro_compile
from ..data import DEFAULT_MODEL, load_model, passage
from .ppl import perplexity, teacher_forced_nll

log = logging.getLogger("retro_compile.eval")
BOOKS = ("hamlet", "lear", "macbeth", "othello", "tempest", "twelfth_night")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m retro_compile.eval")
    p.add_argument("task", choices=["ppl"])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--modes", nargs="+", default=["dense", "quest", "retro"], choices=["dense", "quest", "retro"])
    p.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 256, 512])
    p.add_argument("--window", type=int, nargs="+", default=[2], help="retro windows to run")
    p.add_argument("--context", type=int, default=4096, help="tokens per passage (prefill + decoded)")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--passages", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("results/ppl.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("retro_compile.passes.rewrite").setLevel(logging.WARNING)

    base, tokenizer = load_model(args.model, device=args.device)
    passages = [torch.tensor([passage(tokenizer, book, args.context, offset_tokens=1000)], device=args.device)
                for book in BOOKS[:args.passages]]
    max_context = -(-(args.context + 8) // 256) * 256
    runs = [("dense", None, 1)] if "dense" in args.modes else []
    runs += [(mode, budget, w) for budget in args.budgets for mode in args.modes if mode != "dense"
             for w in (args.window if mode == "retro" else [1])]
    results = []
    for mode, budget, window in runs:
        config = RetroConfig(mode=mode, window=window, budget=budget or 2048, max_context=max_context)
        model = retro_compile(copy.deepcopy(base), config)
        start = time.perf_counter()
        ppls = [perplexity(teacher_forced_nll(model, ids, args.prefill, progress=True)) for ids in passages]
        row = dict(mode=mode, budget=budget, window=window, ppl=sum(ppls) / len(ppls), ppl_per_passage=ppls,
                   seconds=time.perf_counter() - start)
        log.info("%s budget=%s w=%d: ppl %.3f", mode, budget, window, row["ppl"])
        results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    defaults = RetroConfig()
    setup = dict(model=args.model, context=args.context, prefill=args.prefill, books=list(BOOKS[:args.passages]),
                 device=args.device, page_size=defaults.page_size, dense_layers=defaults.dense_layers)
    args.out.write_text(json.dumps(dict(setup=setup, results=results), indent=2))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
