"""The fast AR: a small transformer over the codebook axis of one frame.

Position 0 is the slow AR's (projected) final hidden state; position k >= 1 is the embedding of
code k-1 and predicts code k. Code 0 is the slow AR's semantic token, so a frame needs
num_codebooks - 1 sampled fast steps. Its KV cache has num_codebooks slots and is simply
overwritten from position 0 at every frame (the causal mask hides stale entries); its owner passes
it to every step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import DualARConfig
from .layers import KVCache, RMSNorm, TransformerBlock, position_mask, rope_table


class FastAR(nn.Module):
    def __init__(self, cfg: DualARConfig):
        super().__init__()
        c = cfg.fast
        self.cfg = cfg
        self.project_in = nn.Linear(cfg.slow.dim, c.dim) if cfg.has_fast_project_in else nn.Identity()
        self.embeddings = nn.Embedding(cfg.codebook_size, c.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim, c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size, c.norm_eps,
                             qk_norm=c.qk_norm, qkv_bias=c.qkv_bias, o_bias=c.o_bias)
            for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, cfg.codebook_size, bias=False)
        self.register_buffer("rope", rope_table(cfg.num_codebooks, c.head_dim, c.rope_base), persistent=False)

    def init_buffers(self, device: torch.device | str) -> None:
        c = self.cfg.fast
        self.rope = rope_table(self.cfg.num_codebooks, c.head_dim, c.rope_base).to(device)

    def new_cache(self, n_slots: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """A codebook-axis cache for n_slots rows (one KVCache per layer)."""
        c, w = self.cfg.fast, self.output.weight
        return [KVCache(n_slots, c.n_kv_head, self.cfg.num_codebooks, c.head_dim, dtype or w.dtype, w.device)
                for _ in self.layers]

    def step(self, x: Tensor, pos: int, cache: list[KVCache], slots: slice = slice(None),
             logits: bool = True) -> Tensor | None:
        """One cached step for all rows at codebook position ``pos``: x [B, dim] -> logits [B, codebook_size].

        Position 0 takes ``project_in(hidden)``; its logits are never used, so ``logits=False`` skips them.
        """
        B = x.shape[0]
        input_pos = torch.full((B, 1), pos, dtype=torch.long, device=x.device)
        rope, mask = self.rope[pos: pos + 1][None], position_mask(input_pos, pos + 1)
        h = x[:, None]
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, rope, mask, input_pos, slots, pos + 1, layer_cache)
        return self.output(self.norm(h[:, 0])) if logits else None

    def forward(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced pass: hidden [N, slow_dim], codes [N, n-1] (codes 0..n-2) -> logits [N, n, codebook_size].

        Row k predicts code k (row 0's prediction of code 0 is a training-only output)."""
        x = torch.cat([self.project_in(hidden)[:, None], self.embeddings(codes)], dim=1)
        rope = self.rope[None, : x.shape[1]]
        for layer in self.layers:
            x = layer(x, rope, None)
        return self.output(self.norm(x))
