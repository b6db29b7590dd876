"""Install a perf_analyzer binary that runs on these CPU machines (no CUDA needed at run time).

PyPI's `perf-analyzer` is a placeholder and tritonclient >= 2.61 ships no binary, so this takes the
binary from the `tritonclient==2.51.0` manylinux1 wheel (same release as the CPU Triton server in
nvidia-pytriton). It needs libb64 and a libcudart.so.12 only to load: both come from the
nvidia-pytriton wheel's bundled libraries, linked under their sonames into a private lib folder.

    python perf/install_perf_analyzer.py [--dest perf/.bin]   ->   perf/.bin/perf_analyzer (a wrapper)
"""

from __future__ import annotations

import argparse
import glob
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "2.51.0"
MEMBER = f"tritonclient-{VERSION}.data/data/bin/perf_analyzer"


def pytriton_libs() -> Path:
    import pytriton

    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        raise SystemExit(f"{libs}: not found (install nvidia-pytriton first: make setup)")
    return libs


def install(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    binary, lib = dest / "perf_analyzer.bin", dest / "lib"
    if not binary.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            f"tritonclient=={VERSION}", "-d", tmp], check=True)
            wheel = next(Path(tmp).glob(f"tritonclient-{VERSION}-*.whl"))
            with zipfile.ZipFile(wheel) as z, open(binary, "wb") as out:
                out.write(z.read(MEMBER))
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    lib.mkdir(exist_ok=True)
    libs = pytriton_libs()
    for soname, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        found = sorted(glob.glob(str(libs / pattern)))
        if not found:
            raise SystemExit(f"{libs}: no {pattern}")
        link = lib / soname
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    wrapper = dest / "perf_analyzer"
    wrapper.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{lib.resolve()}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" '
                       f'exec "{binary.resolve()}" "$@"\n')
    wrapper.chmod(0o755)
    out = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True)
    if "perf_analyzer" not in (out.stdout + out.stderr).lower() and out.returncode != 0:
        raise SystemExit(f"perf_analyzer does not run: {out.stderr.strip()}")
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(Path(__file__).parent / ".bin"))
    print(install(Path(ap.parse_args().dest)))


if __name__ == "__main__":
    main()
