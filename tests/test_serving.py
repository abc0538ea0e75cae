"""Continuous batching (transformers' generate_batch and ContinuousBatchingManager, which
``transformers serve`` runs) on a retro_compile'd model, on the CPU.

Oracles: at a budget covering every context, the untouched model under the same continuous
batching; at small budgets, each request alone through retro_compile + generate() (rows are
independent, so a request's tokens cannot depend on what it was batched with, when it arrived,
or which cache blocks it was given).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from retro_compile import RetroConfig, retro_compile

from .hf_models import VOCAB, tiny_model
from .hf_models import greedy_new_tokens as greedy

NEW = 10
# A small paged cache: 16-token blocks, prompts longer than a batch's 48 tokens (prefilled in
# chunks), and few enough blocks that finished requests' blocks go to later ones.
CACHE = dict(page_size=16, num_blocks=24, max_batch_tokens=48)
LENGTHS = (37, 90, 21, 130, 64)
FULL = RetroConfig(mode="retro", budget=256, page_size=8, max_context=256, dense_layers=1)
SMALL = {
    "quest": RetroConfig(mode="quest", budget=24, page_size=8, max_context=256, dense_layers=1),
    "retro-w2": RetroConfig(mode="retro", budget=24, page_size=8, max_context=256, dense_layers=1),
    "retro-w3": RetroConfig(mode="retro", budget=24, page_size=8, window=3, max_context=256, dense_layers=1),
}


def request_prompts(lengths=LENGTHS, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def generation(new: int = NEW) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)


def batch_tokens(model, inputs: list[list[int]], **cache) -> list[list[int]]:
    """generate_batch's tokens per prompt, in the prompts' order; a failed request fails the test."""
    out = model.generate_batch(inputs=inputs, generation_config=generation(),
                               continuous_batching_config=ContinuousBatchingConfig(**(cache or CACHE)))
    results = [out[f"req_{i}"] for i in range(len(inputs))]
    assert all(r.error is None for r in results), [r.error for r in results]
    return [r.generated_tokens for r in results]


def alone(model, inputs: list[list[int]]) -> list[list[int]]:
    """Each prompt through generate() by itself."""
    return [greedy(model, torch.tensor([p]), None, NEW)[0].tolist() for p in inputs]


@pytest.fixture(scope="module")
def untouched():
    return tiny_model()


@pytest.mark.parametrize("config", [FULL, RetroConfig(mode="dense", max_context=256)], ids=["retro", "dense"])
def test_full_budget_serves_the_untouched_models_tokens(untouched, config):
    """A budget covering every context is dense attention: continuous batching on the
    retro_compile'd model gives the untouched model's tokens under the same batching, for prompts
    prefilled in one piece and in chunks; so does mode="dense"."""
    inputs = request_prompts()
    model = retro_compile(copy.deepcopy(untouched), config)
    assert batch_tokens(model, inputs) == batch_tokens(untouched, inputs)


def test_a_request_evicted_from_a_full_cache_is_prefilled_again_with_fresh_state(untouched, caplog):
    """When the paged cache runs out, the scheduler evicts a request and later prefills it again
    from its prompt and generated tokens; its state is dropped with its blocks and rebuilt by that
    prefill, so at full budget every request still gets the untouched model's tokens."""
    inputs = request_prompts((60, 70, 65), seed=5)
    tight = dict(page_size=16, num_blocks=9, max_batch_tokens=48)
    model = retro_compile(copy.deepcopy(untouched), FULL)
    with caplog.at_level(logging.INFO, logger="ContinuousBatchingLogger"):
        served = batch_tokens(model, inputs, **tight)
    assert "soft reset" in caplog.text, "no request was evicted: the test shows nothing"
    assert served == batch_tokens(untouched, inputs, **tight)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_small_budget_serves_each_request_as_generate_alone(untouched, name):
    """At small budgets each request's tokens equal that request alone through generate(): its
    own page selection, window and output cache, whatever it is batched with."""
    inputs = request_prompts()
    model = retro_compile(copy.deepcopy(untouched), SMALL[name])
    served = batch_tokens(model, inputs)
    assert served == alone(model, inputs)
    assert served != batch_tokens(untouched, inputs), "the budget never changed a token: the test shows nothing"


