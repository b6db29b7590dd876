"""The python-backend models' lifecycles against a fake ``triton_python_backend_utils`` and fake
engines/codecs: execute only hands off, every request gets exactly one FINAL response, STOP and
broken clients free engine slots, metrics follow the engine."""

import dataclasses
import importlib.util
import json
import sys
import threading
import time
import types
import weakref

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from fish_s2.checkpoint import load_config
from fish_s2.engine import EngineConfig, check_request
from fish_s2.request import (Busy, ChunkEvent, EngineRequest, Finished, Internal, InvalidArgument, Lifecycle,
                             Unavailable, from_wire, new_request_id)
from fish_s2.serving import metrics
from fish_s2.serving import protocol as p
from fish_s2.serving.bls import SpentStreams
from fish_s2.serving.dispatch import Dispatcher
from fish_s2.memory_plan import check_fits
from fish_s2.serving.repository import TEMPLATES, generate
from fish_s2.serving.runtime import DualARStart, memory_plan
from fish_s2.serving.stops import EarlyStops, StopBoard, instances, stop_board
from fish_s2.request import CodeChunk

FINAL = 1


# ------------------------------------------------------------------ a fake triton_python_backend_utils

class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, msg, code=0):
        super().__init__(msg)
        self.msg, self.code = msg, code

    def message(self):
        return self.msg


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error


class FakeMetric:
    def __init__(self, buckets=None, labels=None):
        self.buckets, self.value, self.observed, self.labels = buckets, 0, [], labels

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value = v

    def observe(self, v):
        self.observed.append(v)


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    created = {}            # name -> the last metric made; (name, sorted labels) -> metric

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind

    def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
        assert all(isinstance(v, str) for v in labels.values()), labels
        metric = MetricFamily.created[self.name] = FakeMetric(buckets, labels)
        MetricFamily.created[(self.name, tuple(sorted(labels.items())))] = metric
        return metric


def _fake_pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.TritonError, pb.Tensor, pb.InferenceResponse = TritonError, Tensor, InferenceResponse
    pb.MetricFamily = MetricFamily
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.using_decoupled_model_transaction_policy = lambda cfg: cfg.get("model_transaction_policy", {}).get("decoupled")
    pb.Logger = types.SimpleNamespace(log_warn=lambda msg: None, log_info=LOG.append)
    return pb


LOG = []


class Sender:
    def __init__(self, fail_first_send=False):
        self.responses, self.finals, self.done = [], [], threading.Event()
        self.fail_first_send = fail_first_send
        self.cancelled = False

    def send(self, response=None, flags=0):
        if self.fail_first_send:
            self.fail_first_send = False
            raise RuntimeError("client gone")
        (self.finals if flags & FINAL else self.responses).append(response)
        if flags & FINAL:
            self.done.set()

    def is_cancelled(self):
        return self.cancelled


class Request:
    def __init__(self, inputs, request_id="", sender=None):
        self.inputs = {k: Tensor(k, v) for k, v in inputs.items()}
        self._id, self.sender = request_id, sender or Sender()

    def request_id(self):
        return self._id

    def get_response_sender(self):
        return self.sender


