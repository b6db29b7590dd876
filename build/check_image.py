"""Build-time checks of the GPU image: build/Dockerfile runs them, so a wrong base, a missing backend or a
changed pin fails the build instead of the first request. Standard library only (runs before any install).

    python3 build/check_image.py [--env build/versions.env] [--templates model_repository/templates]
        [--root /] [--site DIR] [--backends-release FILE] [--render] CHECK [CHECK ...]

CHECK: ``args`` (the build args are versions.env's, and the two image tags its Triton release's),
``versions`` (TensorRT-LLM, TensorRT, torch and the Triton server are the pinned versions), ``backends``
(every backend a model template names is installed, with its files), ``libs`` (``ldd`` finds every
library those backends link; driver libraries come from the host at run time and are not required),
``package`` (the installed fish_s2's requirements are met), ``all`` (all five), or ``constraints``
(prints ``name==version`` for every installed distribution, a pip constraints file that keeps the
base image's packages as they are). ``--render`` prints what each check verifies, without checking.
``--root`` and ``--site`` point the checks at another file tree and another site-packages (tests).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
TRITON = Path("opt/tritonserver")
PINNED_DISTS = {"tensorrt_llm": "TENSORRT_LLM_VERSION", "tensorrt": "TENSORRT_VERSION", "torch": "TORCH_VERSION"}
# platform -> the backend that serves it; ensemble is built into the server
PLATFORMS = {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch",
             "ensemble": None}
# files a backend needs (libtriton_<name>.so for any other); .so files and the stub are also ldd-checked
BACKEND_FILES = {
    "python": ("libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"),
    "onnxruntime": ("libtriton_onnxruntime.so", "libonnxruntime_providers_shared.so",
                    "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"),
    "tensorrt": ("libtriton_tensorrt.so",),
}
# installed with the GPU driver on the host (nvidia-container-toolkit mounts them at run time)
DRIVER_LIBS = re.compile(r"^lib(cuda|nvidia-[\w-]+|nvcuvid|nvoptix)\.so(\.\d+)*$")
CHECKS = ("args", "versions", "backends", "libs", "package")


@dataclass(frozen=True)
class Item:
    check: str
    what: str                          # one line: what is verified, with the expected values
    run: Callable[[], str | None]      # None when it holds, else why not


def read_env(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of versions.env (comments and blank lines skipped)."""
    env = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise ValueError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        env[key] = value
    return env


def needed_backends(templates: Path) -> dict[str, list[str]]:
    """backend -> the model configs (any variant, config*.pbtxt) that name it."""
    needed: dict[str, list[str]] = {}
    for cfg in sorted(Path(templates).glob("*/config*.pbtxt")):
        text = cfg.read_text()
        names = re.findall(r'^backend:\s*"([^"]+)"', text, re.M)
        names += [PLATFORMS.get(p, p) for p in re.findall(r'^platform:\s*"([^"]+)"', text, re.M)]
        for name in filter(None, names):
            needed.setdefault(name, []).append(f"{cfg.parent.name}/{cfg.name}")
    if not needed:
        raise ValueError(f"{templates}: no config*.pbtxt names a backend")
    return needed


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(site: Path | None = None) -> dict[str, metadata.Distribution]:
    """Normalized distribution name -> distribution (the first one on the path wins, as for imports)."""
    dists: dict[str, metadata.Distribution] = {}
    for d in metadata.distributions(**({"path": [str(site)]} if site else {})):
        name = d.metadata["Name"]
        if name:
            dists.setdefault(_norm(name), d)
    return dists


