"""Dialogue in the engine: several speaker-turn batches as one request, each later batch appended to the
row's KV (only its new tokens prefilled), equal to upstream ``generate_long``'s re-prefilled batches."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fish_s2.checkpoint import S2Checkpoint
from fish_s2.engine import Engine, EngineConfig
from fish_s2.generate import generate_long
from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.request.dialogue import text_batches
from fish_s2.request import ChunkPlan, EngineRequest, InvalidArgument, SamplingParams, chunks_to_codes, collect

CFG = EngineConfig(max_active=6, max_queued=8, max_prompt_tokens=600, max_frames=120)
DIALOGUE = ("<|speaker:0|>Good morning, how did you sleep? <|speaker:1|>Not well, the storm kept me up. "
            "<|speaker:0|>Coffee, then?")


def _run(engine, reqs):
    handles = [engine.submit(r) for r in reqs]
    while engine.rows or engine.stats()["queued"]:
        engine.step()
    return [collect(h) for h in handles]


def _reference_codes(model, builder, text, refs, params, max_frames, chunk_length):
    """What the engine streams for a dialogue: every batch's yielded codes (upstream drops each batch's last
    column); the last batch keeps its last frame when it ended on its budget, as a one-batch request does."""
    results = list(generate_long(model, builder, text, refs, params, max_frames, chunk_length))
    last = results[-1].generation
    tail = last.codes if last.stopped_on_eos else last.frames[1:]
    return torch.cat([r.generation.codes for r in results[:-1]] + [tail], dim=1), results


def _dialogue_request(builder, text, refs, params, max_frames, chunk_length, **kw):
    d = builder.dialogue(text_batches(text, chunk_length), refs)
    return d, EngineRequest(d.prompt, params, max_frames=max_frames, prefix_len=d.prefix_len, turns=d.turns, **kw)


@pytest.fixture(scope="module")
def golden(golden_dir):
    return S2Checkpoint.load(golden_dir / "checkpoint")


def test_golden_multibatch_codes_through_one_engine_request(golden, golden_dir):
    """Upstream's own two-batch output (greedy, batch 0 ends on its budget, batch 1 on <|im_end|>)."""
    spec = json.loads((golden_dir / "generate_multibatch.json").read_text())
    g = load_file(str(golden_dir / "generate_multibatch.safetensors"))
    builder = PromptBuilder(golden.tokenizer, golden.config.num_codebooks)
    refs = [Reference(spec["prompt_text"][0], g["ref_codes.0"])]
    s = spec["sampling"]
    params = SamplingParams(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"])
    d, req = _dialogue_request(builder, spec["text"], refs, params, spec["max_new_tokens"], spec["chunk_length"])
    assert list(d.batches) == [b["batch_text"] for b in spec["batches"]]
    assert torch.equal(d.prompt, g["b0.prompt"])
    engine = Engine(golden.model, CFG)
    [(chunks, done)] = _run(engine, [req])
    assert done.reason == "stop" and done.error is None
    expected = torch.cat([g["b0.codes_yielded"], g["b1.codes_yielded"]], dim=1)
    assert np.array_equal(chunks_to_codes(chunks), expected.numpy())
    # the second batch's history is exactly upstream's re-built prompt, of which only the new part was prefilled
    turn = d.turns[0].shape[1]
    assert d.prompt.shape[1] + (g["b0.frames"].shape[1] - 1) + turn == g["b1.prompt"].shape[1]
    assert engine.stats()["prefill_tokens"] == d.prompt.shape[1] + turn


def test_three_turn_two_speaker_greedy_equals_generate_long(golden, golden_dir):
    g = load_file(str(golden_dir / "generate_multibatch.safetensors"))
    codes = g["ref_codes.0"]
    refs = [Reference("This is the first voice.", codes[:, :8]), Reference("And this is the second one.", codes[:, 8:])]
    builder = PromptBuilder(golden.tokenizer, golden.config.num_codebooks)
    params = SamplingParams(top_k=1)
    expected, results = _reference_codes(golden.model, builder, DIALOGUE, refs, params, 12, 40)
    assert len(results) == 3
    d, req = _dialogue_request(builder, DIALOGUE, refs, params, 12, 40)
    assert len(d.turns) == 2 and "<|speaker:0|>" in d.batches[0] and "<|speaker:1|>" in d.batches[1]
    [(chunks, done)] = _run(Engine(golden.model, CFG), [req])
    assert done.error is None
    assert np.array_equal(chunks_to_codes(chunks), expected.numpy())


def test_sampled_dialogue_equals_generate_long_alongside_other_requests(tiny):
    """Noise per batch from seed + batch index (upstream's keys); rows move as other requests leave."""
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    g = torch.Generator().manual_seed(3)
    refs = [Reference(f"Voice {i} speaking.", torch.randint(0, 1024, (10, 12), generator=g)) for i in range(2)]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=42)
    expected, results = _reference_codes(tiny.model, builder, DIALOGUE, refs, params, 10, 40)
    d, req = _dialogue_request(builder, DIALOGUE, refs, params, 10, 40, chunk_plan=ChunkPlan(4, 6, 3))
    others = [EngineRequest(*builder.request(f"Other request {i}.", [])[:1], SamplingParams(seed=i), max_frames=3 + i)
              for i in range(3)]
    engine = Engine(tiny.model, CFG)
    (chunks, done), *rest = _run(engine, [req, *others])
    assert all(r[1].error is None for r in rest)
    assert done.error is None and done.n_frames == expected.shape[1]
    assert np.array_equal(chunks_to_codes(chunks), expected.numpy())
    # one chunk plan across the batches: contiguous indices, the plan's sizes, context carried over the boundary
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.n_frames for c in chunks] == ChunkPlan(4, 6, 3).sizes(done.n_frames)
    assert all(c.context == 3 for c in chunks[1:])


