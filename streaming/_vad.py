"""Utterance segmentation by voice activity (webrtcvad), in 30 ms frames of 16 kHz audio.

An utterance opens when enough of the recent frames are voiced, starting ``pad_ms`` before the
first of them; it closes after ``end_silence_ms`` of unvoiced frames, ``pad_ms`` after the last
voiced one; one that reaches ``max_utterance_s`` is cut at its quietest frame in the last third
and a new one continues from there. Positions are absolute sample indices of the stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import webrtcvad

from ._events import SAMPLE_RATE, CloseReason

FRAME = 480  # 30 ms at 16 kHz, one of the frame sizes webrtcvad accepts
FRAME_MS = 30


@dataclass(frozen=True)
class VadOptions:
    aggressiveness: int = 2  # webrtcvad mode: 0 (least) .. 3 (most eager to call audio non-speech)
    start_ms: int = 180  # voiced audio within the last 300 ms that opens an utterance
    end_silence_ms: int = 600  # unvoiced audio that closes it
    pad_ms: int = 300  # audio kept before the first and after the last voiced frame
    max_utterance_s: float = 30.0  # longer utterances are cut at a quiet point

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError("vad aggressiveness must be 0, 1, 2 or 3")
        if not 0 < self.start_ms <= 300:
            raise ValueError("start_ms must be in (0, 300]")
        if self.end_silence_ms < FRAME_MS or self.pad_ms < 0:
            raise ValueError("end_silence_ms must be at least 30 and pad_ms not negative")
        if self.max_utterance_s < 2:
            raise ValueError("max_utterance_s must be at least 2")


@dataclass(frozen=True)
class Opened:
    start: int


@dataclass(frozen=True)
class Closed:
    end: int
    reason: CloseReason


class Segmenter:
    """Feed 30 ms frames in order; get the opening and closing points of utterances."""

    _WINDOW = 10  # frames looked at to decide that speech started (300 ms)

    def __init__(self, options: VadOptions = VadOptions()) -> None:
        self.options = options
        self._vad = webrtcvad.Vad(options.aggressiveness)
        self._recent: deque[tuple[int, bool]] = deque(maxlen=self._WINDOW)  # (frame start, voiced)
        self._pad = options.pad_ms * SAMPLE_RATE // 1000
        self._start_frames = -(-options.start_ms // FRAME_MS)
        self._end_frames = -(-options.end_silence_ms // FRAME_MS)
        self._max = int(options.max_utterance_s * SAMPLE_RATE)
        self.start: int | None = None  # the open utterance's first sample
        self._last_voiced_end = 0
        self._silent_frames = 0
        self._energy: list[tuple[int, float]] = []  # (frame start, energy) of the open utterance

    @property
    def in_speech(self) -> bool:
        return self.start is not None

    @property
    def tentative_end(self) -> int | None:
        """Where the open utterance closes if no voiced frame follows: ``pad_ms`` after its last voiced
        frame, once the frames up to there have been classified, all unvoiced (else None)."""
        if self.start is None or not self._silent_frames or self._silent_frames * FRAME < self._pad:
            return None
        return self._last_voiced_end + self._pad

    def frame(self, position: int, samples: npt.NDArray[np.float32]) -> list[Opened | Closed]:
        """Classify the frame that starts at ``position``; ``samples`` is float32 in [-1, 1]."""
        pcm16 = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        voiced = self._vad.is_speech(pcm16, SAMPLE_RATE)
        end = position + FRAME
        if self.start is None:
            return self._idle_frame(position, voiced)
        self._energy.append((position, float(np.dot(samples, samples))))
        if voiced:
            self._last_voiced_end, self._silent_frames = end, 0
        else:
            self._silent_frames += 1
        if self._silent_frames >= self._end_frames:
            return [self._close(min(self._last_voiced_end + self._pad, end), "silence")]
        if end - self.start >= self._max:
            cut = self._quietest_point(self.start)
            return [self._close(cut, "max_length"), self._open(cut)]
        return []

    def close(self, end: int) -> list[Closed]:
        """End of stream: close the open utterance, if any, at ``end``."""
        if self.start is None:
            return []
        return [self._close(min(self._last_voiced_end + self._pad, end), "finish")]

    def _idle_frame(self, position: int, voiced: bool) -> list[Opened | Closed]:
        self._recent.append((position, voiced))
        if sum(v for _, v in self._recent) < self._start_frames:
            return []
        first_voiced = next(p for p, v in self._recent if v)
        self._recent.clear()
        opened = self._open(max(0, first_voiced - self._pad))
        self._energy = []
        self._last_voiced_end = position + FRAME
        return [opened]

    def _open(self, start: int) -> Opened:
        self.start = start
        self._silent_frames = 0
        self._energy = [(p, e) for p, e in self._energy if p >= start]
        return Opened(start)

    def _close(self, end: int, reason: CloseReason) -> Closed:
        self.start = None
        return Closed(end, reason)

    def _quietest_point(self, start: int) -> int:
        """The quietest point of the last third of the utterance open at ``start``."""
        earliest = start + (2 * self._max) // 3
        candidates = [(e, p) for p, e in self._energy if p >= earliest] or [(0.0, start + self._max)]
        _, position = min(candidates)
        return position + FRAME // 2