def ldd_missing(lib: Path, env: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(libraries ldd cannot find, excluding the driver's; undefined symbols) of one ELF file."""
    out = subprocess.run(["ldd", "-r", str(lib)], capture_output=True, text=True, env=env)
    text = out.stdout + out.stderr
    if out.returncode != 0 and "=>" not in text:
        return [f"ldd failed: {text.strip() or out.returncode}"], []
    missing = [m for m in re.findall(r"^\s*(\S+) => not found", text, re.M) if not DRIVER_LIBS.match(m)]
    undefined = re.findall(r"^undefined symbol: (\S+)", text, re.M)
    return missing, undefined


class Plan:
    """Every check as a list of Items, built from versions.env, the templates and the file tree."""

    def __init__(self, env: dict[str, str], templates: Path, root: Path = Path("/"), site: Path | None = None,
                 backends_release: Path | None = None, warn: Callable[[str], None] = print):
        self.env, self.templates, self.root, self.site = env, templates, root, site
        self.backends_release, self.warn = backends_release, warn
        self._dists: dict | None = None

    @property
    def dists(self) -> dict[str, metadata.Distribution]:
        if self._dists is None:
            self._dists = installed(self.site)
        return self._dists

    def pin(self, key: str) -> str:
        if key not in self.env:
            raise KeyError(f"versions.env has no {key}")
        return self.env[key]

    def items(self, check: str) -> list[Item]:
        return getattr(self, f"_{check}")()

    # ------------------------------------------------------------------ checks

    def _args(self) -> list[Item]:
        items = [Item("args", f"build arg {k} = {v}", lambda k=k, v=v: None if os.environ.get(k) == v else
                      f"build arg {k} is {os.environ.get(k)!r}, versions.env says {v!r} (pass every versions.env "
                      f"line as --build-arg: build/README.md)") for k, v in self.env.items()]
        rel = self.pin("TRITON_CONTAINER")
        for key, tag in (("BASE_IMAGE", f"{rel}-trtllm-python-py3"), ("BACKENDS_IMAGE", f"{rel}-py3")):
            items.append(Item("args", f"{key} is tritonserver:{tag} (Triton release TRITON_CONTAINER={rel})",
                              lambda key=key, tag=tag: None if self.pin(key).endswith(f"tritonserver:{tag}") else
                              f"versions.env: {key}={self.pin(key)} is not tritonserver:{tag}"))
        return items

    def _versions(self) -> list[Item]:
        def dist(name: str, want: str) -> str | None:
            d = self.dists.get(_norm(name))
            got = d.version if d else None
            return None if got == want else f"{name} is {got or 'not installed'}, pinned {want}"

        items = [Item("versions", f"{name} == {self.pin(key)}", lambda n=name, k=key: dist(n, self.pin(k)))
                 for name, key in PINNED_DISTS.items()]
        want = self.pin("TRITON_SERVER_RELEASE")
        items.append(Item("versions", f"Triton server == {want} ({'/' / TRITON / 'TRITON_VERSION'}, or env TRITON_SERVER_VERSION)",
                          lambda: self._triton_version(want)))
        if self.backends_release is not None:
            items.append(Item("versions", f"backends image's Triton server == {want} ({self.backends_release})",
                              lambda: self._file_version(self.backends_release, want, "the backends image")))
        return items

    def _triton_version(self, want: str) -> str | None:
        path = self.root / TRITON / "TRITON_VERSION"
        if path.is_file():
            return self._file_version(path, want, "the base image")
        got = os.environ.get("TRITON_SERVER_VERSION")
        return None if got == want else f"Triton server version unknown ({path} missing, env {got!r}), pinned {want}"

    @staticmethod
    def _file_version(path: Path, want: str, what: str) -> str | None:
        if not Path(path).is_file():
            return f"{path} missing: cannot tell the Triton release of {what}"
        got = Path(path).read_text().strip()
        return None if got == want else f"{what} has Triton server {got}, pinned {want}"

    def _backend_dir(self, name: str) -> Path:
        return self.root / TRITON / "backends" / name

    def _files(self, name: str) -> tuple[str, ...]:
        return BACKEND_FILES.get(name, (f"libtriton_{name}.so",))

    def _backends(self) -> list[Item]:
        items = []
        for name, users in needed_backends(self.templates).items():
            d, files = self._backend_dir(name), self._files(name)
            items.append(Item("backends", f"{name} (for {', '.join(users)}): {'/' / d.relative_to(self.root)}/"
                              f"{{{','.join(files)}}}",
                              lambda d=d, files=files, name=name: None if all((d / f).is_file() for f in files) else
                              f"backend {name} missing: {[f for f in files if not (d / f).is_file()]} not in {d}"))
        return items

    def _libs(self) -> list[Item]:
        items = []
        for name in needed_backends(self.templates):
            for f in self._files(name):
                if f.endswith(".so") or f.endswith("_stub"):
                    lib = self._backend_dir(name) / f
                    items.append(Item("libs", f"ldd {'/' / lib.relative_to(self.root)}: every library found "
                                      "(driver libraries excepted)", lambda lib=lib: self._ldd(lib)))
        return items

    def _ldd(self, lib: Path) -> str | None:
        if not lib.is_file():
            return f"{lib} missing"
        missing, undefined = ldd_missing(lib, self._ldd_env())
        if undefined:  # reported, not fatal: backend API symbols resolve against the server at load
            self.warn(f"warning: {lib}: {len(undefined)} undefined symbol(s) at build time, e.g. {undefined[:3]}")
        return f"{lib} links libraries that are not in the image: {missing}" if missing else None

    def _ldd_env(self) -> dict[str, str]:
        """The environment with the CUDA driver stubs standing in for the host's driver libraries."""
        env = dict(os.environ)
        stubs = next((p for p in (Path("/usr/local/cuda/lib64/stubs"), Path("/usr/local/cuda/targets/x86_64-linux/lib/stubs"))
                      if (p / "libcuda.so").is_file()), None)
        if stubs is not None:
            links = Path(tempfile.mkdtemp(prefix="driver-stubs-"))
            for lib in ("libcuda.so", "libnvidia-ml.so"):
                if (stubs / lib).is_file():
                    (links / f"{lib}.1").symlink_to(stubs / lib)
            env["LD_LIBRARY_PATH"] = f"{env.get('LD_LIBRARY_PATH', '')}:{links}".lstrip(":")
        server = self.root / TRITON / "lib" / "libtritonserver.so"
        if server.is_file():  # backends resolve the server API against it
            env["LD_PRELOAD"] = str(server)
        return env

    def _package(self) -> list[Item]:
        pkg = self.dists.get("fish-s2")
        if pkg is None:
            return [Item("package", "fish_s2 installed", lambda: "fish_s2 is not installed")]
        items = []
        for req in pkg.requires or []:
            if "extra ==" in req:
                continue
            items.append(Item("package", f"fish_s2 requirement {req}", lambda req=req: self._satisfied(req)))
        return items

    def _satisfied(self, req: str) -> str | None:
        from packaging.requirements import Requirement  # present wherever pip is

        r = Requirement(req)
        if r.marker is not None and not r.marker.evaluate():
            return None
        d = self.dists.get(_norm(r.name))
        if d is None:
            return f"{r.name} is not installed (fish_s2 requires {req})"
        return None if r.specifier.contains(d.version, prereleases=True) else \
            f"{r.name} {d.version} does not satisfy fish_s2's {req}"


def constraints(site: Path | None = None) -> str:
    """A pip constraints file pinning every installed distribution at its version."""
    return "".join(f"{d.metadata['Name']}=={d.version}\n" for _, d in sorted(installed(site).items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check_image.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checks", nargs="+", choices=(*CHECKS, "all", "constraints"))
    p.add_argument("--env", type=Path, default=HERE / "versions.env")
    p.add_argument("--templates", type=Path, default=HERE.parent / "model_repository" / "templates")
    p.add_argument("--root", type=Path, default=Path("/"))
    p.add_argument("--site", type=Path, default=None, help="site-packages to read instead of this interpreter's")
    p.add_argument("--backends-release", type=Path, default=None,
                   help="TRITON_VERSION file copied from the backends image (must match the pinned server)")
    p.add_argument("--render", action="store_true", help="print what the checks verify, without checking")
    args = p.parse_args(argv)
    if "constraints" in args.checks:
        sys.stdout.write(constraints(args.site))
        return 0
    plan = Plan(read_env(args.env), args.templates, args.root, args.site, args.backends_release,
                warn=lambda line: print(line, file=sys.stderr))
    failed = 0
    for check in CHECKS if "all" in args.checks else dict.fromkeys(args.checks):
        for item in plan.items(check):
            if args.render:
                print(f"{check}: {item.what}")
                continue
            why = item.run()
            print(f"{'ok  ' if why is None else 'FAIL'} {check}: {item.what}" + ("" if why is None else f"\n     {why}"))
            failed += why is not None
    if failed:
        print(f"{failed} image check(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
