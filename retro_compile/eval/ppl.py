"""Long-decode perplexity (Quest's PG-19 recipe) through the same ``retro_compile`` path users run.

Prefill the first ``prefill`` tokens densely, then feed the rest of the passage one decode step
at a time with teacher forcing (the true next token, not the sampled one), scoring every
decoded position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def teacher_forced_nll(model, ids: torch.Tensor, prefill: int, progress: bool = False) -> torch.Tensor:
    """NLL (fp32, one per scored token) of ``ids`` (1, N) after ``retro_compile(model)``.

    Scores the predictions of positions ``prefill .. N-1``: the prefill's last logits predict
    position ``prefill``; feeding token ``t`` predicts token ``t + 1``.
    """
    from transformers import StaticCache

    driver = getattr(model, "retro_driver", None)
    if driver is None:
        raise TypeError("teacher_forced_nll: the model must come from retro_compile (use mode='dense' for dense)")
    if not 0 < prefill < ids.shape[1]:
        raise ValueError(f"teacher_forced_nll: prefill={prefill} must lie in (0, {ids.shape[1]})")
    driver.reset()
    cache = StaticCache(config=model.config, max_cache_len=driver.config.max_context)
    kw = {driver.cache_arg: cache, "use_cache": True}
    logits = model(input_ids=ids[:, :prefill], **kw).logits[:, -1]
    nll = [F.cross_entropy(logits.float(), ids[:, prefill])]
    for t in tqdm(range(prefill, ids.shape[1] - 1), desc="decode", disable=not progress, leave=False):
        logits = model(input_ids=ids[:, t:t + 1], **kw).logits[:, -1]
        nll.append(F.cross_entropy(logits.float(), ids[:, t + 1]))
    return torch.stack(nll)


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())
