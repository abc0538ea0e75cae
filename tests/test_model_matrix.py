"""The model matrix: tiny random configurations of the transformers families users run.

For each family: at a budget covering the whole context, ``retro_compile`` gives the untouched
model's greedy tokens (batch 2, left padding); a small budget decodes to the end; every attention
layer is either rewritten or declined with its reason. A family with recurrent, linear-attention
or convolution layers beside its attention (Jamba, Bamba, LFM2, Qwen3-Next, Falcon-H1, ...) decodes
in quest mode, one token a step, and a small budget gives the tokens of the hand-driven reference.
A family whose attention transformers runs eagerly only (no SDPA call to rewrite) or whose cache
holds a compressed latent (DeepSeek's multi-head latent attention) is refused with that reason, and
the model is left as it was. No family has code of its own in the package.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from retro_compile import RetroConfig, retro_compile

from .hf_models import VOCAB, HandDriven, greedy_new_tokens, prompts

WINDOW = 16  # sliding window of the families that have one: shorter than the prompts below


def common(**extra):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024)
    return {**base, **extra}  # a family's own settings win


ALTERNATING = ["sliding_attention", "full_attention"] * 2
FAMILIES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common())),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common(sliding_window=None))),
    "mistral-sliding": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common(sliding_window=WINDOW))),
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**common(num_local_experts=4, num_experts_per_tok=2,
                                                                        sliding_window=None))),
    "qwen2-sliding": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common(use_sliding_window=True, sliding_window=WINDOW,
                                                                         max_window_layers=2))),
    "qwen2-moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**common(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32))),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**common(head_dim=16))),
    "qwen3-moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**common(head_dim=16, num_experts=4,
                                                                          num_experts_per_tok=2, moe_intermediate_size=32))),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common(pad_token_id=0))),
    "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**common())),
    "gpt-neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=1024)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=1024)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=4,
                                                  num_attention_heads=4, max_position_embeddings=1024,
                                                  word_embed_proj_dim=64)),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                                                           num_attention_heads=4, num_kv_heads=2,
                                                           new_decoder_architecture=True)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**common(head_dim=16))),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**common(head_dim=16, sliding_window=WINDOW))),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common(head_dim=16, sliding_window=WINDOW,
                                                                       layer_types=ALTERNATING))),
    "deepseek-v3": lambda: tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**common(
        num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_group=1, topk_group=1))),
    "jamba": lambda: tf.JambaForCausalLM(tf.JambaConfig(**common(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
        mamba_d_state=8, mamba_expand=2, use_mamba_kernels=False))),
    "bamba": lambda: tf.BambaForCausalLM(tf.BambaConfig(**common(
        attn_layer_indices=[1, 3], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1))),
    "lfm2": lambda: tf.Lfm2ForCausalLM(tf.Lfm2Config(**common(layer_types=["conv", "full_attention"] * 2))),
    "qwen3-next": lambda: tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**common(
        head_dim=16, full_attention_interval=2, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32))),
    "granitemoehybrid": lambda: tf.GraniteMoeHybridForCausalLM(tf.GraniteMoeHybridConfig(**common(
        layer_types=["mamba", "attention"] * 2, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1,
        num_local_experts=4, num_experts_per_tok=2))),
    "falcon-h1": lambda: tf.FalconH1ForCausalLM(tf.FalconH1Config(**common(
        head_dim=16, mamba_d_ssm=128, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1))),
    "zamba2": lambda: tf.Zamba2ForCausalLM(tf.Zamba2Config(**common(
        layers_block_type=["mamba", "hybrid"] * 2, mamba_d_state=8, mamba_headdim=16, n_mamba_heads=8, num_mem_blocks=1))),
    "nemotron-h": lambda: tf.NemotronHForCausalLM(tf.NemotronHConfig(**common(
        hybrid_override_pattern="M*M*", mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=8, n_groups=1))),
    "gpt-oss": lambda: tf.GptOssForCausalLM(tf.GptOssConfig(**common(head_dim=16, sliding_window=WINDOW,
                                                                     num_local_experts=4, num_experts_per_tok=2))),
}
# family -> the sliding-window layers, which stay dense (layer 0 is dense by dense_layers=1)
SLIDING = {"mistral-sliding": {1, 2, 3}, "qwen2-sliding": {2, 3}, "gemma3": {2}}
# family -> its attention layers, where some layers are recurrent or convolutional instead (these
# families decode in quest mode); every other family's 4 layers are attention layers
HYBRID = {"jamba": (1, 3), "bamba": (1, 3), "lfm2": (1, 3), "qwen3-next": (1, 3), "granitemoehybrid": (1, 3),
          "nemotron-h": (1, 3), "zamba2": (1, 3), "falcon-h1": (0, 1, 2, 3)}
# family -> why retro_compile refuses it: transformers runs its attention eagerly only, or its cache
# holds a compressed latent (multi-head latent attention) instead of per-head keys and values
REFUSED = {"gemma2": "does not support SDPA attention", "gpt-oss": "does not support SDPA attention",
           "deepseek-v3": "multi-head latent attention"}
FULL = RetroConfig(mode="retro", budget=128, page_size=8, dense_layers=1, max_context=128)
SMALL = RetroConfig(mode="retro", budget=16, page_size=8, dense_layers=1, max_context=128)


def build(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():  # larger logits: greedy choices robust to float noise
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.slow
def test_family(family):
    model = build(family)
    ids, mask = prompts(2, 40, pad=(0, 5))
    expected = greedy_new_tokens(model, ids, mask, 10)
    if family in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[family]):
            retro_compile(model, FULL)
        assert torch.equal(greedy_new_tokens(model, ids, mask, 10), expected)  # left as it was
        return
    full = retro_compile(copy.deepcopy(model), FULL)
    assert torch.equal(greedy_new_tokens(full, ids, mask, 10), expected)
    assert full.retro_config.mode == ("quest" if family in HYBRID else "retro")
    store = full.retro_state
    sliding = SLIDING.get(family, set())
    attention = HYBRID.get(family, (0, 1, 2, 3))
    assert len(store.layers()) == len(attention) - 1 - len(sliding)  # the first attention layer dense by choice
    declined = sorted(store.dense_reasons.values())
    assert declined == sorted([f"layer {attention[0]} is in dense_layers"]
                              + [f"sliding-window attention (window {WINDOW})"] * len(sliding))
    small = greedy_new_tokens(retro_compile(copy.deepcopy(model), SMALL), ids, mask, 10)
    assert small.shape == (2, 10)


@pytest.mark.parametrize("family", ["qwen2-sliding", "gemma3"])
@pytest.mark.slow
def test_sliding_window_family_against_the_hand_driven_reference(family):
    """A small budget on a sliding/global mix: the tokens of the hand-driven reference, whose
    sliding layers are dense over the last WINDOW slots of a cache that keeps every position."""
    model = build(family)
    ids, mask = prompts(2, 40, pad=(0, 5), seed=3)
    got = greedy_new_tokens(retro_compile(copy.deepcopy(model), SMALL), ids, mask, 12)
    expected, _, _ = HandDriven(copy.deepcopy(model), SMALL).generate(ids, mask, 12)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["lfm2", "bamba", "qwen3-next", "falcon-h1"])
@pytest.mark.slow
def test_hybrid_family_against_the_hand_driven_reference(family):
    """A small budget on a model with recurrent layers beside attention: quest mode, one token a
    step, and the tokens of the hand-driven reference, whose recurrent layers run as the model runs
    them (with the padding mask of each call's tokens)."""
    model = build(family)
    ids, mask = prompts(2, 40, pad=(0, 5), seed=3)
    ids = ids.masked_fill(mask == 0, 7)  # padding that embeds to a nonzero vector (token 0's is zero), as eos does

    def logits(m):
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
        return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1).float()

    tokens, got = logits(retro_compile(copy.deepcopy(model), SMALL))
    # dense_layers=1 is the first attention layer, wherever it is
    reference = RetroConfig(mode="quest", budget=16, page_size=8, dense_layers=HYBRID[family][:1], max_context=128)
    expected_tokens, expected, _ = HandDriven(copy.deepcopy(model), reference).generate(ids, mask, 12)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(got, torch.stack(expected, dim=1), rtol=1e-4, atol=1e-4)
    _, dense = logits(model)
    assert (got - dense).abs().max() > 1e-2  # the budget is small enough to matter


