"""GPU benchmark of the PyTorch engine on S2-Pro-sized random weights (needs only torch + one CUDA GPU).

Builds the S2-Pro geometry (4.1 B slow AR + 0.42 B fast AR, bf16) and the S2-Pro codec directly on
the device -- no checkpoint -- and prints one JSON object (also written under --out):
  * env: device, torch, CUDA, driver, git commit, dtype, model sizes, command;
  * decode: step time at batch 1 and 64 as CUDA graphs of the eager step ("graph") and of the
    torch.compile'd step ("compiled", engine.compile: on), side by side, with the bytes the step reads
    (weights + KV at the bucket it reads) as a share of the measured copy bandwidth, and the time the
    bucket's capture (and compile, for "compiled") took (build_s: every bucket built, per engine);
  * kv: the same at batch 64 with the rows at KV lengths 1k and 2k (compiled: last, within --budget-s);
  * prefill: prompt (16 to 2000 tokens, no cached voice) to first frame in chunks of the admission
    budget (engine.prefill_chunk_tokens, 512), graph vs compiled, with the build time of new buckets;
  * self_check (graph and compiled): a prompt prefilled in padded chunk graphs writes the KV an eager
    prefill writes (relative error), overlapped steps give exactly the plain loop's streams ("ok": both);
  * profile: kernels per step and the matmul share of kernel time (torch.profiler on the uncaptured
    step functions: profiling graph replays is unreliable), graph vs compiled, batch 1 and 64;
  * codec: the chunk decoder (fish_s2.chunk_decoder) prepared for the chunk plan's code lengths up to the
    largest batch: graphs built, buckets, build time (compiled with --codec-compile); decode time of a
    first chunk at batch 1 and of steady chunks at the largest batch, eager (decode_chunks) vs the
    decoder (vs one compiled bucket too, within --budget-s, when the decoder does not compile), and
    their largest difference from the chunk decoded alone eagerly relative to its peak (rel_err); the
    chunks it decoded in buckets and eagerly over the whole run;
  * serving_warmup (graph and compiled): the buckets TTFA and the load use, built before them as at a
    server's start (capture_graphs up to batch 64 and the first KV bucket): how many were new, seconds;
  * ttfa (graph and compiled): time to first audio (submit -> first chunk decoded by the codec) with a
    cached voice, p50/p90 over --ttfa-requests requests at concurrency 1, and its playback gap;
  * load (graph and compiled): 16 and 64 requests in flight with staggered prompt and output lengths (closed loop, arrivals
    spread out, not in waves), the chunk decoder's graphs on its own CUDA stream: TTFA p50/p90,
    playback gap per stream, end-to-end audio-seconds per second, the codec's share of GPU time,
    requests that ended by themselves (stop/length) apart from those cancelled at the end;
  * memory: peak allocated, KV cache bytes.
Warm-up is never timed; every timing synchronises first. Compiles are bounded (batch buckets 1/16/64,
one KV bucket for the load) and the optional ones are skipped past --budget-s; about 8 minutes on
one H200 (compile time is the unknown). ``--dry-run`` runs every section on the CPU with the tiny
geometry, compile included (one bucket each for the step and the codec: shapes, bookkeeping, no speed).
The JSON is rewritten after every section (section_s: each one's time), so one bounded run keeps what it
measured: a section that raises is recorded under "errors" and the run goes on (when the compiled step
fails, "compiled" says so and the compiled sections are left out), and SIGTERM (``timeout``) records the
section it cut short under "interrupted" and exits 124. Order: everything on the graph engine first (its
captures take seconds: decode, KV, profile, prefill, codec, self check, TTFA, load), then the compiled
engine (each bucket compiles: decode, profile, prefill, self check, TTFA, load, KV) while --budget-s lasts.

    python perf/gpu_bench.py [--out perf/results] [--dry-run]
    FISH_S2_GIT_COMMIT=<hash> python perf/gpu_bench.py      # in a copy of the tree without .git
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from fish_s2.chunk_decoder import BATCH_SIZES, ChunkDecoder
from fish_s2.codec import Codec, CodecConfig
from fish_s2.config import S2_PRO_CONFIG_JSON, DualARConfig
from fish_s2.dual_ar import DualAR
from fish_s2.engine import Engine, EngineConfig
from fish_s2.engine.config import SWITCH_MODES
from fish_s2.request import (ChunkEvent, ChunkPlan, CodeChunk, EngineRequest, Finished, Player, SamplingParams,
                             chunks_to_codes, collect)
from fish_s2.streaming import decode_chunks
from fish_s2.tiny import PRESETS

REPO = Path(__file__).resolve().parents[1]
MATMUL = re.compile(r"gemm|nvjet|cutlass|xmma|cublas|splitk|aten::(mm|addmm|bmm)$", re.I)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release_memory(device: torch.device) -> None:
    """Return what a deleted engine held (its KV cache, graph pools) before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def env_info(device: torch.device) -> dict:
    def run(*cmd: str) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = run("git", "rev-parse", "HEAD")   # a copy without .git: pass FISH_S2_GIT_COMMIT
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if device.type == "cuda"
            else None, "git_commit": commit or os.environ.get("FISH_S2_GIT_COMMIT"),
            "git_dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")) if commit else None}


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
    once per codebook position, its head once per sampled code, and the KV cache at ``kv_len`` (pass
    the bucket the step reads: a graph reads its whole KV bucket)."""
    cfg, el = model.cfg, next(model.parameters()).element_size()
    layer = lambda layers: sum(p.numel() for p in layers.parameters())  # noqa: E731
    s, f = cfg.slow, cfg.fast
    slow = layer(model.slow.layers) + (cfg.n_semantic + 1) * s.dim
    fast = cfg.num_codebooks * layer(model.fast.layers) + (cfg.num_codebooks - 1) * cfg.codebook_size * f.dim
    kv = n * s.n_layer * 2 * s.n_kv_head * kv_len * s.head_dim + n * f.n_layer * 2 * f.n_kv_head * cfg.num_codebooks * f.head_dim
    return (slow + fast + kv) * el


def timed(fn, device: torch.device, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "mean": None, "n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "n": len(values)}


def prompt(cfg: DualARConfig, length: int, seed: int) -> torch.Tensor:
    p = torch.zeros(cfg.frame_rows, length, dtype=torch.long)
    p[0] = torch.randint(0, cfg.semantic_begin_id, (length,), generator=torch.Generator().manual_seed(seed))
    return p


def fill(engine: Engine, n: int, prompt_len: int, kv_len: int | None = None) -> None:
    """n active requests that will not end during a measurement; with ``kv_len`` their positions are moved
    on so that a step reads that much KV (the KV contents do not change the time)."""
    for i in range(n):
        engine.submit(EngineRequest(prompt(engine.model_cfg, prompt_len, i), SamplingParams(seed=i),
                                    max_frames=engine.cfg.max_frames), lambda ev: None)
    while engine.stats()["queued"] or engine.stats()["prefilling"]:
        engine.step()
    runner = engine.runner
    if kv_len is not None:
        runner.positions = [kv_len - 1] * n
        runner.pos[:n] = kv_len - 1


def drain(engine: Engine) -> None:
    """Cancel every request in flight (running or queued) and let the engine end them."""
    for live in engine.lifecycle.lives():
        engine.cancel(live.request_id)
    while engine.rows or engine.stats()["queued"]:
        engine.step()


def decode_rows(engine: Engine, mode: str, batch_sizes: list[int], kv_lens: list[int | None], prompt_len: int,
                steps: int, copy_bw: float, deadline: float = float("inf")) -> list[dict]:
    """Step time per (batch, KV length), with the time the bucket's compile and/or capture took."""
    runner, rows = engine.runner, []
    for n, kv in zip(batch_sizes, kv_lens):
        if time.perf_counter() > deadline:
            rows.append({"batch": n, "kv_len": kv, mode: "skipped: past --budget-s"})
            continue
        fill(engine, n, prompt_len, kv)
        bucketed = runner.use_graphs or runner.compiled
        key = runner.step_key(n) if bucketed else None
        step = timed(runner.step, runner.device, steps)
        kb = key[1] if bucketed else max(runner.positions)   # eager: what the last step read
        nbytes = bytes_per_step(runner.model, n, kb)
        rows.append({"batch": n, "kv_len": max(runner.positions),
                     mode: {"step_ms": 1e3 * step, "per_frame_ms": 1e3 * step / n, "frames_per_s": n / step,
                            "kv_read": kb, "bytes_per_step": nbytes, "achieved_GBps": nbytes / step / 1e9,
                            "fraction_of_copy_bw": nbytes / step / copy_bw, "build_s": runner.build_s.get(key)}})
        drain(engine)
    return rows


