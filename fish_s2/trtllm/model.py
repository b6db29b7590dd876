"""The S2-Pro Dual-AR as an out-of-tree model of TensorRT-LLM's PyTorch backend (pinned 1.2.1).

One engine forward = one Dual-AR frame per sequence. Around TensorRT-LLM's paged-KV Qwen3 layers
the model (1) builds input embeddings from token ids *and* each position's 10 codes (prompt codes
arrive per request on the context phase; a generated frame's codes come from the request's slot),
(2) takes the final-norm hidden state of each sequence's last token, (3) runs the core library's
frame step (:func:`fish_s2.dual_ar.decode_frame`: main-token sampling with repetition-aware
resampling and per-request noise, then the fast AR over the codebooks), stores the frame in the
request's slot, and (4) returns logits that are -inf everywhere except the sampled main token, so
the engine's own (greedy) sampler picks exactly that token and its stop rules (``end_id`` =
<|im_end|>, ``max_tokens``) apply, plus the frame's codes as the additional output
``fish_codes``. A request the slot manager failed (:mod:`fish_s2.trtllm.state`) gets <|im_end|>
and codes all :data:`~fish_s2.trtllm.state.FAILED_CODE` instead: the engine ends it, and
:func:`failed_frames` tells its client.

Everything in this module above :func:`register` is plain torch and is exercised on CPU by the
tests with fish_s2's own transformer layers standing in for TensorRT-LLM's. :func:`register`
imports tensorrt_llm and defines the TensorRT-LLM classes; none of that has run on a GPU yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..checkpoint import _assign, check_coverage
from ..config import DualARConfig
from ..dual_ar import DualAR, decode_frame
from ..fast_ar import FastAR
from ..layers import apply_rope, rope_table
from ..request import SamplingParams
from ..slow_ar import SlowAR
from .hf_config import ARCHITECTURE, MODEL_TYPE
from .state import FAILED_CODE, SlotManager

CODES_OUTPUT = "fish_codes"   # additional_model_outputs name: the frame's codes, one row per sequence
HIDDEN_OUTPUT = "fish_hidden"  # ... and the final-norm hidden state each frame came from (for checks)
MM_KEY = "fish_s2"            # multi_modal_data key of the per-request tensors


# ---------------------------------------------------------------------------- request wire format

def request_inputs(prompt: Tensor, params: SamplingParams, noise_key: int) -> dict:
    """The ``generate_async`` input of one request: no text; token ids, prompt codes, sampling
    parameters and noise key travel as tensors in ``multi_modal_data`` (the only per-request tensor
    channel of the LLM API) and reach the model's forward on the context phase."""
    sampling = torch.tensor([params.temperature, params.top_p, params.top_k_used],
                            dtype=torch.float32)
    return {"prompt": "", "multi_modal_data": {MM_KEY: {
        "prompt": prompt.to(torch.long).contiguous(), "sampling": sampling,
        "key": torch.tensor([noise_key], dtype=torch.long)}}}


def failed_frames(codes: Tensor) -> Tensor:
    """Rows of ``fish_codes`` [..., num_codebooks] that mark a request the model failed (bool [...])."""
    return (codes == FAILED_CODE).all(dim=-1)


class FishInputProcessor:
    """TensorRT-LLM input processor for :func:`request_inputs`: token ids are row 0 of the prompt
    tensor; the tensors go on to the model unchanged. Hashing is off: KV reuse is keyed by
    ``cache_salt`` (see :func:`fish_s2.trtllm.engine.cache_salt`)."""

    multimodal_hashing_supported = False

    def __init__(self, model_path=None, model_config=None, tokenizer=None, trust_remote_code: bool = True):
        self.model_path, self.model_config, self.tokenizer = model_path, model_config, tokenizer

    def __call__(self, inputs, sampling_params) -> tuple[list[int], dict]:
        data = (inputs.get("multi_modal_data") or {}).get(MM_KEY)
        if not isinstance(data, dict) or not {"prompt", "sampling", "key"} <= set(data):
            raise ValueError(f"multi_modal_data: expected {{'{MM_KEY}': {{'prompt', 'sampling', 'key'}}}} "
                             f"(build it with fish_s2.trtllm.model.request_inputs)")
        prompt = data["prompt"]
        if not isinstance(prompt, Tensor) or prompt.ndim != 2 or prompt.shape[1] < 1:
            raise ValueError(f"multi_modal_data.{MM_KEY}.prompt: expected [rows, T], got "
                             f"{getattr(prompt, 'shape', prompt)}")
        return prompt[0].tolist(), {"multimodal_data": {MM_KEY: data}}


