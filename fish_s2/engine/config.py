"""The engine's settings (one typed block of serving.yaml) and the checks that protect its buffers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import DualARConfig
from ..request import ChunkPlan, EngineRequest, InvalidArgument


SWITCH_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class EngineConfig:
    # scheduling and limits
    # max_active and max_frames may be None in serving.yaml: derived from the memory plan, see
    # fish_s2.serving.config; an engine is always built with numbers
    max_active: int | None = 16          # requests decoded together (= KV slots)
    max_queued: int = 64                 # waiting for a slot; beyond max_active + max_queued in flight: Busy
    max_prompt_tokens: int = 2048
    max_frames: int | None = 1024        # per request (1024 frames = 47.6 s)
    chunk_plan: ChunkPlan = ChunkPlan()  # the default plan of a request that names none
    cancel_check_ms: int = 20            # how often each request's is_cancelled is asked (0: every step)
    session_idle_s: float = 60.0         # a session that waits longer than this for its next text is ended
    prefill_chunk_tokens: int = 512      # admission budget: prompt tokens prefilled per engine step, in chunks of
                                         # at most this many, so running streams keep their cadence while new
                                         # requests join (0: whole prompts at once)
    overlap_steps: str = "auto"          # launch the next decode step before the host handles a step's frames
                                         # when they end no row's batch: auto (on CUDA only), on, off
    # the torch runner
    prefix_cache_bytes: int = 256 << 20
    cuda_graphs: bool = True             # CUDA only
    compile: str = "auto"                # torch.compile the decode step, inside the CUDA graphs: auto (on CUDA
                                         # only), on, off
    sample_k_max: int = 64               # compiled/graphed steps sample among this many candidates when every
                                         # top_k fits (else a full-sort variant); 0: always sort
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    min_kv_bucket: int = 256

    @property
    def max_seq_len(self) -> int:
        return self.max_prompt_tokens + self.max_frames

    @property
    def max_in_flight(self) -> int:
        return self.max_active + self.max_queued

    def validate(self, model_max_seq_len: int) -> "EngineConfig":
        for name in ("max_active", "max_frames"):
            if getattr(self, name) is None:
                raise ValueError(f"engine.{name}: null (derived) must be resolved by the memory plan before an "
                                 "engine is built (fish_s2.serving.runtime.start_dual_ar does)")
        for name in ("max_active", "max_queued", "max_prompt_tokens", "max_frames", "min_kv_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.session_idle_s > 0:
            raise ValueError(f"engine.session_idle_s: must be > 0, got {self.session_idle_s}")
        for name in ("cancel_check_ms", "prefix_cache_bytes", "sample_k_max", "prefill_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"engine.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("compile", "overlap_steps"):
            if getattr(self, name) not in SWITCH_MODES:
                raise ValueError(f"engine.{name}: expected one of {list(SWITCH_MODES)}, got {getattr(self, name)!r}")
        if not self.graph_batch_sizes or min(self.graph_batch_sizes) < 1:
            raise ValueError("engine.graph_batch_sizes: must be a non-empty list of sizes >= 1")
        if self.max_seq_len > model_max_seq_len:
            raise ValueError(f"engine.max_prompt_tokens + engine.max_frames = {self.max_seq_len} exceeds the "
                             f"model's max_seq_len {model_max_seq_len}")
        return self


def check_request(req: EngineRequest, cfg: EngineConfig, model_cfg: DualARConfig) -> int:
    """What every engine checks before it takes a request, to protect its memory: the prompt's (and a
    dialogue's later segments') shape and values against the model (on a GPU an out-of-range id is a
    device-side assert that kills the process) and lengths against its buffers: the prompt tokens of
    the whole request within max_prompt_tokens and its frames within max_frames, so a dialogue's KV fits
    its slot from the start (a session's later segments: :func:`check_segment`). Everything else was
    validated where the request was built. Returns the request's prompt tokens."""
    p = _check_tokens("prompt", req.prompt, model_cfg)
    total = p.shape[1] + sum(_check_tokens("turns", t, model_cfg).shape[1] for t in req.turns)
    if not 1 <= total <= cfg.max_prompt_tokens:
        what = "tokens" if not req.turns else f"tokens over {len(req.turns) + 1} turn batches"
        raise InvalidArgument("prompt", f"{total} {what}, the limit is max_prompt_tokens={cfg.max_prompt_tokens}")
    if req.prefix_len >= p.shape[1]:
        raise InvalidArgument("prefix_len", f"must be in [0, {p.shape[1] - 1}], got {req.prefix_len}")
    if req.max_frames is not None and req.max_frames > cfg.max_frames:
        raise InvalidArgument("max_frames", f"must be in [1, {cfg.max_frames}], got {req.max_frames}")
    return total


def check_segment(segment, tokens_so_far: int, cfg: EngineConfig, model_cfg: DualARConfig) -> np.ndarray:
    """A session's next segment: its tokens against the model, the session's tokens within max_prompt_tokens."""
    seg = _check_tokens("text", segment, model_cfg)
    if tokens_so_far + seg.shape[1] > cfg.max_prompt_tokens:
        raise InvalidArgument("text", f"the session's text would take {tokens_so_far + seg.shape[1]} prompt tokens, the "
                                      f"limit is max_prompt_tokens={cfg.max_prompt_tokens}")
    return seg


def _check_tokens(field: str, tokens, model_cfg: DualARConfig) -> np.ndarray:
    rows = model_cfg.frame_rows
    try:
        p = np.asarray(tokens)
    except (TypeError, ValueError, RuntimeError):
        p = None
    if p is None or p.ndim != 2 or p.shape[0] != rows or p.shape[1] < 1 or p.dtype.kind not in "iu":
        raise InvalidArgument(field, f"expected an integer array [{rows}, T >= 1], got "
                                     f"{getattr(tokens, 'dtype', type(tokens))} {list(getattr(tokens, 'shape', []))}")
    if p[0].min() < 0 or p[0].max() >= model_cfg.vocab_size:
        raise InvalidArgument(field, f"token ids must be in [0, {model_cfg.vocab_size})")
    if p[1:].min() < 0 or p[1:].max() >= model_cfg.codebook_size:
        raise InvalidArgument(field, f"codes must be in [0, {model_cfg.codebook_size})")
    return p
