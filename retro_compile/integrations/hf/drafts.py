"""Lossless decoding (``RetroConfig.draft_tokens = k``): the sparse decode step drafts ``k`` tokens,
one dense forward over them verifies, through transformers' assisted generation.

A round: from the cache of the accepted tokens, ``k`` sparse decode steps draft ``k`` tokens
greedily; the driver then rolls those steps back (:meth:`DecodeWindowDriver.rollback`), and
generate() feeds the newest accepted token and the drafts as one call, which the driver serves as
a prefill chunk: its rows attend densely over the cache, so every token generate() keeps comes
from a dense row. Rejected drafts are cropped as in any assisted decoding (:meth:`DecodeWindowDriver.crop`).
Greedy tokens are the dense model's; sampled tokens are drawn from the dense rows' distribution.
"""

from __future__ import annotations

from typing import Any

import torch


def draft_candidates(driver: Any, tokens: int, max_length: int) -> Any:
    """A transformers ``CandidateGenerator`` whose drafts are ``driver``'s sparse decode steps."""
    from transformers.generation.candidate_generator import CandidateGenerator

    class SparseDrafts(CandidateGenerator):
        def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any) -> tuple[torch.LongTensor, None]:
            count = min(tokens, max_length - input_ids.shape[1] - 1)
            if driver.cache is None or count < 1:  # no prefill yet, or no room
                return input_ids, None
            mark = driver.draft_mark()
            drafts, newest = [], input_ids[:, -1:]
            for _ in range(count):
                logits = driver.forward(input_ids=newest, **{driver.cache_arg: driver.cache}).logits
                newest = logits[:, -1].argmax(-1, keepdim=True)
                drafts.append(newest)
            driver.rollback(mark)
            driver.draft_counts["drafted"] += count
            return torch.cat([input_ids, *drafts], dim=1), None

        def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
            driver.draft_counts["rounds"] += 1
            driver.draft_counts["accepted"] += int(num_matches)

    return SparseDrafts()
