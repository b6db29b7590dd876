"""perf/gpu_bench.py runs every section on the CPU with --dry-run (tiny geometry, compile included):
shapes and bookkeeping, no speed."""

import json
import subprocess
import sys
import time
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
    assert {"('prefill', 32, 256)", "('prefill', 16, 256)"} <= set(result["build_s"]["compiled"])
    assert result["compiled"] == "ran"
    codec = result["codec"]   # the chunk decoder: one compiled bucket, batch 2 x the first chunk's 4 frames
    assert codec["compile"] and codec["buckets"] == 1 and codec["build_s"] > 0 and codec["lengths"] == [4]
    assert [(r["batch"], r["frames"]) for r in codec["decode"]] == [(1, 4), (2, 50)]
    assert all(r["eager_ms"] > 0 and r["decoder_ms"] > 0 and r["decoder_rel_err"] < 1e-4 for r in codec["decode"])
    assert codec["chunks"]["bucketed"] > 0 and codec["chunks"]["eager"] > 0   # first chunks bucketed, others eager
    for mode in ("eager", "compiled"):   # each engine serves: self check, TTFA, load with the codec
        check = result["self_check"][mode]
        assert check["ok"] and check["overlap_same_streams"] and check["prefill_kv_rel_err"] < 1e-4
        ttfa = result["ttfa"][mode]
        assert ttfa["ttfa_s"]["n"] == 2 and ttfa["ttfa_s"]["p50"] > 0 and ttfa["playback_gap_s"]["n"] == 2
        assert ttfa["prefix_cache"]["hits"] >= 3   # time to first audio is measured on a cached voice
        (load,) = result["load"][mode]
        assert load["frames"] > 0 and load["audio_s_per_s_decoded"] > 0 and 0 < load["codec_gpu_share"]
        assert load["requests_ended_by_themselves"] + load["requests_cancelled"] == sum(load["end_reasons"].values())
        assert load["requests_cancelled"] >= 1   # the ones still running when the window closes
    assert result["memory"]["kv_cache_bytes"] > 0
    assert json.loads((tmp_path / "gpu_bench_cpu_dry_run.json").read_text())["device"] == "cpu (dry run)"
    assert "errors" not in result and "interrupted" not in result
    assert list(result["section_s"]) == [   # the graph (eager) engine first, the compiled one after it
        "decode", "kv", "profile", "prefill", "codec", "self_check (eager)", "warm-up (eager)", "ttfa (eager)",
        "load 2 (eager)", "decode (compiled)", "profile (compiled)", "prefill (compiled)", "self_check (compiled)",
        "warm-up (compiled)", "ttfa (compiled)", "load 2 (compiled)", "kv (compiled)"]
    assert result["serving_warmup"]["compiled"]["new_buckets"] == 0   # no graphs on the CPU: buckets build on use


# The one GPU run this project may get is bounded by `timeout`: what it measured must survive a broken
# section or the timeout's SIGTERM.
SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {perf!r})
from gpu_bench import Report
import signal
result = {{"device": "test"}}
report = Report(result, Path({path!r}))
signal.signal(signal.SIGTERM, report.on_sigterm)
result["a"] = report.section("a", lambda: 1)
result["b"] = report.section("b", lambda: 1 / 0, fallback="fell back")
result["c"] = report.section("c", lambda: 3)
print("ready", flush=True)
report.section("d", lambda: time.sleep(60))
"""


def test_report_keeps_what_was_measured_past_an_error_and_sigterm(tmp_path):
    import signal

    path = tmp_path / "gpu_bench_test.json"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(perf=str(REPO / "perf"), path=str(path))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)   # inside section d
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 124
    finally:
        proc.kill()
    result = json.loads(path.read_text())
    assert result["a"] == 1 and result["b"] == "fell back" and result["c"] == 3
    assert list(result["errors"]) == ["b"] and "ZeroDivisionError" in result["errors"]["b"]["error"]
    assert "in <lambda>" in result["errors"]["b"]["traceback"]   # where it broke
    assert result["interrupted"]["section"] == "d" and result["interrupted"]["signal"] == "SIGTERM"
    assert set(result["section_s"]) == {"a", "b", "c"} and result["total_s"] > 0.5
    assert not path.with_suffix(".tmp").exists()


def test_a_failing_compiled_step_leaves_the_rest_on_the_graphs(tmp_path, monkeypatch):
    """Stands in for torch.compile failing on the device: the failure is recorded, the compiled sections
    are left out, and what the graph engine measured (eager on the CPU) is all there."""
    sys.path.insert(0, str(REPO / "perf"))
    import gpu_bench

    real = gpu_bench.decode_rows

    def decode_rows(engine, mode, *args, **kwargs):
        if mode == "compiled":
            raise RuntimeError("inductor: stand-in failure")
        return real(engine, mode, *args, **kwargs)

    monkeypatch.setattr(gpu_bench, "decode_rows", decode_rows)
    result = gpu_bench.main(["--dry-run", "--out", str(tmp_path)])
    assert list(result["errors"]) == ["decode (compiled)"] and "stand-in" in result["errors"]["decode (compiled)"]["error"]
    assert result["compiled"].startswith("failed")
    for section in ("profile", "prefill", "self_check", "ttfa", "load"):
        assert list(result[section]) == ["eager"], section
    assert result["self_check"]["eager"]["ok"] and result["load"]["eager"][0]["frames"] > 0
    assert all("compiled" not in row for row in result["kv"] + result["decode"])
    assert json.loads((tmp_path / "gpu_bench_cpu_dry_run.json").read_text())["errors"] == result["errors"]
