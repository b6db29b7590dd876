"""Decoupled BLS calls whose responses the python backend's own thread must never be the last to drop.

A decoupled BLS call (``request.exec(decoupled=True)``) answers with an iterator that keeps every
response it has yielded, and the stub keeps that iterator in a map of its own until its stub-to-parent
thread handles the cleanup that the final response queued. Whichever of the two owners lets go last
destroys the responses, and in the python backend of Triton 2.51 (r24.10, the ``nvidia-pytriton`` wheel)
a response tensor releases its numpy array without taking the GIL (fixed upstream in r24.12 = Triton
2.53, python_backend #390). So when the model's thread lets go of an exhausted iterator before that
cleanup has run, the stub's thread frees numpy arrays while python threads run: a corrupted heap and a
dead stub ("double free or corruption (fasttop)", "malloc_consolidate(): unaligned fastbin chunk
detected", SIGSEGV in pymalloc). With the relay's many concurrent streams this killed ``tts`` now and
then (2 of 6 runs of tests/test_reliability.py's abandoned streams on a busy 2-core machine); a
``_Py_Dealloc`` preloaded into the stubs that checks the GIL counted 29,830 frees without it in 127
waves of 5 abandoned streams, every one from ``Stub::SendCleanupId`` dropping the map's reference, and
none with this module in use (920 streams).

:class:`SpentStreams` keeps each exhausted iterator (with its responses) until a later round trip
through that same stub-to-parent thread has come back: the thread handles its queue in order, and a
request's ``is_cancelled()`` that returns False went through it (only True is ever answered from a
cache), after the cleanups queued before it; the map's reference is gone by then and python drops the
last one, holding the GIL. A consumer that stops reading early drops its iterator as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from ..request.errors import client_gone


class SpentStreams:
    def __init__(self):
        self._held: list = []
        self._lock = threading.Lock()

    def exec(self, request) -> Iterator:
        """``request.exec(decoupled=True)``'s responses; once exhausted, the iterator is kept here."""
        responses = request.exec(decoupled=True)
        yield from responses
        with self._lock:
            self._held.append(responses)

    def take(self) -> list:
        """The iterators exhausted so far (before a round trip that is to free them)."""
        with self._lock:
            held, self._held = self._held, []
        return held

    def keep(self, held: list) -> None:
        """Give back what :meth:`take` returned: no round trip came back, they wait for a later one."""
        if held:
            with self._lock:
                self._held[:0] = held

    def release_after(self, is_cancelled: Callable[[], bool]) -> bool:
        """Drop the iterators exhausted so far once ``is_cancelled`` (of a request whose final response
        has not been sent) returns False; else keep them for a later call (False)."""
        held = self.take()
        if held and client_gone(is_cancelled):   # True (maybe cached) or raised: no round trip known
            self.keep(held)
            return False
        return True

    def release_all(self) -> None:
        """From the model's ``finalize``: the stub empties its map (holding the GIL) before calling it."""
        self.take()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
