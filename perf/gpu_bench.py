"""GPU benchmark of the PyTorch engine on S2-Pro-sized random weights (needs only torch + one CUDA GPU).

Builds the S2-Pro geometry (4.1 B slow AR + 0.42 B fast AR, bf16) and the S2-Pro codec directly on
the device -- no checkpoint -- and reports, with the device name:
  * per-frame decode time (slow AR, fast AR, total) at batch 1, 8, 32, 64, eager and CUDA graphs;
  * bytes read per step / step time as a fraction of the device's measured copy bandwidth;
  * time to first audio: cached voice prefix + 40 text tokens + first chunk + its codec decode;
  * audio-seconds per second with 64 requests in flight (closed loop, streaming bookkeeping included).
Warm-up is never timed; every timing synchronises first. Finishes in a few minutes on one H100.
``--dry-run`` runs the same code on the CPU with the tiny geometry (shapes and bookkeeping only).

    python perf/gpu_bench.py [--out perf/results] [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fish_s2.codec import Codec, CodecConfig
from fish_s2.config import S2_PRO_CONFIG_JSON, DualARConfig
from fish_s2.dual_ar import DualAR
from fish_s2.engine import Engine, EngineConfig
from fish_s2.request import ChunkEvent, EngineRequest, Finished
from fish_s2.request import SamplingParams
from fish_s2.request import ChunkPlan
from fish_s2.streaming import decode_chunks
from fish_s2.tiny import PRESETS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model(cfg: DualARConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DualAR:
    """Random weights made on the device: norms 1, everything else N(0, 0.02) (near-uniform logits,
    so requests rarely end early)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = DualAR(cfg).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(False)
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.init_buffers(device)
    return model.eval()


def random_codec(cfg: CodecConfig, device: torch.device, dtype: torch.dtype) -> Codec:
    return Codec(cfg).to(device=device, dtype=dtype).eval()  # (built on the CPU: buffers move with .to)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device memory bandwidth from a large copy (bytes read + bytes written per second)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    t, n = time.perf_counter(), 5
    for _ in range(n):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * n / (time.perf_counter() - t)


def bytes_per_step(model: DualAR, n: int, kv_len: int) -> int:
    """Bytes a decode step of n rows must read: slow layers, the audio head rows, the fast AR's layers
    once per codebook position, its head once per sampled code, and the KV cache."""
    cfg, el = model.cfg, next(model.parameters()).element_size()
    layer = lambda layers: sum(p.numel() for p in layers.parameters())  # noqa: E731
    s, f = cfg.slow, cfg.fast
    slow = layer(model.slow.layers) + (cfg.n_semantic + 1) * s.dim
    fast = cfg.num_codebooks * layer(model.fast.layers) + (cfg.num_codebooks - 1) * cfg.codebook_size * f.dim
    kv = n * s.n_layer * 2 * s.n_kv_head * kv_len * s.head_dim + n * f.n_layer * 2 * f.n_kv_head * cfg.num_codebooks * f.head_dim
    return (slow + fast + kv) * el


