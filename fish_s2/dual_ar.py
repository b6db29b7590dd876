"""The Dual-AR model and its per-frame step, shared by the reference generator, the batched engine
and the TensorRT-LLM model: one place for the embedding combine, the fast-AR loop and sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from .config import DualARConfig
from .fast_ar import FastAR
from .layers import FeedForward, KVCache
from .sampling import RAS_TEMPERATURE, RAS_TOP_P, BatchSampling, uniform_noise
from .slow_ar import SlowAR


class DualAR(nn.Module):
    def __init__(self, cfg: DualARConfig):
        super().__init__()
        self.cfg = cfg
        self.slow = SlowAR(cfg)
        self.fast = FastAR(cfg)

    def init_buffers(self, device: torch.device | str) -> None:
        self.slow.init_buffers(device)
        self.fast.init_buffers(device)

    def fuse_weights(self) -> None:
        """Concatenate each feed-forward's w1/w3 once (q/k/v already are one wqkv); idempotent."""
        for m in self.modules():
            if isinstance(m, FeedForward):
                m.fuse()

    @property
    def draws_per_frame(self) -> int:
        """Noise draws per frame: main token, its repetition-aware resample, one per residual codebook."""
        return self.cfg.num_codebooks + 1


@dataclass
class FrameRecord:
    """Inputs and outputs of one frame step, for parity checks and debugging."""

    audio_logits: Tensor   # [B, n_semantic + 1] slow logits (semantic range, then <|im_end|>)
    fast_input: Tensor     # [B, fast_dim] project_in(hidden)
    main_normal: Tensor    # [B] main token from the regular sample
    main_high: Tensor      # [B] main token from the repetition-aware resample
    ras_used: Tensor       # [B] bool


class FastARRuntime(Protocol):
    """Another runtime for the fast-AR half of a frame (e.g. ONNX Runtime), same semantics as
    :func:`sample_codes`."""

    def sample_codes(self, hidden: Tensor, main: Tensor, sampling: BatchSampling, draw0: Tensor) -> Tensor: ...


def decode_frame(model: DualAR, hidden: Tensor, sampling: BatchSampling, frame_index: Tensor,
                 ras_window: Tensor | None, audio_ids: Tensor, fast_cache: list[KVCache] | None,
                 slots: slice = slice(None), record: list[FrameRecord] | None = None,
                 fast_ar: FastARRuntime | None = None) -> Tensor:
    """One Dual-AR frame for B rows from the slow AR's final-norm hidden state [B, dim].

    Samples the main token over the semantic range + <|im_end|> (with repetition-aware resampling
    against ``ras_window`` [B, W] of recent main tokens; None on a sequence's first frame), then runs
    the fast AR over the codebooks. ``frame_index`` [B] numbers each row's frames for its noise
    stream. Returns the frame column [B, num_codebooks + 1]: main token id, then the codes.
    ``fast_cache`` (``model.fast.new_cache``) is the torch fast AR's, rows ``slots``; ``fast_ar``
    replaces the torch fast AR for the codes (then no cache is needed).
    """
    cfg = model.cfg
    n_draws = model.draws_per_frame
    draw0 = frame_index.long() * n_draws
    logits = model.slow.audio_logits(hidden)

    normal = audio_ids[sampling.sample(logits, audio_ids, draw0)]
    high = audio_ids[sampling.sample(logits, audio_ids, draw0 + 1,
                                     torch.full_like(sampling.temperature, RAS_TEMPERATURE),
                                     torch.full_like(sampling.top_p, RAS_TOP_P))]
    if ras_window is None:
        ras = torch.zeros_like(normal, dtype=torch.bool)
    else:
        ras = (ras_window == normal[:, None]).any(dim=-1) & (normal != cfg.eos_id)
    main = torch.where(ras, high, normal)

    if fast_ar is None:
        codes = sample_codes(model, hidden, main, sampling, draw0, fast_cache, slots)
    else:
        codes = fast_ar.sample_codes(hidden, main, sampling, draw0).to(main.device)
    if record is not None:
        record.append(FrameRecord(logits, model.fast.project_in(hidden), normal, high, ras))
    return torch.cat([main[:, None], codes], dim=1)


def sample_codes(model: DualAR, hidden: Tensor, main: Tensor, sampling: BatchSampling, draw0: Tensor,
                 cache: list[KVCache], slots: slice = slice(None)) -> Tensor:
    """The fast-AR half of a frame: codes [B, num_codebooks] given the main tokens [B].

    Code 0 is the main token's semantic index (clamped, so <|im_end|> gives 0); codes 1.. are sampled
    over the whole codebook (residual codes above the codec's range are kept: upstream feeds them
    back unclamped and only the codec clamps)."""
    cfg, fast = model.cfg, model.fast
    code = (main - cfg.semantic_begin_id).clamp(0, cfg.codebook_size - 1)
    fast.step(fast.project_in(hidden), 0, cache, slots, logits=False)
    codes = [code]
    code_ids = torch.arange(cfg.codebook_size, device=hidden.device)
    u = None
    if sampling.k_max is None:  # full-row sampling: draw all codebooks' noise at once (fewer kernels)
        ks = torch.arange(2, cfg.num_codebooks + 1, device=hidden.device)
        u = uniform_noise(sampling.key, draw0[:, None] + ks, code_ids)  # [B, n-1, codebook_size]
    for k in range(1, cfg.num_codebooks):
        logits = fast.step(fast.embeddings(code), k, cache, slots)
        code = sampling.sample(logits, code_ids, draw0 + 1 + k, u=None if u is None else u[:, k - 1])
        codes.append(code)
    return torch.stack(codes, dim=1)
