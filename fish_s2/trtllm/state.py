"""Per-request decode state for the TensorRT-LLM model, in preallocated buffers indexed by slot.

TensorRT-LLM replays decode steps as CUDA graphs: Python in the model's forward does not run on a
replay, so nothing in it may look a request up by id. Instead a :class:`SlotManager` (installed as
an extra resource manager, so the executor calls it before every forward and when a request
finishes or is cancelled) gives each request a slot and, before each forward, writes which slot
every batch row reads and writes into static device tensors. The captured graph only indexes those
tensors. Rows that belong to no request (CUDA-graph padding, warm-up dummies) use a scratch slot.

The executor calls ``prepare_resources`` outside its per-step error handling (TensorRT-LLM 1.2's
``PyExecutor._executor_loop_overlap``): an exception there ends the executor thread and every request
hangs. So the slot manager never raises for one request's sake. A request it cannot serve (no free
slot, or a generation step of a request whose prompt never ran here) is *failed*: its rows read and
write the scratch slot and are flagged in ``row_fail``, and the model ends it on that step with
<|im_end|> and the codes :data:`FAILED_CODE` (see :class:`fish_s2.trtllm.model.DualARStep`), so
only that request stops, with a frame its client can tell from audio.

State per slot: the last frame's codes (the next step's input embedding), the repetition-aware
sampling window, the frame counter of the noise stream, the sampling parameters and noise key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling import RAS_WINDOW, BatchSampling

log = logging.getLogger(__name__)

NO_TOKEN = -1     # initial RAS window entry: equal to no token id
FAILED_CODE = -1  # every code of the frame that ends a failed request (never a codebook index)


class SlotError(RuntimeError):
    """Why a request cannot be served: recorded as that request's failure, never raised into the executor."""


class SlotsExhausted(SlotError):
    """More live requests than slots (a settings error: slots are sized from max_batch_size)."""


class NoSlot(SlotError):
    """A generation step for a request that holds no slot (its prompt never ran through this model)."""


class SlotState:
    """Device buffers: one row per slot (the last slot is scratch) and the per-batch-row slot tables."""

    def __init__(self, n_slots: int, max_rows: int, num_codebooks: int, device: torch.device | str = "cpu"):
        self.n_slots, self.max_rows = n_slots, max_rows
        self.scratch = n_slots  # an extra row nobody owns
        S = n_slots + 1
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.last_codes = z(S, num_codebooks)
        self.window = torch.full((S, RAS_WINDOW), NO_TOKEN, dtype=torch.long, device=device)
        self.frame_idx = z(S)
        self.temperature, self.top_p = z(S, dt=torch.float32), z(S, dt=torch.float32)
        self.top_k, self.key = z(S), z(S)
        # per batch row: the slot it reads, the slot it writes, 1 if its request is failed (one table,
        # one host-to-device copy per forward; the three views keep their addresses for CUDA graphs)
        self.rows = torch.zeros(3, max_rows, dtype=torch.long, device=device)
        self.row_read, self.row_write, self.row_fail = self.rows[0], self.rows[1], self.rows[2]
        self.set_rows([], [])

    @property
    def device(self) -> torch.device:
        return self.last_codes.device

    def set_rows(self, read: list[int], write: list[int], fail: list[bool] | None = None) -> None:
        """Load the slot tables for the next forward (rows past ``len(read)`` get the scratch slot).

        One host-to-device copy on the current stream, so it is ordered after the graph replay still in
        flight (overlap scheduler) and before the next one."""
        fail = [False] * len(read) if fail is None else fail
        if not len(read) == len(write) == len(fail) or len(read) > self.max_rows:
            raise ValueError(f"set_rows: {len(read)} read / {len(write)} write / {len(fail)} fail rows for "
                             f"{self.max_rows} row slots")
        pad = [self.scratch] * (self.max_rows - len(read))
        host = torch.tensor([read + pad, write + pad, [int(f) for f in fail] + [0] * len(pad)], dtype=torch.long)
        if self.device.type == "cuda":
            host = host.pin_memory()
        self.rows.copy_(host, non_blocking=True)

    def start(self, slots: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor, key: Tensor) -> None:
        """Reset slots for requests whose prompt is being prefilled: parameters in, counters and window cleared."""
        self.temperature[slots], self.top_p[slots] = temperature.float(), top_p.float()
        self.top_k[slots], self.key[slots] = top_k.long(), key.long()
        self.frame_idx[slots] = 0
        self.window[slots] = NO_TOKEN
        self.last_codes[slots] = 0

    def sampling(self, slots: Tensor) -> BatchSampling:
        return BatchSampling(self.temperature[slots], self.top_p[slots], self.top_k[slots], self.key[slots])

    def commit(self, read: Tensor, write: Tensor, frame: Tensor, push: Tensor) -> None:
        """Store a step's frames [n, 1 + num_codebooks]: codes become the next input, the frame counter
        advances, and where ``push`` the main token enters the repetition window (upstream never puts a
        prompt's first frame there)."""
        main = frame[:, 0]
        window = self.window[read]
        shifted = torch.cat([window[:, 1:], main[:, None]], dim=1)
        self.window[write] = torch.where(push[:, None], shifted, window)
        self.last_codes[write] = frame[:, 1:]
        self.frame_idx[write] = self.frame_idx[read] + 1


@dataclass
class _Live:
    slot: int


