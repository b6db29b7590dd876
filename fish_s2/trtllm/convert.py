"""Convert an upstream S2-Pro checkpoint into the directory ``tensorrt_llm.LLM`` loads for our model.

Output: ``config.json`` (:class:`~fish_s2.trtllm.hf_config.FishS2Config`, architecture
``FishS2DualARForCausalLM``), safetensors shards with Qwen3 tensor names for the slow AR
(``model.layers.N.self_attn.q_proj.weight`` ...), the codebook-embedding table as
``model.codebook_embeddings.weight``, the fast AR under ``fast.`` with :class:`~fish_s2.fast_ar.FastAR`'s
own names, and the tokenizer files.

Upstream RoPE is interleaved (pairs 2i, 2i+1); Qwen3 implementations (Hugging Face, TensorRT-LLM)
rotate NeoX half-split pairs (i, i + D/2). The converter permutes the rows of every q and k head and
the q_norm/k_norm weights with the same permutation, so every attention score is unchanged and a NeoX
rotation with the same (bf16-rounded) cos/sin reproduces the upstream model.

Tensors are streamed: one input tensor is read (memory-mapped) at a time and output shards are
flushed at ``max_shard_bytes``, so the real 9 GB checkpoint never has two copies in memory. Every
output file gets the permission bits of the source's ``config.json`` (safetensors writes 0600), so
a server that can read the checkpoint can read the conversion. :func:`check_conversion` reloads the
written shards: every expected tensor with its shape, and a sample (the non-layer tensors and the
first, middle and last layers) mapped back to the upstream layout must equal the source bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import check_coverage, load_config, module_key, scan_checkpoint, weight_files
from ..config import DualARConfig
from .hf_config import FishS2Config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 4 << 30

# slow-AR module names (after fish_s2.checkpoint.module_key) -> Qwen3 names; wqkv and the qk norms are special
_LAYER_RENAMES = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
                  "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
                  "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_TOP_RENAMES = {"slow.embeddings.weight": "model.embed_tokens.weight",
                "slow.codebook_embeddings.weight": "model.codebook_embeddings.weight",
                "slow.norm.weight": "model.norm.weight", "slow.output.weight": "lm_head.weight"}


def neox_permutation(head_dim: int) -> torch.Tensor:
    """Row order that turns an interleaved-RoPE head (pairs 2i, 2i+1) into a NeoX one (pairs i, i + D/2)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Permute the rows of each head of a q or k projection (weight [H*D, in] or bias [H*D]) or a norm [D]."""
    perm = neox_permutation(head_dim)
    return t.unflatten(0, (-1, head_dim))[:, perm].flatten(0, 1).contiguous()


def _unpermute_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    inverse = torch.argsort(neox_permutation(head_dim))
    return t.unflatten(0, (-1, head_dim))[:, inverse].flatten(0, 1)


def restore_tensor(name: str, parts: list[torch.Tensor], cfg: DualARConfig) -> torch.Tensor:
    """Inverse of :func:`convert_tensor`: the upstream tensor ``name`` from its converted ``parts`` (in the
    order convert_tensor yields them)."""
    D = cfg.slow.head_dim
    if name.startswith("slow.layers.") and ".attention.wqkv." in name:
        q, k, v = parts
        return torch.cat([_unpermute_heads(q, D), _unpermute_heads(k, D), v])
    if name.startswith("slow.layers.") and name.endswith(("q_norm.weight", "k_norm.weight")):
        return _unpermute_heads(parts[0], D)
    (t,) = parts
    return t


def convert_tensor(name: str, t: torch.Tensor, cfg: DualARConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Output tensors for one DualAR module tensor (``name`` as :func:`fish_s2.checkpoint.module_key` gives)."""
    if name.startswith("fast."):
        yield name, t
        return
    if name in _TOP_RENAMES:
        yield _TOP_RENAMES[name], t
        return
    prefix, _, rest = name.partition(".layers.")
    idx, _, leaf = rest.partition(".")
    if prefix != "slow" or not idx.isdigit():
        raise ValueError(f"no converter rule for tensor {name}")
    out, s = f"model.layers.{idx}.", cfg.slow
    if leaf.startswith("attention.wqkv."):
        kind = leaf.rsplit(".", 1)[1]  # weight or bias
        q, k, v = t.split([s.n_head * s.head_dim, s.n_kv_head * s.head_dim, s.n_kv_head * s.head_dim])
        yield out + f"self_attn.q_proj.{kind}", _permute_heads(q, s.head_dim)
        yield out + f"self_attn.k_proj.{kind}", _permute_heads(k, s.head_dim)
        yield out + f"self_attn.v_proj.{kind}", v.contiguous()
    elif leaf in ("attention.q_norm.weight", "attention.k_norm.weight"):
        yield out + "self_attn." + leaf.split(".", 1)[1], _permute_heads(t, s.head_dim)
    else:
        module, _, kind = leaf.rpartition(".")
        if module not in _LAYER_RENAMES:
            raise ValueError(f"no converter rule for tensor {name}")
        yield out + f"{_LAYER_RENAMES[module]}.{kind}", t


