"""The tensor contract of the Triton models, and validation of what a client sends.

Every tensor name, dtype and shape is declared once here: the repository generator renders the
``input``/``output`` blocks of each ``config.pbtxt`` from these specs, the models read and write
tensors by these names, and the client builds its requests from them. Dims given as a name
(``"codebooks"``, ``"rows"``) are filled from the checkpoint by the generator.

A bad request raises :class:`~fish_s2.request.InvalidArgument` naming the field it is about
(``"temperature: must be in [0, 2], got 3"``); the models turn it into an INVALID_ARG response.
Values are range-checked by the request layer's constructors (:class:`SamplingParams`,
:class:`ChunkPlan`) and the deployment's :class:`Limits`; this module reads tensors into them.
Torch-free: the client imports it.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..request import ChunkPlan, InvalidArgument, Limits, PermissionDenied, SamplingParams
from ..request.dialogue import SERVER_CHUNK_LENGTH, check_dialogue
from ..request.params import integer

TTS, TTS_PIPELINE, PREPROCESS, DUAL_AR, CODEC_DECODER, POSTPROCESS, VOICES = (
    "tts", "tts_pipeline", "preprocess", "dual_ar", "codec_decoder", "postprocess", "voices")

SAMPLE_FORMATS = ("float32", "int16")    # index = the code carried in CHUNK_META
VOICE_ACTIONS = ("register", "list", "delete")
VOICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
REQUEST_ID = re.compile(r"[0-9a-f]{32}")     # server-issued (fish_s2.request.new_request_id), unguessable
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: type               # numpy dtype; np.object_ = Triton BYTES
    dims: tuple               # ints (-1: any) or checkpoint size names
    optional: bool = False

    @property
    def config_type(self) -> str:
        """The ``data_type`` of a Triton model config."""
        return "TYPE_STRING" if self.dtype is np.object_ else "TYPE_" + _TRITON[np.dtype(self.dtype).name]

    @property
    def wire_type(self) -> str:
        """The datatype of a KServe v2 request tensor."""
        return "BYTES" if self.dtype is np.object_ else _TRITON[np.dtype(self.dtype).name]


_TRITON = {"float32": "FP32", "int16": "INT16", "int32": "INT32", "int64": "INT64", "bool": "BOOL"}


def _s(name, dtype, dims=(1,), optional=False) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims), optional)


# ---------------------------------------------------------------- tts (ensemble) = preprocess inputs
TTS_INPUTS = (
    _s("TEXT", np.object_),
    _s("VOICE_ID", np.object_, (-1,), optional=True),     # one voice id, or several: voice i is <|speaker:i|>
    _s("REFERENCE_AUDIO", np.float32, (-1,), optional=True),
    _s("REFERENCE_SAMPLE_RATE", np.int32, optional=True),
    _s("REFERENCE_TEXT", np.object_, optional=True),
    _s("TEMPERATURE", np.float32, optional=True),
    _s("TOP_P", np.float32, optional=True),
    _s("TOP_K", np.int32, optional=True),
    _s("SEED", np.int64, optional=True),
    _s("MAX_FRAMES", np.int32, optional=True),
    _s("FIRST_CHUNK_FRAMES", np.int32, optional=True),
    _s("CHUNK_FRAMES", np.int32, optional=True),
    _s("CONTEXT_FRAMES", np.int32, optional=True),
    _s("SAMPLE_FORMAT", np.object_, optional=True),
    _s("CHUNK_LENGTH", np.int32, optional=True),           # UTF-8 bytes per speaker-turn batch (upstream's)
    _s("OPEN_INPUT", np.bool_, optional=True),             # a session: more text follows (APPEND to tts)
)
# tts (the client-facing entry): a synthesis (TTS_INPUTS, TEXT required), a stop (STOP and REQUEST_ID alone:
# the server-issued id that the stream's own responses carry), or a session's next text (APPEND, REQUEST_ID,
# TEXT and/or END_INPUT). A session's stream starts with a response that carries only its REQUEST_ID
# (CHUNK_INDEX -1, no audio), so that its owner can append before any audio exists.
ENTRY_INPUTS = tuple(TensorSpec(s.name, s.dtype, s.dims, True) if s.name == "TEXT" else s for s in TTS_INPUTS) + (
    _s("STOP", np.bool_, optional=True), _s("REQUEST_ID", np.object_, optional=True),
    _s("APPEND", np.bool_, optional=True), _s("END_INPUT", np.bool_, optional=True))
SESSION_ANNOUNCE_INDEX = -1
TTS_OUTPUTS = (                       # = postprocess outputs; one response per chunk
    _s("AUDIO", np.float32, (-1,)),           # samples of the chunk if SAMPLE_FORMAT is float32, else empty
    _s("AUDIO_INT16", np.int16, (-1,)),       # samples of the chunk if SAMPLE_FORMAT is int16, else empty
    _s("CHUNK_INDEX", np.int32),
    _s("SAMPLE_RATE", np.int32),
    _s("REQUEST_ID", np.object_),             # server-generated
    _s("TURN_INDEX", np.int32),               # the turn batch (dialogue batch, session segment) of its last frame
)

# ---------------------------------------------------------------- tts_pipeline (ensemble) = what tts relays
PIPELINE_INPUTS = TTS_INPUTS + (_s("STREAM_ID", np.object_),)   # issued by tts: dual_ar's REQUEST_ID (engine id)

# ---------------------------------------------------------------- preprocess -> dual_ar
GENERATE_INPUTS = (
    _s("PROMPT", np.int64, ("rows", -1), optional=True),
    _s("PREFIX_LEN", np.int32, optional=True),
    _s("TEMPERATURE", np.float32, optional=True),
    _s("TOP_P", np.float32, optional=True),
    _s("TOP_K", np.int32, optional=True),
    _s("SEED", np.int64, optional=True),
    _s("MAX_FRAMES", np.int32, optional=True),
    _s("CHUNK_PLAN", np.int32, (len(ChunkPlan().as_list()),), optional=True),     # ChunkPlan.as_list()
    _s("FORMAT_CODE", np.int32, optional=True),           # index into SAMPLE_FORMATS, echoed in CHUNK_META
    _s("START_NS", np.int64, optional=True),              # time.monotonic_ns() at preprocess, echoed
    _s("TURN_STARTS", np.int32, (-1,), optional=True),    # a dialogue: the PROMPT column where each later
                                                          # batch's segment starts (empty: one batch)
    _s("OPEN_INPUT", np.bool_, optional=True),            # a session (segments follow as APPEND requests)
)
# dual_ar inputs: a generation (all GENERATE_INPUTS and REQUEST_ID) or a stop (STOP and REQUEST_ID):
# the stop ends the running request with that server-issued id (tts sends it when its client is gone:
# ensembles do not pass a client's cancellation on to a running step).
# An append (APPEND, REQUEST_ID, PROMPT = the segments of a session's next text with TURN_STARTS, END_INPUT)
# gives a running session its next batches.
DUAL_AR_INPUTS = GENERATE_INPUTS + (_s("REQUEST_ID", np.object_, optional=True), _s("STOP", np.bool_, optional=True),
                                    _s("APPEND", np.bool_, optional=True), _s("END_INPUT", np.bool_, optional=True))
DUAL_AR_OUTPUTS = (
    _s("CODES", np.int64, ("codebooks", -1)),             # [codebooks, context + new frames]
    _s("CHUNK_META", np.int64, (5,)),                     # see ChunkMeta
    _s("REQUEST_ID", np.object_),
)

# ---------------------------------------------------------------- codec_decoder (batched) and postprocess
CODEC_INPUTS = (_s("CODES", np.int64, ("codebooks", -1)),)
CODEC_OUTPUTS = (_s("AUDIO", np.float32, (-1,)),)          # context + new frames, frame_length samples each
POSTPROCESS_INPUTS = (
    _s("DECODED", np.float32, (-1,)),
    _s("CHUNK_META", np.int64, (5,)),
    _s("REQUEST_ID", np.object_),
)

# ---------------------------------------------------------------- voices
VOICES_INPUTS = (
    _s("ACTION", np.object_),
    _s("ADMIN_KEY", np.object_, optional=True),           # register and delete: the server's admin key
    _s("VOICE_ID", np.object_, optional=True),
    _s("REFERENCE_AUDIO", np.float32, (-1,), optional=True),
    _s("REFERENCE_SAMPLE_RATE", np.int32, optional=True),
    _s("REFERENCE_TEXT", np.object_, optional=True),
)
VOICES_OUTPUTS = (_s("VOICES", np.object_, (-1,)),)       # one JSON object per voice


@dataclass(frozen=True)
class ChunkMeta:
    """Per-chunk facts that travel from dual_ar to postprocess as one INT64 [5] tensor."""

    index: int
    context_frames: int
    format_code: int
    start_ns: int
    turn: int = 0           # the turn batch of the chunk's last frame (a dialogue's or a session's)

    def pack(self) -> np.ndarray:
        return np.array([self.index, self.context_frames, self.format_code, self.start_ns, self.turn], dtype=np.int64)

    @classmethod
    def unpack(cls, a: np.ndarray | None) -> "ChunkMeta":
        values = None if a is None else np.asarray(a).reshape(-1)
        if values is None or values.size != 5 or values.dtype.kind not in "iu":
            raise InvalidArgument("chunk_meta", f"expected 5 integers [index, context frames, format code, start ns, "
                                                f"turn], got {None if a is None else f'{values.dtype} {list(np.shape(a))}'}")
        index, context, fmt, start, turn = (int(v) for v in values)
        integer("chunk_meta", index, 0, 1 << 31)
        integer("chunk_meta", context, 0, 1 << 16)
        integer("chunk_meta", fmt, 0, len(SAMPLE_FORMATS) - 1)
        integer("chunk_meta", turn, 0, 1 << 31)
        return cls(index, context, fmt, start, turn)


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1] -> 16-bit PCM."""
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


