"""postprocess: one audio chunk -> the client's format.

Inputs: DECODED (the codec's samples of context + new frames), CHUNK_META (index, context frames,
format code, start ns), REQUEST_ID. Outputs: AUDIO (float32) or AUDIO_INT16 (PCM16) holding the
chunk's new samples (the other one empty), CHUNK_INDEX, SAMPLE_RATE, REQUEST_ID. Records the time to
first audio when chunk 0 passes.
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from fish_s2.codec import CodecConfig
from fish_s2.serving import metrics, protocol
from fish_s2.serving.adapter import check_io, error_response, getter, load_model_settings, output_tensors


class TritonPythonModel:
    def initialize(self, args):
        model_config, cfg = load_model_settings(args)
        check_io(model_config, protocol.POSTPROCESS_INPUTS, protocol.TTS_OUTPUTS)
        codec = CodecConfig.for_checkpoint(cfg.checkpoint)
        self.frame_length, self.sample_rate = codec.frame_length, codec.sample_rate
        self._ttfa_family, self.ttfa = metrics.create(pb_utils, metrics.TTFA)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors(pb_utils, self._chunk(request))))
            except Exception as e:
                responses.append(error_response(pb_utils, e))
        return responses

    def _chunk(self, request) -> dict:
        get = getter(pb_utils, request)
        meta = protocol.ChunkMeta.unpack(get("CHUNK_META"))
        samples = protocol.check_decoded(get("DECODED"), meta, self.frame_length)
        if meta.index == 0:
            self.ttfa.observe((time.monotonic_ns() - meta.start_ns) / 1e9)
        pcm16 = protocol.SAMPLE_FORMATS[meta.format_code] == "int16"
        return {"AUDIO": np.zeros(0, np.float32) if pcm16 else samples.astype(np.float32),
                "AUDIO_INT16": protocol.to_pcm16(samples) if pcm16 else np.zeros(0, np.int16),
                "CHUNK_INDEX": np.array([meta.index], np.int32),
                "SAMPLE_RATE": np.array([self.sample_rate], np.int32),
                "REQUEST_ID": np.array([protocol.check_request_id(protocol.one_string(get, "REQUEST_ID")).encode()],
                                       dtype=np.object_)}
