"""Tiny random Hugging Face models and an un-compiled, hand-driven reference decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.masking_utils import sdpa_mask

from retro_compile import RetroConfig
from retro_compile.integrations.hf import cache_argument, rewind
from retro_compile.kernels.op import retro_attention
from retro_compile.passes.rewrite import sparse_params
from retro_compile.state import StateShape, allocate

VOCAB = 128


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 4, q_heads: int = 4, kv_heads: int = 2,
               max_positions: int = 1024):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=q_heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common, use_sliding_window=False),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
    }[arch]()
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM}[arch]
    model = cls(config).eval()
    model.generation_config.eos_token_id = None  # decode exactly the requested number of tokens
    # Larger logits make greedy choices robust to float noise and give attention real structure.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def greedy_new_tokens(model, ids, mask, new_tokens: int, **kw) -> torch.Tensor:
    """Greedy ``generate()``: the (B, new_tokens) ids after the prompt."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def prompts(batch: int, length: int, pad: tuple[int, ...] = (), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pad):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


class HandDriven:
    """Decodes with the reference op called eagerly from an attention function: no FX, no compile.

    The decode window is driven here by hand (cache crop, window ids, explicit masks), so the
    compiled driver and the rewrite are checked against an independent path.
    """

    NAME = "retro_test_reference"

    def __init__(self, model, config: RetroConfig):
        self.model, self.config = model, config
        # Sliding-window layers (dense here) keep every position, so that the window can be rewound,
        # and see the keys of the last ``sliding_window`` slots.
        types = getattr(model.config, "layer_types", None) or []
        self.sliding = {i for i, t in enumerate(types) if t == "sliding_attention"}
        # Recurrent and convolution layers read the 2D padding mask of a call's tokens, under their type
        self.recurrent_key = "conv" if "conv" in types else "linear_attention" if {"linear_attention", "hybrid"} & set(types) else None
        self.sliding_window = getattr(model.config, "sliding_window", None)
        self.states = {}
        self.prefill = None  # the phase said to the op (None: inferred from the rows)
        self.captured = {}  # layer index -> hidden states entering that layer on the last call
        AttentionInterface.register(self.NAME, self._attention)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)
        model.set_attn_implementation(self.NAME)
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(self._capture(i), with_kwargs=True)

    def _capture(self, index):
        def hook(module, args, kwargs):
            self.captured[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    def _attention(self, module, q, k, v, mask, dropout=0.0, scaling=None, **kw):
        layer = module.layer_idx
        if self.config.mode == "dense" or self.config.is_dense_layer(layer) or layer in self.sliding:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                 is_causal=mask is None and q.shape[2] > 1, enable_gqa=True)
        else:
            if layer not in self.states:
                self.states[layer] = allocate(StateShape.of_call(q, k, v, self.config.num_pages, self.config.window,
                                                                  self.config.summaries))
            out = retro_attention(q, k, v, mask, self.states[layer], sparse_params(self.config), scale=scaling,
                                  prefill=self.prefill)
        return out.transpose(1, 2), None

    @torch.no_grad()
    def generate(self, ids, attention_mask, new_tokens):
        """Greedy decoding; returns (tokens (B, new_tokens), logits per step, cache)."""
        w, length = self.config.window, self.config.max_context
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        for i in self.sliding:
            cache.layers[i] = StaticLayer(max_cache_len=length)
        cache_arg = cache_argument(self.model)
        n = ids.shape[1]
        pos_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        key_ok = F.pad(attention_mask.bool(), (0, length - n))  # (B, L)
        j = torch.arange(length)
        mask = key_ok[:, None, None, :] & (j <= torch.arange(n)[:, None])
        mask = mask | (~mask.any(-1, keepdim=True) & (j == torch.arange(n)[:, None]))  # padded rows see themselves
        padding = None if bool(attention_mask.all()) else attention_mask.bool()
        out = self.model(input_ids=ids, attention_mask=self._masks(mask, torch.arange(n), padding),
                         position_ids=pos_ids, **{cache_arg: cache})
        tokens, logits = [], []
        history = ids
        for step in range(new_tokens):
            logits.append(out.logits[:, -1].float())
            tokens.append(out.logits[:, -1].argmax(-1))
            history = torch.cat([history, tokens[-1][:, None]], dim=1)
            if step == new_tokens - 1:
                break
            t = history.shape[1] - 1
            key_ok[:, t] = True
            rows = torch.arange(t - w + 1, t + 1)
            mask = key_ok[:, None, None, :] & (j <= rows[:, None])
            last_pos = pos_ids[:, -1:] + 1
            pos_ids = torch.cat([pos_ids, last_pos], dim=1)
            if w > 1:
                rewind(cache, w - 1)
            out = self.model(input_ids=history[:, -w:], attention_mask=self._masks(mask, rows),
                             position_ids=pos_ids[:, -w:], **{cache_arg: cache})
        return torch.stack(tokens, dim=1), logits, cache

    @torch.no_grad()
    def replay(self, calls):
        """Replays one unpadded row's forward calls and cache crops as the driver serves them.

        ``calls``: ("feed", ids (1, n)) and ("crop", k). A feed of several tokens is a prefill
        chunk at the next slots (dense rows; the op rebuilds the state); a feed of one token is a
        decode step over the window (the last ``w - 1`` tokens again). A crop drops the newest ``k``
        slots, and the next feed is a prefill chunk led by the last ``w - 1`` kept tokens. Returns
        the logits of each feed's own rows, (1, n, V) each.
        """
        w, length = self.config.window, self.config.max_context
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        cache_arg = cache_argument(self.model)
        history = torch.zeros(1, 0, dtype=torch.long)
        slots, refeed, out = 0, False, []
        j = torch.arange(length)
        for kind, arg in calls:
            if kind == "crop":
                rewind(cache, arg)
                slots -= arg
                history = history[:, :slots]
                refeed = True
                continue
            n = arg.shape[1]
            history = torch.cat([history, arg], dim=1)
            again = w - 1 if refeed or n == 1 else 0
            rows = torch.arange(slots - again, slots + n)
            rewind(cache, again)
            self.prefill = n > 1 or refeed
            mask = (j <= rows[:, None])[None, None] & (j < slots + n)
            logits = self.model(input_ids=history[:, slots - again:], attention_mask=mask, position_ids=rows[None],
                                **{cache_arg: cache}).logits
            out.append(logits[:, again:].float())
            slots, refeed = slots + n, False
        self.prefill = None
        return out

    def _masks(self, mask, rows, padding=None):
        """The forward's masks: per layer type where the model has sliding-window or recurrent
        layers (these take ``padding``, the call's 2D padding mask, None where nothing is padded)."""
        if not self.sliding and self.recurrent_key is None:
            return mask
        masks = {"full_attention": mask}
        if self.sliding:
            masks["sliding_attention"] = mask & (torch.arange(mask.shape[-1]) > rows[:, None] - self.sliding_window)
        if self.recurrent_key is not None:
            masks[self.recurrent_key] = padding
        return masks
