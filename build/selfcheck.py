"""Self check of the GPU image: run inside the image of build/Dockerfile, on one GPU, in under 5 minutes.

    python3 build/selfcheck.py [--out DIR] [--only CHECK ...] [--budget-s 290] [--dry-run]    (make selfcheck)

Prints one JSON object (checks, tolerances, versions) and exits 1 if any check failed. The checks, in order:

  api          (a) the TensorRT-LLM signatures and attributes fish_s2.trtllm relies on
               (fish_s2/trtllm/api_contract.py) against the installed package
  export       a tiny checkpoint through ``python -m fish_s2.export --target gpu`` (what ``make export
               TARGET=gpu`` runs): ONNX files, TensorRT-LLM model directory, TensorRT plans
  parity       (b) the LLM built from that directory against the PyTorch model, same seeds: every frame
               equals the reference loop's frame from the same hidden state, bit for bit, and each hidden
               state is the torch slow AR's (teacher-forced on the same frames) within the bf16 tolerance;
               CUDA graphs on and off give bit-identical outputs; codes rows line up with token ids
  prefix_reuse (c) the same voice twice reuses KV blocks; the same token ids with other residual codes reuse none
  serve        (d) the gpu model repository served by the image's tritonserver, one request streamed by the client
  codec_plan   (e) the codec decoder plan against the ONNX model in ONNX Runtime

``--dry-run`` runs what needs no GPU, TensorRT or TensorRT-LLM: the arguments, the export with ``--target
cpu`` and the expected-signature table; every other check reports "skipped (dry run)".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CHECKS = ("api", "export", "parity", "prefix_reuse", "serve", "codec_plan")
DRY = "skipped (dry run)"
TOLERANCES = {
    "frames": "bit-identical to the reference loop (fish_s2.generate.generate) run from the LLM's own hidden "
              "states, for requests decoded alone (same batch shapes as the reference)",
    "hidden_rel_l2": 0.03,  # bf16 slow AR: TensorRT-LLM's attention/GEMM kernels round differently from torch's
    "cuda_graphs": "token ids, codes and hidden states bit-identical with CUDA graphs on and off",
    "codec_plan_rel_max_abs": 1e-2,  # fp32 plan; TensorRT may run fp32 matmuls/convolutions as TF32
    "codec_encoder_plan_min_equal": 0.99,   # share of equal codes (TF32 may move a code across a quantizer edge)
    "free_running": "frames of free-running requests vs the reference are reported, not gated (a bf16 rounding "
                    "difference flips a draw and everything after it)",
}
MAX_FRAMES = 16


class Failed(Exception):
    """A check's outcome is wrong; ``detail`` goes into the JSON."""

    def __init__(self, message: str, detail: dict | None = None):
        super().__init__(message)
        self.detail = detail or {}


