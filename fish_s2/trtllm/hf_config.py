"""The Hugging Face config of a converted checkpoint: Qwen3 field names for the slow AR (what
TensorRT-LLM's PyTorch backend and ``transformers`` read) plus the upstream Dual-AR config it came from.

TensorRT-LLM loads a model directory through ``transformers.AutoConfig``, which only knows
registered model types, so importing this module registers :class:`FishS2Config`. Every size is
derived from the upstream config kept under ``dual_ar``; nothing is retyped.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from ..config import DualARConfig

MODEL_TYPE = "fish_s2_dual_ar"
ARCHITECTURE = "FishS2DualARForCausalLM"
# q/k rows of every head are stored in NeoX (half-split) order: interleaved pair (2i, 2i+1) of the
# upstream checkpoint becomes (i, i + head_dim/2). See fish_s2.trtllm.convert.neox_permutation.
ROPE_LAYOUT = "neox_permuted"


class FishS2Config(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 0, hidden_size: int = 0, intermediate_size: int = 0,
                 num_hidden_layers: int = 0, num_attention_heads: int = 0, num_key_value_heads: int = 0,
                 head_dim: int = 0, max_position_embeddings: int = 0, rope_theta: float = 10000.0,
                 rms_norm_eps: float = 1e-6, attention_bias: bool = False, hidden_act: str = "silu",
                 rope_layout: str = ROPE_LAYOUT, dual_ar: dict | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.mlp_bias = False
        self.hidden_act = hidden_act
        self.rope_layout = rope_layout
        self.dual_ar = dual_ar or {}
        super().__init__(**kwargs)

    @classmethod
    def from_dual_ar(cls, cfg: DualARConfig) -> "FishS2Config":
        s = cfg.slow
        if s.qkv_bias != s.o_bias:
            raise ValueError("config.json: attention_qkv_bias and attention_o_bias differ; Qwen3 has one "
                             "attention_bias flag")
        if not s.qk_norm:
            raise ValueError("config.json: attention_qk_norm is false; the converted model is Qwen3 (qk-norm)")
        return cls(vocab_size=cfg.vocab_size, hidden_size=s.dim, intermediate_size=s.intermediate_size,
                   num_hidden_layers=s.n_layer, num_attention_heads=s.n_head, num_key_value_heads=s.n_kv_head,
                   head_dim=s.head_dim, max_position_embeddings=s.max_seq_len, rope_theta=s.rope_base,
                   rms_norm_eps=s.norm_eps, attention_bias=s.qkv_bias, dual_ar=cfg.to_dict(),
                   architectures=[ARCHITECTURE], tie_word_embeddings=cfg.tie_word_embeddings,
                   eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, torch_dtype=cfg.dtype)

    def dual_ar_config(self) -> DualARConfig:
        """The full Dual-AR config (fast AR, codebooks, semantic ids) of the converted checkpoint."""
        if not self.dual_ar:
            raise ValueError("config.json: no 'dual_ar' section; not written by fish_s2.trtllm.convert")
        if self.rope_layout != ROPE_LAYOUT:
            raise ValueError(f"config.json: rope_layout must be {ROPE_LAYOUT!r}, got {self.rope_layout!r}")
        return DualARConfig.from_dict(self.dual_ar)

    def to_json_dict(self) -> dict:
        """config.json contents; carries both ``dtype`` (transformers 5) and ``torch_dtype`` (4.x, which
        TensorRT-LLM 1.2 pins) so either version reads the dtype."""
        d = self.to_dict()
        dtype = d.get("dtype") or d.get("torch_dtype")
        dtype = str(dtype).removeprefix("torch.")
        d["dtype"] = d["torch_dtype"] = dtype
        return d


def register() -> None:
    """Make ``AutoConfig`` resolve :data:`MODEL_TYPE` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, FishS2Config)
    except ValueError:  # already registered (by an earlier import in this process)
        pass


register()
