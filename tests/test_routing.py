"""Client-side routing (fish_s2.routing) without servers: voice affinity on a consistent-hash ring,
least outstanding streams, round robin, failover only before the first audio, typed errors."""

import asyncio
import time

import pytest

from fish_s2.client import AsyncTTSClient, TTSClient
from fish_s2.request import Busy, NotFound, Unavailable
from fish_s2.routing import Router, parse_endpoints

EPS = ["a:1", "b:1", "c:1"]


def test_parse_endpoints():
    assert parse_endpoints("a:1") == ["a:1"]
    assert parse_endpoints(" a:1, b:2 ") == ["a:1", "b:2"] == parse_endpoints(["a:1", "b:2"])
    for bad in ("", "a:1,,b:1", "a:1,a:1", []):
        with pytest.raises(ValueError, match="url:"):
            parse_endpoints(bad)
    with pytest.raises(ValueError, match="policy:"):
        Router("a:1", policy="random")


def test_voice_affinity_is_consistent_and_spreads():
    router = Router(EPS)
    voices = [f"voice-{i}" for i in range(300)]
    owner = {v: router.order(v)[0] for v in voices}
    assert all(router.order(v)[0] == owner[v] for v in voices)            # same voice, same replica
    assert sorted(router.owners("x")) == sorted(EPS)                      # fallbacks: every other replica
    counts = {ep: list(owner.values()).count(ep) for ep in EPS}
    assert min(counts.values()) > 50, counts                              # all replicas used
    smaller = Router(EPS[:2])                                             # c leaves the fleet
    moved = [v for v in voices if smaller.order(v)[0] != owner[v]]
    assert moved and all(owner[v] == "c:1" for v in moved)                # only c's voices move
    assert Router(list(reversed(EPS))).order("voice-7")[0] == owner["voice-7"]   # independent of list order


def test_least_outstanding_and_round_robin():
    router = Router(EPS)
    assert [router.order()[0] for _ in range(3)] == EPS    # ties rotate
    gen = router.stream(None, lambda ep: (x for x in [ep]))
    first = next(gen)                                  # the stream stays open: first has 1 outstanding
    assert all(router.order()[-1] == first for _ in range(3))
    assert router.outstanding[first] == 1
    gen.close()
    assert router.outstanding[first] == 0
    rr = Router(EPS, policy="round_robin")
    assert [rr.order("same-voice")[0] for _ in range(6)] == EPS + EPS
    least = Router(EPS, policy="least")
    assert len({least.order("same-voice")[0] for _ in range(3)}) == 3   # voices ignored


def _fake(script):
    """open_stream(ep): yields script[ep]'s items, raising any exception instance in it."""
    opened, closed = [], []

    def open_stream(ep):
        opened.append(ep)
        try:
            for item in script[ep]:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            closed.append(ep)

    return open_stream, opened, closed


def test_failover_before_audio_only():
    clock = [0.0]
    router = Router(EPS, policy="round_robin", cooldown_s=5, clock=lambda: clock[0])
    open_stream, opened, _ = _fake({"a:1": [Unavailable("draining")], "b:1": ["x", "y"], "c:1": ["z"]})
    assert list(router.stream(None, open_stream)) == ["x", "y"]
    assert opened == ["a:1", "b:1"] and router.retries == 1 and router.served == {"a:1": 0, "b:1": 1, "c:1": 0}
    assert router.order()[-1] == "a:1"                 # cooling down: tried last
    clock[0] = 6
    assert "a:1" in router.order()[:2]
    # audio sent, then the replica fails: the error reaches the caller, nothing is replayed elsewhere
    open_stream, opened, _ = _fake({ep: ["audio", Unavailable("gone")] for ep in EPS})
    got = []
    with pytest.raises(Unavailable, match="gone"):
        for item in router.stream("v", open_stream):
            got.append(item)
    assert got == ["audio"] and len(opened) == 1
    # the request's own errors are not retried; Busy is; the last replica's error is raised
    open_stream, opened, _ = _fake({ep: [NotFound("voice_id", "unknown voice 'v'")] for ep in EPS})
    with pytest.raises(NotFound):
        list(router.stream("v", open_stream))
    assert len(opened) == 1
    open_stream, opened, _ = _fake({"a:1": [Busy("full")], "b:1": [Unavailable("down")], "c:1": [Unavailable("last")]})
    with pytest.raises(Unavailable, match="last"):
        list(Router(EPS, policy="round_robin").stream(None, open_stream))
    assert opened == EPS


