"""The TensorRT-LLM converter, cross-checked with an independent implementation: Hugging Face
``transformers``' Qwen3 model loaded with the converted tensors must reproduce our slow AR."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fish_s2.layers import apply_rope, rope_table
from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.tiny import write_tiny_checkpoint
from fish_s2.trtllm.convert import check_conversion, convert_checkpoint, main, neox_permutation
from fish_s2.trtllm.hf_config import ARCHITECTURE, FishS2Config
from fish_s2.trtllm.model import rope_neox

transformers = pytest.importorskip("transformers")


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    return convert_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("trtllm") / "model")


@pytest.fixture(scope="module")
def prompt(tiny):
    """A voice-cloning prompt: its reference block has semantic positions with all 10 codes."""
    g = torch.Generator().manual_seed(0)
    ref = Reference("Hello there, friend.", torch.randint(0, 1024, (tiny.config.num_codebooks, 40), generator=g))
    b = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    return torch.cat([b.system([ref]), b.user("The quick brown fox jumps."), b.assistant_start()], dim=1)


def _qwen3(converted, tensors=None):
    """transformers.Qwen3Model in fp32 from the converted config.json and tensors (strict load)."""
    hf = FishS2Config.from_pretrained(str(converted))
    qc = transformers.Qwen3Config(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads, head_dim=hf.head_dim,
        max_position_embeddings=hf.max_position_embeddings, rope_theta=hf.rope_theta, rms_norm_eps=hf.rms_norm_eps,
        tie_word_embeddings=True, attention_bias=hf.attention_bias)
    model = transformers.Qwen3Model(qc).float().eval()
    tensors = _tensors(converted) if tensors is None else tensors
    sd = {k.removeprefix("model."): v.float() for k, v in tensors.items()
          if k.startswith("model.") and k != "model.codebook_embeddings.weight"}
    model.load_state_dict(sd, strict=True)
    return model, hf


def _use_table(model, table):
    """Make HF's rotary embedding return our bf16-rounded table (NeoX layout: [cos, cos], [sin, sin])."""
    cos, sin = torch.cat([table[..., 0]] * 2, -1)[None], torch.cat([table[..., 1]] * 2, -1)[None]
    model.rotary_emb.forward = lambda x, position_ids: (cos.to(x.dtype), sin.to(x.dtype))


@torch.inference_mode()
def test_transformers_qwen3_reproduces_slow_ar(tiny, converted, prompt):
    """Converted tensors in HF Qwen3 (fp32) == our SlowAR.forward (fp32), final-norm hidden states.

    Tolerances. Both sides run fp32 with the same weights (bf16 values, cast exactly) and, in the
    tight check, the same cos/sin table (upstream's, rounded to bf16), so what remains is fp32
    rounding from a different op order (HF's rotate_half vs our stacked pairs, repeat_kv vs
    repeat_interleave, another SDPA call): measured ~2e-6 on outputs of magnitude ~5, asserted
    < 1e-4. With HF's own fp32 cos/sin the table differs by the bf16 rounding (relative error up
    to 2^-9 ~ 2e-3 per entry), which moves the output by ~5e-3 here: asserted > 1e-3 (so the tight
    check is not vacuous: the bf16 table is what makes it pass) and < 5e-2 (nothing else differs).
    Without the converter's q/k permutation the same comparison is off by O(1).
    """
    inp = prompt[None]
    T = inp.shape[-1]
    ours = tiny.model.slow(inp)
    emb = tiny.model.slow.embed(inp)
    pos = torch.arange(T)[None]
    model, hf = _qwen3(converted)

    fp32_table = model(inputs_embeds=emb, position_ids=pos).last_hidden_state
    _use_table(model, rope_table(T, hf.head_dim, hf.rope_theta))
    bf16_table = model(inputs_embeds=emb, position_ids=pos).last_hidden_state

    tight = (bf16_table - ours).abs().max().item()
    loose = (fp32_table - ours).abs().max().item()
    assert tight < 1e-4, tight
    assert 1e-3 < loose < 5e-2, loose
    assert ours.abs().max() > 1.0  # the comparison is on O(1) values

    # negative control: the upstream (interleaved) q/k rows, unpermuted, do not match
    tensors = _tensors(converted)
    inv = torch.argsort(neox_permutation(hf.head_dim))
    for k in list(tensors):
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            tensors[k] = tensors[k].unflatten(0, (-1, hf.head_dim))[:, inv].flatten(0, 1)
        elif k.endswith(("q_norm.weight", "k_norm.weight")):
            tensors[k] = tensors[k][inv]
    raw, _ = _qwen3(converted, tensors)
    _use_table(raw, rope_table(T, hf.head_dim, hf.rope_theta))
    assert (raw(inputs_embeds=emb, position_ids=pos).last_hidden_state - ours).abs().max() > 0.1


