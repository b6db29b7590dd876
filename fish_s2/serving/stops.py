"""STOPs shared by the dual_ar instances of one server (``--gpus N``: one engine per GPU).

Triton hands a request to any instance of a model, so the STOP that ``tts`` sends for a stream (its
client is gone, or its owner stopped it) may reach an instance whose engine does not run that
stream. That instance posts it on a :class:`StopBoard`: an empty file named by the request's
server-issued id (32 hex digits, checked before it gets here) in a folder that every dual_ar instance
of the server shares, under the temporary folder and named by the tritonserver process (the python
models' parent). Each engine request's cancellation check (every ``engine.cancel_check_ms``) also
looks for its id there, and the instance that ran the request removes the file when it ends. A STOP
that crosses its request's natural end leaves an empty file behind (ids are never reused).

With one instance the STOP always reaches the engine that runs the request, but it can arrive before
the request does (a client that cancels at once: tts's STOP overtakes the request on its way through
the pipeline). :class:`EarlyStops` keeps such a STOP in memory for ``ttl_s`` so that the request is
cancelled when it arrives instead of running to its limit (a text session would wait for text).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path


class _Stops:
    def posted(self, request_id: str) -> bool:
        raise NotImplementedError

    def check(self, request_id: str, is_cancelled: Callable[[], bool]) -> Callable[[], bool]:
        """A request's cancellation check: its own (the response sender's), or a STOP posted for it."""
        return lambda: is_cancelled() or self.posted(request_id)


class StopBoard(_Stops):
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def post(self, request_id: str) -> None:
        (self.folder / request_id).touch()

    def posted(self, request_id: str) -> bool:
        return (self.folder / request_id).exists()

    def clear(self, request_id: str) -> None:
        (self.folder / request_id).unlink(missing_ok=True)


class EarlyStops(_Stops):
    """STOPs of one instance for requests it does not run (yet), kept ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float = 120.0):
        self.ttl_s = ttl_s
        self._posted: dict[str, float] = {}
        self._lock = threading.Lock()

    def post(self, request_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._posted = {k: t for k, t in self._posted.items() if now - t < self.ttl_s}
            self._posted[request_id] = now

    def posted(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._posted

    def clear(self, request_id: str) -> None:
        with self._lock:
            self._posted.pop(request_id, None)


def instances(model_config: dict) -> int:
    """How many instances Triton runs of a model (``count`` is per listed GPU)."""
    return sum(int(g.get("count", 1)) * max(1, len(g.get("gpus", []))) for g in model_config.get("instance_group", []))


def stop_board(model_config: dict, folder: Path | None = None) -> StopBoard | EarlyStops:
    """The board of this server's instances of the model, or an instance's own early STOPs when it has one."""
    if instances(model_config) <= 1:
        return EarlyStops()
    return StopBoard(folder or Path(tempfile.gettempdir()) / f"fish-s2-stops-{os.getppid()}")
