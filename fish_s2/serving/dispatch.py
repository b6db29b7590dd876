"""Engine events -> Triton responses, on one response thread.

The engine calls a request's sink on its decode thread; the sink only enqueues, and this thread
does the sending (an IPC round trip per response in the python backend), so decoding never waits
on a client. Each live request is tracked from submit to its ``Finished`` event and dropped on that
one path, whatever the reason.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..request import EngineRequest, Event, Finished

log = logging.getLogger(__name__)


@dataclass
class Stream:
    request_id: str     # the engine's (server-issued)
    context: Any        # whatever the responder needs (the response sender, echoed values)


class Dispatcher:
    def __init__(self, engine, respond: Callable[[Stream, Event], None],
                 after_event: Callable[[], None] | None = None):
        self.engine = engine
        self._respond = respond
        self._after_event = after_event
        self._events: queue.Queue[tuple[Stream, Event] | None] = queue.Queue()
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fish-s2-responses", daemon=True)
        self._thread.start()

    def submit(self, req: EngineRequest, context: Any) -> Stream:
        """Hand a request to the engine (its typed errors propagate, nothing is kept)."""
        stream = Stream(req.request_id, context)
        with self._lock:
            self._streams[req.request_id] = stream
        try:
            self.engine.submit(req, sink=lambda event: self._events.put((stream, event)))
        except BaseException:
            with self._lock:
                self._streams.pop(req.request_id, None)
            raise
        return stream

    def live(self) -> int:
        with self._lock:
            return len(self._streams)

    def _loop(self) -> None:
        while (item := self._events.get()) is not None:
            stream, event = item
            try:
                self._respond(stream, event)
            except Exception:  # a failed send must not stop the responses of other requests
                log.exception("responding to request %s failed", stream.request_id)
            finally:
                if isinstance(event, Finished):
                    with self._lock:
                        self._streams.pop(stream.request_id, None)
            if self._after_event is not None:
                try:
                    self._after_event()
                except Exception:
                    log.exception("after-event hook failed")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the response thread after the events already queued (stop the engine first)."""
        self._events.put(None)
        self._thread.join(timeout)
