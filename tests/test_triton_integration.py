"""Against a real Triton server (the CPU profile's repository, tiny checkpoint, free ports): streaming
equals the in-process engine, concurrency, voices, cancellation, bad input, metrics, restart, the
say CLI and the demo. One server for the module (restarted once, to show voices persist)."""

import asyncio
import contextlib
import dataclasses
import importlib.util
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fish_s2.client import AsyncTTSClient, TTSClient
from fish_s2.request import AlreadyExists, InvalidArgument, NotFound, RequestError
from fish_s2.engine import Engine
from fish_s2.request import EngineRequest, collect
from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.request import SamplingParams
from fish_s2.serving import metrics
from fish_s2.serving.demo import DEMO_TEXT
from fish_s2.serving.repository import generate
from fish_s2.serving.runtime import ReferenceEncoder, memory_plan
from fish_s2.serving.server import TritonServer, free_ports, pytriton_dist
from fish_s2.request import ChunkPlan
from fish_s2.request.dialogue import text_batches
from fish_s2.streaming import decode_chunks

REPO = Path(__file__).resolve().parents[1]

try:
    pytriton_dist()
except FileNotFoundError as e:
    pytest.skip(f"no Triton server binary: {e}", allow_module_level=True)

PLAN = ChunkPlan(first_chunk_frames=4, chunk_frames=7, context_frames=5)


@pytest.fixture(scope="module")
def deployment(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    cfg = generate("cpu", tiny_checkpoint, root / "art", root / "repo")
    server = TritonServer(root / "repo", root / "run", *free_ports(3)).start()
    yield server, cfg
    server.stop()


@pytest.fixture(scope="module")
def client(deployment):
    with TTSClient(deployment[0].grpc_url, timeout_s=120, admin_key=deployment[0].admin_key) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny, deployment):
    """In-process: the audio the server should stream for (text, voice codes, seed, max_frames, plan)."""
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    cfg = deployment[1]   # the engine block as dual_ar resolves it (slots derived from the memory)
    engine = Engine(tiny.model, dataclasses.replace(cfg.engine, **memory_plan(cfg).engine_settings()))

    def run(text, seed, max_frames, plan=deployment[1].engine.chunk_plan, voice=None):
        prompt, prefix_len = builder.request(text, [] if voice is None else [voice])
        handle = engine.submit(EngineRequest(prompt, SamplingParams(seed=seed), max_frames=max_frames,
                                             prefix_len=prefix_len, chunk_plan=plan))
        while engine.rows or engine.stats()["queued"]:
            engine.step()
        chunks, done = collect(handle)
        assert done.reason in ("stop", "length"), done
        return np.concatenate(decode_chunks(tiny.codec, chunks)), done.n_frames

    return run


def _metrics(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        return r.read().decode()


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_streamed_request_equals_the_engine(client, reference, tiny):
    text = "Hello! [laugh] This is Fish S2 streaming from Triton."
    chunks = list(client.stream(text, seed=11, max_frames=30, first_chunk_frames=PLAN.first_chunk_frames,
                                chunk_frames=PLAN.chunk_frames, context_frames=PLAN.context_frames))
    expected, n_frames = reference(text, 11, 30, PLAN)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.audio.size for c in chunks] == [n * tiny.codec.frame_length for n in PLAN.sizes(n_frames)]
    audio = np.concatenate([c.audio for c in chunks])
    assert audio.size == n_frames * tiny.codec.frame_length and chunks[0].sample_rate == tiny.codec.sample_rate
    assert np.allclose(audio, expected, atol=1e-4), np.abs(audio - expected).max()
    pcm = client.synthesize(text, seed=11, max_frames=30, first_chunk_frames=PLAN.first_chunk_frames,
                            chunk_frames=PLAN.chunk_frames, context_frames=PLAN.context_frames, sample_format="int16")
    assert pcm.audio.dtype == np.int16 and np.abs(pcm.audio.astype(np.int32) - np.round(expected * 32767)).max() <= 4


