"""Do perf_analyzer and our load generator agree? Time to first audio at the same concurrency level.

Starts the CPU deployment (tiny checkpoint unless --checkpoint; the same repository `make serve`
uses), registers the load generator's shared voice, measures time to first audio with
perf/loadgen.py and perf_analyzer (first response of the stream) at the same level, prints both
p50s and their ratio, writes perf/results/perf_analyzer_vs_loadgen.json and exits 1 if the two
p50s differ by more than --margin (default 25%).

    python perf/compare_perf_analyzer.py [--level 1] [--requests 16] [--url HOST:PORT (use a running server)]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
import perf_analyzer_sweep  # noqa: E402
from install_perf_analyzer import install  # noqa: E402


def compare(url: str, level: int, requests: int, max_frames: int, margin: float, admin_key_file: str | None) -> dict:
    binary = perf_analyzer_sweep.PERF_ANALYZER
    if not binary.exists():
        install(binary.parent)
    lg = loadgen.main(["--url", url, "--concurrency", str(level), "--requests", str(requests), "--warmup", "2",
                       "--mode", "shared", "--max-frames", str(max_frames), "--tag", "compare",
                       *(["--admin-key-file", admin_key_file] if admin_key_file else []),
                       "--out", str(HERE / "results")])
    texts = loadgen.read_corpus()
    pa = perf_analyzer_sweep.run(url, [level], texts, loadgen.SHARED_VOICE, max_frames, requests)
    lg_p50 = lg["levels"][0]["ttfa_s"]["p50"]
    pa_p50 = pa["levels"][0]["first_response_s"]["p50"]
    ratio = pa_p50 / lg_p50
    return {"level": level, "max_frames": max_frames, "loadgen_ttfa_p50_s": lg_p50,
            "perf_analyzer_first_response_p50_s": pa_p50, "ratio": ratio, "margin": margin,
            "agree": abs(ratio - 1) <= margin, "perf_analyzer": pa["levels"][0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server's gRPC address (default: start the CPU deployment)")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-frames", type=int, default=64)
    ap.add_argument("--margin", type=float, default=0.25)
    ap.add_argument("--out", default=str(HERE / "results" / "perf_analyzer_vs_loadgen.json"))
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url, key_file = args.url, None
        if url is None:
            from fish_s2.serving.demo import prepare
            from fish_s2.serving.server import TritonServer, free_ports

            repo = prepare(Path(args.artifacts), Path(args.checkpoint) if args.checkpoint else None)
            server = stack.enter_context(TritonServer(repo, Path(args.artifacts) / "triton-compare", *free_ports(3)))
            url, key_file = server.grpc_url, str(server.admin_key_path)
        result = compare(url, args.level, args.requests, args.max_frames, args.margin, key_file)
    result["command"] = "python perf/compare_perf_analyzer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"concurrency {result['level']}: loadgen TTFA p50 {1e3 * result['loadgen_ttfa_p50_s']:.0f} ms, "
          f"perf_analyzer first response p50 {1e3 * result['perf_analyzer_first_response_p50_s']:.0f} ms, "
          f"ratio {result['ratio']:.2f} ({'within' if result['agree'] else 'OUTSIDE'} {args.margin:.0%})")
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
