"""Fish S2-Pro codec ("modded DAC") in plain PyTorch: codes [B, 10, T] <-> 44.1 kHz audio [B, 1, T*2048].

Numerically faithful to upstream fish-speech (`fish_speech/models/dac/{modded_dac,rvq}.py` on top of
descript-audio-codec 1.0.0): every op on both paths is causal, convs are left-padded, transposed convs are
trimmed on the right, and the quantizer transformers use a causal sliding window. Module and parameter names
mirror upstream so that `codec.pth` loads after weight norm is baked into plain `weight` tensors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from .layers import Attention, FeedForward, RMSNorm, rope_table

# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TransformerConfig:
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


def _s2_quantizer_transformer() -> TransformerConfig:
    return TransformerConfig(n_layer=8, n_head=16, dim=1024, intermediate_size=3072, head_dim=64, input_dim=1024,
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
    pre_module: TransformerConfig | None = field(default_factory=_s2_quantizer_transformer)
    post_module: TransformerConfig | None = field(default_factory=_s2_quantizer_transformer)

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

    def encoder_transformer(self, dim: int, n_layer: int) -> TransformerConfig:
        """Upstream EncoderBlock quirk: n_head = dim // 64, FFN 3*dim, window 512."""
        d = self.transformer_defaults
        return TransformerConfig(n_layer=n_layer, n_head=dim // 64, dim=dim, intermediate_size=3 * dim,
                                 head_dim=d.head_dim, input_dim=dim, window_size=self.encoder_window_size,
                                 rope_base=d.rope_base, norm_eps=d.norm_eps, block_size=d.block_size,
                                 channels_first=d.channels_first)

    @classmethod
    def s2_pro(cls) -> CodecConfig:
        return cls()

    @classmethod
    def tiny(cls) -> CodecConfig:
        """Same structure and rates as S2-Pro with tiny widths; equals the golden `codec_config.yaml`."""
        tf = TransformerConfig(n_layer=1, n_head=4, dim=64, intermediate_size=192, head_dim=16, input_dim=64,
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


def _transformer_to_yaml(c: TransformerConfig | None) -> dict | None:
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


def _transformer_from_yaml(m: dict | None) -> TransformerConfig | None:
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
    return TransformerConfig(
        n_layer=int(c.get("n_layer", 8)), n_head=n_head, dim=dim, intermediate_size=int(inter),
        head_dim=int(c.get("head_dim", 64)), input_dim=int(m.get("input_dim", 512)),
        window_size=int(w) if w is not None else None, rope_base=float(c.get("rope_base", 10000)),
        norm_eps=float(c.get("norm_eps", 1e-5)), block_size=int(c.get("block_size", 2048)),
        channels_first=bool(c.get("channels_first", True)))


# ------------------------------------------------------------------------------------------- conv layers


class Snake(nn.Module):
    """x + sin^2(alpha x) / (alpha + 1e-9), per channel (same op order as dac's scripted snake)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class CausalConv(nn.Module):
    """Conv1d left-padded by (effective kernel - stride); strided convs get upstream's extra right pad."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel_size, stride=stride, dilation=dilation, groups=groups)
        self.stride, self.kernel = stride, (kernel_size - 1) * dilation + 1
        self.pad = self.kernel - stride

    def forward(self, x: Tensor) -> Tensor:
        # encode path only (strided convs): pad the tail up to a whole number of strides; upstream's
        # ceil formula reduces to (-n) % stride since pad = kernel - stride, and this form traces to ONNX
        extra = (-x.shape[-1]) % self.stride if self.stride > 1 else 0
        return self.conv(F.pad(x, (self.pad, extra)))


class CausalConvTranspose(nn.Module):
    """ConvTranspose1d with the (kernel - stride) overhanging samples trimmed on the right."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, kernel_size, stride=stride)
        self.trim = kernel_size - stride

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y[..., : -self.trim] if self.trim else y  # static slice: ONNX-friendly with a dynamic length


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(Snake(dim), CausalConv(dim, dim, 7, dilation=dilation), Snake(dim),
                                   CausalConv(dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ConvNeXtBlock(nn.Module):
    """Causal depthwise k7 conv -> LayerNorm(1e-6) -> Linear x4 -> exact GELU -> Linear -> gamma, residual."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dwconv = CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, int(mlp_ratio * dim))
        self.pwconv2 = nn.Linear(int(mlp_ratio * dim), dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(self.dwconv(x).transpose(1, 2)))))
        return x + (self.gamma * y).transpose(1, 2)


