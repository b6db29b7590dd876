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
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import Tensor

from ..dual_ar import DualAR, FastARRuntime, decode_frame
from ..prefix_cache import PrefixCache, prefix_key
from ..request import EngineRequest
from ..sampling import BatchSampling, empty_window, seed_to_key
from .config import EngineConfig

log = logging.getLogger(__name__)


@dataclass
class _Prefill:
    """A row's tokens not yet in its KV, and the batch they start."""
    tokens: Tensor                    # [rows, T] on the device
    key: int                          # the batch's noise key
    store: tuple[str, int] | None = None   # (prefix key, P): a voice prefix to cache once the row reaches P
    done: int = 0                     # tokens of it already prefilled


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


def allow_recompiles(n: int) -> None:
    """Let a function compiled by :func:`compile_step` take n static shapes (with slack): past dynamo's
    recompile limit (default 8) a fullgraph compile fails hard."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, n + 64)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * (n + 64))


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
        self.seeds: list[int] = []       # each active row's seed (a dialogue's later batches derive their noise key)
        self.pending: list[_Prefill | None] = []   # each active row's tokens still to prefill
        self.prefill_tokens = 0          # prompt tokens run through the slow AR (cached voice prefixes excluded)
        self.prefix_cache = PrefixCache(cfg.prefix_cache_bytes)
        self.use_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.graph_sizes = tuple(s for s in cfg.graph_batch_sizes if s < B) + (B,)
        self.kv_buckets = self._kv_buckets(cfg.max_seq_len)
        # prefill chunks in graphs: padded to a length bucket (16, doubling, up to the longest chunk); their
        # KV read is the prompt's bucket (a dialogue's later turns, past it: the whole slot)
        longest = min(cfg.prefill_chunk_tokens or cfg.max_prompt_tokens, cfg.max_prompt_tokens)
        self.prefill_buckets = tuple(b for b in (16 << i for i in range(longest.bit_length())) if b < longest) + (longest,)
        self.prefill_kv = (_bucket(cfg.max_prompt_tokens, self.kv_buckets), cfg.max_seq_len)
        self.chunk_tokens = z(rows, longest)
        self.chunk_pos = z(longest)
        self.chunk_row, self.chunk_last = z(1), z(1)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._host_frames: list[Tensor] | None = None
        self._flip = 0
        self._graph_pool = None
        self.build_s: dict[tuple, float] = {}   # bucket -> seconds its compile and/or capture took
        if cfg.compile == "on" and fast_ar is not None:
            raise ValueError("engine.compile: 'on' needs the torch fast AR (another runtime cannot be compiled)")
        self.compiled = fast_ar is None and (cfg.compile == "on" or
                                             (cfg.compile == "auto" and self.device.type == "cuda"))
        self._step_fn, self._first_fn, self._prefill_fn = self._step_body, self._first_frame_body, self._prefill_body
        if self.compiled:
            model.fuse_weights()
            # one compile per (batch, KV) and (prefill length, KV) bucket
            allow_recompiles((len(self.graph_sizes) + len(self.prefill_buckets)) * len(self.kv_buckets))
            self._step_fn, self._first_fn = compile_step(self._step_body), compile_step(self._first_frame_body)
            self._prefill_fn = compile_step(self._prefill_body)

    @property
    def n_active(self) -> int:
        return len(self.positions)

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def admit(self, req: EngineRequest, key: int | None = None) -> Tensor:
        """Prefill a request into the next free row at once; returns its first frame [num_codebooks + 1]
        (host). ``key``: its noise key, if not the one of its seed (replaying a recorded noise stream)."""
        r = self.begin(req, key)
        try:
            return self.prefill(r)[1]
        except BaseException:
            self.release(r)
            raise

    @torch.inference_mode()
    def begin(self, req: EngineRequest, key: int | None = None) -> int:
        """Take the next free row for a request: its sampling state set, a cached voice prefix copied into
        its KV (one copy per layer); the rest of its prompt waits for :meth:`prefill`. Returns the row."""
        r, p = self.n_active, req.params
        self.positions.append(0)
        self.top_ks.append(p.top_k_used)
        self.seeds.append(p.seed)
        self.pending.append(None)
        self.temperature[r], self.top_p[r], self.top_k[r] = p.temperature, p.top_p, p.top_k_used
        try:
            prompt, P = torch.as_tensor(req.prompt).to(self.device, torch.long), req.prefix_len
            store, start = None, 0
            if P:
                pkey = prefix_key(prompt[:, :P], self.model_tag)
                kv = self.prefix_cache.get(pkey)
                if kv is None:
                    store = (pkey, P)
                else:
                    for i, c in enumerate(self.slow_cache):
                        c.kv[:, r, :, :P] = kv[i]
                    start = P
            self.positions[r] = start
            self.pos[r] = start   # until its first frame the row is held: padding writes land where prefill goes next
            self.pending[r] = _Prefill(prompt[:, start:], seed_to_key(p.seed) if key is None else key, store)
        except BaseException:
            self.release(r)
            raise
        return r

    def extend(self, r: int, tokens, turn: int) -> None:
        """A dialogue's next turn batch in row r: ``tokens`` [rows, t] (the segment after the batch that
        just ended) wait for :meth:`prefill` at the row's position; the batch then starts as upstream
        ``generate_long`` starts each one: noise key of seed + ``turn``, frame numbers from 0, an empty
        repetition window. The frame that ended the last batch (<|im_end|>, or the last one of its budget)
        was never fed, so the sequence is exactly upstream's re-prefilled history."""
        self.pending[r] = _Prefill(torch.as_tensor(tokens).to(self.device, torch.long), seed_to_key(self.seeds[r] + turn))
        self.pos[r] = self.positions[r]

    @torch.inference_mode()
    def prefill(self, r: int, budget: int | None = None) -> tuple[int, Tensor | None]:
        """Row r's pending tokens into its KV, in chunks of at most ``engine.prefill_chunk_tokens`` that
        never cross the end of a voice prefix (stored in the prefix cache once computed), while whole
        chunks fit in ``budget`` tokens (None: all; at least one chunk always runs). Returns (tokens run,
        the batch's first frame on the host once nothing is pending, else None)."""
        job, ran = self.pending[r], 0
        while job.done < job.tokens.shape[1]:
            n = job.tokens.shape[1] - job.done
            if job.store is not None and self.positions[r] < job.store[1]:
                n = min(n, job.store[1] - self.positions[r])
            n = min(n, self.cfg.prefill_chunk_tokens or n)
            if ran and budget is not None and ran + n > budget:
                return ran, None
            hidden = self._prefill_chunk(r, job.tokens[:, job.done:job.done + n])
            job.done, ran = job.done + n, ran + n
            self.positions[r] += n
            self.pos[r] = self.positions[r]
            if job.store is not None and self.positions[r] == job.store[1]:
                P = job.store[1]
                self.prefix_cache.put(job.store[0], torch.stack([c.kv[:, r, :, :P] for c in self.slow_cache]).clone())
        self.pending[r] = None
        return ran, self._start_batch(r, hidden, job.key)

    def _prefill_chunk(self, r: int, tokens: Tensor) -> Tensor:
        """``tokens`` [rows, t] into row r's KV at its position; the last token's hidden state [1, dim].
        Eager: exactly t tokens. In graphs (or compiled): padded to the chunk's length bucket, in the
        graph of (length bucket, KV bucket) that serves any row; the padding writes KV only past the
        chunk's end (clamped to the last slot position), where the real tokens that come later write."""
        t = tokens.shape[1]
        start, end = self.positions[r], self.positions[r] + t
        self.prefill_tokens += t
        if not (self.use_graphs or self.compiled):
            return self.model.slow(tokens[None], torch.arange(start, end, device=self.device)[None], slice(r, r + 1),
                                   end, self.slow_cache)[:, -1]
        tb = _bucket(t, self.prefill_buckets)
        self.chunk_tokens[:, :t] = tokens
        torch.arange(start, start + tb, out=self.chunk_pos[:tb]).clamp_(max=self.cfg.max_seq_len - 1)
        self.chunk_row.fill_(r)
        self.chunk_last.fill_(t - 1)
        return self._run(("prefill", tb, _bucket(end, self.prefill_kv)))

    def _prefill_body(self, t: int, kv_len: int) -> Tensor:
        """A prefill chunk of length bucket t from the static chunk buffers (graph-capturable)."""
        pos = self.chunk_pos[None, :t]
        hidden = self.model.slow(self.chunk_tokens[None, :, :t], pos, self.chunk_row, kv_len, self.slow_cache)
        return hidden[0].index_select(0, self.chunk_last)

    def _start_batch(self, r: int, hidden: Tensor, key: int) -> Tensor:
        """Row r's first frame of a batch from the prefill's last hidden state; its decode state set to
        feed that frame next."""
        self.key[r] = key
        self.window[r:r + 1] = empty_window(1, self.device)
        self.frame_idx[r] = 0
        frame = self._first_frame(r, hidden)
        self.cur[r], self.pos[r], self.frame_idx[r] = frame, self.positions[r], 1
        return frame.cpu()

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

    def step(self, held: list[int] = ()) -> Tensor:
        """One batched frame for every active row; advances their state and returns the frames
        [n, num_codebooks + 1] on the host. ``held`` rows (sessions waiting for text, rows still
        prefilling) are computed as padding and keep their position: their only write is KV at their next
        free position, which the prefill of their next tokens overwrites."""
        return self.launch(held)()

    @torch.inference_mode()
    def launch(self, held: list[int] = ()) -> Callable[[], Tensor]:
        """:meth:`step` without waiting: the step is queued on the device and its frames copied into
        pinned host memory without blocking; the returned function waits for them (a host copy of its
        own: the chunker keeps views of frames). The next step may be launched before it is called."""
        n = self.n_active
        frames = self._decode(n)
        self.cur[:n] = frames
        self.pos[:n] += 1
        self.frame_idx[:n] += 1
        self.window[:n] = torch.cat([self.window[:n, 1:], frames[:, :1]], dim=1)
        self.positions = [p + 1 for p in self.positions]
        for r in held:
            self.pos[r] -= 1
            self.positions[r] -= 1
        if self.device.type != "cuda":
            frames = frames.clone()
            return lambda: frames
        if self._host_frames is None:   # two pinned buffers: one being read while the next step copies
            self._host_frames = [torch.empty(self.cur.shape, dtype=torch.long, pin_memory=True) for _ in range(2)]
        host = self._host_frames[self._flip][:n]
        self._flip ^= 1
        host.copy_(frames, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def result() -> Tensor:
            copied.synchronize()
            return host.clone()
        return result

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
        if key[0] == "prefill":
            return lambda: self._prefill_fn(*key[1:])
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
        if isinstance(key[0], int):
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
        and the sampling buckets of ``top_ks``, and the prompt's prefill chunks, now, so that no request
        pays for them later (call when idle, e.g. at server start). Returns the number of graphs."""
        if not self.use_graphs:
            return 0
        ks = dict.fromkeys(k_bucket([k], self.cfg.sample_k_max) for k in top_ks)
        top = _bucket(min(max_batch, self.cfg.max_active), self.graph_sizes)
        keys = [("prefill", t, self.prefill_kv[0]) for t in reversed(self.prefill_buckets)] + [  # largest first:
            ("first", k) for k in ks] + [                                        # smaller graphs reuse its pool
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
        # thread_local: another thread (a codec decoding on its own stream) may keep working during a capture
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
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
                c.kv[:, r, :, :n_kv] = c.kv[:, last, :, :n_kv]
            for buf in (self.cur, self.pos, self.frame_idx, self.window, self.temperature, self.top_p,
                        self.top_k, self.key):
                buf[r] = buf[last]
            for host in (self.positions, self.top_ks, self.seeds, self.pending):
                host[r] = host[last]
        for host in (self.positions, self.top_ks, self.seeds, self.pending):
            host.pop()
        self.pos[last] = 0  # a free row may still be computed as CUDA-graph padding: keep its writes in range
