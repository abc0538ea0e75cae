"""Hand-driven decoding of a ``retro_compile``'d model: what the quality tasks are built on.

Every task runs through the same driver and compiled graphs that ``model.generate`` uses: one
dense prefill, then one token per forward call, each call a decode step of the window driver.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class DecodeSession:
    """One request: ``prefill(ids)`` once, then ``step(ids)`` one token per sequence at a time."""

    def __init__(self, model: torch.nn.Module) -> None:
        driver = getattr(model, "retro_driver", None)
        if driver is None:
            raise TypeError("DecodeSession: the model must come from retro_compile (use mode='dense' for dense)")
        driver.reset()
        self.model, self.driver = model, driver
        self.kwargs: dict = {"use_cache": True}

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) predicting the token after ``ids`` (B, N)."""
        self.kwargs[self.driver.cache_arg] = self.driver.cache_for(ids.shape[0], ids.device)
        return self.model(input_ids=ids, logits_to_keep=1, **self.kwargs).logits[:, -1]

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence, ``ids`` (B,) or (B, 1); logits (B, V) predicting the next."""
        return self.model(input_ids=ids.reshape(-1, 1), **self.kwargs).logits[:, -1]


class ExposureMeter:
    """Effective KV exposure (docs/algorithm.md, section 6), read from the op's state after each step.

    ``|S_t u S_{t+1} u .. u S_{t+w-1}| / |S_t|``, averaged over steps, layers and KV heads:
    how many pages a row's final output has seen, relative to the pages a plain Quest step loads.
    A decode step stamps the pages it loads with its position in ``last``, so after step t the
    pages holding the newest stamp are exactly ``S_t``. Everything stays on the device.
    """

    def __init__(self, model: torch.nn.Module, window: int) -> None:
        self.store = model.retro_state  # filled by the first prefill: read it in update()
        self.window = window
        self.recent: deque[list[torch.Tensor]] = deque(maxlen=window)  # S_t per layer, of the last w steps
        self.total: torch.Tensor | float = 0.0  # sum of the ratios, on the device
        self.count = 0

    def update(self) -> None:
        """Call after every decode step."""
        states = self.store.states()
        if len(states) != len(self.store.layers()):
            raise ValueError("ExposureMeter: the model has decoded at several batch sizes; measure a fresh model")
        self.recent.append([s.last == s.last.amax(-1, keepdim=True) for s in states])  # (B, Hkv, NP) each
        if len(self.recent) < self.window:
            return
        for layer, first in enumerate(self.recent[0]):
            union = torch.stack([step[layer] for step in self.recent]).any(0)
            ratios = union.sum(-1) / first.sum(-1)
            self.total = self.total + ratios.sum()
            self.count += ratios.numel()

    @property
    def value(self) -> float:
        if not self.store.states():
            raise ValueError("ExposureMeter: the model has no sparse layer (dense mode?)")
        if self.count == 0:
            raise ValueError(f"ExposureMeter: fewer than window={self.window} decode steps were measured")
        return float(self.total / self.count)


def teacher_forced_nll(model: torch.nn.Module, ids: torch.Tensor, prefill: int, progress: bool = False,
                       meter: ExposureMeter | None = None) -> torch.Tensor:
    """NLL (B, N - prefill), fp32, of every position of ``ids`` (B, N) after ``prefill`` tokens.

    Quest's PG-19 recipe: the first ``prefill`` tokens go in as one dense prefill; each later
    token is fed as a decode step (teacher forcing: the true token, not the predicted one). The
    prefill's last logits score position ``prefill``; feeding token ``t`` scores token ``t + 1``.
    """
    if not 0 < prefill < ids.shape[1]:
        raise ValueError(f"teacher_forced_nll: prefill={prefill} must lie in (0, {ids.shape[1]})")
    session = DecodeSession(model)
    logits = session.prefill(ids[:, :prefill])
    nll = [F.cross_entropy(logits.float(), ids[:, prefill], reduction="none")]
    for t in tqdm(range(prefill, ids.shape[1] - 1), desc="decode", disable=not progress, leave=False):
        logits = session.step(ids[:, t])
        if meter is not None:
            meter.update()
        nll.append(F.cross_entropy(logits.float(), ids[:, t + 1], reduction="none"))
    return torch.stack(nll, dim=1)


def perplexity(nll: torch.Tensor) -> float:
    """exp of the mean NLL over every scored token."""
    return math.exp(nll.float().mean().item())
