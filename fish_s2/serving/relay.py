"""The client-facing ``tts`` model's work: relay each client stream through the ``tts_pipeline``
ensemble, and stop its engine request as soon as the client is gone.

Triton never tells a running ensemble step that its client cancelled (2.51 measured; no release up
to 26.x changes it), so a client that disconnects would hold its engine slot until its frame limit.
A decoupled python entry does see its own request's cancellation. So the entry calls the pipeline
with BLS (``exec(decoupled=True)``) and forwards each response, while a watcher thread asks every
open stream's response sender, once per check period, whether its client is gone; for one that is,
it sends dual_ar a STOP for the stream's engine request id (issued here, unguessable, and carried
down the pipeline as STREAM_ID, dual_ar's REQUEST_ID), and the stream's thread keeps draining the pipeline's responses to
their end without forwarding them (an undrained BLS iterator keeps the model from unloading).
Every BLS stream's exhausted iterator is kept (:class:`~fish_s2.serving.bls.SpentStreams`) until the
watcher's next answered cancellation check: under Triton 2.51 the stub's own thread must never be the
one that drops it (it frees numpy arrays without the GIL: a corrupted heap, a dead ``tts`` stub).

``pb_utils`` is passed in, so this module imports and tests without Triton.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..request import Cancelled, NotFound, from_wire
from ..request.errors import client_gone
from . import protocol
from .adapter import triton_error
from .bls import SpentStreams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    request_id: str
    sender: object
    session: "Session | None" = None   # a session (open input): what its appends are checked against
    stop_sent: bool = False
    owner_stopped: bool = False   # stopped at its owner's request: the client is there to be told
    done: bool = False      # FINAL sent: the sender must not be touched again (Triton frees it)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Session:
    """What a session's later text is checked against: its voices (speaker tags), its batch size, and the
    turns it has had so far; its appends run one after another, in arrival order, off the model's thread."""

    voices: int
    chunk_length: int
    turns: int
    appends: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "fish-s2-append"))


