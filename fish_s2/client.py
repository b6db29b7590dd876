"""Client for the Triton ``tts`` model: streamed synthesis (sync and asyncio), voices, WAV files.

Requests go over Triton's gRPC stream (``tritonclient.grpc``'s generated service stubs; one gRPC
stream per synthesis, so any number of them share a channel). Responses carry one audio chunk each,
possibly out of order; :class:`ChunkReorderer` hands them on in index order as soon as the next one
is there. The stream ends with Triton's final response. A stream abandoned early (the consumer
stops iterating, an error) is cancelled: the server's ``tts`` model sees it and frees the engine slot
(as it does for any client that cancels or disconnects).
Errors are the request layer's types (:mod:`fish_s2.request.errors`): InvalidArgument (naming the
field), NotFound, AlreadyExists, Busy (retry soon), Unavailable (retry elsewhere), Cancelled, Internal.
Torch-free: ``pip install fish_s2[client]`` is enough.

Several endpoints (``"host1:8001,host2:8001"`` or a list) make a fleet client: :mod:`fish_s2.routing`
picks the replica per request (the same voice on the same replica, others by fewest outstanding
streams) and retries a request on another replica on Unavailable while it has produced no audio.

    from fish_s2.client import TTSClient
    with TTSClient("127.0.0.1:8001") as tts:
        result = tts.synthesize("Hello! [laugh] This is Fish S2.", voice_id="alice", seed=1)
        result.write_wav("out.wav")
        print(result.time_to_first_audio, result.rtf)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import soundfile as sf
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from .request import Internal, RequestError, Unavailable, from_wire
from .routing import Router
from .serving import protocol

DEFAULT_URL = "127.0.0.1:8001"


@dataclass
class AudioChunk:
    index: int
    audio: np.ndarray          # float32 in [-1, 1], or int16 PCM
    sample_rate: int
    request_id: str
    turn: int = 0              # the turn batch of its last frame (a dialogue's batch, a session's segment)


class ChunkReorderer:
    """Chunks in index order, from chunks arriving in any order."""

    def __init__(self):
        self.next_index = 0
        self._pending: dict[int, AudioChunk] = {}

    def push(self, chunk: AudioChunk) -> list[AudioChunk]:
        """The chunks that became ready, in order (possibly none)."""
        if chunk.index < self.next_index or chunk.index in self._pending:
            raise Internal(f"chunk {chunk.index} arrived twice")
        self._pending[chunk.index] = chunk
        ready = []
        while self.next_index in self._pending:
            ready.append(self._pending.pop(self.next_index))
            self.next_index += 1
        return ready

    def finish(self) -> None:
        if self._pending:
            missing = [i for i in range(self.next_index, max(self._pending)) if i not in self._pending]
            raise Internal(f"the stream ended with chunks {missing} missing")


@dataclass
class Synthesis:
    audio: np.ndarray
    sample_rate: int
    request_id: str
    n_chunks: int
    time_to_first_audio: float     # seconds from sending the request to the first chunk in order
    elapsed: float                 # seconds from sending the request to the end of the stream

    @property
    def duration(self) -> float:
        return self.audio.size / self.sample_rate if self.sample_rate else 0.0

    @property
    def rtf(self) -> float:
        """Real-time factor: elapsed / audio duration (below 1 is faster than real time)."""
        return self.elapsed / self.duration if self.duration else float("inf")

    def write_wav(self, path: str | Path) -> None:
        write_wav(path, self.audio, self.sample_rate)


@dataclass
class _Collector:
    """Accumulates a stream's chunks into a Synthesis."""

    t0: float = field(default_factory=time.perf_counter)
    chunks: list[AudioChunk] = field(default_factory=list)
    ttfa: float | None = None

    def add(self, chunk: AudioChunk) -> None:
        if self.ttfa is None:
            self.ttfa = time.perf_counter() - self.t0
        self.chunks.append(chunk)

    def result(self, sample_format: str | None) -> Synthesis:
        elapsed = time.perf_counter() - self.t0
        dtype = np.int16 if sample_format == "int16" else np.float32
        if not self.chunks:
            return Synthesis(np.zeros(0, dtype), 0, "", 0, elapsed, elapsed)
        first = self.chunks[0]
        audio = np.concatenate([c.audio for c in self.chunks]).astype(dtype, copy=False)
        return Synthesis(audio, first.sample_rate, first.request_id, len(self.chunks), self.ttfa, elapsed)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV from float32 samples in [-1, 1] or int16 PCM."""
    audio = np.asarray(audio)
    if audio.dtype != np.int16:
        audio = protocol.to_pcm16(audio.astype(np.float32))
    sf.write(str(path), audio, sample_rate, subtype="PCM_16")


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples of an audio file at its own rate (the server resamples references)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise ValueError(f"{path}: cannot read audio ({e})") from None
    return data.mean(axis=1), rate


# ------------------------------------------------------------------ wire format

def _infer_request(model: str, arrays: dict[str, np.ndarray], request_id: str,
                   stream: bool) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    specs = {s.name: s for s in (*protocol.ENTRY_INPUTS, *protocol.VOICES_INPUTS, *protocol.DUAL_AR_INPUTS)}
    for name, array in arrays.items():
        tensor = req.inputs.add()
        tensor.name, tensor.datatype = name, specs[name].wire_type
        tensor.shape.extend(array.shape)
        req.raw_input_contents.append(serialize_byte_tensor(array).item() if array.dtype == np.object_
                                      else np.ascontiguousarray(array).tobytes())
    if stream:  # ask for Triton's flag-only final response: it is what ends a stream
        req.parameters["triton_enable_empty_final_response"].bool_param = True
    return req


def _parse(response: service_pb2.ModelStreamInferResponse) -> tuple[AudioChunk | None, bool]:
    """(chunk or None, final?) of one stream response; a server error raises its typed RequestError."""
    if response.error_message:
        raise from_wire(response.error_message)
    infer = response.infer_response
    final = infer.parameters["triton_final_response"].bool_param
    if not infer.outputs:
        return None, final
    result = InferResult(infer)
    audio = result.as_numpy("AUDIO")
    if audio.size == 0:
        audio = result.as_numpy("AUDIO_INT16")
    chunk = AudioChunk(int(result.as_numpy("CHUNK_INDEX")[0]), audio, int(result.as_numpy("SAMPLE_RATE")[0]),
                       result.as_numpy("REQUEST_ID")[0].decode(), int(result.as_numpy("TURN_INDEX")[0]))
    return chunk, final


def _rpc_error(e: grpc.RpcError) -> RequestError:
    code = e.code() if hasattr(e, "code") else None
    return from_wire((e.details() if hasattr(e, "details") else None) or str(e), code.name if code else None)


def _voices(response: service_pb2.ModelInferResponse) -> list[dict]:
    return [json.loads(v) for v in InferResult(response).as_numpy("VOICES")]


# A stream sends its one request and keeps its write side open until the request is over (Triton
# 2.51's gRPC stream handler can keep a model referenced when a stream is half-closed before an error
# response arrives), then half-closes and reads to the end of the call. A stream abandoned before its
# final response is cancelled; so is an end that takes longer than ``drain_timeout_s``.

def _end(call, done: threading.Event, timeout_s: float) -> None:
    timer = threading.Timer(timeout_s, call.cancel)
    timer.start()
    try:
        done.set()
        for _ in call:
            pass
    except grpc.RpcError:
        pass
    finally:
        done.set()
        timer.cancel()


async def _aend(call, done: asyncio.Event, timeout_s: float) -> None:
    async def end():
        done.set()
        async for _ in call:
            pass

    try:
        await asyncio.wait_for(end(), timeout_s)
    except (asyncio.TimeoutError, grpc.RpcError):
        call.cancel()
    finally:
        done.set()


def _send_then_wait(request: service_pb2.ModelInferRequest, done: threading.Event):
    yield request
    done.wait()


async def _asend_then_wait(request: service_pb2.ModelInferRequest, done: asyncio.Event):
    yield request
    await done.wait()


def _fleet(url, policy: str, replica) -> tuple[Router, dict]:
    """The router over ``url``'s endpoints, and one single-endpoint client per endpoint when there are
    several (none for one endpoint: the client talks to it directly)."""
    router = Router(url, policy)
    return router, ({ep: replica(ep) for ep in router.endpoints} if len(router.endpoints) > 1 else {})


# ------------------------------------------------------------------ sync client

class TTSClient:
    """``url``: one endpoint, or several (a fleet, see :mod:`fish_s2.routing`; ``policy`` picks the
    replica). ``admin_key`` (default ``$FISH_S2_ADMIN_KEY``): the server's admin key, for registering
    and deleting voices."""

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, model: str = protocol.TTS, timeout_s: float = 600.0,
                 drain_timeout_s: float = 10.0, admin_key: str | None = None, policy: str = "affinity"):
        self.model, self.timeout_s, self.drain_timeout_s = model, timeout_s, drain_timeout_s
        self.admin_key = admin_key or os.environ.get("FISH_S2_ADMIN_KEY")
        self.router, self._replicas = _fleet(
            url, policy, lambda ep: TTSClient(ep, model, timeout_s, drain_timeout_s, self.admin_key))
        url = self.router.endpoints[0]
        self._channel = grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", -1),
                                                            ("grpc.max_send_message_length", -1)])
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def ready(self) -> bool:
        if self._replicas:
            return any(r.ready() for r in self._replicas.values())
        try:
            return self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=5).ready
        except grpc.RpcError:
            return False

    def stream(self, text: str, **fields) -> Iterator[AudioChunk]:
        """Audio chunks in order as they become ready. ``fields``: see :func:`protocol.tts_inputs`.
        Stopping the iteration early cancels the request on the server."""
        if self._replicas:   # a fleet: fish_s2.routing picks the replica (and retries before any audio)
            yield from self.router.stream(fields.get("voice_id"), lambda ep: self._replicas[ep].stream(text, **fields))
            return
        request_id, done = uuid.uuid4().hex, threading.Event()
        request = _infer_request(self.model, protocol.tts_inputs(text, **fields), request_id, stream=True)
        call = self._stub.ModelStreamInfer(_send_then_wait(request, done), timeout=self.timeout_s)
        reorder, finished, refused = ChunkReorderer(), False, False
        try:
            for response in call:
                refused = bool(response.error_message)   # the server ended the request itself
                chunk, final = _parse(response)
                if chunk is not None:
                    yield from reorder.push(chunk)
                if final:
                    finished = True
                    break
            if not finished:
                raise Unavailable("the stream closed before its final response")
            reorder.finish()
        except grpc.RpcError as e:
            raise _rpc_error(e) from None
        finally:
            if finished or refused:
                _end(call, done, self.drain_timeout_s)
            else:                # abandoned: the server's tts model stops the engine request
                call.cancel()
                done.set()

    def synthesize(self, text: str, **fields) -> Synthesis:
        collector = _Collector()
        for chunk in self.stream(text, **fields):
            collector.add(chunk)
        return collector.result(fields.get("sample_format"))

    def _voices_call(self, action: str, **fields) -> list[dict]:
        if self._replicas:   # shared voices folder: any replica; a voice's own one warms its prefix
            return self.router.call(fields.get("voice_id"), lambda ep: self._replicas[ep]._voices_call(action, **fields))
        req = _infer_request(protocol.VOICES, protocol.voice_inputs(action, **fields), uuid.uuid4().hex, False)
        try:
            return _voices(self._stub.ModelInfer(req, timeout=self.timeout_s))
        except grpc.RpcError as e:
            raise _rpc_error(e) from None

    def register_voice(self, voice_id: str, audio: np.ndarray, sample_rate: int, text: str) -> dict:
        return self._voices_call("register", voice_id=voice_id, reference_audio=audio, reference_sample_rate=sample_rate,
                                 reference_text=text, admin_key=self.admin_key)[0]

    def list_voices(self) -> list[dict]:
        return self._voices_call("list")

    def delete_voice(self, voice_id: str) -> dict:
        return self._voices_call("delete", voice_id=voice_id, admin_key=self.admin_key)[0]

    def close(self) -> None:
        for replica in self._replicas.values():
            replica.close()
        self._channel.close()

    def __enter__(self) -> "TTSClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ asyncio client

class AsyncTTSClient:
    """The same over ``grpc.aio``: many concurrent streams on one channel from one event loop.

    Use ``async with contextlib.aclosing(client.stream(...))`` when you may stop iterating early, so
    the request is cancelled at once rather than when the generator is collected."""

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, model: str = protocol.TTS, timeout_s: float = 600.0,
                 drain_timeout_s: float = 10.0, admin_key: str | None = None, policy: str = "affinity"):
        self.model, self.timeout_s, self.drain_timeout_s = model, timeout_s, drain_timeout_s
        self.admin_key = admin_key or os.environ.get("FISH_S2_ADMIN_KEY")
        self.router, self._replicas = _fleet(
            url, policy, lambda ep: AsyncTTSClient(ep, model, timeout_s, drain_timeout_s, self.admin_key))
        url = self.router.endpoints[0]
        self._channel = grpc.aio.insecure_channel(url, options=[("grpc.max_receive_message_length", -1),
                                                                ("grpc.max_send_message_length", -1)])
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def stream(self, text: str, **fields) -> AsyncIterator[AudioChunk]:
        if self._replicas:   # a fleet: fish_s2.routing picks the replica (and retries before any audio)
            routed = self.router.astream(fields.get("voice_id"), lambda ep: self._replicas[ep].stream(text, **fields))
            async with contextlib.aclosing(routed):
                async for chunk in routed:
                    yield chunk
            return
        async for chunk in self._stream(protocol.tts_inputs(text, **fields)):
            yield chunk

    async def _stream(self, arrays: dict[str, np.ndarray],
                      on_announce: Callable[[str], None] | None = None) -> AsyncIterator[AudioChunk]:
        """One tts stream's chunks in order (a session's id announcement goes to ``on_announce``)."""
        request_id, done = uuid.uuid4().hex, asyncio.Event()
        request = _infer_request(self.model, arrays, request_id, stream=True)
        call = self._stub.ModelStreamInfer(_asend_then_wait(request, done), timeout=self.timeout_s)
        reorder, finished, refused = ChunkReorderer(), False, False
        try:
            async for response in call:
                refused = bool(response.error_message)
                chunk, final = _parse(response)
                if chunk is not None and chunk.index == protocol.SESSION_ANNOUNCE_INDEX and on_announce is not None:
                    on_announce(chunk.request_id)
                elif chunk is not None:
                    for ready in reorder.push(chunk):
                        yield ready
                if final:
                    finished = True
                    break
            if not finished:
                raise Unavailable("the stream closed before its final response")
            reorder.finish()
        except grpc.RpcError as e:
            raise _rpc_error(e) from None
        finally:
            if finished or refused:
                await _aend(call, done, self.drain_timeout_s)
            else:
                call.cancel()
                done.set()

    def open_session(self, text: str, **fields) -> "SpeechSession":
        """A session: ``text`` is spoken first; later text goes in with :meth:`SpeechSession.append`, which
        the server appends to the same engine request (one stream, only new tokens prefilled). Iterate
        :meth:`SpeechSession.chunks`; end with ``append(end=True)``. With several endpoints the session
        goes to the first the router picks (and stays there)."""
        if self._replicas:
            return self._replicas[self.router.order(fields.get("voice_id"))[0]].open_session(text, **fields)
        return SpeechSession(self, text, fields)

    async def control(self, arrays: dict[str, np.ndarray]) -> None:
        """A one-request stream to tts that answers with its FINAL alone (a stop or an append); the
        server's error is raised typed."""
        done = asyncio.Event()
        call = self._stub.ModelStreamInfer(
            _asend_then_wait(_infer_request(self.model, arrays, uuid.uuid4().hex, stream=True), done),
            timeout=self.timeout_s)
        try:
            async for response in call:
                if _parse(response)[1]:
                    break
        except grpc.RpcError as e:
            raise _rpc_error(e) from None
        finally:
            await _aend(call, done, self.drain_timeout_s)

    async def synthesize(self, text: str, **fields) -> Synthesis:
        collector = _Collector()
        async for chunk in self.stream(text, **fields):
            collector.add(chunk)
        return collector.result(fields.get("sample_format"))

    async def voices(self, action: str, **fields) -> list[dict]:
        """register / list / delete (``fields``: see :func:`protocol.voice_inputs`; the admin key is added)."""
        if self._replicas:   # shared voices folder: any replica; a voice's own one warms its prefix
            return await self.router.acall(fields.get("voice_id"), lambda ep: self._replicas[ep].voices(action, **fields))
        keyed = {"admin_key": self.admin_key} if action != "list" else {}
        req = _infer_request(protocol.VOICES, protocol.voice_inputs(action, **fields, **keyed), uuid.uuid4().hex, False)
        try:
            return _voices(await self._stub.ModelInfer(req, timeout=self.timeout_s))
        except grpc.RpcError as e:
            raise _rpc_error(e) from None

    async def close(self) -> None:
        for replica in self._replicas.values():
            await replica.close()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncTTSClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class SpeechSession:
    """One session's stream (:meth:`AsyncTTSClient.open_session`): ``chunks()`` yields its audio in order;
    ``append(text)`` and ``append(end=True)`` may be called while it runs (they wait for the server's id,
    which the stream announces before any audio)."""

    def __init__(self, client: AsyncTTSClient, text: str, fields: dict):
        self.client = client
        self.request_id: str | None = None
        self._announced = asyncio.Event()
        self._failed: BaseException | None = None
        self._text, self._fields = text, fields

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        arrays = protocol.tts_inputs(self._text, open_input=True, **self._fields)
        try:
            async for chunk in self.client._stream(arrays, on_announce=self._on_announce):
                yield chunk
        except BaseException as e:
            self._failed = e
            raise
        finally:
            self._announced.set()   # appends waiting for an id that will not come give up

    def _on_announce(self, request_id: str) -> None:
        self.request_id = request_id
        self._announced.set()

    async def append(self, text: str | None = None, end: bool = False) -> None:
        await self._announced.wait()
        if self.request_id is None:
            raise Unavailable(f"the session's stream ended before it started ({self._failed!r})")
        await self.client.control(protocol.append_tensors(self.request_id, text, end))
