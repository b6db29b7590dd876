"""dual_ar: hosts one batched Dual-AR engine for every concurrent request (decoupled).

Inputs: a generation request from preprocess (PROMPT [rows, T], PREFIX_LEN, TEMPERATURE, TOP_P,
TOP_K, SEED, MAX_FRAMES, CHUNK_PLAN, FORMAT_CODE, START_NS) with REQUEST_ID (the server-issued id
from tts, the engine's request id), or STOP with REQUEST_ID, which stops that running request.
Outputs, one response per code chunk: CODES [codebooks, context + n], CHUNK_META (index, context
frames, format code, start ns), REQUEST_ID. Every request ends with exactly one FINAL response:
empty at the end of speech, the frame limit or a stop (tts, which sends the stops, tells its client
that the stream was cancelled), else carrying its typed error.

``initialize`` plans the memory before loading any weight (logged, exported as metrics; settings that
cannot fit are refused with the numbers), loads and warms the engine up, so Triton reports the model
ready only once a request costs what later ones cost (:func:`fish_s2.serving.runtime.start_dual_ar`).
``execute`` only validates and hands requests to the engine; the engine's loop thread decodes and
the dispatcher's response thread sends. Cancellation: the engine polls each request's response
sender (direct calls), and STOP requests from tts (ensembles do not pass cancellation to a running step).
With one instance per GPU a STOP may reach an instance that does not run its request; that one posts
it for the others (:mod:`fish_s2.serving.stops`).
"""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from fish_s2.codec import CodecConfig
from fish_s2.prompt import PromptBuilder
from fish_s2.request import Cancelled, ChunkEvent, EngineRequest, InvalidArgument, collect
from fish_s2.serving import metrics, protocol
from fish_s2.serving.adapter import check_io, error_response, getter, load_model_settings, output_tensors, triton_error
from fish_s2.serving.dispatch import Dispatcher
from fish_s2.serving.runtime import configure_threads, load_text_side, on_instance_device, start_dual_ar
from fish_s2.serving.stops import StopBoard, stop_board
from fish_s2.serving.voices import VoiceRegistry

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        model_config, self.cfg = load_model_settings(args)
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("dual_ar: config.pbtxt must set model_transaction_policy { decoupled: true }")
        check_io(model_config, protocol.DUAL_AR_INPUTS, protocol.DUAL_AR_OUTPUTS)
        configure_threads(self.cfg)
        self.cfg = on_instance_device(self.cfg, args)      # one engine per GPU: this instance's GPU
        gpu = args.get("model_instance_device_id") if args.get("model_instance_kind") == "GPU" else None
        instance = {} if gpu is None else {"gpu": str(gpu)}  # tells the engines of one server apart in metrics
        codec_batch = int(model_config["parameters"]["codec_max_batch"]["string_value"])
        started = start_dual_ar(self.cfg, codec_batch, log=pb_utils.Logger.log_info)
        self.engine = started.engine
        startup = started.plan.to_metrics() + [(metrics.WARMUP.name, {"model": "dual_ar"}, started.warmup_s)]
        self._startup_metrics = metrics.set_gauges(
            pb_utils, [(name, {**labels, **instance}, value) for name, labels, value in startup])
        self.metrics = metrics.EngineMetrics(pb_utils, instance)
        self._rtf = metrics.create(pb_utils, metrics.RTF, instance)
        codec = CodecConfig.for_checkpoint(self.cfg.checkpoint)
        self.frame_s = codec.frame_length / codec.sample_rate
        self.stops = stop_board(model_config)   # a STOP may come first, or (several instances) reach another one
        self.dispatch = Dispatcher(self.engine, self._respond, lambda: self.metrics.update(self.engine.stats()))
        self._warm_thread = threading.Thread(target=self._warm_registered_voices, daemon=True)
        self._warm_thread.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                gen = protocol.parse_generate_request(getter(pb_utils, request))
                if isinstance(gen, protocol.StopRequest):
                    if not self.engine.cancel(gen.request_id):
                        self.stops.post(gen.request_id)    # not here (yet): for its request when it arrives
                    sender.send(flags=FINAL)
                    continue
                if isinstance(gen, protocol.AppendRequest):
                    for i, segment in enumerate(gen.segments):
                        self.engine.append(gen.request_id, segment, end=gen.end and i == len(gen.segments) - 1)
                    if not gen.segments:
                        self.engine.append(gen.request_id, end=gen.end)
                    sender.send(flags=FINAL)
                    continue
                if gen.open_input and isinstance(self.stops, StopBoard):   # an APPEND could reach another instance
                    raise InvalidArgument("open_input", "text sessions need one dual_ar instance per server (a "
                                                        "repository generated with --gpus 1); send whole texts here")
                is_cancelled = self.stops.check(gen.request_id, sender.is_cancelled)
                req = EngineRequest(gen.prompt, gen.params, max_frames=gen.max_frames, prefix_len=gen.prefix_len,
                                    chunk_plan=gen.chunk_plan, request_id=gen.request_id, turns=gen.turns,
                                    open_input=gen.open_input,
                                    is_cancelled=is_cancelled)
                self.dispatch.submit(req, (sender, gen.format_code, gen.start_ns))
            except Exception as e:  # typed errors keep their code (invalid, busy, unavailable); others: internal
                sender.send(error_response(pb_utils, e), flags=FINAL)
        self.metrics.update(self.engine.stats())
        return None

    def _respond(self, stream, event):
        sender, format_code, start_ns = stream.context
        if isinstance(event, ChunkEvent):
            chunk = event.chunk
            meta = protocol.ChunkMeta(chunk.index, chunk.context, format_code, start_ns, event.turn)
            outputs = {"CODES": chunk.codes, "CHUNK_META": meta.pack(),
                       "REQUEST_ID": np.array([stream.request_id.encode()], dtype=np.object_)}
            # the tensors stay referenced here until send returns: it drops those not requested (voices
            # asks for CHUNK_META only) without the GIL, which must not be their last reference (Triton 2.51)
            tensors = output_tensors(pb_utils, outputs)
            try:
                sender.send(pb_utils.InferenceResponse(tensors))
            except Exception:  # the client is gone: stop generating for it
                self.engine.cancel(stream.request_id)
                raise
            return
        pb_utils.Logger.log_info(f"dual_ar: request {event.request_id} {event.reason} after {event.n_frames} frames")
        if event.n_frames and event.reason in ("stop", "length"):
            self._rtf[1].observe((time.monotonic_ns() - start_ns) / 1e9 / (event.n_frames * self.frame_s))
        response = None
        try:   # a stopped request ends plainly: an error response from a running decoupled step strands the
            # ensemble request in Triton 2.51; tts, which stopped it, tells its client (CANCELLED)
            if event.error is not None and not isinstance(event.error, Cancelled):
                response = pb_utils.InferenceResponse(error=triton_error(pb_utils, event.error))
        finally:
            sender.send(response, flags=FINAL)
            self.stops.clear(event.request_id)

    def _warm_registered_voices(self):
        """Put every registered voice's prefix into the engine's prefix cache (after a restart)."""
        dual_cfg, tokenizer = load_text_side(self.cfg)
        builder = PromptBuilder(tokenizer, dual_cfg.num_codebooks, self.cfg.allow_control_tokens)
        for voice in VoiceRegistry(self.cfg.voices_dir, dual_cfg.num_codebooks).list():
            prompt, prefix_len = builder.request("", [voice.reference()])
            warm = EngineRequest(prompt, max_frames=1, prefix_len=prefix_len)
            try:
                collect(self.engine.submit(warm))
            except Exception as e:  # warming is an optimisation; a busy or stopping engine skips it
                pb_utils.Logger.log_warn(f"dual_ar: could not warm voice {voice.voice_id!r}: {e}")
                return
            self.metrics.update(self.engine.stats())

    def finalize(self):
        self.engine.stop()        # every live request gets its Finished event (-> FINAL response)
        self.dispatch.close()
        self._warm_thread.join(5)
        self.metrics = self._rtf = self._startup_metrics = None   # now, not at the stub's teardown (metrics.py)
