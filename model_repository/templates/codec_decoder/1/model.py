"""codec_decoder (python backend): code chunks -> audio, batched across requests.

Input CODES [codebooks, context + n] (int64) per request; output AUDIO [(context + n) * frame_length]
float32 (the left-context samples are dropped by postprocess). Requests of equal length are decoded
as one batch. Runtime ("torch" codec from the checkpoint, or "onnx" = ONNX Runtime) comes from the
serving config.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from fish_s2.serving import protocol
from fish_s2.serving.adapter import check_io, error_response, load_model_settings
from fish_s2.serving.runtime import build_codec_decoder, configure_threads, on_instance_device


class TritonPythonModel:
    def initialize(self, args):
        model_config, cfg = load_model_settings(args)
        check_io(model_config, protocol.CODEC_INPUTS, protocol.CODEC_OUTPUTS)
        configure_threads(cfg)
        self.decoder = build_codec_decoder(on_instance_device(cfg, args))

    def execute(self, requests):
        codes = [pb_utils.get_input_tensor_by_name(r, "CODES").as_numpy() for r in requests]  # [1, nc, F] each
        responses = [None] * len(requests)
        by_shape = {}
        for i, c in enumerate(codes):
            by_shape.setdefault(c.shape, []).append(i)
        for idx in by_shape.values():
            try:
                audio = self.decoder.decode(np.concatenate([codes[i] for i in idx]))
                for row, i in enumerate(idx):
                    responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("AUDIO", audio[row:row + 1])])
            except Exception as e:  # a failed batch fails its own requests only
                for i in idx:
                    responses[i] = error_response(pb_utils, e)
        return responses
