"""Load generator for the Triton `tts` ensemble: a concurrency sweep of streaming requests.

For each concurrency level, `c` workers keep one request each in flight (closed loop) for a fixed
number of requests or a duration, after an untimed warm-up. Per level it reports time to first
audio, time to the second chunk and total latency (p50/p90/p99), per-request real-time factor,
aggregate audio-seconds per second, requests per second and errors, the playback gap (how long a
real-time player that starts at the first chunk waits for late chunks, per stream) and the change
of Triton's own inference statistics over the level. Two prompt modes:

  unique  every request brings its own reference voice (audio + text), so no prefix is reused
          (the fair mode against prefix caching: each request pays reference encoding + prefill);
  shared  every request uses one voice registered up front (its KV prefix is cached).

Writes JSON, a markdown table and a PNG plot under --out, and prints the JSON as its last line.

    python perf/loadgen.py --url 127.0.0.1:8001 --concurrency 1,2,4,8 --requests 16 --mode shared
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fish_s2.client import AsyncTTSClient, TTSClient
from fish_s2.request import Player, RequestError

CORPUS = Path(__file__).with_name("corpus.txt")
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


def request_fields(mode: str, i: int, args) -> dict:
    fields = {"seed": i, "max_frames": args.max_frames}
    if mode == "shared":
        fields["voice_id"] = SHARED_VOICE
    else:
        audio, rate, text = reference_voice(i)
        fields.update(reference_audio=audio, reference_sample_rate=rate, reference_text=text)
    return fields


async def run_level(url: str, concurrency: int, texts: list[str], args, offset: int) -> tuple[list[Sample], float]:
    """Closed loop: `concurrency` workers, until --requests requests or --duration seconds are done."""
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

    async with AsyncTTSClient(url) as client:
        async def worker():
            while (i := take()) is not None:
                k = offset + i
                samples.append(await one_request(client, texts[k % len(texts)], request_fields(args.mode, k, args)))

        t = time.perf_counter()
        deadline = t + (args.duration or 0)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, time.perf_counter() - t


def triton_stats(url: str) -> dict[str, dict]:
    """Per-model cumulative counters of Triton's inference statistics."""
    import tritonclient.grpc as grpcclient

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
            "playback_gap_s": percentiles([s.gap for s in ok]), "streams_with_gap": sum(s.gap > 0 for s in ok)}


def markdown(result: dict) -> str:
    def ms(p, k):
        return "-" if p[k] is None else f"{1000 * p[k]:.0f}"

    lines = [f"# Load sweep: {result['tag']} ({result['mode']} voice)\n", f"Command: `{result['command']}`  ",
             f"Server: {result['url']}, client machine: {result['machine']}\n",
             "| concurrency | requests | errors | TTFA p50/p90/p99 ms | 2nd chunk p50/p90 ms | total p50/p99 ms "
             "| RTF p50 | playback gap p50/p90 ms (streams with a gap) | audio-s/s | req/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for lv in result["levels"]:
        t, s2, tot, r, g = lv["ttfa_s"], lv["second_chunk_s"], lv["total_s"], lv["rtf"], lv["playback_gap_s"]
        rtf = "-" if r["p50"] is None else f"{r['p50']:.2f}"
        lines.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {ms(t, 'p50')}/{ms(t, 'p90')}/"
                     f"{ms(t, 'p99')} | {ms(s2, 'p50')}/{ms(s2, 'p90')} | {ms(tot, 'p50')}/{ms(tot, 'p99')} | {rtf} | "
                     f"{ms(g, 'p50')}/{ms(g, 'p90')} ({lv['streams_with_gap']}) | "
                     f"{lv['audio_s_per_s']:.2f} | {lv['requests_per_s']:.2f} |")
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


def prepare_shared_voice(url: str, admin_key: str | None) -> None:
    audio, rate, text = reference_voice(10_000)
    with TTSClient(url, admin_key=admin_key) as client:
        if not any(v.get("voice_id") == SHARED_VOICE for v in client.list_voices()):
            client.register_voice(SHARED_VOICE, audio, rate, text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    ap.add_argument("--admin-key-file", help="the server's admin key, to register the shared voice "
                                             "(default: $FISH_S2_ADMIN_KEY)")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (closed loop)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level instead of --requests")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests before the sweep")
    ap.add_argument("--mode", choices=("unique", "shared"), default="shared")
    ap.add_argument("--max-frames", type=int, default=64)
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--tag", default="sweep")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = [t for t in Path(args.corpus).read_text().splitlines() if t.strip()]
    if args.mode == "shared":
        key = Path(args.admin_key_file).read_text().strip() if args.admin_key_file else None
        prepare_shared_voice(args.url, key)
    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "requests": args.warmup, "duration": None})
        asyncio.run(run_level(args.url, 1, texts, warm, offset=10**6))
    result = {"tag": args.tag, "mode": args.mode, "url": args.url,
              "machine": f"{platform.machine()}, python {platform.python_version()}",
              "command": "python perf/loadgen.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "levels": []}
    for n, c in enumerate(levels):
        before = triton_stats(args.url)
        samples, wall = asyncio.run(run_level(args.url, c, texts, args, offset=100_000 * (n + 1)))
        level = summarize(samples, wall, c)
        level["triton_stats_delta"] = diff_stats(before, triton_stats(args.url))
        level["samples"] = [asdict(s) for s in samples]
        result["levels"].append(level)
        print(f"c={c}: {level['requests']} requests, {level['errors']} errors, TTFA p50 "
              f"{level['ttfa_s']['p50']}, {level['audio_s_per_s']:.2f} audio-s/s", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"loadgen_{args.tag}_{args.mode}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    plot(result, out / f"{stem}.png")
    print(json.dumps({k: v for k, v in result.items() if k != "levels"} |
                     {"levels": [{k: v for k, v in lv.items() if k != "samples"} for lv in result["levels"]]}))
    return result


if __name__ == "__main__":
    main()
