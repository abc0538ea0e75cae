"""The ``retro`` torch.compile backend: rewrite SDPA call sites, then hand the graph to Inductor.

``torch.compile(model, backend="retro")`` works like ``backend="inductor"``: it accepts
``mode=`` and ``options=`` (Inductor's), plus ``options={"retro_config": RetroConfig(...)}``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._dynamo import register_backend

from .config import RetroConfig
from .kernels.op import compile_cache_keyed
from .passes.rewrite import STATE_BUFFER_PREFIX, Rewrite, rewrite_sdpa
from .state import StateStore

#: State for graphs compiled through the plain ``backend="retro"`` string. ``retro_compile``
#: gives each model its own store. Sharing is safe across requests (every prefill rebuilds the
#: state) but not for two models of identical layer names and shapes decoding interleaved.
DEFAULT_STORE = StateStore()


def retro_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    *,
    config: RetroConfig | None = None,
    store: StateStore | None = None,
    inductor: bool = True,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    phase: str | None = None,
) -> Callable:
    """Rewrite ``gm``'s SDPA call sites into ``retro::attention``, then compile with Inductor.

    ``inductor=False`` runs the rewritten graph as it is (fast to compile; used for prefill).
    ``phase`` (or ``options["retro_phase"]``): ``"prefill"`` or ``"decode"`` when every call of the
    compiled function is one (the Hugging Face driver's prefill and decode step); None infers each
    call site's phase from its query rows (more than the window: prefill).
    """
    options = dict(options or {})
    config = options.pop("retro_config", None) or config or RetroConfig()
    phase = options.pop("retro_phase", None) or phase
    if not isinstance(config, RetroConfig):
        raise TypeError(f"retro backend: retro_config must be a RetroConfig, got {type(config).__name__}")
    store = DEFAULT_STORE if store is None else store
    plan = rewrite_sdpa(gm, config, store, phase)
    if not inductor:
        return guard_state(gm.forward, plan, store)
    from torch._inductor.compile_fx import compile_fx

    patches = {**torch._inductor.list_mode_options(mode), **options} if mode else options
    gm, state = state_as_inputs(gm) if plan.layers else (gm, [])
    with compile_cache_keyed():
        compiled = compile_fx(gm, [*example_inputs, *static_fakes(state, example_inputs)], config_patches=patches)
    return guard_state(with_state(compiled, state), plan, store)


def state_as_inputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A copy of ``gm`` that takes the decode state the rewrite read as buffers as inputs, placed
    after Dynamo's own, and the state tensors to pass there, in order.

    Compile caches key a graph by its inputs' shapes and dtypes but by its tensor attributes'
    values, and the state's values change every step: as buffers, no process would find a graph
    another compiled. As inputs they are marked static, as Dynamo marks module buffers, so that a
    CUDA graph of the step reads them where they are rather than from copies. A copy, since Dynamo
    reads its own graph's inputs again once the backend returns.
    """
    from torch._dynamo.source import ConstantSource

    graph, copied = fx.Graph(), {}
    result, output = graph.graph_copy(gm.graph, copied, return_output_node=True)
    graph.output(result).meta = dict(output.meta)
    for old, new in copied.items():
        if old.op == "placeholder":
            new._dynamo_source = old._dynamo_source  # what AOTAutograd reads off a Dynamo graph's inputs
    reads = [n for n in graph.find_nodes(op="get_attr") if n.target.startswith(STATE_BUFFER_PREFIX)]
    state = []
    with graph.inserting_after(list(graph.find_nodes(op="placeholder"))[-1]):
        for read in reversed(reads):  # each placed right after Dynamo's inputs: reversed, they land in order
            node = graph.placeholder(read.target)
            node.meta.update(read.meta, tensor_dict={"_dynamo_static_input_type": "unguarded"})
            node._dynamo_source = ConstantSource(source_name=read.target)
            read.replace_all_uses_with(node)
            graph.erase_node(read)
            state.append(getattr(gm, read.target))
    lifted = fx.GraphModule(gm, graph)
    lifted.meta = dict(gm.meta)
    lifted._param_name_to_source = getattr(gm, "_param_name_to_source", {})  # AOTAutograd looks its buffers up there
    return lifted, state[::-1]


def static_fakes(state: list[torch.Tensor], example_inputs: list[Any]) -> list[torch.Tensor]:
    """The state as example inputs for Inductor: fake tensors of static shapes in Dynamo's fake
    mode. Given real tensors, AOTAutograd would fake them with a fresh symbol per dimension, which
    Dynamo has no source for: the first guard on one (a kernel's launch arithmetic on the page
    count) failed the compile (torch 2.11, CUDA)."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return state
    return [fake_mode.from_tensor(t, static_shapes=True) for t in state]


def with_state(compiled: Callable, state: list[torch.Tensor]) -> Callable:
    """``compiled`` called as Dynamo calls it (its own inputs only), with ``state`` added after them."""
    if not state:
        return compiled
    return lambda *args: compiled(*args, *state)


def guard_state(compiled: Callable, plan: Rewrite, store: StateStore) -> Callable:
    """``compiled``, refusing to run a decode step on state that the last prefill did not build.

    A graph's prefill sites record, each time the graph runs, which state they built (or that a
    layer left dense built none); its decode sites check that record first. A decode step on
    state from another request, or on zeros, would give wrong tokens without any error, so this
    raises instead. The check is one integer comparison per call once the record is unchanged.
    """
    if not plan.builds and not plan.reads:
        return compiled
    checked = -1  # the store's built_version last found complete for this graph's reads

    def run(*args: Any) -> Any:
        nonlocal checked
        if plan.reads and checked != store.built_version:
            missing = store.unbuilt(plan.reads)
            if missing:
                raise RuntimeError(
                    f"retro-compile: a decode step would read state that no prefill built for {missing} "
                    "(the request's prefill left these layers dense, ran at another batch size, or did not run); "
                    "refusing to give an answer from stale state"
                )
            checked = store.built_version
        out = compiled(*args)
        if plan.builds:
            store.record_built(plan.builds)
        return out

    run._boxed_call = getattr(compiled, "_boxed_call", False)  # keep the calling convention Dynamo expects
    return run


def backend_for(config: RetroConfig, store: StateStore, **kwargs: Any) -> Callable:
    """The backend bound to one model's configuration and state."""
    return functools.partial(retro_backend, config=config, store=store, **kwargs)


register_backend(name="retro", compiler_fn=retro_backend)
