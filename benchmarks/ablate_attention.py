"""Where the attention stage's time goes, part by part: the stage beside copies of itself each with
one part taken out (CUDA).

    python benchmarks/ablate_attention.py --out ablate_attention.json

Each variant is ``retro_compile/kernels/decode.py`` with a few lines of its source replaced (see
``VARIANTS``), imported as a module of its own, so the kernels as they ship are never touched and
every variant compiles from the same text. The stage is ``attend_window`` with its default
launch choices (the attention kernel, then the merge kernel), timed as
``python -m retro_compile.bench op`` times its stages: device time per call from a CUDA graph of
20 calls. Variants that skip a load or a product compute a wrong result; their time is the point.
Two variants that computed the same result another way were measured and dropped; their code is in
this script as of commit 7c26b6d (``swapped_products``, ``warp_key_groups``).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from retro_compile.bench import kernels_module, measure_call, op_case, stage_inputs
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
         "                          mask=live[:, None, None] & page_inside[None, :, :], other=0)",
         "allowed = (live[:, None, None] & page_inside[None, :, :]).to(tl.int8)"),
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
VARIANTS["attention_kernel_only_no_stamp"] = VARIANTS["attention_kernel_only"] + VARIANTS["no_stamp"]
VARIANTS["attention_kernel_only_no_products_no_stamp"] = (VARIANTS["attention_kernel_only"] + VARIANTS["no_products"]
                                                          + VARIANTS["no_stamp"])
VARIANTS["attention_kernel_only_nothing_read"] = (  # the query, keys, values, mask and `last` all unread
    VARIANTS["attention_kernel_only"] + VARIANTS["no_products"] + VARIANTS["no_stamp"] + VARIANTS["no_mask_load"]
    + VARIANTS["no_last_load"] + VARIANTS["no_query_load"])


def variant_module(name: str, folder: Path):
    """decode.py with ``VARIANTS[name]`` applied, imported as a module of its own."""
    return kernels_module(Path(decode.__file__).read_text(), f"ablate_{name}", folder, VARIANTS[name])


def ablate(batch: int, context: int, modules: dict, warps: list[int], dense: list[str]) -> dict:
    state, params, inputs = op_case(batch, context, 2)
    x = stage_inputs(state, params, inputs)
    no_page = torch.zeros_like(x.chosen)
    row: dict = dict(batch=batch, context=context)

    def step(module, chosen=x.chosen, **launch):
        return module.attend_window(x.q, x.k, x.v, x.allowed, None, x.indices, chosen, state, x.position, x.scale,
                                    params.page_size, **launch)

    # a variant that does not compile is recorded as key_error, not fatal
    for name, module in modules.items():
        measure_call(row, name, lambda: step(module))
        measure_call(row, name + "_no_pages", lambda: step(module, no_page))
    for name in dense:  # a dense layer's window over the whole cache (retro's dense layers), same kernels
        measure_call(row, f"{name}_dense_window", lambda: modules[name].dense_window(x.q, x.k, x.v, x.allowed, x.scale))
    for w in warps:
        measure_call(row, f"as_is_warps{w}", lambda: step(decode, num_warps=w))
    return row


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
    if not set(args.dense) <= set(args.variants):
        p.error(f"--dense {args.dense} must be among --variants {args.variants}")
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
