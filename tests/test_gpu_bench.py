"""perf/gpu_bench.py runs every section on the CPU with --dry-run (tiny geometry, compile included):
shapes and bookkeeping, no speed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "perf" / "gpu_bench.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu (dry run)" and result["git_commit"] and result["torch"]
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    for row in result["decode"] + result["kv"]:   # eager and compiled side by side, at the KV each reads
        for mode in ("eager", "compiled"):
            assert row[mode]["step_ms"] > 0 and 0 < row[mode]["fraction_of_copy_bw"] and row[mode]["bytes_per_step"] > 0
        assert row["eager"]["kv_read"] == row["kv_len"] and row["compiled"]["kv_read"] == 256   # the bucket
    assert [row["kv_len"] for row in result["kv"]] == [63 + 4, 95 + 4]   # moved on, then warm-up + timed steps
    assert result["decode"][1]["compiled"]["build_s"] > 0                  # the compile of the bucket, timed
    for mode in ("eager", "compiled"):
        for row in result["profile"][mode]:
            assert row["kernels_per_step"] > 0 and 0 < row["matmul_share"] < 1 and row["top_kernels"]
    for mode in ("eager", "compiled"):   # prompt to first frame, in chunks of the admission budget (32)
        assert [row["tokens"] for row in result["prefill"][mode]] == [20, 40]
        assert all(row["ms"] > 0 and row["tokens_per_s"] > 0 for row in result["prefill"][mode])
    assert "('prefill', 32, 256)" in result["build_s"] and "('prefill', 16, 256)" in result["build_s"]
    check = result["self_check"]
    assert check["ok"] and check["overlap_same_streams"] and check["prefill_kv_rel_err"] < 1e-4
    codec = result["codec"]   # the chunk decoder: one compiled bucket, batch 2 x the first chunk's 4 frames
    assert codec["compile"] and codec["buckets"] == 1 and codec["build_s"] > 0 and codec["lengths"] == [4]
    assert [(r["batch"], r["frames"]) for r in codec["decode"]] == [(1, 4), (2, 50)]
    assert all(r["eager_ms"] > 0 and r["decoder_ms"] > 0 and r["decoder_rel_err"] < 1e-4 for r in codec["decode"])
    assert codec["chunks"]["bucketed"] > 0 and codec["chunks"]["eager"] > 0   # first chunks bucketed, others eager
    ttfa = result["ttfa"]
    assert ttfa["ttfa_s"]["n"] == 2 and ttfa["ttfa_s"]["p50"] > 0 and ttfa["playback_gap_s"]["n"] == 2
    assert ttfa["prefix_cache"]["hits"] >= 3   # time to first audio is measured on a cached voice
    (load,) = result["load"]
    assert load["frames"] > 0 and load["audio_s_per_s_decoded"] > 0 and 0 < load["codec_gpu_share"]
    assert load["requests_ended_by_themselves"] + load["requests_cancelled"] == sum(load["end_reasons"].values())
    assert load["requests_cancelled"] >= 1   # the ones still running when the window closes
    assert result["memory"]["kv_cache_bytes"] > 0 and result["build_s"]
    assert json.loads((tmp_path / "gpu_bench_cpu_dry_run.json").read_text())["device"] == "cpu (dry run)"
