"""TrtllmEngine over a CPU stand-in of tensorrt_llm.LLM (tests/trtllm_fakes.py), the KV-reuse salt,
and the LLM-API settings YAML."""

import dataclasses
import threading

import pytest
import torch

from fish_s2.engine import ChunkEvent, EngineBusy, EngineRequest, Finished, RequestError, chunks_to_codes, collect
from fish_s2.generate import generate
from fish_s2.sampling import SamplingParams
from fish_s2.streaming import ChunkPlan
from fish_s2.trtllm.convert import convert_checkpoint
from fish_s2.trtllm.engine import TrtllmEngine, cache_salt
from fish_s2.trtllm.model import CODES_OUTPUT
from fish_s2.trtllm.settings import DEFAULT_PATH, load_settings, settings_from_dict
from trtllm_fakes import SAMPLE_PARAMS, FakeExecutor, FakeLLM, eos_prone, fake_sampling_params, sample_prompts

PLAN = ChunkPlan(first_frames=2, chunk_frames=3, context_frames=2)


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    return convert_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("trtllm-engine") / "model")


@pytest.fixture(scope="module")
def prompts(tiny):
    return sample_prompts(tiny)


def _engine(converted, model, step_delay=0.0, **engine_kw):
    s = load_settings()
    s = dataclasses.replace(s, max_batch_size=3, engine=dataclasses.replace(s.engine, max_active=3, chunk_plan=PLAN,
                                                                            **engine_kw))
    made = {}

    def factory(model_dir, st, cfg):
        made["llm"] = FakeLLM(FakeExecutor(model, max_batch=st.max_batch_size, max_num_tokens=256), step_delay)
        return made["llm"], fake_sampling_params

    return TrtllmEngine(converted, s, llm_factory=factory).start(), made


def test_streams_the_reference_codes(tiny, converted, prompts):
    model = eos_prone(tiny.model)
    params = SAMPLE_PARAMS
    engine, made = _engine(converted, model, max_frames=8)
    try:
        handles = [engine.submit(EngineRequest(p, sp)) for p, sp in zip(prompts, params)]
        results = [collect(h) for h in handles]
    finally:
        engine.stop()
    for (chunks, done), p, sp in zip(results, prompts, params):
        ref = generate(model, p, 8, sp)
        want = ref.frames[1:, :-1] if ref.stopped_on_eos else ref.frames[1:]
        assert torch.equal(chunks_to_codes(chunks), want)
        assert done.reason == ("stop" if ref.stopped_on_eos else "length") and done.n_frames == want.shape[1]
        assert [c.index for c in chunks] == list(range(len(chunks))) and chunks[0].n_frames == min(2, done.n_frames)
    assert {r[1].reason for r in results} == {"stop", "length"}
    llm = made["llm"]
    assert llm.salts[0] == llm.salts[2] != llm.salts[1]  # same voice, other text: one salt; no voice: another
    sp = llm.sampling_params[0]
    assert (sp.max_tokens, sp.end_id, sp.top_k, sp.additional_model_outputs) == (8, tiny.config.eos_id, 1,
                                                                                  [CODES_OUTPUT])
    assert engine.stats()["frames_generated"] == sum(r[1].n_frames for r in results)
    assert all(r.finish_reason is not None for r in llm.executor.requests.values())


def test_cancel_and_client_disconnect(tiny, converted, prompts):
    engine, made = _engine(converted, tiny.model, step_delay=0.05, max_frames=200)
    try:
        first, finished = threading.Event(), threading.Event()
        events = []

        def sink(e):
            events.append(e)
            first.set()
            if isinstance(e, Finished):
                finished.set()

        engine.submit(EngineRequest(prompts[0], request_id="a"), sink)
        gone = threading.Event()
        h = engine.submit(EngineRequest(prompts[1], request_id="b", is_cancelled=gone.is_set))
        assert first.wait(60)
        engine.cancel("a")
        gone.set()
        _, done_b = collect(h)
        assert finished.wait(60)
        done_a = events[-1]
        assert isinstance(done_a, Finished) and done_a.reason == "cancelled" and done_a.n_frames < 200
        assert all(isinstance(e, ChunkEvent) for e in events[:-1])
        assert done_b.reason == "cancelled"
        assert engine.stats()["active"] == engine.stats()["queued"] == 0
    finally:
        engine.stop()
    ex = made["llm"].executor
    assert not ex.requests or all(r.aborted for r in ex.requests.values())


