"""End-to-end decoding benchmark: ``python -m retro_compile.bench e2e``.

A Llama-3.1-8B-shaped model (32 layers, 32 query / 8 KV heads, head dim 128, vocab 128256) with
random bf16 weights built on the GPU (speed does not depend on the weights), random prompts, one
static cache of ``context`` positions for every configuration, everything through ``generate()``:

* ``stock``: transformers' own SDPA attention (it repeats the KV heads), its static cache and its
  compiled decode step (``CompileConfig(mode="reduce-overhead")``);
* ``dense``: the same, with grouped SDPA (``enable_gqa``, no repeated KV heads) and no L x L
  prefill mask: the strong dense baseline that speedups are claimed against;
* ``driver-dense``: ``retro_compile(mode="dense")``: this package's decode driver and CUDA graph
  with dense attention, which separates what the driver saves from what sparsity saves;
* ``quest``, ``retro-w2``, ``retro-w4``: ``retro_compile`` with a 2048-token budget.

Each (configuration, batch, context) runs in a process of its own, under a time limit, and its row
is added to the JSON as soon as it ends. Per row: decode ms/token and tokens/s (token timestamps
from a streamer: generate() synchronises on every token), time to first token, peak GPU memory,
warm-up (compile) time with torch.compile's own split of it by phase and, with ``--profile``, the
device time of a decode step split into matrix products, attention and other kernels (the rest of a
step's wall time is host time between graph replays). ``--shape smoke`` runs a tiny model on the
CPU (CI's smoke test).

Every configuration compiles into empty compile caches of its own (Inductor's and Triton's), so its
warm-up is what a new user's first request pays, whatever ran on the machine before.
``--second-process`` then runs its warm-up once more in a new process over those caches: what a
later process (a restarted server) pays.

``--tp N`` runs each configuration tensor-parallel over N GPUs of one host (N processes under
``torch.distributed.run``, NCCL; gloo with ``--device cpu``): the random weights are saved once as a
checkpoint and loaded with transformers' ``tp_plan="auto"``, as a user loads a sharded model.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import calculate_time_spent, counters
from transformers.generation.streamers import BaseStreamer

from .config import SUMMARIES, RetroConfig

log = logging.getLogger("retro_compile.bench.e2e")

SHAPES = {
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "smoke": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
}
MODES = ("stock", "dense", "driver-dense", "quest", "retro-w2", "retro-w4")
SPARSE_MODES = ("quest", "retro-w2", "retro-w4")  # the modes a budget applies to
HEADROOM = 128  # cache positions left after the prompt: new tokens, and replays of the recorded step
KERNEL_KINDS = {  # substrings of kernel names, first match wins
    "attention": ("flash", "fmha", "attention", "attn", "_page_scores", "_page_candidates", "_top_pages",
                  "_summarize_pages", "_merge_window", "_window_attention"),
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90_", "cublas"),
}


# ------------------------------------------------------------------------------------------------
# One configuration (runs in its own process)
# ------------------------------------------------------------------------------------------------
def build_model(shape: str, context: int, device: str, tp: int = 1):
    """The random model; with ``tp > 1`` (inside a process group) sharded over the group by
    transformers' ``tp_plan="auto"`` from a checkpoint that rank 0 saves once."""
    from transformers import DistributedConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=context, tie_word_embeddings=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    if tp > 1:
        import torch.distributed as dist

        digest = hashlib.sha1(json.dumps(SHAPES[shape], sort_keys=True).encode()).hexdigest()[:8]  # a changed shape saves anew
        checkpoint = Path(tempfile.gettempdir()) / f"retro-compile-bench-{shape}-{digest}-{str(dtype).split('.')[-1]}"
        if dist.get_rank() == 0 and not checkpoint.exists():
            log.info("saving the random weights once, for every rank to load sharded: %s", checkpoint)
            partial = checkpoint.with_name(checkpoint.name + ".partial")
            with torch.device(device):
                LlamaForCausalLM._from_config(config, dtype=dtype).save_pretrained(partial)
            partial.rename(checkpoint)  # whole, or not there
            if device == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()
        log.info("rank %d: loading its shard (tp_plan='auto')", dist.get_rank())
        model = LlamaForCausalLM.from_pretrained(checkpoint, distributed_config=DistributedConfig(tp_plan="auto"),
                                                 dtype=dtype, max_position_embeddings=context).eval()
    else:
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # decode exactly the requested number of tokens
    model.generation_config.pad_token_id = 0
    return model


