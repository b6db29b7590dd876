"""Memory plan: what a server will hold, computed from the checkpoint config and the serving settings
before any weight is loaded; the KV capacity that fits the memory available; one refusal naming the
numbers when the settings cannot fit.

Imports only the standard library and :mod:`fish_s2.config`: torch is imported lazily, by
:func:`available_memory` for a CUDA device, :func:`cuda_supports_bf16`, and :func:`codec_spec` for a
checkpoint that ships its own codec config.

Formulas (bytes; ``b`` = bytes per element of the serving dtype, which the KV cache shares)::

    weights          = parameters x b         (parameters: safetensors headers, or counted from the config)
    KV per token     = 2 x n_layer x n_kv_head x head_dim x b            (slow AR: K and V of every layer)
    tokens per slot  = max_prompt_tokens + max_frames                    (one frame = one slow-AR position)
    per slot         = KV per token x tokens per slot + slot overhead
    slot overhead    = fast-AR cache row (num_codebooks positions) + decode state + decode workspace (estimate)
    fixed            = weights + buffers + prefix cache + codec sessions + prefill activations (estimate)
    KV budget        = kv_memory_fraction x (available - fixed)
    slots            = min(max_slots, floor(KV budget / per slot))               when max_active is not given
    max_frames       = min(model max_seq_len, floor((KV budget / max_active - slot overhead) / KV per token))
                       - max_prompt_tokens                          when max_active is given but max_frames is not

Tokens per slot follow the request limits, so an admitted request can always run to its limits (the
torch engine preallocates every slot; TensorRT-LLM gets ``max_tokens`` = slots x tokens per slot);
the slot count is what the memory decides. A plan fits when fixed <= available and slots x per slot
<= KV budget; the (1 - kv_memory_fraction) share of what the fixed part leaves is the headroom for
the CUDA context, allocator fragmentation and the model processes' own overhead. Lines marked
"estimate" are formulas for transient or library-managed memory, not measurements.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import DualARConfig, TransformerConfig

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_BF16_MIN_PARAMS = 1_000_000_000   # on the CPU, checkpoints this large default to bf16 (S2-Pro: 4.56 B)
DEFAULT_KV_FRACTION = 0.85            # as TensorRT-LLM's kv_cache.free_gpu_memory_fraction
# EngineConfig's defaults (fish_s2.engine, which imports torch; a test keeps them equal)
DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_FRAMES, DEFAULT_PREFIX_CACHE_BYTES = 2048, 1024, 256 << 20
CODEC_LIVE_TENSORS = 3                # codec activation estimate: widest stage's input, output and one temporary


# ------------------------------------------------------------------------------------------- sizes


def normalize_dtype(name: str) -> str:
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected auto or one of {sorted(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]


def parse_bytes(text: str | int) -> int:
    """``80GiB``, ``48GB``, ``143771MiB``, ``512M`` (binary), or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size such as 80GiB, 48GB or 1024MiB, got {text!r}")
    value, prefix, suffix = float(m[1]), m[2].upper(), m[3].lower()
    base = 1000 if suffix == "b" and prefix else 1024   # GB: decimal; GiB, G: binary
    return int(value * base ** "_KMGT".index(prefix or "_"))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def _block_params(c: TransformerConfig) -> int:
    qkv = (c.n_head + 2 * c.n_kv_head) * c.head_dim
    attn = c.dim * qkv + (qkv if c.qkv_bias else 0) + c.n_head * c.head_dim * c.dim + (c.dim if c.o_bias else 0)
    return attn + (2 * c.head_dim if c.qk_norm else 0) + 3 * c.dim * c.intermediate_size + 2 * c.dim


