"""Start, health-check and stop a ``tritonserver`` for a model repository.

On the CPU the server is the Triton 2.51 binary inside the ``nvidia-pytriton`` wheel; its python
backend needs a backend folder holding ``libtriton_python.so``, ``triton_python_backend_utils.py``
and the stub for this Python version (linked into ``WORKDIR/backends/python``), the wheel's
libraries and this interpreter's ``LIBDIR`` on ``LD_LIBRARY_PATH``, and this environment's ``bin``
first on ``PATH`` (the stub takes its Python from ``python3`` on PATH). In NVIDIA's Triton container
the ``tritonserver`` on PATH is used with its own backends (and GPU metrics). The server binds to
``host`` (loopback by default).

Locked down by default: Triton's admin protocols (model repository control, logging, trace, shared
memory) need the header ``admin-key`` (HTTP) / ``triton-grpc-protocol-admin-key`` (gRPC) with the
admin key, which is also what the ``voices`` model asks for to register or delete a voice. The key
comes from ``$FISH_S2_ADMIN_KEY`` or is generated at start and written to ``WORKDIR/admin-key`` (mode
0600). ``open_admin`` (``--open-admin``) lifts the restriction, for operators who need it.

Stopping: SIGTERM drains first (:mod:`fish_s2.serving.drain`): the drain flag ``WORKDIR/draining``
(``FISH_S2_DRAIN_FILE`` of the server process) makes ``preprocess`` refuse new streams with
UNAVAILABLE and :meth:`TritonServer.ready` report False, the streams in flight finish within
``drain_grace_s``, and only then does tritonserver get SIGTERM (Triton 2.51 strands a stream that
produces a response after it). Ctrl-C stops at once. tritonserver runs with the request sweep preloaded
(:mod:`fish_s2.serving.sweep`; ``FISH_S2_REQUEST_SWEEP=0`` leaves it out): on SIGTERM it releases the
requests that Triton's gRPC stream handler keeps after a client cancelled their stream, which would
otherwise keep their model from unloading (model_repository/README.md, "Clean shutdown").

    python -m fish_s2.serving.server --repository DIR [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
        [--drain-grace-s 90 --exit-timeout-s 30 --open-admin]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path

from . import drain as drain_
from . import sweep as sweep_

def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on the loopback interface (bound briefly, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_tree(root: int) -> dict[int, str]:
    """pid -> command name of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        names[int(entry.name)] = name
        children.setdefault(int(rest[1]), []).append(int(entry.name))
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        out[pid] = names.get(pid, "?")
        todo += children.get(pid, [])
    return out


def pytriton_dist() -> Path:
    """The ``tritonserver`` folder of the nvidia-pytriton wheel (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tritonserver: the nvidia-pytriton package is not installed (it ships the CPU "
                                "server); in a Triton container pass the server binary instead")
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(f"tritonserver: {dist / 'bin' / 'tritonserver'} not found")
    return dist


def python_backend_dir(workdir: Path) -> Path:
    """A backend folder whose python backend uses the stub for this interpreter's version."""
    dist = pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"tritonserver: no python backend stub for Python {version} in {stub.parent.parent}")
    backend = workdir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for src in (dist / "backends" / "python" / "libtriton_python.so",
                dist / "backends" / "python" / "triton_python_backend_utils.py", stub):
        link = backend / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    return backend.parent


