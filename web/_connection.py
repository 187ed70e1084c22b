"""One connection = one session, from its admitted slot to the close, for every endpoint.

``/v1/stream``, ``/v1/rtc`` and ``/v1/realtime`` differ in their transport and their wire format
(a ``Codec`` around a sans-I/O protocol core: web/_codecs.py); the lifecycle is written once, here:

1. The codec's opening events; the client's messages go to the codec, its events to the outbox.
   The idle timeout applies where the protocol has one; a shutdown interrupts the read.
2. Once the codec has a session, a scheduler ``Stream`` transcribes it; each result's latency
   (from the arrival of the audio it covers) feeds the metrics and the server's lag (``/readyz``).
3. The bounded outbox (web/_outbox.py) and one sender task: superseded partials are dropped for a
   slow reader, and a client that reads nothing at all is given up (its TCP connection aborted).
4. However the session ends (the client's finish, bad input, a timeout, a length limit, shutdown)
   the audio already received is transcribed to its last result before the close: the drain waits
   as long as the engine makes progress, and gives up only when it completes nothing for
   ``drain_timeout_s``. A client that went is simply forgotten.
5. A failure of the server's own code (here, in the transport, in sending, in inference) is the
   codec's ``internal_error`` and close code 1011, never the close of a session that ended well.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from websockets.exceptions import ConnectionClosed

from asrlive.streaming import SAMPLE_RATE, CloseCode, Job, ProtocolError

from ._outbox import Outbox
from ._scheduler import Stream

if TYPE_CHECKING:
    from ._codecs import Codec
    from ._metrics import Metrics
    from ._options import ServerOptions
    from ._scheduler import Scheduler
    from ._transport import Transport

log = logging.getLogger("asrlive.server")

_ARRIVALS_KEPT = 2_000  # arrival times remembered (about 200 s of 100 ms frames)
LAG_EVENT_INTERVAL_S = 1.0
INTERNAL_ERROR = "internal_error"


class ConnectionHost(Protocol):
    """What a connection uses of the server."""

    options: ServerOptions
    scheduler: Scheduler
    metrics: Metrics


class Connection:
    """Drives one codec over one transport (see the module docstring); ``run`` once."""

    def __init__(self, host: ConnectionHost, transport: Transport, codec: Codec, name: str) -> None:
        self.host = host
        self.options = host.options
        self.transport = transport
        self.codec = codec
        self.id = name
        self.latency = (0.0, 0.0)  # (latency of the last result, when it was sent): the server's lag
        self._outbox = Outbox(self.options.max_outbox_bytes)
        self._given_up = False  # the client did not read its messages: the connection was aborted
        self._stream: Stream | None = None
        self._position = 0  # 16 kHz samples the codec had received at the last look
        self._arrival_positions: list[int] = []
        self._arrival_times: list[float] = []
        self._receiving: asyncio.Future[Any] | None = None
        self._shutdown = False
        self._send_failed = False
        self._last_lag_event = 0.0
        self._results = 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            await self._converse_safely()
            self._outbox.end()
            await asyncio.wait({sender}, timeout=self.options.close_timeout_s)
            code, reason = self.codec.closing
            if self._send_failed:  # events were lost after the ending was decided
                code, reason = CloseCode.INTERNAL_ERROR, INTERNAL_ERROR
            await self.transport.close(code, reason)
        except ConnectionClosed as gone:
            self._log_session("the client went away")
            # Its traceback holds this connection's frames, and asyncio.wait_for's frame on the way
            # holds the task that holds the exception: a cycle that would keep the connection (its
            # session's audio) until a full garbage collection.
            gone.__traceback__ = None
        except Exception:  # even closing failed: at least say so with the close code
            log.exception("%s: closing failed", self.id)
            with contextlib.suppress(Exception):
                await self.transport.ws.close(CloseCode.INTERNAL_ERROR, INTERNAL_ERROR)
        finally:
            sender.cancel()
            # The stream's listener is this connection: a cycle that only the garbage collector's
            # rare full passes would free, with the session's audio in it (docs/deploy.md:
            # Memory over time). Dropped here, the connection goes as soon as its task ends.
            self._stream = None
            await self.transport.release()

    def interrupt(self) -> None:
        """The server is shutting down: stop reading; the session drains to its last result."""
        if not self._shutdown:
            self._shutdown = True
            if self._receiving is not None:
                self._receiving.cancel()

    def fail(self, error: BaseException, what: str) -> None:
        """The server failed this session: ``internal_error`` (once), no more results, the end."""
        if self.codec.failed:
            return
        self.host.metrics.errors.labels(INTERNAL_ERROR).inc()
        self._emit(self.codec.fail(f"{what}: {type(error).__name__}"))
        if self._stream is not None:
            self._stream.drained.set()  # nothing more will come; do not wait for it
        if self._receiving is not None:
            self._receiving.cancel()

    async def _converse_safely(self) -> None:
        try:
            await self._converse()
        except ConnectionClosed:
            self.codec.gone()
            raise
        except Exception as exc:  # a bug: its state may be inconsistent, so nothing is drained
            log.exception("%s: the connection handler failed", self.id)
            self.transport.stop_receiving()
            self.fail(exc, "the server failed")
            self._end_session()
        finally:
            if self._stream is not None:
                self.host.scheduler.remove(self._stream)

    async def _converse(self) -> None:
        self._emit(self.codec.opened())
        await self._attach()
        while self.codec.receiving and not self._interrupted():
            try:
                message = await self._receive()
            except ProtocolError as error:  # the transport's: a frame too large, bad audio, a lost peer
                self._emit(self.codec.error(error))
                # Raised through asyncio.wait_for, whose frame holds the task that holds the error:
                # its traceback would keep this connection until a full garbage collection.
                error.__traceback__ = None
            except asyncio.CancelledError:
                if not self._interrupted() or _being_cancelled():
                    raise
            except TimeoutError:
                self._emit(self.codec.timed_out())
            else:
                events = await self.codec.receive(message)
                self._observe(None, events)  # a final whose speculative result was in already comes out now
                self._emit(events)
                await self._attach()
        if self._shutdown:
            self._emit(self.codec.shutdown())
        self.transport.stop_receiving()
        await self._drain()
        self._end_session()

    def _interrupted(self) -> bool:
        """Reading stopped from outside: a shutdown, or the server failed the session.

        A method, so that a type checker does not carry the loop's test past an await."""
        return self._shutdown or self.codec.failed

    async def _receive(self) -> Any:
        async def receive() -> Any:  # made in the task: cancelled before it runs, nothing is left unawaited
            return await asyncio.wait_for(self.transport.receive(), self.codec.idle_timeout_s)

        self._receiving = asyncio.ensure_future(receive())
        try:
            return await self._receiving
        finally:
            self._receiving = None

    async def _attach(self) -> None:
        """Once the codec has a session: its scheduler stream; audio it took: arrival times."""
        self._arrived()
        source = self.codec.source
        if source is None or self._stream is not None:
            return
        self._stream = Stream(source, self.codec.decoding(), self, timestamps=self.codec.timestamps)
        self.host.scheduler.add(self._stream)
        self.host.metrics.sessions_total.inc()
        if self.transport.sends_ready_before_reading:
            await self._flushed()

    def _arrived(self) -> None:
        """Remember when the audio the codec took so far arrived; tell the scheduler of changes."""
        if self._stream is not None:
            decoding = self.codec.decoding()
            if decoding != self._stream.decoding:
                self._stream.decoding = decoding  # the jobs admitted from now on (a realtime session.update)
        position = self.codec.position
        if position > self._position:
            self.host.metrics.audio((position - self._position) / SAMPLE_RATE)
            self._position = position
            self._arrival_positions.append(position)
            self._arrival_times.append(time.monotonic())
            if len(self._arrival_positions) > 2 * _ARRIVALS_KEPT:
                del self._arrival_positions[:_ARRIVALS_KEPT], self._arrival_times[:_ARRIVALS_KEPT]
        self.host.scheduler.wake()

    async def _drain(self) -> None:
        """Every utterance heard so far gets its result, however long the engine's queue is.

        Only an engine that completes nothing for ``drain_timeout_s`` ends the wait: under
        overload the results come late, but they come.
        """
        stream = self._stream
        if stream is None or self.codec.failed:
            return
        events = self.codec.drain()
        self._observe(None, events)  # a final whose speculative result was in already comes out now
        self._emit(events)
        scheduler = self.host.scheduler
        scheduler.wake()
        waiting_since = time.monotonic()
        while not stream.drained.is_set():
            stalled_for = time.monotonic() - max(scheduler.last_progress, waiting_since)
            if stalled_for >= self.options.drain_timeout_s:
                message = "%s: the engine completed nothing for %.1f s; closing without the last results"
                log.warning(message, self.id, self.options.drain_timeout_s)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.drained.wait(), self.options.drain_timeout_s - stalled_for)

    def _end_session(self) -> None:
        self._emit(self.codec.done())
        self._log_session(self.codec.closing[1])

    def _log_session(self, ending: str) -> None:
        """The session's one log line, however it ended (none for a session that never started)."""
        if self._stream is None:
            log.info("%s: %s before the session started", self.id, ending)
            return
        log.info(
            "%s: %s, language %s, %.1f s of audio, %d finals, ended: %s",
            self.id,
            _peer(self.transport.ws.remote_address),
            self._stream.decoding.language or "auto",
            self._position / SAMPLE_RATE,
            self._results,
            ending,
        )

    # -- called by the scheduler ------------------------------------------------------------------

    def on_result(self, job: Job, events: list[dict[str, Any]]) -> None:
        latency = self._observe(job, events)
        self._emit(events)
        now = time.monotonic()
        if latency > self.options.lag_warning_s and now - self._last_lag_event >= LAG_EVENT_INTERVAL_S:
            self._last_lag_event = now
            self._emit(self.codec.lag(latency))

    def on_failure(self, error: BaseException) -> None:
        self.fail(error, "transcription failed")

    def _observe(self, job: Job | None, events: list[dict[str, Any]]) -> float:
        """The latency of each result (from the arrival of the last audio it covers until now), into
        the metrics and the server's lag; the latency of the job's audio."""
        now = time.monotonic()
        metrics = self.host.metrics
        for final, end in self.codec.results(job, events):
            latency = now - self._arrival(end)
            (metrics.final_latency if final else metrics.partial_latency).observe(latency)
            self.latency = (latency, now)
            self._results += final
        return now - self._arrival(job.end) if job is not None else 0.0

    def _arrival(self, sample: int) -> float:
        """When the audio up to ``sample`` had arrived (the oldest time remembered, if older)."""
        if not self._arrival_times:
            return time.monotonic()
        index = bisect.bisect_left(self._arrival_positions, sample)
        return self._arrival_times[min(index, len(self._arrival_times) - 1)]

    # -- sending ---------------------------------------------------------------------------------

    def _emit(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if self._given_up:
                return
            kind = event["type"]
            if kind == "error":
                code = event.get("code") or event.get("error", {}).get("code", "")
                if code != INTERNAL_ERROR:  # counted by fail()
                    self.host.metrics.errors.labels(code).inc()
            if not self._outbox.put(kind, json.dumps(event, ensure_ascii=False)):
                self._give_up()

    def _give_up(self) -> None:
        """The client reads slower than its session speaks, even with superseded partials dropped:
        no message (not even an error) can reach it, so the connection is aborted and the session
        discarded, as if the client had gone; every other session keeps its memory."""
        self._given_up = True
        self.host.metrics.slow_clients.inc()
        message = "%s: the client does not read its messages (%d bytes waiting); connection aborted"
        log.warning(message, self.id, self._outbox.bytes)
        self.transport.ws.abort()

    async def _flushed(self) -> None:
        """Wait (at most ``close_timeout_s``) until everything queued so far has been sent.

        The WebSocket layer may close the connection while the server reads the next message
        (1007: not UTF-8); ``ready`` goes out first, so a client knows its start was accepted.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._outbox.join(), self.options.close_timeout_s)

    async def _send_loop(self) -> None:
        gone = False
        while True:
            text = await self._outbox.get()
            try:
                if text is None:
                    return
                if not gone:
                    await self.transport.send(text)
            except ConnectionClosed:
                gone = True  # what is still queued is dropped, but counted as handled for _flushed
            except Exception as exc:  # the server's fault, not the client's
                log.exception("%s: sending failed", self.id)
                self._send_failed = True
                self.fail(exc, "sending failed")
            finally:
                self._outbox.task_done()


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled, not just what it awaited.

    Python 3.10 cannot tell (Task.cancelling() is 3.11+): it assumes not.
    """
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is not None and bool(cancelling() > 0)


def _peer(address: Any) -> str:
    """host:port of the client, as the socket has it (a tuple, or None behind some proxies)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "unknown peer"
