"""Sampling: upstream semantics, the counter-based noise, per-row independence, parameter checks."""

import pytest
import torch

from fish_s2.request import SamplingParams
from fish_s2.sampling import BatchSampling, logits_to_probs, seed_to_key, uniform_noise


def test_noise_matches_the_recorded_stream():
    # check values printed by the golden set's README (generate_sampled.json noise_check_values)
    u = uniform_noise(torch.tensor([0, 0]), torch.tensor([0, 7]), torch.arange(5))
    assert torch.allclose(u[0], torch.tensor([0.883310854434967, 0.5665615200996399, 0.5911896824836731,
                                              0.11345034837722778, 0.4314557909965515]))
    assert torch.allclose(u[1, :3], torch.tensor([0.737705647945404, 0.10251873731613159, 0.6525698304176331]))
    assert ((u > 0) & (u < 1)).all()


def test_noise_is_uniform_and_key_dependent():
    u = uniform_noise(torch.tensor([seed_to_key(1)]), torch.tensor([3]), torch.arange(20000))[0]
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    v = uniform_noise(torch.tensor([seed_to_key(2)]), torch.tensor([3]), torch.arange(20000))[0]
    assert not torch.equal(u, v)


def test_top_p_removes_the_crossing_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = logits_to_probs(logits, torch.tensor([1.0]), torch.tensor([0.75]), torch.tensor([30]))
    assert torch.nonzero(probs[0]).flatten().tolist() == [0]  # cum 0.8 > 0.75 removes token 1 itself


def test_greedy_when_temperature_zero_or_top_k_one():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    for params in (SamplingParams(temperature=0.0), SamplingParams(top_k=1)):
        s = BatchSampling.of([params] * 4)
        idx = s.sample(logits, torch.arange(100), torch.arange(4))
        assert torch.equal(idx, logits.argmax(-1))


def test_rows_sample_independently_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(9, 300)
    params = [SamplingParams(temperature=0.3 + 0.1 * i, top_p=0.9, top_k=20 + i, seed=i) for i in range(9)]
    draws = torch.arange(9) * 11
    together = BatchSampling.of(params).sample(logits, torch.arange(300), draws)
    for i in range(9):
        alone = BatchSampling.of([params[i]]).sample(logits[i:i + 1], torch.arange(300), draws[i:i + 1])
        assert int(alone) == int(together[i])


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(4000, 1)
    s = BatchSampling.of([SamplingParams(temperature=1.0, top_p=1.0, top_k=3, seed=5)] * 4000)
    counts = torch.bincount(s.sample(logits, torch.arange(3), torch.arange(4000)), minlength=3).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", 2.5), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", 0)])
def test_out_of_range_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_sampling_among_the_best_equals_the_full_sort():
    """The k_max fast path (no full sort) draws exactly what upstream's full-sort semantics draw."""
    torch.manual_seed(0)
    for V in (4096, 4097):
        logits = torch.randn(64, V) * 3
        params = [SamplingParams(temperature=0.3 + 0.02 * i, top_p=0.5 + 0.007 * i, top_k=[1, 5, 30, 100][i % 4],
                                 seed=i) for i in range(64)]
        full, best = BatchSampling.of(params), BatchSampling.of(params)
        best.k_max = 100
        for d in range(20):
            draw = torch.full((64,), d)
            assert torch.equal(full.sample(logits, torch.arange(V), draw), best.sample(logits, torch.arange(V), draw))


def test_graph_sampling_bucket_is_exact_or_falls_back():
    """The k_max a graph bakes in (engine.sample_k_max, 64): rows whose top_k fit sample exactly as the full
    sort; a larger top_k would be truncated by it, so the runner picks the full-sort variant instead."""
    from fish_s2.engine.runner import k_bucket

    torch.manual_seed(1)
    logits = torch.randn(64, 4097) * 2
    params = [SamplingParams(temperature=0.5 + 0.01 * i, top_p=[0.8, 0.95, 1.0][i % 3], top_k=[1, 7, 30, 64][i % 4],
                             seed=i) for i in range(64)]
    full, best = BatchSampling.of(params), BatchSampling.of(params)
    best.k_max = k_bucket([p.top_k for p in params], 64)
    assert best.k_max == 64
    for d in range(10):
        draw = torch.full((64,), d)
        assert torch.equal(full.sample(logits, torch.arange(4097), draw), best.sample(logits, torch.arange(4097), draw))
    wide = [SamplingParams(temperature=1.0, top_p=1.0, top_k=1000, seed=i) for i in range(64)]
    assert k_bucket([p.top_k for p in wide], 64) is None            # the runner's full-sort fallback
    truncated = BatchSampling.of(wide)
    truncated.k_max = 64
    draws = torch.arange(64)
    assert not torch.equal(truncated.sample(logits, torch.arange(4097), draws),
                           BatchSampling.of(wide).sample(logits, torch.arange(4097), draws))
