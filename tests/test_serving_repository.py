"""The repository generator: every config parses, the ensemble's wiring is consistent with the models
it connects, the settings file round-trips, and overrides and bad settings are checked."""

import dataclasses
import json

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from fish_s2.request import ChunkPlan, InvalidArgument
from fish_s2.serving import protocol as p
from fish_s2.serving.adapter import check_io
from fish_s2.serving.config import FILE_NAME, ServingConfig
from fish_s2.serving.repository import MODELS, PROFILE_SETTINGS, PYTHON_MODELS, generate, main
from fish_s2.serving.runtime import memory_plan
from fish_s2.trtllm.settings import DEFAULT_PATH, load_trtllm_settings

PROTOCOL_IO = {p.TTS: (p.ENTRY_INPUTS, p.TTS_OUTPUTS), p.PREPROCESS: (p.TTS_INPUTS, p.GENERATE_INPUTS),
               p.DUAL_AR: (p.DUAL_AR_INPUTS, p.DUAL_AR_OUTPUTS),
               p.CODEC_DECODER: (p.CODEC_INPUTS, p.CODEC_OUTPUTS), p.POSTPROCESS: (p.POSTPROCESS_INPUTS, p.TTS_OUTPUTS),
               p.VOICES: (p.VOICES_INPUTS, p.VOICES_OUTPUTS)}


