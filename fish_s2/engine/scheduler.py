"""The streaming engine's scheduler: many requests in one batched Dual-AR decode loop.

Requests are submitted from any thread at any time (refused at once when invalid, busy or stopping).
One loop thread admits queued requests into free rows of the :class:`~fish_s2.engine.runner.TorchRunner`
(prefill, reusing a cached voice prefix when it can) and runs one batched decode step for all active
requests. Each request lives in a :class:`~fish_s2.request.Lifecycle`: frames become chunks by its
plan, cancellation (explicit, or polled from the client) ends it at the next step, and every request
ends with exactly one Finished on whichever path ends it first, its row freed on that same path.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from ..config import DualARConfig
from ..dual_ar import DualAR, FastARRuntime
from ..request import Event, EngineRequest, Internal, Lifecycle, Live, RequestError, RequestHandle, Unavailable
from .config import EngineConfig, check_request
from .runner import TorchRunner

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: DualAR, config: EngineConfig = EngineConfig(), fast_ar: FastARRuntime | None = None):
        self.cfg: EngineConfig = config.validate(model.cfg.slow.max_seq_len)
        self.model_cfg: DualARConfig = model.cfg
        self.runner = TorchRunner(model, self.cfg, fast_ar)
        self.lifecycle = Lifecycle(self.cfg.max_in_flight, self.cfg.chunk_plan, self.cfg.max_frames,
                                   on_cancel=lambda live: self._wake(), check_period_s=self.cfg.cancel_check_ms / 1000)
        self.rows: list[Live] = []          # rows[r] is served by the runner's row r
        self._queue: deque[Live] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ public API (any thread)

    def submit(self, req: EngineRequest, sink: Callable[[Event], None] | None = None) -> RequestHandle | None:
        """Queue a request: InvalidArgument, Busy or Unavailable at once, else its events go to ``sink``
        (called on the engine thread) or, without one, to the returned handle."""
        check_request(req, self.cfg, self.model_cfg)
        live, handle = self.lifecycle.open(req, sink)
        with self._cond:
            self._queue.append(live)
            self._cond.notify()
        return handle

    def cancel(self, request_id: str) -> bool:
        return self.lifecycle.cancel(request_id)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="fish-s2-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, stop the loop, and end everything queued or running ("cancelled"). If the
        loop does not exit in time its requests are ended anyway; the loop's later work for them is dropped."""
        self.lifecycle.close()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine loop did not stop within %.1f s; ending its requests", timeout)
            self._thread = None
        self.lifecycle.finish_all("cancelled", Unavailable("the server is shutting down; retry on another server"))

    def stats(self) -> dict:
        return {"active": len(self.rows), "queued": len(self._queue),
                "frames_generated": self.lifecycle.frames_generated, "prefix_cache": self.runner.prefix_cache.stats()}

    # ------------------------------------------------------------------ loop

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._queue or self.rows or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        return
                self.step()
        except BaseException:   # step() handles request failures; this is a bug, fail loudly but cleanly
            log.exception("engine loop failed")
            self.lifecycle.close()
        finally:
            if not self._stopping:
                self.lifecycle.finish_all("error", Internal("the engine loop stopped"))

    def step(self) -> None:
        """Handle cancels, admit queued requests into free rows, run one decode step."""
        self.lifecycle.poll_cancelled()
        self._drop_cancelled()
        while len(self.rows) < self.cfg.max_active:
            with self._cond:
                if not self._queue:
                    break
                live = self._queue.popleft()
            if not (live.cancel_requested or live.done):
                self._admit(live)
            else:
                self.lifecycle.finish(live, "cancelled")
        if not self.rows:
            return
        try:
            frames = self.runner.step()
        except Exception as e:  # a failed step fails the requests in it, the engine keeps serving
            log.exception("decode step failed")
            error = Internal(f"decode step failed: {type(e).__name__}: {e}")
            for r in reversed(range(len(self.rows))):
                self._end(r, "error", error)
            return
        for r in reversed(range(len(self.rows))):
            self._on_frame(r, frames[r])

    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = [live for live in self._queue if live.cancel_requested or live.done]
            if dropped:
                self._queue = deque(live for live in self._queue if not (live.cancel_requested or live.done))
        for live in dropped:
            self.lifecycle.finish(live, "cancelled")
        for r in reversed(range(len(self.rows))):
            if self.rows[r].cancel_requested or self.rows[r].done:
                self._end(r, "cancelled")

    def _admit(self, live: Live) -> None:
        try:
            frame = self.runner.admit(live.req)
        except Exception as e:
            log.exception("prefill failed")
            self.lifecycle.finish(live, "error", Internal(f"prefill failed: {type(e).__name__}: {e}"))
            return
        self.rows.append(live)
        self._on_frame(len(self.rows) - 1, frame)

    def _on_frame(self, r: int, frame) -> None:
        live = self.rows[r]
        if int(frame[0]) == self.model_cfg.eos_id:
            self._end(r, "stop")
            return
        self.lifecycle.frame(live, frame[1:].numpy())
        if live.n_frames >= live.max_frames:
            self._end(r, "length")

    def _end(self, r: int, reason: str, error: RequestError | None = None) -> None:
        """Free row r (the last row moves into it), then end its request."""
        live = self.rows[r]
        try:
            self.runner.release(r)
            self.rows[r] = self.rows[-1]
            self.rows.pop()
        finally:
            self.lifecycle.finish(live, reason, error)