# ---------------------------------------------------------------- reading request tensors

Getter = Callable[[str], "np.ndarray | None"]   # name -> the request's tensor, None when absent


def _one(get: Getter, spec: TensorSpec, required: bool = False):
    """The single value of a scalar input as a Python value, or None when absent and optional."""
    a = get(spec.name)
    field = spec.name.lower()
    if a is None:
        if spec.optional and not required:
            return None
        raise InvalidArgument(field, "required")
    if a.size != 1:
        raise InvalidArgument(field, f"expected one value, got shape {list(a.shape)}")
    v = a.reshape(-1)[0]
    if spec.dtype is np.object_:
        try:
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)
        except UnicodeDecodeError:
            raise InvalidArgument(field, "not valid UTF-8") from None
    return float(v) if np.dtype(spec.dtype).kind == "f" else int(v)


def check_required(get: Getter, specs: tuple[TensorSpec, ...]) -> None:
    """Every required input is present (InvalidArgument naming the first one missing)."""
    for spec in specs:
        if not spec.optional and get(spec.name) is None:
            raise InvalidArgument(spec.name.lower(), "required")


def check_request_id(request_id: str | None) -> str:
    if request_id is None or not REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument("request_id", "required: the server-issued id of the request (32 hex digits)")
    return request_id


