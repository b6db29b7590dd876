"""TrtllmEngine over a CPU stand-in of tensorrt_llm.LLM (tests/trtllm_fakes.py), the KV-reuse salt,
and the LLM-API settings YAML."""

import threading

import numpy as np
import pytest
import yaml

from fish_s2.request import (Busy, ChunkEvent, EngineRequest, Finished, InvalidArgument, Unavailable,
                             chunks_to_codes, collect)
from fish_s2.engine import EngineConfig
from fish_s2.generate import generate
from fish_s2.request import SamplingParams
from fish_s2.request import ChunkPlan
from fish_s2.trtllm.convert import convert_checkpoint
from fish_s2.trtllm.engine import TrtllmEngine, cache_salt
from fish_s2.trtllm.model import CODES_OUTPUT
from fish_s2.trtllm.settings import DEFAULT_PATH, load_trtllm_settings, settings_from_dict
from trtllm_fakes import SAMPLE_PARAMS, FakeExecutor, FakeLLM, eos_prone, fake_sampling_params, sample_prompts

PLAN = ChunkPlan(first_chunk_frames=2, chunk_frames=3, context_frames=2)


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    return convert_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("trtllm-engine") / "model")


@pytest.fixture(scope="module")
def prompts(tiny):
    return sample_prompts(tiny)


def _engine(converted, model, step_delay=0.0, **engine_kw):
    engine = EngineConfig(max_active=3, chunk_plan=PLAN, **engine_kw)
    made = {}

    def factory(model_dir, settings, eng, cfg):
        made["llm"] = FakeLLM(FakeExecutor(model, max_batch=eng.max_active, max_num_tokens=256), step_delay)
        return made["llm"], fake_sampling_params

    return TrtllmEngine(converted, engine, llm_factory=factory).start(), made


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
        assert np.array_equal(chunks_to_codes(chunks), want)
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
            with pytest.raises(InvalidArgument, match=field):
                engine.submit(EngineRequest(bad))
        codes = p.clone()
        codes[3, -1] = tiny.config.codebook_size
        with pytest.raises(InvalidArgument, match="codes must be in"):
            engine.submit(EngineRequest(codes))
        ids = p.clone()
        ids[0, 0] = tiny.config.vocab_size
        with pytest.raises(InvalidArgument, match="token ids"):
            engine.submit(EngineRequest(ids))
        with pytest.raises(InvalidArgument, match="max_frames"):
            engine.submit(EngineRequest(p, max_frames=201))
        with pytest.raises(InvalidArgument, match="temperature"):
            engine.submit(EngineRequest(p, SamplingParams(temperature=5.0)))
        handles = [engine.submit(EngineRequest(p, request_id=str(i))) for i in range(4)]  # 3 active + 1 queued
        with pytest.raises(InvalidArgument, match="already in flight"):
            engine.submit(EngineRequest(p, request_id="0"))
        with pytest.raises(Busy, match="in flight"):
            engine.submit(EngineRequest(p))
    finally:
        engine.stop()
    assert all(collect(h)[1].reason == "cancelled" for h in handles)
    with pytest.raises(Unavailable, match="not running"):
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
    """llm_api.yaml is the one source of the LLM arguments; the engine block (serving.yaml) gives the limits."""
    s, engine = load_trtllm_settings(DEFAULT_PATH), EngineConfig(max_active=6)
    budget = {"free_gpu_memory_fraction": 0.7, "max_tokens": 6 * 3072}   # the memory plan's (test_memory_plan.py)
    kw = s.llm_kwargs(engine, budget)
    assert kw["max_seq_len"] == engine.max_prompt_tokens + engine.max_frames and kw["max_batch_size"] == 6
    assert kw["kv_cache_config"] == {"enable_block_reuse": True, "tokens_per_block": 16, **budget}
    assert kw["cuda_graph_config"]["batch_sizes"] == [1, 2, 4, 6] and s.n_slots(engine) == 12
    assert kw["skip_tokenizer_init"]
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    assert settings_from_dict({**data, "cuda_graph": None}).llm_kwargs(engine, budget)["cuda_graph_config"] is None
    for bad, match in (({"kv_cache": {**data["kv_cache"], "tokens_per_blok": 16}}, "kv_cache.tokens_per_blok: unknown"),
                       ({"kv_cache": {**data["kv_cache"], "free_gpu_memory_fraction": 0.9}},   # serving.yaml's
                        "kv_cache.free_gpu_memory_fraction: unknown"),
                       ({"engine": {"max_active": 3}}, "engine: unknown setting"),
                       ({"triton_config": {}}, "triton_config: unknown setting"),
                       ({"max_batch": 3}, "max_batch: unknown setting"),
                       ({"max_num_tokens": "many"}, "max_num_tokens: expected int")):
        with pytest.raises(ValueError, match=match):
            settings_from_dict({**data, **bad})
    with pytest.raises(ValueError, match="missing 1 required"):
        settings_from_dict({k: v for k, v in data.items() if k != "max_num_tokens"})
    with pytest.raises(ValueError, match="power of two"):
        settings_from_dict({**data, "kv_cache": {**data["kv_cache"], "tokens_per_block": 12}}).validate(engine)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        settings_from_dict({**data, "max_num_tokens": 100}).validate(engine)
    (tmp_path / "bad.yaml").write_text("max_num_tokens: [")
    with pytest.raises(ValueError, match="bad.yaml: cannot read the settings"):
        load_trtllm_settings(tmp_path / "bad.yaml")
