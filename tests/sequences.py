"""A decode sequence driven by hand through retro::attention with fixed q/k/v per position.

With queries, keys and values fixed per position, every mode has an exact closed form (dense
attention, Quest, attention over a union of page sets), which the tests compute independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retro_compile.kernels.op import retro_attention
from retro_compile.kernels.reference import SparseParams
from retro_compile.state import StateShape, allocate


@dataclass
class Problem:
    q: torch.Tensor  # (B, Hq, L, D): the query of every position
    k: torch.Tensor  # (B, Hkv, L, D)
    v: torch.Tensor
    valid: torch.Tensor  # (B, L): False on left padding
    prompt: int

    @property
    def length(self) -> int:
        return self.k.shape[2]


def make_problem(batch=2, q_heads=4, kv_heads=2, head_dim=16, length=96, prompt=40, pad=(0, 5),
                 dtype=torch.float32, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, length, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=g).to(dtype)
    valid = torch.ones(batch, length, dtype=torch.bool)
    for b, p in enumerate(pad[:batch]):
        valid[b, :p] = False
    return Problem(q, k, v, valid, prompt)


def mask_for(problem: Problem, positions: list[int]) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, n, L): key j visible to row i if valid and j <= positions[i].

    A padded query row sees itself only, as Hugging Face's masks keep such rows finite.
    """
    j = torch.arange(problem.length, device=problem.valid.device)
    rows = []
    for p in positions:
        row = problem.valid & (j <= p)
        row = row | (~row.any(dim=1, keepdim=True) & (j == p))
        rows.append(row)
    return torch.stack(rows, dim=1)[:, None]


def dense_rows(problem: Problem, positions: list[int]) -> torch.Tensor:
    """SDPA (fp32) of the given rows against the whole cache: the dense oracle."""
    q = problem.q[:, :, positions].float()
    return F.scaled_dot_product_attention(q, problem.k.float(), problem.v.float(),
                                          attn_mask=mask_for(problem, positions),
                                          enable_gqa=q.shape[1] != problem.k.shape[1])


def run(problem: Problem, params: SparseParams, steps: int, num_pages: int | None = None, summaries: str = "exact"):
    """Prefill the prompt, then ``steps`` decode steps. Yields (positions, output) per call."""
    num_pages = num_pages or -(-problem.q.shape[2] // params.page_size)
    state = allocate(StateShape.of_call(problem.q, problem.k, problem.v, num_pages, params.window, summaries))
    positions = list(range(problem.prompt))
    out = retro_attention(problem.q[:, :, positions], problem.k, problem.v, mask_for(problem, positions), state, params)
    yield positions, out
    for t in range(problem.prompt, problem.prompt + steps):
        n = min(params.window, t + 1)
        positions = list(range(t - n + 1, t + 1))
        out = retro_attention(problem.q[:, :, positions], problem.k, problem.v, mask_for(problem, positions),
                              state, params)
        yield positions, out