class SlotManager:
    """Request id -> slot, and the row tables of every forward.

    Speaks TensorRT-LLM's resource-manager protocol (``prepare_resources`` before each forward,
    ``free_resources`` when a request finishes or is aborted) through duck typing, so it runs and is
    tested without tensorrt_llm. Row order follows the executor's batch layout: context requests
    first, then generation requests, in the scheduled order; the model checks that order against
    the attention metadata on every eager forward. Nothing here raises for one request: see the
    module docstring.
    """

    def __init__(self, state: SlotState):
        self.state = state
        self._live: dict[int, _Live] = {}
        self._free = list(range(state.n_slots - 1, -1, -1))
        self.failed: dict[int, str] = {}  # request id -> why it is failed (until the executor frees it)
        self.row_ids: list[int] = []

    # -------------------------------------------------------------- core logic

    def slot_of(self, request_id: int) -> int | None:
        live = self._live.get(request_id)
        return None if live is None else live.slot

    def prepare(self, context: list[tuple[int, bool]], generation: list[int]) -> list[int]:
        """Assign slots for the next forward: ``context`` = (request id, is its last prompt chunk) in
        batch order, then ``generation`` request ids. A context row that is not its prompt's last
        chunk reads its slot but writes scratch: it produces no frame yet. Returns the ids of the
        requests failed on this forward (no slot; see the module docstring)."""
        rows = [(rid, True, last) for rid, last in context] + [(rid, False, True) for rid in generation]
        read, write, fail = zip(*(self._row(i, *row) for i, row in enumerate(rows))) if rows else ((), (), ())
        n = self.state.max_rows  # rows past the tables cannot be represented: the forward refuses that batch
        self.state.set_rows(list(read[:n]), list(write[:n]), list(fail[:n]))
        self.row_ids = [rid for rid, _, _ in rows]
        return [rid for rid, f in zip(self.row_ids, fail) if f]

    def _row(self, i: int, rid: int, is_context: bool, last_chunk: bool) -> tuple[int, int, bool]:
        """(read slot, write slot, failed) of batch row ``i``; failing its request if it cannot be served."""
        scratch = self.state.scratch
        if rid not in self.failed:
            try:
                if i >= self.state.max_rows:
                    raise SlotError(f"batch row {i} is past the {self.state.max_rows} rows of the slot tables")
                slot = self._acquire(rid) if is_context else self._held(rid)
                return slot, slot if last_chunk else scratch, False
            except SlotError as e:
                self._fail(rid, f"{type(e).__name__}: {e}")
        return scratch, scratch, True

    def free(self, request_id: int) -> None:
        """Return the request's slot (if it holds one) and forget its failure; safe to call twice."""
        live = self._live.pop(request_id, None)
        if live is not None:
            self._free.append(live.slot)
        self.failed.pop(request_id, None)

    def check_rows(self, request_ids: list[int] | None) -> None:
        """Fail loudly if the forward's batch is not laid out as prepared (only rows of known requests
        are compared: warm-up and padding rows are dummies on the scratch slot)."""
        if request_ids is None:
            return
        for row, rid in enumerate(request_ids):
            if (rid in self._live or rid in self.failed) and (row >= len(self.row_ids) or self.row_ids[row] != rid):
                raise RuntimeError(f"batch row {row} is request {rid}, but slots were prepared for "
                                   f"{self.row_ids}: executor batch order changed")

    @property
    def n_live(self) -> int:
        return len(self._live)

    @property
    def n_free(self) -> int:
        return len(self._free)

    def _acquire(self, request_id: int) -> int:
        live = self._live.get(request_id)
        if live is None:
            if not self._free:
                raise SlotsExhausted(f"all {self.state.n_slots} slots are in use by live requests")
            live = self._live[request_id] = _Live(self._free.pop())
        return live.slot

    def _held(self, request_id: int) -> int:
        slot = self.slot_of(request_id)
        if slot is None:
            raise NoSlot(f"generation request {request_id} has no slot (its prompt never ran)")
        return slot

    def _fail(self, request_id: int, reason: str) -> None:
        self.failed[request_id] = reason
        log.error("request %s failed in the Fish S2 model: %s", request_id, reason)

    # -------------------------------------------------------------- TensorRT-LLM resource-manager protocol

    def prepare_resources(self, scheduled_batch) -> None:
        self.prepare([(r.py_request_id, bool(r.is_last_context_chunk)) for r in scheduled_batch.context_requests],
                     [r.py_request_id for r in scheduled_batch.generation_requests])

    def update_resources(self, scheduled_batch, *args, **kwargs) -> None:
        pass

    def free_resources(self, request) -> None:
        self.free(request.py_request_id)

    def add_dummy_requests(self, request_ids, *args, **kwargs) -> None:
        pass  # dummies read and write the scratch slot

    def get_max_resource_count(self) -> int:
        return self.state.n_slots

    def get_needed_resource_to_completion(self, request) -> int:
        return 0 if request.py_request_id in self._live else 1

    def shutdown(self) -> None:
        """Return every live slot and forget every failure (the executor is going away)."""
        for rid in list(self._live) + list(self.failed):
            self.free(rid)


_BOUND: SlotManager | None = None


def bind(manager: SlotManager | None) -> None:
    """Hand ``manager`` to the model built next in this process (the engine installs it as a resource
    manager and the model reads the same buffers). One TensorRT-LLM engine per process."""
    global _BOUND
    _BOUND = manager


def bound() -> SlotManager:
    if _BOUND is None:
        raise RuntimeError("no SlotManager bound: build FishS2DualARForCausalLM through "
                           "fish_s2.trtllm.engine.TrtllmEngine, which creates and binds one")
    return _BOUND
