"""Per-request slots and the model's frame step, on CPU: the TensorRT-LLM model's torch half driven
the way the PyTorch backend drives it (tests/trtllm_fakes.py), against the reference generator."""

from types import SimpleNamespace

import pytest
import torch

from fish_s2.generate import generate
from fish_s2.request import SamplingParams
from fish_s2.sampling import seed_to_key
from fish_s2.trtllm.model import (CODES_OUTPUT, MM_KEY, DualARStep, DualARView, FishInputProcessor, failed_frames,
                                 request_inputs)
from fish_s2.trtllm.state import FAILED_CODE, NO_TOKEN, SlotManager, SlotState, bind, bound
from trtllm_fakes import SAMPLE_PARAMS, FakeExecutor, eos_prone, fake_sampling_params, sample_prompts


def _manager(n_slots=3, rows=4):
    return SlotManager(SlotState(n_slots, rows, num_codebooks=10))


def test_slots_follow_batch_rows_and_are_freed():
    m = _manager()
    st = m.state
    m.prepare([(7, True), (8, False)], [])
    s7, s8 = m.slot_of(7), m.slot_of(8)
    assert len({s7, s8, st.scratch}) == 3
    assert st.row_read.tolist() == [s7, s8, st.scratch, st.scratch]
    assert st.row_write.tolist() == [s7, st.scratch, st.scratch, st.scratch]  # 8: not its last prompt chunk
    assert st.row_fail.tolist() == [0, 0, 0, 0]
    m.prepare([(8, True)], [7])
    assert st.row_read.tolist()[:2] == [s8, s7] and st.row_write.tolist()[:2] == [s8, s7]
    assert m.slot_of(8) == s8  # a request keeps its slot across chunks
    m.check_rows([8, 7, -1])   # padding dummies are not checked
    with pytest.raises(RuntimeError, match="batch order"):
        m.check_rows([7, 8])
    # resource-manager protocol (what the executor calls), with its request objects faked
    m.prepare_resources(SimpleNamespace(context_requests=[SimpleNamespace(py_request_id=9, is_last_context_chunk=True)],
                                        generation_requests=[SimpleNamespace(py_request_id=7)]))
    assert m.n_live == 3 and m.get_needed_resource_to_completion(SimpleNamespace(py_request_id=10)) == 1
    m.free_resources(SimpleNamespace(py_request_id=7))
    m.free_resources(SimpleNamespace(py_request_id=7))  # finish then cancel: freed once
    m.prepare([(10, True)], [])
    assert m.slot_of(10) == s7 and m.n_live == 3 and m.n_free == 0 and m.get_max_resource_count() == 3


def test_an_unservable_request_fails_alone():
    """prepare_resources runs outside the executor's per-step error handling: a request without a slot
    (none free, or a generation step whose prompt never ran here) is failed -- flagged on its row, on
    the scratch slot -- and nothing is raised; the other rows keep their slots."""
    m = _manager(n_slots=2)
    st = m.state
    assert m.prepare([(1, True), (2, True), (3, True)], []) == [3]        # no slot left for 3
    s1, s2 = m.slot_of(1), m.slot_of(2)
    assert st.row_read.tolist()[:3] == [s1, s2, st.scratch] and st.row_write.tolist()[:3] == [s1, s2, st.scratch]
    assert st.row_fail.tolist() == [0, 0, 1, 0] and "SlotsExhausted" in m.failed[3]
    assert m.prepare([], [1, 99, 3, 2]) == [99, 3]                        # 99: never prefilled; 3 stays failed
    assert st.row_read.tolist() == [s1, st.scratch, st.scratch, s2] and st.row_fail.tolist() == [0, 1, 1, 0]
    assert "NoSlot" in m.failed[99] and m.n_live == 2
    m.check_rows([1, 99, 3, 2])
    with pytest.raises(RuntimeError, match="batch order"):
        m.check_rows([99, 1, 3, 2])
    for rid in (3, 99, 1):                                               # the executor frees finished requests
        m.free(rid)
    assert m.failed == {} and m.prepare([(4, True)], [2]) == [] and m.slot_of(4) == s1
    assert m.prepare([(i, True) for i in range(10, 16)], []) == list(range(10, 16))  # past the 4 table rows too
    assert st.row_fail.tolist() == [1, 1, 1, 1]


def test_shutdown_returns_every_slot():
    m = _manager(n_slots=2)
    m.prepare([(1, True), (2, True), (3, True)], [])
    assert m.n_free == 0 and m.failed
    m.shutdown()
    assert m.n_live == 0 and m.n_free == 2 and not m.failed
    assert m.prepare([(5, True), (6, True)], []) == []  # both slots are usable again