@dataclass
class TritonServer:
    repository: Path
    workdir: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    tritonserver: Path | None = None        # default: `tritonserver` on PATH, else the nvidia-pytriton binary
    backend_dir: Path | None = None         # default: the binary's own (or, for the wheel's, built under workdir)
    exit_timeout_s: int = 30                # upper bound; the server exits as soon as its models unload
    drain_grace_s: float = drain_.MAX_S     # SIGTERM / drain(): how long streams in flight may take to finish
    log_verbose: int = 0
    admin_key: str | None = None            # default: $FISH_S2_ADMIN_KEY, else generated (see admin_key_path)
    open_admin: bool = False                # True: Triton's admin protocols open to every client
    request_sweep: bool = field(default_factory=sweep_.enabled)   # preload the request sweep (sweep.py)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    ADMIN_PROTOCOLS = ("model-repository", "logging", "trace", "shared-memory")

    def __post_init__(self):
        self.admin_key = self.admin_key or os.environ.get("FISH_S2_ADMIN_KEY") or secrets.token_hex(16)
        found = shutil.which("tritonserver")
        if self.tritonserver is None and found:   # NVIDIA's container
            self.tritonserver = Path(found)

    @property
    def pid(self) -> int | None:
        """The tritonserver process (its backend stubs are its children), while it runs."""
        return None if self._proc is None else self._proc.pid

    @property
    def admin_key_path(self) -> Path:
        return Path(self.workdir) / "admin-key"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return Path(self.workdir) / "tritonserver.log"

    @property
    def drain_flag(self) -> Path:
        return Path(self.workdir).resolve() / "draining"

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        backends = self.backend_dir
        if self.tritonserver is None:   # the wheel's CPU server: python backend only, no GPU metrics
            dist = pytriton_dist()
            binary = dist / "bin" / "tritonserver"
            libs = [str(dist.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
            env["LD_LIBRARY_PATH"] = ":".join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
            backends = backends or python_backend_dir(Path(self.workdir))
        else:
            binary = Path(self.tritonserver)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env[drain_.FILE_ENV] = str(self.drain_flag)
        library = sweep_.build(Path(self.workdir) / "lib") if self.request_sweep else None
        if library is not None:   # ended requests the gRPC frontend keeps must not hold their models at exit
            sweep_.preload(env, library)
        env["FISH_S2_ADMIN_KEY"] = self.admin_key      # the voices model checks register/delete against it
        restricted = [] if self.open_admin else [
            f"--grpc-restricted-protocol={','.join(self.ADMIN_PROTOCOLS)}:admin-key={self.admin_key}",
            f"--http-restricted-api={','.join(self.ADMIN_PROTOCOLS)}:admin-key={self.admin_key}"]
        cmd = [str(binary), f"--model-repository={Path(self.repository).resolve()}",
               *([f"--backend-directory={backends}"] if backends else []),
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}", *restricted,
               f"--allow-gpu-metrics={'false' if self.tritonserver is None else 'true'}",
               f"--exit-timeout-secs={self.exit_timeout_s}",
               "--disable-auto-complete-config",      # the configs are complete; skips a stub launch per model
               "--model-load-thread-count=8",         # load every model at once
               f"--log-verbose={self.log_verbose}"]
        return cmd, env

    def start(self, timeout_s: float = 300.0) -> "TritonServer":
        """Start and wait until every model is ready; on failure stop it and raise with the log's tail."""
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        self.drain_flag.unlink(missing_ok=True)       # left by an earlier drain
        self.admin_key_path.touch(mode=0o600)
        self.admin_key_path.chmod(0o600)
        self.admin_key_path.write_text(self.admin_key + "\n")
        cmd, env = self.command()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        try:   # ready, and the metrics service up (Triton starts it just after the HTTP service)
            while not (self.ready() and self._answers(self.metrics_url)):
                if self._proc.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {self._proc.returncode}; log {self.log_path}:\n"
                                       f"{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
                                       f"{self.log_tail()}")
                time.sleep(0.25)
        except BaseException:   # a failed start or Ctrl-C leaves no server behind
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        """Triton is ready and the server is not draining."""
        return not self.drain_flag.exists() and self._answers(f"http://{self.host}:{self.http_port}/v2/health/ready")

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def drain(self, grace_s: float | None = None, settle_s: float = 0.0, poll_s: float = drain_.POLL_S) -> str:
        """Refuse new streams and wait for those in flight, up to ``grace_s`` (default ``drain_grace_s``);
        "drained", "timeout" or "unreachable". Call :meth:`stop` next."""
        return drain_.drain(self.metrics_url, self.drain_flag, settle_s,
                            self.drain_grace_s if grace_s is None else grace_s, poll_s,
                            lambda message: print(f"drain: {message}", flush=True))

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton finishes in-flight requests up to its exit timeout), then SIGKILL the process
        group this object started. Drain first (:meth:`drain`): a stream still running is cut."""
        if self._proc is None:
            return None
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s if timeout_s is not None else self.exit_timeout_s + 20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def wait(self) -> int | None:
        """Block until the server exits (its return code), or None if it is not running."""
        return None if self._proc is None else self._proc.wait()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fish_s2.serving.server", description="run tritonserver until Ctrl-C")
    ap.add_argument("--repository", required=True)
    ap.add_argument("--workdir", default=None, help="logs and backend links (default: REPOSITORY/../triton-run)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--tritonserver", help="server binary (default: tritonserver on PATH, else the nvidia-pytriton one)")
    ap.add_argument("--backend-dir", help="Triton backends folder (default: the server's own)")
    ap.add_argument("--open-admin", action="store_true",
                    help="leave Triton's admin protocols (model repository, logging, trace, shared memory) open to "
                         "every client; by default they need the admin key ($FISH_S2_ADMIN_KEY or WORKDIR/admin-key)")
    add_stop_arguments(ap)
    args = ap.parse_args(argv)
    repo = Path(args.repository)
    server = TritonServer(repo, Path(args.workdir or repo.resolve().parent / "triton-run"), args.http_port,
                          args.grpc_port, args.metrics_port, args.host,
                          Path(args.tritonserver) if args.tritonserver else None,
                          Path(args.backend_dir) if args.backend_dir else None,
                          args.exit_timeout_s, drain_grace_s=args.drain_grace_s, open_admin=args.open_admin)
    return serve_until_interrupted(server)


def add_stop_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--drain-grace-s", type=float, default=drain_.MAX_S,
                    help="on SIGTERM, seconds the streams in flight may take to finish (default %(default)s)")
    ap.add_argument("--exit-timeout-s", type=int, default=TritonServer.exit_timeout_s,
                    help="tritonserver --exit-timeout-secs: unloading, after the drain (default %(default)s)")


class _Terminated(KeyboardInterrupt):
    """SIGTERM: drain, then stop."""


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _terminate(signum, frame):
    raise _Terminated


def serve_until_interrupted(server: TritonServer, sidecars: Sequence = ()) -> int:
    """Start (health-checked), run until Ctrl-C or SIGTERM, stop cleanly; the exit status.

    ``sidecars`` (objects with ``start()``/``stop()``, e.g. the OpenAI endpoint) start once Triton is
    ready and stop before it. SIGTERM drains first (a second SIGTERM or Ctrl-C cuts the drain short)."""
    signal.signal(signal.SIGTERM, _terminate)
    print(f"starting tritonserver (log: {server.log_path})", flush=True)
    started = []
    try:
        server.start()
        for sidecar in sidecars:
            started.append(sidecar.start())
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        for sidecar in started:
            sidecar.stop()
        server.stop()
        return 1
    except KeyboardInterrupt:
        for sidecar in started:
            sidecar.stop()
        server.stop()
        return 130
    print(f"admin key (admin protocols, voice register/delete): {server.admin_key_path}", flush=True)
    print(f"ready: gRPC {server.grpc_url}, HTTP {server.host}:{server.http_port}, metrics {server.metrics_url}"
          + "".join(f", {s}" for s in started) + "; Ctrl-C stops it", flush=True)
    try:
        code = server.wait()
        print(f"error: tritonserver exited with {code}; log {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if isinstance(e, _Terminated):
            signal.signal(signal.SIGTERM, _interrupt)
            try:   # the sidecars keep running: their streams are Triton streams, and new ones are refused
                server.drain()
            except KeyboardInterrupt:
                pass
        print("stopping", flush=True)
        for sidecar in started:
            sidecar.stop()
        return 0 if server.stop() in (0, None) else 1
    finally:
        for sidecar in started:
            sidecar.stop()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
