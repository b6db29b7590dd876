"""The TensorRT-LLM model classes of fish_s2.trtllm.model, built and loaded on the CPU the way
TensorRT-LLM 1.2's loader does it (construct under MetaInitMode, materialize, load_weights,
post_load_weights), over stand-ins of the tensorrt_llm modules they use (tests/trtllm_fakes.py)."""

import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fish_s2.layers import rope_table
from fish_s2.trtllm import model as trt_model
from fish_s2.trtllm.convert import convert_checkpoint
from fish_s2.trtllm.hf_config import ARCHITECTURE, FishS2Config
from fish_s2.trtllm.state import SlotManager, SlotState, bind
from trtllm_fakes import FakeMetaInitMode, fake_tensorrt_llm_modules, materialize


@pytest.fixture
def registered(monkeypatch):
    mods = fake_tensorrt_llm_modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(trt_model, "_REGISTERED", None)
    cls = trt_model.register()
    yield cls, mods
    bind(None)


def test_builds_under_meta_init_and_makes_its_buffers_at_load(registered, tiny_checkpoint, tmp_path):
    cls, mods = registered
    assert mods["tensorrt_llm._torch.models.modeling_utils"].MODEL_CLASS_MAPPING[ARCHITECTURE] is cls
    assert mods["tensorrt_llm.inputs.registry"].PROCESSORS[FishS2Config.model_type] is trt_model.FishInputProcessor
    model_dir = convert_checkpoint(tiny_checkpoint, tmp_path / "trtllm")
    config = SimpleNamespace(pretrained_config=FishS2Config.from_pretrained(str(model_dir)), mapping=None)
    bind(SlotManager(SlotState(4, 3, num_codebooks=10)))

    with FakeMetaInitMode():  # raises on any real computation with a meta tensor (no silent host fallback)
        m = cls(config)
    assert "rope" not in dict(m.model.named_buffers()) and "codebook_offsets" not in dict(m.model.named_buffers())
    materialize(m)
    assert m.model.codebook_embeddings.weight.isnan().all()  # uninitialized until loaded

    weights = load_file(str(model_dir / "model.safetensors"))
    m.load_weights(weights)
    names = m.fake_loaded["names"]  # what reached TensorRT-LLM's loader: the Qwen3 tensors, not ours
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any(n.startswith("fast.") for n in names)
    assert set(m.fake_loaded["skip_modules"]) == {"fast", "codebook_embeddings"}
    m.post_load_weights()
    assert m.fake_post_load_calls == 1  # TensorRT-LLM's own post-load work still runs

    cfg = m.model.cfg
    assert torch.equal(m.model.rope, rope_table(cfg.slow.max_seq_len, cfg.slow.head_dim, cfg.slow.rope_base))
    assert m.model.codebook_offsets.tolist() == [i * cfg.codebook_size for i in range(cfg.num_codebooks)]
    assert torch.equal(m.fast.rope, rope_table(cfg.num_codebooks, cfg.fast.head_dim, cfg.fast.rope_base))
    assert torch.equal(m.model.codebook_embeddings.weight, weights["model.codebook_embeddings.weight"])
    assert torch.equal(m.fast.output.weight, weights["fast.output.weight"].to(m.fast.output.weight.dtype))
    assert m.step is not None and m.step.fast_cache[0].k.shape[0] == 3
    m.post_load_weights()  # idempotent (the loader may call it again, e.g. after a weight update)


def test_forward_before_load_is_an_error(registered, tiny_checkpoint, tmp_path):
    cls, _ = registered
    model_dir = convert_checkpoint(tiny_checkpoint, tmp_path / "trtllm")
    bind(SlotManager(SlotState(4, 3, num_codebooks=10)))
    m = cls(SimpleNamespace(pretrained_config=FishS2Config.from_pretrained(str(model_dir)), mapping=None))
    with pytest.raises(RuntimeError, match="post_load_weights"):
        m(SimpleNamespace(num_contexts=0, num_seqs=1))
