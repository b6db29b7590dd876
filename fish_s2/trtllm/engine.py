"""``TrtllmEngine``: the streaming engine of :mod:`fish_s2.engine`, over ``tensorrt_llm.LLM``.

Same public interface as :class:`fish_s2.engine.Engine` (``submit``, ``cancel``, ``stats``,
``start``, ``stop``) and the same request lifecycle (:class:`fish_s2.request.Lifecycle`: admission,
chunking, cancellation, exactly one Finished), so the Triton dual_ar model can host either. Each
request is one ``LLM.generate_async(..., streaming=True)`` on an asyncio loop thread; TensorRT-LLM
does the in-flight batching, paged KV with block reuse and CUDA graphs, and the model
(:mod:`fish_s2.trtllm.model`) does the Dual-AR frame step. Frames are read from each streamed
output: the generated main tokens, and the cumulative ``fish_codes`` additional output of which
only the new rows are taken. Cancel = ``abort()``; the executor then frees the request's KV blocks
and its slot (``free_resources``).

tensorrt_llm is imported only by the default LLM factory, when the engine is started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import DualARConfig
from ..engine.config import EngineConfig, check_request
from ..request import Event, EngineRequest, Internal, Lifecycle, Live, RequestHandle, Unavailable
from ..sampling import seed_to_key
from .hf_config import FishS2Config
from .model import CODES_OUTPUT, failed_frames, request_inputs
from .settings import TrtllmSettings, load_trtllm_settings

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


def _default_llm_factory(model_dir: Path, settings: TrtllmSettings, engine: EngineConfig, cfg: DualARConfig,
                         kv_budget: dict | None = None):
    """Build ``tensorrt_llm.LLM`` for a converted directory with the slot manager installed; ``kv_budget``:
    the memory plan's KV-cache size (:meth:`fish_s2.memory_plan.MemoryPlan.trtllm_kv_cache`).

    The worker must run in this process (``TLLM_WORKER_USE_SINGLE_PROCESS=1``): the model class, its
    config type and the slot manager are Python objects of this process."""
    if kv_budget is None:
        raise ValueError("kv_budget: the memory plan's TensorRT-LLM KV-cache size is required "
                         "(fish_s2.serving.runtime.start_dual_ar passes it)")
    if os.environ.setdefault("TLLM_WORKER_USE_SINGLE_PROCESS", "1") != "1":
        raise RuntimeError("TLLM_WORKER_USE_SINGLE_PROCESS must be 1 for the Fish S2 model")
    from tensorrt_llm import LLM, SamplingParams

    from . import state
    from .model import register

    register()
    manager = state.SlotManager(state.SlotState(settings.n_slots(engine), engine.max_active, cfg.num_codebooks,
                                                "cuda"))
    state.bind(manager)

    class FishLLM(LLM):
        def _build_model(self):  # the executor reads extra resource managers from the args it is built with
            self.args.extra_resource_managers = {"fish_s2_slots": manager}
            super()._build_model()

    return FishLLM(model=str(model_dir), **settings.build_llm_kwargs(engine, kv_budget)), SamplingParams


@dataclass
class _Run:
    """The engine's side of one request: its coroutine and, once started, its GenerationResult."""

    future: concurrent.futures.Future | None = None
    result: object = None
    started: bool = False          # first output seen (prompt prefilled)
    n_tokens: int = 0              # main tokens already turned into frames


