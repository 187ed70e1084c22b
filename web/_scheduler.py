"""One inference thread owns the model; the scheduler batches the pending work of every stream.

The event loop owns the sessions (``feed``, ``next_job`` and ``complete`` are cheap and never
touch torch); the inference thread owns the model and every stream's engine state. A batch is
one job per stream with work (queued finals first, else a partial on its newest audio), at most
``max_batch`` streams, taken round-robin. While a batch runs, audio keeps arriving: the next
partial of a stream covers everything that came in meanwhile, so partials coalesce under load
and finals wait their turn, never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from asrlive.engine import AsrModel, DecodingOptions, Hypothesis, StreamTranscriber, run_batch
from asrlive.streaming import SAMPLE_RATE, Event, Job, Session

from ._metrics import Metrics

if TYPE_CHECKING:
    from asrlive.engine._model import Steps

log = logging.getLogger("asrlive.server")

TranscriberFactory = Callable[[AsrModel, DecodingOptions], StreamTranscriber]


class Listener(Protocol):
    def on_result(self, job: Job, events: list[Event]) -> None: ...
    def on_failure(self, error: BaseException) -> None: ...


@dataclass(eq=False)
class Stream:
    """What the scheduler knows of one connection."""

    session: Session
    decoding: DecodingOptions
    listener: Listener
    transcriber: StreamTranscriber | None = None  # created and used in the inference thread only
    in_flight: bool = False
    closed: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class Scheduler:
    def __init__(
        self, model: AsrModel, metrics: Metrics, max_batch: int = 8, make_transcriber: TranscriberFactory | None = None
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch = max_batch
        self._make = make_transcriber or StreamTranscriber
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="asrlive-inference")
        self._streams: list[Stream] = []
        self._next = 0  # round-robin start
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_progress = time.monotonic()  # when a batch last completed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="asrlive-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # Waits for a running batch: the model must not be torn down under it.
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    def add(self, stream: Stream) -> None:
        self._streams.append(stream)
        self.wake()

    def remove(self, stream: Stream) -> None:
        """Forget the stream; a batch it is in finishes, and its result is dropped."""
        stream.closed = True
        if stream in self._streams:
            self._streams.remove(stream)

    def wake(self) -> None:
        self._wake.set()

    @property
    def streams(self) -> int:
        return len(self._streams)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._collect():
                await self._compute(batch)

    def _collect(self) -> list[tuple[Stream, Job]]:
        count = len(self._streams)
        order = [self._streams[(self._next + i) % count] for i in range(count)]
        self._next = (self._next + 1) % max(count, 1)
        batch: list[tuple[Stream, Job]] = []
        for stream in order:
            job = stream.session.next_job() if len(batch) < self.max_batch else None
            if job is not None:
                stream.in_flight = True
                batch.append((stream, job))
            else:
                self._check_drained(stream)
        return batch

    async def _compute(self, batch: list[tuple[Stream, Job]]) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._infer, batch)
        self.last_progress = time.monotonic()
        elapsed = self.last_progress - started
        self.metrics.busy(elapsed, len(batch))
        if log.isEnabledFor(logging.DEBUG):
            kinds = [f"{'final' if j.final else 'partial'} {(j.end - j.start) / SAMPLE_RATE:.1f}s" for _, j in batch]
            jobs = ", ".join(kinds)
            log.debug("batch of %d in %.2f s: %s", len(batch), elapsed, jobs)
        for (stream, job), result in zip(batch, results, strict=True):
            stream.in_flight = False
            if stream.closed:
                continue
            if isinstance(result, BaseException):
                log.error("inference failed for a stream", exc_info=result)
                stream.listener.on_failure(result)
                continue
            events = stream.session.complete(job, result.token_ids, result.text, result.language)
            stream.listener.on_result(job, events)
            self._check_drained(stream)

    def _infer(self, batch: list[tuple[Stream, Job]]) -> list[Any]:
        return run_batch(self.model, [self._computation(stream, job) for stream, job in batch])

    def _computation(self, stream: Stream, job: Job) -> Steps[Hypothesis]:
        if stream.transcriber is None:
            stream.transcriber = self._make(self.model, stream.decoding)
        hypothesis: Hypothesis = yield from stream.transcriber.transcribe_steps(job.segment, job.audio, job.final)
        return hypothesis

    def _check_drained(self, stream: Stream) -> None:
        if stream.session.finished and not stream.in_flight and not stream.session.pending_finals:
            stream.drained.set()
