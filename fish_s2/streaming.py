"""Decoding streamed code chunks to audio with the torch codec (the chunking itself is
:class:`fish_s2.request.Chunker`): stateless per chunk, so chunks of equal length batch together."""

from __future__ import annotations

import numpy as np
import torch

from .request import CodeChunk


def decode_chunks(codec, chunks: list[CodeChunk]) -> list[np.ndarray]:
    """Audio (float32, n_frames * frame_length samples) of each chunk, its context's samples dropped."""
    param = next(codec.parameters())
    out: list[np.ndarray | None] = [None] * len(chunks)
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        by_len.setdefault(c.codes.shape[1], []).append(i)
    with torch.inference_mode():
        for idx in by_len.values():
            codes = torch.from_numpy(np.stack([chunks[i].codes for i in idx])).to(param.device)
            audio = codec.decode(codes)[:, 0].float().cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = audio[row, chunks[i].context * codec.frame_length:]
    return out
