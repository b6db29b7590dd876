"""Deployment settings: one typed file (``serving.yaml``) that every Triton model of a repository reads.

The repository generator writes it next to the models; each model finds it through its
``serving_config`` parameter. Engine settings are :class:`fish_s2.engine.EngineConfig` itself, so
their defaults live in one place. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..engine import EngineConfig

PROFILES = ("cpu", "gpu")
RUNTIMES = ("torch", "trtllm")                  # what hosts the Dual-AR decode loop in dual_ar
PYTHON_CODECS = ("torch", "onnx")               # codec_decoder as a python-backend model
TRITON_CODECS = ("tensorrt", "onnxruntime")     # codec_decoder served by a Triton backend (GPU)
FILE_NAME = "serving.yaml"


@dataclass(frozen=True)
class ServingConfig:
    checkpoint: str                          # upstream-format checkpoint directory (tokenizer, codec, weights)
    voices_dir: str                          # registered voices (created if missing)
    profile: str = "cpu"
    device: str = "cpu"
    dtype: str = "float32"                   # slow/fast AR weights
    runtime: str = "torch"
    trtllm_dir: str | None = None            # converted model directory (runtime trtllm)
    trtllm_settings: str | None = None       # LLM-API settings YAML (runtime trtllm); None: the package's
    codec_runtime: str = "torch"
    codec_decoder_path: str | None = None    # .onnx (onnx, onnxruntime) or .plan (tensorrt)
    codec_encoder_onnx: str | None = None    # reference encoding with ONNX Runtime; None: torch codec
    threads: int = 0                         # intra-op threads of each model process; 0: library default
    max_text_bytes: int = 4096
    max_reference_seconds: float = 30.0
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> "ServingConfig":
        def one_of(name: str, choices: tuple[str, ...]) -> None:
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {list(choices)}, got {getattr(self, name)!r}")

        one_of("profile", PROFILES)
        one_of("runtime", RUNTIMES)
        one_of("codec_runtime", PYTHON_CODECS + TRITON_CODECS)
        if self.profile == "cpu":
            for name, want in (("device", "cpu"), ("runtime", "torch")):
                if getattr(self, name) != want:
                    raise ValueError(f"{name}: the cpu profile needs {want!r}, got {getattr(self, name)!r}")
            one_of("codec_runtime", PYTHON_CODECS)
        if self.runtime == "trtllm" and not self.trtllm_dir:
            raise ValueError("trtllm_dir: required with runtime 'trtllm'")
        if self.codec_runtime != "torch" and not self.codec_decoder_path:
            raise ValueError(f"codec_decoder_path: required with codec_runtime {self.codec_runtime!r}")
        for name in ("threads", "max_text_bytes"):
            if getattr(self, name) < (0 if name == "threads" else 1):
                raise ValueError(f"{name}: out of range, got {getattr(self, name)}")
        if not self.max_reference_seconds > 0:
            raise ValueError(f"max_reference_seconds: must be > 0, got {self.max_reference_seconds}")
        self.engine.chunk_plan.validate(self.engine.max_frames)
        return self

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "ServingConfig":
        return _build(cls, data, "").validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "ServingConfig":
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read the serving config ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        return cls.from_dict(data)

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


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls, data: dict, where: str):
    """Instantiate dataclass ``cls`` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise ValueError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(f"{where}{key}: unknown setting")
    return cls(**{k: _coerce(v, hints[k], f"{where}{k}") for k, v in data.items()})


def _coerce(value, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{where}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
