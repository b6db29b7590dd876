"""Cutting a request's frames into code chunks by its :class:`ChunkPlan`, and the playback gap a
listener hears when chunks arrive late (numpy, torch-free).

Every chunk after the first carries up to ``context_frames`` earlier frames as left context: the
codec is causal, so decoding context + new frames and dropping the context's samples approximates
the full decode at a cost linear in length, and chunks of different requests batch freely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .params import ChunkPlan


@dataclass
class CodeChunk:
    index: int
    codes: np.ndarray    # int64 [num_codebooks, context + n]
    context: int         # leading frames that are context only (their samples are dropped)

    @property
    def n_frames(self) -> int:
        return self.codes.shape[1] - self.context


class Chunker:
    """Groups one request's frames into chunks following a plan."""

    def __init__(self, plan: ChunkPlan):
        self.plan = plan
        self.frames: list[np.ndarray] = []   # kept: the last context_frames emitted + pending
        self.pending = 0
        self.index = 0

    def _target(self) -> int:
        return self.plan.frames(self.index)

    def _emit(self) -> CodeChunk:
        context = min(self.plan.context_frames, len(self.frames) - self.pending)
        take = self.frames[len(self.frames) - self.pending - context:]
        chunk = CodeChunk(self.index, np.stack(take, axis=1).astype(np.int64, copy=False), context)
        self.index += 1
        self.pending = 0
        self.frames = self.frames[max(0, len(self.frames) - self.plan.context_frames):]
        return chunk

    def push(self, codes: np.ndarray) -> CodeChunk | None:
        """Add one frame's codes [num_codebooks]; return a chunk when one is complete."""
        self.frames.append(np.asarray(codes))
        self.pending += 1
        return self._emit() if self.pending >= self._target() else None

    def flush(self) -> CodeChunk | None:
        """The last chunk (pending frames, possibly none) at the end of the stream."""
        return self._emit() if self.pending else None


class Player:
    """A real-time player that starts at the first chunk's arrival and plays chunks back to back: when
    the audio it has runs out before the next chunk arrives, it waits (a playback gap)."""

    def __init__(self):
        self.end: float | None = None   # when the audio received so far will have played out
        self.gap = 0.0                  # total wait so far

    def add(self, arrival: float, seconds: float) -> float:
        """A chunk of ``seconds`` of audio arriving at ``arrival`` (any clock, in order); returns the
        player's wait for it (0 for the first chunk and every chunk in time)."""
        wait = 0.0 if self.end is None else max(0.0, arrival - self.end)
        self.end = (arrival if self.end is None else max(arrival, self.end)) + seconds
        self.gap += wait
        return wait


def playback_gap(chunks) -> float:
    """How long a real-time player that starts at the first chunk waits, summed over the stream:
    ``chunks`` are (arrival time, audio seconds) in arrival order."""
    player = Player()
    for arrival, seconds in chunks:
        player.add(arrival, seconds)
    return player.gap


def chunks_to_codes(chunks: list[CodeChunk]) -> np.ndarray:
    """The frames of a request's chunks, reassembled: codes [num_codebooks, n_frames]."""
    if not chunks:
        return np.zeros((0, 0), np.int64)
    return np.concatenate([c.codes[:, c.context:] for c in chunks], axis=1)
