"""Where the Quest-to-dense perplexity gap comes from, and so how much of it RetroAttention can close.

A sparse decode step loses twice. The newest row attends to the selected pages only (the query's
own loss), and the keys and values of the rows decoded before it were computed from sparse
attention too (the stale past). RetroAttention repairs the second, for the last ``w - 1`` rows,
with the pages later steps load; nothing repairs the first. Teacher forced over the same text,
this measures

    dense        dense attention everywhere (the oracle);
    quest        every row Quest-selected, its keys and values kept (plain Quest);
    query_only   the newest row Quest-selected over a dense past: what no correction of past rows
                 can remove;
    past_only    the newest row dense over quest's stale past: what a perfect correction of every
                 past row would remove;

with a Quest written here, independently of the package (per KV head: page scores
``sum_d max(q_d kmax_d, q_d kmin_d)`` maximised over the group's query heads, the query's own page
always kept, the top remaining pages up to ``budget // page_size`` pages, the first
``dense_layers`` layers dense), and beside them the package's own ``quest`` and ``retro`` modes
through ``retro_compile`` (its quest must equal the probe's quest). ``--retro-probe`` adds the
probe's own RetroAttention at each window, twice: ``retro_merge`` merges a past row's cached
output (computed with the query the row had then) with its current query's attention over the
newly loaded pages, the package's rule (it must equal the package's retro); ``retro_recompute``
attends afresh with the current query over every page the row has seen, which removes the
merge's drift (docs/algorithm.md, section 4) and isolates what it costs. ``--per-head`` lets every
query head choose its own pages instead (probe modes only), to see how much of the query's own
loss comes from a KV head's query heads sharing one selection. ``--selections`` ranks pages by
other scores too, each run as ``quest_<score>`` and ``query_only_<score>``: ``oracle``, the page's
true attention mass for the query (what no score computed from summaries can beat at this budget),
and ``meanstd``, an estimate from each page's key mean and spread (:func:`page_scores`). Whether
the newest row's loss comes from Quest's bound ranking the pages poorly or from the budget itself
is the difference between ``query_only`` and ``query_only_oracle``.

    python benchmarks/gap_decomposition.py --model qwen2.5-coder --text code --budgets 64 256 \\
        --context 2048 --prefill 1024 --out results/gap_decomposition_qwen2.5-coder.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from retro_compile import RetroConfig, retro_compile
from retro_compile.data import load_model, passages
from retro_compile.eval.decode import teacher_forced_nll

log = logging.getLogger("gap_decomposition")


class Probe:
    """What the attention function below does on the current forward call."""

    def __init__(self, page_size: int, dense_layers: int) -> None:
        self.page_size, self.dense_layers = page_size, dense_layers
        self.capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # dense pass: every K, V
        self.past: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (B, Hkv, N, D) per layer
        self.position = 0  # the decoded token's position
        self.budget_pages: int | None = None  # None: the newest row attends densely
        self.keep_own = False  # write the decoded row's key and value into ``past``
        self.per_head = False  # each query head selects its own pages (a diagnostic: not what the package does)
        self.window = 1  # rows per call: > 1 runs the retro probe (the newest row plus w - 1 past rows)
        self.merge = True  # retro probe: merge a past row's cached output (the package) or recompute it
        self.rows: dict[int, dict[int, tuple]] = {}  # retro probe: layer -> position -> (pages seen, out, lse)
        self.selection = "bound"  # how pages are ranked: see page_scores


PROBE = Probe(page_size=16, dense_layers=2)


SPREAD = 1.77  # meanstd: the expected largest of 16 normal draws (a page), in standard deviations


def page_scores(q: torch.Tensor, k: torch.Tensor, page_size: int, selection: str) -> torch.Tensor:
    """(B, Hkv, G, pages) fp32: how much each page matters to each query head of ``q`` (B, Hq, 1, D)
    over keys ``k`` (B, Hkv, T, D), by ``selection``:

    ``bound``    Quest's upper bound of the page's largest logit, ``sum_d max(q_d kmax_d, q_d kmin_d)``;
    ``meanstd``  an estimate of it from the page's per-dim key mean and standard deviation,
                 ``q . mean + SPREAD * sqrt(sum_d q_d^2 var_d)`` (the dims taken as independent);
    ``oracle``   the page's true attention mass, the log-sum-exp of its logits (scale ``D**-0.5``).
    """
    b, hq, _, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    pages = -(-t // page_size)
    qg = q.float().view(b, hkv, hq // hkv, 1, d)
    pad = pages * page_size - t
    paged = F.pad(k.float(), (0, 0, 0, pad), value=math.nan).view(b, hkv, pages, page_size, d)
    if selection == "oracle":
        logits = torch.einsum("bhgxd,bhptd->bhgpt", qg, paged.nan_to_num(0.0)) * d ** -0.5
        return logits.masked_fill(paged[:, :, None, :, :, 0].isnan(), -math.inf).logsumexp(-1)
    if selection == "meanstd":
        mean, var = paged.nanmean(3), (paged - paged.nanmean(3, keepdim=True)).square().nanmean(3)
        return (qg * mean[:, :, None]).sum(-1) + SPREAD * (qg.square() * var[:, :, None]).sum(-1).sqrt()
    kmax, kmin = paged.nan_to_num(-math.inf).amax(3), paged.nan_to_num(math.inf).amin(3)
    return torch.maximum(qg * kmax[:, :, None], qg * kmin[:, :, None]).sum(-1)


def quest_pages(q: torch.Tensor, k: torch.Tensor, page_size: int, budget_pages: int,
                per_head: bool = False) -> torch.Tensor | None:
    """(B, Hkv, pages) bool: the pages Quest selects for the one query ``q`` (B, Hq, 1, D) over keys
    ``k`` (B, Hkv, T, D), ranked by :func:`page_scores` (``PROBE.selection``), a KV head's pages
    shared by its group of query heads, or with ``per_head`` chosen by each query head ((B, Hq,
    pages)); None when every page fits the budget."""
    pages = -(-k.shape[2] // page_size)
    if pages <= budget_pages:
        return None
    score = page_scores(q, k, page_size, PROBE.selection)  # (B, Hkv, G, pages)
    score = score.flatten(1, 2) if per_head else score.amax(2)
    score[..., -1] = math.inf  # the query's own page (only it can hold padding)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(budget_pages, -1).indices, True)


def quest_mask(q: torch.Tensor, k: torch.Tensor, page_size: int, budget_pages: int,
               per_head: bool = False) -> torch.Tensor | None:
    """(B, Hq, 1, T) bool mask of the positions in the pages :func:`quest_pages` selects; None when
    every page fits the budget."""
    chosen = quest_pages(q, k, page_size, budget_pages, per_head)
    if chosen is None:
        return None
    tokens = chosen.repeat_interleave(page_size, -1)[..., :k.shape[2]]
    return (tokens if per_head else tokens.repeat_interleave(q.shape[1] // k.shape[1], 1))[:, :, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, upto: int,
           scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, D), lse (B, Hq)) in float32 of the one query ``q`` (B, Hq, D) over the keys at
    positions ``<= upto`` in ``pages`` (B, Hkv, pages) bool; an empty set gives (0, -inf)."""
    group = q.shape[1] // k.shape[1]
    tokens = pages.repeat_interleave(PROBE.page_size, -1)[..., :upto + 1].repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k[:, :, :upto + 1].float().repeat_interleave(group, 1)) * scaling
    scores = scores.masked_fill(~tokens, -math.inf)
    lse = scores.logsumexp(-1)
    out = torch.einsum("bht,bhtd->bhd", (scores - lse[..., None]).exp().nan_to_num(),
                       v[:, :, :upto + 1].float().repeat_interleave(group, 1))
    return out, lse


