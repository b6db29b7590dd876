"""The OpenAI-compatible speech endpoint: request validation and the WAV framing (no server needed).
Its end-to-end test against a real Triton server is in tests/test_perf_integration.py."""

import io
import struct
import wave

import numpy as np
import pytest

from fish_s2.client import AudioChunk
from fish_s2.serving.openai_api import DEFAULT_MODEL, BadRequest, parse_request, pcm16, wav_header


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


@pytest.mark.parametrize("kw,field", [
    ({"speed": 1.5}, "speed"), ({"response_format": "mp3"}, "response_format"), ({"input": "  "}, "input"),
    ({"model": "tts-1"}, "model"), ({"instructions": "be happy"}, "instructions"), ({"stream": "yes"}, "stream"),
    ({"seed": 1.5}, "seed"), ({"temperature": "hot"}, "temperature"), ({"voice": ""}, "voice"),
    ({"input": "x" * 5000}, "input")])
def test_bad_requests_name_the_field(kw, field):
    with pytest.raises(BadRequest, match=f"^{field}:"):
        parse_request(body(**kw), DEFAULT_MODEL)


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
    ("in ensemble 'tts', voice_id: unknown voice 'x'", None, (400, "voice", "voice: unknown voice 'x'")),
    ("in ensemble 'tts', temperature: must be in [0, 2], got 9.0", None, (400, "temperature", None)),
    ("text: must not be empty", "INVALID_ARGUMENT", (400, "input", "input: must not be empty")),
    ("in ensemble 'tts', queue full: 64 requests waiting", None, (503, None, None)),
    ("connection reset", "UNAVAILABLE", (503, None, None)),
    ("in ensemble 'tts', decode step failed: boom", None, (500, None, None))])
def test_server_errors_map_to_http_statuses(message, code, expected):
    from fish_s2.client import TTSError
    from fish_s2.serving.openai_api import classify

    status, field, text = classify(TTSError(message, code))
    assert (status, field) == expected[:2]
    if expected[2]:
        assert text == expected[2]
