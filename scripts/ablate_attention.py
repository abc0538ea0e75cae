"""Where the attention stage's time goes, part by part: the stage beside copies of itself each with
one part taken out (CUDA).

    python scripts/ablate_attention.py --out ablate_attention.json

Each variant is ``retro_compile/kernels/decode.py`` with a few lines of its source replaced (see
``VARIANTS``), imported as a module of its own, so the kernels as they ship are never touched and
every variant compiles from the same text. The stage is ``attend_window`` with its default
launch choices (the attention kernel, then the merge kernel), timed as
``python -m retro_compile.bench op`` times its stages: device time per call from a CUDA graph of
20 calls. Variants that skip a load or a product compute a wrong result; their time is the point.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from retro_compile.bench import graph_us, measure, op_case, stage_inputs
from retro_compile.kernels import decode

log = logging.getLogger("ablate_attention")

# name -> (old, new) source replacements; each old text must occur exactly once.
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "as_is": [],
    "attention_kernel_only": [  # no merge launch
        ("    wrap_triton(_merge_window_kernel)[(b, hq)](", "    if False: wrap_triton(_merge_window_kernel)[(b, hq)]("),
    ],
    "merge_kernel_only": [  # no attention launch (the merge folds whatever the partial buffers hold)
        ("    wrap_triton(_window_attention_kernel)[(b, hkv, splits)](",
         "    if False: wrap_triton(_window_attention_kernel)[(b, hkv, splits)]("),
    ],
    "no_stamp": [  # `last` is not stamped after the loop (no barrier, no stores)
        ("    if not DENSE:\n        # Stamp this split's pages", "    if False:\n        # Stamp this split's pages"),
    ],
    "no_mask_load": [  # the byte mask is not read: every key of a chosen page is allowed
        ("allowed = tl.load(ALLOWED + b * stride_ab + win[:, None, None] * stride_an + page_keys[None, :, :],\n"
         "                          mask=row_ok[:, :, None] & page_inside[None, :, :], other=0)",
         "allowed = (row_ok[:, :, None] & page_inside[None, :, :]).to(tl.int8)"),
    ],
    "no_last_load": [  # `last` is not read: past rows see every chosen page
        ("seen_at = tl.load(LAST + b * stride_lb + hkv * stride_lh + page, mask=page >= 0, other=0)",
         "seen_at = tl.zeros_like(page)"),
    ],
    "no_query_load": [
        ("    q = tl.load(Q + b * stride_qb + (hkv * G + head)[:, None] * stride_qh + win[:, None] * stride_qn + dims[None, :],\n"
         "                mask=live[:, None], other=0.0)",
         "    q = tl.zeros((ROWS, D), Q.dtype.element_ty)"),
    ],
    "no_products": [  # no tl.dot: the keys and values go unread, so their loads go too
        ("s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)",
         "s = tl.zeros((ROWS, TILE * P), tl.float32) + scale"),
        ("acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)",
         "acc = acc * alpha[:, None] + tl.sum(p, axis=1)[:, None]"),
    ],
}
# The products with their operands swapped: keys x query rows, then values^T x probabilities, so a
# product's M is the tile's keys (or the value dims) and N the 16 padded rows (Hopper's warp-group
# products take M >= 64 from shared memory; M = 16 query rows takes the older per-warp ones).
VARIANTS["swapped_products"] = [
    ("    acc = tl.zeros((ROWS, DV), tl.float32)\n", "    acc = tl.zeros((DV, ROWS), tl.float32)\n"),
    ("            row_ok = live[:, None] & (page >= 0)[None, :]  # (ROWS, TILE)",
     "            row_ok = live[None, :] & (page >= 0)[:, None]  # (TILE, ROWS)"),
    ("            row_ok = live[:, None] & (newest[:, None] | (seen_at[None, :] < position[:, None]))  # (ROWS, TILE)",
     "            row_ok = live[None, :] & (newest[None, :] | (seen_at[:, None] < position[None, :]))  # (TILE, ROWS)"),
    ("        allowed = tl.load(ALLOWED + b * stride_ab + win[:, None, None] * stride_an + page_keys[None, :, :],\n"
     "                          mask=row_ok[:, :, None] & page_inside[None, :, :], other=0)  # (ROWS, TILE, P)\n"
     "        allowed = tl.reshape(allowed, (ROWS, TILE * P))\n"
     "        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)  # (ROWS, TILE * P)\n"
     "        s = tl.where(allowed != 0, s, float(\"-inf\"))\n"
     "        m_new = tl.maximum(m, tl.max(s, axis=1))\n"
     "        shift = tl.where(m_new == float(\"-inf\"), 0.0, m_new)  # rows with no key yet stay at zero\n"
     "        alpha = tl.exp(m - shift)\n"
     "        p = tl.exp(s - shift[:, None])\n"
     "        l = l * alpha + tl.sum(p, axis=1)\n"
     "        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)\n",
     "        allowed = tl.load(ALLOWED + b * stride_ab + win[None, None, :] * stride_an + page_keys[:, :, None],\n"
     "                          mask=row_ok[:, None, :] & page_inside[:, :, None], other=0)  # (TILE, P, ROWS)\n"
     "        allowed = tl.reshape(allowed, (TILE * P, ROWS))\n"
     "        s = (tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale).to(tl.float32)  # (TILE * P, ROWS)\n"
     "        s = tl.where(allowed != 0, s, float(\"-inf\"))\n"
     "        m_new = tl.maximum(m, tl.max(s, axis=0))\n"
     "        shift = tl.where(m_new == float(\"-inf\"), 0.0, m_new)  # rows with no key yet stay at zero\n"
     "        alpha = tl.exp(m - shift)\n"
     "        p = tl.exp(s - shift[None, :])\n"
     "        l = l * alpha + tl.sum(p, axis=0)\n"
     "        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype), input_precision=PRECISION)\n"),
    ("    out_offs = b * stride_ob + hkv * stride_oh + split * stride_os + rows[:, None] * stride_or + vdims[None, :]\n"
     "    tl.store(OUT + out_offs, acc / tl.where(l > 0, l, 1.0)[:, None], mask=live[:, None])",
     "    out_offs = b * stride_ob + hkv * stride_oh + split * stride_os + rows[None, :] * stride_or + vdims[:, None]\n"
     "    tl.store(OUT + out_offs, acc / tl.where(l > 0, l, 1.0)[None, :], mask=live[None, :])"),
]
VARIANTS["swapped_products_warps8"] = VARIANTS["swapped_products"] + [
    ("DENSE=dense, num_warps=num_warps, num_stages=num_stages,", "DENSE=dense, num_warps=8, num_stages=num_stages,")]


def _between(start: str, end: str) -> str:
    """decode.py's text from ``start`` up to (not including) ``end``."""
    source = Path(decode.__file__).read_text()
    first = source.index(start)
    return source[first:source.index(end, first)]


