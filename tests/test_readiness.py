"""Readiness as capacity (/readyz) and liveness (/healthz), as load balancers and Kubernetes probe
them: full, lagging and draining replicas are not ready; probes are answered over HTTP/1.0 and
write nothing to the log."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from asrlive.clients import connect
from asrlive.engine import SAMPLE_RATE

from .serving import TIMEOUT, delayed_transcriber, eventually, raw_session, running_server, start_message, stream_audio

pytestmark = pytest.mark.asyncio


async def http10(port: int, request_line: str) -> tuple[int, dict, bytes]:
    """One request as HAProxy's ``option httpchk`` sends it: HTTP/1.0, no Host, then read to EOF."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        writer.write(f"{request_line}\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), TIMEOUT)  # the server closes after answering 1.0
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


async def probe(server, path: str) -> tuple[int, dict]:
    status, _, body = await http10(server.port, f"GET {path} HTTP/1.0")
    return status, json.loads(body)


async def test_ready_until_full(load_model):
    async with running_server(load_model("hf"), max_sessions=1) as server:
        assert await probe(server, "/readyz") == (
            200,
            {"status": "ready", "sessions": 0, "max_sessions": 1, "lag_seconds": 0.0},
        )
        async with connect(server.url, timeout=TIMEOUT) as session:
            status, body = await probe(server, "/readyz")
            assert status == 503 and body["status"] == "full" and body["sessions"] == 1
            assert "all 1 sessions are in use" in body["message"]
            assert (await probe(server, "/healthz"))[0] == 200  # alive all the same
            await session.finish()
            assert [event["type"] async for event in session] == ["done"]
        await eventually(lambda: server.admission.unavailable() is None)
        assert (await probe(server, "/readyz"))[0] == 200


async def test_not_ready_while_lagging(load_model, speech):
    slow = delayed_transcriber(0.5)
    async with running_server(load_model("hf"), slow, max_lag_s=0.5) as server:
        clip = speech["librivox-0870"]
        lagging = asyncio.create_task(stream_audio(server.url, clip, pace=0.01, partial_interval_ms=100))
        await eventually(lambda: server.admission.worst_lag() > 0.5)
        status, body = await probe(server, "/readyz")
        assert status == 503 and body["status"] == "lagging" and body["lag_seconds"] > 0.5
        await asyncio.wait_for(lagging, TIMEOUT)


async def test_draining_replica_answers_not_ready_then_goes(load_model, speech):
    """SIGTERM's drain: the replica keeps answering probes (503 ``stopping``; alive) and refuses
    new sessions with ``server_busy`` while its open session gets its finals; then its port closes."""
    server_ctx = running_server(load_model("hf"), delayed_transcriber(0.5))  # a drain of a second or more
    server = await server_ctx.__aenter__()
    clip = speech["librivox-0870"][: 5 * SAMPLE_RATE]
    session = asyncio.create_task(stream_audio(server.url, clip, pace=0.002, finish=False))
    await eventually(lambda: server.metrics.audio_seconds._value.get() >= 4.0)
    shutdown = asyncio.create_task(server.shutdown())
    await eventually(lambda: server.admission.unavailable() is not None)
    status, body = await probe(server, "/readyz")
    assert status == 503 and body["status"] == "stopping" and body["message"] == "the server is shutting down"
    status, body = await probe(server, "/healthz")
    assert status == 200 and body["status"] == "stopping"
    refused = await raw_session(server.url, [start_message()])
    assert refused.events[0]["code"] == "server_busy" and refused.close_code == 1013
    assert not shutdown.done(), "the drain outlasted the probes"
    await asyncio.wait_for(shutdown, TIMEOUT)
    result = await asyncio.wait_for(session, TIMEOUT)
    await server_ctx.__aexit__(None, None, None)
    assert result.close_code == 1001 and result.of_type("final")
    with pytest.raises(OSError):
        await http10(server.port, "GET /readyz HTTP/1.0")


async def test_probes_write_nothing_to_the_log(load_model, caplog):
    async with running_server(load_model("hf")) as server:
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            for request_line in ["GET /readyz HTTP/1.0", "GET /healthz HTTP/1.0", "HEAD /readyz HTTP/1.0"] * 3:
                status, headers, _ = await http10(server.port, request_line)
                assert status == 200 and headers["content-type"] == "application/json"
        assert [(record.name, record.getMessage()) for record in caplog.records] == []