def test_commit_and_start_semantics():
    st = SlotState(2, 2, num_codebooks=3)
    slots = torch.tensor([0, 1])
    st.start(slots, torch.tensor([0.7, 0.0]), torch.tensor([0.9, 1.0]), torch.tensor([30, 1]), torch.tensor([5, 6]))
    frame = torch.tensor([[11, 1, 2, 3], [12, 4, 5, 6]])
    st.commit(slots, slots, frame, push=torch.tensor([False, True]))  # row 0: a prompt's first frame
    assert st.window[0].tolist() == [NO_TOKEN] * 10 and st.window[1].tolist()[-1] == 12
    assert st.last_codes[:2].tolist() == [[1, 2, 3], [4, 5, 6]] and st.frame_idx[:2].tolist() == [1, 1]
    s = st.sampling(torch.tensor([1, 0]))
    assert s.top_k.tolist() == [1, 30] and s.key.tolist() == [6, 5]
    st.start(slots[:1], torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([3]), torch.tensor([1]))
    assert st.frame_idx[0] == 0 and st.last_codes[0].tolist() == [0, 0, 0] and st.window[0, -1] == NO_TOKEN


def test_bind():
    m = _manager()
    bind(m)
    assert bound() is m
    bind(None)
    with pytest.raises(RuntimeError, match="TrtllmEngine"):
        bound()


def test_input_processor_round_trip():
    prompt = torch.arange(22).view(11, 2)
    inputs = request_inputs(prompt, SamplingParams(temperature=0.0, seed=3), seed_to_key(3))
    ids, extra = FishInputProcessor()(inputs, None)
    data = extra["multimodal_data"][MM_KEY]
    assert ids == [0, 1] and torch.equal(data["prompt"], prompt)
    assert data["sampling"].tolist() == [0.0, pytest.approx(0.8), 1.0]  # greedy -> top_k 1
    assert data["key"].tolist() == [seed_to_key(3)]
    for bad in ({"prompt": "x"}, {"prompt": "", "multi_modal_data": {MM_KEY: {"prompt": torch.zeros(3)}}}):
        with pytest.raises(ValueError, match="multi_modal_data"):
            FishInputProcessor()(bad, None)


def test_engine_batching_reproduces_reference_generation(tiny):
    """Requests joining at different steps, chunked prefill mixed with decoding, CUDA-graph padding
    rows: every request's tokens and codes equal fish_s2.generate.generate's, frame for frame."""
    max_frames, model = 8, eos_prone(tiny.model)
    refs = [generate(model, p, max_frames, sp).frames for p, sp in zip(sample_prompts(tiny), SAMPLE_PARAMS)]
    ex = FakeExecutor(model, max_batch=3, max_num_tokens=48, chunk=16, graph_sizes=(1, 4))
    reqs = []
    for p, sp in zip(sample_prompts(tiny), SAMPLE_PARAMS):
        reqs.append(ex.add(request_inputs(p, sp, seed_to_key(sp.seed)), fake_sampling_params(
            max_tokens=max_frames, end_id=tiny.config.eos_id, top_k=1, additional_model_outputs=[CODES_OUTPUT])))
        ex.step()
        ex.step()
    ex.run()
    for r, ref in zip(reqs, refs):
        frames = torch.cat([torch.tensor(r.tokens)[None], torch.cat(r.codes).T.long()])
        assert torch.equal(frames, ref), (r.py_request_id, frames, ref)
        assert r.finish_reason == ("stop" if int(ref[0, -1]) == tiny.config.eos_id else "length")
    assert any(f["n_pad"] for f in ex.forwards) and any(f["n_context"] and f["n_rows"] > f["n_context"]
                                                        for f in ex.forwards)
    assert any(r.finish_reason == "stop" for r in reqs) and any(r.finish_reason == "length" for r in reqs)
    ex.step()
    assert ex.manager.n_live == 0 and not ex.requests  # every slot freed after finishing


def test_aborted_request_frees_its_slot(tiny):
    p, sp = sample_prompts(tiny)[0], SAMPLE_PARAMS[0]
    ex = FakeExecutor(tiny.model, max_batch=1)
    sp_kw = dict(max_tokens=50, end_id=-1, top_k=1, additional_model_outputs=[CODES_OUTPUT])
    r = ex.add(request_inputs(p, sp, 1), fake_sampling_params(**sp_kw))
    ex.step(), ex.step()
    assert ex.manager.slot_of(r.py_request_id) is not None
    ex.abort(r)
    ex.step()
    assert r.finish_reason == "cancelled" and ex.manager.n_live == 0 and not ex.requests
    # the freed slot serves the next request from a clean state: same frames as a fresh executor
    r2 = ex.add(request_inputs(p, sp, seed_to_key(sp.seed)), fake_sampling_params(**{**sp_kw, "max_tokens": 5}))
    ex.run()
    ref = generate(tiny.model, p, 5, sp).frames
    assert r2.tokens == ref[0].tolist()


