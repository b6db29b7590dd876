"""Model code beyond the golden set: KV-cache paths, batch rows, the fast-AR input projection."""

import torch

from fish_s2.checkpoint import S2Checkpoint
from fish_s2.generate import generate
from fish_s2.prompt import PromptBuilder
from fish_s2.request import SamplingParams
from fish_s2.tiny import write_tiny_checkpoint


def _prompt(ck, text="Hello there, friend."):
    b = PromptBuilder(ck.tokenizer, ck.config.num_codebooks)
    return torch.cat([b.system(), b.user(text), b.assistant_start()], dim=1)


@torch.inference_mode()
def test_cached_chunks_equal_full_forward(tiny):
    slow = tiny.model.slow
    inp = _prompt(tiny)[None]
    T = inp.shape[-1]
    full = slow(inp)
    cache = slow.new_cache(3, T + 4)
    parts = [slow(inp[..., a:b], torch.arange(a, b)[None], slice(2, 3), cache=cache)
             for a, b in ((0, 5), (5, T - 1), (T - 1, T))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


@torch.inference_mode()
def test_rows_at_different_positions_share_a_step(tiny):
    """Two sequences of different lengths decoded in one batched step match their solo steps."""
    slow = tiny.model.slow
    a, b = _prompt(tiny, "Short."), _prompt(tiny, "A somewhat longer sentence to speak.")
    cache = slow.new_cache(2, 128)
    solo = []
    for i, p in enumerate((a, b)):
        slow(p[None, :, :-1], torch.arange(p.shape[1] - 1)[None], slice(i, i + 1), cache=cache)
        solo.append(slow(p[None, :, -1:], torch.tensor([[p.shape[1] - 1]]), slice(i, i + 1), cache=cache))
    last = torch.stack([a[:, -1], b[:, -1]])[..., None]
    pos = torch.tensor([[a.shape[1] - 1], [b.shape[1] - 1]])
    both = slow(last, pos, slice(0, 2), cache=cache)
    assert torch.allclose(both, torch.cat(solo), atol=1e-5)


def test_fast_input_projection_checkpoint(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "proj", seed=3, fast_dim=48)
    ck = S2Checkpoint.load(path)
    assert ck.config.fast.dim == 48 and ck.config.has_fast_project_in
    assert ck.model.fast.project_in.weight.shape == (48, 64) and ck.model.fast.project_in.bias is not None
    gen = generate(ck.model, _prompt(ck), 6, SamplingParams(seed=1))
    assert gen.frames.shape[0] == 11 and 1 <= gen.frames.shape[1] <= 6


def test_generation_is_seeded_and_reproducible(tiny):
    p = _prompt(tiny)
    one = generate(tiny.model, p, 12, SamplingParams(temperature=0.9, top_p=0.9, seed=11))
    two = generate(tiny.model, p, 12, SamplingParams(temperature=0.9, top_p=0.9, seed=11))
    other = generate(tiny.model, p, 12, SamplingParams(temperature=0.9, top_p=0.9, seed=12))
    assert torch.equal(one.frames, two.frames)
    assert not torch.equal(one.frames, other.frames)
    cfg = tiny.config
    main = one.frames[0]
    assert ((main >= cfg.semantic_begin_id) & (main <= cfg.semantic_end_id) | (main == cfg.eos_id)).all()
    assert (one.frames[1:] < cfg.codebook_size).all() and (one.frames[1:] >= 0).all()
