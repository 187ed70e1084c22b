"""Clients that do not read: the outgoing queue's bound, superseded partials dropped, the client
given up while every other session keeps its results."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

from asrlive.engine import SAMPLE_RATE
from asrlive.web._outbox import Outbox
from asrlive.web._websocket import WebSocketProtocol

from .serving import (
    GAP,
    TIMEOUT,
    eventually,
    offline_token_ids,
    pcm16,
    running_server,
    server_metric,
    start_message,
    stream_audio,
)


def _queued(outbox: Outbox) -> list[str]:
    return [json.loads(text)["type"] for text in _drain(outbox)]


def _drain(outbox: Outbox) -> list[str]:
    async def take() -> list[str]:
        outbox.end()
        texts = []
        while (text := await outbox.get()) is not None:
            texts.append(text)
            outbox.task_done()
        outbox.task_done()
        await asyncio.wait_for(outbox.join(), TIMEOUT)
        return texts

    return asyncio.run(take())


def _put(outbox: Outbox, kind: str, pad: int = 40) -> bool:
    return outbox.put(kind, json.dumps({"type": kind, "pad": "x" * pad}))


def test_the_outbox_keeps_everything_under_its_bound():
    outbox = Outbox(max_bytes=10_000)
    kinds = ["speech_started", "partial", "partial", "lag", "lag", "speech_stopped", "partial", "final"]
    assert all(_put(outbox, kind) for kind in kinds)
    assert outbox.dropped == 0 and _queued(outbox) == kinds


def test_over_its_bound_the_outbox_drops_only_superseded_partials_and_lags():
    outbox = Outbox(max_bytes=400)
    kinds = ["speech_started", "partial", "lag", "partial", "speech_stopped", "partial", "final", "lag", "partial"]
    results = [_put(outbox, kind) for kind in kinds]
    # Messages of 66 to 77 bytes: the 6th goes over 400 and the two partials before it go, the 8th
    # too and the partial before the final and the older lag go. Each put ends under the bound.
    assert results == [True] * len(kinds)
    assert outbox.dropped == 4
    assert _queued(outbox) == ["speech_started", "speech_stopped", "final", "lag", "partial"]


def test_a_record_over_the_bound_is_refused_but_kept():
    outbox = Outbox(max_bytes=200)
    results = [_put(outbox, kind) for kind in ["final", "final", "final", "partial", "final"]]
    assert results == [True, True, False, False, False]  # 68-byte finals are never dropped: put says so
    assert _queued(outbox) == ["final", "final", "final", "final"]  # the partial before a final went


async def _non_reading_session(port: int, audio: np.ndarray) -> asyncio.StreamWriter:
    """A WebSocket client that sends a start and all its audio at once and then reads nothing: a
    4 KiB receive buffer, and no read after the handshake."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/v1/stream"))
    protocol.send_request(protocol.connect())
    writer.write(b"".join(protocol.data_to_send()))
    while protocol.state is State.CONNECTING:
        protocol.receive_data(await asyncio.wait_for(reader.read(1024), TIMEOUT))
    assert protocol.handshake_exc is None
    protocol.send_text(start_message().encode())
    for begin in range(0, audio.size, SAMPLE_RATE):
        protocol.send_binary(pcm16(audio[begin : begin + SAMPLE_RATE]))
    writer.write(b"".join(protocol.data_to_send()))
    await asyncio.wait_for(writer.drain(), TIMEOUT)
    return writer


@pytest.mark.asyncio
async def test_a_client_that_reads_nothing_is_given_up_and_others_keep_their_finals(load_model, speech, monkeypatch):
    # Small buffers everywhere (the transport's, the socket's, the outbox), so that the tiny model's
    # short messages fill them in seconds: 72 utterances' events are about 40 KB.
    monkeypatch.setattr(WebSocketProtocol, "write_buffer_bytes", 1024)
    model = load_model("hf")
    talk = np.concatenate([speech["cards-001"], GAP, speech["goforward"], GAP] * 36)
    async with running_server(model, max_outbox_bytes=1024) as server:
        for listener in server._sockets:  # accepted sockets inherit it
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer = await _non_reading_session(server.port, talk)
        result = await stream_audio(server.url, talk[: 8 * 16_000], pace=0.01, partial_interval_ms=100)
        await eventually(lambda: server_metric(server, "asrlive_slow_clients_total") == 1)
        await eventually(lambda: server_metric(server, "asrlive_open_sessions") == 0)
        writer.transport.abort()
    assert result.close_code == 1000 and result.events[-1]["reason"] == "finish"
    finals = result.of_type("final")
    assert finals
    for final in finals:
        assert final["token_ids"] == offline_token_ids(model, talk, final, server.options.decoding)
