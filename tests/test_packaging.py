"""The client side installs without torch: the client library, `say` and the load generator import
with torch made unimportable, and the package's extras say which role needs what."""

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_BLOCK_TORCH = """
import importlib.abc, importlib.util, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is unavailable in this test")
sys.meta_path.insert(0, NoTorch())
import fish_s2.client, fish_s2.request, fish_s2.serving.protocol
for name, path in (("say", "client/say.py"), ("loadgen", "perf/loadgen.py")):
    spec = importlib.util.spec_from_file_location(name, path)
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok")
"""


def test_client_imports_without_torch():
    out = subprocess.run([sys.executable, "-c", _BLOCK_TORCH], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_blocking_really_blocks():
    """The same harness fails for a module that needs torch (so the test above can fail)."""
    code = _BLOCK_TORCH.replace("import fish_s2.client,", "import fish_s2.engine, fish_s2.client,")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "torch is unavailable" in out.stderr


def test_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "torch" not in base and "torch" not in " ".join(extras["client"])
    assert any(d.startswith("tritonclient") for d in extras["client"])
    assert any(d.startswith("torch") for d in extras["serve"]) and "gpu" in extras
