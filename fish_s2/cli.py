"""Command line: ``fish-s2 synthesize`` (in-process text to WAV), ``fish-s2 make-tiny`` and ``fish-s2 plan``."""

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
    if len(args.reference_audio) != len(args.reference_text):
        raise ValueError(f"--reference-audio and --reference-text: one transcript per recording, got "
                         f"{len(args.reference_audio)} and {len(args.reference_text)}")
    if args.max_frames < 1:
        raise ValueError(f"--max-frames: must be >= 1, got {args.max_frames}")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed)
    ckdir = Path(args.checkpoint)
    if not ckdir.is_dir():
        raise ValueError(f"--checkpoint: {ckdir} is not a directory")
    t0 = time.perf_counter()
    ck = S2Checkpoint.load(ckdir, dtype=args.dtype, device=args.device)
    refs = [Reference(text, encode_reference(ck, read_audio(path, ck.codec.sample_rate)))
            for path, text in zip(args.reference_audio, args.reference_text)]
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


def _plan(args: argparse.Namespace) -> None:
    from . import memory_plan as mp
    from .config import S2_PRO_CONFIG_JSON, DualARConfig

    if (args.checkpoint is None) == (args.preset is None):
        raise ValueError("give --checkpoint DIR or --preset s2-pro")
    if args.preset is not None:
        cfg, params, codec = DualARConfig.from_dict(S2_PRO_CONFIG_JSON), None, mp.S2_PRO_CODEC
    else:
        if not (Path(args.checkpoint) / "config.json").is_file():
            raise ValueError(f"--checkpoint: {args.checkpoint} has no config.json")
        cfg = DualARConfig.from_json(args.checkpoint)
        params, codec = mp.checkpoint_params(args.checkpoint), mp.codec_spec(args.checkpoint)
    prefix = None if args.prefix_cache is None else mp.parse_bytes(args.prefix_cache)
    s = mp.settings_for(args.profile, device=args.device, runtime=args.runtime, dtype=args.dtype,
                        kv_memory_fraction=args.kv_fraction, max_active=args.max_active,
                        max_prompt_tokens=args.max_prompt_tokens, max_frames=args.max_frames,
                        prefix_cache_bytes=prefix, max_slots=args.max_slots, codec_batch=args.codec_batch)
    if args.device_memory == "auto":
        available = mp.available_memory(s.device)
    else:
        try:
            available = mp.parse_bytes(args.device_memory)
        except ValueError as e:
            raise ValueError(f"--device-memory: {e}") from None
    plan = mp.plan_memory(cfg, s, available, params, codec)
    print(plan.to_text())
    if s.runtime == "trtllm":
        print(f"  TensorRT-LLM: {plan.trtllm_kv_cache()}")
    mp.check_fits(plan)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fish-s2", description="Fish Audio S2-Pro inference tools")
    ap.add_argument("--version", action="version", version=__version__)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthesize", help="text (+ reference voice) to a WAV file, in-process")
    s.add_argument("--checkpoint", required=True, help="S2 checkpoint directory (upstream format)")
    s.add_argument("--text", required=True)
    s.add_argument("--reference-audio", action="append", default=[],
                   help="reference voice recording (any common format and rate); repeat for a dialogue: the i-th "
                        "speaks the text's <|speaker:i|> turns")
    s.add_argument("--reference-text", action="append", default=[],
                   help="transcript of the reference recording (one per --reference-audio, in order)")
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

    p = sub.add_parser("plan", help="the serving memory plan (weights, KV slots, prefix cache, codec) for a machine")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="S2 checkpoint directory (config.json and weight headers are read)")
    src.add_argument("--preset", choices=["s2-pro"], help="the S2-Pro geometry, without a checkpoint")
    p.add_argument("--profile", default="gpu", choices=["cpu", "gpu"], help="serving profile (default gpu)")
    p.add_argument("--device-memory", default="auto",
                   help="memory available: 80GiB, 48GB, 143771MiB, or auto (free memory of --device now)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: the profile's)")
    p.add_argument("--runtime", choices=["torch", "trtllm"], help="default: the profile's")
    p.add_argument("--dtype", help="auto (default), float32, bfloat16 or float16")
    p.add_argument("--kv-fraction", type=float, help="share of the memory left after the fixed part that the KV "
                   "may take (default 0.85)")
    p.add_argument("--max-active", type=int, help="KV slots (default: derived from the memory)")
    p.add_argument("--max-prompt-tokens", type=int)
    p.add_argument("--max-frames", type=int, help="default 1024, or derived when --max-active is given")
    p.add_argument("--prefix-cache", help="voice-prefix cache budget (torch runtime), e.g. 256MiB")
    p.add_argument("--max-slots", type=int, help="cap on derived slots (default: the profile's)")
    p.add_argument("--codec-batch", type=int, help="codec decoder batch (default: the profile's)")
    p.set_defaults(run=_plan)
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
