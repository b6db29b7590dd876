"""The batched engine: equal to the reference generator, batch invariant, cancellable, cached, bounded."""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from fish_s2.engine import Engine, EngineConfig
from fish_s2.request import (Busy, ChunkEvent, EngineRequest, Finished, InvalidArgument, Unavailable, chunks_to_codes,
                             collect, new_request_id)
from fish_s2.generate import generate
from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.request import SamplingParams
from fish_s2.request import ChunkPlan

CFG = EngineConfig(max_active=12, max_queued=16, max_prompt_tokens=400, max_frames=48)


def _voice(seed: int, frames: int = 20) -> list[Reference]:
    g = torch.Generator().manual_seed(seed)
    return [Reference("A reference sentence.", torch.randint(0, 1024, (10, frames), generator=g))]


def _request(ck, text, params, voice=None, **kw):
    b = PromptBuilder(ck.tokenizer, ck.config.num_codebooks)
    system = b.system(voice or [])
    prompt = torch.cat([system, b.user(text), b.assistant_start()], dim=1)
    return EngineRequest(prompt, params, prefix_len=system.shape[1], **kw)


def _run(engine, reqs):
    """Drive the engine synchronously until every request finished; return (chunks, finished) per request."""
    handles = [engine.submit(r) for r in reqs]
    while engine.rows or engine.stats()["queued"]:
        engine.step()
    return [collect(h) for h in handles]


def _expected(ck, req, max_frames):
    ref = generate(ck.model, req.prompt, max_frames, req.params)
    return ref.frames[1:, :-1] if ref.stopped_on_eos else ref.frames[1:]


@pytest.fixture()
def engine(tiny):
    return Engine(tiny.model, CFG)


def test_sampled_requests_match_the_reference_generator(tiny, engine):
    reqs = [_request(tiny, f"Sentence number {i}.", SamplingParams(temperature=0.9, top_p=0.9, seed=i),
                     voice=_voice(i % 3), max_frames=30) for i in range(6)]
    for req, (chunks, done) in zip(reqs, _run(engine, reqs)):
        assert done.reason in ("stop", "length") and done.error is None
        assert np.array_equal(chunks_to_codes(chunks), _expected(tiny, req, 30))


def test_greedy_request_is_batch_invariant(tiny, engine):
    target = _request(tiny, "The same words every time.", SamplingParams(top_k=1), max_frames=40)
    (alone, _), = _run(engine, [target])
    others = [_request(tiny, f"Other text {i} with more words.", SamplingParams(seed=i), voice=_voice(i),
                       max_frames=10 + 3 * i) for i in range(8)]
    together = _run(engine, others[:4] + [target] + others[4:])
    assert np.array_equal(chunks_to_codes(together[4][0]), chunks_to_codes(alone))


def test_chunks_follow_the_plan(tiny, engine):
    plan = ChunkPlan(first_chunk_frames=4, chunk_frames=7, context_frames=5)
    req = _request(tiny, "Chunk me.", SamplingParams(seed=3), max_frames=30, chunk_plan=plan)
    (chunks, done), = _run(engine, [req])
    assert [c.index for c in chunks] == list(range(len(chunks)))
    sizes = [c.n_frames for c in chunks]
    assert sizes == plan.sizes(done.n_frames) and plan.sizes(30) == [4, 6, 7, 7, 6]   # ramps up to 7
    assert [c.context for c in chunks] == [min(5, sum(sizes[:i])) for i in range(len(chunks))]
    codes = chunks_to_codes(chunks)
    for c in chunks[1:]:  # the context is the frames just before the chunk
        start = sum(sizes[: c.index])
        assert np.array_equal(c.codes[:, : c.context], codes[:, start - c.context: start])


def test_cancel_frees_the_slot(tiny):
    engine = Engine(tiny.model, CFG).start()
    try:
        first = threading.Event()
        events = []

        def sink(ev):
            events.append(ev)
            if isinstance(ev, ChunkEvent):
                first.set()

        req = _request(tiny, "Cancel me soon.", SamplingParams(seed=1), max_frames=48,
                       chunk_plan=ChunkPlan(first_chunk_frames=1, chunk_frames=1, context_frames=0))
        # keep it from ending on its own before the cancel arrives
        engine.submit(req, sink)
        assert first.wait(30)
        engine.cancel(req.request_id)
        done = threading.Event()
        engine.submit(_request(tiny, "Next one.", SamplingParams(seed=2), max_frames=5),
                      lambda ev: done.set() if isinstance(ev, Finished) else None)
        assert done.wait(60)
        fin = [e for e in events if isinstance(e, Finished)]
        assert len(fin) == 1 and fin[0].reason in ("cancelled", "stop")
        assert engine.stats()["active"] == 0
        # every slot is usable again
        handles = [engine.submit(_request(tiny, f"Fill {i}.", SamplingParams(seed=i), max_frames=3))
                   for i in range(CFG.max_active)]
        assert all(collect(h)[1].reason in ("stop", "length") for h in handles)
    finally:
        engine.stop()


