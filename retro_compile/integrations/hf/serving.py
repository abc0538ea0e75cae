"""Continuous batching on a ``retro_compile``d model: transformers' ``generate_batch``,
``init_continuous_batching`` (:class:`~transformers.ContinuousBatchingManager`) and the
``transformers serve`` built on them, with sparse + retrospective decode.

Continuous batching packs the new tokens of every scheduled request into one row and keeps keys
and values in a paged cache; each attention call gets every request's keys gathered in position
order. Three hooks make that batch run the decode-window algorithm of ``generate()``:

1. **The window.** Once a step has sampled a request's token, the request is set to feed its last
   ``w`` tokens next, from ``w - 1`` positions back (:func:`feed_window`). The scheduler counts and
   allocates them like any tokens, and the paged cache overwrites the re-fed positions' keys and
   values, as the static cache does under ``generate()``.
2. **The batch.** Each forward call carries a :class:`ServedBatch` (keyword ``retro_batch``) that
   names each request in the row, its first position, its rows and its phase; the attention
   function (``retro_sdpa``) hands such calls to :meth:`ServedBatch.attention`, which runs each
   request's rows over its own keys: dense layers as causal SDPA, sliding-window layers as SDPA
   over the positions the paged cache keeps for them, sparse ones through ``retro::attention``
   with that request's state.
3. **State by request.** :class:`RequestStates` keeps each request's
   :class:`~retro_compile.state.LayerState` per sparse layer by request id (the batch is
   reordered every step). A prefill from position 0 builds it; a request forked for parallel
   sampling gets a copy; the paged cache freeing the request's blocks (finished, cancelled,
   evicted) drops it.

So each request decodes exactly as it would alone through ``generate()``: rows never read each
other's keys or state. What this path does not do yet: CUDA graphs, ``torch.compile`` of the
step and asynchronous batching (each is refused when asked for), windows over 2 on models with
sliding-window layers, and models with recurrent layers. Attention runs request by request,
eagerly: ``retro::attention``'s Triton kernels on CUDA, the PyTorch reference elsewhere.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F

from ...config import RetroConfig
from ...kernels.op import retro_attention
from ...kernels.reference import SparseParams
from ...passes.rewrite import sparse_params
from ...state import LayerState, StateShape, allocate
from .attention import BATCH_KWARG
from .cache import LayerKinds, slot_mask

if TYPE_CHECKING:
    from transformers import ContinuousBatchingManager

log = logging.getLogger(__name__)


MIN_TRANSFORMERS = (5, 24)  # the continuous batching (scheduler, paged cache, forks) the hooks are written for

# Named ranges a profiler sees (torch.profiler.record_function) for this path's share of a step.
PROFILE_RANGES = MappingProxyType({
    "attention": "retro_compile.served_attention",  # ServedBatch.attention, every layer's call
    "prepare": "retro_compile.prepare_batch",  # the batch processor's batch tensors and this path's plan
    "update": "retro_compile.update_batch",  # its update after sampling, and the windows fed next
})

# ContinuousBatchingConfig fields this path fixes, with why; a user's other choice is an error.
FIXED_SETTINGS: dict[str, tuple[Any, str]] = {
    "use_cuda_graph": (False, "attention runs request by request, which a CUDA graph cannot record"),
    "use_async_batching": (False, "a step's window is read from the tokens the previous step sampled"),
    "varlen_compile_config": (None, "the step runs eagerly"),
    "decode_compile_config": (None, "the step runs eagerly"),
    "default_compile_level": (0, "the step runs eagerly"),
    "max_blocks_per_request": (0, "the decode fast path hands attention a block table, not the gathered keys"),
    "cpu_offload_space": (0.0, "a request offloaded to the CPU would come back without its decode state"),
}
# Fixed whatever the user left it at, with one log line: its default is on, and the window rewrites shared blocks.
BLOCK_SHARING = ("allow_block_sharing", False,
                 "each step overwrites its window's keys and values, which a block shared between requests "
                 "cannot take")


@dataclasses.dataclass(frozen=True)
class Sequence:
    """One request's rows in a packed forward call: ``rows`` tokens at positions
    ``first_position ..``, over keys ``0 .. first_position + rows - 1``; ``capacity``: the most
    positions the request can reach (its prompt plus ``max_new_tokens``)."""

    request_id: str
    first_position: int
    rows: int
    prefill: bool
    capacity: int


class RequestStates:
    """Each request's decode state, per sparse layer, by request id."""

    def __init__(self, config: RetroConfig) -> None:
        self.config = config
        self._states: dict[str, dict[int, LayerState]] = {}

    def __len__(self) -> int:
        """How many requests hold state."""
        return len(self._states)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def start(self, request_id: str) -> None:
        """Forget any state of ``request_id``: its prefill starts from position 0 (a new request, or
        one evicted from the cache and prefilled again)."""
        self._states[request_id] = {}

    def layer_state(self, sequence: Sequence, layer: int, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> LayerState:
        """The state of ``sequence``'s request for ``layer``, allocated by its prefill's first call
        on the layer with pages for the request's ``capacity`` (summaries take ``1 / page_size`` of
        the memory of the keys they summarise, so a short request holds little)."""
        request_id = sequence.request_id
        layers = self._states.get(request_id)
        if layers is None:
            raise RuntimeError(f"retro_compile: request {request_id!r} reached a decode step with no decode state; "
                               "its prefill did not run through this model's continuous batching")
        state = layers.get(layer)
        if state is None:
            if not sequence.prefill:
                raise RuntimeError(f"retro_compile: request {request_id!r} has no decode state for layer {layer}")
            pages = -(-sequence.capacity // self.config.page_size)
            shape = StateShape.of_call(q, k, v, pages, self.config.window, self.config.summaries)
            state = layers[layer] = allocate(shape)
        return state

    def held(self, request_id: str) -> Mapping[int, LayerState]:
        """Layer index -> ``request_id``'s state, for the layers its prefill has reached (read-only)."""
        return MappingProxyType(self._states.get(request_id, {}))

    def fork(self, parent: str, child: str) -> None:
        """Give ``child`` a copy of ``parent``'s state: a request forked for parallel sampling
        shares its parent's prompt and goes on from the same point on its own."""
        self._states[child] = {layer: LayerState(*(t.clone() for t in state))
                               for layer, state in self._states.get(parent, {}).items()}

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def clear(self) -> None:
        self._states.clear()


@dataclasses.dataclass(frozen=True)
class ServedLayers:
    """What each layer of a served model does, fixed for the manager's life: the requests' state,
    the sparse layers' parameters, which layers stay dense, which slide (``kinds``)."""

    states: RequestStates
    params: SparseParams
    model_dense: Mapping[int, str]
    kinds: LayerKinds | None

    @classmethod
    def of(cls, states: RequestStates, model_dense: Mapping[int, str], kinds: LayerKinds | None) -> "ServedLayers":
        return cls(states, sparse_params(states.config), model_dense, kinds)

    def dense(self, layer: int) -> bool:
        """Whether ``layer`` runs dense attention (the rewrite's rule: the mode, ``dense_layers``,
        and layers the model needs dense, such as sliding-window ones)."""
        config = self.states.config
        return config.mode == "dense" or config.is_dense_layer(layer) or layer in self.model_dense

    def sliding(self, layer: int) -> bool:
        return self.kinds is not None and layer in self.kinds.sliding


class ServedBatch:
    """One forward call of continuous batching: which request each run of rows belongs to, and
    the attention that runs each request's rows over its own keys and state."""

    def __init__(self, sequences: list[Sequence], layers: ServedLayers) -> None:
        self.sequences = sequences
        self.layers = layers
        self._views: dict[tuple[torch.device, bool], list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}

    def views(self, device: torch.device, sliding: bool) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Per request, built once per call and shared by every layer of its kind: the position of
        its first key in the call (0, or on a sliding-window layer the oldest the paged cache keeps
        for it, ``window - 1`` before its rows), its rows' positions (1, rows), and their mask
        (1, 1, rows, keys) bool (:func:`~.cache.slot_mask`, within the window on a sliding layer);
        None for a full-attention call from position 0, which SDPA's causal flag says."""
        if (device, sliding) not in self._views:
            kinds, views = self.layers.kinds, []
            for sequence in self.sequences:
                first, end = sequence.first_position, sequence.first_position + sequence.rows
                rows = torch.arange(first, end, device=device)
                first_key = first - min(first, kinds.window - 1) if sliding else 0
                mask = None
                if first or sliding:
                    mask = slot_mask(None, rows, end)
                    mask = (mask & kinds.near(rows, end) if sliding else mask)[..., first_key:]
                views.append((first_key, rows[None], mask))
            self._views[device, sliding] = views
        return self._views[device, sliding]

    def attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scaling: float | None) -> torch.Tensor:
        """``query`` (1, Hq, rows, D) of every request, packed; ``key``/``value`` (1, Hkv, keys, D),
        each request's keys as the paged cache gathers them, in position order. Returns
        (1, rows, Hq, Dv), as transformers' attention functions do. The rows are the batch's own:
        this path never pads them (no CUDA graph, no compile)."""
        with torch.profiler.record_function(PROFILE_RANGES["attention"]):
            return self._attention(module.layer_idx, query, key, value, scaling)

    def _attention(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   scaling: float | None) -> torch.Tensor:
        dense = self.layers.dense(layer)
        outputs, row, key_row = [], 0, 0
        for sequence, (first_key, positions, mask) in zip(self.sequences,
                                                          self.views(query.device, self.layers.sliding(layer))):
            keys = sequence.first_position + sequence.rows - first_key
            q = query[:, :, row:row + sequence.rows]
            k, v = key[:, :, key_row:key_row + keys], value[:, :, key_row:key_row + keys]
            if dense:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                                     enable_gqa=q.shape[1] != k.shape[1])
            else:
                state = self.layers.states.layer_state(sequence, layer, q, k, v)
                out = retro_attention(q, k, v, mask, state, self.layers.params, is_causal=mask is None, scale=scaling,
                                      positions=None if sequence.prefill else positions, prefill=sequence.prefill)
            outputs.append(out)
            row, key_row = row + sequence.rows, key_row + keys
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def last_tokens(state: Any, count: int) -> list[int]:
    """The last ``count`` tokens of a request's sequence (prompt, then generated tokens)."""
    generated = state.generated_tokens
    if count <= len(generated):
        return generated[len(generated) - count:]
    prompt = state.initial_tokens
    return prompt[len(prompt) - (count - len(generated)):] + generated


