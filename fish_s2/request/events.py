"""What a request's stream yields: code chunks, then exactly one :class:`Finished`."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .chunks import CodeChunk
from .errors import RequestError

REASONS = ("stop", "length", "cancelled", "error")   # end of speech, frame limit, stopped, failed


@dataclass
class ChunkEvent:
    request_id: str
    chunk: CodeChunk
    seconds_since_submit: float
    turn: int = 0                      # the turn batch of the chunk's last frame (dialogues, sessions)


@dataclass
class Finished:
    request_id: str
    reason: str                        # one of REASONS
    n_frames: int
    error: RequestError | None = None  # set when reason is "error" (or a typed cancellation)


Event = ChunkEvent | Finished


class RequestHandle:
    """The events of one request, to iterate (the sink used when a caller gives none)."""

    def __init__(self, request_id: str, cancel: Callable[[str], object]):
        self.request_id = request_id
        self._cancel = cancel
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
        self._cancel(self.request_id)


def collect(handle: RequestHandle) -> tuple[list[CodeChunk], Finished]:
    """All chunks of a request and its Finished event (blocking)."""
    chunks, done = [], None
    for event in handle:
        if isinstance(event, ChunkEvent):
            chunks.append(event.chunk)
        else:
            done = event
    return chunks, done