def prefill_times(engine: Engine, lengths: list[int], reps: int, deadline: float = float("inf")) -> list[dict]:
    """Time from a prompt (no cached prefix) to its first frame in a free row: its prefill in chunks of
    engine.prefill_chunk_tokens (padded to their length buckets in graphs) and the first-frame graph."""
    runner, out = engine.runner, []
    for n in lengths:
        if time.perf_counter() > deadline:
            out.append({"tokens": n, "skipped": "past --budget-s"})
            continue
        req = EngineRequest(prompt(engine.model_cfg, n, n), SamplingParams(seed=0))
        built = set(runner.build_s)

        def once() -> None:
            runner.admit(req)
            runner.release(runner.n_active - 1)

        t = timed(once, runner.device, reps)
        new = {str(k): v for k, v in runner.build_s.items() if k not in built}
        out.append({"tokens": n, "ms": 1e3 * t, "tokens_per_s": n / t, "build_s": new})
    return out


def warm_up(engine: Engine, max_batch: int, max_kv: int) -> dict:
    """Build the buckets a server builds at its start, up to (max_batch, max_kv); their count and time."""
    runner, t = engine.runner, time.perf_counter()
    built = set(runner.build_s)
    runner.capture_graphs(max_batch, max_kv)
    return {"max_batch": max_batch, "max_kv": max_kv, "new_buckets": len(set(runner.build_s) - built),
            "seconds": time.perf_counter() - t}


