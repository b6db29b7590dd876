"""The slow AR: a Qwen3-geometry transformer over time whose input at audio positions is the
semantic-token embedding plus the sum of the frame's codebook embeddings, scaled by 1/sqrt(n+1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .config import DualARConfig
from .layers import KVCache, RMSNorm, TransformerBlock, position_mask, rope_table


class SlowAR(nn.Module):
    def __init__(self, cfg: DualARConfig):
        super().__init__()
        c = cfg.slow
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, c.dim)
        self.codebook_embeddings = nn.Embedding(cfg.codebook_size * cfg.num_codebooks, c.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim, c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size, c.norm_eps,
                             qk_norm=c.qk_norm, qkv_bias=c.qkv_bias, o_bias=c.o_bias)
            for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if not cfg.tie_word_embeddings:
            self.output = nn.Linear(c.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_table(c.max_seq_len, c.head_dim, c.rope_base), persistent=False)
        self.register_buffer("codebook_offsets", torch.arange(cfg.num_codebooks) * cfg.codebook_size,
                             persistent=False)

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute the non-persistent buffers (after building the module on the meta device)."""
        c = self.cfg.slow
        self.rope = rope_table(c.max_seq_len, c.head_dim, c.rope_base).to(device)
        self.codebook_offsets = (torch.arange(self.cfg.num_codebooks) * self.cfg.codebook_size).to(device)

    def new_cache(self, n_slots: int, max_len: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """A KV cache for n_slots sequences of up to max_len tokens (one KVCache per layer)."""
        c, w = self.cfg.slow, self.embeddings.weight
        return [KVCache(n_slots, c.n_kv_head, max_len, c.head_dim, dtype or w.dtype, w.device) for _ in self.layers]

    def embed(self, inp: Tensor) -> Tensor:
        """inp [B, n+1, T] (token ids; codes) -> [B, T, dim]. Codes at non-semantic positions are ignored."""
        tokens, codes = inp[:, 0], inp[:, 1:]
        x = self.embeddings(tokens)
        vq = self.codebook_embeddings(codes + self.codebook_offsets[None, :, None]).sum(dim=1)
        is_semantic = (tokens >= self.cfg.semantic_begin_id) & (tokens <= self.cfg.semantic_end_id)
        scaled = (x + vq) / math.sqrt(self.cfg.num_codebooks + 1)
        return torch.where(is_semantic[..., None], scaled, x)

    def forward(self, inp: Tensor, input_pos: Tensor | None = None, slots: slice = slice(None),
                kv_len: int | None = None, cache: list[KVCache] | None = None) -> Tensor:
        """Final-norm hidden states [B, T, dim] (what the fast AR and the logits heads consume).

        Without ``input_pos`` this is a plain causal pass over positions 0..T-1 without a cache. With
        ``input_pos`` [B, T] and ``cache`` (:meth:`new_cache`) the new keys/values go to the cache rows
        ``slots`` and each token attends to its row's entries up to its own position (``kv_len`` >= max
        position + 1).
        """
        x = self.embed(inp)
        if input_pos is None:
            rope, mask = self.rope[None, : x.shape[1]], None
        else:
            kv_len = kv_len or int(input_pos.max()) + 1
            rope, mask = self.rope[input_pos], position_mask(input_pos, kv_len)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, input_pos, slots, kv_len, None if cache is None else cache[i])
        return self.norm(x)

    def head_weight(self) -> Tensor:
        return self.embeddings.weight if self.cfg.tie_word_embeddings else self.output.weight

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits over the whole vocabulary."""
        return F.linear(hidden, self.head_weight())

    def audio_logits(self, hidden: Tensor) -> Tensor:
        """Logits of the only tokens generation may emit: the semantic range, then <|im_end|> last.

        Equal to masking the full logits (upstream's constrained decoding) at 1/38 of the head's cost.
        """
        w, c = self.head_weight(), self.cfg
        sem = F.linear(hidden, w[c.semantic_begin_id: c.semantic_end_id + 1])
        eos = F.linear(hidden, w[c.eos_id: c.eos_id + 1])
        return torch.cat([sem, eos], dim=-1)

    def audio_token_ids(self) -> Tensor:
        """Token id of each column of :meth:`audio_logits`."""
        c = self.cfg
        return torch.cat([torch.arange(c.semantic_begin_id, c.semantic_end_id + 1), torch.tensor([c.eos_id])]
                         ).to(self.embeddings.weight.device)