# ---------------------------------------------------------------------------- the frame step (plain torch)

def rope_neox(x: Tensor, table: Tensor) -> Tensor:
    """:func:`fish_s2.layers.apply_rope` for heads stored in NeoX order (the converter's layout).

    x [B, T, H, D] with pair i at (i, i + D/2); viewed as interleaved, rotated with the bf16 table in
    fp32 exactly as upstream, and viewed back."""
    d = x.shape[-1] // 2
    out = apply_rope(x.unflatten(-1, (2, d)).transpose(-1, -2).flatten(-2), table)
    return out.unflatten(-1, (d, 2)).transpose(-1, -2).flatten(-2)


class DualARView:
    """What :func:`decode_frame` reads from a :class:`DualAR`: the config, a slow AR's logit head
    (``slow``: anything with SlowAR's ``audio_logits``) and the fast AR."""

    draws_per_frame = DualAR.draws_per_frame

    def __init__(self, cfg: DualARConfig, slow, fast: FastAR):
        self.cfg, self.slow, self.fast = cfg, slow, fast


class DualARStep:
    """The Dual-AR work around the transformer in one engine forward, on packed batches laid out as
    TensorRT-LLM lays them out: context rows (any number of prompt tokens each) first, then
    generation rows (one token each), then padding rows. Row r reads slot ``row_read[r]``. The fast
    AR's codebook cache is this step's own (one row per batch row)."""

    def __init__(self, view: DualARView, slots: SlotManager, vocab_size: int):
        self.view, self.slots, self.vocab_size = view, slots, vocab_size
        self.audio_ids = view.slow.audio_token_ids()
        self.fast_cache = view.fast.new_cache(slots.state.max_rows)

    @property
    def state(self):
        return self.slots.state

    def start_context(self, n_context: int, prompts: Sequence[Tensor], starts: Sequence[int],
                      lengths: Sequence[int], sampling: Sequence[Tensor], keys: Sequence[Tensor]) -> Tensor:
        """Prompt codes [sum(lengths), num_codebooks] of this forward's context chunks, and reset the
        context rows' slots with their requests' sampling parameters (same for every chunk)."""
        if not len(prompts) == len(starts) == len(lengths) == len(sampling) == len(keys) == n_context:
            raise ValueError(f"context inputs for {len(prompts)} requests, batch has {n_context} context rows")
        p = torch.stack([s.to(self.state.device) for s in sampling])
        self.state.start(self.state.row_read[:n_context], p[:, 0], p[:, 1], p[:, 2].round().long(),
                         torch.cat([k.to(self.state.device) for k in keys]))
        return torch.cat([pr[1:, a:a + n].T for pr, a, n in zip(prompts, starts, lengths)]).to(self.state.device)

    def embed(self, input_ids: Tensor, n_rows: int, n_context: int, context_codes: Tensor) -> Tensor:
        """Input embeddings [N, dim] of the packed tokens (SlowAR's combine: token embedding, plus the
        scaled codebook sum at semantic positions). Generation rows take their slot's last codes."""
        gen = self.state.last_codes[self.state.row_read[n_context:n_rows]]
        codes = torch.cat([context_codes.to(gen.dtype), gen])
        inp = torch.cat([input_ids.to(torch.long)[None], codes.T])[None]
        return self.view.slow.embed(inp)[0]

    def frames(self, hidden: Tensor, n_rows: int, n_context: int) -> tuple[Tensor, Tensor]:
        """From each row's final-norm hidden state [n_rows, dim]: the frame step, stored in the slots;
        returns (logits [n_rows, vocab] forcing the main token, codes [n_rows, num_codebooks]). Rows of
        failed requests force <|im_end|> and return FAILED_CODE codes (their slot is scratch: what they
        store there is never read as a request's state)."""
        st = self.state
        if n_rows > st.max_rows:
            raise ValueError(f"batch of {n_rows} sequences, but the slot tables hold {st.max_rows} rows "
                             f"(max_batch_size of the settings the LLM was built with)")
        read, write = st.row_read[:n_rows], st.row_write[:n_rows]
        frame = decode_frame(self.view, hidden, st.sampling(read), st.frame_idx[read], st.window[read],
                             self.audio_ids, self.fast_cache, slice(0, n_rows))
        push = torch.arange(n_rows, device=hidden.device) >= n_context
        st.commit(read, write, frame, push)
        failed = st.row_fail[:n_rows].bool()
        main = torch.where(failed, self.view.cfg.eos_id, frame[:, 0])
        codes = torch.where(failed[:, None], FAILED_CODE, frame[:, 1:])
        logits = torch.full((n_rows, self.vocab_size), float("-inf"), device=hidden.device)
        logits.scatter_(1, main[:, None], 0.0)
        return logits, codes


