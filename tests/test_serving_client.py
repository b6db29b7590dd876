"""Client pieces that need no server: reordering, the wire format, WAV writing, the say CLI's arguments."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor

from fish_s2.client import AudioChunk, ChunkReorderer, Synthesis, _infer_request, _parse, write_wav
from fish_s2.request import Internal, InvalidArgument
from fish_s2.serving import protocol

REPO = Path(__file__).resolve().parents[1]


def _chunk(i, n=4):
    return AudioChunk(i, np.full(n, i, np.float32), 44100, "r")


def test_reorderer_releases_contiguous_chunks_in_order():
    r = ChunkReorderer()
    assert r.push(_chunk(1)) == [] and r.push(_chunk(2)) == []
    assert [c.index for c in r.push(_chunk(0))] == [0, 1, 2]
    assert [c.index for c in r.push(_chunk(3))] == [3]
    r.finish()
    with pytest.raises(Internal, match="chunk 3 arrived twice"):
        r.push(_chunk(3))


def test_reorderer_reports_missing_chunks():
    r = ChunkReorderer()
    r.push(_chunk(0))
    r.push(_chunk(3))
    with pytest.raises(Internal, match=r"chunks \[1, 2\] missing"):
        r.finish()


def test_request_encoding():
    arrays = protocol.tts_inputs("Grüße [laugh]", seed=-5, reference_audio=np.arange(3, dtype=np.float32))
    req = _infer_request("tts", arrays, "id-1", stream=True)
    assert req.model_name == "tts" and req.id == "id-1"
    assert req.parameters["triton_enable_empty_final_response"].bool_param
    by_name = {t.name: (t, raw) for t, raw in zip(req.inputs, req.raw_input_contents)}
    text, raw = by_name["TEXT"]
    assert text.datatype == "BYTES" and deserialize_bytes_tensor(raw)[0].decode() == "Grüße [laugh]"
    seed, raw = by_name["SEED"]
    assert seed.datatype == "INT64" and np.frombuffer(raw, np.int64).tolist() == [-5]
    audio, raw = by_name["REFERENCE_AUDIO"]
    assert list(audio.shape) == [3] and np.frombuffer(raw, np.float32).tolist() == [0, 1, 2]
    assert "triton_enable_empty_final_response" not in _infer_request("voices", {}, "x", stream=False).parameters


def _response(final, outputs=None, error=""):
    resp = service_pb2.ModelStreamInferResponse(error_message=error)
    resp.infer_response.parameters["triton_final_response"].bool_param = final
    for name, array in (outputs or {}).items():
        out = resp.infer_response.outputs.add()
        out.name, out.datatype = name, next(s.wire_type for s in protocol.TTS_OUTPUTS if s.name == name)
        out.shape.extend(array.shape)
        resp.infer_response.raw_output_contents.append(
            b"".join(len(v).to_bytes(4, "little") + v for v in array) if array.dtype == object else array.tobytes())
    return resp


def test_stream_responses():
    assert _parse(_response(True)) == (None, True)
    outputs = {"AUDIO": np.zeros(0, np.float32), "AUDIO_INT16": np.array([1, -2], np.int16),
               "CHUNK_INDEX": np.array([4], np.int32), "SAMPLE_RATE": np.array([44100], np.int32),
               "REQUEST_ID": np.array([b"abc"], dtype=object), "TURN_INDEX": np.array([2], np.int32)}
    chunk, final = _parse(_response(False, outputs))
    assert not final and (chunk.index, chunk.sample_rate, chunk.request_id, chunk.turn) == (4, 44100, "abc", 2)
    assert chunk.audio.dtype == np.int16 and chunk.audio.tolist() == [1, -2]
    with pytest.raises(InvalidArgument, match="text: must not be empty"):
        _parse(_response(False, error="in ensemble 'tts', text: must not be empty [fish-s2:INVALID_ARGUMENT]"))


def test_wav_and_rtf(tmp_path):
    audio = np.linspace(-1.2, 1.2, 4410, dtype=np.float32)
    result = Synthesis(audio, 44100, "r", 2, 0.05, 0.05)
    assert result.duration == pytest.approx(0.1) and result.rtf == pytest.approx(0.5)
    result.write_wav(tmp_path / "a.wav")
    write_wav(tmp_path / "b.wav", protocol.to_pcm16(audio), 44100)
    a, rate = sf.read(tmp_path / "a.wav", dtype="int16")
    b, _ = sf.read(tmp_path / "b.wav", dtype="int16")
    assert rate == 44100 and np.array_equal(a, b) and a.max() == 32767


def _say():
    spec = importlib.util.spec_from_file_location("say", REPO / "client" / "say.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_say_argument_errors(capsys):
    say = _say()
    with pytest.raises(SystemExit):    # one voice source at most
        say.main(["Hi", "-o", "x.wav", "--voice", "a", "--reference-audio", "a.wav"])
    assert say.main(["Hi", "-o", "x.wav", "--reference-audio", "a.wav", "--url", "127.0.0.1:1"]) == 2
    assert "--reference-text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        say.main(["voices", "add", "alice"])        # needs the reference
    args = say._voices_parser().parse_args(["--url", "h:1", "delete", "bob"])
    assert (args.action, args.voice_id, args.url) == ("delete", "bob", "h:1")
    assert say.main(["Hi", "-o", "x.wav", "--url", "127.0.0.1:1,127.0.0.1:2"]) == 1    # a fleet, none up
    assert "error:" in capsys.readouterr().err
