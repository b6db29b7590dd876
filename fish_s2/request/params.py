"""What a request asks for, validated where it is built: sampling parameters, the chunk plan and
the engine request. Each constructor checks its own ranges and raises :class:`InvalidArgument`
naming the field; limits that depend on a deployment (frame limit, codec profile) are checked by
:class:`Limits` at the edge that knows them. Torch-free."""

from __future__ import annotations

import math
import numbers
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument

INT32_MAX = (1 << 31) - 1
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1     # taken mod 2^64 (on the wire it is an INT64)


def real(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high])."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgument(name, f"expected a finite number, got {value!r}")
    value = float(value)
    if value < low or value > high or (low_open and value == low):
        raise InvalidArgument(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value:g}")
    return value


def integer(name: str, value, low: int, high: int) -> int:
    """An integer in [low, high] (no silent wrap: bounds are checked before any cast)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(name, f"expected an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be in [{low}, {high}], got {value}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling (defaults: upstream's server and WebUI). Greedy is ``temperature == 0`` or
    ``top_k == 1``; :attr:`top_k_used` is the top-k every sampler applies."""

    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 30
    seed: int = 0

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "temperature", real("temperature", self.temperature, 0.0, 2.0))
        set_(self, "top_p", real("top_p", self.top_p, 0.0, 1.0, low_open=True))
        set_(self, "top_k", integer("top_k", self.top_k, 1, INT32_MAX))
        set_(self, "seed", integer("seed", self.seed, SEED_MIN, SEED_MAX))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def top_k_used(self) -> int:
        return 1 if self.greedy else self.top_k


RAMP_GROWTH = 1.5   # measured: the H200 makes a frame in 0.30 (batch 1) to 0.42 (64) of its duration, the CPU
                    # tiny checkpoint through Triton in about 0.6; doubling (0.5 at most) would leave gaps there


@dataclass(frozen=True)
class ChunkPlan:
    """How a stream is cut: a small first chunk (time to first audio), then steady chunks of
    ``chunk_frames``, each decoded with up to ``context_frames`` earlier frames of left context (dropped
    after decoding). With ``ramp`` the chunks in between grow by RAMP_GROWTH (4, 6, 9, 14, 20, then 25
    frames), so the frames still to make before each chunk stay within 1.5 times the audio already
    sent: a stream made at up to 0.67 of real time (step time / frame duration) plays without gaps,
    codec time aside (without the ramp, 25 frames must be made while the first 4 play: 0.16)."""

    first_chunk_frames: int = 4     # 4 frames = 186 ms of audio at 21.5 frames/s
    chunk_frames: int = 25
    context_frames: int = 25
    ramp: bool = True

    def __post_init__(self):
        integer("first_chunk_frames", self.first_chunk_frames, 1, 1 << 16)
        integer("chunk_frames", self.chunk_frames, 1, 1 << 16)
        integer("context_frames", self.context_frames, 0, 1 << 16)
        if not (isinstance(self.ramp, numbers.Integral) and self.ramp in (0, 1)):
            raise InvalidArgument("ramp", f"expected true or false, got {self.ramp!r}")
        object.__setattr__(self, "ramp", bool(self.ramp))

    def frames(self, index: int) -> int:
        """New frames in chunk ``index``."""
        if index == 0:
            return self.first_chunk_frames
        if not self.ramp:
            return self.chunk_frames
        return min(self.chunk_frames, round(self.first_chunk_frames * RAMP_GROWTH ** min(index, 64)))

    def sizes(self, n_frames: int) -> list[int]:
        """New frames of each chunk of a stream of n_frames (the last one may be short)."""
        out: list[int] = []
        while (done := sum(out)) < n_frames:
            out.append(min(self.frames(len(out)), n_frames - done))
        return out

    def code_lengths(self) -> list[int]:
        """The code lengths (context included) the codec decodes for a stream's whole chunks, ascending:
        the first, the ramp, the steady length (a stream's last chunk may be shorter than its own)."""
        lengths, done, i = set(), 0, 0
        while True:
            lengths.add(self.frames(i) + min(self.context_frames, done))
            if done >= self.context_frames and self.frames(i) == self.chunk_frames:
                return sorted(lengths)
            done, i = done + self.frames(i), i + 1

    @property
    def longest_chunk(self) -> int:
        """Frames in the longest chunk the codec decodes (context included)."""
        return max(self.first_chunk_frames, self.chunk_frames) + self.context_frames

    def as_list(self) -> list[int]:
        return [self.first_chunk_frames, self.chunk_frames, self.context_frames, int(self.ramp)]