def feed_window(state: Any, window: int) -> None:
    """Set a decoding request to feed its last ``window`` tokens next (fewer if the sequence is
    shorter), from as many positions back: the step re-computes the ``window - 1`` tokens before
    the new one, overwriting their keys and values, as ``generate()``'s decode step does."""
    fed = min(window, state.position_offset + 1)  # position_offset: the new token's position
    state.tokens_to_process = last_tokens(state, fed)
    state.position_offset -= fed - 1


def batching_config(requested: Any) -> Any:
    """A copy of the ``ContinuousBatchingConfig`` ``requested`` (None: the default one) with the
    settings this path needs (:data:`FIXED_SETTINGS`); a user's other choice of one of them is a
    ``ValueError`` naming it."""
    from transformers import ContinuousBatchingConfig

    defaults = ContinuousBatchingConfig()
    cb_config = copy.deepcopy(requested) if requested is not None else defaults
    for name, (value, why) in FIXED_SETTINGS.items():
        chosen = getattr(cb_config, name)
        if chosen != value and chosen != getattr(defaults, name) and chosen is not None:
            raise ValueError(f"retro_compile: continuous batching with {name}={chosen!r} is not supported "
                             f"({why}); leave it unset or set it to {value!r}")
        setattr(cb_config, name, value)
    name, value, why = BLOCK_SHARING
    if getattr(cb_config, name) != value:
        log.info("retro-compile: continuous batching runs with %s=%r: %s", name, value, why)
        setattr(cb_config, name, value)
    return cb_config


