"""Time the decode kernels' launch parameters one stage at a time (CUDA), to choose their defaults.

    python benchmarks/tune_stages.py --out tune_stages.json

For each (batch, context) of the op benchmark's target shapes, the stages named by ``--stages``:
page scoring over (block_pages, num_warps), elementwise and as matrix products, these also over
blocks_per_program and num_stages (scores), with the state's summaries as ``--summaries`` stores them; a step's
summary refresh as its own launch or inside scoring (refresh); the selection over chunk_pages (0:
one stage) and each stage's warps (select); the attention + merge over pages_per_split (None: the
default), tile_pages, warps and software-pipeline stages (attend); a dense layer's window over the whole cache
(``dense_window``) over the same, beside SDPA for the newest row alone (dense); the selection
with every page always kept (no threshold search) and the attention with no page chosen (no key
or value loaded), each beside the stage as it runs (floors). Device time per
call from a CUDA graph of 20 calls, as ``python -m retro_compile.bench op`` times its stages.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from retro_compile.bench import graph_us, measure_call, op_case, stage_inputs
from retro_compile.config import SUMMARIES
from retro_compile.kernels import decode


STAGES = ("scores", "refresh", "select", "attend", "dense", "floors")


ABBREVIATIONS = {"block_pages": "block", "blocks_per_program": "blocks", "chunk_pages": "chunk", "pages_per_split": "split", "tile_pages": "tile", "num_warps": "warps",
                 "num_stages": "stages"}


def _key(stage: str, choices: dict) -> str:
    """A result's name: the stage and its launch choices, e.g. attend_split8_tile8_warps4."""
    return stage + "".join(f"_{ABBREVIATIONS[name]}{value}" for name, value in choices.items())


