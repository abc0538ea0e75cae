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

SUMMARY_DTYPES = {"exact": None, "int8": torch.int8}  # each config.SUMMARIES format's table dtype (None: the keys')


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
    dtype: torch.dtype  # the summary tables': the keys' ("exact" summaries) or int8
    device: torch.device

    @classmethod
    def of_call(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_pages: int, window: int,
                summaries: str = "exact") -> "StateShape":
        """The state an SDPA call's layer needs: batch, heads and head dims from ``q``/``k``/``v``
        ((B, H, n, D) each), ``num_pages`` pages of summaries (``summaries``: ``"exact"``, in the
        key dtype, or ``"int8"``; see ``RetroConfig.summaries``), ``window - 1`` cached rows. The
        one place a state's shape is worked out (the rewrite, the benchmark and the tests use it)."""
        if summaries not in SUMMARY_DTYPES:
            raise ValueError(f"summaries={summaries!r} is not one of {tuple(SUMMARY_DTYPES)}")
        return cls(batch=q.shape[0], q_heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3],
                   value_dim=v.shape[3], num_pages=num_pages, window=window,
                   dtype=SUMMARY_DTYPES[summaries] or k.dtype, device=k.device)

    @property
    def nbytes(self) -> int:
        summaries = 2 * self.batch * self.kv_heads * self.num_pages * self.head_dim * self.dtype.itemsize
        last = self.batch * self.kv_heads * self.num_pages * 4
        cached_rows = self.batch * self.q_heads * (self.window - 1) * (self.value_dim + 1) * 4
        counts = self.batch * self.kv_heads * 4
        summary_scale = self.batch * self.kv_heads * self.head_dim * 4
        start = self.batch * 4
        return summaries + last + cached_rows + counts + summary_scale + start


@torch.inference_mode(False)
def allocate(shape: StateShape) -> LayerState:
    """Zeroed state of ``shape``; the prefill fills it. Never an inference tensor, even when the first
    call runs under ``torch.inference_mode()``: later calls outside it update the state in place."""
    b, hq, hkv, np_, w1 = shape.batch, shape.q_heads, shape.kv_heads, shape.num_pages, shape.window - 1
    kw = dict(device=shape.device)
    return LayerState(
        kmax=torch.zeros(b, hkv, np_, shape.head_dim, dtype=shape.dtype, **kw),
        kmin=torch.zeros(b, hkv, np_, shape.head_dim, dtype=shape.dtype, **kw),
        last=torch.zeros(b, hkv, np_, dtype=torch.int32, **kw),
        out_cache=torch.zeros(b, hq, w1, shape.value_dim, dtype=torch.float32, **kw),
        lse_cache=torch.full((b, hq, w1), float("-inf"), dtype=torch.float32, **kw),
        counts=torch.zeros(b, hkv, dtype=torch.int32, **kw),
        summary_scale=torch.ones(b, hkv, shape.head_dim, dtype=torch.float32, **kw),
        start=torch.zeros(b, dtype=torch.int32, **kw),
    )


class StateStore:
    """All decode state of one model, keyed by (layer name, shape), and why other layers stay dense.

    It also keeps the two records behind the rule that a decode step never reads state its prefill
    did not build: which states some compiled prefill graph builds (consulted when a decode graph
    is rewritten), and which state each layer's most recent prefill call built (consulted before
    every decode call; see :func:`retro_compile.backend.guard_state`).
    """

    def __init__(self) -> None:
        self._states: dict[tuple[str, StateShape], LayerState] = {}
        self._prefilled: set[tuple[str, StateShape]] = set()
        self.built: dict[str, LayerState | None] = {}  # layer -> the state its last prefill call built
        self.built_version = 0  # bumped whenever ``built`` changes
        self.dense_reasons: dict[str, str] = {}  # layer name -> why its SDPA call was left as it is
        self.model_dense: dict[int, str] = {}  # layer index -> why the model needs it dense (set by its integration)

    def prefilled(self, layer: str, shape: StateShape) -> bool:
        """Whether a compiled prefill graph builds this layer's state of this shape."""
        return (layer, shape) in self._prefilled

    def mark_prefilled(self, layer: str, shape: StateShape) -> None:
        self._prefilled.add((layer, shape))

    def record_built(self, builds: dict[str, LayerState | None]) -> None:
        """A prefill call ran: each layer's state is now the one it built (None: it built none)."""
        self.built.update(builds)
        self.built_version += 1

    def forget_built(self) -> None:
        """A new request begins: no layer has built state for it yet."""
        self.built.clear()
        self.built_version += 1

    def release(self, batch: int) -> None:
        """Forget the state of every layer at ``batch`` rows (its compiled graphs are gone)."""
        for key in [key for key in self._states if key[1].batch == batch]:
            del self._states[key]
        self._prefilled = {key for key in self._prefilled if key[1].batch != batch}

    def unbuilt(self, reads: dict[str, LayerState]) -> list[str]:
        """The layers among ``reads`` whose last prefill call did not build the state read."""
        return [layer for layer, state in reads.items() if self.built.get(layer) is not state]

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
        return sum(self.memory().values())

    def memory(self) -> dict[str, int]:
        """Bytes of decode state held per layer (every batch size it has decoded at, summed)."""
        usage: dict[str, int] = {}
        for (layer, _), state in self._states.items():
            usage[layer] = usage.get(layer, 0) + sum(t.numel() * t.element_size() for t in state)
        return dict(sorted(usage.items()))