def test_eight_concurrent_streams_each_equal_their_solo_run(deployment, reference):
    jobs = [(f"Stream number {i} says hello.", 100 + i, 8 + i) for i in range(8)]

    async def run_all():
        async with AsyncTTSClient(deployment[0].grpc_url, timeout_s=120) as aclient:
            return await asyncio.gather(*(aclient.synthesize(t, seed=s, max_frames=m) for t, s, m in jobs))

    results = asyncio.run(run_all())
    for (text, seed, max_frames), result in zip(jobs, results):
        expected, _ = reference(text, seed, max_frames)
        assert result.audio.shape == expected.shape and np.allclose(result.audio, expected, atol=1e-4), text


def test_voice_register_use_list_delete(client, deployment, reference):
    rate = 16000
    t = np.arange(rate, dtype=np.float32) / rate
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    info = client.register_voice("alice", audio, rate, "A reference sentence.")
    assert info["voice_id"] == "alice" and info["frames"] > 0
    assert "alice" in [v["voice_id"] for v in client.list_voices()]
    got = client.synthesize("Speak with my voice.", voice_id="alice", seed=5, max_frames=16)
    codes = torch.from_numpy(ReferenceEncoder(deployment[1])(audio, rate))     # the server's encoding, in-process
    expected, _ = reference("Speak with my voice.", 5, 16, voice=Reference("A reference sentence.", codes))
    assert np.allclose(got.audio, expected, atol=1e-4)
    with pytest.raises(AlreadyExists, match="voice_id: 'alice' is already registered"):
        client.register_voice("alice", audio, rate, "Again.")
    assert client.delete_voice("alice") == {"voice_id": "alice", "deleted": True}
    assert "alice" not in [v["voice_id"] for v in client.list_voices()]
    with pytest.raises(NotFound, match="voice_id: unknown voice 'alice'"):
        client.synthesize("Speak with my voice.", voice_id="alice", max_frames=4)
    with pytest.raises(NotFound, match="voice_id: unknown voice 'alice'") as e:
        client.delete_voice("alice")
    assert e.value.status == "NOT_FOUND"
    for bad in ("a/b", "../alice", "x" * 65, ".."):
        with pytest.raises(InvalidArgument, match="^voice_id: must match") as e:
            client.register_voice(bad, audio, rate, "Bad id.")
        assert e.value.status == "INVALID_ARGUMENT"
        with pytest.raises(InvalidArgument, match="voice_id: must match"):
            client.synthesize("Hi.", voice_id=bad, max_frames=4)
    client.register_voice("bob", audio, rate, "Bob's reference.")   # kept for the restart test


DIALOGUE = ("<|speaker:0|>Good morning! Did the storm keep you awake last night as well? "
            "<|speaker:1|>It did, the windows rattled for hours and the cat hid under the bed. "
            "<|speaker:0|>Then we both need a strong coffee before the meeting starts. "
            "<|speaker:1|>Agreed. I will make it, you find the slides.")


