"""Fleet benchmark on one machine: two CPU replicas sharing one voices folder, then perf/loadgen.py
across both, once per routing policy.

    python perf/fleet_bench.py [--artifacts artifacts/fleet] [--checkpoint DIR] [--set KEY=VALUE ...] \\
        -- --mode voices --voices 4 --routing affinity,round_robin --concurrency 1,4 --requests 32 --tag fleet

Prepares the CPU profile like ``make serve`` (``fish_s2.serving.demo.prepare``: the tiny checkpoint
unless --checkpoint, its export, the model repository with its voices folder; ``--set`` overrides
serving.yaml, e.g. ``engine.prefix_cache_bytes``), empties its voices folder (a server warms every
voice already registered on both replicas when it starts, which would hide what routing does), starts
two Triton servers on free ports from that one repository with one admin key (loadgen registers the
voices through either), runs loadgen with ``--url A,B --metrics-url ... --admin-key-file ...`` plus the
arguments after ``--``, and stops both through their drain.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fish_s2.serving.config import FILE_NAME, ServingConfig
from fish_s2.serving.demo import prepare
from fish_s2.serving.repository import _parse_overrides
from fish_s2.serving.server import TritonServer, free_ports

sys.path.insert(0, str(Path(__file__).parent))
import loadgen  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", default="artifacts/fleet")
    ap.add_argument("--checkpoint")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(ours)
    artifacts = Path(args.artifacts)
    repo = prepare(artifacts, Path(args.checkpoint) if args.checkpoint else None, _parse_overrides(args.set))
    shutil.rmtree(ServingConfig.load(repo / FILE_NAME).voices_dir, ignore_errors=True)
    first = TritonServer(repo, artifacts / "run-a", *free_ports(3))
    servers = [first, TritonServer(repo, artifacts / "run-b", *free_ports(3), admin_key=first.admin_key)]
    try:
        for server in servers:
            server.start()
        note = "python perf/fleet_bench.py " + " ".join(ours + ["--"] + rest)
        return loadgen.main(rest + ["--url", ",".join(s.grpc_url for s in servers),
                                    "--metrics-url", ",".join(s.metrics_url for s in servers),
                                    "--admin-key-file", str(first.admin_key_path), "--note", note])
    finally:
        for server in servers:
            if server.alive():
                server.drain(grace_s=60)
                server.stop()


if __name__ == "__main__":
    main()