def test_cancel_while_queued(tiny, engine):
    h = engine.submit(_request(tiny, "Never started.", SamplingParams(), max_frames=5))
    engine.cancel(h.request_id)
    engine.step()
    chunks, done = collect(h)
    assert chunks == [] and done.reason == "cancelled"


def test_polled_cancellation(tiny, engine):
    flag = {"cancel": False}
    req = _request(tiny, "Polled.", SamplingParams(seed=4), max_frames=40, is_cancelled=lambda: flag["cancel"])
    h = engine.submit(req)
    engine.step()
    engine.step()
    flag["cancel"] = True
    time.sleep(CFG.cancel_check_ms / 1000)   # the clients are asked at most once per period: this step asks
    engine.step()
    assert not engine.rows, "the polled cancel did not end the request at the next step that asked"
    assert collect(h)[1].reason == "cancelled"


def test_prefix_cache_is_content_keyed(tiny, engine):
    voice = _voice(7)
    residual_only = [Reference(voice[0].text, voice[0].codes.clone())]
    residual_only[0].codes[5, 3] += 1  # same token ids (codebook 0), one residual code differs
    reqs = [_request(tiny, "One.", SamplingParams(top_k=1), voice=voice, max_frames=8),
            _request(tiny, "Two.", SamplingParams(top_k=1), voice=voice, max_frames=8),
            _request(tiny, "Three.", SamplingParams(top_k=1), voice=residual_only, max_frames=8)]
    results = []
    for r in reqs:
        results += _run(engine, [r])
    stats = engine.runner.prefix_cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 2, 2)
    # a cache hit gives exactly what a full prefill gives
    for req, (chunks, _) in zip(reqs, results):
        assert np.array_equal(chunks_to_codes(chunks), _expected(tiny, req, 8))


def test_cached_prefill_skips_the_prefix(tiny, engine):
    """A hit prefills only the text after the voice block, whatever the reference length."""
    counted = []
    hook = tiny.model.slow.register_forward_pre_hook(lambda m, a: counted.append(a[0].shape[-1]))
    try:
        for frames in (10, 80):
            voice = _voice(frames, frames)
            for text in ("First.", "Second."):
                counted.clear()
                _run(engine, [_request(tiny, text, SamplingParams(top_k=1), voice=voice, max_frames=1)])
                prefill = counted[0] if text == "Second." else sum(counted[:2])
                if text == "Second.":
                    rest = _request(tiny, text, SamplingParams(), voice=voice)
                    assert prefill == rest.prompt.shape[1] - rest.prefix_len
    finally:
        hook.remove()


def test_prefix_cache_evicts_least_recently_used(tiny):
    reqs = [_request(tiny, "x", SamplingParams(top_k=1), voice=_voice(100 + i, 30), max_frames=1) for i in range(4)]
    c = tiny.config.slow
    entry = c.n_layer * 2 * c.n_kv_head * reqs[0].prefix_len * c.head_dim * 4  # fp32 KV of one voice block
    engine = Engine(tiny.model, EngineConfig(max_active=2, max_prompt_tokens=400, max_frames=8,
                                             prefix_cache_bytes=int(2.5 * entry)))
    for r in reqs[:3] + reqs[:1]:  # the 3rd evicts voice 0, so voice 0 misses again
        _run(engine, [r])
    s = engine.runner.prefix_cache.stats()
    assert (s["entries"], s["bytes"], s["hits"], s["misses"], s["evictions"]) == (2, 2 * entry, 0, 4, 2)


