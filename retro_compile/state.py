"""Fixed-shape per-layer decode state, allocated once per (layer, batch size) and then reused.

A compiled decode step bakes the addresses of its state tensors in (CUDA graphs replay them), so
state is never reallocated for a layer and batch size it already has: a new request simply
overwrites it in its prefill, which rebuilds every field from the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .kernels.reference import LayerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateShape:
    """What a layer's state depends on."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    num_pages: int
    window: int
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        summaries = 2 * self.batch * self.kv_heads * self.num_pages * self.head_dim * self.dtype.itemsize
        last = self.batch * self.kv_heads * self.num_pages * 4
        cached_rows = self.batch * self.q_heads * (self.window - 1) * (self.value_dim + 1) * 4
        return summaries + last + cached_rows


def allocate(shape: StateShape) -> LayerState:
    """Zeroed state of ``shape``; the prefill fills it."""
    b, hq, hkv, np_, w1 = shape.batch, shape.q_heads, shape.kv_heads, shape.num_pages, shape.window - 1
    kw = dict(device=shape.device)
    return LayerState(
        kmax=torch.zeros(b, hkv, np_, shape.head_dim, dtype=shape.dtype, **kw),
        kmin=torch.zeros(b, hkv, np_, shape.head_dim, dtype=shape.dtype, **kw),
        last=torch.zeros(b, hkv, np_, dtype=torch.int32, **kw),
        out_cache=torch.zeros(b, hq, w1, shape.value_dim, dtype=torch.float32, **kw),
        lse_cache=torch.full((b, hq, w1), float("-inf"), dtype=torch.float32, **kw),
    )


class StateStore:
    """All decode state of one model, keyed by (layer name, shape), and why other layers stay dense."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, StateShape], LayerState] = {}
        self.dense_reasons: dict[str, str] = {}  # layer name -> why its SDPA call was left as it is

    def get(self, layer: str, shape: StateShape) -> LayerState:
        key = (layer, shape)
        if key not in self._states:
            self._states[key] = allocate(shape)
            log.debug("allocated %.1f MiB of decode state for %s (%s)", shape.nbytes / 2**20, layer, shape)
        return self._states[key]

    def states(self) -> list[LayerState]:
        """Every layer's state, in layer-name order (one model usually decodes at one batch size)."""
        return [self._states[key] for key in sorted(self._states, key=lambda key: key[0])]

    def layers(self) -> list[str]:
        return sorted({layer for layer, _ in self._states})

    @property
    def nbytes(self) -> int:
        """Bytes of decode state held for this model."""
        return sum(shape.nbytes for _, shape in self._states)