def self_check(engine: Engine, eng: dict, tokens: int) -> dict:
    """The GPU-only paths against plain ones on this device: a prompt prefilled in padded chunk graphs
    (compiled) writes the KV an eager prefill writes (relative error; bf16), and overlapped steps give
    exactly the streams of the plain loop (same graphs, same codes)."""
    cfg, model = engine.model_cfg, engine.runner.model
    eager = Engine(model, EngineConfig(**{**eng, "max_active": 1, "graph_batch_sizes": (1,)}, compile="off",
                                       cuda_graphs=False))
    req = EngineRequest(prompt(cfg, tokens, 5), SamplingParams(seed=5))
    for runner in (eager.runner, engine.runner):
        runner.admit(req)
    kv = [torch.stack([c.kv[:, 0, :, :tokens] for c in r.slow_cache]).float() for r in (eager.runner, engine.runner)]
    rel = float((kv[0] - kv[1]).norm() / kv[0].norm())
    for runner in (eager.runner, engine.runner):
        runner.release(0)
    del eager, kv
    streams, overlap = {}, engine.overlap
    for engine.overlap in (True, False):
        handles = [engine.submit(EngineRequest(prompt(cfg, 30 + 20 * i, i), SamplingParams(seed=i), max_frames=24))
                   for i in range(4)]
        while engine.rows or engine.stats()["queued"]:
            engine.step()
        streams[engine.overlap] = [chunks_to_codes(collect(h)[0]) for h in handles]
    engine.overlap = overlap
    same = all(np.array_equal(a, b) for a, b in zip(streams[True], streams[False]))
    return {"prefill_tokens": tokens, "prefill_kv_rel_err": rel, "overlap_same_streams": same,
            "ok": rel < 2e-2 and same}


