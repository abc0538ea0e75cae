"""How fast would page scoring be with one-byte summaries? A prototype kernel, timed beside the
package's bf16 scoring (CUDA).

    python scripts/int8_scores.py --out results/int8_scores_h200.json

``scripts/summary_precision.py`` measures the quality side of int8 summaries (each element an
integer multiple, -127..127, of a scale per batch row, KV head and dim); this measures the speed
side. The prototype scores a page as the package's kernel does with matrix products,
``max(q, 0) . kmax + min(q, 0) . kmin``, with the scale folded into the query
(``(max(q, 0) * scale) . kmax_int8``) and the int8 summaries converted to bf16 in registers before
two ``tl.dot``s, so it reads half the bytes. It leaves out what the package's kernel also does:
the valid-position bytes (a page with none scores -inf) and the summary refresh. The summaries it
reads are the benchmark state's bf16 ones, quantized outward with a headroom of 2.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import triton
import triton.language as tl

log = logging.getLogger("int8_scores")


@triton.jit
def _int8_scores_kernel(
    Q, SCALE, KMAX, KMIN, OUT,
    stride_qb, stride_qh, stride_cb, stride_ch, stride_kb, stride_kh, stride_kp, stride_ob, stride_oh,
    num_pages,
    G: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, HEADS: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    b, hkv, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pages = block * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = pages < num_pages
    dims = tl.arange(0, D)
    offs = b * stride_kb + hkv * stride_kh + pages[:, None] * stride_kp + dims[None, :]
    kmax = tl.load(KMAX + offs, mask=ok[:, None], other=0).to(tl.float32).to(DOT_DTYPE)
    kmin = tl.load(KMIN + offs, mask=ok[:, None], other=0).to(tl.float32).to(DOT_DTYPE)
    heads = tl.arange(0, HEADS)
    q = tl.load(Q + b * stride_qb + (hkv * G + heads)[:, None] * stride_qh + dims[None, :],
                mask=(heads < G)[:, None], other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_cb + hkv * stride_ch + dims)
    q_up = (tl.maximum(q, 0.0) * scale[None, :]).to(DOT_DTYPE)
    q_down = (tl.minimum(q, 0.0) * scale[None, :]).to(DOT_DTYPE)
    bound = tl.dot(kmax, tl.trans(q_up)) + tl.dot(kmin, tl.trans(q_down))  # (BLOCK_P, HEADS) fp32
    best = tl.max(tl.where((heads < G)[None, :], bound, float("-inf")), axis=1)
    tl.store(OUT + b * stride_ob + hkv * stride_oh + pages, best, mask=ok)


def int8_scores(q_row: torch.Tensor, scale: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor,
                block_pages: int = 128, num_warps: int = 4) -> torch.Tensor:
    """q_row (B, Hq, D); scale (B, Hkv, D) fp32; kmax, kmin (B, Hkv, NP, D) int8 -> (B, Hkv, NP) fp32:
    each page's bound, maxed over the KV head's query group."""
    b, hq, d = q_row.shape
    hkv, num_pages = kmax.shape[1], kmax.shape[2]
    out = torch.empty(b, hkv, num_pages, dtype=torch.float32, device=q_row.device)
    _int8_scores_kernel[(b, hkv, triton.cdiv(num_pages, block_pages))](
        q_row, scale, kmax, kmin, out,
        q_row.stride(0), q_row.stride(1), scale.stride(0), scale.stride(1),
        kmax.stride(0), kmax.stride(1), kmax.stride(2), out.stride(0), out.stride(1), num_pages,
        G=hq // hkv, D=d, BLOCK_P=block_pages, HEADS=max(16, triton.next_power_of_2(hq // hkv)),
        DOT_DTYPE=tl.bfloat16 if q_row.is_cuda else tl.float16,  # the interpreter has no bf16 products
        num_warps=num_warps,
    )
    return out


def quantize_outward(kmax: torch.Tensor, kmin: torch.Tensor, headroom: float = 2.0):
    """(scale (B, Hkv, D), kmax int8, kmin int8): the max rows rounded up, the min rows down."""
    scale = torch.maximum(kmax.float().abs(), kmin.float().abs()).amax(dim=2) * headroom / 127
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    up = torch.ceil(kmax.float() / scale[:, :, None]).clamp(-127, 127).to(torch.int8)
    down = torch.floor(kmin.float() / scale[:, :, None]).clamp(-127, 127).to(torch.int8)
    return scale.contiguous(), up, down


def main() -> None:
    from retro_compile.bench import graph_us, op_case, stage_inputs
    from retro_compile.kernels import decode

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1x131072", "8x131072"], help="BATCHxCONTEXT")
    p.add_argument("--out", type=Path, default=Path("int8_scores.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("scripts/int8_scores.py times kernels on a CUDA device")
    rows = []
    for shape in args.shapes:
        batch, context = map(int, shape.split("x"))
        state, params, inputs = op_case(batch, context, 2)
        x = stage_inputs(state, params, inputs)
        scale, kmax, kmin = quantize_outward(state.kmax, state.kmin)
        row = dict(batch=batch, context=context, bf16_products_us=round(graph_us(lambda: decode.page_scores(
            x.q_row, state.kmax, state.kmin, x.valid, params.page_size), (), compile=False), 2))
        for block, warps in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8)):
            row[f"int8_products_block{block}_warps{warps}_us"] = round(graph_us(
                lambda: int8_scores(x.q_row, scale, kmax, kmin, block, warps), (), compile=False), 2)
        log.info("%s", row)
        rows.append(row)
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=rows), indent=1))


if __name__ == "__main__":
    main()
