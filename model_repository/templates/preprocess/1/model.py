"""preprocess: validate a tts request, resolve its voice, build its prompt.

Inputs: the tts inputs (TEXT; VOICE_ID (one or several: voice i speaks <|speaker:i|>), or
REFERENCE_AUDIO + REFERENCE_SAMPLE_RATE + REFERENCE_TEXT; TEMPERATURE, TOP_P, TOP_K, SEED, MAX_FRAMES;
FIRST_CHUNK_FRAMES, CHUNK_FRAMES, CONTEXT_FRAMES; SAMPLE_FORMAT; CHUNK_LENGTH), all but TEXT optional.
Outputs: a complete generation request for dual_ar (PROMPT [rows, T] with a dialogue's later turn
batches appended and TURN_STARTS where each starts, PREFIX_LEN = the system block with every voice,
the resolved sampling and chunk settings, FORMAT_CODE, START_NS). Bad input gets an INVALID_ARG error
naming the field; while the replica drains (:mod:`fish_s2.serving.drain`) every request gets
UNAVAILABLE, so clients retry elsewhere.
"""

import time

import torch
import triton_python_backend_utils as pb_utils

from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.request import InvalidArgument
from fish_s2.serving import protocol
from fish_s2.serving.adapter import check_io, error_response, getter, load_model_settings, output_tensors
from fish_s2.serving.drain import drain_file, refuse_if_draining
from fish_s2.serving.runtime import ReferenceEncoder, configure_threads, load_text_side
from fish_s2.serving.voices import VoiceRegistry


class TritonPythonModel:
    def initialize(self, args):
        model_config, self.cfg = load_model_settings(args)
        check_io(model_config, protocol.TTS_INPUTS, protocol.GENERATE_INPUTS)
        configure_threads(self.cfg)
        dual_cfg, tokenizer = load_text_side(self.cfg)
        self.builder = PromptBuilder(tokenizer, dual_cfg.num_codebooks, self.cfg.allow_control_tokens)
        self.voices = VoiceRegistry(self.cfg.voices_dir, dual_cfg.num_codebooks)
        self.encoder = ReferenceEncoder(self.cfg)
        self.limits = self.cfg.limits()
        self.drain_flag = drain_file()

    def execute(self, requests):
        responses = []
        for request in requests:
            start_ns = time.monotonic_ns()
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors(pb_utils, self._prepare(request, start_ns))))
            except Exception as e:
                responses.append(error_response(pb_utils, e))
        return responses

    def _prepare(self, request, start_ns: int) -> dict:
        refuse_if_draining(self.drain_flag)
        req = protocol.parse_tts_request(getter(pb_utils, request), self.limits)
        if req.reference is not None:
            codes = self.encoder(req.reference.audio, req.reference.sample_rate)
            references = [Reference(req.reference.text, torch.from_numpy(codes))]
        else:
            references = [self.voices.get(voice_id).reference() for voice_id in req.voice_ids]
        dialogue = self.builder.dialogue(list(req.batches), references)
        limit = self.cfg.engine.max_prompt_tokens
        if dialogue.n_tokens > limit:
            raise InvalidArgument("text", f"the prompt (voices and text) is {dialogue.n_tokens} tokens, the limit is "
                                          f"{limit}")
        return protocol.generate_tensors(dialogue.prompt.numpy(), dialogue.prefix_len, req, start_ns,
                                         tuple(t.numpy() for t in dialogue.turns))