def check_chunk_codes(codes: np.ndarray | None) -> np.ndarray:
    """A code chunk for the codec: integer [1, codebooks, frames >= 1] (out-of-range codes are clamped
    by the codec itself)."""
    if codes is None or codes.ndim != 3 or codes.shape[0] != 1 or codes.shape[2] < 1 or codes.dtype.kind not in "iu":
        raise InvalidArgument("codes", f"expected an integer tensor [1, codebooks, frames >= 1], got "
                                       f"{None if codes is None else f'{codes.dtype} {list(codes.shape)}'}")
    return codes


def check_decoded(decoded: np.ndarray | None, meta: ChunkMeta, frame_length: int) -> np.ndarray:
    """The new samples of a decoded chunk (its context's samples dropped)."""
    context = meta.context_frames * frame_length
    if decoded is None or decoded.dtype.kind != "f" or decoded.size <= context or decoded.size % frame_length:
        raise InvalidArgument("decoded", f"expected float samples of whole frames beyond {meta.context_frames} context "
                                         f"frames, got {None if decoded is None else f'{decoded.dtype} {list(decoded.shape)}'}")
    return decoded.reshape(-1)[context:]


def one_string(get: Getter, name: str) -> str | None:
    """A scalar BYTES input as text (None when absent)."""
    return _one(get, TensorSpec(name, np.object_, (1,), optional=True))


