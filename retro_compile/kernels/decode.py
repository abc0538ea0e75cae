"""The Triton stages of a decode step (docs/algorithm.md, section 7), one module a stage, each a
drop-in replacement for the ``reference`` function of the same name (same arguments, same
results), so that ``reference.decode_step`` and ``reference.prefill`` run either:

* :mod:`.summaries`: ``summarize_pages``, page key max/min in place, as they are or as int8 steps
  of a per-dim scale (``reference.quantize_summary``);
* :mod:`.scoring`: ``page_scores``, Quest's page bound, reading each summary once, the GQA group
  max fused, a step's written pages summarized anew by spare programs of the same launch;
* :mod:`.selection`: ``top_pages``, the page selection without a sort;
* :mod:`.attention`: ``attend_window``, split-KV sparse attention and the state update in two
  kernels, and ``dense_window``, a dense layer's window rows over the whole cache;
* :mod:`.launch`: the launch rules they share (grid waves, splits, blocks, tiles).

The kernels read their small inputs (the query's newest row, positions) through strides, so a step
launches little besides them.
"""

from __future__ import annotations

from . import attention, reference, scoring, selection, summaries
from .attention import attend_window, dense_window
from .scoring import page_scores
from .selection import top_pages
from .summaries import summarize_pages

STAGE_MODULES = (summaries, scoring, selection, attention)  # every module that launches a kernel

__all__ = ["STAGE_MODULES", "attend_window", "dense_window", "kernel_stages", "page_scores", "summarize_pages",
           "top_pages"]


def kernel_stages() -> reference.Stages:
    """The Triton stages, for ``reference.decode_step`` and ``reference.prefill``."""
    return reference.Stages(summarize_pages, page_scores, top_pages, attend_window)
