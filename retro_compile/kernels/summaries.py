"""Page summaries (docs/algorithm.md, section 3) on the GPU: ``summarize_pages``, the Triton
stage that replaces ``reference.summarize_pages``, and the ``@triton.jit`` helpers that the scoring
kernel's refresh shares with it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import reference
from .launch import row_starts, unit_last_stride


def check_summary_layout(kmax: torch.Tensor, kmin: torch.Tensor, caller: str) -> None:
    """Summaries written in place are indexed with kmax's strides for both tables."""
    if kmax.stride(-1) != 1 or kmin.stride(-1) != 1 or kmax.stride() != kmin.stride():
        raise ValueError(f"{caller}: kmax and kmin must share a layout with unit last stride")


def scale_argument(kmax: torch.Tensor, summary_scale: torch.Tensor | None, caller: str) -> torch.Tensor:
    """The scale a kernel is given (``reference.table_scale``): int8 tables' own, with unit last
    stride. Other tables never read it and get what was passed, or a stand-in."""
    step = reference.table_scale(kmax, summary_scale, caller)
    if step is None:
        return kmax if summary_scale is None else summary_scale
    return unit_last_stride(step)[0]


# The kernels' @triton.jit helpers take values, never pointers: Inductor's analysis of which
# tensors a kernel writes counts a pointer passed to a helper as written, and then copies it
# before the launch (small copy kernels every step; for the keys of a summary it would be the
# whole cache). So kernels that read the same rows spell out the loads.


@triton.jit
def page_summary(x, ok):
    """Max and min rows (fp32) of a page's keys ``x`` (P, D) over its valid rows ``ok`` (P,), and
    whether it has any; a page with no valid key summarizes to zeros."""
    written = tl.max(ok.to(tl.int32), axis=0) > 0
    kmax = tl.where(written, tl.max(tl.where(ok[:, None], x, float("-inf")), axis=0), 0.0)
    kmin = tl.where(written, tl.min(tl.where(ok[:, None], x, float("inf")), axis=0), 0.0)
    return kmax, kmin, written


@triton.jit
def stored_summary(kmax, kmin, scale, QUANTIZED: tl.constexpr):
    """A page's max and min rows (fp32) as the tables store them: for int8 tables
    (``QUANTIZED``) steps of ``scale`` (D,), rounded outward and saturated
    (``reference.quantize_summary``; correctly rounded division, as PyTorch's); otherwise as they
    are. The caller casts to the tables' dtype."""
    if QUANTIZED:
        kmax = tl.clamp(tl.ceil(tl.div_rn(kmax, scale)), -127.0, 127.0)
        kmin = tl.clamp(tl.floor(tl.div_rn(kmin, scale)), -127.0, 127.0)
    return kmax, kmin


@triton.jit
def _summarize_pages_kernel(
    K, VALID, FIRST, START, KMAX, KMIN, SCALE,
    stride_kb, stride_kh, stride_kl, stride_vb, stride_first,
    stride_sb, stride_sh, stride_sp, stride_cb, stride_ch,
    length, num_pages,
    P: tl.constexpr, D: tl.constexpr, QUANTIZED: tl.constexpr,
):
    b, h, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    page = tl.minimum(tl.load(FIRST + b * stride_first) // P + t, num_pages - 1)
    keys = tl.load(START + b) + page * P + tl.arange(0, P)  # a row's pages start at its first valid slot
    dims = tl.arange(0, D)
    # The keys load beside the valid bytes, not under them: a load whose mask waits on another
    # load waits on it too (the summary leaves out the rows that are not valid).
    inside = keys < length
    ok = inside & (tl.load(VALID + b * stride_vb + keys, mask=inside, other=0) != 0)
    x = tl.load(K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kl + dims[None, :],
                mask=inside[:, None], other=0.0).to(tl.float32)
    kmax, kmin, _ = page_summary(x, ok)
    scale = 1.0
    if QUANTIZED:
        scale = tl.load(SCALE + b * stride_cb + h * stride_ch + dims)
    kmax, kmin = stored_summary(kmax, kmin, scale, QUANTIZED)
    offs = b * stride_sb + h * stride_sh + page * stride_sp + dims
    tl.store(KMAX + offs, kmax.to(KMAX.dtype.element_ty))
    tl.store(KMIN + offs, kmin.to(KMIN.dtype.element_ty))


def summarize_pages(
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    first_position: torch.Tensor,
    count: int,
    page_size: int,
    summary_scale: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> None:
    """Same as ``reference.summarize_pages``: one program per (batch row, KV head, page) reads the
    page's keys once and writes its max and min rows in place (int8 tables: as steps of
    ``summary_scale``). ``first_position`` (B,) may be a strided view (the first row's column of
    the positions), read as it is."""
    b, hkv, length, d = k.shape
    check_summary_layout(kmax, kmin, "summarize_pages")
    k, valid = unit_last_stride(k, valid)
    summary_scale = scale_argument(kmax, summary_scale, "summarize_pages")
    start = row_starts(start, b, k.device)
    wrap_triton(_summarize_pages_kernel)[(b, hkv, count)](
        k, valid, first_position, start, kmax, kmin, summary_scale,
        k.stride(0), k.stride(1), k.stride(2), valid.stride(0), first_position.stride(0),
        kmax.stride(0), kmax.stride(1), kmax.stride(2), summary_scale.stride(0), summary_scale.stride(1),
        length, kmax.shape[2], P=page_size, D=d, QUANTIZED=kmax.dtype == torch.int8,
    )