def check_voice_id(voice_id: str) -> str:
    """Voice ids are checked against a strict pattern before any path is built from them."""
    if not isinstance(voice_id, str) or not VOICE_ID.fullmatch(voice_id):
        raise InvalidArgument("voice_id", f"must match {VOICE_ID.pattern} (letters, digits, '_' and '-', "
                                          f"at most 64 characters), got {voice_id!r}")
    return voice_id


@dataclass(frozen=True)
class ReferenceInput:
    audio: np.ndarray          # float32 mono at sample_rate
    sample_rate: int
    text: str


def _reference(get: Getter, specs: dict[str, TensorSpec], max_seconds: float,
               required: bool) -> ReferenceInput | None:
    audio = get("REFERENCE_AUDIO")
    rate = _one(get, specs["REFERENCE_SAMPLE_RATE"])
    text = _one(get, specs["REFERENCE_TEXT"])
    if audio is None and rate is None and text is None:
        if required:
            raise InvalidArgument("reference_audio", "required")
        return None
    if audio is None or text is None or rate is None:
        missing = [n for n, v in (("reference_audio", audio), ("reference_sample_rate", rate),
                                  ("reference_text", text)) if v is None]
        raise InvalidArgument(missing[0], "required with a reference voice (reference_audio, "
                                          "reference_sample_rate and reference_text go together)")
    integer("reference_sample_rate", rate, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        raise InvalidArgument("reference_audio", "no samples")
    if audio.size > max_seconds * rate:
        raise InvalidArgument("reference_audio", f"{audio.size / rate:.1f} s, the limit is {max_seconds:g} s")
    if not np.isfinite(audio).all():
        raise InvalidArgument("reference_audio", "contains NaN or infinite samples")
    if not text.strip():
        raise InvalidArgument("reference_text", "must not be empty")
    return ReferenceInput(audio, rate, text)


@dataclass(frozen=True)
class TTSRequest:
    text: str
    batches: tuple[str, ...]     # the text's speaker-turn batches (one unless it has speaker tags)
    voice_ids: tuple[str, ...]   # registered voices, speaker i = voice_ids[i] (empty: none, or the reference)
    reference: ReferenceInput | None
    params: SamplingParams
    max_frames: int              # per batch (upstream's max_new_tokens); the request: the engine's max_frames
    chunk_plan: ChunkPlan
    sample_format: str
    open_input: bool = False     # a session: its text is the first part, more follows


def parse_tts_request(get: Getter, limits: Limits) -> TTSRequest:
    """Validate a tts request and fill every default, so dual_ar receives a complete request."""
    specs = {s.name: s for s in TTS_INPUTS}
    text = _one(get, specs["TEXT"], required=True)
    if not text.strip():
        raise InvalidArgument("text", "must not be empty")
    if len(text.encode("utf-8")) > limits.max_text_bytes:
        raise InvalidArgument("text", f"{len(text.encode('utf-8'))} bytes, the limit is {limits.max_text_bytes}")
    voice_ids = _voice_ids(get)
    reference = _reference(get, specs, limits.max_reference_seconds, required=False)
    if voice_ids and reference is not None:
        raise InvalidArgument("voice_id", "give registered voices or one reference voice, not both")

    defaults = SamplingParams()
    value = lambda name, default: default if (v := _one(get, specs[name])) is None else v  # noqa: E731
    params = SamplingParams(temperature=value("TEMPERATURE", defaults.temperature),
                            top_p=value("TOP_P", defaults.top_p), top_k=value("TOP_K", defaults.top_k),
                            seed=value("SEED", defaults.seed))
    plan = limits.check_plan(ChunkPlan(
        first_chunk_frames=value("FIRST_CHUNK_FRAMES", limits.chunk_plan.first_chunk_frames),
        chunk_frames=value("CHUNK_FRAMES", limits.chunk_plan.chunk_frames),
        context_frames=value("CONTEXT_FRAMES", limits.chunk_plan.context_frames), ramp=limits.chunk_plan.ramp))
    max_frames = limits.check_frames(value("MAX_FRAMES", limits.max_frames))
    sample_format = value("SAMPLE_FORMAT", SAMPLE_FORMATS[0])
    if sample_format not in SAMPLE_FORMATS:
        raise InvalidArgument("sample_format", f"expected one of {list(SAMPLE_FORMATS)}, got {sample_format!r}")
    batches = check_dialogue(text, len(voice_ids) + (reference is not None), limits.max_voices, limits.max_turns,
                             value("CHUNK_LENGTH", SERVER_CHUNK_LENGTH))
    return TTSRequest(text, tuple(batches), voice_ids, reference, params, max_frames, plan, sample_format,
                      bool(value("OPEN_INPUT", False)))


def _voice_ids(get: Getter) -> tuple[str, ...]:
    """VOICE_ID: one registered voice id or several (BYTES [n]), each checked before any path is built."""
    a = get("VOICE_ID")
    if a is None:
        return ()
    if a.ndim != 1 or a.size == 0 or a.dtype != np.object_:
        raise InvalidArgument("voice_id", f"expected one or more voice id strings, got {a.dtype} {list(a.shape)}")
    try:
        ids = tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in a)
    except UnicodeDecodeError:
        raise InvalidArgument("voice_id", "not valid UTF-8") from None
    for voice_id in ids:
        check_voice_id(voice_id)
    return ids


