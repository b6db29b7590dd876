"""Soak test of a Triton deployment: N concurrent streams for a given time, every output checked
against its solo run, errors and memory reported.

A fixed set of requests (corpus text, seed, frame limit) is first synthesized one at a time (the
solo runs); then N workers stream them round robin, concurrently, for --minutes. Each result must
equal its solo run (same number of samples, every sample within 1e-5: identical codes decode to
identical audio, and one differing code changes the audio far more than that). Reports errors,
mismatches, requests, audio-seconds, and the resident memory (RSS) of the server and of every
backend process after the warm-up and at the end. Exit status 1 on any error or mismatch, or when
the total RSS grew by more than --max-growth.

    python perf/soak.py [--url HOST:PORT] [--streams 16] [--minutes 10] [--max-frames 48]

Without --url it prepares and starts the CPU deployment (tiny checkpoint) itself, on free ports,
and checks that the server stops cleanly at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from fish_s2.client import AsyncTTSClient, TTSClient
from fish_s2.request import RequestError
from fish_s2.serving.server import process_tree

from corpus import read_corpus

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-5


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory(root: int) -> dict[str, int]:
    return {f"{pid} {name}": rss_bytes(pid) for pid, name in sorted(process_tree(root).items())}


def jobs(n: int, max_frames: int) -> list[dict]:
    texts = read_corpus()
    return [{"text": texts[i % len(texts)], "seed": 1000 + i, "max_frames": max_frames} for i in range(n)]


async def soak(url: str, streams: int, seconds: float, work: list[dict], solo: list[np.ndarray]) -> dict:
    stats = {"requests": 0, "errors": 0, "mismatches": 0, "audio_seconds": 0.0, "error_messages": []}
    deadline = time.monotonic() + seconds
    counter = iter(range(10 ** 9))

    async def worker(client: AsyncTTSClient) -> None:
        while time.monotonic() < deadline:
            i = next(counter) % len(work)
            try:
                result = await client.synthesize(work[i]["text"], seed=work[i]["seed"],
                                                 max_frames=work[i]["max_frames"])
            except RequestError as e:
                stats["errors"] += 1
                stats["error_messages"] = (stats["error_messages"] + [str(e)])[:10]
                continue
            stats["requests"] += 1
            stats["audio_seconds"] += result.duration
            want = solo[i]
            if result.audio.shape != want.shape or np.abs(result.audio - want).max(initial=0.0) > TOLERANCE:
                stats["mismatches"] += 1

    async with AsyncTTSClient(url, timeout_s=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(streams)))
    return stats


def run(url: str, server_pid: int | None, args) -> dict:
    work = jobs(args.distinct, args.max_frames)
    with TTSClient(url, timeout_s=300) as client:
        solo = [client.synthesize(j["text"], seed=j["seed"], max_frames=j["max_frames"]).audio for j in work]
    asyncio.run(soak(url, args.streams, min(30.0, args.minutes * 60 / 10), work, solo))   # warm-up, not counted
    start_mem = memory(server_pid) if server_pid else {}
    t0 = time.monotonic()
    stats = asyncio.run(soak(url, args.streams, args.minutes * 60, work, solo))
    elapsed = time.monotonic() - t0
    end_mem = memory(server_pid) if server_pid else {}
    start_total, end_total = sum(start_mem.values()), sum(end_mem.values())
    growth = (end_total - start_total) / start_total if start_total else 0.0
    return {**stats, "seconds": elapsed, "streams": args.streams, "distinct_requests": len(work),
            "audio_s_per_s": stats["audio_seconds"] / elapsed, "rss_start_bytes": start_mem, "rss_end_bytes": end_mem,
            "rss_total_start": start_total, "rss_total_end": end_total, "rss_growth": growth}


def markdown(r: dict) -> str:
    lines = [f"# Soak ({r['machine']})\n", f"Command: `{r['command']}`\n",
             f"{r['streams']} concurrent streams for {r['seconds'] / 60:.1f} min over {r['distinct_requests']} distinct "
             f"requests: **{r['requests']} requests, {r['errors']} errors, {r['mismatches']} mismatches** against the "
             f"solo runs (audio within {TOLERANCE:g}); {r['audio_s_per_s']:.2f} audio-s/s. Clean stop: "
             f"{r.get('clean_stop', 'not checked (external server)')}.\n",
             f"Resident memory, server and backend processes: {r['rss_total_start'] / 2**20:.0f} MiB after warm-up, "
             f"{r['rss_total_end'] / 2**20:.0f} MiB at the end ({100 * r['rss_growth']:+.2f}%).\n",
             "| process | start MiB | end MiB |", "|---|---|---|"]
    for name, start in r["rss_start_bytes"].items():
        end = r["rss_end_bytes"].get(name, 0)
        lines.append(f"| {name} | {start / 2**20:.1f} | {end / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server's gRPC address (default: start the CPU deployment)")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--max-frames", type=int, default=48)
    ap.add_argument("--distinct", type=int, default=24, help="distinct requests (each checked against its solo run)")
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="cpu-tiny")
    args = ap.parse_args(argv)
    result = {"command": "python perf/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    with contextlib.ExitStack() as stack:
        server = None
        if args.url is None:
            from fish_s2.serving.demo import prepare
            from fish_s2.serving.server import TritonServer, free_ports

            repo = prepare(Path(args.artifacts), None)
            server = stack.enter_context(TritonServer(repo, Path(args.artifacts) / "triton-soak", *free_ports(3)))
        result.update(run(args.url or server.grpc_url, server.pid if server else None, args))
        if server is not None:
            code = server.stop()
            log = server.log_path.read_text(errors="replace")
            result["clean_stop"] = code == 0 and "Exit timeout expired" not in log
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"soak_{args.tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"soak_{args.tag}.md").write_text(markdown(result))
    print(markdown(result))
    ok = not result["errors"] and not result["mismatches"] and result["rss_growth"] <= args.max_growth \
        and result.get("clean_stop", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
