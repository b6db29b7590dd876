"""The OpenAI-compatible speech endpoint: request validation and the WAV framing (no server needed).
Its end-to-end test against a real Triton server is in tests/test_perf_integration.py."""

import io
import struct
import wave

import numpy as np
import pytest

from fish_s2.client import AudioChunk
from fish_s2.request import InvalidArgument
from fish_s2.serving import protocol
from fish_s2.serving.openai_api import DEFAULT_MODEL, parse_request, pcm16, wav_header


def body(**kw):
    return {"model": DEFAULT_MODEL, "input": "Hello there.", "voice": "default", **kw}


def test_minimal_request():
    text, fmt, stream, fields = parse_request(body(), DEFAULT_MODEL)
    assert (text, fmt, stream) == ("Hello there.", "wav", True)
    assert fields == {"sample_format": "int16"}


def test_voice_and_extensions_reach_the_client():
    _, fmt, stream, fields = parse_request(body(voice="alice", response_format="pcm", stream=False, seed=3,
                                                temperature=0.5, top_k=10, max_frames=99, speed=1.0), DEFAULT_MODEL)
    assert (fmt, stream) == ("pcm", False)
    assert fields == {"sample_format": "int16", "voice_id": "alice", "seed": 3, "temperature": 0.5, "top_k": 10,
                      "max_frames": 99}


def test_dialogue_voices_extension():
    _, _, _, fields = parse_request(body(input="<|speaker:0|>Hi. <|speaker:1|>Hey.", voices=["alice", "bob"],
                                         chunk_length=150), DEFAULT_MODEL)
    assert fields["voice_id"] == ["alice", "bob"] and fields["chunk_length"] == 150
    assert protocol.tts_inputs("x", **fields)["VOICE_ID"].tolist() == [b"alice", b"bob"]


@pytest.mark.parametrize("kw,field", [
    ({"voices": []}, "voices"), ({"voices": "alice"}, "voices"), ({"voices": ["a", 3]}, "voices"),
    ({"voices": ["a"], "voice": "b"}, "voices"), ({"chunk_length": 2 ** 40}, "chunk_length"),
    ({"speed": 1.5}, "speed"), ({"response_format": "mp3"}, "response_format"), ({"input": 3}, "input"),
    ({"model": "tts-1"}, "model"), ({"instructions": "be happy"}, "instructions"), ({"stream": "yes"}, "stream"),
    ({"voice": ""}, "voice"),
    # the tts fields: checked (before any cast) where the request tensors are built
    ({"seed": 1.5}, "seed"), ({"temperature": "hot"}, "temperature"), ({"seed": 2 ** 70}, "seed"),
    ({"top_k": 2 ** 32 + 8}, "top_k"), ({"max_frames": 2 ** 32 + 8}, "max_frames"), ({"top_k": True}, "top_k")])
def test_bad_requests_name_the_field(kw, field):
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        text, _, _, fields = parse_request(body(**kw), DEFAULT_MODEL)
        protocol.tts_inputs(text, **fields)


def test_wav_header_with_known_and_unknown_length():
    samples = np.array([0, 1000, -1000, 32767], dtype=np.int16)
    data = wav_header(44100, 4) + samples.tobytes()
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (44100, 1, 2, 4)
    streamed = wav_header(44100, None)
    assert streamed[:4] == b"RIFF" and struct.unpack("<I", streamed[4:8])[0] == 0xFFFFFFFF
    assert streamed[36:40] == b"data" and struct.unpack("<I", streamed[40:44])[0] == 0xFFFFFFFF


def test_pcm16_from_float_and_int16_chunks():
    f = AudioChunk(0, np.array([0.0, 1.0, -1.0, 2.0], dtype=np.float32), 44100, "r")
    assert np.frombuffer(pcm16(f), "<i2").tolist() == [0, 32767, -32767, 32767]
    i = AudioChunk(0, np.array([5, -5], dtype=np.int16), 44100, "r")
    assert np.frombuffer(pcm16(i), "<i2").tolist() == [5, -5]