def test_closing_early_closes_the_replica_stream():
    router = Router(EPS)
    open_stream, opened, closed = _fake({ep: ["1", "2", "3"] for ep in EPS})
    gen = router.stream("v", open_stream)
    assert next(gen) == "1"
    gen.close()
    assert closed == opened and len(opened) == 1 and sum(router.outstanding.values()) == 0


def test_unary_calls_fail_over():
    router = Router(EPS, policy="round_robin")
    calls = []

    def call(ep):
        calls.append(ep)
        if ep == "a:1":
            raise Unavailable("connection refused")
        return ep

    assert router.call(None, call) == "b:1" and calls == ["a:1", "b:1"]


def test_async_failover():
    router = Router(EPS, policy="round_robin")

    def open_stream(ep):
        async def gen():
            if ep == "a:1":
                raise Unavailable("draining")
            for x in (ep, "more"):
                yield x
        return gen()

    async def run():
        items = [x async for x in router.astream(None, open_stream)]

        async def call(ep):
            if ep != "a:1":
                return ep
            raise Unavailable("down")

        return items, await Router(EPS, policy="round_robin").acall(None, call)

    assert asyncio.run(run()) == (["b:1", "more"], "b:1")


def test_fleet_client_with_no_reachable_replica_is_unavailable():
    t = time.monotonic()
    with TTSClient("127.0.0.1:1,127.0.0.1:2", timeout_s=10) as client:
        assert len(client._replicas) == 2 and not client.ready()
        with pytest.raises(Unavailable):
            client.synthesize("Hello.", max_frames=4)
        with pytest.raises(Unavailable):
            client.list_voices()
        assert client.router.retries == 2

    async def run():
        async with AsyncTTSClient(["127.0.0.1:1", "127.0.0.1:2"], timeout_s=10) as aclient:
            with pytest.raises(Unavailable):
                await aclient.synthesize("Hello.", max_frames=4)

    asyncio.run(run())
    assert time.monotonic() - t < 20


def test_tritons_own_shutdown_refusals_are_unavailable():
    from fish_s2.request import Internal, from_wire

    stopping = "in ensemble 'tts', Server is stopping, scheduler for model has stopped accepting new inference requests"
    unloaded = "Request for unknown model: 'tts' has no available versions"
    assert type(from_wire(stopping)) is Unavailable and type(from_wire(unloaded)) is Unavailable
    assert type(from_wire("something else")) is Internal


def test_voiced_requests_do_not_skew_the_rotation_of_the_others():
    router = Router(EPS[:2])
    owner = router.order("v")[0]
    firsts = []
    for _ in range(4):                                   # alternate: no voice, voice
        firsts.append(router.order()[0])
        assert router.order("v")[0] == owner
    assert firsts == EPS[:2] * 2


def test_fleet_benchmark_report():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
    import loadgen

    eps = ["a:1", "b:1"]
    before = [{"hits": 10, "misses": 2}, {"hits": 0, "misses": 0}]
    after = [{"hits": 16, "misses": 2}, {"hits": 3, "misses": 1}]
    replicas, rate = loadgen.replica_report(eps, {"a:1": 6, "b:1": 4}, before, after)
    assert replicas == {"a:1": {"served": 6, "prefix_hits": 6, "prefix_misses": 0},
                        "b:1": {"served": 4, "prefix_hits": 3, "prefix_misses": 1}} and rate == 0.9
    assert loadgen.replica_report(eps, {"a:1": 1}, None, None) == ({"a:1": {"served": 1}, "b:1": {"served": 0}}, None)
    level = loadgen.summarize([loadgen.Sample(True, 0.1, 0.2, 0.5, 1.0)], 1.0, 1) | {"replicas": replicas,
                                                                                    "prefix_hit_rate": rate}
    run = {"tag": "t", "mode": "voices", "url": "a:1,b:1", "machine": "m", "command": "c", "note": None,
           "policy": "affinity", "levels": [level]}
    md = loadgen.comparison_markdown({**run, "endpoints": eps, "runs": [run, {**run, "policy": "round_robin"}]})
    assert "| affinity | 1 | 1 | 0 | 90.0% | 6 / 4 | 6/0 / 3/1 |" in md and "## round_robin routing" in md
    assert "affinity 90.0% (9 hits, 1 misses); round_robin 90.0%" in md
