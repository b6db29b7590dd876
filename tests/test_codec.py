"""Codec tests: golden parity with upstream fish-speech, checkpoint format, config parsing, ONNX export."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch

from fish_s2.codec import (Codec, CodecConfig, CodecTransformerConfig, QuantizerConfig, WindowLimitedTransformer,
                           bake_weight_norm)
from fish_s2.tiny import random_codec_state_dict

GOLDEN = Path(os.environ.get("FISH_S2_GOLDEN", "/work/shared/golden/public"))

# upstream fish_speech/configs/modded_dac_vq.yaml (commit 3dd1f85), as data
S2_YAML = """
_target_: fish_speech.models.dac.modded_dac.DAC
sample_rate: 44100
encoder_dim: 64
encoder_rates: [2, 4, 8, 8]
decoder_dim: 1536
decoder_rates: [8, 8, 4, 2]
encoder_transformer_layers: [0, 0, 0, 4]
decoder_transformer_layers: [4, 0, 0, 0]
transformer_general_config:
  _target_: fish_speech.models.dac.modded_dac.ModelArgs
  _partial_: true
  block_size: 8192
  n_local_heads: -1
  head_dim: 64
  rope_base: 10000
  norm_eps: 1e-5
  dropout_rate: 0.1
  attn_dropout_rate: 0.1
  channels_first: true
quantizer:
  _target_: fish_speech.models.dac.rvq.DownsampleResidualVectorQuantize
  input_dim: 1024
  n_codebooks: 9
  codebook_size: 1024
  codebook_dim: 8
  quantizer_dropout: 0.5
  downsample_factor: [2, 2]
  post_module: &transformer_module
    _target_: fish_speech.models.dac.modded_dac.WindowLimitedTransformer
    causal: true
    window_size: 128
    input_dim: 1024
    config: &transformer_config
      _target_: fish_speech.models.dac.modded_dac.ModelArgs
      block_size: 2048
      n_layer: 8
      n_head: 16
      dim: 1024
      intermediate_size: 3072
      n_local_heads: -1
      head_dim: 64
      rope_base: 10000
      norm_eps: 1e-5
      dropout_rate: 0.1
      attn_dropout_rate: 0.1
      channels_first: true
  pre_module: *transformer_module
  semantic_codebook_size: 4096