@pytest.mark.parametrize("message,code,expected", [
    ("in ensemble 'tts', voice_id: unknown voice 'x' [fish-s2:NOT_FOUND]", None, (404, "voice", "voice: unknown voice 'x'")),
    ("in ensemble 'tts', temperature: must be in [0, 2], got 9 [fish-s2:INVALID_ARGUMENT]", None,
     (400, "temperature", None)),
    ("in ensemble 'tts', busy: 80 requests in flight (limit 80); retry later [fish-s2:BUSY]", None, (429, None, None)),
    ("the engine is shutting down; retry on another server [fish-s2:UNAVAILABLE]", None, (503, None, None)),
    ("connection reset", "UNAVAILABLE", (503, None, None)),
    ("Deadline", "CANCELLED", (499, None, None)),
    ("in ensemble 'tts', decode step failed: boom [fish-s2:INTERNAL]", None, (500, None, None)),
    ("text: no tag, no code", None, (500, None, None))])
def test_server_errors_map_to_http_statuses(message, code, expected):
    from fish_s2.request import from_wire
    from fish_s2.serving.openai_api import error_body

    status, body_ = error_body(from_wire(message, code))
    assert (status, body_["error"]["param"]) == expected[:2]
    if expected[2]:
        assert body_["error"]["message"] == expected[2]


class _PbUtils:
    """The part of triton_python_backend_utils that turns an error into a TritonError."""

    class TritonError:
        INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, ALREADY_EXISTS, CANCELLED = range(6)

        def __init__(self, message, code):
            self.msg, self.code = message, code


def _http_status(error) -> int:
    """What the OpenAI bridge answers for an engine's error that crossed Triton (dual_ar's error
    response, the client's reading of it): the real functions on each side."""
    from fish_s2.request import from_wire
    from fish_s2.serving.adapter import triton_error
    from fish_s2.serving.openai_api import error_body

    return error_body(from_wire("in ensemble 'tts', " + triton_error(_PbUtils, error).msg))[0]


def test_both_engines_errors_give_the_same_http_status(tiny, tiny_checkpoint, tmp_path):
    """Busy and invalid requests, raised by the torch engine and by the TensorRT-LLM engine (over its CPU
    stand-in executor): the same HTTP status from each."""
    import dataclasses

    from fish_s2.engine import Engine, EngineConfig
    from fish_s2.request import Busy, EngineRequest, new_request_id
    from fish_s2.trtllm.convert import convert_checkpoint
    from fish_s2.trtllm.engine import TrtllmEngine
    from trtllm_fakes import FakeExecutor, FakeLLM, fake_sampling_params, sample_prompts

    cfg = EngineConfig(max_active=1, max_queued=1, max_prompt_tokens=400, max_frames=8)
    converted = convert_checkpoint(tiny_checkpoint, tmp_path / "trtllm")
    factory = lambda d, s, e, c: (FakeLLM(FakeExecutor(tiny.model, max_batch=1), step_delay=0.5),  # noqa: E731
                                  fake_sampling_params)
    engines = {"torch": Engine(tiny.model, cfg), "trtllm": TrtllmEngine(converted, cfg, llm_factory=factory).start()}
    prompt = sample_prompts(tiny)[0]
    statuses = {}
    try:
        for name, engine in engines.items():
            with pytest.raises(InvalidArgument) as invalid:
                engine.submit(EngineRequest(prompt, max_frames=9))
            for _ in range(cfg.max_in_flight):
                engine.submit(EngineRequest(prompt, request_id=new_request_id()))
            with pytest.raises(Busy) as busy:
                engine.submit(dataclasses.replace(EngineRequest(prompt)))
            statuses[name] = (_http_status(invalid.value), _http_status(busy.value))
    finally:
        for engine in engines.values():
            engine.stop()
    assert statuses["torch"] == statuses["trtllm"] == (400, 429)


def test_several_triton_endpoints_make_a_fleet_client():
    """--triton A,B: the endpoint routes through fish_s2.routing; with no replica up the answer is 503."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from fish_s2.serving.openai_api import SpeechServer

    async def run():
        speech = SpeechServer("127.0.0.1:1,127.0.0.1:2")
        async with TestClient(TestServer(speech.app())) as client:
            response = await client.post("/v1/audio/speech", json=body(max_frames=4))
            assert len(speech.client._replicas) == 2 and speech.client.router.retries == 1
            return response.status, response.headers.get("Retry-After"), (await response.json())["error"]["code"]

    assert asyncio.run(run()) == (503, "1", "unavailable")