# The keys of a tile in 4 groups, one per warp, each with its own running max, sum and output (a
# batched product over the groups), merged once after the loop: the products' row reductions and
# the probabilities' conversion for the second product stay inside a warp.
VARIANTS["warp_key_groups"] = [(_between("    m = tl.full((ROWS,)", "    if not DENSE:\n        # Stamp"), """\
    m = tl.full((W, ROWS), float("-inf"), tl.float32)
    l = tl.zeros((W, ROWS), tl.float32)
    acc = tl.zeros((W, ROWS, DV), tl.float32)
    q3 = tl.broadcast_to(q[None, :, :], (W, ROWS, D))
    first = split * pages_per_split
    selection = b * stride_pb + hkv * stride_ph  # this (batch row, KV head)'s list of selected pages
    end = tl.minimum(first + pages_per_split, num_selected)
    within = tl.arange(0, P)
    if ONE_TILE and not DENSE:  # a split of one tile: its pages serve the tile and the stamp after it
        slot = first + tl.arange(0, TILE)
        split_page = _selected_pages(tl.load(INDICES + selection + slot, mask=slot < end, other=-1),
                                     tl.load(CHOSEN + selection + slot, mask=slot < end, other=0))
    for j in range(first, end, TILE):  # TILE pages per iteration
        slot = j + tl.arange(0, TILE)
        if DENSE:  # every page of the cache, no selection
            page = tl.where(slot < end, slot, -1)
        elif ONE_TILE:
            page = split_page
        else:
            page = _selected_pages(tl.load(INDICES + selection + slot, mask=slot < end, other=-1),
                                   tl.load(CHOSEN + selection + slot, mask=slot < end, other=0))
        page_keys = page[:, None] * P + within[None, :]  # (TILE, P)
        page_inside = (page[:, None] >= 0) & (page_keys < length)
        keys = tl.reshape(page_keys, (W, TILE * P // W))
        inside = tl.reshape(page_inside, (W, TILE * P // W))
        k = tl.load(K + b * stride_kb + hkv * stride_kh + keys[:, :, None] * stride_kl + dims[None, None, :],
                    mask=inside[:, :, None], other=0.0)
        v = tl.load(V + b * stride_vb + hkv * stride_vh + keys[:, :, None] * stride_vl + vdims[None, None, :],
                    mask=inside[:, :, None], other=0.0)
        if DENSE:
            row_ok = live[None, :, None] & inside[:, None, :]  # (W, ROWS, KW)
        else:  # past rows see only pages they never saw
            seen_at = tl.load(LAST + b * stride_lb + hkv * stride_lh + page, mask=page >= 0, other=0)  # (TILE,)
            seen_key = tl.reshape(tl.broadcast_to(seen_at[:, None], (TILE, P)), (W, TILE * P // W))
            row_ok = live[None, :, None] & inside[:, None, :] & (
                newest[None, :, None] | (seen_key[:, None, :] < position[None, :, None]))
        allowed = tl.load(ALLOWED + b * stride_ab + win[None, :, None] * stride_an + keys[:, None, :],
                          mask=row_ok, other=0)  # (W, ROWS, KW)
        s = (tl.dot(q3, tl.trans(k, (0, 2, 1)), input_precision=PRECISION) * scale).to(tl.float32)
        s = tl.where(allowed != 0, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=2))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
        alpha = tl.exp(m - shift)
        p = tl.exp(s - shift[:, :, None])
        l = l * alpha + tl.sum(p, axis=2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    top = tl.max(m, axis=0)  # the groups merged: (ROWS,)
    shift = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(m - shift[None, :])
    l = tl.sum(l * weight, axis=0)
    acc = tl.sum(acc * weight[:, :, None], axis=0)
    out_offs = b * stride_ob + hkv * stride_oh + split * stride_os + rows[:, None] * stride_or + vdims[None, :]
    tl.store(OUT + out_offs, acc / tl.where(l > 0, l, 1.0)[:, None], mask=live[:, None])
    lse = tl.where(l > 0, shift + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    tl.store(LSE + b * stride_eb + hkv * stride_eh + split * stride_es + rows, lse, mask=live)
"""), ("    TILE: tl.constexpr, ONE_TILE: tl.constexpr,", "    TILE: tl.constexpr, W: tl.constexpr, ONE_TILE: tl.constexpr,"),
    ("TILE=tile, ONE_TILE=", "TILE=tile, W=4, ONE_TILE=")]