def _configs(repo):
    return {m: text_format.Parse((repo / m / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
            for m in MODELS}


def _check_ensemble(configs):
    """Every mapped name exists on its model, every consumed tensor is produced earlier with the same type."""
    tts = configs[p.TTS_PIPELINE]
    available = {t.name: t.data_type for t in tts.input}
    produced = {value for step in tts.ensemble_scheduling.step for value in step.output_map.values()}
    assert not produced & set(available), "a step output reuses an ensemble input's name"
    for step in tts.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs = {t.name: t for t in model.input}
        outputs = {t.name: t for t in model.output}
        for key, value in step.input_map.items():
            assert key in inputs, (step.model_name, key)
            assert value in available, (step.model_name, value)
            assert available[value] == inputs[key].data_type, (step.model_name, key)
        required = {n for n, t in inputs.items() if not t.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        for key, value in step.output_map.items():
            assert key in outputs, (step.model_name, key)
            available[value] = outputs[key].data_type
    for out in tts.output:
        assert available.get(out.name) == out.data_type, out.name


def test_cpu_repository(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    cfg = generate("cpu", tiny_checkpoint, tmp_path / "art", repo, overrides={"engine.max_active": 3})
    configs = _configs(repo)
    _check_ensemble(configs)
    for model in PYTHON_MODELS:
        assert configs[model].backend == "python" and (repo / model / "1" / "model.py").is_file()
        as_dict = json_format.MessageToDict(configs[model], preserving_proto_field_name=True)
        check_io(as_dict, *PROTOCOL_IO[model])             # what each model checks when it loads
        assert configs[model].parameters["serving_config"].string_value == FILE_NAME
    assert configs[p.DUAL_AR].model_transaction_policy.decoupled
    dims = {t.name: list(t.dims) for t in configs[p.DUAL_AR].input}
    assert dims["PROMPT"] == [11, -1]                       # rows from the checkpoint (10 codebooks + 1)
    codec = configs[p.CODEC_DECODER]
    assert codec.max_batch_size == 8 and codec.dynamic_batching.preserve_ordering
    loaded = ServingConfig.load(repo / FILE_NAME)
    assert loaded == cfg and loaded.engine.max_active == 3 and loaded.codec_runtime == "torch"
    assert loaded.voices_dir == str((tmp_path / "art" / "voices").resolve())


def test_regenerating_replaces_the_models(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    generate("cpu", tiny_checkpoint, tmp_path, repo)
    (repo / p.DUAL_AR / "1" / "stale.py").write_text("")
    generate("cpu", tiny_checkpoint, tmp_path, repo, overrides={"triton.codec_max_batch": 2})
    assert not (repo / p.DUAL_AR / "1" / "stale.py").exists()
    assert _configs(repo)[p.CODEC_DECODER].max_batch_size == 2


def _onnx_identity(path, inp, out):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", [inp], [out])], "g",
                              [helper.make_tensor_value_info(inp, TensorProto.INT64, [None, 10, None])],
                              [helper.make_tensor_value_info(out, TensorProto.INT64, [None, 10, None])])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))


def _record_codec_profile(art, batch: int, frames: int, encoder_samples: int = 30 * 44100) -> None:
    """What the export's trt-plans stage records in manifest.json: the codec plans' (min, opt, max) shapes."""
    profiles = {"codec_decoder": {"codes": [[1, 10, 1], [8, 10, min(50, frames)], [batch, 10, frames]]},
                "codec_encoder": {"audio": [[1, 2048], [1, 10 * 44100], [4, encoder_samples]]}}
    (art / "manifest.json").write_text(json.dumps({"stages": {"trt-plans": {"status": "done", "profiles": profiles}}}))


def test_gpu_repository(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnx")
    art = tmp_path / "art"
    (art / "trtllm").mkdir(parents=True)
    _onnx_identity(art / "onnx" / "codec_decoder.onnx", "codes_in", "audio_out")
    repo = tmp_path / "repo"
    cfg = generate("gpu", tiny_checkpoint, art, repo)        # no plan yet: ONNX Runtime backend
    assert (cfg.runtime, cfg.codec_runtime, cfg.device) == ("trtllm", "onnxruntime", "cuda")
    engine = PROFILE_SETTINGS["gpu"][0]["engine"]             # the profile's own limits, for either runtime
    assert (cfg.engine.max_active, cfg.engine.max_queued) == (None, engine["max_queued"])   # slots: derived
    assert (cfg.dtype, cfg.max_slots, cfg.kv_memory_fraction) == ("auto", 64, 0.85)
    plan = memory_plan(cfg, 80 << 30, 32)                      # what dual_ar plans when it starts
    resolved = dataclasses.replace(cfg.engine, **plan.engine_settings())
    kw = load_trtllm_settings(DEFAULT_PATH).llm_kwargs(resolved, plan.trtllm_kv_cache()["kv_cache"])
    assert kw["max_batch_size"] == plan.max_active == 64 and kw["max_seq_len"] == cfg.engine.max_seq_len == 3072
    assert kw["kv_cache_config"]["max_tokens"] == 64 * 3072 and kw["kv_cache_config"]["free_gpu_memory_fraction"] == 0.85
    short = generate("gpu", tiny_checkpoint, art, repo, overrides={"engine.max_frames": 50})
    assert short.engine.max_frames == 50
    with pytest.raises(ValueError, match="max_prompt_tokens.*max_num_tokens"):   # checked against llm_api.yaml
        generate("gpu", tiny_checkpoint, art, repo, overrides={"engine.max_prompt_tokens": 9000})
    torch_cfg = generate("gpu", tiny_checkpoint, art, tmp_path / "torch", overrides={"runtime": "torch"})
    assert torch_cfg.engine == cfg.engine
    configs = _configs(repo)
    _check_ensemble(configs)
    codec = configs[p.CODEC_DECODER]
    assert codec.backend == "onnxruntime" and [t.name for t in codec.input] == ["codes_in"]
    (warmup,) = codec.model_warmup                            # a first chunk before the backend reports ready
    assert warmup.batch_size == 1 and list(warmup.inputs["codes_in"].dims) == [10, 4]
    assert warmup.inputs["codes_in"].zero_data and warmup.inputs["codes_in"].data_type == codec.input[0].data_type
    assert configs[p.DUAL_AR].parameters["codec_max_batch"].string_value == "32"   # for dual_ar's memory plan
    (trt,) = codec.optimization.execution_accelerators.gpu_execution_accelerator   # no engine built on a request:
    assert trt.name == "tensorrt" and trt.parameters["trt_engine_cache_enable"] == "true"   # cached, one profile
    assert trt.parameters["trt_engine_cache_path"] == str((art / "trt-ep-cache").resolve())
    assert trt.parameters["trt_profile_max_shapes"] == "codes_in:32x10x50" == f"codes_in:32x10x{cfg.codec_max_frames}"
    assert trt.parameters["trt_profile_min_shapes"] == "codes_in:1x10x1"
    assert (repo / p.CODEC_DECODER / "1" / "model.onnx").resolve() == (art / "onnx" / "codec_decoder.onnx").resolve()
    (art / "trt").mkdir()
    (art / "trt" / "codec_decoder.plan").write_bytes(b"plan")
    with pytest.raises(ValueError, match="codec_decoder_path: .* has no optimization profile recorded"):
        generate("gpu", tiny_checkpoint, art, repo)
    _record_codec_profile(art, batch=64, frames=50)
    (art / "trt" / "codec_encoder.plan").write_bytes(b"plan")   # reference voices: encoded with it
    cfg = generate("gpu", tiny_checkpoint, art, repo, overrides={"triton.codec_max_batch": 64})
    assert cfg.codec_encoder_plan == str((art / "trt" / "codec_encoder.plan").resolve())
    _record_codec_profile(art, batch=64, frames=50, encoder_samples=10 * 44100)
    with pytest.raises(ValueError, match="max_reference_seconds: 30 s is longer than the codec encoder plan takes"):
        generate("gpu", tiny_checkpoint, art, repo)
    assert generate("gpu", tiny_checkpoint, art, repo, overrides={"max_reference_seconds": 10}).codec_encoder_plan
    _record_codec_profile(art, batch=64, frames=50)
    cfg = generate("gpu", tiny_checkpoint, art, repo, overrides={"triton.codec_max_batch": 64})
    codec = _configs(repo)[p.CODEC_DECODER]
    assert cfg.codec_runtime == "tensorrt" and codec.platform == "tensorrt_plan" and codec.max_batch_size == 64
    assert cfg.codec_max_frames == 50 and ServingConfig.load(repo / "serving.yaml").codec_max_frames == 50
    with pytest.raises(InvalidArgument, match="chunk_frames: a chunk of 65 frames with its context exceeds the "
                                              "codec's limit of 50"):   # refused when the request arrives
        cfg.limits().check_plan(ChunkPlan(4, 40, 25))
    with pytest.raises(ValueError, match="triton.codec_max_batch: 128 exceeds the codec plan's largest batch 64"):
        generate("gpu", tiny_checkpoint, art, repo, overrides={"triton.codec_max_batch": 128})
    _record_codec_profile(art, batch=64, frames=40)          # a plan that cannot take the default chunks
    with pytest.raises(ValueError, match="engine.chunk_plan.chunk_frames: a chunk of 50 frames .* limit of 40"):
        generate("gpu", tiny_checkpoint, art, repo)
    assert generate("gpu", tiny_checkpoint, art, repo, overrides={"engine.chunk_plan.chunk_frames": 15}
                    ).codec_max_frames == 40
    _record_codec_profile(art, batch=64, frames=50)
    assert [t.name for t in codec.output] == ["audio_out"]   # names of the network the plan was built from
    assert list(codec.model_warmup[0].inputs["codes_in"].dims) == [10, 4]
    assert (repo / p.CODEC_DECODER / "1" / "model.plan").is_symlink()
    assert not (repo / p.CODEC_DECODER / "1" / "model.py").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"engine.max_activ": 3}, "engine.max_activ: unknown setting"),
    ({"engine.max_active": "many"}, "engine.max_active: expected int"),
    ({"engine.chunk_plan.first_chunk_frames": 0}, "first_chunk_frames: must be in"),
    ({"runtime": "trtllm"}, "runtime: the cpu profile needs 'torch'"),
    ({"codec_runtime": "onnx"}, "codec_decoder_path: required"),
    ({"codec_runtime": "tensorrt"}, "codec_runtime: expected one of"),
    ({"triton.codec_instances": 0}, "triton.codec_instances: out of range"),
    ({"triton.nope": 1}, "triton.nope: unknown setting"),
])
def test_bad_settings_are_named(tiny_checkpoint, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        generate("cpu", tiny_checkpoint, tmp_path, tmp_path / "repo", overrides=overrides)


def test_cli(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["--profile", "cpu", "--checkpoint", str(tiny_checkpoint), "--artifacts", str(tmp_path),
                 "--out", str(out), "--set", "engine.max_frames=64", "--set", "threads=1"]) == 0
    assert ServingConfig.load(out / FILE_NAME).engine.max_frames == 64
    assert main(["--profile", "cpu", "--checkpoint", str(tmp_path), "--artifacts", str(tmp_path),
                 "--out", str(out)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["--profile", "cpu", "--checkpoint", str(tiny_checkpoint), "--artifacts", str(tmp_path),
                 "--out", str(out), "--set", "gpu"]) == 2


def test_serving_config_file_errors(tmp_path):
    path = tmp_path / FILE_NAME
    path.write_text(json.dumps({"checkpoint": "c", "voices_dir": "v", "colour": 1}))
    with pytest.raises(ValueError, match="colour: unknown setting"):
        ServingConfig.load(path)
    path.write_text("- a list")
    with pytest.raises(ValueError, match="expected a mapping"):
        ServingConfig.load(path)


def _instance_group(config):
    return [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus)) for g in config.instance_group]


