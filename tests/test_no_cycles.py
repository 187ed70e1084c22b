"""An ended connection is freed by reference counting, however it ended: with the garbage collector
disabled, nothing of it (its HTTP and WebSocket protocol objects, its session, its tasks) is left
alive once the server has counted it closed. (Not counted: websockets' own ``ServerProtocol``,
whose parser generator refers back to it by design; the server feeds it the end of the stream, so
that it holds no data, and the collector frees the pair.) A connection kept only by reference cycles stays in
memory until one of the collector's full passes, rare in a process that holds a model's hundreds
of thousands of objects (docs/deploy.md: Memory over time)."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import socket
from collections import deque
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect

import asrlive
from asrlive.engine import SAMPLE_RATE
from asrlive.streaming import _session
from asrlive.streaming._realtime import RealtimeSession
from asrlive.streaming._session import Session
from asrlive.streaming._v1 import StreamProtocol
from asrlive.web import _http, _server, _wsconn
from asrlive.web._codecs import RealtimeCodec, StreamCodec
from asrlive.web._connection import Connection
from asrlive.web._outbox import Outbox
from asrlive.web._scheduler import Stream
from asrlive.web._transport import Transport
from asrlive.web._websocket import ServerWebSocket

from .rtc import RtcPeer, rtc_url
from .serving import (
    GAP,
    TIMEOUT,
    TextBytes,
    eventually,
    non_reading_session,
    pcm16,
    raw_session,
    running_server,
    server_metric,
    start_message,
    stream_audio,
)

pytestmark = pytest.mark.asyncio

TOKEN = "secret"
TYPES = (
    Connection,
    StreamCodec,
    RealtimeCodec,
    StreamProtocol,
    RealtimeSession,
    Session,
    Outbox,
    Stream,
    Transport,
    ServerWebSocket,
    _http._Connection,
    _http._Cycle,
    _wsconn.WebSocket,
)
# Where the project's coroutines are written: asrlive.web, asrlive.streaming, asrlive itself.
PROJECT = tuple(str(Path(module.__file__).parent) for module in (_http, _session, asrlive))


def _ours(obj: object) -> bool:
    kind = type(obj)  # not isinstance: some objects warn when their __class__ is read
    if issubclass(kind, TYPES):
        return True
    if issubclass(kind, asyncio.Task):
        assert isinstance(obj, asyncio.Task)
        code = getattr(obj.get_coro(), "cr_code", None)
        return code is not None and code.co_filename.startswith(PROJECT)
    return False


def _alive() -> list[object]:
    return [obj for obj in gc.get_objects() if _ours(obj)]


def _name(obj: object) -> str:
    if issubclass(type(obj), asyncio.Task):
        assert isinstance(obj, asyncio.Task)
        return f"Task({obj.get_coro().__qualname__})"
    return type(obj).__qualname__


def _cycle(start: object, limit: int = 200_000) -> list[str]:
    """The shortest path of references from ``start`` back to itself, as type names (diagnostics)."""
    parents: dict[int, tuple[int, object]] = {}
    queue = deque([start])
    seen = {id(start)}
    while queue and len(seen) < limit:
        obj = queue.popleft()
        for ref in gc.get_referents(obj):
            if ref is start:
                path = [_name(obj)]
                key = id(obj)
                while key in parents:
                    key, parent = parents[key]
                    path.append(_name(parent))
                return [*reversed(path), _name(start)]
            if id(ref) not in seen and not issubclass(type(ref), (type, ModuleType)):
                seen.add(id(ref))
                parents[id(ref)] = (id(obj), obj)
                queue.append(ref)
    return ["no cycle found"]


def _report(left: list[object]) -> str:
    lines = []
    for obj in left[:6]:
        lines.append(f"{_name(obj)}: {' -> '.join(_cycle(obj))}")
    return "\n".join(lines)


async def _ended(server) -> None:
    await eventually(lambda: server_metric(server, "asrlive_open_sessions") == 0)
    await eventually(lambda: server._http.connections == 0)
    # The server's own tasks (a connection's application call) finish a step after the close.
    await eventually(lambda: not server._http._tasks)
    for _ in range(5):
        await asyncio.sleep(0)


async def _left_after(server, ending) -> list[str]:
    """Run ``ending`` with the collector off; what of the project's types it left alive."""
    gc.collect()
    before = _alive()  # held, so that no new object takes one of their ids
    known = {id(obj) for obj in before}
    gc.disable()
    try:
        await ending(server)
        await _ended(server)
        left = [obj for obj in _alive() if id(obj) not in known]
        report = _report(left) if left else ""
        names = sorted(_name(obj) for obj in left)
        del left
        return [report, *names] if names else []
    finally:
        gc.enable()
        del before


def _speech(speech) -> np.ndarray:
    return np.concatenate([GAP[:8000], speech["goforward"], GAP])


# -- the endings ------------------------------------------------------------------------------------


async def _finish(server, speech) -> None:
    result = await stream_audio(server.url, _speech(speech))
    assert result.close_code == 1000 and result.types[-1] == "done"


async def _client_closes(server, speech) -> None:
    async with ws_connect(server.url, open_timeout=TIMEOUT) as ws:
        await ws.send(start_message())
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "ready"
        await ws.send(pcm16(speech["goforward"][: 2 * SAMPLE_RATE]))
    assert ws.close_code == 1000


