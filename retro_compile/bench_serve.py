"""Served throughput under continuous batching: ``python -m retro_compile.bench serve``.

The Llama-3.1-8B-shaped model of the end-to-end benchmark (:func:`.bench_e2e.build_model`)
behind transformers' ``ContinuousBatchingManager`` (what ``transformers serve`` runs), loaded with
``--requests`` requests at once, their prompts drawn between ``--min-context`` and
``--max-context`` tokens (less the new tokens; seeded, the same for every configuration), each
asking ``--new-tokens`` tokens. Configurations:

* ``dense``: the untouched model under continuous batching with SDPA, transformers' path without
  flash attention;
* ``quest``, ``retro-w2``: ``retro_compile`` with a ``--budget``-token budget.

Every configuration gets the same paged cache (``--page-size`` blocks, enough of them for every
request at once, ``--batch-tokens`` tokens a forward) and runs in a process of its own under
``--timeout``; its row joins the JSON as soon as it ends. Per row: wall time from the first
request to the last answer, generated tokens/s over it, decode tokens/s once every request has
its first token, and per request (median and 90th percentile): time to first token, latency to
the last token, and the interval between tokens. A short burst first (``--warmup-requests``)
runs each configuration's first-call work outside the timing. ``--profile-steps N`` then serves
the load once more and profiles N decode steps once every request decodes (:func:`profile_decode`).
``--shape smoke`` runs a tiny model on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .bench_e2e import SHAPES, build_model, run_configuration
from .config import RetroConfig

log = logging.getLogger("retro_compile.bench.serve")

MODES = ("dense", "quest", "retro-w2")


def request_prompts(count: int, lo: int, hi: int, new_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``count`` random prompts whose lengths plus ``new_tokens`` lie in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo - new_tokens, hi - new_tokens + 1, (count,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return dict(median=statistics.median(ordered), p90=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))])


@contextlib.contextmanager
def running_manager(model, new_tokens: int, cache: dict):
    """A started ``ContinuousBatchingManager`` of ``model`` with the paged cache ``cache``, greedy,
    stopping at ``new_tokens``; stopped on exit."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=generation,
                                             continuous_batching_config=ContinuousBatchingConfig(**cache))
    manager.start()
    try:
        yield manager
    finally:
        manager.stop(block=True, timeout=60)


def next_output(manager):
    output = manager.get_result(timeout=600)
    if output is None:
        raise RuntimeError("the manager stopped answering")
    if output.error is not None:
        raise RuntimeError(f"request {output.request_id} failed: {output.error}")
    return output


def serve(model, prompts: list[list[int]], new_tokens: int, cache: dict) -> list:
    """Every prompt added at once to a started manager; the finished outputs, in the prompts' order."""
    with running_manager(model, new_tokens, cache) as manager:
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=new_tokens, record_timestamps=True)
               for i, p in enumerate(prompts)]
        finished = {}
        while len(finished) < len(ids):
            output = next_output(manager)
            if output.is_finished():
                finished[output.request_id] = output
    return [finished[i] for i in ids]