class FakeEngine:
    """An engine without a model: the real admission (``check_request`` against the tiny checkpoint's
    config, then the request lifecycle: busy, duplicate ids, cancellation, one Finished); the test
    plays the generation's events."""

    def __init__(self, model_cfg, max_in_flight=8):
        self.model_cfg, self.cfg = model_cfg, EngineConfig(max_active=max_in_flight - 1, max_queued=1,
                                                           max_prompt_tokens=64, max_frames=100)
        self.lifecycle = Lifecycle(self.cfg.max_in_flight, self.cfg.chunk_plan, self.cfg.max_frames,
                                   on_cancel=self._cancelled)
        self.requests, self.cancelled, self.stopped = {}, [], False

    def submit(self, req, sink=None):
        check_request(req, self.cfg, self.model_cfg)
        live, handle = self.lifecycle.open(req, sink)
        self.requests[req.request_id] = live
        return handle

    def _cancelled(self, live):
        self.cancelled.append(live.request_id)
        self.lifecycle.finish(live, "cancelled")

    def cancel(self, request_id):
        return self.lifecycle.cancel(request_id)

    def emit(self, request_id, event):
        live = self.requests[request_id]
        if isinstance(event, ChunkEvent):
            self.lifecycle.send(live, event)
        else:
            self.lifecycle.finish(live, event.reason, event.error)

    def stats(self):
        return {"active": len(self.lifecycle), "queued": 0, "frames_generated": 5 * len(self.requests),
                "prefix_cache": {"hits": 2, "misses": 1}}

    def stop(self):
        self.stopped = True
        self.lifecycle.close()
        self.lifecycle.finish_all("cancelled", Unavailable("the server is shutting down"))


# ------------------------------------------------------------------ loading a model.py the way Triton does

