"""One inference thread owns the model and runs a continuous batch; the event loop feeds it jobs.

Who owns what. The event loop owns the sessions (``feed``, ``next_job`` and ``complete`` are cheap
and never touch torch) and each connection's ``Stream``: its decoding options for the jobs it
admits from now on, its computation in flight, its state. The inference thread owns the model, the
``ContinuousBatch`` (engine/_batch.py), the ``AlignStage`` and every stream's engine state (its
``StreamTranscriber``), all in ``_inference.Inference``, made in the thread. Nothing mutable is
shared: the event loop sends frozen messages to an inbox the thread empties between rounds (admit
a job, with the stream's id, options and timestamps flag; compute; cancel; release utterances'
state; forget a stream; stop), and the thread posts each round's results, by key, with
``call_soon_threadsafe``; the event loop maps the keys back to its streams and futures.

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
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from asrlive._words import Alignment
from asrlive.engine import AsrModel, DecodingOptions, Hypothesis, StreamTranscriber
from asrlive.engine._aligner import Aligner
from asrlive.streaming import SAMPLE_RATE, Job

from ._align_stage import Aligned
from ._inference import Admit, Cancel, Compute, Forget, Inference, Message, Release, Round, Stop
from ._inference import TranscriberFactory as TranscriberFactory
from ._metrics import Metrics

if TYPE_CHECKING:
    from asrlive.engine._steps import Steps

log = logging.getLogger("asrlive.server")
T = TypeVar("T")

_stream_ids = itertools.count()


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
    """What the scheduler knows of one connection; the event loop's only (the thread knows its id)."""

    session: JobSource
    decoding: DecodingOptions  # for the jobs admitted from now on (a realtime session may change it)
    listener: Listener
    timestamps: bool = False  # its finals carry word times
    closed: bool = field(default=False, init=False)  # removed, or its engine failed: no more work
    drained: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    work: _Work | None = field(default=None, init=False)  # its computation in flight
    released: int = field(default=-1, init=False)  # the engine state of utterances up to this one is released
    id: int = field(default_factory=lambda: next(_stream_ids), init=False)  # its name in the messages

    @property
    def in_flight(self) -> bool:
        return self.work is not None


@dataclass(frozen=True, eq=False)
class _Work:
    """One job of one stream in flight, under ``key`` (a cancelled job's result is recognised by it)."""

    key: int
    stream: Stream
    job: Job


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
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._keys = itertools.count()
        self._works: dict[int, _Work] = {}  # the streams' jobs in flight, by key
        self._computing: dict[int, asyncio.Future[Any]] = {}  # computations of their own in flight, by key
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
            self._inbox.put(Stop())
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
        self._inbox.put(Forget(stream.id))  # its transcriber goes now

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
        key = next(self._keys)
        future = self._computing[key] = asyncio.get_running_loop().create_future()
        self._inbox.put(Compute(key, computation, aligner))
        try:
            result: T = await future
            return result
        finally:
            if self._computing.pop(key, None) is not None:  # the waiter was cancelled: so is the computation
                self._inbox.put(Cancel(key))
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
        free = self.max_batch - len(self._computing) - len(self._works)
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
        key = next(self._keys)
        stream.work = self._works[key] = _Work(key, stream, job)
        self._inbox.put(Admit(key, stream.id, job, stream.decoding, stream.timestamps))

    def _cancel(self, stream: Stream) -> None:
        assert stream.work is not None
        key = stream.work.key
        del self._works[key]
        self._inbox.put(Cancel(key))
        stream.work = None

    def _release_finalized(self, stream: Stream) -> None:
        finalized = stream.session.finalized
        if finalized > stream.released:
            self._inbox.put(Release(stream.id, range(stream.released + 1, finalized + 1)))
            stream.released = finalized

    def _on_round(self, done: Round) -> None:
        if self._stopped:
            return
        self.last_progress = time.monotonic()
        self.metrics.busy(done.seconds, done.computations)
        for item in done.finished:
            key = cast(int, item.key)
            future = self._computing.pop(key, None)
            if future is not None:
                _settle(future, item.result)
                continue
            work = self._works.pop(key, None)
            if work is None:  # cancelled: the stream went, or the partial went stale
                continue
            stream = work.stream
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
        """The thread: its state is made here and reachable from here only."""
        inference = Inference(self.model, self.aligner, self._make)
        inference.run(self._inbox, lambda done: loop.call_soon_threadsafe(self._on_round, done))


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the waiter went away (its cancellation is on the way to the thread)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
