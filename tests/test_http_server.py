"""The server's own HTTP/WebSocket layer (web/_http.py) with a tiny Starlette app, on loopback port
0: HTTP/1.0 and 1.1, bodies, WebSocket close codes, and the deadlines of hostile clients."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from contextlib import asynccontextmanager

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from asrlive.web._http import HttpLimits, HttpServer

from .serving import eventually, raw_websocket

TIMEOUT = 10.0
MARGIN = 1.0  # what a deadline may be late by on a busy 2-core machine

pytestmark = pytest.mark.asyncio


class App:
    """A Starlette app that records what its WebSocket endpoints saw."""

    def __init__(self) -> None:
        self.seen: list[object] = []
        self.app = Starlette(
            routes=[
                Route("/hello", self.hello, methods=["GET"]),
                Route("/echo", self.echo, methods=["POST"]),
                Route("/fail", self.fail, methods=["GET"]),
                WebSocketRoute("/ws", self.ws_echo),
                WebSocketRoute("/big", self.ws_echo),
                WebSocketRoute("/ordered", self.ws_ordered),
                WebSocketRoute("/deny403", self.deny(403)),
                WebSocketRoute("/deny401", self.deny(401)),
                WebSocketRoute("/close", self.ws_close_before_accept),
                WebSocketRoute("/abort", self.ws_abort),
            ]
        )

    async def hello(self, request: Request) -> Response:
        return PlainTextResponse(f"hello {request.url.path} {request.scope['http_version']}")

    async def echo(self, request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    async def fail(self, request: Request) -> Response:
        raise ValueError("a bug")

    async def ws_echo(self, websocket: WebSocket) -> None:
        await websocket.accept(
            subprotocol=websocket.scope["subprotocols"][0] if websocket.scope["subprotocols"] else None
        )
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    self.seen.append(("disconnect", message["code"]))
                    return
                self.seen.append(message.get("text") or message.get("bytes"))
                if message.get("text") is not None:
                    await websocket.send_text(message["text"])
                else:
                    await websocket.send_bytes(message["bytes"])
        except WebSocketDisconnect as gone:
            self.seen.append(("send failed", gone.code))

    async def ws_ordered(self, websocket: WebSocket) -> None:
        """Reads one message, answers it, reads the next: a 1007 comes after the answer."""
        await websocket.accept()
        first = await websocket.receive()
        await websocket.send_text(f"got {first['text']}")
        second = await websocket.receive()
        self.seen.append((second["type"], second.get("code")))
        try:
            await websocket.send_text("too late")
        except WebSocketDisconnect:
            self.seen.append("send raised")

    def deny(self, status: int):
        async def endpoint(websocket: WebSocket) -> None:
            await websocket.send_denial_response(PlainTextResponse(f"denied {status}", status))

        return endpoint

    async def ws_close_before_accept(self, websocket: WebSocket) -> None:
        await websocket.close()

    async def ws_abort(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        websocket.scope["extensions"]["asrlive.abort"]()
        self.seen.append(await websocket.receive())


@asynccontextmanager
async def serving(app: App | None = None, **limits):
    closed: Counter[str] = Counter()
    app = app or App()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = HttpServer(app.app, HttpLimits(**limits), on_closed=lambda reason: closed.update([reason]))
    await asyncio.wait_for(server.start([sock]), TIMEOUT)
    server.port = sock.getsockname()[1]
    server.closed = closed
    server.asgi = app
    try:
        yield server
    finally:
        server.stop_accepting()
        await asyncio.wait_for(server.shutdown(), TIMEOUT)


async def exchange(port: int, data: bytes, *, eof: bool = False) -> bytes:
    """Send ``data``, read until the server closes the connection."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    writer.write(data)
    if eof:
        writer.write_eof()
    try:
        return await read_to_eof(reader, TIMEOUT)
    finally:
        writer.close()


async def read_to_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), TIMEOUT)


# -- HTTP ------------------------------------------------------------------------------------------


