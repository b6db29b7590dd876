"""The export CLI and stages: a real CPU export of a sharded tiny checkpoint (every CPU artifact, the
manifest, skipping up-to-date outputs), the staleness rules with fake exporters, and the TensorRT
profile computation of build/build_trt_plans.py (pure; TensorRT itself cannot run here)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from fish_s2.codec import CodecConfig
from fish_s2.checkpoint import load_config
from fish_s2.export import onnx_export, stages
from fish_s2.export.__main__ import main
from fish_s2.ort_runtime import OrtCodecDecoder, OrtCodecEncoder, OrtFastAR
from fish_s2.request import ChunkPlan
from fish_s2.tiny import write_tiny_checkpoint

CPU_STAGES = ("onnx-fast-ar", "onnx-codec-decoder", "onnx-codec-encoder", "trtllm-checkpoint")


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    """``python -m fish_s2.export`` on a 2-shard tiny checkpoint, run twice; returns (checkpoint, out, logs)."""
    root = tmp_path_factory.mktemp("export")
    ck = write_tiny_checkpoint(root / "ckpt", seed=5, shards=2)
    out = root / "out"
    logs = []
    for _ in range(2):
        lines: list[str] = []
        opts = stages.Options(checkpoint=ck, out=out, log=lines.append)
        stages.run(opts)
        logs.append(lines)
    return ck, out, logs


def test_cpu_export_writes_every_cpu_artifact(real_export):
    ck, out, (first, _) = real_export
    for name in onnx_export.FILES.values():
        assert (out / "onnx" / name).is_file()
    assert (out / "trtllm" / "config.json").is_file()
    assert not (out / "trt").exists()
    text = "\n".join(first)
    for i, name in enumerate(CPU_STAGES, 1):
        assert f"[{i}/5] {name}: done in" in text
    assert "[5/5] trt-plans: skipped on target cpu" in text
    # the artifacts are usable by the runtimes
    dec = OrtCodecDecoder(out / "onnx" / "codec_decoder.onnx")
    assert dec.decode(np.zeros((1, dec.n_codebooks, 3), dtype=np.int64)).shape == (1, 3 * dec.frame_length)
    assert OrtCodecEncoder(out / "onnx" / "codec_encoder.onnx").encode(np.zeros((1, 10), np.float32)).shape == (1, 10, 1)
    assert OrtFastAR(out / "onnx" / "fast_ar.onnx").num_codebooks == 10


def test_manifest(real_export):
    ck, out, _ = real_export
    m = json.loads((out / "manifest.json").read_text())
    cfg, _ = load_config(ck)
    codec = CodecConfig.for_checkpoint(ck)
    assert m["checkpoint"] == str(ck.resolve()) and m["target"] == "cpu"
    assert {k: m["model"][k] for k in ("frame_length", "sample_rate", "n_codebooks", "slow_dim", "num_codebooks")} == {
        "frame_length": codec.frame_length, "sample_rate": codec.sample_rate, "n_codebooks": codec.n_codebooks,
        "slow_dim": cfg.slow.dim, "num_codebooks": cfg.num_codebooks}
    assert m["versions"]["torch"] and m["versions"]["onnxruntime"] and m["versions"]["fish_s2"]
    assert all(m["stages"][s]["status"] == "done" for s in CPU_STAGES)
    assert m["stages"]["trt-plans"] == {"status": "skipped", "reason": "target cpu"}
    arts = m["artifacts"]
    assert arts["onnx/codec_decoder.onnx"]["metadata"]["frame_length"] == str(codec.frame_length)
    assert arts["trtllm/config.json"]["stage"] == "trtllm-checkpoint"
    for rel, info in arts.items():
        assert (out / rel).stat().st_size == info["bytes"]
    check = m["stages"]["trtllm-checkpoint"]["check"]
    assert "shard(s)" in check and "equal the source (q/k rows and norms inverse-permuted)" in check


def test_conversion_check_is_reported(real_export):
    _, _, (first, _) = real_export
    line = next(l for l in first if "trtllm-checkpoint: done in" in l)
    assert "check: " in line and "reloaded and mapped back equal the source" in line


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_outputs_have_the_checkpoints_permissions(tmp_path, mode):
    """Every export output (the TensorRT-LLM shards included: safetensors writes 0600) gets the source's
    mode, so a server running as another user reads them when it can read the checkpoint."""
    ck = write_tiny_checkpoint(tmp_path / "ckpt", seed=1, shards=2)
    for p in ck.iterdir():
        p.chmod(mode)
    m = stages.run(stages.Options(checkpoint=ck, out=tmp_path / "out", log=lambda line: None),
                   ("trtllm-checkpoint", "onnx-codec-decoder"))
    arts = [tmp_path / "out" / rel for rel in m["artifacts"]]
    assert any(p.suffix == ".safetensors" for p in arts) and any(p.suffix == ".onnx" for p in arts)
    for p in arts:
        assert p.stat().st_mode & 0o777 == mode, p
        assert bool(p.stat().st_mode & 0o044) == bool(mode & 0o044)


def test_second_run_skips_everything(real_export):
    _, _, (_, second) = real_export
    text = "\n".join(second)
    for i, name in enumerate(CPU_STAGES, 1):
        assert f"[{i}/5] {name}: up to date" in text
    assert "done in" not in text


def test_trt_profiles_dry_run_on_the_export(real_export, capsys):
    _, out, _ = real_export
    plans = stages.load_trt_builder()
    assert plans.main(["--onnx-dir", str(out / "onnx"), "--dry-run", "--max-batch", "16"]) == 0
    text = capsys.readouterr().out
    chunks = ChunkPlan()
    hi = max(chunks.first_chunk_frames, chunks.chunk_frames) + chunks.context_frames
    assert f"codec_decoder.codes: [1, 10, 1] / [8, 10, {chunks.chunk_frames + chunks.context_frames}] / [16, 10, {hi}]" in text
    assert "fast_ar: no plan" in text and "3840" in text
    assert plans.main(["--onnx-dir", str(out / "onnx")]) == 2   # building needs --out-dir


# ---------------------------------------------------------------------------------- fake exporters


@pytest.fixture
def fakes(monkeypatch):
    """Replace the exporters and the TensorRT-LLM converter by recorders that write small files."""
    calls: list[str] = []

    def exporter(network):
        def export(checkpoint, path):
            calls.append(network)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"onnx")
            return onnx_export.Exported(path, {"network": network}, "fake")
        return export

    for network in onnx_export.FILES:
        monkeypatch.setattr(onnx_export, f"export_{network}", exporter(network))

    def convert(checkpoint_dir, out_dir):
        calls.append("trtllm")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr("fish_s2.trtllm.convert.convert_checkpoint", convert)
    monkeypatch.setattr("fish_s2.trtllm.convert.check_conversion", lambda checkpoint_dir, out_dir: "fake check")
    return calls


@pytest.fixture
def small_ckpt(tmp_path):
    """A tiny checkpoint whose files date from an hour ago (so a touched file is newer than any output)."""
    ck = write_tiny_checkpoint(tmp_path / "ckpt", seed=2)
    hour_ago = ck.stat().st_mtime - 3600
    for p in ck.iterdir():
        os.utime(p, (hour_ago, hour_ago))
    return ck


def _run(ck, out, *extra):
    return main(["--checkpoint", str(ck), "--out", str(out), *extra])


def test_staleness(fakes, small_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(small_ckpt, out) == 0
    assert fakes == ["fast_ar", "codec_decoder", "codec_encoder", "trtllm"]
    fakes.clear()
    assert _run(small_ckpt, out) == 0 and fakes == []

    os.utime(small_ckpt / "codec.pth")                      # the codec changed: only its graphs are redone
    assert _run(small_ckpt, out) == 0
    assert fakes == ["codec_decoder", "codec_encoder"]
    fakes.clear()

    (out / "onnx" / "fast_ar.onnx").unlink()                # an output went missing
    assert _run(small_ckpt, out) == 0 and fakes == ["fast_ar"]
    fakes.clear()

    assert _run(small_ckpt, out, "--stage", "trtllm-checkpoint", "--force") == 0 and fakes == ["trtllm"]
    assert "[1/1] trtllm-checkpoint: TensorRT-LLM model directory -> trtllm/ (--force)" in capsys.readouterr().out
    fakes.clear()

    other = write_tiny_checkpoint(tmp_path / "other", seed=9)   # another checkpoint into the same --out
    assert _run(other, out) == 0 and len(fakes) == 4


def test_relative_paths(fakes, small_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run("ckpt", "out") == 0 and len(fakes) == 4
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["checkpoint"] == str(small_ckpt.resolve())
    assert m["stages"]["trtllm-checkpoint"]["outputs"] == ["trtllm/config.json"]


def test_failed_stage_is_recorded_and_retried(fakes, small_ckpt, tmp_path, monkeypatch, capsys):
    def broken(checkpoint, path):
        raise RuntimeError("graph disagrees")

    monkeypatch.setattr(onnx_export, "export_codec_encoder", broken)
    out = tmp_path / "out"
    assert _run(small_ckpt, out) == 1
    assert "stage onnx-codec-encoder failed: RuntimeError: graph disagrees" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"]["onnx-codec-encoder"]["status"] == "failed"
    assert m["stages"]["onnx-fast-ar"]["status"] == "done" and "trtllm-checkpoint" not in m["stages"]
    monkeypatch.undo()
    fakes_again: list[str] = []
    monkeypatch.setattr(onnx_export, "export_codec_encoder",
                        lambda c, p: (fakes_again.append("enc"), p.parent.mkdir(parents=True, exist_ok=True),
                                      p.write_bytes(b"x"), onnx_export.Exported(p, {}, ""))[-1])
    monkeypatch.setattr(onnx_export, "export_fast_ar", lambda c, p: pytest.fail("fast AR is up to date"))
    monkeypatch.setattr(onnx_export, "export_codec_decoder", lambda c, p: pytest.fail("decoder is up to date"))
    monkeypatch.setattr("fish_s2.trtllm.convert.convert_checkpoint",
                        lambda c, o: (o.mkdir(parents=True, exist_ok=True), (o / "x").write_text(""), o)[-1])
    assert _run(small_ckpt, out, "--stage", "onnx-codec-encoder", "--stage", "onnx-fast-ar") == 0
    assert fakes_again == ["enc"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed: plans would build")
def test_gpu_target_without_tensorrt_fails_clearly(fakes, small_ckpt, tmp_path, capsys):
    assert _run(small_ckpt, tmp_path / "out", "--target", "gpu") == 1
    err = capsys.readouterr().err
    assert "stage trt-plans failed" in err and "tensorrt" in err and "build/Dockerfile" in err


@pytest.mark.parametrize("args, message", [
    (["--stage", "onnx-everything"], "--stage: unknown stage(s) ['onnx-everything']"),
    (["--max-batch", "0"], "--max-batch: must be an integer >= 1, got 0"),
])
def test_bad_arguments(args, message, fakes, small_ckpt, tmp_path, capsys):
    assert _run(small_ckpt, tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert fakes == []


def test_bad_paths(fakes, small_ckpt, tmp_path, capsys):
    assert _run(tmp_path, tmp_path / "out") == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert _run(small_ckpt, small_ckpt / "export") == 2
    assert "--out" in capsys.readouterr().err
    assert fakes == []


# ------------------------------------------------------------------------------- TensorRT profiles


@pytest.fixture(scope="module")
def plans():
    return stages.load_trt_builder()


META = {
    "codec_decoder": {"network": "codec_decoder", "frame_length": "2048", "sample_rate": "44100",
                      "n_codebooks": "10", "max_frames": "2048"},
    "codec_encoder": {"network": "codec_encoder", "frame_length": "2048", "sample_rate": "44100",
                      "n_codebooks": "10", "max_samples": "4194304"},
    "fast_ar": {"network": "fast_ar", "num_codebooks": "10", "codebook_size": "4096", "slow_dim": "2560"},
}


def test_profiles_default(plans):
    s = plans.ProfileSettings()
    p = plans.profiles(META, s)
    chunks = ChunkPlan()
    opt_f = chunks.chunk_frames + chunks.context_frames
    max_f = max(chunks.first_chunk_frames, chunks.chunk_frames) + chunks.context_frames
    assert p["codec_decoder"] == {"codes": ((1, 10, 1), (s.opt_batch, 10, opt_f), (s.max_batch, 10, max_f))}
    lo, opt, hi = p["codec_encoder"]["audio"]
    assert lo == (1, 2048) and opt[0] == 1 and hi[0] == s.encoder_max_batch
    assert opt[1] % 2048 == 0 and hi[1] % 2048 == 0 and opt[1] >= 10 * 44100 and hi[1] >= 30 * 44100
    assert "fast_ar" not in p and "3840" in plans.skip_reason("fast_ar", META["fast_ar"])


def test_profiles_respect_the_files_limits(plans):
    meta = {"codec_decoder": {**META["codec_decoder"], "max_frames": "20"},
            "codec_encoder": {**META["codec_encoder"], "max_samples": str(5 * 2048)}}
    p = plans.profiles(meta, plans.ProfileSettings())
    assert p["codec_decoder"]["codes"][1][2] == p["codec_decoder"]["codes"][2][2] == 20
    assert p["codec_encoder"]["audio"][1][1] == p["codec_encoder"]["audio"][2][1] == 5 * 2048


def test_fast_ar_profile_when_topk_fits(plans):
    meta = {"fast_ar": {**META["fast_ar"], "codebook_size": "1024"}}
    p = plans.profiles(meta, plans.ProfileSettings.for_max_batch(4))["fast_ar"]
    assert set(p) == set(onnx_export.FAST_AR_INPUTS)
    assert p["noise"] == ((1, 9, 1024), (4, 9, 1024), (4, 9, 1024)) and p["main"] == ((1,), (4,), (4,))
    assert p["hidden"][2] == (4, 2560)


@pytest.mark.parametrize("kwargs, message", [
    ({"opt_batch": 64}, "opt_batch: must be <= max_batch 32, got 64"),
    ({"decoder_opt_frames": 100}, "decoder_opt_frames: must be <= decoder_max_frames"),
    ({"max_batch": 0}, "max_batch: must be an integer >= 1, got 0"),
    ({"encoder_max_seconds": 0.0}, "encoder_max_seconds: must be > 0"),
])
def test_profile_settings_validation(plans, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plans.profiles(META, plans.ProfileSettings(**kwargs))
