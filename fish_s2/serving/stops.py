"""STOPs shared by the dual_ar instances of one server (``--gpus N``: one engine per GPU).

Triton hands a request to any instance of a model, so the STOP that ``tts`` sends for a stream (its
client is gone, or its owner stopped it) may reach an instance whose engine does not run that
stream. That instance posts it on a :class:`StopBoard`: an empty file named by the request's
server-issued id (32 hex digits, checked before it gets here) in a folder that every dual_ar instance
of the server shares, under the temporary folder and named by the tritonserver process (the python
models' parent). Each engine request's cancellation check (every ``engine.cancel_check_ms``) also
looks for its id there, and the instance that ran the request removes the file when it ends. A STOP
that crosses its request's natural end leaves an empty file behind (ids are never reused). A model
with one instance needs none of this: the STOP always reaches its engine (:func:`stop_board` gives None).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class StopBoard:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def post(self, request_id: str) -> None:
        (self.folder / request_id).touch()

    def posted(self, request_id: str) -> bool:
        return (self.folder / request_id).exists()

    def clear(self, request_id: str) -> None:
        (self.folder / request_id).unlink(missing_ok=True)

    def check(self, request_id: str, is_cancelled: Callable[[], bool]) -> Callable[[], bool]:
        """A request's cancellation check: its own (the response sender's), or a STOP posted here."""
        return lambda: is_cancelled() or self.posted(request_id)


def instances(model_config: dict) -> int:
    """How many instances Triton runs of a model (``count`` is per listed GPU)."""
    return sum(int(g.get("count", 1)) * max(1, len(g.get("gpus", []))) for g in model_config.get("instance_group", []))


def stop_board(model_config: dict, folder: Path | None = None) -> StopBoard | None:
    """The board of this server's instances of the model, or None when it has one instance."""
    if instances(model_config) <= 1:
        return None
    return StopBoard(folder or Path(tempfile.gettempdir()) / f"fish-s2-stops-{os.getppid()}")