def test_two_voice_dialogue_streams_as_one_request(client, deployment, tiny):
    """4 turns in 2 batches (chunk_length 160): one stream equal to the in-process engine's, contiguous chunk
    indices across the batch boundary, and the second batch prefilled from its new tokens only."""
    server, cfg = deployment
    rate, t = 16000, np.arange(16000, dtype=np.float32) / 16000
    voices = {}
    for name, hz in (("dlg_a", 150), ("dlg_b", 260)):
        audio = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
        client.register_voice(name, audio, rate, f"This is voice {name}.")
        voices[name] = Reference(f"This is voice {name}.", torch.from_numpy(ReferenceEncoder(cfg)(audio, rate)))
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    dialogue = builder.dialogue(text_batches(DIALOGUE, 160), list(voices.values()))
    assert len(dialogue.turns) == 1 and dialogue.batches[1].count("<|speaker:") == 2
    engine = Engine(tiny.model, dataclasses.replace(cfg.engine, **memory_plan(cfg).engine_settings()))
    handle = engine.submit(EngineRequest(dialogue.prompt, SamplingParams(seed=21), max_frames=9, chunk_plan=PLAN,
                                         prefix_len=dialogue.prefix_len, turns=dialogue.turns))
    while engine.rows or engine.stats()["queued"]:
        engine.step()
    expected_chunks, done = collect(handle)
    expected = np.concatenate(decode_chunks(tiny.codec, expected_chunks))

    prefill_before = _metric(_metrics(server), metrics.PREFILL.name)
    fields = dict(voice_id=list(voices), seed=21, max_frames=9, chunk_length=160, first_chunk_frames=PLAN.first_chunk_frames,
                  chunk_frames=PLAN.chunk_frames, context_frames=PLAN.context_frames)
    chunks = list(client.stream(DIALOGUE, **fields))
    assert [c.index for c in chunks] == list(range(len(chunks))) == [c.index for c in expected_chunks]
    turns = [c.turn for c in chunks]               # each chunk names the batch of its last frame
    assert turns == sorted(turns) and turns[0] == 0 and turns[-1] == 1
    audio = np.concatenate([c.audio for c in chunks])
    assert audio.size == done.n_frames * tiny.codec.frame_length == 17 * tiny.codec.frame_length  # 8 + 9 frames
    assert np.allclose(audio, expected, atol=1e-4), np.abs(audio - expected).max()
    assert _metric(_metrics(server), metrics.PREFILL.name) - prefill_before == dialogue.n_tokens
    client.synthesize(DIALOGUE, **fields)          # again: both voices' system block comes from the prefix cache
    assert _metric(_metrics(server), metrics.PREFILL.name) - prefill_before == 2 * dialogue.n_tokens - dialogue.prefix_len
    for name in voices:
        client.delete_voice(name)


SESSION = ("<|speaker:0|>The first sentence of a reply that a language model is still writing.",
           "<|speaker:0|>A second sentence arrives later, while the first one is being spoken.",
           "<|speaker:0|>And the last one closes the reply.")


def test_session_appends_equal_one_dialogue_request(client, deployment):
    """Text appended to a running session (one part while it waits, parked, for more) is spoken as one
    stream equal to the same turns sent as one request; the prefill work is the same (new tokens only)."""
    server = deployment[0]
    fields = dict(seed=4, max_frames=7, chunk_length=100, first_chunk_frames=PLAN.first_chunk_frames,
                  chunk_frames=PLAN.chunk_frames, context_frames=PLAN.context_frames)
    prefill = _metric(_metrics(server), metrics.PREFILL.name)
    whole = client.synthesize(" ".join(SESSION), **fields)
    whole_prefill = _metric(_metrics(server), metrics.PREFILL.name) - prefill

    async def run_session():
        async with AsyncTTSClient(server.grpc_url, timeout_s=120) as aclient:
            session = aclient.open_session(SESSION[0], **fields)
            chunks = []

            async def consume():
                async for chunk in session.chunks():
                    chunks.append(chunk)

            task = asyncio.create_task(consume())
            await session.append(SESSION[1])
            await asyncio.sleep(1.5)                          # the session has run out of text and waits
            await session.append(SESSION[2], end=True)
            await task
            with pytest.raises(NotFound, match="^request_id: no session"):
                await session.append("Too late.")
            return chunks

    prefill = _metric(_metrics(server), metrics.PREFILL.name)
    chunks = asyncio.run(run_session())
    assert [c.index for c in chunks] == list(range(len(chunks)))
    audio = np.concatenate([c.audio for c in chunks])
    assert audio.shape == whole.audio.shape and np.allclose(audio, whole.audio, atol=1e-4)
    assert _metric(_metrics(server), metrics.PREFILL.name) - prefill == whole_prefill
    assert _metric(_metrics(server), metrics.ACTIVE.name) == 0 and client.ready()


