"""Hugging Face transformers glue: attention function, masks, static caches, and the decode-window driver.

What ``generate()`` sees does not change: every forward call still takes the newest token and
returns its logits. Inside, each decode step feeds the last ``w`` tokens (the ``w - 1`` already
generated ones again, plus the new one) at their own cache positions, so the static cache's
entries for the past tokens are overwritten with K/V computed from corrected hidden states
(docs/algorithm.md, section 4). The prefill runs through the rewritten graph too, so it leaves
the sparse layers' state behind.

Where the time goes in a decode step, and so how the driver is built:

* Everything a step computes is inside one compiled function, :func:`window_step`: the window's
  token ids, its positions and mask, the cache rewind, the model and the state updates. Its
  per-request inputs live in fixed device buffers (:class:`WindowBuffers`) that it updates in
  place, so no Python int reaches the graph and nothing is rebuilt on the host per step.
* On CUDA the driver records that function in a CUDA graph per batch size, over a static cache
  it owns and reuses across requests, and a step is one copy of the new token ids plus one graph
  replay: no Dynamo guards, no per-step mask building, no kernel launches from Python.
* The prefill never builds an L x L mask: a prompt without padding attends causally with no mask
  at all (keys cut to the prompt), and a padded one gets a (B, 1, n, n) mask over the prompt's keys.
  A prompt longer than ``RetroConfig.prefill_tokens`` (summed over the batch) goes in chunks; a
  later chunk's mask covers only the keys written so far, with one batch row when nothing is padded.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import RetroConfig
from ..state import StateStore
from . import installed

log = logging.getLogger(__name__)

ATTENTION_NAME = "retro_sdpa"

def retro_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Plain SDPA with grouped-query heads left unexpanded (``enable_gqa``), so the rewrite sees
    the real KV heads and selects pages per KV head. Same result as transformers' "sdpa".

    Two cases read fewer keys than the static cache holds, both for queries that start at cache
    position 0 (a prefill): no mask with several rows means causal attention (SDPA's top-left
    alignment), so keys past the last row are never visible and are cut off; a mask narrower than
    the cache covers the first ``mask.shape[-1]`` keys, the rest being unwritten.
    """
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("retro-compile: softcapping and position biases are not supported by SDPA attention")
    rows = query.shape[2]
    if attention_mask is None:
        if is_causal is None:
            is_causal = rows > 1 and getattr(module, "is_causal", True)
        if is_causal:
            key, value = key[:, :, :rows], value[:, :, :rows]
    else:
        is_causal = False
        if attention_mask.shape[-1] < key.shape[2]:
            key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=is_causal, enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def retro_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, minus the L x L mask of a long prompt.

    Several query rows from cache position 0 with no padding need no mask at all (SDPA's causal
    flag), where ``sdpa_mask`` would build a (B, 1, n, max_cache_len) one for a static cache (16 GiB
    for a 128K prompt). While tracing, the cache's write position cannot be read; a mask-less call
    with several rows is then taken as starting at position 0, which is what the decode driver's
    prefill guarantees (a later chunk gets an explicit 4D mask from it).
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    causal_rows = (
        not args and kwargs.get("q_length", 1) > 1 and kwargs.get("allow_is_causal_skip", True)
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None and kwargs.get("kv_offset", 0) == 0
    )
    if not causal_rows:  # one row (a decode step) among them: never read q_offset, a device tensor
        return sdpa_mask(*args, **kwargs)
    padding = kwargs.get("attention_mask")
    q_offset = kwargs.get("q_offset", 0)
    if _traced(q_offset):
        from_start = padding is None  # the driver's prefill (see above)
    else:
        from_start = int(q_offset) == 0 and (padding is None or (not _traced(padding) and bool(padding.all())))
    return None if from_start else sdpa_mask(*args, **kwargs)


def _traced(x: Any) -> bool:
    """Whether reading ``x``'s value would need a concrete tensor that tracing does not have."""
    return isinstance(x, torch.Tensor) and torch.compiler.is_compiling()


def register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, retro_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, retro_sdpa_mask)


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin)


def text_config(hf_config: Any) -> Any:
    """The decoder's own config: ``hf_config`` itself, or its text sub-config for a multimodal model."""
    return hf_config.get_text_config(decoder=True) if hasattr(hf_config, "get_text_config") else hf_config