class Relay:
    def __init__(self, pb_utils, check_period_s: float):
        self.pb = pb_utils
        self.check_period_s = check_period_s
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self.spent = SpentStreams()    # exhausted BLS iterators, dropped by the watcher (see bls.py)
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="fish-s2-relay-watch", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ per stream

    def start(self, request_id: str, inputs: dict[str, np.ndarray], sender, session: Session | None = None) -> None:
        """Relay one request (runs on its own thread; returns at once). A session's stream starts with a
        response that carries only its id (so that its owner can append before any audio exists)."""
        stream = _Stream(request_id, sender, session)
        with self._lock:
            self._streams[request_id] = stream
        threading.Thread(target=self._run, args=(stream, inputs), name="fish-s2-relay", daemon=True).start()

    def _run(self, stream: _Stream, inputs: dict[str, np.ndarray]) -> None:
        pb, final_error = self.pb, None
        try:
            if stream.session is not None:   # (tensors held while sent: see dual_ar's _respond)
                announce = [pb.Tensor(k, v) for k, v in protocol.announce_tensors(stream.request_id).items()]
                stream.sender.send(pb.InferenceResponse(output_tensors=announce))
            request = pb.InferenceRequest(
                model_name=protocol.TTS_PIPELINE, inputs=[pb.Tensor(k, v) for k, v in inputs.items()],
                requested_output_names=[s.name for s in protocol.TTS_OUTPUTS])
            for response in self.spent.exec(request):   # always drained to its end
                if stream.stop_sent or final_error is not None:
                    continue
                if response.has_error():   # re-typed from its tag: a BLS error does not keep its code
                    final_error = triton_error(pb, from_wire(response.error().message()))
                    continue
                tensors = response.output_tensors()
                if tensors:
                    try:
                        stream.sender.send(pb.InferenceResponse(output_tensors=tensors))
                    except Exception:   # the client is gone: stop its request and keep draining (an
                        self.stop(stream)   # undrained BLS iterator keeps this model from unloading)
        except Exception as e:  # a failed relay ends its own stream only
            final_error = triton_error(pb, e) if final_error is None else final_error
        finally:
            with self._lock:
                self._streams.pop(stream.request_id, None)
            if stream.session is not None:
                stream.session.appends.shutdown(wait=False)
            if stream.owner_stopped:
                final_error = triton_error(pb, Cancelled("the stream was stopped by its owner before it ended"))
            with stream.lock:   # exactly one FINAL: an error if it failed or was stopped, else empty
                stream.done = True
                stopped_silently = stream.stop_sent and not stream.owner_stopped   # its client is gone
                response = None if final_error is None or stopped_silently else pb.InferenceResponse(error=final_error)
                try:
                    stream.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception:
                    log.exception("ending request %s failed", stream.request_id)

    # ------------------------------------------------------------------ cancellation

    def _watch(self) -> None:
        while not self._closed.wait(self.check_period_s):
            spent = self.spent.take()   # exhausted before these checks: dropped once one of them is answered
            answered = False
            with self._lock:
                streams = [s for s in self._streams.values() if not s.stop_sent]
            for stream in streams:
                with stream.lock:   # never ask a sender that has sent its FINAL (a freed response factory)
                    if stream.done:
                        continue
                    gone = client_gone(stream.sender.is_cancelled)
                answered = answered or not gone   # False is never cached: a round trip through the stub's thread
                if gone:
                    self.stop(stream)
            if not answered:
                self.spent.keep(spent)
            del spent

    def stop(self, stream: _Stream) -> None:
        """Tell dual_ar to end the stream's engine request (its pipeline then ends plainly; :meth:`_run` tells
        the client, if it is still there)."""
        stream.stop_sent = True
        pb = self.pb
        try:
            inputs = [pb.Tensor(k, v) for k, v in protocol.stop_tensors(stream.request_id).items()]
            request = pb.InferenceRequest(model_name=protocol.DUAL_AR, inputs=inputs, requested_output_names=["CHUNK_META"])
            for _ in self.spent.exec(request):
                pass
        except Exception:
            log.exception("stopping request %s failed", stream.request_id)

    def stop_owned(self, request_id: str) -> bool:
        """Stop a stream at the request of whoever holds its server-issued id (False: no such stream)."""
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None or stream.stop_sent:
            return stream is not None
        stream.owner_stopped = True
        self.stop(stream)
        return True

    def session(self, request_id: str) -> tuple[_Stream, Session]:
        """The live session with this server-issued id (NotFound: none, or it has ended)."""
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None or stream.session is None or stream.stop_sent:
            raise NotFound("request_id", "no session with this id is running on this server")
        return stream, stream.session

    def append(self, stream: _Stream, segments: tuple[np.ndarray, ...], end: bool, wait_s: float = 30.0) -> None:
        """Give a session's engine request its next segments (and/or the end of its input); dual_ar's
        error (over its tokens, the session ended) is raised typed. The session's id is announced before
        its request has reached dual_ar (it may still be in preprocess or a queue): while the stream is
        running, dual_ar's NotFound means "not there yet", and the append is tried again."""
        pb = self.pb
        inputs = [pb.Tensor(k, v) for k, v in protocol.dual_ar_append_tensors(stream.request_id, segments, end).items()]
        deadline = time.monotonic() + wait_s
        while True:
            request = pb.InferenceRequest(model_name=protocol.DUAL_AR, inputs=inputs,
                                          requested_output_names=["CHUNK_META"])
            error = None
            for response in self.spent.exec(request):   # drained to its end
                if response.has_error() and error is None:
                    error = from_wire(response.error().message())
            if error is None:
                return
            with self._lock:
                running = self._streams.get(stream.request_id) is stream and not stream.stop_sent
            if not (isinstance(error, NotFound) and running and time.monotonic() < deadline):
                raise error
            time.sleep(0.01)

    def live(self) -> int:
        with self._lock:
            return len(self._streams)

    def close(self) -> None:
        self._closed.set()
        self._watcher.join(5)
        self.spent.release_all()
