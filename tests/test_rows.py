"""Row exactness through generate(): a batch decodes each row exactly as that row alone would.

Greedy tokens are the observable: for quest and retro (w = 2, 4) at small budgets, fp32 on CPU, a
batch gives every row the tokens that row gets alone, under any permutation of the rows, with and
without left padding, on a model that has already served other batch sizes and on a fresh one.
The untouched model has these properties by construction; the sparse state (one per layer and
batch size) must not break them.
"""

from __future__ import annotations

import copy

import pytest
import torch

from retro_compile import RetroConfig, retro_compile

from .hf_models import greedy_new_tokens, prompts, tiny_model

PROMPT, NEW = 90, 12
CONFIGS = {
    "quest": RetroConfig(mode="quest", budget=24, page_size=8, dense_layers=1, max_context=128),
    "retro-w2": RetroConfig(mode="retro", window=2, budget=24, page_size=8, dense_layers=1, max_context=128),
    "retro-w4": RetroConfig(mode="retro", window=4, budget=32, page_size=8, dense_layers=1, max_context=128),
}


def greedy(model, ids, mask):
    return greedy_new_tokens(model, ids, mask, NEW)


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", seed=11)


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.slow
def test_batch_equals_rows_alone_and_permutations_on_one_model(base, name, padded):
    config = CONFIGS[name]
    ids, mask = prompts(3, PROMPT, pad=(0, 13, 5) if padded else (), seed=12)
    model = retro_compile(copy.deepcopy(base), config)
    alone = torch.cat([greedy(model, ids[r:r + 1], mask[r:r + 1]) for r in range(3)])  # batch size 1 first
    batch = greedy(model, ids, mask)  # then 3 on the same model
    assert torch.equal(batch, alone)
    order = torch.tensor([2, 0, 1])
    assert torch.equal(greedy(model, ids[order], mask[order]), alone[order])
    pair = torch.tensor([1, 2])
    assert torch.equal(greedy(model, ids[pair], mask[pair]), alone[pair])  # a third batch size
    assert torch.equal(greedy(model, ids[:1], mask[:1]), alone[:1])  # and back to the first
    fresh = retro_compile(copy.deepcopy(base), config)
    assert torch.equal(greedy(fresh, ids[order], mask[order]), alone[order])
    # Every sparse layer stayed sparse: no fallback a user did not ask for.
    assert set(model.retro_state.dense_reasons.values()) == {"layer 0 is in dense_layers"}
    # The budget really is sparse here: dense decoding gives other tokens.
    assert not torch.equal(greedy(base, ids, mask), batch)


@pytest.mark.slow
def test_fresh_models_in_any_order_of_batch_sizes(base):
    """The first reported failure: each request on a fresh model, batch size 1 first, then 3. The
    automatic-dynamic memory that made the second prefill's batch dynamic is shared by every model
    in the process, so only a sequence of fresh models in one process shows it."""
    config = CONFIGS["quest"]
    ids, mask = prompts(3, PROMPT, pad=(0, 13, 0), seed=13)
    alone = torch.cat([greedy(retro_compile(copy.deepcopy(base), config), ids[r:r + 1], mask[r:r + 1])
                       for r in range(3)])
    model = retro_compile(copy.deepcopy(base), config)
    assert torch.equal(greedy(model, ids, mask), alone)
    assert set(model.retro_state.dense_reasons.values()) == {"layer 0 is in dense_layers"}


@pytest.mark.slow
def test_two_models_in_one_process_never_share_state(base):
    """Two compiled models decoding interleaved requests give what each gives alone."""
    config = CONFIGS["retro-w2"]
    ids, mask = prompts(2, PROMPT, pad=(0, 6), seed=14)
    other = tiny_model("llama", seed=15)
    a, b = retro_compile(copy.deepcopy(base), config), retro_compile(copy.deepcopy(other), config)
    first_a, first_b = greedy(a, ids, mask), greedy(b, ids, mask)
    assert not torch.equal(first_a, first_b)
    assert torch.equal(greedy(a, ids, mask), first_a)
    assert torch.equal(greedy(b, ids[:1], mask[:1]), first_b[:1])
    assert torch.equal(greedy(a, ids, mask), first_a)
    for state_a, state_b in zip(a.retro_state.states(), b.retro_state.states()):
        assert all(x.data_ptr() != y.data_ptr() for x, y in zip(state_a, state_b))
