"""The TensorRT plan runner against a stand-in for TensorRT (which cannot be installed here): the calls
it makes follow TensorRT 10's API, shapes outside the plan's profile are refused before they reach
TensorRT, and the codec encoder pads to whole frames and returns int64 codes. The stand-in reads and
writes the tensors through the addresses it is given, as TensorRT does (CPU memory here)."""

import ctypes
import sys
import types

import numpy as np
import pytest
import torch

from fish_s2.trt_plan import TrtCodecEncoder, TrtPlan

FRAME, CODEBOOKS, MAX_SAMPLES = 4, 3, 32


def _fake_tensorrt():
    trt = types.ModuleType("tensorrt")
    trt.float32, trt.float16, trt.int32, trt.int64 = "f32", "f16", "i32", "i64"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Context:
        def __init__(self):
            self.shape, self.addr = None, {}

        def set_input_shape(self, name, shape):
            assert name == "audio"
            self.shape = shape

        def get_tensor_shape(self, name):
            assert name == "codes"
            return (self.shape[0], CODEBOOKS, self.shape[1] // FRAME)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):   # codes = mean of each frame's samples, rounded, per codebook + k
            b, n = self.shape
            audio = np.ctypeslib.as_array((ctypes.c_float * (b * n)).from_address(self.addr["audio"])).reshape(b, n)
            out = np.ctypeslib.as_array((ctypes.c_int64 * (b * CODEBOOKS * (n // FRAME))).from_address(
                self.addr["codes"])).reshape(b, CODEBOOKS, n // FRAME)
            frames = np.round(audio.reshape(b, n // FRAME, FRAME).mean(-1) * 100).astype(np.int64)
            out[:] = frames[:, None, :] + np.arange(CODEBOOKS)[None, :, None]
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("audio", "codes")[i]

        def get_tensor_mode(self, name):
            return "in" if name == "audio" else "out"

        def get_tensor_dtype(self, name):
            return "i64"

        def get_tensor_profile_shape(self, name, profile):
            return [(1, FRAME), (1, 16), (2, MAX_SAMPLES)]

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"plan" else None

    trt.Runtime = Runtime
    return trt


@pytest.fixture()
def cpu_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: types.SimpleNamespace(cuda_stream=0,
                                                                                         synchronize=lambda: None))


def test_codec_encoder_plan_pads_to_frames_and_returns_int64_codes(cpu_tensorrt, tmp_path):
    (tmp_path / "enc.plan").write_bytes(b"plan")
    encoder = TrtCodecEncoder(tmp_path / "enc.plan", FRAME, device="cpu")
    audio = np.array([[0.1] * 4 + [0.3] * 4 + [0.5] * 2], np.float32)     # 10 samples: padded to 12
    codes = encoder.encode(audio)
    assert codes.dtype == np.int64 and codes.shape == (1, CODEBOOKS, 3)
    assert codes[0, 0].tolist() == [10, 30, 25] and codes[0, 2].tolist() == [12, 32, 27]
    with pytest.raises(ValueError, match="audio: at most 32 samples per call"):
        encoder.encode(np.zeros((1, 33), np.float32))
    with pytest.raises(ValueError, match="audio: outside|audio: shape .* outside the plan's profile"):
        encoder.plan(np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="expected a non-empty"):
        encoder.encode(np.zeros((1, 0), np.float32))


def test_a_plan_that_does_not_deserialize_is_a_clear_error(cpu_tensorrt, tmp_path):
    (tmp_path / "bad.plan").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="could not deserialize the plan"):
        TrtPlan(tmp_path / "bad.plan", device="cpu")
