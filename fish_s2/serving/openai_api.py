"""An OpenAI-compatible ``POST /v1/audio/speech`` endpoint in front of the Triton ``tts`` ensemble.

    python -m fish_s2.serving.openai_api --triton 127.0.0.1:8001[,HOST:PORT...] --port 8000 [--api-key KEY]

Request body (JSON): ``model`` (the served model name), ``input`` (text, inline tags such as
``[laugh]`` welcome), ``voice`` (a registered voice id, or ``default`` for no reference),
``response_format`` ``wav`` (default) or ``pcm`` (raw 16-bit little-endian mono at the codec rate,
given in the ``X-Sample-Rate`` header), ``stream`` (default true: audio is sent chunk by chunk as it
is generated; a streamed WAV carries the "unknown length" sizes 0xFFFFFFFF in its header). Fish
extensions: ``seed``, ``temperature``, ``top_p``, ``top_k``, ``max_frames``, ``chunk_length``, and
``voices`` (a list of registered voice ids for a dialogue: voice i speaks the input's
``<|speaker:i|>`` turns; instead of ``voice``). Anything else, or a
``speed`` other than 1.0, is a 400 naming the field. With an API key configured, requests need
``Authorization: Bearer <key>`` (on every route, voices included). Values are range-checked where the request tensors are built
(:func:`fish_s2.serving.protocol.tts_inputs`) and by the server; errors map to HTTP statuses by their
type (:mod:`fish_s2.request.errors`): 400 invalid, 404 unknown voice, 429 busy, 503 unavailable,
499 cancelled, 500 internal.

Voices: ``GET /v1/voices`` lists them; ``POST /v1/voices`` with ``voice_id``, ``reference_text`` and
``reference_audio`` (a base64 audio file: WAV, FLAC, ...) registers one; ``DELETE /v1/voices/{id}``
deletes one. The endpoint forwards the server's admin key (``$FISH_S2_ADMIN_KEY``) to Triton for
register and delete.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hmac
import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import soundfile as sf
from aiohttp import web

from ..client import AsyncTTSClient, AudioChunk
from ..request import Internal, InvalidArgument, RequestError
from . import protocol
from .speech_stream import SpeechStreams, StreamLimits

DEFAULT_MODEL = "fish-s2-pro"
FORMATS = ("wav", "pcm")
EXTENSIONS = ("seed", "temperature", "top_p", "top_k", "max_frames", "chunk_length")   # tts fields of these names
KNOWN = {"model", "input", "voice", "voices", "response_format", "stream", "speed", *EXTENSIONS}
UNKNOWN_SIZE = 0xFFFFFFFF
OPENAI_FIELDS = {"text": "input", "voice_id": "voice"}   # tts field -> this API's name for it


def wav_header(sample_rate: int, n_samples: int | None) -> bytes:
    """44-byte PCM16 mono WAV header; ``None`` samples = streaming (sizes set to 0xFFFFFFFF)."""
    data = UNKNOWN_SIZE if n_samples is None else 2 * n_samples
    riff = UNKNOWN_SIZE if n_samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            2 * sample_rate, 2, 16) + b"data" + struct.pack("<I", data))


def pcm16(chunk: AudioChunk) -> bytes:
    a = chunk.audio if chunk.audio.dtype == np.int16 else protocol.to_pcm16(chunk.audio)
    return a.astype("<i2").tobytes()


def parse_request(body: object, model_name: str) -> tuple[str, str, bool, dict]:
    """(text, response_format, stream, tts fields) from the JSON body: this API's own fields are
    checked here (InvalidArgument naming the field); the tts fields' values where they are turned
    into tensors and by the server."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "expected a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise InvalidArgument(unknown[0], f"unsupported field (supported: {', '.join(sorted(KNOWN))})")
    if body.get("model") != model_name:
        raise InvalidArgument("model", f"this server serves {model_name!r}, got {body.get('model')!r}")
    text = body.get("input")
    if not isinstance(text, str):
        raise InvalidArgument("input", "must be a string")
    voice = body.get("voice", "default")
    if not isinstance(voice, str) or not voice:
        raise InvalidArgument("voice", "must be a voice id string ('default' for no reference voice)")
    fmt = body.get("response_format", "wav")
    if fmt not in FORMATS:
        raise InvalidArgument("response_format", f"supported formats are {', '.join(FORMATS)}, got {fmt!r}")
    if "speed" in body and body["speed"] != 1.0:
        raise InvalidArgument("speed", f"only 1.0 is supported, got {body['speed']!r}")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidArgument("stream", "must be true or false")
    fields: dict = {"sample_format": "int16", **{key: body[key] for key in EXTENSIONS if key in body}}
    if "voices" in body:
        voices = body["voices"]
        if not (isinstance(voices, list) and voices and all(isinstance(v, str) and v for v in voices)):
            raise InvalidArgument("voices", "must be a non-empty list of voice id strings (voice i speaks "
                                            "<|speaker:i|>)")
        if "voice" in body and voice != "default":
            raise InvalidArgument("voices", "give voice or voices, not both")
        fields["voice_id"] = voices
    elif voice != "default":
        fields["voice_id"] = voice
    return text, fmt, stream, fields


