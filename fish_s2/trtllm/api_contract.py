"""What fish_s2.trtllm relies on in TensorRT-LLM (pinned 1.2.1), as a table checked against the installed package.

Every entry names the object, the parameters our calls pass and the attributes or fields we read or set,
and the file whose code relies on it (``used_in``, with ``needle``: text of that file making the use;
the tests keep the two in step). :func:`check` resolves each entry with ``importlib`` / ``inspect`` --
nothing is called -- and reports what is missing. build/selfcheck.py runs it inside the image;
``--dry-run`` prints the table without tensorrt_llm.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Expect:
    target: str                    # "module:Qualified.name"
    used_in: str                   # file (relative to the repository) whose code relies on it
    needle: str                    # text in that file that makes the use
    params: tuple[str, ...] = ()   # parameter names our calls pass (of the callable, or a class's __init__)
    attrs: tuple[str, ...] = ()    # attributes / fields read or set
    settable: tuple[str, ...] = ()  # attributes assigned to: a field, or a property with a setter
    optional: bool = False         # absence is reported, not a failure (our code works either way)
    pending: bool = False          # needed by a change not made yet in ``used_in`` (its needle is not there yet)
    why: str = ""


_M = "fish_s2/trtllm/model.py"
_E = "fish_s2/trtllm/engine.py"
_S = "fish_s2/trtllm/settings.py"
_ST = "fish_s2/trtllm/state.py"
_MU = "tensorrt_llm._torch.models.modeling_utils"

EXPECTED: tuple[Expect, ...] = (
    Expect("tensorrt_llm:LLM.generate_async", _E, "generate_async(", params=("inputs", "sampling_params", "streaming",
           "cache_salt"), why="one streamed request per synthesis; KV reuse keyed per voice by cache_salt"),
    Expect("tensorrt_llm:SamplingParams", _E, "additional_model_outputs=",
           attrs=("max_tokens", "end_id", "pad_id", "top_k", "detokenize", "n", "additional_model_outputs"),
           why="greedy pick of the one finite logit; the frame's codes as an additional output"),
    Expect("tensorrt_llm.llmapi.llm_args:TorchLlmArgs", _E, "extra_resource_managers",
           attrs=("skip_tokenizer_init", "max_batch_size", "max_num_tokens", "max_seq_len", "enable_chunked_prefill",
                  "disable_overlap_scheduler", "kv_cache_config", "cuda_graph_config", "sampler_type"),
           settable=("extra_resource_managers",), why="the LLM kwargs of settings.py; the slot manager installed"),
    Expect("tensorrt_llm.llmapi:KvCacheConfig", _S, "KvCacheConfig(",
           attrs=("enable_block_reuse", "tokens_per_block", "free_gpu_memory_fraction", "max_tokens")),
    Expect("tensorrt_llm.llmapi:CudaGraphConfig", _S, "CudaGraphConfig(", attrs=("batch_sizes", "enable_padding")),
    Expect("tensorrt_llm.llmapi:SchedulerConfig", _S, "capacity_scheduler_policy", attrs=("capacity_scheduler_policy",),
           why="pin GUARANTEED_NO_EVICT: a paused request is re-prefilled without its prompt codes"),
    Expect("tensorrt_llm.llmapi:CapacitySchedulerPolicy", _S, "GUARANTEED_NO_EVICT", attrs=("GUARANTEED_NO_EVICT",)),
    Expect("tensorrt_llm.llmapi.llm_args:TorchLlmArgs", _S, "scheduler_config", attrs=("scheduler_config",)),
    Expect(f"{_MU}:register_auto_model", _M, "@register_auto_model(ARCHITECTURE)", params=("name",)),
    Expect(f"{_MU}:DecoderModel", _M, "class FishS2Model(DecoderModel)", params=("model_config",)),
    Expect(f"{_MU}:DecoderModelForCausalLM", _M, "super().__init__(FishS2Model(model_config)",
           params=("model", "config", "hidden_size", "vocab_size"), attrs=("load_weights",)),
    Expect(f"{_MU}:DecoderModelForCausalLM.post_load_weights", _M, 'getattr(super(), "post_load_weights"',
           optional=True, why="run by our override when TensorRT-LLM defines it"),
    Expect("tensorrt_llm._torch.modules.qk_norm_attention:QKNormRoPEAttention", _M, "pos_embd_params=None, skip_rope=True",
           params=("hidden_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "bias",
                   "pos_embd_params", "skip_rope", "fuse_qk_norm_rope", "layer_idx", "dtype", "dense_bias", "config"),
           attrs=("apply_rope",), why="unfused qk-norm; our bf16-rounded RoPE applied in apply_rope"),
    Expect("tensorrt_llm._torch.modules.embedding:Embedding", _M, "Embedding(c.vocab_size",
           params=("dtype", "mapping", "tensor_parallel_mode", "gather_output")),
    Expect("tensorrt_llm._torch.modules.gated_mlp:GatedMLP", _M, "GatedMLP(",
           params=("hidden_size", "intermediate_size", "bias", "dtype", "config")),
    Expect("tensorrt_llm._torch.modules.rms_norm:RMSNorm", _M, "RMSNorm(hidden_size=", params=("hidden_size", "eps", "dtype")),
    Expect("tensorrt_llm._torch.modules.linear:TensorParallelMode", _M, "TensorParallelMode.COLUMN", attrs=("COLUMN",)),
    Expect("tensorrt_llm._torch.modules.decoder_layer:DecoderLayer", _M, "class FishDecoderLayer(DecoderLayer)"),
    Expect("tensorrt_llm.inputs.registry:register_input_processor", _M, "@register_input_processor(",
           params=("model_type", "placeholder_metadata")),
    Expect("tensorrt_llm.inputs.registry:MultimodalPlaceholderMetadata", _M, "MultimodalPlaceholderMetadata(",
           params=("placeholder_map",)),
    Expect("tensorrt_llm.inputs.multimodal:MultimodalParams", _M, "p.multimodal_data[MM_KEY]", attrs=("multimodal_data",)),
    Expect("tensorrt_llm._torch.attention_backend.interface:AttentionMetadata", _M, "attn_metadata.seq_lens_cuda",
           attrs=("num_contexts", "num_seqs", "seq_lens", "seq_lens_cuda", "request_ids", "kv_cache_params")),
    Expect("tensorrt_llm._torch.pyexecutor.llm_request:LlmRequest", _ST, "is_last_context_chunk",
           attrs=("is_last_context_chunk",)),
    Expect("tensorrt_llm._torch.pyexecutor.handle_additional_outputs:HandleAdditionalOutputs.__call__", _M,
           "CODES_OUTPUT", params=("context_requests", "generation_requests", "outputs", "beam_width",
                                   "num_context_tokens"),
           why="the per-sequence fish_codes rows go to each request's additional generation outputs"),
    Expect("tensorrt_llm._torch.pyexecutor.resource_manager:BaseResourceManager", _ST, "def prepare_resources",
           why="SlotManager implements every abstract method (checked separately)"),
)


def resolve(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _has(obj, name: str) -> bool:
    fields = {**getattr(obj, "model_fields", {}), **getattr(obj, "__dataclass_fields__", {})}
    return name in fields or hasattr(obj, name)


def _settable(obj, name: str) -> bool:
    if name in getattr(obj, "model_fields", {}) or name in getattr(obj, "__dataclass_fields__", {}):
        return True
    attr = inspect.getattr_static(obj, name, None)
    return isinstance(attr, property) and attr.fset is not None


def check_one(e: Expect) -> dict:
    """{"target", "ok", "missing": [...], "signature"} for one entry (never raises)."""
    row = {"target": e.target, "ok": False, "missing": [], "optional": e.optional}
    try:
        obj = resolve(e.target)
    except (ImportError, AttributeError) as err:
        row["missing"] = [f"{type(err).__name__}: {err}"]
        row["ok"] = e.optional
        return row
    if e.params:
        fn = obj.__init__ if inspect.isclass(obj) else obj
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as err:
            row["missing"].append(f"no signature: {err}")
        else:
            row["signature"] = str(sig)
            kinds = {p.kind for p in sig.parameters.values()}
            if inspect.Parameter.VAR_KEYWORD not in kinds:
                row["missing"] += [f"param {p}" for p in e.params if p not in sig.parameters]
    row["missing"] += [f"attr {a}" for a in e.attrs if not _has(obj, a)]
    row["missing"] += [f"settable {a}" for a in e.settable if not _settable(obj, a)]
    row["ok"] = not row["missing"]
    return row


def resource_manager_gaps(manager_cls=None) -> list[str]:
    """Abstract methods of TensorRT-LLM's BaseResourceManager that our SlotManager does not define."""
    from .state import SlotManager

    base = resolve("tensorrt_llm._torch.pyexecutor.resource_manager:BaseResourceManager")
    names = getattr(base, "__abstractmethods__", frozenset()) or {
        n for n, v in vars(base).items() if callable(v) and not n.startswith("_")}
    return sorted(n for n in names if not callable(getattr(manager_cls or SlotManager, n, None)))


def check() -> dict:
    """Every entry checked against the installed tensorrt_llm; "ok" is False if a required one fails."""
    rows = [check_one(e) for e in EXPECTED]
    try:
        gaps = resource_manager_gaps()
    except (ImportError, AttributeError) as err:
        gaps = [f"{type(err).__name__}: {err}"]
    ok = all(r["ok"] for r in rows) and not gaps
    return {"ok": ok, "entries": rows, "resource_manager_gaps": gaps}


def table() -> list[dict]:
    """The expected table as data (what --dry-run prints)."""
    return [{"target": e.target, "params": list(e.params), "attrs": list(e.attrs) + list(e.settable),
             "optional": e.optional, "used_in": e.used_in, **({"pending": True} if e.pending else {}),
             **({"why": e.why} if e.why else {})} for e in EXPECTED]
