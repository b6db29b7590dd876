"""ONNX exports against torch on tiny checkpoints: fast-AR codes identical to ``sample_codes`` (greedy and
sampled, with and without the fast AR's input projection), codec audio within 1e-4, encoder codes identical,
and the runtimes' input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fish_s2.checkpoint import load_config, load_dual_ar
from fish_s2.codec import Codec, CodecConfig
from fish_s2.dual_ar import sample_codes
from fish_s2.export import onnx_export
from fish_s2.ort_runtime import OrtCodecDecoder, OrtCodecEncoder, OrtFastAR
from fish_s2.request import SamplingParams
from fish_s2.sampling import BatchSampling
from fish_s2.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {net: getattr(onnx_export, f"export_{net}")(tiny_checkpoint, out / name)
            for net, name in onnx_export.FILES.items()}


@pytest.fixture(scope="module")
def projected(tmp_path_factory):
    """A checkpoint whose fast AR is narrower than the slow AR (so it has project_in), and its fast-AR export."""
    ck = write_tiny_checkpoint(tmp_path_factory.mktemp("fd48") / "ckpt", seed=3, fast_dim=48)
    return ck, onnx_export.export_fast_ar(ck, ck.parent / "fast_ar.onnx").path


@pytest.fixture(scope="module")
def codec(tiny_checkpoint):
    return Codec.from_checkpoint(tiny_checkpoint)


def _torch_codes(checkpoint, hidden, main, sampling, draw0):
    cfg, _ = load_config(checkpoint)
    model = load_dual_ar(checkpoint, cfg)
    with torch.no_grad():
        return sample_codes(model, hidden, main, sampling, draw0, model.fast.new_cache(hidden.shape[0]))


def _frame_inputs(checkpoint, B: int, seed: int):
    cfg, _ = load_config(checkpoint)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, cfg.slow.dim, generator=g)
    main = torch.randint(cfg.semantic_begin_id, cfg.semantic_end_id + 1, (B,), generator=g)
    main[0] = cfg.eos_id                                  # <|im_end|>: code 0 clamps to 0
    draw0 = torch.randint(0, 1 << 20, (B,), generator=g) * 11
    return hidden, main, draw0


def _cases(which: str, tiny_checkpoint, exported, projected):
    return (tiny_checkpoint, exported["fast_ar"].path) if which == "tiny" else projected


@pytest.mark.parametrize("which", ["tiny", "fast_dim=48"])
@pytest.mark.parametrize("B", [1, 5])
def test_fast_ar_greedy_codes_identical(which, B, tiny_checkpoint, exported, projected):
    checkpoint, path = _cases(which, tiny_checkpoint, exported, projected)
    hidden, main, draw0 = _frame_inputs(checkpoint, B, seed=B)
    sampling = BatchSampling.of([SamplingParams(temperature=0.0, seed=i) for i in range(B)])
    want = _torch_codes(checkpoint, hidden, main, sampling, draw0)
    got = OrtFastAR(path).sample_codes(hidden, main, sampling, draw0)
    assert got.dtype == torch.long and got.shape == want.shape == (B, 10)
    assert torch.equal(got, want)
    assert (got[0, 0] == 0).item()


@pytest.mark.parametrize("which", ["tiny", "fast_dim=48"])
def test_fast_ar_sampled_codes_identical(which, tiny_checkpoint, exported, projected):
    checkpoint, path = _cases(which, tiny_checkpoint, exported, projected)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9, top_k=30, seed=1),
              SamplingParams(temperature=0.3, top_p=1.0, top_k=4096, seed=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=2.0, top_p=0.5, top_k=2, seed=(1 << 64) - 1)]
    hidden, main, draw0 = _frame_inputs(checkpoint, len(params), seed=11)
    sampling = BatchSampling.of(params)
    want = _torch_codes(checkpoint, hidden, main, sampling, draw0)
    got = OrtFastAR(path).sample_codes(hidden, main, sampling, draw0)
    assert torch.equal(got, want)
    assert len({tuple(r) for r in got[:, 1:].tolist()}) == len(params)  # the rows really were sampled apart


def test_fast_ar_metadata(exported, tiny_checkpoint):
    cfg, _ = load_config(tiny_checkpoint)
    fast = OrtFastAR(exported["fast_ar"].path)
    assert (fast.num_codebooks, fast.codebook_size, fast.slow_dim) == (cfg.num_codebooks, cfg.codebook_size,
                                                                       cfg.slow.dim)
    assert onnx_export.read_metadata(exported["fast_ar"].path)["semantic_begin_id"] == str(cfg.semantic_begin_id)


def test_fast_ar_rejects_bad_input(exported, tiny_checkpoint):
    fast = OrtFastAR(exported["fast_ar"].path)
    hidden, main, draw0 = _frame_inputs(tiny_checkpoint, 2, seed=0)
    sampling = BatchSampling.of([SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match=r"hidden: expected \[batch, 64\], got \[2, 63\]"):
        fast.sample_codes(hidden[:, :63], main, sampling, draw0)
    with pytest.raises(ValueError, match=r"main: expected shape \[2\]"):
        fast.sample_codes(hidden, main[:1], sampling, draw0)
    bad = BatchSampling(sampling.temperature, sampling.top_p, sampling.top_k[:1], sampling.key)
    with pytest.raises(ValueError, match=r"sampling.top_k: expected shape \[2\]"):
        fast.sample_codes(hidden, main, bad, draw0)


def test_load_fast_ar_is_strict(tiny_checkpoint, tmp_path):
    ck = write_tiny_checkpoint(tmp_path / "ck", seed=1)
    weights = load_file(str(ck / "model.safetensors"))
    del weights["audio_decoder.norm.weight"]
    save_file(weights, str(ck / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors: \['fast.norm.weight'\]"):
        onnx_export.load_fast_ar(ck)


@pytest.mark.parametrize("B, F", [(1, 1), (2, 25), (3, 50)])
def test_decoder_audio_within_1e4(B, F, exported, codec):
    q = codec.config.quantizer
    g = torch.Generator().manual_seed(B * 100 + F)
    codes = torch.cat([torch.randint(0, q.semantic_codebook_size, (B, 1, F), generator=g),
                       torch.randint(0, 4096, (B, q.n_codebooks, F), generator=g)], dim=1)  # residuals beyond 1023
    codes[0, 0, 0] = -3                                                                       # clamped to 0
    with torch.no_grad():
        want = codec.decode(codes)[:, 0].numpy()
    got = OrtCodecDecoder(exported["codec_decoder"].path).decode(codes.numpy())
    assert got.dtype == np.float32 and got.shape == (B, F * codec.config.frame_length)
    assert np.abs(got - want).max() <= 1e-4


def test_decoder_metadata(exported, tiny_checkpoint, codec):
    dec = OrtCodecDecoder(exported["codec_decoder"].path, threads=1)
    cfg = CodecConfig.for_checkpoint(tiny_checkpoint)
    assert (dec.frame_length, dec.sample_rate, dec.n_codebooks) == (cfg.frame_length, cfg.sample_rate, cfg.n_codebooks)
    assert dec.max_frames == codec.quantizer.post_module.rope.shape[0] > 0


def test_decoder_rejects_bad_input(exported):
    dec = OrtCodecDecoder(exported["codec_decoder"].path)
    ok = np.zeros((1, 10, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="codes: expected an integer array, got float32"):
        dec.decode(ok.astype(np.float32))
    with pytest.raises(ValueError, match=r"codes: expected a non-empty \[batch, 10, frames\] array, got shape \[1, 9, 2\]"):
        dec.decode(ok[:, :9])
    with pytest.raises(ValueError, match=r"got shape \[1, 10, 0\]"):
        dec.decode(ok[:, :, :0])
    dec.max_frames = 1
    with pytest.raises(ValueError, match="codes: at most 1 frames per call, got 2"):
        dec.decode(ok)
    assert OrtCodecDecoder(exported["codec_decoder"].path).decode(ok.astype(np.int32)).shape == (1, 4096)


@pytest.mark.parametrize("B, N", [(1, 1), (2, 3 * 2048 + 100)])
def test_encoder_codes_identical(B, N, exported, codec):
    audio = 0.3 * torch.randn(B, N, generator=torch.Generator().manual_seed(N))
    with torch.no_grad():
        want = codec.encode(audio).numpy()
    got = OrtCodecEncoder(exported["codec_encoder"].path).encode(audio.numpy())
    assert got.dtype == np.int64 and got.shape == (B, 10, -(-N // codec.config.frame_length))
    assert np.array_equal(got, want)


def test_encoder_rejects_bad_input(exported):
    enc = OrtCodecEncoder(exported["codec_encoder"].path)
    with pytest.raises(ValueError, match="audio: expected a float array, got int16"):
        enc.encode(np.zeros((1, 100), dtype=np.int16))
    with pytest.raises(ValueError, match=r"audio: expected a non-empty \[batch, samples\] array, got shape \[100\]"):
        enc.encode(np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="audio: contains NaN or infinite samples"):
        enc.encode(np.array([[0.0, np.nan]], dtype=np.float32))
    assert enc.max_samples > 0 and enc.max_samples % enc.frame_length == 0
    with pytest.raises(ValueError, match=f"audio: at most {enc.max_samples} samples"):
        enc.encode(np.zeros((1, enc.max_samples + 1), dtype=np.float32))


def test_runtimes_check_the_file(exported, tmp_path):
    with pytest.raises(ValueError, match="not a codec_decoder export"):
        OrtCodecDecoder(exported["fast_ar"].path)
    with pytest.raises(ValueError, match="not a fast_ar export"):
        OrtFastAR(exported["codec_encoder"].path)
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        OrtCodecEncoder(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="threads: must be an integer >= 1"):
        OrtCodecDecoder(exported["codec_decoder"].path, threads=0)


def test_export_metadata_is_json_serializable(exported):
    for done in exported.values():
        assert done.metadata == onnx_export.read_metadata(done.path)
        json.dumps(done.metadata)
        assert done.metadata["producer"].startswith("fish_s2 ")


def test_engine_with_the_onnx_fast_ar_matches_torch(tiny, exported):
    """The engine can run its fast AR in ONNX Runtime (the CPU serving option) with identical frames."""
    from fish_s2.engine import Engine, EngineConfig
    from fish_s2.request import EngineRequest, chunks_to_codes, collect
    from fish_s2.prompt import PromptBuilder

    b = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    prompts = [torch.cat([b.system(), b.user(t), b.assistant_start()], dim=1) for t in ("One two.", "Three four five.")]
    results = []
    for fast_ar in (None, OrtFastAR(exported["fast_ar"].path)):
        engine = Engine(tiny.model, EngineConfig(max_active=4, max_prompt_tokens=128, max_frames=16), fast_ar=fast_ar)
        handles = [engine.submit(EngineRequest(p, SamplingParams(temperature=0.9, seed=i), max_frames=16))
                   for i, p in enumerate(prompts)]
        while engine.rows or engine.stats()["queued"]:
            engine.step()
        results.append([chunks_to_codes(collect(h)[0]) for h in handles])
    for torch_codes, ort_codes in zip(*results):
        assert np.array_equal(torch_codes, ort_codes)