def dual_ar_params(cfg: DualARConfig) -> tuple[int, int]:
    """(slow, fast) parameter counts of :class:`fish_s2.dual_ar.DualAR` for ``cfg`` (a test checks them)."""
    s, f = cfg.slow, cfg.fast
    slow = (cfg.vocab_size * s.dim * (1 if cfg.tie_word_embeddings else 2)
            + cfg.codebook_size * cfg.num_codebooks * s.dim + s.n_layer * _block_params(s) + s.dim)
    fast = ((s.dim * f.dim + f.dim if cfg.has_fast_project_in else 0) + cfg.codebook_size * f.dim
            + f.n_layer * _block_params(f) + f.dim + f.dim * cfg.codebook_size)
    return slow, fast


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), read with the stdlib."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def checkpoint_params(checkpoint_dir: str | Path) -> int:
    """Parameters in a checkpoint's weight files, from their headers alone."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    total = 0
    for name in files:
        for key, t in safetensors_header(checkpoint_dir / name).items():
            if key != "__metadata__":
                total += math.prod(t["shape"])
    return total


def kv_bytes_per_token(c: TransformerConfig, dtype: str) -> int:
    """K and V of every layer for one position."""
    return 2 * c.n_layer * c.n_kv_head * c.head_dim * DTYPE_BYTES[normalize_dtype(dtype)]


def fast_kv_bytes_per_slot(cfg: DualARConfig, dtype: str) -> int:
    """The fast AR's cache row of one slot: num_codebooks positions of every fast layer."""
    return kv_bytes_per_token(cfg.fast, dtype) * cfg.num_codebooks


@dataclass(frozen=True)
class CodecSpec:
    """What the plan needs of the codec: its parameters and its widest activation per code frame."""

    params: int
    frame_length: int
    sample_rate: int
    decoder_width: int     # max over decoder stages of channels x samples per code frame
    encoder_width: int     # the same for the encoder


# CodecConfig.s2_pro() (fish_s2.codec imports torch; a test keeps this equal to codec_spec_of(...))
S2_PRO_CODEC = CodecSpec(params=391_398_385, frame_length=2048, sample_rate=44100, decoder_width=196_608,
                         encoder_width=131_072)


def codec_spec_of(cfg) -> CodecSpec:
    """A :class:`fish_s2.codec.CodecConfig`'s spec (parameters counted on the meta device: imports torch)."""
    import torch

    from .codec import Codec

    with torch.device("meta"):
        params = sum(p.numel() for p in Codec(cfg).state_dict().values())
    latent_per_frame = cfg.frame_length // cfg.hop_length   # latent steps per code frame
    dec, rate = cfg.decoder_dim * latent_per_frame, latent_per_frame
    for i, r in enumerate(cfg.decoder_rates):
        rate *= r
        dec = max(dec, cfg.decoder_dim // 2 ** (i + 1) * rate)
    enc, rate = cfg.encoder_dim * cfg.frame_length, cfg.frame_length
    for i, r in enumerate(cfg.encoder_rates):
        enc = max(enc, cfg.encoder_dim * 2 ** i * rate)
        rate //= r
    return CodecSpec(params, cfg.frame_length, cfg.sample_rate, dec, enc)


def codec_spec(checkpoint_dir: str | Path | None = None) -> CodecSpec:
    """The codec of a checkpoint: S2-Pro's unless it ships a ``codec_config.yaml`` (as test checkpoints do)."""
    if checkpoint_dir is None or not (Path(checkpoint_dir) / "codec_config.yaml").is_file():
        return S2_PRO_CODEC
    from .codec import CodecConfig

    return codec_spec_of(CodecConfig.for_checkpoint(checkpoint_dir))


# ------------------------------------------------------------------------------ memory and dtypes


def _meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def _cgroup_free() -> int | None:
    """Memory left under the cgroup's limit (a container's limit is not in /proc/meminfo)."""
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:
                return None
            return int(text) - int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: str = "cpu") -> int:
    """Bytes free now: CUDA from ``torch.cuda.mem_get_info``; CPU MemAvailable (psutil if installed),
    bounded by the cgroup's limit."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        return torch.cuda.mem_get_info(0 if index is None else index)[0]
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:
        avail = _meminfo_available()
    cgroup = _cgroup_free()
    return avail if cgroup is None else min(avail, cgroup)


def cuda_supports_bf16() -> bool | None:
    """Whether this machine's CUDA device runs bf16 (None: no torch or no CUDA device here to ask)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None


def choose_dtype(requested: str, device: str, params: int, bf16_supported: bool | None = None) -> tuple[str, str]:
    """(dtype, reason). ``auto``: bf16 on a GPU that supports it; on the CPU bf16 for checkpoints of at
    least CPU_BF16_MIN_PARAMS parameters (half the weights and KV), float32 below (exact, and faster
    there). Anything else is used as asked."""
    if requested != "auto":
        return normalize_dtype(requested), "requested"
    if device.startswith("cuda"):
        if bf16_supported is False:
            return "float32", "auto: this GPU has no bfloat16"
        return "bfloat16", "auto: GPU" + (", bfloat16 assumed: no CUDA device here to ask" if bf16_supported is None
                                          else " with bfloat16")
    if params >= CPU_BF16_MIN_PARAMS:
        return "bfloat16", f"auto: CPU, {params / 1e9:.2f} B parameters >= {CPU_BF16_MIN_PARAMS / 1e9:.0f} B"
    return "float32", f"auto: CPU, {params / 1e6:.1f} M parameters < {CPU_BF16_MIN_PARAMS / 1e9:.0f} B"


