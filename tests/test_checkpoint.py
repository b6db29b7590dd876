"""Checkpoint loading: round trip of the tiny writer, sharded files, strict key coverage."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fish_s2.checkpoint import S2Checkpoint, checkpoint_key, load_config, load_dual_ar, module_key
from fish_s2.config import DualARConfig
from fish_s2.tiny import write_tiny_checkpoint


def test_tiny_checkpoint_round_trips(tiny_checkpoint, tiny):
    on_disk = load_file(str(tiny_checkpoint / "model.safetensors"))
    state = tiny.model.state_dict()
    assert set(state) == {module_key(k) for k in on_disk}
    for key, value in on_disk.items():
        assert torch.equal(state[module_key(key)], value.float()), key
    assert tiny.config.semantic_begin_id == tiny.tokenizer.semantic_begin_id
    assert tiny.config.eos_id == tiny.tokenizer.im_end_id
    assert json.loads((tiny_checkpoint / "config.json").read_text())["model_type"] == "fish_qwen3_omni"


def test_writer_is_deterministic(tmp_path, tiny_checkpoint):
    other = write_tiny_checkpoint(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "codec_config.yaml"):
        assert (other / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, tiny):
    path = write_tiny_checkpoint(tmp_path / "sharded", seed=0, shards=3)
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-00003.safetensors"))) == 3
    cfg, _ = load_config(path)
    model = load_dual_ar(path, cfg)
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_bf16_load_keeps_bf16(tiny_checkpoint):
    cfg, _ = load_config(tiny_checkpoint)
    model = load_dual_ar(tiny_checkpoint, cfg, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _rewrite(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(tmp_path, tiny_checkpoint):
    name = "text_model.model.layers.1.attention.wo.weight"
    path = _rewrite(tiny_checkpoint, tmp_path / "c", lambda w: w.pop(name))
    cfg, _ = load_config(path)
    with pytest.raises(ValueError, match=r"missing tensors: \['slow\.layers\.1\.attention\.wo\.weight'\]"):
        load_dual_ar(path, cfg)


def test_misshaped_tensor_is_named(tmp_path, tiny_checkpoint):
    name = "audio_decoder.output.weight"
    path = _rewrite(tiny_checkpoint, tmp_path / "c", lambda w: w.__setitem__(name, w[name][:-1].clone()))
    cfg, _ = load_config(path)
    with pytest.raises(ValueError, match=r"mis-shaped tensors: \['fast\.output\.weight: checkpoint \[4095, 64\]"):
        load_dual_ar(path, cfg)


def test_unexpected_tensor_is_named(tmp_path, tiny_checkpoint):
    path = _rewrite(tiny_checkpoint, tmp_path / "c",
                    lambda w: w.__setitem__("text_model.model.layers.9.extra.weight", torch.zeros(2)))
    cfg, _ = load_config(path)
    with pytest.raises(ValueError, match=r"unexpected tensors: \['slow\.layers\.9\.extra\.weight'\]"):
        load_dual_ar(path, cfg)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        S2Checkpoint.load(tmp_path)


def test_key_mapping_is_invertible(tiny):
    for key in tiny.model.state_dict():
        assert module_key(checkpoint_key(key)) == key


def test_config_rejects_other_model_types():
    with pytest.raises(ValueError, match="model_type"):
        DualARConfig.from_dict({"model_type": "dual_ar"})


def test_fast_config_falls_back_to_text_values(golden_dir):
    raw = json.loads((golden_dir / "checkpoint" / "config.json").read_text())
    for key in ("attention_qk_norm", "n_local_heads", "head_dim"):
        raw["audio_decoder_config"].pop(key)
    cfg = DualARConfig.from_dict(raw)
    assert cfg.fast.qk_norm == cfg.slow.qk_norm is True
    assert cfg.fast.n_kv_head == cfg.slow.n_kv_head and cfg.fast.head_dim == cfg.slow.head_dim
    assert cfg.fast.rope_base == cfg.slow.rope_base and cfg.fast.norm_eps == cfg.slow.norm_eps
