"""One inference thread owns the model and runs a continuous batch; the event loop feeds it jobs.

The event loop owns the sessions (``feed``, ``next_job`` and ``complete`` are cheap and never
touch torch). The inference thread owns the model, the ``ContinuousBatch`` (engine/_batch.py) and
every stream's engine state (its ``StreamTranscriber``). They meet at two points only: an inbox
the thread empties between rounds (admit a job, cancel one, release utterances' state, stop), and
``call_soon_threadsafe``, which hands each round's finished computations to the event loop.

A round is one batched encoder forward and one ragged LLM forward over every computation in
flight. A job admitted now joins at the next round, whatever the others still have to do: nobody
waits for a batch to finish. Each stream has at most one computation in flight (its jobs share the
stream's transcriber), and at most ``max_batch`` are in flight. Whenever a slot is free, the event
loop admits the queued finals and speculative finals of every stream first, then partials,
round-robin. A partial is taken from its session only when it is admitted, so it covers the newest
audio however long it waited: under load partials coalesce, and finals wait for a slot, never
dropped.

Stale partials. A partial in flight (or a speculative final that did not become the final) is
*stale* once the session has closed its utterance and queued that utterance's final job
(``Session.stale``). The final covers the utterance's audio, and with one computation per stream it
could start only after the partial; the partial's result would be a caption superseded a moment
later. So it is cancelled between two rounds (or dropped, if it went stale during its last round):
its result is never delivered, and the final is admitted at once. A speculative final whose
utterance closed exactly at its end is not stale: its result is the final. A partial waiting for a
slot never goes stale: it is taken from the session only when it is admitted.

Speculative finals reach the engine as partials (``final=False``), so the engine keeps their
utterance's state; whenever a session's finals advance (``Session.finalized``), the thread is told
to release every utterance up to the newest final, so memory stays flat.

Word timestamps. For a stream that asked for them, a final's (or speculative final's) hypothesis
goes on to the forced aligner (``_align_stage``) before it is delivered; the thread alternates a
round of transcription and a round of alignment. Its job stays in flight until the words are in,
and a stale speculation is cancelled there like anywhere else.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from asrlive._words import Alignment
from asrlive.engine import AsrModel, DecodingOptions, Hypothesis, StreamTranscriber
from asrlive.engine._aligner import Aligner
from asrlive.engine._batch import ContinuousBatch, Finished
from asrlive.streaming import SAMPLE_RATE, Job

from ._align_stage import Aligned, AlignStage
from ._metrics import Metrics

if TYPE_CHECKING:
    import numpy as np

    from asrlive.engine._steps import Steps

log = logging.getLogger("asrlive.server")
T = TypeVar("T")

TranscriberFactory = Callable[[AsrModel, DecodingOptions], StreamTranscriber]


class Listener(Protocol):
    def on_result(self, job: Job, events: list[Any]) -> None: ...  # the session's events for the result
    def on_failure(self, error: BaseException) -> None: ...


class JobSource(Protocol):
    """What the scheduler uses of a stream's session: asrlive's ``Session``, or an OpenAI Realtime
    session (``streaming/_realtime.py``) whose events are JSON objects."""

    @property
    def finished(self) -> bool: ...
    @property
    def finalized(self) -> int: ...
    @property
    def pending_finals(self) -> int: ...

    def next_job(self, partials: bool = True) -> Job | None: ...
    def stale(self, job: Job) -> bool: ...
    def complete(
        self, job: Job, token_ids: Sequence[int], text: str, language: str | None, alignment: Alignment | None = None
    ) -> list[Any]: ...


@dataclass(eq=False)
class Stream:
    """What the scheduler knows of one connection."""

    session: JobSource
    decoding: DecodingOptions  # for the jobs admitted from now on (a realtime session may change it)
    listener: Listener
    transcriber: StreamTranscriber | None = None  # created and used in the inference thread only
    transcribing_with: DecodingOptions | None = None  # the options the transcriber was made with
    closed: bool = False  # removed, or its engine failed: no more work
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    work: _Work | None = None  # its computation in flight, as the event loop sees it
    released: int = -1  # the engine state of utterances up to this one is released
    timestamps: bool = False  # its finals carry word times

    @property
    def in_flight(self) -> bool:
        return self.work is not None


@dataclass(eq=False)
class _Work:
    """One job of one stream; the batch key, so that the result of a cancelled job is recognised."""

    stream: Stream
    job: Job


@dataclass(eq=False)
class _Compute:
    """A computation of its own, not a stream's job (a piece of an uploaded file, or its words):
    its result goes to ``future``; ``aligner``: the aligner's batch runs it."""

    computation: Steps[Any]
    future: asyncio.Future[Any]
    aligner: bool