@dataclass(frozen=True)
class VoiceRequest:
    action: str
    voice_id: str | None
    reference: ReferenceInput | None
    admin_key: str | None = None


def parse_voice_request(get: Getter, max_reference_seconds: float) -> VoiceRequest:
    specs = {s.name: s for s in VOICES_INPUTS}
    action = _one(get, specs["ACTION"], required=True)
    if action not in VOICE_ACTIONS:
        raise InvalidArgument("action", f"expected one of {list(VOICE_ACTIONS)}, got {action!r}")
    voice_id = _one(get, specs["VOICE_ID"])
    admin_key = _one(get, specs["ADMIN_KEY"])
    if action == "list":
        return VoiceRequest(action, None, None)
    if voice_id is None:
        raise InvalidArgument("voice_id", f"required to {action} a voice")
    check_voice_id(voice_id)
    reference = _reference(get, specs, max_reference_seconds, required=action == "register")
    if action == "delete" and reference is not None:
        raise InvalidArgument("reference_audio", "not used when deleting a voice")
    return VoiceRequest(action, voice_id, reference, admin_key)


def check_admin_key(given: str | None, expected: str | None) -> None:
    """A protected action needs the server's admin key (when the server has one)."""
    if expected and not hmac.compare_digest((given or "").encode(), expected.encode()):
        raise PermissionDenied("admin_key", "missing or wrong: registering and deleting voices needs the server's "
                                            "admin key ($FISH_S2_ADMIN_KEY, or the admin-key file of the server)")


@dataclass(frozen=True)
class StopRequest:
    """End the running request with this server-issued id."""

    request_id: str


@dataclass(frozen=True)
class GenerateRequest:
    """What dual_ar receives from preprocess: a complete generation request (the prompt's values are
    the engine's to check against its model and buffers)."""

    request_id: str
    prompt: np.ndarray          # int64 [rows, T]: the first (or only) turn batch
    turns: tuple[np.ndarray, ...]  # a dialogue's later batches' segments, int64 [rows, t] each
    prefix_len: int
    params: SamplingParams
    max_frames: int
    chunk_plan: ChunkPlan
    format_code: int
    start_ns: int
    open_input: bool = False


@dataclass(frozen=True)
class AppendRequest:
    """A running session's next segments (none: only the end of its input)."""

    request_id: str
    segments: tuple[np.ndarray, ...]
    end: bool


