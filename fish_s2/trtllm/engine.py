"""``TrtllmEngine``: the streaming engine of :mod:`fish_s2.engine`, over ``tensorrt_llm.LLM``.

Same public interface as :class:`fish_s2.engine.Engine` (``submit`` raising RequestError /
EngineBusy, ``cancel``, ``stats``, ``start``, ``stop``; events ChunkEvent and exactly one Finished
per request; chunking by :class:`fish_s2.streaming.Chunker`), so the Triton dual_ar model can host
either. Each request is one ``LLM.generate_async(..., streaming=True)`` on an asyncio loop thread;
TensorRT-LLM does the in-flight batching, paged KV with block reuse and CUDA graphs, and the model
(:mod:`fish_s2.trtllm.model`) does the Dual-AR frame step. Frames are read from each streamed
output: the generated main tokens, and the cumulative ``fish_codes`` additional output of which
only the new rows are taken. Cancel = ``abort()``; the executor then frees the request's KV blocks
and its slot (``free_resources``).

tensorrt_llm is imported only by the default LLM factory, when the engine is built.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..config import DualARConfig
from ..engine import (ChunkEvent, EngineBusy, EngineRequest, Event, Finished, RequestError, RequestHandle,
                      validate_request)
from ..sampling import seed_to_key
from ..streaming import Chunker
from .hf_config import FishS2Config
from .model import CODES_OUTPUT, request_inputs
from .settings import TrtllmSettings, load_settings

log = logging.getLogger(__name__)

_REASONS = {"stop": "stop", "length": "length", "cancelled": "cancelled"}


def cache_salt(prompt: Tensor, cfg: DualARConfig) -> str:
    """KV-reuse salt of a prompt [num_codebooks + 1, T]: a hash of every semantic column's position
    and all its codes. Token ids carry only codebook 0, and TensorRT-LLM's block keys cover token ids
    and the salt; two prompts share a salt only if their semantic columns are identical, so equal
    token prefixes with different residual codes never share KV, while the same voice with
    different text does (the voice block is the prompt's only audio)."""
    tokens = prompt[0]
    cols = ((tokens >= cfg.semantic_begin_id) & (tokens <= cfg.semantic_end_id)).nonzero().flatten()
    data = torch.cat([cols[None], prompt[1:, cols]]).to(torch.int64).contiguous()
    return hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()


def _default_llm_factory(model_dir: Path, settings: TrtllmSettings, cfg: DualARConfig):
    """Build ``tensorrt_llm.LLM`` for a converted directory with the slot manager installed.

    The worker must run in this process (``TLLM_WORKER_USE_SINGLE_PROCESS=1``): the model class, its
    config type and the slot manager are Python objects of this process."""
    if os.environ.setdefault("TLLM_WORKER_USE_SINGLE_PROCESS", "1") != "1":
        raise RuntimeError("TLLM_WORKER_USE_SINGLE_PROCESS must be 1 for the Fish S2 model")
    from tensorrt_llm import LLM, SamplingParams

    from . import state
    from .model import register

    register()
    manager = state.SlotManager(state.SlotState(settings.n_slots, settings.max_batch_size, cfg.num_codebooks, "cuda"))
    state.bind(manager)

    class FishLLM(LLM):
        def _build_model(self):  # the executor reads extra resource managers from the args it is built with
            self.args.extra_resource_managers = {"fish_s2_slots": manager}
            super()._build_model()

    return FishLLM(model=str(model_dir), **settings.build_llm_kwargs()), SamplingParams


@dataclass
class _Live:
    req: EngineRequest
    sink: Callable[[Event], None]
    chunker: Chunker
    t_submit: float
    result: object = None          # the GenerationResult, once generate_async returned
    cancel_requested: bool = False
    n_tokens: int = 0              # main tokens already turned into frames
    n_frames: int = 0
    started: bool = False          # first output seen (prompt prefilled)
    future: concurrent.futures.Future | None = field(default=None, repr=False)


class TrtllmEngine:
    def __init__(self, model_dir: str | Path, settings: TrtllmSettings | None = None,
                 llm_factory: Callable | None = None):
        self.model_dir = Path(model_dir)
        self.model_cfg = FishS2Config.from_pretrained(str(self.model_dir)).dual_ar_config()
        self.settings = (settings or load_settings()).validate(self.model_cfg.slow.max_seq_len)
        self.cfg = self.settings.engine
        self._llm_factory = llm_factory or _default_llm_factory
        self.llm = None
        self._sampling_cls = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._stopping = False
        self.frames_generated = 0

    # ------------------------------------------------------------------ public API (any thread)

    def start(self) -> "TrtllmEngine":
        """Build the LLM (loads weights, captures CUDA graphs) and start the loop thread."""
        self.llm, self._sampling_cls = self._llm_factory(self.model_dir, self.settings, self.model_cfg)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fish-s2-trtllm", daemon=True)
        self._thread.start()
        self._loop.call_soon_threadsafe(self._poll_cancelled)
        return self

    def submit(self, req: EngineRequest, sink: Callable[[Event], None] | None = None) -> RequestHandle | None:
        """Start a request. Bad requests raise RequestError, a full engine EngineBusy, both at once.

        Events go to ``sink`` (called on the engine's loop thread) or, without one, to the handle."""
        validate_request(req, self.cfg, self.model_cfg)
        handle = None
        if sink is None:
            handle = RequestHandle(req.request_id, self)
            sink = handle.put
        with self._lock:
            if self._stopping or self._loop is None:
                raise EngineBusy("engine is not running")
            if req.request_id in self._live:
                raise RequestError(f"request_id: {req.request_id!r} is already in flight")
            limit = self.cfg.max_active + self.cfg.max_queued
            if len(self._live) >= limit:
                raise EngineBusy(f"{len(self._live)} requests in flight (max_batch_size + max_queued = {limit}); "
                                 f"retry later")
            live = self._live[req.request_id] = _Live(req, sink, Chunker(req.chunk_plan or self.cfg.chunk_plan),
                                                      time.perf_counter())
            live.future = asyncio.run_coroutine_threadsafe(self._serve(live), self._loop)
        return handle

    def cancel(self, request_id: str) -> None:
        with self._lock:
            live = self._live.get(request_id)
            if live is None or live.cancel_requested:
                return
            live.cancel_requested = True
            result = live.result
        if result is not None:
            self._loop.call_soon_threadsafe(result.abort)

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything in flight (each gets Finished 'cancelled'), then stop the loop and the LLM."""
        with self._lock:
            self._stopping = True
            ids, futures = list(self._live), [lv.future for lv in self._live.values()]
        for rid in ids:
            self.cancel(rid)
        concurrent.futures.wait([f for f in futures if f is not None], timeout)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._loop.close()
            self._loop = self._thread = None
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    def stats(self) -> dict:
        with self._lock:
            started = sum(lv.started for lv in self._live.values())
            return {"active": started, "queued": len(self._live) - started,
                    "frames_generated": self.frames_generated}

    # ------------------------------------------------------------------ validation

    # ------------------------------------------------------------------ loop thread

    def _sampling_params(self, req: EngineRequest):
        cfg = self.model_cfg
        return self._sampling_cls(max_tokens=req.max_frames or self.cfg.max_frames, end_id=cfg.eos_id,
                                  pad_id=cfg.pad_id, top_k=1, detokenize=False, n=1,
                                  additional_model_outputs=[CODES_OUTPUT])

    async def _serve(self, live: _Live) -> None:
        reason, error, out = "error", None, None
        try:
            if not live.cancel_requested:
                req = live.req
                inputs = request_inputs(req.prompt, req.params, seed_to_key(req.params.seed))
                live.result = self.llm.generate_async(inputs, self._sampling_params(req), streaming=True,
                                                      cache_salt=cache_salt(req.prompt, self.model_cfg))
                if live.cancel_requested:  # cancelled while generate_async was being called
                    live.result.abort()
                async for out in live.result:
                    self._on_output(live, out.outputs[0])
            if live.cancel_requested:
                reason = "cancelled"
            elif out is not None:
                reason = _REASONS.get(out.outputs[0].finish_reason, "error")
                if reason == "error":
                    error = f"generation ended with finish_reason={out.outputs[0].finish_reason!r}"
            else:
                error = "generation produced no output"
        except Exception as e:
            log.exception("request %s failed", live.req.request_id)
            reason, error = ("cancelled", None) if live.cancel_requested else ("error", f"{type(e).__name__}: {e}")
        finally:
            self._finish(live, reason, error)

    def _on_output(self, live: _Live, output) -> None:
        live.started = True
        tokens = output.token_ids
        if len(tokens) == live.n_tokens:
            return
        codes = (output.additional_generation_outputs or {}).get(CODES_OUTPUT)
        if codes is None or codes.shape[0] < len(tokens):
            raise RuntimeError(f"model returned {0 if codes is None else codes.shape[0]} '{CODES_OUTPUT}' rows for "
                               f"{len(tokens)} tokens")
        eos = self.model_cfg.eos_id
        for i in range(live.n_tokens, len(tokens)):
            if tokens[i] == eos:
                break
            live.n_frames += 1
            self.frames_generated += 1
            chunk = live.chunker.push(codes[i].reshape(-1).to(torch.long))
            if chunk is not None:
                self._send(live, ChunkEvent(live.req.request_id, chunk, time.perf_counter() - live.t_submit))
        live.n_tokens = len(tokens)

    def _send(self, live: _Live, event: Event) -> None:
        try:
            live.sink(event)
        except Exception:  # a broken sink (client gone) must not take the loop down
            log.exception("sink failed for request %s", live.req.request_id)
            if not isinstance(event, Finished):
                self.cancel(live.req.request_id)

    def _finish(self, live: _Live, reason: str, error: str | None) -> None:
        try:
            last = live.chunker.flush() if reason in ("stop", "length") else None
            if last is not None:
                self._send(live, ChunkEvent(live.req.request_id, last, time.perf_counter() - live.t_submit))
        finally:
            with self._lock:
                self._live.pop(live.req.request_id, None)
            self._send(live, Finished(live.req.request_id, reason, live.n_frames, error))

    def _poll_cancelled(self) -> None:
        """Poll each request's ``is_cancelled`` (e.g. Triton's response sender) every check period."""
        with self._lock:
            lives = list(self._live.values())
        for live in lives:
            if live.req.is_cancelled is not None and not live.cancel_requested:
                try:
                    gone = bool(live.req.is_cancelled())
                except Exception:  # a dead client connection counts as cancelled
                    gone = True
                if gone:
                    self.cancel(live.req.request_id)
        if not self._stopping:
            self._loop.call_later(self.settings.triton_config.cancellation_check_period_ms / 1000,
                                  self._poll_cancelled)
