"""The memory plan: parameter counts and codec sizes equal the modules', derived slots and tokens per
slot follow the documented formula, settings that cannot fit are refused before loading with the
numbers, and the plan's bytes match what a real engine on the small config allocates."""

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fish_s2 import memory_plan as mp
from fish_s2.checkpoint import load_config, load_dual_ar
from fish_s2.cli import main
from fish_s2.codec import CodecConfig
from fish_s2.config import S2_PRO_CONFIG_JSON, DualARConfig
from fish_s2.dual_ar import DualAR
from fish_s2.engine import Engine, EngineConfig
from fish_s2.tiny import write_tiny_checkpoint

S2 = DualARConfig.from_dict(S2_PRO_CONFIG_JSON)
README = Path(__file__).resolve().parents[1] / "README.md"
MiB = 1 << 20


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-shard checkpoint of the small preset; (path, config)."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("plan") / "small", preset="small", shards=2)
    return path, load_config(path)[0]


def _settings(**kw):
    """CPU, float32, no codec batch: what the engine test builds."""
    return dataclasses.replace(mp.PlanSettings(device="cpu", dtype="float32", max_prompt_tokens=256, max_frames=256,
                                               prefix_cache_bytes=MiB, max_slots=1000), **kw)


def test_import_needs_no_torch():
    code = "import sys, fish_s2.memory_plan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parameter_counts_equal_the_model(small):
    _, cfg = small
    untied = dataclasses.replace(cfg, tie_word_embeddings=False, fast=dataclasses.replace(cfg.fast, dim=256),
                                 slow=dataclasses.replace(cfg.slow, qkv_bias=True, o_bias=True))
    for c in (S2, cfg, untied):
        with torch.device("meta"):
            sd = DualAR(c).state_dict()
        count = lambda prefix: sum(v.numel() for k, v in sd.items() if k.startswith(prefix))  # noqa: E731
        assert mp.dual_ar_params(c) == (count("slow."), count("fast."))
    assert sum(mp.dual_ar_params(S2)) == 4_561_852_416   # perf/results/gpu_bench_nvidia_h200.json: slow + fast


def test_checkpoint_params_from_headers(small):
    path, cfg = small
    assert mp.checkpoint_params(path) == sum(mp.dual_ar_params(cfg))


def test_codec_spec():
    assert mp.codec_spec_of(CodecConfig.s2_pro()) == mp.S2_PRO_CODEC == mp.codec_spec(None)


def test_constants_mirror_the_package_defaults():
    from fish_s2.serving.config import ServingConfig
    from fish_s2.serving.repository import PROFILE_SETTINGS

    e, s = EngineConfig(), mp.PlanSettings()
    assert (e.max_prompt_tokens, e.max_frames, e.prefix_cache_bytes) == (
        mp.DEFAULT_MAX_PROMPT_TOKENS, mp.DEFAULT_MAX_FRAMES, mp.DEFAULT_PREFIX_CACHE_BYTES)
    chunks = e.chunk_plan
    assert max(chunks.first_chunk_frames, chunks.chunk_frames) + chunks.context_frames == s.codec_chunk_frames
    assert ServingConfig.max_reference_seconds == s.reference_seconds
    assert (ServingConfig.kv_memory_fraction, ServingConfig.dtype) == (mp.DEFAULT_KV_FRACTION, "auto")
    for name, plan in mp.PLAN_PROFILES.items():
        assert plan.codec_batch == PROFILE_SETTINGS[name][1].codec_max_batch
        assert plan.max_slots == PROFILE_SETTINGS[name][0]["max_slots"]
        assert PROFILE_SETTINGS[name][0]["engine"]["max_active"] is None   # derived by dual_ar when it starts


def test_kv_bytes_per_token():
    assert mp.kv_bytes_per_token(S2.slow, "bf16") == 2 * 36 * 8 * 128 * 2 == 147_456   # "147 KB" of the issue


@pytest.mark.parametrize("extra_slots", [0.5, 3.2, 7.9])
def test_derived_slots_follow_the_formula(small, extra_slots):
    path, cfg = small
    s = _settings(max_active=None)
    base = mp.plan_memory(cfg, s, 10 << 30, codec=None)
    per_token = 2 * cfg.slow.n_layer * cfg.slow.n_kv_head * cfg.slow.head_dim * 4
    fast_row = 2 * cfg.fast.n_layer * cfg.fast.n_kv_head * cfg.fast.head_dim * 4 * cfg.num_codebooks
    assert base.component("fast-AR KV").bytes == base.max_active * fast_row
    overhead = sum(base.component(n).bytes for n in ("fast-AR KV", "decode state", "decode workspace"))
    per_slot = per_token * (256 + 256) + overhead // base.max_active
    assert base.bytes_per_slot == per_slot
    available = base.fixed_bytes + int(extra_slots * per_slot / s.kv_memory_fraction)
    plan = mp.plan_memory(cfg, s, available, codec=None)
    expected = math.floor(s.kv_memory_fraction * (available - plan.fixed_bytes) / per_slot)
    assert plan.max_active == expected == int(extra_slots) and plan.fits == (expected >= 1)
    assert plan.derived == ("max_active",) and plan.tokens_per_slot == 512
    capped = mp.plan_memory(cfg, dataclasses.replace(s, max_slots=2), available, codec=None)
    assert capped.max_active == min(2, int(extra_slots))
    assert capped.trtllm_kv_cache()["kv_cache"]["max_tokens"] == capped.max_active * 512