def profile(engine: Engine, batch_sizes: list[int], prompt_len: int, steps: int = 3) -> list[dict]:
    """Kernels per step and the matmul share of kernel time, on the uncaptured step function (the
    compiled one when compiling): the same kernels a graph replays, launched one by one."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    runner, out = engine.runner, []
    cuda = runner.device.type == "cuda"
    for n in batch_sizes:
        fill(engine, n, prompt_len)
        key = runner.step_key(n)
        fn = lambda: runner._step_fn(*key)  # noqa: E731
        with torch.inference_mode():
            fn()
            sync(runner.device)
            with torch.profiler.profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    fn()
                sync(runner.device)
        if cuda:   # kernels and their device time
            events = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
        else:      # the CPU dry run: aten ops and their self time
            events = [(e.name, e.self_cpu_time_total) for e in prof.events() if e.name.startswith("aten::")]
        total = sum(t for _, t in events) or 1
        mm = sum(t for name, t in events if MATMUL.search(name))
        by_name: dict[str, float] = {}
        for name, t in events:
            by_name[name] = by_name.get(name, 0.0) + t
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
        out.append({"batch": n, "kernels_per_step": len(events) / steps, "kernel_ms_per_step": total / 1e3 / steps,
                    "matmul_share": mm / total,
                    "top_kernels": [{"name": k[:100], "ms_per_step": v / 1e3 / steps} for k, v in top]})
        drain(engine)
    return out


class CodecLoop:
    """Decodes streamed chunks on a thread of its own with the chunk decoder (its graphs on its own CUDA
    stream), batching the chunks that are waiting; records each chunk's arrival (decoded) per request."""

    def __init__(self, decoder: ChunkDecoder, frame_s: float):
        self.decoder, self.stream, self.frame_s = decoder, decoder.stream, frame_s
        self.q: queue.Queue = queue.Queue()
        self.gpu_s, self.audio_s = 0.0, 0.0
        self.on_chunk = lambda rid, index, t, seconds: None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, ev: ChunkEvent) -> None:
        self.q.put(ev)

    def close(self) -> None:
        self.q.put(None)
        self._thread.join(60)

    def _run(self) -> None:
        while (ev := self.q.get()) is not None:
            batch, more = [ev], ev
            while not self.q.empty() and (more := self.q.get()) is not None:
                batch.append(more)
            t = time.perf_counter()
            if self.stream is not None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
            self.decoder.decode([e.chunk for e in batch])   # returns once its stream's work is done
            if self.stream is not None:
                end.record(self.stream)
                end.synchronize()
            now = time.perf_counter()
            self.gpu_s += start.elapsed_time(end) / 1e3 if self.stream is not None else now - t
            for e in batch:
                seconds = e.chunk.n_frames * self.frame_s
                self.audio_s += seconds
                self.on_chunk(e.request_id, e.chunk.index, now, seconds)
            if more is None:
                return


def codec_section(decoder: ChunkDecoder, lengths: list[int], plan: ChunkPlan, max_batch: int, steps: int,
                  deadline: float) -> dict:
    """Build the decoder's buckets for ``lengths`` up to max_batch now (as at a server's warm-up), then time
    a first chunk at batch 1 and steady chunks at max_batch: eager, the decoder, and one compiled bucket
    when the decoder does not compile (skipped past the deadline)."""
    codec = decoder.codec
    t = time.perf_counter()
    decoder.prepare(lengths, max_batch)
    out = {"compile": decoder.compiled, "cuda_graphs": decoder.use_graphs, "lengths": decoder.lengths,
           "batch_sizes": list(decoder.batch_sizes), "graphs": decoder.n_graphs, "buckets": len(decoder.build_s),
           "build_s": sum(decoder.build_s.values()), "prepare_s": time.perf_counter() - t, "decode": []}
    rng, q = np.random.default_rng(3), codec.config.quantizer
    for n, T in ((1, plan.code_lengths()[0]), (max_batch, plan.code_lengths()[-1])):
        codes = np.concatenate([rng.integers(0, q.semantic_codebook_size, (1, T)),
                                rng.integers(0, q.codebook_size, (q.n_codebooks, T))])
        chunks, ref = [CodeChunk(0, codes, 0)] * n, decode_chunks(codec, [CodeChunk(0, codes, 0)])[0]
        ms = lambda decode: 1e3 * timed(lambda: decode(chunks), decoder.device, steps)  # noqa: E731
        err = lambda dec: max(float(np.abs(a - ref).max() / np.abs(ref).max())  # noqa: E731
                              for a in dec.decode(chunks))
        row = {"batch": n, "frames": T, "eager_ms": ms(lambda c: decode_chunks(codec, c)),
               "decoder_ms": ms(decoder.decode), "decoder_rel_err": err(decoder)}
        if n == max_batch and not decoder.compiled:
            if time.perf_counter() < deadline:
                one = ChunkDecoder(codec, batch_sizes=(n,), lengths=(T,), compile="on", cuda_graphs=decoder.use_graphs)
                one.prepare([T], n)
                row.update(compiled_ms=ms(one.decode), compiled_build_s=one.build_s[n, T], compiled_rel_err=err(one))
            else:
                row["compiled_ms"] = "skipped: past --budget-s"
        out["decode"].append(row)
    return out


