"""One connection = one streaming session, from admission to the close code, whatever the transport.

1. Admission: token, capacity, load. A refusal is an ``error`` event and a close, nothing else.
2. ``start``: validated into a Session (VAD, partials) and engine options; the transport opens
   (WebRTC: the offer is answered); ``ready`` answers.
3. The transport's audio (16-bit or float frames over the WebSocket, or a WebRTC track, any rate ->
   16 kHz) is fed to the session; its events go out at once, transcription results come back from
   the scheduler.
4. However the session ends (finish, bad input, idle timeout, length limit, server shutdown) the
   audio already received is transcribed to the last final before ``done`` and the close, except
   when the client has gone: then its state is simply dropped.
5. A failure of the server's own code (here, in the transport, or in sending) is an
   ``internal_error`` event and close code 1011, never the 1000 of a session that ended well.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import hmac
import json
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import numpy as np
from websockets.exceptions import ConnectionClosed

from asrlive.engine import normalize_language
from asrlive.streaming import (
    SAMPLE_RATE,
    CloseCode,
    Event,
    Final,
    Job,
    Partial,
    ProtocolError,
    Session,
    Start,
    parse_message,
)
from asrlive.streaming._protocol import check_context_tokens

from ._outbox import Outbox
from ._scheduler import Stream
from ._transport import Incoming, Transport

if TYPE_CHECKING:
    from ._metrics import Metrics
    from ._options import ServerOptions
    from ._scheduler import Scheduler
    from ._websocket import ServerWebSocket

log = logging.getLogger("asrlive.server")

_ARRIVALS_KEPT = 2_000  # arrival times remembered (about 200 s of 100 ms frames)
LAG_EVENT_INTERVAL_S = 1.0


class Ending(enum.Enum):
    """How a session ended when no error code says it (``done``'s reason, the close's)."""

    FINISH = "finish"  # the client's finish was honoured
    SHUTDOWN = "shutdown"  # the server is stopping
    INTERNAL_ERROR = "internal_error"  # the server failed

    @property
    def close_code(self) -> CloseCode:
        return _CLOSE_CODES[self]


_CLOSE_CODES = {
    Ending.FINISH: CloseCode.NORMAL,
    Ending.SHUTDOWN: CloseCode.GOING_AWAY,
    Ending.INTERNAL_ERROR: CloseCode.INTERNAL_ERROR,
}


class Interrupted(Exception):
    """The server ended the session from outside: shutdown, or a failure (inference, sending)."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.value)
        self.ending = ending


class ConnectionHost(Protocol):
    """What a connection uses of the server: its options, admission, the scheduler, the metrics,
    and what a session is told or checked against (the model's name, control tokens, an aligner)."""

    options: ServerOptions
    scheduler: Scheduler
    metrics: Metrics
    model_name: str
    control_tokens: tuple[str, ...]
    protocol_version: int

    @property
    def has_aligner(self) -> bool: ...

    def admit(self, connection: Connection) -> ProtocolError | None: ...