def window_attention(layer: int, query, key, value, scaling: float) -> torch.Tensor:
    """The retro probe: rows ``t - w + 1 .. t`` of one decode call, (B, w, Hq, D).

    The newest row attends over its Quest pages. A past row ``p`` keeps the pages it has seen (its
    own selection and every later row's) and its output: with ``merge`` (the package's rule) the
    cached output, computed with the row's query of that time, is merged with its current query's
    attention over the pages newly selected; without, its current query attends afresh over every
    page it has seen (no stale query: the merge's drift removed, at the cost of re-reading them)."""
    t, w = PROBE.position, query.shape[2]
    past_k, past_v = PROBE.past[layer]
    past_k[:, :, t - w + 1:t + 1], past_v[:, :, t - w + 1:t + 1] = key, value
    k, v = past_k[:, :, :t + 1], past_v[:, :, :t + 1]
    pages = -(-(t + 1) // PROBE.page_size)
    everything = torch.ones(k.shape[0], k.shape[1], pages, dtype=torch.bool, device=k.device)
    sparse = PROBE.budget_pages is not None and layer >= PROBE.dense_layers
    chosen = quest_pages(query[:, :, -1:], k, PROBE.page_size, PROBE.budget_pages) if sparse else None
    newest = everything if chosen is None else chosen
    rows = PROBE.rows.setdefault(layer, {})
    outs = []
    for i in range(w):
        p, q = t - w + 1 + i, query[:, :, i]
        if p == t or not sparse:
            seen = newest if p == t else everything
            out, lse = attend(q, k, v, seen, p, scaling)
        else:
            if p not in rows:  # a prompt row: the prefill attended densely
                rows[p] = (everything, *attend(q, k, v, everything, p, scaling))
            seen, out, lse = rows[p]
            seen = F.pad(seen, (0, pages - seen.shape[-1]))
            new = newest & ~seen
            seen = seen | newest
            if not PROBE.merge:
                out, lse = attend(q, k, v, seen, p, scaling)
            elif new[..., :p // PROBE.page_size + 1].any():
                out_new, lse_new = attend(q, k, v, new, p, scaling)
                merged = torch.logaddexp(lse, lse_new)
                out = (lse - merged).exp()[..., None] * out + (lse_new - merged).exp()[..., None] * out_new
                lse = merged
        rows[p] = (seen, out, lse)
        outs.append(out)
    for p in [p for p in rows if p <= t - w + 1]:
        del rows[p]  # the oldest row got its last correction
    return torch.stack(outs, 1).to(query.dtype)


def probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layer, group = module.layer_idx, query.shape[1] // key.shape[1]
    if PROBE.window > 1 and PROBE.capture is None:
        return window_attention(layer, query, key, value, scaling), None
    if PROBE.capture is not None:  # the dense pass over the whole text
        PROBE.capture[layer] = (key, value)
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
                                             is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    t = PROBE.position
    past_k, past_v = PROBE.past[layer]
    if PROBE.keep_own:
        past_k[:, :, t:t + 1], past_v[:, :, t:t + 1] = key, value
    k = torch.cat([past_k[:, :, :t], key], 2)
    v = torch.cat([past_v[:, :, :t], value], 2)
    mask = None
    if PROBE.budget_pages is not None and layer >= PROBE.dense_layers:
        mask = quest_mask(query, k, PROBE.page_size, PROBE.budget_pages, PROBE.per_head)
    out = F.scaled_dot_product_attention(query, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("gap_probe", probe_attention)
AttentionMaskInterface.register("gap_probe", sdpa_mask)


@torch.no_grad()
def dense_pass(model, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, dict]:
    """(NLL of positions prefill.. (B, N - prefill), every layer's dense keys and values)."""
    PROBE.capture = {}
    try:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=ids.shape[1] - prefill + 1).logits[:, :-1]
    finally:
        captured, PROBE.capture = PROBE.capture, None
    nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, prefill:], reduction="none")
    return nll, captured


