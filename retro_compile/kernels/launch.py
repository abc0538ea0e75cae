"""Launch rules of the Triton stages: how many SMs a device has, whether a grid runs in one wave,
each stage's split and block choices, and the argument layouts every launch shares. The
measurements behind each choice: docs/tuning.md, "Kernel launch choices"."""

from __future__ import annotations

import functools

import torch
import triton


def unit_last_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as the kernels index them (any strides but the last, which must be 1): a view
    that already has it is passed as it is, not copied."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def row_starts(start: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Each row's first valid slot (B,) int32, contiguous, as the kernels read it (None: slot 0)."""
    if start is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    if start.dtype != torch.int32 or start.shape != (batch,):
        raise ValueError(f"start must be int32 of shape ({batch},), got {start.dtype} {tuple(start.shape)}")
    return start.contiguous()


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter runs no programs side by side)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def one_wave(programs: int, device: torch.device, programs_per_sm: int = 1) -> bool:
    """Whether a grid of ``programs`` runs all at once on ``device``, ``programs_per_sm`` an SM (the
    kernel's occupancy); never without a GPU."""
    return programs <= programs_per_sm * sm_count(device)


# Scoring (scoring.page_scores)
SCORING_BLOCK_PAGES = 64  # pages a scoring block holds
SCORING_PROGRAMS_PER_SM = 2  # an SM's: the kernel holds 208-255 registers a thread (Triton 3.6, 4 warps)


def scoring_blocks_per_program(rows: int, blocks_per_row: int, refreshers: int, quantized: bool,
                               device: torch.device) -> int:
    """Blocks of pages a scoring program walks, for ``rows`` (batch row, KV head) pairs of
    ``blocks_per_row`` blocks, with ``refreshers`` refresh programs a pair: as many as leave at
    least 256 programs, at most 8. With stored (not int8) tables and a refresh, more if that brings
    the whole grid, refresh programs included, into one wave of the device's SMs
    (:data:`SCORING_PROGRAMS_PER_SM` each): a second wave of a few programs costs a whole
    program's time. int8 tables lost with the wave rule and keep the first."""
    per_program = min(8, max(1, rows * blocks_per_row // 256))
    if refreshers and not quantized:
        per_program = next((n for n in range(per_program, 9) if one_wave(
            rows * (refreshers + triton.cdiv(blocks_per_row, n)), device, SCORING_PROGRAMS_PER_SM)), per_program)
    return per_program


# Selection (selection.top_pages)
MAX_KERNEL_PAGES = 16384  # one program holds a row of page scores in registers
SPLIT_BELOW_ROWS = 128  # fewer (batch row, KV head) pairs than this: the selection may be split over chunks


def selection_chunk_pages(rows: int, num_pages: int, budget_pages: int) -> int:
    """Pages a selection program ranks when a row is split over chunks, 0 for one program a row.

    One program a (batch row, KV head) leaves most of the GPU idle at small batch (8 programs at
    B=1 with 8 KV heads), so fewer than :data:`SPLIT_BELOW_ROWS` rows split long rows: chunks of
    1024 pages (at least 8 of them) under 32 rows, else of 2048 (at least 4), and never under 4
    times the budget. Splits into fewer chunks lost to one program a row."""
    chunk_pages, min_chunks = (1024, 8) if rows < 32 else (2048, 4)
    chunk_pages = max(chunk_pages, 4 * triton.next_power_of_2(budget_pages))
    if rows >= SPLIT_BELOW_ROWS or num_pages < min_chunks * chunk_pages:
        return 0
    return chunk_pages


def selection_warps(values: int, programs: int, device: torch.device) -> int:
    """Warps of a selection program that ranks ``values`` scores, in a grid of ``programs``. Each
    search round is a reduction over the values: more warps split the comparisons, fewer pay less
    to combine; the histograms' work grows with the values a thread holds, so more warps pay where
    the programs leave SMs idle. 8 from 8192 values, or from 1024 where the grid fits one wave."""
    return 8 if values >= 8192 or (values >= 1024 and one_wave(programs, device)) else 4


# Attention (attention.attend_window, attention.dense_window)
ONE_TILE_PAGES = 8  # splits of at most this many pages are one tile where each program has an SM to itself
DENSE_PAGE = 16  # keys per page when dense_window walks the whole cache


def split_pages(num_pages: int, batch: int, kv_heads: int) -> int:
    """Default pages per split: about 512 programs over (batch, KV heads, splits), each at least 8
    pages (fewer, longer splits leave the merge less to fold)."""
    return max(8, triton.cdiv(num_pages * batch * kv_heads, 512))


def attention_tiles(pages_per_split: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(pages a tile, software-pipeline stages) of the sparse attention: where every program has an
    SM to itself and a split is at most :data:`ONE_TILE_PAGES`, a split is one tile loaded without
    pipelining (alone on its SM a program's serial latency is the stage's time, and a pipeline of
    one iteration only adds its staging and barriers); otherwise 4-page tiles in 3 stages, which
    keep more loads in flight with several programs an SM."""
    if pages_per_split <= ONE_TILE_PAGES and one_wave(programs, device):
        return ONE_TILE_PAGES, 1
    return 4, 3


def dense_tile_pages(pages_per_split: int) -> int:
    """Pages a tile of dense_window: 8 for splits of at least 32 pages, else 4."""
    return 8 if pages_per_split >= 32 else 4