"""


def _golden(name: str) -> Path:
    path = GOLDEN / name
    if not path.exists():
        pytest.skip(f"golden file {path} missing (set FISH_S2_GOLDEN to a golden set folder)")
    return path


def _load(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(_golden(name))


@pytest.fixture(scope="module")
def golden_codec() -> Codec:
    return Codec.from_checkpoint(_golden("checkpoint"))


@pytest.fixture(scope="module")
def golden_sd() -> dict[str, torch.Tensor]:
    return torch.load(_golden("checkpoint/codec.pth"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_codec() -> Codec:
    return Codec.from_state_dict(random_codec_state_dict(CodecConfig.tiny(), seed=0), CodecConfig.tiny())


# ------------------------------------------------------------------------------------------------ config


def test_s2_preset_matches_upstream_yaml(tmp_path):
    (tmp_path / "codec_config.yaml").write_text(S2_YAML)
    cfg = CodecConfig.from_yaml(tmp_path / "codec_config.yaml")
    assert cfg == CodecConfig.s2_pro()
    assert (cfg.hop_length, cfg.frame_length, cfg.n_codebooks, cfg.sample_rate) == (512, 2048, 10, 44100)
    enc_tf = cfg.encoder_transformer(1024, 4)  # upstream quirks: dim // 64 heads, 3*dim FFN, window 512
    assert (enc_tf.n_head, enc_tf.intermediate_size, enc_tf.window_size, enc_tf.head_dim) == (16, 3072, 512, 64)
    assert CodecConfig.for_checkpoint(tmp_path / "nowhere") == CodecConfig.s2_pro()


def test_tiny_preset_matches_golden_yaml():
    cfg = CodecConfig.for_checkpoint(_golden("checkpoint"))
    assert cfg == CodecConfig.tiny()
    assert cfg.frame_length == 2048 and cfg.n_codebooks == 10
    assert cfg.quantizer.post_module.window_size == 16 and cfg.quantizer.post_module.norm_eps == 1e-5


@pytest.mark.parametrize("cfg", [CodecConfig.s2_pro(), CodecConfig.tiny()])
def test_yaml_round_trip(tmp_path, cfg):
    cfg.to_yaml(tmp_path / "c.yaml")
    assert CodecConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_yaml_rejects_gqa(tmp_path):
    (tmp_path / "c.yaml").write_text(S2_YAML.replace("      n_local_heads: -1", "      n_local_heads: 4"))
    with pytest.raises(ValueError, match="n_local_heads"):
        CodecConfig.from_yaml(tmp_path / "c.yaml")


def test_s2_parameter_counts_on_meta():
    with torch.device("meta"):
        m = Codec(CodecConfig.s2_pro())
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    q = m.quantizer
    vqs = list(q.semantic_quantizer.quantizers) + list(q.quantizer.quantizers)
    decode_path = sum(n(v.codebook) + n(v.out_proj) for v in vqs) + n(q.post_module) + n(q.upsample) + n(m.decoder)
    assert abs(decode_path / 1e6 - 184.4) < 1.0
    assert abs(n(m) / 1e6 - 391.4) < 1.0
    assert abs(n(m.encoder) / 1e6 - 76.9) < 0.2 and abs(n(m.decoder) / 1e6 - 54.1) < 0.2
    assert abs(n(q.pre_module) / 1e6 - 109.1) < 0.1 and n(q.pre_module) == n(q.post_module)


# ----------------------------------------------------------------------------------------- golden parity


def test_golden_decode(golden_codec):
    g = _load("codec_decode.safetensors")
    codes = g["codes"].clone()
    with torch.no_grad():
        audio = golden_codec.decode(codes)
        first12 = golden_codec.decode(g["codes_first12"])
    assert torch.equal(codes, g["codes"]), "decode must not clamp the caller's codes in place"
    assert audio.shape == g["audio"].shape == (1, 1, 24 * 2048)
    torch.testing.assert_close(audio, g["audio"], atol=1e-5, rtol=0)
    torch.testing.assert_close(first12, g["audio_first12"], atol=1e-5, rtol=0)
    torch.testing.assert_close(audio[..., : 12 * 2048], first12, atol=2e-6, rtol=0)  # causal


def test_golden_encode(golden_codec):
    g = _load("codec_encode.safetensors")
    with torch.no_grad():
        out = golden_codec.encode_with_intermediates(g["waveform"][None, None])
        recon = golden_codec.decode(out["codes"])
    assert out["codes"].shape == (1, 10, 33)
    bad = (out["codes"] != g["codes"]).nonzero().tolist()
    assert not bad, f"codes differ at {bad}; margins {[g['vq_top2_margin'][tuple(i)].item() for i in bad]}"
    torch.testing.assert_close(out["encoder_out"], g["encoder_out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pre_module_out"], g["pre_module_out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(recon, g["recon_audio"], atol=1e-5, rtol=0)
    assert torch.equal(golden_codec.encode(g["waveform"][None]), out["codes"])  # [B, N] input is accepted


# -------------------------------------------------------------------------------------------- behaviour


def test_decode_clamps_without_mutating(tiny_codec):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 4096, (2, 10, 6), generator=gen)  # residual rows go up to 4095
    codes[0, 0, 0] = 5000
    before = codes.clone()
    clamped = codes.clone()
    clamped[:, 0].clamp_(max=4095)
    clamped[:, 1:].clamp_(max=1023)
    assert (codes[:, 1:] > 1023).any()
    with torch.no_grad():
        a, b = tiny_codec.decode(codes), tiny_codec.decode(clamped)
    assert torch.equal(codes, before)
    assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 5, 17])
def test_decode_length_and_batch(tiny_codec, T):
    codes = torch.randint(0, 1024, (2, 10, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        audio = tiny_codec.decode(codes)
        single = tiny_codec.decode(codes[1:])
    assert audio.shape == (2, 1, T * tiny_codec.frame_length)
    torch.testing.assert_close(audio[1:], single, atol=1e-6, rtol=0)


def test_encode_length(tiny_codec):
    with torch.no_grad():
        out = tiny_codec.encode_with_intermediates(0.1 * torch.randn(2, 1, 2048 * 3 + 5))
    assert out["codes"].shape == (2, 10, 4) and out["codes"].dtype == torch.long
    assert out["encoder_out"].shape == (2, 64, 16) and out["pre_module_out"].shape == (2, 64, 4)
    assert int(out["codes"][:, 0].max()) < 4096 and int(out["codes"][:, 1:].max()) < 1024


def test_rope_table_grows_beyond_block_size():
    cfg = CodecTransformerConfig(n_layer=1, n_head=2, dim=32, intermediate_size=64, head_dim=16, input_dim=24,
                            window_size=5, block_size=8)
    torch.manual_seed(0)
    small = WindowLimitedTransformer(cfg)
    big = copy.deepcopy(small)
    big.rope = WindowLimitedTransformer(CodecTransformerConfig(**{**cfg.__dict__, "block_size": 64})).rope
    x = torch.randn(2, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(small(x), big(x), atol=0, rtol=0)
    assert small.rope.shape[0] >= 20


def test_variant_config_runs():
    """Other golden sets may use other layouts: projections, no window, downsample dims, no pre_module."""
    tf = CodecTransformerConfig(n_layer=2, n_head=2, dim=48, intermediate_size=96, head_dim=8, input_dim=32,
                           window_size=None, block_size=16)
    cfg = CodecConfig(encoder_dim=8, latent_dim=32, decoder_dim=32, encoder_transformer_layers=(0, 0, 1, 0),
                      encoder_rates=(2, 4, 8, 8),
                      quantizer=QuantizerConfig(input_dim=32, n_codebooks=3, codebook_size=64, codebook_dim=4,
                                                semantic_codebook_size=128, downsample_dims=(40, 32),
                                                pre_module=None, post_module=tf))
    codec = Codec.from_state_dict(random_codec_state_dict(cfg, seed=3), cfg)
    codes = torch.randint(0, 64, (1, 4, 20))
    with torch.no_grad():
        audio = codec.decode(codes)
        prefix = codec.decode(codes[..., :7])
        enc = codec.encode(audio)
    assert audio.shape == (1, 1, 20 * 2048) and enc.shape == (1, 4, 20)
    torch.testing.assert_close(audio[..., : 7 * 2048], prefix, atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decode_runs(dtype):
    sd = random_codec_state_dict(CodecConfig.tiny(), seed=0)
    ref = Codec.from_state_dict(sd, CodecConfig.tiny())
    low = Codec.from_state_dict(sd, CodecConfig.tiny(), dtype=dtype)
    codes = torch.randint(0, 1024, (1, 10, 4))
    with torch.no_grad():
        a, b = ref.decode(codes), low.decode(codes)
    assert b.dtype == dtype and b.shape == a.shape and torch.isfinite(b).all()
    assert (a - b.float()).abs().max() < 0.2


# --------------------------------------------------------------------------------------- checkpoint format


def _restyle(sd: dict[str, torch.Tensor], legacy: bool) -> dict[str, torch.Tensor]:
    """All weight-norm pairs rewritten in one key style."""
    names = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    if not legacy:
        names = {v: k for k, v in names.items()}
    out = {}
    for k, v in sd.items():
        for a, b in names.items():
            if k.endswith("." + a):
                k = k[: -len(a)] + b
        out[k] = v
    return out


@pytest.mark.parametrize("legacy", [False, True])
def test_weight_norm_styles_bake_identically(golden_sd, golden_codec, legacy):
    sd = _restyle(golden_sd, legacy)
    assert sum(k.endswith("weight_g") for k in sd) == (80 if legacy else 0)
    codec = Codec.from_state_dict(sd, CodecConfig.tiny())
    assert not any("weight_g" in k or "parametrizations" in k for k in codec.state_dict())
    for (k, a), b in zip(codec.state_dict().items(), golden_codec.state_dict().values()):
        assert torch.equal(a, b), k


def test_bake_formula_includes_conv_transpose(golden_sd):
    baked, origin, errors = bake_weight_norm(golden_sd)
    assert not errors
    key = "decoder.model.1.block.1.conv"  # ConvTranspose1d: dim 0 is in_channels
    g, v = golden_sd[key + ".parametrizations.weight.original0"], golden_sd[key + ".parametrizations.weight.original1"]
    torch.testing.assert_close(baked[key + ".weight"], g * v / v.norm(dim=(1, 2), keepdim=True))
    assert origin[key + ".weight"] == [key + ".parametrizations.weight.original0",
                                       key + ".parametrizations.weight.original1"]


def test_wrapper_and_generator_prefix(golden_sd, golden_codec):
    wrapped = {"state_dict": {**{"generator." + k: v for k, v in golden_sd.items()},
                              "discriminator.foo.weight": torch.zeros(3)}}
    codec = Codec.from_state_dict(wrapped, CodecConfig.tiny())
    assert all(torch.equal(a, b) for a, b in zip(codec.state_dict().values(), golden_codec.state_dict().values()))


def _load_error(sd: dict[str, torch.Tensor]) -> str:
    with pytest.raises(ValueError) as e:
        Codec.from_state_dict(sd, CodecConfig.tiny())
    return str(e.value)


def test_strict_missing(golden_sd):
    sd = dict(golden_sd)
    del sd["quantizer.post_module.layers.0.ffn_layer_scale.gamma"]
    del sd["decoder.model.6.conv.parametrizations.weight.original0"]
    del sd["quantizer.quantizer.quantizers.4.out_proj.weight_g"]
    del sd["quantizer.quantizer.quantizers.4.out_proj.weight_v"]
    msg = _load_error(sd)
    assert "missing quantizer.post_module.layers.0.ffn_layer_scale.gamma" in msg
    assert "missing decoder.model.6.conv.parametrizations.weight.original0" in msg
    assert "missing quantizer.quantizer.quantizers.4.out_proj.weight (64, 8, 1)" in msg


def test_strict_unexpected(golden_sd):
    sd = {**golden_sd, "quantizer.post_module.layers.1.attention.wo.weight": torch.zeros(64, 64),
          "decoder.model.1.block.5.conv.weight_g": torch.ones(4, 1, 1),
          "decoder.model.1.block.5.conv.weight_v": torch.ones(4, 4, 7)}
    msg = _load_error(sd)
    assert "unexpected quantizer.post_module.layers.1.attention.wo.weight" in msg
    assert "decoder.model.1.block.5.conv.weight_g" in msg


def test_strict_misshaped(golden_sd):
    sd = {**golden_sd, "quantizer.upsample.0.1.gamma": torch.ones(65),
          "encoder.block.6.conv.parametrizations.weight.original0": torch.ones(64, 1)}
    msg = _load_error(sd)
    assert "quantizer.upsample.0.1.gamma: checkpoint (65,), model (64,)" in msg
    assert "encoder.block.6.conv.parametrizations.weight.original0 (64, 1)" in msg


def test_random_state_dict_format_and_round_trip(tmp_path, golden_codec):
    cfg = CodecConfig.tiny()
    sd = random_codec_state_dict(cfg, seed=7)
    golden = torch.load(_golden("checkpoint/codec.pth"), map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in golden.items()}
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), random_codec_state_dict(cfg, seed=7).values()))
    assert not torch.equal(sd["quantizer.post_module.norm.weight"],
                           random_codec_state_dict(cfg, seed=8)["quantizer.post_module.norm.weight"])
    torch.save(sd, tmp_path / "codec.pth")
    cfg.to_yaml(tmp_path / "codec_config.yaml")
    codec = Codec.from_checkpoint(tmp_path)
    with torch.no_grad():
        audio = codec.decode(torch.randint(0, 1024, (1, 10, 8), generator=torch.Generator().manual_seed(0)))
    assert 0.1 < audio.std() < 0.35 and audio.abs().max() < 1


# ------------------------------------------------------------------------------------------------- ONNX


class _Decode(torch.nn.Module):
    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(codes)


def test_onnx_export_decode(tmp_path, tiny_codec):
    """Traced export (dynamo=False), dynamic batch and frames straddling the window (16); a few seconds on CPU."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "decode.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Decode(tiny_codec), (torch.randint(0, 1024, (1, 10, 3)),), str(path), dynamo=False,
                          input_names=["codes"], output_names=["audio"], opset_version=17,
                          dynamic_axes={"codes": {0: "batch", 2: "frames"}, "audio": {0: "batch", 2: "samples"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B, T in [(2, 21), (1, 5)]:
        codes = torch.randint(0, 4096, (B, 10, T), generator=torch.Generator().manual_seed(B * T))
        with torch.no_grad():
            ref = tiny_codec.decode(codes)
        out = torch.from_numpy(sess.run(None, {"codes": codes.numpy()})[0])
        assert out.shape == (B, 1, T * 2048)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
