"""The package reproduces upstream fish-speech on the golden set (python -m fish_s2.parity)."""

import json
import subprocess
import sys


def test_parity_cli_passes_on_golden_set(golden_dir):
    """Also with the engine's compiled decode step (--compiled): every generation case, frames exact."""
    proc = subprocess.run([sys.executable, "-m", "fish_s2.parity", str(golden_dir), "--compiled"],
                          capture_output=True, text=True, timeout=1200)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0, result.get("failed") or result
    assert result["ok"] and not result["failed"]
    # every kind of case in the set was checked
    for prefix in ("slow_ar_forward.", "slow_ar_forward_bf16.", "fast_ar.", "generate_greedy.", "generate_multibatch.",
                   "generate_sampled.", "sampling.", "sampling_large.", "codec_decode.", "codec_encode."):
        assert any(k.startswith(prefix) for k in result["checks"]), prefix
    for case in ("generate_greedy.b0.", "generate_multibatch.b1.", "generate_sampled."):
        assert {"frames", "codes_yielded"} <= {k.rsplit(".", 1)[1] for k in result["checks"]
                                               if k.startswith(f"compiled.{case}")}, case


def test_parity_fails_on_a_corrupted_golden(golden_dir, tmp_path):
    """The checker is not vacuous: perturbing one reference tensor makes it exit non-zero."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    work = tmp_path / "golden"
    work.mkdir()
    (work / "checkpoint").symlink_to(golden_dir / "checkpoint")
    readme = json.loads((golden_dir / "README.json").read_text())
    readme["files"] = {"fast_ar.safetensors": readme["files"]["fast_ar.safetensors"]}
    (work / "README.json").write_text(json.dumps(readme))
    g = load_file(str(golden_dir / "fast_ar.safetensors"))
    g["tf_logits"] = g["tf_logits"] + 0.05 * torch.randn_like(g["tf_logits"])
    save_file(g, str(work / "fast_ar.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "fish_s2.parity", str(work)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["failed"] == ["fast_ar.tf_logits"]
    shutil.rmtree(work)


def test_parity_reports_a_missing_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fish_s2.parity", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["ok"] is False