@pytest.fixture(scope="module")
def repo(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo")
    generate("cpu", tiny_checkpoint, out / "art", out / "repo")
    return out / "repo"


def _load(monkeypatch, repo, model, pb=None, instance: dict | None = None, **patches):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb or _fake_pb_utils())
    spec = importlib.util.spec_from_file_location(f"{model}_model", TEMPLATES / model / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, value in patches.items():
        monkeypatch.setattr(module, name, value)
    config = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    args = {"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(repo / model), **(instance or {})}
    loaded = module.TritonPythonModel()
    loaded.initialize(args)
    return loaded


def _generate_inputs(fmt="int16", start_ns=42, rows=11, request_id=None):
    req = p.TTSRequest("x", ("x",), (), None, p.SamplingParams(seed=3), 20, p.ChunkPlan(2, 3, 1), fmt)
    return {**p.generate_tensors(np.ones((rows, 9), np.int64), 4, req, start_ns),
            "REQUEST_ID": np.array([(request_id or new_request_id()).encode()], dtype=object)}


def _chunk(request_id, index, frames=3, context=1):
    return ChunkEvent(request_id, CodeChunk(index, np.arange(10 * (frames + context)).reshape(10, -1), context), 0.1)


def _start_with(engine, devices=None):
    """A start_dual_ar giving ``engine`` with the real plan for this machine's memory (planned on the CPU
    whatever device the instance got; ``devices`` collects those)."""
    def start(cfg, codec_batch, log):
        if devices is not None:
            devices.append(cfg.device)
        plan = check_fits(memory_plan(dataclasses.replace(cfg, device="cpu"), codec_batch=codec_batch))
        for line in plan.to_text().splitlines():
            log(line)
        engine.plan = plan
        return DualARStart(engine, plan, 0.25)

    return start


@pytest.fixture()
def dual_ar(monkeypatch, repo, tiny_checkpoint):
    engine = FakeEngine(load_config(tiny_checkpoint)[0])
    model = _load(monkeypatch, repo, "dual_ar", start_dual_ar=_start_with(engine))
    yield model, engine
    model.finalize()


def test_dual_ar_streams_chunks_then_one_final(dual_ar):
    model, engine = dual_ar
    request = Request(_generate_inputs(), "client-1")
    assert model.execute([request]) is None                  # execute only hands off
    (rid, live), = engine.requests.items()
    req = live.req
    assert req.params.seed == 3 and req.max_frames == 20 and req.prefix_len == 4
    assert req.chunk_plan == p.ChunkPlan(2, 3, 1) and req.is_cancelled() is False
    engine.emit(rid, _chunk(rid, 0))
    engine.emit(rid, _chunk(rid, 1))
    engine.emit(rid, Finished(rid, "stop", 6))
    assert request.sender.done.wait(5)
    assert [r.outputs["CHUNK_META"][0] for r in request.sender.responses] == [0, 1]
    meta = p.ChunkMeta.unpack(request.sender.responses[0].outputs["CHUNK_META"])
    assert (meta.context_frames, p.SAMPLE_FORMATS[meta.format_code], meta.start_ns) == (1, "int16", 42)
    assert request.sender.responses[0].outputs["CODES"].shape == (10, 4)
    assert request.sender.responses[0].outputs["REQUEST_ID"][0].decode() == rid   # server-generated
    assert request.sender.finals == [None] and model.dispatch.live() == 0


def test_dual_ar_bad_and_busy_requests_get_one_error_final(dual_ar, monkeypatch):
    model, engine = dual_ar
    missing = _generate_inputs()
    del missing["PROMPT"]
    wrong_rows = Request(_generate_inputs(rows=5))
    requests = [Request(missing), wrong_rows]
    model.execute(requests)
    for r, field in zip(requests, ("prompt", "prompt")):
        (final,) = r.sender.finals
        assert final.error.code == TritonError.INVALID_ARG and final.error.message().startswith(f"{field}:")
    for _ in range(engine.cfg.max_in_flight):   # every place taken
        engine.lifecycle.open(EngineRequest(np.ones((11, 9), np.int64)), lambda event: None)
    busy = Request(_generate_inputs())
    model.execute([busy])
    assert busy.sender.finals[0].error.code == TritonError.UNAVAILABLE
    assert from_wire(busy.sender.finals[0].error.message()).status == "BUSY"
    engine.lifecycle.finish_all("cancelled")
    assert model.dispatch.live() == 0


def test_stop_ends_only_the_request_with_that_server_issued_id(dual_ar):
    model, engine = dual_ar
    mine_id = new_request_id()
    mine, other = Request(_generate_inputs(request_id=mine_id), "same"), Request(_generate_inputs(), "same")
    model.execute([mine, other])
    for bad in ({"STOP": np.array([True])}, {"STOP": np.array([True]), "REQUEST_ID": np.array([b"same"], object)}):
        refused = Request(bad, "same")                       # the client's own Triton id means nothing
        model.execute([refused])
        assert refused.sender.finals[0].error.message().startswith("request_id:")
    stranger = Request(p.stop_tensors(new_request_id()))    # an id nobody holds: nothing happens
    model.execute([stranger])
    assert stranger.sender.finals == [None] and not mine.sender.done.is_set()
    stop = Request(p.stop_tensors(mine_id))
    model.execute([stop])
    assert stop.sender.finals == [None] and mine.sender.done.wait(5)
    assert mine.sender.finals == [None] and not other.sender.done.is_set()   # plain: tts tells the client
    assert engine.cancelled == [mine_id]


def test_engine_error_and_broken_client(dual_ar):
    model, engine = dual_ar
    failing, broken = Request(_generate_inputs()), Request(_generate_inputs(), sender=Sender(fail_first_send=True))
    model.execute([failing, broken])
    rid_fail, rid_broken = list(engine.requests)
    engine.emit(rid_fail, Finished(rid_fail, "error", 0, Internal("decode step failed: boom")))
    assert failing.sender.done.wait(5)
    error = failing.sender.finals[0].error
    assert error.code == TritonError.INTERNAL and "boom" in error.message()
    engine.emit(rid_broken, _chunk(rid_broken, 0))          # the send fails: the engine is told to cancel
    assert broken.sender.done.wait(5) and engine.cancelled == [rid_broken] and broken.sender.finals == [None]


def test_finalize_finishes_every_live_request_and_metrics_follow(dual_ar):
    model, engine = dual_ar
    pending = [Request(_generate_inputs()) for _ in range(3)]
    model.execute(pending)
    assert MetricFamily.created[metrics.ACTIVE.name].value == 3
    assert MetricFamily.created[metrics.PREFIX_HITS.name].value == 2
    model.finalize()
    assert engine.stopped and all(r.sender.finals[0].error.code == TritonError.UNAVAILABLE for r in pending)


def test_dual_ar_exports_its_memory_plan_and_warm_up(dual_ar):
    model, engine = dual_ar
    plan = engine.plan
    gauge = lambda name, **labels: MetricFamily.created[(name, tuple(sorted(labels.items())))].value  # noqa: E731
    assert gauge("fish_s2_kv_slots") == plan.max_active == 16          # derived: the cpu profile's cap
    assert gauge("fish_s2_kv_tokens_per_slot") == plan.tokens_per_slot == 3072
    assert gauge("fish_s2_kv_bytes_per_token") == plan.kv_bytes_per_token
    assert gauge("fish_s2_memory_available_bytes") == plan.available_bytes
    for c in plan.components:
        assert gauge("fish_s2_memory_planned_bytes", component=c.name) == c.bytes
    assert gauge("fish_s2_memory_planned_bytes", component="total") == plan.total_bytes
    assert gauge(metrics.WARMUP.name, model="dual_ar") == 0.25
    assert {n for n, _, _ in plan.to_metrics()} == {d.name for d in metrics.PLAN}
    assert "\n".join(LOG[-len(plan.to_text().splitlines()):]) == plan.to_text()
    assert plan.settings.codec_batch == 8                           # from the repository's codec config


def test_dispatcher_forgets_a_request_whose_submit_failed(tiny_checkpoint):
    engine = FakeEngine(load_config(tiny_checkpoint)[0], max_in_flight=2)
    dispatch = Dispatcher(engine, lambda stream, event: None)
    prompt = np.ones((11, 9), np.int64)
    for _ in range(2):
        dispatch.submit(EngineRequest(prompt), None)
    with pytest.raises(Busy):
        dispatch.submit(EngineRequest(prompt), None)
    with pytest.raises(InvalidArgument, match="^prompt:"):      # the engine's real check
        dispatch.submit(EngineRequest(prompt[:5]), None)
    assert dispatch.live() == 2
    engine.stop()
    dispatch.close()
    assert dispatch.live() == 0


def test_postprocess_trims_context_and_formats(monkeypatch, repo):
    model = _load(monkeypatch, repo, "postprocess")
    fl = model.frame_length
    decoded = np.linspace(-1.5, 1.5, 5 * fl, dtype=np.float32)
    rid = np.array([new_request_id().encode()], dtype=object)
    reqs = [Request({"DECODED": decoded, "CHUNK_META": p.ChunkMeta(0, 2, 1, 0).pack(), "REQUEST_ID": rid}),
            Request({"DECODED": decoded, "CHUNK_META": p.ChunkMeta(1, 2, 0, 0).pack(), "REQUEST_ID": rid})]
    first, second = model.execute(reqs)
    assert first.outputs["AUDIO"].size == 0
    assert np.array_equal(first.outputs["AUDIO_INT16"], p.to_pcm16(decoded[2 * fl:]))
    assert np.array_equal(second.outputs["AUDIO"], decoded[2 * fl:]) and second.outputs["AUDIO_INT16"].size == 0
    assert second.outputs["CHUNK_INDEX"].tolist() == [1] and first.outputs["SAMPLE_RATE"].tolist() == [44100]
    assert len(MetricFamily.created[metrics.TTFA.name].observed) == 1    # chunk 0 only


def test_postprocess_observes_playback_gaps(monkeypatch, repo):
    """A player per stream from its chunk 0: a chunk that arrives after the audio before it has played out
    is a gap (its wait observed); a stream whose earlier chunks went elsewhere is not followed; idle ones
    are forgotten."""
    clock = {"t": 100.0}
    fake_time = types.SimpleNamespace(monotonic=lambda: clock["t"], monotonic_ns=lambda: int(clock["t"] * 1e9))
    model = _load(monkeypatch, repo, "postprocess", time=fake_time)
    chunk_s = 4 * model.frame_length / model.sample_rate

    A, B, C = (new_request_id() for _ in range(3))

    def send(rid: str, index: int, at: float) -> None:
        clock["t"] = at
        model.execute([Request({"DECODED": np.zeros(4 * model.frame_length, np.float32),
                                "CHUNK_META": p.ChunkMeta(index, 0, 0, 0).pack(),
                                "REQUEST_ID": np.array([rid.encode()], dtype=object)})])

    send(A, 0, 100.0)                            # plays until 100 + chunk_s
    send(B, 1, 100.0)                            # b's chunk 0 passed another instance: not followed
    send(A, 1, 100.0 + chunk_s / 2)              # in time
    send(A, 2, 100.0 + 2 * chunk_s + 0.3)        # 0.3 s after the audio ran out
    gaps = MetricFamily.created[metrics.PLAYBACK_GAP.name]
    assert gaps.observed == [pytest.approx(0.3)] and gaps.buckets == list(metrics.PLAYBACK_GAP.buckets)
    assert set(model.players) == {A}
    send(C, 0, 1000.0)                           # a has been idle for longer than STALE_S: forgotten
    assert set(model.players) == {C} and len(MetricFamily.created[metrics.TTFA.name].observed) == 2


def test_codec_decoder_batches_equal_lengths(monkeypatch, repo):
    calls = []

    class Decoder:
        frame_length = 4

        def decode(self, codes):
            calls.append(codes.shape)
            if codes.shape[2] == 7:
                raise RuntimeError("bad chunk")
            return np.repeat(codes[:, 0, :].astype(np.float32), 4, axis=1)

    model = _load(monkeypatch, repo, "codec_decoder", build_codec_decoder=lambda cfg: Decoder())
    plan = EngineConfig().chunk_plan   # warm-up: a first chunk and a steady one with context
    assert calls == [(1, 10, plan.first_chunk_frames), (1, 10, plan.chunk_frames + plan.context_frames)]
    assert MetricFamily.created[(metrics.WARMUP.name, (("model", "codec_decoder"),))].value > 0
    calls.clear()
    codes = [np.full((1, 10, f), i) for i, f in enumerate((3, 5, 3, 7))]
    out = model.execute([Request({"CODES": c}) for c in codes])
    assert sorted(calls) == [(1, 10, 5), (1, 10, 7), (2, 10, 3)]
    for i in (0, 1, 2):
        assert np.array_equal(out[i].outputs["AUDIO"], np.full((1, 4 * codes[i].shape[2]), i, np.float32))
    assert out[3].error.code == TritonError.INTERNAL and "bad chunk" in out[3].error.message()


def test_preprocess_refuses_new_requests_while_draining(monkeypatch, repo, tmp_path):
    flag = tmp_path / "draining"
    monkeypatch.setenv("FISH_S2_DRAIN_FILE", str(flag))
    model = _load(monkeypatch, repo, "preprocess")
    request = lambda: Request({"TEXT": np.array([b"Hello."], dtype=object)})   # noqa: E731
    assert model.execute([request()])[0].error is None
    flag.touch()                                         # what drain() does first
    refused = model.execute([request()])[0].error
    assert refused.code == TritonError.UNAVAILABLE and from_wire(refused.message()).status == "UNAVAILABLE"
    flag.unlink()
    assert model.execute([request()])[0].error is None


def test_a_gpu_instance_runs_on_its_own_gpu(monkeypatch, repo, tiny_checkpoint):
    """instance_group gpus: [0, 1, ...] gives one dual_ar instance per GPU; each builds its engine on the GPU
    Triton names in its args, and labels its metrics with it."""
    import torch

    made, current = [], []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    start = _start_with(FakeEngine(load_config(tiny_checkpoint)[0]), made)
    model = _load(monkeypatch, repo, "dual_ar", instance={"model_instance_kind": "GPU", "model_instance_device_id": "1"},
                  start_dual_ar=start)
    assert made == ["cuda:1"] and current == [1]
    assert MetricFamily.created[metrics.ACTIVE.name].labels == {"gpu": "1"}
    assert (metrics.WARMUP.name, (("gpu", "1"), ("model", "dual_ar"))) in MetricFamily.created   # startup gauges too
    assert (metrics.PLAN[0].name, (("component", "total"), ("gpu", "1"))) in MetricFamily.created
    model.finalize()
    model = _load(monkeypatch, repo, "dual_ar", instance={"model_instance_kind": "CPU", "model_instance_device_id": "0"},
                  start_dual_ar=start)
    assert made[-1] == "cpu" and MetricFamily.created[metrics.ACTIVE.name].labels == {}
    model.finalize()


def test_a_stop_reaches_the_instance_that_runs_its_request(monkeypatch, repo, tiny_checkpoint, tmp_path):
    """--gpus N: Triton hands tts's STOP to any dual_ar instance. One whose engine does not run the request
    posts it on the server's stop board, where the request's own cancellation check finds it."""
    assert isinstance(stop_board({"instance_group": [{"count": 1, "kind": "KIND_CPU"}]}), EarlyStops)
    two_gpus = stop_board({"instance_group": [{"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]}]}, tmp_path / "b")
    assert isinstance(two_gpus, StopBoard) and instances({"instance_group": [{"count": 2, "gpus": [0, 1]}]}) == 4
    board = StopBoard(tmp_path / "stops")
    engines = [FakeEngine(load_config(tiny_checkpoint)[0]) for _ in range(2)]
    a, b = (_load(monkeypatch, repo, "dual_ar", start_dual_ar=_start_with(e), stop_board=lambda config: board)
            for e in engines)
    rid = new_request_id()
    request = Request(_generate_inputs(request_id=rid))
    a.execute([request])
    live = engines[0].requests[rid]
    assert live.req.is_cancelled() is False
    stop = Request(p.stop_tensors(rid))
    b.execute([stop])                                       # the other instance: not its request
    assert stop.sender.finals == [None] and board.posted(rid) and live.req.is_cancelled() is True
    engines[0].lifecycle.poll_cancelled()                   # the engine's next check
    assert request.sender.done.wait(5) and request.sender.finals == [None] and engines[0].cancelled == [rid]
    assert not board.posted(rid)                            # the instance that ran it removed the notice
    session = Request({**_generate_inputs(), "OPEN_INPUT": np.array([True])})
    b.execute([session])                                    # its appends could reach the other instance
    assert "open_input: text sessions need one dual_ar instance" in str(session.sender.finals[0].error)
    for model in (a, b):
        model.finalize()


def test_a_stop_that_overtakes_its_request_cancels_it_when_it_arrives(monkeypatch, repo, tiny_checkpoint):
    """One instance: a client that cancels at once can have tts's STOP reach dual_ar before the request
    itself; the request is then cancelled on arrival, not run to its limit (a session would wait for text)."""
    engine = FakeEngine(load_config(tiny_checkpoint)[0])
    model = _load(monkeypatch, repo, "dual_ar", start_dual_ar=_start_with(engine))
    rid = new_request_id()
    stop = Request(p.stop_tensors(rid))
    model.execute([stop])                                   # nothing runs under this id yet
    assert stop.sender.finals == [None] and model.stops.posted(rid)
    request = Request({**_generate_inputs(request_id=rid), "OPEN_INPUT": np.array([True])})
    model.execute([request])
    assert engine.requests[rid].req.is_cancelled() is True
    engine.lifecycle.poll_cancelled()
    assert request.sender.done.wait(5) and engine.cancelled == [rid] and not model.stops.posted(rid)
    other = new_request_id()
    model.execute([Request(_generate_inputs(request_id=other))])
    assert engine.requests[other].req.is_cancelled() is False
    model.finalize()


# ------------------------------------------------------------------ tts: the relay through tts_pipeline

class PipelineResponse:
    def __init__(self, tensors=(), error=None):
        self._tensors, self._error = list(tensors), error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self):
        return self._tensors


class FakeBLS:
    """Stands in for Triton's BLS calls from tts: tts_pipeline streams a chunk every few ms until dual_ar
    gets a STOP for the request's id, then ends with dual_ar's CANCELLED error (as the real pipeline)."""

    def __init__(self, chunks=200, error=None):
        self.chunks, self.error = chunks, error
        self.calls, self.stops, self.yielded_after_stop = [], [], 0
        self.drained = threading.Event()

    def request_class(self):
        bls = self

        class InferenceRequest:
            def __init__(self, model_name, inputs, requested_output_names):
                self.model, self.inputs = model_name, {t.name(): t.as_numpy() for t in inputs}

            def exec(self, decoupled=False):
                bls.calls.append((self.model, self.inputs))
                if self.model == p.DUAL_AR:
                    bls.stops.append(p.parse_generate_request(lambda n: self.inputs.get(n)).request_id)
                    return iter([PipelineResponse()])
                return bls.stream(self.inputs["STREAM_ID"][0].decode())

        return InferenceRequest

    def stream(self, request_id):
        try:
            if self.error is not None:
                yield PipelineResponse(error=self.error)
                return
            for i in range(self.chunks):
                time.sleep(0.005)
                if request_id in self.stops:
                    yield PipelineResponse(error=TritonError("stopped [fish-s2:CANCELLED]", TritonError.CANCELLED))
                    return
                yield PipelineResponse([Tensor("CHUNK_INDEX", np.array([i], np.int32))])
            yield PipelineResponse()                                   # the flag-only final response
        finally:
            self.drained.set()


def _tts(monkeypatch, repo, bls):
    pb = _fake_pb_utils()
    pb.InferenceRequest = bls.request_class()
    return _load(monkeypatch, repo, "tts", pb=pb)


def test_tts_relays_and_stops_the_engine_request_of_a_client_that_is_gone(monkeypatch, repo):
    bls = FakeBLS()
    model = _tts(monkeypatch, repo, bls)
    try:
        request = Request(p.tts_inputs("Hello."))
        assert model.execute([request]) is None                          # hands off at once
        deadline = time.monotonic() + 5
        while len(request.sender.responses) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        request.sender.cancelled = True                                  # the client disconnects
        assert request.sender.done.wait(5) and bls.drained.wait(5)
        (pipeline, inputs), = [c for c in bls.calls if c[0] == p.TTS_PIPELINE]
        issued = inputs["STREAM_ID"][0].decode()
        assert p.REQUEST_ID.fullmatch(issued) and bls.stops == [issued]  # the server-issued id, stopped once
        assert request.sender.finals == [None] and len(request.sender.responses) < bls.chunks
        assert model.relay.live() == 0
    finally:
        model.finalize()


def test_tts_stop_by_the_owner_ends_the_stream_cancelled(monkeypatch, repo):
    bls = FakeBLS()
    model = _tts(monkeypatch, repo, bls)
    try:
        request = Request(p.tts_inputs("Hello."))
        model.execute([request])
        deadline = time.monotonic() + 5
        while not request.sender.responses and time.monotonic() < deadline:
            time.sleep(0.005)
        issued = bls.calls[0][1]["STREAM_ID"][0].decode()
        refused = [Request({"STOP": np.array([True]), "REQUEST_ID": np.array([b"client-chosen"], dtype=object)}),
                   Request({**p.stop_tensors(issued), "TEXT": np.array([b"x"], dtype=object)})]
        model.execute(refused)
        assert [r.sender.finals[0].error.message().split(":")[0] for r in refused] == ["request_id", "stop"]
        stranger = Request(p.stop_tensors(new_request_id()))
        model.execute([stranger])
        assert stranger.sender.finals == [None] and not request.sender.done.is_set()
        owner = Request(p.stop_tensors(issued))                       # the id only the stream's responses carry
        model.execute([owner])
        assert owner.sender.finals == [None] and request.sender.done.wait(5)
        (final,) = request.sender.finals                              # never a normal end
        assert final.error.code == TritonError.CANCELLED and bls.stops == [issued]
    finally:
        model.finalize()


def test_tts_refuses_a_missing_text_at_once_and_forwards_pipeline_errors(monkeypatch, repo):
    bls = FakeBLS(error=TritonError("in ensemble 'tts_pipeline', voice_id: unknown voice 'x' [fish-s2:NOT_FOUND]",
                                    TritonError.NOT_FOUND))
    model = _tts(monkeypatch, repo, bls)
    try:
        missing = Request({k: v for k, v in p.tts_inputs("x", seed=1).items() if k != "TEXT"})
        failing = Request(p.tts_inputs("Hello.", voice_id="x"))
        model.execute([missing, failing])
        (final,) = missing.sender.finals
        assert final.error.code == TritonError.INVALID_ARG and final.error.message().startswith("text: required")
        assert failing.sender.done.wait(5)
        (final,) = failing.sender.finals
        assert final.error.code == TritonError.NOT_FOUND and from_wire(final.error.message()).field == "voice_id"
        assert [c[0] for c in bls.calls] == [p.TTS_PIPELINE] and not failing.sender.responses
    finally:
        model.finalize()


# Triton 2.51's stub frees a BLS response's numpy arrays without the GIL when its own thread drops the
# last reference to an exhausted response iterator (fish_s2/serving/bls.py): the models must hold it
# until a cancellation check has made a round trip through that thread.

def test_spent_bls_streams_are_dropped_only_after_an_answered_cancellation_check():
    class Responses:   # what exec(decoupled=True) returns: an iterator the stub also holds
        def __iter__(self):
            return iter(range(3))

    class BLSRequest:
        def __init__(self):
            self.responses = Responses()

        def exec(self, decoupled=False):
            assert decoupled
            return self.responses

    spent = SpentStreams()
    request = BLSRequest()
    alive = weakref.ref(request.responses)
    assert list(spent.exec(request)) == [0, 1, 2]
    del request
    assert alive() is not None and len(spent) == 1

    def broken():
        raise RuntimeError("connection gone")

    assert not spent.release_after(lambda: True)          # cancelled (maybe answered from the cache)
    assert not spent.release_after(broken)                # no answer
    assert alive() is not None and len(spent) == 1
    assert spent.release_after(lambda: False)             # a round trip came back
    assert alive() is None and len(spent) == 0
    asked = []
    assert spent.release_after(lambda: asked.append(1)) and not asked   # nothing held: nothing asked
    early = BLSRequest()
    stream = spent.exec(early)
    assert next(stream) == 0
    stream.close()                                        # a consumer that stops early keeps nothing
    assert len(spent) == 0


def test_tts_drops_spent_pipeline_streams_only_after_a_live_stream_was_checked(monkeypatch, repo):
    class RecordingBLS(FakeBLS):
        def __init__(self):
            super().__init__(chunks=100)
            self.streams = []

        def stream(self, request_id):
            generator = super().stream(request_id)
            self.streams.append(weakref.ref(generator))
            return generator

    bls = RecordingBLS()
    model = _tts(monkeypatch, repo, bls)
    try:
        gone = Request(p.tts_inputs("Hello."))
        gone.sender.cancelled = True                                     # every check of it: True
        model.execute([gone])
        assert gone.sender.done.wait(5) and bls.stops                     # stopped by the watcher
        time.sleep(10 * model.relay.check_period_s)
        (first,) = bls.streams
        assert first() is not None and len(model.relay.spent) == 2       # pipeline and STOP: kept
        live = Request(p.tts_inputs("Hello."))
        model.execute([live])                                            # its checks are answered False
        deadline = time.monotonic() + 5
        while first() is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert first() is None and not live.sender.done.is_set()
        live.sender.cancelled = True
        assert live.sender.done.wait(5)
    finally:
        model.finalize()
    assert len(model.relay.spent) == 0