def check_sdpa_support(model: torch.nn.Module) -> None:
    """Raise if the architecture cannot run SDPA attention (so there would be nothing to rewrite).

    Attention logit softcapping (Gemma 2) is refused whatever the model class says: transformers
    before 5.24 declared SDPA support for Gemma 2 and dropped the softcap there."""
    softcap = getattr(text_config(model.config), "attn_logit_softcapping", None)
    if not getattr(model, "_supports_sdpa", False) or softcap:
        why = f"it caps attention logits (attn_logit_softcapping={softcap})" if softcap else "its attention is eager-only"
        raise ValueError(
            f"retro_compile: {type(model).__name__} does not support SDPA attention in transformers "
            f"({why}), so there is no SDPA call site to rewrite. "
            "Use an architecture that supports attn_implementation='sdpa'."
        )


@dataclass(frozen=True)
class SlidingLayers:
    """A model's sliding-window attention layers, which stay dense SDPA.

    The driver gives them full-length static cache layers (a ring buffer cannot be rewound to
    overwrite the window's past rows) and masks of their own: a query at cache slot ``q`` sees the
    slots ``q - window < k <= q`` that it may see at all, as transformers' sliding-window mask does.
    ``by_type``: the forward takes ``{"full_attention": mask, "sliding_attention": mask}``
    (models with ``layer_types``); otherwise every layer slides and takes one mask.
    """

    window: int
    layers: tuple[int, ...]
    by_type: bool

    def masks(self, full: torch.Tensor | None, rows: torch.Tensor, keys: int) -> Any:
        """The forward's ``attention_mask`` for query rows at cache slots ``rows`` (n,), given the
        full-attention mask ``full`` ((B or 1, 1, n, keys) bool, or None: causal from slot 0)."""
        near = torch.arange(keys, device=rows.device) > rows[:, None] - self.window
        sliding = (slot_mask(None, rows, keys) if full is None else full) & near
        return {"full_attention": full, "sliding_attention": sliding} if self.by_type else sliding


def slot_mask(valid: torch.Tensor | None, rows: torch.Tensor, keys: int) -> torch.Tensor:
    """(B or 1, 1, n, keys) bool: query rows at cache slots ``rows`` (n,) see the slots up to their
    own that ``valid`` ((B or 1, >= keys) bool; None: every slot) marks. The one place the driver's
    masks are built (prefill chunks, decode window, sliding layers)."""
    causal = torch.arange(keys, device=rows.device) <= rows[:, None]
    return causal[None, None] if valid is None else valid[:, None, None, :keys] & causal


def sliding_layers(hf_config: Any) -> SlidingLayers | None:
    """The sliding-window layers of a transformers config (None if it has none)."""
    text = text_config(hf_config)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types:
        other = sorted(set(types) - {"full_attention", "sliding_attention"})
        if other:
            raise ValueError(f"retro_compile: layer types {other} are not supported (full_attention and "
                             "sliding_attention are)")
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        return SlidingLayers(window, layers, by_type=True) if layers else None
    if window and getattr(text, "use_sliding_window", True):
        return SlidingLayers(window, tuple(range(text.num_hidden_layers)), by_type=False)
    return None


def cache_argument(model: torch.nn.Module) -> str:
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def compiled_window_step(model: torch.nn.Module, forward: Callable, sliding: SlidingLayers | None,
                         compile: Callable[[Callable], Callable]) -> Callable:
    """:func:`window_step` bound to ``forward`` (``model``'s own), compiled by ``compile``."""
    forward_kwargs: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        forward_kwargs["logits_to_keep"] = 1  # the window's older rows need no logits
    return compile(functools.partial(window_step, forward, forward_kwargs, cache_argument(model), sliding))


def tp_size(model: torch.nn.Module) -> int:
    """Processes the model's heads are sharded over (transformers' tensor parallelism,
    ``from_pretrained(distributed_config=DistributedConfig(tp_plan=...))``); 1 unsharded."""
    return getattr(model, "tp_size", None) or 1


@torch.inference_mode(False)  # updated in place by calls in and out of inference mode
def static_cache(model: torch.nn.Module, batch: int, length: int, device: torch.device,
                 full_length: bool = False) -> Any:
    """A ``StaticCache`` of ``length`` positions for ``batch`` rows, allocated now.

    Allocated up front (not lazily inside a compiled prefill), its tensors keep fixed addresses for
    CUDA graphs, and transformers marks them static for its own compiled decode. ``full_length``
    gives sliding-window layers ``length`` positions too (see :class:`SlidingLayers`).
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    hf = model.config
    cache = StaticCache(config=hf, max_cache_len=length)
    if full_length:
        cache.layers = [layer if not layer.is_sliding else StaticLayer(max_cache_len=length) for layer in cache.layers]
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    cache.early_initialization(batch, kv_heads // tp_size(model), head_dim, model.dtype, device)  # this rank's share
    return cache


def causal_lm_output(logits: torch.Tensor, cache: Any) -> Any:
    """What a causal LM's forward returns, with its cache under the field name of this transformers."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(logits=logits, **{field: cache})


