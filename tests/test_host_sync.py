"""No host synchronization inside the frame step TensorRT-LLM captures as a CUDA graph.

A decode step of the TensorRT-LLM model is replayed as a CUDA graph: Python does not run, so a value
read back to the host (``.item()``, ``bool(t)``, ``tolist()``), an op whose output size depends on
data (``nonzero``, boolean indexing, ``unique`` ...) or host data copied in would break capture or
freeze a value. The check is structural, not a reading: the step runs on FakeTensors (no data, so
any host read raises) under a dispatch mode that names each sync-like op as it is dispatched. It
covers the Dual-AR step around the transformer -- embedding combine, main-token sampling with the
repetition window, the fast AR with its KV cache writes and position masks, the slot commit, the
forced logits -- in the configuration the graphs capture (generation rows only, padding rows,
sampling without a host-known ``k_max``).
"""

import copy
from contextlib import contextmanager

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fish_s2.trtllm.model import DualARStep, DualARView, step_forward
from fish_s2.trtllm.state import SlotManager, SlotState

aten = torch.ops.aten
# ops that read a value back to the host or size their output from data
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
            aten.nonzero.default, aten.nonzero_numpy.default, aten.masked_select.default,
            aten.unique_dim.default, aten._unique.default, aten._unique2.default, aten.unique_consecutive.default,
            aten.repeat_interleave.Tensor, aten.bincount.default}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
HOST_DATA_OPS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}


class HostSync(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raise HostSync on a sync-like op: host reads, data-dependent output sizes, boolean-mask indexing,
    and tensors made from host data with more than one element (a 0-d constant is a captured scalar)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            raise HostSync(f"{func} inside the frame step")
        if func in INDEX_OPS and any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                                     for t in tree_leaves(args[1])):
            raise HostSync(f"{func} with a boolean mask (data-dependent size) inside the frame step")
        if func in HOST_DATA_OPS and args[0].numel() > 1:
            raise HostSync(f"host data ({tuple(args[0].shape)}) copied in by {func} inside the frame step")
        return func(*args, **kwargs)


@contextmanager
def no_host_sync():
    """FakeTensorMode (values cannot be read) with NoHostSync on top (names the op)."""
    with FakeTensorMode(), NoHostSync():
        yield


ROWS = 4


@pytest.fixture(scope="module")
def fake_step(tiny):
    """The tiny model, slot state and frame step made of FakeTensors."""
    model = copy.deepcopy(tiny.model)
    with FakeTensorMode() as mode:
        model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype))
        slots = SlotManager(SlotState(2 * ROWS, ROWS, model.cfg.num_codebooks))
        step = DualARStep(DualARView(model.cfg, model.slow, model.fast), slots, model.cfg.vocab_size)
    return mode, model, step


def _decode_step(model, step, n_real: int = 3):
    """A generation-only forward padded to ROWS rows, as a decode CUDA graph runs it; the transformer
    stand-in is the final norm (TensorRT-LLM's own layers are not ours to check)."""
    ids = torch.zeros(ROWS, dtype=torch.int32)
    seq_lens = torch.ones(ROWS, dtype=torch.int32)
    return step_forward(step, model.slow.norm, ids, ROWS, 0, step.state.last_codes[:0], seq_lens.cumsum(0) - 1)


def test_the_captured_frame_step_does_not_sync(fake_step):
    mode, model, step = fake_step
    assert step.state.sampling(step.state.row_read).k_max is None  # the graph path: no host-known bound
    with mode, NoHostSync(), torch.inference_mode():
        out = _decode_step(model, step)
    assert out["logits"].shape == (ROWS, model.cfg.vocab_size) and out["fish_codes"].shape == (ROWS, 10)


@pytest.mark.parametrize("bad", [
    lambda t: t.sum().item(),
    lambda t: bool((t > 0).any()),          # a data-dependent Python branch
    lambda t: t.tolist(),
    lambda t: t.nonzero(),
    lambda t: t[t > 0],                     # boolean-mask indexing
    lambda t: torch.masked_select(t, t > 0),
    lambda t: torch.unique(t),
    lambda t: t.repeat_interleave(t.long().clamp(min=0)),
    lambda t: t + torch.tensor([1.0, 2.0, 3.0]),   # host data copied in on every replay
], ids=["item", "branch", "tolist", "nonzero", "bool-index", "masked_select", "unique", "repeat_interleave",
        "host-data"])
def test_the_check_catches_sync_patterns(bad):
    with no_host_sync(), pytest.raises(HostSync):
        bad(torch.randn(3))


def test_the_check_catches_a_syncing_frame_step(fake_step, monkeypatch):
    """The same step with one host read added fails the check (the check is not vacuous)."""
    mode, model, step = fake_step
    frames = DualARStep.frames

    def syncing(self, hidden, n_rows, n_context):
        if int(self.state.frame_idx[self.state.row_read[:n_rows]].max()) > 1000:  # e.g. a length guard
            raise RuntimeError("too long")
        return frames(self, hidden, n_rows, n_context)

    monkeypatch.setattr(DualARStep, "frames", syncing)
    with mode, NoHostSync(), torch.inference_mode(), pytest.raises(HostSync, match="item|_local_scalar_dense"):
        _decode_step(model, step)