# ------------------------------------------------------------------------------------------- transformer


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-2))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class CodecTransformerBlock(nn.Module):
    """Pre-norm block with LayerScale on both residual branches."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.attention = Attention(c.dim, c.n_head, c.n_head, c.head_dim)
        self.feed_forward = FeedForward(c.dim, c.intermediate_size)
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attention_layer_scale = LayerScale(c.dim)
        self.ffn_layer_scale = LayerScale(c.dim)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention_layer_scale(self.attention(self.attention_norm(x), rope, mask))
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h)))


class WindowLimitedTransformer(nn.Module):
    """Causal transformer where frame t attends to frames t-window+1..t; positions restart at 0 per call."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.config = c
        self.layers = nn.ModuleList(CodecTransformerBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.input_proj = nn.Linear(c.input_dim, c.dim) if c.input_dim != c.dim else nn.Identity()
        self.output_proj = nn.Linear(c.dim, c.input_dim) if c.input_dim != c.dim else nn.Identity()
        with torch.device("cpu"):  # not in the checkpoint: real values even when the module is built on meta
            self.register_buffer("rope", rope_table(c.block_size, c.head_dim, c.rope_base), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if c.channels_first:
            x = x.transpose(1, 2)
        x = self.input_proj(x)
        T = x.shape[1]
        if T > self.rope.shape[0]:  # eager only; an exported graph keeps the table it was traced with
            self.rope = rope_table(2 ** math.ceil(math.log2(T)), c.head_dim, c.rope_base).to(self.rope.device)
        pos = torch.arange(T, device=x.device)
        mask = pos[None, :] <= pos[:, None]
        if c.window_size is not None:
            mask = mask & (pos[None, :] > pos[:, None] - c.window_size)
        rope, mask = self.rope[:T][None], mask[None, None]
        for layer in self.layers:
            x = layer(x, rope, mask)
        x = self.output_proj(self.norm(x))
        return x.transpose(1, 2) if c.channels_first else x


# --------------------------------------------------------------------------------------------- quantizer


class VectorQuantize(nn.Module):
    """DAC factorized VQ: project to codebook_dim, cosine-similarity lookup, project back."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.in_proj = nn.Conv1d(dim, codebook_dim, 1)
        self.out_proj = nn.Conv1d(codebook_dim, dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def decode(self, ids: Tensor) -> Tensor:
        """ids [B, T] -> [B, dim, T] (raw, unnormalized codebook rows)."""
        return self.out_proj(self.codebook(ids).transpose(1, 2))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, dim, T] -> (ids [B, T], quantized [B, dim, T]); same distance formula as dac for equal argmax."""
        z_e = self.in_proj(z)
        B, D, T = z_e.shape
        enc = F.normalize(z_e.transpose(1, 2).reshape(B * T, D))
        cb = F.normalize(self.codebook.weight)
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ cb.t() + cb.pow(2).sum(1, keepdim=True).t()
        ids = (-dist).max(1).indices.view(B, T)
        z_q = self.codebook(ids).transpose(1, 2)
        return ids, self.out_proj(z_e + (z_q - z_e))  # straight-through form, as upstream (not bit-equal to z_q)


class ResidualVectorQuantize(nn.Module):
    def __init__(self, dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.quantizers = nn.ModuleList(VectorQuantize(dim, codebook_size, codebook_dim) for _ in range(n_codebooks))


class DownsampleResidualVectorQuantize(nn.Module):
    """Latent [B, D, 4T] <-> codes [B, 1+n, T]: conv downsample, pre/post transformers, semantic VQ + RVQ."""

    def __init__(self, q: QuantizerConfig):
        super().__init__()
        self.config, dims = q, q.dims
        self.semantic_quantizer = ResidualVectorQuantize(q.input_dim, 1, q.semantic_codebook_size, q.codebook_dim)
        self.quantizer = ResidualVectorQuantize(q.input_dim, q.n_codebooks, q.codebook_size, q.codebook_dim)
        self.downsample = nn.Sequential(*[
            nn.Sequential(CausalConv(dims[i], dims[i + 1], f, stride=f), ConvNeXtBlock(dims[i + 1]))
            for i, f in enumerate(q.downsample_factor)])
        self.upsample = nn.Sequential(*[
            nn.Sequential(CausalConvTranspose(dims[i + 1], dims[i], f, stride=f), ConvNeXtBlock(dims[i]))
            for i, f in reversed(list(enumerate(q.downsample_factor)))])
        self.pre_module = WindowLimitedTransformer(q.pre_module) if q.pre_module else nn.Identity()
        self.post_module = WindowLimitedTransformer(q.post_module) if q.post_module else nn.Identity()

    def decode(self, codes: Tensor) -> Tensor:
        """Clamps out-of-range codes (the LLM can emit residual codes up to 4095) on a copy, never in place."""
        q = self.config
        z = self.semantic_quantizer.quantizers[0].decode(codes[:, 0].clamp(0, q.semantic_codebook_size - 1))
        residual = None
        for i, vq in enumerate(self.quantizer.quantizers):  # summed in upstream's order
            zi = vq.decode(codes[:, i + 1].clamp(0, q.codebook_size - 1))
            residual = zi if residual is None else residual + zi
        z = z + residual if residual is not None else z
        return self.upsample(self.post_module(z))

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, D, 4T] -> (codes [B, 1+n, T], pre_module output [B, D, T])."""
        z = self.pre_module(self.downsample(z))
        ids, z_sem = self.semantic_quantizer.quantizers[0](z)
        codes, residual = [ids], z - z_sem
        for vq in self.quantizer.quantizers:
            ids, z_q = vq(residual)
            codes.append(ids)
            residual = residual - z_q
        return torch.stack(codes, dim=1), z


# ----------------------------------------------------------------------------------- encoder / decoder


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int, transformer: TransformerConfig | None):
        super().__init__()
        self.block = nn.Sequential(
            ResidualUnit(dim // 2, 1), ResidualUnit(dim // 2, 3), ResidualUnit(dim // 2, 9), Snake(dim // 2),
            CausalConv(dim // 2, dim, 2 * stride, stride=stride),
            WindowLimitedTransformer(transformer) if transformer else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        d, blocks = cfg.encoder_dim, [CausalConv(1, cfg.encoder_dim, 7)]
        for stride, n_layer in zip(cfg.encoder_rates, cfg.encoder_transformer_layers):
            d *= 2
            blocks.append(EncoderBlock(d, stride, cfg.encoder_transformer(d, n_layer) if n_layer else None))
        self.block = nn.Sequential(*blocks, Snake(d), CausalConv(d, cfg.latent_dim, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(Snake(cin), CausalConvTranspose(cin, cout, 2 * stride, stride),
                                   ResidualUnit(cout, 1), ResidualUnit(cout, 3), ResidualUnit(cout, 9))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Decoder(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        ch = cfg.decoder_dim
        layers: list[nn.Module] = [CausalConv(cfg.latent_dim, ch, 7)]
        for i, stride in enumerate(cfg.decoder_rates):
            layers.append(DecoderBlock(ch // 2 ** i, ch // 2 ** (i + 1), stride))
        out = ch // 2 ** len(cfg.decoder_rates)
        self.model = nn.Sequential(*layers, Snake(out), CausalConv(out, 1, 7), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


# ------------------------------------------------------------------------------------------------- codec


class Codec(nn.Module):
    """The S2-Pro codec. Parameter names equal upstream's `codec.pth` keys with weight norm baked."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        q = cfg.quantizer
        if not q.input_dim == q.dims[-1] == cfg.latent_dim:  # the VQs see both the encoder and downsample output
            raise ValueError(f"quantizer dims {q.dims} must start and end at latent_dim {cfg.latent_dim}")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = DownsampleResidualVectorQuantize(cfg.quantizer)
        self.decoder = Decoder(cfg)

    @property
    def frame_length(self) -> int:
        return self.config.frame_length

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, n_codebooks, T] int -> audio [B, 1, T * frame_length] (upstream `from_indices`)."""
        return self.decoder(self.quantizer.decode(codes.long()))

    def encode_with_intermediates(self, audio: Tensor) -> dict[str, Tensor]:
        """audio [B, 1, N] (or [B, N]) -> codes [B, n_codebooks, ceil(N / frame_length)], encoder_out
        [B, latent, 4 * frames], pre_module_out [B, latent, frames]; right-pads to whole frames as upstream."""
        if audio.ndim == 2:
            audio = audio[:, None]
        audio = F.pad(audio, (0, -audio.shape[-1] % self.frame_length)).to(self.decoder.model[0].conv.weight.dtype)
        z = self.encoder(audio)
        codes, pre = self.quantizer.encode(z)
        return {"codes": codes, "encoder_out": z, "pre_module_out": pre}

    def encode(self, audio: Tensor) -> Tensor:
        return self.encode_with_intermediates(audio)["codes"]

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], cfg: CodecConfig, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> Codec:
        """Build without random init (meta device), bake weight norm, check keys strictly, then assign."""
        with torch.device("meta"):
            model = cls(cfg)
        sd = _check_state_dict(model, state_dict)
        model.load_state_dict(sd, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> Codec:
        """`codec.pth` (+ `codec_config.yaml` if present, else the S2-Pro preset) from a checkpoint folder."""
        sd = torch.load(Path(checkpoint_dir) / "codec.pth", map_location="cpu", weights_only=True)
        return cls.from_state_dict(sd, CodecConfig.for_checkpoint(checkpoint_dir), device, dtype)


# -------------------------------------------------------------------------------------- checkpoint format

_WN_SUFFIXES = {  # weight-norm key suffix -> (role, partner suffix)
    "parametrizations.weight.original0": ("g", "parametrizations.weight.original1"),
    "parametrizations.weight.original1": ("v", "parametrizations.weight.original0"),
    "weight_g": ("g", "weight_v"),
    "weight_v": ("v", "weight_g"),
}


def unwrap_state_dict(sd: dict[str, Any]) -> dict[str, Tensor]:
    """Accept a {'state_dict': ...} wrapper and a GAN checkpoint's `generator.` prefix (as upstream does)."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if any(k.startswith("generator.") for k in sd):
        sd = {k[len("generator."):]: v for k, v in sd.items() if k.startswith("generator.")}
    return sd


def bake_weight_norm(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list[str]], list[str]]:
    """Replace each g/v pair (either key style) by `weight` = g * v / ||v|| (norm over all dims but 0).

    Returns (baked state dict, baked key -> source keys, errors). torch._weight_norm is the very kernel that
    upstream's parametrization runs each forward, so baking is bit-exact.
    """
    out: dict[str, Tensor] = {}
    origin: dict[str, list[str]] = {}
    pairs: dict[str, dict[str, str]] = {}
    for k, t in sd.items():
        suffix = next((s for s in _WN_SUFFIXES if k.endswith("." + s)), None)
        if suffix is None:
            out[k], origin[k] = t, [k]
        else:
            pairs.setdefault(k[: -len(suffix)] + "weight", {})[_WN_SUFFIXES[suffix][0]] = k
    errors = []
    for base, p in pairs.items():
        origin[base] = sorted(p.values())  # also marks a broken pair as reported
        if len(p) != 2:
            (role, key), = p.items()
            suffix = next(s for s in _WN_SUFFIXES if key.endswith("." + s))
            errors.append(f"missing {key[: -len(suffix)] + _WN_SUFFIXES[suffix][1]} (weight-norm partner of {key})")
            continue
        g, v = sd[p["g"]], sd[p["v"]]
        if base in out:
            errors.append(f"both {base} and its weight-norm pair {p['g']}/{p['v']} are present")
        elif tuple(g.shape) != (v.shape[0],) + (1,) * (v.ndim - 1):
            errors.append(f"mis-shaped weight norm {p['g']} {tuple(g.shape)} for {p['v']} {tuple(v.shape)}")
        else:
            out[base] = torch._weight_norm(v.float(), g.float(), 0)
    return out, origin, errors


