"""``retro::attention``: SDPA's contract plus per-layer decode state, as one torch.library op.

The op takes SDPA's arguments (q, k, v, mask, is_causal, scale), the layer's state tensors
(mutated in place), the layer's sparse parameters and the call's phase. A prefill is dense
attention, exactly SDPA, and rebuilds the state; a decode step is one step of the window
(docs/algorithm.md, section 4). The phase is said by whoever compiled the call (``prefill``);
where nobody said it, a call with more query rows than the window is a prefill and any other a
decode step.

It is a ``torch.library.triton_op``: eagerly it runs its body; under ``torch.compile`` Inductor
traces the body (PyTorch ops and the Triton kernels of kernels/decode.py, launched through
``wrap_triton``) into its own generated code, fusing the small ops around the kernels. The same
body, run on fake tensors, is the fake implementation, so :func:`check_inputs` rejects a bad
call while tracing, before anything runs or any state changes.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..state import STATE_FIELDS, LayerState, StateShape
from . import masks, reference
from .reference import SparseParams

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unservable(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor]
) -> tuple[type[Exception], str] | None:
    """The one rule for which SDPA calls the op serves: ``(exception type, why)`` for a call it
    cannot serve, naming the argument, else None. :func:`check_inputs` raises it; the rewrite
    (passes/rewrite.py) leaves such a call site as dense SDPA and logs why."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 4:
            return ValueError, f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
        if t.dtype not in FLOAT_DTYPES:
            return TypeError, f"{name} dtype {t.dtype} is not one of {FLOAT_DTYPES}"
    if not (q.dtype == k.dtype == v.dtype):
        return TypeError, f"query/key/value dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if not (q.device == k.device == v.device):
        return ValueError, f"query/key/value devices differ ({q.device}, {k.device}, {v.device})"
    b, hq, n, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        return ValueError, f"batch sizes differ (query {b}, key {k.shape[0]}, value {v.shape[0]})"
    if k.shape[1] != v.shape[1] or hq % k.shape[1]:
        return ValueError, f"key heads ({k.shape[1]}) and value heads ({v.shape[1]}) must be equal and divide query heads ({hq})"
    if k.shape[3] != d:
        return ValueError, f"key head_dim {k.shape[3]} != query head_dim {d}"
    if k.shape[2] != v.shape[2]:
        return ValueError, f"key length {k.shape[2]} != value length {v.shape[2]}"
    length = k.shape[2]
    if n > length:
        return ValueError, f"query has {n} rows but the cache holds only {length} positions"
    if attn_mask is not None:
        if attn_mask.device != q.device:
            return ValueError, f"attn_mask is on {attn_mask.device}, query on {q.device}"
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in FLOAT_DTYPES:
            return TypeError, f"attn_mask dtype {attn_mask.dtype} must be bool or a float dtype"
        if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[0] not in (1, b) \
                or attn_mask.shape[2] not in (1, n) or attn_mask.shape[3] != length:
            return ValueError, (f"attn_mask shape {tuple(attn_mask.shape)} must broadcast as (batch, 1, {n}, {length}) "
                                "with one head (per-head masks are not supported)")
    return None


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    state: LayerState,
    params: SparseParams,
    positions: Optional[torch.Tensor] = None,
    prefill: Optional[bool] = None,
) -> None:
    """Raise ValueError/TypeError naming the argument if the op cannot serve this call."""
    problem = unservable(q, k, v, attn_mask)
    if problem is not None:
        error, why = problem
        raise error(f"retro::attention: {why}")
    length, num_pages = k.shape[2], state.kmax.shape[2]
    capacity = num_pages * params.page_size
    if length > capacity:
        raise ValueError(
            f"retro::attention: context of {length} positions exceeds the state's max_context ({capacity}); "
            "raise RetroConfig.max_context"
        )
    if state.kmax.dtype not in (k.dtype, torch.int8) or state.kmin.dtype != state.kmax.dtype:
        raise TypeError(f"retro::attention: summaries dtypes ({state.kmax.dtype}, {state.kmin.dtype}) must both be "
                        f"the key dtype {k.dtype} or torch.int8")
    summaries = "int8" if state.kmax.dtype == torch.int8 else "exact"
    problem = StateShape.of_call(q, k, v, num_pages, params.window, summaries).mismatch(state)
    if problem is not None:
        error, why = problem
        raise error(f"retro::attention: {why}")
    b, n = q.shape[0], q.shape[2]
    if prefill is False and n > params.window:
        raise ValueError(f"retro::attention: a decode step has at most window={params.window} query rows, got {n}")
    if positions is not None:
        if prefill or n > params.window:
            raise ValueError(f"retro::attention: positions are for decode steps (at most window={params.window} "
                             f"query rows), got {n} rows")
        if tuple(positions.shape) != (b, n) or positions.dtype != torch.int64 or positions.device != q.device:
            raise ValueError(f"retro::attention: positions must be int64 of shape {(b, n)} on {q.device}, got "
                             f"{positions.dtype} {tuple(positions.shape)} on {positions.device}")


