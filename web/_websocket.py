"""The WebSocket as the session code sees it, over Starlette's ASGI WebSocket.

The session code (web/_connection.py, _transport.py, _rtc.py) was written against websockets'
``ServerConnection``; ``ServerWebSocket`` offers the part of it that code uses (``recv``,
``send``, ``close``, ``async for``, ``ConnectionClosed``) over Starlette's ASGI ``WebSocket``.

The connection itself is the server's own (web/_wsconn.py, under web/_http.py), which keeps the
wire as docs/protocol.md has it: 1007 for a text message that is not UTF-8 when it is read, 1009
for an oversized message or one in too many fragments, the closing handshake completed, a send on
a closed connection raising the disconnect, and the scope's ``asrlive.abort`` extension.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close, CloseCode

from ._wsconn import ABORT

_NO_CLOSE_FRAME = (CloseCode.NO_STATUS_RCVD, CloseCode.ABNORMAL_CLOSURE)  # the connection was lost
_OK = (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY)


class ServerWebSocket:
    """One accepted WebSocket: what the session code uses of websockets' ``ServerConnection``.

    ``recv`` and ``send`` raise ``ConnectionClosed`` once the connection is closed, from either
    side (``ConnectionClosedOK`` after 1000 or 1001); ``close`` sends the close frame (the server
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
        except OSError:  # the server's ClientDisconnected: gone during the handshake
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
        except WebSocketDisconnect as gone:  # Starlette's, for the server's ClientDisconnected
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
