"""One WebSocket connection of ``HttpServer`` (web/_http.py): websockets' sans-I/O ``ServerProtocol``
under an ASGI ``websocket`` scope.

The handshake request comes parsed by h11; a first ``ServerProtocol`` builds and sends the
handshake response from it (``accept``, or a refusal), a second one, created ``OPEN``, parses the
frames that follow (the bytes h11 read past the request first). Only documented API of websockets
is used, so that any release from 14 on works.

The wire behaviour docs/protocol.md promises:

- A text message that is not UTF-8 fails the connection (1007) when the application reads it,
  after the messages before it (a ``ready`` the application is about to send is not lost).
- Messages are limited in size per path (``HttpLimits.path_message_bytes``): over it, 1009 as
  soon as the frame's header arrives (websockets' ``max_size``). A message in more than
  ``MAX_FRAGMENTS`` fragments fails the connection with 1009 when the application reads it.
- A ping every ``ping_interval_s``; a client that does not answer within ``ping_timeout_s`` is
  closed with 1011 and the application sees the disconnect.
- After the application's ``websocket.close`` (or a failure), the closing handshake completes:
  the client's close and its end of the TCP connection are awaited ``close_timeout_s``. A send on
  a connection that is failed or closed raises ``ClientDisconnected`` (an ``OSError``: Starlette
  raises ``WebSocketDisconnect``).
- The scope's extension ``asrlive.abort`` drops the TCP connection at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from websockets.datastructures import Headers
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from starlette.types import Message, Scope

log = logging.getLogger("asrlive.http")

MAX_FRAGMENTS = 4096  # as websockets' own server
ABORT = "asrlive.abort"  # the scope's extension that drops the TCP connection at once
QUEUE_BYTES = 64 * 1024  # messages waiting for the application before reading pauses
_DATA = (Opcode.TEXT, Opcode.BINARY)


class ClientDisconnected(OSError):
    """A send on a connection that is gone, failed or closed (Starlette: ``WebSocketDisconnect``)."""


class Link(Protocol):
    """What a WebSocket needs of its TCP connection (``_Connection`` in web/_http.py)."""

    transport: asyncio.Transport
    lost: bool

    async def wait_writable(self) -> None: ...

    def call_later(self, name: str, delay: float, callback: Callable[[], None]) -> None: ...

    def cancel(self, name: str) -> None: ...


class WebSocket:
    """The ASGI side (``receive``, ``send``) and the wire side (``data_received``, ...) of one
    WebSocket connection; its application call is run by the caller."""

    def __init__(self, link: Link, request: Request, scope: Scope, max_size: int, limits: Any) -> None:
        self.link = link
        self.scope = scope
        self.max_size = max_size
        self.limits = limits
        self.handshake = ServerProtocol(max_size=max_size)
        self.response = self.handshake.accept(request)
        self.ws: ServerProtocol | None = None  # after the 101
        self.queue: deque[tuple[Opcode, bytes] | Message] = deque()
        self.queued_bytes = 0
        self.wakeup = asyncio.Event()
        self.fragments: list[bytes] = []
        self.kind = Opcode.BINARY
        self.failing = False  # a failure is queued: nothing after it is read
        self.gone: Message | None = None  # the disconnect, once queued or delivered
        self.app_closed = False
        self.responded = False  # a handshake response (101 or a refusal) went out
        self.denial: tuple[int, list[tuple[bytes, bytes]], list[bytes]] | None = None
        self.pending: bytes = b""  # frames that came before the 101 was sent
        self.ping: bytes | None = None
        self.connected = False  # websocket.connect delivered

    @property
    def valid(self) -> bool:
        """Whether the handshake request is one (else ``refuse_invalid`` answers it, no application)."""
        return self.response.status_code == 101

    def refuse_invalid(self) -> None:
        self._respond(self.response)

    # -- the wire ----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.ws is None:
            if not self.responded:
                self.pending += data  # frames sent before the handshake response: bounded by pausing
                if len(self.pending) > self.max_size:
                    self.link.transport.pause_reading()
            return
        self.ws.receive_data(data)
        self._process()

    def eof_received(self) -> None:
        if self.ws is not None:
            self.ws.receive_eof()
            self._process()

    def connection_lost(self) -> None:
        self._disconnect(CloseCode.ABNORMAL_CLOSURE, "")
        self.wakeup.set()
        for protocol in (self.handshake, self.ws):
            if protocol is not None:
                # Its parser drops what it still buffers (up to a message's size). The protocol
                # and its parser refer to each other (websockets' design): the collector frees
                # that pair; everything of ours lets go of it now.
                protocol.receive_eof()

    def shutdown(self) -> None:
        """Server shutdown: a closing handshake under way finishes; an open connection is closed
        with 1012 (the server restarts), then its handshake finishes."""
        ws = self.ws
        if ws is not None and ws.state is State.OPEN:
            ws.send_close(CloseCode.SERVICE_RESTART, "")
            self._flush()
            self._disconnect(CloseCode.SERVICE_RESTART, "")
        elif ws is None and not self.responded:
            self._respond(self.handshake.reject(503, "the server is shutting down\n"))

    def _process(self) -> None:
        ws = self.ws
        assert ws is not None
        for frame in ws.events_received():
            if isinstance(frame, Frame):
                self._frame(frame)
        self._flush()
        if ws.state is not State.OPEN:
            rcvd, sent = ws.close_rcvd, ws.close_sent
            close = rcvd or sent
            if close is not None:
                self._disconnect(close.code, close.reason)

    def _frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.PONG:
            if self.ping is not None and frame.data == self.ping:
                self.ping = None
                self.link.cancel("pong")
            return
        if self.failing or frame.opcode not in (*_DATA, Opcode.CONT):
            return
        if frame.opcode in _DATA:
            self.kind, self.fragments = frame.opcode, []
        self.fragments.append(bytes(frame.data))
        if len(self.fragments) > MAX_FRAGMENTS:
            self._queue_failure(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
        elif frame.fin:
            self._queue((self.kind, b"".join(self.fragments)))
            self.fragments = []

    def _queue(self, item: tuple[Opcode, bytes] | Message) -> None:
        self.queue.append(item)
        if isinstance(item, tuple):
            self.queued_bytes += len(item[1])
            if self.queued_bytes > QUEUE_BYTES:
                self.link.transport.pause_reading()
        self.wakeup.set()

    def _queue_failure(self, code: int, reason: str) -> None:
        """Fail the connection with ``code`` when the application reads this far."""
        self.failing = True
        self.fragments = []
        self._queue({"type": "websocket.disconnect", "code": code, "reason": reason, "fail": True})
        self.link.transport.pause_reading()  # nothing after it will be read

    def _disconnect(self, code: int, reason: str) -> None:
        """The connection is closed (or closing): the application reads that after what came before."""
        if self.gone is None and not self.failing:
            self.gone = {"type": "websocket.disconnect", "code": code, "reason": reason}
            self.queue.append(self.gone)
            self.wakeup.set()

    def _fail(self, code: int, reason: str) -> None:
        ws = self.ws
        # A connection that is gone has nothing to tell (and its protocol has seen the end of the stream).
        if ws is not None and ws.state is State.OPEN and not self.link.lost:
            ws.fail(code, reason)
            self._flush()
        self.link.transport.resume_reading()  # the protocol discards the rest until the client's EOF

    def _flush(self) -> None:
        """Write what the protocol has to send; the end of it closes the TCP connection, at once
        or after ``close_timeout_s`` for the client's end."""
        protocol = self.ws if self.ws is not None else self.handshake
        transport = self.link.transport
        for data in protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        if protocol.close_expected():
            self.link.call_later("close", self.limits.close_timeout_s, transport.abort)
            self.link.cancel("ping")
            self.link.cancel("pong")
        if protocol.state is State.CLOSED:
            transport.close()

    def _respond(self, response: Response) -> None:
        self.responded = True
        self.handshake.send_response(response)
        self._flush()
        if response.status_code == 101:
            self.ws = ServerProtocol(state=State.OPEN, max_size=self.max_size)
            self._schedule_ping()
            pending, self.pending = self.pending, b""
            self.link.transport.resume_reading()
            if pending:
                self.data_received(pending)

    # -- keepalive -----------------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        self.link.call_later("ping", self.limits.ping_interval_s, self._send_ping)

    def _send_ping(self) -> None:
        ws = self.ws
        if ws is None or ws.state is not State.OPEN:
            return
        if self.ping is None:
            self.ping = os.urandom(4)
            ws.send_ping(self.ping)
            self._flush()
            self.link.call_later("pong", self.limits.ping_timeout_s, self._keepalive_timeout)
        self._schedule_ping()

    def _keepalive_timeout(self) -> None:
        log.debug("%s: no answer to a ping: closed (1011)", self.scope.get("client"))
        self._disconnect(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")

    # -- the application's side --------------------------------------------------------------

    async def receive(self) -> Message:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        while not self.queue:
            if self.link.lost or self.gone is not None:
                return self.gone or {"type": "websocket.disconnect", "code": CloseCode.ABNORMAL_CLOSURE, "reason": ""}
            self.wakeup.clear()
            await self.wakeup.wait()
        item = self.queue.popleft()
        if not isinstance(item, tuple):
            if item.pop("fail", False):
                self._fail(item["code"], item["reason"])
            self.gone = item
            return item
        kind, data = item
        self.queued_bytes -= len(data)
        if self.queued_bytes <= QUEUE_BYTES and not self.failing:
            self.link.transport.resume_reading()
        if kind is Opcode.BINARY:
            return {"type": "websocket.receive", "bytes": data}
        try:
            return {"type": "websocket.receive", "text": data.decode()}
        except UnicodeDecodeError as exc:  # websockets' close reason for it
            reason = f"{exc.reason} at position {exc.start}"
            self.queue.clear()
            self.failing = True
            self.gone = {"type": "websocket.disconnect", "code": CloseCode.INVALID_DATA, "reason": reason}
            self._fail(CloseCode.INVALID_DATA, reason)
            return self.gone

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.ws is None and not self.responded:
            self._handshake_answer(kind, message)
            return
        ws = self.ws
        if ws is None or self.app_closed or self.gone is not None or ws.state is not State.OPEN or self.link.lost:
            raise ClientDisconnected(f"{kind} on a closed WebSocket")
        if kind == "websocket.send":
            await self.link.wait_writable()
            if ws.state is not State.OPEN or self.link.lost:
                raise ClientDisconnected(f"{kind} on a closed WebSocket")
            text, data = message.get("text"), message.get("bytes")
            if text is not None:
                ws.send_text(text.encode())
            else:
                ws.send_binary(data or b"")
            self._flush()
        elif kind == "websocket.close":
            self.app_closed = True
            ws.send_close(message.get("code") or CloseCode.NORMAL_CLOSURE, message.get("reason") or "")
            self._flush()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an open WebSocket")

    def _handshake_answer(self, kind: str, message: Message) -> None:
        if kind == "websocket.accept":
            headers = self.response.headers
            if message.get("subprotocol"):
                headers["Sec-WebSocket-Protocol"] = message["subprotocol"]
            for name, value in message.get("headers") or []:
                headers[name.decode("latin-1")] = value.decode("latin-1")
            self._respond(self.response)
        elif kind == "websocket.close":
            self._respond(self.handshake.reject(403, ""))
        elif kind == "websocket.http.response.start" and self.denial is None:
            self.denial = (message["status"], list(message.get("headers") or []), [])
        elif kind == "websocket.http.response.body" and self.denial is not None:
            self.denial[2].append(message.get("body", b""))
            if not message.get("more_body", False):
                self._deny(*self.denial)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} during a WebSocket handshake")

    def _deny(self, status: int, raw: list[tuple[bytes, bytes]], body: list[bytes]) -> None:
        headers = Headers([(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw])
        headers["Connection"] = "close"
        self._respond(Response(status, _phrase(status), headers, b"".join(body)))

    def failed_before_accept(self) -> bool:
        """The application ended without answering the handshake: a 500 (the caller logs why)."""
        if self.responded:
            return False
        self._respond(self.handshake.reject(500, "Internal Server Error\n"))
        return True


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