def parse_voice_body(body: object) -> dict:
    """A voice registration: voice_id, reference_text and reference_audio (base64 of an audio file)."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "expected a JSON object")
    unknown = sorted(set(body) - {"voice_id", "reference_text", "reference_audio"})
    if unknown:
        raise InvalidArgument(unknown[0], "unsupported field (supported: voice_id, reference_text, reference_audio)")
    for name in ("voice_id", "reference_text", "reference_audio"):
        if not isinstance(body.get(name), str):
            raise InvalidArgument(name, "required, a string")
    try:
        data, rate = sf.read(io.BytesIO(base64.b64decode(body["reference_audio"], validate=True)), dtype="float32",
                             always_2d=True)
    except (ValueError, RuntimeError, sf.LibsndfileError) as e:
        raise InvalidArgument("reference_audio", f"not a base64 audio file ({e})") from None
    return {"voice_id": body["voice_id"], "reference_text": body["reference_text"],
            "reference_audio": data.mean(axis=1), "reference_sample_rate": rate}


def error_body(e: RequestError, names: dict[str, str] = OPENAI_FIELDS) -> tuple[int, dict]:
    """(HTTP status, OpenAI-style error body) of a typed error; request fields carry the route's names."""
    field, message = e.field, str(e)
    if field in names:
        message = names[field] + message[len(field):]
        field = names[field]
    kind = "invalid_request_error" if e.http < 500 and e.http != 499 else "server_error"
    return e.http, {"error": {"message": message, "type": kind, "param": field, "code": e.status.lower()}}


def _error(e: RequestError, names: dict[str, str] = OPENAI_FIELDS) -> web.Response:
    status, body = error_body(e, names)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return web.json_response(body, status=status, headers=headers)


def _unauthorized() -> web.Response:
    return web.json_response({"error": {"message": "missing or wrong API key", "type": "invalid_request_error",
                                        "param": None, "code": "unauthorized"}}, status=401)