def generate_tensors(prompt: np.ndarray, prefix_len: int, req: TTSRequest, start_ns: int,
                     turns: tuple[np.ndarray, ...] = ()) -> dict[str, np.ndarray]:
    """preprocess's outputs for one request (the dual_ar inputs, by name): a dialogue's later segments
    ``turns`` travel appended to PROMPT, with the column where each starts in TURN_STARTS."""
    p = req.params
    starts = np.cumsum([prompt.shape[1]] + [t.shape[1] for t in turns[:-1]]) if turns else np.zeros(0)
    return {"PROMPT": np.ascontiguousarray(np.concatenate([prompt, *turns], axis=1), dtype=np.int64),
            "PREFIX_LEN": np.array([prefix_len], np.int32),
            "TEMPERATURE": np.array([p.temperature], np.float32), "TOP_P": np.array([p.top_p], np.float32),
            "TOP_K": np.array([p.top_k], np.int32), "SEED": np.array([p.seed], np.int64),
            "MAX_FRAMES": np.array([req.max_frames], np.int32),
            "CHUNK_PLAN": np.array(req.chunk_plan.as_list(), np.int32),
            "FORMAT_CODE": np.array([SAMPLE_FORMATS.index(req.sample_format)], np.int32),
            "START_NS": np.array([start_ns], np.int64),
            "TURN_STARTS": starts.astype(np.int32), "OPEN_INPUT": np.array([req.open_input])}


def parse_generate_request(get: Getter) -> GenerateRequest | StopRequest:
    """A dual_ar request: a stop (STOP and REQUEST_ID alone), else every generation input is required."""
    specs = {s.name: s for s in DUAL_AR_INPUTS}
    request_id = check_request_id(_one(get, specs["REQUEST_ID"]))
    present = [s.name for s in GENERATE_INPUTS if get(s.name) is not None]
    if _one(get, specs["STOP"]):
        if present:
            raise InvalidArgument("stop", f"a stop request carries only REQUEST_ID, got {present}")
        return StopRequest(request_id)
    if _one(get, specs["APPEND"]):
        if set(present) - {"PROMPT", "TURN_STARTS"}:
            raise InvalidArgument("append", f"an append carries only REQUEST_ID, PROMPT, TURN_STARTS and END_INPUT, got "
                                            f"{present}")
        prompt = get("PROMPT")
        if prompt is not None and (prompt.ndim != 2 or prompt.dtype.kind not in "iu" or prompt.shape[1] == 0):
            raise InvalidArgument("prompt", f"expected an integer tensor [rows, T], got {prompt.dtype} {list(prompt.shape)}")
        segments = () if prompt is None else tuple(
            np.split(prompt.astype(np.int64), _turn_starts(get("TURN_STARTS"), prompt.shape[1]), axis=1))
        return AppendRequest(request_id, segments, bool(_one(get, specs["END_INPUT"])))
    prompt = get("PROMPT")
    if prompt is None:
        raise InvalidArgument("prompt", "required")
    if prompt.ndim != 2 or prompt.dtype.kind not in "iu":
        raise InvalidArgument("prompt", f"expected an integer tensor [rows, T], got {prompt.dtype} {list(prompt.shape)}")
    scalars = {s.name: _one(get, s, required=True) for s in GENERATE_INPUTS if s.dims == (1,)}
    plan = get("CHUNK_PLAN")
    if plan is None or plan.size != len(ChunkPlan().as_list()) or plan.dtype.kind not in "iu":
        raise InvalidArgument("chunk_plan", f"expected {len(ChunkPlan().as_list())} integers [first_chunk_frames, "
                                            f"chunk_frames, context_frames, ramp], got "
                                            f"{None if plan is None else list(plan.shape)}")
    integer("format_code", scalars["FORMAT_CODE"], 0, len(SAMPLE_FORMATS) - 1)
    segments = np.split(prompt.astype(np.int64), _turn_starts(get("TURN_STARTS"), prompt.shape[1]), axis=1)
    return GenerateRequest(
        request_id=request_id, prompt=segments[0], turns=tuple(segments[1:]),
        prefix_len=integer("prefix_len", scalars["PREFIX_LEN"], 0, segments[0].shape[1] - 1),
        params=SamplingParams(temperature=scalars["TEMPERATURE"], top_p=scalars["TOP_P"], top_k=scalars["TOP_K"],
                              seed=scalars["SEED"]),
        max_frames=integer("max_frames", scalars["MAX_FRAMES"], 1, 1 << 31),
        chunk_plan=ChunkPlan(*(int(v) for v in plan.reshape(-1))),
        format_code=scalars["FORMAT_CODE"], start_ns=scalars["START_NS"], open_input=bool(scalars["OPEN_INPUT"]))


