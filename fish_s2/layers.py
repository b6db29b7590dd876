"""Transformer building blocks shared by the slow AR, the fast AR and the codec transformers.

Numerics follow upstream fish-speech exactly: RMSNorm casts back to the input dtype *before* the
weight multiply, RoPE is interleaved (GPT-J pairs) with a bf16-rounded cos/sin table applied in
fp32, and attention is plain scaled dot product with an explicit boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_table(n_pos: int, head_dim: int, base: float) -> Tensor:
    """cos/sin table [n_pos, head_dim/2, 2] rounded to bf16 (as upstream), stored as fp32.

    Upstream computes the rotation in fp32 against a bf16 table even in fp32 models; fp32 tables
    change logits by ~3e-2 on the golden set, so the rounding is part of the model.
    """
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    cis = torch.polar(torch.ones(n_pos, freqs.numel()), torch.outer(torch.arange(n_pos).float(), freqs))
    return torch.stack([cis.real, cis.imag], dim=-1).to(torch.bfloat16).float()


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """x [B, T, H, D]; table [B or 1, T, D/2, 2] (already gathered at the token positions)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.unsqueeze(2)
    x0, x1 = xs[..., 0], xs[..., 1]
    c, s = t[..., 0], t[..., 1]
    out = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)
    return out.flatten(3).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], mask bool [B|1, 1, T, S] (True = attend) or None = causal.

    Grouped-query attention without copying K/V: the g query heads that share kv head j (heads
    j*g..j*g+g-1) are folded into the query-length axis, so every KV entry is read once.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    if g == 1:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if mask is None:
        S = k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    y = F.scaled_dot_product_attention(q.reshape(B, Hkv, g * T, D), k, v, attn_mask=mask.repeat(1, 1, g, 1))
    return y.reshape(B, Hq, T, D)


def position_mask(input_pos: Tensor, kv_len: int) -> Tensor:
    """Boolean mask [B, 1, T, kv_len]: the token at position p sees cache entries 0..p."""
    keys = torch.arange(kv_len, device=input_pos.device)
    return (keys[None, None, None, :] <= input_pos[:, None, :, None])


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.register_buffer("w13", None, persistent=False)

    def fuse(self) -> None:
        """One [2 * hidden, dim] weight for w1 and w3 (one matmul instead of two). w1 and w3 become views
        of it, so the checkpoint's names still save and load; a later dtype or device change converts
        each separately (same values, the views are lost)."""
        if self.w13 is None:
            h, grad = self.w1.weight.shape[0], self.w1.weight.requires_grad
            self.w13 = torch.cat([self.w1.weight.detach(), self.w3.weight.detach()])
            self.w1.weight = nn.Parameter(self.w13[:h], requires_grad=grad)
            self.w3.weight = nn.Parameter(self.w13[h:], requires_grad=grad)

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        a, b = F.linear(x, self.w13).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class KVCache(nn.Module):
    """Preallocated keys and values for one layer in one tensor ``kv`` [2 (k, v), n_slots, n_kv_heads,
    max_len, head_dim], so that a slot's entries move in one copy (a cached voice prefix, a row release).

    Owned by whoever runs the model (the engine's runner, the reference generator) and passed to each
    forward, never stored on the model. A batch row b of a forward call uses slot ``slots.start + b``;
    the caller keeps the rows it decodes together in consecutive slots so that the cache is read
    through a view, not a gather. ``slots`` may also be a tensor of slot numbers (a CUDA graph that
    serves any slot: its reads are then a gather).
    """

    def __init__(self, n_slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (2, n_slots, n_kv_heads, max_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def k(self) -> Tensor:
        return self.kv[0]

    @property
    def v(self) -> Tensor:
        return self.kv[1]

    def write(self, slots: slice | Tensor, input_pos: Tensor, k: Tensor, v: Tensor,
              kv_len: int) -> tuple[Tensor, Tensor]:
        """Store k/v [B, H, T, D] at per-row positions input_pos [B, T]; return the first kv_len entries.

        Written with one index_put_ on the whole buffer, not through a view of the rows: torch.compile
        then writes in place (through a view it copies every row's whole cache each call)."""
        B, H = k.shape[:2]
        dev = k.device
        rows = slots if isinstance(slots, Tensor) else torch.arange(slots.start or 0, (slots.start or 0) + B, device=dev)
        idx = (torch.arange(2, device=dev)[:, None, None, None], rows[None, :, None, None],
               torch.arange(H, device=dev)[None, None, :, None], input_pos[None, :, None, :])
        self.kv.index_put_(idx, torch.stack([k, v]).to(self.kv.dtype))
        return self.kv[0, slots, :, :kv_len], self.kv[1, slots, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, *,
                 qk_norm: bool = False, eps: float = 1e-6, qkv_bias: bool = False, o_bias: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=o_bias)
        if qk_norm:
            # upstream uses torch.nn.RMSNorm here (not the cast-first RMSNorm above)
            self.q_norm = nn.RMSNorm(head_dim, eps)
            self.k_norm = nn.RMSNorm(head_dim, eps)
        self.qk_norm = qk_norm

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, input_pos: Tensor | None = None,
                slots: slice = slice(None), kv_len: int | None = None, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        qs, kvs = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([qs, kvs, kvs], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None and input_pos is not None:
            k, v = cache.write(slots, input_pos, k, v, kv_len)
        y = attention(q, k.to(q.dtype), v.to(q.dtype), mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, qs))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, hidden: int, eps: float, *,
                 qk_norm: bool = False, qkv_bias: bool = False, o_bias: bool = False):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head, head_dim, qk_norm=qk_norm, eps=eps,
                                   qkv_bias=qkv_bias, o_bias=o_bias)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, input_pos: Tensor | None = None,
                slots: slice = slice(None), kv_len: int | None = None, cache: KVCache | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos, slots, kv_len, cache)
        return h + self.feed_forward(self.ffn_norm(h))
