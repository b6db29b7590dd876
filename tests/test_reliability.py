"""Reliability against the real server (CPU profile, tiny checkpoint, free ports, bounded in time):
a bad-input matrix through gRPC and HTTP; 50 streams abandoned at random points by an owner's STOP,
a closed channel and tritonclient's stream cancellation, after which the engine is idle within 2 s,
no stream ran on for more than one chunk, fresh requests succeed and the server stops cleanly; and a
foreign STOP cannot cut anyone's stream."""

import contextlib
import json
import os
import queue
import random
import re
import resource
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2_grpc

from fish_s2.client import TTSClient, _infer_request
from fish_s2.request import Cancelled, ChunkPlan, InvalidArgument, NotFound, from_wire
from fish_s2.serving import metrics
from fish_s2.serving import protocol as p
from fish_s2.serving.openai_api import DEFAULT_MODEL, SpeechProcess
from fish_s2.serving.repository import generate
from fish_s2.serving.server import TritonServer, free_ports, process_tree, pytriton_dist

try:
    pytriton_dist()
except FileNotFoundError as e:
    pytest.skip(f"no Triton server binary: {e}", allow_module_level=True)

FRAME = 2048
ONE_BY_ONE = dict(first_chunk_frames=1, chunk_frames=1, context_frames=0)   # every frame streamed at once
STEADY_CHUNK = ChunkPlan().chunk_frames                                      # "one chunk" of the default plan


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    generate("cpu", tiny_checkpoint, root / "art", root / "repo")
    # a generous exit timeout: unloading six python models can take long on a loaded 2-core machine;
    # what must hold is that nothing is in flight and every model unloads (no "Exit timeout expired")
    with _core_files_in(root / "cwd"):   # its processes may dump core into root/cwd (see the last test)
        s = TritonServer(root / "repo", root / "run", *free_ports(3), exit_timeout_s=45).start()
    s.cwd = root / "cwd"
    yield s
    s.stop()


@contextlib.contextmanager
def _core_files_in(cwd: Path):
    """Processes started inside run in ``cwd`` and, where the system writes core files into the working
    directory (core_pattern a plain file name), may write them (soft limit raised to the hard one)."""
    cwd.mkdir(parents=True)
    limit, before = resource.getrlimit(resource.RLIMIT_CORE), os.getcwd()
    os.chdir(cwd)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (limit[1], limit[1]))
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, limit)
        os.chdir(before)


def _core_files_observable() -> bool:
    try:
        pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    except OSError:
        return False
    return bool(resource.getrlimit(resource.RLIMIT_CORE)[1] != 0 and pattern and "/" not in pattern
                and not pattern.startswith("|"))


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        return float(re.search(rf"^{name} (\S+)$", r.read().decode(), re.M).group(1))


def _in_flight(server) -> float:
    return _metric(server, metrics.ACTIVE.name) + _metric(server, metrics.QUEUED.name)


# ------------------------------------------------------------------ raw clients (not this package's)