@dataclass
class WindowBuffers:
    """The per-request inputs of a decode step, in fixed device tensors that the step updates in place.

    ``valid`` marks the cache positions a query may see (written, not padding); ``next_pos`` is the
    position id of the newest token per row (padding-aware, as ``generate`` counts); ``recent``
    holds the ids of the last ``w - 1`` tokens, which the next step feeds again; ``ids`` is the
    newest token's slot that a recorded CUDA graph reads.
    """

    valid: torch.Tensor  # (B, L) bool
    next_pos: torch.Tensor  # (B,) int64
    recent: torch.Tensor  # (B, w - 1) int64
    ids: torch.Tensor  # (B, 1) int64

    @classmethod
    @torch.inference_mode(False)  # updated in place by calls in and out of inference mode
    def allocate(cls, batch: int, length: int, window: int, device: torch.device) -> "WindowBuffers":
        long = dict(dtype=torch.long, device=device)
        return cls(torch.zeros(batch, length, dtype=torch.bool, device=device), torch.zeros(batch, **long),
                   torch.zeros(batch, window - 1, **long), torch.zeros(batch, 1, **long))


def window_step(forward: Callable, forward_kwargs: dict[str, Any], cache_arg: str, sliding: SlidingLayers | None,
                ids: torch.Tensor, cache: Any, valid: torch.Tensor, next_pos: torch.Tensor,
                recent: torch.Tensor) -> torch.Tensor:
    """One decode step of the window, all on the device: returns the newest row's logits (B, V).

    The cache's write position (a device tensor in every layer) is the newest token's slot. The
    window's ``w`` rows sit at the ``w`` slots ending there, with position ids ending at
    ``next_pos``; each row sees the valid keys up to its own slot. Rewinding the cache by
    ``w - 1`` makes the forward overwrite the past rows' K/V with values computed from their
    corrected hidden states.
    """
    w = recent.shape[1] + 1
    length = valid.shape[1]
    device = ids.device
    slot = cache.layers[0].cumulative_length
    valid.index_fill_(1, slot.reshape(1), True)
    rows = slot + torch.arange(1 - w, 1, device=device)  # (w,) cache slots of the window
    mask = slot_mask(valid, rows, length)  # (B, 1, w, L)
    positions = next_pos[:, None] + torch.arange(1 - w, 1, device=device)
    window_ids = torch.cat([recent, ids], dim=1)
    if sliding is not None:
        mask = sliding.masks(mask, rows, length)
    rewind(cache, w - 1)
    out = forward(input_ids=window_ids, attention_mask=mask, position_ids=positions, **forward_kwargs,
                  **{cache_arg: cache})
    recent.copy_(window_ids[:, 1:])
    next_pos.add_(1)
    return out.logits[:, -1]


class RecordedStep:
    """:func:`window_step` for one batch size and cache, recorded in a CUDA graph.

    A replay is the whole decode step; the caller copies the newest ids into ``buffers.ids`` first.
    """

    def __init__(self, step: Callable, cache: Any, buffers: WindowBuffers) -> None:
        self.cache, self.buffers = cache, buffers
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(buffers.ids, cache, buffers.valid, buffers.next_pos, buffers.recent)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.buffers.ids.copy_(ids)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the graph's output


@dataclass
class CompiledBatch:
    """One batch size's compiled functions: the prefill (``model.forward``) and the decode step
    (:func:`window_step`). Each is a callable of its own (see :func:`own_frame`), so Dynamo's
    recompile limit counts the variants of one batch size (padded or not, chunked or not), never
    the batch sizes a model has served."""

    prefill: Callable
    step: Callable


