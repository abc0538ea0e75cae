"""``python -m retro_compile.eval ppl|passkey|exposure|ruler``: quality per mode, budget and window.

    python -m retro_compile.eval ppl --budgets 64 128 256 512 --modes dense quest retro --window 2 4 \\
        --context 4096 --prefill 512 --passages 3 --out results/ppl.json
    python -m retro_compile.eval passkey --lengths 2048 4096 8000 --out results/passkey.json
    python -m retro_compile.eval exposure --context 2048 --out results/exposure.json
    python -m retro_compile.eval ruler --model qwen2.5-coder --lengths 4096 8192 --samples 20 \\
        --budgets 512 1024 2048 --out results/ruler.json

Every configuration runs through ``retro_compile(model, RetroConfig(...))``, the path users run.
``ppl`` also measures the effective KV exposure of its sparse runs; ``exposure`` is the same run
without dense, plotted for exposure. Results are written as JSON after every configuration, and as
a PNG plot at the end. ``--jobs N`` runs N configurations at once, each in a process of its own.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import RetroConfig, retro_compile
from ..config import SUMMARIES
from ..data import BOOKS, DEFAULT_MODEL, cache_dir, load_model, passages
from .decode import ExposureMeter, perplexity, teacher_forced_nll
from .passkey import is_correct, passkey_answers, passkey_prompt, random_keys
from .ruler import TASKS as RULER_TASKS
from .ruler import (DENSE_FLOOR, Generator, Sample, add_averages, configuration, join_lengths, markdown_table,
                    string_match_all)

log = logging.getLogger("retro_compile.eval")
DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m retro_compile.eval", description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["ppl", "passkey", "exposure", "ruler"],
                   help="ppl: long-decode perplexity; passkey: retrieval accuracy; exposure: pages seen per row; "
                        "ruler: RULER's synthetic tasks (needles, variable tracking, word extraction)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2' (default), 'qwen2.5-coder', a .gguf file, a folder or a model id")
    p.add_argument("--modes", nargs="+", default=["dense", "quest", "retro"], choices=["dense", "quest", "retro"],
                   help="attention modes compared (default: all three)")
    p.add_argument("--budgets", nargs="+", type=int, default=None,
                   help="sparse budgets, in tokens (default 64 128 256 512; ruler: 512 1024 2048)")
    p.add_argument("--window", type=int, nargs="+", default=[2, 4], help="retro windows w")
    p.add_argument("--sink-pages", type=int, nargs="+", default=[0],
                   help="RetroConfig.sink_pages values compared (0: Quest's and the paper's selection; "
                        "1: the first page is always kept)")
    p.add_argument("--context", type=int, default=4096, help="ppl/exposure: tokens per passage (prefill + decoded)")
    p.add_argument("--prefill", type=int, default=512, help="ppl/exposure: tokens prefilled densely")
    p.add_argument("--passages", type=int, default=3, help="ppl/exposure: passages, one per book or source file")
    p.add_argument("--text", choices=["books", "code"], default="books",
                   help=f"ppl/exposure: 'books' (Shakespeare: {', '.join(BOOKS)}) or 'code' (the longest Python "
                        "modules of the installed SymPy, from their first line)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="passkey: prompt lengths (default 2048 4096 8000); ruler: prompt plus answer lengths "
                        "(default 4096 8192)")
    p.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), choices=list(RULER_TASKS),
                   help="ruler: the tasks run (default: all)")
    p.add_argument("--samples", type=int, default=20, help="ruler: samples per task and length")
    p.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS), help="passkey: needle depths")
    p.add_argument("--seed", type=int, default=0, help="passkey, ruler: seed of the random keys and words")
    p.add_argument("--batch", type=int, default=None,
                   help="prompts decoded together (passkey: 3; ruler: 1, since prompts of different lengths are "
                        "left-padded, and a padded prefill builds an (n x n) mask per row)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the default where there is one) or cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="weights and activations (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--inductor", choices=["auto", "on", "off"], default="auto",
                   help="compile the decode graph with Inductor (auto: on CUDA only)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run each decode step without recording it in a CUDA graph")
    p.add_argument("--summaries", choices=SUMMARIES, default=RetroConfig.summaries,
                   help="how sparse layers store page summaries (RetroConfig.summaries)")
    p.add_argument("--jobs", type=int, default=1, help="configurations run at once, each in its own process")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/<task>.json); PNG beside it")
    args = p.parse_args(argv)
    args.budgets = args.budgets or ([512, 1024, 2048] if args.task == "ruler" else [64, 128, 256, 512])
    args.lengths = args.lengths or ([4096, 8192] if args.task == "ruler" else [2048, 4096, 8000])
    args.batch = args.batch or (1 if args.task == "ruler" else 3)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.task == "exposure" and "dense" in args.modes:
        args.modes = [m for m in args.modes if m != "dense"]  # dense selects nothing
    if any(b <= 0 for b in args.budgets) or any(w < 1 for w in args.window) or args.jobs < 1:
        p.error("--budgets must be positive, --window and --jobs at least 1")
    if args.samples < 1 or args.batch < 1 or any(n < 256 for n in args.lengths):
        p.error("--samples and --batch must be at least 1, --lengths at least 256")
    if any(s < 0 for s in args.sink_pages):
        p.error("--sink-pages must be at least 0")
    if args.task in ("ppl", "exposure") and not 0 < args.prefill < args.context:
        p.error(f"--prefill={args.prefill} must lie in (0, --context={args.context})")
    args.out = args.out or Path("results") / f"{args.task}.json"
    return args


Run = tuple[str, int | None, int, int]  # (mode, budget, window, sink_pages)


def configurations(args) -> list[Run]:
    """(mode, budget, window, sink_pages): dense once, then every sparse mode per budget and sink
    setting (retro per window)."""
    runs: list[Run] = [("dense", None, 1, 0)] if "dense" in args.modes else []
    runs += [(mode, budget, w, sink) for budget in args.budgets for sink in args.sink_pages
             for mode in ("quest", "retro") if mode in args.modes
             for w in (args.window if mode == "retro" else [1])]
    return runs


def run_ppl(model, args, passages: torch.Tensor, window: int) -> dict:
    meter = ExposureMeter(model, window) if model.retro_config.mode != "dense" else None
    nll = teacher_forced_nll(model, passages, args.prefill, progress=args.jobs == 1, meter=meter)
    per_passage = [perplexity(row) for row in nll]
    row = dict(ppl=perplexity(nll), ppl_per_passage=per_passage, scored_tokens=nll.numel())
    if meter is not None:
        row["exposure"] = meter.value
    return row


def run_passkey(model, args, tokenizer) -> dict:
    per_length = {}
    for length in args.lengths:
        keys = random_keys(len(args.depths), seed=args.seed + length)
        prompts = [passkey_prompt(tokenizer, length, depth, key) for depth, key in zip(args.depths, keys)]
        answers = [answer for i in range(0, len(prompts), args.batch)  # the dense prefill's memory grows with B
                   for answer in passkey_answers(model, tokenizer, prompts[i:i + args.batch], device=args.device)]
        per_length[str(length)] = [is_correct(a, p.key) for a, p in zip(answers, prompts)]
    hits = [hit for row in per_length.values() for hit in row]
    return dict(accuracy=sum(hits) / len(hits), correct_per_length=per_length)


def run_ruler(model, args, samples: dict[tuple[str, int], list], tokenizer) -> dict:
    """RULER's score (``string_match_all``, in %) of every task and length: greedy answers of
    ``task.tokens_to_generate`` tokens, ``args.batch`` prompts a ``generate()`` call."""
    scores: dict[str, dict[str, list[float]]] = {}
    for (task, length), items in samples.items():
        new_tokens = RULER_TASKS[task].tokens_to_generate
        for i in range(0, len(items), args.batch):
            batch = items[i:i + args.batch]
            inputs = tokenizer([s.prompt for s in batch], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(args.device)
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            scores.setdefault(str(length), {}).setdefault(task, []).extend(
                100.0 * string_match_all(a, s.answers) for a, s in zip(answers, batch))
    accuracy = {length: {task: sum(v) / len(v) for task, v in per_task.items()} for length, per_task in scores.items()}
    return dict(accuracy=accuracy, scores=scores)


def ruler_samples(tokenizer, args) -> dict[tuple[str, int], list[Sample]]:
    """The samples of every task and length, made once and kept in the cache directory, so that
    worker processes and later runs read them instead of tokenizing haystacks again. Each task
    and length draws from a generator of its own seeded with ``--seed`` (as RULER runs each task's
    script with the same seed), so a cached file is what a fresh run would make."""
    folder = cache_dir() / "ruler"
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(str(getattr(tokenizer, "name_or_path", "tokenizer"))).name or "tokenizer"
    out = {}
    for length in args.lengths:
        for task in args.tasks:
            path = folder / f"{name}-{task}-{length}-{args.samples}-seed{args.seed}.json"
            if path.exists():
                out[(task, length)] = [Sample(**row) for row in json.loads(path.read_text())]
                continue
            log.info("making %d %s samples of %d tokens", args.samples, task, length)
            out[(task, length)] = Generator(tokenizer, seed=args.seed).samples(task, length, args.samples)
            path.write_text(json.dumps([dataclasses.asdict(s) for s in out[(task, length)]]))
    return out


_LOADED: dict = {}  # this process's model, tokenizer and texts, keyed by what they depend on


def load(args) -> tuple:
    """(model, tokenizer, inputs, max_context), loaded once per process; the inputs are RULER's
    samples, None for passkey, and for ppl/exposure the passages by name (:func:`~retro_compile.data.passages`)."""
    if _LOADED.get("key") != (args.model, args.device, args.task):
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
        if args.task == "ruler":
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            inputs, max_context = ruler_samples(tokenizer, args), max(args.lengths)
        elif args.task == "passkey":
            inputs, max_context = None, max(args.lengths) + 16
        else:
            inputs, max_context = passages(tokenizer, args.text, args.passages, args.context), args.context + 8
        _LOADED.update(key=(args.model, args.device, args.task),
                       value=(model, tokenizer, inputs, -(-max_context // 256) * 256))
    return _LOADED["value"]


def evaluate(args, run: Run, length: int | None = None) -> dict:
    """One configuration (for RULER at one ``length``; None: every length), on a fresh copy of the
    model, through ``retro_compile``."""
    mode, budget, window, sink_pages = run
    base, tokenizer, inputs, max_context = load(args)
    config = RetroConfig(mode=mode, window=window, budget=budget or max_context, max_context=max_context,
                         sink_pages=sink_pages, summaries=args.summaries)
    inductor = None if args.inductor == "auto" else args.inductor == "on"
    model = retro_compile(copy.deepcopy(base), config, inductor=inductor,
                          cuda_graphs=False if args.no_cuda_graphs else None)
    start = time.perf_counter()
    if args.task == "ruler":
        row = run_ruler(model, args, {key: items for key, items in inputs.items() if key[1] == length}, tokenizer)
    elif args.task == "passkey":
        row = run_passkey(model, args, tokenizer)
    else:
        row = run_ppl(model, args, torch.tensor(list(inputs.values()), device=args.device), window)
    row = dict(mode=mode, budget=budget, window=window, sink_pages=sink_pages, summaries=args.summaries, **row,
               seconds=round(time.perf_counter() - start, 1))
    log.info("%s", {k: v for k, v in row.items() if not isinstance(v, (list, dict))})
    return row


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` processes that share this process's CPU threads between them: the torch of each
    would otherwise start one thread per core, ``jobs`` times as many threads as cores."""
    threads = max(1, torch.get_num_threads() // jobs)
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=torch.set_num_threads, initargs=(threads,))


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("retro_compile.passes.rewrite").setLevel(logging.WARNING)
    _, _, inputs, max_context = load(args)  # here first, so a GGUF is converted once, not once per worker
    defaults = RetroConfig()
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    setup.update(page_size=defaults.page_size, dense_layers=defaults.dense_layers, max_context=max_context,
                 texts=list(inputs) if args.task in ("ppl", "exposure") else None,
                 torch=torch.__version__, gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None)
    runs = configurations(args)
    # RULER's unit of work is a configuration at one length, shortest first, so that a run stopped
    # early keeps every length it finished; the other tasks run a configuration at once.
    units = [(run, length) for length in sorted(args.lengths) for run in runs] if args.task == "ruler" else \
        [(run, None) for run in runs]
    results: list[dict] = []

    def record(row: dict) -> None:
        same = next((r for r in results if configuration(r) == configuration(row)), None)
        if same is None:
            results.append(row)
        else:  # another length of a configuration already recorded
            join_lengths(same, row)
        results.sort(key=lambda r: runs.index(configuration(r)[:4]))  # one summary format a run: --summaries
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = dict(task=args.task, setup=setup, results=results)
        if args.task == "ruler":  # averages over the tasks dense scores above the floor on
            data["averaged_tasks"] = add_averages(results)
            data["dense_floor"] = DENSE_FLOOR
        args.out.write_text(json.dumps(data, indent=2))

    if args.jobs == 1:
        for run, length in tqdm(units, desc=args.task):
            record(evaluate(args, run, length))
    else:  # several configurations at once: a decode step of this small model leaves the device mostly idle
        with worker_pool(args.jobs) as pool:
            futures = [pool.submit(evaluate, args, run, length) for run, length in units]
            for future in tqdm(as_completed(futures), total=len(futures), desc=args.task):
                record(future.result())
    from .plot import plot

    plot(args.out)
    if args.task == "ruler":
        for length in map(str, args.lengths):
            log.info("RULER at %s tokens (%%, %d samples a task):\n%s", length, args.samples, markdown_table(results, length))
    log.info("wrote %s", args.out)
