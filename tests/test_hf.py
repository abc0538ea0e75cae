"""retro_compile(model) + generate() on tiny random transformers models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import StaticCache

from retro_compile import RetroConfig, retro_compile

from .hf_models import HandDriven, prompts, tiny_model

MAX_CONTEXT = 128


def compiled_copy(model, config):
    return retro_compile(copy.deepcopy(model), config)


def greedy(model, ids, mask, new_tokens, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kw)


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("mistral", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode,batch", [("retro", 3), ("quest", 3), ("retro", 1)])
def test_full_budget_matches_untouched_model(arch, mode, batch):
    model = tiny_model(arch)
    ids, mask = prompts(batch, 40, pad=(0, 4, 9)[:batch])
    expected = greedy(model, ids, mask, 12)
    config = RetroConfig(mode=mode, budget=MAX_CONTEXT, page_size=8, dense_layers=1, max_context=MAX_CONTEXT)
    compiled = compiled_copy(model, config)
    got = greedy(compiled, ids, mask, 12)
    assert torch.equal(got, expected)
    assert compiled.retro_state.layers() == [f"model.layers.{i}.self_attn" for i in (1, 2, 3)]


@pytest.mark.parametrize("mode,window,summaries", [("quest", 1, "exact"), ("retro", 2, "exact"), ("retro", 4, "exact"),
                                                    ("retro", 2, "int8")])
def test_small_budget_matches_hand_driven_reference(mode, window, summaries):
    """Step for step, the compiled model equals the reference op driven by hand, eagerly."""
    model = tiny_model("llama", seed=3)
    ids, mask = prompts(2, 60, pad=(0, 7), seed=4)
    config = RetroConfig(mode=mode, window=window, budget=24, page_size=8, dense_layers=1, max_context=MAX_CONTEXT,
                         summaries=summaries)
    hand = HandDriven(copy.deepcopy(model), config)
    tokens_ref, logits_ref, cache_ref = hand.generate(ids, mask, 16)
    compiled = compiled_copy(model, config)
    cache = StaticCache(config=model.config, max_cache_len=MAX_CONTEXT)
    out = greedy(compiled, ids, mask, 16, output_logits=True, return_dict_in_generate=True,
                 **{compiled.retro_driver.cache_arg: cache})
    assert torch.equal(out.sequences[:, 60:], tokens_ref)
    for got, want in zip(out.logits, logits_ref):
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
    written = 60 + 15  # prompt + fed tokens; padding positions hold no attended K/V
    for layer_got, layer_ref in zip(cache.layers, cache_ref.layers):
        for b, pad in enumerate((0, 7)):
            torch.testing.assert_close(layer_got.keys[b, :, pad:written], layer_ref.keys[b, :, pad:written],
                                       atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(layer_got.values[b, :, pad:written], layer_ref.values[b, :, pad:written],
                                       atol=1e-4, rtol=1e-4)


def test_quest_and_retro_differ_at_small_budget():
    model = tiny_model("llama", seed=3)
    ids, mask = prompts(2, 60, pad=(0, 7), seed=4)
    runs = [HandDriven(copy.deepcopy(model), RetroConfig(mode=m, budget=16, page_size=8, dense_layers=1,
                                                         max_context=MAX_CONTEXT)).generate(ids, mask, 16)
            for m in ("quest", "retro")]
    assert not all(torch.allclose(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_retro_overwrites_past_kv_with_corrected_values():
    """After a step, the previous position's K/V at a sparse layer above the first differ from
    what the plain step stored, and equal a recomputation from the corrected hidden states."""
    model = tiny_model("llama", seed=5)
    ids, mask = prompts(1, 60, seed=6)
    config = RetroConfig(mode="retro", budget=16, page_size=8, dense_layers=1, max_context=MAX_CONTEXT)
    hand = HandDriven(copy.deepcopy(model), config)
    _, _, before = hand.generate(ids, mask, 10)  # last call fed positions 67, 68
    _, _, after = hand.generate(ids, mask, 11)  # last call fed 68, 69: overwrote 68
    layer = 2
    hidden = hand.captured[layer][:, 0:1]  # corrected input of layer 2 for position 68 (window row 0)
    attn = hand.model.model.layers[layer]
    k = attn.self_attn.k_proj(attn.input_layernorm(hidden))
    k = k.view(1, 1, -1, attn.self_attn.head_dim).transpose(1, 2)
    cos, sin = hand.model.model.rotary_emb(hidden, torch.tensor([[68]]))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    stale, fresh = before.layers[layer].keys[:, :, 68], after.layers[layer].keys[:, :, 68]
    assert (stale - fresh).abs().max() > 1e-4, "the past position's K was not rewritten"
    torch.testing.assert_close(fresh, k[:, :, 0], atol=1e-5, rtol=1e-5)
    # Layers that only see exact inputs (embeddings, the dense layer 0) store the same K again.
    torch.testing.assert_close(after.layers[0].keys[:, :, 68], before.layers[0].keys[:, :, 68])


@pytest.mark.slow
def test_decode_steps_build_no_attention_mask_on_the_host():
    """generate() builds attention masks for each request's prefill only: the decode steps build
    theirs on the device, and the one transformers would build (after reading the cache position
    back from the device) would go unused. Over requests of two batch sizes the tokens stay the
    untouched model's."""
    from transformers import AttentionMaskInterface

    from retro_compile.integrations import hf

    model = tiny_model("llama")
    config = RetroConfig(mode="retro", budget=MAX_CONTEXT, page_size=8, dense_layers=1, max_context=MAX_CONTEXT)
    compiled = compiled_copy(model, config)
    built = []

    def recording_mask(*args, **kwargs):
        built.append((kwargs["batch_size"], kwargs["q_length"]))
        return hf.retro_sdpa_mask(*args, **kwargs)

    AttentionMaskInterface.register(hf.ATTENTION_NAME, recording_mask)
    try:
        for batch, prompt in ((2, 40), (1, 33)):
            ids, mask = prompts(batch, prompt, pad=(0, 5)[:batch])
            assert torch.equal(greedy(compiled, ids, mask, 10), greedy(model, ids, mask, 10))
    finally:
        AttentionMaskInterface.register(hf.ATTENTION_NAME, hf.retro_sdpa_mask)
    assert {batch for batch, _ in built} == {2, 1}  # each request's prefill built its masks...
    assert all(rows > 1 for _, rows in built), built  # ...and no decode step did


