"""A soak test: one compiled model serving a long, seeded, random sequence of requests."""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from retro_compile import RetroConfig, retro_compile

from .hf_models import HandDriven, prompts, tiny_model
from .hf_models import greedy_new_tokens as greedy

MAX_CONTEXT = 128


class Recorder(BaseStreamer):
    """Collects the streamed tokens; raises at put number ``fail_at`` (a user stopping mid-stream)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.tokens: list[torch.Tensor] = []
        self.fail_at = fail_at

    def put(self, value: torch.Tensor) -> None:
        if self.fail_at is not None and len(self.tokens) == self.fail_at:
            raise KeyboardInterrupt("stopped mid-stream")
        self.tokens.append(value)

    def end(self) -> None:
        pass


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def random_request(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids and padding mask of a batch of 1-8 prompts of 8-60 tokens, left-padded to the
    longest (plus up to 9 more), and a number of new tokens."""
    batch = rng.randint(1, 8)
    lengths = [rng.randint(8, 60) for _ in range(batch)]
    width = max(lengths) + rng.choice([0, 0, rng.randint(1, 9)])
    ids, mask = prompts(batch, width, pad=tuple(width - n for n in lengths), seed=rng.randint(0, 10**6))
    return ids, mask, rng.randint(2, 8)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
@pytest.mark.parametrize("budget", [MAX_CONTEXT, 24], ids=["full-budget", "small-budget"])
def test_one_model_serves_a_long_random_sequence_of_requests(budget, caplog):
    """Every batch size, then forty seeded random requests on one model: batch sizes 1-8, ragged
    left padding, prompt lengths, greedy and sampling, streamers, and streams stopped by an
    exception mid-generation.
    Every greedy output equals a fresh computation (full budget: the untouched model's tokens;
    small budget: the hand-driven reference, which keeps no state between requests), streamed
    tokens equal the returned ones, nothing logs a warning (no layer goes dense, nothing reaches
    Dynamo's recompile limit), and resident memory stays flat once every batch size was served."""
    config = RetroConfig(mode="retro", window=2, budget=budget, page_size=8, dense_layers=1,
                         max_context=MAX_CONTEXT)
    base = tiny_model(layers=2, seed=21)
    model = retro_compile(copy.deepcopy(base), config)
    rng = random.Random(1234)
    checked = {"greedy": 0, "sampled": 0, "stopped": 0}

    def check_greedy(ids: torch.Tensor, mask: torch.Tensor, new: int, streamer: Recorder | None = None) -> None:
        got = greedy(model, ids, mask, new, streamer=streamer)
        if budget >= MAX_CONTEXT:
            want = greedy(base, ids, mask, new)
        else:
            want, _, _ = HandDriven(copy.deepcopy(base), config).generate(ids, mask, new)
        assert torch.equal(got, want), f"batch {ids.shape[0]}, width {ids.shape[1]}"
        if streamer is not None:
            assert torch.equal(torch.cat([t.reshape(-1) for t in streamer.tokens[1:]]), got[0])
        checked["greedy"] += 1

    with caplog.at_level(logging.WARNING):
        for batch in range(1, 9):  # every batch size, padded and not, before memory is measured
            for pad in ((), (3,)):
                ids, mask = prompts(batch, 30, pad=pad, seed=batch)
                check_greedy(ids, mask, 3)
        rss_warm = _rss_mib()
        for i in range(40):
            ids, mask, new = random_request(rng)
            kind = rng.choice(["greedy", "greedy", "sampled", "stopped"])
            if kind == "stopped":
                with pytest.raises(KeyboardInterrupt):
                    greedy(model, ids, mask, new, streamer=Recorder(fail_at=rng.randint(1, new)))
                checked["stopped"] += 1
            elif kind == "sampled":
                torch.manual_seed(i)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=True,
                                     top_k=20, pad_token_id=0)
                assert out.shape == (ids.shape[0], ids.shape[1] + new)
                checked["sampled"] += 1
            else:  # transformers streams batches of one only
                check_greedy(ids, mask, new, Recorder() if ids.shape[0] == 1 else None)
    grown = _rss_mib() - rss_warm
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert all(count > 5 for count in checked.values()), checked
    assert grown < 48.0, f"resident memory grew by {grown:.1f} MiB over 40 requests"
