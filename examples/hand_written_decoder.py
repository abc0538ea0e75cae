"""A decoder written by hand (no transformers) with its own static KV cache, compiled with the
``retro`` backend. Any module that calls ``F.scaled_dot_product_attention`` works the same way.

    python examples/hand_written_decoder.py
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from retro_compile import RetroConfig


class Attention(nn.Module):
    def __init__(self, dim: int, q_heads: int, kv_heads: int, batch: int, max_len: int) -> None:
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, dim // q_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(batch, kv_heads, max_len, self.head_dim))
        self.register_buffer("v_cache", torch.zeros(batch, kv_heads, max_len, self.head_dim))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.q_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Writing at the given positions overwrites what earlier steps stored there.
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class Decoder(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks (attention + MLP), tied output head."""

    def __init__(self, vocab=97, dim=64, layers=4, q_heads=4, kv_heads=2, batch=1, max_len=256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(
            nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), attn=Attention(dim, q_heads, kv_heads, batch, max_len),
                               norm2=nn.LayerNorm(dim), mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                                                          nn.Linear(4 * dim, dim))))
            for _ in range(layers))
        self.max_len = max_len

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits for ``ids`` (B, n) at cache ``positions`` (n,), attending causally to the cache."""
        mask = (torch.arange(self.max_len, device=ids.device) <= positions[:, None])[None, None]
        x = self.embed(ids) + self.pos(positions)
        for block in self.layers:
            x = x + block["attn"](block["norm1"](x), positions, mask)
            x = x + block["mlp"](block["norm2"](x))
        return x @ self.embed.weight.T


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int, window: int = 1) -> torch.Tensor:
    """Greedy decoding that feeds the last ``window`` positions each step (RetroAttention's window)."""
    tokens = prompt
    logits = model(prompt, torch.arange(prompt.shape[1]))
    for _ in range(new_tokens):
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        t = tokens.shape[1] - 1
        logits = model(tokens[:, t - window + 1:], torch.arange(t - window + 1, t + 1))
    return tokens


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model = Decoder().eval()
    prompt = torch.randint(0, 97, (1, 100))
    dense = greedy(model, prompt, 20)
    config = RetroConfig(mode="retro", budget=256, page_size=16, dense_layers=1, max_context=model.max_len)
    compiled = torch.compile(model, backend="retro", options={"retro_config": config})
    retro = greedy(compiled, prompt, 20, window=config.window)
    agree = (dense[:, 100:] == retro[:, 100:]).float().mean().item()
    logging.info("budget covers the context: retro agrees with dense on %.0f%% of 20 tokens", 100 * agree)


if __name__ == "__main__":
    main()
