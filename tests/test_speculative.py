"""Assisted and prompt-lookup decoding: several new tokens a forward call, and the cache cropped
back when drafted tokens are rejected. At a budget covering the context the tokens are the
untouched model's; at small budgets every forward call's logits are those of the hand-driven
reference served the same calls and crops (tests/hf_models.py, ``HandDriven.replay``)."""

from __future__ import annotations

import copy

import pytest
import torch

from retro_compile import RetroConfig, retro_compile

from .hf_models import HandDriven, prompts, tiny_model
from .hf_models import greedy_new_tokens as greedy

SMALL = RetroConfig(mode="retro", budget=32, page_size=8, window=2, max_context=256, dense_layers=1)


def _base():
    """A tiny model whose greedy tokens vary (smaller logits than tiny_model's), so drafts are
    rejected now and then."""
    model = tiny_model(seed=1)
    with torch.no_grad():
        model.lm_head.weight.div_(4.0)
    return model


def _prompt(pad: int = 0):
    """One row whose second half repeats its first, so prompt lookup finds drafts; ``pad``
    padding tokens on its left."""
    ids, mask = prompts(1, 100 + pad, pad=(pad,), seed=2)
    ids[:, 50 + pad:] = ids[:, pad:50 + pad]
    return ids, mask


def _spy(model):
    """Record the driver's forward calls as ("feed", ids), the positions a crop dropped between
    them as ("crop", k), and the logits each feed returned."""
    driver = model.retro_driver
    calls, logits, after = [], [], [0]
    forward = driver.forward

    def spied(*args, **kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        if calls and driver.length < after[0]:
            calls.append(("crop", after[0] - driver.length))
        out = forward(*args, **kwargs)
        calls.append(("feed", ids.clone()))
        logits.append(out.logits.float().clone())
        after[0] = driver.length
        return out

    driver.forward = spied
    return calls, logits


def _options(request):
    return {"lookup": dict(prompt_lookup_num_tokens=4),
            "assistant": dict(assistant_model=tiny_model(seed=5))}[request]


@pytest.mark.parametrize("window,pad", [pytest.param(2, 0, id="w2", marks=pytest.mark.slow),
                                        pytest.param(4, 0, id="w4", marks=pytest.mark.slow),
                                        pytest.param(2, 3, id="w2-padded")])
@pytest.mark.parametrize("request_kind", ["lookup", "assistant"])
def test_full_budget_gives_the_untouched_models_tokens(request_kind, window, pad):
    base = _base()
    ids, mask = _prompt(pad)
    config = RetroConfig(mode="retro", budget=256, page_size=8, window=window, max_context=256, dense_layers=1)
    model = retro_compile(copy.deepcopy(base), config)
    calls, _ = _spy(model)
    got = greedy(model, ids, mask, 40, **_options(request_kind))
    assert torch.equal(got, greedy(base, ids, mask, 40))
    assert any(kind == "crop" for kind, _ in calls), "no draft was rejected: the test exercised no crop"


@pytest.mark.parametrize("window", [2, 4])
@pytest.mark.parametrize("request_kind", ["lookup", "assistant"])
@pytest.mark.slow
def test_small_budget_follows_the_hand_driven_reference(request_kind, window):
    """Every feed's logits equal the reference's for the same calls and crops: a crop leaves no
    trace of the dropped tokens in the state the next steps read."""
    base = _base()
    ids, mask = _prompt()
    config = RetroConfig(mode="retro", budget=32, page_size=8, window=window, max_context=256, dense_layers=1)
    model = retro_compile(copy.deepcopy(base), config)
    calls, logits = _spy(model)
    greedy(model, ids, mask, 60, **_options(request_kind))
    crops = [i for i, (kind, _) in enumerate(calls) if kind == "crop"]
    assert crops, "no draft was rejected: the test exercised no crop"
    if request_kind == "lookup":  # lookup finds no draft now and then: those feeds are sparse decode steps
        steps = [i for i, (kind, arg) in enumerate(calls) if kind == "feed" and arg.shape[1] == 1
                 and calls[i - 1][0] != "crop"]
        assert steps, "no sparse decode step ran"
    expected = HandDriven(copy.deepcopy(base), config).replay(calls)
    assert len(expected) == len(logits)
    for i, (want, got) in enumerate(zip(expected, logits)):  # generate() asks for the rows it reads
        torch.testing.assert_close(got, want[:, -got.shape[1]:], atol=2e-4, rtol=0, msg=lambda m: f"feed {i}: {m}")


def test_crop_beyond_the_last_call_is_refused():
    model = retro_compile(_base(), SMALL)
    ids, mask = _prompt()
    greedy(model, ids, mask, 4)  # a prompt, then decode steps
    driver = model.retro_driver
    with pytest.raises(ValueError, match=r"cannot crop 1 positions from the cache"):
        driver.cache.crop(-1)
