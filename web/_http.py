"""The server's own HTTP/1.1 and WebSocket layer: an ASGI 3 server for ``AsrServer.app``.

One ``asyncio.Protocol`` per TCP connection; HTTP/1.1 is parsed by h11, WebSocket by websockets'
sans-I/O protocol (web/_wsconn.py). Both through their documented API only.

Every byte a client owes has a deadline (``HttpLimits``), so that a client that sends slowly or
not at all cannot hold a connection (slow-request attacks, CVE-2007-6750):

- the request head (an HTTP request's, or a WebSocket upgrade's) must be complete within
  ``handshake_timeout_s`` of the connection's start; on a kept-alive connection, within
  ``handshake_timeout_s`` of the end of the previous response, and its first byte must come within
  ``keepalive_timeout_s`` of it (an idle connection is closed). Bytes that trickle in do not
  extend either.
- a request body must be complete within ``body_timeout_s`` of the end of its head. Time the
  server itself stops reading (the application has not read what came) does not count.
- at most ``max_connections`` connections: the next is answered 503 before anything is read, and
  closed.

Such closes are quiet: ``on_closed(reason)`` (``handshake_timeout``, ``body_timeout``,
``keepalive_timeout``, ``max_connections``, ``bad_request``) and a DEBUG log line. h11 bounds a
request head to 16 KiB.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote

import h11
from starlette.types import ASGIApp, Message, Scope
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest

from ._wsconn import ABORT, ClientDisconnected, WebSocket

__all__ = ["ClientDisconnected", "HttpLimits", "HttpServer"]

log = logging.getLogger("asrlive.http")

ASGI = {"version": "3.0", "spec_version": "2.4"}
BODY_BUFFER_BYTES = 64 * 1024  # request body read ahead of the application before reading pauses
_REFUSED_BODY = b"the server has too many connections; try again later\n"
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)
TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_ERROR_BODY = b"Internal Server Error\n"


@dataclass(frozen=True)
class HttpLimits:
    """Deadlines and bounds of ``HttpServer`` (the module's docstring says what each applies to)."""

    handshake_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 1000
    close_timeout_s: float = 10.0  # a WebSocket's closing handshake, then the TCP connection closes
    max_message_bytes: int = 1024 * 1024  # a WebSocket message, on paths not in path_message_bytes
    path_message_bytes: Mapping[str, int] = field(default_factory=dict)
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    # Bytes the transport holds for a client before sends wait (asyncio's default: 64 KiB). Less,
    # so that what a slow client has not read waits in the application's outbox.
    write_buffer_bytes: int = 16 * 1024
    max_head_bytes: int = 16 * 1024  # h11's max_incomplete_event_size

    def __post_init__(self) -> None:
        for name in ("handshake_timeout_s", "body_timeout_s", "keepalive_timeout_s", "close_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("ping_interval_s", "ping_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_connections", "max_message_bytes", "write_buffer_bytes", "max_head_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        object.__setattr__(self, "path_message_bytes", MappingProxyType(dict(self.path_message_bytes)))

    def message_bytes(self, path: str) -> int:
        return self.path_message_bytes.get(path, self.max_message_bytes)


class HttpServer:
    """Serves ``app`` (ASGI 3) on sockets bound by the caller: ``await start(sockets)``; at the
    end ``stop_accepting()`` then ``await shutdown()``."""

    def __init__(
        self,
        app: ASGIApp,
        limits: HttpLimits,
        ssl: ssl.SSLContext | None = None,
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.ssl = ssl
        self.on_closed = on_closed
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._stopping = False

    @property
    def connections(self) -> int:
        """Connections now open (refused ones not counted)."""
        return len(self._connections)

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.limits.handshake_timeout_s if self.ssl is not None else None
        for sock in sockets:
            server = await loop.create_server(
                lambda: _Connection(self), sock=sock, ssl=self.ssl, backlog=2048, ssl_handshake_timeout=timeout
            )
            self._servers.append(server)

    def stop_accepting(self) -> None:
        """Close the listening sockets: new connections are refused from now on."""
        for server in self._servers:
            server.close()

    async def shutdown(self) -> None:
        """Close idle connections, let HTTP requests in progress finish, let WebSocket closing
        handshakes finish (``close_timeout_s``), then close what is left."""
        self.stop_accepting()
        self._stopping = True
        for connection in list(self._connections):
            connection.shutdown()
        try:
            await asyncio.wait_for(self._all_closed.wait(), self.limits.close_timeout_s)
        except asyncio.TimeoutError:
            for connection in list(self._connections):
                connection.give_up()
            await self._all_closed.wait()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.limits.close_timeout_s)
            for task in pending:
                task.cancel()

    # -- for connections ---------------------------------------------------------------------------

    def admit(self, connection: _Connection) -> bool:
        if len(self._connections) >= self.limits.max_connections:
            return False
        self._connections.add(connection)
        self._all_closed.clear()
        return True

    def discard(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if not self._connections:
            self._all_closed.set()

    def closed_because(self, reason: str, peer: object) -> None:
        log.debug("%s: connection closed: %s", peer, reason)
        if self.on_closed is not None:
            self.on_closed(reason)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Connection(asyncio.Protocol):
    """One TCP connection: HTTP requests one at a time, or one WebSocket after an upgrade."""

    transport: asyncio.Transport

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.limits.max_head_bytes)
        self.lost = False
        self.cycle: _Cycle | None = None
        self.websocket: WebSocket | None = None
        self.upgrade: h11.Request | None = None
        self.stopping = False
        self.head_bytes = 0  # bytes of the request head now awaited
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._writable = asyncio.Event()
        self._writable.set()
        self._body_left: float | None = None  # seconds of the body deadline left while reading pauses

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.server.admit(self):
            self.lost = True  # never counted
            transport.write(REFUSED)
            transport.close()
            self.server.closed_because("max_connections", self.peer)
            return
        transport.set_write_buffer_limits(high=self.limits.write_buffer_bytes)
        self._await_head(keepalive=False)

    def data_received(self, data: bytes) -> None:
        if self.websocket is not None:
            self.websocket.data_received(data)
            return
        self.cancel("idle")
        self.head_bytes += len(data)
        self.h11.receive_data(data)
        self._handle_events()

    def eof_received(self) -> bool | None:
        if self.websocket is not None:
            self.websocket.eof_received()
            return None
        self.h11.receive_data(b"")
        self._handle_events()
        return True if self.cycle is not None else None  # a request in progress still gets its answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._writable.set()
        # The request in progress and the WebSocket each hold this connection: the way back is
        # dropped, so that all of it goes by reference counting once the application call ends
        # (a cycle would wait for a full pass of the garbage collector; docs/deploy.md: Memory over time).
        if self.cycle is not None:
            self.cycle.wakeup.set()
            self.cycle = None
        if self.websocket is not None:
            self.websocket.connection_lost()
            self.websocket = None
        self.server.discard(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- for the HTTP cycle and the WebSocket ---------------------------------------------------------

    async def wait_writable(self) -> None:
        await self._writable.wait()

    def call_later(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        """A timer of this connection (replacing one of the same name), cancelled when it closes."""
        self.cancel(name)
        if not self.lost:
            self._timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    @property
    def peer(self) -> object:
        return self.transport.get_extra_info("peername")

    @property
    def disconnected(self) -> bool:
        return self.lost or self.transport.is_closing()

    def write(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data and not self.transport.is_closing():
            self.transport.write(data)

    # -- reading requests --------------------------------------------------------------------------

    def _await_head(self, *, keepalive: bool) -> None:
        self.head_bytes = 0
        self.call_later("head", self.limits.handshake_timeout_s, lambda: self._expire("handshake_timeout"))
        if keepalive:
            self.call_later("idle", self.limits.keepalive_timeout_s, lambda: self._expire("keepalive_timeout"))

    def _expire(self, reason: str) -> None:
        if self.disconnected:
            return
        if reason == "handshake_timeout" and "idle" in self._timers:
            reason = "keepalive_timeout"  # not one byte of the next request came: idle
        if reason == "handshake_timeout" and self.head_bytes:
            self.transport.write(TIMED_OUT)  # the client sent part of a request
        self.server.closed_because(reason, self.peer)
        self.transport.close()
        if self.cycle is not None:
            self.cycle.wakeup.set()

    def _handle_events(self) -> None:
        while not self.disconnected:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc)
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                if self.upgrade is not None:
                    self._start_websocket(self.upgrade)
                else:
                    self.transport.pause_reading()  # the next request waits for this response
                return
            if isinstance(event, h11.Request):
                self.cancel("head")
                self.cancel("idle")
                if _is_websocket(event):
                    self.upgrade = event
                else:
                    self._start_cycle(event)
            elif isinstance(event, h11.Data) and self.cycle is not None:
                self.cycle.body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.cancel("body")
                if self.cycle is not None:
                    self.cycle.body_done()
                elif self.h11.our_state in (h11.DONE, h11.MUST_CLOSE):
                    self.response_done()  # the end of a body read after its response
            elif isinstance(event, h11.ConnectionClosed):
                if self.cycle is None:
                    self.transport.close()
                return

    def _bad_request(self, exc: h11.RemoteProtocolError) -> None:
        self.server.closed_because("bad_request", self.peer)
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self.cycle is None:
            status = exc.error_status_hint
            body = HTTPStatus(status).phrase.encode() + b"\n"
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
            head = b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
            head += b"".join(b"%s: %s\r\n" % pair for pair in headers)
            self.transport.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()

    def _scope(self, request: h11.Request, kind: str) -> Scope:
        raw_path, _, query = request.target.partition(b"?")
        secure = self.server.ssl is not None
        scheme = {"http": "http", "websocket": "ws"}[kind] + ("s" if secure else "")
        return {
            "type": kind,
            "asgi": dict(ASGI),
            "http_version": request.http_version.decode(),
            "scheme": scheme,
            "method": request.method.decode("ascii"),
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": [(name, value) for name, value in request.headers],
            "client": _address(self.transport.get_extra_info("peername")),
            "server": _address(self.transport.get_extra_info("sockname")),
            "extensions": {ABORT: self.transport.abort},
        }

    def _start_cycle(self, request: h11.Request) -> None:
        self.cycle = cycle = _Cycle(self, request, self._scope(request, "http"))
        if self.h11.their_state is h11.SEND_BODY:
            self._body_left = self.limits.body_timeout_s
            self._arm_body()
        self.server.spawn(cycle.run(self.server.app))

    def _start_websocket(self, event: h11.Request) -> None:
        trailing, _ = self.h11.trailing_data
        scope = self._scope(event, "websocket")
        scope["subprotocols"] = [
            part.strip()
            for value in _values(event, b"sec-websocket-protocol")
            for part in value.decode("latin-1").split(",")
            if part.strip()
        ]
        scope["extensions"]["websocket.http.response"] = {}
        headers = Headers(
            [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers.raw_items()]
        )
        request = WsRequest(event.target.decode("latin-1"), headers)
        self.websocket = websocket = WebSocket(
            self, request, scope, self.limits.message_bytes(scope["path"]), self.limits
        )
        if not websocket.valid:
            websocket.refuse_invalid()
            return
        if trailing:
            websocket.data_received(trailing)
        self.server.spawn(_run_websocket(self.server.app, websocket, self))

    # -- the body's deadline, paused while the application has not read what came -----------

    def _arm_body(self) -> None:
        assert self._body_left is not None
        self._body_armed_at = time.monotonic()
        self.call_later("body", self._body_left, lambda: self._expire("body_timeout"))

    def pause_body(self) -> None:
        if "body" in self._timers and self._body_left is not None:
            self.cancel("body")
            self._body_left -= time.monotonic() - self._body_armed_at
        self.transport.pause_reading()

    def resume_body(self) -> None:
        if self.h11.their_state is h11.SEND_BODY and "body" not in self._timers and self._body_left is not None:
            self._arm_body()
        self.transport.resume_reading()

    # -- the end of a response ---------------------------------------------------------------------------

    def response_done(self) -> None:
        """The response is out: the next request, or the end of the connection."""
        self.cycle = None
        if self.disconnected:
            return
        if self.h11.their_state is h11.SEND_BODY:  # answered before the body was read: read and drop it
            self.resume_body()  # (under its deadline) rather than reset the connection; its end comes back here
            return
        self._body_left = None
        self.cancel("body")
        if self.stopping or self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            self.transport.close()
            return
        self.h11.start_next_cycle()
        self._await_head(keepalive=True)
        self.transport.resume_reading()
        self._handle_events()

    def shutdown(self) -> None:
        self.stopping = True
        if self.websocket is not None:
            self.websocket.shutdown()
        elif self.cycle is None and not self.disconnected:
            self.transport.close()  # idle between requests

    def give_up(self) -> None:
        """The shutdown's wait is over: a WebSocket still open is dropped (HTTP requests finish)."""
        if self.cycle is None:
            self.transport.abort()


class _Cycle:
    """One HTTP request and its response: the ``receive`` and ``send`` of one application call."""

    def __init__(self, connection: _Connection, request: h11.Request, scope: Scope) -> None:
        self.connection = connection
        self.scope = scope
        self.head = request.method == b"HEAD"
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete_body = False
        self.body_delivered = False
        self.wakeup = asyncio.Event()
        self.start: Message | None = None
        self.started = False
        self.complete = False

    async def run(self, app: ASGIApp) -> None:
        connection = self.connection
        try:
            await app(self.scope, self.receive, self.send)
        except Exception:
            if connection.disconnected:
                log.debug("%s: the application failed after the client left", connection.peer, exc_info=True)
            else:
                log.exception("the application failed on %s %s", self.scope["method"], self.scope["path"])
            self._fail()
        else:
            if not self.complete and not connection.disconnected:
                log.error("the application returned no complete response on %s", self.scope["path"])
                self._fail()

    def _fail(self) -> None:
        connection = self.connection
        if self.complete or connection.disconnected:
            return
        if self.started or connection.h11.our_state is not h11.SEND_RESPONSE:
            connection.transport.abort()
            return
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        headers.append((b"content-length", b"%d" % len(_ERROR_BODY)))
        connection.write(h11.Response(status_code=500, headers=headers, reason=b"Internal Server Error"))
        connection.write(h11.Data(data=b"" if self.head else _ERROR_BODY))
        connection.write(h11.EndOfMessage())
        self.complete = True
        connection.transport.close()

    def body(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > BODY_BUFFER_BYTES:
            self.connection.pause_body()
        self.wakeup.set()

    def body_done(self) -> None:
        self.complete_body = True
        self.wakeup.set()

    async def receive(self) -> Message:
        connection = self.connection
        while True:
            if self.chunks or (self.complete_body and not self.body_delivered):
                body = b"".join(self.chunks)
                self.chunks.clear()
                self.buffered = 0
                self.body_delivered = self.complete_body
                if not self.complete_body:
                    connection.resume_body()
                return {"type": "http.request", "body": body, "more_body": not self.complete_body}
            if connection.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if connection.h11.they_are_waiting_for_100_continue and not self.started:
                connection.write(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
            self.wakeup.clear()
            await self.wakeup.wait()

    async def send(self, message: Message) -> None:
        connection = self.connection
        kind = message["type"]
        if connection.disconnected:
            raise ClientDisconnected(f"{kind}: the client is gone")
        if kind == "http.response.start" and self.start is None:
            self.start = message
        elif kind == "http.response.body" and self.start is not None and not self.complete:
            await connection.wait_writable()
            if connection.disconnected:
                raise ClientDisconnected(f"{kind}: the client is gone")
            if not self.started:
                self._send_head(self.start)
            body = message.get("body", b"")
            if body and not self.head:
                connection.write(h11.Data(data=body))
            if not message.get("more_body", False):
                connection.write(h11.EndOfMessage())
                self.complete = True
                self.wakeup.set()
                connection.response_done()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _send_head(self, start: Message) -> None:
        self.started = True
        status = start["status"]
        headers = [(name.lower(), value) for name, value in start.get("headers", [])]
        if not any(name == b"date" for name, _ in headers):
            headers.append((b"date", email.utils.formatdate(usegmt=True).encode()))
        if self.connection.stopping:
            headers.append((b"connection", b"close"))
        phrase = _phrase(status).encode()
        self.connection.write(h11.Response(status_code=status, headers=headers, reason=phrase))


async def _run_websocket(app: ASGIApp, websocket: WebSocket, connection: _Connection) -> None:
    try:
        await app(websocket.scope, websocket.receive, websocket.send)
    except Exception:
        if connection.lost:
            log.debug("%s: the application failed after the client left", connection.peer, exc_info=True)
        else:
            log.exception("the application failed on the WebSocket %s", websocket.scope["path"])
            if not websocket.failed_before_accept():
                connection.transport.abort()
    else:
        if websocket.failed_before_accept():
            log.error("the application returned without answering the WebSocket handshake %s", websocket.scope["path"])


def _is_websocket(request: h11.Request) -> bool:
    upgrade = b",".join(_values(request, b"upgrade")).lower()
    return request.method == b"GET" and b"websocket" in upgrade


def _values(request: h11.Request, name: bytes) -> list[bytes]:
    return [value for key, value in request.headers if key == name]


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
