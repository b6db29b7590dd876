"""Fill the model-repository templates for a profile and a checkpoint.

    python -m fish_s2.serving.repository --profile cpu|gpu --checkpoint DIR --artifacts DIR --out DIR \\
        [--voices-dir DIR] [--gpus N] [--set engine.max_active=4 --set triton.codec_max_batch=16 ...] \\
        [--device-memory 80GiB]

Writes ``OUT/<model>/config.pbtxt`` (templates from ``model_repository/templates`` with ``${name}``
placeholders; tensor blocks rendered from :mod:`fish_s2.serving.protocol`, dims from the
checkpoint), the python models' ``model.py`` and ``OUT/serving.yaml`` (:class:`ServingConfig`), so
the repository the tests run is the one that ships. Export outputs are found under ARTIFACTS:
``onnx/codec_decoder.onnx`` and ``onnx/codec_encoder.onnx`` (ONNX Runtime codec on the CPU),
``onnx/fast_ar.onnx`` (offered to the torch engine as ``fast_ar_onnx``; ``--set fast_ar_runtime=onnx``
uses it), ``trtllm/`` (TensorRT-LLM model directory) and ``trt/codec_decoder.plan`` (GPU), as
``python -m fish_s2.export`` writes them. The engine block of serving.yaml is the one source of the
engine's limits for both runtimes; with runtime trtllm the LLM-API settings file
(``fish_s2/trtllm/llm_api.yaml`` unless ``trtllm_settings`` names another) is checked against it.
A derived ``engine.max_frames`` (null) is resolved here by the memory plan for ``--device-memory``
(default: what the configured device has free now) and that plan saved as ``OUT/memory_plan.txt``;
the derived slot count and dtype are left to dual_ar's start (``model_repository/README.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..checkpoint import load_config
from ..codec import CodecConfig
from ..export.stages import MANIFEST
from ..memory_plan import MemoryPlan, check_fits, parse_bytes
from . import protocol as p
from .config import FILE_NAME, TRITON_CODECS, ServingConfig

PLAN_FILE_NAME = "memory_plan.txt"

TEMPLATES = Path(__file__).resolve().parents[2] / "model_repository" / "templates"
MODELS = (p.TTS, p.TTS_PIPELINE, p.PREPROCESS, p.DUAL_AR, p.CODEC_DECODER, p.POSTPROCESS, p.VOICES)
PYTHON_MODELS = (p.TTS, p.PREPROCESS, p.DUAL_AR, p.CODEC_DECODER, p.POSTPROCESS, p.VOICES)


@dataclass(frozen=True)
class TritonModelSettings:
    """Scheduling settings that go into config.pbtxt rather than serving.yaml."""

    preprocess_instances: int = 1
    postprocess_instances: int = 1
    codec_instances: int = 1
    codec_max_batch: int = 8
    codec_queue_delay_us: int = 2000
    gpus: int = 1        # GPUs on the host (gpu profile): one dual_ar engine and codec_instances codecs on each


# per profile: serving.yaml settings (on top of ServingConfig's defaults) and Triton settings
PROFILE_SETTINGS = {
    # cpu: every model is its own process sharing a few cores, so one intra-op thread each (torch's
    # default of one per core oversubscribes them; loadgen measured higher throughput with 1).
    # Both: dtype auto and engine.max_active derived from the memory when dual_ar starts, up to max_slots
    "cpu": ({"device": "cpu", "runtime": "torch", "threads": 1, "max_slots": 16,
             "engine": {"max_active": None, "max_queued": 64}}, TritonModelSettings()),
    "gpu": ({"device": "cuda", "runtime": "trtllm", "max_slots": 64,
             "engine": {"max_active": None, "max_queued": 128}},
            TritonModelSettings(preprocess_instances=2, postprocess_instances=2, codec_max_batch=32,
                           codec_queue_delay_us=1000)),
}


@dataclass(frozen=True)
class Artifacts:
    root: Path

    @property
    def codec_decoder_onnx(self) -> Path:
        return self.root / "onnx" / "codec_decoder.onnx"

    @property
    def codec_encoder_onnx(self) -> Path:
        return self.root / "onnx" / "codec_encoder.onnx"

    @property
    def fast_ar_onnx(self) -> Path:
        return self.root / "onnx" / "fast_ar.onnx"

    @property
    def trtllm_dir(self) -> Path:
        return self.root / "trtllm"

    @property
    def codec_decoder_plan(self) -> Path:
        return self.root / "trt" / "codec_decoder.plan"

    @property
    def codec_encoder_plan(self) -> Path:
        return self.root / "trt" / "codec_encoder.plan"

    def encoder_plan_max_samples(self) -> int:
        """The longest audio (samples) the codec encoder plan's profile takes, as the export recorded it."""
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
            return int(manifest["stages"]["trt-plans"]["profiles"]["codec_encoder"]["audio"][2][1])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"codec_encoder_plan: {self.codec_encoder_plan} has no optimization profile recorded in "
                             f"{self.root / MANIFEST} ({type(e).__name__}: {e}); re-run the export's trt-plans stage "
                             "(make export TARGET=gpu)") from None

    def codec_plan_limits(self) -> tuple[int, int]:
        """(largest batch, longest chunk in frames) of the codec plan's optimization profile, as the export
        recorded it in manifest.json (the TensorRT backend refuses any other shape per request)."""
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
            batch, _, frames = manifest["stages"]["trt-plans"]["profiles"]["codec_decoder"]["codes"][2]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"codec_decoder_path: {self.codec_decoder_plan} has no optimization profile recorded in "
                             f"{self.root / MANIFEST} ({type(e).__name__}: {e}); re-run the export's trt-plans stage "
                             "(make export TARGET=gpu)") from None
        return int(batch), int(frames)


