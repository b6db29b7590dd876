"""Reading reference audio (any common format and rate) and writing WAV files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate`` (channels averaged, resampled with soxr)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise ValueError(f"reference audio {path}: cannot read it ({e})") from None
    if data.shape[0] == 0:
        raise ValueError(f"reference audio {path}: no samples")
    return to_rate(data.mean(axis=1), rate, sample_rate)


def to_rate(samples: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)
    if rate != sample_rate:
        samples = soxr.resample(samples, rate, sample_rate, quality="HQ").astype(np.float32)
    return samples


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV (what players and the OpenAI speech API expect)."""
    sf.write(str(path), np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16")
