"""Build TensorRT plans from the exported ONNX files, inside the image of build/Dockerfile.

    python build/build_trt_plans.py --onnx-dir ART/onnx --out-dir ART/trt [--precision fp32|fp16|bf16]
        [--max-batch 32] [--opt-batch 8] [--dry-run]

(``python -m fish_s2.export --target gpu`` runs this as its ``trt-plans`` stage.)

One optimization profile per plan, min/opt/max over the dynamic axes, from :func:`profiles` (a pure
function of the files' metadata and :class:`ProfileSettings`; ``--dry-run`` prints it without TensorRT):

* codec_decoder: batch 1/opt/max x frames 1 / chunk+context / the longest chunk the streaming chunker
  emits (first or steady chunk + left context, from :class:`fish_s2.request.ChunkPlan`).
* codec_encoder: batch 1/1/encoder_max_batch x samples one frame / 10 s / 30 s (opt <= max, both capped
  by the file's max_samples), for reference audio.
* fast_ar: batch 1/opt/max. Not built while codebook_size > 3840: TensorRT's TopK takes k <= 3840
  (TensorRT operator docs, TopK) and the graph sorts all codes for upstream top-p. ONNX Runtime runs
  that graph; the GPU engine runs the fast AR in torch inside its decode step.

Precision: the ONNX files are fp32; fp16/bf16 are TensorRT builder flags on a weakly typed network
(TensorRT 10.x; deprecated since 10.12 and removed in 11, where precision moves into the graph).
Plans are specific to the GPU model and the TensorRT version that built them.

Written against the TensorRT 10.14 Python API (build/versions.env); not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fish_s2.export.onnx_export import FAST_AR_INPUTS, FILES, read_metadata
from fish_s2.request import ChunkPlan

PRECISIONS = ("fp32", "fp16", "bf16")
TOPK_MAX_K = 3840  # TensorRT TopK: k <= 3840
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]   # input name -> (min, opt, max)

_CHUNKS = ChunkPlan()


@dataclass(frozen=True)
class ProfileSettings:
    max_batch: int = 32                 # >= Triton's codec max_batch_size (gpu profile: 32)
    opt_batch: int = 8
    decoder_opt_frames: int = _CHUNKS.chunk_frames + _CHUNKS.context_frames
    decoder_max_frames: int = _CHUNKS.longest_chunk
    encoder_max_batch: int = 4
    encoder_opt_seconds: float = 10.0
    encoder_max_seconds: float = 30.0
    workspace_gib: int = 8

    @classmethod
    def for_max_batch(cls, max_batch: int) -> "ProfileSettings":
        return cls(max_batch=max_batch, opt_batch=min(cls.opt_batch, max_batch))

    def validate(self) -> "ProfileSettings":
        ints = ("max_batch", "opt_batch", "decoder_opt_frames", "decoder_max_frames", "encoder_max_batch",
                "workspace_gib")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.opt_batch > self.max_batch:
            raise ValueError(f"opt_batch: must be <= max_batch {self.max_batch}, got {self.opt_batch}")
        if self.decoder_opt_frames > self.decoder_max_frames:
            raise ValueError(f"decoder_opt_frames: must be <= decoder_max_frames {self.decoder_max_frames}, "
                             f"got {self.decoder_opt_frames}")
        for name in ("encoder_opt_seconds", "encoder_max_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        return self


def skip_reason(network: str, meta: dict[str, str]) -> str | None:
    """Why a network gets no plan (None: it is built)."""
    if network == "fast_ar" and int(meta["codebook_size"]) > TOPK_MAX_K:
        return (f"its sampling sorts all {meta['codebook_size']} codes and TensorRT's TopK takes k <= {TOPK_MAX_K}; "
                "it runs in ONNX Runtime, and in torch inside the GPU engine")
    return None


def _frames(samples: float, frame_length: int) -> int:
    return max(1, math.ceil(samples / frame_length))


def profiles(meta: dict[str, dict[str, str]], s: ProfileSettings) -> dict[str, Profile]:
    """Profiles of the networks in ``meta`` (network -> its ONNX metadata_props) that get a plan."""
    s = s.validate()
    out: dict[str, Profile] = {}
    for network, m in meta.items():
        if skip_reason(network, m):
            continue
        b = (1, s.opt_batch, s.max_batch)
        if network == "codec_decoder":
            n, limit = int(m["n_codebooks"]), int(m["max_frames"])
            hi = min(s.decoder_max_frames, limit) if limit else s.decoder_max_frames
            f = (1, min(s.decoder_opt_frames, hi), hi)
            out[network] = {"codes": tuple((b[i], n, f[i]) for i in range(3))}
        elif network == "codec_encoder":
            fl, sr, limit = int(m["frame_length"]), int(m["sample_rate"]), int(m["max_samples"])
            hi = _frames(s.encoder_max_seconds * sr, fl) * fl
            hi = min(hi, limit) if limit else hi
            opt = min(_frames(s.encoder_opt_seconds * sr, fl) * fl, hi)
            eb = (1, 1, s.encoder_max_batch)
            out[network] = {"audio": tuple((eb[i], (fl, opt, hi)[i]) for i in range(3))}
        elif network == "fast_ar":
            n, V, dim = int(m["num_codebooks"]), int(m["codebook_size"]), int(m["slow_dim"])
            tail = {"hidden": (dim,), "main": (), "temperature": (), "top_p": (), "top_k": (), "noise": (n - 1, V)}
            out[network] = {name: tuple((b[i], *tail[name]) for i in range(3)) for name in FAST_AR_INPUTS}
        else:
            raise ValueError(f"metadata: unknown network {network!r}")
    return out


def read_all_metadata(onnx_dir: Path) -> dict[str, dict[str, str]]:
    """network -> metadata_props of each exported file present in ``onnx_dir``."""
    found = {net: read_metadata(onnx_dir / name) for net, name in FILES.items() if (onnx_dir / name).is_file()}
    if not found:
        raise FileNotFoundError(f"{onnx_dir}: none of {sorted(FILES.values())} (run python -m fish_s2.export first)")
    return found


def build_plan(onnx_path: Path, plan_path: Path, profile: Profile, precision: str, workspace_gib: int) -> None:
    """Parse one ONNX file and serialize its plan (TensorRT 10 Python API)."""
    import tensorrt as trt

    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  {errors}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profile):
        raise RuntimeError(f"{onnx_path}: inputs {sorted(names)} do not match the profile's {sorted(profile)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build a plan (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".plan.tmp")
    with open(tmp, "wb") as f:
        f.write(plan)
    tmp.replace(plan_path)


def build_all(onnx_dir: Path, out_dir: Path, settings: ProfileSettings, precision: str,
              log: Callable[[str], None] = print) -> dict[str, Path | str]:
    """Build every plan; returns network -> plan path, or the reason it was not built."""
    meta = read_all_metadata(onnx_dir)
    plans = profiles(meta, settings)
    result: dict[str, Path | str] = {}
    for network, m in meta.items():
        why = skip_reason(network, m)
        if why:
            log(f"  {network}: not built ({why})")
            result[network] = why
            continue
        path = out_dir / f"{network}.plan"
        log(f"  {network}: building {path.name} ({precision}) ...")
        build_plan(onnx_dir / FILES[network], path, plans[network], precision, settings.workspace_gib)
        result[network] = path
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx-dir", type=Path, required=True, help="the export's onnx/ directory")
    p.add_argument("--out-dir", type=Path, help="where the plans go (required unless --dry-run)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--max-batch", type=int, default=ProfileSettings.max_batch)
    p.add_argument("--opt-batch", type=int, default=None, help=f"default: min({ProfileSettings.opt_batch}, max batch)")
    p.add_argument("--decoder-opt-frames", type=int, default=ProfileSettings.decoder_opt_frames)
    p.add_argument("--decoder-max-frames", type=int, default=ProfileSettings.decoder_max_frames,
                   help="longest codec chunk (context + new frames) the decoder plan accepts")
    p.add_argument("--encoder-max-seconds", type=float, default=ProfileSettings.encoder_max_seconds)
    p.add_argument("--dry-run", action="store_true", help="print the profiles as JSON; TensorRT is not imported")
    args = p.parse_args(argv)
    try:
        settings = dataclasses.replace(
            ProfileSettings.for_max_batch(args.max_batch), decoder_opt_frames=args.decoder_opt_frames,
            decoder_max_frames=args.decoder_max_frames, encoder_max_seconds=args.encoder_max_seconds,
            **({} if args.opt_batch is None else {"opt_batch": args.opt_batch}))
        meta = read_all_metadata(args.onnx_dir)
        if args.dry_run:
            plans = profiles(meta, settings)
            print(f"precision {args.precision}; profiles (min / opt / max):")
            for network, profile in plans.items():
                for name, shapes in profile.items():
                    print(f"  {network}.{name}: " + " / ".join(json.dumps(list(s)) for s in shapes))
            for network, m in meta.items():
                if why := skip_reason(network, m):
                    print(f"  {network}: no plan ({why})")
            return 0
        if args.out_dir is None:
            raise ValueError("--out-dir: required unless --dry-run")
        build_all(args.onnx_dir, args.out_dir, settings, args.precision)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
