"""The decode-window driver that a ``retro_compile``d model's ``generate()`` runs on.

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
  A prompt longer than ``RetroConfig.prefill_tokens`` (summed over the batch), or than
  ``generate(prefill_chunk_size=...)``, goes in chunks; a later chunk's mask covers only the keys
  written so far, with one batch row when nothing is padded. The prefill and the decode step are
  compiled as functions of their own, each telling the rewrite its phase, so a chunk of any
  length is a prefill.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...config import RetroConfig
from ...passes.rewrite import window_slots
from ...state import StateStore
from .attention import ATTENTION_NAME
from .cache import (LayerKinds, cache_argument, causal_lm_output, empty, prefill_chunks, rewind, slot_mask, static_cache,
                    write_position)

log = logging.getLogger(__name__)

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


def window_step(forward: Callable, forward_kwargs: dict[str, Any], cache_arg: str, kinds: LayerKinds | None,
                ids: torch.Tensor, cache: Any, valid: torch.Tensor, next_pos: torch.Tensor,
                recent: torch.Tensor) -> torch.Tensor:
    """One decode step of the window, all on the device: returns the newest row's logits (B, V).

    The cache's write position (a device tensor in every layer) is the newest token's slot. The
    window's ``w`` rows sit at the ``w`` slots ending there, with position ids ending at
    ``next_pos``; each row sees the valid keys up to its own slot. The slots are said to the
    rewrite (:func:`window_slots`), which hands them to the sparse layers as their rows' positions. Rewinding the cache by
    ``w - 1`` makes the forward overwrite the past rows' K/V with values computed from their
    corrected hidden states.
    """
    w = recent.shape[1] + 1
    length = valid.shape[1]
    device = ids.device
    slot = write_position(cache)
    valid.index_fill_(1, slot.reshape(1), True)
    rows = window_slots(slot + torch.arange(1 - w, 1, device=device))  # (w,) cache slots, said to the rewrite
    mask = slot_mask(valid, rows, length)  # (B, 1, w, L)
    positions = next_pos[:, None] + torch.arange(1 - w, 1, device=device)
    window_ids = torch.cat([recent, ids], dim=1)
    if kinds is not None:
        mask = kinds.masks(mask, rows, length)  # a decode step's tokens are never padding
    rewind(cache, w - 1)
    out = forward(input_ids=window_ids, attention_mask=mask, position_ids=positions, **forward_kwargs,
                  **{cache_arg: cache})
    recent.copy_(window_ids[:, 1:])
    next_pos.add_(1)
    return out.logits[:, -1]


def compiled_window_step(model: torch.nn.Module, forward: Callable, kinds: LayerKinds | None,
                         compile: Callable[[Callable], Callable]) -> Callable:
    """:func:`window_step` bound to ``forward`` (``model``'s own), compiled by ``compile``."""
    forward_kwargs: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        forward_kwargs["logits_to_keep"] = 1  # the window's older rows need no logits
    return compile(functools.partial(window_step, forward, forward_kwargs, cache_argument(model), kinds))


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
        kinds: the model's sliding-window and recurrent layers (:func:`layer_kinds`), or None.
    """

    max_cached_batches = 2  # static caches (and their CUDA graphs) kept for this many batch sizes
    # Compiled functions (and the decode state their graphs hold, about 1/page_size of a cache's
    # bytes) kept for this many batch sizes; a batch size evicted and seen again compiles afresh.
    max_compiled_batches = 8
    few_rows = 64  # a prefill call of at most this many tokens computes every row's logits (see _prefill)

    def __init__(self, model: torch.nn.Module, config: RetroConfig, store: StateStore,
                 compile_prefill: Callable[[], Callable], compile_step: Callable[[], Callable], cuda_graphs: bool,
                 kinds: LayerKinds | None) -> None:
        self.model = model
        self.config = config
        self.store = store
        self.window = config.window
        self.compile_prefill = compile_prefill
        self.compile_step = compile_step
        self.cuda_graphs = cuda_graphs
        self.cache_arg = cache_argument(model)
        self.kinds = kinds
        # Prefill masks may stop at the last written key only where this package's attention
        # function runs (it cuts the cache to the mask); a model that calls SDPA itself needs them full width.
        self.cuts_keys = getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME
        self.generating = False  # inside the wrapped generate(): every forward call is the driver's
        self.chunk_positions: int | None = None  # generate(prefill_chunk_size=...) of the request in progress
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
        self.batch = 0  # the request's rows
        self.length = 0  # positions written in the cache
        self.steps = 0  # decode steps of this request
        self.request_mask = request_mask
        # The ids of the last forward call of several tokens, after the w - 1 before it, and how many
        # of them crop() may drop (see crop); refeed: the next call feeds the last w - 1 again.
        self.fed: torch.Tensor | None = None
        self.droppable = 0
        self.refeed = False

    # ---------------------------------------------------------------------------------------------
    # Requests and caches
    # ---------------------------------------------------------------------------------------------
    def check_request(self, prompt: int, new_tokens: int = 0) -> None:
        """Refuse, before any work, a request the static state cannot hold."""
        if prompt == 0:
            raise ValueError("retro_compile: the prompt is empty; generate() needs at least one token to start from")
        lead = self.lead_padding(prompt)
        if prompt + lead + new_tokens > self.config.max_context:
            padded = f" (and {lead} slots of padding before them)" if lead else ""
            raise ValueError(
                f"retro_compile: the prompt's {prompt} tokens{padded} plus {new_tokens} new tokens need "
                f"{prompt + lead + new_tokens} positions, more than RetroConfig.max_context={self.config.max_context}; "
                "raise RetroConfig.max_context (or ask for fewer tokens)"
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
            cache.crop = functools.partial(self.crop, cache)
            if self.kinds is not None and self.kinds.recurrent:
                self._allocate_recurrent_states(cache, batch, device)
        else:
            empty(cache)
        self._caches[batch] = cache
        return cache

    @torch.no_grad()
    def _allocate_recurrent_states(self, cache: Any, batch: int, device: torch.device) -> None:
        """Allocate ``cache``'s recurrent and convolution states now, by one token a row through the
        model's own forward, uncompiled, and empty the cache again.

        transformers allocates them on a layer's first call. Inside the compiled prefill that would
        make the first request's graph one that finds them missing, and every later request's
        prefill a recompilation; allocated here they keep one address (static for CUDA graphs)."""
        ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        type(self.model).forward(self.model, input_ids=ids, use_cache=True, **{self.cache_arg: cache})
        empty(cache)

    def crop(self, cache: Any, tokens: int) -> None:
        """``cache.crop(tokens)`` on the driver's cache: drop the newest ``-tokens`` positions, as
        transformers' assisted and prompt-lookup decoding do with rejected draft tokens (a positive
        ``tokens`` is the length to keep, as older transformers passed it).

        Only tokens of the last forward call of several tokens can go, never its first. The sparse
        layers' decode state still holds what the dropped rows left (in page summaries, ``last`` and
        the output cache), so the next call feeds the last ``w - 1`` kept tokens again, in a prefill
        chunk that rebuilds that state from the kept cache alone (:meth:`_prefill`).
        """
        remove = self.length - tokens if tokens > 0 else -tokens
        if remove == 0:
            return
        if self.kinds is not None and self.kinds.recurrent:
            raise ValueError(f"retro_compile: cannot drop cache positions of a model with recurrent layers "
                             f"{list(self.kinds.recurrent)}: no rewind takes tokens back out of their state")
        if cache is not self.cache or not 0 < remove <= self.droppable:
            raise ValueError(f"retro_compile: cannot crop {remove} positions from the cache: only the tokens of the "
                             f"last forward call of several tokens, after its first, can be dropped ({self.droppable} "
                             "here)")
        kept = self.fed[:, :-remove]
        rewind(self.cache, remove)
        self.length -= remove
        buffers = self._buffers[self.batch]
        buffers.valid[:, self.length:] = False
        buffers.next_pos.sub_(remove)
        buffers.recent.copy_(kept[:, kept.shape[1] - self.window + 1:])  # the w - 1 ids that end the kept tokens
        self.fed, self.droppable, self.refeed = None, 0, True

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
        about 80 us on the host, a few percent of a step where no CUDA graph replays it). The same
        tensors: the new ids go in through ``buffers.ids``, since the caller's may be a slice whose
        row stride changes every step (``input_ids[:, -1:]``), and Dynamo would compile the step
        again for each, past its recompile limit running it uncompiled, with dense attention."""
        buffers.ids.copy_(ids)
        args = (buffers.ids, cache, buffers.valid, buffers.next_pos, buffers.recent)
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
        the cache of the request in progress, not right after a crop); any other call is a prefill."""
        return cache is not None and cache is self.cache and rows == 1 and not self.refeed

    def lead_padding(self, prompt: int) -> int:
        """Padding slots the driver puts before a prompt of ``prompt`` tokens: a decode step's window
        re-feeds the ``w - 1`` tokens before the newest, so the cache must hold more than ``w``
        slots before the first step. A shorter prompt is left-padded to ``w + 1`` slots, which its
        rows never see: its tokens are those of the prompt alone, as for any padded row."""
        return max(0, self.window + 1 - prompt)

    def _prefill(self, input_ids, attention_mask, position_ids, cache, kwargs):
        """Write the prompt into the cache and build the decode state, in chunks of at most
        ``RetroConfig.prefill_tokens`` tokens (summed over the batch) and at most ``chunk_positions``
        positions; returns the last chunk's output."""
        batch, n = input_ids.shape
        if cache is not self.cache:
            self.reset(self.request_mask)
            self.cache, self.batch = cache, batch
            self.length = int(cache.get_seq_length())
        self.check_request(self.length + n)
        buffers = self._buffers_for(batch, input_ids.device)
        before = buffers.recent.clone()
        lead = self.lead_padding(n) if self.length == 0 else 0
        if lead:  # a short prompt: padding slots first (see lead_padding)
            input_ids, attention_mask, position_ids = self._lead_padded(lead, input_ids, attention_mask, position_ids)
        elif self.refeed:  # after a crop: the last w - 1 kept tokens again (see crop)
            input_ids, position_ids = torch.cat([before, input_ids], dim=1), None  # positions: counted from valid
            rewind(cache, before.shape[1])
            self.length -= before.shape[1]
            self.refeed = False
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, int) and 0 < keep and n <= self.few_rows:
            # A call of a few tokens (drafts to verify) asks for a different number of rows' logits
            # each time; every int is a compiled variant of its own, so it gets them all, cut below.
            kwargs = {**kwargs, "logits_to_keep": 0}
        out = None
        max_tokens = self.config.prefill_tokens
        if self.chunk_positions:
            max_tokens = min(max_tokens, self.chunk_positions * batch)
        for begin, end in prefill_chunks(input_ids.shape[1], batch, max_tokens):
            out = self._prefill_chunk(input_ids[:, begin:end], attention_mask,
                                      None if position_ids is None else position_ids[..., begin:end], kwargs)
        # crop() may drop the call's tokens after its first, as long as more than w slots stay (lead_padding)
        self.fed = torch.cat([before, input_ids], dim=1)
        self.droppable = max(0, min(n - 1, self.length - self.window - 1))
        rows = keep if isinstance(keep, int) and 0 < keep < n else n
        if out.logits.shape[1] > rows:  # the padding or re-fed slots' rows, or rows not asked for
            out.logits = out.logits[:, -rows:]
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
        if self.kinds is not None:
            mask = self.kinds.masks(mask, torch.arange(start, start + n, device=device), keys,
                                    None if padding is None else padding[:, start:])
            masks = list(mask.values()) if isinstance(mask, dict) else [mask]
        mask_dims = (2, 3) if self.cuts_keys else (2,)
        for t in [input_ids, position_ids] + [m for m in masks if m is not None]:
            for dim in mask_dims if t.dim() == 4 else (1,):  # 4D attention masks; ids, positions, 2D padding
                torch._dynamo.mark_dynamic(t, dim)
        self.store.forget_built()  # a prefill that runs no rewritten graph must leave nothing to decode from
        out = self.run_prefill(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
        self.length += n
        buffers.next_pos.copy_(position_ids[:, -1] + 1)
        recent = torch.cat([buffers.recent, input_ids], dim=1)  # a chunk shorter than w - 1 keeps earlier ids
        buffers.recent.copy_(recent[:, recent.shape[1] - buffers.recent.shape[1]:])
        return out

    def _lead_padded(self, lead: int, input_ids, attention_mask, position_ids):
        """``input_ids`` with ``lead`` padding slots before it, and its 2D padding mask and position
        ids to match (the padding's positions are 0, as generate() gives padded slots)."""
        batch, n = input_ids.shape
        padding = self._padding_mask(attention_mask, batch, n, input_ids.device)
        prompt = torch.ones_like(input_ids, dtype=torch.bool) if padding is None else padding
        input_ids = torch.cat([input_ids.new_zeros(batch, lead), input_ids], dim=1)
        if position_ids is not None:
            position_ids = torch.cat([position_ids.new_zeros(*position_ids.shape[:-1], lead), position_ids], dim=-1)
        return input_ids, torch.cat([prompt.new_zeros(batch, lead), prompt], dim=1), position_ids

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
        if mask.shape[1] < length:  # tokens after the prompt's mask: generated or drafted, never padding
            mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]), value=True)
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
        self.fed, self.droppable = None, 0
        return causal_lm_output(logits[:, None], self.cache)
