"""codec_decoder (python backend): code chunks -> audio, batched across requests.

Input CODES [codebooks, context + n] (int64) per request; output AUDIO [(context + n) * frame_length]
float32 (the left-context samples are dropped by postprocess). Requests of equal length are decoded
as one batch. Runtime ("torch" codec from the checkpoint, or "onnx" = ONNX Runtime) comes from the
serving config. ``initialize`` decodes a chunk of each default size before Triton reports the model
ready (warm-up time logged and exported as ``fish_s2_warmup_seconds{model="codec_decoder"}``).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from fish_s2.serving import metrics, protocol
from fish_s2.serving.adapter import check_io, error_response, getter, load_model_settings
from fish_s2.serving.runtime import build_codec_decoder, configure_threads, on_instance_device, warm_up_codec


class TritonPythonModel:
    def initialize(self, args):
        model_config, cfg = load_model_settings(args)
        check_io(model_config, protocol.CODEC_INPUTS, protocol.CODEC_OUTPUTS)
        configure_threads(cfg)
        cfg = on_instance_device(cfg, args)      # one codec group per GPU: this instance's GPU
        self.decoder = build_codec_decoder(cfg)
        seconds = warm_up_codec(self.decoder, cfg)
        pb_utils.Logger.log_info(f"codec_decoder: warm-up done in {seconds:.2f} s")
        self._warmup_metric = metrics.set_gauges(pb_utils, [(metrics.WARMUP.name, {"model": "codec_decoder"}, seconds)])

    def execute(self, requests):
        responses = [None] * len(requests)
        by_shape = {}
        codes = {}
        for i, r in enumerate(requests):
            try:
                codes[i] = protocol.check_chunk_codes(getter(pb_utils, r)("CODES"))   # [1, nc, F]
                by_shape.setdefault(codes[i].shape, []).append(i)
            except Exception as e:
                responses[i] = error_response(pb_utils, e)
        for idx in by_shape.values():
            try:
                audio = self.decoder.decode(np.concatenate([codes[i] for i in idx]))
                for row, i in enumerate(idx):
                    responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("AUDIO", audio[row:row + 1])])
            except Exception as e:  # a failed batch fails its own requests only
                for i in idx:
                    responses[i] = error_response(pb_utils, e)
        return responses

    def finalize(self):
        self._warmup_metric = None   # now, not at the stub's teardown (metrics.py)
