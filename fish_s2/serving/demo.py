"""What ``make demo`` and ``make serve`` run on the CPU.

    python -m fish_s2.serving.demo demo  [--checkpoint DIR] [--artifacts DIR] [--text T] [-o demo.wav]
    python -m fish_s2.serving.demo serve [--checkpoint DIR] [--artifacts DIR] [--grpc-port 8001 ...]

Both prepare ARTIFACTS: a tiny random checkpoint when no --checkpoint is given
(``ARTIFACTS/tiny-checkpoint``), the export (``python -m fish_s2.export --target cpu`` into
``ARTIFACTS/export``, which skips what is up to date; the codec then runs in ONNX Runtime, and in
torch where the export CLI is not installed), the CPU model repository
(``ARTIFACTS/model_repository``, voices in ``ARTIFACTS/voices``). ``demo`` then starts Triton on free
ports, streams the text through the client into a WAV file, prints time to first audio and RTF,
and stops the server; ``serve`` runs the server until Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from .repository import generate
from .server import TritonServer, add_stop_arguments, free_ports, serve_until_interrupted

DEMO_TEXT = "Hello! [laugh] This is Fish S2 streaming from Triton."


def prepare(artifacts: Path, checkpoint: Path | None, overrides: dict[str, object] | None = None) -> Path:
    """Checkpoint, export and model repository under ``artifacts``; returns the repository."""
    if checkpoint is None:
        checkpoint = artifacts / "tiny-checkpoint"
        if not (checkpoint / "config.json").is_file():
            from ..tiny import write_tiny_checkpoint

            print(f"writing a tiny random checkpoint to {checkpoint}", flush=True)
            write_tiny_checkpoint(checkpoint)
    elif not (checkpoint / "config.json").is_file():
        raise ValueError(f"--checkpoint: {checkpoint} has no config.json")
    export = artifacts / "export"
    if importlib.util.find_spec("fish_s2.export.__main__") is None:
        print("the export CLI (python -m fish_s2.export) is not installed: the codec runs in torch", flush=True)
    else:   # up-to-date stages are skipped
        print(f"exporting to {export}", flush=True)
        subprocess.run([sys.executable, "-m", "fish_s2.export", "--checkpoint", str(checkpoint), "--out",
                        str(export), "--target", "cpu"], check=True)
    repo = artifacts / "model_repository"
    cfg = generate("cpu", checkpoint, export, repo, artifacts / "voices", overrides)
    print(f"model repository {repo}: dual_ar {cfg.runtime}, codec {cfg.codec_runtime}", flush=True)
    return repo


def run_demo(args: argparse.Namespace) -> int:
    from ..client import TTSClient

    repo = prepare(Path(args.artifacts), Path(args.checkpoint) if args.checkpoint else None)
    http, grpc_port, metrics = free_ports(3)
    server = TritonServer(repo, Path(args.artifacts) / "triton-run", http, grpc_port, metrics)
    print(f"starting tritonserver (log: {server.log_path})", flush=True)
    with server:
        with TTSClient(server.grpc_url) as client:
            result = client.synthesize(args.text, max_frames=args.max_frames, seed=args.seed)
    result.write_wav(args.output)
    print(f"wrote {args.output}: {result.n_chunks} chunks, {result.duration:.2f} s of audio at {result.sample_rate} Hz")
    print(f"time to first audio: {result.time_to_first_audio * 1000:.0f} ms, RTF: {result.rtf:.3f} "
          f"({result.elapsed:.2f} s for {result.duration:.2f} s of audio)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    repo = prepare(Path(args.artifacts), Path(args.checkpoint) if args.checkpoint else None)
    server = TritonServer(repo, Path(args.artifacts) / "triton-run", args.http_port, args.grpc_port,
                          args.metrics_port, args.host, exit_timeout_s=args.exit_timeout_s,
                          drain_grace_s=args.drain_grace_s, open_admin=args.open_admin)
    sidecars = []
    if args.openai_port:
        from .openai_api import SpeechProcess

        sidecars.append(SpeechProcess(server.grpc_url, args.host, args.openai_port,
                                      env={"FISH_S2_ADMIN_KEY": server.admin_key}))
    return serve_until_interrupted(server, sidecars)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fish_s2.serving.demo", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("demo", "serve"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoint", help="S2 checkpoint directory (default: a tiny random one)")
        s.add_argument("--artifacts", default="artifacts")
    d = sub.choices["demo"]
    d.add_argument("--text", default=DEMO_TEXT)
    d.add_argument("-o", "--output", default="demo.wav")
    d.add_argument("--max-frames", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    s = sub.choices["serve"]
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--open-admin", action="store_true",
                   help="leave Triton's admin protocols open (default: they need the admin key, see README Security)")
    s.add_argument("--openai-port", type=int, default=0,
                   help="also serve the OpenAI-compatible POST /v1/audio/speech on this port (0: off); "
                        "API key from $FISH_S2_API_KEY")
    add_stop_arguments(s)
    args = ap.parse_args(argv)
    try:
        return run_demo(args) if args.command == "demo" else run_serve(args)
    except (ValueError, RuntimeError, FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
