"""The inference thread's side of the scheduler (``_scheduler``): what it owns, and the messages it takes.

``Inference`` is made in the thread and lives there: the model's ``ContinuousBatch``, the aligner's
``AlignStage``, and every stream's engine state (its ``StreamTranscriber``, with the options it was
made with), by stream id. The event loop never holds a reference to any of it. It talks to the
thread through frozen messages in an inbox, which the thread empties between rounds: ``Admit`` a
stream's job (with the decoding options and word-timestamps flag it was admitted with),
``Compute`` a computation of its own, ``Cancel`` one, ``Release`` utterances' engine state,
``Forget`` a stream (its transcriber is dropped at once), ``Stop``. The thread answers each round
with a frozen ``Round`` (the finished computations by key), posted to the event loop.

What a message carries is not written again by its sender: a job's audio is a slice of an array
the session never writes in place, and a ``Compute``'s generator is run only by the thread once sent.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from asrlive.engine import AsrModel, DecodingOptions, Hypothesis, StreamTranscriber
from asrlive.engine._aligner import Aligner
from asrlive.engine._batch import ContinuousBatch, Finished
from asrlive.streaming import Job

from ._align_stage import AlignStage

if TYPE_CHECKING:
    import numpy as np

    from asrlive.engine._steps import Steps

TranscriberFactory = Callable[[AsrModel, DecodingOptions], StreamTranscriber]


@dataclass(frozen=True)
class Admit:
    """Transcribe ``job`` for stream ``stream``; ``key`` names the computation (its cancellation, its result)."""

    key: int
    stream: int
    job: Job
    decoding: DecodingOptions  # a change from the stream's previous job's makes it a new transcriber
    timestamps: bool  # a final's (or speculative final's) hypothesis goes on to the aligner


@dataclass(frozen=True)
class Compute:
    """A computation of its own, not a stream's job; ``aligner``: the aligner's batch runs it."""

    key: int
    computation: Steps[Any]
    aligner: bool


@dataclass(frozen=True)
class Cancel:
    key: int  # an Admit's or a Compute's; its result, if already posted, is recognised by the event loop


@dataclass(frozen=True)
class Release:
    """The engine may forget these utterances of the stream (their finals are out)."""

    stream: int
    segments: range


@dataclass(frozen=True)
class Forget:
    """The stream is gone: drop its transcriber and everything it holds."""

    stream: int


@dataclass(frozen=True)
class Stop:
    """End the thread (after the round in progress)."""


Message = Admit | Compute | Cancel | Release | Forget | Stop


@dataclass(frozen=True)
class Round:
    """What one round finished (each result by its computation's key, an exception if it raised),
    its seconds, and how many computations it had."""

    finished: tuple[Finished, ...]
    seconds: float
    computations: int


class Inference:
    """The thread's state; ``run`` is the thread."""

    def __init__(self, model: AsrModel, aligner: Aligner | None, make: TranscriberFactory) -> None:
        self._model = model
        self._make = make
        self._batch = ContinuousBatch(model)
        self._stage = AlignStage(aligner) if aligner is not None else None
        self._transcribers: dict[int, tuple[StreamTranscriber, DecodingOptions]] = {}  # by stream id
        self._admitted: dict[int, Admit] = {}  # the stream jobs in flight, by key

    def run(self, inbox: queue.SimpleQueue[Message], post: Callable[[Round], object]) -> None:
        """Between rounds, whatever the event loop sent (waiting for it only when idle); then a round."""
        while True:
            messages = _take(inbox, wait=self._idle)
            started = time.monotonic()  # admitting runs model code too (up to each job's first request)
            admitted = False
            for message in messages:
                if isinstance(message, Stop):
                    return
                admitted |= self._handle(message)
            if not admitted and self._idle:
                continue
            finished = self._batch.step()
            if self._stage is not None:
                finished = self._stage.admit(finished, self._audio_to_align)
                if self._stage:
                    finished += self._stage.step()
            for item in finished:
                self._admitted.pop(cast(int, item.key), None)
            # Computations in this round: those still running and those it finished.
            running = len(finished) + len(self._batch) + (len(self._stage) if self._stage is not None else 0)
            post(Round(tuple(finished), time.monotonic() - started, running))

    @property
    def _idle(self) -> bool:
        return not len(self._batch) and not self._stage

    def _handle(self, message: Admit | Compute | Cancel | Release | Forget) -> bool:
        """Apply one message; whether it admitted a computation."""
        if isinstance(message, Admit):
            self._admitted[message.key] = message
            self._batch.add(message.key, self._transcription(message))
            return True
        if isinstance(message, Compute):
            if message.aligner and self._stage is not None:
                self._stage.add(message.key, message.computation)
            else:
                self._batch.add(message.key, message.computation)
            return True
        if isinstance(message, Cancel):
            self._admitted.pop(message.key, None)
            self._batch.cancel(message.key)
            if self._stage is not None:
                self._stage.cancel(message.key)
        elif isinstance(message, Release):
            held = self._transcribers.get(message.stream)
            if held is not None:
                for segment in message.segments:
                    held[0].release(segment)
        else:
            self._transcribers.pop(message.stream, None)
        return False

    def _transcription(self, admit: Admit) -> Steps[Hypothesis]:
        """The job on its stream's transcriber, made anew for its first job or new options (in the
        computation: a transcriber that cannot be made fails the job, like one that fails in it)."""
        held = self._transcribers.get(admit.stream)
        if held is None or held[1] != admit.decoding:
            # (a new prompt: the open utterance's state is dropped, and the job decodes from scratch)
            held = self._transcribers[admit.stream] = (self._make(self._model, admit.decoding), admit.decoding)
        job = admit.job
        hypothesis: Hypothesis = yield from held[0].transcribe_steps(job.segment, job.audio, job.final)
        return hypothesis

    def _audio_to_align(self, key: Hashable) -> np.ndarray | None:
        """The audio of a finished transcription whose words its stream wants (a final's, or a speculation's)."""
        admit = self._admitted.get(cast(int, key))
        if admit is None:
            return None
        job = admit.job
        return job.audio if admit.timestamps and (job.final or job.speculative) else None


def _take(inbox: queue.SimpleQueue[Message], wait: bool) -> list[Message]:
    messages = [inbox.get()] if wait else []
    while not inbox.empty():
        messages.append(inbox.get_nowait())
    return messages
