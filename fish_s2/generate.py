"""Reference single-request generation, step for step as upstream ``generate`` / ``generate_long``.

This is the plain, unbatched path: the oracle the batched engine is tested against and what the
parity checker drives. Each call allocates its own one-slot KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .dual_ar import DualAR, FrameRecord, decode_frame
from .prompt import PromptBuilder, Reference, text_batches
from .request import SamplingParams
from .sampling import BatchSampling, empty_window, seed_to_key


@dataclass
class Generation:
    prompt: Tensor                 # [n+1, T]
    frames: Tensor                 # [n+1, F] generated columns (main token id, then codes)
    stopped_on_eos: bool
    records: list[FrameRecord] = field(default_factory=list)

    @property
    def codes(self) -> Tensor:
        """Codes [n, F-1] as upstream yields them: the last column is always dropped (it is the
        <|im_end|> frame when generation stopped, and upstream drops it on the frame limit too)."""
        return self.frames[1:, :-1]


@torch.inference_mode()
def generate(model: DualAR, prompt: Tensor, max_new_frames: int, params: SamplingParams,
             noise_key: int | None = None, record: bool = False,
             on_frame: Callable[[int], None] | None = None) -> Generation:
    """Prefill ``prompt`` [n+1, T], then decode frames until <|im_end|> or ``max_new_frames``."""
    cfg = model.cfg
    device = model.slow.embeddings.weight.device
    T = prompt.shape[1]
    if T >= cfg.slow.max_seq_len:
        raise ValueError(f"prompt: {T} tokens, the model allows {cfg.slow.max_seq_len - 1}")
    max_new_frames = min(max_new_frames, cfg.slow.max_seq_len - T)
    slow_cache, fast_cache = model.slow.new_cache(1, T + max_new_frames), model.fast.new_cache(1)
    sampling = BatchSampling.of([params], device, keys=None if noise_key is None else [noise_key])
    audio_ids = model.slow.audio_token_ids()
    records: list[FrameRecord] | None = [] if record else None
    window = empty_window(1, device)

    x = prompt[None].to(device)
    pos = torch.arange(T, device=device)[None]
    frames = []
    for i in range(max_new_frames):
        hidden = model.slow(x, pos, slice(0, 1), cache=slow_cache)[:, -1]
        frame = decode_frame(model, hidden, sampling, torch.tensor([i], device=device),
                             window if i > 0 else None, audio_ids, fast_cache, slice(0, 1), records)
        frames.append(frame[0])
        if on_frame is not None:
            on_frame(i)
        if int(frame[0, 0]) == cfg.eos_id:
            break
        if i > 0:  # upstream never puts the prefill frame's token in the repetition window
            window = torch.cat([window[:, 1:], frame[:, :1]], dim=1)
        x, pos = frame[:, :, None], torch.tensor([[T + i]], device=device)
    stopped = bool(frames) and int(frames[-1][0]) == cfg.eos_id
    return Generation(prompt, torch.stack(frames, dim=1).cpu(), stopped, records or [])


@dataclass
class BatchResult:
    text: str
    generation: Generation


def generate_long(model: DualAR, builder: PromptBuilder, text: str, references: list[Reference],
                  params: SamplingParams, max_new_frames: int, chunk_length: int = 300,
                  noise_keys: Callable[[int], int] | None = None, record: bool = False,
                  on_frame: Callable[[int], None] | None = None, generate_fn=None) -> Iterator[BatchResult]:
    """Upstream ``generate_long``: split ``text`` into speaker-turn batches, generate each with the
    earlier batches' codes as assistant history, yield one result per batch.

    ``noise_keys(batch_index)`` gives the noise key of each batch (default: derived from the seed and
    the batch index, so batches draw independent noise). ``generate_fn`` replaces :func:`generate`
    (same signature), e.g. to run the batches through the engine's runner.
    """
    if not text.strip():
        raise ValueError("text: must not be empty")
    history = [builder.system(references)]
    for b, batch_text in enumerate(text_batches(text, chunk_length)):
        history.append(builder.user(batch_text))
        prompt = torch.cat([*history, builder.assistant_start()], dim=1)
        key = noise_keys(b) if noise_keys is not None else seed_to_key(params.seed + b)
        gen = (generate_fn or generate)(model, prompt, max_new_frames, params, key, record, on_frame)
        history.append(builder.assistant_turn(gen.codes))
        yield BatchResult(batch_text, gen)
