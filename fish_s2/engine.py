"""The streaming engine: many requests in one batched Dual-AR decode loop.

Requests can be submitted from any thread at any time. One loop thread admits queued requests
(prefill into a free KV slot, reusing a cached voice prefix when it can) and runs one batched decode
step for all active requests: the slow AR at per-request positions, then the fast AR batched over
requests, with per-request sampling parameters and noise keys. Each request's frames are grouped by
its :class:`~fish_s2.streaming.ChunkPlan` and streamed to its sink as code chunks; every request
ends with exactly one :class:`Finished` event (end of speech, frame limit, cancel or error), and its
slot is freed on that same path.

Active requests always occupy KV slots 0..n-1, so a step reads the cache through views; when a
request leaves, the last row moves into its slot. On CUDA the decode step runs as a CUDA graph per
(batch bucket, KV-length bucket), captured on first use from static buffers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import DualARConfig
from .dual_ar import DualAR, FastARRuntime, decode_frame
from .prefix_cache import PrefixCache, prefix_key
from .sampling import RAS_WINDOW, BatchSampling, SamplingParams, seed_to_key
from .streaming import ChunkPlan, Chunker, CodeChunk

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that can never be served as given (maps to Triton INVALID_ARG)."""


class EngineBusy(RuntimeError):
    """The engine cannot take the request now (queue full or shutting down); retry later."""


@dataclass(frozen=True)
class EngineConfig:
    max_active: int = 16                 # requests decoded together (= KV slots)
    max_queued: int = 64                 # waiting for a slot; more is refused at once
    max_prompt_tokens: int = 2048
    max_frames: int = 1024               # per request (1024 frames = 47.6 s)
    prefix_cache_bytes: int = 256 << 20
    chunk_plan: ChunkPlan = ChunkPlan()
    cuda_graphs: bool = True             # CUDA only
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    min_kv_bucket: int = 256

    @property
    def max_seq_len(self) -> int:
        return self.max_prompt_tokens + self.max_frames

    def validate(self, model_max_seq_len: int) -> "EngineConfig":
        for name in ("max_active", "max_queued", "max_prompt_tokens", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.max_seq_len > model_max_seq_len:
            raise ValueError(f"max_prompt_tokens + max_frames = {self.max_seq_len} exceeds the model's "
                             f"max_seq_len {model_max_seq_len}")
        self.chunk_plan.validate()
        return self


@dataclass
class EngineRequest:
    prompt: Tensor                        # [num_codebooks + 1, T]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_frames: int | None = None         # None: the engine's limit
    prefix_len: int = 0                   # leading prompt columns that form a cacheable voice prefix
    chunk_plan: ChunkPlan | None = None   # None: the engine's plan
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    is_cancelled: Callable[[], bool] | None = None  # polled once per step (e.g. Triton's response_sender)


@dataclass
class ChunkEvent:
    request_id: str
    chunk: CodeChunk
    seconds_since_submit: float


@dataclass
class Finished:
    request_id: str
    reason: str                # "stop" (end of speech), "length", "cancelled", "error"
    n_frames: int
    error: str | None = None


Event = ChunkEvent | Finished


class RequestHandle:
    """Iterate the events of one request (the default sink)."""

    def __init__(self, request_id: str, engine: "Engine"):
        self.request_id = request_id
        self._engine = engine
        self._events: queue.Queue[Event] = queue.Queue()

    def put(self, event: Event) -> None:
        self._events.put(event)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, Finished):
                return

    def cancel(self) -> None:
        self._engine.cancel(self.request_id)


@dataclass
class _Row:
    req: EngineRequest
    sink: Callable[[Event], None]
    chunker: Chunker
    max_frames: int
    t_submit: float
    top_k: int             # effective (1 when greedy)
    pos: int = 0           # position of the frame column fed to the next step
    n_frames: int = 0


def _bucket(n: int, sizes) -> int:
    return next(s for s in sizes if s >= n)


