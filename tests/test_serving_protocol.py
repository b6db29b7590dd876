"""The request contract: what a client builds is what preprocess accepts; bad fields are named."""

import numpy as np
import pytest

from fish_s2.request import InvalidArgument, SamplingParams, new_request_id
from fish_s2.serving import protocol as p
from fish_s2.request import ChunkPlan

LIMITS = p.Limits(max_text_bytes=64, max_frames=100, max_reference_seconds=2.0,
                  chunk_plan=ChunkPlan(first_chunk_frames=6, chunk_frames=25, context_frames=25))


def _get(arrays):
    return lambda name: arrays.get(name)


def _parse(text="Hello.", **fields):
    return p.parse_tts_request(_get(p.tts_inputs(text, **fields)), LIMITS)


def test_defaults_are_filled_from_one_place():
    req = _parse()
    assert req.params == SamplingParams()
    assert req.max_frames == LIMITS.max_frames and req.chunk_plan == LIMITS.chunk_plan
    assert req.sample_format == "float32" and req.voice_ids == () and req.reference is None
    assert req.batches == ("Hello.",)


def test_client_fields_reach_the_request():
    audio = np.linspace(-0.5, 0.5, 16000, dtype=np.float32)
    req = _parse("Hi [laugh] there.", reference_audio=audio, reference_sample_rate=16000, reference_text="Ref.",
                 temperature=0.5, top_p=0.7, top_k=12, seed=-3, max_frames=40, first_chunk_frames=2,
                 chunk_frames=5, context_frames=0, sample_format="int16")
    assert req.text == "Hi [laugh] there." and req.sample_format == "int16" and req.max_frames == 40
    assert (req.params.temperature, req.params.top_k, req.params.seed) == (0.5, 12, -3)
    assert req.params.top_p == pytest.approx(0.7)
    assert req.chunk_plan == ChunkPlan(2, 5, 0)
    assert req.reference.sample_rate == 16000 and req.reference.text == "Ref."
    assert np.array_equal(req.reference.audio, audio)


