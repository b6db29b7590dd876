"""tts: the client-facing entry (decoupled). Inputs: a synthesis (the tts contract of
:mod:`fish_s2.serving.protocol`, TEXT required), or a stop (STOP and REQUEST_ID, the server-issued id
its stream's responses carry). Outputs: one response per audio chunk.

``execute`` checks that every required input is there (INVALID_ARG naming the field, at once),
issues the request's server-side id and hands it to :class:`fish_s2.serving.relay.Relay`, which
streams it through the ``tts_pipeline`` ensemble and stops its engine request when the client
cancels or disconnects, or when its owner stops it (the stream then ends CANCELLED). Every request
ends with exactly one FINAL response.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from fish_s2.request import new_request_id
from fish_s2.serving import protocol
from fish_s2.serving.adapter import check_io, error_response, getter, load_model_settings
from fish_s2.serving.relay import Relay

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        model_config, cfg = load_model_settings(args)
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("tts: config.pbtxt must set model_transaction_policy { decoupled: true }")
        check_io(model_config, protocol.ENTRY_INPUTS, protocol.TTS_OUTPUTS)
        self.relay = Relay(pb_utils, cfg.engine.cancel_check_ms / 1000)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                get = getter(pb_utils, request)
                stop_id = protocol.parse_entry_stop(get)
                if stop_id is not None:
                    self.relay.stop_owned(stop_id)
                    sender.send(flags=FINAL)
                    continue
                protocol.check_required(get, protocol.TTS_INPUTS)
                inputs = {s.name: a for s in protocol.TTS_INPUTS if (a := get(s.name)) is not None}
                request_id = new_request_id()
                inputs["STREAM_ID"] = np.array([request_id.encode()], dtype=np.object_)
                self.relay.start(request_id, inputs, sender)
            except Exception as e:
                sender.send(error_response(pb_utils, e), flags=FINAL)
        return None

    def finalize(self):
        self.relay.close()
