"""The per-layer decode state: its schema (fields, shapes, dtypes, initial values), its
allocation, and the store that owns every layer's state.

A compiled decode step bakes the addresses of its state tensors in (CUDA graphs replay them), so
state is never reallocated for a layer and batch size it already has: a new request simply
overwrites it in its prefill, which rebuilds every field from the prompt.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, NamedTuple

import torch

log = logging.getLogger(__name__)

SUMMARY_DTYPES = {"exact": None, "int8": torch.int8}  # each config.SUMMARIES format's table dtype (None: the keys')


class LayerState(NamedTuple):
    """One sparse layer's decode state, updated in place by ``retro::attention``. Shapes and dtypes:
    :meth:`StateShape.fields`."""

    # (B, Hkv, NP, D), the key dtype or int8: element-wise max of each page's valid keys, and min.
    # int8 tables hold each element as a multiple of its (batch row, KV head, dim)'s summary_scale.
    kmax: torch.Tensor
    kmin: torch.Tensor
    last: torch.Tensor  # (B, Hkv, NP) int32: last step (position) whose query loaded the page
    out_cache: torch.Tensor  # (B, Hq, w-1, Dv) fp32: outputs of the last w-1 rows, oldest first
    lse_cache: torch.Tensor  # (B, Hq, w-1) fp32: their log-sum-exp
    # (B, Hkv, D) fp32: int8 summaries stand for table x summary_scale (set by the prefill,
    # ``reference.prompt_summary_scale``); tables in the key dtype never read it.
    summary_scale: torch.Tensor
    # (B,) int32: each row's first valid cache slot, set by the prefill. A row's pages are counted
    # from it, so that its left padding never moves a page boundary.
    start: torch.Tensor


STATE_FIELDS = LayerState._fields


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
        key dtype, or ``"int8"``; see ``RetroConfig.summaries``), ``window - 1`` cached rows."""
        if summaries not in SUMMARY_DTYPES:
            raise ValueError(f"summaries={summaries!r} is not one of {tuple(SUMMARY_DTYPES)}")
        return cls(batch=q.shape[0], q_heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3],
                   value_dim=v.shape[3], num_pages=num_pages, window=window,
                   dtype=SUMMARY_DTYPES[summaries] or k.dtype, device=k.device)

    def fields(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, float]]:
        """The schema: each :class:`LayerState` field's (shape, dtype, value a new state holds)."""
        b, hq, hkv, pages, d = self.batch, self.q_heads, self.kv_heads, self.num_pages, self.head_dim
        rows = self.window - 1
        return {
            "kmax": ((b, hkv, pages, d), self.dtype, 0),
            "kmin": ((b, hkv, pages, d), self.dtype, 0),
            "last": ((b, hkv, pages), torch.int32, 0),
            "out_cache": ((b, hq, rows, self.value_dim), torch.float32, 0),
            "lse_cache": ((b, hq, rows), torch.float32, float("-inf")),
            "summary_scale": ((b, hkv, d), torch.float32, 1),
            "start": ((b,), torch.int32, 0),
        }

    def mismatch(self, state: LayerState) -> tuple[type[Exception], str] | None:
        """``(exception type, why)`` for the first field of ``state`` that is not of this shape, dtype
        and device, naming it; None if every field is."""
        for name, (shape, dtype, _) in self.fields().items():
            t = getattr(state, name)
            if tuple(t.shape) != shape:
                return ValueError, f"state {name} has shape {tuple(t.shape)}, expected {shape}"
            if t.dtype != dtype:
                return TypeError, f"state {name} has dtype {t.dtype}, expected {dtype}"
            if t.device != self.device:
                return ValueError, f"state {name} is on {t.device}, the keys on {self.device}"
        return None

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype, _ in self.fields().values())


@torch.inference_mode(False)
def allocate(shape: StateShape) -> LayerState:
    """A new state of ``shape`` (:meth:`StateShape.fields`); the prefill fills it. Never an
    inference tensor, even when the first call runs under ``torch.inference_mode()``: later calls
    outside it update the state in place."""
    return LayerState(**{name: torch.full(size, value, dtype=dtype, device=shape.device)
                         for name, (size, dtype, value) in shape.fields().items()})


class StateStore:
    """All decode state of one model, keyed by (layer name, shape), and why other layers stay dense.

    The store is the one writer of what it holds; the rewrite, the run-time guard, the driver and
    the installer change it through the methods below. It also keeps the two records behind the
    rule that a decode step never reads state its prefill did not build: which states some
    compiled prefill graph builds (consulted when a decode graph is rewritten), and which state
    each layer's most recent prefill call built (consulted before every decode call; see
    :func:`retro_compile.backend.guard_state`).
    """

    def __init__(self) -> None:
        self._states: dict[tuple[str, StateShape], LayerState] = {}
        self._prefilled: set[tuple[str, StateShape]] = set()
        self._built: dict[str, LayerState | None] = {}  # layer -> the state its last prefill call built
        self._built_version = 0  # bumped whenever ``_built`` changes
        self._dense_reasons: dict[str, str] = {}  # layer name -> why its SDPA call was left as it is
        self._model_dense: dict[int, str] = {}  # layer index -> why the model needs it dense

    @property
    def dense_reasons(self) -> Mapping[str, str]:
        """Layer name -> why its SDPA call stays dense (read-only)."""
        return MappingProxyType(self._dense_reasons)

    @property
    def model_dense(self) -> Mapping[int, str]:
        """Layer index -> why the model's design needs it dense, such as a sliding window (read-only)."""
        return MappingProxyType(self._model_dense)

    @property
    def built_version(self) -> int:
        """A number that changes whenever the record of built state does."""
        return self._built_version

    def declare_model_dense(self, layer_index: int, reason: str) -> None:
        """The model's integration says a layer must stay dense, and why."""
        self._model_dense[layer_index] = reason

    def note_dense(self, layer: str, reason: str) -> bool:
        """Record why a layer's SDPA call stays dense; True if that is news (a new or changed reason)."""
        if self._dense_reasons.get(layer) == reason:
            return False
        self._dense_reasons[layer] = reason
        return True

    def prefilled(self, layer: str, shape: StateShape) -> bool:
        """Whether a compiled prefill graph builds this layer's state of this shape."""
        return (layer, shape) in self._prefilled

    def mark_prefilled(self, layer: str, shape: StateShape) -> None:
        self._prefilled.add((layer, shape))

    def record_built(self, builds: dict[str, LayerState | None]) -> None:
        """A prefill call ran: each layer's state is now the one it built (None: it built none)."""
        self._built.update(builds)
        self._built_version += 1

    def forget_built(self) -> None:
        """A new request begins: no layer has built state for it yet."""
        self._built.clear()
        self._built_version += 1

    def release(self, batch: int) -> None:
        """Forget the state of every layer at ``batch`` rows (its compiled graphs are gone)."""
        for key in [key for key in self._states if key[1].batch == batch]:
            del self._states[key]
        self._prefilled = {key for key in self._prefilled if key[1].batch != batch}

    def unbuilt(self, reads: dict[str, LayerState]) -> list[str]:
        """The layers among ``reads`` whose last prefill call did not build the state read."""
        return [layer for layer, state in reads.items() if self._built.get(layer) is not state]

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

