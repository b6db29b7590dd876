"""A CPU stand-in for TensorRT-LLM's PyTorch-backend executor, for testing fish_s2.trtllm without it.

It follows the executor behaviour documented in /work/shared/spec/trtllm-pytorch-backend.md:
context requests first, then generation requests, then CUDA-graph padding rows (dummy requests);
chunked prefill under a token budget; resource managers' ``prepare_resources`` before every forward
and ``free_resources`` on finish and abort; the model's per-sequence logits sampled greedily (the
model leaves one finite logit); stop on ``end_id`` or ``max_tokens``; additional outputs
accumulated per request. The transformer is fish_s2's own SlowAR layers with one KV row per
request instead of TensorRT-LLM's paged attention. Everything else -- the input processor, the
slot manager, the embedding combine, the frame step, forced logits -- is the package's code.

Below the executor: stand-ins for the tensorrt_llm modules that ``fish_s2.trtllm.model.register()``
imports and for the loader's meta-device initialization, so the TensorRT-LLM model classes are
built, loaded and post-processed on the CPU the way TensorRT-LLM's loader does it.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fish_s2.layers import position_mask
from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.request import SamplingParams
from fish_s2.trtllm.model import CODES_OUTPUT, MM_KEY, DualARStep, DualARView, FishInputProcessor, step_forward
from fish_s2.trtllm.state import SlotManager, SlotState


class CpuTransformer:
    """SlowAR layers + final norm over packed sequences; ``segments`` = (kv row, positions) per sequence."""

    def __init__(self, slow, n_kv_rows: int, max_len: int):
        self.slow = slow
        self.cache = slow.new_cache(n_kv_rows, max_len)

    def __call__(self, x: torch.Tensor, segments) -> torch.Tensor:
        out, a = [], 0
        for row, pos in segments:
            h, input_pos = x[a:a + len(pos)][None], pos[None]
            kv_len = int(pos.max()) + 1
            rope, mask = self.slow.rope[input_pos], position_mask(input_pos, kv_len)
            for layer, cache in zip(self.slow.layers, self.cache):
                h = layer(h, rope, mask, input_pos, slice(row, row + 1), kv_len, cache)
            out.append(self.slow.norm(h)[0])
            a += len(pos)
        return torch.cat(out)


@dataclass
class FakeRequest:
    py_request_id: int
    prompt_ids: list[int]
    mm: dict
    max_tokens: int
    end_id: int
    kv_row: int
    prefilled: int = 0
    is_last_context_chunk: bool = False
    tokens: list[int] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # requested additional outputs, per step
    finish_reason: str | None = None
    aborted: bool = False


class FakeExecutor:
    """Steps the Dual-AR model like the PyTorch backend's executor loop (one ``step()`` = one forward)."""

    def __init__(self, model, max_batch: int = 4, max_num_tokens: int = 64, chunk: int | None = None,
                 graph_sizes=(1, 2, 4), max_len: int = 512, n_slots: int | None = None):
        cfg = model.cfg
        self.cfg, self.max_num_tokens, self.chunk, self.graph_sizes = cfg, max_num_tokens, chunk, graph_sizes
        self.max_rows = max(max_batch, *graph_sizes)
        self.manager = SlotManager(SlotState(n_slots or 2 * max_batch, self.max_rows, cfg.num_codebooks))
        self.step_ = DualARStep(DualARView(cfg, model.slow, model.fast), self.manager, cfg.vocab_size)
        self.transformer = CpuTransformer(model.slow, 2 * max_batch + 1, max_len)
        self.dummy_row = 2 * max_batch  # KV row of padding dummies
        self.processor = FishInputProcessor()
        self.requests: dict[int, FakeRequest] = {}
        self._free_rows = list(range(2 * max_batch))
        self._next_id = 100
        self.forwards: list[dict] = []  # per forward: n_context, n_rows, n_pad

    def add(self, inputs: dict, sampling_params) -> FakeRequest:
        ids, extra = self.processor(inputs, sampling_params)
        assert sampling_params.top_k == 1 and CODES_OUTPUT in sampling_params.additional_model_outputs
        req = FakeRequest(self._next_id, ids, extra["multimodal_data"][MM_KEY], sampling_params.max_tokens,
                          sampling_params.end_id, self._free_rows.pop(),
                          outputs={name: [] for name in sampling_params.additional_model_outputs})
        self._next_id += 1
        self.requests[req.py_request_id] = req
        return req

    def abort(self, req: FakeRequest) -> None:
        req.aborted = True

    @torch.inference_mode()
    def step(self) -> list[FakeRequest]:
        """Run one forward; returns the requests that produced a token or finished."""
        touched = []
        for req in [r for r in self.requests.values() if r.aborted and r.finish_reason is None]:
            req.finish_reason = "cancelled"
            touched.append(req)
        for req in [r for r in self.requests.values() if r.finish_reason is not None]:
            self.manager.free_resources(req)
            self._free_rows.append(req.kv_row)
            del self.requests[req.py_request_id]
        gen = [r for r in self.requests.values() if r.prefilled == len(r.prompt_ids)]
        budget = self.max_num_tokens - len(gen)
        ctx, lengths = [], []
        for r in self.requests.values():
            left = len(r.prompt_ids) - r.prefilled
            if left and budget > 0:
                n = min(left, budget, self.chunk or left)
                r.is_last_context_chunk = n == left
                ctx.append(r)
                lengths.append(n)
                budget -= n
        if not ctx and not gen:
            return touched
        # decode-only batches run as CUDA graphs padded to a captured size with dummy requests
        n_pad = 0 if ctx else next(s for s in self.graph_sizes if s >= len(gen)) - len(gen)
        # as in PyExecutor._executor_loop_overlap: outside the per-step error handling, so it must not raise
        self.manager.prepare_resources(SimpleNamespace(context_requests=ctx, generation_requests=gen))
        dummies = [SimpleNamespace(py_request_id=-1 - i) for i in range(n_pad)]
        self.manager.check_rows([r.py_request_id for r in ctx + gen + dummies])

        ids, segments = [], []
        for r, n in zip(ctx, lengths):
            ids += r.prompt_ids[r.prefilled:r.prefilled + n]
            segments.append((r.kv_row, torch.arange(r.prefilled, r.prefilled + n)))
        for r in gen:
            ids.append(r.tokens[-1])
            segments.append((r.kv_row, torch.tensor([len(r.prompt_ids) + len(r.tokens) - 1])))
        for _ in dummies:
            ids.append(0)
            segments.append((self.dummy_row, torch.tensor([0])))
        n_ctx, n_rows = len(ctx), len(ctx) + len(gen) + len(dummies)
        codes = (self.step_.start_context(n_ctx, [r.mm["prompt"] for r in ctx], [r.prefilled for r in ctx], lengths,
                                          [r.mm["sampling"] for r in ctx], [r.mm["key"] for r in ctx])
                 if ctx else self.manager.state.last_codes[:0])
        seq_lens = torch.tensor([len(p) for _, p in segments])
        out = step_forward(self.step_, lambda x: self.transformer(x, segments), torch.tensor(ids, dtype=torch.int32),
                           n_rows, n_ctx, codes, seq_lens.cumsum(0) - 1)
        self.forwards.append({"n_context": n_ctx, "n_rows": n_rows, "n_pad": n_pad})
        logits = out["logits"]
        assert logits.shape == (n_rows, self.cfg.vocab_size) and (torch.isfinite(logits).sum(1) == 1).all()
        sampled = logits.argmax(-1)
        for row, r in enumerate(ctx + gen):
            if row < n_ctx:
                r.prefilled += lengths[row]
                if not r.is_last_context_chunk:
                    continue
            r.tokens.append(int(sampled[row]))
            r.codes.append(out[CODES_OUTPUT][row][None].clone())  # [beam=1, num_codebooks]
            for name, rows in r.outputs.items():
                rows.append(out[name][row][None].clone())
            if r.tokens[-1] == r.end_id:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.max_tokens:
                r.finish_reason = "length"
            touched.append(r)
        return touched

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.requests:
                return
            self.step()
        raise AssertionError("requests did not finish")


