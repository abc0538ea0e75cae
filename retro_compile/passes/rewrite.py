"""Rewrite SDPA call sites of sparse layers into ``retro::attention`` with the layer's state.

Dense layers and call sites the op cannot serve stay SDPA; each is logged once with the reason
(at WARNING when the user did not ask for it). State tensors are registered on the graph module
as buffers (names starting with :data:`STATE_BUFFER_PREFIX`) and read with ``get_attr``, so the
graph runs as it is; before Inductor the backend turns them into static graph inputs
(``backend.state_as_inputs``), and the op's in-place updates are functionalised and re-inplaced by
Inductor.

A *prefill* site builds the layer's state; a *decode* site reads it. Which one a graph's sites are
is said by whoever compiled the graph (``phase``: the Hugging Face driver compiles its prefill and
its decode step as functions of their own), and the op is told too. Where nobody says it (the
generic ``backend="retro"`` path), a site with more query rows than the window (or a dynamic
number of rows) is a prefill site and one with at most ``window`` static rows a decode site, and
the op decides the same way from its call's rows. A decode site is rewritten only if a prefill site of the same layer
and state was rewritten before it, and :class:`Rewrite` records which states a graph builds and
reads, so that the backend can check at run time that a decode step never reads state its own
prefill did not build (:func:`retro_compile.backend.guard_state`).

A decode site's query rows' cache positions are data: a decode step that knows them (the Hugging
Face driver does) passes them through :func:`window_slots`, and the rewrite hands that tensor to
every layer's op. Where no step said them, they are read off the mask, once per graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.fx as fx

from ..config import RetroConfig
from ..kernels.op import unservable
from ..kernels.masks import mask_positions
from ..kernels.reference import SparseParams, sdpa_row_by_row
from ..state import STATE_FIELDS, LayerState, StateShape, StateStore
from .sdpa import SdpaSite, example_value, find_sdpa_sites

log = logging.getLogger(__name__)


def sparse_params(config: RetroConfig) -> SparseParams:
    return SparseParams(config.page_size, config.budget_pages, config.budget_fraction,
                        config.sink_pages, config.local_pages, config.window)


def chosen_dense(site: SdpaSite, config: RetroConfig, model_dense: Mapping[int, str]) -> str | None:
    """Why this site stays dense by choice (the mode, ``dense_layers``) or by the model's design
    (``model_dense``: layer index -> why, such as sliding-window layers); None otherwise."""
    if config.mode == "dense":
        return "mode='dense'"
    if config.is_dense_layer(site.layer_index):
        return f"layer {site.layer_index} is in dense_layers"
    return model_dense.get(site.layer_index)


def unsupported_reason(site: SdpaSite) -> str | None:
    """Why the op cannot serve this call site (it stays dense SDPA), or None if it can."""
    if isinstance(site.dropout_p, fx.Node) or site.dropout_p != 0.0:
        return f"dropout_p={site.dropout_p} (the op has no dropout)"
    if isinstance(site.scale, fx.Node) or isinstance(site.is_causal, fx.Node):
        return "scale or is_causal is computed at run time"
    q, k, v = (example_value(n) for n in (site.query, site.key, site.value))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "query/key/value have no shape metadata"
    if q.dim() == k.dim() == 4:  # (a wrong rank is the op's rule's to name, below)
        if not all(isinstance(s, int) for s in (*q.shape[:2], q.shape[3], k.shape[1], k.shape[3])):
            return "batch, head or head_dim sizes are dynamic (mark them static)"
        if q.shape[1] != k.shape[1] and not site.enable_gqa:
            return "query and key heads differ without enable_gqa"
    mask = example_value(site.attn_mask)
    if mask is not None and not isinstance(mask, torch.Tensor):
        return f"attn_mask of type {type(mask).__name__}"
    problem = unservable(q, k, v, mask)  # the op's own rule: what it would refuse stays SDPA
    return None if problem is None else problem[1]


def query_rows(site: SdpaSite) -> int | torch.SymInt | None:
    """The site's number of query rows (second to last dim), None without shape metadata."""
    query = example_value(site.query)
    return query.shape[-2] if isinstance(query, torch.Tensor) else None


PHASES = ("prefill", "decode")


