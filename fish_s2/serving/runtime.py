"""The engine, codec decoder and reference encoder a :class:`ServingConfig` names, and the dual_ar
and codec_decoder models' startup.

dual_ar's startup (:func:`start_dual_ar`): the memory plan (:mod:`fish_s2.memory_plan`) from the
checkpoint's config and weight headers and the memory free now, before any weight is loaded; printed;
refused with one error naming the numbers when it cannot fit; then the weights loaded in the plan's
dtype, the engine built with the plan's slots and frame limit (TensorRT-LLM: its KV pool sized by the
plan) and warmed up, all before Triton reports the model ready.

GPU-only runtimes (TensorRT-LLM, ONNX Runtime sessions from another engineer's module) are imported
only when chosen, so the CPU profile needs neither.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .. import memory_plan as mp
from ..audio import to_rate
from ..checkpoint import load_config, load_dual_ar
from ..codec import Codec, CodecConfig
from ..config import DualARConfig
from ..engine import Engine
from ..prompt import PromptBuilder
from ..request import EngineRequest, InvalidArgument, collect
from ..tokenizer import S2Tokenizer
from .config import PYTHON_CODECS, ServingConfig

WARMUP_TEXT = "Warming up."


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


def memory_plan(cfg: ServingConfig, available: int | None = None, codec_batch: int | None = None) -> mp.MemoryPlan:
    """The deployment's memory plan, from the checkpoint's config and weight headers (no weight is
    read), for ``available`` bytes (None: what ``cfg.device`` has free now). Not checked: see
    :func:`fish_s2.memory_plan.check_fits`."""
    dual_cfg, _ = load_config(cfg.checkpoint)
    available = mp.available_memory(cfg.device) if available is None else available
    return mp.plan_memory(dual_cfg, cfg.plan_settings(codec_batch), available, mp.checkpoint_params(cfg.checkpoint),
                          mp.codec_spec(cfg.checkpoint))


def _trtllm_settings(cfg: ServingConfig, plan: mp.MemoryPlan):
    """(llm_api.yaml's settings, the plan's KV-cache size for them)."""
    from ..trtllm.settings import DEFAULT_PATH, load_trtllm_settings

    settings = load_trtllm_settings(cfg.trtllm_settings or DEFAULT_PATH)
    return settings, plan.trtllm_kv_cache(settings.kv_cache.tokens_per_block)


def build_engine(cfg: ServingConfig, plan: mp.MemoryPlan):
    """A started engine with :class:`fish_s2.engine.Engine`'s interface: limits from ``cfg.engine``,
    with the slots, frame limit and dtype the plan decided."""
    engine_cfg = dataclasses.replace(cfg.engine, **plan.engine_settings())
    if cfg.runtime == "trtllm":
        from ..trtllm.engine import TrtllmEngine  # GPU only; imports tensorrt_llm when started

        settings, kv = _trtllm_settings(cfg, plan)
        return TrtllmEngine(cfg.trtllm_dir, engine_cfg, settings, kv_budget=kv["kv_cache"]).start()
    dual_cfg, _ = load_config(cfg.checkpoint)
    model = load_dual_ar(cfg.checkpoint, dual_cfg, plan.dtype, cfg.device)
    fast_ar = None
    if cfg.fast_ar_runtime == "onnx":
        from ..ort_runtime import OrtFastAR

        fast_ar = OrtFastAR(cfg.fast_ar_onnx, threads=cfg.threads or None)
    engine = Engine(model, engine_cfg, fast_ar)
    if engine.runner.use_graphs:   # capture every decode graph now rather than during the first requests
        engine.runner.capture_graphs(engine_cfg.max_active, engine_cfg.max_seq_len)
    return engine.start()


def read_in(module: torch.nn.Module) -> None:
    """Touch every memory page of a module's host tensors: weights memory-mapped from the checkpoint
    are read from disk now rather than by the first request that needs them."""
    with torch.inference_mode():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.reshape(-1)[::max(1, 4096 // t.element_size())].sum()


def warm_up_engine(engine, cfg: ServingConfig) -> tuple[float, int]:
    """Read the torch engine's weights in and run one short generation (prefill, first frame and the
    decode steps of a first chunk), so that the first request costs what later ones cost. Returns
    (seconds, frames generated)."""
    start = time.perf_counter()
    model = getattr(getattr(engine, "runner", None), "model", None)
    if model is not None:
        read_in(model)
    dual_cfg, tokenizer = load_text_side(cfg)
    prompt, _ = PromptBuilder(tokenizer, dual_cfg.num_codebooks).request(WARMUP_TEXT, [])
    frames = min(cfg.engine.chunk_plan.first_chunk_frames, engine.cfg.max_frames)
    _, done = collect(engine.submit(EngineRequest(prompt, max_frames=frames)))   # prefix_len 0: no cache entry
    if done.error is not None:
        raise RuntimeError(f"dual_ar: the warm-up generation failed: {done.error}")
    return time.perf_counter() - start, done.n_frames


@dataclass(frozen=True)
class DualARStart:
    engine: object             # started, warmed up
    plan: mp.MemoryPlan
    warmup_s: float


def start_dual_ar(cfg: ServingConfig, codec_batch: int | None = None, log: Callable[[str], None] = print,
                  available: int | None = None) -> DualARStart:
    """dual_ar's startup: plan (``available`` bytes, None: measured now; ``codec_batch``: the codec
    decoder's), log the plan (one call per line), refuse it with one ValueError naming the numbers when
    it cannot fit (no weight loaded yet), build the engine as planned, warm it up."""
    plan = memory_plan(cfg, available, codec_batch)
    lines = plan.to_text().splitlines()
    if cfg.runtime == "trtllm":
        lines.append(f"  TensorRT-LLM: {_trtllm_settings(cfg, plan)[1]}")
    for line in lines:
        log(line)
    mp.check_fits(plan)
    engine = build_engine(cfg, plan)
    try:
        seconds, frames = warm_up_engine(engine, cfg)
    except BaseException:
        engine.stop()
        raise
    log(f"dual_ar: warm-up done in {seconds:.2f} s (weights read in, {frames} frames generated)")
    return DualARStart(engine, plan, seconds)


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


def warm_up_codec(decoder: CodecDecoder, cfg: ServingConfig) -> float:
    """Decode one chunk of each size of the default chunk plan (first chunk; steady chunk with its
    context) before the server reports ready. Returns the seconds taken."""
    num_codebooks = DualARConfig.from_json(cfg.checkpoint).num_codebooks
    chunks = cfg.engine.chunk_plan
    start = time.perf_counter()
    for frames in dict.fromkeys((chunks.first_chunk_frames, chunks.chunk_frames + chunks.context_frames)):
        decoder.decode(np.zeros((1, num_codebooks, frames), np.int64))
    return time.perf_counter() - start


class ReferenceEncoder:
    """Reference recording (mono float32 at any rate) -> codes int64 [num_codebooks, T]."""

    def __init__(self, cfg: ServingConfig):
        codec_cfg = CodecConfig.for_checkpoint(cfg.checkpoint)
        self.sample_rate, self.frame_length = codec_cfg.sample_rate, codec_cfg.frame_length
        if cfg.codec_encoder_plan:
            from ..trt_plan import TrtCodecEncoder

            self._encode = TrtCodecEncoder(cfg.codec_encoder_plan, self.frame_length, cfg.device).encode
        elif cfg.codec_encoder_onnx:
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
