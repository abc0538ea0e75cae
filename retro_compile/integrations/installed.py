"""What ``retro_compile`` adds to a Hugging Face model, and how copies and pickles treat it.

``retro_compile`` returns the model it was given, with instance attributes that replace
``forward``, ``generate`` and ``create_masks_for_generate``, the ``retro_*`` handles, and the
attention implementation of its configs set to this package's. Those attributes are closures over
the model and its compiled graphs, so a plain copy would share them with the original (a deep copy
would run the original's weights). Hence:

* ``copy.deepcopy(model)`` copies the untouched model and compiles the copy with the same
  arguments: an independent model with its own weights, caches, graphs and decode state.
* ``pickle`` (and ``torch.save(model)``) writes the untouched model: attention implementation as it
  was, nothing of this package, weights shared with the live model rather than copied first.
  Loading it gives a plain model; call ``retro_compile`` on it again.
* ``save_pretrained`` writes the weights and configs, which this package leaves as they were
  (``generate()`` is told ``disable_compile`` per call, not through the generation config).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch


def model_configs(model: torch.nn.Module) -> list[Any]:
    """Every transformers config object the model's attention reads: its own, those of its
    submodels, and their sub-configs (``text_config``, ...), each once."""
    from transformers import PretrainedConfig

    found: dict[int, Any] = {}
    pending = [getattr(m, "config", None) for m in model.modules()]
    while pending:
        config = pending.pop()
        if not isinstance(config, PretrainedConfig) or id(config) in found:
            continue
        found[id(config)] = config
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(found.values())


def attention_implementations(model: torch.nn.Module) -> list[tuple[Any, Any]]:
    """(config, its attention implementation) for each of :func:`model_configs`, read now:
    taken before ``retro_compile`` switches them, so that copies can switch them back."""
    return [(config, config._attn_implementation_internal) for config in model_configs(model)]


def untouched_clone(model: torch.nn.Module, installed: tuple[str, ...], original_attention: list[tuple[Any, Any]],
                    memo: dict[int, Any], share_tensors: bool) -> torch.nn.Module:
    """A new instance of ``model``'s class with ``model``'s state minus the ``installed`` attributes,
    deep-copied, its configs' attention implementations as they were before ``retro_compile``. With
    ``share_tensors`` the parameters and buffers are the model's own objects (for pickling)."""
    configs = [config for config, _ in original_attention]
    clean = copy.deepcopy(configs)  # one copy, so sub-configs stay shared as they were
    for config, (_, implementation) in zip(clean, original_attention):
        config._attn_implementation_internal = implementation
    memo.update({id(config): twin for config, twin in zip(configs, clean)})
    if share_tensors:
        memo.update({id(t): t for t in [*model.parameters(), *model.buffers()]})
    clone = object.__new__(type(model))
    memo[id(model)] = clone
    state = {name: value for name, value in model.__dict__.items() if name not in installed}
    clone.__dict__.update(copy.deepcopy(state, memo))
    return clone


def install(model: torch.nn.Module, attributes: dict[str, Any], original_attention: list[tuple[Any, Any]],
            recompile: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    """Set ``attributes`` on ``model`` (the one place ``retro_compile`` adds attributes to it), and make
    ``copy.deepcopy(model)`` return ``recompile(untouched copy)`` and pickling write the untouched
    model (see the module docstring). Both hooks are looked up on the instance."""
    names = (*attributes, "__deepcopy__", "__reduce_ex__")

    def deepcopy(memo: dict[int, Any]) -> torch.nn.Module:
        return recompile(untouched_clone(model, names, original_attention, memo, share_tensors=False))

    def reduce_ex(protocol: int) -> Any:
        return untouched_clone(model, names, original_attention, {}, share_tensors=True).__reduce_ex__(protocol)

    for name, value in {**attributes, "__deepcopy__": deepcopy, "__reduce_ex__": reduce_ex}.items():
        setattr(model, name, value)
