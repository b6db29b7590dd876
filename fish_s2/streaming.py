"""Decoding streamed code chunks to audio with the torch codec (the chunking itself is
:class:`fish_s2.request.Chunker`): stateless per chunk, so chunks of equal length batch together."""

from __future__ import annotations

import numpy as np

from .chunk_decoder import ChunkDecoder
from .request import CodeChunk


def decode_chunks(codec, chunks: list[CodeChunk]) -> list[np.ndarray]:
    """Audio (float32, n_frames * frame_length samples) of each chunk, its context's samples dropped:
    eager, each chunk at its own length (graphed or compiled buckets: :class:`ChunkDecoder`)."""
    return ChunkDecoder(codec, compile="off", cuda_graphs=False).decode(chunks)
