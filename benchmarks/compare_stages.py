"""Time the decode step's kernels beside another version of them, in one process (CUDA).

    git show REV:retro_compile/kernels/decode.py > base_decode.py
    python benchmarks/compare_stages.py --base base_decode.py --out compare_stages.json

Two versions of ``kernels/decode.py`` (or more: ``--base`` takes several files, each named by
its stem in the JSON) timed on one GPU, one after the other and then in the reverse order
(``--rounds`` times), so that a difference is not the drift between two machines or two runs.
For each (batch, context): the summary refresh with scoring, the selection, the attention with
its merge, and the whole step as ``reference.decode_step`` runs with each
version's stages (the query positions given, as a layer of a compiled model gets them; no
Inductor), each as ``python -m retro_compile.bench op`` times its stages: device time per call
from a CUDA graph of 20 calls. Every version runs on the same state and inputs (retro w=2).

``--dependent-launch`` adds a third version: the working kernels launched with programmatic
dependent launch (Hopper; :data:`DEPENDENT_LAUNCH`): each kernel of the chain is launched while
the one before runs and waits for it (``gdc_wait``) before its first load. ``wrap_triton``
launches carry no launch attributes inside a compiled graph, so this version runs only as
these eager calls do.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from retro_compile.bench import kernels_module, measure_call, op_case, stage_inputs
from retro_compile.config import SUMMARIES
from retro_compile.kernels import decode, reference

log = logging.getLogger("compare_stages")

_WAIT = "\n    tl.extra.cuda.gdc_launch_dependents()\n    tl.extra.cuda.gdc_wait()"
# (old, new) replacements of decode.py's source: every launch with launch_pdl, every kernel of a
# step waiting for the one before at its start.
DEPENDENT_LAUNCH = [
    ("from torch.library import wrap_triton\n",
     "def wrap_triton(kernel):  # every launch a programmatic dependent launch\n"
     "    return type('Launch', (), {'__getitem__': lambda self, grid: lambda *args, **kwargs: kernel[grid](\n"
     "        *args, launch_pdl=True, **kwargs)})()\n"),
    *((line, line + _WAIT) for line in (
        "    b, hkv, program = tl.program_id(0), tl.program_id(1), tl.program_id(2)",  # scoring
        "    row = tl.program_id(0)",  # selection
        "    b, hkv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)",  # attention
        "    b, hq = tl.program_id(0), tl.program_id(1)",  # merge
    )),
]


def stage_calls(module, state, params, inputs, x) -> dict:
    """name -> a call of that stage of ``module``'s kernels, on ``x``, the step's
    :func:`~retro_compile.bench.stage_inputs` (the same for every version)."""
    page, scale = params.page_size, state.summary_scale
    q, k, v, mask = inputs
    return {
        "scores_refresh": lambda: module.page_scores(x.q_row, state.kmax, state.kmin, x.valid, page,
                                                     refresh=x.refresh, summary_scale=scale),
        "select": lambda: module.top_pages(x.scores, x.position[:, -1], params, state.counts),
        "attend": lambda: module.attend_window(x.q, x.k, x.v, x.allowed, None, x.indices, x.chosen, state,
                                               x.position, x.scale, page),
        "step": lambda: reference.decode_step(q, k, v, mask, False, None, state, params, module.kernel_stages(),
                                              x.position),
    }


def compare(batch: int, context: int, modules: dict, rounds: int, summaries: str) -> dict:
    state, params, inputs = op_case(batch, context, 2, summaries=summaries)
    x = stage_inputs(state, params, inputs)
    calls = {name: stage_calls(module, state, params, inputs, x) for name, module in modules.items()}
    row: dict = dict(batch=batch, context=context, summaries=summaries)
    names = list(modules)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for stage, call in calls[name].items():
                measure_call(row, f"{stage}_{name}_round{r}", call)
    for stage in calls[names[0]]:
        for name in names:
            times = [row.get(f"{stage}_{name}_round{r}") for r in range(rounds)]
            if None not in times:
                row[f"{stage}_{name}"] = round(statistics.median(times), 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, nargs="+", required=True,
                   help="the other version's decode.py (several: each named by its file's stem)")
    p.add_argument("--shapes", nargs="+", default=["1x32768", "1x131072", "8x131072"], help="BATCHxCONTEXT")
    p.add_argument("--rounds", type=int, default=2, help="timings of each, the order reversed each round")
    p.add_argument("--summaries", default="exact", choices=SUMMARIES, help="the state's summary format")
    p.add_argument("--dependent-launch", action="store_true",
                   help="also the working kernels with programmatic dependent launch (Hopper)")
    p.add_argument("--out", type=Path, default=Path("compare_stages.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as folder:
        names = ["base"] if len(args.base) == 1 else [path.stem for path in args.base]
        if len(set(names)) < len(names) or "new" in names:
            p.error(f"--base: files need distinct stems other than 'new', got {names}")
        modules = {name: kernels_module(path.read_text(), f"compare_{name}", Path(folder))
                   for name, path in zip(names, args.base)}
        modules["new"] = decode
        if args.dependent_launch:
            modules["new_dependent"] = kernels_module(Path(decode.__file__).read_text(), "compare_dependent",
                                                      Path(folder), DEPENDENT_LAUNCH)
        rows = []
        for shape in args.shapes:
            batch, context = map(int, shape.split("x"))
            rows.append(compare(batch, context, modules, args.rounds, args.summaries))
            args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                base=[str(path) for path in args.base], results=rows), indent=2))


if __name__ == "__main__":
    main()
