"""Speed benchmarks. ``python -m retro_compile.bench op`` times one decode-attention step (GPU);
``python -m retro_compile.bench e2e`` times generate() end to end (:mod:`retro_compile.bench_e2e`).

Shape: Llama-3.1-8B heads (32 query, 8 KV, head dim 128), bf16, page 16, budget 2048 tokens,
for B in {1, 8} and contexts {8K, 32K, 128K}. Side by side in one run:

* ``dense``: ``F.scaled_dot_product_attention`` over the whole cache (enable_gqa, boolean mask);
* ``flex``: FlexAttention over a fixed block mask of the same number of keys (:func:`flex_case`),
  compiled by Inductor;
* ``quest``, ``retro w=2``, ``retro w=4``: the whole ``retro::attention`` decode step (query
  positions, summary refresh, scoring, top-k, attention, merge, state update) compiled by
  Inductor, which traces the op's body and fuses the small ops around its Triton kernels;
* ``quest layer``, ``retro w=2 layer``, ...: the same step as one layer of a ``retro_compile``'d
  decode graph runs it: the graph reduces the mask to the query positions once and hands them
  to every layer (``positions``), so a layer's step is the rest (``stage_positions_us`` is the
  once-a-graph part);
* ``bound``: bytes a sparse step must read (summaries, in the format ``--summaries`` names, +
  selected K/V) over the measured memory bandwidth (a large device-to-device copy's bytes read + written per second).

Every column is device time per step: 20 steps recorded in one CUDA graph, as a model's decode
graph records all its layers (:func:`_record`), medians of replays from ``triton.testing.do_bench``.
Writes JSON (and a PNG plot when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import SUMMARIES
from .kernels.op import compile_cache_keyed, retro_attention
from .kernels.masks import mask_positions
from .kernels.reference import SparseParams
from .state import StateShape, allocate

log = logging.getLogger("retro_compile.bench")
Q_HEADS, KV_HEADS, HEAD_DIM, PAGE, BUDGET = 32, 8, 128, 16, 2048
TARGETS_US = {(1, 32768): 15.0, (1, 131072): 20.0, (8, 131072): 100.0}  # the speed targets, per (B, context)
OP_MODES = {"quest": 1, "retro_w2": 2, "retro_w4": 4}  # the op's columns, by window


def _median_us(fn) -> float:
    from triton.testing import do_bench

    return 1000.0 * do_bench(fn, warmup=25, rep=100, return_mode="median")


STEPS_PER_GRAPH = 20


def _record(fn, inputs, compile: bool = True) -> torch.cuda.CUDAGraph:
    """``STEPS_PER_GRAPH`` calls of ``fn(*inputs)`` recorded in one CUDA graph, compiled by Inductor
    first (``compile``) or as they are.

    A model's decode graph holds every layer's step, so a replay's host-side cost (tens of
    microseconds) is spread over all of them; a graph of one step would time that cost instead of
    the GPU work.
    """
    step = fn
    if compile:
        torch._dynamo.reset()  # every case compiles afresh (and stays clear of the recompile limit)
        step = torch.compile(fn, fullgraph=True, dynamic=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), compile_cache_keyed():
        for _ in range(3):  # compile, autotune, warm up
            step(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(STEPS_PER_GRAPH):
            step(*inputs)
    return graph


def graph_us(fn, inputs, compile: bool = True) -> float:
    """Median device time of one ``fn(*inputs)``, from replays of :func:`_record`'s graph."""
    return _median_us(_record(fn, inputs, compile).replay) / STEPS_PER_GRAPH


def _op_step(state, params):
    """The decode step (inputs q, k, v, mask[, positions]). Without ``positions`` it reduces the
    mask to them itself; with them it runs as each layer of a ``retro_compile``'d graph does, the
    graph having computed them once for all its layers."""
    return lambda q, k, v, mask, positions=None: retro_attention(q, k, v, mask, state, params, positions=positions)