def summary_share(config: RetroConfig, dtype: torch.dtype) -> float:
    """The part of the decode memory (keys and values, and page summaries) that the summaries of a
    request's sparse layers take: a key and a value an element per position against a max and a
    min per page of ``page_size`` positions (in the key dtype, or int8)."""
    summary_bytes = 2 * (1 if config.summaries == "int8" else dtype.itemsize) / config.page_size
    return summary_bytes / (summary_bytes + 2 * dtype.itemsize)


def check_lengths(config: RetroConfig, prompt: int, new_tokens: int | None) -> None:
    """Refuse a request longer than the decode state holds (``RetroConfig.max_context``)."""
    if new_tokens is None:
        raise ValueError("retro_compile: a continuous-batching request needs max_new_tokens (its length is bounded "
                         f"by RetroConfig.max_context={config.max_context})")
    if prompt + new_tokens > config.max_context:
        raise ValueError(f"retro_compile: a request of {prompt} prompt tokens and max_new_tokens={new_tokens} "
                         f"exceeds RetroConfig.max_context={config.max_context}; raise max_context")


def install_hooks(processor: Any, states: RequestStates, model_dense: Mapping[int, str],
                  kinds: LayerKinds | None) -> None:
    """Hook a ``ContinuousBatchProcessor`` (see the module docstring): plan each batch and hand it
    to the forward call; feed each decoding request its window; copy a request's state to its
    forks; drop a request's state when the cache frees its blocks."""
    from transformers.generation.continuous_batching.requests import RequestStatus

    io, cache, window = processor.inputs_and_outputs, processor.cache, states.config.window
    layers = ServedLayers.of(states, model_dense, kinds)
    prepare, model_kwargs, update = io.prepare_batch_tensors, io.get_model_kwargs, processor.update_batch
    free, free_all, fork = cache.free_blocks, cache.free_all_requests, cache.prepare_fork_request
    scheduled: list[Any] = []
    sequences: list[Sequence] = []

    def prepare_batch_tensors(requests_in_batch: list[Any], *args: Any, **kwargs: Any) -> None:
        with torch.profiler.record_function(PROFILE_RANGES["prepare"]):
            scheduled[:] = requests_in_batch
            sequences[:] = []
            for future in requests_in_batch:
                state = future.state
                prefill = not state.generated_tokens  # the scheduler marks a prompt's last chunk as decoding already
                if prefill and state.position_offset == 0:
                    states.start(state.request_id)
                capacity = len(state.initial_tokens) + state.max_new_tokens  # add_request checked it is set
                sequences.append(Sequence(state.request_id, state.position_offset, future.query_length, prefill,
                                          capacity))
            return prepare(requests_in_batch, *args, **kwargs)

    def get_model_kwargs(*args: Any, **kwargs: Any) -> Any:
        batch = model_kwargs(*args, **kwargs)
        batch[BATCH_KWARG] = ServedBatch(list(sequences), layers)
        return batch

    def update_batch() -> None:
        with torch.profiler.record_function(PROFILE_RANGES["update"]):
            update()
            if window > 1:
                for future in scheduled:
                    if future.has_new_token and future.state.status == RequestStatus.DECODING:
                        feed_window(future.state, window)

    def free_blocks(request_id: str, *args: Any, **kwargs: Any) -> None:
        states.release(request_id)
        return free(request_id, *args, **kwargs)

    def free_all_requests(*args: Any, **kwargs: Any) -> None:  # a batch processor reset for a new session
        states.clear()
        return free_all(*args, **kwargs)

    def prepare_fork_request(parent: Any, children: list[str], *args: Any, **kwargs: Any) -> list[str]:
        forked = fork(parent, children, *args, **kwargs)  # those that did not fit are prefilled anew
        for child in forked:
            states.fork(parent.request_id, child)
        return forked

    io.prepare_batch_tensors, io.get_model_kwargs = prepare_batch_tensors, get_model_kwargs
    processor.update_batch = update_batch
    cache.free_blocks, cache.free_all_requests, cache.prepare_fork_request = (free_blocks, free_all_requests,
                                                                             prepare_fork_request)


