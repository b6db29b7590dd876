"""Fish S2-Pro codec ("modded DAC") in plain PyTorch: codes [B, 10, T] <-> 44.1 kHz audio [B, 1, T*2048].

Numerically faithful to upstream fish-speech (`fish_speech/models/dac/{modded_dac,rvq}.py` on top of
descript-audio-codec 1.0.0): every op on both paths is causal, convs are left-padded, transposed convs are
trimmed on the right, and the quantizer transformers use a causal sliding window. Module and parameter names
mirror upstream so that `codec.pth` loads after weight norm is baked into plain `weight` tensors.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Attention, FeedForward, RMSNorm, rope_table
from .config import CodecConfig, CodecTransformerConfig, QuantizerConfig
from .weights import check_state_dict

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

    def __init__(self, c: CodecTransformerConfig):
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

    def __init__(self, c: CodecTransformerConfig):
        super().__init__()
        self.config = c
        self.layers = nn.ModuleList(CodecTransformerBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.input_proj = nn.Linear(c.input_dim, c.dim) if c.input_dim != c.dim else nn.Identity()
        self.output_proj = nn.Linear(c.dim, c.input_dim) if c.input_dim != c.dim else nn.Identity()
        with torch.device("cpu"):  # not in the checkpoint: real values even when the module is built on meta
            self.register_buffer("rope", rope_table(c.block_size, c.head_dim, c.rope_base), persistent=False)

    def reserve(self, n: int) -> None:
        """Grow the RoPE table to hold n positions. forward grows it on demand in eager mode; a compiled
        call would trace the growth (and compile again once it is done), a CUDA graph capture cannot copy the
        new table to the device, and an exported graph keeps the table it was traced with: reserve first."""
        if n > self.rope.shape[0]:
            c = self.config
            self.rope = rope_table(2 ** math.ceil(math.log2(n)), c.head_dim, c.rope_base).to(self.rope.device)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if c.channels_first:
            x = x.transpose(1, 2)
        x = self.input_proj(x)
        T = x.shape[1]
        self.reserve(T)
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
    def __init__(self, dim: int, stride: int, transformer: CodecTransformerConfig | None):
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
        sd = check_state_dict(model, state_dict)
        model.load_state_dict(sd, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> Codec:
        """`codec.pth` (+ `codec_config.yaml` if present, else the S2-Pro preset) from a checkpoint folder."""
        sd = torch.load(Path(checkpoint_dir) / "codec.pth", map_location="cpu", weights_only=True)
        return cls.from_state_dict(sd, CodecConfig.for_checkpoint(checkpoint_dir), device, dtype)
