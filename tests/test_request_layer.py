"""The torch-free request layer: typed errors and their wire form, validated parameters, and the one
request lifecycle both engines use."""

import math

import numpy as np
import pytest

from fish_s2.request import (AlreadyExists, Busy, Cancelled, ChunkEvent, ChunkPlan, EngineRequest, Finished, Internal,
                             InvalidArgument, Lifecycle, Limits, NotFound, PermissionDenied, SamplingParams,
                             Unavailable, from_wire, to_wire)
from fish_s2.request.errors import ERRORS


@pytest.mark.parametrize("error", [InvalidArgument("top_k", "must be >= 1"), NotFound("voice_id", "unknown voice 'x'"),
                                   AlreadyExists("voice_id", "taken"), PermissionDenied("admin_key", "wrong"),
                                   Busy("busy: 80 in flight"), Unavailable("draining"), Cancelled("stopped"),
                                   Internal("decode step failed")])
def test_errors_travel_by_type(error):
    back = from_wire("in ensemble 'tts_pipeline', " + to_wire(error))
    assert type(back) is type(error) and str(back) == str(error) and back.field == error.field
    assert back.http == error.http and back.status == error.status


def test_statuses_and_codes():
    assert {c.status: c.http for c in ERRORS.values()} == {
        "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403,
        "UNAVAILABLE": 503, "BUSY": 429, "CANCELLED": 499, "INTERNAL": 500}
    assert isinstance(from_wire("no tag", "StatusCode.UNAVAILABLE"), Unavailable)       # a call's gRPC status
    assert isinstance(from_wire("no tag", "RESOURCE_EXHAUSTED"), Busy)
    assert type(from_wire("no tag, no code")) is Internal
    assert isinstance(from_wire("[request id: x] unexpected shape for input 'TEXT'"), InvalidArgument)  # Triton's own


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=True), "temperature"),
    (dict(temperature="0.5"), "temperature"), (dict(temperature=2.01), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=math.inf), "top_p"), (dict(top_k=0), "top_k"), (dict(top_k=2 ** 31), "top_k"), (dict(top_k=3.0), "top_k"),
    (dict(seed=2 ** 64), "seed"), (dict(seed=-(2 ** 63) - 1), "seed")])
def test_sampling_params_validate_themselves(kw, field):
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        SamplingParams(**kw)


def test_sampling_params_normalise_and_greedy():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(7), seed=(1 << 64) - 1)
    assert type(p.temperature) is float and type(p.top_k) is int and p.top_k_used == 7
    assert SamplingParams(temperature=0).top_k_used == 1 == SamplingParams(top_k=1).top_k_used


def test_chunk_plan_and_limits():
    with pytest.raises(InvalidArgument, match="^context_frames:"):
        ChunkPlan(context_frames=-1)
    limits = Limits(max_frames=100, max_text_bytes=10, max_reference_seconds=1.0, chunk_plan=ChunkPlan(),
                    max_chunk_frames=50)
    assert limits.check_plan(ChunkPlan(4, 25, 25)) == ChunkPlan(4, 25, 25)
    with pytest.raises(InvalidArgument, match="^chunk_frames: a chunk of 51 frames"):
        limits.check_plan(ChunkPlan(4, 26, 25))
    with pytest.raises(InvalidArgument, match="^first_chunk_frames: must be in"):
        limits.check_plan(ChunkPlan(first_chunk_frames=101))
    with pytest.raises(InvalidArgument, match="^max_frames:"):
        EngineRequest(np.zeros((11, 3), np.int64), max_frames=0)


def _lifecycle(**kw):
    cancelled = []
    lc = Lifecycle(max_in_flight=2, default_plan=ChunkPlan(1, 1, 0), max_frames=10,
                   on_cancel=lambda live: cancelled.append(live.request_id), **kw)
    return lc, cancelled


def _req(**kw):
    return EngineRequest(np.zeros((11, 3), np.int64), **kw)


def test_admission_is_refused_at_once():
    lc, _ = _lifecycle()
    first, _ = lc.open(_req(request_id="a"), lambda e: None)
    with pytest.raises(InvalidArgument, match="^request_id:"):
        lc.open(_req(request_id="a"), lambda e: None)
    lc.open(_req(request_id="b"), lambda e: None)
    with pytest.raises(Busy, match="retry later"):
        lc.open(_req(request_id="c"), lambda e: None)
    lc.finish(first, "stop")
    lc.close()
    with pytest.raises(Unavailable):
        lc.open(_req(request_id="d"), lambda e: None)


def test_exactly_one_finished_whatever_ends_it_first():
    lc, cancelled = _lifecycle()
    live, handle = lc.open(_req(request_id="a"), None)
    lc.frame(live, np.arange(10))
    assert lc.cancel("a") and cancelled == ["a"] and not lc.cancel("zzz")
    assert lc.finish(live, "cancelled") and not lc.finish(live, "error", Internal("late"))
    lc.frame(live, np.arange(10))                         # a late frame of an ended request is dropped
    events = list(handle)
    assert [type(e) for e in events] == [ChunkEvent, Finished]
    assert events[1].reason == "cancelled" and isinstance(events[1].error, Cancelled) and events[1].n_frames == 1
    assert lc.frames_generated == 2 and len(lc) == 0


def test_a_raising_sink_cancels_its_own_request_only():
    lc, cancelled = _lifecycle()
    seen = []

    def sink(event):
        seen.append(event)
        raise RuntimeError("client gone")

    live, _ = lc.open(_req(request_id="a"), sink)
    lc.frame(live, np.arange(10))                         # the chunk's delivery raises: the request is cancelled
    assert cancelled == ["a"] and live.cancel_requested
    lc.finish(live, "cancelled")                          # and still gets its one Finished
    assert [type(e) for e in seen] == [ChunkEvent, Finished]


def test_polled_cancellation_is_rate_limited_and_a_dead_check_counts_as_gone():
    lc, cancelled = _lifecycle(check_period_s=3600)
    calls = []

    def dead():
        calls.append(1)
        raise ConnectionError("connection reset")

    lc.open(_req(request_id="a", is_cancelled=dead), lambda e: None)
    lc.poll_cancelled()
    lc.poll_cancelled()                                   # within the period: not asked again
    assert calls == [1] and cancelled == ["a"]
