"""The python-backend models' lifecycles against a fake ``triton_python_backend_utils`` and fake
engines/codecs: execute only hands off, every request gets exactly one FINAL response, STOP and
broken clients free engine slots, metrics follow the engine."""

import importlib.util
import json
import sys
import threading
import types

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from fish_s2.checkpoint import load_config
from fish_s2.engine import EngineConfig, check_request
from fish_s2.request import Busy, ChunkEvent, EngineRequest, Finished, Internal, InvalidArgument, Lifecycle, from_wire
from fish_s2.serving import metrics
from fish_s2.serving import protocol as p
from fish_s2.serving.dispatch import Dispatcher
from fish_s2.serving.repository import TEMPLATES, generate
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
    created = {}

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind

    def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
        metric = MetricFamily.created[self.name] = FakeMetric(buckets, labels)
        return metric


def _fake_pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.TritonError, pb.Tensor, pb.InferenceResponse = TritonError, Tensor, InferenceResponse
    pb.MetricFamily = MetricFamily
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.using_decoupled_model_transaction_policy = lambda cfg: cfg.get("model_transaction_policy", {}).get("decoupled")
    pb.Logger = types.SimpleNamespace(log_warn=lambda msg: None)
    return pb


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
        self.lifecycle.finish_all("cancelled")


# ------------------------------------------------------------------ loading a model.py the way Triton does

@pytest.fixture(scope="module")
def repo(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo")
    generate("cpu", tiny_checkpoint, out / "art", out / "repo")
    return out / "repo"


def _load(monkeypatch, repo, model, instance: dict | None = None, **patches):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
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


def _generate_inputs(fmt="int16", start_ns=42, rows=11):
    req = p.TTSRequest("x", None, None, p.SamplingParams(seed=3), 20, p.ChunkPlan(2, 3, 1), fmt)
    return p.generate_tensors(np.ones((rows, 9), np.int64), 4, req, start_ns)


def _chunk(request_id, index, frames=3, context=1):
    return ChunkEvent(request_id, CodeChunk(index, np.arange(10 * (frames + context)).reshape(10, -1), context), 0.1)


@pytest.fixture()
def dual_ar(monkeypatch, repo, tiny_checkpoint):
    engine = FakeEngine(load_config(tiny_checkpoint)[0])
    model = _load(monkeypatch, repo, "dual_ar", build_engine=lambda cfg: engine)
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


def test_stop_cancels_the_requests_of_one_triton_id(dual_ar):
    model, engine = dual_ar
    mine, other = Request(_generate_inputs(), "abc"), Request(_generate_inputs(), "xyz")
    model.execute([mine, other])
    stop = Request({"STOP": np.array([True])}, "abc")
    model.execute([stop])
    assert stop.sender.finals == [None] and mine.sender.done.wait(5)
    assert mine.sender.finals == [None] and not other.sender.done.is_set()
    assert len(engine.cancelled) == 1


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
    assert engine.stopped and all(r.sender.finals == [None] for r in pending)


def test_dispatcher_forgets_a_request_whose_submit_failed(tiny_checkpoint):
    engine = FakeEngine(load_config(tiny_checkpoint)[0], max_in_flight=2)
    dispatch = Dispatcher(engine, lambda stream, event: None)
    prompt = np.ones((11, 9), np.int64)
    for _ in range(2):
        dispatch.submit(EngineRequest(prompt), "full", None)
    with pytest.raises(Busy):
        dispatch.submit(EngineRequest(prompt), "c", None)
    with pytest.raises(InvalidArgument, match="^prompt:"):      # the engine's real check
        dispatch.submit(EngineRequest(prompt[:5]), "c", None)
    assert dispatch.live() == 2 and dispatch.stop("c") == 0
    engine.stop()
    dispatch.close()
    assert dispatch.live() == 0


def test_postprocess_trims_context_and_formats(monkeypatch, repo):
    model = _load(monkeypatch, repo, "postprocess")
    fl = model.frame_length
    decoded = np.linspace(-1.5, 1.5, 5 * fl, dtype=np.float32)
    rid = np.array([b"r1"], dtype=object)
    reqs = [Request({"DECODED": decoded, "CHUNK_META": p.ChunkMeta(0, 2, 1, 0).pack(), "REQUEST_ID": rid}),
            Request({"DECODED": decoded, "CHUNK_META": p.ChunkMeta(1, 2, 0, 0).pack(), "REQUEST_ID": rid})]
    first, second = model.execute(reqs)
    assert first.outputs["AUDIO"].size == 0
    assert np.array_equal(first.outputs["AUDIO_INT16"], p.to_pcm16(decoded[2 * fl:]))
    assert np.array_equal(second.outputs["AUDIO"], decoded[2 * fl:]) and second.outputs["AUDIO_INT16"].size == 0
    assert second.outputs["CHUNK_INDEX"].tolist() == [1] and first.outputs["SAMPLE_RATE"].tolist() == [44100]
    assert len(MetricFamily.created[metrics.TTFA.name].observed) == 1    # chunk 0 only


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
    engine = FakeEngine(load_config(tiny_checkpoint)[0])
    model = _load(monkeypatch, repo, "dual_ar", instance={"model_instance_kind": "GPU", "model_instance_device_id": "1"},
                  build_engine=lambda cfg: made.append(cfg.device) or engine)
    assert made == ["cuda:1"] and current == [1]
    assert MetricFamily.created[metrics.ACTIVE.name].labels == {"gpu": "1"}
    model.finalize()
    model = _load(monkeypatch, repo, "dual_ar", instance={"model_instance_kind": "CPU", "model_instance_device_id": "0"},
                  build_engine=lambda cfg: made.append(cfg.device) or engine)
    assert made[-1] == "cpu" and MetricFamily.created[metrics.ACTIVE.name].labels == {}
    model.finalize()