def _check_state_dict(model: Codec, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strict coverage: raise ValueError naming every missing, unexpected or mis-shaped tensor."""
    sd, origin, errors = bake_weight_norm(unwrap_state_dict(state_dict))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k in sorted(set(expected) - set(sd) - set(origin)):  # broken g/v pairs were reported by the baker
        wn = " (or its weight-norm g/v pair)" if _upstream_weight_norm_style(k) else ""
        errors.append(f"missing {k} {expected[k]}{wn}")
    for k in sorted(set(sd) - set(expected)):
        errors.append(f"unexpected {'/'.join(origin[k])}")
    for k in sorted(set(sd) & set(expected)):
        if tuple(sd[k].shape) != expected[k]:
            errors.append(f"mis-shaped {'/'.join(origin[k])}: checkpoint {tuple(sd[k].shape)}, model {expected[k]}")
    if errors:
        more = [f"... and {len(errors) - 40} more"] if len(errors) > 40 else []
        raise ValueError(f"codec state dict does not match the config ({len(errors)} problems):\n  "
                         + "\n  ".join(errors[:40] + more))
    return sd


def _upstream_weight_norm_style(key: str) -> str | None:
    """Upstream stores causal convs with parametrizations.weight_norm, dac's VQ projections with the legacy one."""
    if key.startswith(("encoder.", "decoder.")) and key.endswith(".conv.weight"):
        return "parametrizations"
    if key.startswith("quantizer.") and key.endswith(("in_proj.weight", "out_proj.weight")):
        return "legacy"
    return None


def random_codec_state_dict(cfg: CodecConfig, seed: int) -> dict[str, Tensor]:
    """Deterministic random fp32 weights in upstream's `codec.pth` key format (weight norm kept as g/v).

    Init as the golden set: g U(0.4,0.8), v N; snake alpha U(0.5,1.5); codebooks N; gammas U(0.1,0.5); norms
    1+0.1N; other weights N/sqrt(fan_in); biases 0.02N. The last conv's g is then rescaled once so that the
    pre-tanh std is ~0.3 on random codes, i.e. decoded audio has a sane level instead of ~0.02.
    """
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Codec(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    unif = lambda s, lo, hi: torch.rand(*s, generator=gen) * (hi - lo) + lo  # noqa: E731
    sd: dict[str, Tensor] = {}
    for k, s in shapes.items():
        style = _upstream_weight_norm_style(k)
        if style:
            stem = k[: -len("weight")]
            g, v = unif((s[0],) + (1,) * (len(s) - 1), 0.4, 0.8), randn(*s)
            names = ("parametrizations.weight.original0", "parametrizations.weight.original1") \
                if style == "parametrizations" else ("weight_g", "weight_v")
            sd[stem + names[0]], sd[stem + names[1]] = g, v
        elif k.endswith(".alpha"):
            sd[k] = unif(s, 0.5, 1.5)
        elif k.endswith("gamma"):
            sd[k] = unif(s, 0.1, 0.5)
        elif k.endswith("codebook.weight"):
            sd[k] = randn(*s)
        elif k.endswith("norm.weight"):
            sd[k] = 1 + 0.1 * randn(*s)
        elif k.endswith(".bias"):
            sd[k] = 0.02 * randn(*s)
        else:
            sd[k] = randn(*s) / math.sqrt(math.prod(s[1:]))
    # calibrate the output level on a short random-code decode; rounded so that the file is reproducible
    model = Codec.from_state_dict(sd, cfg)
    q = cfg.quantizer
    codes = torch.cat([torch.randint(0, q.semantic_codebook_size, (1, 1, 8), generator=gen),
                       torch.randint(0, q.codebook_size, (1, q.n_codebooks, 8), generator=gen)], dim=1)
    with torch.no_grad():
        pre_tanh = model.decoder.model[:-1](model.quantizer.decode(codes))
    last = f"decoder.model.{len(model.decoder.model) - 2}.conv.parametrizations.weight.original0"
    sd[last] = sd[last] * float(f"{0.3 / pre_tanh.std().item():.3g}")
    return sd


__all__ = ["Codec", "CodecConfig", "QuantizerConfig", "TransformerConfig", "TransformerDefaults",
           "WindowLimitedTransformer", "bake_weight_norm", "random_codec_state_dict", "unwrap_state_dict"]