def tune(batch: int, context: int, stages=STAGES, summaries: str = "exact") -> dict:
    state, params, inputs = op_case(batch, context, 2, summaries=summaries)
    x = stage_inputs(state, params, inputs)
    page, scale = params.page_size, state.summary_scale
    row: dict = dict(batch=batch, context=context, summaries=summaries)

    def timed(key, fn):  # a choice that does not compile or fit is recorded as key_error, not fatal
        measure_call(row, key, fn)

    if "scores" in stages:
        for block, warps in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8), (256, 16)):
            timed(f"scores_block{block}_warps{warps}", lambda: decode.page_scores(
                x.q_row, state.kmax, state.kmin, x.valid, page, block_pages=block, num_warps=warps, as_products=False,
                summary_scale=scale))
        for choices in ([dict(block_pages=p, num_warps=w) for p, w in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 4),
                                                                       (128, 8))]
                        + [dict(block_pages=p, blocks_per_program=n, num_warps=w, num_stages=st)
                           for p, n, w, st in ((32, 4, 4, 3), (64, 2, 4, 3), (64, 4, 4, 3), (64, 8, 4, 3),
                                               (64, 4, 4, 2), (64, 4, 8, 3), (128, 2, 4, 3), (128, 4, 4, 3),
                                               (128, 4, 8, 3), (128, 8, 8, 2), (128, 4, 4, 2))]):
            timed(_key("scores_products", choices), lambda: decode.page_scores(
                x.q_row, state.kmax, state.kmin, x.valid, page, summary_scale=scale, **choices))
        timed("scores_default", lambda: decode.page_scores(x.q_row, state.kmax, state.kmin, x.valid, page,
                                                           summary_scale=scale))
    if "refresh" in stages:
        timed("summarize_then_scores", lambda: (
            decode.summarize_pages(state.kmax, state.kmin, x.k, x.valid, x.refresh.first_position, x.refresh.count,
                                   page, scale),
            decode.page_scores(x.q_row, state.kmax, state.kmin, x.valid, page, summary_scale=scale)))
        timed("scores_with_refresh", lambda: decode.page_scores(
            x.q_row, state.kmax, state.kmin, x.valid, page, refresh=x.refresh, summary_scale=scale))
    if "select" in stages:
        for choices in ([dict(chunk_pages=c) for c in (0, 256, 512, 1024, 2048)]
                        + [dict(chunk_pages=c, num_warps=w) for c, w in ((512, 2), (512, 4), (512, 8), (1024, 2),
                                                                         (1024, 8), (2048, 8), (0, 1), (0, 2), (0, 4), (0, 8),
                                                                         (1024, 1), (0, 16))]):
            timed(_key("select", choices), lambda: decode.top_pages(x.scores, x.position[:, -1], params,
                                                                    **choices))
        timed("select_default", lambda: decode.top_pages(x.scores, x.position[:, -1], params))
    if "attend" in stages:
        for choices in ([dict(pages_per_split=s) for s in (None, 1, 2, 4, 8, 16)]
                        + [dict(pages_per_split=s, tile_pages=t, num_warps=w)
                           for s, t, w in ((8, 8, 4), (8, 8, 8), (16, 8, 4), (16, 16, 8), (4, 4, 8))]
                        + [dict(pages_per_split=s, tile_pages=t, num_stages=n)
                           for s, t, n in ((None, 4, 1), (None, 4, 2), (None, 4, 4), (None, 2, 2), (None, 2, 3),
                                           (None, 2, 4), (8, 2, 3), (16, 2, 3), (32, 4, 3), (32, 4, 4))]):
            timed(_key("attend", choices), lambda: decode.attend_window(
                x.q, x.k, x.v, x.allowed, None, x.indices, x.chosen, state, x.position, x.scale, page, **choices))
    if "floors" in stages:  # each stage beside itself less its own work: what the search and the loads cost
        every_page_kept = params._replace(sink_pages=x.scores.shape[-1])  # all +inf: no threshold search
        timed("floors_select", lambda: decode.top_pages(x.scores, x.position[:, -1], params))
        timed("floors_select_no_search", lambda: decode.top_pages(x.scores, x.position[:, -1], every_page_kept))
        no_page = torch.zeros_like(x.chosen)  # every slot unchosen: no key or value is loaded
        for choices in ({}, dict(num_stages=1), dict(tile_pages=8, num_stages=1), dict(tile_pages=8, num_stages=2),
                        dict(pages_per_split=4, num_stages=1)):
            timed(_key("floors_attend", choices), lambda: decode.attend_window(
                x.q, x.k, x.v, x.allowed, None, x.indices, x.chosen, state, x.position, x.scale, page, **choices))
            timed(_key("floors_attend_no_pages", choices), lambda: decode.attend_window(
                x.q, x.k, x.v, x.allowed, None, x.indices, no_page, state, x.position, x.scale, page, **choices))
    if "dense" in stages:
        row["dense_sdpa_newest_row"] = round(graph_us(lambda: F.scaled_dot_product_attention(
            x.q[:, :, -1:], x.k, x.v, enable_gqa=True), (), compile=False), 2)
        for choices in ([dict(pages_per_split=s, tile_pages=t, num_warps=w)
                         for s, t, w in ((None, 4, 4), (64, 4, 4), (256, 4, 4), (None, 8, 4), (None, 8, 8), (64, 8, 4),
                                         (256, 8, 8), (None, 4, 8))]
                        + [dict(tile_pages=t, num_stages=n) for t, n in ((8, 2), (8, 4), (4, 4))]):
            timed(_key("dense", choices), lambda: decode.dense_window(x.q, x.k, x.v, x.allowed, x.scale, **choices))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1x32768", "1x131072", "8x131072"], help="BATCHxCONTEXT")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="the stages to time")
    p.add_argument("--summaries", default="exact", choices=SUMMARIES, help="the state's summary format")
    p.add_argument("--out", type=Path, default=Path("tune_stages.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for shape in args.shapes:
        batch, context = map(int, shape.split("x"))
        rows.append(tune(batch, context, args.stages, args.summaries))
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=rows), indent=2))


if __name__ == "__main__":
    main()