def _turn_starts(starts: np.ndarray | None, length: int) -> list[int]:
    """TURN_STARTS: strictly increasing columns inside (0, length) (absent or empty: one batch)."""
    if starts is None or starts.size == 0:
        return []
    values = starts.reshape(-1)
    if values.dtype.kind not in "iu" or values.ndim != 1 or not (
            0 < values[0] and values[-1] < length and (np.diff(values) > 0).all()):
        raise InvalidArgument("turn_starts", f"expected increasing prompt columns in (0, {length}), got "
                                             f"{values.dtype} {values.tolist()[:8]}")
    return [int(v) for v in values]


@dataclass(frozen=True)
class EntryAppend:
    """A session's next text (None: only the end of its input), sent to tts by the session's owner."""

    request_id: str
    text: str | None
    end: bool


def parse_entry_control(get: Getter, max_text_bytes: int) -> StopRequest | EntryAppend | None:
    """A stop (STOP and REQUEST_ID alone) or a session's append (APPEND, REQUEST_ID, TEXT and/or END_INPUT)
    sent to tts; None for a synthesis, which must not carry a REQUEST_ID (ids are issued by the server)."""
    specs = {s.name: s for s in ENTRY_INPUTS}
    stop, append = _one(get, specs["STOP"]), _one(get, specs["APPEND"])
    if not (stop or append):
        for name in ("REQUEST_ID", "END_INPUT"):
            if get(name) is not None:
                raise InvalidArgument(name.lower(), "only a stop or an append carries one")
        return None
    allowed = set() if stop else {"TEXT"}
    present = [s.name for s in TTS_INPUTS if get(s.name) is not None and s.name not in allowed]
    if present or (stop and append):
        what = "a stop request carries only REQUEST_ID" if stop else "an append carries only REQUEST_ID, TEXT and END_INPUT"
        raise InvalidArgument("stop" if stop else "append", f"{what}, got {present or ['STOP', 'APPEND']}")
    request_id = check_request_id(_one(get, specs["REQUEST_ID"]))
    if stop:
        return StopRequest(request_id)
    text, end = _one(get, specs["TEXT"]), bool(_one(get, specs["END_INPUT"]))
    if text is not None:
        if not text.strip():
            raise InvalidArgument("text", "must not be empty (send END_INPUT alone to end the session)")
        if len(text.encode("utf-8")) > max_text_bytes:
            raise InvalidArgument("text", f"{len(text.encode('utf-8'))} bytes, the limit is {max_text_bytes}")
    elif not end:
        raise InvalidArgument("text", "required in an append without END_INPUT")
    return EntryAppend(request_id, text, end)


def announce_tensors(request_id: str) -> dict[str, np.ndarray]:
    """The first response of a session's stream: its id, no audio (CHUNK_INDEX SESSION_ANNOUNCE_INDEX)."""
    return {"AUDIO": np.zeros(0, np.float32), "AUDIO_INT16": np.zeros(0, np.int16),
            "CHUNK_INDEX": np.array([SESSION_ANNOUNCE_INDEX], np.int32), "SAMPLE_RATE": np.array([0], np.int32),
            "REQUEST_ID": np.array([request_id.encode()], dtype=np.object_), "TURN_INDEX": np.array([0], np.int32)}


def append_tensors(request_id: str, text: str | None, end: bool) -> dict[str, np.ndarray]:
    """The tts inputs of a session's append."""
    out = {"APPEND": np.array([True]), "REQUEST_ID": np.array([request_id.encode()], dtype=np.object_),
           "END_INPUT": np.array([end])}
    if text is not None:
        out["TEXT"] = np.array([text.encode("utf-8")], dtype=np.object_)
    return out