class Connection:
    def __init__(self, server: ConnectionHost, transport: Transport, number: int) -> None:
        self.server = server
        self.options = server.options
        self.transport = transport
        self.ws = transport.ws  # admission reads the token from its request
        self.id = f"s{number}"
        self.admitted = False  # counted against max_sessions
        self._outbox = Outbox(self.options.max_outbox_bytes)
        self._given_up = False  # the client did not read its messages: the connection was aborted
        self._stream: Stream | None = None
        self._session: Session | None = None  # the stream's session, as this protocol drives it
        self._received = 0  # 16 kHz samples fed to the session
        self._arrival_positions: list[int] = []
        self._arrival_times: list[float] = []
        self._receiving: asyncio.Future[Incoming] | None = None
        self._interrupted: Ending | None = None
        self._failed = False  # an internal_error event is out: the finals not yet sent are lost
        self._send_failed = False
        self._error_sent = False  # from then on only finals, the last speech_stopped and done go out
        self._done_sent = False
        self._finals = 0
        self.latency = (0.0, 0.0)  # (latency of the last result, when it was sent)
        self._last_lag_event = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            code, reason = await self._converse_safely()
            self._outbox.end()
            await asyncio.wait({sender}, timeout=self.options.close_timeout_s)
            if self._send_failed:  # events were lost after the ending was decided
                code, reason = CloseCode.INTERNAL_ERROR, Ending.INTERNAL_ERROR.value
            await self.transport.close(code, reason)
        except ConnectionClosed:
            log.info("%s: client went away", self.id)
        except Exception:  # even closing failed: at least say so with the close code
            log.exception("%s: closing failed", self.id)
            with contextlib.suppress(Exception):
                await self.ws.close(CloseCode.INTERNAL_ERROR, Ending.INTERNAL_ERROR.value)
        finally:
            sender.cancel()
            await self.transport.release()

    async def _converse_safely(self) -> tuple[int, str]:
        try:
            return await self._converse()
        except ConnectionClosed:
            raise
        except Exception as exc:
            log.exception("%s: the connection handler failed", self.id)
            return self._crashed(exc)
        finally:
            if self._stream is not None:
                self.server.scheduler.remove(self._stream)

    def interrupt(self, ending: Ending) -> None:
        """Stop receiving and wind the session down (``SHUTDOWN``, or ``INTERNAL_ERROR``)."""
        if self._interrupted is None:
            self._interrupted = ending
            if self._receiving is not None:
                self._receiving.cancel()

    async def _converse(self) -> tuple[int, str]:
        refusal = self.server.admit(self)
        if refusal is not None:
            self.server.metrics.refused.labels(refusal.code).inc()
            self._send(refusal.to_json())
            self.transport.stop_receiving()
            return refusal.close_code, refusal.code
        try:
            start = await self._receive_start()
            language = self._check_start(start)  # before the transport opens: no WebRTC answer for a bad start
            self._open(start, language, await self.transport.open(start))
            if self.transport.sends_ready_before_reading:
                await self._flushed()
            ending: Ending | ProtocolError = await self._receive_audio()
        except ProtocolError as error:
            ending = error
        except Interrupted as interruption:
            ending = interruption.ending
        self.transport.stop_receiving()
        if self._stream is not None and not self._failed:
            # The resampler's tail, before any error event: it may still open an utterance, and
            # after an error no speech_started may come (protocol section 5).
            self._feed(self.transport.flush())
        if isinstance(ending, ProtocolError):
            self.server.metrics.errors.labels(ending.code).inc()
            self._send(ending.to_json())
        return await self._finish(ending)

    async def _finish(self, ending: Ending | ProtocolError) -> tuple[int, str]:
        if self._stream is not None:
            if not self._failed:
                await self._drain()
            if self._failed:  # the engine failed this stream (perhaps while draining): that is the ending
                ending = Ending.INTERNAL_ERROR
        reason = ending.code if isinstance(ending, ProtocolError) else ending.value
        if self._stream is not None:
            self._send_done(reason)
        return ending.close_code, reason

    def _crashed(self, error: Exception) -> tuple[int, str]:
        """The ending of a session whose handler failed unexpectedly: ``internal_error``, then
        ``done`` if it had started, and 1011. Its state may be inconsistent, so nothing is drained."""
        self.transport.stop_receiving()
        self._fail(error, "the server failed")
        if self._stream is not None:
            self._send_done(Ending.INTERNAL_ERROR.value)
        return CloseCode.INTERNAL_ERROR, Ending.INTERNAL_ERROR.value

    def _send_done(self, reason: str) -> None:
        assert self._stream is not None
        seconds = self.transport.seconds
        assert self._session is not None
        segments = self._session.segments
        self._send({"type": "done", "reason": reason, "audio_seconds": seconds, "segments": segments})
        log.info(
            "%s: %s, language %s, %.1f s of audio, %d finals, ended: %s",
            self.id,
            _peer(self.ws.remote_address),
            self._stream.decoding.language or "auto",
            seconds,
            self._finals,
            reason,
        )

    async def _drain(self) -> None:
        """Every utterance heard so far gets its final, however long the engine's queue is.

        Only an engine that completes nothing for ``drain_timeout_s`` ends the wait: under
        overload the finals come late, but they come.
        """
        assert self._stream is not None
        # The utterance the ending cuts short closes: its speech_stopped (reason finish) is the one
        # event besides finals that may follow an error, so it bypasses _send_events' filter.
        assert self._session is not None
        events = self._session.finish()
        self._observe(events)  # a final whose speculative result was in already comes out of finish()
        for event in events:
            self._send(event.to_json())
        scheduler = self.server.scheduler
        scheduler.wake()
        waiting_since = time.monotonic()
        while not self._stream.drained.is_set():
            stalled_for = time.monotonic() - max(scheduler.last_progress, waiting_since)
            if stalled_for >= self.options.drain_timeout_s:
                message = "%s: the engine completed nothing for %.1f s; closing without the last finals"
                log.warning(message, self.id, self.options.drain_timeout_s)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stream.drained.wait(), self.options.drain_timeout_s - stalled_for)

    # -- receiving -------------------------------------------------------------------------------

    async def _receive(self) -> Incoming:
        self._raise_if_interrupted()
        self._receiving = asyncio.ensure_future(asyncio.wait_for(self.transport.receive(), self.options.idle_timeout_s))
        try:
            return await self._receiving
        except asyncio.CancelledError:
            if self._interrupted is None or _being_cancelled():
                raise
            raise Interrupted(self._interrupted) from None
        except TimeoutError:
            raise ProtocolError(
                "idle_timeout", f"nothing received for {self.options.idle_timeout_s:g} s; closing"
            ) from None
        finally:
            self._receiving = None

    def _raise_if_interrupted(self) -> None:
        # A method of its own, so that a type checker does not carry "_interrupted is None" past
        # the await in _receive, during which interrupt() may set it.
        if self._interrupted is not None:
            raise Interrupted(self._interrupted)

    async def _receive_start(self) -> Start:
        message = await self._receive()
        if not isinstance(message, str):  # a transport that cannot receive audio before start never gets here
            raise ProtocolError("not_started", 'send a "start" message before any audio')
        return self.transport.parse_start(message)

    async def _receive_audio(self) -> Ending:
        while True:
            message = await self._receive()
            if isinstance(message, str):
                parse_message(message, started=True)  # anything but a valid finish raises
                return Ending.FINISH
            pcm = message
            allowed = round(self.options.max_session_s * SAMPLE_RATE) - self._received
            self._feed(pcm[: max(allowed, 0)])
            if pcm.size > allowed:
                raise ProtocolError(
                    "session_too_long", f"sessions are limited to {self.options.max_session_s:g} s of audio"
                )

    # -- the session -----------------------------------------------------------------------------

    def _check_start(self, start: Start) -> str | None:
        """What only the model can check of a start: the language's name for it (None: detect),
        and a context free of its control tokens; else ``bad_start``."""
        try:
            language = normalize_language(start.language) if start.language else None
        except ValueError as exc:
            raise ProtocolError("bad_start", str(exc)) from None
        check_context_tokens(start.context, self.server.control_tokens)
        if start.timestamps and not self.server.has_aligner:
            raise ProtocolError(
                "bad_start", "this server has no forced aligner for word timestamps (asrlive serve --aligner ...)"
            )
        return language

    def _open(self, start: Start, language: str | None, transport_fields: dict[str, Any]) -> None:
        interval = start.partial_interval_ms or self.options.session.partial_interval_ms
        # Speculative finals: the scheduler releases the engine state of a final computed as a partial.
        options = replace(self.options.session, partials=start.partials, partial_interval_ms=interval)
        session = Session(replace(options, speculative_finals=True))
        decoding = replace(self.options.decoding, language=language, context=start.context)
        self._session = session
        self._stream = Stream(session, decoding, self, timestamps=start.timestamps)
        self.server.scheduler.add(self._stream)
        self.server.metrics.sessions_total.inc()
        self._send(
            {
                "type": "ready",
                "protocol": self.server.protocol_version,
                "session": self.id,
                "model": self.server.model_name,
                "language": language,
                **transport_fields,  # sample_rate, encoding
                "partials": start.partials,
                "partial_interval_ms": interval,
                "timestamps": start.timestamps,
                "limits": {
                    "max_frame_bytes": self.options.max_frame_bytes,
                    "idle_timeout_s": self.options.idle_timeout_s,
                    "max_session_s": self.options.max_session_s,
                },
            }
        )

    def _feed(self, pcm: np.ndarray) -> None:
        if not pcm.size:
            return
        assert self._stream is not None
        self._received += pcm.size
        self._arrival_positions.append(self._received)
        self._arrival_times.append(time.monotonic())
        if len(self._arrival_positions) > 2 * _ARRIVALS_KEPT:
            del self._arrival_positions[:_ARRIVALS_KEPT], self._arrival_times[:_ARRIVALS_KEPT]
        self.server.metrics.audio(pcm.size / SAMPLE_RATE)
        assert self._session is not None
        events = self._session.feed(pcm)
        self._observe(events)  # a final whose speculative result was in already comes out of feed()
        self._send_events(events)
        self.server.scheduler.wake()

    def _arrival(self, sample: int) -> float:
        """When the audio up to ``sample`` had arrived (the oldest time remembered, if older)."""
        index = bisect.bisect_left(self._arrival_positions, sample)
        return self._arrival_times[min(index, len(self._arrival_times) - 1)]

    # -- called by the scheduler ------------------------------------------------------------------

    def on_result(self, job: Job, events: list[Event]) -> None:
        now = time.monotonic()
        latency = now - self._arrival(job.end)
        self._observe(events)
        self._send_events(events)
        if latency > self.options.lag_warning_s and now - self._last_lag_event >= LAG_EVENT_INTERVAL_S:
            self._last_lag_event = now
            pending = self._stream.session.pending_finals if self._stream else 0
            self._send({"type": "lag", "seconds": round(latency, 3), "pending_finals": pending})

    def _observe(self, events: list[Event]) -> None:
        """The latency of each result: from the arrival of the last audio it covers until now."""
        now = time.monotonic()
        for event in events:
            # By the event, not the job: a speculative job's result may become either.
            if isinstance(event, Final):
                histogram, end = self.server.metrics.final_latency, event.end
            elif isinstance(event, Partial):
                histogram, end = self.server.metrics.partial_latency, event.audio_end
            else:
                continue
            latency = now - self._arrival(end)
            histogram.observe(latency)
            self.latency = (latency, now)

    def on_failure(self, error: BaseException) -> None:
        self._fail(error, "transcription failed")

    def _fail(self, error: BaseException, what: str) -> None:
        """``internal_error`` (once): the event, and the session winds down without its finals."""
        if self._failed:
            return
        self._failed = True
        self.server.metrics.errors.labels("internal_error").inc()
        self._send(ProtocolError("internal_error", f"{what}: {type(error).__name__}").to_json())
        if self._stream is not None:
            self._stream.drained.set()  # nothing more will come; do not wait for it
        self.interrupt(Ending.INTERNAL_ERROR)

    # -- sending ---------------------------------------------------------------------------------

    def _send_events(self, events: list[Event]) -> None:
        for event in events:
            # After an error only finals are still promised (protocol section 5). A partial computed
            # before the error may complete after it, and audio received as an inference failure
            # is reported may still be segmented: the session is ending, so neither is news.
            # (The speech_stopped that closes the last utterance is sent by _drain.)
            if not self._error_sent or isinstance(event, Final):
                self._send(event.to_json())

    def _send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self._done_sent or (self._error_sent and kind == "lag"):
            return  # done is the last message; after an error, lag is no news: the session is ending
        self._error_sent |= kind == "error"
        self._done_sent |= kind == "done"
        self._finals += kind == "final"
        if not self._outbox.put(kind, json.dumps(message, ensure_ascii=False)) and not self._given_up:
            self._give_up()

    def _give_up(self) -> None:
        """The client reads slower than its session speaks, even with superseded partials dropped:
        no message (not even an error) can reach it, so the connection is aborted and the session
        discarded, as if the client had gone; every other session keeps its memory."""
        self._given_up = True
        self.server.metrics.slow_clients.inc()
        message = "%s: the client does not read its messages (%d bytes waiting); connection aborted"
        log.warning(message, self.id, self._outbox.bytes)
        self.ws.abort()

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
                self._fail(exc, "sending failed")
            finally:
                self._outbox.task_done()


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled, not just what it awaited.

    Python 3.10 cannot tell (Task.cancelling() is 3.11+): it assumes not.
    """
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is not None and bool(cancelling() > 0)


def authorized(ws: ServerWebSocket, token: str | None) -> bool:
    """The bearer token, from the Authorization header or the ``token`` query parameter."""
    if token is None:
        return True
    offered = bearer(ws.headers.get("Authorization")) or parse_qs(ws.query).get("token", [""])[0]
    return hmac.compare_digest(offered.encode(), token.encode())


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case); "" if none."""
    header = authorization or ""
    return header[7:] if header.lower().startswith("bearer ") else ""


def _peer(address: Any) -> str:
    """host:port of the client, as the socket has it (a tuple, or None behind some proxies)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "unknown peer"