async def test_get_head_http10_and_keepalive(caplog):
    async with serving() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(2):  # one connection, two requests
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"hello /hello 1.1"
            assert b"server:" not in head.lower() and b"date:" in head.lower()
        writer.write(b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 16" in head.lower()
        head, body = await read_response(reader)  # HEAD had no body: the next response follows
        assert body == b"hello /hello 1.1"
        writer.close()
        answer = await exchange(server.port, b"GET /hello HTTP/1.0\r\n\r\n")  # HAProxy's check: no Host
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"hello /hello 1.0")
        assert (await exchange(server.port, b"GET /nope HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 404")
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_chunked_body_and_100_continue():
    async with serving() as server:
        chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        chunked += b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        assert (await exchange(server.port, chunked)).endswith(b"\r\n\r\nhello world")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"ping")
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200") and body == b"ping"
        writer.close()


async def test_an_application_error_is_a_500_and_logged(caplog):
    async with serving() as server:
        answer = await exchange(server.port, b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert [record.exc_info[0] for record in caplog.records if record.levelno >= logging.ERROR] == [ValueError]


# -- WebSocket -------------------------------------------------------------------------------------


async def received(protocol: ClientProtocol, reader: asyncio.StreamReader) -> list[Frame]:
    """Every frame until the server ends the connection; then the protocol's close code is known."""
    frames = []
    while protocol.state is not State.CLOSED:
        data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        frames += [e for e in protocol.events_received() if isinstance(e, Frame) and e.opcode is not Opcode.CLOSE]
    return frames


async def test_websocket_echo_subprotocol_and_sizes():
    async with serving(max_message_bytes=1000, path_message_bytes={"/big": 100_000}) as server:
        base = f"ws://127.0.0.1:{server.port}"
        async with connect(f"{base}/ws", subprotocols=["asr"], open_timeout=TIMEOUT) as ws:
            assert ws.subprotocol == "asr"
            await ws.send("hi")
            await ws.send(b"\x00\x01")
            assert [await asyncio.wait_for(ws.recv(), TIMEOUT) for _ in range(2)] == ["hi", b"\x00\x01"]
        async with connect(f"{base}/big", max_size=None, open_timeout=TIMEOUT) as ws:
            await ws.send(bytes(50_000))
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == bytes(50_000)
        async with connect(f"{base}/ws", open_timeout=TIMEOUT) as ws:
            await ws.send(bytes(1001))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 1009
        await asyncio.sleep(0)
    assert ("disconnect", 1009) in server.asgi.seen and ("disconnect", 1000) in server.asgi.seen


async def test_invalid_utf8_fails_when_read_after_what_came_before():
    async with serving() as server:
        protocol, reader, writer = await raw_websocket(server.port, "/ordered", timeout=TIMEOUT)
        protocol.send_text(b"first")
        protocol.send_text(b"\xc3\x28")  # not UTF-8
        protocol.send_text(b"after")
        writer.write(b"".join(protocol.data_to_send()))
        frames = await received(protocol, reader)
        writer.close()
    assert [frame.data for frame in frames] == [b"got first"]
    assert protocol.close_code == 1007
    assert server.asgi.seen == [("websocket.disconnect", 1007), "send raised"]


@pytest.mark.parametrize("fragments, code", [(4096, 1000), (4097, 1009)])
async def test_a_message_in_too_many_fragments_fails_when_read(fragments, code):
    async with serving() as server:
        protocol, reader, writer = await raw_websocket(server.port, "/ws", timeout=TIMEOUT)
        protocol.send_binary(b"a", fin=False)
        for _ in range(fragments - 2):
            protocol.send_continuation(b"a", fin=False)
        protocol.send_continuation(b"a", fin=True)
        writer.write(b"".join(protocol.data_to_send()))
        echoed = []
        if code == 1000:  # the echo, then the client closes
            while not echoed:
                protocol.receive_data(await asyncio.wait_for(reader.read(65536), TIMEOUT))
                echoed = [len(e.data) for e in protocol.events_received() if isinstance(e, Frame)]
            protocol.send_close(1000)
            writer.write(b"".join(protocol.data_to_send()))
        frames = await received(protocol, reader)
        writer.close()
    assert protocol.close_code == code
    assert echoed == ([fragments] if code == 1000 else []) and not frames


async def test_denials_and_a_close_before_accept():
    async with serving() as server:
        for path, status, body in [
            ("/deny403", 403, b"denied 403"),
            ("/deny401", 401, b"denied 401"),
            ("/close", 403, b""),
        ]:
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{server.port}{path}", open_timeout=TIMEOUT)
            assert refused.value.response.status_code == status and refused.value.response.body == body


async def test_the_abort_extension_drops_the_connection():
    async with serving() as server:
        async with connect(f"ws://127.0.0.1:{server.port}/abort", open_timeout=TIMEOUT) as ws:
            await ws.send("go")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 1006  # no close frame: the TCP connection went
        await eventually(lambda: server.asgi.seen, TIMEOUT)
    assert server.asgi.seen == [{"type": "websocket.disconnect", "code": 1006, "reason": ""}]


async def test_shutdown_closes_open_websockets_with_a_closing_handshake():
    async with serving() as server:
        async with connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=TIMEOUT) as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "hi"
            server.stop_accepting()
            started = time.monotonic()
            await asyncio.wait_for(server.shutdown(), TIMEOUT)
            assert time.monotonic() - started < 2.0  # the client answered the close at once
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert ws.close_code == 1012
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), TIMEOUT)


