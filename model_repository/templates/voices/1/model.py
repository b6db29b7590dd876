"""voices: register, list and delete voices.

Inputs: ACTION ("register" | "list" | "delete"); VOICE_ID for register and delete; REFERENCE_AUDIO
(float32 mono), REFERENCE_SAMPLE_RATE and REFERENCE_TEXT for register. Output VOICES: one JSON
object (voice_id, text, frames) per voice registered, listed or deleted. Registration encodes the
reference, stores its codes under the voices folder and warms the engine's prefix cache with the
voice's system block (a one-frame request to dual_ar). Ids are checked against a strict pattern
before any path is built; bad input gets INVALID_ARG, an unknown id NOT_FOUND, a taken one
ALREADY_EXISTS. Register and delete need ADMIN_KEY equal to the server's admin key
($FISH_S2_ADMIN_KEY in the server's environment, set by the launcher) when it has one.
"""

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from fish_s2.prompt import PromptBuilder
from fish_s2.request import SamplingParams, new_request_id
from fish_s2.serving import protocol
from fish_s2.serving.adapter import check_io, error_response, getter, load_model_settings
from fish_s2.serving.bls import SpentStreams
from fish_s2.serving.runtime import ReferenceEncoder, configure_threads, load_text_side
from fish_s2.serving.voices import VoiceRegistry


class TritonPythonModel:
    def initialize(self, args):
        model_config, self.cfg = load_model_settings(args)
        check_io(model_config, protocol.VOICES_INPUTS, protocol.VOICES_OUTPUTS)
        configure_threads(self.cfg)
        dual_cfg, tokenizer = load_text_side(self.cfg)
        self.builder = PromptBuilder(tokenizer, dual_cfg.num_codebooks, self.cfg.allow_control_tokens)
        self.registry = VoiceRegistry(self.cfg.voices_dir, dual_cfg.num_codebooks)
        self.encoder = ReferenceEncoder(self.cfg)
        self.spent = SpentStreams()   # the warm-up call's responses, dropped only after a round trip (bls.py)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                voices = self._handle(protocol.parse_voice_request(getter(pb_utils, request),
                                                                   self.cfg.max_reference_seconds))
                out = np.array([json.dumps(v).encode() for v in voices], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("VOICES", out)]))
            except Exception as e:
                responses.append(error_response(pb_utils, e))
            self.spent.release_after(request.is_cancelled)   # this request is still open: a safe check
        return responses

    def _handle(self, req: protocol.VoiceRequest) -> list[dict]:
        if req.action == "list":
            return [v.info() for v in self.registry.list()]
        protocol.check_admin_key(req.admin_key, os.environ.get("FISH_S2_ADMIN_KEY"))
        if req.action == "delete":
            self.registry.delete(req.voice_id)
            return [{"voice_id": req.voice_id, "deleted": True}]
        ref = req.reference
        voice = self.registry.add(req.voice_id, ref.text, self.encoder(ref.audio, ref.sample_rate))
        self._warm(voice)
        return [voice.info()]

    def _warm(self, voice) -> None:
        """One frame through dual_ar with the voice's prompt: its prefix KV lands in the engine's cache."""
        prompt, prefix_len = self.builder.request("", [voice.reference()])
        req = protocol.TTSRequest("", ("",), (), None, SamplingParams(), 1, self.cfg.engine.chunk_plan, "float32")
        tensors = {**protocol.generate_tensors(prompt.numpy(), prefix_len, req, time.monotonic_ns()),
                   "REQUEST_ID": np.array([new_request_id().encode()], dtype=np.object_)}
        bls = pb_utils.InferenceRequest(model_name=protocol.DUAL_AR,
                                        inputs=[pb_utils.Tensor(k, v) for k, v in tensors.items()],
                                        requested_output_names=["CHUNK_META"])
        for response in self.spent.exec(bls):
            if response.has_error():
                pb_utils.Logger.log_warn(f"voices: warming {voice.voice_id!r} failed: {response.error().message()}")

    def finalize(self):
        self.spent.release_all()
