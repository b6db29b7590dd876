"""python -m fish_s2.export --checkpoint DIR --out DIR [--target cpu|gpu] [--force] [--stage NAME ...]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .stages import PRECISIONS, STAGES, TARGETS, Options, StageError, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fish_s2.export",
        description="Export an S2 checkpoint: ONNX fast AR and codec, TensorRT-LLM model directory, TensorRT plans. "
                    "Stages whose outputs are up to date are skipped.",
        epilog="stages: " + "; ".join(f"{s.name} ({s.what}{', gpu only' if s.gpu_only else ''})" for s in STAGES))
    p.add_argument("--checkpoint", required=True, type=Path, help="upstream-format S2 checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--target", default="cpu", choices=TARGETS, help="cpu: ONNX + TensorRT-LLM directory; "
                   "gpu: also TensorRT plans (needs TensorRT, i.e. the build/Dockerfile image)")
    p.add_argument("--force", action="store_true", help="rebuild even up-to-date outputs")
    p.add_argument("--stage", action="append", metavar="NAME", help="run only this stage (repeatable)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="TensorRT builder precision (gpu)")
    p.add_argument("--max-batch", type=int, default=Options.max_batch,
                   help="largest batch of the TensorRT profiles (gpu; Triton's codec max_batch_size must fit)")
    args = p.parse_args(argv)
    opts = Options(checkpoint=args.checkpoint, out=args.out, target=args.target, force=args.force,
                   precision=args.precision, max_batch=args.max_batch)
    try:
        run(opts, tuple(args.stage) if args.stage else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
