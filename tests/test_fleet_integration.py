"""Two real Triton servers on the CPU (tiny checkpoint, free ports) sharing one voices folder, and a
client with both endpoints: a voice registered on A is used through B, a delete on B is seen by A,
and A drained through its launcher's SIGTERM path finishes its 4 running streams with full audio
while new requests go to B; the fleet client sees no failure throughout."""

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fish_s2.client import TTSClient
from fish_s2.request import NotFound, RequestError, Unavailable
from fish_s2.serving.repository import generate
from fish_s2.serving.server import TritonServer, free_ports, pytriton_dist

try:
    pytriton_dist()
except FileNotFoundError as e:
    pytest.skip(f"no Triton server binary: {e}", allow_module_level=True)

RATE = 16000
ADMIN_KEY = secrets.token_hex(16)   # one key for the fleet: a fleet client registers and deletes on either replica
LONG = dict(max_frames=48, first_chunk_frames=4, chunk_frames=6)    # up to 2.2 s of audio per stream


def _reference_audio() -> np.ndarray:
    t = np.arange(RATE, dtype=np.float32) / RATE
    return (0.3 * np.sin(2 * np.pi * 160 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


class Traffic(threading.Thread):
    """The fleet client's steady load: short requests, with and without a voice, one after another."""

    def __init__(self, client: TTSClient):
        super().__init__(daemon=True)
        self.client, self.stop_event, self.results = client, threading.Event(), []

    def run(self):
        i = 0
        while not self.stop_event.is_set():
            fields = dict(seed=i, max_frames=6) | ({"voice_id": "steady"} if i % 2 else {})
            audio = 0
            try:
                for chunk in self.client.stream(f"Steady request {i}.", **fields):
                    audio += chunk.audio.size
                self.results.append(("ok", audio, None))
            except (RequestError, ValueError) as e:   # ValueError: the client was closed under it
                self.results.append(("failed", audio, e))
            i += 1


def _launcher(repo: Path, workdir: Path, ports: list[int], log: Path) -> subprocess.Popen:
    """Replica A as `python -m fish_s2.serving.server` (the drain path runs on its SIGTERM)."""
    http, grpc_port, metrics = ports
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fish_s2.serving.server", "--repository", str(repo),
                                 "--workdir", str(workdir), "--http-port", str(http), "--grpc-port", str(grpc_port),
                                 "--metrics-port", str(metrics), "--drain-grace-s", "60", "--exit-timeout-s", "30"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "FISH_S2_ADMIN_KEY": ADMIN_KEY})


def test_two_replicas_share_voices_drain_and_fail_over(tiny_checkpoint, tmp_path):
    t0 = time.monotonic()
    repo = tmp_path / "repo"     # one repository, as every pod generates the same; one voices folder
    generate("cpu", tiny_checkpoint, tmp_path / "art", repo, tmp_path / "shared-voices")
    ports_a = free_ports(3)
    a = TritonServer(repo, tmp_path / "run-a", *ports_a)         # not started here: the launcher runs it
    launcher_log = tmp_path / "launcher-a.log"
    launcher = _launcher(repo, a.workdir, ports_a, launcher_log)
    b = TritonServer(repo, tmp_path / "run-b", *free_ports(3), admin_key=ADMIN_KEY)
    traffic = None
    try:
        b.start()
        deadline = time.monotonic() + 240
        while not a.ready():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher_log.read_text()
            time.sleep(0.25)
        t_ready = time.monotonic()
        key = dict(timeout_s=120, admin_key=ADMIN_KEY)
        with TTSClient(a.grpc_url, **key) as on_a, TTSClient(b.grpc_url, **key) as on_b, \
                TTSClient([a.grpc_url, b.grpc_url], **key) as fleet:
            fleet.register_voice("steady", _reference_audio(), RATE, "The steady voice.")
            traffic = Traffic(fleet)
            traffic.start()

            # shared voices: registered on A, found by B on first use; deleted on B, refused by A
            on_a.register_voice("alice", _reference_audio(), RATE, "A reference sentence.")
            assert on_b.synthesize("Spoken on B.", voice_id="alice", seed=1, max_frames=8).audio.size == 8 * 2048
            on_b.delete_voice("alice")
            with pytest.raises(NotFound, match="unknown voice 'alice'"):
                on_a.synthesize("Spoken on A.", voice_id="alice", max_frames=4)

            # 4 streams running on A when its launcher gets SIGTERM
            started = threading.Barrier(5)

            def long_stream(i):
                chunks = []
                for chunk in on_a.stream(f"A long stream number {i} on replica A.", seed=40 + i, **LONG):
                    if not chunks:
                        started.wait(120)
                    chunks.append(chunk)
                return np.concatenate([c.audio for c in chunks])

            with ThreadPoolExecutor(4) as pool:
                streams = [pool.submit(long_stream, i) for i in range(4)]
                started.wait(120)
                served_before = dict(fleet.router.served)
                launcher.send_signal(signal.SIGTERM)
                t_term = time.monotonic()
                while a.ready():                                  # the launcher's readiness drops at once
                    assert time.monotonic() < t_term + 10
                    time.sleep(0.05)
                t = time.monotonic()
                with pytest.raises(Unavailable, match="draining"):    # refused at once, typed: retry elsewhere
                    on_a.synthesize("Too late for A.", max_frames=4)
                assert time.monotonic() - t < 5
                for i in range(4):                                # new requests go to B
                    fleet.synthesize(f"New request {i}.", seed=i, max_frames=6,
                                     **({"voice_id": "steady"} if i % 2 else {}))
                assert fleet.router.served[b.grpc_url] - served_before[b.grpc_url] >= 4
                audio = [f.result(timeout=120) for f in streams]
            t_streams = time.monotonic()
            assert launcher.wait(120) == 0, launcher_log.read_text() + a.log_tail()
            t_exit = time.monotonic()
            assert "drain: drained" in launcher_log.read_text()
            assert "Exit timeout expired" not in a.log_path.read_text()

            # full audio: the same requests on B give the same samples
            with ThreadPoolExecutor(4) as pool:
                again = list(pool.map(lambda i: on_b.synthesize(f"A long stream number {i} on replica A.",
                                                                seed=40 + i, **LONG).audio, range(4)))
            for i in range(4):
                assert audio[i].shape == again[i].shape and np.allclose(audio[i], again[i], atol=1e-4), i
            assert all(x.size > 10 * 2048 for x in audio)

            for i in range(2):                                    # A is gone: the fleet client carries on
                assert fleet.synthesize(f"After A {i}.", voice_id="steady", max_frames=4).audio.size > 0
            traffic.stop_event.set()
            traffic.join(60)
            failed = [r for r in traffic.results if r[0] == "failed"]
            assert not failed, failed                             # not one, with or without audio
            assert len(traffic.results) >= 5
            print(f"\nfleet: servers ready after {t_ready - t0:.0f} s; SIGTERM -> 4 streams done "
                  f"{t_streams - t_term:.1f} s -> launcher exit {t_exit - t_term:.1f} s; "
                  f"{len(traffic.results)} steady requests, {fleet.router.retries} moved to another replica, "
                  f"served {fleet.router.served}; total {time.monotonic() - t0:.0f} s")
    finally:
        if traffic is not None:
            traffic.stop_event.set()
            traffic.join(60)
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)               # Ctrl-C: the launcher stops A at once
            try:
                launcher.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
        b.stop()
