"""The sans-I/O streaming session: PCM in, events and transcription jobs out.

No sockets, no threads, no torch. The transport feeds audio and forwards events; whoever owns
the model asks for the next job, runs it and hands the result back::

    events = session.feed(pcm)
    while (job := session.next_job()) is not None:
        hypothesis = engine.transcribe(job.segment, job.audio, job.final)
        events += session.complete(job, hypothesis.token_ids, hypothesis.text, hypothesis.language)

With word timestamps, the driver aligns the hypothesis of every final (and speculative) job on
``job.audio`` and hands the ``Alignment`` to ``complete``, its times from the job's start: the
session puts it on the final in the stream's clock.

Finals are queued and never dropped. A partial job always covers the newest audio, so when the
engine falls behind, partials coalesce (latest wins) instead of piling up.

Speculative finals (``SessionOptions.speculative_finals``). The VAD closes an utterance only after
``end_silence_ms`` of unvoiced audio, but its final covers the audio up to ``pad_ms`` after the last
voiced frame. As soon as that much audio has been heard, all of it unvoiced, the session offers a
job on exactly those bounds (``Job.speculative``): the final's computation, started early. If the
utterance then closes there, that result is the final (same audio, same tokens): it comes out of
``feed``/``finish`` after the ``speech_stopped`` when the result is in, else out of ``complete``;
no final job is queued. If speech resumes, the result is a partial on a prefix of the utterance
(out of ``feed``, or of ``complete`` when it comes later), and the utterance goes on as before.
The engine sees a speculative job as a partial (``final=False``), so it keeps the utterance's state:
a driver that enables speculation releases that state once the utterance's final is out
(``finalized``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from asrlive._words import Alignment

from ._events import SAMPLE_RATE, Event, Final, Partial, SpeechStarted, SpeechStopped, seconds
from ._text import stable_prefix
from ._vad import FRAME, Closed, Opened, Segmenter, VadOptions


@dataclass(frozen=True)
class SessionOptions:
    vad: VadOptions = field(default_factory=VadOptions)
    partials: bool = True
    partial_interval_ms: int = 1000  # audio between partial updates of one utterance
    # Off by default: the driver must release the engine state of finals computed as partials (see above).
    speculative_finals: bool = False

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
    speculative: bool = False  # a partial (final False) that becomes the final if the utterance closes at ``end``


@dataclass(frozen=True)
class _Result:
    token_ids: tuple[int, ...]
    text: str
    language: str | None
    alignment: Alignment | None  # from the job's start


@dataclass
class _Speculation:
    """The speculative job of the open utterance, and its result once complete (held until the utterance
    closes at its end or speech resumes)."""

    job: Job
    result: _Result | None = None


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
        self._speculation: _Speculation | None = None
        self._awaited: Job | None = None  # a speculative job in flight whose result is a closed utterance's final
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

    @property
    def finalized(self) -> int:
        """The last utterance whose final is out (-1: none yet); finals come out in order."""
        return self._finalized

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
            events += self._check_resumed()
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

    def next_job(self, partials: bool = True) -> Job | None:
        """The next piece of work for the engine: queued finals first, then a speculative final, then
        (unless ``partials`` is False) a partial on the newest audio."""
        if self._finals:
            return self._finals.popleft()
        job = self._speculate()
        if job is not None or not partials:
            return job
        start = self._segmenter.start
        # A speculation holds every voiced frame heard so far: a partial now would add only silence.
        if not self.options.partials or start is None or self._speculation is not None:
            return None
        end = self.position
        if end - max(start, self._partial_end) < self._interval:
            return None
        self._partial_end = end
        return Job(self._segment, start, end, False, self._slice(start, end))

    def complete(
        self,
        job: Job,
        token_ids: Sequence[int],
        text: str,
        language: str | None,
        alignment: Alignment | None = None,
    ) -> list[Event]:
        """The engine's hypothesis for ``job``, as the events the client should see (perhaps none yet).

        ``alignment``: the words of ``text`` timed from ``job.start`` (only a final uses it).
        """
        result = _Result(tuple(token_ids), text, language, alignment)
        if job is self._awaited:  # its utterance closed at its end while it was computed
            self._awaited = None
        elif not job.final:
            if self._speculation is not None and job is self._speculation.job:
                self._speculation.result = result  # news only once the utterance closes or speech resumes
                return []
            return self._partial(job, result)
        return [self._final(job, result)]

    def stale(self, job: Job) -> bool:
        """Whether ``job``, handed out and not complete, is a partial (or a speculation that did not come
        true) of an utterance that has closed since: its final is another job, so this result could
        only be a late partial, superseded by that final."""
        if job.final or job is self._awaited:
            return False
        return job.segment < self._segment or not self._segmenter.in_speech

    def _speculate(self) -> Job | None:
        if not self.options.speculative_finals or self._speculation is not None:
            return None
        start, end = self._segmenter.start, self._segmenter.tentative_end
        # (end <= start: an utterance reopened at a cut inside the silence after the last voiced frame)
        if start is None or end is None or end <= start:
            return None
        job = Job(self._segment, start, end, False, self._slice(start, end), speculative=True)
        self._speculation = _Speculation(job)
        self._partial_end = max(self._partial_end, end)
        return job

    def _check_resumed(self) -> list[Event]:
        """Speech resumed (a voiced frame moved the utterance's tentative end): the speculation is a partial."""
        speculation = self._speculation
        if speculation is None or self._segmenter.tentative_end == speculation.job.end:
            return []
        self._speculation = None
        return self._abandon(speculation)

    def _abandon(self, speculation: _Speculation | None) -> list[Event]:
        # A result still being computed becomes an ordinary partial in ``complete``.
        if speculation is None or speculation.result is None:
            return []
        return self._partial(speculation.job, speculation.result)

    def _partial(self, job: Job, result: _Result) -> list[Event]:
        if not self.options.partials or job.segment <= self._finalized:
            return []  # partials off (a speculation that did not end the utterance), or superseded by the final
        # An utterance that closed while this partial was computed still shows it until its final.
        text = result.text
        stable = stable_prefix(self._last_text.get(job.segment, ""), text)
        self._last_text[job.segment] = text
        return [Partial(job.segment, text, stable, text[len(stable) :], job.start, job.end, result.token_ids)]

    def _final(self, job: Job, result: _Result) -> Final:
        self._last_text.pop(job.segment, None)
        self._finalized = max(self._finalized, job.segment)
        alignment = result.alignment.shifted(seconds(job.start)) if result.alignment is not None else None
        return Final(job.segment, result.text, result.language, job.start, job.end, result.token_ids, alignment)

    def _apply(self, changes: Sequence[Opened | Closed]) -> list[Event]:
        events: list[Event] = []
        for change in changes:
            if isinstance(change, Opened):
                self._segment += 1
                self._utterance_start = self._partial_end = change.start
                events.append(SpeechStarted(self._segment, change.start))
            else:
                events += self._close(change)
        return events

    def _close(self, change: Closed) -> list[Event]:
        start, end = self._utterance_start, change.end
        stopped = SpeechStopped(self._segment, end, change.reason)
        speculation, self._speculation = self._speculation, None
        if speculation is not None and speculation.job.end == end:
            if speculation.result is None:
                self._awaited = speculation.job  # in flight: its complete() gives the final
                return [stopped]
            return [stopped, self._final(speculation.job, speculation.result)]
        events = self._abandon(speculation)  # the held result is the utterance's last partial
        self._finals.append(Job(self._segment, start, end, True, self._slice(start, end)))
        return [*events, stopped]

    def _slice(self, start: int, end: int) -> npt.NDArray[np.float32]:
        return self._buffer[start - self._offset : end - self._offset]

    def _trim(self) -> None:
        """Keep only audio an utterance may still need: from its start, or the VAD look-back."""
        start = self._segmenter.start
        keep_from = start if start is not None else self.position - 2 * SAMPLE_RATE
        if keep_from - self._offset > SAMPLE_RATE:
            self._buffer = self._buffer[keep_from - self._offset :].copy()
            self._offset = keep_from