def timed(fn, device: torch.device, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def fill(engine: Engine, n: int, prompt_len: int, max_frames: int) -> None:
    """Admit n requests of prompt_len tokens that will not end during the measurement."""
    vocab = engine.model_cfg.semantic_begin_id  # text ids only
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        prompt = torch.zeros(engine.model_cfg.frame_rows, prompt_len, dtype=torch.long)
        prompt[0] = torch.randint(0, vocab, (prompt_len,), generator=g)
        engine.submit(EngineRequest(prompt, SamplingParams(seed=i), max_frames=max_frames), lambda ev: None)
    while engine.stats()["queued"]:
        engine.step()


def drain(engine: Engine) -> None:
    for live in list(engine.rows):
        engine.cancel(live.request_id)
    engine.step()


def decode_times(engine: Engine, batch_sizes: list[int], prompt_len: int, steps: int) -> list[dict]:
    """Per-frame decode time at each batch size, eager and (on CUDA) graphed; slow part separately."""
    runner = engine.runner
    model, device = runner.model, runner.device
    out = []
    for n in batch_sizes:
        fill(engine, n, prompt_len, max_frames=engine.cfg.max_frames)
        kv_len = max(runner.positions) + steps * 2 + 8
        row = {"batch": n, "kv_len": kv_len, "bytes_per_step": bytes_per_step(model, n, kv_len)}
        modes = [False, True] if device.type == "cuda" else [False]
        for graphs in modes:
            runner.use_graphs = graphs
            total = timed(runner.step, device, steps)
            sl = slice(0, n)
            slow_fn = lambda: model.slow(runner.cur[sl, :, None], runner.pos[sl, None], sl, kv_len,  # noqa: E731
                                         runner.slow_cache)
            if graphs:
                slow_fn = _graphed(slow_fn, device)
            with torch.inference_mode():
                slow = timed(slow_fn, device, steps)
            key = "graph" if graphs else "eager"
            row[key] = {"step_ms": 1e3 * total, "slow_ms": 1e3 * slow, "fast_ms": 1e3 * (total - slow),
                        "per_frame_ms": 1e3 * total / n, "frames_per_s": n / total}
        out.append(row)
        drain(engine)
    runner.use_graphs = engine.cfg.cuda_graphs and device.type == "cuda"
    return out


def _graphed(fn, device: torch.device):
    with torch.inference_mode():
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


def time_to_first_audio(engine: Engine, codec: Codec, voice_len: int, text_len: int, repeats: int) -> dict:
    """Warm a voice prefix, then: submit (prefix hit + text_len new tokens) -> first chunk -> decoded audio."""
    cfg = engine.model_cfg
    g = torch.Generator().manual_seed(7)
    voice = torch.zeros(cfg.frame_rows, voice_len, dtype=torch.long)
    voice[0] = torch.randint(0, cfg.semantic_begin_id, (voice_len,), generator=g)
    sem = torch.arange(voice_len // 4, voice_len)  # most of a voice block is reference codes
    voice[1:, sem] = torch.randint(0, 1024, (cfg.num_codebooks, len(sem)), generator=g)
    voice[0, sem] = voice[1, sem] + cfg.semantic_begin_id

    def once(text_seed: int) -> tuple[float, float]:
        text = torch.zeros(cfg.frame_rows, text_len, dtype=torch.long)
        text[0] = torch.randint(0, cfg.semantic_begin_id, (text_len,), generator=torch.Generator().manual_seed(text_seed))
        first: list[ChunkEvent] = []
        sync(engine.runner.device)
        t = time.perf_counter()
        engine.submit(EngineRequest(torch.cat([voice, text], 1), SamplingParams(seed=text_seed),
                                    max_frames=engine.cfg.chunk_plan.first_chunk_frames, prefix_len=voice_len),
                      lambda ev: first.append(ev) if isinstance(ev, ChunkEvent) else None)
        while not first:
            engine.step()
        t_codes = time.perf_counter() - t
        decode_chunks(codec, [first[0].chunk])
        sync(engine.runner.device)
        dt = time.perf_counter() - t
        while engine.rows:
            engine.step()
        return dt, t_codes

    once(0)  # warms the voice prefix and the first-chunk shapes
    once(1)
    runs = [once(2 + i) for i in range(repeats)]
    return {"voice_prefix_tokens": voice_len, "text_tokens": text_len,
            "first_chunk_frames": engine.cfg.chunk_plan.first_chunk_frames,
            "ttfa_ms_median": 1e3 * statistics.median(r[0] for r in runs),
            "first_chunk_codes_ms_median": 1e3 * statistics.median(r[1] for r in runs),
            "prefix_cache": engine.runner.prefix_cache.stats()}


def throughput(engine: Engine, concurrency: int, prompt_len: int, frames_per_request: int, seconds: float,
               frame_seconds: float) -> dict:
    """Closed loop: keep `concurrency` requests in flight; frames generated (and streamed) per wall second."""
    cfg = engine.model_cfg
    state = {"done": 0, "next": 0}

    def submit() -> None:
        i = state["next"]
        state["next"] += 1
        prompt = torch.zeros(cfg.frame_rows, prompt_len, dtype=torch.long)
        prompt[0] = torch.randint(0, cfg.semantic_begin_id, (prompt_len,), generator=torch.Generator().manual_seed(i))
        engine.submit(EngineRequest(prompt, SamplingParams(seed=i), max_frames=frames_per_request), sink)

    def sink(ev) -> None:
        if isinstance(ev, Finished):
            state["done"] += 1
            submit()

    engine.runner.capture_graphs(concurrency, prompt_len + frames_per_request + 1)
    for _ in range(concurrency):
        submit()
    for _ in range(5):  # warm-up
        engine.step()
    sync(engine.runner.device)
    f0, t = engine.lifecycle.frames_generated, time.perf_counter()
    while time.perf_counter() - t < seconds:
        engine.step()
    sync(engine.runner.device)
    dt, frames = time.perf_counter() - t, engine.lifecycle.frames_generated - f0
    drain(engine)
    return {"concurrency": concurrency, "seconds": dt, "frames": frames, "requests_finished": state["done"],
            "frames_per_s": frames / dt, "audio_s_per_s": frames * frame_seconds / dt,
            "rtf_per_request": concurrency / (frames / dt) / frame_seconds if frames else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny geometry on the CPU (checks the script)")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--voice-len", type=int, default=256, help="voice prefix tokens for time to first audio")
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--throughput-seconds", type=float, default=20.0)
    ap.add_argument("--out", default=None, help="write gpu_bench_<device>.json here (default perf/results on a GPU)")
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device (use --dry-run to check the script on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.dry_run:
        slow, fast = PRESETS["tiny"]
        cfg = dataclasses.replace(DualARConfig.from_dict(S2_PRO_CONFIG_JSON), slow=slow, fast=fast)
        dtype, codec_cfg = torch.float32, CodecConfig.tiny()
        batch_sizes, args.steps, args.prompt_len, args.throughput_seconds, args.voice_len = [1, 2], 2, 24, 1.0, 32
    else:
        cfg, dtype, codec_cfg = DualARConfig.from_dict(S2_PRO_CONFIG_JSON), torch.bfloat16, CodecConfig.s2_pro()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    t0 = time.perf_counter()
    model = random_model(cfg, device, dtype)
    codec = random_codec(codec_cfg, device, dtype)
    max_b = max(batch_sizes)
    engine = Engine(model, EngineConfig(max_active=max_b, max_queued=4 * max_b, max_prompt_tokens=max(args.prompt_len, args.voice_len + args.text_len) + 64,
                                        max_frames=512, chunk_plan=ChunkPlan()))
    frame_seconds = codec_cfg.frame_length / codec_cfg.sample_rate
    result = {"device": name, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
              "model": {"slow_params": sum(p.numel() for p in model.slow.parameters()),
                        "fast_params": sum(p.numel() for p in model.fast.parameters()),
                        "codec": "S2-Pro codec" if not args.dry_run else "tiny codec"},
              "command": "python perf/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "setup_s": time.perf_counter() - t0}
    result["copy_bandwidth_GBps"] = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26)) / 1e9
    result["decode"] = decode_times(engine, batch_sizes, args.prompt_len, args.steps)
    for row in result["decode"]:
        for key in ("eager", "graph"):
            if key in row:
                bw = row["bytes_per_step"] / (row[key]["step_ms"] / 1e3)
                row[key]["achieved_GBps"] = bw / 1e9
                row[key]["fraction_of_copy_bw"] = bw / (result["copy_bandwidth_GBps"] * 1e9)
    result["ttfa"] = time_to_first_audio(engine, codec, args.voice_len, args.text_len, repeats=5)
    result["throughput"] = throughput(engine, max_b, 64, 200, args.throughput_seconds, frame_seconds)
    result["total_s"] = time.perf_counter() - t0
    text = json.dumps(result, indent=1)
    out = args.out or (None if args.dry_run else str(Path(__file__).parent / "results"))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        tag = name.lower().replace(" ", "_").replace("(", "").replace(")", "")
        (Path(out) / f"gpu_bench_{tag}.json").write_text(text)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
