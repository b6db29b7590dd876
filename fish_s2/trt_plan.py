"""A TensorRT plan with one input and one output, run on the GPU from torch tensors (TensorRT 10 API:
named tensors, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``).

TensorRT is imported when a plan is loaded, never at import time: this module loads on any machine,
and only a GPU host with TensorRT's Python package (the serving image) runs a plan. Used for the
codec encoder plan (reference voices on the gpu profile) and by build/selfcheck.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


class TrtPlan:
    def __init__(self, path: str | Path, device: str = "cuda"):
        import tensorrt as trt
        import torch

        self.path, self.torch = Path(path), torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{self.path}: TensorRT could not deserialize the plan (built by another TensorRT "
                               "version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{self.path}: expected one input and one output, got {inputs} and {outputs}")
        (self.input,), (self.output,) = inputs, outputs
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                  trt.int64: torch.int64}
        self.output_dtype = dtypes[self.engine.get_tensor_dtype(self.output)]
        self.device = torch.device(device)
        # the largest input shape of the plan's first optimization profile (min, opt, max)
        self.max_shape = tuple(self.engine.get_tensor_profile_shape(self.input, 0)[2])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        if len(x.shape) != len(self.max_shape) or any(a > b for a, b in zip(x.shape, self.max_shape)):
            raise ValueError(f"{self.input}: shape {list(x.shape)} is outside the plan's profile (max "
                             f"{list(self.max_shape)})")
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        self.context.set_input_shape(self.input, tuple(xt.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.output_dtype, device=self.device)
        self.context.set_tensor_address(self.input, xt.data_ptr())
        self.context.set_tensor_address(self.output, y.data_ptr())
        stream = torch.cuda.Stream(device=self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path}: execute_async_v3 failed")
        stream.synchronize()
        return y.cpu().numpy()


class TrtCodecEncoder:
    """audio float [B, N] -> codes int64 [B, n_codebooks, ceil(N / frame_length)] through the codec encoder
    plan (zero-padded to whole frames, as the ONNX graph it was built from expects)."""

    def __init__(self, path: str | Path, frame_length: int, device: str = "cuda", plan_cls=TrtPlan):
        self.plan, self.frame_length = plan_cls(path, device), frame_length

    def encode(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2 or 0 in audio.shape:
            raise ValueError(f"audio: expected a non-empty [batch, samples] array, got shape {list(audio.shape)}")
        padded = math.ceil(audio.shape[1] / self.frame_length) * self.frame_length
        if padded > self.plan.max_shape[1]:
            raise ValueError(f"audio: at most {self.plan.max_shape[1]} samples per call (the encoder plan's "
                             f"profile), got {audio.shape[1]}")
        return self.plan(np.pad(audio, ((0, 0), (0, padded - audio.shape[1])))).astype(np.int64, copy=False)
