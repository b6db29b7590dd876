"""ChunkDecoder on the CPU: eager it is decode_chunks; compiled (the path CUDA graphs capture) it pads
chunks to (batch, length) buckets and matches eager within 1e-4 of the audio's scale, padding rows and
padding frames change no chunk's audio, chunks above the buckets fall back (longer) or are split
(more); bad chunks are refused naming the chunk and the fault. Compiling the tiny codec costs about
2 minutes of C++ on a cold inductor cache, so the file compiles one bucket shape, (2, 10)."""

import dataclasses

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from fish_s2.chunk_decoder import ChunkDecoder
from fish_s2.codec import Codec
from fish_s2.request import ChunkPlan, Chunker, CodeChunk
from fish_s2.streaming import decode_chunks

PLAN = ChunkPlan(first_chunk_frames=4, chunk_frames=6, context_frames=4, ramp=False)   # lengths 4, 10, 10, 8


def _codes(T: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)   # residual codes up to 4095 as the LLM emits them (the codec clamps)
    return np.concatenate([g.integers(0, 4096, (1, T)), g.integers(0, 1024, (9, T))]).astype(np.int64)


def _stream(codes: np.ndarray, plan: ChunkPlan) -> list[CodeChunk]:
    chunker = Chunker(plan)
    chunks = [c for t in range(codes.shape[1]) if (c := chunker.push(codes[:, t])) is not None]
    return chunks + [c for c in [chunker.flush()] if c is not None]


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_eager_is_each_chunk_decoded_alone(tiny):
    """Each chunk of its own length: exactly the codec's decode of that chunk, its context dropped; the
    default decoder on the CPU is this eager path."""
    codec, fl = tiny.codec, tiny.codec.frame_length
    chunks = [CodeChunk(i, _codes(T, i), ctx) for i, (T, ctx) in enumerate([(5, 0), (9, 4), (3, 2)])]
    with torch.inference_mode():
        alone = [codec.decode(torch.from_numpy(c.codes)[None])[0, 0, c.context * fl:].numpy() for c in chunks]
    decoder = ChunkDecoder(codec)
    assert not decoder.bucketed and decoder.stream is None
    for got in (decode_chunks(codec, chunks), decoder.decode(chunks)):
        assert all(g.dtype == np.float32 and np.array_equal(g, a) for g, a in zip(got, alone))


@pytest.fixture(scope="module")
def codec8(tiny):
    """The tiny codec with an 8-position RoPE table in its decode transformer: a 10-frame bucket grows it."""
    cfg, q = tiny.codec.config, tiny.codec.config.quantizer
    cfg = dataclasses.replace(cfg, quantizer=dataclasses.replace(
        q, post_module=dataclasses.replace(q.post_module, block_size=8)))
    return Codec.from_state_dict(tiny.codec.state_dict(), cfg)


@pytest.fixture(scope="module")
def compiled(codec8):
    """A compiled decoder with one bucket, (2, 10), built on first use by 8 chunks of lengths 4-10 (in 4
    pieces) next to a 12-frame chunk (eager); with the number of graphs dynamo compiled for it and the
    chunks decoded each way."""
    chunks = _stream(_codes(20, 1), PLAN) + _stream(_codes(20, 2), PLAN) + [CodeChunk(0, _codes(12, 3), 3)]
    decoder = ChunkDecoder(codec8, batch_sizes=(2,), lengths=(10,), compile="on")
    assert codec8.quantizer.post_module.rope.shape[0] == 8
    before = counters["stats"]["unique_graphs"]
    out = decoder.decode(chunks)
    return decoder, chunks, out, counters["stats"]["unique_graphs"] - before, dict(decoder.chunks)


def test_compiled_matches_eager_and_falls_back(compiled):
    decoder, chunks, out, graphs, ways = compiled
    assert sorted({c.codes.shape[1] for c in chunks}) == [4, 8, 10, 12]
    assert list(decoder.build_s) == [(2, 10)] and decoder.build_s[2, 10] > 0 and decoder.n_graphs == 0
    assert graphs == 1   # one static compile: the RoPE table grew before it, not inside it
    assert ways == {"bucketed": 8, "eager": 1}
    eager = decode_chunks(decoder.codec, chunks)
    assert all(_close(o, e) for o, e in zip(out, eager))
    assert [len(o) for o in out] == [c.n_frames * decoder.codec.frame_length for c in chunks]
    assert np.array_equal(out[-1], eager[-1])   # longer than every bucket: the eager decode itself


def test_padding_changes_no_chunk(compiled):
    """A chunk alone (a zero row beside it) or beside another; a chunk right-padded from 8 to 10 frames
    or followed by 2 real frames: the same samples, to the bit (the same compiled code)."""
    decoder, fl = compiled[0], compiled[0].codec.frame_length
    a, b, long = _codes(8, 4), _codes(10, 5), _codes(10, 6)
    alone = decoder.decode([CodeChunk(0, a, 2)])[0]
    beside = decoder.decode([CodeChunk(0, a, 2), CodeChunk(0, b, 0)])[0]
    followed = decoder.decode([CodeChunk(0, np.concatenate([a, long[:, 8:]], 1), 2)])[0]
    assert np.array_equal(alone, beside) and np.array_equal(alone, followed[:6 * fl])
    assert list(decoder.build_s) == [(2, 10)]


def test_prepare_builds_the_buckets_decode_uses(compiled, codec8):
    decoder, chunks, out = compiled[:3]
    ready = ChunkDecoder(codec8, batch_sizes=(2,), lengths=(), compile="on")
    assert ready.prepare([10], max_batch=64) == 1 and list(ready.build_s) == [(2, 10)]   # capped at bucket 2
    got = ready.decode(chunks)
    assert list(ready.build_s) == [(2, 10)] and all(np.array_equal(g, o) for g, o in zip(got, out))


@pytest.mark.parametrize("codes, context, error", [
    (np.zeros((9, 5), np.int64), 0, r"chunks\[1\]: codes have 9 codebooks, the codec takes 10"),
    (np.full((10, 5), -1), 0, r"chunks\[1\]: codes must be in \[0, 4096\), got -1\.\.-1"),
    (np.full((10, 5), 4096), 0, r"chunks\[1\]: codes must be in \[0, 4096\), got 4096\.\.4096"),
    (np.zeros((10, 5), np.float32), 0, r"chunks\[1\]: codes must be an integer array \[codebooks, frames\], "
                                       r"got float32 \[10, 5\]"),
    (np.zeros(10, np.int64), 0, r"chunks\[1\]: codes must be an integer array"),
    (np.zeros((10, 5), np.int64), 5, r"chunks\[1\]: context 5 must leave at least one of its 5 frames"),
])
def test_bad_chunks_are_refused(tiny, codes, context, error):
    good = CodeChunk(0, np.zeros((10, 5), np.int64), 0)
    with pytest.raises(ValueError, match=error):
        ChunkDecoder(tiny.codec).decode([good, CodeChunk(1, codes, context)])


def test_bad_compile_mode_is_refused(tiny):
    with pytest.raises(ValueError, match=r"compile: expected one of \['auto', 'on', 'off'\], got 'yes'"):
        ChunkDecoder(tiny.codec, compile="yes")
