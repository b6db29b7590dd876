"""Command line: ``fish-s2 synthesize`` (in-process text to WAV) and ``fish-s2 make-tiny``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__


def _synthesize(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .audio import read_audio, write_wav
    from .checkpoint import S2Checkpoint
    from .prompt import Reference
    from .request import SamplingParams
    from .tts import encode_reference, synthesize

    if not args.text.strip():
        raise ValueError("--text: must not be empty")
    if (args.reference_audio is None) != (args.reference_text is None):
        raise ValueError("--reference-audio and --reference-text: give both or neither")
    if args.max_frames < 1:
        raise ValueError(f"--max-frames: must be >= 1, got {args.max_frames}")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed)
    ckdir = Path(args.checkpoint)
    if not ckdir.is_dir():
        raise ValueError(f"--checkpoint: {ckdir} is not a directory")
    t0 = time.perf_counter()
    ck = S2Checkpoint.load(ckdir, dtype=args.dtype, device=args.device)
    refs = []
    if args.reference_audio is not None:
        samples = read_audio(args.reference_audio, ck.codec.sample_rate)
        refs.append(Reference(args.reference_text, encode_reference(ck, samples)))
    with tqdm(total=args.max_frames, unit="frame", desc="generating", disable=args.quiet) as bar:
        audio, codes = synthesize(ck, args.text, refs, params, args.max_frames, args.chunk_length,
                                  on_frame=lambda i: bar.update(1))
    write_wav(args.output, audio, ck.codec.sample_rate)
    seconds = len(audio) / ck.codec.sample_rate
    elapsed = time.perf_counter() - t0
    print(f"wrote {args.output}: {codes.shape[1]} frames, {seconds:.2f} s of audio at {ck.codec.sample_rate} Hz "
          f"in {elapsed:.1f} s")


def _make_tiny(args: argparse.Namespace) -> None:
    from .tiny import PRESETS, write_tiny_checkpoint

    if args.preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {args.preset!r}")
    path = write_tiny_checkpoint(args.output, preset=args.preset, seed=args.seed, shards=args.shards)
    print(f"wrote {args.preset} checkpoint to {path}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fish-s2", description="Fish Audio S2-Pro inference tools")
    ap.add_argument("--version", action="version", version=__version__)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthesize", help="text (+ reference voice) to a WAV file, in-process")
    s.add_argument("--checkpoint", required=True, help="S2 checkpoint directory (upstream format)")
    s.add_argument("--text", required=True)
    s.add_argument("--reference-audio", help="reference voice recording (any common format and rate)")
    s.add_argument("--reference-text", help="transcript of the reference recording")
    s.add_argument("-o", "--output", required=True, help="output WAV path")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-p", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=30)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-frames", type=int, default=1024, help="frame limit per text batch (21.5 frames = 1 s)")
    s.add_argument("--chunk-length", type=int, default=300, help="UTF-8 bytes per text batch (speaker turns)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=_synthesize)

    t = sub.add_parser("make-tiny", help="write a deterministic tiny random checkpoint (tests, demo)")
    t.add_argument("output")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--shards", type=int, default=1, help="write N safetensors shards with an index")
    t.set_defaults(run=_make_tiny)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