def serving_config(profile: str, checkpoint: Path, artifacts: Path, voices_dir: Path,
                   overrides: dict[str, object], device_memory: int | None = None
                   ) -> tuple[ServingConfig, TritonModelSettings, MemoryPlan | None]:
    """The profile's settings, with export outputs found under ``artifacts``, then ``overrides``; a
    derived ``engine.max_frames`` resolved by the memory plan (returned; None when nothing was derived
    here) for ``device_memory`` bytes (None: the memory free now on the configured device)."""
    if profile not in PROFILE_SETTINGS:
        raise ValueError(f"--profile: expected one of {sorted(PROFILE_SETTINGS)}, got {profile!r}")
    defaults, triton = PROFILE_SETTINGS[profile]
    art = Artifacts(artifacts.resolve())
    data = {**defaults, "profile": profile, "checkpoint": str(checkpoint.resolve()),
            "voices_dir": str(voices_dir.resolve())}
    if profile == "cpu":   # ONNX Runtime codec when the export exists and its runtime is installed
        ort = importlib.util.find_spec("fish_s2.ort_runtime") is not None
        onnx = ort and art.codec_decoder_onnx.is_file()
        data["codec_runtime"] = "onnx" if onnx else "torch"
        if onnx:
            data["codec_decoder_path"] = str(art.codec_decoder_onnx)
            if art.codec_encoder_onnx.is_file():
                data["codec_encoder_onnx"] = str(art.codec_encoder_onnx)
        if ort and art.fast_ar_onnx.is_file():
            data["fast_ar_onnx"] = str(art.fast_ar_onnx)
    else:
        plan = art.codec_decoder_plan.is_file()
        data["codec_runtime"] = "tensorrt" if plan else "onnxruntime"
        data["codec_decoder_path"] = str(art.codec_decoder_plan if plan else art.codec_decoder_onnx)
        data["trtllm_dir"] = str(art.trtllm_dir)
        if art.codec_encoder_plan.is_file():   # reference voices: the encoder plan, not a torch codec per instance
            data["codec_encoder_plan"] = str(art.codec_encoder_plan)
    plan_limits = art.codec_plan_limits() if data["codec_runtime"] == "tensorrt" else None
    triton_overrides = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("triton.")}
    for key in triton_overrides:
        if key not in {f.name for f in dataclasses.fields(TritonModelSettings)}:
            raise ValueError(f"triton.{key}: unknown setting")
    triton = dataclasses.replace(triton, **triton_overrides)
    if plan_limits is not None and triton.codec_max_batch > plan_limits[0]:
        raise ValueError(f"triton.codec_max_batch: {triton.codec_max_batch} exceeds the codec plan's largest batch "
                         f"{plan_limits[0]} (its profile in {art.root / MANIFEST}): lower it, or rebuild the plan with "
                         f"python -m fish_s2.export --target gpu --max-batch {triton.codec_max_batch}")
    if profile == "cpu" and triton.gpus != 1:
        raise ValueError(f"triton.gpus: the cpu profile uses no GPU, got {triton.gpus}")
    for f in dataclasses.fields(TritonModelSettings):
        value = getattr(triton, f.name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if "delay" in f.name else 1):
            raise ValueError(f"triton.{f.name}: out of range, got {value!r}")
    base = ServingConfig.from_dict({k: v for k, v in data.items() if k != "engine"})
    # the plan's profile bounds every chunk a request may ask for (checked with the final chunk plan)
    cfg = base.with_overrides({**{f"engine.{k}": v for k, v in data["engine"].items()},
                               **({} if plan_limits is None else {"codec_max_frames": plan_limits[1]}),
                               **{k: v for k, v in overrides.items() if not k.startswith("triton.")}})
    if cfg.runtime == "trtllm":   # the LLM-API settings must fit the engine block (importing no tensorrt_llm)
        from ..trtllm.settings import DEFAULT_PATH, load_trtllm_settings

        load_trtllm_settings(cfg.trtllm_settings or DEFAULT_PATH).validate(cfg.engine)
    used = {"trtllm_dir": cfg.runtime == "trtllm", "codec_decoder_path": cfg.codec_runtime != "torch",
            "codec_encoder_onnx": True, "codec_encoder_plan": True, "fast_ar_onnx": cfg.fast_ar_runtime == "onnx"}
    for name, needed in used.items():
        path = getattr(cfg, name)
        if needed and path is not None and not Path(path).exists():
            raise ValueError(f"{name}: {path} does not exist (run the export first, or override it with --set)")
    if cfg.codec_encoder_plan and Path(cfg.codec_encoder_plan) == art.codec_encoder_plan:
        max_seconds = art.encoder_plan_max_samples() / CodecConfig.for_checkpoint(cfg.checkpoint).sample_rate
        if cfg.max_reference_seconds > max_seconds:
            raise ValueError(f"max_reference_seconds: {cfg.max_reference_seconds:g} s is longer than the codec encoder "
                             f"plan takes ({max_seconds:g} s, its profile): lower it, or rebuild the plan")
    if cfg.codec_runtime == "onnxruntime" and cfg.codec_max_frames is None:   # its TensorRT provider's profile
        cfg = cfg.with_overrides({"codec_max_frames": cfg.engine.chunk_plan.longest_chunk})
    plan = None
    if cfg.engine.max_frames is None:   # a request limit: resolved once, here, for preprocess and dual_ar alike
        from .runtime import memory_plan

        plan = check_fits(memory_plan(cfg, device_memory, triton.codec_max_batch))
        cfg = cfg.with_overrides({"engine.max_frames": plan.max_frames})
    return cfg, triton, plan


