"""The request sweep preloaded into tritonserver (``request_sweep.c``): on SIGTERM it releases the
inference requests that Triton's gRPC stream handler keeps after their end, so that their models can
unload and the server exits within its timeout (model_repository/README.md, "Clean shutdown").

Built from its C source with the system's C compiler the first time a server needs it, into a folder
of its own (one file per version of the source). Without a compiler the server runs without it, as
before: a client that cancels a stream at the wrong moment can then keep a model from unloading.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("request_sweep.c")
NAME = "fish_s2_request_sweep"       # the C file drops this name from the LD_PRELOAD its children inherit
ENV = "FISH_S2_REQUEST_SWEEP"        # "0": do not preload it


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(folder: Path) -> Path | None:
    """The shared library, built into ``folder`` unless it is there already; None (with a warning on
    stderr) when it cannot be built."""
    source = SOURCE.read_bytes()
    target = Path(folder) / f"{NAME}-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if target.is_file():
        return target
    cc = compiler()
    if cc is None:
        print(f"warning: no C compiler (set CC): tritonserver runs without {SOURCE.name}; a client that cancels "
              "a stream just after its end can keep a model from unloading at shutdown", file=sys.stderr)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(SOURCE), "-ldl", "-lpthread"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            done = None
            error = str(e)
        else:
            error = done.stderr.strip()
        if done is None or done.returncode != 0:
            print(f"warning: building {SOURCE.name} failed ({' '.join(cmd)}): {error}; tritonserver runs without it",
                  file=sys.stderr)
            return None
        os.replace(out, target)
    return target


def preload(env: dict[str, str], library: Path) -> None:
    """Put the library first on ``env``'s LD_PRELOAD (tritonserver's own environment)."""
    rest = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p and NAME not in p]
    env["LD_PRELOAD"] = ":".join([str(library), *rest])


if __name__ == "__main__":   # python3 sweep.py OUT_DIR: build it there (an image's builder stage; stdlib only)
    built = build(Path(sys.argv[1]))
    sys.exit(f"{SOURCE.name} was not built" if built is None else print(built))
