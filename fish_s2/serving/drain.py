"""Drain a replica before Triton stops: refuse new streams, let the running ones finish.

Triton 2.51 strands an ensemble stream that still produces a response after SIGTERM
(``shared/spec/triton-cancellation-and-security.md``), so the streams must end *before* tritonserver
gets SIGTERM; a longer ``--exit-timeout-secs`` does not help. The drain switch is a flag file named by
the environment variable ``FISH_S2_DRAIN_FILE`` of the tritonserver process (its python models
inherit it): while the file exists, ``preprocess`` answers every new ``tts`` request with
:class:`~fish_s2.request.Unavailable` at once, so a client with several endpoints retries elsewhere
(:mod:`fish_s2.routing`). Without the variable there is no switch.

:func:`drain` raises the flag, waits ``settle_s``, then polls Triton's metrics until the replica
is idle twice ``poll_s`` apart with no chunk finished in between, for at most ``max_s``. Idle: the
engine's ``fish_s2_requests_active + fish_s2_requests_queued`` and the chunks waiting for
``codec_decoder`` and ``postprocess`` (``nv_inference_pending_request_count``) are 0; finished:
those two models' ``nv_inference_count``. The engine's count drops at a stream's last frame while
its last chunks may still be queued or decoding after it (measured on a loaded CPU: seconds). Both stop paths use it: the launcher (``fish_s2.serving.server``, on SIGTERM)
and the Kubernetes preStop hook ``deploy/drain.sh``, which runs

    python3 -m fish_s2.serving.drain [SETTLE_S [MAX_S]]

Environment: ``FISH_S2_DRAIN_FILE``, ``FISH_S2_DRAIN_METRICS_URL`` (default
http://127.0.0.1:8002/metrics), ``FISH_S2_DRAIN_POLL_S`` (default 2), ``FISH_S2_DRAIN_LOG`` (default
/proc/1/fd/1, the container's log; stderr when it cannot be written). Exits 0 in every case.
Torch-free.
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..request import Unavailable

FILE_ENV = "FISH_S2_DRAIN_FILE"
SETTLE_S, MAX_S, POLL_S = 10, 90, 2.0   # D = 90 s: a request is capped at 1024 frames = 47.6 s of audio
DEFAULT_METRICS_URL = "http://127.0.0.1:8002/metrics"
AFTER_ENGINE = ("codec_decoder", "postprocess")   # the steps a stream's chunks take after the engine
_LINE = re.compile(r"^(fish_s2_requests_(?:active|queued)|nv_inference_pending_request_count|nv_inference_count)"
                   r"(\{[^}]*\})?\s+(\S+)")
_MODEL = re.compile(r'model="([^"]*)"')


def drain_file() -> Path | None:
    """The drain flag of this process (from ``FISH_S2_DRAIN_FILE``), or None."""
    value = os.environ.get(FILE_ENV)
    return Path(value) if value else None


def refuse_if_draining(flag: Path | None) -> None:
    """Raise Unavailable while the replica drains (the flag file exists)."""
    if flag is not None and flag.exists():
        raise Unavailable("this replica is draining and takes no new requests; retry on another")


def in_flight(metrics_url: str) -> tuple[int, float] | None:
    """(work in flight: engine requests + chunks queued after it, chunks finished after the engine so far)
    from Triton's metrics (summed over labels, e.g. one engine per GPU), or None if unreachable."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as r:
            text = r.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    busy, finished = 0.0, 0.0
    for name, labels, value in (m.groups() for m in map(_LINE.match, text.splitlines()) if m):
        if name.startswith("fish_s2_"):
            busy += float(value)
        elif (model := _MODEL.search(labels or "")) and model.group(1) in AFTER_ENGINE:
            if name == "nv_inference_count":
                finished += float(value)
            else:
                busy += float(value)
    return int(busy), finished


def drain(metrics_url: str, flag: Path | None, settle_s: float = SETTLE_S, max_s: float = MAX_S,
          poll_s: float = POLL_S, log: Callable[[str], None] = print) -> str:
    """Raise the flag, then wait for the requests in flight: "drained", "timeout" or "unreachable"."""
    if flag is not None:
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.touch()
    log(f"draining{f' (flag {flag})' if flag else ''}: settling {settle_s:g} s, then waiting up to "
        f"{max_s:g} s for in-flight requests")
    time.sleep(settle_s)
    deadline = time.monotonic() + max_s
    idle_at = None          # chunks finished at the last idle reading
    while True:
        state = in_flight(metrics_url)
        if state is None:
            log(f"metrics at {metrics_url} unreachable: nothing to wait for")
            return "unreachable"
        n, finished = state
        if n == 0 and idle_at == finished:
            log("drained")
            return "drained"
        idle_at = finished if n == 0 else None
        left = deadline - time.monotonic()
        if left <= 0:
            log(f"{n} request(s) in flight after {max_s:g} s: stopping anyway")
            return "timeout"
        time.sleep(min(poll_s, left))


def _log_to(path: str) -> Callable[[str], None]:
    def log(message: str) -> None:
        try:
            with open(path, "a") as f:
                f.write(f"drain: {message}\n")
        except OSError:
            print(f"drain: {message}", file=sys.stderr, flush=True)

    return log


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 2 or not all(a.isdigit() for a in argv):
        print("usage: python -m fish_s2.serving.drain [SETTLE_S [MAX_S]]", file=sys.stderr)
        return 2
    settle, most = (list(map(int, argv)) + [SETTLE_S, MAX_S][len(argv):])[:2]
    drain(os.environ.get("FISH_S2_DRAIN_METRICS_URL", DEFAULT_METRICS_URL), drain_file(), settle, most,
          float(os.environ.get("FISH_S2_DRAIN_POLL_S", POLL_S)),
          _log_to(os.environ.get("FISH_S2_DRAIN_LOG", "/proc/1/fd/1")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
