"""Dialogue in the engine: several speaker-turn batches as one request, each later batch appended to the
row's KV (only its new tokens prefilled), equal to upstream ``generate_long``'s re-prefilled batches."""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fish_s2.checkpoint import S2Checkpoint
from fish_s2.engine import Engine, EngineConfig
from fish_s2.generate import generate_long
from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.request.dialogue import text_batches
from fish_s2.request import (ChunkPlan, EngineRequest, InvalidArgument, NotFound, SamplingParams, chunks_to_codes,
                             collect)

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


@pytest.mark.parametrize("prefill_chunk", [512, 6])
def test_sampled_dialogue_equals_generate_long_alongside_other_requests(tiny, prefill_chunk):
    """Noise per batch from seed + batch index (upstream's keys); rows move as other requests leave; each
    turn's segment may be prefilled over several steps (the admission budget) while the others run."""
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    g = torch.Generator().manual_seed(3)
    refs = [Reference(f"Voice {i} speaking.", torch.randint(0, 1024, (10, 12), generator=g)) for i in range(2)]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=42)
    expected, results = _reference_codes(tiny.model, builder, DIALOGUE, refs, params, 10, 40)
    d, req = _dialogue_request(builder, DIALOGUE, refs, params, 10, 40, chunk_plan=ChunkPlan(4, 6, 3))
    others = [EngineRequest(*builder.request(f"Other request {i}.", [])[:1], SamplingParams(seed=i), max_frames=3 + i)
              for i in range(3)]
    engine = Engine(tiny.model, dataclasses.replace(CFG, prefill_chunk_tokens=prefill_chunk))
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


def _drive(engine, until):
    while not until():
        engine.step()


def test_session_segments_appended_while_it_runs_equal_one_dialogue_request(tiny):
    """A session given its batches one by one (some while it waits, parked, for text) streams exactly what
    the same batches sent as one request stream; only the new tokens are prefilled."""
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    batches = ["<|speaker:0|>First sentence here.", "<|speaker:0|>Second one follows.", "<|speaker:0|>The end."]
    d = builder.dialogue(batches, [])
    params, plan = SamplingParams(temperature=0.9, seed=8), ChunkPlan(3, 5, 2)
    [(expected, whole)] = _run(Engine(tiny.model, CFG), [EngineRequest(d.prompt, params, max_frames=7,
                                                                       chunk_plan=plan, turns=d.turns)])
    engine = Engine(tiny.model, CFG)
    other = engine.submit(EngineRequest(builder.request("Someone else.", [])[0], SamplingParams(seed=1), max_frames=30))
    handle = engine.submit(EngineRequest(d.prompt, params, max_frames=7, chunk_plan=plan, open_input=True))
    live = engine.lifecycle.get(handle.request_id)
    _drive(engine, lambda: live.parked)                       # the first batch is done; no text yet
    frames_then = live.n_frames
    for _ in range(3):
        engine.step()                                         # the other request decodes, the session waits
    assert live.parked and live.n_frames == frames_then and engine.rows[1] is live
    engine.append(handle.request_id, d.turns[0])
    _drive(engine, lambda: live.turn == 1)
    engine.append(handle.request_id, d.turns[1], end=True)   # known before the batch ends: no parking
    _drive(engine, lambda: live.done)
    chunks, done = collect(handle)
    assert done.reason == whole.reason and done.n_frames == whole.n_frames
    assert np.array_equal(chunks_to_codes(chunks), chunks_to_codes(expected))
    assert [c.index for c in chunks] == [c.index for c in expected]
    _drive(engine, lambda: not engine.rows)
    assert collect(other)[1].error is None
    assert engine.stats()["prefill_tokens"] == d.n_tokens + builder.request("Someone else.", [])[0].shape[1]


def test_session_ends_when_its_input_ends_and_refuses_bad_appends(tiny):
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    engine = Engine(tiny.model, EngineConfig(max_active=2, max_queued=2, max_prompt_tokens=80, max_frames=40))
    prompt = builder.request("Hello.", [])[0]
    handle = engine.submit(EngineRequest(prompt, SamplingParams(seed=2), max_frames=4, open_input=True))
    live = engine.lifecycle.get(handle.request_id)
    _drive(engine, lambda: live.parked)
    assert live.n_frames == 3                                   # the budget's last frame is held back
    too_long = builder.dialogue(["a", "word " * 40], []).turns[0]
    with pytest.raises(InvalidArgument, match="^text: the session's text would take"):
        engine.append(handle.request_id, too_long)
    with pytest.raises(InvalidArgument, match="^text: expected an integer array"):
        engine.append(handle.request_id, torch.zeros(2, 2, dtype=torch.long))
    engine.append(handle.request_id, end=True)
    _drive(engine, lambda: live.done)
    chunks, done = collect(handle)
    assert done.reason == "length" and done.n_frames == 4 == chunks_to_codes(chunks).shape[1]   # ... and sent
    with pytest.raises(NotFound):
        engine.append(handle.request_id, end=True)
    one_shot = engine.submit(EngineRequest(prompt, max_frames=2))
    with pytest.raises(InvalidArgument, match="^request_id: the request is not a session"):
        engine.append(one_shot.request_id, end=True)
    session = engine.submit(EngineRequest(prompt, max_frames=2, open_input=True))
    engine.append(session.request_id, end=True)
    with pytest.raises(InvalidArgument, match="^text: the session's input has ended"):
        engine.append(session.request_id, end=True)
    _drive(engine, lambda: not engine.rows and not engine.stats()["queued"])


def test_a_parked_session_is_cancelled_and_the_loop_thread_waits_without_spinning(tiny):
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    engine = Engine(tiny.model, CFG).start()
    try:
        handle = engine.submit(EngineRequest(builder.request("Hi.", [])[0], max_frames=3, open_input=True))
        live = engine.lifecycle.get(handle.request_id)
        deadline = time.monotonic() + 30
        while not live.parked and time.monotonic() < deadline:
            time.sleep(0.01)
        frames = engine.stats()["frames_generated"]
        time.sleep(0.3)
        assert live.parked and engine.stats()["frames_generated"] == frames
        handle.cancel()
        chunks, done = collect(handle)
        assert done.reason == "cancelled" and engine.stats()["active"] == 0
    finally:
        engine.stop()


def test_a_session_waiting_too_long_for_text_is_ended(tiny):
    builder = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    engine = Engine(tiny.model, EngineConfig(max_active=2, max_queued=2, max_prompt_tokens=80, max_frames=40,
                                             session_idle_s=0.2))
    handle = engine.submit(EngineRequest(builder.request("Hello.", [])[0], max_frames=3, open_input=True))
    live = engine.lifecycle.get(handle.request_id)
    _drive(engine, lambda: live.parked)
    time.sleep(0.3)
    engine.step()
    chunks, done = collect(handle)
    assert done.reason == "cancelled" and "no text for 0.2 s" in str(done.error) and engine.stats()["active"] == 0