class SelfCheck:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.checkpoint = Path(args.checkpoint) if args.checkpoint else self.out / "tiny-checkpoint"
        self.export_dir = self.out / "export"
        self.t0 = time.monotonic()
        self._runs: dict | None = None

    # ------------------------------------------------------------------ running

    def run(self) -> dict:
        results = {}
        for name in self.args.only or CHECKS:
            t = time.monotonic()
            if self.args.dry_run and name != "export":
                detail = {"expected": self._expected_api()} if name == "api" else {}
                results[name] = {"status": DRY, **detail}
                continue
            try:
                if time.monotonic() - self.t0 > self.args.budget_s:
                    raise Failed(f"out of the {self.args.budget_s:.0f} s budget before this check started")
                detail = getattr(self, f"check_{name}")() or {}
                results[name] = {"status": "passed", **detail}
            except Failed as e:
                results[name] = {"status": "failed", "error": str(e), **e.detail}
            except Exception as e:  # noqa: BLE001 - every error becomes this check's failure
                results[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc(limit=6).splitlines()[-12:]}
            results[name]["seconds"] = round(time.monotonic() - t, 1)
        ok = all(r["status"] in ("passed", DRY) for r in results.values())
        return {"ok": ok, "dry_run": self.args.dry_run, "seconds": round(time.monotonic() - self.t0, 1),
                "versions": versions(), "tolerances": TOLERANCES, "checks": results}

    @staticmethod
    def _expected_api() -> list[dict]:
        from fish_s2.trtllm.api_contract import table

        return table()

    # ------------------------------------------------------------------ (a)

    def check_api(self) -> dict:
        from fish_s2.trtllm.api_contract import check

        result = check()
        failed = [r for r in result["entries"] if not r["ok"]]
        absent = [r["target"] for r in result["entries"] if r["optional"] and r["missing"]]
        detail = {"entries": len(result["entries"]), "failed": failed, "optional_absent": absent,
                  "resource_manager_gaps": result["resource_manager_gaps"]}
        if not result["ok"]:
            raise Failed(f"{len(failed)} API expectation(s) not met by the installed tensorrt_llm", detail)
        return detail

    # ------------------------------------------------------------------ export

    def check_export(self) -> dict:
        if not (self.checkpoint / "config.json").is_file():
            from fish_s2.tiny import write_tiny_checkpoint

            write_tiny_checkpoint(self.checkpoint, seed=0)
        target = "cpu" if self.args.dry_run else "gpu"
        cmd = [sys.executable, "-m", "fish_s2.export", "--checkpoint", str(self.checkpoint), "--out",
               str(self.export_dir), "--target", target]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise Failed(f"export exited with {done.returncode}", {"log_tail": (done.stdout + done.stderr)[-3000:]})
        manifest = json.loads((self.export_dir / "manifest.json").read_text())
        stages = {k: v.get("status") for k, v in manifest["stages"].items()}
        wanted = {"onnx-fast-ar", "onnx-codec-decoder", "onnx-codec-encoder", "trtllm-checkpoint"} | \
            ({"trt-plans"} if target == "gpu" else set())
        if any(stages.get(s) != "done" for s in wanted):
            raise Failed("export stages not done", {"stages": stages})
        if target == "gpu" and not (self.export_dir / "trt" / "codec_decoder.plan").is_file():
            raise Failed("no trt/codec_decoder.plan", {"stages": stages})
        return {"target": target, "command": " ".join(cmd[1:]), "stages": stages,
                "artifacts": sorted(manifest["artifacts"])}

    # ------------------------------------------------------------------ (b), (c): TensorRT-LLM runs

    def check_parity(self) -> dict:
        runs, ref = self.runs(), self.reference()
        rows, worst = [], 0.0
        for name, out in [*runs["on"]["alone"].items(), *runs["on"]["batch"].items()]:
            req = runs["requests"][name]
            row = compare(ref, req, out, exact=name in runs["on"]["alone"])
            worst = max(worst, row["hidden_rel_l2"])
            rows.append({"request": name, **row})
        graphs = {name: identical(out, runs["off"]["alone"][name]) for name, out in runs["on"]["alone"].items()}
        detail = {"requests": rows, "hidden_rel_l2_max": worst, "cuda_graphs_identical": graphs,
                  "graph_batch_sizes": runs["graph_batch_sizes"], "dtype": str(ref.config.dtype)}
        bad = [r["request"] for r in rows if not (r["aligned"] and r["replay_equal"] is not False
                                                  and r["hidden_rel_l2"] <= TOLERANCES["hidden_rel_l2"])]
        if bad or not all(graphs.values()):
            raise Failed(f"parity failed for {bad or 'CUDA graphs on/off'}", detail)
        return detail

    def check_prefix_reuse(self) -> dict:
        runs = self.runs()["on"]["alone"]
        cached = {name: runs[name]["cached_tokens"] for name in ("voice_a_1", "voice_a_2", "voice_b_same_ids")}
        reused = {name: runs[name]["reused_blocks"] for name in cached}
        detail = {"cached_tokens": cached, "reused_blocks": reused, "tokens_per_block": self.runs()["tokens_per_block"]}
        if not cached["voice_a_2"] or cached["voice_a_2"] < self.runs()["tokens_per_block"]:
            raise Failed("the second request of a voice reused no KV block", detail)
        if cached["voice_b_same_ids"]:
            raise Failed("a voice with the same token ids but other residual codes reused KV blocks", detail)
        return detail

    def reference(self):
        if not hasattr(self, "_reference"):
            import torch

            from fish_s2.checkpoint import S2Checkpoint

            self._reference = S2Checkpoint.load(self.checkpoint, dtype=torch.bfloat16, device="cuda")
        return self._reference

    def runs(self) -> dict:
        """Every TensorRT-LLM request, run once: an LLM with CUDA graphs (requests decoded alone, in order,
        then all at once) and one without (the same requests alone)."""
        if isinstance(self._runs, Exception):
            raise Failed(f"the TensorRT-LLM runs failed: {type(self._runs).__name__}: {self._runs}")
        if self._runs is None:
            if not (self.export_dir / "trtllm" / "config.json").is_file():
                raise Failed(f"no TensorRT-LLM model directory under {self.export_dir}: run the export check first")
            try:
                self._runs = trtllm_runs(self.reference(), self.export_dir / "trtllm", self.out)
            except Exception as e:
                self._runs = e
                raise
        return self._runs

    # ------------------------------------------------------------------ (d)

    def check_serve(self) -> dict:
        import numpy as np

        from fish_s2.client import TTSClient
        from fish_s2.serving.server import TritonServer

        repo = self.out / "model_repository"
        settings = write_settings(self.out / "llm_api.yaml")
        cmd = [sys.executable, "-m", "fish_s2.serving.repository", "--profile", "gpu", "--checkpoint",
               str(self.checkpoint), "--artifacts", str(self.export_dir), "--out", str(repo), "--set",
               f"trtllm_settings={settings}"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise Failed("model repository not written", {"log_tail": (done.stdout + done.stderr)[-3000:]})
        http, grpc, metrics = free_ports(3)
        server = TritonServer(repo, self.out / "triton-run", http, grpc, metrics,
                              tritonserver=Path("/opt/tritonserver/bin/tritonserver"),
                              backend_dir=Path("/opt/tritonserver/backends"))
        t = time.monotonic()
        with server, TTSClient(server.grpc_url) as tts:
            ready_s = time.monotonic() - t
            chunks = list(tts.stream("Hello from the self check.", seed=1, max_frames=MAX_FRAMES))
        audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0)
        detail = {"repository": done.stdout.strip(), "server_ready_s": round(ready_s, 1), "chunks": len(chunks),
                  "samples": int(audio.size), "sample_rate": chunks[0].sample_rate if chunks else None}
        if not chunks or not audio.size or not np.isfinite(audio).all():
            raise Failed("the streamed request returned no (finite) audio", detail)
        return detail

    # ------------------------------------------------------------------ (e)

    def check_codec_plan(self) -> dict:
        import numpy as np

        from fish_s2.codec import CodecConfig
        from fish_s2.ort_runtime import OrtCodecDecoder

        q = CodecConfig.for_checkpoint(self.checkpoint).quantizer
        rng = np.random.default_rng(0)
        worst = {}
        for B, T in ((1, 4), (3, 12)):
            codes = np.concatenate([rng.integers(0, q.semantic_codebook_size, (B, 1, T)),
                                    rng.integers(0, q.codebook_size, (B, q.n_codebooks, T))], axis=1).astype(np.int64)
            ref = OrtCodecDecoder(self.export_dir / "onnx" / "codec_decoder.onnx").decode(codes)
            got = run_plan(self.export_dir / "trt" / "codec_decoder.plan", codes)
            if got.shape != ref.shape:
                raise Failed(f"plan output {got.shape}, ONNX Runtime {ref.shape} for codes {codes.shape}")
            worst[f"{B}x{T}"] = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
        detail = {"rel_max_abs": worst}
        if max(worst.values()) > TOLERANCES["codec_plan_rel_max_abs"]:
            raise Failed("the codec plan differs from the ONNX model", detail)
        encoder = self.export_dir / "trt" / "codec_encoder.plan"
        if encoder.is_file():   # what reference voices are encoded with on the gpu profile
            from fish_s2.ort_runtime import OrtCodecEncoder

            c = CodecConfig.for_checkpoint(self.checkpoint)
            n = 2 * c.sample_rate // c.frame_length * c.frame_length         # 2 s of a tone, whole frames
            audio = (0.3 * np.sin(np.arange(n) * 2 * np.pi * 220 / c.sample_rate)).astype(np.float32)[None]
            ref = OrtCodecEncoder(self.export_dir / "onnx" / "codec_encoder.onnx").encode(audio)
            got = run_plan(encoder, audio)
            if got.shape != ref.shape:
                raise Failed(f"encoder plan output {got.shape}, ONNX Runtime {ref.shape}")
            detail["encoder_equal_codes"] = float((got == ref).mean())
            if detail["encoder_equal_codes"] < TOLERANCES["codec_encoder_plan_min_equal"]:
                raise Failed("the codec encoder plan's codes differ from the ONNX model's", detail)
        return detail


