"""Load generator for the Triton `tts` ensemble: a concurrency sweep of streaming requests.

For each concurrency level, `c` workers keep one request each in flight (closed loop) for a fixed
number of requests or a duration, after an untimed warm-up. Per level it reports time to first
audio, time to the second chunk and total latency (p50/p90/p99), per-request real-time factor,
aggregate audio-seconds per second, requests per second and errors, the playback gap (how long a
real-time player that starts at the first chunk waits for late chunks, per stream) and the change
of Triton's own inference statistics over the level. Two prompt modes:

  unique  every request brings its own reference voice (audio + text), so no prefix is reused
          (the fair mode against prefix caching: each request pays reference encoding + prefill);
  shared  every request uses one voice registered up front (its KV prefix is cached);
  voices  --voices voices registered up front, one picked at random (seeded by the request's index)
          per request;
  session  a text session per request (fish_s2.text_session.TextSession: one stream, each sentence
          appended to the running request), its text (2-4 untagged corpus lines) fed word by word at
          --words-per-s, as a language model writes: per segment the time from its last word to the
          first chunk of its turn, and the playback gap split into waits within a segment and waits
          at a change of segment;
  dialogue  --voices voices registered up front; each request is a dialogue of 2-4 of them (random per
          request) over 3-8 speaker turns made of corpus lines, chunk_length 100, so that its batches
          follow one another in one stream: the playback gap then includes what each turn boundary
          costs (the next turn's prefill), next to the time to first audio.

Fleet benchmark: several comma-separated --url endpoints make the client route across replicas
(fish_s2.routing). --routing runs the same sweep once per policy (affinity: the same voice on the
same replica; round_robin; least), each with its own freshly registered voices, and reports per
level the requests each replica served and, with --metrics-url (each replica's Triton metrics, in
--url's order), the prefix-cache hits and misses each replica counted (fish_s2_prefix_cache_*_total)
and the hit rate.

Writes JSON, a markdown table and a PNG plot under --out, and prints the JSON as its last line.

    python perf/loadgen.py --url 127.0.0.1:8001 --concurrency 1,2,4,8 --requests 16 --mode shared
    python perf/loadgen.py --url HOST1:8001,HOST2:8001 --metrics-url http://HOST1:8002/metrics,http://HOST2:8002/metrics \\
        --mode voices --voices 4 --routing affinity,round_robin --concurrency 1,4 --tag fleet
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import sys
import time
import urllib.request
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fish_s2.client import AsyncTTSClient, TTSClient
from fish_s2.request import Player, RequestError
from fish_s2.request.dialogue import speakers
from fish_s2.routing import parse_endpoints
from fish_s2.text_session import TextSession

sys.path.insert(0, str(Path(__file__).resolve().parent))   # perf/ (also when loaded by path, not as a script)
from corpus import CORPUS, read_corpus  # noqa: E402

SHARED_VOICE = "loadgen-shared"


@dataclass
class Sample:
    """One request's timeline (seconds from its own start)."""

    ok: bool
    first: float | None = None
    second: float | None = None
    total: float | None = None
    audio_s: float = 0.0
    gap: float = 0.0          # playback gap of the stream (seconds)
    error: str | None = None
    segment_first_audio: list[float] | None = None   # session mode: per segment, last word -> first audio
    gap_within: float = 0.0   # session mode: waits for a chunk of the same segment as the chunk before
    gap_between: float = 0.0  # session mode: waits at a change of segment

    @property
    def rtf(self) -> float | None:
        return self.total / self.audio_s if self.ok and self.audio_s > 0 else None


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": len(values)}


def reference_voice(i: int, sample_rate: int = 24000, seconds: float = 3.0) -> tuple[np.ndarray, int, str]:
    """A distinct synthetic reference recording per index (a vowel-like tone with its own pitch)."""
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    f0 = 90.0 + 7.0 * (i % 40)
    audio = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * 0.15
    audio *= 0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t) ** 2
    audio += np.random.default_rng(i).normal(0, 0.01, t.size)
    return audio.astype(np.float32), sample_rate, f"This is reference recording number {i}."