def test_failed_requests_end_alone_and_the_rest_match_the_reference(tiny):
    """Driven like the executor: a request that finds no free slot, and one whose slot vanished
    mid-generation, each end on that step with <|im_end|> and a FAILED_CODE frame; the executor keeps
    stepping and every other request still produces the reference frames."""
    max_frames, prompts = 6, sample_prompts(tiny)
    kw = dict(max_tokens=max_frames, end_id=tiny.config.eos_id, top_k=1, additional_model_outputs=[CODES_OUTPUT])
    ex = FakeExecutor(tiny.model, max_batch=3, max_num_tokens=512, n_slots=2)
    reqs = [ex.add(request_inputs(p, sp, seed_to_key(sp.seed)), fake_sampling_params(**kw))
            for p, sp in zip(prompts, SAMPLE_PARAMS)]
    ex.step()  # all three prompts in one forward: the third finds no slot
    ex.step()
    ex.manager.free(reqs[1].py_request_id)  # its slot vanishes behind the executor's back
    ex.run()
    for r in reqs[1:]:
        assert r.finish_reason == "stop" and r.tokens[-1] == tiny.config.eos_id
        assert failed_frames(r.codes[-1]).all() and (r.codes[-1] == FAILED_CODE).all()
        assert not failed_frames(torch.cat(r.codes[:-1])).any() if len(r.codes) > 1 else True
    assert len(reqs[2].tokens) == 1 and len(reqs[1].tokens) == 3
    ref = generate(tiny.model, prompts[0], max_frames, SAMPLE_PARAMS[0]).frames
    frames = torch.cat([torch.tensor(reqs[0].tokens)[None], torch.cat(reqs[0].codes).T.long()])
    assert torch.equal(frames, ref)
    ex.step()
    assert ex.manager.n_live == 0 and not ex.manager.failed and ex.manager.n_free == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA-graph replay of the frame step)")
def test_frame_step_replays_as_a_cuda_graph(tiny):
    """The generation-only step, captured once as a CUDA graph, gives the eager step's frames when the
    slot tables change between replays (what TensorRT-LLM's decode graphs require)."""
    import copy

    model = copy.deepcopy(tiny.model).cuda()
    cfg, rows = model.cfg, 4

    def make():
        m = SlotManager(SlotState(6, rows, cfg.num_codebooks, "cuda"))
        return m, DualARStep(DualARView(cfg, model.slow, model.fast), m, cfg.vocab_size)

    def seed(m, step):
        m.prepare([(i, True) for i in range(4)], [])
        m.prepare([(4, True)], [])
        slots = torch.tensor([m.slot_of(i) for i in range(5)], device="cuda")
        full = lambda v, dt=torch.float32: torch.full((5,), v, dtype=dt, device="cuda")  # noqa: E731
        step.state.start(slots, full(0.8), full(0.9), full(30, torch.long), torch.arange(5, device="cuda") + 11)
        g = torch.Generator().manual_seed(0)
        step.state.last_codes[slots] = torch.randint(0, 1024, (5, cfg.num_codebooks), generator=g).cuda()
        return torch.arange(5, device="cuda") + cfg.semantic_begin_id + 3  # each request's last main token

    def body(step, ids):
        hidden = model.slow.norm(step.embed(ids, rows, 0, step.state.last_codes[:0]))  # stands in for the layers
        return step.frames(hidden, rows, 0)

    batches = [[0, 1, 2], [3, 4, 1, 0], [2], [4, 0]]
    eager_m, eager = make()
    graph_m, graphed = make()
    ids_e, ids_g = seed(eager_m, eager), seed(graph_m, graphed)
    static_ids = torch.zeros(rows, dtype=torch.int32, device="cuda")
    with torch.inference_mode():
        graph_m.prepare([], [0, 1, 2, 3])
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body(graphed, static_ids)  # warm-up
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        seed(graph_m, graphed)
        with torch.cuda.graph(g):
            out = body(graphed, static_ids)
        seed(graph_m, graphed)
        for batch in batches:
            for m, ids in ((eager_m, ids_e), (graph_m, ids_g)):
                m.prepare([], batch)
            static_ids.zero_()
            static_ids[:len(batch)] = ids_g[batch].int()
            g.replay()
            pad = torch.zeros(rows - len(batch), dtype=torch.long, device="cuda")
            ref_logits, ref_codes = body(eager, torch.cat([ids_e[batch], pad]).int())
            n = len(batch)
            assert torch.equal(out[1][:n], ref_codes[:n]) and torch.equal(out[0][:n], ref_logits[:n])
        for buf in ("last_codes", "window", "frame_idx"):  # every request slot (the scratch row is garbage)
            assert torch.equal(getattr(graphed.state, buf)[:5], getattr(eager.state, buf)[:5]), buf
        assert graphed.state.frame_idx[:5].tolist() == [3, 2, 2, 1, 2]  # frames each request took part in


def test_tensorrt_llm_part_is_lazy():
    """Importing the package and the model module needs no tensorrt_llm; building the TensorRT-LLM
    classes does, and says so (it is not installable here: those classes have not run on a GPU)."""
    import importlib.util

    import fish_s2.trtllm.engine  # noqa: F401
    from fish_s2.trtllm import model

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is installed: register() is exercised where it runs")
    with pytest.raises(ModuleNotFoundError, match="tensorrt_llm"):
        model.register()