def _raw_stream(url: str, arrays: dict, timeout: float = 60):
    """One tts request through tritonclient's stream with the given raw tensors: its typed error, or None."""
    responses: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        inputs = []
        for name, (array, dtype) in arrays.items():
            tensor = tc.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        client.async_stream_infer(p.TTS, inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                return from_wire(error.message(), error.status())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return None
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def _tensors(text="Hello.", **fields) -> dict:
    arrays = p.tts_inputs(text, **fields)
    specs = {s.name: s for s in p.TTS_INPUTS}
    return {name: (a, specs[name].wire_type) for name, a in arrays.items()}


def _f(name, value, dtype="FP32", np_dtype=np.float32):
    return {name: (np.array([value], dtype=np_dtype), dtype)}


GRPC_CASES = [   # (tensors, expected error class, field named first in the message)
    ({k: v for k, v in _tensors(seed=1).items() if k != "TEXT"}, InvalidArgument, "text"),
    (_tensors(""), InvalidArgument, "text"),
    (_tensors("   "), InvalidArgument, "text"),
    (_tensors("x" * 5000), InvalidArgument, "text"),
    ({"TEXT": (np.array([b"\xff\xfe"], dtype=object), "BYTES")}, InvalidArgument, "text"),
    (_tensors(voice_id="../etc"), InvalidArgument, "voice_id"),
    (_tensors(voice_id="a/b"), InvalidArgument, "voice_id"),
    (_tensors(voice_id="x" * 65), InvalidArgument, "voice_id"),
    (_tensors(voice_id="-lead"), InvalidArgument, "voice_id"),
    (_tensors(voice_id="nobody"), NotFound, "voice_id"),
    (_tensors(voice_id="a", reference_audio=np.zeros(100, np.float32), reference_sample_rate=16000,
              reference_text="t"), InvalidArgument, "voice_id"),
    (_tensors(reference_audio=np.zeros(100, np.float32), reference_sample_rate=16000), InvalidArgument,
     "reference_text"),
    (_tensors(reference_text="t", reference_sample_rate=16000), InvalidArgument, "reference_audio"),
    (_tensors(reference_audio=np.zeros(100, np.float32), reference_sample_rate=1000, reference_text="t"),
     InvalidArgument, "reference_sample_rate"),
    (_tensors(reference_audio=np.zeros(100, np.float32), reference_sample_rate=10 ** 6, reference_text="t"),
     InvalidArgument, "reference_sample_rate"),
    (_tensors(reference_audio=np.zeros(0, np.float32), reference_sample_rate=16000, reference_text="t"),
     InvalidArgument, "reference_audio"),
    (_tensors(reference_audio=np.full(10, np.nan, np.float32), reference_sample_rate=16000, reference_text="t"),
     InvalidArgument, "reference_audio"),
    (_tensors(reference_audio=np.zeros(16000 * 40, np.float32), reference_sample_rate=16000, reference_text="t"),
     InvalidArgument, "reference_audio"),
    (_tensors(reference_audio=np.zeros(100, np.float32), reference_sample_rate=16000, reference_text=" "),
     InvalidArgument, "reference_text"),
    ({**_tensors(), **_f("TEMPERATURE", 3.0)}, InvalidArgument, "temperature"),
    ({**_tensors(), **_f("TEMPERATURE", -1.0)}, InvalidArgument, "temperature"),
    ({**_tensors(), **_f("TEMPERATURE", np.nan)}, InvalidArgument, "temperature"),
    ({**_tensors(), **_f("TEMPERATURE", np.inf)}, InvalidArgument, "temperature"),
    ({**_tensors(), **_f("TOP_P", 0.0)}, InvalidArgument, "top_p"),
    ({**_tensors(), **_f("TOP_P", 1.5)}, InvalidArgument, "top_p"),
    ({**_tensors(), **_f("TOP_K", 0, "INT32", np.int32)}, InvalidArgument, "top_k"),
    ({**_tensors(), **_f("TOP_K", -5, "INT32", np.int32)}, InvalidArgument, "top_k"),
    ({**_tensors(), **_f("MAX_FRAMES", 0, "INT32", np.int32)}, InvalidArgument, "max_frames"),
    ({**_tensors(), **_f("MAX_FRAMES", 10 ** 6, "INT32", np.int32)}, InvalidArgument, "max_frames"),
    ({**_tensors(), **_f("FIRST_CHUNK_FRAMES", 0, "INT32", np.int32)}, InvalidArgument, "first_chunk_frames"),
    ({**_tensors(), **_f("CHUNK_FRAMES", 0, "INT32", np.int32)}, InvalidArgument, "chunk_frames"),
    ({**_tensors(), **_f("CONTEXT_FRAMES", -1, "INT32", np.int32)}, InvalidArgument, "context_frames"),
    (_tensors(sample_format="mp3"), InvalidArgument, "sample_format"),
]


def test_bad_grpc_input_is_named_and_the_server_stays_healthy(server):
    assert len(GRPC_CASES) + 4 >= 35
    for arrays, kind, field in GRPC_CASES:
        error = _raw_stream(server.grpc_url, arrays)
        assert isinstance(error, kind) and error.field == field, (field, error)
    for arrays, name in (({"TEXT": (np.array([1], np.int32), "INT32")}, "TEXT"),                 # wrong type
                         ({"TEXT": (np.array([b"a", b"b"], dtype=object), "BYTES")}, "TEXT"),  # wrong shape
                         ({**_tensors(), "TOP_K": (np.array([1, 2], np.int32), "INT32")}, "TOP_K"),
                         ({**_tensors(), "FOO": (np.array([1], np.int32), "INT32")}, "FOO")):  # unknown input
        error = _raw_stream(server.grpc_url, arrays)        # refused by Triton itself, before any model: a
        assert error is not None and name in str(error), error   # message naming the input (no code, see errors.py)
    with TTSClient(server.grpc_url, timeout_s=60) as client:
        assert client.ready() and client.synthesize("Still serving.", max_frames=4).audio.size == 4 * FRAME


def test_bad_http_input_is_named(server):
    with SpeechProcess(server.grpc_url, "127.0.0.1", free_ports(1)[0]) as speech:
        def post(body, raw=None):
            request = urllib.request.Request(f"{speech.url}/v1/audio/speech",
                                             data=raw if raw is not None else json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    return r.status, None
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())["error"]

        base = {"model": DEFAULT_MODEL, "input": "Hi.", "stream": False}
        cases = [({"raw": b"{not json"}, 400, "body"), ([1, 2], 400, "body"), ({**base, "extra": 1}, 400, "extra"),
                 ({**base, "model": "tts-1"}, 400, "model"), ({**base, "input": 7}, 400, "input"),
                 ({**base, "input": ""}, 400, "input"), ({**base, "response_format": "mp3"}, 400, "response_format"),
                 ({**base, "speed": 2}, 400, "speed"), ({**base, "stream": "yes"}, 400, "stream"),
                 ({**base, "seed": 2 ** 70}, 400, "seed"), ({**base, "top_k": 2 ** 32 + 8}, 400, "top_k"),
                 ({**base, "max_frames": 2 ** 32 + 8}, 400, "max_frames"), ({**base, "temperature": "hot"}, 400,
                                                                              "temperature"),
                 ({**base, "voice": ""}, 400, "voice"), ({**base, "voice": "nobody"}, 404, "voice"),
                 ({**base, "temperature": 9}, 400, "temperature")]
        for body, status, field in cases:
            got, error = post(body, body.get("raw") if isinstance(body, dict) else None)
            assert (got, error["param"]) == (status, field), (body, got, error)
        assert post({**base, "max_frames": 4})[0] == 200


# ------------------------------------------------------------------ abandoned streams

def _finished_frames(server) -> dict[str, int]:
    """request id -> frames the engine generated, from dual_ar's end-of-request log lines."""
    log = server.log_path.read_text(errors="replace")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"request ([0-9a-f]{32}) \w+ after (\d+) frames", log)}