def validate_request(req: EngineRequest, cfg: EngineConfig, model_cfg: DualARConfig) -> None:
    """Everything about a request that can be checked before it runs (shared by every engine):
    shapes and limits, and value ranges -- on a GPU an out-of-range id is a device-side assert that
    kills the process."""
    p, rows = req.prompt, model_cfg.frame_rows
    if not isinstance(p, Tensor) or p.ndim != 2 or p.shape[0] != rows or p.dtype not in (torch.int32, torch.int64):
        raise RequestError(f"prompt: expected an integer tensor [{rows}, T], got "
                           f"{getattr(p, 'dtype', type(p))} {list(getattr(p, 'shape', []))}")
    if not 1 <= p.shape[1] <= cfg.max_prompt_tokens:
        raise RequestError(f"prompt: {p.shape[1]} tokens, the limit is max_prompt_tokens={cfg.max_prompt_tokens}")
    if int(p[0].min()) < 0 or int(p[0].max()) >= model_cfg.vocab_size:
        raise RequestError(f"prompt: token ids must be in [0, {model_cfg.vocab_size})")
    if int(p[1:].min()) < 0 or int(p[1:].max()) >= model_cfg.codebook_size:
        raise RequestError(f"prompt: codes must be in [0, {model_cfg.codebook_size})")
    if not 0 <= req.prefix_len < p.shape[1]:
        raise RequestError(f"prefix_len: must be in [0, {p.shape[1] - 1}], got {req.prefix_len}")
    if req.max_frames is not None and not 1 <= req.max_frames <= cfg.max_frames:
        raise RequestError(f"max_frames: must be in [1, {cfg.max_frames}], got {req.max_frames}")
    try:
        req.params.validate()
        if req.chunk_plan is not None:
            req.chunk_plan.validate(cfg.max_frames)
    except ValueError as e:
        raise RequestError(str(e)) from None