def new_request_id() -> str:
    """A server-side request id: random, unguessable."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class EngineRequest:
    """One generation for an engine. ``prompt`` is an integer [num_codebooks + 1, T] array (torch or
    numpy); its shape and values are checked by the engine against its model and buffers.

    A dialogue (several speaker-turn batches, upstream ``generate_long``) is one request: ``prompt`` holds
    the first batch, ``turns`` the segment that follows each batch (its closing ``<|im_end|>``, the next
    user turn, the next assistant start). ``max_frames`` bounds each batch (upstream's max_new_tokens);
    the whole request is bounded by the engine's max_frames."""

    prompt: Any
    params: SamplingParams = field(default_factory=SamplingParams)
    max_frames: int | None = None                 # None: the engine's limit
    prefix_len: int = 0                           # leading prompt columns that form a cacheable voice prefix
    chunk_plan: ChunkPlan | None = None           # None: the engine's plan
    request_id: str = field(default_factory=new_request_id)
    is_cancelled: Callable[[], bool] | None = None  # polled by the engine (e.g. Triton's response_sender)
    turns: tuple = ()                             # dialogue: the later batches' prompt segments [rows, t], each
                                                  # appended to the sequence when the batch before it ends
    open_input: bool = False                      # a session: more segments arrive while it runs (Engine.append);
                                                  # it ends once its input has ended and its last batch is done

    def __post_init__(self):
        if not isinstance(self.params, SamplingParams):
            raise InvalidArgument("params", f"expected SamplingParams, got {type(self.params).__name__}")
        if self.chunk_plan is not None and not isinstance(self.chunk_plan, ChunkPlan):
            raise InvalidArgument("chunk_plan", f"expected ChunkPlan, got {type(self.chunk_plan).__name__}")
        if self.max_frames is not None:
            integer("max_frames", self.max_frames, 1, INT32_MAX)
        integer("prefix_len", self.prefix_len, 0, INT32_MAX)
        if not isinstance(self.open_input, bool):
            raise InvalidArgument("open_input", f"expected true or false, got {self.open_input!r}")
        if not isinstance(self.turns, tuple):
            raise InvalidArgument("turns", f"expected a tuple of prompt segments, got {type(self.turns).__name__}")
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidArgument("request_id", "must be a non-empty string")


@dataclass(frozen=True)
class Limits:
    """What a deployment allows beyond each value's own range (from its serving config)."""

    max_frames: int
    max_text_bytes: int
    max_reference_seconds: float
    chunk_plan: ChunkPlan            # defaults of the chunk fields
    max_chunk_frames: int = 1 << 16  # the longest chunk (context included) the codec takes
    max_voices: int = 4              # voices in one request (speakers 0 .. max_voices - 1)
    max_turns: int = 64              # speaker turns in one request's text

    def check_frames(self, max_frames: int) -> int:
        return integer("max_frames", max_frames, 1, self.max_frames)

    def check_plan(self, plan: ChunkPlan) -> ChunkPlan:
        for name in ("first_chunk_frames", "chunk_frames"):
            integer(name, getattr(plan, name), 1, self.max_frames)
        longest = plan.longest_chunk
        if longest > self.max_chunk_frames:
            raise InvalidArgument("chunk_frames", f"a chunk of {longest} frames with its context exceeds the "
                                                  f"codec's limit of {self.max_chunk_frames}")
        return plan
