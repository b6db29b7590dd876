"""Chunked codec streaming: which frames to decode when, and the stateless decode of a chunk.

A stream is cut into a small first chunk (time to first audio) and then steady chunks. Every chunk
after the first carries up to ``context_frames`` earlier frames as left context: the codec is
causal, so decoding context + new frames and dropping the context's samples approximates the
full decode (exact where the receptive field fits in the context), at a cost linear in length.
Chunks hold everything needed to decode them, so chunks of different requests batch freely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ChunkPlan:
    first_frames: int = 4      # 4 frames = 186 ms of audio at 21.5 frames/s: the first chunk is what TTFA waits for
    chunk_frames: int = 25
    context_frames: int = 25

    def validate(self, max_frames: int = 1 << 16) -> "ChunkPlan":
        for name in ("first_frames", "chunk_frames"):
            v = getattr(self, name)
            if not 1 <= v <= max_frames:
                raise ValueError(f"{name}: must be in [1, {max_frames}], got {v}")
        if not 0 <= self.context_frames <= max_frames:
            raise ValueError(f"context_frames: must be in [0, {max_frames}], got {self.context_frames}")
        return self


@dataclass
class CodeChunk:
    index: int
    codes: Tensor        # [num_codebooks, context + n] int64
    context: int         # leading frames that are context only (their samples are dropped)

    @property
    def n_frames(self) -> int:
        return self.codes.shape[1] - self.context


class Chunker:
    """Groups a request's frames into chunks following a :class:`ChunkPlan`."""

    def __init__(self, plan: ChunkPlan):
        self.plan = plan
        self.frames: list[Tensor] = []   # kept: the last context_frames emitted + pending
        self.pending = 0
        self.index = 0

    def _target(self) -> int:
        return self.plan.first_frames if self.index == 0 else self.plan.chunk_frames

    def _emit(self) -> CodeChunk:
        context = min(self.plan.context_frames, len(self.frames) - self.pending)
        take = self.frames[len(self.frames) - self.pending - context:]
        chunk = CodeChunk(self.index, torch.stack(take, dim=1), context)
        self.index += 1
        self.pending = 0
        self.frames = self.frames[max(0, len(self.frames) - self.plan.context_frames):]
        return chunk

    def push(self, codes: Tensor) -> CodeChunk | None:
        """Add one frame's codes [num_codebooks]; return a chunk when one is complete."""
        self.frames.append(codes)
        self.pending += 1
        return self._emit() if self.pending >= self._target() else None

    def flush(self) -> CodeChunk | None:
        """The last chunk (pending frames, possibly none) at the end of the stream."""
        return self._emit() if self.pending else None


def decode_chunks(codec, chunks: list[CodeChunk]) -> list[np.ndarray]:
    """Audio (float32, n_frames * frame_length samples) of each chunk; chunks of equal length are
    decoded as one batch."""
    param = next(codec.parameters())
    out: list[np.ndarray | None] = [None] * len(chunks)
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        by_len.setdefault(c.codes.shape[1], []).append(i)
    with torch.inference_mode():
        for idx in by_len.values():
            codes = torch.stack([chunks[i].codes for i in idx]).to(param.device)
            audio = codec.decode(codes)[:, 0].float().cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = audio[row, chunks[i].context * codec.frame_length:]
    return out
