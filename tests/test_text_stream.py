"""Streaming text in, audio out: the segmenter, and the WebSocket session of the bridge against a real
Triton server (CPU profile, tiny checkpoint): text sent word by word is one stream equal to the same
segments as one request, a closed socket frees its slot, bad session input is named."""

import asyncio
import base64
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import soundfile as sf
import numpy as np
import pytest

from fish_s2.client import TTSClient
from fish_s2.request.segmenter import Segmenter
from fish_s2.serving import metrics
from fish_s2.serving.openai_api import DEFAULT_MODEL, SpeechProcess
from fish_s2.serving.repository import generate
from fish_s2.serving.server import TritonServer, free_ports, pytriton_dist

SAY = Path(__file__).resolve().parents[1] / "client" / "say.py"


def test_segments_end_at_sentences_never_mid_word_and_keep_the_speaker():
    s = Segmenter(40)
    out = []
    for word in ("<|speaker:1|>Hello there. It costs 3.5 dollars, which is fine! Now a long clause without an end "
                 "of sentence anywhere in sight").split(" "):
        out += s.push(word + " ")
    out += s.flush()
    assert out[:2] == ["<|speaker:1|>Hello there.", "<|speaker:1|>It costs 3.5 dollars, which is fine!"]
    assert all(o.startswith("<|speaker:1|>") and len(o) <= 40 + 13 for o in out)
    words = " ".join(re.sub(r"<\|speaker:\d\|>", "", o) for o in out).split()
    assert words == "Hello there. It costs 3.5 dollars, which is fine! Now a long clause without an end of sentence " \
                    "anywhere in sight".split()
    assert Segmenter().push("No end yet") == [] and Segmenter().flush() == []


class _GoneSession:
    """A server-side session that failed: its stream ends with ``error`` after ``delay`` seconds, while
    appends are refused at once with NotFound (the server no longer knows the request)."""

    def __init__(self, error, delay):
        self.error, self.delay = error, delay

    async def chunks(self):
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return
        yield

    async def append(self, text=None, end=False):
        from fish_s2.request import NotFound
        raise NotFound("request_id", "no such request")


class _OneSessionClient:
    def __init__(self, session):
        self.session = session

    def open_session(self, text, **fields):
        return self.session


@pytest.mark.parametrize("error", [None, "voice_id"])
def test_a_gone_request_reports_the_streams_own_end_not_the_appends_not_found(error):
    """An append that reaches the relay after the failed stream is gone gets NotFound; what the caller
    hears is the stream's own error (or its end by the server), whichever finishes first."""
    from fish_s2.request import InvalidArgument
    from fish_s2.text_session import TextSession

    async def run():
        session = TextSession(_OneSessionClient(_GoneSession(error and InvalidArgument(error, "unknown"), 0.2)))
        await session.send_text("First sentence. Second sentence. ")
        await session.end()
        return session, [c async for c in session.chunks()]

    if error:
        with pytest.raises(InvalidArgument, match="^voice_id"):
            asyncio.run(run())
    else:
        session, chunks = asyncio.run(run())
        assert chunks == [] and session.ended_by_server


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    try:
        pytriton_dist()
    except FileNotFoundError as e:
        pytest.skip(f"no Triton server binary: {e}")
    root = tmp_path_factory.mktemp("textstream")
    generate("cpu", tiny_checkpoint, root / "art", root / "repo")
    triton = TritonServer(root / "repo", root / "run", *free_ports(3)).start()
    bridge = SpeechProcess(triton.grpc_url, "127.0.0.1", free_ports(1)[0],
                           args=("--max-sessions", "10", "--session-idle-timeout", "2")).start()
    yield triton, bridge
    bridge.stop()
    triton.stop()


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        return float(re.search(rf"^{name} (\S+)$", r.read().decode(), re.M).group(1))


START = {"type": "start", "model": DEFAULT_MODEL, "seed": 6, "max_frames": 6, "chunk_length": 100}
REPLY = ("<|speaker:0|>Hello there, this is the first sentence of a streamed reply. "
         "Here comes the second sentence, written a moment later by the model. "
         "And finally a third one that closes the answer for today.")


async def _session(url, messages, delay=0.0, close_after_chunks=None):
    """Send the messages (a delay between them), collect the events and the audio."""
    events, audio = [], []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/v1/audio/speech/stream") as ws:
        async def send():
            for m in messages:
                await ws.send_json(m)
                await asyncio.sleep(delay)

        sender = asyncio.create_task(send())
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                audio.append(np.frombuffer(msg.data, "<i2"))
                continue
            event = msg.json()
            events.append(event)
            if event["type"] == "audio" and "data" in event:
                audio.append(np.frombuffer(base64.b64decode(event["data"]), "<i2"))
            if close_after_chunks and sum(e["type"] == "audio" for e in events) == close_after_chunks:
                await ws.close()
                break
        sender.cancel()
    return events, (np.concatenate(audio) if audio else np.zeros(0, np.int16))


