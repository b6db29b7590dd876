"""The device side of the batched engine: buffers, KV caches, prefill, voice prefix cache, the
batched decode step and its CUDA graphs.

Rows are KV slots. Active requests always occupy rows 0..n-1, so a step reads the cache through
views; when a request leaves, the last row moves into its place (:meth:`TorchRunner.release`). The
runner owns its KV caches (the model module holds none), so two users of one model never share
them. On CUDA the decode step runs as a CUDA graph per (batch bucket, KV-length bucket, sampling
bucket), and a new request's first frame as one graph made in a scratch row, captured on first use
from static buffers. In graphs a step samples among ``sample_k_max`` candidates when every active top_k
fits, else it uses a full-sort variant. With ``compile`` the step body is compiled by torch.compile
(inductor, one static graph per bucket) and that compiled code is what the CUDA graphs capture (on the
CPU it runs directly); the full-sort variant stays eager.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..dual_ar import DualAR, FastARRuntime, decode_frame
from ..prefix_cache import PrefixCache, prefix_key
from ..request import EngineRequest
from ..sampling import BatchSampling, empty_window, seed_to_key
from .config import EngineConfig

log = logging.getLogger(__name__)


def _bucket(n: int, sizes) -> int:
    return next(s for s in sizes if s >= n)


def k_bucket(top_ks: list[int], k_max: int) -> int | None:
    """The candidate bound a bucketed step samples with: ``k_max`` when every top_k fits in it (the same
    samples as a full sort), else None (full sort)."""
    return k_max if k_max and max(top_ks) <= k_max else None


def compile_step(fn: Callable) -> Callable:
    """torch.compile as the runner uses it: inductor (default mode: plain kernels that our own CUDA
    graphs capture; never reduce-overhead), the whole body as one graph, static shapes (each bucket
    compiles once), eager's bf16 rounding points kept (RMSNorm casts before the weight multiply)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})


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
        self.kv_buckets = self._kv_buckets(cfg.max_seq_len)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._graph_pool = None
        self.build_s: dict[tuple, float] = {}   # bucket -> seconds its compile and/or capture took
        if cfg.compile == "on" and fast_ar is not None:
            raise ValueError("engine.compile: 'on' needs the torch fast AR (another runtime cannot be compiled)")
        self.compiled = fast_ar is None and (cfg.compile == "on" or
                                             (cfg.compile == "auto" and self.device.type == "cuda"))
        self._step_fn, self._first_fn = self._step_body, self._first_frame_body
        if self.compiled:
            model.fuse_weights()
            limit = len(self.graph_sizes) * len(self.kv_buckets) + 64  # one compile per (batch, KV) bucket
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, limit)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * limit)
            self._step_fn, self._first_fn = compile_step(self._step_body), compile_step(self._first_frame_body)

    @property
    def n_active(self) -> int:
        return len(self.positions)

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def admit(self, req: EngineRequest, key: int | None = None) -> Tensor:
        """Prefill a request into the next free row; returns its first frame [num_codebooks + 1] (host).
        ``key``: its noise key, if not the one of its seed (replaying a recorded noise stream)."""
        r, p = self.n_active, req.params
        self.positions.append(0)
        self.top_ks.append(p.top_k_used)
        self.temperature[r], self.top_p[r] = p.temperature, p.top_p
        self.top_k[r], self.key[r] = p.top_k_used, seed_to_key(p.seed) if key is None else key
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
        if not (self.use_graphs or self.compiled):
            return self._first_frame_body(self.top_ks[r])
        return self._run(("first", k_bucket(self.top_ks[r:r + 1], self.cfg.sample_k_max)))

    def _first_frame_body(self, k_max: int | None = None) -> Tensor:
        sl = slice(self.cfg.max_active, self.cfg.max_active + 1)
        return decode_frame(self.model, self.scratch_hidden, self._sampling(sl, k_max), self.frame_idx[sl], None,
                            self.audio_ids, self.fast_cache, sl, fast_ar=self.fast_ar)[0]

    def _sampling(self, sl: slice, k_max: int | None) -> BatchSampling:
        """Sampling state of a row range; ``k_max`` (a host-known bound on every row's top_k, part of a
        graph's key) samples among that many candidates instead of sorting whole rows."""
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

    def _kv_buckets(self, max_kv: int) -> list[int]:
        """KV-length buckets: min_kv_bucket, doubling, up to the bucket holding max_kv (cut at max_seq_len)."""
        kvs, kb = [], self.cfg.min_kv_bucket
        while True:
            kvs.append(min(kb, self.cfg.max_seq_len))
            if kb >= min(max_kv, self.cfg.max_seq_len):
                return kvs
            kb *= 2

    def step_key(self, n: int) -> tuple[int, int, int | None]:
        """The bucket a step of the n active rows runs in: (rows, KV length read, sampling candidates)."""
        kv_len = max(self.positions) + 1
        return (_bucket(n, self.graph_sizes), next(k for k in self.kv_buckets if k >= kv_len),
                k_bucket(self.top_ks, self.cfg.sample_k_max))

    def _decode(self, n: int) -> Tensor:
        if not (self.use_graphs or self.compiled):
            return self._step_body(n, max(self.positions) + 1, max(self.top_ks))
        return self._run(self.step_key(n))[:n]   # padding rows: free slots at position 0 (see release)

    def _body(self, key: tuple) -> Callable[[], Tensor]:
        """A bucket's function: compiled when compiling, except the rare full-sort fallback (eager in its
        graph: no compile for it at startup, none when a large top_k first arrives)."""
        first = key[0] == "first"
        if key[-1] is None:
            return (lambda: self._first_frame_body(None)) if first else (lambda: self._step_body(*key))
        return (lambda: self._first_fn(key[1])) if first else (lambda: self._step_fn(*key))

    def _run(self, key: tuple) -> Tensor:
        """Run a bucket: its graph's replay, or on the CPU its (compiled) function."""
        if key not in self.build_s:
            self._build(key)
        if not self.use_graphs:
            return self._body(key)()
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _build(self, key: tuple) -> None:
        """A bucket's first use: compile it (with compile) and capture its graph (with graphs) now; the
        time that took is kept in ``build_s``."""
        t = time.perf_counter()
        if key[0] != "first":
            self.pos[self.n_active:key[0]] = 0  # padding rows: free slots, write KV at their position 0 only
        if self.use_graphs:
            self._capture(key, self._body(key))
        else:
            self._body(key)()   # compiles; running a body once more is harmless (see _capture)
        self.build_s[key] = time.perf_counter() - t
        log.info("decode bucket %s ready in %.1f s (%s)", key, self.build_s[key],
                 "+".join(w for w, on in (("compiled", self.compiled and key[-1] is not None),
                                          ("graph", self.use_graphs)) if on) or "eager")

    def capture_graphs(self, max_batch: int, max_kv: int, top_ks: tuple[int, ...] = (1, 1 << 30)) -> int:
        """Capture (and, with compile, compile) the decode graphs for every bucket up to (max_batch, max_kv)
        and the sampling buckets of ``top_ks`` now, so that no request pays for them later (call when
        idle, e.g. at server start). Returns the number of graphs."""
        if not self.use_graphs:
            return 0
        ks = dict.fromkeys(k_bucket([k], self.cfg.sample_k_max) for k in top_ks)
        top = _bucket(min(max_batch, self.cfg.max_active), self.graph_sizes)
        keys = [("first", k) for k in ks] + [  # largest first: smaller graphs reuse its pool
            (nb, kv, k) for nb in reversed([s for s in self.graph_sizes if s <= top])
            for kv in reversed(self._kv_buckets(max_kv)) for k in ks]
        with torch.inference_mode():
            for key in keys:
                if key not in self.build_s:
                    self._build(key)
        return len(self._graphs)

    def _capture(self, key: tuple, body: Callable[[], Tensor]) -> None:
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