def test_limits_are_immediate_errors(tiny):
    engine = Engine(tiny.model, EngineConfig(max_active=1, max_queued=2, max_prompt_tokens=64, max_frames=16))
    ok = _request(tiny, "ok", SamplingParams(), max_frames=4)
    with pytest.raises(InvalidArgument, match="max_prompt_tokens"):
        engine.submit(_request(tiny, "word " * 80, SamplingParams()))
    with pytest.raises(InvalidArgument, match="max_frames"):
        engine.submit(EngineRequest(ok.prompt, max_frames=17))
    with pytest.raises(InvalidArgument, match="temperature"):
        engine.submit(EngineRequest(ok.prompt, SamplingParams(temperature=3.0)))
    with pytest.raises(InvalidArgument, match="prefix_len"):
        engine.submit(EngineRequest(ok.prompt, prefix_len=ok.prompt.shape[1]))
    with pytest.raises(InvalidArgument, match="prompt"):
        engine.submit(EngineRequest(ok.prompt[:5]))
    with pytest.raises(InvalidArgument, match="chunk_frames"):
        engine.submit(EngineRequest(ok.prompt, chunk_plan=ChunkPlan(chunk_frames=0)))
    for _ in range(3):   # max_active + max_queued in flight, then busy
        engine.submit(dataclasses.replace(ok, request_id=new_request_id()))
    with pytest.raises(Busy, match="busy: 3 requests in flight"):
        engine.submit(ok)
    other = Engine(tiny.model, CFG)
    other.submit(ok)
    with pytest.raises(InvalidArgument, match="^request_id:"):
        other.submit(ok)


def test_broken_sink_does_not_stop_the_engine(tiny, engine):
    def sink(ev):
        raise RuntimeError("client went away")

    engine.submit(_request(tiny, "Broken.", SamplingParams(), max_frames=20,
                           chunk_plan=ChunkPlan(first_chunk_frames=1)), sink)
    for _ in range(5):
        engine.step()
    assert not engine.rows
    (chunks, done), = _run(engine, [_request(tiny, "Fine.", SamplingParams(), max_frames=3)])
    assert done.reason in ("stop", "length")


def test_sink_raising_mid_stream_leaves_the_loop_running(tiny):
    """A sink that raises on its second chunk: its request is cancelled and gets exactly one Finished;
    the loop thread keeps serving the others to their end."""
    engine = Engine(tiny.model, CFG).start()
    try:
        events, done = [], threading.Event()

        def sink(ev):
            events.append(ev)
            if isinstance(ev, Finished):
                done.set()
            elif ev.chunk.index == 1:
                raise RuntimeError("client went away")

        plan = ChunkPlan(first_chunk_frames=1, chunk_frames=1, context_frames=0)
        others = [engine.submit(_request(tiny, f"Other {i}.", SamplingParams(seed=i), max_frames=12)) for i in range(3)]
        engine.submit(_request(tiny, "Broken later.", SamplingParams(seed=9), max_frames=40, chunk_plan=plan), sink)
        assert done.wait(60)
        results = [collect(h)[1] for h in others]
        assert all(r.reason in ("stop", "length") for r in results)
        finished = [e for e in events if isinstance(e, Finished)]
        assert len(finished) == 1 and finished[0].reason in ("cancelled", "stop")
        assert engine._thread.is_alive() and engine.stats()["active"] == 0
    finally:
        engine.stop()


def test_stop_with_a_stuck_loop_still_finishes_every_request(tiny):
    """stop() whose join times out (a decode step that hangs) ends every request once; the step's late
    results are dropped when it returns."""
    engine = Engine(tiny.model, CFG)
    entered, release = threading.Event(), threading.Event()
    real_launch = engine.runner.launch

    def stuck_launch(held=()):
        entered.set()
        release.wait(30)
        return real_launch(held)

    engine.runner.launch = stuck_launch
    handles = [engine.submit(_request(tiny, f"Stuck {i}.", SamplingParams(seed=i), max_frames=30)) for i in range(3)]
    engine.start()
    thread = engine._thread
    try:
        assert entered.wait(30)
        engine.stop(timeout=0.2)
        assert thread.is_alive()                      # the loop did not exit in time ...
        for h in handles:                              # ... yet every request has its one Finished
            chunks, fin = collect(h)
            assert fin.reason == "cancelled"
    finally:
        release.set()
        thread.join(30)
    assert not thread.is_alive()
    for h in handles:                                  # nothing after the Finished
        assert h._events.empty()


def test_stop_cancels_queued_requests(tiny):
    engine = Engine(tiny.model, CFG)
    h = engine.submit(_request(tiny, "queued", SamplingParams()))
    engine.stop()
    assert collect(h)[1].reason == "cancelled"
    with pytest.raises(Unavailable):
        engine.submit(_request(tiny, "late", SamplingParams()))


def test_out_of_range_ids_and_codes_are_refused(tiny, engine):
    ok = _request(tiny, "ok", SamplingParams(), max_frames=4)
    bad_id, bad_code = ok.prompt.clone(), ok.prompt.clone()
    bad_id[0, 1] = tiny.config.vocab_size
    bad_code[3, 2] = tiny.config.codebook_size
    with pytest.raises(InvalidArgument, match=r"prompt: token ids"):
        engine.submit(EngineRequest(bad_id))
    with pytest.raises(InvalidArgument, match=r"prompt: codes"):
        engine.submit(EngineRequest(bad_code))