def test_prefill_covers_only_new_tokens_and_the_voice_prefix_is_cached(tiny):
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    refs = [Reference("Voice zero.", torch.zeros(10, 6, dtype=torch.long)),
            Reference("Voice one.", torch.ones(10, 6, dtype=torch.long))]
    engine = Engine(tiny.model, CFG)
    d, req = _dialogue_request(builder, DIALOGUE, refs, SamplingParams(seed=1), 5, 40)
    _run(engine, [req])
    assert engine.stats()["prefill_tokens"] == d.n_tokens
    _, again = _dialogue_request(builder, DIALOGUE, refs, SamplingParams(seed=1), 5, 40)
    _run(engine, [again])   # the system block with both voices comes from the prefix cache
    assert engine.stats()["prefill_tokens"] == 2 * d.n_tokens - d.prefix_len
    _, swapped = _dialogue_request(builder, DIALOGUE, refs[::-1], SamplingParams(seed=1), 5, 40)
    _run(engine, [swapped])  # voice order is part of the key
    assert engine.runner.prefix_cache.stats()["misses"] == 2


def test_dialogue_limits_are_checked_at_submit(tiny):
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    engine = Engine(tiny.model, EngineConfig(max_active=2, max_queued=2, max_prompt_tokens=120, max_frames=40))
    long_text = " ".join(f"<|speaker:{i % 2}|>Turn number {i} of a long exchange." for i in range(8))
    d, req = _dialogue_request(builder, long_text, [], SamplingParams(), 5, 40)
    assert d.prompt.shape[1] <= 120 < d.n_tokens
    with pytest.raises(InvalidArgument, match="prompt: .* tokens over .* turn batches"):
        engine.submit(req)
    prompt = builder.request("Hi.", [])[0]
    with pytest.raises(InvalidArgument, match="turns: expected an integer array"):
        engine.submit(EngineRequest(prompt, turns=(torch.zeros(3, 2, dtype=torch.long),)))
    bad_ids = torch.zeros(tiny.config.num_codebooks + 1, 2, dtype=torch.long)
    bad_ids[0, 0] = 1 << 30
    with pytest.raises(InvalidArgument, match="turns: token ids"):
        engine.submit(EngineRequest(prompt, turns=(bad_ids,)))
    assert engine.stats()["active"] == 0 and len(engine.lifecycle) == 0


def test_total_frames_bound_the_whole_dialogue(tiny):
    """Each batch may take max_frames; the request as a whole stops at the engine's max_frames."""
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    engine = Engine(tiny.model, EngineConfig(max_active=2, max_queued=2, max_prompt_tokens=300, max_frames=20))
    _, req = _dialogue_request(builder, DIALOGUE, [], SamplingParams(seed=5), 12, 40)
    [(chunks, done)] = _run(engine, [req])
    assert done.reason == "length" and done.n_frames == 20 == chunks_to_codes(chunks).shape[1]
