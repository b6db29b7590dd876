"""ONNX graphs of the fast AR, the codec decoder and the codec encoder: fp32, dynamic batch (and frames).

Graph contracts (the names are what :mod:`fish_s2.ort_runtime` and the TensorRT profiles use):

* ``fast_ar.onnx``: hidden f32 [B, slow_dim], main i64 [B], temperature f32 [B], top_p f32 [B],
  top_k i64 [B], noise f32 [B, num_codebooks - 1, codebook_size] -> codes i64 [B, num_codebooks].
  One frame's residual-code loop, sampling included: :func:`fish_s2.dual_ar.sample_codes` traced with
  the uniform noise of codes 1.. as an input (the runtime computes it with
  :func:`fish_s2.sampling.uniform_noise`, so codes equal the torch path's for the same noise).
* ``codec_decoder.onnx``: codes i64 [B, n_codebooks, F] -> audio f32 [B, F * frame_length]
  (out-of-range codes are clamped inside, as :meth:`fish_s2.codec.Codec.decode` does).
* ``codec_encoder.onnx``: audio f32 [B, N] with N a multiple of frame_length (the runtime pads)
  -> codes i64 [B, n_codebooks, N / frame_length].

Each file carries what its runtime needs as metadata_props (frame_length, sample_rate, n_codebooks,
the longest input the traced position tables cover, ...), so it needs no other file.

Why the loop export for the fast AR. Measured on this project's shared 2-core CPU machine (load ~3),
1 thread, ms per frame, median of 30 calls, median of 3 runs (+-10%); torch = ``sample_codes`` eager;
"steps" = one graph per codebook position with the KV cache as explicit inputs/outputs and sampling
in torch between the 10 calls; all three give identical codes:

    checkpoint              B   torch   ORT loop   ORT steps
    tiny  (fast 64 x 2)     1    16.6      9.3       11.3
                            8    48.7     39.3       37.3
                           32   176.8    143.8      122.8
    small (fast 512 x 2)    1    51.3     30.9       33.0
                            8   123.7     78.8       80.8
                           32   281.5    213.3      190.4

The loop is ahead at batch 1 and level at 8 (one call per frame instead of ten, no cache copies),
which is what the CPU path serves (its engine runs at most 8 rows); at 32 the steps variant leads by
10-15% because the full-vocabulary sort of upstream top-p sampling dominates there and ONNX Runtime's
TopK+ScatterElements are slower than torch.sort. The steps variant would also avoid TensorRT's TopK
limit (k <= 3840 < 4096 codes), see build/build_trt_plans.py.

Exporter: torch's TorchScript-based exporter (``dynamo=False``). The torch.export-based exporter
gives graphs with the same parity but took 15-85 s per graph on the tiny checkpoint (decoder 15,
encoder 45, fast AR 46-84) against 2-10 s.
A trace can freeze a shape into the graph, so every export is checked before it is accepted: the
saved graph runs in ONNX Runtime at shapes other than the traced ones and must match torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from .. import __version__
from ..checkpoint import check_coverage, load_config, module_key, weight_files
from ..codec import Codec, WindowLimitedTransformer
from ..config import DualARConfig
from ..dual_ar import sample_codes
from ..fast_ar import FastAR
from ..request import SamplingParams
from ..sampling import BatchSampling, logits_to_probs, race

OPSET = 17
FILES = {"fast_ar": "fast_ar.onnx", "codec_decoder": "codec_decoder.onnx", "codec_encoder": "codec_encoder.onnx"}
FAST_AR_INPUTS = ("hidden", "main", "temperature", "top_p", "top_k", "noise")
DECODER_ATOL = 1e-3  # export check only (tests hold the tiny codec to 1e-4); a frozen shape is off by O(1)


@dataclass(frozen=True)
class Exported:
    path: Path
    metadata: dict[str, str]
    check: str  # what the post-export comparison found, for the progress line


# ------------------------------------------------------------------------------------------ loading


def load_fast_ar(checkpoint_dir: str | Path) -> tuple[DualARConfig, FastAR]:
    """The fast AR alone, fp32 (S2-Pro's slow AR would be 16 GB of fp32 that no graph here needs).

    Key coverage is strict for the fast AR's tensors, as in :func:`fish_s2.checkpoint.load_dual_ar`."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg, _ = load_config(checkpoint_dir)
    with torch.device("meta"):
        fast = FastAR(cfg)
    expected = {"fast." + k: tuple(v.shape) for k, v in fast.state_dict().items()}
    found: dict[str, tuple] = {}
    sources: dict[str, Path] = {}
    for path in weight_files(checkpoint_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = module_key(key)
                if name is not None and name.startswith("fast."):
                    found[name], sources[name] = tuple(f.get_slice(key).get_shape()), path
    check_coverage(expected, found, f"{checkpoint_dir} (fast AR)")
    state = {}
    for path in sorted(set(sources.values())):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = module_key(key)
                if name in sources:
                    state[name[len("fast."):]] = f.get_tensor(key).float()
    fast.load_state_dict(state, strict=True, assign=True)
    fast.init_buffers("cpu")
    return cfg, fast.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------- fast AR


class _AppendCache:
    """KV storage for a traced frame. Positions arrive in order 0..n-1, so appending is the write;
    the engine's in-place scatter into a preallocated cache is not something a trace can follow."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def write(self, slots: slice, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        if self.k.shape[2] != kv_len:
            raise RuntimeError(f"fast-AR positions must arrive in order (cache {self.k.shape[2]}, kv_len {kv_len})")
        return self.k, self.v


class _GivenNoise(BatchSampling):
    """Upstream sampling with the noise of each draw taken from a graph input, in call order."""

    def __init__(self, temperature: Tensor, top_p: Tensor, top_k: Tensor, noise: Tensor):
        super().__init__(temperature, top_p, top_k, key=torch.zeros_like(top_k))
        self._noise, self._next = noise, 0

    def sample(self, logits: Tensor, ids: Tensor, draw: Tensor, temperature: Tensor | None = None,
               top_p: Tensor | None = None, u: Tensor | None = None) -> Tensor:
        if temperature is not None or top_p is not None:
            raise NotImplementedError("residual codes use the rows' own temperature and top_p")
        u = self._noise[:, self._next]
        self._next += 1
        return race(logits_to_probs(logits, self.temperature, self.top_p, self.top_k), u)


class FastARGraph(nn.Module):
    """``sample_codes`` for one frame with the noise as an input (it reads ``self.cfg`` / ``self.fast``)."""

    def __init__(self, cfg: DualARConfig, fast: FastAR):
        super().__init__()
        self.cfg, self.fast = cfg, fast

    def forward(self, hidden: Tensor, main: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor,
                noise: Tensor) -> Tensor:
        sampling = _GivenNoise(temperature, top_p, top_k, noise)
        return sample_codes(self, hidden, main, sampling, torch.zeros_like(main),
                            [_AppendCache() for _ in self.fast.layers])


def export_fast_ar(checkpoint_dir: str | Path, path: str | Path) -> Exported:
    """Trace the fast AR's frame loop at batch 2, then check it against torch at batch 3."""
    cfg, fast = load_fast_ar(checkpoint_dir)
    path, B, gen = Path(path), 2, torch.Generator().manual_seed(0)
    n, V = cfg.num_codebooks, cfg.codebook_size
    args = (torch.randn(B, cfg.slow.dim, generator=gen), torch.full((B,), cfg.semantic_begin_id, dtype=torch.long),
            torch.full((B,), 0.8), torch.full((B,), 0.8), torch.full((B,), 30, dtype=torch.long),
            torch.rand(B, n - 1, V, generator=gen))
    axes = {name: {0: "batch"} for name in (*FAST_AR_INPUTS, "codes")}
    _trace(FastARGraph(cfg, fast), args, path, FAST_AR_INPUTS, ("codes",), axes)
    meta = {"network": "fast_ar", "num_codebooks": n, "codebook_size": V, "slow_dim": cfg.slow.dim,
            "semantic_begin_id": cfg.semantic_begin_id}
    _write_metadata(path, meta)
    return Exported(path, _strings(meta), _check_fast_ar(cfg, fast, path))


def _check_fast_ar(cfg: DualARConfig, fast: FastAR, path: Path) -> str:
    """Codes from the graph (through the runtime) == ``sample_codes`` in torch, greedy and sampled rows."""
    from ..ort_runtime import OrtFastAR

    params = [SamplingParams(temperature=0.0), SamplingParams(seed=7), SamplingParams(top_k=4000, top_p=0.99, seed=3)]
    B = len(params)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, cfg.slow.dim, generator=gen)
    main = torch.tensor([cfg.semantic_begin_id + 5, cfg.semantic_end_id, cfg.eos_id])
    sampling, draw0 = BatchSampling.of(params), torch.tensor([0, 11, 4242])
    with torch.no_grad():
        ref = sample_codes(_Model(cfg, fast), hidden, main, sampling, draw0, fast.new_cache(B))
    got = OrtFastAR(path).sample_codes(hidden, main, sampling, draw0)
    if not torch.equal(got, ref):
        raise RuntimeError(f"{path}: the exported fast AR disagrees with torch at batch {B}:\n"
                           f"onnx  {got.tolist()}\ntorch {ref.tolist()}")
    return f"codes identical to torch at batch {B}"


@dataclass
class _Model:
    """What ``sample_codes`` reads from a DualAR."""

    cfg: DualARConfig
    fast: FastAR


# ------------------------------------------------------------------------------------------- codec


class CodecDecoderGraph(nn.Module):
    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec

    def forward(self, codes: Tensor) -> Tensor:
        return self.codec.decode(codes)[:, 0]


class CodecEncoderGraph(nn.Module):
    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec

    def forward(self, audio: Tensor) -> Tensor:
        return self.codec.encode(audio)


def _codec_metadata(codec: Codec, network: str) -> dict[str, object]:
    cfg = codec.config
    return {"network": network, "frame_length": cfg.frame_length, "sample_rate": cfg.sample_rate,
            "n_codebooks": cfg.n_codebooks}


def _rope_rows(module: nn.Module) -> int | None:
    """Positions a codec transformer's traced RoPE table covers (None: no transformer, no limit)."""
    return module.rope.shape[0] if isinstance(module, WindowLimitedTransformer) else None


def decoder_max_frames(codec: Codec) -> int:
    """Longest code sequence the exported decoder accepts (0 = unlimited): its post-module RoPE table."""
    return _rope_rows(codec.quantizer.post_module) or 0


def encoder_max_samples(codec: Codec) -> int:
    """Longest input the exported encoder accepts (0 = unlimited), in whole frames: each transformer on the
    encode path covers its RoPE table's rows times the samples one of its positions stands for."""
    cfg, limits, hop = codec.config, [], 1
    for rate, block in zip(cfg.encoder_rates, codec.encoder.block[1:]):
        hop *= rate
        rows = _rope_rows(block.block[-1])
        if rows:
            limits.append(rows * hop)
    rows = _rope_rows(codec.quantizer.pre_module)
    if rows:
        limits.append(rows * cfg.frame_length)
    return min(limits) // cfg.frame_length * cfg.frame_length if limits else 0


def export_codec_decoder(checkpoint_dir: str | Path, path: str | Path) -> Exported:
    """Trace decode at [2, n, 3], then check it against torch at other batch sizes and lengths."""
    codec, path = Codec.from_checkpoint(checkpoint_dir), Path(path)
    n = codec.config.n_codebooks
    codes = _random_codes(codec, 2, 3, seed=0)
    axes = {"codes": {0: "batch", 2: "frames"}, "audio": {0: "batch", 1: "samples"}}
    _trace(CodecDecoderGraph(codec), (codes,), path, ("codes",), ("audio",), axes)
    meta = {**_codec_metadata(codec, "codec_decoder"), "max_frames": decoder_max_frames(codec)}
    _write_metadata(path, meta)

    from ..ort_runtime import OrtCodecDecoder

    worst = 0.0
    for B, T in ((1, 1), (3, 7)):
        codes = _random_codes(codec, B, T, seed=B)
        codes[0, 1:, 0] = codec.config.quantizer.codebook_size + 5  # above the residual range: clamped inside
        with torch.no_grad():
            ref = codec.decode(codes)[:, 0].numpy()
        got = OrtCodecDecoder(path).decode(codes.numpy())
        if got.shape != ref.shape:
            raise RuntimeError(f"{path}: decoder output {got.shape} for codes {tuple(codes.shape)}, torch {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    if worst > DECODER_ATOL:
        raise RuntimeError(f"{path}: the exported decoder differs from torch by {worst:.2e} (> {DECODER_ATOL})")
    return Exported(path, _strings(meta), f"audio within {worst:.1e} of torch ({n} codebooks)")


def export_codec_encoder(checkpoint_dir: str | Path, path: str | Path) -> Exported:
    """Trace encode at [2, 2 frames], then check it against torch at other batch sizes and lengths."""
    codec, path = Codec.from_checkpoint(checkpoint_dir), Path(path)
    fl = codec.config.frame_length
    audio = _random_audio(2, 2 * fl, seed=0)
    axes = {"audio": {0: "batch", 1: "samples"}, "codes": {0: "batch", 2: "frames"}}
    _trace(CodecEncoderGraph(codec), (audio,), path, ("audio",), ("codes",), axes)
    meta = {**_codec_metadata(codec, "codec_encoder"), "max_samples": encoder_max_samples(codec)}
    _write_metadata(path, meta)

    from ..ort_runtime import OrtCodecEncoder

    agree = total = 0
    for B, N in ((1, fl // 3), (3, 5 * fl + 7)):
        audio = _random_audio(B, N, seed=B)
        with torch.no_grad():
            ref = codec.encode(audio).numpy()
        got = OrtCodecEncoder(path).encode(audio.numpy())
        if got.shape != ref.shape:
            raise RuntimeError(f"{path}: encoder codes {got.shape} for audio {tuple(audio.shape)}, torch {ref.shape}")
        agree, total = agree + int((got == ref).sum()), total + ref.size
    if agree < 0.99 * total:  # tracing errors garble codes; a rare near-tie in a VQ argmax may flip one
        raise RuntimeError(f"{path}: the exported encoder matches torch on only {agree}/{total} codes")
    return Exported(path, _strings(meta), f"{agree}/{total} codes identical to torch")


def _random_codes(codec: Codec, B: int, T: int, seed: int) -> Tensor:
    q, g = codec.config.quantizer, torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(0, q.semantic_codebook_size, (B, 1, T), generator=g),
                      torch.randint(0, q.codebook_size, (B, q.n_codebooks, T), generator=g)], dim=1)


def _random_audio(B: int, N: int, seed: int) -> Tensor:
    return 0.3 * torch.randn(B, N, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ common


def _trace(module: nn.Module, args: tuple, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...],
           axes: dict[str, dict[int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # shape-dependent Python in the model is expected here; the post-export check catches a frozen shape
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message="The feature will be removed")
        warnings.filterwarnings("ignore", category=UserWarning, message="Constant folding")
        torch.onnx.export(module.eval(), args, str(path), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)


def _strings(meta: dict[str, object]) -> dict[str, str]:
    return {"producer": f"fish_s2 {__version__}", **{k: str(v) for k, v in meta.items()}}


def _write_metadata(path: Path, meta: dict[str, object]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, _strings(meta))
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """metadata_props of an exported file (reads the graph only, not external weights)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


__all__ = ["FILES", "FAST_AR_INPUTS", "OPSET", "Exported", "decoder_max_frames", "encoder_max_samples",
           "export_codec_decoder", "export_codec_encoder", "export_fast_ar", "load_fast_ar", "read_metadata"]