def test_derived_frames_follow_the_formula(small):
    _, cfg = small
    s = _settings(max_active=4, max_frames=None)
    probe = mp.plan_memory(cfg, s, 1 << 40, codec=None)   # the fixed part does not depend on the frames
    per_token = probe.kv_bytes_per_token
    overhead = probe.bytes_per_slot - per_token * probe.tokens_per_slot
    available = probe.fixed_bytes + 40 * MiB
    plan = mp.check_fits(mp.plan_memory(cfg, s, available, codec=None))
    budget = int(s.kv_memory_fraction * 40 * MiB)
    assert plan.max_frames == (budget // 4 - overhead) // per_token - 256 and plan.derived == ("max_frames",)
    assert plan.slot_bytes <= plan.kv_budget
    assert probe.max_frames == cfg.slow.max_seq_len - 256   # plenty of memory: the model's limit


def test_weights_too_large_are_refused_with_the_numbers(small, capsys):
    path, cfg = small
    plan = mp.plan_memory(cfg, _settings(), 50 * MiB, codec=None)
    weights = plan.component("weights").bytes
    assert weights == sum(mp.dual_ar_params(cfg)) * 4 > 50 * MiB
    with pytest.raises(ValueError) as e:
        mp.check_fits(plan)
    msg = str(e.value)
    for text in (mp.fmt_bytes(plan.total_bytes), mp.fmt_bytes(50 * MiB),
                 f"the weights alone need {mp.fmt_bytes(weights)}", "bfloat16 (dtype)"):
        assert text in msg
    # the command refuses it the same way, from the headers alone (before any weight is loaded)
    assert main(["plan", "--checkpoint", str(path), "--profile", "cpu", "--device-memory", "50MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: memory plan does not fit on cpu") and "50.00 MiB" in err[0]


def test_too_many_explicit_slots_are_refused_naming_the_setting(small):
    _, cfg = small
    probe = mp.plan_memory(cfg, _settings(max_active=1), 1 << 40, codec=None)
    available = probe.fixed_bytes + int(3.5 * probe.bytes_per_slot / 0.85)
    plan = mp.plan_memory(cfg, _settings(max_active=8), available, codec=None)
    with pytest.raises(ValueError, match=r"room for 3 slots .* lower engine.max_active to 3 .* kv_memory_fraction"):
        mp.check_fits(plan)
    mp.check_fits(mp.plan_memory(cfg, _settings(max_active=3), available, codec=None))
    with pytest.raises(ValueError, match="less than one slot"):
        mp.check_fits(mp.plan_memory(cfg, _settings(max_active=None), probe.fixed_bytes + MiB, codec=None))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        mp.check_fits(mp.plan_memory(cfg, _settings(max_frames=cfg.slow.max_seq_len), 1 << 40, codec=None))


def test_dtype_choice():
    small_n, big_n = 30_000_000, sum(mp.dual_ar_params(S2))
    assert mp.choose_dtype("auto", "cpu", small_n)[0] == "float32"
    assert mp.choose_dtype("auto", "cpu", big_n) == ("bfloat16", "auto: CPU, 4.56 B parameters >= 1 B")
    assert mp.choose_dtype("auto", "cuda", small_n, True)[0] == "bfloat16"
    assert mp.choose_dtype("auto", "cuda:1", big_n, False)[0] == "float32"
    assert mp.choose_dtype("fp32", "cuda", big_n, True) == ("float32", "requested")
    plan = mp.plan_memory(S2, mp.PLAN_PROFILES["cpu"], 64 << 30)
    assert plan.dtype == "bfloat16" and "4.56 B parameters" in plan.to_text()
    with pytest.raises(ValueError, match="dtype"):
        mp.choose_dtype("int8", "cpu", 1)


def test_text_and_metrics():
    plan = mp.check_fits(mp.plan_memory(S2, mp.PLAN_PROFILES["gpu"], 80 << 30, bf16_supported=True))
    assert plan.max_active == 64 and plan.tokens_per_slot == 3072
    assert plan.component("slow-AR KV").bytes == 64 * 3072 * 147_456
    assert "prefix cache" not in [c.name for c in plan.components]   # TensorRT-LLM reuses blocks of its KV pool
    text = plan.to_text()
    for line in ("weights", "slow-AR KV", "codec weights", "activations (estimate)", "capped at max_slots 64"):
        assert line in text
    metrics = {(n, tuple(sorted(labels.items()))): v for n, labels, v in plan.to_metrics()}
    assert metrics[("fish_s2_memory_planned_bytes", (("component", "total"),))] == plan.total_bytes
    assert metrics[("fish_s2_kv_slots", ())] == 64 and metrics[("fish_s2_kv_tokens_per_slot", ())] == 3072
    assert {n for n, _, _ in plan.to_metrics()} == set(mp.METRICS)
    assert plan.trtllm_kv_cache() == {"max_batch_size": 64, "kv_cache": {"free_gpu_memory_fraction": 0.85,
                                                                         "max_tokens": 64 * 3072}}
    assert plan.engine_settings()["max_active"] == 64


def test_readme_sizing_table_is_what_the_code_computes():
    rows = re.findall(r"\| `(\w+)` \| ([\d.]+) GiB \| (\d+) \| (\d+)[^|]*\| ([\d.]+) GiB \|",
                      README.read_text().split("## Sizing")[1].split("\n## ")[0])
    assert len(rows) == 3
    for memory, fixed, fit, slots, total in rows:
        plan = mp.check_fits(mp.plan_memory(S2, mp.PLAN_PROFILES["gpu"], mp.parse_bytes(memory), bf16_supported=True))
        assert (mp.fmt_bytes(plan.fixed_bytes), plan.slots_that_fit, plan.max_active, mp.fmt_bytes(plan.total_bytes)) \
            == (f"{fixed} GiB", int(fit), int(slots), f"{total} GiB")


def test_parse_bytes_and_available_memory():
    assert mp.parse_bytes("80GiB") == 80 << 30 and mp.parse_bytes("48GB") == 48 * 10**9
    assert mp.parse_bytes("143771MiB") == 143771 << 20 and mp.parse_bytes("1.5G") == 3 << 29
    with pytest.raises(ValueError):
        mp.parse_bytes("lots")
    total = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
    assert 0 < mp.available_memory("cpu") <= total


def test_plan_command(capsys):
    assert main(["plan", "--preset", "s2-pro", "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "slots (max_active) 64" in out and "8.50 GiB" in out and "'max_tokens': 196608" in out
    assert main(["plan", "--preset", "s2-pro", "--profile", "cpu", "--dtype", "float32", "--max-active", "16",
                 "--max-frames", "1024", "--device-memory", "24GiB"]) == 2
    err = capsys.readouterr().err
    assert "weights 16.99 GiB in float32" in err and "16 slots x 3072 tokens" in err and "KV 13.50 GiB" in err
    assert main(["plan", "--device-memory", "80GiB"]) == 2 and "--preset" in capsys.readouterr().err
    assert main(["plan", "--preset", "s2-pro", "--device", "cpu"]) == 2 and "runtime" in capsys.readouterr().err


# --------------------------------------------------------------------------- plan vs the real engine


def allocated_bytes(engine: Engine) -> dict[str, int]:
    """What an engine holds after construction, by plan component (adapt here when the engine changes)."""
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    runner = engine.runner
    model = runner.model
    slow_kv = [b for c in runner.slow_cache for b in (c.k, c.v)]
    fast_kv = [b for c in runner.fast_cache for b in (c.k, c.v)]
    buffers = list(model.buffers())
    state = [v for v in vars(runner).values() if isinstance(v, torch.Tensor)]   # per slot + scratch row
    return {"weights": nbytes(model.parameters()), "slow-AR KV": nbytes(slow_kv), "fast-AR KV": nbytes(fast_kv),
            "buffers": nbytes(buffers), "decode state": nbytes(state)}


def test_plan_matches_what_the_engine_allocates(small):
    path, cfg = small
    s = _settings(max_active=None)
    probe = mp.plan_memory(cfg, s, 1 << 40, params=mp.checkpoint_params(path), codec=None)
    available = probe.fixed_bytes + int(5.5 * probe.bytes_per_slot / s.kv_memory_fraction)
    plan = mp.check_fits(mp.plan_memory(cfg, s, available, params=mp.checkpoint_params(path), codec=None))
    assert plan.max_active == 5 and plan.dtype == "float32"
    engine = Engine(load_dual_ar(path, cfg, plan.dtype), dataclasses.replace(EngineConfig(), **plan.engine_settings()))
    got = allocated_bytes(engine)
    assert got["weights"] == plan.component("weights").bytes
    assert got["slow-AR KV"] == plan.component("slow-AR KV").bytes
    planned = {name: plan.component(name).bytes for name in got}
    small_parts = ("fast-AR KV", "buffers", "decode state")
    assert sum(got[n] for n in small_parts) == pytest.approx(sum(planned[n] for n in small_parts), rel=0.1)
    # everything the engine holds at start vs the plan (the prefix cache is a budget, filled later)
    assert sum(got.values()) == pytest.approx(sum(planned.values()), rel=0.1)