@torch.library.custom_op("retro::window_slots", mutates_args=())
def window_slots(slots: torch.Tensor) -> torch.Tensor:
    """Say a decode step's window rows' cache slots (n,) int64, the same for every batch row, to the
    rewrite: a step builds its mask from what this returns, and the rewrite of its graph hands the
    slots to each sparse layer's op as ``positions`` and drops this call. Unrewritten, a copy."""
    if slots.dim() != 1 or slots.dtype != torch.int64:
        raise ValueError(f"retro::window_slots: slots must be 1-D int64, got {slots.dtype} {tuple(slots.shape)}")
    return slots.clone()


@window_slots.register_fake
def _(slots: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(slots)


def said_slots(graph: fx.Graph) -> fx.Node | None:
    """The slots a decode step said with :func:`window_slots` (the call is removed, its users read
    the slots directly), or None if it said none."""
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.retro.window_slots.default]
    if len(calls) > 1:
        raise ValueError(f"retro-compile: a decode graph says its window slots {len(calls)} times; once is the rule")
    if not calls:
        return None
    slots = calls[0].args[0]
    calls[0].replace_all_uses_with(slots)
    graph.erase_node(calls[0])
    return slots


def is_decode_site(site: SdpaSite, config: RetroConfig, phase: str | None = None) -> bool:
    """Whether a site is a decode site: as ``phase`` says (a decode graph's sites must have at most
    ``window`` query rows, fixed at compile time), or where it is None, by those rows."""
    rows = query_rows(site)
    fits = isinstance(rows, int) and rows <= config.window
    if phase is None:
        return fits
    if phase == "decode" and not fits:
        raise ValueError(f"retro-compile: {site.layer_name} has {rows} query rows in a graph compiled as a decode "
                         f"step, which has at most window={config.window}")
    return phase == "decode"


def attend_dense_window(graph: fx.Graph, site: SdpaSite) -> None:
    """A dense decode site with several rows (a dense layer's window) becomes ``retro::dense_window``:
    one pass over the cache for all rows where its kernel applies, SDPA row by row elsewhere. With
    dropout, a scale or GQA flag computed at run time, or dynamic sizes it goes row by row directly."""
    tensors = [example_value(n) for n in (site.query, site.key, site.value)]
    static = all(isinstance(t, torch.Tensor) and all(isinstance(s, int) for s in t.shape) for t in tensors)
    if (not static or any(isinstance(x, fx.Node) for x in (site.dropout_p, site.scale, site.enable_gqa))
            or site.dropout_p != 0.0):
        site.node.target = sdpa_row_by_row
        return
    with graph.inserting_before(site.node):
        new = graph.call_function(torch.ops.retro.dense_window.default,
                                  (site.query, site.key, site.value, site.attn_mask, site.scale, bool(site.enable_gqa)))
    new.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)


def _note_dense(store: StateStore, layer: str, reason: str, chosen: bool) -> None:
    """Record why a layer stays dense; log it the first time for this model (WARNING unless chosen)."""
    if store.note_dense(layer, reason):
        log.log(logging.INFO if chosen else logging.WARNING, "retro-compile: %s stays dense SDPA: %s", layer, reason)


@dataclass
class Rewrite:
    """What one rewritten graph does with state: each layer's state it builds (prefill sites; None
    for a prefill site left dense, which builds nothing) and each layer's state it reads (decode sites)."""

    builds: dict[str, LayerState | None] = field(default_factory=dict)
    reads: dict[str, LayerState] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """The layers now served by ``retro::attention``."""
        return [name for name, state in self.builds.items() if state is not None] + list(self.reads)