@pytest.mark.parametrize("fields, field", [
    (dict(text="  "), "text"),
    (dict(text="x" * 65), "text"),
    (dict(temperature=2.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(max_frames=0), "max_frames"),
    (dict(max_frames=101), "max_frames"),
    (dict(first_chunk_frames=0), "first_chunk_frames"),
    (dict(chunk_frames=101), "chunk_frames"),
    (dict(context_frames=-1), "context_frames"),
    (dict(sample_format="mp3"), "sample_format"),
    (dict(voice_id="../etc"), "voice_id"),
    (dict(voice_id="a/b"), "voice_id"),
    (dict(voice_id="x" * 65), "voice_id"),
    (dict(voice_id="-lead"), "voice_id"),
    (dict(voice_id="alice", reference_audio=np.zeros(10), reference_sample_rate=16000, reference_text="t"),
     "voice_id"),
    (dict(reference_audio=np.zeros(10), reference_sample_rate=16000), "reference_text"),
    (dict(reference_text="t", reference_sample_rate=16000), "reference_audio"),
    (dict(reference_audio=np.zeros(10), reference_sample_rate=1000, reference_text="t"), "reference_sample_rate"),
    (dict(reference_audio=np.zeros(0), reference_sample_rate=16000, reference_text="t"), "reference_audio"),
    (dict(reference_audio=np.zeros(40000), reference_sample_rate=16000, reference_text="t"), "reference_audio"),
    (dict(reference_audio=np.full(10, np.inf), reference_sample_rate=16000, reference_text="t"), "reference_audio"),
    (dict(reference_audio=np.zeros(10), reference_sample_rate=16000, reference_text=" "), "reference_text"),
])
def test_bad_fields_are_named(fields, field):
    text = fields.pop("text", "Hello.")
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        _parse(text, **fields)


def test_malformed_tensors_are_named():
    arrays = p.tts_inputs("Hello.")
    with pytest.raises(InvalidArgument, match="^text: not valid UTF-8"):
        p.parse_tts_request(_get({"TEXT": np.array([b"\xff\xfe"], dtype=object)}), LIMITS)
    with pytest.raises(InvalidArgument, match=r"^top_k: expected one value"):
        p.parse_tts_request(_get({**arrays, "TOP_K": np.array([1, 2], np.int32)}), LIMITS)
    with pytest.raises(InvalidArgument, match="^text: required"):
        p.parse_tts_request(_get({}), LIMITS)


def test_client_arrays_match_the_specs():
    arrays = p.tts_inputs("Hi", voice_id="v", reference_audio=[0.0, 0.1], seed=5, sample_format="int16")
    specs = {s.name: s for s in p.TTS_INPUTS}
    assert set(arrays) == {"TEXT", "VOICE_ID", "REFERENCE_AUDIO", "SEED", "SAMPLE_FORMAT"}
    for name, a in arrays.items():
        assert a.dtype == np.dtype(specs[name].dtype) and a.ndim == 1
    assert specs["SEED"].wire_type == "INT64" and specs["TEXT"].config_type == "TYPE_STRING"


def test_generate_tensors_round_trip():
    req = _parse("Hello.", temperature=0.3, seed=7, max_frames=9, first_chunk_frames=3, sample_format="int16")
    prompt = np.arange(22, dtype=np.int64).reshape(11, 2)
    tensors = p.generate_tensors(prompt, 1, req, 123)
    assert set(tensors) == {s.name for s in p.GENERATE_INPUTS}
    rid = new_request_id()
    gen = p.parse_generate_request(_get({**tensors, **p.stop_tensors(rid), "STOP": np.array([False])}))
    assert gen.request_id == rid
    assert np.array_equal(gen.prompt, prompt) and gen.prefix_len == 1 and gen.start_ns == 123
    # float32 on the wire, as the engine's per-row sampling buffers hold them
    assert np.float32(gen.params.top_p) == np.float32(req.params.top_p) and gen.params.seed == 7
    assert gen.max_frames == 9 and gen.chunk_plan == req.chunk_plan
    assert p.SAMPLE_FORMATS[gen.format_code] == "int16"


DIALOGUE_LIMITS = p.Limits(max_text_bytes=4096, max_frames=100, max_reference_seconds=2.0, chunk_plan=ChunkPlan(),
                           max_voices=3, max_turns=6)
TWO = "<|speaker:0|>Hello there, how are you today? <|speaker:1|>Fine, thanks. <|speaker:0|>Good to hear."


def _dialogue(text=TWO, **fields):
    return p.parse_tts_request(_get(p.tts_inputs(text, **fields)), DIALOGUE_LIMITS)


def test_several_voices_and_speaker_turns():
    req = _dialogue(voice_id=["alice", "bob"])
    assert req.voice_ids == ("alice", "bob") and req.batches == (TWO.replace(" <|", "\n<|"),)   # 73 bytes: one batch
    long = " ".join(f"<|speaker:{i % 2}|>" + "word " * 12 for i in range(4))
    req = _dialogue(long, voice_id=["alice", "bob"], chunk_length=150)
    assert len(req.batches) == 2 and all(b.startswith("<|speaker:") for b in req.batches)
    assert _dialogue(voice_id="alice", text="No tags at all.").batches == ("No tags at all.",)
    assert _dialogue().batches   # no voices: the model picks the speakers, as upstream


@pytest.mark.parametrize("text, fields, field, words", [
    ("<|speaker:2|>Who am I?", dict(voice_id=["a", "b"]), "text", "names speaker 2"),
    ("<|speaker:1|>Hi.", dict(voice_id="a"), "text", "names speaker 1"),
    ("Hi.", dict(voice_id=["a", "b", "c", "d"]), "voice_id", "4 voices, the limit is 3"),
    ("<|speaker:0|>Hi. <|speaker:1|>  <|speaker:0|>Bye.", dict(voice_id=["a", "b"]), "text", "turn 1 .* is empty"),
    ("Intro. <|speaker:0|>Hi.", dict(), "text", "before the first speaker tag"),
    ("<|speaker:0|>x " * 7, dict(), "text", "7 speaker turns, the limit is 6"),
    (TWO, dict(chunk_length=99), "chunk_length", "must be in"),
    (TWO, dict(voice_id=[]), "voice_id", "one or more"),
    (TWO, dict(voice_id=["a", "../b"]), "voice_id", "must match"),
])
def test_bad_dialogues_are_named(text, fields, field, words):
    with pytest.raises(InvalidArgument, match=f"^{field}: .*{words}"):
        _dialogue(text, **fields)


def test_dialogue_segments_travel_to_dual_ar():
    req = _dialogue()
    prompt, turns = np.ones((11, 5), np.int64), (np.full((11, 3), 2, np.int64), np.full((11, 4), 3, np.int64))
    tensors = p.generate_tensors(prompt, 2, req, 0, turns)
    assert tensors["TURN_STARTS"].tolist() == [5, 8] and tensors["PROMPT"].shape == (11, 12)
    gen = p.parse_generate_request(_get({**tensors, **p.stop_tensors(new_request_id()), "STOP": np.array([False])}))
    assert np.array_equal(gen.prompt, prompt) and len(gen.turns) == 2
    assert all(np.array_equal(a, b) for a, b in zip(gen.turns, turns))
    for bad in ([0], [5, 5], [8, 5], [12], [-1]):
        tensors["TURN_STARTS"] = np.array(bad, np.int32)
        with pytest.raises(InvalidArgument, match="^turn_starts:"):
            p.parse_generate_request(_get({**tensors, **p.stop_tensors(new_request_id()), "STOP": np.array([False])}))


def test_stop_requests():
    rid = new_request_id()
    assert p.parse_generate_request(_get(p.stop_tensors(rid))) == p.StopRequest(rid)
    with pytest.raises(InvalidArgument, match="^stop:"):
        p.parse_generate_request(_get({**p.stop_tensors(rid), "SEED": np.array([1], np.int64)}))
    for bad in (None, "client-chosen", rid.upper(), rid + "0"):   # only a server-issued id names a request
        tensors = {"STOP": np.array([True])} | ({} if bad is None else
                                                 {"REQUEST_ID": np.array([bad.encode()], dtype=object)})
        with pytest.raises(InvalidArgument, match="^request_id:"):
            p.parse_generate_request(_get(tensors))
    tensors = {**p.generate_tensors(np.zeros((11, 3), np.int64), 0, _parse(), 0), **p.stop_tensors(rid)}
    tensors["STOP"] = np.array([False])
    del tensors["TOP_P"]
    with pytest.raises(InvalidArgument, match="^top_p: required"):
        p.parse_generate_request(_get(tensors))


@pytest.mark.parametrize("meta, message", [
    (None, "chunk_meta: expected 5 integers"), (np.arange(4), "chunk_meta: expected 5 integers"),
    (np.array([0.5, 1, 0, 0, 0]), "chunk_meta: expected 5 integers"), (np.array([0, 1, 7, 0, 0]), "chunk_meta: must be in"),
    (np.array([-1, 1, 0, 0, 0]), "chunk_meta: must be in"), (np.array([0, 1, 0, 0, -2]), "chunk_meta: must be in")])
def test_internal_inputs_are_validated(meta, message):
    with pytest.raises(InvalidArgument, match=message):
        p.ChunkMeta.unpack(meta)
    with pytest.raises(InvalidArgument, match="^codes:"):
        p.check_chunk_codes(np.zeros((2, 10, 3), np.int64))
    with pytest.raises(InvalidArgument, match="^decoded:"):
        p.check_decoded(np.zeros(10, np.float32), p.ChunkMeta(0, 1, 0, 0), 4)


def test_chunk_meta_and_pcm16():
    meta = p.ChunkMeta(3, 25, 1, 1 << 60, 2)
    assert p.ChunkMeta.unpack(meta.pack()) == meta
    assert p.to_pcm16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])).tolist() == [-32767, -32767, 0, 16384, 32767, 32767]


def test_voice_requests():
    get = lambda **kw: _get(p.voice_inputs(**kw))  # noqa: E731
    assert p.parse_voice_request(get(action="list"), 2.0).action == "list"
    req = p.parse_voice_request(get(action="register", voice_id="bob_2", reference_audio=np.zeros(100),
                                    reference_sample_rate=16000, reference_text="Hi."), 2.0)
    assert req.voice_id == "bob_2" and req.reference.text == "Hi."
    for kw, field in [(dict(action="rename"), "action"), (dict(action="delete"), "voice_id"),
                      (dict(action="delete", voice_id="a\\b"), "voice_id"),
                      (dict(action="register", voice_id="bob"), "reference_audio")]:
        with pytest.raises(InvalidArgument, match=f"^{field}:"):
            p.parse_voice_request(get(**kw), 2.0)