@functools.cache
def manager_class() -> type:
    """:class:`RetroBatchingManager`, made on first use (transformers' continuous batching is
    imported only by a model that batches continuously)."""
    from transformers import ContinuousBatchingManager

    class RetroBatchingManager(ContinuousBatchingManager):
        """transformers' ``ContinuousBatchingManager`` over a ``retro_compile``d model: the model
        keeps its attention (``retro_sdpa`` serves packed batches itself) and each batch processor
        it makes is hooked (:func:`install_hooks`)."""

        def __init__(self, model: torch.nn.Module, generation_config: Any, continuous_batching_config: Any,
                     workload_hints: Any, states: RequestStates, model_dense: Mapping[int, str],
                     kinds: LayerKinds | None) -> None:
            self.retro_states, self.retro_model_dense, self.retro_kinds = states, model_dense, kinds
            sized_by_user = (continuous_batching_config.max_memory_percent is not None
                             or continuous_batching_config.num_blocks is not None)
            super().__init__(model, generation_config, continuous_batching_config, workload_hints)
            if not sized_by_user:  # the paged cache takes its share of free memory, the summaries theirs
                share = summary_share(states.config, model.dtype)
                self.continuous_batching_config.max_memory_percent *= 1.0 - share
                log.info("retro-compile: the paged cache takes %.3g of free memory, leaving %.1f%% of its share to the "
                         "requests' page summaries", self.continuous_batching_config.max_memory_percent, 100 * share)
            for name in ("varlen_compile_config", "decode_compile_config"):  # a generation config's compile_config
                if getattr(self.continuous_batching_config, name) is not None:
                    log.info("retro-compile: continuous batching runs its steps eagerly; %s is not used", name)
                    setattr(self.continuous_batching_config, name, None)

        def switch_to_cb_friendly_attn(self, model: torch.nn.Module, auto_switch_to_flash: bool = True) -> None:
            """Nothing to switch: ``retro_sdpa`` serves continuous batching."""

        def _create_batch_processor(self) -> Any:
            processor = super()._create_batch_processor()
            if not getattr(processor, "retro_hooked", False):
                install_hooks(processor, self.retro_states, self.retro_model_dense, self.retro_kinds)
                processor.retro_hooked = True
            return processor

        def add_request(self, input_ids: list[int], request_id: str | None = None, max_new_tokens: int | None = None,
                        *args: Any, **kwargs: Any) -> str | None:
            new = self.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
            check_lengths(self.retro_states.config, len(input_ids), new)
            return super().add_request(input_ids, request_id, max_new_tokens, *args, **kwargs)

    return RetroBatchingManager


