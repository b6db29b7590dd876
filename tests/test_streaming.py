"""Chunk plans and stateless chunked codec decoding."""

import numpy as np
import pytest
import torch

from fish_s2.request import ChunkPlan, Chunker, InvalidArgument
from fish_s2.streaming import decode_chunks


def _stream(codes, plan):
    chunker, chunks = Chunker(plan), []
    for t in range(codes.shape[1]):
        c = chunker.push(codes[:, t])
        if c is not None:
            chunks.append(c)
    last = chunker.flush()
    return chunks + ([last] if last is not None else [])


def test_chunker_sizes_and_context():
    codes = np.arange(10 * 40).reshape(10, 40)
    chunks = _stream(codes, ChunkPlan(first_chunk_frames=3, chunk_frames=10, context_frames=4))
    assert [c.n_frames for c in chunks] == [3, 10, 10, 10, 7]
    assert [c.context for c in chunks] == [0, 3, 4, 4, 4]
    assert np.array_equal(np.concatenate([c.codes[:, c.context:] for c in chunks], 1), codes)
    assert np.array_equal(chunks[2].codes, codes[:, 9:23])
    assert _stream(codes[:, :3], ChunkPlan(first_chunk_frames=3))[-1].n_frames == 3  # nothing left to flush


@pytest.mark.parametrize("field", ["first_chunk_frames", "chunk_frames", "context_frames"])
def test_plan_validation_names_the_field(field):
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        ChunkPlan(**{field: -1})


def test_streamed_decode_matches_full_decode(tiny):
    """Default plan on the tiny codec: exact sample count, SNR >= 30 dB against one full decode."""
    codec = tiny.codec
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.randint(0, 4096, (1, 90), generator=g), torch.randint(0, 1024, (9, 90), generator=g)])
    with torch.inference_mode():
        full = codec.decode(codes[None])[0, 0].numpy()
    plan = ChunkPlan()
    chunks = _stream(codes, plan)
    streamed = np.concatenate(decode_chunks(codec, chunks))
    assert len(streamed) == len(full) == 90 * codec.frame_length
    snr = 10 * np.log10(np.sum(full ** 2) / np.sum((full - streamed) ** 2))
    assert snr >= 30, snr
    # the first chunk has no context: exact
    n0 = plan.first_chunk_frames * codec.frame_length
    assert np.allclose(streamed[:n0], full[:n0], atol=1e-5)
    # without context the later chunks are much worse: the context is what buys the SNR
    no_ctx = np.concatenate(decode_chunks(codec, _stream(codes, ChunkPlan(context_frames=0))))
    snr0 = 10 * np.log10(np.sum(full ** 2) / np.sum((full - no_ctx) ** 2))
    assert snr0 < snr - 10


def test_chunks_of_different_requests_decode_in_one_batch(tiny):
    g = torch.Generator().manual_seed(1)
    a = _stream(torch.randint(0, 1024, (10, 60), generator=g), ChunkPlan())
    b = _stream(torch.randint(0, 1024, (10, 60), generator=g), ChunkPlan())
    together = decode_chunks(tiny.codec, a + b)
    alone = decode_chunks(tiny.codec, a) + decode_chunks(tiny.codec, b)
    for x, y in zip(together, alone):
        assert np.allclose(x, y, atol=1e-5)
