"""Loading an upstream S2-Pro checkpoint directory.

``config.json`` + ``model.safetensors`` (or ``model.safetensors.index.json`` with shards) + ``tokenizer.json``
(+ ``codec.pth``, loaded by :mod:`fish_s2.codec`). The model is built on the meta device and each
tensor is moved in from a memory-mapped shard, one shard at a time, so loading never holds two copies
of the weights. Key coverage is strict: upstream loads with ``strict=False`` and a wrong config
silently drops weights; here any missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from .config import DualARConfig
from .dual_ar import DualAR
from .tokenizer import S2Tokenizer

if TYPE_CHECKING:
    from .codec import Codec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# checkpoint name prefix -> module name prefix (first match wins; the codebook table feeds the slow AR)
_PREFIXES = [("text_model.model.", "slow."), ("audio_decoder.codebook_embeddings.", "slow.codebook_embeddings."),
             ("audio_decoder.", "fast.")]


def module_key(checkpoint_key: str) -> str | None:
    for src, dst in _PREFIXES:
        if checkpoint_key.startswith(src):
            return dst + checkpoint_key[len(src):]
    return None


def checkpoint_key(module_key_: str) -> str:
    """Inverse of :func:`module_key` (for writers and converters)."""
    if module_key_.startswith("slow.codebook_embeddings."):
        return "audio_decoder." + module_key_[len("slow."):]
    if module_key_.startswith("slow."):
        return "text_model.model." + module_key_[len("slow."):]
    if module_key_.startswith("fast."):
        return "audio_decoder." + module_key_[len("fast."):]
    raise ValueError(f"not a DualAR parameter name: {module_key_}")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def weight_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = [checkpoint_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return files
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json")


def check_coverage(expected: dict[str, tuple], found: dict[str, tuple], what: str) -> None:
    """Raise ValueError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k}: checkpoint {list(found[k])} != model {list(expected[k])}"
                 for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {misshaped}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(tensor, requires_grad=False))


def load_config(checkpoint_dir: str | Path) -> tuple[DualARConfig, S2Tokenizer]:
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: not an S2 checkpoint directory (no config.json)")
    tok = S2Tokenizer.from_checkpoint(checkpoint_dir)
    cfg = DualARConfig.from_json(checkpoint_dir).with_token_ids(tok.semantic_begin_id, tok.semantic_end_id,
                                                                  tok.im_end_id)
    return cfg, tok


def scan_checkpoint(checkpoint_dir: str | Path, cfg: DualARConfig) -> list[Path]:
    """The weight files, after checking from their headers alone (no tensor data read) that they hold
    exactly the DualAR tensors of ``cfg`` with the right shapes."""
    checkpoint_dir = Path(checkpoint_dir)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DualAR(cfg).state_dict().items()}
    files = weight_files(checkpoint_dir)
    found, unmapped = {}, []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = module_key(key)
                if name is None:
                    unmapped.append(key)
                else:
                    found[name] = tuple(f.get_slice(key).get_shape())
    if unmapped:
        raise ValueError(f"{checkpoint_dir}: unexpected tensors: {sorted(unmapped)}")
    check_coverage(expected, found, str(checkpoint_dir))
    return files


def load_dual_ar(checkpoint_dir: str | Path, cfg: DualARConfig, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str = "cpu") -> DualAR:
    checkpoint_dir, dtype = Path(checkpoint_dir), resolve_dtype(dtype)
    files = scan_checkpoint(checkpoint_dir, cfg)
    with torch.device("meta"):
        model = DualAR(cfg)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                _assign(model, module_key(key), f.get_tensor(key).to(device=device, dtype=dtype))
    model.init_buffers(device)
    return model.eval()


@dataclass
class S2Checkpoint:
    """Everything inference needs from one checkpoint directory."""

    path: Path
    config: DualARConfig
    tokenizer: S2Tokenizer
    model: DualAR
    codec: "Codec"

    @classmethod
    def load(cls, checkpoint_dir: str | Path, dtype: torch.dtype | str = torch.float32,
             device: torch.device | str = "cpu", codec_dtype: torch.dtype | str = torch.float32) -> "S2Checkpoint":
        from .codec import Codec

        cfg, tok = load_config(checkpoint_dir)
        model = load_dual_ar(checkpoint_dir, cfg, dtype, device)
        codec = Codec.from_checkpoint(checkpoint_dir, device=device, dtype=resolve_dtype(codec_dtype))
        return cls(Path(checkpoint_dir), cfg, tok, model, codec)