def continuous_batching_method(model: torch.nn.Module, config: RetroConfig, model_dense: Mapping[int, str],
                               kinds: LayerKinds | None) -> Any:
    """The model's ``init_continuous_batching``: transformers' own (a cached manager is reused; a
    generation config is required), making a :class:`RetroBatchingManager` with the settings
    this path needs (:func:`batching_config`), after refusing what it does not serve."""

    def init_continuous_batching(generation_config: Any = None, continuous_batching_config: Any = None,
                                 workload_hints: Any = None) -> "ContinuousBatchingManager":
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__).release < MIN_TRANSFORMERS:
            raise NotImplementedError(
                f"retro_compile: continuous batching needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} "
                f"(found {transformers.__version__}), whose batch processor this package hooks; generate() works "
                "from 5.17")
        if kinds is not None and kinds.sliding and config.window > 2:
            raise NotImplementedError(
                f"retro_compile: continuous batching of a model with sliding-window layers ({list(kinds.sliding)}) "
                f"serves windows up to 2, not window={config.window}: the paged cache keeps a sliding layer's last "
                "sliding_window positions, and a longer window feeds again positions whose keys it no longer holds")
        if kinds is not None and kinds.recurrent:
            raise NotImplementedError(
                f"retro_compile: continuous batching does not serve models with recurrent layers (this one has "
                f"{list(kinds.recurrent)}); transformers' continuous batching does not either. Use model.generate(...)")
        cached = getattr(model, "_cached_continuous_batching_manager", None)
        if isinstance(cached, manager_class()):
            return cached
        generation = generation_config if generation_config is not None else model.generation_config
        if generation is None:
            raise ValueError("retro_compile: continuous batching needs a GenerationConfig")
        if generation.eos_token_id is None:
            log.warning("retro-compile: the generation config has no eos_token_id; requests stop at max_new_tokens")
            generation.eos_token_id = -1
        if workload_hints is not None and workload_hints.max_prompt_length:  # generate_batch's requests, up front:
            # it only logs what add_request raises
            new_tokens = workload_hints.max_generated_length or generation.max_new_tokens
            check_lengths(config, workload_hints.max_prompt_length, new_tokens)
        cb_config = batching_config(continuous_batching_config)
        return manager_class()(model, generation, cb_config, workload_hints, RequestStates(config), model_dense, kinds)

    return init_continuous_batching
