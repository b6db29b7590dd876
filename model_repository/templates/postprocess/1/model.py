"""postprocess: one audio chunk -> the client's format.

Inputs: DECODED (the codec's samples of context + new frames), CHUNK_META (index, context frames,
format code, start ns), REQUEST_ID. Outputs: AUDIO (float32) or AUDIO_INT16 (PCM16) holding the
chunk's new samples (the other one empty), CHUNK_INDEX, SAMPLE_RATE, REQUEST_ID. Records the time to
first audio when chunk 0 passes, and the playback gap: a real-time player per stream, started by its
chunk 0, waits for each later chunk that arrives after the audio before it has played out. A stream
is followed while its chunks pass this instance in order (with several postprocess instances, the
streams whose chunks all pass one instance); one that idles for STALE_S is forgotten.
"""

import time
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

from fish_s2.codec import CodecConfig
from fish_s2.request import Player
from fish_s2.serving import metrics, protocol
from fish_s2.serving.adapter import check_io, error_response, getter, load_model_settings, output_tensors


STALE_S = 60.0


class TritonPythonModel:
    def initialize(self, args):
        model_config, cfg = load_model_settings(args)
        check_io(model_config, protocol.POSTPROCESS_INPUTS, protocol.TTS_OUTPUTS)
        codec = CodecConfig.for_checkpoint(cfg.checkpoint)
        self.frame_length, self.sample_rate = codec.frame_length, codec.sample_rate
        self._ttfa_family, self.ttfa = metrics.create(pb_utils, metrics.TTFA)
        self._gap_family, self.gap = metrics.create(pb_utils, metrics.PLAYBACK_GAP)
        self.players: OrderedDict = OrderedDict()   # request id -> [player, next chunk index, last seen]

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
        request_id = protocol.check_request_id(protocol.one_string(get, "REQUEST_ID"))
        self._playback(request_id, meta, samples.size / self.sample_rate)
        pcm16 = protocol.SAMPLE_FORMATS[meta.format_code] == "int16"
        return {"AUDIO": np.zeros(0, np.float32) if pcm16 else samples.astype(np.float32),
                "AUDIO_INT16": protocol.to_pcm16(samples) if pcm16 else np.zeros(0, np.int16),
                "CHUNK_INDEX": np.array([meta.index], np.int32),
                "SAMPLE_RATE": np.array([self.sample_rate], np.int32),
                "REQUEST_ID": np.array([request_id.encode()], dtype=np.object_),
                "TURN_INDEX": np.array([meta.turn], np.int32)}

    def _playback(self, request_id, meta, seconds: float) -> None:
        """Time to first audio at chunk 0; the wait for a late chunk into the playback-gap histogram."""
        now = time.monotonic()
        if meta.index == 0:
            self.ttfa.observe((time.monotonic_ns() - meta.start_ns) / 1e9)
            self.players[request_id] = [Player(), 0, now]
        entry = self.players.pop(request_id, None)
        if entry is not None and entry[1] == meta.index:   # every chunk so far passed here, in order
            if (wait := entry[0].add(now, seconds)) > 0:
                self.gap.observe(wait)
            self.players[request_id] = [entry[0], meta.index + 1, now]   # kept in order of last use
        while self.players and next(iter(self.players.values()))[2] < now - STALE_S:
            self.players.popitem(last=False)

    def finalize(self):
        self._ttfa_family = self.ttfa = self._gap_family = self.gap = None   # not at the stub's teardown (metrics.py)
