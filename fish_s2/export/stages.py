"""The export stages, run in order with progress output; a stage whose outputs are newer than its inputs
(checkpoint files + the package source that shapes them) and were made with the same settings is skipped.

Output layout under ``--out``::

    onnx/fast_ar.onnx, onnx/codec_decoder.onnx, onnx/codec_encoder.onnx     (every target)
    trtllm/                  TensorRT-LLM model directory (fish_s2.trtllm.convert)
    trt/<network>.plan       TensorRT plans (target gpu, inside the build/Dockerfile image)
    manifest.json            artifacts, source checkpoint, sizes later stages need, versions, per-stage records

The manifest is rewritten after every stage, so an interrupted export resumes where it stopped.
Every stage output gets the permission bits of the checkpoint's ``config.json``: a server that can
read the checkpoint can read the export (safetensors, for one, writes its files 0600).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from . import onnx_export

TARGETS = ("cpu", "gpu")
PRECISIONS = ("fp32", "fp16", "bf16")
MANIFEST = "manifest.json"
PACKAGE = Path(__file__).resolve().parents[1]          # fish_s2/
REPO = PACKAGE.parent                                    # the source tree (the package is installed editable)
TRT_SCRIPT = REPO / "build" / "build_trt_plans.py"


@dataclass(frozen=True)
class Options:
    checkpoint: Path
    out: Path
    target: str = "cpu"
    force: bool = False
    precision: str = "fp32"      # TensorRT builder precision (the ONNX files are always fp32)
    max_batch: int = 32          # TensorRT profiles: largest batch (Triton's codec max_batch_size must fit)
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True))

    def validate(self) -> "Options":
        if not (self.checkpoint / "config.json").is_file():
            raise ValueError(f"--checkpoint: {self.checkpoint} is not an S2 checkpoint directory (no config.json)")
        if self.target not in TARGETS:
            raise ValueError(f"--target: expected one of {list(TARGETS)}, got {self.target!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision: expected one of {list(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"--max-batch: must be an integer >= 1, got {self.max_batch!r}")
        if self.out.resolve() == self.checkpoint.resolve() or self.checkpoint.resolve() in self.out.resolve().parents:
            raise ValueError(f"--out: {self.out} must be outside the checkpoint directory")
        return self


@dataclass(frozen=True)
class Result:
    outputs: list[Path]              # files written (absolute)
    note: str = ""                   # one line for the progress output
    facts: dict = field(default_factory=dict)   # per-artifact extras for the manifest (e.g. ONNX metadata)


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    run: Callable[[Options], Result]
    inputs: Callable[[Options], list[Path]]     # checkpoint files and earlier stages' outputs
    sources: tuple[str, ...]                    # package files (relative to the repository) that shape the output
    params: Callable[[Options], dict] = lambda o: {}
    gpu_only: bool = False


# ------------------------------------------------------------------------------------- stage inputs


def _dual_ar_files(o: Options) -> list[Path]:
    from ..checkpoint import weight_files

    index = o.checkpoint / "model.safetensors.index.json"
    return [o.checkpoint / "config.json", o.checkpoint / "tokenizer.json", *weight_files(o.checkpoint),
            *([index] if index.is_file() else [])]


def _codec_files(o: Options) -> list[Path]:
    yaml = o.checkpoint / "codec_config.yaml"
    return [o.checkpoint / "codec.pth", *([yaml] if yaml.is_file() else [])]


def _checkpoint_files(o: Options) -> list[Path]:
    """Everything the TensorRT-LLM converter may read: the checkpoint's files except the codec's."""
    return sorted(p for p in o.checkpoint.iterdir() if p.is_file() and p not in _codec_files(o))


def _onnx(o: Options, network: str) -> Path:
    return o.out / "onnx" / onnx_export.FILES[network]


# --------------------------------------------------------------------------------------- stage runs


def _onnx_stage(network: str) -> Callable[[Options], Result]:
    def run(o: Options) -> Result:
        done = getattr(onnx_export, f"export_{network}")(o.checkpoint, _onnx(o, network))
        return Result([done.path], done.check, {"metadata": done.metadata})
    return run


def _trtllm(o: Options) -> Result:
    from ..trtllm import convert  # imported only when this stage runs

    out = Path(convert.convert_checkpoint(o.checkpoint, o.out / "trtllm")).resolve()
    if out != (o.out / "trtllm").resolve():
        raise RuntimeError(f"convert_checkpoint wrote {out}, expected {o.out / 'trtllm'}")
    check = convert.check_conversion(o.checkpoint, out)   # reload the shards, compare a sample with the source
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return Result(files, f"{len(files)} files; check: {check}", {"check": check})


def _trt_plans(o: Options) -> Result:
    if importlib.util.find_spec("tensorrt") is None:
        raise RuntimeError("needs TensorRT's Python package (tensorrt), which is not installed here: run the gpu "
                           "target inside the image of build/Dockerfile (see build/README.md)")
    plans = load_trt_builder()
    settings = plans.ProfileSettings.for_max_batch(o.max_batch).validate()
    built = plans.build_all(o.out / "onnx", o.out / "trt", settings, o.precision, log=o.log)
    skipped = {net: why for net, why in built.items() if not isinstance(why, Path)}
    note = "; ".join(f"{net} not built: {why}" for net, why in skipped.items())
    profiles = plans.profiles(plans.read_all_metadata(o.out / "onnx"), settings)
    return Result([p for p in built.values() if isinstance(p, Path)], note,
                  {"skipped": skipped, "profiles": profiles})


def load_trt_builder():
    """build/build_trt_plans.py as a module (it lives beside the Dockerfile, outside the package)."""
    if not TRT_SCRIPT.is_file():
        raise FileNotFoundError(f"{TRT_SCRIPT} not found: the trt-plans stage runs from a source checkout "
                                "(pip install -e), as in build/Dockerfile")
    spec = importlib.util.spec_from_file_location("fish_s2_build_trt_plans", TRT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


_MODEL = ("fish_s2/config.py", "fish_s2/checkpoint.py", "fish_s2/layers.py", "fish_s2/export/onnx_export.py")
_CODEC = ("fish_s2/codec/config.py", "fish_s2/codec/network.py", "fish_s2/codec/weights.py", "fish_s2/ort_runtime.py")
STAGES: tuple[Stage, ...] = (
    Stage("onnx-fast-ar", "fast-AR residual-code loop -> onnx/fast_ar.onnx",
          _onnx_stage("fast_ar"), _dual_ar_files,
          _MODEL + ("fish_s2/fast_ar.py", "fish_s2/dual_ar.py", "fish_s2/sampling.py", "fish_s2/ort_runtime.py")),
    Stage("onnx-codec-decoder", "codec decoder -> onnx/codec_decoder.onnx",
          _onnx_stage("codec_decoder"), _codec_files,
          _MODEL + _CODEC),
    Stage("onnx-codec-encoder", "codec encoder -> onnx/codec_encoder.onnx",
          _onnx_stage("codec_encoder"), _codec_files,
          _MODEL + _CODEC),
    Stage("trtllm-checkpoint", "TensorRT-LLM model directory -> trtllm/", _trtllm, _checkpoint_files,
          ("fish_s2/config.py", "fish_s2/checkpoint.py", "fish_s2/trtllm/convert.py", "fish_s2/trtllm/hf_config.py")),
    Stage("trt-plans", "TensorRT plans from the ONNX files -> trt/", _trt_plans,
          lambda o: [_onnx(o, n) for n in onnx_export.FILES], ("build/build_trt_plans.py",),
          params=lambda o: {"precision": o.precision, "max_batch": o.max_batch}, gpu_only=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ------------------------------------------------------------------------------------------ running


def stale_reason(stage: Stage, o: Options, record: dict | None, params: dict) -> str | None:
    """Why ``stage`` must run (None: its recorded outputs are up to date)."""
    if o.force:
        return "--force"
    if not record:
        return "not built yet"
    if record.get("status") != "done":
        return f"last run {record.get('status')}"
    if record.get("params") != params:
        return "settings changed"
    outputs = [o.out / p for p in record.get("outputs", [])]
    if not outputs or not all(p.is_file() for p in outputs):
        return "outputs missing"
    inputs = stage.inputs(o) + [REPO / s for s in stage.sources if (REPO / s).is_file()]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{stage.name}: inputs missing: {missing}")
    newest = max(p.stat().st_mtime for p in inputs)
    if min(p.stat().st_mtime for p in outputs) < newest:
        return "inputs changed"
    return None


def versions() -> dict[str, str | None]:
    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"fish_s2": __version__, "python": platform.python_version(),
            **{n: dist(n) for n in ("torch", "onnx", "onnxruntime", "tensorrt", "tensorrt_llm")}}


def model_facts(checkpoint: Path) -> dict:
    """The numbers later stages and the serving side need, from the checkpoint's configs."""
    from ..checkpoint import load_config
    from ..codec import CodecConfig

    cfg, _ = load_config(checkpoint)
    codec = CodecConfig.for_checkpoint(checkpoint)
    return {"frame_length": codec.frame_length, "sample_rate": codec.sample_rate, "n_codebooks": codec.n_codebooks,
            "num_codebooks": cfg.num_codebooks, "codebook_size": cfg.codebook_size, "slow_dim": cfg.slow.dim,
            "slow_layers": cfg.slow.n_layer, "fast_dim": cfg.fast.dim, "fast_layers": cfg.fast.n_layer,
            "fast_project_in": cfg.has_fast_project_in, "semantic_begin_id": cfg.semantic_begin_id,
            "eos_id": cfg.eos_id}


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def load_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}   # a torn manifest only costs a rebuild


