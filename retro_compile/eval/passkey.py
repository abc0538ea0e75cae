"""Passkey retrieval: a random 5-digit key hidden at a depth of a long filler text.

The context up to the question is one dense prefill; the question is then fed one decode step
per token and the answer decoded greedily, so every token that must find the key goes through
the sparse decode path.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from .decode import DecodeSession

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    context: list[int]  # prefilled densely
    question: list[int]  # fed one decode step per token
    key: str


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens (question included), the needle ``depth`` of the way in."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey_prompt: depth={depth} must lie in [0, 1]")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, needle, question = encode(INTRO), encode(NEEDLE.format(key=key)), encode(QUESTION)
    filler_tokens = length - len(intro) - len(needle) - len(question)
    if filler_tokens < 0:
        raise ValueError(f"passkey_prompt: length={length} is shorter than the prompt's fixed text")
    unit = encode(FILLER)
    filler = (unit * (filler_tokens // len(unit) + 1))[:filler_tokens]
    cut = round(depth * filler_tokens)
    return PasskeyPrompt(intro + filler[:cut] + needle + filler[cut:], question, key)


def random_keys(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [str(rng.randrange(10000, 100000)) for _ in range(count)]


@torch.no_grad()
def passkey_answers(model: torch.nn.Module, tokenizer, prompts: list[PasskeyPrompt], answer_tokens: int = 8,
                    device: str | torch.device = "cpu") -> list[str]:
    """Greedy answers, one per prompt, decoded as one batch (the prompts must be equally long)."""
    context = torch.tensor([p.context for p in prompts], device=device)
    question = torch.tensor([p.question for p in prompts], device=device)
    session = DecodeSession(model)
    logits = session.prefill(context)
    for t in range(question.shape[1]):
        logits = session.step(question[:, t])
    answer = []
    for _ in range(answer_tokens):
        token = logits.argmax(-1)
        answer.append(token)
        logits = session.step(token)
    return tokenizer.batch_decode(torch.stack(answer, dim=1))


def is_correct(answer: str, key: str) -> bool:
    """Exact match: the first number in the answer is the key."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == key
