"""Merge the JSON of several ``python -m retro_compile.eval`` runs of one task into one file.

A sweep too long for one sitting runs as several invocations (other lengths, other budgets); this
puts their rows together: rows of the same configuration (mode, budget, window, sink pages,
summaries) have their per-length results joined, a length that two files both hold is an error,
and the invocations are listed under ``setup.invocations``. RULER averages and paired differences to
dense are computed again over the merged rows, and the plot is drawn again.

    python benchmarks/merge_results.py a.json b.json --out results/ruler_qwen2.5-coder.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from retro_compile.eval.plot import plot
from retro_compile.eval.ruler import DENSE_FLOOR, add_averages, configuration, join_lengths

ORDER = {"dense": 0, "quest": 1, "retro": 2}


def merge(datas: list[dict], names: list[str]) -> dict:
    tasks = {d["task"] for d in datas}
    if len(tasks) != 1:
        raise ValueError(f"merge: the files hold different tasks: {sorted(tasks)}")
    task = tasks.pop()
    rows: dict[tuple, dict] = {}
    for data in datas:
        for row in data["results"]:
            if configuration(row) not in rows:
                rows[configuration(row)] = copy.deepcopy(row)
            elif task != "ruler":
                raise ValueError(f"merge: {configuration(row)} is in two {task} files; only RULER rows join by length")
            else:
                join_lengths(rows[configuration(row)], row)
    results = sorted(rows.values(), key=lambda r: (r["budget"] or 0, ORDER[r["mode"]], *configuration(r)[2:]))
    setup = dict(datas[0]["setup"])
    setup["lengths"] = sorted({int(n) for r in results for n in r.get("accuracy", {})}) or setup.get("lengths")
    setup["invocations"] = []
    for name, d in zip(names, datas):  # a merged file brings the invocations it was merged from
        setup["invocations"] += d["setup"].get("invocations") or [
            dict(file=name, **{k: d["setup"].get(k) for k in ("lengths", "budgets", "modes", "window", "samples", "gpu")})]
    out = dict(task=task, setup=setup, results=results)
    if task == "ruler":
        out["averaged_tasks"] = add_averages(results)
        out["dense_floor"] = DENSE_FLOOR
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    merged = merge([json.loads(f.read_text()) for f in args.files], [f.name for f in args.files])
    args.out.write_text(json.dumps(merged, indent=2))
    plot(args.out)


if __name__ == "__main__":
    main()