@torch.no_grad()
def probe_nll(model, ids: torch.Tensor, prefill: int, first: torch.Tensor, past: dict, budget_pages: int | None,
              keep_own: bool) -> torch.Tensor:
    """NLL (B, N - prefill) decoding ``ids`` one token a call after a dense prefill whose NLL of
    position ``prefill`` is ``first`` (B,), every call reading ``past`` (and writing into it with
    ``keep_own``), the newest row Quest-selected at ``budget_pages`` (None: dense)."""
    PROBE.past, PROBE.budget_pages, PROBE.keep_own = past, budget_pages, keep_own
    nll = [first]
    for t in range(prefill, ids.shape[1] - 1):
        PROBE.position = t
        logits = model(input_ids=ids[:, t:t + 1], position_ids=torch.full_like(ids[:, :1], t), use_cache=False).logits
        nll.append(F.cross_entropy(logits[:, -1].float(), ids[:, t + 1], reduction="none"))
    return torch.stack(nll, 1)


@torch.no_grad()
def retro_probe_nll(model, ids: torch.Tensor, prefill: int, first: torch.Tensor, past: dict, budget_pages: int,
                    window: int, merge: bool) -> torch.Tensor:
    """As :func:`probe_nll` for the retro probe: each call feeds the ``window`` newest tokens
    again, writes their keys and values over ``past``, and corrects the past rows (merging their
    cached outputs, or with ``merge=False`` recomputing them; see :func:`window_attention`)."""
    PROBE.past, PROBE.budget_pages, PROBE.window, PROBE.merge, PROBE.rows = past, budget_pages, window, merge, {}
    nll = [first]
    try:
        for t in range(prefill, ids.shape[1] - 1):
            PROBE.position = t
            positions = torch.arange(t - window + 1, t + 1, device=ids.device).expand(ids.shape[0], -1)
            logits = model(input_ids=ids[:, t - window + 1:t + 1], position_ids=positions, use_cache=False,
                           logits_to_keep=1).logits
            nll.append(F.cross_entropy(logits[:, -1].float(), ids[:, t + 1], reduction="none"))
    finally:
        PROBE.window, PROBE.rows = 1, {}
    return torch.stack(nll, 1)


def mean(nll: torch.Tensor) -> float:
    return float(nll.float().mean())


