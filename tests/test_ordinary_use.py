"""Ordinary use that once failed silently: copies, pickles and saved models, many batch shapes on
one model, inference mode, and generate() options the decode state does not follow."""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retro_compile import RetroConfig, retro_compile

from .hf_models import HandDriven, prompts, tiny_model
from .hf_models import greedy_new_tokens as greedy

SMALL = RetroConfig(mode="retro", budget=32, page_size=8, window=2, max_context=256, dense_layers=1)
FULL = RetroConfig(mode="retro", budget=256, page_size=8, window=2, max_context=256, dense_layers=1)


@pytest.mark.slow
def test_deepcopy_is_an_independent_compiled_model():
    """A deep copy runs its own weights (zeroed here: the untouched model's zeroed copy's tokens),
    with its own driver and state; the original is unchanged."""
    base = tiny_model()
    model = retro_compile(copy.deepcopy(base), SMALL)
    ids, mask = prompts(2, 40, pad=(0, 3))
    before = greedy(model, ids, mask, 6)
    clone = copy.deepcopy(model)
    assert clone.forward is not model.forward and clone.retro_driver is not model.retro_driver
    assert clone.retro_config == SMALL and clone.retro_state is not model.retro_state
    zeroed = copy.deepcopy(base)
    with torch.no_grad():
        for parameters in (clone.parameters(), zeroed.parameters()):
            for p in parameters:
                p.zero_()
    assert torch.equal(greedy(clone, ids, mask, 6), greedy(zeroed, ids, mask, 6))
    assert torch.equal(greedy(model, ids, mask, 6), before)
    assert any(p.abs().sum() > 0 for p in model.parameters())


@pytest.mark.slow
def test_deepcopy_of_a_fresh_compiled_model_decodes_as_the_original():
    model = retro_compile(tiny_model(seed=3), SMALL)
    ids, mask = prompts(1, 60, seed=4)
    clone = copy.deepcopy(model)
    assert torch.equal(greedy(clone, ids, mask, 8), greedy(model, ids, mask, 8))


def _saved_files(model, folder: Path) -> dict[str, object]:
    model.save_pretrained(folder)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            files[path.name] = json.loads(path.read_text())
        else:
            files[path.name] = path.read_bytes()
    return files


@pytest.mark.slow
def test_save_pretrained_and_pickle_leave_nothing_of_the_package(tmp_path):
    """save_pretrained writes what the untouched model writes, byte for byte in its weights and
    equal JSON in its configs; a pickle loads as the untouched model (its own forward, SDPA
    attention), names nothing of the package, and copies no weight while pickling."""
    from transformers import AutoModelForCausalLM

    base = tiny_model()
    model = retro_compile(copy.deepcopy(base), SMALL)
    ids, mask = prompts(1, 40)
    greedy(model, ids, mask, 4)  # compiled and ran: state, caches and graphs exist
    assert _saved_files(model, tmp_path / "compiled") == _saved_files(base, tmp_path / "untouched")
    assert "retro" not in (tmp_path / "compiled" / "generation_config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compiled")
    assert torch.equal(greedy(reloaded, ids, mask, 6), greedy(base, ids, mask, 6))

    data = pickle.dumps(model)
    assert b"retro" not in data
    loaded = pickle.loads(data)
    assert "forward" not in vars(loaded) and not hasattr(loaded, "retro_config")
    assert loaded.config._attn_implementation == base.config._attn_implementation
    assert torch.equal(greedy(loaded, ids, mask, 6), greedy(base, ids, mask, 6))
    assert model.config._attn_implementation == "retro_sdpa"  # the live model is still compiled
    assert torch.equal(greedy(retro_compile(loaded, SMALL), ids, mask, 6), greedy(model, ids, mask, 6))


@pytest.mark.slow
def test_many_batch_shapes_on_one_model_stay_sparse_and_exact(caplog):
    """Fourteen requests, batch sizes 1-7 padded and not (Dynamo's recompile limit is 8 per compiled
    function): every one equals the hand-driven reference, and nothing falls back to dense."""
    base = tiny_model(seed=5)
    model = retro_compile(copy.deepcopy(base), SMALL)
    with caplog.at_level(logging.WARNING):
        for batch in range(1, 8):
            for padded in (False, True):
                ids, mask = prompts(batch, 40, pad=(5, 0, 2, 7)[:batch] if padded else (), seed=batch)
                expected, _, _ = HandDriven(copy.deepcopy(base), SMALL).generate(ids, mask, 5)
                assert torch.equal(greedy(model, ids, mask, 5), expected), (batch, padded)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert set(model.retro_state.dense_reasons.values()) == {"layer 0 is in dense_layers"}
    assert len(model.retro_driver._compiled) <= model.retro_driver.max_compiled_batches


