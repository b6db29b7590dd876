"""The device side of the batched engine: buffers, KV caches, prefill, voice prefix cache, the
batched decode step and its CUDA graphs.

Rows are KV slots. Active requests always occupy rows 0..n-1, so a step reads the cache through
views; when a request leaves, the last row moves into its place (:meth:`TorchRunner.release`). The
runner owns its KV caches (the model module holds none), so two users of one model never share
them. On CUDA the decode step runs as a CUDA graph per (batch bucket, KV-length bucket), and a new
request's first frame as one graph made in a scratch row, captured on first use from static buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..dual_ar import DualAR, FastARRuntime, decode_frame
from ..prefix_cache import PrefixCache, prefix_key
from ..request import EngineRequest
from ..sampling import BatchSampling, empty_window, seed_to_key
from .config import EngineConfig


def _bucket(n: int, sizes) -> int:
    return next(s for s in sizes if s >= n)


class TorchRunner:
    def __init__(self, model: DualAR, cfg: EngineConfig, fast_ar: FastARRuntime | None = None):
        """``fast_ar``: run the fast AR with another runtime (ONNX Runtime on the CPU) instead of torch."""
        self.model, self.cfg, self.fast_ar = model, cfg, fast_ar
        w = model.slow.embeddings.weight
        self.device, self.dtype = w.device, w.dtype
        self.model_tag = f"{model.cfg}:{self.dtype}"
        B, rows = cfg.max_active, model.cfg.frame_rows
        self.slow_cache = model.slow.new_cache(B, cfg.max_seq_len)
        self.fast_cache = model.fast.new_cache(B + 1)  # row B: scratch row where a new request's first frame is made
        self.audio_ids = model.slow.audio_token_ids()
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=self.device)  # noqa: E731
        # per-row decode state (static buffers for CUDA graphs); row B = scratch
        self.cur, self.pos, self.frame_idx = z(B + 1, rows), z(B + 1), z(B + 1)
        self.window = empty_window(B + 1, self.device)
        self.temperature, self.top_p = z(B + 1, dt=torch.float32), z(B + 1, dt=torch.float32)
        self.top_k, self.key = z(B + 1), z(B + 1)
        self.scratch_hidden = z(1, model.cfg.slow.dim, dt=self.dtype)
        self.positions: list[int] = []   # host copy of each active row's position
        self.top_ks: list[int] = []      # host copy of each active row's top_k
        self.prefix_cache = PrefixCache(cfg.prefix_cache_bytes)
        self.use_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.graph_sizes = tuple(s for s in cfg.graph_batch_sizes if s < B) + (B,)
        self._graphs: dict[object, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._graph_pool = None

    @property
    def n_active(self) -> int:
        return len(self.positions)

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def admit(self, req: EngineRequest) -> Tensor:
        """Prefill a request into the next free row; returns its first frame [num_codebooks + 1] (host)."""
        r, p = self.n_active, req.params
        self.positions.append(0)
        self.top_ks.append(p.top_k_used)
        self.temperature[r], self.top_p[r] = p.temperature, p.top_p
        self.top_k[r], self.key[r] = p.top_k_used, seed_to_key(p.seed)
        self.window[r:r + 1] = empty_window(1, self.device)
        self.frame_idx[r] = 0
        try:
            frame = self._prefill(r, torch.as_tensor(req.prompt).to(self.device, torch.long), req.prefix_len)
        except BaseException:
            self.release(r)
            raise
        T = req.prompt.shape[1]
        self.positions[r] = T
        self.cur[r], self.pos[r], self.frame_idx[r] = frame, T, 1
        return frame.cpu()

    def _prefill(self, r: int, prompt: Tensor, P: int) -> Tensor:
        slow, sl, T, start = self.model.slow, slice(r, r + 1), prompt.shape[1], 0
        if P:
            key = prefix_key(prompt[:, :P], self.model_tag)
            kv = self.prefix_cache.get(key)
            if kv is None:
                slow(prompt[None, :, :P], torch.arange(P, device=self.device)[None], sl, P, self.slow_cache)
                self.prefix_cache.put(key, torch.stack([torch.stack([c.k[r, :, :P], c.v[r, :, :P]])
                                                        for c in self.slow_cache]).clone())
            else:
                for i, c in enumerate(self.slow_cache):
                    c.k[r, :, :P] = kv[i, 0]
                    c.v[r, :, :P] = kv[i, 1]
            start = P
        hidden = slow(prompt[None, :, start:], torch.arange(start, T, device=self.device)[None], sl, T,
                      self.slow_cache)[:, -1]
        return self._first_frame(r, hidden)

    def _first_frame(self, r: int, hidden: Tensor) -> Tensor:
        """A new request's first frame (no repetition window yet), made in the scratch row so that on
        CUDA it is one graph replay whatever row the request got."""
        s = self.cfg.max_active
        for buf in (self.temperature, self.top_p, self.top_k, self.key):
            buf[s] = buf[r]
        self.frame_idx[s] = 0
        self.scratch_hidden.copy_(hidden)
        if not self.use_graphs:
            return self._first_frame_body(self.top_ks[r])
        if "first" not in self._graphs:
            self._capture("first", self._first_frame_body)
        graph, out = self._graphs["first"]
        graph.replay()
        return out

    def _first_frame_body(self, k_max: int | None = None) -> Tensor:
        sl = slice(self.cfg.max_active, self.cfg.max_active + 1)
        return decode_frame(self.model, self.scratch_hidden, self._sampling(sl, k_max), self.frame_idx[sl], None,
                            self.audio_ids, self.fast_cache, sl, fast_ar=self.fast_ar)[0]

    def _sampling(self, sl: slice, k_max: int | None) -> BatchSampling:
        """Sampling state of a row range. Without graphs the host knows the largest top_k, which lets
        sampling skip sorting whole rows; a graph must not bake it in (k_max None)."""
        return BatchSampling(self.temperature[sl], self.top_p[sl], self.top_k[sl], self.key[sl], k_max)

    # ------------------------------------------------------------------ decode

    @torch.inference_mode()
    def step(self) -> Tensor:
        """One batched frame for every active row; advances their state and returns the frames
        [n, num_codebooks + 1] on the host."""
        n = self.n_active
        frames = self._decode(n)
        self.cur[:n] = frames
        self.pos[:n] += 1
        self.frame_idx[:n] += 1
        self.window[:n] = torch.cat([self.window[:n, 1:], frames[:, :1]], dim=1)
        self.positions = [p + 1 for p in self.positions]
        return frames.cpu()

    def _step_body(self, n: int, kv_len: int, k_max: int | None = None) -> Tensor:
        """One batched frame for rows 0..n-1 from the static state buffers (graph-capturable: no host sync)."""
        sl = slice(0, n)
        hidden = self.model.slow(self.cur[sl, :, None], self.pos[sl, None], sl, kv_len, self.slow_cache)[:, 0]
        return decode_frame(self.model, hidden, self._sampling(sl, k_max), self.frame_idx[sl], self.window[sl],
                            self.audio_ids, self.fast_cache, sl, fast_ar=self.fast_ar)

    def _decode(self, n: int) -> Tensor:
        kv_len = max(self.positions) + 1
        if not self.use_graphs:
            return self._step_body(n, kv_len, max(self.top_ks))
        nb = _bucket(n, self.graph_sizes)
        kb = min(self.cfg.max_seq_len, max(self.cfg.min_kv_bucket, 1 << (kv_len - 1).bit_length()))
        if (nb, kb) not in self._graphs:
            self._capture_step(nb, kb)
        graph, out = self._graphs[(nb, kb)]
        graph.replay()
        return out[:n]

    def capture_graphs(self, max_batch: int, max_kv: int) -> int:
        """Capture the decode graphs for every bucket up to (max_batch, max_kv) now, so that no request
        pays for a capture later (call when idle, e.g. at server start). Returns the number captured."""
        if not self.use_graphs:
            return 0
        kvs, kb = [], self.cfg.min_kv_bucket
        while True:
            kvs.append(min(kb, self.cfg.max_seq_len))
            if kb >= min(max_kv, self.cfg.max_seq_len):
                break
            kb *= 2
        with torch.inference_mode():
            if "first" not in self._graphs:
                self._capture("first", self._first_frame_body)
            for nb in (s for s in self.graph_sizes if s <= _bucket(min(max_batch, self.cfg.max_active), self.graph_sizes)):
                for kv in kvs:
                    if (nb, kv) not in self._graphs:
                        self._capture_step(nb, kv)
        return len(self._graphs)

    def _capture_step(self, nb: int, kb: int) -> None:
        self.pos[self.n_active:nb] = 0  # padding rows: free slots, write KV at their position 0 only
        self._capture((nb, kb), lambda: self._step_body(nb, kb))

    def _capture(self, key: object, body: Callable[[], Tensor]) -> None:
        """Warm up on a side stream, then capture ``body`` into a graph sharing one memory pool.

        Running a body more than once is harmless: active rows rewrite the same KV entries and the
        other state is only advanced outside the body."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = body()
        self._graphs[key] = (graph, out)

    # ------------------------------------------------------------------ slot release

    @torch.inference_mode()
    def release(self, r: int) -> None:
        """Free row r; the last active row moves into its place (KV up to its position, and its state)."""
        last = self.n_active - 1
        if r != last:
            n_kv = self.positions[last]
            for c in self.slow_cache:
                c.k[r, :, :n_kv] = c.k[last, :, :n_kv]
                c.v[r, :, :n_kv] = c.v[last, :, :n_kv]
            for buf in (self.cur, self.pos, self.frame_idx, self.window, self.temperature, self.top_p,
                        self.top_k, self.key):
                buf[r] = buf[last]
            self.positions[r], self.top_ks[r] = self.positions[last], self.top_ks[last]
        self.positions.pop()
        self.top_ks.pop()
        self.pos[last] = 0  # a free row may still be computed as CUDA-graph padding: keep its writes in range