def profile_decode(model, prompts: list[list[int]], new_tokens: int, cache: dict, steps: int) -> dict:
    """Where a decode step's time goes once every request decodes: the same load again, streamed,
    under ``torch.profiler`` (every thread: the manager steps in its own) from the moment every
    request has its first token for ``steps`` steps, or until the first request finishes.

    Per step: wall time, device time by kind of kernel (:func:`.bench_e2e.kernel_breakdown`), the
    host time inside this package's ranges (``serving.PROFILE_RANGES``, children included) and the
    operators with the most host time of their own."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    from .bench_e2e import kernel_breakdown
    from .integrations.hf.serving import PROFILE_RANGES

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities, experimental_config=_ExperimentalConfig(profile_all_threads=True))
    generated: dict[str, int] = {}
    began = ended = None
    with running_manager(model, new_tokens, cache) as manager:
        ids = [manager.add_request(p, request_id=f"p{i}", max_new_tokens=new_tokens, streaming=True)
               for i, p in enumerate(prompts)]
        finished: set[str] = set()
        try:
            while len(finished) < len(ids):
                output = next_output(manager)
                generated[output.request_id] = len(output.generated_tokens)
                if output.is_finished():
                    finished.add(output.request_id)
                if began is None and len(generated) == len(ids) and not finished:
                    profiler.start()
                    began, first = time.perf_counter(), sum(generated.values())
                elif began is not None and ended is None:
                    decoded = sum(generated.values()) - first
                    if finished or decoded >= steps * len(ids):
                        profiler.stop()
                        ended, profiled = time.perf_counter(), decoded / len(ids)
        finally:
            if began is not None and ended is None:
                profiler.stop()
    if ended is None or profiled <= 0:
        raise RuntimeError(f"no decode step was profiled: ask for more than {new_tokens} new tokens")
    events = profiler.key_averages()
    own = {name: next((e.cpu_time_total / 1000.0 / profiled for e in events if e.key == label), 0.0)
           for name, label in PROFILE_RANGES.items()}
    host = sorted(((e.self_cpu_time_total / 1000.0 / profiled, e.key[:80], e.count / profiled) for e in events
                   if e.key not in PROFILE_RANGES.values()), reverse=True)[:20]
    return dict(profiled_steps=profiled, step_wall_ms=1000.0 * (ended - began) / profiled,
                **kernel_breakdown(profiler, profiled),
                **{f"step_host_{name}_ms": ms for name, ms in own.items()},
                step_top_host_ms=[[name, round(ms, 4), round(calls, 2)] for ms, name, calls in host])


def run_one(args) -> dict:
    """Build the model, warm the configuration up and time one load; returns its row."""
    from . import retro_compile

    began = time.perf_counter()
    phase = lambda name: log.info("[%s %d requests, %.0f s] %s", args.mode, args.requests,  # noqa: E731
                                  time.perf_counter() - began, name)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = request_prompts(args.requests, args.min_context, args.max_context, args.new_tokens, vocab)
    positions = sum(len(p) + args.new_tokens for p in prompts)
    cache = dict(page_size=args.page_size, max_batch_tokens=args.batch_tokens,
                 num_blocks=-(-positions // args.page_size) + 2 * args.requests, max_requests_per_batch=args.requests)
    phase("building the model")
    model = build_model(args.shape, args.max_context, args.device)
    if args.mode != "dense":
        config = RetroConfig(mode="quest" if args.mode == "quest" else "retro", budget=args.budget,
                             max_context=args.max_context)
        model = retro_compile(model, config)
    phase(f"warm-up: {args.warmup_requests} requests")
    longest = min(512, args.min_context)
    warmup = request_prompts(args.warmup_requests, longest // 2 + 4, longest, 4, vocab, seed=1)
    serve(model, warmup, 4, dict(cache, num_blocks=2 * args.warmup_requests * -(-longest // args.page_size)))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    phase(f"timed: {args.requests} requests, {positions} positions")
    outputs = serve(model, prompts, args.new_tokens, cache)
    start = min(o.created_time for o in outputs)
    end = max(o.timestamps[-1] for o in outputs)
    all_started = max(o.timestamps[0] for o in outputs)
    after = sum(1 for o in outputs for t in o.timestamps if t > all_started)
    intervals = [b - a for o in outputs for a, b in zip(o.timestamps, o.timestamps[1:])]
    row = dict(mode=args.mode, requests=args.requests, min_context=args.min_context, max_context=args.max_context,
               new_tokens=args.new_tokens, budget=args.budget, positions=positions,
               wall_s=end - start, tokens_per_s=len(outputs) * args.new_tokens / (end - start),
               decode_tokens_per_s=after / (end - all_started) if end > all_started else None,
               ttft_s=quantiles([o.timestamps[0] - o.created_time for o in outputs]),
               latency_s=quantiles([o.timestamps[-1] - o.created_time for o in outputs]),
               interval_ms=quantiles([1000 * i for i in intervals]))
    if args.device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    phase("timed")
    if args.profile_steps:
        phase(f"the load again, {args.profile_steps} decode steps profiled")
        row["profile"] = profile_decode(model, prompts, args.new_tokens, cache, args.profile_steps)
    return row


def sweep(args) -> list[dict]:
    from tqdm.auto import tqdm

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    import transformers

    meta = dict(shape=args.shape, device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                torch=torch.__version__, transformers=transformers.__version__, invocation=args.invocation)
    rows: list[dict] = []
    for requests in args.requests:
        for mode in tqdm(args.modes, desc=f"served load of {requests} requests"):
            with tempfile.TemporaryDirectory() as caches:
                command = [sys.executable, "-m", "retro_compile.bench", "serve", "--one", mode,
                           "--requests", str(requests), "--shape", args.shape, "--device", args.device,
                           "--min-context", str(args.min_context), "--max-context", str(args.max_context),
                           "--new-tokens", str(args.new_tokens), "--budget", str(args.budget),
                           "--page-size", str(args.page_size), "--batch-tokens", str(args.batch_tokens),
                           "--warmup-requests", str(args.warmup_requests), "--timeout", str(args.timeout),
                           "--profile-steps", str(args.profile_steps)]
                row = run_configuration(command, caches, args.timeout, mode)
            row = dict(mode=mode, requests=requests) | row
            dense = next((r for r in rows if r["mode"] == "dense" and r["requests"] == requests
                          and "tokens_per_s" in r), None)
            if dense is not None and "tokens_per_s" in row:
                row["throughput_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"]
            rows.append(row)
            log.info("%s", row)
            out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))  # after every configuration
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, nargs="+", default=[8, 16], help="requests in flight at once (one load each)")
    p.add_argument("--min-context", type=int, default=16384, help="shortest request (prompt plus new tokens)")
    p.add_argument("--max-context", type=int, default=65536, help="longest request (prompt plus new tokens)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each request asks for")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="configurations (default: all)")
    p.add_argument("--budget", type=int, default=2048, help="sparse budget in tokens")
    p.add_argument("--page-size", type=int, default=256, help="tokens a block of the paged cache holds")
    p.add_argument("--batch-tokens", type=int, default=8192, help="most tokens one forward call takes (prefill chunks)")
    p.add_argument("--warmup-requests", type=int, default=2, help="requests of the untimed first burst")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b",
                   help="llama-8b: the Llama-3.1-8B shape; smoke: a 3-layer toy for a CPU check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--timeout", type=int, default=540, help="seconds allowed per configuration")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the timed load, run it again and profile this many decode steps once every request "
                        "decodes (the row's 'profile': wall, device and host time a step)")
    p.add_argument("--out", type=Path, default=Path("results/bench_serve_h100.json"), help="JSON path")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # run one configuration (internal)
    p.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)


def main(args) -> None:
    if args.min_context > args.max_context or args.min_context <= args.new_tokens:
        raise SystemExit("--min-context must exceed --new-tokens and not exceed --max-context")
    if args.one:
        args.mode, args.requests = args.one, args.requests[0]
        faulthandler.dump_traceback_later(0.95 * args.timeout, exit=True)
        args.row_out.write_text(json.dumps(run_one(args)))
        return
    sweep(args)
