"""``/v1/realtime``: OpenAI's Realtime transcription sessions (``streaming/_realtime.py``) on the server's scheduler.

One WebSocket = one ``RealtimeSession``, driven like a ``/v1/stream`` session: its jobs (finals and
speculative finals) go through the same scheduler, so its transcripts are the finals the asrlive
protocol gives for the same audio. The token (``Authorization: Bearer``, as the SDK sends the API
key) and the session slots are checked at the handshake: a refusal is an HTTP answer with OpenAI's
error body (401, 429, 503), which the SDK reports. There is no idle timeout: a push-to-talk client
is silent between turns, and the WebSocket's pings tell a live client from a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed

from asrlive.engine import DecodingOptions, normalize_language
from asrlive.streaming import CloseCode, Job, ProtocolError
from asrlive.streaming._protocol import check_context_tokens
from asrlive.streaming._realtime import RealtimeOptions, RealtimeSession

from ._outbox import Outbox
from ._scheduler import Stream
from ._websocket import ServerWebSocket

if TYPE_CHECKING:
    from ._metrics import Metrics
    from ._options import ServerOptions
    from ._scheduler import Scheduler

log = logging.getLogger("asrlive.server")

REALTIME_PATH = "/v1/realtime"
# The SDK lets one append carry 15 MiB of base64; the rest of an event is small.
MAX_MESSAGE_BYTES = 15 * 1024 * 1024 + 64 * 1024


class RealtimeHost(Protocol):
    """What a realtime session uses of the server: admission, the scheduler, its options, the model's name."""

    options: ServerOptions
    scheduler: Scheduler
    metrics: Metrics
    model_name: str
    control_tokens: tuple[str, ...]
    realtime: set[RealtimeConnection]  # the sessions open, for the shutdown to wind down

    def authorized(self, ws: ServerWebSocket) -> bool: ...
    def admit_request(self) -> ProtocolError | None: ...
    def release_request(self) -> None: ...


def refusal(status: int, message: str, kind: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


async def serve_realtime(server: RealtimeHost, websocket: WebSocket) -> None:
    """The route: refuse at the handshake, or run the session until the client goes."""
    ws = ServerWebSocket(websocket)
    if not server.authorized(ws):
        await _deny(websocket, refusal(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
        return
    refused = server.admit_request()
    if refused is not None:
        status = 429 if refused.code == "server_full" else 503
        kind = "rate_limit_error" if status == 429 else "server_error"
        await _deny(websocket, refusal(status, refused.message, kind, refused.code))
        return
    try:
        await ws.accept()
        connection = RealtimeConnection(server, ws, beta=websocket.headers.get("openai-beta") == "realtime=v1")
        await connection.run()
    except ConnectionClosed:
        pass
    finally:
        server.release_request()


async def _deny(websocket: WebSocket, response: JSONResponse) -> None:
    with contextlib.suppress(OSError):  # the client is gone already
        await websocket.send_denial_response(response)


class RealtimeConnection:
    """The session's I/O: client events in, server events out, jobs through the scheduler."""

    def __init__(self, server: RealtimeHost, ws: ServerWebSocket, beta: bool) -> None:
        self.server = server
        self.ws = ws
        tokens = server.control_tokens
        options = RealtimeOptions(
            session=replace(server.options.session, speculative_finals=True),
            model=server.model_name,
            language=normalize_language,
            check_prompt=lambda prompt: check_context_tokens(prompt, tokens),
        )
        self.session = RealtimeSession(options, beta=beta)
        self.stream = Stream(self.session, self._decoding(), self)
        self._outbox = Outbox(server.options.max_outbox_bytes)  # nothing is superseded here: all or nothing
        self._interrupted = asyncio.Event()
        self._given_up = False  # the client read nothing: its connection was aborted

    def _decoding(self) -> DecodingOptions:
        return replace(self.server.options.decoding, language=self.session.language, context=self.session.context)

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        self.server.realtime.add(self)
        self.server.scheduler.add(self.stream)
        try:
            self._send(self.session.opened())
            await self._receive_loop()
        finally:
            self.server.realtime.discard(self)
            self.server.scheduler.remove(self.stream)
            self._outbox.end()
            await asyncio.wait({sender}, timeout=self.server.options.close_timeout_s)
            sender.cancel()

    async def _receive_loop(self) -> None:
        receiving = asyncio.ensure_future(self.ws.recv())
        interrupted = asyncio.ensure_future(self._interrupted.wait())
        try:
            while True:
                await asyncio.wait({receiving, interrupted}, return_when=asyncio.FIRST_COMPLETED)
                if interrupted.done():
                    await self._wind_down()
                    return
                try:
                    message = receiving.result()
                except ConnectionClosed:
                    self.session.close()
                    return
                receiving = asyncio.ensure_future(self.ws.recv())
                self._handle(message)
        finally:
            receiving.cancel()
            interrupted.cancel()

    def _handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            message = json.dumps({"type": "binary"})  # the protocol has text events only: an unknown type
        self._send(self.session.receive(message))
        decoding = self._decoding()
        if decoding != self.stream.decoding:
            self.stream.decoding = decoding  # the jobs handed out from now on
        self.server.scheduler.wake()

    async def _wind_down(self) -> None:
        """Shutdown: the open utterance is committed and every item due is transcribed, then 1001."""
        self._send(self.session.finish())
        self.server.scheduler.wake()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stream.drained.wait(), self.server.options.drain_timeout_s)
        self._outbox.end()
        await self.ws.close(CloseCode.GOING_AWAY, "shutdown")

    def interrupt(self) -> None:
        """Shutdown: wind the session down (its due items are transcribed), then close with 1001."""
        self._interrupted.set()

    # -- the scheduler's listener ------------------------------------------------------------------

    def on_result(self, job: Job, events: list[Any]) -> None:
        self._send(events)

    def on_failure(self, error: BaseException) -> None:
        self._send(self.session.abort(f"transcription failed: {type(error).__name__}"))

    # -- sending -------------------------------------------------------------------------------------

    def _send(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if self._given_up:
                return
            if not self._outbox.put(event["type"], json.dumps(event, ensure_ascii=False)):
                # The client reads nothing: not even a close would get through, so the connection
                # is dropped (the receive loop then ends the session) rather than hold its events.
                message = "realtime session: the client reads no events (%d bytes waiting); connection aborted"
                log.warning(message, self._outbox.bytes)
                self.server.metrics.slow_clients.inc()
                self._given_up = True
                self.ws.abort()

    async def _send_loop(self) -> None:
        while (text := await self._outbox.get()) is not None:
            try:
                await self.ws.send(text)
            except ConnectionClosed:
                return