def use_kernels(q: torch.Tensor, attn_mask: Optional[torch.Tensor], params: SparseParams) -> bool:
    """Whether a step runs the Triton kernels: CUDA tensors, a boolean (or no) mask, power-of-two
    pages of at least 16 positions and power-of-two head dims; everything else takes the reference."""
    return _triton_serves(q, attn_mask, (q.shape[-1], params.page_size))


def _triton_serves(q: torch.Tensor, attn_mask: Optional[torch.Tensor], tile_sizes: tuple[int, ...]) -> bool:
    """What every kernel of kernels/decode.py needs: CUDA tensors, a boolean (or no) mask, Triton,
    and sizes that are ``tl.dot`` tiles (powers of two, at least 16)."""
    return (q.is_cuda and (attn_mask is None or attn_mask.dtype == torch.bool)
            and all(n >= 16 and n & (n - 1) == 0 for n in tile_sizes) and _triton_available())


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.library.triton_op("retro::attention", mutates_args=STATE_FIELDS)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    last: torch.Tensor,
    out_cache: torch.Tensor,
    lse_cache: torch.Tensor,
    summary_scale: torch.Tensor,
    start: torch.Tensor,
    is_causal: bool,
    scale: Optional[float],
    page_size: int,
    budget_pages: int,
    budget_fraction: float,
    sink_pages: int,
    local_pages: int,
    window: int,
    positions: Optional[torch.Tensor] = None,
    prefill: Optional[bool] = None,
) -> torch.Tensor:
    """Sparse + retrospective attention with SDPA's output: (B, Hq, n, Dv), contiguous.

    ``positions`` (decode steps only): the query rows' cache positions, exactly
    ``masks.mask_positions(attn_mask, B, n)``. The rewrite computes them once per graph for
    all layers sharing a mask; without them each call reduces its mask itself.
    ``prefill``: the call's phase, True for a prefill (any number of rows), False for a decode
    step (at most ``window`` rows); None infers it from the rows (more than ``window``: prefill).
    """
    state = LayerState(kmax, kmin, last, out_cache, lse_cache, summary_scale, start)
    params = SparseParams(page_size, budget_pages, budget_fraction, sink_pages, local_pages, window)
    check_inputs(q, k, v, attn_mask, state, params, positions, prefill)
    stages = None
    if use_kernels(q, attn_mask, params):
        from . import decode

        stages = decode.kernel_stages()
    if prefill is None:  # nobody said the phase: the rows say it
        prefill = q.shape[2] > window
    if prefill:
        return reference.prefill(q, k, v, attn_mask, is_causal, scale, state, params, stages)
    return reference.decode_step(q, k, v, attn_mask, is_causal, scale, state, params, stages, positions)