def copy_bandwidth() -> float:
    """Memory bandwidth, bytes/s: a 1 GiB device-to-device copy's bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (_median_us(lambda: dst.copy_(src)) * 1e-6)


def causal_mask(positions: torch.Tensor, batch: int, context: int) -> torch.Tensor:
    """(B, 1, rows, context) bool: row i sees every position up to ``positions[i]``."""
    allowed = torch.arange(context, device=positions.device) <= positions[:, None]
    return allowed.expand(batch, 1, *allowed.shape).contiguous()


def op_case(batch: int, context: int, window: int, seed: int = 0, summaries: str = "exact", device: str = "cuda",
            dtype: torch.dtype = torch.bfloat16):
    """(state, params, decode-step inputs) for the op at ``context`` cache positions, state built by
    a prefill, its summaries stored as ``summaries`` (``RetroConfig.summaries``); tensors on
    ``device`` in ``dtype`` (the benchmarks': CUDA, bf16)."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, **kw)
    v = torch.randn(batch, KV_HEADS, context, HEAD_DIM, **kw)
    q = torch.randn(batch, Q_HEADS, window + 1, HEAD_DIM, **kw)
    params = SparseParams(PAGE, BUDGET // PAGE, 0.0, 0, 1, window)
    state = allocate(StateShape.of_call(q, k, v, math.ceil(context / PAGE), window, summaries))
    prefill_rows = torch.arange(context - 2 * window - 1, context - window, device=device)
    retro_attention(q, k, v, causal_mask(prefill_rows, batch, context), state, params)
    q, mask = q[:, :, 1:].contiguous(), causal_mask(torch.arange(context - window, context, device=device), batch, context)
    return state, params, (q, k, v, mask)


def stage_inputs(state, params, inputs) -> SimpleNamespace:
    """What each heavy stage of a decode step takes, computed once by the stages before it."""
    from .kernels import decode
    from .kernels import masks
    from .kernels import reference as ref

    q, k, v, mask = inputs
    allowed, _ = masks.mask_to_allowed(mask, False, q.shape[0], q.shape[2], k.shape[2], q.device)
    position = masks.query_positions(allowed)
    valid, q_row = allowed[:, -1], q[:, :, -1].contiguous()
    scores = decode.page_scores(q_row, state.kmax, state.kmin, valid, params.page_size,
                                summary_scale=state.summary_scale)
    indices, chosen = decode.top_pages(scores, position[:, -1], params)
    return SimpleNamespace(q=q, k=k, v=v, allowed=allowed, position=position, valid=valid, q_row=q_row,
                           refresh=ref.PageRefresh.of_window(k, position, params.page_size), scores=scores,
                           indices=indices, chosen=chosen, scale=q.shape[-1] ** -0.5)


def stage_times(state, params, inputs) -> dict[str, float]:
    """Each heavy stage alone (kernel stages as they are, no Inductor): where a step's time goes."""
    from .kernels import decode
    from .kernels import masks
    from .kernels import reference as ref

    def graphed_us(fn) -> float:
        return graph_us(fn, (), compile=False)

    x = stage_inputs(state, params, inputs)
    page, scale = params.page_size, state.summary_scale
    return {
        "stage_positions_us": graph_us(masks.query_positions, (x.allowed,)),  # compiled, as a step runs it
        "stage_summarize_us": graphed_us(lambda: decode.summarize_pages(  # a step's written pages, alone
            state.kmax, state.kmin, x.k, x.valid, x.refresh.first_position, x.refresh.count, page, scale)),
        "stage_scores_us": graphed_us(lambda: decode.page_scores(x.q_row, state.kmax, state.kmin, x.valid, page,
                                                                 summary_scale=scale)),
        "stage_scores_refresh_us": graphed_us(lambda: decode.page_scores(  # a step's: the summary refresh fused
            x.q_row, state.kmax, state.kmin, x.valid, page, refresh=x.refresh, summary_scale=scale)),
        "stage_select_us": graphed_us(lambda: decode.top_pages(x.scores, x.position[:, -1], params)),
        "stage_select_torch_topk_us": graphed_us(lambda: ref.top_pages(x.scores, x.position[:, -1], params)),
        "stage_attend_us": graphed_us(lambda: decode.attend_window(x.q, x.k, x.v, x.allowed, None, x.indices, x.chosen,
                                                                   state, x.position, x.scale, page)),
    }


def flex_case(q, k, v, seed: int = 0):
    """(step, inputs): FlexAttention over an equal block-sparse budget.

    Each KV head reads ``BUDGET // 128`` blocks of 128 keys (the newest block and random others):
    the same number of keys as the op's budget, through a fixed block mask. This times attention
    alone: there is no scoring or selection, and no window rows.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    batch, context, block = q.shape[0], k.shape[2], 128
    blocks = context // block
    count = min(BUDGET // block, blocks)
    g = torch.Generator(device="cuda").manual_seed(seed)
    others = torch.rand(batch, KV_HEADS, blocks - 1, device="cuda", generator=g).argsort(-1)[..., :count - 1]
    newest = torch.full((batch, KV_HEADS, 1), blocks - 1, device="cuda")
    chosen = torch.cat([others, newest], -1).sort(-1).values.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
    kv_indices = torch.zeros(batch, Q_HEADS, 1, blocks, dtype=torch.int32, device="cuda")
    kv_indices[..., :count] = chosen[:, :, None].int()
    kv_num_blocks = torch.full((batch, Q_HEADS, 1), count, dtype=torch.int32, device="cuda")
    mask = BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=block, seq_lengths=(q.shape[2], context))
    return (lambda q, k, v: flex_attention(q, k, v, block_mask=mask, enable_gqa=True)), (q, k, v)


def measure(row: dict, key: str, timed: Callable[[], float]) -> None:
    """``row[key] = timed()``; a failure is logged and recorded as ``row[key + "_error"]`` instead."""
    try:
        row[key] = timed()
    except Exception as error:
        log.warning("%s failed at B=%d, context %d: %s", key, row["batch"], row["context"], error)
        row[f"{key}_error"] = f"{type(error).__name__}: {error}"[:300]


def measure_call(row: dict, key: str, fn: Callable[[], object]) -> None:
    """:func:`measure` of one ``fn()`` as it is (no Inductor), in microseconds to 0.01, logged:
    how the tuning scripts time each launch choice or variant of a stage."""
    measure(row, key, lambda: round(graph_us(fn, (), compile=False), 2))
    log.info("B=%d, context %d, %s: %s", row["batch"], row["context"], key, row.get(key))


def bench_op(batches, contexts, out: Path, summaries: str = "exact") -> list[dict]:
    bandwidth = copy_bandwidth()
    log.info("copy bandwidth %.2f TB/s", bandwidth / 1e12)
    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, q_heads=Q_HEADS, kv_heads=KV_HEADS,
                head_dim=HEAD_DIM, page_size=PAGE, budget=BUDGET, dtype="bfloat16", summaries=summaries,
                copy_bandwidth=bandwidth)
    cases = [(b, c) for b in batches for c in contexts]
    for batch, context in tqdm(cases, desc="op benchmark"):
        row = dict(batch=batch, context=context, target_us=TARGETS_US.get((batch, context)))
        _, _, (q, k, v, mask) = op_case(batch, context, 1)
        dense = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        measure(row, "dense_us", lambda: graph_us(dense, (q, k, v, mask), compile=False))
        measure(row, "flex_us", lambda: graph_us(*flex_case(q, k, v)))  # its decode path varies across torch versions
        for name, window in OP_MODES.items():
            state, params, inputs = op_case(batch, context, window, summaries=summaries)
            measure(row, f"{name}_us", lambda: graph_us(_op_step(state, params), inputs))
            positions = mask_positions(inputs[3], batch, window)
            measure(row, f"{name}_layer_us", lambda: graph_us(_op_step(state, params), (*inputs, positions)))
        row.update(stage_times(state, params, inputs))
        pages = math.ceil(context / PAGE)
        summary_bytes = 2 * pages * KV_HEADS * HEAD_DIM * state.kmax.element_size()
        bytes_read = batch * (summary_bytes + 2 * min(BUDGET, context) * KV_HEADS * HEAD_DIM * 2)
        row["bound_us"] = 1e6 * bytes_read / bandwidth
        rows.append(row)
        log.info("%s", {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
        out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))  # after every case
    _plot(rows, out.with_suffix(".png"))
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    from .eval.plot import grouped_bars

    keys = ["dense_us", "flex_us", "quest_us", "retro_w2_us", "retro_w4_us", "bound_us"]
    grouped_bars(path, [f"B={r['batch']}\n{r['context'] // 1024}K" for r in rows],
                 {key.removesuffix("_us"): [r.get(key, 0.0) for r in rows] for key in keys},
                 "microseconds per decode-attention step", log_scale=True)


def profile_op(batch: int, context: int, window: int, summaries: str = "exact") -> str:
    """Top GPU kernels of the compiled decode step, by total device time over 20 steps."""
    state, params, inputs = op_case(batch, context, window, summaries=summaries)
    graph = _record(_op_step(state, params), inputs)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m retro_compile.bench",
                                description="speed benchmarks; they need a CUDA GPU (e2e and serve --shape smoke run on the CPU)")
    sub = p.add_subparsers(dest="what", required=True, help="op: the decode op alone; e2e: generate() end to end; serve: continuous batching")
    op = sub.add_parser("op", help="one decode-attention step of the op (GPU)")
    op.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    op.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072], help="cache lengths, in tokens")
    op.add_argument("--out", type=Path, default=Path("results/bench_op_h200.json"), help="JSON path; the PNG goes beside it")
    op.add_argument("--profile", action="store_true", help="print the compiled step's top kernels instead")
    op.add_argument("--modes", nargs="+", default=["retro_w2"], choices=list(OP_MODES),
                    help="with --profile: the modes to profile")
    op.add_argument("--summaries", default="exact", choices=SUMMARIES,
                    help="how the op's state stores page summaries (RetroConfig.summaries)")
    from . import bench_e2e

    bench_e2e.add_arguments(sub.add_parser(
        "e2e", help="generate() end to end on a Llama-3.1-8B-shaped model (GPU; --shape smoke on CPU)"))
    from . import bench_serve

    bench_serve.add_arguments(sub.add_parser(
        "serve", help="continuous batching under a load of concurrent requests (GPU; --shape smoke on CPU)"))
    args = p.parse_args(argv)
    args.invocation = "python -m retro_compile.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.what == "e2e":
        bench_e2e.main(args)
        return
    if args.what == "serve":
        bench_serve.main(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("python -m retro_compile.bench op needs a CUDA device")
    if args.profile:
        for batch in args.batches:
            for context in args.contexts:
                for mode in args.modes:
                    table = profile_op(batch, context, OP_MODES[mode], args.summaries)
                    log.info("B=%d, context %d, %s:\n%s", batch, context, mode, table)
        return
    bench_op(args.batches, args.contexts, args.out, args.summaries)


if __name__ == "__main__":
    main()
