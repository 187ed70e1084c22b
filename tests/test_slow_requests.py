"""Slow-request attacks on the real server (CVE-2007-6750): clients that send their request head or
body slowly, or nothing, are closed within their deadlines and counted, while a session on the
same server gets the finals offline transcription gives; past ``max_connections`` a connection
gets a 503 at once, and the count recovers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from .serving import TIMEOUT, eventually, offline_token_ids, running_server, stream_audio
from .test_http_server import MARGIN, UPGRADE, hostile, read_to_eof

pytestmark = pytest.mark.asyncio

UPLOAD = (
    b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n"
    b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n"
)
PART = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + b"a" * 120
HOSTILE = {
    "silent": ([], "handshake_timeout", 0.5),
    "half an upgrade": ([UPGRADE.replace(b"/ws", b"/v1/stream")[:60]], "handshake_timeout", 0.5),
    "no blank line": ([UPGRADE.replace(b"/ws", b"/v1/stream")[:-2]], "handshake_timeout", 0.5),
    "a byte every 0.2 s": ([bytes([b]) for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"], "handshake_timeout", 0.5),
    "an upload at a byte every 0.2 s": ([UPLOAD, *(bytes([b]) for b in PART)], "body_timeout", 1.0),
}


async def http10(port: int, path: str) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    try:
        return await read_to_eof(reader, TIMEOUT)
    finally:
        writer.close()


async def test_slow_clients_are_cut_while_a_session_keeps_its_finals(load_model, speech, caplog):
    model = load_model("hf")
    clip = speech["goforward"]
    deadlines = {"handshake_timeout_s": 0.5, "body_timeout_s": 1.0, "keepalive_timeout_s": 0.5}
    async with running_server(model, **deadlines) as server:
        session = asyncio.create_task(stream_audio(server.url, clip, pace=0.01))
        elapsed = await asyncio.gather(*(hostile(server.port, send, 0.2) for send, _, _ in HOSTILE.values()))
        result = await asyncio.wait_for(session, TIMEOUT)
        exposition = (await http10(server.port, "/metrics")).decode()
    for (name, (_, _, deadline)), seconds in zip(HOSTILE.items(), elapsed, strict=True):
        assert deadline <= seconds + 0.05 < deadline + MARGIN, name
    assert 'asrlive_connections_closed_total{reason="handshake_timeout"} 4.0' in exposition
    assert 'asrlive_connections_closed_total{reason="body_timeout"} 1.0' in exposition
    assert result.close_code == 1000 and result.of_type("final")
    for final in result.of_type("final"):
        assert final["token_ids"] == offline_token_ids(model, clip, final, server.options.decoding)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_connections_past_the_limit_get_a_503_and_the_count_recovers(load_model):
    async with running_server(load_model("hf"), max_connections=3) as server:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await eventually(lambda: server._http.connections == 3)
        refused = await http10(server.port, "/healthz")
        assert refused.startswith(b"HTTP/1.1 503 Service Unavailable")
        held[0][1].close()
        await eventually(lambda: server._http.connections == 2)
        assert (await http10(server.port, "/healthz")).startswith(b"HTTP/1.1 200 OK")
        exposition = (await http10(server.port, "/metrics")).decode()
        for _, writer in held[1:]:
            writer.close()
    assert 'asrlive_connections_closed_total{reason="max_connections"} 1.0' in exposition
