"""perf/gpu_bench.py runs end to end on the CPU with --dry-run (tiny geometry): shapes and bookkeeping."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "perf" / "gpu_bench.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu (dry run)"
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    for row in result["decode"]:
        e = row["eager"]
        assert e["step_ms"] > 0 and 0 < e["slow_ms"] < e["step_ms"] and row["bytes_per_step"] > 0
        assert 0 < e["fraction_of_copy_bw"]
    assert result["ttfa"]["prefix_cache"]["hits"] >= 5  # time to first audio is measured on a cached voice
    assert result["throughput"]["frames"] > 0
    assert json.loads((tmp_path / "gpu_bench_cpu_dry_run.json").read_text())["device"] == "cpu (dry run)"
