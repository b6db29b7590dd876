"""Text (+ optional reference voice) to audio in one process, with the reference generator.

This is what ``fish-s2 synthesize`` runs; the serving path uses the batched engine instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .checkpoint import S2Checkpoint
from .generate import generate_long
from .prompt import PromptBuilder, Reference
from .request import SamplingParams


@torch.inference_mode()
def encode_reference(ck: S2Checkpoint, samples: np.ndarray) -> Tensor:
    """Codes [num_codebooks, T] of mono ``samples`` at the codec's sample rate."""
    if samples.size == 0:
        raise ValueError("reference audio: no samples")
    audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    codec_param = next(ck.codec.parameters())
    audio = audio.to(codec_param.device, codec_param.dtype)[None, None]
    return ck.codec.encode(audio)[0].cpu()


@torch.inference_mode()
def synthesize(ck: S2Checkpoint, text: str, references: list[Reference], params: SamplingParams,
               max_new_frames: int, chunk_length: int = 300,
               on_frame: Callable[[int], None] | None = None) -> tuple[np.ndarray, Tensor]:
    """Audio samples (float32, codec sample rate) and the codes [num_codebooks, F] they decode from."""
    builder = PromptBuilder(ck.tokenizer, ck.config.num_codebooks)
    codes = [r.generation.codes for r in
             generate_long(ck.model, builder, text, references, params, max_new_frames, chunk_length,
                           on_frame=on_frame)]
    all_codes = torch.cat(codes, dim=1)
    if all_codes.shape[1] == 0:
        return np.zeros(0, dtype=np.float32), all_codes
    codec_param = next(ck.codec.parameters())
    audio = ck.codec.decode(all_codes[None].to(codec_param.device))[0, 0]
    return audio.float().cpu().numpy(), all_codes
