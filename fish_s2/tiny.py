"""Deterministic tiny random checkpoints in the real on-disk format, for tests, demos and benchmarks.

Files: ``config.json`` (fish_qwen3_omni), ``model.safetensors`` (bf16, upstream key names; or shards
with ``model.safetensors.index.json``), ``codec.pth`` + ``codec_config.yaml``, ``tokenizer.json``
(byte-level BPE trained on a few sentences, then the S2 special tokens and 4096 semantic tokens),
``tokenizer_config.json``, ``special_tokens_map.json``. The vocabulary is compact, so every token id
differs from the real checkpoint's: nothing in the package may hard-code them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import Tensor
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .checkpoint import checkpoint_key
from .codec import Codec, CodecConfig
from .codec.weights import weight_norm_style
from .config import DualARConfig, TransformerConfig
from .dual_ar import DualAR

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|phoneme_start|>", "<|phoneme_end|>",
                  "<|text|>", "<|voice|>", "<|interleave|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]
N_SEMANTIC = 4096
BPE_VOCAB = 600

CORPUS = [
    "Hello! This is Fish S2 streaming from Triton.",
    "The quick brown fox jumps over the lazy dog.",
    "[whisper] hello there [laugh] friend, how are you today?",
    "<|speaker:0|>Good morning. <|speaker:1|>Good morning to you too!",
    "Numbers like 1234 and 56.78 are read out loud; don't stop now.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "It was the best of times, it was the worst of times.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "[pitch up] Wow, that is amazing! [sigh] I wish I had known earlier.",
    "Streaming speech synthesis reduces the time to first audio.",
    "A reference voice is cloned from a few seconds of recorded speech.",
    "The weather today is sunny with a light breeze from the west.",
]


def _transformer(dim: int, n_layer: int, n_head: int, n_kv: int, head_dim: int, inter: int, max_seq: int,
                 qk_norm: bool) -> TransformerConfig:
    return TransformerConfig(dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, head_dim=head_dim,
                             intermediate_size=inter, rope_base=1_000_000, norm_eps=1e-6, max_seq_len=max_seq,
                             qk_norm=qk_norm)


# (slow, fast) geometry of each preset; the codec is the tiny codec in both
PRESETS = {
    "tiny": (_transformer(64, 2, 4, 2, 32, 192, 4096, True), _transformer(64, 2, 4, 2, 32, 128, 10, False)),
    "small": (_transformer(512, 8, 8, 2, 64, 1536, 4096, True), _transformer(512, 2, 8, 2, 64, 1536, 10, False)),
}


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    specials = SPECIAL_TOKENS + [f"<|semantic:{i}|>" for i in range(N_SEMANTIC)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def tiny_config(tok: Tokenizer, preset: str = "tiny") -> DualARConfig:
    slow, fast = PRESETS[preset]
    sem0, eos = tok.token_to_id("<|semantic:0|>"), tok.token_to_id("<|im_end|>")
    return DualARConfig(slow=slow, fast=fast, vocab_size=sem0 + N_SEMANTIC + 2, codebook_size=N_SEMANTIC,
                        num_codebooks=10, semantic_begin_id=sem0, semantic_end_id=sem0 + N_SEMANTIC - 1,
                        eos_id=eos, pad_id=tok.token_to_id("<|pad|>"))


def random_weights(cfg: DualARConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random DualAR weights (module names), the golden set's init scheme, rounded to bf16.

    The <|im_end|> embedding row is enlarged so that the tied logit can win and generation ends."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DualAR(cfg).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        n = torch.randn(shape, generator=g)
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * n
        elif name in ("slow.embeddings.weight", "slow.codebook_embeddings.weight", "fast.output.weight"):
            t = 0.5 * n
        elif name == "fast.embeddings.weight":
            t = n
        elif name.endswith(".bias"):
            t = 0.1 * n
        else:
            t = n / math.sqrt(shape[-1])
        out[name] = t
    out["slow.embeddings.weight"][cfg.eos_id] *= 1.5
    return {k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}


def write_tiny_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0, shards: int = 1,
                          fast_dim: int | None = None) -> Path:
    """Write a checkpoint directory; ``fast_dim`` != slow dim adds the fast AR's input projection."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    cfg = tiny_config(tok, preset)
    if fast_dim is not None:
        cfg = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, dim=fast_dim))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.slow.max_seq_len, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|pad|>", "unk_token": None, "clean_up_tokenization_spaces": False,
        "split_special_tokens": False}, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|pad|>"}))
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    weights = {checkpoint_key(k): v for k, v in random_weights(cfg, seed).items()}
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    names = sorted(weights)
    if shards <= 1:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = math.ceil(len(names) / shards)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: weights[k] for k in names[i * per:(i + 1) * per]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())},
             "weight_map": weight_map}, indent=2))

    codec_cfg = CodecConfig.tiny()
    torch.save(random_codec_state_dict(codec_cfg, seed + 1), path / "codec.pth")
    codec_cfg.to_yaml(path / "codec_config.yaml")
    return path


def random_codec_state_dict(cfg: CodecConfig, seed: int) -> dict[str, Tensor]:
    """Deterministic random fp32 weights in upstream's `codec.pth` key format (weight norm kept as g/v).

    Init as the golden set: g U(0.4,0.8), v N; snake alpha U(0.5,1.5); codebooks N; gammas U(0.1,0.5); norms
    1+0.1N; other weights N/sqrt(fan_in); biases 0.02N. The last conv's g is then rescaled once so that the
    pre-tanh std is ~0.3 on random codes, i.e. decoded audio has a sane level instead of ~0.02.
    """
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Codec(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    unif = lambda s, lo, hi: torch.rand(*s, generator=gen) * (hi - lo) + lo  # noqa: E731
    sd: dict[str, Tensor] = {}
    for k, s in shapes.items():
        style = weight_norm_style(k)
        if style:
            stem = k[: -len("weight")]
            g, v = unif((s[0],) + (1,) * (len(s) - 1), 0.4, 0.8), randn(*s)
            names = ("parametrizations.weight.original0", "parametrizations.weight.original1") \
                if style == "parametrizations" else ("weight_g", "weight_v")
            sd[stem + names[0]], sd[stem + names[1]] = g, v
        elif k.endswith(".alpha"):
            sd[k] = unif(s, 0.5, 1.5)
        elif k.endswith("gamma"):
            sd[k] = unif(s, 0.1, 0.5)
        elif k.endswith("codebook.weight"):
            sd[k] = randn(*s)
        elif k.endswith("norm.weight"):
            sd[k] = 1 + 0.1 * randn(*s)
        elif k.endswith(".bias"):
            sd[k] = 0.02 * randn(*s)
        else:
            sd[k] = randn(*s) / math.sqrt(math.prod(s[1:]))
    # calibrate the output level on a short random-code decode; rounded so that the file is reproducible
    model = Codec.from_state_dict(sd, cfg)
    q = cfg.quantizer
    codes = torch.cat([torch.randint(0, q.semantic_codebook_size, (1, 1, 8), generator=gen),
                       torch.randint(0, q.codebook_size, (1, q.n_codebooks, 8), generator=gen)], dim=1)
    with torch.no_grad():
        pre_tanh = model.decoder.model[:-1](model.quantizer.decode(codes))
    last = f"decoder.model.{len(model.decoder.model) - 2}.conv.parametrizations.weight.original0"
    sd[last] = sd[last] * float(f"{0.3 / pre_tanh.std().item():.3g}")
    return sd
