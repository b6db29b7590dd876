"""The TensorRT-LLM arguments of the dual_ar engine (``llm_api.yaml``) as typed dataclasses, and the
``LLM(...)`` kwargs they give together with the engine's limits.

The YAML is the one source of these arguments (the dataclasses have no defaults). The engine's
limits (``max_active`` = the LLM's ``max_batch_size``, prompt and frame limits = ``max_seq_len``,
queue, chunk plan, cancellation checks) come from the serving config's ``engine`` block, as for the
torch engine, and the KV pool's size from the memory plan (``MemoryPlan.trtllm_kv_cache``: the
serving config's ``kv_memory_fraction`` as ``free_gpu_memory_fraction``, and ``max_tokens`` = slots x
tokens per slot). Knobs the Dual-AR model requires are fixed here, not configurable: the engine's
sampler only has to take the one token the model leaves finite, and the worker must share a process
with the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.config import EngineConfig
from ..typed_settings import build, read_yaml

DEFAULT_PATH = Path(__file__).with_name("llm_api.yaml")
SLOT_MARGIN = 2  # slots per max_batch_size: a finished request's slot is freed a step after a new one may start


@dataclass(frozen=True)
class KvCacheSettings:
    enable_block_reuse: bool
    tokens_per_block: int


@dataclass(frozen=True)
class CudaGraphSettings:
    batch_sizes: tuple[int, ...]
    enable_padding: bool


@dataclass(frozen=True)
class TrtllmSettings:
    max_num_tokens: int
    tensor_parallel_size: int
    enable_chunked_prefill: bool
    disable_overlap_scheduler: bool
    kv_cache: KvCacheSettings
    cuda_graph: CudaGraphSettings | None

    def validate(self, engine: EngineConfig) -> "TrtllmSettings":
        if self.max_num_tokens < 1:
            raise ValueError("max_num_tokens: must be >= 1")
        if self.tensor_parallel_size != 1:   # the one place that knows; lift it when the model runs under MPI
            raise ValueError(f"tensor_parallel_size: {self.tensor_parallel_size} needs TensorRT-LLM's multi-process "
                             "(MPI) workers, one per rank, and the Fish S2 model runs only in the single-process "
                             "worker (its model class and slot manager live in the dual_ar process); only 1 is "
                             "supported. For more GPUs use one engine per GPU (repository --gpus N)")
        kv = self.kv_cache
        if kv.tokens_per_block < 1 or kv.tokens_per_block & (kv.tokens_per_block - 1):
            raise ValueError(f"kv_cache.tokens_per_block: must be a power of two, got {kv.tokens_per_block}")
        if self.cuda_graph is not None and (not self.cuda_graph.batch_sizes or min(self.cuda_graph.batch_sizes) < 1):
            raise ValueError("cuda_graph.batch_sizes: must be a non-empty list of sizes >= 1")
        if not self.enable_chunked_prefill and engine.max_prompt_tokens > self.max_num_tokens:
            raise ValueError(f"engine.max_prompt_tokens ({engine.max_prompt_tokens}) exceeds max_num_tokens "
                             f"({self.max_num_tokens}) without chunked prefill")
        return self

    @staticmethod
    def n_slots(engine: EngineConfig) -> int:
        """Per-request state slots of the model (:mod:`fish_s2.trtllm.state`)."""
        return SLOT_MARGIN * engine.max_active

    def llm_kwargs(self, engine: EngineConfig, kv_budget: dict) -> dict:
        """``LLM(model_dir, **kwargs)`` arguments as plain data (tensorrt_llm config objects are built
        from it by :meth:`build_llm_kwargs`); ``kv_budget``: ``free_gpu_memory_fraction`` and
        ``max_tokens``, the ``kv_cache`` of :meth:`fish_s2.memory_plan.MemoryPlan.trtllm_kv_cache`."""
        kv = self.kv_cache
        graphs = None
        if self.cuda_graph is not None:
            sizes = sorted({s for s in self.cuda_graph.batch_sizes if s <= engine.max_active} | {engine.max_active})
            graphs = {"batch_sizes": sizes, "enable_padding": self.cuda_graph.enable_padding}
        return {
            "skip_tokenizer_init": True,        # prompts arrive as token ids; outputs are never detokenized
            "max_batch_size": engine.max_active,
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_num_tokens": self.max_num_tokens,
            "max_seq_len": engine.max_seq_len,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "disable_overlap_scheduler": self.disable_overlap_scheduler,
            "kv_cache_config": {"enable_block_reuse": kv.enable_block_reuse, "tokens_per_block": kv.tokens_per_block,
                                "free_gpu_memory_fraction": kv_budget["free_gpu_memory_fraction"],
                                "max_tokens": kv_budget["max_tokens"]},
            "cuda_graph_config": graphs,
            "sampler_type": "TorchSampler",     # greedy pick of the one finite logit the model returns
            # never pause a request: a resumed one would be re-prefilled without its prompt codes
            "scheduler_config": {"capacity_scheduler_policy": "GUARANTEED_NO_EVICT"},
        }

    def build_llm_kwargs(self, engine: EngineConfig, kv_budget: dict) -> dict:
        """:meth:`llm_kwargs` with the tensorrt_llm config objects (imports tensorrt_llm)."""
        from tensorrt_llm.llmapi import CapacitySchedulerPolicy, CudaGraphConfig, KvCacheConfig, SchedulerConfig

        kw = self.llm_kwargs(engine, kv_budget)
        kw["kv_cache_config"] = KvCacheConfig(**kw["kv_cache_config"])
        policy = kw["scheduler_config"]["capacity_scheduler_policy"]
        kw["scheduler_config"] = SchedulerConfig(capacity_scheduler_policy=CapacitySchedulerPolicy[policy])
        if kw["cuda_graph_config"] is not None:
            kw["cuda_graph_config"] = CudaGraphConfig(**kw["cuda_graph_config"])
        return kw


def settings_from_dict(data: dict) -> TrtllmSettings:
    return build(TrtllmSettings, data)


def load_trtllm_settings(path: str | Path = DEFAULT_PATH) -> TrtllmSettings:
    try:
        return settings_from_dict(read_yaml(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