# ------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlanSettings:
    device: str = "cuda"                 # "cpu" or "cuda[:N]"
    runtime: str = "torch"               # torch: per-slot KV + own prefix cache; trtllm: paged KV, prefix reuse in it
    dtype: str = "auto"                  # auto: choose_dtype
    kv_memory_fraction: float = DEFAULT_KV_FRACTION
    max_active: int | None = None        # None: derived (slots)
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    max_frames: int | None = None        # None: DEFAULT_MAX_FRAMES, or derived when max_active is given
    prefill_chunk_tokens: int | None = None   # the engine's admission budget (None or 0: whole prompts at once)
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    max_slots: int = 64                  # cap on derived slots
    codec_sessions: int = 2              # codec copies loaded on this device: decoder + reference encoder
    codec_batch: int = 8                 # codec decoder batch (Triton's codec_max_batch)
    codec_chunk_frames: int = 50         # longest chunk: max(first, chunk) + context frames (ChunkPlan)
    reference_seconds: float = 30.0      # longest reference the encoder takes (max_reference_seconds)

    @property
    def longest_prefill(self) -> int:
        """Tokens of the longest prefill forward: a whole prompt, or the admission budget's chunk."""
        return min(self.prefill_chunk_tokens or self.max_prompt_tokens, self.max_prompt_tokens)

    def validate(self) -> "PlanSettings":
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"device: expected cpu or cuda[:N], got {self.device!r}")
        if self.runtime not in ("torch", "trtllm") or (self.runtime == "trtllm" and self.device == "cpu"):
            raise ValueError(f"runtime: expected torch, or trtllm on a cuda device, got {self.runtime!r}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction: must be in (0, 1], got {self.kv_memory_fraction}")
        for name in ("max_active", "max_frames"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_slots", "codec_batch", "codec_chunk_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.dtype != "auto":
            normalize_dtype(self.dtype)
        return self


# the serving profiles (fish_s2.serving.repository.PROFILE_SETTINGS; a test keeps them equal)
PLAN_PROFILES = {
    "cpu": PlanSettings(device="cpu", runtime="torch", max_slots=16, codec_batch=8),
    "gpu": PlanSettings(device="cuda", runtime="trtllm", max_slots=64, codec_batch=32),
}


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    detail: str = ""
    estimate: bool = False


@dataclass(frozen=True)
class MemoryPlan:
    settings: PlanSettings
    dtype: str
    dtype_reason: str
    params: int
    available_bytes: int
    max_active: int                       # slots
    max_frames: int
    derived: tuple[str, ...]              # which of max_active / max_frames the plan chose
    kv_bytes_per_token: int
    bytes_per_slot: int                   # slow KV of tokens_per_slot + the slot overhead
    fixed: tuple[Component, ...]          # everything that does not depend on the slot count
    slots: tuple[Component, ...]          # slot-dependent (KV, decode state and workspace)
    model_max_seq_len: int

    @property
    def tokens_per_slot(self) -> int:
        return self.settings.max_prompt_tokens + self.max_frames

    @property
    def components(self) -> tuple[Component, ...]:
        return self.fixed + self.slots

    @property
    def fixed_bytes(self) -> int:
        return sum(c.bytes for c in self.fixed)

    @property
    def slot_bytes(self) -> int:
        return sum(c.bytes for c in self.slots)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.slot_bytes

    @property
    def kv_budget(self) -> int:
        return int(self.settings.kv_memory_fraction * max(0, self.available_bytes - self.fixed_bytes))

    @property
    def slots_that_fit(self) -> int:
        return self.kv_budget // self.bytes_per_slot if self.bytes_per_slot else 0

    @property
    def fits(self) -> bool:
        return (self.max_active >= 1 and 1 <= self.max_frames and self.tokens_per_slot <= self.model_max_seq_len
                and self.fixed_bytes <= self.available_bytes and self.slot_bytes <= self.kv_budget)

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def engine_settings(self) -> dict:
        """The EngineConfig fields the plan decided (``dataclasses.replace(engine_cfg, **this)``)."""
        return {"max_active": self.max_active, "max_prompt_tokens": self.settings.max_prompt_tokens,
                "max_frames": self.max_frames, "prefix_cache_bytes": self.settings.prefix_cache_bytes}

    def trtllm_kv_cache(self, tokens_per_block: int = 16) -> dict:
        """TensorRT-LLM's settings for the same plan: ``max_batch_size`` and the ``kv_cache`` block
        (the same fraction, and max_tokens = slots x tokens per slot in whole blocks, so the paged
        pool takes what the plan gave the KV and no more)."""
        blocks = -(-self.tokens_per_slot // tokens_per_block)
        return {"max_batch_size": self.max_active,
                "kv_cache": {"free_gpu_memory_fraction": self.settings.kv_memory_fraction,
                             "max_tokens": self.max_active * blocks * tokens_per_block}}

    def to_text(self) -> str:
        s = self.settings
        how = {True: "derived from the memory", False: "given"}
        frames = how["max_frames" in self.derived] if s.max_frames or s.max_active else "default"
        lines = [f"memory plan: {s.device} ({s.runtime} runtime), dtype {self.dtype} ({self.dtype_reason})",
                 f"  {'available':<34}{fmt_bytes(self.available_bytes):>12}"]
        for c in self.components:
            name = c.name + (" (estimate)" if c.estimate else "")
            lines.append(f"  {name:<34}{fmt_bytes(c.bytes):>12}  {c.detail}")
        lines += [f"  {'total':<34}{fmt_bytes(self.total_bytes):>12}  "
                  f"{100 * self.total_bytes / max(1, self.available_bytes):.0f}% of available",
                  f"  KV budget = {s.kv_memory_fraction:g} x (available - fixed {fmt_bytes(self.fixed_bytes)}) = "
                  f"{fmt_bytes(self.kv_budget)}: {self.slots_that_fit} slots of {self.tokens_per_slot} tokens fit "
                  f"({fmt_bytes(self.bytes_per_slot)} each)",
                  f"  slots (max_active) {self.max_active}, {how['max_active' in self.derived]}"
                  + (f", capped at max_slots {s.max_slots}" if 'max_active' in self.derived
                     and self.max_active == s.max_slots else "")
                  + f"; tokens per slot {self.tokens_per_slot} = max_prompt_tokens {s.max_prompt_tokens} + "
                  f"max_frames {self.max_frames} ({frames})"]
        return "\n".join(lines)

    def to_metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) gauges; descriptions in METRICS."""
        out = [("fish_s2_memory_planned_bytes", {"component": c.name}, c.bytes) for c in self.components]
        out += [("fish_s2_memory_planned_bytes", {"component": "total"}, self.total_bytes),
                ("fish_s2_memory_available_bytes", {}, self.available_bytes),
                ("fish_s2_kv_slots", {}, self.max_active),
                ("fish_s2_kv_tokens_per_slot", {}, self.tokens_per_slot),
                ("fish_s2_kv_bytes_per_token", {}, self.kv_bytes_per_token)]
        return out


METRICS = {
    "fish_s2_memory_planned_bytes": "Bytes the memory plan gives each component (label component; total)",
    "fish_s2_memory_available_bytes": "Memory available when the plan was made (device, or system for the CPU)",
    "fish_s2_kv_slots": "KV slots: requests decoded together (max_active)",
    "fish_s2_kv_tokens_per_slot": "Tokens per KV slot (max_prompt_tokens + max_frames)",
    "fish_s2_kv_bytes_per_token": "Slow-AR KV bytes per token",
}


def derive_capacity(kv_budget: int, kv_per_token: int, slot_overhead: int, max_prompt_tokens: int,
                    max_frames: int | None, max_active: int | None, max_slots: int,
                    model_max_seq_len: int) -> tuple[int, int]:
    """(slots, max_frames) for a KV budget (see the module docstring); explicit values are kept (and
    checked later by :func:`check_fits`). Results below 1 mean nothing fits."""
    if max_active is None:
        max_frames = DEFAULT_MAX_FRAMES if max_frames is None else max_frames
        per_slot = kv_per_token * (max_prompt_tokens + max_frames) + slot_overhead
        return min(max_slots, kv_budget // per_slot), max_frames
    if max_frames is None:
        tokens = (kv_budget // max_active - slot_overhead) // kv_per_token
        max_frames = max(0, min(tokens, model_max_seq_len) - max_prompt_tokens)
    return max_active, max_frames


def _prefill_activations(cfg: DualARConfig, s: PlanSettings, tokens: int) -> int:
    """Estimate: the longest prefill chunk (max_prompt_tokens, or the admission budget's chunk), fp32
    worst case of the widest layer tensors, plus the boolean attention mask over a slot of ``tokens``."""
    c, T = cfg.slow, s.longest_prefill
    return T * (3 * c.intermediate_size + 2 * c.dim + (c.n_head + 2 * c.n_kv_head) * c.head_dim) * 4 \
        + (c.n_head // c.n_kv_head) * T * tokens


def _decode_workspace_row(cfg: DualARConfig, tokens: int) -> int:
    """Estimate, per batch row of a decode step: sampling over the semantic logits, the fast AR's noise
    and logits, attention scores over a slot of ``tokens``. On CUDA the CUDA-graph pool holds this."""
    return 4 * (6 * (cfg.n_semantic + 1) + 3 * cfg.num_codebooks * cfg.codebook_size + cfg.slow.n_head * tokens)


def _decode_state_row(cfg: DualARConfig) -> int:
    """The engine's per-slot decode state: frame column, position, counters, sampling parameters, and
    the repetition window (10 tokens), as int64."""
    return (cfg.frame_rows + 16) * 8


def plan_memory(cfg: DualARConfig, settings: PlanSettings, available_bytes: int, params: int | None = None,
                codec: CodecSpec | None = S2_PRO_CODEC, bf16_supported: bool | None = None) -> MemoryPlan:
    """The plan for ``cfg`` served with ``settings`` on a device with ``available_bytes`` free.

    ``params``: from :func:`checkpoint_params` (None: counted from the config); ``codec``: the codec
    loaded on the same device (None: none there). Does not raise when the plan does not fit: print
    it, then call :func:`check_fits`."""
    s = settings.validate()
    n_slow, n_fast = dual_ar_params(cfg)
    params = n_slow + n_fast if params is None else params
    bf16 = cuda_supports_bf16() if bf16_supported is None and s.device.startswith("cuda") \
        and s.dtype == "auto" else bf16_supported
    dtype, reason = choose_dtype(s.dtype, s.device, params, bf16)
    b = DTYPE_BYTES[dtype]
    per_token, fast_row, state_row = kv_bytes_per_token(cfg.slow, dtype), fast_kv_bytes_per_slot(cfg, dtype), \
        _decode_state_row(cfg)
    model_max = cfg.slow.max_seq_len
    tokens_bound = s.max_prompt_tokens + (s.max_frames or (DEFAULT_MAX_FRAMES if s.max_active is None
                                                           else model_max - s.max_prompt_tokens))
    work_row = _decode_workspace_row(cfg, tokens_bound)

    c = cfg.slow
    fixed = [Component("weights", params * b, f"{params / 1e6:,.1f} M params x {b} B"),
             Component("buffers", (c.max_seq_len * c.head_dim + cfg.num_codebooks * cfg.fast.head_dim) * 4
                       + (cfg.n_semantic + 1 + cfg.num_codebooks) * 8 + state_row + fast_row + c.dim * b,
                       "RoPE tables, audio ids, scratch row")]
    if s.runtime == "torch":
        fixed.append(Component("prefix cache", s.prefix_cache_bytes, "voice-prefix KV budget"))
    if codec is not None and s.codec_sessions:
        fixed.append(Component("codec weights", s.codec_sessions * codec.params * 4,
                               f"{s.codec_sessions} sessions x {codec.params / 1e6:.1f} M params x 4 B"))
        ref_frames = math.ceil(s.reference_seconds * codec.sample_rate / codec.frame_length)
        act = CODEC_LIVE_TENSORS * 4 * (s.codec_batch * s.codec_chunk_frames * codec.decoder_width
                                        + ref_frames * codec.encoder_width)
        fixed.append(Component("codec activations", act, f"decode {s.codec_batch} x {s.codec_chunk_frames} frames, "
                               f"encode {s.reference_seconds:g} s", estimate=True))
    fixed.append(Component("prefill activations", _prefill_activations(cfg, s, tokens_bound),
                           f"{s.longest_prefill} tokens", estimate=True))

    fixed_bytes = sum(x.bytes for x in fixed)
    budget = int(s.kv_memory_fraction * max(0, available_bytes - fixed_bytes))
    overhead = fast_row + state_row + work_row
    slots, max_frames = derive_capacity(budget, per_token, overhead, s.max_prompt_tokens, s.max_frames,
                                        s.max_active, s.max_slots, model_max)
    tokens = s.max_prompt_tokens + max_frames
    per_slot = (Component("slow-AR KV", slots * tokens * per_token,
                          f"{slots} slots x {tokens} tokens x {fmt_bytes(per_token)}"),
                Component("fast-AR KV", slots * fast_row, f"{slots} slots x {fmt_bytes(fast_row)}"),
                Component("decode state", slots * state_row, f"{slots} slots x {fmt_bytes(state_row)}"),
                Component("decode workspace", slots * work_row, f"{slots} rows x {fmt_bytes(work_row)}"
                          + ("; the CUDA-graph pool" if s.device.startswith("cuda") else ""), estimate=True))
    derived = tuple(n for n, v in (("max_active", s.max_active), ("max_frames", s.max_frames))
                    if v is None and not (n == "max_frames" and s.max_active is None))
    return MemoryPlan(s, dtype, reason, params, available_bytes, slots, max_frames, derived, per_token,
                      per_token * tokens + overhead, tuple(fixed), per_slot, model_max)


def check_fits(plan: MemoryPlan) -> MemoryPlan:
    """Raise one ValueError naming the bytes needed, the bytes available and the setting to lower."""
    if plan.fits:
        return plan
    s, avail, fixed = plan.settings, plan.available_bytes, plan.fixed_bytes
    weights = plan.component("weights").bytes
    head = (f"memory plan does not fit on {s.device}: needs {fmt_bytes(plan.total_bytes)} (fixed "
            f"{fmt_bytes(fixed)}, of which weights {fmt_bytes(weights)} in {plan.dtype}; {plan.max_active} slots x "
            f"{plan.tokens_per_slot} tokens {fmt_bytes(plan.slot_bytes)}, of which KV "
            f"{fmt_bytes(plan.component('slow-AR KV').bytes)}), "
            f"{fmt_bytes(avail)} available")
    bf16 = ["serve in bfloat16 (dtype), which halves the weights and the KV"] if plan.dtype == "float32" else []
    if plan.tokens_per_slot > plan.model_max_seq_len:
        why = (f"max_prompt_tokens + max_frames = {plan.tokens_per_slot} exceeds the model's max_seq_len "
               f"{plan.model_max_seq_len}")
        fixes = ["lower engine.max_frames or engine.max_prompt_tokens"]
    elif weights > avail:
        why, fixes = f"the weights alone need {fmt_bytes(weights)} in {plan.dtype}", bf16 + ["use a larger machine"]
    elif fixed > avail:
        big = max(plan.fixed[1:], key=lambda x: x.bytes)
        why = (f"the fixed part alone needs {fmt_bytes(fixed)} (weights {fmt_bytes(weights)}, then {big.name} "
               f"{fmt_bytes(big.bytes)})")
        fixes = bf16 + ["lower engine.prefix_cache_bytes or the codec batch (triton.codec_max_batch)",
                        "use a larger machine"]
    else:
        why = (f"the KV may take kv_memory_fraction {s.kv_memory_fraction:g} x ({fmt_bytes(avail)} - fixed "
               f"{fmt_bytes(fixed)}) = {fmt_bytes(plan.kv_budget)}")
        if "max_frames" in plan.derived:
            why += f", {plan.max_frames} frames per slot for {plan.max_active} slots"
            fixes = ["lower engine.max_active or engine.max_prompt_tokens"]
        elif plan.slots_that_fit < 1:
            why += f", less than one slot of {plan.tokens_per_slot} tokens ({fmt_bytes(plan.bytes_per_slot)})"
            fixes = ["lower engine.max_frames or engine.max_prompt_tokens"]
        else:
            why += f", room for {plan.slots_that_fit} slots of {fmt_bytes(plan.bytes_per_slot)}"
            fixes = [f"lower engine.max_active to {plan.slots_that_fit} (or engine.max_frames / "
                     "engine.max_prompt_tokens)"]
        fixes += bf16 + ["raise kv_memory_fraction"]
    raise ValueError(f"{head}; {why}: " + "; or ".join(fixes))


def settings_for(profile: str, **overrides) -> PlanSettings:
    """A profile's plan settings with overrides (None values ignored)."""
    if profile not in PLAN_PROFILES:
        raise ValueError(f"profile: expected one of {sorted(PLAN_PROFILES)}, got {profile!r}")
    return dataclasses.replace(PLAN_PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})
