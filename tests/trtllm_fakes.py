"""A CPU stand-in for TensorRT-LLM's PyTorch-backend executor, for testing fish_s2.trtllm without it.

It follows the executor behaviour documented in /work/shared/spec/trtllm-pytorch-backend.md:
context requests first, then generation requests, then CUDA-graph padding rows (dummy requests);
chunked prefill under a token budget; resource managers' ``prepare_resources`` before every forward
and ``free_resources`` on finish and abort; the model's per-sequence logits sampled greedily (the
model leaves one finite logit); stop on ``end_id`` or ``max_tokens``; additional outputs
accumulated per request. The transformer is fish_s2's own SlowAR layers with one KV row per
request instead of TensorRT-LLM's paged attention. Everything else -- the input processor, the
slot manager, the embedding combine, the frame step, forced logits -- is the package's code.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from fish_s2.layers import position_mask
from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.request import SamplingParams
from fish_s2.trtllm.model import CODES_OUTPUT, MM_KEY, DualARStep, DualARView, FishInputProcessor, step_forward
from fish_s2.trtllm.state import SlotManager, SlotState


class CpuTransformer:
    """SlowAR layers + final norm over packed sequences; ``segments`` = (kv row, positions) per sequence."""

    def __init__(self, slow, n_kv_rows: int, max_len: int):
        self.slow = slow
        self.cache = slow.new_cache(n_kv_rows, max_len)

    def __call__(self, x: torch.Tensor, segments) -> torch.Tensor:
        out, a = [], 0
        for row, pos in segments:
            h, input_pos = x[a:a + len(pos)][None], pos[None]
            kv_len = int(pos.max()) + 1
            rope, mask = self.slow.rope[input_pos], position_mask(input_pos, kv_len)
            for layer, cache in zip(self.slow.layers, self.cache):
                h = layer(h, rope, mask, input_pos, slice(row, row + 1), kv_len, cache)
            out.append(self.slow.norm(h)[0])
            a += len(pos)
        return torch.cat(out)


@dataclass
class FakeRequest:
    py_request_id: int
    prompt_ids: list[int]
    mm: dict
    max_tokens: int
    end_id: int
    kv_row: int
    prefilled: int = 0
    is_last_context_chunk: bool = False
    tokens: list[int] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str | None = None
    aborted: bool = False


class FakeExecutor:
    """Steps the Dual-AR model like the PyTorch backend's executor loop (one ``step()`` = one forward)."""

    def __init__(self, model, max_batch: int = 4, max_num_tokens: int = 64, chunk: int | None = None,
                 graph_sizes=(1, 2, 4), max_len: int = 512):
        cfg = model.cfg
        self.cfg, self.max_num_tokens, self.chunk, self.graph_sizes = cfg, max_num_tokens, chunk, graph_sizes
        self.max_rows = max(max_batch, *graph_sizes)
        self.manager = SlotManager(SlotState(2 * max_batch, self.max_rows, cfg.num_codebooks))
        self.step_ = DualARStep(DualARView(cfg, model.slow, model.fast), self.manager, cfg.vocab_size)
        self.transformer = CpuTransformer(model.slow, 2 * max_batch + 1, max_len)
        self.dummy_row = 2 * max_batch  # KV row of padding dummies
        self.processor = FishInputProcessor()
        self.requests: dict[int, FakeRequest] = {}
        self._free_rows = list(range(2 * max_batch))
        self._next_id = 100
        self.forwards: list[dict] = []  # per forward: n_context, n_rows, n_pad

    def add(self, inputs: dict, sampling_params) -> FakeRequest:
        ids, extra = self.processor(inputs, sampling_params)
        assert sampling_params.top_k == 1 and CODES_OUTPUT in sampling_params.additional_model_outputs
        req = FakeRequest(self._next_id, ids, extra["multimodal_data"][MM_KEY], sampling_params.max_tokens,
                          sampling_params.end_id, self._free_rows.pop())
        self._next_id += 1
        self.requests[req.py_request_id] = req
        return req

    def abort(self, req: FakeRequest) -> None:
        req.aborted = True

    @torch.inference_mode()
    def step(self) -> list[FakeRequest]:
        """Run one forward; returns the requests that produced a token or finished."""
        touched = []
        for req in [r for r in self.requests.values() if r.aborted and r.finish_reason is None]:
            req.finish_reason = "cancelled"
            touched.append(req)
        for req in [r for r in self.requests.values() if r.finish_reason is not None]:
            self.manager.free_resources(req)
            self._free_rows.append(req.kv_row)
            del self.requests[req.py_request_id]
        gen = [r for r in self.requests.values() if r.prefilled == len(r.prompt_ids)]
        budget = self.max_num_tokens - len(gen)
        ctx, lengths = [], []
        for r in self.requests.values():
            left = len(r.prompt_ids) - r.prefilled
            if left and budget > 0:
                n = min(left, budget, self.chunk or left)
                r.is_last_context_chunk = n == left
                ctx.append(r)
                lengths.append(n)
                budget -= n
        if not ctx and not gen:
            return touched
        # decode-only batches run as CUDA graphs padded to a captured size with dummy requests
        n_pad = 0 if ctx else next(s for s in self.graph_sizes if s >= len(gen)) - len(gen)
        self.manager.prepare_resources(SimpleNamespace(context_requests=ctx, generation_requests=gen))
        dummies = [SimpleNamespace(py_request_id=-1 - i) for i in range(n_pad)]
        self.manager.check_rows([r.py_request_id for r in ctx + gen + dummies])

        ids, segments = [], []
        for r, n in zip(ctx, lengths):
            ids += r.prompt_ids[r.prefilled:r.prefilled + n]
            segments.append((r.kv_row, torch.arange(r.prefilled, r.prefilled + n)))
        for r in gen:
            ids.append(r.tokens[-1])
            segments.append((r.kv_row, torch.tensor([len(r.prompt_ids) + len(r.tokens) - 1])))
        for _ in dummies:
            ids.append(0)
            segments.append((self.dummy_row, torch.tensor([0])))
        n_ctx, n_rows = len(ctx), len(ctx) + len(gen) + len(dummies)
        codes = (self.step_.start_context(n_ctx, [r.mm["prompt"] for r in ctx], [r.prefilled for r in ctx], lengths,
                                          [r.mm["sampling"] for r in ctx], [r.mm["key"] for r in ctx])
                 if ctx else self.manager.state.last_codes[:0])
        seq_lens = torch.tensor([len(p) for _, p in segments])
        out = step_forward(self.step_, lambda x: self.transformer(x, segments), torch.tensor(ids, dtype=torch.int32),
                           n_rows, n_ctx, codes, seq_lens.cumsum(0) - 1)
        self.forwards.append({"n_context": n_ctx, "n_rows": n_rows, "n_pad": n_pad})
        logits = out["logits"]
        assert logits.shape == (n_rows, self.cfg.vocab_size) and (torch.isfinite(logits).sum(1) == 1).all()
        sampled = logits.argmax(-1)
        for row, r in enumerate(ctx + gen):
            if row < n_ctx:
                r.prefilled += lengths[row]
                if not r.is_last_context_chunk:
                    continue
            r.tokens.append(int(sampled[row]))
            r.codes.append(out[CODES_OUTPUT][row][None].clone())  # [beam=1, num_codebooks]
            if r.tokens[-1] == r.end_id:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.max_tokens:
                r.finish_reason = "length"
            touched.append(r)
        return touched

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.requests:
                return
            self.step()
        raise AssertionError("requests did not finish")