EXACT = ("swapped_products", "swapped_products_warps8", "warp_key_groups")  # the others compute less
VARIANTS["attention_kernel_only_no_stamp"] = VARIANTS["attention_kernel_only"] + VARIANTS["no_stamp"]
VARIANTS["attention_kernel_only_no_products_no_stamp"] = (VARIANTS["attention_kernel_only"] + VARIANTS["no_products"]
                                                          + VARIANTS["no_stamp"])
VARIANTS["attention_kernel_only_nothing_read"] = (  # the query, keys, values, mask and `last` all unread
    VARIANTS["attention_kernel_only"] + VARIANTS["no_products"] + VARIANTS["no_stamp"] + VARIANTS["no_mask_load"]
    + VARIANTS["no_last_load"] + VARIANTS["no_query_load"])


def variant_module(name: str, folder: Path):
    """decode.py with ``VARIANTS[name]`` applied, imported as a sibling module (its relative imports work)."""
    source = Path(decode.__file__).read_text()
    for old, new in VARIANTS[name]:
        if source.count(old) != 1:
            raise ValueError(f"variant {name}: {old!r} occurs {source.count(old)} times in decode.py, not once")
        source = source.replace(old, new)
    path = folder / f"ablate_{name}.py"
    path.write_text(source)  # a file, so Triton can read each kernel's source back
    module_name = f"retro_compile.kernels._ablate_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def ablate(batch: int, context: int, modules: dict, warps: list[int], dense: list[str]) -> dict:
    state, params, inputs = op_case(batch, context, 2)
    x = stage_inputs(state, params, inputs)
    no_page = torch.zeros_like(x.chosen)
    row: dict = dict(batch=batch, context=context)

    def step(module, chosen=x.chosen, layer_state=state):
        return module.attend_window(x.q, x.k, x.v, x.allowed, None, x.indices, chosen, layer_state, x.position,
                                    x.scale, params.page_size)

    def timed(key, fn):  # a variant that does not compile is recorded as key_error, not fatal
        measure(row, key, lambda: round(graph_us(fn, (), compile=False), 2))
        log.info("B=%d %dK %s: %s", batch, context // 1024, key, row.get(key))

    for name, module in modules.items():
        timed(name, lambda: step(module))
        timed(name + "_no_pages", lambda: step(module, no_page))
        if name in EXACT:  # the same result as the kernels as they ship, from the same state
            measure(row, name + "_max_abs_diff", lambda: (step(module, layer_state=_copy(state)).float() - step(
                decode, layer_state=_copy(state)).float()).abs().max().item())
    for name in dense:  # a dense layer's window over the whole cache (retro's dense layers), same kernels
        timed(f"{name}_dense_window", lambda: modules[name].dense_window(x.q, x.k, x.v, x.allowed, x.scale))
    for w in warps:
        timed(f"as_is_warps{w}", lambda: decode.attend_window(
            x.q, x.k, x.v, x.allowed, None, x.indices, x.chosen, state, x.position, x.scale, params.page_size,
            num_warps=w))
    return row


def _copy(state):
    return type(state)(*(t.clone() for t in state))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1x32768", "1x131072", "8x131072"], help="BATCHxCONTEXT")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--warps", type=int, nargs="*", default=[2, 8], help="the stage as is with these warps too")
    p.add_argument("--dense", nargs="*", default=[], choices=list(VARIANTS),
                   help="variants whose dense_window is timed too")
    p.add_argument("--check", action="store_true", help="only build the variants (no GPU needed)")
    p.add_argument("--out", type=Path, default=Path("ablate_attention.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as folder:
        modules = {name: variant_module(name, Path(folder)) for name in args.variants}
        if args.check:
            log.info("%d variants build", len(modules))
            return
        rows = []
        for shape in args.shapes:
            batch, context = map(int, shape.split("x"))
            rows.append(ablate(batch, context, modules, args.warps, args.dense))
            args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=rows), indent=2))


if __name__ == "__main__":
    main()