@pytest.mark.parametrize("chunk", [5, 16])
def test_prompts_prefilled_in_chunks_equal_the_reference_generator(tiny, chunk):
    """The admission budget cuts prompts into chunks (never across a voice prefix's end): the same codes as
    one prefill, for cache misses and hits alike, with running streams sampled next to them."""
    engine = Engine(tiny.model, dataclasses.replace(CFG, prefill_chunk_tokens=chunk))
    reqs = [_request(tiny, f"Sentence number {i} is a little longer than the others.",
                     SamplingParams(temperature=0.9, top_p=0.9, seed=i), voice=_voice(i % 2), max_frames=20)
            for i in range(5)]
    for req, (chunks, done) in zip(reqs, _run(engine, reqs)):
        assert done.error is None
        assert np.array_equal(chunks_to_codes(chunks), _expected(tiny, req, 20))
    assert engine.runner.prefix_cache.stats()["entries"] == 2


def test_running_streams_keep_their_cadence_while_a_long_prompt_joins(tiny):
    """While a new request's prompt is prefilled chunk by chunk (prefill_chunk_tokens per step), every
    running request still gets one frame per engine step; the newcomer's first frame comes after
    ceil(prompt / chunk) steps."""
    engine = Engine(tiny.model, dataclasses.replace(CFG, prefill_chunk_tokens=8))
    frames: dict[str, int] = {}

    def counter(rid):
        def sink(ev):
            if isinstance(ev, ChunkEvent):
                frames[rid] = frames.get(rid, 0) + ev.chunk.n_frames
        return sink

    plan = ChunkPlan(first_chunk_frames=1, chunk_frames=1, context_frames=0)
    short = _request(tiny, "Hi.", SamplingParams(top_k=1), max_frames=40, chunk_plan=plan)
    engine.submit(short, counter("short"))
    while "short" not in frames:
        engine.step()
    long = _request(tiny, "A much longer prompt " * 6, SamplingParams(top_k=1), max_frames=40, chunk_plan=plan)
    steps = -(-(long.prompt.shape[1] - long.prefix_len) // 8)   # its voiceless system block is cached
    assert steps > 3
    engine.submit(long, counter("long"))
    for i in range(steps):
        before = frames["short"]
        engine.step()
        assert frames["short"] == before + 1 and ("long" in frames) == (i == steps - 1)
    assert engine.runner.prefix_cache.stats()["hits"] == 1


def test_overlapped_steps_give_the_same_streams(tiny):
    """engine.overlap_steps: the next step is launched before a step's frames are handled whenever they
    end no row's batch; the streams, their chunks and their ends are those of the plain loop."""
    reqs = lambda: [_request(tiny, f"Sentence number {i}.", SamplingParams(temperature=0.9, top_p=0.9, seed=i),  # noqa: E731
                             voice=_voice(i % 2), max_frames=6 + 5 * i,
                             chunk_plan=ChunkPlan(first_chunk_frames=2, chunk_frames=3, context_frames=1))
                    for i in range(5)]
    results, overlapped = {}, 0
    for mode in ("off", "on"):
        engine = Engine(tiny.model, dataclasses.replace(CFG, overlap_steps=mode, prefill_chunk_tokens=8))
        assert engine.overlap == (mode == "on")
        handles = [engine.submit(r) for r in reqs()]
        while engine.rows or engine.stats()["queued"]:
            engine.step()
            overlapped += engine._in_flight is not None
        results[mode] = [collect(h) for h in handles]
    assert overlapped > 10
    for (a, fa), (b, fb) in zip(results["off"], results["on"]):
        assert [c.index for c in a] == [c.index for c in b] and np.array_equal(chunks_to_codes(a), chunks_to_codes(b))
        assert (fa.reason, fa.n_frames) == (fb.reason, fb.n_frames)


def test_overlapped_steps_still_see_a_cancel_within_a_step(tiny):
    engine = Engine(tiny.model, dataclasses.replace(CFG, overlap_steps="on", cancel_check_ms=0))
    flag = {"cancel": False}
    h = engine.submit(_request(tiny, "Polled.", SamplingParams(seed=4), max_frames=40,
                               is_cancelled=lambda: flag["cancel"]))
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None
    flag["cancel"] = True
    engine.step()   # handles the step in flight (the cancel seen: nothing launched), then the next one drops it
    engine.step()
    assert collect(h)[1].reason == "cancelled" and not engine.rows and engine._in_flight is None