class SpeechServer:
    def __init__(self, triton_url: str, model_name: str = DEFAULT_MODEL, api_key: str | None = None,
                 stream_limits: StreamLimits = StreamLimits()):
        self.triton_url, self.model_name, self.api_key = triton_url, model_name, api_key
        self.client: AsyncTTSClient | None = None
        self.streams = SpeechStreams(lambda: self.client, model_name, stream_limits)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_get("/v1/audio/speech/stream", self.speech_stream)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/voices", self.list_voices)
        app.router.add_post("/v1/voices", self.register_voice)
        app.router.add_delete("/v1/voices/{voice_id}", self.delete_voice)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app) -> None:
        self.client = AsyncTTSClient(self.triton_url)

    async def _stop(self, app) -> None:
        if self.client is not None:
            await self.client.close()

    def _authorized(self, request: web.Request) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    async def speech_stream(self, request: web.Request) -> web.StreamResponse:
        """The WebSocket text-in, speech-out session (:mod:`fish_s2.serving.speech_stream`)."""
        if not self._authorized(request):
            return _unauthorized()
        return await self.streams.handle(request)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        return web.json_response({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                              "owned_by": "fish-s2"}]})

    async def list_voices(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        return await self._voices(lambda: self.client.voices("list"))

    async def register_voice(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        try:
            body = await request.json()
            fields = parse_voice_body(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(InvalidArgument("body", "not valid JSON"), {})
        except RequestError as e:
            return _error(e, {})
        return await self._voices(lambda: self.client.voices("register", **fields), status=201)

    async def delete_voice(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        return await self._voices(lambda: self.client.voices("delete", voice_id=request.match_info["voice_id"]))

    async def _voices(self, call, status: int = 200) -> web.Response:
        try:
            voices = await call()
        except RequestError as e:
            return _error(e, {})
        return web.json_response({"object": "list", "data": voices}, status=status)

    async def speech(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return _unauthorized()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(InvalidArgument("body", "not valid JSON"))
        try:
            text, fmt, stream, fields = parse_request(body, self.model_name)
        except RequestError as e:
            return _error(e)
        chunks = self.client.stream(text, **fields)
        async with contextlib.aclosing(chunks):
            try:  # the first chunk decides the status: errors before it are proper HTTP errors
                first = await anext(chunks, None)
            except RequestError as e:
                return _error(e)
            if first is None:
                return _error(Internal("the server produced no audio"))
            headers = {"Content-Type": "audio/wav" if fmt == "wav" else "audio/pcm",
                       "X-Sample-Rate": str(first.sample_rate)}
            if not stream:
                parts = [pcm16(first)] + [pcm16(c) async for c in chunks]
                data = b"".join(parts)
                head = wav_header(first.sample_rate, len(data) // 2) if fmt == "wav" else b""
                return web.Response(body=head + data, headers=headers)
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            if fmt == "wav":
                await response.write(wav_header(first.sample_rate, None))
            await response.write(pcm16(first))
            try:
                async for chunk in chunks:
                    await response.write(pcm16(chunk))
            except RequestError:  # headers are out: all we can do is end the body early
                pass
            await response.write_eof()
            return response


class SpeechProcess:
    """The endpoint as a child process beside Triton (``make serve SERVE_ARGS=--openai-port 8080``)."""

    def __init__(self, triton_url: str, host: str, port: int, model_name: str = DEFAULT_MODEL,
                 api_key: str | None = None, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        """``env``: extra environment (e.g. ``FISH_S2_ADMIN_KEY``, forwarded to Triton for voice changes);
        ``args``: more command-line options (e.g. ``--max-sessions 4``)."""
        self.triton_url, self.host, self.port, self.model_name, self.api_key = triton_url, host, port, model_name, api_key
        self.env, self.args = env or {}, tuple(args)
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"OpenAI speech API {self.url}/v1/audio/speech"

    def start(self, timeout_s: float = 60.0) -> "SpeechProcess":
        env = {**os.environ, **self.env}
        if self.api_key:
            env["FISH_S2_API_KEY"] = self.api_key
        self._proc = subprocess.Popen([sys.executable, "-m", "fish_s2.serving.openai_api", "--triton", self.triton_url,
                                       "--host", self.host, "--port", str(self.port), "--model-name", self.model_name,
                                       *self.args],
                                      env=env)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the OpenAI endpoint did not come up on {self.url}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def __enter__(self) -> "SpeechProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="OpenAI-compatible speech endpoint over the Triton tts ensemble")
    ap.add_argument("--triton", default="127.0.0.1:8001",
                    help="Triton gRPC address; several comma-separated for a fleet (fish_s2.routing: voice "
                         "affinity, failover before the first audio)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default=DEFAULT_MODEL)
    ap.add_argument("--api-key", default=os.environ.get("FISH_S2_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $FISH_S2_API_KEY, unset = open)")
    defaults = StreamLimits()
    ap.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                    help="WebSocket text sessions open at once (/v1/audio/speech/stream)")
    ap.add_argument("--session-idle-timeout", type=float, default=defaults.idle_timeout_s,
                    help="seconds a text session may go without a message before 'end'")
    args = ap.parse_args(argv)
    limits = StreamLimits(max_sessions=args.max_sessions, idle_timeout_s=args.session_idle_timeout)
    server = SpeechServer(args.triton, args.model_name, args.api_key, limits)
    web.run_app(server.app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