class DecodeWindowDriver:
    """Replaces ``model.forward``: prefill through one compiled graph, window decode through another.

    Args:
        model: the Hugging Face causal LM.
        config: its RetroConfig.
        store: its decode state (for the rule that a decode step only reads state its prefill built).
        compile_prefill: returns a new ``model.forward`` compiled for prompts (dynamic length).
        compile_step: returns a new :func:`window_step` bound to the model, compiled for decode steps.
        cuda_graphs: record each batch size's decode step in a CUDA graph (CUDA only).
        sliding: the model's sliding-window layers (:func:`sliding_layers`), or None.
    """

    max_cached_batches = 2  # static caches (and their CUDA graphs) kept for this many batch sizes
    # Compiled functions (and the decode state their graphs hold, about 1/page_size of a cache's
    # bytes) kept for this many batch sizes; a batch size evicted and seen again compiles afresh.
    max_compiled_batches = 8

    def __init__(self, model: torch.nn.Module, config: RetroConfig, store: StateStore,
                 compile_prefill: Callable[[], Callable], compile_step: Callable[[], Callable], cuda_graphs: bool,
                 sliding: SlidingLayers | None) -> None:
        self.model = model
        self.config = config
        self.store = store
        self.window = config.window
        self.compile_prefill = compile_prefill
        self.compile_step = compile_step
        self.cuda_graphs = cuda_graphs
        self.cache_arg = cache_argument(model)
        self.sliding = sliding
        # Prefill masks may stop at the last written key only where this package's attention
        # function runs (it cuts the cache to the mask); a model that calls SDPA itself needs them full width.
        self.cuts_keys = getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME
        self.generating = False  # inside the wrapped generate(): every forward call is the driver's
        self._caches: OrderedDict[int, Any] = OrderedDict()  # batch size -> the driver's own static cache
        self._buffers: dict[int, WindowBuffers] = {}
        self._recorded: dict[int, RecordedStep] = {}
        self._compiled: OrderedDict[int, CompiledBatch] = OrderedDict()
        self.reset()

    def serves(self, kwargs: dict[str, Any]) -> bool:
        """Whether a forward call outside ``generate()`` is a step of hand-driven decoding (token ids
        and a static cache, no labels, no extra outputs) that the driver runs. Any other call
        (full sequences for a loss, ``output_hidden_states``, a dynamic cache or none) is the
        model's own forward, uncompiled, with its usual outputs."""
        cache = kwargs.get(self.cache_arg)
        return (getattr(cache, "is_compileable", False) and kwargs.get("labels") is None
                and not kwargs.get("output_hidden_states") and not kwargs.get("output_attentions"))

    def reset(self, request_mask: torch.Tensor | None = None) -> None:
        """Forget the current sequence: the next call must be a prefill. ``request_mask`` is the 2D
        padding mask the coming request was given (generate() hands the model none of its own)."""
        self.cache: Any = None
        self.length = 0  # positions written in the cache
        self.steps = 0  # decode steps of this request
        self.request_mask = request_mask

    # ---------------------------------------------------------------------------------------------
    # Requests and caches
    # ---------------------------------------------------------------------------------------------
    def check_request(self, prompt: int, new_tokens: int = 0) -> None:
        """Refuse, before any work, a request the window or the static state cannot hold."""
        if prompt <= self.window:
            raise ValueError(f"retro_compile: the prompt has {prompt} tokens; it needs more than window={self.window}")
        if prompt + new_tokens > self.config.max_context:
            raise ValueError(
                f"retro_compile: the prompt's {prompt} tokens plus {new_tokens} new tokens need {prompt + new_tokens} "
                f"positions, more than RetroConfig.max_context={self.config.max_context}; raise RetroConfig.max_context "
                "(or ask for fewer tokens)"
            )

    def cache_for(self, batch: int, device: torch.device) -> Any:
        """The driver's static cache for ``batch`` rows, allocated once and rewound to empty.

        Reusing it keeps every address a recorded CUDA graph reads; its stale K/V are never read,
        since a query only sees positions its request wrote.
        """
        cache = self._caches.pop(batch, None)
        if cache is None:
            while len(self._caches) >= self.max_cached_batches:
                self.release(next(iter(self._caches)))
            cache = static_cache(self.model, batch, self.config.max_context, device, full_length=True)
        else:
            for layer in cache.layers:
                layer.cumulative_length.zero_()
        self._caches[batch] = cache
        return cache

    def release(self, batch: int | None = None) -> None:
        """Free the static cache and CUDA graph kept for ``batch`` (every batch size if None)."""
        for b in list(self._caches) if batch is None else [batch]:
            self._caches.pop(b, None)
            self._recorded.pop(b, None)
            self._buffers.pop(b, None)

    # ---------------------------------------------------------------------------------------------
    # Compiled functions, per batch size
    # ---------------------------------------------------------------------------------------------
    def _compiled_for(self, batch: int) -> CompiledBatch:
        if batch in self._compiled:
            self._compiled.move_to_end(batch)
        else:
            while len(self._compiled) >= self.max_compiled_batches:
                self._forget_compiled(next(iter(self._compiled)))
            self._compiled[batch] = CompiledBatch(self.compile_prefill(), self.compile_step())
        return self._compiled[batch]

    def _forget_compiled(self, batch: int) -> None:
        """Drop ``batch``'s compiled functions, the CUDA graph recorded from them, and the decode
        state their graphs own."""
        self._compiled.pop(batch, None)
        self._recorded.pop(batch, None)
        self.store.release(batch)

    def _run_compiled(self, batch: int, phase: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``batch``'s compiled ``phase`` function ("prefill" or "step").

        Dynamo refuses (before running anything) a call that would pass its recompile limit,
        where it would otherwise run the frame uncompiled: un-rewritten, so silently dense. The
        batch size's functions are then compiled afresh, once; a second refusal is an error.
        """
        from torch._dynamo.exc import FailOnRecompileLimitHit

        hard_limit = not torch._dynamo.config.suppress_errors  # Dynamo forbids the two together
        for attempt in range(2):
            function = getattr(self._compiled_for(batch), phase)
            try:
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=hard_limit):
                    return function(*args, **kwargs)
            except FailOnRecompileLimitHit:
                if attempt:
                    raise RuntimeError(
                        f"retro_compile: the {phase} for batch size {batch} reached torch._dynamo's recompile limit "
                        f"(torch._dynamo.config.recompile_limit={torch._dynamo.config.recompile_limit}) twice in a "
                        "row; refusing to run it uncompiled, which would be dense attention"
                    ) from None
                log.info("retro-compile: batch size %d's %s reached Dynamo's recompile limit; compiling it afresh",
                         batch, phase)
                self._forget_compiled(batch)

    def run_prefill(self, **kwargs: Any) -> Any:
        """``model.forward`` on a prompt (chunk), through the compiled prefill of its batch size."""
        return self._run_compiled(kwargs["input_ids"].shape[0], "prefill", **kwargs)

    def run_step(self, ids: torch.Tensor, cache: Any, buffers: WindowBuffers) -> torch.Tensor:
        """One decode step (:func:`window_step`) through the compiled step of its batch size.

        Only a request's first step can compile: later ones feed the same tensors, so they call the
        compiled step directly, without the recompile-limit guard (entering ``config.patch`` costs
        about 80 us on the host, a few percent of a step where no CUDA graph replays it)."""
        args = (ids, cache, buffers.valid, buffers.next_pos, buffers.recent)
        if self.steps > 0:
            return self._compiled_for(ids.shape[0]).step(*args)
        return self._run_compiled(ids.shape[0], "step", *args)

    def _buffers_for(self, batch: int, device: torch.device) -> WindowBuffers:
        buffers = self._buffers.get(batch)
        if buffers is None or buffers.valid.device != device:
            buffers = self._buffers[batch] = WindowBuffers.allocate(batch, self.config.max_context, self.window, device)
            self._recorded.pop(batch, None)
        return buffers

    # ---------------------------------------------------------------------------------------------
    # Forward calls
    # ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: Any = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        cache = kwargs.get(self.cache_arg)
        if input_ids is None or cache is None or not getattr(cache, "is_compileable", False):
            raise ValueError(
                "retro_compile: a compiled model needs input_ids and a static cache "
                f"(got input_ids={'set' if input_ids is not None else None}, {self.cache_arg}={type(cache).__name__}); "
                "use model.generate(...), which sets both up"
            )
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise NotImplementedError(f"retro_compile: {flag}=True is not supported while decoding")
        if not self.decodes(cache, input_ids.shape[1]):
            return self._prefill(input_ids, attention_mask, position_ids, cache, kwargs)
        return self._decode(input_ids)

    def decodes(self, cache: Any, rows: int) -> bool:
        """Whether a forward call of ``rows`` new tokens on ``cache`` is a decode step (one token on
        the cache of the request in progress); any other call is a prefill."""
        return cache is not None and cache is self.cache and rows == 1

    def _prefill(self, input_ids, attention_mask, position_ids, cache, kwargs):
        """Write the prompt into the cache and build the decode state, in chunks of at most
        ``RetroConfig.prefill_tokens`` tokens (summed over the batch); returns the last chunk's output."""
        batch, n = input_ids.shape
        if cache is not self.cache:
            self.reset(self.request_mask)
            self.cache = cache
            self.length = int(cache.get_seq_length())
        self.check_request(self.length + n)
        out = None
        for begin, end in prefill_chunks(n, batch, self.config.prefill_tokens, self.window):
            out = self._prefill_chunk(input_ids[:, begin:end], attention_mask,
                                      None if position_ids is None else position_ids[..., begin:end], kwargs)
        return out

    def _prefill_chunk(self, input_ids, attention_mask, position_ids, kwargs):
        batch, n = input_ids.shape
        start, device = self.length, input_ids.device
        buffers = self._buffers_for(batch, device)
        padding = self._padding_mask(attention_mask, batch, start + n, device)  # (B, start + n) bool or None
        if start == 0:
            buffers.valid.zero_()
        buffers.valid[:, start:start + n] = True if padding is None else padding[:, start:]
        keys = start + n if self.cuts_keys else buffers.valid.shape[1]
        if start == 0 and padding is None:
            mask = None  # causal from position 0: SDPA's own flag, no mask
        else:
            mask = self._prompt_mask(buffers.valid, start, n, keys)
        if position_ids is None:
            counted = buffers.valid[:, :start + n].long().cumsum(-1) - 1
            position_ids = counted[:, start:].clamp(min=0)
        masks = [mask]
        if self.sliding is not None:
            mask = self.sliding.masks(mask, torch.arange(start, start + n, device=device), keys)
            masks = list(mask.values()) if isinstance(mask, dict) else [mask]
        mask_dims = (2, 3) if self.cuts_keys else (2,)
        for t, dims in [(input_ids, (1,)), (position_ids, (1,))] + [(m, mask_dims) for m in masks if m is not None]:
            for dim in dims:
                torch._dynamo.mark_dynamic(t, dim)
        self.store.forget_built()  # a prefill that runs no rewritten graph must leave nothing to decode from
        out = self.run_prefill(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
        self.length += n
        buffers.next_pos.copy_(position_ids[:, -1] + 1)
        buffers.recent.copy_(input_ids[:, n - (self.window - 1):])
        return out

    def _padding_mask(self, attention_mask: Any, batch: int, length: int, device) -> torch.Tensor | None:
        """The request's 2D padding mask (B, length) as bool, or None where nothing is padded."""
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        if (mask is None or mask.dim() == 4) and self.request_mask is not None:
            mask = self.request_mask  # generate()'s own 2D mask, rather than the 4D one it derived from it
        if mask is None:
            return None
        if mask.dim() == 4:  # a prepared mask: a valid key is one that some row sees (sliding windows included)
            mask = mask[:, 0, :, :length]
            mask = (mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2).any(dim=1)
        mask = mask.to(device=device, dtype=torch.bool)
        if mask.shape[0] != batch:  # generate() repeats each prompt for num_return_sequences
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        mask = mask[:, :length]
        return None if bool(mask.all()) else mask

    @staticmethod
    def _prompt_mask(valid: torch.Tensor, start: int, n: int, keys: int) -> torch.Tensor:
        """(B, 1, n, keys) bool for ``n`` rows at slots ``start..``: valid keys up to each row's slot.

        ``keys`` is ``start + n`` where the attention cuts the cache to the mask's width (this
        package's attention function), else the whole cache. Without padding one mask serves every
        row of the batch (batch dimension 1), so a chunk of a long prompt costs one (n, keys) mask,
        not ``batch`` of them. A padded row sees itself, so that its output stays finite (it is
        never attended to).
        """
        written = valid[:1] if bool(valid[:, :start + n].all()) else valid
        rows = torch.arange(start, start + n, device=valid.device)
        return slot_mask(written, rows, keys) | (torch.arange(keys, device=valid.device) == rows[:, None])

    def _decode(self, input_ids: torch.Tensor) -> Any:
        if self.length + 1 > self.config.max_context:
            raise ValueError(f"retro_compile: position {self.length} is beyond RetroConfig.max_context={self.config.max_context}")
        batch = input_ids.shape[0]
        buffers = self._buffers[batch]
        recorded = self._recorded.get(batch)
        if recorded is not None and recorded.cache is self.cache and self.steps > 0:
            logits = recorded(input_ids)
        else:
            # The request's first step runs through the compiled function (and its check that the
            # state it reads was built by this request's prefill); on CUDA it runs on a side stream,
            # as warm-up for the graph the second step records.
            graphs = self.cuda_graphs and input_ids.is_cuda and self._caches.get(batch) is self.cache
            if graphs and self.steps > 0:
                step = self._compiled_for(batch).step
                recorded = self._recorded[batch] = RecordedStep(step, self.cache, buffers)
                logits = recorded(input_ids)
            elif graphs:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    logits = self.run_step(input_ids, self.cache, buffers)
                torch.cuda.current_stream().wait_stream(side)
            else:
                logits = self.run_step(input_ids, self.cache, buffers)
        self.length += 1
        self.steps += 1
        return causal_lm_output(logits[:, None], self.cache)


def prefill_chunks(n: int, batch: int, max_tokens: int, window: int) -> list[tuple[int, int]]:
    """Split ``n`` prompt positions into [begin, end) chunks of at most ``max_tokens // batch``
    positions, none of ``window`` positions or fewer (such a call would be a decode step): a short
    tail joins the chunk before it."""
    size = max(window + 1, max_tokens // batch)
    bounds = list(range(0, n, size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] <= window:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def rewind(cache: Any, tokens: int) -> None:
    """Move a static cache's write position back by ``tokens``, so the next forward overwrites them.

    Static layers keep their write position in a device tensor, ``cumulative_length``, on
    transformers 5.17 through 5.24; ``StaticLayer.crop`` (5.24 only) does the same subtraction.
    Rewinding in place keeps the tensor's static address, so CUDA graphs stay valid.
    """
    if tokens == 0:
        return
    for layer in cache.layers:
        position = getattr(layer, "cumulative_length", None)
        if not isinstance(position, torch.Tensor):
            raise TypeError(f"retro_compile: cannot rewind a {type(layer).__name__} cache layer; use a StaticCache")
        position.sub_(tokens)


def requested_positions(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """(prompt tokens, new tokens) a ``generate(*args, **kwargs)`` call asks for, as generate()
    itself resolves them (``max_new_tokens`` wins over ``max_length``); None without token ids."""
    ids = _prompt_ids(args, kwargs)
    if ids is None:
        return None
    prompt = ids.shape[1]
    generation = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", generation.max_new_tokens)
    if new is None:
        total = kwargs.get("max_length", generation.max_length)
        new = max(0, total - prompt) if total is not None else 0
    return prompt, new


def _prompt_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


ASSISTED_DECODING = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def check_generate_options(generation: Any, kwargs: dict[str, Any]) -> None:
    """Refuse, before any work, the generate() options whose cache use the decode state does not follow."""
    if (kwargs.get("num_beams") or generation.num_beams or 1) > 1:
        raise ValueError("retro_compile: beam search (num_beams > 1) is not supported: it reorders the cache "
                         "between steps, which the decode state does not follow")
    if kwargs.get("prefill_chunk_size") or getattr(generation, "prefill_chunk_size", None):
        raise ValueError("retro_compile: generate(prefill_chunk_size=...) is not supported (a chunk of window "
                         "tokens or fewer would pass for a decode step); set RetroConfig.prefill_tokens, "
                         "the driver's own chunking, instead")
    for name in ASSISTED_DECODING:
        if kwargs.get(name) is not None or getattr(generation, name, None) is not None:
            raise ValueError(f"retro_compile: generate({name}=...) (assisted or speculative decoding) is not "
                             "supported: it feeds several new tokens a step and crops the cache when it rejects "
                             "some, which the decode state does not follow; generate without it")


def driver_methods(model: torch.nn.Module, config: RetroConfig, store: StateStore,
                   compile_prefill: Callable[[], Callable], compile_step: Callable[[], Callable], cuda_graphs: bool,
                   sliding: SlidingLayers | None) -> tuple[DecodeWindowDriver, dict[str, Callable]]:
    """The driver, and the ``forward``, ``generate`` and ``create_masks_for_generate`` that route the
    model's calls through it (a generate() that runs every request on the driver's static cache)."""
    from transformers import masking_utils

    driver = DecodeWindowDriver(model, config, store, compile_prefill, compile_step, cuda_graphs, sliding)
    original_generate, original_forward = model.generate, model.forward
    cache_arg = driver.cache_arg

    @functools.wraps(original_generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        driver.generating = True
        try:
            return _generate(*args, **kwargs)
        finally:
            driver.generating = False

    def _generate(*args: Any, **kwargs: Any) -> Any:
        request = requested_positions(model, args, kwargs)
        if request is not None:
            driver.check_request(*request)
        generation = kwargs.get("generation_config") or model.generation_config
        check_generate_options(generation, kwargs)
        driver.reset(kwargs.get("attention_mask"))
        ids = _prompt_ids(args, kwargs)
        if kwargs.get(cache_arg) is None and kwargs.get("past_key_values") is None and ids is not None:
            copies = kwargs.get("num_return_sequences") or generation.num_return_sequences or 1
            kwargs[cache_arg] = driver.cache_for(ids.shape[0] * copies, ids.device)
        kwargs["disable_compile"] = True  # the driver compiles; generate() must not compile again
        return original_generate(*args, **kwargs)

    @functools.wraps(original_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if driver.generating or driver.serves(kwargs):
            return driver.forward(*args, **kwargs)
        return original_forward(*args, **kwargs)  # the model's own computation: scoring, losses, features

    original_masks = getattr(model, "create_masks_for_generate", masking_utils.create_masks_for_generate)

    def create_masks_for_generate(*args: Any, **kwargs: Any) -> Any:
        """generate()'s 4D attention masks, except for the driver's decode steps: those build their
        masks on the device (:func:`window_step`) and would leave a (B, 1, 1, L) one unused, built
        with a few device ops per token (and, in transformers' ``sdpa_mask``, a look at the padding
        mask on the host)."""
        cache, embeds = kwargs.get("cache", kwargs.get("past_key_values")), kwargs.get("inputs_embeds")
        if driver.generating and embeds is not None and driver.decodes(cache, embeds.shape[1]):
            return None
        return original_masks(*args, **kwargs)

    # generate() looks create_masks_for_generate up on the model
    return driver, dict(forward=forward, generate=generate, create_masks_for_generate=create_masks_for_generate)


def compile_causal_lm(model: torch.nn.Module, config: RetroConfig, store: StateStore, *, inductor: bool,
                      cuda_graphs: bool | None, mode: str | None, **compile_kwargs: Any) -> torch.nn.Module:
    """:func:`retro_compile.retro_compile` for a Hugging Face causal LM (see its docstring).

    Switches the attention to grouped SDPA, marks sliding-window layers dense, compiles the prefill
    (rewrite only, dynamic prompt length) and the decode step (rewrite + Inductor with ``mode``'s
    options, minus its CUDA graphs: the driver records its own) per batch size, as the driver
    meets them, and installs the driver.
    """
    from ..backend import backend_for

    check_sdpa_support(model)

    def recompile(clone: torch.nn.Module) -> torch.nn.Module:  # a deep copy's own compilation
        return compile_causal_lm(clone, config, StateStore(), inductor=inductor, cuda_graphs=cuda_graphs, mode=mode,
                                 **compile_kwargs)

    original_attention = installed.attention_implementations(model)
    sliding = sliding_layers(model.config)
    if sliding is not None:
        for layer in sliding.layers:
            store.model_dense[layer] = f"sliding-window attention (window {sliding.window})"
    options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    graphs_in_mode = options.pop("triton.cudagraphs", False)
    step_kwargs = dict(compile_kwargs)
    options.update(step_kwargs.pop("options", None) or {})
    use_graphs = cuda_graphs
    if use_graphs is None:
        use_graphs = graphs_in_mode or (mode is None and any(p.is_cuda for p in model.parameters()))
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    own_forward = model.forward  # the class's, bound: the driver's forward replaces the attribute

    def compile_prefill() -> Callable:
        return torch.compile(own_frame(own_forward), backend=backend_for(config, store, inductor=False),
                             dynamic=False)

    def compile_step() -> Callable:
        return compiled_window_step(model, own_forward, sliding, lambda fn: torch.compile(
            own_frame(fn), backend=backend_for(config, store, inductor=inductor), dynamic=False,
            options=options or None, **step_kwargs))

    driver, methods = driver_methods(model, config, store, compile_prefill, compile_step, cuda_graphs=bool(use_graphs),
                                     sliding=sliding)
    installed.install(model, dict(methods, retro_config=config, retro_state=store, retro_driver=driver),
                      original_attention, recompile)
    return model


def own_frame(fn: Callable) -> Callable:
    """``fn`` behind a function with a code object of its own.

    Dynamo keeps compiled graphs, and counts recompiles against ``recompile_limit``, per code
    object. Compiling ``model.forward`` directly would share one count among every model of the
    class in the process; past the limit Dynamo silently runs the model eagerly, with the SDPA
    calls un-rewritten. A fresh code object per compiled callable keeps each model's count its own.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__code__ = call.__code__.replace()  # a new code object, not the one shared by every `call`
    return call
