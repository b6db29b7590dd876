"""Dual-AR model configuration, parsed from an upstream S2-Pro ``config.json`` (``fish_qwen3_omni``).

Every size and special-token id used anywhere in the package comes from here (or from the codec's
own config in :mod:`fish_s2.codec`); nothing is retyped in code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


def _multiple_of(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class TransformerConfig:
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate_size: int
    rope_base: float
    norm_eps: float
    max_seq_len: int
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False


@dataclass(frozen=True)
class DualARConfig:
    """The slow AR (over time) and the fast AR (over the codebooks of one frame)."""

    slow: TransformerConfig
    fast: TransformerConfig
    vocab_size: int
    codebook_size: int          # entries per codebook row of the fast AR / codebook embeddings
    num_codebooks: int          # codes per frame (1 semantic + residuals)
    semantic_begin_id: int      # token id of <|semantic:0|>
    semantic_end_id: int        # token id of the last semantic token
    eos_id: int                 # <|im_end|>: ends the assistant turn
    pad_id: int
    tie_word_embeddings: bool = True
    dtype: str = "bfloat16"     # dtype the checkpoint was saved in

    @property
    def n_semantic(self) -> int:
        return self.semantic_end_id - self.semantic_begin_id + 1

    @property
    def frame_rows(self) -> int:
        """Rows of a prompt/frame column: the token id plus one row per codebook."""
        return self.num_codebooks + 1

    @property
    def has_fast_project_in(self) -> bool:
        return self.fast.dim != self.slow.dim

    @classmethod
    def from_dict(cls, data: dict) -> "DualARConfig":
        if data.get("model_type") != "fish_qwen3_omni":
            raise ValueError(f"config.json: model_type must be 'fish_qwen3_omni', got {data.get('model_type')!r}")
        try:
            tc, ac = data["text_config"], data["audio_decoder_config"]
        except KeyError as e:
            raise ValueError(f"config.json: missing section {e.args[0]!r}") from None

        n_head = tc["n_head"]
        n_kv = tc.get("n_local_heads", -1)
        n_kv = n_head if n_kv in (-1, None) else n_kv
        head_dim = tc.get("head_dim") or tc["dim"] // n_head
        inter = tc.get("intermediate_size") or _multiple_of(int(2 * 4 * tc["dim"] / 3), 256)
        slow = TransformerConfig(
            dim=tc["dim"], n_layer=tc["n_layer"], n_head=n_head, n_kv_head=n_kv, head_dim=head_dim,
            intermediate_size=inter, rope_base=tc.get("rope_base", 10000), norm_eps=tc.get("norm_eps", 1e-5),
            max_seq_len=tc.get("max_seq_len", 2048), qk_norm=tc.get("attention_qk_norm", False),
            qkv_bias=tc.get("attention_qkv_bias", False), o_bias=tc.get("attention_o_bias", False),
        )

        # Upstream builds the fast layers from the text config with the audio-decoder fields
        # replaced where present: rope base and norm eps always come from the text config, and an
        # absent qk-norm / bias flag falls back to the text value.
        def fast_get(key: str, default):
            v = ac.get(key)
            return default if v is None else v

        f_head = fast_get("n_head", n_head)
        f_kv = fast_get("n_local_heads", n_kv)
        f_kv = f_head if f_kv == -1 else f_kv
        fast = TransformerConfig(
            dim=fast_get("dim", slow.dim), n_layer=ac["n_layer"], n_head=f_head, n_kv_head=f_kv,
            head_dim=fast_get("head_dim", head_dim), intermediate_size=fast_get("intermediate_size", inter),
            rope_base=slow.rope_base, norm_eps=slow.norm_eps, max_seq_len=ac["num_codebooks"],
            qk_norm=fast_get("attention_qk_norm", slow.qk_norm), qkv_bias=fast_get("attention_qkv_bias", slow.qkv_bias),
            o_bias=fast_get("attention_o_bias", slow.o_bias),
        )
        return cls(
            slow=slow, fast=fast, vocab_size=tc["vocab_size"], codebook_size=ac["vocab_size"],
            num_codebooks=ac["num_codebooks"], semantic_begin_id=data["semantic_start_token_id"],
            semantic_end_id=data["semantic_end_token_id"], eos_id=data["eos_token_id"],
            pad_id=data.get("pad_token_id", 0), tie_word_embeddings=tc.get("tie_word_embeddings", True),
            dtype=data.get("dtype") or data.get("torch_dtype") or "bfloat16",
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "DualARConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def with_token_ids(self, semantic_begin_id: int, semantic_end_id: int, eos_id: int) -> "DualARConfig":
        """Upstream takes the semantic range and <|im_end|> from the tokenizer, overriding config.json."""
        return dataclasses.replace(self, semantic_begin_id=semantic_begin_id,
                                   semantic_end_id=semantic_end_id, eos_id=eos_id)

    def to_dict(self) -> dict:
        """Inverse of :meth:`from_dict` (upstream field names), used by the tiny-checkpoint writer."""
        def block(c: TransformerConfig) -> dict:
            return {"dim": c.dim, "n_layer": c.n_layer, "n_head": c.n_head, "n_local_heads": c.n_kv_head,
                    "head_dim": c.head_dim, "intermediate_size": c.intermediate_size, "rope_base": c.rope_base,
                    "norm_eps": c.norm_eps, "attention_qk_norm": c.qk_norm, "attention_qkv_bias": c.qkv_bias,
                    "attention_o_bias": c.o_bias, "dropout": 0.0}

        text = {"model_type": "fish_qwen3", **block(self.slow), "vocab_size": self.vocab_size,
                "max_seq_len": self.slow.max_seq_len, "tie_word_embeddings": self.tie_word_embeddings}
        audio = {"model_type": "fish_qwen3_audio_decoder", **block(self.fast), "vocab_size": self.codebook_size,
                 "num_codebooks": self.num_codebooks, "text_dim": self.slow.dim,
                 "max_seq_len": self.num_codebooks + 1, "tie_word_embeddings": False}
        return {"model_type": "fish_qwen3_omni", "dtype": self.dtype, "eos_token_id": self.eos_id,
                "pad_token_id": self.pad_id, "semantic_start_token_id": self.semantic_begin_id,
                "semantic_end_token_id": self.semantic_end_id, "text_config": text, "audio_decoder_config": audio}


# Upstream S2-Pro config.json (HF fishaudio/s2-pro, spec sections 1.1 and 2.1), for work without a
# checkpoint: the GPU benchmark's random weights. With a checkpoint, its own config.json is used.
S2_PRO_CONFIG_JSON = {
    "model_type": "fish_qwen3_omni", "dtype": "bfloat16", "eos_token_id": 151645, "pad_token_id": 151669,
    "semantic_start_token_id": 151678, "semantic_end_token_id": 155773,
    "text_config": {"model_type": "fish_qwen3", "dim": 2560, "n_layer": 36, "n_head": 32, "n_local_heads": 8,
                    "head_dim": 128, "intermediate_size": 9728, "vocab_size": 155776, "rope_base": 1000000,
                    "norm_eps": 1e-6, "max_seq_len": 32768, "attention_qk_norm": True, "tie_word_embeddings": True},
    "audio_decoder_config": {"model_type": "fish_qwen3_audio_decoder", "dim": 2560, "n_layer": 4, "n_head": 32,
                             "n_local_heads": 8, "head_dim": 128, "intermediate_size": 9728, "vocab_size": 4096,
                             "num_codebooks": 10, "text_dim": 2560, "attention_qk_norm": False},
}