def prepare(model, mode: str, context: int, budget: int, batch: int, prefill_tokens: int, summaries: str = "exact"):
    """(model ready for generate, extra generate kwargs) for ``mode``.

    A prompt longer than ``prefill_tokens`` (summed over the batch) is prefilled in chunks of
    ``prefill_tokens // batch`` positions on every side: transformers' ``prefill_chunk_size`` for
    stock and dense, ``RetroConfig.prefill_tokens`` for this package's driver.
    """
    from transformers.generation import CompileConfig

    from . import retro_compile
    from .integrations import hf

    if mode in ("stock", "dense"):
        if mode == "dense":
            hf.register_attention()
            model.set_attn_implementation(hf.ATTENTION_NAME)
        else:
            model.set_attn_implementation("sdpa")
        cache = hf.static_cache(model, batch, context, model.device)
        model.generation_config.compile_config = CompileConfig(mode="reduce-overhead")
        if batch * (context - HEADROOM) > prefill_tokens:
            model.generation_config.prefill_chunk_size = prefill_tokens // batch
            prefill_eagerly(model)
        return model, {hf.cache_argument(model): cache}
    common = dict(max_context=context, prefill_tokens=prefill_tokens, summaries=summaries)
    config = {
        "driver-dense": RetroConfig(mode="dense", **common),
        "quest": RetroConfig(mode="quest", budget=budget, **common),
        "retro-w2": RetroConfig(mode="retro", window=2, budget=budget, **common),
        "retro-w4": RetroConfig(mode="retro", window=4, budget=budget, **common),
    }[mode]
    return retro_compile(model, config), {}


def prefill_eagerly(model) -> None:
    """Run transformers' chunked prefill without its compiled forward, as its one-piece prefill runs.

    transformers sends each prefill chunk through the compiled call, and with
    ``mode="reduce-overhead"`` every chunk length records a CUDA graph of its own: at B=4/128K those
    graphs' memory pools (52 GiB measured) do not fit beside the 64 GiB cache, and the dense baseline
    could not run at all. The decode steps keep the compiled call.
    """
    from transformers import GenerationConfig

    prefill = model._prefill

    def run(*args, **kwargs):
        config = next(a for a in (*args, *kwargs.values()) if isinstance(a, GenerationConfig))
        saved = config.disable_compile
        config.disable_compile = True
        try:
            return prefill(*args, **kwargs)
        finally:
            config.disable_compile = saved

    model._prefill = run


class TokenClock(BaseStreamer):
    """A streamer that timestamps every token generate() emits (the first ``put`` is the prompt).

    generate() copies each new token to the host before calling ``put``, so a timestamp is taken
    after the step's device work is done. Optionally starts a profiler once the first token is out
    and stops it at the end, so that it sees decode steps only.
    """

    def __init__(self, profiler=None) -> None:
        self.times: list[float] = []
        self.profiler = profiler

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if self.profiler is not None and len(self.times) == 2:
            self.profiler.start()

    def end(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()


class GraphCounter:
    """Counts CUDA graph recordings and replays (Inductor's and the driver's alike) while active."""

    def __enter__(self) -> "GraphCounter":
        self.captures = self.replays = 0
        graph = torch.cuda.CUDAGraph
        self._saved = graph.capture_begin, graph.replay
        counter = self

        def capture_begin(self, *args, **kwargs):
            counter.captures += 1
            return counter._saved[0](self, *args, **kwargs)

        def replay(self, *args, **kwargs):
            counter.replays += 1
            return counter._saved[1](self, *args, **kwargs)

        graph.capture_begin, graph.replay = capture_begin, replay
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.replay = self._saved


def timed_generate(model, ids, kwargs, new_tokens: int, profiler=None) -> TokenClock:
    clock = TokenClock(profiler)
    for value in kwargs.values():
        if hasattr(value, "reset"):
            value.reset()  # a static cache of the stock path starts every request empty
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       streamer=clock, **kwargs)
    return clock


def kernel_breakdown(profiler, steps: int) -> dict[str, float]:
    """Device milliseconds per decode step, by kind of kernel, from a profile of ``steps`` steps."""
    totals = dict.fromkeys(("matmul", "attention", "other"), 0.0)
    kernels = []
    for event in profiler.key_averages():
        device_us = event.self_device_time_total
        if not device_us:
            continue
        name = event.key.lower()
        kind = next((k for k, marks in KERNEL_KINDS.items() if any(m in name for m in marks)), "other")
        totals[kind] += device_us
        kernels.append((device_us / 1000.0 / steps, event.key[:80], event.count / steps))
    row = {f"step_{kind}_ms": total / 1000.0 / steps for kind, total in totals.items()}
    # [name, ms per step, launches per step] of the 30 costliest kernels
    row["step_top_kernels_ms"] = [[name, round(ms, 4), round(calls, 2)]
                                  for ms, name, calls in sorted(kernels, reverse=True)[:30]]
    return row


