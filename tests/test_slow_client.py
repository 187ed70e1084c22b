"""Clients that do not read: the outgoing queue's bound, superseded partials dropped, the client
given up while every other session keeps its results."""

from __future__ import annotations

import asyncio
import functools
import json
import socket

import numpy as np
import pytest

from asrlive.engine import SAMPLE_RATE
from asrlive.web import _server
from asrlive.web._http import HttpLimits
from asrlive.web._outbox import Outbox

from .serving import (
    GAP,
    TIMEOUT,
    eventually,
    non_reading_session,
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


@pytest.mark.asyncio
async def test_a_client_that_reads_nothing_is_given_up_and_others_keep_their_finals(load_model, speech, monkeypatch):
    # Small buffers everywhere (the transport's, the socket's, the outbox), so that the tiny model's
    # short messages fill them in seconds: 72 utterances' events are about 40 KB.
    monkeypatch.setattr(_server, "HttpLimits", functools.partial(HttpLimits, write_buffer_bytes=1024))
    model = load_model("hf")
    talk = np.concatenate([speech["cards-001"], GAP, speech["goforward"], GAP] * 36)
    async with running_server(model, max_outbox_bytes=1024) as server:
        for listener in server._sockets:  # accepted sockets inherit it
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        messages = [start_message(), *(pcm16(talk[i : i + SAMPLE_RATE]) for i in range(0, talk.size, SAMPLE_RATE))]
        writer = await non_reading_session(server.port, "/v1/stream", messages)
        result = await stream_audio(server.url, talk[: 8 * 16_000], pace=0.01, partial_interval_ms=100)
        await eventually(lambda: server_metric(server, "asrlive_slow_clients_total") == 1)
        await eventually(lambda: server_metric(server, "asrlive_open_sessions") == 0)
        writer.transport.abort()
    assert result.close_code == 1000 and result.events[-1]["reason"] == "finish"
    finals = result.of_type("final")
    assert finals
    for final in finals:
        assert final["token_ids"] == offline_token_ids(model, talk, final, server.options.decoding)
