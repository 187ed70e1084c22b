"""Audio in: decode a file, downmix to mono and resample to the model's 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """An audio file could not be read or holds no usable samples."""


def load_audio(path: str | Path) -> np.ndarray:
    """Decode any format libsndfile reads (WAV, FLAC, OGG/Opus, MP3, ...) as float32 16 kHz mono."""
    if not Path(path).is_file():
        raise AudioError(f"{path}: no such file")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"{path}: cannot decode audio ({exc})") from None
    # samples: (frames, channels) -> (frames,)
    mono = samples.mean(axis=1, dtype=np.float32)
    return to_model_rate(mono, rate)


def to_model_rate(mono: np.ndarray, rate: int) -> np.ndarray:
    """Resample mono float32 audio to 16 kHz with soxr's high-quality band-limited filter."""
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate == SAMPLE_RATE or mono.size == 0:
        return mono
    return soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
