"""tts: the client-facing entry (decoupled). Inputs: a synthesis (the tts contract of
:mod:`fish_s2.serving.protocol`, TEXT required; OPEN_INPUT for a session), a stop (STOP and REQUEST_ID,
the server-issued id its stream's responses carry), or a session's next text (APPEND, REQUEST_ID, TEXT
and/or END_INPUT: split into turn batches here and appended to the running engine request). Outputs:
one response per audio chunk (a session's stream first announces its id).

``execute`` checks that every required input is there (INVALID_ARG naming the field, at once),
issues the request's server-side id and hands it to :class:`fish_s2.serving.relay.Relay`, which
streams it through the ``tts_pipeline`` ensemble and stops its engine request when the client
cancels or disconnects, or when its owner stops it (the stream then ends CANCELLED). Every request
ends with exactly one FINAL response.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from fish_s2.prompt import PromptBuilder
from fish_s2.request import InvalidArgument, NotFound, new_request_id
from fish_s2.request.dialogue import SERVER_CHUNK_LENGTH, check_dialogue
from fish_s2.serving import protocol
from fish_s2.serving.adapter import check_io, error_response, getter, load_model_settings
from fish_s2.serving.relay import Relay, Session
from fish_s2.serving.runtime import load_text_side

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        model_config, cfg = load_model_settings(args)
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("tts: config.pbtxt must set model_transaction_policy { decoupled: true }")
        check_io(model_config, protocol.ENTRY_INPUTS, protocol.TTS_OUTPUTS)
        dual_cfg, tokenizer = load_text_side(cfg)   # a session's later text becomes its next turns here
        self.builder = PromptBuilder(tokenizer, dual_cfg.num_codebooks, cfg.allow_control_tokens)
        self.limits = cfg.limits()
        self.relay = Relay(pb_utils, cfg.engine.cancel_check_ms / 1000)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                get = getter(pb_utils, request)
                control = protocol.parse_entry_control(get, self.limits.max_text_bytes)
                if isinstance(control, protocol.StopRequest):
                    self.relay.stop_owned(control.request_id)
                    sender.send(flags=FINAL)
                    continue
                if isinstance(control, protocol.EntryAppend):
                    stream, session = self.relay.session(control.request_id)
                    try:
                        session.appends.submit(self._append, control, stream, session, sender)
                    except RuntimeError:   # the session ended just now (its append thread is gone)
                        raise NotFound("request_id", "no session with this id is running on this server") from None
                    continue
                protocol.check_required(get, protocol.TTS_INPUTS)
                inputs = {s.name: a for s in protocol.TTS_INPUTS if (a := get(s.name)) is not None}
                request_id = new_request_id()
                inputs["STREAM_ID"] = np.array([request_id.encode()], dtype=np.object_)
                self.relay.start(request_id, inputs, sender, self._session(inputs))
            except Exception as e:
                sender.send(error_response(pb_utils, e), flags=FINAL)
        return None

    @staticmethod
    def _session(inputs: dict) -> Session | None:
        """A session's bounds for its later text (preprocess validates the opening request itself)."""
        if not ("OPEN_INPUT" in inputs and inputs["OPEN_INPUT"].size == 1 and bool(inputs["OPEN_INPUT"].reshape(-1)[0])):
            return None
        voices = inputs["VOICE_ID"].size if "VOICE_ID" in inputs else int("REFERENCE_AUDIO" in inputs)
        length = inputs.get("CHUNK_LENGTH")
        chunk_length = SERVER_CHUNK_LENGTH if length is None or length.size != 1 else int(length.reshape(-1)[0])
        return Session(voices, chunk_length, turns=1)

    def _append(self, append: protocol.EntryAppend, stream, session, sender) -> None:
        """One append of a session (on the session's own thread, in arrival order); its one FINAL."""
        response = None
        try:
            segments = ()
            if append.text is not None:
                batches = check_dialogue(append.text, session.voices, self.limits.max_voices, self.limits.max_turns,
                                         session.chunk_length)
                if session.turns + len(batches) > self.limits.max_turns:
                    raise InvalidArgument("text", f"the session would have {session.turns + len(batches)} turn "
                                                  f"batches, the limit is {self.limits.max_turns}")
                segments = tuple(self.builder.next_turn(b).numpy() for b in batches)
                session.turns += len(batches)
            self.relay.append(stream, segments, append.end)
        except Exception as e:
            response = error_response(pb_utils, e)
        finally:
            sender.send(response, flags=FINAL)

    def finalize(self):
        self.relay.close()
