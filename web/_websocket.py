"""The WebSocket as the session code sees it, over uvicorn and Starlette.

The session code (web/_connection.py, _transport.py, _rtc.py) was written against websockets'
``ServerConnection``; ``ServerWebSocket`` offers the part of it that code uses (``recv``,
``send``, ``close``, ``async for``, ``ConnectionClosed``) over Starlette's ASGI ``WebSocket``.

The connection itself is uvicorn's WebSocket protocol on websockets' sans-I/O ``ServerProtocol``
(``ws="websockets-sansio"``). ``WebSocketProtocol`` changes four things in it, so that the wire
stays as docs/protocol.md has it:

- A text message that is not UTF-8 fails the connection (1007) when the application reads it,
  after the messages before it; uvicorn fails it on arrival, which would lose a ``ready`` the
  server was about to send.
- A message in more than ``MAX_FRAGMENTS`` fragments fails it likewise (1009): uvicorn sets no
  limit, websockets' own server does.
- Sending on a connection that the protocol failed (1002, 1007, 1009, a keepalive timeout) raises
  ``ClientDisconnected``, as it does once the connection is lost; uvicorn raises a RuntimeError
  until then.
- At shutdown, a connection whose closing handshake is under way finishes it (the client's close,
  or the close timeout) instead of being cut: uvicorn closed the socket at once, and closing one
  with unread input resets the connection, which can lose the last events and the close frame
  before the client reads them.

It also counts a handshake refused with an HTTP response (403, 404) as complete: uvicorn logged an
error for each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close, CloseCode, Frame
from websockets.http11 import Request
from websockets.protocol import State

if TYPE_CHECKING:
    from uvicorn._types import ASGIReceiveEvent, ASGISendEvent, WebSocketDisconnectEvent

MAX_FRAGMENTS = 4096  # as websockets' own server
ABORT = "asrlive.abort"  # the scope's extension that drops the TCP connection at once
_NO_CLOSE_FRAME = (CloseCode.NO_STATUS_RCVD, CloseCode.ABNORMAL_CLOSURE)  # the connection was lost
_OK = (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY)


class ServerWebSocket:
    """One accepted WebSocket: what the session code uses of websockets' ``ServerConnection``.

    ``recv`` and ``send`` raise ``ConnectionClosed`` once the connection is closed, from either
    side (``ConnectionClosedOK`` after 1000 or 1001); ``close`` sends the close frame (uvicorn
    completes the closing handshake) and does nothing on a closed connection.
    """

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        scope = websocket.scope
        self.path: str = scope["path"]
        self.query: str = scope["query_string"].decode("latin-1")
        self.headers = websocket.headers
        client = scope.get("client")
        self.remote_address: tuple[str, int] | None = (client[0], client[1]) if client else None
        self._ended: tuple[Close, bool] | None = None  # the close, and whether the client sent it

    async def accept(self) -> None:
        try:
            await self._websocket.accept()
        except OSError:  # uvicorn's ClientDisconnected: gone during the handshake
            self._end(CloseCode.ABNORMAL_CLOSURE, "", by_client=True)
            raise self._closed() from None

    async def recv(self) -> str | bytes:
        if self._ended is not None:
            raise self._closed()
        message = await self._websocket.receive()
        if message["type"] == "websocket.disconnect":
            self._end(message.get("code", CloseCode.NORMAL_CLOSURE), message.get("reason") or "", by_client=True)
            raise self._closed()
        text: str | None = message.get("text")
        if text is not None:
            return text
        data: bytes = message["bytes"]
        return data

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        """Every message until the close: ends after a normal close, raises after any other."""
        try:
            while True:
                yield await self.recv()
        except ConnectionClosedOK:
            return

    async def send(self, message: str | bytes) -> None:
        if self._ended is not None:
            raise self._closed()
        key = "text" if isinstance(message, str) else "bytes"
        try:
            await self._websocket.send({"type": "websocket.send", key: message})
        except WebSocketDisconnect as gone:  # Starlette's, for uvicorn's ClientDisconnected
            self._end(gone.code, gone.reason, by_client=True)
            raise self._closed() from None

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        if self._ended is not None:
            return
        self._end(code, reason, by_client=False)
        try:
            await self._websocket.close(code, reason)
        except WebSocketDisconnect:
            pass  # gone already: nothing to close

    def abort(self) -> None:
        """Drop the TCP connection at once, whatever is still unsent: for a client that reads
        nothing, to which not even a close frame can get through. Reads and sends then raise
        ``ConnectionClosed`` (no close frame: 1006)."""
        abort = self._websocket.scope.get("extensions", {}).get(ABORT)
        if abort is not None:
            abort()

    def _end(self, code: int, reason: str, *, by_client: bool) -> None:
        if self._ended is None:
            self._ended = (Close(code, reason), by_client)

    def _closed(self) -> ConnectionClosed:
        assert self._ended is not None
        close, by_client = self._ended
        if by_client:
            rcvd = None if close.code in _NO_CLOSE_FRAME else close
            if rcvd is not None and rcvd.code in _OK:
                return ConnectionClosedOK(rcvd, None)
            return ConnectionClosedError(rcvd, None)
        return (ConnectionClosedOK if close.code in _OK else ConnectionClosedError)(None, close)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's protocol on websockets' sans-I/O ``ServerProtocol``, as the module says; for
    ``Config(ws=...)``, made by ``websocket_protocol`` with the server's close timeout."""

    close_timeout_s = 10.0
    max_message_bytes: dict[str, int] = {}  # a larger limit than ``ws_max_size`` for some paths
    # Bytes the transport holds for a client before a send waits (asyncio's default: 64 KiB). Less,
    # so that what a slow client has not read waits in its connection's outbox, which drops
    # superseded partials, rather than in the transport, which cannot.
    write_buffer_bytes = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = self.close_timeout_s  # how long a close waits for the client's (uvicorn: 10 s)
        self._failure: WebSocketDisconnectEvent | None = None  # queued after the messages before it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        cast(asyncio.WriteTransport, transport).set_write_buffer_limits(high=self.write_buffer_bytes)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        extensions = cast(dict[str, Any], self.scope["extensions"])
        extensions[ABORT] = self.transport.abort  # for ServerWebSocket.abort; run_asgi starts later
        path = event.path.partition("?")[0]
        if path in self.max_message_bytes:  # read by the parser frame by frame: it applies from the first
            limit = self.max_message_bytes[path]
            if hasattr(self.conn, "max_message_size"):  # websockets 16 and later
                self.conn.max_message_size = limit
            else:  # websockets 14 and 15 (which openai[realtime] 3.x requires)
                cast(Any, self.conn).max_size = limit

    def handle_cont(self, event: Frame) -> None:
        if self._failure is None and len(self.frames) >= MAX_FRAGMENTS:
            self._fail_when_read(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
        if self._failure is None:
            super().handle_cont(event)

    def send_receive_event_to_app(self) -> None:
        if self._failure is not None:  # nothing after the message that fails the connection is read
            self.frames = []
            return
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError as exc:  # websockets' close reason for it
                self._fail_when_read(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        super().send_receive_event_to_app()

    def _fail_when_read(self, code: int, reason: str) -> None:
        self.frames = []
        self._failure = {"type": "websocket.disconnect", "code": code, "reason": reason}
        self.queue.put_nowait(self._failure)
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    async def receive(self) -> ASGIReceiveEvent:
        message = await super().receive()
        if message is self._failure and self.conn.state is State.OPEN and not self.transport.is_closing():
            self.conn.fail(self._failure["code"], self._failure.get("reason") or "")
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()  # a server that fails a connection does not wait for the client's close
        return message

    def shutdown(self) -> None:
        if self.close_sent and not self.transport.is_closing():
            return  # the client's close, or the close timeout, ends the closing handshake
        super().shutdown()

    async def send(self, message: ASGISendEvent) -> None:
        failed = self.close_sent and self.handshake_complete and self.initial_response is None
        if failed and message["type"] in ("websocket.send", "websocket.close"):
            raise ClientDisconnected  # Starlette: WebSocketDisconnect
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True  # refused with a response (uvicorn would log an error)


def websocket_protocol(close_timeout_s: float, max_message_bytes: dict[str, int]) -> type[WebSocketProtocol]:
    """``WebSocketProtocol`` whose closing handshake waits ``close_timeout_s`` for the client, and
    whose messages may be as large as ``max_message_bytes`` says on those paths."""

    class Protocol(WebSocketProtocol):
        pass

    Protocol.close_timeout_s = close_timeout_s
    Protocol.max_message_bytes = dict(max_message_bytes)
    return Protocol