def dual_ar_append_tensors(request_id: str, segments: tuple[np.ndarray, ...], end: bool) -> dict[str, np.ndarray]:
    """dual_ar's inputs for a session's next segments (concatenated in PROMPT, TURN_STARTS where each starts)."""
    out = {"APPEND": np.array([True]), "REQUEST_ID": np.array([request_id.encode()], dtype=np.object_),
           "END_INPUT": np.array([end])}
    if segments:
        out["PROMPT"] = np.ascontiguousarray(np.concatenate(segments, axis=1), dtype=np.int64)
        out["TURN_STARTS"] = np.cumsum([s.shape[1] for s in segments[:-1]]).astype(np.int32)
    return out


def stop_tensors(request_id: str) -> dict[str, np.ndarray]:
    """The inputs (of tts, or of dual_ar) that stop the request with this server-issued id."""
    return {"STOP": np.array([True]), "REQUEST_ID": np.array([request_id.encode()], dtype=np.object_)}


# ---------------------------------------------------------------- building requests (client side)

def tts_inputs(text: str, *, voice_id: str | list[str] | None = None, reference_audio: np.ndarray | None = None,
               reference_sample_rate: int | None = None, reference_text: str | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               seed: int | None = None, max_frames: int | None = None, first_chunk_frames: int | None = None,
               chunk_frames: int | None = None, context_frames: int | None = None,
               sample_format: str | None = None, chunk_length: int | None = None,
               open_input: bool | None = None) -> dict[str, np.ndarray]:
    """The tensors of a tts request; fields left None are not sent (the server's defaults apply).
    ``voice_id``: one registered voice, or a list (voice i speaks the text's ``<|speaker:i|>`` turns).
    A value that its tensor type cannot hold is an InvalidArgument naming the field (never a wrap)."""
    return _arrays(TTS_INPUTS, dict(text=text, voice_id=voice_id, reference_audio=reference_audio,
                                    reference_sample_rate=reference_sample_rate, reference_text=reference_text,
                                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                    max_frames=max_frames, first_chunk_frames=first_chunk_frames,
                                    chunk_frames=chunk_frames, context_frames=context_frames,
                                    sample_format=sample_format, chunk_length=chunk_length,
                                    open_input=open_input))


def voice_inputs(action: str, voice_id: str | None = None, reference_audio: np.ndarray | None = None,
                 reference_sample_rate: int | None = None, reference_text: str | None = None,
                 admin_key: str | None = None) -> dict[str, np.ndarray]:
    return _arrays(VOICES_INPUTS, dict(action=action, voice_id=voice_id, reference_audio=reference_audio,
                                       reference_sample_rate=reference_sample_rate, reference_text=reference_text,
                                       admin_key=admin_key))


def _arrays(specs: tuple[TensorSpec, ...], values: dict) -> dict[str, np.ndarray]:
    out = {}
    for spec in specs:
        field = spec.name.lower()
        v = values[field]
        if v is None:
            continue
        if spec.dtype is np.object_:
            many = spec.dims != (1,) and isinstance(v, (list, tuple))
            if not all(isinstance(x, str) for x in (v if many else [v])) or (many and not v):
                raise InvalidArgument(field, f"expected {'one or more strings' if spec.dims != (1,) else 'a string'}, "
                                             f"got {v!r}")
            out[spec.name] = np.array([x.encode("utf-8") for x in (v if many else [v])], dtype=np.object_)
        elif spec.dims == (1,):
            kind = np.dtype(spec.dtype).kind
            if kind == "b":
                if not isinstance(v, (bool, np.bool_)):
                    raise InvalidArgument(field, f"expected true or false, got {v!r}")
            elif kind in "iu":
                info = np.iinfo(spec.dtype)
                integer(field, v, int(info.min), int(info.max))
            elif isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
                raise InvalidArgument(field, f"expected a number, got {v!r}")
            out[spec.name] = np.array([v], dtype=spec.dtype)
        else:
            out[spec.name] = np.ascontiguousarray(v, dtype=spec.dtype).reshape(-1)
    return out
