"""Upstream S2 sampling, batched over rows with per-row parameters.

``logits_to_probs`` keeps upstream semantics: top-k and top-p are decided on the *untempered*
distribution, the token whose cumulative probability crosses top_p is itself removed (no shift),
rank 0 always survives, and temperature is applied to the survivors. A draw is
``argmax(probs / -log(u))`` (exponential race == multinomial). Greedy is top_k == 1, which is what
temperature == 0 maps to.

The uniforms come from a counter-based generator (splitmix64 of ``key + (draw << 32 | index)``):
each request owns a key derived from its seed, the noise of a draw depends only on (key, draw
number, token index), so a request's samples do not depend on what else is in the batch, need no
host round trip and can be replayed -- key 0 reproduces the golden set's recorded noise stream.
Per-request parameters (:class:`fish_s2.request.SamplingParams`) are validated where they are built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .request import SamplingParams

RAS_WINDOW = 10       # repetition-aware sampling looks at the last 10 main tokens ...
RAS_TEMPERATURE = 1.0  # ... and resamples a repeat with these parameters
RAS_TOP_P = 0.9
NO_TOKEN = -1          # an empty place in a repetition window (never a main token)

_MASK64 = (1 << 64) - 1


def _signed(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors (two's-complement wraparound == arithmetic mod 2^64)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def empty_window(rows: int, device: torch.device | str = "cpu") -> Tensor:
    """A repetition window [rows, RAS_WINDOW] with no tokens in it yet."""
    return torch.full((rows, RAS_WINDOW), NO_TOKEN, dtype=torch.long, device=device)


def seed_to_key(seed: int) -> int:
    """A request's noise key: splitmix64(seed) as a signed int64 (seed is taken mod 2^64)."""
    return int(splitmix64(torch.tensor([_signed(seed)], dtype=torch.long))[0])


def uniform_noise(key: Tensor, draw: Tensor, ids: Tensor) -> Tensor:
    """u in (0, 1), float32, for rows with keys [B] at draw numbers [B] (-> [B, N]) or [B, K] (-> [B, K, N])
    and element ids [N] (or per row [B, N] with draws [B])."""
    x = key.view(-1, *([1] * draw.dim())) + ((draw[..., None] << 32) | ids)
    return (_shr(splitmix64(x), 41).float() + 0.5) / float(1 << 23)


def logits_to_probs(logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor) -> Tensor:
    """logits [B, V]; temperature/top_p [B] (cast to the logits dtype, as upstream); top_k [B] ints."""
    temperature, top_p = temperature.to(logits.dtype), top_p.to(logits.dtype)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    remove = (cum > top_p[:, None]) | (rank[None, :] >= top_k[:, None])
    remove[:, 0] = False
    remove = torch.empty_like(remove).scatter_(-1, order, remove)
    logits = logits.masked_fill(remove, float("-inf"))
    return F.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)


def race(probs: Tensor, u: Tensor) -> Tensor:
    """Index of argmax(probs / -log(u)) per row."""
    return torch.argmax(probs.float() / -torch.log(u), dim=-1)


@dataclass
class BatchSampling:
    """Sampling state of B rows as tensors, so one decode step samples every row at once."""

    temperature: Tensor  # [B] float32
    top_p: Tensor        # [B] float32
    top_k: Tensor        # [B] int64 (1 where greedy)
    key: Tensor          # [B] int64 noise keys
    k_max: int | None = None  # host-known bound on top_k: sample among the k_max best instead of sorting all

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device | str = "cpu",
           keys: list[int] | None = None) -> "BatchSampling":
        keys = [seed_to_key(p.seed) for p in params] if keys is None else keys
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k_used for p in params], dtype=torch.long, device=device),
            key=torch.tensor(keys, dtype=torch.long, device=device),
        )

    def sample(self, logits: Tensor, ids: Tensor, draw: Tensor, temperature: Tensor | None = None,
               top_p: Tensor | None = None, u: Tensor | None = None) -> Tensor:
        """Sample one column index per row of logits [B, V]. ``ids`` [V] are the element indices that key the
        noise (token ids for the main token, codes for residual codebooks); ``u`` [B, V] is that noise if
        the caller drew it already (several draws at once cost fewer kernels)."""
        t = self.temperature if temperature is None else temperature
        p = self.top_p if top_p is None else top_p
        if self.k_max is not None and self.k_max < logits.shape[-1]:
            return self._sample_best(logits, ids, draw, t, p, u)
        probs = logits_to_probs(logits, t, p, self.top_k)
        return race(probs, uniform_noise(self.key, draw, ids) if u is None else u)

    def _sample_best(self, logits: Tensor, ids: Tensor, draw: Tensor, t: Tensor, p: Tensor, u: Tensor | None) -> Tensor:
        """:func:`logits_to_probs` + :func:`race` restricted to the k_max largest logits, which hold every
        token that top-k can keep: the same samples without sorting the whole row (up to last-bit
        rounding of the normaliser). Noise is drawn for the candidates only."""
        vals, idx = torch.topk(logits, self.k_max, dim=-1)
        t, p = t.to(logits.dtype), p.to(logits.dtype)
        sorted_probs = torch.exp(vals.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)).to(logits.dtype)
        cum = torch.cumsum(sorted_probs, dim=-1)
        rank = torch.arange(self.k_max, device=logits.device)
        remove = (cum > p[:, None]) | (rank[None, :] >= self.top_k[:, None])
        remove[:, 0] = False
        probs = F.softmax(vals.masked_fill(remove, float("-inf")) / t.clamp(min=1e-5)[:, None], dim=-1)
        noise = uniform_noise(self.key, draw, ids[idx]) if u is None else u.gather(-1, idx)
        return idx.gather(-1, race(probs, noise)[:, None])[:, 0]