@pytest.mark.slow
def test_a_recompile_limit_reached_compiles_afresh_instead_of_running_dense(caplog):
    """With Dynamo's recompile limit at 1, every new variant of a batch size (padded after unpadded)
    reaches it: the driver compiles that batch size afresh, and the tokens stay the reference's."""
    base = tiny_model(seed=6)
    model = retro_compile(copy.deepcopy(base), SMALL)
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.INFO, logger="retro_compile"):
        for padded in (False, True, False):
            ids, mask = prompts(2, 40, pad=(3,) if padded else (), seed=7)
            expected, _, _ = HandDriven(copy.deepcopy(base), SMALL).generate(ids, mask, 4)
            assert torch.equal(greedy(model, ids, mask, 4), expected)
    assert "reached Dynamo's recompile limit; compiling it afresh" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("retro_compile")]


@pytest.mark.slow
def test_compiled_batches_are_bounded_and_release_their_state():
    model = retro_compile(tiny_model(seed=8), SMALL)
    driver = model.retro_driver
    driver.max_compiled_batches = 2
    for batch in (1, 2, 3, 1):
        ids, mask = prompts(batch, 24, seed=batch)
        greedy(model, ids, mask, 2)
    assert list(driver._compiled) == [3, 1]
    assert {key[1].batch for key in model.retro_state._states} == {1, 3}


@pytest.mark.parametrize("first", ["inference_mode", "no_grad", "plain"])
@pytest.mark.slow
def test_inference_mode_no_grad_and_plain_calls_in_any_order(first):
    base = tiny_model(seed=9)
    model = retro_compile(copy.deepcopy(base), SMALL)
    ids, mask = prompts(2, 40, pad=(0, 4), seed=10)
    expected, _, _ = HandDriven(copy.deepcopy(base), SMALL).generate(ids, mask, 5)
    contexts = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": torch.enable_grad}
    order = [first] + [name for name in contexts if name != first] + [first]
    for name in order:
        with contexts[name]():
            assert torch.equal(greedy(model, ids, mask, 5), expected), name


def test_early_exit_drafting_is_refused_up_front():
    """Assisted decoding with an assistant model or prompt lookup is served (tests/test_speculative.py);
    drafting with the model's own first layers is refused before anything compiles."""
    model = retro_compile(tiny_model(), FULL)
    ids, mask = prompts(1, 100)
    with pytest.raises(ValueError, match=r"generate\(assistant_early_exit=...\) is not supported"):
        greedy(model, ids, mask, 10, assistant_early_exit=2)
    assert model.retro_state.layers() == [], "the refused request compiled or ran something"


def test_inputs_embeds_is_refused_up_front():
    """generate(inputs_embeds=...) works on the untouched model and is refused in plain words here,
    before anything is compiled."""
    untouched = tiny_model()
    ids, mask = prompts(1, 20)
    embeds = untouched.get_input_embeddings()(ids)
    assert untouched.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              pad_token_id=0).shape == (1, 3)
    model = retro_compile(tiny_model(), FULL)
    with pytest.raises(ValueError, match=r"generate\(inputs_embeds=...\) is not supported.*pass input_ids"):
        model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert model.retro_state.layers() == [], "the refused request compiled or ran something"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(20, 44), min_size=2, max_size=3), extra=st.integers(0, 13),
       window=st.sampled_from([1, 2, 4]), budget=st.sampled_from([16, 24, 40]), sink=st.integers(0, 1),
       seed=st.integers(0, 3))
@pytest.mark.slow
def test_a_rows_tokens_do_not_depend_on_its_padding(lengths, extra, window, budget, sink, seed):
    """Prompts of different lengths left-padded into one batch (plus ``extra`` padding for all):
    each row's tokens equal its prompt decoded alone, unpadded, at small budgets. Pages are
    counted from each row's first position, so padding never moves a page boundary."""
    config = RetroConfig(mode="quest" if window == 1 else "retro", window=window, budget=budget, page_size=8,
                         sink_pages=sink, dense_layers=1, max_context=128)
    model = tiny_model(seed=seed)
    width = max(lengths) + extra
    ids, mask = prompts(len(lengths), width, pad=tuple(width - n for n in lengths), seed=seed + 10)
    batch, _, _ = HandDriven(copy.deepcopy(model), config).generate(ids, mask, 10)
    for row, n in enumerate(lengths):
        alone, _, _ = HandDriven(copy.deepcopy(model), config).generate(ids[row:row + 1, width - n:],
                                                                         mask[row:row + 1, width - n:], 10)
        assert torch.equal(batch[row], alone[0]), (row, n, width)


@pytest.mark.slow
def test_compiled_rows_do_not_depend_on_their_padding():
    """The compiled path: a padded batch gives each row the tokens of its prompt alone."""
    model = retro_compile(tiny_model(seed=11), SMALL)
    lengths, width = (37, 50, 29), 53
    ids, mask = prompts(3, width, pad=tuple(width - n for n in lengths), seed=12)
    batch = greedy(model, ids, mask, 12)
    for row, n in enumerate(lengths):
        assert torch.equal(batch[row], greedy(model, ids[row:row + 1, width - n:], mask[row:row + 1, width - n:], 12)[0])
