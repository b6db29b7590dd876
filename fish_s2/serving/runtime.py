"""The engine, codec decoder and reference encoder a :class:`ServingConfig` names.

GPU-only runtimes (TensorRT-LLM, ONNX Runtime sessions from another engineer's module) are imported
only when chosen, so the CPU profile needs neither.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
import torch

from ..audio import to_rate
from ..checkpoint import load_config, load_dual_ar
from ..codec import Codec, CodecConfig
from ..config import DualARConfig
from ..engine import Engine
from ..request import InvalidArgument
from ..tokenizer import S2Tokenizer
from .config import PYTHON_CODECS, ServingConfig


def configure_threads(cfg: ServingConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def on_instance_device(cfg: ServingConfig, args: dict) -> ServingConfig:
    """The settings of one Triton model instance: a KIND_GPU instance (instance_group ``gpus: [...]``, one
    per GPU) runs on the GPU Triton gave it, ``cuda:<model_instance_device_id>``, made the current device
    so code that says "cuda" gets it too; any other instance keeps ``cfg.device``."""
    if args.get("model_instance_kind") != "GPU":
        return cfg
    device_id = int(args["model_instance_device_id"])
    torch.cuda.set_device(device_id)
    return dataclasses.replace(cfg, device=f"cuda:{device_id}")


def load_text_side(cfg: ServingConfig) -> tuple[DualARConfig, S2Tokenizer]:
    return load_config(cfg.checkpoint)


def build_engine(cfg: ServingConfig):
    """A started engine with :class:`fish_s2.engine.Engine`'s interface, limits from ``cfg.engine``."""
    if cfg.runtime == "trtllm":
        from ..trtllm.engine import TrtllmEngine  # GPU only; imports tensorrt_llm when started
        from ..trtllm.settings import DEFAULT_PATH, load_trtllm_settings

        return TrtllmEngine(cfg.trtllm_dir, cfg.engine, load_trtllm_settings(cfg.trtllm_settings or DEFAULT_PATH)).start()
    dual_cfg, _ = load_config(cfg.checkpoint)
    model = load_dual_ar(cfg.checkpoint, dual_cfg, cfg.dtype, cfg.device)
    fast_ar = None
    if cfg.fast_ar_runtime == "onnx":
        from ..ort_runtime import OrtFastAR

        fast_ar = OrtFastAR(cfg.fast_ar_onnx, threads=cfg.threads or None)
    engine = Engine(model, cfg.engine, fast_ar)
    if engine.runner.use_graphs:   # capture every decode graph now rather than during the first requests
        engine.runner.capture_graphs(cfg.engine.max_active, cfg.engine.max_seq_len)
    return engine.start()


class CodecDecoder(Protocol):
    frame_length: int

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int64 codes [B, num_codebooks, F] -> float32 audio [B, F * frame_length]."""


class TorchCodecDecoder:
    def __init__(self, codec: Codec):
        self.codec = codec
        self.frame_length = codec.frame_length
        self._device = next(codec.parameters()).device

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        audio = self.codec.decode(torch.from_numpy(np.ascontiguousarray(codes)).to(self._device))
        return audio[:, 0].float().cpu().numpy()


def build_codec_decoder(cfg: ServingConfig) -> CodecDecoder:
    if cfg.codec_runtime not in PYTHON_CODECS:
        raise ValueError(f"codec_runtime: {cfg.codec_runtime!r} is served by a Triton backend, not the python model")
    if cfg.codec_runtime == "onnx":
        from ..ort_runtime import OrtCodecDecoder

        return OrtCodecDecoder(cfg.codec_decoder_path, threads=cfg.threads or None)
    return TorchCodecDecoder(Codec.from_checkpoint(cfg.checkpoint, device=cfg.device))


class ReferenceEncoder:
    """Reference recording (mono float32 at any rate) -> codes int64 [num_codebooks, T]."""

    def __init__(self, cfg: ServingConfig):
        codec_cfg = CodecConfig.for_checkpoint(cfg.checkpoint)
        self.sample_rate, self.frame_length = codec_cfg.sample_rate, codec_cfg.frame_length
        if cfg.codec_encoder_onnx:
            from ..ort_runtime import OrtCodecEncoder

            self._encode = OrtCodecEncoder(cfg.codec_encoder_onnx).encode
        else:
            codec = Codec.from_checkpoint(cfg.checkpoint, device=cfg.device)
            device = next(codec.parameters()).device

            @torch.inference_mode()
            def encode(audio: np.ndarray) -> np.ndarray:
                return codec.encode(torch.from_numpy(audio).to(device)).cpu().numpy()

            self._encode = encode

    def __call__(self, audio: np.ndarray, rate: int) -> np.ndarray:
        samples = to_rate(audio, rate, self.sample_rate)
        samples = np.pad(samples, (0, -samples.size % self.frame_length))   # whole frames, as the codec does
        try:
            return np.asarray(self._encode(samples[None]))[0].astype(np.int64)
        except ValueError as e:   # e.g. longer than the exported encoder takes
            raise InvalidArgument("reference_audio", str(e)) from None