async def _abort(server, speech) -> None:
    async with ws_connect(server.url, open_timeout=TIMEOUT) as ws:  # vanishes mid-utterance
        await ws.send(start_message())
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "ready"
        await ws.send(pcm16(speech["two-cities"][: 4 * SAMPLE_RATE]))
        while json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] != "partial":
            pass  # its speech has started, its final has not come
        ws.transport.abort()


async def _slow_reader(server, speech) -> None:
    talk = np.concatenate([speech["cards-001"], GAP, speech["goforward"], GAP] * 36)
    messages = [start_message(), *(pcm16(talk[i : i + SAMPLE_RATE]) for i in range(0, talk.size, SAMPLE_RATE))]
    writer = await non_reading_session(server.port, "/v1/stream", messages)
    try:
        await eventually(lambda: server_metric(server, "asrlive_slow_clients_total") == 1)
    finally:
        await _ended(server)  # given up: the server aborted its end
        writer.transport.abort()


async def _refused(server, speech) -> None:
    result = await raw_session(server.url, [start_message()])
    assert result.types == ["error"] and result.events[0]["code"] == "unauthorized"


async def _http_keepalive(server, speech) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # idle: the keep-alive deadline
    finally:
        writer.close()


async def _http_client_closes(server, speech) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    writer.close()


async def _http_client_drops_mid_request(server, speech) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
    writer.write(head + b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
    await writer.drain()
    await eventually(lambda: server._requests == 1)  # the application reads the body
    writer.transport.abort()


async def _head_deadline(server, speech) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n")  # never completed
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
        assert answer.startswith(b"HTTP/1.1 408 ")
    finally:
        writer.close()


async def _idle_deadline(server, speech) -> None:
    result = await raw_session(server.url, [start_message(), pcm16(speech["goforward"])])
    assert result.of_type("error")[0]["code"] == "idle_timeout" and result.close_code == 4408


async def _length_deadline(server, speech) -> None:
    clip = speech["librivox-0870"][: 3 * SAMPLE_RATE]
    result = await raw_session(server.url, [start_message(), pcm16(clip), json.dumps({"type": "finish"})])
    assert result.of_type("error")[0]["code"] == "session_too_long"


async def _not_utf8(server, speech) -> None:
    result = await raw_session(server.url, [start_message(), TextBytes(b"\xc3\x28")])
    assert result.close_code == 1007


async def _bad_audio(server, speech) -> None:
    frames = [start_message(), pcm16(speech["goforward"][:1600]), bytes(1001)]  # an odd byte count
    result = await raw_session(server.url, frames)
    assert result.of_type("error")[0]["code"] == "bad_audio" and result.close_code == 4400


async def _realtime_abort(server, speech) -> None:
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
    async with ws_connect(url, open_timeout=TIMEOUT) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "session.created"
        ws.transport.abort()


async def _rtc_vanish(server, speech) -> None:
    peer, _ = await RtcPeer.offer(_speech(speech))
    await peer.connect(rtc_url(server))
    await eventually(lambda: peer.of_type("partial"))
    await peer.vanish()
    await eventually(lambda: not server.peers)


async def _rtc_finish(server, speech) -> None:
    peer, _ = await RtcPeer.offer(_speech(speech))
    await peer.connect(rtc_url(server))
    await asyncio.wait_for(peer.track.spoken.wait(), TIMEOUT)
    await peer.finish()
    assert await peer.closed() == 1000
    await eventually(lambda: not server.peers)


# Each ending: the client's part, and the server's options for it.
ENDINGS = {
    "finish": (_finish, {}),
    "client_closes": (_client_closes, {}),
    "abort": (_abort, {}),
    "slow_reader": (_slow_reader, {"max_outbox_bytes": 1024}),
    "refused": (_refused, {"token": TOKEN}),
    "http_keepalive": (_http_keepalive, {"keepalive_timeout_s": 0.3}),
    "http_client_closes": (_http_client_closes, {}),
    "http_client_drops_mid_request": (_http_client_drops_mid_request, {}),
    "head_deadline": (_head_deadline, {"handshake_timeout_s": 0.3}),
    "idle_deadline": (_idle_deadline, {"idle_timeout_s": 0.5}),
    "length_deadline": (_length_deadline, {"max_session_s": 2.0}),
    "not_utf8": (_not_utf8, {}),
    "bad_audio": (_bad_audio, {}),
    "realtime_abort": (_realtime_abort, {}),
    "rtc_finish": (_rtc_finish, {}),
    "rtc_vanish": (_rtc_vanish, {}),
}


@pytest.mark.parametrize("ending", ENDINGS)
async def test_an_ended_connection_leaves_nothing_to_the_garbage_collector(
    ending, load_model, speech, monkeypatch, request
):
    run, options = ENDINGS[ending]
    if ending.startswith("rtc"):
        request.getfixturevalue("loopback_ice")  # (tests/rtc.py)
    if ending == "slow_reader":
        monkeypatch.setattr(_server, "HttpLimits", functools.partial(_http.HttpLimits, write_buffer_bytes=1024))
    async with running_server(load_model("hf"), **options) as server:
        if ending == "slow_reader":
            for listener in server._sockets:  # accepted sockets inherit it
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        left = await _left_after(server, functools.partial(run, speech=speech))
    assert not left, "\n".join(left)
