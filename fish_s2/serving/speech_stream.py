"""``GET /v1/audio/speech/stream``: a WebSocket session that speaks text while it is being written.

Messages (JSON text frames). The client sends::

    {"type": "start", "model": "fish-s2-pro", "voice": "alice" | "voices": [...], "audio": "pcm" | "base64",
     "idle_flush_s": 0.8, "seed": 1, "temperature": ..., "top_p": ..., "top_k": ..., "max_frames": ...,
     "chunk_length": ...}
    {"type": "text", "text": "any piece of text"}     (any number, any size up to max_delta_bytes)
    {"type": "flush"}                                 (speak what has arrived now)
    {"type": "end"}                                   (no more text; the session ends when it is spoken)

and receives ``{"type": "started"}``, then per chunk ``{"type": "audio", "index": i,
"samples": n, "sample_rate": 44100, "segment": k}`` (k: the segment of the chunk's last frame) followed by a binary frame of n 16-bit little-endian samples (``"audio": "pcm"``) or
``{"type": "audio", "index": i, "samples": n, "data": "<base64>"}``, then one
``{"type": "done", "reason": "end" | "limit" | "cancelled" | "error", ...}`` (with ``error``, ``field``
and ``code`` for an error), after which the server closes the socket. Text is cut into segments by
:class:`fish_s2.request.segmenter.Segmenter` (sentence ends; clause boundaries past a length bound; what
has arrived after ``idle_flush_s`` without more text) and spoken by a :class:`fish_s2.text_session.TextSession`:
the first segment opens a Triton session, each later one is appended to it as the next turn, so the
whole reply is one engine request, one stream and one chunk numbering. Closing the socket
cancels the session (the server frees its slot). Limits, each a clear error: ``max_delta_bytes`` per
message, ``idle_timeout_s`` without a message (before ``end``), ``max_sessions`` at once; a session's
turns and frames are bounded by the server (``max_turns``, ``engine.max_frames``: reason ``limit``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from dataclasses import dataclass

from aiohttp import WSMsgType, web

from ..request import Cancelled, InvalidArgument, RequestError, Unavailable
from ..request.params import real
from ..text_session import TextSession
from . import protocol

AUDIO_MODES = ("pcm", "base64")
START_FIELDS = {"type", "model", "voice", "voices", "audio", "idle_flush_s", "seed", "temperature", "top_p", "top_k",
                "max_frames", "chunk_length"}
TTS_FIELDS = ("seed", "temperature", "top_p", "top_k", "max_frames", "chunk_length")


@dataclass(frozen=True)
class StreamLimits:
    max_sessions: int = 16
    max_delta_bytes: int = 4096
    idle_timeout_s: float = 30.0       # no message for this long before "end": the session ends with an error
    max_segment_chars: int = 200


def parse_start(message: dict, model_name: str) -> tuple[dict, str, float]:
    """(tts fields, audio mode, idle flush seconds) of a start message; InvalidArgument naming the field."""
    unknown = sorted(set(message) - START_FIELDS)
    if unknown:
        raise InvalidArgument(unknown[0], f"unsupported field (supported: {', '.join(sorted(START_FIELDS))})")
    if message.get("model") != model_name:
        raise InvalidArgument("model", f"this server serves {model_name!r}, got {message.get('model')!r}")
    fields = {"sample_format": "int16", **{k: message[k] for k in TTS_FIELDS if k in message}}
    if "voices" in message and "voice" in message:
        raise InvalidArgument("voices", "give voice or voices, not both")
    voices = message.get("voices", message.get("voice"))
    if voices is not None:
        ok = isinstance(voices, str) or (isinstance(voices, list) and voices and all(isinstance(v, str) for v in voices))
        if not ok:
            raise InvalidArgument("voices" if "voices" in message else "voice", "expected a voice id or a list of them")
        fields["voice_id"] = voices
    mode = message.get("audio", "pcm")
    if mode not in AUDIO_MODES:
        raise InvalidArgument("audio", f"expected one of {list(AUDIO_MODES)}, got {mode!r}")
    idle = real("idle_flush_s", message.get("idle_flush_s", 0.8), 0.05, 60.0)
    protocol.tts_inputs("x", **fields)   # every tts field's type and range, named, before the session opens
    return fields, mode, idle


class SpeechStreams:
    """The WebSocket sessions of one bridge (one per socket, at most ``max_sessions`` at once)."""

    def __init__(self, client_of, model_name: str, limits: StreamLimits = StreamLimits()):
        self.client_of, self.model_name, self.limits = client_of, model_name, limits
        self.active = 0

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * self.limits.max_delta_bytes + 4096)
        await ws.prepare(request)
        if self.active >= self.limits.max_sessions:
            await _done(ws, "error", Unavailable(f"{self.active} sessions are open (limit {self.limits.max_sessions}); "
                                                 "retry later"))
            return ws
        self.active += 1
        try:
            await _Session(ws, self.client_of(), self.model_name, self.limits).run()
        finally:
            self.active -= 1
        return ws


class _Session:
    def __init__(self, ws: web.WebSocketResponse, client, model_name: str, limits: StreamLimits):
        self.ws, self.client, self.model_name, self.limits = ws, client, model_name, limits

    async def run(self) -> None:
        speaker = None
        try:
            start = await self._message(self.limits.idle_timeout_s)
            if start is None:
                return
            if start.get("type") != "start":
                raise InvalidArgument("type", "the first message must be {\"type\": \"start\", ...}")
            fields, mode, idle = parse_start(start, self.model_name)
            session = TextSession(self.client, self.limits.max_segment_chars, **fields)
            await self.ws.send_json({"type": "started"})
            speaker = asyncio.create_task(self._speak(session, mode))
            reader = asyncio.create_task(self._read(session, idle))
            done, _ = await asyncio.wait({speaker, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                if reader.exception() is not None:
                    raise reader.exception()
                if reader.result() == "closed":
                    return                  # the client went away: the finally cancels the Triton stream
            await speaker                   # raises the session's error
            reader.cancel()
            await _done(self.ws, "limit" if session.ended_by_server else "end")
        except RequestError as e:
            await _done(self.ws, "cancelled" if isinstance(e, Cancelled) else "error", e)
        finally:
            for task in (speaker,):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            await self.ws.close()

    async def _message(self, timeout: float) -> dict | None:
        """The next JSON message (None: the socket closed); InvalidArgument for anything malformed."""
        try:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
        except asyncio.TimeoutError:
            raise InvalidArgument("idle_timeout", f"no message for {timeout:g} s; the session is closed") from None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return None
        if msg.type != WSMsgType.TEXT:
            raise InvalidArgument("message", "expected JSON text messages")
        try:
            message = json.loads(msg.data)
        except json.JSONDecodeError:
            raise InvalidArgument("message", "not valid JSON") from None
        if not isinstance(message, dict):
            raise InvalidArgument("message", "expected a JSON object")
        return message

    async def _read(self, session: TextSession, idle: float) -> str:
        """Messages in until the socket closes ("closed"); text that has waited ``idle`` seconds is spoken.
        Anything after "end" is an error."""
        while True:
            waiting = session.has_pending_text and not session.input_ended
            timeout = idle if waiting else self.limits.idle_timeout_s if not session.input_ended else None
            try:
                message = await self._message(timeout if timeout is not None else 1e9)
            except InvalidArgument as e:
                if waiting and e.field == "idle_timeout":       # idle: speak what has arrived
                    await session.flush()
                    continue
                raise
            if message is None:
                return "closed"
            kind = message.get("type")
            if session.input_ended:
                raise InvalidArgument("type", f"{kind!r} after \"end\": the session's input has ended")
            if kind == "text":
                text = message.get("text")
                if not isinstance(text, str):
                    raise InvalidArgument("text", "must be a string")
                if len(text.encode("utf-8")) > self.limits.max_delta_bytes:
                    raise InvalidArgument("text", f"{len(text.encode('utf-8'))} bytes in one message, the limit is "
                                                  f"{self.limits.max_delta_bytes}")
                await session.send_text(text)
            elif kind == "flush":
                await session.flush()
            elif kind == "end":
                await session.end()
            else:
                raise InvalidArgument("type", f"expected text, flush or end, got {kind!r}")

    async def _speak(self, session: TextSession, mode: str) -> None:
        async for chunk in session.chunks():
            pcm = chunk.audio if chunk.audio.dtype.kind == "i" else protocol.to_pcm16(chunk.audio)
            data = pcm.astype("<i2").tobytes()
            header = {"type": "audio", "index": chunk.index, "samples": int(pcm.size), "sample_rate": chunk.sample_rate,
                      "segment": chunk.turn}
            if mode == "base64":
                await self.ws.send_json({**header, "data": base64.b64encode(data).decode()})
            else:
                await self.ws.send_json(header)
                await self.ws.send_bytes(data)


async def _done(ws: web.WebSocketResponse, reason: str, error: RequestError | None = None) -> None:
    message = {"type": "done", "reason": reason}
    if error is not None:
        message.update(error=str(error), field=getattr(error, "field", None), code=error.status)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_json(message)
