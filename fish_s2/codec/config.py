"""The codec's configuration: upstream's DAC arguments as frozen dataclasses, read from and written to
upstream's hydra YAML as data (``_target_`` / ``_partial_`` are never imported or instantiated)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CodecTransformerConfig:
    """One upstream WindowLimitedTransformer (ModelArgs + wrapper arguments)."""

    n_layer: int
    n_head: int
    dim: int
    intermediate_size: int
    head_dim: int = 64
    input_dim: int = 512  # channels seen from outside; input/output Linear projections iff != dim
    window_size: int | None = None  # None = plain causal (upstream make_mask)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    block_size: int = 2048  # initial RoPE table length; grown on demand in eager mode
    channels_first: bool = True


@dataclass(frozen=True)
class TransformerDefaults:
    """The `_partial_` ModelArgs that the encoder-block transformers are built from."""

    head_dim: int = 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    block_size: int = 8192
    channels_first: bool = True


def _s2_quantizer_transformer() -> CodecTransformerConfig:
    return CodecTransformerConfig(n_layer=8, n_head=16, dim=1024, intermediate_size=3072, head_dim=64, input_dim=1024,
                             window_size=128)


@dataclass(frozen=True)
class QuantizerConfig:
    """Upstream DownsampleResidualVectorQuantize: 1 semantic VQ + `n_codebooks` residual VQs."""

    input_dim: int = 1024
    n_codebooks: int = 9
    codebook_size: int = 1024
    codebook_dim: int = 8
    semantic_codebook_size: int = 4096
    downsample_factor: tuple[int, ...] = (2, 2)
    downsample_dims: tuple[int, ...] | None = None
    pre_module: CodecTransformerConfig | None = field(default_factory=_s2_quantizer_transformer)
    post_module: CodecTransformerConfig | None = field(default_factory=_s2_quantizer_transformer)

    @property
    def dims(self) -> tuple[int, ...]:
        """Channel count before and after each downsample stage."""
        return (self.input_dim,) + tuple(self.downsample_dims or [self.input_dim] * len(self.downsample_factor))


@dataclass(frozen=True)
class CodecConfig:
    """Upstream DAC arguments. Defaults = S2-Pro (`fish_speech/configs/modded_dac_vq.yaml`)."""

    sample_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: int = 1024  # upstream default: encoder_dim * 2**len(encoder_rates)
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    encoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 4)
    transformer_defaults: TransformerDefaults = field(default_factory=TransformerDefaults)
    # upstream EncoderBlock reads window_size off a functools.partial, which has none -> always 512
    encoder_window_size: int = 512
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    # decoder_transformer_layers is dead upstream (DecoderBlock builds the transformer but never keeps it)

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    @property
    def frame_length(self) -> int:
        """Audio samples per code frame (2048 for S2-Pro)."""
        return self.hop_length * math.prod(self.quantizer.downsample_factor)

    @property
    def n_codebooks(self) -> int:
        return 1 + self.quantizer.n_codebooks

    def encoder_transformer(self, dim: int, n_layer: int) -> CodecTransformerConfig:
        """Upstream EncoderBlock quirk: n_head = dim // 64, FFN 3*dim, window 512."""
        d = self.transformer_defaults
        return CodecTransformerConfig(n_layer=n_layer, n_head=dim // 64, dim=dim, intermediate_size=3 * dim,
                                 head_dim=d.head_dim, input_dim=dim, window_size=self.encoder_window_size,
                                 rope_base=d.rope_base, norm_eps=d.norm_eps, block_size=d.block_size,
                                 channels_first=d.channels_first)

    @classmethod
    def s2_pro(cls) -> CodecConfig:
        return cls()

    @classmethod
    def tiny(cls) -> CodecConfig:
        """Same structure and rates as S2-Pro with tiny widths; equals the golden `codec_config.yaml`."""
        tf = CodecTransformerConfig(n_layer=1, n_head=4, dim=64, intermediate_size=192, head_dim=16, input_dim=64,
                               window_size=16)
        return cls(encoder_dim=4, latent_dim=64, decoder_dim=64, encoder_transformer_layers=(0, 0, 0, 1),
                   transformer_defaults=TransformerDefaults(head_dim=16),
                   quantizer=QuantizerConfig(input_dim=64, pre_module=tf, post_module=tf))

    @classmethod
    def for_checkpoint(cls, checkpoint_dir: str | os.PathLike) -> CodecConfig:
        """The real S2-Pro ships no codec config (upstream hard-codes its yaml); test checkpoints do."""
        path = Path(checkpoint_dir) / "codec_config.yaml"
        return cls.from_yaml(path) if path.exists() else cls.s2_pro()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> CodecConfig:
        """Parse upstream's hydra yaml as data (`_target_`/`_partial_` are never imported or instantiated)."""
        with open(path) as f:
            y = yaml.safe_load(f)
        if y.get("causal", True) is not True:
            raise NotImplementedError("only the causal codec is supported")
        if y.get("overwrite_decoder") is not None:
            raise NotImplementedError("overwrite_decoder is not supported")
        gen = y.get("transformer_general_config") or {}
        defaults = TransformerDefaults(
            head_dim=int(gen.get("head_dim", 64)), rope_base=float(gen.get("rope_base", 10000)),
            norm_eps=float(gen.get("norm_eps", 1e-5)), block_size=int(gen.get("block_size", 2048)),
            channels_first=bool(gen.get("channels_first", True)))
        enc_dim, enc_rates = int(y.get("encoder_dim", 64)), tuple(int(r) for r in y.get("encoder_rates", [2, 4, 8, 8]))
        enc_layers = tuple(int(n) for n in y.get("encoder_transformer_layers", [0] * len(enc_rates)))
        for i, n in enumerate(enc_layers):  # upstream attention splits q/k/v equally: no GQA
            if n:
                _check_heads(gen, enc_dim * 2 ** (i + 1) // 64)
        q = y.get("quantizer") or {}
        latent = y.get("latent_dim")
        latent = int(latent) if latent is not None else enc_dim * 2 ** len(enc_rates)
        ds = q.get("downsample_dims")
        quant = QuantizerConfig(
            input_dim=int(q.get("input_dim", 1024)), n_codebooks=int(q.get("n_codebooks", 9)),
            codebook_size=int(q.get("codebook_size", 1024)), codebook_dim=int(q.get("codebook_dim", 8)),
            semantic_codebook_size=int(q.get("semantic_codebook_size", 4096)),
            downsample_factor=tuple(int(f) for f in q.get("downsample_factor", [2, 2])),
            downsample_dims=tuple(int(d) for d in ds) if ds is not None else None,
            pre_module=_transformer_from_yaml(q.get("pre_module")),
            post_module=_transformer_from_yaml(q.get("post_module")))
        if isinstance(q.get("codebook_dim"), list):
            raise NotImplementedError("per-codebook codebook_dim lists are not supported")
        return cls(sample_rate=int(y.get("sample_rate", 44100)), encoder_dim=enc_dim, encoder_rates=enc_rates,
                   latent_dim=latent, decoder_dim=int(y.get("decoder_dim", 1536)),
                   decoder_rates=tuple(int(r) for r in y.get("decoder_rates", [8, 8, 4, 2])),
                   encoder_transformer_layers=enc_layers, transformer_defaults=defaults, quantizer=quant)

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write upstream's hydra layout (what `from_yaml` and upstream's `instantiate` both read)."""
        if self.encoder_window_size != 512:
            raise ValueError("upstream yaml cannot express an encoder window other than 512")
        d, q = self.transformer_defaults, self.quantizer
        quant: dict[str, Any] = {
            "_target_": "fish_speech.models.dac.rvq.DownsampleResidualVectorQuantize", "input_dim": q.input_dim,
            "n_codebooks": q.n_codebooks, "codebook_size": q.codebook_size, "codebook_dim": q.codebook_dim,
            "downsample_factor": list(q.downsample_factor), "semantic_codebook_size": q.semantic_codebook_size,
            "pre_module": _transformer_to_yaml(q.pre_module), "post_module": _transformer_to_yaml(q.post_module)}
        if q.downsample_dims is not None:
            quant["downsample_dims"] = list(q.downsample_dims)
        y = {"_target_": "fish_speech.models.dac.modded_dac.DAC", "sample_rate": self.sample_rate,
             "encoder_dim": self.encoder_dim, "encoder_rates": list(self.encoder_rates), "latent_dim": self.latent_dim,
             "decoder_dim": self.decoder_dim, "decoder_rates": list(self.decoder_rates),
             "encoder_transformer_layers": list(self.encoder_transformer_layers),
             "decoder_transformer_layers": [0] * len(self.decoder_rates),
             "transformer_general_config": {
                 "_target_": "fish_speech.models.dac.modded_dac.ModelArgs", "_partial_": True,
                 "block_size": d.block_size, "n_local_heads": -1, "head_dim": d.head_dim, "rope_base": d.rope_base,
                 "norm_eps": d.norm_eps, "channels_first": d.channels_first},
             "quantizer": quant}
        with open(path, "w") as f:
            yaml.safe_dump(y, f, sort_keys=False)


def _transformer_to_yaml(c: CodecTransformerConfig | None) -> dict | None:
    if c is None:
        return None
    return {"_target_": "fish_speech.models.dac.modded_dac.WindowLimitedTransformer", "causal": True,
            "window_size": c.window_size, "input_dim": c.input_dim,
            "config": {"_target_": "fish_speech.models.dac.modded_dac.ModelArgs", "block_size": c.block_size,
                       "n_layer": c.n_layer, "n_head": c.n_head, "dim": c.dim,
                       "intermediate_size": c.intermediate_size, "n_local_heads": -1, "head_dim": c.head_dim,
                       "rope_base": c.rope_base, "norm_eps": c.norm_eps, "channels_first": c.channels_first}}


def _check_heads(args: dict, n_head: int) -> None:
    n_local = int(args.get("n_local_heads", -1))
    if n_local not in (-1, n_head):
        raise ValueError(f"codec attention needs n_local_heads == n_head (got {n_local} vs {n_head})")
    if args.get("pos_embed_type", "rope") != "rope":
        raise NotImplementedError("only RoPE codec transformers are supported")


def _transformer_from_yaml(m: dict | None) -> CodecTransformerConfig | None:
    """WindowLimitedTransformer node -> config; upstream ModelArgs / wrapper defaults fill the gaps."""
    if m is None:
        return None
    if m.get("causal", True) is not True:
        raise NotImplementedError("only causal codec transformers are supported")
    c = m.get("config") or {}
    dim, n_head = int(c.get("dim", 512)), int(c.get("n_head", 8))
    _check_heads(c, n_head)
    inter = c.get("intermediate_size", 1536)
    if inter is None:  # upstream ModelArgs.__post_init__
        inter = -(-int(2 * 4 * dim / 3) // 256) * 256
    w = m.get("window_size")
    return CodecTransformerConfig(
        n_layer=int(c.get("n_layer", 8)), n_head=n_head, dim=dim, intermediate_size=int(inter),
        head_dim=int(c.get("head_dim", 64)), input_dim=int(m.get("input_dim", 512)),
        window_size=int(w) if w is not None else None, rope_base=float(c.get("rope_base", 10000)),
        norm_eps=float(c.get("norm_eps", 1e-5)), block_size=int(c.get("block_size", 2048)),
        channels_first=bool(c.get("channels_first", True)))
