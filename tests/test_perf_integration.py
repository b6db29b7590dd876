"""Benchmark tools and the OpenAI endpoint against a real Triton server (CPU profile, tiny checkpoint):
the load generator's sweep output, perf_analyzer agreeing with it, and /v1/audio/speech streaming a
valid WAV with the right number of samples."""

import io
import json
import re
import struct
import sys
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from fish_s2.serving.openai_api import DEFAULT_MODEL, SpeechProcess
from fish_s2.serving.repository import generate
from fish_s2.serving.server import TritonServer, free_ports, pytriton_dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "perf"))

try:
    pytriton_dist()
except FileNotFoundError as e:
    pytest.skip(f"no Triton server binary: {e}", allow_module_level=True)

import loadgen  # noqa: E402
import perf_analyzer_sweep  # noqa: E402
from install_perf_analyzer import install  # noqa: E402

FRAME_LENGTH = 2048


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("perf")
    generate("cpu", tiny_checkpoint, root / "art", root / "repo")
    with TritonServer(root / "repo", root / "run", *free_ports(3)) as s:
        yield s


@pytest.fixture(scope="module")
def speech(server):
    with SpeechProcess(server.grpc_url, "127.0.0.1", free_ports(1)[0]) as p:
        yield p


def _post(url, payload, headers=None):
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json",
                                                                     **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_openai_package_streams_a_wav(speech):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{speech.url}/v1", api_key="unused")
    with client.audio.speech.with_streaming_response.create(
            model=DEFAULT_MODEL, voice="default", input="Hello [laugh] from the OpenAI client.",
            response_format="wav", extra_body={"max_frames": 20, "seed": 3}) as response:
        data = b"".join(response.iter_bytes())
        rate = int(response.headers["x-sample-rate"])
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    channels, sample_rate, bits = struct.unpack("<H", data[22:24])[0], struct.unpack("<I", data[24:28])[0], \
        struct.unpack("<H", data[34:36])[0]
    assert (channels, sample_rate, bits) == (1, rate, 16) and data[36:40] == b"data"
    n = (len(data) - 44) // 2
    assert n > 0 and n % FRAME_LENGTH == 0 and n <= 20 * FRAME_LENGTH


def test_non_streamed_wav_has_exact_sizes_and_pcm_matches(speech):
    payload = {"model": DEFAULT_MODEL, "input": "Exact sizes please.", "max_frames": 16, "seed": 5, "stream": False}
    status, headers, wav_bytes = _post(f"{speech.url}/v1/audio/speech", payload)
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    with wave.open(io.BytesIO(wav_bytes)) as w:
        frames = w.readframes(w.getnframes())
        assert w.getnframes() % FRAME_LENGTH == 0 and w.getnframes() > 0
    status, headers, pcm = _post(f"{speech.url}/v1/audio/speech", {**payload, "response_format": "pcm"})
    assert status == 200 and pcm == frames  # same seed: the same samples


def test_bad_requests_are_4xx_naming_the_field(speech):
    url = f"{speech.url}/v1/audio/speech"
    for payload, field in (({"input": "x", "speed": 2.0}, "speed"), ({"input": "x", "response_format": "mp3"},
                                                                      "response_format"),
                           ({"input": "x", "voice": "nobody"}, "voice"), ({"input": "x", "temperature": 5},
                                                                         "temperature")):
        status, _, body = _post(url, {"model": DEFAULT_MODEL, **payload})
        error = json.loads(body)["error"]
        expected = 404 if field == "voice" else 400              # an unknown voice is not found
        assert status == expected and error["param"] == field and error["message"].startswith(field), error


def test_api_key_is_required_when_configured(server):
    with SpeechProcess(server.grpc_url, "127.0.0.1", free_ports(1)[0], api_key="s3cret") as p:
        payload = {"model": DEFAULT_MODEL, "input": "Keyed.", "max_frames": 4, "stream": False}
        assert _post(f"{p.url}/v1/audio/speech", payload)[0] == 401
        assert _post(f"{p.url}/v1/audio/speech", payload, {"Authorization": "Bearer wrong"})[0] == 401
        assert _post(f"{p.url}/v1/audio/speech", payload, {"Authorization": "Bearer s3cret"})[0] == 200