def run_one(args) -> dict:
    """Build, warm up and time one configuration; returns its row."""
    from .integrations import hf

    device = args.device
    began = time.perf_counter()
    phase = lambda name: log.info("[%s B=%d %d, %.0f s] %s", args.mode, args.batch, args.context,  # noqa: E731
                                  time.perf_counter() - began, name)
    row = dict(mode=args.mode, batch=args.batch, context=args.context, budget=args.budget,
               prefill_tokens=args.prefill_tokens, tp=args.tp, summaries=args.summaries)
    phase("building the model")
    model = build_model(args.shape, args.context, device, args.tp)
    phase("preparing it")
    row["model_tp_size"] = hf.tp_size(model)  # what transformers sharded it over
    model, kwargs = prepare(model, args.mode, args.context, args.budget, args.batch, args.prefill_tokens,
                            args.summaries)
    prompt = args.context - HEADROOM
    ids = torch.randint(1, SHAPES[args.shape]["vocab_size"], (args.batch, prompt),
                        generator=torch.Generator().manual_seed(1)).to(device)
    warmup_prompt = args.warmup_prompt
    if warmup_prompt and args.batch * prompt > args.prefill_tokens:
        warmup_prompt += args.prefill_tokens // args.batch  # two chunks: the first, and one that follows it
    warmup_ids = ids[:, -warmup_prompt:] if warmup_prompt else ids
    phase(f"warm-up request ({warmup_ids.shape[1]} prompt tokens; compiles)")
    start = time.perf_counter()
    timed_generate(model, warmup_ids, kwargs, args.warmup_tokens)  # compiles prefill and decode, records graphs
    row["warmup_s"] = time.perf_counter() - start
    row["warmup_by_phase_s"] = {name: round(seconds, 2) for name, seconds in calculate_time_spent().items()}
    if args.warmup_only:
        return row
    phase(f"{args.runs} timed request(s)")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graphs_compiled = counters["stats"]["unique_graphs"]
    with GraphCounter() as graphs:
        runs = [timed_generate(model, ids, kwargs, args.new_tokens) for _ in range(args.runs)]
    row["compiles_in_timed_runs"] = counters["stats"]["unique_graphs"] - graphs_compiled
    if device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        decode_steps = args.runs * (args.new_tokens - 1)
        row.update(graph_captures_in_timed_runs=graphs.captures, graph_replays_per_decode_step=graphs.replays / decode_steps)
    ttft = [c.times[1] - c.times[0] for c in runs]
    per_token = [(c.times[-1] - c.times[1]) / (len(c.times) - 2) for c in runs]
    intervals = [b - a for c in runs for a, b in zip(c.times[1:], c.times[2:])]
    row.update(ttft_s=statistics.median(ttft), decode_ms=1000 * statistics.median(per_token),
               decode_interval_median_ms=1000 * statistics.median(intervals), runs=args.runs,
               new_tokens=args.new_tokens, prompt=prompt)
    row["tokens_per_s"] = args.batch * 1000.0 / row["decode_ms"]
    if not args.warmup_prompt:
        row["compile_s"] = max(0.0, row["warmup_s"] - row["ttft_s"])
    row["warmup_prompt"] = warmup_ids.shape[1]
    store = getattr(model, "retro_state", None)
    if store is not None:
        row["state_gib"] = store.nbytes / 2**30
    phase("timed")
    if args.profile and device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CUDA])
        clock = timed_generate(model, ids, kwargs, 17, profiler)
        row.update(kernel_breakdown(profiler, len(clock.times) - 2))
    return row


# ------------------------------------------------------------------------------------------------
# The sweep (parent process)
# ------------------------------------------------------------------------------------------------
def targets(batch: int, context: int) -> float | None:
    """Decode tokens/s over the strong dense baseline that the project aims for."""
    return {(1, 32768): 1.1, (1, 131072): 1.6, (4, 131072): 3.0}.get((batch, context))