def test_bad_requests_and_busy(tiny, converted, prompts):
    engine, made = _engine(converted, tiny.model, step_delay=0.05, max_frames=200, max_queued=1)
    p = prompts[0]
    try:
        for bad, field in ((p[:5], "prompt"), (p.float(), "prompt")):
            with pytest.raises(RequestError, match=field):
                engine.submit(EngineRequest(bad))
        codes = p.clone()
        codes[3, -1] = tiny.config.codebook_size
        with pytest.raises(RequestError, match="codes must be in"):
            engine.submit(EngineRequest(codes))
        ids = p.clone()
        ids[0, 0] = tiny.config.vocab_size
        with pytest.raises(RequestError, match="token ids"):
            engine.submit(EngineRequest(ids))
        with pytest.raises(RequestError, match="max_frames"):
            engine.submit(EngineRequest(p, max_frames=201))
        with pytest.raises(RequestError, match="temperature"):
            engine.submit(EngineRequest(p, SamplingParams(temperature=5.0)))
        handles = [engine.submit(EngineRequest(p, request_id=str(i))) for i in range(4)]  # 3 active + 1 queued
        with pytest.raises(RequestError, match="already in flight"):
            engine.submit(EngineRequest(p, request_id="0"))
        with pytest.raises(EngineBusy, match="in flight"):
            engine.submit(EngineRequest(p))
    finally:
        engine.stop()
    assert all(collect(h)[1].reason == "cancelled" for h in handles)
    with pytest.raises(EngineBusy, match="not running"):
        engine.submit(EngineRequest(p))


def test_cache_salt_covers_every_code_row(tiny, prompts):
    cfg = tiny.config
    voice = prompts[0]
    sem = ((voice[0] >= cfg.semantic_begin_id) & (voice[0] <= cfg.semantic_end_id)).nonzero().flatten()
    assert len(sem) == 12
    base = cache_salt(voice, cfg)
    assert base == cache_salt(prompts[2], cfg)  # same voice block, other text
    for row in range(1, cfg.num_codebooks + 1):  # a change in any codebook row, residuals included
        other = voice.clone()
        other[row, sem[3]] = (other[row, sem[3]] + 1) % 1024
        assert cache_salt(other, cfg) != base
    text_codes = voice.clone()
    text_codes[5, 0] = 7  # codes at a text position are never embedded: same salt
    assert cache_salt(text_codes, cfg) == base


def test_settings_yaml(tmp_path):
    s = load_settings(DEFAULT_PATH)
    kw = s.llm_kwargs()
    assert kw["max_seq_len"] == s.engine.max_prompt_tokens + s.engine.max_frames
    assert kw["kv_cache_config"]["enable_block_reuse"] and kw["kv_cache_config"]["tokens_per_block"] == 16
    assert max(kw["cuda_graph_config"]["batch_sizes"]) == s.max_batch_size == s.engine.max_active
    assert kw["skip_tokenizer_init"] and "triton_config" not in kw and s.triton_config.decoupled
    small = settings_from_dict({"max_batch_size": 6, "cuda_graph": {"batch_sizes": [1, 4, 8, 16]}})
    assert small.llm_kwargs()["cuda_graph_config"]["batch_sizes"] == [1, 4, 6] and small.n_slots == 12
    assert settings_from_dict({"cuda_graph": None}).llm_kwargs()["cuda_graph_config"] is None
    for bad, match in (({"kv_cache": {"tokens_per_blok": 16}}, "kv_cache: unknown keys.*tokens_per_blok"),
                       ({"kv_cache": {"tokens_per_block": 12}}, "power of two"),
                       ({"engine": {"max_active": 3}}, "engine: unknown keys.*max_active"),
                       ({"engine": {"chunk_plan": {"first_frames": 0}}}, "first_frames"),
                       ({"max_num_tokens": 100}, "max_prompt_tokens"),
                       ({"max_batch": 3}, "unknown keys.*max_batch")):
        with pytest.raises(ValueError, match=match):
            settings_from_dict(bad)
    (tmp_path / "bad.yaml").write_text("max_batch_size: [")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_settings(tmp_path / "bad.yaml")