def test_cancel_mid_stream_frees_the_engine_slot(client, deployment):
    server = deployment[0]
    frames_before = _metric(_metrics(server), metrics.FRAMES.name)
    stream = client.stream("A long sentence that will not be finished.", max_frames=1000,
                           first_chunk_frames=2, chunk_frames=2)
    assert [next(stream).index, next(stream).index] == [0, 1]
    stream.close()                                   # cancels the gRPC stream: tts stops the engine request
    deadline = time.monotonic() + 20
    while _metric(_metrics(server), metrics.ACTIVE.name) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    text = _metrics(server)
    assert _metric(text, metrics.ACTIVE.name) == 0
    assert _metric(text, metrics.FRAMES.name) - frames_before < 200       # far from the 1000 asked for
    for i in range(2):
        audio = client.synthesize(f"After the cancel {i}.", max_frames=6).audio
        assert 0 < audio.size <= 6 * 2048 and audio.size % 2048 == 0

    async def abandon_async_streams():
        async with AsyncTTSClient(server.grpc_url, timeout_s=120) as aclient:
            async def abandon(i):
                async with contextlib.aclosing(aclient.stream(f"Abandoned {i}.", max_frames=1000,
                                                              first_chunk_frames=2, chunk_frames=2)) as stream:
                    async for chunk in stream:
                        if chunk.index == 1:
                            break
            await asyncio.gather(*(abandon(i) for i in range(3)))

    frames_before = _metric(_metrics(server), metrics.FRAMES.name)
    asyncio.run(abandon_async_streams())
    deadline = time.monotonic() + 2                  # the server sees each cancel and frees the slot
    while _metric(_metrics(server), metrics.ACTIVE.name) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    text = _metrics(server)
    assert _metric(text, metrics.ACTIVE.name) == 0 and _metric(text, metrics.FRAMES.name) - frames_before < 300