def label(row: dict) -> str:
    """A row's configuration: its mode, "int8" for int8 page summaries, and a sparse mode's budget
    where it is not the default (rows of two budgets are two configurations, not one replacing the
    other in an appended sweep)."""
    name = row["mode"] + (" int8" if row.get("summaries") == "int8" else "")
    budget = row.get("budget", RetroConfig.budget)
    return name + (f" @{budget}" if row["mode"] in SPARSE_MODES and budget != RetroConfig.budget else "")


def shape_of(row: dict) -> tuple[int, int, int]:
    """(batch, context, tensor-parallel size): rows of one shape are compared with each other."""
    return row["batch"], row["context"], row.get("tp", 1)


def summarize(rows: list[dict]) -> None:
    """Each row's speed relative to the dense baselines of the same shape (:func:`shape_of`), in place."""
    for row in rows:
        for base in ("stock", "dense", "driver-dense"):
            ref = next((r for r in rows if r["mode"] == base and shape_of(r) == shape_of(row) and "decode_ms" in r), None)
            if ref is not None and "decode_ms" in row:
                row[f"speedup_vs_{base}"] = ref["decode_ms"] / row["decode_ms"]
            if ref is not None and "ttft_s" in row:
                row[f"ttft_vs_{base}"] = row["ttft_s"] / ref["ttft_s"]
            if ref is not None and "warmup_s" in row:
                row[f"warmup_vs_{base}"] = row["warmup_s"] / ref["warmup_s"]
        single_gpu = row.get("tp", 1) == 1  # the targets are for one GPU
        row["target_vs_dense"] = targets(row["batch"], row["context"]) if row["mode"] in ("quest", "retro-w2") and single_gpu else None


def launcher(tp: int) -> list[str]:
    """The command that starts one configuration's process, or its ``tp`` processes."""
    if tp == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp)]