@pytest.mark.slow
def test_prompts_no_longer_than_the_window(untouched):
    """A prompt of 1 to 3 tokens under a window of 3: the first windows reach back to position 0
    (feeding fewer rows), and each request still decodes as it does alone through generate()."""
    model = retro_compile(copy.deepcopy(untouched), SMALL["retro-w3"])
    inputs = request_prompts((1, 2, 3, 5), seed=21)
    assert batch_tokens(model, inputs) == alone(model, inputs)


@pytest.mark.slow
def test_requests_arriving_at_different_steps_and_reusing_freed_blocks(untouched):
    """Requests join a running manager at different steps, while others decode; the blocks of
    finished requests go to later ones, and every request still decodes as it would alone. A
    finished request frees its decode state."""
    model = retro_compile(copy.deepcopy(untouched), SMALL["retro-w2"])
    inputs = request_prompts(LENGTHS + (45, 100), seed=5)
    assert sum(len(p) + NEW for p in inputs) > CACHE["num_blocks"] * CACHE["page_size"], "every request fits at once"
    manager = model.init_continuous_batching(generation_config=generation(),
                                             continuous_batching_config=ContinuousBatchingConfig(**CACHE))
    manager.start()
    try:
        manager.add_request(inputs[0], request_id="r0", streaming=True)
        produced = 0
        while produced < 3:  # the others arrive while r0 decodes
            output = manager.get_result(timeout=120)
            assert output is not None and output.error is None, output
            produced = len(output.generated_tokens)
        held = manager.retro_states.held("r0")  # sized for r0's prompt and new tokens, not max_context
        assert {state.kmax.shape[2] for state in held.values()} == {-(-(len(inputs[0]) + NEW) // 8)}
        assert sorted(held) == [1, 2, 3]  # the sparse layers (dense_layers=1)
        for i, prompt in enumerate(inputs[1:], start=1):
            manager.add_request(prompt, request_id=f"r{i}")
        results = {}
        while len(results) < len(inputs):
            output = manager.get_result(timeout=120)
            assert output is not None, "the manager stopped answering"
            if output.is_finished():
                results[output.request_id] = output
    finally:
        manager.stop(block=True, timeout=30)
    assert produced == 3
    assert all(r is not None and r.error is None for r in results.values()), results
    served = [results[f"r{i}"].generated_tokens for i in range(len(inputs))]
    assert served == alone(model, inputs)
    assert len(manager.retro_states) == 0, "finished requests kept their decode state"


@pytest.mark.slow
def test_a_cancelled_request_frees_its_state_and_leaves_the_others_alone(untouched):
    """A request cancelled while it decodes drops its decode state with its blocks; the request
    decoding beside it gives its tokens alone through generate()."""
    model = retro_compile(copy.deepcopy(untouched), SMALL["retro-w2"])
    inputs = request_prompts((60, 80), seed=17)
    manager = model.init_continuous_batching(generation_config=generation(),
                                             continuous_batching_config=ContinuousBatchingConfig(**CACHE))
    manager.start()
    try:
        manager.add_request(inputs[0], request_id="cancelled", streaming=True, max_new_tokens=150)
        manager.add_request(inputs[1], request_id="kept", max_new_tokens=NEW)
        while True:  # cancel once both decode
            output = manager.get_result(timeout=120)
            assert output is not None and output.error is None, output
            if output.request_id == "cancelled" and len(output.generated_tokens) >= 2:
                break
        assert "cancelled" in manager.retro_states
        manager.cancel_request("cancelled")
        kept = None
        while kept is None:
            output = manager.get_result(timeout=120)
            assert output is not None, "the manager stopped answering"
            if output.request_id == "kept" and output.is_finished():
                kept = output
        deadline = time.monotonic() + 30
        while "cancelled" in manager.retro_states and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        manager.stop(block=True, timeout=30)
    assert "cancelled" not in manager.retro_states
    assert kept.error is None and kept.generated_tokens == alone(model, inputs[1:])[0]


@pytest.mark.slow
def test_parallel_sampling_forks_each_requests_state(untouched):
    """num_return_sequences > 1 prefills a prompt once and forks the request before its last
    token; each fork goes on with a copy of the parent's state. Greedily, every sequence of a
    prompt gives the tokens the prompt gets alone (forks sharing one state would move it on once
    per fork and step)."""
    inputs = request_prompts((37, 90), seed=13)
    model = retro_compile(copy.deepcopy(untouched), SMALL["retro-w2"])
    three = generation()
    three.num_return_sequences = 3
    out = model.generate_batch(inputs=inputs, generation_config=three,
                               continuous_batching_config=ContinuousBatchingConfig(**CACHE))
    assert all(r.error is None for r in out.values()), [r.error for r in out.values()]
    expected = alone(model, inputs)
    for i, tokens in enumerate(expected):
        ids = [f"req_{i}", f"req_{i}__child#0", f"req_{i}__child#1"]
        assert [out[r].generated_tokens for r in ids] == [tokens] * 3


def test_concurrent_clients_are_answered_like_the_untouched_model(untouched):
    """The manager as ``transformers serve`` drives it: created by the model's
    init_continuous_batching, started once, each client's request added as a stream whose outputs
    reach the client's event loop through register_result_handler. Several clients at once, each
    answered with the untouched model's tokens (full budget)."""
    inputs = request_prompts((33, 58, 12, 101), seed=7)
    expected = batch_tokens(untouched, inputs)
    model = retro_compile(copy.deepcopy(untouched), FULL)
    manager = model.init_continuous_batching(generation_config=generation(),
                                             continuous_batching_config=ContinuousBatchingConfig(**CACHE))
    manager.start()

    async def client(i: int) -> list[int]:
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        streamed: list[int] = []

        def on_output(output) -> None:
            streamed[:] = output.generated_tokens
            if output.is_finished() and not done.done():
                done.set_result(output)

        request_id = manager.add_request(inputs[i], request_id=f"client{i}", streaming=True,
                                         max_new_tokens=NEW, eos_token_id=-1)
        manager.register_result_handler(request_id, on_output)
        final = await asyncio.wait_for(done, timeout=120)
        assert final.error is None, final.error
        assert streamed == final.generated_tokens
        return final.generated_tokens

    async def clients() -> list[list[int]]:
        return list(await asyncio.gather(*(client(i) for i in range(len(inputs)))))

    try:
        answers = asyncio.run(clients())
    finally:
        manager.stop(block=True, timeout=30)
    assert answers == expected


def test_the_paged_cache_leaves_the_page_summaries_their_share_of_memory(untouched):
    """Left to size itself, the paged cache takes what it would on the untouched model less the
    summaries' share: a max and a min per 8-position page (float32) beside a key and a value per
    position, 1/9 of the decode memory. A size the user gives is kept."""
    model = retro_compile(copy.deepcopy(untouched), FULL)
    sized = model.init_continuous_batching(generation_config=generation()).continuous_batching_config
    stock = untouched.init_continuous_batching(generation_config=generation()).continuous_batching_config
    assert sized.max_memory_percent == pytest.approx(stock.max_memory_percent * (1 - 1 / 9))
    given = model.init_continuous_batching(generation_config=generation(),
                                           continuous_batching_config=ContinuousBatchingConfig(max_memory_percent=0.5))
    assert given.continuous_batching_config.max_memory_percent == 0.5


def test_unsupported_batching_settings_are_refused_up_front(untouched):
    """Settings this path cannot honour are refused by name before anything runs; generate()
    still serves the model afterwards."""
    model = retro_compile(copy.deepcopy(untouched), FULL)
    inputs = request_prompts((20, 30))
    for setting, match in ((dict(use_cuda_graph=True), "use_cuda_graph=True"),
                           (dict(use_async_batching=True), "use_async_batching=True"),
                           (dict(max_blocks_per_request=8), "max_blocks_per_request=8")):
        with pytest.raises(ValueError, match=match):
            model.generate_batch(inputs=inputs, generation_config=generation(),
                                 continuous_batching_config=ContinuousBatchingConfig(**CACHE, **setting))
    with pytest.raises(ValueError, match="exceeds RetroConfig.max_context=256"):
        model.generate_batch(inputs=request_prompts((250,)), generation_config=generation())
    unbounded = generation()
    unbounded.max_new_tokens = None
    with pytest.raises(ValueError, match="needs max_new_tokens"):
        model.generate_batch(inputs=inputs, generation_config=unbounded)
    manager = model.init_continuous_batching(generation_config=generation())
    with pytest.raises(ValueError, match="exceeds RetroConfig.max_context=256"):
        manager.add_request(list(range(1, 251)), max_new_tokens=NEW)
    assert model.retro_state.layers() == [], "a refused request compiled or ran something"
    assert greedy(model, torch.tensor([inputs[0]]), None, 4).shape == (1, 4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral-sliding", "qwen2-sliding", "gemma3"])
def test_models_with_sliding_window_layers(family):
    """Sliding-window layers stay dense, over the keys the paged cache keeps for them (the last
    window of positions): at full budget the untouched model's tokens under the same batching, at
    a small budget each request's tokens alone through generate()."""
    from .test_model_matrix import FAMILIES

    torch.manual_seed(0)
    untouched = FAMILIES[family]().eval()
    inputs = request_prompts((37, 90, 21), seed=3)
    assert batch_tokens(retro_compile(copy.deepcopy(untouched), FULL), inputs) == batch_tokens(untouched, inputs)
    model = retro_compile(copy.deepcopy(untouched), SMALL["retro-w2"])
    assert batch_tokens(model, inputs) == alone(model, inputs)


def test_an_older_transformers_is_refused(untouched, monkeypatch):
    """The hooks are written for transformers 5.24's continuous batching: an older one is refused
    in plain words before anything runs."""
    import transformers

    model = retro_compile(copy.deepcopy(untouched), FULL)
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(NotImplementedError, match=r"needs transformers >= 5.24 \(found 5.17.0\)"):
        model.generate_batch(inputs=request_prompts((20,)), generation_config=generation())


def test_a_longer_window_on_a_model_with_sliding_window_layers_is_refused():
    """The paged cache keeps a sliding layer's last ``sliding_window`` positions: enough for a
    window of 2, not for one that feeds two or more positions again. Refused in plain words."""
    import transformers as tf

    config = tf.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    model = retro_compile(tf.MistralForCausalLM(config).eval(), SMALL["retro-w3"])
    with pytest.raises(NotImplementedError, match=r"serves windows up to 2, not window=3"):
        model.generate_batch(inputs=request_prompts((20,)), generation_config=generation())


@pytest.mark.slow
def test_the_manager_runs_in_its_own_thread_without_leaking_state_between_managers(untouched):
    """Two managers of two copies decode at once in their own threads; each keeps its own
    requests' state and gives the tokens a request gets alone."""
    model = retro_compile(copy.deepcopy(untouched), SMALL["quest"])
    twin = copy.deepcopy(model)
    inputs = request_prompts((40, 70), seed=11)
    results: dict[str, list[list[int]]] = {}

    def serve(name: str, m) -> None:
        results[name] = batch_tokens(m, inputs)

    threads = [threading.Thread(target=serve, args=(n, m)) for n, m in (("a", model), ("b", twin))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results["a"] == results["b"] == alone(model, inputs)
