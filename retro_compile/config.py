"""RetroConfig: every knob of the sparse + retrospective attention, validated once.

The three modes are presets of one algorithm (see docs/algorithm.md):

* ``"dense"``: nothing is rewritten; the model runs stock SDPA (the baseline).
* ``"quest"``: top-k page selection, one decode row per step (window 1).
* ``"retro"``: Quest plus RetroAttention; each step re-feeds the last ``window - 1`` tokens and
  corrects their attention outputs with the pages the newest query loads (window 2 by default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Union

Mode = Literal["dense", "quest", "retro"]
_MODES = ("dense", "quest", "retro")
SUMMARIES = ("exact", "int8")  # RetroConfig.summaries: how page summaries are stored


@dataclasses.dataclass(frozen=True)
class RetroConfig:
    """Configuration of retro-compile. Every field is checked at construction.

    Args:
        mode: ``"dense"``, ``"quest"`` or ``"retro"``.
        budget: tokens a sparse query may read, counted in whole pages (``budget // page_size``
            pages, the always-kept pages included). An ``int`` is a fixed number of tokens; a
            ``float`` in (0, 1] is a fraction of the current context, turned into pages each
            step and capped at ``budget * max_context`` so that shapes stay static.
        page_size: positions per KV page (a power of two).
        window: decode rows per step, ``w``. ``None`` picks the mode's default (1 for dense and
            quest, 2 for retro). Quest needs 1, retro at least 2.
        dense_layers: layers that always use full attention: an ``int`` ``n`` means the first
            ``n`` attention layers, a tuple lists layer indices.
        sink_pages: pages at the start of the context that every query keeps.
        local_pages: pages ending with the query's own page that every query keeps (at least 1:
            the query's own page is always kept).
        max_context: the longest context (prompt + generated tokens) that state and the static
            KV cache are sized for.
        prefill_tokens: the most prompt tokens, summed over the batch, that one prefill forward
            takes. A longer prompt is prefilled in chunks of ``prefill_tokens // batch`` positions
            (each longer than the window), which bounds the prefill's activation memory: a
            128K-token prompt at batch 4 on an 8B model needs about 40 GiB more in one piece.
        summaries: how page summaries are stored. ``"exact"``: in the key dtype, the pages'
            true max and min. ``"int8"``: one byte an element, a multiple of a per-(batch row,
            KV head, dim) scale set at the prefill (twice the prompt's largest magnitude of that
            dim, over 127), rounded outward so that every page's score stays an upper bound;
            keys beyond that range saturate. Scoring, the largest read of a decode step, then
            reads half the bytes.
    """

    mode: Mode = "retro"
    budget: Union[int, float] = 2048
    page_size: int = 16
    window: int | None = None
    dense_layers: Union[int, tuple[int, ...]] = 2
    sink_pages: int = 0
    local_pages: int = 1
    max_context: int = 8192
    prefill_tokens: int = 131072
    summaries: Literal["exact", "int8"] = "exact"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"RetroConfig.mode={self.mode!r} is not one of {_MODES}")
        if not _is_int(self.page_size) or self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"RetroConfig.page_size={self.page_size!r} must be a power of two >= 1")
        if self.window is None:
            object.__setattr__(self, "window", 2 if self.mode == "retro" else 1)
        if not _is_int(self.window) or self.window < 1:
            raise ValueError(f"RetroConfig.window={self.window!r} must be an int >= 1")
        if self.mode == "quest" and self.window != 1:
            raise ValueError(f"RetroConfig.window={self.window} is not allowed with mode='quest' (needs 1; use mode='retro')")
        if self.mode == "retro" and self.window < 2:
            raise ValueError(f"RetroConfig.window={self.window} is not allowed with mode='retro' (needs >= 2; use mode='quest')")
        if self.mode == "dense" and self.window != 1:
            raise ValueError(f"RetroConfig.window={self.window} is not allowed with mode='dense' (needs 1)")
        for name in ("sink_pages", "local_pages"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"RetroConfig.{name}={value!r} must be an int >= 0")
        if self.local_pages < 1:
            raise ValueError(f"RetroConfig.local_pages={self.local_pages} must be >= 1 (the query's own page is always kept)")
        for name in ("max_context", "prefill_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"RetroConfig.{name}={getattr(self, name)!r} must be an int >= 1")
        if self.summaries not in SUMMARIES:
            raise ValueError(f"RetroConfig.summaries={self.summaries!r} is not one of {SUMMARIES}")
        kept = (self.sink_pages + self.local_pages) * self.page_size
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise TypeError(f"RetroConfig.budget={self.budget!r} must be an int (tokens) or a float in (0, 1] (fraction)")
        if isinstance(self.budget, float):
            if not 0.0 < self.budget <= 1.0:
                raise ValueError(f"RetroConfig.budget={self.budget} as a fraction must lie in (0, 1]")
        elif self.budget < kept:
            raise ValueError(
                f"RetroConfig.budget={self.budget} tokens is below the always-kept pages "
                f"((sink_pages + local_pages) * page_size = {kept})"
            )
        if isinstance(self.dense_layers, int) and not isinstance(self.dense_layers, bool):
            if self.dense_layers < 0:
                raise ValueError(f"RetroConfig.dense_layers={self.dense_layers} must be >= 0")
        elif isinstance(self.dense_layers, (tuple, list)) and all(_is_int(i) and i >= 0 for i in self.dense_layers):
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        else:
            raise TypeError(f"RetroConfig.dense_layers={self.dense_layers!r} must be an int or a tuple of layer indices >= 0")

    @classmethod
    def preset(cls, mode: Mode, **overrides) -> "RetroConfig":
        """The mode's defaults with ``overrides`` applied (``RetroConfig.preset("quest", budget=256)``)."""
        return cls(mode=mode, **overrides)

    # Derived quantities, in one place.
    @property
    def num_pages(self) -> int:
        """Pages needed to cover ``max_context`` positions."""
        return math.ceil(self.max_context / self.page_size)

    @property
    def budget_pages(self) -> int:
        """The most pages a query may read (the cap when ``budget`` is a fraction)."""
        tokens = self.budget * self.max_context if isinstance(self.budget, float) else self.budget
        kept = self.sink_pages + self.local_pages
        return max(kept, min(self.num_pages, int(tokens) // self.page_size))

    @property
    def budget_fraction(self) -> float:
        """The fraction of the context a query may read, 0.0 when ``budget`` is in tokens."""
        return float(self.budget) if isinstance(self.budget, float) else 0.0

    def is_dense_layer(self, layer: int) -> bool:
        if isinstance(self.dense_layers, tuple):
            return layer in self.dense_layers
        return layer < self.dense_layers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
