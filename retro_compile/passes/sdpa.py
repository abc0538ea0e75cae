"""Find scaled_dot_product_attention call sites in an FX graph and normalise their arguments.

Dynamo graphs call ``torch._C._nn.scaled_dot_product_attention`` (the object behind
``torch.nn.functional.scaled_dot_product_attention``); ``torch.export`` graphs call
``aten.scaled_dot_product_attention.default``. Both take
``(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)``,
positionally or by keyword; a :class:`SdpaSite` holds them by name.

Each site is named by the module that called it (``nn_module_stack``), which is the same in the
prefill graph, the decode graph and every recompile, so it identifies the layer's state.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The argument names and defaults shared by every SDPA target."""


_SIGNATURE = inspect.signature(_sdpa_signature)


@dataclass
class SdpaSite:
    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: Any  # fx.Node or None
    dropout_p: Any  # float, or an fx.Node when computed in the graph
    is_causal: Any
    scale: Any
    enable_gqa: Any
    layer_name: str  # module path, e.g. "model.layers.3.self_attn"
    layer_index: int  # first index in the module path, else the site's order in the graph


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def layer_name_of(node: fx.Node) -> str | None:
    """Normalised path of the innermost module that made this call, or None outside modules."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # How the traced function reaches the module (L['self'], L['args'][0], a bound method's
    # L['fn'].__self__, a partial's L['fn'].args[0].__self__, a closure cell) is not part of the path.
    anchors = [path.rindex(a) + len(a) for a in (".__self__", ".cell_contents") if a in path]
    path = path[max(anchors):] if anchors else re.sub(r"^L\[[^\]]*\](\[[^\]]*\])*", "", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)  # layers[3] / _modules['3'] -> layers.3
    path = re.sub(r"\._modules\.", ".", path)
    return path.strip(".") or "<root>"


def find_sdpa_sites(graph: fx.Graph) -> list[SdpaSite]:
    """Every SDPA call in ``graph``, in execution order, with normalised arguments."""
    sites = []
    for ordinal, node in enumerate(n for n in graph.nodes if is_sdpa(n)):
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        name = layer_name_of(node)
        index = _first_index(name) if name else None
        sites.append(SdpaSite(node=node, **bound.arguments,
                              layer_name=name or f"sdpa_{ordinal}",
                              layer_index=ordinal if index is None else index))
    return sites


def _first_index(path: str) -> int | None:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def example_value(node: Any) -> Any:
    """The fake tensor (or constant) a node stands for, from Dynamo's or AOT's metadata."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))
