"""Streaming concurrency sweep of the `tts` ensemble with Triton's perf_analyzer.

Writes perf_analyzer's input-data JSON (texts from perf/corpus.txt with a registered voice or none),
runs `perf_analyzer --streaming` over the gRPC endpoint for each concurrency level, and turns its
profile export (per-request send and response timestamps) into first-response latency percentiles
(= time to first audio: the first response of a stream is its first audio chunk) and responses per
second. Prints JSON as its last line and writes JSON + markdown under --out.

    python perf/install_perf_analyzer.py
    python perf/perf_analyzer_sweep.py --url 127.0.0.1:8001 --concurrency 1,2,4,8 --voice loadgen-shared
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from corpus import CORPUS, read_corpus

HERE = Path(__file__).parent
PERF_ANALYZER = HERE / ".bin" / "perf_analyzer"


def input_data(texts: list[str], voice: str | None, max_frames: int, n: int) -> dict:
    """perf_analyzer --input-data: one entry per request, cycled through by perf_analyzer."""
    data = []
    for i in range(n):
        entry = {"TEXT": [texts[i % len(texts)]], "SEED": [i], "MAX_FRAMES": [max_frames]}
        if voice:
            entry["VOICE_ID"] = {"content": [voice], "shape": [1]}   # a voice list [-1]: its shape given
        data.append(entry)
    return {"data": data}


def first_response_latencies(export: dict) -> dict[int, dict]:
    """concurrency -> {"first_s": [...], "last_s": [...], "responses": n, "span_s": s} from a profile export."""
    out = {}
    for exp in export.get("experiments", []):
        level = int(exp["experiment"]["value"])
        first, last, n_resp, t_min, t_max = [], [], 0, None, None
        for req in exp.get("requests", []):
            ts = [t for t in req.get("response_timestamps", [])]
            if not ts:
                continue
            t0 = req["timestamp"]
            first.append((ts[0] - t0) / 1e9)
            last.append((ts[-1] - t0) / 1e9)
            n_resp += len(ts)
            t_min = t0 if t_min is None else min(t_min, t0)
            t_max = ts[-1] if t_max is None else max(t_max, ts[-1])
        out[level] = {"first_s": first, "last_s": last, "responses": n_resp,
                      "span_s": (t_max - t_min) / 1e9 if first else 0.0}
    return out


def pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "n": 0}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "n": len(values)}


def run(url: str, levels: list[int], texts: list[str], voice: str | None, max_frames: int, requests: int,
        binary: Path = PERF_ANALYZER, timeout_s: float = 1800) -> dict:
    if not binary.exists():
        raise SystemExit(f"{binary}: missing; run python perf/install_perf_analyzer.py")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.json"
        data.write_text(json.dumps(input_data(texts, voice, max_frames, max(64, requests))))
        results = {}
        for level in levels:  # one run (and export file: it is never overwritten) per level
            export = Path(tmp) / f"export_c{level}.json"
            cmd_l = [str(binary), "-m", "tts", "-u", url, "-i", "grpc", "--streaming", "--input-data", str(data),
                     "--concurrency-range", f"{level}:{level}:1", "--measurement-mode", "count_windows",
                     "--measurement-request-count", str(requests), "--max-trials", "3",
                     "--stability-percentage", "999", "--profile-export-file", str(export)]
            proc = subprocess.run(cmd_l, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                raise SystemExit(f"perf_analyzer failed at concurrency {level}:\n{proc.stdout[-2000:]}\n"
                                 f"{proc.stderr[-2000:]}")
            lat = first_response_latencies(json.loads(export.read_text()))[level]
            results[level] = {"concurrency": level, "requests": len(lat["first_s"]),
                              "first_response_s": pct(lat["first_s"]), "last_response_s": pct(lat["last_s"]),
                              "responses_per_s": lat["responses"] / lat["span_s"] if lat["span_s"] else None,
                              "command": " ".join(cmd_l)}
    return {"url": url, "voice": voice, "max_frames": max_frames, "levels": list(results.values())}


def markdown(result: dict) -> str:
    lines = [f"# perf_analyzer streaming sweep (`tts`, voice {result['voice'] or 'none'})\n",
             f"Command: `{result['command']}`\n",
             "| concurrency | requests | first response p50/p90/p99 ms | last response p50 ms | responses/s |",
             "|---|---|---|---|---|"]
    for lv in result["levels"]:
        f, last = lv["first_response_s"], lv["last_response_s"]
        lines.append(f"| {lv['concurrency']} | {lv['requests']} | {1e3 * f['p50']:.0f}/{1e3 * f['p90']:.0f}/"
                     f"{1e3 * f['p99']:.0f} | {1e3 * last['p50']:.0f} | {lv['responses_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=16, help="requests measured per level")
    ap.add_argument("--voice", default=None, help="registered voice id (default: no reference voice)")
    ap.add_argument("--max-frames", type=int, default=64)
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--tag", default="sweep")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    texts = read_corpus(args.corpus)
    result = run(args.url, [int(c) for c in args.concurrency.split(",")], texts, args.voice, args.max_frames,
                 args.requests)
    result["command"] = "python perf/perf_analyzer_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"perf_analyzer_{args.tag}.json").write_text(json.dumps(result, indent=1))
    (out / f"perf_analyzer_{args.tag}.md").write_text(markdown(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
