"""dual_ar's plan-driven startup (fish_s2.serving.runtime.start_dual_ar) on the tiny checkpoint: the
plan comes before any weight is loaded and refuses what cannot fit, derived slots are what the engine
gets, the engine is warmed up; a derived frame limit is the same number for preprocess and the engine."""

import dataclasses

import numpy as np
import pytest

from fish_s2 import memory_plan as mp
from fish_s2.checkpoint import resolve_dtype
from fish_s2.engine import check_request
from fish_s2.request import EngineRequest, InvalidArgument
from fish_s2.serving import protocol as p
from fish_s2.serving import runtime
from fish_s2.serving.config import FILE_NAME, ServingConfig
from fish_s2.serving.repository import PLAN_FILE_NAME, generate, serving_config
from test_serving_models import Request, TritonError, _load

CODEC_BATCH = 8   # the cpu profile's codec_max_batch


@pytest.fixture(scope="module")
def cfg(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    return serving_config("cpu", tiny_checkpoint, root / "art", root / "voices", {})[0]


def _explicit(cfg, **engine):
    return cfg.with_overrides({f"engine.{k}": v for k, v in engine.items()})


def _no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("weights loaded before the plan was checked")

    monkeypatch.setattr(runtime, "load_dual_ar", fail)
    monkeypatch.setattr(runtime, "build_engine", fail)


def test_profile_defaults_are_derived(cfg):
    assert (cfg.dtype, cfg.kv_memory_fraction, cfg.max_slots) == ("auto", mp.DEFAULT_KV_FRACTION, 16)
    assert (cfg.engine.max_active, cfg.engine.max_frames) == (None, 1024)
    assert ServingConfig.from_dict(cfg.to_dict()) == cfg           # null round-trips through serving.yaml
    plan = runtime.memory_plan(cfg, 64 << 30, CODEC_BATCH)
    assert plan.dtype == "float32" and "M parameters < 1 B" in plan.dtype_reason   # tiny: fp32 on the CPU
    assert plan.derived == ("max_active",) and plan.max_active == 16


@pytest.mark.parametrize("overrides, message", [
    ({"kv_memory_fraction": 0.0}, r"kv_memory_fraction: must be in \(0, 1\]"),
    ({"kv_memory_fraction": 1.5}, r"kv_memory_fraction: must be in \(0, 1\]"),
    ({"kv_memory_fraction": "most"}, "kv_memory_fraction: expected float"),
    ({"dtype": "int8"}, "dtype: expected auto or one of"),
    ({"max_slots": 0}, "max_slots: out of range"),
    ({"engine.max_active": 0}, r"engine.max_active: must be >= 1, or null"),
    ({"engine.max_frames": -3}, r"engine.max_frames: must be >= 1, or null"),
    ({"engine.max_frames": None}, "engine.max_frames: null .* needs a number for engine.max_active"),
    ({"engine.max_active": "auto"}, "engine.max_active: expected int"),
])
def test_new_settings_are_checked_naming_the_key(cfg, overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg.with_overrides(overrides)


def test_explicit_slots_that_cannot_fit_are_refused_before_loading(cfg, monkeypatch):
    _no_loading(monkeypatch)
    probe = runtime.memory_plan(_explicit(cfg, max_active=1), 1 << 40, CODEC_BATCH)
    available = probe.fixed_bytes + int(3.5 * probe.bytes_per_slot / cfg.kv_memory_fraction)
    logged = []
    with pytest.raises(ValueError) as e:
        runtime.start_dual_ar(_explicit(cfg, max_active=8), CODEC_BATCH, logged.append, available)
    msg = str(e.value)
    assert msg.startswith("memory plan does not fit on cpu: needs ") and mp.fmt_bytes(available) + " available" in msg
    assert "room for 3 slots" in msg and "lower engine.max_active to 3" in msg
    assert logged[0].startswith("memory plan: cpu") and "slots (max_active) 8, given" in logged[-1]   # printed first
    with pytest.raises(ValueError, match="the weights alone need"):
        runtime.start_dual_ar(cfg, CODEC_BATCH, logged.append, 1 << 20)


def test_derived_slots_are_the_engines_and_it_is_warmed_up(cfg):
    probe = runtime.memory_plan(cfg, 1 << 40, CODEC_BATCH)
    available = probe.fixed_bytes + int(5.5 * probe.bytes_per_slot / cfg.kv_memory_fraction)
    logged = []
    started = runtime.start_dual_ar(cfg, CODEC_BATCH, logged.append, available)
    engine, plan = started.engine, started.plan
    try:
        assert plan.max_active == 5 and plan.derived == ("max_active",)
        assert engine.cfg.max_active == 5 and engine.cfg.max_frames == cfg.engine.max_frames == plan.max_frames
        assert engine.runner.slow_cache[0].k.shape[0] == 5                     # KV slots allocated as planned
        assert engine.runner.dtype == resolve_dtype(plan.dtype)
        assert started.warmup_s > 0 and engine.stats()["frames_generated"] >= 1   # one short generation ran
        assert engine.runner.prefix_cache.stats()["entries"] == 0              # the warm-up caches no prefix
        assert logged == plan.to_text().splitlines() + [logged[-1]] and logged[-1].startswith("dual_ar: warm-up done in ")
    finally:
        engine.stop()


def test_a_derived_frame_limit_is_the_same_for_preprocess_and_the_engine(tiny_checkpoint, tmp_path, monkeypatch):
    """engine.max_frames null is resolved when the repository is generated (for --device-memory), so
    preprocess and dual_ar read one number."""
    overrides = {"engine.max_active": 2, "engine.max_frames": None}
    base = serving_config("cpu", tiny_checkpoint, tmp_path / "art", tmp_path / "voices", {"engine.max_active": 2})[0]
    probe = runtime.memory_plan(dataclasses.replace(base, engine=dataclasses.replace(base.engine, max_frames=None)),
                                1 << 40, CODEC_BATCH)
    overhead = probe.bytes_per_slot - probe.kv_bytes_per_token * probe.tokens_per_slot
    memory = probe.fixed_bytes + int(2 * (probe.kv_bytes_per_token * (2048 + 500) + overhead) / base.kv_memory_fraction)
    cfg = generate("cpu", tiny_checkpoint, tmp_path / "art", tmp_path / "repo", overrides=overrides,
                   device_memory=memory)
    frames = cfg.engine.max_frames
    assert 490 <= frames <= 500 and ServingConfig.load(tmp_path / "repo" / FILE_NAME).engine.max_frames == frames
    assert f"max_frames {frames} (derived from the memory)" in (tmp_path / "repo" / PLAN_FILE_NAME).read_text()

    preprocess = _load(monkeypatch, tmp_path / "repo", p.PREPROCESS)
    assert preprocess.limits.max_frames == frames
    ok, too_long = preprocess.execute([Request(p.tts_inputs("Hi.", max_frames=frames)),
                                       Request(p.tts_inputs("Hi.", max_frames=frames + 1))])
    assert ok.error is None and ok.outputs["MAX_FRAMES"].tolist() == [frames]
    assert too_long.error.code == TritonError.INVALID_ARG and too_long.error.message().startswith("max_frames:")

    started = runtime.start_dual_ar(cfg, CODEC_BATCH, lambda text: None, memory)   # dual_ar, same memory
    try:
        assert started.engine.cfg.max_frames == frames and started.plan.fits
        prompt = ok.outputs["PROMPT"]
        check_request(EngineRequest(prompt, max_frames=frames), started.engine.cfg, started.engine.model_cfg)
        with pytest.raises(InvalidArgument, match="^max_frames:"):
            check_request(EngineRequest(prompt, max_frames=frames + 1), started.engine.cfg, started.engine.model_cfg)
    finally:
        started.engine.stop()
    # nothing derived: no plan file left from before
    generate("cpu", tiny_checkpoint, tmp_path / "art", tmp_path / "repo")
    assert not (tmp_path / "repo" / PLAN_FILE_NAME).exists()


def test_a_frame_limit_that_cannot_be_derived_is_refused_at_generation(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="memory plan does not fit on cpu"):
        generate("cpu", tiny_checkpoint, tmp_path / "art", tmp_path / "repo",
                 overrides={"engine.max_active": 4, "engine.max_frames": None}, device_memory=64 << 20)


def test_warm_up_reads_memory_mapped_weights_in(tiny_checkpoint):
    import torch

    module = torch.nn.Linear(3000, 7)
    runtime.read_in(module)                                     # touches one element per page, any dtype
    runtime.read_in(module.to(torch.bfloat16))
    codes = []

    class Decoder:
        def decode(self, c):
            codes.append(c.shape)
            return np.zeros((c.shape[0], c.shape[2] * 4), np.float32)

    cfg = serving_config("cpu", tiny_checkpoint, tiny_checkpoint, tiny_checkpoint, {})[0]
    assert runtime.warm_up_codec(Decoder(), cfg) > 0 and codes == [(1, 10, 4), (1, 10, 50)]
