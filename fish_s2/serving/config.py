"""Deployment settings: one typed file (``serving.yaml``) that every Triton model of a repository reads.

The repository generator writes it next to the models; each model finds it through its
``serving_config`` parameter. The engine block is :class:`fish_s2.engine.EngineConfig` itself (for
either runtime: the TensorRT-LLM engine takes its limits from here too), so its defaults live in one
place. Unknown keys and wrong types are errors that name the key.

Sizing (:mod:`fish_s2.memory_plan`): ``dtype: auto`` and ``engine.max_active: null`` are decided by
the memory plan that dual_ar computes when it starts, before it loads a weight (only dual_ar uses
them). ``engine.max_frames: null`` (frames derived from the memory, for a given ``max_active``) is
also a request limit that preprocess checks, so the repository generator resolves it and writes the
number here: every model then reads the same limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import memory_plan as mp
from ..engine.config import EngineConfig
from ..request import InvalidArgument, Limits
from ..typed_settings import build, plain, read_yaml

PROFILES = ("cpu", "gpu")
RUNTIMES = ("torch", "trtllm")                  # what hosts the Dual-AR decode loop in dual_ar
FAST_AR_RUNTIMES = ("torch", "onnx")            # the fast AR inside the torch engine's step
PYTHON_CODECS = ("torch", "onnx")               # codec_decoder as a python-backend model
TRITON_CODECS = ("tensorrt", "onnxruntime")     # codec_decoder served by a Triton backend (GPU)
FILE_NAME = "serving.yaml"


@dataclass(frozen=True)
class ServingConfig:
    checkpoint: str                          # upstream-format checkpoint directory (tokenizer, codec, weights)
    voices_dir: str                          # registered voices (created if missing)
    profile: str = "cpu"
    device: str = "cpu"
    dtype: str = "auto"                      # slow/fast AR weights and KV: auto (memory_plan.choose_dtype),
                                             # float32 or bfloat16
    kv_memory_fraction: float = mp.DEFAULT_KV_FRACTION   # share of the memory the fixed part leaves that the KV
                                                         # may take (TensorRT-LLM: free_gpu_memory_fraction)
    max_slots: int = mp.PlanSettings.max_slots   # cap on a derived engine.max_active
    runtime: str = "torch"
    trtllm_dir: str | None = None            # converted model directory (runtime trtllm)
    trtllm_settings: str | None = None       # LLM-API settings YAML (runtime trtllm); None: the package's
    fast_ar_runtime: str = "torch"           # runtime torch: the fast AR in torch, or "onnx" (ONNX Runtime)
    fast_ar_onnx: str | None = None          # the exported fast AR (fast_ar_runtime onnx)
    codec_runtime: str = "torch"
    codec_decoder_path: str | None = None    # .onnx (onnx, onnxruntime) or .plan (tensorrt)
    codec_max_frames: int | None = None      # the longest chunk (context included) the codec takes: the TensorRT
                                             # plan's profile, written here by the repository generator
    codec_encoder_onnx: str | None = None    # reference encoding with ONNX Runtime; None: torch codec
    codec_encoder_plan: str | None = None    # gpu: reference encoding with the TensorRT plan (before the ONNX one)
    threads: int = 0                         # intra-op threads of each model process; 0: library default
    max_text_bytes: int = 4096
    allow_control_tokens: bool = False       # True: control-token strings in request text act as control tokens
                                             # (trusted callers only); False: they are plain text
    max_reference_seconds: float = 30.0
    max_voices: int = 4                      # voices in one request (a dialogue's speakers)
    max_turns: int = 64                      # speaker turns in one request's text (a dialogue's length in frames
                                             # is bounded by engine.max_frames, its text by max_text_bytes)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> "ServingConfig":
        def one_of(name: str, choices: tuple[str, ...]) -> None:
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {list(choices)}, got {getattr(self, name)!r}")

        one_of("profile", PROFILES)
        one_of("runtime", RUNTIMES)
        one_of("fast_ar_runtime", FAST_AR_RUNTIMES)
        one_of("codec_runtime", PYTHON_CODECS + TRITON_CODECS)
        if self.profile == "cpu":
            for name, want in (("device", "cpu"), ("runtime", "torch")):
                if getattr(self, name) != want:
                    raise ValueError(f"{name}: the cpu profile needs {want!r}, got {getattr(self, name)!r}")
            one_of("codec_runtime", PYTHON_CODECS)
        if self.runtime == "trtllm" and not self.trtllm_dir:
            raise ValueError("trtllm_dir: required with runtime 'trtllm'")
        if self.fast_ar_runtime == "onnx" and (self.runtime != "torch" or not self.fast_ar_onnx):
            raise ValueError("fast_ar_runtime: 'onnx' needs runtime 'torch' and fast_ar_onnx (the exported fast AR)")
        if self.codec_runtime != "torch" and not self.codec_decoder_path:
            raise ValueError(f"codec_decoder_path: required with codec_runtime {self.codec_runtime!r}")
        if self.codec_max_frames is not None and self.codec_max_frames < 1:
            raise ValueError(f"codec_max_frames: must be >= 1, got {self.codec_max_frames}")
        for name in ("threads", "max_text_bytes", "max_slots", "max_voices", "max_turns"):
            if getattr(self, name) < (0 if name == "threads" else 1):
                raise ValueError(f"{name}: out of range, got {getattr(self, name)}")
        if not self.max_reference_seconds > 0:
            raise ValueError(f"max_reference_seconds: must be > 0, got {self.max_reference_seconds}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction: must be in (0, 1], got {self.kv_memory_fraction}")
        if self.dtype != "auto":
            mp.normalize_dtype(self.dtype)
        for name in ("max_active", "max_frames"):
            value = getattr(self.engine, name)
            if value is not None and value < 1:
                raise ValueError(f"engine.{name}: must be >= 1, or null to derive it from the memory, got {value}")
        if self.engine.max_frames is None and self.engine.max_active is None:
            raise ValueError("engine.max_frames: null (derived from the memory) needs a number for engine.max_active "
                             "(with engine.max_active derived, give engine.max_frames a number)")
        if self.engine.max_frames is not None:
            try:
                self.limits().check_plan(self.engine.chunk_plan)
            except InvalidArgument as e:
                raise ValueError(f"engine.chunk_plan.{e}") from None
        return self

    def plan_settings(self, codec_batch: int | None = None) -> mp.PlanSettings:
        """This deployment's memory-plan settings: its profile's, with the values set here (None stays
        derived); ``codec_batch``: the codec decoder's batch (config.pbtxt), None: the profile's."""
        e = self.engine
        return mp.settings_for(self.profile, device=self.device, runtime=self.runtime, dtype=self.dtype,
                               kv_memory_fraction=self.kv_memory_fraction, max_active=e.max_active,
                               max_prompt_tokens=e.max_prompt_tokens, max_frames=e.max_frames,
                               prefill_chunk_tokens=e.prefill_chunk_tokens,
                               prefix_cache_bytes=e.prefix_cache_bytes, max_slots=self.max_slots,
                               codec_batch=codec_batch, reference_seconds=self.max_reference_seconds,
                               codec_chunk_frames=e.chunk_plan.longest_chunk)

    def limits(self) -> Limits:
        """What a request may ask of this deployment (checked by preprocess)."""
        if self.engine.max_frames is None:
            raise ValueError("engine.max_frames: null (derived) is resolved when the repository is generated "
                             "(python -m fish_s2.serving.repository); give it a number here")
        return Limits(max_frames=self.engine.max_frames, max_text_bytes=self.max_text_bytes,
                      max_reference_seconds=self.max_reference_seconds, chunk_plan=self.engine.chunk_plan,
                      max_voices=self.max_voices, max_turns=self.max_turns,
                      **({} if self.codec_max_frames is None else {"max_chunk_frames": self.codec_max_frames}))

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        return plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ServingConfig":
        return build(cls, data).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "ServingConfig":
        try:
            return cls.from_dict(read_yaml(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def with_overrides(self, overrides: dict[str, object]) -> "ServingConfig":
        """Apply dotted-key overrides (``engine.max_active``: 4) and validate."""
        data = self.to_dict()
        for key, value in overrides.items():
            node, *path, leaf = [data, *key.split(".")]
            for part in path:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"{key}: unknown setting")
                node = node[part]
            if leaf not in node:
                raise ValueError(f"{key}: unknown setting")
            node[leaf] = value
        return ServingConfig.from_dict(data)