@pytest.mark.slow
def test_decode_step_hands_its_window_slots_to_every_sparse_layer(monkeypatch):
    """The decode step says its rows' cache slots (``window_slots``); the rewritten step hands them,
    expanded to every batch row, to every sparse layer's op and reduces no mask to find them. At a
    small budget with a padded row the tokens equal the reference op driven by hand, which reads
    its positions off the mask."""
    from retro_compile import backend
    from retro_compile.kernels.masks import mask_positions

    rewritten = []

    def recording(gm, config, store, phase=None):
        plan = backend_rewrite(gm, config, store, phase)
        rewritten.append((phase, gm.graph))
        return plan

    backend_rewrite = backend.rewrite_sdpa
    monkeypatch.setattr(backend, "rewrite_sdpa", recording)
    model = tiny_model("llama", seed=3)
    ids, mask = prompts(2, 60, pad=(0, 7), seed=4)
    config = RetroConfig(mode="retro", window=3, budget=24, page_size=8, dense_layers=1, max_context=MAX_CONTEXT)
    tokens_ref, _, _ = HandDriven(copy.deepcopy(model), config).generate(ids, mask, 8)
    assert torch.equal(greedy(compiled_copy(model, config), ids, mask, 8)[:, 60:], tokens_ref)
    steps = [graph for phase, graph in rewritten if phase == "decode"]
    assert len(steps) == 1
    nodes = list(steps[0].nodes)
    ops = [n for n in nodes if n.target is torch.ops.retro.attention.default]
    assert len(ops) == 3  # layers 1-3
    positions = {op.args[-2] for op in ops}
    (said,) = positions  # tensor methods: the slots expanded to every batch row, contiguous
    assert said.target == "contiguous" and said.args[0].target == "expand" and said.args[0].args[1:] == (2, -1)
    assert not [n for n in nodes if n.target in (mask_positions, torch.ops.retro.window_slots.default)]


def test_sampling_streamer_and_new_request_resets_state():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    model = tiny_model("llama")
    config = RetroConfig(mode="retro", budget=16, page_size=8, dense_layers=1, max_context=MAX_CONTEXT)
    compiled = compiled_copy(model, config)
    ids, mask = prompts(1, 50, seed=7)
    first = greedy(compiled, ids, mask, 8)
    other_ids, other_mask = prompts(1, 45, seed=8)
    greedy(compiled, other_ids, other_mask, 8)
    streamer = Collect()
    again = greedy(compiled, ids, mask, 8, streamer=streamer)
    assert torch.equal(first, again), "a new request saw the previous request's state"
    assert streamer.chunks[-1] is None and len(streamer.chunks) == 1 + 8 + 1
    torch.manual_seed(0)
    sampled = compiled.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20,
                                pad_token_id=0)
    assert sampled.shape == (1, 58)