def test_neox_rope_adapter_equals_upstream_rope():
    """rope_neox on permuted heads == permuted apply_rope on interleaved heads, bit for bit."""
    g = torch.Generator().manual_seed(1)
    D = 32
    x = torch.randn(2, 7, 3, D, generator=g).to(torch.bfloat16)
    table = rope_table(16, D, 1e6)[torch.tensor([0, 3, 4, 5, 9, 10, 15])][None]
    perm = neox_permutation(D)
    assert torch.equal(rope_neox(x[..., perm], table), apply_rope(x, table)[..., perm])


def test_converted_directory(tiny, tiny_checkpoint, converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE] and cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    hf = FishS2Config.from_pretrained(str(converted))
    assert hf.dual_ar_config() == tiny.config  # semantic range and eos from the tokenizer, as the core loads them
    assert (hf.hidden_size, hf.num_hidden_layers, hf.head_dim) == (tiny.config.slow.dim, tiny.config.slow.n_layer,
                                                                  tiny.config.slow.head_dim)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (converted / name).read_bytes() == (tiny_checkpoint / name).read_bytes()

    t = _tensors(converted)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    sd = {k: v for k, v in tiny.model.state_dict().items()}
    fast = {k[len("fast."):]: v for k, v in t.items() if k.startswith("fast.")}
    assert fast.keys() == {k[len("fast."):] for k in sd if k.startswith("fast.")}
    assert all(torch.equal(fast[k].float(), sd["fast." + k]) for k in fast)
    assert torch.equal(t["model.codebook_embeddings.weight"].float(), sd["slow.codebook_embeddings.weight"])
    assert "lm_head.weight" not in t  # tied
    qkv = sd["slow.layers.1.attention.wqkv.weight"]
    v_rows = tiny.config.slow.n_kv_head * tiny.config.slow.head_dim
    assert torch.equal(t["model.layers.1.self_attn.v_proj.weight"].float(), qkv[-v_rows:])


def test_sharded_streaming_conversion(tmp_path, converted):
    """A 3-shard checkpoint converted into many small output shards gives the same tensors, an index
    naming every tensor, and no leftovers."""
    src = write_tiny_checkpoint(tmp_path / "sharded", seed=0, shards=3)
    out = convert_checkpoint(src, tmp_path / "out", max_shard_bytes=1 << 20)
    files = sorted(p.name for p in out.glob("model*"))
    assert len(files) > 3 and "model.safetensors.index.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in set(index.values()):
        with safe_open(str(out / shard), "pt") as f:
            assert {k for k, s in index.items() if s == shard} == set(f.keys())
    mine, ref = _tensors(out), _tensors(converted)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert not list(out.glob("*.tmp"))
    mode = (src / "config.json").stat().st_mode & 0o777   # safetensors writes 0600; the outputs take the source's
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {mode}
    # converting again into the same directory replaces the shards
    convert_checkpoint(src, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_check_conversion_catches_a_wrong_layout(tmp_path, tiny_checkpoint, converted):
    """The check maps the shards back (q/k inverse-permuted) and compares with the source; upstream
    (unpermuted) q rows, a changed value or a missing tensor are named."""
    assert "equal the source" in check_conversion(tiny_checkpoint, converted)
    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    t = load_file(str(out / "model.safetensors"))
    good = dict(t)
    inv = torch.argsort(neox_permutation(json.loads((out / "config.json").read_text())["head_dim"]))
    key = "model.layers.1.self_attn.q_proj.weight"
    t[key] = t[key].unflatten(0, (-1, inv.numel()))[:, inv].flatten(0, 1).contiguous()
    t["fast.norm.weight"] = t["fast.norm.weight"] + 1
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"differ from the source.*'fast.norm.weight', 'slow.layers.1.attention.wqkv"):
        check_conversion(tiny_checkpoint, out)
    del good["model.layers.0.self_attn.k_norm.weight"]
    save_file(good, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors.*layers.0.self_attn.k_norm.weight"):
        check_conversion(tiny_checkpoint, out)


def test_bad_checkpoints_are_named(tmp_path, tiny_checkpoint):
    src = write_tiny_checkpoint(tmp_path / "broken", seed=0)
    t = load_file(str(src / "model.safetensors"))
    del t["text_model.model.layers.0.attention.q_norm.weight"]
    t["text_model.model.extra.weight"] = torch.zeros(2)
    save_file(t, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensors.*extra.weight"):
        convert_checkpoint(src, tmp_path / "out")
    del t["text_model.model.extra.weight"]
    save_file(t, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensors.*layers.0.attention.q_norm.weight"):
        convert_checkpoint(src, tmp_path / "out")
    with pytest.raises(ValueError, match="out_dir"):
        convert_checkpoint(tiny_checkpoint, tiny_checkpoint)
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2


def test_cli(tmp_path, tiny_checkpoint, capsys):
    assert main([str(tiny_checkpoint), str(tmp_path / "cli")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "cli") and "check: " in captured.err
    assert (tmp_path / "cli" / "model.safetensors").is_file()
