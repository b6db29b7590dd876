"""Decoding streamed code chunks with the torch codec in a few fixed shapes: on CUDA one graph per
(batch bucket, length bucket), on a stream of its own, so that decoding chunk k overlaps the engine
making chunk k+1.

A chunk plan gives a handful of code lengths (:meth:`fish_s2.request.ChunkPlan.code_lengths`); they are
the length buckets. A chunk is right-padded with code 0 to the smallest bucket that holds it: the codec
is causal (left-padded convs, right-trimmed transposed convs, causal attention with positions from 0), so
frames after a chunk's own change none of its samples (up to float rounding: other shapes, other
kernels). Rows are padded up to the batch bucket; rows never mix. A chunk longer than every bucket is
decoded eagerly at its own length; more chunks than the largest batch bucket are decoded in pieces.

Stream contract (CUDA): :meth:`ChunkDecoder.decode` runs all its device work on ``self.stream`` and
returns host arrays only after that work has finished (the copy to the host synchronizes the stream).
It never waits for another stream: its inputs come from the host, and the codec's weights must be on
the device before it is built (the constructor orders its stream after the current one once). Graphs
share static buffers: one thread at a time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from .codec import Codec, WindowLimitedTransformer
from .engine.config import SWITCH_MODES
from .engine.runner import allow_recompiles, compile_step
from .request import ChunkPlan, CodeChunk

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def _bucket(n: int, sizes) -> int | None:
    return next((s for s in sizes if s >= n), None)


class ChunkDecoder:
    def __init__(self, codec: Codec, batch_sizes: Iterable[int] = BATCH_SIZES,
                 lengths: Iterable[int] = ChunkPlan().code_lengths(), compile: str = "auto", cuda_graphs: bool = True):
        """``lengths``: the length buckets (a chunk plan's code lengths); ``compile`` as engine.compile:
        auto (on CUDA only), on, off; ``cuda_graphs``: CUDA only. Neither: eager at each chunk's own shape
        (what :func:`fish_s2.streaming.decode_chunks` does), on the caller's stream."""
        if compile not in SWITCH_MODES:
            raise ValueError(f"compile: expected one of {list(SWITCH_MODES)}, got {compile!r}")
        self.codec, self.device = codec, next(codec.parameters()).device
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda_graphs and cuda
        self.compiled = compile == "on" or (compile == "auto" and cuda)
        self.batch_sizes, self.lengths = tuple(sorted(set(batch_sizes))), sorted(set(lengths))
        self.stream = torch.cuda.Stream(self.device) if cuda and self.bucketed else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._fn = compile_step(self._body) if self.compiled else self._body
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._pool = None
        self.build_s: dict[tuple[int, int], float] = {}   # (batch, length) -> seconds its compile/capture took
        self.chunks = {"bucketed": 0, "eager": 0}          # chunks decoded each way so far

    @property
    def bucketed(self) -> bool:
        return self.use_graphs or self.compiled

    @property
    def n_graphs(self) -> int:
        return len(self._graphs)

    def _body(self, codes: Tensor) -> Tensor:
        return self.codec.decode(codes)[:, 0].float()

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ decode

    def decode(self, chunks: list[CodeChunk]) -> list[np.ndarray]:
        """Audio (float32, n_frames * frame_length samples) of each chunk, its context's samples dropped."""
        self._check(chunks)
        fl, out = self.codec.frame_length, [None] * len(chunks)
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(chunks):
            n = c.codes.shape[1]
            groups.setdefault((_bucket(n, self.lengths) or n) if self.bucketed else n, []).append(i)
        with torch.inference_mode(), self._on_stream():
            for T, idx in groups.items():
                step = self.batch_sizes[-1] if self._graphed(T) else len(idx)
                for s in range(0, len(idx), step):
                    rows = idx[s:s + step]
                    audio = self._run(T, [chunks[i].codes for i in rows])
                    for row, i in enumerate(rows):
                        out[i] = audio[row, chunks[i].context * fl:chunks[i].codes.shape[1] * fl]
        return out

    def _graphed(self, T: int) -> bool:
        return self.bucketed and T in self.lengths

    def _run(self, T: int, codes: list[np.ndarray]) -> np.ndarray:
        """Decode the rows (each at most T frames) right-padded to T, in their bucket or eagerly."""
        n, graphed = len(codes), self._graphed(T)
        B = _bucket(n, self.batch_sizes) if graphed else n
        x = np.zeros((B, codes[0].shape[0], T), np.int64)
        for r, c in enumerate(codes):
            x[r, :, :c.shape[1]] = c
        x = torch.from_numpy(x)
        self.chunks["bucketed" if graphed else "eager"] += n
        if not graphed:
            return self._body(x.to(self.device))[:n].cpu().numpy()
        if (B, T) not in self.build_s:
            self._build(B, T)
        if not self.use_graphs:
            return self._fn(x)[:n].numpy()
        graph, static_in, static_out = self._graphs[B, T]
        static_in.copy_(x)
        graph.replay()
        return static_out[:n].cpu().numpy()

    def _check(self, chunks: list[CodeChunk]) -> None:
        cfg = self.codec.config
        top = max(cfg.quantizer.semantic_codebook_size, cfg.quantizer.codebook_size)  # the codec clamps below it
        for i, c in enumerate(chunks):
            codes = c.codes
            if not isinstance(codes, np.ndarray) or codes.ndim != 2 or codes.dtype.kind not in "iu":
                got = f"{codes.dtype} {list(codes.shape)}" if isinstance(codes, np.ndarray) else type(codes).__name__
                raise ValueError(f"chunks[{i}]: codes must be an integer array [codebooks, frames], got {got}")
            if codes.shape[0] != cfg.n_codebooks:
                raise ValueError(f"chunks[{i}]: codes have {codes.shape[0]} codebooks, the codec takes "
                                 f"{cfg.n_codebooks}")
            if not 0 <= c.context < codes.shape[1]:
                raise ValueError(f"chunks[{i}]: context {c.context} must leave at least one of its "
                                 f"{codes.shape[1]} frames")
            if codes.min() < 0 or codes.max() >= top:
                raise ValueError(f"chunks[{i}]: codes must be in [0, {top}), got {codes.min()}..{codes.max()}")

    # ------------------------------------------------------------------ buckets

    def prepare(self, lengths: Iterable[int], max_batch: int) -> int:
        """Add ``lengths`` to the length buckets and build every (batch bucket up to max_batch's, length)
        now, so that no chunk waits for a compile or a capture (call at warm-up, with the chunk plan's
        code lengths). Returns the number of buckets built so far."""
        self.lengths = sorted(set(self.lengths) | set(lengths))
        if not self.bucketed:
            return 0
        top = _bucket(min(max_batch, self.batch_sizes[-1]), self.batch_sizes)
        with torch.inference_mode(), self._on_stream():
            for B in reversed([b for b in self.batch_sizes if b <= top]):   # largest first: the pool is reused
                for T in reversed(self.lengths):
                    if (B, T) not in self.build_s:
                        self._build(B, T)
        return len(self.build_s)

    def _build(self, B: int, T: int) -> None:
        """Compile (with compile) and capture (with graphs) the bucket; its time goes to ``build_s``."""
        t = time.perf_counter()
        for m in self.codec.modules():   # no table growth inside a compile or a capture
            if isinstance(m, WindowLimitedTransformer):
                m.reserve(T)
        if self.compiled:
            allow_recompiles(len(self.batch_sizes) * len(self.lengths))
        x = torch.zeros(B, self.codec.config.n_codebooks, T, dtype=torch.long, device=self.device)
        if self.use_graphs:
            for _ in range(2):   # warm-up (and compile) at this exact shape: never compile inside a capture
                self._fn(x)
            graph = torch.cuda.CUDAGraph()
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool, stream=self.stream, capture_error_mode="thread_local"):
                out = self._fn(x)
            self._graphs[B, T] = (graph, x, out)
            self.stream.synchronize()
        else:
            self._fn(x)
        self.build_s[B, T] = time.perf_counter() - t