def test_errors():
    model = tiny_model("llama")
    config = RetroConfig(budget=16, page_size=8, dense_layers=1, max_context=MAX_CONTEXT)
    compiled = compiled_copy(model, config)
    assert retro_compile(compiled, config) is compiled
    with pytest.raises(ValueError, match="already compiled"):
        retro_compile(compiled, RetroConfig(budget=32, page_size=8, max_context=MAX_CONTEXT))
    with pytest.raises(TypeError, match="already torch.compile"):
        retro_compile(torch.compile(tiny_model("llama")), config)
    with pytest.raises(TypeError, match="must be a RetroConfig"):
        retro_compile(tiny_model("llama"), {"budget": 16})
    with pytest.raises(ValueError, match="the prompt is empty"):
        greedy(compiled, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long), 2)
    ids, mask = prompts(1, 1)  # window 2: a one-token prompt takes two slots of padding before it
    with pytest.raises(ValueError, match=r"1 tokens \(and 2 slots of padding before them\) plus 126 new tokens need 129"):
        greedy(compiled, ids, mask, MAX_CONTEXT - 2)
    ids, mask = prompts(1, 120)
    with pytest.raises(ValueError, match="max_context"):
        greedy(compiled, ids, mask, 20)


def test_eager_only_architecture_is_refused():
    model = tiny_model("llama")
    type(model)._supports_sdpa = False
    try:
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            retro_compile(model)
    finally:
        del type(model)._supports_sdpa


@pytest.mark.slow
def test_many_models_in_one_process_all_stay_rewritten():
    """Dynamo counts recompiles per code object; six models of one class (twelve graphs) must not
    push a later model past the limit into silent eager, un-rewritten execution."""
    model = tiny_model("llama", seed=3)
    ids, mask = prompts(1, 60, seed=4)
    config = RetroConfig(mode="retro", budget=16, page_size=8, dense_layers=1, max_context=MAX_CONTEXT)
    first = greedy(compiled_copy(model, config), ids, mask, 6, output_logits=True, return_dict_in_generate=True)
    for budget in (24, 32, 40, 48):
        greedy(compiled_copy(model, RetroConfig(mode="quest", budget=budget, page_size=8, dense_layers=1,
                                                max_context=MAX_CONTEXT)), ids, mask, 3)
    last = greedy(compiled_copy(model, config), ids, mask, 6, output_logits=True, return_dict_in_generate=True)
    dense = greedy(model, ids, mask, 6, output_logits=True, return_dict_in_generate=True)
    assert not torch.allclose(first.logits[-1], dense.logits[-1]), "the budget is too large to tell sparse from dense"
    for a, b in zip(first.logits, last.logits):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.slow
def test_the_model_stays_a_model_for_losses_and_features(arch):
    """Forward calls that are not decoding (a full sequence with labels, hidden states, no cache)
    give the untouched model's loss, logits and hidden states, before and after generate(), and
    leave generate()'s tokens as they were."""
    model = tiny_model(arch, seed=5)
    config = RetroConfig(mode="retro", budget=16, page_size=8, dense_layers=1, max_context=MAX_CONTEXT)
    compiled = compiled_copy(model, config)
    ids, mask = prompts(2, 30, pad=(0, 4), seed=6)
    tokens = greedy(compiled_copy(model, config), ids, mask, 10)

    def score(m):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)

    expected = score(model)
    for when in ("before generate", "after generate"):
        got = score(compiled)
        torch.testing.assert_close(got.loss, expected.loss, msg=when)
        torch.testing.assert_close(got.logits, expected.logits, msg=when)
        assert len(got.hidden_states) == len(expected.hidden_states)
        torch.testing.assert_close(got.hidden_states[-1], expected.hidden_states[-1], msg=when)
        with torch.no_grad():  # positional ids, no mask, no cache
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, msg=when)
        assert torch.equal(greedy(compiled, ids, mask, 10), tokens)
    with pytest.raises(NotImplementedError, match="output_hidden_states"):  # while decoding, still refused
        greedy(compiled, ids, mask, 4, output_hidden_states=True, return_dict_in_generate=True)
