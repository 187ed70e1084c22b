"""Log-mel features of a growing utterance, bit-identical to ``Qwen3ASRFeatureExtractor`` on every prefix.

The reference computes, over the whole clip: a centred STFT (reflect padding of n_fft/2 at both
ends, the last frame dropped), Slaney mel power, ``log10(clamp(x, 1e-10))``, then
``max(x, max_over_clip - 8)`` and ``(x + 4) / 4``. Two things tie a frame to the clip's end:

- the right reflect padding reaches only frames whose window passes the last sample, so every
  other frame is *final*: its raw log-mel never changes again and is computed once;
- the clamp floor follows the maximum over *all* frames, so normalisation is redone on every
  read from the stored raw values and the running maximum (cheap, elementwise).

Clips shorter than the reference's 0.5 s minimum are zero-padded to it, as the reference does.
"""

from __future__ import annotations

import numpy as np
import torch

N_FFT = 400
HOP = 160
HALF = N_FFT // 2
MIN_SAMPLES = 8_000  # the reference zero-pads shorter clips to 0.5 s
DYNAMIC_RANGE = 8.0  # log10 units kept below the loudest frame
MIN_COLUMNS = 32  # the narrowest mel product that rounds as a wide one does (see _raw)


class IncrementalMel:
    """Append audio, read normalised log-mel frames ``(n_mels, n_frames)`` for everything so far."""

    def __init__(self, mel_filters: np.ndarray) -> None:
        self._filters_t = torch.from_numpy(np.ascontiguousarray(mel_filters.T, dtype=np.float32))
        self._window = torch.hann_window(N_FFT)
        self._samples = np.zeros(MIN_SAMPLES * 4, dtype=np.float32)  # grows by doubling
        self.n_samples = 0
        self._final: list[torch.Tensor] = []  # raw log-mel blocks of final frames, (n_mels, k) each
        self.n_final = 0
        self._final_max = -float("inf")

    @property
    def samples(self) -> np.ndarray:
        return self._samples[: self.n_samples]

    def append(self, pcm: np.ndarray) -> None:
        needed = self.n_samples + pcm.size
        if needed > self._samples.size:
            grown = np.zeros(max(needed, 2 * self._samples.size), dtype=np.float32)
            grown[: self.n_samples] = self.samples
            self._samples = grown
        self._samples[self.n_samples : needed] = pcm
        self.n_samples = needed
        self._freeze_final_frames()

    def truncate(self, n_samples: int) -> None:
        """Forget the audio after ``n_samples`` (an utterance that ends before the newest audio)."""
        if n_samples >= self.n_samples:
            return
        self.n_samples = n_samples
        keep = _final_frames(n_samples)  # at most self.n_final: frames kept exist in self._final
        if keep:
            raw = torch.cat(self._final, dim=1)[:, :keep]
            self._final = [raw]
            self._final_max = float(raw.max())
        else:
            self._final = []
            self._final_max = -float("inf")
        self.n_final = keep

    def features(self) -> torch.Tensor:
        """Normalised log-mel of the whole utterance so far: (n_mels, n_frames)."""
        if self.n_samples < MIN_SAMPLES:
            padded = np.zeros(MIN_SAMPLES, dtype=np.float32)
            padded[: self.n_samples] = self.samples
            return _normalise(self._raw(_reflect_both(padded), 0, MIN_SAMPLES // HOP))
        n_frames = self.n_samples // HOP
        tail = self._raw(self._right_padded_tail(), 0, n_frames - self.n_final)
        raw = torch.cat([*self._final, tail], dim=1)
        floor_max = max(self._final_max, float(tail.max())) if tail.numel() else self._final_max
        return _normalise(raw, floor_max)

    def _freeze_final_frames(self) -> None:
        # Frame t spans samples [HOP*t - HALF, HOP*t + HALF): final once that end exists.
        n_final = _final_frames(self.n_samples)
        if n_final <= self.n_final:
            return
        start = HOP * self.n_final - HALF
        if start < 0:  # the first frames see the left reflect padding
            block = self._raw(_reflect_left(self.samples), self.n_final, n_final)
        else:
            block = self._raw(self.samples[start:], 0, n_final - self.n_final)
        self._final.append(block)
        self._final_max = max(self._final_max, float(block.max()))
        self.n_final = n_final

    def _right_padded_tail(self) -> np.ndarray:
        """Samples from the first provisional frame on, with the reference's right reflect padding."""
        start = HOP * self.n_final - HALF  # may be negative only before any frame is final
        right = self.samples[-HALF - 1 : -1][::-1]
        if start < 0:
            return np.concatenate([_reflect_left(self.samples), right])
        return np.concatenate([self.samples[start:], right])

    def _raw(self, padded: np.ndarray, first: int, end: int) -> torch.Tensor:
        """Raw log10 mel power of frames [first, end) of a signal already padded on the left."""
        if end <= first:
            return torch.zeros(self._filters_t.shape[0], 0)
        signal = torch.from_numpy(np.ascontiguousarray(padded[HOP * first : HOP * (end - 1) + N_FFT]))
        spectrum = torch.stft(signal, N_FFT, HOP, window=self._window, center=False, return_complex=True)
        power = spectrum.abs() ** 2  # (n_fft/2 + 1, frames)
        frames = power.shape[1]
        if frames < MIN_COLUMNS:
            # BLAS picks other kernels for narrow products (matrix-vector for one column, small-n
            # paths for a few more on AVX512/AMX CPUs), which round differently from the
            # reference's product over the whole clip: multiply at least MIN_COLUMNS, keep ours.
            power = torch.nn.functional.pad(power, (0, MIN_COLUMNS - frames))
        return torch.clamp(self._filters_t @ power, min=1e-10).log10()[:, :frames]


def _final_frames(n_samples: int) -> int:
    """Frames of a clip of ``n_samples`` that no later audio can change."""
    if n_samples < MIN_SAMPLES:
        return 0  # the clip is still zero-padded to the minimum length
    return min(n_samples // HOP, (n_samples - HALF) // HOP + 1)


def _reflect_left(samples: np.ndarray) -> np.ndarray:
    return np.concatenate([samples[1 : HALF + 1][::-1], samples])


def _reflect_both(samples: np.ndarray) -> np.ndarray:
    return np.concatenate([_reflect_left(samples), samples[-HALF - 1 : -1][::-1]])


def _normalise(raw: torch.Tensor, loudest: float | None = None) -> torch.Tensor:
    loudest = float(raw.max()) if loudest is None else loudest
    return (torch.maximum(raw, torch.tensor(loudest - DYNAMIC_RANGE)) + 4.0) / 4.0