class FakeResult:
    """GenerationResult stand-in: async iteration over streamed outputs, ``abort()``."""

    def __init__(self, llm: "FakeLLM", req: FakeRequest):
        self._llm, self.req = llm, req
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.finished = False

    def push(self, output) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    def abort(self) -> None:
        with self._llm.cond:
            self._llm.executor.abort(self.req)
            self._llm.cond.notify()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self.finished = out.finished
        return out


class FakeLLM:
    """The LLM-API surface TrtllmEngine uses, over a FakeExecutor stepped by its own thread."""

    def __init__(self, executor: FakeExecutor, step_delay: float = 0.0):
        self.executor, self.step_delay = executor, step_delay
        self.cond = threading.Condition()
        self.results: dict[int, FakeResult] = {}
        self.salts: list[str] = []
        self.sampling_params: list = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def generate_async(self, inputs, sampling_params, streaming=False, cache_salt=None):
        assert streaming and sampling_params.detokenize is False and sampling_params.n == 1
        self.salts.append(cache_salt)
        self.sampling_params.append(sampling_params)
        with self.cond:
            req = self.executor.add(inputs, sampling_params)
            res = self.results[req.py_request_id] = FakeResult(self, req)
            self.cond.notify()
        return res

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.executor.requests or self._stop):
                    self.cond.wait()
                if self._stop:
                    return
                touched = self.executor.step()
            for r in touched:
                codes = torch.stack(r.codes) if r.codes else torch.zeros(0, 1, self.executor.cfg.num_codebooks)
                out = SimpleNamespace(token_ids=list(r.tokens), finish_reason=r.finish_reason,
                                      additional_generation_outputs={CODES_OUTPUT: codes})
                self.results[r.py_request_id].push(SimpleNamespace(outputs=[out], finished=r.finish_reason is not None))
            if self.step_delay:
                threading.Event().wait(self.step_delay)

    def shutdown(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        self._thread.join(5)


def eos_prone(model, factor: float = 3.0):
    """A copy of a tiny DualAR whose <|im_end|> logit is larger, so some requests end on it within a
    few frames (the tiny checkpoint rarely stops by itself)."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        model.slow.embeddings.weight[model.cfg.eos_id] *= factor
    return model


def fake_sampling_params(**kw):
    return SimpleNamespace(**kw)


def sample_prompts(ck):
    """Three prompts (the first and last with the same voice, the middle one without) that, with
    SAMPLE_PARAMS on an eos_prone model, emit <|im_end|> as frame 4 and 6 and run past 8 frames (the middle)."""
    b = PromptBuilder(ck.tokenizer, ck.config.num_codebooks)
    g = torch.Generator().manual_seed(5)
    voice = [Reference("Good morning.", torch.randint(0, 1024, (ck.config.num_codebooks, 12), generator=g))]
    return [torch.cat([b.system(voice if i != 1 else []), b.user(t), b.assistant_start()], dim=1)
            for i, t in enumerate(["Hello there.", "A somewhat longer sentence to speak, please.", "Numbers: 1234."])]


SAMPLE_PARAMS = [SamplingParams(temperature=0.8, top_p=0.8, seed=1), SamplingParams(temperature=0.0, seed=0),
                 SamplingParams(temperature=1.0, top_p=0.95, top_k=20, seed=7)]