@pytest.mark.slow
def test_hybrid_requests_in_sequence_each_start_from_an_empty_state():
    """Requests of different shapes on one model with recurrent layers, each equal to the untouched
    model at full budget: a request that reuses a batch size's static cache finds its recurrent
    and convolution states zeroed, and a prompt of one token works. Those states are allocated with
    the cache, so a request like an earlier one compiles nothing new."""
    model = build("bamba")
    compiled = retro_compile(copy.deepcopy(model), FULL)
    requests = [(2, 40, (0, 5), 1), (2, 24, (3, 0), 2), (1, 1, (), 3), (2, 33, (), 4)]
    for batch, length, pad, seed in requests:
        ids, mask = prompts(batch, length, pad=pad, seed=seed)
        ids = ids.masked_fill(mask == 0, 7)  # padding that embeds to a nonzero vector
        assert torch.equal(greedy_new_tokens(compiled, ids, mask, 8), greedy_new_tokens(model, ids, mask, 8))
    ids, mask = prompts(*requests[1][:2], pad=requests[1][2], seed=5)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(greedy_new_tokens(compiled, ids, mask, 8), greedy_new_tokens(model, ids, mask, 8))


def test_hybrid_model_decodes_in_quest_mode_and_refuses_what_needs_a_rewind(caplog):
    """The retrospective window would feed tokens to the recurrent layers twice: retro becomes quest,
    said once; assisted and prompt-lookup decoding, whose rejected drafts would have to be taken back
    out of a recurrent state, are refused up front."""
    model = build("lfm2")
    with caplog.at_level("WARNING", logger="retro_compile"):
        compiled = retro_compile(copy.deepcopy(model), FULL)
    assert compiled.retro_config.mode == "quest" and compiled.retro_config.window == 1
    assert [r.message for r in caplog.records if "quest mode" in r.message] == [
        "retro-compile: Lfm2ForCausalLM has recurrent layers [0, 2], whose state every fed token advances; the "
        "retrospective window feeds tokens again, so this model decodes in quest mode (window 1)"]
    ids, mask = prompts(1, 20)
    for option in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=build("lfm2"))):
        with pytest.raises(ValueError, match=f"{next(iter(option))}=...\\) is not supported on a model with recurrent"):
            compiled.generate(ids, attention_mask=mask, max_new_tokens=4, **option)
    greedy_new_tokens(compiled, ids, mask, 2)
    with pytest.raises(ValueError, match="cannot drop cache positions of a model with recurrent layers"):
        compiled.retro_driver.cache.crop(-1)  # a crop by hand, refused before anything moves
