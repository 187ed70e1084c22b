"""Helpers for tests against a real server on loopback (port 0), every await under a timeout."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.uri import parse_uri

from asrlive.clients import connect
from asrlive.engine import SAMPLE_RATE, DecodingOptions, StreamTranscriber, transcribe
from asrlive.web import AsrServer, ServerOptions

TIMEOUT = 60.0
CHUNK = SAMPLE_RATE // 10
GAP = np.zeros(int(1.2 * SAMPLE_RATE), dtype=np.float32)


def delayed_transcriber(seconds: float) -> type[StreamTranscriber]:
    """An engine that needs ``seconds`` more for every job: a slow, overloaded or stuck server."""

    class Delayed(StreamTranscriber):
        def transcribe_steps(self, segment, audio, final):
            time.sleep(seconds)  # in the inference thread, like real compute
            return (yield from super().transcribe_steps(segment, audio, final))

    return Delayed


@asynccontextmanager
async def running_server(model, make_transcriber=None, aligner=None, **options):
    server = AsrServer(model, ServerOptions(port=0, **options), make_transcriber, aligner)
    await asyncio.wait_for(server.start(), TIMEOUT)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.shutdown(), TIMEOUT)


def metric(exposition: str, name: str) -> float:
    """One unlabelled sample of a Prometheus exposition (as GET /metrics answers it)."""
    return float(exposition.split(f"\n{name} ")[1].split()[0])


def server_metric(server, name: str) -> float:
    """One unlabelled sample of a running server's metrics, read in process."""
    return metric(server.metrics.exposition().decode(), name)


async def eventually(condition, timeout: float = TIMEOUT) -> None:
    """Wait until ``condition()`` holds, checking every 10 ms, for at most ``timeout`` seconds."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


@dataclass
class Result:
    events: list[dict] = field(default_factory=list)
    close_code: int | None = None

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


async def stream_audio(url: str, audio: np.ndarray, pace: float = 0.0, finish: bool = True, **start) -> Result:
    """Stream ``audio`` in 100 ms frames (``pace`` seconds between frames), then finish; all events."""
    result = Result()
    async with connect(url, timeout=TIMEOUT, **start) as stream:
        result.events.append(stream.ready)

        async def send() -> None:
            try:
                for begin in range(0, audio.size, CHUNK):
                    await stream.send_audio(audio[begin : begin + CHUNK])
                    await asyncio.sleep(pace)
                if finish:
                    await stream.finish()
            except ConnectionClosed:
                pass  # the server ended the session; its events say why

        sender = asyncio.create_task(send())
        await asyncio.wait_for(_collect(stream, result), TIMEOUT)
        await asyncio.wait_for(sender, TIMEOUT)
        result.close_code = stream.close_code
    return result


async def _collect(stream, result: Result) -> None:
    async for event in stream:
        result.events.append(event)


def offline_token_ids(model, audio: np.ndarray, final: dict, options: DecodingOptions) -> list[int]:
    """What offline transcription gives for the final's utterance."""
    piece = audio[round(final["start"] * SAMPLE_RATE) : round(final["end"] * SAMPLE_RATE)]
    return list(transcribe(model, piece, options).token_ids)


class TextBytes(bytes):
    """Bytes sent as a text frame as they are: a client that does not encode its text as UTF-8."""


async def raw_session(url: str, messages: list, **kwargs) -> Result:
    """Send raw messages (str, bytes, or TextBytes as a text frame) on a bare WebSocket; collect
    everything until the close."""
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed

    result = Result()
    async with ws_connect(url, open_timeout=TIMEOUT, max_size=None, **kwargs) as ws:
        try:
            for message in messages:
                await ws.send(message, text=True if isinstance(message, TextBytes) else None)
        except ConnectionClosed:
            pass  # the server closed first (a refusal): what it sent before the close is still read
        try:
            while True:
                result.events.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))
        except ConnectionClosed:
            pass
        await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
        result.close_code = ws.close_code
    return result


def start_message(**fields) -> str:
    return json.dumps({"type": "start", **fields})


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 32767 / 32768) * 32768).round().astype("<i2").tobytes()


class DroppingProxy:
    """A TCP relay on a loopback port in front of a server; ``drop()`` cuts every open connection.

    Cutting the TCP connections (no close frame) is what a client sees when the network goes:
    the proxy keeps listening, so the client's next connection attempt gets through again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> DroppingProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info) -> None:
        assert self._server is not None
        self._server.close()
        self.drop()
        await asyncio.wait_for(self._server.wait_closed(), TIMEOUT)

    def url(self, path: str = "/v1/stream") -> str:
        assert self._server is not None
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}{path}"

    def drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {client_writer, server_writer}
        try:
            await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))
        finally:
            self._writers -= {client_writer, server_writer}
            for writer in (client_writer, server_writer):
                writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()


def slowed_forwards_transcriber(seconds: float) -> type[StreamTranscriber]:
    """An engine that needs ``seconds`` more for every forward of every job: each round still
    completes within ``seconds`` or so (the engine makes progress), while a job of many forwards
    takes many times as long."""

    class SlowedForwards(StreamTranscriber):
        def transcribe_steps(self, segment, audio, final):
            inner = super().transcribe_steps(segment, audio, final)
            try:
                request = next(inner)
                while True:
                    time.sleep(seconds)  # in the inference thread, like real compute
                    response = yield request
                    request = inner.send(response)
            except StopIteration as stop:
                return stop.value

    return SlowedForwards


async def raw_websocket(
    port: int, path: str, receive_buffer: int | None = None, timeout: float = TIMEOUT
) -> tuple[ClientProtocol, asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare WebSocket client on its sans-I/O protocol, the handshake done; ``receive_buffer``: the
    socket's receive buffer, and a small read-ahead (a client that falls behind at once)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout)
    limit = 1024 if receive_buffer is not None else 2**16
    reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
    protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"))
    protocol.send_request(protocol.connect())
    writer.write(b"".join(protocol.data_to_send()))
    while protocol.state is State.CONNECTING:
        protocol.receive_data(await asyncio.wait_for(reader.read(4096), timeout))
    assert protocol.handshake_exc is None
    return protocol, reader, writer


async def non_reading_session(port: int, path: str, messages: list[str | bytes]) -> asyncio.StreamWriter:
    """A WebSocket client with a 4 KiB receive buffer that sends everything at once and then reads
    nothing after the handshake."""
    protocol, _, writer = await raw_websocket(port, path, receive_buffer=4096)
    for message in messages:
        if isinstance(message, str):
            protocol.send_text(message.encode())
        else:
            protocol.send_binary(message)
    writer.write(b"".join(protocol.data_to_send()))
    try:
        await asyncio.wait_for(writer.drain(), TIMEOUT)
    except ConnectionError:
        pass  # given up while it was still sending
    return writer