def time_to_first_audio(engine: Engine, decoder: ChunkDecoder, voice_len: int, text_len: int, requests: int,
                        frame_s: float) -> dict:
    """Concurrency 1, cached voice: submit -> first chunk decoded (p50/p90 over ``requests``), and the
    playback gap of each whole stream with the codec in the loop."""
    cfg = engine.model_cfg
    g = torch.Generator().manual_seed(7)
    voice = torch.zeros(cfg.frame_rows, voice_len, dtype=torch.long)
    voice[0] = torch.randint(0, cfg.semantic_begin_id, (voice_len,), generator=g)
    sem = torch.arange(voice_len // 4, voice_len)  # most of a voice block is reference codes
    voice[1:, sem] = torch.randint(0, 1024, (cfg.num_codebooks, len(sem)), generator=g)
    voice[0, sem] = voice[1, sem] + cfg.semantic_begin_id
    codec_loop = CodecLoop(decoder, frame_s)
    plan = engine.cfg.chunk_plan

    def once(seed: int, frames: int) -> tuple[float | None, float]:
        player, arrivals, n_chunks, done = Player(), [], [None], threading.Event()

        def on_chunk(rid, index, now, seconds):   # codec thread
            player.add(now - t, seconds)
            arrivals.append(now - t)
            if len(arrivals) == n_chunks[0]:
                done.set()

        def sink(ev):                             # engine (this) thread
            if isinstance(ev, ChunkEvent):
                codec_loop.put(ev)
            elif isinstance(ev, Finished):
                n_chunks[0] = len(plan.sizes(ev.n_frames))
                if len(arrivals) == n_chunks[0]:
                    done.set()

        codec_loop.on_chunk = on_chunk
        sync(engine.runner.device)
        t = time.perf_counter()
        req = EngineRequest(torch.cat([voice, prompt(cfg, text_len, 1000 + seed)], 1), SamplingParams(seed=seed),
                            max_frames=frames, prefix_len=voice_len)
        engine.submit(req, sink)
        while engine.rows or engine.stats()["queued"]:
            engine.step()
        done.wait(60)
        return (arrivals[0] if arrivals else None), player.gap

    stream_frames = plan.first_chunk_frames + 3 * plan.chunk_frames
    once(0, stream_frames)  # warms the voice prefix, the first-chunk shapes and the codec
    once(1, stream_frames)
    runs = [r for r in (once(2 + i, stream_frames) for i in range(requests)) if r[0] is not None]
    codec_loop.close()
    return {"voice_prefix_tokens": voice_len, "text_tokens": text_len, "chunk_plan": plan.as_list(),
            "stream_frames": stream_frames, "ttfa_s": percentiles([r[0] for r in runs]),
            "playback_gap_s": percentiles([r[1] for r in runs]), "streams_with_gap": sum(r[1] > 0 for r in runs),
            "prefix_cache": engine.runner.prefix_cache.stats()}


def load(engine: Engine, decoder: ChunkDecoder, concurrency: int, seconds: float, warm_s: float, prompt_lens: tuple[int, int],
         frame_counts: tuple[int, int], frame_s: float) -> dict:
    """``concurrency`` requests in flight (closed loop), each with its own prompt and output length drawn
    uniformly from the ranges; the first ones join one per step so that lengths and phases spread out.
    Counted over the measured window: TTFA of requests submitted in it, playback gaps of streams that
    completed in it, audio decoded per wall second, the codec's GPU time over the window."""
    cfg, device = engine.model_cfg, engine.runner.device
    rng = np.random.default_rng(concurrency)
    codec_loop = CodecLoop(decoder, frame_s)
    state = {"next": 0, "open": True, "window": None}
    live: dict[str, dict] = {}
    ttfa, gaps, reasons = [], [], {}
    lock = threading.Lock()

    def submit() -> None:
        i = state["next"]
        state["next"] += 1
        req = EngineRequest(prompt(cfg, int(rng.integers(*prompt_lens)), i), SamplingParams(seed=i),
                            max_frames=int(rng.integers(*frame_counts)))
        with lock:
            live[req.request_id] = {"t": time.perf_counter(), "player": Player(), "chunks": 0, "total": None}
        engine.submit(req, sink)

    def finish_if_done(rid: str, info: dict) -> None:
        if info["total"] is not None and info["chunks"] == info["total"]:
            del live[rid]
            if state["window"] is not None and info["t"] >= state["window"]:
                gaps.append(info["player"].gap)

    def on_chunk(rid, index, now, secs):
        with lock:
            info = live.get(rid)
            if info is None:
                return
            if index == 0 and state["window"] is not None and info["t"] >= state["window"]:
                ttfa.append(now - info["t"])
            info["player"].add(now - info["t"], secs)
            info["chunks"] += 1
            finish_if_done(rid, info)

    def sink(ev) -> None:
        if isinstance(ev, ChunkEvent):
            codec_loop.put(ev)
        elif isinstance(ev, Finished):
            if state["window"] is not None:
                reasons[ev.reason] = reasons.get(ev.reason, 0) + 1
            with lock:
                info = live.get(ev.request_id)
                if info is not None and ev.reason in ("stop", "length"):
                    info["total"] = len(engine.cfg.chunk_plan.sizes(ev.n_frames))
                    finish_if_done(ev.request_id, info)
                elif info is not None:   # cancelled at the end (or failed): no whole stream to judge
                    del live[ev.request_id]
            if state["open"]:
                submit()

    codec_loop.on_chunk = on_chunk
    t0 = time.perf_counter()
    while state["next"] < concurrency:
        submit()
        engine.step()
    while time.perf_counter() - t0 < warm_s:
        engine.step()
    sync(device)
    f0, a0, g0 = engine.lifecycle.frames_generated, codec_loop.audio_s, codec_loop.gpu_s
    state["window"] = t = time.perf_counter()
    while (elapsed := time.perf_counter() - t) < seconds or (codec_loop.audio_s == a0 and elapsed < 10 * seconds):
        engine.step()   # the window: at least `seconds`, and until some audio was decoded in it (a busy machine)
    sync(device)
    dt = time.perf_counter() - t
    frames, audio, codec_gpu = engine.lifecycle.frames_generated - f0, codec_loop.audio_s - a0, codec_loop.gpu_s - g0
    state["open"] = False
    drain(engine)
    codec_loop.close()
    ended = reasons.get("stop", 0) + reasons.get("length", 0)
    return {"concurrency": concurrency, "seconds": dt, "prompt_lens": list(prompt_lens),
            "frame_counts": list(frame_counts), "frames": frames, "frames_per_s": frames / dt,
            "audio_s_per_s_codes": frames * frame_s / dt, "audio_s_per_s_decoded": audio / dt,
            "codec_gpu_share": codec_gpu / dt, "ttfa_s": percentiles(ttfa), "playback_gap_s": percentiles(gaps),
            "streams_with_gap": sum(g > 0 for g in gaps), "requests_ended_by_themselves": ended,
            "requests_cancelled": reasons.get("cancelled", 0), "end_reasons": dict(reasons)}


class Report:
    """The result object, written to ``path`` after every section, so that a run cut short keeps what it
    measured: a section that raises is recorded under "errors" (its error and traceback tail) and the
    run goes on; SIGTERM (``timeout``) records the section it interrupted, writes, and exits 124."""

    def __init__(self, result: dict, path: Path | None):
        self.result, self.path, self.current, self.t0 = result, path, None, time.perf_counter()
        self.write()

    def section(self, name: str, fn, fallback=None):
        """fn()'s value, or ``fallback`` when it raises (recorded); the result is written either way."""
        self.current, t = name, time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- one broken section must not lose the others
            self.result.setdefault("errors", {})[name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                                                          "traceback": traceback.format_exc()[-4000:]}
            return fallback
        finally:
            self.current = None
            self.result.setdefault("section_s", {})[name] = time.perf_counter() - t
            self.write()
            print(f"gpu_bench: {name} {'failed' if name in self.result.get('errors', {}) else 'done'} in "
                  f"{time.perf_counter() - t:.1f} s ({time.perf_counter() - self.t0:.0f} s in all)",
                  file=sys.stderr, flush=True)

    def write(self) -> None:
        self.result["total_s"] = time.perf_counter() - self.t0
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.result, indent=1, default=str))
            tmp.replace(self.path)

    def on_sigterm(self, signum, frame) -> None:
        self.result["interrupted"] = {"signal": signal.Signals(signum).name, "section": self.current,
                                      "at_s": time.perf_counter() - self.t0}
        self.write()
        print(f"gpu_bench: interrupted in {self.current}; partial result in {self.path}", file=sys.stderr, flush=True)
        os._exit(124)