# ---------------------------------------------------------------------------- TensorRT-LLM requests


def requests(ck) -> dict:
    """name -> (prompt [n+1, T], SamplingParams): two voices whose token ids are equal (same semantic
    codes) but whose residual codes differ, the first voice twice with different text, and no voice."""
    import torch

    from fish_s2.prompt import PromptBuilder, Reference
    from fish_s2.request import SamplingParams

    b, n = PromptBuilder(ck.tokenizer, ck.config.num_codebooks), ck.config.num_codebooks
    g = torch.Generator().manual_seed(3)
    codes_a = torch.randint(0, 1024, (n, 40), generator=g)
    codes_b = torch.cat([codes_a[:1], torch.randint(0, 1024, (n - 1, 40), generator=g)])

    def prompt(codes, text):
        voice = [] if codes is None else [Reference("Good morning, this is my voice.", codes)]
        return torch.cat([b.system(voice), b.user(text), b.assistant_start()], dim=1)

    return {"voice_a_1": (prompt(codes_a, "Hello there."), SamplingParams(temperature=0.8, top_p=0.8, seed=1)),
            "voice_a_2": (prompt(codes_a, "Numbers: 1234."), SamplingParams(temperature=1.0, top_p=0.95, top_k=20, seed=7)),
            "voice_b_same_ids": (prompt(codes_b, "Hello there."), SamplingParams(temperature=0.8, top_p=0.8, seed=1)),
            "no_voice_greedy": (prompt(None, "A short sentence."), SamplingParams(temperature=0.0, seed=0))}