def test_loadgen_sweep_and_perf_analyzer_agree(server, tmp_path):
    result = loadgen.main(["--url", server.grpc_url, "--admin-key-file", str(server.admin_key_path),
                           "--concurrency", "1,2", "--requests", "6", "--warmup", "1",
                           "--max-frames", "24", "--mode", "shared", "--tag", "t", "--out", str(tmp_path)])
    for name in ("loadgen_t_shared.json", "loadgen_t_shared.md", "loadgen_t_shared.png"):
        assert (tmp_path / name).stat().st_size > 0
    levels = result["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2] and all(lv["errors"] == 0 for lv in levels)
    for lv in levels:
        assert lv["requests"] == 6 and 0 < lv["ttfa_s"]["p50"] <= lv["total_s"]["p50"]
        assert lv["audio_s_per_s"] > 0 and lv["triton_stats_delta"]["tts"]["success"] >= 6
        assert lv["playback_gap_s"]["n"] == 6 and 0 <= lv["streams_with_gap"] <= 6
    binary = install(tmp_path / "bin")
    texts = loadgen.read_corpus()
    pa = perf_analyzer_sweep.run(server.grpc_url, [1], texts, loadgen.SHARED_VOICE, 24, 6, binary=binary)
    p50 = pa["levels"][0]["first_response_s"]["p50"]
    # same server, same level: the two measurements of time to first audio agree (make perf-compare checks
    # 25% on a longer run; this short run gets a noise-tolerant bound)
    assert 0.6 < p50 / levels[0]["ttfa_s"]["p50"] < 1.67


def test_unique_voice_mode_sends_references(server, tmp_path):
    result = loadgen.main(["--url", server.grpc_url, "--admin-key-file", str(server.admin_key_path),
                           "--concurrency", "2", "--requests", "2", "--warmup", "0",
                           "--max-frames", "8", "--mode", "unique", "--tag", "u", "--out", str(tmp_path)])
    assert result["levels"][0]["errors"] == 0
    audio, rate, _ = loadgen.reference_voice(1)
    assert rate == 24000 and audio.dtype == np.float32 and not np.array_equal(audio, loadgen.reference_voice(2)[0])


def test_voices_mode_reports_the_replicas_prefix_cache(server, tmp_path):
    result = loadgen.main(["--url", server.grpc_url, "--metrics-url", server.metrics_url,
                           "--admin-key-file", str(server.admin_key_path), "--concurrency", "2", "--requests", "4", "--warmup", "0", "--max-frames", "4", "--mode", "voices", "--voices", "2",
                           "--tag", "v", "--out", str(tmp_path)])
    level = result["levels"][0]
    assert level["errors"] == 0 and level["replicas"][server.grpc_url]["served"] == 4
    rep = level["replicas"][server.grpc_url]
    assert rep["prefix_hits"] + rep["prefix_misses"] == 4 and level["prefix_hit_rate"] == rep["prefix_hits"] / 4
    assert level["prefix_hit_rate"] == 1.0          # registering warmed both voices


def test_dialogue_mode_streams_multi_voice_dialogues(server, tmp_path):
    text, fields = loadgen.request("dialogue", 5, loadgen.read_corpus(), loadgen.argparse.Namespace(
        voice_ids=["a", "b", "c"], max_frames=4))
    assert 3 <= text.count("<|speaker:") <= 8 and text.startswith("<|speaker:0|>")
    assert {int(s) for s in re.findall(r"<\|speaker:(\d+)\|>", text)} == set(range(len(fields["voice_id"])))
    result = loadgen.main(["--url", server.grpc_url, "--admin-key-file", str(server.admin_key_path),
                           "--concurrency", "1,2", "--requests", "3", "--warmup", "0", "--max-frames", "4",
                           "--mode", "dialogue", "--voices", "3", "--tag", "d", "--out", str(tmp_path)])
    for level in result["levels"]:
        assert level["errors"] == 0 and level["requests"] == 3 and level["playback_gap_s"]["n"] == 3


def test_session_mode_reports_segment_latency_and_gaps(server, tmp_path):
    result = loadgen.main(["--url", server.grpc_url, "--admin-key-file", str(server.admin_key_path),
                           "--concurrency", "2", "--requests", "2", "--warmup", "0", "--max-frames", "6",
                           "--mode", "session", "--words-per-s", "40", "--tag", "s", "--out", str(tmp_path)])
    level = result["levels"][0]
    assert level["errors"] == 0 and level["requests"] == 2
    assert level["segment_first_audio_s"]["n"] >= 4 and level["segment_first_audio_s"]["p50"] > 0
    assert level["gap_within_segments_s"]["n"] == 2 == level["gap_between_segments_s"]["n"]
    assert "last word -> first audio" in (tmp_path / "loadgen_s_session.md").read_text()
