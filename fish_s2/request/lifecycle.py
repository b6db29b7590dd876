"""One request lifecycle for every engine: admission, events, cancellation, exactly one Finished.

An engine opens a :class:`Live` per request (refused at once when closed or full), pushes each
generated frame through :meth:`Lifecycle.frame` (counted, chunked, sent), and ends it with
:meth:`Lifecycle.finish`, which is idempotent and thread-safe: whichever path ends a request first
(end of speech, frame limit, cancel, error, shutdown) sends the one Finished; later calls and late
chunks are dropped. Every sink call is guarded: a sink that raises (client gone) cancels its own
request and never reaches the engine's thread. Cancellation is owned here: :meth:`cancel` marks the
request and tells the engine (``on_cancel``), and :meth:`poll_cancelled` asks each request's
``is_cancelled`` (e.g. Triton's response sender) at most once per ``check_period_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .chunks import Chunker
from .errors import Busy, Cancelled, InvalidArgument, RequestError, Unavailable, client_gone
from .events import ChunkEvent, Event, Finished, RequestHandle
from .params import ChunkPlan, EngineRequest

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Live:
    """One request in flight."""

    req: EngineRequest
    sink: Callable[[Event], None]
    chunker: Chunker
    max_frames: int                       # per turn batch (one batch unless the request has turns)
    max_total_frames: int                 # the whole request (the engine's max_frames)
    t_submit: float = field(default_factory=time.perf_counter)
    n_frames: int = 0                     # frames sent (chunked)
    turn: int = 0                         # the batch being generated (0 = the prompt's)
    turn_frames: int = 0                  # frames generated in it (its dropped last frame included)
    prompt_tokens: int = 0                # every segment's tokens so far (the engine's KV budget)
    appended: deque = field(default_factory=deque)   # a session's segments not started yet
    input_ended: bool = True              # a session: False until its input is ended
    parked: bool = False                  # a session between batches, waiting for its next segment
    parked_at: float = 0.0                # since when (time.monotonic())
    held_frame: object = None             # a parked batch's last frame at its budget: sent only if no batch follows
    prefilling: bool = False              # its prompt or next segment is going into its KV (no frames meanwhile)
    cancel_requested: bool = False
    done: bool = False
    engine_state: object = None           # the engine's own handle on the request (e.g. a result object)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def request_id(self) -> str:
        return self.req.request_id


class Lifecycle:
    def __init__(self, max_in_flight: int, default_plan: ChunkPlan, max_frames: int,
                 on_cancel: Callable[[Live], None] = lambda live: None, check_period_s: float = 0.0):
        self.max_in_flight, self.default_plan, self.max_frames = max_in_flight, default_plan, max_frames
        self.check_period_s = check_period_s
        self._on_cancel = on_cancel
        self._live: dict[str, Live] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._last_poll = float("-inf")
        self.frames_generated = 0

    # ------------------------------------------------------------------ admission

    def open(self, req: EngineRequest, sink: Callable[[Event], None] | None) -> tuple[Live, RequestHandle | None]:
        """Register a request; Unavailable when closed, Busy when full, InvalidArgument for a reused id."""
        handle = None
        if sink is None:
            handle = RequestHandle(req.request_id, self.cancel)
            sink = handle.put
        live = Live(req, sink, Chunker(req.chunk_plan or self.default_plan), req.max_frames or self.max_frames,
                    self.max_frames, input_ended=not req.open_input)
        with self._lock:
            if self._closed:
                raise Unavailable("the engine is shutting down; retry on another server")
            if req.request_id in self._live:
                raise InvalidArgument("request_id", f"{req.request_id!r} is already in flight")
            if len(self._live) >= self.max_in_flight:
                raise Busy(f"busy: {len(self._live)} requests in flight (limit {self.max_in_flight}); retry later")
            self._live[req.request_id] = live
        return live, handle

    def close(self) -> None:
        """Refuse new requests from now on."""
        with self._lock:
            self._closed = True

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def get(self, request_id: str) -> Live | None:
        with self._lock:
            return self._live.get(request_id)

    def lives(self) -> list[Live]:
        with self._lock:
            return list(self._live.values())

    # ------------------------------------------------------------------ cancellation

    def cancel(self, request_id: str) -> bool:
        """Mark a request cancelled and tell the engine; False if it is not in flight."""
        with self._lock:
            live = self._live.get(request_id)
            if live is None or live.cancel_requested:
                return live is not None
            live.cancel_requested = True
        try:
            self._on_cancel(live)
        except Exception:
            log.exception("cancelling request %s failed", request_id)
        return True

    def poll_cancelled(self) -> None:
        """Ask every request's ``is_cancelled`` (at most once per period); a check that raises counts as
        cancelled (a dead client connection)."""
        now = time.monotonic()
        if now - self._last_poll < self.check_period_s:
            return
        self._last_poll = now
        for live in self.lives():
            if live.req.is_cancelled is None or live.cancel_requested:
                continue
            with live.lock:     # never after its Finished (a Triton sender is freed once its FINAL is out)
                if live.done:
                    continue
                gone = client_gone(live.req.is_cancelled)
            if gone:
                self.cancel(live.request_id)

    # ------------------------------------------------------------------ events

    def frame(self, live: Live, codes: np.ndarray) -> None:
        """One generated frame's codes [num_codebooks]: counted, chunked, a chunk sent when complete."""
        live.n_frames += 1
        self.frames_generated += 1
        chunk = live.chunker.push(codes)
        if chunk is not None:
            self.send(live, ChunkEvent(live.request_id, chunk, time.perf_counter() - live.t_submit, live.turn))

    def send(self, live: Live, event: ChunkEvent) -> None:
        with live.lock:
            if live.done:
                return
            ok = self._deliver(live, event)
        if not ok:
            self.cancel(live.request_id)

    def finish(self, live: Live, reason: str, error: RequestError | None = None) -> bool:
        """End a request (once: False if it had ended already). "stop" and "length" send the pending
        frames as a last chunk first; "cancelled" carries a Cancelled error unless given another one
        (a stopped stream must never look complete)."""
        if reason == "cancelled" and error is None:
            error = Cancelled("the request was stopped before it ended")
        with live.lock:
            if live.done:
                return False
            live.done = True
            with self._lock:
                self._live.pop(live.request_id, None)
            try:
                last = live.chunker.flush() if reason in ("stop", "length") else None
                if last is not None:
                    self._deliver(live, ChunkEvent(live.request_id, last, time.perf_counter() - live.t_submit,
                                                   live.turn))
            finally:
                self._deliver(live, Finished(live.request_id, reason, live.n_frames, error))
        return True

    def finish_all(self, reason: str, error: RequestError | None = None) -> int:
        """End every request in flight; how many were ended."""
        return sum(self.finish(live, reason, error) for live in self.lives())

    @staticmethod
    def _deliver(live: Live, event: Event) -> bool:
        try:
            live.sink(event)
            return True
        except Exception:  # a broken sink (client gone) must not take the engine down
            log.exception("sink failed for request %s", live.request_id)
            return False