ENGINE = dict(max_active=8, max_queued=8, max_prompt_tokens=1024, max_frames=512)   # the self check's limits
KV_BUDGET = {"free_gpu_memory_fraction": 0.2, "max_tokens": None}   # a tiny model sharing the GPU with this process


def write_settings(path: Path, cuda_graphs: bool = True) -> Path:
    """The package's LLM-API settings, scaled to a tiny model sharing the GPU with this process (the
    batch size is the engine's max_active, :data:`ENGINE`)."""
    import yaml

    from fish_s2.trtllm.settings import DEFAULT_PATH

    data = yaml.safe_load(Path(DEFAULT_PATH).read_text())
    data["cuda_graph"] = {"batch_sizes": [1, 2, 4, 8], "enable_padding": True} if cuda_graphs else None
    path.write_text(yaml.safe_dump(data))
    return path


def trtllm_runs(ck, model_dir: Path, out: Path) -> dict:
    import torch

    from fish_s2.engine import EngineConfig
    from fish_s2.trtllm.engine import _default_llm_factory
    from fish_s2.trtllm.hf_config import FishS2Config
    from fish_s2.trtllm.settings import load_trtllm_settings

    reqs = requests(ck)
    cfg = FishS2Config.from_pretrained(str(model_dir)).dual_ar_config()
    engine = EngineConfig(**ENGINE).validate(cfg.slow.max_seq_len)
    result = {"requests": reqs}
    for mode in ("on", "off"):
        settings = load_trtllm_settings(write_settings(out / f"llm_api.graphs-{mode}.yaml", cuda_graphs=mode == "on"))
        settings = settings.validate(engine)
        llm, sampling_cls = _default_llm_factory(model_dir, settings, engine, cfg, KV_BUDGET)
        try:
            alone = {name: submit(llm, sampling_cls, cfg, *req).result() for name, req in reqs.items()}
            batch = {}
            if mode == "on":
                pending = {f"{name}@batch": submit(llm, sampling_cls, cfg, *req) for name, req in reqs.items()}
                batch = {name: r.result() for name, r in pending.items()}
                result["tokens_per_block"] = settings.kv_cache.tokens_per_block
                result["graph_batch_sizes"] = list(settings.cuda_graph.batch_sizes)
            result[mode] = {"alone": {k: unpack(v) for k, v in alone.items()},
                            "batch": {k: unpack(v) for k, v in batch.items()}}
        finally:
            llm.shutdown()
            torch.cuda.empty_cache()
    result["requests"].update({f"{name}@batch": req for name, req in reqs.items()})
    return result


def submit(llm, sampling_cls, cfg, prompt, params):
    from fish_s2.sampling import seed_to_key
    from fish_s2.trtllm.engine import cache_salt
    from fish_s2.trtllm.model import CODES_OUTPUT, HIDDEN_OUTPUT, request_inputs

    sp = sampling_cls(max_tokens=MAX_FRAMES, end_id=cfg.eos_id, pad_id=cfg.pad_id, top_k=1, detokenize=False, n=1,
                      additional_model_outputs=[CODES_OUTPUT, HIDDEN_OUTPUT], return_perf_metrics=True)
    return llm.generate_async(request_inputs(prompt, params, seed_to_key(params.seed)), sp, streaming=False,
                              cache_salt=cache_salt(prompt, cfg))