async def one_request(client: AsyncTTSClient, text: str, fields: dict) -> Sample:
    t0 = time.perf_counter()
    s = Sample(ok=False)
    n, samples, rate, player = 0, 0, 1, Player()
    try:
        async for chunk in client.stream(text, **fields):
            dt = time.perf_counter() - t0
            if n == 0:
                s.first = dt
            elif n == 1:
                s.second = dt
            n += 1
            samples += chunk.audio.size
            rate = chunk.sample_rate
            player.add(dt, chunk.audio.size / rate)
        s.total = time.perf_counter() - t0
        s.audio_s = samples / rate
        s.gap = player.gap
        s.ok = n > 0
        if not s.ok:
            s.error = "no audio"
    except RequestError as e:
        s.error = str(e)
    return s


async def session_request(client: AsyncTTSClient, text: str, fields: dict, words_per_s: float) -> Sample:
    """A text session fed word by word at ``words_per_s``; see the module's session mode."""
    t0 = time.perf_counter()
    s = Sample(ok=False)
    session = TextSession(client, **fields)

    async def feed():
        for word in text.split(" "):
            await session.send_text(word + " ")
            await asyncio.sleep(1 / words_per_s)
        await session.end()

    feeder = asyncio.create_task(feed())
    arrivals, samples, rate, player, last_turn = [], 0, 1, Player(), 0
    try:
        async for chunk in session.chunks():
            now = time.perf_counter()
            arrivals.append((chunk.turn, now))
            samples += chunk.audio.size
            rate = chunk.sample_rate
            wait = player.add(now - t0, chunk.audio.size / rate)
            if chunk.turn != last_turn:
                s.gap_between += wait
            else:
                s.gap_within += wait
            last_turn = chunk.turn
        await feeder
        s.total = time.perf_counter() - t0
        s.first = arrivals[0][1] - t0 if arrivals else None
        s.second = arrivals[1][1] - t0 if len(arrivals) > 1 else None
        s.audio_s, s.gap, s.ok = samples / rate, player.gap, bool(arrivals)
        # a segment's first audio: the first chunk whose last frame is of its turn or a later one
        s.segment_first_audio = [next(t for turn, t in arrivals if turn >= k) - cut
                                 for k, cut in enumerate(session.segment_times) if any(a[0] >= k for a in arrivals)]
        if not s.ok:
            s.error = "no audio"
    except RequestError as e:
        s.error = str(e)
    finally:
        feeder.cancel()
    return s


def request_fields(mode: str, i: int, args) -> dict:
    fields = {"seed": i, "max_frames": args.max_frames}
    if mode in ("shared", "session"):
        fields["voice_id"] = SHARED_VOICE
    elif mode == "voices":     # random, not cyclic: a cycle would line up with round robin's
        fields["voice_id"] = args.voice_ids[random.Random(i).randrange(len(args.voice_ids))]
    elif mode == "dialogue":
        rng = random.Random(i)
        fields["voice_id"] = rng.sample(args.voice_ids, rng.randint(2, min(4, len(args.voice_ids))))
        fields["chunk_length"] = 100
    else:
        audio, rate, text = reference_voice(i)
        fields.update(reference_audio=audio, reference_sample_rate=rate, reference_text=text)
    return fields


def request(mode: str, i: int, texts: list[str], args) -> tuple[str, dict]:
    """Request i: its text (a corpus line; a session: 2-4 lines; a dialogue: 3-8 lines as turns of its
    speakers in turn) and its fields."""
    fields = request_fields(mode, i, args)
    if mode not in ("session", "dialogue"):
        return texts[i % len(texts)], fields
    lines, rng = [t for t in texts if not speakers(t)], random.Random(-i)
    if mode == "session":
        return " ".join(lines[rng.randrange(len(lines))] for _ in range(rng.randint(2, 4))), fields
    n = len(fields["voice_id"])
    return " ".join(f"<|speaker:{t % n}|>{lines[rng.randrange(len(lines))]}" for t in range(rng.randint(3, 8))), fields