@pytest.mark.parametrize("fields, field", [
    (dict(text=""), "text"),
    (dict(text="x" * 5000), "text"),
    (dict(voice_id="nobody"), "voice_id"),
    (dict(temperature=3.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(max_frames=0), "max_frames"),
    (dict(max_frames=10**6), "max_frames"),
    (dict(first_chunk_frames=0), "first_chunk_frames"),
    (dict(sample_format="mp3"), "sample_format"),
    (dict(reference_audio=np.zeros(100, np.float32), reference_sample_rate=16000), "reference_text"),
    (dict(reference_audio=np.zeros(100, np.float32), reference_sample_rate=100, reference_text="t"),
     "reference_sample_rate"),
    (dict(text="<|speaker:0|>Hi. <|speaker:2|>Who?", voice_id=["v0", "v1"]), "text"),    # a speaker with no voice
    (dict(voice_id=["v0", "v1", "v2", "v3", "v4"]), "voice_id"),                       # more than max_voices
    (dict(text="<|speaker:0|>Hi. <|speaker:1|>  "), "text"),                           # an empty turn
    (dict(text="<|speaker:0|>Hi.", chunk_length=5), "chunk_length"),
])
def test_bad_input_is_named_and_the_server_stays_healthy(client, deployment, fields, field):
    text = fields.pop("text", "Valid text.")
    with pytest.raises(RequestError, match=rf"\b{field}: "):
        client.synthesize(text, **fields)
    assert deployment[0].alive() and client.ready()


def test_server_still_serves_after_bad_input(client):
    assert client.synthesize("Still fine.", max_frames=5).audio.size > 0


def test_metrics_endpoint_shows_custom_metrics(deployment):
    text = _metrics(deployment[0])
    for d in metrics.ALL:
        assert f"# TYPE {d.name} {d.kind}" in text, d.name
    assert _metric(text, metrics.TTFA.name + "_count") >= 1
    assert _metric(text, metrics.RTF.name + "_count") >= 1 and _metric(text, metrics.RTF.name + "_sum") > 0
    assert _metric(text, metrics.FRAMES.name) > 0
    assert _metric(text, metrics.PREFIX_HITS.name) >= 1 and _metric(text, metrics.PREFIX_MISSES.name) >= 1
    assert "nv_inference_request_success" in text            # Triton's own, alongside


def test_voices_survive_a_restart_and_the_say_cli(deployment, tmp_path):
    server = deployment[0]
    assert server.stop() == 0            # a clean stop: every model unloaded within the exit timeout
    server.start()
    deadline = time.monotonic() + 20     # dual_ar warms the registered voice's prefix at start
    while _metric(_metrics(server), metrics.PREFIX_MISSES.name) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(_metrics(server), metrics.PREFIX_MISSES.name) == 1
    say = [sys.executable, str(REPO / "client" / "say.py")]
    listed = subprocess.run(say + ["voices", "--url", server.grpc_url, "list"], capture_output=True, text=True)
    assert listed.returncode == 0 and '"voice_id": "bob"' in listed.stdout, listed.stderr
    out = tmp_path / "bob.wav"
    spoken = subprocess.run(say + ["Hello from Bob.", "--voice", "bob", "--max-frames", "8", "--seed", "2",
                                   "-o", str(out), "--url", server.grpc_url], capture_output=True, text=True)
    assert spoken.returncode == 0, spoken.stderr
    assert "time to first audio:" in spoken.stdout and "RTF:" in spoken.stdout
    data, rate = sf.read(out)
    assert rate == 44100 and data.size == 8 * 2048
    assert _metric(_metrics(server), metrics.PREFIX_HITS.name) == 1      # bob's prefix came from the cache
    bad = subprocess.run(say + ["Hi.", "--voice", "../x", "-o", str(out), "--url", server.grpc_url],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "voice_id: must match" in bad.stderr
    dialogue = subprocess.run(say + ["<|speaker:0|>Hello from Bob. <|speaker:1|>And from Bob again.", "--voice", "bob",
                                     "--voice", "bob", "--max-frames", "5", "-o", str(out), "--url", server.grpc_url],
                              capture_output=True, text=True)
    assert dialogue.returncode == 0, dialogue.stderr
    assert sf.read(out)[0].size == 5 * 2048          # one batch (two short turns): one stream
    refused = subprocess.run(say + ["voices", "--url", server.grpc_url, "delete", "bob"],
                             capture_output=True, text=True)         # no admin key: refused
    assert refused.returncode == 1 and "admin_key: missing or wrong" in refused.stderr
    deleted = subprocess.run(say + ["voices", "--url", server.grpc_url, "--admin-key-file", str(server.admin_key_path),
                                    "delete", "bob"], capture_output=True, text=True)
    assert deleted.returncode == 0 and '"deleted": true' in deleted.stdout


def test_demo_writes_the_expected_wav(tiny_checkpoint, tmp_path, reference):
    out = tmp_path / "demo.wav"
    run = subprocess.run([sys.executable, "-m", "fish_s2.serving.demo", "demo", "--checkpoint", str(tiny_checkpoint),
                          "--artifacts", str(tmp_path / "artifacts"), "--max-frames", "24", "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"time to first audio: \d+ ms, RTF: \d", run.stdout), run.stdout
    if importlib.util.find_spec("fish_s2.export.__main__") is not None:   # exported: the shipped CPU codec path
        assert "codec onnx" in run.stdout, run.stdout
    data, rate = sf.read(out, dtype="float32")
    expected, n_frames = reference(DEMO_TEXT, 0, 24)
    assert rate == 44100 and data.size == n_frames * 2048
    assert np.allclose(data, np.clip(expected, -1, 1), atol=2 / 32767)


def test_onnx_fast_ar_serving_option(tiny_checkpoint, tmp_path, reference):
    """The CPU profile with ``fast_ar_runtime: onnx`` (the exported fast AR in ONNX Runtime inside the
    engine's step) serves the same audio as the torch fast AR."""
    from fish_s2.export.onnx_export import export_fast_ar

    art = tmp_path / "art"
    export_fast_ar(tiny_checkpoint, art / "onnx" / "fast_ar.onnx")
    cfg = generate("cpu", tiny_checkpoint, art, tmp_path / "repo", overrides={"fast_ar_runtime": "onnx"})
    assert cfg.fast_ar_runtime == "onnx" and cfg.fast_ar_onnx == str((art / "onnx" / "fast_ar.onnx").resolve())
    with TritonServer(tmp_path / "repo", tmp_path / "run", *free_ports(3)) as server:
        with TTSClient(server.grpc_url, timeout_s=120) as onnx_client:
            got = onnx_client.synthesize("The fast AR runs in ONNX Runtime.", seed=21, max_frames=20)
    expected, _ = reference("The fast AR runs in ONNX Runtime.", 21, 20)
    assert got.audio.shape == expected.shape and np.allclose(got.audio, expected, atol=1e-4)