def unpack(out) -> dict:
    from fish_s2.trtllm.model import CODES_OUTPUT, HIDDEN_OUTPUT

    o = out.outputs[0]
    extra = o.additional_generation_outputs or {}
    kv = getattr(getattr(o, "request_perf_metrics", None), "kv_cache_metrics", None)
    return {"tokens": list(o.token_ids), "codes": extra.get(CODES_OUTPUT), "hidden": extra.get(HIDDEN_OUTPUT),
            "finish_reason": o.finish_reason, "cached_tokens": getattr(out, "cached_tokens", None),
            "reused_blocks": getattr(kv, "num_reused_blocks", None)}


def compare(ck, req, out: dict, exact: bool) -> dict:
    """One request's LLM output against the PyTorch model (see TOLERANCES)."""
    import torch

    from fish_s2.generate import generate

    prompt, params = req
    cfg, model = ck.config, ck.model
    weight = model.slow.embeddings.weight
    tokens = torch.tensor(out["tokens"])
    F = len(tokens)
    codes = out["codes"][:F].reshape(F, -1).long()
    hidden = out["hidden"][:F].reshape(F, -1).to(weight.device, weight.dtype)
    semantic = (tokens >= cfg.semantic_begin_id) & (tokens <= cfg.semantic_end_id)
    aligned = out["codes"].shape[0] >= F and out["hidden"].shape[0] >= F and \
        bool((codes[semantic, 0] == tokens[semantic] - cfg.semantic_begin_id).all())
    frames = torch.cat([tokens[None], codes.T])
    with torch.inference_mode():  # torch's slow AR over the prompt and the LLM's own frames
        inp = torch.cat([prompt, frames[:, :-1]], dim=1).to(weight.device)
        want = model.slow(inp[None])[0, prompt.shape[1] - 1:]
        rel = float(((hidden.float() - want.float()).norm(dim=-1) / want.float().norm(dim=-1)).max())
    replay = generate(_Replay(model, hidden), prompt, F, params).frames
    free = generate(model, prompt, MAX_FRAMES, params).frames
    m = min(F, free.shape[1])
    match = int((free[:, :m] == frames[:, :m]).all(0).long().cumprod(0).sum())  # frames equal before a divergence
    return {"frames": F, "finish_reason": out["finish_reason"], "aligned": aligned, "hidden_rel_l2": rel,
            "replay_equal": bool(torch.equal(replay, frames)) if exact else None,
            "replay_equal_batched": None if exact else bool(torch.equal(replay, frames)),
            "free_running_frames_equal": f"{match}/{m}"}


class _Replay:
    """The PyTorch Dual-AR with its slow AR replaced by the LLM's hidden states, step by step: the
    reference loop then recomputes each frame from exactly the hidden state the LLM used."""

    def __init__(self, model, hidden):
        self.cfg, self.fast, self.draws_per_frame = model.cfg, model.fast, model.draws_per_frame
        self.slow = _ReplaySlow(model.slow, hidden)


class _ReplaySlow:
    def __init__(self, slow, hidden):
        self._slow, self._hidden, self._step = slow, hidden, 0

    def __call__(self, x, input_pos=None, slots=None, kv_len=None, cache=None):
        h = self._hidden[self._step][None, None]
        self._step += 1
        return h

    def __getattr__(self, name):
        return getattr(self._slow, name)


def identical(a: dict, b: dict) -> bool:
    import torch

    return a["tokens"] == b["tokens"] and all(torch.equal(a[k], b[k]) for k in ("codes", "hidden"))


# ---------------------------------------------------------------------------- helpers


def run_plan(plan: Path, x):
    """Run a TensorRT plan with one input and one output (fish_s2.trt_plan.TrtPlan); the output as numpy."""
    from fish_s2.trt_plan import TrtPlan

    try:
        return TrtPlan(plan)(x)
    except (RuntimeError, ValueError) as e:
        raise Failed(str(e)) from None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def versions() -> dict:
    from fish_s2.export.stages import versions as package_versions

    v = package_versions()
    try:
        import torch

        v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        v["gpu"] = None
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build/selfcheck.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="work directory (default: a new temporary one)")
    p.add_argument("--checkpoint", default=None, help="S2 checkpoint (default: a tiny one written under --out)")
    p.add_argument("--only", action="append", choices=CHECKS, metavar="CHECK", help=f"run only these of {CHECKS}")
    p.add_argument("--budget-s", type=float, default=290.0, help="no check starts after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="no GPU, TensorRT or TensorRT-LLM (see above)")
    args = p.parse_args(argv)
    args.out = args.out or tempfile.mkdtemp(prefix="fish-s2-selfcheck-")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TLLM_WORKER_USE_SINGLE_PROCESS", "1")
    report = SelfCheck(args).run()
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