class Engine:
    def __init__(self, model: DualAR, config: EngineConfig = EngineConfig(), fast_ar: FastARRuntime | None = None):
        """``fast_ar``: run the fast AR with another runtime (e.g. ONNX Runtime on CPU) instead of torch."""
        self.model, self.cfg = model, config.validate(model.cfg.slow.max_seq_len)
        self.fast_ar = fast_ar
        w = model.slow.embeddings.weight
        self.device, self.dtype = w.device, w.dtype
        self.model_tag = f"{model.cfg}:{self.dtype}"
        B, rows = config.max_active, model.cfg.frame_rows
        model.slow.setup_cache(B, config.max_seq_len)
        model.fast.setup_cache(B + 1)  # row B: scratch row where a new request's first frame is made
        self.audio_ids = model.slow.audio_token_ids()
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=self.device)  # noqa: E731
        # per-row decode state, rows == KV slots, active rows are 0..n-1, row B = scratch (static buffers
        # for CUDA graphs)
        self.cur, self.pos, self.frame_idx = z(B + 1, rows), z(B + 1), z(B + 1)
        self.window = z(B + 1, RAS_WINDOW)
        self.temperature, self.top_p = z(B + 1, dt=torch.float32), z(B + 1, dt=torch.float32)
        self.top_k, self.key = z(B + 1), z(B + 1)
        self.scratch_hidden = z(1, model.cfg.slow.dim, dt=self.dtype)
        self.rows: list[_Row] = []
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
        self.frames_generated = 0
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"
        self.graph_sizes = tuple(s for s in config.graph_batch_sizes if s < B) + (B,)
        self._graphs: dict[object, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._graph_pool = None
        self._queue: deque[tuple[EngineRequest, Callable[[Event], None], float]] = deque()
        self._cancelled: set[str] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ public API (any thread)

    def submit(self, req: EngineRequest, sink: Callable[[Event], None] | None = None) -> RequestHandle | None:
        """Queue a request. Bad requests raise RequestError, a full queue EngineBusy, both at once.

        Events go to ``sink`` (called on the engine thread) or, without one, to the returned handle."""
        validate_request(req, self.cfg, self.model.cfg)
        handle = None
        if sink is None:
            handle = RequestHandle(req.request_id, self)
            sink = handle.put
        with self._cond:
            if self._stopping:
                raise EngineBusy("engine is shutting down")
            if len(self._queue) >= self.cfg.max_queued:
                raise EngineBusy(f"queue full: {len(self._queue)} requests waiting (max_queued="
                                 f"{self.cfg.max_queued}); retry later")
            self._queue.append((req, sink, time.perf_counter()))
            self._cond.notify()
        return handle

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="fish-s2-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still queued or running and join the loop thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._abort_all("cancelled", None)

    def stats(self) -> dict:
        with self._cond:
            queued = len(self._queue)
        return {"active": len(self.rows), "queued": queued, "frames_generated": self.frames_generated,
                "prefix_cache": self.prefix_cache.stats()}

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self.rows or self._cancelled or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """Handle cancels, admit queued requests into free slots, run one decode step."""
        self._drop_cancelled()
        while len(self.rows) < self.cfg.max_active:
            with self._cond:
                if not self._queue:
                    break
                req, sink, t = self._queue.popleft()
            self._admit(req, sink, t)
        if not self.rows:
            return
        n = len(self.rows)
        try:
            host = self.decode_step().cpu()
        except Exception as e:  # a failed step fails the requests in it, the engine keeps serving
            log.exception("decode step failed")
            self._abort_all("error", f"decode step failed: {e}")
            return
        for r in reversed(range(n)):
            self._on_frame(r, host[r])

    @torch.inference_mode()
    def decode_step(self) -> Tensor:
        """One batched frame for every active request; advances their state and returns the frames
        [n, num_codebooks + 1] on the device (``step`` turns them into events)."""
        n = len(self.rows)
        frames = self._decode(n)
        self._advance(n, frames)
        return frames

    def _drop_cancelled(self) -> None:
        with self._cond:
            ids = self._cancelled
            self._cancelled = set()
            kept = deque()
            for item in self._queue:
                if item[0].request_id in ids:
                    item[1](Finished(item[0].request_id, "cancelled", 0))
                else:
                    kept.append(item)
            self._queue = kept
        for r in reversed(range(len(self.rows))):
            row = self.rows[r]
            if row.req.request_id in ids or self._polled_cancel(row):
                self._finish(r, "cancelled")

    @staticmethod
    def _polled_cancel(row: _Row) -> bool:
        if row.req.is_cancelled is None:
            return False
        try:
            return bool(row.req.is_cancelled())
        except Exception:  # a dead client connection counts as cancelled
            return True

    def _abort_all(self, reason: str, error: str | None) -> None:
        with self._cond:
            queued, self._queue = list(self._queue), deque()
        for req, sink, _ in queued:
            sink(Finished(req.request_id, reason, 0, error))
        for r in reversed(range(len(self.rows))):
            self._finish(r, reason, error)

    # ------------------------------------------------------------------ prefill

    def _admit(self, req: EngineRequest, sink: Callable[[Event], None], t_submit: float) -> None:
        r = len(self.rows)
        p = req.params
        row = _Row(req, sink, Chunker(req.chunk_plan or self.cfg.chunk_plan), req.max_frames or self.cfg.max_frames,
                   t_submit, 1 if p.greedy else p.top_k)
        self.rows.append(row)
        self.temperature[r], self.top_p[r] = p.temperature, p.top_p
        self.top_k[r], self.key[r] = row.top_k, seed_to_key(p.seed)
        self.window[r] = 0
        self.frame_idx[r] = 0
        try:
            with torch.inference_mode():
                frame = self._prefill(r, req)
        except Exception as e:
            log.exception("prefill failed")
            self._finish(r, "error", f"prefill failed: {e}")
            return
        row.pos = req.prompt.shape[1]
        self.cur[r], self.pos[r], self.frame_idx[r] = frame, row.pos, 1
        self._on_frame(r, frame.cpu())

    def _prefill(self, r: int, req: EngineRequest) -> Tensor:
        slow, sl = self.model.slow, slice(r, r + 1)
        prompt = req.prompt.to(self.device, torch.long)
        T, P, start = prompt.shape[1], req.prefix_len, 0
        if P:
            key = prefix_key(prompt[:, :P], self.model_tag)
            kv = self.prefix_cache.get(key)
            if kv is None:
                slow(prompt[None, :, :P], torch.arange(P, device=self.device)[None], sl, P)
                self.prefix_cache.put(key, torch.stack(
                    [torch.stack([l.attention.kv_cache.k[r, :, :P], l.attention.kv_cache.v[r, :, :P]])
                     for l in slow.layers]).clone())
            else:
                for i, layer in enumerate(slow.layers):
                    layer.attention.kv_cache.k[r, :, :P] = kv[i, 0]
                    layer.attention.kv_cache.v[r, :, :P] = kv[i, 1]
            start = P
        hidden = slow(prompt[None, :, start:], torch.arange(start, T, device=self.device)[None], sl, T)[:, -1]
        return self._first_frame(r, hidden)

    def _first_frame(self, r: int, hidden: Tensor) -> Tensor:
        """A new request's first frame (no repetition window yet), made in the scratch row so that on
        CUDA it is one graph replay whatever slot the request got."""
        s = self.cfg.max_active
        for buf in (self.temperature, self.top_p, self.top_k, self.key):
            buf[s] = buf[r]
        self.frame_idx[s] = 0
        self.scratch_hidden.copy_(hidden)
        if not self.use_graphs:
            return self._first_frame_body()
        if "first" not in self._graphs:
            self._capture("first", self._first_frame_body)
        graph, out = self._graphs["first"]
        graph.replay()
        return out

    def _first_frame_body(self) -> Tensor:
        sl = slice(self.cfg.max_active, self.cfg.max_active + 1)
        return decode_frame(self.model, self.scratch_hidden, self._sampling(sl, [self.rows[-1]] if self.rows else []),
                            self.frame_idx[sl], None, self.audio_ids, sl, fast_ar=self.fast_ar)[0]

    def _sampling(self, sl: slice, rows: list[_Row]) -> BatchSampling:
        """Sampling state of a row range. Without graphs the host knows the largest top_k, which lets
        sampling skip sorting whole rows; a graph must not bake it in."""
        k_max = None if self.use_graphs or not rows else max(r.top_k for r in rows)
        return BatchSampling(self.temperature[sl], self.top_p[sl], self.top_k[sl], self.key[sl], k_max)

    # ------------------------------------------------------------------ decode

    def _step_body(self, n: int, kv_len: int) -> Tensor:
        """One batched frame for rows 0..n-1 from the static state buffers (graph-capturable: no host sync)."""
        sl = slice(0, n)
        hidden = self.model.slow(self.cur[sl, :, None], self.pos[sl, None], sl, kv_len)[:, 0]
        return decode_frame(self.model, hidden, self._sampling(sl, self.rows[:n]), self.frame_idx[sl],
                            self.window[sl], self.audio_ids, sl, fast_ar=self.fast_ar)

    def _decode(self, n: int) -> Tensor:
        kv_len = max(row.pos for row in self.rows[:n]) + 1
        if not self.use_graphs:
            return self._step_body(n, kv_len)
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
        self.pos[len(self.rows):nb] = 0  # padding rows: free slots, write KV at their position 0 only
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

    def _advance(self, n: int, frames: Tensor) -> None:
        self.cur[:n] = frames
        self.pos[:n] += 1
        self.frame_idx[:n] += 1
        self.window[:n] = torch.cat([self.window[:n, 1:], frames[:, :1]], dim=1)
        for row in self.rows[:n]:
            row.pos += 1

    # ------------------------------------------------------------------ output and slot release

    def _on_frame(self, r: int, frame: Tensor) -> None:
        row, cfg = self.rows[r], self.model.cfg
        if int(frame[0]) == cfg.eos_id:
            self._finish(r, "stop")
            return
        row.n_frames += 1
        self.frames_generated += 1
        chunk = row.chunker.push(frame[1:].clone())
        if chunk is not None:
            self._send(row, ChunkEvent(row.req.request_id, chunk, time.perf_counter() - row.t_submit))
        if row.n_frames >= row.max_frames:
            self._finish(r, "length")

    def _send(self, row: _Row, event: Event) -> None:
        try:
            row.sink(event)
        except Exception:  # a broken sink (client gone) must not take the loop down
            log.exception("sink failed for request %s", row.req.request_id)
            with self._cond:
                self._cancelled.add(row.req.request_id)

    def _finish(self, r: int, reason: str, error: str | None = None) -> None:
        row = self.rows[r]
        try:
            last = row.chunker.flush() if reason in ("stop", "length") else None
            if last is not None:
                self._send(row, ChunkEvent(row.req.request_id, last, time.perf_counter() - row.t_submit))
        finally:
            self._release(r)
            self._send(row, Finished(row.req.request_id, reason, row.n_frames, error))

    def _release(self, r: int) -> None:
        """Free row r; the last active row moves into its slot (KV up to its position, and its state)."""
        last = len(self.rows) - 1
        if r != last:
            n_kv = self.rows[last].pos
            for layer in self.model.slow.layers:
                c = layer.attention.kv_cache
                c.k[r, :, :n_kv] = c.k[last, :, :n_kv]
                c.v[r, :, :n_kv] = c.v[last, :, :n_kv]
            for buf in (self.cur, self.pos, self.frame_idx, self.window, self.temperature, self.top_p,
                        self.top_k, self.key):
                buf[r] = buf[last]
            self.rows[r] = self.rows[last]
        self.rows.pop()
        self.pos[last] = 0  # a free row may still be computed as CUDA-graph padding: keep its writes in range


def collect(handle: RequestHandle) -> tuple[list[CodeChunk], Finished]:
    """All chunks of a request and its Finished event (blocking)."""
    chunks, done = [], None
    for event in handle:
        if isinstance(event, ChunkEvent):
            chunks.append(event.chunk)
        else:
            done = event
    return chunks, done


def chunks_to_codes(chunks: list[CodeChunk]) -> Tensor:
    """Reassemble the frames of a request's chunks: codes [num_codebooks, n_frames]."""
    return torch.cat([c.codes[:, c.context:] for c in chunks], dim=1) if chunks else torch.zeros(0, 0)