@dataclass(frozen=True)
class _Cancel:
    work: _Work | _Compute


@dataclass(frozen=True)
class _Release:
    stream: Stream
    segments: range


_Message = _Work | _Compute | _Cancel | _Release | None  # a _Work or _Compute is admitted; None stops the thread


class Scheduler:
    def __init__(
        self,
        model: AsrModel,
        metrics: Metrics,
        max_batch: int = 8,
        make_transcriber: TranscriberFactory | None = None,
        aligner: Aligner | None = None,
    ) -> None:
        self.model = model
        self.aligner = aligner
        self.metrics = metrics
        self.max_batch = max_batch
        self._make = make_transcriber or StreamTranscriber
        self._streams: list[Stream] = []
        self._next = 0  # round-robin start for partials
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._computing: set[_Compute] = set()  # computations of their own in flight
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.last_progress = time.monotonic()  # when a round last completed

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._infer, args=(loop,), name="asrlive-inference", daemon=True)
        self._thread.start()
        self._task = asyncio.create_task(self._run(), name="asrlive-scheduler")

    async def stop(self) -> None:
        self._stopped = True  # the results of a round still running are dropped
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._thread is not None:
            self._inbox.put(None)
            # Waits for the round in progress: the model must not be torn down under it.
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def add(self, stream: Stream) -> None:
        self._streams.append(stream)
        self.wake()

    def remove(self, stream: Stream) -> None:
        """Forget the stream; its computation in flight is cancelled, and nothing more is delivered to it."""
        stream.closed = True
        if stream in self._streams:
            self._streams.remove(stream)
        if stream.work is not None:
            self._cancel(stream)
            self.wake()  # a slot is free

    def wake(self) -> None:
        self._wake.set()

    @property
    def streams(self) -> int:
        return len(self._streams)

    async def compute(self, computation: Steps[T], aligner: bool = False) -> T:
        """Run a computation of its own in the inference thread's batch (``aligner``: the aligner's);
        its result, or the exception it raised. Cancelling the wait cancels the computation."""
        if aligner and self.aligner is None:
            raise RuntimeError("this scheduler has no aligner")
        work = _Compute(computation, asyncio.get_running_loop().create_future(), aligner)
        self._computing.add(work)
        self._inbox.put(work)
        try:
            result: T = await work.future
            return result
        finally:
            self._computing.discard(work)
            if not work.future.done():  # the waiter was cancelled: so is the computation
                self._inbox.put(_Cancel(work))
            self.wake()  # a slot is free

    # -- the event loop's side ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._schedule()

    def _schedule(self) -> None:
        """Release what the engine may forget, cancel stale partials, fill the free slots."""
        for stream in self._streams:
            self._release_finalized(stream)
            if stream.work is not None and stream.session.stale(stream.work.job):
                log.debug("stale partial of segment %d cancelled", stream.work.job.segment)
                self._cancel(stream)
        self._admit()
        for stream in self._streams:
            self._check_drained(stream)

    def _admit(self) -> None:
        count = len(self._streams)
        order = [self._streams[(self._next + i) % count] for i in range(count)]
        free = self.max_batch - len(self._computing) - sum(stream.work is not None for stream in order)
        for partials in (False, True):  # the finals of every stream before any partial
            for stream in order:
                if free <= 0:
                    return
                if stream.work is not None or stream.closed:
                    continue
                job = stream.session.next_job(partials=partials)
                if job is None:
                    continue
                self._start(stream, job)
                free -= 1
                if partials:
                    self._next = (self._streams.index(stream) + 1) % count

    def _start(self, stream: Stream, job: Job) -> None:
        if log.isEnabledFor(logging.DEBUG):
            kind = "final" if job.final else "speculative final" if job.speculative else "partial"
            log.debug("admitted: %s of segment %d, %.1f s", kind, job.segment, (job.end - job.start) / SAMPLE_RATE)
        stream.work = work = _Work(stream, job)
        self._inbox.put(work)

    def _cancel(self, stream: Stream) -> None:
        assert stream.work is not None
        self._inbox.put(_Cancel(stream.work))
        stream.work = None

    def _release_finalized(self, stream: Stream) -> None:
        finalized = stream.session.finalized
        if finalized > stream.released:
            self._inbox.put(_Release(stream, range(stream.released + 1, finalized + 1)))
            stream.released = finalized

    def _on_round(self, finished: list[Finished], seconds: float, computations: int) -> None:
        if self._stopped:
            return
        self.last_progress = time.monotonic()
        self.metrics.busy(seconds, computations)
        for item in finished:
            if isinstance(item.key, _Compute):
                _settle(item.key.future, item.result)
                continue
            work = cast(_Work, item.key)
            stream = work.stream
            if stream.work is not work:  # cancelled: the stream went, or the partial went stale
                continue
            stream.work = None
            if not stream.session.stale(work.job):  # (it may have gone stale during its last round)
                self._deliver(stream, work.job, item.result)
        self._schedule()

    def _deliver(self, stream: Stream, job: Job, result: Any) -> None:
        if isinstance(result, BaseException):
            log.error("inference failed for a stream", exc_info=result)
            stream.closed = True  # its engine state may be half updated
            stream.listener.on_failure(result)
            return
        alignment = None
        if isinstance(result, Aligned):
            result, alignment = result.hypothesis, result.alignment
        hypothesis = cast(Hypothesis, result)
        events = stream.session.complete(job, hypothesis.token_ids, hypothesis.text, hypothesis.language, alignment)
        stream.listener.on_result(job, events)

    def _check_drained(self, stream: Stream) -> None:
        if stream.session.finished and stream.work is None and not stream.session.pending_finals:
            stream.drained.set()

    # -- the inference thread ----------------------------------------------------------------------

    def _infer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Between rounds, whatever the event loop sent (waiting for it only when idle); then a round."""
        batch = ContinuousBatch(self.model)
        stage = AlignStage(self.aligner) if self.aligner is not None else None
        while True:
            messages = self._take(wait=not len(batch) and not stage)
            started = time.monotonic()  # admitting runs model code too (up to each job's first request)
            admitted = False
            for message in messages:
                if message is None:
                    return
                admitted |= self._handle(batch, stage, message)
            if not admitted and not len(batch) and not stage:
                continue
            finished = batch.step()
            if stage is not None:
                finished = stage.admit(finished, self._audio_to_align)
                if stage:
                    finished += stage.step()
            # Computations in this round: those still running and those it finished.
            running = len(finished) + len(batch) + (len(stage) if stage is not None else 0)
            loop.call_soon_threadsafe(self._on_round, finished, time.monotonic() - started, running)

    def _take(self, wait: bool) -> list[_Message]:
        messages = [self._inbox.get()] if wait else []
        while not self._inbox.empty():
            messages.append(self._inbox.get_nowait())
        return messages

    @staticmethod
    def _audio_to_align(key: object) -> np.ndarray | None:
        """The audio of a finished transcription whose words its stream wants (a final's, or a speculation's)."""
        if not isinstance(key, _Work):
            return None
        job = key.job
        wanted = key.stream.timestamps and (job.final or job.speculative)
        return job.audio if wanted else None

    def _handle(
        self, batch: ContinuousBatch, stage: AlignStage | None, message: _Work | _Compute | _Cancel | _Release
    ) -> bool:
        """Apply one message; whether it admitted a computation."""
        if isinstance(message, _Cancel):
            batch.cancel(message.work)
            if stage is not None:
                stage.cancel(message.work)
        elif isinstance(message, _Release):
            transcriber = message.stream.transcriber
            if transcriber is not None:
                for segment in message.segments:
                    transcriber.release(segment)
        elif isinstance(message, _Compute):
            if message.aligner and stage is not None:
                stage.add(message, message.computation)
            else:
                batch.add(message, message.computation)
            return True
        else:
            batch.add(message, self._computation(message))
            return True
        return False

    def _computation(self, work: _Work) -> Steps[Hypothesis]:
        stream, job = work.stream, work.job
        decoding = stream.decoding
        if stream.transcriber is None or stream.transcribing_with != decoding:
            # (a new prompt: the open utterance's state is dropped, and the job decodes from scratch)
            stream.transcriber, stream.transcribing_with = self._make(self.model, decoding), decoding
        hypothesis: Hypothesis = yield from stream.transcriber.transcribe_steps(job.segment, job.audio, job.final)
        return hypothesis


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the waiter went away (its cancellation is on the way to the thread)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