def run_configuration(command: list[str], caches: str, timeout: int, mode: str) -> dict:
    """Run one configuration's ``command`` with the compile caches in the folder ``caches``; its row,
    or ``{"error": ...}`` with the last phase it reached and its last words."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(caches, "triton")}
        # A session of its own, so that a timeout ends the launcher's workers too, not the launcher alone.
        child = subprocess.Popen([*command, "--row-out", str(result)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        try:
            said, _ = child.communicate(timeout=timeout)
            error = None if child.returncode == 0 and result.exists() else f"exit status {child.returncode}"
        except subprocess.TimeoutExpired:  # what it said shows the phase it reached
            os.killpg(child.pid, signal.SIGKILL)
            said, _ = child.communicate()
            error = f"timed out after {timeout} s"
        sys.stderr.write(said)  # the configuration's own log, into the sweep's
        if error is None:
            return json.loads(result.read_text())
    lines = said.strip().splitlines()
    detail = " | ".join([line for line in lines if line.startswith(f"[{mode} ")][-1:] + lines[-3:])
    return dict(error=f"{error}: {detail[-500:]}")


def sweep(args) -> list[dict]:
    from tqdm.auto import tqdm

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if args.append and out.exists() else {}
    rows = previous.get("results", [])
    meta = {**previous.get("meta", {}),  # an appended sweep keeps the notes on the rows it keeps
            **dict(shape=args.shape, device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                   torch=torch.__version__, budget=args.budget, new_tokens=args.new_tokens, runs=args.runs, tp=args.tp)}
    meta["invocations"] = [*meta.get("invocations", []), args.invocation]
    import transformers

    meta["transformers"] = transformers.__version__
    cases = [(b, c, m) for b in args.batches for c in args.contexts for m in args.modes]
    for batch, context, mode in tqdm(cases, desc="end-to-end benchmark"):
        with tempfile.TemporaryDirectory() as caches:
            command = [*launcher(args.tp), "-m", "retro_compile.bench", "e2e", "--one", mode, "--tp", str(args.tp),
                       "--batches", str(batch), "--contexts", str(context), "--shape", args.shape, "--device", args.device,
                       "--budget", str(args.budget), "--prefill-tokens", str(args.prefill_tokens),
                       "--new-tokens", str(args.new_tokens), "--runs", str(args.runs),
                       "--warmup-tokens", str(args.warmup_tokens), "--warmup-prompt", str(args.warmup_prompt),
                       "--timeout", str(args.timeout), "--summaries", args.summaries]
            if args.profile:
                command.append("--profile")
            row = run_configuration(command, caches, args.timeout, mode)
            if args.second_process and "error" not in row:
                again = run_configuration([*command, "--warmup-only"], caches, args.timeout, mode)
                row["second_process"] = {k: again[k] for k in ("warmup_s", "warmup_by_phase_s", "error") if k in again}
        row = dict(mode=mode, batch=batch, context=context, budget=args.budget, tp=args.tp, summaries=args.summaries) | row
        rows = [r for r in rows if (label(r), *shape_of(r)) != (label(row), batch, context, args.tp)] + [row]
        summarize(rows)
        log.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))  # after every configuration
    plot(rows, out.with_suffix(".png"))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from .eval.plot import grouped_bars

    shapes = sorted({(r["batch"], r["context"]) for r in rows})
    modes = sorted({label(r) for r in rows}, key=lambda m: (MODES.index(m.split()[0]), m))
    throughput = {(label(r), r["batch"], r["context"]): r.get("tokens_per_s", 0.0) for r in rows}
    grouped_bars(path, [f"B={b}\n{c // 1024}K" for b, c in shapes],
                 {m: [throughput.get((m, *shape), 0.0) for shape in shapes] for m in modes},
                 "decode tokens/s (all rows of the batch)",
                 title="generate() on a Llama-3.1-8B-shaped model: decode throughput")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072],
                   help="static cache lengths; the prompt fills all but the last 128 positions")
    p.add_argument("--out", type=Path, default=Path("results/bench_e2e_h200.json"), help="JSON path; the PNG goes beside it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the default where there is one) or cpu (with --shape smoke)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b",
                   help="llama-8b: the Llama-3.1-8B shape; smoke: a 3-layer toy for a CPU check")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="configurations (default: all)")
    p.add_argument("--budget", type=int, default=2048, help="sparse budget in tokens")
    p.add_argument("--prefill-tokens", type=int, default=RetroConfig.prefill_tokens,
                   help="prompt tokens (summed over the batch) per prefill forward; longer prompts are chunked on every side")
    p.add_argument("--summaries", choices=SUMMARIES, default=RetroConfig.summaries,
                   help="how quest and retro store page summaries (RetroConfig.summaries)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per timed request")
    p.add_argument("--warmup-tokens", type=int, default=8, help="tokens of the warm-up request (compiles)")
    p.add_argument("--warmup-prompt", type=int, default=0,
                   help="prompt tokens of the warm-up request (0: the full prompt); a short one saves a long prefill, "
                        "and the timed requests report any recompilation it left them (compiles_in_timed_runs)")
    p.add_argument("--runs", type=int, default=2, help="timed requests per configuration (medians reported)")
    p.add_argument("--timeout", type=int, default=480, help="seconds allowed per configuration")
    p.add_argument("--profile", action="store_true", help="also split a decode step's device time by kernel kind")
    p.add_argument("--second-process", action="store_true",
                   help="also time each configuration's warm-up in a second process over the first's compile caches")
    p.add_argument("--warmup-only", action="store_true", help=argparse.SUPPRESS)  # the second process (internal)
    p.add_argument("--append", action="store_true", help="keep the rows already in --out (a sweep in several runs)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel processes per configuration (GPUs of one host; gloo processes with --device cpu)")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # run one configuration (internal)
    p.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)


def run_sharded(args) -> None:
    """One rank of a tensor-parallel configuration (under torch.distributed.run); rank 0 writes the row."""
    import torch.distributed as dist

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        if dist.get_world_size() != args.tp:
            raise SystemExit(f"--tp={args.tp} but {dist.get_world_size()} processes were launched")
        row = run_one(args)
        if dist.get_rank() == 0:
            args.row_out.write_text(json.dumps(row))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    if args.device == "cuda":
        # On two H200s (torch 2.11), destroy_process_group() hung for minutes after every configuration,
        # the dense baseline's (transformers' own compiled decode step) included: recorded CUDA graphs
        # still hold the NCCL communicators. Every rank is past the barrier and the row is written:
        # leave without tearing down.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


def main(args) -> None:
    if args.tp < 1:
        raise SystemExit(f"--tp={args.tp} must be at least 1")
    if args.one:
        args.mode, args.batch, args.context = args.one, args.batches[0], args.contexts[0]
        faulthandler.dump_traceback_later(0.95 * args.timeout, exit=True)  # about to be stopped: say where, in every thread
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("the end-to-end benchmark on --device cuda needs a CUDA device")
        if args.tp > 1:
            run_sharded(args)
        else:
            args.row_out.write_text(json.dumps(run_one(args)))
        return
    if any(c <= HEADROOM for c in args.contexts):
        raise SystemExit(f"--contexts must exceed {HEADROOM} (the positions left for decoding)")
    sweep(args)