def test_text_word_by_word_is_one_stream_equal_to_one_request(servers):
    triton, bridge = servers
    segments = Segmenter().push(REPLY + " ")
    assert len(segments) == 3
    with TTSClient(triton.grpc_url, timeout_s=120) as client:
        client.synthesize("Warm up.", max_frames=2)        # the voiceless system block into the prefix cache
        prefill = _metric(triton, metrics.PREFILL.name)
        whole = client.synthesize(" ".join(segments), seed=6, max_frames=6, chunk_length=100, sample_format="int16")
        whole_prefill = _metric(triton, metrics.PREFILL.name) - prefill
    messages = [START] + [{"type": "text", "text": w + " "} for w in REPLY.split(" ")] + [{"type": "end"}]
    prefill = _metric(triton, metrics.PREFILL.name)
    events, audio = asyncio.run(_session(bridge.url, messages, delay=0.02))
    assert _metric(triton, metrics.PREFILL.name) - prefill == whole_prefill      # only new tokens per segment
    assert events[0] == {"type": "started"} and events[-1] == {"type": "done", "reason": "end"}
    indices = [e["index"] for e in events if e["type"] == "audio"]
    assert indices == list(range(len(indices)))
    assert audio.size == whole.audio.size == (5 + 5 + 6) * 2048 and np.abs(audio - whole.audio).max() <= 4


def test_closing_the_socket_frees_the_slot_and_later_sessions_succeed(servers):
    triton, bridge = servers
    long = [START | {"max_frames": 400}, {"type": "text", "text": "A sentence that is still being spoken when the "
                                                                 "listener hangs up. "}]
    events, _ = asyncio.run(_session(bridge.url, long, close_after_chunks=2))
    deadline = time.monotonic() + 5
    while _metric(triton, metrics.ACTIVE.name) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(triton, metrics.ACTIVE.name) == 0

    async def eight():
        return await asyncio.gather(*(_session(bridge.url, [START | {"seed": i, "audio": "base64"},
                                                            {"type": "text", "text": f"Session {i} speaks."},
                                                            {"type": "end"}]) for i in range(8)))

    for events, audio in asyncio.run(eight()):
        assert events[-1] == {"type": "done", "reason": "end"} and audio.size == 6 * 2048


@pytest.mark.parametrize("messages, field", [
    ([START | {"voice": "nobody"}, {"type": "text", "text": "Hi."}, {"type": "end"}], "voice_id"),
    ([START, {"type": "text", "text": "Hi."}, {"type": "end"}, {"type": "text", "text": "More."}], "type"),
    ([START, {"type": "text", "text": "x" * 5000}], "text"),
    ([START, {"type": "text", "text": "Waiting forever"}], None),            # idle flush, then the idle timeout
    ([START | {"temperature": 9}, {"type": "text", "text": "Hi."}, {"type": "end"}], "temperature"),  # the server's check
    ([{"type": "text", "text": "no start"}], "type"),
    ([START, {"type": "shout"}], "type"),
    ([START, "not json"], "message"),
])
def test_bad_session_input_is_named_and_the_server_stays_healthy(servers, messages, field):
    triton, bridge = servers

    async def run():
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{bridge.url}/v1/audio/speech/stream") as ws:
            for m in messages:
                await (ws.send_str(m) if isinstance(m, str) else ws.send_json(m))
            return [msg.json() for msg in [m async for m in ws] if msg.type == aiohttp.WSMsgType.TEXT]

    events = asyncio.run(run())
    done = events[-1]
    assert done["type"] == "done" and done["reason"] == "error", events
    assert done["field"] == (field or "idle_timeout") and done["error"].startswith(f"{done['field']}: ")
    deadline = time.monotonic() + 5     # a session that had started is cancelled: its slot frees within a chunk
    while _metric(triton, metrics.ACTIVE.name) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert triton.alive() and _metric(triton, metrics.ACTIVE.name) == 0


def test_say_reads_text_from_stdin_as_it_arrives(servers, tmp_path):
    triton, _ = servers
    out = tmp_path / "reply.wav"
    say = subprocess.Popen([sys.executable, str(SAY), "--stream-text", "-o", str(out), "--url", triton.grpc_url,
                            "--seed", "6", "--max-frames", "6", "--chunk-length", "100", "--format", "int16"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for word in REPLY.split(" "):                 # a language model writing, word by word
        say.stdin.write(word + " ")
        say.stdin.flush()
        time.sleep(0.02)
    say.stdin.close()
    assert say.wait(120) == 0, say.stderr.read()
    audio, rate = sf.read(out, dtype="int16")
    assert rate == 44100 and audio.size == (5 + 5 + 6) * 2048


def test_a_refused_append_ends_the_session_with_its_error(servers):
    """A later segment the server refuses (here over max_text_bytes) ends the stream with that error at once,
    instead of leaving the session waiting for text."""
    from fish_s2.client import AsyncTTSClient
    from fish_s2.request import InvalidArgument
    from fish_s2.text_session import TextSession

    triton, _ = servers

    async def run():
        async with AsyncTTSClient(triton.grpc_url, timeout_s=60) as client:
            session = TextSession(client, seed=1, max_frames=400)
            await session.send_text("A first sentence that is fine. ")
            await session.send_text("x" * 5000 + " ")
            await session.end()
            async for _ in session.chunks():
                pass

    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match="^text: 5000 bytes, the limit is 4096"):
        asyncio.run(run())
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 5
    while _metric(triton, metrics.ACTIVE.name) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(triton, metrics.ACTIVE.name) == 0