# Greedy: a sampled stream of the tiny random model ends on its own (<|im_end|>) about once in 2000 frames,
# now and then before it is abandoned (a stream that was never abandoned: no "t", an AttributeError on a
# flag-only final response, a 60 s wait on tritonclient's stream) or between its owner's STOP and the
# engine (a stopped stream that ends complete). The greedy stream of this text runs 200 frames.
ABANDONED = dict(max_frames=400, temperature=0.0, **ONE_BY_ONE)
ENDED_ON_ITS_OWN = "the stream ended on its own before it was abandoned (the abandoned streams must run longer)"


def _abandon(url: str, how: str, after: int, record: dict) -> None:
    """Stream one request with every frame sent at once, abandon it after ``after`` chunks, ``how``."""
    fields = ABANDONED
    if how == "cancel":           # tritonclient's own stream cancellation
        got: queue.Queue = queue.Queue()
        client = tc.InferenceServerClient(url)
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        specs = {s.name: s for s in p.TTS_INPUTS}
        inputs = []
        for name, a in p.tts_inputs("A long stream to abandon.", **fields).items():
            tensor = tc.InferInput(name, list(a.shape), specs[name].wire_type)
            tensor.set_data_from_numpy(a)
            inputs.append(tensor)
        client.async_stream_infer(p.TTS, inputs, enable_empty_final_response=True)
        for _ in range(after):
            result, error = got.get(timeout=60)
            assert error is None, error
            assert not result.get_response().parameters["triton_final_response"].bool_param, ENDED_ON_ITS_OWN
            record["frames"] += result.as_numpy("AUDIO").size // FRAME
            record["id"] = result.as_numpy("REQUEST_ID")[0].decode()
        record["t"] = time.monotonic()
        client.stop_stream(cancel_requests=True)
        client.close()
        return
    channel = grpc.insecure_channel(url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    done = threading.Event()

    def requests():
        yield _infer_request(p.TTS, p.tts_inputs("A long stream to abandon.", **fields), "mine", stream=True)
        done.wait(120)

    call = stub.ModelStreamInfer(requests(), timeout=120)
    responses = iter(call)
    for _ in range(after):
        response = next(responses)
        assert not response.error_message and response.infer_response.outputs, (response.error_message or
                                                                                  ENDED_ON_ITS_OWN)
        result = tc.InferResult(response.infer_response)
        record["frames"] += result.as_numpy("AUDIO").size // FRAME
        record["id"] = result.as_numpy("REQUEST_ID")[0].decode()
    record["t"] = time.monotonic()
    if how == "close":            # the client goes away under its open stream
        channel.close()
        done.set()
        return
    # how == "stop": the owner stops its own stream by the server-issued id its responses carry
    stop_done = threading.Event()

    def stop_request():
        yield _infer_request(p.TTS, p.stop_tensors(record["id"]), "stop", stream=True)
        stop_done.wait(30)

    for response in stub.ModelStreamInfer(stop_request(), timeout=60):
        assert not response.error_message, response.error_message
        if response.infer_response.parameters["triton_final_response"].bool_param or not response.infer_response.outputs:
            break
    stop_done.set()
    error = None
    for response in responses:     # the stopped stream ends with CANCELLED, never like a complete one
        if response.error_message:
            error = from_wire(response.error_message)
            break
        record["frames"] += tc.InferResult(response.infer_response).as_numpy("AUDIO").size // FRAME
    record["stopped_with"] = error
    done.set()
    channel.close()


def test_fifty_abandoned_streams_free_their_slots_within_one_chunk(server):
    rng = random.Random(0)
    plan = [(how, rng.randint(1, 5)) for how in ("stop", "close", "cancel") for _ in range(17)][:50]
    rng.shuffle(plan)
    records = [{"frames": 0, "id": None, "how": how} for how, _ in plan]
    failed = []

    def abandon(how, after, record):
        try:
            _abandon(server.grpc_url, how, after, record)
        except BaseException as e:   # failed here, not as a missing "t" below
            failed.append((record, repr(e)))

    for wave in range(0, len(plan), 5):
        threads = [threading.Thread(target=abandon, args=(how, after, records[i]))
                   for i, (how, after) in enumerate(plan[wave: wave + 5], start=wave)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    assert not failed, failed
    last = max(r["t"] for r in records)
    while _in_flight(server) > 0 and time.monotonic() - last < 10:
        time.sleep(0.05)
    assert _in_flight(server) == 0 and time.monotonic() - last <= 2.0 + 0.5, "slots not freed within 2 s"
    deadline = time.monotonic() + 10
    while len(ended := _finished_frames(server)) < len(records) and time.monotonic() < deadline:
        time.sleep(0.2)
    for r in records:
        assert r["id"] in ended, r
        assert ended[r["id"]] - r["frames"] <= STEADY_CHUNK, (r, ended[r["id"]])   # ran on at most one chunk
        if r["how"] == "stop":
            assert isinstance(r["stopped_with"], Cancelled), r
    with TTSClient(server.grpc_url, timeout_s=120) as client:     # 8 fresh requests, each complete
        results = [client.synthesize(f"Fresh request {i}.", seed=i, max_frames=12) for i in range(8)]
    assert all(r.audio.size == 12 * FRAME for r in results)


def test_a_foreign_stop_cannot_cut_a_stream(server):
    """A second client knows the victim's Triton request id (its own choice) but not the server-issued
    one: STOP with either a client id or a made-up id leaves the stream whole."""
    from fish_s2.request import new_request_id

    def foreign_stop(rid_value):
        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            arrays = {"STOP": np.array([True]), "REQUEST_ID": np.array([rid_value.encode()], dtype=object)}
            stop = _infer_request(p.TTS, arrays, "victim", stream=True)
            messages = []
            for response in stub.ModelStreamInfer(iter([stop]), timeout=30):
                messages.append(response.error_message)
                break
            return messages

    with TTSClient(server.grpc_url, timeout_s=120) as client:
        chunks = []
        for i, chunk in enumerate(client.stream("The victim's stream goes on.", seed=5, max_frames=60, **ONE_BY_ONE)):
            chunks.append(chunk)
            if i == 2:
                assert foreign_stop("victim")[0].startswith("request_id:")   # not a server-issued id
                foreign_stop(new_request_id())                                # nobody's: no effect
    assert sum(c.audio.size for c in chunks) == 60 * FRAME


def test_admin_protocols_and_voice_changes_need_the_key(server):
    """Logging, model repository, trace and shared memory need the admin key (HTTP header and gRPC
    metadata); health, metadata and inference stay open; voice register/delete need the key too."""
    def http(method, path, body=None, headers=None):
        request = urllib.request.Request(f"http://{server.host}:{server.http_port}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert http("POST", "/v2/logging", {"log_verbose_level": 1}) == 403
    assert http("POST", "/v2/repository/index", {}) == 403
    assert http("GET", "/v2/trace/setting") == 403
    assert http("POST", "/v2/logging", {"log_verbose_level": 0}, {"admin-key": server.admin_key}) == 200
    assert http("GET", "/v2/health/ready") == 200 and http("GET", "/v2") == 200
    client = tc.InferenceServerClient(server.grpc_url)
    with pytest.raises(Exception, match="restricted"):
        client.update_log_settings({"log_verbose_level": 1})
    client.update_log_settings({"log_verbose_level": 0}, headers={"triton-grpc-protocol-admin-key": server.admin_key})
    client.close()
    audio = np.sin(np.arange(16000, dtype=np.float32) / 20).astype(np.float32) * 0.3
    with TTSClient(server.grpc_url, timeout_s=60, admin_key="wrong") as stranger:
        from fish_s2.request import PermissionDenied
        with pytest.raises(PermissionDenied, match="^admin_key:"):
            stranger.register_voice("mallory", audio, 16000, "Not mine to add.")
        assert "mallory" not in [v["voice_id"] for v in stranger.list_voices()]   # listing stays open


def test_openai_voice_routes_need_the_api_key(server):
    import base64
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (np.sin(np.arange(16000) / 15) * 0.3).astype(np.float32), 16000, format="WAV")
    body = {"voice_id": "viaopenai", "reference_text": "Hello.", "reference_audio": base64.b64encode(buf.getvalue()).decode()}
    env_key = {"FISH_S2_ADMIN_KEY": server.admin_key}
    with SpeechProcess(server.grpc_url, "127.0.0.1", free_ports(1)[0], api_key="k3y", env=env_key) as speech:
        def call(method, path, data=None, key=None):
            request = urllib.request.Request(f"{speech.url}{path}", method=method,
                                             data=None if data is None else json.dumps(data).encode(),
                                             headers={"Content-Type": "application/json",
                                                      **({"Authorization": f"Bearer {key}"} if key else {})})
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        assert call("POST", "/v1/voices", body)[0] == 401 and call("DELETE", "/v1/voices/viaopenai")[0] == 401
        status, got = call("POST", "/v1/voices", body, "k3y")
        assert status == 201 and got["data"][0]["voice_id"] == "viaopenai"
        assert "viaopenai" in [v["voice_id"] for v in call("GET", "/v1/voices", key="k3y")[1]["data"]]
        assert call("POST", "/v1/voices", {**body, "reference_audio": "@@"}, "k3y")[0] == 400
        assert call("DELETE", "/v1/voices/viaopenai", key="k3y")[0] == 200
        assert call("DELETE", "/v1/voices/viaopenai", key="k3y")[0] == 404


def test_the_server_stops_cleanly_after_all_of_it(server):
    """Last in this module: SIGTERM after finished, stopped, closed and cancelled streams and refused
    requests exits in time with no in-flight inference reported, and every backend process ends. Without
    the request sweep (fish_s2/serving/request_sweep.c) Triton's gRPC stream handler keeps the requests of
    the streams that were cancelled just after their end or after a refusal, and tts never unloads."""
    stubs = set(process_tree(server.pid)) - {server.pid}
    assert stubs
    assert server.stop() == 0
    log = server.log_path.read_text(errors="replace")
    tail = log[log.rindex("Waiting for in-flight requests to complete"):]
    assert "Exit timeout expired" not in tail and not re.search(r"Found [1-9]\d* model versions that have in-flight", tail)
    time.sleep(1)
    assert not (stubs & set(process_tree(1))), "backend processes left behind"
    # no process crashed on its way out: a metric family left to the python stub's own teardown was
    # destroyed after the stub's shared memory (a SIGSEGV and a core file at every stop; metrics.py)
    if _core_files_observable():
        assert not list(server.cwd.glob("core*")), "a server process dumped core at the stop"