def run(o: Options, only: tuple[str, ...] | None = None) -> dict:
    """Run the stages (all, or ``only`` these names) and return the manifest written to ``out/manifest.json``."""
    o = dataclasses.replace(o.validate(), checkpoint=o.checkpoint.resolve(), out=o.out.resolve())
    unknown = sorted(set(only or ()) - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"--stage: unknown stage(s) {unknown}; stages are {list(STAGE_NAMES)}")
    o.out.mkdir(parents=True, exist_ok=True)
    facts = model_facts(o.checkpoint)
    old = load_manifest(o.out)
    checkpoint = str(o.checkpoint)
    records = old.get("stages", {}) if old.get("checkpoint") == checkpoint else {}
    manifest = {"format": 1, "checkpoint": checkpoint, "target": o.target, "model": facts, "versions": versions(),
                "stages": records, "artifacts": {}}
    o.log(f"export {checkpoint} -> {o.out} (target {o.target}): slow AR {facts['slow_dim']} x {facts['slow_layers']}, "
          f"fast AR {facts['fast_dim']} x {facts['fast_layers']}, codec {facts['n_codebooks']} codebooks x "
          f"{facts['frame_length']} samples at {facts['sample_rate']} Hz")
    selected = [s for s in STAGES if not only or s.name in only]
    for i, stage in enumerate(selected, 1):
        head = f"[{i}/{len(selected)}] {stage.name}:"
        if stage.gpu_only and o.target != "gpu":
            records[stage.name] = {"status": "skipped", "reason": f"target {o.target}"}
            o.log(f"{head} skipped on target {o.target} (needs TensorRT: use --target gpu inside the "
                  "build/Dockerfile image)")
            continue
        params = {"checkpoint": checkpoint, **stage.params(o)}
        reason = stale_reason(stage, o, records.get(stage.name), params)
        if reason is None:
            o.log(f"{head} up to date")
            continue
        o.log(f"{head} {stage.what} ({reason}) ...")
        records.pop(stage.name, None)
        t0 = time.perf_counter()
        try:
            result = stage.run(o)
        except Exception as e:
            records[stage.name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            _write(o.out, manifest)
            raise StageError(stage.name, e) from e
        seconds = time.perf_counter() - t0
        mode = stat.S_IMODE((o.checkpoint / "config.json").stat().st_mode)
        for p in result.outputs:
            os.chmod(p, mode)
        outputs = [str(p.relative_to(o.out)) for p in result.outputs]
        records[stage.name] = {"status": "done", "params": params, "outputs": outputs, "seconds": round(seconds, 2),
                               "note": result.note, **result.facts}
        _write(o.out, manifest)
        total = sum(p.stat().st_size for p in result.outputs)
        o.log(f"{head} done in {seconds:.1f} s ({len(outputs)} file(s), {_size(total)})"
              + (f"; {result.note}" if result.note else ""))
    manifest["artifacts"] = _artifacts(o.out, records)
    _write(o.out, manifest)
    o.log(f"wrote {o.out / MANIFEST}")
    return manifest


def _artifacts(out: Path, records: dict) -> dict:
    arts = {}
    for name, rec in records.items():
        for rel in rec.get("outputs", []) if rec.get("status") == "done" else []:
            path = out / rel
            if path.is_file():
                arts[rel] = {"stage": name, "bytes": path.stat().st_size,
                             **({"metadata": rec["metadata"]} if "metadata" in rec else {})}
    return arts


def _write(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(out / MANIFEST)


class StageError(RuntimeError):
    def __init__(self, stage: str, error: Exception):
        super().__init__(f"stage {stage} failed: {type(error).__name__}: {error}")
        self.stage = stage
