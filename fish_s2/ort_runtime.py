"""ONNX Runtime for the exported fast AR and codec: drop-ins for the torch modules on the CPU path.

* :class:`OrtFastAR`: ``sample_codes`` with the semantics of :func:`fish_s2.dual_ar.sample_codes`
  (the noise of code k is ``uniform_noise(key, draw0 + 1 + k, 0..codebook_size-1)``, so the codes
  equal the torch path's).
* :class:`OrtCodecDecoder`: ``decode`` == ``Codec.decode(codes)[:, 0]``.
* :class:`OrtCodecEncoder`: ``encode`` == ``Codec.encode(audio)``.

Sizes come from the files' metadata_props (written by :mod:`fish_s2.export.onnx_export`); bad input
raises ValueError naming the argument. ``providers`` defaults to the CPU; ONNX Runtime's CUDA or
TensorRT providers can be named where onnxruntime-gpu is installed (not run here).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from .sampling import BatchSampling, uniform_noise

CPU = ("CPUExecutionProvider",)


def session(path: str | Path, threads: int | None = None,
            providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """An inference session; ``threads`` caps ONNX Runtime's intra-op pool (None = its default)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file (run `python -m fish_s2.export` first)")
    opts = ort.SessionOptions()
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: must be an integer >= 1 or None, got {threads!r}")
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=list(providers or CPU))


def _metadata(sess: ort.InferenceSession, path: str | Path, network: str, keys: Sequence[str]) -> dict[str, int]:
    meta = sess.get_modelmeta().custom_metadata_map
    if meta.get("network") != network:
        raise ValueError(f"{path}: not a {network} export (metadata network={meta.get('network')!r})")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks {missing}; re-export with this version of fish_s2")
    return {k: int(meta[k]) for k in keys}


def _shape(a: np.ndarray | Tensor) -> list[int]:
    return list(a.shape)


class OrtCodecDecoder:
    """codes int [B, n_codebooks, F] -> audio float32 [B, F * frame_length] (codes above range are clamped)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None):
        self.session = session(path, threads, providers)
        m = _metadata(self.session, path, "codec_decoder", ("frame_length", "sample_rate", "n_codebooks", "max_frames"))
        self.frame_length, self.sample_rate, self.n_codebooks = m["frame_length"], m["sample_rate"], m["n_codebooks"]
        self.max_frames = m["max_frames"]  # 0 = unlimited

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.dtype.kind not in "iu":
            raise ValueError(f"codes: expected an integer array, got {codes.dtype}")
        if codes.ndim != 3 or codes.shape[1] != self.n_codebooks or 0 in codes.shape:
            raise ValueError(f"codes: expected a non-empty [batch, {self.n_codebooks}, frames] array, "
                             f"got shape {_shape(codes)}")
        if self.max_frames and codes.shape[2] > self.max_frames:
            raise ValueError(f"codes: at most {self.max_frames} frames per call, got {codes.shape[2]}")
        return self.session.run(None, {"codes": codes.astype(np.int64, copy=False)})[0]


class OrtCodecEncoder:
    """audio float [B, N] -> codes int64 [B, n_codebooks, ceil(N / frame_length)] (zero-padded to whole frames)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None):
        self.session = session(path, threads, providers)
        m = _metadata(self.session, path, "codec_encoder", ("frame_length", "sample_rate", "n_codebooks", "max_samples"))
        self.frame_length, self.sample_rate, self.n_codebooks = m["frame_length"], m["sample_rate"], m["n_codebooks"]
        self.max_samples = m["max_samples"]  # 0 = unlimited

    def encode(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio)
        if audio.dtype.kind != "f":
            raise ValueError(f"audio: expected a float array, got {audio.dtype}")
        if audio.ndim != 2 or 0 in audio.shape:
            raise ValueError(f"audio: expected a non-empty [batch, samples] array, got shape {_shape(audio)}")
        if not np.isfinite(audio).all():
            raise ValueError("audio: contains NaN or infinite samples")
        n = audio.shape[1]
        padded = math.ceil(n / self.frame_length) * self.frame_length
        if self.max_samples and padded > self.max_samples:
            raise ValueError(f"audio: at most {self.max_samples} samples "
                             f"({self.max_samples / self.sample_rate:.1f} s at {self.sample_rate} Hz) per call, got {n}")
        audio = np.pad(audio.astype(np.float32, copy=False), ((0, 0), (0, padded - n)))
        return self.session.run(None, {"audio": audio})[0]


class OrtFastAR:
    """One frame's residual codes for B rows, in place of the torch fast AR (see the module docstring)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None):
        self.session = session(path, threads, providers)
        m = _metadata(self.session, path, "fast_ar", ("num_codebooks", "codebook_size", "slow_dim"))
        self.num_codebooks, self.codebook_size, self.slow_dim = m["num_codebooks"], m["codebook_size"], m["slow_dim"]
        self._ids = torch.arange(self.codebook_size)

    def noise(self, key: Tensor, draw0: Tensor) -> Tensor:
        """The uniforms ``sample_codes`` draws for codes 1.. : [B, num_codebooks - 1, codebook_size]."""
        return torch.stack([uniform_noise(key, draw0 + 1 + k, self._ids) for k in range(1, self.num_codebooks)], 1)

    def sample_codes(self, hidden: Tensor, main: Tensor, sampling: BatchSampling, draw0: Tensor) -> Tensor:
        """hidden [B, slow_dim] (final-norm slow-AR state), main [B] token ids, draw0 [B] -> codes [B, num_codebooks]."""
        if hidden.ndim != 2 or hidden.shape[1] != self.slow_dim or hidden.shape[0] < 1:
            raise ValueError(f"hidden: expected [batch, {self.slow_dim}], got {_shape(hidden)}")
        B = hidden.shape[0]
        fields = {"main": main, "draw0": draw0, "sampling.temperature": sampling.temperature,
                  "sampling.top_p": sampling.top_p, "sampling.top_k": sampling.top_k, "sampling.key": sampling.key}
        for name, t in fields.items():
            if tuple(t.shape) != (B,):
                raise ValueError(f"{name}: expected shape [{B}] (one per row of hidden), got {_shape(t)}")
        key, draw0 = sampling.key.cpu().long(), draw0.cpu().long()
        # greedy rows (top_k 1) keep only their best code whatever the noise: skip drawing it
        sampled = torch.nonzero(sampling.top_k.cpu() != 1).flatten()
        noise = torch.full((B, self.num_codebooks - 1, self.codebook_size), 0.5)
        if sampled.numel():
            noise[sampled] = self.noise(key[sampled], draw0[sampled])
        feeds = {"hidden": hidden.detach().float().cpu().numpy(), "main": main.cpu().long().numpy(),
                 "temperature": sampling.temperature.cpu().float().numpy(),
                 "top_p": sampling.top_p.cpu().float().numpy(), "top_k": sampling.top_k.cpu().long().numpy(),
                 "noise": noise.numpy()}
        codes = self.session.run(None, feeds)[0]
        return torch.from_numpy(codes).to(hidden.device)


__all__ = ["OrtCodecDecoder", "OrtCodecEncoder", "OrtFastAR", "session"]