# -- hostile clients -------------------------------------------------------------------------------

HANDSHAKE = 0.5
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def hostile(port: int, send: list[bytes], every: float = 0.0) -> float:
    """Connect, send ``send`` a piece every ``every`` seconds; seconds until the server closed."""
    started = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)

    async def trickle() -> None:
        for piece in send:
            writer.write(piece)
            await asyncio.sleep(every)

    feeding = asyncio.create_task(trickle())
    await read_to_eof(reader, TIMEOUT)
    elapsed = time.monotonic() - started
    feeding.cancel()
    writer.close()
    return elapsed


SLOW_CLIENTS = {
    "silent": ([], "handshake_timeout", HANDSHAKE),
    "half an upgrade": ([UPGRADE[:60]], "handshake_timeout", HANDSHAKE),
    "no blank line": ([UPGRADE[:-2]], "handshake_timeout", HANDSHAKE),
    "a byte every 0.2 s": ([bytes([b]) for b in UPGRADE], "handshake_timeout", HANDSHAKE),
    "a body byte every 0.2 s": (
        [b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", *[b"x"] * 100],
        "body_timeout",
        1.0,
    ),
}


async def test_slow_and_silent_clients_are_closed_within_their_deadlines(caplog):
    async with serving(handshake_timeout_s=HANDSHAKE, body_timeout_s=1.0, keepalive_timeout_s=0.5) as server:
        elapsed = await asyncio.gather(*(hostile(server.port, send, 0.2) for send, _, _ in SLOW_CLIENTS.values()))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_response(reader)
        started = time.monotonic()
        await read_to_eof(reader, TIMEOUT)  # idle after a response: the keep-alive deadline
        idle = time.monotonic() - started
        writer.close()
        await eventually(lambda: sum(server.closed.values()) == 6, TIMEOUT)
    for (name, (_, _, deadline)), seconds in zip(SLOW_CLIENTS.items(), elapsed, strict=True):
        assert deadline <= seconds + 0.05 < deadline + MARGIN, name
    assert 0.5 <= idle + 0.05 < 0.5 + MARGIN
    assert server.closed == {"handshake_timeout": 4, "body_timeout": 1, "keepalive_timeout": 1}
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_connections_over_the_limit_get_a_503_and_the_count_recovers(caplog):
    async with serving(max_connections=3) as server:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await eventually(lambda: server.connections == 3, TIMEOUT)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        answer = await read_to_eof(reader, TIMEOUT)  # sent nothing
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"connection: close" in answer.lower()
        held[0][1].close()
        await eventually(lambda: server.connections == 2, TIMEOUT)
        answer = await exchange(server.port, b"GET /hello HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK")
        for _, writer in held[1:]:
            writer.close()
    assert server.closed == {"max_connections": 1}
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