class FakeResult:
    """GenerationResult stand-in: async iteration over streamed outputs, ``abort()``."""

    def __init__(self, llm: "FakeLLM", req: FakeRequest):
        self._llm, self.req = llm, req
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.finished = False

    def push(self, output) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    def abort(self) -> None:
        with self._llm.cond:
            self._llm.executor.abort(self.req)
            self._llm.cond.notify()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self.finished = out.finished
        return out


class FakeLLM:
    """The LLM-API surface TrtllmEngine uses, over a FakeExecutor stepped by its own thread."""

    def __init__(self, executor: FakeExecutor, step_delay: float = 0.0):
        self.executor, self.step_delay = executor, step_delay
        self.cond = threading.Condition()
        self.results: dict[int, FakeResult] = {}
        self.salts: list[str] = []
        self.sampling_params: list = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def generate_async(self, inputs, sampling_params, streaming=False, cache_salt=None):
        assert streaming and sampling_params.detokenize is False and sampling_params.n == 1
        self.salts.append(cache_salt)
        self.sampling_params.append(sampling_params)
        with self.cond:
            req = self.executor.add(inputs, sampling_params)
            res = self.results[req.py_request_id] = FakeResult(self, req)
            self.cond.notify()
        return res

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.executor.requests or self._stop):
                    self.cond.wait()
                if self._stop:
                    return
                touched = self.executor.step()
            for r in touched:
                codes = torch.stack(r.codes) if r.codes else torch.zeros(0, 1, self.executor.cfg.num_codebooks)
                out = SimpleNamespace(token_ids=list(r.tokens), finish_reason=r.finish_reason,
                                      additional_generation_outputs={CODES_OUTPUT: codes})
                self.results[r.py_request_id].push(SimpleNamespace(outputs=[out], finished=r.finish_reason is not None))
            if self.step_delay:
                threading.Event().wait(self.step_delay)

    def shutdown(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        self._thread.join(5)


def eos_prone(model, factor: float = 3.0):
    """A copy of a tiny DualAR whose <|im_end|> logit is larger, so some requests end on it within a
    few frames (the tiny checkpoint rarely stops by itself)."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        model.slow.embeddings.weight[model.cfg.eos_id] *= factor
    return model


def fake_sampling_params(**kw):
    return SimpleNamespace(**kw)


def sample_prompts(ck):
    """Three prompts (the first and last with the same voice, the middle one without) that, with
    SAMPLE_PARAMS on an eos_prone model, emit <|im_end|> as frame 4 and 6 and run past 8 frames (the middle)."""
    b = PromptBuilder(ck.tokenizer, ck.config.num_codebooks)
    g = torch.Generator().manual_seed(5)
    voice = [Reference("Good morning.", torch.randint(0, 1024, (ck.config.num_codebooks, 12), generator=g))]
    return [torch.cat([b.system(voice if i != 1 else []), b.user(t), b.assistant_start()], dim=1)
            for i, t in enumerate(["Hello there.", "A somewhat longer sentence to speak, please.", "Numbers: 1234."])]


SAMPLE_PARAMS = [SamplingParams(temperature=0.8, top_p=0.8, seed=1), SamplingParams(temperature=0.0, seed=0),
                 SamplingParams(temperature=1.0, top_p=0.95, top_k=20, seed=7)]


# ---------------------------------------------------------------------------- tensorrt_llm module stand-ins
# What fish_s2.trtllm.model.register() imports, with the constructor signatures it calls as TensorRT-LLM
# 1.2 declares them (keyword-only where TensorRT-LLM's are; see /work/shared/spec/trtllm-pytorch-backend.md),
# so a wrong keyword fails here as it would there. They build parameters with torch.empty like the real
# modules (so the meta-init stand-in below puts them on the meta device) and compute nothing.


class FakeMetaInitMode(TorchDispatchMode):
    """TensorRT-LLM's MetaInitMode as of 1.2 (modeling_utils.py): ``empty``/``empty_like`` allocate on the
    meta device; any other op touching a meta tensor, except the random initializers, raises (the loader
    then falls back to a slow regular init on the host)."""

    aten = torch.ops.aten
    init_ops = {aten.empty.memory_format, aten.empty_like.default}
    random_init_ops = {aten.normal_.default, aten.uniform_.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.init_ops:
            return func(*args, **{**kwargs, "device": torch.device("meta")})
        leaves = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func not in self.random_init_ops and any(t.is_meta for t in leaves):
            raise RuntimeError(f"MetaInitException: meta tensor used in unsupported function {func}")
        return func(*args, **kwargs)


def materialize(module) -> None:
    """The loader's step after meta init: every meta tensor becomes an uninitialized one on the real
    device (NaN here, so a buffer nobody recomputed shows)."""
    module._apply(lambda t: torch.full(t.shape, float("nan"), dtype=t.dtype) if t.is_meta and t.is_floating_point()
                  else torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t)


def fake_tensorrt_llm_modules() -> dict:
    """sys.modules entries standing in for the tensorrt_llm modules register() imports."""
    import enum
    from types import ModuleType

    from torch import nn

    def empty(*shape, dtype=None):
        return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

    class DecoderModel(nn.Module):
        def __init__(self, model_config):
            super().__init__()
            self.model_config = model_config
            self.dtype = model_config.pretrained_config.torch_dtype

    class DecoderModelForCausalLM(nn.Module):
        def __init__(self, model, *, config, hidden_size: int, vocab_size: int):
            super().__init__()
            self.model_config, self.model = config, model
            self.fake_loaded, self.fake_post_load_calls = {}, 0
            self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
            if config.pretrained_config.tie_word_embeddings:
                self.lm_head.weight = model.embed_tokens.weight

        def load_weights(self, weights: dict, weight_mapper=None, skip_modules: list = []):  # noqa: B006
            self.fake_loaded = {"names": sorted(weights), "skip_modules": list(skip_modules)}

        def post_load_weights(self):
            self.fake_post_load_calls += 1

    registry: dict = {}

    def register_auto_model(name: str):
        def deco(cls):
            registry[name] = cls
            return cls
        return deco

    class DecoderLayer(nn.Module):
        pass

    class TensorParallelMode(enum.Enum):
        COLUMN = 0
        ROW = 1

    class Embedding(nn.Module):
        def __init__(self, num_embeddings, embedding_dim, dtype=None, mapping=None, tensor_parallel_mode=None,
                     gather_output=False):
            super().__init__()
            self.weight = empty(num_embeddings, embedding_dim, dtype=dtype)

    class GatedMLP(nn.Module):
        def __init__(self, *, hidden_size, intermediate_size, bias, activation=None, dtype=None, config=None,
                     layer_idx=None):
            super().__init__()
            self.gate_up_proj = empty(2 * intermediate_size, hidden_size, dtype=dtype)
            self.down_proj = empty(hidden_size, intermediate_size, dtype=dtype)

    class RMSNorm(nn.Module):
        def __init__(self, *, hidden_size, eps, dtype=None):
            super().__init__()
            self.weight = empty(hidden_size, dtype=dtype)

    class QKNormRoPEAttention(nn.Module):
        def __init__(self, *, hidden_size, num_attention_heads, num_key_value_heads, max_position_embeddings, bias,
                     pos_embd_params=None, skip_rope=False, fuse_qk_norm_rope=True, layer_idx=None, dtype=None,
                     dense_bias=None, config, q_scaling=1.0, disable_deep_gemm=False, use_gemma_rms_norm=False,
                     attn_output_gate=None, is_qk_norm=True, reduce_output=True, rope_fusion=True):
            super().__init__()
            c = config.pretrained_config
            self.num_heads, self.num_key_value_heads, self.head_dim = num_attention_heads, num_key_value_heads, c.head_dim
            self.qkv_proj = empty((num_attention_heads + 2 * num_key_value_heads) * c.head_dim, hidden_size, dtype=dtype)
            self.o_proj = empty(hidden_size, num_attention_heads * c.head_dim, dtype=dtype)

    @dataclass
    class MultimodalPlaceholderMetadata:
        placeholder_map: dict | None = None

    processors: dict = {}

    def register_input_processor(processor_cls, model_type: str, placeholder_metadata=None):
        if placeholder_metadata is None:
            raise ValueError("placeholder_metadata is required")

        def deco(cls):
            processors[model_type] = processor_cls
            return cls
        return deco

    def module(name, **attrs):
        m = ModuleType(name)
        m.__dict__.update(attrs)
        return m

    mods = {
        "tensorrt_llm._torch.models.modeling_utils": module(
            "modeling_utils", DecoderModel=DecoderModel, DecoderModelForCausalLM=DecoderModelForCausalLM,
            register_auto_model=register_auto_model, MODEL_CLASS_MAPPING=registry),
        "tensorrt_llm._torch.modules.decoder_layer": module("decoder_layer", DecoderLayer=DecoderLayer),
        "tensorrt_llm._torch.modules.embedding": module("embedding", Embedding=Embedding),
        "tensorrt_llm._torch.modules.gated_mlp": module("gated_mlp", GatedMLP=GatedMLP),
        "tensorrt_llm._torch.modules.linear": module("linear", TensorParallelMode=TensorParallelMode),
        "tensorrt_llm._torch.modules.qk_norm_attention": module("qk_norm_attention",
                                                                QKNormRoPEAttention=QKNormRoPEAttention),
        "tensorrt_llm._torch.modules.rms_norm": module("rms_norm", RMSNorm=RMSNorm),
        "tensorrt_llm.inputs.registry": module("registry", MultimodalPlaceholderMetadata=MultimodalPlaceholderMetadata,
                                               register_input_processor=register_input_processor,
                                               PROCESSORS=processors),
    }
    for parent in ("tensorrt_llm", "tensorrt_llm._torch", "tensorrt_llm._torch.models", "tensorrt_llm._torch.modules",
                   "tensorrt_llm.inputs"):
        mods[parent] = module(parent)
    return mods
