"""The compiled decode step and prefill chunks (engine.compile: on) against the eager ones: greedy codes
identical and fp32 logits within 1e-4 of their scale on the tiny and small configs (the steps read the
KV that padded compiled prefill chunks wrote); sampling among k_max candidates equals
the full sort and falls back to it when a top_k exceeds k_max; the fused w1/w3 keeps the checkpoint's
names. On the CPU inductor compiles C++ (minutes per small-config graph on a busy 2-core machine), so
each case compiles one bucket of each function once."""

import numpy as np
import pytest
import torch

from fish_s2.checkpoint import S2Checkpoint
from fish_s2.engine import Engine, EngineConfig, TorchRunner
from fish_s2.engine.runner import compile_step, k_bucket
from fish_s2.generate import generate
from fish_s2.layers import FeedForward
from fish_s2.prompt import PromptBuilder
from fish_s2.request import EngineRequest, SamplingParams, chunks_to_codes, collect
from fish_s2.tiny import write_tiny_checkpoint

CFG = dict(max_active=2, max_prompt_tokens=100, max_frames=24, graph_batch_sizes=(2,), prefill_chunk_tokens=14)
TEXTS = ("Hello there, friend.", "The quick brown fox jumps over the lazy dog.")


def _prompts(ck):
    b = PromptBuilder(ck.tokenizer, ck.config.num_codebooks)
    return [torch.cat([b.system([]), b.user(t), b.assistant_start()], dim=1) for t in TEXTS]


def _logits(runner, n: int, kv_len: int):
    """fp32 logits at the rows' next step: the slow AR's audio logits and the fast AR's (teacher-forced on
    the current codes). Writes the same KV entry the step itself writes first."""
    sl, m = slice(0, n), runner.model
    hidden = m.slow(runner.cur[sl, :, None], runner.pos[sl, None], sl, kv_len, runner.slow_cache)[:, 0]
    return m.slow.audio_logits(hidden), m.fast(hidden, runner.cur[sl, 1:-1])


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_compiled_step_equals_eager(preset, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint if preset == "tiny" else write_tiny_checkpoint(tmp_path / "small", preset="small", seed=0)
    ck = S2Checkpoint.load(path)
    eager = TorchRunner(ck.model, EngineConfig(**CFG, compile="off"))
    comp = TorchRunner(S2Checkpoint.load(path).model, EngineConfig(**CFG, compile="on"))
    assert comp.compiled and not eager.compiled and comp.model.slow.layers[0].feed_forward.w13 is not None
    if preset == "small":   # the first frame and prefill are compiled on tiny; here only the step (CPU compile time)
        comp._first_fn, comp._prefill_fn = comp._first_frame_body, comp._prefill_body
    logits_fn = compile_step(_logits)
    with torch.inference_mode():
        for prompt in _prompts(ck):   # prefilled in chunks of 14, the last one padded to its bucket in "graphs"
            req = EngineRequest(prompt, SamplingParams(top_k=1))
            assert prompt.shape[1] % 14 and torch.equal(eager.admit(req), comp.admit(req))
        assert [k for k in comp.build_s if k[0] == "prefill"] == [("prefill", 14, 124)]
        for i in range(12):
            if i % 4 == 0:
                kv = comp.step_key(2)[1]
                for ours, ref in zip(logits_fn(comp, 2, kv), _logits(eager, 2, kv)):
                    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
            assert torch.equal(eager.step(), comp.step()), f"step {i}"


def _reference(ck, req):
    ref = generate(ck.model, req.prompt, req.max_frames, req.params)
    return ref.frames[1:, :-1] if ref.stopped_on_eos else ref.frames[1:]


def test_candidate_sampling_in_compiled_steps_and_its_fallback(tiny_checkpoint):
    """top_k <= k_max: the compiled step samples among 64 candidates; a request with a larger top_k
    switches the step to its full-sort variant. Both give the reference generator's (full sort) samples."""
    assert k_bucket([1, 30, 64], 64) == 64 and k_bucket([30, 65], 64) is None and k_bucket([1], 0) is None
    ck = S2Checkpoint.load(tiny_checkpoint)
    engine = Engine(S2Checkpoint.load(tiny_checkpoint).model, EngineConfig(**CFG, compile="on"))
    prompts = _prompts(ck)
    reqs = [EngineRequest(prompts[0], SamplingParams(temperature=0.9, top_p=0.95, top_k=100, seed=1), max_frames=6),
            EngineRequest(prompts[1], SamplingParams(temperature=0.7, top_p=0.9, top_k=30, seed=2), max_frames=14)]
    handles = [engine.submit(r) for r in reqs]
    while engine.rows or engine.stats()["queued"]:
        engine.step()
    results = [collect(h) for h in handles]
    for req, (chunks, done) in zip(reqs, results):
        assert np.array_equal(chunks_to_codes(chunks), _reference(ck, req))
    # first frames: one of each; steps: full sort while the top_k 100 request runs, then 64 candidates for
    # the other one alone (if it outlived the first)
    built = set(engine.runner.build_s)
    assert {("first", None), ("first", 64), (2, 124, None)} <= built
    assert ((2, 124, 64) in built) == (results[1][1].n_frames > results[0][1].n_frames)


def test_fused_feed_forward_keeps_the_checkpoint_format():
    torch.manual_seed(0)
    ff, x = FeedForward(16, 40), torch.randn(3, 16)
    names, before = set(ff.state_dict()), ff(x)
    ff.fuse()
    assert set(ff.state_dict()) == names and ff.w13.shape == (80, 16)
    assert torch.allclose(ff(x), before, atol=1e-6)
    state = {k: torch.randn_like(v) for k, v in ff.state_dict().items()}
    ff.load_state_dict(state)   # loads through the views into the fused weight
    assert torch.equal(ff.w13, torch.cat([state["w1.weight"], state["w3.weight"]]))
