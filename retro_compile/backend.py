"""The ``retro`` torch.compile backend: rewrite SDPA call sites, then hand the graph to Inductor.

``torch.compile(model, backend="retro")`` works like ``backend="inductor"``: it accepts
``mode=`` and ``options=`` (Inductor's), plus ``options={"retro_config": RetroConfig(...)}``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.fx as fx
import torch._functorch.config
from torch._dynamo import register_backend

from .config import RetroConfig
from .passes.rewrite import rewrite_sdpa
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
) -> Callable:
    """Rewrite ``gm``'s SDPA call sites into ``retro::attention``, then compile with Inductor.

    ``inductor=False`` runs the rewritten graph as it is (fast to compile; used for prefill).
    """
    options = dict(options or {})
    config = options.pop("retro_config", None) or config or RetroConfig()
    if not isinstance(config, RetroConfig):
        raise TypeError(f"retro backend: retro_config must be a RetroConfig, got {type(config).__name__}")
    rewrite_sdpa(gm, config, DEFAULT_STORE if store is None else store)
    if not inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = {**torch._inductor.list_mode_options(mode), **options} if mode else options
    # AOTAutograd's cache keys a graph by its ops, and sees retro::attention as one opaque op: after
    # a change to the op's body it would serve the graph traced from the old body. Inductor's FX
    # graph cache keys the traced body itself (Triton kernel sources included) and stays on.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches=patches)


def backend_for(config: RetroConfig, store: StateStore, **kwargs: Any) -> Callable:
    """The backend bound to one model's configuration and state."""
    return functools.partial(retro_backend, config=config, store=store, **kwargs)


register_backend(name="retro", compiler_fn=retro_backend)