async def run_level(url: str, concurrency: int, texts: list[str], args, offset: int,
                    policy: str = "affinity") -> tuple[list[Sample], float, dict[str, int]]:
    """Closed loop: `concurrency` workers, until --requests requests or --duration seconds are done;
    (samples, wall seconds, requests each endpoint served)."""
    samples: list[Sample] = []
    counter = {"next": 0}
    deadline = None

    def take() -> int | None:
        if args.duration is not None:
            if time.perf_counter() >= deadline:
                return None
        elif counter["next"] >= args.requests:
            return None
        counter["next"] += 1
        return counter["next"] - 1

    async with AsyncTTSClient(url, policy=policy) as client:
        async def worker():
            while (i := take()) is not None:
                k = offset + i
                text, fields = request(args.mode, k, texts, args)
                samples.append(await (session_request(client, text, fields, args.words_per_s)
                                      if args.mode == "session" else one_request(client, text, fields)))

        t = time.perf_counter()
        deadline = t + (args.duration or 0)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        endpoints = parse_endpoints(url)     # one endpoint: no routing, every request went there
        served = dict(client.router.served) if len(endpoints) > 1 else {endpoints[0]: len(samples)}
        return samples, time.perf_counter() - t, served


def triton_stats(url: str) -> dict[str, dict]:
    """Per-model cumulative counters of Triton's inference statistics (summed over a fleet's endpoints)."""
    import tritonclient.grpc as grpcclient

    endpoints = parse_endpoints(url)
    if len(endpoints) > 1:
        per = [triton_stats(ep) for ep in endpoints]
        return {name: {k: sum(s.get(name, {}).get(k, 0) for s in per) for k in per[0][name]} for name in per[0]}

    raw = grpcclient.InferenceServerClient(url).get_inference_statistics(as_json=True)
    out = {}
    for m in raw.get("model_stats", []):
        inf = m.get("inference_stats", {})
        out[m["name"]] = {
            "inference_count": int(m.get("inference_count", 0)), "execution_count": int(m.get("execution_count", 0)),
            "success": int(inf.get("success", {}).get("count", 0)), "fail": int(inf.get("fail", {}).get("count", 0)),
            "queue_ns": int(inf.get("queue", {}).get("ns", 0)),
            "compute_infer_ns": int(inf.get("compute_infer", {}).get("ns", 0))}
    return out


PREFIX = re.compile(r"^fish_s2_prefix_cache_(hits|misses)_total(?:\{[^}]*\})?\s+(\S+)", re.M)


def prefix_counts(metrics_url: str) -> dict[str, float]:
    """A replica's cumulative prefix-cache hits and misses (summed over its engines)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    counts = {"hits": 0.0, "misses": 0.0}
    for kind, value in PREFIX.findall(text):
        counts[kind] += float(value)
    return counts


def replica_report(endpoints: list[str], served: dict[str, int], before: list[dict] | None,
                   after: list[dict] | None) -> tuple[dict, float | None]:
    """Per replica: requests served and prefix-cache hits/misses over a level; the fleet's hit rate."""
    replicas = {ep: {"served": served.get(ep, 0)} for ep in endpoints}
    if before is None:
        return replicas, None
    for ep, b, a in zip(endpoints, before, after):
        replicas[ep].update(prefix_hits=a["hits"] - b["hits"], prefix_misses=a["misses"] - b["misses"])
    hits = sum(r["prefix_hits"] for r in replicas.values())
    total = hits + sum(r["prefix_misses"] for r in replicas.values())
    return replicas, (hits / total if total else None)


def diff_stats(before: dict, after: dict) -> dict:
    return {name: {k: after[name][k] - before.get(name, {}).get(k, 0) for k in after[name]} for name in after}


