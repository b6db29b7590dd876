"""CPU benchmark of the batched engine against the plain single-request generator.

For each preset (tiny; small = dim 512, 8 slow layers, 2 fast layers), on the same random weights:
  * throughput: frames/s and audio-seconds/s of codes at concurrency 1, 4, 16, next to the
    reference `generate` run one request at a time (codec decode excluded: this measures the
    Dual-AR engine); with `--fast-ar torch,onnx` also the engine with its fast AR in ONNX Runtime
    (the exported `fast_ar.onnx`, the CPU profile's `fast_ar_runtime: onnx`), side by side;
  * time to first audio (request -> first chunk decoded by the codec) for a 10 s reference voice:
    cold (a new recording: codec encode + full prefill) and cached (a registered voice: stored codes,
    prompt prefix in the KV cache);
  * playback gap: whole streams at concurrency 1 and 4 with the codec decoding chunks as they come
    (a thread of its own, as Triton's codec model runs beside the engine), for the default chunk plan
    (ramp) and the same plan without the ramp: how long a real-time player that starts at the first
    chunk waits, summed over each stream.
Warm-up runs are not timed. Prints a JSON object as its last line and writes JSON + a markdown
table under perf/results/.

    python perf/bench_engine.py [--presets tiny,small] [--concurrency 1,4,16] [--frames 48] [--fast-ar torch,onnx]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fish_s2.checkpoint import S2Checkpoint
from fish_s2.engine import Engine, EngineConfig
from fish_s2.generate import generate
from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.request import ChunkEvent, ChunkPlan, EngineRequest, SamplingParams, playback_gap
from fish_s2.streaming import decode_chunks
from fish_s2.tiny import write_tiny_checkpoint
from fish_s2.tts import encode_reference

TEXTS = ["Hello! This is Fish S2 streaming from Triton.", "[whisper] The quick brown fox jumps over the lazy dog.",
         "Please call Stella and ask her to bring these things.", "It was the best of times, it was the worst."]


def _prompt(b: PromptBuilder, refs: list[Reference], text: str) -> tuple[torch.Tensor, int]:
    system = b.system(refs)
    return torch.cat([system, b.user(text), b.assistant_start()], dim=1), system.shape[1]


def _drive(engine: Engine, reqs: list[EngineRequest]) -> tuple[float, int]:
    """Submit all, step until done; (seconds, frames)."""
    frames = [0]

    def sink(ev):
        if isinstance(ev, ChunkEvent):
            frames[0] += ev.chunk.n_frames

    t = time.perf_counter()
    for r in reqs:
        engine.submit(r, sink)
    while engine.rows or engine.stats()["queued"]:
        engine.step()
    return time.perf_counter() - t, frames[0]


def throughput(ck: S2Checkpoint, concurrency: list[int], n_frames: int, repeats: int, fast_ars: dict) -> dict:
    """``fast_ars``: runner name -> fast-AR runtime (None = torch), each run side by side."""
    b = PromptBuilder(ck.tokenizer, ck.config.num_codebooks)
    audio_per_frame = ck.codec.frame_length / ck.codec.sample_rate
    cfg = EngineConfig(max_active=max(concurrency), max_queued=4 * max(concurrency), max_prompt_tokens=512,
                       max_frames=n_frames)
    engines = {name: Engine(ck.model, cfg, fast_ar) for name, fast_ar in fast_ars.items()}

    # random weights may end a request early (<|im_end|>): rates use the frames actually produced
    def reqs(c: int, tag: int) -> list[EngineRequest]:
        return [EngineRequest(_prompt(b, [], TEXTS[i % len(TEXTS)])[0], SamplingParams(seed=1000 * tag + i),
                              max_frames=n_frames) for i in range(c)]

    for engine in engines.values():
        _drive(engine, reqs(max(concurrency), 0))  # warm-up
    rows = {}
    for c in concurrency:
        runs = {name: [] for name in engines}
        for k in range(repeats):            # interleaved, so that both runners see the same machine
            for name, engine in engines.items():
                runs[name].append(_drive(engine, reqs(c, 1 + k)))
        for name, rs in runs.items():
            secs, frames = sum(r[0] for r in rs), sum(r[1] for r in rs)
            key = f"engine_c{c}" if name == "torch" else f"engine_{name}_c{c}"
            rows[key] = {"runner": f"engine ({name} fast AR)", "concurrency": c, "seconds": secs, "frames": frames,
                         "frames_per_s": frames / secs, "audio_s_per_s": frames * audio_per_frame / secs}
    # the plain reference generator, one request at a time (what upstream's CLI does)
    prompts = [_prompt(b, [], TEXTS[i % len(TEXTS)])[0] for i in range(max(2, repeats))]
    generate(ck.model, prompts[0], 4, SamplingParams())  # warm-up
    t, frames = time.perf_counter(), 0
    for i, p in enumerate(prompts):
        frames += generate(ck.model, p, n_frames, SamplingParams(seed=i)).frames.shape[1]
    secs = time.perf_counter() - t
    rows["reference_generate"] = {"runner": "reference generate", "concurrency": 1, "seconds": secs, "frames": frames,
                                  "frames_per_s": frames / secs, "audio_s_per_s": frames * audio_per_frame / secs}
    base = rows["engine_c1"]["audio_s_per_s"]
    for r in rows.values():
        r["vs_engine_c1"] = r["audio_s_per_s"] / base
    return rows


def time_to_first_audio(ck: S2Checkpoint, reference_seconds: float, repeats: int) -> dict:
    """Median submit -> first chunk decoded. Cold: a new reference recording, encoded by the codec and
    prefilled in full (what an unregistered voice costs). Cached: a registered voice, whose codes are
    stored and whose prompt prefix is in the engine's KV cache."""
    b = PromptBuilder(ck.tokenizer, ck.config.num_codebooks)
    n_samples = int(reference_seconds * ck.codec.sample_rate)
    n_ref = -(-n_samples // ck.codec.frame_length)
    engine = Engine(ck.model, EngineConfig(max_active=4, max_prompt_tokens=n_ref + 256, max_frames=64))
    g = torch.Generator().manual_seed(0)
    text = "This is the reference recording of about ten seconds of speech."

    def recording() -> np.ndarray:
        t = np.arange(n_samples) / ck.codec.sample_rate
        f0 = 100 + 80 * float(torch.rand(1, generator=g))
        return (0.3 * np.sin(2 * np.pi * f0 * t) + 0.02 * torch.randn(n_samples, generator=g).numpy()).astype(np.float32)

    def once(refs: list[Reference] | None, audio: np.ndarray | None) -> float:
        first = []
        t = time.perf_counter()
        if refs is None:  # a new voice: encode the recording first
            refs = [Reference(text, encode_reference(ck, audio))]
        prompt, p = _prompt(b, refs, TEXTS[0])
        engine.submit(EngineRequest(prompt, SamplingParams(seed=0), max_frames=engine.cfg.chunk_plan.first_chunk_frames,
                                    prefix_len=p), lambda ev: first.append(ev) if isinstance(ev, ChunkEvent) else None)
        while not first:
            engine.step()
        decode_chunks(ck.codec, [first[0].chunk])
        dt = time.perf_counter() - t
        while engine.rows:
            engine.step()
        return dt

    once(None, recording())  # warm-up (shapes, allocator)
    cold = [once(None, recording()) for _ in range(repeats)]
    registered = [Reference(text, encode_reference(ck, recording()))]
    once(registered, None)  # registration warms the prefix
    cached = [once(registered, None) for _ in range(repeats)]
    c, h = statistics.median(cold), statistics.median(cached)
    return {"reference_seconds": reference_seconds, "reference_frames": n_ref,
            "first_chunk_frames": engine.cfg.chunk_plan.first_chunk_frames, "cold_s": c, "cached_s": h,
            "cached_over_cold": h / c, "prefix_cache": engine.runner.prefix_cache.stats()}


def playback(ck: S2Checkpoint, concurrency: list[int], n_frames: int) -> dict:
    """Per plan and concurrency: TTFA and playback gap (p50/max over the streams), codec in the loop."""
    b = PromptBuilder(ck.tokenizer, ck.config.num_codebooks)
    frame_s = ck.codec.frame_length / ck.codec.sample_rate
    plans = {"ramp": ChunkPlan(), "flat": dataclasses.replace(ChunkPlan(), ramp=False)}
    engine = Engine(ck.model, EngineConfig(max_active=max(concurrency), max_prompt_tokens=512, max_frames=n_frames))
    out = {}
    for name, plan in plans.items():
        for c in [1] + concurrency:   # the first pass warms up (its row is overwritten)
            q: queue.Queue = queue.Queue()
            arrivals: dict[str, list] = {}
            t0: dict[str, float] = {}

            def codec_loop():
                while (ev := q.get()) is not None:
                    decode_chunks(ck.codec, [ev.chunk])
                    rid = ev.request_id
                    arrivals[rid].append((time.perf_counter() - t0[rid], ev.chunk.n_frames * frame_s))

            worker = threading.Thread(target=codec_loop)
            worker.start()
            reqs = [EngineRequest(_prompt(b, [], TEXTS[i % len(TEXTS)])[0], SamplingParams(seed=i), max_frames=n_frames,
                                  chunk_plan=plan) for i in range(c)]
            for r in reqs:
                arrivals[r.request_id], t0[r.request_id] = [], time.perf_counter()
                engine.submit(r, lambda ev: q.put(ev) if isinstance(ev, ChunkEvent) else None)
            while engine.rows or engine.stats()["queued"]:
                engine.step()
            q.put(None)
            worker.join()
            gaps = [playback_gap(a) for a in arrivals.values()]
            out[f"{name}_c{c}"] = {"plan": plan.as_list(), "concurrency": c, "frames": n_frames,
                                   "ttfa_s": statistics.median(a[0][0] for a in arrivals.values()),
                                   "gap_s_median": statistics.median(gaps), "gap_s_max": max(gaps),
                                   "streams_with_gap": sum(g > 0 for g in gaps)}
    return out


def _fast_ar(name: str, checkpoint: Path, threads: int | None):
    """None for the torch fast AR, else ONNX Runtime over a fresh export of ``checkpoint``."""
    if name == "torch":
        return None
    if name != "onnx":
        raise SystemExit(f"--fast-ar: expected torch or onnx, got {name!r}")
    from fish_s2.export.onnx_export import export_fast_ar
    from fish_s2.ort_runtime import OrtFastAR

    return OrtFastAR(export_fast_ar(checkpoint, checkpoint.parent / f"{checkpoint.name}-fast_ar.onnx").path,
                     threads=threads)


def markdown(result: dict) -> str:
    lines = ["# Engine benchmark (CPU)\n", f"Command: `{result['command']}`  ", f"Machine: {result['machine']}\n",
             "| preset | runner | concurrency | frames/s | audio-s/s | vs engine c=1 |", "|---|---|---|---|---|---|"]
    for preset, r in result["presets"].items():
        for name, row in r["throughput"].items():
            lines.append(f"| {preset} | {row['runner']} | {row['concurrency']} | {row['frames_per_s']:.1f} | "
                         f"{row['audio_s_per_s']:.2f} | {row['vs_engine_c1']:.2f}x |")
    lines += ["", "| preset | reference | first chunk | TTFA cold (new recording) | TTFA cached (registered voice) "
              "| cached/cold |", "|---|---|---|---|---|---|"]
    for preset, r in result["presets"].items():
        t = r["ttfa"]
        lines.append(f"| {preset} | {t['reference_seconds']:.0f} s ({t['reference_frames']} frames) | "
                     f"{t['first_chunk_frames']} frames | {1000 * t['cold_s']:.0f} ms | {1000 * t['cached_s']:.0f} ms | "
                     f"{t['cached_over_cold']:.2f} |")
    lines += ["", "| preset | plan | concurrency | TTFA | playback gap median / max | streams with a gap |",
              "|---|---|---|---|---|---|"]
    for preset, r in result["presets"].items():
        for key, row in r.get("playback", {}).items():
            lines.append(f"| {preset} | {key.rsplit('_', 1)[0]} {row['plan']} | {row['concurrency']} | "
                         f"{1000 * row['ttfa_s']:.0f} ms | {1000 * row['gap_s_median']:.0f} / "
                         f"{1000 * row['gap_s_max']:.0f} ms | {row['streams_with_gap']} |")
    lines.append("\nAudio-seconds are seconds of generated codes (frames x 2048 / 44100); codec decode is excluded "
                 "from throughput and included in time to first audio. Ratios compare runs made side by side.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--frames", type=int, default=48, help="frame budget per request")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--playback-frames", type=int, default=120, help="frames per stream for the playback gap")
    ap.add_argument("--reference-seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--fast-ar", default="torch", help="fast-AR runtimes to compare: torch, onnx (ONNX Runtime)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="cpu", help="results go to OUT/bench_engine_TAG.{json,md}")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    conc = [int(c) for c in args.concurrency.split(",")]
    result = {"command": "python perf/bench_engine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                         f"torch {torch.__version__}",
              "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            path = write_tiny_checkpoint(Path(tmp) / preset, preset=preset, seed=0)
            ck = S2Checkpoint.load(path)
            fast_ars = {name: _fast_ar(name, path, args.threads) for name in args.fast_ar.split(",")}
            with torch.inference_mode():
                result["presets"][preset] = {"throughput": throughput(ck, conc, args.frames, args.repeats, fast_ars),
                                             "ttfa": time_to_first_audio(ck, args.reference_seconds, 3),
                                             "playback": playback(ck, [1, 4], args.playback_frames)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_engine_{args.tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"bench_engine_{args.tag}.md").write_text(markdown(result))
    print(markdown(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
