"""The model matrix: tiny random configurations of the transformers families users run.

For each family: at a budget covering the whole context, ``retro_compile`` gives the untouched
model's greedy tokens (batch 2, left padding); a small budget decodes to the end; every attention
layer is either rewritten or declined with its reason. A family whose attention transformers
runs eagerly only (no SDPA call to rewrite), whose cache holds a compressed latent (DeepSeek's
multi-head latent attention), or that has recurrent or convolution layers beside attention (Jamba,
Bamba, LFM2) is refused with that reason, and the model is left as it was. No family has code of
its own in the package.
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
    "gpt-oss": lambda: tf.GptOssForCausalLM(tf.GptOssConfig(**common(head_dim=16, sliding_window=WINDOW,
                                                                     num_local_experts=4, num_experts_per_tok=2))),
}
# family -> the sliding-window layers, which stay dense (layer 0 is dense by dense_layers=1)
SLIDING = {"mistral-sliding": {1, 2, 3}, "qwen2-sliding": {2, 3}, "gemma3": {2}}
# family -> why retro_compile refuses it: transformers runs its attention eagerly only, its cache
# holds a compressed latent (multi-head latent attention) instead of per-head keys and values, or it
# has recurrent or convolution layers, whose state the window's re-fed tokens would advance twice
REFUSED = {"gemma2": "does not support SDPA attention", "gpt-oss": "does not support SDPA attention",
           "deepseek-v3": "multi-head latent attention", "jamba": r"layer types \['linear_attention'\] are not supported",
           "bamba": r"layer types \['linear_attention'\] are not supported", "lfm2": r"layer types \['conv'\] are not supported"}
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
    store = full.retro_state
    sliding = SLIDING.get(family, set())
    assert len(store.layers()) == 3 - len(sliding)  # 4 layers, layer 0 dense by choice
    declined = sorted(store.dense_reasons.values())
    assert declined == sorted(["layer 0 is in dense_layers"] + [f"sliding-window attention (window {WINDOW})"]
                              * len(sliding))
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