def run(args) -> dict:
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    base, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    defaults = RetroConfig()
    PROBE.page_size, PROBE.dense_layers, PROBE.per_head = defaults.page_size, defaults.dense_layers, args.per_head
    texts = passages(tokenizer, args.text, args.passages, args.context)
    if args.passage is not None:
        if not 0 <= args.passage < len(texts):
            raise SystemExit(f"--passage {args.passage}: must be 0..{len(texts) - 1} (--passages {args.passages})")
        texts = dict([list(texts.items())[args.passage]])
    ids = torch.tensor(list(texts.values()), device=args.device)
    probe = copy.deepcopy(base)
    probe.set_attn_implementation("gap_probe")
    result: dict = dict(setup={k: str(v) for k, v in vars(args).items()}, passages=list(texts), rows=[])

    def save(partial: dict | None = None) -> None:
        # after every mode, so a run stopped at a time limit keeps what finished
        out = dict(result, partial_row=partial) if partial else result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))

    dense_nll, captured = zip(*(dense_pass(probe, ids[i:i + 1], args.prefill) for i in range(len(ids))))
    dense_nll = torch.cat(dense_nll)
    result["dense_nll"] = mean(dense_nll)
    for budget in args.budgets:
        pages = budget // PROBE.page_size
        row: dict = dict(budget=budget, dense=mean(dense_nll))
        nll: dict[str, list[torch.Tensor]] = {}
        for i, kv in enumerate(captured):
            one, first = ids[i:i + 1], dense_nll[i:i + 1, 0]

            def own() -> dict:
                return {layer: (k.clone(), v.clone()) for layer, (k, v) in kv.items()}

            def add(name: str, values: torch.Tensor) -> None:
                nll.setdefault(name, []).append(values)
                save(dict(budget=budget, passage=i, done={n: [mean(v) for v in vs] for n, vs in nll.items()}))

            # quest over its own keys and values; the newest row sparse over a dense past; dense over quest's past
            add("quest", probe_nll(probe, one, args.prefill, first, own(), pages, keep_own=True))
            if not args.retro_only:
                add("query_only", probe_nll(probe, one, args.prefill, first, kv, pages, keep_own=False))
                add("past_only", probe_nll(probe, one, args.prefill, first, own(), None, keep_own=False))
            for selection in args.selections:  # the same two runs with pages ranked by another score
                PROBE.selection = selection
                try:
                    add(f"query_only_{selection}", probe_nll(probe, one, args.prefill, first, kv, pages, keep_own=False))
                    add(f"quest_{selection}", probe_nll(probe, one, args.prefill, first, own(), pages, keep_own=True))
                finally:
                    PROBE.selection = "bound"
            for w in args.window if args.retro_probe else []:
                for merge in (True, False):
                    add(f"retro_{'merge' if merge else 'recompute'}_w{w}",
                        retro_probe_nll(probe, one, args.prefill, first, own(), pages, w, merge))
        row.update({name: mean(torch.cat(values)) for name, values in nll.items()})
        row["per_passage"] = {name: [mean(v) for v in values] for name, values in nll.items()}
        package = [] if args.per_head or args.no_package else [("quest", 1)] + [("retro", w) for w in args.window]
        for mode, window in package:
            config = RetroConfig(mode=mode, budget=budget, window=window, max_context=args.context + 16)
            model = retro_compile(copy.deepcopy(base), config, inductor=False)
            package = teacher_forced_nll(model, ids, args.prefill)
            row[f"{mode}_w{window}_package"] = mean(package)
            row["per_passage"][f"{mode}_w{window}_package"] = [mean(v) for v in package]
        gap = row["quest"] - row["dense"]
        # shares of the quest-to-dense gap: what each probe leaves, and what each retro closes
        shares = {name: (row[name] - row["dense"]) / gap for name in row
                  if name.startswith(("query_only", "past_only", "quest_"))}
        shares.update({f"{name.removesuffix('_package')}_closed": (row["quest"] - row[name]) / gap
                       for name in row if name.startswith("retro")})
        row["shares_of_gap"] = shares
        result["rows"].append(row)
        log.info("%s", json.dumps(row))
        save()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--text", choices=["books", "code"], default="books")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 256])
    p.add_argument("--window", type=int, nargs="+", default=[2, 4])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--passages", type=int, default=2)
    p.add_argument("--passage", type=int, default=None,
                   help="run only this one of the --passages passages (0-based), to split a long run")
    p.add_argument("--no-package", action="store_true",
                   help="skip the package's own modes (the probe's quest and retro_merge equal them)")
    p.add_argument("--per-head", action="store_true",
                   help="each query head selects its own pages (the probe's modes only; the package shares a "
                        "KV head's pages across its query heads)")
    p.add_argument("--retro-probe", action="store_true",
                   help="also run the probe's retro at each window, merging past rows' outputs (the package's "
                        "rule) and recomputing them with their current queries (no merge drift)")
    p.add_argument("--selections", nargs="+", choices=["oracle", "meanstd"], default=[],
                   help="also rank pages by these scores (quest_<score> and query_only_<score>; see page_scores)")
    p.add_argument("--retro-only", action="store_true", help="skip the query_only and past_only probes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    run(args)
    log.info("done in %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