class TrtllmEngine:
    def __init__(self, model_dir: str | Path, engine: EngineConfig, settings: TrtllmSettings | None = None,
                 llm_factory: Callable | None = None, kv_budget: dict | None = None):
        """``kv_budget``: the KV pool's size from the memory plan, for the default LLM factory."""
        self.model_dir = Path(model_dir)
        self.model_cfg = FishS2Config.from_pretrained(str(self.model_dir)).dual_ar_config()
        self.cfg: EngineConfig = engine.validate(self.model_cfg.slow.max_seq_len)
        self.settings = (settings or load_trtllm_settings()).validate(self.cfg)
        self._llm_factory = llm_factory or functools.partial(_default_llm_factory, kv_budget=kv_budget)
        self.llm = None
        self._sampling_cls = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.lifecycle = Lifecycle(self.cfg.max_in_flight, self.cfg.chunk_plan, self.cfg.max_frames,
                                   on_cancel=self._abort, check_period_s=self.cfg.cancel_check_ms / 1000)
        self._stopping = False

    # ------------------------------------------------------------------ public API (any thread)

    def start(self) -> "TrtllmEngine":
        """Build the LLM (loads weights, captures CUDA graphs) and start the loop thread."""
        self.llm, self._sampling_cls = self._llm_factory(self.model_dir, self.settings, self.cfg, self.model_cfg)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fish-s2-trtllm", daemon=True)
        self._thread.start()
        self._loop.call_soon_threadsafe(self._poll_cancelled)
        return self

    def submit(self, req: EngineRequest, sink: Callable[[Event], None] | None = None) -> RequestHandle | None:
        """Start a request: InvalidArgument, Busy or Unavailable at once, else its events go to ``sink``
        (called on the engine's loop thread) or, without one, to the returned handle."""
        check_request(req, self.cfg, self.model_cfg)
        if self._loop is None:
            raise Unavailable("the engine is not running; retry later")
        live, handle = self.lifecycle.open(req, sink)
        run = live.engine_state = _Run()
        run.future = asyncio.run_coroutine_threadsafe(self._serve(live, run), self._loop)
        return handle

    def cancel(self, request_id: str) -> bool:
        return self.lifecycle.cancel(request_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, abort everything in flight (each gets Finished "cancelled"), then stop
        the loop and the LLM."""
        self.lifecycle.close()
        self._stopping = True
        lives = self.lifecycle.lives()
        for live in lives:
            self.lifecycle.cancel(live.request_id)
        concurrent.futures.wait([lv.engine_state.future for lv in lives if lv.engine_state is not None], timeout)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()
            self._loop = self._thread = None
        self.lifecycle.finish_all("cancelled", Unavailable("the server is shutting down; retry on another server"))
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    def stats(self) -> dict:
        lives = self.lifecycle.lives()
        started = sum(1 for lv in lives if lv.engine_state is not None and lv.engine_state.started)
        return {"active": started, "queued": len(lives) - started, "frames_generated": self.lifecycle.frames_generated}

    # ------------------------------------------------------------------ loop thread

    def _abort(self, live: Live) -> None:
        run = live.engine_state
        if run is not None and run.result is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(run.result.abort)

    def _sampling_params(self, live: Live):
        cfg = self.model_cfg
        return self._sampling_cls(max_tokens=live.max_frames, end_id=cfg.eos_id, pad_id=cfg.pad_id, top_k=1,
                                  detokenize=False, n=1, additional_model_outputs=[CODES_OUTPUT])

    async def _serve(self, live: Live, run: _Run) -> None:
        reason, error, out = "error", None, None
        try:
            if not live.cancel_requested:
                req = live.req
                prompt = torch.as_tensor(req.prompt).to(torch.long)
                inputs = request_inputs(prompt, req.params, seed_to_key(req.params.seed))
                run.result = self.llm.generate_async(inputs, self._sampling_params(live), streaming=True,
                                                     cache_salt=cache_salt(prompt, self.model_cfg))
                if live.cancel_requested:  # cancelled while generate_async was being called
                    run.result.abort()
                async for out in run.result:
                    self._on_output(live, run, out.outputs[0])
            if live.cancel_requested:
                reason = "cancelled"
            elif out is not None:
                reason = _REASONS.get(out.outputs[0].finish_reason, "error")
                if reason == "error":
                    error = Internal(f"generation ended with finish_reason={out.outputs[0].finish_reason!r}")
            else:
                error = Internal("generation produced no output")
        except Exception as e:
            if not live.cancel_requested:
                log.exception("request %s failed", live.request_id)
            reason, error = ("cancelled", None) if live.cancel_requested else \
                ("error", Internal(f"{type(e).__name__}: {e}"))
        finally:
            self.lifecycle.finish(live, reason, error)

    def _on_output(self, live: Live, run: _Run, output) -> None:
        run.started = True
        tokens = output.token_ids
        if len(tokens) == run.n_tokens:
            return
        codes = (output.additional_generation_outputs or {}).get(CODES_OUTPUT)
        if codes is None or codes.shape[0] < len(tokens):
            raise RuntimeError(f"model returned {0 if codes is None else codes.shape[0]} '{CODES_OUTPUT}' rows for "
                               f"{len(tokens)} tokens")
        eos = self.model_cfg.eos_id
        for i in range(run.n_tokens, len(tokens)):
            if failed_frames(codes[i].reshape(-1)):
                raise RuntimeError("the TensorRT-LLM model could not serve this request (no decode slot; see the "
                                   "server log)")
            if tokens[i] == eos:
                break
            self.lifecycle.frame(live, codes[i].reshape(-1).to(torch.long).numpy())
        run.n_tokens = len(tokens)

    def _poll_cancelled(self) -> None:
        """Ask each request's ``is_cancelled`` (e.g. Triton's response sender) on the engine's period."""
        self.lifecycle.poll_cancelled()
        if not self._stopping and self._loop is not None:
            self._loop.call_later(max(self.cfg.cancel_check_ms, 1) / 1000, self._poll_cancelled)