def test_multi_gpu_host_gets_one_engine_and_codec_per_gpu(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnx")
    art = tmp_path / "art"
    (art / "trtllm").mkdir(parents=True)
    _onnx_identity(art / "onnx" / "codec_decoder.onnx", "codes_in", "audio_out")
    repo = tmp_path / "repo"
    generate("gpu", tiny_checkpoint, art, repo)                              # one GPU by default
    configs = _configs(repo)
    assert _instance_group(configs[p.DUAL_AR]) == [(1, "KIND_GPU", [0])]
    assert main(["--profile", "gpu", "--checkpoint", str(tiny_checkpoint), "--artifacts", str(art),
                 "--out", str(repo), "--gpus", "4", "--set", "triton.codec_instances=2"]) == 0
    configs = _configs(repo)
    assert _instance_group(configs[p.DUAL_AR]) == [(1, "KIND_GPU", [0, 1, 2, 3])]      # count is per listed GPU
    assert _instance_group(configs[p.CODEC_DECODER]) == [(2, "KIND_GPU", [0, 1, 2, 3])]
    assert _instance_group(configs[p.PREPROCESS])[0][1] == "KIND_CPU"
    torch_codec = generate("gpu", tiny_checkpoint, art, tmp_path / "torch", overrides={
        "runtime": "torch", "codec_runtime": "torch", "triton.gpus": 2})       # the python codec, per GPU too
    assert torch_codec.codec_runtime == "torch"
    assert _instance_group(_configs(tmp_path / "torch")[p.CODEC_DECODER]) == [(1, "KIND_GPU", [0, 1])]
    cpu = generate("cpu", tiny_checkpoint, tmp_path, tmp_path / "cpu")
    assert cpu.device == "cpu" and _instance_group(_configs(tmp_path / "cpu")[p.DUAL_AR]) == [(1, "KIND_CPU", [])]
    with pytest.raises(ValueError, match="triton.gpus: the cpu profile uses no GPU"):
        generate("cpu", tiny_checkpoint, tmp_path, tmp_path / "cpu", overrides={"triton.gpus": 2})
    with pytest.raises(ValueError, match="triton.gpus: out of range"):
        generate("gpu", tiny_checkpoint, art, repo, overrides={"triton.gpus": 0})


def test_tensor_parallel_size_is_an_llm_setting(tiny_checkpoint, tmp_path):
    import yaml

    from fish_s2.engine.config import EngineConfig

    data = yaml.safe_load(DEFAULT_PATH.read_text())
    budget = {"free_gpu_memory_fraction": 0.7, "max_tokens": 16 * 3072}   # the memory plan's KV budget
    assert load_trtllm_settings(DEFAULT_PATH).llm_kwargs(EngineConfig(), budget)["tensor_parallel_size"] == 1
    tp2 = tmp_path / "tp2.yaml"
    tp2.write_text(yaml.safe_dump({**data, "tensor_parallel_size": 2}))
    (tmp_path / "art" / "trtllm").mkdir(parents=True)
    with pytest.raises(ValueError, match="tensor_parallel_size: 2 needs TensorRT-LLM's multi-process"):
        generate("gpu", tiny_checkpoint, tmp_path / "art", tmp_path / "repo",
                 overrides={"trtllm_settings": str(tp2), "codec_runtime": "torch"})


def test_instance_device(monkeypatch, tmp_path):
    import torch

    from fish_s2.serving.runtime import on_instance_device

    cfg = ServingConfig(checkpoint="c", voices_dir="v", profile="gpu", device="cuda", runtime="torch")
    assert on_instance_device(cfg, {"model_instance_kind": "CPU", "model_instance_device_id": "0"}) is cfg
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert on_instance_device(cfg, {"model_instance_kind": "GPU", "model_instance_device_id": "3"}).device == "cuda:3"
    assert current == [3]