def render_tensors(kind: str, specs: tuple[p.TensorSpec, ...], sizes: dict[str, int],
                   names: dict[str, str] | None = None) -> str:
    """An ``input [...]`` / ``output [...]`` block; ``names`` renames tensors (a Triton backend's own names)."""
    rows = []
    for s in specs:
        dims = ", ".join(str(sizes[d] if isinstance(d, str) else d) for d in s.dims)
        optional = " optional: true" if s.optional and kind == "input" else ""
        name = (names or {}).get(s.name, s.name)
        rows.append(f'  {{ name: "{name}" data_type: {s.config_type} dims: [ {dims} ]{optional} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]"


def _maps(pairs: list[tuple[str, str, str]]) -> str:
    return "\n".join(f'      {kind}_map {{ key: "{key}" value: "{value}" }}' for kind, key, value in pairs)


def _codec_io_names(cfg: ServingConfig) -> dict[str, str]:
    """The codec's tensor names: the protocol's for the python model, the network's own otherwise."""
    if cfg.codec_runtime not in TRITON_CODECS:
        return {}
    onnx_path = Path(cfg.codec_decoder_path).with_suffix(".onnx")
    if cfg.codec_runtime == "tensorrt":   # a plan keeps the names of the ONNX it was built from
        onnx_path = Path(cfg.codec_decoder_path).parents[1] / "onnx" / "codec_decoder.onnx"
    names = {"CODES": "codes", "AUDIO": "audio"}
    if onnx_path.is_file() and importlib.util.find_spec("onnx") is not None:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        names = {"CODES": graph.input[0].name, "AUDIO": graph.output[0].name}
    return names


def instance_groups(cfg: ServingConfig, triton: TritonModelSettings) -> dict[str, str]:
    """dual_ar and codec_decoder instance groups: on the CPU one engine; on GPUs one engine per GPU
    (``count`` is per listed GPU), each python instance taking its device from Triton
    (``model_instance_device_id``, :func:`fish_s2.serving.runtime.on_instance_device`)."""
    if not cfg.device.startswith("cuda"):
        return {"dual_ar_instance_group": "{ count: 1 kind: KIND_CPU }",
                "codec_instance_group": f"{{ count: {triton.codec_instances} kind: KIND_CPU }}"}
    gpus = ", ".join(map(str, range(triton.gpus)))
    return {"dual_ar_instance_group": f"{{ count: 1 kind: KIND_GPU gpus: [ {gpus} ] }}",
            "codec_instance_group": f"{{ count: {triton.codec_instances} kind: KIND_GPU gpus: [ {gpus} ] }}"}


def template_values(cfg: ServingConfig, triton: TritonModelSettings, sizes: dict[str, int],
                    trt_cache: Path) -> dict[str, dict[str, str]]:
    """Placeholder values per model (``trt_cache``: where ONNX Runtime's TensorRT provider keeps its engines)."""
    codec_names = _codec_io_names(cfg)
    gen = [s.name for s in p.GENERATE_INPUTS]
    common = {"serving_config": FILE_NAME, "runtime": cfg.runtime, "device": cfg.device,
              "codec_runtime": cfg.codec_runtime, **{k: str(v) for k, v in dataclasses.asdict(triton).items()},
              **instance_groups(cfg, triton)}
    io = {
        p.TTS: (p.ENTRY_INPUTS, p.TTS_OUTPUTS), p.TTS_PIPELINE: (p.PIPELINE_INPUTS, p.TTS_OUTPUTS),
        p.PREPROCESS: (p.TTS_INPUTS, p.GENERATE_INPUTS),
        p.DUAL_AR: (p.DUAL_AR_INPUTS, p.DUAL_AR_OUTPUTS), p.CODEC_DECODER: (p.CODEC_INPUTS, p.CODEC_OUTPUTS),
        p.POSTPROCESS: (p.POSTPROCESS_INPUTS, p.TTS_OUTPUTS), p.VOICES: (p.VOICES_INPUTS, p.VOICES_OUTPUTS),
    }
    values = {}
    for model, (inputs, outputs) in io.items():
        names = codec_names if model == p.CODEC_DECODER else None
        values[model] = {**common, "inputs": render_tensors("input", inputs, sizes, names),
                         "outputs": render_tensors("output", outputs, sizes, names)}
    values[p.TTS_PIPELINE].update(
        preprocess_maps=_maps([("input", s.name, s.name) for s in p.TTS_INPUTS]
                              + [("output", n, n.lower()) for n in gen]),
        dual_ar_maps=_maps([("input", n, n.lower()) for n in gen] + [("input", "REQUEST_ID", "STREAM_ID")]
                           + [("output", "CODES", "codes"), ("output", "CHUNK_META", "chunk_meta"),
                              ("output", "REQUEST_ID", "request_id")]),
        postprocess_maps=_maps([("output", s.name, s.name) for s in p.TTS_OUTPUTS]),
        codec_input=codec_names.get("CODES", "CODES"), codec_output=codec_names.get("AUDIO", "AUDIO"))
    # a codec served by a Triton backend decodes one first chunk before it reports ready (the python
    # model warms itself up in initialize)
    (codes,) = p.CODEC_INPUTS
    values[p.CODEC_DECODER]["warmup"] = (
        f'model_warmup [ {{ name: "first_chunk" batch_size: 1 inputs {{ key: "{codec_names.get("CODES", "CODES")}" '
        f'value: {{ data_type: {codes.config_type} dims: [ {sizes["codebooks"]}, '
        f'{cfg.engine.chunk_plan.first_chunk_frames} ] zero_data: true }} }} }} ]')
    values[p.CODEC_DECODER]["ort_tensorrt_parameters"] = ort_tensorrt_parameters(
        cfg, triton, codec_names.get("CODES", "CODES"), sizes["codebooks"], trt_cache)
    return values


def ort_tensorrt_parameters(cfg: ServingConfig, triton: TritonModelSettings, codes: str, n_codebooks: int,
                            cache: Path) -> str:
    """ONNX Runtime's TensorRT provider for the codec (the fallback without a plan): one optimization profile
    over the chunks requests may send (batch up to codec_max_batch, frames up to codec_max_frames), engines
    and timings cached on disk so that a restart does not rebuild them, and none built on a live request
    (the warm-up decodes a first chunk before the model reports ready)."""
    plan = cfg.engine.chunk_plan
    longest = cfg.codec_max_frames or plan.longest_chunk
    opt_frames, opt_batch = min(plan.chunk_frames + plan.context_frames, longest), min(8, triton.codec_max_batch)
    params = {"trt_engine_cache_enable": "true", "trt_engine_cache_path": str(cache),
              "trt_timing_cache_enable": "true", "trt_timing_cache_path": str(cache),
              "trt_profile_min_shapes": f"{codes}:1x{n_codebooks}x1",
              "trt_profile_opt_shapes": f"{codes}:{opt_batch}x{n_codebooks}x{opt_frames}",
              "trt_profile_max_shapes": f"{codes}:{triton.codec_max_batch}x{n_codebooks}x{longest}"}
    return " ".join(f'parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())


def generate(profile: str, checkpoint: str | Path, artifacts: str | Path, out: str | Path,
             voices_dir: str | Path | None = None, overrides: dict[str, object] | None = None,
             templates: str | Path = TEMPLATES, device_memory: int | None = None) -> ServingConfig:
    """Write the model repository; returns its serving config. ``device_memory``: the memory a derived
    ``engine.max_frames`` is planned for (None: what the configured device has free now)."""
    checkpoint, artifacts, out, templates = Path(checkpoint), Path(artifacts), Path(out), Path(templates)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"--checkpoint: {checkpoint} has no config.json")
    dual_cfg, _ = load_config(checkpoint)
    cfg, triton, plan = serving_config(profile, checkpoint, artifacts,
                                       Path(voices_dir) if voices_dir else artifacts / "voices", overrides or {},
                                       device_memory)
    sizes = {"rows": dual_cfg.frame_rows, "codebooks": dual_cfg.num_codebooks}
    values = template_values(cfg, triton, sizes, artifacts.resolve() / "trt-ep-cache")
    out.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        target = out / model
        if target.exists():
            shutil.rmtree(target)
        (target / "1").mkdir(parents=True)
        variant = f"config.{cfg.codec_runtime}.pbtxt" if model == p.CODEC_DECODER and \
            cfg.codec_runtime in TRITON_CODECS else "config.pbtxt"
        text = (templates / model / variant).read_text()
        try:
            (target / "config.pbtxt").write_text(string.Template(text).substitute(values[model]))
        except KeyError as e:
            raise ValueError(f"{templates / model / variant}: no value for placeholder {e}") from None
        if model == p.CODEC_DECODER and cfg.codec_runtime in TRITON_CODECS:
            name = "model.plan" if cfg.codec_runtime == "tensorrt" else "model.onnx"
            (target / "1" / name).symlink_to(Path(cfg.codec_decoder_path).resolve())
        elif model in PYTHON_MODELS:
            shutil.copyfile(templates / model / "1" / "model.py", target / "1" / "model.py")
    cfg.save(out / FILE_NAME)
    plan_file = out / PLAN_FILE_NAME
    if plan is not None:
        plan_file.write_text(f"# the plan that resolved engine.max_frames; dual_ar plans again when it starts\n"
                             f"{plan.to_text()}\n")
    elif plan_file.exists():
        plan_file.unlink()
    return cfg


def _parse_overrides(items: list[str]) -> dict[str, object]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fish_s2.serving.repository", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True, choices=sorted(PROFILE_SETTINGS))
    ap.add_argument("--checkpoint", required=True, help="upstream-format S2 checkpoint directory")
    ap.add_argument("--artifacts", required=True, help="export output directory")
    ap.add_argument("--out", required=True, help="model repository to write")
    ap.add_argument("--voices-dir", help="registered voices (default: ARTIFACTS/voices)")
    ap.add_argument("--gpus", type=int, help="gpu profile: GPUs on the host, one engine each (= --set triton.gpus=N)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a serving.yaml setting (engine.max_active=4) or a triton.* setting")
    ap.add_argument("--templates", default=str(TEMPLATES))
    ap.add_argument("--device-memory", help="memory a derived engine.max_frames (null) is planned for: 80GiB, "
                    "48GB, ... (default: what the configured device has free now)")
    args = ap.parse_args(argv)
    try:
        try:
            memory = None if args.device_memory is None else parse_bytes(args.device_memory)
        except ValueError as e:
            raise ValueError(f"--device-memory: {e}") from None
        overrides = _parse_overrides(args.set) | ({} if args.gpus is None else {"triton.gpus": args.gpus})
        cfg = generate(args.profile, args.checkpoint, args.artifacts, args.out, args.voices_dir, overrides,
                       args.templates, memory)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: profile {cfg.profile}, dual_ar runtime {cfg.runtime}, codec {cfg.codec_runtime}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