def step_forward(step: DualARStep, transformer, input_ids: Tensor, n_rows: int, n_context: int,
                 context_codes: Tensor, last_token: Tensor) -> dict[str, Tensor]:
    """One engine forward around ``transformer`` (input embeddings [N, dim] -> final-norm hidden [N, dim]);
    ``last_token`` [n_rows] indexes each row's last packed token. Returns the model's output dict: the
    forcing logits, and per row the frame's codes and hidden state (TensorRT-LLM hands a request the
    additional outputs it asks for; build/selfcheck.py asks for the hidden states)."""
    hidden = transformer(step.embed(input_ids, n_rows, n_context, context_codes))[last_token]
    logits, codes = step.frames(hidden, n_rows, n_context)
    return {"logits": logits, CODES_OUTPUT: codes.to(torch.int32), HIDDEN_OUTPUT: hidden}


# ---------------------------------------------------------------------------- TensorRT-LLM classes

_REGISTERED: type | None = None


def register() -> type:
    """Import tensorrt_llm (1.2.1), define the model classes, register the architecture, its input
    processor and its config type; returns the CausalLM class. Idempotent."""
    global _REGISTERED
    if _REGISTERED is not None:
        return _REGISTERED

    from torch import nn
    from tensorrt_llm._torch.models.modeling_utils import (DecoderModel, DecoderModelForCausalLM,
                                                           register_auto_model)
    from tensorrt_llm._torch.modules.decoder_layer import DecoderLayer
    from tensorrt_llm._torch.modules.embedding import Embedding
    from tensorrt_llm._torch.modules.gated_mlp import GatedMLP
    from tensorrt_llm._torch.modules.linear import TensorParallelMode
    from tensorrt_llm._torch.modules.qk_norm_attention import QKNormRoPEAttention
    from tensorrt_llm._torch.modules.rms_norm import RMSNorm
    from tensorrt_llm.inputs.registry import MultimodalPlaceholderMetadata, register_input_processor

    from . import hf_config, state

    hf_config.register()

    class FishAttention(QKNormRoPEAttention):
        """Qwen3 attention (qk-norm) whose RoPE is upstream's: the bf16-rounded table applied in fp32
        (:func:`rope_neox`). TensorRT-LLM's fused qk-norm+RoPE and in-kernel RoPE derive cos/sin from
        theta in fp32, which upstream's model was not trained with, so both are off here."""

        def __init__(self, model_config, layer_idx: int, owner: list):
            c = model_config.pretrained_config
            super().__init__(hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                             num_key_value_heads=c.num_key_value_heads,
                             max_position_embeddings=c.max_position_embeddings, bias=c.attention_bias,
                             pos_embd_params=None, skip_rope=True, fuse_qk_norm_rope=False, layer_idx=layer_idx,
                             dtype=c.torch_dtype, dense_bias=c.attention_bias, config=model_config)
            self._owner = owner  # [FishS2Model], in a list so it is not registered as a child module

        def apply_rope(self, q, k, v, position_ids):
            q, k, v = super().apply_rope(q, k, v, position_ids)  # split + qk-norm (skip_rope: no rotation)
            table = self._owner[0].rope[position_ids.view(-1)][None]
            q = rope_neox(q.view(1, -1, self.num_heads, self.head_dim), table).reshape(q.shape)
            k = rope_neox(k.view(1, -1, self.num_key_value_heads, self.head_dim), table).reshape(k.shape)
            return q, k, v

    class FishDecoderLayer(DecoderLayer):
        def __init__(self, model_config, layer_idx: int, owner: list):
            super().__init__()
            c = model_config.pretrained_config
            self.layer_idx = layer_idx
            self.self_attn = FishAttention(model_config, layer_idx, owner)
            self.mlp = GatedMLP(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, bias=False,
                                dtype=c.torch_dtype, config=model_config)
            self.input_layernorm = RMSNorm(hidden_size=c.hidden_size, eps=c.rms_norm_eps, dtype=c.torch_dtype)
            self.post_attention_layernorm = RMSNorm(hidden_size=c.hidden_size, eps=c.rms_norm_eps,
                                                    dtype=c.torch_dtype)

        def forward(self, position_ids, hidden_states, attn_metadata, residual, **kwargs):
            if residual is None:
                residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
            else:
                hidden_states, residual = self.input_layernorm(hidden_states, residual)
            hidden_states = self.self_attn(position_ids=position_ids, hidden_states=hidden_states,
                                           attn_metadata=attn_metadata)
            hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
            return self.mlp(hidden_states), residual

    class FishS2Model(DecoderModel):
        """Slow-AR transformer; SlowAR's embedding combine and audio-logit head are borrowed as methods."""

        embed = SlowAR.embed
        head_weight = SlowAR.head_weight
        audio_logits = SlowAR.audio_logits
        audio_token_ids = SlowAR.audio_token_ids

        def __init__(self, model_config):
            super().__init__(model_config)
            c = model_config.pretrained_config
            self.cfg = c.dual_ar_config()
            if not self.cfg.tie_word_embeddings:
                raise NotImplementedError("FishS2DualARForCausalLM supports tied word embeddings only (as S2-Pro)")
            self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=c.torch_dtype,
                                          mapping=model_config.mapping,
                                          tensor_parallel_mode=TensorParallelMode.COLUMN, gather_output=True)
            self.codebook_embeddings = nn.Embedding(self.cfg.codebook_size * self.cfg.num_codebooks,
                                                    c.hidden_size, dtype=c.torch_dtype)
            owner = [self]
            self.layers = nn.ModuleList(FishDecoderLayer(model_config, i, owner) for i in range(c.num_hidden_layers))
            self.norm = RMSNorm(hidden_size=c.hidden_size, eps=c.rms_norm_eps, dtype=c.torch_dtype)
            # rope / codebook_offsets: built by init_buffers at load (post_load_weights), not here: the
            # model is constructed under TensorRT-LLM's MetaInitMode and then materialized uninitialized

        @property
        def embeddings(self):
            return self.embed_tokens

        def init_buffers(self, device) -> None:
            """The non-persistent buffers (bf16-rounded RoPE table, codebook offsets) on ``device``."""
            s = self.cfg.slow
            self.register_buffer("rope", rope_table(s.max_seq_len, s.head_dim, s.rope_base).to(device),
                                 persistent=False)
            self.register_buffer("codebook_offsets", (torch.arange(self.cfg.num_codebooks) *
                                                      self.cfg.codebook_size).to(device), persistent=False)

        def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
            """Layers and final norm over ``inputs_embeds`` (built by DualARStep.embed)."""
            hidden, residual = inputs_embeds, None
            for layer in self.layers:
                hidden, residual = layer(position_ids=position_ids, hidden_states=hidden,
                                         attn_metadata=attn_metadata, residual=residual)
            hidden, _ = self.norm(hidden, residual)
            return hidden

    @register_input_processor(FishInputProcessor, model_type=MODEL_TYPE,
                              placeholder_metadata=MultimodalPlaceholderMetadata(placeholder_map={MM_KEY: ""}))
    @register_auto_model(ARCHITECTURE)
    class FishS2DualARForCausalLM(DecoderModelForCausalLM):
        _OWN_PREFIXES = ("fast.", "model.codebook_embeddings.")

        def __init__(self, model_config):
            c = model_config.pretrained_config
            super().__init__(FishS2Model(model_config), config=model_config, hidden_size=c.hidden_size,
                             vocab_size=c.vocab_size)
            self.fast = FastAR(self.model.cfg)
            self.slots = state.bound()
            self.step: DualARStep | None = None

        def load_weights(self, weights: dict, weight_mapper=None, **kwargs):
            """Qwen3 tensors through TensorRT-LLM's loader; the fast AR and codebook table (ours) assigned
            here, with the same strict coverage check as fish_s2.checkpoint."""
            own = {k: weights[k] for k in list(weights) if k.startswith(self._OWN_PREFIXES)}
            rest = {k: v for k, v in weights.items() if k not in own}
            expected = {f"fast.{k}": tuple(v.shape) for k, v in self.fast.state_dict().items()}
            expected["model.codebook_embeddings.weight"] = tuple(self.model.codebook_embeddings.weight.shape)
            check_coverage(expected, {k: tuple(v.shape) for k, v in own.items()}, "converted checkpoint")
            device, dtype = self.model.embed_tokens.weight.device, self.model.embed_tokens.weight.dtype
            for name, t in own.items():
                _assign(self, name, t.to(device=device, dtype=dtype))
            kwargs.setdefault("skip_modules", ["fast", "codebook_embeddings"])
            if weight_mapper is not None:
                kwargs["weight_mapper"] = weight_mapper
            super().load_weights(rest, **kwargs)

        def post_load_weights(self):
            """After the weights: TensorRT-LLM's own post-load work, then our buffers and the frame step
            (which owns the fast AR's cache), on the weights' device (the loader calls this once the model
            is on the GPU)."""
            parent = getattr(super(), "post_load_weights", None)
            if parent is not None:
                parent()
            w = self.model.embed_tokens.weight
            self.model.init_buffers(w.device)
            self.fast.init_buffers(w.device)
            self.step = DualARStep(DualARView(self.model.cfg, self.model, self.fast), self.slots,
                                   self.model_config.pretrained_config.vocab_size)

        def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None,
                    return_context_logits: bool = False, multimodal_params=None, **kwargs):
            if self.step is None:
                raise RuntimeError("FishS2DualARForCausalLM.forward before post_load_weights (weights not loaded)")
            n_ctx, n_rows = attn_metadata.num_contexts, attn_metadata.num_seqs
            n_ctx_tokens = int(attn_metadata.seq_lens[:n_ctx].sum()) if n_ctx else 0
            if n_ctx:  # eager only: CUDA graphs are decode-only
                self.slots.check_rows(attn_metadata.request_ids)
                codes = self._context_codes(attn_metadata, multimodal_params or [], n_ctx, n_ctx_tokens)
            else:
                codes = self.slots.state.last_codes[:0]
            def transformer(x: Tensor) -> Tensor:
                return self.model(attn_metadata, position_ids=position_ids, inputs_embeds=x)

            last_token = attn_metadata.seq_lens_cuda[:n_rows].cumsum(0) - 1
            return step_forward(self.step, transformer, input_ids, n_rows, n_ctx, codes, last_token)

        def _context_codes(self, attn_metadata, mm: list, n_ctx: int, n_ctx_tokens: int) -> Tensor:
            if not mm:  # warm-up dummies carry no request tensors; their rows use the scratch slot
                return self.slots.state.last_codes.new_zeros(n_ctx_tokens, self.model.cfg.num_codebooks)
            data = [p.multimodal_data[MM_KEY] for p in mm]
            starts = list(attn_metadata.kv_cache_params.num_cached_tokens_per_seq[:n_ctx])
            lengths = attn_metadata.seq_lens[:n_ctx].tolist()
            return self.step.start_context(n_ctx, [d["prompt"] for d in data], starts, lengths,
                                           [d["sampling"] for d in data], [d["key"] for d in data])

    _REGISTERED = FishS2DualARForCausalLM
    return FishS2DualARForCausalLM