def retro_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    state: LayerState,
    params: SparseParams,
    is_causal: bool = False,
    scale: Optional[float] = None,
    positions: Optional[torch.Tensor] = None,
    prefill: Optional[bool] = None,
) -> torch.Tensor:
    """Call ``retro::attention`` with named state and parameters."""
    return torch.ops.retro.attention(q, k, v, attn_mask, *state, is_causal, scale, *params, positions, prefill)


def dense_window_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                                enable_gqa: bool) -> bool:
    """Whether ``retro::dense_window`` runs its kernel: 4-D CUDA tensors of a float dtype, whole
    query groups (or equal heads without ``enable_gqa``) of at most 128 rows a KV head, power-of-two
    head dims of at least 16, and a boolean (or no) mask shared by the heads."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    heads, kv_heads, rows = q.shape[1], k.shape[1], q.shape[2]
    shared_mask = attn_mask is None or attn_mask.dim() <= 2 or attn_mask.shape[-3] == 1
    return (q.dtype in FLOAT_DTYPES and shared_mask and heads % kv_heads == 0 and (enable_gqa or heads == kv_heads)
            and heads // kv_heads * rows <= 128 and _triton_serves(q, attn_mask, (q.shape[3], v.shape[3])))


@torch.library.triton_op("retro::dense_window", mutates_args=())
def dense_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: Optional[float],
    enable_gqa: bool,
) -> torch.Tensor:
    """SDPA (no dropout, not ``is_causal``) for a dense layer's decode window of a few rows: on CUDA
    one pass of kernels/decode.py's ``dense_window`` over the cache for every row, elsewhere
    ``reference.sdpa_row_by_row``."""
    if dense_window_kernel_applies(q, k, v, attn_mask, enable_gqa):
        from . import decode

        allowed, _ = masks.mask_to_allowed(attn_mask, False, q.shape[0], q.shape[2], k.shape[2], q.device)
        return decode.dense_window(q, k, v, allowed, reference.default_scale(q, scale))
    return reference.sdpa_row_by_row(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa)


def compile_cache_keyed():
    """A context for compiling a graph that calls these ops: compile caches key it on this package's source.

    AOTAutograd's cache keys a graph by its ops and sees each op as one: after a change to an op's
    body (a new version of this package) it would serve the graph traced from the old body. Its key
    holds ``torch.compiler.config.cache_key_tag``, which this adds a digest of the package's source
    to, so a graph is served only to the package that traced it. (Inductor's FX graph cache keys
    the traced body itself, Triton kernel sources included.)
    """
    import torch.compiler.config

    tag = torch.compiler.config.cache_key_tag
    return torch.compiler.config.patch(cache_key_tag=f"{tag}|retro-compile:{source_digest()}" if tag
                                       else f"retro-compile:{source_digest()}")


@functools.cache
def source_digest() -> str:
    """SHA-256 of every Python file of the installed package (paths and contents)."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _declare_kernels() -> None:
    """Name the Triton stages' kernels (kernels/decode.py) as the ops' own, so that compile caches key on their
    source.

    AOTAutograd's cache keys a graph by its ops; for a ``triton_op`` it adds the source of the
    kernels PyTorch finds by reading the op's body, and it finds none of these (the body reaches
    them through ``reference.Stages``). A graph that calls ``retro::attention`` and was compiled
    before a kernel changed would then be served with the old kernel, where the cache is on (see
    :func:`compile_cache_keyed` for the rest of the body). Interpreted kernels
    (``TRITON_INTERPRET=1``) have no source to key on and are left out, as is everything when
    Triton is missing (the kernels never run then).
    """
    try:
        import triton

        from . import decode
    except ImportError:
        return
    from torch._library import triton as triton_library

    registry = getattr(triton_library, "triton_ops_to_kernels", None)  # PyTorch versions whose cache reads it
    if registry is None:
        return
    kernels = [f for module in decode.STAGE_MODULES for f in vars(module).values()
               if isinstance(f, triton.runtime.JITFunction) and f.__name__.endswith("_kernel")]
    for name in ("retro::attention", "retro::dense_window"):
        registry[name] = kernels


_declare_kernels()
