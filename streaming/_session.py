"""The sans-I/O streaming session: PCM in, events and transcription jobs out.

No sockets, no threads, no torch. The transport feeds audio and forwards events; whoever owns
the model asks for the next job, runs it and hands the result back::

    events = session.feed(pcm)
    while (job := session.next_job()) is not None:
        hypothesis = engine.transcribe(job.segment, job.audio, job.final)
        events += session.complete(job, hypothesis.token_ids, hypothesis.text, hypothesis.language)

Finals are queued and never dropped. A partial job always covers the newest audio, so when the
engine falls behind, partials coalesce (latest wins) instead of piling up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ._events import SAMPLE_RATE, Event, Final, Partial, SpeechStarted, SpeechStopped
from ._text import stable_prefix
from ._vad import FRAME, Closed, Opened, Segmenter, VadOptions


@dataclass(frozen=True)
class SessionOptions:
    vad: VadOptions = field(default_factory=VadOptions)
    partials: bool = True
    partial_interval_ms: int = 1000  # audio between partial updates of one utterance

    def __post_init__(self) -> None:
        if self.partial_interval_ms < 100:
            raise ValueError("partial_interval_ms must be at least 100")


@dataclass(frozen=True)
class Job:
    """Transcribe ``audio`` = the utterance ``segment`` from ``start`` to ``end`` (samples)."""

    segment: int
    start: int
    end: int
    final: bool
    audio: npt.NDArray[np.float32]  # float32, 16 kHz mono, end - start samples


class Session:
    """One audio stream. ``feed`` 16 kHz mono float32 PCM in any chunk sizes; ``finish`` at the end."""

    def __init__(self, options: SessionOptions = SessionOptions()) -> None:
        self.options = options
        self._segmenter = Segmenter(options.vad)
        self._interval = options.partial_interval_ms * SAMPLE_RATE // 1000
        self._buffer = np.zeros(0, dtype=np.float32)  # stream audio from sample _offset on
        self._offset = 0
        self._pending = np.zeros(0, dtype=np.float32)  # less than one VAD frame, not yet classified
        self._finals: deque[Job] = deque()
        self._segment = -1
        self._utterance_start = 0
        self._partial_end = 0  # audio end of the last partial job of the open utterance
        self._last_text: dict[int, str] = {}
        self._finalized = -1  # the last segment whose final was completed
        self.finished = False

    @property
    def position(self) -> int:
        """Samples classified so far."""
        return self._offset + self._buffer.size

    @property
    def pending_finals(self) -> int:
        """Closed utterances whose final job has not been taken yet."""
        return len(self._finals)

    @property
    def segments(self) -> int:
        """Utterances opened so far."""
        return self._segment + 1

    def feed(self, pcm: np.ndarray) -> list[Event]:
        if self.finished:
            raise RuntimeError("feed() after finish()")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        audio = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        usable = audio.size - audio.size % FRAME
        self._pending = audio[usable:].copy()
        base = self.position
        self._buffer = np.concatenate([self._buffer, audio[:usable]])
        events: list[Event] = []
        for begin in range(0, usable, FRAME):
            events += self._apply(self._segmenter.frame(base + begin, audio[begin : begin + FRAME]))
        self._trim()
        return events

    def finish(self) -> list[Event]:
        """End of stream: the trailing partial frame is kept and the open utterance is closed."""
        if self.finished:
            return []
        self.finished = True
        self._buffer = np.concatenate([self._buffer, self._pending])
        self._pending = self._pending[:0]
        return self._apply(self._segmenter.close(self.position))

    def next_job(self) -> Job | None:
        """The next piece of work for the engine: queued finals first, then a partial on the newest audio."""
        if self._finals:
            return self._finals.popleft()
        start = self._segmenter.start
        if not self.options.partials or start is None:
            return None
        end = self.position
        if end - max(start, self._partial_end) < self._interval:
            return None
        self._partial_end = end
        return Job(self._segment, start, end, False, self._slice(start, end))

    def complete(self, job: Job, token_ids: Sequence[int], text: str, language: str | None) -> list[Event]:
        """The engine's hypothesis for ``job``, as the event the client should see."""
        if job.final:
            self._last_text.pop(job.segment, None)
            self._finalized = max(self._finalized, job.segment)
            return [Final(job.segment, text, language, job.start, job.end, tuple(token_ids))]
        if job.segment <= self._finalized:
            return []  # the final is out: it supersedes this partial
        # An utterance that closed while this partial was computed still shows it until its final.
        stable = stable_prefix(self._last_text.get(job.segment, ""), text)
        self._last_text[job.segment] = text
        return [Partial(job.segment, text, stable, text[len(stable) :], job.start, job.end, tuple(token_ids))]

    def _apply(self, changes: Sequence[Opened | Closed]) -> list[Event]:
        events: list[Event] = []
        for change in changes:
            if isinstance(change, Opened):
                self._segment += 1
                self._utterance_start = self._partial_end = change.start
                events.append(SpeechStarted(self._segment, change.start))
            else:
                start, end = self._utterance_start, change.end
                self._finals.append(Job(self._segment, start, end, True, self._slice(start, end)))
                events.append(SpeechStopped(self._segment, end, change.reason))
        return events

    def _slice(self, start: int, end: int) -> npt.NDArray[np.float32]:
        return self._buffer[start - self._offset : end - self._offset]

    def _trim(self) -> None:
        """Keep only audio an utterance may still need: from its start, or the VAD look-back."""
        start = self._segmenter.start
        keep_from = start if start is not None else self.position - 2 * SAMPLE_RATE
        if keep_from - self._offset > SAMPLE_RATE:
            self._buffer = self._buffer[keep_from - self._offset :].copy()
            self._offset = keep_from