class _ShardWriter:
    """Collects output tensors and writes a safetensors shard whenever ``max_bytes`` is reached."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.files):
            raise ValueError(f"duplicate output tensor {name}")
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        tmp = f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(self.out_dir / tmp), metadata={"format": "pt"})
        self.files.append((tmp, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Rename the shards to their final names and write the index; returns the shard file names."""
        self.flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, tensors), final in zip(self.files, names):
            (self.out_dir / tmp).replace(self.out_dir / final)
            weight_map.update({t: final for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def convert_checkpoint(checkpoint_dir: Path, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the TensorRT-LLM model directory for ``checkpoint_dir`` into ``out_dir`` (created); returns out_dir."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"out_dir: must differ from the checkpoint directory {checkpoint_dir}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: must be >= 1, got {max_shard_bytes}")
    cfg, _ = load_config(checkpoint_dir)
    hf_cfg = FishS2Config.from_dual_ar(cfg)  # checks the geometry is Qwen3 before any work

    files = scan_checkpoint(checkpoint_dir, cfg)  # key coverage and shapes first, as the core loader checks them

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("model*.safetensors*"), *out_dir.glob("shard-*.tmp")]:
        stale.unlink()
    writer = _ShardWriter(out_dir, max_shard_bytes)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys()):
                for name, t in convert_tensor(module_key(key), f.get_tensor(key), cfg):
                    writer.add(name, t)
    names = writer.finish()

    (out_dir / "config.json").write_text(json.dumps(hf_cfg.to_json_dict(), indent=2, sort_keys=True))
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            shutil.copyfile(checkpoint_dir / name, out_dir / name)
    mode = stat.S_IMODE((checkpoint_dir / "config.json").stat().st_mode)
    for name in [*names, "config.json", "model.safetensors.index.json", *TOKENIZER_FILES]:
        if (out_dir / name).is_file():
            os.chmod(out_dir / name, mode)
    return out_dir


def _sampled(name: str, cfg: DualARConfig) -> bool:
    """Non-layer tensors, and those of the first, middle and last layer of each transformer."""
    prefix, _, rest = name.partition(".layers.")
    if not rest:
        return True
    n = (cfg.slow if prefix == "slow" else cfg.fast).n_layer
    return int(rest.split(".", 1)[0]) in (0, n // 2, n - 1)


def check_conversion(checkpoint_dir: Path, out_dir: Path) -> str:
    """Reload a converted directory: every expected tensor with its shape (headers), and a sample mapped
    back to the upstream layout (:func:`restore_tensor`) equal to the source. Raises ValueError naming
    what differs; returns a one-line summary."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    cfg, _ = load_config(checkpoint_dir)
    outputs: dict[str, Path] = {}
    found = {}
    out_files = weight_files(out_dir)
    for path in out_files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                outputs[key], found[key] = path, tuple(f.get_slice(key).get_shape())
    expected, sample, n_source = {}, [], 0
    for path in scan_checkpoint(checkpoint_dir, cfg):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name, n_source = module_key(key), n_source + 1
                meta = torch.empty(f.get_slice(key).get_shape(), device="meta")
                parts = {out: tuple(t.shape) for out, t in convert_tensor(name, meta, cfg)}
                expected.update(parts)
                if _sampled(name, cfg):
                    sample.append((path, key, name, list(parts)))
    check_coverage(expected, found, f"{out_dir} (converted)")
    differ = []
    for path, key, name, parts in sample:
        with safe_open(str(path), framework="pt") as f:
            source = f.get_tensor(key)
        loaded = []
        for part in parts:
            with safe_open(str(outputs[part]), framework="pt") as f:
                loaded.append(f.get_tensor(part))
        restored = restore_tensor(name, loaded, cfg)
        if restored.dtype != source.dtype or not torch.equal(restored, source):
            differ.append(name)
    if differ:
        raise ValueError(f"{out_dir}: converted tensors differ from the source after mapping back: {differ}")
    return (f"{len(found)} tensors in {len(out_files)} shard(s); {len(sample)} of {n_source} reloaded and mapped "
            "back equal the source (q/k rows and norms inverse-permuted)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fish_s2.trtllm.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_dir", type=Path, help="upstream S2-Pro checkpoint directory")
    p.add_argument("out_dir", type=Path, help="directory to write (created)")
    p.add_argument("--max-shard-gib", type=float, default=DEFAULT_SHARD_BYTES / (1 << 30))
    args = p.parse_args(argv)
    try:
        out = convert_checkpoint(args.checkpoint_dir, args.out_dir, int(args.max_shard_gib * (1 << 30)))
        check = check_conversion(args.checkpoint_dir, out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    print(f"check: {check}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