def kv_bytes(engine: Engine) -> int:
    r = engine.runner
    return sum(c.k.numel() * c.k.element_size() * 2 for c in r.slow_cache + r.fast_cache)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny geometry on the CPU (checks the script)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--voice-len", type=int, default=256, help="voice prefix tokens for time to first audio")
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--ttfa-requests", type=int, default=20)
    ap.add_argument("--load-seconds", type=float, default=20.0)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds from the start after which no further compiled measurement starts (prefill "
                         "lengths, TTFA, load, KV 1k/2k, the codec's compiled bucket); the graph engine's always run")
    ap.add_argument("--codec-compile", choices=SWITCH_MODES, default="off",
                    help="torch.compile the codec decode inside its graphs (auto: on CUDA); every bucket compiles "
                         "(7 batch sizes x the plan's 6 code lengths; the dry run: one, always compiled)")
    ap.add_argument("--out", default=None, help="write gpu_bench_<device>.json here (default perf/results on a GPU)")
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device (use --dry-run to check the script on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    if args.dry_run:   # every section, one compiled bucket: batch 1 and 2 share bucket 2, one KV bucket
        slow, fast = PRESETS["tiny"]
        cfg = dataclasses.replace(DualARConfig.from_dict(S2_PRO_CONFIG_JSON), slow=slow, fast=fast)
        dtype, codec_cfg = torch.float32, CodecConfig.tiny()
        batches, kv_lens, args.steps, args.prompt_len, args.voice_len, args.text_len = [1, 2], [64, 96], 2, 24, 32, 8
        args.ttfa_requests, args.load_seconds, warm_s, loads = 2, 3.0, 0.5, [(2, (8, 24), (4, 12))]
        prefill_lens = [20, 40]    # one padded bucket (32), then two chunks of 32 and 8 (bucket 16)
        check_len = 120            # chunks of 32 and a padded 24
        eng = dict(max_active=2, max_prompt_tokens=128, max_frames=128, graph_batch_sizes=(2,), min_kv_bucket=256,
                   prefill_chunk_tokens=32)
        codec_batches, args.codec_compile = (2,), "on"   # the first chunk's length only: the others fall back
    else:
        cfg, dtype, codec_cfg = DualARConfig.from_dict(S2_PRO_CONFIG_JSON), torch.bfloat16, CodecConfig.s2_pro()
        batches, kv_lens, warm_s = [1, 64], [1000, 2000], 3.0
        loads = [(16, (64, 200), (50, 250)), (64, (64, 200), (50, 250))]   # KV stays in the 512 bucket
        prefill_lens = [16, 128, 512, 2000]   # 2000: four chunks of at most 512 (the admission budget)
        check_len = 1100                      # chunks of 512, 512 and a padded 76
        eng = dict(max_active=64, max_prompt_tokens=2048, max_frames=512, graph_batch_sizes=(1, 16, 64),
                   min_kv_bucket=512)
        codec_batches = BATCH_SIZES
    result = {**env_info(device), "dtype": str(dtype).replace("torch.", ""),
              "command": "python perf/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = args.out or (None if args.dry_run else str(Path(__file__).parent / "results"))
    path = None
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        tag = result["device"].lower().replace(" ", "_").replace("(", "").replace(")", "")
        path = Path(out) / f"gpu_bench_{tag}.json"
    report = Report(result, path)
    previous_sigterm = signal.signal(signal.SIGTERM, report.on_sigterm)
    model = random_model(cfg, device, dtype)
    codec = random_codec(codec_cfg, device, dtype)
    frame_s = codec_cfg.frame_length / codec_cfg.sample_rate
    result["model"] = {"slow_params": sum(p.numel() for p in model.slow.parameters()),
                       "fast_params": sum(p.numel() for p in model.fast.parameters()),
                       "codec": "S2-Pro codec" if not args.dry_run else "tiny codec"}
    result["setup_s"] = time.perf_counter() - t0
    copy_bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    result["copy_bandwidth_GBps"] = copy_bw / 1e9

    def run(name: str, fn, fallback=None, engine: Engine | None = None):
        """A section; the engine's bucket build times are recorded with it (the compile cost is what an
        interrupted run must keep); after a failure its requests in flight are cancelled (best effort)."""
        def measured():
            try:
                return fn()
            finally:
                if engine is not None:
                    result["build_s"]["compiled" if engine.runner.compiled else base] = {
                        str(k): v for k, v in engine.runner.build_s.items()}

        value = report.section(name, measured, fallback)
        if engine is not None and name in result.get("errors", {}):
            report.section(f"{name} (drain)", lambda: drain(engine))
        return value

    plan = EngineConfig(**eng).chunk_plan
    decoder = ChunkDecoder(codec, batch_sizes=codec_batches, lengths=(), compile=args.codec_compile)
    for name in ("self_check", "ttfa", "load", "build_s"):
        result[name] = {}

    def serve(engine: Engine, mode: str) -> None:
        """What a server does with an engine: the GPU-only paths' self check, time to first audio, load."""
        result["self_check"][mode] = run(f"self_check ({mode})", lambda: self_check(engine, eng, check_len),
                                         engine=engine)
        if mode != base and time.perf_counter() > deadline:   # the graph engine's always run: they compile nothing
            result["ttfa"][mode] = result["load"][mode] = "skipped: past --budget-s"
            return
        # the buckets TTFA and the load use (every prefill length, the step at their batches within the first
        # KV bucket), built now as at a server's start: no compile or capture inside a timed window
        result.setdefault("serving_warmup", {})[mode] = run(f"warm-up ({mode})", lambda: warm_up(
            engine, max(c for c, _, _ in loads), eng["min_kv_bucket"]), engine=engine)
        result["ttfa"][mode] = run(f"ttfa ({mode})", lambda: time_to_first_audio(
            engine, decoder, args.voice_len, args.text_len, args.ttfa_requests, frame_s), engine=engine)
        result["load"][mode] = [
            run(f"load {c} ({mode})", lambda: load(engine, decoder, c, args.load_seconds, warm_s, p, f, frame_s),
                {"concurrency": c}, engine) if mode == base or time.perf_counter() < deadline
            else {"concurrency": c, "skipped": "past --budget-s"} for c, p, f in loads]

    # graph: the eager step body in CUDA graphs (the engine before compilation; eager on the CPU). Its
    # captures take seconds, so everything is measured on it first, the codec and serving included.
    base = "graph" if device.type == "cuda" else "eager"
    engine = Engine(model, EngineConfig(**eng, max_queued=256, compile="off"))
    decode = result["decode"] = run("decode", lambda: decode_rows(engine, base, batches, [None] * len(batches),
                                                                  args.prompt_len, args.steps, copy_bw),
                                    [{"batch": n} for n in batches], engine)
    kv = result["kv"] = run("kv", lambda: decode_rows(engine, base, [max(batches)] * len(kv_lens), kv_lens,
                                                      args.prompt_len, args.steps, copy_bw),
                            [{"batch": max(batches)} for _ in kv_lens], engine)
    prof = result["profile"] = {base: run("profile", lambda: profile(engine, batches, args.prompt_len), engine=engine)}
    prefill = result["prefill"] = {base: run("prefill", lambda: prefill_times(engine, prefill_lens, args.steps),
                                             engine=engine)}
    lengths = plan.code_lengths()[:1] if args.dry_run else plan.code_lengths()
    result["codec"] = run("codec", lambda: codec_section(decoder, lengths, plan, eng["max_active"], args.steps,
                                                         deadline), {})
    serve(engine, base)
    del engine
    release_memory(device)

    # compiled: the same step through torch.compile, captured in the same graphs (fuses w1/w3 in the model).
    # Each bucket compiles (the unknown cost): the steps first, then prefill, serving and the KV-length
    # buckets while --budget-s lasts.
    engine = Engine(model, EngineConfig(**eng, max_queued=256, compile="on"))

    def merge(rows: list[dict], kvs: list[int | None]) -> None:
        for row, new in zip(rows, decode_rows(engine, "compiled", [r["batch"] for r in rows], kvs, args.prompt_len,
                                              args.steps, copy_bw, deadline)):
            row["compiled"] = new["compiled"]
            row.setdefault("kv_len", new["kv_len"])
            if isinstance(row.get(base), dict) and isinstance(new["compiled"], dict):
                row["speedup"] = row[base]["step_ms"] / new["compiled"]["step_ms"]

    run("decode (compiled)", lambda: merge(decode, [None] * len(batches)), engine=engine)
    if "decode (compiled)" in result.get("errors", {}):
        result["compiled"] = "failed: see errors (every other section ran on the graphs)"
    else:
        result["compiled"] = "ran"
        prof["compiled"] = run("profile (compiled)", lambda: profile(engine, batches, args.prompt_len), engine=engine)
        prefill["compiled"] = run("prefill (compiled)", lambda: prefill_times(engine, prefill_lens, args.steps,
                                                                              deadline), engine=engine)
        serve(engine, "compiled")
        run("kv (compiled)", lambda: merge(kv, kv_lens), engine=engine)
    result["codec"]["chunks"] = dict(decoder.chunks)
    result["memory"] = {"kv_cache_bytes": kv_bytes(engine), "peak_allocated_bytes":
                        torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    report.write()
    signal.signal(signal.SIGTERM, previous_sigterm)
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
