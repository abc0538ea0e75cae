"""What a chain of dependent kernels costs on this GPU before any real work (CUDA).

    python benchmarks/launch_floor.py --out launch_floor.json

A decode step is a chain of kernels, each reading what the one before wrote: at B=1 the query
positions (two kernels), the scoring, the selection, the attention and the merge. Each link costs
at least a launch, a ramp-up and a drain, and each read of what another program wrote costs a
round trip to L2. This times both floors from a CUDA graph, as ``python -m retro_compile.bench op``
times a step:

* ``kernel_us[programs]``: one kernel of ``programs`` programs that each load one value the
  previous kernel stored and store it again, per kernel of a graph of 40 such kernels in a row;
* ``kernel_dependent_launch_us[programs]``: the same with programmatic dependent launch (Hopper):
  each kernel is launched while the one before runs, and waits for it (``gdc_wait``) before its load;
* ``chained_loads_us[n]``: one kernel of one program that follows ``n`` dependent loads through a
  pointer chain held in L2 (``n`` = 1, 16, 64), so the slope is one L2 round trip;
* ``grid_barrier_us[programs]``: the other way to pass results between programs, inside one
  persistent kernel: per phase of a kernel whose ``programs`` programs (at most one per SM, so
  all run at once) each store a value, wait at a barrier of all programs (an atomic count, then
  spinning on it) and load a neighbour's value, from the slope between 1 and 33 phases.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import triton
import triton.language as tl

from retro_compile.bench import graph_us

log = logging.getLogger("launch_floor")


@triton.jit
def _pass_on_kernel(SRC, DST, DEPENDENT: tl.constexpr):
    """Each program loads its value, written by the kernel before, and stores it for the next.
    DEPENDENT (for programmatic dependent launch): let the next kernel launch at once, and wait
    for the one before to finish (and its stores to land) before loading."""
    i = tl.program_id(0)
    if DEPENDENT:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    tl.store(DST + i, tl.load(SRC + i) + 1)


@triton.jit
def _pointer_chase_kernel(NEXT, OUT, hops):
    """Follow ``hops`` links of NEXT from entry 0: each load's address is the last load's value."""
    at = tl.load(NEXT, cache_modifier=".cg")  # from L2, as a program reads what another one wrote
    for _ in range(hops - 1):
        at = tl.load(NEXT + at, cache_modifier=".cg")
    tl.store(OUT, at)


@triton.jit
def _grid_barrier_kernel(VALUES, ARRIVED, OUT, phases):
    """``phases`` rounds of: store, wait for every program at a barrier, load the next program's
    store. ARRIVED holds a count per phase and one of finished programs; the last program to
    finish sets them back to zero for the next launch (every other one has left its waits)."""
    i, n = tl.program_id(0), tl.num_programs(0)
    value = i
    for phase in range(phases):
        tl.store(VALUES + phase * n + i, value)
        tl.debug_barrier()  # every warp's store before the arrival
        tl.atomic_add(ARRIVED + phase, 1, sem="release")
        while tl.atomic_add(ARRIVED + phase, 0, sem="acquire") < n:
            pass
        value = tl.load(VALUES + phase * n + (i + 1) % n, cache_modifier=".cg")
    tl.store(OUT + i, value)
    if tl.atomic_add(ARRIVED + phases, 1, sem="acq_rel") == n - 1:
        for phase in range(phases + 1):
            tl.store(ARRIVED + phase, 0)


def grid_barrier_us(programs: int, phases: int) -> float:
    values = torch.zeros(phases * programs, dtype=torch.int32, device="cuda")
    arrived = torch.zeros(phases + 1, dtype=torch.int32, device="cuda")
    out = torch.zeros(programs, dtype=torch.int32, device="cuda")
    return graph_us(lambda: _grid_barrier_kernel[(programs,)](values, arrived, out, phases, num_warps=1), (),
                    compile=False)


def kernel_chain_us(programs: int, dependent: bool = False) -> float:
    a = torch.zeros(programs, dtype=torch.int32, device="cuda")
    b = torch.zeros_like(a)
    launch = dict(DEPENDENT=True, launch_pdl=True) if dependent else dict(DEPENDENT=False)

    def two_links():  # graph_us records 20 calls of this: 40 kernels, each reading the last one's stores
        _pass_on_kernel[(programs,)](a, b, **launch)
        _pass_on_kernel[(programs,)](b, a, **launch)

    return graph_us(two_links, (), compile=False) / 2


def chained_loads_us(hops: int) -> float:
    size, stride = 1 << 16, 97 * 32  # 256 KB of links (L2-resident); no two hops share a cache line
    links = ((torch.arange(size, device="cuda") + stride) % size).int()
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    return graph_us(lambda: _pointer_chase_kernel[(1,)](links, out, hops), (), compile=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("launch_floor.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  kernel_us={}, chained_loads_us={})
    for programs in (1, 8, 128, 1024):
        result["kernel_us"][programs] = round(kernel_chain_us(programs), 2)
        log.info("kernel of %d programs: %.2f us", programs, result["kernel_us"][programs])
    result["kernel_dependent_launch_us"] = {}
    for programs in (1, 8, 128, 1024):
        try:
            result["kernel_dependent_launch_us"][programs] = round(kernel_chain_us(programs, dependent=True), 2)
        except Exception as error:  # a GPU or driver without programmatic dependent launch
            result["kernel_dependent_launch_us"][programs] = f"{type(error).__name__}: {error}"[:200]
        log.info("kernel of %d programs, dependent launch: %s us", programs,
                 result["kernel_dependent_launch_us"][programs])
    for hops in (1, 16, 64):
        result["chained_loads_us"][hops] = round(chained_loads_us(hops), 2)
        log.info("%d dependent loads: %.2f us", hops, result["chained_loads_us"][hops])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result["grid_barrier_us"] = {}
    for programs in sorted({1, 8, 128, sms}):
        if programs <= sms:
            per_phase = (grid_barrier_us(programs, 33) - grid_barrier_us(programs, 1)) / 32
            result["grid_barrier_us"][programs] = round(per_phase, 2)
            log.info("grid barrier of %d programs: %.2f us a phase", programs, per_phase)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
