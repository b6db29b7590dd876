"""build/selfcheck.py on the CPU: the dry run (arguments, CPU export of a tiny checkpoint, the expected
TensorRT-LLM signature table, the JSON), a failing check's exit status, and the comparison the GPU run
applies to each TensorRT-LLM request, fed here by the CPU stand-in of the executor."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fish_s2.sampling import seed_to_key
from fish_s2.trtllm.api_contract import EXPECTED
from fish_s2.trtllm.model import CODES_OUTPUT, HIDDEN_OUTPUT, request_inputs
from trtllm_fakes import SAMPLE_PARAMS, FakeExecutor, fake_sampling_params, sample_prompts

REPO = Path(__file__).resolve().parents[1]
SELFCHECK = REPO / "build" / "selfcheck.py"
sys.path.insert(0, str(SELFCHECK.parent))
import selfcheck  # noqa: E402


def _run(*args, timeout=150):
    t = time.monotonic()
    done = subprocess.run([sys.executable, str(SELFCHECK), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)
    return done, time.monotonic() - t


def test_dry_run_walks_every_cpu_step(tiny_checkpoint, tmp_path):
    done, seconds = _run("--dry-run", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # one JSON object, nothing else on stdout
    assert report["ok"] and report["dry_run"] and seconds < 90
    checks = report["checks"]
    assert list(checks) == list(selfcheck.CHECKS)
    assert checks["export"]["status"] == "passed" and checks["export"]["target"] == "cpu"
    assert {"onnx/codec_decoder.onnx", "trtllm/config.json"} <= set(checks["export"]["artifacts"])
    assert all(checks[c]["status"] == "skipped (dry run)" for c in selfcheck.CHECKS if c != "export")
    table = checks["api"]["expected"]
    assert len(table) == len(EXPECTED) and any("cache_salt" in row["params"] for row in table)
    assert report["tolerances"]["hidden_rel_l2"] == selfcheck.TOLERANCES["hidden_rel_l2"]


def test_a_failing_check_fails_the_run(tiny_checkpoint, tmp_path):
    done, _ = _run("--only", "codec_plan", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path))
    report = json.loads(done.stdout)
    assert done.returncode == 1 and not report["ok"]
    assert report["checks"]["codec_plan"]["status"] == "failed" and report["checks"]["codec_plan"]["error"]


def test_bad_arguments():
    done, _ = _run("--only", "everything")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def _llm_output(tiny, prompt, params, max_tokens=8):
    """One request through the executor stand-in, returned as selfcheck.unpack returns an LLM output."""
    ex = FakeExecutor(tiny.model, max_batch=2)
    r = ex.add(request_inputs(prompt, params, seed_to_key(params.seed)), fake_sampling_params(
        max_tokens=max_tokens, end_id=tiny.config.eos_id, top_k=1, additional_model_outputs=[CODES_OUTPUT, HIDDEN_OUTPUT]))
    ex.run()
    return {"tokens": r.tokens, "codes": torch.stack(r.outputs[CODES_OUTPUT]),
            "hidden": torch.stack(r.outputs[HIDDEN_OUTPUT]), "finish_reason": r.finish_reason}


def test_the_parity_comparison_accepts_the_model_and_catches_a_wrong_frame(tiny):
    prompt, params = sample_prompts(tiny)[0], SAMPLE_PARAMS[0]
    out = _llm_output(tiny, prompt, params)
    row = selfcheck.compare(tiny, (prompt, params), out, exact=True)
    assert row["aligned"] and row["replay_equal"] and row["hidden_rel_l2"] < 1e-4
    assert row["free_running_frames_equal"] == f"{len(out['tokens'])}/{len(out['tokens'])}"
    assert selfcheck.identical(out, out)

    bad = {**out, "codes": out["codes"].clone()}
    bad["codes"][2, 0, 0] += 1               # code 0 no longer the main token's index, and not the model's frame
    row = selfcheck.compare(tiny, (prompt, params), bad, exact=True)
    assert not row["aligned"] and row["replay_equal"] is False and not selfcheck.identical(out, bad)

    bad = {**out, "hidden": out["hidden"] * 1.1}
    assert selfcheck.compare(tiny, (prompt, params), bad, exact=False)["hidden_rel_l2"] > selfcheck.TOLERANCES["hidden_rel_l2"]


def test_requests_pair_two_voices_with_equal_token_ids(tiny):
    reqs = selfcheck.requests(tiny)
    a, b = reqs["voice_a_1"][0], reqs["voice_b_same_ids"][0]
    assert torch.equal(a[0], b[0]) and not torch.equal(a, b)       # same token ids, other residual codes
    assert torch.equal(reqs["voice_a_2"][0][:, :100], a[:, :100])  # the same voice prefix


@pytest.mark.parametrize("graphs", [True, False])
def test_selfcheck_settings_load(tmp_path, graphs):
    from fish_s2.engine import EngineConfig
    from fish_s2.trtllm.settings import load_trtllm_settings

    s = load_trtllm_settings(selfcheck.write_settings(tmp_path / "s.yaml", cuda_graphs=graphs))
    engine = EngineConfig(**selfcheck.ENGINE)
    kw = s.validate(engine).llm_kwargs(engine, selfcheck.KV_BUDGET)
    assert kw["max_batch_size"] == 8 and (s.cuda_graph is not None) == graphs
