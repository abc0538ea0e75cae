"""Would page summaries of one byte an element cost quality? Long-decode perplexity with the
summaries as they are, and with every summary rounded outward to float8 (e4m3) values.

    python benchmarks/summary_precision.py --out results/summary_precision_cpu_smollm2_1024.json

Page scoring reads two summary rows (max and min) per page and KV head, and at B=8/128K that read
is most of a decode step. Stored in float8 instead of 16 bits it would halve. This measures the
quality side only, on the PyTorch reference (CPU or GPU): after every summary is built (a
prefill's pages, a decode step's refreshed pages) its max row is rounded up and its min row down
to the nearest e4m3 value, so each page's score stays an upper bound of ``q . k`` over the page,
only looser. The selection and attention are unchanged. Values beyond e4m3's range (448) would
need a scale; how many there were is reported (``clamped``), and they are rounded to +-inf here.

``int8`` runs the package's own int8 summaries (``--summaries int8``, ``RetroConfig.summaries``):
each element an integer multiple (-127..127) of a scale per (batch row, KV head, dim), fixed at
the prefill from the prompt's keys, the max row rounded up and the min row down, saturating beyond
the range. That is two bytes an element less than bf16, plus the scales.

Runs ``python -m retro_compile.eval ppl`` in this process once per precision with the given
arguments (``--jobs 1``) and writes the results side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from retro_compile.eval import cli
from retro_compile.kernels import reference

log = logging.getLogger("summary_precision")
E4M3_MAX = 448.0


def e4m3_grid() -> torch.Tensor:
    """Every finite float8 e4m3fn value, ascending (zero once)."""
    values = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.unique(values[values == values])


class OutwardRounding:
    """Context manager: ``reference.build_summaries`` rounds its max rows up and its min rows down
    to e4m3 values (outside its range: +-inf), counting the elements that were out of range."""

    def __init__(self) -> None:
        self.grid = e4m3_grid()
        self.clamped = 0
        self.elements = 0

    def _round(self, x: torch.Tensor, up: bool) -> torch.Tensor:
        grid = self.grid.to(x.device)
        finite = x.isfinite()
        self.clamped += int((finite & (x.abs() > E4M3_MAX)).sum())
        self.elements += int(finite.sum())
        if up:  # the smallest grid value >= x
            at = torch.searchsorted(grid, x.contiguous(), side="left")
            out = torch.where(at < len(grid), grid[at.clamp(max=len(grid) - 1)], float("inf"))
        else:  # the largest grid value <= x
            at = torch.searchsorted(grid, x.contiguous(), side="right") - 1
            out = torch.where(at >= 0, grid[at.clamp(min=0)], float("-inf"))
        return torch.where(finite, out, x)

    def __enter__(self) -> OutwardRounding:
        self._original = reference.build_summaries

        def rounded(k, valid, page_size):
            kmax, kmin = self._original(k, valid, page_size)
            return self._round(kmax, up=True), self._round(kmin, up=False)

        reference.build_summaries = rounded
        return self

    def __exit__(self, *exc) -> None:
        reference.build_summaries = self._original


PRECISIONS = ("as stored", "e4m3 outward", "int8")  # e4m3: emulated here; int8: the package's own format


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("summary_precision.json"))
    p.add_argument("eval_args", nargs="*", default=["--device", "cpu", "--context", "1024", "--prefill", "512",
                                                    "--budgets", "64", "128", "--window", "2"],
                   help="arguments for `python -m retro_compile.eval ppl` (after --)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                   help="the summary precisions compared")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            out = Path(tmp) / "ppl.json"
            argv = ["ppl", *args.eval_args, "--jobs", "1", "--out", str(out)]
            if precision == "as stored":
                cli.main(argv)
                results[precision] = json.loads(out.read_text())
            elif precision == "int8":  # dense reads no summaries: not run again
                cli.main([*argv, "--modes", "quest", "retro", "--summaries", "int8"])
                results[precision] = json.loads(out.read_text())
            else:
                with OutwardRounding() as rounding:
                    cli.main([*argv, "--modes", "quest", "retro"])
                results[precision] = {**json.loads(out.read_text()), "clamped": rounding.clamped,
                                      "rounded_elements": rounding.elements}
            args.out.write_text(json.dumps(dict(eval_args=args.eval_args, results=results), indent=2))
            log.info("%s: done", precision)


if __name__ == "__main__":
    main()