def summarize(samples: list[Sample], wall: float, concurrency: int) -> dict:
    ok = [s for s in samples if s.ok]
    audio = sum(s.audio_s for s in ok)
    return {"concurrency": concurrency, "requests": len(samples), "errors": len(samples) - len(ok),
            "error_examples": sorted({s.error for s in samples if s.error})[:3], "wall_s": wall,
            "requests_per_s": len(ok) / wall, "audio_s_per_s": audio / wall, "audio_s": audio,
            "ttfa_s": percentiles([s.first for s in ok]),
            "second_chunk_s": percentiles([s.second for s in ok if s.second is not None]),
            "total_s": percentiles([s.total for s in ok]), "rtf": percentiles([s.rtf for s in ok if s.rtf]),
            "playback_gap_s": percentiles([s.gap for s in ok]), "streams_with_gap": sum(s.gap > 0 for s in ok),
            **({} if not any(s.segment_first_audio is not None for s in ok) else {
                "segment_first_audio_s": percentiles([x for s in ok for x in s.segment_first_audio]),
                "gap_within_segments_s": percentiles([s.gap_within for s in ok]),
                "gap_between_segments_s": percentiles([s.gap_between for s in ok])})}


def markdown(result: dict, header: bool = True) -> str:
    def ms(p, k):
        return "-" if p[k] is None else f"{1000 * p[k]:.0f}"

    lines = [f"# Load sweep: {result['tag']} ({result['mode']} voice)\n", f"Command: `{result['command']}`  ",
             f"Server: {result['url']}, client machine: {result['machine']}\n"] if header else \
            [f"## {result['policy']} routing\n"]
    lines += ["| concurrency | requests | errors | TTFA p50/p90/p99 ms | 2nd chunk p50/p90 ms | total p50/p99 ms "
              "| RTF p50 | playback gap p50/p90 ms (streams with a gap) | audio-s/s | req/s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for lv in result["levels"]:
        t, s2, tot, r, g = lv["ttfa_s"], lv["second_chunk_s"], lv["total_s"], lv["rtf"], lv["playback_gap_s"]
        rtf = "-" if r["p50"] is None else f"{r['p50']:.2f}"
        lines.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {ms(t, 'p50')}/{ms(t, 'p90')}/"
                     f"{ms(t, 'p99')} | {ms(s2, 'p50')}/{ms(s2, 'p90')} | {ms(tot, 'p50')}/{ms(tot, 'p99')} | {rtf} | "
                     f"{ms(g, 'p50')}/{ms(g, 'p90')} ({lv['streams_with_gap']}) | "
                     f"{lv['audio_s_per_s']:.2f} | {lv['requests_per_s']:.2f} |")
    if "segment_first_audio_s" in result["levels"][0]:
        lines += ["", "| concurrency | segment: last word -> first audio p50/p90/p99 ms (segments) | gap within "
                  "segments p50/p90 ms | gap at segment changes p50/p90 ms |", "|---|---|---|---|"]
        for lv in result["levels"]:
            f, w, b = lv["segment_first_audio_s"], lv["gap_within_segments_s"], lv["gap_between_segments_s"]
            lines.append(f"| {lv['concurrency']} | {ms(f, 'p50')}/{ms(f, 'p90')}/{ms(f, 'p99')} ({f['n']}) | "
                         f"{ms(w, 'p50')}/{ms(w, 'p90')} | {ms(b, 'p50')}/{ms(b, 'p90')} |")
    base = result["levels"][0]["audio_s_per_s"]
    if base:
        lines.append("\nThroughput relative to the first level: " + ", ".join(
            f"c={lv['concurrency']}: {lv['audio_s_per_s'] / base:.2f}x" for lv in result["levels"]))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    c = [lv["concurrency"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("p50", "TTFA p50"), ("p90", "TTFA p90"), ("p99", "TTFA p99")):
        a.plot(c, [1000 * (lv["ttfa_s"][key] or np.nan) for lv in levels], marker="o", label=label)
    a.plot(c, [1000 * (lv["total_s"]["p50"] or np.nan) for lv in levels], marker="s", ls="--", label="total p50")
    a.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="latency")
    a.set_xticks(c, [str(x) for x in c])
    a.legend()
    b.plot(c, [lv["audio_s_per_s"] for lv in levels], marker="o", color="C3")
    b.set(xscale="log", xlabel="concurrency", ylabel="audio-seconds / second", title="throughput")
    b.set_xticks(c, [str(x) for x in c])
    fig.suptitle(f"{result['tag']} ({result['mode']} voice)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare_voices(url: str, voice_ids: list[str], admin_key: str | None, policy: str = "affinity") -> None:
    """Register the voices that are not there yet, through the client the sweep uses (a fleet client
    registers a voice on the replica its policy sends it to, which warms its prefix there)."""
    with TTSClient(url, admin_key=admin_key, policy=policy) as client:
        present = {v.get("voice_id") for v in client.list_voices()}
        for voice_id in voice_ids:
            if voice_id not in present:   # a recording of its own per id: no two ids share a cached prefix
                audio, rate, text = reference_voice(10_000 + zlib.crc32(voice_id.encode()) % 1_000_000)
                client.register_voice(voice_id, audio, rate, text)


def comparison_markdown(result: dict) -> str:
    lines = [f"# Fleet benchmark: {result['tag']} ({result['mode']} mode, {len(result['endpoints'])} replicas)\n",
             f"Command: `{result['command']}`  "] + ([f"Servers: `{result['note']}`  "] if result["note"] else []) + [
             f"Replicas: {', '.join(result['endpoints'])}; client machine: {result['machine']}\n",
             "| routing | concurrency | requests | errors | prefix-cache hit rate | served per replica "
             "| hits/misses per replica | TTFA p50 ms | audio-s/s |", "|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        for lv in run["levels"]:
            reps = lv["replicas"].values()
            rate = "-" if lv["prefix_hit_rate"] is None else f"{100 * lv['prefix_hit_rate']:.1f}%"
            hm = " / ".join(f"{r.get('prefix_hits', 0):.0f}/{r.get('prefix_misses', 0):.0f}" for r in reps)
            ttfa = lv["ttfa_s"]["p50"]
            lines.append(f"| {run['policy']} | {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {rate} | "
                         f"{' / '.join(str(r['served']) for r in reps)} | {hm} | "
                         f"{'-' if ttfa is None else f'{1000 * ttfa:.0f}'} | {lv['audio_s_per_s']:.2f} |")
    totals = []
    for run in result["runs"]:
        reps = [r for lv in run["levels"] for r in lv["replicas"].values()]
        hits, misses = sum(r.get("prefix_hits", 0) for r in reps), sum(r.get("prefix_misses", 0) for r in reps)
        if hits + misses:
            totals.append(f"{run['policy']} {100 * hits / (hits + misses):.1f}% ({hits:.0f} hits, {misses:.0f} misses)")
    if totals:
        lines.append("\nPrefix-cache hit rate over all levels (both replicas' /metrics, deltas over the measured "
                     "requests only): " + "; ".join(totals) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(markdown(run, header=False) for run in result["runs"])


def sweep(args, policy: str, levels: list[int], texts: list[str], command: str) -> dict:
    """One sweep over the concurrency levels with one routing policy."""
    endpoints = parse_endpoints(args.url)
    metrics_urls = parse_endpoints(args.metrics_url) if args.metrics_url else None
    if metrics_urls is not None and len(metrics_urls) != len(endpoints):
        raise SystemExit("--metrics-url: give one per --url endpoint, in the same order")
    args = argparse.Namespace(**vars(args), voice_ids=[f"loadgen-{args.tag}-{policy}-{n}" for n in range(args.voices)])
    if args.mode in ("shared", "session"):
        prepare_voices(args.url, [SHARED_VOICE], args.admin_key, policy)
    elif args.mode in ("voices", "dialogue"):
        prepare_voices(args.url, args.voice_ids, args.admin_key, policy)
    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "requests": args.warmup, "duration": None})
        asyncio.run(run_level(args.url, 1, texts, warm, offset=10**6, policy=policy))
    result = {"tag": args.tag, "mode": args.mode, "url": args.url, "policy": policy,
              "machine": f"{platform.machine()}, python {platform.python_version()}", "command": command,
              "levels": []}
    for n, c in enumerate(levels):
        before = triton_stats(args.url)
        prefix_before = [prefix_counts(u) for u in metrics_urls] if metrics_urls else None
        samples, wall, served = asyncio.run(run_level(args.url, c, texts, args, offset=100_000 * (n + 1),
                                                      policy=policy))
        level = summarize(samples, wall, c)
        level["triton_stats_delta"] = diff_stats(before, triton_stats(args.url))
        if len(endpoints) > 1 or metrics_urls:
            level["replicas"], level["prefix_hit_rate"] = replica_report(
                endpoints, served, prefix_before, [prefix_counts(u) for u in metrics_urls] if metrics_urls else None)
        level["samples"] = [asdict(s) for s in samples]
        result["levels"].append(level)
        print(f"{policy} c={c}: {level['requests']} requests, {level['errors']} errors, TTFA p50 "
              f"{level['ttfa_s']['p50']}, {level['audio_s_per_s']:.2f} audio-s/s"
              + (f", prefix hit rate {level['prefix_hit_rate']}" if level.get("prefix_hit_rate") is not None else ""),
              file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8001",
                    help="Triton gRPC address; several comma-separated: a fleet, routed by fish_s2.routing")
    ap.add_argument("--metrics-url", help="each --url endpoint's Triton metrics URL, comma-separated, same order: "
                                          "per-replica prefix-cache hits and misses")
    ap.add_argument("--routing", default="affinity",
                    help="routing policies to compare, comma-separated (affinity, least, round_robin)")
    ap.add_argument("--admin-key-file", help="the server's admin key, to register the voices of the shared and "
                                             "voices modes (default: $FISH_S2_ADMIN_KEY)")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (closed loop)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level instead of --requests")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests before the sweep")
    ap.add_argument("--mode", choices=("unique", "shared", "voices", "dialogue", "session"), default="shared")
    ap.add_argument("--words-per-s", type=float, default=15.0,
                    help="session mode: how fast the text is written (words per second)")
    ap.add_argument("--voices", type=int, default=4, help="mode voices: how many voices (default 4)")
    ap.add_argument("--max-frames", type=int, default=64)
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--tag", default="sweep")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--note", help="how the servers were set up (written under the command)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = read_corpus(args.corpus, voices=1)    # dialogue mode: untagged lines become its turns
    given = list(argv if argv is not None else sys.argv[1:])
    if "--note" in given:      # recorded on its own
        del given[given.index("--note"):given.index("--note") + 2]
    command = "python perf/loadgen.py " + " ".join(given)
    args.admin_key = Path(args.admin_key_file).read_text().strip() if args.admin_key_file else None
    runs = [sweep(args, policy, levels, texts, command) for policy in args.routing.split(",")]
    for run in runs:
        run["note"] = args.note
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"loadgen_{args.tag}_{args.mode}"
    if len(runs) == 1:
        result = runs[0]
        (out / f"{stem}.md").write_text(markdown(result))
        plot(result, out / f"{stem}.png")
    else:
        result = {k: runs[0][k] for k in ("tag", "mode", "url", "machine", "command", "note")} | {
            "endpoints": parse_endpoints(args.url), "runs": runs}
        (out / f"{stem}.md").write_text(comparison_markdown(result))
        for run in runs:
            plot(run, out / f"{stem}_{run['policy']}.png")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))

    def brief(run):
        return {k: v for k, v in run.items() if k != "levels"} | {
            "levels": [{k: v for k, v in lv.items() if k != "samples"} for lv in run["levels"]]}

    print(json.dumps(brief(result) if len(runs) == 1 else {**result, "runs": [brief(r) for r in runs]}))
    return result

if __name__ == "__main__":
    main()
