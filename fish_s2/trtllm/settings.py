"""The LLM-API settings YAML (``llm_api.yaml``) as typed dataclasses, and the ``LLM(...)`` kwargs it gives.

The YAML has the LLM-API knobs this deployment depends on (batching, paged KV with block reuse,
CUDA graphs), the engine limits shared with :class:`fish_s2.engine.EngineConfig`, and a
``triton_config`` block for the Triton model (as in TensorRT-LLM's llmapi Triton model). Knobs that
the Dual-AR model requires are fixed here, not configurable: the engine's sampler only has to take
the one token the model leaves finite, and the worker must share a process with the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..engine import EngineConfig
from ..streaming import ChunkPlan

DEFAULT_PATH = Path(__file__).with_name("llm_api.yaml")
ENGINE_KEYS = {"max_queued", "max_prompt_tokens", "max_frames", "chunk_plan"}  # EngineConfig fields TrtllmEngine uses
SLOT_MARGIN = 2  # slots per max_batch_size: a finished request's slot is freed a step after a new one may start


@dataclass(frozen=True)
class KvCacheSettings:
    enable_block_reuse: bool = True
    tokens_per_block: int = 16
    free_gpu_memory_fraction: float = 0.85
    max_tokens: int | None = None


@dataclass(frozen=True)
class CudaGraphSettings:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    enable_padding: bool = True


@dataclass(frozen=True)
class TritonSettings:
    decoupled: bool = True
    cancellation_check_period_ms: int = 100


@dataclass(frozen=True)
class TrtllmSettings:
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    enable_chunked_prefill: bool = False
    disable_overlap_scheduler: bool = False
    kv_cache: KvCacheSettings = field(default_factory=KvCacheSettings)
    cuda_graph: CudaGraphSettings | None = field(default_factory=CudaGraphSettings)
    engine: EngineConfig = field(default_factory=EngineConfig)
    triton_config: TritonSettings = field(default_factory=TritonSettings)

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def n_slots(self) -> int:
        return SLOT_MARGIN * self.max_batch_size

    def validate(self, model_max_seq_len: int | None = None) -> "TrtllmSettings":
        for name in ("max_batch_size", "max_num_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        kv = self.kv_cache
        if kv.tokens_per_block < 1 or kv.tokens_per_block & (kv.tokens_per_block - 1):
            raise ValueError(f"kv_cache.tokens_per_block: must be a power of two, got {kv.tokens_per_block}")
        if not 0.0 < kv.free_gpu_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache.free_gpu_memory_fraction: must be in (0, 1], got {kv.free_gpu_memory_fraction}")
        if self.cuda_graph is not None and (not self.cuda_graph.batch_sizes or min(self.cuda_graph.batch_sizes) < 1):
            raise ValueError("cuda_graph.batch_sizes: must be a non-empty list of sizes >= 1")
        if not self.enable_chunked_prefill and self.engine.max_prompt_tokens > self.max_num_tokens:
            raise ValueError(f"engine.max_prompt_tokens ({self.engine.max_prompt_tokens}) exceeds max_num_tokens "
                             f"({self.max_num_tokens}) without chunked prefill")
        if self.engine.max_active != self.max_batch_size:
            raise ValueError("engine.max_active: derived from max_batch_size, do not set it")
        self.engine.validate(model_max_seq_len or self.max_seq_len)
        return self

    def llm_kwargs(self) -> dict:
        """``LLM(model_dir, **kwargs)`` arguments as plain data (tensorrt_llm config objects are built
        from it by :meth:`build_llm_kwargs`)."""
        kv = self.kv_cache
        graphs = None
        if self.cuda_graph is not None:
            sizes = sorted({s for s in self.cuda_graph.batch_sizes if s <= self.max_batch_size} | {self.max_batch_size})
            graphs = {"batch_sizes": sizes, "enable_padding": self.cuda_graph.enable_padding}
        return {
            "skip_tokenizer_init": True,        # prompts arrive as token ids; outputs are never detokenized
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "max_seq_len": self.max_seq_len,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "disable_overlap_scheduler": self.disable_overlap_scheduler,
            "kv_cache_config": {"enable_block_reuse": kv.enable_block_reuse, "tokens_per_block": kv.tokens_per_block,
                                "free_gpu_memory_fraction": kv.free_gpu_memory_fraction, "max_tokens": kv.max_tokens},
            "cuda_graph_config": graphs,
            "sampler_type": "TorchSampler",     # greedy pick of the one finite logit the model returns
        }

    def build_llm_kwargs(self) -> dict:
        """:meth:`llm_kwargs` with the tensorrt_llm config objects (imports tensorrt_llm)."""
        from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig

        kw = self.llm_kwargs()
        kw["kv_cache_config"] = KvCacheConfig(**kw["kv_cache_config"])
        if kw["cuda_graph_config"] is not None:
            kw["cuda_graph_config"] = CudaGraphConfig(**kw["cuda_graph_config"])
        return kw


def _typed(cls, data, where: str):
    """Build dataclass ``cls`` from a YAML mapping; unknown keys are errors naming them."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(names)})")
    return cls(**data)


def settings_from_dict(data: dict) -> TrtllmSettings:
    data = dict(data or {})
    sub = {}
    for key, cls in (("kv_cache", KvCacheSettings), ("triton_config", TritonSettings)):
        if key in data:
            sub[key] = _typed(cls, data.pop(key), key) or cls()
    if "cuda_graph" in data:
        cg = data.pop("cuda_graph")
        sub["cuda_graph"] = None if cg is None else _typed(CudaGraphSettings, {
            **cg, **({"batch_sizes": tuple(cg["batch_sizes"])} if "batch_sizes" in cg else {})}, "cuda_graph")
    engine = dict(data.pop("engine", None) or {})
    unknown = sorted(set(engine) - ENGINE_KEYS)
    if unknown:
        raise ValueError(f"engine: unknown keys {unknown} (known: {sorted(ENGINE_KEYS)}; max_active is "
                         f"max_batch_size)")
    if "chunk_plan" in engine:
        engine["chunk_plan"] = _typed(ChunkPlan, engine["chunk_plan"], "engine.chunk_plan")
    top = _typed(TrtllmSettings, data, "llm_api.yaml")
    engine = _typed(EngineConfig, {**engine, "max_active": top.max_batch_size}, "engine")
    return dataclasses.replace(top, engine=engine, **sub).validate()


def load_settings(path: str | Path = DEFAULT_PATH) -> TrtllmSettings:
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    try:
        return settings_from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
