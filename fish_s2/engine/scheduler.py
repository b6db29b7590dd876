"""The streaming engine's scheduler: many requests in one batched Dual-AR decode loop.

Requests are submitted from any thread at any time (refused at once when invalid, busy or stopping).
One loop thread admits queued requests into free rows of the :class:`~fish_s2.engine.runner.TorchRunner`
(reusing a cached voice prefix when it can) and runs one batched decode step for all active requests,
then prefills waiting prompts within the admission budget (``engine.prefill_chunk_tokens`` per step, in
admission order), so that running streams keep their cadence while new requests join. Each request
lives in a :class:`~fish_s2.request.Lifecycle`: frames become chunks by its
plan, cancellation (explicit, or polled from the client) ends it at the next step, a dialogue's next
turn batch is appended to its row's KV when the batch before it ends (only the new tokens are
prefilled), and every request ends with exactly one Finished on whichever path ends it first, its row freed on that same path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from ..config import DualARConfig
from ..dual_ar import DualAR, FastARRuntime
from ..request import (Cancelled, Event, EngineRequest, Internal, InvalidArgument, Lifecycle, Live, NotFound, RequestError,
                       RequestHandle, Unavailable)
from .config import EngineConfig, check_request, check_segment
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
        self._prefilling: deque[Live] = deque()   # rows with tokens to prefill, in the order they asked
        self._in_flight: tuple | None = None      # a launched step whose frames the next step() handles
        self.overlap = self.cfg.overlap_steps == "on" or (self.cfg.overlap_steps == "auto"
                                                          and self.runner.device.type == "cuda")
        self._queue: deque[Live] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ public API (any thread)

    def submit(self, req: EngineRequest, sink: Callable[[Event], None] | None = None) -> RequestHandle | None:
        """Queue a request: InvalidArgument, Busy or Unavailable at once, else its events go to ``sink``
        (called on the engine thread) or, without one, to the returned handle."""
        tokens = check_request(req, self.cfg, self.model_cfg)
        live, handle = self.lifecycle.open(req, sink)
        live.prompt_tokens = tokens
        with self._cond:
            self._queue.append(live)
            self._cond.notify()
        return handle

    def cancel(self, request_id: str) -> bool:
        return self.lifecycle.cancel(request_id)

    def append(self, request_id: str, segment=None, end: bool = False) -> None:
        """A running session's next segment (``<|im_end|>``, a user turn, the assistant start: what
        :meth:`~fish_s2.prompt.PromptBuilder.dialogue` builds for each later batch), spoken after what
        it has; ``end``: no more will come. NotFound for a request not in flight, InvalidArgument for one
        that is not a session, a segment after the end, or a session over its prompt tokens."""
        live = self.lifecycle.get(request_id)
        if live is None:
            raise NotFound("request_id", f"no request {request_id!r} in flight")
        if not live.req.open_input:
            raise InvalidArgument("request_id", "the request is not a session: its text was given whole")
        with self._cond:
            if live.input_ended:
                raise InvalidArgument("text", "the session's input has ended; nothing can follow")
            if segment is not None:
                seg = check_segment(segment, live.prompt_tokens, self.cfg, self.model_cfg)
                live.prompt_tokens += seg.shape[1]
                live.appended.append(seg)
            live.input_ended = end
            self._cond.notify()

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
        return {"active": len(self.rows), "queued": len(self._queue), "prefilling": len(self._prefilling),
                "frames_generated": self.lifecycle.frames_generated, "prefill_tokens": self.runner.prefill_tokens,
                "prefix_cache": self.runner.prefix_cache.stats()}

    # ------------------------------------------------------------------ loop

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._queue or self._stopping or any(self._runnable(live) for live in self.rows)):
                        # only parked sessions: still poll their clients for cancellation now and then
                        self._cond.wait(max(self.cfg.cancel_check_ms, 20) / 1000 if self.rows else None)
                        if self.rows:
                            break
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
        """Handle cancels, admit queued requests into free rows, run one decode step, prefill within the
        admission budget. With overlapped steps (engine.overlap_steps) a step whose frames end no row's
        batch, while nothing else waits, has the next step launched before its frames are handled: the
        host's work for them runs while the device computes, and the next call starts from that step."""
        if self._in_flight is not None:
            (launched, held), self._in_flight = self._in_flight, None
            self._decode(launched, held)
        else:
            self._prepare()
            held = [r for r, live in enumerate(self.rows) if live.parked or live.prefilling]
            if len(held) < len(self.rows):
                self._decode(self._launch(held), held)
        if self._in_flight is None:
            self._prefill()

    def _prepare(self) -> None:
        """Cancels, admissions into free rows, parked sessions whose text arrived or that idled too long."""
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
        for r in reversed(range(len(self.rows))):
            live = self.rows[r]
            if live.parked and self._runnable(live):
                live.parked = False
                self._after_batch(r)
            elif live.parked and self._idled(live):
                self._end(r, "cancelled", Cancelled(f"the session had no text for {self.cfg.session_idle_s:g} s "
                                                    "(engine.session_idle_s) and was ended"))

    def _idled(self, live: Live) -> bool:
        return time.monotonic() - live.parked_at > self.cfg.session_idle_s

    def _launch(self, held: list[int]) -> Callable[[], object] | None:
        try:
            return self.runner.launch(held=held)
        except Exception as e:
            self._fail_step(e)
            return None

    def _fail_step(self, e: Exception) -> None:
        """A failed step fails the requests in it; the engine keeps serving."""
        log.exception("decode step failed")
        error = Internal(f"decode step failed: {type(e).__name__}: {e}")
        for r in reversed(range(len(self.rows))):
            self._end(r, "error", error)

    def _decode(self, launched: Callable[[], object] | None, held: list[int]) -> None:
        """A launched step's frames to every row that is not held (parked, or still prefilling)."""
        if launched is None:
            return
        try:
            frames = launched()
        except Exception as e:
            self._fail_step(e)
            return
        held_rows = {id(self.rows[r]) for r in held}
        if self.overlap and self._steady(frames, held_rows):
            launched = self._launch(held)
            if launched is not None:
                self._in_flight = (launched, held)
        for r in reversed(range(len(self.rows))):   # a row that ends takes the last one's place: done already
            if id(self.rows[r]) not in held_rows:
                self._on_frame(r, frames[r])

    def _steady(self, frames, held_rows: set[int]) -> bool:
        """Whether the next step may run before these frames are handled: they end no row's batch or
        request, and nothing waits for the top of :meth:`step` (a cancel, a queued request with a free
        row, a prefill, a parked session's text or idle end)."""
        if self._stopping or self._prefilling or (self._queue and len(self.rows) < self.cfg.max_active):
            return False
        self.lifecycle.poll_cancelled()
        for r, live in enumerate(self.rows):
            if live.cancel_requested or live.done or (live.parked and (self._runnable(live) or self._idled(live))):
                return False
            if id(live) not in held_rows and (int(frames[r][0]) == self.model_cfg.eos_id
                                               or live.turn_frames + 1 >= live.max_frames
                                               or live.n_frames + 1 >= live.max_total_frames):
                return False
        return True

    def _prefill(self) -> None:
        """Prefill waiting rows in the order they asked, within this step's budget; each that completes
        sends its batch's first frame."""
        budget = self.cfg.prefill_chunk_tokens or None
        while self._prefilling and (budget is None or budget > 0):
            live = self._prefilling[0]
            r = self.rows.index(live)
            try:
                ran, frame = self.runner.prefill(r, budget)
            except Exception as e:
                log.exception("prefill failed")
                self._end(r, "error", Internal(f"prefill of batch {live.turn} failed: {type(e).__name__}: {e}"))
                continue
            if budget is not None:
                budget -= ran
            if frame is None:
                return
            self._prefilling.popleft()
            live.prefilling = False
            self._on_frame(r, frame)

    @staticmethod
    def _runnable(live: Live) -> bool:
        """A row with work: decoding, or a parked session whose next segment (or end) has arrived."""
        return not live.parked or bool(live.appended) or live.input_ended or live.cancel_requested

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
            self.runner.begin(live.req)
        except Exception as e:
            log.exception("admission failed")
            self.lifecycle.finish(live, "error", Internal(f"prefill failed: {type(e).__name__}: {e}"))
            return
        self.rows.append(live)
        self._await_prefill(live)

    def _await_prefill(self, live: Live) -> None:
        live.prefilling = True
        self._prefilling.append(live)

    def _on_frame(self, r: int, frame) -> None:
        """A row's new frame: sent, or the end of its batch (<|im_end|> or its budget's last frame)."""
        live = self.rows[r]
        live.turn_frames += 1
        eos = int(frame[0]) == self.model_cfg.eos_id
        if not eos and live.turn_frames < live.max_frames:
            self._send(r, frame)
            return
        live.held_frame = None if eos else frame
        self._after_batch(r)

    def _send(self, r: int, frame) -> bool:
        """Send a frame's codes; end the request when it reaches its total frames (True: ended)."""
        live = self.rows[r]
        self.lifecycle.frame(live, frame[1:].numpy())
        if live.n_frames >= live.max_total_frames:
            self._end(r, "length")
            return True
        return False

    def _after_batch(self, r: int) -> None:
        """A batch ended: start the next one if its segment is known, park a session that waits for its
        text, else end the request. A batch's last frame at its budget is sent only if no batch follows:
        upstream drops it (it is never fed back, so the next batch's history does not have it)."""
        live = self.rows[r]
        with self._cond:
            segment = (live.req.turns[live.turn] if live.turn < len(live.req.turns) else
                       live.appended.popleft() if live.appended else None)
            wait = segment is None and not live.input_ended
        if segment is not None:
            live.held_frame = None
            self._next_turn(r, segment)
        elif wait:
            live.parked, live.parked_at = True, time.monotonic()
        elif live.held_frame is not None:
            frame, live.held_frame = live.held_frame, None
            if not self._send(r, frame):
                self._end(r, "length")
        else:
            self._end(r, "stop")

    def _next_turn(self, r: int, segment) -> None:
        live = self.rows[r]
        live.turn += 1
        live.turn_frames = 0
        self.runner.extend(r, segment, live.turn)
        self._await_prefill(live)

    def _end(self, r: int, reason: str, error: RequestError | None = None) -> None:
        """Free row r (the last row moves into it), then end its request."""
        live = self.rows[r]
        try:
            if live.prefilling:
                self._prefilling.remove(live)
            self.runner.release(r)
            self.rows[r] = self.rows[-1]
            self.rows.pop()
        finally:
            self.lifecycle.finish(live, reason, error)
