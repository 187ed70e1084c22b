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
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import json
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
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

from ._scheduler import Stream
from ._transport import Incoming, Transport

if TYPE_CHECKING:
    from ._server import AsrServer

log = logging.getLogger("asrlive.server")

_ARRIVALS_KEPT = 2_000  # arrival times remembered (about 200 s of 100 ms frames)
LAG_EVENT_INTERVAL_S = 1.0
_CLOSE_CODES = {
    "finish": CloseCode.NORMAL,
    "shutdown": CloseCode.GOING_AWAY,
    "internal_error": CloseCode.INTERNAL_ERROR,
}


class Interrupted(Exception):
    """The server ended the session from outside: shutdown, or its inference failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Connection:
    def __init__(self, server: AsrServer, transport: Transport, number: int) -> None:
        self.server = server
        self.options = server.options
        self.transport = transport
        self.ws = transport.ws  # admission reads the token from its request
        self.id = f"s{number}"
        self.admitted = False  # counted against max_sessions
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._stream: Stream | None = None
        self._received = 0  # 16 kHz samples fed to the session
        self._arrival_positions: list[int] = []
        self._arrival_times: list[float] = []
        self._receiving: asyncio.Future[Any] | None = None
        self._interrupted: str | None = None
        self._failed = False
        self.latency = (0.0, 0.0)  # (latency of the last result, when it was sent)
        self._last_lag_event = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            try:
                code, reason = await self._converse()
            finally:
                if self._stream is not None:
                    self.server.scheduler.remove(self._stream)
            await self._outbox.put(None)
            await asyncio.wait({sender}, timeout=self.options.close_timeout_s)
            await self.transport.close(code, reason)
        except ConnectionClosed:
            log.info("%s: client went away", self.id)
        finally:
            sender.cancel()
            await self.transport.release()

    def interrupt(self, reason: str) -> None:
        """Stop receiving and wind the session down (``shutdown``, or ``internal_error``)."""
        if self._interrupted is None:
            self._interrupted = reason
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
            self._open(start, await self.transport.open(start))
            ending: str | ProtocolError = await self._receive_audio()
        except ProtocolError as error:
            ending = error
        except Interrupted as interruption:
            ending = interruption.reason
        self.transport.stop_receiving()
        if isinstance(ending, ProtocolError):
            self.server.metrics.errors.labels(ending.code).inc()
            self._send(ending.to_json())
        return await self._finish(ending)

    async def _finish(self, ending: str | ProtocolError) -> tuple[int, str]:
        if self._stream is None:  # nothing was started
            if isinstance(ending, ProtocolError):
                return ending.close_code, ending.code
            return CloseCode.GOING_AWAY, ending
        if not self._failed:
            await self._drain()
        if self._failed:  # the engine failed this stream (perhaps while draining): that is the ending
            ending = "internal_error"
        reason = ending.code if isinstance(ending, ProtocolError) else ending
        seconds = self.transport.seconds
        segments = self._stream.session.segments
        self._send({"type": "done", "reason": reason, "audio_seconds": seconds, "segments": segments})
        return (ending.close_code if isinstance(ending, ProtocolError) else _CLOSE_CODES[reason]), reason

    async def _drain(self) -> None:
        """Every utterance heard so far gets its final, however long the engine's queue is.

        Only an engine that completes nothing for ``drain_timeout_s`` ends the wait: under
        overload the finals come late, but they come.
        """
        assert self._stream is not None
        self._feed(self.transport.flush())
        self._send_events(self._stream.session.finish())
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
        if self._interrupted is not None:
            raise Interrupted(self._interrupted)
        self._receiving = asyncio.ensure_future(asyncio.wait_for(self.transport.receive(), self.options.idle_timeout_s))
        try:
            return await self._receiving
        except asyncio.CancelledError:
            if self._interrupted is None or (asyncio.current_task() or self._receiving).cancelling():
                raise
            raise Interrupted(self._interrupted) from None
        except TimeoutError:
            raise ProtocolError(
                "idle_timeout", f"nothing received for {self.options.idle_timeout_s:g} s; closing"
            ) from None
        finally:
            self._receiving = None

    async def _receive_start(self) -> Start:
        message = await self._receive()
        if not isinstance(message, str):  # a transport that cannot receive audio before start never gets here
            raise ProtocolError("not_started", 'send a "start" message before any audio')
        return self.transport.parse_start(message)

    async def _receive_audio(self) -> str:
        while True:
            message = await self._receive()
            if isinstance(message, str):
                parse_message(message, started=True)  # anything but a valid finish raises
                return "finish"
            pcm = message
            allowed = round(self.options.max_session_s * SAMPLE_RATE) - self._received
            self._feed(pcm[: max(allowed, 0)])
            if pcm.size > allowed:
                raise ProtocolError(
                    "session_too_long", f"sessions are limited to {self.options.max_session_s:g} s of audio"
                )

    # -- the session -----------------------------------------------------------------------------

    def _open(self, start: Start, transport_fields: dict[str, Any]) -> None:
        try:
            language = normalize_language(start.language) if start.language else None
        except ValueError as exc:
            raise ProtocolError("bad_start", str(exc)) from None
        interval = start.partial_interval_ms or self.options.session.partial_interval_ms
        session = Session(replace(self.options.session, partials=start.partials, partial_interval_ms=interval))
        decoding = replace(self.options.decoding, language=language, context=start.context)
        self._stream = Stream(session, decoding, self)
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
                "limits": {
                    "max_frame_bytes": self.options.max_frame_bytes,
                    "idle_timeout_s": self.options.idle_timeout_s,
                    "max_session_s": self.options.max_session_s,
                },
            }
        )

    def _feed(self, pcm) -> None:
        if not pcm.size:
            return
        assert self._stream is not None
        self._received += pcm.size
        self._arrival_positions.append(self._received)
        self._arrival_times.append(time.monotonic())
        if len(self._arrival_positions) > 2 * _ARRIVALS_KEPT:
            del self._arrival_positions[:_ARRIVALS_KEPT], self._arrival_times[:_ARRIVALS_KEPT]
        self.server.metrics.audio(pcm.size / SAMPLE_RATE)
        self._send_events(self._stream.session.feed(pcm))
        self.server.scheduler.wake()

    def _arrival(self, sample: int) -> float:
        """When the audio up to ``sample`` had arrived (the oldest time remembered, if older)."""
        index = bisect.bisect_left(self._arrival_positions, sample)
        return self._arrival_times[min(index, len(self._arrival_times) - 1)]

    # -- called by the scheduler ------------------------------------------------------------------

    def on_result(self, job: Job, events: list[Event]) -> None:
        now = time.monotonic()
        latency = now - self._arrival(job.end)
        for event in events:
            if isinstance(event, Partial | Final):
                histogram = self.server.metrics.final_latency if job.final else self.server.metrics.partial_latency
                histogram.observe(latency)
                self.latency = (latency, now)
        self._send_events(events)
        if latency > self.options.lag_warning_s and now - self._last_lag_event >= LAG_EVENT_INTERVAL_S:
            self._last_lag_event = now
            pending = self._stream.session.pending_finals if self._stream else 0
            self._send({"type": "lag", "seconds": round(latency, 3), "pending_finals": pending})

    def on_failure(self, error: BaseException) -> None:
        self._failed = True
        self.server.metrics.errors.labels("internal_error").inc()
        self._send(ProtocolError("internal_error", f"transcription failed: {type(error).__name__}").to_json())
        if self._stream is not None:
            self._stream.drained.set()  # nothing more will come; do not wait for it
        self.interrupt("internal_error")

    # -- sending ---------------------------------------------------------------------------------

    def _send_events(self, events: list[Event]) -> None:
        for event in events:
            self._send(event.to_json())

    def _send(self, message: dict[str, Any]) -> None:
        self._outbox.put_nowait(json.dumps(message, ensure_ascii=False))

    async def _send_loop(self) -> None:
        while (text := await self._outbox.get()) is not None:
            try:
                await self.transport.send(text)
            except ConnectionClosed:
                return


def authorized(ws: ServerConnection, token: str | None) -> bool:
    """The bearer token, from the Authorization header or the ``token`` query parameter."""
    if token is None:
        return True
    header = ws.request.headers.get("Authorization", "") if ws.request else ""
    offered = header[7:] if header.lower().startswith("bearer ") else ""
    if not offered and ws.request is not None:
        offered = parse_qs(urlsplit(ws.request.path).query).get("token", [""])[0]
    return hmac.compare_digest(offered.encode(), token.encode())
