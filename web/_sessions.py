"""The session endpoints: ``/v1/stream`` and ``/v1/rtc`` (protocol v1), ``/v1/realtime`` (OpenAI).

Each route checks what only a handshake can check (the page's origin, the token, a free slot),
refuses the way its protocol refuses (v1: an ``error`` event and a close code; Realtime: an HTTP
answer with OpenAI's error body, which the SDK reports), and hands an admitted session to the one
lifecycle (``Connection``) with its transport and codec.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from starlette.responses import PlainTextResponse, Response
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed

from asrlive.engine import normalize_language
from asrlive.streaming import PROTOCOL_VERSION, ProtocolError, Start
from asrlive.streaming._protocol import check_context_tokens
from asrlive.streaming._realtime import RealtimeOptions, RealtimeSession
from asrlive.streaming._v1 import StreamOptions, StreamProtocol

from ._codecs import Codec, RealtimeCodec, StreamCodec
from ._connection import Connection
from ._openai import invalid_api_key, refused
from ._options import RTC_PATH, origin_allowed
from ._rtc import PeerConnections, RtcTransport
from ._transport import StreamTransport, Transport, WebSocketTransport
from ._websocket import ServerWebSocket

if TYPE_CHECKING:
    from ._admission import Admission
    from ._auth import Auth
    from ._metrics import Metrics
    from ._options import ServerOptions
    from ._scheduler import Scheduler

log = logging.getLogger("asrlive.server")

FORBIDDEN_ORIGIN = "the page's origin may not open WebSocket sessions here (asrlive serve --allowed-origins)\n"
UNAUTHORIZED = "a valid token is required (Authorization: Bearer, or ?token=)"


class SessionHost(Protocol):
    """What the session endpoints use of the server."""

    options: ServerOptions
    scheduler: Scheduler
    metrics: Metrics
    admission: Admission
    auth: Auth
    peers: PeerConnections
    model_name: str
    control_tokens: tuple[str, ...]  # what a client's context may not spell: the tokenizer's, read once

    @property
    def has_aligner(self) -> bool: ...


async def serve_stream(host: SessionHost, websocket: WebSocket) -> None:
    """``/v1/stream`` and ``/v1/rtc``: refused after the handshake with an ``error`` event, or run."""
    if await _origin_refused(host, websocket):
        return
    ws = ServerWebSocket(websocket)
    try:
        await ws.accept()
    except ConnectionClosed:
        return
    transport: StreamTransport
    if ws.path == RTC_PATH:
        transport = RtcTransport(ws, host.options, host.peers)
    else:
        transport = WebSocketTransport(ws, host.options)
    name = host.admission.name()
    core = StreamProtocol(_stream_options(host), name)
    refusal = _admit(host, ws)
    if refusal is not None:
        host.metrics.refused.labels(refusal.code).inc()
        await _refuse(transport, core.error(refusal), core.closing)
        return
    await _run(host, Connection(host, transport, StreamCodec(core, transport, host.options.decoding), name))


async def serve_realtime(host: SessionHost, websocket: WebSocket) -> None:
    """``/v1/realtime``: refused at the handshake with an HTTP answer, or run until the client goes."""
    if await _origin_refused(host, websocket):
        return
    ws = ServerWebSocket(websocket)
    if not host.auth.allows(ws.headers, ws.query):
        await _deny(websocket, invalid_api_key().response())
        return
    refusal = host.admission.admit()
    if refusal is not None:
        host.metrics.refused.labels(refusal.code).inc()
        await _deny(websocket, refused(refusal).response())
        return
    try:
        await ws.accept()
    except ConnectionClosed:
        host.admission.release()
        return
    core = RealtimeSession(_realtime_options(host), beta=websocket.headers.get("openai-beta") == "realtime=v1")
    codec: Codec = RealtimeCodec(core, host.options.decoding, host.options.max_session_s)
    await _run(host, Connection(host, Transport(ws, host.options), codec, host.admission.name()))


async def _run(host: SessionHost, connection: Connection) -> None:
    with host.admission.open(connection):
        try:
            await connection.run()
        except Exception:
            log.exception("%s: connection failed", connection.id)


def _admit(host: SessionHost, ws: ServerWebSocket) -> ProtocolError | None:
    """None when the session may start (a slot is taken), else the refusal."""
    if not host.auth.allows(ws.headers, ws.query):
        return ProtocolError("unauthorized", UNAUTHORIZED)
    return host.admission.admit()


async def _refuse(transport: Transport, events: list[dict[str, Any]], closing: tuple[int, str]) -> None:
    """A v1 refusal: the ``error`` event, then the close (its code says whether to retry)."""
    transport.stop_receiving()
    try:
        with contextlib.suppress(ConnectionClosed):
            for event in events:
                await transport.ws.send(json.dumps(event))
            await transport.ws.close(*closing)
    finally:
        await transport.release()


def _stream_options(host: SessionHost) -> StreamOptions:
    options = host.options
    tokens = host.control_tokens
    has_aligner = host.has_aligner

    def check_start(start: Start) -> str | None:
        """What only the model can check of a start: the language's name for it (None: detect), a
        context free of its control tokens, an aligner for word times; else ``bad_start``."""
        try:
            language = normalize_language(start.language) if start.language else None
        except ValueError as exc:
            raise ProtocolError("bad_start", str(exc)) from None
        check_context_tokens(start.context, tokens)
        if start.timestamps and not has_aligner:
            message = "this server has no forced aligner for word timestamps (asrlive serve --aligner ...)"
            raise ProtocolError("bad_start", message)
        return language

    return StreamOptions(
        session=options.session,
        max_session_s=options.max_session_s,
        max_frame_bytes=options.max_frame_bytes,
        idle_timeout_s=options.idle_timeout_s,
        protocol_version=PROTOCOL_VERSION,
        model=host.model_name,
        check_start=check_start,
    )


def _realtime_options(host: SessionHost) -> RealtimeOptions:
    tokens = host.control_tokens
    return RealtimeOptions(
        session=replace(host.options.session, speculative_finals=True),
        model=host.model_name,
        language=normalize_language,
        check_prompt=lambda prompt: check_context_tokens(prompt, tokens),
    )


async def _origin_refused(host: SessionHost, websocket: WebSocket) -> bool:
    """A page from an origin not allowed is refused at the handshake (403)."""
    origin = websocket.headers.get("origin")
    if origin_allowed(origin, websocket.headers.get("host"), host.options.allowed_origins):
        return False
    log.info("refused a WebSocket handshake from the origin %r", (origin or "")[:200])
    await _deny(websocket, PlainTextResponse(FORBIDDEN_ORIGIN, 403))
    return True


async def _deny(websocket: WebSocket, response: Response) -> None:
    with contextlib.suppress(OSError):  # the client is gone already
        await websocket.send_denial_response(response)