def rewrite_sdpa(gm: fx.GraphModule, config: RetroConfig, store: StateStore, phase: str | None = None) -> Rewrite:
    """Rewrite ``gm`` in place; returns which layers' state the graph builds and reads. ``phase``
    (``"prefill"`` or ``"decode"``) is what every call of the graph is; None: each site's rows say."""
    if phase not in (None, *PHASES):
        raise ValueError(f"retro-compile: phase={phase!r} is not one of {PHASES} or None")
    graph = gm.graph
    plan = Rewrite()
    params = sparse_params(config)
    shared_positions: dict[tuple, fx.Node] = {}
    slots = said_slots(graph)
    for site in find_sdpa_sites(graph):
        decode = is_decode_site(site, config, phase)
        chosen = chosen_dense(site, config, store.model_dense)
        reason = chosen or unsupported_reason(site)
        state = None
        if not reason:
            q, k, v = (example_value(n) for n in (site.query, site.key, site.value))
            shape = StateShape.of_call(q, k, v, config.num_pages, config.window, config.summaries)
            if decode and not store.prefilled(site.layer_name, shape):
                reason = "its prefill was not rewritten, so the decode step would have no state to read"
            else:
                state = store.get(site.layer_name, shape)
        if reason:
            _note_dense(store, site.layer_name, reason, chosen is not None)
            if not decode:
                plan.builds[site.layer_name] = None
            elif query_rows(site) > 1 and site.is_causal is False:
                attend_dense_window(graph, site)
            continue
        if decode:
            plan.reads[site.layer_name] = state
        else:
            plan.builds[site.layer_name] = state
            store.mark_prefilled(site.layer_name, shape)
        with graph.inserting_before(site.node):
            state_nodes = []
            for name, tensor in zip(STATE_FIELDS, state):
                attr = _buffer_name(gm, site.layer_name, name)
                _register_state(gm, attr, tensor)
                node = graph.get_attr(attr)
                node.meta["example_value"] = tensor
                state_nodes.append(node)
            positions = _positions_node(graph, site, slots, shared_positions) if decode else None
            new = graph.call_function(
                torch.ops.retro.attention.default,
                (site.query, site.key, site.value, site.attn_mask, *state_nodes,
                 bool(site.is_causal), site.scale, *params, positions, None if phase is None else not decode),
            )
        new.meta = dict(site.node.meta)
        site.node.replace_all_uses_with(new)
        graph.erase_node(site.node)
    graph.lint()
    gm.recompile()
    if plan.layers:
        log.debug("retro-compile: %d SDPA sites -> retro::attention: %s", len(plan.layers), plan.layers)
    return plan


def _positions_node(graph: fx.Graph, site: SdpaSite, slots: fx.Node | None,
                    shared: dict[tuple, fx.Node]) -> fx.Node | None:
    """The decode site's query positions (B, n), one node per (source, batch, rows) for the whole
    graph: the ``slots`` the step said (:func:`said_slots`), expanded to every batch row and made
    contiguous (the attention stage reads positions contiguously and would otherwise copy a
    broadcast view a layer), where their number matches the site's rows; else read off the site's
    mask (:func:`mask_positions`: a
    reduction over the cache, once per graph rather than once a layer, as Inductor does not merge
    it across op calls). None with neither; the op then reads its own mask. Called with the
    graph's insertion point before the site."""
    q = example_value(site.query)
    batch, rows = q.shape[0], q.shape[2]
    said = example_value(slots) if slots is not None else None
    if isinstance(said, torch.Tensor) and said.shape == (rows,):
        key = (slots, batch, rows)
        if key not in shared:  # tensor methods, with the example values a compile cache's key reads
            expanded = graph.call_method("expand", (slots, batch, -1))
            expanded.meta["example_value"] = said.expand(batch, -1)
            shared[key] = graph.call_method("contiguous", (expanded,))
            shared[key].meta["example_value"] = expanded.meta["example_value"].contiguous()
        return shared[key]
    if not isinstance(site.attn_mask, fx.Node):
        return None
    key = (site.attn_mask, batch, rows)
    if key not in shared:
        shared[key] = graph.call_function(mask_positions, key)
    return shared[key]


def _register_state(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as a buffer of ``gm``. A Dynamo graph module also maps each of its
    buffers to a source (AOTAutograd reads that map to mark buffers static for CUDA graphs), so
    the new buffer gets an entry there: this is Dynamo's one private field the rewrite touches."""
    gm.register_buffer(name, tensor, persistent=False)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(source_name=name)


STATE_BUFFER_PREFIX = "_retro_"  # the names of the state buffers the rewrite registers


def _buffer_name(gm: fx.GraphModule, layer: str, field: str) -> str:
    base = STATE_BUFFER_PREFIX + "".join(c if c.isalnum() else "_" for c in layer) + "_" + field
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
